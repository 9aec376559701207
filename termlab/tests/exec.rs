//! `termlab exec` end to end: a kernel given by path, exit codes and output
//! passed through, a vmtest.toml with two targets. Each boots the guest
//! (inside the nested L1 VM on hosts whose KVM cannot run Linux), so they
//! take minutes and need the guest kernel (`termlab kernel build`) and the
//! static agent. Run with `cargo test -p termlab --test exec -- --ignored
//! --test-threads 1`; TERMLAB_KERNEL_DIR picks the kernel build directory.
//!
//! Inside L1 the command's stdout and stderr reach the host through one
//! console, so the tests look for stderr's text in either stream.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

/// The default kernel's bzImage, given to `--kernel` by path.
fn bzimage() -> PathBuf {
    let dir = match std::env::var_os("TERMLAB_KERNEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let output = Command::new(repo_root().join("guest-kernel/build"))
                .args(["--print-dir", "--quiet"])
                .output()
                .expect("guest-kernel/build runs");
            assert!(output.status.success(), "the default kernel is not built");
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
        }
    };
    dir.join("bzImage")
}

/// A scratch directory under the target dir: /tmp is a private tmpfs
/// inside the L1 VM, the target dir is shared with it.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("exec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn termlab(args: &[&str]) -> Output {
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_termlab"))
        .current_dir(repo_root())
        .args(args)
        .env_remove("TERMLAB_KERNEL_DIR")
        .output()
        .expect("termlab runs");
    eprintln!(
        "termlab {args:?}: {:?} in {:.1?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn exec_passes_the_exit_code_and_output_of_a_command_on_a_kernel_given_by_path() {
    let kernel = bzimage();
    let kernel = kernel.to_str().expect("UTF-8 path");
    let script = "echo \"out: $1 $2\"; echo 'err: two words' >&2; exit 42";
    let output = termlab(&[
        "exec",
        "--timings",
        "--kernel",
        kernel,
        "--",
        "sh",
        "-c",
        script,
        "sh",
        "a b",
        "c",
    ]);
    assert_eq!(output.status.code(), Some(42));
    let stdout = text(&output.stdout);
    // argv kept exact: "a b" stays one argument.
    assert!(stdout.contains("out: a b c\n"), "{stdout}");
    let both = stdout + &text(&output.stderr);
    assert!(both.contains("err: two words"), "{both}");
    assert!(both.contains("timings: boot"), "{both}");
}

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn exec_exits_0_and_1_with_the_command() {
    assert_eq!(termlab(&["exec", "--", "true"]).status.code(), Some(0));
    assert_eq!(termlab(&["exec", "--", "sh", "-c", "exit 1"]).status.code(), Some(1));
}

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn a_vmtest_toml_with_two_targets_reports_each_and_counts_the_failed() {
    let dir = scratch("vmtest");
    std::fs::write(dir.join("data.txt"), "from the host\n").expect("data file");
    std::fs::create_dir(dir.join("sub")).expect("sub dir");
    std::fs::write(dir.join("sub/check.sh"), "#!/bin/sh\ngrep -q host ../data.txt\n")
        .expect("script");
    std::fs::set_permissions(
        dir.join("sub/check.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let kernel = bzimage();
    let config = format!(
        "[[target]]\nname = \"reads-its-files\"\nkernel = \"{}\"\n\
         command = \"pwd && cat data.txt && cd sub && ./check.sh\"\n\
         [target.vm]\nnum_cpus = 1\nmemory = \"256M\"\n\n\
         [[target]]\nname = \"fails\"\nkernel = \"{}\"\ncommand = \"exit 3\"\n\
         kernel_args = \"quiet\"\n[target.vm]\nmemory = \"256M\"\n",
        kernel.display(),
        kernel.display()
    );
    let toml = dir.join("vmtest.toml");
    std::fs::write(&toml, config).expect("vmtest.toml");
    let toml = toml.to_str().expect("UTF-8 path");

    let output = termlab(&["exec", "--config", toml]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "one of two targets failed");
    assert!(stdout.contains("/mnt/vmtest\n"), "{stdout}");
    assert!(stdout.contains("from the host\n"), "{stdout}");
    assert!(stdout.contains("PASS reads-its-files"), "{stdout}");
    assert!(stdout.contains("FAILED fails (exit 3)"), "{stdout}");

    std::fs::remove_dir_all(dir).expect("cleanup");
}
