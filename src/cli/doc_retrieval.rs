//! `decimamba doc-retrieval`: the paper's multi-document retrieval on SQuAD v2.

use super::common::EvalRunArgs;
use crate::eval::common::install_interrupt_flag;
use crate::eval::doc_retrieval::run::{longest_prompt_bound, validate_settings};
use crate::eval::doc_retrieval::{
    files, read_squad, run_doc_retrieval, squad_validation, DocRetrievalJob, DocRetrievalSettings,
};
use crate::eval::{EvalModel, RunOptions};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct DocRetrievalArgs {
    /// SQuAD v2 validation split: a .parquet file (rajpurkar/squad_v2's columns) or the
    /// official dev-v2.0.json; default: rajpurkar/squad_v2 from the hub or its cache
    /// (HF_HUB_OFFLINE=1: the cache only).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Numbers of noise documents N, comma-separated (each prompt holds N + 1 documents).
    #[arg(long, default_value = "10,20,40,60,80,100,120,140,160,180,200,250,300")]
    pub num_docs: String,
    /// Answerable questions per N (the same questions for every N).
    #[arg(long, default_value_t = 100)]
    pub questions: usize,
    /// Seed of the question choice, the golden position, the noise documents and the ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens to generate per question (the authors' eval_max_len).
    #[arg(long, default_value_t = 10)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub run: EvalRunArgs,
}

fn parse_num_docs(list: &str) -> Result<Vec<usize>> {
    let entries: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        bail!("--num-docs is empty: give numbers of noise documents, e.g. 10,20,40");
    }
    entries
        .iter()
        .map(|e| {
            e.parse::<usize>().map_err(|_| {
                anyhow::anyhow!("--num-docs: {e:?} is not a whole number of documents")
            })
        })
        .collect()
}

pub fn run(args: DocRetrievalArgs) -> Result<()> {
    args.run.check()?;
    let settings = DocRetrievalSettings {
        num_docs: parse_num_docs(&args.num_docs)?,
        questions: args.questions,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
    };
    let out = args.run.out_dir("doc-retrieval")?;
    let set = match &args.data {
        Some(p) => read_squad(p)?,
        None => squad_validation()?,
    };
    if let Some(p) = &args.data {
        args.run.check_held_out(&crate::calibrate::DataRecord::of(
            std::slice::from_ref(p),
            &[],
        )?)?;
    }
    let (mut model, mut extra) = args.run.model.load_workers()?;
    let methods = args.run.methods(&model)?;
    let stop = install_interrupt_flag();
    for m in std::iter::once(&mut model).chain(extra.iter_mut()) {
        m.model.set_cancel_flag(Some(stop.clone()));
    }
    let question_rows = validate_settings(&set, &settings, &methods)?;
    let longest = longest_prompt_bound(&model, &set, &settings, &question_rows)?;
    let batch_size = args.run.sweep.batch_size(&model, &methods, longest, 1)?;
    args.run.check_memory(
        &model,
        &methods,
        longest,
        1,
        batch_size,
        "a doc-retrieval prompt",
    )?;
    let options = RunOptions {
        quiet: args.run.quiet,
        stop: Some(stop),
        batch_size,
        shard: args.run.sweep.shard,
    };
    let extra_workers: Vec<&dyn EvalModel> = extra.iter().map(|m| m as &dyn EvalModel).collect();
    let job = DocRetrievalJob {
        model: &model,
        extra_workers: &extra_workers,
        set: &set,
        settings: &settings,
        methods: &methods,
        out_dir: &out,
        options: &options,
    };
    let report = run_doc_retrieval(&job)?;
    if !report.complete {
        super::output::println(if methods.len() > 1 {
            "partial run: only the questions every method finished are counted"
        } else {
            "partial run: only the finished questions are counted"
        })?;
    }
    super::output::print(&report.table())?;
    if let Some(line) = report.throughput.line("questions") {
        eprintln!("{line}");
    }
    if report.complete && report.shard.is_some() {
        return args.run.sweep.note_shard_done(&out);
    }
    super::common::finish_run(
        report.complete,
        report.samples.len(),
        "questions",
        &out,
        &[files::RESULTS_JSON, files::SUMMARY_JSON, files::PLOT_PNG],
    )
}
