//! `decimamba analyze`: the paper's receptive-field analyses of a model on one input at
//! several lengths, as a table, JSON and figures.

use super::common::{DataArgs, DecimationArgs, ModelArgs};
use crate::analysis::{self, AnalysisSettings, LengthAnalysis, MAP_CHANNEL_STRIDE};
use crate::eval::common::{atomic_write_json, format_length, parse_lengths, progress_bar};
use crate::eval::passkey::{resolve_template, Haystack, PromptBuilder};
use crate::eval::EvalModel;
use crate::model::{MambaConfig, MambaModel};
use crate::policy::decimamba::{parse_layers, ModelDefaults};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// Text to analyse (.txt, .jsonl, .parquet or a folder): its documents' tokens, joined,
    /// cut to each length.
    #[arg(long, value_name = "FILE|DIR", conflicts_with_all = ["prompt", "passkey_depth"])]
    pub data: Option<PathBuf>,
    /// A prompt to analyse (cut to each length; the default length is the whole prompt).
    #[arg(long, conflicts_with = "passkey_depth")]
    pub prompt: Option<String>,
    /// A passkey prompt of each length with the needle at this depth (0 = start, 1 = end),
    /// from the model's template and haystack; the needle is marked in the Δt profile.
    #[arg(long, value_name = "D")]
    pub passkey_depth: Option<f64>,
    /// Random weights of a public shape (130m … 2.8b) on random tokens instead of a model.
    #[arg(long, conflicts_with_all = ["data", "prompt", "passkey_depth"])]
    pub shape: Option<String>,
    /// Input lengths, comma-separated (k = 1024); default 2k,4k,8k,16k (the prompt's length
    /// with --prompt).
    #[arg(long)]
    pub lengths: Option<String>,
    /// Layers to analyse (e.g. 0-5 or 3,12); default all.
    #[arg(long)]
    pub layers: Option<String>,
    /// The training length (the global share covers this many first tokens); default the
    /// model's.
    #[arg(long)]
    pub train_len: Option<usize>,
    /// Side of the downsampled attention maps.
    #[arg(long, default_value_t = 96)]
    pub map_size: usize,
    /// No attention maps for inputs longer than this (their cost is map_size × length).
    #[arg(long, default_value = "32k")]
    pub map_max_len: String,
    /// Folder for the figures and analysis.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Also write the JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub data_args: DataArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decimation: DecimationArgs,
}

/// The input at each length, and the needle's place in passkey prompts.
type Inputs = Vec<(Vec<u32>, Option<(usize, usize)>)>;

