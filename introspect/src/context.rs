//! What a vCPU stopped in guest kernel code was doing: its per-CPU data, the register frame
//! (`struct pt_regs`) of the context an interrupt cut off, and that context's stack.
//!
//! Layout facts, checked against the Linux 6.12 sources for the termlab guest config
//! (x86-64, SMP, VMAP_STACK, no KASAN, no FRED):
//! - per-CPU symbols in System.map are offsets from `__per_cpu_start` = 0, and a CPU in
//!   kernel mode has GS.base = its per-CPU area (`cpu_kernelmode_gs_base`), so a per-CPU
//!   variable lives at GS.base + its System.map value;
//! - `__irq_regs` (include/asm-generic/irq_regs.h) holds the `struct pt_regs *` of the
//!   interrupted context while an interrupt handler that called `set_irq_regs` runs (the
//!   guest series makes call-function IPIs do that), NULL otherwise;
//! - `struct pt_regs` (arch/x86/include/asm/ptrace.h) is 21 words, `ip` at byte 128, `sp`
//!   at 152;
//! - task stacks are THREAD_SIZE = 16 KiB (PAGE_SIZE << 2, KASAN_STACK_ORDER 0) and
//!   THREAD_SIZE aligned (`THREAD_ALIGN`), with no padding above the top pt_regs. IRQ stacks
//!   are the same size but only page aligned under VMAP_STACK, with an unmapped guard page
//!   above their top (`pcpu_hot.hardirq_stack_ptr + 8`): [`read_interrupted_stack`] stops
//!   there.

use termlab_vmm::{kvm_sregs, Vm};
use vm_memory::GuestMemory;

use crate::paging::{PageTables, WalkError, PAGE_SIZE};

/// Size and alignment of a guest task stack.
pub const THREAD_SIZE: u64 = 16 * 1024;
/// `sizeof(struct pt_regs)` on x86-64.
pub const PT_REGS_SIZE: usize = 21 * 8;
/// Kernel addresses have bit 63 set; a GS.base without it is a user value (the vCPU stopped
/// in user mode or in entry code before `swapgs`).
const KERNEL_HALF: u64 = 1 << 63;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("reading vCPU state: {0}")]
    Vm(#[from] termlab_vmm::Error),
    #[error("GS.base {0:#x} is not a kernel per-CPU area (vCPU not in kernel mode after swapgs)")]
    UserGsBase(u64),
    #[error("stack pointer {sp:#x} is above the stack top {top:#x}")]
    SpAboveTop { sp: u64, top: u64 },
}

/// `struct pt_regs` of x86-64, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub bp: u64,
    pub bx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub ax: u64,
    pub cx: u64,
    pub dx: u64,
    pub si: u64,
    pub di: u64,
    /// Syscall number on syscall entry, error code or -1 for exceptions and interrupts.
    pub orig_ax: u64,
    pub ip: u64,
    /// Low 16 bits: the selector (0x10 kernel, 0x33 user); FRED would use the rest.
    pub cs: u64,
    pub flags: u64,
    pub sp: u64,
    pub ss: u64,
}

impl PtRegs {
    pub fn from_bytes(bytes: &[u8; PT_REGS_SIZE]) -> Self {
        let mut words = le_words(bytes);
        let mut next = || words.next().unwrap_or_default();
        Self {
            r15: next(),
            r14: next(),
            r13: next(),
            r12: next(),
            bp: next(),
            bx: next(),
            r11: next(),
            r10: next(),
            r9: next(),
            r8: next(),
            ax: next(),
            cx: next(),
            dx: next(),
            si: next(),
            di: next(),
            orig_ax: next(),
            ip: next(),
            cs: next(),
            flags: next(),
            sp: next(),
            ss: next(),
        }
    }

