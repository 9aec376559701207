//! Turning guest descriptor chains into vsock packets, with every check the guest could fail.
//!
//! RX buffers are parsed by `virtio-vsock` (it validates direction, lengths and address
//! ranges). TX packets are parsed here because guests (Linux >= 6.12 with non-linear skbs)
//! spread payloads over several descriptors, which `virtio-vsock` rejects. Both paths first
//! reject chains whose `next` links loop or leave the table: `virtio-queue`'s chain walk
//! would silently truncate those.

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

/// A descriptor chain popped from one of the device's queues.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;
/// A host->guest packet being written straight into a guest RX buffer.
pub type RxPacket<'a> = VsockPacket<'a, ()>;

/// Largest payload we accept from or hand to the guest in one packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// The vsock address family's fixed host CID.
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio spec 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain starting at {head} loops or links outside the descriptor table")]
    BrokenChain { head: u16 },
    #[error("malformed vsock packet: {0}")]
    Parse(virtio_vsock::packet::Error),
    #[error("TX descriptor is device-writable; the device must only read TX buffers")]
    WriteOnlyInTx,
    #[error("TX header descriptor holds {0} bytes, less than the {PKT_HEADER_SIZE}-byte header")]
    HeaderTooShort(u32),
    #[error("TX header announces {0} payload bytes, more than the {MAX_PKT_DATA} allowed")]
    PayloadTooLarge(u32),
    #[error("TX chain ends after {got} of the {want} payload bytes its header announces")]
    PayloadTruncated { got: usize, want: usize },
    #[error("TX descriptor points outside guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// A guest->host packet, copied out of guest memory (the guest may reuse its buffers as
/// soon as the chain is returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    header: [u8; PKT_HEADER_SIZE],
    data: Vec<u8>,
}

impl TxPacket {
    fn field<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.header[offset..offset + N]);
        out
    }
    pub fn src_cid(&self) -> u64 {
        u64::from_le_bytes(self.field(0))
    }
    pub fn dst_cid(&self) -> u64 {
        u64::from_le_bytes(self.field(8))
    }
    pub fn src_port(&self) -> u32 {
        u32::from_le_bytes(self.field(16))
    }
    pub fn dst_port(&self) -> u32 {
        u32::from_le_bytes(self.field(20))
    }
    pub fn len(&self) -> u32 {
        u32::from_le_bytes(self.field(24))
    }
    pub fn type_(&self) -> u16 {
        u16::from_le_bytes(self.field(28))
    }
    pub fn op(&self) -> u16 {
        u16::from_le_bytes(self.field(30))
    }
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes(self.field(32))
    }
    pub fn buf_alloc(&self) -> u32 {
        u32::from_le_bytes(self.field(36))
    }
    pub fn fwd_cnt(&self) -> u32 {
        u32::from_le_bytes(self.field(40))
    }
    /// The payload (`len()` bytes).
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Header fields of a packet the device sends to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFields {
    pub src_port: u32,
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Fails when walking the chain ends on a descriptor that still claims a successor, which is
/// what `virtio-queue`'s walk does on loops (TTL exhausted) and on out-of-table `next` indices.
fn check_chain(chain: &Chain<'_>) -> Result<(), PacketError> {
    match chain.clone().last() {
        Some(last) if !last.has_next() => Ok(()),
        _ => Err(PacketError::BrokenChain { head: chain.head_index() }),
    }
}

/// Parses a guest->host (TX queue) chain: a read-only header descriptor (possibly followed
/// by payload in the same descriptor), then payload in any number of read-only descriptors.
pub fn parse_tx(mem: &GuestMemoryMmap, chain: &mut Chain<'_>) -> Result<TxPacket, PacketError> {
    check_chain(chain)?;
    let head = chain.next().ok_or(PacketError::BrokenChain { head: chain.head_index() })?;
    if head.is_write_only() {
        return Err(PacketError::WriteOnlyInTx);
    }
    if (head.len() as usize) < PKT_HEADER_SIZE {
        return Err(PacketError::HeaderTooShort(head.len()));
    }
    let mut header = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut header, head.addr()).map_err(PacketError::Memory)?;
    let mut packet = TxPacket { header, data: Vec::new() };
    let want = packet.len();
    if want > MAX_PKT_DATA {
        return Err(PacketError::PayloadTooLarge(want));
    }
    let want = want as usize;
    // The header was readable, so the address right after it cannot overflow.
    let mut segments = vec![(
        head.addr().unchecked_add(PKT_HEADER_SIZE as u64),
        head.len() as usize - PKT_HEADER_SIZE,
    )];
    for desc in chain {
        if desc.is_write_only() {
            return Err(PacketError::WriteOnlyInTx);
        }
        segments.push((desc.addr(), desc.len() as usize));
    }
    packet.data.reserve(want);
    for (addr, len) in segments {
        let take = len.min(want - packet.data.len());
        if take == 0 {
            continue;
        }
        let start = packet.data.len();
        packet.data.resize(start + take, 0);
        mem.read_slice(&mut packet.data[start..], addr).map_err(PacketError::Memory)?;
    }
    if packet.data.len() < want {
        return Err(PacketError::PayloadTruncated { got: packet.data.len(), want });
    }
    Ok(packet)
}

/// Parses a host→guest (RX queue) chain: buffers the device will fill.
pub fn parse_rx<'a>(
    mem: &'a GuestMemoryMmap,
    chain: &mut Chain<'_>,
) -> Result<RxPacket<'a>, PacketError> {
    check_chain(chain)?;
    VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Parse)
}
