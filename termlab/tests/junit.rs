//! `--junit`: the document termlab writes is valid against two real JUnit
//! schemas (tests/data/junit/: Apache Ant's strict one and Jenkins xUnit's),
//! checked with `xmllint --schema` (Debian package libxml2-utils), for runs
//! that passed, failed an expectation, stopped early, or never got a
//! results directory. Built from RunResult values, without booting; the
//! nested end-to-end test validates a real run's file the same way.

#[path = "support/junit_schema.rs"]
mod junit_schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use junit_schema::validate;

use termlab::exit::ExitClass;
use termlab::junit::{junit_xml, RunError, ScenarioReport};
use termlab::results::{
    Environment, ExpectationOutcome, HostInfo, KernelInfo, Repetition, RunResult, ScenarioRecord,
    VmInfo, VmmInfo, SCHEMA_VERSION,
};

fn expectation(name: &str, passed: bool, detail: &str, failed: &[u32]) -> ExpectationOutcome {
    ExpectationOutcome {
        name: name.to_owned(),
        check: format!("{name} <= 400 ms"),
        passed,
        detail: detail.to_owned(),
        failed_repetitions: failed.to_vec(),
    }
}

fn result(name: &str, expectations: Vec<ExpectationOutcome>, complete: bool) -> RunResult {
    let mut result = RunResult {
        schema_version: SCHEMA_VERSION,
        complete,
        incomplete_reason: (!complete).then(|| "the guest hung".to_owned()),
        scenario: ScenarioRecord {
            name: name.to_owned(),
            path: format!("scenarios/{name}.toml"),
            description: "a <test> & \"quotes\"".to_owned(),
            source: String::new(),
            repetitions: 2,
        },
        started_at: "2026-05-01T10:20:30Z".to_owned(),
        finished_at: Some("2026-05-01T10:21:00Z".to_owned()),
        environment: Environment {
            termlab_version: "0.1.0".into(),
            host: HostInfo {
                hostname: "ci-runner".into(),
                kernel_release: "6.1.0".into(),
                cpu_model: "x".into(),
                cpus: 2,
                memory_mib: 1024,
            },
            nested: true,
            vmm: VmmInfo { name: "termlab-vmm".into(), version: "0.1.0".into() },
            kernel: KernelInfo {
                variant: "default".into(),
                label: None,
                dir: "/var/cache/termlab/kernel/default-x".into(),
                source_version: Some("6.12.1".into()),
                patch_series_sha256: None,
                config_sha256: None,
                build_info: serde_json::json!({}),
                image: None,
                image_sha256: None,
                image_version: None,
                booted_vmlinux: None,
                system_map: None,
            },
            vm: VmInfo { vcpus: 2, memory_mib: 256, cmdline: "console=ttyS0".into() },
        },
        repetitions: (0..2)
            .map(|index| Repetition {
                index,
                steps: Vec::new(),
                metrics: BTreeMap::from([("end_to_end".to_owned(), 1e6 * f64::from(index + 1))]),
                vmm_stops: false,
            })
            .collect(),
        void_repetitions: Vec::new(),
        summary: Vec::new(),
        expectations,
        timings: None,
    };
    result.summarize();
    result
}

