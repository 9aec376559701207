//! Running one command inside a throw-away L1 VM (QEMU TCG, `-cpu max` emulating SVM+NPT)
//! whose `/dev/kvm` is real, with the host's `/` shared read-only over virtio-9p and the
//! directories the command writes shared writable (see [`crate::mounts`]).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::NestedError;
use crate::heartbeat::{Heartbeat, Stall};
use crate::image::{ensure_image, ensure_tools};
use crate::job;
use crate::lock::FileLock;
use crate::mounts::MountPlan;
use crate::tempdir::TempDir;

/// One L1 job at a time per host by default: an L1 VM can take all the host's cores in
/// software emulation. [`L1_SLOTS_ENV`] allows more (slots `l1.lock`, `l1.lock.1`, ...).
const L1_LOCK: &str = "/run/termlab/l1.lock";
/// How many L1 VMs may run at once on this host (default 1, at most [`MAX_L1_SLOTS`]). A
/// job whose L1 mostly waits (a guest with one busy vCPU: about 40 % of a 2-core host idle)
/// leaves room for a second; measurements then share the CPUs (see scripts/test).
const L1_SLOTS_ENV: &str = "TERMLAB_L1_SLOTS";
const MAX_L1_SLOTS: usize = 4;
/// Job directories live on the host; each is a writable 9p export of its job's L1 VM.
const JOBS_DIR: &str = "/run/termlab/l1-jobs";
/// How long the command in L1 gets to stop cleanly after a forwarded signal (stop its VM,
/// write its partial results) before the L1 VM is killed.
const SIGNAL_GRACE: Duration = Duration::from_secs(60);
/// Console lines kept for the error when L1 ends without running the command.
const CONSOLE_TAIL_LINES: usize = 20;
/// L1's console in the job directory when the command has the terminal.
const CONSOLE_FILE: &str = "console";
/// QEMU's log of CPU resets (`-d cpu_reset`), in the job directory: the one witness of an
/// L1 triple fault, which `-no-reboot` turns into a silent exit with status 0.
const QEMU_LOG: &str = "qemu.log";
/// How often the command's stdout file is checked for new output.
const STDOUT_POLL: Duration = Duration::from_millis(50);
/// What the launcher prints when an L1 CPU was silent for longer than
/// [`crate::heartbeat::NOTABLE_SILENCE`] and then went on.
pub const L1_SILENT: &str = "gave no sign of life for";
/// How often the L1 CPUs' signs of life are read (see [`crate::heartbeat`]).
const HEARTBEAT_POLL: Duration = Duration::from_secs(1);

/// Sizing, limits and host access of the L1 VM.
#[derive(Debug, Clone)]
pub struct L1Options {
    pub mem_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// An L1 CPU silent for this long (no beat, see [`crate::heartbeat`]; from L1's start
    /// until its first beat, too) is taken as a stalled L1: it is killed at once, with
    /// [`NestedError::L1Stalled`], instead of at the timeout.
    pub stall_limit: Duration,
    /// Where the L1 kernel and initramfs are cached.
    pub cache_dir: PathBuf,
    /// Host directories the command may write (relative ones are taken from the current
    /// directory; missing ones are created). The rest of the host is read-only inside L1,
    /// except its own job directory and a private tmpfs on `/tmp`.
    pub writable: Vec<PathBuf>,
    /// Host paths the command reads besides its working directory, its program and the
    /// paths in passed variables (TERMLAB_KERNEL_DIR, ...): only those under `/tmp` need
    /// naming, as L1 has a tmpfs of its own there.
    pub readable: Vec<PathBuf>,
    /// Names of host environment variables passed in besides [`crate::PASSED_ENV`].
    pub extra_env: Vec<String>,
    /// Give the command this process's stdin and stdout as its terminal (`termlab boot`, a
    /// shell on a guest's console) instead of a captured stdout: L1's second serial port,
    /// joined to them by QEMU, in raw mode when they are a terminal. L1's console then goes
    /// to a file and only its end is shown, when L1 fails.
    pub interactive: bool,
}

impl Default for L1Options {
    fn default() -> Self {
        Self {
            mem_mib: 4096,
            cpus: 2,
            timeout: Duration::from_secs(1800),
            // L1 boots and starts the job in about 10 s; a beat comes every 5 s.
            stall_limit: Duration::from_secs(150),
            cache_dir: "/var/cache/termlab/l1".into(),
            writable: Vec::new(),
            readable: Vec::new(),
            extra_env: Vec::new(),
            interactive: false,
        }
    }
}

