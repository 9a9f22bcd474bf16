//! A resumable run folder: `run.json` holds the run's settings, `results.jsonl`
//! one JSON line per finished sample or window, flushed as it is written.
//!
//! Reopening a folder checks that the settings match (a mismatch is an error,
//! so results of different runs never mix), returns the finished records, and
//! drops a torn last line left by an interrupted write. An open run holds an
//! exclusive lock on `run.lock`, so two processes never share one folder, and a
//! folder with other files and no `run.json` (not a run of this tool) is refused.

use super::common::atomic_write_json;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the run's settings.
pub const RUN_JSON: &str = "run.json";
/// File name of the streamed results.
pub const RESULTS_JSONL: &str = "results.jsonl";
/// File name of the lock an open run holds (it names the holder's PID).
pub const RUN_LOCK: &str = "run.lock";

/// An open run folder, appending to `results.jsonl`.
#[derive(Debug)]
pub struct RunLog {
    dir: PathBuf,
    file: File,
    /// Held (locked) for as long as the run is open; the OS releases it on exit.
    _lock: File,
}

/// Takes the exclusive lock of the run folder `dir`, or says which process holds it.
fn lock_run_folder(dir: &Path) -> Result<File> {
    let path = dir.join(RUN_LOCK);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "{} is in use by another decimamba run (PID {}); wait for it to finish or use another --out folder",
                dir.display(),
                if holder.is_empty() { "unknown" } else { holder }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    lock.set_len(0)
        .and_then(|_| writeln!(lock, "{}", std::process::id()))
        .and_then(|_| lock.flush())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(lock)
}

/// Checks an output folder before a run, without creating it: a new folder's nearest
/// existing ancestor must be a writable folder; an existing one must be writable, and
/// empty or a run of this tool (see [`RunLog::open`]).
pub fn check_out_folder(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {} is a file, not a folder", dir.display());
    }
    let existing = dir
        .ancestors()
        .find(|a| a.as_os_str().is_empty() || a.exists())
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .unwrap_or(Path::new("."));
    if !existing.is_dir() {
        bail!(
            "cannot create output folder {}: {} is not a folder",
            dir.display(),
            existing.display()
        );
    }
    let probe = existing.join(format!(".write-test-{}", std::process::id()));
    File::create(&probe)
        .and_then(|mut f| f.write_all(b"ok"))
        .with_context(|| format!("output folder {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    if dir.is_dir() && !dir.join(RUN_JSON).exists() {
        check_is_run_folder(dir)?;
    }
    Ok(())
}

/// Refuses a folder that holds files but no run of this tool (for example a model
/// folder given as `--out` by mistake).
fn check_is_run_folder(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read output folder {}", dir.display()))?;
    let mut foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != RUN_LOCK && n != RESULTS_JSONL && !n.starts_with(".write-test-"))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    bail!(
        "{} is not a run folder of this tool (no {RUN_JSON}, but it holds {}{}); give an empty or new --out folder",
        dir.display(),
        foreign[0],
        if foreign.len() > 1 { format!(" and {} more", foreign.len() - 1) } else { String::new() }
    )
}

impl RunLog {
    /// Opens (creating if needed) the run folder `dir` for a run with
    /// `settings`, and returns the records already finished there.
    ///
    /// Errors when `dir` holds a run with other settings, or results without
    /// a `run.json`.
    pub fn open<T: DeserializeOwned>(dir: &Path, settings: &Value) -> Result<(RunLog, Vec<T>)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
        // The lock comes first: the settings check below must not race another process.
        let lock = lock_run_folder(dir)?;
        let run_path = dir.join(RUN_JSON);
        let results_path = dir.join(RESULTS_JSONL);
        if run_path.exists() {
            let text = std::fs::read_to_string(&run_path)
                .with_context(|| format!("cannot read {}", run_path.display()))?;
            let old: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", run_path.display()))?;
            let diffs = differing_keys(&old, settings);
            if !diffs.is_empty() {
                bail!(
                    "{} holds a run with different settings ({}); use another --out folder \
                     or rerun with the same settings to resume",
                    dir.display(),
                    diffs.join("; ")
                );
            }
        } else {
            if results_path.exists() && std::fs::metadata(&results_path)?.len() > 0 {
                bail!(
                    "{} has {} but no {}; cannot tell which run it belongs to — use another --out folder",
                    dir.display(),
                    RESULTS_JSONL,
                    RUN_JSON
                );
            }
            check_is_run_folder(dir)?;
            atomic_write_json(&run_path, settings)?;
        }

        let records = if results_path.exists() {
            read_records::<T>(&results_path)?
        } else {
            Vec::new()
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .with_context(|| format!("cannot open {}", results_path.display()))?;
        Ok((
            RunLog {
                dir: dir.to_path_buf(),
                file,
                _lock: lock,
            },
            records,
        ))
    }

    /// Appends one record as a JSON line and flushes it to the OS.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.results_path().display()))
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `results.jsonl`.
    pub fn results_path(&self) -> PathBuf {
        self.dir.join(RESULTS_JSONL)
    }
}

/// The records of the run folder `dir` without opening it (no lock, nothing rewritten): a
/// torn last line is skipped, a bad line elsewhere is an error. A folder without
/// `results.jsonl` has none.
pub fn read_results<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let path = dir.join(RESULTS_JSONL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(parse_records(&path)?.0)
}

/// Reads the records of a `results.jsonl`. A torn or unparsable last line
/// (an interrupted write) is dropped and the file rewritten without it; a bad
/// line elsewhere is an error.
fn read_records<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let (records, good, dropped) = parse_records(path)?;
    if dropped {
        super::common::atomic_write(path, good.as_bytes())?;
    }
    Ok(records)
}

