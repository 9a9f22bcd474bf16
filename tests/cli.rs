//! End-to-end runs of the `decimamba` binary: generation, the hub cache path, the
//! tokenizer, and one-line errors for bad input.

mod cli_support;
use cli_support::*;

use std::path::Path;
use std::process::Output;

#[test]
fn generate_streams_text_and_json_agrees() {
    let model = fixture("models/tiny-rms-hf");
    let tok = char_tokenizer();
    let base = [
        "generate",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "-n",
        "12",
        "the pass key is",
    ];
    let text = run(&base);
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(
        stderr(&text).contains("prefill: 15 tokens"),
        "{}",
        stderr(&text)
    );
    let mut json_args = base.to_vec();
    json_args.push("--json");
    let j = run(&json_args);
    assert!(j.status.success(), "{}", stderr(&j));
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 15);
    assert_eq!(v["generated_tokens"], 12);
    // Greedy: the streamed text equals the JSON text.
    assert_eq!(
        String::from_utf8_lossy(&text.stdout).trim_end_matches('\n'),
        v["text"].as_str().unwrap()
    );
}

#[test]
fn chunked_prefill_generates_the_same_tokens() {
    let model = fixture("models/tiny-rms-hf");
    let tok = char_tokenizer();
    let prompt = "the pass key is 123. remember it. ".repeat(4);
    let tokens = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            model.as_str(),
            "--tokenizer",
            tok.as_str(),
            "-n",
            "8",
            "--json",
        ];
        a.extend_from_slice(extra);
        a.push(&prompt);
        let o = run(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(tokens(&[]), tokens(&["--prefill-chunk", "7"]));
    let o = run(&[
        "generate",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "--prefill-chunk",
        "7",
        "--deci-layers",
        "1",
        "x",
    ]);
    assert_one_line_error(&o, "chunked prefill cannot decimate");
}

