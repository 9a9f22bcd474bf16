//! `decimamba ruler`: RULER's synthetic tasks (niah, vt, cwe, fwe), generated locally.

use super::common::EvalRunArgs;
use crate::eval::common::{install_interrupt_flag, parse_lengths};
use crate::eval::ruler::run::files;
use crate::eval::ruler::{parse_tasks, run_ruler, RulerJob, RulerSettings};
use crate::eval::{EvalModel, RunOptions};
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct RulerArgs {
    /// Tasks, comma-separated, or `all`: niah_single_1, niah_multikey_2, niah_multikey_3,
    /// vt, cwe, fwe (RULER's tasks that need downloads are not included).
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Sequence lengths in the model's tokens (prompt plus tokens to generate),
    /// comma-separated (k = 1024: 4k = 4096).
    #[arg(long, default_value = "4k,8k,16k,32k,64k,128k")]
    pub lengths: String,
    /// Samples per task and length (RULER's scripts use 500).
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// RULER's --random_seed: the same seed gives RULER's own prompts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Token budget of vt's in-context example. RULER's is 500; a byte-level tokenizer
    /// needs about 840 (other values give prompts RULER would not make).
    #[arg(long, default_value_t = crate::eval::ruler::generate::VT_EXAMPLE_TOKENS)]
    pub vt_example_tokens: usize,
    #[command(flatten)]
    pub run: EvalRunArgs,
}

pub fn run(args: RulerArgs) -> Result<()> {
    args.run.check()?;
    let settings = RulerSettings {
        tasks: parse_tasks(&args.tasks)?,
        lengths: parse_lengths(&args.lengths)?,
        samples: args.samples,
        seed: args.seed,
        vt_example_tokens: args.vt_example_tokens,
    };
    let out = args.run.out_dir("ruler")?;
    let (mut model, mut extra) = args.run.model.load_workers()?;
    let methods = args.run.methods(&model)?;
    let longest = settings.lengths.iter().copied().max().unwrap_or(0);
    let batch_size = args.run.sweep.batch_size(&model, &methods, longest, 1)?;
    args.run
        .check_memory(&model, &methods, longest, 1, batch_size, "a RULER prompt")?;
    let stop = install_interrupt_flag();
    for m in std::iter::once(&mut model).chain(extra.iter_mut()) {
        m.model.set_cancel_flag(Some(stop.clone()));
    }
    let options = RunOptions {
        quiet: args.run.quiet,
        stop: Some(stop),
        batch_size,
        shard: args.run.sweep.shard,
    };
    let extra_workers: Vec<&dyn EvalModel> = extra.iter().map(|m| m as &dyn EvalModel).collect();
    let report = run_ruler(&RulerJob {
        model: &model,
        extra_workers: &extra_workers,
        settings: &settings,
        methods: &methods,
        out_dir: &out,
        options: &options,
    })?;
    if !report.complete {
        super::output::println(if methods.len() > 1 {
            "partial run: only the samples every method finished are counted"
        } else {
            "partial run: only the finished samples are counted"
        })?;
    }
    super::output::print(&report.scores.table())?;
    if let Some(line) = report.throughput.line("samples") {
        eprintln!("{line}");
    }
    if report.complete && report.shard.is_some() {
        return args.run.sweep.note_shard_done(&out);
    }
    super::common::finish_run(
        report.complete,
        report.records.len(),
        "samples",
        &out,
        &[files::RESULTS_JSON, files::SUMMARY_JSON, files::HEATMAP_PNG],
    )
}
