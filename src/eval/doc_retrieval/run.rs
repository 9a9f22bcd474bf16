//! Running the document-retrieval evaluation: its settings, its work units (a question at
//! one document count under one method), the sweep that scores them, and the files a
//! finished run writes.

use super::{answered_id, build_prompt, check_num_docs, select_questions, SquadSet};
use crate::eval::common::{atomic_write_json, render_table, Method, RunOptions};
use crate::eval::plot::{linear_line_plot, LineSeries};
use crate::eval::sweep::{
    field, run_sweep, PlanSweep, Shard, Sweep, SweepOutcome, SweepSetup, SweepUnits, Throughput,
};
use crate::eval::{generate_greedy_by_length, EvalModel};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// What a run asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocRetrievalSettings {
    /// Numbers of noise documents N (each prompt holds N + 1 documents).
    pub num_docs: Vec<usize>,
    /// Questions per N.
    pub questions: usize,
    /// Seed of the question choice and of every prompt's draws.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
}

impl Default for DocRetrievalSettings {
    fn default() -> Self {
        DocRetrievalSettings {
            num_docs: super::DEFAULT_NUM_DOCS.to_vec(),
            questions: 100,
            seed: 0,
            max_new_tokens: super::MAX_NEW_TOKENS,
        }
    }
}

/// One finished question (a line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocRetrievalSample {
    /// The method's name.
    pub method: String,
    /// Noise documents N.
    pub num_docs: usize,
    /// The question's row in the split.
    pub question: usize,
    /// SQuAD's id of the question.
    pub question_id: String,
    /// Where the golden document was (0 = first of N + 1).
    pub golden_position: usize,
    /// The target, `{id}|>`.
    pub label: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The generated text.
    pub output: String,
    /// The id before the output's first `|>`, if any.
    pub answer: Option<String>,
    /// Whether the answer is the golden id.
    pub success: bool,
    /// Prefill wall-clock seconds.
    pub prefill_secs: f64,
    /// Tokens kept by each decimating layer (empty for other methods).
    pub kept_per_layer: Vec<usize>,
}

/// One work unit: question `slot` (of the run's questions) with `num_docs` noise
/// documents under method `method` (an index into the run's methods).
#[derive(Debug, Clone, PartialEq)]
pub struct DocRetrievalUnit {
    pub method: usize,
    pub num_docs: usize,
    pub slot: usize,
}

/// A run read back from its `run.json`: enough to list its units and write its report
/// without the model or the data, so a merge of shards writes what one run would.
#[derive(Debug, Clone)]
pub struct DocRetrievalPlan {
    pub model_name: String,
    pub data_source: String,
    pub settings: DocRetrievalSettings,
    /// The question rows, in the order they run.
    pub question_rows: Vec<usize>,
    pub methods: Vec<Method>,
    /// Canonical order: N, question, then method, so the methods of one prompt run one
    /// after another.
    units: Vec<DocRetrievalUnit>,
}

fn sample_id(method: &str, num_docs: usize, row: usize) -> String {
    format!("{method}\u{1f}{num_docs}\u{1f}{row}")
}

/// Hits and totals of one method at one N.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AccuracyCell {
    pub correct: usize,
    pub samples: usize,
}

impl AccuracyCell {
    pub fn accuracy(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.correct as f64 / self.samples as f64)
    }
}

/// What [`run_doc_retrieval`] returns.
#[derive(Debug, Clone)]
pub struct DocRetrievalReport {
    /// Method names, in run order.
    pub methods: Vec<String>,
    /// The document counts.
    pub num_docs: Vec<usize>,
    /// All finished samples, in report order (method, N, question).
    pub samples: Vec<DocRetrievalSample>,
    /// `cells[method][n]`: counted over the questions every method finished.
    pub cells: Vec<Vec<AccuracyCell>>,
    /// Mean prompt tokens per N over the counted questions (`None`: none counted).
    pub mean_tokens: Vec<Option<f64>>,
    /// Samples already on disk when the run started.
    pub resumed: usize,
    /// False when the run (or its shard) was interrupted.
    pub complete: bool,
    /// The shard this run covers: a complete shard writes no summary (merge does).
    pub shard: Option<Shard>,
    /// What this invocation ran, and how fast.
    pub throughput: Throughput,
    /// The run folder.
    pub out_dir: PathBuf,
}

impl DocRetrievalReport {
    /// The terminal table: one row per N, one accuracy column per method.
    pub fn table(&self) -> String {
        let mut header = vec!["noise docs".to_string(), "tokens".to_string()];
        header.extend(self.methods.iter().cloned());
        let rows: Vec<Vec<String>> = self
            .num_docs
            .iter()
            .enumerate()
            .map(|(n, docs)| {
                let mut r = vec![
                    docs.to_string(),
                    self.mean_tokens[n].map_or("-".into(), |t| format!("{t:.0}")),
                ];
                r.extend((0..self.methods.len()).map(|m| {
                    let c = self.cells[m][n];
                    c.accuracy().map_or("-".into(), |a| {
                        format!("{a:.2} ({}/{})", c.correct, c.samples)
                    })
                }));
                r
            })
            .collect();
        format!(
            "document retrieval: exact-match accuracy per number of noise documents (mean prompt tokens)\n{}",
            render_table(&header, &rows)
        )
    }
}

