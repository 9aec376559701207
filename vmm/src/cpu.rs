//! Architectural vCPU state a 64-bit Linux kernel expects at its 64-bit entry point:
//! long mode with an identity map, a flat GDT, CPUID, a few MSRs, FPU defaults, XCR0 and
//! LAPIC LINT wiring.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_xcr, kvm_xcrs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::KernelEntry;
use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("vCPU setup ioctl {step} failed: {source}")]
    Ioctl { step: &'static str, source: kvm_ioctls::Error },
    #[error("cannot write boot page tables / GDT: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("cannot build the MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    MsrsNotSet { set: usize, wanted: usize },
}

fn ioctl(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuSetupError {
    move |source| CpuSetupError::Ioctl { step, source }
}

/// The boot GDT: null, 64-bit code, data, TSS (the TSS is only there because VMX requires a
/// usable TR; Linux loads its own).
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// CPUID leaf of the XSAVE state components; sub-leaf 0 EDX:EAX lists the XCR0 bits.
const LEAF_XSTATE: u32 = 0xd;

/// Per-VM CPUID template: what KVM supports, plus what KVM emulates but reports only as a
/// capability. Patched per vCPU with its APIC id.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuSetupError> {
    let mut cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuSetupError::SupportedCpuid)?;
    // The in-kernel LAPIC emulates the TSC-deadline timer mode, but KVM_GET_SUPPORTED_CPUID
    // leaves the bit clear (KVM_CAP_TSC_DEADLINE_TIMER announces it instead). Without it
    // Linux falls back to the LAPIC's periodic mode and calibrates it against the PIT; under
    // nested emulation that calibration fails its own check ("APIC timer disabled due to
    // verification failure"), which leaves no one-shot clock event device and therefore no
    // high-resolution timers in the guest.
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
    }
    Ok(cpuid)
}

/// Writes the GDT and the identity page tables shared by all vCPUs (done once per VM).
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), CpuSetupError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(CpuSetupError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(CpuSetupError::Memory)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 0..1 GiB with 2 MiB pages. The kernel's 64-bit
    // entry only needs itself, the zero page and the command line mapped.
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))
        .map_err(CpuSetupError::Memory)?;
    mem.write_obj(PD_ADDR | PRESENT_WRITABLE, GuestAddress(PDPT_ADDR))
        .map_err(CpuSetupError::Memory)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_WRITABLE | HUGE_PAGE, GuestAddress(PD_ADDR + i * 8))
            .map_err(CpuSetupError::Memory)?;
    }
    Ok(())
}

/// Puts vCPU `index` into the state of the 64-bit boot protocol. Application processors get
/// the same state; KVM holds them in wait-for-SIPI until the boot CPU starts them.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    index: u8,
    cpuid_template: &CpuId,
    entry: &KernelEntry,
) -> Result<(), CpuSetupError> {
    let mut cpuid = cpuid_template.clone();
    patch_cpuid(&mut cpuid, index);
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    set_initial_xcr0(vcpu, &cpuid)?;
    set_boot_msrs(vcpu)?;
    vcpu.set_fpu(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() })
        .map_err(ioctl("KVM_SET_FPU"))?;
    set_long_mode_sregs(vcpu)?;
    vcpu.set_regs(&kvm_regs {
        rflags: 0x2,
        rip: entry.entry.0,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: entry.zero_page.0,
        ..Default::default()
    })
    .map_err(ioctl("KVM_SET_REGS"))?;
    wire_lapic_lints(vcpu)
}

/// CPUID leaves that must name the vCPU: APIC id in leaf 1 EBX[31:24], x2APIC id in leaves
/// 0xb/0x1f EDX; and the hypervisor bit so the guest picks kvm-clock.
fn patch_cpuid(cpuid: &mut CpuId, index: u8) {
    const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
}

/// Starts XCR0 with every state component CPUID leaf 0xd offers, which is what a Linux
/// guest writes with XSETBV once it supports all of them.
///
/// KVM keeps its own copy of the guest's XCR0: it derives the XSAVE area size in CPUID
/// 0xd.0 EBX from it and loads it into the CPU on every VM entry. On hardware XSETBV always
/// exits to KVM, so the copy follows the guest. An L1 whose CPU is emulated by QEMU TCG
/// before 8.2 (Debian 12 has 7.2; fixed upstream by "target/i386: check intercept for XSETBV")
/// does not intercept XSETBV for its SVM guest, so KVM's copy would stay at the reset value 1
/// (x87 only): CPUID then reports the 576-byte legacy area while the guest computes 2696 bytes
/// for x87|SSE|AVX|PKRU ("XSAVE consistency problem: size 2696 != kernel_size 576", a WARN,
/// after which Linux disables XSAVE), and every VM entry would reset the guest's XCR0 to 1.
/// QEMU microvm on the same L1 shows the same WARN. Starting with the value the guest is going
/// to choose keeps KVM's copy right without an XSETBV exit; where XSETBV does exit this changes
/// nothing the guest can observe, because KVM only loads the guest's XCR0 once the guest has
/// set CR4.OSXSAVE, and Linux sets XCR0 right after that. A guest kernel that leaves out an
/// offered component (e.g. built without protection keys) would again see a size mismatch
/// under such an L1 and fall back to FXSAVE, safely.
fn set_initial_xcr0(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuSetupError> {
    let entries = cpuid.as_slice();
    if !entries.iter().any(|e| e.function == 1 && e.ecx & LEAF1_ECX_XSAVE != 0) {
        return Ok(());
    }
    let Some(xstate) = entries.iter().find(|e| e.function == LEAF_XSTATE && e.index == 0) else {
        return Ok(());
    };
    let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: 0,
        value: u64::from(xstate.edx) << 32 | u64::from(xstate.eax),
        ..Default::default()
    };
    vcpu.set_xcrs(&xcrs).map_err(ioctl("KVM_SET_XCRS"))
}

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(CpuSetupError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuSetupError::MsrsNotSet { set, wanted: entries.len() });
    }
    Ok(())
}

fn segment(selector: u16, gdt_entry: u64) -> kvm_segment {
    let flags = |shift: u32, bits: u32| ((gdt_entry >> shift) & ((1 << bits) - 1)) as u8;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: flags(40, 4),
        present: flags(47, 1),
        dpl: flags(45, 2),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g: flags(55, 1),
        avl: flags(52, 1),
        unusable: 0,
        padding: 0,
    }
}

fn set_long_mode_sregs(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let data = segment(DATA_SELECTOR, GDT[2]);
    sregs.cs = segment(CODE_SELECTOR, GDT[1]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, GDT[3]);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))
}

/// LINT0 delivers the legacy PIC (ExtINT), LINT1 NMIs, as on a PC; the kernel's MP-table
/// path relies on this "virtual wire" setup.
fn wire_lapic_lints(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}
