//! Sweeps through the binary on the embedded model: batches equal batch 1 under every
//! policy, shards merged equal the unsharded run byte for byte, a pool of CPU workers
//! equals one, `generate --prompts` equals one prompt at a time, and the one-line errors of
//! bad shards, bad merges and bad device lists.

mod cli_support;
use cli_support::{assert_one_line_error, fixture, run, stderr};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "command failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap()
}

/// MambaExtend and Modulation policies for the embedded model's six layers.
fn policy_files(dir: &Path) -> (String, String) {
    let extend = dir.join("extend.json");
    std::fs::write(
        &extend,
        r#"{"method": "mambaextend", "delta_scale": [0.5, 1.5, 0.8, 1.2, 0.9, 1.1]}"#,
    )
    .unwrap();
    let modulation = dir.join("modulation.json");
    std::fs::write(
        &modulation,
        r#"{"method": "modulation", "a_log_scale": [0.9, 0.7, 1.0, 0.8, 0.95, 0.85]}"#,
    )
    .unwrap();
    (
        extend.display().to_string(),
        modulation.display().to_string(),
    )
}

fn passkey(out: &Path, methods: &str, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let mut args = vec![
        "passkey",
        "--lengths",
        "1k,2k",
        "--depths",
        "0,0.5,1",
        "--samples",
        "2",
        "--max-new-tokens",
        "8",
        "--methods",
        methods,
        "--quiet",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn eval_ppl(out: &Path, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let data = fixture("text/austen-excerpt.txt");
    let mut args = vec![
        "eval-ppl",
        "--data",
        &data,
        "--lengths",
        "1k,2k",
        "--windows",
        "3",
        "--pred-len",
        "50",
        "--compare",
        "--quiet",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The per-sample results of a passkey run without timings, in grid order.
fn passkey_outputs(dir: &Path) -> Vec<Value> {
    let v = read_json(&dir.join("results.json"));
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
fn passkey_batches_equal_batch_one_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (extend, modulation) = policy_files(dir.path());
    let methods = format!("vanilla,model,{extend},{modulation}");
    let one = dir.path().join("one");
    let four = dir.path().join("four");
    ok(&passkey(&one, &methods, &["--batch-size", "1"]));
    ok(&passkey(&four, &methods, &["--batch-size", "4"]));
    let (a, b) = (passkey_outputs(&one), passkey_outputs(&four));
    assert_eq!(a.len(), 2 * 3 * 2 * 4);
    assert_eq!(a, b, "batched greedy outputs differ from batch 1");
    assert_eq!(
        read(&one.join("summary.json")),
        read(&four.join("summary.json"))
    );
    // Some sample succeeds and some output differs between methods: the check has teeth.
    assert!(a.iter().any(|r| r["success"] == true));
    let outputs: std::collections::HashSet<&str> =
        a.iter().map(|r| r["output"].as_str().unwrap()).collect();
    assert!(outputs.len() > 2, "{outputs:?}");
}

#[test]
fn passkey_shards_merged_equal_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let methods = "vanilla,model";
    let whole = dir.path().join("whole");
    ok(&passkey(&whole, methods, &[]));
    let mut shards = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("shard{i}"));
        let stdout = ok(&passkey(&d, methods, &["--shard", &format!("{i}/3")]));
        assert!(
            stdout.contains(&format!("shard {i}/3 is complete")),
            "{stdout}"
        );
        // A shard writes no summary of its own.
        assert!(!d.join("summary.json").exists());
        assert_eq!(read_json(&d.join("run.json"))["shard"], format!("{i}/3"));
        shards.push(d.display().to_string());
    }
    let merged = dir.path().join("merged");
    let m = merged.display().to_string();
    let stdout = ok(&run(&[
        "merge", &shards[0], &shards[1], &shards[2], "--out", &m,
    ]));
    assert!(
        stdout.contains("merged 3 folders (24 passkey units)"),
        "{stdout}"
    );
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&merged.join("summary.json"))
    );
    assert_eq!(passkey_outputs(&whole), passkey_outputs(&merged));
    assert_eq!(
        read(&whole.join("run.json")),
        read(&merged.join("run.json"))
    );
    assert!(merged.join("heatmap.png").exists());
    // The merged folder is an ordinary run: the unsharded command resumes it and runs nothing.
    let o = passkey(&merged, methods, &[]);
    ok(&o);
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&merged.join("summary.json"))
    );

    // Merge refuses: a missing shard (listing its units), overlapping shards, mixed
    // settings, an unsharded run among shards, a folder that is not a run.
    let o = run(&["merge", &shards[0], &shards[1], "--out", &format!("{m}-2")]);
    assert_one_line_error(&o, "8 of 24 samples are missing");
    assert!(stderr(&o).contains("sample"), "{}", stderr(&o));
    let o = run(&["merge", &shards[0], &shards[0], "--out", &format!("{m}-3")]);
    assert_one_line_error(&o, "are both shard 0/3: the shards overlap");
    let other = dir.path().join("other");
    ok(&passkey(
        &other,
        methods,
        &["--shard", "1/3", "--seed", "5"],
    ));
    let o = run(&[
        "merge",
        &shards[0],
        other.to_str().unwrap(),
        "--out",
        &format!("{m}-4"),
    ]);
    assert_one_line_error(&o, "different settings (seed: 0 → 5)");
    let o = run(&[
        "merge",
        &shards[0],
        whole.to_str().unwrap(),
        "--out",
        &format!("{m}-5"),
    ]);
    assert_one_line_error(&o, "is an unsharded run");
    let o = run(&[
        "merge",
        dir.path().to_str().unwrap(),
        "--out",
        &format!("{m}-6"),
    ]);
    assert_one_line_error(&o, "is not a run folder of this tool");
    let o = run(&["merge", &shards[0], &shards[1], &shards[2], "--out", &m]);
    assert_one_line_error(&o, "already holds a run");
    let third = dir.path().join("shard-of-4");
    ok(&passkey(&third, methods, &["--shard", "3/4"]));
    let o = run(&[
        "merge",
        &shards[0],
        third.to_str().unwrap(),
        "--out",
        &format!("{m}-7"),
    ]);
    assert_one_line_error(&o, "shards of one split share their count");
}

