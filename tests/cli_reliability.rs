//! Runs that cannot silently mix results, output errors that are errors, feasibility
//! guards and bounded flags, through the binary (issue: reliability).

mod cli_support;
use cli_support::*;

use std::fs::File;
use std::path::Path;
use std::process::Output;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "command failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A small passkey run on the embedded model (1K is its training length).
fn passkey_args(out: &Path) -> Vec<String> {
    [
        "passkey",
        "--lengths",
        "1k",
        "--depths",
        "0,1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn with<'a>(base: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect()
}

fn ppl_args(out: &Path, model: &str) -> Vec<String> {
    [
        "eval-ppl",
        "--data",
        &fixture("text/wiki-excerpt.txt"),
        "--model",
        model,
        "--tokenizer",
        &fixture("tokenizers/char54.json"),
        "--lengths",
        "64",
        "--windows",
        "2",
        "--pred-len",
        "8",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn copy_dir(src: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_resume_with_another_dtype_or_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ppl");
    let model = fixture("models/tiny-rms-hf");
    let base = ppl_args(&out, &model);
    ok(&run(&with(&base, &[])));
    // The same settings resume (and find everything done).
    ok(&run(&with(&base, &[])));
    let bf16 = run(&with(&base, &["--dtype", "bf16"]));
    assert_one_line_error(&bf16, "model.dtype: \"f32\" → \"bf16\"");
    // Another tokenizer file, same content: a different source is a different run.
    let tok = dir.path().join("tok.json");
    std::fs::copy(fixture("tokenizers/char54.json"), &tok).unwrap();
    let mut other: Vec<String> = base.clone();
    let i = other.iter().position(|a| a == "--tokenizer").unwrap();
    other[i + 1] = tok.display().to_string();
    let o = run(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_one_line_error(&o, "model.tokenizer.source");
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    for key in ["dtype", "device", "backend", "tokenizer", "files"] {
        assert!(
            !run_json["model"][key].is_null(),
            "run.json lacks model.{key}: {run_json}"
        );
    }
}

#[test]
fn weights_replaced_in_place_are_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&fixture("models/tiny-rms-hf"), &model);
    let out = dir.path().join("ppl");
    let base = ppl_args(&out, model.to_str().unwrap());
    ok(&run(&with(&base, &[])));
    // Same size, one byte changed near the end (a tensor value), mtime kept.
    let w = model.join("model.safetensors");
    let mtime = std::fs::metadata(&w).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&w, &bytes).unwrap();
    File::options()
        .write(true)
        .open(&w)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let o = run(&with(&base, &[]));
    assert_one_line_error(&o, "model.files");
}

/// Lays out a hub cache with two snapshots of one repo; `main` names the first.
fn two_snapshot_cache(home: &Path) -> (String, String) {
    let repo = home.join("hub/models--test-org--tiny-mamba");
    let commits = (
        "1111111111111111111111111111111111111111".to_string(),
        "2222222222222222222222222222222222222222".to_string(),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), &commits.0).unwrap();
    for (k, commit) in [&commits.0, &commits.1].into_iter().enumerate() {
        let snap = repo.join("snapshots").join(commit);
        copy_dir(&fixture("models/tiny-rms-hf"), &snap);
        if k == 1 {
            // The second snapshot is retrained: other weights of the same shapes.
            let w = snap.join("model.safetensors");
            let mut bytes = std::fs::read(&w).unwrap();
            let n = bytes.len();
            bytes[n - 5] ^= 0x10;
            std::fs::write(&w, &bytes).unwrap();
        }
    }
    commits
}

#[test]
fn a_resume_against_another_revision_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let (first, second) = two_snapshot_cache(home.path());
    let out = home.path().join("ppl");
    let base = ppl_args(&out, "test-org/tiny-mamba");
    let go = |rev: &str| {
        bin()
            .env("HF_HOME", home.path())
            .args(with(&base, &["--revision", rev]))
            .output()
            .unwrap()
    };
    ok(&go("main"));
    let run_json = std::fs::read_to_string(out.join("run.json")).unwrap();
    assert!(
        run_json.contains(&first),
        "resolved commit not recorded: {run_json}"
    );
    // The commit `main` resolves to is the same run.
    ok(&go(&first));
    let o = go(&second);
    assert_one_line_error(&o, "model.commit");
}

#[test]
fn a_folder_that_is_not_a_run_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&fixture("models/tiny-rms-hf"), &model);
    let before: Vec<_> = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let o = run(&with(
        &ppl_args(&model, &fixture("models/tiny-rms-hf")),
        &[],
    ));
    assert_one_line_error(&o, "not a run folder");
    let after: Vec<_> = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "files were written into the model folder"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let o = run(&with(&ppl_args(&file, &fixture("models/tiny-rms-hf")), &[]));
    assert_one_line_error(&o, "is a file, not a folder");
}

#[test]
fn a_second_process_on_one_out_folder_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pk");
    std::fs::create_dir_all(&out).unwrap();
    // Hold the lock as a running decimamba would.
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out.join("run.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    std::fs::write(out.join("run.lock"), "4242\n").unwrap();
    let o = run(&with(&passkey_args(&out), &[]));
    assert_one_line_error(&o, "in use by another decimamba run (PID 4242)");
    assert!(!out.join("run.json").exists());
    drop(lock);
    ok(&run(&with(&passkey_args(&out), &[])));
}

