//! The mixer in plain Candle tensor ops: the device-generic backend. It runs wherever
//! Candle runs (CPU, CUDA, Metal) and carries out every primitive of a [`LayerPlan`], so
//! the model and the policy seam do not care which backend runs. It is the reference
//! the fused kernels are tested against, and the path a Mac takes.
//!
//! Shape glossary: B batch, L tokens, D d_inner, N d_state, R dt_rank, K d_conv.
//!
//! Ops and dtypes it needs, checked against candle-metal-kernels 0.11.1 (`metal_src/`):
//! - in the model dtype (f32, f16, bf16): `matmul` (mlx_gemm), `index_select` with u32
//!   ids (indexing), `rms_norm` and `layer_norm` (candle-nn, reduce), `add`, casts to and
//!   from f32, and the copies behind `contiguous` and `cat`;
//! - in f32 only: broadcast `add`, `sub`, `mul`, `div`; `exp`, `log`, `abs`, `neg`,
//!   `relu`, `silu`, `sqr`, `sqrt`, `floor`, `affine`; `sum` over the last dim;
//!   `ge`, `gt`, `le`, `eq` (to u8); casts u8 → f32, f32 → u32;
//! - in u32: `max` (the vocabulary check).
//!
//! Metal compiles its bf16 kernels only where the GPU has bfloat (`__HAVE_BFLOAT__`); on
//! other Macs the loader runs bf16 as f16. Everything elementwise here runs in f32 (as the
//! fused kernels accumulate), so no bf16 elementwise kernel is needed: `where_cond`, which
//! has none on Metal, is replaced by masks multiplied in f32.
//!
//! Candle ops that do not fit, and what replaces them:
//! - `arg_sort_last_dim`: on Metal one threadgroup sorts a row (at most 1024 columns), on
//!   CUDA a row must fit in shared memory, and neither sort is stable. Top-K is instead
//!   a bisection for the K-th largest score, counting with `ge` + `sum`, then masks and
//!   a gather by binary search (`candle_select.rs`).
//! - `cumsum`: a dense L×L triangular matmul; `candle_select.rs` sums in blocks.
//! - `index_add` / `scatter_add`: on Metal one thread walks the whole index list; the
//!   binary search above gathers instead of scattering.

use super::{Kept, Mixer, Projection, Watch};
use crate::policy::observe::ScanView;
use crate::policy::{DeltaScale, LayerPlan};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};

#[path = "candle_select.rs"]
mod select;
use select::keep_tokens;

/// The mixer's constants as f32 tensors on the model's device.
#[derive(Debug, Clone)]
pub(super) struct OpsParams {
    /// Conv taps, tap-major `[K, D]`.
    conv_weight_t: Tensor,
    conv_bias: Tensor,
    dt_bias: Tensor,
    a_log: Tensor,
    /// A = −exp(A_log), `[D, N]`.
    a: Tensor,
    d_skip: Tensor,
    /// How the scan's recurrence runs within a time chunk.
    pub(super) chunk_scan: ChunkScan,
}

impl OpsParams {
    pub(super) fn new(m: &Mixer, device: &Device) -> Result<Self> {
        let (di, n) = (m.d_inner, m.d_state);
        Ok(Self {
            conv_weight_t: Tensor::from_slice(&m.conv_weight_t, (m.d_conv, di), device)?,
            conv_bias: Tensor::from_slice(&m.conv_bias, di, device)?,
            dt_bias: Tensor::from_slice(&m.dt_bias, di, device)?,
            a_log: Tensor::from_slice(&m.a_log, (di, n), device)?,
            a: Tensor::from_slice(&m.a, (di, n), device)?,
            d_skip: Tensor::from_slice(&m.d_skip, di, device)?,
            chunk_scan: ChunkScan::from_env()?,
        })
    }
}

/// `x Wᵀ (+ b)` as one matmul, whatever the number of rows.
pub(super) fn project(p: &Projection, x: &Tensor) -> Result<Tensor> {
    Ok(p.add_bias(x.matmul(&p.weight.t()?)?)?)
}

