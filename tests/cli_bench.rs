//! `decimamba bench` end to end: output errors, the JSON report, argument checks and what
//! the peak-memory figure covers. Nothing here is timed: the runs are tiny.

mod cli_support;
use cli_support::*;

use std::path::Path;
use std::process::{Command, Output};

/// `bench` on the tiny fixture model, then `extra`; `--lengths 16,32` and `--decode 2`
/// unless `extra` sets them.
fn bench(extra: &[&str]) -> Command {
    let mut c = bin();
    c.args([
        "bench",
        "--model",
        &fixture("models/tiny-rms-hf"),
        "--tokenizer",
        &fixture("tokenizers/char54.json"),
    ]);
    for (flag, default) in [("--lengths", "16,32"), ("--decode", "2")] {
        if !extra.contains(&flag) {
            c.args([flag, default]);
        }
    }
    c.args(extra);
    c
}

fn run(extra: &[&str]) -> Output {
    bench(extra).output().unwrap()
}

/// Failed with exactly one "error: …" line containing `needle`, and no panic.
fn assert_error_line(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1; stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {err}");
    assert!(
        lines[0].contains(needle),
        "error {:?} does not mention {needle:?}",
        lines[0]
    );
}

/// [`assert_error_line`], and the error is all of stderr: it came before the model was
/// built or the benchmark started (those print a "model …" line).
fn assert_one_line_error(o: &Output, needle: &str) {
    assert_error_line(o, needle);
    let err = stderr(o);
    assert_eq!(err.trim().lines().count(), 1, "more than the error: {err}");
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn closed_stdout_is_quiet_and_the_json_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    // The reader is gone before the table is printed (`bench … | true`).
    let o = output_with_closed_stdout(bench(&["--json", out.to_str().unwrap()]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let v = read_json(&out);
    assert!(v["prefill"]["16"]["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["prefill"]["32"]["tok_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["decode"]["new_tokens"], 2);
}

#[test]
fn full_stdout_is_one_error_line() {
    let full = std::fs::File::create("/dev/full").unwrap();
    let o = bench(&[]).stdout(full).output().unwrap();
    assert_error_line(&o, "standard output");
}

#[test]
fn json_path_is_checked_before_the_model_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/folder/bench.json");
    let missing = missing.to_str().unwrap();
    // The model does not exist either: the JSON path is checked first.
    let o = bin()
        .args(["bench", "--model", "/no/such/model", "--json", missing])
        .output()
        .unwrap();
    assert_one_line_error(&o, missing);
    let folder = dir.path().to_str().unwrap();
    assert_one_line_error(&run(&["--json", folder]), folder);
    // The check leaves nothing behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[cfg(unix)]
#[test]
fn unwritable_json_folder_is_an_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root writes anyway; then there is nothing to test.
    let writable = std::fs::File::create(locked.join("probe")).is_ok();
    if !writable {
        let path = locked.join("bench.json");
        let path = path.to_str().unwrap();
        assert_one_line_error(&run(&["--json", path]), path);
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn zero_repeats_and_bad_lengths_are_errors() {
    assert_one_line_error(&run(&["--repeats", "0"]), "--repeats");
    assert_one_line_error(&run(&["--lengths", "0,16"]), "bad length '0'");
    assert_one_line_error(&run(&["--lengths", "16,+32"]), "bad length '+32'");
    assert_one_line_error(&run(&["--lengths", "16,junk"]), "bad length 'junk'");
    assert_one_line_error(&run(&["--batch-size", "0"]), "--batch-size");
}

#[test]
fn batched_prefill_is_reported_with_its_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.json");
    let o = run(&[
        "--batch-size",
        "3",
        "--compare-decimation",
        "--deci-layers",
        "1",
        "--deci-lbase",
        "8",
        "--deci-min-len",
        "4",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = read_json(&out);
    assert_eq!(v["batch_size"], 3);
    // Every row of the batch keeps L_base tokens plus the protected last one.
    assert_eq!(v["prefill_decimated"]["32"]["kept_per_layer"][0], 9);
    assert!(v["prefill"]["32"]["tok_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn lengths_run_sorted_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let o = run(&[
        "--lengths",
        "32,16,32",
        "--decode",
        "0",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    assert_eq!(rows, ["16", "32"]);
    let v = read_json(&out);
    let keys: Vec<&String> = v["prefill"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["16", "32"]);
    assert!(v.get("decode").is_none());
}

#[test]
fn one_thread_is_singular() {
    let o = run(&["--threads", "1", "--decode", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("| 1 thread\n"), "{err}");
    assert!(!err.contains("1 threads"), "{err}");
}

#[test]
fn json_says_what_the_peak_covers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let o = run(&["--json", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = read_json(&out);
    let can_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let has_peak = std::fs::read_to_string("/proc/self/status").is_ok();
    let expected = match (has_peak, can_reset) {
        (false, _) => "unavailable",
        (true, true) => "per-length",
        (true, false) => "process",
    };
    assert_eq!(v["peak_rss"], expected);
    if expected == "process" {
        assert!(stderr(&o).contains("process peak"), "{}", stderr(&o));
    }
    if has_peak {
        assert!(v["prefill"]["16"]["peak_rss_mib"].as_f64().unwrap() > 0.0);
    }
}

/// After a reset the peak forgets a large, freed allocation. This process only spawns
/// children (its other tests), so its own resident size is small and steady.
#[test]
fn reset_peak_forgets_an_earlier_larger_peak() {
    use decimamba::bench::{peak_rss_mib, PeakRss};
    if PeakRss::reset() != PeakRss::PerLength {
        eprintln!("skipped: the peak-memory counter cannot be reset here");
        return;
    }
    const MIB: usize = 1 << 20;
    let mut big = vec![0u8; 256 * MIB];
    // Touch every page so it is resident.
    for i in (0..big.len()).step_by(4096) {
        big[i] = 1;
    }
    std::hint::black_box(&big);
    let large = peak_rss_mib().unwrap();
    drop(big);
    assert_eq!(PeakRss::reset(), PeakRss::PerLength);
    let small = vec![1u8; MIB];
    std::hint::black_box(&small);
    let after = peak_rss_mib().unwrap();
    assert!(large >= 256.0, "the large peak is only {large:.0} MiB");
    assert!(
        after + 128.0 < large,
        "peak after the reset {after:.0} MiB, before {large:.0} MiB"
    );
}
