//! Arguments shared by every subcommand: which model, where it runs, and decimation.

use crate::loader::LoadedModel;
use crate::policy::decimamba::{default_config, named_config, parse_layers, ModelDefaults};
use crate::policy::{DecimationConfig, Policy};
use anyhow::{bail, Result};

/// Where the model comes from and how it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hub repo id (e.g. state-spaces/mamba-130m) or local directory; default: the embedded model.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// tokenizer.json path or hub repo id; default: the model's own, else EleutherAI/gpt-neox-20b.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// cpu, cuda, cuda:N or metal. The sweeps (passkey, eval-ppl, ruler, doc-retrieval,
    /// longbench, find-layer) take a list and run one worker per device: cuda:0,1,2,3 (or
    /// cuda:0,cuda:1); cpu:0,cpu:1 are CPU workers.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (the scan always accumulates in f32). On Metal, bf16 needs a GPU
    /// with bfloat kernels (Apple silicon, macOS 14 or later); elsewhere it runs as f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Which implementation runs the model: auto (the device's fused kernels on CPU and
    /// CUDA, Candle ops on Metal), candle (plain Candle tensor ops on any device: slower,
    /// the reference the kernels are tested against) or kernels. With candle, matmuls,
    /// norms and gathers run in --dtype and everything elementwise in f32.
    #[arg(long, default_value = "auto", value_name = "auto|candle|kernels")]
    pub backend: String,
    /// CPU threads (the same as setting RAYON_NUM_THREADS); default: all cores.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Run even when the memory estimate of the longest input exceeds the memory available.
    #[arg(long)]
    pub force: bool,
}

/// How documents are read from text files, jsonl and parquet.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// The jsonl field or parquet column holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Keep Project Gutenberg headers and footers (stripped by default when present).
    #[arg(long)]
    pub keep_gutenberg_boilerplate: bool,
    /// Skip (with a warning) files, or parquet rows, that are not UTF-8 instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Use at most this many documents (in file order).
    #[arg(long)]
    pub max_docs: Option<usize>,
}

impl DataArgs {
    pub fn options(&self) -> crate::eval::data::DataOptions {
        crate::eval::data::DataOptions {
            text_field: self.text_field.clone(),
            strip_gutenberg: !self.keep_gutenberg_boilerplate,
            skip_invalid: self.skip_invalid,
        }
    }
}

/// Refuses (unless `--force`) a prefill of `len` tokens that would not fit in memory.
/// `decimating`: some layer keeps the whole sequence to score it.
pub fn check_memory(
    model: &crate::MambaModel,
    len: usize,
    decimating: bool,
    logits_rows: usize,
    force: bool,
    what: &str,
) -> Result<()> {
    // The CPU runs long prefills in chunks; a decimating layer of the Candle-ops backend
    // holds its whole input's activations (the fused CPU one chooses chunk by chunk).
    let chunked = model.device().is_cpu() && (model.backend().is_fused() || !decimating);
    let need = crate::memory::prefill_bytes(
        model.config(),
        model.dtype(),
        len,
        chunked,
        decimating,
        logits_rows,
    );
    crate::memory::check_fits(
        need,
        crate::memory::available_bytes(model.device()),
        what,
        force,
    )
}

/// The most CPU threads `--threads` accepts: more only costs time spent creating them.
pub const MAX_THREADS: usize = 1024;

/// Applies `--threads` before any thread pool starts: it sets RAYON_NUM_THREADS, which
/// rayon (and so candle) reads when its pool is first used.
pub fn apply_threads(threads: Option<usize>) -> Result<()> {
    match threads {
        None => Ok(()),
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(t) if t > MAX_THREADS => {
            anyhow::bail!("--threads {t} is more than the maximum of {MAX_THREADS}")
        }
        Some(t) => {
            std::env::set_var("RAYON_NUM_THREADS", t.to_string());
            Ok(())
        }
    }
}

