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
//!
//! A program with a `loader_source` is loaded by its own user-space loader,
//! built the usual libbpf way (libbpf-bootstrap's): the skeleton of the object,
//! then the loader, static, against the libbpf of the bpftool that wrote the
//! skeleton (the kernel's, see [`crate::guest_image::skeleton_tools`]):
//!
//! ```text
//! bpftool gen skeleton <object> name x_bpf > <cache>/<key>/x.skel.h   (for x.bpf.c)
//! gcc -O2 -g -Wall -static -I<cache>/<key> -I<loader's dir> -I<libbpf>/include
//!     x.c <libbpf>/libbpf.a -lelf -lz -lzstd -o <cache>/<key>/loader
//! ```
//!
//! cached the same way (gcc's `-MD`, and the skeleton regenerated when the
//! object is newer), and put into the guest at
//! `/lib/termlab/programs/<program>.loader`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::guest_image::{
    cache_key, cache_root, skeleton_tools, GuestFile, GuestImageError, KernelBuild, SkeletonTools,
};
use crate::scenario::{
    guest_loader_path, guest_object_path, guest_test_data_path, LoadedScenario, DEFAULT_CLANG,
};

/// clang's flags for a user's source, after `-target bpf`.
pub const BPF_CFLAGS: [&str; 5] =
    ["-O2", "-g", "-Wall", "-D__TARGET_ARCH_x86", "-fno-color-diagnostics"];
/// gcc's flags for a skeleton loader, before its include directories.
const LOADER_CFLAGS: [&str; 5] = ["-O2", "-g", "-Wall", "-static", "-fdiagnostics-color=never"];
/// What a static libbpf.a needs after it: libelf, and the compressors libelf uses.
const LOADER_LIBS: [&str; 3] = ["-lelf", "-lz", "-lzstd"];
/// The multiarch UAPI include directory (asm/ lives there on Debian).
pub const MULTIARCH_INCLUDE: &str = "/usr/include/x86_64-linux-gnu";

