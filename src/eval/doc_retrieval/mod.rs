//! The paper's multi-document retrieval on SQuAD v2 (DeciMamba §5; the authors' code:
//! assafbk/DeciMamba `finetune_ssm.py`, `inject_noise_to_context`,
//! `get_input_ids_eval_squad`, `evaluate_validation_set_squad`).
//!
//! # The authors' protocol
//! For each answerable validation question (their `has_answer_indices_val.pkl`) and each
//! number N of noise documents, `inject_noise_to_context` puts the question's own paragraph
//! (the golden document) at a random position among N noise paragraphs, gives the N + 1
//! documents distinct ids `random.sample(range(0, 1000), N + 1)` in document order, and
//! writes every document as ` <|Query|> {question} <|Document {id}|> {paragraph}`: the
//! query is repeated before each document. The prompt ends with ` <|Answer|> <|Document `,
//! the target is `{id}|>` of the golden document. Generation is greedy for at most
//! `eval_max_len` = 10 tokens (their `configs/eval_ssm_config_0.json`); the decoded
//! output is cut after its first `|>` (`response.split('|>')[0] + '|>'`) and scored by
//! exact match with the target.
//!
//! Their noise documents are the `context` fields of validation rows taken one after the
//! other from a fixed shuffle of the split (`noise_docs_indices_val.pkl`, repeated ten
//! times, restarted for every N), answerable or not, with no check: since SQuAD asks about
//! ten questions per paragraph, a noise document can repeat, or be the golden paragraph
//! itself. Before their commit 6290e95 the function returned the id of the *last* document
//! instead of the golden one.
//!
//! # Ours
//! The same prompt and target, with the draws made deterministic and unambiguous:
//! * noise documents are N *distinct* paragraphs of the split other than the golden one
//!   (any row's paragraph, answerable or not, as theirs), so the label has one answer;
//! * every random choice comes from [`SplitMix64`] seeded with
//!   [`mix_seed`]`([seed, N, question row])`, in this order: the golden position
//!   `below(N + 1)`; the noise paragraphs, a partial Fisher–Yates shuffle of the other
//!   paragraph indices (ascending) taking N; the ids, a partial Fisher–Yates shuffle of
//!   0..1000 taking N + 1. Every method sees the same prompt; batches and shards do not
//!   change it;
//! * the questions are `--questions` answerable rows picked by a partial Fisher–Yates
//!   shuffle of the answerable row indices (file order) with `SplitMix64(mix_seed([seed]))`,
//!   the same questions for every N (theirs: the whole answerable split, or a 100-question
//!   `train_test_split(seed=111)` during training);
//! * a hit needs the generated text to contain `|>` with exactly the golden id before it.
//!   Their decode keeps the EOS text `<|endoftext|>`, which itself contains `|>`, so an
//!   output that ends without `|>` cannot match there either.
//!
//! `scripts/doc_retrieval_reference.py` re-implements this from the description above and
//! its output on the fixture (`tests/fixtures/reference/doc_retrieval/prompts.json`) is
//! compared with these functions in `tests/doc_retrieval.rs`.

pub mod run;
pub mod squad;

pub use run::{files, run_doc_retrieval, DocRetrievalJob, DocRetrievalPlan, DocRetrievalSettings};
pub use squad::{read_squad, squad_validation, SquadQuestion, SquadSet};

use crate::eval::common::mix_seed;
use anyhow::{bail, Result};

/// Noise-document counts of the paper's figure (v1 Fig. 1; their config lists 10–300).
pub const DEFAULT_NUM_DOCS: [usize; 13] =
    [10, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 250, 300];

/// Document ids are drawn from 0..1000 (`random.sample(range(0, 1000), N + 1)`).
pub const DOC_ID_COUNT: usize = 1000;

/// `eval_max_len` of the authors' doc-retrieval eval config.
pub const MAX_NEW_TOKENS: usize = 10;

