//! Long-context perplexity (the paper's PG-19 protocol).
//!
//! For each context length `w` and each document of at least `w` tokens, up
//! to `windows` windows `tokens[i·stride .. i·stride + w]` with
//! `stride = max((len − w) / windows, 10)` are scored on their last
//! `pred_len` tokens; perplexity(w) = exp(mean over windows of the
//! per-window mean NLL). Documents shorter than `w` are skipped and counted.
//!
//! Lengths use k = 1024 throughout: the default `10k` is 10 240 tokens.

use super::common::{
    atomic_write_json, fnv1a64, format_length, progress_bar, render_table, Method, RunOptions,
};
use super::data::Document;
use super::plot::{ppl_line_plot, LineSeries};
use super::runlog::RunLog;
use super::EvalModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The smallest stride between windows.
pub const MIN_STRIDE: usize = 10;

/// The stride between windows of a `doc_len`-token document:
/// `max((doc_len − w) / windows, 10)` (integer division). `doc_len ≥ w`,
/// `windows ≥ 1`.
pub fn window_stride(doc_len: usize, w: usize, windows: usize) -> usize {
    (doc_len.saturating_sub(w) / windows.max(1)).max(MIN_STRIDE)
}

/// Start offsets of the windows of length `w` in a `doc_len`-token document:
/// `i · stride` for `i < windows` while the window fits. Empty when the
/// document is shorter than `w` or `windows` is 0.
pub fn window_starts(doc_len: usize, w: usize, windows: usize) -> Vec<usize> {
    if doc_len < w || windows == 0 || w == 0 {
        return Vec::new();
    }
    let stride = window_stride(doc_len, w, windows);
    (0..windows)
        .map(|i| i * stride)
        .take_while(|s| s + w <= doc_len)
        .collect()
}

/// Settings of a perplexity run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PplSettings {
    /// Context lengths in tokens.
    pub lengths: Vec<usize>,
    /// Most windows per document and length.
    pub windows: usize,
    /// Scored tokens at the end of each window.
    pub pred_len: usize,
}

impl Default for PplSettings {
    fn default() -> Self {
        PplSettings {
            lengths: [1, 2, 4, 10, 20, 30, 40, 50, 60]
                .iter()
                .map(|k| k * 1024)
                .collect(),
            windows: 10,
            pred_len: 100,
        }
    }
}

/// A tokenized document.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedDoc {
    /// Its name (file or file:line).
    pub name: String,
    /// Its token ids.
    pub tokens: Vec<u32>,
}

/// Tokenizes documents with the model's tokenizer (with a progress bar).
pub fn tokenize_documents(
    model: &dyn EvalModel,
    docs: &[Document],
    quiet: bool,
) -> Result<Vec<TokenizedDoc>> {
    let pb = progress_bar(docs.len() as u64, quiet, "tokenizing");
    let out = docs
        .iter()
        .map(|d| {
            let tokens = model
                .encode(&d.text)
                .with_context(|| format!("cannot tokenize {}", d.name))?;
            pb.inc(1);
            Ok(TokenizedDoc {
                name: d.name.clone(),
                tokens,
            })
        })
        .collect::<Result<Vec<_>>>();
    pb.finish_and_clear();
    out
}

/// One scored window (a line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowResult {
    /// `vanilla` or `decimamba`.
    pub method: String,
    /// Context length `w`.
    pub length: usize,
    /// Document index (in load order).
    pub doc: usize,
    /// Document name.
    pub doc_name: String,
    /// Window index within the document.
    pub window: usize,
    /// Token offset of the window in the document.
    pub start: usize,
    /// Mean NLL (nats) of the scored tokens.
    pub mean_nll: f64,
    /// Number of scored tokens.
    pub scored_tokens: usize,
    /// Forward-pass wall-clock seconds.
    pub forward_secs: f64,
    /// Tokens kept by each decimating layer (empty for vanilla).
    pub kept_per_layer: Vec<usize>,
}

type WindowKey = (String, usize, usize, usize);

fn window_key(method: &str, length: usize, doc: usize, window: usize) -> WindowKey {
    (method.to_string(), length, doc, window)
}

