//! What a VM boots: the kernel build of a variant (from guest-kernel/build)
//! and an initramfs with the demo programs, bpftool, the guest agent and
//! the IPI reference tool, cached by the hash of everything in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
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
    #[error("{what} needs System.map for {}: none beside it (System.map, System.map-<release>) or in its kernel build tree", image.display())]
    NoSystemMap { what: String, image: PathBuf },
    #[error("the kernel {}: {detail}", image.display())]
    MissingFeature { image: PathBuf, detail: String },
    #[error("no kernel at {}: {source}", path.display())]
    NoKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no bzImage (looked for bzImage and arch/x86/boot/bzImage in it)", dir.display())]
    NoImageInDir { dir: PathBuf },
    #[error("{} is not a bzImage: {reason}", path.display())]
    NotBzImage { path: PathBuf, reason: String },
    #[error("the kernel {} has no bpftool beside it (or in tools/bpf/bpftool/ of its tree), and the default guest kernel, whose bpftool would be used instead, is not built: build it with `termlab kernel build`, or put a static bpftool beside the image", image.display())]
    NoBpftool { image: PathBuf },
    #[error("the kernel {} has no bpftool with its libbpf beside it (`libbpf/` with libbpf.a and include/bpf/, or tools/bpf/bpftool/ of its tree after `make -C tools/bpf/bpftool`), and the default guest kernel, whose pair would be used instead, is not built: build it with `termlab kernel build` (a `loader_source` is built around a skeleton of that bpftool, against its libbpf)", image.display())]
    NoSkeletonTools { image: PathBuf },
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
    #[error("cannot take the guest image build lock: {0}")]
    BuildLock(#[source] termlab_nested::NestedError),
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

/// A cache entry's name from the sha256 of what it is built from: its first 8 bytes in hex.
pub fn cache_key(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A kernel to boot: its bzImage and what is known about it. A kernel from
/// guest-kernel/build has everything; a user's kernel may lack System.map
/// (then `verify_stack` cannot run), bpftool (then the default build's goes
/// into the initramfs) and build-info.json.
#[derive(Debug, Clone)]
pub struct KernelBuild {
    /// The directory the image was found in (the tree root for a kernel build tree).
    pub dir: PathBuf,
    pub bzimage: PathBuf,
    /// The same kernel uncompressed, as guest-kernel/build leaves it beside the bzImage (its
    /// loadable segments only): the VMM boots it without the bzImage's self-decompression,
    /// about 1 s of a nested boot. `None` for a kernel given by path: its bzImage boots.
    pub vmlinux: Option<PathBuf>,
    pub system_map: Option<PathBuf>,
    pub bpftool: Option<PathBuf>,
    /// The libbpf that bpftool was built with, a directory holding `libbpf.a` and
    /// `include/bpf/`: a loader around a skeleton that bpftool generated compiles against it
    /// (`loader_source`). guest-kernel/build publishes it; a kernel tree whose bpftool was
    /// built has it in `tools/bpf/bpftool/libbpf/`.
    pub libbpf: Option<PathBuf>,
    /// The kernel's BTF as C (`bpftool btf dump ... format c`), which CO-RE
    /// sources include: guest-kernel/build writes it for BTF variants; a
    /// user's kernel may have one beside its bzImage or at its tree's root.
    pub vmlinux_h: Option<PathBuf>,
    pub info: KernelInfo,
}

impl KernelBuild {
    /// What the VMM boots: the vmlinux when there is one, else the bzImage.
    pub fn boot_image(&self) -> &Path {
        self.vmlinux.as_deref().unwrap_or(&self.bzimage)
    }

    /// The System.map, or an error naming `what` needs it and where it was looked for.
    pub fn require_system_map(&self, what: &str) -> Result<&Path, GuestImageError> {
        self.system_map.as_deref().ok_or_else(|| GuestImageError::NoSystemMap {
            what: what.to_owned(),
            image: self.bzimage.clone(),
        })
    }
}

/// What `--kernel` names: a guest-kernel/build variant, or a path (a bzImage
/// or a directory holding one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChoice {
    Variant(KernelVariant),
    Path(PathBuf),
}

impl std::str::FromStr for KernelChoice {
    type Err = std::convert::Infallible;

    /// The name of a variant (`default`, `debug`, `noterm`, `full`,
    /// `preempt`) is that variant; anything else is a path (write
    /// `./default` for a file of that name).
    fn from_str(text: &str) -> Result<KernelChoice, Self::Err> {
        Ok(KernelVariant::value_variants()
            .iter()
            .find(|variant| variant.as_str() == text)
            .map_or_else(
                || KernelChoice::Path(PathBuf::from(text)),
                |variant| KernelChoice::Variant(*variant),
            ))
    }
}

/// The longest kernel label [`kernel_labels`] makes.
const KERNEL_LABEL_MAX: usize = 48;

impl KernelChoice {
    /// A short name for this kernel that is also a safe directory name: a
    /// variant's name; for a path, the name of what holds the image (the
    /// build tree for .../arch/x86/boot/bzImage, the directory for
    /// .../bzImage, else the file or directory itself), characters other
    /// than letters, digits, `.`, `_`, `+` and `-` replaced by `_`.
    pub fn label(&self) -> String {
        let path = match self {
            KernelChoice::Variant(variant) => return variant.as_str().to_owned(),
            KernelChoice::Path(path) => path,
        };
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        let holder = if path.ends_with("arch/x86/boot/bzImage") {
            path.ancestors().nth(4)
        } else if path.file_name().is_some_and(|name| name == "bzImage") {
            path.parent()
        } else {
            Some(path.as_path())
        };
        let name = holder.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        let label: String = name
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "._+-".contains(c) { c } else { '_' })
            .take(KERNEL_LABEL_MAX)
            .collect();
        if label.trim_start_matches('.').is_empty() {
            "kernel".to_owned()
        } else {
            label
        }
    }
}

