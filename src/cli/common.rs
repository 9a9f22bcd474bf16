//! Arguments shared by every subcommand: which model, where it runs, and decimation.

use crate::decimation::DecimationConfig;
use crate::loader::LoadedModel;
use anyhow::Result;

/// Where the model comes from and how it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hub repo id (e.g. state-spaces/mamba-130m) or local directory; default: the embedded model.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// tokenizer.json path or hub repo id; default: the model's own, else EleutherAI/gpt-neox-20b.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (the scan always accumulates in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// CPU threads (the same as setting RAYON_NUM_THREADS); default: all cores.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Run even when the memory estimate of the longest input exceeds the memory available.
    #[arg(long)]
    pub force: bool,
}

/// Refuses (unless `--force`) a prefill of `len` tokens that would not fit in memory.
/// `decimating`: some layer keeps the whole sequence to score it.
pub fn check_memory(
    model: &crate::MambaModel,
    len: usize,
    decimating: bool,
    logits_rows: usize,
    force: bool,
    what: &str,
) -> Result<()> {
    let need = crate::memory::prefill_bytes(
        model.config(),
        model.dtype(),
        len,
        model.device().is_cpu(),
        decimating,
        logits_rows,
    );
    crate::memory::check_fits(
        need,
        crate::memory::available_bytes(model.device()),
        what,
        force,
    )
}

/// The most CPU threads `--threads` accepts: more only costs time spent creating them.
pub const MAX_THREADS: usize = 1024;

/// Applies `--threads` before any thread pool starts: it sets RAYON_NUM_THREADS, which
/// rayon (and so candle) reads when its pool is first used.
pub fn apply_threads(threads: Option<usize>) -> Result<()> {
    match threads {
        None => Ok(()),
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(t) if t > MAX_THREADS => {
            anyhow::bail!("--threads {t} is more than the maximum of {MAX_THREADS}")
        }
        Some(t) => {
            std::env::set_var("RAYON_NUM_THREADS", t.to_string());
            Ok(())
        }
    }
}

/// DeciMamba settings: a preset or file, with overrides.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DecimationArgs {
    /// Preset name (passkey, pg19, doc-retrieval, zero-shot, model) or a JSON file.
    #[arg(long)]
    pub decimation: Option<String>,
    /// Override: comma-separated 0-based decimating layers (e.g. 12 or 12-20).
    #[arg(long)]
    pub deci_layers: Option<String>,
    /// Override: β, the per-layer budget factor in (0, 1].
    #[arg(long)]
    pub deci_beta: Option<f64>,
    /// Override: L_base, tokens kept by the first decimating layer.
    #[arg(long)]
    pub deci_lbase: Option<usize>,
    /// Override: the minimum kept tokens per decimating layer.
    #[arg(long)]
    pub deci_min_len: Option<usize>,
    /// Run vanilla Mamba even if a preset would apply.
    #[arg(long)]
    pub no_decimation: bool,
}

impl ModelArgs {
    /// Load the model and tokenizer this argument set names.
    pub fn load(&self) -> Result<LoadedModel> {
        apply_threads(self.threads)?;
        let loaded = crate::loader::load(self)?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        Ok(loaded)
    }
}

impl DecimationArgs {
    /// The decimation to apply, if any, validated against `model`.
    /// `None` when no decimation was asked for (or `--no-decimation`).
    pub fn resolve(&self, model: &LoadedModel) -> Result<Option<DecimationConfig>> {
        crate::decimation::resolve_args(self, &model.decimation_defaults())
    }
    /// Like [`resolve`](Self::resolve) but falls back to the model's shipped preset
    /// (or the zero-shot default) when nothing was given; used by `--compare`.
    pub fn resolve_or_default(&self, model: &LoadedModel) -> Result<DecimationConfig> {
        crate::decimation::resolve_or_default(self, &model.decimation_defaults())
    }
}

/// Flags every evaluation shares: the model, decimation, `--compare`, the run folder and
/// progress display.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalRunArgs {
    /// Run vanilla Mamba and DeciMamba on identical inputs.
    #[arg(long)]
    pub compare: bool,
    /// Output folder (rerun with the same folder to resume); default: runs/<eval>-<timestamp>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// Hide progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decimation: DecimationArgs,
}

impl EvalRunArgs {
    /// Rejects contradictory flags before any work starts.
    pub fn check(&self) -> Result<()> {
        if self.compare && self.decimation.no_decimation {
            anyhow::bail!("--compare already runs vanilla Mamba; drop --no-decimation");
        }
        Ok(())
    }

    /// The methods to run on `model`: vanilla and DeciMamba with `--compare`, else the one
    /// the decimation flags select.
    pub fn methods(&self, model: &LoadedModel) -> Result<Vec<crate::eval::Method>> {
        use crate::eval::Method;
        Ok(if self.compare {
            Method::compare(self.decimation.resolve_or_default(model)?)
        } else {
            vec![Method::from_resolved(self.decimation.resolve(model)?)]
        })
    }

    /// The run folder: `--out`, else `runs/<kind>-<timestamp>`, checked (writable, and
    /// empty or a run of this tool) before any work starts.
    pub fn out_dir(&self, kind: &str) -> Result<std::path::PathBuf> {
        let dir = self
            .out
            .clone()
            .unwrap_or_else(|| crate::eval::common::default_out_dir(kind));
        crate::eval::runlog::check_out_folder(&dir)?;
        Ok(dir)
    }

    /// Refuses (unless `--force`) a run whose longest input would not fit in memory.
    pub fn check_memory(
        &self,
        model: &LoadedModel,
        methods: &[crate::eval::Method],
        longest: usize,
        logits_rows: usize,
        what: &str,
    ) -> Result<()> {
        let decimating = methods.iter().any(|m| m.decimation.is_some());
        check_memory(
            &model.model,
            longest,
            decimating,
            logits_rows,
            self.model.force,
            &format!("{what} of {longest} tokens"),
        )
    }
}

/// Ends an evaluation run: an interrupted run is an error that says how to resume;
/// a complete one lists the files written in `out` besides the streamed results.
pub fn finish_run(
    complete: bool,
    finished: usize,
    unit: &str,
    out: &std::path::Path,
    written: &[&str],
) -> Result<()> {
    use crate::eval::runlog::RESULTS_JSONL;
    if !complete {
        anyhow::bail!(
            "interrupted after {finished} {unit}; they are saved in {} — rerun the same command (with --out {}) to resume",
            out.join(RESULTS_JSONL).display(),
            out.display()
        );
    }
    super::output::println(&format!(
        "\nwrote {RESULTS_JSONL}, {} in {}",
        written.join(", "),
        out.display()
    ))
}
