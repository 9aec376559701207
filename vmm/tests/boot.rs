//! Boots the real guest kernel with the test init (tests/guest/init.c) and checks what the
//! issue asks for: init runs and prints on serial, both vCPUs come online, bytes round-trip
//! over vsock in both directions (including more than one credit window), a guest reboot ends
//! the VM as `Reset`, and a kernel panic is reported as `Panic`.
//!
//! Where /dev/kvm cannot run Linux (kvm-pvm), the test re-runs itself inside an L1 VM via
//! termlab-nested and passes or fails with the inner run. The kernel comes from
//! $TERMLAB_KERNEL (default: the unpatched build in /work/kbuild/base).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use termlab_nested::cpio::CpioWriter;
use termlab_nested::{ensure_real_kvm_or_reexec_with, KvmPlan, L1Options, NestedMode};
use termlab_vmm::{ExitReason, Vm, VmConfig, VsockConfig};

const DEFAULT_KERNEL: &str = "/work/kbuild/base/arch/x86/boot/bzImage";
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr";
/// Guest connects to this host port (served on `<uds>_5000`).
const HOST_PORT: u32 = 5000;
/// Guest listens on this port; the host reaches it with `CONNECT 6000`.
const GUEST_PORT: u32 = 6000;
/// More than the 256 KiB credit window each side grants, so credit updates must flow.
const ECHO_BYTES: usize = 300 * 1024;
/// Everything runs in software emulation inside L1 here; be generous.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

fn kernel() -> PathBuf {
    let path = std::env::var_os("TERMLAB_KERNEL").map_or_else(|| PathBuf::from(DEFAULT_KERNEL), PathBuf::from);
    assert!(
        path.is_file(),
        "guest kernel {} not found: build it (make -C guest-kernel, see guest-kernel/README.md) or point \
         TERMLAB_KERNEL at a bzImage built from guest-kernel/config/guest.config",
        path.display()
    );
    path
}

/// A directory removed when the test ends, however it ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("termlab-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test initramfs, built on the host before any re-execution (compiling inside the
/// emulated L1 VM would be slow) in cargo's per-target scratch dir, which L1 sees over 9p.
fn test_initramfs() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("termlab-vmm-boot");
    if termlab_nested::is_nested() {
        return dir.join("initramfs.cpio");
    }
    std::fs::create_dir_all(&dir).expect("create initramfs dir");
    build_initramfs(&dir)
}

/// Compiles the test init statically and packs it with /dev/console into a newc initramfs.
fn build_initramfs(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/init.c");
    let init = dir.join("init");
    let status = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&init)
        .arg(&source)
        .status()
        .expect("run cc (apt-get install build-essential)");
    assert!(status.success(), "compiling {} failed", source.display());
    let mut cpio = CpioWriter::new(Vec::new());
    for d in ["/dev", "/proc", "/sys"] {
        cpio.dir(d).expect("cpio dir");
    }
    cpio.char_device("/dev/console", 5, 1).expect("cpio dev");
    cpio.file("/init", 0o755, &std::fs::read(&init).expect("read init")).expect("cpio init");
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, cpio.finish().expect("cpio finish")).expect("write initramfs");
    path
}

/// Prints the VMM's log records to stderr when TERMLAB_VMM_LOG=trace|debug (for diagnosing
/// failures inside L1, where no debugger is at hand).
struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.0
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("[{} {:?}] {}", record.level(), std::time::SystemTime::now(), record.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("TERMLAB_VMM_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(Box::leak(Box::new(StderrLogger(level)))).is_ok() {
        log::set_max_level(level);
    }
}

