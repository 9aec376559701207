//! Running one command inside a throw-away L1 VM (QEMU TCG, `-cpu max` emulating SVM+NPT)
//! whose `/dev/kvm` is real, with the host's `/` shared over virtio-9p.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::NestedError;
use crate::image::{ensure_image, ensure_tools};
use crate::lock::FileLock;
use crate::tempdir::TempDir;
use crate::NESTED_ENV;

/// Environment passed into the job (everything else starts clean inside L1).
const PASSED_ENV_PREFIXES: [&str; 2] = ["TERMLAB_", "CARGO"];
const PASSED_ENV: [&str; 6] = ["PATH", "HOME", "RUSTUP_HOME", "RUST_LOG", "RUST_BACKTRACE", "TERM"];
/// One L1 job at a time per host: each L1 VM takes all the host's cores in software emulation.
const L1_LOCK: &str = "/run/termlab/l1.lock";
/// Job directories live on the host and are seen by L1 through the 9p root.
const JOBS_DIR: &str = "/run/termlab/l1-jobs";
/// Exit status the job script reports when it cannot enter the working directory.
const JOB_SETUP_FAILED: i32 = 125;
/// The file in the job directory that asks the job script to signal the command (its
/// content is the signal's name for `kill -s`).
const SIGNAL_FILE: &str = "signal";
/// How long the command in L1 gets to stop cleanly after a forwarded signal (stop its VM,
/// write its partial results) before the L1 VM is killed.
const SIGNAL_GRACE: Duration = Duration::from_secs(60);

/// Sizing and limits of the L1 VM.
#[derive(Debug, Clone)]
pub struct L1Options {
    pub mem_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// Where the L1 kernel and initramfs are cached.
    pub cache_dir: PathBuf,
    /// Give the command this terminal: QEMU's stdin and stdout are the launcher's (not
    /// /dev/null and the line filter), the L1 console is raw (no echo of its own), and Ctrl-C
    /// reaches the guest as a byte instead of signalling (`termlab boot`, `--keep-vm`).
    pub interactive: bool,
}

impl Default for L1Options {
    fn default() -> Self {
        Self {
            mem_mib: 4096,
            cpus: 2,
            timeout: Duration::from_secs(1800),
            cache_dir: "/var/cache/termlab/l1".into(),
            interactive: false,
        }
    }
}

/// Runs `argv` inside L1 in the current directory and returns its exit code. The command's
/// output is streamed to stdout as it runs. Ctrl-C/SIGTERM/SIGHUP are passed on to the command
/// (which then has a grace period to end cleanly); a second one kills the L1 VM.
pub fn run_in_l1(argv: &[OsString], options: &L1Options) -> Result<i32, NestedError> {
    ensure_tools()?;
    let image = ensure_image(&options.cache_dir)?;
    fs::create_dir_all("/run/termlab")
        .map_err(|e| NestedError::io("create", Path::new("/run/termlab"), e))?;
    let _lock = FileLock::exclusive(Path::new(L1_LOCK))?;
    let job = TempDir::new(Path::new(JOBS_DIR), "job")?;
    write_job_script(job.path(), argv, options.interactive)?;

    let signals = SignalGuard::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let mut qemu = spawn_qemu(&image, job.path(), options)?;
    let output =
        qemu.stdout.take().map(|stdout| std::thread::spawn(move || stream_console(stdout)));
    let ended = supervise(&mut qemu, &signals, options.timeout, job.path());
    if let Some(thread) = output {
        let _ = thread.join();
    }
    let qemu_status = ended?;
    let rc_path = job.path().join("rc");
    match fs::read_to_string(&rc_path) {
        Ok(rc) => rc
            .trim()
            .parse()
            .map_err(|_| NestedError::L1Failed { qemu_status: format!("bad rc {rc:?}") }),
        Err(_) => Err(NestedError::L1Failed { qemu_status }),
    }
}

/// POSIX shell single-quoting.
fn quote(arg: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(arg).replace('\'', r"'\''"))
}

