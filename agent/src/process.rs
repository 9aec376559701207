//! Processes started by the agent: `run` (to completion) and `spawn` (in the background) share
//! one table, so `shutdown` can kill every one of them.
//!
//! Each process leads its own process group, so signals and timeouts reach its descendants too.
//! Reaping is done under the process's lock after `waitid(WNOWAIT)` saw the exit: while anyone
//! holds the lock and no exit is recorded, the pid (and thus the process group id) cannot have
//! been reused, so signalling the group is safe.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use termlab_protocol::{
    CapturedOutput, ErrorKind, ErrorReply, ExitStatus, OutputMatch, ProcessExit, ProcessOutput,
    ReadOutputRequest, RunOutput, RunRequest, SpawnReply, SpawnRequest, Stream, WaitOutputRequest,
    MAX_CAPTURED_OUTPUT_BYTES,
};

use crate::sys::{io_error, monotonic_ns, signal_name};

/// Processes the table keeps (running ones plus exited ones whose output can still be read).
/// When full, the oldest exited process is forgotten to make room.
const MAX_PROCESSES: usize = 256;

/// After a timeout's SIGKILL, how long to wait for the process to be gone and its pipes closed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// After a process exits, how long `wait` waits for its output pipes to close. Normally they
/// close at once; the grace only runs out for a process whose children keep them open. 1 s was
/// too short under nested emulation: a trigger's line was lost again with the reader thread
/// descheduled that long.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// If waitid(WNOWAIT) is unavailable, how often the waiter polls for the exit instead.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

const READ_CHUNK_BYTES: usize = 64 * 1024;

/// `struct sigaction` as the rt_sigaction system call takes it on x86_64 (not the C library's,
/// which refuses to touch the signals it reserves for itself).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Runs in the forked child before exec: gives the program the signal state a freshly booted
/// system would. The agent blocks SIGTERM/SIGINT/SIGHUP for its signal thread, and it may inherit
/// ignored signals from whatever started it (init in the guest); std passes both on (it resets
/// SIGPIPE only), and then e.g. `kill` with SIGTERM would never reach a spawned program.
fn reset_signal_state() -> std::io::Result<()> {
    let default = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
    // SAFETY: raw system calls (async-signal-safe) reading structs that live on this stack.
    unsafe {
        for signal in 1..=libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let set = libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            );
            if set != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let empty: u64 = 0;
        let set = libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            std::mem::size_of::<u64>(),
        );
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What to start.
struct CommandSpec<'a> {
    argv: &'a [String],
    env: &'a BTreeMap<String, String>,
    as_uid: Option<u32>,
    stdin: Option<Vec<u8>>,
}

#[derive(Default)]
struct OutputLog {
    kept: Vec<u8>,
    total_bytes: u64,
    closed: bool,
    /// Bytes handed out by `consume` reads and dropped from the front of `kept`.
    consumed_bytes: u64,
}

impl OutputLog {
    fn append(&mut self, bytes: &[u8]) {
        let room = MAX_CAPTURED_OUTPUT_BYTES.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.total_bytes += bytes.len() as u64;
    }

    fn is_full(&self) -> bool {
        self.kept.len() >= MAX_CAPTURED_OUTPUT_BYTES
    }

    fn snapshot(&self) -> CapturedOutput {
        CapturedOutput {
            data: self.kept.clone().into(),
            truncated: self.total_bytes > self.consumed_bytes + self.kept.len() as u64,
            total_bytes: self.total_bytes,
        }
    }

    /// Everything kept and not yet consumed, which is then forgotten: the room it took is free
    /// again. `truncated` says some output was dropped (the kept limit filled up between reads).
    fn take(&mut self) -> CapturedOutput {
        let snapshot = self.snapshot();
        self.consumed_bytes += self.kept.len() as u64;
        self.kept.clear();
        snapshot
    }

    /// The first complete line at or after `from` that contains `pattern`, and the offset just
    /// past it. At the end of a closed, untruncated stream, an unterminated last line counts.
    fn find_line(&self, from: usize, pattern: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut start = from;
        while start < self.kept.len() {
            let rest = &self.kept[start..];
            let (line, end) = match rest.iter().position(|&b| b == b'\n') {
                Some(newline) => (&rest[..newline], start + newline + 1),
                None if self.closed && !self.is_full() => (rest, self.kept.len()),
                None => return None,
            };
            if line.windows(pattern.len()).any(|window| window == pattern) {
                return Some((line.to_vec(), end));
            }
            start = end;
        }
        None
    }
}

