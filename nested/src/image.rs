//! The L1 VM's boot image: Debian's stock kernel (as a PVH ELF where it can be, see
//! crate::pvh) plus a busybox initramfs that loads kvm-amd, virtio and 9p, mounts the host's
//! `/` and runs the job named on the kernel command line. Built once from the distribution's
//! `linux-image-amd64` package and cached.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::error::NestedError;
use crate::lock::FileLock;
use crate::mounts::{host_rw_mount_options, root_mount_options, HOST_RW, HOST_TMP};
use crate::tempdir::TempDir;

/// Bumped whenever the initramfs layout or init script changes, so stale caches are ignored.
const IMAGE_VERSION: &str = "v7";
/// Kernel modules L1 needs, in `modprobe` dependency order after expansion. vhost_vsock lets
/// QEMU in L1 give its guests vsock (for comparisons against our VMM).
const L1_MODULES: [&str; 5] = ["kvm-amd", "virtio_pci", "9pnet_virtio", "9p", "vhost_vsock"];
const BUSYBOX: &str = "/bin/busybox";
const BUSYBOX_APPLETS: [&str; 15] = [
    "sh", "mount", "umount", "insmod", "cat", "echo", "chroot", "reboot", "sleep", "sed", "ln",
    "mkdir", "mkfifo", "rm", "unshare",
];

/// The L1 init: modules, the host's `/` read-only on /mnt, the host's `/tmp` kept on
/// HOST_TMP. Then either one job (`termlab.job=DIR` on the command line: run it, power off)
/// or, as a warm L1 (`termlab.warm=SPOOL termlab.idle=S`, see crate::warm), the jobs the
/// launchers name in `SPOOL/next`, one after another, until none came for S seconds. Each
/// job runs through [`L1_RUN_JOB`]; a warm L1 runs it in mount and PID namespaces of its
/// own, so that it starts from a clean view and nothing it started outlives it, then writes
/// `ended` into the job directory. A mount the L1 itself needs that fails stops L1 with a
/// line saying which, which the launcher reports.
const L1_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
fail() { echo "L1: cannot mount $1; stopping"; reboot -f; sleep 60; }
for m in $(cat /mods/order); do insmod /mods/$m.ko || echo "L1: insmod $m failed"; done
n=0; until mount -t 9p -o ROOT_OPTIONS host /mnt 2>/dev/null; do
  n=$((n+1)); [ $n -ge 20 ] && fail "the host's root over 9p"; sleep 1
