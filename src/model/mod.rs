//! The Mamba-1 model: configuration, weights, mixer and CPU kernels.

pub mod config;
pub mod kernels;
pub mod mamba;

pub use config::{CheckpointFormat, MambaConfig};
pub use mamba::{
    take_gpu_profile, DecimationTrace, ForwardOptions, InferenceState, LayerTrace, LogitsSpan,
    MambaModel,
};
