//! LongBench's data files: `THUDM/LongBench` ships them in `data.zip` as `data/{task}.jsonl`
//! (LongBench) and `data/{task}_e.jsonl` (LongBench-E), one sample per line with the fields
//! `input`, `context`, `answers`, `length`, `all_classes`, `dataset`, `language`, `_id`
//! (the loading script `LongBench.py` reads them so). Read from the hub cache, an
//! extracted `data/` folder, or a local zip or folder.

use crate::eval::common::fnv1a64;
use crate::eval::data::{hub_dataset_files_in, HubDataset};
use anyhow::{bail, Context, Result};
use hf_hub::Cache;
use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One LongBench sample.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LongBenchSample {
    /// The question or instruction (`{input}` of the prompt).
    pub input: String,
    /// The long context (`{context}`).
    pub context: String,
    /// Reference answers.
    pub answers: Vec<String>,
    /// Words (English) or characters (Chinese) of the context: LongBench-E's buckets.
    pub length: usize,
    /// Classification labels (trec, lsht); null elsewhere.
    #[serde(default)]
    pub all_classes: Option<Vec<String>>,
    /// The sample's id.
    #[serde(rename = "_id", default)]
    pub id: String,
}

/// The samples of one task file.
#[derive(Debug, Clone)]
pub struct LongBenchTask {
    /// The dataset name (`triviaqa`), also for LongBench-E.
    pub name: String,
    /// The file read (`data/triviaqa_e.jsonl`).
    pub file: String,
    /// Its samples in file order.
    pub samples: Vec<LongBenchSample>,
    /// FNV-1a of the file's bytes.
    pub fnv1a64: String,
}

/// Where the task files are.
#[derive(Debug, Clone, PartialEq)]
pub enum LongBenchFiles {
    /// The hub's `data.zip` (or any zip holding `data/{task}.jsonl` or `{task}.jsonl`).
    Zip(PathBuf),
    /// Extracted `.jsonl` files.
    Jsonl(Vec<PathBuf>),
}

impl LongBenchFiles {
    /// What to show and record as the source.
    pub fn describe(&self) -> String {
        match self {
            LongBenchFiles::Zip(p) => p.display().to_string(),
            LongBenchFiles::Jsonl(files) => match files.first().and_then(|f| f.parent()) {
                Some(dir) => dir.display().to_string(),
                None => "no files".into(),
            },
        }
    }
}

/// The file name of a task: `{task}.jsonl`, or `{task}_e.jsonl` for LongBench-E.
pub fn task_file_name(task: &str, longbench_e: bool) -> String {
    if longbench_e {
        format!("{task}_e.jsonl")
    } else {
        format!("{task}.jsonl")
    }
}

/// `--data PATH`: a zip file, a folder holding `data.zip`, or a folder of `.jsonl` files
/// (directly or under `data/`).
pub fn local_files(path: &Path) -> Result<LongBenchFiles> {
    if path.is_file() {
        if path
            .to_string_lossy()
            .to_ascii_lowercase()
            .ends_with(".zip")
        {
            return Ok(LongBenchFiles::Zip(path.to_path_buf()));
        }
        bail!(
            "{} is not a zip file; give LongBench's data.zip or a folder of its .jsonl files",
            path.display()
        );
    }
    if !path.is_dir() {
        bail!("LongBench data {} does not exist", path.display());
    }
    if path.join("data.zip").is_file() {
        return Ok(LongBenchFiles::Zip(path.join("data.zip")));
    }
    let mut files = Vec::new();
    for dir in [path.to_path_buf(), path.join("data")] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            files.extend(
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "jsonl")),
            );
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "no data: {} has no data.zip and no .jsonl files (directly or in data/)",
            path.display()
        );
    }
    Ok(LongBenchFiles::Jsonl(files))
}

/// Where LongBench is on the hub.
pub const LONGBENCH_SOURCES: [(&str, &str); 1] = [("THUDM/LongBench", "main")];

const LONGBENCH_HINT: &str =
    "pass --data PATH with LongBench's data.zip or a folder of its {task}.jsonl files";

/// The files of a hub listing to use for `wanted` (file names such as `triviaqa.jsonl`):
/// those under an extracted `data/` folder when every one is there, else `data.zip`.
pub fn pick_longbench_files(names: &[String], wanted: &[String]) -> Vec<String> {
    let extracted: Vec<String> = wanted.iter().map(|w| format!("data/{w}")).collect();
    if !wanted.is_empty() && extracted.iter().all(|e| names.contains(e)) {
        return extracted;
    }
    if names.iter().any(|n| n == "data.zip") {
        return vec!["data.zip".into()];
    }
    Vec::new()
}

