//! One guest<->host stream connection: credit accounting (virtio spec 5.10.6.3) and the
//! buffering between the guest's packets and a non-blocking Unix stream.

use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::HeaderFields;

/// Receive buffer we advertise to the guest for each connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much has been forwarded unannounced;
/// smaller than BUF_ALLOC so a guest that filled our buffer always gets an update.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected and asked for a guest port; our REQUEST awaits the guest's RESPONSE.
    AwaitingGuestResponse,
    Established,
    /// The host will send no more (EOF on its stream); we told the guest with SHUTDOWN(SEND).
    /// The guest may still send: a host that half-closed keeps reading (e.g. an echo).
    HostDoneSending,
    /// The guest closed (SHUTDOWN with both flags) while guest bytes were still waiting for
    /// the host stream: deliver them, then confirm the close with RST.
    GuestClosedFlushing,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("guest sent {pending} bytes beyond the {BUF_ALLOC}-byte credit we granted")]
    CreditExceeded { pending: usize },
    #[error("host stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: ConnState,
    pub local_port: u32,
    pub peer_port: u32,
    /// Already queued for reading host data into the RX queue.
    pub rx_queued: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes handed to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_announced_fwd_cnt: Wrapping<u32>,
    /// Guest bytes the host stream did not accept yet.
    tx_backlog: Vec<u8>,
    /// The guest will send nothing more: shut the host stream's write side once drained.
    guest_done_sending: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            rx_queued: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_announced_fwd_cnt: Wrapping(0),
            tx_backlog: Vec::new(),
            guest_done_sending: false,
        }
    }

    /// Every guest packet carries its current receive-buffer view.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take right now.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    /// A header from us to the guest on this connection, carrying our credit.
    pub fn header(&mut self, op: u16, flags: u32) -> HeaderFields {
        self.last_announced_fwd_cnt = self.fwd_cnt;
        HeaderFields {
            src_port: self.local_port,
            dst_port: self.peer_port,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    pub fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.last_announced_fwd_cnt).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Forwards guest payload to the host stream, keeping what does not fit for later.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let pending = self.tx_backlog.len() + data.len();
        if pending > BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded { pending });
        }
        self.tx_backlog.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Writes as much backlog as the host stream takes without blocking.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.tx_backlog.is_empty() {
            match self.stream.write(&self.tx_backlog) {
                Ok(0) => return Err(ConnError::Io(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.tx_backlog.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if self.guest_done_sending {
            // The host sees EOF only after every byte the guest sent has been delivered.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    pub fn has_backlog(&self) -> bool {
        !self.tx_backlog.is_empty()
    }

    pub fn guest_done_sending(&mut self) -> Result<(), ConnError> {
        self.guest_done_sending = true;
        self.flush_to_host()
    }

    /// Reads host bytes for the guest, bounded by the guest's credit. `Ok(None)`: nothing
    /// available now; `Ok(Some(empty))`: the host closed its end.
    pub fn read_for_guest(&mut self, max: usize) -> Result<Option<Vec<u8>>, ConnError> {
        let limit = max.min(self.peer_credit() as usize);
        if limit == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; limit];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    self.rx_cnt += Wrapping(n as u32);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Readiness this connection needs from its host stream right now.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state == ConnState::Established && !self.rx_queued && self.peer_credit() > 0 {
            events |= EventSet::IN;
        }
        if !self.tx_backlog.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }
}
