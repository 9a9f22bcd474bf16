//! CUDA kernels of the model (`cuda.kernels.cu`): the prefill mixer's causal conv + SiLU,
//! the keep rule's ‖Δ_t‖₂ scores and top-K, the chunked selective scan with softplus and gate fused,
//! the residual add + norm between blocks, and a decode step of four launches per layer.
//!
//! Activations stay in the model dtype (f32, bf16 or f16) from one GEMM to the next; the
//! recurrent state, the residual stream and all accumulation are f32. The kernels round
//! to the model dtype exactly where the unfused ops would (a GEMM's output, a cast before
//! a norm), so fusing changes no result beyond f32 summation order.
//!
//! The CUDA C source is compiled at run time with NVRTC, once per process, `d_state` and
//! dtype, and loaded into each device through candle's module cache. Why NVRTC rather
//! than nvcc in a build script: libnvrtc is already a run-time dependency of every candle
//! CUDA binary, so this needs no nvcc at build time (CI and `cargo check --features cuda`
//! stay toolkit-free), `d_state` and the dtype become compile-time constants (the state
//! lives in registers, unrolled loops), and the PTX targets the GPU actually present
//! instead of one architecture fixed at build time. The cost is a compile of ~100 ms on
//! first use. PTX written by a newer NVRTC than the driver supports is rejected by the
//! driver; scripts/gpu-check.sh uses the toolkit's NVRTC.
//!
//! Matmuls of a prefill stay candle ops (cuBLAS). Every tensor handed to a kernel here is
//! contiguous; row strides inside wider rows (z inside xz, B and C inside x_proj's output)
//! are passed explicitly.

use super::super::gpu_plan::{
    conv_tile, decode_blocks, decode_fits, decode_prefetch, decode_split, env_number,
    persistent_blocks, scan_chunks, scan_chunks_for, vec_ok, ScanKind, SingleScan, Work,
    DECODE_BLOCKS_PER_SM, DECODE_BLOCK_WARPS, DECODE_PREFETCH_FLOOR_MIB, DECODE_PREFETCH_MIB,
    MAX_DECODE_BATCH,
};
use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaFunction, CudaGraph, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Shape, Storage, Tensor};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

const SOURCE: &str = include_str!("cuda.kernels.cu");

/// Threads per block of the element-wise and scan kernels.
const BLOCK: u32 = 128;
/// Threads per block of the row kernels (norms, scores, decode matvecs).
const ROW_BLOCK: u32 = 256;

/// Largest d_state the scan keeps in registers.
const MAX_D_STATE: usize = 64;

fn check_d_state(d_state: usize) -> Result<()> {
    if d_state == 0 || d_state > MAX_D_STATE {
        bail!("the CUDA scan supports d_state 1..={MAX_D_STATE}, got {d_state}");
    }
    Ok(())
}

/// The kernels' `ELEM` for a model dtype.
fn elem_kind(dtype: DType) -> Result<u8> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => bail!("the CUDA kernels run in f32, bf16 or f16, not {other:?}"),
    }
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

/// Largest d_conv the conv kernels keep in registers.
const MAX_D_CONV: usize = 8;

type PtxKey = (usize, usize, u8, Option<&'static str>);

/// PTX of the kernels for one `d_state`, `d_conv`, dtype and architecture, compiled once
/// per process.
fn ptx_for(key: PtxKey) -> Result<&'static str> {
    type Cache = Mutex<HashMap<PtxKey, &'static str>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut map = CACHE
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| anyhow!("PTX cache poisoned"))?;
    if let Some(p) = map.get(&key) {
        return Ok(p);
    }
    let (d_state, d_conv, elem, arch) = key;
    check_d_state(d_state)?;
    if !(2..=MAX_D_CONV).contains(&d_conv) {
        bail!("the CUDA conv kernels support d_conv 2..={MAX_D_CONV}, got {d_conv}");
    }
    let mut options = vec![
        format!("-DNSTATE={d_state}"),
        format!("-DDCONV={d_conv}"),
        format!("-DELEM={elem}"),
        "-std=c++17".into(),
    ];
    if let ScanKind::Single(ss) = scan_kind()? {
        options.push(format!("-DSS_CHANNELS={}", ss.channels));
        options.push(format!("-DSS_ITEMS={}", ss.items));
    }
    // For tuning experiments: e.g. "-DSCAN_UNROLL=2 -DSCAN_MIN_BLOCKS=6".
    if let Ok(extra) = std::env::var("DECIMAMBA_NVRTC_FLAGS") {
        options.extend(extra.split_whitespace().map(String::from));
    }
    let opts = CompileOptions {
        arch,
        options,
        ..Default::default()
    };
    // For kernel experiments on a GPU machine without rebuilding: another source file.
    let source = match std::env::var_os("DECIMAMBA_CUDA_SOURCE") {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| anyhow!("DECIMAMBA_CUDA_SOURCE {}: {e}", path.to_string_lossy()))?,
        None => SOURCE.to_string(),
    };
    let ptx = compile_ptx_with_opts(source, opts)
        .map_err(|e| anyhow!("NVRTC could not compile the mixer kernels: {e:?}"))?;
    // A handful of variants per process at most: leaking is fine.
    let src: &'static str = Box::leak(ptx.to_src().into_boxed_str());
    map.insert(key, src);
    Ok(src)
}

/// What the kernels are compiled for: the model's d_state, d_conv and dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub d_state: usize,
    pub d_conv: usize,
    pub dtype: DType,
}

/// Name and PTX of the module for `v` on `dev`.
fn module_of(dev: &CudaDevice, v: Variant) -> Result<(String, &'static str)> {
    let elem = elem_kind(v.dtype)?;
    let ptx = ptx_for((v.d_state, v.d_conv, elem, arch_of(dev)))?;
    Ok((
        format!("decimamba_n{}_k{}_e{elem}", v.d_state, v.d_conv),
        ptx,
    ))
}

/// Loads kernel `name` of the module for a variant or anything with `.variant()`
/// (candle's `CudaFunc` is not nameable outside candle, hence a macro).
macro_rules! kernel {
    ($dev:expr, $name:expr, $p:expr) => {{
        let (module, ptx) = module_of($dev, $p.variant())?;
        $dev.get_or_load_custom_func($name, &module, ptx)?
    }};
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("expected a CUDA tensor, got one on {other:?}"),
    }
}

/// Device address of the first element of a contiguous CUDA tensor of dtype `want`.
///
/// The address is handed to a kernel launched on the device's one stream while `t` is
/// alive; candle frees device memory stream-ordered, so a tensor dropped after the launch
/// is enqueued is still valid when the kernel runs.
fn dptr(t: &Tensor, want: DType, what: &str) -> Result<u64> {
    if t.dtype() != want || !t.is_contiguous() {
        bail!(
            "CUDA kernel input {what} must be contiguous {want:?} (got {:?}{})",
            t.dtype(),
            if t.is_contiguous() { "" } else { ", strided" }
        );
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else {
        bail!("CUDA kernel input {what} is not on a CUDA device");
    };
    let stream = c.device.cuda_stream();
    let base = match want {
        DType::F32 => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => c.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
        DType::F16 => c.as_cuda_slice::<f16>()?.device_ptr(&stream).0,
        DType::U32 => c.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        other => bail!("no CUDA kernel takes {other:?}"),
    };
    Ok(base + (layout.start_offset() * want.size_in_bytes()) as u64)
}

/// An uninitialised tensor for a kernel to fill.
///
/// # Safety
/// Every element must be written by a kernel before the tensor is read.
unsafe fn alloc(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    let storage = match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<bf16>(n)?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<f16>(n)?, dev.clone()),
        other => bail!("cannot allocate {other:?} for a CUDA kernel"),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, ROW_BLOCK threads per block.
fn grid_warps(rows: usize) -> LaunchConfig {
    let per_block = (ROW_BLOCK / 32) as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(per_block).max(1) as u32, 1, 1),
        block_dim: (ROW_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn grid_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (ROW_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `func` with the arguments pushed in order.
macro_rules! launch {
    ($func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let func = $func;
        let mut b = func.builder();
        $( b.arg($arg); )*
        // SAFETY: every call site passes the arguments in the order and with the types of
        // the kernel it names in cuda.kernels.cu, device addresses of live tensors sized
        // for the dimensions passed alongside them.
        unsafe { b.launch($cfg) }?;
    }};
}

/// Whether the decode step launches its kernels with programmatic dependent launch
/// (sm_90+; `DECIMAMBA_CUDA_PDL=0` turns it off): each may start, and issue its first
/// weight loads, while the one before it finishes (the kernels' `griddep_wait`).
fn pdl_enabled(dev: &CudaDevice) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let cc = dev.cuda_stream().context().compute_capability();
        std::env::var("DECIMAMBA_CUDA_PDL").map_or(true, |v| v != "0")
            && cc.is_ok_and(|(major, _)| major >= 9)
    })
}

