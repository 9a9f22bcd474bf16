//! End-to-end runs of `passkey` and `eval-ppl` through the binary: the embedded model and
//! the fixture checkpoints, output files, resumption, and errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
        .display()
        .to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_decimamba"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUST_BACKTRACE")
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "command failed: {err}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    (img.width(), img.height())
}

fn read_json(path: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The main job on the embedded model, on a small grid: DeciMamba (the shipped preset)
/// retrieves the key at 4× the training length where vanilla Mamba does not.
#[test]
fn passkey_compare_on_the_embedded_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pk");
    let stdout = ok(&run(&[
        "passkey",
        "--compare",
        "--lengths",
        "1k,4k",
        "--depths",
        "0,1",
        "--samples",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        stdout.contains("vanilla") && stdout.contains("decimamba"),
        "{stdout}"
    );
    let summary = read_json(out.join("summary.json"));
    let methods = summary["methods"].as_array().unwrap();
    let grid = |m: usize| methods[m]["grid"].clone();
    // grid[depth][length]: depth 0 at 4K is 3K tokens from the question.
    assert_eq!(
        grid(0)[0][1],
        0.0,
        "vanilla should lose a needle 3K tokens back: {summary}"
    );
    assert_eq!(grid(1)[0][1], 1.0, "DeciMamba should find it: {summary}");
    assert_eq!(grid(1)[1][1], 1.0);
    assert_eq!(methods[1]["decimation"]["decimating_layers"][0], 0);
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2 * 2 * 2 * 2);
    let first: serde_json::Value = serde_json::from_str(lines.lines().nth(1).unwrap()).unwrap();
    assert_eq!(first["kept_per_layer"][0], 513, "512 kept + the last token");
    let (w, h) = png_size(&out.join("heatmap.png"));
    assert!(w > h && h > 200, "{w}x{h}");
}

#[test]
fn passkey_on_a_fixture_checkpoint_with_a_template_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("t.json");
    std::fs::write(
        &template,
        r#"{"name": "tiny", "prefix": "find the key.\n", "needle": "the key is {key}. ", "suffix": "\nkey:", "key_min": 100, "key_max": 999}"#,
    )
    .unwrap();
    let out = dir.path().join("pk");
    let args = [
        "passkey",
        "--model",
        &fixture("models/tiny-dtrank-orig"),
        "--tokenizer",
        &fixture("tokenizers/char54.json"),
        "--template",
        template.to_str().unwrap(),
        "--haystack",
        &fixture("text/wiki-excerpt.txt"),
        "--lengths",
        "200,300",
        "--depths",
        "0.5",
        "--deci-layers",
        "1",
        "--deci-lbase",
        "50",
        "--deci-min-len",
        "5",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    ok(&run(&args));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["method"], "decimamba");
        assert_eq!(r["kept_per_layer"][0], 51);
    }
    // A rerun of a finished grid resumes, does nothing, and keeps the results.
    ok(&run(&args));
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // Different settings in the same folder are refused.
    let mut changed = args.to_vec();
    changed.splice(1..1, ["--seed", "5"]);
    let o = run(&changed);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // (The fixture's padded embedding draws a warning line first.)
    let error = err
        .lines()
        .find(|l| !l.starts_with("warning:"))
        .unwrap_or("");
    assert!(
        error.starts_with("error:") && error.contains("seed"),
        "{err}"
    );
}

#[test]
fn eval_ppl_compare_on_the_embedded_model_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ppl");
    let args = [
        "eval-ppl",
        "--compare",
        "--data",
        &fixture("text/austen-excerpt.txt"),
        "--lengths",
        "1k,2k",
        "--windows",
        "2",
        "--pred-len",
        "50",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    let stdout = ok(&run(&args));
    assert!(
        stdout.contains("vanilla") && stdout.contains("decimamba"),
        "{stdout}"
    );
    let jsonl = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(
        jsonl.lines().count(),
        2 * 2 * 2,
        "2 methods × 2 lengths × 2 windows"
    );
    for line in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["scored_tokens"], 50);
        let nll = v["mean_nll"].as_f64().unwrap();
        assert!(nll > 0.0 && nll < 10.0, "{v}");
        if v["method"] == "decimamba" {
            // L_base 512 of the shipped preset, plus the 51 protected tokens.
            assert_eq!(v["kept_per_layer"][0], 512 + 51, "{v}");
        }
    }
    let (w, h) = png_size(&out.join("perplexity.png"));
    assert!(w > 0 && h > 0);
    // Simulate an interruption: keep only the first three finished windows, drop the rest.
    let kept: Vec<&str> = jsonl.lines().take(3).collect();
    std::fs::write(out.join("results.jsonl"), kept.join("\n") + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).ok();
    ok(&run(&args));
    let again = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(again.lines().count(), 8);
    assert_eq!(
        again.lines().take(3).collect::<Vec<_>>(),
        kept,
        "finished windows are not redone"
    );
    assert!(out.join("summary.json").exists());
}

#[test]
fn eval_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "eval-ppl".into(),
                "--data".into(),
                fixture("text/latin1.txt"),
                "--lengths".into(),
                "1k".into(),
            ],
            "UTF-8",
        ),
        (
            vec![
                "eval-ppl".into(),
                "--data".into(),
                "/nonexistent.txt".into(),
            ],
            "nonexistent",
        ),
        (
            vec!["passkey".into(), "--lengths".into(), "10".into()],
            "shorter than the template",
        ),
        (
            vec!["passkey".into(), "--template".into(), "nope".into()],
            "nope",
        ),
        (
            vec!["passkey".into(), "--lengths".into(), "1q".into()],
            "1q",
        ),
    ];
    for (args, needle) in cases {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = dir.path().join(format!("o{}", a.len()));
        a.extend(["--quiet", "--out", out.to_str().unwrap()]);
        let o = run(&a);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{a:?} should fail");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{a:?}: {err}");
        assert!(err.contains(needle), "{a:?}: {err}");
    }
}

/// `--batch-size` scores windows of one length and method together; every window's NLL
/// equals the one-at-a-time run's (f32), for vanilla and DeciMamba.
#[test]
fn eval_ppl_batches_equal_batch_one() {
    let dir = tempfile::tempdir().unwrap();
    let run_with = |batch: &str| {
        let out = dir.path().join(format!("b{batch}"));
        ok(&run(&[
            "eval-ppl",
            "--compare",
            "--data",
            &fixture("text/austen-excerpt.txt"),
            "--lengths",
            "1k,2k",
            "--windows",
            "3",
            "--pred-len",
            "50",
            "--batch-size",
            batch,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]));
        let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
        let mut rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        rows.sort_by_key(|v| {
            (
                v["method"].as_str().unwrap().to_string(),
                v["length"].as_u64(),
                v["doc"].as_u64(),
                v["window"].as_u64(),
            )
        });
        rows
    };
    let one = run_with("1");
    let three = run_with("3");
    assert_eq!(one.len(), 2 * 2 * 3);
    assert_eq!(one.len(), three.len());
    for (a, b) in one.iter().zip(&three) {
        assert_eq!(
            (&a["method"], &a["length"], &a["window"]),
            (&b["method"], &b["length"], &b["window"])
        );
        let (x, y) = (
            a["mean_nll"].as_f64().unwrap(),
            b["mean_nll"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-5, "{a} vs {b}");
        assert_eq!(a["kept_per_layer"], b["kept_per_layer"]);
    }
    let o = run(&[
        "eval-ppl",
        "--data",
        &fixture("text/austen-excerpt.txt"),
        "--batch-size",
        "0",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--batch-size"));
}
