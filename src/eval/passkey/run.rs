//! Running a passkey grid: its settings, its work units (a sample of one cell under one
//! method), the sweep that scores them, and the files a finished run writes.

use super::grid::PasskeyGrid;
use super::{cell_seed, key_found, Haystack, PasskeyTemplate, PromptBuilder};
use crate::eval::common::{atomic_write_json, Method, RunOptions};
use crate::eval::plot::passkey_heatmap;
use crate::eval::sweep::{
    field, run_sweep, PlanSweep, Shard, Sweep, SweepOutcome, SweepSetup, SweepUnits, Throughput,
};
use crate::eval::EvalModel;
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The grid and decoding settings of a passkey run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasskeySettings {
    /// Prompt lengths in tokens.
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1].
    pub depths: Vec<f64>,
    /// Samples per (length, depth) cell.
    pub samples: usize,
    /// Seed of the keys and haystack offsets.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
}

impl Default for PasskeySettings {
    fn default() -> Self {
        PasskeySettings {
            lengths: (0..8).map(|i| 1024usize << i).collect(),
            depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            samples: 1,
            seed: 0,
            max_new_tokens: 10,
        }
    }
}

/// One finished sample (a line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasskeySample {
    /// `vanilla` or `decimamba`.
    pub method: String,
    /// Prompt length in tokens.
    pub length: usize,
    /// Needle depth asked for.
    pub depth: f64,
    /// Sample index within the cell.
    pub sample: usize,
    /// Token offset of the needle in the prompt.
    pub needle_position: usize,
    /// The hidden key.
    pub key: u64,
    /// The generated text.
    pub output: String,
    /// Whether the key was found in the output.
    pub success: bool,
    /// Prefill wall-clock seconds.
    pub prefill_secs: f64,
    /// Tokens kept by each decimating layer (empty for vanilla).
    pub kept_per_layer: Vec<usize>,
}

/// One work unit: sample `sample` of the cell (`length`, `depth`) under method `method`
/// (an index into the run's methods).
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeyUnit {
    pub method: usize,
    pub length: usize,
    pub depth: f64,
    pub sample: usize,
}

/// What a passkey run is, read back from its `run.json`: enough to list its units and write
/// its report without the model, so a merge of shards writes what one run would.
#[derive(Debug, Clone)]
pub struct PasskeyPlan {
    pub model_name: String,
    pub template_name: String,
    pub haystack_source: String,
    pub settings: PasskeySettings,
    pub methods: Vec<Method>,
    /// In canonical order: length, depth, sample, then method, so every method of a cell
    /// runs on the same prompt one after another.
    units: Vec<PasskeyUnit>,
}

impl PasskeyPlan {
    /// The plan a passkey `run.json` (without its shard) describes.
    pub fn from_run_settings(v: &Value) -> Result<Self> {
        if v.get("eval").and_then(Value::as_str) != Some("passkey") {
            bail!("run.json does not describe a passkey run");
        }
        let template: PasskeyTemplate = field(v, "template")?;
        let settings = PasskeySettings {
            lengths: field(v, "lengths")?,
            depths: field(v, "depths")?,
            samples: field(v, "samples")?,
            seed: field(v, "seed")?,
            max_new_tokens: field(v, "max_new_tokens")?,
        };
        let methods: Vec<Method> = field(v, "methods")?;
        let mut units = Vec::new();
        for &length in &settings.lengths {
            for &depth in &settings.depths {
                for sample in 0..settings.samples {
                    for method in 0..methods.len() {
                        units.push(PasskeyUnit {
                            method,
                            length,
                            depth,
                            sample,
                        });
                    }
                }
            }
        }
        Ok(PasskeyPlan {
            model_name: field::<Value>(v, "model")?
                .get("name")
                .and_then(Value::as_str)
                .context("run.json: the model has no name")?
                .to_string(),
            template_name: template.name,
            haystack_source: field::<Value>(v, "haystack")?
                .get("source")
                .and_then(Value::as_str)
                .context("run.json: the haystack has no source")?
                .to_string(),
            settings,
            methods,
            units,
        })
    }

    fn method_names(&self) -> Vec<String> {
        self.methods.iter().map(|m| m.name.clone()).collect()
    }

