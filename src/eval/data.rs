//! Documents for the perplexity evaluation: `.txt` files (one document each)
//! and `.jsonl` files (one document per line), optionally gzipped, with
//! Project Gutenberg header/footer stripping; and PG19 from the hub cache.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// `file` for a text file, `file:line` for a jsonl line.
    pub name: String,
    /// The text (Gutenberg boilerplate removed when asked).
    pub text: String,
}

/// How documents are read.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The jsonl field holding the text.
    pub text_field: String,
    /// Remove Project Gutenberg headers and footers when present.
    pub strip_gutenberg: bool,
    /// Warn about and skip files that are not UTF-8 instead of failing.
    pub skip_invalid: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            text_field: "text".into(),
            strip_gutenberg: true,
            skip_invalid: false,
        }
    }
}

/// Loaded documents and the warnings met on the way.
#[derive(Debug, Clone, Default)]
pub struct LoadedData {
    /// The documents, in file order.
    pub documents: Vec<Document>,
    /// Files skipped (with `skip_invalid`) and similar notes.
    pub warnings: Vec<String>,
}

const EXTENSIONS: [&str; 4] = [".txt", ".jsonl", ".txt.gz", ".jsonl.gz"];

fn has_data_ext(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    EXTENSIONS.iter().any(|e| n.ends_with(e))
}

/// The data files of `path`: the file itself, or the `.txt`/`.jsonl` files
/// (optionally `.gz`) directly inside a folder, sorted by name.
pub fn data_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("data path {} does not exist", path.display());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read data folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && has_data_ext(&p.file_name().unwrap_or_default().to_string_lossy())
        })
        .collect();
    v.sort();
    if v.is_empty() {
        bail!(
            "no data: {} has no .txt or .jsonl files (each .txt file is one document, each jsonl line one document)",
            path.display()
        );
    }
    Ok(v)
}

/// Whether a line is a Gutenberg START (`start = true`) or END marker:
/// `*** START OF THE PROJECT GUTENBERG EBOOK ...` or `... OF THIS PROJECT ...`,
/// case-insensitive.
fn is_marker(line: &str, start: bool) -> bool {
    let t = line.trim();
    let Some(rest) = t.strip_prefix("***") else {
        return false;
    };
    let words: Vec<String> = rest
        .trim_start_matches('*')
        .split_whitespace()
        .take(6)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let kind = if start { "START" } else { "END" };
    w.len() >= 5
        && w[0] == kind
        && w[1] == "OF"
        && (w[2] == "THE" || w[2] == "THIS")
        && w[3] == "PROJECT"
        && w[4] == "GUTENBERG"
        && w.get(5)
            .is_some_and(|x| x.starts_with("EBOOK") || x.starts_with("E-BOOK"))
}

/// Removes a Project Gutenberg header (everything up to and including the
/// START line) and footer (the END line and after) when present.
pub fn strip_gutenberg(text: &str) -> &str {
    let mut body_start = 0usize;
    let mut body_end = text.len();
    let mut offset = 0usize;
    let mut seen_start = false;
    for line in text.split_inclusive('\n') {
        let here = offset;
        offset += line.len();
        if !seen_start && is_marker(line, true) {
            seen_start = true;
            body_start = offset;
            continue;
        }
        if is_marker(line, false) {
            body_end = here;
            break;
        }
    }
    if body_end < body_start {
        body_end = body_start;
    }
    text[body_start..body_end].trim()
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.to_string_lossy().to_ascii_lowercase().ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is not valid gzip", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Reads documents from `files`. Non-UTF-8 files fail with a one-line error
/// naming the file, unless `skip_invalid`. Errors when no document results.
pub fn load_documents(files: &[PathBuf], opts: &DataOptions) -> Result<LoadedData> {
    let mut out = LoadedData::default();
    for f in files {
        let bytes = read_bytes(f)?;
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!(
                    "{} is not valid UTF-8 (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                );
                if opts.skip_invalid {
                    out.warnings.push(format!("skipped {msg}"));
                    continue;
                }
                bail!("{msg}; pass --skip-invalid to skip such files");
            }
        };
        let lower = f.to_string_lossy().to_ascii_lowercase();
        let clean = |t: &str| -> String {
            if opts.strip_gutenberg {
                strip_gutenberg(t).to_string()
            } else {
                t.to_string()
            }
        };
        if lower.ends_with(".jsonl") || lower.ends_with(".jsonl.gz") {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    anyhow::anyhow!("{}:{}: not valid JSON: {e}", f.display(), i + 1)
                })?;
                let Some(t) = v.get(&opts.text_field).and_then(|t| t.as_str()) else {
                    bail!(
                        "{}:{}: no string field \"{}\" (choose the field with --text-field)",
                        f.display(),
                        i + 1,
                        opts.text_field
                    );
                };
                out.documents.push(Document {
                    name: format!("{}:{}", f.display(), i + 1),
                    text: clean(t),
                });
            }
        } else {
            out.documents.push(Document {
                name: f.display().to_string(),
                text: clean(&text),
            });
        }
    }
    if out.documents.is_empty() {
        let what = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        bail!("no data: no documents found in {what}");
    }
    Ok(out)
}

