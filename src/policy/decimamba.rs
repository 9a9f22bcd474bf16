//! DeciMamba decimation (Ben-Kish et al., "DeciMamba: Exploring the Length Extrapolation
//! Potential of Mamba", ICLR 2025, arXiv 2406.14528).
//!
//! In a decimating layer every token is scored by ‖Δ_t‖₂ over the d_inner channels (Δ is
//! the S6 step size: a small Δ means the layer nearly skips the token, paper §4). The layer
//! keeps the top K = int(max(min(L − R, L_base·β^s), min_seq_len)) candidates in position
//! order plus the R protected tail tokens, and the scan and all later layers run on that
//! shorter sequence. This matches `get_non_decimated_indices` of the authors' code
//! (assafbk/DeciMamba, `mamba_ssm/modules/mamba_simple.py`).

pub use super::select::{select_by_scores, select_tokens, token_scores};

use super::{ContextPolicy, KeepRule, LayerPlan};
use crate::model::MambaConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Decimation settings, with the key names of the authors' configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecimationConfig {
    /// 0-based layers that decimate, in order; the s-th one keeps L_base·β^s tokens.
    pub decimating_layers: Vec<usize>,
    /// β: per-layer shrink factor of the keep budget, in (0, 1].
    pub decimation_beta: f64,
    /// L_base: tokens kept by the first decimating layer.
    #[serde(rename = "decimation_max_p_L_base")]
    pub decimation_max_p_l_base: usize,
    /// Lower bound on the tokens any decimating layer keeps.
    pub decimation_min_seq_len: usize,
    /// Only "max_p" (Top-P_s with P_s = L_base·β^s) exists in the reference.
    #[serde(default = "default_type")]
    pub decimation_type: String,
}

fn default_type() -> String {
    "max_p".to_string()
}

/// Built-in presets: name, description, JSON (the authors' settings, `configs/`).
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "passkey",
        "passkey retrieval (authors' eval: layer 12, β 0.5, L_base 2000)",
        include_str!("../../configs/passkey.json"),
    ),
    (
        "pg19",
        "PG-19 perplexity (authors' eval: layers 12-20, β 0.83, L_base 8000)",
        include_str!("../../configs/pg19.json"),
    ),
    (
        "doc-retrieval",
        "multi-document retrieval (authors' eval: layer 12, β 0.5, L_base 6000)",
        include_str!("../../configs/doc-retrieval.json"),
    ),
];

impl DecimationConfig {
    /// Parses a JSON config with the authors' key names.
    /// A `method` key, if present, must say `decimamba`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        match super::Policy::from_json_str(text).context("invalid decimation config")? {
            super::Policy::DeciMamba(cfg) => Ok(cfg),
            other => bail!(
                "expected a decimation config, got a {} policy",
                other.name()
            ),
        }
    }

    /// The zero-shot default the authors recommend (GitHub issue #4): one decimating layer
    /// in the middle of the network, L_base = the training length.
    pub fn zero_shot(n_layer: usize, train_len: usize) -> Self {
        Self {
            decimating_layers: vec![n_layer / 2],
            decimation_beta: 0.5,
            decimation_max_p_l_base: train_len,
            decimation_min_seq_len: 20,
            decimation_type: default_type(),
        }
    }

    /// Checks the settings against a model with `n_layer` layers.
    pub fn validate(&self, n_layer: usize) -> Result<()> {
        if self.decimation_type != "max_p" {
            bail!(
                "unknown decimation_type \"{}\": only \"max_p\" is supported",
                self.decimation_type
            );
        }
        if self.decimating_layers.is_empty() {
            bail!("decimation requested with no decimating layers");
        }
        let mut seen = std::collections::BTreeSet::new();
        for &l in &self.decimating_layers {
            if l >= n_layer {
                bail!(
                    "decimating layer {l} does not exist: the model has {n_layer} layers (0..={})",
                    n_layer - 1
                );
            }
            if !seen.insert(l) {
                bail!("decimating layer {l} is listed twice");
            }
        }
        if self.decimation_beta.is_nan()
            || self.decimation_beta <= 0.0
            || self.decimation_beta > 1.0
        {
            bail!(
                "decimation beta must be in (0, 1], got {}",
                self.decimation_beta
            );
        }
        if self.decimation_max_p_l_base < 1 {
            bail!(
                "decimation L_base must be at least 1, got {}",
                self.decimation_max_p_l_base
            );
        }
        if self.decimation_min_seq_len < 1 {
            bail!(
                "decimation min_seq_len must be at least 1, got {}",
                self.decimation_min_seq_len
            );
        }
        Ok(())
    }

    /// s: the position of `layer` in `decimating_layers`, if it decimates.
    pub fn rank_of(&self, layer: usize) -> Option<usize> {
        self.decimating_layers.iter().position(|&l| l == layer)
    }

    /// K = int(max(min(L − R, L_base·β^s), min_seq_len)): candidates kept by the s-th
    /// decimating layer on a sequence of `len` tokens with `tail` protected ones.
    pub fn budget(&self, rank: usize, len: usize, tail: usize) -> usize {
        let candidates = len.saturating_sub(tail) as f64;
        let p = self.decimation_max_p_l_base as f64 * self.decimation_beta.powi(rank as i32);
        candidates.min(p).max(self.decimation_min_seq_len as f64) as usize
    }
}

