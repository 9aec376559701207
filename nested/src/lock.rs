//! Advisory whole-file locks (flock), released when dropped or when the process dies.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::NestedError;

pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock is ours; says so on stderr when it has to wait.
    pub fn exclusive(path: &Path) -> Result<Self, NestedError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| NestedError::io("open lock file", path, e))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("termlab-nested: waiting for {} (another L1 job is running)", path.display());
            // SAFETY: as above, blocking variant.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(NestedError::io("lock", path, std::io::Error::last_os_error()));
            }
        }
        Ok(Self { _file: file })
    }
}
