//! Firecracker-compatible hybrid vsock backend: guest connections map to Unix sockets.
//!
//! * Host -> guest: the host connects to `uds_path` and writes `CONNECT <port>\n`; once the
//!   guest accepts, the host reads `OK <host_port>\n` and the stream carries the connection.
//! * Guest -> host: a guest connection to host port P is connected to `<uds_path>_P`.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection};
use super::packet::{
    op, HeaderFields, RxPacket, TxPacket, HOST_CID, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM,
};

/// Ports we pick for host-initiated connections start here, far from service ports.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `CONNECT 4294967295\n` is 19 bytes; anything longer is not a valid request.
const MAX_CONNECT_LINE: usize = 32;
const LISTENER_TOKEN: u64 = 0;
/// Replies we hold for a guest that posts no RX buffers. Each guest packet can queue one or
/// two, so without a bound a guest that never reads could grow host memory forever: past
/// this, the device stops taking TX packets until the guest reads (see `accepts_tx`).
pub const MAX_QUEUED_CONTROL: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("vsock socket {0} already exists (another VM running, or stale); remove it first")]
    SocketExists(PathBuf),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot set up the vsock backend's epoll: {0}")]
    Epoll(std::io::Error),
}

/// (host-side port, guest-side port)
type ConnKey = (u32, u32);

/// A host client that connected but has not finished its `CONNECT <port>` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct UnixBackend {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    next_token: u64,
    next_local_port: u32,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    /// Which epoll token a connection's stream is registered under, and with what.
    conn_tokens: HashMap<u64, ConnKey>,
    registered: HashMap<ConnKey, (u64, EventSet)>,
    /// Packets for the guest that carry no payload, in order.
    control: VecDeque<HeaderFields>,
    /// Connections whose host stream is readable.
    data_ready: VecDeque<ConnKey>,
}

impl UnixBackend {
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Self, BackendError> {
        if uds_path.exists() {
            return Err(BackendError::SocketExists(uds_path.to_owned()));
        }
        let listener = UnixListener::bind(uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| BackendError::Listen { path: uds_path.to_owned(), source })?;
        let backend = Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll: Epoll::new().map_err(BackendError::Epoll)?,
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            conn_tokens: HashMap::new(),
            registered: HashMap::new(),
            control: VecDeque::new(),
            data_ready: VecDeque::new(),
        };
        backend
            .epoll
            .ctl(
                ControlOperation::Add,
                backend.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(BackendError::Epoll)?;
        Ok(backend)
    }

    /// Readable when any host socket needs attention; poll it from the device's event loop.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Drops every connection (device reset); the listener stays.
    pub fn reset(&mut self) {
        for key in self.conns.keys().copied().collect::<Vec<_>>() {
            self.remove_conn(key);
        }
        for (_, handshake) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                handshake.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.control.clear();
        self.data_ready.clear();
    }

