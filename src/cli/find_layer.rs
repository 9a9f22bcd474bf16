//! `decimamba find-layer`: where DeciMamba should decimate, by MMD growth (the first global
//! layer) or by sweeping candidate layers through `eval-ppl` or `passkey`.

use super::common::{DataArgs, ModelArgs, SweepArgs};
use crate::analysis::find_layer::{best, layer_growth, single_layer_config};
use crate::analysis::{analyze, AnalysisSettings, MAP_CHANNEL_STRIDE};
use crate::eval::common::{
    atomic_write_json, format_length, install_interrupt_flag, parse_lengths, render_table,
};
use crate::eval::passkey::{
    resolve_template, run_passkey, Haystack, PasskeyJob, PasskeySettings, PromptBuilder,
};
use crate::eval::ppl::{run_ppl, tokenize_documents, PplJob, PplSettings};
use crate::eval::{EvalModel, Method, RunOptions};
use crate::policy::decimamba::parse_layers;
use crate::policy::Policy;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchBy {
    /// The first layer whose Mamba Mean Distance grows with context length.
    Mmd,
    /// The candidate with the lowest perplexity at --length (eval-ppl on --data).
    Ppl,
    /// The candidate with the highest passkey success at --length.
    Passkey,
}

#[derive(clap::Args, Debug)]
pub struct FindLayerArgs {
    #[arg(long, value_enum)]
    pub by: SearchBy,
    /// Candidate layers (e.g. 8-24); default all.
    #[arg(long)]
    pub candidates: Option<String>,
    /// The evaluation length (ppl, passkey) or the long length whose MMD is compared with
    /// the training length's (mmd); default 4 × the training length.
    #[arg(long)]
    pub length: Option<String>,
    /// β of the written policy (and of each candidate).
    #[arg(long, default_value_t = 0.5)]
    pub beta: f64,
    /// L_base; default the training length.
    #[arg(long)]
    pub lbase: Option<usize>,
    #[arg(long, default_value_t = 20)]
    pub min_len: usize,
    /// mmd: a layer is global when MMD(long)/MMD(train) ≥ 1 + this · (long/train − 1).
    #[arg(long, default_value_t = 0.25)]
    pub global_growth: f64,
    /// Text: required for ppl; for mmd, the text analysed (default: a passkey prompt).
    #[arg(long, value_name = "FILE|DIR")]
    pub data: Option<PathBuf>,
    /// ppl: windows per document; passkey: samples per depth.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// ppl: tokens scored at the end of each window.
    #[arg(long, default_value_t = 100)]
    pub pred_len: usize,
    /// passkey: needle depths.
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    pub depths: String,
    /// Run folder (rerun with the same folder to resume a sweep).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub data_args: DataArgs,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: FindLayerArgs) -> Result<()> {
    crate::eval::runlog::check_out_folder(&args.out)?;
    if args.by == SearchBy::Mmd && (args.sweep.shard.is_some() || args.sweep.batch_size.is_some()) {
        bail!("--shard and --batch-size apply to the sweeps of --by ppl and --by passkey, not to --by mmd");
    }
    let (mut model, mut extra) = args.model.load_workers()?;
    if args.by == SearchBy::Mmd && !extra.is_empty() {
        bail!("--by mmd analyses on one device: give --device one device");
    }
    let defaults = model.decimation_defaults();
    let n_layer = model.config().n_layer;
    let train_len = defaults.train_len;
    let length = match &args.length {
        Some(l) => match parse_lengths(l).context("--length")?[..] {
            [l] => l,
            _ => bail!("--length takes one length"),
        },
        None => 4 * train_len,
    };
    let candidates = match &args.candidates {
        Some(c) => {
            let mut v = parse_layers(c)?;
            v.sort_unstable();
            v.dedup();
            v
        }
        None => (0..n_layer).collect(),
    };
    if let Some(&l) = candidates.iter().find(|&&l| l >= n_layer) {
        bail!("candidate layer {l} does not exist: the model has {n_layer} layers");
    }
    let lbase = args.lbase.unwrap_or(train_len);
    for &l in &candidates {
        single_layer_config(l, args.beta, lbase, args.min_len).validate(n_layer)?;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    // Ctrl-C stops a sweep between units (and an analysis between layers).
    let stop = install_interrupt_flag();
    for m in std::iter::once(&mut model).chain(extra.iter_mut()) {
        m.model.set_cancel_flag(Some(stop.clone()));
    }
    let batch_size = match args.by {
        SearchBy::Mmd => 1,
        SearchBy::Ppl => args
            .sweep
            .batch_size(&model, &[], length, args.pred_len + 1)?,
        SearchBy::Passkey => args.sweep.batch_size(&model, &[], length, 1)?,
    };
    let options = RunOptions {
        quiet: args.quiet,
        stop: Some(stop),
        batch_size,
        shard: args.sweep.shard,
    };
    let extra_workers: Vec<&dyn EvalModel> = extra.iter().map(|m| m as &dyn EvalModel).collect();
    let interrupted = || {
        anyhow::anyhow!(
            "interrupted; rerun the same command (with --out {}) to resume",
            args.out.display()
        )
    };
    let text_tokens = |need: usize| -> Result<Vec<crate::eval::ppl::TokenizedDoc>> {
        let Some(path) = &args.data else {
            bail!("--by ppl needs --data")
        };
        let files = crate::eval::data::data_files(path)?;
        let data = crate::eval::data::load_documents(&files, &args.data_args.options())?;
        let mut docs = tokenize_documents(&model, &data.documents, args.quiet)?;
        if let Some(n) = args.data_args.max_docs {
            docs.truncate(n);
        }
        if docs.iter().all(|d| d.tokens.len() < need) {
            bail!("no document in {} has {need} tokens", path.display());
        }
        Ok(docs)
    };
    let (scores, minimise, what, extra): Outcome = match args.by {
        SearchBy::Mmd => {
            if length <= train_len {
                bail!("--length {length} must exceed the training length {train_len} for --by mmd");
            }
            let (short, long) = match &args.data {
                Some(_) => {
                    let docs = text_tokens(length)?;
                    let t: Vec<u32> = docs
                        .iter()
                        .find(|d| d.tokens.len() >= length)
                        .map(|d| d.tokens[..length].to_vec())
                        .unwrap_or_default();
                    (t[..train_len].to_vec(), t)
                }
                None => {
                    let template = resolve_template(None, model.passkey_template().as_deref())?;
                    let haystack = Haystack::choose(None, &template, model.haystack().as_deref())?;
                    let mut b = PromptBuilder::new(&model, &template, &haystack)?;
                    let key = template.key_min;
                    (
                        b.build(train_len, 0.5, key, 0)?.ids,
                        b.build(length, 0.5, key, 0)?.ids,
                    )
                }
            };
            let settings = AnalysisSettings {
                layers: candidates.clone(),
                train_len,
                map_size: 0,
                map_channel_stride: MAP_CHANNEL_STRIDE,
                channel_mmd: false,
            };
            let a = analyze(&model.model, &short, &Policy::Vanilla, 1, &settings)?;
            let b = analyze(&model.model, &long, &Policy::Vanilla, 1, &settings)?;
            let growth = layer_growth(&a, &b, short.len(), long.len(), args.global_growth);
            let rows: Vec<Vec<String>> = growth
                .iter()
                .map(|g| {
                    vec![
                        g.layer.to_string(),
                        format!("{:.1}", g.mmd_short),
                        format!("{:.1}", g.mmd_long),
                        format!("{:.2}", g.growth),
                        if g.global {
                            "global".into()
                        } else {
                            "local".into()
                        },
                    ]
                })
                .collect();
            let threshold = crate::analysis::find_layer::growth_threshold(
                short.len(),
                long.len(),
                args.global_growth,
            );
            super::output::print(&render_table(
                &[
                    "layer".into(),
                    format!("MMD at {}", format_length(short.len())),
                    format!("MMD at {}", format_length(long.len())),
                    "growth".into(),
                    format!("(global ≥ {threshold:.2})"),
                ],
                &rows,
            ))?;
            // Scores are the growth; the choice is the first global layer.
            let first = growth.iter().find(|g| g.global).map(|g| g.layer);
            let scores = growth.iter().map(|g| (g.layer, Some(g.growth))).collect();
            let extra = serde_json::json!({"layers": growth, "threshold": threshold, "first_global": first});
            (scores, false, "MMD growth", extra)
        }
        SearchBy::Ppl => {
            let docs = text_tokens(length)?;
            let methods = candidate_methods(&candidates, args.beta, lbase, args.min_len);
            let settings = PplSettings {
                lengths: vec![length],
                windows: args.samples,
                pred_len: args.pred_len,
            };
            let job = PplJob {
                model: &model,
                extra_workers: &extra_workers,
                docs: &docs,
                settings: &settings,
                methods: &methods,
                out_dir: &args.out,
                options: &options,
            };
            let report = run_ppl(&job)?;
            if !report.complete {
                return Err(interrupted());
            }
            if report.shard.is_some() {
                return shard_done(&args);
            }
            let scores = candidates
                .iter()
                .zip(&methods)
                .map(|(&l, m)| (l, report.perplexity(&m.name, length)))
                .collect();
            (scores, true, "perplexity", serde_json::Value::Null)
        }
        SearchBy::Passkey => {
            let template = resolve_template(None, model.passkey_template().as_deref())?;
            let haystack = Haystack::choose(None, &template, model.haystack().as_deref())?;
            let methods = candidate_methods(&candidates, args.beta, lbase, args.min_len);
            let settings = PasskeySettings {
                lengths: vec![length],
                depths: crate::eval::common::parse_depths(&args.depths)?,
                samples: args.samples,
                seed: 0,
                max_new_tokens: 10,
            };
            let job = PasskeyJob {
                model: &model,
                extra_workers: &extra_workers,
                template: &template,
                haystack: &haystack,
                settings: &settings,
                methods: &methods,
                out_dir: &args.out,
                options: &options,
            };
            let report = run_passkey(&job)?;
            if !report.complete {
                return Err(interrupted());
            }
            if report.shard.is_some() {
                return shard_done(&args);
            }
            let scores = candidates
                .iter()
                .enumerate()
                .map(|(i, &l)| (l, report.grid.overall(i).fraction()))
                .collect();
            (scores, false, "passkey success", serde_json::Value::Null)
        }
    };
    let chosen = match args.by {
        SearchBy::Mmd => extra["first_global"].as_u64().map(|l| l as usize),
        _ => best(&scores, minimise),
    };
    if args.by != SearchBy::Mmd {
        let rows: Vec<Vec<String>> = scores
            .iter()
            .map(|(l, s)| vec![l.to_string(), s.map_or("–".into(), |v| format!("{v:.4}"))])
            .collect();
        super::output::print(&render_table(&["layer".into(), what.into()], &rows))?;
    }
    let points: Vec<(usize, f64)> = scores
        .iter()
        .filter_map(|(l, s)| s.map(|v| (*l, v)))
        .collect();
    crate::analysis::plot::score_by_layer(
        &args.out.join("find-layer.png"),
        &format!(
            "{}: {what} by decimating layer at {}",
            model.name(),
            format_length(length)
        ),
        what,
        &points,
        chosen,
    )?;
    let Some(layer) = chosen else {
        bail!(
            "no layer qualifies ({}); see {}",
            match args.by {
                SearchBy::Mmd => "no candidate's MMD grows past the threshold: try a longer --length or a lower --global-growth",
                _ => "no candidate has a score",
            },
            args.out.join("find-layer.png").display()
        );
    };
    let cfg = single_layer_config(layer, args.beta, lbase, args.min_len);
    let policy = crate::policy::with_provenance(
        Policy::DeciMamba(cfg).to_json(),
        serde_json::json!({
            "tool": format!("decimamba {}", env!("CARGO_PKG_VERSION")),
            "model": model.identity()?,
            "find_layer": {"by": format!("{:?}", args.by).to_lowercase(), "length": length, "scores": scores, "evidence": extra},
        }),
    );
    atomic_write_json(&args.out.join("best-policy.json"), &policy)?;
    super::output::println(&format!(
        "decimate at layer {layer} ({what}); wrote best-policy.json (use --policy {}) and find-layer.png in {}",
        args.out.join("best-policy.json").display(),
        args.out.display()
    ))
}

/// A finished shard of a candidate sweep: the layer is chosen once the shards are merged.
fn shard_done(args: &FindLayerArgs) -> Result<()> {
    args.sweep.note_shard_done(&args.out)?;
    super::output::println(
        "then rerun this find-layer command without --shard, with --out set to the merged folder: it finds every candidate scored and picks the layer",
    )
}

/// Each candidate's score, whether lower is better, what the score is, and evidence.
type Outcome = (
    Vec<(usize, Option<f64>)>,
    bool,
    &'static str,
    serde_json::Value,
);

/// One DeciMamba method per candidate layer, named `layer-N`.
fn candidate_methods(candidates: &[usize], beta: f64, lbase: usize, min_len: usize) -> Vec<Method> {
    candidates
        .iter()
        .map(|&l| {
            let mut m = Method::decimamba(single_layer_config(l, beta, lbase, min_len));
            m.name = format!("layer-{l}");
            m
        })
        .collect()
}
