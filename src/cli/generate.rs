//! `decimamba generate`.

use super::common::{DecimationArgs, ModelArgs};
use super::output;
use crate::generation::{self, GenerateParams};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Read};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The prompt; omit (or pass "-") to read it from stdin.
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Many prompts: a JSONL file of {"prompt": "…"} lines (an "id" field is echoed back).
    /// Prints one JSON result per line, in input order; prompts of one token length run in
    /// batches, and each result equals generating that prompt alone with the same flags.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["prompt", "prompt_file", "json", "kept_indices", "decimation_report"])]
    pub prompts: Option<std::path::PathBuf>,
    /// With --prompts: prompts of one length run together, at most N at a time; default:
    /// automatic from free memory on a GPU, 1 on the CPU.
    #[arg(long, value_name = "N", requires = "prompts")]
    pub batch_size: Option<usize>,
    /// The most tokens to generate (fewer if the model emits end-of-text).
    #[arg(
        long,
        short = 'n',
        default_value_t = 100,
        allow_negative_numbers = true
    )]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens (needs --temperature).
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: only among the most likely tokens whose probabilities sum to P,
    /// in (0, 1] (needs --temperature).
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Repetition penalty (1.0 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Tokens of context the repetition penalty looks at.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub repeat_last_n: usize,
    /// Sampling seed, to repeat a run exactly; default: a random one, printed on stderr.
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Prefill in chunks of N tokens with the state carried over: constant memory for very
    /// long prompts (vanilla only).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
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

impl GenerateArgs {
    /// Rejects flags that would otherwise be silently ignored, before the model loads.
    fn check(&self) -> Result<()> {
        if self.temperature == 0.0 {
            let flags = match (self.top_k.is_some(), self.top_p.is_some()) {
                (true, true) => Some("--top-k and --top-p need"),
                (true, false) => Some("--top-k needs"),
                (false, true) => Some("--top-p needs"),
                (false, false) => None,
            };
            if let Some(flags) = flags {
                bail!("{flags} --temperature (> 0): greedy decoding does not sample");
            }
        }
        if self.kept_indices && !self.json {
            bail!("--kept-indices is only reported in the --json output: add --json");
        }
        Ok(())
    }

    /// The generation settings for `loaded`, checked, and the seed (printed when drawn).
    fn params(&self, loaded: &crate::loader::LoadedModel) -> Result<(GenerateParams, u64)> {
        let (seed, drawn) = self.seed();
        let params = GenerateParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
            prefill_chunk: self.prefill_chunk,
            vocab_size: Some(loaded.tokenizer.get_vocab_size(true)),
        };
        params.validate()?;
        if drawn {
            eprintln!("seed: {seed} (rerun with --seed {seed} to repeat)");
        }
        Ok((params, seed))
    }

    /// The seed to sample with, and whether it was drawn at random: `--seed`, else a
    /// random one when sampling, else the fixed greedy seed (greedy never draws from it).
    fn seed(&self) -> (u64, bool) {
        match self.seed {
            Some(seed) => (seed, false),
            None if self.temperature > 0.0 => (rand::random(), true),
            None => (GenerateParams::greedy().seed, false),
        }
    }
}

fn read_prompt(args: &GenerateArgs) -> Result<String> {
    let bytes = match (&args.prompt_file, args.prompt.as_deref()) {
        (Some(p), _) => {
            std::fs::read(p).with_context(|| format!("cannot read prompt file {}", p.display()))?
        }
        (None, Some(p)) if p != "-" => return Ok(strip_bom(p).to_string()),
        _ => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading the prompt from stdin (end with Ctrl-D)…");
            }
            let mut buf = Vec::new();
            stdin
                .lock()
                .read_to_end(&mut buf)
                .context("cannot read the prompt from stdin")?;
            buf
        }
    };
    let text = String::from_utf8(bytes).context("the prompt is not valid UTF-8")?;
    Ok(strip_bom(&text).to_string())
}