    /// Handles whatever host sockets are ready, without blocking.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let ready = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vsock backend epoll_wait failed: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                self.accept_host_clients();
            } else if self.handshakes.contains_key(&token) {
                self.continue_handshake(token);
            } else if let Some(&key) = self.conn_tokens.get(&token) {
                self.host_stream_ready(key, event.event_set());
            }
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("vsock: dropping host client: {e}");
                        continue;
                    }
                    let token = self.take_token();
                    let event = EpollEvent::new(EventSet::IN, token);
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), event)
                    {
                        log::warn!("vsock: dropping host client: {e}");
                        continue;
                    }
                    self.handshakes.insert(token, Handshake { stream, line: Vec::new() });
                    // Clients usually send CONNECT right away; don't wait for another wakeup.
                    self.continue_handshake(token);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time so no payload after it is consumed.
    fn continue_handshake(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match handshake.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&handshake.line),
                Ok(1) if handshake.line.len() < MAX_CONNECT_LINE => handshake.line.push(byte[0]),
                Ok(_) => break None, // EOF or an over-long line
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(handshake) = self.handshakes.remove(&token) else { return };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            handshake.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(guest_port) = port else {
            log::warn!(
                "vsock: host client sent an invalid CONNECT line {:?}",
                String::from_utf8_lossy(&handshake.line)
            );
            return;
        };
        let local_port = self.take_local_port();
        let key = (local_port, guest_port);
        let mut conn = Connection::new(
            handshake.stream,
            ConnState::AwaitingGuestResponse,
            local_port,
            guest_port,
        );
        self.control.push_back(conn.header(op::REQUEST, 0));
        self.conns.insert(key, conn);
        self.sync_interest(key);
    }

    fn host_stream_ready(&mut self, key: (u32, u32), events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if events.intersects(EventSet::OUT) {
            if let Err(e) = conn.flush_to_host() {
                log::debug!("vsock: host stream {key:?} failed: {e}");
                self.reset_conn(key);
                return;
            }
            if conn.state == ConnState::GuestClosedFlushing && !conn.has_backlog() {
                self.reset_conn(key);
                return;
            }
            if conn.credit_update_due() {
                self.control.push_back(conn.header(op::CREDIT_UPDATE, 0));
            }
        }
        // A hangup or error is handled by reading: the read reports EOF or the error.
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) && !conn.rx_queued
        {
            conn.rx_queued = true;
            self.data_ready.push_back(key);
        }
        self.sync_interest(key);
    }

    /// A packet from the guest (TX queue).
    pub fn send_pkt(&mut self, pkt: &TxPacket) {
        let key = (pkt.dst_port(), pkt.src_port());
        log::trace!(
            "vsock guest->host {key:?} op {} len {} flags {} buf_alloc {} fwd_cnt {}",
            pkt.op(),
            pkt.len(),
            pkt.flags(),
            pkt.buf_alloc(),
            pkt.fwd_cnt()
        );
        if pkt.src_cid() != self.guest_cid
            || pkt.dst_cid() != HOST_CID
            || pkt.type_() != TYPE_STREAM
        {
            log::debug!(
                "vsock: rejecting packet {}:{} -> {}:{}",
                pkt.src_cid(),
                pkt.src_port(),
                pkt.dst_cid(),
                pkt.dst_port()
            );
            self.reply_rst(pkt);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match pkt.op() {
                op::REQUEST => self.connect_to_host(pkt),
                op::RST => {}
                _ => self.reply_rst(pkt),
            }
            return;
        };
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        let outcome = match (pkt.op(), conn.state) {
            (op::RESPONSE, ConnState::AwaitingGuestResponse) => {
                conn.state = ConnState::Established;
                let ok = format!("OK {}\n", conn.local_port);
                // The stream is fresh and empty, so this short write cannot block.
                conn.stream.write_all(ok.as_bytes()).map_err(Into::into)
            }
            (op::RW, ConnState::Established | ConnState::HostDoneSending) => {
                conn.send_to_host(pkt.data())
            }
            (op::CREDIT_UPDATE, _) => Ok(()),
            (op::CREDIT_REQUEST, _) => {
                self.control.push_back(conn.header(op::CREDIT_UPDATE, 0));
                Ok(())
            }
            (op::SHUTDOWN, _)
                if pkt.flags() & SHUTDOWN_SEND != 0 && pkt.flags() & SHUTDOWN_RCV != 0 =>
            {
                // Full close: confirm with RST once every byte the guest sent reached the host.
                match conn.guest_done_sending() {
                    Ok(()) if conn.has_backlog() => {
                        conn.state = ConnState::GuestClosedFlushing;
                        Ok(())
                    }
                    _ => {
                        self.reset_conn(key);
                        return;
                    }
                }
            }
            (op::SHUTDOWN, _) if pkt.flags() & SHUTDOWN_SEND != 0 => conn.guest_done_sending(),
            (op::SHUTDOWN, _) => Ok(()),
            (op::RST, _) => {
                self.remove_conn(key);
                return;
            }
            (other, state) => {
                log::debug!("vsock: unexpected op {other} in state {state:?} on {key:?}");
                self.reset_conn(key);
                return;
            }
        };
        match outcome {
            Ok(()) => {
                if conn.credit_update_due() {
                    self.control.push_back(conn.header(op::CREDIT_UPDATE, 0));
                }
                self.sync_interest(key);
            }
            Err(e) => {
                log::debug!("vsock: connection {key:?} failed: {e}");
                self.reset_conn(key);
            }
        }
    }

    fn connect_to_host(&mut self, pkt: &TxPacket) {
        let path = format!("{}_{}", self.uds_path.display(), pkt.dst_port());
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        match stream {
            Ok(stream) => {
                let key = (pkt.dst_port(), pkt.src_port());
                let mut conn = Connection::new(stream, ConnState::Established, key.0, key.1);
                conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
                self.control.push_back(conn.header(op::RESPONSE, 0));
                self.conns.insert(key, conn);
                self.sync_interest(key);
            }
            Err(e) => {
                log::debug!("vsock: guest connect to {path} failed: {e}");
                self.reply_rst(pkt);
            }
        }
    }

    fn reply_rst(&mut self, pkt: &TxPacket) {
        self.control.push_back(HeaderFields {
            src_port: pkt.dst_port(),
            dst_port: pkt.src_port(),
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Closes our side and tells the guest.
    fn reset_conn(&mut self, key: ConnKey) {
        if let Some(mut conn) = self.remove_conn(key) {
            self.control.push_back(conn.header(op::RST, 0));
        }
    }

    fn remove_conn(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        if let Some((token, _)) = self.registered.remove(&key) {
            self.conn_tokens.remove(&token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        Some(conn)
    }

    /// Whether the device may take another guest packet now, i.e. room for its replies.
    pub fn accepts_tx(&self) -> bool {
        self.control.len() < MAX_QUEUED_CONTROL
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.control.is_empty() || !self.data_ready.is_empty()
    }

    /// Fills one guest RX buffer. Returns the number of bytes written into it (header
    /// included), or `None` when nothing was actually pending.
    pub fn recv_pkt(&mut self, pkt: &mut RxPacket<'_>) -> Option<u32> {
        if let Some(header) = self.control.pop_front() {
            return Some(self.write_header(pkt, header, 0));
        }
        while let Some(key) = self.data_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.rx_queued = false;
            let capacity = pkt.data_slice().map_or(0, |s| s.len()).min(MAX_PKT_DATA as usize);
            let outcome = conn.read_for_guest(capacity);
            let reply = match outcome {
                Ok(Some(data)) if data.is_empty() => {
                    // EOF only says the host stopped sending; if it closed completely, our
                    // next write to it fails and the connection is reset then.
                    conn.state = ConnState::HostDoneSending;
                    Some((conn.header(op::SHUTDOWN, SHUTDOWN_SEND), data))
                }
                Ok(Some(data)) => Some((conn.header(op::RW, 0), data)),
                Ok(None) => None,
                Err(e) => {
                    log::debug!("vsock: host stream {key:?} failed: {e}");
                    self.reset_conn(key);
                    None
                }
            };
            self.sync_interest(key);
            if let Some((header, data)) = reply {
                if let Some(slice) = pkt.data_slice() {
                    slice.copy_from(&data[..]);
                }
                return Some(self.write_header(pkt, header, data.len() as u32));
            }
            if let Some(header) = self.control.pop_front() {
                return Some(self.write_header(pkt, header, 0));
            }
        }
        None
    }

    fn write_header(&self, pkt: &mut RxPacket<'_>, h: HeaderFields, len: u32) -> u32 {
        log::trace!(
            "vsock host->guest {:?} op {} len {len} flags {} fwd_cnt {}",
            (h.src_port, h.dst_port),
            h.op,
            h.flags,
            h.fwd_cnt
        );
        if let Err(e) = pkt.set_header_from_raw(&[0u8; virtio_vsock::packet::PKT_HEADER_SIZE]) {
            log::warn!("vsock: cannot clear RX header: {e}");
        }
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(h.src_port)
            .set_dst_port(h.dst_port)
            .set_type(TYPE_STREAM)
            .set_op(h.op)
            .set_flags(h.flags)
            .set_buf_alloc(h.buf_alloc)
            .set_fwd_cnt(h.fwd_cnt)
            .set_len(len);
        virtio_vsock::packet::PKT_HEADER_SIZE as u32 + len
    }

    /// Makes the epoll registration of a connection's stream match what it needs, removing
    /// it when it needs nothing (an idle registration would still report hangups forever).
    fn sync_interest(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else { return };
        let wanted = conn.interest();
        let fd = conn.stream.as_raw_fd();
        let current = self.registered.get(&key).copied();
        let result = match (current, wanted.is_empty()) {
            (Some((_, events)), false) if events == wanted => Ok(()),
            (Some((token, _)), false) => {
                self.registered.insert(key, (token, wanted));
                self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(wanted, token))
            }
            (Some((token, _)), true) => {
                self.registered.remove(&key);
                self.conn_tokens.remove(&token);
                self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
            }
            (None, false) => {
                let token = self.take_token();
                self.registered.insert(key, (token, wanted));
                self.conn_tokens.insert(token, key);
                self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(wanted, token))
            }
            (None, true) => Ok(()),
        };
        if let Err(e) = result {
            log::warn!("vsock: epoll update for {key:?} failed: {e}");
        }
    }

    /// Re-evaluates every connection after the guest granted credit or added RX buffers.
    pub fn refresh_interest(&mut self) {
        for key in self.conns.keys().copied().collect::<Vec<_>>() {
            self.sync_interest(key);
        }
    }

    fn take_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn take_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }
}

impl Drop for UnixBackend {
    fn drop(&mut self) {
        // We created the listening socket file; nothing else removes it.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.trim_end_matches('\r').strip_prefix("CONNECT ")?.trim().parse().ok()
}
