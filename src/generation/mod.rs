//! Text generation: one (optionally decimated) prefill, then recurrent decode steps.
//! Sampling uses candle-transformers' `LogitsProcessor` and `apply_repeat_penalty`.

mod batch;

pub use batch::{generate_batch, length_groups};

use crate::model::{ForwardOptions, ForwardTrace, LogitsSpan, MambaModel};
use crate::policy::ContextPolicy;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
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
    /// The tokenizer's vocabulary size: logits at ids at or above it (the rows the
    /// checkpoint pads its embedding with) are never chosen. `None` masks nothing.
    pub vocab_size: Option<usize>,
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
            vocab_size: None,
        }
    }

    /// Checks the settings (ranges of temperature, top-k, top-p, penalty) without
    /// generating anything; generation runs the same checks.
    pub fn validate(&self) -> Result<()> {
        self.sampling().map(|_| ())
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
        if self.vocab_size == Some(0) {
            bail!("the vocabulary size must be at least 1");
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

/// `logits` (one row of scores, `[vocab]`) with every id at or above `vocab_size` set to
/// -inf, so neither argmax nor sampling can pick it; unchanged when `vocab_size` is `None`
/// or covers every logit.
pub(crate) fn mask_vocab(logits: &Tensor, vocab_size: Option<usize>) -> Result<Tensor> {
    let n = logits.dim(0)?;
    match vocab_size {
        Some(v) if v < n => {
            let logits = logits.to_dtype(DType::F32)?;
            let tail = Tensor::full(f32::NEG_INFINITY, n - v, logits.device())?;
            Ok(Tensor::cat(&[&logits.narrow(0, 0, v)?, &tail], 0)?)
        }
        _ => Ok(logits.clone()),
    }
}

/// Picks the next token from `logits`: masks the ids past the vocabulary, applies the
/// repetition penalty over the last `repeat_last_n` tokens of `context`, then samples.
fn choose_next(
    processor: &mut LogitsProcessor,
    logits: &Tensor,
    params: &GenerateParams,
    context: &[u32],
) -> Result<u32> {
    let masked = mask_vocab(logits, params.vocab_size)?;
    let penalised = if params.repeat_penalty != 1.0 {
        let from = context.len().saturating_sub(params.repeat_last_n);
        candle_transformers::utils::apply_repeat_penalty(
            &masked,
            params.repeat_penalty,
            &context[from..],
        )?
    } else {
        masked
    };
    Ok(processor.sample(&penalised)?)
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
    pub trace: ForwardTrace,
}

/// Generates after `prompt`; `on_token` sees each new token as it is chosen (for streaming).
pub fn generate(
    model: &MambaModel,
    prompt: &[u32],
    params: &GenerateParams,
    policy: Option<&dyn ContextPolicy>,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerateOutput> {
    generate_traced(model, prompt, params, policy, false, eos, &mut on_token)
}

/// [`generate`], optionally recording the kept indices of token-dropping layers.
pub fn generate_traced(
    model: &MambaModel,
    prompt: &[u32],
    params: &GenerateParams,
    policy: Option<&dyn ContextPolicy>,
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
        policy,
        protected_tail: 1,
        logits: LogitsSpan::Last(1),
        record_indices,
        observer: None,
    };
    let start = Instant::now();
    let (mut logits, trace) = match params.prefill_chunk {
        Some(_) if policy.is_some_and(|p| !p.reported_layers().is_empty()) => {
            bail!("chunked prefill cannot decimate: DeciMamba scores the whole prompt at once")
        }
        Some(_) if policy.is_some() => bail!(
            "chunked prefill cannot run the {} policy: it plans on the whole prompt at once",
            policy.map_or("", |p| p.name())
        ),
        Some(chunk) => (
            model.prefill_chunked(&ids, chunk, &mut state)?.squeeze(0)?,
            ForwardTrace::default(),
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
        let next = choose_next(&mut processor, &logits, params, &context)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Five logits whose largest sits in the padded tail (ids 3 and 4).
    fn padded_logits() -> Tensor {
        Tensor::new(&[1.0f32, 2.0, 3.0, 50.0, 40.0], &Device::Cpu).unwrap()
    }

    fn params(temperature: f64, vocab_size: Option<usize>) -> GenerateParams {
        GenerateParams {
            temperature,
            vocab_size,
            ..GenerateParams::greedy()
        }
    }

    #[test]
    fn mask_sets_the_padded_tail_to_minus_infinity() {
        let m = mask_vocab(&padded_logits(), Some(3)).unwrap();
        let v: Vec<f32> = m.to_vec1().unwrap();
        assert_eq!(&v[..3], &[1.0, 2.0, 3.0]);
        assert!(v[3..].iter().all(|x| *x == f32::NEG_INFINITY), "{v:?}");
        for vocab in [None, Some(5), Some(9)] {
            let v: Vec<f32> = mask_vocab(&padded_logits(), vocab)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(v, vec![1.0, 2.0, 3.0, 50.0, 40.0]);
        }
    }

    #[test]
    fn greedy_never_picks_a_padded_id() {
        let p = params(0.0, Some(3));
        let mut proc = LogitsProcessor::from_sampling(p.seed, p.sampling().unwrap());
        assert_eq!(
            choose_next(&mut proc, &padded_logits(), &p, &[0]).unwrap(),
            2
        );
        let unmasked = params(0.0, None);
        assert_eq!(
            choose_next(&mut proc, &padded_logits(), &unmasked, &[0]).unwrap(),
            3
        );
    }

    #[test]
    fn sampling_never_picks_a_padded_id() {
        let configs = [
            (None, None, 1.0),
            (Some(4), None, 1.0),
            (None, Some(0.99), 1.0),
            (Some(4), Some(0.99), 1.0),
            (None, None, 1.3),
        ];
        for (top_k, top_p, repeat_penalty) in configs {
            let p = GenerateParams {
                top_k,
                top_p,
                repeat_penalty,
                ..params(100.0, Some(3))
            };
            let mut proc = LogitsProcessor::from_sampling(7, p.sampling().unwrap());
            let mut seen = [0usize; 5];
            for _ in 0..300 {
                let id = choose_next(&mut proc, &padded_logits(), &p, &[3, 4]).unwrap();
                seen[id as usize] += 1;
            }
            assert_eq!(&seen[3..], &[0, 0], "{top_k:?} {top_p:?}: {seen:?}");
            assert!(seen[..3].iter().all(|n| *n > 0), "{seen:?}");
        }
        // Without the mask, the same sampling does pick the tail.
        let p = params(100.0, None);
        let mut proc = LogitsProcessor::from_sampling(7, p.sampling().unwrap());
        assert!((0..300).any(|_| choose_next(&mut proc, &padded_logits(), &p, &[]).unwrap() >= 3));
    }

    #[test]
    fn a_zero_vocabulary_is_an_error() {
        let err = params(0.0, Some(0)).sampling().unwrap_err();
        assert!(err.to_string().contains("vocabulary size"), "{err}");
    }
}
