//! The LongBench metrics, scoring and aggregation of `decimamba::eval::longbench`
//! against the independent Python reference `scripts/longbench_reference.py` (which
//! calls the official `rouge` and `fuzzywuzzy`); fixture
//! tests/fixtures/reference/longbench/metrics.json.

use decimamba::eval::longbench::{
    classification_score, code_sim_score, code_sim_score_with, count_score, fuzz_ratio, mean_score,
    mean_score_e, normalize_answer, numpy_mean, py_round, qa_f1_score, retrieval_score,
    retrieval_zh_score, rouge_score, score_dataset, score_dataset_e, score_prediction,
    truncate_middle, BucketScores, FuzzBackend, Sample, ROUGE_MAX_TRACEBACK_STEPS,
};
use serde_json::Value;

const TOL: f64 = 1e-9;

fn fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/longbench/metrics.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn cases<'a>(fx: &'a Value, key: &str) -> &'a [Value] {
    let v = fx[key]
        .as_array()
        .unwrap_or_else(|| panic!("fixture has no {key}"));
    assert!(!v.is_empty(), "{key}: no cases");
    v
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn opt(v: &Value) -> Option<f64> {
    if v.is_null() {
        None
    } else {
        Some(v.as_f64().unwrap())
    }
}

/// Checks every case of `key` with `metric(case)` against the case's `score`.
fn check(fx: &Value, key: &str, metric: impl Fn(&Value) -> f64) {
    let mut bad = Vec::new();
    let all = cases(fx, key);
    for c in all {
        let (got, want) = (metric(c), f(c, "score"));
        if (got - want).abs() > TOL {
            bad.push(format!("{c}: got {got}, want {want}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{key}: {} of {} differ:\n{}",
        bad.len(),
        all.len(),
        bad.join("\n")
    );
}

#[test]
fn normalize_answer_matches() {
    let fx = fixture();
    for c in cases(&fx, "normalize") {
        assert_eq!(normalize_answer(s(c, "s")), s(c, "out"), "{c}");
    }
}

#[test]
fn qa_f1_matches() {
    check(&fixture(), "qa_f1", |c| {
        qa_f1_score(s(c, "pred"), s(c, "gt"))
    });
}

#[test]
fn rouge_l_matches() {
    check(&fixture(), "rouge", |c| {
        rouge_score(s(c, "pred"), s(c, "gt"))
    });
}

#[test]
fn rouge_l_python_recursion_limit_matches() {
    let fx = fixture();
    let long = &fx["rouge_long"];
    assert_eq!(
        long["max_traceback_steps"].as_u64().unwrap() as usize,
        ROUGE_MAX_TRACEBACK_STEPS
    );
    check(long, "cases", |c| {
        let n = c["n"].as_u64().unwrap() as usize;
        let words = (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        match s(c, "kind") {
            "hyp_long" => rouge_score("w0", &words),
            "ref_long" => rouge_score(&words, "w0"),
            k => panic!("kind {k}"),
        }
    });
}

#[test]
fn classification_matches() {
    check(&fixture(), "classification", |c| {
        classification_score(s(c, "pred"), s(c, "gt"), &strings(c, "all_classes"))
    });
}

#[test]
fn retrieval_and_count_match() {
    let fx = fixture();
    check(&fx, "retrieval", |c| {
        retrieval_score(s(c, "pred"), s(c, "gt"))
    });
    check(&fx, "retrieval_zh", |c| {
        retrieval_zh_score(s(c, "pred"), s(c, "gt"))
    });
    check(&fx, "count", |c| count_score(s(c, "pred"), s(c, "gt")));
}

#[test]
fn fuzz_ratio_matches_both_backends() {
    let fx = fixture();
    for c in cases(&fx, "fuzz_ratio") {
        for (backend, key) in [
            (FuzzBackend::Levenshtein, "levenshtein"),
            (FuzzBackend::Difflib, "difflib"),
        ] {
            let want = c[key].as_u64().unwrap() as u32;
            assert_eq!(
                fuzz_ratio(s(c, "s1"), s(c, "s2"), backend),
                want,
                "{key}: {c}"
            );
        }
    }
}

#[test]
fn code_sim_matches_both_backends() {
    let fx = fixture();
    for c in cases(&fx, "code_sim") {
        let (p, g) = (s(c, "pred"), s(c, "gt"));
        assert_eq!(code_sim_score(p, g), f(c, "levenshtein"), "{c}");
        assert_eq!(
            code_sim_score_with(p, g, FuzzBackend::Levenshtein),
            f(c, "levenshtein"),
            "{c}"
        );
        assert_eq!(
            code_sim_score_with(p, g, FuzzBackend::Difflib),
            f(c, "difflib"),
            "{c}"
        );
    }
}

#[test]
fn score_prediction_matches() {
    check(&fixture(), "score_prediction", |c| {
        score_prediction(
            s(c, "dataset"),
            s(c, "pred"),
            &strings(c, "answers"),
            &strings(c, "all_classes"),
        )
        .unwrap()
    });
}

#[test]
fn dataset_aggregates_match() {
    let fx = fixture();
    for a in cases(&fx, "aggregate") {
        let dataset = s(a, "dataset");
        let classes = strings(a, "all_classes");
        let recs: Vec<(String, Vec<String>, usize)> = a["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    s(x, "pred").to_string(),
                    strings(x, "answers"),
                    x["length"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let samples: Vec<Sample> = recs
            .iter()
            .map(|(p, ans, len)| Sample {
                prediction: p,
                answers: ans,
                length: *len,
            })
            .collect();
        let got = score_dataset(dataset, &samples, &classes, FuzzBackend::Levenshtein).unwrap();
        assert_eq!(got, Some(f(a, "score")), "{dataset}");
        let e = &a["score_e"];
        let want = BucketScores {
            upto_4k: opt(&e["0-4k"]),
            from_4k_to_8k: opt(&e["4-8k"]),
            over_8k: opt(&e["8k+"]),
        };
        let got = score_dataset_e(
            &format!("{dataset}_e"),
            &samples,
            &classes,
            FuzzBackend::Levenshtein,
        )
        .unwrap();
        assert_eq!(got, want, "{dataset}_e");
    }
}

#[test]
fn means_and_rounding_match() {
    let fx = fixture();
    for m in cases(&fx, "means") {
        let xs: Vec<f64> = m["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(
            mean_score(&xs),
            Some(f(m, "scorer")),
            "scorer n={}",
            xs.len()
        );
        assert_eq!(
            mean_score_e(&xs),
            opt(&m["scorer_e"]),
            "scorer_e n={}",
            xs.len()
        );
        // The unrounded values, bit for bit: the summation order is numpy's.
        assert_eq!(
            numpy_mean(&xs).to_bits(),
            f(m, "np_mean").to_bits(),
            "np.mean n={}",
            xs.len()
        );
        let total: f64 = xs.iter().fold(0.0, |t, x| t + x);
        assert_eq!(
            (100.0 * total / xs.len() as f64).to_bits(),
            f(m, "scorer_raw").to_bits()
        );
    }
    for r in cases(&fx, "round2") {
        assert_eq!(py_round(f(r, "x"), 2), f(r, "out"), "{r}");
    }
}

#[test]
fn truncation_matches() {
    let fx = fixture();
    for t in cases(&fx, "truncate") {
        let n = t["len"].as_u64().unwrap() as u32;
        let ids: Vec<u32> = (100..100 + n).collect();
        let want: Vec<u32> = t["out"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            truncate_middle(&ids, t["max_len"].as_u64().unwrap() as usize),
            want,
            "{t}"
        );
    }
}
