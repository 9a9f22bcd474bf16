//! CPU kernels for the Mamba mixer: vectorisable `exp`, `softplus` and SiLU, the causal
//! depthwise convolution and the selective scan.
//!
//! Everything here works on plain `f32` slices in token-major layout (`[batch, time,
//! channels]`), so the caller decides how tensors are laid out and the compiler can
//! vectorise the inner loops over channels or state dimensions. The entry points pick an
//! AVX-512 or AVX2 build of the same code at run time (`is_x86_feature_detected!`), so the
//! portable binary still uses the wide registers of the machine it runs on.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `exp(x)` with ~1 ulp error for x in [-87, 88], written without branches so that loops
/// over it vectorise (Cephes' `expf`: range reduction by ln 2 and a degree-6 polynomial).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 split in two so that x - n·ln2 is exact to f32 precision.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n through the exponent bits; n + 127 is an integer in [1, 254] after the clamp.
    // Adding 2^23 puts it in the low mantissa bits, and the shift moves it to the exponent
    // field: unlike `as i32`, this vectorises (no saturating float-to-int conversion).
    let scale = f32::from_bits((n + 127.0 + 8_388_608.0).to_bits() << 23);
    e * scale
}

/// `2^x` with < 0.7 ulp error for x in [-126, 127] (x below gives 2^-126, as `fast_exp`
/// flushes at its clamp), in 14 branch-free vector operations with fused multiply-adds:
/// x = j + f with j = round(x) by the 1.5·2^23 shift (the integer lands in the low
/// mantissa bits), f in [-0.5, 0.5], 2^f by a degree-6 polynomial fitted for relative
/// error, 2^j added to the exponent bits. The scan evaluates d_state of these per token
/// and channel.
#[inline(always)]
pub fn fast_exp2(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-126.0, 127.0);
    let shifted = x + SHIFT;
    let f = x - (shifted - SHIFT);
    let mut p = 1.534_581e-4_f32;
    p = p.mul_add(f, 1.339_993_2e-3);
    p = p.mul_add(f, 9.618_489e-3);
    p = p.mul_add(f, 5.550_328_6e-2);
    p = p.mul_add(f, 0.240_226_46);
    p = p.mul_add(f, std::f32::consts::LN_2); // the fit lands on it
    p = p.mul_add(f, 1.0);
    // The low bits of `shifted` hold j + 0x40_0000 (two's complement in 23 bits).
    let j = shifted.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    f32::from_bits(p.to_bits().wrapping_add((j << 23) as u32))
}

/// `ln(1 + e)` for e in [0, 1], as 2·atanh(e / (2 + e)): the argument is computed without
/// cancellation, so tiny `e` keep full relative precision.
#[inline(always)]
fn log1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    // atanh(s)/s = Σ s^(2k)/(2k+1); s ≤ 1/3 so eight terms reach f32 precision.
    let mut p = 1.0 / 15.0_f32;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    2.0 * s * p
}

/// `softplus(v) = ln(1 + e^v)` computed as max(v, 0) + ln(1 + e^-|v|), which never
/// overflows (PyTorch's softplus, used by Mamba for Δ, switches to `v` above 20; the
/// difference there is below f32 resolution).
#[inline(always)]
pub fn softplus(v: f32) -> f32 {
    v.max(0.0) + log1p_unit(fast_exp(-v.abs()))
}

/// `SiLU(v) = v·σ(v)`.
#[inline(always)]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + fast_exp(-v))
}

