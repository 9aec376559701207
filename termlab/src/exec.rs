//! `termlab exec`: boot a kernel, run one command in the guest through the
//! agent with its stdout and stderr streamed live, and end with the
//! command's exit status. Nothing stays behind: the VM is powered off (or
//! killed), the console log is a temporary file, the vsock socket directory
//! goes with the guest.
//!
//! Exit status of `termlab exec` (see [`ExecError::exit_code`]):
//!
//! | code | meaning |
//! |---|---|
//! | 0–255 | the command's own exit code |
//! | 128+N | the command was killed by signal N (as sh reports it) |
//! | 126 / 127 | the command could not be executed / was not found in the guest (as sh) |
//! | 69 | the guest did not come up: the VMM or the nested L1 VM could not start, or the kernel panicked or hung before the agent answered (vmtest's "boot failure") |
//! | 70 | the guest kernel panicked, or the guest hung, while the command ran (with the console tail) |
//! | 125 | termlab itself failed otherwise (bad kernel path, unusable agent answer) |
//! | 130 | interrupted (Ctrl-C, SIGTERM) |
//!
//! 69 and 70 are EX_UNAVAILABLE and EX_SOFTWARE of sysexits.h: commands
//! rarely use that range (shells use 126/127/128+N, test frameworks 0–2).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use termlab_protocol::client::ClientError;
use termlab_protocol::{ExitStatus, SpawnRequest};
use thiserror::Error;

use crate::cancel::Cancel;
use crate::engine::{self, BootSpec, EngineError, Guest};

/// The guest did not come up (vmtest's exit status for a boot failure).
pub const EXIT_GUEST_UNAVAILABLE: u8 = 69;
/// The guest kernel panicked or the guest hung while the command ran.
pub const EXIT_GUEST_FAILED: u8 = 70;
/// termlab could not run the command for another reason.
pub const EXIT_EXEC_FAILED: u8 = 125;
/// The command exists but cannot be executed (sh's convention).
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found (sh's convention).
pub const EXIT_NOT_FOUND: u8 = 127;
/// Ctrl-C or SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

/// How long one long poll for output waits in the agent. A guest that does
/// not answer within this plus the client's margin (5 s) is hung.
const POLL_MS: u64 = 1000;
/// After the command's exit, how long its output pipes get to close.
const DRAIN_MS: u64 = 10_000;

#[derive(Debug, Error)]
pub enum ExecError {
    /// The guest did not come up (exit 69).
    #[error("the guest did not come up: {0}")]
    Boot(String),
    /// The guest panicked or hung under the command (exit 70).
    #[error("{0}")]
    GuestFailed(String),
    #[error("the command could not be started in the guest: {message}")]
    Start { message: String, errno: Option<i32> },
    /// Anything else termlab could not do (exit 125).
    #[error("{0}")]
    Failed(String),
    #[error("interrupted (Ctrl-C or SIGTERM): the VM was stopped")]
    Interrupted,
}

impl ExecError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Boot(_) => EXIT_GUEST_UNAVAILABLE,
            ExecError::GuestFailed(_) => EXIT_GUEST_FAILED,
            ExecError::Start { errno: Some(libc::ENOENT), .. } => EXIT_NOT_FOUND,
            ExecError::Start { errno: Some(libc::EACCES | libc::ENOEXEC), .. } => {
                EXIT_CANNOT_EXECUTE
            }
            ExecError::Start { .. } | ExecError::Failed(_) => EXIT_EXEC_FAILED,
            ExecError::Interrupted => EXIT_INTERRUPTED,
        }
    }

    /// Classifies an engine error from booting (`booted` false) or from
    /// running the command, with the console's last lines where the error
    /// does not carry them (the console file is temporary).
    fn from_engine(error: EngineError, booted: bool, console: &Path) -> ExecError {
        let tail = || engine::console_tail(console, 20);
        match error {
            EngineError::Interrupted => ExecError::Interrupted,
            EngineError::Image(error) => ExecError::Failed(error.to_string()),
            error @ EngineError::NoAgent { .. } => ExecError::Boot(error.to_string()),
            EngineError::VmExited { exit, .. } => {
                let reason = engine::describe_exit(&exit);
                // A panic's description ends with the console's last lines already.
                let message = if reason.contains("Guest console") {
                    format!("the VM ended: {reason}")
                } else {
                    format!("the VM ended: {reason}. Guest console, last lines:\n{}", tail())
                };
                if booted {
                    ExecError::GuestFailed(message)
                } else {
                    ExecError::Boot(message)
                }
            }
            error @ (EngineError::Hung { .. } | EngineError::AgentGone { .. }) => {
                ExecError::GuestFailed(error.to_string())
            }
            EngineError::Vm(error) => ExecError::Boot(format!("the VMM could not start: {error}")),
            error => ExecError::Failed(error.to_string()),
        }
    }
}

