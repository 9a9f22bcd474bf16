//! `decimamba generate`.

use super::common::{DecimationArgs, ModelArgs};
use crate::generation::{self, GenerateParams};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The prompt; omit (or pass "-") to read it from stdin.
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_file: Option<std::path::PathBuf>,
    #[arg(long, short = 'n', default_value_t = 100)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Repetition penalty (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens of context the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 299792458)]
    pub seed: u64,
    /// Prefill in chunks of N tokens with the state carried over: constant memory for very
    /// long prompts (vanilla only).
    #[arg(long, value_name = "N")]
    pub prefill_chunk: Option<usize>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Print the sequence length entering and leaving each layer (stderr; in --json too).
    #[arg(long)]
    pub decimation_report: bool,
    /// With --json: include the kept token indices of each decimating layer.
    #[arg(long)]
    pub kept_indices: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decimation: DecimationArgs,
}

fn read_prompt(args: &GenerateArgs) -> Result<String> {
    let bytes = match (&args.prompt_file, args.prompt.as_deref()) {
        (Some(p), _) => {
            std::fs::read(p).with_context(|| format!("cannot read prompt file {}", p.display()))?
        }
        (None, Some(p)) if p != "-" => return Ok(p.to_string()),
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the prompt from stdin")?;
            buf
        }
    };
    String::from_utf8(bytes).context("the prompt is not valid UTF-8")
}

/// The per-layer length table (the paper's Fig. 2, right).
pub fn report_table(
    trace: &crate::model::DecimationTrace,
    deci: Option<&crate::DecimationConfig>,
) -> String {
    let mut s = String::from("layer  len_in  len_out\n");
    for t in &trace.layers {
        let mark = match deci.and_then(|d| d.rank_of(t.layer)) {
            Some(r) => format!("  decimating (s={r})"),
            None => String::new(),
        };
        s.push_str(&format!(
            "{:>5}  {:>6}  {:>7}{mark}\n",
            t.layer, t.len_in, t.len_out
        ));
    }
    s
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = read_prompt(&args)?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let loaded = args.model.load()?;
    let decimation = args.decimation.resolve(&loaded)?;
    let ids = loaded.encode_text(&prompt)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: args.seed,
        prefill_chunk: args.prefill_chunk,
        vocab_size: Some(loaded.tokenizer.get_vocab_size(true)),
    };
    let mut stream = loaded.tokenizer.decode_stream(false);
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let mut on_token = |id: u32| -> Result<()> {
        if !json {
            if let Some(text) = stream
                .step(id)
                .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
            {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
        }
        Ok(())
    };
    let out = generation::generate_traced(
        &loaded.model,
        &ids,
        &params,
        decimation.as_ref(),
        args.kept_indices,
        loaded.eos_token_id(),
        &mut on_token,
    )?;
    let prefill_tps = out.prompt_len as f64 / out.prefill_secs.max(1e-9);
    let decode_tps = if out.decode_steps > 0 {
        out.decode_steps as f64 / out.decode_secs.max(1e-9)
    } else {
        0.0
    };
    if json {
        let text = loaded.decode_ids(&out.tokens)?;
        let v = serde_json::json!({
            "model": loaded.name_str(),
            "prompt_tokens": out.prompt_len,
            "generated_tokens": out.tokens.len(),
            "tokens": out.tokens,
            "text": text,
            "stopped_at_eos": out.stopped_at_eos,
            "prefill_secs": out.prefill_secs,
            "prefill_tokens_per_sec": prefill_tps,
            "decode_tokens_per_sec": decode_tps,
            "decimation": decimation,
            "layers": if args.decimation_report || args.kept_indices { Some(&out.trace.layers) } else { None },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
    }
    if args.decimation_report {
        eprint!("{}", report_table(&out.trace, decimation.as_ref()));
    }
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tokens/s); decode: {} tokens, {:.1} tokens/s",
        out.prompt_len,
        out.prefill_secs,
        prefill_tps,
        out.tokens.len(),
        decode_tps
    );
    Ok(())
}
