//! Passkey retrieval (the authors' BABILong-derived needle-in-a-haystack).
//!
//! A prompt of exactly N tokens is `prefix + haystack[..p] + needle +
//! haystack[p..] + suffix`, where the needle hides a random key and `p` is the
//! sentence boundary nearest `depth × budget`. The model decodes greedily at
//! most `max_new_tokens` tokens; a sample succeeds iff the key equals one
//! whitespace-separated token of the output.
//!
//! Prompt construction (see [`PromptBuilder`]) is exact and must not change:
//! a shipped model was fine-tuned on exactly these prompts.

mod grid;
mod run;

pub use grid::{CellStat, PasskeyGrid};
pub use run::{
    files, run_passkey, PasskeyJob, PasskeyPlan, PasskeyReport, PasskeySample, PasskeySettings,
    PasskeyUnit,
};

use super::common::{fnv1a64, mix_seed, strip_bom};
use super::EvalModel;
use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The built-in filler haystack (repeated as needed).
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// Names accepted by `--template` besides a JSON file.
pub const TEMPLATE_PRESETS: [&str; 3] = ["authors", "classic", "model"];

/// The needle both presets use; `{key}` is replaced by the key.
pub const DEFAULT_NEEDLE: &str = "The pass key is {key}. Remember it. {key} is the pass key. ";

/// A passkey prompt template (the JSON format shipped beside models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasskeyTemplate {
    /// A short name for reports.
    pub name: String,
    /// Text before the haystack.
    pub prefix: String,
    /// The needle; every `{key}` is replaced by the key.
    pub needle: String,
    /// Text after the haystack (the question).
    pub suffix: String,
    /// Smallest key (inclusive).
    pub key_min: u64,
    /// Largest key (inclusive).
    pub key_max: u64,
    /// Optional default haystack: `"filler"` for the built-in filler even when
    /// the model ships a haystack; absent or `"model"` for the usual order
    /// (the model's haystack, else the filler). `--haystack` always wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haystack: Option<String>,
}

impl PasskeyTemplate {
    /// The `authors` preset (the DeciMamba repository's passkey prompt).
    pub fn authors() -> Self {
        PasskeyTemplate {
            name: "authors".into(),
            prefix: "There is an important pass key hidden inside a lot of irrelevant text. \
                     Find it and memorize it:\n"
                .into(),
            needle: DEFAULT_NEEDLE.into(),
            suffix: "\nAnswer: ".into(),
            key_min: 0,
            key_max: 99_999,
            haystack: None,
        }
    }

    /// The `classic` preset (the landmark-attention style prompt over the filler).
    pub fn classic() -> Self {
        PasskeyTemplate {
            name: "classic".into(),
            prefix: "There is an important info hidden inside a lot of irrelevant text. \
                     Find it and memorize it. I will quiz you about the important information there.\n"
                .into(),
            needle: DEFAULT_NEEDLE.into(),
            suffix: "\nWhat is the pass key? The pass key is".into(),
            key_min: 1,
            key_max: 50_000,
            haystack: Some("filler".into()),
        }
    }

    /// Parses and validates a template from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let t: PasskeyTemplate = serde_json::from_str(text).with_context(|| {
            format!(
                "{origin} is not a valid passkey template (expected JSON with \"name\", \"prefix\", \
                 \"needle\", \"suffix\", \"key_min\", \"key_max\")"
            )
        })?;
        t.validate()
            .with_context(|| format!("invalid passkey template {origin}"))?;
        Ok(t)
    }

    /// Checks the needle holds `{key}`, the key range and the haystack choice.
    pub fn validate(&self) -> Result<()> {
        if !self.needle.contains("{key}") {
            bail!("the needle must contain {{key}}");
        }
        if self.key_min > self.key_max {
            bail!(
                "key_min ({}) is larger than key_max ({})",
                self.key_min,
                self.key_max
            );
        }
        match self.haystack.as_deref() {
            None | Some("filler") | Some("model") => Ok(()),
            Some(o) => bail!("unknown haystack '{o}' (expected \"filler\" or \"model\")"),
        }
    }

    /// The needle text holding `key` (not zero-padded).
    pub fn needle_for(&self, key: u64) -> String {
        self.needle.replace("{key}", &key.to_string())
    }
}

