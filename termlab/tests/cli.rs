//! The `termlab` binary without booting anything: exit codes 2 (usage,
//! scenario) and 3 (infrastructure) on real bad input, `--help` naming the
//! codes, selection (`--filter`, `--shard`) and `list --json`. Codes 0 and
//! 1 need a guest: tests/end_to_end.rs and tests/faults.rs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

/// `termlab ARGS` in the checkout, with no kernel override from the environment.
fn termlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .env_remove("TERMLAB_KERNEL_DIR")
        .args(args)
        .output()
        .expect("termlab runs")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("termlab-cli-{name}.")).tempdir().expect("temp dir")
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["run", "--help"]] {
        let output = termlab(args);
        assert_eq!(output.status.code(), Some(0));
        let help = String::from_utf8_lossy(&output.stdout);
        for line in ["Exit status:", "  0 ", "  1 ", "  2 ", "  3 ", "  130 "] {
            assert!(help.contains(line), "`{line}` missing from {args:?}:\n{help}");
        }
    }
    let help = String::from_utf8_lossy(&termlab(&["run", "--help"]).stdout).into_owned();
    for option in [
        "--junit <FILE>",
        "--filter <REGEX>",
        "--shard <I/N>",
        "--console",
        "--kernel <PATH|VARIANT>",
        "<RESULTS>/<scenario>/<time>/<kernel label>/",
        "the run stops there with status 2",
    ] {
        assert!(help.contains(option), "{option} missing:\n{help}");
    }
}

/// An invalid scenario is a usage error that names file:line:column, and
/// nothing runs (no results directory appears).
#[test]
fn an_invalid_scenario_exits_2_with_its_position() {
    let results = scratch("invalid");
    let bad = repo_root().join("termlab/tests/bad-scenarios/syntax.toml");
    let output = termlab(&[
        "run",
        "--results",
        results.path().to_str().expect("utf-8"),
        "scenarios/control.toml",
        bad.to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{}:7:17:", bad.display())), "{}", text(&output));
    assert!(stderr.contains("nothing was run"), "{}", text(&output));
    assert_eq!(std::fs::read_dir(results.path()).expect("dir").count(), 0);
}

#[test]
fn bad_paths_and_options_exit_2() {
    let cases: [(&[&str], &str); 8] = [
        (&["run", "/nonexistent/scenario.toml"], "cannot read scenario /nonexistent/scenario.toml"),
        (
            &["run", "--kernel-dir", "/nonexistent/kernel", "scenarios/control.toml"],
            "--kernel-dir /nonexistent/kernel: no such directory",
        ),
        (
            &["run", "--junit", "/nonexistent/dir/junit.xml", "scenarios/control.toml"],
            "the directory /nonexistent/dir does not exist",
        ),
        (
            &["run", "--filter", "^nothing-is-called-this$", "scenarios/control.toml"],
            "matches none of the 1 scenario(s) given",
        ),
        // clap's own usage errors: an invalid regular expression, a shard out of range.
        (&["run", "--filter", "(", "scenarios/control.toml"], "invalid value '(' for '--filter"),
        (&["run", "--shard", "5/4", "scenarios/control.toml"], "I must be between 1 and N"),
        (&["list", "/nonexistent/scenarios"], "cannot read /nonexistent/scenarios"),
        (
            &[
                "run",
                "--kernel",
                "default",
                "--kernel",
                "debug",
                "--kernel",
                "noterm",
                "--kernel",
                "default",
                "--kernel",
                "debug",
                "scenarios/control.toml",
            ],
            "--kernel given 5 times: a run compares at most 4 kernels",
        ),
    ];
    for (args, words) in cases {
        let output = termlab(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}\n{}", text(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(words),
            "{args:?}\n{}",
            text(&output)
        );
    }
}

/// A kernel build directory without its kernel is a broken installation,
/// not a finding and not a usage error.
#[test]
fn an_incomplete_kernel_build_exits_3() {
    let kernel = scratch("kernel");
    let output = termlab(&[
        "run",
        "--kernel-dir",
        kernel.path().to_str().expect("utf-8"),
        "scenarios/control.toml",
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("bzImage is missing from the kernel build"),
        "{}",
        text(&output)
    );
}

/// Without the tools that build the guest image (clang for the scenario's
/// program first) the run cannot start: infrastructure. PATH is emptied, so
/// the tool is really missing, and the cache is a fresh directory, so no
/// object compiled earlier stands in for it. The kernel is a bzImage header
/// (all that is read before the guest image is built).
#[test]
fn a_missing_tool_exits_3() {
    let kernel = scratch("tools");
    std::fs::write(kernel.path().join("bzImage"), fake_bzimage()).expect("write");
    std::fs::write(kernel.path().join("bpftool"), b"not used: clang is missing first")
        .expect("write");
    std::fs::write(kernel.path().join("build-info.json"), b"{}").expect("write");
    let cache = scratch("tools-cache");
    let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .env_remove("TERMLAB_KERNEL_DIR")
        .env("TERMLAB_CACHE", cache.path())
        .env("PATH", kernel.path())
        .args(["run", "--kernel-dir"])
        .arg(kernel.path())
        .arg("scenarios/control.toml")
        .output()
        .expect("termlab runs");
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot run clang") && stderr.contains("No such file"),
        "{}",
        text(&output)
    );
}

/// The start of a bzImage: its setup header with a version string, all
/// that termlab reads of a kernel before the guest image is built.
fn fake_bzimage() -> Vec<u8> {
    let mut image = vec![0u8; 0x1000];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x20E..0x210].copy_from_slice(&0x300u16.to_le_bytes());
    image[0x500..0x50c].copy_from_slice(b"6.12.0-test\0");
    image
}

