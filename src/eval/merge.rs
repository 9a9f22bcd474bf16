//! `merge`: the folders of a sweep's shards (`--shard I/N`) joined into the folder one
//! unsharded run would have written: `run.json` without the shard, every record in
//! `results.jsonl` (in the sweep's canonical order), and the run's `results.json`,
//! `summary.json` and plot. The merged folder is an ordinary run: rerunning the unsharded
//! command on it finds every unit finished.

use super::doc_retrieval::DocRetrievalPlan;
use super::longbench::run::LongBenchPlan;
use super::passkey::PasskeyPlan;
use super::ppl::PplPlan;
use super::runlog::{check_out_folder, differing_keys, read_results, RunLog, RUN_JSON};
use super::sweep::{join_shards, split_shard, Shard, ShardRun, SweepOutcome, SweepUnits};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What [`merge_runs`] did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The evaluation merged (`passkey`, `perplexity`, `doc-retrieval`, `longbench`).
    pub eval: String,
    /// Folders merged.
    pub shards: usize,
    /// Units in the merged run.
    pub units: usize,
    /// The run's table, as the unsharded run prints it.
    pub table: String,
    /// Files written besides `run.json` and `results.jsonl`.
    pub written: Vec<&'static str>,
}

/// One input folder: its settings without the shard, and the shard.
struct Input {
    dir: PathBuf,
    settings: Value,
    shard: Option<Shard>,
}

