//! LongBench (v1) and LongBench-E: the official metrics, prompt and generation-length
//! tables, middle truncation and per-dataset aggregation, as pure functions.
//!
//! Everything here re-implements THUDM/LongBench (the v1 files, kept under
//! `LongBench/` in the current repository; identical to the root-level files of the
//! v1 releases): `metrics.py` (the metrics), `eval.py` (`dataset2metric`, the
//! first-line rule, `scorer` and the LongBench-E `scorer_e` buckets),
//! `config/dataset2prompt.json`, `config/dataset2maxlen.json` and `pred.py` (prompt
//! filling and middle truncation). It is checked against the independent Python
//! reference `scripts/longbench_reference.py`, which calls the official dependencies
//! (`rouge` 1.0.1, `fuzzywuzzy` 0.18.0 with and without `python-Levenshtein`), through
//! `tests/longbench_metrics.rs`.
//!
//! The data files are read by [`data`]; [`run`] runs the benchmark on the sweep runner and
//! [`report`] tallies its scores.
//!
//! Where the official code would raise instead of scoring (an answer of
//! `passage_retrieval_*` without a paragraph label, an empty list of predictions),
//! these functions return 0 or `None` and never panic.
//!
//! # Not implemented: the jieba metrics
//!
//! `qa_f1_zh_score` (multifieldqa_zh) and `rouge_zh_score` (dureader, vcsum) segment
//! text with Python `jieba.cut(text, cut_all=False)` (jieba 0.42.1, HMM on). The
//! Rust crate `jieba-rs` 0.11 does not reproduce it: it keeps `.`/`_`/`-`-joined
//! ASCII runs together in its HMM step where Python jieba splits them (`e-mail`,
//! `1.5.3`, `example.com`, `Rust-lang`), and it treats U+9FD6..U+9FFF and the CJK
//! extension blocks as Han where Python jieba does not. So [`Metric::QaF1Zh`] and
//! [`Metric::RougeZh`] are listed in [`Metric::for_dataset`] but scoring them returns
//! [`LongBenchError::Unimplemented`]. The other Chinese datasets (lsht,
//! passage_retrieval_zh) need no segmentation and are scored.
//!
//! # Python text semantics mirrored
//!
//! * `str.split()` splits on Unicode whitespace plus U+001C..U+001F ([`py_split`]).
//! * `str.lower()` is [`str::to_lowercase`] (both full case mapping, final sigma).
//! * `re`'s `\d` is Unicode `Nd` (the `regex` crate's `\d`).
//! * `re`'s `\b` (English article removal) uses word characters `isalnum() or '_'`;
//!   here [`char::is_alphanumeric`] or `_`. They differ only for the few non-letter
//!   alphabetic characters (combining vowel signs, circled letters) next to a lone
//!   `a`/`an`/`the`.
//! * `round(x)` is round-half-even ([`f64::round_ties_even`]); `round(x, 2)` rounds
//!   the exact binary value half-even ([`py_round`]).

pub mod data;
pub mod report;
pub mod run;

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

/// Errors of the table lookups and of scoring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LongBenchError {
    /// Not one of the 21 LongBench v1 datasets (nor one of them with `_e`).
    #[error("unknown LongBench dataset {0:?}")]
    UnknownDataset(String),
    /// A metric that needs Python jieba's segmentation (see the module docs).
    #[error("LongBench metric {0} needs jieba segmentation, which is not implemented")]
    Unimplemented(&'static str),
}

// ------------------------------------------------------------------ datasets

/// The 21 LongBench v1 datasets, in `pred.py`'s order.
pub const DATASETS: [&str; 21] = [
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
];

/// The 13 LongBench-E datasets (`pred.py --e`), loaded as `<name>_e` and scored with
/// the prompt, generation length and metric of `<name>`.
pub const LONGBENCH_E_DATASETS: [&str; 13] = [
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
];

/// Datasets whose prediction `eval.py` cuts to its first line before scoring
/// (`prediction.lstrip('\n').split('\n')[0]`): few-shot prompts that the model tends
/// to continue with the next example.
pub const FIRST_LINE_DATASETS: [&str; 4] = ["trec", "triviaqa", "samsum", "lsht"];

/// Datasets for which `pred.py` does not wrap the prompt in the model's chat
/// template (few-shot and code completion). Irrelevant for base Mamba models, which
/// have none; kept for reference.
pub const NO_CHAT_TEMPLATE_DATASETS: [&str; 6] =
    ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"];

/// `pred.py` also stops samsum generation at a newline token (EOS or `"\n"`), besides
/// asking for at least one new token, to stop endless `"\nDialogue"` repetition.
pub const NEWLINE_STOP_DATASETS: [&str; 1] = ["samsum"];

/// `name` without a LongBench-E `_e` suffix, when what is left is a v1 dataset;
/// otherwise `name` unchanged.
pub fn base_dataset(name: &str) -> &str {
    match name.strip_suffix("_e") {
        Some(base) if DATASETS.contains(&base) => base,
        _ => name,
    }
}

fn known(dataset: &str) -> Result<&str, LongBenchError> {
    let base = base_dataset(dataset);
    if DATASETS.contains(&base) {
        Ok(base)
    } else {
        Err(LongBenchError::UnknownDataset(dataset.to_string()))
    }
}

/// Whether `eval.py` scores only the first line of this dataset's predictions.
pub fn first_line_only(dataset: &str) -> bool {
    FIRST_LINE_DATASETS.contains(&base_dataset(dataset))
}

// ------------------------------------------------------------------ prompts

