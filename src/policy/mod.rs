//! Training-free context extension as one seam.
//!
//! A method is a [`ContextPolicy`]: given a layer and the length of its input it returns a
//! [`LayerPlan`], plain data the model carries out between computing Δ, B, C and running
//! the scan (the point mamba-minimal's `ssm` exposes). The model never names a method.
//!
//! The primitives, applied in this order inside a mixer:
//! 1. `delta_scale`: Δ ← s·Δ after softplus (MambaExtend);
//! 2. `a_log_scale`: A = −exp(s·A_log) (Mamba Modulation);
//! 3. `delta_filter`: Δ_{t,c} ← 0 where Δ_{t,c} ≤ θ_c (LongMamba's global channels);
//! 4. `keep`: keep the top-K tokens by ‖Δ_t‖₂ plus a protected tail, and run the scan and
//!    every later layer on them (DeciMamba).
//!
//! As in all four official codes, plans act on prefill only: decode steps run unmodified
//! from the states the prefill left.

pub mod decimamba;
pub mod longmamba;
pub mod mamba_extend;
pub mod modulation;
pub mod observe;
pub mod select;
pub mod spsa;
pub mod upi;

use crate::model::MambaConfig;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::sync::Arc;

pub use decimamba::DecimationConfig;
pub use longmamba::LongMamba;
pub use mamba_extend::MambaExtend;
pub use modulation::Modulation;
pub use observe::{ScanObserver, ScanView};
pub use upi::Upi;

/// Δ' = s·Δ, one scale for the layer or one per channel (d_inner).
#[derive(Debug, Clone, PartialEq)]
pub enum DeltaScale {
    Layer(f32),
    Channel(Arc<[f32]>),
}

impl DeltaScale {
    /// The scale of channel `c`.
    pub fn of(&self, c: usize) -> f32 {
        match self {
            Self::Layer(s) => *s,
            Self::Channel(v) => v[c],
        }
    }
}

/// Keep the `keep` candidates with the largest ‖Δ_t‖₂ among the first `len − protected_tail`
/// tokens, in position order, then the protected tail. Nothing is dropped when the
/// candidates fit the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepRule {
    pub keep: usize,
    pub protected_tail: usize,
}

/// What one layer does in one prefill: plain data, carried out by the mixer on every
/// backend. The default plan is vanilla Mamba.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerPlan {
    pub delta_scale: Option<DeltaScale>,
    pub a_log_scale: Option<f32>,
    /// Per-channel thresholds θ_c (d_inner): Δ_{t,c} ≤ θ_c becomes 0. A channel with
    /// θ_c = −∞ is untouched.
    pub delta_filter: Option<Arc<[f32]>>,
    pub keep: Option<KeepRule>,
}

impl LayerPlan {
    pub fn is_vanilla(&self) -> bool {
        *self == Self::default()
    }

    /// Whether Δ differs from softplus(dt_proj(dt) + bias) under this plan.
    pub fn changes_delta(&self) -> bool {
        self.delta_scale.is_some() || self.delta_filter.is_some()
    }

    /// Applies the scale, then the filter, to Δ (`[rows, d_inner]`, token-major).
    pub fn apply_to_delta(&self, delta: &mut [f32], d_inner: usize) {
        if let Some(scale) = &self.delta_scale {
            for row in delta.chunks_exact_mut(d_inner) {
                for (c, v) in row.iter_mut().enumerate() {
                    *v *= scale.of(c);
                }
            }
        }
        if let Some(theta) = &self.delta_filter {
            for row in delta.chunks_exact_mut(d_inner) {
                for (v, &t) in row.iter_mut().zip(theta.iter()) {
                    if *v <= t {
                        *v = 0.0;
                    }
                }
            }
        }
    }
}

