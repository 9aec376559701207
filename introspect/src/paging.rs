//! Guest virtual to guest physical translation by walking the guest's own x86-64 page tables,
//! so the host can read kernel memory (stacks, per-CPU data, code) where the guest sees it,
//! without trusting anything the guest reports about its mappings.

use termlab_vmm::{kvm_sregs, Breakpoint};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

pub const PAGE_SIZE: u64 = 4096;
/// Bits 12-51 of CR3 and of a paging-structure entry: the physical address of the next level
/// (or of a 4 KiB page). Bits 0-11 of CR3 are the PCID or flags, bit 63 of an entry is NX.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1 << 0;
/// PS: in a PDPTE or PDE, the entry maps a 1 GiB or 2 MiB page instead of pointing to a table.
const PAGE_SIZE_BIT: u64 = 1 << 7;

const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("the vCPU is not in 64-bit paging mode (CR0 {cr0:#x}, EFER {efer:#x})")]
    NotLongMode { cr0: u64, efer: u64 },
    #[error("{gva:#x} is not canonical for {levels}-level paging")]
    NonCanonical { gva: u64, levels: u8 },
    #[error("{gva:#x} is not mapped: level-{level} entry {entry:#x} is not present")]
    NotPresent { gva: u64, level: u8, entry: u64 },
    #[error("reading the level-{level} entry for {gva:#x} at physical {gpa:#x}: {source}")]
    ReadEntry { gva: u64, level: u8, gpa: u64, source: GuestMemoryError },
    #[error("reading {len} bytes at virtual {gva:#x} (physical {gpa:#x}): {source}")]
    ReadData { gva: u64, gpa: u64, len: usize, source: GuestMemoryError },
    #[error("a breakpoint at {0:#x} would straddle two pages")]
    BreakpointStraddles(u64),
}

/// Where a virtual address lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// Size of the page that maps it: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
}

/// One address space: the page-table root (CR3) and the paging depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTables {
    root: u64,
    levels: u8,
}

impl PageTables {
    /// `cr3` as the vCPU holds it (PCID and flag bits are ignored); 5 levels when CR4.LA57.
    pub fn new(cr3: u64, five_level: bool) -> Self {
        Self { root: cr3 & ADDR_MASK, levels: if five_level { 5 } else { 4 } }
    }

    /// The address space a paused vCPU is running in.
    pub fn from_sregs(sregs: &kvm_sregs) -> Result<Self, WalkError> {
        if sregs.cr0 & CR0_PG == 0 || sregs.efer & EFER_LMA == 0 {
            return Err(WalkError::NotLongMode { cr0: sregs.cr0, efer: sregs.efer });
        }
        Ok(Self::new(sregs.cr3, sregs.cr4 & CR4_LA57 != 0))
    }

    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Translates `gva`. Each level indexes its table with 9 address bits, from bit 12+9*(level-1).
    pub fn translate<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
    ) -> Result<Translation, WalkError> {
        self.check_canonical(gva)?;
        let mut table = self.root;
        for level in (1..=self.levels).rev() {
            let shift = 12 + 9 * u32::from(level - 1);
            let entry_gpa = table + ((gva >> shift) & 0x1ff) * 8;
            let entry = read_u64(mem, entry_gpa).map_err(|source| WalkError::ReadEntry {
                gva,
                level,
                gpa: entry_gpa,
                source,
            })?;
            if entry & PRESENT == 0 {
                return Err(WalkError::NotPresent { gva, level, entry });
            }
            // Level 1 always maps a page; levels 2 and 3 do when PS is set (2 MiB, 1 GiB).
            if level == 1 || (level <= 3 && entry & PAGE_SIZE_BIT != 0) {
                let page_size = 1u64 << shift;
                // In a large-page entry bit 12 is PAT, not address: mask to the page's alignment.
                let base = entry & ADDR_MASK & !(page_size - 1);
                return Ok(Translation { gpa: base | (gva & (page_size - 1)), page_size });
            }
            table = entry & ADDR_MASK;
        }
        unreachable!("level 1 always returns")
    }

    /// Fills `buf` from guest virtual memory at `gva`, translating each page separately, so
    /// the read may cross page boundaries into physically discontiguous pages.
    pub fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
        buf: &mut [u8],
    ) -> Result<(), WalkError> {
        let mut done = 0;
        while done < buf.len() {
            let at = gva.wrapping_add(done as u64);
            let chunk = (PAGE_SIZE - at % PAGE_SIZE).min((buf.len() - done) as u64) as usize;
            let gpa = self.translate(mem, at)?.gpa;
            mem.read_slice(&mut buf[done..done + chunk], GuestAddress(gpa))
                .map_err(|source| WalkError::ReadData { gva: at, gpa, len: chunk, source })?;
            done += chunk;
        }
        Ok(())
    }

    /// A VMM breakpoint at kernel virtual address `gva` (its trap is two bytes, which must lie
    /// in one page: the VMM patches them by guest-physical address).
    pub fn breakpoint<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
    ) -> Result<Breakpoint, WalkError> {
        if gva % PAGE_SIZE == PAGE_SIZE - 1 {
            return Err(WalkError::BreakpointStraddles(gva));
        }
        Ok(Breakpoint { addr: gva, gpa: self.translate(mem, gva)?.gpa })
    }

    /// One little-endian 64-bit word at `gva`.
    pub fn read_u64<M: GuestMemory + ?Sized>(&self, mem: &M, gva: u64) -> Result<u64, WalkError> {
        let mut word = [0u8; 8];
        self.read(mem, gva, &mut word)?;
        Ok(u64::from_le_bytes(word))
    }

    /// Bits above the top translated bit (47 or 56) must all equal it.
    fn check_canonical(&self, gva: u64) -> Result<(), WalkError> {
        let top_bit = 12 + 9 * u32::from(self.levels) - 1;
        let upper = (gva as i64) >> top_bit;
        if upper == 0 || upper == -1 {
            Ok(())
        } else {
            Err(WalkError::NonCanonical { gva, levels: self.levels })
        }
    }
}

