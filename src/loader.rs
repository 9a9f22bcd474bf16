//! Finding and loading a model: the embedded default, a local directory, or a hub repo,
//! in either checkpoint format, with its tokenizer and any files shipped beside it
//! (`decimation.json` preset, `passkey_template.json`, `haystack.txt`).

use crate::eval::common::fnv1a64;
use crate::eval::{EvalModel, GreedyOutput, TailScore};
use crate::generation::{self, GenerateParams};
use crate::hub::{looks_like_repo_id, HubRepo};
use crate::model::{ForwardOptions, LogitsSpan, MambaConfig, MambaModel};
use crate::policy::{DecimationConfig, Policy};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hf_hub::RepoType;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Name of the model built into the binary.
pub const EMBEDDED_MODEL_NAME: &str = "embedded:passkey-mamba";

#[cfg(embedded_model)]
mod embedded {
    pub const CONFIG: &str = include_str!("../models/passkey-mamba/config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../models/passkey-mamba/model.safetensors");
    pub const TOKENIZER: &[u8] = include_bytes!("../models/passkey-mamba/tokenizer.json");
    pub const DECIMATION: Option<&str> =
        Some(include_str!("../models/passkey-mamba/decimation.json"));
    pub const TEMPLATE: Option<&str> = Some(include_str!(
        "../models/passkey-mamba/passkey_template.json"
    ));
    pub const HAYSTACK: Option<&str> = Some(include_str!("../models/passkey-mamba/haystack.txt"));
    /// Training length of the shipped model (models/passkey-mamba/README.md).
    pub const TRAIN_LEN: usize = 1024;
}

#[cfg(embedded_neox)]
const NEOX_TOKENIZER_GZ: &[u8] = include_bytes!("../assets/gpt-neox-20b-tokenizer.json.gz");

/// Where the weights are.
#[derive(Debug, Clone)]
pub enum WeightFiles {
    /// One or more safetensors files (shards).
    Safetensors(Vec<PathBuf>),
    /// A PyTorch pickle (`pytorch_model.bin`).
    Pytorch(PathBuf),
    /// Safetensors bytes built into the binary.
    Embedded(&'static [u8]),
}

/// Everything found for one model, before loading.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub name: String,
    pub config_json: String,
    pub weights: WeightFiles,
    /// tokenizer.json bytes, when the model has its own.
    pub tokenizer_json: Option<Vec<u8>>,
    pub decimation_json: Option<String>,
    pub template_json: Option<String>,
    pub haystack: Option<String>,
    pub train_len: Option<usize>,
    /// Path of config.json (None for the embedded model).
    pub config_path: Option<PathBuf>,
    /// The hub revision asked for, and the commit it resolved to (hub models only).
    pub revision: Option<String>,
    pub commit: Option<String>,
}

fn read_text(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{} is not valid UTF-8", p.display()))
}

/// Shard files named by a `model.safetensors.index.json`.
fn shards_from_index(index: &Path) -> Result<Vec<String>> {
    let text = read_text(index)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail!("{} lists no shards", index.display());
    }
    Ok(files)
}

/// Files of a model in a local directory.
pub fn files_from_dir(dir: &Path) -> Result<ModelFiles> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let config = dir.join("config.json");
    if !config.exists() {
        bail!("no config.json in model directory {}", dir.display());
    }
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.exists() {
        let shards = shards_from_index(&index)?;
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            bail!(
                "shard {} named in {} is missing",
                missing.display(),
                index.display()
            );
        }
        WeightFiles::Safetensors(paths)
    } else if dir.join("model.safetensors").exists() {
        WeightFiles::Safetensors(vec![dir.join("model.safetensors")])
    } else if dir.join("pytorch_model.bin").exists() {
        WeightFiles::Pytorch(dir.join("pytorch_model.bin"))
    } else {
        bail!(
            "no weights in {}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
            dir.display()
        );
    };
    let optional = |name: &str| -> Result<Option<String>> {
        let p = dir.join(name);
        if p.exists() {
            Ok(Some(read_text(&p)?))
        } else {
            Ok(None)
        }
    };
    let tokenizer = dir.join("tokenizer.json");
    Ok(ModelFiles {
        name: dir.display().to_string(),
        config_json: read_text(&config)?,
        weights,
        tokenizer_json: if tokenizer.exists() {
            Some(std::fs::read(&tokenizer)?)
        } else {
            None
        },
        decimation_json: optional("decimation.json")?,
        template_json: optional("passkey_template.json")?,
        haystack: optional("haystack.txt")?,
        train_len: None,
        config_path: Some(config.clone()),
        revision: None,
        commit: None,
    })
}

