//! Mamba Modulation (Lu et al., NeurIPS 2025, arXiv 2509.19633): A_l = −exp(s_l · A_log),
//! i.e. |A| → |A|^{s_l}, with Δ unscaled (gnepul-ace/mamba_modulation,
//! `Mamba/perplexity_eval/modeling/mamba_module.py`). Their calibration keeps s_l in
//! [0.01, 1]; a file may hold any positive scale.

use super::{check_scales, ContextPolicy, LayerPlan};
use crate::model::MambaConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modulation {
    pub a_log_scale: Vec<f32>,
}

impl ContextPolicy for Modulation {
    fn name(&self) -> &str {
        super::MODULATION
    }

    fn check(&self, config: &MambaConfig) -> Result<()> {
        if self.a_log_scale.len() != config.n_layer {
            bail!(
                "modulation a_log_scale has {} entries but the model has {} layers",
                self.a_log_scale.len(),
                config.n_layer
            );
        }
        check_scales("a_log_scale", &self.a_log_scale)
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "method": super::MODULATION, "a_log_scale": self.a_log_scale })
    }

    fn plan(&self, layer: usize, _: usize, _: usize) -> LayerPlan {
        LayerPlan {
            a_log_scale: self.a_log_scale.get(layer).copied(),
            ..Default::default()
        }
    }
}
