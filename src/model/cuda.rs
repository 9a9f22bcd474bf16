//! CUDA kernels of the mixer: causal depthwise conv + SiLU (with the conv window carried
//! between calls), softplus(Δ + bias) and the selective scan, on f32 device tensors.
//!
//! The CUDA C source (`cuda.kernels.cu`) is compiled at run time with NVRTC, once per
//! process and `d_state`, and loaded into each device through candle's module cache.
//! Why NVRTC rather than nvcc in a build script: libnvrtc is already a run-time
//! dependency of every candle CUDA binary, so this needs no nvcc at build time (CI and
//! `cargo check --features cuda` stay toolkit-free), `d_state` becomes a compile-time
//! constant (the state lives in registers, unrolled loops), and the PTX targets the GPU
//! actually present instead of one architecture fixed at build time. The cost is a
//! compile of ~100 ms on first use. PTX written by a newer NVRTC than the driver
//! supports is rejected by the driver; scripts/gpu-check.sh uses the toolkit's NVRTC.
//!
//! Matmuls and norms stay candle ops (cuBLAS); everything here works on contiguous f32
//! tensors in token-major layout, like the CPU kernels in `kernels.rs`.

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Shape, Storage, StorageRef, Tensor};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

const SOURCE: &str = include_str!("cuda.kernels.cu");

/// Threads per block of every kernel here.
const BLOCK: u32 = 128;

/// Threads the scan aims to keep in flight (≈ 2 × 132 SMs × 2048): the time axis is cut
/// into chunks until batch × d_inner × chunks reaches this.
const SCAN_TARGET_THREADS: usize = 1 << 19;
/// Shortest chunk worth the extra summary pass.
const SCAN_MIN_CHUNK: usize = 64;

/// Largest d_state the scan keeps in registers.
const MAX_D_STATE: usize = 64;

fn check_d_state(d_state: usize) -> Result<()> {
    if d_state == 0 || d_state > MAX_D_STATE {
        bail!("the CUDA scan supports d_state 1..={MAX_D_STATE}, got {d_state}");
    }
    Ok(())
}

/// The virtual architecture to compile for: the device's own where NVRTC knows it.
fn arch_of(dev: &CudaDevice) -> Option<&'static str> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().ok()?;
    Some(match (major, minor) {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        _ => return None,
    })
}

/// PTX of the kernels for one `d_state` and architecture, compiled once per process.
fn ptx_for(d_state: usize, arch: Option<&'static str>) -> Result<&'static str> {
    type Cache = Mutex<HashMap<(usize, Option<&'static str>), &'static str>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut map = CACHE
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| anyhow!("PTX cache poisoned"))?;
    if let Some(p) = map.get(&(d_state, arch)) {
        return Ok(p);
    }
    check_d_state(d_state)?;
    let opts = CompileOptions {
        arch,
        options: vec![format!("-DNSTATE={d_state}")],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| anyhow!("NVRTC could not compile the mixer kernels: {e:?}"))?;
    // A handful of variants per process at most (one per d_state): leaking is fine.
    let src: &'static str = Box::leak(ptx.to_src().into_boxed_str());
    map.insert((d_state, arch), src);
    Ok(src)
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("expected a CUDA tensor, got one on {other:?}"),
    }
}

/// A read guard on a contiguous f32 CUDA tensor, handing out views for kernel arguments.
struct Input<'a> {
    guard: StorageRef<'a>,
    offset: usize,
    len: usize,
}

impl<'a> Input<'a> {
    fn new(t: &'a Tensor, what: &str) -> Result<Self> {
        if t.dtype() != DType::F32 || !t.is_contiguous() {
            bail!(
                "CUDA kernel input {what} must be contiguous f32 (got {:?})",
                t.dtype()
            );
        }
        let (guard, layout) = t.storage_and_layout();
        Ok(Self {
            guard,
            offset: layout.start_offset(),
            len: t.elem_count(),
        })
    }

    /// The tensor's elements from `skip` on.
    fn view(&self, skip: usize) -> Result<CudaView<'_, f32>> {
        match &*self.guard {
            Storage::Cuda(c) => Ok(c
                .as_cuda_slice::<f32>()?
                .slice(self.offset + skip..self.offset + self.len)),
            _ => bail!("CUDA kernel input is not on a CUDA device"),
        }
    }
}

