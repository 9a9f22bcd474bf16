//! The receptive-field analyses and UPI against the independent numpy reference in
//! scripts/analysis_reference.py (fixtures in tests/fixtures/reference/analysis).

use candle_core::{DType, Device};
use decimamba::analysis::{analyze, AnalysisSettings, LayerReport};
use decimamba::loader::{files_from_dir, load_model};
use decimamba::model::MambaModel;
use decimamba::Policy;
use serde_json::Value;

mod common;
use common::{fixtures, floats, ids_of, json, max_diff, next_token_nll, Values};

fn tiny() -> MambaModel {
    let files = files_from_dir(&fixtures().join("models").join("tiny-rms-hf")).unwrap();
    load_model(&files, &Device::Cpu, DType::F32).unwrap()
}

fn settings(map_size: usize, train_len: usize) -> AnalysisSettings {
    AnalysisSettings {
        layers: vec![0, 1, 2, 3],
        train_len,
        map_size,
        map_channel_stride: decimamba::analysis::MAP_CHANNEL_STRIDE,
        channel_mmd: true,
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn assert_close(what: &str, got: &[f64], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - *w as f64).abs() / scale;
        assert!(
            d <= tol,
            "{what}[{i}]: {g} vs {w} (relative to max {d:.2e})"
        );
    }
}

fn check_scalars(r: &LayerReport, want: &Value, tol: f64) {
    let l = r.layer;
    let f = |k: &str| want[k].as_f64().unwrap();
    assert!(
        rel(r.mean_distance, f("mmd")) < tol,
        "layer {l}: mmd {} vs {}",
        r.mean_distance,
        f("mmd")
    );
    assert!(
        rel(r.delta_sum_mean, f("delta_sum_mean")) < tol,
        "layer {l}: ΣΔ {}",
        r.delta_sum_mean
    );
    assert_eq!(
        r.erf_90 as u64,
        want["erf_90"].as_u64().unwrap(),
        "layer {l}: erf_90"
    );
    assert!(
        (r.global_channel_share - f("global_channel_share")).abs() < 1e-9,
        "layer {l}: global share {}",
        r.global_channel_share
    );
}

