//! Running LongBench or LongBench-E: settings, work units (one sample of one task under one
//! method), the sweep that generates and scores them, and the files a finished run writes.
//!
//! Per sample, as the official `pred.py` (THUDM/LongBench, `get_pred`): the dataset's prompt
//! filled with `context` and `input`; when it has more than `--max-length` tokens, its first
//! and last `int(max_length / 2)` tokens are decoded and the two texts concatenated and
//! encoded again; greedy decoding of at most `dataset2maxlen` new tokens; samsum stops at
//! the newline token as well (`eos_token_id=[eos, encode("\n")[-1]]`; the official
//! `min_length = context + 1`, which forbids those tokens at the first step, is not
//! reproduced: a first-step newline is kept and generation goes on to the next one). No
//! chat template is applied: base Mamba models have none (`pred.py` would skip it for
//! trec, triviaqa, samsum, lsht, lcc and repobench-p anyway). The score is `eval.py`'s:
//! the first line only for trec/triviaqa/samsum/lsht, the best metric over the answers.

use super::data::LongBenchTask;
use super::report::BUCKETS;
pub use super::report::{LongBenchReport, TaskScore};
use super::{
    fill_template, max_new_tokens, mean_score, mean_score_e, prompt_template, score_prediction,
    LengthBucket, Metric, DATASETS, LONGBENCH_E_DATASETS, NEWLINE_STOP_DATASETS,
};
use crate::eval::common::{atomic_write_json, Method, RunOptions};
use crate::eval::plot::{grouped_bar_plot, BarGroups};
use crate::eval::sweep::{
    field, run_sweep, PlanSweep, Sweep, SweepOutcome, SweepSetup, SweepUnits,
};
use crate::eval::{generate_greedy_by_length, EvalModel};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// The six tasks of the paper's Fig. 1 (left).
pub const PAPER_TASKS: [&str; 6] = [
    "multifieldqa_en",
    "gov_report",
    "multi_news",
    "triviaqa",
    "lcc",
    "repobench-p",
];

/// `model2maxlen.json`'s budget for LongBench's 32K-context models (31,500 tokens).
pub const DEFAULT_MAX_LENGTH: usize = 31_500;

/// What a run asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongBenchSettings {
    /// Dataset names (without `_e`).
    pub tasks: Vec<String>,
    /// LongBench-E (`{task}_e.jsonl`, scored per length bucket).
    pub longbench_e: bool,
    /// Prompts longer than this many tokens are cut in the middle.
    pub max_length: usize,
    /// At most this many samples per task (the first of each file); `None`: all.
    pub samples: Option<usize>,
}

/// Checks `--tasks` against the official lists: unknown names (with the valid ones) and
/// the Chinese tasks whose metrics need jieba are refused.
pub fn check_tasks(tasks: &[String], longbench_e: bool) -> Result<()> {
    if tasks.is_empty() {
        bail!("--tasks is empty: name at least one LongBench task");
    }
    let valid: &[&str] = if longbench_e {
        &LONGBENCH_E_DATASETS
    } else {
        &DATASETS
    };
    let mut seen = HashSet::new();
    for t in tasks {
        if !valid.contains(&t.as_str()) {
            bail!(
                "unknown {} task {t:?}; valid tasks: {}",
                if longbench_e {
                    "LongBench-E"
                } else {
                    "LongBench"
                },
                valid.join(", ")
            );
        }
        if !seen.insert(t) {
            bail!("--tasks lists {t} twice");
        }
        let metric = Metric::for_dataset(t)?;
        if !metric.is_implemented() {
            bail!(
                "LongBench task {t} is scored with {}, which needs Python jieba's Chinese word segmentation; decimamba does not implement it, so leave {t} out of --tasks",
                metric.name()
            );
        }
    }
    Ok(())
}

