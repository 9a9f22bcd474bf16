//! The document-retrieval prompts against the independent Python reference
//! (scripts/doc_retrieval_reference.py on the SQuAD fixture written by
//! scripts/make_squad_fixture.py): the question choice, the golden position, the noise
//! paragraphs, the ids, the prompt text and the label, for three seeds and three document
//! counts; the two data layouts (parquet, dev-v2.0.json) read to the same set; and the
//! scoring of a run, with a fake model that always answers the first document's id.

use anyhow::{bail, Result};
use decimamba::eval::doc_retrieval::{
    build_prompt, read_squad, run_doc_retrieval, select_questions, DocRetrievalJob,
    DocRetrievalSettings, SquadSet,
};
use decimamba::eval::{EvalModel, GreedyOutput, Method, RunOptions, TailScore};
use decimamba::policy::Policy;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn parquet_set() -> SquadSet {
    read_squad(&fixture("squad/validation-00000-of-00001.parquet")).unwrap()
}

#[test]
fn prompts_equal_the_python_reference() {
    let set = parquet_set();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("reference/doc_retrieval/prompts.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(reference["paragraphs"], set.contexts.len());
    assert_eq!(reference["rows"], set.questions.len());
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let count = case["questions"].as_u64().unwrap() as usize;
        let rows: Vec<usize> = serde_json::from_value(case["question_rows"].clone()).unwrap();
        assert_eq!(
            select_questions(&set, count, seed).unwrap(),
            rows,
            "seed {seed}"
        );
        for p in case["prompts"].as_array().unwrap() {
            let row = p["row"].as_u64().unwrap() as usize;
            let n = p["num_docs"].as_u64().unwrap() as usize;
            let got = build_prompt(&set, row, n, seed).unwrap();
            let at = format!("seed {seed}, row {row}, N {n}");
            assert_eq!(
                got.golden_position as u64,
                p["golden_position"].as_u64().unwrap(),
                "{at}"
            );
            let docs: Vec<usize> = serde_json::from_value(p["documents"].clone()).unwrap();
            assert_eq!(got.documents, docs, "{at}");
            let ids: Vec<u32> = serde_json::from_value(p["doc_ids"].clone()).unwrap();
            assert_eq!(got.doc_ids, ids, "{at}");
            assert_eq!(got.text, p["text"].as_str().unwrap(), "{at}");
            assert_eq!(got.label(), p["label"].as_str().unwrap(), "{at}");
            checked += 1;
        }
    }
    assert_eq!(checked, 63);
}

/// The format itself, independent of the random draws: each of the N + 1 documents is
/// ` <|Query|> {question} <|Document {id}|> {paragraph}`, the golden paragraph among them
/// under the label's id, and the prompt ends with ` <|Answer|> <|Document `.
#[test]
fn prompt_structure_is_the_authors() {
    let set = parquet_set();
    for row in set.answerable_rows() {
        let p = build_prompt(&set, row, 8, 3).unwrap();
        let q = &set.questions[row];
        let body = p.text.strip_suffix(" <|Answer|> <|Document ").unwrap();
        let lead = format!(" <|Query|> {} <|Document ", q.question);
        let docs: Vec<&str> = body.split(&lead).skip(1).collect();
        assert_eq!(docs.len(), 9, "{}", p.text);
        assert!(body.starts_with(&lead));
        let mut golden_seen = 0;
        for (doc, &id) in docs.iter().zip(&p.doc_ids) {
            let (id_text, paragraph) = doc.split_once("|> ").unwrap();
            assert_eq!(id_text, id.to_string());
            assert!(set.contexts.iter().any(|c| c == paragraph), "{paragraph}");
            if paragraph == set.contexts[q.context] {
                golden_seen += 1;
                assert_eq!(p.label(), format!("{id_text}|>"));
            }
        }
        assert_eq!(golden_seen, 1, "the golden paragraph appears once");
    }
}

#[test]
fn json_and_parquet_layouts_read_the_same_rows() {
    let a = parquet_set();
    let b = read_squad(&fixture("squad/dev-v2.0.json")).unwrap();
    assert_eq!(a.contexts, b.contexts);
    assert_eq!(a.questions, b.questions);
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.questions.len(), 18);
    assert_eq!(a.answerable_rows().len(), 14);
    assert_eq!(a.contexts.len(), 9);
}

/// A byte-level fake that answers the id of the prompt's first document, as `{id}|>`.
struct FirstDocument;

impl EvalModel for FirstDocument {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned())
    }
    fn generate_greedy(&self, prompt: &[u32], max_new: usize, _: &Policy) -> Result<GreedyOutput> {
        let text = self.decode(prompt)?;
        let lead = "<|Document ";
        let start = text.find(lead).unwrap() + lead.len();
        let id: String = text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let answer: String = format!("{id}|> <|Query").chars().take(max_new).collect();
        Ok(GreedyOutput {
            tokens: self.encode(&answer)?,
            text: answer,
            prefill_secs: 0.0,
            kept_per_layer: vec![],
        })
    }
    fn score_tail(&self, _: &[u32], _: usize, _: &Policy) -> Result<TailScore> {
        bail!("not a perplexity model")
    }
    fn name(&self) -> String {
        "first-document".into()
    }
}

/// A hit exactly when the golden document comes first: the report counts those.
#[test]
fn a_run_scores_exact_matches() {
    let set = parquet_set();
    let dir = tempfile::tempdir().unwrap();
    let settings = DocRetrievalSettings {
        num_docs: vec![1, 3, 8],
        questions: 14,
        seed: 5,
        max_new_tokens: 10,
    };
    let options = RunOptions {
        quiet: true,
        stop: None,
        batch_size: 1,
        shard: None,
    };
    let report = run_doc_retrieval(&DocRetrievalJob {
        model: &FirstDocument,
        extra_workers: &[],
        set: &set,
        settings: &settings,
        methods: &[Method::vanilla()],
        out_dir: dir.path(),
        options: &options,
    })
    .unwrap();
    assert!(report.complete);
    assert_eq!(report.samples.len(), 3 * 14);
    let mut hits = 0;
    for (n, &docs) in settings.num_docs.iter().enumerate() {
        let first: Vec<_> = report
            .samples
            .iter()
            .filter(|r| r.num_docs == docs)
            .collect();
        let want = first.iter().filter(|r| r.golden_position == 0).count();
        assert_eq!(report.cells[0][n].correct, want, "N = {docs}");
        assert_eq!(report.cells[0][n].samples, 14);
        for r in &first {
            assert_eq!(r.success, r.golden_position == 0, "{r:?}");
            assert!(r.answer.is_some());
        }
        hits += want;
    }
    assert!(
        hits > 0 && hits < 3 * 14,
        "{hits} hits: the check needs both outcomes"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["methods"][0]["correct"], hits);
}
