//! The paper's receptive-field analyses, read from the model's own scan inputs through a
//! [`ScanObserver`] (so nothing here re-implements the forward):
//! - hidden attention (DeciMamba, Ali et al.'s "hidden attention" of Mamba; the authors'
//!   `calculate_mamba_attn_maps.ipynb`): for channel c,
//!   α^c[i,j] = Σ_n C[i,n] · exp(A[c,n] · Σ_{k=j+1..i} Δ[k,c]) · Δ[j,c] · B[j,n], j ≤ i;
//! - the map of a layer: the signed mean of α^c over channels 0, 150, 300, … then |·| over
//!   its maximum (the notebook's protocol), downsampled to at most `map_size`² cells;
//! - the last token's attention row a_j = mean_c |α^c[L−1, j]|, in O(L·N) per channel with
//!   prefix sums of Δ;
//! - Mamba Mean Distance MMD = Σ_j (L−1−j)·a_j / Σ_j a_j (DeciMamba Eq. 8 as UPI restates it),
//!   and per channel with |α^c| in place of a;
//! - ΣΔ: the mean over channels of Σ_t Δ[t,c] (DeciMamba Fig. 3 right);
//! - ERF-90: the smallest distance d with Σ_{j ≥ L−1−d} a_j ≥ 0.9 · Σ_j a_j;
//! - LongMamba's global-channel share: channels with exp(max_n A[c,n] · S_c) > 0.05, S_c the
//!   sum of Δ clamped at its k-th largest value (k = max(1, int(L·0.15))), over the first
//!   `train_len` tokens;
//! - the Δt profile ‖Δ_t‖₂ of every token a layer sees, with the ones its plan keeps.
//!
//! Under a policy that drops tokens, a layer's attention is that of the rows its scan
//! consumes. scripts/analysis_reference.py is the independent reference.
//!
//! Memory: two forward passes. The first keeps per layer the prefix sums, ‖Δ_t‖ and (only
//! where a map is drawn) B, C and the map channels' Δ per token; the second streams the
//! last-token row. Nothing is O(L²) or O(L·d_inner) per layer, except the first `train_len`
//! rows of Δ for the global share.

pub mod find_layer;
pub mod plot;

use crate::model::{ForwardOptions, LogitsSpan, MambaModel};
use crate::policy::{Policy, ScanObserver, ScanView};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;
use std::cell::{Cell, RefCell};

/// What to compute.
#[derive(Debug, Clone)]
pub struct AnalysisSettings {
    /// Layers analysed (ascending).
    pub layers: Vec<usize>,
    /// The training length: the global share is computed over this many first tokens.
    pub train_len: usize,
    /// Side of the downsampled attention map (0: no map).
    pub map_size: usize,
    /// Map channels: 0, stride, 2·stride, … below d_inner (the notebook's 150).
    pub map_channel_stride: usize,
    /// Per-channel MMD (UPI's ranking).
    pub channel_mmd: bool,
}

/// The notebook's map channel stride.
pub const MAP_CHANNEL_STRIDE: usize = 150;
/// LongMamba's clamp fraction and global threshold (their defaults).
pub const CLAMP_FRACTION: f64 = 0.15;
pub const GLOBAL_THRESHOLD: f64 = 0.05;
/// The share of the last token's attention mass the effective receptive field holds.
pub const ERF_MASS: f64 = 0.9;

/// A layer's hidden-attention map: `size`² cells, row-major, in [0, 1]. Cell (k, b) is the
/// largest |M[i_k, j]| over column block b, i_k the last row of row block k.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionMap {
    pub size: usize,
    pub values: Vec<f32>,
}

/// One layer's analysis of one input.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub layer: usize,
    /// Tokens the layer's scan consumed.
    pub tokens: usize,
    pub mean_distance: f64,
    pub delta_sum_mean: f64,
    pub erf_90: usize,
    pub global_channel_share: f64,
    /// ‖Δ_t‖₂ of every row of the layer's input.
    #[serde(skip)]
    pub delta_norm: Vec<f32>,
    /// Input position (token index in the prompt) of every row of the layer's input.
    #[serde(skip)]
    pub positions: Vec<usize>,
    /// Rows of the layer's input its scan consumed.
    #[serde(skip)]
    pub kept_rows: Vec<usize>,
    /// a_j over the consumed rows.
    #[serde(skip)]
    pub last_row: Vec<f64>,
    /// MMD of each channel (when asked for).
    #[serde(skip)]
    pub channel_mmd: Vec<f64>,
    /// Σ_j α^c[L−1, j]·x[j, c] per channel: the scan output at the last token without D·x.
    #[serde(skip)]
    pub last_output: Vec<f64>,
    #[serde(skip)]
    pub map: Option<AttentionMap>,
}