/// The exit code a shell would report for `status`.
pub fn shell_exit_code(status: &ExitStatus) -> u8 {
    match status {
        ExitStatus::Exited { code } => (*code & 0xff) as u8,
        ExitStatus::Signaled { signal, .. } => (128 + *signal).clamp(0, 255) as u8,
    }
}

/// What to boot and run.
pub struct ExecSpec<'a> {
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to the kernel command line.
    pub kernel_args: Option<&'a str>,
    /// Program and arguments, passed to the guest exactly (no shell joins them).
    pub argv: &'a [String],
    /// The command's working directory in the guest (default: the agent's, `/`).
    pub cwd: Option<&'a str>,
    /// Host files copied into the guest before the command runs.
    pub upload: Option<&'a Upload>,
    /// Ctrl-C: the command gets SIGINT and the VM is killed.
    pub cancel: &'a Cancel,
}

/// Most bytes [`Upload::collect`] copies into the guest (whose root is in RAM).
pub const MAX_UPLOAD_BYTES: u64 = 64 << 20;
/// Bytes per request when a file is copied (a request line holds at most 8 MiB, and JSON may
/// escape a byte as 6).
const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

/// A host directory to copy into the guest: what it holds, read before anything boots.
#[derive(Debug, Clone)]
pub struct Upload {
    pub host_dir: std::path::PathBuf,
    pub guest_dir: String,
    /// Directories (guest paths), parents first.
    dirs: Vec<String>,
    /// (host path, guest path, permission bits).
    files: Vec<(std::path::PathBuf, String, u32)>,
    /// (link target, guest path).
    links: Vec<(String, String)>,
}

impl Upload {
    /// Lists `host_dir` (without `.git`), refusing more than [`MAX_UPLOAD_BYTES`].
    pub fn collect(host_dir: &Path, guest_dir: &str) -> Result<Upload, ExecError> {
        use std::os::unix::fs::PermissionsExt;
        let mut upload = Upload {
            host_dir: host_dir.to_owned(),
            guest_dir: guest_dir.to_owned(),
            dirs: vec![guest_dir.to_owned()],
            files: Vec::new(),
            links: Vec::new(),
        };
        let unreadable =
            |path: &Path, e: std::io::Error| ExecError::Failed(format!("{}: {e}", path.display()));
        let mut total = 0u64;
        let mut pending = vec![(host_dir.to_owned(), guest_dir.to_owned())];
        while let Some((host, guest)) = pending.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&host)
                .map_err(|e| unreadable(&host, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| unreadable(&host, e))?;
            entries.sort_by_key(|entry| entry.file_name());
            for entry in entries {
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    return Err(ExecError::Failed(format!(
                        "{}: a file name that is not UTF-8 cannot be copied into the guest",
                        entry.path().display()
                    )));
                };
                if name == ".git" {
                    continue;
                }
                let (host_path, guest_path) = (entry.path(), format!("{guest}/{name}"));
                let metadata =
                    std::fs::symlink_metadata(&host_path).map_err(|e| unreadable(&host_path, e))?;
                if metadata.is_symlink() {
                    let target =
                        std::fs::read_link(&host_path).map_err(|e| unreadable(&host_path, e))?;
                    upload.links.push((target.to_string_lossy().into_owned(), guest_path));
                } else if metadata.is_dir() {
                    upload.dirs.push(guest_path.clone());
                    pending.push((host_path, guest_path));
                } else if metadata.is_file() {
                    total += metadata.len();
                    let mode = metadata.permissions().mode() & 0o7777;
                    upload.files.push((host_path, guest_path, mode));
                }
            }
        }
        if total > MAX_UPLOAD_BYTES {
            return Err(ExecError::Failed(format!(
                "{} holds {} MiB; termlab copies it into the guest's memory and stops at {} MiB",
                host_dir.display(),
                total >> 20,
                MAX_UPLOAD_BYTES >> 20
            )));
        }
        Ok(upload)
    }

    /// Copies the files in through the agent.
    fn copy_in(
        &self,
        client: &mut termlab_protocol::client::Client<std::os::unix::net::UnixStream>,
    ) -> Result<(), StreamError> {
        let agent = |what: String| move |source| StreamError::Client(what, source);
        let run = |client: &mut termlab_protocol::client::Client<_>,
                   argv: Vec<String>,
                   stdin: Option<Vec<u8>>| {
            let shown = argv.join(" ");
            let output = client
                .run(termlab_protocol::RunRequest {
                    stdin: stdin.map(Into::into),
                    ..termlab_protocol::RunRequest::command(argv, 60_000)
                })
                .map_err(agent(format!("copying files in ({shown})")))?;
            match output.status {
                ExitStatus::Exited { code: 0 } => Ok(()),
                status => Err(StreamError::Upload(format!(
                    "`{shown}` failed in the guest ({status:?}): {}",
                    output.stderr.data.to_string_lossy().trim()
                ))),
            }
        };
        let mkdir = ["mkdir", "-p"].into_iter().map(str::to_owned);
        run(client, mkdir.chain(self.dirs.iter().cloned()).collect(), None)?;
        for (host, guest, mode) in &self.files {
            let bytes = std::fs::read(host)
                .map_err(|e| StreamError::Upload(format!("{}: {e}", host.display())))?;
            let mut chunks = bytes.chunks(UPLOAD_CHUNK_BYTES);
            client
                .write_file(guest, chunks.next().unwrap_or_default())
                .map_err(agent(format!("writing {guest}")))?;
            for chunk in chunks {
                let append = ["sh", "-c", "cat >> \"$0\"", guest.as_str()];
                run(client, append.map(str::to_owned).to_vec(), Some(chunk.to_vec()))?;
            }
            run(client, vec!["chmod".into(), format!("{mode:o}"), guest.clone()], None)?;
        }
        for (target, guest) in &self.links {
            run(client, vec!["ln".into(), "-s".into(), target.clone(), guest.clone()], None)?;
        }
        Ok(())
    }
}

