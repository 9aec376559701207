//! Boots a kernel interactively with the guest console on this terminal.
//!
//! termlab-vmm --kernel K [--initrd I] [--cmdline "..."] [--vcpus N] [--mem-mib M]
//!             [--vsock-uds PATH] [--vsock-cid CID] [--console-log FILE]
//!
//! Exit status: 0 when the guest reset or powered off, 1 on a VMM error, 2 on bad usage,
//! 3 on a guest kernel panic, 4 on a triple fault, 128+N when stopped by signal N (SIGHUP,
//! SIGINT = Ctrl-C, SIGTERM: 129, 130, 143), after the VM is torn down (vsock socket removed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use termlab_vmm::{ConsoleConfig, ExitReason, Vm, VmConfig, VsockConfig};

/// Boot a kernel with the guest console on this terminal.
#[derive(Parser)]
#[command(
    name = "termlab-vmm",
    version,
    after_help = "Exit status: 0 when the guest reset or powered off, 1 on a VMM error, 2 on bad \
usage, 3 on a guest kernel panic, 4 on a triple fault, 128+N when stopped by signal N."
)]
struct Args {
    /// The kernel image: a bzImage, or an uncompressed vmlinux ELF (no self-decompression).
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 nokaslr")]
    cmdline: String,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mib: u32,
    /// Serve the guest's virtio-vsock on this Unix socket (Firecracker's hybrid vsock).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Also write the console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
}

impl Args {
    fn into_config(self) -> VmConfig {
        let mut config = VmConfig::new(self.kernel, self.initrd, self.cmdline);
        config.console = ConsoleConfig { file: self.console_log, stdout: true, stdin: true };
        config.vcpus = self.vcpus;
        config.mem_mib = self.mem_mib;
        config.vsock =
            self.vsock_uds.map(|uds_path| VsockConfig { guest_cid: self.vsock_cid, uds_path });
        config
    }
}

/// Blocks SIGHUP (terminal closed), SIGINT (Ctrl-C) and SIGTERM in every thread (threads
/// inherit the mask) so the main thread can collect them synchronously and shut the VM down
/// in order; their default action would kill the process and leave the vsock socket behind.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The termination signal that arrived within `wait`, if any.
fn termination_signal(set: &libc::sigset_t, wait: Duration) -> Option<i32> {
    let timeout = libc::timespec { tv_sec: wait.as_secs() as _, tv_nsec: wait.subsec_nanos() as _ };
    // SAFETY: `set` is a valid signal set; a null siginfo pointer is allowed.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}

/// Why the run ended.
enum Ended {
    Guest(ExitReason),
    Signal(i32),
}

fn main() -> ExitCode {
    let config = Args::parse().into_config();
    let signals = block_termination_signals();
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("termlab-vmm: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = vm.start() {
        eprintln!("termlab-vmm: {e}");
        return ExitCode::from(1);
    }
    let ended = loop {
        if let Some(reason) = vm.wait_exit(Some(Duration::from_millis(1))) {
            break Ended::Guest(reason);
        }
        if let Some(signal) = termination_signal(&signals, Duration::from_millis(100)) {
            break Ended::Signal(signal);
        }
    };
    drop(vm);
    ExitCode::from(match ended {
        Ended::Signal(signal) => {
            eprintln!("\ntermlab-vmm: stopped by signal {signal}");
            // Signal numbers of the blocked set are below 16, so this fits.
            128 + signal as u8
        }
        Ended::Guest(reason) => {
            eprintln!("\ntermlab-vmm: VM ended: {reason:?}");
            match reason {
                ExitReason::Reset | ExitReason::Halted => 0,
                ExitReason::Panic { .. } => 3,
                ExitReason::TripleFault => 4,
                // `Stopped` is recorded only by `Vm::stop`, which this binary calls only after
                // a signal; seeing it here would be a VMM error.
                ExitReason::Stopped | ExitReason::VcpuError { .. } => 1,
            }
        }
    })
}
