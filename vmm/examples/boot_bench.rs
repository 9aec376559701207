//! Boot-time benchmark: our VMM vs `qemu-system-x86_64 -M microvm -enable-kvm`, same kernel,
//! initramfs (vmm/tests/guest/init.c), vCPUs and memory, measured in the same environment.
//! Run where KVM can run Linux (e.g. `termlab-nested -- cargo run --example boot_bench ...`).
//!
//! Two times per boot, from process/VM start: "init ran" (TERMLAB-INIT-RAN on the serial
//! console) and "vsock connected" (the guest's connection to host port 5000 accepted).
//!
//! usage: boot_bench --kernel K --initrd I [--vmlinux V] [--runs 10] [--vcpus 2] [--mem-mib 256]
//!
//! K is the bzImage both VMMs boot; with --vmlinux, our VMM also boots V (the same build's
//! uncompressed vmlinux, as termlab does) in a third column, which QEMU microvm cannot
//! without a PVH entry in the kernel.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use termlab_vmm::{Vm, VmConfig, VsockConfig};

const HOST_PORT: u32 = 5000;
const GUEST_CID: u32 = 3;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr quiet";
const TIMEOUT: Duration = Duration::from_secs(300);

struct Sample {
    init_ran: Duration,
    vsock_connected: Duration,
}

struct Args {
    kernel: PathBuf,
    vmlinux: Option<PathBuf>,
    initrd: PathBuf,
    runs: usize,
    vcpus: u8,
    mem_mib: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kernel: PathBuf::new(),
        vmlinux: None,
        initrd: PathBuf::new(),
        runs: 10,
        vcpus: 2,
        mem_mib: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--kernel" => args.kernel = value.into(),
            "--initrd" => args.initrd = value.into(),
            "--vmlinux" => args.vmlinux = Some(value.into()),
            "--runs" => args.runs = value.parse().map_err(|e| format!("--runs: {e}"))?,
            "--vcpus" => args.vcpus = value.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--mem-mib" => args.mem_mib = value.parse().map_err(|e| format!("--mem-mib: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !args.kernel.is_file()
        || !args.initrd.is_file()
        || args.vmlinux.as_ref().is_some_and(|v| !v.is_file())
    {
        return Err("--kernel, --initrd and --vmlinux must name existing files".into());
    }
    Ok(args)
}

/// Waits up to TIMEOUT for a connection on a listening socket.
fn wait_readable(fd: std::os::fd::RawFd) -> Result<(), String> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as libc::c_int) };
    if n == 1 {
        Ok(())
    } else {
        Err(format!("no vsock connection within {TIMEOUT:?}"))
    }
}

/// Accepts one connection and answers the guest's line so it can finish.
fn accept_and_answer<S: std::io::Read + std::io::Write>(
    accept: impl FnOnce() -> std::io::Result<S>,
) -> Result<(), String> {
    let mut stream = accept().map_err(|e| format!("accept: {e}"))?;
    let mut line = [0u8; 64];
    let _ = stream.read(&mut line);
    stream.write_all(b"pong-from-host\n").map_err(|e| format!("answer: {e}"))
}

fn run_ours(
    args: &Args,
    kernel: &std::path::Path,
    dir: &std::path::Path,
) -> Result<Sample, String> {
    let uds = dir.join("bench.sock");
    let listener =
        UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).map_err(|e| e.to_string())?;
    let mut config = VmConfig::new(
        kernel.to_owned(),
        Some(args.initrd.clone()),
        format!("{CMDLINE} termlab.host_port={HOST_PORT} termlab.end=reboot"),
    );
    config.vcpus = args.vcpus;
    config.mem_mib = args.mem_mib;
    config.vsock = Some(VsockConfig { guest_cid: u64::from(GUEST_CID), uds_path: uds.clone() });
    let started = Instant::now();
    let mut vm = Vm::new(config).map_err(|e| e.to_string())?;
    vm.start().map_err(|e| e.to_string())?;
    let console = vm.console();
    let waiter = std::thread::spawn(move || {
        console.wait_for("TERMLAB-INIT-RAN", TIMEOUT).then(|| started.elapsed())
    });
    wait_readable(listener.as_raw_fd())?;
    accept_and_answer(|| listener.accept().map(|(s, _)| s))?;
    let vsock_connected = started.elapsed();
    let init_ran = waiter.join().map_err(|_| "waiter panicked")?.ok_or("init never ran")?;
    vm.wait_exit(Some(TIMEOUT)).ok_or("guest did not reboot")?;
    drop(vm);
    let _ = std::fs::remove_file(format!("{}_{HOST_PORT}", uds.display()));
    Ok(Sample { init_ran, vsock_connected })
}