/// The context policy: `--policy`, or DeciMamba's own flags (a preset or file, with
/// overrides).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DecimationArgs {
    /// Context policy: a JSON file with a "method" key (decimamba, mambaextend, modulation,
    /// longmamba; a file without one is DeciMamba), or a preset: vanilla, passkey, pg19,
    /// doc-retrieval, zero-shot, model (the DeciMamba presets).
    #[arg(long, value_name = "FILE|PRESET", conflicts_with_all = ["decimation", "no_decimation"])]
    pub policy: Option<String>,
    /// Preset name (passkey, pg19, doc-retrieval, zero-shot, model) or a JSON file.
    #[arg(long)]
    pub decimation: Option<String>,
    /// Override: comma-separated 0-based decimating layers (e.g. 12 or 12-20).
    #[arg(long)]
    pub deci_layers: Option<String>,
    /// Override: β, the per-layer budget factor in (0, 1].
    #[arg(long)]
    pub deci_beta: Option<f64>,
    /// Override: L_base, tokens kept by the first decimating layer.
    #[arg(long)]
    pub deci_lbase: Option<usize>,
    /// Override: the minimum kept tokens per decimating layer.
    #[arg(long)]
    pub deci_min_len: Option<usize>,
    /// Run vanilla Mamba even if a preset would apply.
    #[arg(long)]
    pub no_decimation: bool,
}

impl ModelArgs {
    /// The library's description of the model these flags name.
    pub fn spec(&self) -> crate::loader::ModelSpec {
        crate::loader::ModelSpec {
            model: self.model.clone(),
            revision: self.revision.clone(),
            tokenizer: self.tokenizer.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            backend: self.backend.clone(),
        }
    }

    /// Load the model and tokenizer this argument set names.
    pub fn load(&self) -> Result<LoadedModel> {
        if self.device.contains(',') {
            bail!(
                "--device {} lists several devices, but this command runs on one; lists run one worker per device in the sweeps (passkey, eval-ppl, ruler, doc-retrieval, longbench, find-layer)",
                self.device
            );
        }
        apply_threads(self.threads)?;
        let loaded = crate::loader::load(&self.spec())?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        Ok(loaded)
    }

    /// The model on every device `--device` lists, one worker each: the first device's
    /// copy, then the others'.
    pub fn load_workers(&self) -> Result<(LoadedModel, Vec<LoadedModel>)> {
        let devices = crate::loader::parse_device_list(&self.device)?;
        apply_threads(self.threads)?;
        let mut models = Vec::with_capacity(devices.len());
        for (i, device) in devices.iter().enumerate() {
            let spec = crate::loader::ModelSpec {
                device: device.clone(),
                ..self.spec()
            };
            let loaded =
                crate::loader::load(&spec).map_err(|e| e.context(format!("worker on {device}")))?;
            if i == 0 {
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
            }
            models.push(loaded);
        }
        let first = models.remove(0);
        Ok((first, models))
    }
}

/// How a sweep is cut up: batches, and the shard of it this process runs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SweepArgs {
    /// Work units of one length and method run as one batch (results equal batch 1);
    /// default: as many as half the free memory holds on a GPU (at most 16), 1 on the CPU.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Run only shard I of N (0-based): the sweep's units i with i mod N = I, so N processes
    /// on any machines cover it once; join their folders with `decimamba merge`.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::eval::sweep::Shard>,
}

impl SweepArgs {
    /// `--batch-size`, or the automatic choice for prompts of `longest` tokens on `model`.
    pub fn batch_size(
        &self,
        model: &LoadedModel,
        methods: &[crate::eval::Method],
        longest: usize,
        logits_rows: usize,
    ) -> Result<usize> {
        match self.batch_size {
            Some(0) => bail!("--batch-size must be at least 1"),
            Some(n) => Ok(n),
            None => Ok(crate::memory::auto_batch_size(
                model.model.config(),
                model.model.dtype(),
                model.model.device(),
                longest,
                methods.iter().any(|m| m.policy.keeps_tokens()),
                logits_rows,
            )),
        }
    }

    /// Says what a finished shard is for, or that a batch size was chosen.
    pub fn note_shard_done(&self, out: &std::path::Path) -> Result<()> {
        if let Some(shard) = self.shard {
            super::output::println(&format!(
                "\nshard {shard} is complete in {}; when every shard is, join them with `decimamba merge DIR… --out DIR`",
                out.display()
            ))?;
        }
        Ok(())
    }
}