struct ProcessState {
    child: Child,
    stdout: OutputLog,
    stderr: OutputLog,
    exit: Option<ProcessExit>,
}

impl ProcessState {
    fn log_mut(&mut self, stream: Stream) -> &mut OutputLog {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    fn log(&self, stream: Stream) -> &OutputLog {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    /// Exited and both pipes closed: nothing more will happen.
    fn finished(&self) -> bool {
        self.exit.is_some() && self.stdout.closed && self.stderr.closed
    }
}

struct Process {
    pid: u32,
    /// Start order, to find the oldest exited process when the table is full.
    sequence: u64,
    state: Mutex<ProcessState>,
    /// Notified on new output, closed pipes and exit.
    changed: Condvar,
}

impl Process {
    fn lock(&self) -> MutexGuard<'_, ProcessState> {
        // A panic elsewhere while holding the lock leaves consistent data (plain appends and
        // assignments), so carrying on is better than taking the agent down.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_changed<'a>(
        &self,
        state: MutexGuard<'a, ProcessState>,
        deadline: Instant,
    ) -> MutexGuard<'a, ProcessState> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.changed.wait_timeout(state, remaining) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Signals the whole process group. Only valid while `state` (the lock) is held.
    fn signal_group(&self, state: &ProcessState, signal: i32) -> Result<(), ErrorReply> {
        if state.exit.is_some() {
            return Err(ErrorReply::new(
                ErrorKind::ProcessExited,
                format!("process {} has already exited", self.pid),
            ));
        }
        // SAFETY: plain syscall with integer arguments.
        if unsafe { libc::kill(-(self.pid as i32), signal) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(io_error(format!("kill process group {}", self.pid), &error));
        }
        Ok(())
    }

    fn exit_observed(&self, end_ns: u64) {
        let mut state = self.lock();
        match state.child.wait() {
            Ok(status) => {
                let status = match (status.code(), status.signal()) {
                    (Some(code), _) => ExitStatus::Exited { code },
                    (None, Some(signal)) => {
                        ExitStatus::Signaled { signal, name: signal_name(signal) }
                    }
                    // Stopped/continued are not reported by wait() without WUNTRACED.
                    (None, None) => return,
                };
                state.exit = Some(ProcessExit { status, end_ns });
            }
            Err(error) => log!("cannot reap process {}: {error}", self.pid),
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Runs on the waiter thread: blocks until the process exits, then reaps it.
    fn wait_for_exit(&self) {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        loop {
            match waitid(Id::Pid(Pid::from_raw(self.pid as i32)), flags) {
                Ok(_) => return self.exit_observed(monotonic_ns()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => {
                    log!("waitid({}) failed ({error}); polling for its exit", self.pid);
                    break;
                }
            }
        }
        loop {
            let exited = matches!(self.lock().child.try_wait(), Ok(Some(_)) | Err(_));
            if exited {
                return self.exit_observed(monotonic_ns());
            }
            thread::sleep(EXIT_POLL_INTERVAL);
        }
    }

    /// Runs on a reader thread: copies one pipe into the log until it closes.
    fn collect_output(&self, stream: Stream, mut pipe: impl Read) {
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.lock().log_mut(stream).append(&chunk[..n]);
                    self.changed.notify_all();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    log!("reading {stream:?} of process {}: {error}", self.pid);
                    break;
                }
            }
        }
        self.lock().log_mut(stream).closed = true;
        self.changed.notify_all();
    }

    fn output(&self) -> ProcessOutput {
        let state = self.lock();
        ProcessOutput {
            stdout: state.stdout.snapshot(),
            stderr: state.stderr.snapshot(),
            exit: state.exit.clone(),
        }
    }
}

#[derive(Default)]
struct TableInner {
    processes: HashMap<u32, Arc<Process>>,
    next_sequence: u64,
}

/// Every process the agent started and has not forgotten.
#[derive(Default)]
pub struct ProcessTable {
    inner: Mutex<TableInner>,
}

impl ProcessTable {
    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, handle: u32) -> Result<Arc<Process>, ErrorReply> {
        self.lock().processes.get(&handle).cloned().ok_or_else(|| {
            ErrorReply::new(ErrorKind::UnknownHandle, format!("no process with handle {handle}"))
        })
    }