/// A context-extension method.
pub trait ContextPolicy: std::fmt::Debug + Send + Sync {
    /// The method's name in tables and files (`vanilla`, `decimamba`, …).
    fn name(&self) -> &str;
    /// Refuses settings that cannot apply to a model of this shape.
    fn check(&self, config: &MambaConfig) -> Result<()>;
    /// The settings as the JSON a policy file holds (with its `method` key).
    fn settings(&self) -> Value;
    /// What `layer` does to an input of `current_len` tokens whose last `protected_tail`
    /// must survive.
    fn plan(&self, layer: usize, current_len: usize, protected_tail: usize) -> LayerPlan;
    /// Layers whose output lengths are worth reporting (those that may drop tokens).
    fn reported_layers(&self) -> &[usize] {
        &[]
    }
}

/// Vanilla Mamba: every plan is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Vanilla;

impl ContextPolicy for Vanilla {
    fn name(&self) -> &str {
        VANILLA
    }
    fn check(&self, _: &MambaConfig) -> Result<()> {
        Ok(())
    }
    fn settings(&self) -> Value {
        serde_json::json!({ "method": VANILLA })
    }
    fn plan(&self, _: usize, _: usize, _: usize) -> LayerPlan {
        LayerPlan::default()
    }
}

pub const VANILLA: &str = "vanilla";
pub const DECIMAMBA: &str = "decimamba";
pub const MAMBAEXTEND: &str = "mambaextend";
pub const MODULATION: &str = "modulation";
pub const LONGMAMBA: &str = "longmamba";
pub const UPI: &str = "upi";

/// Every method the tool runs, as one value a sweep can hold, compare and serialise.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    Vanilla,
    DeciMamba(DecimationConfig),
    MambaExtend(MambaExtend),
    Modulation(Modulation),
    LongMamba(LongMamba),
    Upi(Upi),
}

impl Policy {
    /// The trait object that carries this policy.
    pub fn as_dyn(&self) -> &dyn ContextPolicy {
        match self {
            Self::Vanilla => &Vanilla,
            Self::DeciMamba(c) => c,
            Self::MambaExtend(p) => p,
            Self::Modulation(p) => p,
            Self::LongMamba(p) => p,
            Self::Upi(p) => p,
        }
    }

    /// `None` for vanilla, so the model takes its plain path.
    pub fn as_option(&self) -> Option<&dyn ContextPolicy> {
        match self {
            Self::Vanilla => None,
            p => Some(p.as_dyn()),
        }
    }

    pub fn name(&self) -> &str {
        self.as_dyn().name()
    }

    /// DeciMamba's config, when this is DeciMamba.
    pub fn decimation(&self) -> Option<&DecimationConfig> {
        match self {
            Self::DeciMamba(c) => Some(c),
            _ => None,
        }
    }

    /// Whether some layer may keep the whole sequence to choose tokens (memory guard).
    pub fn keeps_tokens(&self) -> bool {
        matches!(self, Self::DeciMamba(_))
    }

