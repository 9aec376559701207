//! Cancellation as a token: the CLI creates it where it installs the Ctrl-C
//! (SIGINT) and SIGTERM handler and passes it down; the engine, bench and
//! exec check it between steps and while they wait, then stop the VM and
//! keep what they measured.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A shared "stop now" flag: clones see the same flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token nothing has cancelled (and no signal will: see
    /// [`Cancel::on_interrupt_signals`]).
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks everything holding a clone to stop.
    pub fn cancel(&self) {
        // Only an atomic store: async-signal-safe.
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The process's token that Ctrl-C (SIGINT) and SIGTERM cancel, with the
    /// handler installed: a run then stops at the next step boundary with
    /// the VM shut down and a partial result written, instead of the process
    /// dying and leaving the guest's files behind. Every call returns a
    /// clone of the same token.
    pub fn on_interrupt_signals() -> Cancel {
        let cancel = SIGNALLED.get_or_init(Cancel::new).clone();
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: installs a handler that only reads an initialised
            // OnceLock and stores to an atomic; the action is zeroed and
            // then filled as sigaction(2) requires.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = cancel_on_signal as *const () as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        cancel
    }
}

/// The token the signal handler cancels (set before the handler exists).
static SIGNALLED: OnceLock<Cancel> = OnceLock::new();

extern "C" fn cancel_on_signal(_: libc::c_int) {
    // OnceLock::get is an atomic load (no lock, no allocation), and the
    // token was set before this handler was installed.
    if let Some(cancel) = SIGNALLED.get() {
        cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_sees_the_cancel_and_a_new_token_does_not() {
        let cancel = Cancel::new();
        let held_below = cancel.clone();
        assert!(!held_below.is_cancelled());
        cancel.cancel();
        assert!(held_below.is_cancelled());
        assert!(!Cancel::new().is_cancelled());
    }

    #[test]
    fn sigterm_cancels_the_signal_token() {
        let cancel = Cancel::on_interrupt_signals();
        assert!(!cancel.is_cancelled());
        // SAFETY: raises SIGTERM at this process, whose handler was just installed.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert!(cancel.is_cancelled());
        assert!(Cancel::on_interrupt_signals().is_cancelled(), "one token per process");
    }
}
