//! SQuAD v2 questions for the document-retrieval evaluation: the hub's parquet export of
//! `rajpurkar/squad_v2` (columns `id`, `title`, `context`, `question`,
//! `answers {text, answer_start}`) or the official JSON (`dev-v2.0.json`: `data[]`
//! articles → `paragraphs[]` → `qas[]`), read in the same row order.

use crate::eval::common::fnv1a64;
use crate::eval::data::{hub_dataset_files_in, HubDataset};
use anyhow::{bail, Context, Result};
use hf_hub::Cache;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One question row of the split.
#[derive(Debug, Clone, PartialEq)]
pub struct SquadQuestion {
    /// SQuAD's question id.
    pub id: String,
    /// The question text.
    pub question: String,
    /// Its paragraph, as an index into [`SquadSet::contexts`].
    pub context: usize,
    /// Whether it has at least one answer (SQuAD v2's unanswerable questions have none).
    pub answerable: bool,
}

/// A split: every question row in file order and the distinct paragraphs they ask about.
#[derive(Debug, Clone)]
pub struct SquadSet {
    /// Where it was read from (shown and recorded).
    pub source: String,
    /// The distinct paragraphs, in order of first appearance.
    pub contexts: Vec<String>,
    /// Every question row, in file order.
    pub questions: Vec<SquadQuestion>,
}

impl SquadSet {
    /// Builds the set from `(id, question, context, answerable)` rows, merging equal
    /// paragraphs (SQuAD asks several questions about each). Errors on no rows.
    pub fn from_rows(
        source: String,
        rows: impl IntoIterator<Item = (String, String, String, bool)>,
    ) -> Result<Self> {
        let mut contexts = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut questions = Vec::new();
        for (id, question, context, answerable) in rows {
            let next = contexts.len();
            let c = *index.entry(context.clone()).or_insert(next);
            if c == next {
                contexts.push(context);
            }
            questions.push(SquadQuestion {
                id,
                question,
                context: c,
                answerable,
            });
        }
        if questions.is_empty() {
            bail!("no data: {source} holds no SQuAD questions");
        }
        if !questions.iter().any(|q| q.answerable) {
            bail!("no data: {source} holds no answerable SQuAD question (every answers.text is empty)");
        }
        Ok(SquadSet {
            source,
            contexts,
            questions,
        })
    }

    /// Row indices of the answerable questions, in file order.
    pub fn answerable_rows(&self) -> Vec<usize> {
        (0..self.questions.len())
            .filter(|&i| self.questions[i].answerable)
            .collect()
    }

    /// An FNV-1a fingerprint of every row (id, question, paragraph, answerable), for
    /// `run.json`: a rerun on other data must not resume.
    pub fn fingerprint(&self) -> String {
        let mut bytes = Vec::new();
        for q in &self.questions {
            for part in [&q.id, &q.question, &self.contexts[q.context]] {
                bytes.extend_from_slice(part.as_bytes());
                bytes.push(0x1f);
            }
            bytes.push(u8::from(q.answerable));
        }
        format!("{:016x}", fnv1a64(&bytes))
    }
}

/// Reads a split from a `.parquet` file (the hub's layout) or a `.json` file (the official
/// `dev-v2.0.json` layout).
pub fn read_squad(path: &Path) -> Result<SquadSet> {
    if !path.is_file() {
        bail!("SQuAD data {} does not exist", path.display());
    }
    let lower = path.to_string_lossy().to_ascii_lowercase();
    if lower.ends_with(".parquet") {
        read_squad_parquet(path)
    } else if lower.ends_with(".json") {
        read_squad_json(path)
    } else {
        bail!(
            "{} is neither .parquet (rajpurkar/squad_v2's layout) nor .json (SQuAD's dev-v2.0.json layout)",
            path.display()
        )
    }
}