#[test]
fn eval_ppl_shards_and_workers_equal_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    ok(&eval_ppl(&whole, &[]));
    let mut shards = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("s{i}"));
        ok(&eval_ppl(
            &d,
            &["--shard", &format!("{i}/3"), "--batch-size", "2"],
        ));
        shards.push(d.display().to_string());
    }
    let merged = dir.path().join("merged");
    ok(&run(&[
        "merge",
        &shards[0],
        &shards[1],
        &shards[2],
        "--out",
        merged.to_str().unwrap(),
    ]));
    let summary = read(&whole.join("summary.json"));
    assert_eq!(summary, read(&merged.join("summary.json")));
    // Two CPU workers over the same windows give the same perplexities.
    let pool = dir.path().join("pool");
    ok(&eval_ppl(&pool, &["--device", "cpu:0,cpu:1"]));
    let ppl = |d: &Path| read_json(&d.join("summary.json"))["perplexity"].clone();
    assert_eq!(ppl(&whole), ppl(&pool));
    let windows = read_json(&whole.join("summary.json"))["coverage"][0]["windows"]
        .as_u64()
        .unwrap();
    assert!(windows >= 2, "the excerpt gives too few windows: {windows}");
}

#[test]
fn passkey_workers_equal_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let pool = dir.path().join("pool");
    ok(&passkey(&one, "vanilla,model", &[]));
    ok(&passkey(
        &pool,
        "vanilla,model",
        &["--device", "cpu:0,cpu:1", "--batch-size", "2"],
    ));
    assert_eq!(passkey_outputs(&one), passkey_outputs(&pool));
    assert_eq!(
        read(&one.join("summary.json")),
        read(&pool.join("summary.json"))
    );
}