/// Where the time went, for `--timings`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecTimings {
    /// VMM start to the agent's `hello`.
    pub boot: Duration,
    /// Spawn to the command's exit and output drained.
    pub command: Duration,
    /// The guest's power-off.
    pub power_off: Duration,
}

/// Boots, runs the command with its output streamed to `stdout`/`stderr`,
/// powers the guest off, and returns the command's exit status.
pub fn exec_in_guest(
    spec: &ExecSpec<'_>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    timings: &mut ExecTimings,
) -> Result<ExitStatus, ExecError> {
    let console = tempfile::Builder::new()
        .prefix("termlab-exec-console.")
        .tempfile()
        .map_err(|e| ExecError::Failed(format!("cannot create a console log: {e}")))?;
    let booting = Instant::now();
    let mut guest = Guest::boot(BootSpec {
        kernel: spec.kernel,
        initramfs: spec.initramfs,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        console_log: console.path().to_owned(),
        console_stdin: false,
        kernel_args: spec.kernel_args,
        cancel: spec.cancel,
        system_map: None,
    })
    .map_err(|error| ExecError::from_engine(error, false, console.path()))?;
    timings.boot = booting.elapsed();

    let running = Instant::now();
    let outcome = run_streaming(&mut guest, spec, stdout, stderr);
    timings.command = running.elapsed();
    let outcome = outcome.map_err(|error| match error {
        StreamError::Start(reply) => ExecError::Start {
            message: reply.message.clone(),
            errno: reply.errno.as_ref().map(|e| e.number),
        },
        StreamError::Client(what, source) => {
            let error = EngineError::Agent { what, source };
            // Built kernels keep their System.map beside their images (bzImage, vmlinux).
            let system_map = spec.kernel.with_file_name("System.map");
            let explained = engine::explain_with_vm_state(
                error,
                &guest,
                console.path(),
                Some(system_map.as_path()).filter(|map| map.is_file()),
            );
            ExecError::from_engine(explained, true, console.path())
        }
        StreamError::Upload(message) => ExecError::Failed(message),
        StreamError::Interrupted => ExecError::Interrupted,
    });
    let stopping = Instant::now();
    let agent_usable = match &outcome {
        Ok(_) | Err(ExecError::Start { .. } | ExecError::Failed(_)) => true,
        Err(_) => false,
    };
    if agent_usable {
        guest.power_off();
    } else {
        guest.kill();
    }
    timings.power_off = stopping.elapsed();
    outcome
}