/// Perplexity of one method at one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PplRow {
    /// Method name.
    pub method: String,
    /// Context length.
    pub length: usize,
    /// exp(mean window NLL); `None` without windows.
    pub perplexity: Option<f64>,
    /// Mean over windows of the per-window mean NLL.
    pub mean_nll: Option<f64>,
    /// Windows scored.
    pub windows: usize,
}

/// Which documents a length could use (the same for every method).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthCoverage {
    /// Context length.
    pub length: usize,
    /// Documents with at least `length` tokens.
    pub docs_used: usize,
    /// Documents shorter than `length`, skipped.
    pub docs_skipped: usize,
    /// Windows per method.
    pub windows: usize,
}

/// What [`run_ppl`] returns.
#[derive(Debug, Clone)]
pub struct PplReport {
    /// Method names in run order.
    pub methods: Vec<String>,
    /// Scored pred-len.
    pub pred_len: usize,
    /// All finished windows, ordered by method, length, document, window.
    pub windows: Vec<WindowResult>,
    /// Perplexity per method and length (method-major).
    pub rows: Vec<PplRow>,
    /// Document coverage per length.
    pub coverage: Vec<LengthCoverage>,
    /// Windows that were already on disk when the run started.
    pub resumed: usize,
    /// False when interrupted; then no summary or plot is written.
    pub complete: bool,
    /// The run folder.
    pub out_dir: PathBuf,
}

impl PplReport {
    /// The perplexity of `method` at `length`.
    pub fn perplexity(&self, method: &str, length: usize) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.method == method && r.length == length)
            .and_then(|r| r.perplexity)
    }

    /// The terminal table: one row per length, one perplexity column per method.
    pub fn table(&self) -> String {
        let mut header = vec!["length".to_string(), "tokens".to_string()];
        header.extend(self.methods.iter().cloned());
        header.extend(["docs used", "docs skipped", "windows"].map(String::from));
        let rows: Vec<Vec<String>> = self
            .coverage
            .iter()
            .map(|c| {
                let mut r = vec![format_length(c.length), c.length.to_string()];
                for m in &self.methods {
                    r.push(
                        self.perplexity(m, c.length)
                            .map_or("-".to_string(), format_ppl),
                    );
                }
                r.push(c.docs_used.to_string());
                r.push(c.docs_skipped.to_string());
                r.push(c.windows.to_string());
                r
            })
            .collect();
        let partial = if self.complete {
            ""
        } else if self.methods.len() > 1 {
            "partial run: only the windows every method finished are counted\n"
        } else {
            "partial run: only the finished windows are counted\n"
        };
        format!(
            "{partial}perplexity on the last {} tokens of each window (K = 1024 tokens; windows per method)\n{}",
            self.pred_len,
            render_table(&header, &rows)
        )
    }
}

fn format_ppl(p: f64) -> String {
    if p >= 1e5 {
        format!("{p:.3e}")
    } else {
        format!("{p:.2}")
    }
}

/// Everything a perplexity run needs.
pub struct PplJob<'a> {
    /// The model.
    pub model: &'a dyn EvalModel,
    /// Tokenized documents.
    pub docs: &'a [TokenizedDoc],
    /// Lengths, windows and pred-len.
    pub settings: &'a PplSettings,
    /// One method, or vanilla and DeciMamba with `--compare`.
    pub methods: &'a [Method],
    /// The run folder (resumed when it already holds this run).
    pub out_dir: &'a Path,
    /// Progress and interruption.
    pub options: &'a RunOptions,
}

/// File names inside a perplexity run folder.
pub mod files {
    /// All windows, ordered.
    pub const RESULTS_JSON: &str = "results.json";
    /// Perplexity per method and length.
    pub const SUMMARY_JSON: &str = "summary.json";
    /// Perplexity vs context length.
    pub const PLOT_PNG: &str = "perplexity.png";
}