    /// Parses a policy file. A file without `method` is a DeciMamba config with the
    /// authors' keys, as decimation files were before policies existed.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("invalid policy JSON")?;
        Self::from_json(value)
    }

    pub fn from_json(mut value: Value) -> Result<Self> {
        let Some(obj) = value.as_object_mut() else {
            bail!("a policy must be a JSON object");
        };
        let method = match obj.remove("method") {
            None => DECIMAMBA.to_string(),
            Some(Value::String(m)) => m,
            Some(other) => bail!("policy \"method\" must be a string, got {other}"),
        };
        // Provenance is a record of how a file was made, not a setting.
        obj.remove("provenance");
        let parse = |what: &str| format!("invalid {what} policy");
        Ok(match method.as_str() {
            VANILLA => {
                if !obj.is_empty() {
                    bail!("the vanilla policy takes no settings");
                }
                Self::Vanilla
            }
            DECIMAMBA => Self::DeciMamba(serde_json::from_value(value).with_context(|| parse(DECIMAMBA))?),
            MAMBAEXTEND => {
                Self::MambaExtend(serde_json::from_value(value).with_context(|| parse(MAMBAEXTEND))?)
            }
            MODULATION => {
                Self::Modulation(serde_json::from_value(value).with_context(|| parse(MODULATION))?)
            }
            LONGMAMBA => Self::LongMamba(serde_json::from_value(value).with_context(|| parse(LONGMAMBA))?),
            UPI => Self::Upi(serde_json::from_value(value).with_context(|| parse(UPI))?),
            other => bail!(
                "unknown policy method \"{other}\": expected one of {VANILLA}, {DECIMAMBA}, {MAMBAEXTEND}, {MODULATION}, {LONGMAMBA}, {UPI}"
            ),
        })
    }

    /// Reads a policy file, naming it in any error.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read policy {}", path.display()))?;
        let text = std::str::from_utf8(&bytes)
            .with_context(|| format!("policy {} is not UTF-8", path.display()))?;
        Self::from_json_str(crate::eval::common::strip_bom(text))
            .with_context(|| format!("in {}", path.display()))
    }

    /// The policy file's JSON, `method` first.
    pub fn to_json(&self) -> Value {
        self.as_dyn().settings()
    }
}

/// The settings of a policy file as written by the tool: `settings` with a `provenance`
/// record (model, data hashes, lengths, iterations, seed, objective trace).
pub fn with_provenance(settings: Value, provenance: Value) -> Value {
    let mut v = settings;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("provenance".into(), provenance);
    }
    v
}

/// Refuses a per-layer vector of the wrong length or with a non-positive or non-finite
/// entry; `what` names it in the error.
pub(crate) fn check_scales<'a>(
    what: &str,
    values: impl IntoIterator<Item = &'a f32>,
) -> Result<()> {
    for (i, &s) in values.into_iter().enumerate() {
        if !s.is_finite() || s <= 0.0 {
            bail!("{what}[{i}] is {s}: every scale must be positive and finite");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_applies_scale_then_filter() {
        let plan = LayerPlan {
            delta_scale: Some(DeltaScale::Channel(vec![2.0, 0.5].into())),
            delta_filter: Some(vec![f32::NEG_INFINITY, 0.3].into()),
            ..Default::default()
        };
        // Row 0: (1, 1) → (2, 0.5) → (2, 0.5); row 1: (1, 0.5) → (2, 0.25) → (2, 0).
        let mut delta = vec![1.0, 1.0, 1.0, 0.5];
        plan.apply_to_delta(&mut delta, 2);
        assert_eq!(delta, vec![2.0, 0.5, 2.0, 0.0]);
        assert!(plan.changes_delta() && !plan.is_vanilla());
        assert!(LayerPlan::default().is_vanilla());
    }

    #[test]
    fn files_without_method_are_decimamba() {
        let p = Policy::from_json_str(
            r#"{"decimating_layers": [1], "decimation_beta": 0.5,
                "decimation_max_p_L_base": 8, "decimation_min_seq_len": 2}"#,
        )
        .unwrap();
        assert_eq!(p.name(), DECIMAMBA);
        assert_eq!(p.decimation().unwrap().decimating_layers, vec![1]);
        let back = Policy::from_json(p.to_json()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn unknown_methods_and_settings_are_named() {
        let e = Policy::from_json_str(r#"{"method": "lamb"}"#).unwrap_err();
        assert!(
            e.to_string().contains("unknown policy method \"lamb\""),
            "{e}"
        );
        let e = Policy::from_json_str(r#"{"method": "vanilla", "x": 1}"#).unwrap_err();
        assert!(e.to_string().contains("takes no settings"), "{e}");
        assert!(Policy::from_json_str("[1]").is_err());
        assert_eq!(
            Policy::from_json_str(r#"{"method": "vanilla"}"#).unwrap(),
            Policy::Vanilla
        );
    }
}
