//! What both fuzz targets share: guest memory fenced by guard pages, the vsock device behind
//! its virtio-mmio transport wired the way `vm.rs` wires it, the driver side a guest programs,
//! a host side that talks to the device's Unix sockets, and a reader that turns fuzz input
//! into those operations.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use termlab_vmm::fuzzing::{Interrupt, MmioRegion, MmioTransport, Vsock};
use termlab_vmm::VsockConfig;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM: a 64 KiB region at 0 and a 4 KiB one at 0x11000, so descriptors can also
/// point into the hole between them and straddle a region end.
const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x1_1000, 0x1000)];
/// Guest-physical span the guest's own memory writes are aimed at (both regions and the hole).
pub const GUEST_SPAN: u32 = 0x1_2000;
const PAGE: usize = 4096;

pub const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
/// The host service guest connections can reach: `<uds>_1234` listens during each run.
pub const SERVICE_PORT: u32 = 1234;
/// Queue sizes the driver may pick are powers of two up to the device's maximum.
const MAX_QUEUE_SIZE_LOG2: u8 = 8;
/// Host streams a run may hold at once; more only costs time, not coverage.
const MAX_HOST_STREAMS: usize = 16;

// virtio-mmio registers (virtio 1.2, 4.2.2); `termlab_vmm` keeps its own copies private.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;
/// Size of one virtio-mmio slot: the VMM hands the transport offsets below this.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const VIRTIO_F_VERSION_1_HIGH: u32 = 1; // bit 32, in the high feature word

/// Fuzz input read front to back; past its end every read yields zeros, so any byte string
/// is a valid program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Guest RAM built once per process inside one reservation whose unused pages are
/// `PROT_NONE`: a host access past either end of a region faults at once instead of
/// silently touching whatever the allocator put next to it.
fn guarded_memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        // guard, region, guard, region, guard
        let total = REGIONS.iter().map(|&(_, size)| size + PAGE).sum::<usize>() + PAGE;
        // SAFETY: a fresh anonymous reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "cannot reserve guest memory");
        let mut offset = PAGE;
        let regions = REGIONS
            .iter()
            .map(|&(gpa, size)| {
                // SAFETY: `offset..offset + size` lies inside the reservation made above.
                let host = unsafe { base.cast::<u8>().add(offset) };
                let prot = libc::PROT_READ | libc::PROT_WRITE;
                // SAFETY: as above; only this range becomes accessible.
                let rc = unsafe { libc::mprotect(host.cast(), size, prot) };
                assert_eq!(rc, 0, "cannot map guest memory");
                offset += size + PAGE;
                // SAFETY: the range is a valid mapping with exactly these prot and flags, and
                // it is never unmapped (the reservation lives as long as the process).
                let mapping = unsafe {
                    MmapRegion::build_raw(host, size, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                }
                .expect("guest memory region");
                GuestRegionMmap::new(mapping, GuestAddress(gpa)).expect("guest region")
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).expect("guest memory")
    })
}

/// The guarded guest memory, zeroed so every run starts from the same state.
fn fresh_memory() -> GuestMemoryMmap {
    let mem = guarded_memory();
    for region in mem.iter() {
        // SAFETY: the region's whole host range is mapped read-write and no device from an
        // earlier run still holds it (runs are sequential and drop their devices).
        unsafe { std::ptr::write_bytes(region.as_ptr(), 0, region.size()) };
    }
    mem.clone()
}

/// Where this process's vsock sockets live; `scripts/fuzz` points TMPDIR at a directory it
/// removes afterwards.
fn socket_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("termlab-vmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        dir
    })
}

/// Queue `q`'s split-ring layout: each queue owns 0x3000 bytes at `q * 0x3000`, enough for
/// the largest ring; guest memory from 0x9000 on is free for packets.
pub fn desc_table(q: u8) -> u64 {
    u64::from(q) * 0x3000
}
fn avail_ring(q: u8) -> u64 {
    desc_table(q) + 0x1000
}
fn used_ring(q: u8) -> u64 {
    desc_table(q) + 0x2000
}
pub const NUM_QUEUES: u8 = 3;

