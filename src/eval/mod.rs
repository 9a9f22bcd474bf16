//! The paper's evaluations: passkey retrieval, long-context perplexity, multi-document
//! retrieval and LongBench, for any set of context policies side by side.
//!
//! Evaluations talk to a model only through [`EvalModel`], so they can be
//! tested with small fake models and run unchanged on any loaded checkpoint.

use crate::policy::Policy;

pub mod common;
pub mod data;
pub mod doc_retrieval;
pub mod longbench;
pub mod merge;
pub mod passkey;
pub mod plot;
pub mod ppl;
pub mod ruler;
pub mod runlog;
pub mod sweep;

pub use common::{Method, RunOptions};

/// What a greedy generation after one (possibly decimated) prefill returns.
#[derive(Debug, Clone)]
pub struct GreedyOutput {
    /// Newly generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens`.
    pub text: String,
    /// Wall-clock seconds spent in the prefill.
    pub prefill_secs: f64,
    /// Sequence length leaving each layer the policy reports (DeciMamba's decimating
    /// layers, in order; empty for other methods).
    pub kept_per_layer: Vec<usize>,
}

/// Negative log-likelihoods of the last `pred_len` tokens of a window.
#[derive(Debug, Clone)]
pub struct TailScore {
    /// One NLL (natural log) per scored token, in position order.
    pub nll: Vec<f32>,
    /// Wall-clock seconds spent in the forward pass.
    pub forward_secs: f64,
    /// Sequence length leaving each layer the policy reports (empty for most methods).
    pub kept_per_layer: Vec<usize>,
}

/// The model interface the evaluations need. `Sync`, so a pool of workers can share the
/// tokenizer and run copies of the model on several devices at once.
pub trait EvalModel: Sync {
    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>>;
    /// Text of `ids`.
    fn decode(&self, ids: &[u32]) -> anyhow::Result<String>;
    /// Greedy decoding of at most `max_new_tokens` after a prefill of `prompt`
    /// under `policy` (protected tail R = 1); stops at EOS.
    fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        policy: &Policy,
    ) -> anyhow::Result<GreedyOutput>;
    /// [`Self::generate_greedy`] of several prompts of one length, decoded together when the
    /// model can batch them; the outputs equal generating each alone.
    fn generate_greedy_batch(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        policy: &Policy,
    ) -> anyhow::Result<Vec<GreedyOutput>> {
        prompts
            .iter()
            .map(|p| self.generate_greedy(p, max_new_tokens, policy))
            .collect()
    }
    /// NLL of the last `pred_len` tokens of `window`, scored in one forward pass
    /// under `policy` with those tokens protected from dropping (R = pred_len + 1).
    fn score_tail(
        &self,
        window: &[u32],
        pred_len: usize,
        policy: &Policy,
    ) -> anyhow::Result<TailScore>;
    /// [`Self::score_tail`] of several windows of one length, scored together when the model
    /// can batch them; the results equal scoring each alone.
    fn score_tails(
        &self,
        windows: &[&[u32]],
        pred_len: usize,
        policy: &Policy,
    ) -> anyhow::Result<Vec<TailScore>> {
        windows
            .iter()
            .map(|w| self.score_tail(w, pred_len, policy))
            .collect()
    }
    /// A short name for reports (model id or directory).
    fn name(&self) -> String;
    /// What identifies the model in `run.json`: everything about it that changes a
    /// result (files, revision, tokenizer, device kind, dtype, backend).
    fn identity(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::json!({ "name": self.name() }))
    }
}

/// Greedy generation of prompts of any lengths: the prompts of one token length run as one
/// batch ([`EvalModel::generate_greedy_batch`]), a lone prompt alone; outputs come in the
/// order of `prompts` and equal generating each prompt alone.
pub fn generate_greedy_by_length(
    model: &dyn EvalModel,
    prompts: &[&[u32]],
    max_new_tokens: usize,
    policy: &Policy,
) -> anyhow::Result<Vec<GreedyOutput>> {
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut outputs: Vec<Option<GreedyOutput>> = vec![None; prompts.len()];
    for group in crate::generation::length_groups(&lens, prompts.len().max(1)) {
        let generated = match group.as_slice() {
            [one] => vec![model.generate_greedy(prompts[*one], max_new_tokens, policy)?],
            many => {
                let batch: Vec<&[u32]> = many.iter().map(|&i| prompts[i]).collect();
                model.generate_greedy_batch(&batch, max_new_tokens, policy)?
            }
        };
        if generated.len() != group.len() {
            anyhow::bail!(
                "a batch of {} prompts returned {} outputs",
                group.len(),
                generated.len()
            );
        }
        for (i, out) in group.into_iter().zip(generated) {
            outputs[i] = Some(out);
        }
    }
    Ok(outputs.into_iter().flatten().collect())
}
