//! What the integration tests that boot the real guest share: the guest kernel, the test
//! initramfs (tests/guest/init.c as /init), re-running a test where KVM can run Linux, scratch
//! directories, VMM logging, console waits and the hybrid-vsock echo.
//!
//! Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use termlab_nested::cpio::CpioWriter;
use termlab_nested::L1Options;
use termlab_vmm::{ConsoleWait, ExitReason, Vm};

/// loglevel=5: the boot's informational lines would cost seconds of nested I/O exits (see
/// termlab's engine/guest.rs); the tests look for their init's markers and for panics.
pub const BASE_CMDLINE: &str = "console=ttyS0 loglevel=5 reboot=k panic=-1 nokaslr";
/// Everything runs in software emulation inside L1 here; be generous.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest kernel build: $TERMLAB_KERNEL_DIR (scripts/test sets it to the output of
/// `guest-kernel/build --print-dir`), else the last default kernel built into the cache.
pub fn kernel_dir() -> PathBuf {
    let dir = match std::env::var_os("TERMLAB_KERNEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("TERMLAB_CACHE")
                .map_or_else(|| "/var/cache/termlab".into(), PathBuf::from);
            cache.join("kernel/default-current")
        }
    };
    assert!(
        dir.join("bzImage").is_file(),
        "guest kernel {}/bzImage not found: build it (guest-kernel/build) or point TERMLAB_KERNEL_DIR at \
         a directory with bzImage and System.map",
        dir.display()
    );
    dir
}

/// The kernel the tests boot: the uncompressed vmlinux beside the bzImage (as termlab boots
/// it; guest-kernel/build leaves it there), else the bzImage.
pub fn kernel() -> PathBuf {
    let vmlinux = kernel_vmlinux();
    if vmlinux.is_file() {
        vmlinux
    } else {
        kernel_bzimage()
    }
}

pub fn kernel_bzimage() -> PathBuf {
    kernel_dir().join("bzImage")
}

pub fn kernel_vmlinux() -> PathBuf {
    kernel_dir().join("vmlinux")
}

/// Address of a symbol in the guest kernel's System.map (the tests boot with `nokaslr`).
pub fn kernel_symbol(name: &str) -> u64 {
    let path = kernel_dir().join("System.map");
    let map =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    map.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (addr, _kind, symbol) = (fields.next()?, fields.next()?, fields.next()?);
            (symbol == name).then(|| u64::from_str_radix(addr, 16).ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
}

/// A directory removed when the test ends, however it ends.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
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
/// Built once per test process: its tests run in parallel and share it.
pub fn test_initramfs() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("termlab-vmm-boot");
            if termlab_nested::is_nested() {
                return dir.join("initramfs.cpio");
            }
            std::fs::create_dir_all(&dir).expect("create initramfs dir");
            build_initramfs(&dir)
        })
        .clone()
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
    // Written aside and renamed, so a guest of another test binary never reads half a file.
    let path = dir.join("initramfs.cpio");
    let partial = dir.join(format!("initramfs.cpio.{}", std::process::id()));
    std::fs::write(&partial, cpio.finish().expect("cpio finish")).expect("write initramfs");
    std::fs::rename(&partial, &path).expect("rename initramfs");
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

pub fn init_logging() {
    let level = match std::env::var("TERMLAB_VMM_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(Box::leak(Box::new(StderrLogger(level)))).is_ok() {
        log::set_max_level(level);
    }
}

/// True when this process should run the test body (otherwise it ran, and passed, inside an
/// L1 VM: [`termlab_nested::run_test_where_kvm_works`]).
pub fn run_where_kvm_works(test_name: &str) -> bool {
    let options =
        L1Options { mem_mib: 2048, timeout: Duration::from_secs(900), ..L1Options::default() };
    termlab_nested::run_test_where_kvm_works(test_name, &options)
}

/// Waits up to [`STEP_TIMEOUT`] for `marker` on the console; panics at once, naming how, when
/// the VM ends first (`Some(TripleFault)`, ...: the console alone does not tell, and a nested
/// guest's triple fault is what scripts/test tries a suite again for).
pub fn wait_for(vm: &Vm, marker: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        // A kernel record can split the marker on the console; look again without them.
        match vm.wait_for_console(marker, Duration::from_secs(1)) {
            ConsoleWait::Found => return,
            _ if init_output(&vm.console().text()).contains(marker) => return,
            ConsoleWait::Ended(reason) => ended_before(vm, reason, marker),
            ConsoleWait::TimedOut if Instant::now() < deadline => {}
            ConsoleWait::TimedOut => panic!(
                "no {marker:?} on the console within {STEP_TIMEOUT:?}; where the guest is: {}; \
                 console:\n{}",
                where_the_vcpus_are(vm),
                vm.console().text()
            ),
        }
    }
}

