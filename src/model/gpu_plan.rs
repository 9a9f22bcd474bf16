//! Launch planning of the CUDA kernels (`cuda.rs`): how the work of a prefill or a decode
//! step is cut into grids. Plain arithmetic, kept apart from the CUDA code so that CI,
//! which has no GPU and does not build the `cuda` feature, tests it.

/// Threads the scan aims to keep in flight (≈ 2 × 132 SMs × 2048 on an H200): the time
/// axis is cut into chunks until batch × d_inner × chunks reaches this.
pub const SCAN_TARGET_THREADS: usize = 1 << 19;
/// Shortest chunk worth the extra summary pass of the chunked scan.
pub const SCAN_MIN_CHUNK: usize = 64;

/// Most sequences one fused decode step takes (`MAXB` in the kernels).
pub const MAX_DECODE_BATCH: usize = 8;
/// Shared memory a decode matvec may stage its f32 input rows in (the default limit
/// without opting in to more).
pub const DECODE_SMEM_BYTES: usize = 48 * 1024;

/// Largest grid extent in y and z.
pub const MAX_GRID_YZ: usize = 65_535;

/// How the chunked scan cuts `len` steps of `batch × d_inner` channels: `(n_chunks,
/// chunk_len)` with every chunk but the last full, `n_chunks · chunk_len ≥ len`, at most
/// ⌈len / [`SCAN_MIN_CHUNK`]⌉ chunks (so more than SCAN_MIN_CHUNK / 2 steps each), and no
/// more chunks than needed to fill the GPU. One chunk means a single pass from the initial
/// state.
pub fn scan_chunks(batch: usize, d_inner: usize, len: usize) -> (usize, usize) {
    let pairs = (batch * d_inner).max(1);
    let want = SCAN_TARGET_THREADS.div_ceil(pairs).max(1);
    let n_chunks = want.min(len.div_ceil(SCAN_MIN_CHUNK)).clamp(1, MAX_GRID_YZ);
    let chunk_len = len.div_ceil(n_chunks).max(1);
    (len.div_ceil(chunk_len).max(1), chunk_len)
}

/// Tokens per thread of the prefill conv: 32, more when `len / 32` tiles would exceed the
/// grid's y extent.
pub fn conv_tile(len: usize) -> usize {
    32.max(len.div_ceil(MAX_GRID_YZ))
}

/// Whether the fused decode step takes `batch` sequences of this width: its matvecs stage
/// `batch` input rows of up to max(d_model, d_inner) f32 in shared memory.
pub fn decode_fits(batch: usize, d_model: usize, d_inner: usize) -> bool {
    (1..=MAX_DECODE_BATCH).contains(&batch) && batch * d_model.max(d_inner) * 4 <= DECODE_SMEM_BYTES
}

/// Whether rows of `k` elements of `elem_bytes` each, starting at device address `base`,
/// can be read 16 bytes at a time.
pub fn vec_ok(k: usize, base: u64, elem_bytes: usize) -> bool {
    (k * elem_bytes).is_multiple_of(16) && base.is_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_chunks_cover_the_sequence_and_fill_the_gpu() {
        for &(batch, d_inner) in &[(1, 1536), (1, 5120), (4, 1536), (64, 5120), (1, 16)] {
            for len in [1, 2, 63, 64, 65, 1000, 2048, 32_768, 131_072, 1 << 22] {
                let (n, c) = scan_chunks(batch, d_inner, len);
                assert!(n >= 1 && c >= 1, "{batch}x{d_inner}, {len}");
                assert!(n * c >= len, "chunks must cover: {n} × {c} < {len}");
                assert!(
                    (n - 1) * c < len,
                    "an empty last chunk: {n} × {c} for {len}"
                );
                assert!(n <= MAX_GRID_YZ);
                if n > 1 {
                    assert!(n <= len.div_ceil(SCAN_MIN_CHUNK));
                    assert!(2 * c > SCAN_MIN_CHUNK, "chunk of {c} for {len}");
                    // Not more chunks than it takes to fill the GPU.
                    let threads = batch * d_inner * n;
                    assert!(threads < 2 * SCAN_TARGET_THREADS + batch * d_inner);
                }
            }
        }
        // 130m at 128K with batch 1: a few hundred chunks of a few hundred steps.
        assert_eq!(scan_chunks(1, 1536, 131_072), (342, 384));
        // Wide batches need no time chunks at all.
        assert_eq!(scan_chunks(128, 5120, 4096), (1, 4096));
    }

    #[test]
    fn conv_tiles_stay_within_the_grid() {
        for len in [
            1, 31, 32, 33, 2048, 131_072, 2_097_120, 2_097_121, 10_000_000,
        ] {
            let t = conv_tile(len);
            assert!(t >= 32);
            assert!(len.div_ceil(t) <= MAX_GRID_YZ, "{len} tokens, tile {t}");
        }
        assert_eq!(conv_tile(131_072), 32);
    }

    #[test]
    fn decode_fits_the_shared_memory() {
        assert!(decode_fits(1, 768, 1536)); // 130m
        assert!(decode_fits(8, 768, 1536));
        assert!(!decode_fits(9, 768, 1536));
        assert!(!decode_fits(0, 768, 1536));
        assert!(decode_fits(2, 2560, 5120)); // 2.8b: 2 × 5120 × 4 = 40 KiB
        assert!(!decode_fits(3, 2560, 5120));
    }

    #[test]
    fn sixteen_byte_loads_need_aligned_rows() {
        assert!(vec_ok(768, 0, 2));
        assert!(vec_ok(8, 256, 2));
        assert!(!vec_ok(12, 0, 2)); // 24-byte rows
        assert!(!vec_ok(768, 8, 2)); // misaligned base
        assert!(vec_ok(4, 16, 4));
        assert!(!vec_ok(5, 0, 4));
    }
}
