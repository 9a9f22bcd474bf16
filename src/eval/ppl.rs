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
use super::sweep::{
    field, run_sweep, Shard, Sweep, SweepOutcome, SweepSetup, SweepUnits, Throughput,
};
use super::EvalModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashSet;
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
    /// False when the run (or its shard) was interrupted; then no summary or plot is written.
    pub complete: bool,
    /// The shard this run covers: a complete shard writes no summary (merge does).
    pub shard: Option<Shard>,
    /// What this invocation ran, and how fast.
    pub throughput: Throughput,
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
    /// Copies of the model on further devices: with any, one worker runs per model.
    pub extra_workers: &'a [&'a dyn EvalModel],
    /// Tokenized documents.
    pub docs: &'a [TokenizedDoc],
    /// Lengths, windows and pred-len.
    pub settings: &'a PplSettings,
    /// The methods, side by side on identical windows.
    pub methods: &'a [Method],
    /// The run folder (resumed when it already holds this run).
    pub out_dir: &'a Path,
    /// Progress, interruption, batching and the shard.
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
                // Each document's length decides its windows: a merge lists them from this.
                "document_tokens": self.docs.iter().map(|d| d.tokens.len()).collect::<Vec<_>>(),
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

/// One work unit: window `window` (at token `start`) of document `doc` at context length
/// `length`, under method `method` (an index into the run's methods).
#[derive(Debug, Clone, PartialEq)]
pub struct PplUnit {
    pub method: usize,
    pub length: usize,
    pub doc: usize,
    pub window: usize,
    pub start: usize,
}

/// What a perplexity run is, read back from its `run.json`: enough to list its units and
/// write its report without the model or the documents.
#[derive(Debug, Clone)]
pub struct PplPlan {
    pub model_name: String,
    /// Tokens of each document, in load order.
    pub document_tokens: Vec<usize>,
    pub settings: PplSettings,
    pub methods: Vec<Method>,
    /// In canonical order: length, document, window, then method.
    units: Vec<PplUnit>,
}

impl PplPlan {
    /// The plan a perplexity `run.json` (without its shard) describes.
    pub fn from_run_settings(v: &Value) -> Result<Self> {
        if v.get("eval").and_then(Value::as_str) != Some("perplexity") {
            bail!("run.json does not describe a perplexity run");
        }
        let settings = PplSettings {
            lengths: field(v, "lengths")?,
            windows: field(v, "windows")?,
            pred_len: field(v, "pred_len")?,
        };
        let methods: Vec<Method> = field(v, "methods")?;
        let document_tokens: Vec<usize> = field(&field::<Value>(v, "data")?, "document_tokens")?;
        let mut units = Vec::new();
        for &length in &settings.lengths {
            for (doc, &tokens) in document_tokens.iter().enumerate() {
                for (window, start) in window_starts(tokens, length, settings.windows)
                    .into_iter()
                    .enumerate()
                {
                    for method in 0..methods.len() {
                        units.push(PplUnit {
                            method,
                            length,
                            doc,
                            window,
                            start,
                        });
                    }
                }
            }
        }
        Ok(PplPlan {
            model_name: field::<Value>(v, "model")?
                .get("name")
                .and_then(Value::as_str)
                .context("run.json: the model has no name")?
                .to_string(),
            document_tokens,
            settings,
            methods,
            units,
        })
    }

    fn windows_of(&self, doc: usize, length: usize) -> usize {
        window_starts(self.document_tokens[doc], length, self.settings.windows).len()
    }

    /// Document coverage per length, as planned.
    fn coverage(&self) -> Vec<LengthCoverage> {
        let docs = self.document_tokens.len();
        self.settings
            .lengths
            .iter()
            .map(|&w| {
                let used = self.document_tokens.iter().filter(|&&t| t >= w).count();
                LengthCoverage {
                    length: w,
                    docs_used: used,
                    docs_skipped: docs - used,
                    windows: (0..docs).map(|d| self.windows_of(d, w)).sum(),
                }
            })
            .collect()
    }

