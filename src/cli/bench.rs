//! `decimamba bench`.

use super::common::{DecimationArgs, ModelArgs};
use super::output::println;
use crate::bench::{self, BenchReport, PeakRss};
use crate::eval::common::{atomic_write_json, parse_lengths, temp_sibling};
use crate::loader::{parse_device, parse_dtype};
use crate::model::{BackendChoice, MambaConfig};
use crate::policy::decimamba::ModelDefaults;
use crate::policy::Policy;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Random weights of a public Mamba shape instead of a checkpoint: 130m, 370m, 790m, 1.4b, 2.8b.
    #[arg(long, conflicts_with = "model")]
    pub shape: Option<String>,
    /// Prompt lengths to prefill, run shortest first (k = 1024).
    #[arg(long, default_value = "512,2048,8192")]
    pub lengths: String,
    /// Decode steps to time (0 = skip).
    #[arg(long, default_value_t = 64)]
    pub decode: usize,
    /// Rows per prefill: a batch of random prompts of each length (tokens/s counts them all).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Prefills per length; the median is reported (every run is in the JSON).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Also time decimated prefill (the --decimation settings, else the model preset or zero-shot rule).
    /// With --policy, the policy's prefill is timed beside vanilla instead.
    #[arg(long)]
    pub compare_decimation: bool,
    /// Also time the other backend on the same device in the same run (Candle ops beside
    /// the fused kernels, or the kernels beside --backend candle), with the ratio.
    #[arg(long)]
    pub compare_backends: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// With --shape: write the random weights as a checkpoint folder (model.safetensors and
    /// config.json, f32) instead of benchmarking, for sweeps at a public shape's size
    /// (load it with --model DIR --tokenizer FILE).
    #[arg(long, value_name = "DIR", requires = "shape")]
    pub save_checkpoint: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub model_args: ModelArgs,
    #[command(flatten)]
    pub decimation: DecimationArgs,
}