/// Resolves `--template`: a preset name or a JSON file. Without a choice, the
/// model's shipped template is used when there is one, else `authors`.
pub fn resolve_template(
    spec: Option<&str>,
    model_template: Option<&str>,
) -> Result<PasskeyTemplate> {
    let model = || -> Result<PasskeyTemplate> {
        match model_template {
            Some(t) => PasskeyTemplate::from_json(t, "the model's passkey template"),
            None => bail!(
                "the model ships no passkey template; use one of the presets ({}) or a JSON file",
                TEMPLATE_PRESETS[..2].join(", ")
            ),
        }
    };
    match spec {
        None => match model_template {
            Some(_) => model(),
            None => Ok(PasskeyTemplate::authors()),
        },
        Some("authors") => Ok(PasskeyTemplate::authors()),
        Some("classic") => Ok(PasskeyTemplate::classic()),
        Some("model") => model(),
        Some(other) => {
            let p = Path::new(other);
            if p.is_file() {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read template {}", p.display()))?;
                PasskeyTemplate::from_json(strip_bom(&text), &p.display().to_string())
            } else {
                bail!(
                    "unknown passkey template '{other}': not a preset ({}) nor a JSON file",
                    TEMPLATE_PRESETS.join(", ")
                )
            }
        }
    }
}

/// Replaces every whitespace run with one space and trims the ends.
pub fn normalize_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Splits text into sentences: whitespace runs become one space, and a
/// sentence ends after `.`, `!` or `?` followed by a space. Every sentence
/// keeps exactly one trailing space (the last one gets one).
pub fn split_sentences(text: &str) -> Vec<String> {
    let norm = normalize_whitespace(text);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = norm.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?') && chars.peek() == Some(&' ') {
            chars.next();
            cur.push(' ');
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        cur.push(' ');
        out.push(cur);
    }
    out
}

/// The text the needle is hidden in, as sentences.
#[derive(Debug, Clone)]
pub struct Haystack {
    /// Where it came from (file, folder, `model` or `filler`).
    pub source: String,
    sentences: Vec<String>,
    fingerprint: u64,
}

impl Haystack {
    /// Builds a haystack from text; errors when it holds no sentence.
    pub fn from_text(source: impl Into<String>, text: &str) -> Result<Self> {
        let source = source.into();
        let sentences = split_sentences(text);
        if sentences.is_empty() {
            bail!("the haystack {source} is empty");
        }
        let fingerprint = fnv1a64(sentences.concat().as_bytes());
        Ok(Haystack {
            source,
            sentences,
            fingerprint,
        })
    }

    /// The built-in filler.
    pub fn filler() -> Self {
        Haystack::from_text("filler", FILLER).expect("filler is not empty")
    }

    /// Reads a haystack from a `.txt` file, or from every `.txt` file of a
    /// folder (sorted by name, joined with a space).
    pub fn load(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read haystack folder {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("haystack folder {} has no .txt files", path.display());
            }
            v
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            bail!("haystack {} does not exist", path.display());
        };
        let mut text = String::new();
        for f in &files {
            let bytes = std::fs::read(f)
                .with_context(|| format!("cannot read haystack {}", f.display()))?;
            let s = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not valid UTF-8 (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            text.push_str(strip_bom(&s));
            text.push(' ');
        }
        Haystack::from_text(path.display().to_string(), &text)
    }

    /// The haystack for a run: `--haystack` when given, else the filler when
    /// the template asks for it, else the model's shipped haystack, else the filler.
    pub fn choose(
        cli: Option<&Path>,
        template: &PasskeyTemplate,
        model_haystack: Option<&str>,
    ) -> Result<Self> {
        if let Some(p) = cli {
            return Haystack::load(p);
        }
        if template.haystack.as_deref() == Some("filler") {
            return Ok(Haystack::filler());
        }
        match model_haystack {
            Some(t) => Haystack::from_text("model", t),
            None => Ok(Haystack::filler()),
        }
    }

    /// The sentences, each with one trailing space.
    pub fn sentences(&self) -> &[String] {
        &self.sentences
    }

    /// A hash of the sentences, recorded in `run.json`.
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", self.fingerprint)
    }
}