    /// Removes `process`, unless its pid already names a newer process.
    fn forget(&self, process: &Arc<Process>) {
        let mut inner = self.lock();
        if let Some(entry) = inner.processes.get(&process.pid) {
            if Arc::ptr_eq(entry, process) {
                inner.processes.remove(&process.pid);
            }
        }
    }

    /// Makes room for one more process, forgetting the oldest exited one if needed.
    fn make_room(inner: &mut TableInner) -> Result<(), ErrorReply> {
        if inner.processes.len() < MAX_PROCESSES {
            return Ok(());
        }
        let oldest_exited = inner
            .processes
            .values()
            .filter(|process| process.lock().finished())
            .min_by_key(|process| process.sequence)
            .map(|process| process.pid);
        match oldest_exited {
            Some(pid) => {
                inner.processes.remove(&pid);
                Ok(())
            }
            None => Err(ErrorReply::new(
                ErrorKind::TooManyProcesses,
                format!("{MAX_PROCESSES} processes are still running"),
            )),
        }
    }

    /// Starts a process in its own process group with piped output, plus the threads that
    /// collect its output and reap it.
    fn start(&self, spec: CommandSpec<'_>) -> Result<(Arc<Process>, u64), ErrorReply> {
        let mut inner = self.lock();
        Self::make_room(&mut inner)?;

        let mut command = Command::new(&spec.argv[0]);
        command
            .args(&spec.argv[1..])
            .envs(spec.env)
            .process_group(0)
            .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(uid) = spec.as_uid {
            command.uid(uid).gid(uid);
        }
        // SAFETY: the hook only makes async-signal-safe calls.
        unsafe { command.pre_exec(reset_signal_state) };
        let start_ns = monotonic_ns();
        let mut child = command
            .spawn()
            .map_err(|error| io_error(format!("cannot start {:?}", spec.argv[0]), &error))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();

        let process = Arc::new(Process {
            pid,
            sequence: inner.next_sequence,
            state: Mutex::new(ProcessState {
                child,
                stdout: OutputLog::default(),
                stderr: OutputLog::default(),
                exit: None,
            }),
            changed: Condvar::new(),
        });
        inner.next_sequence += 1;
        inner.processes.insert(pid, Arc::clone(&process));
        drop(inner);

        if let Err(error) = Self::start_helpers(&process, spec.stdin, stdin, stdout, stderr) {
            let state = process.lock();
            // Best effort: the process must not run unobserved; a failure here is logged.
            if let Err(kill_error) = process.signal_group(&state, libc::SIGKILL) {
                log!("cannot kill process {pid} after a failed start: {kill_error}");
            }
            drop(state);
            self.forget(&process);
            return Err(io_error(format!("cannot start helper threads for process {pid}"), &error));
        }
        Ok((process, start_ns))
    }

    fn start_helpers(
        process: &Arc<Process>,
        input: Option<Vec<u8>>,
        stdin: Option<std::process::ChildStdin>,
        stdout: Option<std::process::ChildStdout>,
        stderr: Option<std::process::ChildStderr>,
    ) -> std::io::Result<()> {
        let pid = process.pid;
        let waiter = Arc::clone(process);
        thread::Builder::new().name(format!("wait-{pid}")).spawn(move || waiter.wait_for_exit())?;
        for (stream, pipe) in [
            (Stream::Stdout, stdout.map(|p| Box::new(p) as Box<dyn Read + Send>)),
            (Stream::Stderr, stderr.map(|p| Box::new(p) as Box<dyn Read + Send>)),
        ] {
            let reader = Arc::clone(process);
            match pipe {
                Some(pipe) => {
                    thread::Builder::new()
                        .name(format!("{stream:?}-{pid}"))
                        .spawn(move || reader.collect_output(stream, pipe))?;
                }
                None => reader.lock().log_mut(stream).closed = true,
            }
        }
        if let (Some(mut pipe), Some(input)) = (stdin, input) {
            thread::Builder::new()
                .name(format!("stdin-{pid}"))
                // A command that exits without reading its input makes this fail with EPIPE;
                // that is the command's business, not an agent error.
                .spawn(move || drop(pipe.write_all(&input)))?;
        }
        Ok(())
    }

