//! Users' own programs and guest files in scenarios (issue 16): the keys
//! `[[program]] object/source/function/attach/test_run`, `[vm] files` and
//! `[vm] kernel_args` parse, and every mistake is refused at the exact
//! file:line:col of the offending value, before anything is built or booted.

use std::path::{Path, PathBuf};

use termlab::scenario::{self, ScenarioError};
use termlab::user_programs;

/// A scenario directory outside the repository with the host files the
/// cases name: a BPF source, a compiled object (clang), and test data.
struct Workspace {
    dir: tempfile::TempDir,
}

const SOURCE: &str = "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
SEC(\"tracepoint/syscalls/sys_enter_sync\") int count(void *ctx) { return 0; }\n\
char LICENSE[] SEC(\"license\") = \"GPL\";\n";

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::Builder::new().prefix("termlab-keys.").tempdir().expect("tempdir");
        std::fs::write(dir.path().join("count.bpf.c"), SOURCE).expect("source");
        std::fs::write(dir.path().join("packet.bin"), [0u8; 64]).expect("data");
        let status = std::process::Command::new("clang")
            .args(["-target", "bpf", "-O2", "-g", "-I/usr/include/x86_64-linux-gnu", "-c"])
            .arg(dir.path().join("count.bpf.c"))
            .arg("-o")
            .arg(dir.path().join("count.bpf.o"))
            .status()
            .expect("clang runs");
        assert!(status.success(), "clang compiled the test object");
        Workspace { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` as a scenario file and loads it.
    fn load(&self, text: &str) -> (PathBuf, Result<scenario::LoadedScenario, ScenarioError>) {
        let path = self.path().join("case.toml");
        std::fs::write(&path, text).expect("scenario");
        let loaded = scenario::load(&path);
        (path, loaded)
    }
}

/// A scenario with one program and one trigger step of it.
fn scenario_text(vm_extra: &str, program: &str) -> String {
    format!(
        "description = \"x\"\n[vm]\nkernel = \"default\"\n{vm_extra}\n[[program]]\n{program}\n\
         [[step]]\ntrigger = {{ label = \"run\", program = \"p\" }}\n"
    )
}

/// 1-based line and column of the first occurrence of `needle`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let offset = text.find(needle).unwrap_or_else(|| panic!("`{needle}` not in the case"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    (line, offset - before.rfind('\n').map_or(0, |i| i + 1) + 1)
}

/// (what, [vm] lines, [[program]] lines, where the error points, key, words)
type Case = (&'static str, &'static str, &'static str, &'static str, &'static str, &'static str);

const BAD: &[Case] = &[
    (
        "no form",
        "",
        "name = \"p\"\ntrigger = [\"sync\"]",
        "\"p\"",
        "program[0].name",
        "needs exactly one of `object`",
    ),
    (
        "two forms",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\nsource = \"count.bpf.c\"\ntrigger = [\"sync\"]",
        "\"p\"",
        "program[0].name",
        "needs exactly one of `object`",
    ),
    (
        "function with a loader",
        "",
        "name = \"p\"\nloader = [\"x\"]\nbpf_name = \"p\"\ntrigger = [\"t\"]\nfunction = \"f\"",
        "\"f\"",
        "program[0].function",
        "`function` is for programs the generic loader loads; a `loader` loads and runs its program itself",
    ),
    (
        "loader without bpf_name",
        "",
        "name = \"p\"\nloader = [\"x\"]\ntrigger = [\"t\"]",
        "[\"x\"]",
        "program[0].loader",
        "also needs `bpf_name`",
    ),
    (
        "bpf_name with a source",
        "",
        "name = \"p\"\nsource = \"count.bpf.c\"\nbpf_name = \"count\"\ntrigger = [\"sync\"]",
        "\"count\"",
        "program[0].bpf_name",
        "name its C function with `function`",
    ),
    (
        "function not an identifier",
        "",
        "name = \"p\"\nsource = \"count.bpf.c\"\nfunction = \"not-a-name\"\ntrigger = [\"sync\"]",
        "\"not-a-name\"",
        "program[0].function",
        "is not a C function name",
    ),
    (
        "no trigger",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"",
        "\"p\"",
        "program[0].trigger",
        "needs `trigger`",
    ),
    (
        "trigger and test_run",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]\ntest_run = {}",
        "[\"sync\"]",
        "program[0].trigger",
        "not both",
    ),
    (
        "odd hex",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntest_run = { data_hex = \"abc\" }",
        "\"abc\"",
        "program[0].test_run.data_hex",
        "not an even, non-zero number of hex digits",
    ),
    (
        "hex and file",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntest_run = { data_hex = \"00\", data_file = \"packet.bin\" }",
        "\"packet.bin\"",
        "program[0].test_run.data_file",
        "give `data_hex` or `data_file`, not both",
    ),
    (
        "repeat 0",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntest_run = { repeat = 0 }",
        "0 }",
        "program[0].test_run.repeat",
        "repeat must be between 1 and 10000000, not 0",
    ),
    (
        "unknown program key",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]\nsection = \"x\"",
        "section",
        "program[0].section",
        "unknown field `section`",
    ),
    (
        "missing source",
        "",
        "name = \"p\"\nsource = \"missing.bpf.c\"\ntrigger = [\"sync\"]",
        "\"missing.bpf.c\"",
        "program[0].source",
        "missing.bpf.c: No such file or directory",
    ),
    (
        "object that is no BPF object",
        "",
        "name = \"p\"\nobject = \"count.bpf.c\"\ntrigger = [\"sync\"]",
        "\"count.bpf.c\"",
        "program[0].object",
        "not a BPF object",
    ),
    (
        "missing test data",
        "",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntest_run = { data_file = \"nope.bin\" }",
        "\"nope.bin\"",
        "program[0].test_run.data_file",
        "cannot read",
    ),
    (
        "relative guest path",
        "files = [{ host = \"packet.bin\", guest = \"bin/x\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"bin/x\"",
        "vm.files[0].guest",
        "is not an absolute guest file path",
    ),
    (
        "guest path with ..",
        "files = [{ host = \"packet.bin\", guest = \"/bin/../init\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"/bin/../init\"",
        "vm.files[0].guest",
        "no `..`",
    ),
    (
        "the agent's path",
        "files = [{ host = \"packet.bin\", guest = \"/bin/termlab-agent\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"/bin/termlab-agent\"",
        "vm.files[0].guest",
        "the harness's own file",
    ),
    (
        "under /tmp",
        "files = [{ host = \"packet.bin\", guest = \"/tmp/x\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"/tmp/x\"",
        "vm.files[0].guest",
        "is under /tmp",
    ),
    (
        "twice",
        "files = [{ host = \"packet.bin\", guest = \"/data/a\" }, { host = \"packet.bin\", guest = \"/data/a\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"/data/a\" }]",
        "vm.files[1].guest",
        "is listed twice",
    ),
    (
        "missing host file",
        "files = [{ host = \"absent\", guest = \"/data/a\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"absent\"",
        "vm.files[0].host",
        "is not a file",
    ),
    (
        "a dynamic binary alone",
        "files = [{ host = \"/bin/true\", guest = \"/bin/mytrue\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"/bin/true\"",
        "vm.files[0].host",
        "/bin/true is dynamically linked and the guest has no shared libraries: link it statically (e.g. gcc -static), or list its loader /lib64/ld-linux-x86-64.so.2 and libc.so.6 in",
    ),
    (
        "a dynamic binary with its loader but not libc",
        "files = [{ host = \"/bin/true\", guest = \"/bin/mytrue\" }, { host = \"/lib64/ld-linux-x86-64.so.2\", guest = \"/lib64/ld-linux-x86-64.so.2\" }]",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"/bin/true\"",
        "vm.files[0].host",
        "or list libc.so.6 in /lib or",
    ),
    (
        "a newline in kernel_args",
        "kernel_args = \"quiet\\nloglevel=3\"",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"quiet",
        "vm.kernel_args",
        "'\\n': only printable ASCII is allowed",
    ),
    (
        "the harness's console in kernel_args",
        "kernel_args = \"quiet console=ttyS1\"",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"quiet console",
        "vm.kernel_args",
        "`console=ttyS1`: the harness sets console, init, rdinit, panic, reboot itself",
    ),
    (
        "-- in kernel_args",
        "kernel_args = \"quiet -- x\"",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "\"quiet --",
        "vm.kernel_args",
        "would hand the rest of the command line to init",
    ),
    (
        "quotes in kernel_args",
        "kernel_args = 'dyndbg=\"file x +p\"'",
        "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]",
        "'dyndbg",
        "vm.kernel_args",
        "double quotes are not allowed",
    ),
];

#[test]
fn mistakes_in_program_and_vm_keys_name_file_line_column_and_key() {
    let workspace = Workspace::new();
    for &(what, vm_extra, program, at, want_key, want_words) in BAD {
        let text = scenario_text(vm_extra, program);
        let (path, loaded) = workspace.load(&text);
        let (want_line, want_column) = position_of(&text, at);
        match loaded {
            Err(ScenarioError::Invalid { line, column, key, message, .. }) => {
                assert_eq!((line, column), (want_line, want_column), "{what}: {message}");
                assert_eq!(key, want_key, "{what}: {message}");
                assert!(message.contains(want_words), "{what}: `{message}` lacks `{want_words}`");
                let shown = scenario::load(&path).expect_err("still invalid").to_string();
                assert!(shown.starts_with(&format!("{}:{line}:{column}: ", path.display())));
            }
            other => panic!("{what}: expected an Invalid error, got {other:?}"),
        }
    }
}

#[test]
fn a_second_program_with_the_same_name_points_at_its_name() {
    let workspace = Workspace::new();
    let program = "name = \"p\"\nobject = \"count.bpf.o\"\ntrigger = [\"sync\"]";
    let text = scenario_text("", &format!("{program}\n[[program]]\n{program}"));
    let (_, loaded) = workspace.load(&text);
    let second = text.match_indices("name = \"p\"").nth(1).expect("two").0 + "name = ".len();
    let line = text[..second].matches('\n').count() + 1;
    match loaded {
        Err(ScenarioError::Invalid { line: got, column, key, message, .. }) => {
            assert_eq!((got, column, key.as_str()), (line, 8, "program[1].name"), "{message}");
            assert!(message.contains("declared twice"), "{message}");
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn every_new_key_is_accepted_and_lands_in_the_guest_image_list() {
    let workspace = Workspace::new();
    // A dynamic binary is accepted with its loader and libraries; a static one as is.
    let vm = "files = [\n\
              { host = \"/bin/true\", guest = \"/bin/mytrue\" },\n\
              { host = \"/lib/x86_64-linux-gnu/libc.so.6\", guest = \"/lib/x86_64-linux-gnu/libc.so.6\" },\n\
              { host = \"/lib64/ld-linux-x86-64.so.2\", guest = \"/lib64/ld-linux-x86-64.so.2\" },\n\
              { host = \"/bin/busybox\", guest = \"/opt/box\" },\n\
              ]\nkernel_args = \"loglevel=3 bpf_jit_harden=0\"";
    let programs =
        "name = \"p\"\nobject = \"count.bpf.o\"\nfunction = \"count\"\ntrigger = [\"sync\"]\n\
                    [[program]]\nname = \"q\"\nobject = \"count.bpf.o\"\nattach = false\n\
                    test_run = { data_file = \"packet.bin\", repeat = 100 }";
    let (_, loaded) = workspace.load(&scenario_text(vm, programs));
    let loaded = loaded.unwrap_or_else(|e| panic!("{e}"));
    let vm = &loaded.scenario.vm;
    assert_eq!(
        vm.kernel_args.as_ref().map(|a| a.get_ref().as_str()),
        Some("loglevel=3 bpf_jit_harden=0")
    );
    assert_eq!(
        termlab::engine::cmdline(Some("loglevel=3")),
        format!("{} loglevel=3", termlab::engine::CMDLINE)
    );
    let [p, q] = &loaded.scenario.programs[..] else { panic!("two programs") };
    assert!(p.attaches() && p.is_user_object());
    assert!(!q.attaches());
    let test_run = q.test_run.as_ref().expect("test_run").get_ref();
    assert_eq!(test_run.repeat.get(), 100);

    // Objects given as such are not compiled: the list needs no cache. Sorted by guest path.
    let kernel = termlab::guest_image::KernelBuild {
        dir: PathBuf::from("/nonexistent"),
        bzimage: PathBuf::from("/nonexistent/bzImage"),
        vmlinux: None,
        system_map: None,
        bpftool: None,
        libbpf: None,
        vmlinux_h: None,
        info: serde_json::from_value(serde_json::json!(
            { "variant": "default", "dir": "/nonexistent", "build_info": null }
        ))
        .expect("kernel info"),
    };
    let files =
        user_programs::guest_files(workspace.path(), &loaded, &kernel).expect("guest files");
    let listed: Vec<(PathBuf, &str)> =
        files.iter().map(|f| (f.host.clone(), f.guest.as_str())).collect();
    let here = |name: &str| workspace.path().join(name);
    assert_eq!(
        listed,
        [
            (PathBuf::from("/bin/true"), "/bin/mytrue"),
            (here("count.bpf.o"), "/lib/termlab/programs/p.bpf.o"),
            (here("count.bpf.o"), "/lib/termlab/programs/q.bpf.o"),
            (here("packet.bin"), "/lib/termlab/programs/q.data"),
            (PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), "/lib/x86_64-linux-gnu/libc.so.6"),
            (PathBuf::from("/lib64/ld-linux-x86-64.so.2"), "/lib64/ld-linux-x86-64.so.2"),
            (PathBuf::from("/bin/busybox"), "/opt/box"),
        ]
    );
}
