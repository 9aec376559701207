//! Device-level tests with real guest memory, real virtio rings and real Unix sockets: the
//! driver side of each queue is written into `GuestMemoryMmap` exactly as a guest would.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{op, HOST_CID, TYPE_STREAM};
use super::unix::MAX_QUEUED_CONTROL;
use super::{Vsock, VsockConfig};
use crate::virtio::{Interrupt, VirtioDevice};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const HEADER_LEN: usize = 44;
const RX_BUF_LEN: u32 = 4096;

/// The driver half of one split virtqueue living in guest memory.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn new(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn device_queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes raw descriptors (addr, len, flags, next) at the next free table slots and
    /// publishes the first one. `next` values are relative to that first slot.
    fn publish_raw(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = u64::from(head) + i as u64;
            let at = GuestAddress(self.desc + 16 * slot);
            mem.write_obj(addr, at).expect("desc addr");
            mem.write_obj(len, at.unchecked_add(8)).expect("desc len");
            mem.write_obj(flags, at.unchecked_add(12)).expect("desc flags");
            mem.write_obj(head + next, at.unchecked_add(14)).expect("desc next");
        }
        self.next_desc += descs.len() as u16;
        let ring_slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * ring_slot)).expect("avail ring");
        self.avail_idx += 1;
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).expect("avail idx");
        head
    }

    /// A well-formed chain: each descriptor links to the next.
    fn publish(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                (
                    addr,
                    len,
                    if last { flags } else { flags | VRING_DESC_F_NEXT },
                    if last { 0 } else { i as u16 + 1 },
                )
            })
            .collect();
        self.publish_raw(mem, &raw)
    }

    /// Used entries (head, len) the device returned since the last call.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QUEUE_SIZE);
            let id: u32 = mem.read_obj(GuestAddress(self.used + 4 + 8 * slot)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(self.used + 8 + 8 * slot)).expect("used len");
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn from_guest(src_port: u32, dst_port: u32, op: u16, len: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, at: u64) {
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(&self.src_cid.to_le_bytes());
        b.extend_from_slice(&self.dst_cid.to_le_bytes());
        b.extend_from_slice(&self.src_port.to_le_bytes());
        b.extend_from_slice(&self.dst_port.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.type_.to_le_bytes());
        b.extend_from_slice(&self.op.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.buf_alloc.to_le_bytes());
        b.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).expect("write header");
    }

    fn read(mem: &GuestMemoryMmap, at: u64) -> Self {
        let mut b = [0u8; HEADER_LEN];
        mem.read_slice(&mut b, GuestAddress(at)).expect("read header");
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A vsock device wired to guest memory and to a Unix socket in a private directory.
struct Harness {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    vsock: Vsock,
    irq: EventFd,
    dir: PathBuf,
    /// Next free data buffer address.
    next_buf: u64,
}

impl Harness {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("termlab-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("clone eventfd")));
        let config = VsockConfig { guest_cid: GUEST_CID, uds_path: dir.join("v.sock") };
        let mut vsock = Vsock::new(&config, interrupt).expect("vsock device");
        let (rx, tx, event) =
            (DriverQueue::new(0x1000), DriverQueue::new(0x4000), DriverQueue::new(0x7000));
        vsock
            .activate(mem.clone(), vec![rx.device_queue(), tx.device_queue(), event.device_queue()])
            .expect("activate");
        Self { mem, rx, tx, vsock, irq, dir, next_buf: 0x10000 }
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let at = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(0x100);
        at
    }

    /// Guest sends a packet (header + optional payload in a second descriptor).
    fn guest_sends(&mut self, header: Header, payload: &[u8]) -> u16 {
        let h = self.alloc(HEADER_LEN as u32);
        header.write(&self.mem, h);
        let head = if payload.is_empty() {
            self.tx.publish(&self.mem, &[(h, HEADER_LEN as u32, 0)])
        } else {
            let d = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(d)).expect("payload");
            self.tx.publish(&self.mem, &[(h, HEADER_LEN as u32, 0), (d, payload.len() as u32, 0)])
        };
        self.vsock.process_queues();
        head
    }

    /// Guest posts one receive buffer (Linux >= 6.2 style: header and data in one descriptor).
    fn guest_posts_rx_buffer(&mut self) -> (u16, u64) {
        let at = self.alloc(RX_BUF_LEN);
        (self.rx.publish(&self.mem, &[(at, RX_BUF_LEN, VRING_DESC_F_WRITE)]), at)
    }

    /// Packets the device delivered into posted RX buffers, with their payloads.
    fn guest_receives(&mut self, buffers: &[(u16, u64)]) -> Vec<(Header, Vec<u8>)> {
        self.rx
            .take_used(&self.mem)
            .into_iter()
            .map(|(head, len)| {
                let &(_, at) = buffers
                    .iter()
                    .find(|(h, _)| *h == head)
                    .expect("used entry names a posted buffer");
                let header = Header::read(&self.mem, at);
                assert_eq!(
                    len as usize,
                    HEADER_LEN + header.len as usize,
                    "used length = header + payload"
                );
                let mut data = vec![0u8; header.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(at + HEADER_LEN as u64))
                    .expect("payload");
                (header, data)
            })
            .collect()
    }

    fn interrupt_raised(&self) -> bool {
        self.irq.read().is_ok()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn response_from_host(h: &Header, op: u16) -> bool {
    h.op == op && h.src_cid == HOST_CID && h.dst_cid == GUEST_CID && h.type_ == TYPE_STREAM
}

#[test]
fn guest_initiated_connection_carries_bytes_both_ways() {
    let mut t = Harness::new("guest-init");
    let listener =
        UnixListener::bind(format!("{}_1234", t.uds().display())).expect("host port socket");
    let buffers: Vec<_> = (0..4).map(|_| t.guest_posts_rx_buffer()).collect();

    t.guest_sends(Header::from_guest(1025, 1234, op::REQUEST, 0), &[]);
    let (mut host, _) = listener.accept().expect("VMM connected to <uds>_1234");
    host.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let got = t.guest_receives(&buffers);
    assert_eq!(got.len(), 1);
    assert!(response_from_host(&got[0].0, op::RESPONSE), "{:?}", got[0].0);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (1234, 1025));
    assert!(t.interrupt_raised());

    let tx_head = t.guest_sends(Header::from_guest(1025, 1234, op::RW, 5), b"hello");
    assert_eq!(t.tx.take_used(&t.mem).last(), Some(&(tx_head, 0)));
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).expect("host reads guest bytes");
    assert_eq!(&buf, b"hello");

    // Payload spread over three descriptors (Linux sends large writes as non-linear skbs).
    let h = t.alloc(HEADER_LEN as u32);
    Header::from_guest(1025, 1234, op::RW, 10).write(&t.mem, h);
    let parts: Vec<u64> = [&b"abc"[..], b"defg", b"hij"]
        .iter()
        .map(|part| {
            let at = t.alloc(part.len() as u32);
            t.mem.write_slice(part, GuestAddress(at)).expect("payload part");
            at
        })
        .collect();
    t.tx.publish(
        &t.mem,
        &[(h, HEADER_LEN as u32, 0), (parts[0], 3, 0), (parts[1], 4, 0), (parts[2], 3, 0)],
    );
    t.vsock.process_queues();
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).expect("host reads the gathered payload");
    assert_eq!(&buf, b"abcdefghij");

    host.write_all(b"world").expect("host writes");
    t.vsock.process_backend();
    let got = t.guest_receives(&buffers);
    assert_eq!(got.len(), 1);
    assert!(response_from_host(&got[0].0, op::RW), "{:?}", got[0].0);
    assert_eq!(got[0].1, b"world");
    assert_eq!(got[0].0.fwd_cnt, 15, "our fwd_cnt counts the 15 bytes delivered to the host");
}