impl DecimationArgs {
    /// The DeciMamba config to apply, if any, validated against `model`.
    /// `None` when no decimation was asked for (or `--no-decimation`).
    pub fn resolve(&self, model: &LoadedModel) -> Result<Option<DecimationConfig>> {
        self.resolve_decimation(&model.decimation_defaults())
    }

    /// Like [`resolve`](Self::resolve) but falls back to the model's shipped preset
    /// (or the zero-shot default) when nothing was given; used by `--compare`.
    pub fn resolve_or_default(&self, model: &LoadedModel) -> Result<DecimationConfig> {
        self.decimation_or_default(&model.decimation_defaults())
    }

    /// The policy these flags select (vanilla when none), checked against `model`.
    pub fn resolve_policy(&self, model: &LoadedModel) -> Result<Policy> {
        let policy = self.policy_for(&model.decimation_defaults())?;
        crate::policy::ContextPolicy::check(policy.as_dyn(), model.config())?;
        Ok(policy)
    }

    /// [`Self::resolve_policy`] from a model's defaults, without the shape check.
    pub fn policy_for(&self, model: &ModelDefaults) -> Result<Policy> {
        match &self.policy {
            Some(spec) => {
                let policy = named_policy(spec, model)?;
                match policy {
                    Policy::DeciMamba(cfg) => {
                        let cfg = self.apply_overrides(cfg)?;
                        cfg.validate(model.n_layer)?;
                        Ok(Policy::DeciMamba(cfg))
                    }
                    other if self.any_override() => bail!(
                        "--deci-* options only apply to DeciMamba, not to the {} policy",
                        other.name()
                    ),
                    other => Ok(other),
                }
            }
            None => Ok(match self.resolve_decimation(model)? {
                Some(cfg) => Policy::DeciMamba(cfg),
                None => Policy::Vanilla,
            }),
        }
    }

    fn apply_overrides(&self, mut cfg: DecimationConfig) -> Result<DecimationConfig> {
        if let Some(l) = &self.deci_layers {
            cfg.decimating_layers = parse_layers(l)?;
        }
        if let Some(b) = self.deci_beta {
            cfg.decimation_beta = b;
        }
        if let Some(l) = self.deci_lbase {
            cfg.decimation_max_p_l_base = l;
        }
        if let Some(m) = self.deci_min_len {
            cfg.decimation_min_seq_len = m;
        }
        Ok(cfg)
    }

    fn any_override(&self) -> bool {
        self.deci_layers.is_some()
            || self.deci_beta.is_some()
            || self.deci_lbase.is_some()
            || self.deci_min_len.is_some()
    }

    /// `--decimation` and overrides → the config to run with (`None`: vanilla).
    pub fn resolve_decimation(&self, model: &ModelDefaults) -> Result<Option<DecimationConfig>> {
        if let Some(spec) = &self.policy {
            return match self.policy_for(model)? {
                Policy::DeciMamba(cfg) => Ok(Some(cfg)),
                Policy::Vanilla => Ok(None),
                other => bail!(
                    "--policy {spec} is a {} policy, but this command runs only vanilla or DeciMamba",
                    other.name()
                ),
            };
        }
        if self.no_decimation {
            if self.decimation.is_some() || self.any_override() {
                bail!("--no-decimation cannot be combined with --decimation or --deci-* options");
            }
            return Ok(None);
        }
        let base = match &self.decimation {
            Some(name) => named_config(name, model)?,
            None if self.any_override() => default_config(model),
            None => return Ok(None),
        };
        let cfg = self.apply_overrides(base)?;
        cfg.validate(model.n_layer)?;
        Ok(Some(cfg))
    }

    /// Like [`Self::resolve_decimation`] but never vanilla: used by `--compare` and by
    /// `decimamba` in `--methods`.
    pub fn decimation_or_default(&self, model: &ModelDefaults) -> Result<DecimationConfig> {
        if self.no_decimation {
            bail!("--compare runs vanilla and DeciMamba; drop --no-decimation");
        }
        if self.policy.is_some() {
            return match self.policy_for(model)? {
                Policy::DeciMamba(cfg) => Ok(cfg),
                other => bail!(
                    "--compare runs vanilla against DeciMamba, but --policy is {}: use --methods vanilla,FILE",
                    other.name()
                ),
            };
        }
        let base = match &self.decimation {
            Some(name) => named_config(name, model)?,
            None => default_config(model),
        };
        let cfg = self.apply_overrides(base)?;
        cfg.validate(model.n_layer)?;
        Ok(cfg)
    }
}

