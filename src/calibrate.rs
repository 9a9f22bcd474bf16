//! Calibration of the methods that fit settings to a model: MambaExtend's Δ scales and Mamba
//! Modulation's A_log scales by SPSA on perplexity at the target length, and LongMamba's
//! per-channel thresholds from Δ statistics at the training length. Runs are deterministic
//! under a seed, save their state as they go (an interrupted run resumes where it stopped),
//! and record where the data came from, so that evaluations can refuse to score a policy on
//! the text it was fitted to.

use crate::eval::common::{atomic_write_json, fnv1a64};
use crate::eval::data::Document;
use crate::eval::ppl::TokenizedDoc;
use crate::eval::EvalModel;
use crate::model::{ForwardOptions, LogitsSpan, MambaModel};
use crate::policy::longmamba::{aggregate_max, window_stats, LayerThresholds, WindowStats};
use crate::policy::spsa::{SpsaSettings, SpsaState};
use crate::policy::{LongMamba, MambaExtend, Modulation, Policy, ScanObserver, ScanView};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// One calibration window: `tokens` are document `doc`'s tokens from `start`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub doc: usize,
    pub start: usize,
    pub tokens: Vec<u32>,
}

/// Up to `count` non-overlapping windows of `length` tokens: each document's first window,
/// then each one's second, and so on (as many documents as possible are used).
pub fn calibration_windows(
    docs: &[TokenizedDoc],
    length: usize,
    count: usize,
) -> Result<Vec<Window>> {
    if length == 0 || count == 0 {
        bail!("calibration needs a positive window length and window count");
    }
    let longest = docs.iter().map(|d| d.tokens.len()).max().unwrap_or(0);
    if longest < length {
        bail!(
            "no calibration document has {length} tokens (the longest has {longest}): give longer text or a shorter --length"
        );
    }
    let mut windows = Vec::new();
    for k in 0.. {
        let before = windows.len();
        for (doc, d) in docs.iter().enumerate() {
            let start = k * length;
            if windows.len() < count && start + length <= d.tokens.len() {
                windows.push(Window {
                    doc,
                    start,
                    tokens: d.tokens[start..start + length].to_vec(),
                });
            }
        }
        if windows.len() == count || windows.len() == before {
            break;
        }
    }
    Ok(windows)
}

/// Where calibration text came from: each file's bytes and each document's text, hashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    pub files: Vec<HashedItem>,
    pub documents: Vec<HashedItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HashedItem {
    pub name: String,
    pub bytes: usize,
    pub fnv1a64: String,
}

fn hashed(name: String, bytes: &[u8]) -> HashedItem {
    HashedItem {
        name,
        bytes: bytes.len(),
        fnv1a64: format!("{:016x}", fnv1a64(bytes)),
    }
}

impl DataRecord {
    pub fn of(files: &[PathBuf], docs: &[Document]) -> Result<Self> {
        let files = files
            .iter()
            .map(|p| {
                let bytes =
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                Ok(hashed(p.display().to_string(), &bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        let documents = docs
            .iter()
            .map(|d| hashed(d.name.clone(), d.text.as_bytes()))
            .collect();
        Ok(Self { files, documents })
    }

    /// The calibration data recorded in a policy file's provenance, if any.
    pub fn from_policy_file(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read policy {}", path.display()))?;
        let value: Value = serde_json::from_str(crate::eval::common::strip_bom(&text))
            .with_context(|| format!("invalid policy JSON in {}", path.display()))?;
        match value.pointer("/provenance/calibration/data") {
            None => Ok(None),
            Some(d) => Ok(Some(serde_json::from_value(d.clone()).with_context(
                || format!("unreadable calibration data record in {}", path.display()),
            )?)),
        }
    }

    /// Refuses evaluation data (`files`, and the documents read from them) that shares a
    /// file or a document with this calibration data: a calibrated policy must be scored
    /// on held-out text. `policy` names the policy in the error.
    pub fn check_disjoint(&self, policy: &str, eval: &DataRecord) -> Result<()> {
        let clash = |a: &[HashedItem], b: &[HashedItem]| {
            a.iter()
                .find(|x| {
                    b.iter()
                        .any(|y| x.fnv1a64 == y.fnv1a64 && x.bytes == y.bytes)
                })
                .cloned()
        };
        if let Some(f) = clash(&eval.files, &self.files) {
            bail!(
                "policy {policy} was calibrated on {}, which is also in the evaluation data: evaluate on held-out text",
                f.name
            );
        }
        if let Some(d) = clash(&eval.documents, &self.documents) {
            bail!(
                "policy {policy} was calibrated on a document that is also in the evaluation data ({}): evaluate on held-out text",
                d.name
            );
        }
        Ok(())
    }
}

/// The per-layer scale a calibration fits by SPSA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaledMethod {
    /// MambaExtend's Δ scale per layer.
    MambaExtend,
    /// Mamba Modulation's A_log scale per layer.
    Modulation,
}

impl ScaledMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::MambaExtend => crate::policy::MAMBAEXTEND,
            Self::Modulation => crate::policy::MODULATION,
        }
    }

