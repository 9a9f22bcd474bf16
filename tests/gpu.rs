//! The CUDA path against the CPU path and the transformers / reference fixtures.
//!
//! Built only with `--features cuda`; run on a GPU machine by scripts/gpu-check.sh.
//! Without a CUDA device every test fails (loudly) rather than skipping.
//!
//! Bounds: f32 logits within 1e-3 of the CPU's and of the fixtures; bf16 logits within
//! 0.1 (absolute, logits O(1)) of the f32 reference, the bound the CPU's own bf16 test
//! uses (bf16 keeps 8 mantissa bits; CPU and cuBLAS bf16 GEMMs round differently).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use decimamba::bench::random_model;
use decimamba::loader::{files_from_dir, load_model};
use decimamba::model::{ForwardOptions, InferenceState, LogitsSpan, MambaConfig, MambaModel};
use decimamba::DecimationConfig;
use serde_json::Value;

mod common;
use common::{fixtures, floats, ids_of, json, max_diff, Values};

const F32_TOL: f32 = 1e-3;
const BF16_TOL: f32 = 0.1;

/// The fixtures the decode tests continue: RMSNorm, a dt_rank of its own (the residual kept
/// in the model dtype) and LayerNorm, each with its logits file.
const DECODE_FIXTURES: [(&str, &str); 3] = [
    ("tiny-rms-hf", "tiny-rms.logits.json"),
    ("tiny-dtrank-hf", "tiny-dtrank.logits.json"),
    ("tiny-layernorm-orig", "tiny-layernorm.logits.json"),
];

fn cuda() -> Device {
    Device::new_cuda(0).expect(
        "no usable CUDA device: tests/gpu.rs needs one (run scripts/gpu-check.sh on a GPU \
         machine with the CUDA 13 libraries on LD_LIBRARY_PATH)",
    )
}

fn load(dir: &str, device: &Device, dtype: DType) -> MambaModel {
    let files = files_from_dir(&fixtures().join("models").join(dir)).unwrap();
    load_model(&files, device, dtype).unwrap()
}

fn tensor_ids(rows: &[Vec<u32>], device: &Device) -> Tensor {
    let flat: Vec<u32> = rows.concat();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), device).unwrap()
}

/// Prefills the first `prompt` ids of each row (chunked, as generation does), then decodes
/// `steps` tokens, feeding row r's id (prompt + i) mod len at step i; the logits of each step.
fn prefill_then_step(
    model: &MambaModel,
    gpu: &Device,
    rows: &[Vec<u32>],
    prompt: usize,
    steps: usize,
) -> Vec<Vec<f32>> {
    let head: Vec<Vec<u32>> = rows.iter().map(|r| r[..prompt].to_vec()).collect();
    let mut state = model.new_state(rows.len());
    model
        .prefill_chunked(&tensor_ids(&head, gpu), prompt, &mut state)
        .unwrap();
    (0..steps)
        .map(|i| {
            let step_ids: Vec<u32> = rows.iter().map(|r| r[(prompt + i) % r.len()]).collect();
            model.step(&step_ids, &mut state).unwrap().values()
        })
        .collect()
}

/// `batch` rows of 40 token ids spread over the vocabulary, a different row per sequence.
fn spread_rows(batch: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..40)
                .map(|i| ((i * 7919 + 13 * b + 1) % 50_000) as u32)
                .collect()
        })
        .collect()
}

/// Asserts that two runs of decode steps gave the same logits, bit for bit.
fn assert_same_bits(what: &str, a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len(), "{what}: step counts differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(x) == bits(y),
            "{what}: step {i} differs by {}",
            max_diff(x, y)
        );
    }
}

const FIXTURES: &[(&str, &str)] = &[
    ("tiny-rms-hf", "tiny-rms.logits.json"),
    ("tiny-rms-orig", "tiny-rms.logits.json"),
    ("tiny-dtrank-hf", "tiny-dtrank.logits.json"),
    ("tiny-dtrank-orig", "tiny-dtrank-orig.logits.json"),
    ("tiny-layernorm-orig", "tiny-layernorm.logits.json"),
];