/// The task files from the hub (listed, then downloaded into `cache`) or, offline or when
/// the hub is unreachable, from the cached snapshot.
pub fn hub_files_in(cache: &Cache, offline: bool, wanted: &[String]) -> Result<LongBenchFiles> {
    let pick = |names: &[String]| pick_longbench_files(names, wanted);
    let describe = |names: &[String]| {
        if names.is_empty() {
            "no files".to_string()
        } else {
            format!(
                "neither data.zip nor data/{} among {} files",
                wanted.join(", data/"),
                names.len()
            )
        }
    };
    let files = hub_dataset_files_in(
        cache,
        offline,
        &HubDataset {
            what: "LongBench data",
            sources: &LONGBENCH_SOURCES,
            wanted: "data.zip or the extracted data/*.jsonl",
            pick: &pick,
            describe: &describe,
            hint: LONGBENCH_HINT,
        },
    )?;
    Ok(match files.as_slice() {
        [one] if one.to_string_lossy().ends_with(".zip") => LongBenchFiles::Zip(one.clone()),
        _ => LongBenchFiles::Jsonl(files),
    })
}

/// [`hub_files_in`] with the hub cache and `HF_HUB_OFFLINE` of the environment.
pub fn hub_files(wanted: &[String]) -> Result<LongBenchFiles> {
    hub_files_in(
        &crate::hub::cache_from_env(),
        crate::hub::offline_from_env(),
        wanted,
    )
}

fn parse_task(name: &str, file: &str, bytes: &[u8]) -> Result<LongBenchTask> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{file} is not valid UTF-8 (at byte {})", e.valid_up_to()))?;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let sample: LongBenchSample = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{file}:{}: not a LongBench sample (input, context, answers, length, all_classes, _id): {e}",
                i + 1
            )
        })?;
        samples.push(sample);
    }
    if samples.is_empty() {
        bail!("no data: {file} holds no samples");
    }
    Ok(LongBenchTask {
        name: name.to_string(),
        file: file.to_string(),
        samples,
        fnv1a64: format!("{:016x}", fnv1a64(bytes)),
    })
}

/// Reads `tasks` (LongBench-E files when `longbench_e`) from `files`.
pub fn load_tasks(
    files: &LongBenchFiles,
    tasks: &[String],
    longbench_e: bool,
) -> Result<Vec<LongBenchTask>> {
    match files {
        LongBenchFiles::Jsonl(paths) => tasks
            .iter()
            .map(|t| {
                let name = task_file_name(t, longbench_e);
                let Some(path) = paths.iter().find(|p| {
                    p.file_name()
                        .is_some_and(|f| f == std::ffi::OsStr::new(&name))
                }) else {
                    bail!(
                        "{} has no {name}{}",
                        files.describe(),
                        if longbench_e {
                            " (LongBench-E files end in _e.jsonl)"
                        } else {
                            ""
                        }
                    );
                };
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                parse_task(t, &path.display().to_string(), &bytes)
            })
            .collect(),
        LongBenchFiles::Zip(path) => {
            let shown = path.display().to_string();
            let file = std::fs::File::open(path).with_context(|| format!("cannot read {shown}"))?;
            let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
                .map_err(|e| anyhow::anyhow!("{shown} is not a readable zip file: {e}"))?;
            let names: Vec<String> = archive
                .file_names()
                .filter_map(|n| n.ok().map(|n| n.to_string()))
                .collect();
            tasks
                .iter()
                .map(|t| {
                    let name = task_file_name(t, longbench_e);
                    let Some(entry) = names
                        .iter()
                        .find(|n| n.as_str() == name || n.ends_with(&format!("/{name}")))
                    else {
                        bail!(
                            "{shown} has no {name}{}",
                            if longbench_e {
                                " (LongBench-E files end in _e.jsonl)"
                            } else {
                                ""
                            }
                        );
                    };
                    let mut bytes = Vec::new();
                    archive
                        .by_name(entry)
                        .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
                        .map_err(|e| anyhow::anyhow!("{shown}: cannot read {entry}: {e}"))?;
                    parse_task(t, &format!("{shown}:{entry}"), &bytes)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracted_files_come_first_then_the_zip() {
        let names: Vec<String> = ["README.md", "LongBench.py", "data.zip", "data/lcc.jsonl"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let wanted = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pick_longbench_files(&names, &wanted(&["lcc.jsonl"])),
            vec!["data/lcc.jsonl"]
        );
        assert_eq!(
            pick_longbench_files(&names, &wanted(&["lcc.jsonl", "trec.jsonl"])),
            vec!["data.zip"]
        );
        assert!(pick_longbench_files(&names[..2], &wanted(&["lcc.jsonl"])).is_empty());
        assert_eq!(task_file_name("trec", true), "trec_e.jsonl");
    }

    #[test]
    fn samples_parse_and_bad_lines_are_named() {
        let line = r#"{"input": "q", "context": "c", "answers": ["a"], "length": 12, "all_classes": null, "dataset": "x", "language": "en", "_id": "id1"}"#;
        let t = parse_task("x", "x.jsonl", format!("{line}\n\n{line}\n").as_bytes()).unwrap();
        assert_eq!(t.samples.len(), 2);
        assert_eq!(t.samples[0].id, "id1");
        assert_eq!(t.samples[0].all_classes, None);
        let e = parse_task("x", "x.jsonl", b"{\"input\": 1}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.jsonl:1: not a LongBench sample"), "{e}");
        let e = parse_task("x", "x.jsonl", b"\n").unwrap_err().to_string();
        assert!(e.contains("holds no samples"), "{e}");
    }
}