/// Per-layer state of the first pass.
#[derive(Default)]
struct Collected {
    input_rows: usize,
    delta_norm: Vec<f32>,
    kept_rows: Vec<usize>,
    /// Running Σ Δ per channel over consumed rows (after the pass: S at the last row).
    sum: Vec<f64>,
    a: Vec<f32>,
    c_last: Vec<f32>,
    head_delta: Vec<f32>,
    /// Where a map is drawn: per consumed row, C, B, and Δ and S of the map channels.
    c_rows: Vec<f32>,
    b_rows: Vec<f32>,
    delta_map: Vec<f32>,
    sum_map: Vec<f64>,
}

/// Per-layer state of the second pass.
#[derive(Default)]
struct Streamed {
    sum: Vec<f64>,
    rows: usize,
    last_row: Vec<f64>,
    num: Vec<f64>,
    den: Vec<f64>,
    out: Vec<f64>,
}

struct Analyser<'a> {
    settings: &'a AnalysisSettings,
    map_channels: Vec<usize>,
    d_inner: usize,
    d_state: usize,
    second_pass: Cell<bool>,
    collected: RefCell<Vec<Collected>>,
    streamed: RefCell<Vec<Streamed>>,
}

/// The rows of `view` the scan consumes.
fn consumed(view: &ScanView) -> Vec<usize> {
    match view.kept {
        Some(k) => k.to_vec(),
        None => (0..view.len).collect(),
    }
}