fn wrap(out: CudaSlice<f32>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Per-layer constants of the mixer on the device, all f32.
#[derive(Debug, Clone)]
pub struct MixerParams {
    /// Conv taps, tap-major `[d_conv, d_inner]`.
    pub conv_weight_t: Tensor,
    pub conv_bias: Tensor,
    pub dt_bias: Tensor,
    /// A = −exp(A_log), `[d_inner, d_state]`.
    pub a: Tensor,
    pub d_skip: Tensor,
    pub d_state: usize,
}

/// Causal depthwise conv + SiLU of `len` tokens of `batch` rows whose input x is the first
/// `d` columns of `xz` (`[batch·len, 2d]`, f32), continuing from `hist`
/// (`[batch, k−1, d]`). Returns x after conv+SiLU `[batch·len, d]` and the new window.
pub fn conv_silu(
    xz: &Tensor,
    hist: &Tensor,
    p: &MixerParams,
    batch: usize,
    len: usize,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(xz)?;
    let (k, d) = p.conv_weight_t.dims2()?;
    if k < 2 {
        bail!("the CUDA conv kernel needs d_conv ≥ 2");
    }
    let row = xz.dim(1)?;
    let func = dev.get_or_load_custom_func("conv_silu", &module(p.d_state), ptx(&dev, p)?)?;
    let (xi, hi) = (Input::new(xz, "xz")?, Input::new(hist, "conv state")?);
    let (wi, bi) = (
        Input::new(&p.conv_weight_t, "conv weight")?,
        Input::new(&p.conv_bias, "conv bias")?,
    );
    let (xv, hv, wv, bv) = (xi.view(0)?, hi.view(0)?, wi.view(0)?, bi.view(0)?);
    let n_out = batch * len * d;
    let n_hist = batch * (k - 1) * d;
    // SAFETY: the kernel writes every element of both outputs.
    let mut out = unsafe { dev.alloc::<f32>(n_out)? };
    let mut new_hist = unsafe { dev.alloc::<f32>(n_hist)? };
    let (bs, rs) = ((len * row) as i64, row as i64);
    let (b_, l_, d_, k_) = (batch as i32, len as i32, d as i32, k as i32);
    let mut builder = func.builder();
    builder
        .arg(&xv)
        .arg(&bs)
        .arg(&rs)
        .arg(&hv)
        .arg(&wv)
        .arg(&bv)
        .arg(&mut out)
        .arg(&mut new_hist)
        .arg(&b_)
        .arg(&l_)
        .arg(&d_)
        .arg(&k_);
    // SAFETY: argument types and order match `conv_silu` in cuda.kernels.cu; every index
    // the kernel forms is bounded by the sizes passed.
    unsafe { builder.launch(grid_1d(n_out.max(n_hist)))? };
    drop(builder);
    Ok((
        wrap(out, &dev, (batch * len, d)),
        wrap(new_hist, &dev, (batch, k - 1, d)),
    ))
}

/// Δ = softplus(dt + bias) for `dt` `[rows, d_inner]` f32.
pub fn softplus_bias(dt: &Tensor, p: &MixerParams) -> Result<Tensor> {
    let dev = cuda_device(dt)?;
    let (rows, d) = dt.dims2()?;
    let func = dev.get_or_load_custom_func("softplus_bias", &module(p.d_state), ptx(&dev, p)?)?;
    let (di, bi) = (Input::new(dt, "dt")?, Input::new(&p.dt_bias, "dt bias")?);
    let (dv, bv) = (di.view(0)?, bi.view(0)?);
    let n = rows * d;
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let (n_, d_) = (n as i64, d as i32);
    let mut builder = func.builder();
    builder.arg(&dv).arg(&bv).arg(&mut out).arg(&n_).arg(&d_);
    // SAFETY: matches `softplus_bias` in cuda.kernels.cu.
    unsafe { builder.launch(grid_1d(n))? };
    drop(builder);
    Ok(wrap(out, &dev, (rows, d)))
}

/// Pushes the arguments the kernels declare as `SCAN_PARAMS`, in that order.
macro_rules! push_scan_params {
    ($b:ident, $($arg:ident),*) => {
        $( $b.arg(&$arg); )*
    };
}

/// Inputs of [`selective_scan`]; all f32, contiguous, on one CUDA device.
pub struct ScanArgs<'a> {
    pub batch: usize,
    pub len: usize,
    /// x after conv + SiLU, `[batch·len, d_inner]`.
    pub x: &'a Tensor,
    /// Δ after softplus, `[batch·len, d_inner]`.
    pub delta: &'a Tensor,
    /// Rows `[batch·len, w]` holding B at columns `b_offset..` and C at `c_offset..`.
    pub bc: &'a Tensor,
    pub b_offset: usize,
    pub c_offset: usize,
    /// Rows `[batch·len, w]` holding the gate z at columns `z_offset..z_offset+d_inner`.
    pub z: &'a Tensor,
    pub z_offset: usize,
    /// Initial state `[batch, d_inner, d_state]`.
    pub h0: &'a Tensor,
}