/// The most blocks a decode matvec launches: the device's SMs times
/// `DECIMAMBA_DECODE_BLOCKS_PER_SM` (default gpu_plan::DECODE_BLOCKS_PER_SM; 0: one block
/// per group of rows, however many).
fn decode_max_blocks(dev: &CudaDevice) -> Result<usize> {
    static MAX: OnceLock<Result<usize, String>> = OnceLock::new();
    MAX.get_or_init(|| {
        let name = "DECIMAMBA_DECODE_BLOCKS_PER_SM";
        let per_sm = env_number::<usize>(name, std::env::var(name).ok().as_deref())?
            .unwrap_or(DECODE_BLOCKS_PER_SM);
        let sms = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| format!("reading the device's SM count: {e}"))?;
        Ok(per_sm * sms.max(1) as usize)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Bytes the decode step's weight prefetches lead by: [`set_decode_prefetch_mib`]'s, else
/// `DECIMAMBA_DECODE_PREFETCH_MB` MiB (default gpu_plan::DECODE_PREFETCH_MIB).
fn decode_prefetch_lead() -> Result<u64> {
    static LEAD: OnceLock<Result<u64, String>> = OnceLock::new();
    match PREFETCH_OVERRIDE.load(Ordering::Relaxed) {
        0 => {}
        set => return Ok(set - 1),
    }
    env_mib(&LEAD, "DECIMAMBA_DECODE_PREFETCH_MB", DECODE_PREFETCH_MIB)
}

/// The decode prefetch windows' floor in bytes (gpu_plan::decode_prefetch):
/// `DECIMAMBA_DECODE_PREFETCH_FLOOR_MB` MiB (default gpu_plan::DECODE_PREFETCH_FLOOR_MIB).
fn decode_prefetch_floor() -> Result<u64> {
    static FLOOR: OnceLock<Result<u64, String>> = OnceLock::new();
    env_mib(
        &FLOOR,
        "DECIMAMBA_DECODE_PREFETCH_FLOOR_MB",
        DECODE_PREFETCH_FLOOR_MIB,
    )
}

/// A size in MiB from the environment variable `name` (else `default`), in bytes, read once.
fn env_mib(cell: &OnceLock<Result<u64, String>>, name: &str, default: f64) -> Result<u64> {
    cell.get_or_init(|| {
        let mib = env_number::<f64>(name, std::env::var(name).ok().as_deref())?.unwrap_or(default);
        if !(mib.is_finite() && mib >= 0.0) {
            return Err(format!("{name}={mib} must be a size in MiB, 0 or more"));
        }
        Ok((mib * 1048576.0) as u64)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// [`set_decode_prefetch_mib`]'s lead in bytes plus one; 0: none set.
static PREFETCH_OVERRIDE: AtomicU64 = AtomicU64::new(0);

/// Overrides the decode prefetch lead for the process (`None`: as the environment says).
pub fn set_decode_prefetch_mib(mib: Option<f64>) {
    let bytes = mib.map_or(0, |m| (m.max(0.0) * 1048576.0) as u64 + 1);
    PREFETCH_OVERRIDE.store(bytes, Ordering::Relaxed);
}

/// Launches `func` on the device's stream allowing it to overlap the kernel before it
/// (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION).
///
/// # Safety
/// As a kernel launch: `params` point at the kernel's arguments, in order and of its
/// parameter types, alive until the call returns; and the kernel calls `griddep_wait`
/// before it reads anything the kernels before it write.
unsafe fn launch_dependent(
    dev: &CudaDevice,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { launch_ex(dev, func, cfg, params, false) }
}

/// `cuLaunchKernelEx` with one attribute: programmatic stream serialization, or
/// cooperative (every block resident at once, or the launch fails) when `cooperative`.
///
/// # Safety
/// As [`launch_dependent`]; a cooperative kernel may wait on other blocks of its grid.
unsafe fn launch_ex(
    dev: &CudaDevice,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
    cooperative: bool,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: a zeroed attribute is a valid value of the plain C struct; its id and the
    // union member for that id are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    if cooperative {
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
        attr.value.cooperative = 1;
    } else {
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: dev.cuda_stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: the caller's contract; config and attr outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()?;
    }
    Ok(())
}

/// The argument pointers `cuLaunchKernelEx` takes, each pointing at a live local.
macro_rules! kernel_params {
    ($($arg:expr),* $(,)?) => {{
        let params: Vec<*mut std::ffi::c_void> =
            vec![$( ($arg) as *const _ as *mut std::ffi::c_void ),*];
        params
    }};
}

/// A decode kernel's launch: dependent (may overlap its predecessor) when `$pdl`.
macro_rules! launch_step {
    ($dev:expr, $pdl:expr, $func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let func = $func;
        if $pdl {
            let mut params = kernel_params!($($arg),*);
            // SAFETY: as `launch!`; every decode kernel waits (griddep_wait) before it
            // reads what earlier kernels of the step write.
            unsafe { launch_dependent($dev, &func, $cfg, &mut params) }?;
        } else {
            launch!(func, $cfg, $($arg),*);
        }
    }};
}

/// Per-layer constants of the mixer on the device (f32), and the model dtype.
#[derive(Debug, Clone)]
pub struct MixerParams {
    /// Conv taps, tap-major `[d_conv, d_inner]`.
    pub conv_weight_t: Tensor,
    pub conv_bias: Tensor,
    pub dt_bias: Tensor,
    /// A = −exp(A_log), `[d_inner, d_state]`.
    pub a: Tensor,
    pub d_skip: Tensor,
    /// The vanilla plan's Δ scale (ones) and filter (−∞), `[d_inner]`.
    pub unit_scale: Tensor,
    pub no_filter: Tensor,
    /// The last rescaled A uploaded, by the bits of its A_log scale: a policy's A is the
    /// same on every call, and its upload (d_inner·d_state floats per layer) would
    /// otherwise cost more than a short prefill's kernels.
    pub scaled_a: std::sync::Arc<std::sync::Mutex<Option<(u32, Tensor)>>>,
    pub d_state: usize,
    /// The dtype activations travel in.
    pub dtype: DType,
}

/// A layer plan as kernel arguments (f32 on the device): the Δ scale and threshold per
/// channel, and A. Vanilla borrows the layer's constants; a plan uploads d_inner floats
/// (and d_inner·d_state for a rescaled A), not a full-length pass.
pub struct DevicePlan {
    pub delta_scale: Tensor,
    pub delta_filter: Tensor,
    pub a: Tensor,
}

impl DevicePlan {
    /// `a`: A under the plan, on the host (`[d_inner, d_state]`), computed only when the
    /// plan rescales A_log by a scale not uploaded before.
    pub fn new<'a>(
        p: &MixerParams,
        plan: &crate::policy::LayerPlan,
        a: impl FnOnce() -> std::borrow::Cow<'a, [f32]>,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let d = p.dt_bias.dim(0)?;
        let delta_scale = match &plan.delta_scale {
            None => p.unit_scale.clone(),
            Some(s) => {
                let v: Vec<f32> = (0..d).map(|c| s.of(c)).collect();
                Tensor::from_vec(v, d, dev)?
            }
        };
        let delta_filter = match &plan.delta_filter {
            None => p.no_filter.clone(),
            Some(t) => Tensor::from_slice(t, d, dev)?,
        };
        let a = match plan.a_log_scale {
            None => p.a.clone(),
            Some(scale) => {
                let mut cached = p
                    .scaled_a
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the scaled-A cache was poisoned"))?;
                match cached.as_ref() {
                    Some((bits, t)) if *bits == scale.to_bits() => t.clone(),
                    _ => {
                        let t = Tensor::from_slice(&a(), p.a.dims2()?, dev)?;
                        *cached = Some((scale.to_bits(), t.clone()));
                        t
                    }
                }
            }
        };
        Ok(Self {
            delta_scale,
            delta_filter,
            a,
        })
    }
}

impl MixerParams {
    pub fn variant(&self) -> Variant {
        Variant {
            d_state: self.d_state,
            d_conv: self.conv_weight_t.dims2().map_or(0, |d| d.0),
            dtype: self.dtype,
        }
    }
}

impl Variant {
    fn variant(self) -> Variant {
        self
    }
}

/// A norm's weights on the device (model dtype); `bias` only for LayerNorm.
#[derive(Debug, Clone, Copy)]
pub struct NormRef<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub eps: f32,
}

impl NormRef<'_> {
    fn ptrs(&self, dtype: DType) -> Result<(u64, u64)> {
        Ok((
            dptr(self.weight, dtype, "norm weight")?,
            opt_ptr(self.bias, dtype, "norm bias")?,
        ))
    }
}