/// `(dataset, max new tokens, prompt template)`: `config/dataset2maxlen.json` and
/// `config/dataset2prompt.json` of LongBench v1, verbatim (including their typos).
/// Templates are Python format strings with the fields `{context}` and `{input}`.
static TABLE: [(&str, usize, &str); 21] = [
    ("narrativeqa", 128, "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    ("qasper", 128, "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    ("multifieldqa_en", 64, "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    ("multifieldqa_zh", 64, "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："),
    ("hotpotqa", 32, "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    ("2wikimqa", 32, "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    ("musique", 32, "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    ("dureader", 128, "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    ("gov_report", 512, "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    ("qmsum", 512, "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    ("multi_news", 512, "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    ("vcsum", 512, "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："),
    ("trec", 64, "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"),
    ("triviaqa", 32, "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}"),
    ("samsum", 128, "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"),
    ("lsht", 64, "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    ("passage_count", 32, "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    ("passage_retrieval_en", 32, "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "),
    ("passage_retrieval_zh", 32, "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    ("lcc", 64, "Please complete the code given below. \n{context}Next line of code:\n"),
    ("repobench-p", 64, "Please complete the code given below. \n{context}{input}Next line of code:\n"),
];

fn table_row(
    dataset: &str,
) -> Result<&'static (&'static str, usize, &'static str), LongBenchError> {
    let base = known(dataset)?;
    TABLE
        .iter()
        .find(|row| row.0 == base)
        .ok_or_else(|| LongBenchError::UnknownDataset(dataset.to_string()))
}

/// The prompt template of a dataset (`config/dataset2prompt.json`; `_e` variants use
/// their base dataset's, as `pred.py --e` does).
pub fn prompt_template(dataset: &str) -> Result<&'static str, LongBenchError> {
    table_row(dataset).map(|row| row.2)
}

/// The generation budget in new tokens (`config/dataset2maxlen.json`).
pub fn max_new_tokens(dataset: &str) -> Result<usize, LongBenchError> {
    table_row(dataset).map(|row| row.1)
}

/// Fills a template as Python's `template.format(context=..., input=...)` does for
/// these templates: one left-to-right pass, so braces inside `context` or `input`
/// are never read as fields. `{{`/`}}` give literal braces; any other `{...}` is
/// kept as written (no LongBench template has one).
pub fn fill_template(template: &str, context: &str, input: &str) -> String {
    let mut out = String::with_capacity(template.len() + context.len() + input.len());
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let (piece, skip) = if tail.starts_with("{{") {
            ("{", 2)
        } else if tail.starts_with("}}") {
            ("}", 2)
        } else if tail.starts_with("{context}") {
            (context, "{context}".len())
        } else if tail.starts_with("{input}") {
            (input, "{input}".len())
        } else {
            (&tail[..1], 1)
        };
        out.push_str(piece);
        rest = &tail[skip..];
    }
    out.push_str(rest);
    out
}

/// The prompt `pred.py` builds for one sample of `dataset`, before truncation.
pub fn build_prompt(dataset: &str, context: &str, input: &str) -> Result<String, LongBenchError> {
    Ok(fill_template(prompt_template(dataset)?, context, input))
}

/// Middle truncation of `pred.py`: when a prompt has more than `max_len` tokens, keep
/// its first `half` and its last `half` tokens, `half = int(max_len / 2)` (so an odd
/// `max_len` keeps `max_len - 1` tokens). With `max_len` 0 or 1, `half` is 0 and
/// Python's `ids[-0:]` is the whole list, so nothing is dropped; that is mirrored.
///
/// `pred.py` truncates the *text*: it decodes the two halves with
/// `skip_special_tokens=True`, concatenates the strings and tokenizes the result
/// again (adding BOS and possibly merging tokens at the seam). Here the ids are
/// truncated directly, which avoids that round trip; re-encoding is the caller's
/// choice.
pub fn truncate_middle(ids: &[u32], max_len: usize) -> Vec<u32> {
    if ids.len() <= max_len {
        return ids.to_vec();
    }
    let half = max_len / 2;
    if half == 0 {
        return ids.to_vec();
    }
    let mut out = Vec::with_capacity(2 * half);
    out.extend_from_slice(&ids[..half]);
    out.extend_from_slice(&ids[ids.len() - half..]);
    out
}

// ------------------------------------------------------------------ Python helpers

/// Python's `str.isspace()`: Unicode White_Space plus the separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.split()` (no argument): runs of whitespace separate, none empty.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|t| !t.is_empty())
}

/// Python's `round(x, ndigits)`: the exact binary value rounded half-even at
/// `ndigits` decimals (Rust's fixed-precision formatting is exact and half-even too).
pub fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

fn digit_runs() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\d+").expect("valid regex"))
}

fn en_label() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"Paragraph (\d+)").expect("valid regex"))
}

fn zh_label() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"段落(\d+)").expect("valid regex"))
}

/// `prediction.lstrip('\n').split('\n')[0]` of `eval.py`.
pub fn first_line(prediction: &str) -> &str {
    let s = prediction.trim_start_matches('\n');
    s.split('\n').next().unwrap_or("")
}

// ------------------------------------------------------------------ qa_f1

