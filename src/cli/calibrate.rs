//! `decimamba calibrate`: fits MambaExtend's or Mamba Modulation's per-layer scales (SPSA on
//! perplexity at the target length) or LongMamba's thresholds (Δ statistics at the training
//! length) on calibration text, and writes a policy file with its provenance.

use super::common::{check_memory, DataArgs, ModelArgs};
use crate::calibrate::{
    calibration_windows, longmamba_policy, perplexity, provenance, DataRecord, LongMambaRun,
    LongMambaSettings, ScaledMethod, SpsaRun, UpiRun, UpiSettings,
};
use crate::eval::common::{
    atomic_write_json, format_length, install_interrupt_flag, parse_lengths, progress_bar,
};
use crate::eval::data::{data_files, load_documents};
use crate::eval::ppl::tokenize_documents;
use crate::policy::{longmamba::default_activate_from, with_provenance, Policy};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibratedMethod {
    /// Δ scale per layer (Azizi et al.), by SPSA on perplexity at --length.
    Mambaextend,
    /// A_log scale per layer in [0.01, 1] (Lu et al.), by SPSA on perplexity at --length.
    Modulation,
    /// Per-channel Δ thresholds (Ye et al.) from windows of the training length --length.
    Longmamba,
    /// The top --ratio channels by Mamba Mean Distance on windows of --length, whose Δ is
    /// divided by L / L_train (UPI, ICLR 2026).
    Upi,
}

#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    #[arg(long, value_enum)]
    pub method: CalibratedMethod,
    /// Calibration text (.txt, .jsonl[.gz], .parquet, or a folder of them). Keep it apart
    /// from the evaluation data: evaluations refuse a policy calibrated on their data.
    #[arg(long, value_name = "FILE|DIR")]
    pub data: PathBuf,
    /// Window length in tokens (k = 1024): the target length for mambaextend and
    /// modulation, the training length for longmamba.
    #[arg(long, value_name = "N")]
    pub length: String,
    /// The policy file to write; the run's state is saved beside it (OUT.state.json) so
    /// that an interrupted run resumes.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Calibration windows; default 20 (mambaextend, modulation) or 100 (longmamba).
    #[arg(long)]
    pub windows: Option<usize>,
    /// Tokens scored at the end of each window (the objective is their perplexity).
    #[arg(long, default_value_t = 100)]
    pub pred_len: usize,
    /// SPSA iterations; default 50 (mambaextend) or 30 (modulation), as upstream.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Seed of the initial scales and the perturbations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// SPSA perturbation c0 in c = c0/(1+x)^0.1 (upstream 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub perturbation: f64,
    /// SPSA step a0 in a = a0·cos(xπ/198) (upstream 0.001).
    #[arg(long, default_value_t = 0.001)]
    pub step: f64,
    /// longmamba: target lengths, comma-separated (k = 1024); default: 2, 4, 8, 16, 32
    /// and 64 times --length.
    #[arg(long, value_name = "LIST")]
    pub lengths: Option<String>,
    /// longmamba: Δ is clamped at its k-th largest value, k = max(1, int(L·fraction)).
    #[arg(long, default_value_t = 0.15)]
    pub clamp_fraction: f64,
    /// longmamba: a channel is global when exp(max_n A·ΣΔ̃) exceeds this.
    #[arg(long, default_value_t = 0.05)]
    pub global_threshold: f32,
    /// longmamba: inputs shorter than this run vanilla; default 1.5 × --length.
    #[arg(long, value_name = "N")]
    pub activate_from: Option<String>,
    /// upi: share of channels per layer to rescale.
    #[arg(long, default_value_t = 0.2)]
    pub ratio: f64,
    /// upi: the training length L_train of n = L / L_train; default the model's.
    #[arg(long)]
    pub train_len: Option<usize>,
    /// Replace --out when it already exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Hide the progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub data_args: DataArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One length from `--length`-style text.
fn one_length(flag: &str, text: &str) -> Result<usize> {
    match parse_lengths(text).with_context(|| format!("{flag} {text}"))?[..] {
        [l] => Ok(l),
        _ => bail!("{flag} takes one length, got {text}"),
    }
}

/// The progress bar of a resumable calibration: at `done` of `total`, saying where it
/// resumes from (`resumed`: how far the saved state at `state` got).
fn resumable_bar(
    total: usize,
    done: usize,
    quiet: bool,
    what: &str,
    resumed: Option<String>,
    state: &Path,
) -> indicatif::ProgressBar {
    let pb = progress_bar(total as u64, quiet, what);
    if let Some(note) = resumed {
        pb.println(format!("resuming from {} ({note})", state.display()));
    }
    pb.set_position(done.min(total) as u64);
    pb
}