/// An AF_VSOCK listener on the L1 host side for QEMU's vhost-vsock guests.
fn vsock_listener(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket syscalls with a correctly sized sockaddr_vm.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) < 0
            || libc::listen(fd.as_raw_fd(), 1) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn run_qemu(args: &Args) -> Result<Sample, String> {
    let listener = vsock_listener(HOST_PORT)
        .map_err(|e| format!("AF_VSOCK listener (vhost_vsock loaded?): {e}"))?;
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        // acpi=off: our guest has no ACPI, so QEMU must announce virtio-mmio on the command line.
        .args([
            "-M",
            "microvm,acpi=off",
            "-enable-kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .args(["-smp", &args.vcpus.to_string(), "-m", &args.mem_mib.to_string()])
        .arg("-kernel")
        .arg(&args.kernel)
        .arg("-initrd")
        .arg(&args.initrd)
        // microvm has no i8042, so the guest resets by triple fault there (QEMU exits on it).
        .args([
            "-append",
            &format!("{CMDLINE} reboot=t termlab.host_port={HOST_PORT} termlab.end=reboot"),
        ])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={GUEST_CID}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start qemu: {e}"))?;
    let stdout = qemu.stdout.take().ok_or("no qemu stdout")?;
    let waiter = std::thread::spawn(move || {
        let mut init_ran = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if init_ran.is_none() && line.contains("TERMLAB-INIT-RAN") {
                init_ran = Some(started.elapsed());
            }
        }
        init_ran
    });
    let accepted = wait_readable(listener.as_raw_fd()).and_then(|()| {
        accept_and_answer(|| {
            // SAFETY: accept on our listening socket; the result is checked.
            let fd = unsafe {
                libc::accept(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut())
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a freshly accepted socket we own.
            Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
        })
    });
    let vsock_connected = started.elapsed();
    if let Err(e) = accepted {
        let _ = qemu.kill();
        let _ = qemu.wait();
        return Err(e);
    }
    let _ = qemu.wait();
    let init_ran =
        waiter.join().map_err(|_| "waiter panicked")?.ok_or("no init marker from qemu")?;
    Ok(Sample { init_ran, vsock_connected })
}

fn stats(values: &mut [Duration]) -> (Duration, Duration, Duration) {
    values.sort();
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("boot_bench: {e}");
            std::process::exit(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("termlab-boot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // (name, our VMM's kernel: None for QEMU, samples)
    let mut results: Vec<(&str, Option<PathBuf>, Vec<Sample>)> = vec![
        ("termlab-vmm bzImage", Some(args.kernel.clone()), Vec::new()),
        ("qemu microvm bzImage", None, Vec::new()),
    ];
    if let Some(vmlinux) = &args.vmlinux {
        results.push(("termlab-vmm vmlinux", Some(vmlinux.clone()), Vec::new()));
    }
    for run in 0..args.runs {
        // Alternate so load changes on the host hit every column alike.
        for (name, kernel, samples) in results.iter_mut() {
            let sample = match kernel {
                Some(kernel) => run_ours(&args, kernel, &dir),
                None => run_qemu(&args),
            };
            match sample {
                Ok(s) => {
                    eprintln!(
                        "run {run} {name}: init {:?}, vsock {:?}",
                        s.init_ran, s.vsock_connected
                    );
                    samples.push(s);
                }
                Err(e) => eprintln!("run {run} {name}: FAILED: {e}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "| VMM | runs | init ran: median (min–max) | vsock connected: median (min–max) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    let mut medians = Vec::new();
    for (name, kernel, samples) in &results {
        if samples.is_empty() {
            continue;
        }
        let (im, imin, imax) = stats(&mut samples.iter().map(|s| s.init_ran).collect::<Vec<_>>());
        let (vm, vmin, vmax) =
            stats(&mut samples.iter().map(|s| s.vsock_connected).collect::<Vec<_>>());
        medians.push((*name, kernel.is_none(), im, vm));
        let _ = writeln!(
            out,
            "| {name} | {} | {:.0} ms ({:.0}–{:.0}) | {:.0} ms ({:.0}–{:.0}) |",
            samples.len(),
            im.as_secs_f64() * 1e3,
            imin.as_secs_f64() * 1e3,
            imax.as_secs_f64() * 1e3,
            vm.as_secs_f64() * 1e3,
            vmin.as_secs_f64() * 1e3,
            vmax.as_secs_f64() * 1e3
        );
    }
    let Some(&(_, _, qemu_init, qemu_vsock)) = medians.iter().find(|m| m.1) else { return };
    for (name, _, init, vsock) in medians.iter().filter(|m| !m.1) {
        let _ = writeln!(
            out,
            "ratio {name}/qemu (medians): init ran {:.2}, vsock connected {:.2}",
            init.as_secs_f64() / qemu_init.as_secs_f64(),
            vsock.as_secs_f64() / qemu_vsock.as_secs_f64()
        );
    }
}