impl Analyser<'_> {
    fn collect(&self, v: &ScanView) {
        let di = self.d_inner;
        let mut all = self.collected.borrow_mut();
        let c = &mut all[v.layer];
        if c.sum.is_empty() {
            c.sum = vec![0.0; di];
            c.a = v.a.to_vec();
        }
        let base = c.input_rows;
        for r in 0..v.len {
            let d = v.delta_row(r);
            c.delta_norm
                .push(d.iter().map(|x| x * x).sum::<f32>().sqrt());
        }
        let with_map = self.settings.map_size > 0;
        let rows = consumed(v);
        for &r in &rows {
            c.kept_rows.push(base + r);
            let d = v.delta_row(r);
            for (s, &x) in c.sum.iter_mut().zip(d) {
                *s += x as f64;
            }
            if c.kept_rows.len() <= self.settings.train_len {
                c.head_delta.extend_from_slice(d);
            }
            if with_map {
                c.c_rows.extend_from_slice(v.c(r));
                c.b_rows.extend_from_slice(v.b(r));
                for &m in &self.map_channels {
                    c.delta_map.push(d[m]);
                    c.sum_map.push(c.sum[m]);
                }
            }
        }
        if let Some(&last) = rows.last() {
            c.c_last = v.c(last).to_vec();
        }
        c.input_rows += v.len;
    }

    /// The last-token row over this view's consumed rows, parallel over channel blocks.
    fn stream(&self, v: &ScanView) {
        let (di, n) = (self.d_inner, self.d_state);
        let collected = self.collected.borrow();
        let col = &collected[v.layer];
        let mut all = self.streamed.borrow_mut();
        let st = &mut all[v.layer];
        if st.sum.is_empty() {
            st.sum = vec![0.0; di];
            st.num = vec![0.0; di];
            st.den = vec![0.0; di];
            st.out = vec![0.0; di];
        }
        let rows = consumed(v);
        let total = col.kept_rows.len();
        let c_last: Vec<f64> = col.c_last.iter().map(|&x| x as f64).collect();
        let a = &col.a;
        let s_end = &col.sum;
        const BLOCK: usize = 32;
        let first_row = st.rows;
        let partial: Vec<Vec<f64>> = st
            .sum
            .par_chunks_mut(BLOCK)
            .zip(st.num.par_chunks_mut(BLOCK))
            .zip(st.den.par_chunks_mut(BLOCK))
            .zip(st.out.par_chunks_mut(BLOCK))
            .enumerate()
            .map(|(blk, (((sum, num), den), out))| {
                let c0 = blk * BLOCK;
                let mut row_sums = vec![0f64; rows.len()];
                for (ri, &r) in rows.iter().enumerate() {
                    let d = v.delta_row(r);
                    let b = v.b(r);
                    let x = &v.x[r * di..(r + 1) * di];
                    let dist = (total - 1 - (first_row + ri)) as f64;
                    for k in 0..sum.len() {
                        let c = c0 + k;
                        sum[k] += d[c] as f64;
                        let gap = s_end[c] - sum[k];
                        let mut acc = 0f64;
                        for s in 0..n {
                            acc += c_last[s] * b[s] as f64 * (a[c * n + s] as f64 * gap).exp();
                        }
                        let alpha = d[c] as f64 * acc;
                        row_sums[ri] += alpha.abs();
                        num[k] += dist * alpha.abs();
                        den[k] += alpha.abs();
                        out[k] += alpha * x[c] as f64;
                    }
                }
                row_sums
            })
            .collect();
        for ri in 0..rows.len() {
            let s: f64 = partial.iter().map(|p| p[ri]).sum();
            st.last_row.push(s / di as f64);
        }
        st.rows += rows.len();
    }

    fn report(&self, layer: usize, positions: Vec<usize>) -> LayerReport {
        let (di, n) = (self.d_inner, self.d_state);
        let col = std::mem::take(&mut self.collected.borrow_mut()[layer]);
        let st = std::mem::take(&mut self.streamed.borrow_mut()[layer]);
        let t = col.kept_rows.len();
        let a_row = &st.last_row;
        let mass: f64 = a_row.iter().sum();
        let mean_distance = match mass > 0.0 {
            true => {
                a_row
                    .iter()
                    .enumerate()
                    .map(|(j, v)| (t - 1 - j) as f64 * v)
                    .sum::<f64>()
                    / mass
            }
            false => 0.0,
        };
        let mut erf_90 = t.saturating_sub(1);
        let mut suffix = 0.0;
        for d in 0..t {
            suffix += a_row[t - 1 - d];
            if suffix >= ERF_MASS * mass {
                erf_90 = d;
                break;
            }
        }
        let channel_mmd = match self.settings.channel_mmd {
            true => st
                .num
                .iter()
                .zip(&st.den)
                .map(|(a, b)| if *b > 0.0 { a / b } else { 0.0 })
                .collect(),
            false => Vec::new(),
        };
        let global_channel_share = global_share(&col.head_delta, &col.a, di, n);
        let map = self.map(&col, t);
        LayerReport {
            layer,
            tokens: t,
            mean_distance,
            delta_sum_mean: col.sum.iter().sum::<f64>() / di as f64,
            erf_90,
            global_channel_share,
            delta_norm: col.delta_norm,
            positions,
            kept_rows: col.kept_rows,
            last_row: st.last_row,
            channel_mmd,
            last_output: st.out,
            map,
        }
    }

    /// The downsampled map from the first pass's per-row data.
    fn map(&self, col: &Collected, t: usize) -> Option<AttentionMap> {
        if self.settings.map_size == 0 || t == 0 || self.map_channels.is_empty() {
            return None;
        }
        let (n, m) = (self.d_state, self.map_channels.len());
        let p = self.settings.map_size.min(t);
        let channels = &self.map_channels;
        let cells: Vec<Vec<f64>> = (0..p)
            .into_par_iter()
            .map(|k| {
                let i = (k + 1) * t / p - 1;
                let mut row = vec![0f64; p];
                let ci = &col.c_rows[i * n..(i + 1) * n];
                for j in 0..=i {
                    let bj = &col.b_rows[j * n..(j + 1) * n];
                    let mut mean = 0f64;
                    for (q, &c) in channels.iter().enumerate() {
                        let gap = col.sum_map[i * m + q] - col.sum_map[j * m + q];
                        let mut acc = 0f64;
                        for s in 0..n {
                            acc +=
                                ci[s] as f64 * (col.a[c * n + s] as f64 * gap).exp() * bj[s] as f64;
                        }
                        mean += acc * col.delta_map[j * m + q] as f64;
                    }
                    let v = (mean / m as f64).abs();
                    let b = j * p / t;
                    row[b] = row[b].max(v);
                }
                row
            })
            .collect();
        let max = cells.iter().flatten().fold(0f64, |a, &b| a.max(b));
        let scale = if max > 0.0 { 1.0 / max } else { 0.0 };
        Some(AttentionMap {
            size: p,
            values: cells
                .into_iter()
                .flatten()
                .map(|v| (v * scale) as f32)
                .collect(),
        })
    }
}

