//! Feasibility before huge work: an estimate of the memory one prefill needs, and the
//! memory the machine has free, so that a run which cannot fit is refused up front
//! instead of swapping or being killed hours in.
//!
//! The estimate counts the buffers that grow with the sequence length (token ids, the
//! residual stream, a mixer's activations, decimation scores, logits); weights and the
//! small per-layer states are already resident when it is asked.

use crate::model::MambaConfig;
use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Tokens a CPU prefill runs at once when it may run in chunks (the model's default).
pub const CPU_CHUNK: usize = 2048;

/// What one prefill of `len` tokens keeps in memory at its peak, in bytes.
///
/// `chunked`: vanilla layers run in [`CPU_CHUNK`]-token pieces with the state carried
/// (the CPU path), so only ids and the final logits grow with `len`. `decimating`: some
/// layer scores every token, so the whole residual stream is kept (twice, while the
/// pieces are joined), with an f64 score per token. `logits_rows`: output positions
/// whose logits are kept.
pub fn prefill_bytes(
    config: &MambaConfig,
    dtype: DType,
    len: usize,
    chunked: bool,
    decimating: bool,
    logits_rows: usize,
) -> u64 {
    let len = len as u64;
    let f32b = 4u64;
    let act = dtype.size_in_bytes() as u64;
    let (d_model, d_inner) = (config.d_model as u64, config.d_inner as u64);
    let (d_state, dt_rank) = (config.d_state as u64, config.dt_rank as u64);
    // ids: the prompt as built, the model's input tensor and the generation context
    // (measured: passkey on the embedded model grows by 16 bytes per token, 256K → 512K).
    let ids = 4 * 4 * len;
    // One mixer on `rows` tokens: norm output and in_proj (x, z) in the model dtype; conv
    // output, x_proj (dt, B, C), Δ and y in f32; the mixer output; the residual (f32).
    let mixer = |rows: u64| {
        rows * (act * (d_model + 2 * d_inner)
            + f32b * (d_inner + dt_rank + 2 * d_state + 2 * d_inner + d_model)
            + f32b * 2 * d_model)
    };
    let active = if chunked {
        len.min(CPU_CHUNK as u64)
    } else {
        len
    };
    let mut total = ids + mixer(active);
    if decimating {
        total += 2 * f32b * d_model * len + 8 * len;
    }
    total + f32b * config.vocab_size as u64 * logits_rows as u64
}

/// Memory free for the process on `device`, in bytes, when the platform says: the
/// kernel's MemAvailable on Linux. `None` elsewhere, and on GPUs, whose own
/// out-of-memory error is reported as it happens.
pub fn available_bytes(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

/// The most rows `--batch-size` picks by itself.
pub const AUTO_BATCH_MAX: usize = 16;

/// The batch size a sweep uses when none is given: 1 on the CPU, where batching does not
/// raise throughput; on a GPU as many rows of `len` tokens as half its free memory holds
/// by [`prefill_bytes`] (the other half is headroom for the kernels' own buffers), between
/// 1 and [`AUTO_BATCH_MAX`].
pub fn auto_batch_size(
    config: &MambaConfig,
    dtype: DType,
    device: &Device,
    len: usize,
    decimating: bool,
    logits_rows: usize,
) -> usize {
    if device.is_cpu() {
        return 1;
    }
    let Some(free) = crate::model::gpu_free_bytes(device) else {
        return 1;
    };
    let row = prefill_bytes(config, dtype, len, false, decimating, logits_rows).max(1);
    ((free / 2 / row) as usize).clamp(1, AUTO_BATCH_MAX)
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// Bytes as `1.5 GiB` / `300 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Refuses work that needs more than the memory available (unless `force`): `what`
/// names the work unit in the message, e.g. "a 1048576-token passkey prompt".
pub fn check_fits(needed: u64, available: Option<u64>, what: &str, force: bool) -> Result<()> {
    match available {
        Some(free) if needed > free && !force => bail!(
            "{what} needs about {} of memory but only {} is available; use shorter lengths, or --force to try anyway",
            format_bytes(needed),
            format_bytes(free)
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MambaConfig {
        MambaConfig::of_shape("130m").unwrap()
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn chunked_vanilla_grows_only_with_ids_and_decimation_with_the_residual() {
        let c = config();
        let short = prefill_bytes(&c, DType::F32, 1 << 16, true, false, 1);
        let long = prefill_bytes(&c, DType::F32, 1 << 20, true, false, 1);
        // Only the ids grow: 16 bytes per extra token.
        assert_eq!(long - short, 16 * ((1 << 20) - (1 << 16)));
        let deci = prefill_bytes(&c, DType::F32, 1 << 20, true, true, 1);
        assert!(deci - long >= 2 * 4 * 768 * (1 << 20));
        // A GPU prefill holds every layer's activations at full length.
        let full = prefill_bytes(&c, DType::F32, 1 << 20, false, false, 1);
        assert!(full > 20 * long, "{full} vs {long}");
    }

    #[test]
    fn a_billion_tokens_do_not_fit_in_24_gib() {
        let need = prefill_bytes(&config(), DType::F32, 1_000_000_000, true, true, 1);
        let e = check_fits(need, Some(24 << 30), "a 1000000000-token prompt", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs about"), "{e}");
        assert!(e.contains("24.0 GiB is available"), "{e}");
        assert!(e.contains("--force"), "{e}");
        check_fits(need, Some(24 << 30), "x", true).unwrap();
        check_fits(need, None, "x", false).unwrap();
        check_fits(1 << 20, Some(24 << 30), "x", false).unwrap();
    }
}