impl PplJob<'_> {
    /// The settings recorded in `run.json`; a rerun must match them to resume.
    pub fn run_settings(&self) -> Result<Value> {
        let mut h = Vec::new();
        for d in self.docs {
            h.extend_from_slice(d.name.as_bytes());
            h.push(0);
            for t in &d.tokens {
                h.extend_from_slice(&t.to_le_bytes());
            }
        }
        Ok(json!({
            "eval": "perplexity",
            "model": self.model.identity()?,
            "data": {
                "documents": self.docs.len(),
                "tokens": self.docs.iter().map(|d| d.tokens.len()).sum::<usize>(),
                "fnv1a64": format!("{:016x}", fnv1a64(&h)),
            },
            "lengths": self.settings.lengths,
            "windows": self.settings.windows,
            "pred_len": self.settings.pred_len,
            "methods": self.methods,
        }))
    }

    fn validate(&self) -> Result<()> {
        let s = self.settings;
        if s.lengths.is_empty() {
            bail!("no lengths given");
        }
        if s.windows == 0 {
            bail!("--windows must be at least 1");
        }
        if s.pred_len == 0 {
            bail!("--pred-len must be at least 1");
        }
        if let Some(l) = s.lengths.iter().find(|l| **l <= s.pred_len) {
            bail!(
                "length {l} must be longer than --pred-len {} (the scored tail)",
                s.pred_len
            );
        }
        if self.docs.is_empty() {
            bail!("no data: there are no documents to evaluate");
        }
        if self.methods.is_empty() {
            bail!("no method to run");
        }
        let names: HashSet<&str> = self.methods.iter().map(|m| m.name.as_str()).collect();
        if names.len() != self.methods.len() {
            bail!("method names must be distinct");
        }
        let longest = self.docs.iter().map(|d| d.tokens.len()).max().unwrap_or(0);
        let shortest_len = *s.lengths.iter().min().unwrap_or(&0);
        if longest < shortest_len {
            bail!(
                "no document is long enough: the shortest length is {shortest_len} tokens but the longest \
                 document has {longest} tokens"
            );
        }
        Ok(())
    }
}

/// Runs (or resumes) the perplexity evaluation, streaming each window to
/// `results.jsonl`; when complete, writes `results.json`, `summary.json` and
/// `perplexity.png` atomically.
/// One window to score: (length, document, window, start, method).
type WindowUnit<'a> = (usize, usize, usize, usize, &'a Method);