/// The records of a `results.jsonl`, the text of its good lines, and whether a torn last
/// line was left out.
fn parse_records<T: DeserializeOwned>(path: &Path) -> Result<(Vec<T>, String, bool)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.split('\n').collect();
    let mut records = Vec::new();
    let mut good = String::new();
    let mut dropped = false;
    let last_nonempty = lines.iter().rposition(|l| !l.trim().is_empty());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let is_last = Some(i) == last_nonempty;
        let complete = i + 1 < lines.len(); // followed by a newline
        match serde_json::from_str::<T>(line) {
            Ok(r) if complete || !is_last => {
                records.push(r);
                good.push_str(line);
                good.push('\n');
            }
            Ok(r) => {
                // Parsed but unterminated: keep it and terminate it.
                records.push(r);
                good.push_str(line);
                good.push('\n');
                dropped = true;
            }
            Err(_) if is_last => dropped = true,
            Err(e) => bail!("{} line {} is corrupt: {e}", path.display(), i + 1),
        }
    }
    Ok((records, good, dropped))
}

/// The settings that differ between two settings objects, rendered as
/// `path: old → new`; nested objects are compared key by key (`model.dtype: …`).
pub fn differing_keys(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_values("", Some(old), Some(new), &mut out);
    out
}

fn diff_values(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<String>) {
    let short = |v: Option<&Value>| {
        let s = v.map(|v| v.to_string()).unwrap_or_else(|| "absent".into());
        if s.chars().count() > 60 {
            format!("{}…", s.chars().take(60).collect::<String>())
        } else {
            s
        }
    };
    match (old, new) {
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(&sub, o.get(k), n.get(k), out);
            }
        }
        (o, n) if o != n => {
            let name = if path.is_empty() { "settings" } else { path };
            out.push(format!("{name}: {} → {}", short(o), short(n)));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Rec {
        i: u32,
    }

    #[test]
    fn resumes_and_checks_settings() {
        let d = tempfile::tempdir().unwrap();
        let s = json!({"a": 1, "b": [1, 2]});
        let (mut log, recs) = RunLog::open::<Rec>(d.path(), &s).unwrap();
        assert!(recs.is_empty());
        log.append(&Rec { i: 1 }).unwrap();
        log.append(&Rec { i: 2 }).unwrap();
        drop(log);
        let (_, recs) = RunLog::open::<Rec>(d.path(), &s).unwrap();
        assert_eq!(recs, vec![Rec { i: 1 }, Rec { i: 2 }]);
        let e = RunLog::open::<Rec>(d.path(), &json!({"a": 2, "b": [1, 2]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("different settings"), "{e}");
        assert!(e.contains("a: 1 → 2"), "{e}");
    }

    #[test]
    fn torn_last_line_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = json!({});
        RunLog::open::<Rec>(d.path(), &s).unwrap();
        std::fs::write(d.path().join(RESULTS_JSONL), "{\"i\":1}\n{\"i\":2}\n{\"i\"").unwrap();
        let (mut log, recs) = RunLog::open::<Rec>(d.path(), &s).unwrap();
        assert_eq!(recs.len(), 2);
        log.append(&Rec { i: 3 }).unwrap();
        drop(log);
        let (_, recs) = RunLog::open::<Rec>(d.path(), &s).unwrap();
        assert_eq!(recs.iter().map(|r| r.i).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn corrupt_middle_line_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let s = json!({});
        RunLog::open::<Rec>(d.path(), &s).unwrap();
        std::fs::write(d.path().join(RESULTS_JSONL), "{\"i\":1}\nxx\n{\"i\":2}\n").unwrap();
        let e = RunLog::open::<Rec>(d.path(), &s).unwrap_err().to_string();
        assert!(e.contains("line 2 is corrupt"), "{e}");
    }

    #[test]
    fn nested_settings_differences_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let s = json!({"model": {"name": "m", "dtype": "f32"}});
        drop(RunLog::open::<Rec>(d.path(), &s).unwrap());
        let e = RunLog::open::<Rec>(d.path(), &json!({"model": {"name": "m", "dtype": "bf16"}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.dtype: \"f32\" → \"bf16\""), "{e}");
        assert!(!e.contains("model.name"), "{e}");
    }

    #[test]
    fn a_second_open_of_a_locked_folder_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let s = json!({});
        let (first, _) = RunLog::open::<Rec>(d.path(), &s).unwrap();
        let e = RunLog::open::<Rec>(d.path(), &s).unwrap_err().to_string();
        assert!(e.contains("in use by another decimamba run"), "{e}");
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        drop(first);
        // Released with the run: the folder opens again.
        RunLog::open::<Rec>(d.path(), &s).unwrap();
    }

    #[test]
    fn checking_a_new_out_folder_does_not_create_it() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("a/b");
        check_out_folder(&out).unwrap();
        assert!(!d.path().join("a").exists());
        std::fs::write(d.path().join("f"), "x").unwrap();
        let e = check_out_folder(&d.path().join("f/sub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a folder"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_folder_of_other_files_is_not_a_run_folder() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), "x").unwrap();
        let e = RunLog::open::<Rec>(d.path(), &json!({}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a run folder"), "{e}");
        assert!(e.contains("config.json and 1 more"), "{e}");
        assert!(!d.path().join(RUN_JSON).exists());
    }

    #[test]
    fn results_without_run_json_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(RESULTS_JSONL), "{\"i\":1}\n").unwrap();
        let e = RunLog::open::<Rec>(d.path(), &json!({}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no run.json"), "{e}");
    }
}
