//! Runs real commands through the L1 launcher (QEMU TCG + Debian kernel + 9p root).
//! The first two run with every `cargo test`; the host-safety ones (each another L1 boot,
//! about 20 s) are `#[ignore]`d: `cargo test --release -p termlab-nested --test launcher --
//! --ignored`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use termlab_nested::{
    fail_guest_test, is_nested, run_in_l1, run_test_where_kvm_works, stop_warm_l1s, L1Options,
    NestedError, WARM_ENV,
};

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
    job_dirs_of(std::process::id())
}

fn job_dirs_of(launcher: u32) -> Vec<String> {
    let prefix = format!("job-{launcher}-");
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
    let options = L1Options { timeout: Duration::from_secs(600), ..cold() };
    assert_eq!(run_in_l1(&sh(&script), &options).expect("L1 run"), 7);
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
}

#[test]
fn timeout_kills_the_l1_vm_and_cleans_up() {
    let _serial = one_at_a_time();
    let options = L1Options { timeout: Duration::from_secs(3), ..cold() };
    match run_in_l1(&sh("sleep 600"), &options) {
        Err(NestedError::Timeout(t)) => assert_eq!(t, Duration::from_secs(3)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // What matters after a timeout: no QEMU of ours and no job directory survive.
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
    let survivors = qemus_of(std::process::id());
    assert!(survivors.is_empty(), "QEMU still running: {survivors:?}");
}

/// Pids of the QEMU processes started by the launcher with this pid.
fn qemus_of(launcher: u32) -> Vec<i32> {
    processes_naming(&format!("termlab.job={JOBS_DIR}/job-{launcher}-"))
}

/// Pids of the processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline).contains(needle).then_some(pid)
        })
        .collect()
}

/// A host directory removed when the test ends, however it ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path, name: &str) -> Self {
        Self::at(parent.join(format!("termlab-nested-{name}-{}", std::process::id())))
    }

    /// At a path that is the same inside L1, where the test's process id is another.
    fn at(path: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// The launcher binary, as a user runs it, each job in an L1 VM of its own.
fn launcher() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_termlab-nested"));
    command.args(["--nested", "always"]).env_remove(WARM_ENV);
    command
}

/// Options for a job in an L1 VM of its own, whatever the environment says.
fn cold() -> L1Options {
    L1Options { warm: Some(Duration::ZERO), ..L1Options::default() }
}

#[test]
#[ignore = "boots the L1 VM (about 20 s)"]
fn the_host_is_read_only_in_l1_except_the_writable_directories_and_there_is_no_network() {
    let _serial = one_at_a_time();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_owned();
    let writable = Scratch::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "writable");
    let probe = format!("l1-write-probe-{}", std::process::id());
    // Each check has its own exit status, so a failure says which.
    let script = format!(
        r#"ro() {{ out=$(touch "$1" 2>&1) && return 1; case "$out" in *"Read-only file system"*) ;; *) echo "$out" >&2; return 1;; esac; }}
ro '{repo}/{probe}' || exit 11
ro '/etc/{probe}' || exit 12
ro '/var/cache/{probe}' || exit 13
mkdir '{w}/results' && echo written > '{w}/results/file' || exit 14
test "$(ls /sys/class/net)" = lo || {{ ls /sys/class/net >&2; exit 15; }}
test "$(stat -f -c %T /tmp)" = tmpfs || exit 16
exit 0"#,
        repo = repo.display(),
        w = writable.0.display(),
    );
    let options = L1Options {
        timeout: Duration::from_secs(600),
        writable: vec![writable.0.clone()],
        ..cold()
    };
    assert_eq!(run_in_l1(&sh(&script), &options).expect("L1 run"), 0);
    assert!(!repo.join(&probe).exists() && !Path::new("/etc").join(&probe).exists());
    let results = writable.0.join("results");
    assert_eq!(std::fs::read_to_string(results.join("file")).expect("written in L1"), "written\n");
    assert_eq!(mode(&results), 0o755, "result directories are readable");
    assert_eq!(mode(&results.join("file")), 0o644, "result files are readable");
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
}

