//! What a forward pass carries besides the weights: the recurrent state handed from
//! prefill to decoding, the options of a pass and the trace it returns.

use crate::policy::observe::ScanObserver;
use crate::policy::ContextPolicy;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;

/// Recurrent state of one layer between calls, kept where the model runs: host vectors
/// the CPU kernels update in place, or f32 tensors that stay on the GPU.
///
/// `conv` holds the `d_conv − 1` most recent mixer inputs (pre-conv x),
/// `[batch, d_conv−1, d_inner]`; `ssm` the SSM state h, `[batch, d_inner, d_state]`.
#[derive(Debug)]
pub enum LayerState {
    /// Host vectors for the CPU kernels.
    Host { conv: Vec<f32>, ssm: Vec<f32> },
    /// f32 tensors on the model's device, for the CUDA kernels and the Candle-ops backend.
    Tensors { conv: Tensor, ssm: Tensor },
}

/// A deep copy: decode steps update device states in place, so a clone must not share
/// their memory.
///
/// # Panics
/// If the device cannot allocate the (small) copies.
impl Clone for LayerState {
    fn clone(&self) -> Self {
        match self {
            Self::Host { conv, ssm } => Self::Host {
                conv: conv.clone(),
                ssm: ssm.clone(),
            },
            Self::Tensors { conv, ssm } => {
                let copy = |t: &Tensor| {
                    t.copy()
                        .expect("cannot copy the recurrent state on the device")
                };
                Self::Tensors {
                    conv: copy(conv),
                    ssm: copy(ssm),
                }
            }
        }
    }
}

/// Recurrent state of the whole model: what prefill hands to decoding.
#[derive(Debug, Clone)]
pub struct InferenceState {
    pub batch: usize,
    pub layers: Vec<LayerState>,
    /// Tokens consumed so far (before any token was dropped).
    pub seen_tokens: usize,
}

impl InferenceState {
    /// The states of several sequences (each of batch 1, one device, the same tokens seen)
    /// as one batch, rows in order: prefill row by row, then decode them together.
    pub fn stack(states: Vec<InferenceState>) -> Result<InferenceState> {
        let Some(first) = states.first() else {
            bail!("no states to stack");
        };
        let (n_layer, seen_tokens) = (first.layers.len(), first.seen_tokens);
        if states
            .iter()
            .any(|s| s.batch != 1 || s.layers.len() != n_layer)
        {
            bail!("only states of single sequences of one model can be stacked");
        }
        let batch = states.len();
        let mut per_layer: Vec<Vec<LayerState>> = (0..n_layer).map(|_| Vec::new()).collect();
        for state in states {
            for (l, layer) in state.layers.into_iter().enumerate() {
                per_layer[l].push(layer);
            }
        }
        let layers = per_layer
            .into_iter()
            .map(|rows| -> Result<LayerState> {
                match &rows[0] {
                    LayerState::Host { .. } => {
                        let (mut conv, mut ssm) = (Vec::new(), Vec::new());
                        for row in rows {
                            let LayerState::Host { conv: c, ssm: h } = row else {
                                bail!("cannot stack host and device states");
                            };
                            conv.extend_from_slice(&c);
                            ssm.extend_from_slice(&h);
                        }
                        Ok(LayerState::Host { conv, ssm })
                    }
                    LayerState::Tensors { .. } => {
                        let (mut conv, mut ssm) = (Vec::new(), Vec::new());
                        for row in rows {
                            let LayerState::Tensors { conv: c, ssm: h } = row else {
                                bail!("cannot stack host and device states");
                            };
                            conv.push(c);
                            ssm.push(h);
                        }
                        Ok(LayerState::Tensors {
                            conv: Tensor::cat(&conv, 0)?,
                            ssm: Tensor::cat(&ssm, 0)?,
                        })
                    }
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(InferenceState {
            batch,
            layers,
            seen_tokens,
        })
    }
}

/// How one layer changed the sequence length in a forward pass.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerTrace {
    pub layer: usize,
    pub len_in: usize,
    pub len_out: usize,
    /// Indices into this layer's input that were kept, when the layer dropped tokens and
    /// the caller asked for them (batch 1 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<Vec<usize>>,
}

/// What a forward pass returns besides logits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForwardTrace {
    /// One entry per layer, in order.
    pub layers: Vec<LayerTrace>,
}

impl ForwardTrace {
    /// Adds the trace of the next chunk of a chunked (length-preserving) pass: lengths add up.
    pub(crate) fn merge_chunk(&mut self, next: ForwardTrace) {
        if self.layers.is_empty() {
            *self = next;
            return;
        }
        for (acc, l) in self.layers.iter_mut().zip(next.layers) {
            acc.len_in += l.len_in;
            acc.len_out += l.len_out;
        }
    }

    /// Sequence length leaving each of `layers`, in their order.
    pub fn len_out_of(&self, layers: &[usize]) -> Vec<usize> {
        layers
            .iter()
            .filter_map(|&l| self.layers.get(l).map(|t| t.len_out))
            .collect()
    }
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSpan {
    /// Every output position.
    All,
    /// The last n output positions (n is capped at the output length).
    Last(usize),
    /// No logits (e.g. the non-final chunks of a chunked prefill).
    None,
}

/// A forward pass stopped because the model's cancel flag was set (Ctrl-C).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Options of one forward pass.
#[derive(Clone, Copy)]
pub struct ForwardOptions<'a> {
    /// The context policy of this prefill (`None`: vanilla).
    pub policy: Option<&'a dyn ContextPolicy>,
    /// R: the last R tokens are never dropped (1 for generation, pred_len + 1 for PPL).
    pub protected_tail: usize,
    pub logits: LogitsSpan,
    /// Record kept indices of every layer that drops tokens in the trace.
    pub record_indices: bool,
    /// Sees each observed layer's scan inputs.
    pub observer: Option<&'a dyn ScanObserver>,
}

impl Default for ForwardOptions<'_> {
    fn default() -> Self {
        Self {
            policy: None,
            protected_tail: 1,
            logits: LogitsSpan::All,
            record_indices: false,
            observer: None,
        }
    }
}

impl std::fmt::Debug for ForwardOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardOptions")
            .field("policy", &self.policy)
            .field("protected_tail", &self.protected_tail)
            .field("logits", &self.logits)
            .field("record_indices", &self.record_indices)
            .field("observed", &self.observer.is_some())
            .finish()
    }
}