/// What closes the prompt (`get_input_ids_eval_squad`).
pub const ANSWER_PREFIX: &str = " <|Answer|> <|Document ";

/// What closes a document id in the target and the output.
pub const ID_CLOSE: &str = "|>";

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny PRNG that a Python reference can
/// reproduce exactly. `below(n)` maps a draw to 0..n by the high word of `draw · n`
/// (Lemire's multiply-shift).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw in 0..n (n ≥ 1).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// The first `k` entries of `pool` after a partial Fisher–Yates shuffle: for each
    /// i < k, swap entry i with entry i + below(len − i).
    pub fn take<T: Copy>(&mut self, mut pool: Vec<T>, k: usize) -> Vec<T> {
        let k = k.min(pool.len());
        for i in 0..k {
            let j = i + self.below(pool.len() - i);
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}

/// The question rows of a run: `count` answerable rows of `set` (see the module docs).
pub fn select_questions(set: &SquadSet, count: usize, seed: u64) -> Result<Vec<usize>> {
    let answerable = set.answerable_rows();
    if count == 0 {
        bail!("--questions must be at least 1");
    }
    if count > answerable.len() {
        bail!(
            "--questions {count} is more than the {} answerable questions in {}",
            answerable.len(),
            set.source
        );
    }
    Ok(SplitMix64::new(mix_seed(&[seed])).take(answerable, count))
}

/// One prompt of the evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalPrompt {
    /// The prompt text, ending with [`ANSWER_PREFIX`].
    pub text: String,
    /// The paragraph (index into [`SquadSet::contexts`]) of each document, in order.
    pub documents: Vec<usize>,
    /// The id of each document, in order.
    pub doc_ids: Vec<u32>,
    /// Where the golden document is (0 = first).
    pub golden_position: usize,
    /// The golden document's id.
    pub golden_id: u32,
}

impl RetrievalPrompt {
    /// The target the authors compare with: `{id}|>`.
    pub fn label(&self) -> String {
        format!("{}{ID_CLOSE}", self.golden_id)
    }
}

/// Refuses a document count the protocol cannot draw for `set`.
pub fn check_num_docs(set: &SquadSet, num_docs: usize) -> Result<()> {
    if num_docs == 0 {
        bail!("--num-docs: 0 noise documents leave nothing to retrieve from; use at least 1");
    }
    if num_docs + 1 > DOC_ID_COUNT {
        bail!(
            "--num-docs {num_docs}: N + 1 documents need distinct ids from 0–{}, so N is at most {}",
            DOC_ID_COUNT - 1,
            DOC_ID_COUNT - 1
        );
    }
    let others = set.contexts.len() - 1;
    if num_docs > others {
        bail!(
            "--num-docs {num_docs} needs {num_docs} distinct noise documents, but {} has only {others} paragraphs besides the golden one",
            set.source
        );
    }
    Ok(())
}

/// The prompt of question row `row` with `num_docs` noise documents (module docs).
pub fn build_prompt(
    set: &SquadSet,
    row: usize,
    num_docs: usize,
    seed: u64,
) -> Result<RetrievalPrompt> {
    check_num_docs(set, num_docs)?;
    let q = &set.questions[row];
    let mut rng = SplitMix64::new(mix_seed(&[seed, num_docs as u64, row as u64]));
    let golden_position = rng.below(num_docs + 1);
    let others: Vec<usize> = (0..set.contexts.len())
        .filter(|&c| c != q.context)
        .collect();
    let noise = rng.take(others, num_docs);
    let doc_ids: Vec<u32> = rng.take((0..DOC_ID_COUNT as u32).collect(), num_docs + 1);
    let mut documents = noise;
    documents.insert(golden_position, q.context);
    let mut text = String::new();
    for (&doc, id) in documents.iter().zip(&doc_ids) {
        text.push_str(&format!(
            " <|Query|> {} <|Document {id}|> {}",
            q.question, set.contexts[doc]
        ));
    }
    text.push_str(ANSWER_PREFIX);
    Ok(RetrievalPrompt {
        text,
        golden_id: doc_ids[golden_position],
        documents,
        doc_ids,
        golden_position,
    })
}

