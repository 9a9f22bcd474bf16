//! Choosing DeciMamba's decimating layer, both of the authors' ways (DeciMamba issue #4):
//! decimate from the first *global* layer, whose Mamba Mean Distance grows with context
//! length, or sweep the layers on a small evaluation. Upstream's `find_deci_layer` returns
//! an index into `range(8, …)`, so its answer is 8 too low; here layers are always the
//! model's own 0-based indices.

use super::LayerReport;
use crate::policy::DecimationConfig;
use serde::Serialize;

/// One layer's MMD at the short and the long length, and whether it counts as global.
#[derive(Debug, Clone, Serialize)]
pub struct LayerGrowth {
    pub layer: usize,
    pub mmd_short: f64,
    pub mmd_long: f64,
    /// mmd_long / mmd_short.
    pub growth: f64,
    pub global: bool,
}

/// A layer is global when its MMD grows by at least `fraction` of the length ratio's excess
/// over 1: growth ≥ 1 + fraction · (L_long/L_short − 1). A purely local layer keeps its MMD
/// (growth 1); one that attends uniformly over the input grows with the length ratio.
pub fn growth_threshold(short: usize, long: usize, fraction: f64) -> f64 {
    1.0 + fraction * (long as f64 / short as f64 - 1.0)
}

pub fn layer_growth(
    short: &[LayerReport],
    long: &[LayerReport],
    short_len: usize,
    long_len: usize,
    fraction: f64,
) -> Vec<LayerGrowth> {
    let threshold = growth_threshold(short_len, long_len, fraction);
    short
        .iter()
        .zip(long)
        .map(|(s, l)| {
            let growth = match s.mean_distance > 0.0 {
                true => l.mean_distance / s.mean_distance,
                false => 0.0,
            };
            LayerGrowth {
                layer: s.layer,
                mmd_short: s.mean_distance,
                mmd_long: l.mean_distance,
                growth,
                global: growth >= threshold,
            }
        })
        .collect()
}

/// DeciMamba decimating at `layer` alone with the given budget.
pub fn single_layer_config(
    layer: usize,
    beta: f64,
    l_base: usize,
    min_len: usize,
) -> DecimationConfig {
    DecimationConfig {
        decimating_layers: vec![layer],
        decimation_beta: beta,
        decimation_max_p_l_base: l_base,
        decimation_min_seq_len: min_len,
        ..DecimationConfig::zero_shot(layer + 1, l_base)
    }
}

/// The best candidate by `score` (lower is better when `minimise`); ties go to the earlier
/// layer, and candidates without a score are skipped.
pub fn best(scores: &[(usize, Option<f64>)], minimise: bool) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for &(layer, s) in scores {
        let Some(s) = s else { continue };
        let better = match best {
            None => true,
            Some((_, b)) => {
                if minimise {
                    s < b
                } else {
                    s > b
                }
            }
        };
        if better {
            best = Some((layer, s));
        }
    }
    best.map(|(l, _)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_layer_is_the_models_own_index() {
        let scores = [
            (8, Some(12.0)),
            (9, Some(10.5)),
            (10, None),
            (11, Some(10.5)),
        ];
        assert_eq!(
            best(&scores, true),
            Some(9),
            "argmin, earliest on ties, never 9 - 8"
        );
        assert_eq!(best(&scores, false), Some(8));
        assert_eq!(best(&[(3, None)], true), None);
    }

    #[test]
    fn growth_threshold_scales_with_the_length_ratio() {
        assert_eq!(growth_threshold(1024, 1024, 0.25), 1.0);
        assert_eq!(growth_threshold(1024, 16384, 0.25), 4.75);
    }
}