/// A kernel directory named `name` under `parent`: a bzImage and, if
/// given, a System.map with `symbols`.
fn fake_kernel(parent: &Path, name: &str, symbols: Option<&str>) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("bzImage"), fake_bzimage()).expect("write");
    if let Some(symbols) = symbols {
        std::fs::write(dir.join("System.map"), symbols).expect("write");
    }
    dir.join("bzImage")
}

/// Several kernels: every scenario is checked against every kernel before
/// anything boots, and each pair that cannot run is named with its kernel
/// and its need; then status 2 and nothing written. Here two-cpus needs
/// System.map (verify_stack) and the series (terminate steps); control
/// needs the series (its demo-delay sysctl), which a kernel without
/// System.map cannot be checked for, so that pair is not refused.
#[test]
fn kernels_lacking_what_a_scenario_needs_are_named_and_nothing_runs() {
    let kernels = scratch("kernels");
    let text_only = "ffffffff81000000 T _text\n";
    let series = format!("{text_only}ffffffff82000000 D __tracepoint_bpf_prog_terminate_request\n");
    let patched = fake_kernel(kernels.path(), "patched", Some(&series));
    let no_map = fake_kernel(kernels.path(), "nomap", None);
    let no_series = fake_kernel(kernels.path(), "noseries", Some(text_only));
    let results = scratch("kernels-results");
    let output = termlab(&[
        "run",
        "--results",
        results.path().to_str().expect("utf-8"),
        "--kernel",
        patched.to_str().expect("utf-8"),
        "--kernel",
        no_map.to_str().expect("utf-8"),
        "--kernel",
        no_series.to_str().expect("utf-8"),
        "scenarios/two-cpus.toml",
        "scenarios/control.toml",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for refused in [
        format!("scenarios/two-cpus.toml on kernel nomap: verify_stack needs System.map for {}", no_map.display()),
        "scenarios/two-cpus.toml on kernel noseries: the kernel ".to_owned(),
        "scenarios/control.toml on kernel noseries: the kernel ".to_owned(),
        "this scenario sets the sysctl kernel.bpf_termination_demo_delay_ms, which needs the termination series".to_owned(),
        "a kernel lacks what a scenario needs: nothing was run (leave such a scenario out with --filter, or drop the kernel)".to_owned(),
    ] {
        assert!(stderr.contains(&refused), "`{refused}` missing:\n{}", text(&output));
    }
    assert_eq!(stderr.matches(" on kernel ").count(), 3, "{}", text(&output));
    assert!(!stderr.contains("on kernel patched"), "{}", text(&output));
    assert_eq!(std::fs::read_dir(results.path()).expect("dir").count(), 0, "nothing written");
}

/// A CO-RE source includes the kernel's vmlinux.h: on a kernel without BTF
/// (none beside its bzImage) the scenario is refused before anything boots,
/// with that reason and status 2.
#[test]
fn a_co_re_program_on_a_kernel_without_btf_is_refused_with_the_reason() {
    let kernels = scratch("nobtf");
    let series = "ffffffff81000000 T _text\n\
                  ffffffff82000000 D __tracepoint_bpf_prog_terminate_request\n";
    let kernel = fake_kernel(kernels.path(), "nobtf", Some(series));
    let results = scratch("nobtf-results");
    let output = termlab(&[
        "run",
        "--results",
        results.path().to_str().expect("utf-8"),
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "scenarios/types/kprobe.toml",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = format!(
        "kprobe.bpf.c includes vmlinux.h, but the kernel {} has no BTF header",
        kernel.display()
    );
    assert!(stderr.contains(&reason), "`{reason}` missing:\n{}", text(&output));
    assert_eq!(std::fs::read_dir(results.path()).expect("dir").count(), 0, "nothing written");
}

/// One scenario as `termlab list --json` prints it.
#[derive(serde::Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
#[serde(deny_unknown_fields)]
struct Listed {
    name: String,
    path: String,
    description: String,
    repetitions: u32,
    kernel: String,
    vcpus: u32,
}

fn list_json(args: &[&str]) -> Vec<Listed> {
    let mut all = vec!["--quiet", "list", "--json"];
    all.extend_from_slice(args);
    let output = termlab(&all);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}\n{}", text(&output)))
}

#[test]
fn list_json_describes_every_scenario() {
    let listed = list_json(&[]);
    let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"control") && names.contains(&"loops"), "{names:?}");
    let control = listed.iter().find(|s| s.name == "control").expect("control");
    assert_eq!(control.path, "scenarios/control.toml");
    assert_eq!(control.kernel, "default");
    assert_eq!(control.vcpus, 2);
    assert_eq!(control.repetitions, 5);
    assert!(control.description.starts_with("Control:"), "{control:?}");
    // --filter keeps the matching names only.
    let loops = list_json(&["--filter", "^loops"]);
    assert!(!loops.is_empty() && loops.iter().all(|s| s.name.starts_with("loops")), "{loops:?}");
}

/// The union of shards 1..N is the whole list, with no scenario twice, for
/// N from 1 to more shards than scenarios.
#[test]
fn shards_partition_the_scenarios() {
    let all: BTreeSet<Listed> = list_json(&[]).into_iter().collect();
    for count in 1..=all.len() + 1 {
        let mut union = BTreeSet::new();
        for index in 1..=count {
            for scenario in list_json(&["--shard", &format!("{index}/{count}")]) {
                assert!(union.insert(scenario.clone()), "{} twice with N={count}", scenario.name);
            }
        }
        assert_eq!(union, all, "N={count}");
    }
}

/// A shard with nothing in it runs nothing, passes, and still writes a
/// (valid, empty) JUnit file for the CI job to upload.
#[test]
fn an_empty_shard_passes_and_writes_an_empty_junit() {
    let dir = scratch("empty-shard");
    let junit = dir.path().join("junit.xml");
    let output = termlab(&[
        "run",
        "--shard",
        "2/2",
        "--junit",
        junit.to_str().expect("utf-8"),
        "scenarios/control.toml",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains("<testsuites>\n</testsuites>"), "{xml}");
}