/// What the test's init wrote to the console, with the kernel's records taken out. printk
/// writes each record ("[   16.310235] text" through its newline) whole, but it can land in
/// the middle of a line init is writing through the tty: CI once saw
/// "STRESS-DONE work[   16.310235] clocksource: Long readout interval, ...\ners=4 failed=0".
pub fn init_output(console: &str) -> String {
    let mut out = String::with_capacity(console.len());
    let mut rest = console;
    while let Some(open) = rest.find('[') {
        let (before, from) = rest.split_at(open);
        out.push_str(before);
        let skip = kernel_record_len(from).unwrap_or_else(|| {
            out.push('[');
            1
        });
        rest = &from[skip..];
    }
    out.push_str(rest);
    out
}

/// The first line of init's output (see [`init_output`]) that starts with `prefix`, without
/// the "\r" the guest tty adds; empty when there is none.
pub fn init_line(console: &str, prefix: &str) -> String {
    init_output(console)
        .lines()
        .find(|line| line.starts_with(prefix))
        .map(|line| line.trim_end().to_owned())
        .unwrap_or_default()
}

/// The length of the kernel record that `text` starts with ("[ seconds.micros] ..." through
/// its newline, or to the end while it is still arriving), if it starts with one.
fn kernel_record_len(text: &str) -> Option<usize> {
    let close = text.find("] ")?;
    let (seconds, micros) = text[1..close].trim_start().split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(seconds) && micros.len() == 6 && digits(micros))
        .then(|| text.find('\n').map_or(text.len(), |newline| newline + 1))
}

/// The VM ended (`reason`) before `marker` appeared: the test fails naming how (a nested
/// guest's triple fault: [`termlab_nested::fail_guest_test`]).
pub fn ended_before(vm: &Vm, reason: ExitReason, marker: &str) -> ! {
    termlab_nested::fail_guest_test(
        reason == ExitReason::TripleFault,
        &format!(
            "the VM ended before {marker:?} appeared: {reason:?}; console:\n{}",
            vm.console().text()
        ),
    )
}

/// Each vCPU's instruction pointer, with the kernel symbol it falls in, read while the VM is
/// paused (then resumed): what a guest that stopped making progress is doing.
pub fn where_the_vcpus_are(vm: &Vm) -> String {
    if let Err(e) = vm.pause() {
        return format!("cannot pause the VM ({e})");
    }
    let places: Vec<String> = (0..vm.vcpu_count())
        .map(|vcpu| match vm.regs(vcpu) {
            Ok(regs) => format!("vCPU {vcpu} at {:#x} ({})", regs.rip, symbolize(regs.rip)),
            Err(e) => format!("vCPU {vcpu}: {e}"),
        })
        .collect();
    let _ = vm.resume();
    places.join(", ")
}

/// `symbol+offset` for a kernel address, from the guest kernel's System.map.
fn symbolize(address: u64) -> String {
    let map = std::fs::read_to_string(kernel_dir().join("System.map")).unwrap_or_default();
    map.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let start = u64::from_str_radix(fields.next()?, 16).ok()?;
            let symbol = fields.nth(1)?;
            (start <= address).then_some((start, symbol))
        })
        .max_by_key(|(start, _)| *start)
        .map_or_else(
            || "no symbol".into(),
            |(start, name)| format!("{name}+{:#x}", address - start),
        )
}

/// Opens a hybrid-vsock connection to the guest's listener on `guest_port`: connects to the
/// VMM's socket and sends `CONNECT`. The VMM answers `OK <port>` once the guest accepted.
pub fn hybrid_connect(uds: &Path, guest_port: u32) -> UnixStream {
    let stream = UnixStream::connect(uds).expect("connect to the VMM's vsock socket");
    (&stream).write_all(format!("CONNECT {guest_port}\n").as_bytes()).expect("send CONNECT");
    stream
}

/// Waits for the `OK` of a [`hybrid_connect`]ion, then has the guest echo `bytes` bytes of a
/// pattern back.
pub fn echo_through_guest(stream: UnixStream, vm: &Vm, bytes: usize) {
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut ok = String::new();
    reader.read_line(&mut ok).expect("read OK line");
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "handshake answer {ok:?}");
    let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
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