/// Runs `f` compiled for the widest vector unit this CPU has.
macro_rules! dispatch_simd {
    ($generic:ident, $avx512:ident, $avx2:ident, ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features the function was compiled for.
                return unsafe { $avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}

macro_rules! simd_variants {
    ($generic:ident, $avx512:ident, $avx2:ident, ($($name:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn $avx512($($name: $ty),*) -> $ret {
            $generic($($name),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($name: $ty),*) -> $ret {
            $generic($($name),*)
        }
    };
}

/// Rows of work handed to one rayon task: big enough to amortise scheduling.
fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let per_task = (1 << 15) / row_len.max(1);
    per_task.clamp(1, rows.max(1))
}

#[inline(always)]
fn softplus_bias_rows(dt: &mut [f32], bias: &[f32]) {
    for row in dt.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v = softplus(*v + b);
        }
    }
}
simd_variants!(softplus_bias_rows, softplus_bias_rows_avx512, softplus_bias_rows_avx2, (dt: &mut [f32], bias: &[f32]) -> ());

fn softplus_bias_dispatch(dt: &mut [f32], bias: &[f32]) {
    dispatch_simd!(
        softplus_bias_rows,
        softplus_bias_rows_avx512,
        softplus_bias_rows_avx2,
        (dt, bias)
    )
}

/// Δ = softplus(dt + bias) in place, for `dt` laid out as rows of `bias.len()` channels.
pub fn softplus_bias_inplace(dt: &mut [f32], bias: &[f32]) {
    let d = bias.len();
    let rows = dt.len() / d;
    let chunk = rows_per_task(rows, d) * d;
    dt.par_chunks_mut(chunk)
        .for_each(|c| softplus_bias_dispatch(c, bias));
}

/// Layout of the causal depthwise convolution's input.
#[derive(Debug, Clone, Copy)]
pub struct ConvInput<'a> {
    /// Values; token t of batch b, channel c sits at `b * batch_stride + t * row_stride + c`.
    pub data: &'a [f32],
    pub batch_stride: usize,
    pub row_stride: usize,
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn conv_rows(
    input: ConvInput,
    history: &[f32],
    weight_t: &[f32],
    bias: &[f32],
    b: usize,
    t0: usize,
    out: &mut [MaybeUninit<f32>],
    k: usize,
) {
    // history: [k-1, d] inputs preceding token 0 of this batch row (zeros at sequence start).
    let d = bias.len();
    for (i, row) in out.chunks_exact_mut(d).enumerate() {
        let t = t0 + i;
        for (o, b) in row.iter_mut().zip(bias) {
            o.write(*b);
        }
        // SAFETY: every element of the row was initialised just above.
        let out_row = unsafe { &mut *(row as *mut [MaybeUninit<f32>] as *mut [f32]) };
        for j in 0..k {
            // Tap j multiplies the input k-1-j steps back (PyTorch conv1d with left padding).
            let back = k - 1 - j;
            let w = &weight_t[j * d..(j + 1) * d];
            let src: &[f32] = if t >= back {
                let off = input.batch_stride * b + input.row_stride * (t - back);
                &input.data[off..off + d]
            } else {
                let h = k - 1 - (back - t);
                &history[h * d..(h + 1) * d]
            };
            for ((o, w), x) in out_row.iter_mut().zip(w).zip(src) {
                *o += w * x;
            }
        }
        for o in out_row.iter_mut() {
            *o = silu(*o);
        }
    }
}
simd_variants!(conv_rows, conv_rows_avx512, conv_rows_avx2,
    (input: ConvInput, history: &[f32], weight_t: &[f32], bias: &[f32], b: usize, t0: usize, out: &mut [MaybeUninit<f32>], k: usize) -> ());

#[allow(clippy::too_many_arguments)]
fn conv_rows_dispatch(
    input: ConvInput,
    history: &[f32],
    weight_t: &[f32],
    bias: &[f32],
    b: usize,
    t0: usize,
    out: &mut [MaybeUninit<f32>],
    k: usize,
) {
    dispatch_simd!(
        conv_rows,
        conv_rows_avx512,
        conv_rows_avx2,
        (input, history, weight_t, bias, b, t0, out, k)
    )
}

/// Causal depthwise conv1d + SiLU over `len` tokens of `batch` rows.
///
/// `weight_t` is the kernel transposed to `[k, d]` (tap-major) so the inner loop runs over
/// contiguous channels; `history` holds, per batch row, the `k - 1` inputs that precede
/// the chunk (`[batch, k-1, d]`, zeros for a fresh sequence). Output: `[batch, len, d]`.
pub fn causal_conv_silu(
    input: ConvInput,
    history: &[f32],
    weight_t: &[f32],
    bias: &[f32],
    batch: usize,
    len: usize,
) -> Vec<f32> {
    let d = bias.len();
    let k = weight_t.len() / d;
    // Not zeroed first: conv_rows writes every row before reading it (a memset of the
    // whole output was ~4% of a prefill).
    let total = batch * len * d;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let rows = rows_per_task(len, d * k);
    out.spare_capacity_mut()[..total]
        .par_chunks_mut(len * d)
        .enumerate()
        .for_each(|(b, out_b)| {
            let hist = &history[b * (k - 1) * d..(b + 1) * (k - 1) * d];
            out_b
                .par_chunks_mut(rows * d)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    conv_rows_dispatch(input, hist, weight_t, bias, b, ci * rows, chunk, k)
                });
        });
    // SAFETY: the chunks above cover all `total` elements and conv_rows wrote each.
    unsafe { out.set_len(total) };
    out
}