fn write_job_script(dir: &Path, argv: &[OsString], interactive: bool) -> Result<(), NestedError> {
    let cwd =
        std::env::current_dir().map_err(|e| NestedError::io("get", Path::new("current dir"), e))?;
    let mut script = String::from("echo\n");
    script.push_str(&format!(
        "cd {} || exit {JOB_SETUP_FAILED}\n",
        quote(cwd.as_os_str().as_bytes())
    ));
    for (key, value) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        let passed = PASSED_ENV.contains(&key_text.as_ref())
            || PASSED_ENV_PREFIXES.iter().any(|p| key_text.starts_with(p));
        if passed && key_text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            script.push_str(&format!("export {key_text}={}\n", quote(value.as_bytes())));
        }
    }
    script.push_str(&format!("export {NESTED_ENV}=1\n"));
    let command: Vec<String> = argv.iter().map(|a| quote(a.as_bytes())).collect();
    // The command runs in the background so that a signal the host launcher
    // received (written to the job's `signal` file) can be passed on to it,
    // again every second until it ends: it may not have installed its
    // handler yet (a background command starts with SIGINT ignored).
    script.push_str(&command.join(" "));
    if interactive {
        // A background command's stdin is /dev/null unless redirected: hand it the console
        // (fd 3, saved before), made raw so that only the guest echoes what is typed.
        script.insert_str(0, "exec 3<&0\nstty raw -echo <&3 2>/dev/null\n");
        script.push_str(" <&3");
    }
    script.push_str(" &\nchild=$!\n");
    let signal_file = quote(dir.join(SIGNAL_FILE).as_os_str().as_bytes());
    script.push_str(&format!(
        "(while kill -0 $child 2>/dev/null; do [ -e {signal_file} ] && kill -s \"$(cat {signal_file})\" $child 2>/dev/null; sleep 1; done) &\n"
    ));
    script.push_str("wait $child\n");
    script.push_str(&format!("echo $? > {}\n", quote(dir.join("rc").as_os_str().as_bytes())));
    let path = dir.join("job");
    fs::write(&path, script).map_err(|e| NestedError::io("write job script", &path, e))
}

fn spawn_qemu(
    image: &crate::image::L1Image,
    job_dir: &Path,
    options: &L1Options,
) -> Result<Child, NestedError> {
    let append =
        format!("console=ttyS0 quiet loglevel=3 panic=-1 termlab.job={}", job_dir.display());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-no-reboot"]);
    if options.interactive {
        // -nographic's console, but Ctrl-C goes to the guest (signal=off); Ctrl-A x still
        // ends QEMU.
        cmd.args(["-display", "none", "-chardev", "stdio,id=console,mux=on,signal=off"])
            .args(["-serial", "chardev:console", "-mon", "chardev=console"])
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit());
    } else {
        cmd.arg("-nographic").stdin(Stdio::null()).stdout(Stdio::piped());
    }
    cmd.args(["-smp", &options.cpus.to_string(), "-m", &options.mem_mib.to_string()])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,id=host,multidevs=remap",
        ]);
    let interactive = options.interactive;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Undo the signal blocking we inherited, leave the terminal's process group (we
            // decide when QEMU dies), and die with the thread that launched us.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Interactive QEMU reads the terminal, which a background process group may not.
            if !interactive {
                libc::setpgid(0, 0);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| NestedError::io("start", Path::new("qemu-system-x86_64"), e))
}

/// Waits for QEMU, killing it on timeout. The first termination signal is passed on to the
/// command inside L1, which then has [`SIGNAL_GRACE`] to end (and L1 with it); a second one,
/// or the end of the grace period, kills the L1 VM.
fn supervise(
    qemu: &mut Child,
    signals: &SignalGuard,
    timeout: Duration,
    job_dir: &Path,
) -> Result<String, NestedError> {
    let mut deadline = Instant::now() + timeout;
    let mut forwarded: Option<i32> = None;
    loop {
        match qemu.try_wait() {
            Ok(Some(status)) => return Ok(status.to_string()),
            Ok(None) => {}
            Err(e) => {
                kill(qemu);
                return Err(NestedError::io("wait for", Path::new("qemu-system-x86_64"), e));
            }
        }
        if let Some(signal) = signals.wait(Duration::from_millis(100)) {
            if forwarded.is_some() || !forward_signal(job_dir, signal) {
                kill(qemu);
                return Err(NestedError::Interrupted(signal));
            }
            eprintln!("termlab-nested: signal {signal}: passed to the command in the L1 VM (again to kill the VM now)");
            forwarded = Some(signal);
            deadline = deadline.min(Instant::now() + SIGNAL_GRACE);
        }
        if Instant::now() >= deadline {
            kill(qemu);
            return Err(match forwarded {
                Some(signal) => NestedError::Interrupted(signal),
                None => NestedError::Timeout(timeout),
            });
        }
    }
}

