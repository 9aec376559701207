//! A warm L1 VM: one that stays up between jobs, so that nested commands run one after
//! another (a test suite, a user's commands) pay for L1's boot once instead of each time
//! (about 4.5 s of the 9 s that `termlab exec -- true` takes nested).
//!
//! Opt-in: with `TERMLAB_L1_WARM=S` (seconds, 1 to 3600) a non-interactive job runs in the
//! warm L1 of its slot (see `TERMLAB_L1_SLOTS`), started when there is none, which powers
//! itself off after S seconds without a job. `termlab-nested stop-warm` ends them all at once.
//!
//! The launcher holding the slot's lock is the only one that talks to that L1: it names its
//! job directory in the slot directory's `next` file, which the L1 init takes, and waits for
//! the job's `ended` file. The L1 runs each job in mount and PID namespaces of its own
//! (everything the job started dies with it; its `/tmp` is new) and sees the host as a cold
//! job does: read-only, but for the job's writable directories, which it binds from a
//! writable export of the host's `/` that only the L1 init keeps mounted (QEMU cannot add a
//! 9p export to a running VM). So the read-only view is the mount's, not QEMU's, here.
//! A launcher that died during its job leaves `current` behind; the next launcher of the
//! slot then starts a fresh L1 rather than wait for that job, and the job's lease
//! (crate::job) ends it within a minute if nobody comes.

use std::fs::{self, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::error::NestedError;
use crate::image::L1Image;
use crate::job;
use crate::launch::{console_to_file, qemu_command, QEMU_LOG};
use crate::mounts::warm_qemu_args;

/// `TERMLAB_L1_WARM=S`: jobs run in a warm L1 that powers off after S idle seconds.
pub const WARM_ENV: &str = "TERMLAB_L1_WARM";
const MAX_IDLE_S: u64 = 3600;
/// One directory per slot: `slot-N`.
const WARM_DIR: &str = "/run/termlab/l1-warm";
/// How the running L1 was started (its shape and its QEMU's pid).
const STATE_FILE: &str = "state";
/// The job directory the L1 runs next (written by the launcher, taken by the L1 init).
const NEXT_FILE: &str = "next";
/// The job directory of the job in progress, from submission until its launcher saw it end.
const CURRENT_FILE: &str = "current";
/// L1's console, a file, which each launcher follows from where its job began.
const CONSOLE_FILE: &str = "console";
const PID_FILE: &str = "qemu.pid";
/// What QEMU says on stderr (why it did not start, say).
const STDERR_FILE: &str = "qemu.stderr";
/// How long a killed QEMU may take to go before its slot is started afresh anyway.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The value of [`WARM_ENV`] (`None`: unset) as the idle time after which a warm L1 powers
/// off; `None` (no warm L1) when unset or 0.
pub fn idle_limit(value: Option<String>) -> Result<Option<Duration>, NestedError> {
    let Some(text) = value else { return Ok(None) };
    match text.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(seconds) if seconds <= MAX_IDLE_S => Ok(Some(Duration::from_secs(seconds))),
        _ => Err(NestedError::BadWarmIdle { value: text, max: MAX_IDLE_S }),
    }
}

/// What a warm L1 was started with. A job may use it when the CPUs and the image are the
/// same and the memory is at least what the job asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    cpus: u32,
    mem_mib: u32,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Shape {
    fn serves(&self, wanted: &Shape) -> bool {
        self.cpus == wanted.cpus
            && self.mem_mib >= wanted.mem_mib
            && self.kernel == wanted.kernel
            && self.initrd == wanted.initrd
    }

    fn to_text(&self, pid: i32) -> String {
        format!(
            "pid={pid}\ncpus={}\nmem_mib={}\nkernel={}\ninitrd={}\n",
            self.cpus,
            self.mem_mib,
            self.kernel.display(),
            self.initrd.display()
        )
    }

    fn from_text(text: &str) -> Option<(i32, Shape)> {
        let field =
            |name: &str| text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix('='));
        let shape = Shape {
            cpus: field("cpus")?.parse().ok()?,
            mem_mib: field("mem_mib")?.parse().ok()?,
            kernel: field("kernel")?.into(),
            initrd: field("initrd")?.into(),
        };
        Some((field("pid")?.parse().ok()?, shape))
    }
}

/// The warm L1 of one slot.
pub struct WarmL1 {
    dir: PathBuf,
    pid: i32,
}

impl WarmL1 {
    /// The warm L1 of `slot` for a job of `cpus` CPUs and at least `mem_mib` MiB: the running
    /// one when it fits and its last job ended, else a new one (the old one is stopped).
    pub fn ready(
        slot: usize,
        image: &L1Image,
        cpus: u32,
        mem_mib: u32,
        idle: Duration,
    ) -> Result<Self, NestedError> {
        let dir = Path::new(WARM_DIR).join(format!("slot-{slot}"));
        let wanted =
            Shape { cpus, mem_mib, kernel: image.kernel.clone(), initrd: image.initrd.clone() };
        if let Some((running, shape)) = Self::running(&dir) {
            if shape.serves(&wanted) && running.between_jobs() {
                return Ok(running);
            }
            running.stop();
        }
        Self::start(dir, &wanted, idle)
    }

    /// The slot's L1 as its state file describes it, if its QEMU is still running.
    fn running(dir: &Path) -> Option<(Self, Shape)> {
        let (pid, shape) = Shape::from_text(&fs::read_to_string(dir.join(STATE_FILE)).ok()?)?;
        let l1 = Self { dir: dir.to_owned(), pid };
        l1.alive().then_some((l1, shape))
    }

