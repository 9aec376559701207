//! What of the host the L1 VM sees, and how: the host's `/` read-only (one 9p export with
//! QEMU's `readonly=on`, mounted `ro`), each directory the command must write as a writable
//! 9p export of its own mounted over the same path, and a private tmpfs on `/tmp` (9p cannot
//! hold Unix sockets) with the host directories under `/tmp` the command needs (its working
//! directory, say) bound back over it, read-only unless writable.
//!
//! The plan becomes QEMU `-virtfs` arguments and a shell fragment, `mounts`, that the L1 init
//! runs with the host's root on `/mnt`, the host's `/tmp` still reachable on [`HOST_TMP`], and
//! the tmpfs already on `/mnt/tmp`.

use std::path::{Component, Path, PathBuf};

use crate::error::NestedError;

/// Where the L1 init keeps the host's `/tmp` (read-only) before covering `/mnt/tmp` with the
/// tmpfs: the source of the binds under `/tmp`.
pub const HOST_TMP: &str = "/host-tmp";
/// Where a warm L1 (crate::warm) mounts its writable export of the host's `/`: the source of
/// each job's writable binds. Jobs never see it (each unmounts it in its own namespace).
pub const HOST_RW: &str = "/host-rw";
/// 9p mount options for every export.
const NINEP: &str = "trans=virtio,version=9p2000.L,msize=512000";
/// File systems L1 mounts itself: never a writable export, nor anything inside them.
const L1_OWN: [&str; 3] = ["/proc", "/sys", "/dev"];

/// One mount over the read-only root, at the same path as on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mount {
    /// The writable 9p export with this tag.
    Writable { path: PathBuf, tag: String },
    /// A read-only bind of the host's directory under `/tmp` back over the tmpfs.
    HostTmp { path: PathBuf },
}

impl Mount {
    fn path(&self) -> &Path {
        match self {
            Mount::Writable { path, .. } | Mount::HostTmp { path } => path,
        }
    }
}

/// Where a job's writable directories come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritableSource {
    /// A 9p export of each directory, made for this job's own L1 VM ([`MountPlan::qemu_args`]).
    Exports,
    /// Binds from the warm L1's writable export of the host's `/`, mounted on [`HOST_RW`]
    /// ([`warm_qemu_args`]): a warm L1 serves many jobs, and QEMU cannot add 9p exports to
    /// a running VM.
    HostRw,
}

/// The mounts of one L1 job, in the order they are made (parents before children).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    mounts: Vec<Mount>,
}

impl MountPlan {
    /// `writable`: host directories the command may write (absolute, existing, canonical).
    /// `visible`: host directories that must be reachable at their own path (the working
    /// directory, the program's directory); they are anyway, except under `/tmp`.
    pub fn new(writable: &[PathBuf], visible: &[PathBuf]) -> Result<Self, NestedError> {
        for path in writable {
            check_absolute(path)?;
            // `/` would make everything writable; `/tmp` would lose its tmpfs, and with it
            // the Unix sockets.
            let refused = path == Path::new("/")
                || path == Path::new("/tmp")
                || L1_OWN.iter().any(|p| path.starts_with(p));
            if refused {
                return Err(NestedError::BadMount {
                    path: path.clone(),
                    reason: "the L1 VM cannot give write access to it",
                });
            }
        }
        for path in visible {
            check_absolute(path)?;
            if path == Path::new("/tmp") {
                return Err(NestedError::BadMount {
                    path: path.clone(),
                    reason: "/tmp is a private tmpfs inside the L1 VM; use a directory below it",
                });
            }
        }
        let mut writable: Vec<&PathBuf> = writable.iter().collect();
        writable.sort_by_key(|p| (depth(p), (*p).clone()));
        let mut kept: Vec<&PathBuf> = Vec::new();
        for path in writable {
            // A directory inside a writable export is writable through it already.
            if !kept.iter().any(|k| path.starts_with(k)) {
                kept.push(path);
            }
        }
        let mut mounts: Vec<Mount> = kept
            .iter()
            .enumerate()
            .map(|(i, path)| Mount::Writable { path: (*path).clone(), tag: format!("rw{i}") })
            .collect();
        let mut under_tmp: Vec<&PathBuf> =
            visible.iter().filter(|p| p.starts_with("/tmp")).collect();
        under_tmp.sort_by_key(|p| (depth(p), (*p).clone()));
        for path in under_tmp {
            let covered = mounts.iter().any(|m| path.starts_with(m.path()));
            if !covered {
                mounts.push(Mount::HostTmp { path: path.clone() });
            }
        }
        // Parents first: a bind of /tmp/clone must not cover the export of /tmp/clone/results.
        mounts.sort_by_key(|m| depth(m.path()));
        Ok(Self { mounts })
    }