    /// The official calibration loop's settings.
    pub fn default_settings(self, seed: u64) -> SpsaSettings {
        match self {
            Self::MambaExtend => SpsaSettings::mambaextend(seed),
            Self::Modulation => SpsaSettings::modulation(seed),
        }
    }

    /// The policy with scales `theta`, one per layer.
    pub fn policy(self, theta: &[f64]) -> Policy {
        let scales: Vec<f32> = theta.iter().map(|&t| t as f32).collect();
        match self {
            Self::MambaExtend => Policy::MambaExtend(MambaExtend::per_layer(scales)),
            Self::Modulation => Policy::Modulation(Modulation {
                a_log_scale: scales,
            }),
        }
    }
}

/// Perplexity of the last `pred_len` tokens of every window under `policy`, pooled over
/// all scored tokens: the quantity `eval-ppl` reports, on calibration text.
pub fn perplexity(
    model: &dyn EvalModel,
    windows: &[Window],
    pred_len: usize,
    policy: &Policy,
) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for w in windows {
        let score = model.score_tail(&w.tokens, pred_len, policy)?;
        sum += score.nll.iter().map(|&v| v as f64).sum::<f64>();
        n += score.nll.len();
    }
    if n == 0 {
        bail!("the calibration windows score no tokens");
    }
    Ok((sum / n as f64).exp())
}

/// A calibration's saved state: what the run was started with (`key`: model, data,
/// windows, settings) and where it stands. Written after each step, read on a rerun.
#[derive(Serialize, Deserialize)]
struct Checkpoint<T> {
    key: Value,
    state: T,
}

/// The state saved at `path` when it belongs to the run `key`; `None` when there is none.
fn load_checkpoint<T: serde::de::DeserializeOwned>(path: &Path, key: &Value) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read calibration state {}", path.display()))?;
    let saved: Checkpoint<T> = serde_json::from_str(&text).with_context(|| {
        format!(
            "calibration state {} is corrupt: delete it to start over",
            path.display()
        )
    })?;
    if &saved.key != key {
        bail!(
            "calibration state {} belongs to a run with other settings, model or data: delete it, or write to another --out",
            path.display()
        );
    }
    Ok(Some(saved.state))
}

fn save_checkpoint<T: Serialize + Clone>(path: &Path, key: &Value, state: &T) -> Result<()> {
    atomic_write_json(
        path,
        &Checkpoint {
            key: key.clone(),
            state: state.clone(),
        },
    )
}

/// A resumable SPSA calibration of one per-layer scale.
pub struct SpsaRun<'a> {
    pub method: ScaledMethod,
    pub settings: SpsaSettings,
    pub n_layer: usize,
    /// Everything a result depends on (model, data, windows, lengths, settings): a saved
    /// state is resumed only when this matches.
    pub key: Value,
    /// Where the state is saved after each iteration.
    pub state_path: &'a Path,
}

