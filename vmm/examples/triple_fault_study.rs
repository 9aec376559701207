//! Why nested guests triple-fault now and then (README, open problems): boots the VMM tests'
//! guest (vmm/tests/guest/init.c) `--runs` times, one VM after the other in this process, each
//! running its vector stress for `--stress-s` seconds (two processes per vCPU yielding to each
//! other: thousands of context switches, CR3 writes and exits a second), with the KVM trace
//! events of the kernel underneath on. For every guest that triple-faults it prints the last
//! events of the vCPU that shut down: the exit before, the entry, and the shutdown with the
//! event that was being delivered (`intr_info`: SVM's exit_int_info, and its error code).
//! Run as root where KVM can run Linux, e.g. inside L1:
//!
//! ```text
//! termlab-nested --nested always -- target/release/examples/triple_fault_study \
//!     --kernel K/bzImage --initrd target/tmp/termlab-vmm-boot/initramfs.cpio
//! ```
//!
//! (the initramfs is built by `cargo test --release -p termlab-vmm --test lifecycle`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use termlab_vmm::{Error, ExitReason, Vm, VmConfig};

const CMDLINE: &str = "console=ttyS0 loglevel=5 reboot=k panic=-1 nokaslr termlab.end=reboot";
const TRACING: &str = "/sys/kernel/tracing";
const EVENTS: [&str; 4] = ["kvm_exit", "kvm_entry", "kvm_inj_virq", "kvm_userspace_exit"];
const TIMEOUT: Duration = Duration::from_secs(180);

/// Boot the vector-stress guest again and again; print the KVM events around each triple fault.
#[derive(clap::Parser)]
struct Args {
    /// The guest kernel (bzImage).
    #[arg(long)]
    kernel: PathBuf,
    /// The VMM tests' initramfs (its init runs the stress).
    #[arg(long)]
    initrd: PathBuf,
    /// Guests to boot, one after the other.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Seconds of stress per guest.
    #[arg(long, default_value_t = 10)]
    stress_s: u32,
    /// Also echo the guest console to this process's stdout, as `termlab-vmm` does (the
    /// console is kept in memory either way; README, open problems: with the echo no guest
    /// triple-faulted in earlier runs).
    #[arg(long)]
    echo: bool,
    /// Pause the VM and read every vCPU's registers this often during the stress, as the
    /// VMM's lifecycle test does (0: never).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Pin vCPU thread N to CPU N (modulo the CPUs), so that no vCPU moves between CPUs.
    #[arg(long)]
    pin: bool,
}

/// Pins this process's vCPU threads (named `vcpuN`) to CPU N modulo the CPUs it may use.
fn pin_vcpu_threads() -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `allowed`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&allowed), &mut allowed) } != 0 {
        return Err(format!("sched_getaffinity: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `allowed` is an initialised cpu_set_t.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .collect();
    let tasks =
        std::fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(index) = comm.trim().strip_prefix("vcpu").and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let tid: libc::pid_t = task.file_name().to_string_lossy().parse().unwrap_or(0);
        // SAFETY: as above, a zeroed cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the CPU number came from CPU_ISSET over the set's own range.
        unsafe { libc::CPU_SET(cpus[index % cpus.len()], &mut set) };
        // SAFETY: the pointer and size describe `set`; tid is one of this process's threads.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } != 0 {
            return Err(format!("sched_setaffinity: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Turns the KVM trace events on (mounting tracefs where needed).
fn start_tracing() -> Result<(), String> {
    let tracing = Path::new(TRACING);
    if !tracing.join("trace").exists() {
        let status = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACING])
            .status()
            .map_err(|e| format!("mount tracefs: {e}"))?;
        if !status.success() {
            return Err(format!("mount tracefs on {TRACING}: {status}"));
        }
    }
    let write = |file: &str, text: &str| {
        std::fs::write(tracing.join(file), text).map_err(|e| format!("{TRACING}/{file}: {e}"))
    };
    write("buffer_size_kb", "4096")?;
    for event in EVENTS {
        write(&format!("events/kvm/{event}/enable"), "1")?;
    }
    write("trace", "")
}

/// How one guest ended, after at most the stress time and the timeout.
fn run_guest(args: &Args) -> Result<String, Error> {
    let cmdline = format!("{CMDLINE} termlab.stress={}", args.stress_s);
    let mut config = VmConfig::new(args.kernel.clone(), Some(args.initrd.clone()), cmdline);
    config.mem_mib = 256;
    config.console.stdout = args.echo;
    let mut vm = Vm::new(config)?;
    vm.start()?;
    if args.pin {
        pin_vcpu_threads().unwrap_or_else(|e| {
            eprintln!("triple_fault_study: {e}");
            std::process::exit(1)
        });
    }
    if args.pause_ms > 0 {
        // Pauses as the lifecycle test does, until the stress is done or the VM ended.
        let deadline = Instant::now() + TIMEOUT;
        while !vm.console().wait_for("STRESS-DONE", Duration::from_millis(args.pause_ms))
            && vm.wait_exit(Some(Duration::ZERO)).is_none()
            && Instant::now() < deadline
        {
            if vm.pause().is_err() {
                break;
            }
            for vcpu in 0..vm.vcpu_count() {
                let _ = vm.regs(vcpu);
            }
            let _ = vm.resume();
        }
    }
    // Polls console and exit in 50 ms slices, as the VMM's lifecycle test does (the study
    // reproduced the fault that way).
    vm.wait_for_console("STRESS-DONE", TIMEOUT);
    let reason = vm.wait_exit(Some(TIMEOUT));
    let console = vm.console().text();
    let done = console.lines().find(|l| l.starts_with("STRESS-DONE")).unwrap_or("no STRESS-DONE");
    Ok(format!("{reason:?}: {}", done.trim_end()))
}

/// The last events of the vCPU whose exit was the shutdown, from the trace buffer.
fn shutdown_events() -> Vec<String> {
    let trace = std::fs::read_to_string(Path::new(TRACING).join("trace")).unwrap_or_default();
    let lines: Vec<&str> = trace.lines().collect();
    let Some(at) = lines.iter().position(|l| l.contains("reason shutdown")) else {
        return vec!["(no shutdown exit in the trace)".into()];
    };
    let vcpu = lines[at].split("kvm_exit: ").nth(1).and_then(|rest| rest.split(" reason").next());
    // `kvm_exit: vcpu 0 reason ...`, `kvm_entry: vcpu 0, rip ...`
    let mine = |l: &&&str| {
        vcpu.is_some_and(|v| [" ", ","].iter().any(|end| l.contains(&format!("{v}{end}"))))
    };
    let mut events: Vec<String> =
        lines[..=at].iter().rev().filter(mine).take(4).map(|l| l.trim().to_owned()).collect();
    events.reverse();
    events
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    if let Err(e) = start_tracing() {
        eprintln!("triple_fault_study: {e} (run as root where KVM runs Linux)");
        std::process::exit(1);
    }
    let mut triple_faults = 0;
    for run in 1..=args.runs {
        let _ = std::fs::write(Path::new(TRACING).join("trace"), "");
        let started = Instant::now();
        let outcome = run_guest(&args).unwrap_or_else(|e| format!("error: {e}"));
        println!("run {run}: {outcome} ({:.1} s)", started.elapsed().as_secs_f64());
        if outcome.starts_with(&format!("{:?}", Some(ExitReason::TripleFault))) {
            triple_faults += 1;
            for event in shutdown_events() {
                println!("    {event}");
            }
        }
    }
    println!("triple_fault_study: {triple_faults} of {} guests triple-faulted", args.runs);
}