impl DocRetrievalPlan {
    /// The plan a doc-retrieval `run.json` (without its shard) describes.
    pub fn from_run_settings(v: &Value) -> Result<Self> {
        if v.get("eval").and_then(Value::as_str) != Some("doc-retrieval") {
            bail!("run.json does not describe a doc-retrieval run");
        }
        let settings = DocRetrievalSettings {
            num_docs: field(v, "num_docs")?,
            questions: field(v, "questions")?,
            seed: field(v, "seed")?,
            max_new_tokens: field(v, "max_new_tokens")?,
        };
        let question_rows: Vec<usize> = field(v, "question_rows")?;
        let methods: Vec<Method> = field(v, "methods")?;
        let mut units = Vec::new();
        for &num_docs in &settings.num_docs {
            for slot in 0..question_rows.len() {
                for method in 0..methods.len() {
                    units.push(DocRetrievalUnit {
                        method,
                        num_docs,
                        slot,
                    });
                }
            }
        }
        Ok(DocRetrievalPlan {
            model_name: field::<Value>(v, "model")?
                .get("name")
                .and_then(Value::as_str)
                .context("run.json: the model has no name")?
                .to_string(),
            data_source: field::<Value>(v, "data")?
                .get("source")
                .and_then(Value::as_str)
                .context("run.json: the data has no source")?
                .to_string(),
            settings,
            question_rows,
            methods,
            units,
        })
    }

    /// The report of a run's finished samples; partial runs count the questions every
    /// method finished, so methods are compared on the same prompts.
    pub fn report(
        &self,
        mut outcome: SweepOutcome<DocRetrievalSample>,
        out_dir: &Path,
    ) -> DocRetrievalReport {
        let complete = outcome.complete();
        let done = &outcome.done;
        let counted = |docs: usize, row: usize| {
            self.methods
                .iter()
                .all(|m| done.contains_key(&sample_id(&m.name, docs, row)))
        };
        let mut cells =
            vec![vec![AccuracyCell::default(); self.settings.num_docs.len()]; self.methods.len()];
        let mut token_sums = vec![(0usize, 0usize); self.settings.num_docs.len()];
        for (n, &docs) in self.settings.num_docs.iter().enumerate() {
            for &row in &self.question_rows {
                if !counted(docs, row) {
                    continue;
                }
                for (m, method) in self.methods.iter().enumerate() {
                    let r = &done[&sample_id(&method.name, docs, row)];
                    cells[m][n].samples += 1;
                    cells[m][n].correct += usize::from(r.success);
                    if m == 0 {
                        token_sums[n].0 += r.prompt_tokens;
                        token_sums[n].1 += 1;
                    }
                }
            }
        }
        let mut samples = Vec::with_capacity(outcome.done.len());
        for m in &self.methods {
            for &docs in &self.settings.num_docs {
                for &row in &self.question_rows {
                    if let Some(r) = outcome.done.remove(&sample_id(&m.name, docs, row)) {
                        samples.push(r);
                    }
                }
            }
        }
        DocRetrievalReport {
            methods: self.methods.iter().map(|m| m.name.clone()).collect(),
            num_docs: self.settings.num_docs.clone(),
            samples,
            cells,
            mean_tokens: token_sums
                .iter()
                .map(|&(sum, n)| (n > 0).then(|| sum as f64 / n as f64))
                .collect(),
            resumed: outcome.resumed,
            complete,
            shard: outcome.shard,
            throughput: outcome.throughput(),
            out_dir: out_dir.to_path_buf(),
        }
    }

    /// Writes `results.json`, `summary.json` and `accuracy.png` of a complete run.
    pub fn write_outputs(&self, dir: &Path, report: &DocRetrievalReport) -> Result<()> {
        atomic_write_json(&dir.join(files::RESULTS_JSON), &report.samples)?;
        atomic_write_json(&dir.join(files::SUMMARY_JSON), &self.summary_json(report))?;
        let series: Vec<LineSeries> = report
            .methods
            .iter()
            .enumerate()
            .map(|(m, name)| LineSeries {
                name: name.clone(),
                points: report
                    .num_docs
                    .iter()
                    .zip(&report.cells[m])
                    .filter_map(|(&n, c)| c.accuracy().map(|a| (n as f64, a)))
                    .collect(),
            })
            .collect();
        linear_line_plot(
            &dir.join(files::PLOT_PNG),
            &format!("{} — multi-document retrieval (SQuAD v2)", self.model_name),
            ("noise documents", "exact-match accuracy"),
            Some((-0.02, 1.02)),
            &series,
        )
    }