/// Runs `argv` inside L1 in the current directory and returns its exit code. The command's
/// stdout is copied to this process's stdout byte for byte; the L1 console (kernel messages
/// and the command's stderr) goes to stderr. Ctrl-C/SIGTERM/SIGHUP are passed on to the
/// command (which then has a grace period to end cleanly); a second one kills the L1 VM.
pub fn run_in_l1(argv: &[OsString], options: &L1Options) -> Result<i32, NestedError> {
    // Checked before anything starts: a refused value changes nothing.
    let slots = l1_slots(std::env::var(L1_SLOTS_ENV).ok())?;
    let cwd =
        std::env::current_dir().map_err(|e| NestedError::io("get", Path::new("current dir"), e))?;
    let writable = writable_dirs(&cwd, &options.writable)?;
    let visible = job::visible_dirs(&cwd, argv, &options.readable, std::env::vars_os());
    // Checked before anything starts: a refused directory changes nothing.
    MountPlan::new(&writable, &visible)?;
    ensure_tools()?;
    let image = ensure_image(&options.cache_dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(JOBS_DIR)
        .map_err(|e| NestedError::io("create", Path::new(JOBS_DIR), e))?;
    let _lock = FileLock::one_of(Path::new(L1_LOCK), slots)?;
    let job = TempDir::new(Path::new(JOBS_DIR), "job")?;
    let mut exports = writable;
    exports.push(job.path().to_owned());
    let mounts = MountPlan::new(&exports, &visible)?;
    let terminal = options.interactive.then(terminal_size);
    let script =
        job::script(job.path(), &cwd, argv, std::env::vars_os(), &options.extra_env, terminal);
    job::write(job.path(), &script, &mounts.script())?;

    let signals = SignalGuard::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let mut qemu = spawn_qemu(&image, job.path(), &mounts, options)?;
    let console =
        qemu.stdout.take().map(|stdout| std::thread::spawn(move || stream_console(stdout)));
    let ended = Arc::new(AtomicBool::new(false));
    let stdout_relay = {
        let path = job.path().join(job::STDOUT_FILE);
        let ended = Arc::clone(&ended);
        std::thread::spawn(move || relay_stdout(&path, &ended))
    };
    let heartbeat = Heartbeat::new(job.path(), options.cpus, options.stall_limit, Instant::now());
    let supervised = supervise(&mut qemu, &signals, options.timeout, heartbeat, job.path());
    ended.store(true, Ordering::SeqCst);
    let _ = stdout_relay.join();
    let console_tail = match console {
        Some(thread) => thread.join().unwrap_or_default(),
        None => console_file_tail(&job.path().join(CONSOLE_FILE)),
    };
    let qemu_status = match supervised? {
        Supervised::Exited(status) => status,
        Supervised::Stalled(Stall { cpu, silent }) => {
            return Err(NestedError::L1Stalled { cpu, silent, console_tail: console_tail.into() })
        }
    };
    match job::outcome(job.path())? {
        Some(rc) => Ok(rc),
        None => Err(NestedError::L1Failed {
            qemu_status,
            cause: l1_end_cause(&job.path().join(QEMU_LOG)),
            console_tail: console_tail.into(),
        }),
    }
}

/// The value of [`L1_SLOTS_ENV`] (`None`: unset), checked: a number from 1 to
/// [`MAX_L1_SLOTS`]; 1 when unset.
fn l1_slots(value: Option<String>) -> Result<usize, NestedError> {
    let Some(text) = value else { return Ok(1) };
    match text.parse::<usize>() {
        Ok(slots) if (1..=MAX_L1_SLOTS).contains(&slots) => Ok(slots),
        _ => Err(NestedError::BadL1Slots { value: text, max: MAX_L1_SLOTS }),
    }
}

/// Why L1 ended early, as far as QEMU's reset log tells: a triple fault (the emulated CPU
/// reset itself) or nothing known.
fn l1_end_cause(qemu_log: &Path) -> &'static str {
    match fs::read_to_string(qemu_log) {
        Ok(log) if log.contains("Triple fault") => "the emulated CPU triple-faulted",
        _ => "no triple fault logged; the console may tell",
    }
}