/// A token in the host's environment reaches neither the job directory nor the command,
/// and the command's stdout comes back alone, byte for byte, with the L1 console on stderr.
#[test]
#[ignore = "boots the L1 VM (about 20 s)"]
fn tokens_stay_on_the_host_and_stdout_is_the_command_s_alone() {
    let _serial = one_at_a_time();
    let secret = format!("secret-{}", std::process::id());
    let (head, tail) = secret.split_at(7);
    // The secret is spelled in two halves so that the job script does not hold it.
    let script = format!(
        r#"t='{head}''{tail}'; job=$(sed -n 's/.*termlab.job=\([^ ]*\).*/\1/p' /proc/cmdline)
test -d "$job" || {{ echo "no job directory [$job]" >&2; exit 21; }}
! grep -rqs "$t" "$job" || exit 22
! env | grep -q "$t" || exit 23
echo BEGIN; env | sort; echo END; echo to-the-console >&2"#
    );
    let output = launcher()
        .env("CARGO_REGISTRY_TOKEN", &secret)
        .env("GITHUB_TOKEN", &secret)
        .env("TERMLAB_KERNEL_DIR", "/passed-through")
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("run termlab-nested");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"BEGIN"), "{stdout}");
    assert_eq!(lines.last(), Some(&"END"), "{stdout}");
    assert!(
        lines[1..lines.len() - 1].iter().all(|l| l.split_once('=').is_some()),
        "stdout holds more than the command's output:\n{stdout}"
    );
    assert!(!stdout.contains(&secret), "{stdout}");
    assert!(lines.contains(&"TERMLAB_KERNEL_DIR=/passed-through"), "{stdout}");
    assert!(lines.contains(&"TERMLAB_NESTED=1"), "{stdout}");
    assert!(!lines.iter().any(|l| l.starts_with("CARGO_REGISTRY_TOKEN=")), "{stdout}");
    assert!(stderr.contains("to-the-console"), "{stderr}");
}

/// A checkout under the host's /tmp: L1's /tmp is its own tmpfs, yet the working directory
/// shows the host's files and its results directory is writable.
#[test]
#[ignore = "boots the L1 VM (about 20 s)"]
fn a_working_directory_under_the_host_s_tmp_works() {
    let _serial = one_at_a_time();
    let clone = Scratch::new(Path::new("/tmp"), "clone");
    std::fs::write(clone.0.join("marker"), "from the host\n").expect("marker");
    let script = r#"test "$(pwd)" = "$1" || exit 31
test "$(cat marker)" = "from the host" || exit 32
echo written > results/file || exit 33
! touch elsewhere 2>/dev/null || exit 34
test "$(stat -f -c %T /tmp)" = tmpfs || exit 35
echo in-l1"#;
    let output = launcher()
        .current_dir(&clone.0)
        .args(["--writable", "results", "--", "sh", "-c", script, "sh"])
        .arg(&clone.0)
        .output()
        .expect("run termlab-nested");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout, "in-l1\n");
    let written = std::fs::read_to_string(clone.0.join("results/file")).expect("written in L1");
    assert_eq!(written, "written\n");
    assert!(!clone.0.join("elsewhere").exists());
}