#[test]
fn generate_reads_prompt_file_and_stdin() {
    let model = fixture("models/tiny-rms-orig");
    let tok = char_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("prompt.txt");
    std::fs::write(&p, "the sky is").unwrap();
    let o = run(&[
        "generate",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "-n",
        "3",
        "--prompt-file",
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut child = bin()
        .args([
            "generate",
            "--model",
            &model,
            "--tokenizer",
            &tok,
            "-n",
            "3",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"the sky is")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 10);
}

#[test]
fn decimation_report_and_kept_indices() {
    let model = fixture("models/tiny-rms-hf");
    let tok = char_tokenizer();
    let prompt = "the pass key is 123. remember it. ".repeat(3);
    let o = run(&[
        "generate",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "-n",
        "2",
        "--json",
        "--decimation-report",
        "--kept-indices",
        "--deci-layers",
        "1",
        "--deci-lbase",
        "20",
        "--deci-min-len",
        "4",
        &prompt,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    assert_eq!(layers[0]["len_out"], 102);
    assert_eq!(layers[1]["len_in"], 102);
    assert_eq!(
        layers[1]["len_out"], 21,
        "20 kept + the protected last token"
    );
    assert_eq!(layers[3]["len_out"], 21);
    let kept = layers[1]["kept"].as_array().unwrap();
    assert_eq!(kept.len(), 21);
    assert_eq!(kept.last().unwrap(), 101);
    assert!(stderr(&o).contains("decimating (s=0)"), "{}", stderr(&o));
}

/// Lays out a real hf-hub cache (models--ORG--NAME/{refs,snapshots,blobs}) and resolves a
/// repo id from it offline, by branch and by commit hash.
#[test]
fn hub_repo_id_resolves_from_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--test-org--tiny-mamba");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    // Like huggingface_hub: blobs hold the bytes, snapshots link to them.
    for (name, src) in [
        ("config.json", fixture("models/tiny-rms-hf/config.json")),
        (
            "model.safetensors",
            fixture("models/tiny-rms-hf/model.safetensors"),
        ),
        ("tokenizer.json", char_tokenizer()),
    ] {
        let blob = repo.join("blobs").join(format!("blob-{name}"));
        std::fs::copy(&src, &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(format!("blob-{name}")),
            snap.join(name),
        )
        .unwrap();
    }
    let gen = |rev: &str| {
        bin()
            .env("HF_HOME", home.path())
            .args([
                "generate",
                "--model",
                "test-org/tiny-mamba",
                "--revision",
                rev,
                "-n",
                "4",
                "--json",
                "the sky",
            ])
            .output()
            .unwrap()
    };
    let by_branch = gen("main");
    assert!(by_branch.status.success(), "{}", stderr(&by_branch));
    let by_commit = gen(commit);
    assert!(by_commit.status.success(), "{}", stderr(&by_commit));
    let tokens = |o: &Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(tokens(&by_branch), tokens(&by_commit));
    assert_eq!(tokens(&by_branch).as_array().unwrap().len(), 4);
    let missing = bin()
        .env("HF_HOME", home.path())
        .args(["generate", "--model", "test-org/not-there", "-n", "1", "x"])
        .output()
        .unwrap();
    assert_one_line_error(&missing, "not in the hub cache");
    let missing_rev = gen("v9");
    assert_one_line_error(&missing_rev, "HF_HUB_OFFLINE");
}

#[test]
fn builtin_neox_tokenizer_round_trips() {
    let tok = decimamba::loader::neox_tokenizer().unwrap();
    assert_eq!(tok.get_vocab_size(true), 50277);
    let ids = tok.encode("Hello, I am", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![12092, 13, 309, 717]);
    let text = "DeciMamba keeps the tokens with the largest Δ.\n  Indented — and ünïcödé!";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn missing_model_directory() {
    let o = run(&["generate", "--model", "/nonexistent/dir/model", "x"]);
    assert_one_line_error(&o, "neither an existing directory nor a hub repo id");
    let empty = tempfile::tempdir().unwrap();
    let o = run(&["generate", "--model", empty.path().to_str().unwrap(), "x"]);
    assert_one_line_error(&o, "no config.json");
}

fn copy_model(src: &str, dst: &Path) {
    for e in std::fs::read_dir(fixture(&format!("models/{src}"))).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn corrupt_checkpoints() {
    let tok = char_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-rms-hf", dir.path());
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let d = dir.path().to_str().unwrap();
    assert_one_line_error(
        &run(&["generate", "--model", d, "--tokenizer", &tok, "x"]),
        "truncated",
    );
    std::fs::write(&st, b"not a checkpoint at all").unwrap();
    assert_one_line_error(
        &run(&["generate", "--model", d, "--tokenizer", &tok, "x"]),
        "corrupt",
    );

    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-rms-orig", dir.path());
    std::fs::write(dir.path().join("pytorch_model.bin"), b"PK\x03\x04garbage").unwrap();
    let d = dir.path().to_str().unwrap();
    assert_one_line_error(
        &run(&["generate", "--model", d, "--tokenizer", &tok, "x"]),
        "cannot read checkpoint",
    );
}

#[test]
fn config_that_does_not_match_the_weights() {
    let tok = char_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    copy_model("tiny-rms-hf", dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["state_size"] = 8.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let d = dir.path().to_str().unwrap();
    let o = run(&["generate", "--model", d, "--tokenizer", &tok, "x"]);
    assert_one_line_error(&o, "config implies");
    assert!(
        stderr(&o).contains("backbone.layers.0.mixer."),
        "{}",
        stderr(&o)
    );
    cfg["state_size"] = 16.into();
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_one_line_error(
        &run(&["generate", "--model", d, "--tokenizer", &tok, "x"]),
        "more layers than the config",
    );
    std::fs::write(&cfg_path, "{\"hidden_size\": 32").unwrap();
    assert_one_line_error(
        &run(&["generate", "--model", d, "--tokenizer", &tok, "x"]),
        "not valid JSON",
    );
}

#[test]
fn bad_options_are_one_line_errors() {
    let model = fixture("models/tiny-rms-hf");
    let tok = char_tokenizer();
    let g = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            model.as_str(),
            "--tokenizer",
            tok.as_str(),
            "-n",
            "2",
        ];
        a.extend_from_slice(extra);
        a.push("the sky");
        run(&a)
    };
    assert_one_line_error(
        &g(&["--deci-layers", "9"]),
        "decimating layer 9 does not exist",
    );
    assert_one_line_error(&g(&["--deci-layers", "1,1"]), "listed twice");
    assert_one_line_error(
        &g(&["--deci-layers", "1", "--deci-beta", "0"]),
        "beta must be in (0, 1]",
    );
    assert_one_line_error(
        &g(&["--deci-layers", "1", "--deci-lbase", "0"]),
        "L_base must be at least 1",
    );
    assert_one_line_error(
        &g(&["--deci-layers", "1", "--deci-min-len", "0"]),
        "min_seq_len must be at least 1",
    );
    assert_one_line_error(&g(&["--decimation", "nope"]), "neither a preset");
    assert_one_line_error(
        &g(&["--decimation", "passkey"]),
        "decimating layer 12 does not exist",
    );
    assert_one_line_error(
        &g(&["--no-decimation", "--deci-layers", "1"]),
        "cannot be combined",
    );
    assert_one_line_error(&g(&["--device", "tpu"]), "unknown device");
    if !cfg!(feature = "cuda") {
        assert_one_line_error(&g(&["--device", "cuda"]), "without the `cuda` feature");
    }
    assert_one_line_error(&g(&["--dtype", "f8"]), "unknown dtype");
    assert_one_line_error(&g(&["--temperature=-1"]), "temperature");
    // The NeoX tokenizer cannot drive a 96-token model.
    let o = run(&["generate", "--model", &model, "-n", "1", "x"]);
    assert_one_line_error(&o, "wrong tokenizer");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("latin1.txt");
    std::fs::write(&p, b"caf\xe9").unwrap();
    let o = run(&[
        "generate",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "--prompt-file",
        p.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "not valid UTF-8");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let o = run(&[
        "generate",
        "--model",
        &model,
        "--tokenizer",
        &tok,
        "--prompt-file",
        empty.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "prompt is empty");
}

#[test]
fn bench_runs_on_a_checkpoint_and_writes_json() {
    let model = fixture("models/tiny-rms-hf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let o = run(&[
        "bench",
        "--model",
        &model,
        "--tokenizer",
        &char_tokenizer(),
        "--lengths",
        "64,128",
        "--decode",
        "4",
        "--deci-layers",
        "1",
        "--deci-lbase",
        "16",
        "--deci-min-len",
        "4",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["impl"], "decimamba");
    assert!(v["prefill"]["128"]["tok_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["prefill_decimated"]["128"]["kept_per_layer"][0], 17);
    assert_eq!(v["decode"]["new_tokens"], 4);
}
