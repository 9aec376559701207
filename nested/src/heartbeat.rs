//! Signs of life from each CPU of the L1 VM, so that a stalled L1 is ended at once instead
//! of at the job's timeout.
//!
//! QEMU's TCG emulation of SVM now and then wedges an L1 CPU inside L1's KVM; the job then
//! makes no progress and prints nothing until its timeout (15–30 min in the test command).
//! The job script starts one loop per L1 CPU, pinned to it, that writes a growing counter to
//! `alive-<cpu>` in the job directory every [`BEAT_INTERVAL_S`] seconds. The launcher reads
//! those files; one that stops changing means that CPU no longer runs ordinary tasks.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Seconds between two beats of one CPU's loop.
pub const BEAT_INTERVAL_S: u32 = 5;

/// The file CPU `cpu`'s loop writes in the job directory is this and the CPU's number.
const BEAT_FILE_PREFIX: &str = "alive-";

fn beat_file(cpu: u32) -> String {
    format!("{BEAT_FILE_PREFIX}{cpu}")
}

/// The job script's lines that start one pinned beat loop per L1 CPU in the background,
/// writing under `dir_quoted` (a shell-quoted path); their pids are in `$beats`, for
/// [`STOP_SCRIPT`]. A loop also ends when its file cannot be written (the job is gone).
pub fn start_script(dir_quoted: &str) -> String {
    format!(
        "beats=; cpu=0; while [ $cpu -lt \"$(nproc)\" ]; do\n\
         \x20 taskset -c $cpu sh -c 'n=1; while echo $n > \"$0\"; do n=$((n+1)); sleep {BEAT_INTERVAL_S}; done' {dir_quoted}/{BEAT_FILE_PREFIX}$cpu 2>/dev/null &\n\
         \x20 beats=\"$beats $!\"; cpu=$((cpu+1))\n\
         done\n"
    )
}

/// The job script's line that ends the loops [`start_script`] started.
pub const STOP_SCRIPT: &str = "kill $beats 2>/dev/null\n";

/// An L1 CPU that gave no sign of life for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub cpu: u32,
    pub silent: Duration,
}

/// A silence shorter than the stall limit that is still worth a line in the log: longer than
/// two beats and the launcher's read of them. Timeouts inside L1 (a guest agent's answer
/// within 10 s, say) may have run out during it, for the L1 VM was not running.
pub const NOTABLE_SILENCE: Duration = Duration::from_secs(3 * BEAT_INTERVAL_S as u64);

/// The launcher's view of the beats: when each CPU's file last changed.
pub struct Heartbeat {
    files: Vec<Beat>,
    limit: Duration,
    /// Silences longer than [`NOTABLE_SILENCE`] that ended, not yet taken.
    ended_silences: Vec<Stall>,
}

struct Beat {
    path: PathBuf,
    content: Option<Vec<u8>>,
    changed: Instant,
}

impl Heartbeat {
    /// Watches `cpus` beat files in `job_dir`, counting from `start` (the L1 VM's start: its
    /// boot has to fit in `limit` too).
    pub fn new(job_dir: &Path, cpus: u32, limit: Duration, start: Instant) -> Self {
        let files = (0..cpus)
            .map(|cpu| Beat { path: job_dir.join(beat_file(cpu)), content: None, changed: start })
            .collect();
        Self { files, limit, ended_silences: Vec::new() }
    }

    /// Reads the files; the first CPU silent for longer than the limit at `now`, if any.
    pub fn check(&mut self, now: Instant) -> Option<Stall> {
        for (beat, cpu) in self.files.iter_mut().zip(0..) {
            let content = fs::read(&beat.path).ok().filter(|c| !c.is_empty());
            if content.is_some() && content != beat.content {
                let silent = now.saturating_duration_since(beat.changed);
                // The first beat ends L1's boot, not a silence.
                if beat.content.is_some() && silent > NOTABLE_SILENCE {
                    self.ended_silences.push(Stall { cpu, silent });
                }
                beat.content = content;
                beat.changed = now;
            }
        }
        self.files.iter().zip(0..).find_map(|(beat, cpu)| {
            let silent = now.saturating_duration_since(beat.changed);
            (silent > self.limit).then_some(Stall { cpu, silent })
        })
    }

    /// The silences longer than [`NOTABLE_SILENCE`] that ended since the last call: L1 CPUs
    /// that gave no sign of life for a while, then went on.
    pub fn take_ended_silences(&mut self) -> Vec<Stall> {
        std::mem::take(&mut self.ended_silences)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;

    #[test]
    fn a_cpu_whose_file_stops_changing_is_reported_after_the_limit() {
        let dir = TempDir::new(&std::env::temp_dir(), "heartbeat").expect("temp dir");
        let start = Instant::now();
        let limit = Duration::from_secs(60);
        let mut heartbeat = Heartbeat::new(dir.path(), 2, limit, start);
        let at = |s: u64| start + Duration::from_secs(s);
        let write = |cpu: u32, n: u32| fs::write(dir.path().join(beat_file(cpu)), format!("{n}\n"));

        // Booting: no file yet, within the limit.
        assert_eq!(heartbeat.check(at(59)), None);
        write(0, 1).unwrap();
        write(1, 1).unwrap();
        assert_eq!(heartbeat.check(at(60)), None);
        // CPU 0 goes on beating, CPU 1 stops.
        write(0, 2).unwrap();
        assert_eq!(heartbeat.check(at(100)), None);
        write(0, 3).unwrap();
        assert_eq!(heartbeat.check(at(120)), None);
        write(0, 4).unwrap();
        assert_eq!(
            heartbeat.check(at(121)),
            Some(Stall { cpu: 1, silent: Duration::from_secs(61) })
        );
    }

    #[test]
    fn a_silence_that_ends_before_the_limit_is_taken_once() {
        let dir = TempDir::new(&std::env::temp_dir(), "heartbeat").expect("temp dir");
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(dir.path(), 1, Duration::from_secs(60), start);
        let at = |s: u64| start + Duration::from_secs(s);
        let write = |n: u32| fs::write(dir.path().join(beat_file(0)), format!("{n}\n"));

        // The first beat comes after a 30 s boot: not a silence.
        write(1).unwrap();
        assert_eq!(heartbeat.check(at(30)), None);
        write(2).unwrap();
        assert_eq!(heartbeat.check(at(35)), None);
        assert_eq!(heartbeat.take_ended_silences(), []);
        // 20 s without a beat, then beats again.
        write(3).unwrap();
        assert_eq!(heartbeat.check(at(55)), None);
        assert_eq!(
            heartbeat.take_ended_silences(),
            [Stall { cpu: 0, silent: Duration::from_secs(20) }]
        );
        assert_eq!(heartbeat.take_ended_silences(), []);
    }

    #[test]
    fn an_l1_that_never_starts_the_job_is_reported_too() {
        let dir = TempDir::new(&std::env::temp_dir(), "heartbeat").expect("temp dir");
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(dir.path(), 1, Duration::from_secs(10), start);
        assert_eq!(
            heartbeat.check(start + Duration::from_secs(11)),
            Some(Stall { cpu: 0, silent: Duration::from_secs(11) })
        );
    }
}
