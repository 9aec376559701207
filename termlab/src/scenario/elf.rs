//! Just enough ELF reading to tell whether a file for the guest needs a
//! dynamic loader and shared libraries the guest does not have: its
//! PT_INTERP path and the DT_NEEDED names of its dynamic section.

/// What a dynamically linked ELF file needs at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicNeeds {
    /// PT_INTERP: the dynamic loader, e.g. `/lib64/ld-linux-x86-64.so.2`.
    pub interpreter: Option<String>,
    /// DT_NEEDED: shared library names, e.g. `libc.so.6`.
    pub needed: Vec<String>,
}

impl DynamicNeeds {
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.needed.is_empty()
    }
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const EM_X86_64: u16 = 62;
const EM_BPF: u16 = 247;

/// `Ok(None)` for a file that is not ELF; the needs of an x86-64 or BPF
/// ELF file (a BPF object has none); an error for a truncated or foreign
/// ELF file (32-bit, big-endian, another machine), which the guest cannot run.
pub fn dynamic_needs(bytes: &[u8]) -> Result<Option<DynamicNeeds>, String> {
    if !bytes.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let file = Elf { bytes };
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("an ELF file that is not 64-bit little-endian: the guest is x86-64".into());
    }
    let machine = file.u16(18)?;
    if machine != EM_X86_64 && machine != EM_BPF {
        return Err(format!("an ELF file for machine {machine}, not x86-64 (62) or BPF (247)"));
    }
    let ph_offset = file.u64(32)?;
    let ph_size = u64::from(file.u16(54)?);
    let ph_count = u64::from(file.u16(56)?);
    let mut needs = DynamicNeeds::default();
    let mut loads = Vec::new(); // (vaddr, file offset, file size)
    let mut dynamic = None; // (offset, size)
    for index in 0..ph_count {
        let header = ph_offset + index * ph_size;
        let kind = file.u32(header)?;
        let offset = file.u64(header + 8)?;
        let vaddr = file.u64(header + 16)?;
        let size = file.u64(header + 32)?;
        match kind {
            PT_INTERP => needs.interpreter = Some(file.c_string(offset)?),
            PT_LOAD => loads.push((vaddr, offset, size)),
            PT_DYNAMIC => dynamic = Some((offset, size)),
            _ => {}
        }
    }
    let Some((dyn_offset, dyn_size)) = dynamic else { return Ok(Some(needs)) };
    let mut needed_offsets = Vec::new();
    let mut strtab_vaddr = None;
    for entry in 0..dyn_size / 16 {
        let tag = file.u64(dyn_offset + entry * 16)?;
        let value = file.u64(dyn_offset + entry * 16 + 8)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(value),
            DT_STRTAB => strtab_vaddr = Some(value),
            _ => {}
        }
    }
    if needed_offsets.is_empty() {
        return Ok(Some(needs));
    }
    let strtab_vaddr = strtab_vaddr.ok_or("a dynamic section with DT_NEEDED but no DT_STRTAB")?;
    let strtab = loads
        .iter()
        .find(|(vaddr, _, size)| (*vaddr..vaddr.saturating_add(*size)).contains(&strtab_vaddr))
        .map(|(vaddr, offset, _)| strtab_vaddr - vaddr + offset)
        .ok_or("DT_STRTAB lies outside every loaded segment")?;
    for name in needed_offsets {
        needs.needed.push(file.c_string(strtab.saturating_add(name))?);
    }
    Ok(Some(needs))
}

struct Elf<'a> {
    bytes: &'a [u8],
}

impl Elf<'_> {
    fn slice(&self, offset: u64, length: usize) -> Result<&[u8], String> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.bytes.get(start..start.checked_add(length)?))
            .ok_or_else(|| "a truncated ELF file".to_owned())
    }

    fn u16(&self, offset: u64) -> Result<u16, String> {
        let bytes = self.slice(offset, 2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&self, offset: u64) -> Result<u32, String> {
        let bytes = self.slice(offset, 4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn u64(&self, offset: u64) -> Result<u64, String> {
        let bytes = self.slice(offset, 8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn c_string(&self, offset: u64) -> Result<String, String> {
        let start = usize::try_from(offset).map_err(|_| "a truncated ELF file".to_owned())?;
        let rest = self.bytes.get(start..).ok_or("a truncated ELF file")?;
        let end = rest.iter().position(|&b| b == 0).ok_or("an unterminated ELF string")?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &str) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn a_dynamic_executable_names_its_loader_and_libraries() {
        // Debian's /bin/ls: dynamic, needs libc (and libselinux).
        let needs = dynamic_needs(&read("/bin/ls")).expect("parse").expect("ELF");
        assert_eq!(needs.interpreter.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(needs.needed.iter().any(|lib| lib == "libc.so.6"), "{needs:?}");
        assert!(!needs.is_static());
    }

    #[test]
    fn a_static_executable_and_a_shell_script_need_nothing() {
        // busybox-static is what the initramfs is built from.
        let needs = dynamic_needs(&read("/bin/busybox")).expect("parse").expect("ELF");
        assert!(needs.is_static(), "{needs:?}");
        assert_eq!(dynamic_needs(b"#!/bin/sh\necho hi\n"), Ok(None));
    }

    #[test]
    fn truncated_and_foreign_elf_files_are_errors() {
        let ls = read("/bin/ls");
        assert!(dynamic_needs(&ls[..40]).is_err());
        let mut big_endian = ls.clone();
        big_endian[5] = 2;
        assert!(dynamic_needs(&big_endian).unwrap_err().contains("little-endian"));
        let mut arm = ls;
        arm[18] = 183; // EM_AARCH64
        assert!(dynamic_needs(&arm).unwrap_err().contains("machine 183"));
    }
}
