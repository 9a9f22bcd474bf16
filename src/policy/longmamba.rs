//! LongMamba (Ye et al., "LongMamba: Enhancing Mamba's Long Context Capabilities via
//! Training-Free Receptive Field Enlargement", ICLR 2025; GATECH-EIC/LongMamba), adapted
//! from Mamba-2 to Mamba-1.
//!
//! Calibration (their `load_align_target.py`) runs windows of the training length through
//! the vanilla model and, per layer and channel c:
//! - clamps Δ at its k-th largest value, k = max(1, int(L·clamp_fraction)): Δ̃;
//! - S_c = Σ_t Δ̃_{c,t}, and decay_c = exp(max_n A_{c,n} · S_c);
//! - for each target length Lt: sorts Δ̃ descending, resamples it linearly to Lt points
//!   (`F.interpolate`, `align_corners=False`), top_k = (first index where the cumsum
//!   exceeds S_c) + 1, and θ_c(Lt) = the resampled value at top_k;
//! - aggregates windows by element-wise max (their max-aggregation script; one other
//!   script of theirs averages instead).
//!
//! Inference (their `mamba2.py` forward): once the input reaches `activate_from` tokens
//! (theirs: `int(L/1e3) > 2`, i.e. 3000 for 2K training, 1.5×), the stored Lt nearest to
//! the input length is used; in global channels (decay_c > `global_threshold`, theirs 0.05)
//! Δ_{t,c} ← 0 wherever Δ_{t,c} ≤ θ_c: that channel skips the token, with no decay and no
//! input. Local channels are untouched.
//!
//! The Mamba-1 adaptation (ours, not theirs): Mamba-2 has one scalar A per head, Mamba-1 a
//! (d_inner, d_state) matrix, so a channel's decay uses its least negative A_{c,n}, the
//! slowest-decaying state. Their θ index top_k can reach Lt, one past the end; ours takes
//! the last point then.

