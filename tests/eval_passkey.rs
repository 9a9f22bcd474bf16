//! Passkey evaluation with fake models: prompt exactness, the grid table, the
//! JSON files, the PNG heatmap, resumption and error messages.

mod eval_support;

use decimamba::eval::passkey::{
    files, run_passkey, Haystack, PasskeyJob, PasskeySample, PasskeySettings, PasskeyTemplate,
    PromptBuilder, FILLER,
};
use decimamba::eval::runlog::{RESULTS_JSONL, RUN_JSON};
use decimamba::eval::{EvalModel, Method, RunOptions};
use eval_support::{deci, fixture, read_json, read_jsonl, FakeModel};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn settings() -> PasskeySettings {
    PasskeySettings {
        lengths: vec![400, 800, 1600],
        depths: vec![0.0, 0.5, 1.0],
        samples: 2,
        seed: 7,
        max_new_tokens: 10,
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        stop: None,
        batch_size: 1,
        shard: None,
    }
}

fn run(
    model: &FakeModel,
    methods: &[Method],
    s: &PasskeySettings,
    out: &Path,
    opts: &RunOptions,
) -> anyhow::Result<decimamba::eval::passkey::PasskeyReport> {
    let t = PasskeyTemplate::authors();
    let h = Haystack::filler();
    run_passkey(&PasskeyJob {
        model,
        extra_workers: &[],
        template: &t,
        haystack: &h,
        settings: s,
        methods,
        out_dir: out,
        options: opts,
    })
}

#[test]
fn compare_run_writes_table_json_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Vanilla only finds needles within 500 tokens of the end.
    let model = FakeModel {
        vanilla_reach: Some(500),
        ..FakeModel::new()
    };
    let methods = Method::compare(deci());
    let s = settings();
    let report = run(&model, &methods, &s, &out, &quiet()).unwrap();
    assert!(report.complete);
    assert_eq!(report.samples.len(), 3 * 3 * 2 * 2);
    assert_eq!(model.calls.get(), 36);

    // DeciMamba always succeeds; vanilla fails when the needle is far from the end.
    for r in &report.samples {
        let far = r.length - r.needle_position > 500;
        assert_eq!(r.success, r.method == "decimamba" || !far, "{r:?}");
        assert!(r.key <= 99_999);
    }
    // Both methods saw identical prompts.
    for v in report.samples.iter().filter(|r| r.method == "vanilla") {
        let d = report
            .samples
            .iter()
            .find(|r| {
                r.method == "decimamba"
                    && r.length == v.length
                    && r.depth == v.depth
                    && r.sample == v.sample
            })
            .unwrap();
        assert_eq!((d.key, d.needle_position), (v.key, v.needle_position));
    }

    // The grid table: rows depth, columns length.
    let table = report.grid.table();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("vanilla: passkey success rate"),
        "{table}"
    );
    assert!(
        lines[1]
            .split_whitespace()
            .eq(["depth", "400", "800", "1600"]),
        "{table}"
    );
    // Depth 1.0 puts the needle at the end: vanilla succeeds everywhere.
    let row = lines.iter().find(|l| l.starts_with("1.00")).unwrap();
    assert!(
        row.split_whitespace().eq(["1.00", "1.00", "1.00", "1.00"]),
        "{table}"
    );
    // Depth 0 at 1600 tokens: vanilla fails.
    let row0 = lines.iter().find(|l| l.starts_with("0.00")).unwrap();
    assert_eq!(row0.split_whitespace().last(), Some("0.00"), "{table}");
    assert!(
        table.contains("decimamba: passkey success rate 1.00 (18/18)"),
        "{table}"
    );

    // Files.
    let jsonl = read_jsonl(&out.join(RESULTS_JSONL));
    assert_eq!(jsonl.len(), 36);
    for key in [
        "method",
        "length",
        "depth",
        "needle_position",
        "key",
        "output",
        "success",
        "prefill_secs",
        "kept_per_layer",
    ] {
        assert!(jsonl[0].get(key).is_some(), "missing {key}");
    }
    let results = read_json(&out.join(files::RESULTS_JSON));
    assert_eq!(results.as_array().unwrap().len(), 36);
    let back: Vec<PasskeySample> = serde_json::from_value(results).unwrap();
    assert_eq!(back, report.samples);
    let summary = read_json(&out.join(files::SUMMARY_JSON));
    assert_eq!(summary["eval"], "passkey");
    assert_eq!(summary["lengths"], serde_json::json!([400, 800, 1600]));
    let m = summary["methods"].as_array().unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(m[1]["method"], "decimamba");
    assert_eq!(m[1]["success"], 1.0);
    assert_eq!(m[1]["decimation"]["decimation_max_p_L_base"], 256);
    assert_eq!(m[0]["grid"].as_array().unwrap().len(), 3); // depths
    assert_eq!(m[0]["grid"][2], serde_json::json!([1.0, 1.0, 1.0]));
    let run_json = read_json(&out.join(RUN_JSON));
    assert_eq!(run_json["seed"], 7);

    // The heatmap: two panels side by side.
    let img = image::open(out.join(files::HEATMAP_PNG)).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        decimamba::eval::plot::heatmap_size(2)
    );
    assert_eq!((img.width(), img.height()), (1640, 520));
    // Both red and green cells were drawn.
    let rgb = img.to_rgb8();
    let has = |f: &dyn Fn(&image::Rgb<u8>) -> bool| rgb.pixels().any(f);
    assert!(has(&|p| p[0] > 200 && p[1] < 70 && p[2] < 60));
    assert!(has(&|p| p[0] < 40 && p[1] > 140 && p[2] < 100));
    // No temporary files are left.
    for e in std::fs::read_dir(&out).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with('.'), "left over {n}");
    }
}

