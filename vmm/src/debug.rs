//! Hardware instruction breakpoints (`KVM_SET_GUEST_DEBUG`) and the debug traps they cause.
//!
//! A vCPU that traps records a [`DebugEvent`] here and the whole VM parks, so a library user
//! sees every vCPU frozen at the moment of the hit. Nothing in this module runs unless a
//! breakpoint is armed: a VM that never calls `Vm::set_hw_breakpoints` makes no extra ioctl and
//! its vCPUs never exit for debugging.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP};

use crate::devices::lock;

/// x86 has four address breakpoint registers, DR0 to DR3.
pub const MAX_HW_BREAKPOINTS: usize = 4;

/// DR7 bits 8-9 (LE, GE: exact breakpoint matching, recommended by the SDM) and bit 10, which
/// always reads as 1.
const DR7_FIXED: u64 = 0x700;
/// DR7 bit 2n+1, Gn: breakpoint n enabled. Its R/Wn and LENn fields stay 0, which means "break
/// on instruction execution", the only kind offered here.
const fn dr7_global_enable(n: usize) -> u64 {
    1 << (2 * n + 1)
}

/// RFLAGS.RF: the CPU skips instruction breakpoints on the next instruction it executes.
pub(crate) const RFLAGS_RF: u64 = 1 << 16;

/// One debug trap: which vCPU stopped, where, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugEvent {
    pub vcpu: usize,
    /// Linear address of the trapping instruction (equal to RIP in 64-bit mode).
    pub pc: u64,
    /// DR6 at the trap; bits 0-3 (B0-B3) say which breakpoint register matched.
    pub dr6: u64,
    /// Exception vector KVM reported (1 = #DB).
    pub exception: u32,
}

impl DebugEvent {
    /// Indices (0-3) of the breakpoint registers that matched, from DR6.B0-B3.
    pub fn hit_breakpoints(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_HW_BREAKPOINTS).filter(|n| self.dr6 & (1 << n) != 0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugError {
    #[error("{0} breakpoints requested, x86 has {MAX_HW_BREAKPOINTS} debug address registers")]
    TooManyBreakpoints(usize),
}

/// The `KVM_SET_GUEST_DEBUG` argument arming instruction breakpoints at `addrs` (guest
/// linear addresses); an empty list turns guest debugging off entirely, so KVM goes back to
/// letting the guest own its debug registers and #DB.
pub(crate) fn hw_breakpoints(addrs: &[u64]) -> Result<kvm_guest_debug, DebugError> {
    if addrs.len() > MAX_HW_BREAKPOINTS {
        return Err(DebugError::TooManyBreakpoints(addrs.len()));
    }
    let mut debug = kvm_guest_debug::default();
    if addrs.is_empty() {
        return Ok(debug);
    }
    debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    let mut dr7 = DR7_FIXED;
    for (n, &addr) in addrs.iter().enumerate() {
        debug.arch.debugreg[n] = addr;
        dr7 |= dr7_global_enable(n);
    }
    debug.arch.debugreg[7] = dr7;
    Ok(debug)
}

#[derive(Default)]
struct TrapState {
    /// Traps not yet handed to a caller, oldest first.
    unclaimed: VecDeque<DebugEvent>,
    /// vCPUs whose trap a caller has received in this pause; they get RFLAGS.RF on resume.
    claimed: Vec<usize>,
    /// The VM has ended: no trap can come any more.
    ended: bool,
}

/// Debug traps of one VM, shared by its vCPU threads (producers) and the `Vm` (consumer).
#[derive(Default)]
pub(crate) struct DebugTraps {
    state: Mutex<TrapState>,
    changed: Condvar,
}

impl DebugTraps {
    /// Called by a vCPU thread on `KVM_EXIT_DEBUG`, before it asks every vCPU to park.
    pub(crate) fn record(&self, event: DebugEvent) {
        lock(&self.state).unclaimed.push_back(event);
        self.changed.notify_all();
    }

    /// Wakes waiters for good once the VM is over.
    pub(crate) fn vm_ended(&self) {
        lock(&self.state).ended = true;
        self.changed.notify_all();
    }

    /// The oldest unclaimed trap, waiting up to `timeout` (forever with `None`) for one.
    /// `None` on timeout or when the VM has ended.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Option<DebugEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if let Some(event) = state.unclaimed.pop_front() {
                state.claimed.push(event.vcpu);
                return Some(event);
            }
            if state.ended {
                return None;
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// Ends the current pause: returns the vCPUs whose traps were claimed (to be resumed
    /// past their breakpoint) and forgets unclaimed traps, whose vCPUs are still parked on the
    /// breakpointed instruction and so trap again as soon as they run (if it is still armed).
    pub(crate) fn take_claimed(&self) -> Vec<usize> {
        let mut state = lock(&self.state);
        state.unclaimed.clear();
        std::mem::take(&mut state.claimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_each_address_in_its_own_register_for_execution() {
        let debug = hw_breakpoints(&[0xffff_ffff_8100_0000, 0xffff_ffff_8100_1234]).unwrap();
        assert_eq!(debug.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(debug.arch.debugreg[0], 0xffff_ffff_8100_0000);
        assert_eq!(debug.arch.debugreg[1], 0xffff_ffff_8100_1234);
        assert_eq!(debug.arch.debugreg[2], 0);
        // G0 and G1 set, R/W and LEN of both 0 (execute, 1 byte), LE|GE|bit 10.
        assert_eq!(debug.arch.debugreg[7], 0x70a);
    }

    #[test]
    fn empty_list_disables_guest_debugging() {
        let debug = hw_breakpoints(&[]).unwrap();
        assert_eq!(debug.control, 0);
        assert_eq!(debug.arch.debugreg, [0; 8]);
    }

    #[test]
    fn refuses_a_fifth_breakpoint() {
        assert_eq!(hw_breakpoints(&[1, 2, 3, 4, 5]).unwrap_err(), DebugError::TooManyBreakpoints(5));
    }

    #[test]
    fn traps_are_claimed_in_order_and_unclaimed_ones_dropped_on_resume() {
        let traps = DebugTraps::default();
        let event = |vcpu| DebugEvent { vcpu, pc: 0x1000, dr6: 1, exception: 1 };
        traps.record(event(1));
        traps.record(event(0));
        assert_eq!(traps.wait(Some(Duration::ZERO)), Some(event(1)));
        assert_eq!(traps.take_claimed(), vec![1]);
        assert_eq!(traps.wait(Some(Duration::from_millis(1))), None);
        traps.vm_ended();
        assert_eq!(traps.wait(None), None);
    }

    #[test]
    fn dr6_names_the_matching_registers() {
        let event = DebugEvent { vcpu: 0, pc: 0, dr6: 0xffff_0ff4, exception: 1 };
        assert_eq!(event.hit_breakpoints().collect::<Vec<_>>(), vec![2]);
    }
}
