//! Perplexity evaluation with fake models: window arithmetic end to end,
//! perplexity values, the table, JSON, PNG, resumption, data loading and errors.

mod eval_support;

use decimamba::eval::data::{data_files, load_documents, strip_gutenberg, DataOptions};
use decimamba::eval::ppl::{
    files, run_ppl, tokenize_documents, window_starts, PplJob, PplReport, PplSettings, TokenizedDoc,
};
use decimamba::eval::runlog::RESULTS_JSONL;
use decimamba::eval::{Method, RunOptions};
use eval_support::{deci, fixture, read_json, read_jsonl, FakeModel};
use std::path::Path;

/// Documents whose tokens are `start offset % 251` so each window's first
/// token tells where it starts.
fn doc(name: &str, len: usize) -> TokenizedDoc {
    TokenizedDoc {
        name: name.into(),
        tokens: (0..len as u32).map(|i| i % 251).collect(),
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
    docs: &[TokenizedDoc],
    s: &PplSettings,
    methods: &[Method],
    out: &Path,
) -> anyhow::Result<PplReport> {
    run_ppl(&PplJob {
        model,
        extra_workers: &[],
        docs,
        settings: s,
        methods,
        out_dir: out,
        options: &quiet(),
    })
}

/// [`run`] with a Ctrl-C flag the fake model may set.
fn run_with_stop(
    model: &FakeModel,
    docs: &[TokenizedDoc],
    s: &PplSettings,
    methods: &[Method],
    out: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> PplReport {
    run_ppl(&PplJob {
        model,
        extra_workers: &[],
        docs,
        settings: s,
        methods,
        out_dir: out,
        options: &RunOptions {
            quiet: true,
            stop: Some(stop),
            batch_size: 1,
            shard: None,
        },
    })
    .unwrap()
}

fn settings() -> PplSettings {
    PplSettings {
        lengths: vec![100, 200, 1024],
        windows: 10,
        pred_len: 10,
    }
}

#[test]
fn perplexity_matches_a_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let docs = vec![doc("long", 1000), doc("mid", 150), doc("short", 99)];
    let s = PplSettings {
        lengths: vec![100, 200],
        ..settings()
    };
    let model = FakeModel::new();
    let report = run(&model, &docs, &s, &[Method::vanilla()], dir.path()).unwrap();
    assert!(report.complete);
    // Length 100: "long" stride 90 → 10 windows; "mid" stride 10 → 6 windows; "short" skipped.
    // Length 200: "long" stride 80 → 10 windows (0..=720); the others skipped.
    assert_eq!(report.coverage[0].windows, 16);
    assert_eq!(
        (
            report.coverage[0].docs_used,
            report.coverage[0].docs_skipped
        ),
        (2, 1)
    );
    assert_eq!(report.coverage[1].windows, 10);
    assert_eq!(
        (
            report.coverage[1].docs_used,
            report.coverage[1].docs_skipped
        ),
        (1, 2)
    );
    assert_eq!(model.calls.get(), 26);

    let starts100: Vec<usize> = (0..10)
        .map(|i| i * 90)
        .chain((0..6).map(|i| i * 10))
        .collect();
    let nll = |start: usize| 1.0 + ((start % 251) % 7) as f64 * 0.125;
    let expect100 = (starts100.iter().map(|&s| nll(s)).sum::<f64>() / 16.0).exp();
    let got = report.perplexity("vanilla", 100).unwrap();
    assert!(
        (got - expect100).abs() < 1e-9 * expect100,
        "{got} vs {expect100}"
    );
    let expect200 = ((0..10).map(|i| nll(i * 80)).sum::<f64>() / 10.0).exp();
    let got = report.perplexity("vanilla", 200).unwrap();
    assert!(
        (got - expect200).abs() < 1e-9 * expect200,
        "{got} vs {expect200}"
    );

    // Windows are recorded with their starts, in order.
    let w: Vec<usize> = report
        .windows
        .iter()
        .filter(|w| w.length == 100)
        .map(|w| w.start)
        .collect();
    assert_eq!(w, starts100);
    assert_eq!(window_starts(150, 100, 10), vec![0, 10, 20, 30, 40, 50]);
}

#[test]
fn compare_run_writes_table_json_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ppl");
    let docs = vec![doc("a", 3000), doc("b", 1100), doc("c", 500)];
    let s = settings();
    let methods = Method::compare(deci());
    let model = FakeModel::new();
    let report = run(&model, &docs, &s, &methods, &out).unwrap();
    let table = report.table();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("last 10 tokens"), "{table}");
    assert!(
        lines[1].split_whitespace().eq([
            "length",
            "tokens",
            "vanilla",
            "decimamba",
            "docs",
            "used",
            "docs",
            "skipped",
            "windows"
        ]),
        "{table}"
    );
    // 1K row: vanilla degrades (fake), DeciMamba does not; a and b are used, c skipped.
    let row = lines.iter().find(|l| l.starts_with("1K")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "1024");
    let v: f64 = cells[2].parse().unwrap();
    let d: f64 = cells[3].parse().unwrap();
    assert!(v > d * 2.0, "{table}");
    assert_eq!(&cells[4..], ["2", "1", "18"], "{table}"); // a: 10 windows, b: 8 (stride 10)
    assert!(
        report.perplexity("vanilla", 1024).unwrap() > report.perplexity("decimamba", 1024).unwrap()
    );

    // JSON.
    let jsonl = read_jsonl(&out.join(RESULTS_JSONL));
    let per_method: usize = report.coverage.iter().map(|c| c.windows).sum();
    assert_eq!(jsonl.len(), 2 * per_method);
    for k in [
        "method",
        "length",
        "doc",
        "window",
        "start",
        "mean_nll",
        "forward_secs",
    ] {
        assert!(jsonl[0].get(k).is_some(), "missing {k}");
    }
    let results = read_json(&out.join(files::RESULTS_JSON));
    assert_eq!(results.as_array().unwrap().len(), 2 * per_method);
    let summary = read_json(&out.join(files::SUMMARY_JSON));
    assert_eq!(summary["eval"], "perplexity");
    assert_eq!(summary["documents"], 3);
    let rows = summary["perplexity"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[5]["method"], "decimamba");
    assert_eq!(rows[5]["length"], 1024);
    assert_eq!(summary["coverage"][2]["docs_skipped"], 1);

    // PNG.
    let img = image::open(out.join(files::PLOT_PNG)).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        decimamba::eval::plot::LINE_PLOT_SIZE
    );
}

