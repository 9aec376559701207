//! `termlab run` when things go wrong (issue 8, "VMM → Faults"): the guest
//! kernel panics, the guest hangs, the agent is killed, the vsock connection
//! closes under a pending request, the user presses Ctrl-C. Each fault is made
//! real by a scenario in `tests/faults/` (no mocks), and each run must end with
//! a clear message, a non-zero exit, a result.json that parses and says
//! `complete: false` with the reason, and nothing left behind: no process, no
//! L1 job directory, no temporary file or vsock socket.
//!
//! These boot the guest (inside the nested L1 VM where this host's KVM cannot
//! run Linux): about a minute each. Run with
//! `cargo test --release -p termlab --test faults -- --ignored`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use termlab::results::RunResult;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("termlab/ has a parent").to_owned()
}

/// The launcher's job directories (nested/src/launch.rs): `job-<launcher pid>-<n>`.
const L1_JOBS: &str = "/run/termlab/l1-jobs";

/// One fault run's private directories, under the target dir: /tmp is a
/// private tmpfs inside the L1 VM, the target dir is shared with it.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("tmp")).expect("scratch dir");
        std::fs::create_dir_all(root.join("results")).expect("scratch dir");
        Scratch { root }
    }

    fn results(&self) -> PathBuf {
        self.root.join("results")
    }

    /// TMPDIR of the run: every temporary file or socket termlab makes on
    /// this side goes here, so "nothing left" is "this stays empty".
    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn termlab(scenario: &str, scratch: &Scratch) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_termlab"));
    command
        .current_dir(repo_root())
        .env("TMPDIR", scratch.tmp())
        .args(["--quiet", "run", "--results"])
        .arg(scratch.results())
        .arg(repo_root().join("termlab/tests/faults").join(scenario));
    command
}

/// What a finished fault run left: exit code, stdout + stderr, its result.
struct Ended {
    code: Option<i32>,
    output: String,
    result: RunResult,
    run_dir: PathBuf,
}

fn the_run_dir(scratch: &Scratch, scenario: &str) -> Option<PathBuf> {
    let stem = Path::new(scenario).file_stem().expect("stem").to_string_lossy().into_owned();
    let entry = std::fs::read_dir(scratch.results().join(stem)).ok()?.next()?.ok()?;
    Some(entry.path())
}

fn ended(scenario: &str, scratch: &Scratch, code: Option<i32>, output: String, began: Instant) -> Ended {
    eprintln!("{scenario}: exit {code:?} after {:.0?}", began.elapsed());
    let run_dir = the_run_dir(scratch, scenario).unwrap_or_else(|| panic!("{scenario}: no run directory\n{output}"));
    let result = RunResult::load(&run_dir).unwrap_or_else(|e| panic!("{scenario}: result.json does not load: {e}\n{output}"));
    Ended { code, output, result, run_dir }
}

fn run_fault(scenario: &str, scratch: &Scratch) -> (Ended, u32) {
    let began = Instant::now();
    let child = termlab(scenario, scratch).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("termlab starts");
    let pid = child.id();
    let output = child.wait_with_output().expect("termlab runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (ended(scenario, scratch, output.status.code(), text, began), pid)
}

/// Asserts what every fault run must show, `words` being in both the
/// printed error and the result's incomplete_reason.
fn assert_incomplete(run: &Ended, code: i32, words: &[&str]) {
    let output = &run.output;
    assert_eq!(run.code, Some(code), "exit status\n{output}");
    assert!(!run.result.complete, "result.json says complete\n{output}");
    let reason = run.result.incomplete_reason.as_deref().unwrap_or_else(|| panic!("no incomplete_reason\n{output}"));
    let error_line = output.lines().find(|line| line.contains("error:")).unwrap_or_else(|| panic!("no error line\n{output}"));
    for word in words {
        assert!(reason.contains(word), "incomplete_reason lacks `{word}`: {reason}");
        assert!(error_line.contains(word), "the error line lacks `{word}`: {error_line}\n{output}");
    }
    assert!(run.result.finished_at.is_some(), "finished_at not set: the final result was not written");
    // Written atomically: no temporary left next to it.
    for entry in std::fs::read_dir(&run.run_dir).expect("run dir") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "temporary file {name} left in {}", run.run_dir.display());
    }
}

/// Nothing of the run survives it: no process mentioning its scratch
/// directory or its L1 job, no L1 job directory, nothing in its TMPDIR.
fn assert_no_leftovers(scratch: &Scratch, termlab_pid: u32) {
    let job_prefix = format!("job-{termlab_pid}-");
    let job_path = format!("{L1_JOBS}/{job_prefix}");
    let scratch_path = scratch.root.to_string_lossy().into_owned();
    // QEMU and the VMM threads go with their process; give the kernel a moment to reap.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let survivors = processes_mentioning(&[&scratch_path, &job_path]);
        if survivors.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left behind: {survivors:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Ok(entries) = std::fs::read_dir(L1_JOBS) {
        let left: Vec<String> = entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&job_prefix)).collect();
        assert!(left.is_empty(), "L1 job directories left behind: {left:?}");
    }
    let left: Vec<PathBuf> = std::fs::read_dir(scratch.tmp()).expect("tmp").filter_map(Result::ok).map(|e| e.path()).collect();
    assert!(left.is_empty(), "temporary files or sockets left behind: {left:?}");
}

