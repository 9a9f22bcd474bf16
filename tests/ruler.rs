//! RULER's prompts and scoring against RULER's own code: the prompts NVIDIA/RULER's
//! generator scripts wrote for a fixed seed (scripts/ruler_reference.py) and the scores its
//! evaluation functions gave (scripts/ruler_scoring_reference.py), both committed.

use decimamba::eval::ruler::generate::generate;
use decimamba::eval::ruler::{postprocess_prediction, string_match_all, string_match_part};
use decimamba::eval::ruler::{task_score, RulerTask};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use tokenizers::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures/reference/ruler").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn tokenizer(path: &str) -> Tokenizer {
    let full = root().join(path);
    if path.ends_with(".gz") {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&full).unwrap())
            .read_to_end(&mut json)
            .unwrap();
        Tokenizer::from_bytes(json).unwrap()
    } else {
        Tokenizer::from_file(full).unwrap()
    }
}

#[test]
fn prompts_equal_rulers_own_generator_byte_for_byte() {
    let golden = fixture("golden.json");
    let seed = golden["seed"].as_u64().unwrap();
    let mut tasks_seen = std::collections::BTreeSet::new();
    for case in golden["cases"].as_array().unwrap() {
        let task: RulerTask = case["task"].as_str().unwrap().parse().unwrap();
        let length = case["length"].as_u64().unwrap() as usize;
        let expected = case["samples"].as_array().unwrap();
        let tok = tokenizer(case["tokenizer"].as_str().unwrap());
        let count = |text: &str| -> anyhow::Result<usize> {
            Ok(tok
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .len())
        };
        let samples = generate(task, length, expected.len(), seed, &count).unwrap();
        assert_eq!(samples.len(), expected.len());
        for (got, want) in samples.iter().zip(expected) {
            let at = format!("{task} at {length}, sample {}", got.index);
            assert_eq!(got.input, want["input"].as_str().unwrap(), "input of {at}");
            assert_eq!(
                got.answer_prefix,
                want["answer_prefix"].as_str().unwrap(),
                "answer prefix of {at}"
            );
            let outputs: Vec<String> = want["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            assert_eq!(got.outputs, outputs, "answers of {at}");
            assert_eq!(
                got.length as u64,
                want["length"].as_u64().unwrap(),
                "length of {at}"
            );
        }
        tasks_seen.insert(task);
    }
    assert_eq!(tasks_seen.len(), 6, "every task has a golden case");
}

#[test]
fn scores_equal_rulers_scoring() {
    let v = fixture("scoring.json");
    let mut preds = Vec::new();
    let mut all = Vec::new();
    let mut part = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let pred = case["prediction"].as_str().unwrap();
        let refs: Vec<String> = case["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let post = postprocess_prediction(pred);
        assert_eq!(post, case["postprocessed"].as_str().unwrap(), "{pred:?}");
        let a = string_match_all(&post, &refs);
        let p = string_match_part(&post, &refs);
        assert_eq!(
            task_score(&[a]),
            case["string_match_all"].as_f64().unwrap(),
            "{pred:?}"
        );
        assert_eq!(
            task_score(&[p]),
            case["string_match_part"].as_f64().unwrap(),
            "{pred:?}"
        );
        assert_eq!(RulerTask::Vt.score(pred, &refs), a);
        preds.push(post);
        all.push(a);
        part.push(p);
    }
    assert_eq!(
        task_score(&all),
        v["task_string_match_all"].as_f64().unwrap()
    );
    assert_eq!(
        task_score(&part),
        v["task_string_match_part"].as_f64().unwrap()
    );
}
