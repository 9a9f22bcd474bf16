//! RULER (Hsieh et al. 2024, NVIDIA/RULER): the synthetic long-context tasks that need no
//! download, generated locally with RULER's own templates, draws and scoring.
//!
//! Included: `niah_single_1` (noise haystack), `niah_multikey_2` (a haystack of needles),
//! `niah_multikey_3` (UUID keys and values), `vt`, `cwe` and `fwe`. Not included, because
//! they need downloads: the essay haystacks (`niah_single_2/3`, `niah_multikey_1`,
//! `niah_multivalue`, `niah_multiquery`: Paul Graham essays) and `qa_1`/`qa_2`
//! (SQuAD, HotpotQA).

pub mod generate;
pub mod pyrandom;
pub mod run;
pub mod words;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use run::{run_ruler, RulerJob, RulerPlan, RulerReport, RulerSettings};

/// One of RULER's locally generated tasks, with its `synthetic.yaml` arguments.
/// Records and summaries name tasks as RULER does ([`RulerTask::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RulerTask {
    #[serde(rename = "niah_single_1")]
    NiahSingle1,
    #[serde(rename = "niah_multikey_2")]
    NiahMultikey2,
    #[serde(rename = "niah_multikey_3")]
    NiahMultikey3,
    #[serde(rename = "vt")]
    Vt,
    #[serde(rename = "cwe")]
    Cwe,
    #[serde(rename = "fwe")]
    Fwe,
}

/// RULER's tasks that need downloaded text, named in errors.
const NOT_INCLUDED: &[&str] = &[
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multivalue",
    "niah_multiquery",
    "qa_1",
    "qa_2",
];

impl RulerTask {
    /// Every task, in RULER's order.
    pub const ALL: [RulerTask; 6] = [
        RulerTask::NiahSingle1,
        RulerTask::NiahMultikey2,
        RulerTask::NiahMultikey3,
        RulerTask::Vt,
        RulerTask::Cwe,
        RulerTask::Fwe,
    ];

    /// The task's name in RULER's `synthetic.yaml`.
    pub fn name(self) -> &'static str {
        match self {
            RulerTask::NiahSingle1 => "niah_single_1",
            RulerTask::NiahMultikey2 => "niah_multikey_2",
            RulerTask::NiahMultikey3 => "niah_multikey_3",
            RulerTask::Vt => "vt",
            RulerTask::Cwe => "cwe",
            RulerTask::Fwe => "fwe",
        }
    }

    /// `tokens_to_generate` (`scripts/data/synthetic/constants.py`).
    pub fn tokens_to_generate(self) -> usize {
        match self {
            RulerTask::NiahSingle1 | RulerTask::NiahMultikey2 | RulerTask::NiahMultikey3 => 128,
            RulerTask::Vt => 30,
            RulerTask::Cwe => 120,
            RulerTask::Fwe => 50,
        }
    }

    /// The task template (`constants.py`), before the answer prefix.
    pub fn template(self) -> &'static str {
        match self {
            RulerTask::NiahSingle1 | RulerTask::NiahMultikey2 | RulerTask::NiahMultikey3 => {
                "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
            }
            RulerTask::Vt => {
                "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
            }
            RulerTask::Cwe => {
                "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
            }
            RulerTask::Fwe => {
                "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
            }
        }
    }

    /// `answer_prefix` (`constants.py`): appended to the prompt, so the model answers
    /// straight after it.
    pub fn answer_prefix(self) -> &'static str {
        match self {
            RulerTask::NiahSingle1 | RulerTask::NiahMultikey2 | RulerTask::NiahMultikey3 => {
                " The special magic {type_needle_v} for {query} mentioned in the provided text are"
            }
            RulerTask::Vt => {
                " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: "
            }
            RulerTask::Cwe => " Answer: The top 10 words that appear most often in the list are:",
            RulerTask::Fwe => {
                " Answer: According to the coded text above, the three most frequently appeared words are:"
            }
        }
    }

    /// RULER's metric for the task (`scripts/eval/synthetic/constants.py`): every task
    /// here is scored by string_match_all (string_match_part is QA's).
    pub fn score(self, prediction: &str, references: &[String]) -> f64 {
        string_match_all(&postprocess_prediction(prediction), references)
    }
}

