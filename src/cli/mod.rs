//! The command-line layer: argument parsing and output; all work happens in the library.

pub mod analyze;
pub mod bench;
pub mod calibrate;
pub mod common;
pub mod doc_retrieval;
pub mod eval_ppl;
pub mod find_layer;
pub mod generate;
pub mod longbench;
pub mod merge;
pub mod output;
pub mod passkey;
pub mod ruler;

use clap::{Parser, Subcommand};

/// Run Mamba language models and extend their context with DeciMamba.
#[derive(Parser, Debug)]
#[command(name = "decimamba", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt (argument, --prompt-file, or stdin).
    Generate(generate::GenerateArgs),
    /// Passkey retrieval over lengths × depths (vanilla, DeciMamba, or both with --compare).
    Passkey(passkey::PasskeyArgs),
    /// Sliding-window perplexity vs context length (the paper's PG-19 protocol).
    EvalPpl(eval_ppl::EvalPplArgs),
    /// Multi-document retrieval on SQuAD v2 (the paper's doc-retrieval): find the document
    /// that answers the question among N noise documents.
    DocRetrieval(doc_retrieval::DocRetrievalArgs),
    /// LongBench and LongBench-E (--e): the official prompts, truncation and metrics, per
    /// task and method.
    Longbench(longbench::LongBenchArgs),
    /// RULER's synthetic tasks (niah, variable tracking, common and frequent words),
    /// generated locally as RULER's own scripts generate them.
    Ruler(ruler::RulerArgs),
    /// Prefill and decode throughput, vanilla and decimated, with peak memory.
    Bench(bench::BenchArgs),
    /// Fit MambaExtend, Mamba Modulation or LongMamba to a model on calibration text and
    /// write the policy file (--policy FILE, --methods …,FILE).
    Calibrate(calibrate::CalibrateArgs),
    /// The paper's receptive-field analyses (hidden attention, MMD, ΣΔ, ERF, global
    /// channels, the Δt profile) of one input at several lengths, with figures.
    Analyze(analyze::AnalyzeArgs),
    /// Where DeciMamba should decimate: the first global layer by MMD growth, or a sweep of
    /// candidate layers through eval-ppl or passkey; writes the best policy.
    FindLayer(find_layer::FindLayerArgs),
    /// Join the folders of a sweep run in shards (--shard I/N) into one run folder, with the
    /// results, summary and plot of an unsharded run.
    Merge(merge::MergeArgs),
}

/// Runs the CLI and returns the process exit code; errors print as one line.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Passkey(a) => passkey::run(a),
        Command::EvalPpl(a) => eval_ppl::run(a),
        Command::DocRetrieval(a) => doc_retrieval::run(a),
        Command::Longbench(a) => longbench::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::FindLayer(a) => find_layer::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Ruler(a) => ruler::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    }
}

/// An error chain flattened onto one line ("outer: inner: cause"). Only the first line of
/// each cause is kept: Candle appends a backtrace when RUST_BACKTRACE is set.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim().to_string();
        // Wrapped errors often repeat their source's text; keep it once.
        if !first.is_empty() && !parts.last().is_some_and(|p| p.ends_with(&first)) {
            parts.push(first);
        }
    }
    parts.join(": ")
}
