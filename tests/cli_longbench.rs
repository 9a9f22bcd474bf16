//! `decimamba longbench` through the binary on the embedded model and the LongBench
//! fixture (tests/fixtures/longbench/data.zip, scripts/make_longbench_fixture.py) laid out
//! as the hub cache: vanilla and DeciMamba side by side with every score recomputed from
//! the records, middle truncation, LongBench-E buckets, an extracted data/ folder,
//! resumption, shards merged equal the unsharded run, and the one-line errors.

mod cli_support;
use cli_support::{assert_one_line_error, bin, fixture, stderr};
use decimamba::eval::longbench::data::{load_tasks, LongBenchFiles};
use decimamba::eval::longbench::{mean_score, mean_score_e, score_prediction, LengthBucket};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const PAPER_TASKS: [&str; 6] = [
    "multifieldqa_en",
    "gov_report",
    "multi_news",
    "triviaqa",
    "lcc",
    "repobench-p",
];

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

fn jsonl(path: &Path) -> Vec<Value> {
    read(path)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn zip_fixture() -> PathBuf {
    PathBuf::from(fixture("longbench/data.zip"))
}

/// A hub cache under `home` holding THUDM/LongBench's data.zip.
fn cache_zip(home: &Path) {
    let repo = home.join("hub/datasets--THUDM--LongBench");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(zip_fixture(), snap.join("data.zip")).unwrap();
    std::fs::write(snap.join("LongBench.py"), "# loading script").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
}

fn longbench(home: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .env("HF_HOME", home)
        .args(["longbench", "--quiet", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Every record's score equals the library's metric on its prediction, and the summary's
/// task scores (and buckets) are eval.py's means of them.
fn check_scores(out: &Path, longbench_e: bool, tasks: &[&str]) {
    let tasks_s: Vec<String> = tasks.iter().map(|s| s.to_string()).collect();
    let data = load_tasks(&LongBenchFiles::Zip(zip_fixture()), &tasks_s, longbench_e).unwrap();
    let records = jsonl(&out.join("results.jsonl"));
    let summary = read_json(&out.join("summary.json"));
    for m in summary["methods"].as_array().unwrap() {
        let name = m["method"].as_str().unwrap();
        for (t, task) in m["tasks"].as_array().unwrap().iter().zip(&data) {
            assert_eq!(t["task"], task.name.as_str());
            let mine: Vec<&Value> = records
                .iter()
                .filter(|r| r["method"] == name && r["task"] == task.name.as_str())
                .collect();
            assert_eq!(t["samples"], mine.len());
            let mut scores = Vec::new();
            let mut buckets: [Vec<f64>; 3] = Default::default();
            for r in &mine {
                let s = &task.samples[r["sample"].as_u64().unwrap() as usize];
                let classes = s.all_classes.clone().unwrap_or_default();
                let want = score_prediction(
                    &task.name,
                    r["prediction"].as_str().unwrap(),
                    &s.answers,
                    &classes,
                )
                .unwrap();
                assert_eq!(r["score"].as_f64().unwrap(), want, "{r}");
                assert_eq!(r["length"], s.length);
                scores.push(want);
                let k = match LengthBucket::of(s.length) {
                    LengthBucket::Upto4k => 0,
                    LengthBucket::From4kTo8k => 1,
                    LengthBucket::Over8k => 2,
                };
                buckets[k].push(want);
            }
            assert_eq!(t["score"].as_f64(), mean_score(&scores), "{t}");
            if longbench_e {
                for (label, b) in ["0-4k", "4-8k", "8k+"].iter().zip(&buckets) {
                    assert_eq!(t["buckets"][label].as_f64(), mean_score_e(b), "{t}");
                }
            } else {
                assert!(t.get("buckets").is_none());
            }
        }
    }
}

#[test]
fn paper_tasks_side_by_side_from_the_offline_cache_then_resume() {
    let home = tempfile::tempdir().unwrap();
    cache_zip(home.path());
    let out = home.path().join("lb");
    let args = [
        "--samples",
        "2",
        "--max-length",
        "600",
        "--methods",
        "vanilla,decimamba",
    ];
    let stdout = ok(&longbench(home.path(), &out, &args));
    for t in PAPER_TASKS.iter().chain(&["average"]) {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(t)),
            "no row {t}: {stdout}"
        );
    }
    assert!(
        stdout.contains("vanilla") && stdout.contains("decimamba"),
        "{stdout}"
    );
    let records = jsonl(&out.join("results.jsonl"));
    assert_eq!(records.len(), 6 * 2 * 2, "tasks × samples × methods");
    check_scores(&out, false, &PAPER_TASKS);
    // Middle truncation: prompts over 600 tokens keep 300 + 300 (re-encoded: the byte-level
    // tokenizer gives back exactly 600 unless a character was cut at the seam).
    let mut cut = 0;
    for r in &records {
        let tokens = r["prompt_tokens"].as_u64().unwrap();
        if r["truncated"] == true {
            cut += 1;
            assert!((598..=606).contains(&tokens), "{r}");
        } else {
            assert!(tokens <= 600, "{r}");
        }
        if r["method"] == "decimamba" && tokens > 513 {
            assert_eq!(r["kept_per_layer"][0], 513, "{r}");
        }
        if r["method"] == "vanilla" {
            assert_eq!(r["kept_per_layer"], serde_json::json!([]));
        }
    }
    assert!(cut > 0, "some fixture prompts exceed 600 tokens");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["benchmark"], "LongBench");
    for m in summary["methods"].as_array().unwrap() {
        let scores: Vec<f64> = m["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["score"].as_f64().unwrap())
            .collect();
        let mean = scores.iter().sum::<f64>() / 6.0;
        assert!(
            (m["average"].as_f64().unwrap() - mean).abs() <= 0.005,
            "{m}"
        );
    }
    let img = image::open(out.join("scores.png")).unwrap();
    assert!(img.width() > img.height());

    // An interruption: keep seven records; the rerun finishes the rest and agrees.
    let lines: Vec<String> = read(&out.join("results.jsonl"))
        .lines()
        .map(String::from)
        .collect();
    std::fs::write(out.join("results.jsonl"), lines[..7].join("\n") + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    assert_eq!(ok(&longbench(home.path(), &out, &args)), stdout);
    let again: Vec<String> = read(&out.join("results.jsonl"))
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(again.len(), 24);
    assert_eq!(again[..7], lines[..7]);
    assert_eq!(read_json(&out.join("summary.json")), summary);
}

#[test]
fn longbench_e_buckets_and_an_extracted_folder() {
    let home = tempfile::tempdir().unwrap();
    // The snapshot holds the extracted files instead of data.zip.
    let repo = home.path().join("hub/datasets--THUDM--LongBench");
    let snap = repo.join("snapshots").join(COMMIT).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    let tasks = ["triviaqa", "lcc", "samsum", "trec"];
    let all: Vec<String> = tasks.iter().map(|s| s.to_string()).collect();
    for e in [false, true] {
        for t in load_tasks(&LongBenchFiles::Zip(zip_fixture()), &all, e).unwrap() {
            let name = if e {
                format!("{}_e.jsonl", t.name)
            } else {
                format!("{}.jsonl", t.name)
            };
            let lines: Vec<String> = t
                .samples
                .iter()
                .map(|s| {
                    serde_json::json!({"input": s.input, "context": s.context, "answers": s.answers,
                        "length": s.length, "all_classes": s.all_classes, "_id": s.id})
                    .to_string()
                })
                .collect();
            std::fs::write(snap.join(name), lines.join("\n") + "\n").unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let out = home.path().join("e");
    let stdout = ok(&longbench(
        home.path(),
        &out,
        &[
            "--e",
            "--tasks",
            "triviaqa,lcc,samsum,trec",
            "--max-length",
            "2000",
        ],
    ));
    assert!(
        stdout.contains("LongBench-E") && stdout.contains("0-4k"),
        "{stdout}"
    );
    check_scores(&out, true, &tasks);
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["benchmark"], "LongBench-E");
    let avg = &summary["methods"][0]["average"];
    for b in ["0-4k", "4-8k", "8k+"] {
        assert!(avg[b].is_number(), "{summary}");
    }
    // samsum stops at the first newline after the first token.
    for r in jsonl(&out.join("results.jsonl")) {
        if r["task"] == "samsum" {
            let p = r["prediction"].as_str().unwrap();
            let inner = p.get(1..p.len().saturating_sub(1)).unwrap_or("");
            assert!(!inner.contains('\n'), "{p:?}");
        }
    }
    // The same files through --data DIR give the same results.
    let direct = home.path().join("direct");
    let o = bin()
        .args([
            "longbench",
            "--quiet",
            "--e",
            "--tasks",
            "triviaqa,lcc,samsum,trec",
        ])
        .args(["--max-length", "2000", "--data"])
        .arg(
            home.path()
                .join("hub/datasets--THUDM--LongBench/snapshots")
                .join(COMMIT),
        )
        .arg("--out")
        .arg(&direct)
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(
        read_json(&out.join("summary.json"))["methods"],
        read_json(&direct.join("summary.json"))["methods"]
    );
}

#[test]
fn shards_merged_equal_the_unsharded_run() {
    let home = tempfile::tempdir().unwrap();
    let zip = zip_fixture().display().to_string();
    let args = [
        "--data",
        zip.as_str(),
        "--tasks",
        "triviaqa,lcc,trec",
        "--methods",
        "vanilla,decimamba",
        "--max-length",
        "900",
    ];
    let whole = home.path().join("whole");
    ok(&longbench(home.path(), &whole, &args));
    let mut shards = Vec::new();
    for i in 0..3 {
        let d = home.path().join(format!("s{i}"));
        let mut a = args.to_vec();
        let shard = format!("{i}/3");
        a.extend(["--shard", &shard]);
        ok(&longbench(home.path(), &d, &a));
        assert!(!d.join("summary.json").exists());
        shards.push(d);
    }
    let merged = home.path().join("merged");
    let o = bin()
        .arg("merge")
        .args(&shards)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    let stdout = ok(&o);
    assert!(
        stdout.contains("merged 3 folders (18 longbench units)"),
        "{stdout}"
    );
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&merged.join("summary.json"))
    );
    assert_eq!(
        read(&whole.join("run.json")),
        read(&merged.join("run.json"))
    );
    assert!(merged.join("scores.png").exists());
    let pool = home.path().join("pool");
    let mut a = args.to_vec();
    a.extend(["--device", "cpu:0,cpu:1", "--batch-size", "2"]);
    ok(&longbench(home.path(), &pool, &a));
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&pool.join("summary.json"))
    );
}

