//! Users' own BPF programs and files for the guest: compiles `[[program]]
//! source = "x.bpf.c"` on the host and lists what the scenario puts into
//! the guest image (program objects, test data, `[vm] files`).
//!
//! Sources are compiled with the host's clang for the guest kernel. The
//! UAPI headers (`linux/bpf.h`, `linux/types.h`, from linux-libc-dev) and
//! libbpf's `bpf/bpf_helpers.h`, `bpf_tracing.h`, `bpf_core_read.h`
//! (libbpf-dev) work, as do headers beside the source. A kernel with BTF
//! (the `full` variant, or a user's kernel with vmlinux.h beside it) also
//! gives its `vmlinux.h`, for CO-RE programs written the usual way; the
//! default variant has no BTF, so a source that includes vmlinux.h is
//! refused there with that reason:
//!
//! ```text
//! clang -target bpf -O2 -g -Wall -D__TARGET_ARCH_x86 -I<source dir>
//!       [-I<dir of the kernel's vmlinux.h>] -I/usr/include/x86_64-linux-gnu
//!       -c x.bpf.c -o <cache>/<key>.bpf.o
//! ```
//!
//! The object is cached under `<cache>/harness/programs/` with clang's
//! dependency list (`-MD`): it is rebuilt when the source or any header it
//! included changed, like make would, and not rebuilt inside the nested L1
//! VM, where the host prepared it before nesting.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::guest_image::{cache_root, GuestFile, KernelBuild};
use crate::scenario::{guest_object_path, guest_test_data_path, LoadedScenario};

/// clang's flags for a user's source, after `-target bpf`.
pub const BPF_CFLAGS: [&str; 5] =
    ["-O2", "-g", "-Wall", "-D__TARGET_ARCH_x86", "-fno-color-diagnostics"];
/// The multiarch UAPI include directory (asm/ lives there on Debian).
pub const MULTIARCH_INCLUDE: &str = "/usr/include/x86_64-linux-gnu";