done
[ -e /dev/kvm ] || echo "L1: /dev/kvm missing"
arg() { sed -n "s/.*termlab\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
# 9p cannot hold Unix sockets: each job gets a local /tmp; the host's /tmp stays reachable
# on HOST_TMP for the directories the job needs from there.
mount -o bind /mnt/tmp HOST_TMP || fail HOST_TMP
job=$(arg job)
if [ -n "$job" ]; then
  [ -r "/mnt$job/mounts" ] || fail "the job directory $job (not visible)"
  /bin/sh /run-job "$job"
  reboot -f
fi
spool=$(arg warm); idle=$(arg idle)
mount -t 9p -o RW_OPTIONS hostrw HOST_RW || fail "the host's root, writable"
queue="HOST_RW$spool"
# Waiting on a FIFO nobody writes is a sleep without a process to start (under emulation a
# `sleep` each time kept a sixth of a host CPU busy).
mkfifo /pause
while :; do
  n=0
  until [ -e "$queue/next" ]; do
    n=$((n+1)); [ $n -ge $((idle * 5)) ] && { echo "L1: no job for $idle s; stopping"; reboot -f; }
    read -t 0.2 _ <> /pause
  done
  job=$(cat "$queue/next"); rm -f "$queue/next"
  unshare -m -p -f /bin/sh /run-job "$job"
  echo > "HOST_RW$job/ended"
done
"#;

/// One job, with the host's root on /mnt: a tmpfs on /mnt/tmp, the job's mounts (`$job/mounts`,
/// see crate::mounts: its writable directories, the binds of the host's /tmp kept on
/// HOST_TMP), L1's own file systems, then chroot into the host and run `$job/job`. A warm
/// L1's writable root is unmounted first: the job writes only where it may.
const L1_RUN_JOB: &str = r#"#!/bin/sh
job=$1
fail() { echo "L1: cannot mount $1 for the job"; exit 125; }
mount -t tmpfs tmp /mnt/tmp || fail /mnt/tmp
. "/mnt$job/mounts"
mount -t proc proc /mnt/proc; mount -t sysfs sys /mnt/sys; mount -t devtmpfs dev /mnt/dev
# devtmpfs lacks the /dev/fd links udev makes; bash process substitution needs them.
ln -sfn /proc/self/fd /mnt/dev/fd; ln -sf /proc/self/fd/0 /mnt/dev/stdin
ln -sf /proc/self/fd/1 /mnt/dev/stdout; ln -sf /proc/self/fd/2 /mnt/dev/stderr
mount -t tmpfs tmp /mnt/dev/shm 2>/dev/null
umount -l HOST_RW 2>/dev/null
exec chroot /mnt /bin/sh "$job/job"
"#;

/// A script of the image with the shared constants filled in.
fn with_constants(script: &str) -> String {
    script
        .replace("ROOT_OPTIONS", &root_mount_options())
        .replace("RW_OPTIONS", host_rw_mount_options())
        .replace("HOST_TMP", HOST_TMP)
        .replace("HOST_RW", HOST_RW)
}

/// Host tools the image build and the launcher use, with the Debian package providing each.
pub const REQUIRED_TOOLS: [(&str, &str); 7] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
    ("modprobe", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("dpkg-deb", "dpkg"),
];

pub struct L1Image {
    /// The uncompressed vmlinux with a PVH entry point, or else the bzImage.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Returns the cached image, building it first if needed (one builder at a time).
pub fn ensure_image(cache_dir: &Path) -> Result<L1Image, NestedError> {
    let dir = cache_dir.join(IMAGE_VERSION);
    let image = L1Image { kernel: dir.join("kernel"), initrd: dir.join("initrd.cpio") };
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&dir).map_err(|e| NestedError::io("create cache dir", &dir, e))?;
    let _lock = FileLock::exclusive(&dir.join(".build.lock"))?;
    if image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image); // another process built it while we waited
    }
    eprintln!("termlab-nested: building the L1 image in {} (once)", dir.display());
    let work = TempDir::new(&dir, "build")?;
    let (vmlinuz, initrd) = build_image(work.path())?;
    let kernel = pvh_kernel_or_bzimage(&vmlinuz, work.path())?;
    let publish = |from: &Path, to: &Path| {
        fs::rename(from, to).map_err(|e| NestedError::io("store L1 image", to, e))
    };
    publish(&initrd, &image.initrd)?;
    publish(&kernel, &image.kernel)?;
    Ok(image)
}

/// The kernel file L1 boots: the vmlinux inside `vmlinuz` when it has a PVH entry point (QEMU
/// starts it directly, seconds sooner under TCG), else `vmlinuz` itself.
fn pvh_kernel_or_bzimage(vmlinuz: &Path, work: &Path) -> Result<PathBuf, NestedError> {
    let bzimage = fs::read(vmlinuz).map_err(|e| NestedError::io("read kernel", vmlinuz, e))?;
    match crate::pvh::pvh_vmlinux(&bzimage) {
        Ok(vmlinux) => {
            let path = work.join("vmlinux");
            fs::write(&path, vmlinux).map_err(|e| NestedError::io("write vmlinux", &path, e))?;
            Ok(path)
        }
        Err(why) => {
            eprintln!("termlab-nested: booting L1 from the bzImage: {why}");
            Ok(vmlinuz.to_owned())
        }
    }
}