/// The host terminal's size (stdout's, else stdin's), 24x80 when neither is a terminal.
fn terminal_size() -> job::TerminalSize {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into the local we pass; a non-terminal fd
        // just fails with ENOTTY.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_row > 0 {
            return job::TerminalSize { rows: size.ws_row, cols: size.ws_col };
        }
    }
    job::TerminalSize { rows: 24, cols: 80 }
}

/// The last lines of L1's console file (interactive jobs), as the streamed console shows them.
fn console_file_tail(path: &Path) -> VecDeque<String> {
    let bytes = fs::read(path).unwrap_or_default();
    let lines: Vec<String> =
        String::from_utf8_lossy(&bytes).lines().filter_map(console_line).collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].iter().cloned().collect()
}

/// `writable` made absolute (against `cwd`), created where missing, and canonical.
fn writable_dirs(cwd: &Path, writable: &[PathBuf]) -> Result<Vec<PathBuf>, NestedError> {
    writable
        .iter()
        .map(|dir| {
            let dir = cwd.join(dir);
            fs::create_dir_all(&dir)
                .and_then(|()| dir.canonicalize())
                .map_err(|e| NestedError::io("create the writable directory", &dir, e))
        })
        .collect()
}

/// The minimal firmware that QEMU's Debian packages ship beside SeaBIOS.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

fn spawn_qemu(
    image: &crate::image::L1Image,
    job_dir: &Path,
    mounts: &MountPlan,
    options: &L1Options,
) -> Result<Child, NestedError> {
    // loglevel=4: errors too (an OOM kill, a 9p failure), not just the boot's chatter.
    let append =
        format!("console=ttyS0 quiet loglevel=4 panic=-1 termlab.job={}", job_dir.display());
    let mut cmd = Command::new("qemu-system-x86_64");
    // qboot instead of SeaBIOS where QEMU ships it: under TCG about 1 s sooner to the kernel.
    if Path::new(QBOOT).is_file() {
        cmd.args(["-bios", QBOOT]);
    }
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-no-reboot"])
        .args(["-smp", &options.cpus.to_string(), "-m", &options.mem_mib.to_string()])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        .args(mounts.qemu_args())
        // No network device: L1 and the guests it runs reach nothing.
        .args(["-nic", "none"])
        .args(["-d", "cpu_reset", "-D"])
        .arg(job_dir.join(QEMU_LOG));
    let interactive = options.interactive;
    if interactive {
        // ttyS0 (L1's console) to a file, ttyS1 (the command's terminal) to our stdin and
        // stdout; signal=off: a Ctrl-C is a byte for the command's terminal, not QEMU's end.
        let console = job_dir.join(CONSOLE_FILE).to_string_lossy().replace(',', ",,");
        cmd.args(["-display", "none", "-monitor", "none"])
            .args(["-serial", &format!("file:{console}")])
            .args(["-chardev", "stdio,id=terminal,signal=off", "-serial", "chardev:terminal"])
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit());
    } else {
        cmd.arg("-nographic").stdin(Stdio::null()).stdout(Stdio::piped());
    }
    // SAFETY: getpid has no preconditions.
    let launcher = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Undo the signal blocking we inherited, leave the terminal's process group (we
            // decide when QEMU dies), and die with the thread that launched us.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // An interactive QEMU stays in the terminal's foreground group: it reads it.
            if !interactive {
                libc::setpgid(0, 0);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The launcher may have died before the line above: then nothing would kill us.
            if libc::getppid() != launcher {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // What L1 writes through the 9p exports gets its own mode bits, not ours.
            libc::umask(0o022);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| NestedError::io("start", Path::new("qemu-system-x86_64"), e))
}

/// How the L1 VM ended under [`supervise`], when that was not an error of its own.
enum Supervised {
    /// QEMU exited, with this status.
    Exited(String),
    /// An L1 CPU stopped giving signs of life; QEMU was killed.
    Stalled(Stall),
}

