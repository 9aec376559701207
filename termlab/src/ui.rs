//! Terminal output: progress bars and coloured verdicts on stderr, quiet on
//! request, colourless with NO_COLOR (https://no-color.org) or when stderr
//! is not a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    quiet: bool,
    color: bool,
    /// Animated progress; off when quiet, and inside the nested L1 VM, whose
    /// serial console would relay every animation frame as a new line.
    progress: bool,
}

impl Ui {
    pub fn new(quiet: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let progress = !quiet && !termlab_nested::is_nested();
        Ui { quiet, color: !no_color && std::io::stderr().is_terminal(), progress }
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
