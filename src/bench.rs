//! Throughput and memory measurements: prefill at several lengths (vanilla and decimated),
//! decode, and peak resident memory. Used by `decimamba bench`; the same JSON layout is
//! written by `scripts/bench_hf.py` so the two can be printed side by side.

use crate::model::{ForwardOptions, LogitsSpan, MambaConfig, MambaModel};
use crate::policy::{ContextPolicy, DecimationConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// A model of `config`'s shape with random weights initialised like mamba_ssm
/// (Δ bias so that softplus(bias) spans [1e-3, 1e-1], A_log = log(1..=N), D = 1).
pub fn random_model(
    config: &MambaConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<MambaModel> {
    let t = random_weights(config, device, seed)?;
    let mut cfg = config.clone();
    cfg.format = crate::model::CheckpointFormat::Original;
    MambaModel::new(&cfg, VarBuilder::from_tensors(t, dtype, device))
}

/// Writes [`random_model`]'s weights (f32, mamba_ssm key names) as `model.safetensors` and a
/// mamba_ssm `config.json` into `dir`: a checkpoint of a public shape that sweeps can load
/// like any other (with `--tokenizer`), e.g. to time `passkey` at 130m size on a GPU.
pub fn save_random_checkpoint(
    config: &MambaConfig,
    dir: &std::path::Path,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint folder {}", dir.display()))?;
    let weights = random_weights(config, &Device::Cpu, seed)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))
        .with_context(|| format!("cannot write {}", dir.join("model.safetensors").display()))?;
    let cfg = serde_json::json!({
        "d_model": config.d_model,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": {},
        "rms_norm": config.rms_norm,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": true,
        "pad_vocab_size_multiple": 8,
    });
    crate::eval::common::atomic_write_json(&dir.join("config.json"), &cfg)
}