fn opt_ptr(t: Option<&Tensor>, dtype: DType, what: &str) -> Result<u64> {
    t.map_or(Ok(0), |t| dptr(t, dtype, what))
}

/// Between two blocks of a prefill: `residual` (`[rows, d]`, f32) plus the previous
/// mixer's output `delta` (model dtype `p.dtype`; rounded to it when `round_res`, i.e. the residual
/// is not kept in f32), then `norm` of the sum in the model dtype when `norm_out`.
/// Returns (new residual, normed).
pub fn add_norm(
    residual: &Tensor,
    delta: Option<&Tensor>,
    norm: NormRef,
    p: &MixerParams,
    round_res: bool,
    norm_out: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = cuda_device(residual)?;
    let dtype = p.dtype;
    let (rows, d) = residual.dims2()?;
    let rp = dptr(residual, DType::F32, "residual")?;
    let dp = opt_ptr(delta, dtype, "mixer output")?;
    let (wp, bp) = norm.ptrs(dtype)?;
    // SAFETY: the kernel writes every element of each output it is given.
    let new_res = match delta {
        Some(_) => Some(unsafe { alloc(&dev, DType::F32, (rows, d))? }),
        None => None,
    };
    let normed = match norm_out {
        true => Some(unsafe { alloc(&dev, dtype, (rows, d))? }),
        false => None,
    };
    let nrp = opt_ptr(new_res.as_ref(), DType::F32, "residual")?;
    let op = opt_ptr(normed.as_ref(), dtype, "normed")?;
    let (rows_, d_, eps, rr) = (rows as i32, d as i32, norm.eps, round_res as i32);
    launch!(
        kernel!(&dev, "add_norm", p),
        grid_warps(rows),
        &rp,
        &dp,
        &nrp,
        &wp,
        &bp,
        &op,
        &rows_,
        &d_,
        &eps,
        &rr
    );
    Ok((new_res.unwrap_or_else(|| residual.clone()), normed))
}

/// Causal depthwise conv + SiLU of `len` tokens of `batch` rows whose input x is the first
/// `d` columns of `xz` (`[batch·len, 2d]`, model dtype), continuing from `hist`
/// (`[batch, k−1, d]`, f32). Returns x after conv+SiLU `[batch·len, d]` (model dtype)
/// and the new window.
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
    let xp = dptr(xz, p.dtype, "xz")?;
    let hp = dptr(hist, DType::F32, "conv state")?;
    let wp = dptr(&p.conv_weight_t, DType::F32, "conv weight")?;
    let bp = dptr(&p.conv_bias, DType::F32, "conv bias")?;
    // SAFETY: the kernel writes every element of both outputs.
    let out = unsafe { alloc(&dev, p.dtype, (batch * len, d))? };
    let new_hist = unsafe { alloc(&dev, DType::F32, (batch, k - 1, d))? };
    let (op, nhp) = (
        dptr(&out, p.dtype, "conv out")?,
        dptr(&new_hist, DType::F32, "conv state")?,
    );
    let (bs, rs) = ((len * row) as i64, row as i64);
    let tile = conv_tile(len);
    let (l_, d_, tile_) = (len as i32, d as i32, tile as i32);
    let cfg = LaunchConfig {
        grid_dim: (
            d.div_ceil(BLOCK as usize) as u32,
            len.div_ceil(tile) as u32,
            batch as u32,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        kernel!(&dev, "conv_silu", p),
        cfg,
        &xp,
        &bs,
        &rs,
        &hp,
        &wp,
        &bp,
        &op,
        &nhp,
        &l_,
        &d_,
        &tile_
    );
    Ok((out, new_hist))
}

/// The keep rule's score of each token: ‖Δ_t‖₂ over channels with Δ under `plan`, for
/// `dt` `[rows, d_inner]` (model dtype). Returns `[rows]` f32.
pub fn delta_norms(dt: &Tensor, p: &MixerParams, plan: &DevicePlan) -> Result<Tensor> {
    let dev = cuda_device(dt)?;
    let (rows, d) = dt.dims2()?;
    let dtp = dptr(dt, p.dtype, "dt")?;
    let bp = dptr(&p.dt_bias, DType::F32, "dt bias")?;
    let scp = dptr(&plan.delta_scale, DType::F32, "delta scale")?;
    let thp = dptr(&plan.delta_filter, DType::F32, "delta filter")?;
    // SAFETY: one block per row writes its score.
    let out = unsafe { alloc(&dev, DType::F32, rows)? };
    let op = dptr(&out, DType::F32, "scores")?;
    let d_ = d as i32;
    launch!(
        kernel!(&dev, "delta_norms", p),
        grid_rows(rows),
        &dtp,
        &bp,
        &scp,
        &thp,
        &op,
        &d_
    );
    Ok(out)
}

/// The keep rule's positions on the GPU: the `keep` highest of `scores[..candidates]`
/// (`[len]`, f32 ≥ 0; ties to the earlier position, as [`crate::policy::select::select_by_scores`]),
/// ascending, then the protected tail `candidates..len`. Returns `[keep + len − candidates]`
/// u32 indices, still on the device: the gather needs no host round trip.
pub fn select_top_k(scores: &Tensor, candidates: usize, keep: usize, v: Variant) -> Result<Tensor> {
    let dev = cuda_device(scores)?;
    let len = scores.dim(0)?;
    if keep == 0 || keep >= candidates || candidates > len {
        bail!("top-k of {keep} among {candidates} of {len} tokens is not a selection");
    }
    let sp = dptr(scores, DType::F32, "scores")?;
    // SAFETY: the kernel writes all keep + (len − candidates) indices.
    let out = unsafe { dev.alloc::<u32>(keep + len - candidates)? };
    let op = out.device_ptr(&dev.cuda_stream()).0;
    let (c_, k_, l_) = (candidates as i32, keep as i32, len as i32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        kernel!(&dev, "select_top_k", v),
        cfg,
        &sp,
        &c_,
        &k_,
        &l_,
        &op
    );
    let n = out.len();
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
}

/// Inputs of [`selective_scan`]: contiguous, on one CUDA device, in the model dtype
/// except `h0`.
pub struct ScanArgs<'a> {
    pub batch: usize,
    pub len: usize,
    /// x after conv + SiLU, `[batch·len, d_inner]`.
    pub x: &'a Tensor,
    /// dt_proj's output before bias and softplus, `[batch·len, d_inner]`.
    pub dt: &'a Tensor,
    /// Rows `[batch·len, w]` holding B at columns `b_offset..` and C at `c_offset..`.
    pub bc: &'a Tensor,
    pub b_offset: usize,
    pub c_offset: usize,
    /// Rows `[batch·len, w]` holding the gate z at columns `z_offset..z_offset+d_inner`.
    pub z: &'a Tensor,
    pub z_offset: usize,
    /// Initial state `[batch, d_inner, d_state]`, f32.
    pub h0: &'a Tensor,
}

/// What a pass of the scan over `tokens` steps of `d` channels and `n` states does (the
/// output pass also reads C and z, gates, and writes y): per step and state an exp2, and a
/// multiply, a multiply-add and a multiply (+ a multiply-add into y) on the f32 pipe; per
/// step and channel the softplus (two SFU results, two more for the gate's SiLU).
fn scan_work(tokens: f64, d: usize, n: usize, elem_bytes: usize, output: bool) -> Work {
    let (d, n, eb) = (d as f64, n as f64, elem_bytes as f64);
    let (flops, sfu, rows, cols) = match output {
        false => (5.0, 2.0, 2.0, 1.0),
        true => (7.0, 4.0, 4.0, 2.0),
    };
    Work {
        tensor_flops: 0.0,
        fp32_flops: flops * tokens * d * n,
        exps: tokens * d * (n + sfu),
        bytes: eb * tokens * (rows * d + cols * n),
    }
}