fn run_where_kvm_works(test_name: &str) -> bool {
    let argv: Vec<OsString> = vec![
        std::env::current_exe().expect("test binary path").into(),
        test_name.into(),
        "--exact".into(),
        "--nocapture".into(),
    ];
    let options = L1Options { mem_mib: 2048, timeout: Duration::from_secs(900), ..L1Options::default() };
    match ensure_real_kvm_or_reexec_with(NestedMode::Auto, &argv, &options).expect("nested launcher") {
        KvmPlan::RunHere { nested } => {
            eprintln!("running with real KVM (nested: {nested})");
            true
        }
        KvmPlan::RanInL1 { exit_code } => {
            assert_eq!(exit_code, 0, "{test_name} failed inside the L1 VM (its output is above)");
            false
        }
    }
}

fn wait_for(vm: &Vm, marker: &str) {
    assert!(
        vm.console().wait_for(marker, STEP_TIMEOUT),
        "no {marker:?} on the console within {STEP_TIMEOUT:?}; console:\n{}",
        vm.console().text()
    );
}

/// Serves one guest-initiated connection on `<uds>_HOST_PORT`: reads a line, answers.
fn serve_guest_connection(listener: UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking listener");
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
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

/// Connects to the guest's listener through the hybrid-vsock handshake and echoes a
/// pattern larger than one credit window through it.
fn echo_through_guest(uds: &Path, vm: &Vm) {
    let stream = UnixStream::connect(uds).expect("connect to the VMM's vsock socket");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    (&stream).write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes()).expect("send CONNECT");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut ok = String::new();
    reader.read_line(&mut ok).expect("read OK line");
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "handshake answer {ok:?}");
    let pattern: Vec<u8> = (0..ECHO_BYTES).map(|i| (i % 251) as u8).collect();
    let writer = {
        let (stream, pattern) = (stream.try_clone().expect("clone"), pattern.clone());
        std::thread::spawn(move || {
            (&stream).write_all(&pattern).expect("send pattern");
            stream.shutdown(std::net::Shutdown::Write).expect("half-close");
        })
    };
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).expect("read echo");
    writer.join().expect("writer thread");
    assert_eq!(echoed.len(), pattern.len(), "echoed byte count; console:\n{}", vm.console().text());
    assert!(echoed == pattern, "echoed bytes differ from what was sent");
}

#[test]
fn guest_boots_smp_talks_vsock_and_ends_with_reset_or_panic() {
    let name = "guest_boots_smp_talks_vsock_and_ends_with_reset_or_panic";
    init_logging();
    let kernel = kernel();
    let initramfs = test_initramfs();
    if !run_where_kvm_works(name) {
        return;
    }
    let scratch = Scratch::new("boot");
    let uds = scratch.0.join("vsock.sock");
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).expect("bind host port socket");
    let guest_conn = serve_guest_connection(host_listener);

    let mut config = VmConfig::new(
        kernel.clone(),
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
    // The guest tty turns "\n" into "\r\n"; compare whole lines.
    let cpus_line = vm.console().text().lines().find(|l| l.starts_with("CPUS-ONLINE=")).map(|l| l.trim_end().to_owned());
    assert_eq!(cpus_line.as_deref(), Some("CPUS-ONLINE=2"), "console:\n{}", vm.console().text());
    echo_through_guest(&uds, &vm);
    wait_for(&vm, &format!("VSOCK-ECHOED={ECHO_BYTES}"));
    assert_eq!(guest_conn.join().expect("host server thread"), "ping-from-guest\n");
    wait_for(&vm, "GUEST-GOT=pong-from-host");
    let reason = vm.wait_exit(Some(STEP_TIMEOUT));
    assert_eq!(reason, Some(ExitReason::Reset), "console:\n{}", vm.console().text());
    assert!(!vm.console().text().contains("TERMLAB-ERROR"), "console:\n{}", vm.console().text());
    assert_eq!(vm.stop(), ExitReason::Reset);
    assert!(!uds.exists(), "the VMM must remove its vsock socket on exit");

    let mut config = VmConfig::new(kernel, Some(initramfs), format!("{BASE_CMDLINE} termlab.end=panic"));
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