/// Runs with stdout a pipe whose reader has gone: the run ends quietly and keeps its files.
fn run_with_closed_stdout(args: &[&str]) -> Output {
    let mut cmd = bin();
    cmd.args(args);
    output_with_closed_stdout(cmd)
}

fn run_to_dev_full(args: &[&str]) -> Output {
    bin()
        .args(args)
        .stdout(File::create("/dev/full").unwrap())
        .output()
        .unwrap()
}

#[test]
fn closed_pipes_and_full_disks_are_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let pk = dir.path().join("pk");
    let o = run_with_closed_stdout(&with(&passkey_args(&pk), &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    assert!(pk.join("summary.json").exists() && pk.join("heatmap.png").exists());
    let o = run_to_dev_full(&with(&passkey_args(&dir.path().join("pk2")), &[]));
    assert_one_line_error(&o, "cannot write to standard output");

    let ppl = dir.path().join("ppl");
    let o = run_with_closed_stdout(&with(&ppl_args(&ppl, &fixture("models/tiny-rms-hf")), &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ppl.join("summary.json").exists());
    let o = run_to_dev_full(&with(
        &ppl_args(&dir.path().join("ppl2"), &fixture("models/tiny-rms-hf")),
        &[],
    ));
    assert_one_line_error(&o, "No space left on device");
}

#[test]
fn prompts_that_cannot_fit_in_memory_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    // DeciMamba keeps the whole residual stream of a billion tokens (~2 TB on this model);
    // vanilla needs 16 bytes per token of ids: 4096M tokens are ~64 GiB.
    for (lengths, extra) in [("1000000000", "--compare"), ("4000000k", "--depths")] {
        let out = dir.path().join(lengths);
        let mut a = passkey_args(&out);
        a[2] = lengths.to_string();
        let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
        if extra == "--compare" {
            a.push(extra);
        }
        let o = run(&a);
        assert_one_line_error(&o, "needs about");
        assert!(stderr(&o).contains("is available"), "{}", stderr(&o));
        assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
        assert!(!out.exists(), "a refused run left {}", out.display());
    }
}

#[test]
fn numeric_flags_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&with(
        &passkey_args(&dir.path().join("a")),
        &["--threads", "100000"],
    ));
    assert_one_line_error(&o, "--threads 100000 is more than the maximum");
    let o = run(&with(
        &passkey_args(&dir.path().join("b")),
        &["--threads", "0"],
    ));
    assert_one_line_error(&o, "--threads must be at least 1");
}

#[test]
fn a_model_with_ids_the_tokenizer_lacks_is_warned_about() {
    // tiny-rms-hf has 96 embedding rows; char54 has 54 tokens.
    let o = run(&[
        "generate",
        "--model",
        &fixture("models/tiny-rms-hf"),
        "--tokenizer",
        &fixture("tokenizers/char54.json"),
        "-n",
        "2",
        "the sky",
    ]);
    ok(&o);
    assert!(
        stderr(&o).contains("warning: model") && stderr(&o).contains("96 embedding rows"),
        "{}",
        stderr(&o)
    );
    // The embedded model's 258 rows match its byte tokenizer (padded to 8): no warning.
    let o = run(&["generate", "-n", "2", "hello"]);
    ok(&o);
    assert!(!stderr(&o).contains("warning:"), "{}", stderr(&o));
}

#[test]
fn a_byte_order_mark_is_stripped_from_data_files() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("text/wiki-excerpt.txt")).unwrap();
    let plain = dir.path().join("plain.txt");
    let bom = dir.path().join("bom.txt");
    std::fs::write(&plain, &text).unwrap();
    std::fs::write(&bom, format!("\u{feff}{text}")).unwrap();
    let ppl = |data: &Path, out: &str| {
        let mut a = ppl_args(&dir.path().join(out), &fixture("models/tiny-rms-hf"));
        a[2] = data.display().to_string();
        ok(&run(&a.iter().map(String::as_str).collect::<Vec<_>>()));
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(out).join("summary.json")).unwrap(),
        )
        .unwrap();
        s["methods"].clone()
    };
    assert_eq!(ppl(&plain, "p"), ppl(&bom, "b"));
}

/// Once the cancel flag is set, a forward pass stops between layers with `Interrupted`
/// (a long prefill does not run to its end after Ctrl-C); cleared, it runs again.
#[test]
fn a_set_cancel_flag_stops_the_forward_pass() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let files =
        decimamba::loader::files_from_dir(Path::new(&fixture("models/tiny-rms-hf"))).unwrap();
    let mut model =
        decimamba::loader::load_model(&files, &candle_core::Device::Cpu, candle_core::DType::F32)
            .unwrap();
    let flag = Arc::new(AtomicBool::new(true));
    model.set_cancel_flag(Some(flag.clone()));
    let ids = candle_core::Tensor::from_slice(&[1u32, 2, 3, 4], (1, 4), &candle_core::Device::Cpu)
        .unwrap();
    let e = model.forward(&ids).unwrap_err();
    assert!(e.is::<decimamba::model::Interrupted>(), "{e:#}");
    flag.store(false, Ordering::SeqCst);
    assert_eq!(model.forward(&ids).unwrap().dims(), &[1, 4, 96]);
}
