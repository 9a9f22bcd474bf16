//! Fixture helpers shared by the model tests (tests/model_parity.rs, tests/gpu.rs).
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The fixtures of the checkout the test binary runs in (a GPU machine's copy of the repo
/// lives elsewhere than the build's), else of the one it was built from.
pub fn fixtures() -> PathBuf {
    let here = Path::new("tests/fixtures");
    if here.is_dir() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A reference JSON file under tests/fixtures/reference.
pub fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference").join(path)).unwrap())
        .unwrap()
}

/// `[[id, ...], ...]` as token-id rows.
pub fn ids_of(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// All numbers of a nested JSON array, flattened in order.
pub fn floats(v: &Value) -> Vec<f32> {
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            _ => panic!("unexpected {v}"),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

/// Largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tensor's elements as f32, flattened.
pub trait Values {
    fn values(&self) -> Vec<f32>;
}

impl Values for Tensor {
    fn values(&self) -> Vec<f32> {
        self.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

/// The DeciMamba fixtures of scripts/make_fixtures.py under tests/fixtures/reference/decimation.
pub const DECIMATION_CASES: &[&str] = &[
    "one_layer",
    "multi_layer",
    "min_binding",
    "tail_r5",
    "short_seq",
    "layer0_only_tail",
];

/// One `kept` entry of a decimation fixture: (layer, its input length, the kept indices).
pub fn reference_kept(kept: &Value) -> (usize, usize, Vec<usize>) {
    let indices = kept["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let layer = kept["layer"].as_u64().unwrap() as usize;
    (layer, kept["len_in"].as_u64().unwrap() as usize, indices)
}

/// The context-extension method fixtures of scripts/method_reference.py that run the
/// tiny-rms-hf model on one input under one policy.
pub const METHOD_CASES: &[&str] = &[
    "mambaextend_layer",
    "mambaextend_channel",
    "modulation",
    "longmamba_inference",
    "longmamba_short",
];

/// A method fixture: its input row, policy, logits `[len, vocab]` flattened and NLL of each
/// next token.
pub struct MethodCase {
    pub ids: Vec<u32>,
    pub policy: decimamba::Policy,
    pub logits: Vec<f32>,
    pub nll: Vec<f32>,
    pub raw: Value,
}

pub fn method_case(name: &str) -> MethodCase {
    method_case_in("methods", name)
}

/// A fixture of the same layout in another folder of tests/fixtures/reference.
pub fn method_case_in(folder: &str, name: &str) -> MethodCase {
    let raw = json(&format!("{folder}/{name}.json"));
    MethodCase {
        ids: ids_of(&raw["input_ids"]).remove(0),
        policy: decimamba::Policy::from_json(raw["policy"].clone()).unwrap(),
        logits: floats(&raw["logits"]),
        nll: floats(&raw["nll"]),
        raw,
    }
}

/// NLL of each next token from logits `[len, vocab]` (flattened) of input `ids`.
pub fn next_token_nll(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let vocab = logits.len() / ids.len();
    (0..ids.len() - 1)
        .map(|t| {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            lse - row[ids[t + 1] as usize]
        })
        .collect()
}

/// Logits of `ids` (batch 1) under `policy` on the model's device, with an optional observer.
pub fn policy_logits(
    model: &decimamba::MambaModel,
    ids: &[u32],
    policy: &decimamba::Policy,
    observer: Option<&dyn decimamba::policy::ScanObserver>,
) -> Vec<f32> {
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device()).unwrap();
    let mut state = model.new_state(1);
    let opts = decimamba::model::ForwardOptions {
        policy: policy.as_option(),
        logits: decimamba::model::LogitsSpan::All,
        observer,
        ..Default::default()
    };
    let (logits, _) = model.forward_with_state(&t, &mut state, &opts).unwrap();
    logits.unwrap().values()
}

/// Counts, per layer, the Δ entries the plan set to zero.
pub struct ZeroCounter(pub std::cell::RefCell<Vec<usize>>);

impl decimamba::policy::ScanObserver for ZeroCounter {
    fn on_scan(&self, view: &decimamba::policy::ScanView) -> anyhow::Result<()> {
        self.0.borrow_mut()[view.layer] += view.delta.iter().filter(|&&d| d == 0.0).count();
        Ok(())
    }
}

/// The reference's zeroed-entry counts per layer of a LongMamba case.
pub fn zeroed_counts(case: &MethodCase) -> Vec<usize> {
    case.raw["zeroed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}
