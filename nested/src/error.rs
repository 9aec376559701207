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
    #[error("the L1 VM stalled and was killed: its CPU {cpu} gave no sign of life for {} s{}", .silent.as_secs(), console_tail_text(.console_tail))]
    L1Stalled { cpu: u32, silent: Duration, console_tail: Vec<String> },
    #[error("the L1 VM started but could not start the command: {0}")]
    JobSetup(String),
    #[error("cannot share {} with the L1 VM: {reason}", .path.display())]
    BadMount { path: PathBuf, reason: &'static str },
    #[error("unknown nested mode {0:?} (expected auto, always or never)")]
    BadMode(String),
    #[error("TERMLAB_L1_SLOTS={value:?}: expected a number of L1 VMs from 1 to {max}")]
    BadL1Slots { value: String, max: usize },
    #[error("TERMLAB_L1_WARM={value:?}: expected the idle seconds after which a warm L1 VM stops, 0 (none) to {max}")]
    BadWarmIdle { value: String, max: u64 },
}

fn console_tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; the end of its console:\n  {}", tail.join("\n  "))
    }
}

impl NestedError {
    /// True when the L1 VM crashed or stalled under the command: the emulated host failed,
    /// the command may not even have started.
    pub fn is_l1_failure(&self) -> bool {
        matches!(self, Self::L1Failed { .. } | Self::L1Stalled { .. })
    }

    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { what, path: path.to_owned(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The marker `name` in scripts/lib/suite-group.sh.
    fn runner_marker(name: &str) -> &'static str {
        let runner = include_str!("../../scripts/lib/suite-group.sh");
        let prefix = format!("readonly {name}=\"");
        runner
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{name} in scripts/lib/suite-group.sh"))
    }

    /// scripts/test retries a nested suite whose L1 VM crashed or stalled by finding these
    /// errors' texts (L1_CRASHED, L1_STALLED in scripts/lib/suite-group.sh): they must not
    /// drift apart.
    #[test]
    fn the_test_runner_recognises_a_failed_l1_by_these_texts() {
        let crashed = NestedError::L1Failed {
            qemu_status: "exit status: 0".into(),
            cause: "",
            console_tail: vec![],
        };
        let stalled = NestedError::L1Stalled {
            cpu: 1,
            silent: Duration::from_secs(151),
            console_tail: vec![],
        };
        for (error, marker) in [(crashed, "L1_CRASHED"), (stalled, "L1_STALLED")] {
            let marker = runner_marker(marker);
            assert!(error.to_string().contains(marker), "{error} / {marker}");
        }
    }
}
