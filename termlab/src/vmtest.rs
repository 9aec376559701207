//! vmtest configuration files (`vmtest.toml`, danobi/vmtest 0.18) for
//! `termlab exec --config`: `[[target]]` entries, each a kernel and a
//! command. Unknown keys are errors with `file:line:col` (vmtest ignores
//! them silently); keys this guest cannot honour are refused by name.
//!
//! Supported: `name`, `command` (run by the guest's busybox `sh -c`, not
//! bash), `kernel` (a bzImage or anything `--kernel` takes; relative to the
//! file), `kernel_args` (appended to the kernel command line), `rootfs`
//! only as `"/"` (the default; the guest's root is termlab's initramfs, not
//! the host's), `arch` only as `"x86_64"`, `uefi` only as `false`, and
//! `[target.vm]` `num_cpus` (default 2, at most 8) and `memory` (default
//! `"4G"`; `K`, `M`, `G` suffixes). Refused: `image`, `uefi = true`,
//! `[target.vm]` `bios`, `extra_args` (QEMU options; the guest runs on
//! termlab's VMM) and `mounts` (the VMM has neither 9p nor virtiofs). The
//! file's directory is copied into the guest at `/mnt/vmtest`, the
//! command's working directory (vmtest mounts it there).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

/// Where the configuration file's directory appears in the guest.
pub const GUEST_DIR: &str = "/mnt/vmtest";
/// vmtest's default `[target.vm] num_cpus`.
const DEFAULT_CPUS: u8 = 2;
/// vmtest's default `[target.vm] memory`.
const DEFAULT_MEMORY: &str = "4G";
/// The VMM's vCPU limit.
const MAX_CPUS: u8 = 8;

#[derive(Debug, Error)]
pub enum VmtestError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: `{key}`: {message}", path.display())]
    Invalid { path: PathBuf, line: usize, column: usize, key: String, message: String },
    #[error("invalid --filter regex: {0}")]
    Filter(#[from] regex::Error),
    #[error("no target of {} matches the filter {filter:?} (targets: {names})", path.display())]
    NothingSelected { path: PathBuf, filter: String, names: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    target: Spanned<Vec<TargetModel>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetModel {
    name: String,
    command: Spanned<String>,
    kernel: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    uefi: Option<Spanned<bool>>,
    kernel_args: Option<String>,
    rootfs: Option<Spanned<String>>,
    arch: Option<Spanned<String>>,
    vm: Option<VmModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmModel {
    num_cpus: Option<Spanned<u64>>,
    memory: Option<Spanned<String>>,
    bios: Option<Spanned<String>>,
    extra_args: Option<Spanned<Vec<String>>>,
    mounts: Option<Spanned<BTreeMap<String, MountModel>>>,
}

/// Parsed only so that a mount with a misspelt key is named as such.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct MountModel {
    host_path: String,
    #[serde(default)]
    writable: bool,
}

/// One `[[target]]`, checked and with its paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// Run as `sh -c COMMAND` in [`GUEST_DIR`].
    pub command: String,
    /// The `kernel` value, resolved against the file's directory when it is a relative path.
    pub kernel: PathBuf,
    pub kernel_args: Option<String>,
    pub vcpus: u8,
    pub memory_mib: u32,
}

/// A loaded configuration file.
#[derive(Debug, Clone)]
pub struct VmtestConfig {
    pub path: PathBuf,
    /// The file's directory: copied to [`GUEST_DIR`].
    pub dir: PathBuf,
    pub targets: Vec<Target>,
}

impl VmtestConfig {
    /// The targets whose name matches `filter` (a regex, as vmtest's `-f`), all without one.
    pub fn select(&self, filter: Option<&str>) -> Result<Vec<&Target>, VmtestError> {
        let Some(filter) = filter else { return Ok(self.targets.iter().collect()) };
        let regex = regex::Regex::new(filter)?;
        let selected: Vec<&Target> =
            self.targets.iter().filter(|target| regex.is_match(&target.name)).collect();
        if selected.is_empty() {
            let names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(VmtestError::NothingSelected {
                path: self.path.clone(),
                filter: filter.to_owned(),
                names: names.join(", "),
            });
        }
        Ok(selected)
    }
}

/// Reads and checks a vmtest.toml.
pub fn load(path: &Path) -> Result<VmtestConfig, VmtestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| VmtestError::Read { path: path.to_owned(), source })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let targets = parse(&text, &dir).map_err(|error| {
        let (line, column) = crate::scenario::line_column(&text, error.span.start);
        VmtestError::Invalid {
            path: path.to_owned(),
            line,
            column,
            key: error.key,
            message: error.message,
        }
    })?;
    Ok(VmtestConfig { path: path.to_owned(), dir, targets })
}