    /// Reads the frame at guest virtual `addr`.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        tables: &PageTables,
        addr: u64,
    ) -> Result<Self, WalkError> {
        let mut bytes = [0u8; PT_REGS_SIZE];
        tables.read(mem, addr, &mut bytes)?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Whether the frame was pushed on entry from user mode (CPL 3 in the saved CS).
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// The words of a stack from `sp` (lowest address, most recently pushed) up to its top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub sp: u64,
    /// One past the highest byte of the stack.
    pub top: u64,
    pub words: Vec<u64>,
}

impl Stack {
    /// `(address, word)` pairs from `sp` upwards.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.words.iter().enumerate().map(|(i, &w)| (self.sp + 8 * i as u64, w))
    }

    /// The word stored at `addr`, if it lies in the captured range.
    pub fn word_at(&self, addr: u64) -> Option<u64> {
        let index = addr.checked_sub(self.sp)? / 8;
        (addr % 8 == self.sp % 8).then(|| self.words.get(index as usize).copied()).flatten()
    }
}

/// The top of the task stack holding `sp`: the next THREAD_SIZE boundary above it. `sp`
/// equal to a boundary is an empty stack ending there, not a full one below it.
pub fn task_stack_top(sp: u64) -> u64 {
    (sp.wrapping_sub(1) & !(THREAD_SIZE - 1)).wrapping_add(THREAD_SIZE)
}

/// The stack of an interrupted context, from `sp` up to the top of the stack that holds it.
/// A task stack ends at the next THREAD_SIZE boundary ([`task_stack_top`]). An IRQ stack
/// (a softirq or an interrupt cut off) is only page aligned under VMAP_STACK and, like every
/// vmap area, followed by an unmapped guard page: the boundary may lie past that guard, so
/// the stack ends at the first unmapped page below the boundary instead.
pub fn read_interrupted_stack<M: GuestMemory + ?Sized>(
    mem: &M,
    tables: &PageTables,
    sp: u64,
) -> Result<Stack, ContextError> {
    let boundary = task_stack_top(sp);
    // The page holding sp must be mapped; above it, the first unmapped page ends the stack.
    let mut top = (sp | (PAGE_SIZE - 1)).wrapping_add(1).min(boundary);
    while top < boundary {
        match tables.translate(mem, top) {
            Ok(_) => top += PAGE_SIZE,
            Err(WalkError::NotPresent { .. }) => break,
            Err(error) => return Err(error.into()),
        }
    }
    read_stack(mem, tables, sp, top)
}

/// The stack the kernel switched away from to `stack`, when `stack` is an IRQ stack: x86-64's
/// `call_on_irqstack` pushes the previous stack pointer as the IRQ stack's top word, and
/// `in_irq_stack()` (arch/x86/kernel/dumpstack_64.c) reads it back as the link to the stack
/// below. A softirq cut off by the IPI runs there on top of the interrupt frame of what it
/// interrupted, a BPF run say. A task stack's top word is its first pt_regs' `ss`, never a
/// kernel address. `None` when the top word is no pointer into another mapped stack.
pub fn stack_below<M: GuestMemory + ?Sized>(
    mem: &M,
    tables: &PageTables,
    stack: &Stack,
) -> Option<Stack> {
    let link = *stack.words.last()?;
    let plausible =
        link & KERNEL_HALF != 0 && link % 8 == 0 && !(stack.sp..=stack.top).contains(&link);
    plausible.then(|| read_interrupted_stack(mem, tables, link).ok()).flatten()
}

/// Reads the stack words from `sp` up to `top` (see [`task_stack_top`]).
pub fn read_stack<M: GuestMemory + ?Sized>(
    mem: &M,
    tables: &PageTables,
    sp: u64,
    top: u64,
) -> Result<Stack, ContextError> {
    let len = top.checked_sub(sp).ok_or(ContextError::SpAboveTop { sp, top })?;
    let mut bytes = vec![0u8; len as usize];
    tables.read(mem, sp, &mut bytes)?;
    Ok(Stack { sp, top, words: le_words(&bytes).collect() })
}