/// Hub datasets tried for `--dataset pg19`, in order.
pub const PG19_REPOS: [&str; 2] = ["emozilla/pg19", "deepmind/pg19"];

/// The test-split files of a dataset listing that decimamba can read
/// (`.txt`/`.jsonl`, optionally gzipped, with a path part named `test`).
pub fn pick_test_text_files(names: &[String]) -> Vec<String> {
    let mut v: Vec<String> = names
        .iter()
        .filter(|n| has_data_ext(n))
        .filter(|n| {
            n.to_ascii_lowercase()
                .split(['/', '-', '_', '.'])
                .any(|p| p == "test")
        })
        .cloned()
        .collect();
    v.sort();
    v
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

const PG19_HINT: &str = "export the PG19 test split to .txt files (one book each) or a .jsonl \
                         file (one {\"text\": ...} per line) and pass --data FILE|DIR";

/// Local paths of the PG19 test split: from the hub cache only when
/// `HF_HUB_OFFLINE=1`, else through the hub API. Only plain-text or jsonl
/// layouts are supported (parquet needs a reader this build lacks); anything
/// else fails with a message saying to pass `--data`.
pub fn pg19_test_files() -> Result<Vec<PathBuf>> {
    if hub_offline() {
        return pg19_from_cache(&hf_hub::Cache::from_env());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let mut reasons = Vec::new();
    for id in PG19_REPOS {
        let repo = api.repo(hf_hub::Repo::new(id.to_string(), hf_hub::RepoType::Dataset));
        let info = match repo.info() {
            Ok(i) => i,
            Err(e) => {
                reasons.push(format!("{id}: {e}"));
                continue;
            }
        };
        let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let picked = pick_test_text_files(&names);
        if picked.is_empty() {
            reasons.push(format!("{id}: {}", describe_layout(&names)));
            continue;
        }
        let mut paths = Vec::new();
        for n in &picked {
            paths.push(
                repo.get(n)
                    .with_context(|| format!("cannot download {n} from {id}"))?,
            );
        }
        return Ok(paths);
    }
    bail!(
        "cannot read PG19 from the hub ({}); {PG19_HINT}",
        reasons.join("; ")
    )
}

fn describe_layout(names: &[String]) -> String {
    if let Some(p) = names
        .iter()
        .find(|n| n.ends_with(".parquet") && n.contains("test"))
    {
        format!("the test split is only parquet ({p}), which this build cannot read")
    } else if names.iter().any(|n| n.ends_with(".py")) {
        "only a loading script, the books are hosted elsewhere".to_string()
    } else {
        "no plain-text or jsonl test files".to_string()
    }
}

/// PG19 test files already in the hub cache `cache` (for `HF_HUB_OFFLINE=1`).
pub fn pg19_from_cache(cache: &hf_hub::Cache) -> Result<Vec<PathBuf>> {
    let mut reasons = Vec::new();
    for id in PG19_REPOS {
        let repo_dir = cache
            .path()
            .join(format!("datasets--{}", id.replace('/', "--")));
        let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join("main")) else {
            reasons.push(format!("{id}: not cached"));
            continue;
        };
        let snap = repo_dir.join("snapshots").join(commit.trim());
        let mut names = Vec::new();
        list_files(&snap, &snap, &mut names);
        let picked = pick_test_text_files(&names);
        if picked.is_empty() {
            reasons.push(format!("{id}: {}", describe_layout(&names)));
            continue;
        }
        return Ok(picked.iter().map(|n| snap.join(n)).collect());
    }
    bail!(
        "HF_HUB_OFFLINE=1 and the hub cache {} has no readable PG19 test split ({}); {PG19_HINT}",
        cache.path().display(),
        reasons.join("; ")
    )
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            list_files(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gutenberg_header_and_footer_are_stripped() {
        let t = "The Project Gutenberg eBook of X\nblah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nBody line.\nMore.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense\n";
        assert_eq!(strip_gutenberg(t), "Body line.\nMore.");
        let t2 = "hdr\n***START OF THIS PROJECT GUTENBERG EBOOK ALICE***\r\nBody\r\n*** end of this project gutenberg ebook alice ***\r\n";
        assert_eq!(strip_gutenberg(t2), "Body");
        // Without markers the text is kept (trimmed).
        assert_eq!(strip_gutenberg("  plain text \n"), "plain text");
        // Only a footer.
        assert_eq!(
            strip_gutenberg("a\n*** END OF THE PROJECT GUTENBERG EBOOK\nb"),
            "a"
        );
        // A mention inside the body is not a marker.
        assert_eq!(
            strip_gutenberg("x START OF THE PROJECT GUTENBERG EBOOK y"),
            "x START OF THE PROJECT GUTENBERG EBOOK y"
        );
    }

    #[test]
    fn test_split_files_are_picked() {
        let names: Vec<String> = [
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/test/0001.txt",
            "test.jsonl.gz",
            "train.jsonl",
            "latest.txt",
            "pg19.py",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            pick_test_text_files(&names),
            vec!["data/test/0001.txt", "test.jsonl.gz"]
        );
        assert!(describe_layout(&names[..2]).contains("parquet"));
    }

    #[test]
    fn pg19_cache_lookup() {
        let d = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(d.path().to_path_buf());
        let e = pg19_from_cache(&cache).unwrap_err().to_string();
        assert!(e.contains("--data") && e.contains("not cached"), "{e}");
        let repo = d.path().join("datasets--emozilla--pg19");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc\n").unwrap();
        let snap = repo.join("snapshots/abc/data");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("test-00000-of-00001.parquet"), "x").unwrap();
        let e = pg19_from_cache(&cache).unwrap_err().to_string();
        assert!(e.contains("parquet") && e.contains("--data"), "{e}");
        std::fs::write(snap.join("test.jsonl"), "{\"text\":\"hi\"}\n").unwrap();
        let files = pg19_from_cache(&cache).unwrap();
        assert_eq!(files, vec![repo.join("snapshots/abc/data/test.jsonl")]);
    }

    #[test]
    fn jsonl_and_txt_and_gz_load() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), "one doc").unwrap();
        std::fs::write(
            d.path().join("b.jsonl"),
            "{\"text\":\"two\"}\n\n{\"text\":\"three\",\"x\":1}\n",
        )
        .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"body\":\"x\"}\n").unwrap();
        std::fs::write(d.path().join("c.jsonl.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(d.path().join("notes.md"), "ignored").unwrap();
        let files = data_files(d.path()).unwrap();
        assert_eq!(files.len(), 3);
        let e = load_documents(&files, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.jsonl.gz:1") && e.contains("--text-field"),
            "{e}"
        );
        let docs = load_documents(&files[..2], &DataOptions::default()).unwrap();
        let texts: Vec<&str> = docs.documents.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, vec!["one doc", "two", "three"]);
        assert!(docs.documents[2].name.ends_with("b.jsonl:3"));
        let opts = DataOptions {
            text_field: "body".into(),
            ..Default::default()
        };
        let docs = load_documents(&files[2..], &opts).unwrap();
        assert_eq!(docs.documents[0].text, "x");
    }

    #[test]
    fn invalid_utf8_and_empty_data() {
        let d = tempfile::tempdir().unwrap();
        let bad = d.path().join("bad.txt");
        std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
        let good = d.path().join("good.txt");
        std::fs::write(&good, "fine").unwrap();
        let e = load_documents(&[bad.clone(), good.clone()], &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.txt is not valid UTF-8"), "{e}");
        assert!(e.contains("--skip-invalid") && !e.contains('\n'), "{e}");
        let opts = DataOptions {
            skip_invalid: true,
            ..Default::default()
        };
        let l = load_documents(&[bad.clone(), good], &opts).unwrap();
        assert_eq!(l.documents.len(), 1);
        assert_eq!(l.warnings.len(), 1);
        let e = load_documents(&[bad], &opts).unwrap_err().to_string();
        assert!(e.contains("no data"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = data_files(empty.path()).unwrap_err().to_string();
        assert!(
            e.contains("no data") && e.contains("no .txt or .jsonl"),
            "{e}"
        );
        assert!(data_files(&empty.path().join("missing")).is_err());
    }
}