/// An error at a byte span of the file.
#[derive(Debug)]
pub struct ParseError {
    span: Range<usize>,
    key: String,
    message: String,
}

fn error_at<T>(value: &Spanned<T>, key: String, message: impl Into<String>) -> ParseError {
    ParseError { span: value.span(), key, message: message.into() }
}

/// Parses the text of a vmtest.toml whose directory is `dir`.
pub fn parse(text: &str, dir: &Path) -> Result<Vec<Target>, ParseError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ParseError {
        span: e.span().unwrap_or(0..0),
        key: "(syntax)".into(),
        message: e.message().trim_end().to_owned(),
    })?;
    let file: FileModel = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string().replace(".$__serde_spanned_private_value", "");
        let key = if key == "." { "(top level)".to_owned() } else { key };
        ParseError {
            span: e.inner().span().unwrap_or(0..0),
            key,
            message: e.inner().message().trim_end().to_owned(),
        }
    })?;
    if file.target.get_ref().is_empty() {
        return Err(error_at(&file.target, "target".into(), "no [[target]] entries"));
    }
    let mut names = BTreeMap::new();
    let mut targets = Vec::new();
    for (index, model) in file.target.into_inner().into_iter().enumerate() {
        let key = |name: &str| format!("target[{index}].{name}");
        if let Some(first) = names.insert(model.name.clone(), index) {
            return Err(error_at(
                &model.command,
                key("name"),
                format!("target name {:?} is also target[{first}]'s", model.name),
            ));
        }
        targets.push(check_target(model, dir, &key)?);
    }
    Ok(targets)
}

fn check_target(
    model: TargetModel,
    dir: &Path,
    key: &dyn Fn(&str) -> String,
) -> Result<Target, ParseError> {
    if let Some(image) = &model.image {
        return Err(error_at(image, key("image"), "image targets (a disk image booted by QEMU) are not supported: termlab boots a kernel with its own initramfs; give `kernel` instead"));
    }
    if let Some(uefi) = model.uefi.as_ref().filter(|uefi| *uefi.get_ref()) {
        return Err(error_at(
            uefi,
            key("uefi"),
            "UEFI boot is not supported: termlab's VMM boots the bzImage directly",
        ));
    }
    let kernel = model.kernel.as_ref().ok_or_else(|| {
        error_at(&model.command, key("kernel"), "a target needs `kernel` (a bzImage path)")
    })?;
    if let Some(rootfs) = model.rootfs.as_ref().filter(|rootfs| rootfs.get_ref() != "/") {
        return Err(error_at(rootfs, key("rootfs"), "only rootfs = \"/\" is supported: the guest's root is termlab's initramfs (busybox, bpftool, the agent), and the toml file's directory is copied to /mnt/vmtest"));
    }
    if let Some(arch) = model.arch.as_ref().filter(|arch| arch.get_ref() != "x86_64") {
        return Err(error_at(
            arch,
            key("arch"),
            "only arch = \"x86_64\" is supported (KVM on this host)",
        ));
    }
    let vm = model.vm.unwrap_or_default();
    if let Some(bios) = &vm.bios {
        return Err(error_at(
            bios,
            key("vm.bios"),
            "a custom BIOS is not supported: termlab's VMM boots the bzImage directly",
        ));
    }
    if let Some(extra_args) = &vm.extra_args {
        return Err(error_at(
            extra_args,
            key("vm.extra_args"),
            "QEMU arguments do not apply: the guest runs on termlab's own VMM",
        ));
    }
    if let Some(mounts) = &vm.mounts {
        return Err(error_at(mounts, key("vm.mounts"), "mounts are not supported: termlab's VMM has neither 9p nor virtiofs; the toml file's directory is copied to /mnt/vmtest instead"));
    }
    let vcpus = match &vm.num_cpus {
        None => DEFAULT_CPUS,
        Some(cpus) => {
            u8::try_from(*cpus.get_ref()).ok().filter(|n| (1..=MAX_CPUS).contains(n)).ok_or_else(
                || error_at(cpus, key("vm.num_cpus"), format!("must be between 1 and {MAX_CPUS}")),
            )?
        }
    };
    let memory_mib = match &vm.memory {
        None => parse_memory(DEFAULT_MEMORY).unwrap_or(4096),
        Some(memory) => parse_memory(memory.get_ref())
            .map_err(|message| error_at(memory, key("vm.memory"), message))?,
    };
    let kernel_path = Path::new(kernel.get_ref());
    let kernel =
        if kernel_path.is_absolute() { kernel_path.to_owned() } else { dir.join(kernel_path) };
    Ok(Target {
        name: model.name,
        command: model.command.into_inner(),
        kernel,
        kernel_args: model.kernel_args,
        vcpus,
        memory_mib,
    })
}

