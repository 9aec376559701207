//! The VM lifecycle around a real guest (the kernel and init of tests/boot.rs): a guest triple
//! fault ends the VM as `TripleFault`; a paused guest shows every vCPU in kernel text, lets the
//! host read its memory and set registers, and goes on after resume; guest vector registers
//! survive context switches on every vCPU while the host keeps pausing the VM; the
//! `termlab-vmm` binary stops promptly on SIGINT and SIGTERM and leaves nothing behind.
//!
//! Like tests/boot.rs, each test re-runs itself inside an L1 VM where /dev/kvm cannot run Linux.

mod common;

use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    echo_through_guest, ended_before, hybrid_connect, init_line, init_logging, init_output, kernel,
    kernel_symbol, run_where_kvm_works, test_initramfs, wait_for, Scratch, BASE_CMDLINE,
    STEP_TIMEOUT,
};
use termlab_vmm::{kvm_regs, Error, ExitReason, Vm, VmConfig, VsockConfig};

/// The test init listens here; the host reaches it with `CONNECT 6000`.
const GUEST_PORT: u32 = 6000;
const MEM_MIB: u32 = 256;

fn vm_config(cmdline: &str, uds: Option<&Path>) -> VmConfig {
    let mut config = VmConfig::new(kernel(), Some(test_initramfs()), cmdline.to_owned());
    config.mem_mib = MEM_MIB;
    config.vsock = uds.map(|uds| VsockConfig { guest_cid: 3, uds_path: uds.to_owned() });
    config
}

#[test]
fn guest_triple_fault_ends_the_vm_as_triple_fault() {
    let name = "guest_triple_fault_ends_the_vm_as_triple_fault";
    init_logging();
    test_initramfs();
    if !run_where_kvm_works(name) {
        return;
    }
    // `reboot=t` makes the guest kernel restart by triple fault: it loads an empty IDT and
    // executes int3, so the #BP, the #GP for the missing gate and the #DF all fail to deliver.
    let cmdline = BASE_CMDLINE.replace("reboot=k", "reboot=t") + " termlab.end=reboot";
    let mut vm = Vm::new(vm_config(&cmdline, None)).expect("create VM");
    vm.start().expect("start VM");
    let reason = vm.wait_exit(Some(STEP_TIMEOUT));
    let console = vm.console().text();
    assert_eq!(reason, Some(ExitReason::TripleFault), "console:\n{console}");
    if !console.contains("TERMLAB-INIT-RAN") {
        // The triple fault this test causes comes after init ran. One before it, its console
        // ending in the middle of the boot, is the nested guests' spontaneous kind (README,
        // open problems): under nesting the emulated host's failure, tried again; on real KVM
        // a failure of the test.
        termlab_nested::fail_guest_test(
            true,
            &format!("the guest triple-faulted before its init ran; console:\n{console}"),
        );
    }
    assert!(console.contains("reboot: Restarting system"), "console:\n{console}");
    assert_eq!(vm.stop(), ExitReason::TripleFault);
}

