//! The real agent binary on a temporary Unix socket, driven with the protocol client.

use std::fs::File;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use termlab_protocol::client::{Client, ClientError};
use termlab_protocol::hybrid_vsock::{self, HandshakeError};
use termlab_protocol::{
    Data, ErrorKind, ExitStatus, Request, RequestBody, RunRequest, SpawnRequest, Stream,
    SyscallResult, TerminateRequest, WaitOutputRequest, MAX_CAPTURED_OUTPUT_BYTES,
    MAX_REQUEST_LINE_BYTES,
};

const AGENT: &str = env!("CARGO_BIN_EXE_termlab-agent");

/// A temporary directory that is removed even if this test process is killed (Ctrl-C), when
/// no destructor runs: a janitor shell waits for EOF on a pipe that only this process holds
/// open, and removes the directory once it closes, however the process ended.
struct TempDir {
    dir: tempfile::TempDir,
    janitor: Child,
}

impl TempDir {
    fn new() -> TempDir {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let janitor = Command::new("sh")
            .args(["-c", "read _; rm -rf \"$0\"", &dir.path().to_string_lossy()])
            .stdin(Stdio::piped())
            .spawn()
            .expect("start the janitor");
        TempDir { dir, janitor }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Closing the pipe lets the janitor finish (the directory is already gone by then, or
        // goes now); wait for it so it does not outlive the test.
        drop(self.janitor.stdin.take());
        let _ = self.janitor.wait();
    }
}

/// The agent under test. Dropping it stops the agent (SIGTERM: it kills its children first),
/// then removes the temporary directory, on success and on panic alike.
struct RunningAgent {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl RunningAgent {
    fn start() -> RunningAgent {
        Self::start_ignoring(&[])
    }