/// `DECIMAMBA_SCAN_TARGET_THREADS`: the threads the scan's time chunks aim at, for tuning
/// (default gpu_plan::SCAN_TARGET_THREADS).
fn scan_target_threads() -> Result<Option<usize>> {
    static TARGET: OnceLock<Result<Option<usize>, String>> = OnceLock::new();
    let name = "DECIMAMBA_SCAN_TARGET_THREADS";
    TARGET
        .get_or_init(|| env_number(name, std::env::var(name).ok().as_deref()))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// `DECIMAMBA_SCAN`: which prefill scan runs (gpu_plan::ScanKind; default chunked).
fn scan_kind() -> Result<ScanKind> {
    static KIND: OnceLock<Result<ScanKind, String>> = OnceLock::new();
    let name = "DECIMAMBA_SCAN";
    KIND.get_or_init(|| match std::env::var(name) {
        Ok(v) => ScanKind::parse(name, &v),
        Err(_) => Ok(ScanKind::Chunked),
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The single-pass scan's block when it is chosen and its tiles fit the device's shared
/// memory at `d_state`; otherwise the chunked scan runs.
fn single_scan(dev: &CudaDevice, d_state: usize) -> Result<Option<SingleScan>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as Attr;
    Ok(match scan_kind()? {
        ScanKind::Single(ss) => {
            let optin = Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
            let max_smem = dev.cuda_stream().context().attribute(optin)?;
            ss.fits(d_state, max_smem.max(0) as usize).then_some(ss)
        }
        ScanKind::Chunked => None,
    })
}

/// The selective scan with fused discretisation, softplus, the plan's Δ scale and
/// filter, and gating. Returns the gated output `[batch·len, d_inner]` (model dtype) and
/// the final state `[batch, d_inner, d_state]` (f32).
pub fn selective_scan(
    s: &ScanArgs,
    p: &MixerParams,
    plan: &DevicePlan,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(s.x)?;
    let (d, n) = plan.a.dims2()?;
    let (batch, len) = (s.batch, s.len);
    let et = p.dtype;
    let eb = et.size_in_bytes();

    // Cut the time axis into chunks until the GPU is full (see the kernels' comment).
    let pairs = batch * d;
    let (n_chunks, chunk_len) = match scan_target_threads()? {
        Some(target) => scan_chunks_for(batch, d, len, target),
        None => scan_chunks(batch, d, len),
    };

    let (bc_w, z_w) = (s.bc.dim(1)?, s.z.dim(1)?);
    let xp = dptr(s.x, et, "x")?;
    let dtp = dptr(s.dt, et, "dt")?;
    let dbp = dptr(&p.dt_bias, DType::F32, "dt bias")?;
    let scp = dptr(&plan.delta_scale, DType::F32, "delta scale")?;
    let thp = dptr(&plan.delta_filter, DType::F32, "delta filter")?;
    let bcp = dptr(s.bc, et, "B/C")?;
    let zp = dptr(s.z, et, "z")? + (s.z_offset * et.size_in_bytes()) as u64;
    let ap = dptr(&plan.a, DType::F32, "A")?;
    let dsp = dptr(&p.d_skip, DType::F32, "D")?;
    let hp = dptr(s.h0, DType::F32, "ssm state")?;
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
        grid_dim: (
            d.div_ceil(BLOCK as usize) as u32,
            n_chunks as u32,
            batch as u32,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the output pass writes every y element and every final-state element.
    let y = unsafe { alloc(&dev, et, (batch * len, d))? };
    let h1 = unsafe { alloc(&dev, DType::F32, (batch, d, n))? };
    let (yp, h1p) = (dptr(&y, et, "y")?, dptr(&h1, DType::F32, "state")?);
    // Both passes take the SCAN_PARAMS arguments first, then their own.
    macro_rules! scan_pass {
        ($name:expr, $cfg:expr, $($extra:expr),*) => {
            launch!(
                kernel!(&dev, $name, p), $cfg, &xp, &dtp, &dbp, &scp, &thp, &bcp, &bc_bs, &bc_rs, &b_off,
                &c_off, &zp, &z_bs, &z_rs, &ap, &dsp, &b_, &l_, &d_, &cl_, $($extra),*
            )
        };
    }
    if let Some(ss) = single_scan(&dev, n)? {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute as FnAttr;
        let (gx, gy, gz) = ss.grid(batch, d);
        let smem = ss.smem_bytes(n);
        let single = LaunchConfig {
            grid_dim: (gx as u32, gy as u32, gz as u32),
            block_dim: ((32 * ss.channels) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // More than 48 KiB of dynamic shared memory needs the function's opt-in.
        kernel!(&dev, "scan_single", p).set_attribute(
            FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
        scan_pass!("scan_single", single, &hp, &h1p, &yp);
        let tokens = (batch * len) as f64;
        profile::lap_on(&dev, "scan: single pass", scan_work(tokens, d, n, eb, true));
        return Ok((y, h1));
    }
    // Initial state of each chunk: h0 itself for one chunk, else the combined summaries.
    let (sums, hin, hin_c, hin_g, hin_n) = if n_chunks == 1 {
        (None, hp, 0i64, n as i64, 1i64)
    } else {
        // SAFETY: the summary pass writes slots 0..n_chunks−1 of both; the combine pass
        // reads those and writes every slot of S.
        let sums = unsafe { alloc(&dev, DType::F32, n_chunks * n * pairs)? };
        let dts = unsafe { alloc(&dev, DType::F32, n_chunks * pairs)? };
        let (sp, tp) = (dptr(&sums, DType::F32, "S")?, dptr(&dts, DType::F32, "T")?);
        let mut c = cfg;
        c.grid_dim.1 = (n_chunks - 1) as u32;
        scan_pass!("scan_chunk_summary", c, &sp, &tp);
        let covered = (batch * (n_chunks - 1) * chunk_len) as f64;
        let states = (n_chunks * pairs * n) as f64;
        profile::lap_on(&dev, "scan: summaries", scan_work(covered, d, n, eb, false));
        launch!(
            kernel!(&dev, "scan_combine", p),
            grid_1d(pairs * n),
            &ap,
            &hp,
            &sp,
            &tp,
            &b_,
            &d_,
            &nc_
        );
        let combine = Work {
            exps: states,
            bytes: 4.0 * (2.0 * states + (n_chunks * pairs) as f64),
            ..Work::default()
        };
        profile::lap_on(&dev, "scan: combine", combine);
        (
            Some((sums, dts)),
            sp,
            (n * pairs) as i64,
            1i64,
            pairs as i64,
        )
    };
    scan_pass!("scan_output", cfg, &hin, &hin_c, &hin_g, &hin_n, &h1p, &yp);
    let tokens = (batch * len) as f64;
    profile::lap_on(&dev, "scan: output", scan_work(tokens, d, n, eb, true));
    drop(sums);
    Ok((y, h1))
}

/// One layer's weights for the fused decode step (model dtype unless said).
pub struct DecodeLayer<'a> {
    pub norm: NormRef<'a>,
    /// `[2·d_inner, d_model]` and its bias.
    pub in_proj: (&'a Tensor, Option<&'a Tensor>),
    /// `[dt_rank + 2·d_state, d_inner]`.
    pub x_proj: &'a Tensor,
    /// `[d_inner, dt_rank]`.
    pub dt_proj: &'a Tensor,
    /// `[d_model, d_inner]` and its bias.
    pub out_proj: (&'a Tensor, Option<&'a Tensor>),
    pub params: &'a MixerParams,
    /// The layer's conv window `[batch, d_conv−1, d_inner]` and SSM state
    /// `[batch, d_inner, d_state]` (f32), updated in place.
    pub conv: &'a Tensor,
    pub ssm: &'a Tensor,
}

/// The model as the fused decode step sees it.
pub struct DecodeModel<'a> {
    pub embedding: &'a Tensor,
    pub layers: Vec<DecodeLayer<'a>>,
    pub norm_f: NormRef<'a>,
    pub lm_head: &'a Tensor,
    pub dtype: DType,
    /// Round the residual stream to the model dtype (the checkpoint keeps it there).
    pub round_res: bool,
}

/// Sizes of one decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DecodeDims {
    batch: usize,
    vocab: usize,
    d_model: usize,
    d_inner: usize,
    dt_rank: usize,
    /// Width of x_proj's output (dt_rank + 2·d_state).
    xw: usize,
}

impl DecodeDims {
    fn of(m: &DecodeModel, batch: usize) -> Result<Self> {
        let (vocab, d_model) = m.embedding.dims2()?;
        let first = m
            .layers
            .first()
            .ok_or_else(|| anyhow!("model has no layers"))?;
        let (d_inner, dt_rank) = first.dt_proj.dims2()?;
        if !decode_fits(batch, d_model, d_inner) {
            bail!("the fused decode step takes 1..={MAX_DECODE_BATCH} sequences of this width");
        }
        Ok(Self {
            batch,
            vocab,
            d_model,
            d_inner,
            dt_rank,
            xw: first.x_proj.dim(0)?,
        })
    }
}

/// The activations of one decode step, reused from step to step (and baked into the
/// step's CUDA graph). 16-bit activations are held as bytes: kernels take addresses.
struct DecodeBuffers {
    ids: CudaSlice<u32>,
    residual: CudaSlice<f32>,
    xz: CudaSlice<u8>,
    xc: CudaSlice<u8>,
    dbc: CudaSlice<u8>,
    y: CudaSlice<u8>,
    logits: CudaSlice<f32>,
    /// The persistent step's layer table (LayerPtrs::table_row) and its barrier count.
    layer_table: CudaSlice<u64>,
    barrier: CudaSlice<u32>,
    /// Whether the step runs as the persistent launch (its table is filled).
    persistent: bool,
    /// The per-stage kernels' L2 prefetches (gpu_plan::decode_prefetch): (address, bytes)
    /// pairs, and each weight-reading kernel's first pair and count, in launch order.
    prefetch_ranges: CudaSlice<u64>,
    prefetch_spans: Vec<(usize, usize)>,
}

/// Device addresses of [`DecodeBuffers`].
struct DecodePtrs {
    ids: u64,
    residual: u64,
    xz: u64,
    xc: u64,
    dbc: u64,
    y: u64,
    logits: u64,
    layer_table: u64,
    barrier: u64,
    persistent: bool,
    /// Each weight-reading kernel's prefetch table address and count (DecodeBuffers).
    prefetch: Vec<(u64, i32)>,
}

impl DecodeBuffers {
    fn new(dev: &CudaDevice, m: &DecodeModel, d: &DecodeDims) -> Result<Self> {
        let e = m.dtype.size_in_bytes();
        let b = d.batch;
        // Only the persistent step reads the table: the per-stage kernels get one zero row.
        // The choice is made once here, so a step never mixes the two.
        let persistent = persistent_decode();
        let mut table = vec![0u64; 16];
        if persistent {
            table.clear();
            for l in &m.layers {
                table.extend(LayerPtrs::of(l, m.dtype)?.table_row(d, e));
            }
        }
        let layer_table = dev.cuda_stream().clone_htod(&table)?;
        let barrier = dev.cuda_stream().alloc_zeros::<u32>(1)?;
        let (lead, floor) = (decode_prefetch_lead()?, decode_prefetch_floor()?);
        let plan = decode_prefetch(&Self::weight_streams(m, d)?, lead, floor);
        let mut pairs: Vec<u64> = plan.ranges.iter().flat_map(|&(a, n)| [a, n]).collect();
        if pairs.is_empty() {
            pairs.resize(2, 0);
        }
        let prefetch_ranges = dev.cuda_stream().clone_htod(&pairs)?;
        // SAFETY: each kernel of a step writes its output buffer before the next reads it
        // (embed_rows the residual, in_proj xz, ...); ids are copied in before the step.
        unsafe {
            Ok(Self {
                ids: dev.alloc::<u32>(b)?,
                residual: dev.alloc::<f32>(b * d.d_model)?,
                xz: dev.alloc::<u8>(b * 2 * d.d_inner * e)?,
                xc: dev.alloc::<u8>(b * d.d_inner * e)?,
                dbc: dev.alloc::<u8>(b * d.xw * e)?,
                y: dev.alloc::<u8>(b * d.d_inner * e)?,
                logits: dev.alloc::<f32>(b * d.vocab)?,
                layer_table,
                barrier,
                persistent,
                prefetch_ranges,
                prefetch_spans: plan.spans,
            })
        }
    }

    /// The (address, bytes) of the weights each weight-reading kernel of the per-stage step
    /// reads, in launch order: per layer in_proj, x_proj, dt_proj (the scan step), out_proj;
    /// then the LM head.
    fn weight_streams(m: &DecodeModel, d: &DecodeDims) -> Result<Vec<(u64, u64)>> {
        let et = m.dtype;
        let eb = et.size_in_bytes() as u64;
        let (dm, di) = (d.d_model as u64, d.d_inner as u64);
        let mut streams = Vec::with_capacity(4 * m.layers.len() + 1);
        for l in &m.layers {
            let p = LayerPtrs::of(l, et)?;
            streams.extend([
                (p.in_w, 2 * di * dm * eb),
                (p.x_w, d.xw as u64 * di * eb),
                (p.dt_w, di * d.dt_rank as u64 * eb),
                (p.out_w, dm * di * eb),
            ]);
        }
        streams.push((dptr(m.lm_head, et, "lm_head")?, d.vocab as u64 * dm * eb));
        Ok(streams)
    }

    fn ptrs(&self, dev: &CudaDevice) -> DecodePtrs {
        let s = dev.cuda_stream();
        let base = self.prefetch_ranges.device_ptr(&s).0;
        let prefetch = self
            .prefetch_spans
            .iter()
            .map(|&(first, n)| (base + 16 * first as u64, n as i32))
            .collect();
        let ptrs = DecodePtrs {
            ids: self.ids.device_ptr(&s).0,
            residual: self.residual.device_ptr(&s).0,
            xz: self.xz.device_ptr(&s).0,
            xc: self.xc.device_ptr(&s).0,
            dbc: self.dbc.device_ptr(&s).0,
            y: self.y.device_ptr(&s).0,
            logits: self.logits.device_ptr(&s).0,
            layer_table: self.layer_table.device_ptr(&s).0,
            barrier: self.barrier.device_ptr(&s).0,
            persistent: self.persistent,
            prefetch,
        };
        ptrs
    }
}

/// A captured decode step: its CUDA graph, the buffers it reads and writes, and what it
/// was captured for (batch and the address of every layer state).
pub struct DecodeGraph {
    key: Vec<u64>,
    graph: GraphCell,
    bufs: DecodeBuffers,
}

/// cudarc's graph is not `Send` because CUDA graph objects are not internally
/// synchronised; every use of it here happens under the [`DecodeCache`] mutex.
struct GraphCell(CudaGraph);
// SAFETY: see above: the graph is only reached through a `Mutex`, which serialises all
// API calls on it, as the CUDA docs require.
unsafe impl Send for GraphCell {}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodeGraph(batch {})", self.key.first().unwrap_or(&0))
    }
}

/// The model's captured decode step, rebuilt when the batch or the states change.
pub type DecodeCache = Mutex<Option<DecodeGraph>>;

/// Whether decode steps replay a CUDA graph (`DECIMAMBA_CUDA_GRAPHS=0` turns it off),
/// and stay off after a capture failed.
static GRAPHS_OFF: AtomicBool = AtomicBool::new(false);

fn graphs_enabled() -> bool {
    static ENV_OFF: OnceLock<bool> = OnceLock::new();
    let env_off = *ENV_OFF.get_or_init(|| {
        std::env::var("DECIMAMBA_CUDA_GRAPHS").is_ok_and(|v| v == "0" || v == "off")
    });
    !env_off && !GRAPHS_OFF.load(Ordering::Relaxed)
}

/// One decode step of `ids` (one token per sequence): embedding, per layer norm, in_proj
/// and conv step, x_proj, dt_proj + scan step + gate, out_proj + residual add; final norm and
/// LM head; states updated in place. With a `cache`, the step's 2 + 4·n_layer launches are
/// captured once into a CUDA graph and replayed (one launch per token). Returns the logits
/// `[batch, vocab]`, f32.
pub fn decode_step(m: &DecodeModel, ids: &[u32], cache: Option<&DecodeCache>) -> Result<Tensor> {
    let dev = cuda_device(m.embedding)?;
    let dims = DecodeDims::of(m, ids.len())?;
    let stream = dev.cuda_stream();
    let logits_of = |src: &CudaSlice<f32>| -> Result<Tensor> {
        // SAFETY: filled by the copy right below.
        let mut out = unsafe { dev.alloc::<f32>(dims.batch * dims.vocab)? };
        stream.memcpy_dtod(src, &mut out)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            (dims.batch, dims.vocab),
            BackpropOp::none(),
            false,
        ))
    };
    // Profiling times each kernel with events, which a graph replay would not show.
    if let Some(cache) = cache.filter(|_| graphs_enabled() && !profile::enabled()) {
        let mut key = vec![
            dims.batch as u64,
            persistent_decode() as u64,
            decode_prefetch_lead()?,
        ];
        for l in &m.layers {
            key.push(dptr(l.conv, DType::F32, "conv state")?);
            key.push(dptr(l.ssm, DType::F32, "ssm state")?);
        }
        let mut slot = cache
            .lock()
            .map_err(|_| anyhow!("decode graph cache poisoned"))?;
        if slot.as_ref().is_none_or(|g| g.key != key) {
            *slot = None;
            *slot = capture(m, &dev, &dims, key)?;
        }
        if let Some(g) = slot.as_mut() {
            stream.memcpy_htod(ids, &mut g.bufs.ids)?;
            g.graph.0.launch()?;
            return logits_of(&g.bufs.logits);
        }
    }
    let mut bufs = DecodeBuffers::new(&dev, m, &dims)?;
    stream.memcpy_htod(ids, &mut bufs.ids)?;
    let mut timer = match profile::enabled() {
        true => Some(StepTimer::new(&dev)?),
        false => None,
    };
    enqueue_step(m, &dev, &dims, &bufs.ptrs(&dev), &mut timer)?;
    if let Some(t) = timer {
        t.book()?;
    }
    logits_of(&bufs.logits)
}

