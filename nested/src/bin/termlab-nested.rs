//! termlab-nested probe           — say whether /dev/kvm can run an ordinary guest
//! termlab-nested stop-warm       — stop the warm L1 VMs (TERMLAB_L1_WARM) of this host
//! termlab-nested [--nested auto|always|never] [--writable DIR]... -- COMMAND [ARGS...]
//!                                — run COMMAND where KVM can run Linux (here or inside L1,
//!                                  where the host is read-only except each DIR)
//!
//! Exit status: COMMAND's own; 1 when the probe fails or the launcher fails; 2 on bad usage.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use termlab_nested::{
    ensure_real_kvm_or_reexec_with, probe, stop_warm_l1s, KvmPlan, L1Options, NestedMode,
};

/// Run a command where KVM can run Linux: here, or inside a nested L1 VM.
#[derive(Parser)]
#[command(
    name = "termlab-nested",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Exit status: COMMAND's own; 1 when the probe or the launcher fails; 2 on bad usage."
)]
struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// Where KVM comes from: auto (here when it can run Linux, else L1), always (L1), never.
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    nested: NestedMode,
    /// A host directory the command may write inside L1 (the rest of the host is read-only
    /// there); repeatable.
    #[arg(long, value_name = "DIR")]
    writable: Vec<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

#[derive(Subcommand)]
enum Action {
    /// Say whether /dev/kvm can run an ordinary guest, measured now (the other commands reuse
    /// a verdict of emulation until the host reboots or KVM is loaded anew).
    Probe,
    /// Stop the warm L1 VMs of this host (see TERMLAB_L1_WARM), now instead of when idle.
    StopWarm,
}

fn parse_mode(text: &str) -> Result<NestedMode, String> {
    text.parse::<NestedMode>().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Action::StopWarm) = args.action {
        let stopped = stop_warm_l1s();
        eprintln!("termlab-nested: {stopped} warm L1 VM(s) stopped");
        return ExitCode::SUCCESS;
    }
    if let Some(Action::Probe) = args.action {
        return match probe::probe_kvm_now() {
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
    let command = &args.command;
    let options = L1Options { writable: args.writable, ..L1Options::default() };
    match ensure_real_kvm_or_reexec_with(args.nested, command, &options) {
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