/// Asks the job script to signal the command (SIGINT stays SIGINT; SIGTERM and SIGHUP become
/// SIGTERM). False when the request cannot be written.
fn forward_signal(job_dir: &Path, signal: i32) -> bool {
    let name = if signal == libc::SIGINT { "INT" } else { "TERM" };
    let path = job_dir.join(SIGNAL_FILE);
    let partial = job_dir.join(".signal.tmp");
    fs::write(&partial, name).and_then(|()| fs::rename(&partial, &path)).is_ok()
}

fn kill(qemu: &mut Child) {
    let _ = qemu.kill();
    let _ = qemu.wait();
}

/// Copies the L1 console to stdout without firmware noise and terminal control sequences.
fn stream_console(stdout: std::process::ChildStdout) {
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
        let text = strip_terminal_codes(&String::from_utf8_lossy(&line));
        let firmware = ["SeaBIOS", "iPXE", "Booting from ROM", "Press Ctrl-B"]
            .iter()
            .any(|p| text.starts_with(p));
        if firmware || text.trim().is_empty() {
            continue;
        }
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// Removes `\r`, `ESC c` and CSI sequences (`ESC [ ... letter`) that QEMU's firmware emits.
fn strip_terminal_codes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Blocks the given signals in the calling thread for its lifetime so they can be collected
/// synchronously; restores the previous mask on drop.
struct SignalGuard {
    set: libc::sigset_t,
    previous: libc::sigset_t,
}

impl SignalGuard {
    fn block(signals: &[i32]) -> Self {
        // SAFETY: signal-set manipulation on locally owned, initialised sets.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
            Self { set, previous }
        }
    }

    fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts =
            libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: valid set and timespec; siginfo may be null.
        let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (signal > 0).then_some(signal)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote(b"it's"), r"'it'\''s'");
    }

    /// The job script passes a forwarded signal to its command and reports the command's
    /// own exit status (run here with the host's sh: the script is plain POSIX sh).
    #[test]
    fn job_script_passes_a_forwarded_signal_on() {
        let job = TempDir::new(&std::env::temp_dir(), "termlab-nested-test").expect("temp dir");
        let command: Vec<OsString> = [
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo $$ > \"$1\"; while :; do sleep 0.1; done",
            "sh",
        ]
        .iter()
        .map(OsString::from)
        .chain([job.path().join("started").into_os_string()])
        .collect();
        write_job_script(job.path(), &command, false).expect("job script");
        let mut script = Command::new("sh")
            .arg(job.path().join("job"))
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Never leave the command looping behind a failed assertion.
        let stop_all = |script: &mut Child| {
            if let Some(pid) = fs::read_to_string(job.path().join("started"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) of the command this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = script.kill();
            let _ = script.wait();
        };
        while fs::read_to_string(job.path().join("started"))
            .map_or(true, |pid| !pid.ends_with('\n'))
        {
            if Instant::now() >= deadline {
                stop_all(&mut script);
                panic!("the command never started");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(forward_signal(job.path(), libc::SIGTERM));
        loop {
            if let Some(status) = script.try_wait().expect("wait") {
                assert!(status.success(), "{status}");
                break;
            }
            if Instant::now() >= deadline {
                stop_all(&mut script);
                panic!("the command did not get the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(fs::read_to_string(job.path().join("rc")).expect("rc").trim(), "42");
        assert_eq!(fs::read_to_string(job.path().join(SIGNAL_FILE)).expect("signal"), "TERM");
    }

    /// Interactive: the command in the background still reads the job's stdin (the console).
    #[test]
    fn interactive_job_script_gives_the_command_its_stdin() {
        let job = TempDir::new(&std::env::temp_dir(), "termlab-nested-test").expect("temp dir");
        let answer = job.path().join("answer");
        let command: Vec<OsString> = ["sh", "-c", "read line; echo \"got $line\" > \"$1\"", "sh"]
            .iter()
            .map(OsString::from)
            .chain([answer.clone().into_os_string()])
            .collect();
        write_job_script(job.path(), &command, true).expect("job script");
        let mut script = Command::new("sh")
            .arg(job.path().join("job"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs");
        script.stdin.take().expect("stdin").write_all(b"hello\n").expect("write");
        let status = script.wait().expect("wait");
        assert!(status.success(), "{status}");
        assert_eq!(fs::read_to_string(&answer).expect("answer"), "got hello\n");
        assert_eq!(fs::read_to_string(job.path().join("rc")).expect("rc").trim(), "0");
    }

    #[test]
    fn terminal_codes_are_removed() {
        assert_eq!(strip_terminal_codes("\x1b[2J\x1b[0;1mhello\r"), "hello");
    }
}
