//! Boots a kernel interactively with the guest console on this terminal.
//!
//! termlab-vmm --kernel K [--initrd I] [--cmdline "..."] [--vcpus 2] [--mem-mib 512]
//!             [--vsock-uds PATH] [--vsock-cid 3] [--console-log FILE]
//!
//! Exit status: 0 when the guest reset or powered off, 1 on a VMM error, 2 on bad usage,
//! 3 on a guest kernel panic, 4 on a triple fault, 128+N when stopped by signal N (SIGHUP,
//! SIGINT = Ctrl-C, SIGTERM: 129, 130, 143), after the VM is torn down (vsock socket removed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use termlab_vmm::{ConsoleConfig, ExitReason, Vm, VmConfig, VsockConfig};

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr";
const USAGE: &str =
    "usage: termlab-vmm --kernel K [--initrd I] [--cmdline ARGS] [--vcpus N] [--mem-mib M] \
[--vsock-uds PATH] [--vsock-cid CID] [--console-log FILE]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<VmConfig, String> {
    let mut kernel = None;
    let mut config = VmConfig::new(PathBuf::new(), None, DEFAULT_CMDLINE.to_owned());
    config.console = ConsoleConfig { file: None, stdout: true, stdin: true };
    let mut uds = None;
    let mut cid = 3u64;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => config.initrd = Some(PathBuf::from(value()?)),
            "--cmdline" => config.cmdline = value()?,
            "--vcpus" => config.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--mem-mib" => {
                config.mem_mib = value()?.parse().map_err(|e| format!("--mem-mib: {e}"))?
            }
            "--vsock-uds" => uds = Some(PathBuf::from(value()?)),
            "--vsock-cid" => cid = value()?.parse().map_err(|e| format!("--vsock-cid: {e}"))?,
            "--console-log" => config.console.file = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    config.kernel = kernel.ok_or_else(|| format!("--kernel is required\n{USAGE}"))?;
    config.vsock = uds.map(|uds_path| VsockConfig { guest_cid: cid, uds_path });
    Ok(config)
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
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
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
