//! Text generation: one (optionally decimated) prefill, then recurrent decode steps.
//! Sampling uses candle-transformers' `LogitsProcessor` and `apply_repeat_penalty`.

use crate::decimation::DecimationConfig;
use crate::model::{DecimationTrace, ForwardOptions, LogitsSpan, MambaModel};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::time::Instant;

/// How to pick tokens.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables the penalty.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Prefill in chunks of this many tokens (state carried across chunks): memory stays
    /// bounded by the chunk however long the prompt. Not combinable with decimation, which
    /// needs Δ of the whole sequence at once.
    pub prefill_chunk: Option<usize>,
}

impl GenerateParams {
    pub fn greedy() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299792458,
            prefill_chunk: None,
        }
    }

    fn sampling(&self) -> Result<Sampling> {
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            bail!("temperature must be ≥ 0, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top-p must be in (0, 1], got {p}");
            }
        }
        if self.top_k == Some(0) {
            bail!("top-k must be at least 1");
        }
        if self.repeat_penalty.is_nan() || self.repeat_penalty <= 0.0 {
            bail!(
                "repeat penalty must be positive, got {}",
                self.repeat_penalty
            );
        }
        let temperature = self.temperature;
        Ok(if temperature == 0.0 {
            Sampling::ArgMax
        } else {
            match (self.top_k, self.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        })
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// New tokens, EOS excluded.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Decode steps run (tokens after the first).
    pub decode_steps: usize,
    pub stopped_at_eos: bool,
    /// Per-layer sequence lengths of the prefill.
    pub trace: DecimationTrace,
}

/// Generates after `prompt`; `on_token` sees each new token as it is chosen (for streaming).
pub fn generate(
    model: &MambaModel,
    prompt: &[u32],
    params: &GenerateParams,
    decimation: Option<&DecimationConfig>,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerateOutput> {
    generate_traced(model, prompt, params, decimation, false, eos, &mut on_token)
}

/// [`generate`], optionally recording the kept indices of decimating layers.
pub fn generate_traced(
    model: &MambaModel,
    prompt: &[u32],
    params: &GenerateParams,
    decimation: Option<&DecimationConfig>,
    record_indices: bool,
    eos: Option<u32>,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<GenerateOutput> {
    if prompt.is_empty() {
        bail!("the prompt is empty: nothing to condition on");
    }
    let mut processor = LogitsProcessor::from_sampling(params.seed, params.sampling()?);
    let mut state = model.new_state(1);
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), model.device())?;
    let opts = ForwardOptions {
        decimation,
        protected_tail: 1,
        logits: LogitsSpan::Last(1),
        record_indices,
    };
    let start = Instant::now();
    let (mut logits, trace) = match params.prefill_chunk {
        Some(_) if decimation.is_some() => {
            bail!("chunked prefill cannot decimate: DeciMamba scores the whole prompt at once")
        }
        Some(chunk) => (
            model.prefill_chunked(&ids, chunk, &mut state)?.squeeze(0)?,
            DecimationTrace::default(),
        ),
        None => {
            let (logits, trace) = model.forward_with_state(&ids, &mut state, &opts)?;
            (logits.context("no logits")?.squeeze(0)?.squeeze(0)?, trace)
        }
    };
    let prefill_secs = start.elapsed().as_secs_f64();

    let mut context: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut stopped_at_eos = false;
    let decode_start = Instant::now();
    let mut decode_steps = 0;
    while tokens.len() < params.max_new_tokens {
        let penalised = if params.repeat_penalty != 1.0 {
            let from = context.len().saturating_sub(params.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                params.repeat_penalty,
                &context[from..],
            )?
        } else {
            logits.clone()
        };
        let next = processor.sample(&penalised)?;
        if Some(next) == eos {
            stopped_at_eos = true;
            break;
        }
        tokens.push(next);
        context.push(next);
        on_token(next)?;
        if tokens.len() == params.max_new_tokens {
            break;
        }
        logits = model.step(&[next], &mut state)?.squeeze(0)?;
        decode_steps += 1;
    }
    Ok(GenerateOutput {
        tokens,
        prompt_len: prompt.len(),
        prefill_secs,
        decode_secs: decode_start.elapsed().as_secs_f64(),
        decode_steps,
        stopped_at_eos,
        trace,
    })
}