#[derive(Debug, Error)]
pub enum UserProgramError {
    #[error("{scenario}: program `{program}`: compiling {}: cannot run clang ({source}); install clang (apt-get install clang libbpf-dev)", path.display())]
    NoClang {
        scenario: String,
        program: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{scenario}: program `{program}`: clang failed to compile {}:\n{stderr}", path.display())]
    Compile { scenario: String, program: String, path: PathBuf, stderr: String },
    #[error("{scenario}: program `{program}`: {} includes vmlinux.h, but the kernel {} has no BTF header: CO-RE sources need a kernel with BTF (`[vm] kernel = \"full\"`, `--kernel full`, or a kernel given by path with vmlinux.h beside its bzImage)", path.display(), kernel.display())]
    NoBtfHeader { scenario: String, program: String, path: PathBuf, kernel: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the scenario adds to the guest image, its program objects
/// compiled first (for `kernel`) where it gives sources. Sorted by guest path.
pub fn guest_files(
    loaded: &LoadedScenario,
    kernel: &KernelBuild,
) -> Result<Vec<GuestFile>, UserProgramError> {
    let cache = cache_root().join("harness/programs");
    let scenario = loaded.path.display().to_string();
    let mut files = Vec::new();
    for program in &loaded.scenario.programs {
        let name = program.name.get_ref();
        if let Some(object) = &program.object {
            files.push(GuestFile {
                host: loaded.host_path(object.get_ref()),
                guest: guest_object_path(name),
            });
        }
        if let Some(source) = &program.source {
            let source = loaded.host_path(source.get_ref());
            let object =
                compile(&cache, &source, kernel.vmlinux_h.as_deref()).map_err(|failure| {
                    match failure {
                        CompileFailure::Compile(stderr)
                            if kernel.vmlinux_h.is_none()
                                && stderr.contains("'vmlinux.h' file not found") =>
                        {
                            UserProgramError::NoBtfHeader {
                                scenario: scenario.clone(),
                                program: name.to_string(),
                                path: source.clone(),
                                kernel: kernel.bzimage.clone(),
                            }
                        }
                        failure => failure.into_error(&scenario, name.as_str(), &source),
                    }
                })?;
            files.push(GuestFile { host: object, guest: guest_object_path(name) });
        }
        if let Some(data) = program.test_run.as_ref().and_then(|t| t.get_ref().data_file.as_ref()) {
            files.push(GuestFile {
                host: loaded.host_path(data.get_ref()),
                guest: guest_test_data_path(name),
            });
        }
    }
    for file in &loaded.scenario.vm.files {
        files.push(GuestFile {
            host: loaded.host_path(file.host.get_ref()),
            guest: file.guest.get_ref().clone(),
        });
    }
    files.sort_by(|a, b| a.guest.cmp(&b.guest));
    Ok(files)
}

/// Why a compile failed, before it is told which scenario and program it was for.
pub enum CompileFailure {
    NoClang(std::io::Error),
    Compile(String),
    Io(PathBuf, std::io::Error),
}

impl CompileFailure {
    fn into_error(self, scenario: &str, program: &str, path: &Path) -> UserProgramError {
        let (scenario, program, path) = (scenario.to_owned(), program.to_owned(), path.to_owned());
        match self {
            CompileFailure::NoClang(source) => {
                UserProgramError::NoClang { scenario, program, path, source }
            }
            CompileFailure::Compile(stderr) => {
                UserProgramError::Compile { scenario, program, path, stderr }
            }
            CompileFailure::Io(path, source) => UserProgramError::Io { path, source },
        }
    }
}

/// Compiles `source` into `cache` (or reuses the object there) and returns
/// the object; `vmlinux_h`, the kernel's BTF header, is found by
/// `#include "vmlinux.h"` unless the source's directory has its own.
pub fn compile(
    cache: &Path,
    source: &Path,
    vmlinux_h: Option<&Path>,
) -> Result<PathBuf, CompileFailure> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e| CompileFailure::Io(path, e)
    };
    let source = std::path::absolute(source).map_err(io(source))?;
    let source_dir = source.parent().unwrap_or(Path::new("/")).to_owned();
    let mut args: Vec<String> = vec!["-target".into(), "bpf".into()];
    args.extend(BPF_CFLAGS.iter().map(|flag| flag.to_string()));
    args.push(format!("-I{}", source_dir.display()));
    if let Some(header_dir) = vmlinux_h.and_then(Path::parent) {
        args.push(format!("-I{}", header_dir.display()));
    }
    args.push(format!("-I{MULTIARCH_INCLUDE}"));

    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let mut hasher = Sha256::new();
    hasher.update(source.as_os_str().as_encoded_bytes());
    for arg in &args {
        hasher.update(b"\0");
        hasher.update(arg.as_bytes());
    }
    let key: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let object = cache.join(format!("{key}.bpf.o"));
    let depfile = cache.join(format!("{key}.d"));
    if is_up_to_date(&object, &depfile) {
        return Ok(object);
    }
    // Written under a temporary name, so a failed or interrupted compile
    // never leaves an object that looks up to date.
    let partial = cache.join(format!("{key}.{}.tmp", std::process::id()));
    let output = Command::new("clang")
        .args(&args)
        .arg("-MD")
        .arg("-MF")
        .arg(&depfile)
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&partial)
        .output()
        .map_err(CompileFailure::NoClang)?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&object);
        return Err(CompileFailure::Compile(
            String::from_utf8_lossy(&output.stderr).trim_end().to_owned(),
        ));
    }
    std::fs::rename(&partial, &object).map_err(io(&object))?;
    Ok(object)
}

/// Whether `object` exists and is newer than every file its dependency
/// list (clang -MD) names.
fn is_up_to_date(object: &Path, depfile: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let (Some(built), Ok(deps)) = (modified(object), std::fs::read_to_string(depfile)) else {
        return false;
    };
    let inputs = dependency_paths(&deps);
    !inputs.is_empty()
        && inputs.iter().all(|input| modified(Path::new(input)).is_some_and(|m| m <= built))
}