fn is_py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.sub(r"\b(a|an|the)\b", " ", text)`: each standalone `a`, `an` or `the` becomes
/// a space (leftmost match first, alternatives tried in that order).
fn remove_articles(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_py_word(chars[i - 1]);
        let mut matched = 0;
        if starts_word {
            for art in ["a", "an", "the"] {
                let n = art.len();
                let fits = i + n <= chars.len() && chars[i..i + n].iter().copied().eq(art.chars());
                if fits && (i + n == chars.len() || !is_py_word(chars[i + n])) {
                    matched = n;
                    break;
                }
            }
        }
        if matched > 0 {
            out.push(' ');
            i += matched;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// `normalize_answer` of `metrics.py`: lowercase, drop ASCII punctuation
/// (`string.punctuation`), turn the articles a/an/the into spaces, then join the
/// whitespace-separated words with single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_articles = remove_articles(&no_punc);
    py_split(&no_articles).collect::<Vec<_>>().join(" ")
}

/// `f1_score` of `metrics.py` on two token lists: bag-of-tokens overlap (multiset
/// intersection), `2 p r / (p + r)`; 0 when nothing is shared (also for empty lists).
pub fn token_f1<S: AsRef<str>>(prediction: &[S], ground_truth: &[S]) -> f64 {
    let mut gt_counts: HashMap<&str, usize> = HashMap::new();
    for t in ground_truth {
        *gt_counts.entry(t.as_ref()).or_default() += 1;
    }
    let mut pred_counts: HashMap<&str, usize> = HashMap::new();
    for t in prediction {
        *pred_counts.entry(t.as_ref()).or_default() += 1;
    }
    let same: usize = pred_counts
        .iter()
        .map(|(t, &n)| n.min(gt_counts.get(t).copied().unwrap_or(0)))
        .sum();
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / prediction.len() as f64;
    let recall = same as f64 / ground_truth.len() as f64;
    (2.0 * precision * recall) / (precision + recall)
}

/// `qa_f1_score` of `metrics.py`: [`token_f1`] of the [`normalize_answer`] words.
pub fn qa_f1_score(prediction: &str, ground_truth: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(ground_truth);
    let pt: Vec<&str> = py_split(&p).collect();
    let gt: Vec<&str> = py_split(&g).collect();
    token_f1(&pt, &gt)
}

// ------------------------------------------------------------------ rouge-L

/// How many steps the `rouge` package's recursive LCS traceback (`_recon` in
/// `rouge/rouge_score.py`, one Python frame per step plus one for the base case) can
/// take before `python eval.py` hits Python's default recursion limit of 1000: 9
/// frames are already on the stack (`<module>`, `scorer`, `rouge_score`,
/// `Rouge.get_scores`, `_get_avg_scores`, the metric lambda, `rouge_l_summary_level`,
/// `_union_lcs`, `_recon_lcs`), leaving 991 `_recon` frames. A longer traceback raises
/// `RecursionError`, which LongBench's `rouge_score` turns into a score of 0. Measured
/// with `python eval.py` (Python 3.11.7; `python -m` or another caller shifts it).
pub const ROUGE_MAX_TRACEBACK_STEPS: usize = 990;

/// The `rouge` package's preprocessing: split at ASCII `.`, drop empty pieces, then
/// collapse each piece's whitespace; a piece that was only whitespace is the single
/// word `""` (`"".split(" ")` is `[""]`).
fn rouge_sentences(text: &str) -> Vec<Vec<&str>> {
    text.split('.')
        .filter(|seg| !seg.is_empty())
        .map(|seg| {
            let words: Vec<&str> = py_split(seg).collect();
            if words.is_empty() {
                vec![""]
            } else {
                words
            }
        })
        .collect()
}

/// The words of the LCS of `x` (reference sentence) and `y` (hypothesis sentence)
/// that `rouge`'s traceback picks, or `None` when that traceback would exceed
/// [`ROUGE_MAX_TRACEBACK_STEPS`].
fn lcs_words<'a>(x: &[&'a str], y: &[&'a str], out: &mut HashSet<&'a str>) -> Option<()> {
    let (n, m) = (x.len(), y.len());
    // Every step lowers i or j by at most one and the walk stops at i == 0 or j == 0,
    // so it takes at least min(n, m) steps.
    if n.min(m) > ROUGE_MAX_TRACEBACK_STEPS {
        return None;
    }
    let w = m + 1;
    let mut table = vec![0u32; (n + 1) * w];
    for i in 1..=n {
        for j in 1..=m {
            table[i * w + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * w + j - 1] + 1
            } else {
                table[(i - 1) * w + j].max(table[i * w + j - 1])
            };
        }
    }
    let (mut i, mut j, mut steps) = (n, m, 0usize);
    let mut picked = Vec::new();
    while i > 0 && j > 0 {
        steps += 1;
        if steps > ROUGE_MAX_TRACEBACK_STEPS {
            return None;
        }
        if x[i - 1] == y[j - 1] {
            picked.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * w + j] > table[i * w + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    out.extend(picked);
    Some(())
}

/// `rouge_score` of `metrics.py`: the ROUGE-L F of the `rouge` package (1.0.1,
/// `Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]`),
/// with LongBench's "any exception is 0".
///
/// The package's summary-level ROUGE-L works on sets: `m` and `n` are the numbers of
/// *distinct* words of the reference and of the hypothesis, and the overlap is the
/// number of distinct words in the union, over all (reference sentence, hypothesis
/// sentence) pairs, of the LCS its traceback picks; `F = 2 (p r) / (p + r + 1e-8)`
/// with `p = overlap / n`, `r = overlap / m`. It is 0 when either text has no
/// sentence (empty, or only `.`), and when a traceback is too deep for Python (see
/// [`ROUGE_MAX_TRACEBACK_STEPS`]).
pub fn rouge_score(prediction: &str, ground_truth: &str) -> f64 {
    let hyp = rouge_sentences(prediction);
    let refs = rouge_sentences(ground_truth);
    if hyp.is_empty() || refs.is_empty() {
        return 0.0;
    }
    let distinct = |sents: &[Vec<&str>]| {
        sents
            .iter()
            .flatten()
            .copied()
            .collect::<HashSet<&str>>()
            .len()
    };
    let m = distinct(&refs);
    let n = distinct(&hyp);
    let mut union = HashSet::new();
    for r in &refs {
        for h in &hyp {
            if lcs_words(r, h, &mut union).is_none() {
                return 0.0;
            }
        }
    }
    let llcs = union.len() as f64;
    let r_lcs = llcs / m as f64;
    let p_lcs = llcs / n as f64;
    2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))
}

// ------------------------------------------------------------------ small metrics

fn share_equal<'a>(numbers: impl Iterator<Item = &'a str>, target: &str) -> f64 {
    let (mut total, mut right) = (0usize, 0usize);
    for n in numbers {
        total += 1;
        right += usize::from(n == target);
    }
    if total == 0 {
        0.0
    } else {
        right as f64 / total as f64
    }
}

/// `count_score` of `metrics.py` (passage_count): the share of the digit runs of the
/// prediction that equal the answer string.
pub fn count_score(prediction: &str, ground_truth: &str) -> f64 {
    share_equal(
        digit_runs().find_iter(prediction).map(|m| m.as_str()),
        ground_truth,
    )
}

fn labelled_retrieval(prediction: &str, ground_truth: &str, label: &Regex) -> f64 {
    // metrics.py takes `matches[0]` and raises IndexError when the answer has no label.
    let Some(id) = label.captures(ground_truth).and_then(|c| c.get(1)) else {
        return 0.0;
    };
    share_equal(
        digit_runs().find_iter(prediction).map(|m| m.as_str()),
        id.as_str(),
    )
}

/// `retrieval_score` of `metrics.py` (passage_retrieval_en): the number in the
/// answer's first `Paragraph N`, then the share of the prediction's digit runs equal
/// to it. An answer without a label scores 0 (the official code raises).
pub fn retrieval_score(prediction: &str, ground_truth: &str) -> f64 {
    labelled_retrieval(prediction, ground_truth, en_label())
}

/// `retrieval_zh_score` of `metrics.py` (passage_retrieval_zh): as
/// [`retrieval_score`] with the label `段落N`.
pub fn retrieval_zh_score(prediction: &str, ground_truth: &str) -> f64 {
    labelled_retrieval(prediction, ground_truth, zh_label())
}

/// `classification_score` of `metrics.py` (trec, lsht): the classes that occur in
/// the prediction (substring), minus those that occur inside the answer without
/// being it; `1 / count` when the answer remains, else 0.
///
/// The official loop removes from the list it iterates over, so the entry right
/// after each removed one is skipped (never considered for removal); that is
/// reproduced.
pub fn classification_score<S: AsRef<str>>(
    prediction: &str,
    ground_truth: &str,
    all_classes: &[S],
) -> f64 {
    let mut hits: Vec<&str> = all_classes
        .iter()
        .map(|c| c.as_ref())
        .filter(|c| prediction.contains(c))
        .collect();
    let mut k = 0;
    while k < hits.len() {
        let term = hits[k];
        if ground_truth.contains(term) && term != ground_truth {
            // list.remove drops the first equal entry.
            if let Some(first) = hits.iter().position(|&h| h == term) {
                hits.remove(first);
            }
        }
        k += 1;
    }
    if hits.contains(&ground_truth) {
        1.0 / hits.len() as f64
    } else {
        0.0
    }
}

// ------------------------------------------------------------------ code similarity

/// Which `SequenceMatcher` fuzzywuzzy 0.18.0 uses for `fuzz.ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum FuzzBackend {
    /// With `python-Levenshtein` installed: `Levenshtein.ratio`, the Indel
    /// (insert/delete) normalized similarity `1 - dist / (len1 + len2)`.
    #[default]
    Levenshtein,
    /// Without it (what LongBench's `requirements.txt` alone installs):
    /// `difflib.SequenceMatcher(None, s1, s2).ratio()`, Ratcliff/Obershelp matching
    /// blocks with difflib's "autojunk" for a second string of 200+ characters.
    Difflib,
}

