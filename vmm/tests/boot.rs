//! Boots the real guest kernel with the test init (tests/guest/init.c) and checks what the
//! issue asks for: init runs and prints on serial, both vCPUs come online, bytes round-trip
//! over vsock in both directions (including more than one credit window), the boot logs no
//! kernel warning, a guest reboot ends the VM as `Reset`, and a kernel panic is reported as
//! `Panic`. The first boot loads the uncompressed vmlinux ELF, the second the bzImage.
//!
//! Where /dev/kvm cannot run Linux (kvm-pvm), the test re-runs itself inside an L1 VM via
//! termlab-nested and passes or fails with the inner run. The kernel comes from
//! $TERMLAB_KERNEL_DIR (see `common::kernel_dir`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::{
    echo_through_guest, hybrid_connect, init_line, init_logging, kernel_bzimage, kernel_vmlinux,
    run_where_kvm_works, test_initramfs, wait_for, Scratch, BASE_CMDLINE, STEP_TIMEOUT,
};
use termlab_vmm::{ExitReason, Vm, VmConfig, VsockConfig};

/// Guest connects to this host port (served on `<uds>_5000`).
const HOST_PORT: u32 = 5000;
/// Guest listens on this port; the host reaches it with `CONNECT 6000`.
const GUEST_PORT: u32 = 6000;
/// More than the 256 KiB credit window each side grants, so credit updates must flow.
const ECHO_BYTES: usize = 300 * 1024;

/// Serves one guest-initiated connection on `<uds>_HOST_PORT`: reads a line, answers.
fn serve_guest_connection(listener: UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking listener");
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return format!("no guest connection: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking stream");
        stream.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");
        let mut line = String::new();
        if let Err(e) = BufReader::new(&stream).read_line(&mut line) {
            return format!("read failed: {e}");
        }
        (&stream).write_all(b"pong-from-host\n").expect("answer guest");
        line
    })
}

#[test]
fn guest_boots_smp_talks_vsock_and_ends_with_reset_or_panic() {
    let name = "guest_boots_smp_talks_vsock_and_ends_with_reset_or_panic";
    init_logging();
    let (vmlinux, bzimage) = (kernel_vmlinux(), kernel_bzimage());
    assert!(vmlinux.is_file(), "{} not found (guest-kernel/build leaves it)", vmlinux.display());
    let initramfs = test_initramfs();
    if !run_where_kvm_works(name) {
        return;
    }
    let scratch = Scratch::new("boot");
    let uds = scratch.0.join("vsock.sock");
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display()))
        .expect("bind host port socket");
    let guest_conn = serve_guest_connection(host_listener);

    let mut config = VmConfig::new(
        vmlinux,
        Some(initramfs.clone()),
        format!("{BASE_CMDLINE} termlab.host_port={HOST_PORT} termlab.listen_port={GUEST_PORT} termlab.end=reboot"),
    );
    config.mem_mib = 256;
    config.vsock = Some(VsockConfig { guest_cid: 3, uds_path: uds.clone() });
    let started = Instant::now();
    let mut vm = Vm::new(config).expect("create VM");
    vm.start().expect("start VM");
    wait_for(&vm, "TERMLAB-INIT-RAN");
    eprintln!("init ran after {:?}", started.elapsed());
    // The CPU line is complete once the next marker (printed after it) has arrived.
    wait_for(&vm, &format!("VSOCK-LISTENING={GUEST_PORT}"));
    let cpus_line = init_line(&vm.console().text(), "CPUS-ONLINE=");
    assert_eq!(cpus_line, "CPUS-ONLINE=2", "console:\n{}", vm.console().text());
    echo_through_guest(hybrid_connect(&uds, GUEST_PORT), &vm, ECHO_BYTES);
    wait_for(&vm, &format!("VSOCK-ECHOED={ECHO_BYTES}"));
    assert_eq!(guest_conn.join().expect("host server thread"), "ping-from-guest\n");
    wait_for(&vm, "GUEST-GOT=pong-from-host");
    let reason = vm.wait_exit(Some(STEP_TIMEOUT));
    assert_eq!(reason, Some(ExitReason::Reset), "console:\n{}", vm.console().text());
    let console = vm.console().text();
    assert!(!console.contains("TERMLAB-ERROR"), "console:\n{console}");
    // Regressions of the vCPU setup show up as guest warnings: a WARN (e.g. the XSAVE size
    // check against CPUID leaf 0xd) or a local APIC timer the guest refuses to use.
    for problem in ["WARNING:", "APIC timer disabled", "lapic is not functional"] {
        assert!(!console.contains(problem), "the guest logged {problem:?}; console:\n{console}");
    }
    assert_eq!(vm.stop(), ExitReason::Reset);
    assert!(!uds.exists(), "the VMM must remove its vsock socket on exit");

    let mut config =
        VmConfig::new(bzimage, Some(initramfs), format!("{BASE_CMDLINE} termlab.end=panic"));
    config.mem_mib = 256;
    let mut vm = Vm::new(config).expect("create VM");
    vm.start().expect("start VM");
    match vm.wait_exit(Some(STEP_TIMEOUT)) {
        Some(ExitReason::Panic { console_tail }) => {
            assert!(console_tail.contains("Kernel panic"), "tail:\n{console_tail}");
            assert!(console_tail.contains("Attempted to kill init"), "tail:\n{console_tail}");
        }
        other => panic!("expected a panic exit, got {other:?}; console:\n{}", vm.console().text()),
    }
}