impl ScanObserver for Analyser<'_> {
    fn observes(&self, layer: usize) -> bool {
        self.settings.layers.binary_search(&layer).is_ok()
    }

    fn on_scan(&self, view: &ScanView) -> Result<()> {
        if view.batch != 1 {
            bail!(
                "the analyses run on one sequence (batch 1), got {}",
                view.batch
            );
        }
        match self.second_pass.get() {
            false => self.collect(view),
            true => self.stream(view),
        }
        Ok(())
    }
}

/// LongMamba's global-channel share over `delta` (`[rows, d_inner]`).
pub fn global_share(delta: &[f32], a: &[f32], d_inner: usize, d_state: usize) -> f64 {
    let rows = delta.len() / d_inner;
    if rows == 0 {
        return 0.0;
    }
    let k = ((rows as f64 * CLAMP_FRACTION) as usize).max(1);
    let global = (0..d_inner)
        .filter(|&c| {
            let mut col: Vec<f64> = (0..rows).map(|t| delta[t * d_inner + c] as f64).collect();
            col.sort_by(|x, y| y.total_cmp(x));
            let cap = col[k.min(rows) - 1];
            let s: f64 = col.iter().map(|v| v.min(cap)).sum();
            let slowest = a[c * d_state..(c + 1) * d_state]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            (slowest * s).exp() > GLOBAL_THRESHOLD
        })
        .count();
    global as f64 / d_inner as f64
}

/// The analyses of `ids` (one prompt) under `policy`, for `settings.layers`.
pub fn analyze(
    model: &MambaModel,
    ids: &[u32],
    policy: &Policy,
    protected_tail: usize,
    settings: &AnalysisSettings,
) -> Result<Vec<LayerReport>> {
    let cfg = model.config();
    if ids.is_empty() {
        bail!("nothing to analyse: the input has no tokens");
    }
    if let Some(&l) = settings.layers.iter().find(|&&l| l >= cfg.n_layer) {
        bail!(
            "layer {l} does not exist: the model has {} layers",
            cfg.n_layer
        );
    }
    if let Some(p) = policy.as_option() {
        p.check(cfg)?;
    }
    let analyser = Analyser {
        settings,
        map_channels: match settings.map_channel_stride {
            0 => vec![0],
            s => (0..cfg.d_inner).step_by(s).collect(),
        },
        d_inner: cfg.d_inner,
        d_state: cfg.d_state,
        second_pass: Cell::new(false),
        collected: RefCell::new((0..cfg.n_layer).map(|_| Collected::default()).collect()),
        streamed: RefCell::new((0..cfg.n_layer).map(|_| Streamed::default()).collect()),
    };
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    let run = |record: bool| -> Result<crate::model::ForwardTrace> {
        let mut state = model.new_state(1);
        let opts = ForwardOptions {
            policy: policy.as_option(),
            protected_tail,
            logits: LogitsSpan::None,
            record_indices: record,
            observer: Some(&analyser),
        };
        Ok(model.forward_with_state(&t, &mut state, &opts)?.1)
    };
    let trace = run(true)?;
    analyser.second_pass.set(true);
    run(false)?;
    // Prompt positions of each layer's input rows, through the earlier layers' choices.
    let mut positions: Vec<usize> = (0..ids.len()).collect();
    let mut reports = Vec::new();
    for (l, lt) in trace.layers.iter().enumerate() {
        if settings.layers.binary_search(&l).is_ok() {
            reports.push(analyser.report(l, positions.clone()));
        }
        if let Some(k) = &lt.kept {
            positions = k.iter().map(|&i| positions[i]).collect();
        }
    }
    Ok(reports)
}

/// The analyses of one input length.
#[derive(Debug, Clone)]
pub struct LengthAnalysis {
    pub length: usize,
    /// The needle's prompt positions (start, tokens), for a passkey prompt.
    pub needle: Option<(usize, usize)>,
    pub layers: Vec<LayerReport>,
}

/// `--json`: one object for one length, else one per length under `lengths`.
pub fn summary_json(model: &str, policy: &Policy, runs: &[LengthAnalysis]) -> serde_json::Value {
    let one = |r: &LengthAnalysis| {
        serde_json::json!({
            "model": model,
            "policy": policy.to_json(),
            "tokens": r.length,
            "needle": r.needle.map(|(s, n)| serde_json::json!({"start": s, "tokens": n})),
            "layers": r.layers,
        })
    };
    match runs {
        [r] => one(r),
        _ => serde_json::json!({
            "model": model,
            "policy": policy.to_json(),
            "lengths": runs.iter().map(one).collect::<Vec<_>>(),
        }),
    }
}