#[test]
fn host_initiated_connection_follows_the_connect_ok_handshake() {
    let mut t = Harness::new("host-init");
    let buffers: Vec<_> = (0..4).map(|_| t.guest_posts_rx_buffer()).collect();
    let mut host = UnixStream::connect(t.uds()).expect("connect to the VMM socket");
    host.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    host.write_all(b"CONNECT 52\n").expect("CONNECT");
    t.vsock.process_backend();
    let got = t.guest_receives(&buffers);
    assert_eq!(got.len(), 1);
    let request = got[0].0;
    assert!(response_from_host(&request, op::REQUEST), "{request:?}");
    assert_eq!(request.dst_port, 52);

    t.guest_sends(Header::from_guest(52, request.src_port, op::RESPONSE, 0), &[]);
    let mut ok = [0u8; 32];
    let n = host.read(&mut ok).expect("OK line");
    assert_eq!(std::str::from_utf8(&ok[..n]).expect("ascii"), format!("OK {}\n", request.src_port));

    host.write_all(b"ping").expect("host writes");
    t.vsock.process_backend();
    let got = t.guest_receives(&buffers);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].1.as_slice()), (op::RW, &b"ping"[..]));
}

#[test]
fn invalid_connect_line_is_dropped() {
    let mut t = Harness::new("bad-connect");
    let buffers: Vec<_> = (0..2).map(|_| t.guest_posts_rx_buffer()).collect();
    let mut host = UnixStream::connect(t.uds()).expect("connect");
    host.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    host.write_all(b"HELLO 52\n").expect("write");
    t.vsock.process_backend();
    assert!(t.guest_receives(&buffers).is_empty(), "nothing reaches the guest");
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).expect("read"), 0, "the VMM closed the host connection");
}

