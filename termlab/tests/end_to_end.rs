//! `termlab run` end to end: boots the guest (inside the nested L1 VM on
//! hosts whose KVM cannot run Linux), so these take minutes and need the
//! guest kernel built (`termlab kernel build`) and the static agent. Run
//! with `cargo test -p termlab --test end_to_end -- --ignored`;
//! TERMLAB_KERNEL_DIR picks another kernel build directory.

#[path = "support/junit_schema.rs"]
mod junit_schema;

use std::path::{Path, PathBuf};
use std::process::Command;

use termlab::results::RunResult;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

/// A scratch directory under the target dir: /tmp is a private tmpfs
/// inside the L1 VM, the target dir is shared with it.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `termlab PROGRESS... run --repeat 2 --junit RESULTS/junit.xml RUN_OPTIONS... SCENARIO`
/// (`progress`: the global progress option, `--quiet` or none) and returns its exit code, its
/// stdout, the run's result, and all of that with stderr for a failed assertion to show; the
/// JUnit file is checked against the schemas. stderr says why a run ended early (and the test
/// command retries a nested suite only when it names the emulated host).
fn run(
    scenario: &Path,
    results: &Path,
    progress: &[&str],
    run_options: &[&str],
) -> (Option<i32>, String, RunResult, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .args(progress)
        .args(["run", "--repeat", "2", "--junit"])
        .arg(junit_file(results))
        .arg("--results")
        .arg(results)
        .args(run_options)
        .arg(scenario)
        .output()
        .expect("termlab runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let explain = format!(
        "exit status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stem = scenario.file_stem().expect("stem").to_string_lossy().into_owned();
    let run_dir = std::fs::read_dir(results.join(&stem))
        .unwrap_or_else(|e| panic!("no results for {stem}: {e}\n{explain}"))
        .next()
        .expect("one run")
        .expect("readable")
        .path();
    let junit = junit_file(results);
    junit_schema::validate(&junit).unwrap_or_else(|e| panic!("{e}\n{explain}"));
    let result = RunResult::load(&run_dir)
        .unwrap_or_else(|e| panic!("{}: result.json: {e}\n{explain}", run_dir.display()));
    (output.status.code(), stdout, result, explain)
}

fn junit_file(results: &Path) -> PathBuf {
    results.join("junit.xml")
}

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn control_scenario_passes_and_writes_its_reports() {
    let results = scratch("control");
    // Its output is no terminal, as in a CI log: progress comes as plain lines, one per
    // repetition with the time elapsed, --console streams the guest console beside them, and
    // --timings says where the time went.
    let (code, _, result, explain) = run(
        &repo_root().join("scenarios/control.toml"),
        &results,
        &[],
        &["--console", "--timings"],
    );
    assert_eq!(code, Some(0), "{explain}");
    for rep in 1..=2 {
        let line = format!("[control] rep {rep}/2 done in ");
        assert!(
            explain.lines().any(|l| l.starts_with(&line) && l.contains(" (elapsed ")),
            "no `{line}... (elapsed ...)` line: {explain}"
        );
    }
    assert!(
        explain.lines().any(|l| l.starts_with("console| ") && l.contains("termlab-agent")),
        "the guest console was not streamed: {explain}"
    );
    assert!(result.complete && result.all_expectations_passed(), "{explain}");
    assert_eq!(result.repetitions.len(), 2);
    // Each phase timed, in result.json and on stderr; the phases make up the whole run.
    let timings = result.timings.as_ref().expect("result.json has the timings");
    assert_eq!(timings.repetitions_s.len(), 2, "{timings:?}");
    assert!(timings.repetitions_s.iter().all(|&s| s >= 1.95), "two 1 s helpers each: {timings:?}");
    assert!(timings.boot_s > 0.0 && timings.setup_s > 0.0, "{timings:?}");
    let phases = timings.prepare_s
        + timings.boot_s
        + timings.setup_s
        + timings.repetitions_s.iter().sum::<f64>()
        + timings.teardown_s;
    assert!((phases - timings.total_s).abs() < 0.01, "{timings:?}");
    // The per-scenario line, and the whole command's (from the host when nested).
    for line in ["timings [control]: prepare ", "scenarios, kernels and guest images "] {
        assert!(
            explain.lines().any(|l| l.starts_with("timings") && l.contains(line)),
            "no `{line}...` line: {explain}"
        );
    }
    let full_run = &result
        .summary
        .iter()
        .find(|s| s.metric == "full_run")
        .expect("full_run summarised")
        .summary;
    assert!(full_run.min_ns >= 1.95e9, "two slow helpers of 1 s each: {full_run:?}");
    let dir = std::fs::read_dir(results.join("control"))
        .expect("dir")
        .next()
        .expect("run")
        .expect("entry")
        .path();
    for file in ["console.log", "dmesg.txt", "report.md", "report.html", "full_run-cdf.svg"] {
        assert!(dir.join(file).is_file(), "{file} missing: {explain}");
    }
    let junit = std::fs::read_to_string(junit_file(&results)).expect("junit.xml");
    let cases = result.expectations.len();
    assert!(
        junit.contains(&format!(
            "<testsuite name=\"control\" package=\"termlab\" id=\"0\" tests=\"{cases}\" failures=\"0\" errors=\"0\""
        )),
        "{junit}"
    );
    assert_eq!(junit.matches("<testcase ").count(), cases, "{junit}");
    // The console's end: the guest's kernel booted.
    assert!(junit.contains("<system-out>") && junit.contains("termlab-agent"), "{junit}");
    std::fs::remove_dir_all(results).expect("cleanup");
}

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn a_broken_expectation_fails_the_run_and_is_named() {
    let results = scratch("broken");
    let control =
        std::fs::read_to_string(repo_root().join("scenarios/control.toml")).expect("control.toml");
    // The copy lives elsewhere: its program's source path must still find the demo.
    let control = control
        .replace("\"../guest-samples/", &format!("\"{}/guest-samples/", repo_root().display()));
    let broken = control.replace(
        "name = \"both slow helpers ran (at least two delays)\"\nmetric = { metric = \"full_run\", at_least_ms = 1950 }",
        "name = \"deliberately broken: a run lasts a minute\"\nmetric = { metric = \"full_run\", at_least_ms = 60000 }",
    );
    assert_ne!(broken, control, "control.toml changed: update this test's replacement");
    let scenario = results.join("broken-control.toml");
    std::fs::write(&scenario, broken).expect("write scenario");
    let (code, stdout, result, explain) = run(&scenario, &results, &["--quiet"], &[]);
    assert_eq!(code, Some(1), "{explain}");
    assert!(
        stdout.contains("FAIL: failed: deliberately broken: a run lasts a minute"),
        "{explain}"
    );
    assert!(result.complete, "the run itself completed: {explain}");
    let broken = result
        .expectations
        .iter()
        .find(|e| e.name.starts_with("deliberately broken"))
        .expect("present");
    assert!(!broken.passed && broken.failed_repetitions == vec![0, 1], "{broken:?}");
    // The JUnit failure carries what was observed.
    let junit = std::fs::read_to_string(junit_file(&results)).expect("junit.xml");
    assert!(junit.contains("failures=\"1\" errors=\"0\""), "{junit}");
    assert!(
        junit.contains(&format!("observed: {}", broken.detail.replace('<', "&lt;"))),
        "{junit}"
    );
    assert!(result
        .expectations
        .iter()
        .filter(|e| !e.name.starts_with("deliberately"))
        .all(|e| e.passed));
    std::fs::remove_dir_all(results).expect("cleanup");
}

/// `termlab run --json` prints the result and nothing else on stdout, also when the run
/// happens inside the nested L1 VM (whose console goes to stderr): `| jq` works. With
/// `--events`, stderr has the run's progress as JSON events instead of status lines.
#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn json_output_is_one_json_document_and_nothing_else() {
    let results = scratch("json");
    let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .args(["--events", "run", "--json", "--repeat", "1", "--results"])
        .arg(&results)
        .arg(repo_root().join("scenarios/control.toml"))
        .output()
        .expect("termlab runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(document["complete"], serde_json::Value::Bool(true), "{document}");
    // Lines that are no JSON object are the nested L1's console, for people.
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["booting", "booted", "repetition_done"], "stderr:\n{stderr}");
    assert!(events.iter().all(|e| e["scenario"] == "control"), "stderr:\n{stderr}");
    assert!(events[2]["took_s"].as_f64().is_some_and(|s| s > 0.0), "{}", events[2]);
    assert!(!stderr.contains("[control] booting"), "status lines too:\n{stderr}");
    std::fs::remove_dir_all(results).expect("cleanup");
}