/// The labels of `choices` ([`KernelChoice::label`]), in order, a repeated
/// one made unique with `-2`, `-3`, ...: the same kernel given twice (an
/// A/A comparison) gets two directories.
pub fn kernel_labels(choices: &[KernelChoice]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::with_capacity(choices.len());
    for choice in choices {
        let base = choice.label();
        let mut label = base.clone();
        let mut n = 2;
        while labels.contains(&label) {
            label = format!("{base}-{n}");
            n += 1;
        }
        labels.push(label);
    }
    labels
}

/// The kernel a run boots: `--kernel` when given (every scenario boots it), else the build in
/// `override_dir` (`--kernel-dir`, `TERMLAB_KERNEL_DIR`) for a scenario of the variant that
/// build was made as (its build-info.json says which; a build that does not say stands for
/// any variant), else the current build of the scenario's `variant`. So the test command can
/// name the default build it made without turning the `full` scenarios into default ones.
pub fn resolve_kernel(
    root: &Path,
    variant: KernelVariant,
    choice: Option<&KernelChoice>,
    override_dir: Option<&Path>,
) -> Result<KernelBuild, GuestImageError> {
    match (choice, override_dir) {
        (Some(choice), _) => kernel_from_choice(root, choice),
        (None, Some(dir)) if build_is_of(dir, variant)? => kernel_build_in(dir, variant),
        (None, _) => find_kernel(root, variant),
    }
}

/// False when the build in `dir` records a variant other than `variant`.
fn build_is_of(dir: &Path, variant: KernelVariant) -> Result<bool, GuestImageError> {
    let info_path = dir.join("build-info.json");
    let Ok(text) = std::fs::read_to_string(&info_path) else {
        return Ok(true); // kernel_build_in names what is missing
    };
    let build_info: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| GuestImageError::BuildInfo { path: info_path, source })?;
    Ok(build_info["variant"].as_str().is_none_or(|built_as| built_as == variant.as_str()))
}

/// The kernel `--kernel` names.
pub fn kernel_from_choice(
    root: &Path,
    choice: &KernelChoice,
) -> Result<KernelBuild, GuestImageError> {
    match choice {
        KernelChoice::Variant(variant) => find_kernel(root, *variant),
        KernelChoice::Path(path) => kernel_at_path(path),
    }
}

/// The build directory of `variant` for the current sources, without building.
pub fn find_kernel(root: &Path, variant: KernelVariant) -> Result<KernelBuild, GuestImageError> {
    let known = lookups().kernel_dirs.get(variant.as_str()).cloned();
    if let Some(dir) = known {
        return kernel_build_in(&dir, variant);
    }
    let output = Command::new(root.join("guest-kernel/build"))
        .args(["--print-dir", "--quiet", "--variant", variant.as_str()])
        .output()
        .map_err(io_error(&root.join("guest-kernel/build")))?;
    if !output.status.success() {
        return Err(GuestImageError::KernelNotBuilt { variant: variant.as_str() });
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    lookups().kernel_dirs.insert(variant.as_str().to_owned(), dir.clone());
    kernel_build_in(&dir, variant)
}

/// What this process looked up on the host, handed to the same command re-run inside the
/// nested L1 VM (as JSON in [`LOOKUPS_ENV`]): `guest-kernel/build --print-dir` and the
/// initramfs's `make` and hashing take a fraction of a second here and seconds each under
/// L1's emulation, for the same files (L1 sees the host's read-only).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Lookups {
    /// Kernel build directories by variant.
    kernel_dirs: BTreeMap<String, PathBuf>,
    /// Initramfs images by [`initramfs_lookup_key`].
    initramfs: BTreeMap<String, PathBuf>,
}

/// Holds the host's [`Lookups`] inside L1.
pub const LOOKUPS_ENV: &str = "TERMLAB_HOST_LOOKUPS";

/// The value of [`LOOKUPS_ENV`] for what this process has looked up.
pub fn lookups_json() -> String {
    serde_json::to_string(&*lookups()).unwrap_or_default()
}

