//! The shipped scenarios parse, and broken ones are refused with the exact
//! position and key of the mistake.

use std::path::{Path, PathBuf};

use termlab::scenario::{self, ScenarioError};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

#[test]
fn every_shipped_scenario_loads_with_a_description() {
    let dir = repo_root().join("scenarios");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("scenarios/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                !loaded.scenario.description.trim().is_empty(),
                "{} has an empty description",
                path.display()
            );
            assert!(
                !loaded.scenario.description.contains('\n'),
                "{}: description must be one line",
                path.display()
            );
            names.push(loaded.name);
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "budget",
            "budget-off",
            "callbacks",
            "control",
            "errors",
            "host-stall",
            "loops",
            "loops-bpf-text",
            "loops-subprog",
            "two-cpus"
        ]
    );
    // Program types (the program-types suite): every one boots the full kernel.
    let mut types = Vec::new();
    for entry in std::fs::read_dir(dir.join("types")).expect("scenarios/types/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                loaded.scenario.vm.kernel,
                scenario::KernelVariant::Full,
                "{}",
                path.display()
            );
            assert!(!loaded.scenario.description.trim().is_empty(), "{}", path.display());
            types.push(loaded.name);
        }
    }
    types.sort();
    assert_eq!(
        types,
        [
            "cgroup",
            "find_vma",
            "iterator",
            "kprobe",
            "kprobe-int3",
            "kptr",
            "rcu",
            "ringbuf",
            "sched_ext",
            "skeleton",
            "sockref",
            "spinlock",
            "sysctl",
            "tailcall",
            "tailcall_fentry",
            "task_iter",
            "tc",
            "tp_btf",
            "trampoline",
            "user_ringbuf",
            "veth",
            "wq",
            "xdp"
        ]
    );
    // Campaigns: long runs by hand, outside the test command's scenarios/*.toml.
    for campaign in ["stress", "leaks"] {
        let path = repo_root().join(format!("scenarios/campaigns/{campaign}.toml"));
        let campaign = scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!campaign.scenario.description.trim().is_empty());
    }
}

/// (file, line, column, key, words of the message)
const BAD_FILES: &[(&str, usize, usize, &str, &str)] = &[
    ("unknown-key.toml", 13, 47, "step[0].trigger.cpus", "unknown field `cpus`"),
    (
        "unknown-requirement.toml",
        5,
        28,
        "vm.requires[1]",
        "unknown variant `btf`, expected `termination`",
    ),
    (
        "wrong-type.toml",
        13,
        60,
        "step[0].trigger.background",
        "invalid type: string \"yes\", expected a boolean",
    ),
    ("missing-field.toml", 3, 1, "vm", "missing field `kernel`"),
    ("vcpus-range.toml", 6, 9, "vm.vcpus", "vcpus must be between 1 and 8, not 9"),
    ("cpu-range.toml", 13, 53, "step[0].trigger.cpu", "cpu 2 does not exist"),
    ("unknown-program.toml", 13, 38, "step[0].trigger.program", "no [[program]] is named `lops`"),
    (
        "cgroup-outside.toml",
        9,
        10,
        "program[0].cgroup",
        "`/tmp/mine` is not a directory below /sys/fs/cgroup/",
    ),
    (
        "xdp-name-too-long.toml",
        9,
        7,
        "program[0].xdp",
        "`interface01` is not an interface name of 1 to 10 letters",
    ),
    ("xdp-not-attached.toml", 9, 7, "program[0].xdp", "not with `attach = false`, `cgroup`"),
    ("tc-and-xdp.toml", 9, 7, "program[0].xdp", "or another interface key"),
    (
        "kmemleak-clean-of-a-trigger.toml",
        17,
        27,
        "expect[0].kmemleak_clean.step",
        "a kmemleak step",
    ),
    (
        "summary-line-two-words.toml",
        11,
        16,
        "program[0].summary_line",
        "`stress mode` is not one word",
    ),
    (
        "verify-stack.toml",
        2,
        16,
        "verify_stack",
        "verify_stack checks the stack rewrite of terminate steps, and this scenario has none",
    ),
    (
        "premise-dmesg.toml",
        9,
        1,
        "expect[0]",
        "`premise` needs a check of one repetition's records",
    ),
    (
        "verify-stack-mode.toml",
        2,
        16,
        "verify_stack",
        "invalid value: string \"sometimes\", expected true, false or \"alternate\"",
    ),
    (
        "bad-event.toml",
        18,
        6,
        "metric[0].to",
        "`run.finish` is not `<step label>.<point>` with point one of start, end",
    ),
    (
        "kernel-point-on-trigger.toml",
        18,
        6,
        "metric[0].to",
        "`run.request`: only terminate steps have the request's trace points",
    ),
    ("never-waited.toml", 13, 21, "step[0].trigger.background", "is never waited for"),
    ("waited-twice.toml", 19, 17, "step[2].wait.step", "`run` is waited for twice"),
    (
        "trace-after-wait.toml",
        19,
        23,
        "step[2].wait_trace.step",
        "`run` has already been waited for",
    ),
    ("two-checks.toml", 15, 1, "expect[0]", "needs exactly one of"),
    ("syntax.toml", 7, 17, "(syntax)", "unclosed inline table"),
    (
        "trace-not-background.toml",
        16,
        23,
        "step[1].wait_trace.step",
        "is not an earlier background trigger",
    ),
    ("unknown-errno.toml", 17, 42, "expect[0].terminate_result.errno", "unknown variant `ENOPE`"),
    (
        "budget-negative.toml",
        13,
        50,
        "step[0].budget.ms",
        "invalid value: integer `-5`, expected u32",
    ),
    (
        "terminations-not-info.toml",
        20,
        40,
        "expect[0].terminations.to",
        "`run` is not a prog_info step",
    ),
    (
        "exec-bad.toml",
        10,
        34,
        "step[1].exec.argv",
        "a command needs at least a non-empty program name",
    ),
    ("exec-unknown-key.toml", 7, 44, "step[0].exec.timeout", "unknown field `timeout`"),
    (
        "exec-label-twice.toml",
        10,
        18,
        "step[1].exec.label",
        "label `setup` is used by an earlier step",
    ),
    (
        "tail-target-triggered.toml",
        18,
        38,
        "step[0].trigger.program",
        "`worker` runs only through `chain`, whose loader loads it (`loaded_by`): trigger `chain`",
    ),
    (
        "loaded-by-own-loader.toml",
        14,
        13,
        "program[1].loaded_by",
        "`stress` is loaded neither from an `object` or `source` by the generic loader nor by a `loader_source` of its own",
    ),
    (
        "tail-target-first.toml",
        8,
        13,
        "program[0].loaded_by",
        "no [[program]] before this one is named `chain`",
    ),
    (
        "tail-target-trigger.toml",
        16,
        11,
        "program[1].trigger",
        "`trigger` does not go with `loaded_by`",
    ),
    (
        "skeleton-without-source.toml",
        9,
        17,
        "program[0].loader_source",
        "`loader_source` goes with `source`",
    ),
    (
        "skeleton-function.toml",
        10,
        12,
        "program[0].function",
        "a `loader_source` loads and runs its program itself",
    ),
    (
        "skeleton-no-bpf-name.toml",
        9,
        17,
        "program[0].loader_source",
        "a program with a `loader_source` also needs `bpf_name`",
    ),
    ("clang-command.toml", 9, 9, "program[0].clang", "`sh -c reboot` is not `clang` or `clang-N`"),
    ("clang-without-source.toml", 9, 9, "program[0].clang", "`clang` goes with `source`"),
    (
        "host-stall-alternate.toml",
        14,
        66,
        "step[0].terminate.host_stall_ms",
        "keeps every other one untouched",
    ),
    ("host-stall-range.toml", 14, 66, "step[0].terminate.host_stall_ms", "lasts 1 to 5000 ms"),
];