pub fn run_ppl(job: &PplJob) -> Result<PplReport> {
    job.validate()?;
    let s = job.settings;
    let (mut log, prior) = RunLog::open::<WindowResult>(job.out_dir, &job.run_settings()?)?;
    let mut done: HashMap<WindowKey, WindowResult> = HashMap::new();
    for r in prior {
        done.insert(window_key(&r.method, r.length, r.doc, r.window), r);
    }
    let resumed = done.len();

    let coverage: Vec<LengthCoverage> = s
        .lengths
        .iter()
        .map(|&w| {
            let used = job.docs.iter().filter(|d| d.tokens.len() >= w).count();
            LengthCoverage {
                length: w,
                docs_used: used,
                docs_skipped: job.docs.len() - used,
                windows: job
                    .docs
                    .iter()
                    .map(|d| window_starts(d.tokens.len(), w, s.windows).len())
                    .sum(),
            }
        })
        .collect();
    let total: usize = coverage.iter().map(|c| c.windows).sum::<usize>() * job.methods.len();
    let pb = progress_bar(total as u64, job.options.quiet, "perplexity");
    pb.set_position(resumed.min(total) as u64);
    pb.reset_eta();
    if resumed > 0 && !job.options.quiet {
        pb.suspend(|| {
            eprintln!(
                "resuming: {resumed} finished windows are already in {}",
                log.results_path().display()
            )
        });
    }

    // The work: (length, doc, window, method) in run order; with a batch size above 1 the
    // windows of one length and method are scored together, in that order.
    let mut units: Vec<WindowUnit> = Vec::new();
    for &w in &s.lengths {
        for (di, doc) in job.docs.iter().enumerate() {
            for (wi, &start) in window_starts(doc.tokens.len(), w, s.windows)
                .iter()
                .enumerate()
            {
                for m in job.methods {
                    if !done.contains_key(&window_key(&m.name, w, di, wi)) {
                        units.push((w, di, wi, start, m));
                    }
                }
            }
        }
    }
    let batch_size = job.options.batch_size.max(1);
    let groups: Vec<Vec<WindowUnit>> = match batch_size {
        1 => units.into_iter().map(|u| vec![u]).collect(),
        _ => {
            let mut by_key: Vec<((usize, &str), Vec<_>)> = Vec::new();
            for u in units {
                let key = (u.0, u.4.name.as_str());
                match by_key.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(u),
                    None => by_key.push((key, vec![u])),
                }
            }
            by_key
                .into_iter()
                .flat_map(|(_, v)| v.chunks(batch_size).map(|c| c.to_vec()).collect::<Vec<_>>())
                .collect()
        }
    };

    let mut interrupted = false;
    for group in groups {
        if job.options.stopped() {
            interrupted = true;
            break;
        }
        let (w, di, wi, _, m) = group[0];
        pb.set_message(format!(
            "{} {} doc {di} window {wi}{}",
            m.name,
            format_length(w),
            if group.len() > 1 {
                format!(" (+{} more)", group.len() - 1)
            } else {
                String::new()
            }
        ));
        let windows: Vec<&[u32]> = group
            .iter()
            .map(|&(w, di, _, start, _)| &job.docs[di].tokens[start..start + w])
            .collect();
        let scores = match job.model.score_tails(&windows, s.pred_len, &m.policy) {
            Ok(scores) => scores,
            // Ctrl-C stopped the forward pass: these windows are abandoned.
            Err(_) if job.options.stopped() => {
                interrupted = true;
                break;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{} failed at length {w}, document {} window {wi} \
                     (finished windows are saved in {})",
                    m.name,
                    job.docs[di].name,
                    log.results_path().display()
                )))
            }
        };
        for (&(w, di, wi, start, m), score) in group.iter().zip(scores) {
            if score.nll.len() != s.pred_len {
                bail!(
                    "the model returned {} NLLs for a window, expected --pred-len {}",
                    score.nll.len(),
                    s.pred_len
                );
            }
            let mean_nll =
                score.nll.iter().map(|x| f64::from(*x)).sum::<f64>() / score.nll.len() as f64;
            let rec = WindowResult {
                method: m.name.clone(),
                length: w,
                doc: di,
                doc_name: job.docs[di].name.clone(),
                window: wi,
                start,
                mean_nll,
                scored_tokens: score.nll.len(),
                forward_secs: score.forward_secs,
                kept_per_layer: score.kept_per_layer,
            };
            log.append(&rec)?;
            done.insert(window_key(&m.name, w, di, wi), rec);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();

    let complete = !interrupted && done.len() == total;
    // A partial table compares methods on the same windows: those every method finished.
    let finished_by_all = |w: usize, di: usize, wi: usize| {
        job.methods
            .iter()
            .all(|m| done.contains_key(&window_key(&m.name, w, di, wi)))
    };
    let mut in_table: HashSet<(usize, usize, usize)> = HashSet::new();
    for &w in &s.lengths {
        for (di, doc) in job.docs.iter().enumerate() {
            for wi in 0..window_starts(doc.tokens.len(), w, s.windows).len() {
                if finished_by_all(w, di, wi) {
                    in_table.insert((w, di, wi));
                }
            }
        }
    }
    // A partial run's coverage is what was done, not what was planned.
    let mut coverage = coverage;
    if !complete {
        for c in &mut coverage {
            let done_here: Vec<usize> = in_table
                .iter()
                .filter(|(w, _, _)| *w == c.length)
                .map(|(_, di, _)| *di)
                .collect();
            c.windows = done_here.len();
            c.docs_used = done_here.iter().collect::<HashSet<_>>().len();
        }
    }
    let mut windows = Vec::with_capacity(done.len());
    let mut rows = Vec::new();
    for m in job.methods {
        for &w in &s.lengths {
            let mut sum = 0.0;
            let mut n = 0usize;
            for (di, doc) in job.docs.iter().enumerate() {
                for wi in 0..window_starts(doc.tokens.len(), w, s.windows).len() {
                    if let Some(r) = done.remove(&window_key(&m.name, w, di, wi)) {
                        if in_table.contains(&(w, di, wi)) {
                            sum += r.mean_nll;
                            n += 1;
                        }
                        windows.push(r);
                    }
                }
            }
            let mean = (n > 0).then(|| sum / n as f64);
            rows.push(PplRow {
                method: m.name.clone(),
                length: w,
                perplexity: mean.map(f64::exp),
                mean_nll: mean,
                windows: n,
            });
        }
    }
    let report = PplReport {
        methods: job.methods.iter().map(|m| m.name.clone()).collect(),
        pred_len: s.pred_len,
        windows,
        rows,
        coverage,
        resumed,
        complete,
        out_dir: job.out_dir.to_path_buf(),
    };
    if complete {
        write_outputs(job, &report)?;
    }
    Ok(report)
}