fn state_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".state.json");
    out.with_file_name(name)
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let length = one_length("--length", &args.length)?;
    if args.out.exists() && !args.overwrite {
        bail!(
            "{} already exists: pass --overwrite to replace it, or choose another --out",
            args.out.display()
        );
    }
    if args.out.is_dir() {
        bail!("--out {} is a folder; give a file name", args.out.display());
    }
    let longmamba = match args.method {
        CalibratedMethod::Longmamba => {
            let lengths = match &args.lengths {
                Some(l) => parse_lengths(l).context("--lengths")?,
                None => [2, 4, 8, 16, 32, 64].iter().map(|m| m * length).collect(),
            };
            let activate_from = match &args.activate_from {
                Some(a) => one_length("--activate-from", a)?,
                None => default_activate_from(length),
            };
            let s = LongMambaSettings {
                train_len: length,
                lengths,
                clamp_fraction: args.clamp_fraction,
                global_threshold: args.global_threshold,
                activate_from,
            };
            s.check()?;
            Some(s)
        }
        _ => {
            if args.lengths.is_some() || args.activate_from.is_some() {
                bail!("--lengths and --activate-from are longmamba settings");
            }
            if args.pred_len == 0 || args.pred_len >= length {
                bail!(
                    "--pred-len must be at least 1 and shorter than --length {length}, got {}",
                    args.pred_len
                );
            }
            None
        }
    };
    let files = data_files(&args.data)?;
    let mut data = load_documents(&files, &args.data_args.options())?;
    for w in &data.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(n) = args.data_args.max_docs {
        data.documents.truncate(n);
    }
    let record = DataRecord::of(&files, &data.documents)?;
    let mut model = args.model.load()?;
    let docs = tokenize_documents(&model, &data.documents, args.quiet)?;
    let wanted = args.windows.unwrap_or(match longmamba {
        Some(_) => 100,
        None => 20,
    });
    let windows = calibration_windows(&docs, length, wanted)?;
    if windows.len() < wanted {
        eprintln!(
            "warning: the data holds only {} windows of {} tokens (asked for {wanted})",
            windows.len(),
            format_length(length)
        );
    }
    let rows = if longmamba.is_some() {
        0
    } else {
        args.pred_len + 1
    };
    check_memory(
        &model.model,
        length,
        false,
        rows,
        args.model.force,
        &format!("a calibration window of {length} tokens"),
    )?;
    let stop = install_interrupt_flag();
    model.model.set_cancel_flag(Some(stop.clone()));
    let state = state_path(&args.out);
    let identity = model.identity()?;
    let windows_key: Vec<_> = windows.iter().map(|w| json!([w.doc, w.start])).collect();
    let result = match (&longmamba, args.method) {
        (Some(settings), _) => {
            let key = json!({
                "method": "longmamba", "model": identity.clone(), "data": record,
                "windows": windows_key, "settings": settings,
            });
            let run = LongMambaRun {
                settings: settings.clone(),
                key,
                state_path: &state,
            };
            let (mut progress, resumed) = run.load_progress()?;
            let pb = resumable_bar(
                windows.len(),
                progress.windows_done,
                args.quiet,
                "calibrating longmamba",
                resumed.then(|| format!("{} windows done", progress.windows_done)),
                &state,
            );
            let outcome = run.run(
                &model.model,
                &windows,
                &mut progress,
                std::time::Duration::from_secs(10),
                &mut |_| pb.inc(1),
            );
            pb.finish_and_clear();
            outcome.map(|()| {
                let policy = longmamba_policy(&model.model, settings, &progress);
                let globals: Vec<usize> = (0..policy.n_layer)
                    .map(|l| policy.global_channels(l).len())
                    .collect();
                let summary = format!(
                    "longmamba: {} windows of {} tokens; global channels per layer: {globals:?} of {}",
                    windows.len(),
                    format_length(length),
                    policy.d_inner
                );
                let settings = json!({
                    "method": "longmamba", "window_len": length, "windows": windows.len(),
                    "settings": settings, "global_channels_per_layer": globals,
                });
                (Policy::LongMamba(policy), settings, summary)
            })
        }
        (None, CalibratedMethod::Upi) => {
            if !(args.ratio > 0.0 && args.ratio <= 1.0) {
                bail!("--ratio must be in (0, 1], got {}", args.ratio);
            }
            let settings = UpiSettings {
                train_len: args
                    .train_len
                    .unwrap_or(model.decimation_defaults().train_len),
                ratio: args.ratio,
            };
            if settings.train_len >= length {
                bail!(
                    "--length {length} must exceed the training length {}: upi rescales only longer inputs",
                    settings.train_len
                );
            }
            let key = json!({
                "method": "upi", "model": identity.clone(), "data": record,
                "windows": windows_key, "settings": settings,
            });
            let run = UpiRun {
                settings: settings.clone(),
                key,
                state_path: &state,
            };
            let (mut progress, resumed) = run.load_progress()?;
            let pb = resumable_bar(
                windows.len(),
                progress.windows_done,
                args.quiet,
                "calibrating upi",
                resumed.then(|| format!("{} windows done", progress.windows_done)),
                &state,
            );
            let outcome = run.run(&model.model, &windows, &mut progress, &mut |_| pb.inc(1));
            pb.finish_and_clear();
            outcome.map(|()| {
                let policy = run.policy(&model.model, &progress);
                let summary = format!(
                    "upi: {} windows of {} tokens; {} channels per layer rescaled by L / {}",
                    windows.len(),
                    format_length(length),
                    policy.channels.first().map_or(0, Vec::len),
                    settings.train_len
                );
                let record = json!({"method": "upi", "length": length, "windows": windows.len(), "settings": settings});
                (Policy::Upi(policy), record, summary)
            })
        }
        (None, method) => {
            let method = match method {
                CalibratedMethod::Mambaextend => ScaledMethod::MambaExtend,
                _ => ScaledMethod::Modulation,
            };
            let mut settings = method.default_settings(args.seed);
            if let Some(n) = args.iterations {
                settings.iterations = n;
            }
            settings.perturbation = args.perturbation;
            settings.step = args.step;
            if !(settings.perturbation > 0.0 && settings.perturbation.is_finite()) {
                bail!(
                    "--perturbation must be positive, got {}",
                    settings.perturbation
                );
            }
            if !(settings.step >= 0.0 && settings.step.is_finite()) {
                bail!("--step must be ≥ 0, got {}", settings.step);
            }
            let key = json!({
                "method": method.name(), "model": identity.clone(), "data": record,
                "windows": windows_key, "length": length, "pred_len": args.pred_len,
                "spsa": settings,
            });
            let run = SpsaRun {
                method,
                settings: settings.clone(),
                n_layer: model.config().n_layer,
                key,
                state_path: &state,
            };
            let (mut spsa, resumed) = run.load_state()?;
            let pb = resumable_bar(
                settings.iterations,
                spsa.next_iteration,
                args.quiet,
                &format!("calibrating {} at {}", method.name(), format_length(length)),
                resumed.then(|| {
                    format!(
                        "iteration {} of {}",
                        spsa.next_iteration, settings.iterations
                    )
                }),
                &state,
            );
            let mut objective = |p: &Policy| perplexity(&model, &windows, args.pred_len, p);
            let outcome = run
                .run(&mut spsa, &mut objective, &mut |s| {
                    if let Some(last) = s.trace.last() {
                        pb.set_message(format!(
                            "ppl+ {:.3} ppl− {:.3}",
                            last.objective_plus, last.objective_minus
                        ));
                    }
                    pb.inc(1);
                })
                .and_then(|()| {
                    pb.set_message("scoring the result");
                    let vanilla = perplexity(&model, &windows, args.pred_len, &Policy::Vanilla)?;
                    let fitted =
                        perplexity(&model, &windows, args.pred_len, &method.policy(&spsa.theta))?;
                    Ok((vanilla, fitted))
                });
            pb.finish_and_clear();
            outcome.map(|(vanilla, fitted)| {
                let policy = method.policy(&spsa.theta);
                let summary = format!(
                    "{} at {}: calibration perplexity {fitted:.3} (vanilla {vanilla:.3}) over {} windows, {} iterations",
                    method.name(),
                    format_length(length),
                    windows.len(),
                    settings.iterations
                );
                let record = json!({
                    "method": method.name(), "length": length, "pred_len": args.pred_len,
                    "windows": windows.len(), "spsa": settings, "trace": spsa.trace,
                    "objective": {"vanilla": vanilla, "calibrated": fitted},
                });
                (policy, record, summary)
            })
        }
    };
    let (policy, settings, summary) = match result {
        Ok(r) => r,
        Err(_) if stop.load(Ordering::Relaxed) => {
            bail!(
                "interrupted; progress is saved in {} — rerun the same command to resume",
                state.display()
            );
        }
        Err(e) => return Err(e),
    };
    let file = with_provenance(
        policy.to_json(),
        provenance(identity, &record, &windows, settings),
    );
    atomic_write_json(&args.out, &file)?;
    if state.exists() {
        std::fs::remove_file(&state)
            .with_context(|| format!("cannot remove the finished state {}", state.display()))?;
    }
    super::output::println(&format!("{summary}\nwrote {}", args.out.display()))
}
