//! Mamba-1 model configuration, read from either checkpoint format.
//!
//! * Original (`state-spaces/mamba-*`, `assafbk/*`, mamba_ssm's `MambaConfig`):
//!   `d_model`, `n_layer`, `vocab_size`, `ssm_cfg`, `rms_norm`, `residual_in_fp32`,
//!   `fused_add_norm`, `pad_vocab_size_multiple`, `tie_embeddings`.
//! * transformers (`state-spaces/mamba-*-hf`, `MambaConfig`): `hidden_size`,
//!   `num_hidden_layers`, `state_size`, `expand`, `conv_kernel`, `time_step_rank`,
//!   `intermediate_size`, `use_bias`, `use_conv_bias`, `layer_norm_epsilon`,
//!   `tie_word_embeddings`.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

/// Which family of file and tensor names a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    /// mamba_ssm: `backbone.embedding.weight`, usually `pytorch_model.bin`.
    Original,
    /// transformers: `backbone.embeddings.weight`, `model.safetensors` (maybe sharded).
    Transformers,
}

/// Everything the model needs to know about its shape, normalised across formats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MambaConfig {
    pub format: CheckpointFormat,
    pub d_model: usize,
    pub n_layer: usize,
    /// Rows of the embedding matrix (already padded to `pad_vocab_size_multiple`).
    pub vocab_size: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    pub d_inner: usize,
    pub dt_rank: usize,
    pub conv_bias: bool,
    /// Bias in in_proj and out_proj.
    pub bias: bool,
    /// RMSNorm when true, LayerNorm (with bias) otherwise.
    pub rms_norm: bool,
    pub norm_eps: f64,
    pub residual_in_fp32: bool,
    pub tie_embeddings: bool,
    pub eos_token_id: Option<u32>,
}

fn get_usize(m: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .with_context(|| format!("config key `{key}` must be a non-negative integer, got {v}")),
    }
}

fn get_bool(m: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .with_context(|| format!("config key `{key}` must be true or false, got {v}")),
    }
}

fn get_f64(m: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("config key `{key}` must be a number, got {v}")),
    }
}

fn require_usize(m: &Map<String, Value>, key: &str) -> Result<usize> {
    get_usize(m, key)?.with_context(|| format!("config is missing `{key}`"))
}

/// `dt_rank`/`time_step_rank`: "auto" means ceil(d_model / 16) (Gu & Dao 2023, §3.6).
fn dt_rank(m: &Map<String, Value>, key: &str, d_model: usize) -> Result<usize> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(d_model.div_ceil(16)),
        Some(Value::String(s)) if s == "auto" => Ok(d_model.div_ceil(16)),
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("config key `{key}` must be \"auto\" or an integer, got {v}")),
    }
}

