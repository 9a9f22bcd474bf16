//! Logits against Hugging Face transformers' MambaForCausalLM, and DeciMamba against an
//! independent Python implementation of the rule (fixtures from scripts/make_fixtures.py).

use candle_core::{DType, Device, Tensor};
use decimamba::loader::{files_from_dir, load_model};
use decimamba::model::{ForwardOptions, LogitsSpan, MambaModel};
use decimamba::DecimationConfig;
use serde_json::Value;

mod common;
use common::{fixtures, floats, ids_of, json, max_diff, Values};

fn load(dir: &str) -> MambaModel {
    let files = files_from_dir(&fixtures().join("models").join(dir)).unwrap();
    load_model(&files, &Device::Cpu, DType::F32).unwrap()
}

fn tensor_ids(rows: &[Vec<u32>]) -> Tensor {
    let flat: Vec<u32> = rows.concat();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn check_full_forward(model_dir: &str, fixture: &str) {
    let model = load(model_dir);
    let reference = json(fixture);
    let ids = ids_of(&reference["input_ids"]);
    let logits = model.forward(&tensor_ids(&ids)).unwrap();
    let got: Vec<f32> = logits.values();
    let d = max_diff(&got, &floats(&reference["logits"]));
    assert!(d < 1e-4, "{model_dir}: max |Δlogit| = {d}");
}

#[test]
fn rms_hf_matches_transformers() {
    check_full_forward("tiny-rms-hf", "tiny-rms.logits.json");
}

#[test]
fn rms_original_format_matches_transformers() {
    // vocab_size 90 padded to 96 by pad_vocab_size_multiple.
    check_full_forward("tiny-rms-orig", "tiny-rms.logits.json");
}

#[test]
fn sharded_untied_custom_dt_rank_matches_transformers() {
    check_full_forward("tiny-dtrank-hf", "tiny-dtrank.logits.json");
}

#[test]
fn original_untied_custom_dt_rank_matches_reference() {
    // mamba_ssm has no epsilon in its config: 1e-5, hence its own fixture.
    check_full_forward("tiny-dtrank-orig", "tiny-dtrank-orig.logits.json");
}

#[test]
fn layernorm_original_matches_reference() {
    check_full_forward("tiny-layernorm-orig", "tiny-layernorm.logits.json");
}

#[test]
fn prefill_then_decode_equals_full_forward() {
    for (dir, fixture) in [
        ("tiny-rms-hf", "tiny-rms.logits.json"),
        ("tiny-dtrank-orig", "tiny-dtrank-orig.logits.json"),
    ] {
        let model = load(dir);
        let reference = json(fixture);
        let ids = ids_of(&reference["input_ids"]);
        let want = floats(&reference["logits"]);
        let (batch, len) = (ids.len(), ids[0].len());
        let vocab = want.len() / (batch * len);
        let prompt = 7;
        let mut state = model.new_state(batch);
        let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..prompt].to_vec()).collect();
        let opts = ForwardOptions {
            logits: LogitsSpan::Last(1),
            ..Default::default()
        };
        let (logits, _) = model
            .forward_with_state(&tensor_ids(&head), &mut state, &opts)
            .unwrap();
        let check = |pos: usize, got: Vec<f32>| {
            for b in 0..batch {
                let w = &want[(b * len + pos) * vocab..(b * len + pos + 1) * vocab];
                let d = max_diff(&got[b * vocab..(b + 1) * vocab], w);
                assert!(d < 1e-4, "{dir}: position {pos} batch {b}: {d}");
            }
        };
        check(prompt - 1, logits.unwrap().values());
        for pos in prompt..len {
            let step_ids: Vec<u32> = ids.iter().map(|r| r[pos]).collect();
            let logits = model.step(&step_ids, &mut state).unwrap();
            check(pos, logits.values());
        }
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let model = load("tiny-rms-hf");
    let reference = json("tiny-rms.logits.json");
    let ids = tensor_ids(&ids_of(&reference["input_ids"]));
    let full = model.forward(&ids).unwrap();
    let last_full: Vec<f32> = full.narrow(1, 19, 1).unwrap().values();
    for chunk in [1, 3, 5, 8, 20, 64] {
        let mut state = model.new_state(2);
        let last = model.prefill_chunked(&ids, chunk, &mut state).unwrap();
        let d = max_diff(&last.values(), &last_full);
        assert!(d < 1e-5, "chunk {chunk}: {d}");
    }
}

#[test]
fn bf16_stays_close_to_f32() {
    let files = files_from_dir(&fixtures().join("models/tiny-rms-hf")).unwrap();
    let m32 = load_model(&files, &Device::Cpu, DType::F32).unwrap();
    let m16 = load_model(&files, &Device::Cpu, DType::BF16).unwrap();
    let ids = tensor_ids(&ids_of(&json("tiny-rms.logits.json")["input_ids"]));
    let a: Vec<f32> = m32.forward(&ids).unwrap().values();
    let b: Vec<f32> = m16.forward(&ids).unwrap().values();
    let d = max_diff(&a, &b);
    // bf16 keeps 8 bits of mantissa; logits here are O(1).
    assert!(d < 0.1, "bf16 drift {d}");
    assert!(d > 0.0, "bf16 run should differ from f32 at all");
}