#[test]
fn junit_of_every_kind_of_run_is_valid_and_says_what_happened() {
    let passed = result(
        "control",
        vec![expectation("both ran", true, "2.0 s", &[]), expectation("exit 0", true, "0", &[])],
        true,
    );
    let failed = result(
        "loops",
        vec![
            expectation("fast", false, "worst 612.3 ms (repetition 1)", &[1]),
            expectation("stopped", true, "yes", &[]),
        ],
        true,
    );
    let stopped = result("hang", Vec::new(), false);
    let console = vec![
        "[    1.0] Linux version 6.12".to_owned(),
        // What real consoles carry: escape codes, NUL, markup characters.
        "\u{1b}[0m<init> & \"agent\"\u{0} started\r".to_owned(),
    ];
    let control_path = PathBuf::from("scenarios/control.toml");
    let loops_path = PathBuf::from("scenarios/loops.toml");
    let hang_path = PathBuf::from("termlab/tests/faults/hang.toml");
    let panic_path = PathBuf::from("termlab/tests/faults/panic.toml");
    let reports = [
        ScenarioReport {
            name: "control",
            path: &control_path,
            result: Some(&passed),
            dir: Some(Path::new("results/control/x")),
            seconds: 25.5,
            console_tail: console.clone(),
            error: None,
        },
        ScenarioReport {
            name: "loops",
            path: &loops_path,
            result: Some(&failed),
            dir: Some(Path::new("results/loops/x")),
            seconds: 30.0,
            console_tail: console.clone(),
            error: None,
        },
        ScenarioReport {
            name: "hang",
            path: &hang_path,
            result: Some(&stopped),
            dir: Some(Path::new("results/hang/x")),
            seconds: 61.0,
            console_tail: console,
            error: Some(RunError {
                class: ExitClass::Finding,
                message: "the guest hung: no answer\nGuest console, last lines:\n  <x>".into(),
            }),
        },
        ScenarioReport {
            name: "panic",
            path: &panic_path,
            result: None,
            dir: None,
            seconds: 0.1,
            console_tail: Vec::new(),
            error: Some(RunError {
                class: ExitClass::Infrastructure,
                message: "the `default` guest kernel is not built yet".into(),
            }),
        },
    ];
    let xml = junit_xml(&reports, "2026-05-01T11:00:00Z", "localhost");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("junit.xml");
    std::fs::write(&file, &xml).expect("write");
    validate(&file).unwrap_or_else(|e| panic!("{e}\n{xml}"));

    // One suite per scenario, one case per expectation (+ `run` on an error).
    assert_eq!(xml.matches("<testsuite ").count(), 4, "{xml}");
    assert!(xml.contains("<testsuite name=\"control\" package=\"termlab\" id=\"0\" tests=\"2\" failures=\"0\" errors=\"0\""), "{xml}");
    assert!(xml.contains("<testsuite name=\"loops\" package=\"termlab\" id=\"1\" tests=\"2\" failures=\"1\" errors=\"0\""), "{xml}");
    assert!(xml.contains("<testsuite name=\"hang\" package=\"termlab\" id=\"2\" tests=\"1\" failures=\"0\" errors=\"1\""), "{xml}");
    assert!(xml.contains("timestamp=\"2026-05-01T10:20:30\" hostname=\"ci-runner\""), "{xml}");
    // A failure carries the check and the observed values.
    assert!(
        xml.contains("<failure type=\"expectation\" message=\"fast &lt;= 400 ms: observed worst 612.3 ms (repetition 1)\">check: fast &lt;= 400 ms\nobserved: worst 612.3 ms (repetition 1)\nfailed in repetitions (0-based, of 2): 1</failure>"),
        "{xml}"
    );
    // An early stop is an error case typed by its exit class.
    assert!(
        xml.contains("<error type=\"finding\" message=\"the guest hung: no answer\">"),
        "{xml}"
    );
    assert!(xml.contains("<error type=\"infrastructure\" message=\"the `default` guest kernel is not built yet\">"), "{xml}");
    // The console tail, escaped, without the characters XML cannot hold.
    assert!(xml.contains("<system-out>[    1.0] Linux version 6.12\n[0m&lt;init&gt; &amp; \"agent\" started&#13;</system-out>"), "{xml}");
    assert!(xml.contains("<property name=\"kernel.variant\" value=\"default\"/>"), "{xml}");
}

/// The validation really checks: a document missing what the Ant schema
/// requires is refused.
#[test]
fn the_schema_check_refuses_an_invalid_document() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("junit.xml");
    std::fs::write(
        &file,
        "<?xml version=\"1.0\"?>\n<testsuites><testsuite name=\"x\" tests=\"1\"><testcase name=\"y\"/></testsuite></testsuites>\n",
    )
    .expect("write");
    let error = validate(&file).expect_err("incomplete testsuite");
    assert!(error.contains("windyroad-JUnit.xsd"), "{error}");
}
