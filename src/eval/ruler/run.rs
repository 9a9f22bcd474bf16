//! Running RULER: its settings, its work units (a sample of one task at one length under
//! one method), the sweep that scores them, and the files a finished run writes.

use super::generate::{generate_with, py_format, TokenCounter, VT_EXAMPLE_TOKENS};
use super::{round2, task_score, RulerSample, RulerTask};
use crate::eval::common::{atomic_write_json, format_length, render_table, Method, RunOptions};
use crate::eval::plot::{passkey_heatmap, HeatmapPanel};
use crate::eval::sweep::{
    field, run_sweep, PlanSweep, Shard, Sweep, SweepOutcome, SweepSetup, SweepUnits, Throughput,
};
use crate::eval::{generate_greedy_by_length, EvalModel};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The generator whose prompts `ruler` reproduces (templates, draws and scoring).
pub const GENERATOR: &str = "NVIDIA/RULER c3f5e3b (scripts/data/synthetic, base template)";

/// What a RULER run covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulerSettings {
    pub tasks: Vec<RulerTask>,
    /// Sequence lengths in the model's tokens: prompt plus tokens to generate.
    pub lengths: Vec<usize>,
    /// Samples per task and length.
    pub samples: usize,
    /// RULER's `--random_seed` (42 in RULER's scripts).
    pub seed: u64,
    /// The token budget of vt's in-context example (RULER: 500).
    pub vt_example_tokens: usize,
}

impl Default for RulerSettings {
    fn default() -> Self {
        RulerSettings {
            tasks: RulerTask::ALL.to_vec(),
            lengths: (2..8).map(|i| 1024usize << i).collect(),
            samples: 500,
            seed: 42,
            vt_example_tokens: VT_EXAMPLE_TOKENS,
        }
    }
}

/// One finished sample (a line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulerRecord {
    pub method: String,
    pub task: RulerTask,
    /// The length asked for.
    pub length: usize,
    pub sample: usize,
    /// Tokens in the prompt (input and answer prefix).
    pub prompt_tokens: usize,
    /// What the answer must contain.
    pub references: Vec<String>,
    /// The generated text.
    pub output: String,
    /// RULER's per-sample score in [0, 1]: the fraction of references found.
    pub score: f64,
    pub prefill_secs: f64,
    /// Tokens kept by each decimating layer (empty for other methods).
    pub kept_per_layer: Vec<usize>,
}

/// One work unit.
#[derive(Debug, Clone, PartialEq)]
pub struct RulerUnit {
    pub method: usize,
    pub task: RulerTask,
    pub length: usize,
    pub sample: usize,
}

/// A RULER run read back from its `run.json`, enough to list its units and write its
/// report without a model (for `merge`).
#[derive(Debug, Clone)]
pub struct RulerPlan {
    pub model_name: String,
    pub settings: RulerSettings,
    pub methods: Vec<Method>,
    /// Canonical order: task, length, sample, then method (methods of one prompt together).
    units: Vec<RulerUnit>,
}

fn unit_key(method: &str, task: RulerTask, length: usize, sample: usize) -> String {
    format!("{method}\u{1f}{task}\u{1f}{length}\u{1f}{sample}")
}

impl RulerPlan {
    /// The plan a RULER `run.json` (without its shard) describes.
    pub fn from_run_settings(v: &Value) -> Result<Self> {
        if v.get("eval").and_then(Value::as_str) != Some("ruler") {
            bail!("run.json does not describe a RULER run");
        }
        let settings = RulerSettings {
            tasks: field(v, "tasks")?,
            lengths: field(v, "lengths")?,
            samples: field(v, "samples")?,
            seed: field(v, "seed")?,
            vt_example_tokens: field(v, "vt_example_tokens")?,
        };
        let methods: Vec<Method> = field(v, "methods")?;
        let mut units = Vec::new();
        for &task in &settings.tasks {
            for &length in &settings.lengths {
                for sample in 0..settings.samples {
                    for method in 0..methods.len() {
                        units.push(RulerUnit {
                            method,
                            task,
                            length,
                            sample,
                        });
                    }
                }
            }
        }
        Ok(RulerPlan {
            model_name: field::<Value>(v, "model")?
                .get("name")
                .and_then(Value::as_str)
                .context("run.json: the model has no name")?
                .to_string(),
            settings,
            methods,
            units,
        })
    }