pub fn run(args: BenchArgs) -> Result<()> {
    super::common::apply_threads(args.model_args.threads)?;
    if let (Some(dir), Some(shape)) = (&args.save_checkpoint, &args.shape) {
        let cfg = MambaConfig::of_shape(shape)?;
        if dir.join("config.json").exists() {
            bail!("{} already holds a checkpoint", dir.display());
        }
        bench::save_random_checkpoint(&cfg, dir, 0)?;
        return super::output::println(&format!(
            "wrote a random {shape} checkpoint ({:.0}M parameters) to {}",
            cfg.num_params() as f64 / 1e6,
            dir.display()
        ));
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let lengths = parse_lengths(&args.lengths)?;
    if let Some(path) = &args.json {
        check_writable(path)?;
    }
    let device = parse_device(&args.model_args.device)?;
    let dtype = parse_dtype(&args.model_args.dtype)?;
    let (model, defaults) = match &args.shape {
        Some(shape) => {
            let cfg = MambaConfig::of_shape(shape)?;
            eprintln!(
                "building random {shape} model ({:.0}M parameters)...",
                cfg.num_params() as f64 / 1e6
            );
            let m = bench::random_model(&cfg, dtype, &device, 0)?
                .with_backend(args.model_args.backend.parse()?)?;
            let d = ModelDefaults {
                name: format!("random-{shape}"),
                n_layer: cfg.n_layer,
                preset: None,
                train_len: 2000,
            };
            (m, d)
        }
        None => {
            let loaded = args.model_args.load()?;
            let d = loaded.decimation_defaults();
            (loaded.model, d)
        }
    };
    let policy = if args.compare_decimation && args.decimation.policy.is_none() {
        Policy::DeciMamba(args.decimation.decimation_or_default(&defaults)?)
    } else {
        args.decimation.policy_for(&defaults)?
    };
    crate::policy::ContextPolicy::check(policy.as_dyn(), model.config())?;
    let decimation = policy.decimation().cloned();
    if let Some(&longest) = lengths.iter().max() {
        // A batch needs about the activations of its rows laid end to end.
        super::common::check_memory(
            &model,
            longest * args.batch_size,
            policy.keeps_tokens(),
            args.batch_size,
            args.model_args.force,
            &format!("a bench prefill of {} × {longest} tokens", args.batch_size),
        )?;
    }
    let peer = match args.compare_backends {
        false => None,
        true => {
            let other = match model.backend().is_fused() {
                true => BackendChoice::Candle,
                false => BackendChoice::Kernels,
            };
            Some(model.clone().with_backend(other)?)
        }
    };
    let threads = candle_core::utils::get_num_threads();
    eprintln!(
        "model {} | {} | {} | {dtype:?} | {threads} thread{}{}",
        defaults.name,
        args.model_args.device,
        model.backend_name(),
        if threads == 1 { "" } else { "s" },
        match args.batch_size {
            1 => String::new(),
            b => format!(" | batch {b} (tokens/s over all rows)"),
        }
    );
    // Warm-up: page in weights and spin up the thread pool.
    bench::time_prefill(&model, 64, 1, None, 1)?;
    let peak_rss = peak_rss_scope();
    let mut report = BenchReport {
        implementation: "decimamba".into(),
        model: defaults.name.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        device: args.model_args.device.clone(),
        backend: model.backend_name().to_string(),
        threads,
        batch_size: args.batch_size,
        peak_rss,
        prefill: BTreeMap::new(),
        prefill_decimated: BTreeMap::new(),
        decimation: decimation.clone(),
        prefill_policy: BTreeMap::new(),
        policy: policy
            .as_option()
            .filter(|_| decimation.is_none())
            .map(|p| p.settings()),
        decode: None,
        peer_backend: peer.as_ref().map(|p| p.backend_name().to_string()),
        prefill_peer: BTreeMap::new(),
        decode_peer: None,
    };
    if let Some(p) = &peer {
        bench::time_prefill(p, 64, 1, None, 1)?;
    }
    // Each finished measurement is saved at once (atomically), so a closed stdout, an
    // interrupt or a later failure keeps what is done.
    let save = |report: &BenchReport| match &args.json {
        Some(path) => atomic_write_json(path, report),
        None => Ok(()),
    };
    if model.device().is_cuda() {
        eprintln!("note: on CUDA, peak MiB is the GPU memory the process holds after each prefill (its pool keeps the high-water mark; weights included)");
    }
    println(&format!(
        "{:>8}  {:>10}  {:>12}  {:>10}",
        "length", "seconds", "tokens/s", "peak MiB"
    ))?;
    crate::model::take_gpu_profile()?;
    for &len in &lengths {
        let r = bench::time_prefill(&model, len, args.batch_size, None, args.repeats)?;
        print_gpu_profile(&format!("{len} tokens"))?;
        println(&format!(
            "{len:>8}  {:>10.3}  {:>12.1}  {:>10}",
            r.s,
            r.tok_per_s,
            mib(r.gpu_held_mib.or(r.peak_rss_mib))
        ))?;
        note_scope(&mut report, r.peak_rss);
        report.prefill.insert(len, r);
        save(&report)?;
        if let Some(p) = &peer {
            let r = bench::time_prefill(p, len, args.batch_size, None, args.repeats)?;
            println(&format!(
                "{len:>8}  {:>10.3}  {:>12.1}  {:>10}  {} ({})",
                r.s,
                r.tok_per_s,
                mib(r.gpu_held_mib.or(r.peak_rss_mib)),
                p.backend_name(),
                speed_ratio(report.prefill[&len].s, r.s, model.backend_name())
            ))?;
            note_scope(&mut report, r.peak_rss);
            report.prefill_peer.insert(len, r);
            save(&report)?;
        }
        if let Some(p) = policy.as_option() {
            let r = bench::time_prefill(&model, len, args.batch_size, Some(p), args.repeats)?;
            let base = report.prefill[&len].s;
            let what = match &decimation {
                Some(_) => format!("decimated {:?}", r.kept_per_layer),
                None => p.name().to_string(),
            };
            println(&format!(
                "{:>8}  {:>10.3}  {:>12.1}  {:>10}  {what} ({:.2}x vanilla)",
                len,
                r.s,
                r.tok_per_s,
                mib(r.gpu_held_mib.or(r.peak_rss_mib)),
                base / r.s
            ))?;
            let label = match &decimation {
                Some(_) => "decimated".to_string(),
                None => p.name().to_string(),
            };
            print_gpu_profile(&format!("{len} tokens, {label}"))?;
            note_scope(&mut report, r.peak_rss);
            match &decimation {
                Some(_) => report.prefill_decimated.insert(len, r),
                None => report.prefill_policy.insert(len, r),
            };
            save(&report)?;
        }
    }
    if args.decode > 0 {
        crate::model::take_gpu_profile()?;
        let d = bench::time_decode(&model, 128, args.decode)?;
        print_gpu_profile("decode (128-token prompt prefill included)")?;
        println(&format!(
            "decode: {} tokens after a 128-token prompt: {:.3} s, {:.1} tokens/s ({:.1} GB/s of weights)",
            d.new_tokens, d.s, d.tok_per_s, d.weight_gb_per_s
        ))?;
        if let Some(p) = &peer {
            let pd = bench::time_decode(p, 128, args.decode)?;
            println(&format!(
                "decode, {}: {:.3} s, {:.1} tokens/s ({})",
                p.backend_name(),
                pd.s,
                pd.tok_per_s,
                speed_ratio(d.s, pd.s, model.backend_name())
            ))?;
            report.decode_peer = Some(pd);
        }
        report.decode = Some(d);
        save(&report)?;
    }
    Ok(())
}

/// "2.31x slower than cpu-simd" for a peer taking `peer_s` where `base` took `base_s`.
fn speed_ratio(base_s: f64, peer_s: f64, base: &str) -> String {
    match peer_s >= base_s {
        true => format!("{:.2}x slower than {base}", peer_s / base_s),
        false => format!("{:.2}x faster than {base}", base_s / peer_s),
    }
}

/// Fails with one line naming `path` unless a report can be written there: it is not a
/// folder, its folder exists, and a temporary file beside it can be created (and is
/// removed again). Checked before the model is built, so a typo costs no benchmark.
fn check_writable(path: &Path) -> Result<()> {
    let shown = path.display();
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        bail!("--json {shown} is a folder, not a file");
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "cannot write --json {shown}: folder {} does not exist",
            parent.display()
        );
    }
    let tmp = temp_sibling(path);
    std::fs::File::create(&tmp).with_context(|| format!("cannot write --json {shown}"))?;
    std::fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    Ok(())
}