impl Mixer {
    /// The mixer in Candle ops. `h`: normalised input `[B, L, d_model]`; `conv`
    /// (`[B, K−1, D]`) and `ssm` (`[B, D, N]`) are the f32 states, replaced on return.
    /// Returns the output `[B, L', d_model]` and, when the plan dropped tokens, the kept
    /// ones (on the host too when `record` or an observer wants them).
    pub(super) fn forward_ops(
        &self,
        h: &Tensor,
        conv: &mut Tensor,
        ssm: &mut Tensor,
        plan: &LayerPlan,
        record: bool,
        watch: Watch,
    ) -> Result<(Tensor, Option<Kept>)> {
        let p = self
            .ops
            .as_ref()
            .context("the Candle-ops backend has no parameters for this layer")?;
        let (batch, len, d_model) = h.dims3()?;
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let xz = project(&self.in_proj, &h.reshape((batch * len, d_model))?)?;
        let xz = xz.to_dtype(DType::F32)?.reshape((batch, len, 2 * di))?;
        let (x_conv, window) = causal_conv_silu(&xz.narrow(2, 0, di)?, conv, p)?;
        *conv = window;
        let x_conv = x_conv.reshape((batch * len, di))?;
        // x_proj → (dt, B, C) in the model dtype, as the fused paths.
        let dbc = project(&self.x_proj, &x_conv.to_dtype(h.dtype())?)?;
        let dt = dbc
            .narrow(1, 0, r)?
            .contiguous()?
            .matmul(&self.dt_proj_weight.t()?)?;
        let delta = softplus(&dt.to_dtype(DType::F32)?.broadcast_add(&p.dt_bias)?)?;
        let delta = delta_under(&delta, plan)?;
        let a = match plan.a_log_scale {
            Some(s) => p.a_log.affine(s as f64, 0.0)?.exp()?.neg()?,
            None => p.a.clone(),
        };
        let bc = dbc.to_dtype(DType::F32)?;
        let kept = match plan.keep {
            Some(rule) => keep_tokens(&delta, (batch, len, di), rule)?,
            None => None,
        }
        .map(|indices| -> Result<Kept> {
            let host = match record || watch.observer().is_some() {
                true => Some(
                    indices
                        .to_vec1::<u32>()?
                        .into_iter()
                        .map(|i| i as usize)
                        .collect(),
                ),
                false => None,
            };
            Ok(Kept { indices, host })
        })
        .transpose()?;
        if let Some(observer) = watch.observer() {
            let a_host = a.flatten_all()?.to_vec1::<f32>()?;
            let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            observer.on_scan(&ScanView {
                layer: watch.layer,
                batch,
                len,
                d_inner: di,
                d_state: n,
                a: &a_host,
                delta: &host(&delta)?,
                x: &host(&x_conv)?,
                bc: &host(&bc)?,
                bc_row_stride: r + 2 * n,
                b_offset: r,
                c_offset: r + n,
                kept: kept.as_ref().and_then(|k| k.host.as_deref()),
            })?;
        }
        let z = xz.narrow(2, di, di)?.reshape((batch * len, di))?;
        let (mut x_conv, mut delta, mut bc, mut z, mut scan_len) = (x_conv, delta, bc, z, len);
        if let Some(k) = &kept {
            let gather = |t: &Tensor| t.index_select(&k.indices, 0);
            (x_conv, delta, bc, z) = (gather(&x_conv)?, gather(&delta)?, gather(&bc)?, gather(&z)?);
            scan_len = k.indices.dim(0)? / batch;
        }
        let rows = |t: Tensor, width: usize| t.reshape((batch, scan_len, width));
        let inputs = ScanTensors {
            x: rows(x_conv, di)?,
            delta: rows(delta, di)?,
            b: rows(bc.narrow(1, r, n)?.contiguous()?, n)?,
            c: rows(bc.narrow(1, r + n, n)?.contiguous()?, n)?,
            z: rows(z, di)?,
        };
        let (y, h_last) = selective_scan(&inputs, &a, &p.d_skip, ssm, p.chunk_scan)?;
        *ssm = h_last;
        let y = y.reshape((batch * scan_len, di))?.to_dtype(h.dtype())?;
        let out = project(&self.out_proj, &y)?.reshape((batch, scan_len, d_model))?;
        Ok((out, kept))
    }
}