/// This process's lookups, seeded inside L1 with the host's.
fn lookups() -> std::sync::MutexGuard<'static, Lookups> {
    static FOUND: LazyLock<Mutex<Lookups>> = LazyLock::new(|| {
        let handed_over = std::env::var(LOOKUPS_ENV)
            .ok()
            .filter(|_| termlab_nested::is_nested())
            .and_then(|text| serde_json::from_str(&text).ok());
        Mutex::new(handed_over.unwrap_or_default())
    });
    FOUND.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What an initramfs is built from besides the sources: the kernel and the extra files.
fn initramfs_lookup_key(kernel: &KernelBuild, extra: &[GuestFile]) -> String {
    let mut key = kernel.dir.display().to_string();
    for file in extra {
        key.push_str(&format!("\n{}={}", file.guest, file.host.display()));
    }
    key
}

/// Reads a termlab kernel build directory (bzImage, bpftool,
/// build-info.json; vmlinux and System.map when present).
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
    let bzimage = dir.join("bzImage");
    let system_map = Some(dir.join("System.map")).filter(|map| map.is_file());
    let mut info = kernel_info(variant.as_str(), dir, &bzimage, system_map.as_deref(), build_info)?;
    let vmlinux = Some(dir.join("vmlinux")).filter(|vmlinux| vmlinux.is_file());
    info.booted_vmlinux = vmlinux.as_ref().map(|path| path.display().to_string());
    Ok(KernelBuild {
        dir: dir.to_owned(),
        bzimage,
        vmlinux,
        system_map,
        bpftool: Some(dir.join("bpftool")),
        libbpf: Some(dir.join("libbpf")).filter(|libbpf| is_libbpf_dir(libbpf)),
        vmlinux_h: Some(dir.join("vmlinux.h")).filter(|header| header.is_file()),
        info,
    })
}

/// The `variant` recorded for a kernel given by path.
pub const PATH_KERNEL_VARIANT: &str = "path";

/// A kernel given by path: a bzImage file (System.map and bpftool beside
/// it, or in the build tree it sits in at arch/x86/boot/bzImage), a
/// termlab build directory, or a kernel build tree.
pub fn kernel_at_path(path: &Path) -> Result<KernelBuild, GuestImageError> {
    let metadata = std::fs::metadata(path)
        .map_err(|source| GuestImageError::NoKernel { path: path.to_owned(), source })?;
    if metadata.is_dir() {
        if path.join("bzImage").is_file() && path.join("build-info.json").is_file() {
            // A guest-kernel/build output directory given by path.
            let mut build = kernel_build_in(path, KernelVariant::Default)?;
            build.info.variant = PATH_KERNEL_VARIANT.to_owned();
            return Ok(build);
        }
        let image = [path.join("bzImage"), path.join("arch/x86/boot/bzImage")]
            .into_iter()
            .find(|image| image.is_file())
            .ok_or_else(|| GuestImageError::NoImageInDir { dir: path.to_owned() })?;
        return kernel_at_path(&image);
    }
    let version = bzimage_version(path)?;
    let beside = path.parent().unwrap_or(Path::new(".")).to_owned();
    // arch/x86/boot/bzImage → the tree root, where `make` leaves System.map.
    let tree = path
        .ancestors()
        .nth(4)
        .filter(|_| path.ends_with("arch/x86/boot/bzImage"))
        .map(Path::to_owned);
    let release = version.split_whitespace().next().unwrap_or_default();
    let mut map_candidates = vec![beside.join("System.map")];
    if !release.is_empty() {
        // /boot names it System.map-<release>.
        map_candidates.push(beside.join(format!("System.map-{release}")));
    }
    map_candidates.extend(tree.iter().map(|tree| tree.join("System.map")));
    let system_map = map_candidates.into_iter().find(|map| map.is_file());
    let mut bpftool_candidates = vec![beside.join("bpftool")];
    bpftool_candidates.extend(tree.iter().map(|tree| tree.join("tools/bpf/bpftool/bpftool")));
    let bpftool = bpftool_candidates.into_iter().find(|tool| tool.is_file());
    let libbpf = [beside.join("libbpf")]
        .into_iter()
        .chain(tree.iter().map(|tree| tree.join("tools/bpf/bpftool/libbpf")))
        .find(|libbpf| is_libbpf_dir(libbpf));
    let info_path = beside.join("build-info.json");
    let build_info = match std::fs::read_to_string(&info_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|source| GuestImageError::BuildInfo { path: info_path.clone(), source })?,
        Err(_) => serde_json::Value::Null,
    };
    let vmlinux_h = [beside.join("vmlinux.h")]
        .into_iter()
        .chain(tree.iter().map(|tree| tree.join("vmlinux.h")))
        .find(|header| header.is_file());
    let dir = tree.unwrap_or(beside);
    let info = kernel_info(PATH_KERNEL_VARIANT, &dir, path, system_map.as_deref(), build_info)?;
    Ok(KernelBuild {
        dir,
        bzimage: path.to_owned(),
        vmlinux: None,
        system_map,
        bpftool,
        libbpf,
        vmlinux_h,
        info,
    })
}

