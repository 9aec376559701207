//! Terminal output: progress bars and coloured verdicts on stderr, quiet on
//! request, colourless with NO_COLOR (https://no-color.org) or when stderr
//! is not a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::{BenchStage, ConsoleEvent, Progress, ProgressSink};

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    quiet: bool,
    color: bool,
    /// Animated progress; off when quiet, and inside the nested L1 VM, whose
    /// serial console would relay every animation frame as a new line.
    progress: bool,
    /// Progress as plain lines instead: when stderr is no terminal (a CI
    /// log) or inside L1, unless quiet.
    plain_progress: bool,
    /// `--events`: every event as one JSON object per line instead of bars,
    /// plain lines and status lines (errors stay `error: ...` lines).
    json_events: bool,
}

impl Ui {
    pub fn new(quiet: bool, json_events: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let terminal = std::io::stderr().is_terminal();
        let animated = terminal && !termlab_nested::is_nested();
        let quiet = quiet || json_events;
        Ui {
            quiet,
            color: !no_color && terminal && !json_events,
            progress: !quiet && animated,
            plain_progress: !quiet && !animated,
            json_events,
        }
    }

    pub fn is_quiet(self) -> bool {
        self.quiet
    }

    /// A status line (suppressed by --quiet).
    pub fn say(self, message: &str) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// An error, always shown.
    pub fn error(self, message: &str) {
        eprintln!("{} {message}", self.paint("error:", "31;1"));
    }

    /// "pass"/"FAIL" in green/red when colour is allowed.
    pub fn verdict(self, passed: bool) -> String {
        if passed {
            self.paint("pass", "32")
        } else {
            self.paint("FAIL", "31;1")
        }
    }