    /// Starts the agent with `ignored` signals set to SIG_IGN, as an init may leave them.
    fn start_ignoring(ignored: &'static [i32]) -> RunningAgent {
        let dir = TempDir::new();
        let socket = dir.path().join("agent.sock");
        let log = File::create(dir.path().join("agent.log")).expect("create the agent log");
        let mut command = Command::new(AGENT);
        command
            .arg("--listen-unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // If the test process dies without running Drop (Ctrl-C), the agent still goes, and
        // takes its children with it.
        // SAFETY: prctl and signal are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                for &signal in ignored {
                    if libc::signal(signal, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start the agent");
        let agent = RunningAgent { child, socket, dir };
        // The socket file appears at bind(), slightly before listen(): wait for a connection.
        wait_until("the agent accepts connections", || UnixStream::connect(&agent.socket).is_ok());
        agent
    }

    fn client(&self) -> Client<UnixStream> {
        let stream = UnixStream::connect(&self.socket).expect("connect to the agent");
        let mut client = Client::new(stream);
        client.hello().expect("hello");
        client
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Waits for the agent process to exit on its own.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "agent still running after {within:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain syscall; the child is ours and not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A process is gone once it has no /proc entry or is a zombie waiting for its new parent.
fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn run_request(argv: &[&str], timeout_ms: u64) -> RunRequest {
    RunRequest::command(argv.iter().map(|s| s.to_string()).collect(), timeout_ms)
}

fn agent_error(result: Result<impl std::fmt::Debug, ClientError>) -> termlab_protocol::ErrorReply {
    match result {
        Ok(value) => panic!("expected an agent error, got {value:?}"),
        Err(ClientError::Agent { error, .. }) => error,
        Err(other) => panic!("expected an agent error, got {other}"),
    }
}

#[test]
fn run_reports_exit_status_output_and_timestamps() {
    let agent = RunningAgent::start();
    let mut client = agent.client();

    let before = client.clock().unwrap().monotonic_ns;
    let echo = client.run(run_request(&["echo", "hello", "world"], 5000)).unwrap();
    let after = client.clock().unwrap().monotonic_ns;
    assert_eq!(echo.status, ExitStatus::Exited { code: 0 });
    assert!(!echo.timed_out);
    assert_eq!(echo.stdout.data.as_bytes(), b"hello world\n");
    assert_eq!((echo.stdout.truncated, echo.stdout.total_bytes), (false, 12));
    assert_eq!(echo.stderr.data.as_bytes(), b"");
    assert!(before <= echo.start_ns && echo.start_ns <= echo.end_ns && echo.end_ns <= after);

    let exit3 = client.run(run_request(&["sh", "-c", "echo to-stderr >&2; exit 3"], 5000)).unwrap();
    assert_eq!(exit3.status, ExitStatus::Exited { code: 3 });
    assert_eq!(exit3.stderr.data.as_bytes(), b"to-stderr\n");

    let mut with_input = run_request(&["sh", "-c", "tr a-z A-Z; printf %s \"$GREETING\""], 5000);
    with_input.stdin = Some(Data::from("abc\n"));
    with_input.env.insert("GREETING".into(), "hi there".into());
    let output = client.run(with_input).unwrap();
    assert_eq!(output.stdout.data.as_bytes(), b"ABC\nhi there");

    let mut unprivileged = run_request(&["sh", "-c", "id -u; id -g"], 5000);
    unprivileged.as_uid = Some(65534);
    let ids = client.run(unprivileged).unwrap();
    assert_eq!(ids.stdout.data.as_bytes(), b"65534\n65534\n");

    let missing = agent_error(client.run(run_request(&["/nonexistent/program"], 1000)));
    assert_eq!(missing.kind, ErrorKind::Io);
    assert_eq!(missing.errno.map(|e| e.name).as_deref(), Some("ENOENT"));
}

#[test]
fn children_get_default_signal_handling_whatever_the_agent_inherited() {
    // In the guest, init may start the agent with signals ignored; and the agent blocks the
    // termination signals for its own signal thread. Neither may reach the programs it starts.
    let termination = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    let mut agent = RunningAgent::start_ignoring(termination);
    let mut client = agent.client();
    let status = client.run(run_request(&["cat", "/proc/self/status"], 5000)).unwrap();
    let status = status.stdout.data.to_string_lossy().into_owned();
    assert!(status.contains("SigBlk:\t0000000000000000\n"), "{status}");
    assert!(status.contains("SigIgn:\t0000000000000000\n"), "{status}");

    let sleep = || SpawnRequest::command(["sleep", "30"].map(String::from).to_vec());
    let spawned = client.spawn(sleep()).unwrap();
    client.kill(spawned.handle, libc::SIGTERM).unwrap();
    let exit = client.wait(spawned.handle, 5000).unwrap();
    assert_eq!(exit.status, ExitStatus::Signaled { signal: libc::SIGTERM, name: "SIGTERM".into() });

    // The agent itself still shuts down, killing its children, on SIGTERM.
    let sleeper = client.spawn(sleep()).unwrap();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    assert!(agent.wait_exit(Duration::from_secs(5)).success());
    wait_until("the agent's child is killed", || process_is_gone(sleeper.handle));
}

#[test]
fn run_past_its_timeout_is_killed_with_its_process_group() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    // The shell prints the pid of a background grandchild, then waits on it.
    let started = Instant::now();
    let output = client
        .run(run_request(&["sh", "-c", "sleep 30 & echo $!; wait; echo never"], 300))
        .unwrap();
    let elapsed = started.elapsed();
    assert!(output.timed_out);
    assert_eq!(
        output.status,
        ExitStatus::Signaled { signal: libc::SIGKILL, name: "SIGKILL".into() }
    );
    assert!(output.end_ns - output.start_ns >= 300_000_000, "{output:?}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let stdout = output.stdout.data.to_string_lossy().into_owned();
    assert!(!stdout.contains("never"));
    let grandchild: u32 = stdout.trim().parse().expect("the shell printed a pid");
    wait_until("the grandchild is killed", || process_is_gone(grandchild));
}

#[test]
fn run_output_beyond_the_limit_is_flagged() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let total = MAX_CAPTURED_OUTPUT_BYTES + 1000;
    let output =
        client.run(run_request(&["sh", "-c", &format!("yes | head -c {total}")], 20_000)).unwrap();
    assert_eq!(output.status, ExitStatus::Exited { code: 0 });
    assert!(output.stdout.truncated);
    assert_eq!(output.stdout.total_bytes, total as u64);
    assert_eq!(output.stdout.data.as_bytes().len(), MAX_CAPTURED_OUTPUT_BYTES);
}

#[test]
fn spawned_process_can_be_watched_killed_and_waited_for() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let spawned = client
        .spawn(SpawnRequest::command(
            ["sh", "-c", "echo starting; sleep 0.2; echo prog_id=42; exec sleep 30"]
                .map(String::from)
                .to_vec(),
        ))
        .unwrap();
    let handle = spawned.handle;

    let wait_for = |pattern: &str, from_offset, timeout_ms| WaitOutputRequest {
        handle,
        pattern: pattern.into(),
        stream: Stream::Stdout,
        timeout_ms,
        from_offset,
    };
    let found = client.wait_output(wait_for("prog_id=", 0, 5000)).unwrap();
    assert_eq!(found.line.as_bytes(), b"prog_id=42");
    assert_eq!(found.end_offset, "starting\nprog_id=42\n".len() as u64);

    let running = client.read_output(handle).unwrap();
    assert_eq!(running.stdout.data.as_bytes(), b"starting\nprog_id=42\n");
    assert!(running.exit.is_none());

    let no_more = agent_error(client.wait_output(wait_for("prog_id=", found.end_offset, 200)));
    assert_eq!(no_more.kind, ErrorKind::Timeout);
    let still_running = agent_error(client.wait(handle, 100));
    assert_eq!(still_running.kind, ErrorKind::Timeout);

    client.kill(handle, libc::SIGTERM).unwrap();
    let exit = client.wait(handle, 5000).unwrap();
    assert_eq!(exit.status, ExitStatus::Signaled { signal: libc::SIGTERM, name: "SIGTERM".into() });
    assert!(exit.end_ns > spawned.start_ns);
    assert!(process_is_gone(handle));

    let again = agent_error(client.kill(handle, libc::SIGTERM));
    assert_eq!(again.kind, ErrorKind::ProcessExited);
    let ended = agent_error(client.wait_output(wait_for("prog_id=", found.end_offset, 5000)));
    assert_eq!(ended.kind, ErrorKind::OutputEnded);
    let after = client.read_output(handle).unwrap();
    assert_eq!(after.exit, Some(exit));

    let unknown = agent_error(client.read_output(u32::MAX));
    assert_eq!(unknown.kind, ErrorKind::UnknownHandle);
}

/// `wait` returns only once the output is all there: exit and pipe EOF are seen by
/// different threads, and a trigger's result line was once missing right after `wait`.
#[test]
fn output_is_complete_when_wait_returns() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    for round in 0..50 {
        let argv = ["sh", "-c", "echo line one; echo line two >&2; echo result=ok"]
            .map(String::from)
            .to_vec();
        let spawned = client.spawn(SpawnRequest::command(argv)).unwrap();
        client.wait(spawned.handle, 5000).unwrap();
        let output = client.read_output(spawned.handle).unwrap();
        assert_eq!(output.stdout.data.as_bytes(), b"line one\nresult=ok\n", "round {round}");
        assert_eq!(output.stderr.data.as_bytes(), b"line two\n", "round {round}");
    }
}

/// `consume` reads stream a process's output as it is written: each byte once, the first lines
/// before the process ends, then the exit; `wait_output` no longer applies afterwards.
#[test]
fn consumed_output_streams_while_the_process_runs() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let argv = ["sh", "-c", "echo one; echo err >&2; sleep 0.5; echo two; exit 42"]
        .map(String::from)
        .to_vec();
    let spawned = client.spawn(SpawnRequest::command(argv)).unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut seen_before_exit = Vec::new();
    let exit = loop {
        let output = client.read_new_output(spawned.handle, 5000).unwrap();
        stdout.extend_from_slice(output.stdout.data.as_bytes());
        stderr.extend_from_slice(output.stderr.data.as_bytes());
        match output.exit {
            Some(exit) => break exit,
            None => seen_before_exit.extend_from_slice(output.stdout.data.as_bytes()),
        }
    };
    client.wait(spawned.handle, 5000).unwrap();
    let rest = client.read_new_output(spawned.handle, 0).unwrap();
    stdout.extend_from_slice(rest.stdout.data.as_bytes());
    stderr.extend_from_slice(rest.stderr.data.as_bytes());
    assert_eq!(exit.status, ExitStatus::Exited { code: 42 });
    assert_eq!(String::from_utf8_lossy(&stdout), "one\ntwo\n");
    assert_eq!(String::from_utf8_lossy(&stderr), "err\n");
    assert!(seen_before_exit.starts_with(b"one\n"), "streamed: {seen_before_exit:?}");
    let refused = agent_error(client.wait_output(WaitOutputRequest {
        handle: spawned.handle,
        pattern: "one".into(),
        stream: Stream::Stdout,
        timeout_ms: 100,
        from_offset: 0,
    }));
    assert_eq!(refused.kind, ErrorKind::InvalidRequest);
    let line =
        format!("{{\"id\":9,\"op\":\"read_output\",\"handle\":{},\"wait_ms\":10}}", spawned.handle);
    let response = client.send_raw_line(line.as_bytes(), Duration::from_secs(5)).unwrap();
    let error = response.outcome.expect_err("wait_ms without consume is refused");
    assert_eq!(error.kind, ErrorKind::InvalidRequest, "{}", error.message);
}

#[test]
fn files_are_read_and_written() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let dir = TempDir::new();
    let path = dir.path().join("value");
    let path_str = path.to_str().unwrap();