/// The selective scan with fused discretisation and gating. Returns the gated output
/// `[batch·len, d_inner]` and the final state `[batch, d_inner, d_state]`.
pub fn selective_scan(s: &ScanArgs, p: &MixerParams) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(s.x)?;
    let (d, n) = p.a.dims2()?;
    let (batch, len) = (s.batch, s.len);
    let ptx = ptx(&dev, p)?;
    let m = module(n);

    // Cut the time axis into chunks until the GPU is full (see the kernels' comment).
    let pairs = batch * d;
    let want = SCAN_TARGET_THREADS.div_ceil(pairs).max(1);
    let n_chunks = want.min(len.div_ceil(SCAN_MIN_CHUNK)).max(1);
    let chunk_len = len.div_ceil(n_chunks);
    let n_chunks = len.div_ceil(chunk_len);

    let (bc_w, z_w) = (s.bc.dim(1)?, s.z.dim(1)?);
    let xi = Input::new(s.x, "x")?;
    let di = Input::new(s.delta, "delta")?;
    let bci = Input::new(s.bc, "B/C")?;
    let zi = Input::new(s.z, "z")?;
    let ai = Input::new(&p.a, "A")?;
    let dsi = Input::new(&p.d_skip, "D")?;
    let hi = Input::new(s.h0, "ssm state")?;
    let (xv, dv, bcv, zv) = (xi.view(0)?, di.view(0)?, bci.view(0)?, zi.view(s.z_offset)?);
    let (av, dsv, hv) = (ai.view(0)?, dsi.view(0)?, hi.view(0)?);
    let (bc_bs, bc_rs) = ((len * bc_w) as i64, bc_w as i64);
    let (z_bs, z_rs) = ((len * z_w) as i64, z_w as i64);
    let (b_off, c_off) = (s.b_offset as i32, s.c_offset as i32);
    let (b_, l_, d_, cl_, nc_) = (
        batch as i32,
        len as i32,
        d as i32,
        chunk_len as i32,
        n_chunks as i32,
    );
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(BLOCK as usize) as u32, n_chunks as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the output pass writes every y element and every final-state element.
    let mut y = unsafe { dev.alloc::<f32>(batch * len * d)? };
    let mut h1 = unsafe { dev.alloc::<f32>(pairs * n)? };
    if n_chunks == 1 {
        let (hin_c, hin_g, hin_n) = (0i64, n as i64, 1i64);
        let output = dev.get_or_load_custom_func("scan_output", &m, ptx)?;
        let mut b = output.builder();
        push_scan_params!(
            b, xv, dv, bcv, bc_bs, bc_rs, b_off, c_off, zv, z_bs, z_rs, av, dsv, b_, l_, d_, cl_
        );
        b.arg(&hv)
            .arg(&hin_c)
            .arg(&hin_g)
            .arg(&hin_n)
            .arg(&mut h1)
            .arg(&mut y);
        // SAFETY: matches `scan_output` (SCAN_PARAMS, hin, strides, h1, y).
        unsafe { b.launch(cfg)? };
    } else {
        // SAFETY: the summary pass writes slots 0..n_chunks−1 of both; the combine pass
        // reads those and writes every slot of S.
        let mut sums = unsafe { dev.alloc::<f32>(n_chunks * n * pairs)? };
        let mut dts = unsafe { dev.alloc::<f32>(n_chunks * pairs)? };
        {
            let summary = dev.get_or_load_custom_func("scan_chunk_summary", &m, ptx)?;
            let mut b = summary.builder();
            push_scan_params!(
                b, xv, dv, bcv, bc_bs, bc_rs, b_off, c_off, zv, z_bs, z_rs, av, dsv, b_, l_, d_,
                cl_
            );
            b.arg(&mut sums).arg(&mut dts);
            let mut c = cfg;
            c.grid_dim.1 = (n_chunks - 1) as u32;
            // SAFETY: matches `scan_chunk_summary` (SCAN_PARAMS, S, T).
            unsafe { b.launch(c)? };
        }
        {
            let combine = dev.get_or_load_custom_func("scan_combine", &m, ptx)?;
            let mut b = combine.builder();
            b.arg(&av)
                .arg(&hv)
                .arg(&mut sums)
                .arg(&dts)
                .arg(&b_)
                .arg(&d_)
                .arg(&nc_);
            // SAFETY: matches `scan_combine`; one thread per (state, pair).
            unsafe { b.launch(grid_1d(pairs * n))? };
        }
        let (hin_c, hin_g, hin_n) = ((n * pairs) as i64, 1i64, pairs as i64);
        let output = dev.get_or_load_custom_func("scan_output", &m, ptx)?;
        let mut b = output.builder();
        push_scan_params!(
            b, xv, dv, bcv, bc_bs, bc_rs, b_off, c_off, zv, z_bs, z_rs, av, dsv, b_, l_, d_, cl_
        );
        b.arg(&sums)
            .arg(&hin_c)
            .arg(&hin_g)
            .arg(&hin_n)
            .arg(&mut h1)
            .arg(&mut y);
        // SAFETY: matches `scan_output` (SCAN_PARAMS, hin, strides, h1, y).
        unsafe { b.launch(cfg)? };
    }
    Ok((
        wrap(y, &dev, (batch * len, d)),
        wrap(h1, &dev, (batch, d, n)),
    ))
}

fn module(d_state: usize) -> String {
    format!("decimamba_mixer_n{d_state}")
}

fn ptx(dev: &CudaDevice, p: &MixerParams) -> Result<&'static str> {
    ptx_for(p.d_state, arch_of(dev))
}
