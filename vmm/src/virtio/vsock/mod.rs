//! virtio-vsock device (virtio spec 5.10): queue processing on top of the Unix backend.

mod connection;
pub mod packet;
mod unix;

use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
pub use unix::BackendError;
use unix::UnixBackend;

const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
/// rx, tx, event (the event queue only matters for live migration, which we do not do).
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Host side of the device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id (>= 3).
    pub guest_cid: u64,
    /// Unix socket the host connects to; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

struct ActiveQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
}

pub struct Vsock {
    guest_cid: u64,
    backend: UnixBackend,
    interrupt: Arc<Interrupt>,
    active: Option<ActiveQueues>,
}

impl Vsock {
    pub fn new(config: &VsockConfig, interrupt: Arc<Interrupt>) -> Result<Self, BackendError> {
        Ok(Self {
            guest_cid: config.guest_cid,
            backend: UnixBackend::new(&config.uds_path, config.guest_cid)?,
            interrupt,
            active: None,
        })
    }

    /// Readable when host sockets need service; then call [`Vsock::process_backend`].
    pub fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// The guest notified a queue (new TX packets or RX buffers).
    pub fn process_queues(&mut self) {
        let Some(active) = &mut self.active else { return };
        let mut used = false;
        loop {
            let tx_used = process_tx(active, &mut self.backend);
            // The guest may have granted credit or added buffers: reconsider blocked streams.
            self.backend.refresh_interest();
            let rx_used = process_rx(active, &mut self.backend);
            used |= tx_used || rx_used;
            // TX pauses while too many replies wait for RX buffers; once RX made room, carry
            // on with the TX chains left behind, as the guest may not notify TX again.
            if !rx_used || !self.backend.accepts_tx() {
                break;
            }
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }

    /// Host sockets are ready.
    pub fn process_backend(&mut self) {
        self.backend.handle_host_events();
        self.process_queues();
    }
}

/// Consumes the available TX chains while the backend has room for the replies. Malformed
/// chains are returned to the guest unused and logged; they never stop the device.
fn process_tx(active: &mut ActiveQueues, backend: &mut UnixBackend) -> bool {
    let ActiveQueues { mem, tx, .. } = active;
    let mut used = false;
    while backend.accepts_tx() {
        let Some(mut chain) = tx.pop_descriptor_chain(&*mem) else { break };
        let head = chain.head_index();
        match packet::parse_tx(mem, &mut chain) {
            Ok(pkt) => backend.send_pkt(&pkt),
            Err(e) => log::warn!("vsock: dropping TX chain {head}: {e}"),
        }
        if let Err(e) = tx.add_used(&*mem, head, 0) {
            log::warn!("vsock: cannot return TX chain {head}: {e}");
        }
        used = true;
    }
    used
}

/// Fills RX buffers while the backend has packets for the guest.
fn process_rx(active: &mut ActiveQueues, backend: &mut UnixBackend) -> bool {
    let ActiveQueues { mem, rx, .. } = active;
    let mut used = false;
    while backend.has_pending_rx() {
        let Some(mut chain) = rx.pop_descriptor_chain(&*mem) else { break };
        let head = chain.head_index();
        let len = match packet::parse_rx(mem, &mut chain) {
            Ok(mut pkt) => match backend.recv_pkt(&mut pkt) {
                Some(len) => len,
                None => {
                    // Nothing was really pending (e.g. a stream turned out empty): keep the
                    // buffer for later.
                    rx.go_to_previous_position();
                    break;
                }
            },
            Err(e) => {
                log::warn!("vsock: dropping RX chain {head}: {e}");
                0
            }
        };
        if let Err(e) = rx.add_used(&*mem, head, len) {
            log::warn!("vsock: cannot return RX chain {head}: {e}");
        }
        used = true;
    }
    used
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte =
                usize::try_from(offset).ok().and_then(|o| config.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let queues_len = queues.len();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(if queues_len == 0 { RX_QUEUE } else { TX_QUEUE }));
        };
        self.active = Some(ActiveQueues { mem, rx, tx });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.backend.reset();
    }
}

#[cfg(test)]
mod tests;