/// The fault scenarios of tests/faults.rs load, and an `exec` step keeps its
/// command, timeout and label (usable by metrics).
#[test]
fn fault_scenarios_load_and_exec_steps_parse() {
    let dir = repo_root().join("termlab/tests/faults");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/faults/ exists") {
        let loaded =
            scenario::load(&entry.expect("entry").path()).unwrap_or_else(|e| panic!("{e}"));
        names.push(loaded.name);
    }
    names.sort();
    assert_eq!(names, ["agent-killed", "hang", "interrupt", "panic", "unkillable", "vsock-closed"]);

    let text = "description = \"x\"\n[vm]\nkernel = \"default\"\n\
                [[step]]\nexec = { label = \"a\", argv = [\"sh\", \"-c\", \"true\"], timeout_ms = 1500 }\n\
                [[metric]]\nname = \"m\"\nfrom = \"a.start\"\nto = \"a.end\"\n";
    let parsed = scenario::parse(text).unwrap_or_else(|e| panic!("{e:?}"));
    match &parsed.steps[0] {
        scenario::Step::Exec(exec) => {
            assert_eq!(exec.label.get_ref().as_str(), "a");
            assert_eq!(exec.argv.as_slice(), ["sh", "-c", "true"]);
            assert_eq!(exec.timeout_ms.get(), 1500);
        }
        other => panic!("{other:?}"),
    }
    let kernel_point = text.replace("a.end", "a.returned");
    let error = scenario::parse(&kernel_point).expect_err("exec has no kernel trace points");
    assert!(
        format!("{error:?}").contains("only terminate and trigger steps have kernel trace points"),
        "{error:?}"
    );
}

#[test]
fn bad_scenarios_name_file_line_column_and_key() {
    let dir = repo_root().join("termlab/tests/bad-scenarios");
    let mut checked = 0;
    for &(file, want_line, want_column, want_key, want_words) in BAD_FILES {
        let path = dir.join(file);
        match scenario::load(&path) {
            Err(ScenarioError::Invalid { path: got_path, line, column, key, message }) => {
                assert_eq!(got_path, path);
                assert_eq!((line, column), (want_line, want_column), "{file}: {message}");
                assert_eq!(key, want_key, "{file}");
                assert!(message.contains(want_words), "{file}: `{message}` lacks `{want_words}`");
                let shown = format!("{}", scenario::load(&path).expect_err("still invalid"));
                assert!(
                    shown.starts_with(&format!("{}:{line}:{column}: `{key}`", path.display())),
                    "{shown}"
                );
            }
            other => panic!("{file}: expected an Invalid error, got {other:?}"),
        }
        checked += 1;
    }
    // Every bad file in the directory is covered by the table.
    let on_disk = std::fs::read_dir(&dir).expect("bad-scenarios/ exists").count();
    assert_eq!(checked, on_disk);
}

#[test]
fn missing_file_is_a_read_error() {
    let error = scenario::load(Path::new("/nonexistent/x.toml")).expect_err("no such file");
    assert!(matches!(error, ScenarioError::Read { .. }));
    assert!(error.to_string().contains("/nonexistent/x.toml"));
}
