//! Putting a Linux bzImage, its initramfs, command line and the firmware tables it needs
//! into guest memory.

mod loader;
mod mptable;

pub use loader::{load_linux, BootError, KernelEntry};
pub use mptable::{write_mptable, MpTableError};