fn write_outputs(job: &PplJob, report: &PplReport) -> Result<()> {
    let dir = job.out_dir;
    atomic_write_json(&dir.join(files::RESULTS_JSON), &report.windows)?;
    atomic_write_json(&dir.join(files::SUMMARY_JSON), &summary_json(job, report))?;
    let series: Vec<LineSeries> = report
        .methods
        .iter()
        .map(|m| LineSeries {
            name: m.clone(),
            points: report
                .rows
                .iter()
                .filter(|r| &r.method == m)
                .filter_map(|r| r.perplexity.map(|p| (r.length as f64, p)))
                .collect(),
        })
        .collect();
    ppl_line_plot(
        &dir.join(files::PLOT_PNG),
        &format!("{} — perplexity vs context length", job.model.name()),
        &series,
    )
}

/// The summary written to `summary.json`.
pub fn summary_json(job: &PplJob, report: &PplReport) -> Value {
    json!({
        "eval": "perplexity",
        "model": job.model.name(),
        "documents": job.docs.len(),
        "lengths": job.settings.lengths,
        "windows_per_document": job.settings.windows,
        "pred_len": job.settings.pred_len,
        "length_unit": "tokens; k = 1024",
        "methods": job.methods,
        "coverage": report.coverage,
        "perplexity": report.rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_hand_cases() {
        assert_eq!(window_stride(1000, 100, 10), 90);
        assert_eq!(window_stride(100, 100, 10), 10); // max(0, 10)
        assert_eq!(window_stride(150, 100, 10), 10); // max(5, 10)
        assert_eq!(window_stride(10_000, 1024, 10), 897); // 8976 / 10
        assert_eq!(window_stride(1_000_000, 61_440, 10), 93_856); // 938560 / 10
        assert_eq!(window_stride(1107, 1024, 3), 27); // 83 / 3
    }

    #[test]
    fn window_hand_cases() {
        // 10 windows, stride 90: 0, 90, …, 810 (810 + 100 = 910 ≤ 1000).
        assert_eq!(
            window_starts(1000, 100, 10),
            vec![0, 90, 180, 270, 360, 450, 540, 630, 720, 810]
        );
        // Exactly w tokens: one window.
        assert_eq!(window_starts(100, 100, 10), vec![0]);
        // Stride floored at 10: 0..=50 (50 + 100 = 150), six windows.
        assert_eq!(window_starts(150, 100, 10), vec![0, 10, 20, 30, 40, 50]);
        // 105 tokens: stride 10, only 0 fits (10 + 100 > 105).
        assert_eq!(window_starts(105, 100, 10), vec![0]);
        // Shorter than w: none.
        assert!(window_starts(99, 100, 10).is_empty());
        // One window asked.
        assert_eq!(window_starts(5000, 1024, 1), vec![0]);
        // 1107 tokens, w 1024, 3 windows: stride 27 → 0, 27, 54 (54 + 1024 = 1078).
        assert_eq!(window_starts(1107, 1024, 3), vec![0, 27, 54]);
        assert!(window_starts(1000, 100, 0).is_empty());
    }

    #[test]
    fn default_lengths_use_k_1024() {
        let s = PplSettings::default();
        assert_eq!(s.lengths[0], 1024);
        assert_eq!(s.lengths[3], 10_240);
        assert_eq!(*s.lengths.last().unwrap(), 61_440);
    }
}
