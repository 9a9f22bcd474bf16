//! Which implementation runs the mixers: the device's fused kernels (CPU SIMD in
//! `kernels.rs`, CUDA in `cuda.rs`) or the device-generic path in plain Candle tensor ops
//! (`candle_ops.rs`), which runs wherever Candle does, Metal included. The model and the
//! policy seam do not depend on the choice; results agree to rounding (each sums in its
//! own order), so the backend is recorded with every result.

use anyhow::{bail, Result};
use candle_core::Device;

/// What `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The fastest backend of the device: its fused kernels, or Candle ops on Metal.
    #[default]
    Auto,
    /// The device-generic Candle-ops backend, on any device.
    Candle,
    /// The device's fused kernels (CPU or CUDA).
    Kernels,
}

impl std::str::FromStr for BackendChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "candle" | "candle-ops" => Ok(Self::Candle),
            "kernels" | "fused" => Ok(Self::Kernels),
            other => bail!("unknown backend \"{other}\": expected auto, candle or kernels"),
        }
    }
}

/// The implementation a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `kernels.rs`: SIMD kernels on host vectors, states updated in place.
    CpuKernels,
    /// `cuda.rs`: NVRTC-compiled kernels, cuBLAS GEMMs and a captured decode graph.
    CudaKernels,
    /// `candle_ops.rs`: Candle tensor ops only.
    CandleOps,
}

impl Backend {
    /// The backend `choice` names on `device`, or why it cannot run there.
    pub fn resolve(choice: BackendChoice, device: &Device) -> Result<Self> {
        let kernels = match device {
            Device::Cpu => Some(Self::CpuKernels),
            Device::Cuda(_) if cfg!(feature = "cuda") => Some(Self::CudaKernels),
            _ => None,
        };
        match (choice, kernels) {
            (BackendChoice::Candle, _) | (BackendChoice::Auto, None) => Ok(Self::CandleOps),
            (_, Some(k)) => Ok(k),
            (BackendChoice::Kernels, None) => bail!(
                "--backend kernels: there are no fused kernels for {device:?} (CPU and CUDA only); use --backend candle or auto"
            ),
        }
    }

    /// The name results record (`cpu-simd`, `cuda-nvrtc` or `candle-ops`).
    pub fn name(self) -> &'static str {
        match self {
            Self::CpuKernels => "cpu-simd",
            Self::CudaKernels => "cuda-nvrtc",
            Self::CandleOps => "candle-ops",
        }
    }

    /// Whether this is the device's fused kernels rather than the generic path.
    pub fn is_fused(self) -> bool {
        self != Self::CandleOps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve_on_the_cpu() {
        let cpu = Device::Cpu;
        let pick = |s: &str| Backend::resolve(s.parse().unwrap(), &cpu).unwrap();
        assert_eq!(pick("auto"), Backend::CpuKernels);
        assert_eq!(pick("kernels"), Backend::CpuKernels);
        assert_eq!(pick("Candle"), Backend::CandleOps);
        let err = "metal-ish"
            .parse::<BackendChoice>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown backend \"metal-ish\""), "{err}");
    }
}