    let written = client.write_file(path_str, "250\n").unwrap();
    assert_eq!(written.bytes_written, 4);
    assert_eq!(std::fs::read(&path).unwrap(), b"250\n");
    client.write_file(path_str, "7").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"7", "the old content is replaced");

    std::fs::write(&path, [0xff, 0x00, b'a', b'b']).unwrap();
    let whole = client.read_file(path_str, 100).unwrap();
    assert_eq!((whole.data.as_bytes(), whole.truncated), (&[0xff, 0, b'a', b'b'][..], false));
    let part = client.read_file(path_str, 2).unwrap();
    assert_eq!((part.data.as_bytes(), part.truncated), (&[0xff, 0][..], true));

    // /proc files report size 0 and must be read to EOF.
    let kallsyms = client.read_file("/proc/kallsyms", 16 << 20).unwrap();
    let text = kallsyms.data.to_string_lossy();
    assert!(text.lines().count() > 1000, "{} lines", text.lines().count());
    assert!(text.contains(" T ") || text.contains(" t "));

    // /dev/kmsg blocks at its end and wants one whole record per read(): the agent must stop
    // at the end instead of hanging, and must not split records.
    let started = Instant::now();
    let kmsg = client.read_file("/dev/kmsg", 1 << 20).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let records = kmsg.data.to_string_lossy().into_owned();
    assert!(!records.is_empty());
    for record in records.lines().filter(|line| !line.starts_with(' ')) {
        // "priority,sequence,timestamp,flags[,caller=...];message"
        let (prefix, _) = record.split_once(';').expect(record);
        assert!(prefix.split(',').count() >= 4, "{record}");
    }