/// The string of column `name` of a parquet row (error naming the row otherwise).
fn row_string<'r>(
    row: &'r parquet::record::Row,
    name: &str,
    at: &dyn Fn() -> String,
) -> Result<&'r str> {
    use parquet::record::Field;
    match row.get_column_iter().find(|(n, _)| n.as_str() == name) {
        Some((_, Field::Str(s))) => Ok(s.as_str()),
        Some((_, other)) => bail!("{}: column \"{name}\" is not a string ({other})", at()),
        None => bail!("{}: no column \"{name}\"", at()),
    }
}

/// How many answer texts a row's `answers` struct holds (`answers.text`, a list).
fn answer_count(row: &parquet::record::Row, at: &dyn Fn() -> String) -> Result<usize> {
    use parquet::record::Field;
    let Some((_, answers)) = row.get_column_iter().find(|(n, _)| n.as_str() == "answers") else {
        bail!("{}: no column \"answers\"", at());
    };
    let Field::Group(answers) = answers else {
        bail!(
            "{}: column \"answers\" is not a struct {{text, answer_start}} ({answers})",
            at()
        );
    };
    match answers
        .get_column_iter()
        .find(|(n, _)| n.as_str() == "text")
    {
        Some((_, Field::ListInternal(list))) => Ok(list.elements().len()),
        Some((_, Field::Null)) => Ok(0),
        _ => bail!("{}: column \"answers\" has no list \"text\"", at()),
    }
}

fn read_squad_parquet(path: &Path) -> Result<SquadSet> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let shown = path.display().to_string();
    let pq_err = |e: parquet::errors::ParquetError| {
        let msg = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        anyhow::anyhow!("{shown} is not a readable parquet file: {msg}")
    };
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {shown}"))?;
    let reader = SerializedFileReader::new(file).map_err(pq_err)?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let top: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    if let Some(missing) = ["id", "context", "question", "answers"]
        .into_iter()
        .find(|c| !top.iter().any(|t| t == c))
    {
        bail!(
            "{shown}: no column \"{missing}\" (columns: {}); a SQuAD v2 parquet has id, title, context, question, answers",
            top.join(", ")
        );
    }
    let mut rows = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.map_err(pq_err)?;
        let at = || format!("{shown}:{}", i + 1);
        rows.push((
            row_string(&row, "id", &at)?.to_string(),
            row_string(&row, "question", &at)?.to_string(),
            row_string(&row, "context", &at)?.to_string(),
            answer_count(&row, &at)? > 0,
        ));
    }
    SquadSet::from_rows(shown, rows)
}

fn read_squad_json(path: &Path) -> Result<SquadSet> {
    use serde_json::Value;
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {shown}"))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{shown} is not valid JSON: {e}"))?;
    let layout = || {
        anyhow::anyhow!(
            "{shown} is not in SQuAD's layout ({{\"data\": [{{\"paragraphs\": [{{\"context\", \"qas\": [{{\"id\", \"question\", \"answers\"}}]}}]}}]}})"
        )
    };
    let articles = v.get("data").and_then(Value::as_array).ok_or_else(layout)?;
    let mut rows = Vec::new();
    for article in articles {
        let paragraphs = article
            .get("paragraphs")
            .and_then(Value::as_array)
            .ok_or_else(layout)?;
        for p in paragraphs {
            let context = p
                .get("context")
                .and_then(Value::as_str)
                .ok_or_else(layout)?;
            for qa in p.get("qas").and_then(Value::as_array).ok_or_else(layout)? {
                let get = |k: &str| qa.get(k).and_then(Value::as_str).ok_or_else(layout);
                let answers = qa
                    .get("answers")
                    .and_then(Value::as_array)
                    .ok_or_else(layout)?;
                // The hub's export takes `answers` as it is: an unanswerable question
                // (is_impossible) has none there (its plausible_answers are dropped).
                rows.push((
                    get("id")?.to_string(),
                    get("question")?.to_string(),
                    context.to_string(),
                    !answers.is_empty(),
                ));
            }
        }
    }
    SquadSet::from_rows(shown, rows)
}

