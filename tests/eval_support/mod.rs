//! Fake models for the evaluation tests: a byte-level "tokenizer", a passkey
//! "model" that reads the key out of the prompt (vanilla only within a limited
//! reach), and deterministic tail NLLs. Each can be told to fail after K calls.
#![allow(dead_code)]

use anyhow::{bail, Result};
use decimamba::decimation::DecimationConfig;
use decimamba::eval::{EvalModel, GreedyOutput, TailScore};
use decimamba::Policy;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};

/// A byte-level fake model.
#[derive(Default)]
pub struct FakeModel {
    /// Vanilla finds the key only when the needle starts within this many
    /// tokens of the prompt's end (None: always).
    pub vanilla_reach: Option<usize>,
    /// Error on the call after this many successful generate/score calls.
    pub fail_after: Option<usize>,
    /// Set this flag (like Ctrl-C) after this many calls.
    pub stop_after: Option<(usize, Arc<AtomicBool>)>,
    /// On the call after this many, set the flag and fail as a prefill cut short by
    /// Ctrl-C does (the real model errs with `Interrupted`).
    pub interrupt_at: Option<(usize, Arc<AtomicBool>)>,
    /// Calls made so far.
    pub calls: Calls,
    /// (prompt length, decimated?) of every generate/score call.
    pub log: CallLog,
    /// Tail NLLs: return this many values instead of `pred_len`.
    pub wrong_nll_count: Option<usize>,
}

/// A call counter the worker threads of a sweep can share.
#[derive(Default)]
pub struct Calls(AtomicUsize);

impl Calls {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn set(&self, n: usize) {
        self.0.store(n, Ordering::SeqCst)
    }
}

/// The calls' log, shareable between worker threads.
#[derive(Default)]
pub struct CallLog(Mutex<Vec<(usize, bool)>>);

impl CallLog {
    pub fn borrow(&self) -> MutexGuard<'_, Vec<(usize, bool)>> {
        self.0.lock().unwrap()
    }
    pub fn borrow_mut(&self) -> MutexGuard<'_, Vec<(usize, bool)>> {
        self.0.lock().unwrap()
    }
}

pub const NEEDLE_LEAD: &str = "The pass key is ";

impl FakeModel {
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self, len: usize, decimated: bool) -> Result<()> {
        let n = self.calls.get();
        if let Some((k, flag)) = &self.interrupt_at {
            if n >= *k {
                flag.store(true, Ordering::SeqCst);
                return Err(decimamba::model::Interrupted.into());
            }
        }
        if let Some(k) = self.fail_after {
            if n >= k {
                bail!("fake model failure after {k} calls");
            }
        }
        self.calls.set(n + 1);
        self.log.borrow_mut().push((len, decimated));
        if let Some((k, flag)) = &self.stop_after {
            if n + 1 >= *k {
                flag.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// The fake per-token NLL of a window: vanilla degrades past 512 tokens,
    /// DeciMamba does not; both depend on the window's first token.
    pub fn nll_of(window: &[u32], decimated: bool) -> f32 {
        let base = 1.0 + (window[0] % 7) as f32 * 0.125;
        if !decimated && window.len() > 512 {
            base + (window.len() - 512) as f32 / 256.0
        } else {
            base
        }
    }
}

impl EvalModel for FakeModel {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        policy: &Policy,
    ) -> Result<GreedyOutput> {
        let decimation = policy.decimation();
        self.tick(prompt.len(), decimation.is_some())?;
        let text = self.decode(prompt)?;
        let found = text.find(NEEDLE_LEAD).map(|pos| {
            let key: String = text[pos + NEEDLE_LEAD.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            (pos, key)
        });
        let answer = match found {
            Some((pos, key)) => {
                let far = self
                    .vanilla_reach
                    .is_some_and(|r| decimation.is_none() && prompt.len() - pos > r);
                if far {
                    " I forgot".to_string()
                } else {
                    format!(" {key}\n")
                }
            }
            None => " none".to_string(),
        };
        let answer: String = answer.chars().take(max_new_tokens).collect();
        Ok(GreedyOutput {
            tokens: self.encode(&answer)?,
            text: answer,
            prefill_secs: 0.001,
            kept_per_layer: if decimation.is_some() {
                vec![prompt.len() / 2]
            } else {
                vec![]
            },
        })
    }

    fn score_tail(&self, window: &[u32], pred_len: usize, policy: &Policy) -> Result<TailScore> {
        let decimation = policy.decimation();
        self.tick(window.len(), decimation.is_some())?;
        let n = self.wrong_nll_count.unwrap_or(pred_len);
        Ok(TailScore {
            nll: vec![Self::nll_of(window, decimation.is_some()); n],
            forward_secs: 0.001,
            kept_per_layer: vec![],
        })
    }

    fn name(&self) -> String {
        "fake-bytes".into()
    }
}

/// A decimation config for the fake runs (its values are only recorded).
pub fn deci() -> DecimationConfig {
    serde_json::from_str(
        r#"{"decimating_layers": [1], "decimation_beta": 0.5, "decimation_max_p_L_base": 256,
            "decimation_min_seq_len": 20, "decimation_type": "max_p"}"#,
    )
    .unwrap()
}

/// A text fixture written by another part of the test suite, if present.
pub fn fixture(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(name);
    p.exists().then_some(p)
}

/// Lines of a JSONL file.
pub fn read_jsonl(p: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSON file.
pub fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}