    let missing = agent_error(client.read_file(dir.path().join("nope").to_str().unwrap(), 10));
    assert_eq!(missing.kind, ErrorKind::Io);
    assert_eq!(missing.errno.unwrap().name, "ENOENT");
    let no_dir = agent_error(client.write_file(dir.path().join("a/b").to_str().unwrap(), "x"));
    assert_eq!(no_dir.errno.unwrap().name, "ENOENT");
    let relative = agent_error(client.read_file("etc/passwd", 10));
    assert_eq!(relative.kind, ErrorKind::InvalidRequest);
}

/// A pipe-like file with a writer but nothing written yet (a FIFO here, tracefs' trace_pipe in
/// the guest): `read_file` answers at once with nothing, `wait_ms` makes the agent wait for the
/// data, and answers empty once the wait is over.
#[test]
fn read_file_waits_for_data_when_asked() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let dir = TempDir::new();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let fifo_str = fifo.to_str().unwrap().to_owned();
    // Held open for reading and writing (which does not block on a FIFO): the agent's reads
    // always find a writer, so an empty FIFO is "nothing yet" (EAGAIN), never end of file.
    let held = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();

    let started = Instant::now();
    let nothing = client.read_file(&fifo_str, 100).unwrap();
    assert!(nothing.data.as_bytes().is_empty());
    assert!(started.elapsed() < Duration::from_millis(250), "{:?}", started.elapsed());

    let started = Instant::now();
    let nothing = client.read_file_waiting(&fifo_str, 100, 150).unwrap();
    assert!(nothing.data.as_bytes().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());

    let mut writer_end = held.try_clone().unwrap();
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        std::io::Write::write_all(&mut writer_end, b"line\n").unwrap();
    });
    let started = Instant::now();
    let contents = client.read_file_waiting(&fifo_str, 100, 5000).unwrap();
    let waited = started.elapsed();
    late.join().unwrap();
    assert_eq!(contents.data.as_bytes(), b"line\n");
    assert!(waited >= Duration::from_millis(250), "answered after {waited:?}, before the data");
    assert!(waited < Duration::from_secs(4), "answered after {waited:?}, not when the data came");
}

