//! RULER's synthetic generators, re-implemented draw for draw so a seed gives the prompts
//! NVIDIA/RULER's own scripts give (`scripts/data/synthetic/{niah, variable_tracking,
//! common_words_extraction, freq_words_extraction}.py`, run as `prepare.py` runs them with
//! the `base` model template).
//!
//! Each script seeds Python's global `random` (and numpy's) once, searches for the largest
//! haystack that fits the length with the tokenizer, then draws its samples one after the
//! other from the same stream: the search's draws, and every retry, change later samples,
//! so the control flow below follows the scripts step by step.

use super::pyrandom::{uuid4_string, NumpyRandomState, PyRandom};
use super::words::{common_words, key_words};
use super::{RulerSample, RulerTask};
use anyhow::{bail, Result};

/// Counts the model's tokens in a text (no special tokens), as RULER's `text_to_tokens`.
pub type TokenCounter<'a> = &'a (dyn Fn(&str) -> Result<usize> + Sync);

const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const NEEDLE: &str = "One of the special magic {type_needle_v} for {key} is: {value}.";
const UPPERCASE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWERCASE: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// `str.format` with named fields: `{name}` is replaced in one pass, `{{` and `}}` are
/// literal braces, and unknown fields are kept as written.
pub fn py_format(template: &str, fields: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('{') {
            if let Some(end) = tail.find('}') {
                let name = &tail[1..end];
                if let Some((_, v)) = fields.iter().find(|(k, _)| *k == name) {
                    out.push_str(v);
                    rest = &tail[end + 1..];
                    continue;
                }
            }
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

fn random_letters(rng: &mut PyRandom, alphabet: &[u8], k: usize) -> String {
    rng.choices(alphabet, k)
        .into_iter()
        .map(char::from)
        .collect()
}

/// The generator's state: Python's global `random` and numpy's global `RandomState`, both
/// seeded with the run's seed, as every RULER script does at import.
struct Streams {
    seed: u64,
    py: PyRandom,
    np: NumpyRandomState,
}

impl Streams {
    fn new(seed: u64) -> Self {
        Streams {
            seed,
            py: PyRandom::new(seed),
            np: NumpyRandomState::new(seed as u32),
        }
    }
    /// `random.Random(args.random_seed)`: a fresh generator the scripts use for shuffles.
    fn fresh(&self) -> PyRandom {
        PyRandom::new(self.seed)
    }
}

/// The token budget of vt's in-context example in RULER (`main()` of
/// variable_tracking.py).
pub const VT_EXAMPLE_TOKENS: usize = 500;

/// The samples of one task at one length, as RULER's scripts make them: `max_seq_length`
/// counts the prompt's tokens plus the tokens to generate.
pub fn generate(
    task: RulerTask,
    max_seq_length: usize,
    num_samples: usize,
    seed: u64,
    count: TokenCounter,
) -> Result<Vec<RulerSample>> {
    generate_with(
        task,
        max_seq_length,
        num_samples,
        seed,
        VT_EXAMPLE_TOKENS,
        count,
    )
}

/// [`generate`] with vt's in-context example built within `vt_example_tokens` instead of
/// RULER's 500 (a byte-level tokenizer needs about 840).
pub fn generate_with(
    task: RulerTask,
    max_seq_length: usize,
    num_samples: usize,
    seed: u64,
    vt_example_tokens: usize,
    count: TokenCounter,
) -> Result<Vec<RulerSample>> {
    let template = format!("{}{}", task.template(), task.answer_prefix());
    match task {
        RulerTask::NiahSingle1 | RulerTask::NiahMultikey2 | RulerTask::NiahMultikey3 => {
            Niah::new(task, template, seed).samples(num_samples, max_seq_length, count)
        }
        RulerTask::Vt => VariableTracking::new(template, seed, vt_example_tokens).samples(
            num_samples,
            max_seq_length,
            count,
        ),
        RulerTask::Cwe => {
            CommonWords::new(template, seed, max_seq_length).samples(num_samples, count)
        }
        RulerTask::Fwe => {
            FrequentWords::new(template, seed).samples(num_samples, max_seq_length, count)
        }
    }
}

/// `input_text` split where the answer prefix starts (its first 10 characters, searched
/// from the end), as every script does before writing a sample.
fn split_answer_prefix(task: RulerTask, text: &str) -> (String, String) {
    let marker: String = task.answer_prefix().chars().take(10).collect();
    match text.rfind(&marker) {
        Some(i) => (text[..i].to_string(), text[i..].to_string()),
        // Python's rfind gives -1 here: the input loses its last character.
        None => {
            let cut = text.char_indices().last().map(|(i, _)| i).unwrap_or(0);
            (text[..cut].to_string(), text[cut..].to_string())
        }
    }
}

/// RULER's search for the largest haystack size whose prompt fits: a trial at
/// `incremental` estimates tokens per unit, then a binary search between `incremental`
/// and three (or, for cwe, two) times the estimate. Every trial draws from the stream.
fn largest_fit(
    incremental: usize,
    upper_bound: usize,
    fits: &mut dyn FnMut(usize) -> Result<bool>,
) -> Result<usize> {
    let (mut lower, mut upper) = (incremental as i64, upper_bound as i64);
    let mut best = None;
    while lower <= upper {
        let mid = (lower + upper) / 2;
        if fits(mid as usize)? {
            best = Some(mid as usize);
            lower = mid + 1;
        } else {
            upper = mid - 1;
        }
    }
    Ok(best.unwrap_or(incremental))
}

/// The scripts' sample loop: retry with `incremental` fewer units until the prompt fits;
/// RULER loops forever once it cannot shrink, so that case is an error here.
fn fit_sample<T>(
    start: usize,
    incremental: usize,
    max_seq_length: usize,
    what: &str,
    attempt: &mut dyn FnMut(usize) -> Result<(T, usize)>,
) -> Result<(T, usize)> {
    let mut used = start;
    loop {
        match attempt(used) {
            Ok((sample, length)) if length <= max_seq_length => return Ok((sample, length)),
            Ok(_) | Err(_) if used > incremental => used -= incremental,
            Ok((_, length)) => bail!(
                "{what}: the smallest RULER prompt has {length} tokens, more than the length {max_seq_length}"
            ),
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// niah.py

#[derive(Clone, Copy, PartialEq)]
enum NeedleKind {
    Numbers,
    Words,
    Uuids,
}

impl NeedleKind {
    fn name(self) -> &'static str {
        match self {
            NeedleKind::Numbers => "numbers",
            NeedleKind::Words => "words",
            NeedleKind::Uuids => "uuids",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum NiahHaystack {
    Noise,
    Needle,
}

struct Niah {
    task: RulerTask,
    template: String,
    streams: Streams,
    haystack: NiahHaystack,
    key_kind: NeedleKind,
    value_kind: NeedleKind,
    /// `num_needle_k` (raised to `num_needle_q`), `num_needle_v`, `num_needle_q`.
    keys: usize,
    values: usize,
    queries: usize,
}

impl Niah {
    /// The task's arguments in RULER's `synthetic.yaml`.
    fn new(task: RulerTask, template: String, seed: u64) -> Self {
        let (haystack, key_kind, value_kind) = match task {
            RulerTask::NiahSingle1 => (NiahHaystack::Noise, NeedleKind::Words, NeedleKind::Numbers),
            RulerTask::NiahMultikey2 => {
                (NiahHaystack::Needle, NeedleKind::Words, NeedleKind::Numbers)
            }
            _ => (NiahHaystack::Needle, NeedleKind::Uuids, NeedleKind::Uuids),
        };
        let (keys, values, queries) = (1usize, 1usize, 1usize);
        Niah {
            task,
            template,
            streams: Streams::new(seed),
            haystack,
            key_kind,
            value_kind,
            keys: keys.max(queries),
            values,
            queries,
        }
    }

    /// `generate_random`.
    fn random(&mut self, kind: NeedleKind) -> String {
        let rng = &mut self.streams.py;
        match kind {
            NeedleKind::Numbers => rng.randint(1_000_000, 9_999_999).to_string(),
            NeedleKind::Words => {
                let keys = key_words();
                keys.get(rng.randbelow(keys.len() as u64) as usize)
            }
            NeedleKind::Uuids => uuid4_string(rng.getrandbits(128)),
        }
    }

    fn needle(&self, key: &str, value: &str) -> String {
        py_format(
            NEEDLE,
            &[
                ("type_needle_v", self.value_kind.name()),
                ("key", key),
                ("value", value),
            ],
        )
    }

    /// `generate_input_output(num_haystack)`: the prompt and its answers.
    fn input_output(&mut self, num_haystack: usize) -> Result<(String, Vec<String>)> {
        let mut keys = Vec::new();
        let mut values: Vec<Vec<String>> = Vec::new();
        let mut needles = Vec::new();
        for _ in 0..self.keys {
            keys.push(self.random(self.key_kind));
            let mut value = Vec::new();
            for _ in 0..self.values {
                value.push(self.random(self.value_kind));
                let needle = self.needle(keys.last().unwrap(), value.last().unwrap());
                needles.push(needle);
            }
            values.push(value);
        }
        self.streams.fresh().shuffle(&mut needles);

        let mut sentences: Vec<String> = match self.haystack {
            NiahHaystack::Noise => vec![NOISE.to_string(); num_haystack],
            NiahHaystack::Needle => (0..num_haystack)
                .map(|_| {
                    let key = self.random(self.key_kind);
                    let value = self.random(self.value_kind);
                    self.needle(&key, &value)
                })
                .collect(),
        };
        let mut indexes = self
            .streams
            .py
            .sample_indices(num_haystack, needles.len())?;
        indexes.sort_unstable_by(|a, b| b.cmp(a));
        for (index, needle) in indexes.into_iter().zip(needles) {
            sentences.insert(index, needle);
        }
        let context = sentences.join("\n");

        let picked = self.streams.py.sample_indices(self.keys, self.queries)?;
        let queries: Vec<&str> = picked.iter().map(|&i| keys[i].as_str()).collect();
        let answers: Vec<String> = picked.iter().flat_map(|&i| values[i].clone()).collect();
        let query = match queries.as_slice() {
            [one] => one.to_string(),
            [init @ .., last] => format!("{}, and {last}", init.join(", ")),
            [] => String::new(),
        };
        let mut template = self.template.clone();
        let mut type_needle_v = self.value_kind.name().to_string();
        if self.queries * self.values == 1 {
            // RULER's singular rewrite, applied to the whole template in this order.
            for (from, to) in [
                ("Some", "A"),
                ("are all", "is"),
                ("are", "is"),
                ("answers", "answer"),
            ] {
                template = template.replace(from, to);
            }
            type_needle_v.pop();
        }
        let input = py_format(
            &template,
            &[
                ("type_needle_v", &type_needle_v),
                ("context", &context),
                ("query", &query),
            ],
        );
        Ok((input, answers))
    }

    fn samples(
        mut self,
        num_samples: usize,
        max_seq_length: usize,
        count: TokenCounter,
    ) -> Result<Vec<RulerSample>> {
        let tokens_to_generate = self.task.tokens_to_generate();
        let incremental = if max_seq_length < 4096 { 5 } else { 25 };
        let (probe, _) = self.input_output(incremental)?;
        let per_unit = count(&probe)? as f64 / incremental as f64;
        let estimate = ((max_seq_length as f64 / per_unit) * 3.0) as usize;
        let best = largest_fit(incremental, estimate.max(incremental * 2), &mut |n| {
            let (text, _) = self.input_output(n)?;
            Ok(count(&text)? + tokens_to_generate <= max_seq_length)
        })?;
        let what = self.task.name();
        let mut out = Vec::with_capacity(num_samples);
        for index in 0..num_samples {
            let ((text, answers), length) =
                fit_sample(best, incremental, max_seq_length, what, &mut |n| {
                    let (text, answers) = self.input_output(n)?;
                    let length = count(&text)? + tokens_to_generate;
                    Ok(((text, answers), length))
                })?;
            let (input, answer_prefix) = split_answer_prefix(self.task, &text);
            out.push(RulerSample {
                index,
                input,
                answer_prefix,
                outputs: answers,
                length,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// variable_tracking.py (noise haystack, one chain of four hops, as `vt` in synthetic.yaml)

struct VariableTracking {
    template: String,
    streams: Streams,
    chains: usize,
    hops: usize,
    example_tokens: usize,
}

/// Variable names of one chain, or its assignment lines.
type Names = Vec<String>;

/// The in-context example the script builds first (500 tokens, three-letter names, value
/// 12345), then re-randomises for every sample.
struct IclExample {
    text: String,
    tokens: usize,
}

impl VariableTracking {
    fn new(template: String, seed: u64, example_tokens: usize) -> Self {
        VariableTracking {
            template,
            streams: Streams::new(seed),
            chains: 1,
            hops: 4,
            example_tokens,
        }
    }

    /// `generate_chains`: the variables of each chain and its assignments. Repeated names
    /// make the script draw extra names, and a short last chain is an IndexError there.
    fn chains(&mut self, is_icl: bool) -> Result<(Vec<Names>, Vec<Names>)> {
        let k = if is_icl { 3 } else { 5 };
        let hops = if is_icl { self.hops.min(10) } else { self.hops };
        let needed = (hops + 1) * self.chains;
        let rng = &mut self.streams.py;
        let mut names: Vec<String> = (0..needed)
            .map(|_| random_letters(rng, UPPERCASE, k))
            .collect();
        while names.iter().collect::<std::collections::HashSet<_>>().len() < needed {
            names.push(random_letters(rng, UPPERCASE, k));
        }
        let mut vars = Vec::new();
        let mut chains = Vec::new();
        for chunk in names.chunks(hops + 1) {
            let first_value = if is_icl {
                "12345".to_string()
            } else {
                self.streams.np.randint(10000, 99999).to_string()
            };
            // After the value's draw, as in the script, where this is an IndexError.
            if chunk.len() < hops + 1 {
                bail!("RULER's variable-tracking generator fails on a repeated variable name (IndexError in generate_chains)");
            }
            let mut chain = vec![format!("VAR {} = {first_value}", chunk[0])];
            for j in 0..hops {
                chain.push(format!("VAR {} = VAR {} ", chunk[j + 1], chunk[j]));
            }
            vars.push(chunk.to_vec());
            chains.push(chain);
        }
        Ok((vars, chains))
    }

    /// `generate_input_output` with the noise haystack.
    fn input_output(&mut self, num_noises: usize, is_icl: bool) -> Result<(String, Vec<String>)> {
        let (mut vars, chains) = self.chains(is_icl)?;
        let value = chains[0][0]
            .rsplit('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut sentences: Vec<String> = vec![NOISE.to_string(); num_noises];
        for chain in &chains {
            let mut positions = self
                .streams
                .py
                .sample_indices(sentences.len(), chain.len())?;
            positions.sort_unstable();
            for (j, (position, line)) in positions.into_iter().zip(chain).enumerate() {
                sentences.insert(position + j, line.clone());
            }
        }
        let context = sentences.join("\n").replace(". \n", ".\n");
        let hops = if is_icl { self.hops.min(10) } else { self.hops };
        let input = py_format(
            &self.template,
            &[
                ("context", &context),
                ("query", &value),
                ("num_v", &(hops + 1).to_string()),
            ],
        );
        Ok((input, vars.swap_remove(0)))
    }

    /// `randomize_icl`: new names for the example's answer variables and a new value.
    fn randomize_icl(&mut self, example: &str) -> String {
        let words: Vec<&str> = example.split_whitespace().collect();
        let targets: Vec<String> = words[words.len().saturating_sub(self.hops + 1)..]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut text = example.to_string();
        for item in targets {
            let new_item = random_letters(&mut self.streams.py, UPPERCASE, item.chars().count());
            text = text.replace(&item, &new_item);
        }
        let new_value = self.streams.np.randint(10000, 99999).to_string();
        text.replace("12345", &new_value)
    }

    /// `sys_vartrack_w_noise_random`, in its two uses: the in-context example (`icl` is
    /// `None`; no tokens to generate) and the samples (with the example in front).
    /// `requested_length` is the script's `args.max_seq_length`.
    fn pass(
        &mut self,
        num_samples: usize,
        max_seq_length: usize,
        icl: Option<&IclExample>,
        requested_length: usize,
        count: TokenCounter,
    ) -> Result<Vec<(String, Vec<String>, usize)>> {
        let incremental = match icl {
            Some(_) if requested_length < 4096 => 5,
            Some(_) => 10,
            None => 5,
        };
        let tokens_to_generate = if icl.is_some() {
            RulerTask::Vt.tokens_to_generate()
        } else {
            0
        };
        let is_icl = icl.is_none();
        let example_tokens = icl.map(|e| e.tokens).unwrap_or(0);
        let (probe, _) = self.input_output(incremental, is_icl)?;
        let per_unit = count(&probe)? as f64 / incremental as f64;
        let estimate = ((max_seq_length as f64 / per_unit) * 3.0) as usize;
        let best = largest_fit(incremental, estimate.max(incremental * 2), &mut |n| {
            let (text, _) = self.input_output(n, is_icl)?;
            Ok(count(&text)? + example_tokens + tokens_to_generate <= max_seq_length)
        })?;
        let cutoff_marker: String = RulerTask::Vt.template().chars().take(20).collect();
        let mut out = Vec::with_capacity(num_samples);
        for _ in 0..num_samples {
            let ((text, answer), length) =
                fit_sample(best, incremental, max_seq_length, "vt", &mut |n| {
                    let (mut text, answer) = self.input_output(n, is_icl)?;
                    if let Some(example) = icl {
                        let cut = text
                            .find(&cutoff_marker)
                            .ok_or_else(|| anyhow::anyhow!("the vt template lost its question"))?;
                        let randomized = self.randomize_icl(&example.text);
                        text = format!("{}{randomized}\n{}", &text[..cut], &text[cut..]);
                    }
                    let length = count(&text)? + tokens_to_generate;
                    Ok(((text, answer), length))
                })?;
            out.push((text, answer, length));
        }
        Ok(out)
    }

    /// `main()`: the in-context example (500 tokens in RULER), then the samples.
    fn samples(
        mut self,
        num_samples: usize,
        max_seq_length: usize,
        count: TokenCounter,
    ) -> Result<Vec<RulerSample>> {
        let (example_input, example_outputs, _) = self
            .pass(1, self.example_tokens, None, self.example_tokens, count)
            .map_err(|e| {
                anyhow::anyhow!(
                    "vt's in-context example does not fit {} tokens with this tokenizer ({e}); raise --vt-example-tokens (RULER uses 500)",
                    self.example_tokens
                )
            })?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("vt: no in-context example"))?;
        let text = format!("{example_input} {}\n", example_outputs.join(" "));
        let example = IclExample {
            tokens: count(&text)?,
            text,
        };
        let samples = self.pass(
            num_samples,
            max_seq_length,
            Some(&example),
            max_seq_length,
            count,
        )?;
        Ok(samples
            .into_iter()
            .enumerate()
            .map(|(index, (text, outputs, length))| {
                let (input, answer_prefix) = split_answer_prefix(RulerTask::Vt, &text);
                RulerSample {
                    index,
                    input,
                    answer_prefix,
                    outputs,
                    length,
                }
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------------
// common_words_extraction.py (freq_cw 30, freq_ucw 3, num_cw 10, one few-shot example)

struct CommonWords {
    template: String,
    streams: Streams,
    /// The script's `args.max_seq_length`: below 4096 it uses smaller examples.
    requested_length: usize,
    words: Vec<&'static str>,
    common_repeats: usize,
    uncommon_repeats: usize,
    common: usize,
    few_shots: usize,
}

impl CommonWords {
    fn new(template: String, seed: u64, requested_length: usize) -> Self {
        let mut words = common_words();
        PyRandom::new(seed).shuffle(&mut words);
        CommonWords {
            template,
            streams: Streams::new(seed),
            requested_length,
            words,
            common_repeats: 30,
            uncommon_repeats: 3,
            common: 10,
            few_shots: 1,
        }
    }

    /// `get_example`: a numbered list of `num_words` distinct words, the first `common`
    /// repeated `common_repeats` times and the rest `uncommon_repeats` times, shuffled.
    fn example(
        &mut self,
        num_words: usize,
        common_repeats: usize,
        uncommon_repeats: usize,
    ) -> Result<(String, Vec<String>)> {
        if num_words > self.words.len() {
            // RULER switches to its own `english_words.json` here, which is not shipped.
            bail!(
                "cwe needs {num_words} distinct words at this length, more than the {} words of the shipped list (RULER switches to its own english_words.json here)",
                self.words.len()
            );
        }
        let full = self.streams.py.sample(&self.words, num_words)?;
        let split = self.common.min(full.len());
        let (common, uncommon) = full.split_at(split);
        let mut list: Vec<&str> = Vec::new();
        for _ in 0..common_repeats {
            list.extend(common.iter().copied());
        }
        for _ in 0..uncommon_repeats {
            list.extend(uncommon.iter().copied());
        }
        self.streams.fresh().shuffle(&mut list);
        Ok((
            numbered(&list),
            common.iter().map(|w| w.to_string()).collect(),
        ))
    }

    /// `generate_input_output(num_words)`.
    fn input_output(&mut self, num_words: usize) -> Result<(String, Vec<String>)> {
        let mut shots = Vec::new();
        let (context, answer) = if self.requested_length < 4096 {
            for _ in 0..self.few_shots {
                shots.push(self.example(20, 3, 1)?);
            }
            self.example(num_words, 6, 1)?
        } else {
            for _ in 0..self.few_shots {
                shots.push(self.example(40, 10, 3)?);
            }
            self.example(num_words, self.common_repeats, self.uncommon_repeats)?
        };
        let num_cw = self.common.to_string();
        let shots: Vec<String> = shots
            .into_iter()
            .map(|(context, answer)| {
                let words: Vec<&str> = answer.iter().map(String::as_str).collect();
                format!(
                    "{} {}",
                    py_format(
                        &self.template,
                        &[("num_cw", &num_cw), ("context", &context), ("query", "")]
                    ),
                    numbered(&words)
                )
            })
            .collect();
        let input = py_format(
            &self.template,
            &[("num_cw", &num_cw), ("context", &context), ("query", "")],
        );
        Ok((format!("{}\n{input}", shots.join("\n")), answer))
    }

    /// `sys_word_pair_random`.
    fn samples(mut self, num_samples: usize, count: TokenCounter) -> Result<Vec<RulerSample>> {
        let max_seq_length = self.requested_length;
        let tokens_to_generate = RulerTask::Cwe.tokens_to_generate();
        let incremental = 10;
        let (probe, _) = self.input_output(4096)?;
        let per_word = count(&probe)? as f64 / 4096.0;
        // `int(max_seq_length // tokens_per_words) * 2`
        let estimate = (max_seq_length as f64 / per_word).floor() as usize * 2;
        let best = largest_fit(incremental, estimate.max(incremental * 2), &mut |n| {
            let (text, _) = self.input_output(n)?;
            Ok(count(&text)? + tokens_to_generate <= max_seq_length)
        })?;
        let mut out = Vec::with_capacity(num_samples);
        for index in 0..num_samples {
            let ((text, outputs), length) =
                fit_sample(best, incremental, max_seq_length, "cwe", &mut |n| {
                    let (text, answer) = self.input_output(n)?;
                    let length = count(&text)? + tokens_to_generate;
                    Ok(((text, answer), length))
                })?;
            let (input, answer_prefix) = split_answer_prefix(RulerTask::Cwe, &text);
            out.push(RulerSample {
                index,
                input,
                answer_prefix,
                outputs,
                length,
            });
        }
        Ok(out)
    }
}

/// `' '.join(f"{i + 1}. {word}" for i, word in enumerate(words))`.
fn numbered(words: &[&str]) -> String {
    let mut out = String::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&format!("{}. {w}", i + 1));
    }
    out
}

// ---------------------------------------------------------------------------------------
// freq_words_extraction.py (alpha 2.0, six-letter coded words, vocabulary length / 50)

struct FrequentWords {
    template: String,
    streams: Streams,
    alpha: f64,
    word_length: usize,
}

impl FrequentWords {
    fn new(template: String, seed: u64) -> Self {
        FrequentWords {
            template,
            streams: Streams::new(seed),
            alpha: 2.0,
            word_length: 6,
        }
    }

    /// `scipy.special.zeta(alpha)`. RULER's fwe uses alpha = 2, where zeta is pi^2/6.
    fn zeta(&self) -> f64 {
        std::f64::consts::PI * std::f64::consts::PI / 6.0
    }

    /// `gen_text(num_words)`: word k of the vocabulary repeated
    /// int(num_words * k^-alpha / zeta(alpha)) times, shuffled; the answer is words 2–4
    /// (word 1, the most frequent, is the noise `...`).
    fn text(&self, vocab: &[String], num_words: i64) -> (String, Vec<String>) {
        let zeta = self.zeta();
        let mut words: Vec<&str> = Vec::new();
        for (i, w) in vocab.iter().enumerate() {
            let k = (i + 1) as f64;
            let repeats = (num_words as f64 * k.powf(-self.alpha)) / zeta;
            // numpy's astype(int) truncates toward zero.
            let repeats = repeats.trunc().max(0.0) as usize;
            words.extend(std::iter::repeat_n(w.as_str(), repeats));
        }
        self.streams.fresh().shuffle(&mut words);
        let text = py_format(
            &self.template,
            &[("context", &words.join(" ")), ("query", "")],
        );
        (text, vocab.iter().skip(1).take(3).cloned().collect())
    }

    /// `generate_input_output`: a new coded vocabulary, then the word count that fits
    /// (`num_words` ≤ 0: grown from max_len / 6 in steps of `incremental` until the text
    /// reaches `max_len` tokens, then one step back; else shrunk until it fits).
    fn input_output(
        &mut self,
        max_len: usize,
        num_words: i64,
        vocab_size: usize,
        incremental: i64,
        count: TokenCounter,
    ) -> Result<(String, Vec<String>, i64)> {
        let rng = &mut self.streams.py;
        let mut vocab: Vec<String> = (0..vocab_size)
            .map(|_| random_letters(rng, LOWERCASE, self.word_length))
            .collect();
        while vocab.iter().collect::<std::collections::HashSet<_>>().len() < vocab_size {
            vocab.push(random_letters(rng, LOWERCASE, self.word_length));
        }
        vocab.sort_unstable();
        vocab.dedup();
        self.streams.fresh().shuffle(&mut vocab);
        if let Some(first) = vocab.first_mut() {
            *first = "...".to_string();
        }
        let mut n = num_words;
        if n > 0 {
            let (mut text, _) = self.text(&vocab, n);
            while count(&text)? > max_len {
                // At n ≤ 0 the context is empty and shrinking changes nothing (RULER would
                // loop forever).
                if n <= 0 {
                    bail!("fwe: even an empty context does not fit {max_len} tokens");
                }
                n -= incremental;
                text = self.text(&vocab, n).0;
            }
        } else {
            n = (max_len / self.word_length) as i64;
            let (mut text, _) = self.text(&vocab, n);
            while count(&text)? < max_len {
                n += incremental;
                text = self.text(&vocab, n).0;
            }
            n -= incremental;
        }
        let (text, answer) = self.text(&vocab, n);
        Ok((text, answer, n))
    }

    /// `sys_kwext`.
    fn samples(
        mut self,
        num_samples: usize,
        max_seq_length: usize,
        count: TokenCounter,
    ) -> Result<Vec<RulerSample>> {
        let tokens_to_generate = RulerTask::Fwe.tokens_to_generate();
        let Some(max_len) = max_seq_length.checked_sub(tokens_to_generate) else {
            bail!("fwe: the length {max_seq_length} leaves no room for {tokens_to_generate} tokens to generate");
        };
        let vocab_size = max_len / 50;
        if vocab_size < 4 {
            bail!(
                "fwe needs a length of at least {} tokens (a vocabulary of 4 coded words)",
                4 * 50 + tokens_to_generate
            );
        }
        let incremental = (max_len / 32) as i64;
        let (_, _, example_words) =
            self.input_output(max_len, -1, vocab_size, incremental, count)?;
        let mut out = Vec::with_capacity(num_samples);
        for index in 0..num_samples {
            let (text, outputs, _) =
                self.input_output(max_len, example_words, vocab_size, incremental, count)?;
            let length = count(&text)? + tokens_to_generate;
            let (input, answer_prefix) = split_answer_prefix(RulerTask::Fwe, &text);
            out.push(RulerSample {
                index,
                input,
                answer_prefix,
                outputs,
                length,
            });
        }
        Ok(out)
    }
}