/// The tensors of [`random_model`], on `device` in f32.
fn random_weights(
    config: &MambaConfig,
    device: &Device,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let (d, di, n, r, k, v) = (
        config.d_model,
        config.d_inner,
        config.d_state,
        config.dt_rank,
        config.d_conv,
        config.vocab_size,
    );
    let mut t: HashMap<String, Tensor> = HashMap::new();
    // Each tensor, and each 1M-element chunk of it, has its own seeded stream, so the
    // 2.8b shape's weights are drawn on all cores and still the same on every run.
    let mut tensor_no = 0u64;
    let mut randn = |shape: &[usize], std: f64| -> Result<Tensor> {
        use rayon::prelude::*;
        tensor_no += 1;
        let n: usize = shape.iter().product();
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 20).enumerate().for_each(|(c, out)| {
            let mut rng = Normal::new(
                seed ^ tensor_no.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            for x in out {
                *x = rng.sample() * std as f32;
            }
        });
        Ok(Tensor::from_vec(v, shape, device)?)
    };
    t.insert("backbone.embedding.weight".into(), randn(&[v, d], 0.02)?);
    let a_log = Tensor::arange(1f32, n as f32 + 1.0, device)?
        .log()?
        .unsqueeze(0)?
        .repeat((di, 1))?;
    for i in 0..config.n_layer {
        let p = format!("backbone.layers.{i}");
        t.insert(
            format!("{p}.norm.weight"),
            Tensor::ones(d, DType::F32, device)?,
        );
        t.insert(
            format!("{p}.mixer.in_proj.weight"),
            randn(&[2 * di, d], (d as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.mixer.conv1d.weight"),
            randn(&[di, 1, k], (k as f64).powf(-0.5))?,
        );
        t.insert(format!("{p}.mixer.conv1d.bias"), randn(&[di], 0.1)?);
        t.insert(
            format!("{p}.mixer.x_proj.weight"),
            randn(&[r + 2 * n, di], (di as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.mixer.dt_proj.weight"),
            randn(&[di, r], (r as f64).powf(-0.5))?,
        );
        // dt ~ logUniform[1e-3, 1e-1]; bias = softplus⁻¹(dt) = dt + log(1 − e^−dt).
        let u = ((randn(&[di], 1.0)?.tanh()? + 1.0)? * 0.5)?;
        let dt = ((u * (0.1f64.ln() - 0.001f64.ln()))? + 0.001f64.ln())?.exp()?;
        let bias = (&dt + (dt.neg()?.exp()?.neg()? + 1.0)?.log()?)?;
        t.insert(format!("{p}.mixer.dt_proj.bias"), bias);
        t.insert(format!("{p}.mixer.A_log"), a_log.clone());
        t.insert(
            format!("{p}.mixer.D"),
            Tensor::ones(di, DType::F32, device)?,
        );
        t.insert(
            format!("{p}.mixer.out_proj.weight"),
            randn(&[d, di], (di as f64).powf(-0.5))?,
        );
    }
    t.insert(
        "backbone.norm_f.weight".into(),
        Tensor::ones(d, DType::F32, device)?,
    );
    Ok(t)
}

/// A seeded standard-normal generator (xorshift + Box-Muller), so random benchmark
/// models are the same on every run and device.
struct Normal {
    state: u64,
    spare: Option<f32>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x2545_F491_4F6C_DD1D | 1,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        ((self.state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }
}

/// The kilobytes on the `VmHWM:` line of a `/proc/<pid>/status` text (the peak resident
/// set size since the process started or since the last reset of it).
pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let kb = fields.next()?.parse().ok()?;
    match fields.next() {
        None | Some("kB") => Some(kb),
        Some(_) => None,
    }
}

/// Peak resident memory in MiB since the last successful [`reset_peak_rss`], else since the
/// process started (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(parse_vm_hwm_kib(&status)? as f64 / 1024.0)
}

/// Resets the peak-RSS counter to the current resident size (Linux: writing 5 to
/// /proc/self/clear_refs, see proc(5)). The error says why it could not (not Linux, no
/// permission, an old kernel); the peak then stays the process peak.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// What a reported peak resident size covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeakRss {
    /// The peak of this measurement alone: the counter was reset before it.
    PerLength,
    /// The process peak so far (the counter could not be reset), so it includes every
    /// earlier, possibly larger, measurement.
    Process,
    /// No peak is measured on this platform.
    Unavailable,
}

impl PeakRss {
    /// Resets the counter and says what the next [`peak_rss_mib`] will cover.
    pub fn reset() -> Self {
        if peak_rss_mib().is_none() {
            PeakRss::Unavailable
        } else if reset_peak_rss().is_ok() {
            PeakRss::PerLength
        } else {
            PeakRss::Process
        }
    }
}

/// One prefill measurement.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    /// Median over the repeats.
    pub s: f64,
    pub tok_per_s: f64,
    /// Every repeat's time, in order.
    pub runs_s: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// On CUDA: GPU memory the process holds after the prefill, in MiB (its pool keeps
    /// the high-water mark, weights included; lengths run shortest first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_held_mib: Option<f64>,
    /// What `peak_rss_mib` covers (the report states it once, as `peak_rss`).
    #[serde(skip)]
    pub peak_rss: PeakRss,
    /// Sequence length leaving each layer the policy reports (DeciMamba's decimating ones).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_per_layer: Vec<usize>,
}

/// A whole benchmark run, in the layout `scripts/bench_hf.py` also writes.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub dtype: String,
    pub device: String,
    /// Which implementation ran the model (`cpu-simd`, `cuda-nvrtc`, `candle-ops`).
    pub backend: String,
    pub threads: usize,
    /// Rows per prefill (tokens/s counts every row).
    #[serde(skip_serializing_if = "is_one")]
    pub batch_size: usize,
    /// What each `peak_rss_mib` covers: "per-length" (that measurement alone) or
    /// "process" (the process peak so far: it grows with earlier, larger lengths).
    pub peak_rss: PeakRss,
    pub prefill: BTreeMap<usize, PrefillResult>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub prefill_decimated: BTreeMap<usize, PrefillResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decimation: Option<DecimationConfig>,
    /// Prefill under a policy other than DeciMamba (`--policy`), and that policy's file.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub prefill_policy: BTreeMap<usize, PrefillResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodeResult>,
    /// `--compare-backends`: the other backend on the same device, timed in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_backend: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub prefill_peer: BTreeMap<usize, PrefillResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_peer: Option<DecodeResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub s: f64,
    pub tok_per_s: f64,
    /// Weights streamed per second at batch 1 (every parameter once per token): the
    /// bound decode approaches at full memory bandwidth.
    pub weight_gb_per_s: f64,
}