#[test]
fn bad_input_is_a_one_line_error() {
    let home = tempfile::tempdir().unwrap();
    // An empty cache offline names the cache path.
    let o = longbench(home.path(), &home.path().join("o0"), &[]);
    assert_one_line_error(&o, "no LongBench data in the hub cache");
    let cache = home.path().join("hub").display().to_string();
    assert!(
        stderr(&o).contains(&cache) && stderr(&o).contains("THUDM/LongBench at main: not cached"),
        "{}",
        stderr(&o)
    );
    cache_zip(home.path());
    let junk = home.path().join("junk.zip");
    std::fs::write(&junk, "not a zip").unwrap();
    let bad_dir = home.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    std::fs::write(bad_dir.join("lcc.jsonl"), "{\"input\": \"x\"}\n").unwrap();
    let empty_dir = home.path().join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    std::fs::write(empty_dir.join("lcc.jsonl"), "\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--tasks".into(), "triviqa".into()],
            "unknown LongBench task \"triviqa\"; valid tasks: narrativeqa",
        ),
        (
            vec!["--tasks".into(), "narrativeqa".into(), "--e".into()],
            "unknown LongBench-E task",
        ),
        (
            vec!["--tasks".into(), "dureader".into()],
            "needs Python jieba",
        ),
        (
            vec![
                "--tasks".into(),
                "lcc".into(),
                "--max-length".into(),
                "10".into(),
            ],
            "--max-length 10 is shorter than the lcc prompt template",
        ),
        (
            vec![
                "--tasks".into(),
                "lcc".into(),
                "--samples".into(),
                "0".into(),
            ],
            "--samples must be at least 1",
        ),
        (
            vec!["--tasks".into(), "passage_count".into()],
            "has no passage_count.jsonl",
        ),
        (
            vec!["--data".into(), junk.display().to_string()],
            "is not a readable zip file",
        ),
        (
            vec!["--data".into(), "/nonexistent".into()],
            "does not exist",
        ),
        (
            vec![
                "--data".into(),
                bad_dir.display().to_string(),
                "--tasks".into(),
                "lcc".into(),
            ],
            "lcc.jsonl:1: not a LongBench sample",
        ),
        (
            vec![
                "--data".into(),
                empty_dir.display().to_string(),
                "--tasks".into(),
                "lcc".into(),
            ],
            "holds no samples",
        ),
        (
            vec![
                "--data".into(),
                home.path().display().to_string(),
                "--tasks".into(),
                "lcc".into(),
            ],
            "has no data.zip and no .jsonl files",
        ),
    ];
    for (i, (a, needle)) in cases.into_iter().enumerate() {
        let out = home.path().join(format!("o{}", i + 1));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_one_line_error(&longbench(home.path(), &out, &a), needle);
    }
}