impl ContextPolicy for DecimationConfig {
    fn name(&self) -> &str {
        super::DECIMAMBA
    }

    fn check(&self, config: &MambaConfig) -> Result<()> {
        self.validate(config.n_layer)
    }

    fn settings(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a decimation config serialises");
        v.as_object_mut()
            .expect("an object")
            .insert("method".into(), super::DECIMAMBA.into());
        v
    }

    /// The s-th decimating layer keeps the top-K of ‖Δ_t‖₂ with K from [`Self::budget`].
    fn plan(&self, layer: usize, current_len: usize, protected_tail: usize) -> LayerPlan {
        LayerPlan {
            keep: self.rank_of(layer).map(|rank| KeepRule {
                keep: self.budget(rank, current_len, protected_tail),
                protected_tail,
            }),
            ..Default::default()
        }
    }

    fn reported_layers(&self) -> &[usize] {
        &self.decimating_layers
    }
}

/// Parses "12", "12,14", "12-20" or "12..=20" into layer indices.
pub fn parse_layers(spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let range = part.split_once("..=").or_else(|| part.split_once('-'));
        if let Some((a, b)) = range {
            let a: usize = a
                .trim()
                .parse()
                .with_context(|| format!("bad layer range \"{part}\""))?;
            let b: usize = b
                .trim()
                .parse()
                .with_context(|| format!("bad layer range \"{part}\""))?;
            if b < a {
                bail!("bad layer range \"{part}\": end before start");
            }
            out.extend(a..=b);
        } else {
            out.push(
                part.parse()
                    .with_context(|| format!("bad layer index \"{part}\""))?,
            );
        }
    }
    if out.is_empty() {
        bail!("no decimating layers in \"{spec}\"");
    }
    Ok(out)
}

/// What the defaults of decimation depend on for one model.
#[derive(Debug, Clone)]
pub struct ModelDefaults {
    pub name: String,
    pub n_layer: usize,
    /// The preset shipped beside the model (`decimation.json`).
    pub preset: Option<DecimationConfig>,
    /// Training length, the zero-shot L_base.
    pub train_len: usize,
}

/// The default when decimation is wanted but not named: the model's shipped preset, else
/// the zero-shot rule.
pub fn default_config(model: &ModelDefaults) -> DecimationConfig {
    model
        .preset
        .clone()
        .unwrap_or_else(|| DecimationConfig::zero_shot(model.n_layer, model.train_len))
}

/// Whether `name` names a DeciMamba preset (built-in, `model` or `zero-shot`).
pub fn is_preset(name: &str) -> bool {
    PRESETS.iter().any(|p| p.0 == name) || name == "model" || name == "zero-shot"
}