/// A `--policy` value: `vanilla`, a DeciMamba preset, or a policy file.
pub fn named_policy(spec: &str, model: &ModelDefaults) -> Result<Policy> {
    if spec == crate::policy::VANILLA {
        return Ok(Policy::Vanilla);
    }
    if crate::policy::decimamba::is_preset(spec) {
        return Ok(Policy::DeciMamba(named_config(spec, model)?));
    }
    let path = std::path::Path::new(spec);
    if !path.exists() {
        bail!(
            "policy \"{spec}\" is neither a preset (vanilla, passkey, pg19, doc-retrieval, zero-shot, model) nor an existing file"
        );
    }
    Policy::from_file(path)
}

/// Flags every evaluation shares: the model, the policy, `--compare`/`--methods`, the run
/// folder and progress display.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalRunArgs {
    /// Run vanilla Mamba and DeciMamba on identical inputs.
    #[arg(long, conflicts_with = "methods")]
    pub compare: bool,
    /// Methods side by side on identical inputs, comma-separated: vanilla, decimamba (the
    /// --decimation/--deci-* settings, else the model preset or zero-shot rule), a DeciMamba
    /// preset, or a policy file (e.g. vanilla,decimamba,extend-8k.json).
    #[arg(long, value_name = "LIST", conflicts_with = "policy")]
    pub methods: Option<String>,
    /// Output folder (rerun with the same folder to resume); default: runs/<eval>-<timestamp>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// Hide progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decimation: DecimationArgs,
}

impl EvalRunArgs {
    /// Rejects contradictory flags before any work starts.
    pub fn check(&self) -> Result<()> {
        if self.compare && self.decimation.no_decimation {
            anyhow::bail!("--compare already runs vanilla Mamba; drop --no-decimation");
        }
        if self.methods.is_some() && self.decimation.no_decimation {
            anyhow::bail!("--methods names every method to run; drop --no-decimation");
        }
        Ok(())
    }

    /// The methods to run on `model`: `--methods`, vanilla and DeciMamba with
    /// `--compare`, else the one the policy flags select. Each is checked against the
    /// model before any work starts.
    pub fn methods(&self, model: &LoadedModel) -> Result<Vec<crate::eval::Method>> {
        use crate::eval::Method;
        let methods = if let Some(list) = &self.methods {
            parse_methods(list, &self.decimation, &model.decimation_defaults())?
        } else if self.compare {
            Method::compare(self.decimation.resolve_or_default(model)?)
        } else {
            vec![Method::of(self.decimation.resolve_policy(model)?)]
        };
        for m in &methods {
            crate::policy::ContextPolicy::check(m.policy.as_dyn(), model.config())
                .map_err(|e| anyhow::anyhow!("method {}: {e}", m.name))?;
        }
        Ok(methods)
    }

    /// Policy files named by `--policy`, `--decimation` or `--methods`.
    fn policy_files(&self) -> Vec<std::path::PathBuf> {
        let mut specs: Vec<&str> = Vec::new();
        specs.extend(self.decimation.policy.as_deref());
        specs.extend(self.decimation.decimation.as_deref());
        if let Some(list) = &self.methods {
            specs.extend(list.split(',').map(str::trim));
        }
        specs
            .into_iter()
            .map(std::path::Path::new)
            .filter(|p| p.is_file())
            .map(std::path::Path::to_path_buf)
            .collect()
    }

    /// Refuses to evaluate a calibrated policy on the data (`eval`) it was calibrated on.
    pub fn check_held_out(&self, eval: &crate::calibrate::DataRecord) -> Result<()> {
        for path in self.policy_files() {
            if let Some(calib) = crate::calibrate::DataRecord::from_policy_file(&path)? {
                calib.check_disjoint(&path.display().to_string(), eval)?;
            }
        }
        Ok(())
    }