/// Everything the selective scan reads, as token-major slices.
#[derive(Debug, Clone, Copy)]
pub struct ScanInputs<'a> {
    pub batch: usize,
    pub len: usize,
    pub d_inner: usize,
    pub d_state: usize,
    /// x after conv + SiLU: `[batch, len, d_inner]`.
    pub x: &'a [f32],
    /// Δ after softplus: `[batch, len, d_inner]`.
    pub delta: &'a [f32],
    /// Rows holding B then C: element (b, t, n) of B sits at
    /// `b * bc_batch_stride + t * bc_row_stride + b_offset + n`, C at `c_offset + n`.
    pub bc: &'a [f32],
    pub bc_batch_stride: usize,
    pub bc_row_stride: usize,
    pub b_offset: usize,
    pub c_offset: usize,
    /// Gate z: element (b, t, d) at `b * z_batch_stride + t * z_row_stride + d`.
    pub z: &'a [f32],
    pub z_batch_stride: usize,
    pub z_row_stride: usize,
    /// A = −exp(A_log): `[d_inner, d_state]`.
    pub a: &'a [f32],
    /// Skip connection D: `[d_inner]`.
    pub d_skip: &'a [f32],
}

/// A raw pointer that rayon tasks may share because each writes disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for disjoint writes from parallel tasks (see `selective_scan`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Channels per scan task: the state of a block stays in L1.
const SCAN_BLOCK: usize = 32;

/// Tokens ahead of the scan whose rows are prefetched. A block reads 128 bytes of each
/// token's Δ, x and z rows, thousands of bytes apart: the hardware prefetchers do not
/// follow that, and without this the scan waited on memory at every token (perf: a
/// third of its cycles on the loads of z).
const SCAN_PREFETCH_TOKENS: usize = 8;

