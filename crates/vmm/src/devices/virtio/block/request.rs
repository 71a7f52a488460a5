//! virtio-blk requests: decoding a walked descriptor chain into a [`Request`]. Only decoding
//! happens here; whether the request fits the disk is the device's business.
//!
//! A request is a byte stream split over descriptors in any way (VERSION_1 implies
//! ANY_LAYOUT): device-readable bytes first, starting with the 16-byte header (type,
//! reserved, sector) and followed by the data the device reads (OUT, DISCARD,
//! WRITE_ZEROES); then device-writable bytes: the data the device writes (IN, GET_ID), and
//! last the one status byte. The chain is walked, and the header read, by the shared checked
//! walker in [`crate::devices::virtio::chain`]; data is never read here.

use vm_memory::GuestMemory;

use crate::devices::virtio::chain::{read_buffer, walk_chain, ChainError};
pub use crate::devices::virtio::chain::{DescriptorTable, GuestAccess};

/// Size of the request header.
pub const HEADER_SIZE: u64 = 16;
/// Size of one DISCARD / WRITE_ZEROES segment.
pub const RANGE_SIZE: u64 = 16;
/// Most data segments a request may have (the `seg_max` the device advertises): the queue
/// size less the header and status descriptors.
pub const SEG_MAX: u32 = 254;
/// Most descriptors a chain may have: the data segments, the header and the status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Most data bytes one request may carry. Linux sends at most 1280 KiB per request unless
/// `max_sectors_kb` is raised; anything above this is answered IOERR, so that one request
/// cannot hold the control thread for long.
pub const MAX_DATA_BYTES: u64 = 64 << 20;

/// Request type IN (read from the disk).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type OUT (write to the disk).
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type FLUSH.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type GET_ID.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type DISCARD.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type WRITE_ZEROES.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// WRITE_ZEROES flag: the device may deallocate the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Request kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the driver's buffers.
    In,
    /// Write the driver's buffers to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// The device id string (20 bytes).
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Any other type: answered UNSUPP.
    Unsupported(u32),
}

