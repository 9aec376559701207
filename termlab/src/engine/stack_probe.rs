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
//! A terminate step with `host_stall_ms` has the VMM park the whole guest,
//! every vCPU, that long at the first `smp_call_function_single_async` of
//! the call (the kernel sends each CPU its stop interrupt with it), the way
//! a host that deschedules its guest would: the guest's clock runs on.
//!
//! The breakpoints are the VMM's port-I/O traps (see `vmm/src/debug.rs`):
//! patched into guest code only between `arm` and `disarm`, so runs without
//! `verify_stack` or a stall and everything outside the terminate call run
//! untouched.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use termlab_introspect::context::{ContextError, KernelCpu, Stack};
use termlab_introspect::paging::{PageTables, WalkError};
use termlab_introspect::symbols::{SymbolError, SymbolTable};
use termlab_vmm::{Breakpoint, DebugEvent, Vm};
use thiserror::Error;

use crate::results::stack::CpuStackProof;
use crate::stack_proof::{self, StackSnapshot, StackWords, TermMap};

/// The handler's entry.
const ENTRY_SYMBOL: &str = "bpf_die";
/// Called by the handler after the rewrite, only for this event (enabled by
/// the harness whenever a scenario terminates).
const AFTER_SYMBOL: &str = "trace_event_raw_event_bpf_prog_terminate";
/// Per-CPU pointer to the interrupted registers of the current interrupt.
const IRQ_REGS_SYMBOL: &str = "__irq_regs";
/// How the terminate call sends each CPU its stop interrupt (patch 0022):
/// where a host stall parks the guest.
const STALL_SYMBOL: &str = "smp_call_function_single_async";
/// How long one wait for a breakpoint hit lasts before checking whether
/// the terminate call has returned.
const POLL: Duration = Duration::from_millis(20);

/// Why the VMM-side stack check could not watch a terminate call.
#[derive(Debug, Error)]
pub enum StackProbeError {
    #[error("`{0}` is not in the kernel's System.map: is this a termlab kernel with CONFIG_BPF_TERMINATION?")]
    MissingSymbol(&'static str),
    /// `table`: "System.map" or "/proc/kallsyms".
    #[error("{table}: {source}")]
    Symbols {
        table: &'static str,
        #[source]
        source: SymbolError,
    },
    #[error("no instruction map of program {0}: prog_term_map did not run for it")]
    NoInstructionMap(u32),
    /// Pausing or resuming the VM, or setting its breakpoints, failed;
    /// `doing` says which (and when).
    #[error("{doing}: {source}")]
    Vm {
        doing: &'static str,
        #[source]
        source: termlab_vmm::Error,
    },
    /// The VMM refused the breakpoints.
    #[error("arming breakpoints on {0}: {source}", .symbols.join(", "))]
    Arm {
        symbols: Vec<&'static str>,
        #[source]
        source: termlab_vmm::Error,
    },
    /// No vCPU's page tables map the breakpoints' addresses.
    #[error("arming breakpoints on {0}: {unmapped}", .symbols.join(", "))]
    KernelUnmapped { symbols: Vec<&'static str>, unmapped: UnmappedOn },
    #[error("the terminate call panicked")]
    CallPanicked,
    /// The kernel state of the vCPU that hit a breakpoint could not be read.
    #[error("vCPU {vcpu}: {source}")]
    Cpu {
        vcpu: usize,
        #[source]
        source: ContextError,
    },
    /// The interrupted context at a breakpoint could not be read.
    #[error("vCPU {vcpu} at {pc:#x}: {source}")]
    Snapshot {
        vcpu: usize,
        pc: u64,
        #[source]
        source: SnapshotError,
    },
}

/// Why the last vCPU tried could not place the breakpoints (none: the VM has no vCPU).
#[derive(Debug, Error)]
pub enum UnmappedOn {
    #[error("no vCPU")]
    NoVcpu,
    #[error("vCPU {vcpu}: {source}")]
    Registers {
        vcpu: usize,
        #[source]
        source: termlab_vmm::Error,
    },
    #[error("vCPU {vcpu}: {source}")]
    Walk {
        vcpu: usize,
        #[source]
        source: WalkError,
    },
}

/// Why a breakpoint hit has no interrupted kernel context to judge.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Read(#[from] ContextError),
    #[error("no interrupted registers (__irq_regs is NULL)")]
    NoIrqRegs,
    #[error("the interrupted context is user mode")]
    UserMode,
}

/// Wraps a VMM error with what the probe was doing.
fn vm_error(doing: &'static str) -> impl FnOnce(termlab_vmm::Error) -> StackProbeError {
    move |source| StackProbeError::Vm { doing, source }
}

/// Breakpoint addresses, symbols and instruction maps for one guest.
pub struct StackProbe<'vm> {
    vm: &'vm Vm,
    symbols: SymbolTable,
    kernel_text: Range<u64>,
    entry: u64,
    after: u64,
    /// Where a host stall parks the guest; `None` in a kernel without it.
    stall_at: Option<u64>,
    irq_regs: u64,
    maps: BTreeMap<u32, TermMap>,
}