#[test]
fn fixture_logits_match_cpu_and_reference() {
    let gpu = cuda();
    for &(dir, fixture) in FIXTURES {
        let reference = json(fixture);
        let ids = ids_of(&reference["input_ids"]);
        let want = floats(&reference["logits"]);
        let cpu = load(dir, &Device::Cpu, DType::F32)
            .forward(&tensor_ids(&ids, &Device::Cpu))
            .unwrap()
            .values();
        let got = load(dir, &gpu, DType::F32)
            .forward(&tensor_ids(&ids, &gpu))
            .unwrap()
            .values();
        let (d_cpu, d_ref) = (max_diff(&got, &cpu), max_diff(&got, &want));
        println!("{dir} f32: max |cuda - cpu| = {d_cpu:.3e}, |cuda - reference| = {d_ref:.3e}");
        assert!(
            d_cpu < F32_TOL && d_ref < F32_TOL,
            "{dir}: {d_cpu} / {d_ref}"
        );
        let got16 = load(dir, &gpu, DType::BF16)
            .forward(&tensor_ids(&ids, &gpu))
            .unwrap()
            .values();
        let d16 = max_diff(&got16, &want);
        println!("{dir} bf16: max |cuda bf16 - reference f32| = {d16:.3e}");
        assert!(d16 < BF16_TOL, "{dir} bf16: {d16}");
    }
}

#[test]
fn prefill_then_decode_matches_reference() {
    let gpu = cuda();
    for (dir, fixture) in [
        ("tiny-rms-hf", "tiny-rms.logits.json"),
        ("tiny-dtrank-orig", "tiny-dtrank-orig.logits.json"),
        ("tiny-layernorm-orig", "tiny-layernorm.logits.json"),
    ] {
        let model = load(dir, &gpu, DType::F32);
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
            .forward_with_state(&tensor_ids(&head, &gpu), &mut state, &opts)
            .unwrap();
        let mut worst = 0f32;
        let mut check = |pos: usize, got: Vec<f32>| {
            for b in 0..batch {
                let w = &want[(b * len + pos) * vocab..(b * len + pos + 1) * vocab];
                let d = max_diff(&got[b * vocab..(b + 1) * vocab], w);
                worst = worst.max(d);
                assert!(d < F32_TOL, "{dir}: position {pos} batch {b}: {d}");
            }
        };
        check(prompt - 1, logits.unwrap().values());
        for pos in prompt..len {
            let step_ids: Vec<u32> = ids.iter().map(|r| r[pos]).collect();
            check(pos, model.step(&step_ids, &mut state).unwrap().values());
        }
        println!(
            "{dir}: prefill {prompt} + {} decode steps, max diff {worst:.3e}",
            len - prompt
        );
    }
}

/// The fused decode step in bf16 and f16 (batch 2, and the residual kept in the model
/// dtype for tiny-dtrank-hf) continues a prefill as the full forward does: each step's
/// logits are within the half-precision bound of the full forward's at that position.
#[test]
fn half_precision_decode_matches_full_forward() {
    let gpu = cuda();
    for dtype in [DType::BF16, DType::F16] {
        for (dir, fixture) in DECODE_FIXTURES {
            let model = load(dir, &gpu, dtype);
            let ids = ids_of(&json(fixture)["input_ids"]);
            let (batch, len) = (ids.len(), ids[0].len());
            let full = model.forward(&tensor_ids(&ids, &gpu)).unwrap().values();
            let vocab = full.len() / (batch * len);
            let prompt = 5;
            let steps = prefill_then_step(&model, &gpu, &ids, prompt, len - prompt);
            let mut worst = 0f32;
            for (pos, got) in (prompt..len).zip(steps) {
                for b in 0..batch {
                    let w = &full[(b * len + pos) * vocab..(b * len + pos + 1) * vocab];
                    let d = max_diff(&got[b * vocab..(b + 1) * vocab], w);
                    worst = worst.max(d);
                    assert!(
                        d < BF16_TOL,
                        "{dir} {dtype:?}: position {pos} batch {b}: {d}"
                    );
                }
            }
            println!("{dir} {dtype:?}: fused decode vs full forward, max diff {worst:.3e}");
        }
    }
}

/// A batch wider than the fused decode step takes goes through the general path; both
/// paths give the same logits.
#[test]
fn wide_batch_decode_uses_the_general_path_and_agrees() {
    let gpu = cuda();
    let model = load("tiny-rms-hf", &gpu, DType::F32);
    let ids = ids_of(&json("tiny-rms.logits.json")["input_ids"]);
    let wide: Vec<Vec<u32>> = (0..9).map(|i| ids[i % ids.len()].clone()).collect();
    let prompt = 6;
    let run = |rows: &[Vec<u32>]| prefill_then_step(&model, &gpu, rows, prompt, 4);
    let (narrow, wide) = (run(&ids), run(&wide));
    for (a, b) in narrow.iter().zip(&wide) {
        let d = max_diff(a, &b[..a.len()]);
        assert!(d < 1e-5, "fused vs general decode: {d}");
    }
}

