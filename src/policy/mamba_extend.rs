//! MambaExtend (Azizi et al., "MambaExtend: A Training-Free Approach to Improve Long
//! Context Extension of Mamba", ICLR 2025): Δ' = s · softplus(dt_proj(dt) + bias), the
//! scale applied after softplus (ArminAzizi98/LongContextMamba,
//! `perplexity_eval/modeling/mamba_module.py`, which then scans with
//! `delta_softplus=False`). One scalar per layer is their perplexity variant; one per
//! channel is their passkey variant (`PasskeyRetrieval/modeling/mamba_module.py`).

use super::{check_scales, ContextPolicy, DeltaScale, LayerPlan};
use crate::model::MambaConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One scale per layer, or one list of d_inner scales per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScaleVector {
    PerLayer(Vec<f32>),
    PerChannel(Vec<Vec<f32>>),
}

impl ScaleVector {
    pub fn n_layer(&self) -> usize {
        match self {
            Self::PerLayer(v) => v.len(),
            Self::PerChannel(v) => v.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MambaExtend {
    pub delta_scale: ScaleVector,
}

impl MambaExtend {
    pub fn per_layer(scales: Vec<f32>) -> Self {
        Self {
            delta_scale: ScaleVector::PerLayer(scales),
        }
    }
}

impl ContextPolicy for MambaExtend {
    fn name(&self) -> &str {
        super::MAMBAEXTEND
    }

    fn check(&self, config: &MambaConfig) -> Result<()> {
        let n = self.delta_scale.n_layer();
        if n != config.n_layer {
            bail!(
                "mambaextend delta_scale has {n} entries but the model has {} layers",
                config.n_layer
            );
        }
        match &self.delta_scale {
            ScaleVector::PerLayer(v) => check_scales("delta_scale", v),
            ScaleVector::PerChannel(layers) => {
                for (l, v) in layers.iter().enumerate() {
                    if v.len() != config.d_inner {
                        bail!(
                            "mambaextend delta_scale[{l}] has {} channels but the model's d_inner is {}",
                            v.len(),
                            config.d_inner
                        );
                    }
                    check_scales(&format!("delta_scale[{l}]"), v)?;
                }
                Ok(())
            }
        }
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "method": super::MAMBAEXTEND, "delta_scale": self.delta_scale })
    }

    fn plan(&self, layer: usize, _: usize, _: usize) -> LayerPlan {
        let delta_scale = match &self.delta_scale {
            ScaleVector::PerLayer(v) => v.get(layer).map(|&s| DeltaScale::Layer(s)),
            ScaleVector::PerChannel(v) => v
                .get(layer)
                .map(|s| DeltaScale::Channel(s.as_slice().into())),
        };
        LayerPlan {
            delta_scale,
            ..Default::default()
        }
    }
}
