//! `eval-ppl --dataset pg19` through the binary, against hub caches laid out in a
//! tempdir the way huggingface_hub and hf-hub write them, and against a stand-in hub
//! served on 127.0.0.1: the PG-19 parquet fixture (tests/fixtures/pg19, written by
//! scripts/make_pg19_fixture.py) with the embedded byte-level model.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TEST_FILE: &str = "data/test-00000-of-00001.parquet";
const TITLES: [&str; 3] = [
    "Pride and Prejudice, chapters 1-2",
    "Pride and Prejudice, chapters 3-4",
    "Pride and Prejudice, chapters 5-6",
];

fn fixture_parquet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pg19/test-00000-of-00001.parquet")
}

/// The binary with `HF_HOME` at `hf_home` and nothing else of the user's hub setup.
fn bin(hf_home: &Path, offline: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_decimamba"));
    c.env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env_remove("RUST_BACKTRACE");
    // hf-hub's client takes proxies from the environment; the fake hub is local.
    for v in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        c.env_remove(v).env_remove(v.to_ascii_lowercase());
    }
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    } else {
        c.env_remove("HF_HUB_OFFLINE");
    }
    c
}

fn eval_args(out: &Path) -> Vec<String> {
    [
        "eval-ppl",
        "--lengths",
        "512",
        "--windows",
        "2",
        "--pred-len",
        "20",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Puts `file` into the hub cache under `hf_home` as huggingface_hub does: the bytes
/// in `blobs/`, a link to them in `snapshots/<COMMIT>/<name>`, the commit in `refs/<revision>`.
fn cache_file(hf_home: &Path, id: &str, revision: &str, name: &str, file: &Path) -> PathBuf {
    let repo = hf_home
        .join("hub")
        .join(format!("datasets--{}", id.replace('/', "--")));
    let blob = repo.join("blobs/5b1c0ffee");
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::copy(file, &blob).unwrap();
    let pointer = repo.join("snapshots").join(COMMIT).join(name);
    std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&blob, &pointer).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&blob, &pointer).unwrap();
    let refs = repo.join("refs").join(revision);
    std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
    std::fs::write(refs, COMMIT).unwrap();
    pointer
}