/// The launcher killed outright (SIGKILL: no handler runs) takes its QEMU with it.
#[test]
#[ignore = "boots the L1 VM (about 20 s)"]
fn a_killed_launcher_leaves_no_qemu_behind() {
    let _serial = one_at_a_time();
    let mut child = launcher()
        .args(["--", "sh", "-c", "echo started; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run termlab-nested");
    let pid = child.id();
    let mut started = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut started);
    let running = qemus_of(pid);
    child.kill().expect("SIGKILL the launcher");
    child.wait().expect("reap the launcher");
    assert!(matches!(read, Ok(n) if n > 0) && started == "started\n", "{read:?} {started:?}");
    assert_eq!(running.len(), 1, "one QEMU while the command ran: {running:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut survivors = qemus_of(pid);
    while !survivors.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        survivors = qemus_of(pid);
    }
    for &qemu in &survivors {
        // SAFETY: kill(2) of a QEMU the launcher this test started left behind.
        unsafe { libc::kill(qemu, libc::SIGKILL) };
    }
    // The dead launcher's job directory is swept by the next launcher; here, by the test.
    for dir in job_dirs_of(pid) {
        let _ = std::fs::remove_dir_all(Path::new(JOBS_DIR).join(dir));
    }
    assert!(survivors.is_empty(), "QEMU (pids {survivors:?}) outlived its launcher");
}