/// One finished sample (a line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongBenchRecord {
    pub method: String,
    pub task: String,
    /// The sample's index in its file.
    pub sample: usize,
    /// Its `_id`.
    pub id: String,
    /// Its `length` field (LongBench-E buckets).
    pub length: usize,
    /// Prompt tokens after truncation.
    pub prompt_tokens: usize,
    /// Whether the prompt was cut in the middle.
    pub truncated: bool,
    /// The generated text (`pred` of pred.py).
    pub prediction: String,
    /// eval.py's score of the prediction, in [0, 1].
    pub score: f64,
    pub prefill_secs: f64,
    pub kept_per_layer: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LongBenchUnit {
    pub method: usize,
    pub task: usize,
    pub sample: usize,
}

fn record_key(method: &str, task: &str, sample: usize) -> String {
    format!("{method}\u{1f}{task}\u{1f}{sample}")
}

/// A run read back from its `run.json`, so a merge writes what one run would.
#[derive(Debug, Clone)]
pub struct LongBenchPlan {
    pub model_name: String,
    pub settings: LongBenchSettings,
    /// Samples run per task.
    pub task_samples: Vec<usize>,
    pub methods: Vec<Method>,
    /// Canonical order: task, sample, then method.
    units: Vec<LongBenchUnit>,
}

impl LongBenchPlan {
    /// The plan a longbench `run.json` (without its shard) describes.
    pub fn from_run_settings(v: &Value) -> Result<Self> {
        if v.get("eval").and_then(Value::as_str) != Some("longbench") {
            bail!("run.json does not describe a longbench run");
        }
        let settings = LongBenchSettings {
            tasks: field(v, "tasks")?,
            longbench_e: field(v, "longbench_e")?,
            max_length: field(v, "max_length")?,
            samples: field(v, "samples")?,
        };
        let task_samples: Vec<usize> = field(v, "task_samples")?;
        if task_samples.len() != settings.tasks.len() {
            bail!("run.json: task_samples does not match tasks");
        }
        let methods: Vec<Method> = field(v, "methods")?;
        let mut units = Vec::new();
        for (task, &n) in task_samples.iter().enumerate() {
            for sample in 0..n {
                for method in 0..methods.len() {
                    units.push(LongBenchUnit {
                        method,
                        task,
                        sample,
                    });
                }
            }
        }
        Ok(LongBenchPlan {
            model_name: field::<Value>(v, "model")?
                .get("name")
                .and_then(Value::as_str)
                .context("run.json: the model has no name")?
                .to_string(),
            settings,
            task_samples,
            methods,
            units,
        })
    }

    /// The report of the finished records; partial runs count the samples every method
    /// finished.
    pub fn report(
        &self,
        mut outcome: SweepOutcome<LongBenchRecord>,
        out_dir: &Path,
    ) -> LongBenchReport {
        let complete = outcome.complete();
        let done = &outcome.done;
        let e = self.settings.longbench_e;
        let scores: Vec<Vec<TaskScore>> = self
            .methods
            .iter()
            .map(|method| {
                self.settings
                    .tasks
                    .iter()
                    .zip(&self.task_samples)
                    .map(|(task, &n)| {
                        let counted: Vec<&LongBenchRecord> = (0..n)
                            .filter(|&s| {
                                self.methods
                                    .iter()
                                    .all(|m| done.contains_key(&record_key(&m.name, task, s)))
                            })
                            .map(|s| &done[&record_key(&method.name, task, s)])
                            .collect();
                        let all: Vec<f64> = counted.iter().map(|r| r.score).collect();
                        let buckets = e.then(|| {
                            BUCKETS
                                .iter()
                                .map(|b| {
                                    let v: Vec<f64> = counted
                                        .iter()
                                        .filter(|r| LengthBucket::of(r.length) == *b)
                                        .map(|r| r.score)
                                        .collect();
                                    (b.label(), mean_score_e(&v))
                                })
                                .collect()
                        });
                        TaskScore {
                            task: task.clone(),
                            metric: Metric::for_dataset(task).map_or("?", Metric::name),
                            samples: counted.len(),
                            score: mean_score(&all),
                            buckets,
                        }
                    })
                    .collect()
            })
            .collect();
        let mut records = Vec::with_capacity(outcome.done.len());
        for m in &self.methods {
            for (task, &n) in self.settings.tasks.iter().zip(&self.task_samples) {
                for s in 0..n {
                    if let Some(r) = outcome.done.remove(&record_key(&m.name, task, s)) {
                        records.push(r);
                    }
                }
            }
        }
        LongBenchReport {
            methods: self.methods.iter().map(|m| m.name.clone()).collect(),
            longbench_e: e,
            scores,
            records,
            resumed: outcome.resumed,
            complete,
            shard: outcome.shard,
            throughput: outcome.throughput(),
            out_dir: out_dir.to_path_buf(),
        }
    }