impl std::fmt::Display for RulerTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RulerTask {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(t) = RulerTask::ALL.iter().find(|t| t.name() == s) {
            return Ok(*t);
        }
        let known: Vec<&str> = RulerTask::ALL.iter().map(|t| t.name()).collect();
        if NOT_INCLUDED.contains(&s) {
            bail!(
                "RULER task '{s}' needs downloaded text (Paul Graham essays or SQuAD/HotpotQA) and is not included; the tasks are {}",
                known.join(", ")
            );
        }
        bail!(
            "unknown RULER task '{s}': the tasks are {}",
            known.join(", ")
        )
    }
}

/// Comma-separated task names (`all` for every task); duplicates refused.
pub fn parse_tasks(s: &str) -> Result<Vec<RulerTask>> {
    if s.trim() == "all" {
        return Ok(RulerTask::ALL.to_vec());
    }
    let mut tasks = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let t: RulerTask = part.parse()?;
        if tasks.contains(&t) {
            bail!("RULER task '{t}' is listed twice");
        }
        tasks.push(t);
    }
    if tasks.is_empty() {
        bail!("no RULER task given");
    }
    Ok(tasks)
}

/// One generated sample, as RULER's generators write it to their JSONL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulerSample {
    /// Sample number within the task and length.
    pub index: usize,
    /// The prompt without its answer prefix.
    pub input: String,
    /// The answer prefix the model continues from.
    pub answer_prefix: String,
    /// The strings the answer must contain.
    pub outputs: Vec<String>,
    /// Prompt tokens plus the tokens to generate (at most the length asked for).
    pub length: usize,
}

impl RulerSample {
    /// The text the model reads: `input + answer_prefix`, as RULER's `call_api.py` sends.
    pub fn prompt(&self) -> String {
        format!("{}{}", self.input, self.answer_prefix)
    }
}

/// `postprocess_pred` (`scripts/eval/evaluate.py`): strip, turn control characters into
/// newlines, strip again.
pub fn postprocess_prediction(prediction: &str) -> String {
    let replaced: String = prediction
        .trim()
        .chars()
        .map(|c| if (c as u32) < 0x20 { '\n' } else { c })
        .collect();
    replaced.trim().to_string()
}

/// RULER's `string_match_all` for one prediction: the fraction of references found in it,
/// case-insensitively.
pub fn string_match_all(prediction: &str, references: &[String]) -> f64 {
    if references.is_empty() {
        return 0.0;
    }
    let p = prediction.to_lowercase();
    let found = references
        .iter()
        .filter(|r| p.contains(&r.to_lowercase()))
        .count();
    found as f64 / references.len() as f64
}

/// RULER's `string_match_part` for one prediction: 1 when any reference is found.
pub fn string_match_part(prediction: &str, references: &[String]) -> f64 {
    let p = prediction.to_lowercase();
    if references.iter().any(|r| p.contains(&r.to_lowercase())) {
        1.0
    } else {
        0.0
    }
}

/// A task's score as RULER reports it: the mean per-sample score × 100, rounded to two
/// decimals (`round(score, 2)`).
pub fn task_score(per_sample: &[f64]) -> f64 {
    if per_sample.is_empty() {
        return 0.0;
    }
    round2(per_sample.iter().sum::<f64>() / per_sample.len() as f64 * 100.0)
}

/// Python's `round(x, 2)` for the values scores take (half to even on the decimal value).
pub fn round2(x: f64) -> f64 {
    // Python rounds the exact binary value; formatting with two decimals does the same.
    format!("{x:.2}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_parse_and_refuse_downloads() {
        assert_eq!(
            parse_tasks("niah_single_1,vt").unwrap(),
            vec![RulerTask::NiahSingle1, RulerTask::Vt]
        );
        assert_eq!(parse_tasks("all").unwrap().len(), 6);
        let e = parse_tasks("qa_1").unwrap_err().to_string();
        assert!(e.contains("not included"), "{e}");
        let e = parse_tasks("niah_x").unwrap_err().to_string();
        assert!(e.contains("unknown RULER task 'niah_x'"), "{e}");
        assert!(parse_tasks("vt,vt").is_err());
    }

    #[test]
    fn tasks_serialize_under_rulers_names() {
        for t in RulerTask::ALL {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.name()));
            assert_eq!(serde_json::from_str::<RulerTask>(&json).unwrap(), t);
        }
    }

    #[test]
    fn string_match_all_counts_references_case_insensitively() {
        let refs = vec!["Apple".to_string(), "pear".to_string()];
        assert_eq!(string_match_all("an APPLE", &refs), 0.5);
        assert_eq!(string_match_part("an APPLE", &refs), 1.0);
        assert_eq!(postprocess_prediction("  a\tb\u{1}c \n"), "a\nb\nc");
    }
}
