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
