//! Minimal writer for the "newc" cpio format the Linux initramfs unpacker reads.
//!
//! Written here (rather than shelling out to cpio) so images can contain device nodes and
//! root-owned files without needing privileges, and so image builds are reproducible.

use std::io::{self, Write};

const MODE_DIR: u32 = 0o040_000;
const MODE_FILE: u32 = 0o100_000;
const MODE_SYMLINK: u32 = 0o120_000;
const MODE_CHAR_DEVICE: u32 = 0o020_000;

/// Streams entries into a newc archive; call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    inode: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, inode: 1, written: 0 }
    }

    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, MODE_DIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, MODE_FILE | (mode & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, MODE_SYMLINK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, MODE_CHAR_DEVICE | 0o600, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{path}: too large for cpio")))?;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed for reproducible images
            size,
            0, // dev major
            0, // dev minor
            rdev_major,
            rdev_minor,
            name.len() as u32 + 1,
            0, // checksum (unused by "070701")
        ];
        self.inode += 1;
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// newc aligns names and file data to 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/dev").expect("dir");
        w.char_device("/dev/console", 5, 1).expect("dev");
        w.file("/init", 0o755, b"#!/bin/sh\n").expect("file");
        let bytes = w.finish().expect("finish");
        assert_eq!(bytes.len() % 4, 0);
        // Walk the archive the way the kernel does and collect names and sizes.
        let mut at = 0;
        let mut seen = Vec::new();
        while at < bytes.len() {
            let header = std::str::from_utf8(&bytes[at..at + 110]).expect("ascii header");
            assert_eq!(&header[..6], "070701");
            let field =
                |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).expect("hex");
            let (size, namesize) = (field(6) as usize, field(11) as usize);
            let name =
                std::str::from_utf8(&bytes[at + 110..at + 110 + namesize - 1]).expect("name");
            seen.push((name.to_owned(), size, field(9), field(10)));
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
        assert_eq!(
            seen,
            vec![
                ("dev".into(), 0, 0, 0),
                ("dev/console".into(), 0, 5, 1),
                ("init".into(), 10, 0, 0),
                ("TRAILER!!!".into(), 0, 0, 0)
            ]
        );
    }
}