#[derive(Debug, Error)]
pub enum UserProgramError {
    #[error("{scenario}: program `{program}`: compiling {}: cannot run {clang} ({source}); install it (apt-get install {clang} libbpf-dev)", path.display())]
    NoClang {
        scenario: String,
        program: String,
        path: PathBuf,
        clang: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{scenario}: program `{program}`: clang failed to compile {}:\n{stderr}", path.display())]
    Compile { scenario: String, program: String, path: PathBuf, stderr: String },
    #[error("{scenario}: program `{program}`: {} includes vmlinux.h, but the kernel {} has no BTF header: CO-RE sources need a kernel with BTF (`[vm] kernel = \"full\"`, `--kernel full`, or a kernel given by path with vmlinux.h beside its bzImage)", path.display(), kernel.display())]
    NoBtfHeader { scenario: String, program: String, path: PathBuf, kernel: PathBuf },
    #[error("{scenario}: program `{program}`: building its loader from {}: {stderr}", path.display())]
    Loader { scenario: String, program: String, path: PathBuf, stderr: String },
    #[error("{scenario}: program `{program}`: {source}")]
    SkeletonTools {
        scenario: String,
        program: String,
        #[source]
        source: GuestImageError,
    },
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
    root: &Path,
    loaded: &LoadedScenario,
    kernel: &KernelBuild,
) -> Result<Vec<GuestFile>, UserProgramError> {
    let cache = cache_root().join("harness/programs");
    let scenario = loaded.path.display().to_string();
    let mut files = Vec::new();
    let mut tools = None;
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
            let object = compile(&cache, &source, kernel.vmlinux_h.as_deref(), program.clang())
                .map_err(|failure| match failure {
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
                })?;
            match &program.loader_source {
                None => files.push(GuestFile { host: object, guest: guest_object_path(name) }),
                Some(loader_source) => {
                    let tools: &SkeletonTools = match &mut tools {
                        Some(tools) => tools,
                        empty => empty.insert(skeleton_tools(root, kernel).map_err(|source| {
                            UserProgramError::SkeletonTools {
                                scenario: scenario.clone(),
                                program: name.to_string(),
                                source,
                            }
                        })?),
                    };
                    let loader_source = loaded.host_path(loader_source.get_ref());
                    let loader = build_loader(&cache, &object, &source, &loader_source, tools)
                        .map_err(|failure| {
                            failure.into_error(&scenario, name.as_str(), &loader_source)
                        })?;
                    files.push(GuestFile { host: loader, guest: guest_loader_path(name) });
                }
            }
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
    /// The clang named could not be run.
    NoClang(String, std::io::Error),
    Compile(String),
    /// bpftool or gcc failed to build a skeleton loader: what they said.
    Loader(String),
    Io(PathBuf, std::io::Error),
}

impl CompileFailure {
    fn into_error(self, scenario: &str, program: &str, path: &Path) -> UserProgramError {
        let (scenario, program, path) = (scenario.to_owned(), program.to_owned(), path.to_owned());
        match self {
            CompileFailure::NoClang(clang, source) => {
                UserProgramError::NoClang { scenario, program, path, clang, source }
            }
            CompileFailure::Compile(stderr) => {
                UserProgramError::Compile { scenario, program, path, stderr }
            }
            CompileFailure::Loader(stderr) => {
                UserProgramError::Loader { scenario, program, path, stderr }
            }
            CompileFailure::Io(path, source) => UserProgramError::Io { path, source },
        }
    }
}

/// Compiles `source` with `clang` (a name on PATH) into `cache` (or reuses the object there)
/// and returns the object; `vmlinux_h`, the kernel's BTF header, is found by
/// `#include "vmlinux.h"` unless the source's directory has its own.
pub fn compile(
    cache: &Path,
    source: &Path,
    vmlinux_h: Option<&Path>,
    clang: &str,
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
    // Objects of the default clang keep the keys they had before it could be chosen.
    if clang != DEFAULT_CLANG {
        hasher.update(b"\0clang=");
        hasher.update(clang.as_bytes());
    }
    let key = cache_key(&hasher.finalize());
    let object = cache.join(format!("{key}.bpf.o"));
    let depfile = cache.join(format!("{key}.d"));
    if is_up_to_date(&object, &depfile) {
        return Ok(object);
    }
    // Written under a temporary name, so a failed or interrupted compile
    // never leaves an object that looks up to date.
    let partial = cache.join(format!("{key}.{}.tmp", std::process::id()));
    let output = Command::new(clang)
        .args(&args)
        .arg("-MD")
        .arg("-MF")
        .arg(&depfile)
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&partial)
        .output()
        .map_err(|e| CompileFailure::NoClang(clang.to_owned(), e))?;
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

/// The names a skeleton of the object compiled from `source` gets the usual way
/// (libbpf-bootstrap's Makefile: `x.bpf.c` → `x.bpf.o` → `x.skel.h`, whose skeleton
/// `bpftool gen skeleton` names `x_bpf` after the object): the header's file name and the
/// skeleton's name.
pub fn skeleton_names(source: &Path) -> (String, String) {
    let file = source.file_name().map(|name| name.to_string_lossy()).unwrap_or_default();
    let object = file.strip_suffix(".c").unwrap_or(&file);
    let header = format!("{}.skel.h", object.strip_suffix(".bpf").unwrap_or(object));
    let name = object.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    (header, name)
}

/// Builds (or reuses) the loader compiled from `loader` around the skeleton of `object`
/// (compiled from `source`), static, with `tools`, and returns it.
pub fn build_loader(
    cache: &Path,
    object: &Path,
    source: &Path,
    loader: &Path,
    tools: &SkeletonTools,
) -> Result<PathBuf, CompileFailure> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e| CompileFailure::Io(path, e)
    };
    let loader = std::path::absolute(loader).map_err(io(loader))?;
    let (header, skeleton) = skeleton_names(source);
    let mut hasher = Sha256::new();
    for part in [object, &loader, &tools.bpftool, &tools.libbpf] {
        hasher.update(part.as_os_str().as_encoded_bytes());
        hasher.update(b"\0");
    }
    hasher.update(skeleton.as_bytes());
    let key = cache_key(&hasher.finalize());
    let dir = cache.join(format!("{key}.loader.d"));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;

    let header = dir.join(header);
    let stale = |built: &Path, inputs: &[&Path]| {
        modified(built).is_none_or(|built| {
            inputs.iter().any(|input| modified(input).is_none_or(|input| input > built))
        })
    };
    if stale(&header, &[object, &tools.bpftool]) {
        let output = Command::new(&tools.bpftool)
            .args(["gen", "skeleton"])
            .arg(object)
            .args(["name", &skeleton])
            .output()
            .map_err(io(&tools.bpftool))?;
        if !output.status.success() {
            return Err(CompileFailure::Loader(format!(
                "`{} gen skeleton` failed:\n{}",
                tools.bpftool.display(),
                String::from_utf8_lossy(&output.stderr).trim_end()
            )));
        }
        write_atomically(&header, &output.stdout).map_err(io(&header))?;
    }

    let binary = dir.join("loader");
    let depfile = dir.join("loader.d");
    let libbpf_a = tools.libbpf.join("libbpf.a");
    if is_up_to_date(&binary, &depfile) && !stale(&binary, &[&libbpf_a]) {
        return Ok(binary);
    }
    let partial = dir.join(format!("loader.{}.tmp", std::process::id()));
    let loader_dir = loader.parent().unwrap_or(Path::new("/"));
    let output = Command::new("gcc")
        .args(LOADER_CFLAGS)
        .arg(format!("-I{}", dir.display()))
        .arg(format!("-I{}", loader_dir.display()))
        .arg(format!("-I{}", tools.libbpf.join("include").display()))
        .args(["-MD", "-MF"])
        .arg(&depfile)
        .arg(&loader)
        .arg(&libbpf_a)
        .args(LOADER_LIBS)
        .arg("-o")
        .arg(&partial)
        .output()
        .map_err(io(Path::new("gcc")))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&binary);
        return Err(CompileFailure::Loader(format!(
            "gcc failed:\n{}",
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    std::fs::rename(&partial, &binary).map_err(io(&binary))?;
    Ok(binary)
}

/// Writes `path` whole or not at all: under a temporary name first.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

/// When `path` was last written, if it exists.
fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Whether `object` exists and is newer than every file its dependency
/// list (clang -MD) names.
fn is_up_to_date(object: &Path, depfile: &Path) -> bool {
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
        let object = compile(&cache, &source, None, DEFAULT_CLANG)
            .unwrap_or_else(|_| panic!("compile failed"));
        let bytes = std::fs::read(&object).expect("object");
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(&bytes[18..20], &[247, 0], "EM_BPF");
        let built = modified(&object).expect("mtime");

        // Unchanged: the same object, not rebuilt.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(compile(&cache, &source, None, DEFAULT_CLANG).ok(), Some(object.clone()));
        assert_eq!(modified(&object), Some(built));

        // A header it includes changed: rebuilt.
        std::fs::write(&header, "#define ANSWER 2\n").expect("header");
        compile(&cache, &source, None, DEFAULT_CLANG)
            .unwrap_or_else(|_| panic!("recompile failed"));
        assert!(modified(&object).expect("mtime") > built);

        // A syntax error: clang's own message with file:line:col, and no object left.
        std::fs::write(&header, "#define ANSWER (\n").expect("header");
        match compile(&cache, &source, None, DEFAULT_CLANG) {
            Err(CompileFailure::Compile(stderr)) => {
                assert!(stderr.contains("count.bpf.c:4:79: error"), "{stderr}")
            }
            _ => panic!("a broken source compiled"),
        }
        assert!(!object.exists(), "a stale object was left behind");
    }

    /// A kptr field's BTF type tag: clang 14 drops it, the clang-19 scripts/setup installs
    /// keeps it (`TYPE_TAG 'kptr'` in the object's BTF), in an object of its own.
    #[test]
    fn a_program_can_name_the_clang_that_keeps_its_type_tags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let source = dir.path().join("kptr.bpf.c");
        std::fs::write(
            &source,
            "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
             struct node { long v; };\nstruct slot { struct node __kptr *node; };\n\
             struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);\n\
             __type(key, int); __type(value, struct slot); } slots SEC(\".maps\");\n\
             SEC(\"tc\") int f(void *ctx) { return 0; }\n\
             char LICENSE[] SEC(\"license\") = \"GPL\";\n",
        )
        .expect("source");
        // Read with the default kernel's bpftool (scripts/setup builds it).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root");
        let kernel = crate::guest_image::find_kernel(root, crate::scenario::KernelVariant::Default)
            .unwrap_or_else(|e| panic!("the default kernel (scripts/setup builds it): {e}"));
        let bpftool = skeleton_tools(root, &kernel).unwrap_or_else(|e| panic!("{e}")).bpftool;
        let type_tags = |object: &Path| {
            let output = Command::new(&bpftool)
                .args(["btf", "dump", "file"])
                .arg(object)
                .output()
                .expect("bpftool runs");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8_lossy(&output.stdout).contains("TYPE_TAG 'kptr'")
        };
        let plain = compile(&cache, &source, None, DEFAULT_CLANG)
            .unwrap_or_else(|_| panic!("clang failed"));
        let tagged = compile(&cache, &source, None, "clang-19")
            .unwrap_or_else(|_| panic!("clang-19 failed"));
        assert_ne!(plain, tagged, "each clang has its own object");
        assert!(!type_tags(&plain), "clang 14 now keeps type tags: drop `clang = \"clang-19\"`");
        assert!(type_tags(&tagged), "clang-19's object has no \"kptr\" type tag");
        match compile(&cache, &source, None, "clang-999") {
            Err(CompileFailure::NoClang(clang, _)) => assert_eq!(clang, "clang-999"),
            _ => panic!("a missing clang was not reported as such"),
        }
    }

    #[test]
    fn skeletons_are_named_the_usual_way() {
        assert_eq!(
            skeleton_names(Path::new("/s/minimal.bpf.c")),
            ("minimal.skel.h".to_owned(), "minimal_bpf".to_owned())
        );
        assert_eq!(
            skeleton_names(Path::new("my-probe.c")),
            ("my-probe.skel.h".to_owned(), "my_probe".to_owned())
        );
    }

    /// With the default kernel's bpftool and libbpf (guest-kernel/build publishes both):
    /// a loader including the skeleton compiles static; a change of the BPF source reaches
    /// the loader (a new skeleton, a new binary); a broken loader is refused with gcc's
    /// file:line:col and leaves no binary behind.
    #[test]
    fn a_skeleton_loader_is_built_static_and_rebuilt_when_its_object_changes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root");
        let kernel = crate::guest_image::find_kernel(root, crate::scenario::KernelVariant::Default)
            .unwrap_or_else(|e| panic!("the default kernel (scripts/setup builds it): {e}"));
        let tools = skeleton_tools(root, &kernel).unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let source = dir.path().join("count.bpf.c");
        let program = |answer: u32| {
            format!(
                "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
                 SEC(\"tracepoint/syscalls/sys_enter_sync\") int count(void *ctx) {{ return {answer}; }}\n\
                 char LICENSE[] SEC(\"license\") = \"GPL\";\n"
            )
        };
        std::fs::write(&source, program(0)).expect("source");
        let loader = dir.path().join("count.c");
        let loader_text = "#include <stdio.h>\n#include \"count.skel.h\"\n\
                           int main(void) { struct count_bpf *skel = count_bpf__open_and_load();\n\
                           if (!skel) return 1;\n\
                           printf(\"prog_fd=%d\\n\", bpf_program__fd(skel->progs.count));\n\
                           count_bpf__destroy(skel); return 0; }\n";
        std::fs::write(&loader, loader_text).expect("loader");
        let build = || {
            let object =
                compile(&cache, &source, None, DEFAULT_CLANG).unwrap_or_else(|_| panic!("compile"));
            build_loader(&cache, &object, &source, &loader, &tools)
        };
        let binary = match build() {
            Ok(binary) => binary,
            Err(CompileFailure::Loader(stderr)) => panic!("{stderr}"),
            Err(_) => panic!("no gcc or bpftool, or an I/O error"),
        };
        let bytes = std::fs::read(&binary).expect("loader binary");
        let needs = crate::scenario::elf::dynamic_needs(&bytes).expect("ELF").expect("an ELF file");
        assert!(needs.is_static(), "{needs:?}");
        let built = modified(&binary).expect("mtime");

        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(build().ok(), Some(binary.clone()), "unchanged: reused");
        assert_eq!(modified(&binary), Some(built));

        // The skeleton embeds the object: a changed program must reach the loader.
        std::fs::write(&source, program(1)).expect("source");
        assert_eq!(build().ok(), Some(binary.clone()));
        assert!(modified(&binary).expect("mtime") > built);

        std::fs::write(&loader, loader_text.replace("return 1;", "return 1")).expect("loader");
        match build() {
            Err(CompileFailure::Loader(stderr)) => {
                assert!(stderr.contains("count.c:4:20: error"), "{stderr}")
            }
            _ => panic!("a broken loader was built"),
        }
        assert!(!binary.exists(), "a stale loader was left behind");
    }

    /// A kernel given by path without a bpftool and libbpf beside it (a user's own build)
    /// gets the default termlab build's pair, never a bpftool of one and a libbpf of another.
    #[test]
    fn a_kernel_without_its_own_tools_builds_skeleton_loaders_with_the_default_build_s() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root");
        let default =
            crate::guest_image::find_kernel(root, crate::scenario::KernelVariant::Default)
                .unwrap_or_else(|e| panic!("the default kernel (scripts/setup builds it): {e}"));
        let mut own = crate::guest_image::find_kernel(root, crate::scenario::KernelVariant::Full)
            .unwrap_or_else(|e| panic!("the full kernel (scripts/setup builds it): {e}"));
        let tools = skeleton_tools(root, &own).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Some(&tools.bpftool), own.bpftool.as_ref(), "the kernel's own bpftool");
        assert_eq!(Some(&tools.libbpf), own.libbpf.as_ref(), "the kernel's own libbpf");

        // Only a bpftool beside it: not paired with a libbpf from elsewhere.
        own.libbpf = None;
        let tools = skeleton_tools(root, &own).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Some(&tools.bpftool), default.bpftool.as_ref());
        assert_eq!(Some(&tools.libbpf), default.libbpf.as_ref());
        assert!(tools.libbpf.join("libbpf.a").is_file(), "{}", tools.libbpf.display());
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
        let object = match compile(&cache, &source, Some(&header), DEFAULT_CLANG) {
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
        match compile(&cache, &source, None, DEFAULT_CLANG) {
            Err(CompileFailure::Compile(stderr)) => {
                assert!(stderr.contains("'vmlinux.h' file not found"), "{stderr}")
            }
            _ => panic!("a CO-RE source compiled without a vmlinux.h"),
        }
    }
}
