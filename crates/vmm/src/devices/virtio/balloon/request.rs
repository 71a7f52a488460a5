//! Decoding balloon requests from walked descriptor chains.
//!
//! Chains are walked, and buffers read, by the shared checked walker in
//! [`crate::devices::virtio::chain`]: each descriptor and each buffer is checked accessible
//! right before it is read, and the walk stops after as many descriptors as the queue has, so a
//! looping chain cannot hang the VMM. Indirect descriptors are refused (the device does not
//! offer them).

use vm_memory::GuestMemory;

use crate::arch::x86_64::layout::GuestRange;
use crate::devices::virtio::chain::{self, read_buffer, Buffer, ChainError};
pub use crate::devices::virtio::chain::{DescriptorTable, GuestAccess};

/// Size of a balloon page: PFNs are always in 4 KiB units ("historical", whatever the guest's
/// page size).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// Shift from a PFN to a guest-physical address.
pub const PFN_SHIFT: u32 = 12;
/// Largest PFN array accepted in one inflate or deflate request (bytes). Linux sends at most
/// 256 PFNs (1 KiB); the cap only stops a guest from making the VMM allocate gigabytes.
pub const MAX_PFN_BYTES: u64 = 1 << 20;

/// Why a chain is not a valid balloon request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain could not be walked, or a buffer was not accessible.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Indirect descriptors were not offered.
    #[error("indirect descriptor in a balloon chain")]
    Indirect,
    /// A device-writable buffer where the device must read.
    #[error("device-writable buffer in a request the device reads")]
    WriteOnlyBuffer,
    /// A device-readable buffer in a free page report (whose buffers are device-writable).
    #[error("device-readable buffer in a free page report")]
    ReadOnlyBuffer,
    /// A PFN array whose length is not a multiple of 4.
    #[error("PFN array of {0} bytes is not a multiple of 4")]
    OddLength(u64),
    /// A PFN array larger than [`MAX_PFN_BYTES`].
    #[error("PFN array of {0} bytes is too large")]
    TooLarge(u64),
    /// A reported free range that runs past the top of the address space.
    #[error("reported range {addr:#x}+{len:#x} wraps")]
    Wraps {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
}

/// Walks the chain starting at `head` (at most as many descriptors as the queue has) and
/// returns its buffers, not yet checked for accessibility: free page reports name memory the
/// device never reads. Indirect descriptors are refused.
pub fn walk_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
) -> Result<Vec<Buffer>, RequestError> {
    let chain = chain::walk_chain(mem, access, table, head, usize::from(table.size))?;
    if chain.buffers.iter().any(|b| b.indirect) {
        return Err(RequestError::Indirect);
    }
    Ok(chain.buffers)
}

/// Concatenates the device-readable `buffers` (each checked accessible first), reading at most
/// `limit` bytes; returns the bytes and the chain's total length.
pub fn read_buffers<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    buffers: &[Buffer],
    limit: u64,
) -> Result<(Vec<u8>, u64), RequestError> {
    let mut total: u64 = 0;
    for b in buffers {
        if b.writable {
            return Err(RequestError::WriteOnlyBuffer);
        }
        total += u64::from(b.len);
    }
    let mut bytes = Vec::with_capacity(total.min(limit) as usize);
    for b in buffers {
        let room = limit - bytes.len() as u64;
        let len = u64::from(b.len).min(room);
        if len == 0 {
            break;
        }
        let start = bytes.len();
        bytes.resize(start + len as usize, 0);
        read_buffer(mem, access, b.addr, &mut bytes[start..])?;
    }
    Ok((bytes, total))
}

/// Reads the le32 PFN array of an inflate or deflate request.
pub fn read_pfns<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    buffers: &[Buffer],
) -> Result<Vec<u32>, RequestError> {
    let total: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
    if total > MAX_PFN_BYTES {
        return Err(RequestError::TooLarge(total));
    }
    if !total.is_multiple_of(4) {
        return Err(RequestError::OddLength(total));
    }
    let (bytes, _) = read_buffers(mem, access, buffers, MAX_PFN_BYTES)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Sorts and deduplicates PFNs and merges consecutive ones into ranges of 4 KiB pages.
pub fn pfns_to_ranges(mut pfns: Vec<u32>) -> Vec<GuestRange> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut ranges: Vec<GuestRange> = Vec::new();
    for pfn in pfns {
        let start = u64::from(pfn) << PFN_SHIFT;
        match ranges.last_mut() {
            Some(last) if last.end() == start => last.size += BALLOON_PAGE_SIZE,
            _ => ranges.push(GuestRange {
                start,
                size: BALLOON_PAGE_SIZE,
            }),
        }
    }
    ranges
}

/// The free ranges of a free page report: every buffer is device-writable and its address
/// and length *are* the range (the device never reads or writes the memory itself). A range
/// that runs past the top of the address space makes the report invalid.
pub fn reported_ranges(buffers: &[Buffer]) -> Result<Vec<GuestRange>, RequestError> {
    buffers
        .iter()
        .map(|b| {
            let len = u64::from(b.len);
            if !b.writable {
                Err(RequestError::ReadOnlyBuffer)
            } else if b.addr.checked_add(len).is_none() {
                Err(RequestError::Wraps { addr: b.addr, len })
            } else {
                Ok(GuestRange {
                    start: b.addr,
                    size: len,
                })
            }
        })
        .collect()
}

/// Splits `ranges` into the parts `access` allows and the number of 4 KiB pages it refuses.
/// A merged range that crosses the end of RAM would otherwise be refused as a whole, taking
/// its valid pages with it.
pub fn split_accessible(ranges: &[GuestRange], access: &dyn GuestAccess) -> (Vec<GuestRange>, u64) {
    let mut good = Vec::with_capacity(ranges.len());
    let mut bad_pages = 0;
    for r in ranges {
        if access.is_accessible(r.start, r.size) {
            good.push(*r);
            continue;
        }
        // Rare (guest bug or attack): page by page, bounded by MAX_PFN_BYTES / 4 pages.
        let mut run: Option<GuestRange> = None;
        let mut page = r.start;
        while page < r.end() {
            if access.is_accessible(page, BALLOON_PAGE_SIZE) {
                match run.as_mut() {
                    Some(run) => run.size += BALLOON_PAGE_SIZE,
                    None => {
                        run = Some(GuestRange {
                            start: page,
                            size: BALLOON_PAGE_SIZE,
                        })
                    }
                }
            } else {
                bad_pages += 1;
                good.extend(run.take());
            }
            page += BALLOON_PAGE_SIZE;
        }
        good.extend(run);
    }
    (good, bad_pages)
}