    pub fn run(&self, request: RunRequest) -> Result<RunOutput, ErrorReply> {
        let (process, start_ns) = self.start(CommandSpec {
            argv: &request.argv,
            env: &request.env,
            as_uid: request.as_uid,
            stdin: request.stdin.map(|data| data.into_bytes()),
        })?;
        let mut deadline = Instant::now() + Duration::from_millis(request.timeout_ms);
        let mut timed_out = false;
        let mut state = process.lock();
        while !state.finished() {
            if Instant::now() < deadline {
                state = process.wait_changed(state, deadline);
            } else if !timed_out {
                timed_out = true;
                deadline = Instant::now() + KILL_GRACE;
                if state.exit.is_none() {
                    // Ignored error: the process may have exited an instant ago.
                    let _ = process.signal_group(&state, libc::SIGKILL);
                } else {
                    // Exited, but something it started still holds its output pipes open.
                    // The group id stays reserved while any member is alive.
                    // SAFETY: plain syscall with integer arguments.
                    unsafe { libc::kill(-(process.pid as i32), libc::SIGKILL) };
                }
            } else {
                break;
            }
        }
        let exit = state.exit.clone();
        let stdout = state.stdout.snapshot();
        let stderr = state.stderr.snapshot();
        drop(state);
        let Some(exit) = exit else {
            return Err(ErrorReply::new(
                ErrorKind::Unkillable,
                format!(
                    "process {} survived SIGKILL for {KILL_GRACE:?}; {}",
                    process.pid,
                    where_in_kernel(process.pid)
                ),
            ));
        };
        self.forget(&process);
        Ok(RunOutput {
            status: exit.status,
            timed_out,
            stdout,
            stderr,
            start_ns,
            end_ns: exit.end_ns,
        })
    }

    pub fn spawn(&self, request: SpawnRequest) -> Result<SpawnReply, ErrorReply> {
        let (process, start_ns) = self.start(CommandSpec {
            argv: &request.argv,
            env: &request.env,
            as_uid: request.as_uid,
            stdin: None,
        })?;
        Ok(SpawnReply { handle: process.pid, start_ns })
    }

    pub fn read_output(&self, request: &ReadOutputRequest) -> Result<ProcessOutput, ErrorReply> {
        let process = self.get(request.handle)?;
        if !request.consume {
            return Ok(process.output());
        }
        let deadline = Instant::now() + Duration::from_millis(request.wait_ms);
        let mut state = process.lock();
        // Something to say: unread output, an exit, or (once exited) both pipes closed.
        while state.stdout.kept.is_empty()
            && state.stderr.kept.is_empty()
            && state.exit.is_none()
            && Instant::now() < deadline
        {
            state = process.wait_changed(state, deadline);
        }
        Ok(ProcessOutput {
            stdout: state.stdout.take(),
            stderr: state.stderr.take(),
            exit: state.exit.clone(),
        })
    }

