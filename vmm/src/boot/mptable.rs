//! Intel MultiProcessor Specification 1.4 table: the only way a guest kernel without ACPI
//! learns how many CPUs it has and how the IOAPIC pins are wired.
//!
//! The table is serialized field by field in little endian (no `unsafe` struct casts).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const MP_SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_USABLE: u8 = 1;
/// CPU signature (family 6) and feature flags (FPU, APIC) reported per processor entry.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// KVM's in-kernel IOAPIC has 24 pins, wired 1:1 to ISA/legacy IRQ numbers.
const IOAPIC_PINS: u8 = 24;
/// Destination "all local APICs" for the LINT entries.
const ALL_APICS: u8 = 0xff;
/// The floating pointer structure is 16 bytes, the table header 44.
const FLOATING_POINTER_LEN: usize = 16;
/// APIC ids are 8-bit in this table; the IOAPIC takes the id after the last CPU.
pub const MAX_CPUS: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_CPUS}")]
    CpuCount(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Writes the floating pointer at `addr` followed by the configuration table describing
/// `num_cpus` CPUs (APIC ids 0..n, CPU 0 boots), one ISA bus and the IOAPIC.
pub fn write_mptable(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    num_cpus: u8,
) -> Result<(), MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entry_count += 2;
    for pin in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger "conform to the bus" (ISA: active high, edge).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, ALL_APICS, 1]);
    entry_count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REV, 0]); // checksum patched below
    table.extend_from_slice(b"TERMLAB ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = addr.0 + FLOATING_POINTER_LEN as u64;
    let mut floating = Vec::with_capacity(FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units
    floating[10] = checksum(&floating);

    mem.write_slice(&floating, addr).map_err(MpTableError::Write)?;
    mem.write_slice(&table, GuestAddress(table_addr)).map_err(MpTableError::Write)?;
    Ok(())
}

/// The byte that makes all bytes of `data` sum to zero (mod 256).
fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("test memory")
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        let mem = guest_mem();
        write_mptable(&mem, GuestAddress(0x9fc00), 3).expect("write");
        let mut floating = [0u8; 16];
        mem.read_slice(&mut floating, GuestAddress(0x9fc00)).expect("read");
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(sum(&floating), 0);
        let table_addr = u32::from_le_bytes(floating[4..8].try_into().expect("4 bytes"));
        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(u64::from(table_addr))).expect("read");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(u64::from(table_addr))).expect("read");
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(sum(&table), 0);
        let cpus: Vec<_> = table[44..].chunks(20).take(3).map(|e| (e[0], e[1], e[3])).collect();
        assert_eq!(cpus, vec![(0, 0, 3), (0, 1, 1), (0, 2, 1)]);
    }

    #[test]
    fn rejects_zero_cpus() {
        assert!(matches!(
            write_mptable(&guest_mem(), GuestAddress(0x9fc00), 0),
            Err(MpTableError::CpuCount(0))
        ));
    }
}
