//! Documents for the perplexity evaluation: `.txt` files (one document each),
//! `.jsonl` files (one document per line), optionally gzipped, and `.parquet`
//! files (one document per row), with Project Gutenberg header/footer
//! stripping; and the PG-19 test split from the Hugging Face hub or its cache, found by
//! [`hub_dataset_files_in`], which finds the SQuAD v2 and LongBench files the same way.

use crate::hub::HubRepo;
use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// `file` for a text file, `file:line` for a jsonl line, the
    /// `short_book_title` (else `file:row`) for a parquet row.
    pub name: String,
    /// The text (Gutenberg boilerplate removed when asked).
    pub text: String,
}

/// How documents are read.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The jsonl field (or parquet column) holding the text.
    pub text_field: String,
    /// Remove Project Gutenberg headers and footers when present.
    pub strip_gutenberg: bool,
    /// Warn about and skip files (or parquet rows) that are not UTF-8 instead of failing.
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

const TEXT_EXTENSIONS: [&str; 4] = [".txt", ".jsonl", ".txt.gz", ".jsonl.gz"];

fn is_parquet(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".parquet")
}

fn has_text_ext(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    TEXT_EXTENSIONS.iter().any(|e| n.ends_with(e))
}

fn has_data_ext(name: &str) -> bool {
    has_text_ext(name) || is_parquet(name)
}

/// The data files of `path`: the file itself, or the `.txt`/`.jsonl` files
/// (optionally `.gz`) and `.parquet` files directly inside a folder, sorted by name.
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
            "no data: {} has no .txt, .jsonl or .parquet files (each .txt file is one document, each jsonl line or parquet row one document)",
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

fn clean_text(t: &str, opts: &DataOptions) -> String {
    if opts.strip_gutenberg {
        strip_gutenberg(t).to_string()
    } else {
        t.to_string()
    }
}