/// Captures a decode step into a graph. `Ok(None)` (and graphs off for the process) when
/// the driver refuses the capture; the caller then launches the kernels directly.
fn capture(
    m: &DecodeModel,
    dev: &CudaDevice,
    dims: &DecodeDims,
    key: Vec<u64>,
) -> Result<Option<DecodeGraph>> {
    let bufs = DecodeBuffers::new(dev, m, dims)?;
    let first = m
        .layers
        .first()
        .ok_or_else(|| anyhow!("model has no layers"))?;
    // Load the module before capturing: nothing but launches should happen inside.
    let _ = kernel!(dev, "embed_rows", first.params);
    let stream = dev.cuda_stream();
    stream.synchronize()?;
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    if stream.begin_capture(mode).is_err() {
        GRAPHS_OFF.store(true, Ordering::Relaxed);
        return Ok(None);
    }
    let launched = enqueue_step(m, dev, dims, &bufs.ptrs(dev), &mut None);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    if launched.is_err() {
        // A launch the capture refused (or a real error, which the direct launch that
        // follows reports).
        GRAPHS_OFF.store(true, Ordering::Relaxed);
        return Ok(None);
    }
    match graph {
        Ok(Some(graph)) => {
            graph.upload()?;
            Ok(Some(DecodeGraph {
                key,
                graph: GraphCell(graph),
                bufs,
            }))
        }
        _ => {
            GRAPHS_OFF.store(true, Ordering::Relaxed);
            Ok(None)
        }
    }
}

