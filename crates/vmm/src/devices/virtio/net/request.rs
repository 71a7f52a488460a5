//! virtio-net chains: decoding a walked descriptor chain into the guest pieces of one frame.
//! Only decoding happens here; the frame bytes are read or written by the device, each access
//! checked again right before it.
//!
//! A TX chain is device-readable bytes only: the 12-byte `virtio_net_hdr_v1`, then the
//! frame, split over descriptors in any way (VERSION_1 implies ANY_LAYOUT). An RX chain is
//! device-writable bytes only, at least the header long. Indirect descriptors are not offered
//! and are refused; so are descriptors of the wrong direction.

use vm_memory::GuestMemory;

use crate::devices::virtio::chain::{walk_chain, ChainError};
pub use crate::devices::virtio::chain::{DescriptorTable, GuestAccess};

/// Size of `virtio_net_hdr_v1` (`num_buffers` included: VERSION_1 always has it).
pub const NET_HDR_SIZE: usize = 12;
/// Largest frame (after the header) a TX chain may carry: without TSO negotiated Linux sends
/// at most MTU + 18 bytes; 64 KiB leaves room for any MTU a TAP takes.
pub const MAX_FRAME: usize = 64 << 10;
/// Size of each queue; also the most descriptors one chain may have.
pub const QUEUE_SIZE: u16 = 256;

/// A guest byte range of a frame; not checked for accessibility (that is done at each
/// access).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// Sums the lengths of `pieces`.
pub fn total_len(pieces: &[Piece]) -> u64 {
    pieces.iter().map(|p| u64::from(p.len)).sum()
}

/// Why a chain cannot carry a frame.
#[derive(Debug, thiserror::Error)]
pub enum NetChainError {
    /// The chain could not be walked.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// More descriptors than the queue has.
    #[error("more than {QUEUE_SIZE} descriptors")]
    TooManyDescriptors,
    /// Indirect descriptors were not offered.
    #[error("indirect descriptor in a virtio-net chain")]
    Indirect,
    /// A device-writable descriptor in a TX chain.
    #[error("device-writable descriptor in a TX chain")]
    WritableInTx,
    /// A device-readable descriptor in an RX chain.
    #[error("device-readable descriptor in an RX chain")]
    ReadableInRx,
    /// Fewer bytes than the header.
    #[error("{0} bytes is shorter than the 12-byte virtio-net header")]
    ShorterThanHeader(u64),
    /// A TX frame larger than [`MAX_FRAME`].
    #[error("a TX chain of {0} bytes is larger than the header and a 64 KiB frame")]
    TooLarge(u64),
}

/// Walks chain `head` and returns its pieces if every descriptor has direction `writable`.
fn pieces<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
    writable: bool,
) -> Result<Vec<Piece>, NetChainError> {
    let chain = walk_chain(mem, access, table, head, usize::from(QUEUE_SIZE))?;
    if chain.continues {
        return Err(NetChainError::TooManyDescriptors);
    }
    let mut pieces = Vec::with_capacity(chain.buffers.len());
    for buffer in &chain.buffers {
        if buffer.indirect {
            return Err(NetChainError::Indirect);
        }
        match (buffer.writable, writable) {
            (true, false) => return Err(NetChainError::WritableInTx),
            (false, true) => return Err(NetChainError::ReadableInRx),
            _ => {}
        }
        if buffer.len > 0 {
            pieces.push(Piece {
                addr: buffer.addr,
                len: buffer.len,
            });
        }
    }
    let len = total_len(&pieces);
    if len < NET_HDR_SIZE as u64 {
        return Err(NetChainError::ShorterThanHeader(len));
    }
    Ok(pieces)
}

/// Decodes a TX chain: the pieces of header and frame, at most [`MAX_FRAME`] frame bytes.
pub fn parse_tx<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
) -> Result<Vec<Piece>, NetChainError> {
    let pieces = pieces(mem, access, table, head, false)?;
    let len = total_len(&pieces);
    if len > (NET_HDR_SIZE + MAX_FRAME) as u64 {
        return Err(NetChainError::TooLarge(len));
    }
    Ok(pieces)
}

/// Decodes an RX chain: the writable pieces the header and frame may fill.
pub fn parse_rx<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
) -> Result<Vec<Piece>, NetChainError> {
    pieces(mem, access, table, head, true)
}