fn inputs(args: &AnalyzeArgs, model: &dyn EvalModel, lengths: &[usize]) -> Result<Inputs> {
    let cut = |tokens: Vec<u32>, what: &str| -> Result<Inputs> {
        if let Some(&l) = lengths.iter().find(|&&l| l > tokens.len()) {
            bail!(
                "{what} has {} tokens, fewer than the length {l} asked for",
                tokens.len()
            );
        }
        Ok(lengths
            .iter()
            .map(|&l| (tokens[..l].to_vec(), None))
            .collect())
    };
    if let Some(path) = &args.data {
        let files = crate::eval::data::data_files(path)?;
        let data = crate::eval::data::load_documents(&files, &args.data_args.options())?;
        let mut tokens = Vec::new();
        for d in &data.documents {
            tokens.extend(model.encode(&d.text)?);
            if tokens.len() >= lengths.iter().copied().max().unwrap_or(0) {
                break;
            }
        }
        return cut(tokens, &format!("the data in {}", path.display()));
    }
    if let Some(p) = &args.prompt {
        return cut(model.encode(p)?, "the prompt");
    }
    bail!("give the input: --data FILE, --prompt TEXT, --passkey-depth D or --shape S")
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let map_max = match parse_lengths(&args.map_max_len).context("--map-max-len")?[..] {
        [l] => l,
        _ => bail!("--map-max-len takes one length"),
    };
    crate::eval::runlog::check_out_folder(&args.out)?;
    let _ = crate::bench::reset_peak_rss();
    let (model, name, defaults, per_length): (MambaModel, String, ModelDefaults, Inputs) =
        match &args.shape {
            Some(shape) => {
                super::common::apply_threads(args.model.threads)?;
                let cfg = MambaConfig::of_shape(shape)?;
                let device = crate::loader::parse_device(&args.model.device)?;
                let dtype = crate::loader::parse_dtype(&args.model.dtype)?;
                let m = crate::bench::random_model(&cfg, dtype, &device, 0)?
                    .with_backend(args.model.backend.parse()?)?;
                let lengths = parse_lengths(args.lengths.as_deref().unwrap_or("2k,4k,8k,16k"))?;
                let longest = lengths.iter().copied().max().unwrap_or(0);
                let ids = crate::bench::random_ids(longest, cfg.vocab_size.min(50_000), 0);
                let inputs = lengths.iter().map(|&l| (ids[..l].to_vec(), None)).collect();
                let defaults = ModelDefaults {
                    name: format!("random-{shape}"),
                    n_layer: cfg.n_layer,
                    preset: None,
                    train_len: 2048,
                };
                (m, format!("random-{shape}"), defaults, inputs)
            }
            None => {
                let loaded = args.model.load()?;
                let defaults = loaded.decimation_defaults();
                let lengths = match (&args.lengths, &args.prompt) {
                    (Some(l), _) => parse_lengths(l)?,
                    (None, Some(p)) => vec![loaded.encode(p)?.len()],
                    (None, None) => parse_lengths("2k,4k,8k,16k")?,
                };
                let inputs = match args.passkey_depth {
                    Some(depth) if args.data.is_none() && args.prompt.is_none() => {
                        if !(0.0..=1.0).contains(&depth) {
                            bail!("--passkey-depth must be in [0, 1], got {depth}");
                        }
                        let template =
                            resolve_template(None, loaded.passkey_template().as_deref())?;
                        let haystack =
                            Haystack::choose(None, &template, loaded.haystack().as_deref())?;
                        let mut builder = PromptBuilder::new(&loaded, &template, &haystack)?;
                        let mut out = Vec::new();
                        for &l in &lengths {
                            let key = template.key_min + (template.key_max - template.key_min) / 2;
                            let p = builder.build(l, depth, key, 0)?;
                            out.push((p.ids, Some((p.needle_position, p.needle_tokens))));
                        }
                        out
                    }
                    _ => inputs(&args, &loaded, &lengths)?,
                };
                let name = loaded.name();
                (loaded.model, name, defaults, inputs)
            }
        };
    let policy = args.decimation.policy_for(&defaults)?;
    let n_layer = model.config().n_layer;
    let layers = match &args.layers {
        Some(spec) => {
            let mut v = parse_layers(spec)?;
            v.sort_unstable();
            v.dedup();
            v
        }
        None => (0..n_layer).collect(),
    };
    let train_len = args.train_len.unwrap_or(defaults.train_len);
    let pb = progress_bar(per_length.len() as u64, args.quiet, "analysing");
    let mut runs = Vec::new();
    for (ids, needle) in &per_length {
        pb.set_message(format!("{} tokens", format_length(ids.len())));
        let settings = AnalysisSettings {
            layers: layers.clone(),
            train_len,
            map_size: if ids.len() <= map_max {
                args.map_size
            } else {
                0
            },
            map_channel_stride: MAP_CHANNEL_STRIDE,
            channel_mmd: false,
        };
        let reports = analysis::analyze(&model, ids, &policy, 1, &settings)?;
        runs.push(LengthAnalysis {
            length: ids.len(),
            needle: *needle,
            layers: reports,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut json = analysis::summary_json(&name, &policy, &runs);
    if let Some(peak) = crate::bench::peak_rss_mib() {
        json["peak_rss_mib"] = peak.into();
    }
    atomic_write_json(&args.out.join("analysis.json"), &json)?;
    if let Some(p) = &args.json {
        atomic_write_json(p, &json)?;
    }
    let figures = analysis::write_figures(&args.out, &name, &runs)?;
    super::output::print(&analysis::table(&runs))?;
    let peak = crate::bench::peak_rss_mib()
        .map(|m| format!(" (peak resident memory {m:.0} MiB)"))
        .unwrap_or_default();
    super::output::println(&format!(
        "wrote analysis.json, {} in {}{peak}",
        figures.join(", "),
        args.out.display()
    ))
}