    /// The report of a run's finished samples; partial runs tally the samples every method
    /// finished, so methods are compared on the same prompts.
    pub fn report(
        &self,
        mut outcome: SweepOutcome<PasskeySample>,
        out_dir: &Path,
    ) -> PasskeyReport {
        let complete = outcome.complete();
        // Grid order: method, length, depth, sample.
        let mut samples = Vec::with_capacity(outcome.done.len());
        for m in &self.methods {
            for &length in &self.settings.lengths {
                for &depth in &self.settings.depths {
                    for sample in 0..self.settings.samples {
                        if let Some(r) = outcome
                            .done
                            .remove(&sample_id(&m.name, length, depth, sample))
                        {
                            samples.push(r);
                        }
                    }
                }
            }
        }
        let s = &self.settings;
        let names = self.method_names();
        let grid = if complete && outcome.shard.is_none() {
            PasskeyGrid::from_samples(&s.lengths, &s.depths, &names, &samples)
        } else {
            let mut finished: HashMap<String, usize> = HashMap::new();
            for r in &samples {
                *finished
                    .entry(sample_id("", r.length, r.depth, r.sample))
                    .or_default() += 1;
            }
            let common: Vec<PasskeySample> = samples
                .iter()
                .filter(|r| {
                    finished[&sample_id("", r.length, r.depth, r.sample)] == self.methods.len()
                })
                .cloned()
                .collect();
            PasskeyGrid::from_samples(&s.lengths, &s.depths, &names, &common)
        };
        PasskeyReport {
            samples,
            grid,
            resumed: outcome.resumed,
            complete,
            shard: outcome.shard,
            throughput: outcome.throughput(),
            out_dir: out_dir.to_path_buf(),
        }
    }

    /// Writes `results.json`, `summary.json` and `heatmap.png` of a complete run.
    pub fn write_outputs(&self, dir: &Path, report: &PasskeyReport) -> Result<()> {
        atomic_write_json(&dir.join(files::RESULTS_JSON), &report.samples)?;
        atomic_write_json(
            &dir.join(files::SUMMARY_JSON),
            &self.summary_json(&report.grid),
        )?;
        passkey_heatmap(
            &dir.join(files::HEATMAP_PNG),
            &report.grid.panels(&self.model_name),
        )?;
        Ok(())
    }

    /// The summary written to `summary.json`.
    pub fn summary_json(&self, grid: &PasskeyGrid) -> Value {
        let methods: Vec<Value> = self
            .methods
            .iter()
            .enumerate()
            .map(|(m, method)| {
                let overall = grid.overall(m);
                let mut v = json!({
                    "method": method.name,
                    "decimation": method.decimation(),
                    "success": overall.fraction(),
                    "successes": overall.successes,
                    "samples": overall.total,
                    "per_length": grid.lengths.iter().enumerate().map(|(l, len)| {
                        let st = grid.length_stat(m, l);
                        json!({"length": len, "success": st.fraction(), "successes": st.successes, "samples": st.total})
                    }).collect::<Vec<_>>(),
                    "grid": grid.cells[m].iter().map(|row| row.iter().map(|c| c.fraction()).collect::<Vec<_>>()).collect::<Vec<_>>(),
                });
                if let Some(p) = method.policy_json() {
                    v["policy"] = p;
                }
                v
            })
            .collect();
        json!({
            "eval": "passkey",
            "model": self.model_name,
            "template": self.template_name,
            "haystack": self.haystack_source,
            "lengths": grid.lengths,
            "depths": grid.depths,
            "samples_per_cell": self.settings.samples,
            "seed": self.settings.seed,
            "max_new_tokens": self.settings.max_new_tokens,
            "grid_layout": "grid[depth][length] = success fraction",
            "methods": methods,
        })
    }
}

fn sample_id(method: &str, length: usize, depth: f64, sample: usize) -> String {
    format!(
        "{method}\u{1f}{length}\u{1f}{:016x}\u{1f}{sample}",
        depth.to_bits()
    )
}

impl SweepUnits for PasskeyPlan {
    type Unit = PasskeyUnit;
    type Record = PasskeySample;
    const UNIT_NAME: &'static str = "samples";

    fn units(&self) -> &[PasskeyUnit] {
        &self.units
    }

    fn unit_id(&self, u: &PasskeyUnit) -> String {
        sample_id(&self.methods[u.method].name, u.length, u.depth, u.sample)
    }

    fn record_id(&self, r: &PasskeySample) -> String {
        sample_id(&r.method, r.length, r.depth, r.sample)
    }

    fn describe(&self, u: &PasskeyUnit) -> String {
        format!(
            "{} at length {}, depth {}, sample {}",
            self.methods[u.method].name, u.length, u.depth, u.sample
        )
    }
}

/// The passkey sweep: the plan's units, scored on prompts built from the template.
struct PasskeySweep<'a> {
    plan: &'a PasskeyPlan,
    /// Shared by the workers; held only while prompts are built.
    builder: Mutex<PromptBuilder<'a>>,
}

impl PlanSweep for PasskeySweep<'_> {
    type Plan = PasskeyPlan;
    fn plan(&self) -> &PasskeyPlan {
        self.plan
    }
}

