//! `decimamba doc-retrieval` through the binary on the embedded model and the SQuAD
//! fixture (tests/fixtures/squad, scripts/make_squad_fixture.py): vanilla and DeciMamba
//! side by side, the output files, resumption, the hub cache offline, shards merged equal
//! the unsharded run, a pool of workers, and the one-line errors of bad input.

mod cli_support;
use cli_support::{assert_one_line_error, bin, fixture, run, stderr};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";
const PARQUET: &str = "squad/validation-00000-of-00001.parquet";

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

/// A small run: N = 1 and 3, four questions, vanilla and the embedded model's DeciMamba
/// preset (layer 0 keeps 512 tokens; three documents make about 900 byte tokens).
fn doc_retrieval(out: &Path, extra: &[&str]) -> Output {
    let data = fixture(PARQUET);
    let out = out.display().to_string();
    let mut args = vec![
        "doc-retrieval",
        "--data",
        &data,
        "--num-docs",
        "1,3",
        "--questions",
        "4",
        "--methods",
        "vanilla,decimamba",
        "--quiet",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn vanilla_and_decimamba_side_by_side_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dr");
    let stdout = ok(&doc_retrieval(&out, &[]));
    let header = stdout
        .lines()
        .find(|l| l.starts_with("noise docs"))
        .unwrap_or_else(|| panic!("no table in {stdout}"));
    assert!(
        header.contains("vanilla") && header.contains("decimamba"),
        "{stdout}"
    );
    for n in ["1", "3"] {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(n))
            .unwrap_or_else(|| panic!("no row for N = {n}: {stdout}"));
        assert_eq!(row.matches("/4)").count(), 2, "{row}");
    }
    let records = jsonl(&out.join("results.jsonl"));
    assert_eq!(records.len(), 2 * 4 * 2, "N × questions × methods");
    let by = |m: &str, n: u64| {
        records
            .iter()
            .filter(|r| r["method"] == m && r["num_docs"] == n)
            .collect::<Vec<_>>()
    };
    for n in [1, 3] {
        let (v, d) = (by("vanilla", n), by("decimamba", n));
        assert_eq!(v.len(), 4);
        for (a, b) in v.iter().zip(&d) {
            // Both methods saw the same prompt.
            for k in [
                "question",
                "question_id",
                "golden_position",
                "label",
                "prompt_tokens",
            ] {
                assert_eq!(a[k], b[k], "{k}: {a} vs {b}");
            }
            let label = a["label"].as_str().unwrap();
            let id: u32 = label.strip_suffix("|>").unwrap().parse().unwrap();
            assert!(id < 1000, "{label}");
            assert!(a["golden_position"].as_u64().unwrap() <= n);
            // A hit is exactly the output's id before `|>` equal to the label's.
            for r in [a, b] {
                let hit = r["output"]
                    .as_str()
                    .unwrap()
                    .split_once("|>")
                    .is_some_and(|(x, _)| format!("{x}|>") == label);
                assert_eq!(r["success"], hit, "{r}");
            }
            assert_eq!(a["kept_per_layer"], serde_json::json!([]));
            let tokens = b["prompt_tokens"].as_u64().unwrap();
            if tokens > 513 {
                assert_eq!(b["kept_per_layer"][0], 513, "{b}");
            }
        }
    }
    assert!(
        by("decimamba", 3)
            .iter()
            .any(|r| r["prompt_tokens"].as_u64().unwrap() > 513),
        "three documents should exceed the 512-token budget"
    );
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["eval"], "doc-retrieval");
    assert_eq!(summary["num_docs"], serde_json::json!([1, 3]));
    let methods = summary["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2);
    for (m, name) in methods.iter().zip(["vanilla", "decimamba"]) {
        assert_eq!(m["method"], name);
        let per = m["per_num_docs"].as_array().unwrap();
        for (cell, n) in per.iter().zip([1, 3]) {
            let hits = by(name, n).iter().filter(|r| r["success"] == true).count();
            assert_eq!(cell["correct"], hits);
            assert_eq!(cell["samples"], 4);
        }
    }
    assert_eq!(methods[1]["decimation"]["decimation_max_p_L_base"], 512);
    let img = image::open(out.join("accuracy.png")).unwrap();
    assert!(img.width() > img.height() && img.height() > 200);
    assert_eq!(
        read_json(&out.join("results.json"))
            .as_array()
            .unwrap()
            .len(),
        16
    );

    // An interruption: keep five finished questions; the rerun redoes only the rest.
    let lines: Vec<String> = read(&out.join("results.jsonl"))
        .lines()
        .map(String::from)
        .collect();
    std::fs::write(out.join("results.jsonl"), lines[..5].join("\n") + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let again = ok(&doc_retrieval(&out, &[]));
    assert_eq!(again, stdout);
    let resumed: Vec<String> = read(&out.join("results.jsonl"))
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(resumed.len(), 16);
    assert_eq!(
        resumed[..5],
        lines[..5],
        "finished questions are not redone"
    );
    assert_eq!(read_json(&out.join("summary.json")), summary);
    // Other settings in the same folder are refused.
    assert_one_line_error(&doc_retrieval(&out, &["--seed", "9"]), "seed");
}

#[test]
fn shards_merged_and_workers_equal_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    ok(&doc_retrieval(&whole, &[]));
    let mut shards = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("shard{i}"));
        let stdout = ok(&doc_retrieval(
            &d,
            &["--shard", &format!("{i}/3"), "--batch-size", "2"],
        ));
        assert!(
            stdout.contains(&format!("shard {i}/3 is complete")),
            "{stdout}"
        );
        assert!(!d.join("summary.json").exists());
        shards.push(d.display().to_string());
    }
    let merged = dir.path().join("merged");
    let stdout = ok(&run(&[
        "merge",
        &shards[0],
        &shards[1],
        &shards[2],
        "--out",
        merged.to_str().unwrap(),
    ]));
    assert!(
        stdout.contains("merged 3 folders (16 doc-retrieval units)"),
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
    assert!(merged.join("accuracy.png").exists());
    let without_time = |d: &Path| {
        let mut v = jsonl(&d.join("results.jsonl"));
        for r in &mut v {
            r.as_object_mut().unwrap().remove("prefill_secs");
        }
        v.sort_by_key(|r| r.to_string());
        v
    };
    assert_eq!(without_time(&whole), without_time(&merged));
    let o = run(&[
        "merge",
        &shards[0],
        &shards[1],
        "--out",
        &format!("{}-2", merged.display()),
    ]);
    assert_one_line_error(&o, "of 16 questions are missing");

    let pool = dir.path().join("pool");
    ok(&doc_retrieval(&pool, &["--device", "cpu:0,cpu:1"]));
    assert_eq!(
        read(&whole.join("summary.json")),
        read(&pool.join("summary.json"))
    );
    assert_eq!(without_time(&whole), without_time(&pool));
}

