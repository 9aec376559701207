//! A booted guest: the VM from termlab-vmm and a connection to its agent.
//! Dropping a `Guest` stops the VM (termlab-vmm releases its threads and
//! socket files) and removes the temporary socket directory.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use termlab_protocol::client::Client;
use termlab_protocol::hybrid_vsock::{self, HandshakeError};
use termlab_protocol::DEFAULT_VSOCK_PORT;
use termlab_vmm::{ConsoleConfig, ExitReason, Vm, VmConfig, VsockConfig};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{EngineError, CONSOLE_TAIL_LINES};
use crate::cancel::Cancel;

/// The guest's vsock context id (any value >= 3; there is one guest).
const GUEST_CID: u64 = 3;
/// Boot to a listening agent: ~2 s natively, much longer under nested TCG.
const AGENT_WAIT: Duration = Duration::from_secs(180);
/// How long one connection attempt may take before the VM's state is checked again.
const CONNECT_SLICE: Duration = Duration::from_secs(2);
/// How long the guest gets to power off after the agent's `shutdown`.
const POWER_OFF_WAIT: Duration = Duration::from_secs(20);

/// The kernel command line; the VMM appends the virtio-mmio device itself. `loglevel=5`:
/// warnings, errors and panics reach the console, the boot's informational lines only the
/// kernel log (dmesg.txt). Under nesting every console byte is a round trip through two
/// emulated exits: the boot's ~8 KB of chatter held a guest 11 s longer (19.3 s to the agent
/// against 8.0 s, control.toml, 2026-12-04). A scenario's `kernel_args` can raise it.
pub const CMDLINE: &str = "console=ttyS0 loglevel=5 reboot=k panic=-1 nokaslr";

/// The command line with a scenario's `[vm] kernel_args` appended
/// (checked by `scenario::check_kernel_args`).
pub fn cmdline(kernel_args: Option<&str>) -> String {
    match kernel_args.map(str::trim).filter(|args| !args.is_empty()) {
        Some(args) => format!("{CMDLINE} {args}"),
        None => CMDLINE.to_owned(),
    }
}

/// Whether the page-table root that `cr3` names lies in `memory`.
fn page_tables_in(memory: &impl GuestMemoryBackend, cr3: u64) -> bool {
    const CR3_ROOT: u64 = 0x000f_ffff_ffff_f000;
    memory.address_in_range(GuestAddress(cr3 & CR3_ROOT))
}

/// What a hang report says of a vCPU whose page-table root lies outside the guest's memory:
/// no guest can run so (its first TLB miss would fault), so the registers KVM hands back are
/// its host's. Nested under QEMU TCG this is the emulated SVM losing the guest's state (README,
/// open problems); scripts/lib/suite-group.sh recognises these words.
pub const HOST_STATE_IN_VCPU: &str =
    "is outside the guest's memory: the vCPU holds its host's state, not the guest's";

pub struct Guest {
    vm: Vm,
    pub client: Client<UnixStream>,
    /// Holds the vsock Unix socket; removed on drop.
    _socket_dir: tempfile::TempDir,
    /// Ends [`Guest::wait_until_exit`]; what booted it also stops on it.
    cancel: Cancel,
}

pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub console_log: PathBuf,
    /// Forward the host's stdin to the guest console (for --keep-vm).
    pub console_stdin: bool,
    /// Appended to [`CMDLINE`] (a scenario's `[vm] kernel_args`).
    pub kernel_args: Option<&'a str>,
    /// Stops waiting for the agent (Ctrl-C), and later [`Guest::wait_until_exit`].
    pub cancel: &'a Cancel,
    /// Names the vCPUs' positions when the agent never answers.
    pub system_map: Option<&'a Path>,
}

