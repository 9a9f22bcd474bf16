//! `decimamba eval-ppl`: sliding-window perplexity over long documents.

use super::common::{DataArgs, EvalRunArgs};
use crate::eval::common::{install_interrupt_flag, parse_lengths};
use crate::eval::data::{data_files, load_documents, pg19_test_files};
use crate::eval::ppl::{files, run_ppl, tokenize_documents, PplJob, PplSettings};
use crate::eval::{EvalModel, RunOptions};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Hub datasets `--dataset` knows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    /// The PG-19 test split (100 books): emozilla/pg19's
    /// data/test-*.parquet, else deepmind/pg19's parquet export
    /// (revision refs/convert/parquet), downloaded into the hub cache
    /// ($HF_HOME/hub) on first use; HF_HUB_OFFLINE=1 reads only the cache.
    Pg19,
}

#[derive(clap::Args, Debug)]
pub struct EvalPplArgs {
    /// Documents: a .txt file (one document), a .jsonl file (one document per
    /// line, optionally .gz), a .parquet file (one document per row, named by
    /// its short_book_title column when present), or a folder of them.
    #[arg(
        long,
        value_name = "FILE|DIR",
        required_unless_present = "dataset",
        conflicts_with = "dataset"
    )]
    pub data: Option<PathBuf>,
    /// A hub dataset instead of --data, read from the Hugging Face hub or its
    /// cache (HF_HUB_OFFLINE=1: the cache only).
    #[arg(long, value_enum)]
    pub dataset: Option<Dataset>,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// Context lengths in tokens, comma-separated; k = 1024 (10k = 10240).
    #[arg(long, default_value = "1k,2k,4k,10k,20k,30k,40k,50k,60k")]
    pub lengths: String,
    /// Most windows per document and length.
    #[arg(long, default_value_t = 10)]
    pub windows: usize,
    /// Tokens scored at the end of each window.
    #[arg(long, default_value_t = 100)]
    pub pred_len: usize,
    #[command(flatten)]
    pub run: EvalRunArgs,
}

pub fn run(args: EvalPplArgs) -> Result<()> {
    args.run.check()?;
    let settings = PplSettings {
        lengths: parse_lengths(&args.lengths)?,
        windows: args.windows,
        pred_len: args.pred_len,
    };
    let files_in = match (&args.data, args.dataset) {
        (Some(p), _) => data_files(p)?,
        (None, Some(Dataset::Pg19)) => pg19_test_files()?,
        (None, None) => bail!("give --data FILE|DIR or --dataset pg19"),
    };
    let opts = args.data_args.options();
    let out = args.run.out_dir("ppl")?;
    let mut data = load_documents(&files_in, &opts)?;
    for w in &data.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(n) = args.data_args.max_docs {
        data.documents.truncate(n);
    }
    args.run.check_held_out(&crate::calibrate::DataRecord::of(
        &files_in,
        &data.documents,
    )?)?;
    let (mut model, mut extra) = args.run.model.load_workers()?;
    let methods = args.run.methods(&model)?;
    let docs = tokenize_documents(&model, &data.documents, args.run.quiet)?;
    // Only lengths some document reaches are run.
    let longest_doc = docs.iter().map(|d| d.tokens.len()).max().unwrap_or(0);
    let longest = settings
        .lengths
        .iter()
        .copied()
        .filter(|&l| l <= longest_doc)
        .max()
        .unwrap_or(0);
    let batch_size =
        args.run
            .sweep
            .batch_size(&model, &methods, longest.max(1), settings.pred_len + 1)?;
    if longest > 0 {
        args.run.check_memory(
            &model,
            &methods,
            longest,
            settings.pred_len + 1,
            batch_size,
            "a perplexity window",
        )?;
    }
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
    let job = PplJob {
        model: &model,
        extra_workers: &extra_workers,
        docs: &docs,
        settings: &settings,
        methods: &methods,
        out_dir: &out,
        options: &options,
    };
    let report = run_ppl(&job)?;
    super::output::print(&report.table())?;
    for c in report.coverage.iter().filter(|c| c.docs_used == 0) {
        eprintln!(
            "note: no document has at least {} tokens, so length {} has no perplexity",
            c.length, c.length
        );
    }
    if let Some(line) = report.throughput.line("windows") {
        eprintln!("{line}");
    }
    if report.complete && report.shard.is_some() {
        return args.run.sweep.note_shard_done(&out);
    }
    super::common::finish_run(
        report.complete,
        report.windows.len(),
        "windows",
        &out,
        &[files::RESULTS_JSON, files::SUMMARY_JSON, files::PLOT_PNG],
    )
}