/// `text` without a leading UTF-8 byte-order mark (editors on Windows write one).
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// The per-layer length table (the paper's Fig. 2, right).
pub fn report_table(
    trace: &crate::model::ForwardTrace,
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

/// Returned by the token callback once the reader of stdout has gone: stops generating.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

pub fn run(args: GenerateArgs) -> Result<()> {
    args.check()?;
    if let Some(path) = &args.prompts {
        return run_prompts(&args, path);
    }
    let prompt = read_prompt(&args)?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let loaded = args.model.load()?;
    let policy = args.decimation.resolve_policy(&loaded)?;
    let decimation = policy.decimation().cloned();
    let ids = loaded.encode_text(&prompt)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    super::common::check_memory(
        &loaded.model,
        ids.len(),
        policy.keeps_tokens(),
        1,
        args.model.force,
        &format!("a prompt of {} tokens", ids.len()),
    )?;
    let (params, seed) = args.params(&loaded)?;
    let mut stream = loaded.tokenizer.decode_stream(false);
    let json = args.json;
    let mut on_token = |id: u32| -> Result<()> {
        if !json {
            if let Some(text) = stream
                .step(id)
                .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
            {
                output::print(&text)?;
                if output::stdout_closed() {
                    return Err(StdoutClosed.into());
                }
            }
        }
        Ok(())
    };
    let out = match generation::generate_traced(
        &loaded.model,
        &ids,
        &params,
        policy.as_option(),
        args.kept_indices,
        loaded.eos_token_id(),
        &mut on_token,
    ) {
        Ok(out) => out,
        // Nobody reads the text any more: stop quietly.
        Err(e) if e.is::<StdoutClosed>() => return Ok(()),
        Err(e) => return Err(e),
    };
    let prefill_tps = out.prompt_len as f64 / out.prefill_secs.max(1e-9);
    let decode_tps = if out.decode_steps > 0 {
        out.decode_steps as f64 / out.decode_secs.max(1e-9)
    } else {
        0.0
    };
    if json {
        let text = loaded.decode_ids(&out.tokens)?;
        let mut v = serde_json::json!({
            "model": loaded.name_str(),
            "prompt_tokens": out.prompt_len,
            "generated_tokens": out.tokens.len(),
            "tokens": out.tokens,
            "text": text,
            "stopped_at_eos": out.stopped_at_eos,
            "seed": seed,
            "prefill_secs": out.prefill_secs,
            "prefill_tokens_per_sec": prefill_tps,
            "decode_tokens_per_sec": decode_tps,
            "decimation": decimation,
            "layers": if args.decimation_report || args.kept_indices { Some(&out.trace.layers) } else { None },
        });
        if !matches!(policy, crate::Policy::Vanilla | crate::Policy::DeciMamba(_)) {
            v["policy"] = policy.to_json();
        }
        output::println(&serde_json::to_string_pretty(&v)?)?;
    } else {
        output::println("")?;
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

/// One line of a `--prompts` file.
struct PromptLine {
    id: Option<serde_json::Value>,
    ids: Vec<u32>,
}

/// Reads and encodes every prompt of a `--prompts` file, naming the line of any problem.
fn read_prompt_lines(
    path: &std::path::Path,
    loaded: &crate::loader::LoadedModel,
) -> Result<Vec<PromptLine>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let mut lines = Vec::new();
    for (n, line) in strip_bom(&text).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} is not JSON", at()))?;
        let Some(prompt) = v.get("prompt").and_then(|p| p.as_str()) else {
            bail!("{} has no \"prompt\" string", at());
        };
        if prompt.is_empty() {
            bail!("{}: the prompt is empty", at());
        }
        let ids = loaded.encode_text(prompt)?;
        if ids.is_empty() {
            bail!("{}: the prompt encodes to no tokens", at());
        }
        lines.push(PromptLine {
            id: v.get("id").cloned(),
            ids,
        });
    }
    if lines.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(lines)
}

/// `generate --prompts`: every prompt of the file, batched by length, one JSON line each in
/// input order.
fn run_prompts(args: &GenerateArgs, path: &std::path::Path) -> Result<()> {
    let loaded = args.model.load()?;
    let policy = args.decimation.resolve_policy(&loaded)?;
    let prompts = read_prompt_lines(path, &loaded)?;
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let batch_size = match args.batch_size {
        Some(0) => bail!("--batch-size must be at least 1"),
        Some(n) => n,
        None => crate::memory::auto_batch_size(
            loaded.model.config(),
            loaded.model.dtype(),
            loaded.model.device(),
            longest,
            policy.keeps_tokens(),
            1,
        ),
    };
    super::common::check_memory(
        &loaded.model,
        longest * batch_size,
        policy.keeps_tokens(),
        batch_size,
        args.model.force,
        &format!("a batch of {batch_size} prompts of up to {longest} tokens"),
    )?;
    let (params, seed) = args.params(&loaded)?;
    let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    let mut ready: std::collections::BTreeMap<usize, serde_json::Value> = Default::default();
    let mut next_to_print = 0;
    let pb = crate::eval::common::progress_bar(prompts.len() as u64, false, "generate");
    for group in generation::length_groups(&lens, batch_size) {
        let rows: Vec<&[u32]> = group.iter().map(|&i| prompts[i].ids.as_slice()).collect();
        let outs = generation::generate_batch(
            &loaded.model,
            &rows,
            &params,
            policy.as_option(),
            loaded.eos_token_id(),
        )?;
        for (&i, out) in group.iter().zip(outs) {
            let mut v = serde_json::json!({
                "index": i,
                "prompt_tokens": out.prompt_len,
                "generated_tokens": out.tokens.len(),
                "text": loaded.decode_ids(&out.tokens)?,
                "tokens": out.tokens,
                "stopped_at_eos": out.stopped_at_eos,
                "seed": seed,
            });
            if let Some(id) = &prompts[i].id {
                v["id"] = id.clone();
            }
            ready.insert(i, v);
        }
        pb.inc(group.len() as u64);
        while let Some(v) = ready.remove(&next_to_print) {
            pb.suspend(|| output::println(&serde_json::to_string(&v)?))?;
            if output::stdout_closed() {
                return Ok(());
            }
            next_to_print += 1;
        }
    }
    pb.finish_and_clear();
    Ok(())
}