/// Causal depthwise conv1d + SiLU of `x` (`[B, L, D]`, f32) continuing from `window`
/// (the `K − 1` inputs before it): output tap j multiplies the input K−1−j steps back, as
/// PyTorch's conv1d with left padding. Returns the output and the new window, the last
/// `K − 1` inputs (decode continues from the full input, even when the scan keeps fewer).
fn causal_conv_silu(x: &Tensor, window: &Tensor, p: &OpsParams) -> Result<(Tensor, Tensor)> {
    let (_, len, di) = x.dims3()?;
    let k = p.conv_weight_t.dim(0)?;
    let padded = match k {
        1 => x.contiguous()?,
        _ => Tensor::cat(&[window, &x.contiguous()?], 1)?,
    };
    let tap = |j: usize| -> Result<Tensor> {
        let w = p.conv_weight_t.narrow(0, j, 1)?.reshape((1, 1, di))?;
        Ok(padded.narrow(1, j, len)?.broadcast_mul(&w)?)
    };
    // bias + Σ_j w_j·x_{t−(K−1−j)}, summed in the fused kernel's order.
    let mut acc = tap(0)?.broadcast_add(&p.conv_bias.reshape((1, 1, di))?)?;
    for j in 1..k {
        acc = (acc + tap(j)?)?;
    }
    let window = padded.narrow(1, len, k - 1)?.contiguous()?;
    Ok((acc.silu()?, window))
}

/// softplus(v) = max(v, 0) + ln(1 + e^−|v|), which never overflows. ln(1 + u) is
/// Goldberg's log1p, ln(w)·u / (w − 1) with w = 1 + u rounded (Goldberg 1991, "What
/// every computer scientist should know about floating-point arithmetic", Thm. 4): a
/// plain ln(1 + u) loses relative precision for the small u of Δ ≈ 1e-3.
fn softplus(v: &Tensor) -> Result<Tensor> {
    let u = v.abs()?.neg()?.exp()?;
    let w = u.affine(1.0, 1.0)?;
    let w_minus_1 = w.affine(1.0, -1.0)?;
    // Where w rounds to 1, ln(1 + u) = u to f32 precision.
    let exact_one = w_minus_1.eq(0.0)?.to_dtype(DType::F32)?;
    let log1p = ((w.log()? * &u)? / (w_minus_1 + &exact_one)?)?;
    let log1p = (log1p + (exact_one * u)?)?;
    Ok((v.relu()? + log1p)?)
}

/// Δ under the plan: scaled (MambaExtend, UPI), then filtered (LongMamba: Δ_{t,c} ≤ θ_c
/// becomes 0). `delta`: `[rows, D]`.
fn delta_under(delta: &Tensor, plan: &LayerPlan) -> Result<Tensor> {
    let device = delta.device();
    let mut delta = delta.clone();
    match &plan.delta_scale {
        Some(DeltaScale::Layer(s)) => delta = delta.affine(*s as f64, 0.0)?,
        Some(DeltaScale::Channel(s)) => {
            delta = delta.broadcast_mul(&Tensor::from_slice(s, s.len(), device)?)?
        }
        None => {}
    }
    if let Some(theta) = &plan.delta_filter {
        let theta = Tensor::from_slice(theta, theta.len(), device)?;
        let above = delta.broadcast_gt(&theta)?.to_dtype(DType::F32)?;
        delta = (delta * above)?;
    }
    Ok(delta)
}

/// What the scan reads, `[B, L, ·]` f32: x after conv + SiLU, Δ under the plan, B, C and
/// the gate z.
struct ScanTensors {
    x: Tensor,
    delta: Tensor,
    b: Tensor,
    c: Tensor,
    z: Tensor,
}

/// Elements of one discretised chunk (`[T, B, D, N]`) the scan materialises: 16 MiB of f32.
const SCAN_CHUNK_ELEMS: usize = 1 << 22;

/// How the recurrence runs within a time chunk of [`selective_scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkScan {
    /// The device decides: [`Self::Sequential`] on the CPU, [`Self::Prefix`] on a GPU.
    #[default]
    Auto,
    /// One multiply and one add per token: the least work, the most ops (best on a CPU).
    Sequential,
    /// A Kogge–Stone prefix scan of the chunk, log2(T) rounds of whole-chunk ops: about
    /// log2(T) times the work in T / log2(T) times fewer ops, for GPUs, where each op costs
    /// a kernel launch.
    Prefix,
}