/// Per-kernel GPU times of a decode step under `DECIMAMBA_CUDA_PROFILE=1`: an event after
/// each kernel (which keeps dependent launches from overlapping), booked as profile stages
/// "decode: …" once the step has run.
struct StepTimer {
    dev: CudaDevice,
    start: CudaEvent,
    marks: Vec<(&'static str, CudaEvent, Work)>,
}

impl StepTimer {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let start = dev
            .cuda_stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(StepTimer {
            dev: dev.clone(),
            start,
            marks: Vec::new(),
        })
    }

    /// Ends the kernel just launched: stage `name`, which did `work`.
    fn mark(&mut self, name: &'static str, work: Work) -> Result<()> {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let event = self.dev.cuda_stream().record_event(flags)?;
        self.marks.push((name, event, work));
        Ok(())
    }

    fn book(self) -> Result<()> {
        let mut prev = &self.start;
        for (name, event, work) in &self.marks {
            let secs = f64::from(prev.elapsed_ms(event)?) / 1e3;
            profile::book(&self.dev, name, secs, *work);
            prev = event;
        }
        Ok(())
    }
}

/// A decode matvec's work: `n × k` weights of `elem_bytes` streamed once, `batch` rows.
fn matvec_work(n: usize, k: usize, batch: usize, elem_bytes: usize) -> Work {
    Work {
        fp32_flops: 2.0 * (batch * n * k) as f64,
        bytes: (n * k * elem_bytes) as f64,
        ..Work::default()
    }
}

/// Device addresses of one layer's decode tensors.
struct LayerPtrs {
    norm_w: u64,
    norm_b: u64,
    in_w: u64,
    in_b: u64,
    x_w: u64,
    dt_w: u64,
    dt_b: u64,
    a: u64,
    d_skip: u64,
    out_w: u64,
    out_b: u64,
    conv_wt: u64,
    conv_b: u64,
    conv_state: u64,
    ssm: u64,
}

impl LayerPtrs {
    fn of(l: &DecodeLayer, et: DType) -> Result<Self> {
        let p = l.params;
        let (norm_w, norm_b) = l.norm.ptrs(et)?;
        Ok(Self {
            norm_w,
            norm_b,
            in_w: dptr(l.in_proj.0, et, "in_proj")?,
            in_b: opt_ptr(l.in_proj.1, et, "in_proj bias")?,
            x_w: dptr(l.x_proj, et, "x_proj")?,
            dt_w: dptr(l.dt_proj, et, "dt_proj")?,
            dt_b: dptr(&p.dt_bias, DType::F32, "dt bias")?,
            a: dptr(&p.a, DType::F32, "A")?,
            d_skip: dptr(&p.d_skip, DType::F32, "D")?,
            out_w: dptr(l.out_proj.0, et, "out_proj")?,
            out_b: opt_ptr(l.out_proj.1, et, "out_proj bias")?,
            conv_wt: dptr(&p.conv_weight_t, DType::F32, "conv weight")?,
            conv_b: dptr(&p.conv_bias, DType::F32, "conv bias")?,
            conv_state: dptr(l.conv, DType::F32, "conv state")?,
            ssm: dptr(l.ssm, DType::F32, "ssm state")?,
        })
    }

    /// The layer's row of the persistent step's table (cuda.kernels.cu: DecodeLayer): the
    /// fifteen addresses in order, then which matvecs read 16 bytes at a time.
    fn table_row(&self, d: &DecodeDims, elem_bytes: usize) -> [u64; 16] {
        let vec = vec_ok(d.d_model, self.in_w, elem_bytes) as u64
            | (vec_ok(d.d_inner, self.x_w, elem_bytes) as u64) << 1
            | (vec_ok(d.d_inner, self.out_w, elem_bytes) as u64) << 2;
        [
            self.norm_w,
            self.norm_b,
            self.in_w,
            self.in_b,
            self.x_w,
            self.dt_w,
            self.dt_b,
            self.a,
            self.d_skip,
            self.out_w,
            self.out_b,
            self.conv_wt,
            self.conv_b,
            self.conv_state,
            self.ssm,
            vec,
        ]
    }
}

