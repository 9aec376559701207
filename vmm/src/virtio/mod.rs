//! virtio over the MMIO transport (virtio 1.x, "modern" register layout only).

mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioRegion, MmioTransport};

/// VIRTIO_F_VERSION_1: the only transport feature we offer (no legacy layout, no EVENT_IDX).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: "a used ring was updated".
const INT_USED_RING: u32 = 1;

/// A virtio device as seen by the transport.
pub trait VirtioDevice: Send {
    /// virtio device id (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Called once the driver set DRIVER_OK: the device takes over the configured queues.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Driver wrote 0 to the status register: drop queues and connections.
    fn reset(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or does not fit in guest memory")]
    BadQueue(usize),
    #[error("device backend failed to start: {0}")]
    Backend(String),
}

/// The device's interrupt line: status bits the driver reads via InterruptStatus plus the
/// irqfd that raises the IOAPIC pin.
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irq }
    }

    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::warn!("cannot raise virtio interrupt: {e}");
        }
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}
