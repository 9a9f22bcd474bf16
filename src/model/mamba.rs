//! The Mamba-1 language model (Gu & Dao 2023): embedding → N × (Add → Norm → Mixer) →
//! final norm → LM head. A context policy's [`LayerPlan`] is carried out inside each
//! mixer, between computing Δ, B, C and running the scan: Δ scaled and filtered, A
//! rescaled, tokens kept by ‖Δ_t‖₂.
//!
//! One forward path serves every use: a whole prompt, one chunk of a long prompt, or a
//! single decode step; the caller passes the [`InferenceState`] that carries each layer's
//! convolution window and SSM state from one call to the next.

use super::backend::{Backend, BackendChoice};
use super::config::MambaConfig;
#[cfg(feature = "cuda")]
use super::gpu_plan::Work;
use super::host_f32::{to_vec_f32, HostF32};
use super::kernels::{self, ConvInput, ScanInputs};
pub use super::state::{
    ForwardOptions, ForwardTrace, InferenceState, Interrupted, LayerState, LayerTrace, LogitsSpan,
};
#[path = "candle_ops.rs"]
mod candle_ops;
pub use candle_ops::ChunkScan;
#[cfg(feature = "cuda")]
#[path = "cuda.rs"]
mod cuda;
use crate::policy::observe::{ScanObserver, ScanView};
use crate::policy::select::{select_by_scores, token_scores};
use crate::policy::{ContextPolicy, KeepRule, LayerPlan};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

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

impl Projection {
    /// `y + b` when the projection has a bias.
    fn add_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for Projection {
    /// `x`: `[rows, in]` → `[rows, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.add_bias(linear(x, &self.weight)?)
    }
}

/// Rows up to which `x Wᵀ` goes through the streaming matvec kernel (decode steps).
const MATVEC_MAX_ROWS: usize = 4;

/// `x Wᵀ` for `x` `[rows, in]` and `w` `[out, in]`: a GEMM for prefill, a weight-streaming
/// matvec for the few rows of a decode step on the CPU in f32, bf16 or f16 (candle's
/// 16-bit GEMMs are several times slower there). A 16-bit product is rounded to its
/// dtype, as the GEMM's is.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let same = x.dtype() == w.dtype() && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if rows <= MATVEC_MAX_ROWS && x.device().is_cpu() && same && w.is_contiguous() {
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (storage, layout) = w.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let span = layout.start_offset()..layout.start_offset() + w.elem_count();
            let y = match w.dtype() {
                DType::BF16 => kernels::matvec(&xv, &cpu.as_slice::<half::bf16>()?[span], k),
                DType::F16 => kernels::matvec(&xv, &cpu.as_slice::<half::f16>()?[span], k),
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

/// The layer a mixer call runs as, and the observer of the pass.
#[derive(Clone, Copy)]
struct Watch<'a> {
    layer: usize,
    observer: Option<&'a dyn ScanObserver>,
}

impl<'a> Watch<'a> {
    /// The observer, when it observes this layer.
    fn observer(&self) -> Option<&'a dyn ScanObserver> {
        self.observer.filter(|o| o.observes(self.layer))
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
    /// A_log and A = −exp(A_log), `[d_inner, d_state]`.
    a_log: Vec<f32>,
    a: Vec<f32>,
    d_skip: Vec<f32>,
    d_inner: usize,
    d_state: usize,
    d_conv: usize,
    dt_rank: usize,
    /// The same constants as f32 tensors on the GPU, for the CUDA kernels.
    #[cfg(feature = "cuda")]
    gpu: Option<cuda::MixerParams>,
    /// The constants as tensors for the Candle-ops backend: present exactly when the
    /// model runs it.
    ops: Option<candle_ops::OpsParams>,
}

/// The mixer's activations before the scan, token-major f32: in_proj output `xz`
/// (`[rows, 2·d_inner]`), conv + SiLU output, Δ under the plan (`[rows, d_inner]`) and
/// x_proj output.
#[derive(Default)]
struct PreScan {
    xz: HostF32,
    x_conv: HostF32,
    delta: Vec<f32>,
    dbc: HostF32,
}

impl PreScan {
    /// Appends rows `rows` of `self` to `out`: the one gather of kept tokens on the host.
    fn append_rows(
        &self,
        rows: impl IntoIterator<Item = usize>,
        out: &mut PreScan,
        m: &Mixer,
    ) -> Result<()> {
        let (di, bc_width) = (m.d_inner, m.dt_rank + 2 * m.d_state);
        let (x_conv, dbc, xz) = (self.x_conv.view()?, self.dbc.view()?, self.xz.view()?);
        for i in rows {
            out.x_conv
                .extend_from_slice(&x_conv[i * di..(i + 1) * di])?;
            out.delta
                .extend_from_slice(&self.delta[i * di..(i + 1) * di]);
            out.dbc
                .extend_from_slice(&dbc[i * bc_width..(i + 1) * bc_width])?;
            out.xz
                .extend_from_slice(&xz[i * 2 * di..(i + 1) * 2 * di])?;
        }
        Ok(())
    }
}

/// The tokens a layer kept: the index tensor (u32, on the model's device) the residual
/// gather uses, and the same indices on the host when they were asked for (or are free).
struct Kept {
    indices: Tensor,
    host: Option<Vec<usize>>,
}

