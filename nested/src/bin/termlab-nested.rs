//! termlab-nested probe           — say whether /dev/kvm can run an ordinary guest
//! termlab-nested [--nested auto|always|never] [--writable DIR]... -- COMMAND [ARGS...]
//!                                — run COMMAND where KVM can run Linux (here or inside L1,
//!                                  where the host is read-only except each DIR)
//!
//! Exit status: COMMAND's own; 1 when the probe fails or the launcher fails; 2 on bad usage.

use std::ffi::OsString;
use std::process::ExitCode;

use termlab_nested::{ensure_real_kvm_or_reexec_with, probe, KvmPlan, L1Options, NestedMode};

const USAGE: &str = "usage: termlab-nested probe | termlab-nested [--nested auto|always|never] [--writable DIR]... -- COMMAND [ARGS...]";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "probe") {
        return match probe::probe_kvm() {
            Ok(elapsed) => {
                println!("/dev/kvm runs ordinary guests (probe loop: {elapsed:?})");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let mut mode = NestedMode::Auto;
    let mut options = L1Options::default();
    let mut args = args.into_iter();
    let command: Vec<OsString> = loop {
        let Some(arg) = args.next() else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        let value = match arg.to_str() {
            Some("--") => break args.collect(),
            Some("--nested") | Some("--writable") => args.next(),
            _ => None,
        };
        let Some(value) = value else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        if arg == "--writable" {
            options.writable.push(value.into());
            continue;
        }
        match value.to_str().map(str::parse::<NestedMode>) {
            Some(Ok(m)) => mode = m,
            Some(Err(e)) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            None => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    };
    if command.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    match ensure_real_kvm_or_reexec_with(mode, &command, &options) {
        Ok(KvmPlan::RanInL1 { exit_code }) => ExitCode::from(exit_code.clamp(0, 255) as u8),
        Ok(KvmPlan::RunHere { .. }) => {
            let status = std::process::Command::new(&command[0]).args(&command[1..]).status();
            match status {
                Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("termlab-nested: cannot run {:?}: {e}", command[0]);
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("termlab-nested: {e}");
            ExitCode::from(1)
        }
    }
}