impl ChunkScan {
    /// `DECIMAMBA_CANDLE_SCAN=sequential|prefix|auto` forces a variant (for benchmarks).
    pub(super) fn from_env() -> Result<Self> {
        match std::env::var("DECIMAMBA_CANDLE_SCAN") {
            Err(_) => Ok(Self::Auto),
            Ok(v) => match v.trim() {
                "" | "auto" => Ok(Self::Auto),
                "sequential" => Ok(Self::Sequential),
                "prefix" => Ok(Self::Prefix),
                other => anyhow::bail!(
                    "DECIMAMBA_CANDLE_SCAN={other}: expected sequential, prefix or auto"
                ),
            },
        }
    }

    fn on(self, device: &Device) -> Self {
        match (self, device.is_cpu()) {
            (Self::Auto, true) => Self::Sequential,
            (Self::Auto, false) => Self::Prefix,
            (other, _) => other,
        }
    }
}

/// The selective scan (Gu & Dao 2023, Alg. 2) chunk by chunk: within a chunk of T tokens
/// the discretisation Ā = exp(Δ·A), B̄x = Δ·B·x is formed for all tokens at once, the
/// recurrence h_t = Ā_t h_{t−1} + B̄_t x_t runs as `mode` says, and y_t = C_t·h_t for the
/// chunk is one product and sum. The state is carried from chunk to chunk, so memory is
/// O(T · D · N), never O(L · D · N). Then y + D·x, gated by SiLU(z). `h0`: `[B, D, N]`.
/// Returns y `[B, L, D]` and the last state.
fn selective_scan(
    s: &ScanTensors,
    a: &Tensor,
    d_skip: &Tensor,
    h0: &Tensor,
    mode: ChunkScan,
) -> Result<(Tensor, Tensor)> {
    let (batch, len, di) = s.x.dims3()?;
    let n = a.dim(1)?;
    let mode = mode.on(s.x.device());
    let chunk = (SCAN_CHUNK_ELEMS / (batch * di * n).max(1)).clamp(1, 256);
    let a = a.reshape((1, 1, di, n))?;
    let mut h = h0.clone();
    let mut ys = Vec::with_capacity(len.div_ceil(chunk));
    for start in (0..len).step_by(chunk) {
        let t = chunk.min(len - start);
        let part = |x: &Tensor| x.narrow(1, start, t);
        let delta = part(&s.delta)?;
        // Time-major so each step reads one contiguous [B, D, N] slice.
        let decay = delta
            .unsqueeze(3)?
            .broadcast_mul(&a)?
            .exp()?
            .transpose(0, 1)?
            .contiguous()?;
        let input = (delta * part(&s.x)?)?
            .unsqueeze(3)?
            .broadcast_mul(&part(&s.b)?.unsqueeze(2)?)?
            .transpose(0, 1)?
            .contiguous()?;
        let states = match mode {
            ChunkScan::Prefix => prefix_states(decay, input, &h)?,
            _ => {
                let mut states = Vec::with_capacity(t);
                for step in 0..t {
                    h = ((decay.get(step)? * &h)? + input.get(step)?)?;
                    states.push(h.clone());
                }
                Tensor::stack(&states, 0)?
            }
        };
        h = states.get(t - 1)?;
        let c = part(&s.c)?.unsqueeze(2)?;
        ys.push(states.transpose(0, 1)?.broadcast_mul(&c)?.sum(D::Minus1)?);
    }
    let y = Tensor::cat(&ys, 1)?;
    let y = (y + s.x.broadcast_mul(&d_skip.reshape((1, 1, di))?)?)?;
    Ok(((y * s.z.silu()?)?, h))
}

