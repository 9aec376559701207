//! Instruction breakpoints in guest kernel code, and the traps they cause.
//!
//! Why not `KVM_SET_GUEST_DEBUG` breakpoints: termlab runs its VMM inside an L1 VM that
//! QEMU (7.2) emulates with TCG, and there neither kind reaches the VMM. Hardware breakpoints
//! armed by the L1 KVM never fire, because TCG loads the VMCB's DR7 on VMRUN without
//! installing its breakpoints (fixed only in QEMU 9.1: "target/i386: disable/enable
//! breakpoints on vmentry/vmexit"). An `int3` with `KVM_GUESTDBG_USE_SW_BP` is checked by
//! TCG against the INTn intercept rather than the #BP exception intercept that KVM sets, so
//! it goes to the guest, which oopses ("Oops: int3"). Both were tried here.
//!
//! What does reach the VMM everywhere is port I/O that no in-kernel device claims. Arming a
//! breakpoint writes the two-byte `out %al, $TRAP_PORT` over the instruction at its address
//! (in guest-physical memory, while every vCPU is parked); a vCPU executing it exits with
//! `KVM_EXIT_IO` and RIP still on it, the VMM records a [`DebugEvent`] and parks every vCPU.
//! On resume the hitting vCPU executes the original instruction: an `endbr64` (every kernel
//! function and BPF image entry in an IBT build) is just skipped, anything else is put back,
//! single-stepped with interrupts blocked, and patched again, so the breakpoint stays armed
//! for the other vCPUs. Consequences: breakpoints are per VM, not per vCPU; they only work on
//! kernel code (CPL 0: `out` faults in user mode); they must sit in code the guest does not
//! rewrite while armed; and the second byte should not start an instruction that anything
//! jumps to or was interrupted at (true at any `endbr64`; after a one-byte instruction the
//! stepping vCPU itself is stepped on past it). With none armed nothing is patched and no
//! vCPU exits for debugging.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::lock;

/// An I/O port no device of this VMM or of KVM's in-kernel irqchip/PIT decodes.
pub(crate) const TRAP_PORT: u8 = 0xeb;
/// `out %al, $TRAP_PORT`.
const TRAP: [u8; 2] = [0xe6, TRAP_PORT];
pub(crate) const TRAP_LEN: u64 = TRAP.len() as u64;
/// `endbr64`: no effect on a CPU without CET indirect branch tracking, so stepping over it is
/// moving RIP past it.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// How many breakpoints one VM may have armed at once.
pub const MAX_BREAKPOINTS: usize = 16;

/// Where to stop: the instruction's guest linear (virtual) address, and the guest-physical
/// address of its first byte (the VMM does not walk guest page tables; see termlab-introspect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breakpoint {
    pub addr: u64,
    pub gpa: u64,
}

/// One trap: which vCPU stopped at which breakpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugEvent {
    pub vcpu: usize,
    /// The breakpoint's linear address; the vCPU's RIP is there while paused.
    pub pc: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error("{0} breakpoints requested, at most {MAX_BREAKPOINTS} are supported")]
    TooMany(usize),
    #[error("two breakpoints overlap at {0:#x}")]
    Overlap(u64),
    #[error("guest memory at {gpa:#x} for the breakpoint at {addr:#x}: {source}")]
    Memory { addr: u64, gpa: u64, source: vm_memory::GuestMemoryError },
    #[error("vCPU {vcpu} leaving the breakpoint at {addr:#x}: {step} failed: {source}")]
    Kvm { vcpu: usize, addr: u64, step: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {vcpu} stepping over the instruction at {addr:#x}: the VM ended ({reason})")]
    StepExit { vcpu: usize, addr: u64, reason: String },
}

/// An armed breakpoint and the bytes its trap replaced.
#[derive(Debug, Clone, Copy)]
struct Armed {
    at: Breakpoint,
    original: [u8; 2],
    /// The original instruction is `endbr64`, so stepping over it needs no single-step.
    endbr64: bool,
}

#[derive(Default)]
struct TrapState {
    armed: Vec<Armed>,
    /// Traps not yet handed to a caller, oldest first.
    unclaimed: VecDeque<DebugEvent>,
    /// Every vCPU parked on a trap in this pause, with the breakpoint it hit and whether a
    /// caller has received that trap (only those are stepped over on resume).
    trapped: Vec<(DebugEvent, bool)>,
    /// The VM has ended: no trap can come any more.
    ended: bool,
}

/// What a vCPU parked on a trap must do before it runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Its trap was not handed out: run the trap again, so it is reported again.
    Retrap { pc: u64 },
    /// Continue after an `endbr64` at `pc`.
    Skip { pc: u64, len: u64 },
    /// Put the original bytes back, step one instruction at `pc`, patch the trap again.
    Step { pc: u64, bp: Breakpoint, original: [u8; 2] },
    /// The breakpoint was disarmed meanwhile: run the original instruction at `pc`.
    Run { pc: u64 },
}