/// Asks for the cache lines of `row` (a hint: no effect on results; nothing on other
/// architectures).
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = row.as_ptr() as usize;
        let end = start + std::mem::size_of_val(row);
        let mut line = start & !63;
        while line < end {
            // SAFETY: prefetching is a hint and never faults; the address lies in `row`'s
            // cache lines.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Scans channels `d0..d0+nd` of batch row `b`: discretisation (Ā = exp(Δ·A),
/// B̄x = Δ·B·x) is fused into the recurrence h_t = Ā_t h_{t−1} + B̄_t x_t, and the output
/// y_t = C_t·h_t + D x_t is gated by SiLU(z_t) (Gu & Dao 2023, Alg. 2).
///
/// The block's state is kept state-major (`[d_state][nd]`) so the innermost loop runs over
/// channels: every lane is an independent channel, no cross-lane sum is needed, and the
/// loop vectorises without reassociating floating-point additions.
#[inline(always)]
fn scan_block(inp: &ScanInputs, b: usize, d0: usize, nd: usize, state: &mut [f32], y: SharedMut) {
    let n = inp.d_state;
    let di = inp.d_inner;
    let mut h = vec![0f32; n * nd];
    let mut a_t = vec![0f32; n * nd];
    for j in 0..nd {
        for s in 0..n {
            h[s * nd + j] = state[j * n + s];
            a_t[s * nd + j] = inp.a[(d0 + j) * n + s] * std::f32::consts::LOG2_E;
        }
    }
    let mut acc = vec![0f32; nd];
    let mut dtx = vec![0f32; nd];
    let d_skip = &inp.d_skip[d0..d0 + nd];
    let (bc_lo, bc_hi) = (
        inp.b_offset.min(inp.c_offset),
        inp.b_offset.max(inp.c_offset) + n,
    );
    for t in 0..inp.len {
        let ahead = t + SCAN_PREFETCH_TOKENS;
        if ahead < inp.len {
            let row = (b * inp.len + ahead) * di + d0;
            prefetch(&inp.delta[row..row + nd]);
            prefetch(&inp.x[row..row + nd]);
            let z_row = b * inp.z_batch_stride + ahead * inp.z_row_stride + d0;
            prefetch(&inp.z[z_row..z_row + nd]);
            let bc_row = b * inp.bc_batch_stride + ahead * inp.bc_row_stride;
            prefetch(&inp.bc[bc_row + bc_lo..bc_row + bc_hi]);
        }
        let row = (b * inp.len + t) * di + d0;
        let dt = &inp.delta[row..row + nd];
        let xv = &inp.x[row..row + nd];
        let bc_row = b * inp.bc_batch_stride + t * inp.bc_row_stride;
        let b_t = &inp.bc[bc_row + inp.b_offset..bc_row + inp.b_offset + n];
        let c_t = &inp.bc[bc_row + inp.c_offset..bc_row + inp.c_offset + n];
        for j in 0..nd {
            dtx[j] = dt[j] * xv[j];
            acc[j] = 0.0;
        }
        for s in 0..n {
            let (bs, cs) = (b_t[s], c_t[s]);
            let hs = &mut h[s * nd..(s + 1) * nd];
            let a_s = &a_t[s * nd..(s + 1) * nd];
            for j in 0..nd {
                // exp(Δ·A) = 2^(Δ·A·log2 e), the log2 e folded into `a_t`.
                let v = fast_exp2(dt[j] * a_s[j]).mul_add(hs[j], dtx[j] * bs);
                hs[j] = v;
                acc[j] = v.mul_add(cs, acc[j]);
            }
        }
        let z_row = b * inp.z_batch_stride + t * inp.z_row_stride + d0;
        let z = &inp.z[z_row..z_row + nd];
        for j in 0..nd {
            let out = (acc[j] + d_skip[j] * xv[j]) * silu(z[j]);
            // SAFETY: (b, t, d) is written by exactly one task: the one owning channel d.
            unsafe { *y.0.add(row + j) = out };
        }
    }
    for j in 0..nd {
        for s in 0..n {
            state[j * n + s] = h[s * nd + j];
        }
    }
}
simd_variants!(scan_block, scan_block_avx512, scan_block_avx2,
    (inp: &ScanInputs, b: usize, d0: usize, nd: usize, state: &mut [f32], y: SharedMut) -> ());

fn scan_block_dispatch(
    inp: &ScanInputs,
    b: usize,
    d0: usize,
    nd: usize,
    state: &mut [f32],
    y: SharedMut,
) {
    dispatch_simd!(
        scan_block,
        scan_block_avx512,
        scan_block_avx2,
        (inp, b, d0, nd, state, y)
    )
}

/// The selective scan over a whole chunk, parallel over batch × channel blocks, with the
/// SSM state carried in `state` (`[batch, d_inner, d_state]`, f32): it holds the initial
/// state on entry and the final state on return. Returns the gated output
/// `[batch, len, d_inner]`. Memory is O(len · d_inner): the `[B, D, L, N]` discretised
/// tensors of a naive implementation are never formed.
pub fn selective_scan(inp: &ScanInputs, state: &mut [f32]) -> Vec<f32> {
    let (n, di) = (inp.d_state, inp.d_inner);
    assert_eq!(state.len(), inp.batch * di * n, "scan state size");
    // Not zeroed first: the tasks below write every element (each channel's block writes
    // all its (b, t) outputs).
    let total = inp.batch * inp.len * di;
    let mut y: Vec<f32> = Vec::with_capacity(total);
    let y_ptr = SharedMut(y.as_mut_ptr());
    state
        .par_chunks_mut(SCAN_BLOCK * n)
        .enumerate()
        .for_each(|(i, st)| {
            // A block of channels may straddle batch rows when d_inner is not a multiple of
            // the block size: walk it row by row.
            let mut flat = i * SCAN_BLOCK;
            let mut rest = st;
            while !rest.is_empty() {
                let (b, d0) = (flat / di, flat % di);
                let nd = (rest.len() / n).min(di - d0);
                let (head, tail) = rest.split_at_mut(nd * n);
                scan_block_dispatch(inp, b, d0, nd, head, y_ptr);
                flat += nd;
                rest = tail;
            }
        });
    // SAFETY: the blocks cover every (batch, channel) pair and each wrote all `len` of its
    // outputs.
    unsafe { y.set_len(total) };
    y
}

/// Output rows per matvec task.
const MATVEC_BLOCK: usize = 64;

/// Weight elements ahead of the matvec that it prefetches (the hardware prefetchers stop
/// at 4 KiB page boundaries).
const MATVEC_PREFETCH_ELEMS: usize = 1024;

/// Accumulator lanes of one matvec dot product: four AVX-512 (eight AVX2) registers.
const MATVEC_LANES: usize = 64;

/// A weight element the decode matvec streams: f32, or bf16 widened on the fly (bf16 is the
/// high half of an f32, so widening is a 16-bit shift that vectorises).
pub trait MatvecWeight: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl MatvecWeight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl MatvecWeight for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl MatvecWeight for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

#[inline(always)]
fn matvec_rows<W: MatvecWeight>(
    x: &[f32],
    w: &[W],
    k: usize,
    n0: usize,
    out: &mut [f32],
    n_total: usize,
) {
    // out holds [m][block] for output rows n0..n0+block of every input row m.
    let m = x.len() / k;
    let block = out.len() / m;
    for r in 0..block {
        let wr = &w[(n0 + r) * k..(n0 + r + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            // MATVEC_LANES independent lanes, summed at the end: vectorises without
            // reassociation, and four vector accumulators hide the FMA latency.
            let mut lanes = [0f32; MATVEC_LANES];
            let row0 = (n0 + r) * k;
            for (c, (xc, wc)) in xr
                .chunks_exact(MATVEC_LANES)
                .zip(wr.chunks_exact(MATVEC_LANES))
                .enumerate()
            {
                let ahead = row0 + c * MATVEC_LANES + MATVEC_PREFETCH_ELEMS;
                if i == 0 && ahead + MATVEC_LANES <= w.len() {
                    prefetch(&w[ahead..ahead + MATVEC_LANES]);
                }
                for l in 0..MATVEC_LANES {
                    lanes[l] += xc[l] * wc[l].widen();
                }
            }
            let tail = k / MATVEC_LANES * MATVEC_LANES;
            let mut sum = 0f32;
            for j in tail..k {
                sum += xr[j] * wr[j].widen();
            }
            let mut half = MATVEC_LANES / 2;
            while half > 0 {
                for l in 0..half {
                    lanes[l] += lanes[l + half];
                }
                half /= 2;
            }
            out[i * block + r] = lanes[0] + sum;
        }
    }
    let _ = n_total;
}
simd_variants!(matvec_rows, matvec_rows_avx512, matvec_rows_avx2,
    (x: &[f32], w: &[f32], k: usize, n0: usize, out: &mut [f32], n_total: usize) -> ());
simd_variants!(matvec_rows, matvec_rows_bf16_avx512, matvec_rows_bf16_avx2,
    (x: &[f32], w: &[half::bf16], k: usize, n0: usize, out: &mut [f32], n_total: usize) -> ());

/// [`matvec_rows`] for f16 weights with the hardware conversion (`vcvtph2ps`), which the
/// compiler does not emit for `half`'s conversion: one function per vector width (`$w`
/// lanes). Sums in the generic code's order (MATVEC_LANES lanes, products rounded before
/// each add, the same halving tree, then the tail), so every path gives the same bits.
macro_rules! f16_matvec_rows {
    ($name:ident, $features:literal, $w:literal, $zero:ident, $cvt:ident, $load_h:ident,
     $half_vec:ident, $load_x:ident, $add:ident, $mul:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            x: &[f32],
            w: &[half::f16],
            k: usize,
            n0: usize,
            out: &mut [f32],
            _n_total: usize,
        ) {
            use std::arch::x86_64::*;
            const V: usize = MATVEC_LANES / $w;
            let m = x.len() / k;
            let block = out.len() / m;
            let chunks = k / MATVEC_LANES;
            for r in 0..block {
                let wr = &w[(n0 + r) * k..(n0 + r + 1) * k];
                for i in 0..m {
                    let xr = &x[i * k..(i + 1) * k];
                    let mut acc = [$zero(); V];
                    for c in 0..chunks {
                        let ahead = (n0 + r) * k + c * MATVEC_LANES + MATVEC_PREFETCH_ELEMS;
                        if i == 0 && ahead + MATVEC_LANES <= w.len() {
                            prefetch(&w[ahead..ahead + MATVEC_LANES]);
                        }
                        for (q, a) in acc.iter_mut().enumerate() {
                            let off = c * MATVEC_LANES + q * $w;
                            // SAFETY: off + $w <= chunks · MATVEC_LANES <= k: inside both rows.
                            let wv = $cvt($load_h(wr.as_ptr().add(off) as *const $half_vec));
                            let xv = $load_x(xr.as_ptr().add(off));
                            *a = $add(*a, $mul(xv, wv));
                        }
                    }
                    let mut lanes = [0f32; MATVEC_LANES];
                    for (q, a) in acc.iter().enumerate() {
                        $store(lanes.as_mut_ptr().add(q * $w), *a);
                    }
                    out[i * block + r] = finish_lanes(&mut lanes, xr, wr, chunks * MATVEC_LANES);
                }
            }
        }
    };
}
f16_matvec_rows!(
    matvec_rows_f16_avx512,
    "avx512f,avx2,fma,f16c",
    16,
    _mm512_setzero_ps,
    _mm512_cvtph_ps,
    _mm256_loadu_si256,
    __m256i,
    _mm512_loadu_ps,
    _mm512_add_ps,
    _mm512_mul_ps,
    _mm512_storeu_ps
);
f16_matvec_rows!(
    matvec_rows_f16_avx2,
    "avx2,fma,f16c",
    8,
    _mm256_setzero_ps,
    _mm256_cvtph_ps,
    _mm_loadu_si128,
    __m128i,
    _mm256_loadu_ps,
    _mm256_add_ps,
    _mm256_mul_ps,
    _mm256_storeu_ps
);

/// The end of one f16 dot product, as in [`matvec_rows`]: the tail from `tail` on, the
/// lanes summed by halving, then the two added.
#[inline(always)]
fn finish_lanes(lanes: &mut [f32; MATVEC_LANES], xr: &[f32], wr: &[half::f16], tail: usize) -> f32 {
    // The tail's weights widened in one slice call (F16C, 8 at a time) and then summed in
    // order: `half`'s per-element conversion is a call through a run-time feature check,
    // and a row shorter than MATVEC_LANES (dt_proj: dt_rank of 48 at 130m) is all tail.
    // The conversion is exact, so the sum is the same bits.
    use half::slice::HalfFloatSliceExt;
    let mut widened = [0f32; MATVEC_LANES];
    let n = xr.len() - tail;
    wr[tail..].convert_to_f32_slice(&mut widened[..n]);
    let mut sum = 0f32;
    for (x, w) in xr[tail..].iter().zip(&widened[..n]) {
        sum += x * w;
    }
    let mut half = MATVEC_LANES / 2;
    while half > 0 {
        for l in 0..half {
            lanes[l] += lanes[l + half];
        }
        half /= 2;
    }
    lanes[0] + sum
}

/// [`matvec_rows`] compiled for the CPU at hand, per weight type.
trait MatvecDispatch: MatvecWeight {
    fn rows_dispatch(x: &[f32], w: &[Self], k: usize, n0: usize, out: &mut [f32], n: usize);
}

impl MatvecDispatch for f32 {
    fn rows_dispatch(x: &[f32], w: &[f32], k: usize, n0: usize, out: &mut [f32], n: usize) {
        dispatch_simd!(
            matvec_rows,
            matvec_rows_avx512,
            matvec_rows_avx2,
            (x, w, k, n0, out, n)
        )
    }
}

impl MatvecDispatch for half::bf16 {
    fn rows_dispatch(x: &[f32], w: &[Self], k: usize, n0: usize, out: &mut [f32], n: usize) {
        dispatch_simd!(
            matvec_rows,
            matvec_rows_bf16_avx512,
            matvec_rows_bf16_avx2,
            (x, w, k, n0, out, n)
        )
    }
}

impl MatvecDispatch for half::f16 {
    fn rows_dispatch(x: &[f32], w: &[Self], k: usize, n0: usize, out: &mut [f32], n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx2") && has!("fma") && has!("f16c") {
                // SAFETY: the CPU supports the features the function was compiled for.
                return unsafe { matvec_rows_f16_avx512(x, w, k, n0, out, n) };
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                // SAFETY: as above.
                return unsafe { matvec_rows_f16_avx2(x, w, k, n0, out, n) };
            }
        }
        matvec_rows(x, w, k, n0, out, n)
    }
}