/// Little-endian 64-bit words of `bytes` (a trailing partial word is dropped).
fn le_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|w| w.iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b)))
}

/// A vCPU stopped in guest kernel mode: its address space and its per-CPU area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelCpu {
    pub tables: PageTables,
    /// GS.base: the start of this CPU's per-CPU area.
    pub percpu_base: u64,
}

impl KernelCpu {
    pub fn from_sregs(sregs: &kvm_sregs) -> Result<Self, ContextError> {
        let tables = PageTables::from_sregs(sregs)?;
        let percpu_base = sregs.gs.base;
        if percpu_base & KERNEL_HALF == 0 {
            return Err(ContextError::UserGsBase(percpu_base));
        }
        Ok(Self { tables, percpu_base })
    }

    /// Reads vCPU `vcpu`'s segment registers (the VM must be paused).
    pub fn of_vcpu(vm: &Vm, vcpu: usize) -> Result<Self, ContextError> {
        Self::from_sregs(&vm.sregs(vcpu)?)
    }

    /// Address of the per-CPU variable whose System.map value is `offset`.
    pub fn percpu_addr(&self, offset: u64) -> u64 {
        self.percpu_base.wrapping_add(offset)
    }

    pub fn read_percpu_u64<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
    ) -> Result<u64, WalkError> {
        self.tables.read_u64(mem, self.percpu_addr(offset))
    }

    /// The frame `__irq_regs` (per-CPU offset `irq_regs_offset`) points to, with its address;
    /// `None` when it is NULL, i.e. the CPU is not inside an interrupt that published one.
    pub fn irq_regs<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        irq_regs_offset: u64,
    ) -> Result<Option<(u64, PtRegs)>, WalkError> {
        match self.read_percpu_u64(mem, irq_regs_offset)? {
            0 => Ok(None),
            addr => Ok(Some((addr, PtRegs::read(mem, &self.tables, addr)?))),
        }
    }

    /// The interrupted context of an interrupt handler: its frame and, for kernel code, its
    /// stack from the saved sp to the top ([`read_interrupted_stack`]: the task stack, or the
    /// IRQ stack when a softirq was cut off). `None` outside such a handler.
    pub fn interrupted<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        irq_regs_offset: u64,
    ) -> Result<Option<Interrupted>, ContextError> {
        let Some((regs_addr, regs)) = self.irq_regs(mem, irq_regs_offset)? else {
            return Ok(None);
        };
        let stack = match regs.from_user() {
            true => None,
            false => Some(read_interrupted_stack(mem, &self.tables, regs.sp)?),
        };
        let below = stack.as_ref().and_then(|stack| stack_below(mem, &self.tables, stack));
        Ok(Some(Interrupted { regs_addr, regs, stack, below }))
    }
}