/// One built passkey prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeyPrompt {
    /// The prompt's token ids (exactly the requested length).
    pub ids: Vec<u32>,
    /// The hidden key.
    pub key: u64,
    /// Token offset of the needle's first token in `ids`.
    pub needle_position: usize,
    /// Number of needle tokens.
    pub needle_tokens: usize,
    /// Haystack tokens in the prompt (the budget).
    pub haystack_tokens: usize,
    /// Offset inside the haystack where the needle went (a sentence boundary).
    pub boundary: usize,
    /// Index of the haystack sentence the haystack starts with.
    pub start_sentence: usize,
}

/// Builds passkey prompts of exact token lengths, encoding each distinct
/// haystack sentence once.
pub struct PromptBuilder<'a> {
    model: &'a dyn EvalModel,
    template: &'a PasskeyTemplate,
    haystack: &'a Haystack,
    prefix_ids: Vec<u32>,
    suffix_ids: Vec<u32>,
    /// Sentence index → index of its distinct text.
    unique_of: Vec<usize>,
    /// Encodings of the distinct texts, filled lazily.
    cache: Vec<Option<Vec<u32>>>,
}

impl<'a> PromptBuilder<'a> {
    /// Encodes the prefix and suffix; sentences are encoded on first use.
    pub fn new(
        model: &'a dyn EvalModel,
        template: &'a PasskeyTemplate,
        haystack: &'a Haystack,
    ) -> Result<Self> {
        let prefix_ids = model.encode(&template.prefix)?;
        let suffix_ids = model.encode(&template.suffix)?;
        let mut index: HashMap<&str, usize> = HashMap::new();
        let unique_of = haystack
            .sentences()
            .iter()
            .map(|s| {
                let n = index.len();
                *index.entry(s.as_str()).or_insert(n)
            })
            .collect();
        Ok(PromptBuilder {
            model,
            template,
            haystack,
            prefix_ids,
            suffix_ids,
            unique_of,
            cache: vec![None; index.len()],
        })
    }

    /// Tokens of the template alone (prefix + needle with `key` + suffix).
    pub fn template_tokens(&self, key: u64) -> Result<usize> {
        Ok(self.prefix_ids.len()
            + self.model.encode(&self.template.needle_for(key))?.len()
            + self.suffix_ids.len())
    }

    fn sentence_ids(&mut self, i: usize) -> Result<&[u32]> {
        let u = self.unique_of[i];
        if self.cache[u].is_none() {
            self.cache[u] = Some(self.model.encode(&self.haystack.sentences()[i])?);
        }
        Ok(self.cache[u].as_deref().unwrap_or(&[]))
    }

    /// Builds the prompt of exactly `length` tokens with `key` at `depth`,
    /// the haystack starting at sentence `start_sentence` (taken cyclically).
    pub fn build(
        &mut self,
        length: usize,
        depth: f64,
        key: u64,
        start_sentence: usize,
    ) -> Result<PasskeyPrompt> {
        let needle_ids = self.model.encode(&self.template.needle_for(key))?;
        let overhead = self.prefix_ids.len() + needle_ids.len() + self.suffix_ids.len();
        if length <= overhead {
            bail!("length {length} is shorter than the template ({overhead} tokens)");
        }
        let budget = length - overhead;
        let n = self.haystack.sentences().len();
        let mut hay: Vec<u32> = Vec::with_capacity(budget + 256);
        let mut boundaries: Vec<usize> = Vec::new();
        let mut i = start_sentence % n;
        let mut empty_in_a_row = 0usize;
        while hay.len() < budget {
            if boundaries.last() != Some(&hay.len()) {
                boundaries.push(hay.len());
            }
            let ids = self.sentence_ids(i)?;
            if ids.is_empty() {
                empty_in_a_row += 1;
                if empty_in_a_row >= n {
                    bail!("the haystack {} encodes to no tokens", self.haystack.source);
                }
            } else {
                empty_in_a_row = 0;
            }
            hay.extend_from_slice(ids);
            i = (i + 1) % n;
        }
        hay.truncate(budget);
        boundaries.push(budget);
        let target = depth.clamp(0.0, 1.0) * budget as f64;
        // Nearest boundary; on a tie the earlier one.
        let boundary = boundaries
            .iter()
            .copied()
            .min_by(|a, b| {
                let da = (*a as f64 - target).abs();
                let db = (*b as f64 - target).abs();
                da.partial_cmp(&db).unwrap().then(a.cmp(b))
            })
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(length);
        ids.extend_from_slice(&self.prefix_ids);
        ids.extend_from_slice(&hay[..boundary]);
        let needle_position = ids.len();
        ids.extend_from_slice(&needle_ids);
        ids.extend_from_slice(&hay[boundary..]);
        ids.extend_from_slice(&self.suffix_ids);
        debug_assert_eq!(ids.len(), length);
        Ok(PasskeyPrompt {
            ids,
            key,
            needle_position,
            needle_tokens: needle_ids.len(),
            haystack_tokens: budget,
            boundary,
            start_sentence: start_sentence % n,
        })
    }

