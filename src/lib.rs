//! `decimamba`: Mamba-1 (S6) language models on Candle, with DeciMamba context extension
//! (Ben-Kish et al., ICLR 2025, arXiv 2406.14528) and the paper's evaluations.
//!
//! The library is what the `decimamba` binary runs; [`cli`] is a thin layer over it.

pub mod analysis;
pub mod bench;
pub mod calibrate;
pub mod cli;
pub mod eval;
pub mod generation;
pub mod hub;
pub mod loader;
pub mod memory;
pub mod model;
pub mod policy;

pub use loader::LoadedModel;
pub use model::{MambaConfig, MambaModel};
/// DeciMamba's settings and token choice, by their name before policies existed.
pub use policy::decimamba as decimation;
pub use policy::{ContextPolicy, DecimationConfig, LayerPlan, Policy};