    /// QEMU arguments: the read-only root export `host` and one writable export per tag.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args = vec![
            "-virtfs".to_owned(),
            "local,path=/,mount_tag=host,security_model=none,id=host,multidevs=remap,readonly=on"
                .to_owned(),
        ];
        for mount in &self.mounts {
            if let Mount::Writable { path, tag } = mount {
                args.push("-virtfs".to_owned());
                // QEMU's option syntax escapes a comma by doubling it.
                let path = path.to_string_lossy().replace(',', ",,");
                args.push(format!(
                    "local,path={path},mount_tag={tag},security_model=none,id={tag},multidevs=remap"
                ));
            }
        }
        args
    }

    /// The shell fragment the L1 init runs (busybox sh, root of the host on `/mnt`). A mount
    /// that fails stops the job with a line on L1's console saying which.
    pub fn script(&self, source: WritableSource) -> String {
        let mut script = String::new();
        for mount in &self.mounts {
            let path = mount.path();
            let target = quote(&format!("/mnt{}", path.display()));
            if path.starts_with("/tmp") {
                script
                    .push_str(&format!("[ -d {target} ] || mkdir -p {target} || fail {target}\n"));
            }
            match (mount, source) {
                (Mount::Writable { tag, .. }, WritableSource::Exports) => script
                    .push_str(&format!("mount -t 9p -o {NINEP} {tag} {target} || fail {target}\n")),
                (Mount::Writable { path, .. }, WritableSource::HostRw) => {
                    let source = quote(&format!("{HOST_RW}{}", path.display()));
                    script.push_str(&format!("mount --bind {source} {target} || fail {target}\n"));
                }
                (Mount::HostTmp { path }, _) => {
                    let below = path.strip_prefix("/tmp").unwrap_or(path);
                    let source = quote(&format!("{HOST_TMP}/{}", below.display()));
                    script.push_str(&format!("mount --bind {source} {target} || fail {target}\n"));
                }
            }
        }
        script
    }

    /// The writable directories, in mount order.
    #[cfg(test)]
    pub fn writable(&self) -> impl Iterator<Item = &Path> {
        self.mounts.iter().filter_map(|m| match m {
            Mount::Writable { path, .. } => Some(path.as_path()),
            Mount::HostTmp { .. } => None,
        })
    }
}

/// The 9p export options the L1 init uses for the root (read-only).
pub fn root_mount_options() -> String {
    format!("ro,{NINEP}")
}

/// The 9p export options of a warm L1's writable export of the host's `/` (tag `hostrw`).
pub fn host_rw_mount_options() -> &'static str {
    NINEP
}

/// QEMU arguments of a warm L1: the read-only root export `host`, as for every L1, and the
/// host's `/` writable as `hostrw`, which only the L1 init mounts (on [`HOST_RW`]); each job
/// gets binds of its own writable directories from there and unmounts it.
pub fn warm_qemu_args() -> Vec<String> {
    let mut args = MountPlan { mounts: Vec::new() }.qemu_args();
    args.push("-virtfs".to_owned());
    args.push(
        "local,path=/,mount_tag=hostrw,security_model=none,id=hostrw,multidevs=remap".to_owned(),
    );
    args
}

fn check_absolute(path: &Path) -> Result<(), NestedError> {
    let plain = path.is_absolute()
        && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let printable = !path.to_string_lossy().contains(['\n', '\0']);
    if plain && printable {
        Ok(())
    } else {
        Err(NestedError::BadMount {
            path: path.to_owned(),
            reason: "not a plain absolute path (no `..`, `.` or newline)",
        })
    }
}

