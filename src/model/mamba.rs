//! The Mamba-1 language model (Gu & Dao 2023): embedding → N × (Add → Norm → Mixer) →
//! final norm → LM head, with DeciMamba decimation inside chosen mixers.
//!
//! One forward path serves every use: a whole prompt, one chunk of a long prompt, or a
//! single decode step; the caller passes the [`InferenceState`] that carries each layer's
//! convolution window and SSM state from one call to the next.

use super::config::MambaConfig;
use super::kernels::{self, ConvInput, ScanInputs};
#[cfg(feature = "cuda")]
#[path = "cuda.rs"]
mod cuda;
use crate::decimation::{select_by_scores, select_tokens, token_scores, DecimationConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::Serialize;

/// A dense projection `y = x Wᵀ (+ b)` on token rows.
#[derive(Debug, Clone)]
struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Projection {
    fn load(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let weight = get(vb, (out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(get(vb, out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Projection {
    /// `x`: `[rows, in]` → `[rows, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = linear(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Rows up to which `x Wᵀ` goes through the streaming matvec kernel (decode steps).
const MATVEC_MAX_ROWS: usize = 4;

/// `x Wᵀ` for `x` `[rows, in]` and `w` `[out, in]`: a GEMM for prefill, a weight-streaming
/// matvec for the few rows of a decode step on the CPU in f32 or bf16 (candle's bf16 GEMM
/// is several times slower there). The bf16 product is rounded to bf16, as the GEMM's is.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let same = x.dtype() == w.dtype() && matches!(w.dtype(), DType::F32 | DType::BF16);
    if rows <= MATVEC_MAX_ROWS && x.device().is_cpu() && same && w.is_contiguous() {
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (storage, layout) = w.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let span = layout.start_offset()..layout.start_offset() + w.elem_count();
            let y = match w.dtype() {
                DType::BF16 => kernels::matvec(&xv, &cpu.as_slice::<half::bf16>()?[span], k),
                _ => kernels::matvec(&xv, &cpu.as_slice::<f32>()?[span], k),
            };
            let n = w.dim(0)?;
            return Tensor::from_vec(y, (rows, n), x.device())?.to_dtype(w.dtype());
        }
    }
    x.matmul(&w.t()?)
}

/// Reads one tensor, naming it fully when it is missing or has the wrong shape.
fn get<S: Into<candle_core::Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    let full = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    vb.get(shape, name).map_err(|e| match e {
        candle_core::Error::UnexpectedShape { expected, got, .. } => {
            anyhow::anyhow!(
                "checkpoint tensor {full} has shape {got:?} but the config implies {expected:?}"
            )
        }
        other => anyhow::anyhow!("checkpoint tensor {full}: {other}"),
    })
}

/// RMSNorm (Zhang & Sennrich 2019) or LayerNorm, as the checkpoint says.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl Norm {
    fn load(vb: &VarBuilder, cfg: &MambaConfig) -> Result<Self> {
        let weight = get(vb, cfg.d_model, "weight")?;
        let bias = if cfg.rms_norm {
            None
        } else {
            Some(get(vb, cfg.d_model, "bias")?)
        };
        Ok(Self {
            weight,
            bias,
            eps: cfg.norm_eps as f32,
        })
    }
}

impl Norm {
    #[cfg(feature = "cuda")]
    fn as_ref(&self) -> cuda::NormRef<'_> {
        cuda::NormRef {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            eps: self.eps,
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.weight.dtype())?.contiguous()?;
        match &self.bias {
            None => candle_nn::ops::rms_norm(&x, &self.weight, self.eps),
            Some(b) => candle_nn::ops::layer_norm(&x, &self.weight, b, self.eps),
        }
    }
}

/// Recurrent state of one layer between calls, kept where the model runs: host vectors
/// the CPU kernels update in place, or f32 tensors that stay on the GPU.
///
/// `conv` holds the `d_conv − 1` most recent mixer inputs (pre-conv x),
/// `[batch, d_conv−1, d_inner]`; `ssm` the SSM state h, `[batch, d_inner, d_state]`.
#[derive(Debug)]
pub enum LayerState {
    Host { conv: Vec<f32>, ssm: Vec<f32> },
    Device { conv: Tensor, ssm: Tensor },
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
            Self::Device { conv, ssm } => {
                let copy = |t: &Tensor| {
                    t.copy()
                        .expect("cannot copy the recurrent state on the device")
                };
                Self::Device {
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
    /// Tokens consumed so far (before any decimation).
    pub seen_tokens: usize,
}

/// How one layer changed the sequence length in a forward pass.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerTrace {
    pub layer: usize,
    pub len_in: usize,
    pub len_out: usize,
    /// Indices into this layer's input that were kept, when the layer decimated and the
    /// caller asked for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<Vec<usize>>,
}

/// What a forward pass returns besides logits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecimationTrace {
    /// One entry per layer, in order.
    pub layers: Vec<LayerTrace>,
}

impl DecimationTrace {
    /// Adds the trace of the next chunk of a chunked (undecimated) pass: lengths add up.
    fn merge_chunk(&mut self, next: DecimationTrace) {
        if self.layers.is_empty() {
            *self = next;
            return;
        }
        for (acc, l) in self.layers.iter_mut().zip(next.layers) {
            acc.len_in += l.len_in;
            acc.len_out += l.len_out;
        }
    }

    /// Sequence length leaving each layer listed in `cfg.decimating_layers`.
    pub fn kept_per_decimating_layer(&self, cfg: &DecimationConfig) -> Vec<usize> {
        cfg.decimating_layers
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
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions<'a> {
    pub decimation: Option<&'a DecimationConfig>,
    /// R: the last R tokens are never decimated (1 for generation, pred_len + 1 for PPL).
    pub protected_tail: usize,
    pub logits: LogitsSpan,
    /// Record kept indices per decimating layer in the trace.
    pub record_indices: bool,
}

impl Default for ForwardOptions<'_> {
    fn default() -> Self {
        Self {
            decimation: None,
            protected_tail: 1,
            logits: LogitsSpan::All,
            record_indices: false,
        }
    }
}

/// The S6 mixer of one layer (Gu & Dao 2023, Alg. 2), with parameters the CPU kernels
/// read directly kept as f32 vectors.
#[derive(Debug, Clone)]
struct Mixer {
    in_proj: Projection,
    x_proj: Projection,
    dt_proj_weight: Tensor,
    out_proj: Projection,
    /// Conv taps transposed to `[d_conv, d_inner]`.
    conv_weight_t: Vec<f32>,
    conv_bias: Vec<f32>,
    dt_bias: Vec<f32>,
    /// A = −exp(A_log), `[d_inner, d_state]`.
    a: Vec<f32>,
    d_skip: Vec<f32>,
    d_inner: usize,
    d_state: usize,
    d_conv: usize,
    dt_rank: usize,
    /// The same constants as f32 tensors on the GPU, for the CUDA kernels.
    #[cfg(feature = "cuda")]
    gpu: Option<cuda::MixerParams>,
}

fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Rows `idx` of a `[rows, width]` matrix.
fn gather_rows(src: &[f32], width: usize, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * width);
    for &i in idx {
        out.extend_from_slice(&src[i * width..(i + 1) * width]);
    }
    out
}

/// The mixer's activations before the scan, token-major f32: in_proj output `xz`
/// (`[rows, 2·d_inner]`), conv + SiLU output, Δ (`[rows, d_inner]`) and x_proj output.
struct PreScan {
    xz: Vec<f32>,
    x_conv: Vec<f32>,
    delta: Vec<f32>,
    dbc: Vec<f32>,
}

/// Decimation work for one mixer call.
struct DecimationStep<'a> {
    cfg: &'a DecimationConfig,
    /// s: position of this layer in `decimating_layers`.
    rank: usize,
    protected_tail: usize,
    /// On the CPU, long inputs are scored chunk by chunk (see `forward_host_decimating`).
    chunk: Option<usize>,
    /// Whether the caller wants the kept indices on the host (GPU: they stay on the device
    /// otherwise).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    record: bool,
}

/// The tokens a decimating layer kept, on the GPU: the index tensor the gathers used, and
/// the same indices on the host when the caller asked for them.
#[cfg(feature = "cuda")]
struct DeviceKept {
    indices: Tensor,
    host: Option<Vec<usize>>,
}

/// A u32 index tensor as host indices.
#[cfg(feature = "cuda")]
fn host_indices(t: &Tensor) -> Result<Vec<usize>> {
    Ok(t.to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

impl Mixer {
    fn load(vb: &VarBuilder, cfg: &MambaConfig) -> Result<Self> {
        let (d, di, n, r, k) = (
            cfg.d_model,
            cfg.d_inner,
            cfg.d_state,
            cfg.dt_rank,
            cfg.d_conv,
        );
        let f32_vb = vb.to_dtype(DType::F32);
        let conv_w = get(&f32_vb.pp("conv1d"), (di, 1, k), "weight")?;
        let conv_w = to_vec_f32(&conv_w)?;
        let mut conv_weight_t = vec![0f32; k * di];
        for c in 0..di {
            for j in 0..k {
                conv_weight_t[j * di + c] = conv_w[c * k + j];
            }
        }
        let conv_bias = if cfg.conv_bias {
            to_vec_f32(&get(&f32_vb.pp("conv1d"), di, "bias")?)?
        } else {
            vec![0f32; di]
        };
        let a_log = to_vec_f32(&get(&f32_vb, (di, n), "A_log")?)?;
        let a: Vec<f32> = a_log.iter().map(|v| -v.exp()).collect();
        let dt_bias = to_vec_f32(&get(&f32_vb.pp("dt_proj"), di, "bias")?)?;
        let d_skip = to_vec_f32(&get(&f32_vb, di, "D")?)?;
        #[cfg(feature = "cuda")]
        let gpu = match vb.device() {
            dev @ Device::Cuda(_) => {
                if k < 2 {
                    bail!("the CUDA kernels need d_conv ≥ 2 (got {k})");
                }
                Some(cuda::MixerParams {
                    conv_weight_t: Tensor::from_slice(&conv_weight_t, (k, di), dev)?,
                    conv_bias: Tensor::from_slice(&conv_bias, di, dev)?,
                    dt_bias: Tensor::from_slice(&dt_bias, di, dev)?,
                    a: Tensor::from_slice(&a, (di, n), dev)?,
                    d_skip: Tensor::from_slice(&d_skip, di, dev)?,
                    d_state: n,
                    dtype: vb.dtype(),
                })
            }
            _ => None,
        };
        Ok(Self {
            in_proj: Projection::load(&vb.pp("in_proj"), 2 * di, d, cfg.bias)?,
            x_proj: Projection::load(&vb.pp("x_proj"), r + 2 * n, di, false)?,
            dt_proj_weight: get(&vb.pp("dt_proj"), (di, r), "weight")?,
            out_proj: Projection::load(&vb.pp("out_proj"), d, di, cfg.bias)?,
            conv_weight_t,
            conv_bias,
            dt_bias,
            a,
            d_skip,
            d_inner: di,
            d_state: n,
            d_conv: k,
            dt_rank: r,
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    /// `h`: normalised input `[batch, len, d_model]`. Returns the mixer output
    /// `[batch, len', d_model]` and, when the layer decimated, the kept indices.
    fn forward(
        &self,
        h: &Tensor,
        state: &mut LayerState,
        decimation: Option<DecimationStep>,
    ) -> Result<(Tensor, Option<Vec<usize>>)> {
        match state {
            LayerState::Host { conv, ssm } => self.forward_host(h, conv, ssm, decimation),
            LayerState::Device { .. } => self.forward_device_state(h),
        }
    }

    /// A device state reaching the host loop: a model on a device this build has no
    /// kernels for (CUDA models run their blocks in `run_blocks_device`).
    fn forward_device_state(&self, h: &Tensor) -> Result<(Tensor, Option<Vec<usize>>)> {
        bail!(
            "no Mamba kernels for {:?} in this build (CPU, or CUDA with the `cuda` feature)",
            h.device()
        )
    }

    /// The mixer on the GPU: candle matmuls (cuBLAS) around the CUDA kernels of
    /// `cuda.rs`, activations in the model dtype, every tensor on the device. Decimation
    /// scores (‖Δ_t‖₂), chooses (top-K) and gathers on the GPU; the kept indices come to
    /// the host only when the step asks to record them.
    #[cfg(feature = "cuda")]
    fn forward_device(
        &self,
        h: &Tensor,
        conv: &mut Tensor,
        ssm: &mut Tensor,
        decimation: Option<DecimationStep>,
    ) -> Result<(Tensor, Option<DeviceKept>)> {
        let Some(p) = &self.gpu else {
            bail!("no Mamba kernels for {:?} (CPU and CUDA only)", h.device());
        };
        let (batch, len, d_model) = h.dims3()?;
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let mut prof = cuda::profile::start(h.device());
        let lap = cuda::profile::lap;
        let xz = self
            .in_proj
            .forward(&h.reshape((batch * len, d_model))?)?
            .contiguous()?;
        lap(&mut prof, "in_proj");
        let (x_conv, window) = cuda::conv_silu(&xz, conv, p, batch, len)?;
        *conv = window;
        lap(&mut prof, "conv");
        let dbc = self.x_proj.forward(&x_conv)?.contiguous()?;
        lap(&mut prof, "x_proj");
        // dt before bias and softplus: the scan adds both as it reads it.
        let dt = dbc
            .narrow(1, 0, r)?
            .contiguous()?
            .matmul(&self.dt_proj_weight.t()?)?
            .contiguous()?;
        lap(&mut prof, "dt_proj");

        let mut kept = None;
        let (mut x_conv, mut dt, mut dbc, mut xz, mut scan_len) = (x_conv, dt, dbc, xz, len);
        if let Some(step) = decimation {
            if batch != 1 {
                bail!("decimation needs batch size 1 (got {batch}), as in the reference implementation");
            }
            let budget = step.cfg.budget(step.rank, len, step.protected_tail);
            // As select_by_scores: nothing to choose unless more candidates than budget.
            let candidates = len.saturating_sub(step.protected_tail);
            if candidates > budget {
                let scores = cuda::delta_norms(&dt, p)?;
                let idx_t = cuda::select_top_k(&scores, candidates, budget, p.variant())?;
                x_conv = x_conv.index_select(&idx_t, 0)?;
                dt = dt.index_select(&idx_t, 0)?;
                dbc = dbc.index_select(&idx_t, 0)?;
                xz = xz.index_select(&idx_t, 0)?;
                scan_len = idx_t.dim(0)?;
                let host = match step.record {
                    true => Some(host_indices(&idx_t)?),
                    false => None,
                };
                kept = Some(DeviceKept {
                    indices: idx_t,
                    host,
                });
            }
            lap(&mut prof, "decimation");
        }
        let args = cuda::ScanArgs {
            batch,
            len: scan_len,
            x: &x_conv,
            dt: &dt,
            bc: &dbc,
            b_offset: r,
            c_offset: r + n,
            z: &xz,
            z_offset: di,
            h0: ssm,
        };
        let (y, h1) = cuda::selective_scan(&args, p)?;
        *ssm = h1;
        lap(&mut prof, "scan");
        let out = self
            .out_proj
            .forward(&y)?
            .reshape((batch, scan_len, d_model))?;
        lap(&mut prof, "out_proj");
        Ok((out, kept))
    }

    /// The mixer on the CPU kernels of `kernels.rs`, state updated in place.
    fn forward_host(
        &self,
        h: &Tensor,
        conv_state: &mut [f32],
        ssm_state: &mut [f32],
        decimation: Option<DecimationStep>,
    ) -> Result<(Tensor, Option<Vec<usize>>)> {
        let (batch, len, _) = h.dims3()?;
        if let Some(chunk) = decimation.as_ref().and_then(|s| s.chunk) {
            if batch == 1 && len > 2 * chunk {
                return self.forward_host_decimating(
                    h,
                    conv_state,
                    ssm_state,
                    decimation.unwrap(),
                    chunk,
                );
            }
        }
        let (di, bc_width) = (self.d_inner, self.dt_rank + 2 * self.d_state);
        let PreScan {
            xz: xz_vec,
            x_conv,
            mut delta,
            dbc: mut dbc_vec,
        } = self.pre_scan(h, conv_state)?;

        let mut kept = None;
        let (mut x_conv, mut xz_vec, mut scan_len) = (x_conv, xz_vec, len);
        if let Some(step) = decimation {
            if batch != 1 {
                bail!("decimation needs batch size 1 (got {batch}), as in the reference implementation");
            }
            let budget = step.cfg.budget(step.rank, len, step.protected_tail);
            if let Some(idx) = select_tokens(&delta, di, budget, step.protected_tail) {
                x_conv = gather_rows(&x_conv, di, &idx);
                delta = gather_rows(&delta, di, &idx);
                dbc_vec = gather_rows(&dbc_vec, bc_width, &idx);
                xz_vec = gather_rows(&xz_vec, 2 * di, &idx);
                scan_len = idx.len();
                kept = Some(idx);
            }
        }

        let pre = PreScan {
            xz: xz_vec,
            x_conv,
            delta,
            dbc: dbc_vec,
        };
        let out = self.scan_and_project(&pre, batch, scan_len, ssm_state, h)?;
        Ok((out, kept))
    }

    /// The selective scan over `pre` (rows `[batch, scan_len]`, from `pre_scan` and
    /// possibly gathered), gated, then out_proj: the mixer output `[batch, scan_len, d_model]`
    /// in the dtype of `h`.
    fn scan_and_project(
        &self,
        pre: &PreScan,
        batch: usize,
        scan_len: usize,
        ssm_state: &mut [f32],
        h: &Tensor,
    ) -> Result<Tensor> {
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let bc_width = r + 2 * n;
        let inputs = ScanInputs {
            batch,
            len: scan_len,
            d_inner: di,
            d_state: n,
            x: &pre.x_conv,
            delta: &pre.delta,
            bc: &pre.dbc,
            bc_batch_stride: scan_len * bc_width,
            bc_row_stride: bc_width,
            b_offset: r,
            c_offset: r + n,
            z: &pre.xz[di..],
            z_batch_stride: scan_len * 2 * di,
            z_row_stride: 2 * di,
            a: &self.a,
            d_skip: &self.d_skip,
        };
        let y = kernels::selective_scan(&inputs, ssm_state);
        let y = Tensor::from_vec(y, (batch * scan_len, di), h.device())?.to_dtype(h.dtype())?;
        let d_model = h.dim(2)?;
        Ok(self
            .out_proj
            .forward(&y)?
            .reshape((batch, scan_len, d_model))?)
    }

    /// Everything before the scan for `h` (`[batch, len, d_model]`): in_proj, the causal
    /// conv + SiLU continuing from `conv_state` (updated), x_proj and Δ.
    fn pre_scan(&self, h: &Tensor, conv_state: &mut [f32]) -> Result<PreScan> {
        let (batch, len, d_model) = h.dims3()?;
        let (di, r) = (self.d_inner, self.dt_rank);
        let xz = self.in_proj.forward(&h.reshape((batch * len, d_model))?)?;
        let xz = to_vec_f32(&xz)?;
        // Causal conv + SiLU over the full sequence (the decimation cut comes after it).
        let x_conv = kernels::causal_conv_silu(
            ConvInput {
                data: &xz,
                batch_stride: len * 2 * di,
                row_stride: 2 * di,
            },
            conv_state,
            &self.conv_weight_t,
            &self.conv_bias,
            batch,
            len,
        );
        self.update_conv_window(&xz, batch, len, conv_state);
        // x_proj → (dt, B, C); Δ = softplus(dt_proj(dt) + bias).
        let x_conv_t =
            Tensor::from_slice(&x_conv, (batch * len, di), h.device())?.to_dtype(h.dtype())?;
        let dbc = self.x_proj.forward(&x_conv_t)?;
        let dt = linear(&dbc.narrow(1, 0, r)?.contiguous()?, &self.dt_proj_weight)?;
        let mut delta = to_vec_f32(&dt)?;
        kernels::softplus_bias_inplace(&mut delta, &self.dt_bias);
        Ok(PreScan {
            xz,
            x_conv,
            delta,
            dbc: to_vec_f32(&dbc)?,
        })
    }

    /// A decimating layer on a long CPU input (batch 1) without its full-length activations:
    /// pass 1 runs in_proj → conv → Δ chunk by chunk and keeps only the ‖Δ_t‖₂ scores;
    /// pass 2 recomputes the chunks and keeps the rows of the selected tokens. The result
    /// equals the one-pass layer; memory is O(chunk + kept) · d_inner instead of O(L · d_inner),
    /// for one extra in_proj of the sequence.
    fn forward_host_decimating(
        &self,
        h: &Tensor,
        conv_state: &mut [f32],
        ssm_state: &mut [f32],
        step: DecimationStep,
        chunk: usize,
    ) -> Result<(Tensor, Option<Vec<usize>>)> {
        let len = h.dim(1)?;
        let (di, bc_width) = (self.d_inner, self.dt_rank + 2 * self.d_state);
        let history = conv_state.to_vec();
        let mut scores = Vec::with_capacity(len);
        for start in (0..len).step_by(chunk) {
            let rows = chunk.min(len - start);
            let pre = self.pre_scan(&h.narrow(1, start, rows)?, conv_state)?;
            scores.extend(token_scores(&pre.delta, di));
        }
        let budget = step.cfg.budget(step.rank, len, step.protected_tail);
        let selected = select_by_scores(&scores, budget, step.protected_tail);
        let kept: Vec<usize> = selected.clone().unwrap_or_else(|| (0..len).collect());
        conv_state.copy_from_slice(&history);
        let (mut x_conv, mut delta, mut dbc, mut xz) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut next = 0;
        for start in (0..len).step_by(chunk) {
            let rows = chunk.min(len - start);
            let pre = self.pre_scan(&h.narrow(1, start, rows)?, conv_state)?;
            while next < kept.len() && kept[next] < start + rows {
                let i = kept[next] - start;
                x_conv.extend_from_slice(&pre.x_conv[i * di..(i + 1) * di]);
                delta.extend_from_slice(&pre.delta[i * di..(i + 1) * di]);
                dbc.extend_from_slice(&pre.dbc[i * bc_width..(i + 1) * bc_width]);
                xz.extend_from_slice(&pre.xz[i * 2 * di..(i + 1) * 2 * di]);
                next += 1;
            }
        }
        let pre = PreScan {
            xz,
            x_conv,
            delta,
            dbc,
        };
        let out = self.scan_and_project(&pre, 1, kept.len(), ssm_state, h)?;
        Ok((out, selected))
    }

    /// Keeps the last `d_conv − 1` pre-conv inputs of this layer's full input for the next
    /// call (the reference takes decode's conv state from the undecimated sequence too).
    fn update_conv_window(&self, xz: &[f32], batch: usize, len: usize, conv: &mut [f32]) {
        let (di, w) = (self.d_inner, self.d_conv - 1);
        if w == 0 {
            return;
        }
        for b in 0..batch {
            let hist = &mut conv[b * w * di..(b + 1) * w * di];
            let mut window: Vec<f32> = hist.to_vec();
            for t in len.saturating_sub(w)..len {
                let row = (b * len + t) * 2 * di;
                window.extend_from_slice(&xz[row..row + di]);
            }
            let start = window.len() - w * di;
            hist.copy_from_slice(&window[start..]);
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm: Norm,
    mixer: Mixer,
}

/// Chunk length of a long vanilla prefill on the CPU: keeps the per-layer activations
/// (a few × L × d_inner floats) around cache size instead of growing with the prompt.
const CPU_PREFILL_CHUNK: usize = 2048;

/// DeciMamba's top-K choice made by the CUDA kernel the GPU prefill uses, for tests that
/// hold it to [`select_by_scores`]: the `keep` highest of `scores[..candidates]`
/// (ties to the earlier position), ascending, then `candidates..len`.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn select_top_k_on_device(
    scores: &[f32],
    candidates: usize,
    keep: usize,
    device: &Device,
) -> Result<Vec<usize>> {
    let t = Tensor::from_slice(scores, scores.len(), device)?;
    let variant = cuda::Variant {
        d_state: 16,
        d_conv: 4,
        dtype: DType::F32,
    };
    host_indices(&cuda::select_top_k(&t, candidates, keep, variant)?)
}

/// Per-stage GPU prefill times gathered under `DECIMAMBA_CUDA_PROFILE=1` (stage, total
/// seconds, calls), cleared by the call. Empty without the `cuda` feature or profiling.
pub fn take_gpu_profile() -> Vec<(&'static str, f64, u64)> {
    #[cfg(feature = "cuda")]
    return cuda::profile::take();
    #[cfg(not(feature = "cuda"))]
    Vec::new()
}

/// A Mamba-1 language model.
#[derive(Debug, Clone)]
pub struct MambaModel {
    config: MambaConfig,
    embedding: Tensor,
    layers: Vec<Block>,
    norm_f: Norm,
    lm_head: Tensor,
    dtype: DType,
    device: Device,
    /// CPU prefills longer than twice this run their vanilla layers in chunks of it.
    prefill_chunk: Option<usize>,
    /// When set (by Ctrl-C), a forward pass stops between layers and chunks with
    /// [`Interrupted`].
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The captured CUDA decode step (shared by clones, which share the weights).
    #[cfg(feature = "cuda")]
    decode_graph: std::sync::Arc<cuda::DecodeCache>,
}

impl MambaModel {
    /// Builds the model from a `VarBuilder` over the checkpoint's tensors, whose names
    /// follow `config.format`.
    pub fn new(config: &MambaConfig, vb: VarBuilder) -> Result<Self> {
        let backbone = vb.pp("backbone");
        let emb_name = match config.format {
            super::config::CheckpointFormat::Original => "embedding",
            super::config::CheckpointFormat::Transformers => "embeddings",
        };
        let embedding = get(
            &backbone.pp(emb_name),
            (config.vocab_size, config.d_model),
            "weight",
        )?;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let lvb = backbone.pp("layers").pp(i);
            layers.push(Block {
                norm: Norm::load(&lvb.pp("norm"), config)?,
                mixer: Mixer::load(&lvb.pp("mixer"), config)?,
            });
        }
        let extra = format!("backbone.layers.{}.norm.weight", config.n_layer);
        if vb.contains_tensor(&extra) {
            bail!(
                "checkpoint has more layers than the config's {} ({extra} exists)",
                config.n_layer
            );
        }
        let norm_f = Norm::load(&backbone.pp("norm_f"), config)?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = vb.device() {
            cuda::keep_freed_memory(dev)?;
        }
        // Tied checkpoints may still store a copy as lm_head.weight; the embedding is the truth.
        let lm_head = if !config.tie_embeddings {
            get(
                &vb.pp("lm_head"),
                (config.vocab_size, config.d_model),
                "weight",
            )?
        } else {
            embedding.clone()
        };
        Ok(Self {
            config: config.clone(),
            embedding,
            layers,
            norm_f,
            lm_head,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            prefill_chunk: Some(CPU_PREFILL_CHUNK),
            cancel: None,
            #[cfg(feature = "cuda")]
            decode_graph: Default::default(),
        })
    }

    /// A flag that, once set, makes every forward pass stop between layers and chunks
    /// with [`Interrupted`] (a long prefill need not run to its end after Ctrl-C).
    pub fn set_cancel_flag(&mut self, flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        self.cancel = flag;
    }

    /// Errs with [`Interrupted`] once the cancel flag is set.
    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(f) if f.load(std::sync::atomic::Ordering::Relaxed) => Err(Interrupted.into()),
            _ => Ok(()),
        }
    }

    /// Sets the chunk length of long CPU prefills (`None`: always one pass). Results do not
    /// depend on it; memory and speed do.
    pub fn with_prefill_chunk(mut self, chunk: Option<usize>) -> Self {
        self.prefill_chunk = chunk.filter(|&c| c > 0);
        self
    }

    pub fn config(&self) -> &MambaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Which kernels run the mixer (`cpu-simd` or `cuda-nvrtc`): recorded with results,
    /// since each sums in its own order.
    pub fn backend_name(&self) -> &'static str {
        if self.device.is_cuda() {
            "cuda-nvrtc"
        } else {
            "cpu-simd"
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh (all-zero) recurrent state for `batch` sequences, on the model's device.
    ///
    /// # Panics
    /// If the device cannot allocate the (small) state tensors.
    pub fn new_state(&self, batch: usize) -> InferenceState {
        let c = &self.config;
        let (w, di, n) = (c.d_conv - 1, c.d_inner, c.d_state);
        let layer = || {
            if self.device.is_cpu() {
                LayerState::Host {
                    conv: vec![0f32; batch * w * di],
                    ssm: vec![0f32; batch * di * n],
                }
            } else {
                let zeros = |shape: (usize, usize, usize)| {
                    Tensor::zeros(shape, DType::F32, &self.device)
                        .expect("cannot allocate the recurrent state on the device")
                };
                LayerState::Device {
                    conv: zeros((batch, w, di)),
                    ssm: zeros((batch, di, n)),
                }
            }
        };
        InferenceState {
            batch,
            layers: (0..c.n_layer).map(|_| layer()).collect(),
            seen_tokens: 0,
        }
    }

    /// Runs `ids` (`[batch, len]`, u32) through the model, continuing from `state` and
    /// leaving the final recurrent state in it. With decimation, layers listed in the
    /// config shrink the sequence (DeciMamba, Ben-Kish et al. 2025, §4); the logits then
    /// belong to the kept positions, whose last `protected_tail` are the input's last.
    pub fn forward_with_state(
        &self,
        ids: &Tensor,
        state: &mut InferenceState,
        opts: &ForwardOptions,
    ) -> Result<(Option<Tensor>, DecimationTrace)> {
        let (batch, len) = ids.dims2().context("token ids must be [batch, len]")?;
        if batch != state.batch {
            bail!(
                "state was made for batch {} but the input has batch {batch}",
                state.batch
            );
        }
        if len == 0 {
            bail!("cannot run the model on an empty sequence");
        }
        if let Some(cfg) = opts.decimation {
            cfg.validate(self.config.n_layer)?;
        }
        let chunk = self.prefill_chunk.filter(|_| self.device.is_cpu());
        if let Some(chunk) = chunk.filter(|&c| opts.decimation.is_none() && len > 2 * c) {
            return self.forward_in_chunks(ids, state, opts, chunk);
        }
        let max_id = ids
            .max_keepdim(1)?
            .max_keepdim(0)?
            .flatten_all()?
            .to_vec1::<u32>()?[0];
        if max_id as usize >= self.config.vocab_size {
            bail!(
                "token id {max_id} is outside the model's vocabulary of {}",
                self.config.vocab_size
            );
        }
        let residual_dtype = if self.config.residual_in_fp32 {
            DType::F32
        } else {
            self.dtype
        };
        let first_decimating = opts
            .decimation
            .and_then(|c| c.decimating_layers.iter().min().copied());
        let (residual, mut trace, start_layer) = match first_decimating {
            // The layers before the first decimating one are vanilla: on the CPU they run in
            // chunks with the state carried, and only their output (the residual stream)
            // is kept whole for the decimating layer, which must score every token.
            Some(first) if first > 0 && chunk.is_some_and(|c| len > 2 * c) => {
                let chunk = chunk.unwrap_or(len);
                let mut pieces = Vec::new();
                let mut trace = DecimationTrace::default();
                let mut start = 0;
                while start < len {
                    let end = (start + chunk).min(len);
                    let piece = self.embed(&ids.narrow(1, start, end - start)?, residual_dtype)?;
                    let mut t = DecimationTrace::default();
                    pieces.push(self.run_blocks(piece, 0..first, state, opts, &mut t)?);
                    trace.merge_chunk(t);
                    start = end;
                }
                (Tensor::cat(&pieces, 1)?, trace, first)
            }
            _ => (
                self.embed(ids, residual_dtype)?,
                DecimationTrace::default(),
                0,
            ),
        };
        let residual = self.run_blocks(
            residual,
            start_layer..self.layers.len(),
            state,
            opts,
            &mut trace,
        )?;
        state.seen_tokens += len;
        let out_len = residual.dim(1)?;
        let take = match opts.logits {
            LogitsSpan::None => {
                // GPU work is queued asynchronously: return when it is done, so that
                // callers' timings and chunked prefills see finished work.
                self.device.synchronize()?;
                return Ok((None, trace));
            }
            LogitsSpan::All => out_len,
            LogitsSpan::Last(n) => n.min(out_len),
        };
        let hidden = residual.narrow(1, out_len - take, take)?;
        let hidden = self.norm_f.forward(&hidden)?.to_dtype(self.dtype)?;
        let logits = hidden
            .reshape((batch * take, self.config.d_model))?
            .apply(&|x: &Tensor| linear(x, &self.lm_head))?
            .reshape((batch, take, self.config.vocab_size))?
            .to_dtype(DType::F32)?;
        self.device.synchronize()?;
        Ok((Some(logits), trace))
    }

    /// Embedding lookup: `ids` `[batch, len]` → residual stream `[batch, len, d_model]`.
    fn embed(&self, ids: &Tensor, residual_dtype: DType) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let residual = self.embedding.index_select(&ids.flatten_all()?, 0)?;
        Ok(residual
            .reshape((batch, len, self.config.d_model))?
            .to_dtype(residual_dtype)?)
    }

    /// What layer `i` does about decimation under `opts`: `None` when it does not decimate.
    fn decimation_step<'a>(
        &self,
        opts: &ForwardOptions<'a>,
        i: usize,
    ) -> Option<DecimationStep<'a>> {
        opts.decimation.and_then(|cfg| {
            cfg.rank_of(i).map(|rank| DecimationStep {
                cfg,
                rank,
                protected_tail: opts.protected_tail,
                chunk: self.prefill_chunk.filter(|_| self.device.is_cpu()),
                record: opts.record_indices,
            })
        })
    }

    /// Runs the blocks in `layers` (Add → Norm → Mixer, decimating where the options say)
    /// on the residual stream, appending one trace entry per layer.
    fn run_blocks(
        &self,
        mut residual: Tensor,
        layers: std::ops::Range<usize>,
        state: &mut InferenceState,
        opts: &ForwardOptions,
        trace: &mut DecimationTrace,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            return self.run_blocks_device(residual, layers, state, opts, trace);
        }
        let residual_dtype = residual.dtype();
        for i in layers {
            self.check_cancel()?;
            let (block, layer_state) = (&self.layers[i], &mut state.layers[i]);
            let len_in = residual.dim(1)?;
            let step = self.decimation_step(opts, i);
            let normed = block.norm.forward(&residual)?.to_dtype(self.dtype)?;
            let (out, kept) = block.mixer.forward(&normed, layer_state, step)?;
            if let Some(idx) = &kept {
                let idx_t = Tensor::from_iter(idx.iter().map(|&i| i as u32), &self.device)?;
                residual = residual.index_select(&idx_t, 1)?;
            }
            residual = (residual + out.to_dtype(residual_dtype)?)?;
            trace.layers.push(LayerTrace {
                layer: i,
                len_in,
                len_out: residual.dim(1)?,
                kept: if opts.record_indices { kept } else { None },
            });
        }
        Ok(residual)
    }

    /// [`Self::run_blocks`] on the GPU: the residual stream stays f32 (rounded to the
    /// model dtype after each add when the checkpoint does not keep it in f32), and each
    /// block's Add → Norm is one kernel that also adds the previous mixer's output.
    #[cfg(feature = "cuda")]
    fn run_blocks_device(
        &self,
        residual: Tensor,
        layers: std::ops::Range<usize>,
        state: &mut InferenceState,
        opts: &ForwardOptions,
        trace: &mut DecimationTrace,
    ) -> Result<Tensor> {
        let round_res = self.rounds_residual();
        let d_model = self.config.d_model;
        let mut residual = residual.to_dtype(DType::F32)?;
        // The last mixer's output, added at the next block's norm (or at the end).
        let mut pending: Option<(Tensor, usize)> = None;
        for i in layers {
            self.check_cancel()?;
            let (block, layer_state) = (&self.layers[i], &mut state.layers[i]);
            let params = block
                .mixer
                .gpu
                .as_ref()
                .context("layer has no CUDA parameters")?;
            let (batch, len_in, _) = residual.dims3()?;
            let step = self.decimation_step(opts, i);
            let rows = residual.reshape((batch * len_in, d_model))?;
            let delta = match &pending {
                Some((out, _)) => Some(out.reshape((batch * len_in, d_model))?),
                None => None,
            };
            let mut prof = cuda::profile::start(&self.device);
            let (new_res, normed) = cuda::add_norm(
                &rows,
                delta.as_ref(),
                block.norm.as_ref(),
                params,
                round_res,
                true,
            )?;
            residual = new_res.reshape((batch, len_in, d_model))?;
            cuda::profile::lap(&mut prof, "add_norm");
            let normed = normed
                .context("add_norm returned no norm")?
                .reshape((batch, len_in, d_model))?;
            let LayerState::Device { conv, ssm } = layer_state else {
                bail!("a CUDA model needs a state made by its own new_state");
            };
            let (out, kept) = block.mixer.forward_device(&normed, conv, ssm, step)?;
            let mut recorded = None;
            if let Some(k) = kept {
                let mut prof = cuda::profile::start(&self.device);
                residual = residual.index_select(&k.indices, 1)?;
                cuda::profile::lap(&mut prof, "residual gather");
                recorded = k.host;
            }
            let len_out = out.dim(1)?;
            pending = Some((out, i));
            trace.layers.push(LayerTrace {
                layer: i,
                len_in,
                len_out,
                kept: recorded,
            });
        }
        if let Some((out, i)) = pending {
            let (batch, len, _) = residual.dims3()?;
            let params = self.layers[i]
                .mixer
                .gpu
                .as_ref()
                .context("no CUDA parameters")?;
            let (new_res, _) = cuda::add_norm(
                &residual.reshape((batch * len, d_model))?,
                Some(&out.reshape((batch * len, d_model))?),
                self.norm_f.as_ref(),
                params,
                round_res,
                false,
            )?;
            residual = new_res.reshape((batch, len, d_model))?;
        }
        Ok(residual)
    }

    /// Whether the residual stream is rounded to the model dtype after each add (the
    /// checkpoint does not keep it in f32).
    #[cfg(feature = "cuda")]
    fn rounds_residual(&self) -> bool {
        !self.config.residual_in_fp32 && self.dtype != DType::F32
    }

    /// Vanilla forward of a long sequence as consecutive chunks with the state carried: the
    /// same result as one pass (the recurrence is exact across chunk boundaries), with
    /// activations bounded by the chunk and kept cache-sized.
    fn forward_in_chunks(
        &self,
        ids: &Tensor,
        state: &mut InferenceState,
        opts: &ForwardOptions,
        chunk: usize,
    ) -> Result<(Option<Tensor>, DecimationTrace)> {
        let len = ids.dim(1)?;
        // Output positions wanted, as a range of the input (no decimation: they coincide).
        let wanted = match opts.logits {
            LogitsSpan::All => 0..len,
            LogitsSpan::Last(n) => len - n.min(len)..len,
            LogitsSpan::None => len..len,
        };
        let mut pieces = Vec::new();
        let mut trace = DecimationTrace::default();
        let mut start = 0;
        while start < len {
            let end = (start + chunk).min(len);
            let k = end.saturating_sub(wanted.start.max(start));
            let span = if k == 0 {
                LogitsSpan::None
            } else {
                LogitsSpan::Last(k)
            };
            let sub = ForwardOptions {
                logits: span,
                ..*opts
            };
            let (logits, t) =
                self.forward_with_state(&ids.narrow(1, start, end - start)?, state, &sub)?;
            pieces.extend(logits);
            trace.merge_chunk(t);
            start = end;
        }
        let logits = if pieces.is_empty() {
            None
        } else {
            Some(Tensor::cat(&pieces, 1)?)
        };
        Ok((logits, trace))
    }

    /// Logits for every position of `ids` (`[batch, len]`) from a fresh state, no decimation.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut state = self.new_state(ids.dim(0)?);
        let (logits, _) = self.forward_with_state(ids, &mut state, &ForwardOptions::default())?;
        logits.context("no logits")
    }

    /// Prefill in chunks of `chunk` tokens with the state carried between them: memory is
    /// bounded by the chunk, not the prompt. Returns the last position's logits `[batch, vocab]`.
    pub fn prefill_chunked(
        &self,
        ids: &Tensor,
        chunk: usize,
        state: &mut InferenceState,
    ) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        if chunk == 0 {
            bail!("chunk size must be positive");
        }
        let mut start = 0;
        let mut last = None;
        while start < len {
            let n = chunk.min(len - start);
            let is_last = start + n == len;
            let opts = ForwardOptions {
                logits: if is_last {
                    LogitsSpan::Last(1)
                } else {
                    LogitsSpan::None
                },
                ..Default::default()
            };
            let (logits, _) = self.forward_with_state(&ids.narrow(1, start, n)?, state, &opts)?;
            last = logits;
            start += n;
        }
        Ok(last.context("no logits")?.squeeze(1)?)
    }

    /// One decode step: `ids` holds one token per sequence. Never decimates.
    pub fn step(&self, ids: &[u32], state: &mut InferenceState) -> Result<Tensor> {
        if ids.len() != state.batch {
            bail!(
                "state was made for batch {} but the step has {} tokens",
                state.batch,
                ids.len()
            );
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.config.vocab_size
            );
        }
        #[cfg(feature = "cuda")]
        if self.device.is_cuda()
            && super::gpu_plan::decode_fits(ids.len(), self.config.d_model, self.config.d_inner)
        {
            let logits = self.step_device(ids, state)?;
            state.seen_tokens += 1;
            return Ok(logits);
        }
        let t = Tensor::from_slice(ids, (ids.len(), 1), &self.device)?;
        let opts = ForwardOptions {
            logits: LogitsSpan::Last(1),
            ..Default::default()
        };
        let (logits, _) = self.forward_with_state(&t, state, &opts)?;
        Ok(logits.context("no logits")?.squeeze(1)?)
    }

    /// A decode step through the fused CUDA kernels (four launches per layer, replayed as
    /// one CUDA graph), the states updated in place. Returns the logits `[batch, vocab]`.
    #[cfg(feature = "cuda")]
    fn step_device(&self, ids: &[u32], state: &mut InferenceState) -> Result<Tensor> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (block, layer_state) in self.layers.iter().zip(&state.layers) {
            let LayerState::Device { conv, ssm } = layer_state else {
                bail!("a CUDA model needs a state made by its own new_state");
            };
            let m = &block.mixer;
            layers.push(cuda::DecodeLayer {
                norm: block.norm.as_ref(),
                in_proj: (&m.in_proj.weight, m.in_proj.bias.as_ref()),
                x_proj: &m.x_proj.weight,
                dt_proj: &m.dt_proj_weight,
                out_proj: (&m.out_proj.weight, m.out_proj.bias.as_ref()),
                params: m.gpu.as_ref().context("layer has no CUDA parameters")?,
                conv,
                ssm,
            });
        }
        let model = cuda::DecodeModel {
            embedding: &self.embedding,
            layers,
            norm_f: self.norm_f.as_ref(),
            lm_head: &self.lm_head,
            dtype: self.dtype,
            round_res: self.rounds_residual(),
        };
        cuda::decode_step(&model, ids, Some(&self.decode_graph))
    }

    /// Index of the largest logit in the last dimension (greedy decoding).
    pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
        Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
    }
}