/// Files of a model on the hub (or in its cache).
pub fn files_from_hub(repo: &HubRepo) -> Result<ModelFiles> {
    let config = repo.require("config.json")?;
    let weights = if let Some(index) = repo.get("model.safetensors.index.json")? {
        let mut paths = Vec::new();
        for shard in shards_from_index(&index)? {
            paths.push(repo.require(&shard)?);
        }
        WeightFiles::Safetensors(paths)
    } else if let Some(p) = repo.get("model.safetensors")? {
        WeightFiles::Safetensors(vec![p])
    } else if let Some(p) = repo.get("pytorch_model.bin")? {
        WeightFiles::Pytorch(p)
    } else {
        bail!(
            "{} (revision {}) has no model.safetensors, model.safetensors.index.json or pytorch_model.bin{}",
            repo.repo_id,
            repo.revision,
            if crate::hub::offline_from_env() { " in the hub cache (HF_HUB_OFFLINE is set)" } else { "" }
        );
    };
    let optional_text = |name: &str| -> Result<Option<String>> {
        match repo.get(name)? {
            Some(p) => Ok(Some(read_text(&p)?)),
            None => Ok(None),
        }
    };
    let tokenizer_json = match repo.get("tokenizer.json")? {
        Some(p) => Some(std::fs::read(&p)?),
        None => None,
    };
    Ok(ModelFiles {
        name: repo.repo_id.clone(),
        config_json: read_text(&config)?,
        weights,
        tokenizer_json,
        decimation_json: optional_text("decimation.json")?,
        template_json: optional_text("passkey_template.json")?,
        haystack: None,
        train_len: None,
        commit: snapshot_commit(&config),
        config_path: Some(config),
        revision: Some(repo.revision.clone()),
    })
}

/// Files of the model built into the binary.
pub fn embedded_files() -> Result<ModelFiles> {
    #[cfg(embedded_model)]
    {
        Ok(ModelFiles {
            name: EMBEDDED_MODEL_NAME.to_string(),
            config_json: embedded::CONFIG.to_string(),
            weights: WeightFiles::Embedded(embedded::WEIGHTS),
            tokenizer_json: Some(embedded::TOKENIZER.to_vec()),
            decimation_json: embedded::DECIMATION.map(str::to_string),
            template_json: embedded::TEMPLATE.map(str::to_string),
            haystack: embedded::HAYSTACK.map(str::to_string),
            train_len: Some(embedded::TRAIN_LEN),
            config_path: None,
            revision: None,
            commit: None,
        })
    }
    #[cfg(not(embedded_model))]
    bail!("this build has no embedded model (models/passkey-mamba was missing at build time); pass --model")
}

/// The commit of a hub-cache snapshot file (`…/snapshots/<commit>/<file>`).
fn snapshot_commit(path: &Path) -> Option<String> {
    path.ancestors().find_map(|a| {
        let parent = a.parent()?;
        (parent.file_name()? == "snapshots")
            .then(|| a.file_name().map(|n| n.to_string_lossy().into_owned()))?
    })
}

/// Bytes hashed from each end of a file for its fingerprint: the safetensors header and
/// the first and last tensors, without reading gigabytes.
const FINGERPRINT_SPAN: u64 = 1 << 20;

/// Size, modification time and a hash of the first and last MiB of `path`: cheap, and
/// it changes when a checkpoint is replaced in place.
pub fn file_fingerprint(path: &Path) -> Result<serde_json::Value> {
    use std::io::{Seek, SeekFrom};
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = f.metadata()?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let mut head = vec![0u8; size.min(FINGERPRINT_SPAN) as usize];
    f.read_exact(&mut head)?;
    if size > FINGERPRINT_SPAN {
        let tail_len = (size - FINGERPRINT_SPAN).min(FINGERPRINT_SPAN);
        f.seek(SeekFrom::Start(size - tail_len))?;
        let mut tail = vec![0u8; tail_len as usize];
        f.read_exact(&mut tail)?;
        head.extend_from_slice(&tail);
    }
    Ok(serde_json::json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "bytes": size,
        "mtime": mtime,
        "fnv1a64": format!("{:016x}", fnv1a64(&head)),
    }))
}

