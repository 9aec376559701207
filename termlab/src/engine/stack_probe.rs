//! Watching the kernel's termination handler from the VMM (issue 6).
//!
//! Around a terminate call of a `verify_stack` scenario, breakpoints stop
//! each vCPU at the entry of `bpf_die` and again at the probe of its trace
//! event (`trace_event_raw_event_bpf_prog_terminate`), which the handler
//! calls once it has rewritten the interrupted context and nothing else
//! calls. At both stops the interrupted context is read through the guest's
//! page tables: its saved IP (the `pt_regs` behind the per-CPU
//! `__irq_regs`, which patch 0001 publishes for call-function IPIs) and the
//! stack words from its saved sp to the top of its stack. The two
//! snapshots are then judged by [`crate::stack_proof::verify`].
//!
//! The breakpoints are the VMM's port-I/O traps (see `vmm/src/debug.rs`):
//! patched into guest code only between `arm` and `disarm`, so runs without
//! `verify_stack` and everything outside the terminate call run untouched.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use termlab_introspect::context::{KernelCpu, Stack};
use termlab_introspect::paging::PageTables;
use termlab_introspect::symbols::SymbolTable;
use termlab_vmm::{Breakpoint, DebugEvent, Vm};

use crate::results::stack::CpuStackProof;
use crate::stack_proof::{self, StackSnapshot, StackWords, TermMap};

/// The handler's entry.
const ENTRY_SYMBOL: &str = "bpf_die";
/// Called by the handler after the rewrite, only for this event (enabled by
/// the harness whenever a scenario terminates).
const AFTER_SYMBOL: &str = "trace_event_raw_event_bpf_prog_terminate";
/// Per-CPU pointer to the interrupted registers of the current interrupt.
const IRQ_REGS_SYMBOL: &str = "__irq_regs";
/// How long one wait for a breakpoint hit lasts before checking whether
/// the terminate call has returned.
const POLL: Duration = Duration::from_millis(20);

/// Breakpoint addresses, symbols and instruction maps for one guest.
pub struct StackProbe<'vm> {
    vm: &'vm Vm,
    symbols: SymbolTable,
    kernel_text: Range<u64>,
    entry: u64,
    after: u64,
    irq_regs: u64,
    maps: BTreeMap<u32, TermMap>,
}

fn symbol(table: &SymbolTable, name: &str) -> Result<u64, String> {
    table.addr(name).ok_or_else(|| format!("`{name}` is not in the kernel's System.map: is this a termlab kernel with CONFIG_BPF_TERMINATION?"))
}

impl<'vm> StackProbe<'vm> {
    /// `system_map` is the booted kernel's, `kallsyms` the guest's
    /// /proc/kallsyms (it names the BPF images), `maps` the kernel's map of
    /// each loaded program.
    pub fn new(
        vm: &'vm Vm,
        system_map: &str,
        kallsyms: &str,
        maps: BTreeMap<u32, TermMap>,
    ) -> Result<Self, String> {
        let kernel = SymbolTable::parse(system_map).map_err(|e| format!("System.map: {e}"))?;
        let (entry, after, irq_regs) = (
            symbol(&kernel, ENTRY_SYMBOL)?,
            symbol(&kernel, AFTER_SYMBOL)?,
            symbol(&kernel, IRQ_REGS_SYMBOL)?,
        );
        let kernel_text = symbol(&kernel, "_stext")?..symbol(&kernel, "_etext")?;
        let guest = SymbolTable::parse(kallsyms).map_err(|e| format!("/proc/kallsyms: {e}"))?;
        Ok(Self { vm, symbols: kernel.merge(guest), kernel_text, entry, after, irq_regs, maps })
    }

    /// Runs `call` (the terminate request) with the handler watched, and
    /// judges every vCPU the handler ran on for program `prog_id`.
    pub fn around<R: Send>(
        &self,
        prog_id: u32,
        call: impl FnOnce() -> R + Send,
    ) -> Result<(R, Vec<CpuStackProof>), String> {
        let map = self.maps.get(&prog_id).ok_or_else(|| {
            format!("no instruction map of program {prog_id}: prog_term_map did not run for it")
        })?;
        self.arm()?;
        let returned = AtomicBool::new(false);
        let (result, watched) = std::thread::scope(|scope| {
            let caller = scope.spawn(|| {
                let result = call();
                returned.store(true, Ordering::Release);
                result
            });
            let watched = self.watch(&returned, map);
            (caller.join(), watched)
        });
        let disarmed = self.disarm();
        let result = result.map_err(|_| "the terminate call panicked".to_owned())?;
        let proofs = watched?;
        disarmed?;
        Ok((result, proofs))
    }

    fn arm(&self) -> Result<(), String> {
        self.vm.pause().map_err(|e| format!("pausing the VM to arm breakpoints: {e}"))?;
        let armed = self.kernel_breakpoints().and_then(|breakpoints| {
            self.vm.set_breakpoints(&breakpoints).map_err(|e| e.to_string())
        });
        let resumed = self.vm.resume().map_err(|e| format!("resuming the VM: {e}"));
        armed
            .map_err(|e| format!("arming breakpoints on {ENTRY_SYMBOL} and {AFTER_SYMBOL}: {e}"))?;
        resumed
    }