/// `x Wᵀ` for a few rows of x (`[m, k]`) and a row-major weight `[n, k]` (f32, or bf16 or
/// f16 widened as it streams): the decode-time product, bound by streaming W from memory once,
/// so it runs over contiguous weight rows in parallel blocks instead of through a general
/// GEMM. Accumulates in f32. Returns `[m, n]`.
#[allow(private_bounds)]
pub fn matvec<W: MatvecDispatch>(x: &[f32], w: &[W], k: usize) -> Vec<f32> {
    let m = x.len() / k;
    let n = w.len() / k;
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(MATVEC_BLOCK))
        .into_par_iter()
        .map(|bi| {
            let n0 = bi * MATVEC_BLOCK;
            let rows = MATVEC_BLOCK.min(n - n0);
            let mut out = vec![0f32; m * rows];
            W::rows_dispatch(x, w, k, n0, &mut out, n);
            out
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (bi, out) in blocks.iter().enumerate() {
        let n0 = bi * MATVEC_BLOCK;
        let rows = out.len() / m;
        for i in 0..m {
            y[i * n + n0..i * n + n0 + rows].copy_from_slice(&out[i * rows..(i + 1) * rows]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvec_matches_naive() {
        let (m, n, k) = (3, 150, 37);
        let x = pseudo(21, m * k, -1.0, 1.0);
        let w = pseudo(22, n * k, -1.0, 1.0);
        let y = matvec(&x, &w, k);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|c| (x[i * k + c] * w[j * k + c]) as f64).sum();
                assert!((y[i * n + j] as f64 - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn bf16_matvec_widens_exactly() {
        let (m, n, k) = (2, 130, 48);
        let x = pseudo(23, m * k, -1.0, 1.0);
        let w: Vec<half::bf16> = pseudo(24, n * k, -1.0, 1.0)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let y = matvec(&x, &w, k);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c].to_f64())
                    .sum();
                assert!((y[i * n + j] as f64 - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn f16_matvec_matches_the_generic_code_bit_for_bit() {
        // k = 200: three 64-lane chunks and a tail; k = 48 (dt_proj's rows at 130m): all
        // tail; subnormal and large f16 values too.
        for k in [200, 48] {
            f16_matvec_case(k);
        }
    }

    fn f16_matvec_case(k: usize) {
        let (m, n) = (3, 70);
        let x = pseudo(25, m * k, -1.0, 1.0);
        let mut wf = pseudo(26, n * k, -2.0, 2.0);
        for (i, v) in wf.iter_mut().enumerate().step_by(17) {
            *v = if i % 2 == 0 { 3e-6 } else { -6.0e4 };
        }
        let w: Vec<half::f16> = wf.into_iter().map(half::f16::from_f32).collect();
        let y = matvec(&x, &w, k);
        let mut generic = vec![0f32; m * n];
        let mut block = vec![0f32; m * n];
        matvec_rows(&x, &w, k, 0, &mut block, n);
        for i in 0..m {
            generic[i * n..(i + 1) * n].copy_from_slice(&block[i * n..(i + 1) * n]);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y), bits(&generic));
        // The AVX2 + F16C kernel too, where this CPU has it (`matvec` picks AVX-512 first).
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                let mut avx2 = vec![0f32; m * n];
                // SAFETY: the CPU has the features the kernel was compiled for.
                unsafe { matvec_rows_f16_avx2(&x, &w, k, 0, &mut avx2, n) };
                assert_eq!(bits(&avx2), bits(&generic));
            }
        }
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c].to_f64())
                    .sum();
                assert!((y[i * n + j] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn fast_exp2_matches_std_within_an_ulp() {
        let mut worst = 0f64;
        let mut x = -125.9f32;
        while x < 127.0 {
            let want = (x as f64).exp2();
            let rel = ((fast_exp2(x) as f64) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.000_731;
        }
        assert!(worst < 1.2e-7, "fast_exp2 relative error {worst:e}");
        assert_eq!(fast_exp2(0.0), 1.0);
        assert_eq!(fast_exp2(-1.0), 0.5);
        assert_eq!(fast_exp2(10.0), 1024.0);
        // Far below the range: the clamp's 2^-126, as fast_exp's flush.
        assert!(fast_exp2(-1e4) <= f32::MIN_POSITIVE * 1.000_001);
        assert!(fast_exp2(f32::NEG_INFINITY) >= 0.0);
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(-200.0), fast_exp(-87.336_54));
        assert!(fast_exp(-200.0) < 1e-37);
    }

    #[test]
    fn softplus_and_silu_match_std() {
        for i in -4000..4000 {
            let v = i as f32 * 0.01;
            let want = (v as f64).exp().ln_1p() as f32;
            let got = softplus(v);
            assert!(
                (got - want).abs() <= 4e-7 * want.abs().max(1e-30) + 1e-12,
                "softplus({v}) = {got}, want {want}"
            );
            let want_silu = (v as f64 / (1.0 + (-v as f64).exp())) as f32;
            assert!((silu(v) - want_silu).abs() <= 1e-6 * want_silu.abs().max(1e-6));
        }
        assert_eq!(softplus(100.0), 100.0);
        assert!(softplus(-100.0) > 0.0 && softplus(-100.0) < 2e-38);
    }

    /// Straightforward reference: discretise then recur, in f64.
    fn naive_scan(inp: &ScanInputs, h0: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (bsz, l, di, n) = (inp.batch, inp.len, inp.d_inner, inp.d_state);
        let mut h: Vec<f64> = h0.iter().map(|&v| v as f64).collect();
        let mut y = vec![0f32; bsz * l * di];
        for b in 0..bsz {
            for t in 0..l {
                for d in 0..di {
                    let idx = (b * l + t) * di + d;
                    let dt = inp.delta[idx] as f64;
                    let x = inp.x[idx] as f64;
                    let mut acc = 0f64;
                    for s in 0..n {
                        let bc = b * inp.bc_batch_stride + t * inp.bc_row_stride;
                        let bb = inp.bc[bc + inp.b_offset + s] as f64;
                        let cc = inp.bc[bc + inp.c_offset + s] as f64;
                        let hi = (b * di + d) * n + s;
                        h[hi] = (dt * inp.a[d * n + s] as f64).exp() * h[hi] + dt * bb * x;
                        acc += h[hi] * cc;
                    }
                    let z = inp.z[b * inp.z_batch_stride + t * inp.z_row_stride + d] as f64;
                    let gate = z / (1.0 + (-z).exp());
                    y[idx] = ((acc + inp.d_skip[d] as f64 * x) * gate) as f32;
                }
            }
        }
        (y, h.iter().map(|&v| v as f32).collect())
    }

    fn pseudo(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    #[test]
    fn scan_matches_naive_reference_with_odd_sizes() {
        // d_inner 40 is not a multiple of the block, batch 3 makes blocks straddle rows.
        let (bsz, l, di, n) = (3, 17, 40, 5);
        let x = pseudo(1, bsz * l * di, -1.0, 1.0);
        let delta = pseudo(2, bsz * l * di, 0.001, 0.5);
        let bc = pseudo(3, bsz * l * (3 + 2 * n), -1.0, 1.0);
        let z = pseudo(4, bsz * l * 2 * di, -2.0, 2.0);
        let a: Vec<f32> = pseudo(5, di * n, 0.1, 3.0).iter().map(|v| -v).collect();
        let d_skip = pseudo(6, di, -1.0, 1.0);
        let h0 = pseudo(7, bsz * di * n, -0.5, 0.5);
        let inp = ScanInputs {
            batch: bsz,
            len: l,
            d_inner: di,
            d_state: n,
            x: &x,
            delta: &delta,
            bc: &bc,
            bc_batch_stride: l * (3 + 2 * n),
            bc_row_stride: 3 + 2 * n,
            b_offset: 3,
            c_offset: 3 + n,
            z: &z[di..],
            z_batch_stride: l * 2 * di,
            z_row_stride: 2 * di,
            a: &a,
            d_skip: &d_skip,
        };
        let (want_y, want_h) = naive_scan(&inp, &h0);
        let mut state = h0.clone();
        let y = selective_scan(&inp, &mut state);
        for (g, w) in y.iter().zip(&want_y) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        for (g, w) in state.iter().zip(&want_h) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn conv_matches_naive_and_carries_history() {
        let (bsz, l, d, k) = (2, 9, 5, 4);
        let input = pseudo(11, bsz * l * 2 * d, -1.0, 1.0); // rows of 2d, x is the first d
        let w = pseudo(12, d * k, -1.0, 1.0); // [d, k] as stored by PyTorch
        let bias = pseudo(13, d, -0.5, 0.5);
        let mut w_t = vec![0f32; k * d];
        for c in 0..d {
            for j in 0..k {
                w_t[j * d + c] = w[c * k + j];
            }
        }
        let x_at = |b: usize, t: usize, c: usize| input[(b * l + t) * 2 * d + c];
        let ci = ConvInput {
            data: &input,
            batch_stride: l * 2 * d,
            row_stride: 2 * d,
        };
        let out = causal_conv_silu(ci, &vec![0f32; bsz * (k - 1) * d], &w_t, &bias, bsz, l);
        for b in 0..bsz {
            for t in 0..l {
                for c in 0..d {
                    let mut acc = bias[c] as f64;
                    for j in 0..k {
                        let back = k - 1 - j;
                        if t >= back {
                            acc += (w[c * k + j] * x_at(b, t - back, c)) as f64;
                        }
                    }
                    let want = acc / (1.0 + (-acc).exp());
                    let got = out[(b * l + t) * d + c] as f64;
                    assert!((got - want).abs() < 1e-5);
                }
            }
        }
        // Split at t = 5: the second half with the first half's last k-1 inputs as history.
        let split = 5;
        let mut hist = vec![0f32; bsz * (k - 1) * d];
        for b in 0..bsz {
            for h in 0..k - 1 {
                for c in 0..d {
                    hist[(b * (k - 1) + h) * d + c] = x_at(b, split - (k - 1) + h, c);
                }
            }
        }
        let tail = ConvInput {
            data: &input[split * 2 * d..],
            batch_stride: l * 2 * d,
            row_stride: 2 * d,
        };
        let out2 = causal_conv_silu(tail, &hist, &w_t, &bias, bsz, l - split);
        for b in 0..bsz {
            for t in split..l {
                for c in 0..d {
                    let a = out[(b * l + t) * d + c];
                    let bb = out2[(b * (l - split) + t - split) * d + c];
                    assert!((a - bb).abs() < 1e-6);
                }
            }
        }
    }
}