/// Waits for QEMU, killing it on timeout or when `heartbeat` finds an L1 CPU stalled. The
/// first termination signal is passed on to the command inside L1, which then has
/// [`SIGNAL_GRACE`] to end (and L1 with it); a second one, or the end of the grace period,
/// kills the L1 VM.
fn supervise(
    qemu: &mut Child,
    signals: &SignalGuard,
    timeout: Duration,
    mut heartbeat: Heartbeat,
    job_dir: &Path,
) -> Result<Supervised, NestedError> {
    let mut deadline = Instant::now() + timeout;
    let mut forwarded: Option<i32> = None;
    let mut next_heartbeat = Instant::now();
    loop {
        match qemu.try_wait() {
            Ok(Some(status)) => return Ok(Supervised::Exited(status.to_string())),
            Ok(None) => {}
            Err(e) => {
                kill(qemu);
                return Err(NestedError::io("wait for", Path::new("qemu-system-x86_64"), e));
            }
        }
        if let Some(signal) = signals.wait(Duration::from_millis(100)) {
            if forwarded.is_some() || !job::forward_signal(job_dir, signal) {
                kill(qemu);
                return Err(NestedError::Interrupted(signal));
            }
            eprintln!("termlab-nested: signal {signal}: passed to the command in the L1 VM (again to kill the VM now)");
            forwarded = Some(signal);
            deadline = deadline.min(Instant::now() + SIGNAL_GRACE);
        }
        let now = Instant::now();
        if now >= next_heartbeat {
            next_heartbeat = now + HEARTBEAT_POLL;
            if let Some(stall) = heartbeat.check(now) {
                kill(qemu);
                return Ok(Supervised::Stalled(stall));
            }
            for silence in heartbeat.take_ended_silences() {
                eprintln!(
                    "termlab-nested: L1 CPU {} {L1_SILENT} {:.1} s, then went on (timeouts inside L1 may have run out meanwhile)",
                    silence.cpu,
                    silence.silent.as_secs_f64()
                );
            }
        }
        if now >= deadline {
            kill(qemu);
            return Err(match forwarded {
                Some(signal) => NestedError::Interrupted(signal),
                None => NestedError::Timeout(timeout),
            });
        }
    }
}

fn kill(qemu: &mut Child) {
    let _ = qemu.kill();
    let _ = qemu.wait();
}

/// Copies the L1 console to stderr without firmware noise and terminal control sequences;
/// returns its last lines.
fn stream_console(console: std::process::ChildStdout) -> VecDeque<String> {
    let mut out = std::io::stderr();
    let mut tail = VecDeque::with_capacity(CONSOLE_TAIL_LINES);
    for line in BufReader::new(console).split(b'\n').map_while(Result::ok) {
        let Some(text) = console_line(&String::from_utf8_lossy(&line)) else { continue };
        let _ = writeln!(out, "{text}");
        if tail.len() == CONSOLE_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    }
    tail
}

/// A line of L1's console as shown: without terminal control sequences; `None` for an empty
/// line or the firmware's banner.
fn console_line(raw: &str) -> Option<String> {
    let text = strip_terminal_codes(raw);
    let firmware =
        ["SeaBIOS", "iPXE", "Booting from ROM", "Press Ctrl-B"].iter().any(|p| text.starts_with(p));
    (!firmware && !text.trim().is_empty()).then_some(text)
}

/// Copies the command's stdout file to this process's stdout as it grows, unchanged, until
/// `ended` is set and everything is copied.
fn relay_stdout(path: &Path, ended: &AtomicBool) {
    let Ok(mut file) = File::open(path) else { return };
    let mut out = std::io::stdout();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // Read after looking at the flag, so that what was written before it is copied.
        let last_round = ended.load(Ordering::SeqCst);
        loop {
            match file.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buffer[..n]).is_err() {
                        return; // stdout closed (`| head`): nobody reads any more
                    }
                }
            }
        }
        let _ = out.flush();
        if last_round {
            return;
        }
        std::thread::sleep(STDOUT_POLL);
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
    fn l1_slots_default_to_one_and_refuse_what_is_no_count_from_1_to_4() {
        assert_eq!(l1_slots(None).ok(), Some(1));
        assert_eq!(l1_slots(Some("2".into())).ok(), Some(2));
        for bad in ["0", "5", "two", ""] {
            let error = l1_slots(Some(bad.into())).expect_err(bad).to_string();
            assert!(error.contains("TERMLAB_L1_SLOTS") && error.contains("1 to 4"), "{error}");
        }
    }

    #[test]
    fn terminal_codes_are_removed() {
        assert_eq!(strip_terminal_codes("\x1b[2J\x1b[0;1mhello\r"), "hello");
    }
}