impl Guest {
    /// Boots the VM and waits until its agent answers `hello`.
    pub fn boot(spec: BootSpec<'_>) -> Result<Guest, EngineError> {
        let socket_dir =
            tempfile::Builder::new().prefix("termlab-vsock.").tempdir().map_err(|source| {
                EngineError::Host {
                    what: "create a socket directory in",
                    path: std::env::temp_dir(),
                    source,
                }
            })?;
        let uds_path = socket_dir.path().join("vsock.sock");
        let mut config = VmConfig::new(
            spec.kernel.to_owned(),
            Some(spec.initramfs.to_owned()),
            cmdline(spec.kernel_args),
        );
        config.vcpus = spec.vcpus;
        config.mem_mib = spec.memory_mib;
        config.console = ConsoleConfig {
            file: Some(spec.console_log.clone()),
            stdout: false,
            stdin: spec.console_stdin,
        };
        config.vsock = Some(VsockConfig { guest_cid: GUEST_CID, uds_path: uds_path.clone() });
        let mut vm = Vm::new(config)?;
        vm.start()?;

        let deadline = Instant::now() + AGENT_WAIT;
        let stream = loop {
            if spec.cancel.is_cancelled() {
                return Err(EngineError::Interrupted);
            }
            if let Some(reason) = vm.wait_exit(Some(Duration::ZERO)) {
                return Err(EngineError::VmExited { exit: reason, console: spec.console_log });
            }
            match hybrid_vsock::connect_with_retry(&uds_path, DEFAULT_VSOCK_PORT, CONNECT_SLICE) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() < deadline && retryable(&error) => continue,
                Err(error) => {
                    // Where the boot stopped: the console's end and the vCPUs.
                    let vcpus = vcpu_positions(&vm, spec.system_map);
                    let tail = console_tail(&spec.console_log, CONSOLE_TAIL_LINES);
                    return Err(EngineError::NoAgent {
                        waited: AGENT_WAIT,
                        detail: error.to_string(),
                        console: spec.console_log,
                        vcpus,
                        tail,
                    });
                }
            }
        };
        // A guest that dies (panic, reboot) leaves this connection open on
        // the VMM's side: close it then, so a pending request fails at once
        // instead of waiting out its timeout.
        if let Ok(watched) = stream.try_clone() {
            let watch = vm.exit_watch();
            std::thread::spawn(move || {
                watch.wait(None);
                let _ = watched.shutdown(std::net::Shutdown::Both);
            });
        }
        let mut client = Client::new(stream);
        client.hello().map_err(|source| EngineError::Agent { what: "hello".into(), source })?;
        Ok(Guest { vm, client, _socket_dir: socket_dir, cancel: spec.cancel.clone() })
    }

    /// The VM and the agent client at once (the stack probe watches the VM
    /// while a request is in flight).
    pub fn parts(&mut self) -> (&Vm, &mut Client<UnixStream>) {
        (&self.vm, &mut self.client)
    }

    /// Where each vCPU is: see [`vcpu_positions`].
    pub fn vcpu_positions(&self, system_map: Option<&Path>) -> String {
        vcpu_positions(&self.vm, system_map)
    }

    /// The token this guest was booted with.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    /// Why the VM ended, if it has.
    pub fn exited(&self) -> Option<ExitReason> {
        self.vm.wait_exit(Some(Duration::ZERO))
    }

    /// Blocks until the VM ends (the user powers it off or presses Ctrl-C).
    pub fn wait_until_exit(&self) -> ExitReason {
        loop {
            if let Some(reason) = self.vm.wait_exit(Some(Duration::from_millis(200))) {
                return reason;
            }
            if self.cancel.is_cancelled() {
                return ExitReason::Stopped;
            }
        }
    }

    /// Stops the VM at once, without asking the guest (its agent is gone or
    /// hung, or the user pressed Ctrl-C).
    pub fn kill(self) -> ExitReason {
        self.vm.stop()
    }

    /// Asks the agent to power the guest off; stops the VM if it does not.
    pub fn power_off(mut self) -> ExitReason {
        // A failed shutdown request (agent gone) just means stopping harder.
        let _ = self.client.shutdown();
        match self.vm.wait_exit(Some(POWER_OFF_WAIT)) {
            Some(reason) => reason,
            None => self.vm.stop(),
        }
    }
}