/// Lays out `datasets--rajpurkar--squad_v2` in a hub cache under `hf_home`.
fn cache_squad(hf_home: &Path) -> PathBuf {
    let repo = hf_home.join("hub/datasets--rajpurkar--squad_v2");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(snap.join("squad_v2")).unwrap();
    std::fs::copy(
        fixture(PARQUET),
        snap.join("squad_v2/validation-00000-of-00001.parquet"),
    )
    .unwrap();
    std::fs::write(snap.join("README.md"), "# squad_v2").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    snap
}

#[test]
fn squad_from_an_offline_hub_cache_and_its_errors() {
    let home = tempfile::tempdir().unwrap();
    let args = |out: &Path| {
        vec![
            "doc-retrieval".to_string(),
            "--num-docs".into(),
            "2".into(),
            "--questions".into(),
            "2".into(),
            "--quiet".into(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    // An empty cache offline: one line naming the cache and the repo.
    let o = bin()
        .env("HF_HOME", home.path())
        .args(args(&home.path().join("none")))
        .output()
        .unwrap();
    let cache = home.path().join("hub").display().to_string();
    assert_one_line_error(&o, "no SQuAD v2 validation split in the hub cache");
    for part in [
        cache.as_str(),
        "HF_HUB_OFFLINE is set",
        "rajpurkar/squad_v2 at main: not cached",
        "--data FILE",
    ] {
        assert!(
            stderr(&o).contains(part),
            "missing {part:?} in {}",
            stderr(&o)
        );
    }
    // The cached snapshot: the same results as --data on the file.
    cache_squad(home.path());
    let from_cache = home.path().join("cache");
    ok(&bin()
        .env("HF_HOME", home.path())
        .args(args(&from_cache))
        .output()
        .unwrap());
    let direct = home.path().join("direct");
    let mut a = args(&direct);
    a.extend(["--data".into(), fixture(PARQUET)]);
    ok(&bin().args(a).output().unwrap());
    let summary = |d: &Path| read_json(&d.join("summary.json"))["methods"].clone();
    assert_eq!(summary(&from_cache), summary(&direct));
    // The official JSON layout gives the same prompts and results.
    let json = home.path().join("json");
    let mut a = args(&json);
    a.extend(["--data".into(), fixture("squad/dev-v2.0.json")]);
    ok(&bin().args(a).output().unwrap());
    assert_eq!(summary(&json), summary(&direct));
    let rows = |d: &Path| {
        jsonl(&d.join("results.jsonl"))
            .into_iter()
            .map(|r| {
                (
                    r["label"].clone(),
                    r["prompt_tokens"].clone(),
                    r["output"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(rows(&json), rows(&direct));
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, "not parquet\nat all").unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"version": "v2.0", "data": []}"#).unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, r#"{"data": [{"paragraphs": [{"qas": []}]}]}"#).unwrap();
    let not_json = dir.path().join("bad.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    let squad = fixture(PARQUET);
    let pg19 = fixture("pg19/test-00000-of-00001.parquet");
    let jsonl_file = fixture("text/books.jsonl");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // 9 paragraphs: 8 besides the golden one.
        (
            vec!["--data", &squad, "--num-docs", "9"],
            "--num-docs 9 needs 9 distinct noise documents",
        ),
        (
            vec!["--data", &squad, "--num-docs", "0"],
            "0 noise documents",
        ),
        (
            vec!["--data", &squad, "--num-docs", "2,x"],
            "\"x\" is not a whole number",
        ),
        (
            vec!["--data", &squad, "--num-docs", "2", "--questions", "15"],
            "more than the 14 answerable questions",
        ),
        (
            vec!["--data", &squad, "--num-docs", "2,2"],
            "lists a number twice",
        ),
        (
            vec!["--data", junk.to_str().unwrap()],
            "is not a readable parquet file",
        ),
        (vec!["--data", &pg19], "no column \"id\""),
        (
            vec!["--data", empty.to_str().unwrap()],
            "holds no SQuAD questions",
        ),
        (
            vec!["--data", broken.to_str().unwrap()],
            "is not in SQuAD's layout",
        ),
        (
            vec!["--data", not_json.to_str().unwrap()],
            "is not valid JSON",
        ),
        (vec!["--data", "/nonexistent/dev.json"], "does not exist"),
        (vec!["--data", &jsonl_file], "neither .parquet"),
    ];
    for (i, (mut a, needle)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("o{i}"));
        let out = out.display().to_string();
        a.splice(0..0, ["doc-retrieval", "--quiet", "--out", &out]);
        let o = run(&a);
        assert_one_line_error(&o, needle);
    }
}
