//! `decimamba merge`: join the folders of a sharded sweep into one run folder.

use crate::eval::merge::merge_runs;
use crate::eval::runlog::{RESULTS_JSONL, RUN_JSON};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The shard folders (`--out` of each `--shard I/N` run of one command).
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// The merged run folder (new or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let report = merge_runs(&args.dirs, &args.out)?;
    super::output::print(&report.table)?;
    super::output::println(&format!(
        "\nmerged {} folders ({} {} units) into {}; wrote {RUN_JSON}, {RESULTS_JSONL}, {}",
        report.shards,
        report.units,
        report.eval,
        args.out.display(),
        report.written.join(", ")
    ))
}