/// The decode step's L2 weight prefetches are hints: the logits stay bit-identical with
/// and without them, for leads shorter than a layer, longer than the model, and between,
/// on the fixtures (f32, bf16, f16) and a random 130m model at batch 1 and 3.
#[test]
fn decode_prefetch_leaves_the_logits_bit_identical() {
    let gpu = cuda();
    let run = |model: &MambaModel, rows: &[Vec<u32>], prompt: usize, steps: usize, mib: f64| {
        decimamba::model::set_decode_prefetch_mib(Some(mib));
        let out = prefill_then_step(model, &gpu, rows, prompt, steps);
        decimamba::model::set_decode_prefetch_mib(None);
        out
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (dir, fixture) in DECODE_FIXTURES {
            let model = load(dir, &gpu, dtype);
            let ids = ids_of(&json(fixture)["input_ids"]);
            let base = run(&model, &ids, 4, 6, 0.0);
            for mib in [0.001, 0.05, 64.0] {
                let got = run(&model, &ids, 4, 6, mib);
                assert_same_bits(&format!("{dir} {dtype:?}, lead {mib} MiB"), &got, &base);
            }
        }
    }
    let cfg = MambaConfig::of_shape("130m").unwrap();
    let model = random_model(&cfg, DType::BF16, &gpu, 0).unwrap();
    for batch in [1usize, 3] {
        let rows = spread_rows(batch);
        let base = run(&model, &rows, 24, 16, 0.0);
        for mib in [3.0, 24.0, 1024.0] {
            let got = run(&model, &rows, 24, 16, mib);
            assert_same_bits(&format!("130m batch {batch}, lead {mib} MiB"), &got, &base);
        }
    }
}

/// The persistent decode step (one cooperative launch per token) computes exactly what the
/// per-stage kernels do: the same rows, the same order of sums, so bit-identical logits
/// over many steps, for every norm, dtype and batch width the fused step takes.
#[test]
fn persistent_decode_is_bit_identical_to_the_per_stage_kernels() {
    let gpu = cuda();
    let run = |model: &MambaModel, rows: &[Vec<u32>], prompt: usize, steps: usize, on: bool| {
        decimamba::model::set_persistent_decode(Some(on));
        let out = prefill_then_step(model, &gpu, rows, prompt, steps);
        decimamba::model::set_persistent_decode(None);
        out
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (dir, fixture) in DECODE_FIXTURES {
            let model = load(dir, &gpu, dtype);
            let ids = ids_of(&json(fixture)["input_ids"]);
            let (a, b) = (
                run(&model, &ids, 4, 6, true),
                run(&model, &ids, 4, 6, false),
            );
            assert_same_bits(&format!("{dir} {dtype:?}"), &a, &b);
        }
    }
    let cfg = MambaConfig::of_shape("130m").unwrap();
    for dtype in [DType::BF16, DType::F32] {
        let model = random_model(&cfg, dtype, &gpu, 0).unwrap();
        for batch in [1usize, 3] {
            let rows = spread_rows(batch);
            let (a, b) = (
                run(&model, &rows, 24, 16, true),
                run(&model, &rows, 24, 16, false),
            );
            assert_same_bits(&format!("130m {dtype:?} batch {batch}"), &a, &b);
        }
    }
}

/// A cloned state is independent: decoding from the clone leaves the original as it was.
#[test]
fn cloned_device_state_is_independent() {
    let gpu = cuda();
    let model = load("tiny-rms-hf", &gpu, DType::F32);
    let ids = ids_of(&json("tiny-rms.logits.json")["input_ids"]);
    let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..8].to_vec()).collect();
    let mut state = model.new_state(2);
    model
        .prefill_chunked(&tensor_ids(&head, &gpu), 8, &mut state)
        .unwrap();
    let mut fork = state.clone();
    model.step(&[1, 2], &mut fork).unwrap();
    model.step(&[3, 4], &mut fork).unwrap();
    let a = model.step(&[5, 6], &mut state).unwrap().values();
    let mut again = model.new_state(2);
    model
        .prefill_chunked(&tensor_ids(&head, &gpu), 8, &mut again)
        .unwrap();
    let b = model.step(&[5, 6], &mut again).unwrap().values();
    assert!(
        max_diff(&a, &b) < 1e-6,
        "the clone's steps changed the original state"
    );
}