#[test]
fn clock_is_monotonic_and_realtime_is_current() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let first = client.clock().unwrap();
    thread::sleep(Duration::from_millis(5));
    let second = client.clock().unwrap();
    assert!(second.monotonic_ns >= first.monotonic_ns + 5_000_000);
    let host_realtime =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64;
    assert!(host_realtime.abs_diff(second.realtime_ns) < 5_000_000_000);
}

/// bpf(37, {prog_id, flags}) straight from this test process (as root, or in a thread dropped
/// to `uid`), to compare with what the agent reports.
fn direct_terminate_errno(prog_id: u32, flags: u32, uid: Option<u32>) -> Option<i32> {
    let call = move || {
        if let Some(uid) = uid {
            // SAFETY: raw syscalls change only this thread's credentials.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
            }
        }
        let attr: [u32; 2] = [prog_id, flags];
        // SAFETY: bpf() reads 8 bytes from a live array.
        let ret = unsafe { libc::syscall(libc::SYS_bpf, 37, attr.as_ptr(), 8u32) };
        (ret < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap())
    };
    thread::spawn(call).join().unwrap()
}

#[test]
fn terminate_reports_the_kernels_errno_by_number_and_name() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    // An unpatched host kernel knows no BPF_PROG_TERMINATE (or gives 37 another meaning), so
    // the call fails; the agent must report exactly what the kernel said.
    for (prog_id, flags, as_uid) in [(1, 0, None), (u32::MAX, 0xff, None), (1, 0, Some(65534))] {
        let reply = client.terminate(TerminateRequest { prog_id, flags, as_uid }).unwrap();
        assert!(reply.before_ns <= reply.after_ns);
        let SyscallResult::Failed(errno) = reply.result else {
            panic!("BPF_PROG_TERMINATE succeeded on an unpatched kernel: {reply:?}");
        };
        let expected =
            direct_terminate_errno(prog_id, flags, as_uid).expect("the direct call fails too");
        assert_eq!(errno.number, expected, "{prog_id} {flags} {as_uid:?}");
        let expected_name = format!("{:?}", nix::errno::Errno::from_raw(expected));
        assert_eq!(errno.name, expected_name);
        assert!(errno.name.starts_with('E'));
    }
}