/// The preset or file named by `--decimation`, before overrides.
pub fn named_config(name: &str, model: &ModelDefaults) -> Result<DecimationConfig> {
    if let Some((_, _, json)) = PRESETS.iter().find(|(n, _, _)| *n == name) {
        return DecimationConfig::from_json_str(json);
    }
    match name {
        "model" => model.preset.clone().with_context(|| {
            format!(
                "model {} ships no decimation preset (decimation.json)",
                model.name
            )
        }),
        "zero-shot" => Ok(DecimationConfig::zero_shot(model.n_layer, model.train_len)),
        path => {
            let p = std::path::Path::new(path);
            if !p.exists() {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                bail!(
                    "decimation \"{path}\" is neither a preset ({}, model, zero-shot) nor an existing file",
                    names.join(", ")
                );
            }
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read decimation config {path}"))?;
            match super::Policy::from_json_str(crate::eval::common::strip_bom(&text))
                .with_context(|| format!("in {path}"))?
            {
                super::Policy::DeciMamba(cfg) => Ok(cfg),
                other => bail!(
                    "{path} is a {} policy, not a decimation config: pass it with --policy",
                    other.name()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::select::select_tokens;

    fn cfg(layers: Vec<usize>, beta: f64, lbase: usize, min: usize) -> DecimationConfig {
        DecimationConfig {
            decimating_layers: layers,
            decimation_beta: beta,
            decimation_max_p_l_base: lbase,
            decimation_min_seq_len: min,
            decimation_type: "max_p".into(),
        }
    }

    #[test]
    fn budget_follows_the_rule() {
        let c = cfg((12..=20).collect(), 0.83, 8000, 20);
        // The PG-19 budgets per layer (paper digest §3).
        let got: Vec<usize> = (0..9).map(|s| c.budget(s, 100_000, 101)).collect();
        assert_eq!(
            got,
            vec![8000, 6640, 5511, 4574, 3796, 3151, 2615, 2170, 1801]
        );
        // min(L − R, ·) and the min_seq_len floor.
        assert_eq!(c.budget(0, 500, 101), 399);
        assert_eq!(cfg(vec![0], 0.5, 100, 30).budget(3, 10_000, 1), 30);
        // Passkey at 16K: 2000 candidates + the last token (digest check 2).
        let p = cfg(vec![12], 0.5, 2000, 20);
        assert_eq!(p.budget(0, 16_000, 1), 2000);
    }

    #[test]
    fn selects_top_scores_in_order_with_tail() {
        // 6 tokens, 2 channels; scores: t0 1, t1 5, t2 3, t3 5 (tie with t1), t4 9, t5 0.
        let delta = [1.0, 0.0, 3.0, 4.0, 3.0, 0.0, 0.0, 5.0, 9.0, 0.0, 0.0, 0.0];
        assert_eq!(select_tokens(&delta, 2, 2, 1), Some(vec![1, 4, 5]));
        // Tie between t1 and t3 for the last place: the earlier one wins.
        assert_eq!(select_tokens(&delta, 2, 2, 2), Some(vec![1, 3, 4, 5]));
        assert_eq!(select_tokens(&delta, 2, 1, 2), Some(vec![1, 4, 5]));
        assert_eq!(select_tokens(&delta, 2, 1, 3), Some(vec![1, 3, 4, 5]));
        assert_eq!(select_tokens(&delta, 2, 3, 1), Some(vec![1, 3, 4, 5]));
        // Everything fits: no decimation.
        assert_eq!(select_tokens(&delta, 2, 5, 1), None);
        assert_eq!(select_tokens(&delta, 2, 10, 1), None);
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let err = |c: DecimationConfig| c.validate(24).unwrap_err().to_string();
        assert!(err(cfg(vec![24], 0.5, 2000, 20)).contains("decimating layer 24 does not exist"));
        assert!(err(cfg(vec![], 0.5, 2000, 20)).contains("no decimating layers"));
        assert!(err(cfg(vec![3, 3], 0.5, 2000, 20)).contains("listed twice"));
        assert!(err(cfg(vec![3], 0.0, 2000, 20)).contains("beta must be in (0, 1]"));
        assert!(err(cfg(vec![3], 1.5, 2000, 20)).contains("beta must be in (0, 1]"));
        assert!(err(cfg(vec![3], 0.5, 0, 20)).contains("L_base must be at least 1"));
        assert!(err(cfg(vec![3], 0.5, 10, 0)).contains("min_seq_len must be at least 1"));
        let mut c = cfg(vec![3], 0.5, 10, 2);
        c.decimation_type = "random".into();
        assert!(err(c).contains("unknown decimation_type"));
    }

    #[test]
    fn presets_parse_and_match_the_authors() {
        let get = |n: &str| {
            DecimationConfig::from_json_str(PRESETS.iter().find(|p| p.0 == n).unwrap().2).unwrap()
        };
        assert_eq!(get("passkey"), cfg(vec![12], 0.5, 2000, 20));
        assert_eq!(get("pg19"), cfg((12..=20).collect(), 0.83, 8000, 20));
        assert_eq!(get("doc-retrieval"), cfg(vec![12], 0.5, 6000, 20));
        assert!(
            DecimationConfig::from_json_str(r#"{"decimating_layers": [1], "bogus": 2}"#).is_err()
        );
    }

    #[test]
    fn parses_layer_lists() {
        assert_eq!(parse_layers("12").unwrap(), vec![12]);
        assert_eq!(parse_layers("1, 3,5").unwrap(), vec![1, 3, 5]);
        assert_eq!(parse_layers("12-14").unwrap(), vec![12, 13, 14]);
        assert_eq!(parse_layers("12..=14,20").unwrap(), vec![12, 13, 14, 20]);
        assert!(parse_layers("x").is_err());
        assert!(parse_layers("5-2").is_err());
        assert!(parse_layers("").is_err());
    }
}