impl SpsaRun<'_> {
    /// The saved state when it matches this run, a fresh one when there is none.
    pub fn load_state(&self) -> Result<(SpsaState, bool)> {
        let path = self.state_path;
        let Some(saved) = load_checkpoint::<SpsaState>(path, &self.key)? else {
            return Ok((SpsaState::initial(self.n_layer, &self.settings), false));
        };
        if saved.theta.len() != self.n_layer {
            bail!(
                "calibration state {} has the wrong number of scales",
                path.display()
            );
        }
        Ok((saved, true))
    }

    /// Runs the remaining iterations from `state`, saving after each; `objective` scores a
    /// policy (lower is better) and `on_step` sees each finished iteration.
    pub fn run(
        &self,
        state: &mut SpsaState,
        objective: &mut dyn FnMut(&Policy) -> Result<f64>,
        on_step: &mut dyn FnMut(&SpsaState),
    ) -> Result<()> {
        while !state.done(&self.settings) {
            let method = self.method;
            state.step(&self.settings, |theta| objective(&method.policy(theta)))?;
            save_checkpoint(self.state_path, &self.key, state)?;
            on_step(state);
        }
        Ok(())
    }
}

/// LongMamba's calibration settings (defaults: theirs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongMambaSettings {
    /// Window length: the model's training length.
    pub train_len: usize,
    /// Target lengths Lt, ascending.
    pub lengths: Vec<usize>,
    pub clamp_fraction: f64,
    pub global_threshold: f32,
    pub activate_from: usize,
}

impl LongMambaSettings {
    pub fn check(&self) -> Result<()> {
        if !(self.clamp_fraction > 0.0 && self.clamp_fraction <= 1.0) {
            bail!(
                "--clamp-fraction must be in (0, 1], got {}",
                self.clamp_fraction
            );
        }
        if !self.global_threshold.is_finite() || self.global_threshold < 0.0 {
            bail!(
                "--global-threshold must be finite and ≥ 0, got {}",
                self.global_threshold
            );
        }
        if self.lengths.is_empty() {
            bail!("longmamba needs at least one target length");
        }
        if let Some(&l) = self.lengths.iter().find(|&&l| l <= self.train_len) {
            bail!(
                "target length {l} is not beyond the training length {}: longmamba only acts on longer inputs",
                self.train_len
            );
        }
        Ok(())
    }
}

/// Records each layer's Δ and A over a forward pass (chunks appended in order).
struct DeltaRecorder {
    delta: RefCell<Vec<Vec<f32>>>,
    a: RefCell<Vec<Vec<f32>>>,
}

impl ScanObserver for DeltaRecorder {
    fn on_scan(&self, view: &ScanView) -> Result<()> {
        self.delta.borrow_mut()[view.layer].extend_from_slice(view.delta);
        let mut a = self.a.borrow_mut();
        if a[view.layer].is_empty() {
            a[view.layer] = view.a.to_vec();
        }
        Ok(())
    }
}

/// Statistics of the windows seen so far, per layer (what a LongMamba run resumes from).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LongMambaProgress {
    pub windows_done: usize,
    /// Per layer: decay per channel and θ per (length, channel), max over windows so far.
    pub decay: Vec<Vec<f64>>,
    pub thresholds: Vec<Vec<Vec<f64>>>,
}

impl LongMambaProgress {
    /// Folds one window's per-layer statistics in (element-wise max).
    pub fn add(&mut self, stats: Vec<WindowStats>) {
        if self.windows_done == 0 {
            self.decay = stats.iter().map(|s| s.decay.clone()).collect();
            self.thresholds = stats.into_iter().map(|s| s.thresholds).collect();
        } else {
            for (l, s) in stats.iter().enumerate() {
                let mut acc = WindowStats {
                    decay: std::mem::take(&mut self.decay[l]),
                    thresholds: std::mem::take(&mut self.thresholds[l]),
                };
                aggregate_max(&mut acc, s);
                self.decay[l] = acc.decay;
                self.thresholds[l] = acc.thresholds;
            }
        }
        self.windows_done += 1;
    }
}

/// One window's LongMamba statistics for every layer, from a vanilla forward pass.
pub fn longmamba_window(
    model: &MambaModel,
    tokens: &[u32],
    settings: &LongMambaSettings,
) -> Result<Vec<WindowStats>> {
    let c = model.config();
    let recorder = DeltaRecorder {
        delta: RefCell::new(vec![Vec::new(); c.n_layer]),
        a: RefCell::new(vec![Vec::new(); c.n_layer]),
    };
    let ids = Tensor::from_slice(tokens, (1, tokens.len()), model.device())?;
    let mut state = model.new_state(1);
    let opts = ForwardOptions {
        logits: LogitsSpan::None,
        observer: Some(&recorder),
        ..Default::default()
    };
    model.forward_with_state(&ids, &mut state, &opts)?;
    let (delta, a) = (recorder.delta.into_inner(), recorder.a.into_inner());
    Ok(delta
        .iter()
        .zip(&a)
        .map(|(d, a)| {
            window_stats(
                d,
                c.d_inner,
                a,
                c.d_state,
                settings.clamp_fraction,
                &settings.lengths,
            )
        })
        .collect())
}