#[test]
fn generate_prompts_equal_one_prompt_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = [
        "The pass key is 12345. Remember it. The pass key is",
        "Once upon a time",
        "The pass key is 99999. Remember it. The pass key is",
        "It is a truth universally",
        "Once upon a tide",
    ];
    let file = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"prompt": p, "id": format!("p{i}")}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n\n").unwrap();
    let f = file.display().to_string();
    for flags in [
        vec!["--policy", "model"],
        vec![
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--repeat-penalty",
            "1.2",
        ],
    ] {
        let mut args = vec!["generate", "--prompts", &f, "-n", "12", "--batch-size", "3"];
        args.extend_from_slice(&flags);
        let stdout = ok(&run(&args));
        let results: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(results.len(), prompts.len());
        for (i, (r, p)) in results.iter().zip(prompts).enumerate() {
            assert_eq!(r["index"], i);
            assert_eq!(r["id"], format!("p{i}"));
            let mut one = vec!["generate", p, "-n", "12", "--json"];
            one.extend_from_slice(&flags);
            let alone: Value = serde_json::from_str(&ok(&run(&one))).unwrap();
            assert_eq!(r["tokens"], alone["tokens"], "prompt {i} {flags:?}");
            assert_eq!(r["text"], alone["text"]);
        }
    }
    // Bad prompt files name the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n").unwrap();
    assert_one_line_error(
        &run(&["generate", "--prompts", bad.to_str().unwrap()]),
        "line 2 has no \"prompt\" string",
    );
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\nnot json\n").unwrap();
    assert_one_line_error(
        &run(&["generate", "--prompts", bad.to_str().unwrap()]),
        "line 2 is not JSON",
    );
    std::fs::write(&bad, "\n\n").unwrap();
    assert_one_line_error(
        &run(&["generate", "--prompts", bad.to_str().unwrap()]),
        "holds no prompts",
    );
    std::fs::write(&bad, b"{\"prompt\": \"\xff\"}\n").unwrap();
    assert_one_line_error(
        &run(&["generate", "--prompts", bad.to_str().unwrap()]),
        "is not valid UTF-8",
    );
}

#[test]
fn bad_shards_and_device_lists_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    for (shard, says) in [
        ("2/2", "the index must be below the count"),
        ("0/0", "the shard count must be at least 1"),
        ("a/b", "expected I/N"),
    ] {
        let o = passkey(&out, "vanilla", &["--shard", shard]);
        assert_eq!(o.status.code(), Some(2), "{shard}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{shard}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
    assert_one_line_error(
        &passkey(&out, "vanilla", &["--device", "cuda:0,0"]),
        "lists cuda:0 twice",
    );
    assert_one_line_error(
        &passkey(&out, "vanilla", &["--device", "cpu:0,cpu:0"]),
        "lists cpu:0 twice",
    );
    assert_one_line_error(
        &passkey(&out, "vanilla", &["--device", "cpu:0,cuda:3"]),
        "cuda",
    );
    assert_one_line_error(
        &passkey(&out, "vanilla", &["--device", "cpu:0,,cpu:1"]),
        "an entry is empty",
    );
    assert_one_line_error(
        &passkey(&out, "vanilla", &["--batch-size", "0"]),
        "--batch-size must be at least 1",
    );
    assert_one_line_error(
        &run(&["generate", "hi", "--device", "cpu:0,cpu:1"]),
        "runs on one",
    );
}

/// scripts/slurm/submit.sh with a stand-in `sbatch` that runs each job at once (every
/// array task, then the merge): the merged run equals an unsharded one.
#[test]
fn the_slurm_example_shards_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let fake_bin = dir.path().join("bin");
    std::fs::create_dir_all(&fake_bin).unwrap();
    let sbatch = fake_bin.join("sbatch");
    std::fs::write(
        &sbatch,
        r#"#!/usr/bin/env bash
# A stand-in for Slurm's sbatch: runs the job now; --array=A-B runs each task.
set -euo pipefail
array=""
while [[ $1 == --* ]]; do
    case $1 in --array=*) array=${1#--array=} ;; esac
    shift
done
script=$1
shift
if [[ -n $array ]]; then
    for ((i = ${array%-*}; i <= ${array#*-}; i++)); do SLURM_ARRAY_TASK_ID=$i bash "$script" "$@" >/dev/null; done
else
    bash "$script" "$@" >/dev/null
fi
echo $RANDOM
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sbatch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runs = dir.path().join("runs");
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sweep = [
        "passkey",
        "--lengths",
        "1k",
        "--depths",
        "0,1",
        "--samples",
        "2",
        "--compare",
        "--quiet",
    ];
    let script = cli_support::root().join("scripts/slurm/submit.sh");
    let o = std::process::Command::new("bash")
        .arg(&script)
        .arg("3")
        .args(sweep)
        .env("PATH", path)
        .env("RUNS", &runs)
        .env("DEVICE", "cpu")
        .env("DECIMAMBA", env!("CARGO_BIN_EXE_decimamba"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("(3 shards)"));
    let whole = dir.path().join("whole");
    let mut args = sweep.to_vec();
    let w = whole.display().to_string();
    args.extend(["--out", &w]);
    ok(&run(&args));
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&runs.join("merged/summary.json"))
    );
}