/// Reads documents from `files` (`.parquet` by content column, the others as
/// text). Non-UTF-8 files (or parquet rows) fail with a one-line error naming
/// the file, unless `skip_invalid`. Errors when no document results.
pub fn load_documents(files: &[PathBuf], opts: &DataOptions) -> Result<LoadedData> {
    let mut out = LoadedData::default();
    for f in files {
        if is_parquet(&f.to_string_lossy()) {
            read_parquet(f, opts, &mut out)?;
            continue;
        }
        let bytes = read_bytes(f)?;
        let text = match String::from_utf8(bytes) {
            Ok(t) => super::common::strip_bom(&t).to_string(),
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
                    text: clean_text(t, opts),
                });
            }
        } else {
            out.documents.push(Document {
                name: f.display().to_string(),
                text: clean_text(&text, opts),
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

/// The column holding each PG-19 book's title, used as the document name.
pub const TITLE_COLUMN: &str = "short_book_title";

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A top-level string (byte-array) column named `name`: `Ok(None)` when the
/// schema has no such column, an error naming the physical type when it is
/// not a string.
fn string_column(
    schema: &parquet::schema::types::SchemaDescriptor,
    name: &str,
) -> std::result::Result<Option<usize>, String> {
    let Some(i) = (0..schema.num_columns()).find(|&i| {
        let c = schema.column(i);
        matches!(c.path().parts(), [only] if only == name)
    }) else {
        return Ok(None);
    };
    let c = schema.column(i);
    if c.physical_type() != parquet::basic::Type::BYTE_ARRAY || c.max_rep_level() != 0 {
        return Err(format!(
            "column \"{name}\" is not a string column (it holds {}{})",
            c.physical_type(),
            if c.max_rep_level() != 0 { " lists" } else { "" }
        ));
    }
    Ok(Some(i))
}

/// The values of byte-array column `col` in one row group, `None` for nulls.
fn read_byte_column(
    rg: &dyn parquet::file::reader::RowGroupReader,
    col: usize,
    rows: usize,
) -> parquet::errors::Result<Vec<Option<parquet::data_type::ByteArray>>> {
    use parquet::column::reader::get_typed_column_reader;
    use parquet::data_type::ByteArrayType;
    let max_def = rg.metadata().column(col).column_descr().max_def_level();
    let mut reader = get_typed_column_reader::<ByteArrayType>(rg.get_column_reader(col)?);
    let mut defs = Vec::new();
    let mut values = Vec::new();
    let mut out = Vec::with_capacity(rows);
    while out.len() < rows {
        defs.clear();
        values.clear();
        let (records, _, _) = reader.read_records(
            rows - out.len(),
            (max_def > 0).then_some(&mut defs),
            None,
            &mut values,
        )?;
        if records == 0 {
            break;
        }
        if max_def > 0 {
            let mut v = values.drain(..);
            for &d in &defs {
                out.push(if d == max_def { v.next() } else { None });
            }
        } else {
            out.extend(values.drain(..).map(Some));
        }
    }
    Ok(out)
}

/// Reads a parquet file: one document per row, the text from the string
/// column `opts.text_field`, named by [`TITLE_COLUMN`] when the file has it
/// (else `file:row`, rows counted from 1). Null texts are skipped with a
/// warning; non-UTF-8 texts fail unless `skip_invalid`.
pub fn read_parquet(path: &Path, opts: &DataOptions, out: &mut LoadedData) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {shown}"))?;
    let pq_err = |e: parquet::errors::ParquetError| {
        let msg = one_line(&e.to_string());
        let hint = if msg.contains("Disabled feature") {
            " (decimamba reads uncompressed, snappy and gzip parquet; rewrite the file with one of those)"
        } else {
            ""
        };
        anyhow::anyhow!("{shown} is not a readable parquet file: {msg}{hint}")
    };
    let reader = SerializedFileReader::new(file).map_err(pq_err)?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let field = &opts.text_field;
    let text_col = match string_column(schema, field) {
        Ok(Some(c)) => c,
        Ok(None) => {
            let cols: Vec<String> = (0..schema.num_columns())
                .map(|i| schema.column(i).path().string())
                .collect();
            bail!(
                "{shown}: no column \"{field}\" (columns: {}); choose the column with --text-field",
                cols.join(", ")
            );
        }
        Err(e) => bail!("{shown}: {e}; choose the column with --text-field"),
    };
    let title_col = string_column(schema, TITLE_COLUMN).ok().flatten();
    let mut row = 0usize;
    for g in 0..reader.num_row_groups() {
        let rg = reader.get_row_group(g).map_err(pq_err)?;
        let rows = usize::try_from(rg.metadata().num_rows()).unwrap_or(0);
        let texts = read_byte_column(&*rg, text_col, rows).map_err(pq_err)?;
        let titles = match title_col {
            Some(c) => read_byte_column(&*rg, c, rows).map_err(pq_err)?,
            None => Vec::new(),
        };
        if texts.len() != rows || (title_col.is_some() && titles.len() != rows) {
            bail!(
                "{shown} is not a readable parquet file: row group {g} declares {rows} rows but its columns hold {} and {}",
                texts.len(),
                titles.len()
            );
        }
        for (i, text) in texts.into_iter().enumerate() {
            row += 1;
            let title = titles
                .get(i)
                .and_then(Option::as_ref)
                .and_then(|t| std::str::from_utf8(t.data()).ok())
                .map(str::trim)
                .filter(|t| !t.is_empty());
            let at = match title {
                Some(t) => format!("{shown}:{row} ({t})"),
                None => format!("{shown}:{row}"),
            };
            let Some(text) = text else {
                out.warnings
                    .push(format!("skipped {at}: \"{field}\" is null"));
                continue;
            };
            let text = match std::str::from_utf8(text.data()) {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!(
                        "{at} is not valid UTF-8 (invalid byte at offset {})",
                        e.valid_up_to()
                    );
                    if opts.skip_invalid {
                        out.warnings.push(format!("skipped {msg}"));
                        continue;
                    }
                    bail!("{msg}; pass --skip-invalid to skip such rows");
                }
            };
            out.documents.push(Document {
                name: title.map_or_else(|| format!("{shown}:{row}"), str::to_string),
                text: clean_text(text, opts),
            });
        }
    }
    Ok(())
}

/// Where `--dataset pg19` looks for the PG-19 test split, in order: a hub
/// dataset and the revision holding its files. emozilla/pg19 keeps
/// `data/test-00000-of-00001.parquet` on `main`; deepmind/pg19 is a loading
/// script on `main` and the hub's parquet export at `refs/convert/parquet`.
pub const PG19_SOURCES: [(&str, &str); 2] = [
    ("emozilla/pg19", "main"),
    ("deepmind/pg19", "refs/convert/parquet"),
];

const PG19_HINT: &str =
    "pass --data FILE|DIR with the test split as .parquet (a \"text\" column), \
                         .txt (one book each) or .jsonl (one {\"text\": ...} per line) files";

/// The test-split files of a dataset listing that decimamba reads: the
/// `.parquet` files with a path part named `test` (`data/test-00000-of-00001.parquet`,
/// `default/test/0000.parquet`), else such `.txt`/`.jsonl` files (optionally
/// gzipped); sorted.
pub fn pick_test_files(names: &[String]) -> Vec<String> {
    let test: Vec<&String> = names
        .iter()
        .filter(|n| has_data_ext(n))
        .filter(|n| {
            n.to_ascii_lowercase()
                .split(['/', '-', '_', '.'])
                .any(|p| p == "test")
        })
        .collect();
    let parquet = test.iter().any(|n| is_parquet(n));
    let mut v: Vec<String> = test
        .into_iter()
        .filter(|n| is_parquet(n) == parquet)
        .cloned()
        .collect();
    v.sort();
    v
}

fn describe_layout(names: &[String]) -> String {
    if names.is_empty() {
        "no files".to_string()
    } else if names.iter().any(|n| n.ends_with(".py")) && !names.iter().any(|n| has_data_ext(n)) {
        "only a loading script (the books are hosted elsewhere)".to_string()
    } else {
        format!(
            "no test-split .parquet, .txt or .jsonl file among {} files",
            names.len()
        )
    }
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The snapshot folder of dataset `id` at `revision` in the hub cache and its
/// files (relative, `/`-separated, sorted); or why there is none.
fn list_cached(
    cache: &Cache,
    id: &str,
    revision: &str,
) -> std::result::Result<(PathBuf, Vec<String>), String> {
    let folder =
        Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string()).folder_name();
    let repo_dir = cache.path().join(&folder);
    let ref_name = format!("{folder}/refs/{revision}");
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if is_commit(revision) => revision.to_string(),
        Err(_) => return Err(format!("not cached (no {ref_name})")),
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(format!(
            "not cached ({ref_name} names commit {commit}, which has no snapshot folder)"
        ));
    }
    let mut names = Vec::new();
    list_files(&snap, &snap, &mut names);
    names.sort();
    Ok((snap, names))
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            list_files(root, &p, out);
        } else if p.is_file() {
            // Snapshot entries are links into blobs/; a dangling one (an
            // interrupted download) is left out.
            if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
}

