//! termlab-vmm: a minimal KVM virtual machine monitor for booting the termlab guest kernel.
//!
//! One VM = guest RAM, an in-kernel irqchip + PIT, N vCPU threads, COM1, an i8042 reset line
//! and a virtio-vsock device over virtio-mmio with a Firecracker-style Unix socket backend.
//!
//! ```no_run
//! use termlab_vmm::{Vm, VmConfig};
//! let config = VmConfig::new("bzImage".into(), Some("initrd.cpio".into()), "console=ttyS0".into());
//! let mut vm = Vm::new(config)?;
//! vm.start()?;
//! let reason = vm.wait_exit(None);
//! # Ok::<(), termlab_vmm::Error>(())
//! ```

mod boot;
mod cpu;
mod debug;
mod devices;
mod layout;
mod vcpu;
mod virtio;
mod vm;

pub use boot::{BootError, MpTableError};
pub use cpu::CpuSetupError;
pub use debug::{Breakpoint, DebugError, DebugEvent, MAX_BREAKPOINTS};
pub use devices::console::ConsoleLog;
pub use kvm_bindings::{kvm_regs, kvm_sregs};
pub use kvm_ioctls::VcpuFd;
pub use virtio::vsock::{BackendError as VsockBackendError, VsockConfig};
pub use vm::{ConsoleConfig, ConsoleWait, Error, ExitReason, ExitWatch, Vm, VmConfig};

/// This crate's version, for the records of what ran a guest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The virtio-mmio transport and the vsock device without a KVM VM, for the fuzz targets in
/// `vmm/fuzz`: they write the registers and the queues from arbitrary input exactly as a
/// hostile guest would, which needs no more than this. Not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::virtio::vsock::Vsock;
    pub use crate::virtio::{Interrupt, MmioRegion, MmioTransport};
}