/// vmtest's memory sizes: a number with an optional K, M or G suffix (bytes without one), in MiB.
pub fn parse_memory(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size like \"4G\""))?;
    let bytes = match suffix.trim().to_ascii_uppercase().as_str() {
        "" => Some(number),
        "K" | "KB" | "KIB" => number.checked_mul(1 << 10),
        "M" | "MB" | "MIB" => number.checked_mul(1 << 20),
        "G" | "GB" | "GIB" => number.checked_mul(1 << 30),
        other => return Err(format!("unknown size suffix {other:?} (use K, M or G)")),
    };
    let mib = bytes.map(|b| b >> 20).unwrap_or(u64::MAX);
    if !(64..=65_536).contains(&mib) {
        return Err(format!("{text:?} is {mib} MiB: the guest needs 64 MiB to 64 GiB"));
    }
    Ok(mib as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<VmtestConfig, VmtestError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("vmtest.toml");
        std::fs::write(&path, text).expect("write");
        load(&path).map(|mut config| {
            // Paths are checked relative to the file; make them comparable.
            for target in &mut config.targets {
                if let Ok(rest) = target.kernel.strip_prefix(dir.path()) {
                    target.kernel = Path::new("DIR").join(rest);
                }
            }
            config
        })
    }

    fn error_of(text: &str) -> String {
        let error = load_text(text).expect_err("invalid");
        // The temporary directory's name varies: keep what follows the file name.
        let text = error.to_string();
        text[text.find("vmtest.toml").expect("file named")..].to_owned()
    }

    #[test]
    fn targets_get_vmtest_defaults_and_paths_relative_to_the_file() {
        let config = load_text(
            "[[target]]\nname = \"one\"\nkernel = \"bzImage\"\ncommand = \"true\"\n\n\
             [[target]]\nname = \"two\"\nkernel = \"/abs/bzImage\"\ncommand = \"echo hi\"\n\
             kernel_args = \"quiet\"\nrootfs = \"/\"\narch = \"x86_64\"\nuefi = false\n\
             [target.vm]\nnum_cpus = 1\nmemory = \"512M\"\n",
        )
        .expect("valid");
        assert_eq!(
            config.targets,
            vec![
                Target {
                    name: "one".into(),
                    command: "true".into(),
                    kernel: "DIR/bzImage".into(),
                    kernel_args: None,
                    vcpus: 2,
                    memory_mib: 4096,
                },
                Target {
                    name: "two".into(),
                    command: "echo hi".into(),
                    kernel: "/abs/bzImage".into(),
                    kernel_args: Some("quiet".into()),
                    vcpus: 1,
                    memory_mib: 512,
                },
            ]
        );
        let names = |filter| -> Vec<String> {
            config.select(filter).expect("selected").iter().map(|t| t.name.clone()).collect()
        };
        assert_eq!(names(Some("^t")), ["two"]);
        assert_eq!(names(None), ["one", "two"]);
        assert!(matches!(config.select(Some("three")), Err(VmtestError::NothingSelected { .. })));
        assert!(matches!(config.select(Some("(")), Err(VmtestError::Filter(_))));
    }

    #[test]
    fn a_misspelt_key_is_named_with_its_line_and_column() {
        assert_eq!(
            error_of("[[target]]\nname = \"a\"\nkernal = \"bzImage\"\ncommand = \"true\"\n"),
            "vmtest.toml:3:1: `target[0].kernal`: unknown field `kernal`, expected one of `name`, \
             `command`, `kernel`, `image`, `uefi`, `kernel_args`, `rootfs`, `arch`, `vm`"
        );
        let mount = "[[target]]\nname = \"a\"\nkernel = \"k\"\ncommand = \"c\"\n\
                     [target.vm.mounts]\n\"/m\" = { host_path = \"/h\", writeable = true }\n";
        let text = error_of(mount);
        assert!(text.starts_with("vmtest.toml:6:"), "{text}");
        assert!(text.contains("unknown field `writeable`"), "{text}");
    }

    #[test]
    fn unsupported_keys_are_refused_by_name() {
        let target = |extra: &str| {
            format!("[[target]]\nname = \"a\"\nkernel = \"k\"\ncommand = \"c\"\n{extra}\n")
        };
        for (extra, expected) in [
            ("image = \"disk.img\"", "vmtest.toml:5:9: `target[0].image`: image targets"),
            ("uefi = true", "vmtest.toml:5:8: `target[0].uefi`: UEFI boot is not supported"),
            ("rootfs = \"/srv/root\"", "vmtest.toml:5:10: `target[0].rootfs`: only rootfs"),
            ("arch = \"aarch64\"", "vmtest.toml:5:8: `target[0].arch`: only arch"),
            ("[target.vm]\nbios = \"b\"", "vmtest.toml:6:8: `target[0].vm.bios`: a custom BIOS"),
            ("[target.vm]\nextra_args = [\"-s\"]", "vmtest.toml:6:14: `target[0].vm.extra_args`"),
            (
                "[target.vm.mounts]\n\"/m\" = { host_path = \"/h\" }",
                "vmtest.toml:5:1: `target[0].vm.mounts`: mounts are not supported",
            ),
            ("[target.vm]\nnum_cpus = 0", "vmtest.toml:6:12: `target[0].vm.num_cpus`: must be"),
            ("[target.vm]\nmemory = \"4T\"", "vmtest.toml:6:10: `target[0].vm.memory`: unknown"),
        ] {
            let text = error_of(&target(extra));
            assert!(text.starts_with(expected), "{extra}: {text}");
        }
        let no_kernel = error_of("[[target]]\nname = \"a\"\ncommand = \"c\"\n");
        assert!(no_kernel.contains("`target[0].kernel`: a target needs `kernel`"), "{no_kernel}");
        let twice = error_of(
            "[[target]]\nname = \"a\"\nkernel = \"k\"\ncommand = \"c\"\n\
             [[target]]\nname = \"a\"\nkernel = \"k\"\ncommand = \"c\"\n",
        );
        assert!(twice.contains("is also target[0]'s"), "{twice}");
        assert!(error_of("").contains("missing field `target`"), "empty file");
    }

    #[test]
    fn memory_sizes_read_like_vmtest() {
        assert_eq!(parse_memory("4G"), Ok(4096));
        assert_eq!(parse_memory("512M"), Ok(512));
        assert_eq!(parse_memory("262144K"), Ok(256));
        assert_eq!(parse_memory("268435456"), Ok(256));
        assert!(parse_memory("1M").is_err());
        assert!(parse_memory("lots").is_err());
    }
}