/// A hub client on `cache`, configured like [`HubRepo`]'s downloads
/// (`HF_TOKEN` or the cache's token, `HF_ENDPOINT`).
fn hub_api(cache: &Cache) -> Result<hf_hub::api::sync::Api> {
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_progress(true);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        if !endpoint.is_empty() {
            builder = builder.with_endpoint(endpoint);
        }
    }
    builder
        .build()
        .context("cannot set up the Hugging Face hub client")
}

/// Local paths of the PG-19 test split (see [`pg19_test_files_in`]) with the
/// hub cache and `HF_HUB_OFFLINE` from the environment.
pub fn pg19_test_files() -> Result<Vec<PathBuf>> {
    pg19_test_files_in(
        &crate::hub::cache_from_env(),
        crate::hub::offline_from_env(),
    )
}

/// A dataset on the hub that an evaluation reads: where to look, which files of a listing
/// it needs, and what to say when none are found.
pub struct HubDataset<'a> {
    /// What the files are, for messages: `PG-19 test split`.
    pub what: &'a str,
    /// Dataset repos and revisions, tried in order.
    pub sources: &'a [(&'a str, &'a str)],
    /// The files wanted, for messages: `test-split .parquet, .txt or .jsonl files`.
    pub wanted: &'a str,
    /// The files of a listing (relative, `/`-separated) to use; empty when it has none.
    pub pick: &'a dyn Fn(&[String]) -> Vec<String>,
    /// Why a listing without wanted files has none (`no test-split … among 3 files`).
    pub describe: &'a dyn Fn(&[String]) -> String,
    /// The way out, ending the error: `pass --data FILE|DIR with …`.
    pub hint: &'a str,
}

/// Local paths of the PG-19 test split: for each of [`PG19_SOURCES`] in
/// turn, the files that [`pick_test_files`] picks from the hub's listing of
/// that revision, downloaded into `cache` unless already there; when
/// `offline`, or when the hub cannot be reached, from the listing of the
/// cached snapshot instead. Fails with one line naming what was looked for,
/// where, and `--data`.
pub fn pg19_test_files_in(cache: &Cache, offline: bool) -> Result<Vec<PathBuf>> {
    hub_dataset_files_in(
        cache,
        offline,
        &HubDataset {
            what: "PG-19 test split",
            sources: &PG19_SOURCES,
            wanted: "test-split .parquet, .txt or .jsonl files",
            pick: &pick_test_files,
            describe: &describe_layout,
            hint: PG19_HINT,
        },
    )
}

