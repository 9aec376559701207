//! Results that last: every committed run under `results/` renders with
//! today's `termlab report` (older schema versions migrated), and its
//! committed report is what today's termlab renders; `termlab compare`'s
//! verdicts and exit codes on those real runs. No guest is booted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::explain;
use termlab::results::bench::{BenchResult, BENCH_FILE};
use termlab::results::{RunResult, RESULT_FILE, SCHEMA_VERSION};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

fn termlab(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_termlab"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("termlab runs")
}

/// Every directory under results/example/ and results/stress/ that holds a
/// run (result.json) or a benchmark (bench.json).
fn committed_runs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for parent in ["results/example", "results/stress"] {
        let Ok(entries) = std::fs::read_dir(repo_root().join(parent)) else { continue };
        for entry in entries {
            let path = entry.expect("readable entry").path();
            if path.join(RESULT_FILE).is_file() || path.join(BENCH_FILE).is_file() {
                dirs.push(path);
            }
        }
    }
    dirs.sort();
    dirs
}

/// `dir` copied (files only, one level) into a fresh temporary directory.
fn copy_of(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, copy.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    copy
}

#[test]
fn every_committed_run_renders_and_its_report_is_current() {
    let dirs = committed_runs();
    let names: Vec<String> =
        dirs.iter().map(|d| d.file_name().expect("name").to_string_lossy().into_owned()).collect();
    assert!(["bench", "budget", "loops"].iter().all(|n| names.iter().any(|m| m == n)), "{names:?}");
    for dir in &dirs {
        let copy = copy_of(dir);
        let output = termlab(&["report".as_ref(), copy.path().as_os_str()]);
        assert_eq!(output.status.code(), Some(0), "{}: {}", dir.display(), explain(&output));
        let rendered = std::fs::read_to_string(copy.path().join("report.md")).expect("report.md");
        let committed = std::fs::read_to_string(dir.join("report.md")).expect("committed");
        assert!(rendered.starts_with("# termlab "), "{}: {rendered}", dir.display());
        assert!(copy.path().join("report.html").is_file());
        assert_eq!(
            rendered,
            committed,
            "{}/report.md is not what today's termlab renders: run `termlab report --migrate {}`",
            dir.display(),
            dir.display()
        );
        // The committed raw numbers are in today's schema.
        let raw = if dir.join(RESULT_FILE).is_file() { RESULT_FILE } else { BENCH_FILE };
        let text = std::fs::read_to_string(dir.join(raw)).expect("raw file");
        let version = serde_json::from_str::<serde_json::Value>(&text).expect("JSON")
            ["schema_version"]
            .as_u64();
        let current = if raw == RESULT_FILE {
            SCHEMA_VERSION
        } else {
            termlab::results::bench::SCHEMA_VERSION
        };
        assert_eq!(version, Some(u64::from(current)), "{}/{raw}", dir.display());
    }
}

/// The record types keep their format: every committed result.json and
/// bench.json, read by today's termlab and written back, holds the same
/// fields and values. Compared as JSON values, not bytes: serde_json's float
/// parsing is not exactly round-trip (an f64 can come back one ulp off), the
/// same in both readings here.
#[test]
fn committed_records_are_written_back_unchanged() {
    let dirs = committed_runs();
    assert!(dirs.len() >= 3, "{dirs:?}");
    for dir in &dirs {
        let (raw, written) = if dir.join(RESULT_FILE).is_file() {
            let result = RunResult::load(dir).expect("loads");
            (RESULT_FILE, serde_json::to_value(&result).expect("serializes"))
        } else {
            let (bench, _) = BenchResult::load_with_version(dir).expect("loads");
            (BENCH_FILE, serde_json::to_value(&bench).expect("serializes"))
        };
        let text = std::fs::read_to_string(dir.join(raw)).expect("committed");
        let committed: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert!(written == committed, "{}/{raw} changed when written back", dir.display());
    }
}