/// The LongMamba policy from finished statistics.
pub fn longmamba_policy(
    model: &MambaModel,
    settings: &LongMambaSettings,
    progress: &LongMambaProgress,
) -> LongMamba {
    let c = model.config();
    LongMamba {
        train_len: settings.train_len,
        activate_from: settings.activate_from,
        global_threshold: settings.global_threshold,
        clamp_fraction: settings.clamp_fraction,
        n_layer: c.n_layer,
        d_inner: c.d_inner,
        lengths: settings.lengths.clone(),
        layers: progress
            .decay
            .iter()
            .zip(&progress.thresholds)
            .map(|(d, t)| LayerThresholds {
                decay: d.iter().map(|&v| v as f32).collect(),
                thresholds: t
                    .iter()
                    .map(|row| row.iter().map(|&v| v as f32).collect())
                    .collect(),
            })
            .collect(),
    }
}

/// A resumable LongMamba calibration over `windows`.
pub struct LongMambaRun<'a> {
    pub settings: LongMambaSettings,
    pub key: Value,
    pub state_path: &'a Path,
}

impl LongMambaRun<'_> {
    pub fn load_progress(&self) -> Result<(LongMambaProgress, bool)> {
        Ok(match load_checkpoint(self.state_path, &self.key)? {
            Some(p) => (p, true),
            None => (LongMambaProgress::default(), false),
        })
    }

    /// Adds the windows not yet seen, saving at most every `save_every` (and at the end).
    pub fn run(
        &self,
        model: &MambaModel,
        windows: &[Window],
        progress: &mut LongMambaProgress,
        save_every: std::time::Duration,
        on_window: &mut dyn FnMut(&LongMambaProgress),
    ) -> Result<()> {
        let mut saved_at = std::time::Instant::now();
        for w in &windows[progress.windows_done.min(windows.len())..] {
            let stats = longmamba_window(model, &w.tokens, &self.settings)?;
            progress.add(stats);
            if saved_at.elapsed() >= save_every || progress.windows_done == windows.len() {
                save_checkpoint(self.state_path, &self.key, progress)?;
                saved_at = std::time::Instant::now();
            }
            on_window(progress);
        }
        Ok(())
    }
}