/// bf16 and f16 decode steps (the CPU's streaming matvecs) continue a prefill as the
/// full forward (GEMMs) does, within 16-bit rounding, for a tied and an untied checkpoint
/// with biases and a residual kept in bf16.
#[test]
fn bf16_decode_steps_match_the_bf16_full_forward() {
    // Decode steps stream the weights through the matvec kernel, the full forward through
    // the GEMM: bf16 and f16 alike.
    for (dir, fixture, dtype) in [
        ("tiny-rms-hf", "tiny-rms.logits.json", DType::BF16),
        ("tiny-dtrank-hf", "tiny-dtrank.logits.json", DType::BF16),
        ("tiny-rms-hf", "tiny-rms.logits.json", DType::F16),
        ("tiny-dtrank-hf", "tiny-dtrank.logits.json", DType::F16),
    ] {
        let files = files_from_dir(&fixtures().join("models").join(dir)).unwrap();
        let model = load_model(&files, &Device::Cpu, dtype).unwrap();
        let ids = ids_of(&json(fixture)["input_ids"]);
        let (batch, len) = (ids.len(), ids[0].len());
        let full: Vec<f32> = model.forward(&tensor_ids(&ids)).unwrap().values();
        let vocab = full.len() / (batch * len);
        let prompt = 6;
        let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..prompt].to_vec()).collect();
        let mut state = model.new_state(batch);
        model
            .prefill_chunked(&tensor_ids(&head), prompt, &mut state)
            .unwrap();
        for pos in prompt..len {
            let step_ids: Vec<u32> = ids.iter().map(|r| r[pos]).collect();
            let got: Vec<f32> = model.step(&step_ids, &mut state).unwrap().values();
            for b in 0..batch {
                let w = &full[(b * len + pos) * vocab..(b * len + pos + 1) * vocab];
                let d = max_diff(&got[b * vocab..(b + 1) * vocab], w);
                // One bf16 rounding step apart at most here (logits O(1)).
                assert!(d < 0.05, "{dir} {dtype:?}: position {pos} batch {b}: {d}");
            }
        }
    }
}