#[test]
fn paused_guest_shows_registers_and_memory_and_runs_on_after_resume() {
    let name = "paused_guest_shows_registers_and_memory_and_runs_on_after_resume";
    init_logging();
    let kernel_text = kernel_symbol("_stext")..kernel_symbol("_etext");
    let linux_banner = kernel_symbol("linux_banner");
    test_initramfs();
    if !run_where_kvm_works(name) {
        return;
    }
    let scratch = Scratch::new("pause");
    let uds = scratch.0.join("vsock.sock");
    let cmdline = format!("{BASE_CMDLINE} termlab.listen_port={GUEST_PORT} termlab.end=reboot");
    let mut vm = Vm::new(vm_config(&cmdline, Some(&uds))).expect("create VM");
    vm.start().expect("start VM");
    // From here on init blocks in accept() and both vCPUs idle in the kernel.
    wait_for(&vm, &format!("VSOCK-LISTENING={GUEST_PORT}"));
    assert!(
        matches!(vm.regs(0), Err(Error::NotPaused)),
        "registers must not be read while the guest runs"
    );

    let regs = pause_with_every_vcpu_in_kernel(&vm, &kernel_text);
    assert_eq!(regs.len(), 2);
    for (vcpu, r) in regs.iter().enumerate() {
        eprintln!("paused vCPU {vcpu}: rip {:#x} rsp {:#x}", r.rip, r.rsp);
        assert!(
            kernel_text.contains(&r.rip),
            "vCPU {vcpu} rip {:#x} is outside kernel text {kernel_text:x?}",
            r.rip
        );
    }

    // Guest memory where the guest sees it: KVM_TRANSLATE walks vCPU 0's page tables from
    // linux_banner's virtual address.
    let translation = vm.with_vcpu(0, |fd| fd.translate_gva(linux_banner)).expect("paused vCPU 0");
    let translation = translation.expect("KVM_TRANSLATE");
    assert_eq!(translation.valid, 1, "linux_banner {linux_banner:#x} is not mapped");
    let banner_gpa = translation.physical_address;
    let mut banner = [0u8; 14];
    vm.read_memory(banner_gpa, &mut banner).expect("read linux_banner");
    assert_eq!(&banner, b"Linux version ", "linux_banner at {linux_banner:#x} -> {banner_gpa:#x}");
    let beyond_ram = u64::from(MEM_MIB) << 20;
    assert!(
        matches!(vm.read_memory(beyond_ram, &mut banner), Err(Error::GuestMemory { .. })),
        "reading past the end of guest RAM must fail"
    );

    for (vcpu, original) in regs.iter().enumerate() {
        let changed =
            kvm_regs { rax: !original.rax, r12: original.r12 ^ 0x5a5a_5a5a_5a5a_5a5a, ..*original };
        vm.set_regs(vcpu, &changed).expect("set registers");
        assert_eq!(vm.regs(vcpu).expect("read registers back"), changed, "vCPU {vcpu}");
        vm.set_regs(vcpu, original).expect("restore registers");
        assert_eq!(vm.regs(vcpu).expect("read registers back"), *original, "vCPU {vcpu}");
    }

    // A host connection made now reaches the VMM but gets no answer: the guest is not running.
    let stream = hybrid_connect(&uds, GUEST_PORT);
    stream.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    match (&stream).read(&mut [0u8; 1]) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the paused guest answered a connection: {other:?}"),
    }
    vm.resume().expect("resume");
    echo_through_guest(stream, &vm, 4096);
    wait_for(&vm, "VSOCK-ECHOED=4096");
    assert_eq!(
        vm.wait_exit(Some(STEP_TIMEOUT)),
        Some(ExitReason::Reset),
        "console:\n{}",
        vm.console().text()
    );
    // An ended VM says so, rather than claiming to be paused or running.
    assert!(matches!(vm.pause(), Err(Error::Ended)), "pause after the guest reset");
    assert!(matches!(vm.regs(0), Err(Error::Ended)), "registers after the guest reset");
    vm.stop();
    assert!(!uds.exists(), "the VMM must remove its vsock socket on exit");
}