    /// The report of a run's finished windows. A partial run (or a shard) counts only the
    /// windows every method finished, and its coverage is what was done.
    pub fn report(&self, mut outcome: SweepOutcome<WindowResult>, out_dir: &Path) -> PplReport {
        let s = &self.settings;
        let complete = outcome.complete();
        let whole = complete && outcome.shard.is_none();
        let done = &outcome.done;
        let finished_by_all = |w: usize, di: usize, wi: usize| {
            self.methods
                .iter()
                .all(|m| done.contains_key(&window_id(&m.name, w, di, wi)))
        };
        let mut in_table: HashSet<(usize, usize, usize)> = HashSet::new();
        for &w in &s.lengths {
            for di in 0..self.document_tokens.len() {
                for wi in 0..self.windows_of(di, w) {
                    if finished_by_all(w, di, wi) {
                        in_table.insert((w, di, wi));
                    }
                }
            }
        }
        let mut coverage = self.coverage();
        if !whole {
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
        let mut windows = Vec::with_capacity(outcome.done.len());
        let mut rows = Vec::new();
        for m in &self.methods {
            for &w in &s.lengths {
                let mut sum = 0.0;
                let mut n = 0usize;
                for di in 0..self.document_tokens.len() {
                    for wi in 0..self.windows_of(di, w) {
                        if let Some(r) = outcome.done.remove(&window_id(&m.name, w, di, wi)) {
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
        PplReport {
            methods: self.methods.iter().map(|m| m.name.clone()).collect(),
            pred_len: s.pred_len,
            windows,
            rows,
            coverage,
            resumed: outcome.resumed,
            complete,
            shard: outcome.shard,
            throughput: outcome.throughput(),
            out_dir: out_dir.to_path_buf(),
        }
    }

    /// Writes `results.json`, `summary.json` and `perplexity.png` of a complete run.
    pub fn write_outputs(&self, dir: &Path, report: &PplReport) -> Result<()> {
        atomic_write_json(&dir.join(files::RESULTS_JSON), &report.windows)?;
        atomic_write_json(&dir.join(files::SUMMARY_JSON), &self.summary_json(report))?;
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
            &format!("{} — perplexity vs context length", self.model_name),
            &series,
        )
    }

    /// The summary written to `summary.json`.
    pub fn summary_json(&self, report: &PplReport) -> Value {
        json!({
            "eval": "perplexity",
            "model": self.model_name,
            "documents": self.document_tokens.len(),
            "lengths": self.settings.lengths,
            "windows_per_document": self.settings.windows,
            "pred_len": self.settings.pred_len,
            "length_unit": "tokens; k = 1024",
            "methods": self.methods,
            "coverage": report.coverage,
            "perplexity": report.rows,
        })
    }
}

fn window_id(method: &str, length: usize, doc: usize, window: usize) -> String {
    format!("{method}\u{1f}{length}\u{1f}{doc}\u{1f}{window}")
}

impl SweepUnits for PplPlan {
    type Unit = PplUnit;
    type Record = WindowResult;
    const UNIT_NAME: &'static str = "windows";

    fn units(&self) -> &[PplUnit] {
        &self.units
    }

    fn unit_id(&self, u: &PplUnit) -> String {
        window_id(&self.methods[u.method].name, u.length, u.doc, u.window)
    }

    fn record_id(&self, r: &WindowResult) -> String {
        window_id(&r.method, r.length, r.doc, r.window)
    }

    fn describe(&self, u: &PplUnit) -> String {
        format!(
            "{} at length {}, document {} window {}",
            self.methods[u.method].name, u.length, u.doc, u.window
        )
    }
}

/// The perplexity sweep: the plan's windows, scored on the documents.
struct PplSweep<'a> {
    plan: &'a PplPlan,
    docs: &'a [TokenizedDoc],
}

impl SweepUnits for PplSweep<'_> {
    type Unit = PplUnit;
    type Record = WindowResult;
    const UNIT_NAME: &'static str = "windows";

    fn units(&self) -> &[PplUnit] {
        self.plan.units()
    }
    fn unit_id(&self, u: &PplUnit) -> String {
        self.plan.unit_id(u)
    }
    fn record_id(&self, r: &WindowResult) -> String {
        self.plan.record_id(r)
    }
    fn describe(&self, u: &PplUnit) -> String {
        let m = &self.plan.methods[u.method].name;
        let doc = &self.docs[u.doc].name;
        format!(
            "{m} at length {}, document {doc} window {}",
            u.length, u.window
        )
    }
}

impl Sweep for PplSweep<'_> {
    fn batch_key(&self, u: &PplUnit) -> String {
        format!("{}\u{1f}{}", u.length, u.method)
    }

    fn score(&self, model: &dyn EvalModel, units: &[&PplUnit]) -> Result<Vec<WindowResult>> {
        let pred_len = self.plan.settings.pred_len;
        let method = &self.plan.methods[units[0].method];
        let windows: Vec<&[u32]> = units
            .iter()
            .map(|u| &self.docs[u.doc].tokens[u.start..u.start + u.length])
            .collect();
        let scores = match windows.as_slice() {
            [one] => vec![model.score_tail(one, pred_len, &method.policy)?],
            many => model.score_tails(many, pred_len, &method.policy)?,
        };
        units
            .iter()
            .zip(scores)
            .map(|(u, score)| {
                if score.nll.len() != pred_len {
                    bail!(
                        "the model returned {} NLLs for a window, expected --pred-len {pred_len}",
                        score.nll.len()
                    );
                }
                let mean_nll =
                    score.nll.iter().map(|x| f64::from(*x)).sum::<f64>() / score.nll.len() as f64;
                Ok(WindowResult {
                    method: method.name.clone(),
                    length: u.length,
                    doc: u.doc,
                    doc_name: self.docs[u.doc].name.clone(),
                    window: u.window,
                    start: u.start,
                    mean_nll,
                    scored_tokens: score.nll.len(),
                    forward_secs: score.forward_secs,
                    kept_per_layer: score.kept_per_layer,
                })
            })
            .collect()
    }
}

/// Runs (or resumes) the perplexity evaluation (or its shard), streaming each window to
/// `results.jsonl`; when the whole run is complete, writes `results.json`, `summary.json`
/// and `perplexity.png` atomically.
pub fn run_ppl(job: &PplJob) -> Result<PplReport> {
    job.validate()?;
    let settings = job.run_settings()?;
    // The plan is read back from the settings, as `merge` reads it.
    let plan = PplPlan::from_run_settings(&settings)?;
    let sweep = PplSweep {
        plan: &plan,
        docs: job.docs,
    };
    let workers: Vec<&dyn EvalModel> = std::iter::once(job.model)
        .chain(job.extra_workers.iter().copied())
        .collect();
    let outcome = run_sweep(
        &sweep,
        &SweepSetup {
            out_dir: job.out_dir,
            settings: &settings,
            options: job.options,
            workers: &workers,
            label: "perplexity",
        },
    )?;
    let report = plan.report(outcome, job.out_dir);
    if report.complete && report.shard.is_none() {
        plan.write_outputs(job.out_dir, &report)?;
    }
    Ok(report)
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