    /// The run folder: `--out`, else `runs/<kind>-<timestamp>`, checked (writable, and
    /// empty or a run of this tool) before any work starts.
    pub fn out_dir(&self, kind: &str) -> Result<std::path::PathBuf> {
        let dir = self
            .out
            .clone()
            .unwrap_or_else(|| crate::eval::common::default_out_dir(kind));
        crate::eval::runlog::check_out_folder(&dir)?;
        Ok(dir)
    }

    /// Refuses (unless `--force`) a run whose longest input, in batches of `batch`, would
    /// not fit in memory.
    pub fn check_memory(
        &self,
        model: &LoadedModel,
        methods: &[crate::eval::Method],
        longest: usize,
        logits_rows: usize,
        batch: usize,
        what: &str,
    ) -> Result<()> {
        let decimating = methods.iter().any(|m| m.policy.keeps_tokens());
        // A batch needs about the activations of its rows laid end to end.
        check_memory(
            &model.model,
            longest * batch.max(1),
            decimating,
            logits_rows * batch.max(1),
            self.model.force,
            &match batch {
                0 | 1 => format!("{what} of {longest} tokens"),
                b => format!("a batch of {b} × {what} of {longest} tokens (lower --batch-size)"),
            },
        )
    }
}

/// Ends an evaluation run: an interrupted run is an error that says how to resume;
/// a complete one lists the files written in `out` besides the streamed results.
pub fn finish_run(
    complete: bool,
    finished: usize,
    unit: &str,
    out: &std::path::Path,
    written: &[&str],
) -> Result<()> {
    use crate::eval::runlog::RESULTS_JSONL;
    if !complete {
        anyhow::bail!(
            "interrupted after {finished} {unit}; they are saved in {} — rerun the same command (with --out {}) to resume",
            out.join(RESULTS_JSONL).display(),
            out.display()
        );
    }
    super::output::println(&format!(
        "\nwrote {RESULTS_JSONL}, {} in {}",
        written.join(", "),
        out.display()
    ))
}

/// `--methods`: each entry is `vanilla`, `decimamba` (the DeciMamba flags or the model's
/// default), a DeciMamba preset or a policy file. Names repeat only with a suffix naming
/// the entry, e.g. `mambaextend[extend-8k]`.
pub fn parse_methods(
    list: &str,
    decimation: &DecimationArgs,
    model: &ModelDefaults,
) -> Result<Vec<crate::eval::Method>> {
    use crate::eval::Method;
    let entries: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        bail!("--methods is empty: name at least one method (e.g. vanilla,decimamba)");
    }
    let mut methods: Vec<(Method, &str)> = Vec::new();
    for entry in entries {
        let method = match entry {
            crate::policy::DECIMAMBA => Method::decimamba(decimation.decimation_or_default(model)?),
            spec => Method::of(
                named_policy(spec, model)
                    .map_err(|e| anyhow::anyhow!("--methods {spec}: {e:#}"))?,
            ),
        };
        if methods.iter().any(|(_, e)| *e == entry) {
            bail!("--methods lists {entry} twice");
        }
        methods.push((method, entry));
    }
    // Names must be distinct: a repeated method name gets its entry as a suffix.
    let counts =
        |name: &str, ms: &[(Method, &str)]| ms.iter().filter(|(m, _)| m.name == name).count();
    let names: Vec<String> = methods
        .iter()
        .map(|(m, entry)| {
            if counts(&m.name, &methods) > 1 && *entry != m.name {
                let stem = std::path::Path::new(entry)
                    .file_stem()
                    .map_or(entry.to_string(), |s| s.to_string_lossy().into_owned());
                format!("{}[{stem}]", m.name)
            } else {
                m.name.clone()
            }
        })
        .collect();
    let out: Vec<Method> = methods
        .into_iter()
        .zip(names)
        .map(|((mut m, _), name)| {
            m.name = name;
            m
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = out.iter().find(|m| !seen.insert(m.name.clone())) {
        bail!(
            "--methods gives two methods the name {}: rename one of the files",
            dup.name
        );
    }
    Ok(out)
}