/// Finds the files `spec` names: a directory if one exists at that path, else a hub repo id.
pub fn find_files(spec: Option<&str>, revision: &str) -> Result<ModelFiles> {
    match spec {
        None => embedded_files(),
        Some(s) if Path::new(s).exists() => files_from_dir(Path::new(s)),
        Some(s) if looks_like_repo_id(s) => {
            files_from_hub(&HubRepo::new(s, revision, RepoType::Model))
        }
        Some(s) => {
            bail!("model \"{s}\" is neither an existing directory nor a hub repo id (ORG/NAME)")
        }
    }
}

/// The hub repo whose tokenizer Mamba checkpoints use.
pub const NEOX_REPO: &str = "EleutherAI/gpt-neox-20b";

/// Which tokenizer a model runs with: where it came from and a hash of its JSON, so that
/// a resumed run can tell it is the same one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenizerSource {
    /// `model` (the checkpoint's own), `built-in gpt-neox-20b`, a path or a repo id.
    pub source: String,
    pub fnv1a64: String,
}

impl TokenizerSource {
    fn new(source: &str, json: &[u8]) -> Self {
        Self {
            source: source.to_string(),
            fnv1a64: format!("{:016x}", fnv1a64(json)),
        }
    }
}

/// tokenizer.json bytes of GPT-NeoX-20B: the copy built into the binary (identical to
/// EleutherAI/gpt-neox-20b's), else the hub.
fn neox_tokenizer_json() -> Result<(Vec<u8>, String)> {
    #[cfg(embedded_neox)]
    {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(NEOX_TOKENIZER_GZ)
            .read_to_end(&mut json)
            .context("built-in tokenizer is corrupt")?;
        Ok((json, "built-in gpt-neox-20b".to_string()))
    }
    #[cfg(not(embedded_neox))]
    {
        let repo = HubRepo::new(NEOX_REPO, "main", RepoType::Model);
        let path = repo.require("tokenizer.json")?;
        Ok((std::fs::read(&path)?, NEOX_REPO.to_string()))
    }
}

/// The GPT-NeoX-20B tokenizer that Mamba checkpoints use (see [`neox_tokenizer_json`]).
pub fn neox_tokenizer() -> Result<Tokenizer> {
    let (json, what) = neox_tokenizer_json()?;
    tokenizer_from_bytes(&json, &what)
}

fn tokenizer_from_bytes(bytes: &[u8], what: &str) -> Result<Tokenizer> {
    Tokenizer::from_bytes(bytes).map_err(|e| anyhow::anyhow!("cannot load tokenizer {what}: {e}"))
}

/// `--tokenizer`: a tokenizer.json path, a folder holding one, or a hub repo id
/// (EleutherAI/gpt-neox-20b is the built-in copy, so it needs no network).
pub fn tokenizer_from_spec(spec: &str) -> Result<(Tokenizer, TokenizerSource)> {
    let p = Path::new(spec);
    let (bytes, what) = if p.is_file() {
        (
            std::fs::read(p).with_context(|| format!("cannot read tokenizer {spec}"))?,
            spec.to_string(),
        )
    } else if p.is_dir() {
        let f = p.join("tokenizer.json");
        if !f.exists() {
            bail!("no tokenizer.json in {spec}");
        }
        (std::fs::read(&f)?, f.display().to_string())
    } else if spec.eq_ignore_ascii_case(NEOX_REPO) {
        neox_tokenizer_json()?
    } else if looks_like_repo_id(spec) {
        let repo = HubRepo::new(spec, "main", RepoType::Model);
        let path = repo.require("tokenizer.json")?;
        (std::fs::read(&path)?, spec.to_string())
    } else {
        bail!("tokenizer \"{spec}\" is neither a file, a directory nor a hub repo id")
    };
    let tokenizer = tokenizer_from_bytes(&bytes, &what)?;
    Ok((tokenizer, TokenizerSource::new(&what, &bytes)))
}

