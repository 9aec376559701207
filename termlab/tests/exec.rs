//! `termlab exec` end to end: a kernel given by path, exit codes and output
//! passed through (stdout and stderr each on its own stream, also through the
//! nested L1 VM), a vmtest.toml with two targets; and `termlab boot`'s shell on
//! the guest console, typed at through a terminal. Each boots the guest
//! (inside the nested L1 VM on hosts whose KVM cannot run Linux), so they
//! take minutes and need the guest kernel (`termlab kernel build`) and the
//! static agent. Run with `cargo test -p termlab --test exec -- --ignored
//! --test-threads 1`; TERMLAB_KERNEL_DIR picks the kernel build directory.

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
    let stderr = text(&output.stderr);
    // argv kept exact: "a b" stays one argument.
    assert!(stdout.contains("out: a b c\n"), "{stdout}");
    assert!(stderr.contains("err: two words"), "{stderr}");
    assert!(!stdout.contains("err: two words"), "the command's stderr is on stdout: {stdout}");
    assert!(stderr.contains("timings: boot"), "{stderr}");
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

/// A child process killed when the test ends early (a failed assertion): its L1 VM dies with
/// it (the launcher's QEMU has a parent-death signal).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A pseudo-terminal pair: (controller, the terminal a program gets as its stdio).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut controller, mut terminal) = (-1, -1);
    let size = libc::winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two fds into the locals; no name buffer, default termios.
    let rc = unsafe {
        libc::openpty(&mut controller, &mut terminal, std::ptr::null_mut(), std::ptr::null(), &size)
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned by nobody else.
    unsafe { (std::fs::File::from_raw_fd(controller), std::fs::File::from_raw_fd(terminal)) }
}

/// What the program on the terminal printed so far, collected by a reader thread.
struct Screen(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Screen {
    fn follow(mut controller: std::fs::File) -> Self {
        use std::io::Read;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = seen.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // EIO once the last holder of the terminal side closes it.
            while let Ok(n @ 1..) = controller.read(&mut buffer) {
                writer.lock().expect("screen lock").extend_from_slice(&buffer[..n]);
            }
        });
        Self(seen)
    }

    fn text(&self) -> String {
        text(&self.0.lock().expect("screen lock"))
    }

    /// Waits until `needle` shows up after byte `from`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize, timeout: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let screen = self.text();
            if let Some(at) = screen.get(from..).and_then(|rest| rest.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} not on the terminal within {timeout:?}:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

#[test]
#[ignore = "boots the guest: minutes; needs the kernel build and the agent"]
fn boot_gives_a_shell_on_the_guest_console_to_a_terminal() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    let kernel = bzimage();
    let (controller, terminal) = pty();
    let mut keyboard = controller.try_clone().expect("pty clone");
    let screen = Screen::follow(controller);
    let mut command = Command::new(env!("CARGO_BIN_EXE_termlab"));
    command
        .current_dir(repo_root())
        .args(["boot", "--vcpus", "1", "--kernel"])
        .arg(&kernel)
        .env_remove("TERMLAB_KERNEL_DIR")
        .stdin(terminal.try_clone().expect("pty clone"))
        .stdout(terminal.try_clone().expect("pty clone"))
        .stderr(terminal);
    // SAFETY: only async-signal-safe calls between fork and exec: a session of its own with
    // the terminal (its stdin) as controlling terminal, as a login shell has.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = KillOnDrop(command.spawn().expect("termlab boot starts"));
    drop(command);

    let ready = screen.wait_for("guest console:", 0, Duration::from_secs(600));
    // The guest's shell evaluates what is typed: the answer is not in the typed text.
    keyboard.write_all(b"echo $((6 * 7))-typed-at-the-terminal\n").expect("type");
    let answered = screen.wait_for("\n42-typed-at-the-terminal", ready, Duration::from_secs(120));
    keyboard.write_all(b"reboot -f\n").expect("type");
    screen.wait_for("VM ended", answered, Duration::from_secs(120));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            panic!("termlab boot did not end after the guest rebooted:\n{}", screen.text());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{}", screen.text());
    assert!(status.success(), "termlab boot: {status}\n{}", screen.text());
}