/// Local paths of `dataset`'s files: for each source in turn, the files `pick` takes from
/// the hub's listing of that revision, downloaded into `cache` unless already there; when
/// `offline`, or when the hub cannot be reached, from the listing of the cached snapshot
/// instead. Fails with one line naming what was looked for, where (the cache path), and
/// the hint.
pub fn hub_dataset_files_in(
    cache: &Cache,
    offline: bool,
    dataset: &HubDataset,
) -> Result<Vec<PathBuf>> {
    let api = if offline { None } else { Some(hub_api(cache)?) };
    let mut reasons = Vec::new();
    for &(id, revision) in dataset.sources {
        let label = format!("{id} at {revision}");
        let mut hub_error = None;
        if let Some(api) = &api {
            let repo = Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string());
            match api.repo(repo).info() {
                Ok(info) => {
                    let names: Vec<String> =
                        info.siblings.into_iter().map(|s| s.rfilename).collect();
                    let picked = (dataset.pick)(&names);
                    if picked.is_empty() {
                        reasons.push(format!(
                            "{label}: {} on the hub",
                            (dataset.describe)(&names)
                        ));
                        continue;
                    }
                    let hub = HubRepo::new(id, revision, RepoType::Dataset)
                        .with_cache(cache.clone(), false);
                    return picked.iter().map(|n| hub.require(n)).collect();
                }
                Err(e) => hub_error = Some(one_line(&e.to_string())),
            }
        }
        let cached = match list_cached(cache, id, revision) {
            Ok((snap, names)) => {
                let picked = (dataset.pick)(&names);
                if !picked.is_empty() {
                    return Ok(picked.iter().map(|n| snap.join(n)).collect());
                }
                format!("cached snapshot has {}", (dataset.describe)(&names))
            }
            Err(why) => why,
        };
        reasons.push(match hub_error {
            Some(e) => format!("{label}: hub listing failed ({e}), {cached}"),
            None => format!("{label}: {cached}"),
        });
    }
    let (place, retry) = if offline {
        (
            format!(
                "in the hub cache {} (HF_HUB_OFFLINE is set)",
                cache.path().display()
            ),
            "unset HF_HUB_OFFLINE to download it, or ",
        )
    } else {
        (
            format!("on the hub or in its cache {}", cache.path().display()),
            "",
        )
    };
    bail!(
        "no {} {place}; looked for {} of {}; {retry}{}",
        dataset.what,
        dataset.wanted,
        reasons.join("; "),
        dataset.hint
    )
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
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let listing = names(&[
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00014.parquet",
            "data/test/0001.txt",
            "test.jsonl.gz",
            "train.jsonl",
            "latest.txt",
            "pg19.py",
        ]);
        // Parquet first: a repo holding both has the same split twice.
        assert_eq!(
            pick_test_files(&listing),
            vec!["data/test-00000-of-00001.parquet"]
        );
        assert_eq!(
            pick_test_files(&listing[3..]),
            vec!["data/test/0001.txt", "test.jsonl.gz"]
        );
        // The hub's parquet export layouts.
        let export = names(&[
            "default/train/0000.parquet",
            "default/test/0000.parquet",
            "default/validation/0000.parquet",
        ]);
        assert_eq!(pick_test_files(&export), vec!["default/test/0000.parquet"]);
        assert_eq!(
            pick_test_files(&names(&[
                "default/pg19-test.parquet",
                "default/pg19-train.parquet"
            ])),
            vec!["default/pg19-test.parquet"]
        );
        assert!(describe_layout(&names(&["pg19.py", "README.md"])).contains("loading script"));
        assert!(describe_layout(&listing[..1]).contains("no test-split"));
    }

    type Column<'a> = Vec<Option<&'a [u8]>>;

    /// Writes a parquet file of optional byte-array columns: `groups[g][c]`
    /// holds column c of row group g.
    fn write_parquet(path: &Path, schema: &str, groups: &[Vec<Column>]) {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;
        let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, Arc::new(props)).unwrap();
        for g in groups {
            let mut rg = w.next_row_group().unwrap();
            for col in g {
                let mut c = rg.next_column().unwrap().unwrap();
                let defs: Vec<i16> = col.iter().map(|v| i16::from(v.is_some())).collect();
                let vals: Vec<ByteArray> = col
                    .iter()
                    .flatten()
                    .map(|v| ByteArray::from(v.to_vec()))
                    .collect();
                c.typed::<ByteArrayType>()
                    .write_batch(&vals, Some(&defs), None)
                    .unwrap();
                c.close().unwrap();
            }
            rg.close().unwrap();
        }
        w.close().unwrap();
    }

    const PG19_SCHEMA: &str = "message schema {
        optional binary short_book_title (UTF8);
        optional binary text (UTF8);
    }";

    #[test]
    fn parquet_rows_become_documents() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("test-00000-of-00001.parquet");
        let boiler = b"hdr\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody three.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense";
        write_parquet(
            &f,
            PG19_SCHEMA,
            &[
                vec![
                    vec![Some(&b"Book One"[..]), None, Some(&b"  "[..])],
                    vec![Some(&b"one"[..]), Some(&b"two"[..]), Some(&boiler[..])],
                ],
                vec![
                    vec![
                        Some(&b"Null Book"[..]),
                        Some(&b"Bad Book"[..]),
                        Some(&b"Last"[..]),
                    ],
                    vec![None, Some(&b"caf\xe9"[..]), Some(&b"four"[..])],
                ],
            ],
        );
        let shown = f.display().to_string();
        let e = load_documents(std::slice::from_ref(&f), &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("{shown}:5 (Bad Book) is not valid UTF-8 (invalid byte at offset 3); pass --skip-invalid to skip such rows")
        );
        let opts = DataOptions {
            skip_invalid: true,
            ..Default::default()
        };
        let l = load_documents(std::slice::from_ref(&f), &opts).unwrap();
        let got: Vec<(&str, &str)> = l
            .documents
            .iter()
            .map(|d| (d.name.as_str(), d.text.as_str()))
            .collect();
        let (row2, row3) = (format!("{shown}:2"), format!("{shown}:3"));
        assert_eq!(
            got,
            vec![
                ("Book One", "one"),
                (row2.as_str(), "two"),
                (row3.as_str(), "Body three."),
                ("Last", "four"),
            ]
        );
        assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
        assert!(l.warnings[0].contains(":4 (Null Book): \"text\" is null"));
        assert!(l.warnings[1].contains(":5 (Bad Book) is not valid UTF-8"));
        // Boilerplate kept on request; a folder picks the file up.
        let kept = DataOptions {
            strip_gutenberg: false,
            skip_invalid: true,
            ..Default::default()
        };
        let files = data_files(d.path()).unwrap();
        assert_eq!(files, vec![f.clone()]);
        let l = load_documents(&files, &kept).unwrap();
        assert_eq!(l.documents[2].text.as_bytes(), &boiler[..]);
    }

    #[test]
    fn parquet_errors_are_one_line() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("books.parquet");
        write_parquet(
            &f,
            "message schema { optional binary title (UTF8); optional binary body (UTF8); }",
            &[vec![vec![Some(&b"T"[..])], vec![Some(&b"the body"[..])]]],
        );
        let e = load_documents(std::slice::from_ref(&f), &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no column \"text\" (columns: title, body)") && e.contains("--text-field"),
            "{e}"
        );
        let body = DataOptions {
            text_field: "body".into(),
            ..Default::default()
        };
        let l = load_documents(std::slice::from_ref(&f), &body).unwrap();
        assert_eq!(l.documents[0].text, "the body");
        assert!(l.documents[0].name.ends_with("books.parquet:1"));

        let ints = d.path().join("ints.parquet");
        write_parquet(&ints, "message schema { required int32 text; }", &[]);
        let e = load_documents(std::slice::from_ref(&ints), &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"text\" is not a string column (it holds INT32)"),
            "{e}"
        );

        let empty = d.path().join("empty.parquet");
        write_parquet(&empty, PG19_SCHEMA, &[]);
        let e = load_documents(std::slice::from_ref(&empty), &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no data"), "{e}");

        // A codec left out of this build (the fixture is written by pyarrow).
        let zstd =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pg19/zstd-codec.parquet");
        let e = load_documents(&[zstd], &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zstd-codec.parquet is not a readable parquet file")
                && e.contains("zstd")
                && e.contains("reads uncompressed, snappy and gzip parquet")
                && !e.contains('\n'),
            "{e}"
        );

        let junk = d.path().join("junk.parquet");
        std::fs::write(&junk, "not parquet at all, just some text\nwith two lines").unwrap();
        let e = load_documents(&[junk], &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("junk.parquet is not a readable parquet file"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    /// The pyarrow-written fixture (scripts/make_pg19_fixture.py): three books
    /// in two snappy row groups that are, in order, the whole excerpt.
    #[test]
    fn pg19_fixture_reads_back() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let f = root.join("pg19/test-00000-of-00001.parquet");
        let source = std::fs::read_to_string(root.join("text/austen-excerpt.txt")).unwrap();
        let opts = DataOptions {
            strip_gutenberg: false,
            ..Default::default()
        };
        let l = load_documents(&[f], &opts).unwrap();
        let names: Vec<&str> = l.documents.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "Pride and Prejudice, chapters 1-2",
                "Pride and Prejudice, chapters 3-4",
                "Pride and Prejudice, chapters 5-6"
            ]
        );
        assert!(l.documents[1].text.starts_with("Chapter 3\n"));
        let joined: String = l.documents.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(joined, source);
        assert!(l.warnings.is_empty());
    }

    /// Lays out `datasets--{id}` in a hub cache at `revision` with `files`.
    fn cache_snapshot(cache: &Path, id: &str, revision: &str, commit: &str, files: &[&str]) {
        let repo = cache.join(format!("datasets--{}", id.replace('/', "--")));
        let refs = repo.join("refs").join(revision);
        std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
        std::fs::write(refs, commit).unwrap();
        for f in files {
            let p = repo.join("snapshots").join(commit).join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
    }

    #[test]
    fn pg19_cache_lookup() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().to_path_buf());
        let e = pg19_test_files_in(&cache, true).unwrap_err().to_string();
        let shown = d.path().display().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(&format!(
                "no PG-19 test split in the hub cache {shown} (HF_HUB_OFFLINE is set); looked for"
            )),
            "{e}"
        );
        for part in [
            "emozilla/pg19 at main: not cached (no datasets--emozilla--pg19/refs/main)",
            "deepmind/pg19 at refs/convert/parquet: not cached (no datasets--deepmind--pg19/refs/refs/convert/parquet)",
            "unset HF_HUB_OFFLINE",
            "--data FILE|DIR",
        ] {
            assert!(e.contains(part), "missing {part:?} in {e}");
        }

        // deepmind/pg19's parquet export at refs/convert/parquet.
        cache_snapshot(d.path(), "emozilla/pg19", "main", "c1", &["README.md"]);
        cache_snapshot(
            d.path(),
            "deepmind/pg19",
            "refs/convert/parquet",
            "c2",
            &["default/test/0000.parquet", "default/train/0000.parquet"],
        );
        let files = pg19_test_files_in(&cache, true).unwrap();
        assert_eq!(
            files,
            vec![d
                .path()
                .join("datasets--deepmind--pg19/snapshots/c2/default/test/0000.parquet")]
        );

        // emozilla/pg19 comes first once it has the split.
        cache_snapshot(
            d.path(),
            "emozilla/pg19",
            "main",
            "c1",
            &[
                "data/test-00000-of-00001.parquet",
                "data/validation-00000-of-00001.parquet",
            ],
        );
        let files = pg19_test_files_in(&cache, true).unwrap();
        assert_eq!(
            files,
            vec![d
                .path()
                .join("datasets--emozilla--pg19/snapshots/c1/data/test-00000-of-00001.parquet")]
        );

        // Text layouts still count; a ref without its snapshot is reported.
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::new(t.path().to_path_buf());
        cache_snapshot(t.path(), "emozilla/pg19", "main", "c3", &["test.jsonl"]);
        std::fs::remove_dir_all(t.path().join("datasets--emozilla--pg19/snapshots")).unwrap();
        let e = pg19_test_files_in(&cache, true).unwrap_err().to_string();
        assert!(
            e.contains("names commit c3, which has no snapshot folder"),
            "{e}"
        );
        cache_snapshot(t.path(), "emozilla/pg19", "main", "c3", &["test.jsonl"]);
        let files = pg19_test_files_in(&cache, true).unwrap();
        assert_eq!(
            files,
            vec![t
                .path()
                .join("datasets--emozilla--pg19/snapshots/c3/test.jsonl")]
        );
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
            e.contains("no data") && e.contains("no .txt, .jsonl or .parquet"),
            "{e}"
        );
        assert!(data_files(&empty.path().join("missing")).is_err());
    }
}