/// Parses `--device`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        // `cpu:N` names CPU worker N of a `--device` list; every one is the host CPU.
        s if s == "cpu"
            || s.strip_prefix("cpu:")
                .is_some_and(|n| n.parse::<usize>().is_ok()) =>
        {
            Ok(Device::Cpu)
        }
        "metal" => {
            if cfg!(feature = "metal") {
                Ok(Device::new_metal(0)?)
            } else {
                bail!("--device metal: this binary was built without the `metal` feature")
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("bad CUDA device \"{s}\""))?,
                None => 0,
            };
            if cfg!(feature = "cuda") {
                Ok(Device::new_cuda(ordinal)
                    .with_context(|| format!("cannot open CUDA device {ordinal}"))?)
            } else {
                bail!("--device {s}: this binary was built without the `cuda` feature")
            }
        }
        other => bail!("unknown device \"{other}\": expected cpu, cuda, cuda:N or metal"),
    }
}

/// Parses a `--device` list: `cuda:0,cuda:1`, or `cuda:0,1,2,3` where a bare number takes
/// the previous entry's kind; `cpu:0,cpu:1` lists CPU workers (they share the cores).
/// Entries are normalised (`cuda` is `cuda:0`) and must be distinct.
pub fn parse_device_list(spec: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for raw in spec.split(',') {
        let entry = raw.trim().to_ascii_lowercase();
        if entry.is_empty() {
            bail!("--device {spec}: an entry is empty");
        }
        let entry = if entry.bytes().all(|b| b.is_ascii_digit()) {
            match out.last().and_then(|p| p.split_once(':')) {
                Some((kind, _)) => format!("{kind}:{entry}"),
                None => bail!(
                    "--device {spec}: a bare number needs a device kind before it (e.g. cuda:0,1)"
                ),
            }
        } else if entry == "cuda" {
            "cuda:0".to_string()
        } else {
            entry
        };
        if entry == "metal" && !out.is_empty() || out.iter().any(|e| e == "metal") {
            bail!("--device {spec}: metal runs as one device only");
        }
        if out.contains(&entry) {
            bail!("--device {spec} lists {entry} twice: give each device once");
        }
        out.push(entry);
    }
    if out.len() > 1 && out.iter().any(|e| e == "cpu") {
        bail!("--device {spec}: name CPU workers cpu:0, cpu:1, … in a list");
    }
    Ok(out)
}

/// `cpu`, `cuda` or `metal`: the kind of device, which changes results (the ordinal does not).
pub fn device_kind(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// Parses `--dtype`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        other => bail!("unknown dtype \"{other}\": expected f32, bf16 or f16"),
    }
}

/// Builds the model from resolved files.
pub fn load_model(files: &ModelFiles, device: &Device, dtype: DType) -> Result<MambaModel> {
    let config = MambaConfig::from_json_str(&files.config_json)
        .with_context(|| format!("model {}", files.name))?;
    let vb = match &files.weights {
        WeightFiles::Safetensors(paths) => {
            for p in paths {
                check_safetensors_header(p)?;
            }
            // SAFETY: the files are memory-mapped read-only; modifying them while the
            // program runs is the user's own undefined behaviour, as with any mmap loader.
            unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }
                .with_context(|| format!("cannot read checkpoint {}", paths[0].display()))?
        }
        WeightFiles::Pytorch(p) => VarBuilder::from_pth(p, dtype, device)
            .map_err(|e| anyhow::anyhow!("cannot read checkpoint {}: {e}", p.display()))?,
        WeightFiles::Embedded(bytes) => {
            VarBuilder::from_buffered_safetensors(bytes.to_vec(), dtype, device)
                .context("embedded checkpoint is corrupt")?
        }
    };
    let model = MambaModel::new(&config, vb).with_context(|| format!("model {}", files.name))?;
    Ok(model)
}

/// Rejects truncated or non-safetensors files with a clear message before mmap.
fn check_safetensors_header(p: &Path) -> Result<()> {
    let mut f = std::fs::File::open(p)
        .with_context(|| format!("cannot open checkpoint {}", p.display()))?;
    let size = f.metadata()?.len();
    let mut len = [0u8; 8];
    if size < 8 || f.read_exact(&mut len).is_err() {
        bail!(
            "checkpoint {} is corrupt: too short for a safetensors file",
            p.display()
        );
    }
    let header = u64::from_le_bytes(len);
    if header == 0 || header > size - 8 || header > 100_000_000 {
        bail!(
            "checkpoint {} is corrupt: bad safetensors header length {header}",
            p.display()
        );
    }
    let mut head = vec![0u8; header as usize];
    f.read_exact(&mut head)?;
    let meta: serde_json::Value = serde_json::from_slice(&head).map_err(|_| {
        anyhow::anyhow!(
            "checkpoint {} is corrupt: safetensors header is not JSON",
            p.display()
        )
    })?;
    let mut end = 0u64;
    for (k, v) in meta.as_object().into_iter().flatten() {
        if k == "__metadata__" {
            continue;
        }
        if let Some(off) = v.get("data_offsets").and_then(|o| o.as_array()) {
            end = end.max(off.get(1).and_then(|x| x.as_u64()).unwrap_or(0));
        }
    }
    if 8 + header + end > size {
        bail!(
            "checkpoint {} is corrupt: truncated ({} bytes, tensors need {})",
            p.display(),
            size,
            8 + header + end
        );
    }
    Ok(())
}