/// Indel distance `len1 + len2 - 2 LCS` on characters.
fn indel_distance(a: &[char], b: &[char]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for &ca in a {
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = if ca == cb {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    a.len() + b.len() - 2 * prev[b.len()]
}

/// `difflib.SequenceMatcher.find_longest_match` with no junk function: the longest
/// block, earliest in `a`, then earliest in `b`, among the indices `b2j` still holds,
/// then extended over equal neighbours (popular characters included).
fn longest_match(
    a: &[char],
    b: &[char],
    b2j: &HashMap<char, Vec<usize>>,
    (alo, ahi, blo, bhi): (usize, usize, usize, usize),
) -> (usize, usize, usize) {
    let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
    let mut j2len: HashMap<usize, usize> = HashMap::new();
    for (i, ca) in a.iter().enumerate().take(ahi).skip(alo) {
        let mut next: HashMap<usize, usize> = HashMap::new();
        if let Some(js) = b2j.get(ca) {
            for &j in js {
                if j < blo {
                    continue;
                }
                if j >= bhi {
                    break;
                }
                let k = if j == 0 {
                    0
                } else {
                    j2len.get(&(j - 1)).copied().unwrap_or(0)
                } + 1;
                next.insert(j, k);
                if k > bestsize {
                    (besti, bestj, bestsize) = (i + 1 - k, j + 1 - k, k);
                }
            }
        }
        j2len = next;
    }
    while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
        besti -= 1;
        bestj -= 1;
        bestsize += 1;
    }
    while besti + bestsize < ahi
        && bestj + bestsize < bhi
        && a[besti + bestsize] == b[bestj + bestsize]
    {
        bestsize += 1;
    }
    (besti, bestj, bestsize)
}

/// Total size of difflib's matching blocks of `a` and `b`.
fn difflib_matches(a: &[char], b: &[char]) -> usize {
    let mut b2j: HashMap<char, Vec<usize>> = HashMap::new();
    for (j, &c) in b.iter().enumerate() {
        b2j.entry(c).or_default().push(j);
    }
    if b.len() >= 200 {
        let ntest = b.len() / 100 + 1;
        b2j.retain(|_, idx| idx.len() <= ntest);
    }
    let mut queue = vec![(0, a.len(), 0, b.len())];
    let mut matches = 0;
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let (i, j, k) = longest_match(a, b, &b2j, (alo, ahi, blo, bhi));
        if k > 0 {
            matches += k;
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    matches
}

/// fuzzywuzzy 0.18.0 `fuzz.ratio(s1, s2)`: 100 when the strings are equal (even both
/// empty), 0 when one is empty, else `round(100 * ratio)` half-even, on characters
/// (code points).
pub fn fuzz_ratio(s1: &str, s2: &str, backend: FuzzBackend) -> u32 {
    if s1 == s2 {
        return 100;
    }
    if s1.is_empty() || s2.is_empty() {
        return 0;
    }
    let a: Vec<char> = s1.chars().collect();
    let b: Vec<char> = s2.chars().collect();
    let total = (a.len() + b.len()) as f64;
    let ratio = match backend {
        FuzzBackend::Levenshtein => 1.0 - indel_distance(&a, &b) as f64 / total,
        FuzzBackend::Difflib => 2.0 * difflib_matches(&a, &b) as f64 / total,
    };
    (100.0 * ratio).round_ties_even() as u32
}

/// The line `code_sim_score` compares: after stripping leading newlines, the first
/// line containing none of `` ` ``, `#`, `//`; empty when there is none.
pub fn first_code_line(prediction: &str) -> &str {
    prediction
        .trim_start_matches('\n')
        .split('\n')
        .find(|line| !line.contains('`') && !line.contains('#') && !line.contains("//"))
        .unwrap_or("")
}

/// `code_sim_score` of `metrics.py` (lcc, repobench-p): `fuzz.ratio` of
/// [`first_code_line`] and the answer, divided by 100, with the python-Levenshtein
/// backend.
pub fn code_sim_score(prediction: &str, ground_truth: &str) -> f64 {
    code_sim_score_with(prediction, ground_truth, FuzzBackend::Levenshtein)
}

/// [`code_sim_score`] with a chosen fuzzywuzzy backend.
pub fn code_sim_score_with(prediction: &str, ground_truth: &str, backend: FuzzBackend) -> f64 {
    fuzz_ratio(first_code_line(prediction), ground_truth, backend) as f64 / 100.0
}

// ------------------------------------------------------------------ dataset scoring

/// The metrics of `metrics.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Metric {
    /// `qa_f1_score`.
    QaF1,
    /// `qa_f1_zh_score` (jieba; not implemented).
    QaF1Zh,
    /// `rouge_score`.
    Rouge,
    /// `rouge_zh_score` (jieba; not implemented).
    RougeZh,
    /// `classification_score`.
    Classification,
    /// `retrieval_score`.
    Retrieval,
    /// `retrieval_zh_score`.
    RetrievalZh,
    /// `count_score`.
    Count,
    /// `code_sim_score`.
    CodeSim,
}

impl Metric {
    /// `dataset2metric` of `eval.py` (an `_e` name uses its base dataset's metric).
    pub fn for_dataset(dataset: &str) -> Result<Metric, LongBenchError> {
        Ok(match known(dataset)? {
            "narrativeqa" | "qasper" | "multifieldqa_en" | "hotpotqa" | "2wikimqa" | "musique"
            | "triviaqa" => Metric::QaF1,
            "multifieldqa_zh" => Metric::QaF1Zh,
            "dureader" | "vcsum" => Metric::RougeZh,
            "gov_report" | "qmsum" | "multi_news" | "samsum" => Metric::Rouge,
            "trec" | "lsht" => Metric::Classification,
            "passage_retrieval_en" => Metric::Retrieval,
            "passage_retrieval_zh" => Metric::RetrievalZh,
            "passage_count" => Metric::Count,
            "lcc" | "repobench-p" => Metric::CodeSim,
            other => return Err(LongBenchError::UnknownDataset(other.to_string())),
        })
    }

    /// The function's name in `metrics.py`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::QaF1 => "qa_f1_score",
            Metric::QaF1Zh => "qa_f1_zh_score",
            Metric::Rouge => "rouge_score",
            Metric::RougeZh => "rouge_zh_score",
            Metric::Classification => "classification_score",
            Metric::Retrieval => "retrieval_score",
            Metric::RetrievalZh => "retrieval_zh_score",
            Metric::Count => "count_score",
            Metric::CodeSim => "code_sim_score",
        }
    }

    /// Whether this crate can compute the metric (all but the two jieba ones).
    pub fn is_implemented(self) -> bool {
        !matches!(self, Metric::QaF1Zh | Metric::RougeZh)
    }

    /// The metric of one prediction against one answer, in [0, 1].
    pub fn score<S: AsRef<str>>(
        self,
        prediction: &str,
        ground_truth: &str,
        all_classes: &[S],
        backend: FuzzBackend,
    ) -> Result<f64, LongBenchError> {
        Ok(match self {
            Metric::QaF1 => qa_f1_score(prediction, ground_truth),
            Metric::Rouge => rouge_score(prediction, ground_truth),
            Metric::Classification => classification_score(prediction, ground_truth, all_classes),
            Metric::Retrieval => retrieval_score(prediction, ground_truth),
            Metric::RetrievalZh => retrieval_zh_score(prediction, ground_truth),
            Metric::Count => count_score(prediction, ground_truth),
            Metric::CodeSim => code_sim_score_with(prediction, ground_truth, backend),
            Metric::QaF1Zh | Metric::RougeZh => {
                return Err(LongBenchError::Unimplemented(self.name()))
            }
        })
    }
}

