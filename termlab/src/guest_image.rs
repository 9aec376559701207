//! What a VM boots: the kernel build of a variant (from guest-kernel/build)
//! and an initramfs with the demo programs, bpftool, the guest agent and
//! the IPI reference tool, cached by the hash of everything in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::results::KernelInfo;
use crate::scenario::KernelVariant;

/// The guest path the agent binary is installed at.
pub const AGENT_GUEST_PATH: &str = "/bin/termlab-agent";
/// The guest path of the IPI reference tool (termlab/guest/ipi_rtt.c).
pub const IPI_RTT_GUEST_PATH: &str = "/bin/ipi_rtt";
/// The static target the agent is built for (see [`GuestImageError::NoAgent`]).
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, Error)]
pub enum GuestImageError {
    #[error("cannot find the termlab checkout (guest-kernel/build, scenarios/): run termlab from inside it or set TERMLAB_ROOT")]
    NoRepository,
    #[error("the `{variant}` guest kernel is not built yet: run `termlab kernel build --variant {variant}` (or guest-kernel/build --variant {variant})")]
    KernelNotBuilt { variant: &'static str },
    #[error("{} is missing from the kernel build directory {}: rebuild with `termlab kernel build`", file, dir.display())]
    KernelIncomplete { dir: PathBuf, file: &'static str },
    #[error("the guest agent binary is missing at {}: build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p termlab-agent --target {AGENT_TARGET}` (scripts/setup does this), or set TERMLAB_AGENT", path.display())]
    NoAgent { path: PathBuf },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    BuildInfo {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GuestImageError + '_ {
    move |source| GuestImageError::Io { path: path.to_owned(), source }
}

/// The root of the termlab checkout: `TERMLAB_ROOT`, else the nearest
/// ancestor of the working directory that has guest-kernel/build, else the
/// checkout this binary was built from.
pub fn repository_root() -> Result<PathBuf, GuestImageError> {
    let is_root =
        |dir: &Path| dir.join("guest-kernel/build").is_file() && dir.join("scenarios").is_dir();
    if let Some(root) = std::env::var_os("TERMLAB_ROOT") {
        let root = PathBuf::from(root);
        return if is_root(&root) { Ok(root) } else { Err(GuestImageError::NoRepository) };
    }
    let cwd = std::env::current_dir()
        .map_err(|source| GuestImageError::Io { path: ".".into(), source })?;
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned);
    cwd.ancestors()
        .map(Path::to_owned)
        .chain(built_from)
        .find(|dir| is_root(dir))
        .ok_or(GuestImageError::NoRepository)
}

/// Cache root shared with guest-kernel/build.
pub fn cache_root() -> PathBuf {
    std::env::var_os("TERMLAB_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/termlab"), PathBuf::from)
}

/// A built kernel: its directory and what build-info.json says about it.
#[derive(Debug, Clone)]
pub struct KernelBuild {
    pub dir: PathBuf,
    pub bzimage: PathBuf,
    pub bpftool: PathBuf,
    pub info: KernelInfo,
}

/// The kernel to boot: the build in `override_dir` (`--kernel-dir`) when
/// given, else the current build of `variant`.
pub fn resolve_kernel(
    root: &Path,
    variant: KernelVariant,
    override_dir: Option<&Path>,
) -> Result<KernelBuild, GuestImageError> {
    match override_dir {
        Some(dir) => kernel_build_in(dir, variant),
        None => find_kernel(root, variant),
    }
}

/// The build directory of `variant` for the current sources, without building.
pub fn find_kernel(root: &Path, variant: KernelVariant) -> Result<KernelBuild, GuestImageError> {
    let output = Command::new(root.join("guest-kernel/build"))
        .args(["--print-dir", "--quiet", "--variant", variant.as_str()])
        .output()
        .map_err(io_error(&root.join("guest-kernel/build")))?;
    if !output.status.success() {
        return Err(GuestImageError::KernelNotBuilt { variant: variant.as_str() });
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    kernel_build_in(&dir, variant)
}

/// Reads a kernel build directory (bzImage, bpftool, build-info.json).
pub fn kernel_build_in(dir: &Path, variant: KernelVariant) -> Result<KernelBuild, GuestImageError> {
    for file in ["bzImage", "bpftool", "build-info.json"] {
        if !dir.join(file).is_file() {
            return Err(GuestImageError::KernelIncomplete { dir: dir.to_owned(), file });
        }
    }
    let info_path = dir.join("build-info.json");
    let text = std::fs::read_to_string(&info_path).map_err(io_error(&info_path))?;
    let build_info: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| GuestImageError::BuildInfo { path: info_path.clone(), source })?;
    let field = |name: &str| build_info.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let info = KernelInfo {
        variant: variant.as_str().to_owned(),
        dir: dir.display().to_string(),
        source_version: field("source_version"),
        patch_series_sha256: field("patch_series_sha256"),
        config_sha256: field("config_sha256"),
        build_info,
    };
    Ok(KernelBuild {
        dir: dir.to_owned(),
        bzimage: dir.join("bzImage"),
        bpftool: dir.join("bpftool"),
        info,
    })
}

/// The statically linked guest agent.
pub fn agent_binary(root: &Path) -> Result<PathBuf, GuestImageError> {
    let path = match std::env::var_os("TERMLAB_AGENT") {
        Some(path) => PathBuf::from(path),
        None => {
            let target_dir = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), PathBuf::from);
            target_dir.join(AGENT_TARGET).join("release/termlab-agent")
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(GuestImageError::NoAgent { path })
    }
}