    pub fn wait_output(&self, request: WaitOutputRequest) -> Result<OutputMatch, ErrorReply> {
        let process = self.get(request.handle)?;
        let deadline = Instant::now() + Duration::from_millis(request.timeout_ms);
        let pattern = request.pattern.as_bytes();
        let mut state = process.lock();
        if state.log(request.stream).consumed_bytes > 0 {
            return Err(ErrorReply::new(
                ErrorKind::InvalidRequest,
                format!(
                    "the output of process {} is read with `consume`: wait_output offsets no longer apply",
                    request.handle
                ),
            ));
        }
        let from = usize::try_from(request.from_offset)
            .ok()
            .filter(|&from| from <= state.log(request.stream).kept.len())
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "from_offset {} is beyond the {} bytes of kept output",
                        request.from_offset,
                        state.log(request.stream).kept.len()
                    ),
                )
            })?;
        loop {
            let log = state.log(request.stream);
            if let Some((line, end)) = log.find_line(from, pattern) {
                return Ok(OutputMatch { line: line.into(), end_offset: end as u64 });
            }
            if log.closed || log.is_full() {
                let why = if log.closed { "closed" } else { "filled the kept output" };
                return Err(ErrorReply::new(
                    ErrorKind::OutputEnded,
                    format!(
                        "{:?} of process {} {why} without a line containing {:?}",
                        request.stream, request.handle, request.pattern
                    ),
                ));
            }
            if Instant::now() >= deadline {
                return Err(ErrorReply::new(
                    ErrorKind::Timeout,
                    format!(
                        "no line containing {:?} on {:?} of process {} within {} ms",
                        request.pattern, request.stream, request.handle, request.timeout_ms
                    ),
                ));
            }
            state = process.wait_changed(state, deadline);
        }
    }

    pub fn kill(&self, handle: u32, signal: i32) -> Result<(), ErrorReply> {
        let process = self.get(handle)?;
        let state = process.lock();
        process.signal_group(&state, signal)
    }

    /// Waits for the process to exit and, for at most [`OUTPUT_DRAIN_GRACE`] more, for its
    /// output pipes to reach end of file: the exit is reaped on one thread and the pipes are
    /// read on others, so without this a `read_output` right after `wait` can miss the last
    /// lines (seen: a trigger's whole output line missing). A process whose children keep its
    /// pipes open gets its exit reported after the grace.
    pub fn wait(&self, handle: u32, timeout_ms: u64) -> Result<ProcessExit, ErrorReply> {
        let process = self.get(handle)?;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut drained_by: Option<Instant> = None;
        let mut state = process.lock();
        loop {
            if let Some(exit) = &state.exit {
                let until = *drained_by.get_or_insert_with(|| Instant::now() + OUTPUT_DRAIN_GRACE);
                if state.finished() || Instant::now() >= until {
                    return Ok(exit.clone());
                }
                state = process.wait_changed(state, until);
                continue;
            }
            if Instant::now() >= deadline {
                return Err(ErrorReply::new(
                    ErrorKind::Timeout,
                    format!("process {handle} still runs after {timeout_ms} ms"),
                ));
            }
            state = process.wait_changed(state, deadline);
        }
    }

    /// SIGKILLs every process group still running and waits up to `grace` for them to be reaped.
    pub fn kill_all(&self, grace: Duration) {
        let processes: Vec<Arc<Process>> = self.lock().processes.values().cloned().collect();
        for process in &processes {
            let state = process.lock();
            if state.exit.is_none() {
                match process.signal_group(&state, libc::SIGKILL) {
                    Ok(()) => log!("killed process {}", process.pid),
                    Err(error) => log!("cannot kill process {}: {error}", process.pid),
                }
            }
        }
        let deadline = Instant::now() + grace;
        for process in &processes {
            let mut state = process.lock();
            while state.exit.is_none() && Instant::now() < deadline {
                state = process.wait_changed(state, deadline);
            }
        }
    }
}

/// Where the kernel holds a process that SIGKILL cannot end, from /proc: its state and last
/// CPU (`stat`), what it waits in (`wchan`) and its kernel stack (`stack`, where the kernel
/// has CONFIG_STACKTRACE). What cannot be read is said so.
fn where_in_kernel(pid: u32) -> String {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/{pid}/{name}"));
    let stat = match read("stat") {
        Ok(text) => describe_stat(&text),
        Err(e) => format!("/proc/{pid}/stat: {e}"),
    };
    let wchan = match read("wchan") {
        Ok(text) if !text.trim().is_empty() && text.trim() != "0" => text.trim().to_owned(),
        Ok(_) => "none (running, or no symbols)".to_owned(),
        Err(e) => format!("unreadable ({e})"),
    };
    let stack = match read("stack") {
        Ok(text) => text.lines().map(str::trim).collect::<Vec<_>>().join(" <- "),
        Err(e) => format!("unreadable ({e})"),
    };
    format!("{stat}, waiting in {wchan}; kernel stack: {stack}")
}