/// The score of one prediction as `eval.py` computes it: the first-line cut for
/// trec/triviaqa/samsum/lsht, then the maximum of the dataset's metric over the
/// answers, starting from 0 (so no answers give 0). `all_classes` matters only for
/// classification.
pub fn score_prediction<A: AsRef<str>, C: AsRef<str>>(
    dataset: &str,
    prediction: &str,
    answers: &[A],
    all_classes: &[C],
) -> Result<f64, LongBenchError> {
    score_prediction_with(
        dataset,
        prediction,
        answers,
        all_classes,
        FuzzBackend::Levenshtein,
    )
}

/// [`score_prediction`] with a chosen fuzzywuzzy backend for the code datasets.
pub fn score_prediction_with<A: AsRef<str>, C: AsRef<str>>(
    dataset: &str,
    prediction: &str,
    answers: &[A],
    all_classes: &[C],
    backend: FuzzBackend,
) -> Result<f64, LongBenchError> {
    let metric = Metric::for_dataset(dataset)?;
    if !metric.is_implemented() {
        return Err(LongBenchError::Unimplemented(metric.name()));
    }
    let prediction = if first_line_only(dataset) {
        first_line(prediction)
    } else {
        prediction
    };
    let mut best = 0.0f64;
    for gt in answers {
        let s = metric.score(prediction, gt.as_ref(), all_classes, backend)?;
        if s > best {
            best = s;
        }
    }
    Ok(best)
}

