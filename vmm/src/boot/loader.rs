//! Kernel + initramfs + command line loading (Linux 64-bit boot protocol). The kernel is a
//! bzImage, or the uncompressed `vmlinux` ELF: loaded where its program headers say, it is
//! entered at its ELF entry (`startup_64` of arch/x86/kernel/head_64.S, which takes the same
//! 64-bit boot state as a bzImage's entry) and skips the bzImage's self-decompression, which
//! a guest under emulation (nested, L1 on QEMU TCG) pays for in seconds.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::layout::*;

/// `boot_params` constants from the x86 boot protocol (Documentation/arch/x86/boot.rst).
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" bootloader id: we are not one of the registered loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const E820_RAM: u32 = 1;
/// The 64-bit entry needs boot protocol 2.12 or later (`xloadflags` with XLF_KERNEL_64).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const PAGE_SIZE: u64 = 0x1000;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// What an ELF kernel declares nothing about: the physical alignment a relocatable x86-64
/// kernel needs (CONFIG_PHYSICAL_ALIGN's default), and the highest initramfs address any
/// 64-bit kernel accepts below 4 GiB.
const ELF_KERNEL_ALIGNMENT: u32 = 0x20_0000;
const ELF_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel { path: PathBuf, source: std::io::Error },
    #[error("cannot load kernel image {path}: {source}")]
    LoadKernel { path: PathBuf, source: linux_loader::loader::Error },
    #[error("{path} is not a 64-bit bzImage with boot protocol >= 2.12")]
    Not64BitBzImage { path: PathBuf },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitrd { path: PathBuf, source: std::io::Error },
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the command line into guest memory: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write boot_params into guest memory: {0}")]
    WriteBootParams(linux_loader::configurator::Error),
}

/// Where the boot CPU starts and what it is handed.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub entry: GuestAddress,
    pub zero_page: GuestAddress,
}

/// Loads kernel (bzImage or vmlinux ELF, told apart by their magic), initramfs and command
/// line and writes `boot_params` with an e820 map.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<KernelEntry, BootError> {
    let open_err = |source| BootError::OpenKernel { path: kernel.to_owned(), source };
    let load_err = |source| BootError::LoadKernel { path: kernel.to_owned(), source };
    let mut image = File::open(kernel).map_err(open_err)?;
    let mut magic = [0u8; 4];
    image.read_exact(&mut magic).map_err(open_err)?;
    image.rewind().map_err(open_err)?;
    let (loaded, mut header, entry) = if magic == ELF_MAGIC {
        // Its program headers place it (at CONFIG_PHYSICAL_START, 16 MiB by default); the
        // loader refuses segments below KERNEL_LOAD_ADDR, where the boot structures live.
        let loaded = Elf::load(mem, None, &mut image, Some(KERNEL_LOAD_ADDR)).map_err(load_err)?;
        let header = setup_header {
            kernel_alignment: ELF_KERNEL_ALIGNMENT,
            initrd_addr_max: ELF_INITRD_ADDR_MAX,
            ..Default::default()
        };
        let entry = loaded.kernel_load;
        (loaded, header, entry)
    } else {
        let loaded = BzImage::load(mem, Some(KERNEL_LOAD_ADDR), &mut image, Some(KERNEL_LOAD_ADDR))
            .map_err(load_err)?;
        let header = loaded
            .setup_header
            .filter(|h| h.version >= MIN_BOOT_PROTOCOL && h.xloadflags & XLF_KERNEL_64 != 0)
            .ok_or_else(|| BootError::Not64BitBzImage { path: kernel.to_owned() })?;
        let entry = loaded.kernel_load.unchecked_add(KERNEL_64BIT_ENTRY_OFFSET);
        (loaded, header, entry)
    };

    let mut kernel_cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    kernel_cmdline.insert_str(cmdline).map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &kernel_cmdline)
        .map_err(BootError::WriteCmdline)?;

    header.type_of_loader = LOADER_TYPE_UNDEFINED;
    header.boot_flag = BOOT_FLAG_MAGIC;
    header.header = HDRS_MAGIC;
    header.cmd_line_ptr = CMDLINE_ADDR as u32;
    header.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, initrd, loaded.kernel_end, header.initrd_addr_max)?;
        header.ramdisk_image = addr.raw_value() as u32;
        header.ramdisk_size = size as u32;
    }

    let mut params = boot_params { hdr: header, ..Default::default() };
    let ram_end = mem.last_addr().raw_value() + 1;
    let e820 = [(0, LOW_RAM_END), (KERNEL_LOAD_ADDR.raw_value(), ram_end)];
    for (i, (start, end)) in e820.iter().enumerate() {
        params.e820_table[i] =
            boot_e820_entry { addr: *start, size: end - start, r#type: E820_RAM };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::WriteBootParams)?;

    Ok(KernelEntry { entry, zero_page: GuestAddress(ZERO_PAGE_ADDR) })
}

/// Places the initramfs page-aligned at the top of RAM (below `initrd_addr_max`), where it
/// cannot collide with the kernel's decompression area.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    initrd_addr_max: u32,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = (mem.last_addr().raw_value() + 1).min(u64::from(initrd_addr_max) + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| BootError::InitrdTooLarge { path: path.to_owned(), size })?;
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|e| read_err(std::io::Error::other(e)))?;
    file.read_exact_volatile(&mut slice).map_err(|e| read_err(std::io::Error::other(e)))?;
    Ok((GuestAddress(addr), size))
}
