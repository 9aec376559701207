//! Running one command inside a throw-away L1 VM (QEMU TCG, `-cpu max` emulating SVM+NPT)
//! whose `/dev/kvm` is real, with the host's `/` shared read-only over virtio-9p and the
//! directories the command writes shared writable (see [`crate::mounts`]).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::NestedError;
use crate::heartbeat::{Heartbeat, Stall};
use crate::image::{ensure_image, ensure_tools, L1Image};
use crate::job;
use crate::lock::FileLock;
use crate::mounts::{MountPlan, WritableSource};
use crate::tempdir::TempDir;
use crate::warm::{self, WarmL1, WARM_ENV};

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
pub(crate) const QEMU_LOG: &str = "qemu.log";
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
    /// Run in the slot's warm L1 (crate::warm), which powers off after this long without a
    /// job; `Some(Duration::ZERO)`: in an L1 of its own. `None`: as [`WARM_ENV`] says
    /// (unset: an L1 of its own). Interactive commands always get an L1 of their own.
    pub warm: Option<Duration>,
}

impl Default for L1Options {
    fn default() -> Self {
        Self {
            mem_mib: 4096,
            cpus: 2,
            timeout: Duration::from_secs(1800),
            // L1 boots and starts the job in about 10 s; a beat comes every 5 s. In the CI dry
            // runs of 2026-12-03/04 no silence that ended lasted over 15 s, and every one that
            // reached 150 s never ended (4 of 4): a minute tells them apart.
            stall_limit: Duration::from_secs(60),
            cache_dir: "/var/cache/termlab/l1".into(),
            writable: Vec::new(),
            readable: Vec::new(),
            extra_env: Vec::new(),
            interactive: false,
            warm: None,
        }
    }
}

/// Runs `argv` inside L1 in the current directory and returns its exit code. The command's
/// stdout is copied to this process's stdout byte for byte; the L1 console (kernel messages
/// and the command's stderr) goes to stderr. Ctrl-C/SIGTERM/SIGHUP are passed on to the
/// command (which then has a grace period to end cleanly); a second one kills the L1 VM.
/// With [`WARM_ENV`] set, a non-interactive command runs in the slot's warm L1
/// (crate::warm) instead of an L1 of its own.
pub fn run_in_l1(argv: &[OsString], options: &L1Options) -> Result<i32, NestedError> {
    // Checked before anything starts: a refused value changes nothing.
    let slots = l1_slots(std::env::var(L1_SLOTS_ENV).ok())?;
    let warm = match options.warm {
        Some(idle) => Some(idle).filter(|idle| !idle.is_zero()),
        None => warm::idle_limit(std::env::var(WARM_ENV).ok())?,
    }
    .filter(|_| !options.interactive);
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
    let lock = FileLock::one_of(Path::new(L1_LOCK), slots)?;
    let job = TempDir::new(Path::new(JOBS_DIR), "job")?;
    let mut exports = writable;
    exports.push(job.path().to_owned());
    let mounts = MountPlan::new(&exports, &visible)?;
    let terminal = options.interactive.then(terminal_size);
    let script =
        job::script(job.path(), &cwd, argv, std::env::vars_os(), &options.extra_env, terminal);
    let signals = SignalGuard::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    match warm {
        Some(idle) => {
            job::write(job.path(), &script, &mounts.script(WritableSource::HostRw))?;
            // A warm L1 is sized for the usual job too, so that it serves the next one.
            let mem_mib = options.mem_mib.max(L1Options::default().mem_mib);
            let l1 = WarmL1::ready(lock.slot(), &image, options.cpus, mem_mib, idle)?;
            run_warm(l1, job.path(), &signals, options)
        }
        None => {
            job::write(job.path(), &script, &mounts.script(WritableSource::Exports))?;
            run_cold(&image, job.path(), &mounts, &signals, options)
        }
    }
}

/// The job in an L1 VM of its own, which ends with it.
fn run_cold(
    image: &L1Image,
    job_dir: &Path,
    mounts: &MountPlan,
    signals: &SignalGuard,
    options: &L1Options,
) -> Result<i32, NestedError> {
    let mut qemu = spawn_qemu(image, job_dir, mounts, options)?;
    let console =
        qemu.stdout.take().map(|stdout| std::thread::spawn(move || stream_console(stdout)));
    let relay = StdoutRelay::start(job_dir);
    let supervised = supervise(&mut ColdL1(&mut qemu), signals, options, job_dir);
    relay.finish();
    let console_tail = match console {
        Some(thread) => thread.join().unwrap_or_default(),
        None => console_file_tail(&job_dir.join(CONSOLE_FILE)),
    };
    conclude(supervised, job_dir, &job_dir.join(QEMU_LOG), console_tail)
}