#[test]
fn chunked_prefill_on_gpu_equals_one_shot() {
    let gpu = cuda();
    let model = load("tiny-rms-hf", &gpu, DType::F32);
    let ids = tensor_ids(&ids_of(&json("tiny-rms.logits.json")["input_ids"]), &gpu);
    let full = model.forward(&ids).unwrap();
    let last_full = full.narrow(1, 19, 1).unwrap().values();
    for chunk in [1, 3, 8, 64] {
        let mut state = model.new_state(2);
        let last = model.prefill_chunked(&ids, chunk, &mut state).unwrap();
        let d = max_diff(&last.values(), &last_full);
        assert!(d < 1e-5, "chunk {chunk}: {d}");
    }
}

fn decimation_case(name: &str) {
    let gpu = cuda();
    let reference = json(&format!("decimation/{name}.json"));
    let model = load(reference["model"].as_str().unwrap(), &gpu, DType::F32);
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
        .forward_with_state(&tensor_ids(&ids, &gpu), &mut state, &opts)
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
        assert_eq!(t.len_in, kept["len_in"].as_u64().unwrap() as usize);
        let got = t.kept.clone().unwrap_or_else(|| (0..t.len_in).collect());
        assert_eq!(got, want, "{name}: kept indices of layer {layer}");
    }
    let d = max_diff(&logits.unwrap().values(), &floats(&reference["logits"]));
    println!("decimation {name}: kept indices identical, logits max diff {d:.3e}");
    assert!(d < F32_TOL, "{name}: logits differ by {d}");
    if let Some(decode) = reference.get("decode") {
        let new_ids = ids_of(&Value::Array(vec![decode["new_ids"].clone()]))[0].clone();
        let steps = decode["step_logits"].as_array().unwrap();
        for (id, want) in new_ids.iter().zip(steps) {
            let got = model.step(&[*id], &mut state).unwrap().values();
            let d = max_diff(&got, &floats(want));
            assert!(d < F32_TOL, "{name}: decode after decimated prefill: {d}");
        }
    }
}

#[test]
fn decimation_fixtures() {
    for name in common::DECIMATION_CASES {
        decimation_case(name);
    }
}

fn last_logits(
    model: &MambaModel,
    ids: &[u32],
    cfg: Option<&DecimationConfig>,
) -> (Vec<f32>, Vec<Option<Vec<usize>>>, InferenceState) {
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device()).unwrap();
    let mut state = model.new_state(1);
    let opts = ForwardOptions {
        policy: cfg.map(|c| c as &dyn decimamba::ContextPolicy),
        protected_tail: 1,
        logits: LogitsSpan::Last(1),
        record_indices: true,
        observer: None,
    };
    let (logits, trace) = model.forward_with_state(&t, &mut state, &opts).unwrap();
    let kept = trace.layers.into_iter().map(|l| l.kept).collect();
    (logits.unwrap().values(), kept, state)
}

