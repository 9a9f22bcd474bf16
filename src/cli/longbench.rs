//! `decimamba longbench`: LongBench and LongBench-E with the official prompts, truncation
//! and metrics.

use super::common::EvalRunArgs;
use crate::eval::common::install_interrupt_flag;
use crate::eval::longbench::data::{
    hub_files, load_tasks, local_files, task_file_name, LongBenchFiles,
};
use crate::eval::longbench::run::{
    check_max_length, check_tasks, files, run_longbench, LongBenchJob, LongBenchSettings,
};
use crate::eval::{EvalModel, RunOptions};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct LongBenchArgs {
    /// LongBench data: its data.zip, or a folder holding data.zip or the {task}.jsonl files
    /// (directly or in data/); default: THUDM/LongBench from the hub or its cache
    /// (HF_HUB_OFFLINE=1: the cache only).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Tasks, comma-separated; default: the paper's six (Fig. 1 left).
    #[arg(
        long,
        default_value = "multifieldqa_en,gov_report,multi_news,triviaqa,lcc,repobench-p"
    )]
    pub tasks: String,
    /// LongBench-E: the {task}_e.jsonl files, scored per length bucket (0-4k, 4-8k, 8k+).
    #[arg(long)]
    pub e: bool,
    /// Prompts longer than this many tokens keep their first and last halves (pred.py's
    /// middle truncation; default: its budget for 32K-context models).
    #[arg(long, default_value_t = crate::eval::longbench::run::DEFAULT_MAX_LENGTH)]
    pub max_length: usize,
    /// At most this many samples per task (the first of each file); default: all.
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
    #[command(flatten)]
    pub run: EvalRunArgs,
}

pub fn run(args: LongBenchArgs) -> Result<()> {
    args.run.check()?;
    let tasks: Vec<String> = args
        .tasks
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    check_tasks(&tasks, args.e)?;
    if args.samples == Some(0) {
        bail!("--samples must be at least 1");
    }
    let settings = LongBenchSettings {
        tasks,
        longbench_e: args.e,
        max_length: args.max_length,
        samples: args.samples,
    };
    let out = args.run.out_dir("longbench")?;
    let wanted: Vec<String> = settings
        .tasks
        .iter()
        .map(|t| task_file_name(t, settings.longbench_e))
        .collect();
    let source = match &args.data {
        Some(p) => local_files(p)?,
        None => hub_files(&wanted)?,
    };
    if args.data.is_some() {
        let paths = match &source {
            LongBenchFiles::Zip(p) => vec![p.clone()],
            LongBenchFiles::Jsonl(files) => files.clone(),
        };
        args.run
            .check_held_out(&crate::calibrate::DataRecord::of(&paths, &[])?)?;
    }
    let mut tasks = load_tasks(&source, &settings.tasks, settings.longbench_e)?;
    if let Some(n) = settings.samples {
        for t in &mut tasks {
            t.samples.truncate(n);
        }
    }
    let (mut model, mut extra) = args.run.model.load_workers()?;
    let methods = args.run.methods(&model)?;
    check_max_length(&model, &settings)?;
    let longest = settings.max_length;
    let batch_size = args.run.sweep.batch_size(&model, &methods, longest, 1)?;
    args.run.check_memory(
        &model,
        &methods,
        longest,
        1,
        batch_size,
        "a LongBench prompt",
    )?;
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
    let data_source = source.describe();
    let job = LongBenchJob {
        model: &model,
        extra_workers: &extra_workers,
        tasks: &tasks,
        data_source: &data_source,
        settings: &settings,
        methods: &methods,
        out_dir: &out,
        options: &options,
    };
    let report = run_longbench(&job)?;
    if !report.complete {
        super::output::println(if methods.len() > 1 {
            "partial run: only the samples every method finished are counted"
        } else {
            "partial run: only the finished samples are counted"
        })?;
    }
    super::output::print(&report.table())?;
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
        &[files::RESULTS_JSON, files::SUMMARY_JSON, files::PLOT_PNG],
    )
}
