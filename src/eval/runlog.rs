//! A resumable run folder: `run.json` holds the run's settings, `results.jsonl`
//! one JSON line per finished sample or window, flushed as it is written.
//!
//! Reopening a folder checks that the settings match (a mismatch is an error,
//! so results of different runs never mix), returns the finished records, and
//! drops a torn last line left by an interrupted write.

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

/// An open run folder, appending to `results.jsonl`.
#[derive(Debug)]
pub struct RunLog {
    dir: PathBuf,
    file: File,
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

/// Reads the records of a `results.jsonl`. A torn or unparsable last line
/// (an interrupted write) is dropped and the file rewritten without it; a bad
/// line elsewhere is an error.
fn read_records<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
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
    if dropped {
        super::common::atomic_write(path, good.as_bytes())?;
    }
    Ok(records)
}

/// Top-level keys whose values differ between two settings objects, rendered
/// as `key: old → new`.
fn differing_keys(old: &Value, new: &Value) -> Vec<String> {
    let short = |v: Option<&Value>| {
        let s = v.map(|v| v.to_string()).unwrap_or_else(|| "absent".into());
        if s.chars().count() > 60 {
            format!("{}…", s.chars().take(60).collect::<String>())
        } else {
            s
        }
    };
    match (old.as_object(), new.as_object()) {
        (Some(o), Some(n)) => {
            let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| o.get(*k) != n.get(*k))
                .map(|k| format!("{k}: {} → {}", short(o.get(k)), short(n.get(k))))
                .collect()
        }
        _ if old != new => vec!["settings".to_string()],
        _ => Vec::new(),
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
    fn results_without_run_json_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(RESULTS_JSONL), "{\"i\":1}\n").unwrap();
        let e = RunLog::open::<Rec>(d.path(), &json!({}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no run.json"), "{e}");
    }
}