    /// Draws the key (first) and the starting sentence (second) from `rng`,
    /// then builds the prompt.
    pub fn sample(
        &mut self,
        length: usize,
        depth: f64,
        rng: &mut impl Rng,
    ) -> Result<PasskeyPrompt> {
        let key = rng.gen_range(self.template.key_min..=self.template.key_max);
        let start = rng.gen_range(0..self.haystack.sentences().len());
        self.build(length, depth, key, start)
    }
}

/// The seed of the prompt for one grid cell sample; it does not depend on the
/// method, so `--compare` runs both methods on identical prompts.
pub fn cell_seed(seed: u64, length: usize, depth: f64, sample: usize) -> u64 {
    mix_seed(&[seed, length as u64, depth.to_bits(), sample as u64])
}

/// Whether `key` equals one whitespace-separated token of `output`.
pub fn key_found(output: &str, key: u64) -> bool {
    let k = key.to_string();
    output.split_whitespace().any(|t| t == k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{GreedyOutput, TailScore};
    use crate::policy::Policy;

    /// Byte-level tokenizer; finds the key by scanning the prompt.
    struct Bytes;
    impl EvalModel for Bytes {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            Ok(
                String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>())
                    .into_owned(),
            )
        }
        fn generate_greedy(&self, prompt: &[u32], _: usize, _: &Policy) -> Result<GreedyOutput> {
            let text = self.decode(prompt)?;
            let key = text
                .split("The pass key is ")
                .nth(1)
                .map(|r| {
                    r.chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect::<String>()
                })
                .unwrap_or_default();
            Ok(GreedyOutput {
                tokens: vec![],
                text: format!(" {key}"),
                prefill_secs: 0.0,
                kept_per_layer: vec![],
            })
        }
        fn score_tail(&self, _: &[u32], _: usize, _: &Policy) -> Result<TailScore> {
            unreachable!()
        }
        fn name(&self) -> String {
            "bytes".into()
        }
    }

    #[test]
    fn sentences_split_and_keep_one_space() {
        assert_eq!(
            split_sentences("  Hi there.  How\n are you?Fine!  Ok. end"),
            vec!["Hi there. ", "How are you?Fine! ", "Ok. ", "end "]
        );
        assert_eq!(split_sentences(FILLER).len(), 5);
        assert!(split_sentences(" \n ").is_empty());
    }

    #[test]
    fn prompt_has_exact_length_and_needle_at_nearest_boundary() {
        let t = PasskeyTemplate::authors();
        let h = Haystack::filler();
        let m = Bytes;
        let mut b = PromptBuilder::new(&m, &t, &h).unwrap();
        for &len in &[300usize, 777, 2048] {
            for &depth in &[0.0, 0.3, 0.5, 1.0] {
                let p = b.build(len, depth, 4242, 2).unwrap();
                assert_eq!(p.ids.len(), len);
                let text = m.decode(&p.ids).unwrap();
                let needle = t.needle_for(4242);
                let pos = text.find(&needle).unwrap();
                assert_eq!(pos, p.needle_position); // bytes = tokens
                assert!(text.starts_with(&t.prefix) && text.ends_with(&t.suffix));
                // Haystack starts at sentence 2 ("The sun is yellow. ").
                assert!(text[t.prefix.len()..].starts_with("The sun") || p.boundary == 0);
                // Brute-force the nearest sentence boundary.
                let hay: String = {
                    let mut s = String::new();
                    let mut i = 2;
                    while s.len() < p.haystack_tokens {
                        s.push_str(&h.sentences()[i % 5]);
                        i += 1;
                    }
                    s.truncate(p.haystack_tokens);
                    s
                };
                let mut bounds = vec![0usize];
                let mut off = 0;
                let mut i = 2;
                loop {
                    off += h.sentences()[i % 5].len();
                    i += 1;
                    if off >= hay.len() {
                        break;
                    }
                    bounds.push(off);
                }
                bounds.push(hay.len());
                let target = depth * hay.len() as f64;
                let best = *bounds
                    .iter()
                    .min_by(|a, b| {
                        ((**a as f64 - target).abs())
                            .partial_cmp(&(**b as f64 - target).abs())
                            .unwrap()
                    })
                    .unwrap();
                assert_eq!(p.boundary, best, "len {len} depth {depth}");
                assert_eq!(p.needle_position, t.prefix.len() + best);
            }
        }
    }

    #[test]
    fn too_short_lengths_are_rejected() {
        let t = PasskeyTemplate::authors();
        let h = Haystack::filler();
        let mut b = PromptBuilder::new(&Bytes, &t, &h).unwrap();
        let e = b.build(50, 0.5, 7, 0).unwrap_err().to_string();
        let m = t.prefix.len() + t.needle_for(7).len() + t.suffix.len();
        assert_eq!(
            e,
            format!("length 50 is shorter than the template ({m} tokens)")
        );
    }

    #[test]
    fn success_needs_an_exact_token() {
        assert!(key_found(" 123 is it", 123));
        assert!(key_found("123", 123));
        assert!(!key_found(" 1234", 123));
        assert!(!key_found("0123", 123));
        assert!(!key_found("", 0));
    }

    #[test]
    fn templates_resolve() {
        assert_eq!(resolve_template(None, None).unwrap().name, "authors");
        assert_eq!(
            resolve_template(Some("classic"), None).unwrap().name,
            "classic"
        );
        let shipped = serde_json::to_string(&PasskeyTemplate {
            name: "ship".into(),
            ..PasskeyTemplate::authors()
        })
        .unwrap();
        assert_eq!(resolve_template(None, Some(&shipped)).unwrap().name, "ship");
        assert_eq!(
            resolve_template(Some("model"), Some(&shipped))
                .unwrap()
                .name,
            "ship"
        );
        let e = resolve_template(Some("nope"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown passkey template 'nope'") && e.contains("authors, classic, model"),
            "{e}"
        );
        let e = resolve_template(Some("model"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ships no passkey template"), "{e}");
        let bad =
            r#"{"name":"x","prefix":"","needle":"no key","suffix":"","key_min":0,"key_max":9}"#;
        let e = format!("{:#}", resolve_template(None, Some(bad)).unwrap_err());
        assert!(e.contains("{key}"), "{e}");
    }

    #[test]
    fn sentence_encodings_are_cached() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting(AtomicUsize);
        impl EvalModel for Counting {
            fn encode(&self, text: &str) -> Result<Vec<u32>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Bytes.encode(text)
            }
            fn decode(&self, ids: &[u32]) -> Result<String> {
                Bytes.decode(ids)
            }
            fn generate_greedy(&self, p: &[u32], n: usize, d: &Policy) -> Result<GreedyOutput> {
                Bytes.generate_greedy(p, n, d)
            }
            fn score_tail(&self, _: &[u32], _: usize, _: &Policy) -> Result<TailScore> {
                unreachable!()
            }
            fn name(&self) -> String {
                "c".into()
            }
        }
        let m = Counting(AtomicUsize::new(0));
        let t = PasskeyTemplate::authors();
        let h = Haystack::from_text("x", &FILLER.repeat(50)).unwrap();
        let mut b = PromptBuilder::new(&m, &t, &h).unwrap();
        b.build(20_000, 0.5, 1, 0).unwrap();
        b.build(20_000, 0.25, 2, 3).unwrap();
        // prefix + suffix + 5 distinct sentences + 2 needles.
        assert_eq!(m.0.load(Ordering::SeqCst), 2 + 5 + 2);
    }
}