    /// The report of the finished samples. A partial run counts only the samples every
    /// method finished, so methods are compared on the same prompts.
    pub fn report(&self, mut outcome: SweepOutcome<RulerRecord>, out_dir: &Path) -> RulerReport {
        let complete = outcome.complete();
        let records: Vec<RulerRecord> = self
            .units
            .iter()
            .filter_map(|u| outcome.done.remove(&self.unit_id(u)))
            .collect();
        let counted: Vec<&RulerRecord> = if complete && outcome.shard.is_none() {
            records.iter().collect()
        } else {
            let mut finished: HashMap<String, usize> = HashMap::new();
            for r in &records {
                *finished
                    .entry(unit_key("", r.task, r.length, r.sample))
                    .or_default() += 1;
            }
            records
                .iter()
                .filter(|r| {
                    finished[&unit_key("", r.task, r.length, r.sample)] == self.methods.len()
                })
                .collect()
        };
        let scores = ScoreTable::from_records(self, &counted);
        RulerReport {
            records,
            scores,
            resumed: outcome.resumed,
            complete,
            shard: outcome.shard,
            throughput: outcome.throughput(),
            out_dir: out_dir.to_path_buf(),
        }
    }

    /// Writes `results.json`, `summary.json` and `heatmap.png` of a complete run.
    pub fn write_outputs(&self, dir: &Path, report: &RulerReport) -> Result<()> {
        atomic_write_json(&dir.join(files::RESULTS_JSON), &report.records)?;
        atomic_write_json(
            &dir.join(files::SUMMARY_JSON),
            &self.summary_json(&report.scores),
        )?;
        passkey_heatmap(
            &dir.join(files::HEATMAP_PNG),
            &report.scores.panels(&self.model_name),
        )?;
        Ok(())
    }

    /// The summary written to `summary.json`: RULER's scores (0–100, two decimals).
    pub fn summary_json(&self, t: &ScoreTable) -> Value {
        let methods: Vec<Value> = self
            .methods
            .iter()
            .enumerate()
            .map(|(m, method)| {
                let mut v = json!({
                    "method": method.name,
                    "decimation": method.decimation(),
                    "average": t.overall(m),
                    "per_length": t.lengths.iter().enumerate().map(|(l, len)| {
                        json!({"length": len, "average": t.length_average(m, l)})
                    }).collect::<Vec<_>>(),
                    "tasks": t.tasks.iter().enumerate().map(|(k, task)| {
                        json!({
                            "task": task,
                            "average": t.task_average(m, k),
                            "scores": t.cells[m][k].iter().map(|c| c.map(|c| c.score)).collect::<Vec<_>>(),
                            "samples": t.cells[m][k].iter().map(|c| c.map(|c| c.samples).unwrap_or(0)).collect::<Vec<_>>(),
                        })
                    }).collect::<Vec<_>>(),
                });
                if let Some(p) = method.policy_json() {
                    v["policy"] = p;
                }
                v
            })
            .collect();
        json!({
            "eval": "ruler",
            "generator": GENERATOR,
            "model": self.model_name,
            "lengths": t.lengths,
            "tasks": t.tasks,
            "samples_per_task": self.settings.samples,
            "seed": self.settings.seed,
            "vt_example_tokens": self.settings.vt_example_tokens,
            "metric": "string_match_all, mean × 100, two decimals",
            "methods": methods,
        })
    }
}

impl SweepUnits for RulerPlan {
    type Unit = RulerUnit;
    type Record = RulerRecord;
    const UNIT_NAME: &'static str = "samples";

    fn units(&self) -> &[RulerUnit] {
        &self.units
    }
    fn unit_id(&self, u: &RulerUnit) -> String {
        unit_key(&self.methods[u.method].name, u.task, u.length, u.sample)
    }
    fn record_id(&self, r: &RulerRecord) -> String {
        unit_key(&r.method, r.task, r.length, r.sample)
    }
    fn describe(&self, u: &RulerUnit) -> String {
        format!(
            "{} on {} at length {}, sample {}",
            self.methods[u.method].name, u.task, u.length, u.sample
        )
    }
}

