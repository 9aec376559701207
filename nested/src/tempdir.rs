//! Scratch directories that are removed on every exit path, and swept if a previous process
//! died before it could remove its own.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::NestedError;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<parent>/<prefix>-<pid>-<n>`, private (mode 0700), after removing leftovers of
    /// dead processes.
    pub fn new(parent: &Path, prefix: &str) -> Result<Self, NestedError> {
        fs::create_dir_all(parent).map_err(|e| NestedError::io("create", parent, e))?;
        sweep_dead(parent, prefix);
        let name =
            format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = parent.join(name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| NestedError::io("create temp dir", &path, e))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("termlab-nested: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Removes `<prefix>-<pid>-*` directories whose process no longer exists.
fn sweep_dead(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}