/// The provenance of a calibrated policy file: tool, model, data, windows and settings.
pub fn provenance(
    model_identity: Value,
    data: &DataRecord,
    windows: &[Window],
    calibration: Value,
) -> Value {
    json!({
        "tool": format!("decimamba {}", env!("CARGO_PKG_VERSION")),
        "model": model_identity,
        "calibration": {
            "data": data,
            "windows": windows.iter().map(|w| json!({"doc": w.doc, "start": w.start, "len": w.tokens.len()})).collect::<Vec<_>>(),
            "settings": calibration,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, n: usize) -> TokenizedDoc {
        TokenizedDoc {
            name: name.into(),
            tokens: (0..n as u32).collect(),
        }
    }

    #[test]
    fn windows_spread_over_documents_and_never_overlap() {
        let docs = [doc("a", 35), doc("b", 12), doc("c", 5)];
        let w = calibration_windows(&docs, 10, 10).unwrap();
        let at: Vec<(usize, usize)> = w.iter().map(|w| (w.doc, w.start)).collect();
        assert_eq!(at, vec![(0, 0), (1, 0), (0, 10), (0, 20)]);
        assert!(w.iter().all(|w| w.tokens.len() == 10));
        assert_eq!(calibration_windows(&docs, 10, 2).unwrap().len(), 2);
        let e = calibration_windows(&docs, 40, 3).unwrap_err().to_string();
        assert!(e.contains("no calibration document has 40 tokens"), "{e}");
    }

    #[test]
    fn overlapping_data_is_refused() {
        let item = |name: &str, text: &str| hashed(name.into(), text.as_bytes());
        let calib = DataRecord {
            files: vec![item("calib.txt", "alpha beta")],
            documents: vec![item("calib.txt", "alpha beta")],
        };
        let held_out = DataRecord {
            files: vec![item("eval.txt", "gamma")],
            documents: vec![item("eval.txt", "gamma")],
        };
        calib.check_disjoint("p.json", &held_out).unwrap();
        let same_doc = DataRecord {
            files: vec![item("all.jsonl", "{..}")],
            documents: vec![item("all.jsonl:1", "alpha beta")],
        };
        let e = calib
            .check_disjoint("p.json", &same_doc)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("also in the evaluation data (all.jsonl:1)"),
            "{e}"
        );
        let e = calib
            .check_disjoint("p.json", &calib)
            .unwrap_err()
            .to_string();
        assert!(e.contains("calibrated on calib.txt"), "{e}");
    }

    #[test]
    fn longmamba_settings_are_checked() {
        let ok = LongMambaSettings {
            train_len: 100,
            lengths: vec![200, 400],
            clamp_fraction: 0.15,
            global_threshold: 0.05,
            activate_from: 150,
        };
        ok.check().unwrap();
        let e = LongMambaSettings {
            lengths: vec![100],
            ..ok.clone()
        };
        assert!(e.check().unwrap_err().to_string().contains("not beyond"));
        let e = LongMambaSettings {
            clamp_fraction: 0.0,
            ..ok
        };
        assert!(e.check().is_err());
    }
}

/// UPI's calibration: per-channel MMD of every layer on windows of the target length,
/// averaged, and the top `ratio` channels per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpiSettings {
    pub train_len: usize,
    pub ratio: f64,
}

/// Sums of per-channel MMD over the windows seen so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpiProgress {
    pub windows_done: usize,
    pub sums: Vec<Vec<f64>>,
}

/// A resumable UPI calibration.
pub struct UpiRun<'a> {
    pub settings: UpiSettings,
    pub key: Value,
    pub state_path: &'a Path,
}

impl UpiRun<'_> {
    pub fn load_progress(&self) -> Result<(UpiProgress, bool)> {
        Ok(match load_checkpoint(self.state_path, &self.key)? {
            Some(p) => (p, true),
            None => (UpiProgress::default(), false),
        })
    }

    /// Adds the windows not yet seen (saving after each).
    pub fn run(
        &self,
        model: &MambaModel,
        windows: &[Window],
        progress: &mut UpiProgress,
        on_window: &mut dyn FnMut(&UpiProgress),
    ) -> Result<()> {
        let n_layer = model.config().n_layer;
        let settings = crate::analysis::AnalysisSettings {
            layers: (0..n_layer).collect(),
            train_len: self.settings.train_len,
            map_size: 0,
            map_channel_stride: crate::analysis::MAP_CHANNEL_STRIDE,
            channel_mmd: true,
        };
        for w in &windows[progress.windows_done.min(windows.len())..] {
            let reports =
                crate::analysis::analyze(model, &w.tokens, &Policy::Vanilla, 1, &settings)?;
            if progress.sums.is_empty() {
                progress.sums = reports
                    .iter()
                    .map(|r| vec![0.0; r.channel_mmd.len()])
                    .collect();
            }
            for (acc, r) in progress.sums.iter_mut().zip(&reports) {
                for (a, v) in acc.iter_mut().zip(&r.channel_mmd) {
                    *a += v;
                }
            }
            progress.windows_done += 1;
            save_checkpoint(self.state_path, &self.key, progress)?;
            on_window(progress);
        }
        Ok(())
    }

    /// The policy from finished sums: the mean MMD per channel ranks the channels.
    pub fn policy(&self, model: &MambaModel, progress: &UpiProgress) -> crate::policy::Upi {
        let c = model.config();
        let n = progress.windows_done.max(1) as f64;
        crate::policy::Upi {
            train_len: self.settings.train_len,
            ratio: self.settings.ratio,
            n_layer: c.n_layer,
            d_inner: c.d_inner,
            channels: progress
                .sums
                .iter()
                .map(|s| {
                    let mean: Vec<f64> = s.iter().map(|v| v / n).collect();
                    crate::policy::upi::top_channels(&mean, self.settings.ratio)
                })
                .collect(),
        }
    }
}