#[test]
fn single_method_heatmap_has_one_panel() {
    let dir = tempfile::tempdir().unwrap();
    let model = FakeModel::new();
    let s = PasskeySettings {
        lengths: vec![300],
        depths: vec![0.5],
        samples: 1,
        ..settings()
    };
    let report = run(&model, &[Method::vanilla()], &s, dir.path(), &quiet()).unwrap();
    assert!(report.samples[0].success);
    assert!(report.samples[0].kept_per_layer.is_empty());
    let img = image::open(dir.path().join(files::HEATMAP_PNG)).unwrap();
    assert_eq!((img.width(), img.height()), (820, 520));
}

#[test]
fn resumes_after_a_failure_without_redoing_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let methods = Method::compare(deci());
    let s = settings();
    let failing = FakeModel {
        fail_after: Some(7),
        ..FakeModel::new()
    };
    let e = run(&failing, &methods, &s, &out, &quiet()).unwrap_err();
    assert!(format!("{e:#}").contains("fake model failure"), "{e:#}");
    assert_eq!(read_jsonl(&out.join(RESULTS_JSONL)).len(), 7);
    assert!(!out.join(files::SUMMARY_JSON).exists());

    let model = FakeModel::new();
    let report = run(&model, &methods, &s, &out, &quiet()).unwrap();
    assert!(report.complete);
    assert_eq!(report.resumed, 7);
    assert_eq!(model.calls.get(), 36 - 7);
    let lines = read_jsonl(&out.join(RESULTS_JSONL));
    assert_eq!(lines.len(), 36);
    let keys: HashSet<String> = lines
        .iter()
        .map(|l| {
            format!(
                "{}/{}/{}/{}",
                l["method"], l["length"], l["depth"], l["sample"]
            )
        })
        .collect();
    assert_eq!(keys.len(), 36, "a sample was redone");

    // The resumed run equals an uninterrupted one.
    let fresh_dir = dir.path().join("fresh");
    let fresh = run(&FakeModel::new(), &methods, &s, &fresh_dir, &quiet()).unwrap();
    let strip = |v: &[PasskeySample]| {
        v.iter()
            .map(|r| {
                (
                    r.method.clone(),
                    r.length,
                    r.key,
                    r.needle_position,
                    r.success,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&report.samples), strip(&fresh.samples));

    // A third run has nothing to do.
    let idle = FakeModel::new();
    run(&idle, &methods, &s, &out, &quiet()).unwrap();
    assert_eq!(idle.calls.get(), 0);
}

#[test]
fn interruption_flag_stops_and_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let model = FakeModel {
        stop_after: Some((5, flag.clone())),
        ..FakeModel::new()
    };
    let opts = RunOptions {
        quiet: true,
        stop: Some(flag),
        batch_size: 1,
        shard: None,
    };
    let s = settings();
    let methods = [Method::vanilla()];
    let report = run(&model, &methods, &s, dir.path(), &opts).unwrap();
    assert!(!report.complete);
    assert_eq!(report.samples.len(), 5);
    assert!(!dir.path().join(files::HEATMAP_PNG).exists());
    let again = FakeModel::new();
    let report = run(&again, &methods, &s, dir.path(), &quiet()).unwrap();
    assert!(report.complete);
    assert_eq!(again.calls.get(), 18 - 5);
}