/// One (method, task, length) cell: RULER's score and how many samples it averages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub score: f64,
    pub samples: usize,
}

/// Scores per method, task and length.
#[derive(Debug, Clone)]
pub struct ScoreTable {
    pub methods: Vec<String>,
    pub tasks: Vec<RulerTask>,
    pub lengths: Vec<usize>,
    /// `cells[method][task][length]`; `None` without samples.
    pub cells: Vec<Vec<Vec<Option<Cell>>>>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| round2(v.iter().sum::<f64>() / v.len() as f64))
}

impl ScoreTable {
    fn from_records(plan: &RulerPlan, records: &[&RulerRecord]) -> Self {
        let s = &plan.settings;
        let mut per: HashMap<(String, RulerTask, usize), Vec<f64>> = HashMap::new();
        for r in records {
            per.entry((r.method.clone(), r.task, r.length))
                .or_default()
                .push(r.score);
        }
        let cells = plan
            .methods
            .iter()
            .map(|m| {
                s.tasks
                    .iter()
                    .map(|&task| {
                        s.lengths
                            .iter()
                            .map(|&length| {
                                per.get(&(m.name.clone(), task, length)).map(|v| Cell {
                                    score: task_score(v),
                                    samples: v.len(),
                                })
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        ScoreTable {
            methods: plan.methods.iter().map(|m| m.name.clone()).collect(),
            tasks: s.tasks.clone(),
            lengths: s.lengths.clone(),
            cells,
        }
    }

    /// A task's mean over lengths.
    pub fn task_average(&self, m: usize, k: usize) -> Option<f64> {
        mean(self.cells[m][k].iter().flatten().map(|c| c.score))
    }

    /// A length's mean over tasks (RULER's headline per length).
    pub fn length_average(&self, m: usize, l: usize) -> Option<f64> {
        mean(
            self.cells[m]
                .iter()
                .filter_map(|row| row[l])
                .map(|c| c.score),
        )
    }

    /// The mean over every task and length.
    pub fn overall(&self, m: usize) -> Option<f64> {
        mean(self.cells[m].iter().flatten().flatten().map(|c| c.score))
    }

    /// One table per method: tasks by lengths, with averages.
    pub fn table(&self) -> String {
        let show = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let mut header = vec!["method / task".to_string()];
        header.extend(self.lengths.iter().map(|l| format_length(*l)));
        header.push("avg".into());
        let mut rows = Vec::new();
        for (m, name) in self.methods.iter().enumerate() {
            for (k, task) in self.tasks.iter().enumerate() {
                let mut row = vec![format!("{name} / {task}")];
                row.extend(self.cells[m][k].iter().map(|c| show(c.map(|c| c.score))));
                row.push(show(self.task_average(m, k)));
                rows.push(row);
            }
            let mut row = vec![format!("{name} / average")];
            row.extend((0..self.lengths.len()).map(|l| show(self.length_average(m, l))));
            row.push(show(self.overall(m)));
            rows.push(row);
        }
        render_table(&header, &rows)
    }

    /// Heatmap panels, one per method: tasks (and their average) by lengths.
    pub fn panels(&self, model_name: &str) -> Vec<HeatmapPanel> {
        (0..self.methods.len())
            .map(|m| {
                let mut values: Vec<Vec<Option<f64>>> = self.cells[m]
                    .iter()
                    .map(|row| row.iter().map(|c| c.map(|c| c.score / 100.0)).collect())
                    .collect();
                values.push(
                    (0..self.lengths.len())
                        .map(|l| self.length_average(m, l).map(|v| v / 100.0))
                        .collect(),
                );
                let mut y_labels: Vec<String> = self.tasks.iter().map(|t| t.to_string()).collect();
                y_labels.push("average".into());
                HeatmapPanel {
                    title: format!("{model_name} — {} (RULER)", self.methods[m]),
                    x_labels: self.lengths.iter().map(|l| format_length(*l)).collect(),
                    y_labels,
                    values,
                }
            })
            .collect()
    }
}

/// The sweep: the plan's units, scored on samples generated when first needed.
struct RulerSweep<'a> {
    plan: &'a RulerPlan,
    /// The latest (task, length) sample sets. Units come in task and length order, so a set
    /// per worker and one more cover every worker; one evicted too early is generated again
    /// (the same).
    samples: Mutex<VecDeque<CachedSet>>,
    /// How many sets to keep: `CACHED_SETS` or workers + 1.
    cached_sets: usize,
}

/// The samples of `task` at `length` under `settings`.
fn build_samples(
    settings: &RulerSettings,
    task: RulerTask,
    length: usize,
    samples: usize,
    count: TokenCounter,
) -> Result<Vec<RulerSample>> {
    generate_with(
        task,
        length,
        samples,
        settings.seed,
        settings.vt_example_tokens,
        count,
    )
    .with_context(|| format!("cannot build RULER's {task} prompts at length {length}"))
}

/// One (task, length)'s samples, shared by the workers.
type CachedSet = ((RulerTask, usize), Arc<Vec<RulerSample>>);

/// Sample sets kept in memory at least (a set of 500 samples at 128K tokens is hundreds of
/// MB of text).
const CACHED_SETS: usize = 2;

impl RulerSweep<'_> {
    fn samples_of(
        &self,
        model: &dyn EvalModel,
        task: RulerTask,
        length: usize,
    ) -> Result<Arc<Vec<RulerSample>>> {
        let mut cache = self
            .samples
            .lock()
            .map_err(|_| anyhow::anyhow!("a worker failed while building RULER prompts"))?;
        if let Some((_, set)) = cache.iter().find(|(k, _)| *k == (task, length)) {
            return Ok(set.clone());
        }
        let count = |text: &str| -> Result<usize> { Ok(model.encode(text)?.len()) };
        let s = &self.plan.settings;
        let set = Arc::new(build_samples(s, task, length, s.samples, &count)?);
        if cache.len() >= self.cached_sets {
            cache.pop_front();
        }
        cache.push_back(((task, length), set.clone()));
        Ok(set)
    }
}

impl PlanSweep for RulerSweep<'_> {
    type Plan = RulerPlan;
    fn plan(&self) -> &RulerPlan {
        self.plan
    }
}

impl Sweep for RulerSweep<'_> {
    /// Units of one task, length and method; `score` splits a batch by prompt length.
    fn batch_key(&self, u: &RulerUnit) -> String {
        format!("{}\u{1f}{}\u{1f}{}", u.task, u.length, u.method)
    }

    fn score(&self, model: &dyn EvalModel, units: &[&RulerUnit]) -> Result<Vec<RulerRecord>> {
        let (task, length) = (units[0].task, units[0].length);
        let set = self.samples_of(model, task, length)?;
        let samples: Vec<&RulerSample> = units
            .iter()
            .map(|u| {
                set.get(u.sample)
                    .with_context(|| format!("no generated sample for {}", self.plan.describe(u)))
            })
            .collect::<Result<_>>()?;
        let ids: Vec<Vec<u32>> = samples
            .iter()
            .map(|s| model.encode(&s.prompt()))
            .collect::<Result<_>>()?;
        let method = &self.plan.methods[units[0].method];
        let max_new = task.tokens_to_generate();
        let prompts: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let outputs = generate_greedy_by_length(model, &prompts, max_new, &method.policy)?;
        Ok(units
            .iter()
            .zip(samples)
            .zip(ids)
            .zip(outputs)
            .map(|(((u, s), ids), out)| RulerRecord {
                method: method.name.clone(),
                task: u.task,
                length: u.length,
                sample: u.sample,
                prompt_tokens: ids.len(),
                references: s.outputs.clone(),
                score: u.task.score(&out.text, &s.outputs),
                output: out.text,
                prefill_secs: out.prefill_secs,
                kept_per_layer: out.kept_per_layer,
            })
            .collect())
    }
}

/// Everything a RULER run needs.
pub struct RulerJob<'a> {
    pub model: &'a dyn EvalModel,
    /// Copies of the model on further devices: with any, one worker runs per model.
    pub extra_workers: &'a [&'a dyn EvalModel],
    pub settings: &'a RulerSettings,
    /// The methods, side by side on identical prompts.
    pub methods: &'a [Method],
    /// The run folder (resumed when it already holds this run).
    pub out_dir: &'a Path,
    pub options: &'a RunOptions,
}