/// One scenario on two kernels (the default variant, and the same build given by the path of
/// its bzImage): a run directory per kernel, both pass, and the side-by-side report next to
/// them names both kernels.
#[test]
#[ignore = "boots the guest twice: minutes; needs the kernel build and the agent"]
fn one_scenario_on_two_kernels_side_by_side() {
    let results = scratch("two-kernels");
    let build = Command::new(repo_root().join("guest-kernel/build"))
        .args(["--print-dir", "--quiet"])
        .output()
        .expect("guest-kernel/build runs");
    assert!(build.status.success(), "the default kernel is not built");
    let build_dir = PathBuf::from(String::from_utf8_lossy(&build.stdout).trim());
    let by_path = build_dir.file_name().expect("name").to_string_lossy().into_owned();
    let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .args(["--quiet", "run", "--repeat", "1", "--kernel", "default", "--kernel"])
        .arg(build_dir.join("bzImage"))
        .arg("--results")
        .arg(&results)
        .arg(repo_root().join("scenarios/control.toml"))
        .output()
        .expect("termlab runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let explain =
        format!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{explain}");
    let groups: Vec<PathBuf> = std::fs::read_dir(results.join("control"))
        .expect("results/control")
        .map(|entry| entry.expect("entry").path())
        .collect();
    let [group] = groups.as_slice() else { panic!("one run of control: {groups:?}") };
    for label in ["default", by_path.as_str()] {
        let result = RunResult::load(&group.join(label)).expect("the kernel's result.json");
        assert!(result.complete && result.all_expectations_passed(), "{label}: {explain}");
        assert_eq!(result.repetitions.len(), 1);
        assert_eq!(result.environment.kernel.label.as_deref(), Some(label));
        assert!(group.join(label).join("report.html").is_file(), "{label}");
    }
    assert_eq!(
        std::fs::read_dir(group)
            .expect("group")
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
            .count(),
        2,
        "a directory per kernel and nothing else"
    );
    let report = std::fs::read_to_string(group.join("report.md")).expect("side-by-side report.md");
    assert!(report.starts_with("# termlab comparison of 2 runs"), "{report}");
    for column in ["control (default, ", &format!("control ({by_path}, ")] {
        assert!(report.contains(column), "`{column}` missing:\n{report}");
    }
    assert!(group.join("report.html").is_file());
    assert!(
        stdout.contains(&format!(
            "control on 2 kernels: default pass, {by_path} pass; side by side in "
        )),
        "{explain}"
    );
    std::fs::remove_dir_all(results).expect("cleanup");
}