use super::{ContextPolicy, LayerPlan};
use crate::model::MambaConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The calibrated statistics of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerThresholds {
    /// decay_c = exp(max_n A_{c,n} · S_c), one per channel (d_inner).
    pub decay: Vec<f32>,
    /// θ_c(Lt): one list of d_inner thresholds per entry of `lengths`.
    pub thresholds: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongMamba {
    /// Length of the calibration windows (the training length).
    pub train_len: usize,
    /// Inputs shorter than this run vanilla.
    pub activate_from: usize,
    /// A channel is global when its decay exceeds this.
    pub global_threshold: f32,
    pub clamp_fraction: f64,
    pub n_layer: usize,
    pub d_inner: usize,
    /// Target lengths Lt, ascending.
    pub lengths: Vec<usize>,
    pub layers: Vec<LayerThresholds>,
}

/// The default of `activate_from`: 1.5 × the training length, as their 3,000 for 2K.
pub fn default_activate_from(train_len: usize) -> usize {
    train_len + train_len / 2
}

impl LongMamba {
    /// Index into `lengths` of the one nearest to `len` (ties: the shorter).
    pub fn nearest_length(&self, len: usize) -> Option<usize> {
        self.lengths
            .iter()
            .enumerate()
            .min_by_key(|(_, &lt)| lt.abs_diff(len))
            .map(|(i, _)| i)
    }

    /// Channels of `layer` that are global.
    pub fn global_channels(&self, layer: usize) -> Vec<usize> {
        self.layers[layer]
            .decay
            .iter()
            .enumerate()
            .filter(|(_, &d)| d > self.global_threshold)
            .map(|(c, _)| c)
            .collect()
    }
}

impl ContextPolicy for LongMamba {
    fn name(&self) -> &str {
        super::LONGMAMBA
    }

    fn check(&self, config: &MambaConfig) -> Result<()> {
        if self.n_layer != config.n_layer || self.d_inner != config.d_inner {
            bail!(
                "longmamba thresholds were calibrated for a model with {} layers and d_inner {}, but this one has {} and {}",
                self.n_layer,
                self.d_inner,
                config.n_layer,
                config.d_inner
            );
        }
        if self.layers.len() != self.n_layer {
            bail!(
                "longmamba policy lists {} layers but says n_layer {}",
                self.layers.len(),
                self.n_layer
            );
        }
        if self.lengths.is_empty() {
            bail!("longmamba policy has no target lengths");
        }
        if !self.global_threshold.is_finite() || self.global_threshold < 0.0 {
            bail!(
                "longmamba global_threshold must be finite and ≥ 0, got {}",
                self.global_threshold
            );
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if layer.decay.len() != self.d_inner {
                bail!(
                    "longmamba layer {l} has {} decays, expected d_inner = {}",
                    layer.decay.len(),
                    self.d_inner
                );
            }
            if layer.thresholds.len() != self.lengths.len() {
                bail!(
                    "longmamba layer {l} has thresholds for {} lengths, expected {}",
                    layer.thresholds.len(),
                    self.lengths.len()
                );
            }
            for t in &layer.thresholds {
                if t.len() != self.d_inner {
                    bail!(
                        "longmamba layer {l} has a threshold list of {} channels, expected {}",
                        t.len(),
                        self.d_inner
                    );
                }
                if let Some(bad) = t.iter().find(|v| !v.is_finite()) {
                    bail!("longmamba layer {l} has a non-finite threshold {bad}");
                }
            }
        }
        Ok(())
    }

    fn settings(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a longmamba policy serialises");
        v.as_object_mut()
            .expect("an object")
            .insert("method".into(), super::LONGMAMBA.into());
        v
    }

    fn plan(&self, layer: usize, current_len: usize, _: usize) -> LayerPlan {
        if current_len < self.activate_from {
            return LayerPlan::default();
        }
        let (Some(stats), Some(li)) = (self.layers.get(layer), self.nearest_length(current_len))
        else {
            return LayerPlan::default();
        };
        let theta: Vec<f32> = stats
            .decay
            .iter()
            .zip(&stats.thresholds[li])
            .map(|(&d, &t)| {
                if d > self.global_threshold {
                    t
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        if theta.iter().all(|t| *t == f32::NEG_INFINITY) {
            return LayerPlan::default();
        }
        LayerPlan {
            delta_filter: Some(theta.into()),
            ..Default::default()
        }
    }
}

/// `x` resampled to `n` points as torch's `F.interpolate(mode="linear",
/// align_corners=False)` does.
pub fn resample_linear(x: &[f64], n: usize) -> Vec<f64> {
    (0..n).map(|i| resampled_at(x, n, i)).collect()
}

/// Point `i` of `x` resampled to `n` points (see [`resample_linear`]).
fn resampled_at(x: &[f64], n: usize, i: usize) -> f64 {
    let len = x.len();
    let src = ((i as f64 + 0.5) * (len as f64 / n as f64) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(len - 1);
    let i1 = (i0 + 1).min(len - 1);
    let lambda = src - i0 as f64;
    (1.0 - lambda) * x[i0] + lambda * x[i1]
}

/// One window's statistics for one layer: decay per channel and θ per (length, channel).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    pub decay: Vec<f64>,
    pub thresholds: Vec<Vec<f64>>,
}

/// The statistics of one calibration window for one layer from its vanilla Δ
/// (`[len, d_inner]`, token-major) and A (`[d_inner, d_state]`).
pub fn window_stats(
    delta: &[f32],
    d_inner: usize,
    a: &[f32],
    d_state: usize,
    clamp_fraction: f64,
    lengths: &[usize],
) -> WindowStats {
    use rayon::prelude::*;
    let len = delta.len() / d_inner;
    let k = ((len as f64 * clamp_fraction) as usize).max(1);
    // Channels are independent: each returns (decay, θ per length).
    let per_channel: Vec<(f64, Vec<f64>)> = (0..d_inner)
        .into_par_iter()
        .map(|c| {
            let mut column: Vec<f64> = (0..len).map(|t| delta[t * d_inner + c] as f64).collect();
            // Descending; the k-th largest is the clamp.
            column.sort_by(|a, b| b.total_cmp(a));
            let cap = column[k.min(len) - 1];
            for v in column.iter_mut() {
                *v = v.min(cap);
            }
            let s: f64 = column.iter().sum();
            let slowest = a[c * d_state..(c + 1) * d_state]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let thetas = lengths
                .iter()
                .map(|&lt| {
                    // The resampled points are computed only up to the first cumulative
                    // sum above S (about L of the Lt points), not materialised.
                    let mut cum = 0.0;
                    let mut first = 0;
                    for i in 0..lt {
                        cum += resampled_at(&column, lt, i);
                        if cum > s {
                            first = i;
                            break;
                        }
                    }
                    resampled_at(&column, lt, (first + 1).min(lt - 1))
                })
                .collect();
            ((slowest * s).exp(), thetas)
        })
        .collect();
    let decay = per_channel.iter().map(|(d, _)| *d).collect();
    let thresholds = (0..lengths.len())
        .map(|li| per_channel.iter().map(|(_, t)| t[li]).collect())
        .collect();
    WindowStats { decay, thresholds }
}

/// Element-wise max over windows (`acc` starts as the first window's statistics).
pub fn aggregate_max(acc: &mut WindowStats, next: &WindowStats) {
    for (a, b) in acc.decay.iter_mut().zip(&next.decay) {
        *a = a.max(*b);
    }
    for (ta, tb) in acc.thresholds.iter_mut().zip(&next.thresholds) {
        for (a, b) in ta.iter_mut().zip(tb) {
            *a = a.max(*b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_matches_torch_linear() {
        // torch's F.interpolate(size=6, mode="linear", align_corners=False) on (4, 3, 1, 0),
        // by its definition.
        let got = resample_linear(&[4.0, 3.0, 1.0, 0.0], 6);
        // src = (i+0.5)·4/6 − 0.5, clamped at 0: 0, 0.5, 7/6, 11/6, 2.5, 19/6 (→ last).
        let by_def = [
            4.0,
            0.5 * 4.0 + 0.5 * 3.0,
            (5.0 / 6.0) * 3.0 + (1.0 / 6.0) * 1.0,
            (1.0 / 6.0) * 3.0 + (5.0 / 6.0) * 1.0,
            0.5 * 1.0 + 0.5 * 0.0,
            0.0,
        ];
        for (g, w) in got.iter().zip(by_def) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn window_stats_follow_the_rule() {
        // One channel, Δ = (0.4, 0.1, 0.35, 0.2), clamp 0.5 → k = 2, cap 0.35:
        // Δ̃ sorted = (0.35, 0.35, 0.2, 0.1), S = 1; A = (−2, −1) → decay = exp(−1).
        // Resampled to 8 (src 0, .25, .75, 1.25, 1.75, 2.25, 2.75, 3): .35, .35, .35,
        // .3125, .2375, .175, .125, .1; the cumsum first exceeds 1 at index 2, so
        // top_k = 3 and θ = .3125.
        let st = window_stats(&[0.4, 0.1, 0.35, 0.2], 1, &[-2.0, -1.0], 2, 0.5, &[8]);
        assert!((st.decay[0] - (-1.0f64).exp()).abs() < 1e-6, "{st:?}");
        assert!((st.thresholds[0][0] - 0.3125).abs() < 1e-6, "{st:?}");
        let mut acc = st.clone();
        let other = WindowStats {
            decay: vec![0.9],
            thresholds: vec![vec![0.1]],
        };
        aggregate_max(&mut acc, &other);
        assert_eq!(acc.decay, vec![0.9]);
        assert_eq!(acc.thresholds, st.thresholds);
    }

    #[test]
    fn nearest_length_prefers_the_shorter_on_ties() {
        let p = LongMamba {
            train_len: 10,
            activate_from: 15,
            global_threshold: 0.05,
            clamp_fraction: 0.15,
            n_layer: 1,
            d_inner: 2,
            lengths: vec![20, 40],
            layers: vec![LayerThresholds {
                decay: vec![0.5, 0.01],
                thresholds: vec![vec![0.1, 0.2], vec![0.3, 0.4]],
            }],
        };
        assert_eq!(p.nearest_length(30), Some(0));
        assert_eq!(p.nearest_length(31), Some(1));
        assert!(p.plan(0, 14, 1).is_vanilla());
        let plan = p.plan(0, 35, 1);
        let f = plan.delta_filter.unwrap();
        assert_eq!(f[0], 0.3);
        assert_eq!(f[1], f32::NEG_INFINITY);
        assert_eq!(p.global_channels(0), vec![0]);
    }
}