/// File names inside a RULER run folder.
pub mod files {
    pub const RESULTS_JSON: &str = "results.json";
    pub const SUMMARY_JSON: &str = "summary.json";
    pub const HEATMAP_PNG: &str = "heatmap.png";
}

/// What [`run_ruler`] returns.
#[derive(Debug, Clone)]
pub struct RulerReport {
    /// Finished samples, in canonical order.
    pub records: Vec<RulerRecord>,
    pub scores: ScoreTable,
    pub resumed: usize,
    /// False when interrupted; then no summary or plot is written.
    pub complete: bool,
    pub shard: Option<Shard>,
    pub throughput: Throughput,
    pub out_dir: PathBuf,
}

impl RulerJob<'_> {
    /// The settings recorded in `run.json`; a rerun must match them to resume.
    pub fn run_settings(&self) -> Result<Value> {
        Ok(json!({
            "eval": "ruler",
            "generator": GENERATOR,
            "model": self.model.identity()?,
            "tasks": self.settings.tasks,
            "lengths": self.settings.lengths,
            "samples": self.settings.samples,
            "seed": self.settings.seed,
            "vt_example_tokens": self.settings.vt_example_tokens,
            "methods": self.methods,
        }))
    }

    fn validate(&self) -> Result<()> {
        let s = self.settings;
        if s.tasks.is_empty() || s.lengths.is_empty() {
            bail!("nothing to run: give at least one task and one length");
        }
        if s.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if self.methods.is_empty() {
            bail!("no method to run");
        }
        let names: HashSet<&str> = self.methods.iter().map(|m| m.name.as_str()).collect();
        if names.len() != self.methods.len() {
            bail!("method names must be distinct");
        }
        // Each task's template with an empty context, plus its tokens to generate, must
        // fit the shortest length (RULER would loop forever looking for a haystack).
        let shortest = s.lengths.iter().copied().min().unwrap_or(0);
        for &task in &s.tasks {
            let bare = py_format(
                &format!("{}{}", task.template(), task.answer_prefix()),
                &[
                    ("context", ""),
                    ("query", ""),
                    ("type_needle_v", ""),
                    ("num_v", ""),
                ],
            );
            let needed = self.model.encode(&bare)?.len() + task.tokens_to_generate();
            if shortest < needed {
                bail!(
                    "length {shortest} is too short for RULER's {task}: its template and {} tokens to generate take {needed} tokens",
                    task.tokens_to_generate()
                );
            }
        }
        // One sample at the shortest length (the smallest haystack must fit) and, for cwe,
        // at the longest (the word list must be long enough), before any model time.
        let count = |text: &str| -> Result<usize> { Ok(self.model.encode(text)?.len()) };
        let longest = s.lengths.iter().copied().max().unwrap_or(0);
        for &task in &s.tasks {
            build_samples(s, task, shortest, 1, &count)?;
            if task == RulerTask::Cwe && longest != shortest {
                build_samples(s, task, longest, 1, &count)?;
            }
        }
        Ok(())
    }
}

/// Runs (or resumes) the RULER sweep (or its shard), streaming each sample to
/// `results.jsonl`; when every sample is done, writes `results.json`, `summary.json` and
/// `heatmap.png` atomically.
pub fn run_ruler(job: &RulerJob) -> Result<RulerReport> {
    job.validate()?;
    let settings = job.run_settings()?;
    let plan = RulerPlan::from_run_settings(&settings)?;
    let sweep = RulerSweep {
        plan: &plan,
        samples: Mutex::new(VecDeque::new()),
        cached_sets: CACHED_SETS.max(job.extra_workers.len() + 2),
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
            label: "ruler",
        },
    )?;
    let report = plan.report(outcome, job.out_dir);
    if report.complete && report.shard.is_none() {
        plan.write_outputs(job.out_dir, &report)?;
    }
    Ok(report)
}