/// Enqueues the kernels of one decode step on the device's stream, reading the token ids
/// from `b.ids` and leaving the logits in `b.logits`; `timer` marks each kernel.
fn enqueue_step(
    m: &DecodeModel,
    dev: &CudaDevice,
    dims: &DecodeDims,
    b: &DecodePtrs,
    timer: &mut Option<StepTimer>,
) -> Result<()> {
    let mut mark = |name: &'static str, work: Work| match timer {
        Some(t) => t.mark(name, work),
        None => Ok(()),
    };
    let dev = dev.clone();
    let et = m.dtype;
    let first = m
        .layers
        .first()
        .ok_or_else(|| anyhow!("model has no layers"))?;
    let DecodeDims {
        batch,
        vocab,
        d_model,
        d_inner,
        dt_rank,
        xw,
    } = *dims;
    if b.persistent && enqueue_persistent(m, &dev, dims, b, &mut mark)? {
        return Ok(());
    }
    let (rp, xzp, xcp, dbcp, yp, idp) = (b.residual, b.xz, b.xc, b.dbc, b.y, b.ids);
    let (b_, rr) = (batch as i32, m.round_res as i32);
    let (dm_, di_, xw_, r_) = (d_model as i32, d_inner as i32, xw as i32, dt_rank as i32);
    let xz_rs = 2 * di_;
    let eb = et.size_in_bytes();
    // The step's first kernel follows the copy of the token ids: only the others overlap.
    let pdl = pdl_enabled(&dev);
    let max_blocks = decode_max_blocks(&dev)?;
    let ep = dptr(m.embedding, et, "embedding")?;
    launch!(
        kernel!(&dev, "embed_rows", first.params),
        grid_1d(batch * d_model),
        &ep,
        &idp,
        &rp,
        &b_,
        &dm_
    );
    mark(
        "decode: embedding",
        Work::bytes((2 * batch * d_model * eb) as f64),
    )?;
    let (mv_norm, mv_plain, mv_res, scan_step) = (
        kernel!(&dev, "matvec_norm_conv", first.params),
        kernel!(&dev, "matvec_plain", first.params),
        kernel!(&dev, "matvec_residual", first.params),
        kernel!(&dev, "scan_step", first.params),
    );
    let null = 0u64;
    // The weight-reading kernels' prefetches, in launch order (DecodeBuffers::weight_streams).
    let mut prefetches = b.prefetch.iter().copied();
    let mut next_prefetch = || prefetches.next().unwrap_or((0, 0));
    for l in &m.layers {
        let LayerPtrs {
            norm_w: nw,
            norm_b: nb,
            in_w: iw,
            in_b: ib,
            x_w: xpw,
            dt_w: dtw,
            dt_b: dtb,
            a: ap,
            d_skip: dsp,
            out_w: ow,
            out_b: ob,
            conv_wt: cw,
            conv_b: cb,
            conv_state: convp,
            ssm: ssmp,
        } = LayerPtrs::of(l, et)?;
        let n2 = 2 * di_;
        let eps = l.norm.eps;
        let vin = vec_ok(d_model, iw, eb) as i32;
        let (in_cfg, in_split) = matvec_cfg(2 * d_inner, batch, d_model, eb, max_blocks);
        let (pf, npf) = next_prefetch();
        launch_step!(
            &dev, pdl, &mv_norm, in_cfg, &rp, &nw, &nb, &eps, &rr, &iw, &ib, &xzp, &b_, &dm_, &n2,
            &vin, &convp, &cw, &cb, &xcp, &di_, &in_split, &pf, &npf
        );
        mark(
            "decode: norm+in_proj+conv",
            matvec_work(2 * d_inner, d_model, batch, eb),
        )?;
        let vx = vec_ok(d_inner, xpw, eb) as i32;
        let (x_cfg, x_split) = matvec_cfg(xw, batch, d_inner, eb, max_blocks);
        let (pf, npf) = next_prefetch();
        launch_step!(
            &dev, pdl, &mv_plain, x_cfg, &xcp, &xpw, &null, &dbcp, &b_, &di_, &xw_, &vx, &x_split,
            &pf, &npf
        );
        mark("decode: x_proj", matvec_work(xw, d_inner, batch, eb))?;
        let (pf, npf) = next_prefetch();
        launch_step!(
            &dev,
            pdl,
            &scan_step,
            grid_warps(batch * d_inner),
            &xcp,
            &xzp,
            &xz_rs,
            &dbcp,
            &xw_,
            &r_,
            &dtw,
            &dtb,
            &ap,
            &dsp,
            &ssmp,
            &yp,
            &b_,
            &di_,
            &pf,
            &npf
        );
        // dt_proj's rows, and the state read and written.
        let scan_bytes = d_inner * (dt_rank * eb + 2 * batch * l.params.a.dim(1)? * 4);
        mark("decode: dt_proj+scan", Work::bytes(scan_bytes as f64))?;
        let vo = vec_ok(d_inner, ow, eb) as i32;
        let (out_cfg, out_split) = matvec_cfg(d_model, batch, d_inner, eb, max_blocks);
        let (pf, npf) = next_prefetch();
        launch_step!(
            &dev, pdl, &mv_res, out_cfg, &yp, &rr, &ow, &ob, &rp, &b_, &di_, &dm_, &vo, &out_split,
            &pf, &npf
        );
        mark(
            "decode: out_proj+residual",
            matvec_work(d_model, d_inner, batch, eb),
        )?;
    }
    let (nw, nb) = m.norm_f.ptrs(et)?;
    let hp = dptr(m.lm_head, et, "lm_head")?;
    let lp = b.logits;
    let (eps, v_) = (m.norm_f.eps, vocab as i32);
    let vh = vec_ok(d_model, hp, eb) as i32;
    let (head_cfg, head_split) = matvec_cfg(vocab, batch, d_model, eb, max_blocks);
    let (pf, npf) = next_prefetch();
    launch_step!(
        &dev,
        pdl,
        kernel!(&dev, "matvec_norm_logits", first.params),
        head_cfg,
        &rp,
        &nw,
        &nb,
        &eps,
        &rr,
        &hp,
        &null,
        &lp,
        &b_,
        &dm_,
        &v_,
        &vh,
        &head_split,
        &pf,
        &npf
    );
    mark(
        "decode: norm+lm_head",
        matvec_work(vocab, d_model, batch, eb),
    )?;
    Ok(())
}

/// Whether decode steps run as one persistent launch (`decode_persistent`) where the
/// device allows: `DECIMAMBA_DECODE_PERSISTENT=1` turns it on (default
/// [`PERSISTENT_DEFAULT`]), and [`set_persistent_decode`] overrides both.
pub fn persistent_decode() -> bool {
    static ENV_ON: OnceLock<bool> = OnceLock::new();
    match PERSISTENT_OVERRIDE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *ENV_ON.get_or_init(|| {
            std::env::var("DECIMAMBA_DECODE_PERSISTENT").map_or(PERSISTENT_DEFAULT, |v| v != "0")
        }),
    }
}

/// The persistent step is off unless asked for until a GPU run has checked it.
const PERSISTENT_DEFAULT: bool = false;

static PERSISTENT_OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Forces the persistent decode step on or off for the process (`None`: as the
/// environment says), e.g. to compare the two paths in one process.
pub fn set_persistent_decode(on: Option<bool>) {
    PERSISTENT_OVERRIDE.store(on.map_or(0, |o| if o { 1 } else { 2 }), Ordering::Relaxed);
}

/// Enqueues the step as one cooperative launch of `decode_persistent`, all of whose
/// blocks are resident: the device's SMs times the blocks per SM its occupancy allows
/// (at most `DECIMAMBA_DECODE_BLOCKS_PER_SM` when set). `Ok(false)` when the device
/// cannot launch it cooperatively; the caller then launches the per-stage kernels.
fn enqueue_persistent(
    m: &DecodeModel,
    dev: &CudaDevice,
    d: &DecodeDims,
    b: &DecodePtrs,
    mark: &mut impl FnMut(&'static str, Work) -> Result<()>,
) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let first = m
        .layers
        .first()
        .ok_or_else(|| anyhow!("model has no layers"))?;
    let func = kernel!(dev, "decode_persistent", first.params);
    let ctx = dev.cuda_stream().context().clone();
    let cooperative = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)?;
    let sms = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let threads = (DECODE_BLOCK_WARPS * 32) as u32;
    let smem = d.batch * d.d_model.max(d.d_inner) * 4;
    let resident = func.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)?;
    let sms = sms.max(0) as usize;
    let cap = decode_max_blocks(dev)? / sms.max(1);
    let blocks = match persistent_blocks(sms, resident as usize, cap) {
        Some(b) if cooperative != 0 => b,
        _ => return Ok(false),
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let et = m.dtype;
    let eb = et.size_in_bytes();
    let (nfw, nfb) = m.norm_f.ptrs(et)?;
    let ep = dptr(m.embedding, et, "embedding")?;
    let hp = dptr(m.lm_head, et, "lm_head")?;
    let split = |n, k| decode_split(n, k, eb) as i32;
    let (in_split, x_split) = (split(2 * d.d_inner, d.d_model), split(d.xw, d.d_inner));
    let (out_split, head_split) = (split(d.d_model, d.d_inner), split(d.vocab, d.d_model));
    let (n_layer, head_vec) = (m.layers.len() as i32, vec_ok(d.d_model, hp, eb) as i32);
    let (eps, rr) = (m.norm_f.eps, m.round_res as i32);
    let [bs, dm, di, xw, r, v] =
        [d.batch, d.d_model, d.d_inner, d.xw, d.dt_rank, d.vocab].map(|x| x as i32);
    // SAFETY: one u32 of the step's own buffer, on the stream the kernel runs on.
    unsafe { sys::cuMemsetD32Async(b.barrier, 0, 1, dev.cuda_stream().cu_stream()) }.result()?;
    let mut params = kernel_params!(
        &b.layer_table,
        &n_layer,
        &ep,
        &b.ids,
        &nfw,
        &nfb,
        &hp,
        &head_vec,
        &eps,
        &rr,
        &b.residual,
        &b.xz,
        &b.xc,
        &b.dbc,
        &b.y,
        &b.logits,
        &bs,
        &dm,
        &di,
        &xw,
        &r,
        &v,
        &in_split,
        &x_split,
        &out_split,
        &head_split,
        &b.barrier,
    );
    // SAFETY: the arguments are those of decode_persistent, in order and of its types;
    // the table holds each layer's live tensors (LayerPtrs::of), the buffers are sized
    // for `d`, and the grid is no larger than the blocks the device keeps resident.
    unsafe { launch_ex(dev, &func, cfg, &mut params, true) }?;
    let mut work = matvec_work(d.vocab, d.d_model, d.batch, eb);
    for _ in &m.layers {
        let w = |n, k| matvec_work(n, k, d.batch, eb);
        for x in [
            w(2 * d.d_inner, d.d_model),
            w(d.xw, d.d_inner),
            w(d.d_inner, d.dt_rank),
            w(d.d_model, d.d_inner),
        ] {
            work.fp32_flops += x.fp32_flops;
            work.bytes += x.bytes;
        }
    }
    mark("decode: persistent step", work)?;
    Ok(true)
}