/// The probe as one repetition uses it: `stacks` when `verify_stack` reads the
/// handler's stacks in that repetition.
#[derive(Clone, Copy)]
pub struct RepetitionProbe<'p, 'vm> {
    pub probe: &'p StackProbe<'vm>,
    pub stacks: bool,
}

/// What the probe does around one terminate call.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    /// Read the handler's stacks and judge the rewrite (`verify_stack`).
    pub stacks: bool,
    /// Park the guest this long at the call's first stop interrupt (`host_stall_ms`).
    pub host_stall: Option<Duration>,
}

/// What the probe saw during one terminate call.
#[derive(Debug, Default)]
pub struct Watched {
    /// One verdict per vCPU the handler ran on (with `stacks`).
    pub stack: Vec<CpuStackProof>,
    /// How long the guest was parked; `None` if no stop interrupt was sent.
    pub host_stall: Option<Duration>,
}

fn symbol(table: &SymbolTable, name: &'static str) -> Result<u64, StackProbeError> {
    table.addr(name).ok_or(StackProbeError::MissingSymbol(name))
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
    ) -> Result<Self, StackProbeError> {
        let kernel = SymbolTable::parse(system_map)
            .map_err(|source| StackProbeError::Symbols { table: "System.map", source })?;
        let (entry, after, irq_regs) = (
            symbol(&kernel, ENTRY_SYMBOL)?,
            symbol(&kernel, AFTER_SYMBOL)?,
            symbol(&kernel, IRQ_REGS_SYMBOL)?,
        );
        let kernel_text = symbol(&kernel, "_stext")?..symbol(&kernel, "_etext")?;
        let guest = SymbolTable::parse(kallsyms)
            .map_err(|source| StackProbeError::Symbols { table: "/proc/kallsyms", source })?;
        let stall_at = kernel.addr(STALL_SYMBOL);
        Ok(Self {
            vm,
            symbols: kernel.merge(guest),
            kernel_text,
            entry,
            after,
            stall_at,
            irq_regs,
            maps,
        })
    }

    /// Whether prog_term_map gave the kernel's instruction map of program `prog_id` (it has
    /// a termination copy).
    pub fn has_instruction_map(&self, prog_id: u32) -> bool {
        self.maps.contains_key(&prog_id)
    }

    /// Runs `call` (the terminate request) with the VMM watching as `watch` says; with
    /// `stacks`, judges every vCPU the handler ran on for program `prog_id`.
    pub fn around<R: Send>(
        &self,
        prog_id: u32,
        watch: Watch,
        call: impl FnOnce() -> R + Send,
    ) -> Result<(R, Watched), StackProbeError> {
        let map = match watch.stacks {
            true => {
                Some(self.maps.get(&prog_id).ok_or(StackProbeError::NoInstructionMap(prog_id))?)
            }
            false => None,
        };
        self.arm(&self.breakpoints(watch)?)?;
        let returned = AtomicBool::new(false);
        let (result, watched) = std::thread::scope(|scope| {
            let caller = scope.spawn(|| {
                let result = call();
                returned.store(true, Ordering::Release);
                result
            });
            let watched = self.watch(&returned, map, watch.host_stall);
            (caller.join(), watched)
        });
        let disarmed = self.disarm();
        let result = result.map_err(|_| StackProbeError::CallPanicked)?;
        let watched = watched?;
        disarmed?;
        Ok((result, watched))
    }

    /// `watch`'s breakpoints: each symbol with its guest address.
    fn breakpoints(&self, watch: Watch) -> Result<Vec<(&'static str, u64)>, StackProbeError> {
        let stall = match watch.host_stall {
            Some(_) => Some(self.stall_at.ok_or(StackProbeError::MissingSymbol(STALL_SYMBOL))?),
            None => None,
        };
        let stacks = [(ENTRY_SYMBOL, self.entry), (AFTER_SYMBOL, self.after)];
        let stacks = stacks.into_iter().filter(|_| watch.stacks);
        Ok(stacks.chain(stall.map(|addr| (STALL_SYMBOL, addr))).collect())
    }

    fn arm(&self, breakpoints: &[(&'static str, u64)]) -> Result<(), StackProbeError> {
        let symbols = || breakpoints.iter().map(|&(symbol, _)| symbol).collect();
        self.vm.pause().map_err(vm_error("pausing the VM to arm breakpoints"))?;
        let armed = self
            .kernel_breakpoints(breakpoints)
            .map_err(|unmapped| StackProbeError::KernelUnmapped { symbols: symbols(), unmapped })
            .and_then(|breakpoints| {
                self.vm
                    .set_breakpoints(&breakpoints)
                    .map_err(|source| StackProbeError::Arm { symbols: symbols(), source })
            });
        let resumed = self.vm.resume().map_err(vm_error("resuming the VM"));
        armed?;
        resumed
    }

    /// The breakpoints, translated through the page tables of the first vCPU that
    /// maps the kernel text: a paused vCPU may be in user mode, and its tables need
    /// not map the kernel (page-table isolation).
    fn kernel_breakpoints(
        &self,
        breakpoints: &[(&'static str, u64)],
    ) -> Result<Vec<Breakpoint>, UnmappedOn> {
        let mut last_error = UnmappedOn::NoVcpu;
        for vcpu in 0..self.vm.vcpu_count() {
            let sregs = match self.vm.sregs(vcpu) {
                Ok(sregs) => sregs,
                Err(source) => {
                    last_error = UnmappedOn::Registers { vcpu, source };
                    continue;
                }
            };
            let tables = match PageTables::from_sregs(&sregs) {
                Ok(tables) => tables,
                Err(source) => {
                    last_error = UnmappedOn::Walk { vcpu, source };
                    continue;
                }
            };
            match breakpoints
                .iter()
                .map(|&(_, addr)| tables.breakpoint(self.vm.memory(), addr))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(breakpoints) => return Ok(breakpoints),
                Err(source) => last_error = UnmappedOn::Walk { vcpu, source },
            }
        }
        Err(last_error)
    }

    fn disarm(&self) -> Result<(), StackProbeError> {
        self.vm.pause().map_err(vm_error("pausing the VM to disarm breakpoints"))?;
        let disarmed = self.vm.set_breakpoints(&[]).map_err(vm_error("disarming breakpoints"));
        let resumed = self.vm.resume().map_err(vm_error("resuming the VM"));
        disarmed.and(resumed)
    }

    /// Handles hits until the call has returned and no hit is pending. A hit it fails to
    /// read does not end the watch: a hit parks the whole VM until it is resumed, so a watch
    /// that stopped at the first error would leave the handler's next hit (its rewrite's
    /// end) parked, the terminate call unanswered and the guest looking hung. The first
    /// error is returned once the call has returned. The first hit of the stall's
    /// breakpoint keeps the guest parked for `host_stall`; later ones resume it at once.
    fn watch(
        &self,
        returned: &AtomicBool,
        map: Option<&TermMap>,
        host_stall: Option<Duration>,
    ) -> Result<Watched, StackProbeError> {
        let mut before: BTreeMap<usize, StackSnapshot> = BTreeMap::new();
        let mut watched = Watched::default();
        let mut first_error = None;
        loop {
            let done = returned.load(Ordering::Acquire);
            let Some(event) = self.vm.wait_debug_event(Some(POLL)) else {
                if done {
                    break;
                }
                continue;
            };
            let handled = match (map, host_stall) {
                (_, Some(stall)) if Some(event.pc) == self.stall_at => {
                    if watched.host_stall.is_none() {
                        let parked = Instant::now();
                        std::thread::sleep(stall);
                        watched.host_stall = Some(parked.elapsed());
                    }
                    Ok(())
                }
                (Some(map), _) => self.on_hit(event, map, &mut before, &mut watched.stack),
                (None, _) => Ok(()),
            };
            self.vm.resume().map_err(vm_error("resuming after a breakpoint"))?;
            if let Err(error) = handled {
                first_error.get_or_insert(error);
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        // Entered the handler but never reached the rewrite's end: the kernel
        // found nothing to stop on that CPU (the call's answer says why).
        watched.stack.extend(before.into_keys().map(|vcpu| CpuStackProof {
            vcpu,
            verdict: None,
            error: None,
            untouched: true,
        }));
        watched.stack.sort_by_key(|p| p.vcpu);
        Ok(watched)
    }

    fn on_hit(
        &self,
        event: DebugEvent,
        map: &TermMap,
        before: &mut BTreeMap<usize, StackSnapshot>,
        proofs: &mut Vec<CpuStackProof>,
    ) -> Result<(), StackProbeError> {
        let vcpu = event.vcpu;
        let cpu = KernelCpu::of_vcpu(self.vm, vcpu)
            .map_err(|source| StackProbeError::Cpu { vcpu, source })?;
        let snapshot = self.interrupted(&cpu).map_err(|source| StackProbeError::Snapshot {
            vcpu,
            pc: event.pc,
            source,
        });
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
                        untouched: false,
                    }
                }
                (None, _) => CpuStackProof {
                    vcpu,
                    verdict: None,
                    error: Some(format!("{AFTER_SYMBOL} was hit without {ENTRY_SYMBOL} before it")),
                    untouched: false,
                },
                (Some(_), Err(error)) => CpuStackProof {
                    vcpu,
                    verdict: None,
                    error: Some(error.to_string()),
                    untouched: false,
                },
            };
            proofs.push(proof);
        }
        Ok(())
    }

    /// The interrupted context of the IPI this vCPU is handling.
    fn interrupted(&self, cpu: &KernelCpu) -> Result<StackSnapshot, SnapshotError> {
        let context =
            cpu.interrupted(self.vm.memory(), self.irq_regs)?.ok_or(SnapshotError::NoIrqRegs)?;
        let stack = context.stack.ok_or(SnapshotError::UserMode)?;
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