    /// The breakpoints, translated through the page tables of the first vCPU that
    /// maps the kernel text: a paused vCPU may be in user mode, and its tables need
    /// not map the kernel (page-table isolation).
    fn kernel_breakpoints(&self) -> Result<Vec<Breakpoint>, String> {
        let mut last_error = String::from("no vCPU");
        for vcpu in 0..self.vm.vcpu_count() {
            let tables = match self
                .vm
                .sregs(vcpu)
                .map_err(|e| e.to_string())
                .and_then(|sregs| PageTables::from_sregs(&sregs).map_err(|e| e.to_string()))
            {
                Ok(tables) => tables,
                Err(error) => {
                    last_error = format!("vCPU {vcpu}: {error}");
                    continue;
                }
            };
            match [self.entry, self.after]
                .iter()
                .map(|&addr| tables.breakpoint(self.vm.memory(), addr))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(breakpoints) => return Ok(breakpoints),
                Err(error) => last_error = format!("vCPU {vcpu}: {error}"),
            }
        }
        Err(last_error)
    }

    fn disarm(&self) -> Result<(), String> {
        self.vm.pause().map_err(|e| format!("pausing the VM to disarm breakpoints: {e}"))?;
        let disarmed =
            self.vm.set_breakpoints(&[]).map_err(|e| format!("disarming breakpoints: {e}"));
        let resumed = self.vm.resume().map_err(|e| format!("resuming the VM: {e}"));
        disarmed.and(resumed)
    }

    /// Handles hits until the call has returned and no hit is pending.
    fn watch(&self, returned: &AtomicBool, map: &TermMap) -> Result<Vec<CpuStackProof>, String> {
        let mut before: BTreeMap<usize, StackSnapshot> = BTreeMap::new();
        let mut proofs = Vec::new();
        loop {
            let done = returned.load(Ordering::Acquire);
            let Some(event) = self.vm.wait_debug_event(Some(POLL)) else {
                if done {
                    break;
                }
                continue;
            };
            let handled = self.on_hit(event, map, &mut before, &mut proofs);
            self.vm.resume().map_err(|e| format!("resuming after a breakpoint: {e}"))?;
            handled?;
        }
        // Entered the handler but never reached the rewrite's end: the
        // program had already left that CPU.
        proofs.extend(before.into_keys().map(|vcpu| CpuStackProof {
            vcpu,
            verdict: None,
            error: Some(format!(
                "{ENTRY_SYMBOL} ran but did not rewrite: the program had left this CPU"
            )),
        }));
        proofs.sort_by_key(|p| p.vcpu);
        Ok(proofs)
    }

    fn on_hit(
        &self,
        event: DebugEvent,
        map: &TermMap,
        before: &mut BTreeMap<usize, StackSnapshot>,
        proofs: &mut Vec<CpuStackProof>,
    ) -> Result<(), String> {
        let vcpu = event.vcpu;
        let cpu = KernelCpu::of_vcpu(self.vm, vcpu).map_err(|e| format!("vCPU {vcpu}: {e}"))?;
        let snapshot =
            self.interrupted(&cpu).map_err(|e| format!("vCPU {vcpu} at {:#x}: {e}", event.pc));
        if event.pc == self.entry {
            before.insert(vcpu, snapshot?);
        } else if event.pc == self.after {
            let proof = match (before.remove(&vcpu), snapshot) {
                (Some(first), Ok(second)) => {
                    let same_code =
                        |func: usize, insn: usize| self.same_code(&cpu, map, func, insn);
                    let symbol =
                        |addr: u64| self.symbols.symbolize_text(addr).map(|at| at.to_string());
                    CpuStackProof {
                        vcpu,
                        verdict: Some(stack_proof::verify(
                            &first,
                            &second,
                            map,
                            &self.kernel_text,
                            &same_code,
                            &symbol,
                        )),
                        error: None,
                    }
                }
                (None, _) => CpuStackProof {
                    vcpu,
                    verdict: None,
                    error: Some(format!("{AFTER_SYMBOL} was hit without {ENTRY_SYMBOL} before it")),
                },
                (Some(_), Err(error)) => CpuStackProof { vcpu, verdict: None, error: Some(error) },
            };
            proofs.push(proof);
        }
        Ok(())
    }

    /// The interrupted context of the IPI this vCPU is handling.
    fn interrupted(&self, cpu: &KernelCpu) -> Result<StackSnapshot, String> {
        let context = cpu
            .interrupted(self.vm.memory(), self.irq_regs)
            .map_err(|e| e.to_string())?
            .ok_or("no interrupted registers (__irq_regs is NULL)")?;
        let stack = context.stack.ok_or("the interrupted context is user mode")?;
        let stacks = std::iter::once(stack)
            .chain(context.below)
            .map(|Stack { sp, words, .. }| StackWords { sp, words })
            .collect();
        Ok(StackSnapshot { ip: context.regs.ip, stacks })
    }

    /// Whether instruction `insn` of function `func` has the same native
    /// code in the program and in the copy (then an address inside it keeps
    /// its offset); unreadable code counts as different.
    fn same_code(&self, cpu: &KernelCpu, map: &TermMap, func: usize, insn: usize) -> bool {
        let Some((prog, copy)) = map.insn_code(func, insn) else { return false };
        let read = |range: Range<u64>| {
            let mut bytes = vec![0u8; (range.end - range.start) as usize];
            cpu.tables.read(self.vm.memory(), range.start, &mut bytes).ok().map(|()| bytes)
        };
        prog.end - prog.start == copy.end - copy.start
            && matches!((read(prog), read(copy)), (Some(a), Some(b)) if a == b)
    }
}