/// The 130m shape (d_inner 1536, 24 layers) with random weights at 3,000 tokens: long
/// enough that the scan is cut into several time chunks on the GPU.
#[test]
fn random_130m_shape_long_prompt_cpu_vs_cuda() {
    let gpu = cuda();
    let cfg = MambaConfig::of_shape("130m").unwrap();
    let cpu_model = random_model(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
    let gpu_model = random_model(&cfg, DType::F32, &gpu, 0).unwrap();
    let len = 3000;
    let ids: Vec<u32> = (0..len)
        .map(|i| ((i * 7919 + 13) % 50_000) as u32)
        .collect();
    let scale = |v: &[f32]| v.iter().fold(1f32, |m, x| m.max(x.abs()));

    let (cpu, _, mut cpu_state) = last_logits(&cpu_model, &ids, None);
    let (got, _, mut gpu_state) = last_logits(&gpu_model, &ids, None);
    let d = max_diff(&got, &cpu);
    println!(
        "130m shape, {len} tokens f32: max |cuda - cpu| = {d:.3e} (logit scale {:.3})",
        scale(&cpu)
    );
    assert!(d < F32_TOL * scale(&cpu), "vanilla: {d}");
    // Decode steps continue from the GPU-resident state.
    let mut next = [17u32];
    for i in 0..8 {
        let a = cpu_model.step(&next, &mut cpu_state).unwrap().values();
        let b = gpu_model.step(&next, &mut gpu_state).unwrap().values();
        let d = max_diff(&a, &b);
        assert!(d < F32_TOL * scale(&a), "decode step {i}: {d}");
        next = [(i * 101 + 5) as u32];
    }

    let dcfg = DecimationConfig {
        decimating_layers: vec![12],
        decimation_beta: 1.0,
        decimation_max_p_l_base: 1000,
        decimation_min_seq_len: 20,
        decimation_type: "max_p".into(),
    };
    let (cpu, cpu_kept, _) = last_logits(&cpu_model, &ids, Some(&dcfg));
    let (got, gpu_kept, _) = last_logits(&gpu_model, &ids, Some(&dcfg));
    let (a, b) = (cpu_kept[12].clone().unwrap(), gpu_kept[12].clone().unwrap());
    let differ = a.iter().filter(|i| b.binary_search(i).is_err()).count();
    println!(
        "130m shape decimated at layer 12: kept {} tokens, {differ} differ from the CPU's",
        b.len()
    );
    assert_eq!(a, b, "kept indices differ");
    let d = max_diff(&got, &cpu);
    println!("130m shape decimated, f32: max |cuda - cpu| = {d:.3e}");
    assert!(d < F32_TOL * scale(&cpu), "decimated: {d}");
}

/// The GPU's top-K choice (radix select + ordered compaction) is exactly the CPU's
/// `select_by_scores`, ties to the earlier position included: distinct scores, a few
/// levels (many ties), all equal, zeros, and 200K-token rows.
#[test]
fn gpu_top_k_is_the_cpu_choice() {
    use decimamba::decimation::select_by_scores;
    use decimamba::model::select_top_k_on_device;
    let gpu = cuda();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    for (len, levels) in [
        (50, 0),
        (3000, 7),
        (3000, 1),
        (4097, 0),
        (200_000, 0),
        (200_000, 100),
    ] {
        let scores: Vec<f32> = (0..len)
            .map(|_| match levels {
                0 => uniform() * 3.0,
                1 => 0.0,
                l => (uniform() * l as f32).floor() / l as f32,
            })
            .collect();
        for (tail, keep) in [(1, len / 3), (5, 1), (1, len - 2), (1, 2000.min(len / 2))] {
            let candidates = len - tail;
            let want = select_by_scores(&scores, keep, tail).expect("a real selection");
            let got = select_top_k_on_device(&scores, candidates, keep, &gpu).unwrap();
            assert_eq!(
                got, want,
                "len {len}, levels {levels}, keep {keep}, tail {tail}"
            );
        }
    }
}

/// MambaExtend, Modulation and LongMamba on the GPU: the numpy reference's logits and
/// NLL within 1e-4, as on the CPU (the plan's Δ scale, Δ filter and A are fused into the
/// scan kernel).
#[test]
fn method_fixtures_match_the_reference_on_gpu() {
    let model = load("tiny-rms-hf", &cuda(), DType::F32);
    for name in common::METHOD_CASES {
        let case = common::method_case(name);
        let got = common::policy_logits(&model, &case.ids, &case.policy, None);
        let d = max_diff(&got, &case.logits);
        assert!(d < 1e-4, "{name} on CUDA: max |Δlogit| = {d}");
        let d = max_diff(&common::next_token_nll(&got, &case.ids), &case.nll);
        assert!(d < 1e-4, "{name} on CUDA: max |ΔNLL| = {d}");
    }
}

/// The observer sees on the GPU what it sees on the CPU: LongMamba's zeroed Δ entries, and
/// the Δ statistics its calibration reads.
#[test]
fn observer_on_gpu_sees_the_cpu_values() {
    let gpu = load("tiny-rms-hf", &cuda(), DType::F32);
    let case = common::method_case("longmamba_inference");
    let zeros = common::ZeroCounter(std::cell::RefCell::new(vec![0; 4]));
    common::policy_logits(&gpu, &case.ids, &case.policy, Some(&zeros));
    assert_eq!(zeros.0.into_inner(), common::zeroed_counts(&case));

    let cpu = load("tiny-rms-hf", &Device::Cpu, DType::F32);
    let settings = decimamba::calibrate::LongMambaSettings {
        train_len: 40,
        lengths: vec![64, 128],
        clamp_fraction: 0.15,
        global_threshold: 0.05,
        activate_from: 60,
    };
    let window = &case.ids[..40];
    let a = decimamba::calibrate::longmamba_window(&cpu, window, &settings).unwrap();
    let b = decimamba::calibrate::longmamba_window(&gpu, window, &settings).unwrap();
    for (l, (x, y)) in a.iter().zip(&b).enumerate() {
        for (p, q) in x.decay.iter().zip(&y.decay) {
            assert!(
                (p - q).abs() <= 1e-4 * p.abs().max(1e-6),
                "layer {l}: decay {p} vs {q}"
            );
        }
    }
}

/// The analyses read through the observer on CUDA match the numpy reference as on the CPU,
/// and UPI's logits too.
#[test]
fn analyses_and_upi_on_gpu_match_the_reference() {
    let gpu = load("tiny-rms-hf", &cuda(), DType::F32);
    let fx = json("analysis/analysis_tiny.json");
    let ids = ids_of(&fx["input_ids"]).remove(0);
    let settings = decimamba::analysis::AnalysisSettings {
        layers: vec![0, 1, 2, 3],
        train_len: 1024,
        map_size: 64,
        map_channel_stride: decimamba::analysis::MAP_CHANNEL_STRIDE,
        channel_mmd: true,
    };
    let reports =
        decimamba::analysis::analyze(&gpu, &ids, &decimamba::Policy::Vanilla, 1, &settings)
            .unwrap();
    for (r, want) in reports.iter().zip(fx["layers"].as_array().unwrap()) {
        let f = |k: &str| want[k].as_f64().unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
        assert!(
            rel(r.mean_distance, f("mmd")) < 1e-5,
            "layer {}: mmd",
            r.layer
        );
        assert!(
            rel(r.delta_sum_mean, f("delta_sum_mean")) < 1e-5,
            "layer {}: ΣΔ",
            r.layer
        );
        assert_eq!(r.erf_90 as u64, want["erf_90"].as_u64().unwrap());
        assert!((r.global_channel_share - f("global_channel_share")).abs() < 1e-9);
        let got: Vec<f32> = r.last_row.iter().map(|&v| v as f32).collect();
        let w = floats(&want["last_row"]);
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_diff(&got, &w) / scale < 1e-5,
            "layer {}: last row",
            r.layer
        );
    }
    for name in ["upi_inference", "upi_short"] {
        let case = common::method_case_in("analysis", name);
        let got = common::policy_logits(&gpu, &case.ids, &case.policy, None);
        let d = max_diff(&got, &case.logits);
        assert!(d < 1e-4, "{name} on CUDA: max |Δlogit| = {d}");
    }
}