/// One scored sample: the model's output, the answers and the LongBench `length`
/// field (words for English, characters for Chinese; used by LongBench-E only).
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The generated text.
    pub prediction: &'a str,
    /// The reference answers.
    pub answers: &'a [String],
    /// The sample's `length` field.
    pub length: usize,
}

/// `eval.py`'s per-dataset result from per-sample scores: a running sum, then
/// `round(100 * total / n, 2)`; `None` for no samples (the official code divides by
/// zero).
pub fn mean_score(scores: &[f64]) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    for &s in scores {
        total += s;
    }
    Some(py_round(100.0 * total / scores.len() as f64, 2))
}

/// numpy's float64 pairwise summation (`np.add.reduce` on a contiguous 1-D array):
/// plain below 8 values, 8 interleaved partial sums up to 128, halves (a multiple of 8
/// first) above.
fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

/// `np.mean` of float64 values (pairwise sum / n); NaN for none, as numpy gives.
pub fn numpy_mean(scores: &[f64]) -> f64 {
    numpy_pairwise_sum(scores) / scores.len() as f64
}

/// One LongBench-E bucket's result as `scorer_e` computes it:
/// `round(100 * np.mean(scores), 2)`; `None` for an empty bucket (where `eval.py`
/// writes NaN).
pub fn mean_score_e(scores: &[f64]) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    Some(py_round(100.0 * numpy_mean(scores), 2))
}

/// The LongBench-E length buckets of `scorer_e`, by the sample's `length` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthBucket {
    /// `length < 4000`.
    Upto4k,
    /// `4000 <= length < 8000`.
    From4kTo8k,
    /// `length >= 8000`.
    Over8k,
}

impl LengthBucket {
    /// The bucket of a `length`.
    pub fn of(length: usize) -> LengthBucket {
        if length < 4000 {
            LengthBucket::Upto4k
        } else if length < 8000 {
            LengthBucket::From4kTo8k
        } else {
            LengthBucket::Over8k
        }
    }

    /// The key `eval.py` writes: `"0-4k"`, `"4-8k"` or `"8k+"`.
    pub fn label(self) -> &'static str {
        match self {
            LengthBucket::Upto4k => "0-4k",
            LengthBucket::From4kTo8k => "4-8k",
            LengthBucket::Over8k => "8k+",
        }
    }
}

/// A LongBench-E dataset result (`None`: no sample in that bucket).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BucketScores {
    /// Samples with `length < 4000`.
    #[serde(rename = "0-4k")]
    pub upto_4k: Option<f64>,
    /// Samples with `4000 <= length < 8000`.
    #[serde(rename = "4-8k")]
    pub from_4k_to_8k: Option<f64>,
    /// Samples with `length >= 8000`.
    #[serde(rename = "8k+")]
    pub over_8k: Option<f64>,
}

