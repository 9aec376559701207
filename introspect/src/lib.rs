//! termlab-introspect: reads a paused termlab guest from the host, to check what the guest
//! kernel did without taking its word for it.
//!
//! - [`paging`]: guest virtual → physical by walking the guest's page tables (4- and 5-level,
//!   2 MiB / 1 GiB pages), and virtual reads across page boundaries.
//! - [`symbols`]: System.map and /proc/kallsyms (BPF images included), `symbol+offset`
//!   names, and labelled address ranges for classifying words.
//! - [`context`]: per-CPU variables, the interrupted `pt_regs` behind `__irq_regs`, and
//!   stack words up to the top of a stack.
//!
//! The VMM stops vCPUs at hardware breakpoints (`Vm::set_hw_breakpoints`,
//! `Vm::wait_debug_event`); this crate reads what they stopped on through `Vm::memory()` and
//! `Vm::sregs()`. It knows nothing of BPF beyond the kallsyms line format.
//!
//! ```no_run
//! use std::time::Duration;
//! use termlab_introspect::{context::KernelCpu, symbols::SymbolTable};
//! # fn demo(vm: &termlab_vmm::Vm, system_map: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let symbols = SymbolTable::parse(system_map)?;
//! let target = symbols.addr("__x64_sys_getppid").ok_or("no such symbol")?;
//! vm.pause()?;
//! for vcpu in 0..vm.vcpu_count() {
//!     vm.set_hw_breakpoints(vcpu, &[target])?;
//! }
//! vm.resume()?;
//! if let Some(hit) = vm.wait_debug_event(Some(Duration::from_secs(60))) {
//!     let cpu = KernelCpu::of_vcpu(vm, hit.vcpu)?;
//!     let sp = vm.regs(hit.vcpu)?.rsp;
//!     let stack = termlab_introspect::context::read_stack(vm.memory(), &cpu.tables, sp, termlab_introspect::context::task_stack_top(sp))?;
//!     for (addr, word) in stack.iter() {
//!         if let Some(at) = symbols.symbolize(word) {
//!             println!("{addr:#x}: {word:#x} {at}");
//!         }
//!     }
//!     vm.resume()?; // steps over the breakpoint on the hitting vCPU
//! }
//! # Ok(()) }
//! ```

pub mod context;
pub mod paging;
pub mod symbols;
