//! Token choice by score: DeciMamba's ‖Δ_t‖₂ and its top-K with a protected tail, shared
//! by the CPU path and the tests of the CUDA kernel.

/// ‖Δ_t‖₂ over the channels of each token of `delta` (`[len, d_inner]`, token-major),
/// accumulated in f64 so the ranking does not depend on how rows are split into chunks.
pub fn token_scores(delta: &[f32], d_inner: usize) -> Vec<f32> {
    delta
        .chunks_exact(d_inner)
        .map(|row| {
            row.iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect()
}

/// Indices (ascending) a decimating layer keeps given each token's score, or `None` when
/// it keeps everything. The last `tail` tokens are always kept and never compete; of the
/// others the `keep` with the largest scores stay. Ties are broken towards the earlier
/// position, so results never depend on the sort.
pub fn select_by_scores(scores: &[f32], keep: usize, tail: usize) -> Option<Vec<usize>> {
    let len = scores.len();
    let candidates = len.saturating_sub(tail);
    if candidates <= keep {
        return None;
    }
    let mut order: Vec<usize> = (0..candidates).collect();
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    // Partial selection, then sort only the kept part: O(L + K log K).
    if keep > 0 {
        order.select_nth_unstable_by(keep - 1, by_score);
    }
    let mut kept: Vec<usize> = order[..keep].to_vec();
    kept.sort_unstable();
    kept.extend(candidates..len);
    Some(kept)
}

/// Indices (ascending) a decimating layer keeps, or `None` when it keeps everything:
/// [`select_by_scores`] on [`token_scores`] of `delta` (Δ after softplus, `[len, d_inner]`).
pub fn select_tokens(
    delta: &[f32],
    d_inner: usize,
    keep: usize,
    tail: usize,
) -> Option<Vec<usize>> {
    select_by_scores(&token_scores(delta, d_inner), keep, tail)
}
