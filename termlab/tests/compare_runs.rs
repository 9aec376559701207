//! `termlab compare` on real runs: scenarios/control.toml twice as it is and
//! once with the demo helper's delay raised 30 % (1000 → 1300 ms), three
//! repetitions each, in one `termlab run` (one L1 boot where nesting is
//! needed). Two identical runs must compare unchanged (exit 0), the slowed
//! one regressed (exit 1) with its full_run p50 about 1.3 times the base.
//!
//! Boots the guest: about two minutes; needs the kernel build and the
//! agent. Run with
//! `cargo test --release -p termlab --test compare_runs -- --ignored --nocapture`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::explain;
use termlab::results::RunResult;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

/// A scratch directory under the target dir (/tmp is a private tmpfs inside
/// the L1 VM, the target dir is shared with it), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("compare-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("slow")).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DELAY: &str = "\"kernel.bpf_termination_demo_delay_ms\" = 1000";
const DELAY_30_PERCENT_LONGER: &str = "\"kernel.bpf_termination_demo_delay_ms\" = 1300";

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn compare_tells_a_30_percent_slower_helper_from_an_identical_run() {
    let scratch = Scratch::new();
    let control = repo_root().join("scenarios/control.toml");
    let source = std::fs::read_to_string(&control).expect("control.toml");
    assert!(source.contains(DELAY), "control.toml changed: update this test's delay");
    // Same file name, so the same scenario name: only the delay differs.
    let slow = scratch.0.join("slow/control.toml");
    // The copy lives elsewhere: its program's source path must still find the demo.
    let moved = source
        .replace("\"../guest-samples/", &format!("\"{}/guest-samples/", repo_root().display()));
    std::fs::write(&slow, moved.replace(DELAY, DELAY_30_PERCENT_LONGER)).expect("written");
    let results = scratch.0.join("results");

    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .args(["--quiet", "run", "--repeat", "3", "--results"])
        .arg(&results)
        .args([&control, &control, &slow])
        .output()
        .expect("termlab runs");
    let run_seconds = started.elapsed().as_secs_f64();
    assert_eq!(run.status.code(), Some(0), "{}", explain(&run));
    eprintln!("termlab run: three runs of control.toml, --repeat 3: {run_seconds:.0} s");

    let mut dirs: Vec<PathBuf> = std::fs::read_dir(results.join("control"))
        .expect("runs written")
        .map(|entry| entry.expect("entry").path())
        .collect();
    dirs.sort();
    let (slowed, normal): (Vec<PathBuf>, Vec<PathBuf>) = dirs.into_iter().partition(|dir| {
        RunResult::load(dir).expect("result.json").scenario.source.contains(DELAY_30_PERCENT_LONGER)
    });
    assert_eq!((normal.len(), slowed.len()), (2, 1), "{normal:?} {slowed:?}");

    let compare = |base: &Path, new: &Path, name: &str, extra: &[&str]| {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
            .args(["--quiet", "compare"])
            .args([base, new])
            .arg("--out")
            .arg(scratch.0.join(name))
            .args(extra)
            .output()
            .expect("termlab compare runs");
        eprintln!(
            "termlab compare ({name}, {:.2} s), exit {:?}:\n{}",
            started.elapsed().as_secs_f64(),
            output.status.code(),
            String::from_utf8_lossy(&output.stdout)
        );
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(scratch.0.join(name).join("compare.json"))
                .expect("compare.json"),
        )
        .expect("JSON");
        (output, json)
    };
    let full_run = |json: &serde_json::Value| {
        json["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .find(|m| m["metric"] == "full_run")
            .expect("full_run judged")
            .clone()
    };

    // Identical runs: the scenario's metric is unchanged, exit 0. (The
    // built-in agent_rtt and ipi_rtt spread widely under nesting, so the
    // exit status is taken on the scenario's own metric.)
    let (same, json) = compare(&normal[0], &normal[1], "identical", &["--metric", "full_run"]);
    assert_eq!(same.status.code(), Some(0), "{}", explain(&same));
    assert_eq!(full_run(&json)["verdict"], "unchanged");
    // Every metric, for the record (printed above): the expectations agree.
    let (_, json) = compare(&normal[0], &normal[1], "identical-all", &[]);
    assert!(json["expectations"]
        .as_array()
        .expect("expectations")
        .iter()
        .all(|e| e["change"] == "still_passes"));

    // The slowed helper: full_run regressed by about 30 %, exit 1, with or
    // without --metric.
    let (regressed, json) = compare(&normal[0], &slowed[0], "slowed", &[]);
    assert_eq!(regressed.status.code(), Some(1), "{}", explain(&regressed));
    let metric = full_run(&json);
    assert_eq!(metric["verdict"], "regressed");
    let p50 = &metric["changes"][0];
    let ratio = p50["ratio"].as_f64().expect("ratio");
    assert!((1.25..1.35).contains(&ratio), "full_run p50 ratio {ratio}: {p50}");
    assert!(p50["low"].as_f64().expect("low") > 1.1, "{p50}");
    let (alone, _) = compare(&normal[0], &slowed[0], "slowed-alone", &["--metric", "full_run"]);
    assert_eq!(alone.status.code(), Some(1), "{}", explain(&alone));
    let report = std::fs::read_to_string(scratch.0.join("slowed/report.md")).expect("report.md");
    assert!(report.contains("| **full_run** |"), "{report}");
    assert!(scratch.0.join("slowed/compare-full_run-cdf.svg").is_file());
}