/// What the "peak MiB" column will cover; a stderr note when it is not each length's own.
fn peak_rss_scope() -> PeakRss {
    if bench::peak_rss_mib().is_none() {
        eprintln!("note: peak memory is not measured on this platform");
        return PeakRss::Unavailable;
    }
    match bench::reset_peak_rss() {
        Ok(()) => PeakRss::PerLength,
        Err(e) => {
            eprintln!(
                "note: cannot reset the peak-memory counter (/proc/self/clear_refs: {e}); \
                 peak MiB is the process peak, which includes earlier, larger lengths"
            );
            PeakRss::Process
        }
    }
}

/// The report's `peak_rss` is the weakest scope of any measurement in it.
fn note_scope(report: &mut BenchReport, scope: PeakRss) {
    if scope != PeakRss::PerLength && report.peak_rss == PeakRss::PerLength {
        report.peak_rss = scope;
    }
}

fn mib(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |m| format!("{m:.0}"))
}

/// Prints and clears the per-stage GPU times (only under DECIMAMBA_CUDA_PROFILE=1), each
/// with the share of its time the roofline accounts for and the roof that sets it.
fn print_gpu_profile(what: &str) -> Result<()> {
    let table = crate::model::take_gpu_profile()?;
    if table.is_empty() {
        return Ok(());
    }
    let total: f64 = table.iter().map(|e| e.secs).sum();
    eprintln!("GPU stages, {what} (all repeats, synchronised after each stage):");
    eprintln!(
        "  {:<16} {:>9}  {:>6}  {:>6}  {:>8}  {:>8}  {:>9}",
        "stage", "ms", "share", "calls", "GB/s", "TFLOP/s", "roofline"
    );
    for s in table {
        let flops = s.work.tensor_flops + s.work.fp32_flops;
        let roof = s.roofline.map_or_else(
            || "-".to_string(),
            |(t, bound)| format!("{:.0}% {bound}", 100.0 * t / s.secs),
        );
        eprintln!(
            "  {:<16} {:>9.2}  {:>5.1}%  {:>6}  {:>8.0}  {:>8.1}  {:>9}",
            s.name,
            s.secs * 1e3,
            100.0 * s.secs / total,
            s.calls,
            s.work.bytes / s.secs / 1e9,
            flops / s.secs / 1e12,
            roof
        );
    }
    Ok(())
}
