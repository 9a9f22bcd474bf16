//! DeciMamba's token choice in Candle ops, for the Candle-ops backend: ‖Δ_t‖₂ scores, the
//! top-K with ties to the earlier token and the protected tail, as the host rule
//! `policy::select::select_by_scores`, without sorting (see `candle_ops.rs` for why).

use crate::policy::KeepRule;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// DeciMamba's token choice on Δ (`[B·L, D]`): per row, the `keep` candidates of the first
/// `L − tail` with the largest ‖Δ_t‖₂ (ties to the earlier token), ascending, then the
/// protected tail, as indices into the flattened B·L tokens; `None` when the candidates
/// fit the budget. The same rule as `policy::select::select_by_scores`.
pub(super) fn keep_tokens(
    delta: &Tensor,
    (batch, len, di): (usize, usize, usize),
    rule: KeepRule,
) -> Result<Option<Tensor>> {
    let candidates = len.saturating_sub(rule.protected_tail);
    if candidates <= rule.keep {
        return Ok(None);
    }
    if len >= F32_EXACT_INT {
        bail!("the Candle-ops backend chooses tokens among fewer than 2^24 (got {len})");
    }
    let device = delta.device();
    let scores = delta
        .reshape((batch, len, di))?
        .sqr()?
        .sum(D::Minus1)?
        .sqrt()?;
    let pool = scores.narrow(1, 0, candidates)?.contiguous()?;
    let chosen = match rule.keep {
        0 => Tensor::zeros((batch, 0), DType::F32, device)?,
        k => {
            let kth = Tensor::from_vec(kth_largest(&pool, k)?, (batch, 1), device)?;
            let above = pool.broadcast_gt(&kth)?.to_dtype(DType::F32)?;
            let tied = pool.broadcast_eq(&kth)?.to_dtype(DType::F32)?;
            // The tied tokens still needed, taken in position order.
            let need = above.sum_keepdim(1)?.affine(-1.0, k as f64)?;
            let first_ties = inclusive_cumsum(&tied)?
                .broadcast_le(&need)?
                .to_dtype(DType::F32)?;
            set_positions(&(above + (tied * first_ties)?)?, k)?
        }
    };
    let tail: Vec<f32> = (candidates..len).map(|i| i as f32).collect();
    let tail = Tensor::from_vec(tail, (1, len - candidates), device)?.repeat((batch, 1))?;
    let row_start: Vec<f32> = (0..batch).map(|b| (b * len) as f32).collect();
    let row_start = Tensor::from_vec(row_start, (batch, 1), device)?;
    let kept = Tensor::cat(&[chosen, tail], 1)?.broadcast_add(&row_start)?;
    Ok(Some(kept.flatten_all()?.to_dtype(DType::U32)?))
}

/// f32 holds every integer below this exactly: counts and positions stay exact under it.
const F32_EXACT_INT: usize = 1 << 24;

/// The k-th largest value of each row of `scores` (`[B, C]`, non-negative, k ≤ C), found
/// exactly by bisection on the f32 bit patterns (which order non-negative floats as
/// integers): at most 31 rounds of counting the scores ≥ a probe, all rows at once.
fn kth_largest(scores: &Tensor, k: usize) -> Result<Vec<f32>> {
    let rows = scores.dim(0)?;
    // Invariant: at least k scores are ≥ lo, fewer than k are ≥ hi (a NaN: none is).
    let mut lo = vec![0u32; rows];
    let mut hi = vec![0x7f80_0001u32; rows];
    while lo.iter().zip(&hi).any(|(l, h)| h - l > 1) {
        let mid: Vec<u32> = lo.iter().zip(&hi).map(|(l, h)| l + (h - l) / 2).collect();
        let probe: Vec<f32> = mid.iter().map(|&b| f32::from_bits(b)).collect();
        let probe = Tensor::from_vec(probe, (rows, 1), scores.device())?;
        let counts = scores
            .broadcast_ge(&probe)?
            .to_dtype(DType::F32)?
            .sum(1)?
            .to_vec1::<f32>()?;
        for r in 0..rows {
            if hi[r] - lo[r] > 1 {
                match counts[r] as usize >= k {
                    true => lo[r] = mid[r],
                    false => hi[r] = mid[r],
                }
            }
        }
    }
    Ok(lo.into_iter().map(f32::from_bits).collect())
}

/// Block length of [`inclusive_cumsum`]: one `[·, 256] × [256, 256]` matmul per level.
const CUMSUM_BLOCK: usize = 256;

/// Inclusive prefix sums along the last dim of `x` (`[rows, n]`, f32 holding small
/// integers, so every sum is exact): within blocks of [`CUMSUM_BLOCK`] by a matmul with an
/// upper-triangular matrix of ones, then the blocks' totals, recursively. O(n · block)
/// work and memory, where Candle's `cumsum` builds an n × n matrix.
fn inclusive_cumsum(x: &Tensor) -> Result<Tensor> {
    let (rows, n) = x.dims2()?;
    let device = x.device();
    let upper = |m: usize| -> Result<Tensor> {
        let ones: Vec<f32> = (0..m * m)
            .map(|e| f32::from(u8::from(e / m <= e % m)))
            .collect();
        Ok(Tensor::from_vec(ones, (m, m), device)?)
    };
    if n <= CUMSUM_BLOCK {
        return Ok(x.contiguous()?.matmul(&upper(n)?)?);
    }
    let blocks = n.div_ceil(CUMSUM_BLOCK);
    let pad = blocks * CUMSUM_BLOCK - n;
    let padded = match pad {
        0 => x.contiguous()?,
        _ => Tensor::cat(&[x, &Tensor::zeros((rows, pad), DType::F32, device)?], 1)?,
    };
    let within = padded
        .reshape((rows * blocks, CUMSUM_BLOCK))?
        .matmul(&upper(CUMSUM_BLOCK)?)?
        .reshape((rows, blocks, CUMSUM_BLOCK))?;
    let totals = within
        .narrow(2, CUMSUM_BLOCK - 1, 1)?
        .reshape((rows, blocks))?;
    let before = (inclusive_cumsum(&totals)? - &totals)?;
    let sums = within.broadcast_add(&before.unsqueeze(2)?)?;
    Ok(sums
        .reshape((rows, blocks * CUMSUM_BLOCK))?
        .narrow(1, 0, n)?)
}

