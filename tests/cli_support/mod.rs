//! Running the `decimamba` binary in tests: fixture paths, a command with the user's hub
//! cache and network kept out, and the one-line error check every CLI test uses.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(p: &str) -> String {
    root().join("tests/fixtures").join(p).display().to_string()
}

pub fn char_tokenizer() -> String {
    fixture("tokenizers/char54.json")
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_decimamba"));
    c.env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("RUST_BACKTRACE");
    c
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Failed with exit 1, no panic, and exactly one `error:` line containing `needle`;
/// `warning:` lines (a fixture's padded embedding draws one) may come before it.
pub fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    let lines: Vec<&str> = err
        .trim()
        .lines()
        .filter(|l| !l.starts_with("warning:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line: {err}");
    assert!(lines[0].starts_with("error:"), "{err}");
    assert!(
        lines[0].contains(needle),
        "error {:?} does not mention {needle:?}",
        lines[0]
    );
}

/// Runs `cmd` with stdout a pipe whose reader has already gone (`… | true`).
pub fn output_with_closed_stdout(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}