    /// The summary written to `summary.json`.
    pub fn summary_json(&self, report: &DocRetrievalReport) -> Value {
        let methods: Vec<Value> = self
            .methods
            .iter()
            .enumerate()
            .map(|(m, method)| {
                let total = report.cells[m]
                    .iter()
                    .fold(AccuracyCell::default(), |a, c| AccuracyCell {
                        correct: a.correct + c.correct,
                        samples: a.samples + c.samples,
                    });
                let mut v = json!({
                    "method": method.name,
                    "decimation": method.decimation(),
                    "accuracy": total.accuracy(),
                    "correct": total.correct,
                    "samples": total.samples,
                    "per_num_docs": report.num_docs.iter().zip(&report.cells[m]).map(|(n, c)| json!({
                        "num_docs": n, "accuracy": c.accuracy(), "correct": c.correct, "samples": c.samples,
                    })).collect::<Vec<_>>(),
                });
                if let Some(p) = method.policy_json() {
                    v["policy"] = p;
                }
                v
            })
            .collect();
        let tokens: BTreeMap<String, Option<f64>> = report
            .num_docs
            .iter()
            .zip(&report.mean_tokens)
            .map(|(n, t)| (n.to_string(), *t))
            .collect();
        json!({
            "eval": "doc-retrieval",
            "model": self.model_name,
            "data": self.data_source,
            "num_docs": self.settings.num_docs,
            "questions": self.settings.questions,
            "seed": self.settings.seed,
            "max_new_tokens": self.settings.max_new_tokens,
            "mean_prompt_tokens": tokens,
            "methods": methods,
        })
    }
}

impl SweepUnits for DocRetrievalPlan {
    type Unit = DocRetrievalUnit;
    type Record = DocRetrievalSample;
    const UNIT_NAME: &'static str = "questions";

    fn units(&self) -> &[DocRetrievalUnit] {
        &self.units
    }

    fn unit_id(&self, u: &DocRetrievalUnit) -> String {
        sample_id(
            &self.methods[u.method].name,
            u.num_docs,
            self.question_rows[u.slot],
        )
    }

    fn record_id(&self, r: &DocRetrievalSample) -> String {
        sample_id(&r.method, r.num_docs, r.question)
    }

    fn describe(&self, u: &DocRetrievalUnit) -> String {
        format!(
            "{} with {} noise documents, question {} (row {})",
            self.methods[u.method].name, u.num_docs, u.slot, self.question_rows[u.slot]
        )
    }
}

/// The sweep: the plan's units, scored on prompts built from the split.
struct DocRetrievalSweep<'a> {
    plan: &'a DocRetrievalPlan,
    set: &'a SquadSet,
}

impl PlanSweep for DocRetrievalSweep<'_> {
    type Plan = DocRetrievalPlan;
    fn plan(&self) -> &DocRetrievalPlan {
        self.plan
    }
}

impl Sweep for DocRetrievalSweep<'_> {
    /// Prompts of one N and method; within a batch, those of equal token length run
    /// together (the model batches only equal lengths).
    fn batch_key(&self, u: &DocRetrievalUnit) -> String {
        format!("{}\u{1f}{}", u.num_docs, u.method)
    }

    fn score(
        &self,
        model: &dyn EvalModel,
        units: &[&DocRetrievalUnit],
    ) -> Result<Vec<DocRetrievalSample>> {
        let s = &self.plan.settings;
        let method = &self.plan.methods[units[0].method];
        let mut prompts = Vec::with_capacity(units.len());
        for u in units {
            let row = self.plan.question_rows[u.slot];
            let prompt = build_prompt(self.set, row, u.num_docs, s.seed)?;
            let ids = model.encode(&prompt.text)?;
            prompts.push((row, prompt, ids));
        }
        let ids: Vec<&[u32]> = prompts.iter().map(|p| p.2.as_slice()).collect();
        let outputs = generate_greedy_by_length(model, &ids, s.max_new_tokens, &method.policy)?;
        units
            .iter()
            .zip(prompts)
            .zip(outputs)
            .map(|((u, (row, prompt, ids)), out)| {
                let answer = answered_id(&out.text).map(str::to_string);
                Ok(DocRetrievalSample {
                    method: method.name.clone(),
                    num_docs: u.num_docs,
                    question: row,
                    question_id: self.set.questions[row].id.clone(),
                    golden_position: prompt.golden_position,
                    label: prompt.label(),
                    prompt_tokens: ids.len(),
                    success: answer.as_deref() == Some(prompt.golden_id.to_string().as_str()),
                    answer,
                    output: out.text,
                    prefill_secs: out.prefill_secs,
                    kept_per_layer: out.kept_per_layer,
                })
            })
            .collect()
    }
}