#[test]
fn packet_for_unknown_connection_is_answered_with_rst() {
    let mut t = Harness::new("unknown");
    let buffers: Vec<_> = (0..2).map(|_| t.guest_posts_rx_buffer()).collect();
    t.guest_sends(Header::from_guest(1025, 9999, op::RW, 3), b"abc");
    let got = t.guest_receives(&buffers);
    assert_eq!(got.len(), 1);
    assert!(response_from_host(&got[0].0, op::RST));
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (9999, 1025));
    // A REQUEST to a host port nobody listens on is refused the same way.
    t.guest_sends(Header::from_guest(1026, 4321, op::REQUEST, 0), &[]);
    let got = t.guest_receives(&buffers);
    assert!(got.len() == 1 && got[0].0.op == op::RST, "{got:?}");
}

/// Each malformed TX chain is returned unused and the device keeps serving the next one.
#[test]
fn malformed_tx_chains_are_rejected_without_panic() {
    let mut t = Harness::new("bad-tx");
    let h = t.alloc(HEADER_LEN as u32);
    let data = t.alloc(256);
    let out_of_range = MEM_SIZE as u64 + 0x1000;
    let hl = HEADER_LEN as u32;
    let (next, write) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
    let rw = |len| Header::from_guest(1025, 9999, op::RW, len);
    type RawChain = Vec<(u64, u32, u16, u16)>;
    let cases: Vec<(&str, Header, RawChain)> = vec![
        ("header outside guest memory", rw(0), vec![(out_of_range, hl, 0, 0)]),
        ("header straddling the end of memory", rw(0), vec![(MEM_SIZE as u64 - 8, hl, 0, 0)]),
        ("header descriptor too short", rw(0), vec![(h, 10, 0, 0)]),
        ("payload shorter than header len", rw(100), vec![(h, hl, next, 1), (data, 10, 0, 0)]),
        ("payload outside guest memory", rw(16), vec![(h, hl, next, 1), (out_of_range, 16, 0, 0)]),
        ("header len over the maximum", rw(1 << 20), vec![(h, hl, next, 1), (data, 256, 0, 0)]),
        ("payload missing", rw(16), vec![(h, hl, 0, 0)]),
        ("write-only header in TX", rw(0), vec![(h, hl, write, 0)]),
        ("write-only payload in TX", rw(16), vec![(h, hl, next, 1), (data, 256, write, 0)]),
        ("chain that loops", rw(16), vec![(h, hl, next, 1), (data, 256, next, 0)]),
        ("next index outside the table", rw(16), vec![(h, hl, next, 200)]),
    ];
    for (what, header, descs) in cases {
        // Every earlier chain and buffer was consumed, so the table slots can be reused.
        t.tx.next_desc = 0;
        t.rx.next_desc = 0;
        let buffer = t.guest_posts_rx_buffer();
        header.write(&t.mem, h);
        let head = t.tx.publish_raw(&t.mem, &descs);
        t.vsock.process_queues();
        assert_eq!(t.tx.take_used(&t.mem), vec![(head, 0)], "{what}: chain returned to the guest");
        assert!(t.guest_receives(&[buffer]).is_empty(), "{what}: must not be acted upon");
        // The device still works: a valid packet right after gets its answer.
        t.tx.next_desc = 0;
        t.guest_sends(rw(3), b"abc");
        t.tx.take_used(&t.mem);
        let got = t.guest_receives(&[buffer]);
        assert!(
            got.len() == 1 && got[0].0.op == op::RST,
            "{what}: device keeps serving, got {got:?}"
        );
    }
}

