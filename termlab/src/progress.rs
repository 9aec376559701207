//! What the engine reports while a scenario runs, as events: the engine
//! never draws; the CLI renders them (a bar on a terminal, one line each in
//! a plain log, the guest console prefixed with `--console`).

use std::time::Duration;

use serde::{Serialize, Serializer};

/// One thing that happened during a scenario's run. As JSON (`--events`):
/// `{"event": "<variant in snake_case>", ...fields}`, durations in seconds
/// as `took_s`/`elapsed_s`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress<'a> {
    /// The VM is being booted.
    Booting { scenario: &'a str, kernel: &'a str, vcpus: u32 },
    /// The guest agent answered; `repetitions` will run.
    Booted {
        scenario: &'a str,
        #[serde(rename = "took_s", serialize_with = "seconds")]
        took: Duration,
        repetitions: u32,
    },
    /// Repetition `number` (1-based) of `of` finished; `elapsed` counts from
    /// the start of the scenario's run.
    RepetitionDone {
        scenario: &'a str,
        number: u32,
        of: u32,
        #[serde(rename = "took_s", serialize_with = "seconds")]
        took: Duration,
        #[serde(rename = "elapsed_s", serialize_with = "seconds")]
        elapsed: Duration,
    },
    /// Repetition `number` tested nothing and runs again: a terminate step's request reached
    /// the kernel after the run it was meant for had ended (`reason` says which and by how
    /// much), so the kernel's "not running" says nothing about termination.
    RepetitionVoid { scenario: &'a str, number: u32, of: u32, reason: &'a str },
    /// A step took at least [`SLOW_STEP`].
    StepSlow {
        scenario: &'a str,
        repetition: u32,
        of: u32,
        step: &'a str,
        #[serde(rename = "took_s", serialize_with = "seconds")]
        took: Duration,
        #[serde(rename = "elapsed_s", serialize_with = "seconds")]
        elapsed: Duration,
    },
    /// A line the guest wrote on its serial console (only with
    /// `RunOptions::stream_console`), without its line end.
    ConsoleLine { scenario: &'a str, line: &'a str },
    /// A check failed and `--keep-vm` keeps the VM up with a shell on its
    /// console (an [`Progress::InteractiveConsole`] event follows).
    KeptForInspection { scenario: &'a str },
    /// The shell on the guest console (`termlab boot`, `--keep-vm`).
    InteractiveConsole(ConsoleEvent<'a>),
    /// What `termlab bench` is measuring now.
    Bench(BenchStage<'a>),
}

fn seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// The life of the interactive shell on the guest console.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "console", rename_all = "snake_case")]
pub enum ConsoleEvent<'a> {
    /// The shell could not be started (`error`: the agent's answer); the VM
    /// is powered off.
    ShellFailed { error: &'a str },
    /// The shell runs; the terminal's keys go to the guest from now on.
    ShellReady,
    /// The VM ended (`reason`: as [`crate::engine::describe_exit`] says it).
    VmEnded { reason: &'a str },
}

/// A stage of `termlab bench`, announced as it starts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum BenchStage<'a> {
    /// `iterations` terminations of the latency configuration `config` in a
    /// VM of `vcpus` vCPUs.
    Latency { config: &'a str, iterations: u32, vcpus: u8 },
    /// Boot `round` (1-based) of `of` of the patched or the baseline kernel,
    /// for the fast path and load cost.
    Round { round: u32, of: u32, patched: bool },
    /// The VM of `part` ended in a triple fault inside the nested L1 VM (the emulated host
    /// failed under it): the part runs again in a fresh VM.
    VmFailed { part: &'a str, error: &'a str },
}

/// A step at least this long gets its own progress event.
pub const SLOW_STEP: Duration = Duration::from_secs(5);

/// Receives the engine's progress events; called from the engine's threads
/// (the console follower is one), hence `Sync`.
pub trait ProgressSink: Sync {
    fn event(&self, event: &Progress<'_>);
}

/// Any `Fn(&Progress)` is a sink (tests collect events with one).
impl<F: Fn(&Progress<'_>) + Sync> ProgressSink for F {
    fn event(&self, event: &Progress<'_>) {
        self(event)
    }
}

/// Drops every event.
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn event(&self, _: &Progress<'_>) {}
}

/// Splits what a growing console log gained into whole lines, keeping a
/// partial last line until its end arrives (or [`ConsoleLines::finish`]).
#[derive(Debug, Default)]
pub struct ConsoleLines {
    pending: Vec<u8>,
}

impl ConsoleLines {
    /// Adds `bytes` and returns the lines they completed, without `\n` or `\r`.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(Self::text(&line[..end]));
        }
        lines
    }

    /// The partial last line, if any.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then(|| Self::text(&rest))
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).trim_end_matches('\r').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_as_json_say_what_happened_with_seconds() {
        let json = |event: &Progress<'_>| serde_json::to_value(event).expect("serializes");
        let done = Progress::RepetitionDone {
            scenario: "loops",
            number: 2,
            of: 3,
            took: Duration::from_millis(4100),
            elapsed: Duration::from_millis(31_250),
        };
        assert_eq!(
            json(&done),
            serde_json::json!({"event": "repetition_done", "scenario": "loops", "number": 2,
                               "of": 3, "took_s": 4.1, "elapsed_s": 31.25})
        );
        let ended = Progress::InteractiveConsole(ConsoleEvent::VmEnded { reason: "reset" });
        assert_eq!(
            json(&ended),
            serde_json::json!({"event": "interactive_console", "console": "vm_ended",
                               "reason": "reset"})
        );
        let round = Progress::Bench(BenchStage::Round { round: 1, of: 2, patched: true });
        assert_eq!(
            json(&round),
            serde_json::json!({"event": "bench", "stage": "round", "round": 1, "of": 2,
                               "patched": true})
        );
    }

    #[test]
    fn console_lines_are_split_across_reads_and_the_last_partial_one_kept() {
        let mut lines = ConsoleLines::default();
        assert!(lines.push(b"[ 0.1] Linux ver").is_empty());
        assert_eq!(
            lines.push(b"sion 6.12\r\n[ 0.2] two\n[ 0.3"),
            ["[ 0.1] Linux version 6.12", "[ 0.2] two"]
        );
        assert_eq!(lines.push(b"] three\n"), ["[ 0.3] three"]);
        assert_eq!(lines.push(b"tail"), Vec::<String>::new());
        assert_eq!(lines.finish().as_deref(), Some("tail"));
        assert_eq!(lines.finish(), None);
    }
}