fn depth(path: &Path) -> usize {
    path.components().count()
}

/// POSIX shell single-quoting.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn writable_directories_get_their_own_exports_and_nested_ones_are_merged() {
        let plan = MountPlan::new(
            &paths(&["/work/clone/results", "/run/termlab/l1-jobs/job-1-0", "/work/clone"]),
            &paths(&["/work/clone"]),
        )
        .expect("plan");
        let writable: Vec<&Path> = plan.writable().collect();
        assert_eq!(writable, [Path::new("/work/clone"), Path::new("/run/termlab/l1-jobs/job-1-0")]);
        let args = plan.qemu_args();
        assert!(args[1].ends_with("readonly=on"), "{args:?}");
        assert_eq!(args.len(), 6);
        assert!(args[3].starts_with("local,path=/work/clone,mount_tag=rw0,"), "{args:?}");
        assert!(!args[3].contains("readonly"), "{args:?}");
    }

    #[test]
    fn directories_under_tmp_are_bound_back_parents_first() {
        let plan =
            MountPlan::new(&paths(&["/tmp/clone/results"]), &paths(&["/tmp/clone", "/work/x"]))
                .expect("plan");
        let script = plan.script(WritableSource::Exports);
        let bind = script.find("mount --bind '/host-tmp/clone' '/mnt/tmp/clone'").expect(&script);
        let export = script.find("rw0 '/mnt/tmp/clone/results'").expect(&script);
        assert!(bind < export, "{script}");
        assert!(script.contains("mkdir -p '/mnt/tmp/clone'"), "{script}");
        assert!(!script.contains("/work/x"), "outside /tmp nothing to bind:\n{script}");
    }

    #[test]
    fn a_warm_l1_binds_writable_directories_from_its_writable_root() {
        let plan =
            MountPlan::new(&paths(&["/tmp/clone/results", "/work/r"]), &paths(&["/tmp/clone"]))
                .expect("plan");
        let script = plan.script(WritableSource::HostRw);
        let bind = script.find("mount --bind '/host-tmp/clone' '/mnt/tmp/clone'").expect(&script);
        let results = script
            .find("mount --bind '/host-rw/tmp/clone/results' '/mnt/tmp/clone/results'")
            .expect(&script);
        assert!(bind < results, "{script}");
        assert!(script.contains("mount --bind '/host-rw/work/r' '/mnt/work/r'"), "{script}");
        assert!(!script.contains("-t 9p"), "no export of its own:\n{script}");
        let args = warm_qemu_args();
        assert!(args[1].ends_with("readonly=on"), "{args:?}");
        assert!(args[3].starts_with("local,path=/,mount_tag=hostrw,"), "{args:?}");
        assert_eq!(args.len(), 4);
    }

    #[test]
    fn a_visible_directory_inside_a_writable_one_stays_writable() {
        let plan = MountPlan::new(&paths(&["/tmp/w"]), &paths(&["/tmp/w/cwd"])).expect("plan");
        let script = plan.script(WritableSource::Exports);
        assert!(!script.contains("--bind"), "{script}");
    }

    #[test]
    fn paths_that_cannot_be_exported_are_refused() {
        for bad in ["/", "/tmp", "/proc/1", "/dev", "relative", "/a/../b", "/a\nb"] {
            let result = MountPlan::new(&paths(&[bad]), &[]);
            assert!(matches!(result, Err(NestedError::BadMount { .. })), "{bad}: {result:?}");
        }
        assert!(MountPlan::new(&[], &paths(&["/tmp"])).is_err());
    }

    #[test]
    fn commas_and_quotes_survive() {
        let plan = MountPlan::new(&paths(&["/tmp/a,b/it's"]), &[]).expect("plan");
        assert!(plan.qemu_args()[3].starts_with("local,path=/tmp/a,,b/it's,"));
        let script = plan.script(WritableSource::Exports);
        assert!(script.contains(r"'/mnt/tmp/a,b/it'\''s'"), "{script}");
    }
}