/// `eval.py`'s `scorer`: the dataset score (0-100, 2 decimals) of its samples;
/// `Ok(None)` for no samples. `all_classes` is the dataset's class list (eval.py
/// reads it from the file's records; it is the same in every record).
pub fn score_dataset<C: AsRef<str>>(
    dataset: &str,
    samples: &[Sample<'_>],
    all_classes: &[C],
    backend: FuzzBackend,
) -> Result<Option<f64>, LongBenchError> {
    let scores = samples
        .iter()
        .map(|s| score_prediction_with(dataset, s.prediction, s.answers, all_classes, backend))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(mean_score(&scores))
}

/// `eval.py --e`'s `scorer_e`: the dataset score per length bucket.
pub fn score_dataset_e<C: AsRef<str>>(
    dataset: &str,
    samples: &[Sample<'_>],
    all_classes: &[C],
    backend: FuzzBackend,
) -> Result<BucketScores, LongBenchError> {
    let mut buckets: [Vec<f64>; 3] = Default::default();
    for s in samples {
        let v = score_prediction_with(dataset, s.prediction, s.answers, all_classes, backend)?;
        let k = match LengthBucket::of(s.length) {
            LengthBucket::Upto4k => 0,
            LengthBucket::From4kTo8k => 1,
            LengthBucket::Over8k => 2,
        };
        buckets[k].push(v);
    }
    Ok(BucketScores {
        upto_4k: mean_score_e(&buckets[0]),
        from_4k_to_8k: mean_score_e(&buckets[1]),
        over_8k: mean_score_e(&buckets[2]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO: [&str; 0] = [];

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn f1_hand_cases() {
        // "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]
        // p = 1, r = 2/3, F1 = 0.8.
        assert!(close(qa_f1_score("the cat sat", "a cat sat down"), 0.8));
        assert_eq!(qa_f1_score("", "anything"), 0.0);
        assert_eq!(qa_f1_score("anything", ""), 0.0);
        assert_eq!(qa_f1_score("", ""), 0.0);
        assert_eq!(qa_f1_score("!!! ...", "!!!"), 0.0);
        assert_eq!(qa_f1_score("the a an", "The"), 0.0);
        assert_eq!(qa_f1_score("Paris.", "paris"), 1.0);
        // Repeated tokens count as a multiset: [cat x3] vs [cat]: p = 1/3, r = 1.
        assert!(close(qa_f1_score("cat cat cat", "cat"), 0.5));
    }

    #[test]
    fn normalization() {
        assert_eq!(
            normalize_answer("  The Theatre of an Absurd, a play! "),
            "theatre of absurd play"
        );
        assert_eq!(normalize_answer("an-apple"), "anapple");
        assert_eq!(normalize_answer("the_cat"), "thecat");
        assert_eq!(normalize_answer("the2 a1 théa"), "the2 a1 théa");
        assert_eq!(normalize_answer("a\u{1c}b"), "b");
        assert_eq!(normalize_answer(""), "");
    }

    #[test]
    fn rouge_hand_cases() {
        // Identical: overlap 5 distinct words of 5 -> F = 2 * 1 / (2 + 1e-8).
        let f = rouge_score("the cat sat on the mat", "the cat sat on the mat");
        assert!(close(f, 2.0 / (2.0 + 1e-8)));
        // "police killed the gunman" vs "police kill the gunman": LCS 3 of 4 each.
        let f = rouge_score("police killed the gunman", "police kill the gunman");
        let p = 0.75f64;
        assert!(close(f, 2.0 * (p * p / (p + p + 1e-8))));
        // No sentence on either side -> 0 (the package raises, LongBench returns 0).
        assert_eq!(rouge_score("", "x"), 0.0);
        assert_eq!(rouge_score("x", ""), 0.0);
        assert_eq!(rouge_score("...", "x"), 0.0);
        // Whitespace-only sentences are the single word "".
        assert!(rouge_score(" ", " ") > 0.99);
        assert_eq!(rouge_score("no overlap", "other words"), 0.0);
    }

    #[test]
    fn rouge_recursion_limit() {
        let words = |n: usize| {
            (0..n)
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(rouge_score("w0", &words(ROUGE_MAX_TRACEBACK_STEPS)) > 0.0);
        assert_eq!(
            rouge_score("w0", &words(ROUGE_MAX_TRACEBACK_STEPS + 1)),
            0.0
        );
        assert!(rouge_score(&words(ROUGE_MAX_TRACEBACK_STEPS), "w0") > 0.0);
        assert_eq!(
            rouge_score(&words(ROUGE_MAX_TRACEBACK_STEPS + 1), "w0"),
            0.0
        );
    }

    #[test]
    fn small_metrics() {
        assert_eq!(
            count_score("There are 12 unique paragraphs, not 13", "12"),
            0.5
        );
        assert_eq!(count_score("", "12"), 0.0);
        assert_eq!(retrieval_score("Paragraph 3", "Paragraph 3"), 1.0);
        assert_eq!(retrieval_score("Paragraph 13", "Paragraph 3"), 0.0);
        assert_eq!(retrieval_score("Paragraph 3", "no label"), 0.0);
        assert_eq!(retrieval_zh_score("答案是段落12", "段落12"), 1.0);
        let classes = ["a", "b", "ab", "abc"];
        // Hits [a, b, ab, abc]; "a" removed, "b" skipped, "ab" removed -> [b, abc].
        assert_eq!(classification_score("abc", "abc", &classes), 0.5);
        assert_eq!(classification_score("", "abc", &classes), 0.0);
        assert_eq!(classification_score("x", "x", &NO), 0.0);
    }

    #[test]
    fn fuzz_and_code() {
        assert_eq!(fuzz_ratio("", "", FuzzBackend::Levenshtein), 100);
        assert_eq!(fuzz_ratio("", "a", FuzzBackend::Difflib), 0);
        // 100 * 2/16 = 12.5 rounds half-even to 12.
        assert_eq!(
            fuzz_ratio("abcdefgh", "aXYZWVUT", FuzzBackend::Levenshtein),
            12
        );
        assert_eq!(
            fuzz_ratio("kitten", "sitting", FuzzBackend::Levenshtein),
            62
        );
        assert_eq!(first_code_line("\n\n# c\n// d\n`x`\nfoo()\nbar()"), "foo()");
        assert_eq!(first_code_line("# only"), "");
        assert_eq!(code_sim_score("", ""), 1.0);
        assert_eq!(code_sim_score("# c", "x"), 0.0);
    }

    #[test]
    fn truncation() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(truncate_middle(&ids, 10), ids);
        assert_eq!(truncate_middle(&ids, 20), ids);
        assert_eq!(truncate_middle(&ids, 4), vec![0, 1, 8, 9]);
        // Odd max_len keeps 2 * (max_len / 2) tokens.
        assert_eq!(truncate_middle(&ids, 5), vec![0, 1, 8, 9]);
        assert_eq!(truncate_middle(&ids, 7), vec![0, 1, 2, 7, 8, 9]);
        let odd: Vec<u32> = (0..9).collect();
        assert_eq!(truncate_middle(&odd, 6), vec![0, 1, 2, 6, 7, 8]);
        assert_eq!(truncate_middle(&odd, 8), vec![0, 1, 2, 3, 5, 6, 7, 8]);
        // half = 0: Python's ids[:0] + ids[-0:] is the whole list.
        assert_eq!(truncate_middle(&ids, 1), ids);
        assert_eq!(truncate_middle(&ids, 0), ids);
        assert_eq!(truncate_middle(&[], 0), Vec::<u32>::new());
    }

    #[test]
    fn tables_and_prompts() {
        for d in DATASETS {
            let t = prompt_template(d).unwrap();
            assert!(t.contains("{context}"), "{d}");
            // Only {context} and {input} fields.
            let stripped = t.replace("{context}", "").replace("{input}", "");
            assert!(!stripped.contains('{') && !stripped.contains('}'), "{d}");
            assert!(max_new_tokens(d).unwrap() >= 32);
            Metric::for_dataset(d).unwrap();
        }
        for d in LONGBENCH_E_DATASETS {
            let e = format!("{d}_e");
            assert_eq!(prompt_template(&e).unwrap(), prompt_template(d).unwrap());
            assert_eq!(max_new_tokens(&e).unwrap(), max_new_tokens(d).unwrap());
            assert_eq!(
                Metric::for_dataset(&e).unwrap(),
                Metric::for_dataset(d).unwrap()
            );
        }
        assert_eq!(max_new_tokens("gov_report").unwrap(), 512);
        assert_eq!(max_new_tokens("hotpotqa").unwrap(), 32);
        assert!(prompt_template("narrativeqa")
            .unwrap()
            .contains("asconcisely"));
        assert!(prompt_template("nope").is_err());
        assert!(Metric::for_dataset("nope_e").is_err());
        assert_eq!(
            build_prompt("trec", "ctx {input} }", "q").unwrap(),
            "Please determine the type of the question below. Here are some examples of questions.\n\nctx {input} }\nq"
        );
        assert_eq!(
            fill_template("{{x}} {context}{other}", "C", "I"),
            "{x} C{other}"
        );
    }

    #[test]
    fn dataset_scoring() {
        let answers = vec!["paris".to_string()];
        // First-line cut for triviaqa, none for hotpotqa.
        assert_eq!(
            score_prediction("triviaqa", "\nParis\nQuestion: x", &answers, &NO).unwrap(),
            1.0
        );
        assert!(score_prediction("hotpotqa", "Paris\nQuestion: x", &answers, &NO).unwrap() < 1.0);
        assert_eq!(score_prediction("qasper", "x", &NO, &NO).unwrap(), 0.0);
        assert!(matches!(
            score_prediction("vcsum", "x", &answers, &NO),
            Err(LongBenchError::Unimplemented("rouge_zh_score"))
        ));
        let samples = [
            Sample {
                prediction: "Paris",
                answers: &answers,
                length: 100,
            },
            Sample {
                prediction: "Rome",
                answers: &answers,
                length: 5000,
            },
            Sample {
                prediction: "the Paris",
                answers: &answers,
                length: 4000,
            },
        ];
        assert_eq!(
            score_dataset("hotpotqa", &samples, &NO, FuzzBackend::Levenshtein).unwrap(),
            Some(66.67)
        );
        assert_eq!(
            score_dataset("hotpotqa", &[], &NO, FuzzBackend::Levenshtein).unwrap(),
            None
        );
        let e = score_dataset_e("hotpotqa_e", &samples, &NO, FuzzBackend::Levenshtein).unwrap();
        assert_eq!(
            e,
            BucketScores {
                upto_4k: Some(100.0),
                from_4k_to_8k: Some(50.0),
                over_8k: None
            }
        );
        assert_eq!(LengthBucket::of(8000).label(), "8k+");
    }

    #[test]
    fn python_rounding() {
        assert_eq!(py_round(0.125, 2), 0.12);
        assert_eq!(py_round(0.375, 2), 0.38);
        assert_eq!(py_round(2.675, 2), 2.67);
        assert_eq!(py_round(66.66666666666667, 2), 66.67);
        assert!(numpy_mean(&[]).is_nan());
    }
}