enum StreamError {
    Start(termlab_protocol::ErrorReply),
    Upload(String),
    Client(String, ClientError),
    Interrupted,
}

fn run_streaming(
    guest: &mut Guest,
    spec: &ExecSpec<'_>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<ExitStatus, StreamError> {
    let argv = match spec.cwd {
        // "$0" is the directory, "$@" the command: argv stays exact.
        Some(dir) => ["sh", "-c", "cd \"$0\" && exec \"$@\"", dir]
            .into_iter()
            .map(str::to_owned)
            .chain(spec.argv.iter().cloned())
            .collect(),
        None => spec.argv.to_vec(),
    };
    let client = &mut guest.client;
    if let Some(upload) = spec.upload {
        upload.copy_in(client)?;
    }
    let spawned = match client.spawn(SpawnRequest::command(argv)) {
        Ok(spawned) => spawned,
        Err(ClientError::Agent { error, .. }) => return Err(StreamError::Start(error)),
        Err(source) => return Err(StreamError::Client("starting the command".into(), source)),
    };
    let handle = spawned.handle;
    let mut copy = |output: &termlab_protocol::ProcessOutput| {
        // A closed host pipe (`termlab exec ... | head`) is the reader's choice: keep going.
        let _ = stdout.write_all(output.stdout.data.as_bytes()).and_then(|()| stdout.flush());
        let _ = stderr.write_all(output.stderr.data.as_bytes()).and_then(|()| stderr.flush());
    };
    let status = loop {
        if spec.cancel.is_cancelled() {
            // The command gets the Ctrl-C too; the VM is killed right after.
            let _ = client.kill(handle, libc::SIGINT);
            return Err(StreamError::Interrupted);
        }
        let output = client
            .read_new_output(handle, POLL_MS)
            .map_err(|source| StreamError::Client("reading the command's output".into(), source))?;
        copy(&output);
        if let Some(exit) = output.exit {
            break exit.status;
        }
    };
    // The exit is seen before the pipes close: wait for the rest of the output.
    client
        .wait(handle, DRAIN_MS)
        .map_err(|source| StreamError::Client("waiting for the command's output".into(), source))?;
    let rest = client
        .read_new_output(handle, 0)
        .map_err(|source| StreamError::Client("reading the command's output".into(), source))?;
    copy(&rest);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(shell_exit_code(&ExitStatus::Exited { code: 42 }), 42);
        assert_eq!(shell_exit_code(&ExitStatus::Exited { code: 0 }), 0);
        let killed = ExitStatus::Signaled { signal: 9, name: "SIGKILL".into() };
        assert_eq!(shell_exit_code(&killed), 137);
    }

    #[test]
    fn guest_failures_have_their_own_codes() {
        let start = |errno| ExecError::Start { message: String::new(), errno };
        assert_eq!(start(Some(libc::ENOENT)).exit_code(), EXIT_NOT_FOUND);
        assert_eq!(start(Some(libc::EACCES)).exit_code(), EXIT_CANNOT_EXECUTE);
        assert_eq!(start(None).exit_code(), EXIT_EXEC_FAILED);
        let console = Path::new("/nonexistent/console.log");
        let hung = EngineError::Hung {
            what: "x".into(),
            waited: Duration::from_secs(1),
            vcpus: String::new(),
            console: console.into(),
            tail: String::new(),
        };
        assert_eq!(ExecError::from_engine(hung, true, console).exit_code(), EXIT_GUEST_FAILED);
        let panicked = || EngineError::VmExited {
            exit: termlab_vmm::ExitReason::Panic { console_tail: String::new() },
            console: console.into(),
        };
        let during = ExecError::from_engine(panicked(), true, console);
        assert_eq!(during.exit_code(), EXIT_GUEST_FAILED);
        assert!(during.to_string().contains("panicked"), "{during}");
        // An exit whose description has no console lines gets the console's tail.
        let reset =
            EngineError::VmExited { exit: termlab_vmm::ExitReason::Reset, console: console.into() };
        let reset = ExecError::from_engine(reset, true, console);
        assert!(reset.to_string().contains("(the guest console is empty)"), "{reset}");
        let at_boot = ExecError::from_engine(panicked(), false, console);
        assert_eq!(at_boot.exit_code(), EXIT_GUEST_UNAVAILABLE);
        assert_eq!(ExecError::Interrupted.exit_code(), EXIT_INTERRUPTED);
    }
}