#[test]
fn resumes_after_a_failure_without_redoing_windows() {
    let dir = tempfile::tempdir().unwrap();
    let docs = vec![doc("a", 2000), doc("b", 700)];
    let s = settings();
    let methods = Method::compare(deci());
    let failing = FakeModel {
        fail_after: Some(9),
        ..FakeModel::new()
    };
    let e = run(&failing, &docs, &s, &methods, dir.path()).unwrap_err();
    assert!(
        format!("{e:#}").contains("finished windows are saved"),
        "{e:#}"
    );
    assert_eq!(read_jsonl(&dir.path().join(RESULTS_JSONL)).len(), 9);
    assert!(!dir.path().join(files::SUMMARY_JSON).exists());

    let model = FakeModel::new();
    let report = run(&model, &docs, &s, &methods, dir.path()).unwrap();
    assert!(report.complete);
    assert_eq!(report.resumed, 9);
    let total = report.windows.len();
    assert_eq!(model.calls.get(), total - 9);
    let fresh = run(
        &FakeModel::new(),
        &docs,
        &s,
        &methods,
        &dir.path().join("fresh"),
    )
    .unwrap();
    assert_eq!(fresh.rows, report.rows);

    // Other data → refused.
    let other = vec![doc("a", 2000), doc("b", 701)];
    let e = run(&FakeModel::new(), &other, &s, &methods, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("different settings") && e.contains("data"),
        "{e}"
    );
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = FakeModel::new();
    let v = [Method::vanilla()];
    let s = PplSettings {
        lengths: vec![10, 100],
        ..settings()
    };
    let e = run(&m, &[doc("a", 500)], &s, &v, dir.path())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "length 10 must be longer than --pred-len 10 (the scored tail)"
    );
    let e = run(&m, &[], &settings(), &v, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no data"), "{e}");
    let e = run(&m, &[doc("a", 50)], &settings(), &v, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no document is long enough") && e.contains("50 tokens"),
        "{e}"
    );
    let wrong = FakeModel {
        wrong_nll_count: Some(3),
        ..FakeModel::new()
    };
    let e = run(
        &wrong,
        &[doc("a", 500)],
        &settings(),
        &v,
        &dir.path().join("w"),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("returned 3 NLLs") && e.contains("window 0 failed"),
        "{e}"
    );
    assert_eq!(m.calls.get(), 0);
}