fn run(command: &mut Command) -> Result<(), GuestImageError> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| GuestImageError::Command { command: shown.clone(), detail: e.to_string() })?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> =
            stderr.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        Err(GuestImageError::Command {
            command: shown,
            detail: format!("{}\n{}", output.status, tail.join("\n")),
        })
    }
}

/// Whether `output` is missing or older than `source`.
fn is_stale(output: &Path, source: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    match (modified(output), modified(source)) {
        (Some(built), Some(changed)) => built < changed,
        _ => true,
    }
}

fn sha256_of_file(hasher: &mut Sha256, path: &Path) -> Result<(), GuestImageError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(&bytes);
    Ok(())
}

/// The script /init runs: the agent, which reboots the guest on `shutdown`. vCPU 0 does the
/// housekeeping: every device interrupt (and so the vsock work each one queues on its CPU)
/// and the agent. A measured run pinned to another vCPU can then sit in a long
/// non-preemptible helper without holding up the host's requests to the agent.
const RUN_ME: &str = "#!/bin/sh\n\
for f in /proc/irq/*/smp_affinity; do echo 1 > \"$f\" 2>/dev/null; done\n\
exec taskset -c 0 /bin/termlab-agent --shutdown-action reboot\n";

/// Builds (or reuses) the initramfs for `kernel`: demo programs built by
/// guest-samples/bpf's Makefile, the kernel's bpftool, the agent and ipi_rtt.
pub fn initramfs(root: &Path, kernel: &KernelBuild) -> Result<PathBuf, GuestImageError> {
    let cache = cache_root().join("harness");
    let samples = cache.join("samples");
    std::fs::create_dir_all(&samples).map_err(io_error(&samples))?;
    // make is incremental: a no-op when the samples are up to date.
    run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root.join("guest-samples/bpf"))
        .arg(format!("OUTPUT={}", samples.display())))?;

    let ipi_source = root.join("termlab/guest/ipi_rtt.c");
    let ipi_binary = cache.join("ipi_rtt");
    if is_stale(&ipi_binary, &ipi_source) {
        run(Command::new("cc")
            .args(["-O2", "-Wall", "-static", "-pthread", "-o"])
            .arg(&ipi_binary)
            .arg(&ipi_source))?;
    }

    let agent = agent_binary(root)?;
    let run_me = cache.join("run-me");
    std::fs::write(&run_me, RUN_ME).map_err(io_error(&run_me))?;

    let mkinitramfs = root.join("guest-samples/mkinitramfs");
    let mut hasher = Sha256::new();
    for input in [&mkinitramfs, &kernel.bpftool, &agent, &ipi_binary, &run_me] {
        sha256_of_file(&mut hasher, input)?;
    }
    for binary in
        ["loops", "trigger_loops", "prog_terminate", "prog_term_map", "term_bench", "term_stress"]
    {
        sha256_of_file(&mut hasher, &samples.join(binary))?;
    }
    let key: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let image = cache.join(format!("initramfs-{key}.cpio.gz"));
    if !image.is_file() {
        run(Command::new(&mkinitramfs)
            .arg("-o")
            .arg(&image)
            .arg("--bpftool")
            .arg(&kernel.bpftool)
            .arg("--samples")
            .arg(&samples)
            .arg("--run")
            .arg(&run_me)
            .arg("--add")
            .arg(format!("{}:{AGENT_GUEST_PATH}", agent.display()))
            .arg("--add")
            .arg(format!("{}:{IPI_RTT_GUEST_PATH}", ipi_binary.display())))?;
    }
    Ok(image)
}