/// The terminal table: one block per length, a row per layer.
pub fn table(runs: &[LengthAnalysis]) -> String {
    let mut out = String::new();
    for r in runs {
        out.push_str(&format!(
            "{} tokens\nlayer  tokens      MMD   ERF-90       ΣΔ  global share\n",
            crate::eval::common::format_length(r.length)
        ));
        for l in &r.layers {
            out.push_str(&format!(
                "{:>5} {:>7} {:>8.1} {:>8} {:>8.1} {:>13.3}\n",
                l.layer,
                l.tokens,
                l.mean_distance,
                l.erf_90,
                l.delta_sum_mean,
                l.global_channel_share
            ));
        }
        out.push('\n');
    }
    out
}

/// Figure files `write_figures` writes.
pub const GRID_PNG: &str = "attention-grid.png";
pub const MMD_PNG: &str = "mmd.png";
pub const DELTA_SUM_PNG: &str = "delta-sum.png";
pub const PROFILE_PNG: &str = "delta-profile.png";

/// The figures of `runs` into `dir`; returns the files written.
pub fn write_figures(
    dir: &std::path::Path,
    model: &str,
    runs: &[LengthAnalysis],
) -> Result<Vec<&'static str>> {
    use crate::eval::common::format_length;
    use crate::eval::plot::LineSeries;
    let mut written = Vec::new();
    let Some(longest) = runs.iter().max_by_key(|r| r.length) else {
        return Ok(written);
    };
    let layers: Vec<usize> = longest.layers.iter().map(|l| l.layer).collect();
    let with_maps: Vec<&LengthAnalysis> = runs
        .iter()
        .filter(|r| r.layers.iter().any(|l| l.map.is_some()))
        .collect();
    if let (Some(short), Some(long)) = (with_maps.first(), with_maps.last()) {
        let mut picks = vec![*short];
        if long.length != short.length {
            picks.push(*long);
        }
        let columns: Vec<(String, Vec<Option<&AttentionMap>>)> = picks
            .iter()
            .map(|r| {
                (
                    format!("{} tokens", format_length(r.length)),
                    r.layers.iter().map(|l| l.map.as_ref()).collect(),
                )
            })
            .collect();
        let clip = if layers.len() == 1 { -2.0 } else { -3.0 };
        plot::attention_grid(
            &dir.join(GRID_PNG),
            &format!("{model}: hidden attention"),
            &layers,
            &columns,
            clip,
        )?;
        written.push(GRID_PNG);
    }
    let series = |f: fn(&LayerReport) -> f64| -> Vec<LineSeries> {
        layers
            .iter()
            .enumerate()
            .map(|(i, &layer)| LineSeries {
                name: format!("layer {layer}"),
                points: runs
                    .iter()
                    .filter_map(|r| r.layers.get(i).map(|l| (r.length as f64, f(l))))
                    .filter(|p| p.1 > 0.0)
                    .collect(),
            })
            .collect()
    };
    plot::against_length(
        &dir.join(MMD_PNG),
        &format!("{model}: Mamba Mean Distance of the last token"),
        "MMD (tokens, log scale)",
        &series(|l| l.mean_distance),
    )?;
    written.push(MMD_PNG);
    plot::against_length(
        &dir.join(DELTA_SUM_PNG),
        &format!("{model}: ΣΔ over the input, mean over channels"),
        "ΣΔ (log scale)",
        &series(|l| l.delta_sum_mean),
    )?;
    written.push(DELTA_SUM_PNG);
    let panels: Vec<plot::ProfilePanel> = longest
        .layers
        .iter()
        .map(|l| plot::ProfilePanel {
            layer: l.layer,
            points: l
                .positions
                .iter()
                .zip(&l.delta_norm)
                .map(|(&p, &v)| (p as f64, v as f64))
                .collect(),
            kept: match l.kept_rows.len() == l.positions.len() {
                true => Vec::new(),
                false => l.kept_rows.iter().map(|&r| l.positions[r] as f64).collect(),
            },
            label: if l.kept_rows.len() < l.positions.len() {
                "(red: kept tokens)"
            } else {
                ""
            },
        })
        .collect();
    plot::delta_profile(
        &dir.join(PROFILE_PNG),
        &format!(
            "{model}: ‖Δt‖₂ per token at {} tokens{}",
            format_length(longest.length),
            if longest.needle.is_some() {
                " (shaded: the needle)"
            } else {
                ""
            }
        ),
        &panels,
        longest.needle,
    )?;
    written.push(PROFILE_PNG);
    Ok(written)
}