/// A batch on CUDA equals its rows run one by one on CUDA, for a token-dropping policy
/// (each row keeps its own tokens) and the per-channel ones.
#[test]
fn batched_policies_on_gpu_equal_batch_one() {
    let gpu = load("tiny-rms-hf", &cuda(), DType::F32);
    let deci = decimamba::Policy::from_json_str(
        r#"{"decimating_layers": [1, 2], "decimation_beta": 0.5, "decimation_max_p_L_base": 30, "decimation_min_seq_len": 4}"#,
    )
    .unwrap();
    let rows: Vec<Vec<u32>> = ["longmamba_inference", "mambaextend_layer", "modulation"]
        .iter()
        .map(|n| {
            common::method_case(n)
                .ids
                .iter()
                .cycle()
                .take(100)
                .copied()
                .collect()
        })
        .collect();
    let run = |rows: &[Vec<u32>], policy: &decimamba::Policy| -> Vec<f32> {
        let t = tensor_ids(rows, gpu.device());
        let mut state = gpu.new_state(rows.len());
        let opts = ForwardOptions {
            policy: policy.as_option(),
            protected_tail: 3,
            logits: LogitsSpan::All,
            ..Default::default()
        };
        gpu.forward_with_state(&t, &mut state, &opts)
            .unwrap()
            .0
            .unwrap()
            .values()
    };
    for name in [
        "decimamba",
        "longmamba_inference",
        "mambaextend_channel",
        "modulation",
    ] {
        let policy = match name {
            "decimamba" => deci.clone(),
            n => common::method_case(n).policy,
        };
        let together = run(&rows, &policy);
        let per_row = together.len() / rows.len();
        for (r, row) in rows.iter().enumerate() {
            let alone = run(std::slice::from_ref(row), &policy);
            let d = max_diff(&together[r * per_row..(r + 1) * per_row], &alone);
            assert!(d < 1e-5, "{name}, row {r}: batch differs on CUDA by {d}");
        }
    }
}