/// (pid, command line) of every process whose command line contains one of `needles`.
fn processes_mentioning(needles: &[&str]) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").expect("/proc").filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let mut bytes = Vec::new();
        if std::fs::File::open(entry.path().join("cmdline")).and_then(|mut f| f.read_to_end(&mut bytes)).is_err() {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&bytes).replace('\0', " ");
        if needles.iter().any(|needle| cmdline.contains(needle)) {
            found.push((pid, cmdline));
        }
    }
    found
}

#[test]
#[ignore = "boots the guest: about a minute; needs the kernel build and the agent"]
fn a_guest_kernel_panic_is_reported_with_the_console() {
    let scratch = Scratch::new("panic");
    let (run, pid) = run_fault("panic.toml", &scratch);
    assert_incomplete(&run, 1, &["the guest kernel panicked"]);
    let reason = run.result.incomplete_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("Kernel panic - not syncing") && reason.contains("Out of memory"), "the console tail is missing: {reason}");
    assert_no_leftovers(&scratch, pid);
}

#[test]
#[ignore = "boots the guest: about a minute; needs the kernel build and the agent"]
fn a_hung_guest_times_out_and_the_vm_is_killed() {
    let scratch = Scratch::new("hang");
    let (run, pid) = run_fault("hang.toml", &scratch);
    assert_incomplete(&run, 1, &["the guest hung", "exec `stop-agent`", "the VM was killed"]);
    let reason = run.result.incomplete_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("Guest console, last lines"), "no console tail: {reason}");
    assert_no_leftovers(&scratch, pid);
}

#[test]
#[ignore = "boots the guest: about a minute; needs the kernel build and the agent"]
fn a_killed_agent_is_named() {
    let scratch = Scratch::new("agent-killed");
    let (run, pid) = run_fault("agent-killed.toml", &scratch);
    assert_incomplete(&run, 1, &["vsock connection closed during exec `kill-agent`", "the agent died"]);
    let reason = run.result.incomplete_reason.as_deref().unwrap_or_default();
    // The guest's init says how its agent ended (SIGKILL: 128 + 9).
    assert!(reason.contains("/run-me exited with status 137"), "console tail: {reason}");
    assert_no_leftovers(&scratch, pid);
}

#[test]
#[ignore = "boots the guest: about a minute; needs the kernel build and the agent"]
fn a_vsock_connection_closed_by_the_guest_is_named() {
    let scratch = Scratch::new("vsock-closed");
    let (run, pid) = run_fault("vsock-closed.toml", &scratch);
    assert_incomplete(&run, 1, &["vsock connection closed during exec `unbind-vsock`", "still running without its agent connection; the VM was killed"]);
    assert_no_leftovers(&scratch, pid);
}

#[test]
#[ignore = "boots the guest: about a minute; needs the kernel build and the agent"]
fn ctrl_c_stops_the_run_with_a_partial_result() {
    let scratch = Scratch::new("interrupt");
    let scenario = "interrupt.toml";
    let began = Instant::now();
    let mut child: Child = termlab(scenario, &scratch).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("termlab starts");
    let pid = child.id();
    // Read the output on threads so that the pipes never fill.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Steps are running once the guest console shows the second repetition's marker
    // (then one repetition is in result.json).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let markers = the_run_dir(&scratch, scenario)
            .and_then(|dir| std::fs::read_to_string(dir.join("console.log")).ok())
            .map_or(0, |console| console.matches("termlab-faults: repetition running").count());
        if markers >= 2 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("termlab ended before the test interrupted it: {status}\n{}{}", out_thread.join().unwrap_or_default(), err_thread.join().unwrap_or_default());
        }
        if Instant::now() >= deadline {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = child.wait();
            panic!("no repetition ran within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{scenario}: steps running after {:.0?}; sending SIGINT", began.elapsed());
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let interrupted_at = Instant::now();
    let status = child.wait().expect("termlab ends");
    eprintln!("{scenario}: ended {:.0?} after SIGINT", interrupted_at.elapsed());
    let output = format!("{}{}", out_thread.join().unwrap_or_default(), err_thread.join().unwrap_or_default());
    let run = ended(scenario, &scratch, status.code(), output, began);
    assert_incomplete(&run, 130, &["interrupted"]);
    assert!(!run.result.repetitions.is_empty(), "the partial result lost the repetitions that ran");
    assert!(run.result.repetitions.len() < 1000);
    assert_no_leftovers(&scratch, pid);
}
