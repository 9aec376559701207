//! Guest physical memory map. Everything the VMM places in guest RAM before the kernel runs
//! lives below 1 MiB, except the kernel (loaded at 1 MiB) and the initramfs (top of RAM).

use vm_memory::GuestAddress;

/// Boot GDT and (empty) IDT; the kernel replaces both early.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// The `boot_params` "zero page" whose address is passed to the kernel in %rsi.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack for the boot CPU (grows down from here).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 1 GiB (2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line, NUL terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// The MP floating pointer + table sit at the start of the EBDA, where Linux scans for them.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of conventional low RAM in the e820 map (the EBDA and legacy ROM area above are reserved).
pub const LOW_RAM_END: u64 = MPTABLE_ADDR;
/// Where protected-mode kernel code is loaded (bzImage `code32_start`).
pub const KERNEL_LOAD_ADDR: GuestAddress = GuestAddress(0x10_0000);
/// The 64-bit entry point is 0x200 bytes into the protected-mode code (boot protocol 2.12+).
pub const KERNEL_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Memory-mapped I/O window: virtio-mmio devices, then the IOAPIC/LAPIC windows at their
/// architectural addresses. Guest RAM must end below it.
pub const MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first IRQ (IOAPIC pin) handed to virtio-mmio devices; 4 is COM1, 0-3 are taken by the
/// PIT/keyboard/cascade.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages of guest address space for the VMX TSS on Intel; out of RAM's way.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The largest guest RAM that fits below the MMIO window.
pub const MAX_RAM_BYTES: u64 = MMIO_START;
/// Legacy COM1 port base and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 command port: writing 0xfe pulses the CPU reset line (Linux `reboot=k`).
pub const I8042_COMMAND_PORT: u16 = 0x64;