/// Breakpoints and traps of one VM, shared by its vCPU threads (which report traps) and the
/// `Vm` (which arms, waits and resumes).
#[derive(Default)]
pub(crate) struct DebugTraps {
    state: Mutex<TrapState>,
    changed: Condvar,
}

impl DebugTraps {
    /// Replaces the armed set: removes the old traps, then saves the bytes under and writes
    /// the new ones. Every vCPU must be parked.
    pub(crate) fn arm(
        &self,
        mem: &GuestMemoryMmap,
        breakpoints: &[Breakpoint],
    ) -> Result<(), DebugError> {
        if breakpoints.len() > MAX_BREAKPOINTS {
            return Err(DebugError::TooMany(breakpoints.len()));
        }
        for (i, a) in breakpoints.iter().enumerate() {
            if let Some(b) = breakpoints[..i].iter().find(|b| a.gpa.abs_diff(b.gpa) < TRAP_LEN) {
                return Err(DebugError::Overlap(b.addr));
            }
        }
        let mut state = lock(&self.state);
        for armed in std::mem::take(&mut state.armed) {
            write(mem, armed.at, &armed.original)?;
        }
        for &at in breakpoints {
            let mut bytes = [0u8; 4];
            mem.read_slice(&mut bytes, GuestAddress(at.gpa)).map_err(memory_error(at))?;
            patch(mem, at)?;
            state.armed.push(Armed {
                at,
                original: [bytes[0], bytes[1]],
                endbr64: bytes == ENDBR64,
            });
        }
        Ok(())
    }

    /// Called by a vCPU thread on an `out` to [`TRAP_PORT`] with its RIP: records a trap and
    /// returns true if an armed breakpoint is there (KVM reports the exit with RIP on the
    /// `out`; one already past it is accepted too).
    pub(crate) fn trap(&self, vcpu: usize, rip: u64) -> bool {
        let mut state = lock(&self.state);
        let at = |addr: u64| state.armed.iter().find(|a| a.at.addr == addr);
        let Some(armed) = at(rip).or_else(|| rip.checked_sub(TRAP_LEN).and_then(at)) else {
            return false;
        };
        let event = DebugEvent { vcpu, pc: armed.at.addr };
        state.unclaimed.push_back(event);
        state.trapped.push((event, false));
        self.changed.notify_all();
        true
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
                if let Some(entry) = state.trapped.iter_mut().find(|(e, _)| *e == event) {
                    entry.1 = true;
                }
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

    /// Ends the current pause: what each vCPU parked on a trap must do before running.
    /// Unclaimed traps are forgotten; their vCPUs hit the breakpoint again and report anew.
    pub(crate) fn take_trapped(&self) -> Vec<(usize, Resume)> {
        let mut state = lock(&self.state);
        state.unclaimed.clear();
        let trapped = std::mem::take(&mut state.trapped);
        trapped
            .into_iter()
            .map(|(event, claimed)| {
                let pc = event.pc;
                let action = match state.armed.iter().find(|a| a.at.addr == pc) {
                    None => Resume::Run { pc },
                    Some(_) if !claimed => Resume::Retrap { pc },
                    Some(a) if a.endbr64 => Resume::Skip { pc, len: ENDBR64.len() as u64 },
                    Some(a) => Resume::Step { pc, bp: a.at, original: a.original },
                };
                (event.vcpu, action)
            })
            .collect()
    }
}

/// Writes `bytes` over the breakpoint's instruction.
pub(crate) fn write(mem: &GuestMemoryMmap, at: Breakpoint, bytes: &[u8]) -> Result<(), DebugError> {
    mem.write_slice(bytes, GuestAddress(at.gpa)).map_err(memory_error(at))
}

/// Writes the trap over the breakpoint's instruction.
pub(crate) fn patch(mem: &GuestMemoryMmap, at: Breakpoint) -> Result<(), DebugError> {
    write(mem, at, &TRAP)
}

fn memory_error(at: Breakpoint) -> impl FnOnce(vm_memory::GuestMemoryError) -> DebugError {
    move |source| DebugError::Memory { addr: at.addr, gpa: at.gpa, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        // An IBT function entry at TEXT, a `push %rbp; mov %rsp,%rbp` at TEXT+0x10.
        mem.write_slice(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55], GuestAddress(TEXT)).unwrap();
        mem.write_slice(&[0x55, 0x48, 0x89, 0xe5], GuestAddress(TEXT + 0x10)).unwrap();
        mem
    }