#[test]
fn report_migrates_an_old_run_and_rewrites_it_only_when_asked() {
    let fixture = repo_root().join("termlab/tests/fixtures/schema2-loops");
    let version_of = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join(RESULT_FILE)).expect("result.json");
        serde_json::from_str::<serde_json::Value>(&text).expect("JSON")["schema_version"].as_u64()
    };
    let copy = copy_of(&fixture);
    let output = termlab(&["report".as_ref(), copy.path().as_os_str()]);
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert!(copy.path().join("report.html").is_file());
    assert_eq!(version_of(copy.path()), Some(2), "left as it was");
    let output = termlab(&["report".as_ref(), "--migrate".as_ref(), copy.path().as_os_str()]);
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(version_of(copy.path()), Some(u64::from(SCHEMA_VERSION)));
}

/// The committed budget run with every `metric` sample multiplied by `factor`.
fn budget_scaled(metric: &str, factor: f64) -> tempfile::TempDir {
    let copy = copy_of(&repo_root().join("results/example/budget"));
    let path = copy.path().join(RESULT_FILE);
    let mut document: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
    for repetition in document["repetitions"].as_array_mut().expect("repetitions") {
        let value = &mut repetition["metrics"][metric];
        *value = (value.as_f64().expect("measured") * factor).into();
    }
    std::fs::write(&path, document.to_string()).expect("written");
    copy
}

#[test]
fn compare_exit_codes_on_real_runs() {
    let budget = repo_root().join("results/example/budget");
    let out = tempfile::tempdir().expect("temp dir");
    let compare = |base: &Path, new: &Path, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["compare".as_ref(), base.as_os_str(), new.as_os_str(), "--out".as_ref()];
        args.push(out.path().as_os_str());
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        termlab(&args)
    };

    // The same run twice: nothing changed, exit 0.
    let same = compare(&budget, &budget, &[]);
    assert_eq!(same.status.code(), Some(0), "{}", explain(&same));
    let stdout = String::from_utf8_lossy(&same.stdout);
    assert!(stdout.starts_with("# termlab compare: budget — no regression"), "{stdout}");
    assert!(!stdout.contains("| regressed |"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("compare.json")).expect("compare.json"),
    )
    .expect("JSON");
    assert!(json["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .all(|m| m["verdict"] == "unchanged"));
    for file in ["report.md", "report.html", "compare-own_stop-cdf.svg"] {
        assert!(out.path().join(file).is_file(), "{file}");
    }

    // own_stop 30 % slower: regressed, exit 1; 5 % slower is within 10 %.
    let slower = budget_scaled("own_stop", 1.3);
    let regressed = compare(&budget, slower.path(), &[]);
    assert_eq!(regressed.status.code(), Some(1), "{}", explain(&regressed));
    let stdout = String::from_utf8_lossy(&regressed.stdout);
    assert!(stdout.contains("REGRESSED") && stdout.contains("| **own_stop** |"), "{stdout}");
    let slightly = budget_scaled("own_stop", 1.05);
    assert_eq!(compare(&budget, slightly.path(), &[]).status.code(), Some(0));
    // With a 40 % threshold the 30 % is within too; judged alone, it regresses.
    assert_eq!(compare(&budget, slower.path(), &["--threshold", "40"]).status.code(), Some(0));
    let alone = compare(&budget, slower.path(), &["--metric", "own_stop"]);
    assert_eq!(alone.status.code(), Some(1), "{}", explain(&alone));
    // The reverse is an improvement, not a failure.
    assert_eq!(compare(slower.path(), &budget, &[]).status.code(), Some(0));

    // Bad input: exit 2, with the reason on stderr.
    let missing = compare(&budget, Path::new("/nonexistent/run"), &[]);
    assert_eq!(missing.status.code(), Some(2), "{}", explain(&missing));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/run"));
    let garbage = tempfile::tempdir().expect("temp dir");
    std::fs::write(garbage.path().join(RESULT_FILE), "{\"schema_version\": 3}").expect("write");
    let unreadable = compare(&budget, garbage.path(), &[]);
    assert_eq!(unreadable.status.code(), Some(2), "{}", explain(&unreadable));
    let unknown = compare(&budget, &budget, &["--metric", "no_such_metric"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", explain(&unknown));
    let bad_threshold = compare(&budget, &budget, &["--threshold", "150"]);
    assert_eq!(bad_threshold.status.code(), Some(2), "{}", explain(&bad_threshold));
}
