//! The device-generic backend (`--backend candle`, plain Candle ops) against the fused CPU
//! kernels and the reference fixtures: every fixture model, every policy, decimation
//! indices, decode steps, chunked prefill and batches. Bound: 1e-4 on f32 logits.

use candle_core::{DType, Device, Tensor};
use decimamba::loader::{files_from_dir, load_model};
use decimamba::model::{Backend, BackendChoice, ChunkScan, ForwardOptions, LogitsSpan, MambaModel};
use decimamba::{DecimationConfig, Policy};
use serde_json::Value;

mod common;
use common::{
    fixtures, floats, ids_of, json, max_diff, method_case, method_case_in, reference_kept,
    zeroed_counts, Values, ZeroCounter, DECIMATION_CASES, METHOD_CASES,
};

const TOL: f32 = 1e-4;

const FIXTURES: &[(&str, &str)] = &[
    ("tiny-rms-hf", "tiny-rms.logits.json"),
    ("tiny-rms-orig", "tiny-rms.logits.json"),
    ("tiny-dtrank-hf", "tiny-dtrank.logits.json"),
    ("tiny-dtrank-orig", "tiny-dtrank-orig.logits.json"),
    ("tiny-layernorm-orig", "tiny-layernorm.logits.json"),
];

fn load(dir: &str, dtype: DType, backend: BackendChoice) -> MambaModel {
    let files = files_from_dir(&fixtures().join("models").join(dir)).unwrap();
    load_model(&files, &Device::Cpu, dtype)
        .unwrap()
        .with_backend(backend)
        .unwrap()
}

/// The same fixture model on both backends: (Candle ops, fused kernels).
fn pair(dir: &str) -> (MambaModel, MambaModel) {
    let generic = load(dir, DType::F32, BackendChoice::Candle);
    assert_eq!(generic.backend(), Backend::CandleOps);
    assert_eq!(generic.backend_name(), "candle-ops");
    let fused = load(dir, DType::F32, BackendChoice::Kernels);
    assert_eq!(fused.backend(), Backend::CpuKernels);
    (generic, fused)
}

fn tensor_ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

#[test]
fn every_fixture_model_matches_the_kernels_and_transformers() {
    for &(dir, fixture) in FIXTURES {
        let (generic, fused) = pair(dir);
        let reference = json(fixture);
        let ids = tensor_ids(&ids_of(&reference["input_ids"]));
        assert!(ids.dim(0).unwrap() > 1, "{fixture} should hold a batch");
        let got = generic.forward(&ids).unwrap().values();
        let d = max_diff(&got, &fused.forward(&ids).unwrap().values());
        assert!(d < TOL, "{dir}: candle vs kernels differ by {d}");
        let d = max_diff(&got, &floats(&reference["logits"]));
        assert!(d < TOL, "{dir}: candle vs reference differ by {d}");
    }
}

#[test]
fn decode_steps_equal_the_kernels() {
    for &(dir, fixture) in FIXTURES {
        let (generic, fused) = pair(dir);
        let ids = ids_of(&json(fixture)["input_ids"]);
        let prompt = 6;
        let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..prompt].to_vec()).collect();
        let opts = ForwardOptions {
            logits: LogitsSpan::Last(1),
            ..Default::default()
        };
        let (mut sg, mut sf) = (generic.new_state(ids.len()), fused.new_state(ids.len()));
        let (lg, _) = generic
            .forward_with_state(&tensor_ids(&head), &mut sg, &opts)
            .unwrap();
        let (lf, _) = fused
            .forward_with_state(&tensor_ids(&head), &mut sf, &opts)
            .unwrap();
        let d = max_diff(&lg.unwrap().values(), &lf.unwrap().values());
        assert!(d < TOL, "{dir}: prefill differs by {d}");
        for pos in prompt..ids[0].len() {
            let step: Vec<u32> = ids.iter().map(|r| r[pos]).collect();
            let g = generic.step(&step, &mut sg).unwrap().values();
            let f = fused.step(&step, &mut sf).unwrap().values();
            let d = max_diff(&g, &f);
            assert!(d < TOL, "{dir}: decode step at {pos} differs by {d}");
        }
        assert_eq!(sg.seen_tokens, sf.seen_tokens);
    }
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let generic = load("tiny-rms-hf", DType::F32, BackendChoice::Candle);
    let ids = tensor_ids(&ids_of(&json("tiny-rms.logits.json")["input_ids"]));
    let whole = generic.forward(&ids).unwrap();
    let len = ids.dim(1).unwrap();
    let last = whole.narrow(1, len - 1, 1).unwrap().values();
    for chunk in [1, 3, 7, 64] {
        let mut state = generic.new_state(ids.dim(0).unwrap());
        let got = generic.prefill_chunked(&ids, chunk, &mut state).unwrap();
        let d = max_diff(&got.values(), &last);
        assert!(d < 1e-5, "chunk {chunk}: {d}");
    }
    // The model's own chunking of long inputs gives the same logits at every position.
    let chunked = generic.clone().with_prefill_chunk(Some(4));
    let d = max_diff(&chunked.forward(&ids).unwrap().values(), &whole.values());
    assert!(d < 1e-5, "model-chunked prefill differs by {d}");
}