/// Every state h_t = a_t h_{t−1} + b_t of a chunk (`a`, `b`: `[T, B, D, N]`, time-major)
/// from `h0`, by the Kogge–Stone scan of the associative pairs (a, b) ∘ (a', b') =
/// (a·a', a'·b + b'): after the round of distance d, (a_t, b_t) composes the steps
/// t−2d+1 … t. Decays are products of values in [0, 1], so nothing overflows.
fn prefix_states(mut a: Tensor, b: Tensor, h0: &Tensor) -> Result<Tensor> {
    let t = a.dim(0)?;
    // Fold h0 into the first step: b_0 ← a_0·h0 + b_0.
    let first = ((a.get(0)? * h0)? + b.get(0)?)?.unsqueeze(0)?;
    let mut b = match t {
        1 => first,
        _ => Tensor::cat(&[first, b.narrow(0, 1, t - 1)?], 0)?,
    };
    let mut d = 1;
    while d < t {
        let (head, rest) = (t - d, d);
        let carried = (a.narrow(0, d, head)? * b.narrow(0, 0, head)?)?;
        b = Tensor::cat(
            &[b.narrow(0, 0, rest)?, (b.narrow(0, d, head)? + carried)?],
            0,
        )?;
        if 2 * d < t {
            let composed = (a.narrow(0, d, head)? * a.narrow(0, 0, head)?)?;
            a = Tensor::cat(&[a.narrow(0, 0, rest)?, composed], 0)?;
        }
        d *= 2;
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan against a plain host loop of the recurrence, over several time chunks and
    /// a batch of 2, in both chunk variants.
    #[test]
    fn both_chunk_scans_equal_the_recurrence_across_chunks() {
        let (batch, len, di, n) = (2, 600, 3, 2);
        let value = |i: usize, scale: f32| ((i * 7919 % 1000) as f32 / 1000.0 - 0.3) * scale;
        let make = |w: usize, seed: usize, scale: f32| -> Vec<f32> {
            (0..batch * len * w)
                .map(|i| value(i + seed, scale))
                .collect()
        };
        let (x, z) = (make(di, 1, 2.0), make(di, 2, 1.0));
        let delta: Vec<f32> = make(di, 3, 1.0).iter().map(|v| v.abs() * 0.2).collect();
        let (b, c) = (make(n, 4, 1.0), make(n, 5, 1.0));
        let a: Vec<f32> = (0..di * n).map(|i| -0.5 - i as f32 * 0.3).collect();
        let d_skip = vec![0.5f32, -1.0, 0.25];
        let h0: Vec<f32> = (0..batch * di * n).map(|i| value(i, 1.0)).collect();
        // The recurrence, token by token, in f64.
        let (mut want_y, mut h) = (
            vec![0f64; batch * len * di],
            h0.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        for bi in 0..batch {
            for t in 0..len {
                for ci in 0..di {
                    let row = (bi * len + t) * di + ci;
                    let mut acc = 0f64;
                    for si in 0..n {
                        let hs = &mut h[(bi * di + ci) * n + si];
                        let dt = delta[row] as f64;
                        *hs = (dt * a[ci * n + si] as f64).exp() * *hs
                            + dt * x[row] as f64 * b[(bi * len + t) * n + si] as f64;
                        acc += *hs * c[(bi * len + t) * n + si] as f64;
                    }
                    let zz = z[row] as f64;
                    want_y[row] =
                        (acc + d_skip[ci] as f64 * x[row] as f64) * zz / (1.0 + (-zz).exp());
                }
            }
        }
        let dev = Device::Cpu;
        let t = |v: &[f32], w: usize| Tensor::from_slice(v, (batch, len, w), &dev).unwrap();
        let inputs = ScanTensors {
            x: t(&x, di),
            delta: t(&delta, di),
            b: t(&b, n),
            c: t(&c, n),
            z: t(&z, di),
        };
        let a_t = Tensor::from_slice(&a, (di, n), &dev).unwrap();
        let d_t = Tensor::from_slice(&d_skip, di, &dev).unwrap();
        let h0_t = Tensor::from_slice(&h0, (batch, di, n), &dev).unwrap();
        for mode in [ChunkScan::Sequential, ChunkScan::Prefix] {
            let (y, h_last) = selective_scan(&inputs, &a_t, &d_t, &h0_t, mode).unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = y
                .iter()
                .zip(&want_y)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-4, "{mode:?}: y differs by {err}");
            let h_last = h_last.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = h_last
                .iter()
                .zip(&h)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-4, "{mode:?}: last state differs by {err}");
        }
    }

    #[test]
    fn softplus_keeps_relative_precision() {
        let v = [-30.0f32, -16.0, -6.9, -1.0, 0.0, 0.3, 5.0, 25.0, 90.0];
        let got = softplus(&Tensor::new(&v, &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in v.iter().zip(got) {
            let want = (*x as f64).exp().ln_1p();
            let rel = ((y as f64 - want) / want).abs();
            assert!(rel < 1e-6, "softplus({x}) = {y}, want {want} (rel {rel:e})");
        }
    }
}