    fn bp(offset: u64) -> Breakpoint {
        Breakpoint { addr: 0xffff_ffff_8100_0000 + offset, gpa: TEXT + offset }
    }

    fn bytes(mem: &GuestMemoryMmap, offset: u64) -> [u8; 2] {
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(TEXT + offset)).unwrap();
        b
    }

    #[test]
    fn arming_patches_the_trap_and_rearming_restores_the_code() {
        let (mem, traps) = (memory(), DebugTraps::default());
        traps.arm(&mem, &[bp(0), bp(0x10)]).unwrap();
        assert_eq!(bytes(&mem, 0), TRAP);
        assert_eq!(bytes(&mem, 0x10), TRAP);
        traps.arm(&mem, &[bp(0x10)]).unwrap();
        assert_eq!(bytes(&mem, 0), [0xf3, 0x0f]);
        assert_eq!(bytes(&mem, 0x10), TRAP);
        traps.arm(&mem, &[]).unwrap();
        assert_eq!(bytes(&mem, 0x10), [0x55, 0x48]);
    }

    #[test]
    fn refuses_overlapping_and_too_many_breakpoints() {
        let (mem, traps) = (memory(), DebugTraps::default());
        assert!(matches!(traps.arm(&mem, &[bp(0), bp(1)]), Err(DebugError::Overlap(_))));
        let many: Vec<_> = (0..=MAX_BREAKPOINTS as u64).map(|i| bp(4 * i)).collect();
        assert!(matches!(traps.arm(&mem, &many), Err(DebugError::TooMany(17))));
        // Nothing was patched by a refused request.
        assert_eq!(bytes(&mem, 0), [0xf3, 0x0f]);
        let beyond = Breakpoint { addr: 0, gpa: 0x20_0000 };
        assert!(matches!(traps.arm(&mem, &[beyond]), Err(DebugError::Memory { .. })));
    }

    #[test]
    fn traps_only_at_armed_addresses_and_resume_each_vcpu_its_way() {
        let (mem, traps) = (memory(), DebugTraps::default());
        traps.arm(&mem, &[bp(0), bp(0x10)]).unwrap();
        assert!(!traps.trap(0, bp(0x20).addr), "an out to the port elsewhere is not a trap");
        assert!(traps.trap(1, bp(0).addr));
        // Reported with RIP already past the `out`: the same breakpoint.
        assert!(traps.trap(0, bp(0x10).addr + 2));
        // ... unless a breakpoint is armed right there.
        let adjacent = DebugTraps::default();
        adjacent.arm(&mem, &[bp(0x20), bp(0x22)]).unwrap();
        assert!(adjacent.trap(3, bp(0x22).addr));
        assert_eq!(
            adjacent.wait(Some(Duration::ZERO)),
            Some(DebugEvent { vcpu: 3, pc: bp(0x22).addr })
        );
        assert!(traps.trap(2, bp(0x10).addr));
        assert_eq!(traps.wait(Some(Duration::ZERO)), Some(DebugEvent { vcpu: 1, pc: bp(0).addr }));
        assert_eq!(
            traps.wait(Some(Duration::ZERO)),
            Some(DebugEvent { vcpu: 0, pc: bp(0x10).addr })
        );
        let resume = traps.take_trapped();
        assert_eq!(
            resume,
            vec![
                (1, Resume::Skip { pc: bp(0).addr, len: 4 }),
                (0, Resume::Step { pc: bp(0x10).addr, bp: bp(0x10), original: [0x55, 0x48] }),
                (2, Resume::Retrap { pc: bp(0x10).addr }),
            ]
        );
        // The unclaimed trap of vCPU 2 is gone; it will trap again when it runs.
        assert_eq!(traps.wait(Some(Duration::from_millis(1))), None);
        traps.vm_ended();
        assert_eq!(traps.wait(None), None);
    }

    #[test]
    fn a_breakpoint_disarmed_while_paused_just_runs_on() {
        let (mem, traps) = (memory(), DebugTraps::default());
        traps.arm(&mem, &[bp(0x10)]).unwrap();
        assert!(traps.trap(0, bp(0x10).addr));
        traps.wait(Some(Duration::ZERO)).unwrap();
        traps.arm(&mem, &[]).unwrap();
        assert_eq!(traps.take_trapped(), vec![(0, Resume::Run { pc: bp(0x10).addr })]);
    }
}