/// Checks a finished run on the fixture: the table row for 512 and the JSON files.
/// Returns the perplexity.
fn check_run(stdout: &str, out: &Path) -> f64 {
    let row = stdout
        .lines()
        .find(|l| l.starts_with("512 "))
        .unwrap_or_else(|| panic!("no 512 row in {stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.len(), 6, "{stdout}");
    assert_eq!(cells[1], "512");
    let ppl: f64 = cells[2].parse().unwrap();
    // docs used, docs skipped, windows: three books, two windows each.
    assert_eq!(&cells[3..], ["3", "0", "6"], "{stdout}");

    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["eval"], "perplexity");
    assert_eq!(summary["documents"], 3);
    let rows = summary["perplexity"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{summary}");
    assert_eq!(rows[0]["windows"], 6);
    let p = rows[0]["perplexity"].as_f64().unwrap();
    assert!(p.is_finite() && p > 1.0, "{summary}");
    assert!((p - ppl).abs() <= 0.006 * p.max(1.0), "{p} vs table {ppl}");

    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let windows: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(windows.len(), 6);
    let names: std::collections::BTreeSet<&str> = windows
        .iter()
        .map(|w| w["doc_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, TITLES.into_iter().collect(), "{results}");
    assert!(windows.iter().all(|w| w["scored_tokens"] == 20));
    p
}

/// The whole job offline: an HF cache holding emozilla/pg19's test parquet, read with
/// HF_HUB_OFFLINE=1; the same numbers as `--data` on the file itself.
#[test]
fn pg19_from_an_offline_hub_cache() {
    let home = tempfile::tempdir().unwrap();
    let pointer = cache_file(
        home.path(),
        "emozilla/pg19",
        "main",
        TEST_FILE,
        &fixture_parquet(),
    );
    // Other splits in the snapshot are left alone.
    std::fs::write(pointer.with_file_name("README.md"), "# pg19").unwrap();

    let out = home.path().join("run");
    let o = bin(home.path(), true)
        .args(["eval-ppl", "--dataset", "pg19"])
        .args(&eval_args(&out)[1..])
        .output()
        .unwrap();
    let stdout = ok(&o);
    assert!(
        stdout.contains("perplexity on the last 20 tokens"),
        "{stdout}"
    );
    let p = check_run(&stdout, &out);

    let direct = home.path().join("direct");
    let o = bin(home.path(), true)
        .args(["eval-ppl", "--data"])
        .arg(fixture_parquet())
        .args(&eval_args(&direct)[1..])
        .output()
        .unwrap();
    let q = check_run(&ok(&o), &direct);
    assert_eq!(p, q, "--dataset pg19 and --data on the same file differ");
}

/// An empty cache offline: one error line naming the cache, both sources and --data.
#[test]
fn pg19_missing_from_an_empty_cache() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("run");
    let o = bin(home.path(), true)
        .args(["eval-ppl", "--dataset", "pg19"])
        .args(&eval_args(&out)[1..])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    let cache = home.path().join("hub").display().to_string();
    for part in [
        "no PG-19 test split in the hub cache",
        cache.as_str(),
        "HF_HUB_OFFLINE is set",
        "emozilla/pg19 at main: not cached",
        "deepmind/pg19 at refs/convert/parquet: not cached",
        "--data FILE|DIR",
        ".parquet",
    ] {
        assert!(err.contains(part), "missing {part:?} in {err}");
    }
    assert!(!out.join("summary.json").exists());
}

/// A stand-in for the hub on 127.0.0.1: the API listing and `resolve/` downloads with
/// the headers hf-hub reads (etag, x-repo-commit, Content-Range for `Range: bytes=a-`).
/// `routes` maps a request path to a response body; anything else is 404.
struct FakeHub {
    url: String,
}

impl FakeHub {
    fn start(routes: Vec<(String, Vec<u8>)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            // Bounded: the test makes a handful of requests; the thread dies with it.
            for stream in listener.incoming().take(200).flatten() {
                let _ = serve(stream, &routes);
            }
        });
        FakeHub { url }
    }
}

fn serve(mut stream: TcpStream, routes: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // `Range: bytes=a-b` or `bytes=a-`.
    let mut range: Option<(usize, Option<usize>)> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            let (a, b) = r.trim().split_once('-').unwrap_or((r.trim(), ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    let Some((_, body)) = routes.iter().find(|(p, _)| *p == path) else {
        let msg = b"{\"error\":\"Repository not found\"}";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        )?;
        return stream.write_all(msg);
    };
    let mut head = String::new();
    let part = match range {
        Some((a, b)) if path.contains("/resolve/") => {
            let a = a.min(body.len());
            let end = b.map_or(body.len(), |b| (b + 1).min(body.len())).max(a);
            head.push_str("HTTP/1.1 206 Partial Content\r\n");
            head.push_str(&format!(
                "Content-Range: bytes {a}-{}/{}\r\n",
                end.saturating_sub(1),
                body.len()
            ));
            &body[a..end]
        }
        _ => {
            head.push_str("HTTP/1.1 200 OK\r\n");
            &body[..]
        }
    };
    if path.contains("/resolve/") {
        head.push_str(&format!(
            "ETag: \"fixture-etag\"\r\nX-Repo-Commit: {COMMIT}\r\n"
        ));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        part.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(part)
}

/// Online: emozilla/pg19 is missing on the (fake) hub, so deepmind/pg19's parquet export
/// at refs/convert/parquet is listed, its test file downloaded into the cache, and the
/// run made; then the same again with HF_HUB_OFFLINE=1 from the cache alone.
#[test]
fn pg19_downloaded_from_the_hub_then_read_offline() {
    let parquet = std::fs::read(fixture_parquet()).unwrap();
    let listing = serde_json::json!({
        "sha": COMMIT,
        "siblings": [
            {"rfilename": ".gitattributes"},
            {"rfilename": "default/test/0000.parquet"},
            {"rfilename": "default/train/0000.parquet"},
            {"rfilename": "default/validation/0000.parquet"},
        ]
    });
    let hub = FakeHub::start(vec![
        (
            "/api/datasets/deepmind/pg19/revision/refs%2Fconvert%2Fparquet".into(),
            listing.to_string().into_bytes(),
        ),
        (
            "/datasets/deepmind/pg19/resolve/refs%2Fconvert%2Fparquet/default/test/0000.parquet"
                .into(),
            parquet.clone(),
        ),
    ]);
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("online");
    let o = bin(home.path(), false)
        .env("HF_ENDPOINT", &hub.url)
        .args(["eval-ppl", "--dataset", "pg19"])
        .args(&eval_args(&out)[1..])
        .output()
        .unwrap();
    let p = check_run(&ok(&o), &out);

    let repo = home.path().join("hub/datasets--deepmind--pg19");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/refs/convert/parquet")).unwrap(),
        COMMIT
    );
    let cached = repo
        .join("snapshots")
        .join(COMMIT)
        .join("default/test/0000.parquet");
    assert_eq!(std::fs::read(&cached).unwrap(), parquet);

    // The hub gone: HF_HUB_OFFLINE=1 reads the cache.
    let again = home.path().join("offline");
    let o = bin(home.path(), true)
        .args(["eval-ppl", "--dataset", "pg19"])
        .args(&eval_args(&again)[1..])
        .output()
        .unwrap();
    assert_eq!(check_run(&ok(&o), &again), p);

    // Online but unreachable (nothing listens on the port): the cache is used too.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let fallback = home.path().join("fallback");
    let o = bin(home.path(), false)
        .env("HF_ENDPOINT", &dead_url)
        .args(["eval-ppl", "--dataset", "pg19"])
        .args(&eval_args(&fallback)[1..])
        .output()
        .unwrap();
    assert_eq!(check_run(&ok(&o), &fallback), p);

    // Unreachable and nothing cached: the hub failure and the cache are both named.
    let empty = tempfile::tempdir().unwrap();
    let o = bin(empty.path(), false)
        .env("HF_ENDPOINT", &dead_url)
        .args(["eval-ppl", "--dataset", "pg19"])
        .args(&eval_args(&empty.path().join("run"))[1..])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("on the hub or in its cache")
            && err.contains("hub listing failed")
            && err.contains("not cached")
            && err.contains("--data"),
        "{err}"
    );
}