/// The job in the slot's warm L1, which stays up for the next one unless this job's end
/// leaves it in doubt (a timeout, a stall, a second signal).
fn run_warm(
    l1: WarmL1,
    job_dir: &Path,
    signals: &SignalGuard,
    options: &L1Options,
) -> Result<i32, NestedError> {
    let offset = l1.submit(job_dir)?;
    let console_done = Arc::new(AtomicBool::new(false));
    let console = {
        let path = l1.console();
        let done = Arc::clone(&console_done);
        std::thread::spawn(move || {
            let mut file = File::open(&path).ok()?;
            file.seek(SeekFrom::Start(offset)).ok()?;
            Some(stream_console(Follow { file, done }))
        })
    };
    let relay = StdoutRelay::start(job_dir);
    let mut warm = WarmJob { l1: &l1, job_dir };
    let supervised = supervise(&mut warm, signals, options, job_dir);
    relay.finish();
    console_done.store(true, Ordering::SeqCst);
    let console_tail = console.join().ok().flatten().unwrap_or_default();
    if matches!(supervised, Ok(Supervised::Exited(_))) {
        l1.finish();
    }
    conclude(supervised, job_dir, &l1.qemu_log(), console_tail)
}

/// The job's exit status, or the error that says why there is none.
fn conclude(
    supervised: Result<Supervised, NestedError>,
    job_dir: &Path,
    qemu_log: &Path,
    console_tail: VecDeque<String>,
) -> Result<i32, NestedError> {
    let qemu_status = match supervised? {
        Supervised::Exited(status) => status,
        Supervised::Stalled(Stall { cpu, silent }) => {
            return Err(NestedError::L1Stalled { cpu, silent, console_tail: console_tail.into() })
        }
    };
    match job::outcome(job_dir)? {
        Some(rc) => Ok(rc),
        None => Err(NestedError::L1Failed {
            qemu_status,
            cause: l1_end_cause(qemu_log),
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

/// The QEMU command every L1 VM shares: TCG emulating SVM on `cpus` CPUs, the image, its
/// console on ttyS0 and `job_arg` (what the L1 init runs, `termlab.job=...` or
/// `termlab.warm=...`) on the kernel command line, no network device, CPU resets logged to
/// `qemu_log`; started with no signal blocked and umask 022.
pub(crate) fn qemu_command(
    image: &L1Image,
    cpus: u32,
    mem_mib: u32,
    job_arg: &str,
    qemu_log: &Path,
) -> Command {
    // loglevel=4: errors too (an OOM kill, a 9p failure), not just the boot's chatter.
    let append = format!("console=ttyS0 quiet loglevel=4 panic=-1 {job_arg}");
    let mut cmd = Command::new("qemu-system-x86_64");
    // qboot instead of SeaBIOS where QEMU ships it: under TCG about 1 s sooner to the kernel.
    if Path::new(QBOOT).is_file() {
        cmd.args(["-bios", QBOOT]);
    }
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-no-reboot"])
        .args(["-smp", &cpus.to_string(), "-m", &mem_mib.to_string()])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        // No network device: L1 and the guests it runs reach nothing.
        .args(["-nic", "none"])
        .args(["-d", "cpu_reset", "-D"])
        .arg(qemu_log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Undo the signal blocking the launcher has in place while it supervises.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // What L1 writes through the 9p exports gets its own mode bits, not ours.
            libc::umask(0o022);
            Ok(())
        });
    }
    cmd
}

/// L1's console (ttyS0) into `file`, with no display or monitor.
pub(crate) fn console_to_file(cmd: &mut Command, file: &Path) {
    // QEMU's option syntax escapes a comma by doubling it.
    let file = file.to_string_lossy().replace(',', ",,");
    cmd.args(["-display", "none", "-monitor", "none"]).args(["-serial", &format!("file:{file}")]);
}

fn spawn_qemu(
    image: &L1Image,
    job_dir: &Path,
    mounts: &MountPlan,
    options: &L1Options,
) -> Result<Child, NestedError> {
    let job_arg = format!("termlab.job={}", job_dir.display());
    let mut cmd =
        qemu_command(image, options.cpus, options.mem_mib, &job_arg, &job_dir.join(QEMU_LOG));
    cmd.args(mounts.qemu_args());
    let interactive = options.interactive;
    if interactive {
        // ttyS0 (L1's console) to a file, ttyS1 (the command's terminal) to our stdin and
        // stdout; signal=off: a Ctrl-C is a byte for the command's terminal, not QEMU's end.
        console_to_file(&mut cmd, &job_dir.join(CONSOLE_FILE));
        cmd.args(["-chardev", "stdio,id=terminal,signal=off", "-serial", "chardev:terminal"])
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
            // Leave the terminal's process group (we decide when QEMU dies), and die with the
            // thread that launched us. An interactive QEMU stays in the terminal's foreground
            // group: it reads it.
            if !interactive {
                libc::setpgid(0, 0);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The launcher may have died before the line above: then nothing would kill us.
            if libc::getppid() != launcher {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| NestedError::io("start", Path::new("qemu-system-x86_64"), e))
}

/// How the L1 VM ended under [`supervise`], when that was not an error of its own.
enum Supervised {
    /// The job's L1 is done with it: QEMU exited with this status (an L1 of its own), or
    /// the warm L1 said the job ended or itself exited.
    Exited(String),
    /// An L1 CPU stopped giving signs of life; the L1 VM was killed.
    Stalled(Stall),
}

/// What [`supervise`] watches: the L1 VM that runs the job.
trait RunningJob {
    /// `Some(how)` once the job is over for this L1 (see [`Supervised::Exited`]).
    fn ended(&mut self) -> Result<Option<String>, NestedError>;
    /// Kills the L1 VM.
    fn kill(&mut self);
}

/// A job's own L1: the job is over when QEMU exits.
struct ColdL1<'a>(&'a mut Child);

impl RunningJob for ColdL1<'_> {
    fn ended(&mut self) -> Result<Option<String>, NestedError> {
        match self.0.try_wait() {
            Ok(status) => Ok(status.map(|s| s.to_string())),
            Err(e) => {
                self.kill();
                Err(NestedError::io("wait for", Path::new("qemu-system-x86_64"), e))
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A job in a warm L1: over when the L1 wrote `ended` into its directory, or died.
struct WarmJob<'a> {
    l1: &'a WarmL1,
    job_dir: &'a Path,
}

impl RunningJob for WarmJob<'_> {
    fn ended(&mut self) -> Result<Option<String>, NestedError> {
        Ok(if self.job_dir.join(job::ENDED_FILE).exists() {
            Some("the job ended in the warm L1 VM".to_owned())
        } else if !self.l1.alive() {
            Some("the warm L1 VM exited".to_owned())
        } else {
            None
        })
    }

    fn kill(&mut self) {
        self.l1.stop();
    }
}

/// Waits for the job, killing its L1 on timeout or when the heartbeat finds an L1 CPU
/// stalled, and renewing the job's lease meanwhile. The first termination signal is passed
/// on to the command inside L1, which then has [`SIGNAL_GRACE`] to end; a second one, or the
/// end of the grace period, kills the L1 VM.
fn supervise(
    l1: &mut dyn RunningJob,
    signals: &SignalGuard,
    options: &L1Options,
    job_dir: &Path,
) -> Result<Supervised, NestedError> {
    let started = Instant::now();
    let mut heartbeat = Heartbeat::new(job_dir, options.cpus, options.stall_limit, started);
    let mut deadline = started + options.timeout;
    let mut forwarded: Option<i32> = None;
    let mut next_heartbeat = started;
    let mut lease = 0;
    loop {
        if let Some(how) = l1.ended()? {
            return Ok(Supervised::Exited(how));
        }
        if let Some(signal) = signals.wait(Duration::from_millis(100)) {
            if forwarded.is_some() || !job::forward_signal(job_dir, signal) {
                l1.kill();
                return Err(NestedError::Interrupted(signal));
            }
            eprintln!("termlab-nested: signal {signal}: passed to the command in the L1 VM (again to kill the VM now)");
            forwarded = Some(signal);
            deadline = deadline.min(Instant::now() + SIGNAL_GRACE);
        }
        let now = Instant::now();
        if now >= next_heartbeat {
            next_heartbeat = now + HEARTBEAT_POLL;
            lease += 1;
            job::renew_lease(job_dir, lease);
            if let Some(stall) = heartbeat.check(now) {
                l1.kill();
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
            l1.kill();
            return Err(match forwarded {
                Some(signal) => NestedError::Interrupted(signal),
                None => NestedError::Timeout(options.timeout),
            });
        }
    }
}

/// Copies the L1 console to stderr without firmware noise and terminal control sequences;
/// returns its last lines.
fn stream_console(console: impl Read) -> VecDeque<String> {
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

/// Reads a file that L1 appends to, as it grows; the end of the file is the end of the data
/// only once `done` is set (then everything written before is read first).
struct Follow {
    file: File,
    done: Arc<AtomicBool>,
}

impl Read for Follow {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            // Read after looking at the flag, so that what was written before it is read.
            let last_round = self.done.load(Ordering::SeqCst);
            let n = self.file.read(buffer)?;
            if n > 0 || last_round {
                return Ok(n);
            }
            std::thread::sleep(STDOUT_POLL);
        }
    }
}

/// Copies the command's stdout file to this process's stdout as it grows, unchanged.
struct StdoutRelay {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl StdoutRelay {
    fn start(job_dir: &Path) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let path = job_dir.join(job::STDOUT_FILE);
        let follow_done = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            let Ok(file) = File::open(&path) else { return };
            let mut stdout = Follow { file, done: follow_done };
            let mut out = std::io::stdout();
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = stdout.read(&mut buffer) {
                if out.write_all(&buffer[..n]).and_then(|()| out.flush()).is_err() {
                    return; // stdout closed (`| head`): nobody reads any more
                }
            }
        });
        Self { done, thread }
    }

    /// Copies what is left once the command has ended.
    fn finish(self) {
        self.done.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
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