/// Where the SQuAD v2 validation split is on the hub.
pub const SQUAD_SOURCES: [(&str, &str); 1] = [("rajpurkar/squad_v2", "main")];

const SQUAD_HINT: &str = "pass --data FILE with the validation split as .parquet (rajpurkar/squad_v2's columns) or SQuAD's dev-v2.0.json";

/// The validation-split parquet files of a listing (`squad_v2/validation-00000-of-00001.parquet`).
pub fn pick_validation_parquet(names: &[String]) -> Vec<String> {
    let mut v: Vec<String> = names
        .iter()
        .filter(|n| n.to_ascii_lowercase().ends_with(".parquet"))
        .filter(|n| {
            n.to_ascii_lowercase()
                .split(['/', '-', '_', '.'])
                .any(|p| p == "validation")
        })
        .cloned()
        .collect();
    v.sort();
    v
}

fn describe_squad_layout(names: &[String]) -> String {
    if names.is_empty() {
        "no files".to_string()
    } else {
        format!(
            "no validation-split .parquet file among {} files",
            names.len()
        )
    }
}

/// The validation split of `rajpurkar/squad_v2`, from the hub (listed, then downloaded into
/// `cache`) or, offline or when the hub is unreachable, from the cached snapshot.
pub fn squad_validation_files_in(cache: &Cache, offline: bool) -> Result<Vec<PathBuf>> {
    hub_dataset_files_in(
        cache,
        offline,
        &HubDataset {
            what: "SQuAD v2 validation split",
            sources: &SQUAD_SOURCES,
            wanted: "validation-split .parquet files",
            pick: &pick_validation_parquet,
            describe: &describe_squad_layout,
            hint: SQUAD_HINT,
        },
    )
}

/// [`squad_validation_files_in`] with the hub cache and `HF_HUB_OFFLINE` of the environment,
/// read into one set (the split's files in order).
pub fn squad_validation() -> Result<SquadSet> {
    let files = squad_validation_files_in(
        &crate::hub::cache_from_env(),
        crate::hub::offline_from_env(),
    )?;
    read_squad_files(&files)
}

/// The question rows of several parquet files of one split, in file order.
pub fn read_squad_files(files: &[PathBuf]) -> Result<SquadSet> {
    let mut rows = Vec::new();
    for f in files {
        let set = read_squad(f)?;
        rows.extend(set.questions.into_iter().map(|q| {
            (
                q.id,
                q.question,
                set.contexts[q.context].clone(),
                q.answerable,
            )
        }));
    }
    let source = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    SquadSet::from_rows(source, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_files_are_picked() {
        let names: Vec<String> = [
            "README.md",
            "squad_v2/train-00000-of-00001.parquet",
            "squad_v2/validation-00000-of-00001.parquet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            pick_validation_parquet(&names),
            vec!["squad_v2/validation-00000-of-00001.parquet"]
        );
        assert!(pick_validation_parquet(&names[..2]).is_empty());
        assert!(describe_squad_layout(&names[..2]).contains("among 2 files"));
    }

    #[test]
    fn rows_share_paragraphs_and_need_an_answerable_question() {
        let row = |id: &str, c: &str, a: bool| (id.into(), format!("q{id}"), c.into(), a);
        let set = SquadSet::from_rows(
            "x".into(),
            vec![
                row("1", "A", true),
                row("2", "B", false),
                row("3", "A", true),
            ],
        )
        .unwrap();
        assert_eq!(set.contexts, vec!["A", "B"]);
        assert_eq!(set.questions[2].context, 0);
        assert_eq!(set.answerable_rows(), vec![0, 2]);
        let e = SquadSet::from_rows("x".into(), vec![row("1", "A", false)]).unwrap_err();
        assert!(e.to_string().contains("no answerable"), "{e}");
        let e = SquadSet::from_rows("x".into(), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("no data"), "{e}");
    }
}