/// Malformed RX buffers are consumed (returned with length 0) and the pending packet goes
/// into the next good buffer instead of being lost.
#[test]
fn malformed_rx_buffers_are_skipped_and_the_packet_is_kept() {
    let mut t = Harness::new("bad-rx");
    let at = t.alloc(RX_BUF_LEN);
    let bad_heads = [
        t.rx.publish_raw(&t.mem, &[(at, RX_BUF_LEN, 0, 0)]), // read-only where the device must write
        t.rx.publish_raw(&t.mem, &[(at, 8, VRING_DESC_F_WRITE, 0)]), // too short for a header
        t.rx.publish_raw(&t.mem, &[(MEM_SIZE as u64, RX_BUF_LEN, VRING_DESC_F_WRITE, 0)]), // outside memory
        t.rx.publish_raw(
            &t.mem,
            &[(at, HEADER_LEN as u32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)],
        ), // loop
    ];
    let good = t.guest_posts_rx_buffer();
    t.guest_sends(Header::from_guest(1025, 9999, op::RW, 3), b"abc");
    let used = t.rx.take_used(&t.mem);
    let expected: Vec<(u16, u32)> =
        bad_heads.iter().map(|&h| (h, 0)).chain([(good.0, HEADER_LEN as u32)]).collect();
    assert_eq!(used, expected);
    let header = Header::read(&t.mem, good.1);
    assert!(response_from_host(&header, op::RST), "{header:?}");
}

/// A guest that keeps sending but never posts RX buffers cannot make the device hold replies
/// without bound (host memory): TX pauses at the limit and resumes as the guest reads.
#[test]
fn unread_replies_pause_tx_until_the_guest_reads() {
    let mut t = Harness::new("backpressure");
    let h = t.alloc(HEADER_LEN as u32);
    // Every packet to a port nobody listens on earns an RST.
    Header::from_guest(1025, 9999, op::RW, 0).write(&t.mem, h);
    let (mut sent, mut consumed) = (0, 0);
    while consumed == sent && sent <= 2 * MAX_QUEUED_CONTROL {
        t.tx.next_desc = 0;
        for _ in 0..QUEUE_SIZE {
            t.tx.publish(&t.mem, &[(h, HEADER_LEN as u32, 0)]);
        }
        sent += usize::from(QUEUE_SIZE);
        t.vsock.process_queues();
        consumed += t.tx.take_used(&t.mem).len();
    }
    assert_eq!(consumed, MAX_QUEUED_CONTROL, "TX pauses once this many replies wait");

    let buffers: Vec<_> = (0..8).map(|_| t.guest_posts_rx_buffer()).collect();
    t.vsock.process_queues();
    let replies = t.guest_receives(&buffers);
    assert!(replies.len() == 8 && replies.iter().all(|(h, _)| h.op == op::RST), "{replies:?}");
    assert_eq!(
        t.tx.take_used(&t.mem).len(),
        8,
        "TX goes on for as many packets as replies were read"
    );
}

