//! `decimamba`: Mamba-1 (S6) language models on Candle, with DeciMamba context extension
//! (Ben-Kish et al., ICLR 2025, arXiv 2406.14528) and the paper's evaluations.
//!
//! The library is what the `decimamba` binary runs; [`cli`] is a thin layer over it.

pub mod bench;
pub mod cli;
pub mod decimation;
pub mod eval;
pub mod generation;
pub mod hub;
pub mod loader;
pub mod memory;
pub mod model;

pub use decimation::DecimationConfig;
pub use loader::LoadedModel;
pub use model::{MambaConfig, MambaModel};