#[test]
fn analyses_match_the_reference() {
    let model = tiny();
    let fx = json("analysis/analysis_tiny.json");
    let ids = ids_of(&fx["input_ids"]).remove(0);
    let reports = analyze(&model, &ids, &Policy::Vanilla, 1, &settings(64, 1024)).unwrap();
    let d_skip: Vec<Vec<f32>> = {
        let st = safetensors::SafeTensors::deserialize(
            &std::fs::read(fixtures().join("models/tiny-rms-hf/model.safetensors")).unwrap(),
        )
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect::<std::collections::HashMap<_, _>>()
        .into_iter()
        .collect::<Vec<_>>();
        (0..4)
            .map(|l| {
                let name = format!("backbone.layers.{l}.mixer.D");
                let bytes = &st.iter().find(|(n, _)| *n == name).unwrap().1;
                bytes
                    .chunks(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect()
    };
    for (r, want) in reports.iter().zip(fx["layers"].as_array().unwrap()) {
        let l = r.layer;
        check_scalars(r, want, 1e-5);
        let norms: Vec<f64> = r.delta_norm.iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("layer {l} delta_norm"),
            &norms,
            &floats(&want["delta_norm"]),
            1e-5,
        );
        assert_close(
            &format!("layer {l} last_row"),
            &r.last_row,
            &floats(&want["last_row"]),
            1e-5,
        );
        assert_close(
            &format!("layer {l} channel_mmd"),
            &r.channel_mmd,
            &floats(&want["channel_mmd"]),
            1e-5,
        );
        let map = r.map.as_ref().unwrap();
        assert_eq!(map.size, 64);
        let cells: Vec<f64> = map.values.iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("layer {l} map"),
            &cells,
            &floats(&want["map"]),
            1e-5,
        );
        // The hidden-attention identity at the last token: Σ_j α x + D x = the scan output.
        let x_last = floats(&want["x_last"]);
        let y: Vec<f64> = r
            .last_output
            .iter()
            .zip(&x_last)
            .zip(&d_skip[l])
            .map(|((o, x), d)| o + (*d as f64) * (*x as f64))
            .collect();
        assert_close(
            &format!("layer {l} y_last"),
            &y,
            &floats(&want["y_last"]),
            1e-5,
        );
    }
}

#[test]
fn analyses_against_length_match_the_reference() {
    let model = tiny();
    let fx = json("analysis/analysis_lengths.json");
    let ids = ids_of(&fx["input_ids"]).remove(0);
    for per in fx["per_length"].as_array().unwrap() {
        let len = per["length"].as_u64().unwrap() as usize;
        let reports =
            analyze(&model, &ids[..len], &Policy::Vanilla, 1, &settings(0, 1024)).unwrap();
        for (r, want) in reports.iter().zip(per["layers"].as_array().unwrap()) {
            check_scalars(r, want, 1e-5);
        }
    }
}

#[test]
fn chunked_and_downsampled_analyses_agree() {
    // A chunked CPU prefill hands the observer several views per layer; the results must
    // not change. A smaller map is the block maximum of the full one's rows.
    let fx = json("analysis/analysis_lengths.json");
    let ids = ids_of(&fx["input_ids"]).remove(0);
    let whole = analyze(
        &tiny().with_prefill_chunk(None),
        &ids,
        &Policy::Vanilla,
        1,
        &settings(128, 1024),
    )
    .unwrap();
    let chunked = analyze(
        &tiny().with_prefill_chunk(Some(16)),
        &ids,
        &Policy::Vanilla,
        1,
        &settings(32, 1024),
    )
    .unwrap();
    for (a, b) in whole.iter().zip(&chunked) {
        assert!(rel(a.mean_distance, b.mean_distance) < 1e-9);
        assert_eq!(a.erf_90, b.erf_90);
        let d = max_diff(
            &a.last_row.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            &b.last_row.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        );
        assert!(d < 1e-6, "{d}");
        // Cell (k, c) of the 32-map: max over columns 4c..4c+4 of full row 4k+3, rescaled.
        let (full, small) = (a.map.as_ref().unwrap(), b.map.as_ref().unwrap());
        assert_eq!((full.size, small.size), (128, 32));
        let mut expect = vec![0f32; 32 * 32];
        for k in 0..32 {
            for c in 0..32 {
                let i = 4 * k + 3;
                expect[k * 32 + c] = (4 * c..4 * c + 4)
                    .map(|j| full.values[i * 128 + j])
                    .fold(0.0, f32::max);
            }
        }
        let m = expect.iter().copied().fold(0.0, f32::max);
        expect.iter_mut().for_each(|v| *v /= m);
        assert!(max_diff(&expect, &small.values) < 1e-5);
    }
}

#[test]
fn decimated_layers_report_their_kept_tokens() {
    let model = tiny().with_prefill_chunk(Some(16));
    let fx = json("analysis/analysis_lengths.json");
    let ids = ids_of(&fx["input_ids"]).remove(0);
    let policy = Policy::from_json_str(
        r#"{"decimating_layers": [1], "decimation_beta": 0.5, "decimation_max_p_L_base": 40, "decimation_min_seq_len": 4}"#,
    )
    .unwrap();
    let r = analyze(&model, &ids, &policy, 1, &settings(16, 1024)).unwrap();
    assert_eq!(r[1].delta_norm.len(), 128, "layer 1 sees every token");
    assert_eq!(
        r[1].kept_rows.len(),
        41,
        "40 kept + the protected last token"
    );
    assert_eq!(r[1].tokens, 41);
    assert_eq!(r[2].positions.len(), 41);
    assert_eq!(
        r[2].positions, r[1].kept_rows,
        "layer 2's rows are layer 1's kept tokens"
    );
    assert_eq!(*r[2].positions.last().unwrap(), 127);
    // The kept tokens are those of largest ‖Δ_t‖₂ (the last one is protected).
    let mut order: Vec<usize> = (0..127).collect();
    order.sort_by(|&a, &b| {
        r[1].delta_norm[b]
            .total_cmp(&r[1].delta_norm[a])
            .then(a.cmp(&b))
    });
    let mut top: Vec<usize> = order[..40].to_vec();
    top.push(127);
    top.sort_unstable();
    assert_eq!(r[1].kept_rows, top);
}

#[test]
fn upi_calibration_and_inference_match_the_reference() {
    let model = tiny();
    let fx = json("analysis/upi_calibration.json");
    let mut mean = vec![vec![0f64; 64]; 4];
    let windows = ids_of(&fx["windows"]);
    for w in &windows {
        let reports = analyze(&model, w, &Policy::Vanilla, 1, &settings(0, 1024)).unwrap();
        for r in &reports {
            for (m, v) in mean[r.layer].iter_mut().zip(&r.channel_mmd) {
                *m += v / windows.len() as f64;
            }
        }
    }
    for l in 0..4 {
        let want = floats(&fx["channel_mmd"][l]);
        assert_close(&format!("layer {l} channel mmd"), &mean[l], &want, 1e-5);
        let got = decimamba::policy::upi::top_channels(&mean[l], 0.2);
        let want: Vec<usize> = fx["channels"][l]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got, want, "layer {l}: chosen channels");
    }
    for name in ["upi_inference", "upi_short"] {
        let case = common::method_case_in("analysis", name);
        let t =
            candle_core::Tensor::from_slice(&case.ids, (1, case.ids.len()), &Device::Cpu).unwrap();
        let mut state = model.new_state(1);
        let opts = decimamba::model::ForwardOptions {
            policy: case.policy.as_option(),
            ..Default::default()
        };
        let logits = model
            .forward_with_state(&t, &mut state, &opts)
            .unwrap()
            .0
            .unwrap()
            .values();
        let d = max_diff(&logits, &case.logits);
        assert!(d < 1e-4, "{name}: max |Δlogit| = {d}");
        let d = max_diff(&next_token_nll(&logits, &case.ids), &case.nll);
        assert!(d < 1e-4, "{name}: max |ΔNLL| = {d}");
    }
}