    /// True when no job is queued and the last one ended (its launcher died before it ended
    /// otherwise: it may still run, so this L1 is not used again).
    fn between_jobs(&self) -> bool {
        if self.dir.join(NEXT_FILE).exists() {
            return false;
        }
        match fs::read_to_string(self.dir.join(CURRENT_FILE)) {
            Ok(job) => Path::new(job.trim()).join(job::ENDED_FILE).exists(),
            Err(_) => true,
        }
    }

    fn start(dir: PathBuf, shape: &Shape, idle: Duration) -> Result<Self, NestedError> {
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| NestedError::io("create", &dir, e))?;
        let job_arg = format!("termlab.warm={} termlab.idle={}", dir.display(), idle.as_secs());
        let image = L1Image { kernel: shape.kernel.clone(), initrd: shape.initrd.clone() };
        let mut cmd =
            qemu_command(&image, shape.cpus, shape.mem_mib, &job_arg, &dir.join(QEMU_LOG));
        console_to_file(&mut cmd, &dir.join(CONSOLE_FILE));
        // -daemonize: QEMU returns once the VM runs and lives on in a session of its own
        // (not our child: nothing waits for it but init), until L1 powers off when idle.
        cmd.args(warm_qemu_args()).arg("-pidfile").arg(dir.join(PID_FILE)).arg("-daemonize");
        // Never one of our pipes: with -D, a daemonized QEMU keeps its stderr, and whoever
        // reads our output would wait for the warm L1 to end.
        let stderr_path = dir.join(STDERR_FILE);
        let stderr =
            File::create(&stderr_path).map_err(|e| NestedError::io("create", &stderr_path, e))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let status = cmd
            .status()
            .map_err(|e| NestedError::io("start", Path::new("qemu-system-x86_64"), e))?;
        let failed = |why: String| NestedError::CommandFailed {
            what: format!("starting the warm L1 VM ({why})"),
            status: status.to_string(),
        };
        if !status.success() {
            return Err(failed(fs::read_to_string(&stderr_path).unwrap_or_default().trim().into()));
        }
        let pid = fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| failed("no pid in its pid file".into()))?;
        let state = dir.join(STATE_FILE);
        fs::write(&state, shape.to_text(pid)).map_err(|e| NestedError::io("write", &state, e))?;
        Ok(Self { dir, pid })
    }

    /// Queues `job` (its directory) and returns where in L1's console its lines begin.
    pub fn submit(&self, job: &Path) -> Result<u64, NestedError> {
        let offset = fs::metadata(self.console()).map_or(0, |m| m.len());
        let write = |name: &str| {
            let partial = self.dir.join(format!(".{name}.tmp"));
            let path = self.dir.join(name);
            fs::write(&partial, job.as_os_str().as_encoded_bytes())
                .and_then(|()| fs::rename(&partial, &path))
                .map_err(|e| NestedError::io("write", &path, e))
        };
        write(CURRENT_FILE)?;
        write(NEXT_FILE)?;
        Ok(offset)
    }

    /// The job seen to end: the L1 is free for the slot's next one.
    pub fn finish(&self) {
        let _ = fs::remove_file(self.dir.join(CURRENT_FILE));
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join(CONSOLE_FILE)
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join(QEMU_LOG)
    }

    /// True while this L1's QEMU runs (the pid is checked to be the QEMU of this slot).
    pub fn alive(&self) -> bool {
        let marker = format!("termlab.warm={}", self.dir.display());
        fs::read(format!("/proc/{}/cmdline", self.pid))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&marker))
    }

    /// Kills the L1 VM and removes its directory.
    pub fn stop(&self) {
        if self.alive() {
            // SAFETY: kill(2) of the QEMU that `alive` just recognised by its command line.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + STOP_WAIT;
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Stops every warm L1 of this host; returns how many were running.
pub fn stop_warm_l1s() -> usize {
    let Ok(slots) = fs::read_dir(WARM_DIR) else { return 0 };
    let mut stopped = 0;
    for slot in slots.filter_map(Result::ok) {
        match WarmL1::running(&slot.path()) {
            Some((l1, _)) => {
                l1.stop();
                stopped += 1;
            }
            None => {
                let _ = fs::remove_dir_all(slot.path());
            }
        }
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_time_is_checked() {
        assert_eq!(idle_limit(None).ok(), Some(None));
        assert_eq!(idle_limit(Some("0".into())).ok(), Some(None));
        assert_eq!(idle_limit(Some("90".into())).ok(), Some(Some(Duration::from_secs(90))));
        for bad in ["3601", "-1", "soon", ""] {
            let error = idle_limit(Some(bad.into())).expect_err(bad).to_string();
            assert!(error.contains("TERMLAB_L1_WARM") && error.contains("3600"), "{error}");
        }
    }

    #[test]
    fn a_warm_l1_serves_jobs_of_its_shape_or_smaller() {
        let shape = Shape {
            cpus: 2,
            mem_mib: 4096,
            kernel: "/c/l1/v7/kernel".into(),
            initrd: "/c/l1/v7/initrd.cpio".into(),
        };
        let (pid, read) = Shape::from_text(&shape.to_text(42)).expect("state parses");
        assert_eq!((pid, &read), (42, &shape));
        assert!(shape.serves(&Shape { mem_mib: 2048, ..shape.clone() }));
        assert!(!shape.serves(&Shape { mem_mib: 8192, ..shape.clone() }));
        assert!(!shape.serves(&Shape { cpus: 3, ..shape.clone() }));
        assert!(!shape.serves(&Shape { kernel: "/c/l1/v8/kernel".into(), ..shape.clone() }));
        assert_eq!(Shape::from_text("pid=1\ncpus=2\n"), None);
    }
}