/// Where each vCPU is, sampled three times 300 ms apart (the VM paused briefly for
/// each), named after the kernel's symbols when `system_map` is given: for a guest that
/// stopped answering, whether its vCPUs still move, where they sit and whether they
/// take interrupts. One line per vCPU, or why the VM could not be read.
pub fn vcpu_positions(vm: &Vm, system_map: Option<&Path>) -> String {
    const SAMPLES: usize = 3;
    const GAP: Duration = Duration::from_millis(300);
    let symbols = system_map
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| termlab_introspect::symbols::SymbolTable::parse(&text).ok());
    let name = |rip: u64| match symbols.as_ref().and_then(|table| table.symbolize(rip)) {
        Some(at) => at.to_string(),
        None => format!("{rip:#x}"),
    };
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); vm.vcpu_count()];
    for sample in 0..SAMPLES {
        if sample > 0 {
            std::thread::sleep(GAP);
        }
        if let Err(error) = vm.pause() {
            return format!("(the vCPUs could not be paused to read them: {error})");
        }
        for (vcpu, positions) in seen.iter_mut().enumerate() {
            positions.push(match vm.regs(vcpu) {
                Ok(regs) => {
                    let interrupts = if regs.rflags & 0x200 != 0 { "" } else { " (IF off)" };
                    let mut at = format!("{}{interrupts}", name(regs.rip));
                    if sample + 1 == SAMPLES {
                        at.push_str(&code_at(vm, vcpu, regs.rip));
                    }
                    at
                }
                Err(error) => format!("(unreadable: {error})"),
            });
        }
        if let Err(error) = vm.resume() {
            return format!("(the VM could not be resumed after reading it: {error})");
        }
    }
    seen.iter()
        .enumerate()
        .map(|(vcpu, positions)| format!("  vCPU {vcpu}: {}", positions.join(" -> ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a paused vCPU executes at `rip`, for a place no symbol names (a BPF image, a
/// trampoline): the code bytes through its own page tables, and CR2 (the last page fault's
/// address), or why they cannot be read. A CR3 outside the guest's memory is no state of
/// the guest's: [`HOST_STATE_IN_VCPU`] says so.
fn code_at(vm: &Vm, vcpu: usize, rip: u64) -> String {
    const CODE_BYTES: usize = 16;
    let sregs = match vm.sregs(vcpu) {
        Ok(sregs) => sregs,
        Err(error) => return format!(" [no sregs: {error}]"),
    };
    if !page_tables_in(vm.memory(), sregs.cr3) {
        return format!(" [CR3 {:#x} {HOST_STATE_IN_VCPU}; cr2 {:#x}]", sregs.cr3, sregs.cr2);
    }
    let mut code = [0u8; CODE_BYTES];
    let read = termlab_introspect::paging::PageTables::from_sregs(&sregs)
        .and_then(|tables| tables.read(vm.memory(), rip, &mut code));
    let bytes = match read {
        Ok(()) => code.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
        Err(error) => format!("unreadable ({error})"),
    };
    format!(" [code: {bytes}; cr2 {:#x}]", sregs.cr2)
}

/// Not listening yet, or the VMM socket not there yet: try again.
fn retryable(error: &HandshakeError) -> bool {
    matches!(
        error,
        HandshakeError::Refused { .. }
            | HandshakeError::Timeout(_)
            | HandshakeError::Connect { .. }
    )
}

/// The last `lines` lines of the guest console log, indented, for error messages.
pub fn console_tail(console_log: &Path, lines: usize) -> String {
    let kept = console_last_lines(console_log, lines);
    if kept.is_empty() {
        return "  (the guest console is empty)".to_owned();
    }
    kept.iter().map(|line| format!("  {line}")).collect::<Vec<_>>().join("\n")
}

/// The last `lines` non-blank lines of the guest console log (none when it
/// cannot be read), without trailing white space.
pub fn console_last_lines(console_log: &Path, lines: usize) -> Vec<String> {
    let text = std::fs::read(console_log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let mut kept: Vec<String> = text
        .lines()
        .rev()
        .filter(|line| !line.trim().is_empty())
        .take(lines)
        .map(|line| line.trim_end().to_owned())
        .collect();
    kept.reverse();
    kept
}

pub fn describe_exit(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Panic { console_tail } => {
            // The panic's own line names the cause; the last lines show where it happened.
            const WHY: &str = "Kernel panic - not syncing";
            let why = console_tail
                .lines()
                .find_map(|line| line.find(WHY).map(|at| line[at..].trim_end()))
                .unwrap_or("Kernel panic");
            let last: Vec<&str> =
                console_tail.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
            format!(
                "the guest kernel panicked ({why}). Guest console, last lines:\n{}",
                last.join("\n")
            )
        }
        ExitReason::Reset => "the guest rebooted".into(),
        ExitReason::TripleFault => "a vCPU triple-faulted".into(),
        ExitReason::Halted => "the guest halted".into(),
        ExitReason::Stopped => "the VM was stopped".into(),
        ExitReason::VcpuError { vcpu, message } => format!("vCPU {vcpu} failed: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CR3 of the two hung vCPUs of 2026-12-05 (nested): an L1 page table, 4 GiB up.
    #[test]
    fn a_page_table_root_outside_guest_memory_is_told_apart() {
        let memory = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)])
            .expect("guest memory");
        assert!(page_tables_in(&memory, 0x00a4_2000));
        // The low bits are flags (PCID, PWT/PCD), not part of the address.
        assert!(page_tables_in(&memory, (255 << 20) | 0x018));
        assert!(!page_tables_in(&memory, 0x1_00a4_2000));
        assert!(!page_tables_in(&memory, 256 << 20));
    }

    #[test]
    fn a_panic_is_named_by_its_own_line_then_the_last_console_lines() {
        let mut tail = String::from("[ 1.0] something before\n[ 2.0] Kernel panic - not syncing: Out of memory: system-wide panic_on_oom is enabled\n");
        for frame in 0..20 {
            tail.push_str(&format!("[ 2.1]  frame {frame}\n"));
        }
        let text = describe_exit(&ExitReason::Panic { console_tail: tail });
        let first = text.lines().next().expect("a line");
        assert_eq!(first, "the guest kernel panicked (Kernel panic - not syncing: Out of memory: system-wide panic_on_oom is enabled). Guest console, last lines:");
        assert_eq!(text.lines().count(), 13, "{text}");
        assert!(text.ends_with("frame 19"), "{text}");
    }

    #[test]
    fn the_console_tail_keeps_the_last_non_blank_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("console.log");
        assert_eq!(console_tail(&log, 3), "  (the guest console is empty)");
        std::fs::write(&log, "one\ntwo\n\nthree\r\nfour\n\n").expect("write");
        assert_eq!(console_tail(&log, 3), "  two\n  three\n  four");
    }
}
