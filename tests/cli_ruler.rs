//! `decimamba ruler` end to end on the embedded model: methods side by side, resume, batches
//! and shards, and its one-line errors.

mod cli_support;
use cli_support::{assert_one_line_error, run, stderr};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn ruler(out: &Path, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let mut args = vec![
        "ruler",
        "--tasks",
        "niah_single_1,vt",
        "--lengths",
        "2k",
        // The byte-level tokenizer needs ~840 tokens for vt's example (RULER budgets 500).
        "--vt-example-tokens",
        "900",
        "--samples",
        "2",
        "--methods",
        "vanilla,model",
        "--quiet",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Per-sample results without timings.
fn outputs(dir: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&read(&dir.join("results.json"))).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.as_object_mut().unwrap().remove("prefill_secs");
            r
        })
        .collect()
}

#[test]
fn ruler_runs_methods_side_by_side_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ruler");
    let stdout = ok(&ruler(&out, &[]));
    assert!(stdout.contains("vanilla / niah_single_1"), "{stdout}");
    assert!(stdout.contains("decimamba / average"), "{stdout}");
    let records = outputs(&out);
    assert_eq!(records.len(), 2 * 2 * 2, "2 tasks × 2 samples × 2 methods");
    let tasks: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| r["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["niah_single_1", "vt"].into_iter().collect());
    for r in &records {
        let prompt = r["prompt_tokens"].as_u64().unwrap();
        let budget = if r["task"] == "vt" {
            2048 - 30
        } else {
            2048 - 128
        };
        // RULER fills the length up to its tokens to generate, within one haystack step
        // (five noise sentences of ~90 bytes below 4K).
        assert!(prompt <= budget && prompt > budget - 500, "{r}");
        let score = r["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        if r["method"] == "decimamba" {
            assert!(!r["kept_per_layer"].as_array().unwrap().is_empty(), "{r}");
        }
    }
    // Methods read identical prompts: the same references per task and sample.
    for pair in records.chunks(2) {
        assert_eq!(pair[0]["references"], pair[1]["references"]);
        assert_ne!(pair[0]["method"], pair[1]["method"]);
    }
    let summary: Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["eval"], "ruler");
    assert_eq!(summary["methods"].as_array().unwrap().len(), 2);
    assert!(out.join("heatmap.png").exists());

    // Interrupted: keep three finished samples; the rerun redoes only the rest.
    let jsonl = read(&out.join("results.jsonl"));
    let kept: Vec<&str> = jsonl.lines().take(3).collect();
    std::fs::write(out.join("results.jsonl"), kept.join("\n") + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    ok(&ruler(&out, &[]));
    let again = read(&out.join("results.jsonl"));
    assert_eq!(again.lines().count(), 8);
    assert_eq!(again.lines().take(3).collect::<Vec<_>>(), kept);
    assert_eq!(
        outputs(&out),
        records,
        "a resumed run gives the same results"
    );
}

#[test]
fn ruler_batches_and_shards_equal_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    ok(&ruler(&whole, &[]));
    let batched = dir.path().join("batched");
    ok(&ruler(&batched, &["--batch-size", "4"]));
    assert_eq!(outputs(&whole), outputs(&batched));
    let mut shards = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("shard{i}"));
        ok(&ruler(&d, &["--shard", &format!("{i}/3")]));
        assert!(!d.join("summary.json").exists());
        shards.push(d.display().to_string());
    }
    let merged = dir.path().join("merged");
    let mut args = vec!["merge".to_string()];
    args.extend(shards);
    args.extend(["--out".into(), merged.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&run(&args));
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&merged.join("summary.json"))
    );
    assert_eq!(outputs(&whole), outputs(&merged));
}

#[test]
fn ruler_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x").display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["--tasks", "niah_nope"], "unknown RULER task 'niah_nope'"),
        (&["--tasks", "qa_1"], "not included"),
        (
            &["--tasks", "niah_single_1", "--lengths", "200"],
            "too short for RULER's niah_single_1",
        ),
        (
            &["--samples", "0", "--lengths", "1k"],
            "--samples must be at least 1",
        ),
        (
            &["--tasks", "vt", "--lengths", "2k"],
            "vt's in-context example does not fit 500 tokens",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["ruler", "--quiet", "--out", &out];
        args.extend_from_slice(extra);
        assert_one_line_error(&run(&args), needle);
    }
}