pub fn random_ids(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Times `repeats` prefills of `batch` rows of `len` random tokens; reports the median (the
/// anchors' statistic, ../shared/bench), every run, tokens/s over all rows, and the peak
/// resident memory of these runs (see [`PeakRss`] for what it covers). Row 0 is the same
/// input at every batch size.
pub fn time_prefill(
    model: &MambaModel,
    len: usize,
    batch: usize,
    policy: Option<&dyn ContextPolicy>,
    repeats: usize,
) -> Result<PrefillResult> {
    let vocab = model.config().vocab_size.min(50_000);
    let batch = batch.max(1);
    let rows: Vec<u32> = (0..batch)
        .flat_map(|r| random_ids(len, vocab, len as u64 + r as u64))
        .collect();
    let ids = Tensor::from_vec(rows, (batch, len), model.device())?;
    let opts = ForwardOptions {
        policy,
        protected_tail: 1,
        logits: LogitsSpan::Last(1),
        record_indices: false,
        observer: None,
    };
    let mut runs = Vec::new();
    let mut kept = Vec::new();
    let scope = PeakRss::reset();
    for _ in 0..repeats.max(1) {
        let mut state = model.new_state(batch);
        let start = Instant::now();
        let (_, trace) = model.forward_with_state(&ids, &mut state, &opts)?;
        runs.push(start.elapsed().as_secs_f64());
        if let Some(p) = policy {
            kept = trace.len_out_of(p.reported_layers());
        }
    }
    let s = median(&runs);
    Ok(PrefillResult {
        s,
        tok_per_s: (batch * len) as f64 / s,
        runs_s: runs,
        peak_rss_mib: peak_rss_mib(),
        gpu_held_mib: crate::model::gpu_used_bytes(model.device())
            .map(|b| b as f64 / (1u64 << 20) as f64),
        peak_rss: scope,
        kept_per_layer: kept,
    })
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// Median of a non-empty sample (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `new_tokens` greedy decode steps after a `prompt_tokens` prefill.
pub fn time_decode(
    model: &MambaModel,
    prompt_tokens: usize,
    new_tokens: usize,
) -> Result<DecodeResult> {
    let vocab = model.config().vocab_size.min(50_000);
    let ids = random_ids(prompt_tokens, vocab, 7);
    let mut state = model.new_state(1);
    let t = Tensor::from_slice(&ids, (1, ids.len()), model.device())?;
    let opts = ForwardOptions {
        logits: LogitsSpan::Last(1),
        ..Default::default()
    };
    let (logits, _) = model.forward_with_state(&t, &mut state, &opts)?;
    let mut next = MambaModel::argmax_last(&logits.expect("logits"))?[0];
    let start = Instant::now();
    for _ in 0..new_tokens {
        let logits = model.step(&[next], &mut state)?;
        next = MambaModel::argmax_last(&logits)?[0];
    }
    let s = start.elapsed().as_secs_f64();
    let tok_per_s = new_tokens as f64 / s;
    let weight_bytes = model.config().num_params() as f64 * model.dtype().size_in_bytes() as f64;
    Ok(DecodeResult {
        prompt_tokens,
        new_tokens,
        s,
        tok_per_s,
        weight_gb_per_s: tok_per_s * weight_bytes / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::{median, parse_vm_hwm_kib};

    #[test]
    fn vm_hwm_is_read_from_proc_status() {
        let status = "Name:\tdecimamba\nVmPeak:\t  999999 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(123_456));
        assert_eq!(parse_vm_hwm_kib("VmHWM: 42"), Some(42));
        assert_eq!(parse_vm_hwm_kib("VmRSS:\t 5 kB\n"), None);
        assert_eq!(parse_vm_hwm_kib("VmHWM:\t lots kB\n"), None);
        assert_eq!(parse_vm_hwm_kib("VmHWM:\t 5 MB\n"), None);
        assert_eq!(parse_vm_hwm_kib(""), None);
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[0.25]), 0.25);
        assert!(median(&[]).is_nan());
    }
}