#[test]
fn fixture_texts_load_strip_and_fail_clearly() {
    let Some(alice) = fixture("alice-raw-gutenberg.txt") else {
        eprintln!("tests/fixtures/text is absent; skipping");
        return;
    };
    let raw = std::fs::read_to_string(&alice).unwrap();
    let body = strip_gutenberg(&raw);
    assert!(raw.contains("*** START OF THIS PROJECT GUTENBERG EBOOK"));
    assert!(!body.contains("*** START OF"), "header kept");
    assert!(!body.contains("*** END OF"), "footer kept");
    assert!(!body.contains("This eBook is for the use of anyone"));
    assert!(body.starts_with("ALICE'S ADVENTURES IN WONDERLAND"));
    assert!(body.len() < raw.len());

    let opts = DataOptions::default();
    let loaded = load_documents(std::slice::from_ref(&alice), &opts).unwrap();
    assert_eq!(loaded.documents[0].text, body);
    let kept = load_documents(
        std::slice::from_ref(&alice),
        &DataOptions {
            strip_gutenberg: false,
            ..DataOptions::default()
        },
    )
    .unwrap();
    // The file starts with a byte-order mark, as Gutenberg's do; it is not text.
    assert!(raw.starts_with('\u{feff}'));
    assert_eq!(kept.documents[0].text, raw.trim_start_matches('\u{feff}'));

    if let Some(books) = fixture("books.jsonl") {
        let l = load_documents(&[books], &opts).unwrap();
        assert!(l.documents.len() >= 2);
        assert!(l.documents.iter().all(|d| !d.text.is_empty()));
        assert!(l.documents[1].name.ends_with("books.jsonl:2"));
    }
    if let Some(latin1) = fixture("latin1.txt") {
        let e = load_documents(std::slice::from_ref(&latin1), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("latin1.txt is not valid UTF-8"), "{e}");
        assert!(!e.contains('\n'));
        let l = load_documents(
            &[latin1, alice.clone()],
            &DataOptions {
                skip_invalid: true,
                ..DataOptions::default()
            },
        )
        .unwrap();
        assert_eq!(l.documents.len(), 1);
        assert!(l.warnings[0].contains("latin1.txt"));
    }

    // The whole fixture folder with the invalid file skipped, end to end.
    let folder = alice.parent().unwrap();
    let files_in = data_files(folder).unwrap();
    assert!(files_in.iter().any(|f| f.ends_with("books.jsonl")));
    let l = load_documents(
        &files_in,
        &DataOptions {
            skip_invalid: true,
            ..DataOptions::default()
        },
    )
    .unwrap();
    let model = FakeModel::new();
    let docs = tokenize_documents(&model, &l.documents, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = PplSettings {
        lengths: vec![1024, 4096],
        windows: 2,
        pred_len: 16,
    };
    let report = run(&model, &docs, &s, &[Method::vanilla()], dir.path()).unwrap();
    assert!(report.complete);
    assert!(report.perplexity("vanilla", 1024).is_some());
}

/// Ctrl-C after three windows of a --compare run leaves vanilla one window ahead; the
/// partial table compares both on the window both finished.
#[test]
fn a_partial_table_counts_only_windows_every_method_finished() {
    let dir = tempfile::tempdir().unwrap();
    let docs = vec![doc("a", 2000)];
    let s = PplSettings {
        lengths: vec![100],
        windows: 5,
        pred_len: 10,
    };
    let methods = Method::compare(deci());
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let model = FakeModel {
        stop_after: Some((3, flag.clone())),
        ..FakeModel::new()
    };
    let report = run_with_stop(&model, &docs, &s, &methods, dir.path(), flag);
    assert!(!report.complete);
    assert_eq!(report.windows.len(), 3, "every finished window is kept");
    for r in &report.rows {
        assert_eq!(r.windows, 1, "{r:?}");
    }
    assert_eq!(report.coverage[0].windows, 1);
    let nll = |m: &str| report.rows.iter().find(|r| r.method == m).unwrap().mean_nll;
    let first = &docs[0].tokens[..100];
    assert_eq!(
        nll("vanilla"),
        Some(f64::from(FakeModel::nll_of(first, false)))
    );
    assert!(report
        .table()
        .starts_with("partial run: only the windows every method finished"));
}

/// A Ctrl-C that cuts a prefill short is an interruption, not a failure: the run stops
/// with what it finished, and a rerun resumes.
#[test]
fn a_prefill_cut_short_by_ctrl_c_ends_the_run_resumably() {
    let dir = tempfile::tempdir().unwrap();
    let docs = vec![doc("a", 2000)];
    let s = settings();
    let methods = vec![Method::vanilla()];
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let model = FakeModel {
        interrupt_at: Some((4, flag.clone())),
        ..FakeModel::new()
    };
    let report = run_with_stop(&model, &docs, &s, &methods, dir.path(), flag);
    assert!(!report.complete);
    assert_eq!(read_jsonl(&dir.path().join(RESULTS_JSONL)).len(), 4);
    let again = run(&FakeModel::new(), &docs, &s, &methods, dir.path()).unwrap();
    assert!(again.complete);
    assert_eq!(again.resumed, 4);
}
