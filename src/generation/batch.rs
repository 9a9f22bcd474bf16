//! Batched generation: prompts of one length prefilled as one `[batch, len]` input, then
//! decoded together, one step for every row at a time. Each row keeps its own sampler,
//! seeded as a generation of that prompt alone would be, so the outputs equal generating
//! the prompts one by one. Rows that stop early (EOS or their budget) keep stepping on a
//! dummy token, which touches no other row's state, until every row is done.

use super::{choose_next, GenerateOutput, GenerateParams};
use crate::model::{ForwardOptions, ForwardTrace, InferenceState, LogitsSpan, MambaModel};
use crate::policy::ContextPolicy;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::time::Instant;

/// Generates after each of `prompts` (all of one length) in one batch.
pub fn generate_batch(
    model: &MambaModel,
    prompts: &[&[u32]],
    params: &GenerateParams,
    policy: Option<&dyn ContextPolicy>,
    eos: Option<u32>,
) -> Result<Vec<GenerateOutput>> {
    let Some(first) = prompts.first() else {
        return Ok(Vec::new());
    };
    let len = first.len();
    if len == 0 {
        bail!("the prompt is empty: nothing to condition on");
    }
    if prompts.iter().any(|p| p.len() != len) {
        bail!("a batch of prompts must share one length (group prompts by length)");
    }
    if params.prefill_chunk.is_some() && policy.is_some() {
        bail!("chunked prefill cannot run a context policy: it plans on the whole prompt at once");
    }
    let batch = prompts.len();
    let sampling = params.sampling()?;
    let mut processors: Vec<LogitsProcessor> = (0..batch)
        .map(|_| LogitsProcessor::from_sampling(params.seed, sampling.clone()))
        .collect();
    let start = Instant::now();
    // A batched prefill is no faster per token on the CPU (and its larger working set can be
    // slower), so there the rows prefill one by one and only decode runs batched.
    let (mut logits, trace, mut state) = if model.device().is_cpu() && batch > 1 {
        let mut rows = Vec::with_capacity(batch);
        let mut states = Vec::with_capacity(batch);
        let mut trace = Default::default();
        for p in prompts {
            let (l, t, s) = prefill(model, &[p], params, policy)?;
            rows.push(l);
            states.push(s);
            trace = t;
        }
        (
            Tensor::cat(&rows, 0)?,
            trace,
            InferenceState::stack(states)?,
        )
    } else {
        prefill(model, prompts, params, policy)?
    };
    let prefill_secs = start.elapsed().as_secs_f64() / batch as f64;

    let mut contexts: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut stopped_at_eos = vec![false; batch];
    let mut decode_steps = vec![0usize; batch];
    let mut active = vec![params.max_new_tokens > 0; batch];
    let decode_start = Instant::now();
    // Greedy without a penalty needs no sampler state: one argmax over the whole batch and
    // one copy to the host per step, instead of a copy of every row's logits.
    let batch_argmax = matches!(sampling, Sampling::ArgMax) && params.repeat_penalty == 1.0;
    while active.iter().any(|&a| a) {
        let mut next_ids = vec![0u32; batch];
        let greedy = if batch_argmax {
            Some(greedy_rows(&logits, params.vocab_size)?)
        } else {
            None
        };
        for row in 0..batch {
            if !active[row] {
                continue;
            }
            let next = match &greedy {
                Some(ids) => ids[row],
                None => {
                    let row_logits = logits.get(row)?;
                    choose_next(&mut processors[row], &row_logits, params, &contexts[row])?
                }
            };
            if Some(next) == eos {
                stopped_at_eos[row] = true;
                active[row] = false;
                continue;
            }
            tokens[row].push(next);
            contexts[row].push(next);
            next_ids[row] = next;
            if tokens[row].len() == params.max_new_tokens {
                active[row] = false;
            }
        }
        if !active.iter().any(|&a| a) {
            break;
        }
        logits = model.step(&next_ids, &mut state)?;
        for (row, steps) in decode_steps.iter_mut().enumerate() {
            if active[row] {
                *steps += 1;
            }
        }
    }
    let decode_secs = decode_start.elapsed().as_secs_f64();
    Ok((0..batch)
        .map(|row| GenerateOutput {
            tokens: std::mem::take(&mut tokens[row]),
            prompt_len: len,
            prefill_secs,
            decode_secs,
            decode_steps: decode_steps[row],
            stopped_at_eos: stopped_at_eos[row],
            trace: trace.clone(),
        })
        .collect())
}

/// One prefill of `prompts` (one length) as a batch: the last logits `[batch, vocab]`, the
/// trace and the state.
/// The greedy token of every row of `logits` (`[batch, vocab]`): the same masking and the
/// same f32 argmax as [`choose_next`] under `Sampling::ArgMax` applies to each row, so the
/// same tokens.
fn greedy_rows(logits: &Tensor, vocab_size: Option<usize>) -> Result<Vec<u32>> {
    let logits = logits.to_dtype(DType::F32)?;
    let (rows, n) = logits.dims2()?;
    let logits = match vocab_size {
        Some(v) if v < n => {
            let tail = Tensor::full(f32::NEG_INFINITY, (rows, n - v), logits.device())?;
            Tensor::cat(&[&logits.narrow(1, 0, v)?, &tail], 1)?
        }
        _ => logits,
    };
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

fn prefill(
    model: &MambaModel,
    prompts: &[&[u32]],
    params: &GenerateParams,
    policy: Option<&dyn ContextPolicy>,
) -> Result<(Tensor, ForwardTrace, InferenceState)> {
    let (batch, len) = (prompts.len(), prompts[0].len());
    let mut state = model.new_state(batch);
    let flat: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
    let ids = Tensor::from_vec(flat, (batch, len), model.device())?;
    Ok(match params.prefill_chunk {
        Some(chunk) => (
            model.prefill_chunked(&ids, chunk, &mut state)?,
            ForwardTrace::default(),
            state,
        ),
        None => {
            let opts = ForwardOptions {
                policy,
                protected_tail: 1,
                logits: LogitsSpan::Last(1),
                record_indices: false,
                observer: None,
            };
            let (logits, trace) = model.forward_with_state(&ids, &mut state, &opts)?;
            (logits.context("no logits")?.squeeze(1)?, trace, state)
        }
    })
}

/// Indices of prompts of lengths `lens` in batches: prompts of one length together, lengths
/// in order of first appearance, at most `batch_size` to a batch.
pub fn length_groups(lens: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = Vec::new();
    let mut by_len: std::collections::HashMap<usize, Vec<usize>> = Default::default();
    for (i, &len) in lens.iter().enumerate() {
        by_len
            .entry(len)
            .or_insert_with(|| {
                order.push(len);
                Vec::new()
            })
            .push(i);
    }
    order
        .iter()
        .flat_map(|len| {
            by_len[len]
                .chunks(batch_size.max(1))
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::length_groups;

    #[test]
    fn prompts_group_by_length_in_order_of_first_appearance() {
        let lens = [5, 3, 5, 5, 3, 7, 5];
        assert_eq!(
            length_groups(&lens, 2),
            vec![vec![0, 2], vec![3, 6], vec![1, 4], vec![5]]
        );
        assert_eq!(length_groups(&lens, 1).len(), lens.len());
        assert!(length_groups(&[], 4).is_empty());
    }
}