#[test]
fn rerun_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings();
    run(
        &FakeModel::new(),
        &[Method::vanilla()],
        &s,
        dir.path(),
        &quiet(),
    )
    .unwrap();
    let other = PasskeySettings { seed: 8, ..s };
    let e = run(
        &FakeModel::new(),
        &[Method::vanilla()],
        &other,
        dir.path(),
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("different settings") && e.contains("seed: 7 → 8"),
        "{e}"
    );
    let e = run(
        &FakeModel::new(),
        &Method::compare(deci()),
        &settings(),
        dir.path(),
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("methods"), "{e}");
}

#[test]
fn lengths_shorter_than_the_template_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let s = PasskeySettings {
        lengths: vec![50, 1000],
        ..settings()
    };
    let model = FakeModel::new();
    let e = run(
        &model,
        &[Method::vanilla()],
        &s,
        &dir.path().join("x"),
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("length 50 is shorter than the template ("),
        "{e}"
    );
    assert!(e.ends_with(" tokens)"), "{e}");
    assert_eq!(model.calls.get(), 0);
    assert!(!dir.path().join("x").exists());
}

#[test]
fn seeds_change_keys_and_same_seed_repeats() {
    let t = PasskeyTemplate::authors();
    let h = Haystack::filler();
    let m = FakeModel::new();
    let mut b = PromptBuilder::new(&m, &t, &h).unwrap();
    use rand::SeedableRng;
    let mut r1 = rand::rngs::StdRng::seed_from_u64(1);
    let mut r2 = rand::rngs::StdRng::seed_from_u64(1);
    let mut r3 = rand::rngs::StdRng::seed_from_u64(2);
    let a = b.sample(700, 0.5, &mut r1).unwrap();
    let a2 = b.sample(700, 0.5, &mut r2).unwrap();
    let c = b.sample(700, 0.5, &mut r3).unwrap();
    assert_eq!(a, a2);
    assert_ne!(a.ids, c.ids);
}

/// A word-level fake tokenizer: one id per word (with its trailing space),
/// so sentences are several characters per token.
struct Words;
impl EvalModel for Words {
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(text
            .split_inclusive(' ')
            .map(|w| decimamba::eval::common::fnv1a64(w.as_bytes()) as u32 & 0xffff)
            .collect())
    }
    fn decode(&self, _: &[u32]) -> anyhow::Result<String> {
        Ok(String::new())
    }
    fn generate_greedy(
        &self,
        _: &[u32],
        _: usize,
        _: &decimamba::Policy,
    ) -> anyhow::Result<decimamba::eval::GreedyOutput> {
        unreachable!()
    }
    fn score_tail(
        &self,
        _: &[u32],
        _: usize,
        _: &decimamba::Policy,
    ) -> anyhow::Result<decimamba::eval::TailScore> {
        unreachable!()
    }
    fn name(&self) -> String {
        "words".into()
    }
}

