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
//! The VMM stops vCPUs at breakpoints (`Vm::set_breakpoints`, `Vm::wait_debug_event`); this
//! crate places them by virtual address ([`paging::PageTables::breakpoint`]) and reads what
//! they stopped on through `Vm::memory()` and `Vm::sregs()`. It knows nothing of BPF beyond
//! the kallsyms line format.
//!
//! ```no_run
//! use std::time::Duration;
//! use termlab_introspect::context::{read_stack, task_stack_top, KernelCpu};
//! use termlab_introspect::paging::PageTables;
//! use termlab_introspect::symbols::SymbolTable;
//! # fn demo(vm: &termlab_vmm::Vm, system_map: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let symbols = SymbolTable::parse(system_map)?;
//! let target = symbols.addr("__x64_sys_getppid").ok_or("no such symbol")?;
//! vm.pause()?;
//! // Every address space maps the kernel alike (no PTI in the guest config).
//! let tables = PageTables::from_sregs(&vm.sregs(0)?)?;
//! vm.set_breakpoints(&[tables.breakpoint(vm.memory(), target)?])?;
//! vm.resume()?;
//! if let Some(hit) = vm.wait_debug_event(Some(Duration::from_secs(60))) {
//!     let cpu = KernelCpu::of_vcpu(vm, hit.vcpu)?;
//!     let sp = vm.regs(hit.vcpu)?.rsp;
//!     let stack = read_stack(vm.memory(), &cpu.tables, sp, task_stack_top(sp))?;
//!     for (addr, word) in stack.iter() {
//!         if let Some(at) = symbols.symbolize(word) {
//!             println!("{addr:#x}: {word:#x} {at}");
//!         }
//!     }
//!     vm.resume()?; // the hitting vCPU runs the instruction; the breakpoint stays armed
//! }
//! # Ok(()) }
//! ```

pub mod context;
pub mod paging;
pub mod symbols;