/// Logits and the kept indices of every layer of one decimated prefill, then the logits
/// of decode steps after it.
type Decimated = (Vec<f32>, Vec<Option<Vec<usize>>>, Vec<Vec<f32>>);

fn decimated(
    model: &MambaModel,
    ids: &[Vec<u32>],
    cfg: &DecimationConfig,
    tail: usize,
    steps: &[u32],
) -> Decimated {
    let mut state = model.new_state(1);
    let opts = ForwardOptions {
        policy: Some(cfg),
        protected_tail: tail,
        logits: LogitsSpan::All,
        record_indices: true,
        observer: None,
    };
    let (logits, trace) = model
        .forward_with_state(&tensor_ids(ids), &mut state, &opts)
        .unwrap();
    let kept = trace.layers.iter().map(|t| t.kept.clone()).collect();
    let decode = steps
        .iter()
        .map(|&id| model.step(&[id], &mut state).unwrap().values())
        .collect();
    (logits.unwrap().values(), kept, decode)
}

#[test]
fn decimation_fixtures_keep_the_same_tokens() {
    for name in DECIMATION_CASES {
        let reference = json(&format!("decimation/{name}.json"));
        let (generic, fused) = pair(reference["model"].as_str().unwrap());
        let cfg: DecimationConfig = serde_json::from_value(reference["config"].clone()).unwrap();
        let tail = reference["protected_tail"].as_u64().unwrap() as usize;
        let ids = ids_of(&reference["input_ids"]);
        let steps: Vec<u32> = match reference.get("decode") {
            Some(d) => ids_of(&Value::Array(vec![d["new_ids"].clone()])).remove(0),
            None => vec![1, 2, 3],
        };
        let (lg, kg, dg) = decimated(&generic, &ids, &cfg, tail, &steps);
        let (lf, kf, df) = decimated(&fused, &ids, &cfg, tail, &steps);
        assert_eq!(kg, kf, "{name}: kept indices differ");
        for kept in reference["kept"].as_array().unwrap() {
            let (layer, len_in, want) = reference_kept(kept);
            let got = kg[layer].clone().unwrap_or_else(|| (0..len_in).collect());
            assert_eq!(got, want, "{name}: layer {layer} against the reference");
        }
        let d = max_diff(&lg, &lf);
        assert!(d < TOL, "{name}: logits differ by {d}");
        let d = max_diff(&lg, &floats(&reference["logits"]));
        assert!(d < TOL, "{name}: logits differ from the reference by {d}");
        for (i, (g, f)) in dg.iter().zip(&df).enumerate() {
            let d = max_diff(g, f);
            assert!(d < TOL, "{name}: decode step {i} differs by {d}");
        }
    }
}

#[test]
fn every_method_matches_the_kernels_and_the_reference() {
    let (generic, fused) = pair("tiny-rms-hf");
    let cases = METHOD_CASES
        .iter()
        .map(|n| (*n, method_case(n)))
        .chain(["upi_inference", "upi_short"].map(|n| (n, method_case_in("analysis", n))));
    for (name, case) in cases {
        let got = common::policy_logits(&generic, &case.ids, &case.policy, None);
        let d = max_diff(
            &got,
            &common::policy_logits(&fused, &case.ids, &case.policy, None),
        );
        assert!(d < TOL, "{name}: candle vs kernels differ by {d}");
        let d = max_diff(&got, &case.logits);
        assert!(d < TOL, "{name}: candle vs reference differ by {d}");
        if case.raw.get("zeroed").is_some() {
            // The channel filter zeroes exactly the reference's entries.
            let n_layer = generic.config().n_layer;
            let counter = ZeroCounter(std::cell::RefCell::new(vec![0; n_layer]));
            common::policy_logits(&generic, &case.ids, &case.policy, Some(&counter));
            assert_eq!(counter.0.into_inner(), zeroed_counts(&case), "{name}");
        }
    }
}

/// Logits of each row of `rows` (all one length) run as one batch under `policy`.
fn batch_logits(model: &MambaModel, rows: &[Vec<u32>], policy: &Policy) -> Vec<f32> {
    let mut state = model.new_state(rows.len());
    let opts = ForwardOptions {
        policy: policy.as_option(),
        protected_tail: 2,
        logits: LogitsSpan::Last(3),
        ..Default::default()
    };
    let (logits, _) = model
        .forward_with_state(&tensor_ids(rows), &mut state, &opts)
        .unwrap();
    logits.unwrap().values()
}