/// The prerequisites of a make rule as clang -MD writes it: `target: a b \`
/// continued lines, spaces in names escaped with a backslash.
fn dependency_paths(rule: &str) -> Vec<String> {
    let joined = rule.replace("\\\n", " ");
    let Some((_, prerequisites)) = joined.split_once(": ") else { return Vec::new() };
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = prerequisites.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    paths.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(current);
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_lists_are_read_like_make() {
        let rule = "/c/ab.bpf.o: /src/x.bpf.c /src/my\\ dir/h.h \\\n  /usr/include/linux/bpf.h\n";
        assert_eq!(
            dependency_paths(rule),
            ["/src/x.bpf.c", "/src/my dir/h.h", "/usr/include/linux/bpf.h"]
        );
        assert!(dependency_paths("garbage").is_empty());
    }

    #[test]
    fn a_source_is_compiled_once_and_again_when_a_header_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let source = dir.path().join("count.bpf.c");
        let header = dir.path().join("count.h");
        std::fs::write(&header, "#define ANSWER 1\n").expect("header");
        std::fs::write(
            &source,
            "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n#include \"count.h\"\n\
             SEC(\"tracepoint/syscalls/sys_enter_sync\") int count(void *ctx) { return ANSWER; }\n\
             char LICENSE[] SEC(\"license\") = \"GPL\";\n",
        )
        .expect("source");
        let object = compile(&cache, &source, None).unwrap_or_else(|_| panic!("compile failed"));
        let bytes = std::fs::read(&object).expect("object");
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(&bytes[18..20], &[247, 0], "EM_BPF");
        let built = std::fs::metadata(&object).and_then(|m| m.modified()).expect("mtime");

        // Unchanged: the same object, not rebuilt.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(compile(&cache, &source, None).ok(), Some(object.clone()));
        assert_eq!(std::fs::metadata(&object).and_then(|m| m.modified()).ok(), Some(built));

        // A header it includes changed: rebuilt.
        std::fs::write(&header, "#define ANSWER 2\n").expect("header");
        compile(&cache, &source, None).unwrap_or_else(|_| panic!("recompile failed"));
        assert!(std::fs::metadata(&object).and_then(|m| m.modified()).expect("mtime") > built);

        // A syntax error: clang's own message with file:line:col, and no object left.
        std::fs::write(&header, "#define ANSWER (\n").expect("header");
        match compile(&cache, &source, None) {
            Err(CompileFailure::Compile(stderr)) => {
                assert!(stderr.contains("count.bpf.c:4:79: error"), "{stderr}")
            }
            _ => panic!("a broken source compiled"),
        }
        assert!(!object.exists(), "a stale object was left behind");
    }

    #[test]
    fn a_co_re_source_finds_the_kernel_s_vmlinux_h_and_only_that_kernel_s() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let kernel = dir.path().join("kernel");
        std::fs::create_dir(&kernel).expect("kernel dir");
        let header = kernel.join("vmlinux.h");
        std::fs::write(
            &header,
            "#include <linux/types.h>\n\
             struct task_struct { int pid; int tgid; } __attribute__((preserve_access_index));\n",
        )
        .expect("header");
        let source = dir.path().join("tgid.bpf.c");
        std::fs::write(
            &source,
            "#include \"vmlinux.h\"\n#include <bpf/bpf_helpers.h>\n#include <bpf/bpf_core_read.h>\n\
             __u32 tgid;\n\
             SEC(\"kprobe/ksys_sync\") int probe(void *ctx) {\n\
               struct task_struct *task = (void *)bpf_get_current_task();\n\
               tgid = BPF_CORE_READ(task, tgid); return 0; }\n\
             char LICENSE[] SEC(\"license\") = \"GPL\";\n",
        )
        .expect("source");
        let object = match compile(&cache, &source, Some(&header)) {
            Ok(object) => object,
            Err(CompileFailure::Compile(stderr)) => panic!("with the kernel's header: {stderr}"),
            Err(_) => panic!("with the kernel's header: no clang, or an I/O error"),
        };
        // The CO-RE relocation is recorded for libbpf to resolve against the guest's BTF.
        let bytes = std::fs::read(&object).expect("object");
        assert!(bytes.windows(8).any(|w| w == b".BTF.ext"), "no .BTF.ext section");
        assert!(bytes.windows(11).any(|w| w == b"task_struct"), "no task_struct in its BTF");

        // A kernel without BTF has no header to give: clang says so, and guest_files turns
        // that into the reason.
        match compile(&cache, &source, None) {
            Err(CompileFailure::Compile(stderr)) => {
                assert!(stderr.contains("'vmlinux.h' file not found"), "{stderr}")
            }
            _ => panic!("a CO-RE source compiled without a vmlinux.h"),
        }
    }
}
