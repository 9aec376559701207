//! termlab-nested: making sure commands that need KVM get a KVM that can run Linux.
//!
//! Some hosts expose a `/dev/kvm` that cannot run an ordinary guest (paravirtual-only
//! kvm-pvm; or no /dev/kvm at all on machines without VT-x/SVM). [`probe::probe_kvm`] finds
//! out in a few seconds, and [`ensure_real_kvm_or_reexec`] then re-runs the command inside
//! an "L1" VM (QEMU TCG emulating SVM) where KVM is real. The re-run command sees
//! `TERMLAB_NESTED=1` ([`is_nested`]) so results can record it.
//!
//! Inside L1 the host's `/` is the root (over virtio-9p), read-only except the directories
//! named in [`L1Options::writable`] and the job's own directory. `/tmp` is a fresh tmpfs
//! because 9p cannot hold Unix sockets (vsock sockets, for one); the working directory and
//! the writable directories are visible at their own paths there too, so a checkout under
//! the host's `/tmp` works. L1 has no network device. The command's stdout comes back on
//! the launcher's stdout unchanged; the L1 console (with the command's stderr) on stderr.

pub mod cpio;
mod error;
mod heartbeat;
mod image;
mod job;
mod launch;
mod lock;
mod mounts;
pub mod probe;
mod pvh;
mod tempdir;
mod warm;

use std::ffi::OsString;
use std::fmt;
use std::str::FromStr;

pub use error::NestedError;
pub use job::PASSED_ENV;
pub use launch::{run_in_l1, L1Options};
pub use lock::FileLock;
pub use warm::{stop_warm_l1s, WARM_ENV};

/// Set to `1` in the environment of a command re-executed inside L1.
pub const NESTED_ENV: &str = "TERMLAB_NESTED";

/// `--nested auto|always|never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NestedMode {
    /// Run here when /dev/kvm can run Linux, otherwise inside L1.
    #[default]
    Auto,
    /// Always run inside L1 (e.g. to compare with the nested numbers).
    Always,
    /// Never nest; fail if /dev/kvm cannot run Linux.
    Never,
}

impl FromStr for NestedMode {
    type Err = NestedError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            other => Err(NestedError::BadMode(other.to_owned())),
        }
    }
}

impl fmt::Display for NestedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Never => "never",
        })
    }
}

/// What the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmPlan {
    /// KVM here can run Linux: go ahead in this process. `nested` says whether "here" is
    /// already inside an L1 VM.
    RunHere { nested: bool },
    /// The command was run to completion inside L1; exit with this code.
    RanInL1 { exit_code: i32 },
}

/// True inside a command re-executed by [`ensure_real_kvm_or_reexec`].
pub fn is_nested() -> bool {
    std::env::var_os(NESTED_ENV).is_some_and(|v| v == "1")
}

/// Decides where a KVM-using command runs. `argv` (program first) is what runs inside L1.
pub fn ensure_real_kvm_or_reexec(
    mode: NestedMode,
    argv: &[OsString],
) -> Result<KvmPlan, NestedError> {
    ensure_real_kvm_or_reexec_with(mode, argv, &L1Options::default())
}

/// [`ensure_real_kvm_or_reexec`] with explicit L1 sizing.
pub fn ensure_real_kvm_or_reexec_with(
    mode: NestedMode,
    argv: &[OsString],
    options: &L1Options,
) -> Result<KvmPlan, NestedError> {
    if is_nested() {
        // Never nest twice: inside L1 KVM must work.
        return probe::probe_kvm()
            .map(|_| KvmPlan::RunHere { nested: true })
            .map_err(NestedError::NestedKvmUnusable);
    }
    let reexec = |reason: Option<probe::KvmUnusable>| {
        if let Some(reason) = reason {
            eprintln!("termlab-nested: {reason}; re-running inside an L1 VM with real KVM");
        }
        run_in_l1(argv, options).map(|exit_code| KvmPlan::RanInL1 { exit_code })
    };
    match mode {
        NestedMode::Always => reexec(None),
        NestedMode::Never => probe::probe_kvm()
            .map(|_| KvmPlan::RunHere { nested: false })
            .map_err(NestedError::KvmUnusable),
        NestedMode::Auto => match probe::probe_kvm() {
            Ok(_) => Ok(KvmPlan::RunHere { nested: false }),
            Err(reason) => reexec(Some(reason)),
        },
    }
}