/// Pauses the VM with every vCPU in kernel mode (CPL 0) and returns their registers. After
/// the listening marker init may still be in user space for an instant; then resume and retry.
fn pause_with_every_vcpu_in_kernel(vm: &Vm, kernel_text: &Range<u64>) -> Vec<kvm_regs> {
    for _ in 0..50 {
        vm.pause().expect("pause");
        let in_kernel =
            (0..vm.vcpu_count()).all(|i| vm.sregs(i).expect("read sregs").cs.selector & 3 == 0);
        if in_kernel {
            return (0..vm.vcpu_count()).map(|i| vm.regs(i).expect("read registers")).collect();
        }
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no pause found every vCPU in the kernel (text {kernel_text:x?})");
}

#[test]
fn vector_registers_survive_context_switches_and_host_pauses() {
    let name = "vector_registers_survive_context_switches_and_host_pauses";
    init_logging();
    test_initramfs();
    if !run_where_kvm_works(name) {
        return;
    }
    // init's stress workers yield to each other in a syscall loop on both vCPUs, so the
    // guest saves and restores their vector registers (XSAVE when XCR0 is right) all the
    // time, while the host keeps pausing the VM and reading every vCPU.
    let cmdline = format!("{BASE_CMDLINE} termlab.stress=15 termlab.end=reboot");
    let mut vm = Vm::new(vm_config(&cmdline, None)).expect("create VM");
    vm.start().expect("start VM");
    wait_for(&vm, "STRESS-VECTORS=");
    let mut pauses = 0;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !vm.console().wait_for("STRESS-DONE", Duration::from_millis(50)) {
        // How the VM ended, if it did (`Some(TripleFault)`, `Some(Reset)`, ...): the console
        // alone does not tell.
        if let Some(reason) = vm.wait_exit(Some(Duration::ZERO)) {
            if init_output(&vm.console().text()).contains("STRESS-DONE") {
                break;
            }
            ended_before(&vm, reason, "STRESS-DONE");
        }
        assert!(
            Instant::now() < deadline,
            "no STRESS-DONE within {STEP_TIMEOUT:?}; console:\n{}",
            vm.console().text()
        );
        // The guest resets right after printing STRESS-DONE, maybe after the wait above.
        match vm.pause() {
            Err(Error::Ended) => break,
            paused => paused.expect("pause"),
        }
        for vcpu in 0..vm.vcpu_count() {
            vm.regs(vcpu).expect("read registers");
        }
        vm.resume().expect("resume");
        pauses += 1;
    }
    assert_eq!(
        vm.wait_exit(Some(STEP_TIMEOUT)),
        Some(ExitReason::Reset),
        "console:\n{}",
        vm.console().text()
    );
    let console = vm.console().text();
    let done = init_line(&console, "STRESS-DONE");
    eprintln!("{done} with {pauses} host pauses");
    assert!(done.contains(" failed=0 ") && !done.ends_with(" rounds=0"), "console:\n{console}");
    // Where the CPU has AVX, the guest must have been able to enable it: it cannot without
    // XSAVE, which Linux turns off when CPUID leaf 0xd disagrees with XCR0.
    if std::arch::is_x86_feature_detected!("avx") {
        assert!(console.contains("STRESS-VECTORS=avx"), "console:\n{console}");
    }
    for problem in ["WARNING:", "BUG:", "Oops", "double fault", "TERMLAB-ERROR"] {
        assert!(!console.contains(problem), "the guest logged {problem:?}; console:\n{console}");
    }
}

#[test]
fn termlab_vmm_binary_stops_cleanly_on_sigint_and_sigterm() {
    let name = "termlab_vmm_binary_stops_cleanly_on_sigint_and_sigterm";
    init_logging();
    test_initramfs();
    if !run_where_kvm_works(name) {
        return;
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        stop_binary_with(signal);
    }
}

/// Boots the guest with the binary, waits until init listens on vsock, sends `signal` and
/// checks the exit status, the time it took, and that only the console log is left.
fn stop_binary_with(signal: i32) {
    let scratch = Scratch::new(&format!("signal-{signal}"));
    let uds = scratch.0.join("vsock.sock");
    let console = scratch.0.join("console.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_termlab-vmm"))
        .arg("--kernel")
        .arg(kernel())
        .arg("--initrd")
        .arg(test_initramfs())
        .args([
            "--cmdline",
            &format!("{BASE_CMDLINE} termlab.listen_port={GUEST_PORT} termlab.end=reboot"),
        ])
        .args(["--mem-mib", &MEM_MIB.to_string()])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--console-log")
        .arg(&console)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start termlab-vmm");
    let pid = child.id();
    wait_for_file_text(&mut child, &console, &format!("VSOCK-LISTENING={GUEST_PORT}"));
    assert!(uds.exists(), "the running VMM serves vsock at {}", uds.display());

    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0, "kill {pid}");
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for termlab-vmm") {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "termlab-vmm ignored signal {signal} for 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("signal {signal}: termlab-vmm exited after {:?} with {status}", sent.elapsed());
    let mut stderr = String::new();
    child.stderr.take().expect("stderr pipe").read_to_string(&mut stderr).expect("read stderr");
    assert_eq!(status.code(), Some(128 + signal), "stderr:\n{stderr}");
    assert!(stderr.contains(&format!("stopped by signal {signal}")), "stderr:\n{stderr}");

    assert!(!uds.exists(), "the vsock socket {} was left behind", uds.display());
    let left: Vec<_> = std::fs::read_dir(&scratch.0)
        .expect("list scratch dir")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    assert_eq!(
        left,
        [console.file_name().expect("console file name")],
        "files left in {}",
        scratch.0.display()
    );
    // The process is reaped, so its threads are gone; nothing it might have started still runs
    // with our scratch dir on its command line.
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still exists");
    let scratch_arg = scratch.0.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").expect("list /proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmdline).contains(&scratch_arg),
                "process {:?} still runs with {scratch_arg}",
                entry.file_name()
            );
        }
    }
}

/// termlab-vmm's exit status when its guest triple-faulted (vmm/README.md).
const BINARY_EXIT_TRIPLE_FAULT: i32 = 4;

/// Waits until `path` contains `marker`, failing early if the child exits: a guest triple
/// fault through `fail_guest_test`, as every other test of a booted guest here does.
fn wait_for_file_text(child: &mut Child, path: &Path, marker: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        if let Some(status) = child.try_wait().expect("poll termlab-vmm") {
            termlab_nested::fail_guest_test(
                status.code() == Some(BINARY_EXIT_TRIPLE_FAULT),
                &format!("termlab-vmm exited ({status}) before {marker:?}; console:\n{text}"),
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} in {} within {STEP_TIMEOUT:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kernel_records_inside_an_init_line_are_taken_out() {
    let console = "STRESS-DONE work[   16.310235] clocksource: Long readout interval\r\n\
                   ers=4 failed=0 rounds=9\r\n[    0.935054] Unstable clock\r\nA [x] b\r\n[   17.1";
    assert_eq!(
        init_output(console),
        "STRESS-DONE workers=4 failed=0 rounds=9\r\nA [x] b\r\n[   17.1"
    );
    assert_eq!(init_output("[   17.100000] still arriving"), "");
}
