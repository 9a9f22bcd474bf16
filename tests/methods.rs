//! MambaExtend, Mamba Modulation and LongMamba against the independent numpy implementation
//! in scripts/method_reference.py (fixtures in tests/fixtures/reference/methods), and the
//! SPSA calibration loop's determinism, resumption and progress.

use candle_core::{DType, Device, Tensor};
use decimamba::calibrate::{LongMambaProgress, LongMambaSettings, ScaledMethod, SpsaRun};
use decimamba::loader::{files_from_dir, load_model};
use decimamba::model::{ForwardOptions, LogitsSpan, MambaModel};
use decimamba::policy::spsa::SpsaSettings;
use decimamba::policy::ScanObserver;
use decimamba::Policy;
use std::cell::RefCell;

mod common;
use common::{fixtures, ids_of, max_diff, method_case, next_token_nll, Values, METHOD_CASES};

const TOL: f32 = 1e-4;

fn tiny() -> MambaModel {
    let files = files_from_dir(&fixtures().join("models").join("tiny-rms-hf")).unwrap();
    load_model(&files, &Device::Cpu, DType::F32).unwrap()
}

fn logits_under(
    model: &MambaModel,
    ids: &[u32],
    policy: &Policy,
    observer: Option<&dyn ScanObserver>,
) -> Vec<f32> {
    common::policy_logits(model, ids, policy, observer)
}

#[test]
fn methods_match_the_reference_implementation() {
    let model = tiny();
    for name in METHOD_CASES {
        let case = method_case(name);
        let got = logits_under(&model, &case.ids, &case.policy, None);
        let d = max_diff(&got, &case.logits);
        assert!(d < TOL, "{name}: max |Δlogit| = {d}");
        let d = max_diff(&next_token_nll(&got, &case.ids), &case.nll);
        assert!(d < TOL, "{name}: max |ΔNLL| = {d}");
    }
}

#[test]
fn methods_are_the_same_when_the_prefill_runs_in_chunks() {
    // A chunk is planned at the whole input's length: LongMamba's Lt and activation
    // depend on it.
    let whole = tiny().with_prefill_chunk(None);
    let chunked = tiny().with_prefill_chunk(Some(16));
    for name in METHOD_CASES {
        let case = method_case(name);
        let a = logits_under(&whole, &case.ids, &case.policy, None);
        let b = logits_under(&chunked, &case.ids, &case.policy, None);
        let d = max_diff(&a, &b);
        assert!(d < 1e-5, "{name}: chunked vs one pass differ by {d}");
    }
}

#[test]
fn methods_differ_from_vanilla() {
    // Each fixture policy must change the logits well beyond the tolerance, or the
    // comparisons above prove little
    // (LongMamba below its activation length is the exception, and must not change them).
    let model = tiny();
    for name in METHOD_CASES {
        let case = method_case(name);
        let vanilla = logits_under(&model, &case.ids, &Policy::Vanilla, None);
        let d = max_diff(&vanilla, &case.logits);
        match *name {
            "longmamba_short" => assert!(d < TOL, "{name} should be vanilla, differs by {d}"),
            _ => assert!(d > 10.0 * TOL, "{name} is too close to vanilla ({d})"),
        }
    }
}

#[test]
fn longmamba_zeroes_the_reference_entries() {
    let model = tiny();
    let case = method_case("longmamba_inference");
    let counter = common::ZeroCounter(RefCell::new(vec![0; 4]));
    logits_under(&model, &case.ids, &case.policy, Some(&counter));
    assert_eq!(counter.0.into_inner(), common::zeroed_counts(&case));
}

#[test]
fn longmamba_calibration_matches_the_reference() {
    let model = tiny();
    let raw = common::json("methods/longmamba_calibration.json");
    let want = match Policy::from_json(raw["policy"].clone()).unwrap() {
        Policy::LongMamba(p) => p,
        other => panic!("not longmamba: {other:?}"),
    };
    let settings = LongMambaSettings {
        train_len: raw["train_len"].as_u64().unwrap() as usize,
        lengths: want.lengths.clone(),
        clamp_fraction: raw["clamp_fraction"].as_f64().unwrap(),
        global_threshold: raw["global_threshold"].as_f64().unwrap() as f32,
        activate_from: want.activate_from,
    };
    let mut progress = LongMambaProgress::default();
    for w in ids_of(&raw["windows"]) {
        progress.add(decimamba::calibrate::longmamba_window(&model, &w, &settings).unwrap());
    }
    let got = decimamba::calibrate::longmamba_policy(&model, &settings, &progress);
    let rel = |a: f32, b: f32| (a - b).abs() / b.abs().max(1e-6);
    for (l, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        for (c, (a, b)) in g.decay.iter().zip(&w.decay).enumerate() {
            assert!(
                rel(*a, *b) < 1e-4,
                "layer {l} channel {c}: decay {a} vs {b}"
            );
        }
        for (li, (ga, wa)) in g.thresholds.iter().zip(&w.thresholds).enumerate() {
            for (c, (a, b)) in ga.iter().zip(wa).enumerate() {
                assert!(
                    rel(*a, *b) < 1e-4,
                    "layer {l} length {li} channel {c}: threshold {a} vs {b}"
                );
            }
        }
        let globals: Vec<u64> = raw["global_channels"][l]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let mine: Vec<u64> = got.global_channels(l).iter().map(|&c| c as u64).collect();
        assert_eq!(mine, globals, "layer {l}: global channels");
    }
    // The fitted policy then runs as the reference's does.
    let case = method_case("longmamba_inference");
    let fitted = logits_under(&model, &case.ids, &Policy::LongMamba(got), None);
    let d = max_diff(&fitted, &case.logits);
    assert!(d < TOL, "fitted longmamba: max |Δlogit| = {d}");
}