    /// Writes `results.json`, `summary.json` and `scores.png` of a complete run.
    pub fn write_outputs(&self, dir: &Path, report: &LongBenchReport) -> Result<()> {
        atomic_write_json(&dir.join(files::RESULTS_JSON), &report.records)?;
        atomic_write_json(&dir.join(files::SUMMARY_JSON), &self.summary_json(report))?;
        let m = report.methods.len();
        let bars = if report.longbench_e {
            BarGroups {
                categories: BUCKETS.iter().map(|b| b.label().to_string()).collect(),
                series: report.methods.clone(),
                values: (0..m)
                    .map(|i| {
                        BUCKETS
                            .iter()
                            .map(|b| report.average(i, Some(*b)))
                            .collect()
                    })
                    .collect(),
            }
        } else {
            let mut categories = self.settings.tasks.clone();
            categories.push("average".into());
            BarGroups {
                categories,
                series: report.methods.clone(),
                values: (0..m)
                    .map(|i| {
                        report.scores[i]
                            .iter()
                            .map(|t| t.score)
                            .chain([report.average(i, None)])
                            .collect()
                    })
                    .collect(),
            }
        };
        let title = if report.longbench_e {
            format!(
                "{} — LongBench-E, average over tasks by length",
                self.model_name
            )
        } else {
            format!("{} — LongBench", self.model_name)
        };
        grouped_bar_plot(
            &dir.join(files::PLOT_PNG),
            &title,
            "score (0-100)",
            10.0,
            &bars,
        )
    }

    /// The summary written to `summary.json`.
    pub fn summary_json(&self, report: &LongBenchReport) -> Value {
        let methods: Vec<Value> = self
            .methods
            .iter()
            .enumerate()
            .map(|(i, method)| {
                let mut v = json!({
                    "method": method.name,
                    "decimation": method.decimation(),
                    "tasks": report.scores[i],
                });
                if report.longbench_e {
                    v["average"] = json!(BUCKETS
                        .iter()
                        .map(|b| (b.label(), report.average(i, Some(*b))))
                        .collect::<BTreeMap<_, _>>());
                } else {
                    v["average"] = json!(report.average(i, None));
                }
                if let Some(p) = method.policy_json() {
                    v["policy"] = p;
                }
                v
            })
            .collect();
        json!({
            "eval": "longbench",
            "benchmark": if self.settings.longbench_e { "LongBench-E" } else { "LongBench" },
            "model": self.model_name,
            "tasks": self.settings.tasks,
            "max_length": self.settings.max_length,
            "samples_per_task": self.task_samples,
            "methods": methods,
        })
    }
}

impl SweepUnits for LongBenchPlan {
    type Unit = LongBenchUnit;
    type Record = LongBenchRecord;
    const UNIT_NAME: &'static str = "samples";