/// A model ready to run: weights, tokenizer and what shipped beside them.
pub struct LoadedModel {
    pub model: MambaModel,
    pub tokenizer: Tokenizer,
    pub files: ModelFiles,
    /// Where the tokenizer came from (recorded in run folders).
    pub tokenizer_source: TokenizerSource,
    /// Problems found at load that do not stop it (the CLI prints them).
    pub warnings: Vec<String>,
    eos: Option<u32>,
}

/// What names a model to load: the CLI's model flags, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Hub repo id or local directory; `None`: the embedded model.
    pub model: Option<String>,
    pub revision: String,
    /// tokenizer.json path or hub repo id; `None`: the model's own, else GPT-NeoX-20B.
    pub tokenizer: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    pub device: String,
    /// f32, bf16 or f16.
    pub dtype: String,
    /// auto, candle or kernels: which implementation runs the mixers.
    pub backend: String,
}

/// Loads what `args` names.
pub fn load(args: &ModelSpec) -> Result<LoadedModel> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let files = find_files(args.model.as_deref(), &args.revision)?;
    let (tokenizer, tokenizer_source) = match (&args.tokenizer, &files.tokenizer_json) {
        (Some(spec), _) => tokenizer_from_spec(spec)?,
        (None, Some(bytes)) => (
            tokenizer_from_bytes(bytes, &format!("{}/tokenizer.json", files.name))?,
            TokenizerSource::new("model", bytes),
        ),
        (None, None) => {
            let (json, what) = neox_tokenizer_json()?;
            (
                tokenizer_from_bytes(&json, &what)?,
                TokenizerSource::new(&what, &json),
            )
        }
    };
    let backend: crate::model::BackendChoice = args.backend.parse()?;
    let (dtype, dtype_note) = dtype_on_device(&device, dtype);
    let model = load_model(&files, &device, dtype)?.with_backend(backend)?;
    let mut loaded = LoadedModel::new(model, tokenizer, files)?;
    loaded.tokenizer_source = tokenizer_source;
    loaded.warnings.extend(dtype_note);
    Ok(loaded)
}

/// The dtype to run `dtype` in on `device`: Metal compiles its bf16 kernels only on GPUs
/// with bfloat (`__HAVE_BFLOAT__` in candle-metal-kernels), so where a bf16 matmul fails,
/// bf16 runs as f16 (the same memory; the residual stream stays f32 where the checkpoint
/// asks), with a note saying so.
fn dtype_on_device(device: &Device, dtype: DType) -> (DType, Option<String>) {
    if !(device.is_metal() && dtype == DType::BF16) {
        return (dtype, None);
    }
    let probe = Tensor::ones((2, 2), DType::BF16, device)
        .and_then(|t| t.matmul(&t))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec2::<f32>());
    match probe {
        Ok(_) => (dtype, None),
        Err(e) => (
            DType::F16,
            Some(format!(
                "this Metal GPU has no bf16 kernels ({e}); running in f16 instead"
            )),
        ),
    }
}

impl LoadedModel {
    pub fn new(model: MambaModel, tokenizer: Tokenizer, files: ModelFiles) -> Result<Self> {
        let eos = model
            .config()
            .eos_token_id
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"));
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > model.config().vocab_size {
            bail!(
                "tokenizer has {vocab} tokens but model {} has only {} embeddings: wrong tokenizer?",
                files.name,
                model.config().vocab_size
            );
        }
        let mut warnings = Vec::new();
        let rows = model.config().vocab_size;
        // Checkpoints pad the embedding to a multiple of 8 rows; a larger gap means ids
        // the tokenizer cannot decode (generation masks them).
        if rows > vocab.div_ceil(8) * 8 {
            warnings.push(format!(
                "model {} has {rows} embedding rows but the tokenizer only {vocab} tokens: ids {vocab}..{} are never produced; wrong tokenizer?",
                files.name,
                rows - 1
            ));
        }
        let tokenizer_source = match &files.tokenizer_json {
            Some(bytes) => TokenizerSource::new("model", bytes),
            None => TokenizerSource {
                source: "given".to_string(),
                fnv1a64: String::new(),
            },
        };
        Ok(Self {
            model,
            tokenizer,
            files,
            tokenizer_source,
            warnings,
            eos,
        })
    }