    fn paint(self, text: &str, sgr: &str) -> String {
        if self.color {
            format!("\x1b[{sgr}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// A bar counting `length` units; hidden with --quiet or off a terminal.
    pub fn bar(self, length: u64, message: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(length), self.target());
        let template = if self.color {
            "{msg:24} [{bar:30.cyan/blue}] {pos}/{len} {elapsed}"
        } else {
            "{msg:24} [{bar:30}] {pos}/{len} {elapsed}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message.to_owned());
        bar
    }

    /// A spinner for work of unknown length (booting, building).
    pub fn spinner(self, message: &str) -> ProgressBar {
        let spinner = ProgressBar::with_draw_target(None, self.target());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            spinner.set_style(style);
        }
        spinner.set_message(message.to_owned());
        spinner.enable_steady_tick(Duration::from_millis(120));
        spinner
    }

    fn target(self) -> ProgressDrawTarget {
        if !self.progress {
            ProgressDrawTarget::hidden()
        } else {
            // indicatif hides this itself when stderr is not a terminal.
            ProgressDrawTarget::stderr()
        }
    }
}

/// Renders the engine's [`Progress`] events on stderr (stdout stays for
/// results and --json): a spinner and a bar on a terminal, one line per
/// event in a plain log, and with `console` every guest console line as
/// `console| ...` (also with --quiet: it was asked for).
pub struct ProgressPrinter {
    ui: Ui,
    console: bool,
    /// The spinner or bar on screen (animated mode only).
    shown: Mutex<Option<ProgressBar>>,
}

/// Prefix of streamed guest console lines.
pub const CONSOLE_PREFIX: &str = "console| ";

impl ProgressPrinter {
    pub fn new(ui: Ui, console: bool) -> ProgressPrinter {
        ProgressPrinter { ui, console, shown: Mutex::new(None) }
    }

    /// Removes a spinner or bar left on screen (call when a scenario ends).
    pub fn clear(&self) {
        if let Some(shown) = self.shown().take() {
            shown.finish_and_clear();
        }
    }

    fn shown(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        // A panic while printing leaves nothing inconsistent behind.
        self.shown.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One line on stderr, above a bar if one is shown.
    fn line(&self, text: &str) {
        match self.shown().as_ref() {
            Some(shown) => shown.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    fn show(&self, replacement: Option<ProgressBar>) {
        let mut shown = self.shown();
        if let Some(old) = shown.take() {
            old.finish_and_clear();
        }
        *shown = replacement;
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

impl ProgressSink for ProgressPrinter {
    fn event(&self, event: &Progress<'_>) {
        if self.ui.json_events {
            let wanted = self.console || !matches!(event, Progress::ConsoleLine { .. });
            if let (true, Ok(json)) = (wanted, serde_json::to_string(event)) {
                eprintln!("{json}");
            }
            return;
        }
        if let Progress::ConsoleLine { line, .. } = event {
            if self.console {
                self.line(&format!("{CONSOLE_PREFIX}{line}"));
            }
            return;
        }
        if let Some(notice) = notice(event) {
            if matches!(event, Progress::KeptForInspection { .. }) {
                // The interactive console has the terminal from now on.
                self.show(None);
            }
            match notice {
                Notice::Error(text) => {
                    self.line(&format!("{} {text}", self.ui.paint("error:", "31;1")))
                }
                Notice::Status(text) if !self.ui.quiet => self.line(&text),
                Notice::Status(_) => {}
            }
            return;
        }
        if self.ui.progress {
            match event {
                Progress::Booting { kernel, vcpus, .. } => {
                    self.show(Some(self.ui.spinner(&format!("booting {kernel} ({vcpus} vCPUs)"))))
                }
                Progress::Booted { scenario, repetitions, .. } => {
                    self.show(Some(self.ui.bar((*repetitions).into(), scenario)))
                }
                Progress::RepetitionDone { .. } => {
                    if let Some(bar) = self.shown().as_ref() {
                        bar.inc(1);
                    }
                }
                Progress::StepSlow { .. }
                | Progress::RepetitionVoid { .. }
                | Progress::ConsoleLine { .. }
                | Progress::KeptForInspection { .. }
                | Progress::InteractiveConsole(_)
                | Progress::Bench(_) => {}
            }
        } else if self.ui.plain_progress {
            if let Some(line) = plain_line(event) {
                self.line(&line);
            }
        }
    }
}

/// An event that is a message rather than progress: shown in every output
/// mode, a status line unless --quiet, an error always.
#[derive(Debug, PartialEq)]
pub enum Notice {
    Status(String),
    Error(String),
}

/// The message an event shows, if it is one (see [`Notice`]).
pub fn notice(event: &Progress<'_>) -> Option<Notice> {
    Some(match event {
        Progress::KeptForInspection { .. } => Notice::Error(
            "a check failed; --keep-vm: the VM stays up with a shell on its console".into(),
        ),
        Progress::InteractiveConsole(ConsoleEvent::ShellFailed { error }) => {
            Notice::Error(format!("--keep-vm: cannot start a shell on the guest console: {error}"))
        }
        Progress::InteractiveConsole(ConsoleEvent::ShellReady) => {
            Notice::Status("guest console: type `reboot -f` to end the VM (or Ctrl-C)".into())
        }
        Progress::InteractiveConsole(ConsoleEvent::VmEnded { reason }) => {
            Notice::Status(format!("VM ended: {reason}"))
        }
        Progress::Bench(BenchStage::Latency { config, iterations, vcpus }) => {
            Notice::Status(format!("bench: latency {config} × {iterations} ({vcpus} vCPUs)"))
        }
        Progress::RepetitionVoid { scenario, number, of, reason } => Notice::Status(format!(
            "[{scenario}] rep {number}/{of} tested nothing, running it again: {reason}"
        )),
        Progress::Bench(BenchStage::Round { round, of, patched }) => Notice::Status(format!(
            "bench: round {round}/{of}: {} kernel",
            if *patched { "patched" } else { "baseline" }
        )),
        Progress::Bench(BenchStage::VmFailed { part, error }) => Notice::Status(format!(
            "bench: {part}: {error} (nested: the emulated host failed); measuring it again in a fresh VM"
        )),
        _ => return None,
    })
}

/// An event as one line of a plain log (None for console lines, which
/// `--console` prints with their own prefix, and for [`notice`]s).
pub fn plain_line(event: &Progress<'_>) -> Option<String> {
    Some(match event {
        Progress::Booting { scenario, kernel, vcpus } => {
            format!("[{scenario}] booting the {kernel} kernel ({vcpus} vCPUs)")
        }
        Progress::Booted { scenario, took, repetitions } => {
            format!("[{scenario}] guest up in {}; {repetitions} repetition(s)", seconds(*took))
        }
        Progress::RepetitionDone { scenario, number, of, took, elapsed } => format!(
            "[{scenario}] rep {number}/{of} done in {} (elapsed {})",
            seconds(*took),
            seconds(*elapsed)
        ),
        Progress::StepSlow { scenario, repetition, of, step, took, elapsed } => format!(
            "[{scenario}] rep {repetition}/{of}: {step} took {} (elapsed {})",
            seconds(*took),
            seconds(*elapsed)
        ),
        Progress::ConsoleLine { .. }
        | Progress::RepetitionVoid { .. }
        | Progress::KeptForInspection { .. }
        | Progress::InteractiveConsole(_)
        | Progress::Bench(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_progress_lines_name_the_scenario_and_the_elapsed_time() {
        let done = Progress::RepetitionDone {
            scenario: "loops",
            number: 2,
            of: 3,
            took: Duration::from_millis(4100),
            elapsed: Duration::from_millis(31_240),
        };
        assert_eq!(
            plain_line(&done).as_deref(),
            Some("[loops] rep 2/3 done in 4.1 s (elapsed 31.2 s)")
        );
        let slow = Progress::StepSlow {
            scenario: "control",
            repetition: 1,
            of: 5,
            step: "trigger `run`",
            took: Duration::from_secs(6),
            elapsed: Duration::from_secs(40),
        };
        assert_eq!(
            plain_line(&slow).as_deref(),
            Some("[control] rep 1/5: trigger `run` took 6.0 s (elapsed 40.0 s)")
        );
        assert_eq!(plain_line(&Progress::ConsoleLine { scenario: "x", line: "y" }), None);
    }

    #[test]
    fn messages_from_below_main_keep_their_words_and_level() {
        let kept = Progress::KeptForInspection { scenario: "control" };
        assert_eq!(
            notice(&kept),
            Some(Notice::Error(
                "a check failed; --keep-vm: the VM stays up with a shell on its console".into()
            ))
        );
        assert_eq!(plain_line(&kept), None);
        let ended = Progress::InteractiveConsole(ConsoleEvent::VmEnded { reason: "reset" });
        assert_eq!(notice(&ended), Some(Notice::Status("VM ended: reset".into())));
        let round = Progress::Bench(BenchStage::Round { round: 2, of: 10, patched: false });
        assert_eq!(
            notice(&round),
            Some(Notice::Status("bench: round 2/10: baseline kernel".into()))
        );
        let latency =
            Progress::Bench(BenchStage::Latency { config: "case1", iterations: 20, vcpus: 2 });
        assert_eq!(
            notice(&latency),
            Some(Notice::Status("bench: latency case1 × 20 (2 vCPUs)".into()))
        );
        let slow = Progress::StepSlow {
            scenario: "x",
            repetition: 1,
            of: 1,
            step: "s",
            took: Duration::from_secs(5),
            elapsed: Duration::from_secs(5),
        };
        assert_eq!(notice(&slow), None);
    }
}