    fn units(&self) -> &[LongBenchUnit] {
        &self.units
    }
    fn unit_id(&self, u: &LongBenchUnit) -> String {
        record_key(
            &self.methods[u.method].name,
            &self.settings.tasks[u.task],
            u.sample,
        )
    }
    fn record_id(&self, r: &LongBenchRecord) -> String {
        record_key(&r.method, &r.task, r.sample)
    }
    fn describe(&self, u: &LongBenchUnit) -> String {
        format!(
            "{} on {} sample {}",
            self.methods[u.method].name, self.settings.tasks[u.task], u.sample
        )
    }
}

/// A sample's prompt as pred.py builds it: the ids, and whether it was cut.
pub fn prompt_ids(
    model: &dyn EvalModel,
    task: &str,
    context: &str,
    input: &str,
    max_length: usize,
) -> Result<(Vec<u32>, bool)> {
    let prompt = fill_template(prompt_template(task)?, context, input);
    let ids = model.encode(&prompt)?;
    if ids.len() <= max_length {
        return Ok((ids, false));
    }
    // pred.py: half = int(max_length / 2); decode both halves, concatenate, encode again.
    let half = max_length / 2;
    let text = model.decode(&ids[..half])? + &model.decode(&ids[ids.len() - half..])?;
    Ok((model.encode(&text)?, true))
}

/// The tokens pred.py keeps of a samsum generation: up to and including the first newline
/// token after the first generated token.
pub fn cut_at_newline(tokens: &[u32], newline: u32) -> &[u32] {
    match tokens.iter().skip(1).position(|&t| t == newline) {
        Some(i) => &tokens[..i + 2],
        None => tokens,
    }
}

struct LongBenchSweep<'a> {
    plan: &'a LongBenchPlan,
    tasks: &'a [LongBenchTask],
}

impl PlanSweep for LongBenchSweep<'_> {
    type Plan = LongBenchPlan;
    fn plan(&self) -> &LongBenchPlan {
        self.plan
    }
}

impl Sweep for LongBenchSweep<'_> {
    /// Samples of one task and method; those of equal token length run together.
    fn batch_key(&self, u: &LongBenchUnit) -> String {
        format!("{}\u{1f}{}", u.task, u.method)
    }

    fn score(
        &self,
        model: &dyn EvalModel,
        units: &[&LongBenchUnit],
    ) -> Result<Vec<LongBenchRecord>> {
        let method = &self.plan.methods[units[0].method];
        let task = &self.tasks[units[0].task];
        let name = task.name.as_str();
        let max_new = max_new_tokens(name)?;
        let newline = if NEWLINE_STOP_DATASETS.contains(&name) {
            model.encode("\n")?.last().copied()
        } else {
            None
        };
        let prompts = units
            .iter()
            .map(|u| {
                let s = &task.samples[u.sample];
                prompt_ids(
                    model,
                    name,
                    &s.context,
                    &s.input,
                    self.plan.settings.max_length,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<&[u32]> = prompts.iter().map(|p| p.0.as_slice()).collect();
        let outputs = generate_greedy_by_length(model, &ids, max_new, &method.policy)?;
        units
            .iter()
            .zip(prompts)
            .zip(outputs)
            .map(|((u, (ids, truncated)), out)| {
                let prediction = match newline {
                    Some(nl) => model.decode(cut_at_newline(&out.tokens, nl))?,
                    None => out.text,
                };
                let s = &task.samples[u.sample];
                let classes = s.all_classes.as_deref().unwrap_or(&[]);
                let score = score_prediction(name, &prediction, &s.answers, classes)?;
                Ok(LongBenchRecord {
                    method: method.name.clone(),
                    task: task.name.clone(),
                    sample: u.sample,
                    id: s.id.clone(),
                    length: s.length,
                    prompt_tokens: ids.len(),
                    truncated,
                    prediction,
                    score,
                    prefill_secs: out.prefill_secs,
                    kept_per_layer: out.kept_per_layer,
                })
            })
            .collect()
    }
}

/// File names inside a longbench run folder.
pub mod files {
    pub const RESULTS_JSON: &str = "results.json";
    pub const SUMMARY_JSON: &str = "summary.json";
    pub const PLOT_PNG: &str = "scores.png";
}

/// Everything a LongBench run needs.
pub struct LongBenchJob<'a> {
    pub model: &'a dyn EvalModel,
    pub extra_workers: &'a [&'a dyn EvalModel],
    /// The tasks' samples, in `settings.tasks` order.
    pub tasks: &'a [LongBenchTask],
    /// Where the data came from (recorded).
    pub data_source: &'a str,
    pub settings: &'a LongBenchSettings,
    pub methods: &'a [Method],
    pub out_dir: &'a Path,
    pub options: &'a RunOptions,
}

