//! Advisory whole-file locks (flock), released when dropped or when the process dies.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::NestedError;

/// How often [`FileLock::one_of`] looks for a free slot while all are taken.
const SLOT_POLL: Duration = Duration::from_millis(200);

pub struct FileLock {
    _file: File,
    slot: usize,
}

impl FileLock {
    /// Blocks until the lock is ours; says so on stderr when it has to wait.
    pub fn exclusive(path: &Path) -> Result<Self, NestedError> {
        let file = open(path)?;
        if !try_lock(&file) {
            eprintln!("termlab-nested: waiting for {} (another job holds it)", path.display());
            // SAFETY: flock on an fd we own, blocking.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(NestedError::io("lock", path, std::io::Error::last_os_error()));
            }
        }
        Ok(Self { _file: file, slot: 0 })
    }

    /// The first free one of `slots` locks (`path`, then `path.1`, `path.2`, ...), waiting
    /// until one is free; says so on stderr when it has to wait. `slots` is at least 1.
    pub fn one_of(path: &Path, slots: usize) -> Result<Self, NestedError> {
        let paths = slot_paths(path, slots);
        let files = paths.iter().map(|p| open(p)).collect::<Result<Vec<_>, _>>()?;
        let mut said = false;
        loop {
            if let Some(index) = files.iter().position(try_lock) {
                let file = files.into_iter().nth(index).expect("a lock file per slot");
                return Ok(Self { _file: file, slot: index });
            }
            if !said {
                eprintln!(
                    "termlab-nested: waiting for {} (all {} taken by other jobs)",
                    path.display(),
                    paths.len()
                );
                said = true;
            }
            std::thread::sleep(SLOT_POLL);
        }
    }

    /// Which of [`FileLock::one_of`]'s slots this is (0 for `path` itself).
    pub fn slot(&self) -> usize {
        self.slot
    }
}

fn slot_paths(path: &Path, slots: usize) -> Vec<PathBuf> {
    let mut paths = vec![path.to_owned()];
    for slot in 1..slots {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{slot}"));
        paths.push(name.into());
    }
    paths
}

fn open(path: &Path) -> Result<File, NestedError> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| NestedError::io("open lock file", path, e))
}

fn try_lock(file: &File) -> bool {
    // SAFETY: flock on an fd we own, without blocking.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_slot_is_taken_while_the_first_is_held_and_freed_on_drop() {
        let dir =
            crate::tempdir::TempDir::new(&std::env::temp_dir(), "lock-test").expect("temp dir");
        let path = dir.path().join("l1.lock");
        let first = FileLock::one_of(&path, 2).expect("first slot");
        let second = FileLock::one_of(&path, 2).expect("second slot");
        assert!(dir.path().join("l1.lock.1").is_file());
        assert_eq!((first.slot(), second.slot()), (0, 1));
        // Both slots are taken: a third job waits until one is dropped.
        let waiter = std::thread::spawn(move || FileLock::one_of(&path, 2).map(|_| ()));
        std::thread::sleep(SLOT_POLL * 3);
        assert!(!waiter.is_finished(), "a third job got a slot while both were held");
        drop(second);
        waiter.join().expect("waiter").expect("a slot after the drop");
        drop(first);
    }
}
