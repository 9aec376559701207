//! Small wrappers over the operating system: clocks, errno and signal names.

use std::io;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::time::{clock_gettime, ClockId};
use termlab_protocol::{ErrnoInfo, ErrorKind, ErrorReply};

fn clock_ns(clock: ClockId) -> u64 {
    // clock_gettime cannot fail for these always-present clocks; 0 would show up as an obviously
    // wrong timestamp rather than being silently plausible.
    clock_gettime(clock)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in ns: the clock of every timestamp the agent reports, and of
/// `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(ClockId::CLOCK_MONOTONIC)
}

pub fn realtime_ns() -> u64 {
    clock_ns(ClockId::CLOCK_REALTIME)
}

pub fn errno_info(number: i32) -> ErrnoInfo {
    let name = match Errno::from_raw(number) {
        Errno::UnknownErrno => format!("errno {number}"),
        known => format!("{known:?}"),
    };
    ErrnoInfo { number, name }
}

pub fn signal_name(number: i32) -> String {
    match Signal::try_from(number) {
        Ok(signal) => signal.as_str().to_owned(),
        Err(_) if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&number) => {
            format!("SIGRTMIN+{}", number - libc::SIGRTMIN())
        }
        Err(_) => format!("signal {number}"),
    }
}

/// An `io` error reply for a failed operating-system call, with its errno when it has one.
pub fn io_error(context: impl std::fmt::Display, error: &io::Error) -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::Io,
        message: format!("{context}: {error}"),
        errno: error.raw_os_error().map(errno_info),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_numbers() {
        assert_eq!(errno_info(libc::EINVAL).name, "EINVAL");
        assert_eq!(errno_info(libc::ESRCH).name, "ESRCH");
        assert_eq!(errno_info(99999).name, "errno 99999");
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }

    #[test]
    fn monotonic_clock_advances() {
        let before = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_ns() >= before + 2_000_000);
        assert!(realtime_ns() > 1_600_000_000_000_000_000);
    }
}