/// The positions (ascending, as f32) of the `count` ones of each row of `mask`
/// (`[B, C]`, 0/1, exactly `count` ones per row): the j-th is the first position whose
/// prefix count reaches j + 1, found for all j at once by binary search, each step one
/// gather of the prefix counts. O(count · log C) without sorting or scattering.
fn set_positions(mask: &Tensor, count: usize) -> Result<Tensor> {
    let (rows, c) = mask.dims2()?;
    let device = mask.device();
    let prefix = inclusive_cumsum(mask)?.flatten_all()?;
    let target: Vec<f32> = (1..=count).map(|j| j as f32).collect();
    let target = Tensor::from_vec(target, (1, count), device)?.repeat((rows, 1))?;
    let row_start: Vec<f32> = (0..rows).map(|b| (b * c) as f32).collect();
    let row_start = Tensor::from_vec(row_start, (rows, 1), device)?;
    let mut lo = Tensor::zeros((rows, count), DType::F32, device)?;
    let mut hi = Tensor::full((c - 1) as f32, (rows, count), device)?;
    // The answer stays in [lo, hi]; the range halves each step.
    let steps = usize::BITS - (c - 1).leading_zeros() + 1;
    for _ in 0..steps {
        let mid = ((&lo + &hi)? * 0.5)?.floor()?;
        let at = mid
            .broadcast_add(&row_start)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
        let reached = prefix
            .index_select(&at, 0)?
            .reshape((rows, count))?
            .ge(&target)?
            .to_dtype(DType::F32)?;
        let missed = reached.affine(-1.0, 1.0)?;
        hi = ((&reached * &mid)? + (&missed * &hi)?)?;
        lo = ((&reached * &lo)? + (&missed * (mid + 1.0)?)?)?;
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::select::select_by_scores;
    use candle_core::Device;

    fn keep_on_host(scores: &[f32], keep: usize, tail: usize) -> Option<Vec<usize>> {
        let len = scores.len();
        // Δ with one channel: ‖Δ_t‖₂ is the score itself.
        let delta = Tensor::from_slice(scores, (len, 1), &Device::Cpu).unwrap();
        let rule = KeepRule {
            keep,
            protected_tail: tail,
        };
        keep_tokens(&delta, (1, len, 1), rule).unwrap().map(|t| {
            t.to_vec1::<u32>()
                .unwrap()
                .into_iter()
                .map(|i| i as usize)
                .collect()
        })
    }

    #[test]
    fn top_k_equals_the_host_rule_with_ties_and_long_rows() {
        // Many exact ties (values from a small set), rows longer than a cumsum block.
        for (len, keep, tail, levels) in [
            (10, 3, 1, 3),
            (700, 100, 5, 4),
            (1000, 999, 0, 2),
            (3000, 1, 2, 1),
            (600, 0, 3, 5),
            (70_000, 2000, 1, 7),
        ] {
            let scores: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 + 13) % levels) as f32 * 0.25)
                .collect();
            let want = select_by_scores(&scores, keep, tail);
            assert_eq!(
                keep_on_host(&scores, keep, tail),
                want,
                "len {len} keep {keep}"
            );
        }
    }

    #[test]
    fn batch_rows_choose_their_own_tokens() {
        let (len, di) = (40, 3);
        let delta: Vec<f32> = (0..2 * len * di)
            .map(|i| ((i * 37 % 11) as f32 + 0.5) / 7.0)
            .collect();
        let t = Tensor::from_slice(&delta, (2 * len, di), &Device::Cpu).unwrap();
        let rule = KeepRule {
            keep: 9,
            protected_tail: 2,
        };
        let got = keep_tokens(&t, (2, len, di), rule).unwrap().unwrap();
        let got: Vec<usize> = got
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .map(|&i| i as usize)
            .collect();
        let mut want = Vec::new();
        for b in 0..2 {
            let row = &delta[b * len * di..(b + 1) * len * di];
            let idx = crate::policy::select::select_tokens(row, di, 9, 2).unwrap();
            want.extend(idx.into_iter().map(|i| b * len + i));
        }
        assert_eq!(got, want);
    }

    #[test]
    fn blocked_cumsum_is_exact() {
        for n in [1, 255, 256, 257, 70_000] {
            let x: Vec<f32> = (0..2 * n).map(|i| ((i * 31) % 3) as f32).collect();
            let got = inclusive_cumsum(&Tensor::from_slice(&x, (2, n), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut want = Vec::with_capacity(2 * n);
            for row in x.chunks(n) {
                let mut acc = 0.0;
                want.extend(row.iter().map(|v| {
                    acc += v;
                    acc
                }));
            }
            assert_eq!(got, want, "n {n}");
        }
    }
}