fn build_image(work: &Path) -> Result<(PathBuf, PathBuf), NestedError> {
    let package = stock_kernel_package()?;
    run(
        Command::new("apt-get").args(["download", &package]).current_dir(work),
        "apt-get download",
    )?;
    let deb = fs::read_dir(work)
        .map_err(|e| NestedError::io("list download dir", work, e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            NestedError::KernelPackage(format!("apt-get download {package} produced no .deb"))
        })?;
    let root = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), "dpkg-deb -x")?;
    let modules_dir = root.join("lib/modules");
    let version = fs::read_dir(&modules_dir)
        .map_err(|e| NestedError::io("list kernel modules", &modules_dir, e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| NestedError::KernelPackage(format!("{package} contains no modules")))?;
    run(Command::new("depmod").arg("-b").arg(&root).arg(&version), "depmod")?;

    let mut module_files: Vec<String> = Vec::new();
    for module in L1_MODULES {
        let out = output(
            Command::new("modprobe").arg("-d").arg(&root).args([
                "-S",
                &version,
                "--show-depends",
                module,
            ]),
            "modprobe --show-depends",
        )?;
        for line in out.lines() {
            if let Some(path) = line.strip_prefix("insmod ").map(|rest| rest.trim().to_owned()) {
                if !module_files.contains(&path) {
                    module_files.push(path);
                }
            }
        }
    }

    let initrd_path = work.join("initrd.cpio");
    let file = File::create(&initrd_path)
        .map_err(|e| NestedError::io("create initrd", &initrd_path, e))?;
    let mut cpio = CpioWriter::new(std::io::BufWriter::new(file));
    let cpio_err = |e| NestedError::io("write initrd", &initrd_path, e);
    for dir in ["/bin", "/mods", "/mnt", "/proc", "/sys", "/dev", HOST_TMP, HOST_RW] {
        cpio.dir(dir).map_err(cpio_err)?;
    }
    cpio.char_device("/dev/console", 5, 1).map_err(cpio_err)?;
    let busybox =
        fs::read(BUSYBOX).map_err(|e| NestedError::io("read busybox", Path::new(BUSYBOX), e))?;
    cpio.file("/bin/busybox", 0o755, &busybox).map_err(cpio_err)?;
    for applet in BUSYBOX_APPLETS {
        cpio.symlink(&format!("/bin/{applet}"), "busybox").map_err(cpio_err)?;
    }
    let mut order = String::new();
    for path in &module_files {
        let name = Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().split(".ko").next().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let bytes = decompress_module(path)?;
        cpio.file(&format!("/mods/{name}.ko"), 0o644, &bytes).map_err(cpio_err)?;
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("/mods/order", 0o644, order.as_bytes()).map_err(cpio_err)?;
    cpio.file("/init", 0o755, with_constants(L1_INIT).as_bytes()).map_err(cpio_err)?;
    cpio.file("/run-job", 0o755, with_constants(L1_RUN_JOB).as_bytes()).map_err(cpio_err)?;
    cpio.finish().and_then(|mut w| w.flush()).map_err(cpio_err)?;

    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    fs::set_permissions(&vmlinuz, fs::Permissions::from_mode(0o644))
        .map_err(|e| NestedError::io("stat kernel", &vmlinuz, e))?;
    Ok((vmlinuz, initrd_path))
}

/// `linux-image-amd64` is a metapackage; the versioned package it depends on has the files.
fn stock_kernel_package() -> Result<String, NestedError> {
    let out = output(
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
        "apt-cache depends",
    )?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
        })
        .map(str::to_owned)
        .ok_or_else(|| {
            NestedError::KernelPackage(
                "cannot resolve linux-image-amd64 (run apt-get update)".into(),
            )
        })
}

fn decompress_module(path: &str) -> Result<Vec<u8>, NestedError> {
    let tool = if path.ends_with(".xz") {
        "xz"
    } else if path.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(path).map_err(|e| NestedError::io("read module", Path::new(path), e));
    };
    let out = Command::new(tool)
        .args(["-dc", path])
        .output()
        .map_err(|e| NestedError::io("run decompressor", Path::new(tool), e))?;
    if !out.status.success() {
        return Err(NestedError::CommandFailed {
            what: format!("{tool} -dc {path}"),
            status: out.status.to_string(),
        });
    }
    Ok(out.stdout)
}

/// Runs `cmd` with its output on stderr: the launcher's stdout is the L1 command's alone.
fn run(cmd: &mut Command, what: &str) -> Result<(), NestedError> {
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| NestedError::io("run", Path::new(what), e))?;
    if !status.success() {
        return Err(NestedError::CommandFailed {
            what: what.to_owned(),
            status: status.to_string(),
        });
    }
    Ok(())
}

fn output(cmd: &mut Command, what: &str) -> Result<String, NestedError> {
    let out = cmd.output().map_err(|e| NestedError::io("run", Path::new(what), e))?;
    if !out.status.success() {
        return Err(NestedError::CommandFailed {
            what: format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()),
            status: out.status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the Debian packages for any missing tool (the launcher runs as root, like the
/// rest of the project's setup). Returns the packages installed.
pub fn ensure_tools() -> Result<Vec<&'static str>, NestedError> {
    let mut missing: Vec<&str> = REQUIRED_TOOLS
        .iter()
        .filter(|(tool, _)| !(on_path(tool) || *tool == "busybox" && Path::new(BUSYBOX).exists()))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!("termlab-nested: installing {}", missing.join(" "));
        run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
            "apt-get install",
        )?;
    }
    Ok(missing)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