fn kernel_info(
    variant: &str,
    dir: &Path,
    bzimage: &Path,
    system_map: Option<&Path>,
    build_info: serde_json::Value,
) -> Result<KernelInfo, GuestImageError> {
    let bytes = std::fs::read(bzimage).map_err(io_error(bzimage))?;
    let field = |name: &str| build_info.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    Ok(KernelInfo {
        variant: variant.to_owned(),
        label: None,
        dir: dir.display().to_string(),
        source_version: field("source_version"),
        patch_series_sha256: field("patch_series_sha256"),
        config_sha256: field("config_sha256"),
        image: Some(bzimage.display().to_string()),
        image_sha256: Some(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()),
        image_version: Some(
            bzimage_header_version(&bytes).map_err(|reason| GuestImageError::NotBzImage {
                path: bzimage.to_owned(),
                reason,
            })?,
        ),
        booted_vmlinux: None,
        system_map: system_map.map(|map| map.display().to_string()),
        build_info,
    })
}

/// The version string of a bzImage file (see [`bzimage_header_version`]).
pub fn bzimage_version(path: &Path) -> Result<String, GuestImageError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut header = Vec::with_capacity(BZIMAGE_HEADER_READ);
    file.take(BZIMAGE_HEADER_READ as u64).read_to_end(&mut header).map_err(io_error(path))?;
    bzimage_header_version(&header)
        .map_err(|reason| GuestImageError::NotBzImage { path: path.to_owned(), reason })
}

/// Enough of a bzImage to hold its setup header and version string (the
/// string lives in the setup sectors, within the first 32 KiB).
const BZIMAGE_HEADER_READ: usize = 64 * 1024;

/// The kernel version string of a bzImage, as the x86 boot protocol places
/// it: `kernel_version` (u16 at 0x20E) + 0x200 is the offset of a
/// NUL-terminated string; the header is marked by "HdrS" at 0x202, and
/// needs protocol 2.00 or later (u16 at 0x206).
pub fn bzimage_header_version(image: &[u8]) -> Result<String, String> {
    let u16_at = |at: usize| image.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err("no \"HdrS\" setup header at 0x202 (a vmlinux ELF or a compressed file? \
                    give the bzImage, arch/x86/boot/bzImage)"
            .to_owned());
    }
    let protocol = u16_at(0x206).unwrap_or(0);
    if protocol < 0x0200 {
        return Err(format!("boot protocol {protocol:#06x} is older than 2.00"));
    }
    let offset = u16_at(0x20E).unwrap_or(0);
    if offset == 0 {
        return Err("the setup header has no kernel_version string".to_owned());
    }
    let start = 0x200 + usize::from(offset);
    let rest = image
        .get(start..)
        .ok_or_else(|| format!("kernel_version offset {offset:#x} is beyond the image"))?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| "the kernel_version string has no terminating NUL".to_owned())?;
    Ok(String::from_utf8_lossy(&rest[..end]).trim().to_owned())
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

/// What guest-samples/bpf's Makefile builds into the image's /bin.
const SAMPLE_BINARIES: [&str; 7] = [
    "loops",
    "trigger_loops",
    "prog_terminate",
    "prog_term_map",
    "term_bench",
    "term_stress",
    "bpf_loader",
];

/// The script /init runs: the agent, which reboots the guest on `shutdown`. vCPU 0 does the
/// housekeeping: every device interrupt (and so the vsock work each one queues on its CPU)
/// and the agent. A measured run pinned to another vCPU can then sit in a long
/// non-preemptible helper without holding up the host's requests to the agent.
const RUN_ME: &str = "#!/bin/sh\n\
for f in /proc/irq/*/smp_affinity; do echo 1 > \"$f\" 2>/dev/null; done\n\
exec taskset -c 0 /bin/termlab-agent --shutdown-action reboot\n";

/// The bpftool that goes into the guest: the kernel's own, else (a user's
/// kernel built without tools/bpf) the default termlab build's, a static
/// user-space tool that works with any recent kernel.
fn guest_bpftool(root: &Path, kernel: &KernelBuild) -> Result<PathBuf, GuestImageError> {
    if let Some(bpftool) = &kernel.bpftool {
        return Ok(bpftool.clone());
    }
    find_kernel(root, KernelVariant::Default)
        .ok()
        .and_then(|build| build.bpftool)
        .ok_or_else(|| GuestImageError::NoBpftool { image: kernel.bzimage.clone() })
}

/// Whether `dir` holds a built libbpf: `libbpf.a` and its headers.
fn is_libbpf_dir(dir: &Path) -> bool {
    dir.join("libbpf.a").is_file() && dir.join("include/bpf/libbpf.h").is_file()
}

/// A bpftool and the libbpf it was built with: what a skeleton loader is built with
/// (the skeleton `bpftool gen skeleton` writes needs its own libbpf's version).
pub struct SkeletonTools {
    pub bpftool: PathBuf,
    /// A directory holding `libbpf.a` and `include/bpf/`.
    pub libbpf: PathBuf,
}