#[test]
fn prompts_are_exact_with_a_multi_character_tokenizer() {
    let text = match fixture("austen-excerpt.txt") {
        Some(p) => std::fs::read_to_string(p).unwrap(),
        None => FILLER.repeat(20) + "Is it? Yes! It is.",
    };
    let h = Haystack::from_text("austen", &text).unwrap();
    let t = PasskeyTemplate::classic();
    let m = Words;
    let mut b = PromptBuilder::new(&m, &t, &h).unwrap();
    let prefix = m.encode(&t.prefix).unwrap();
    let suffix = m.encode(&t.suffix).unwrap();
    for len in [200usize, 1000, 3000] {
        for depth in [0.0, 0.33, 0.5, 0.9, 1.0] {
            let start = len % h.sentences().len();
            let p = b.build(len, depth, 31337, start).unwrap();
            assert_eq!(p.ids.len(), len);
            let needle = m.encode(&t.needle_for(31337)).unwrap();
            assert_eq!(&p.ids[..prefix.len()], &prefix[..]);
            assert_eq!(&p.ids[len - suffix.len()..], &suffix[..]);
            assert_eq!(
                &p.ids[p.needle_position..p.needle_position + needle.len()],
                &needle[..]
            );
            // The boundary is a sentence start (or the end), the nearest to depth × budget.
            let mut starts = vec![0usize];
            let mut off = 0;
            let mut i = start;
            while off < p.haystack_tokens {
                off += m
                    .encode(&h.sentences()[i % h.sentences().len()])
                    .unwrap()
                    .len();
                i += 1;
                if off < p.haystack_tokens {
                    starts.push(off);
                }
            }
            starts.push(p.haystack_tokens);
            assert!(starts.contains(&p.boundary));
            let target = depth * p.haystack_tokens as f64;
            let best = starts
                .iter()
                .map(|s| (*s as f64 - target).abs())
                .fold(f64::INFINITY, f64::min);
            assert!(((p.boundary as f64) - target).abs() <= best + 1e-9);
        }
    }
}

#[test]
fn haystacks_load_from_files_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.txt"), "Second file. Two.").unwrap();
    std::fs::write(dir.path().join("a.txt"), "First  file.\n\nOne!").unwrap();
    std::fs::write(dir.path().join("c.md"), "ignored.").unwrap();
    let h = Haystack::load(dir.path()).unwrap();
    assert_eq!(
        h.sentences(),
        ["First file. ", "One! ", "Second file. ", "Two. "]
    );
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("x.txt"), b"caf\xe9").unwrap();
    let e = Haystack::load(&bad).unwrap_err().to_string();
    assert!(e.contains("x.txt is not valid UTF-8"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(Haystack::load(&empty)
        .unwrap_err()
        .to_string()
        .contains("no .txt files"));
    if let Some(latin1) = fixture("latin1.txt") {
        assert!(Haystack::load(&latin1)
            .unwrap_err()
            .to_string()
            .contains("not valid UTF-8"));
    }
    // Choice order: --haystack, template's filler, model's, filler.
    let t = PasskeyTemplate::authors();
    assert_eq!(
        Haystack::choose(None, &t, Some("A. B.")).unwrap().source,
        "model"
    );
    assert_eq!(Haystack::choose(None, &t, None).unwrap().source, "filler");
    let c = PasskeyTemplate::classic();
    assert_eq!(
        Haystack::choose(None, &c, Some("A. B.")).unwrap().source,
        "filler"
    );
    assert_eq!(
        Haystack::choose(Some(&dir.path().join("a.txt")), &c, Some("A."))
            .unwrap()
            .sentences()
            .len(),
        2
    );
}

#[test]
fn template_files_and_unknown_templates() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    std::fs::write(
        &p,
        r#"{"name":"mine","prefix":"P\n","needle":"Key {key}. ","suffix":"\nA:","key_min":5,"key_max":5}"#,
    )
    .unwrap();
    let t = decimamba::eval::passkey::resolve_template(Some(p.to_str().unwrap()), None).unwrap();
    assert_eq!(t.name, "mine");
    assert_eq!(t.needle_for(5), "Key 5. ");
    let e = decimamba::eval::passkey::resolve_template(Some("bogus"), None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "unknown passkey template 'bogus': not a preset (authors, classic, model) nor a JSON file"
    );
}