fn decimation_case(name: &str) {
    let reference = json(&format!("decimation/{name}.json"));
    let model = load(reference["model"].as_str().unwrap());
    let cfg: DecimationConfig = serde_json::from_value(reference["config"].clone()).unwrap();
    let tail = reference["protected_tail"].as_u64().unwrap() as usize;
    let ids = ids_of(&reference["input_ids"]);
    let mut state = model.new_state(1);
    let opts = ForwardOptions {
        policy: Some(&cfg),
        protected_tail: tail,
        logits: LogitsSpan::All,
        record_indices: true,
        observer: None,
    };
    let (logits, trace) = model
        .forward_with_state(&tensor_ids(&ids), &mut state, &opts)
        .unwrap();
    for kept in reference["kept"].as_array().unwrap() {
        let layer = kept["layer"].as_u64().unwrap() as usize;
        let want: Vec<usize> = kept["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let t = &trace.layers[layer];
        assert_eq!(
            t.len_in,
            kept["len_in"].as_u64().unwrap() as usize,
            "{name}: layer {layer} input length"
        );
        let got = t.kept.clone().unwrap_or_else(|| (0..t.len_in).collect());
        assert_eq!(got, want, "{name}: kept indices of layer {layer}");
    }
    let d = max_diff(&logits.unwrap().values(), &floats(&reference["logits"]));
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    if let Some(decode) = reference.get("decode") {
        let new_ids = ids_of(&Value::Array(vec![decode["new_ids"].clone()]))[0].clone();
        let steps = decode["step_logits"].as_array().unwrap();
        for (id, want) in new_ids.iter().zip(steps) {
            let got: Vec<f32> = model.step(&[*id], &mut state).unwrap().values();
            let d = max_diff(&got, &floats(want));
            assert!(
                d < 1e-4,
                "{name}: decode step after decimated prefill differs by {d}"
            );
        }
    }
}

#[test]
fn decimation_one_layer() {
    decimation_case("one_layer");
}

#[test]
fn decimation_multi_layer_beta() {
    decimation_case("multi_layer");
}

#[test]
fn decimation_min_seq_len_binding() {
    decimation_case("min_binding");
}

#[test]
fn decimation_protected_tail_of_five() {
    decimation_case("tail_r5");
}

#[test]
fn decimation_sequence_shorter_than_budget() {
    decimation_case("short_seq");
}

#[test]
fn decimation_first_layer_and_last_layer() {
    decimation_case("layer0_only_tail");
}

#[test]
fn decimation_that_keeps_everything_is_exactly_vanilla() {
    let model = load("tiny-rms-hf");
    let ids = tensor_ids(&ids_of(&json("tiny-rms.logits.json")["input_ids"])[..1]);
    let vanilla: Vec<f32> = model.forward(&ids).unwrap().values();
    let cfg = DecimationConfig {
        decimating_layers: vec![0, 2],
        decimation_beta: 1.0,
        decimation_max_p_l_base: 1000,
        decimation_min_seq_len: 1,
        decimation_type: "max_p".into(),
    };
    let mut state = model.new_state(1);
    let opts = ForwardOptions {
        policy: Some(&cfg),
        ..Default::default()
    };
    let (logits, trace) = model.forward_with_state(&ids, &mut state, &opts).unwrap();
    assert_eq!(logits.unwrap().values(), vanilla);
    assert!(trace.layers.iter().all(|t| t.len_in == t.len_out));
}

#[test]
fn long_vanilla_prefill_in_chunks_equals_one_pass() {
    // Over 4096 tokens the CPU runs a vanilla prefill in 2048-token chunks; a decimation
    // that keeps every token takes the one-pass path, so the two must agree.
    let model = load("tiny-rms-hf");
    let len = 5000;
    let ids: Vec<u32> = (0..len).map(|i| ((i * 7919 + 13) % 89) as u32).collect();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
    let keep_all = DecimationConfig {
        decimating_layers: vec![0],
        decimation_beta: 1.0,
        decimation_max_p_l_base: 1_000_000,
        decimation_min_seq_len: 1,
        decimation_type: "max_p".into(),
    };
    for span in [LogitsSpan::All, LogitsSpan::Last(3000), LogitsSpan::Last(1)] {
        let run = |deci: Option<&DecimationConfig>| {
            let mut state = model.new_state(1);
            let opts = ForwardOptions {
                policy: deci.map(|c| c as &dyn decimamba::ContextPolicy),
                logits: span,
                ..Default::default()
            };
            let (logits, trace) = model.forward_with_state(&ids, &mut state, &opts).unwrap();
            assert!(trace
                .layers
                .iter()
                .all(|t| t.len_in == len && t.len_out == len));
            (logits.unwrap(), state)
        };
        let (chunked, s1) = run(None);
        let (one_pass, s2) = run(Some(&keep_all));
        assert_eq!(chunked.dims(), one_pass.dims());
        let d = max_diff(&chunked.values(), &one_pass.values());
        assert!(d < 1e-4, "{span:?}: {d}");
        // Decoding continues identically from both states.
        let (mut s1, mut s2) = (s1, s2);
        let a: Vec<f32> = model.step(&[5], &mut s1).unwrap().values();
        let b: Vec<f32> = model.step(&[5], &mut s2).unwrap().values();
        assert!(max_diff(&a, &b) < 1e-4);
    }
}

#[test]
fn chunked_layers_before_decimation_give_the_same_result() {
    // Layers before the first decimating one run in chunks on long CPU prefills; the
    // decimating layer must still see (and score) exactly the same sequence.
    let one_pass = load("tiny-rms-hf").with_prefill_chunk(None);
    let chunked = load("tiny-rms-hf").with_prefill_chunk(Some(700));
    let len = 3000;
    let ids: Vec<u32> = (0..len).map(|i| ((i * 104729 + 7) % 89) as u32).collect();
    let ids = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
    let cfg = DecimationConfig {
        decimating_layers: vec![2, 3],
        decimation_beta: 0.5,
        decimation_max_p_l_base: 400,
        decimation_min_seq_len: 10,
        decimation_type: "max_p".into(),
    };
    let run = |m: &MambaModel| {
        let mut state = m.new_state(1);
        let opts = ForwardOptions {
            policy: Some(&cfg),
            logits: LogitsSpan::All,
            record_indices: true,
            ..Default::default()
        };
        let (logits, trace) = m.forward_with_state(&ids, &mut state, &opts).unwrap();
        let next: Vec<f32> = m.step(&[3], &mut state).unwrap().values();
        (logits.unwrap().values(), trace, next)
    };
    let (a, ta, na) = run(&one_pass);
    let (b, tb, nb) = run(&chunked);
    assert_eq!(
        ta.layers
            .iter()
            .map(|t| (t.len_in, t.len_out))
            .collect::<Vec<_>>(),
        vec![(3000, 3000), (3000, 3000), (3000, 401), (401, 201)]
    );
    assert_eq!(ta.layers[2].kept, tb.layers[2].kept);
    assert_eq!(ta.layers[3].kept, tb.layers[3].kept);
    assert_eq!(tb.layers[0].len_in, 3000);
    assert!(max_diff(&a, &b) < 1e-4);
    assert!(max_diff(&na, &nb) < 1e-4);
}