/// The tools a skeleton loader for `kernel` is built with: the kernel's own bpftool and
/// libbpf, else (a user's kernel without them) the default termlab build's pair, user-space
/// tools that work with any recent kernel.
pub fn skeleton_tools(root: &Path, kernel: &KernelBuild) -> Result<SkeletonTools, GuestImageError> {
    let pair = |build: &KernelBuild| match (&build.bpftool, &build.libbpf) {
        (Some(bpftool), Some(libbpf)) => {
            Some(SkeletonTools { bpftool: bpftool.clone(), libbpf: libbpf.clone() })
        }
        _ => None,
    };
    if let Some(tools) = pair(kernel) {
        return Ok(tools);
    }
    find_kernel(root, KernelVariant::Default)
        .ok()
        .and_then(|build| pair(&build))
        .ok_or_else(|| GuestImageError::NoSkeletonTools { image: kernel.bzimage.clone() })
}

/// A host file put into the guest image at `guest` (a scenario's `[vm]
/// files` and program objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    pub host: PathBuf,
    pub guest: String,
}

/// Builds (or reuses) the initramfs for `kernel`: demo programs built by
/// guest-samples/bpf's Makefile, the kernel's bpftool, the agent and ipi_rtt.
pub fn initramfs(root: &Path, kernel: &KernelBuild) -> Result<PathBuf, GuestImageError> {
    initramfs_with(root, kernel, &[])
}

/// [`initramfs`] plus `extra` files (their contents and guest paths are
/// part of the image's cache key).
pub fn initramfs_with(
    root: &Path,
    kernel: &KernelBuild,
    extra: &[GuestFile],
) -> Result<PathBuf, GuestImageError> {
    let lookup_key = initramfs_lookup_key(kernel, extra);
    let known = lookups().initramfs.get(&lookup_key).cloned();
    if let Some(image) = known.filter(|image| image.is_file()) {
        mark_used(&image);
        return Ok(image);
    }
    let image = build_initramfs(root, kernel, extra)?;
    lookups().initramfs.insert(lookup_key, image.clone());
    Ok(image)
}

/// Where `make` builds guest-samples/bpf of the checkout at `root`: a
/// directory of that checkout's own. make decides by modification times, so
/// a directory shared by two checkouts (the CI's clone and a working tree)
/// kept one's binaries when the other's sources were older, and a guest got
/// a loader built from other sources than the scenario's.
fn samples_dir(cache: &Path, root: &Path) -> PathBuf {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    cache.join("samples").join(cache_key(&digest))
}

/// Builds the image [`initramfs_with`] describes, or finds it in the cache by content.
fn build_initramfs(
    root: &Path,
    kernel: &KernelBuild,
    extra: &[GuestFile],
) -> Result<PathBuf, GuestImageError> {
    let cache = cache_root().join("harness");
    let samples = samples_dir(&cache, root);
    std::fs::create_dir_all(&samples).map_err(io_error(&samples))?;
    // One build at a time on this host: termlab processes run side by side (the test
    // command's lanes), and make in one samples directory, the shared run-me and ipi_rtt,
    // and one image's output are not safe to write from two at once (a CI dry run of
    // 2026-12-04 failed when two wrote one image's temporary file).
    let _build = termlab_nested::FileLock::exclusive(&cache.join(".build.lock"))
        .map_err(GuestImageError::BuildLock)?;
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
    if std::fs::read(&run_me).ok().as_deref() != Some(RUN_ME.as_bytes()) {
        std::fs::write(&run_me, RUN_ME).map_err(io_error(&run_me))?;
    }

    let bpftool = guest_bpftool(root, kernel)?;
    let mkinitramfs = root.join("guest-samples/mkinitramfs");
    let mut hasher = Sha256::new();
    let named_inputs = [
        ("mkinitramfs", &mkinitramfs),
        ("bpftool", &bpftool),
        ("agent", &agent),
        ("ipi_rtt", &ipi_binary),
        ("run-me", &run_me),
    ];
    for (name, path) in named_inputs {
        hash_input(&mut hasher, name, path)?;
    }
    for binary in SAMPLE_BINARIES {
        hash_input(&mut hasher, binary, &samples.join(binary))?;
    }
    let base_key = cache_key(&hasher.finalize());
    let base = cache.join(format!("base-{base_key}.cpio"));
    let mut built = false;
    if !base.is_file() {
        run(Command::new(&mkinitramfs)
            .arg("-o")
            .arg(&base)
            .arg("--bpftool")
            .arg(&bpftool)
            .arg("--samples")
            .arg(&samples)
            .arg("--run")
            .arg(&run_me)
            .arg("--add")
            .arg(format!("{}:{AGENT_GUEST_PATH}", agent.display()))
            .arg("--add")
            .arg(format!("{}:{IPI_RTT_GUEST_PATH}", ipi_binary.display())))?;
        built = true;
    }
    let image = if extra.is_empty() {
        base.clone()
    } else {
        // The scenario's files go into a second archive after the base (mkinitramfs --on):
        // a change of the samples or the agent rebuilds one base, not one image per scenario.
        let mut hasher = Sha256::new();
        hasher.update(base_key.as_bytes());
        for file in extra {
            hash_input(&mut hasher, &file.guest, &file.host)?;
        }
        let image = cache.join(format!("initramfs-{}.cpio", cache_key(&hasher.finalize())));
        if !image.is_file() {
            run(Command::new(&mkinitramfs).arg("-o").arg(&image).arg("--on").arg(&base).args(
                extra.iter().flat_map(|file| {
                    ["--add".to_owned(), format!("{}:{}", file.host.display(), file.guest)]
                }),
            ))?;
            built = true;
        }
        image
    };
    for used in [&base, &image] {
        mark_used(used);
    }
    if built {
        prune_images(&cache, IMAGE_CACHE_BYTES, &[&base, &image]);
    }
    Ok(image)
}