/// The exit status with which a test run inside L1 says that the emulated host failed under
/// it, not the test: a nested guest's vCPU triple-faulted (README, open problems: the
/// nested paging that QEMU TCG emulates for L1's KVM). [`run_test_where_kvm_works`] tries
/// such a test again.
pub const EMULATED_HOST_FAILED: i32 = 75;

/// How many times [`run_test_where_kvm_works`] runs a test whose emulated host failed under
/// it. The VMM's vector stress, which pauses the VM 20 times a second, met that failure twice
/// in a row in four CI dry runs in a row (2026-12-05), and each time the whole rust suite ran
/// again; a third try of the one test costs about 25 s.
const TEST_TRIES: u32 = 3;

/// Ends a failing test that booted a guest. `report` says how it failed. A nested guest's
/// triple fault (`triple_fault` inside L1) is the emulated host's (README, open problems): the
/// test says so by exiting with [`EMULATED_HOST_FAILED`], and [`run_test_where_kvm_works`] on
/// the host tries it again. Anything else panics with `report`.
pub fn fail_guest_test(triple_fault: bool, report: &str) -> ! {
    if triple_fault && is_nested() {
        eprintln!("{report}\n(nested: a vCPU triple-faulted, the emulated host failed)");
        std::process::exit(EMULATED_HOST_FAILED);
    }
    panic!("{report}");
}

/// For a test in a test binary that needs KVM able to run Linux: true when this process can
/// run the test body. Otherwise runs this one test again inside an L1 VM, asserts that it
/// passed there and returns false. An L1 VM that crashed or stalled under the test (the
/// emulated host failing, not the test: [`NestedError::is_l1_failure`]), or a test that
/// exited with [`EMULATED_HOST_FAILED`] there, is tried again, up to [`TEST_TRIES`] tries in
/// all; the last such failure panics with the launcher's own words, which scripts/test
/// recognises.
pub fn run_test_where_kvm_works(test_name: &str, options: &L1Options) -> bool {
    let argv: Vec<OsString> = vec![
        std::env::current_exe().expect("test binary path").into(),
        test_name.into(),
        "--exact".into(),
        "--nocapture".into(),
        // An `#[ignore]`d test got here only because it was asked for by name or with
        // --ignored: its body runs inside L1 all the same.
        "--include-ignored".into(),
    ];
    let mut tries = 1;
    let plan = loop {
        let plan = ensure_real_kvm_or_reexec_with(NestedMode::Auto, &argv, options);
        let why = match &plan {
            Err(error) if error.is_l1_failure() => error.to_string(),
            Ok(KvmPlan::RanInL1 { exit_code: EMULATED_HOST_FAILED }) => format!(
                "{test_name} reported that the emulated host failed under it (exit {EMULATED_HOST_FAILED})"
            ),
            _ => break plan,
        };
        if tries == TEST_TRIES {
            break plan;
        }
        tries += 1;
        eprintln!("termlab-nested: {why}; trying {test_name} again (try {tries} of {TEST_TRIES})");
    };
    match plan.unwrap_or_else(|error| panic!("nested launcher: {error}")) {
        KvmPlan::RunHere { nested } => {
            eprintln!("running with real KVM (nested: {nested})");
            true
        }
        KvmPlan::RanInL1 { exit_code } => {
            assert_eq!(exit_code, 0, "{test_name} failed inside the L1 VM (its output is above)");
            false
        }
    }
}
