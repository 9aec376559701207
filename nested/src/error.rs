use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::probe::KvmUnusable;

#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    #[error("/dev/kvm cannot run an ordinary guest ({0}) and --nested never was given")]
    KvmUnusable(KvmUnusable),
    #[error("running nested (TERMLAB_NESTED=1) but the L1 VM's KVM is unusable too: {0}")]
    NestedKvmUnusable(KvmUnusable),
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} failed ({status})")]
    CommandFailed { what: String, status: String },
    #[error("cannot get the L1 kernel: {0}")]
    KernelPackage(String),
    #[error("the L1 job did not finish within {0:?}")]
    Timeout(Duration),
    #[error("interrupted by signal {0}; the L1 VM was killed")]
    Interrupted(i32),
    #[error("the L1 VM ended without running the command (QEMU: {qemu_status}; {cause}){}", console_tail_text(.console_tail))]
    L1Failed { qemu_status: String, cause: &'static str, console_tail: Vec<String> },
    #[error("the L1 VM started but could not start the command: {0}")]
    JobSetup(String),
    #[error("cannot share {} with the L1 VM: {reason}", .path.display())]
    BadMount { path: PathBuf, reason: &'static str },
    #[error("unknown nested mode {0:?} (expected auto, always or never)")]
    BadMode(String),
}

fn console_tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; the end of its console:\n  {}", tail.join("\n  "))
    }
}

impl NestedError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { what, path: path.to_owned(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scripts/test retries a nested suite whose L1 VM crashed by finding this error's text
    /// (L1_CRASHED in scripts/lib/suite-group.sh): the two must not drift apart.
    #[test]
    fn the_test_runner_recognises_an_l1_crash_by_this_text() {
        let runner = include_str!("../../scripts/lib/suite-group.sh");
        let marker = runner
            .lines()
            .find_map(|line| line.strip_prefix("readonly L1_CRASHED=\""))
            .and_then(|rest| rest.strip_suffix('"'))
            .expect("L1_CRASHED in scripts/lib/suite-group.sh");
        let error = NestedError::L1Failed {
            qemu_status: "exit status: 0".into(),
            cause: "",
            console_tail: vec![],
        };
        assert!(error.to_string().contains(marker), "{error} / {marker}");
    }
}
