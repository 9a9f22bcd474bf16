//! The context-extension methods through the binary: `calibrate` (determinism, resume,
//! provenance), `--policy` and `--methods` side by side on the embedded model, and the
//! one-line errors of bad policy files and bad calibration input.

mod cli_support;
use cli_support::{assert_one_line_error, bin, fixture, run, stderr};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "command failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn excerpt() -> String {
    fixture("text/austen-excerpt.txt")
}

/// `calibrate` on the embedded model: MambaExtend at 2K on the Austen excerpt.
fn calibrate_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "calibrate",
        "--method",
        "mambaextend",
        "--length",
        "2k",
        "--windows",
        "2",
        "--pred-len",
        "50",
        "--iterations",
        "4",
        "--quiet",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--data".into());
    a.push(excerpt());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run_strings(args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&a)
}

#[test]
fn calibrate_is_deterministic_records_provenance_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.json");
    let stdout = ok(&run_strings(&calibrate_args(a.to_str().unwrap(), &[])));
    assert!(stdout.contains("mambaextend at 2K"), "{stdout}");
    let file = read_json(&a);
    assert_eq!(file["method"], "mambaextend");
    let scales = file["delta_scale"].as_array().unwrap();
    assert_eq!(scales.len(), 6, "one scale per layer of the embedded model");
    let p = &file["provenance"];
    assert_eq!(p["model"]["name"], "embedded:passkey-mamba");
    assert_eq!(
        p["calibration"]["settings"]["trace"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(p["calibration"]["settings"]["spsa"]["seed"], 0);
    assert_eq!(p["calibration"]["windows"].as_array().unwrap().len(), 2);
    let doc = &p["calibration"]["data"]["documents"][0];
    assert_eq!(doc["fnv1a64"].as_str().unwrap().len(), 16);
    assert!(
        !dir.path().join("a.json.state.json").exists(),
        "state removed when done"
    );

    // The same seed gives the same file (bar nothing); another seed other scales.
    let b = dir.path().join("b.json");
    ok(&run_strings(&calibrate_args(b.to_str().unwrap(), &[])));
    assert_eq!(read_json(&b), file);
    let c = dir.path().join("c.json");
    ok(&run_strings(&calibrate_args(
        c.to_str().unwrap(),
        &["--seed", "1"],
    )));
    assert_ne!(read_json(&c)["delta_scale"], file["delta_scale"]);

    // An existing result is not replaced by accident.
    assert_one_line_error(
        &run_strings(&calibrate_args(a.to_str().unwrap(), &[])),
        "already exists",
    );

    // Interrupted (SIGINT once the first iteration is saved), then resumed: the same result.
    let d = dir.path().join("d.json");
    let state = dir.path().join("d.json.state.json");
    let child = bin()
        .args(calibrate_args(d.to_str().unwrap(), &[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !state.exists() && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(state.exists(), "no state saved");
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    if !o.status.success() {
        // The interrupt handler's notice comes first; the error line is the last.
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        let last = err.trim().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error:") && last.contains("rerun the same command to resume"),
            "{err}"
        );
        assert!(state.exists() && !d.exists());
        let resumed = run_strings(&calibrate_args(d.to_str().unwrap(), &[]));
        ok(&resumed);
    }
    assert_eq!(read_json(&d), file, "a resumed calibration differs");
}

#[test]
fn calibrated_policies_run_side_by_side_and_refuse_their_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let me = dir.path().join("me.json");
    ok(&run_strings(&calibrate_args(me.to_str().unwrap(), &[])));
    let modulation = dir.path().join("mod.json");
    let mut a = calibrate_args(modulation.to_str().unwrap(), &[]);
    a[2] = "modulation".into();
    ok(&run_strings(&a));
    let lm = dir.path().join("lm.json");
    ok(&run(&[
        "calibrate",
        "--method",
        "longmamba",
        "--data",
        &excerpt(),
        "--length",
        "1k",
        "--windows",
        "4",
        "--lengths",
        "2k,4k",
        "--quiet",
        "--out",
        lm.to_str().unwrap(),
    ]));
    let lm_file = read_json(&lm);
    assert_eq!(lm_file["activate_from"], 1536);
    assert_eq!(lm_file["layers"].as_array().unwrap().len(), 6);
    assert_eq!(
        lm_file["layers"][0]["thresholds"].as_array().unwrap().len(),
        2
    );

    let methods = format!(
        "vanilla,decimamba,{},{},{}",
        me.display(),
        modulation.display(),
        lm.display()
    );
    // Passkey on the model's own haystack (not the calibration text).
    let pk = dir.path().join("pk");
    let stdout = ok(&run(&[
        "passkey",
        "--methods",
        &methods,
        "--lengths",
        "1k,2k",
        "--depths",
        "0.5",
        "--samples",
        "1",
        "--quiet",
        "--out",
        pk.to_str().unwrap(),
    ]));
    for name in [
        "vanilla",
        "decimamba",
        "mambaextend",
        "modulation",
        "longmamba",
    ] {
        assert!(
            stdout.contains(name),
            "{name} missing from the table: {stdout}"
        );
    }
    let summary = read_json(&pk.join("summary.json"));
    let names: Vec<&str> = summary["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "vanilla",
            "decimamba",
            "mambaextend",
            "modulation",
            "longmamba"
        ]
    );
    assert_eq!(summary["methods"][2]["policy"]["method"], "mambaextend");
    let lines = std::fs::read_to_string(pk.join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 5 * 2);

    // Perplexity on held-out text runs; on the calibration text it is refused.
    let ppl = dir.path().join("ppl");
    let stdout = ok(&run(&[
        "eval-ppl",
        "--methods",
        &methods,
        "--data",
        &fixture("text/wiki-excerpt.txt"),
        "--lengths",
        "2k",
        "--windows",
        "1",
        "--pred-len",
        "50",
        "--quiet",
        "--out",
        ppl.to_str().unwrap(),
    ]));
    assert!(stdout.contains("modulation"), "{stdout}");
    let jsonl = std::fs::read_to_string(ppl.join("results.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 5);
    let o = run(&[
        "eval-ppl",
        "--methods",
        &methods,
        "--data",
        &excerpt(),
        "--lengths",
        "2k",
        "--quiet",
        "--out",
        dir.path().join("leak").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "also in the evaluation data");
    let o = run(&[
        "passkey",
        "--policy",
        me.to_str().unwrap(),
        "--haystack",
        &excerpt(),
        "--lengths",
        "1k",
        "--quiet",
        "--out",
        dir.path().join("leak2").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "also in the evaluation data");

    // --policy on generate and bench.
    let o = ok(&run(&[
        "generate",
        "--policy",
        modulation.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "hello",
    ]));
    assert!(!o.is_empty());
    let json = dir.path().join("bench.json");
    ok(&run(&[
        "bench",
        "--policy",
        me.to_str().unwrap(),
        "--lengths",
        "512",
        "--decode",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]));
    let report = read_json(&json);
    assert_eq!(report["policy"]["method"], "mambaextend");
    assert!(
        report["prefill_policy"]["512"]["s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

#[test]
fn bad_policies_and_calibration_input_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let short = write(
        "short.json",
        r#"{"method": "mambaextend", "delta_scale": [1, 1]}"#,
    );
    let negative = write(
        "neg.json",
        r#"{"method": "modulation", "a_log_scale": [1, 1, -0.5, 1, 1, 1]}"#,
    );
    let zero = write(
        "zero.json",
        r#"{"method": "mambaextend", "delta_scale": [1, 0, 1, 1, 1, 1]}"#,
    );
    let channels = write(
        "ch.json",
        r#"{"method": "mambaextend", "delta_scale": [[1], [1], [1], [1], [1], [1]]}"#,
    );
    let unknown = write("unknown.json", r#"{"method": "lamb"}"#);
    let tiny_lm = {
        let raw = read_json(Path::new(&fixture(
            "reference/methods/longmamba_calibration.json",
        )));
        write("lm-tiny.json", &raw["policy"].to_string())
    };
    let gen = |policy: &str| {
        run(&[
            "generate",
            "--policy",
            policy,
            "--max-new-tokens",
            "1",
            "hi",
        ])
    };
    assert_one_line_error(&gen(&short), "has 2 entries but the model has 6 layers");
    assert_one_line_error(&gen(&negative), "a_log_scale[2] is -0.5");
    assert_one_line_error(&gen(&zero), "positive and finite");
    assert_one_line_error(&gen(&channels), "d_inner");
    assert_one_line_error(&gen(&unknown), "unknown policy method \"lamb\"");
    assert_one_line_error(
        &gen(&tiny_lm),
        "calibrated for a model with 4 layers and d_inner 64",
    );
    assert_one_line_error(&gen("nope"), "neither a preset");
    let o = run(&[
        "passkey",
        "--methods",
        &format!("vanilla,{short}"),
        "--lengths",
        "1k",
        "--quiet",
        "--out",
        dir.path().join("pk").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "has 2 entries");

    let out = dir.path().join("p.json");
    let out = out.to_str().unwrap();
    let text = excerpt();
    let cal = |extra: &[&str]| {
        let mut a = vec!["calibrate", "--data", &text, "--out", out, "--quiet"];
        a.extend_from_slice(extra);
        run(&a)
    };
    assert_one_line_error(
        &cal(&["--method", "mambaextend", "--length", "100k"]),
        "no calibration document has 102400 tokens",
    );
    assert_one_line_error(
        &cal(&[
            "--method",
            "modulation",
            "--length",
            "64",
            "--pred-len",
            "64",
        ]),
        "--pred-len",
    );
    assert_one_line_error(
        &cal(&[
            "--method",
            "longmamba",
            "--length",
            "1k",
            "--lengths",
            "512",
        ]),
        "not beyond the training length",
    );
    assert_one_line_error(
        &cal(&[
            "--method",
            "mambaextend",
            "--length",
            "1k",
            "--lengths",
            "4k",
        ]),
        "longmamba settings",
    );
    assert_one_line_error(
        &run(&[
            "calibrate",
            "--method",
            "mambaextend",
            "--length",
            "1k",
            "--data",
            &fixture("text/latin1.txt"),
            "--out",
            out,
        ]),
        "UTF-8",
    );
    let state = format!("{out}.state.json");
    std::fs::write(&state, "{not json").unwrap();
    assert_one_line_error(
        &cal(&[
            "--method",
            "mambaextend",
            "--length",
            "1k",
            "--windows",
            "1",
        ]),
        "is corrupt",
    );
    std::fs::write(
        &state,
        r#"{"key": {"other": 1}, "state": {"next_iteration": 1, "theta": [1,1,1,1,1,1], "trace": []}}"#,
    )
    .unwrap();
    assert_one_line_error(
        &cal(&[
            "--method",
            "mambaextend",
            "--length",
            "1k",
            "--windows",
            "1",
        ]),
        "belongs to a run with other settings",
    );
}