#[test]
fn bad_input_gets_error_responses_and_the_agent_keeps_serving() {
    let agent = RunningAgent::start();
    let mut client = agent.client();
    let timeout = Duration::from_secs(10);
    let mut huge = br#"{"id":1,"op":"write_file","path":"/tmp/x","data":""#.to_vec();
    huge.resize(MAX_REQUEST_LINE_BYTES + 10, b'a');
    huge.extend_from_slice(br#""}"#);
    let cases: Vec<(Vec<u8>, Option<u64>, ErrorKind)> = vec![
        (b"garbage".to_vec(), None, ErrorKind::MalformedJson),
        (b"".to_vec(), None, ErrorKind::MalformedJson),
        (vec![0xff, 0xfe, 0x00], None, ErrorKind::MalformedJson),
        (br#"{"op":"clock"}"#.to_vec(), None, ErrorKind::InvalidRequest),
        (br#"{"id":7,"op":"format_disk"}"#.to_vec(), Some(7), ErrorKind::InvalidRequest),
        (br#"{"id":8,"op":"run","argv":["true"]}"#.to_vec(), Some(8), ErrorKind::InvalidRequest),
        (br#"{"id":9,"op":"clock","x":1}"#.to_vec(), Some(9), ErrorKind::InvalidRequest),
        (
            br#"{"id":10,"op":"run","argv":[],"timeout_ms":5}"#.to_vec(),
            Some(10),
            ErrorKind::InvalidRequest,
        ),
        (
            br#"{"id":11,"op":"kill","handle":1,"signal":0}"#.to_vec(),
            Some(11),
            ErrorKind::InvalidRequest,
        ),
        (
            br#"{"id":12,"op":"hello","protocol_version":999}"#.to_vec(),
            Some(12),
            ErrorKind::VersionMismatch,
        ),
        (huge, None, ErrorKind::LineTooLong),
    ];
    for (line, id, kind) in cases {
        let shown = String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned();
        let response = client.send_raw_line(&line, timeout).unwrap();
        assert_eq!(response.id, id, "{shown}");
        let error = response.outcome.expect_err(&shown);
        assert_eq!(error.kind, kind, "{shown}: {}", error.message);
        // The same connection still works after each bad line.
        assert!(client.clock().is_ok(), "after {shown}");
    }
    // A connection closed in the middle of a line does not hurt the agent either.
    let mut raw = UnixStream::connect(&agent.socket).unwrap();
    io::Write::write_all(&mut raw, br#"{"id":1,"op":"clo"#).unwrap();
    drop(raw);
    assert!(agent.client().clock().is_ok());
}

#[test]
fn connections_are_independent_and_share_the_process_table() {
    let agent = RunningAgent::start();
    let mut first = agent.client();
    let spawned =
        first.spawn(SpawnRequest::command(["sleep", "30"].map(String::from).to_vec())).unwrap();
    drop(first);

    // One connection blocks in a long run while another keeps answering.
    let socket = agent.socket.clone();
    let blocked = thread::spawn(move || {
        let mut client = Client::new(UnixStream::connect(socket).unwrap());
        client.run(run_request(&["sleep", "1"], 5000)).unwrap()
    });
    let mut second = agent.client();
    let started = Instant::now();
    for _ in 0..20 {
        second.clock().unwrap();
    }
    assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    second.kill(spawned.handle, libc::SIGKILL).unwrap();
    assert_eq!(
        second.wait(spawned.handle, 5000).unwrap().status.clone(),
        ExitStatus::Signaled { signal: libc::SIGKILL, name: "SIGKILL".into() }
    );
    assert_eq!(blocked.join().unwrap().status, ExitStatus::Exited { code: 0 });
}

#[test]
fn shutdown_kills_children_removes_the_socket_and_exits() {
    let mut agent = RunningAgent::start();
    let mut client = agent.client();
    let spawned = client
        .spawn(SpawnRequest::command(
            ["sh", "-c", "sleep 30 & echo $!; wait"].map(String::from).to_vec(),
        ))
        .unwrap();
    wait_until("the shell prints its child's pid", || {
        client.read_output(spawned.handle).unwrap().stdout.data.as_bytes().ends_with(b"\n")
    });
    let grandchild: u32 = client
        .read_output(spawned.handle)
        .unwrap()
        .stdout
        .data
        .to_string_lossy()
        .trim()
        .parse()
        .unwrap();

    client.shutdown().unwrap();
    let status = agent.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(process_is_gone(spawned.handle));
    wait_until("the grandchild is killed", || process_is_gone(grandchild));
    assert!(!agent.socket.exists());
    assert!(agent.log().contains("shutting down"));
}

/// Stands in for the VMM's hybrid-vsock socket: accepts one host connection, reads the CONNECT
/// line, and either refuses (closes) or answers OK and relays bytes to the agent's socket.
fn relay_one_connection(
    vmm_socket: &Path,
    agent_socket: PathBuf,
    listening_port: u32,
) -> thread::JoinHandle<()> {
    let listener = UnixListener::bind(vmm_socket).unwrap();
    thread::spawn(move || {
        let (mut host, _) = listener.accept().unwrap();
        let line = hybrid_vsock::read_handshake_line(&mut host).unwrap().unwrap();
        if hybrid_vsock::parse_connect_request(&line).unwrap() != listening_port {
            return;
        }
        let guest = UnixStream::connect(agent_socket).unwrap();
        io::Write::write_all(&mut host, hybrid_vsock::connect_reply_line(1_073_741_824).as_bytes())
            .unwrap();
        let (mut host_in, mut guest_out) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
        let upstream = thread::spawn(move || {
            let _ = io::copy(&mut host_in, &mut guest_out);
            let _ = guest_out.shutdown(std::net::Shutdown::Write);
        });
        let (mut guest_in, mut host_out) = (guest, host);
        let _ = io::copy(&mut guest_in, &mut host_out);
        let _ = upstream.join();
    })
}

#[test]
fn hybrid_vsock_handshake_reaches_the_agent() {
    let agent = RunningAgent::start();
    let dir = TempDir::new();
    let vmm_socket = dir.path().join("vsock.sock");

    let relay = relay_one_connection(&vmm_socket, agent.socket.clone(), 1024);
    let stream =
        hybrid_vsock::connect_with_retry(&vmm_socket, 1024, Duration::from_secs(5)).unwrap();
    let mut client = Client::new(stream);
    assert_eq!(client.hello().unwrap().protocol_version, termlab_protocol::PROTOCOL_VERSION);
    assert!(client.clock().unwrap().monotonic_ns > 0);
    drop(client);
    relay.join().unwrap();

    std::fs::remove_file(&vmm_socket).unwrap();
    let relay = relay_one_connection(&vmm_socket, agent.socket.clone(), 1024);
    let refused = hybrid_vsock::connect(&vmm_socket, 5, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(refused, HandshakeError::Refused { port: 5 }), "{refused}");
    relay.join().unwrap();
}

#[test]
fn requests_are_answered_in_order_with_their_ids() {
    let agent = RunningAgent::start();
    let mut raw = UnixStream::connect(&agent.socket).unwrap();
    let mut batch = Vec::new();
    for id in [5u64, 3, 900] {
        batch.extend(Request::new(id, RequestBody::Clock {}).to_line().unwrap());
    }
    io::Write::write_all(&mut raw, &batch).unwrap();
    let mut lines = termlab_protocol::line::LineBuffer::new(1 << 20);
    for id in [5u64, 3, 900] {
        let line = lines.read_line(&mut raw).unwrap();
        let response: termlab_protocol::Response = serde_json::from_slice(&line).unwrap();
        assert_eq!(response.id, Some(id));
        assert!(response.outcome.is_ok());
    }
}