fn read_u64<M: GuestMemory + ?Sized>(mem: &M, gpa: u64) -> Result<u64, GuestMemoryError> {
    let mut word = [0u8; 8];
    mem.read_slice(&mut word, GuestAddress(gpa))?;
    Ok(u64::from_le_bytes(word))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    /// Entry flags of a present, writable table or page.
    const P_RW: u64 = 0x3;

    /// Hand-built page tables in real guest memory, the way a guest kernel lays them out.
    struct Guest {
        mem: GuestMemoryMmap,
        /// Next free 4 KiB frame for a table.
        next_table: u64,
    }

    impl Guest {
        fn new() -> Self {
            // 8 MiB: tables in the first MiB, data pages above, a 2 MiB page at 4 MiB.
            Self {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (8 * MIB) as usize)])
                    .unwrap(),
                next_table: 0x1000,
            }
        }

        fn table(&mut self) -> u64 {
            let at = self.next_table;
            self.next_table += PAGE_SIZE;
            at
        }

        fn set_entry(&self, table: u64, index: u64, value: u64) {
            self.mem.write_obj(value, GuestAddress(table + index * 8)).unwrap();
        }

        /// Index of `gva` in the table of `level`.
        fn index(gva: u64, level: u32) -> u64 {
            (gva >> (12 + 9 * (level - 1))) & 0x1ff
        }

        /// Maps `gva` with a page of the size that `leaf_level` gives (1: 4K, 2: 2M, 3: 1G),
        /// building every table on the way down from `root`, with flags added to the leaf.
        fn map(&mut self, root: u64, levels: u32, gva: u64, gpa: u64, leaf_level: u32) {
            let mut table = root;
            for level in (leaf_level + 1..=levels).rev() {
                let index = Self::index(gva, level);
                let existing: u64 = self.mem.read_obj(GuestAddress(table + index * 8)).unwrap();
                let next = if existing & PRESENT != 0 {
                    existing & ADDR_MASK
                } else {
                    let next = self.table();
                    self.set_entry(table, index, next | P_RW);
                    next
                };
                table = next;
            }
            let large = if leaf_level > 1 { PAGE_SIZE_BIT } else { 0 };
            // NX set on the leaf: the walker must not mistake bit 63 for address bits.
            self.set_entry(table, Self::index(gva, leaf_level), gpa | large | P_RW | (1 << 63));
        }
    }

    #[test]
    fn four_level_4k_page() {
        let mut g = Guest::new();
        let root = g.table();
        g.map(root, 4, 0xffff_ffff_8100_0000, 0x20_0000, 1);
        // PCID bits in CR3 are not address bits.
        let pt = PageTables::new(root | 0x5, false);
        let t = pt.translate(&g.mem, 0xffff_ffff_8100_0123).unwrap();
        assert_eq!(t, Translation { gpa: 0x20_0123, page_size: PAGE_SIZE });
    }

    #[test]
    fn two_mib_page_ignores_the_pat_bit() {
        let mut g = Guest::new();
        let root = g.table();
        // Bit 12 set in a 2 MiB entry is PAT, not part of the frame address.
        g.map(root, 4, 0xffff_8880_0040_0000, (4 * MIB) | (1 << 12), 2);
        let pt = PageTables::new(root, false);
        let t = pt.translate(&g.mem, 0xffff_8880_0051_2345).unwrap();
        assert_eq!(t, Translation { gpa: 4 * MIB + 0x11_2345, page_size: 2 * MIB });
    }

    #[test]
    fn one_gib_page() {
        let mut g = Guest::new();
        let root = g.table();
        g.map(root, 4, 0xffff_8880_0000_0000, 0, 3);
        let pt = PageTables::new(root, false);
        let t = pt.translate(&g.mem, 0xffff_8880_0012_3456).unwrap();
        assert_eq!(t, Translation { gpa: 0x12_3456, page_size: GIB });
        // Reading through the 1 GiB mapping gives guest-physical bytes.
        g.mem.write_slice(b"through 1G", GuestAddress(0x12_3456)).unwrap();
        let mut buf = [0u8; 10];
        pt.read(&g.mem, 0xffff_8880_0012_3456, &mut buf).unwrap();
        assert_eq!(&buf, b"through 1G");
    }

    #[test]
    fn five_level_walk_uses_bits_48_to_56() {
        let mut g = Guest::new();
        let root = g.table();
        // 0xff11_0000_0000_0000 is the 5-level direct map base; bits 48-56 pick PML5 entry 0x110.
        let gva = 0xff11_0000_0000_3000;
        g.map(root, 5, gva, 0x30_0000, 1);
        let five = PageTables::new(root, true);
        assert_eq!(five.translate(&g.mem, gva + 0x42).unwrap().gpa, 0x30_0042);
        // The same tables read as 4-level: that address is not canonical for 48 bits.
        assert!(matches!(
            PageTables::new(root, false).translate(&g.mem, gva),
            Err(WalkError::NonCanonical { .. })
        ));
        // ... and an address canonical only for 57 bits is accepted but unmapped at level 5.
        let unmapped = 0xff12_0000_0000_0000;
        assert!(matches!(
            five.translate(&g.mem, unmapped),
            Err(WalkError::NotPresent { level: 5, .. })
        ));
    }

    #[test]
    fn not_present_names_the_level() {
        let mut g = Guest::new();
        let root = g.table();
        g.map(root, 4, 0xffff_ffff_8100_0000, 0x20_0000, 1);
        let pt = PageTables::new(root, false);
        // Same page table, next 4 KiB page: the level-1 entry is empty.
        match pt.translate(&g.mem, 0xffff_ffff_8100_1000) {
            Err(WalkError::NotPresent { gva, level: 1, entry: 0 }) => {
                assert_eq!(gva, 0xffff_ffff_8100_1000)
            }
            other => panic!("{other:?}"),
        }
        // Another top-level slot: the PML4 entry is empty.
        assert!(matches!(
            pt.translate(&g.mem, 0x1000),
            Err(WalkError::NotPresent { level: 4, .. })
        ));
    }

    #[test]
    fn read_crosses_into_a_discontiguous_page() {
        let mut g = Guest::new();
        let root = g.table();
        let gva = 0xffff_c900_0000_0000;
        // Two consecutive virtual pages backed by physical pages in reverse order.
        g.map(root, 4, gva, 0x50_0000, 1);
        g.map(root, 4, gva + PAGE_SIZE, 0x40_0000, 1);
        g.mem.write_slice(b"end of first ", GuestAddress(0x50_0000 + PAGE_SIZE - 13)).unwrap();
        g.mem.write_slice(b"page, start of second", GuestAddress(0x40_0000)).unwrap();
        let pt = PageTables::new(root, false);
        let mut buf = [0u8; 34];
        pt.read(&g.mem, gva + PAGE_SIZE - 13, &mut buf).unwrap();
        assert_eq!(&buf, b"end of first page, start of second");
        assert_eq!(pt.read_u64(&g.mem, gva + PAGE_SIZE - 4).unwrap().to_le_bytes(), *b"rst page");
        // A read running into an unmapped third page fails there, with that address.
        let mut buf = [0u8; 8];
        match pt.read(&g.mem, gva + 2 * PAGE_SIZE - 4, &mut buf) {
            Err(WalkError::NotPresent { gva: at, .. }) => assert_eq!(at, gva + 2 * PAGE_SIZE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn entry_pointing_outside_guest_memory_is_an_error() {
        let mut g = Guest::new();
        let root = g.table();
        g.map(root, 4, 0x40_0000, 0x40_0000, 1);
        // Corrupt the PDPT pointer to 1 TiB, far past guest RAM.
        g.set_entry(root, 0, (1 << 40) | P_RW);
        assert!(matches!(
            PageTables::new(root, false).translate(&g.mem, 0x40_0000),
            Err(WalkError::ReadEntry { level: 3, .. })
        ));
    }

    #[test]
    fn breakpoints_carry_the_physical_address_and_stay_in_one_page() {
        let mut g = Guest::new();
        let root = g.table();
        g.map(root, 4, 0xffff_ffff_8100_0000, 0x20_0000, 1);
        let pt = PageTables::new(root, false);
        let bp = pt.breakpoint(&g.mem, 0xffff_ffff_8100_0ffe).unwrap();
        assert_eq!(bp, Breakpoint { addr: 0xffff_ffff_8100_0ffe, gpa: 0x20_0ffe });
        assert!(matches!(
            pt.breakpoint(&g.mem, 0xffff_ffff_8100_0fff),
            Err(WalkError::BreakpointStraddles(_))
        ));
    }

    #[test]
    fn from_sregs_requires_long_mode_and_sees_la57() {
        let mut sregs = kvm_sregs {
            cr3: 0x9000,
            cr0: CR0_PG | 1,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        assert_eq!(PageTables::from_sregs(&sregs).unwrap(), PageTables::new(0x9000, false));
        sregs.cr4 = CR4_LA57;
        assert_eq!(PageTables::from_sregs(&sregs).unwrap().levels(), 5);
        sregs.efer = 0;
        assert!(matches!(PageTables::from_sregs(&sregs), Err(WalkError::NotLongMode { .. })));
    }
}