#[test]
fn batches_under_every_policy_match_the_kernels_and_batch_one() {
    let (generic, fused) = pair("tiny-rms-hf");
    let mut policies: Vec<(String, Policy)> = METHOD_CASES
        .iter()
        .map(|n| (n.to_string(), method_case(n).policy))
        .collect();
    let deci = DecimationConfig {
        decimating_layers: vec![1],
        decimation_beta: 0.5,
        decimation_max_p_l_base: 9,
        decimation_min_seq_len: 4,
        decimation_type: "max_p".into(),
    };
    policies.push(("decimamba".into(), Policy::DeciMamba(deci)));
    policies.push(("vanilla".into(), Policy::Vanilla));
    let vocab = generic.config().vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..3u32)
        .map(|r| (0..31u32).map(|t| (t * 7 + r * 13 + 1) % vocab).collect())
        .collect();
    for (name, policy) in &policies {
        let got = batch_logits(&generic, &rows, policy);
        let d = max_diff(&got, &batch_logits(&fused, &rows, policy));
        assert!(
            d < TOL,
            "{name}: batch of 3, candle vs kernels differ by {d}"
        );
        let one_by_one: Vec<f32> = rows
            .iter()
            .flat_map(|r| batch_logits(&generic, std::slice::from_ref(r), policy))
            .collect();
        let d = max_diff(&got, &one_by_one);
        assert!(
            d < 1e-5,
            "{name}: batch vs rows one at a time differ by {d}"
        );
    }
}

#[test]
fn bf16_stays_close_to_the_kernels() {
    let reference = json("tiny-rms.logits.json");
    let ids = tensor_ids(&ids_of(&reference["input_ids"]));
    let generic = load("tiny-rms-hf", DType::BF16, BackendChoice::Candle);
    let fused = load("tiny-rms-hf", DType::BF16, BackendChoice::Kernels);
    let d = max_diff(
        &generic.forward(&ids).unwrap().values(),
        &fused.forward(&ids).unwrap().values(),
    );
    // bf16 keeps 8 mantissa bits: the bound of the CPU's own bf16 test.
    assert!(d < 0.1, "bf16 candle vs kernels differ by {d}");
}

#[test]
fn the_kernels_are_refused_where_none_exist_and_states_follow_the_backend() {
    let generic = load("tiny-rms-hf", DType::F32, BackendChoice::Candle);
    // A fused model's host state cannot feed the generic backend's tensors, and back.
    let fused = generic.clone().with_backend(BackendChoice::Auto).unwrap();
    assert_eq!(fused.backend(), Backend::CpuKernels);
    let mut state = fused.new_state(1);
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    assert!(generic
        .forward_with_state(&ids, &mut state, &ForwardOptions::default())
        .is_err());
}

#[test]
fn the_prefix_scan_equals_the_sequential_one() {
    // The GPU default, run here on the CPU: every fixture, a decimating policy, decode.
    for &(dir, fixture) in FIXTURES {
        let sequential =
            load(dir, DType::F32, BackendChoice::Candle).with_chunk_scan(ChunkScan::Sequential);
        let prefix = sequential.clone().with_chunk_scan(ChunkScan::Prefix);
        let ids = tensor_ids(&ids_of(&json(fixture)["input_ids"]));
        let d = max_diff(
            &prefix.forward(&ids).unwrap().values(),
            &sequential.forward(&ids).unwrap().values(),
        );
        assert!(d < 1e-5, "{dir}: prefix vs sequential scan differ by {d}");
    }
    let reference = json("decimation/multi_layer.json");
    let dir = reference["model"].as_str().unwrap();
    let prefix = load(dir, DType::F32, BackendChoice::Candle).with_chunk_scan(ChunkScan::Prefix);
    let fused = load(dir, DType::F32, BackendChoice::Kernels);
    let cfg: DecimationConfig = serde_json::from_value(reference["config"].clone()).unwrap();
    let tail = reference["protected_tail"].as_u64().unwrap() as usize;
    let ids = ids_of(&reference["input_ids"]);
    let (lp, kp, dp) = decimated(&prefix, &ids, &cfg, tail, &[3, 1, 4]);
    let (lf, kf, df) = decimated(&fused, &ids, &cfg, tail, &[3, 1, 4]);
    assert_eq!(kp, kf);
    assert!(max_diff(&lp, &lf) < TOL);
    for (p, f) in dp.iter().zip(&df) {
        assert!(max_diff(p, f) < TOL);
    }
}
