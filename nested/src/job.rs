//! The job directory of one L1 run (`/run/termlab/l1-jobs/job-<pid>-<n>`, mode 0700): the
//! script the L1 init runs, the mounts it makes, the command's stdout, its exit status, and
//! the request to signal it. Only root reads it: it holds the command line and environment.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::NestedError;
use crate::heartbeat;
use crate::mounts::quote;
use crate::NESTED_ENV;

/// The host environment the command gets inside L1, when set: what termlab, its tests and
/// the scripts they run read (`guest-kernel/build --print-dir` reads TERMLAB_CACHE and
/// TERMLAB_PATCH_DIR; the agent is found through CARGO_TARGET_DIR). Nothing else passes, so
/// no token (CARGO_REGISTRY_TOKEN, GITHUB_TOKEN, ...) reaches L1 or the job directory.
pub const PASSED_ENV: [&str; 14] = [
    "PATH",
    "HOME",
    "TERM",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "NO_COLOR",
    "CARGO_TARGET_DIR",
    "TERMLAB_ROOT",
    "TERMLAB_CACHE",
    "TERMLAB_AGENT",
    "TERMLAB_KERNEL_DIR",
    "TERMLAB_PATCH_DIR",
    "TERMLAB_VMM_LOG",
    "TERMLAB_EXEC_PREPARED",
];

/// The L1 init's script: the command, run by the host's `/bin/sh` chrooted into the host.
pub const SCRIPT_FILE: &str = "job";
/// The shell fragment that mounts the writable exports and the binds under /tmp.
pub const MOUNTS_FILE: &str = "mounts";
/// The command's stdout, which the launcher copies to its own stdout as it grows.
pub const STDOUT_FILE: &str = "stdout";
/// The command's exit status, written when it ends.
pub const RC_FILE: &str = "rc";
/// Why the job could not start the command (for example its directory is not visible).
pub const SETUP_ERROR_FILE: &str = "setup-error";
/// Asks the job script to signal the command; its content is the signal's name for `kill -s`.
pub const SIGNAL_FILE: &str = "signal";
/// A counter the launcher raises every second while it waits for the job: a job whose
/// launcher is gone (killed outright) is killed after [`LEASE_LIMIT_S`] seconds without a
/// change, so that it cannot keep a warm L1 (crate::warm) busy for ever.
pub const LEASE_FILE: &str = "lease";
/// Seconds of L1 time without a lease renewal after which the job's command is killed.
const LEASE_LIMIT_S: u32 = 60;
/// Written by a warm L1 when everything the job started has ended.
pub const ENDED_FILE: &str = "ended";
/// L1's second serial port: the terminal of an interactive command (the first one is L1's
/// console), joined by the launcher to its own stdin and stdout.
pub const TERMINAL_TTY: &str = "/dev/ttyS1";
/// Exit status of the job script when it cannot start the command (also in SETUP_ERROR_FILE).
const JOB_SETUP_FAILED: i32 = 125;

/// The size of the host's terminal, given to an interactive command's terminal in L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