/// The end-of-text id, when the config names a single one.
fn eos(m: &Map<String, Value>) -> Option<u32> {
    match m.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl MambaConfig {
    /// Parses a `config.json` of either format.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let m = value
            .as_object()
            .context("config.json must be a JSON object")?;
        if let Some(Value::String(mt)) = m.get("model_type") {
            if mt != "mamba" && mt != "falcon_mamba" {
                bail!("config.json has model_type \"{mt}\": only Mamba-1 (\"mamba\") models are supported");
            }
        }
        let cfg = if m.contains_key("d_model") {
            Self::from_original(m)?
        } else if m.contains_key("hidden_size") {
            Self::from_transformers(m)?
        } else {
            bail!("config.json is neither a mamba_ssm config (d_model) nor a transformers MambaConfig (hidden_size)");
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_original(m: &Map<String, Value>) -> Result<Self> {
        let d_model = require_usize(m, "d_model")?;
        let empty = Map::new();
        let ssm = match m.get("ssm_cfg") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(o)) => o,
            Some(v) => bail!("config key `ssm_cfg` must be an object, got {v}"),
        };
        if let Some(Value::String(layer)) = ssm.get("layer") {
            if layer != "Mamba1" {
                bail!("ssm_cfg.layer is \"{layer}\": only Mamba1 layers are supported");
            }
        }
        let mut vocab_size = require_usize(m, "vocab_size")?;
        let pad = get_usize(m, "pad_vocab_size_multiple")?.unwrap_or(8);
        if pad > 1 && vocab_size % pad != 0 {
            // mamba_ssm pads the embedding to a multiple of `pad_vocab_size_multiple`.
            vocab_size += pad - vocab_size % pad;
        }
        let expand = get_usize(ssm, "expand")?.unwrap_or(2);
        Ok(Self {
            format: CheckpointFormat::Original,
            d_model,
            n_layer: require_usize(m, "n_layer")?,
            vocab_size,
            d_state: get_usize(ssm, "d_state")?.unwrap_or(16),
            d_conv: get_usize(ssm, "d_conv")?.unwrap_or(4),
            expand,
            d_inner: expand * d_model,
            dt_rank: dt_rank(ssm, "dt_rank", d_model)?,
            conv_bias: get_bool(ssm, "conv_bias")?.unwrap_or(true),
            bias: get_bool(ssm, "bias")?.unwrap_or(false),
            rms_norm: get_bool(m, "rms_norm")?.unwrap_or(true),
            norm_eps: get_f64(m, "norm_epsilon")?.unwrap_or(1e-5),
            residual_in_fp32: get_bool(m, "residual_in_fp32")?.unwrap_or(true),
            tie_embeddings: get_bool(m, "tie_embeddings")?.unwrap_or(true),
            eos_token_id: eos(m),
        })
    }

    fn from_transformers(m: &Map<String, Value>) -> Result<Self> {
        let d_model = require_usize(m, "hidden_size")?;
        let expand = get_usize(m, "expand")?.unwrap_or(2);
        let d_inner = get_usize(m, "intermediate_size")?.unwrap_or(expand * d_model);
        Ok(Self {
            format: CheckpointFormat::Transformers,
            d_model,
            n_layer: require_usize(m, "num_hidden_layers")?,
            vocab_size: require_usize(m, "vocab_size")?,
            d_state: get_usize(m, "state_size")?.unwrap_or(16),
            d_conv: get_usize(m, "conv_kernel")?.unwrap_or(4),
            expand,
            d_inner,
            dt_rank: dt_rank(m, "time_step_rank", d_model)?,
            conv_bias: get_bool(m, "use_conv_bias")?.unwrap_or(true),
            bias: get_bool(m, "use_bias")?.unwrap_or(false),
            // transformers' Mamba only has RMSNorm.
            rms_norm: true,
            norm_eps: get_f64(m, "layer_norm_epsilon")?.unwrap_or(1e-5),
            residual_in_fp32: get_bool(m, "residual_in_fp32")?.unwrap_or(true),
            tie_embeddings: get_bool(m, "tie_word_embeddings")?.unwrap_or(true),
            eos_token_id: eos(m),
        })
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("vocab_size", self.vocab_size),
            ("d_state", self.d_state),
            ("d_conv", self.d_conv),
            ("d_inner", self.d_inner),
            ("dt_rank", self.dt_rank),
        ] {
            if v == 0 {
                bail!("config value {name} must be positive");
            }
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            bail!(
                "config norm epsilon must be positive, got {}",
                self.norm_eps
            );
        }
        Ok(())
    }

    /// A config of the named public Mamba size, for benchmarks with random weights.
    pub fn of_shape(shape: &str) -> Result<Self> {
        let (d_model, n_layer) = match shape {
            "130m" => (768, 24),
            "370m" => (1024, 48),
            "790m" => (1536, 48),
            "1.4b" => (2048, 48),
            "2.8b" => (2560, 64),
            other => bail!("unknown shape \"{other}\": expected 130m, 370m, 790m, 1.4b or 2.8b"),
        };
        Ok(Self {
            format: CheckpointFormat::Original,
            d_model,
            n_layer,
            vocab_size: 50280,
            d_state: 16,
            d_conv: 4,
            expand: 2,
            d_inner: 2 * d_model,
            dt_rank: d_model.div_ceil(16),
            conv_bias: true,
            bias: false,
            rms_norm: true,
            norm_eps: 1e-5,
            residual_in_fp32: true,
            tie_embeddings: true,
            eos_token_id: Some(0),
        })
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn num_params(&self) -> usize {
        let (d, di, n, r, k) = (
            self.d_model,
            self.d_inner,
            self.d_state,
            self.dt_rank,
            self.d_conv,
        );
        let norm = if self.rms_norm { d } else { 2 * d };
        let mixer = d * 2 * di
            + if self.bias { 2 * di + d } else { 0 }
            + di * k
            + if self.conv_bias { di } else { 0 }
            + di * (r + 2 * n)
            + r * di
            + di
            + di * n
            + di
            + di * d;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.n_layer * (mixer + norm) + norm + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_original_130m_config() {
        let c = MambaConfig::from_json_str(
            r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": true,
                "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 8}"#,
        )
        .unwrap();
        assert_eq!(c.format, CheckpointFormat::Original);
        assert_eq!(c.vocab_size, 50280);
        assert_eq!(
            (c.d_inner, c.dt_rank, c.d_state, c.d_conv),
            (1536, 48, 16, 4)
        );
        assert!(c.tie_embeddings && c.rms_norm && !c.bias && c.conv_bias);
        // mamba-130m has ~129M parameters.
        assert!(
            (129_000_000..130_000_000).contains(&c.num_params()),
            "{}",
            c.num_params()
        );
    }

    #[test]
    fn parses_transformers_config() {
        let c = MambaConfig::from_json_str(
            r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 768,
                "num_hidden_layers": 24, "vocab_size": 50280, "state_size": 16, "expand": 2,
                "conv_kernel": 4, "time_step_rank": 48, "intermediate_size": 1536, "use_bias": false,
                "use_conv_bias": true, "layer_norm_epsilon": 1e-5, "eos_token_id": 0}"#,
        )
        .unwrap();
        assert_eq!(c.format, CheckpointFormat::Transformers);
        assert_eq!((c.d_inner, c.dt_rank, c.eos_token_id), (1536, 48, Some(0)));
        assert_eq!(
            c,
            MambaConfig {
                format: c.format,
                ..MambaConfig::of_shape("130m").unwrap()
            }
        );
    }

    #[test]
    fn rejects_bad_configs() {
        let err = |s: &str| MambaConfig::from_json_str(s).unwrap_err().to_string();
        assert!(err("{").contains("not valid JSON"));
        assert!(err(r#"{"foo": 1}"#).contains("neither"));
        assert!(err(r#"{"d_model": 8, "vocab_size": 8}"#).contains("missing `n_layer`"));
        assert!(err(r#"{"d_model": "x", "n_layer": 1, "vocab_size": 8}"#).contains("`d_model`"));
        assert!(err(r#"{"model_type": "mamba2", "hidden_size": 8}"#).contains("mamba2"));
        assert!(err(r#"{"d_model": 8, "n_layer": 0, "vocab_size": 8}"#)
            .contains("n_layer must be positive"));
    }
}
