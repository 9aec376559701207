//! Runs real commands through the L1 launcher (QEMU TCG + Debian kernel + 9p root).

use std::ffi::OsString;
use std::time::Duration;

use termlab_nested::{run_in_l1, L1Options, NestedError};

const JOBS_DIR: &str = "/run/termlab/l1-jobs";

/// The tests share one process id, so each would see the other's job directory (`job-<pid>-<n>`)
/// when it checks for its own leftovers while the other runs: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sh(script: &str) -> Vec<OsString> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn my_job_dirs() -> Vec<String> {
    let prefix = format!("job-{}-", std::process::id());
    std::fs::read_dir(JOBS_DIR)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn command_runs_in_l1_with_real_kvm_and_its_exit_status_comes_back() {
    let _serial = one_at_a_time();
    let cwd = std::env::current_dir().expect("cwd");
    // Every condition the job relies on, checked inside L1; 7 only if all hold.
    let script = format!(
        "test \"$TERMLAB_NESTED\" = 1 && test \"$(pwd)\" = '{}' && test -c /dev/kvm && \
         grep -qw svm /proc/cpuinfo && echo inside-l1 && exit 7; exit 1",
        cwd.display()
    );
    let options = L1Options { timeout: Duration::from_secs(600), ..L1Options::default() };
    assert_eq!(run_in_l1(&sh(&script), &options).expect("L1 run"), 7);
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
}

#[test]
fn timeout_kills_the_l1_vm_and_cleans_up() {
    let _serial = one_at_a_time();
    let options = L1Options { timeout: Duration::from_secs(3), ..L1Options::default() };
    match run_in_l1(&sh("sleep 600"), &options) {
        Err(NestedError::Timeout(t)) => assert_eq!(t, Duration::from_secs(3)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // What matters after a timeout: no QEMU of ours and no job directory survive.
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
    let ours = format!("termlab.job={JOBS_DIR}/job-{}-", std::process::id());
    let survivors: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&ours))
        .collect();
    assert!(survivors.is_empty(), "QEMU still running: {survivors:?}");
}
