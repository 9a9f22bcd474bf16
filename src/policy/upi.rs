//! UPI ("From Collapse to Control", ICLR 2026; no public code), on Mamba-1 channels: the
//! channels with the largest Mamba Mean Distance on calibration text at a long length have
//! their Δ divided by n = L / L_train in the prefill, so that their receptive field stays
//! the one they were trained with. Ratio and ranking as the paper describes them (top 20%
//! by MMD); channels stand in for Mamba-2's heads (ours). Inputs no longer than the training
//! length run vanilla.

use super::{ContextPolicy, DeltaScale, LayerPlan};
use crate::model::MambaConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upi {
    pub train_len: usize,
    /// Share of channels rescaled in each layer (informational; `channels` decides).
    pub ratio: f64,
    pub n_layer: usize,
    pub d_inner: usize,
    /// The rescaled channels of each layer, ascending.
    pub channels: Vec<Vec<usize>>,
}

impl ContextPolicy for Upi {
    fn name(&self) -> &str {
        super::UPI
    }

    fn check(&self, config: &MambaConfig) -> Result<()> {
        if self.n_layer != config.n_layer || self.d_inner != config.d_inner {
            bail!(
                "upi channels were chosen for a model with {} layers and d_inner {}, but this one has {} and {}",
                self.n_layer,
                self.d_inner,
                config.n_layer,
                config.d_inner
            );
        }
        if self.channels.len() != self.n_layer {
            bail!(
                "upi policy lists {} layers but says n_layer {}",
                self.channels.len(),
                self.n_layer
            );
        }
        if self.train_len == 0 {
            bail!("upi train_len must be at least 1");
        }
        for (l, ch) in self.channels.iter().enumerate() {
            if let Some(&c) = ch.iter().find(|&&c| c >= self.d_inner) {
                bail!(
                    "upi layer {l} names channel {c}, beyond d_inner {}",
                    self.d_inner
                );
            }
        }
        Ok(())
    }

    fn settings(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("method".into(), super::UPI.into());
        }
        v
    }

    fn plan(&self, layer: usize, current_len: usize, _: usize) -> LayerPlan {
        let n = current_len as f64 / self.train_len as f64;
        let Some(channels) = self
            .channels
            .get(layer)
            .filter(|c| !c.is_empty() && n > 1.0)
        else {
            return LayerPlan::default();
        };
        let mut scale = vec![1f32; self.d_inner];
        for &c in channels {
            scale[c] = (1.0 / n) as f32;
        }
        LayerPlan {
            delta_scale: Some(DeltaScale::Channel(scale.into())),
            ..Default::default()
        }
    }
}

/// The top `ratio` share of channels (at least one) of one layer by MMD; ties go to the lower
/// channel. Returns them ascending.
pub fn top_channels(mmd: &[f64], ratio: f64) -> Vec<usize> {
    let count = ((ratio * mmd.len() as f64) as usize).clamp(1, mmd.len().max(1));
    let mut order: Vec<usize> = (0..mmd.len()).collect();
    order.sort_by(|&a, &b| mmd[b].total_cmp(&mmd[a]).then(a.cmp(&b)));
    let mut top: Vec<usize> = order.into_iter().take(count).collect();
    top.sort_unstable();
    top
}
