//! `decimamba passkey`: passkey retrieval over a grid of lengths and depths.

use super::common::EvalRunArgs;
use crate::eval::common::{install_interrupt_flag, parse_depths, parse_lengths};
use crate::eval::passkey::{
    files, resolve_template, run_passkey, Haystack, PasskeyJob, PasskeySettings,
};
use crate::eval::{EvalModel, RunOptions};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PasskeyArgs {
    /// Prompt template: a preset (authors, classic, model) or a JSON file
    /// {"name","prefix","needle","suffix","key_min","key_max"}; default: the
    /// model's shipped template, else authors.
    #[arg(long, value_name = "PRESET|FILE")]
    pub template: Option<String>,
    /// Haystack text: a .txt file or a folder of .txt files (sorted); default:
    /// the model's shipped haystack, else the built-in filler.
    #[arg(long, value_name = "FILE|DIR")]
    pub haystack: Option<PathBuf>,
    /// Prompt lengths in tokens, comma-separated (k = 1024: 2k = 2048).
    #[arg(long, default_value = "1k,2k,4k,8k,16k,32k,64k,128k")]
    pub lengths: String,
    /// Needle depths in [0, 1], comma-separated (0 = right after the prefix).
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    pub depths: String,
    /// Samples (random keys and haystack offsets) per length and depth.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Seed of the keys and haystack offsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens to generate per sample.
    #[arg(long, default_value_t = 10)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub run: EvalRunArgs,
}

pub fn run(args: PasskeyArgs) -> Result<()> {
    args.run.check()?;
    let settings = PasskeySettings {
        lengths: parse_lengths(&args.lengths)?,
        depths: parse_depths(&args.depths)?,
        samples: args.samples,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
    };
    let out = args.run.out_dir("passkey")?;
    let (mut model, mut extra) = args.run.model.load_workers()?;
    let template = resolve_template(
        args.template.as_deref(),
        model.passkey_template().as_deref(),
    )?;
    let haystack = Haystack::choose(
        args.haystack.as_deref(),
        &template,
        model.haystack().as_deref(),
    )?;
    let methods = args.run.methods(&model)?;
    if let Some(p) = &args.haystack {
        args.run.check_held_out(&haystack_record(p)?)?;
    }
    let longest = settings.lengths.iter().copied().max().unwrap_or(0);
    let batch_size = args.run.sweep.batch_size(&model, &methods, longest, 1)?;
    args.run
        .check_memory(&model, &methods, longest, 1, batch_size, "a passkey prompt")?;
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
    let job = PasskeyJob {
        model: &model,
        extra_workers: &extra_workers,
        template: &template,
        haystack: &haystack,
        settings: &settings,
        methods: &methods,
        out_dir: &out,
        options: &options,
    };
    let report = run_passkey(&job)?;
    if !report.complete {
        super::output::println(if methods.len() > 1 {
            "partial run: only the samples every method finished are counted"
        } else {
            "partial run: only the finished samples are counted"
        })?;
    }
    super::output::print(&report.grid.table())?;
    if let Some(line) = report.throughput.line("samples") {
        eprintln!("{line}");
    }
    if report.complete && report.shard.is_some() {
        return args.run.sweep.note_shard_done(&out);
    }
    super::common::finish_run(
        report.complete,
        report.samples.len(),
        "samples",
        &out,
        &[files::RESULTS_JSON, files::SUMMARY_JSON, files::HEATMAP_PNG],
    )
}

/// The haystack file, or the files of a haystack folder, hashed for the held-out check.
fn haystack_record(path: &std::path::Path) -> Result<crate::calibrate::DataRecord> {
    let files = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    crate::calibrate::DataRecord::of(&files, &[])
}