/// The id the model answered: the generated text before its first `|>`, when it has one.
pub fn answered_id(output: &str) -> Option<&str> {
    output.find(ID_CLOSE).map(|end| &output[..end])
}

/// Exact match of the output with the golden id (see the module docs).
pub fn is_hit(output: &str, golden_id: u32) -> bool {
    answered_id(output) == Some(golden_id.to_string().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(paragraphs: usize) -> SquadSet {
        SquadSet::from_rows(
            "test".into(),
            (0..paragraphs).map(|i| {
                (
                    format!("id{i}"),
                    format!("Q{i}?"),
                    format!("P{i}."),
                    i % 2 == 0,
                )
            }),
        )
        .unwrap()
    }

    #[test]
    fn splitmix_matches_its_reference_values() {
        // The first outputs of SplitMix64 seeded with 0 (the published test vector).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut r = SplitMix64::new(7);
        assert!((0..1000).all(|_| r.below(3) < 3));
    }

    #[test]
    fn prompts_follow_the_authors_format() {
        let s = set(12);
        let p = build_prompt(&s, 4, 5, 1).unwrap();
        assert_eq!(p.documents.len(), 6);
        assert_eq!(p.documents[p.golden_position], s.questions[4].context);
        let distinct: std::collections::HashSet<_> = p.documents.iter().collect();
        assert_eq!(distinct.len(), 6, "documents repeat: {:?}", p.documents);
        let ids: std::collections::HashSet<_> = p.doc_ids.iter().collect();
        assert_eq!(ids.len(), 6);
        assert!(p.doc_ids.iter().all(|&i| i < 1000));
        assert!(p.text.starts_with(" <|Query|> Q4? <|Document "));
        assert!(p.text.ends_with(" <|Answer|> <|Document "));
        assert_eq!(p.text.matches(" <|Query|> Q4? ").count(), 6);
        let golden = format!("<|Document {}|> P4.", p.golden_id);
        assert!(p.text.contains(&golden), "{}", p.text);
        assert_eq!(p.label(), format!("{}|>", p.golden_id));
        // Deterministic, and the seed matters.
        assert_eq!(p, build_prompt(&s, 4, 5, 1).unwrap());
        assert_ne!(p.text, build_prompt(&s, 4, 5, 2).unwrap().text);
    }

    #[test]
    fn document_counts_are_checked() {
        let s = set(12);
        assert!(build_prompt(&s, 0, 11, 0).is_ok());
        let e = build_prompt(&s, 0, 12, 0).unwrap_err().to_string();
        assert!(
            e.contains("only 11 paragraphs besides the golden one"),
            "{e}"
        );
        assert!(check_num_docs(&s, 0).is_err());
        let big = set(1200);
        let e = check_num_docs(&big, 1000).unwrap_err().to_string();
        assert!(e.contains("at most 999"), "{e}");
    }

    #[test]
    fn answers_are_read_up_to_the_first_close() {
        assert!(is_hit("42|> <|Query", 42));
        assert!(!is_hit(" 42|>", 42));
        assert!(!is_hit("42", 42));
        assert!(!is_hit("421|>", 42));
        assert_eq!(answered_id("7|>8|>"), Some("7"));
    }

    #[test]
    fn questions_are_answerable_and_distinct() {
        let s = set(12);
        let q = select_questions(&s, 6, 3).unwrap();
        assert_eq!(q.len(), 6);
        assert!(q.iter().all(|&r| s.questions[r].answerable));
        let e = select_questions(&s, 7, 3).unwrap_err().to_string();
        assert!(e.contains("more than the 6 answerable"), "{e}");
    }
}
