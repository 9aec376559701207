//! termlab guest agent: serves the termlab protocol (see the `termlab-protocol` crate) on a vsock
//! port, one thread per connection. Started by the guest's init; logs briefly to stderr, which is
//! the guest console.
//!
//! Usage: termlab-agent [--port N] [--listen-unix PATH] [--shutdown-action exit|reboot]

/// One line on stderr, prefixed so it stands out on the guest console.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("termlab-agent: {}", format_args!($($arg)*))
    };
}

mod agent;
mod listener;
mod ops;
mod process;
mod session;
mod sys;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use termlab_protocol::{DEFAULT_VSOCK_PORT, PROTOCOL_VERSION};

use agent::{Agent, ShutdownAction};
use listener::Listener;
use process::ProcessTable;

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

const USAGE: &str =
    "usage: termlab-agent [--port N] [--listen-unix PATH] [--shutdown-action exit|reboot]
  --port N                 vsock port to listen on (default 1024)
  --listen-unix PATH       listen on a Unix socket instead of vsock (tests on the host)
  --shutdown-action ACTION what `shutdown` does after killing children: exit (default) the agent,
                           or reboot the machine (the guest's init passes this)";

#[derive(Debug, PartialEq, Eq)]
struct Options {
    port: u32,
    unix_path: Option<PathBuf>,
    shutdown_action: ShutdownAction,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum UsageError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("invalid port {0:?}")]
    BadPort(String),
    #[error("invalid shutdown action {0:?} (expected exit or reboot)")]
    BadShutdownAction(String),
    #[error("unknown argument {0:?}")]
    Unknown(String),
}

fn parse_options(args: impl IntoIterator<Item = String>) -> Result<Options, UsageError> {
    let mut options = Options {
        port: DEFAULT_VSOCK_PORT,
        unix_path: None,
        shutdown_action: ShutdownAction::Exit,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| UsageError::MissingValue(flag.clone()));
        match flag.as_str() {
            "--port" => {
                let port = value()?;
                options.port = port.parse().map_err(|_| UsageError::BadPort(port))?;
            }
            "--listen-unix" => options.unix_path = Some(PathBuf::from(value()?)),
            "--shutdown-action" => {
                options.shutdown_action = match value()?.as_str() {
                    "exit" => ShutdownAction::Exit,
                    "reboot" => ShutdownAction::Reboot,
                    other => return Err(UsageError::BadShutdownAction(other.to_owned())),
                }
            }
            _ => return Err(UsageError::Unknown(flag)),
        }
    }
    Ok(options)
}

/// Termination signals are taken by one thread (blocked everywhere else; the children get a
/// clean signal mask from std::process) so that children are killed before the agent goes.
fn block_termination_signals() -> nix::Result<SigSet> {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block()?;
    Ok(signals)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let options = match parse_options(args) {
        Ok(options) => options,
        Err(error) => {
            log!("{error}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // Before any thread exists, so every thread inherits the mask.
    let signals = match block_termination_signals() {
        Ok(signals) => signals,
        Err(error) => {
            log!("cannot block termination signals: {error}");
            std::process::exit(1);
        }
    };
    let listener = match &options.unix_path {
        Some(path) => Listener::unix(path),
        None => Listener::vsock(options.port),
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(error) => {
            log!("cannot listen: {error}");
            std::process::exit(1);
        }
    };
    let agent = Arc::new(Agent {
        processes: ProcessTable::default(),
        shutdown_action: options.shutdown_action,
        socket_file: listener.socket_file().map(PathBuf::from),
    });

    let signal_agent = Arc::clone(&agent);
    let signal_thread =
        std::thread::Builder::new().name("signals".into()).spawn(move || match signals.wait() {
            Ok(signal) => {
                log!("got {signal}");
                signal_agent.shut_down()
            }
            Err(error) => log!("waiting for signals failed: {error}; signals now ignored"),
        });
    if let Err(error) = signal_thread {
        log!("cannot start the signal thread: {error}");
        std::process::exit(1);
    }

    log!(
        "version {} (protocol {PROTOCOL_VERSION}) listening on {}",
        env!("CARGO_PKG_VERSION"),
        listener.describe()
    );
    let mut connections: u64 = 0;
    loop {
        let connection = match listener.accept() {
            Ok(connection) => connection,
            Err(error) => {
                log!("accept failed: {error}");
                std::thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        connections += 1;
        let agent = Arc::clone(&agent);
        let spawned = std::thread::Builder::new()
            .name(format!("connection-{connections}"))
            .spawn(move || session::serve(connection, &agent));
        if let Err(error) = spawned {
            log!("cannot start a thread for connection {connections}: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, UsageError> {
        parse_options(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn options_parse_and_reject() {
        assert_eq!(
            parse(&[]).unwrap(),
            Options { port: 1024, unix_path: None, shutdown_action: ShutdownAction::Exit }
        );
        let options = parse(&["--port", "5000", "--shutdown-action", "reboot"]).unwrap();
        assert_eq!((options.port, options.shutdown_action), (5000, ShutdownAction::Reboot));
        assert_eq!(parse(&["--port"]), Err(UsageError::MissingValue("--port".into())));
        assert_eq!(parse(&["--port", "-1"]), Err(UsageError::BadPort("-1".into())));
        assert!(parse(&["--shutdown-action", "halt"]).is_err());
        assert_eq!(parse(&["--verbose"]), Err(UsageError::Unknown("--verbose".into())));
    }
}