/// A stalled L1 CPU, as the launcher sees one: its sign-of-life loop stops (here the command
/// stops CPU 1's loop with SIGSTOP; a wedged CPU stops running it). The launcher must end
/// the VM after the stall limit, long before the timeout, name the CPU and leave nothing.
#[test]
#[ignore = "boots the L1 VM (about 20 s) and waits out a 20 s stall limit"]
fn an_l1_cpu_that_stops_beating_ends_the_vm_as_stalled() {
    let _serial = one_at_a_time();
    let options = L1Options {
        timeout: Duration::from_secs(600),
        stall_limit: Duration::from_secs(20),
        ..cold()
    };
    let started = Instant::now();
    match run_in_l1(&sh("pkill -STOP -f 'alive-1$' && sleep 600"), &options) {
        Err(NestedError::L1Stalled { cpu, silent, .. }) => {
            assert_eq!(cpu, 1);
            assert!(silent > options.stall_limit, "{silent:?}");
        }
        other => panic!("expected a stall, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(120), "took {:?}", started.elapsed());
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
    let survivors = qemus_of(std::process::id());
    assert!(survivors.is_empty(), "QEMU still running: {survivors:?}");
}

/// Pids of this host's warm L1 VMs.
fn warm_qemus() -> Vec<i32> {
    processes_naming("termlab.warm=")
}

/// Jobs one after another in a warm L1 (TERMLAB_L1_WARM): the second runs in the same L1
/// yet starts clean (its own /tmp, nothing the first started still running) and sees the
/// host as read-only as ever; a launcher killed during its job does not hold up the next
/// job, which gets a fresh L1 at once; `stop_warm_l1s` leaves no QEMU. It stops every warm
/// L1 of the host, so it runs when no other nested suite does.
#[test]
#[ignore = "boots warm L1 VMs (about 30 s)"]
fn a_warm_l1_runs_one_job_after_another_each_from_a_clean_start() {
    let _serial = one_at_a_time();
    stop_warm_l1s();
    // However the test ends, no warm L1 of it stays behind.
    struct StopWarmL1s;
    impl Drop for StopWarmL1s {
        fn drop(&mut self) {
            stop_warm_l1s();
        }
    }
    let _stop = StopWarmL1s;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_owned();
    let writable = Scratch::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "warm");
    let options = L1Options {
        timeout: Duration::from_secs(600),
        writable: vec![writable.0.clone()],
        warm: Some(Duration::from_secs(60)),
        ..L1Options::default()
    };
    // The first job leaves a process behind that counts on the host: it must die with the job.
    // The job ends once the counter has counted (a fixed sleep was not always long enough in
    // the emulated L1 beside other suites; 10 s at most, then exit 9).
    let first = format!(
        "cat /proc/sys/kernel/random/boot_id > '{w}/boot-id' && touch /tmp/left-by-the-first \
         && {{ setsid sh -c 'n=0; while :; do n=$((n+1)); echo $n > {w}/count; sleep 0.2; done' \
         > /dev/null 2>&1 & }} && i=0 && until [ -s '{w}/count' ]; do i=$((i+1)); \
         [ $i -le 100 ] || exit 9; sleep 0.1; done",
        w = writable.0.display()
    );
    assert_eq!(run_in_l1(&sh(&first), &options).expect("first warm job"), 0);
    let l1 = warm_qemus();
    assert_eq!(l1.len(), 1, "one warm L1 after the first job: {l1:?}");
    let count = || std::fs::read_to_string(writable.0.join("count")).unwrap_or_default();
    let counted = count();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!counted.is_empty(), "the first job's counter never ran");
    assert_eq!(count(), counted, "a process of the first job outlived it");
    let probe = format!("l1-warm-write-probe-{}", std::process::id());
    let second = format!(
        r#"test "$(cat /proc/sys/kernel/random/boot_id)" = "$(cat '{w}/boot-id')" || exit 41
test ! -e /tmp/left-by-the-first || exit 42
out=$(touch '{repo}/{probe}' 2>&1) && exit 44
case "$out" in *"Read-only file system"*) ;; *) echo "$out" >&2; exit 45;; esac
echo second > '{w}/second' || exit 46
test "$(stat -f -c %T /tmp)" = tmpfs || exit 47"#,
        w = writable.0.display(),
        repo = repo.display(),
    );
    assert_eq!(run_in_l1(&sh(&second), &options).expect("second warm job"), 0);
    assert_eq!(warm_qemus(), l1, "the second job ran in the first one's L1");
    assert_eq!(std::fs::read_to_string(writable.0.join("second")).expect("written"), "second\n");
    assert!(!repo.join(&probe).exists());

    let mut child = launcher()
        .env(WARM_ENV, "60")
        .args(["--", "sh", "-c", "echo started; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run termlab-nested");
    let mut started = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut started);
    child.kill().expect("SIGKILL the launcher");
    child.wait().expect("reap the launcher");
    assert!(matches!(read, Ok(n) if n > 0) && started == "started\n", "{read:?} {started:?}");
    assert_eq!(warm_qemus(), l1, "the killed launcher's job ran in the same warm L1");
    assert_eq!(run_in_l1(&sh("true"), &options).expect("a job after the killed one"), 0);
    let fresh = warm_qemus();
    assert!(
        fresh.len() == 1 && fresh != l1,
        "a fresh L1 replaced the busy one: {l1:?} -> {fresh:?}"
    );
    for dir in job_dirs_of(child.id()) {
        let _ = std::fs::remove_dir_all(Path::new(JOBS_DIR).join(dir));
    }
    assert_eq!(stop_warm_l1s(), 1);
    assert!(warm_qemus().is_empty(), "warm L1 left running: {:?}", warm_qemus());
    assert!(my_job_dirs().is_empty(), "job directory left behind: {:?}", my_job_dirs());
}

/// A test whose nested guest triple-faulted exits inside L1 as [`fail_guest_test`] makes it
/// (the emulated host failed); the host runs it again, and its second try's pass is the
/// test's. Here the first try fails that way on purpose and the second passes: two tries.
#[test]
#[ignore = "boots the L1 VM twice (about 25 s)"]
fn a_test_whose_emulated_host_failed_is_tried_once_more() {
    let name = "a_test_whose_emulated_host_failed_is_tried_once_more";
    let tries = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if is_nested() {
        let first = std::fs::read_dir(&tries).expect("tries directory").next().is_none();
        let try_file = tries.join(if first { "first" } else { "second" });
        std::fs::write(try_file, "").expect("record the try");
        if first {
            fail_guest_test(true, "the first try stands in for a nested guest's triple fault");
        }
        return;
    }
    let _serial = one_at_a_time();
    let _scratch = Scratch::at(tries.clone());
    let options =
        L1Options { timeout: Duration::from_secs(300), writable: vec![tries.clone()], ..cold() };
    assert!(!run_test_where_kvm_works(name, &options), "this host cannot run it itself");
    let mut seen: Vec<String> = std::fs::read_dir(&tries)
        .expect("tries directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["first", "second"], "tries recorded inside L1");
}