impl RequestType {
    /// The type of wire value `ty`.
    pub fn from_wire(ty: u32) -> Self {
        match ty {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A guest byte range a request uses; not checked for accessibility (that is done at each
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

/// A decoded request. The sector and the data lengths are still unchecked against the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub ty: RequestType,
    /// First sector (512 bytes each, whatever the block size).
    pub sector: u64,
    /// Device-readable bytes after the header.
    pub readable: Vec<Piece>,
    /// Device-writable bytes before the status byte.
    pub writable: Vec<Piece>,
}

/// Why a chain is not a request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain could not be walked, or the header was not accessible.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The chain has more descriptors than `seg_max` allows.
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// The last descriptor is not a device-writable buffer of at least one byte.
    #[error("no status byte: the last descriptor is not device-writable")]
    NoStatus,
    /// Indirect descriptors were not offered.
    #[error("indirect descriptor in a virtio-blk chain")]
    Indirect,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    Direction,
    /// Fewer than 16 device-readable bytes.
    #[error("request header of {0} bytes is shorter than 16")]
    HeaderTooShort(u64),
    /// More data than [`MAX_DATA_BYTES`].
    #[error("{0} bytes of data is more than a request may carry")]
    TooLarge(u64),
}

/// The outcome of parsing one chain.
#[derive(Debug)]
pub struct ParsedChain {
    /// Where the status byte goes, if the chain ends in a device-writable byte, even when the
    /// request itself is invalid.
    pub status: Option<u64>,
    /// The request, or why there is none.
    pub request: Result<Request, RequestError>,
}

/// Splits `pieces` (none wrapping around the address space) at byte `at`: the bytes before
/// and the bytes from `at` on.
fn split_at(pieces: &[Piece], at: u64) -> (Vec<Piece>, Vec<Piece>) {
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut offset = 0u64;
    for piece in pieces {
        let len = u64::from(piece.len);
        if offset + len <= at {
            before.push(*piece);
        } else if offset >= at {
            after.push(*piece);
        } else {
            // `at - offset` is below `len`, itself a u32.
            let head = (at - offset) as u32;
            before.push(Piece {
                addr: piece.addr,
                len: head,
            });
            after.push(Piece {
                addr: piece.addr + u64::from(head),
                len: piece.len - head,
            });
        }
        offset += len;
    }
    (before, after)
}

/// Reads `out.len()` bytes from the start of `pieces`, which hold at least that many.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    pieces: &[Piece],
    out: &mut [u8],
) -> Result<(), ChainError> {
    let mut done = 0;
    for piece in pieces {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(piece.len as usize);
        read_buffer(mem, access, piece.addr, &mut out[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Decodes a 16-byte header into (type, sector); the reserved field (Linux puts the I/O
/// priority there) is ignored.
pub fn decode_header(bytes: &[u8; HEADER_SIZE as usize]) -> (u32, u64) {
    let ty = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&bytes[8..16]);
    (ty, u64::from_le_bytes(sector))
}

/// One DISCARD / WRITE_ZEROES segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (UNMAP for WRITE_ZEROES; none for DISCARD).
    pub flags: u32,
}

/// Decodes one 16-byte segment.
pub fn decode_range(bytes: &[u8; RANGE_SIZE as usize]) -> Range {
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&bytes[0..8]);
    Range {
        sector: u64::from_le_bytes(sector),
        num_sectors: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        flags: u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
    }
}

/// Parses the chain starting at descriptor `head`.
pub fn parse_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
) -> ParsedChain {
    let no_status = |e: RequestError| ParsedChain {
        status: None,
        request: Err(e),
    };
    let chain = match walk_chain(mem, access, table, head, MAX_DESCRIPTORS) {
        Ok(chain) => chain,
        Err(e) => return no_status(e.into()),
    };
    if chain.continues {
        // The status byte is in a descriptor the walk did not read.
        return no_status(RequestError::TooManyDescriptors);
    }
    let Some(last) = chain.buffers.last().filter(|b| b.writable && b.len > 0) else {
        return no_status(RequestError::NoStatus);
    };
    let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return no_status(RequestError::NoStatus);
    };
    let request = decode(mem, access, &chain.buffers);
    ParsedChain {
        status: Some(status),
        request,
    }
}

/// Decodes the buffers of a chain whose last byte is the status.
fn decode<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    buffers: &[crate::devices::virtio::chain::Buffer],
) -> Result<Request, RequestError> {
    if buffers.iter().any(|b| b.indirect) {
        return Err(RequestError::Indirect);
    }
    // A buffer that wraps around the address space is nowhere: refused before it is split,
    // so that no piece of it can start again at address 0.
    if let Some(b) = buffers
        .iter()
        .find(|b| b.addr.checked_add(u64::from(b.len)).is_none())
    {
        return Err(ChainError::Inaccessible {
            addr: b.addr,
            len: u64::from(b.len),
        }
        .into());
    }
    let readable_count = buffers.iter().take_while(|b| !b.writable).count();
    if buffers[readable_count..].iter().any(|b| !b.writable) {
        return Err(RequestError::Direction);
    }
    let piece = |b: &crate::devices::virtio::chain::Buffer| Piece {
        addr: b.addr,
        len: b.len,
    };
    let nonempty = |p: &Piece| p.len > 0;
    let readable: Vec<Piece> = buffers[..readable_count]
        .iter()
        .map(piece)
        .filter(nonempty)
        .collect();
    let writable_all: Vec<Piece> = buffers[readable_count..]
        .iter()
        .map(piece)
        .filter(nonempty)
        .collect();
    let readable_len = total_len(&readable);
    // At least the status byte: parse_chain checked the last buffer.
    let writable_len = total_len(&writable_all).saturating_sub(1);
    if readable_len < HEADER_SIZE {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let data = readable_len - HEADER_SIZE + writable_len;
    if data > MAX_DATA_BYTES {
        return Err(RequestError::TooLarge(data));
    }
    let (header_pieces, readable) = split_at(&readable, HEADER_SIZE);
    let (writable, _status) = split_at(&writable_all, writable_len);
    let mut header = [0u8; HEADER_SIZE as usize];
    read_stream(mem, access, &header_pieces, &mut header)?;
    let (ty, sector) = decode_header(&header);
    Ok(Request {
        ty: RequestType::from_wire(ty),
        sector,
        readable,
        writable,
    })
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn split_cuts_inside_and_between_pieces() {
        let pieces = [Piece { addr: 100, len: 10 }, Piece { addr: 200, len: 6 }];
        let (a, b) = split_at(&pieces, 12);
        assert_eq!(
            a,
            vec![Piece { addr: 100, len: 10 }, Piece { addr: 200, len: 2 }]
        );
        assert_eq!(b, vec![Piece { addr: 202, len: 4 }]);
        let (a, b) = split_at(&pieces, 10);
        assert_eq!((a.len(), b.len()), (1, 1));
        let (a, b) = split_at(&pieces, 16);
        assert_eq!((a.len(), b.len()), (2, 0));
    }
}