    pub fn config(&self) -> &MambaConfig {
        self.model.config()
    }

    pub fn name_str(&self) -> &str {
        &self.files.name
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Every setting of the loaded model that changes a result: where it came from
    /// (revision and resolved commit on the hub), fingerprints of its config and weight
    /// files, the tokenizer, the device kind, dtype and backend. Run folders record it,
    /// and a resume with anything different is refused.
    pub fn identity(&self) -> Result<serde_json::Value> {
        let f = &self.files;
        let mut files = Vec::new();
        if let Some(p) = &f.config_path {
            files.push(file_fingerprint(p)?);
        }
        match &f.weights {
            WeightFiles::Safetensors(paths) => {
                for p in paths {
                    files.push(file_fingerprint(p)?);
                }
            }
            WeightFiles::Pytorch(p) => files.push(file_fingerprint(p)?),
            WeightFiles::Embedded(bytes) => files.push(serde_json::json!({
                "file": "embedded",
                "bytes": bytes.len(),
                "fnv1a64": format!("{:016x}", fnv1a64(bytes)),
            })),
        }
        let device = self.model.device();
        Ok(serde_json::json!({
            "name": f.name,
            // The commit a revision resolved to is what decides the result; a branch
            // name is recorded only when no commit is known.
            "revision": if f.commit.is_some() { None } else { f.revision.clone() },
            "commit": f.commit,
            "files": files,
            "tokenizer": self.tokenizer_source,
            "device": device_kind(device),
            "dtype": format!("{:?}", self.model.dtype()).to_lowercase(),
            "backend": self.model.backend_name(),
        }))
    }

    /// The decimation preset shipped beside the model (`decimation.json`), if valid.
    pub fn decimation_preset(&self) -> Option<DecimationConfig> {
        self.files
            .decimation_json
            .as_deref()
            .and_then(|j| DecimationConfig::from_json_str(j).ok())
    }

    /// The length the model was trained on, for the zero-shot L_base (2048 for the
    /// public Mamba checkpoints, trained on 2K-token sequences).
    pub fn train_len(&self) -> usize {
        self.files.train_len.unwrap_or(2048)
    }

    /// What decimation defaults depend on.
    pub fn decimation_defaults(&self) -> crate::decimation::ModelDefaults {
        crate::decimation::ModelDefaults {
            name: self.files.name.clone(),
            n_layer: self.config().n_layer,
            preset: self.decimation_preset(),
            train_len: self.train_len(),
        }
    }

    /// Passkey prompt template JSON shipped beside the model.
    pub fn passkey_template(&self) -> Option<String> {
        self.files.template_json.clone()
    }

    /// Default haystack text shipped beside the model.
    pub fn haystack(&self) -> Option<String> {
        self.files.haystack.clone()
    }

    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
            .get_ids()
            .to_vec())
    }

    pub fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))
    }
}

impl EvalModel for LoadedModel {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_text(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_ids(ids)
    }

    fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        policy: &Policy,
    ) -> Result<GreedyOutput> {
        let params = GenerateParams {
            max_new_tokens,
            // Never an id of the padded embedding rows, which the tokenizer cannot decode.
            vocab_size: Some(self.tokenizer.get_vocab_size(true)),
            ..GenerateParams::greedy()
        };
        let out = generation::generate(
            &self.model,
            prompt,
            &params,
            policy.as_option(),
            self.eos,
            |_| Ok(()),
        )?;
        Ok(GreedyOutput {
            text: self.decode_ids(&out.tokens)?,
            tokens: out.tokens,
            prefill_secs: out.prefill_secs,
            kept_per_layer: out.trace.len_out_of(policy.as_dyn().reported_layers()),
        })
    }

    fn generate_greedy_batch(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        policy: &Policy,
    ) -> Result<Vec<GreedyOutput>> {
        let params = GenerateParams {
            max_new_tokens,
            vocab_size: Some(self.tokenizer.get_vocab_size(true)),
            ..GenerateParams::greedy()
        };
        let outs = generation::generate_batch(
            &self.model,
            prompts,
            &params,
            policy.as_option(),
            self.eos,
        )?;
        outs.into_iter()
            .map(|out| {
                Ok(GreedyOutput {
                    text: self.decode_ids(&out.tokens)?,
                    kept_per_layer: out.trace.len_out_of(policy.as_dyn().reported_layers()),
                    tokens: out.tokens,
                    prefill_secs: out.prefill_secs,
                })
            })
            .collect()
    }

    fn score_tail(&self, window: &[u32], pred_len: usize, policy: &Policy) -> Result<TailScore> {
        if pred_len == 0 || pred_len >= window.len() {
            bail!(
                "cannot score the last {pred_len} tokens of a {}-token window",
                window.len()
            );
        }
        let ids = Tensor::from_slice(window, (1, window.len()), self.model.device())?;
        let mut state = self.model.new_state(1);
        // Positions w−pred_len−1 .. w−2 predict the scored tokens; R = pred_len + 1 keeps
        // them (and the last token) out of decimation, as the authors' PG-19 eval does.
        let opts = ForwardOptions {
            policy: policy.as_option(),
            protected_tail: pred_len + 1,
            logits: LogitsSpan::Last(pred_len + 1),
            record_indices: false,
            observer: None,
        };
        let start = Instant::now();
        let (logits, trace) = self.model.forward_with_state(&ids, &mut state, &opts)?;
        let forward_secs = start.elapsed().as_secs_f64();
        let logits = logits
            .context("no logits")?
            .squeeze(0)?
            .narrow(0, 0, pred_len)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
        let targets = &window[window.len() - pred_len..];
        let target_t = Tensor::from_slice(targets, (pred_len, 1), self.model.device())?;
        let nll: Vec<f32> = log_probs
            .gather(&target_t, 1)?
            .neg()?
            .flatten_all()?
            .to_vec1()?;
        Ok(TailScore {
            nll,
            forward_secs,
            kept_per_layer: trace.len_out_of(policy.as_dyn().reported_layers()),
        })
    }

    fn score_tails(
        &self,
        windows: &[&[u32]],
        pred_len: usize,
        policy: &Policy,
    ) -> Result<Vec<TailScore>> {
        // On the CPU a batched forward is no faster per token (see `generate_batch`).
        let batchable = windows.len() > 1 && !self.model.device().is_cpu();
        let (Some(first), true) = (windows.first(), batchable) else {
            return windows
                .iter()
                .map(|w| self.score_tail(w, pred_len, policy))
                .collect();
        };
        let len = first.len();
        if windows.iter().any(|w| w.len() != len) {
            bail!("a batch of windows must share one length");
        }
        if pred_len == 0 || pred_len >= len {
            bail!("cannot score the last {pred_len} tokens of a {len}-token window");
        }
        let batch = windows.len();
        let flat: Vec<u32> = windows.iter().flat_map(|w| w.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (batch, len), self.model.device())?;
        let mut state = self.model.new_state(batch);
        let opts = ForwardOptions {
            policy: policy.as_option(),
            protected_tail: pred_len + 1,
            logits: LogitsSpan::Last(pred_len + 1),
            record_indices: false,
            observer: None,
        };
        let start = Instant::now();
        let (logits, trace) = self.model.forward_with_state(&ids, &mut state, &opts)?;
        let forward_secs = start.elapsed().as_secs_f64() / batch as f64;
        let logits = logits.context("no logits")?.narrow(1, 0, pred_len)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 2)?;
        let targets: Vec<u32> = windows
            .iter()
            .flat_map(|w| w[len - pred_len..].iter().copied())
            .collect();
        let target_t = Tensor::from_vec(targets, (batch, pred_len, 1), self.model.device())?;
        let nll = log_probs
            .gather(&target_t, 2)?
            .neg()?
            .squeeze(2)?
            .to_vec2::<f32>()?;
        let kept = trace.len_out_of(policy.as_dyn().reported_layers());
        Ok(nll
            .into_iter()
            .map(|nll| TailScore {
                nll,
                forward_secs,
                kept_per_layer: kept.clone(),
            })
            .collect())
    }

    fn name(&self) -> String {
        self.files.name.clone()
    }

    fn identity(&self) -> Result<serde_json::Value> {
        LoadedModel::identity(self)
    }
}