#[test]
fn host_half_close_still_lets_the_guest_answer() {
    let mut t = Harness::new("half-close");
    let listener =
        UnixListener::bind(format!("{}_77", t.uds().display())).expect("host port socket");
    let buffers: Vec<_> = (0..4).map(|_| t.guest_posts_rx_buffer()).collect();
    t.guest_sends(Header::from_guest(1025, 77, op::REQUEST, 0), &[]);
    let (mut host, _) = listener.accept().expect("accept");
    host.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    assert_eq!(t.guest_receives(&buffers)[0].0.op, op::RESPONSE);

    host.write_all(b"question").expect("write");
    host.shutdown(std::net::Shutdown::Write).expect("half-close");
    t.vsock.process_backend();
    let mut got = t.guest_receives(&buffers);
    if got.len() < 2 {
        // Data and EOF may surface in separate wakeups.
        t.vsock.process_backend();
        got.extend(t.guest_receives(&buffers));
    }
    let ops: Vec<_> = got.iter().map(|(h, d)| (h.op, h.flags, d.clone())).collect();
    assert_eq!(
        ops,
        vec![
            (op::RW, 0, b"question".to_vec()),
            (op::SHUTDOWN, super::packet::SHUTDOWN_SEND, vec![])
        ]
    );

    t.guest_sends(Header::from_guest(1025, 77, op::RW, 6), b"answer");
    let mut buf = [0u8; 6];
    host.read_exact(&mut buf).expect("host still reads after its half-close");
    assert_eq!(&buf, b"answer");
}

/// Bytes the host stream could not take yet still arrive after the guest closes.
#[test]
fn guest_close_delivers_backlog_before_rst() {
    let mut t = Harness::new("linger");
    let listener =
        UnixListener::bind(format!("{}_78", t.uds().display())).expect("host port socket");
    let buffers: Vec<_> = (0..10).map(|_| t.guest_posts_rx_buffer()).collect();
    t.guest_sends(Header::from_guest(1025, 78, op::REQUEST, 0), &[]);
    let (mut host, _) = listener.accept().expect("accept");
    host.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    assert_eq!(t.guest_receives(&buffers)[0].0.op, op::RESPONSE);

    // Fill the host socket until it pushes back, so the VMM has to keep a backlog.
    let chunk = vec![0x5au8; 32 * 1024];
    let mut sent = 0usize;
    for _ in 0..7 {
        t.tx.next_desc = 0;
        t.guest_sends(Header::from_guest(1025, 78, op::RW, chunk.len() as u32), &chunk);
        t.tx.take_used(&t.mem);
        sent += chunk.len();
    }
    t.tx.next_desc = 0;
    let mut shutdown = Header::from_guest(1025, 78, op::SHUTDOWN, 0);
    shutdown.flags = super::packet::SHUTDOWN_RCV | super::packet::SHUTDOWN_SEND;
    t.guest_sends(shutdown, &[]);

    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while received.len() < sent {
        let n = host.read(&mut buf).expect("host reads");
        assert_ne!(n, 0, "connection closed after {} of {sent} bytes", received.len());
        received.extend_from_slice(&buf[..n]);
        t.vsock.process_backend();
    }
    assert!(received.iter().all(|b| *b == 0x5a));
    t.vsock.process_backend();
    let got = t.guest_receives(&buffers);
    assert!(got.iter().any(|(h, _)| h.op == op::RST), "close confirmed with RST: {got:?}");
    assert_eq!(host.read(&mut buf).expect("EOF"), 0, "host sees EOF after the data");
}
