//! Boots a kernel interactively with the guest console on this terminal.
//!
//! termlab-vmm --kernel K [--initrd I] [--cmdline "..."] [--vcpus 2] [--mem-mib 512]
//!             [--vsock-uds PATH] [--vsock-cid 3] [--console-log FILE]
//!
//! Exit status: 0 when the guest reset or powered off, 1 on a VMM error, 2 on bad usage,
//! 3 on a guest kernel panic, 4 on a triple fault, 130 when interrupted (Ctrl-C).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use termlab_vmm::{ConsoleConfig, ExitReason, Vm, VmConfig, VsockConfig};

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr";
const USAGE: &str = "usage: termlab-vmm --kernel K [--initrd I] [--cmdline ARGS] [--vcpus N] [--mem-mib M] \
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
            "--mem-mib" => config.mem_mib = value()?.parse().map_err(|e| format!("--mem-mib: {e}"))?,
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

/// Blocks SIGINT/SIGTERM in every thread (threads inherit the mask) so the main thread can
/// collect them synchronously and shut the VM down in order.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn termination_requested(set: &libc::sigset_t, wait: Duration) -> bool {
    let timeout = libc::timespec { tv_sec: wait.as_secs() as _, tv_nsec: wait.subsec_nanos() as _ };
    // SAFETY: `set` is a valid signal set; a null siginfo pointer is allowed.
    unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) > 0 }
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
    let reason = loop {
        if let Some(reason) = vm.wait_exit(Some(Duration::from_millis(1))) {
            break reason;
        }
        if termination_requested(&signals, Duration::from_millis(100)) {
            break ExitReason::Stopped;
        }
    };
    drop(vm);
    eprintln!("\ntermlab-vmm: VM ended: {reason:?}");
    ExitCode::from(match reason {
        ExitReason::Reset | ExitReason::Halted => 0,
        ExitReason::Panic { .. } => 3,
        ExitReason::TripleFault => 4,
        ExitReason::Stopped => 130,
        ExitReason::VcpuError { .. } => 1,
    })
}