impl Kept {
    fn from_host(idx: Vec<usize>, device: &Device) -> Result<Self> {
        let indices = Tensor::from_iter(idx.iter().map(|&i| i as u32), device)?;
        Ok(Self {
            indices,
            host: Some(idx),
        })
    }
}

/// A u32 index tensor as host indices.
#[cfg(feature = "cuda")]
fn host_indices(t: &Tensor) -> Result<Vec<usize>> {
    Ok(t.to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

/// Gathers the kept rows of the residual stream `[batch, len, d]`: `flat` holds, row by
/// row, indices into the flattened `[batch·len]` tokens, the same number for every row
/// (rows of one batch have one length, so DeciMamba keeps K tokens in each).
fn gather_kept(residual: &Tensor, flat: &Tensor) -> Result<Tensor> {
    let (batch, len, d) = residual.dims3()?;
    if batch == 1 {
        return Ok(residual.index_select(flat, 1)?);
    }
    let kept = flat.dim(0)? / batch;
    Ok(residual
        .reshape((batch * len, d))?
        .index_select(flat, 0)?
        .reshape((batch, kept, d))?)
}

/// What a token-selecting CPU layer reads chunk by chunk: its normalised input, or the
/// residual stream with the layer's norm, applied one chunk at a time so that no
/// normalised copy of a long input exists (the norm acts on each token alone).
#[derive(Clone, Copy)]
enum SelectingInput<'a> {
    Normed(&'a Tensor),
    Residual {
        residual: &'a Tensor,
        norm: &'a Norm,
        dtype: DType,
    },
}

impl SelectingInput<'_> {
    fn len(&self) -> Result<usize> {
        Ok(match self {
            Self::Normed(h) => h.dim(1)?,
            Self::Residual { residual, .. } => residual.dim(1)?,
        })
    }

    /// Tokens `start..start + rows`, normalised.
    fn rows(&self, start: usize, rows: usize) -> Result<Tensor> {
        Ok(match self {
            Self::Normed(h) => h.narrow(1, start, rows)?,
            Self::Residual {
                residual,
                norm,
                dtype,
            } => norm
                .forward(&residual.narrow(1, start, rows)?)?
                .to_dtype(*dtype)?,
        })
    }
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
                    unit_scale: Tensor::ones(di, DType::F32, dev)?,
                    no_filter: Tensor::full(f32::NEG_INFINITY, di, dev)?,
                    scaled_a: Default::default(),
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
            a_log,
            a,
            d_skip,
            d_inner: di,
            d_state: n,
            d_conv: k,
            dt_rank: r,
            #[cfg(feature = "cuda")]
            gpu,
            ops: None,
        })
    }

    /// A under `plan`: −exp(s·A_log) when it rescales A_log, else the model's own.
    fn a_under(&self, plan: &LayerPlan) -> std::borrow::Cow<'_, [f32]> {
        match plan.a_log_scale {
            Some(s) => self.a_log.iter().map(|v| -(s * v).exp()).collect(),
            None => std::borrow::Cow::Borrowed(&self.a),
        }
    }

    /// `h`: normalised input `[batch, len, d_model]`. Returns the mixer output
    /// `[batch, len', d_model]` and, when the plan dropped tokens, the kept ones.
    /// `chunk`: CPU inputs longer than twice this choose tokens without their
    /// full-length activations. `record`: the kept indices are wanted on the host.
    fn forward(
        &self,
        h: &Tensor,
        state: &mut LayerState,
        plan: &LayerPlan,
        chunk: Option<usize>,
        record: bool,
        watch: Watch,
    ) -> Result<(Tensor, Option<Kept>)> {
        match state {
            LayerState::Host { conv, ssm } => {
                let (out, kept) = self.forward_host(h, conv, ssm, plan, chunk, watch)?;
                let kept = kept.map(|k| Kept::from_host(k, h.device())).transpose()?;
                Ok((out, kept))
            }
            LayerState::Tensors { conv, ssm } if self.ops.is_some() => {
                self.forward_ops(h, conv, ssm, plan, record, watch)
            }
            #[cfg(feature = "cuda")]
            LayerState::Tensors { conv, ssm } => {
                self.forward_device(h, conv, ssm, plan, record, watch)
            }
            #[cfg(not(feature = "cuda"))]
            LayerState::Tensors { .. } => bail!(
                "no Mamba kernels for {:?} in this build (CPU, or CUDA with the `cuda` feature); use --backend candle",
                h.device()
            ),
        }
    }

    /// The mixer on the GPU: candle matmuls (cuBLAS) around the CUDA kernels of
    /// `cuda.rs`, activations in the model dtype, every tensor on the device. The plan's
    /// Δ scale and filter are arguments of the fused scan and score kernels; tokens are
    /// scored (‖Δ_t‖₂), chosen (top-K) and gathered on the GPU, and the kept indices come
    /// to the host only when `record` asks for them.
    #[cfg(feature = "cuda")]
    fn forward_device(
        &self,
        h: &Tensor,
        conv: &mut Tensor,
        ssm: &mut Tensor,
        plan: &LayerPlan,
        record: bool,
        watch: Watch,
    ) -> Result<(Tensor, Option<Kept>)> {
        let Some(p) = &self.gpu else {
            bail!("no Mamba kernels for {:?} (CPU and CUDA only)", h.device());
        };
        let (batch, len, d_model) = h.dims3()?;
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let mut prof = cuda::profile::start(h.device());
        let (lap, lap_work) = (cuda::profile::lap, cuda::profile::lap_work);
        let (tokens, eb) = (batch * len, p.dtype.size_in_bytes());
        let xz = self
            .in_proj
            .forward(&h.reshape((batch * len, d_model))?)?
            .contiguous()?;
        lap_work(
            &mut prof,
            "in_proj",
            Work::gemm(tokens, 2 * di, d_model, eb),
        );
        let (x_conv, window) = cuda::conv_silu(&xz, conv, p, batch, len)?;
        *conv = window;
        lap_work(
            &mut prof,
            "conv",
            Work::bytes((2 * tokens * di * eb) as f64),
        );
        let dbc = self.x_proj.forward(&x_conv)?.contiguous()?;
        lap_work(&mut prof, "x_proj", Work::gemm(tokens, r + 2 * n, di, eb));
        // dt before bias and softplus: the scan adds both as it reads it.
        let dt = dbc
            .narrow(1, 0, r)?
            .contiguous()?
            .matmul(&self.dt_proj_weight.t()?)?
            .contiguous()?;
        lap_work(&mut prof, "dt_proj", Work::gemm(tokens, di, r, eb));
        let device_plan = cuda::DevicePlan::new(p, plan, || self.a_under(plan), h.device())?;

        let mut kept = None;
        if let Some(KeepRule {
            keep,
            protected_tail,
        }) = plan.keep
        {
            // As select_by_scores: nothing to choose unless more candidates than budget.
            let candidates = len.saturating_sub(protected_tail);
            if candidates > keep {
                let scores = cuda::delta_norms(&dt, p, &device_plan)?;
                // Each row chooses its own tokens, as indices into the flattened batch·len.
                let idx_t = match batch {
                    1 => cuda::select_top_k(&scores, candidates, keep, p.variant())?,
                    _ => {
                        let rows = (0..batch)
                            .map(|b| {
                                let row = scores.narrow(0, b * len, len)?;
                                let idx = cuda::select_top_k(&row, candidates, keep, p.variant())?;
                                let offset = Tensor::new((b * len) as u32, h.device())?;
                                Ok(idx.broadcast_add(&offset)?)
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Tensor::cat(&rows, 0)?
                    }
                };
                let host = match record || watch.observer().is_some() {
                    true => Some(host_indices(&idx_t)?),
                    false => None,
                };
                kept = Some(Kept {
                    indices: idx_t,
                    host,
                });
            }
            lap(&mut prof, "token selection");
        }
        if let Some(observer) = watch.observer() {
            // The observer reads the host: copy the layer's inputs, with Δ computed from dt
            // as the scan kernel does.
            let mut delta = to_vec_f32(&dt)?;
            kernels::softplus_bias_inplace(&mut delta, &self.dt_bias);
            plan.apply_to_delta(&mut delta, di);
            let bc = to_vec_f32(&dbc)?;
            let a = self.a_under(plan);
            observer.on_scan(&ScanView {
                layer: watch.layer,
                batch,
                len,
                d_inner: di,
                d_state: n,
                a: &a,
                delta: &delta,
                x: &to_vec_f32(&x_conv)?,
                bc: &bc,
                bc_row_stride: r + 2 * n,
                b_offset: r,
                c_offset: r + n,
                kept: kept.as_ref().and_then(|k: &Kept| k.host.as_deref()),
            })?;
        }
        let (mut x_conv, mut dt, mut dbc, mut xz, mut scan_len) = (x_conv, dt, dbc, xz, len);
        if let Some(k) = &kept {
            let gather = |t: &Tensor| t.index_select(&k.indices, 0);
            (x_conv, dt, dbc, xz) = (gather(&x_conv)?, gather(&dt)?, gather(&dbc)?, gather(&xz)?);
            scan_len = k.indices.dim(0)? / batch;
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
        lap(&mut prof, "scan inputs");
        // The scan books its own passes ("scan: ...").
        let (y, h1) = cuda::selective_scan(&args, p, &device_plan)?;
        *ssm = h1;
        let out = self
            .out_proj
            .forward(&y)?
            .reshape((batch, scan_len, d_model))?;
        let rows = batch * scan_len;
        lap_work(&mut prof, "out_proj", Work::gemm(rows, d_model, di, eb));
        Ok((out, kept))
    }

    /// The mixer on the CPU kernels of `kernels.rs`, state updated in place.
    fn forward_host(
        &self,
        h: &Tensor,
        conv_state: &mut [f32],
        ssm_state: &mut [f32],
        plan: &LayerPlan,
        chunk: Option<usize>,
        watch: Watch,
    ) -> Result<(Tensor, Option<Vec<usize>>)> {
        let (batch, len, _) = h.dims3()?;
        if let Some(rule) = plan.keep {
            // Long single sequences choose their tokens chunk by chunk; a batch runs in one
            // pass.
            if let Some(chunk) = chunk.filter(|&c| batch == 1 && len > 2 * c) {
                return self.forward_host_selecting(
                    SelectingInput::Normed(h),
                    (conv_state, ssm_state),
                    plan,
                    (rule, chunk),
                    watch,
                );
            }
        }
        let mut pre = self.pre_scan(h, conv_state, plan)?;
        // Each row chooses its own tokens; `kept` indexes the flattened batch·len rows.
        let kept = match plan.keep {
            Some(rule) => {
                let row = len * self.d_inner;
                let mut all: Option<Vec<usize>> = None;
                for b in 0..batch {
                    let scores = token_scores(&pre.delta[b * row..(b + 1) * row], self.d_inner);
                    if let Some(idx) = select_by_scores(&scores, rule.keep, rule.protected_tail) {
                        all.get_or_insert_with(Vec::new)
                            .extend(idx.into_iter().map(|i| b * len + i));
                    }
                }
                all
            }
            None => None,
        };
        self.observe(watch, plan, &pre, (batch, len), kept.as_deref())?;
        if let Some(idx) = &kept {
            let mut gathered = PreScan::default();
            pre.append_rows(idx.iter().copied(), &mut gathered, self)?;
            pre = gathered;
        }
        let scan_len = kept.as_ref().map_or(len, |k| k.len() / batch);
        let out = self.scan_and_project(&pre, batch, scan_len, ssm_state, h, plan)?;
        Ok((out, kept))
    }

    /// Hands the observer (when it observes this layer) the layer's inputs `pre`, rows
    /// `[batch, len]`, and the rows the scan will keep.
    fn observe(
        &self,
        watch: Watch,
        plan: &LayerPlan,
        pre: &PreScan,
        (batch, len): (usize, usize),
        kept: Option<&[usize]>,
    ) -> Result<()> {
        let Some(observer) = watch.observer() else {
            return Ok(());
        };
        let (n, r) = (self.d_state, self.dt_rank);
        let (x_conv, dbc) = (pre.x_conv.view()?, pre.dbc.view()?);
        observer.on_scan(&ScanView {
            layer: watch.layer,
            batch,
            len,
            d_inner: self.d_inner,
            d_state: n,
            a: &self.a_under(plan),
            delta: &pre.delta,
            x: &x_conv,
            bc: &dbc,
            bc_row_stride: r + 2 * n,
            b_offset: r,
            c_offset: r + n,
            kept,
        })
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
        plan: &LayerPlan,
    ) -> Result<Tensor> {
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let bc_width = r + 2 * n;
        let a = self.a_under(plan);
        let (x_conv, dbc, xz) = (pre.x_conv.view()?, pre.dbc.view()?, pre.xz.view()?);
        let inputs = ScanInputs {
            batch,
            len: scan_len,
            d_inner: di,
            d_state: n,
            x: &x_conv,
            delta: &pre.delta,
            bc: &dbc,
            bc_batch_stride: scan_len * bc_width,
            bc_row_stride: bc_width,
            b_offset: r,
            c_offset: r + n,
            z: &xz[di..],
            z_batch_stride: scan_len * 2 * di,
            z_row_stride: 2 * di,
            a: &a,
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
    /// conv + SiLU continuing from `conv_state` (updated), x_proj, and Δ with the plan's
    /// scale and filter applied.
    fn pre_scan(&self, h: &Tensor, conv_state: &mut [f32], plan: &LayerPlan) -> Result<PreScan> {
        let (batch, len, d_model) = h.dims3()?;
        let (di, r) = (self.d_inner, self.dt_rank);
        let xz = self.in_proj.forward(&h.reshape((batch * len, d_model))?)?;
        let xz = HostF32::of(xz)?;
        let xz_rows = xz.view()?;
        // Causal conv + SiLU over the full sequence (a token selection comes after it).
        let x_conv = kernels::causal_conv_silu(
            ConvInput {
                data: &xz_rows,
                batch_stride: len * 2 * di,
                row_stride: 2 * di,
            },
            conv_state,
            &self.conv_weight_t,
            &self.conv_bias,
            batch,
            len,
        );
        self.update_conv_window(&xz_rows, batch, len, conv_state);
        drop(xz_rows);
        // x_proj → (dt, B, C); Δ = softplus(dt_proj(dt) + bias). An f32 model's x_proj
        // reads the conv output in place (moved into the tensor, not copied).
        let (x_conv_t, x_conv) = match h.dtype() {
            DType::F32 => {
                let t = Tensor::from_vec(x_conv, (batch * len, di), h.device())?;
                (t.clone(), HostF32::of(t)?)
            }
            dtype => (
                Tensor::from_slice(&x_conv, (batch * len, di), h.device())?.to_dtype(dtype)?,
                HostF32::Owned(x_conv),
            ),
        };
        let dbc = self.x_proj.forward(&x_conv_t)?;
        let dt = linear(&dbc.narrow(1, 0, r)?.contiguous()?, &self.dt_proj_weight)?;
        let mut delta = to_vec_f32(&dt)?;
        kernels::softplus_bias_inplace(&mut delta, &self.dt_bias);
        plan.apply_to_delta(&mut delta, di);
        Ok(PreScan {
            xz,
            x_conv,
            delta,
            dbc: HostF32::of(dbc)?,
        })
    }

    /// A token-selecting layer on a long CPU input (batch 1) without its full-length
    /// activations: pass 1 runs in_proj → conv → Δ chunk by chunk and keeps only the
    /// ‖Δ_t‖₂ scores; pass 2 recomputes the chunks and keeps the rows of the selected
    /// tokens. The result equals the one-pass layer; memory is O(chunk + kept) · d_inner
    /// instead of O(L · d_inner), for one extra in_proj of the sequence.
    fn forward_host_selecting(
        &self,
        h: SelectingInput,
        (conv_state, ssm_state): (&mut [f32], &mut [f32]),
        plan: &LayerPlan,
        (rule, chunk): (KeepRule, usize),
        watch: Watch,
    ) -> Result<(Tensor, Option<Vec<usize>>)> {
        let len = h.len()?;
        let history = conv_state.to_vec();
        let mut scores = Vec::with_capacity(len);
        for start in (0..len).step_by(chunk) {
            let rows = chunk.min(len - start);
            let pre = self.pre_scan(&h.rows(start, rows)?, conv_state, plan)?;
            scores.extend(token_scores(&pre.delta, self.d_inner));
        }
        let selected = select_by_scores(&scores, rule.keep, rule.protected_tail);
        let kept: Vec<usize> = selected.clone().unwrap_or_else(|| (0..len).collect());
        conv_state.copy_from_slice(&history);
        let mut gathered = PreScan::default();
        let mut next = 0;
        let mut like = None;
        for start in (0..len).step_by(chunk) {
            let rows = chunk.min(len - start);
            let h_rows = h.rows(start, rows)?;
            let pre = self.pre_scan(&h_rows, conv_state, plan)?;
            like.get_or_insert(h_rows);
            let first = next;
            while next < kept.len() && kept[next] < start + rows {
                next += 1;
            }
            if watch.observer().is_some() {
                let in_chunk: Vec<usize> = kept[first..next].iter().map(|&i| i - start).collect();
                let kept_here = selected.as_ref().map(|_| in_chunk.as_slice());
                self.observe(watch, plan, &pre, (1, rows), kept_here)?;
            }
            pre.append_rows(
                kept[first..next].iter().map(|&i| i - start),
                &mut gathered,
                self,
            )?;
        }
        let like = like.context("a selecting layer needs a non-empty input")?;
        let out = self.scan_and_project(&gathered, 1, kept.len(), ssm_state, &like, plan)?;
        Ok((out, selected))
    }

    /// Keeps the last `d_conv − 1` pre-conv inputs of this layer's full input for the next
    /// call (decode continues from the full input, even when the scan ran on kept tokens).
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

/// Forces CUDA decode steps through the persistent kernel (`Some(true)`), the per-stage
/// kernels (`Some(false)`), or as `DECIMAMBA_DECODE_PERSISTENT` says (`None`), for tests
/// and benchmarks that compare the two in one process.
#[cfg(feature = "cuda")]
pub fn set_persistent_decode(on: Option<bool>) {
    cuda::set_persistent_decode(on);
}

/// Sets the lead of the decode step's L2 weight prefetches in MiB (`Some(0.0)`: none), or
/// leaves it to `DECIMAMBA_DECODE_PREFETCH_MB` (`None`), for tests and benchmarks that
/// compare leads in one process.
#[cfg(feature = "cuda")]
pub fn set_decode_prefetch_mib(mib: Option<f64>) {
    cuda::set_decode_prefetch_mib(mib);
}

/// The keep rule's top-K choice made by the CUDA kernel the GPU prefill uses, for tests that
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
/// seconds, calls, work and roofline), cleared by the call. Empty without the `cuda`
/// feature or profiling; an error when `DECIMAMBA_PEAK_TFLOPS`/`_GBPS` is not a number.
pub fn take_gpu_profile() -> Result<Vec<super::gpu_plan::StageTime>> {
    #[cfg(feature = "cuda")]
    return cuda::profile::take();
    #[cfg(not(feature = "cuda"))]
    Ok(Vec::new())
}

/// (free, total) memory of a CUDA device in bytes (`None` on other devices or builds).
fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Free memory of a CUDA device in bytes (`None` on other devices or builds).
pub fn gpu_free_bytes(device: &Device) -> Option<u64> {
    gpu_memory(device).map(|(free, _)| free)
}

/// GPU memory in use on a CUDA device in bytes (total − free; `None` elsewhere). The
/// model keeps freed memory in its stream-ordered pool, so this is the process's
/// high-water mark, weights included (plus any other process on the device).
pub fn gpu_used_bytes(device: &Device) -> Option<u64> {
    gpu_memory(device).map(|(free, total)| total - free)
}

/// Asks the policy for each layer's plan. A chunk of a longer input is planned at the
/// whole input's length (`whole_len`), so that every chunk runs the same plans.
#[derive(Clone, Copy)]
struct Planner<'a> {
    policy: Option<&'a dyn ContextPolicy>,
    protected_tail: usize,
    whole_len: Option<usize>,
}

impl Planner<'_> {
    fn plan(&self, layer: usize, len: usize) -> LayerPlan {
        match self.policy {
            None => LayerPlan::default(),
            Some(p) => p.plan(layer, self.whole_len.unwrap_or(len), self.protected_tail),
        }
    }
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
    /// Which implementation runs the mixers.
    backend: Backend,
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
        let model = Self {
            config: config.clone(),
            embedding,
            layers,
            norm_f,
            lm_head,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            backend: Backend::CpuKernels,
            prefill_chunk: Some(CPU_PREFILL_CHUNK),
            cancel: None,
            #[cfg(feature = "cuda")]
            decode_graph: Default::default(),
        };
        model.with_backend(BackendChoice::Auto)
    }

    /// The model run by the backend `choice` names on its device (`Auto` is what
    /// [`Self::new`] picks). States made before the switch do not fit the new backend.
    pub fn with_backend(mut self, choice: BackendChoice) -> Result<Self> {
        let backend = Backend::resolve(choice, &self.device)?;
        for block in &mut self.layers {
            let mixer = &mut block.mixer;
            mixer.ops = match backend {
                Backend::CandleOps => Some(candle_ops::OpsParams::new(mixer, &self.device)?),
                _ => None,
            };
        }
        self.backend = backend;
        Ok(self)
    }

    /// How the Candle-ops backend runs the scan's recurrence within a time chunk (the
    /// default picks by device; the fused backends ignore it).
    pub fn with_chunk_scan(mut self, mode: ChunkScan) -> Self {
        for block in &mut self.layers {
            if let Some(ops) = &mut block.mixer.ops {
                ops.chunk_scan = mode;
            }
        }
        self
    }

    /// Which implementation runs the mixers.
    pub fn backend(&self) -> Backend {
        self.backend
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
        self.backend.name()
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
            if self.backend == Backend::CpuKernels {
                LayerState::Host {
                    conv: vec![0f32; batch * w * di],
                    ssm: vec![0f32; batch * di * n],
                }
            } else {
                let zeros = |shape: (usize, usize, usize)| {
                    Tensor::zeros(shape, DType::F32, &self.device)
                        .expect("cannot allocate the recurrent state on the device")
                };
                LayerState::Tensors {
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
    /// leaving the final recurrent state in it, under `opts.policy`'s plans. When a plan
    /// drops tokens the logits belong to the kept
    /// positions, whose last `protected_tail` are the input's last.
    pub fn forward_with_state(
        &self,
        ids: &Tensor,
        state: &mut InferenceState,
        opts: &ForwardOptions,
    ) -> Result<(Option<Tensor>, ForwardTrace)> {
        if let Some(policy) = opts.policy {
            policy.check(&self.config)?;
        }
        // On the CPU the forward runs on a thread of rayon's pool. A decode step makes about
        // 4·n_layer parallel calls, and each call made from outside the pool hands its job
        // over and sleeps until a worker wakes it: two futex round trips a call, with one
        // thread more than there are cores. 130m decode on 2 threads, alternated runs:
        // f32 43.7 → 48.8 tokens/s, bf16 62 → 86 (medians). An observer need not be
        // `Sync`, so a forward with one stays on the caller's thread.
        if self.device.is_cpu() && opts.observer.is_none() {
            let (policy, protected_tail) = (opts.policy, opts.protected_tail);
            let (logits, record_indices) = (opts.logits, opts.record_indices);
            return on_pool(|| {
                let opts = ForwardOptions {
                    policy,
                    protected_tail,
                    logits,
                    record_indices,
                    observer: None,
                };
                self.forward_planned(ids, state, &opts, None)
            });
        }
        self.forward_planned(ids, state, opts, None)
    }

    /// [`Self::forward_with_state`] for a whole input, or (`whole_len` set) for one chunk
    /// of an input of `whole_len` tokens, whose plans are the whole input's.
    fn forward_planned(
        &self,
        ids: &Tensor,
        state: &mut InferenceState,
        opts: &ForwardOptions,
        whole_len: Option<usize>,
    ) -> Result<(Option<Tensor>, ForwardTrace)> {
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
        self.check_state(state)?;
        let whole = Planner {
            policy: opts.policy,
            protected_tail: opts.protected_tail,
            whole_len: Some(whole_len.unwrap_or(len)),
        };
        // Layers before the first one that drops tokens see the whole input.
        let first_keep = match opts.policy {
            None => None,
            Some(_) => (0..self.layers.len()).find(|&i| whole.plan(i, len).keep.is_some()),
        };
        let chunk = self.cpu_chunk();
        if let Some(chunk) = chunk.filter(|&c| first_keep.is_none() && len > 2 * c) {
            return self.forward_in_chunks(ids, state, opts, chunk, whole_len.unwrap_or(len));
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
        let (residual, mut trace, start_layer) = match first_keep {
            // The layers before the first token-dropping one keep every token: on the CPU
            // they run in chunks with the state carried, and only their output (the
            // residual stream) is kept whole for the layer that must score every token.
            Some(first) if first > 0 && chunk.is_some_and(|c| len > 2 * c) => {
                let chunk = chunk.unwrap_or(len);
                // One f32 sequence is assembled in place (a join of the pieces would hold the
                // stream twice); other cases join the pieces.
                let in_place = batch == 1 && residual_dtype == DType::F32;
                let mut joined: Vec<f32> = Vec::new();
                if in_place {
                    joined.reserve_exact(len * self.config.d_model);
                }
                let mut pieces = Vec::new();
                let mut trace = ForwardTrace::default();
                let mut start = 0;
                while start < len {
                    let end = (start + chunk).min(len);
                    let piece = self.embed(&ids.narrow(1, start, end - start)?, residual_dtype)?;
                    let mut t = ForwardTrace::default();
                    let piece = self.run_blocks(piece, 0..first, state, &whole, opts, &mut t)?;
                    match in_place {
                        true => joined.extend(piece.flatten_all()?.to_vec1::<f32>()?),
                        false => pieces.push(piece),
                    }
                    trace.merge_chunk(t);
                    start = end;
                }
                let residual = match in_place {
                    true => Tensor::from_vec(joined, (1, len, self.config.d_model), &self.device)?,
                    false => Tensor::cat(&pieces, 1)?,
                };
                (residual, trace, first)
            }
            _ => (self.embed(ids, residual_dtype)?, ForwardTrace::default(), 0),
        };
        // A whole input is planned at each layer's own input length; a chunk at the
        // whole input's.
        let planner = Planner { whole_len, ..whole };
        let residual = self.run_blocks(
            residual,
            start_layer..self.layers.len(),
            state,
            &planner,
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
            .apply(&|x: &Tensor| match self.backend.is_fused() {
                true => linear(x, &self.lm_head),
                false => x.matmul(&self.lm_head.t()?),
            })?
            .reshape((batch, take, self.config.vocab_size))?
            .to_dtype(DType::F32)?;
        self.device.synchronize()?;
        Ok((Some(logits), trace))
    }

    /// Refuses a state made for another backend (host vectors for the CPU kernels,
    /// tensors for the others): the mixer would run the wrong implementation.
    fn check_state(&self, state: &InferenceState) -> Result<()> {
        let host = matches!(state.layers.first(), Some(LayerState::Host { .. }));
        if host != (self.backend == Backend::CpuKernels) {
            bail!(
                "the recurrent state was made for another backend than this model's ({}): make it with this model's new_state",
                self.backend.name()
            );
        }
        Ok(())
    }

    /// Embedding lookup: `ids` `[batch, len]` → residual stream `[batch, len, d_model]`.
    fn embed(&self, ids: &Tensor, residual_dtype: DType) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let residual = self.embedding.index_select(&ids.flatten_all()?, 0)?;
        Ok(residual
            .reshape((batch, len, self.config.d_model))?
            .to_dtype(residual_dtype)?)
    }

    /// The chunk length of long CPU inputs (none on a GPU).
    fn cpu_chunk(&self) -> Option<usize> {
        self.prefill_chunk.filter(|_| self.device.is_cpu())
    }

    /// Runs the blocks in `layers` (Add → Norm → Mixer under each layer's plan) on the
    /// residual stream, appending one trace entry per layer. Each mixer's output is added
    /// at the next block's norm: on the GPU one kernel does both, and the residual stream
    /// stays f32 there (rounded to the model dtype after each add when the checkpoint
    /// does not keep it in f32).
    fn run_blocks(
        &self,
        residual: Tensor,
        layers: std::ops::Range<usize>,
        state: &mut InferenceState,
        planner: &Planner,
        opts: &ForwardOptions,
        trace: &mut ForwardTrace,
    ) -> Result<Tensor> {
        let mut residual = match self.backend == Backend::CudaKernels {
            true => residual.to_dtype(DType::F32)?,
            false => residual,
        };
        let mut pending: Option<Tensor> = None;
        let mut last = None;
        for i in layers {
            self.check_cancel()?;
            let len_in = residual.dim(1)?;
            let plan = planner.plan(i, len_in);
            let watch = Watch {
                layer: i,
                observer: opts.observer,
            };
            let (out, kept) = match self.selects_from_residual(&residual, &pending, &plan)? {
                // A long input's first selecting layer: normalised chunk by chunk.
                Some((rule, chunk)) => {
                    let LayerState::Host { conv, ssm } = &mut state.layers[i] else {
                        bail!("the CPU kernels need a host state");
                    };
                    let input = SelectingInput::Residual {
                        residual: &residual,
                        norm: &self.layers[i].norm,
                        dtype: self.dtype,
                    };
                    let mixer = &self.layers[i].mixer;
                    let (out, kept) = mixer.forward_host_selecting(
                        input,
                        (conv, ssm),
                        &plan,
                        (rule, chunk),
                        watch,
                    )?;
                    let kept = kept.map(|k| Kept::from_host(k, &self.device)).transpose()?;
                    (out, kept)
                }
                None => {
                    let normed = self.add_and_norm(&mut residual, pending.take(), Some(i))?;
                    self.layers[i].mixer.forward(
                        &normed,
                        &mut state.layers[i],
                        &plan,
                        self.cpu_chunk(),
                        opts.record_indices,
                        watch,
                    )?
                }
            };
            let mut recorded = None;
            if let Some(k) = kept {
                #[cfg(feature = "cuda")]
                let mut prof = cuda::profile::start(&self.device);
                residual = gather_kept(&residual, &k.indices)?;
                #[cfg(feature = "cuda")]
                cuda::profile::lap(&mut prof, "residual gather");
                recorded = k.host.filter(|_| opts.record_indices && state.batch == 1);
            }
            trace.layers.push(LayerTrace {
                layer: i,
                len_in,
                len_out: out.dim(1)?,
                kept: recorded,
            });
            pending = Some(out);
            last = Some(i);
        }
        if let Some(out) = pending {
            let _ = last;
            self.add_and_norm(&mut residual, Some(out), None)?;
        }
        Ok(residual)
    }

    /// The keep rule and chunk when layer's mixer should choose its tokens straight from
    /// the residual stream: the CPU kernels, one long sequence, a keep rule, and nothing
    /// pending to add (the first layer of a pass, as for the first selecting layer of a long
    /// prefill). A normalised copy of the input is then never made.
    fn selects_from_residual(
        &self,
        residual: &Tensor,
        pending: &Option<Tensor>,
        plan: &LayerPlan,
    ) -> Result<Option<(KeepRule, usize)>> {
        let (batch, len, _) = residual.dims3()?;
        let (Some(rule), Some(chunk)) = (plan.keep, self.cpu_chunk()) else {
            return Ok(None);
        };
        let fits = self.backend == Backend::CpuKernels && pending.is_none() && batch == 1;
        Ok((fits && len > 2 * chunk).then_some((rule, chunk)))
    }

    /// Adds the previous mixer's output (`pending`) to the residual stream and returns
    /// layer `norm_of`'s norm of the sum (with `None`, only adds).
    fn add_and_norm(
        &self,
        residual: &mut Tensor,
        pending: Option<Tensor>,
        norm_of: Option<usize>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.backend == Backend::CudaKernels {
            let (batch, len, d_model) = residual.dims3()?;
            let params = self.layers[norm_of.unwrap_or(0)]
                .mixer
                .gpu
                .as_ref()
                .context("layer has no CUDA parameters")?;
            let norm = match norm_of {
                Some(i) => self.layers[i].norm.as_ref(),
                None => self.norm_f.as_ref(),
            };
            let delta = match &pending {
                Some(out) => Some(out.reshape((batch * len, d_model))?),
                None => None,
            };
            let mut prof = cuda::profile::start(&self.device);
            let (new_res, normed) = cuda::add_norm(
                &residual.reshape((batch * len, d_model))?,
                delta.as_ref(),
                norm,
                params,
                self.rounds_residual(),
                norm_of.is_some(),
            )?;
            // f32 residual read and written, the mixer output read, the normed rows written.
            let traffic = batch * len * d_model * (8 + 2 * self.dtype.size_in_bytes());
            cuda::profile::lap_work(&mut prof, "add_norm", Work::bytes(traffic as f64));
            *residual = new_res.reshape((batch, len, d_model))?;
            return match normed {
                Some(n) => Ok(n.reshape((batch, len, d_model))?),
                None => Ok(residual.clone()),
            };
        }
        if let Some(out) = pending {
            *residual = (&*residual + out.to_dtype(residual.dtype())?)?;
        }
        match norm_of {
            Some(i) => Ok(self.layers[i]
                .norm
                .forward(residual)?
                .to_dtype(self.dtype)?),
            None => Ok(residual.clone()),
        }
    }

    /// Whether the residual stream is rounded to the model dtype after each add (the
    /// checkpoint does not keep it in f32).
    #[cfg(feature = "cuda")]
    fn rounds_residual(&self) -> bool {
        !self.config.residual_in_fp32 && self.dtype != DType::F32
    }

    /// A long sequence whose plans keep every token, as consecutive chunks with the state
    /// carried: the same result as one pass (the recurrence is exact across chunk
    /// boundaries, and every chunk gets the whole input's plans), with activations
    /// bounded by the chunk and kept cache-sized.
    fn forward_in_chunks(
        &self,
        ids: &Tensor,
        state: &mut InferenceState,
        opts: &ForwardOptions,
        chunk: usize,
        whole_len: usize,
    ) -> Result<(Option<Tensor>, ForwardTrace)> {
        let len = ids.dim(1)?;
        // Output positions wanted, as a range of the input (no token dropped: they coincide).
        let wanted = match opts.logits {
            LogitsSpan::All => 0..len,
            LogitsSpan::Last(n) => len - n.min(len)..len,
            LogitsSpan::None => len..len,
        };
        let mut pieces = Vec::new();
        let mut trace = ForwardTrace::default();
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
            let (logits, t) = self.forward_planned(
                &ids.narrow(1, start, end - start)?,
                state,
                &sub,
                Some(whole_len),
            )?;
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

    /// Logits for every position of `ids` (`[batch, len]`) from a fresh state, vanilla.
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

    /// One decode step: `ids` holds one token per sequence. Plans never apply to decode
    /// (as in every official code of the methods).
    pub fn step(&self, ids: &[u32], state: &mut InferenceState) -> Result<Tensor> {
        if ids.len() != state.batch {
            bail!(
                "state was made for batch {} but the step has {} tokens",
                state.batch,
                ids.len()
            );
        }
        self.check_state(state)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.config.vocab_size
            );
        }
        #[cfg(feature = "cuda")]
        if self.backend == Backend::CudaKernels
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
            let LayerState::Tensors { conv, ssm } = layer_state else {
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

/// Runs `f` on a thread of rayon's global pool (directly when already on one), so that
/// the parallel loops inside it start without handing each job across threads.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope ran its closure")
}