/// Batched greedy generation on CUDA (prefill and decode) equals each prompt alone on CUDA,
/// and in bf16 at the 130m shape's width too.
#[test]
fn batched_generation_on_gpu_equals_one_prompt_at_a_time() {
    use decimamba::generation::{generate, generate_batch, GenerateParams};
    let deci = decimamba::Policy::from_json_str(
        r#"{"decimating_layers": [1, 2], "decimation_beta": 0.5, "decimation_max_p_L_base": 30, "decimation_min_seq_len": 4}"#,
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = ["longmamba_inference", "mambaextend_layer", "modulation"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            common::method_case(n)
                .ids
                .iter()
                .cycle()
                .skip(i)
                .take(90)
                .copied()
                .collect()
        })
        .collect();
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let params = GenerateParams {
        max_new_tokens: 8,
        ..GenerateParams::greedy()
    };
    let gpu = load("tiny-rms-hf", &cuda(), DType::F32);
    for (name, policy) in [
        ("vanilla", decimamba::Policy::Vanilla),
        ("decimamba", deci.clone()),
        (
            "longmamba",
            common::method_case("longmamba_inference").policy,
        ),
        (
            "mambaextend",
            common::method_case("mambaextend_channel").policy,
        ),
        ("modulation", common::method_case("modulation").policy),
    ] {
        let together = generate_batch(&gpu, &rows, &params, policy.as_option(), None).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let alone = generate(&gpu, row, &params, policy.as_option(), None, |_| Ok(())).unwrap();
            assert_eq!(together[r].tokens, alone.tokens, "{name}, row {r} on CUDA");
        }
    }
    // The 130m shape (f32): a batch's last logits equal each row's alone, within GEMM
    // rounding (cuBLAS may pick other kernels for other batch sizes).
    let cfg = MambaConfig::of_shape("130m").unwrap();
    let big = random_model(&cfg, DType::F32, &cuda(), 0).unwrap();
    let long: Vec<Vec<u32>> = (0..3)
        .map(|r| decimamba::bench::random_ids(2048, cfg.vocab_size, 100 + r))
        .collect();
    let deci_130m = decimamba::Policy::from_json_str(
        r#"{"decimating_layers": [12], "decimation_beta": 0.5, "decimation_max_p_L_base": 1000, "decimation_min_seq_len": 20}"#,
    )
    .unwrap();
    let last = |rows: &[Vec<u32>], policy: &decimamba::Policy| -> Vec<f32> {
        let t = tensor_ids(rows, big.device());
        let mut state = big.new_state(rows.len());
        let opts = ForwardOptions {
            policy: policy.as_option(),
            protected_tail: 1,
            logits: LogitsSpan::Last(1),
            ..Default::default()
        };
        big.forward_with_state(&t, &mut state, &opts)
            .unwrap()
            .0
            .unwrap()
            .values()
    };
    for policy in [decimamba::Policy::Vanilla, deci_130m] {
        let together = last(&long, &policy);
        let per_row = together.len() / long.len();
        for (r, row) in long.iter().enumerate() {
            let alone = last(std::slice::from_ref(row), &policy);
            let d = max_diff(&together[r * per_row..(r + 1) * per_row], &alone);
            assert!(
                d < 1e-3,
                "130m {}, row {r}: batch differs by {d}",
                policy.name()
            );
        }
    }
}

