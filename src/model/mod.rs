//! The Mamba-1 model: configuration, weights, mixer, and its backends (CPU and CUDA
//! kernels, and Candle ops for any device).

pub mod backend;
pub mod config;
pub mod gpu_plan;
mod host_f32;
pub mod kernels;
pub mod mamba;
pub mod state;

pub use backend::{Backend, BackendChoice};
pub use config::{CheckpointFormat, MambaConfig};
pub use mamba::{
    gpu_free_bytes, gpu_used_bytes, take_gpu_profile, ChunkScan, ForwardOptions, ForwardTrace,
    InferenceState, Interrupted, LayerTrace, LogitsSpan, MambaModel,
};
#[cfg(feature = "cuda")]
pub use mamba::{select_top_k_on_device, set_decode_prefetch_mib, set_persistent_decode};
