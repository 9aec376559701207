//! Turning guest descriptor chains into vsock packets, with every check the guest could fail.
//!
//! `virtio-vsock`'s parser validates descriptor direction, lengths and address ranges; it
//! trusts the chain walk of `virtio-queue`, which silently truncates a chain whose `next`
//! links loop or point outside the table. We reject such chains before parsing.

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

/// A descriptor chain popped from one of the device's queues.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;
/// A parsed packet whose header and data live in guest memory.
pub type Packet<'a> = VsockPacket<'a, ()>;

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

/// Parses a guest→host (TX queue) chain.
pub fn parse_tx<'a>(mem: &'a GuestMemoryMmap, chain: &mut Chain<'_>) -> Result<Packet<'a>, PacketError> {
    check_chain(chain)?;
    VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Parse)
}

/// Parses a host→guest (RX queue) chain: buffers the device will fill.
pub fn parse_rx<'a>(mem: &'a GuestMemoryMmap, chain: &mut Chain<'_>) -> Result<Packet<'a>, PacketError> {
    check_chain(chain)?;
    VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Parse)
}
