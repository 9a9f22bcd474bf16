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
        crate::loader::load(self)
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
