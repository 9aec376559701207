//! The L1 kernel as an uncompressed ELF with a PVH entry point, which QEMU starts directly
//! (no firmware boot loader, no in-guest decompression). Under TCG that saves about 5 s per
//! L1 VM: a Debian bzImage decompresses its 8 MB xz payload in emulated code before the
//! kernel prints its first line (6.0 s from QEMU's start with SeaBIOS, 0.4 s as a PVH ELF
//! with qboot; measured 2026-12-04, QEMU 10.0.2).

use std::io::Write;
use std::process::{Command, Stdio};

/// The Xen ELF note type that holds the 32-bit PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;

/// The vmlinux inside `bzimage` if it has a PVH entry point; `Err` says why not (the caller
/// then boots the bzImage as it is).
pub fn pvh_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, String> {
    let payload = bzimage_payload(bzimage)?;
    let vmlinux = decompress(payload)?;
    if has_pvh_note(&vmlinux)? {
        Ok(vmlinux)
    } else {
        Err("its vmlinux has no PVH entry point (CONFIG_PVH)".into())
    }
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

/// The compressed kernel inside a bzImage (x86 boot protocol 2.08+: `payload_offset` and
/// `payload_length` in the setup header, relative to the protected-mode code after the
/// setup sectors).
fn bzimage_payload(image: &[u8]) -> Result<&[u8], String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS setup header)".into());
    }
    let version = le_u16(image, 0x206).unwrap_or(0);
    if version < 0x208 {
        return Err(format!("boot protocol {version:#x} has no payload fields (2.08+)"));
    }
    let setup_sectors = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let fields = le_u32(image, 0x248).zip(le_u32(image, 0x24c));
    let (offset, length) = fields.ok_or("truncated setup header")?;
    let start = (setup_sectors + 1) * 512 + offset as usize;
    image.get(start..start + length as usize).ok_or_else(|| "payload outside the file".into())
}

/// Decompresses the payload with the tool its magic names. The kernel's build appends the
/// uncompressed size after the stream, which xz ignores with --single-stream and gzip and
/// zstd only warn about: the output is judged by its ELF header, not the tool's status.
fn decompress(payload: &[u8]) -> Result<Vec<u8>, String> {
    let args: &[&str] = if payload.starts_with(b"\xfd7zXZ\0") {
        &["xz", "-dc", "--single-stream"]
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        &["zstd", "-dcq"]
    } else if payload.starts_with(b"\x1f\x8b") {
        &["gzip", "-dcq"]
    } else {
        return Err("its payload is not xz, zstd or gzip".into());
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let payload = payload.to_vec();
    // Feed and drain at once: either side alone would fill the pipe.
    let feeder = std::thread::spawn(move || stdin.write_all(&payload));
    let out = child.wait_with_output().map_err(|e| format!("{}: {e}", args[0]))?;
    let _ = feeder.join();
    if out.stdout.starts_with(b"\x7fELF\x02\x01") {
        Ok(out.stdout)
    } else {
        Err(format!("{} did not give a 64-bit ELF ({})", args[0], out.status))
    }
}

/// True when a PT_NOTE segment of the ELF64 `elf` holds the Xen PHYS32_ENTRY note.
fn has_pvh_note(elf: &[u8]) -> Result<bool, String> {
    let truncated = || "truncated ELF header".to_string();
    let phoff = le_u64(elf, 0x20).ok_or_else(truncated)? as usize;
    let phentsize = usize::from(le_u16(elf, 0x36).ok_or_else(truncated)?);
    let phnum = usize::from(le_u16(elf, 0x38).ok_or_else(truncated)?);
    for index in 0..phnum {
        let header = phoff + index * phentsize;
        if le_u32(elf, header) != Some(PT_NOTE) {
            continue;
        }
        let offset = le_u64(elf, header + 8).ok_or_else(truncated)? as usize;
        let size = le_u64(elf, header + 32).ok_or_else(truncated)? as usize;
        let notes = elf.get(offset..offset.saturating_add(size)).ok_or("note outside the file")?;
        if notes_have(notes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// True when the ELF note list `notes` has a note named `name` of type `kind`.
fn notes_have(notes: &[u8], name: &[u8], kind: u32) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0;
    while let (Some(namesz), Some(descsz), Some(note_type)) =
        (le_u32(notes, at), le_u32(notes, at + 4), le_u32(notes, at + 8))
    {
        let name_at = at + 12;
        let desc_at = name_at + align4(namesz as usize);
        let whole = notes.len() >= desc_at + descsz as usize;
        let note_name = notes.get(name_at..name_at + namesz as usize);
        if whole && note_type == kind && note_name == Some(name) {
            return true;
        }
        at = desc_at + align4(descsz as usize);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend((name.len() as u32).to_le_bytes());
        bytes.extend((desc.len() as u32).to_le_bytes());
        bytes.extend(kind.to_le_bytes());
        bytes.extend(name);
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        bytes.extend(desc);
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        bytes
    }

    #[test]
    fn finds_the_pvh_note_among_others_and_not_a_lookalike() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        assert!(!notes_have(&notes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY));
        notes.extend(note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]));
        assert!(notes_have(&notes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY));
        assert!(!notes_have(&notes[..notes.len() - 3], b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY));
    }

    #[test]
    fn refuses_what_is_no_bzimage() {
        assert!(pvh_vmlinux(&[0; 4096]).unwrap_err().contains("not a bzImage"));
        let mut header = vec![0; 0x260];
        header[0x202..0x206].copy_from_slice(b"HdrS");
        header[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        header[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(bzimage_payload(&header).unwrap_err(), "payload outside the file");
    }
}