/// Header fields a guest puts in a packet; the CIDs and the type are always the valid ones.
pub struct GuestHeader {
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl GuestHeader {
    pub fn read(input: &mut Input<'_>) -> Self {
        Self {
            src_port: input.u32(),
            dst_port: input.u32(),
            len: input.u32(),
            op: input.u16(),
            flags: input.u32(),
            buf_alloc: input.u32(),
            fwd_cnt: input.u32(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        [
            &GUEST_CID.to_le_bytes()[..],
            &HOST_CID.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &TYPE_STREAM.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ]
        .concat()
    }
}

/// One vsock device slot with its guest and host sides.
pub struct Machine {
    mem: GuestMemoryMmap,
    transport: MmioTransport<Vsock>,
    queue_size: u16,
    service_path: PathBuf,
    service: UnixListener,
    uds_path: PathBuf,
    host_streams: Vec<UnixStream>,
}

impl Machine {
    pub fn new() -> Self {
        let mem = fresh_memory();
        let uds_path = socket_dir().join("v.sock");
        let service_path = socket_dir().join(format!("v.sock_{SERVICE_PORT}"));
        let service = UnixListener::bind(&service_path).expect("host service socket");
        service.set_nonblocking(true).expect("non-blocking service socket");
        let irq = EventFd::new(EFD_NONBLOCK).expect("interrupt eventfd");
        let interrupt = Arc::new(Interrupt::new(irq));
        let config = VsockConfig { guest_cid: GUEST_CID, uds_path: uds_path.clone() };
        let device = Vsock::new(&config, interrupt.clone()).expect("vsock device");
        let kick = EventFd::new(EFD_NONBLOCK).expect("queue eventfd");
        let transport = MmioTransport::new(device, mem.clone(), interrupt, kick);
        Self {
            mem,
            transport,
            queue_size: 0,
            service_path,
            service,
            uds_path,
            host_streams: Vec::new(),
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// A guest access of `data.len()` bytes at `offset` in the slot (KVM reports 1 to 8).
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data);
    }

    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.transport.write(offset, data);
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut word = [0u8; 4];
        self.transport.read(offset, &mut word);
        u32::from_le_bytes(word)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The driver's initialisation (virtio 1.2, 3.1.1) with every queue of `1 << log2`
    /// entries at its fixed layout, as Linux's virtio_mmio does it.
    pub fn driver_init(&mut self, log2: u8) {
        self.queue_size = 1 << (log2 % (MAX_QUEUE_SIZE_LOG2 + 1));
        self.write_reg(REG_STATUS, 0);
        self.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write_reg(REG_DEVICE_FEATURES_SEL, 1);
        let offered = self.read_reg(REG_DEVICE_FEATURES);
        self.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        self.write_reg(REG_DRIVER_FEATURES, offered & VIRTIO_F_VERSION_1_HIGH);
        self.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        self.write_reg(REG_DRIVER_FEATURES, 0);
        let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write_reg(REG_STATUS, features_ok);
        for q in 0..NUM_QUEUES {
            self.write_reg(REG_QUEUE_SEL, u32::from(q));
            self.write_reg(REG_QUEUE_NUM, u32::from(self.queue_size));
            for (low, addr) in [
                (REG_QUEUE_DESC_LOW, desc_table(q)),
                (REG_QUEUE_DRIVER_LOW, avail_ring(q)),
                (REG_QUEUE_DEVICE_LOW, used_ring(q)),
            ] {
                self.write_reg(low, addr as u32);
                self.write_reg(low + 4, (addr >> 32) as u32);
            }
            self.write_reg(REG_QUEUE_READY, 1);
        }
        self.write_reg(REG_STATUS, features_ok | STATUS_DRIVER_OK);
    }

    /// The guest writes its own memory; writes outside RAM are the guest's loss.
    pub fn guest_write(&self, addr: u64, data: &[u8]) {
        let _ = vm_memory::Bytes::write_slice(&self.mem, data, GuestAddress(addr));
    }

    pub fn guest_write_header(&self, addr: u64, header: &GuestHeader) {
        self.guest_write(addr, &header.bytes());
    }

    /// Fills descriptor `index` of queue `q`'s table.
    pub fn guest_write_desc(&self, q: u8, index: u8, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = [
            &addr.to_le_bytes()[..],
            &len.to_le_bytes(),
            &flags.to_le_bytes(),
            &next.to_le_bytes(),
        ]
        .concat();
        self.guest_write(desc_table(q % NUM_QUEUES) + 16 * u64::from(index), &desc);
    }

    /// Puts `head` in queue `q`'s next avail slot and bumps the index, starting from whatever
    /// index the guest memory holds now.
    pub fn guest_publish(&self, q: u8, head: u16) {
        let avail = avail_ring(q % NUM_QUEUES);
        let idx: u16 = vm_memory::Bytes::read_obj(&self.mem, GuestAddress(avail + 2)).unwrap_or(0);
        let slot = u64::from(idx % self.queue_size.max(1));
        self.guest_write(avail + 4 + 2 * slot, &head.to_le_bytes());
        self.guest_write(avail + 2, &idx.wrapping_add(1).to_le_bytes());
    }

    /// A QueueNotify write followed by what the VMM's event thread does when the queue's
    /// ioeventfd fires.
    pub fn notify(&mut self, value: u32) {
        self.write_reg(REG_QUEUE_NOTIFY, value);
        self.transport.device_mut().process_queues();
    }

    /// What the event thread does when the device's host sockets are ready.
    pub fn backend_ready(&mut self) {
        self.transport.device_mut().process_backend();
    }

    /// A host client connects to the device's socket and sends `line` (normally
    /// `CONNECT <port>\n`).
    pub fn host_connect(&mut self, line: &[u8]) {
        if self.host_streams.len() >= MAX_HOST_STREAMS {
            return;
        }
        if let Ok(mut stream) = UnixStream::connect(&self.uds_path) {
            stream.set_nonblocking(true).expect("non-blocking host stream");
            let _ = stream.write(line);
            self.host_streams.push(stream);
        }
    }

    /// Takes the connections the device opened to the host service for the guest.
    fn accept_service(&mut self) {
        while self.host_streams.len() < MAX_HOST_STREAMS {
            let Ok((stream, _)) = self.service.accept() else { return };
            stream.set_nonblocking(true).expect("non-blocking host stream");
            self.host_streams.push(stream);
        }
    }

    fn host_stream(&mut self, index: u8) -> Option<&mut UnixStream> {
        self.accept_service();
        let count = self.host_streams.len();
        self.host_streams.get_mut(usize::from(index) % count.max(1))
    }

    pub fn host_write(&mut self, index: u8, len: u16, fill: u8) {
        if let Some(stream) = self.host_stream(index) {
            let _ = stream.write(&vec![fill; usize::from(len)]);
        }
    }

    pub fn host_read(&mut self, index: u8) {
        if let Some(stream) = self.host_stream(index) {
            let mut buf = [0u8; 64 * 1024];
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        }
    }

    /// 0: no more writes, 1: no more reads, 2: both, otherwise the host closes the stream.
    pub fn host_shutdown(&mut self, index: u8, how: u8) {
        self.accept_service();
        if self.host_streams.is_empty() {
            return;
        }
        let index = usize::from(index) % self.host_streams.len();
        let how = match how % 4 {
            0 => Shutdown::Write,
            1 => Shutdown::Read,
            2 => Shutdown::Both,
            _ => {
                self.host_streams.swap_remove(index);
                return;
            }
        };
        let _ = self.host_streams[index].shutdown(how);
    }
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // The device removes its own socket file; the service socket is ours.
        let _ = std::fs::remove_file(&self.service_path);
    }
}