/// How much of the guest-image cache [`prune_images`] keeps: every change of the samples,
/// the agent or bpftool gives new images, and a CI host kept them all (294 images, 2.7 GB,
/// in three days of this project's own CI).
const IMAGE_CACHE_BYTES: u64 = 1 << 30;

/// An image used this recently is never removed: another termlab process may be about to
/// boot it (a suite beside this one, an L1 VM that was handed its path).
const IMAGE_IN_USE: Duration = Duration::from_secs(3600);

/// Marks a cached image as used now (its modification time), for [`prune_images`]; a
/// cache this user cannot write is left as it is.
fn mark_used(image: &Path) {
    let _ = std::fs::File::options()
        .write(true)
        .open(image)
        .and_then(|file| file.set_modified(SystemTime::now()));
}

/// Removes the least recently used images of `cache` until those left fit in `budget`
/// bytes, sparing `keep` and any image used within [`IMAGE_IN_USE`].
fn prune_images(cache: &Path, budget: u64, keep: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    let mut images: Vec<(SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // .cpio.gz: the gzip'd images of termlab before 2026-12-07.
            (name.starts_with("initramfs-") || name.starts_with("base-"))
                && (name.ends_with(".cpio") || name.ends_with(".cpio.gz"))
        })
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), entry.path()))
        })
        .collect();
    images.sort_by_key(|(used, _, _)| std::cmp::Reverse(*used));
    let now = SystemTime::now();
    let mut kept = 0u64;
    for (used, size, path) in images {
        let in_use = now.duration_since(used).map_or(true, |age| age < IMAGE_IN_USE);
        if kept + size <= budget || in_use || keep.contains(&path.as_path()) {
            kept += size;
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Adds an input of a cached image to its key: its name and contents, not where it lies,
/// so that checkouts in other directories share the image.
fn hash_input(hasher: &mut Sha256, name: &str, path: &Path) -> Result<(), GuestImageError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    hasher.update((name.len() as u64).to_le_bytes());
    hasher.update(name.as_bytes());
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(&bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSION: &str = "6.12.0-mine (me@box) #3 SMP PREEMPT_DYNAMIC";

    #[test]
    fn each_checkout_builds_its_samples_apart() {
        let cache = Path::new("/cache");
        let main = samples_dir(cache, Path::new("/work/main"));
        assert_eq!(main, samples_dir(cache, Path::new("/work/main")));
        assert_ne!(main, samples_dir(cache, Path::new("/work/ci-clone")));
        assert!(main.starts_with("/cache/samples"));
    }

    /// Writes `size` bytes at `path`, last used `age` ago.
    fn cached_image(path: &Path, size: usize, age: Duration) {
        write(path, &vec![0u8; size]);
        let file = std::fs::File::options().write(true).open(path).expect("open");
        file.set_modified(SystemTime::now() - age).expect("set mtime");
    }

    #[test]
    fn pruning_removes_the_least_recently_used_images_past_the_budget() {
        let cache = tempfile::tempdir().expect("temp dir");
        let hour = Duration::from_secs(3600);
        let path = |name: &str| cache.path().join(name);
        cached_image(&path("initramfs-new.cpio.gz"), 400, hour * 2);
        cached_image(&path("base-middle.cpio"), 400, hour * 3);
        cached_image(&path("initramfs-old.cpio.gz"), 400, hour * 4);
        cached_image(&path("initramfs-kept.cpio.gz"), 400, hour * 5);
        cached_image(&path("initramfs-busy.cpio.gz"), 400, Duration::from_secs(60));
        cached_image(&path("user-file"), 4000, hour * 9);
        let kept = path("initramfs-kept.cpio.gz");
        prune_images(cache.path(), 1000, &[&kept]);
        let left: Vec<bool> = ["new", "old", "kept", "busy"]
            .map(|name| path(&format!("initramfs-{name}.cpio.gz")).exists())
            .to_vec();
        // busy (in use) and new fill the budget; base-middle is past it, as is old; kept is spared.
        assert_eq!(left, [true, false, true, true]);
        assert!(!path("base-middle.cpio").exists());
        assert!(path("user-file").exists(), "only images are the cache's to remove");
    }

    /// mkinitramfs itself (real cpio and gzip): a scenario's files follow the base as a second
    /// archive that holds only them and the directories the base lacks, a plain one starting
    /// where the kernel looks for the next archive (4-byte aligned), and nothing the base has may be
    /// shadowed; plain (termlab's images) and gzip'd (the selftests') alike.
    #[test]
    fn a_scenario_image_is_the_base_and_an_archive_of_its_own_files() {
        let root = repository_root().expect("checkout");
        let mkinitramfs = root.join("guest-samples/mkinitramfs");
        let work = tempfile::tempdir().expect("temp dir");
        let samples = work.path().join("samples");
        for binary in SAMPLE_BINARIES {
            write(&samples.join(binary), b"#!/bin/sh\n");
            let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(samples.join(binary), executable).expect("chmod");
        }
        let program = work.path().join("len.bpf.o");
        write(&program, b"object");
        for suffix in ["cpio", "cpio.gz"] {
            let base = work.path().join(format!("base.{suffix}"));
            // busybox-static stands in for bpftool: any static executable will do.
            let made = Command::new(&mkinitramfs)
                .arg("-o")
                .arg(&base)
                .args(["--bpftool", "/bin/busybox", "--samples"])
                .arg(&samples)
                .output()
                .expect("run mkinitramfs");
            assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
            let image = work.path().join(format!("image.{suffix}"));
            let overlay = |dst: &str| {
                Command::new(&mkinitramfs)
                    .arg("-o")
                    .arg(&image)
                    .arg("--on")
                    .arg(&base)
                    .arg("--add")
                    .arg(format!("{}:{dst}", program.display()))
                    .output()
                    .expect("run mkinitramfs")
            };
            let made = overlay("/lib/termlab/programs/len.bpf.o");
            assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
            let base_bytes = std::fs::read(&base).expect("base");
            let image_bytes = std::fs::read(&image).expect("image");
            assert_eq!(&image_bytes[..base_bytes.len()], &base_bytes[..], "the base comes first");
            if suffix == "cpio" {
                assert_eq!(base_bytes.len() % 4, 0, "the second archive starts 4-byte aligned");
            }
            let second = work.path().join(format!("second.{suffix}"));
            std::fs::write(&second, &image_bytes[base_bytes.len()..]).expect("write");
            let unpack = if suffix == "cpio" { "cat" } else { "gzip -dc" };
            let listed = Command::new("sh")
                .arg("-c")
                .arg(format!("{unpack} {} | cpio --quiet -t", second.display()))
                .output()
                .expect("cpio -t");
            let names = String::from_utf8_lossy(&listed.stdout);
            assert_eq!(
                names.lines().collect::<Vec<_>>(),
                ["lib", "lib/termlab", "lib/termlab/programs", "lib/termlab/programs/len.bpf.o"],
                "{suffix}: no entry for a directory the base has (its mode would be set again)"
            );
            let shadowing = overlay("/bin/loops");
            assert!(!shadowing.status.success());
            assert!(String::from_utf8_lossy(&shadowing.stderr)
                .contains("/bin/loops is already in the image"));
        }
    }

    /// The start of a bzImage: setup header with "HdrS", protocol 2.15, and
    /// the version string where kernel_version points.
    fn fake_bzimage() -> Vec<u8> {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x20E..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        image[0x500..0x500 + VERSION.len()].copy_from_slice(VERSION.as_bytes());
        image
    }

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn the_version_string_comes_from_the_setup_header() {
        assert_eq!(bzimage_header_version(&fake_bzimage()).as_deref(), Ok(VERSION));
        let mut not_bz = fake_bzimage();
        not_bz[0x202] = b'X';
        assert!(bzimage_header_version(&not_bz).expect_err("no HdrS").contains("HdrS"));
        let mut no_version = fake_bzimage();
        no_version[0x20E..0x210].copy_from_slice(&[0, 0]);
        assert!(bzimage_header_version(&no_version).is_err());
        let mut old = fake_bzimage();
        old[0x206..0x208].copy_from_slice(&0x0105u16.to_le_bytes());
        assert!(bzimage_header_version(&old).expect_err("old").contains("older than 2.00"));
        assert!(bzimage_header_version(b"short").is_err());
    }

    #[test]
    fn a_build_tree_gives_its_image_map_and_bpftool() {
        let tree = tempfile::tempdir().expect("temp dir");
        let image = tree.path().join("arch/x86/boot/bzImage");
        write(&image, &fake_bzimage());
        write(&tree.path().join("System.map"), b"ffffffff81000000 T _text\n");
        write(&tree.path().join("tools/bpf/bpftool/bpftool"), b"tool");
        // The tree's own vmlinux may be newer than its bzImage: what the user named boots.
        write(&tree.path().join("vmlinux"), b"\x7fELF");
        for given in [tree.path().to_owned(), image.clone()] {
            let build = kernel_at_path(&given).expect("found");
            assert_eq!(build.bzimage, image);
            assert_eq!(build.boot_image(), image);
            assert_eq!(build.info.booted_vmlinux, None);
            assert_eq!(build.dir, tree.path());
            assert_eq!(build.system_map, Some(tree.path().join("System.map")));
            assert_eq!(build.bpftool, Some(tree.path().join("tools/bpf/bpftool/bpftool")));
            assert_eq!(build.info.variant, PATH_KERNEL_VARIANT);
            assert_eq!(build.info.image_version.as_deref(), Some(VERSION));
            let sha: String =
                Sha256::digest(fake_bzimage()).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(build.info.image_sha256, Some(sha));
            assert_eq!(build.info.build_info, serde_json::Value::Null);
        }
    }

    #[test]
    fn a_kernel_dir_stands_for_the_variant_it_was_built_as() {
        let build = tempfile::tempdir().expect("temp dir");
        write(&build.path().join("bzImage"), &fake_bzimage());
        write(&build.path().join("bpftool"), b"tool");
        write(&build.path().join("build-info.json"), br#"{"variant": "default"}"#);
        // A root without guest-kernel/build: any lookup of a variant's own build fails.
        let root = tempfile::tempdir().expect("temp dir");
        let chosen = resolve_kernel(root.path(), KernelVariant::Default, None, Some(build.path()));
        let chosen = chosen.expect("the override");
        assert_eq!(chosen.dir, build.path());
        assert_eq!(chosen.boot_image(), build.path().join("bzImage"), "no vmlinux beside it");
        // guest-kernel/build leaves the uncompressed kernel beside the bzImage: that boots.
        write(&build.path().join("vmlinux"), b"\x7fELF");
        let chosen = kernel_build_in(build.path(), KernelVariant::Default).expect("the build");
        assert_eq!(chosen.boot_image(), build.path().join("vmlinux"));
        let booted = build.path().join("vmlinux").display().to_string();
        assert_eq!(chosen.info.booted_vmlinux, Some(booted));
        let other = resolve_kernel(root.path(), KernelVariant::Full, None, Some(build.path()));
        assert!(other.is_err(), "a full scenario looked up its own build, not the default one");
        // A build that does not say its variant stands for any.
        write(&build.path().join("build-info.json"), b"{}");
        let chosen = resolve_kernel(root.path(), KernelVariant::Full, None, Some(build.path()));
        assert_eq!(chosen.expect("the override").dir, build.path());
    }

    #[test]
    fn a_lone_bzimage_says_what_it_lacks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("vmlinuz");
        write(&image, &fake_bzimage());
        let build = kernel_at_path(&image).expect("found");
        assert_eq!((build.system_map.as_deref(), build.bpftool.as_deref()), (None, None));
        let error = build.require_system_map("verify_stack").expect_err("no map");
        assert_eq!(
            error.to_string(),
            format!(
                "verify_stack needs System.map for {}: none beside it (System.map, \
                 System.map-<release>) or in its kernel build tree",
                image.display()
            )
        );
        // /boot's naming: System.map-<release>.
        write(&dir.path().join("System.map-6.12.0-mine"), b"");
        let build = kernel_at_path(&image).expect("found");
        assert_eq!(build.system_map, Some(dir.path().join("System.map-6.12.0-mine")));

        let empty = tempfile::tempdir().expect("temp dir");
        let error = kernel_at_path(empty.path()).expect_err("no image");
        assert!(matches!(error, GuestImageError::NoImageInDir { .. }), "{error}");
        let error = kernel_at_path(&empty.path().join("missing")).expect_err("no file");
        assert!(error.to_string().starts_with("no kernel at "), "{error}");
    }

    #[test]
    fn kernel_labels_name_what_holds_the_image_and_are_unique() {
        let tree = tempfile::tempdir().expect("temp dir");
        let linux = tree.path().join("linux-6.12 mine");
        let image = linux.join("arch/x86/boot/bzImage");
        write(&image, &fake_bzimage());
        let build = tree.path().join("default-5b2e9181cdd7");
        write(&build.join("bzImage"), &fake_bzimage());
        let vmlinuz = tree.path().join("vmlinuz-6.12.0");
        write(&vmlinuz, &fake_bzimage());
        let path = |p: &Path| KernelChoice::Path(p.to_owned());
        let labels = kernel_labels(&[
            KernelChoice::Variant(KernelVariant::Default),
            path(&image),
            path(&build.join("bzImage")),
            path(&build),
            path(&vmlinuz),
            KernelChoice::Variant(KernelVariant::Default),
            KernelChoice::Variant(KernelVariant::Default),
            path(Path::new("/")),
        ]);
        assert_eq!(
            labels,
            [
                "default",
                "linux-6.12_mine",
                "default-5b2e9181cdd7",
                "default-5b2e9181cdd7-2",
                "vmlinuz-6.12.0",
                "default-2",
                "default-3",
                "kernel",
            ]
        );
        // A relative path is named by where it leads.
        let dot = KernelChoice::Path(".".into()).label();
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(dot, cwd.file_name().expect("name").to_string_lossy());
    }

    #[test]
    fn kernel_names_are_variants_and_anything_else_a_path() {
        let parse = |text: &str| text.parse::<KernelChoice>().expect("infallible");
        assert_eq!(parse("noterm"), KernelChoice::Variant(KernelVariant::Noterm));
        assert_eq!(parse("default"), KernelChoice::Variant(KernelVariant::Default));
        assert_eq!(parse("preempt"), KernelChoice::Variant(KernelVariant::Preempt));
        assert_eq!(parse("./default"), KernelChoice::Path("./default".into()));
        assert_eq!(parse("/boot/vmlinuz"), KernelChoice::Path("/boot/vmlinuz".into()));
    }
}