/// Everything a doc-retrieval run needs.
pub struct DocRetrievalJob<'a> {
    /// The model.
    pub model: &'a dyn EvalModel,
    /// Copies of the model on further devices: with any, one worker runs per model.
    pub extra_workers: &'a [&'a dyn EvalModel],
    /// The SQuAD v2 split.
    pub set: &'a SquadSet,
    /// Document counts, questions, seed.
    pub settings: &'a DocRetrievalSettings,
    /// The methods, side by side on identical prompts.
    pub methods: &'a [Method],
    /// The run folder (resumed when it already holds this run).
    pub out_dir: &'a Path,
    /// Progress, interruption, batching and the shard.
    pub options: &'a RunOptions,
}

/// File names inside a doc-retrieval run folder.
pub mod files {
    /// All samples, in report order.
    pub const RESULTS_JSON: &str = "results.json";
    /// Accuracy per method and N.
    pub const SUMMARY_JSON: &str = "summary.json";
    /// Accuracy against N.
    pub const PLOT_PNG: &str = "accuracy.png";
}

/// Checks the settings and methods against the split; returns the question rows.
pub fn validate_settings(
    set: &SquadSet,
    s: &DocRetrievalSettings,
    methods: &[Method],
) -> Result<Vec<usize>> {
    if s.num_docs.is_empty() {
        bail!("--num-docs is empty: give at least one number of noise documents");
    }
    if s.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if methods.is_empty() {
        bail!("no method to run");
    }
    let names: HashSet<&str> = methods.iter().map(|m| m.name.as_str()).collect();
    if names.len() != methods.len() {
        bail!("method names must be distinct");
    }
    let distinct: HashSet<usize> = s.num_docs.iter().copied().collect();
    if distinct.len() != s.num_docs.len() {
        bail!("--num-docs lists a number twice");
    }
    for &n in &s.num_docs {
        check_num_docs(set, n)?;
    }
    select_questions(set, s.questions, s.seed)
}

impl DocRetrievalJob<'_> {
    /// The settings recorded in `run.json`; a rerun must match them to resume.
    pub fn run_settings(&self, question_rows: &[usize]) -> Result<Value> {
        Ok(json!({
            "eval": "doc-retrieval",
            "model": self.model.identity()?,
            "data": {
                "source": self.set.source,
                "rows": self.set.questions.len(),
                "paragraphs": self.set.contexts.len(),
                "fnv1a64": self.set.fingerprint(),
            },
            "num_docs": self.settings.num_docs,
            "questions": self.settings.questions,
            "seed": self.settings.seed,
            "max_new_tokens": self.settings.max_new_tokens,
            "question_rows": question_rows,
            "methods": self.methods,
        }))
    }
}

/// The longest prompt a run can build, in tokens, bounded from above without building
/// them all: the N + 1 longest paragraphs with the longest question, for the largest N.
pub fn longest_prompt_bound(
    model: &dyn EvalModel,
    set: &SquadSet,
    settings: &DocRetrievalSettings,
    question_rows: &[usize],
) -> Result<usize> {
    let n = settings.num_docs.iter().copied().max().unwrap_or(0) + 1;
    let mut lengths: Vec<usize> = set
        .contexts
        .iter()
        .map(|c| model.encode(c).map(|t| t.len()))
        .collect::<Result<_>>()?;
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    let question = question_rows
        .iter()
        .map(|&r| model.encode(&set.questions[r].question).map(|t| t.len()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    // Per document: the question, " <|Query|> ", " <|Document 999|> " (a generous 16).
    let frame = model.encode(" <|Query|>  <|Document 999|> ")?.len() + 4;
    let closing = model.encode(super::ANSWER_PREFIX)?.len();
    Ok(lengths.iter().take(n).sum::<usize>() + n * (question + frame) + closing)
}

/// Runs (or resumes) the evaluation (or its shard), streaming each sample to
/// `results.jsonl`; when every unit is done, writes `results.json`, `summary.json` and
/// `accuracy.png` atomically.
pub fn run_doc_retrieval(job: &DocRetrievalJob) -> Result<DocRetrievalReport> {
    let question_rows = validate_settings(job.set, job.settings, job.methods)?;
    let settings = job.run_settings(&question_rows)?;
    // The plan is read back from the settings, as `merge` reads it.
    let plan = DocRetrievalPlan::from_run_settings(&settings)?;
    let sweep = DocRetrievalSweep {
        plan: &plan,
        set: job.set,
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
            label: "doc-retrieval",
        },
    )?;
    let report = plan.report(outcome, job.out_dir);
    if report.complete && report.shard.is_none() {
        plan.write_outputs(job.out_dir, &report)?;
    }
    Ok(report)
}
