//! `--backend candle` end to end: `passkey` and `eval-ppl` on the embedded model give the
//! results of the fused kernels, the backend is recorded with them, and `bench
//! --compare-backends` times both in one run.

use serde_json::Value;
use std::path::Path;
use std::process::Output;

mod cli_support;
use cli_support::{assert_one_line_error, bin, fixture, run, stderr};

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "command failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// results.jsonl's rows sorted by `key`, without the timing fields.
fn rows(out: &Path, key: &[&str]) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let mut rows: Vec<Value> = text
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let map = v.as_object_mut().unwrap();
            map.retain(|k, _| !k.ends_with("_secs"));
            v
        })
        .collect();
    rows.sort_by_key(|v| key.iter().map(|k| v[*k].to_string()).collect::<Vec<_>>());
    rows
}

fn recorded_backend(out: &Path) -> String {
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let found = run
        .pointer("/model/backend")
        .or_else(|| run.get("backend"))
        .and_then(Value::as_str)
        .map(str::to_string);
    found.unwrap_or_else(|| panic!("no backend in run.json: {run}"))
}

#[test]
fn passkey_on_the_embedded_model_is_the_same_with_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let run_with = |backend: &str| {
        let out = dir.path().join(backend);
        ok(&run(&[
            "passkey",
            "--compare",
            "--lengths",
            "1k,4k",
            "--depths",
            "0,1",
            "--samples",
            "2",
            "--quiet",
            "--backend",
            backend,
            "--out",
            out.to_str().unwrap(),
        ]));
        out
    };
    let (kernels, candle) = (run_with("kernels"), run_with("candle"));
    assert_eq!(recorded_backend(&kernels), "cpu-simd");
    assert_eq!(recorded_backend(&candle), "candle-ops");
    let key = ["method", "length", "depth", "sample"];
    let (a, b) = (rows(&kernels, &key), rows(&candle, &key));
    assert_eq!(a.len(), 16);
    // Outputs, successes and DeciMamba's kept lengths are identical.
    assert_eq!(a, b);
    assert!(a.iter().any(|r| r["success"] == true) && a.iter().any(|r| r["success"] == false));
}

#[test]
fn eval_ppl_on_the_embedded_model_is_the_same_with_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture("text/austen-excerpt.txt");
    let args = |out: &Path, backend: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval-ppl",
            "--compare",
            "--data",
            &data,
            "--lengths",
            "1k,2k",
            "--windows",
            "2",
            "--pred-len",
            "50",
            "--quiet",
            "--out",
        ]
        .map(String::from)
        .to_vec();
        a.push(out.display().to_string());
        if !backend.is_empty() {
            a.extend(["--backend".to_string(), backend.to_string()]);
        }
        a
    };
    let run_with = |backend: &str| {
        let out = dir.path().join(backend);
        let a = args(&out, backend);
        ok(&run(&a.iter().map(String::as_str).collect::<Vec<_>>()));
        out
    };
    let (kernels, candle) = (run_with("kernels"), run_with("candle"));
    assert_eq!(recorded_backend(&candle), "candle-ops");
    let key = ["method", "length", "doc", "window"];
    let (a, b) = (rows(&kernels, &key), rows(&candle, &key));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        for field in [
            "method",
            "length",
            "window",
            "scored_tokens",
            "kept_per_layer",
        ] {
            assert_eq!(x[field], y[field], "{field}: {x} vs {y}");
        }
        let (p, q) = (
            x["mean_nll"].as_f64().unwrap(),
            y["mean_nll"].as_f64().unwrap(),
        );
        assert!((p - q).abs() < 1e-5, "mean NLL {p} vs {q}");
    }
    // A run folder refuses to resume under another backend (sums differ in the last bits).
    let a = args(&candle, "");
    let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !o.status.success(),
        "resumed a candle-ops run with the kernels"
    );
}

#[test]
fn bench_compares_the_backends_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let stdout = ok(&run(&[
        "bench",
        "--lengths",
        "256",
        "--decode",
        "4",
        "--compare-backends",
        "--json",
        json.to_str().unwrap(),
    ]));
    assert!(
        stdout.contains("candle-ops") && stdout.contains("than cpu-simd"),
        "{stdout}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["backend"], "cpu-simd");
    assert_eq!(report["peer_backend"], "candle-ops");
    assert!(report["prefill_peer"]["256"]["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["decode_peer"]["tok_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn backend_errors_are_one_line() {
    for (args, needle) in [
        (
            vec!["generate", "--backend", "gpu", "hi"],
            "unknown backend \"gpu\"",
        ),
        (
            vec!["generate", "--device", "metal", "--backend", "candle", "hi"],
            "without the `metal` feature",
        ),
    ] {
        assert_one_line_error(&run(&args), needle);
    }
    let o = bin()
        .env("DECIMAMBA_CANDLE_SCAN", "fast")
        .args(["generate", "--backend", "candle", "hi"])
        .output()
        .unwrap();
    assert_one_line_error(&o, "DECIMAMBA_CANDLE_SCAN=fast");
}

#[test]
fn generate_gives_the_same_text_with_both_backends() {
    let text = |backend: &str| {
        ok(&run(&[
            "generate",
            "The pass key is 12345. Remember it. The pass key is",
            "--max-new-tokens",
            "8",
            "--backend",
            backend,
        ]))
    };
    assert_eq!(text("kernels"), text("candle"));
}