fn read_input(dir: &Path) -> Result<Input> {
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let path = dir.join(RUN_JSON);
    if !path.is_file() {
        bail!(
            "{} is not a run folder of this tool (it has no {RUN_JSON})",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let (settings, shard) =
        split_shard(&v).with_context(|| format!("{} has a bad shard", path.display()))?;
    Ok(Input {
        dir: dir.to_path_buf(),
        settings,
        shard,
    })
}

/// Checks that the inputs are distinct shards of one run.
fn check_shards(inputs: &[Input]) -> Result<()> {
    let first = &inputs[0];
    for other in &inputs[1..] {
        let diffs = differing_keys(&first.settings, &other.settings);
        if !diffs.is_empty() {
            bail!(
                "{} and {} are runs with different settings ({}); only shards of one run can be merged",
                first.dir.display(),
                other.dir.display(),
                diffs.join("; ")
            );
        }
    }
    if inputs.len() > 1 {
        if let Some(whole) = inputs.iter().find(|i| i.shard.is_none()) {
            bail!(
                "{} is an unsharded run, which covers every unit of the others: the runs overlap",
                whole.dir.display()
            );
        }
    }
    let mut seen: HashMap<usize, &Path> = HashMap::new();
    for input in inputs {
        let Some(shard) = input.shard else { continue };
        let first_shard = first.shard.expect("every input is a shard here");
        if shard.count != first_shard.count {
            bail!(
                "{} is shard {first_shard} but {} is shard {shard}: shards of one split share their count",
                first.dir.display(),
                input.dir.display()
            );
        }
        if let Some(other) = seen.insert(shard.index, &input.dir) {
            bail!(
                "{} and {} are both shard {shard}: the shards overlap",
                other.display(),
                input.dir.display()
            );
        }
    }
    Ok(())
}

/// Checks `out` is a new or empty folder that is none of the inputs.
fn check_merge_out(out: &Path, inputs: &[Input]) -> Result<()> {
    check_out_folder(out)?;
    if out.join(RUN_JSON).exists() {
        bail!(
            "--out {} already holds a run; merge into a new or empty folder",
            out.display()
        );
    }
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    if let Some(o) = canon(out) {
        if let Some(i) = inputs.iter().find(|i| canon(&i.dir).as_ref() == Some(&o)) {
            bail!(
                "--out {} is one of the folders being merged",
                i.dir.display()
            );
        }
    }
    Ok(())
}

/// Merges the shard folders `dirs` into `out`.
pub fn merge_runs(dirs: &[PathBuf], out: &Path) -> Result<MergeReport> {
    if dirs.is_empty() {
        bail!("give the shard folders to merge");
    }
    let inputs = dirs
        .iter()
        .map(|d| read_input(d))
        .collect::<Result<Vec<_>>>()?;
    check_shards(&inputs)?;
    check_merge_out(out, &inputs)?;
    let settings = inputs[0].settings.clone();
    let eval = settings
        .get("eval")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let (units, table, written) = match eval.as_str() {
        "passkey" => {
            let plan = PasskeyPlan::from_run_settings(&settings)?;
            let (n, outcome) = join_into(&plan, &inputs, out, &settings)?;
            let report = plan.report(outcome, out);
            plan.write_outputs(out, &report)?;
            use super::passkey::files;
            (
                n,
                report.grid.table(),
                vec![files::RESULTS_JSON, files::SUMMARY_JSON, files::HEATMAP_PNG],
            )
        }
        "perplexity" => {
            let plan = PplPlan::from_run_settings(&settings)?;
            let (n, outcome) = join_into(&plan, &inputs, out, &settings)?;
            let report = plan.report(outcome, out);
            plan.write_outputs(out, &report)?;
            use super::ppl::files;
            (
                n,
                report.table(),
                vec![files::RESULTS_JSON, files::SUMMARY_JSON, files::PLOT_PNG],
            )
        }
        "ruler" => {
            let plan = super::ruler::RulerPlan::from_run_settings(&settings)?;
            let (n, outcome) = join_into(&plan, &inputs, out, &settings)?;
            let report = plan.report(outcome, out);
            plan.write_outputs(out, &report)?;
            use super::ruler::run::files;
            (
                n,
                report.scores.table(),
                vec![files::RESULTS_JSON, files::SUMMARY_JSON, files::HEATMAP_PNG],
            )
        }
        "doc-retrieval" => {
            let plan = DocRetrievalPlan::from_run_settings(&settings)?;
            let (n, outcome) = join_into(&plan, &inputs, out, &settings)?;
            let report = plan.report(outcome, out);
            plan.write_outputs(out, &report)?;
            use super::doc_retrieval::files;
            (
                n,
                report.table(),
                vec![files::RESULTS_JSON, files::SUMMARY_JSON, files::PLOT_PNG],
            )
        }
        "longbench" => {
            let plan = LongBenchPlan::from_run_settings(&settings)?;
            let (n, outcome) = join_into(&plan, &inputs, out, &settings)?;
            let report = plan.report(outcome, out);
            plan.write_outputs(out, &report)?;
            use super::longbench::run::files;
            (
                n,
                report.table(),
                vec![files::RESULTS_JSON, files::SUMMARY_JSON, files::PLOT_PNG],
            )
        }
        "" => bail!(
            "{} names no evaluation",
            inputs[0].dir.join(RUN_JSON).display()
        ),
        other => bail!(
            "cannot merge {other} runs: merge joins passkey, perplexity, ruler, doc-retrieval and longbench sweeps"
        ),
    };
    Ok(MergeReport {
        eval,
        shards: inputs.len(),
        units,
        table,
        written,
    })
}

/// Joins the inputs' records for `plan` and writes `run.json` and `results.jsonl` of the
/// merged run; returns the unit count and the outcome to report.
fn join_into<P: SweepUnits>(
    plan: &P,
    inputs: &[Input],
    out: &Path,
    settings: &Value,
) -> Result<(usize, SweepOutcome<P::Record>)> {
    let runs = inputs
        .iter()
        .map(|i| {
            Ok(ShardRun {
                dir: i.dir.clone(),
                shard: i.shard,
                records: read_results(&i.dir)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let records = join_shards(plan, runs)?;
    let (mut log, prior) = RunLog::open::<P::Record>(out, settings)?;
    if !prior.is_empty() {
        bail!("--out {} already holds results", out.display());
    }
    let mut done = HashMap::with_capacity(records.len());
    for r in records {
        log.append(&r)?;
        done.insert(plan.record_id(&r), r);
    }
    let n = done.len();
    Ok((
        n,
        SweepOutcome {
            done,
            resumed: 0,
            planned: n,
            interrupted: false,
            shard: None,
            ran: 0,
            ran_secs: 0.0,
        },
    ))
}