/// `--backend candle --device cuda`: the Candle-ops backend on the GPU against the CUDA
/// kernels, on every fixture, every policy, decimation indices, decode and a batch.
#[test]
fn candle_ops_backend_on_gpu_matches_the_cuda_kernels() {
    use decimamba::model::{Backend, BackendChoice};
    let gpu = cuda();
    let generic_of = |m: MambaModel| m.with_backend(BackendChoice::Candle).unwrap();
    for &(dir, fixture) in FIXTURES {
        let fused = load(dir, &gpu, DType::F32);
        let generic = generic_of(fused.clone());
        assert_eq!(generic.backend(), Backend::CandleOps);
        let ids = ids_of(&json(fixture)["input_ids"]);
        let t = tensor_ids(&ids, &gpu);
        let d = max_diff(
            &generic.forward(&t).unwrap().values(),
            &fused.forward(&t).unwrap().values(),
        );
        println!("candle-ops on CUDA, {dir}: logits within {d:.3e} of the kernels");
        assert!(d < F32_TOL, "{dir}: {d}");
        // Decode steps from the same prefill.
        let (mut sg, mut sf) = (generic.new_state(ids.len()), fused.new_state(ids.len()));
        let head: Vec<Vec<u32>> = ids.iter().map(|r| r[..5].to_vec()).collect();
        let opts = ForwardOptions::default();
        generic
            .forward_with_state(&tensor_ids(&head, &gpu), &mut sg, &opts)
            .unwrap();
        fused
            .forward_with_state(&tensor_ids(&head, &gpu), &mut sf, &opts)
            .unwrap();
        for pos in 5..ids[0].len() {
            let step: Vec<u32> = ids.iter().map(|r| r[pos]).collect();
            let d = max_diff(
                &generic.step(&step, &mut sg).unwrap().values(),
                &fused.step(&step, &mut sf).unwrap().values(),
            );
            assert!(d < F32_TOL, "{dir}: decode at {pos}: {d}");
        }
    }
    for name in common::DECIMATION_CASES {
        let reference = json(&format!("decimation/{name}.json"));
        let fused = load(reference["model"].as_str().unwrap(), &gpu, DType::F32);
        let generic = generic_of(fused.clone());
        let cfg: DecimationConfig = serde_json::from_value(reference["config"].clone()).unwrap();
        let tail = reference["protected_tail"].as_u64().unwrap() as usize;
        let ids = tensor_ids(&ids_of(&reference["input_ids"]), &gpu);
        let opts = ForwardOptions {
            policy: Some(&cfg),
            protected_tail: tail,
            logits: LogitsSpan::All,
            record_indices: true,
            observer: None,
        };
        let run = |m: &MambaModel| {
            let mut state = m.new_state(1);
            let (logits, trace) = m.forward_with_state(&ids, &mut state, &opts).unwrap();
            let kept: Vec<_> = trace.layers.iter().map(|l| l.kept.clone()).collect();
            (logits.unwrap().values(), kept)
        };
        let ((lg, kg), (lf, kf)) = (run(&generic), run(&fused));
        assert_eq!(kg, kf, "{name}: kept indices differ");
        let d = max_diff(&lg, &lf);
        assert!(d < F32_TOL, "{name}: logits differ by {d}");
    }
    let fused = load("tiny-rms-hf", &gpu, DType::F32);
    let generic = generic_of(fused.clone());
    for name in common::METHOD_CASES {
        let case = common::method_case(name);
        let g = common::policy_logits(&generic, &case.ids, &case.policy, None);
        let d = max_diff(
            &g,
            &common::policy_logits(&fused, &case.ids, &case.policy, None),
        );
        assert!(
            d < F32_TOL,
            "{name}: candle-ops vs kernels on CUDA differ by {d}"
        );
    }
}

/// The Candle-ops top-K at a long length on the GPU: a random 130m-shape model decimating
/// 16K tokens to 2K keeps (nearly) the tokens the CUDA kernels keep, and its logits agree.
#[test]
fn candle_ops_backend_decimates_a_long_prompt_like_the_kernels() {
    use decimamba::model::BackendChoice;
    let cfg = MambaConfig::of_shape("130m").unwrap();
    let fused = random_model(&cfg, DType::F32, &cuda(), 0).unwrap();
    let generic = fused.clone().with_backend(BackendChoice::Candle).unwrap();
    let ids = decimamba::bench::random_ids(16_384, 50_000, 3);
    let deci = DecimationConfig {
        decimating_layers: vec![12],
        decimation_beta: 0.5,
        decimation_max_p_l_base: 2000,
        decimation_min_seq_len: 20,
        decimation_type: "max_p".into(),
    };
    let (lg, kg, _) = last_logits(&generic, &ids, Some(&deci));
    let (lf, kf, _) = last_logits(&fused, &ids, Some(&deci));
    let (kg, kf) = (kg[12].clone().unwrap(), kf[12].clone().unwrap());
    assert_eq!(kg.len(), kf.len());
    let same = kg.iter().filter(|i| kf.binary_search(i).is_ok()).count();
    println!(
        "candle-ops on CUDA, 16K decimated: {same}/{} kept tokens shared, logits within {:.3e}",
        kf.len(),
        max_diff(&lg, &lf)
    );
    // Scores summed in another order may swap a near-tie at the budget's edge.
    assert!(same + 2 >= kf.len(), "only {same} of {} shared", kf.len());
    if same == kf.len() {
        assert!(max_diff(&lg, &lf) < 1e-2);
    }
}