/// A context cut off by an interrupt, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    /// Where the frame is in guest virtual memory (on the interrupted task's stack).
    pub regs_addr: u64,
    pub regs: PtRegs,
    /// `None` when user mode was interrupted: its sp points into user memory.
    pub stack: Option<Stack>,
    /// When `stack` is an IRQ stack, the stack below it ([`stack_below`]).
    pub below: Option<Stack>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn pt_regs_fields_sit_at_the_kernel_offsets() {
        let mut bytes = [0u8; PT_REGS_SIZE];
        for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(i as u64 * 8).to_le_bytes());
        }
        let regs = PtRegs::from_bytes(&bytes);
        // Offsets from arch/x86/include/asm/ptrace.h.
        assert_eq!((regs.r15, regs.bp, regs.ax, regs.di), (0, 32, 80, 112));
        assert_eq!(
            (regs.orig_ax, regs.ip, regs.cs, regs.flags, regs.sp, regs.ss),
            (120, 128, 136, 144, 152, 160)
        );
        assert!(!regs.from_user());
        assert!(PtRegs { cs: 0x33, ..regs }.from_user());
    }

    #[test]
    fn task_stack_top_is_the_next_16k_boundary() {
        assert_eq!(task_stack_top(0xffff_c900_0001_3f58), 0xffff_c900_0001_4000);
        assert_eq!(task_stack_top(0xffff_c900_0001_0008), 0xffff_c900_0001_4000);
        // An empty stack: sp at the top itself.
        assert_eq!(task_stack_top(0xffff_c900_0001_4000), 0xffff_c900_0001_4000);
    }

    /// A guest with one 2 MiB page mapping virtual 0xffff_c900_0000_0000 to physical 2 MiB.
    fn guest_with_stack_page() -> (GuestMemoryMmap, PageTables) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000; index 402 = bits 39-47 of the address.
        mem.write_obj(0x2003u64, GuestAddress(0x1000 + 402 * 8)).unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x20_0083u64, GuestAddress(0x3000)).unwrap();
        (mem, PageTables::new(0x1000, false))
    }

    #[test]
    fn interrupted_context_follows_irq_regs_to_the_frame_and_its_stack() {
        let (mem, tables) = guest_with_stack_page();
        const BASE: u64 = 0xffff_c900_0000_0000;
        // Per-CPU area at BASE, __irq_regs at offset 0x298 pointing to a frame at BASE+0x7f00.
        let cpu = KernelCpu { tables, percpu_base: BASE };
        let irq_regs_offset = 0x298;
        assert_eq!(cpu.interrupted(&mem, irq_regs_offset).unwrap(), None);
        let frame = BASE + 0x7f00;
        mem.write_obj(frame, GuestAddress((2 << 20) + 0x298)).unwrap();
        let sp = BASE + 0x7fe0;
        let mut bytes = [0u8; PT_REGS_SIZE];
        bytes[128..136].copy_from_slice(&0xffff_ffff_a000_0a9cu64.to_le_bytes());
        bytes[152..160].copy_from_slice(&sp.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress((2 << 20) + 0x7f00)).unwrap();
        for (i, word) in [0x11u64, 0x22, 0x33, 0x44].iter().enumerate() {
            mem.write_obj(*word, GuestAddress((2 << 20) + 0x7fe0 + 8 * i as u64)).unwrap();
        }
        let got = cpu.interrupted(&mem, irq_regs_offset).unwrap().unwrap();
        let stack = got.stack.unwrap();
        assert_eq!(got.regs_addr, frame);
        assert_eq!(got.regs.ip, 0xffff_ffff_a000_0a9c);
        assert_eq!(stack.top, BASE + 0x8000);
        assert_eq!(stack.words, vec![0x11, 0x22, 0x33, 0x44]);
        assert_eq!(stack.word_at(sp + 16), Some(0x33));
        assert_eq!(stack.word_at(sp + 17), None);
        assert_eq!(stack.word_at(sp - 8), None);
        assert_eq!(stack.iter().last(), Some((sp + 24, 0x44)));
        // A frame from user mode: no kernel stack to read behind it.
        bytes[136..144].copy_from_slice(&0x33u64.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress((2 << 20) + 0x7f00)).unwrap();
        assert_eq!(cpu.interrupted(&mem, irq_regs_offset).unwrap().unwrap().stack, None);
    }

    /// A softirq cut off on the IRQ stack sits above the interrupt frame of what it
    /// interrupted on the task stack: the IRQ stack's top word links to it.
    #[test]
    fn an_irq_stack_links_to_the_stack_below_and_a_task_stack_does_not() {
        let (mem, tables) = guest_with_stack_page();
        const BASE: u64 = 0xffff_c900_0000_0000;
        let at = |addr: u64| GuestAddress((2 << 20) + (addr - BASE));
        // "IRQ stack" words at BASE+0x3ff0..0x4000, its top word the task stack's sp.
        let task_sp = BASE + 0x7fe8;
        mem.write_obj(0x5au64, at(BASE + 0x3ff0)).unwrap();
        mem.write_obj(task_sp, at(BASE + 0x3ff8)).unwrap();
        for (i, word) in [0xffff_ffff_a000_0a9cu64, 0x10, 0x2b].iter().enumerate() {
            mem.write_obj(*word, at(task_sp + 8 * i as u64)).unwrap();
        }
        let irq = read_interrupted_stack(&mem, &tables, BASE + 0x3ff0).unwrap();
        let below = stack_below(&mem, &tables, &irq).expect("the link is followed");
        assert_eq!((below.sp, below.top), (task_sp, BASE + 0x8000));
        assert_eq!(below.words, vec![0xffff_ffff_a000_0a9c, 0x10, 0x2b]);
        // The task stack's top word (a user ss) links nowhere; nor does a link into itself.
        assert_eq!(stack_below(&mem, &tables, &below), None);
        mem.write_obj(BASE + 0x3ff0, at(BASE + 0x3ff8)).unwrap();
        let irq = read_interrupted_stack(&mem, &tables, BASE + 0x3ff0).unwrap();
        assert_eq!(stack_below(&mem, &tables, &irq), None);
    }

    /// An IRQ stack is page aligned with an unmapped guard page above it: the stack of a
    /// context cut off on it ends at the guard, short of the next THREAD_SIZE boundary (seen
    /// in a nested run: the IPI landed in a softirq, and reading to the boundary failed).
    #[test]
    fn an_interrupted_stack_ends_at_the_guard_page_below_the_boundary() {
        let (mem, tables) = guest_with_stack_page();
        const BASE: u64 = 0xffff_c900_0020_0000;
        // The second 2 MiB of the region in 4 KiB pages (PT at 0x4000): pages 0-4 mapped to
        // physical 0x30_0000.., page 5 (the guard) not.
        mem.write_obj(0x4003u64, GuestAddress(0x3000 + 8)).unwrap();
        for page in 0..5u64 {
            mem.write_obj(0x30_0003 + page * 0x1000, GuestAddress(0x4000 + page * 8)).unwrap();
        }
        mem.write_obj(0xabcdu64, GuestAddress(0x30_0000 + 0x4ff8)).unwrap();
        let sp = BASE + 0x4f00;
        assert_eq!(task_stack_top(sp), BASE + 0x8000);
        let stack = read_interrupted_stack(&mem, &tables, sp).unwrap();
        assert_eq!(stack.top, BASE + 0x5000);
        assert_eq!(stack.words.len(), 0x100 / 8);
        assert_eq!(stack.word_at(BASE + 0x4ff8), Some(0xabcd));
        // A task stack mapped up to its THREAD_SIZE boundary is read to the boundary.
        mem.write_obj(0x30_5003u64, GuestAddress(0x4000 + 5 * 8)).unwrap();
        mem.write_obj(0x30_6003u64, GuestAddress(0x4000 + 6 * 8)).unwrap();
        mem.write_obj(0x30_7003u64, GuestAddress(0x4000 + 7 * 8)).unwrap();
        assert_eq!(read_interrupted_stack(&mem, &tables, sp).unwrap().top, BASE + 0x8000);
        // The page holding sp itself must be mapped.
        assert!(read_interrupted_stack(&mem, &tables, BASE + 0x9f00).is_err());
    }

    #[test]
    fn refuses_a_user_gs_base_and_a_stack_upside_down() {
        let sregs = kvm_sregs { cr0: 1 << 31, efer: 1 << 10, ..Default::default() };
        assert!(matches!(KernelCpu::from_sregs(&sregs), Err(ContextError::UserGsBase(0))));
        let (mem, tables) = guest_with_stack_page();
        assert!(matches!(
            read_stack(&mem, &tables, 0x2000, 0x1000),
            Err(ContextError::SpAboveTop { .. })
        ));
    }
}