/// Refuses a `--max-length` below some task's prompt template (its instructions alone).
pub fn check_max_length(model: &dyn EvalModel, settings: &LongBenchSettings) -> Result<()> {
    for t in &settings.tasks {
        let template = model
            .encode(&fill_template(prompt_template(t)?, "", ""))?
            .len();
        if settings.max_length < template {
            bail!(
                "--max-length {} is shorter than the {t} prompt template ({template} tokens without context or input)",
                settings.max_length
            );
        }
    }
    Ok(())
}

impl LongBenchJob<'_> {
    fn run_settings(&self) -> Result<Value> {
        let task_samples: Vec<usize> = self.tasks.iter().map(|t| t.samples.len()).collect();
        Ok(json!({
            "eval": "longbench",
            "model": self.model.identity()?,
            "data": {
                "source": self.data_source,
                "files": self.tasks.iter().map(|t| json!({"file": t.file, "fnv1a64": t.fnv1a64})).collect::<Vec<_>>(),
            },
            "tasks": self.settings.tasks,
            "longbench_e": self.settings.longbench_e,
            "max_length": self.settings.max_length,
            "samples": self.settings.samples,
            "task_samples": task_samples,
            "methods": self.methods,
        }))
    }
}

/// Runs (or resumes) LongBench (or its shard), streaming each record to `results.jsonl`;
/// when every unit is done, writes `results.json`, `summary.json` and `scores.png`.
pub fn run_longbench(job: &LongBenchJob) -> Result<LongBenchReport> {
    check_tasks(&job.settings.tasks, job.settings.longbench_e)?;
    check_max_length(job.model, job.settings)?;
    if job.settings.samples == Some(0) {
        bail!("--samples must be at least 1");
    }
    if job.methods.is_empty() {
        bail!("no method to run");
    }
    let settings = job.run_settings()?;
    let plan = LongBenchPlan::from_run_settings(&settings)?;
    let sweep = LongBenchSweep {
        plan: &plan,
        tasks: job.tasks,
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
            label: "longbench",
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
    fn tasks_are_checked() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_tasks(&t(&PAPER_TASKS), false).is_ok());
        assert!(check_tasks(&t(&PAPER_TASKS), true).is_ok());
        let e = check_tasks(&t(&["triviqa"]), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown LongBench task \"triviqa\"") && e.contains("repobench-p"),
            "{e}"
        );
        let e = check_tasks(&t(&["narrativeqa"]), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown LongBench-E task"), "{e}");
        let e = check_tasks(&t(&["dureader"]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rouge_zh_score") && e.contains("jieba"), "{e}");
        assert!(check_tasks(&t(&["lsht", "passage_retrieval_zh"]), false).is_ok());
        assert!(check_tasks(&t(&["lcc", "lcc"]), false).is_err());
    }

    #[test]
    fn samsum_stops_after_the_first_newline_past_the_first_token() {
        assert_eq!(cut_at_newline(&[5, 6, 10, 7], 10), &[5, 6, 10]);
        assert_eq!(cut_at_newline(&[10, 6, 10, 7], 10), &[10, 6, 10]);
        assert_eq!(cut_at_newline(&[10, 6], 10), &[10, 6]);
    }
}