impl Sweep for PasskeySweep<'_> {
    fn batch_key(&self, u: &PasskeyUnit) -> String {
        format!("{}\u{1f}{}", u.length, u.method)
    }

    fn score(&self, model: &dyn EvalModel, units: &[&PasskeyUnit]) -> Result<Vec<PasskeySample>> {
        let s = &self.plan.settings;
        let prompts = {
            let mut builder = self
                .builder
                .lock()
                .map_err(|_| anyhow::anyhow!("a worker failed while building a prompt"))?;
            units
                .iter()
                .map(|u| {
                    let mut rng =
                        StdRng::seed_from_u64(cell_seed(s.seed, u.length, u.depth, u.sample));
                    builder.sample(u.length, u.depth, &mut rng)
                })
                .collect::<Result<Vec<_>>>()?
        };
        let method = &self.plan.methods[units[0].method];
        let outputs = match prompts.as_slice() {
            [one] => vec![model.generate_greedy(&one.ids, s.max_new_tokens, &method.policy)?],
            many => {
                let ids: Vec<&[u32]> = many.iter().map(|p| p.ids.as_slice()).collect();
                model.generate_greedy_batch(&ids, s.max_new_tokens, &method.policy)?
            }
        };
        Ok(units
            .iter()
            .zip(prompts)
            .zip(outputs)
            .map(|((u, prompt), out)| PasskeySample {
                method: method.name.clone(),
                length: u.length,
                depth: u.depth,
                sample: u.sample,
                needle_position: prompt.needle_position,
                key: prompt.key,
                success: key_found(&out.text, prompt.key),
                output: out.text,
                prefill_secs: out.prefill_secs,
                kept_per_layer: out.kept_per_layer,
            })
            .collect())
    }
}

/// Everything a passkey run needs.
pub struct PasskeyJob<'a> {
    /// The model.
    pub model: &'a dyn EvalModel,
    /// Copies of the model on further devices: with any, one worker runs per model.
    pub extra_workers: &'a [&'a dyn EvalModel],
    /// The prompt template.
    pub template: &'a PasskeyTemplate,
    /// The haystack.
    pub haystack: &'a Haystack,
    /// Grid and decoding settings.
    pub settings: &'a PasskeySettings,
    /// The methods, side by side on identical prompts.
    pub methods: &'a [Method],
    /// The run folder (resumed when it already holds this run).
    pub out_dir: &'a Path,
    /// Progress, interruption, batching and the shard.
    pub options: &'a RunOptions,
}

/// File names inside a passkey run folder.
pub mod files {
    /// All samples, in grid order.
    pub const RESULTS_JSON: &str = "results.json";
    /// Success fractions per method and cell.
    pub const SUMMARY_JSON: &str = "summary.json";
    /// The heatmap.
    pub const HEATMAP_PNG: &str = "heatmap.png";
}

/// What [`run_passkey`] returns.
#[derive(Debug, Clone)]
pub struct PasskeyReport {
    /// All finished samples, in grid order.
    pub samples: Vec<PasskeySample>,
    /// Their tally.
    pub grid: PasskeyGrid,
    /// Samples that were already on disk when the run started.
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

impl PasskeyJob<'_> {
    /// The settings recorded in `run.json`; a rerun must match them to resume.
    pub fn run_settings(&self) -> Result<Value> {
        Ok(json!({
            "eval": "passkey",
            "model": self.model.identity()?,
            "template": self.template,
            "haystack": {
                "source": self.haystack.source,
                "sentences": self.haystack.sentences().len(),
                "fnv1a64": self.haystack.fingerprint(),
            },
            "lengths": self.settings.lengths,
            "depths": self.settings.depths,
            "samples": self.settings.samples,
            "seed": self.settings.seed,
            "max_new_tokens": self.settings.max_new_tokens,
            "methods": self.methods,
        }))
    }

    fn validate(&self, builder: &PromptBuilder) -> Result<()> {
        let s = self.settings;
        if s.lengths.is_empty() || s.depths.is_empty() {
            bail!("the grid is empty: give at least one length and one depth");
        }
        if s.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if s.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        if self.methods.is_empty() {
            bail!("no method to run");
        }
        let names: HashSet<&str> = self.methods.iter().map(|m| m.name.as_str()).collect();
        if names.len() != self.methods.len() {
            bail!("method names must be distinct");
        }
        if let Some(d) = s.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            bail!("depth {d} is outside [0, 1]");
        }
        let needed = builder
            .template_tokens(self.template.key_max)?
            .max(builder.template_tokens(self.template.key_min)?);
        if let Some(l) = s.lengths.iter().find(|l| **l <= needed) {
            bail!("length {l} is shorter than the template ({needed} tokens)");
        }
        Ok(())
    }
}

/// Runs (or resumes) the passkey grid (or its shard), streaming each sample to
/// `results.jsonl`; when the whole grid is complete, writes `results.json`, `summary.json`
/// and `heatmap.png` atomically.
pub fn run_passkey(job: &PasskeyJob) -> Result<PasskeyReport> {
    let builder = PromptBuilder::new(job.model, job.template, job.haystack)?;
    job.validate(&builder)?;
    let settings = job.run_settings()?;
    // The plan is read back from the settings, as `merge` reads it.
    let plan = PasskeyPlan::from_run_settings(&settings)?;
    let sweep = PasskeySweep {
        plan: &plan,
        builder: Mutex::new(builder),
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
            label: "passkey",
        },
    )?;
    let report = plan.report(outcome, job.out_dir);
    if report.complete && report.shard.is_none() {
        plan.write_outputs(job.out_dir, &report)?;
    }
    Ok(report)
}