/// Mean next-token NLL of a few fixture inputs under `policy`: a small calibration objective.
fn objective(model: &MambaModel, inputs: &[Vec<u32>], policy: &Policy) -> f64 {
    let mut total = 0.0;
    for ids in inputs {
        let nll = next_token_nll(&logits_under(model, ids, policy, None), ids);
        total += nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
    }
    total / inputs.len() as f64
}

fn spsa_inputs() -> Vec<Vec<u32>> {
    METHOD_CASES
        .iter()
        .map(|n| method_case(n).ids)
        .take(3)
        .collect()
}

fn spsa_run(state_path: &std::path::Path, iterations: usize) -> SpsaRun<'_> {
    SpsaRun {
        method: ScaledMethod::MambaExtend,
        settings: SpsaSettings {
            iterations,
            step: 0.05,
            ..SpsaSettings::mambaextend(7)
        },
        n_layer: 4,
        key: serde_json::json!({"test": "spsa"}),
        state_path,
    }
}

#[test]
fn spsa_lowers_the_objective_deterministically_and_resumes() {
    let model = tiny();
    let inputs = spsa_inputs();
    let dir = tempfile::tempdir().unwrap();
    let mut f = |p: &Policy| Ok(objective(&model, &inputs, p));

    // One uninterrupted run of 12 iterations.
    let path_a = dir.path().join("a.state.json");
    let run = spsa_run(&path_a, 12);
    let (mut state_a, resumed) = run.load_state().unwrap();
    assert!(!resumed);
    let start = objective(
        &model,
        &inputs,
        &ScaledMethod::MambaExtend.policy(&state_a.theta),
    );
    run.run(&mut state_a, &mut f, &mut |_| {}).unwrap();
    let end = objective(
        &model,
        &inputs,
        &ScaledMethod::MambaExtend.policy(&state_a.theta),
    );
    assert!(
        end < start,
        "SPSA did not lower the objective: {start} → {end}"
    );

    // The same run interrupted after 5 iterations (the objective fails in the 6th)
    // resumes from its saved state and ends where the uninterrupted one did.
    let path_b = dir.path().join("b.state.json");
    let run_b = spsa_run(&path_b, 12);
    let (mut state_b, _) = run_b.load_state().unwrap();
    let mut calls = 0;
    let mut failing = |p: &Policy| {
        calls += 1;
        match calls {
            c if c > 10 => anyhow::bail!("interrupted"),
            _ => Ok(objective(&model, &inputs, p)),
        }
    };
    assert!(run_b.run(&mut state_b, &mut failing, &mut |_| {}).is_err());
    let (mut resumed_state, resumed) = run_b.load_state().unwrap();
    assert!(resumed);
    assert_eq!(resumed_state.next_iteration, 5);
    assert_eq!(resumed_state.trace[..], state_a.trace[..5]);
    run_b.run(&mut resumed_state, &mut f, &mut |_| {}).unwrap();
    assert_eq!(
        resumed_state, state_a,
        "resumed run differs from the uninterrupted one"
    );

    // A saved state of another run is refused, not silently continued.
    let other = SpsaRun {
        key: serde_json::json!({"test": "other"}),
        ..spsa_run(&path_b, 12)
    };
    let e = other.load_state().unwrap_err().to_string();
    assert!(e.contains("belongs to a run with other settings"), "{e}");
}

