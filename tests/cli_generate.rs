//! End-to-end runs of `decimamba generate`: flag checks, seeds, vocabulary masking, the
//! prompt's byte-order mark and stdin hint, help text, and stdout that goes away.

mod cli_support;
use cli_support::*;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};

fn model() -> String {
    fixture("models/tiny-rms-hf")
}

/// `generate` on the tiny model with the char tokenizer: `extra` flags, then `prompt`.
fn gen_args(extra: &[&str], prompt: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "generate",
        "--model",
        &model(),
        "--tokenizer",
        &char_tokenizer(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(prompt.to_string());
    a
}

fn gen(extra: &[&str]) -> Output {
    bin().args(gen_args(extra, "the sky")).output().unwrap()
}

/// A successful `--json` run's object.
fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn top_k_and_top_p_need_a_temperature() {
    assert_one_line_error(&gen(&["--top-k", "5"]), "--top-k needs --temperature");
    assert_one_line_error(&gen(&["--top-p", "0.9"]), "--top-p needs --temperature");
    assert_one_line_error(
        &gen(&["--top-k", "5", "--top-p", "0.9", "--temperature", "0"]),
        "--top-k and --top-p need --temperature",
    );
    let o = gen(&[
        "-n",
        "3",
        "--temperature",
        "0.8",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn kept_indices_needs_json() {
    let o = gen(&["-n", "2", "--kept-indices", "--deci-layers", "1"]);
    assert_one_line_error(&o, "--kept-indices");
    assert!(stderr(&o).contains("--json"), "{}", stderr(&o));
}

#[test]
fn negative_numbers_reach_the_range_checks() {
    assert_one_line_error(
        &gen(&["--temperature", "-1"]),
        "temperature must be ≥ 0, got -1",
    );
    assert_one_line_error(
        &gen(&["--temperature", "0.5", "--top-p", "-0.5"]),
        "top-p must be in (0, 1]",
    );
    assert_one_line_error(
        &gen(&["--repeat-penalty", "-2"]),
        "repeat penalty must be positive",
    );
}

/// The seed of a run without `--seed`, as printed on stderr.
fn printed_seed(o: &Output) -> u64 {
    let err = stderr(o);
    let line = err
        .lines()
        .find(|l| l.starts_with("seed: "))
        .unwrap_or_else(|| panic!("no seed line: {err}"));
    let seed: u64 = line["seed: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        line,
        format!("seed: {seed} (rerun with --seed {seed} to repeat)")
    );
    seed
}

#[test]
fn seeds_are_random_unless_given_and_recorded() {
    let sample = ["-n", "40", "--temperature", "1.5", "--json"];
    let with_seed = |seed: &str| {
        let mut a = sample.to_vec();
        a.extend(["--seed", seed]);
        json(&gen(&a))
    };
    let a = with_seed("7");
    let b = with_seed("7");
    assert_eq!(a["seed"], 7);
    assert_eq!(a["text"], b["text"], "the same seed samples the same text");
    assert_eq!(a["tokens"], b["tokens"]);

    let first = gen(&sample);
    let second = gen(&sample);
    let (s1, s2) = (printed_seed(&first), printed_seed(&second));
    assert_eq!(json(&first)["seed"], s1);
    assert_eq!(json(&second)["seed"], s2);
    assert_ne!(s1, s2, "two runs without --seed drew the same seed");
    // The printed seed repeats the run.
    let again = with_seed(&s1.to_string());
    assert_eq!(again["tokens"], json(&first)["tokens"]);

    // Greedy records its seed too, and prints none.
    let greedy = gen(&["-n", "2", "--json"]);
    assert!(json(&greedy)["seed"].is_u64(), "{}", json(&greedy));
    assert!(!stderr(&greedy).contains("seed:"), "{}", stderr(&greedy));
    assert_eq!(json(&gen(&["-n", "2", "--json", "--seed", "5"]))["seed"], 5);
}

#[test]
fn sampling_never_picks_ids_past_the_tokenizer_vocabulary() {
    let vocab = tokenizers::Tokenizer::from_file(char_tokenizer())
        .unwrap()
        .get_vocab_size(true);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/models/tiny-rms-hf/config.json"))
            .unwrap(),
    )
    .unwrap();
    let padded = cfg["vocab_size"].as_u64().unwrap() as usize;
    assert!(padded > vocab, "the fixture must pad its embedding");
    // A very high temperature samples nearly uniformly over all the logits.
    let mut sampled = 0;
    for seed in ["1", "2", "3", "4"] {
        let v = json(&gen(&[
            "-n",
            "200",
            "--temperature",
            "100",
            "--seed",
            seed,
            "--json",
        ]));
        for t in v["tokens"].as_array().unwrap() {
            let id = t.as_u64().unwrap() as usize;
            assert!(id < vocab, "sampled id {id} ≥ vocabulary {vocab}");
            sampled += 1;
        }
    }
    assert!(sampled >= 100, "too few tokens sampled: {sampled}");
}

#[test]
fn a_byte_order_mark_is_stripped_from_the_prompt() {
    let plain = json(&gen(&["-n", "4", "--json"]));
    let bom = "\u{feff}the sky";
    let from_arg = json(
        &bin()
            .args(gen_args(&["-n", "4", "--json"], bom))
            .output()
            .unwrap(),
    );
    assert_eq!(from_arg["prompt_tokens"], plain["prompt_tokens"]);
    assert_eq!(from_arg["tokens"], plain["tokens"]);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("prompt.txt");
    std::fs::write(&p, bom.as_bytes()).unwrap();
    let a = [
        "generate",
        "--model",
        &model(),
        "--tokenizer",
        &char_tokenizer(),
        "-n",
        "4",
        "--json",
    ];
    let mut file_args = a.to_vec();
    file_args.extend(["--prompt-file", p.to_str().unwrap()]);
    let from_file = json(&run(&file_args));
    assert_eq!(from_file["tokens"], plain["tokens"]);
    assert_eq!(from_file["prompt_tokens"], plain["prompt_tokens"]);

    let mut child = bin()
        .args(a)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(bom.as_bytes())
        .unwrap();
    let from_stdin = json(&child.wait_with_output().unwrap());
    assert_eq!(from_stdin["tokens"], plain["tokens"]);
    assert_eq!(from_stdin["prompt_tokens"], plain["prompt_tokens"]);
}

/// Runs `generate` reading its prompt from a terminal: util-linux `script` gives it a
/// pseudo-terminal, fed "the sky", newline and Ctrl-D.
#[test]
fn a_terminal_on_stdin_gets_a_hint() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let cmd = [
        env!("CARGO_BIN_EXE_decimamba").to_string(),
        "generate".into(),
        "--model".into(),
        model(),
        "--tokenizer".into(),
        char_tokenizer(),
        "-n".into(),
        "3".into(),
        "--json".into(),
    ]
    .iter()
    .map(|s| quote(s))
    .collect::<Vec<_>>()
    .join(" ");
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    stdin.write_all(b"the sky\n\x04").unwrap();
    stdin.flush().unwrap();
    // Keep stdin open until the terminal side is done: `script` ends the session at EOF.
    let screen = reader.join().unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "{screen}");
    assert!(
        screen.contains("reading the prompt from stdin (end with Ctrl-D)"),
        "{screen}"
    );
    assert!(screen.contains("\"prompt_tokens\": 8"), "{screen}");
}

#[test]
fn help_describes_every_sampling_flag() {
    let o = run(&["generate", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&o.stdout).to_string();
    for needle in [
        "The most tokens to generate",
        "Sample only among the K most likely tokens",
        "Nucleus sampling",
        "Sampling seed, to repeat a run exactly",
    ] {
        assert!(help.contains(needle), "no {needle:?} in:\n{help}");
    }
    assert!(!help.contains("(the default)"), "{help}");
}

#[test]
fn closed_or_full_stdout_never_panics() {
    for mode in [&["--temperature", "1", "--seed", "1"][..], &["--json"][..]] {
        let mut a = vec!["-n", "300"];
        a.extend_from_slice(mode);
        // The reader goes away before the first token.
        let mut cmd = bin();
        cmd.args(gen_args(&a, "the sky"));
        let o = output_with_closed_stdout(cmd);
        let err = stderr(&o);
        assert!(o.status.success(), "{mode:?}: {err}");
        assert!(
            !err.contains("error") && !err.contains("panicked"),
            "{mode:?}: {err}"
        );

        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = bin()
            .args(gen_args(&a, "the sky"))
            .stdout(full)
            .output()
            .unwrap();
        assert_one_line_error(&o, "No space left on device");
    }
}