/// Launch shape of a decode matvec with `n` output rows of `k` elements: `split` warps per
/// row ([`decode_split`]), DECODE_BLOCK_WARPS per block, at most `max_blocks` blocks
/// ([`decode_blocks`]), the `batch` input rows of `k` f32 in shared memory. Returns the shape and the kernel's `split` argument.
fn matvec_cfg(
    n: usize,
    batch: usize,
    k: usize,
    elem_bytes: usize,
    max_blocks: usize,
) -> (LaunchConfig, i32) {
    let split = decode_split(n, k, elem_bytes);
    let cfg = LaunchConfig {
        grid_dim: (decode_blocks(n, split, max_blocks) as u32, 1, 1),
        block_dim: ((DECODE_BLOCK_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: (batch * k * 4) as u32,
    };
    (cfg, split as i32)
}

/// Per-stage GPU time of prefills, for finding where the time goes: with
/// `DECIMAMBA_CUDA_PROFILE=1` each stage ends with a device synchronisation and its wall
/// time is added to a process-wide table (`decimamba bench` prints it). Off, it costs one
/// branch per stage. The synchronisations make the total slower than an unprofiled run.
pub mod profile {
    use crate::model::gpu_plan::{device_peaks, env_number, Peaks, StageTime, Work};
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as Attr;
    use candle_core::CudaDevice;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    /// The stages so far and when the last one ended: one clock for the process, so that
    /// a kernel wrapper can split its caller's stage.
    struct Table {
        stages: Vec<StageTime>,
        last: Option<Instant>,
    }

    static TABLE: Mutex<Table> = Mutex::new(Table {
        stages: Vec::new(),
        last: None,
    });
    static PEAKS: OnceLock<Result<Option<Peaks>, String>> = OnceLock::new();

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var("DECIMAMBA_CUDA_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0")
        })
    }

    /// The device's peaks (gpu_plan::device_peaks), `DECIMAMBA_PEAK_TFLOPS` (tensor) and
    /// `DECIMAMBA_PEAK_GBPS` replacing what they name; on an architecture the table lacks,
    /// both are needed, and the f32 pipe and SFU are taken as sm_90's 1/16 and 1/256 of
    /// the tensor rate.
    fn peaks_of(dev: &CudaDevice) -> Result<Option<Peaks>, String> {
        let ctx = dev.cuda_stream().context().clone();
        let attr = |a| ctx.attribute(a).ok();
        let table = (|| {
            device_peaks(
                ctx.compute_capability().ok()?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
            )
        })();
        let env = |k: &str| env_number::<f64>(k, std::env::var(k).ok().as_deref());
        let (tflops, gbps) = (env("DECIMAMBA_PEAK_TFLOPS")?, env("DECIMAMBA_PEAK_GBPS")?);
        let mut p = match (table, tflops, gbps) {
            (Some(p), _, _) => p,
            (None, Some(t), Some(g)) => Peaks {
                tensor_flops: t * 1e12,
                fp32_flops: t * 1e12 / 16.0,
                exps: t * 1e12 / 256.0,
                bytes: g * 1e9,
            },
            _ => return Ok(None),
        };
        if let Some(t) = tflops {
            p.tensor_flops = t * 1e12;
        }
        if let Some(g) = gbps {
            p.bytes = g * 1e9;
        }
        Ok(Some(p))
    }

    /// Stage timing on one device.
    pub struct Stages {
        dev: CudaDevice,
    }

    /// Starts timing (after the work queued so far), or `None` when profiling is off or
    /// the device is not a CUDA one.
    pub fn start(device: &candle_core::Device) -> Option<Stages> {
        let candle_core::Device::Cuda(dev) = device else {
            return None;
        };
        if !enabled() {
            return None;
        }
        use candle_core::backend::BackendDevice;
        dev.synchronize().ok()?;
        PEAKS.get_or_init(|| peaks_of(dev));
        if let Ok(mut t) = TABLE.lock() {
            t.last = Some(Instant::now());
        }
        Some(Stages { dev: dev.clone() })
    }

    /// Ends a stage if profiling.
    pub fn lap(stages: &mut Option<Stages>, name: &'static str) {
        lap_work(stages, name, Work::default());
    }

    /// Ends a stage that did `work`, if profiling.
    pub fn lap_work(stages: &mut Option<Stages>, name: &'static str, work: Work) {
        if let Some(s) = stages {
            lap_on(&s.dev, name, work);
        }
    }

    /// Ends stage `name`, which did `work`, on `dev` if profiling (and a stage is
    /// running): also for kernel wrappers that split the stage their caller is timing.
    pub fn lap_on(dev: &CudaDevice, name: &'static str, work: Work) {
        use candle_core::backend::BackendDevice;
        if !enabled() || dev.synchronize().is_err() {
            return;
        }
        let now = Instant::now();
        let Ok(mut t) = TABLE.lock() else {
            return;
        };
        let Some(last) = t.last.replace(now) else {
            return;
        };
        add(
            &mut t.stages,
            name,
            now.duration_since(last).as_secs_f64(),
            work,
        );
    }

    fn add(stages: &mut Vec<StageTime>, name: &'static str, secs: f64, work: Work) {
        match stages.iter_mut().find(|e| e.name == name) {
            Some(e) => {
                e.secs += secs;
                e.calls += 1;
                e.work = e.work + work;
            }
            None => stages.push(StageTime {
                name,
                secs,
                calls: 1,
                work,
                roofline: None,
            }),
        }
    }

    /// Books `secs` of GPU time measured some other way (events) to stage `name`.
    pub fn book(dev: &CudaDevice, name: &'static str, secs: f64, work: Work) {
        PEAKS.get_or_init(|| peaks_of(dev));
        if let Ok(mut t) = TABLE.lock() {
            add(&mut t.stages, name, secs, work);
        }
    }

    /// The table so far, each stage with its roofline time where the peaks are known,
    /// and clears it; an error when a peak variable is not a number.
    pub fn take() -> anyhow::Result<Vec<StageTime>> {
        let peaks = match PEAKS.get() {
            Some(Err(e)) => anyhow::bail!("{e}"),
            Some(Ok(p)) => *p,
            None => None,
        };
        let mut stages = TABLE
            .lock()
            .map(|mut t| {
                t.last = None;
                std::mem::take(&mut t.stages)
            })
            .unwrap_or_default();
        for s in &mut stages {
            s.roofline = peaks.map(|p| s.work.roofline(&p)).filter(|r| r.0 > 0.0);
        }
        Ok(stages)
    }
}

/// Keeps memory freed on the device in its stream-ordered pool instead of handing it back
/// to the driver at every synchronisation (the pool's default release threshold is 0).
/// candle allocates each activation with `cuMemAllocAsync`, so without this a prefill
/// re-maps gigabytes of fresh pages after each synchronisation; PyTorch's caching
/// allocator keeps freed blocks the same way. Called once per model load.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on the device of a live context; `pool` receives a handle
    // owned by the driver, `threshold` outlives the call that reads it.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(())
}