/// The job script: enter `cwd`, set the passed environment, run `argv` with stdout into
/// [`STDOUT_FILE`] (stderr stays on the L1 console) or, given a `terminal`, with all three
/// on [`TERMINAL_TTY`] as its controlling terminal; pass on forwarded signals, and record
/// the exit status. `env` is the host environment; only [`PASSED_ENV`] and `extra_env`
/// names are taken from it.
pub fn script(
    dir: &Path,
    cwd: &Path,
    argv: &[OsString],
    env: impl IntoIterator<Item = (OsString, OsString)>,
    extra_env: &[String],
    terminal: Option<TerminalSize>,
) -> String {
    let in_dir = |name: &str| quote_os(dir.join(name).as_os_str());
    // Results written in L1 are readable on the host (0755 directories, 0644 files); the
    // job directory itself stays 0700.
    let mut script = String::from("umask 022\necho\n");
    let cwd_text = quote_os(cwd.as_os_str());
    let reason =
        quote(&format!("cannot enter the working directory {} inside the L1 VM", cwd.display()));
    script.push_str(&format!(
        "cd {cwd_text} || {{ echo {reason} > {}; exit {JOB_SETUP_FAILED}; }}\n",
        in_dir(SETUP_ERROR_FILE)
    ));
    let mut env: Vec<(OsString, OsString)> = env
        .into_iter()
        .filter(|(key, _)| {
            let key = key.to_string_lossy();
            PASSED_ENV.contains(&key.as_ref()) || extra_env.iter().any(|e| *e == key)
        })
        .filter(|(key, _)| {
            key.to_string_lossy().chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect();
    env.sort();
    for (key, value) in env {
        script.push_str(&format!("export {}={}\n", key.to_string_lossy(), quote_os(&value)));
    }
    script.push_str(&format!("export {NESTED_ENV}=1\n"));
    script.push_str(&heartbeat::start_script(&quote_os(dir.as_os_str())));
    let command: Vec<String> = argv.iter().map(|a| quote_os(a)).collect();
    // The command runs in the background so that a signal the host launcher
    // received (written to the job's `signal` file) can be passed on to it,
    // again every second until it ends: it may not have installed its
    // handler yet (a background command starts with SIGINT ignored).
    let command = command.join(" ");
    match terminal {
        None => script.push_str(&format!("{command} > {} &\n", in_dir(STDOUT_FILE))),
        // A session of its own with the port as controlling terminal, so that a Ctrl-C
        // typed on the host (a byte on the port) reaches it as SIGINT; -w: $! stays the
        // command's until it ends, even if setsid has to fork.
        Some(TerminalSize { rows, cols }) => script.push_str(&format!(
            "stty -F {TERMINAL_TTY} sane rows {rows} cols {cols}\n\
             setsid -w -c {command} <> {TERMINAL_TTY} >&0 2>&0 &\n"
        )),
    }
    script.push_str("child=$!\n");
    let signal_file = in_dir(SIGNAL_FILE);
    let lease_file = in_dir(LEASE_FILE);
    script.push_str(&format!(
        "(stale=0; while kill -0 $child 2>/dev/null; do\n\
         \x20 [ -e {signal_file} ] && kill -s \"$(cat {signal_file})\" $child 2>/dev/null\n\
         \x20 lease=$(cat {lease_file} 2>/dev/null); [ \"$lease\" = \"$last\" ] && stale=$((stale+1)) || stale=0; last=$lease\n\
         \x20 [ $stale -ge {LEASE_LIMIT_S} ] && {{ echo \"L1: the job's launcher is gone; killing the command\" >&2; kill -s KILL $child; }}\n\
         \x20 sleep 1; done) &\n"
    ));
    script.push_str("wait $child\nrc=$?\n");
    script.push_str(heartbeat::STOP_SCRIPT);
    script.push_str(&format!("echo $rc > {}\n", in_dir(RC_FILE)));
    script
}

/// Writes the job's files, readable by root only: the script, the mounts, an empty stdout
/// and the first lease.
pub fn write(dir: &Path, script: &str, mounts: &str) -> Result<(), NestedError> {
    let files =
        [(SCRIPT_FILE, script), (MOUNTS_FILE, mounts), (STDOUT_FILE, ""), (LEASE_FILE, "0")];
    for (name, content) in files {
        let path = dir.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(content.as_bytes()))
            .map_err(|e| NestedError::io("write job file", &path, e))?;
    }
    Ok(())
}

/// The command's exit status, or why it did not run: `Ok(None)` when L1 ended without either.
pub fn outcome(dir: &Path) -> Result<Option<i32>, NestedError> {
    if let Ok(reason) = fs::read_to_string(dir.join(SETUP_ERROR_FILE)) {
        return Err(NestedError::JobSetup(reason.trim().to_owned()));
    }
    match fs::read_to_string(dir.join(RC_FILE)) {
        Ok(rc) => rc.trim().parse().map(Some).map_err(|_| NestedError::L1Failed {
            qemu_status: format!("the job wrote a bad exit status {rc:?}"),
            cause: "the job script misbehaved",
            console_tail: Vec::new(),
        }),
        Err(_) => Ok(None),
    }
}

/// Renews the job's lease (see [`LEASE_FILE`]) with `count`.
pub fn renew_lease(dir: &Path, count: u64) {
    let partial = dir.join(".lease.tmp");
    let _ = fs::write(&partial, count.to_string())
        .and_then(|()| fs::rename(&partial, dir.join(LEASE_FILE)));
}

/// Asks the job script to signal the command (SIGINT stays SIGINT; SIGTERM and SIGHUP become
/// SIGTERM). False when the request cannot be written.
pub fn forward_signal(dir: &Path, signal: i32) -> bool {
    let name = if signal == libc::SIGINT { "INT" } else { "TERM" };
    let path = dir.join(SIGNAL_FILE);
    let partial = dir.join(".signal.tmp");
    fs::write(&partial, name).and_then(|()| fs::rename(&partial, &path)).is_ok()
}

/// Passed variables that name host paths the command reads (a file's directory is shared).
const PATH_ENV: [&str; 5] =
    ["CARGO_TARGET_DIR", "TERMLAB_ROOT", "TERMLAB_CACHE", "TERMLAB_AGENT", "TERMLAB_KERNEL_DIR"];

/// Host directories the command needs to see (only those under `/tmp` need a mount): its
/// working directory, the program's directory when it is given by path, `readable`, and
/// the paths in the passed [`PATH_ENV`] variables of `env`. Missing paths are left out.
pub fn visible_dirs(
    cwd: &Path,
    argv: &[OsString],
    readable: &[PathBuf],
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<PathBuf> {
    let program = argv.first().map(PathBuf::from).filter(|p| p.components().count() > 1);
    let named = env
        .into_iter()
        .filter(|(key, _)| PATH_ENV.iter().any(|name| key == name))
        .map(|(_, value)| PathBuf::from(value));
    let mut dirs = vec![cwd.to_owned()];
    for path in program.into_iter().chain(readable.iter().cloned()).chain(named) {
        let Ok(path) = cwd.join(path).canonicalize() else { continue };
        let dir = if path.is_dir() { Some(path.as_path()) } else { path.parent() };
        // /tmp itself stays L1's own tmpfs; only the cwd there is refused outright.
        if let Some(dir) = dir.filter(|d| *d != Path::new("/tmp")) {
            dirs.push(dir.to_owned());
        }
    }
    dirs
}

fn quote_os(text: &OsStr) -> String {
    quote(&String::from_utf8_lossy(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::tempdir::TempDir;

    fn os(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_the_allowed_environment_is_passed() {
        let env = [
            ("PATH", "/usr/bin"),
            ("CARGO_REGISTRY_TOKEN", "secret-xyz"),
            ("CARGO_HOME", "/root/.cargo"),
            ("TERMLAB_KERNEL_DIR", "/k"),
            ("TERMLAB_SOMETHING_ELSE", "no"),
            ("GITHUB_TOKEN", "secret-gh"),
            ("MY_EXTRA", "yes"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let script = script(
            Path::new("/run/j"),
            Path::new("/w"),
            &os(&["true"]),
            env,
            &["MY_EXTRA".to_owned()],
            None,
        );
        assert!(script.contains("export PATH='/usr/bin'\n"), "{script}");
        assert!(script.contains("export TERMLAB_KERNEL_DIR='/k'\n"), "{script}");
        assert!(script.contains("export MY_EXTRA='yes'\n"), "{script}");
        for absent in ["secret", "CARGO_HOME", "TERMLAB_SOMETHING_ELSE"] {
            assert!(!script.contains(absent), "{absent} passed:\n{script}");
        }
    }

    #[test]
    fn the_paths_the_command_reads_are_visible() {
        let scratch = TempDir::new(Path::new("/tmp"), "termlab-nested-test").expect("temp dir");
        let kernel = scratch.path().join("kernel");
        let agent = scratch.path().join("agent-dir/termlab-agent");
        fs::create_dir_all(&kernel).expect("kernel dir");
        fs::create_dir_all(agent.parent().expect("parent")).expect("agent dir");
        fs::write(&agent, "").expect("agent");
        let env = [
            ("TERMLAB_AGENT", agent.as_os_str()),
            ("HOME", scratch.path().as_os_str()),
            ("TERMLAB_CACHE", OsStr::new("/tmp/termlab-nested-test-missing")),
        ]
        .map(|(k, v)| (OsString::from(k), v.to_owned()));
        let program = scratch.path().join("bin/termlab").into_os_string();
        fs::create_dir_all(scratch.path().join("bin")).expect("bin");
        fs::write(&program, "").expect("program");
        let dirs = visible_dirs(Path::new("/work"), &[program], std::slice::from_ref(&kernel), env);
        let expected = [
            PathBuf::from("/work"),
            scratch.path().join("bin"),
            kernel,
            agent.parent().expect("parent").to_owned(),
        ];
        assert_eq!(dirs, expected);
    }

    #[test]
    fn job_files_are_private() {
        let job = TempDir::new(&std::env::temp_dir(), "termlab-nested-test").expect("temp dir");
        write(job.path(), "true\n", "").expect("write");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(job.path()), 0o700);
        for name in [SCRIPT_FILE, MOUNTS_FILE, STDOUT_FILE, LEASE_FILE] {
            assert_eq!(mode(&job.path().join(name)), 0o600, "{name}");
        }
    }

    /// The job script passes a forwarded signal to its command, sends the command's stdout
    /// to the job's stdout file and reports its own exit status (run here with the host's
    /// sh: the script is plain POSIX sh).
    #[test]
    fn job_script_passes_a_forwarded_signal_on() {
        let job = TempDir::new(&std::env::temp_dir(), "termlab-nested-test").expect("temp dir");
        let command: Vec<OsString> = os(&[
            "sh",
            "-c",
            "trap 'echo stopped; exit 42' TERM; echo $$ > \"$1\"; while :; do sleep 0.1; done",
            "sh",
        ])
        .into_iter()
        .chain([job.path().join("started").into_os_string()])
        .collect();
        let cwd = std::env::current_dir().expect("cwd");
        write(job.path(), &script(job.path(), &cwd, &command, [], &[], None), "")
            .expect("job files");
        let mut shell = Command::new("sh")
            .arg(job.path().join(SCRIPT_FILE))
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Never leave the command looping behind a failed assertion.
        let stop_all = |shell: &mut Child| {
            if let Some(pid) = fs::read_to_string(job.path().join("started"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) of the command this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = shell.kill();
            let _ = shell.wait();
        };
        while fs::read_to_string(job.path().join("started"))
            .map_or(true, |pid| !pid.ends_with('\n'))
        {
            if Instant::now() >= deadline {
                stop_all(&mut shell);
                panic!("the command never started");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(forward_signal(job.path(), libc::SIGTERM));
        loop {
            if let Some(status) = shell.try_wait().expect("wait") {
                assert!(status.success(), "{status}");
                break;
            }
            if Instant::now() >= deadline {
                stop_all(&mut shell);
                panic!("the command did not get the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(outcome(job.path()).expect("outcome"), Some(42));
        // Each CPU's sign of life was written, and its loop ended with the job.
        let first_beat = fs::read_to_string(job.path().join("alive-0")).expect("CPU 0's beat");
        assert!(first_beat.trim().parse::<u32>().is_ok_and(|n| n >= 1), "{first_beat:?}");
        // A killed loop may take a moment to go.
        let gone = Instant::now() + Duration::from_secs(5);
        while !processes_naming(job.path()).is_empty() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(20));
        }
        let beats = processes_naming(job.path());
        assert!(beats.is_empty(), "beat loops left running: {beats:?}");
        assert_eq!(fs::read_to_string(job.path().join(SIGNAL_FILE)).expect("signal"), "TERM");
        let stdout = fs::read_to_string(job.path().join(STDOUT_FILE)).expect("stdout");
        assert_eq!(stdout, "stopped\n");
    }

    /// Runs the job script of `dir` with the host's sh, its output dropped.
    fn run_quietly(dir: &Path) -> std::process::ExitStatus {
        Command::new("sh")
            .arg(dir.join(SCRIPT_FILE))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("sh runs")
    }

    /// A job whose lease is not renewed (its launcher is gone) has its command killed: here
    /// with the limit cut from 60 to 2 seconds, the script otherwise as L1 runs it.
    #[test]
    fn a_job_whose_lease_runs_out_is_killed() {
        let job = TempDir::new(&std::env::temp_dir(), "termlab-nested-test").expect("temp dir");
        let cwd = std::env::current_dir().expect("cwd");
        let full = script(job.path(), &cwd, &os(&["sleep", "600"]), [], &[], None);
        let limit = format!("-ge {LEASE_LIMIT_S} ]");
        assert!(full.contains(&limit), "{full}");
        write(job.path(), &full.replace(&limit, "-ge 2 ]"), "").expect("job files");
        let started = Instant::now();
        let status = run_quietly(job.path());
        assert!(status.success(), "{status}");
        assert_eq!(outcome(job.path()).expect("outcome"), Some(128 + libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    }

    /// Pids of the processes whose command line names something under `dir`.
    fn processes_naming(dir: &Path) -> Vec<u32> {
        let dir = dir.to_string_lossy().into_owned();
        fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&dir))
            })
            .collect()
    }

    #[test]
    fn a_missing_working_directory_is_a_setup_error_that_names_it() {
        let job = TempDir::new(&std::env::temp_dir(), "termlab-nested-test").expect("temp dir");
        let missing = job.path().join("not-here");
        write(job.path(), &script(job.path(), &missing, &os(&["true"]), [], &[], None), "")
            .expect("job files");
        let status = run_quietly(job.path());
        assert_eq!(status.code(), Some(JOB_SETUP_FAILED));
        match outcome(job.path()) {
            Err(NestedError::JobSetup(reason)) => {
                assert!(reason.contains(&missing.display().to_string()), "{reason}")
            }
            other => panic!("expected a setup error, got {other:?}"),
        }
    }
}