/// Logits `[batch, len, vocab]` of `rows` run together, and then greedy decode steps.
fn batched(
    model: &MambaModel,
    rows: &[Vec<u32>],
    policy: &Policy,
    steps: usize,
) -> (Vec<f32>, Vec<Vec<u32>>) {
    let (b, len) = (rows.len(), rows[0].len());
    let t = Tensor::from_vec(rows.concat(), (b, len), &Device::Cpu).unwrap();
    let mut state = model.new_state(b);
    let opts = ForwardOptions {
        policy: policy.as_option(),
        protected_tail: 3,
        logits: LogitsSpan::All,
        ..Default::default()
    };
    let logits = model
        .forward_with_state(&t, &mut state, &opts)
        .unwrap()
        .0
        .unwrap();
    let (_, out_len, _) = logits.dims3().unwrap();
    let mut next = MambaModel::argmax_last(&logits.narrow(1, out_len - 1, 1).unwrap()).unwrap();
    let mut generated = vec![Vec::new(); b];
    for _ in 0..steps {
        for (g, &n) in generated.iter_mut().zip(&next) {
            g.push(n);
        }
        let l = model.step(&next, &mut state).unwrap();
        next = MambaModel::argmax_last(&l.unsqueeze(1).unwrap()).unwrap();
    }
    (logits.values(), generated)
}

#[test]
fn a_batch_equals_its_rows_one_by_one_under_every_policy() {
    let mut policies: Vec<(String, Policy)> = METHOD_CASES
        .iter()
        .map(|n| (n.to_string(), method_case(n).policy))
        .collect();
    policies.push(("vanilla".into(), Policy::Vanilla));
    policies.push((
        "decimamba".into(),
        Policy::from_json_str(
            r#"{"decimating_layers": [1, 2], "decimation_beta": 0.5, "decimation_max_p_L_base": 30, "decimation_min_seq_len": 4}"#,
        )
        .unwrap(),
    ));
    let inputs: Vec<Vec<u32>> = ["longmamba_inference", "mambaextend_layer", "modulation"]
        .iter()
        .map(|n| {
            let ids = method_case(n).ids;
            ids.iter().cycle().take(100).copied().collect()
        })
        .collect();
    for chunk in [None, Some(16)] {
        let model = tiny().with_prefill_chunk(chunk);
        for (name, policy) in &policies {
            let (together, gen_together) = batched(&model, &inputs, policy, 4);
            let per_row = together.len() / inputs.len();
            for (r, row) in inputs.iter().enumerate() {
                let (alone, gen_alone) = batched(&model, std::slice::from_ref(row), policy, 4);
                let d = max_diff(&together[r * per_row..(r + 1) * per_row], &alone);
                assert!(
                    d < 1e-5,
                    "{name}, chunk {chunk:?}, row {r}: batch differs by {d}"
                );
                assert_eq!(
                    gen_together[r], gen_alone[0],
                    "{name}, row {r}: decode differs"
                );
            }
        }
    }
}

#[test]
fn batched_generation_equals_generating_each_prompt_alone_under_every_policy() {
    use decimamba::generation::{generate, generate_batch, GenerateParams};
    let mut policies: Vec<(String, Policy)> = METHOD_CASES
        .iter()
        .map(|n| (n.to_string(), method_case(n).policy))
        .collect();
    policies.push(("vanilla".into(), Policy::Vanilla));
    policies.push((
        "decimamba".into(),
        Policy::from_json_str(
            r#"{"decimating_layers": [1, 2], "decimation_beta": 0.5, "decimation_max_p_L_base": 30, "decimation_min_seq_len": 4}"#,
        )
        .unwrap(),
    ));
    let prompts: Vec<Vec<u32>> = ["longmamba_inference", "mambaextend_layer", "modulation"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let ids = method_case(n).ids;
            ids.iter().cycle().skip(i).take(90).copied().collect()
        })
        .collect();
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let model = tiny();
    // Greedy, and sampling with a repetition penalty: each row keeps its own sampler.
    let greedy = GenerateParams {
        max_new_tokens: 6,
        ..GenerateParams::greedy()
    };
    let sampled = GenerateParams {
        temperature: 0.9,
        top_k: Some(20),
        repeat_penalty: 1.3,
        seed: 7,
        ..greedy.clone()
    };
    // An EOS the model emits stops some rows early while the others go on.
    let alone_first = generate(&model, rows[0], &greedy, None, None, |_| Ok(())).unwrap();
    let eos = Some(alone_first.tokens[2]);
    for (name, policy) in &policies {
        for (params, eos) in [(&greedy, None), (&sampled, None), (&greedy, eos)] {
            let together = generate_batch(&model, &rows, params, policy.as_option(), eos).unwrap();
            for (r, row) in rows.iter().enumerate() {
                let alone =
                    generate(&model, row, params, policy.as_option(), eos, |_| Ok(())).unwrap();
                assert_eq!(
                    together[r].tokens, alone.tokens,
                    "{name}, row {r}, temperature {}, eos {eos:?}",
                    params.temperature
                );
                assert_eq!(together[r].stopped_at_eos, alone.stopped_at_eos);
                assert_eq!(together[r].decode_steps, alone.decode_steps);
            }
        }
    }
    let e = generate_batch(
        &model,
        &[&prompts[0][..10], &prompts[1][..11]],
        &greedy,
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("share one length"), "{e}");
}