/// State and last CPU from a /proc/PID/stat line (fields 3 and 39; the name in field 2 may
/// hold spaces and parentheses, so the fields are counted after its last `)`).
fn describe_stat(stat: &str) -> String {
    let fields: Vec<&str> = match stat.rfind(')') {
        Some(end) => stat[end + 1..].split_whitespace().collect(),
        None => Vec::new(),
    };
    match (fields.first(), fields.get(36)) {
        (Some(state), Some(cpu)) => format!("state {state} on CPU {cpu}"),
        _ => format!("unparsable stat line {:?}", stat.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_gives_the_state_and_last_cpu() {
        let line = "71 (trig) ger) R 1 71 71 0 -1 4194560 90 0 0 0 0 1234 0 0 20 0 1 0 \
                    1090 2916352 181 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(describe_stat(line), "state R on CPU 1");
        assert_eq!(describe_stat("71 (x"), "unparsable stat line \"71 (x\"");
        // A child asleep in the kernel. (This test's own main thread, which waits for the
        // test threads, was found running now and then: in dry run 89 it was R, woken.)
        use std::time::{Duration, Instant};
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let deadline = Instant::now() + Duration::from_secs(10);
        let asleep = loop {
            let described = where_in_kernel(child.id());
            if described.starts_with("state S on CPU ") || Instant::now() > deadline {
                break described;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        child.kill().expect("kill sleep");
        child.wait().expect("wait sleep");
        assert!(
            asleep.starts_with("state S on CPU ") && asleep.contains(", waiting in "),
            "{asleep}"
        );
    }

    fn log_of(data: &[u8], closed: bool) -> OutputLog {
        let mut log = OutputLog::default();
        log.append(data);
        log.closed = closed;
        log
    }

    #[test]
    fn only_complete_lines_match_until_the_stream_closes() {
        let open = log_of(b"start\nprog_id=1", false);
        assert_eq!(open.find_line(0, b"prog_id="), None);
        let closed = log_of(b"start\nprog_id=1", true);
        assert_eq!(closed.find_line(0, b"prog_id="), Some((b"prog_id=1".to_vec(), 15)));
    }

    #[test]
    fn matches_continue_from_the_previous_end_offset() {
        let log = log_of(b"x=1\ny\nx=2\n", false);
        let (first, end) = log.find_line(0, b"x=").unwrap();
        assert_eq!((first.as_slice(), end), (&b"x=1"[..], 4));
        let (second, end) = log.find_line(end, b"x=").unwrap();
        assert_eq!((second.as_slice(), end), (&b"x=2"[..], 10));
        assert_eq!(log.find_line(end, b"x="), None);
    }

    #[test]
    fn consumed_output_is_handed_out_once_and_frees_its_room() {
        let mut log = OutputLog::default();
        log.append(b"one\n");
        let first = log.take();
        assert_eq!(
            (first.data.as_bytes(), first.truncated, first.total_bytes),
            (&b"one\n"[..], false, 4)
        );
        assert_eq!(log.take().data.as_bytes(), b"");
        log.append(&vec![b'a'; MAX_CAPTURED_OUTPUT_BYTES]);
        let full = log.take();
        assert_eq!(full.data.as_bytes().len(), MAX_CAPTURED_OUTPUT_BYTES);
        assert!(!full.truncated, "nothing was dropped yet");
        log.append(b"more");
        let after = log.take();
        assert_eq!((after.data.as_bytes(), after.truncated), (&b"more"[..], false));
        log.append(&vec![b'b'; MAX_CAPTURED_OUTPUT_BYTES + 3]);
        assert!(log.take().truncated, "3 bytes did not fit between two reads");
    }

    #[test]
    fn output_beyond_the_limit_is_counted_not_kept() {
        let mut log = OutputLog::default();
        log.append(&vec![b'a'; MAX_CAPTURED_OUTPUT_BYTES - 1]);
        log.append(b"bcd");
        let snapshot = log.snapshot();
        assert_eq!(snapshot.data.as_bytes().len(), MAX_CAPTURED_OUTPUT_BYTES);
        assert_eq!(snapshot.total_bytes, MAX_CAPTURED_OUTPUT_BYTES as u64 + 2);
        assert!(snapshot.truncated);
        assert!(log.is_full());
    }
}
