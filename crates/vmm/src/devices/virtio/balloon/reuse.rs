//! Exact detection of a guest that uses pages it gave to the balloon.
//!
//! An inflated page was discarded on the host, so it holds no host memory and reads as zeros
//! until someone touches it again. The only one who can is the guest: the VMM never reads
//! inflated pages (every buffer access is checked against the memory manager, and a driver
//! does not post buffers in pages it inflated). The scan finds, per 4 KiB page:
//!
//! - with `mincore`, which inflated pages hold host memory again (one syscall per 2 MiB chunk
//!   with inflated pages; it faults nothing in and changes no page table);
//! - of those, which hold anything but zeros: a page the guest **wrote** without deflating it
//!   first. Only resident pages are read, so the check allocates nothing.
//!
//! Residency alone cannot accuse: with transparent hugepages on the host, one guest write
//! refaults a whole 2 MiB huge page, making its 511 untouched neighbours resident too, and a
//! guest read maps the zero page. Those are counted apart (`refaulted_zero_pages`: host memory
//! held again, nothing written). A guest that writes zeros into an inflated page is not
//! caught; it gains nothing the host did not give back by the same write.
//!
//! Pages that stopped being guest memory (an unplugged virtio-mem block, an ejected DIMM)
//! are dropped from the inflated set by the same scan: they are no longer the guest's to
//! give, and would otherwise stay in the host's count forever.

use vm_memory::{Bytes, GuestAddress};

use super::pages::{InflatedPages, CHUNK_PAGES, WORDS};
use super::request::{BALLOON_PAGE_SIZE, PFN_SHIFT};
use crate::arch::x86_64::layout::GuestRange;
use crate::memory::MemoryManager;

/// How many reused ranges a scan keeps (the count covers all of them).
pub const MAX_REUSED_RANGES: usize = 16;

/// What to do about inflated pages the guest touched again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReusePolicy {
    /// Report them (API, log); keep counting them as given back.
    #[default]
    Report,
    /// Stop the VM.
    Stop,
    /// Report them and stop counting them as given back: they leave the inflated set, so
    /// the host's balloon size is what the guest really gave.
    Uncount,
}

/// The result of one scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReuseScan {
    /// Inflated pages the guest wrote (resident and not all zeros).
    pub reused_pages: u64,
    /// The first [`MAX_REUSED_RANGES`] runs of them, merged.
    pub reused_ranges: Vec<GuestRange>,
    /// Inflated pages holding host memory again but only zeros (a guest read, or a
    /// neighbour's write refaulting a whole host huge page).
    pub refaulted_zero_pages: u64,
    /// Inflated pages dropped because they are no longer guest memory.
    pub pruned_pages: u64,
    /// 2 MiB chunks examined (one `mincore` each).
    pub chunks_scanned: u64,
}

fn push_page(ranges: &mut Vec<GuestRange>, pfn: u64) {
    let start = pfn << PFN_SHIFT;
    if let Some(last) = ranges.last_mut().filter(|last| last.end() == start) {
        last.size += BALLOON_PAGE_SIZE;
    } else if ranges.len() < MAX_REUSED_RANGES {
        ranges.push(GuestRange {
            start,
            size: BALLOON_PAGE_SIZE,
        });
    }
}

/// Scans `inflated` against the host's residency. Pages that are no longer accessible guest
/// memory are removed from the set; with `uncount`, reused pages are removed too.
pub fn scan(inflated: &mut InflatedPages, memory: &MemoryManager, uncount: bool) -> ReuseScan {
    let mut result = ReuseScan::default();
    let mut remove = Vec::new();
    let chunk_bytes = CHUNK_PAGES * BALLOON_PAGE_SIZE;
    let chunks: Vec<(u64, [u64; WORDS])> = inflated.chunks().collect();
    for (first_pfn, mask) in chunks {
        let gpa = first_pfn << PFN_SHIFT;
        result.chunks_scanned += 1;
        // Whole chunk in one accessible, non-hugetlb mapping: one mincore. Otherwise (the
        // chunk straddles the end of a mapping, or memory left the guest) page by page.
        let whole = memory.resident_page_map(gpa, chunk_bytes);
        for bit in 0..CHUNK_PAGES {
            if mask[(bit / 64) as usize] & (1 << (bit % 64)) == 0 {
                continue;
            }
            let pfn = first_pfn + bit;
            let resident = match &whole {
                Some(map) => map[bit as usize],
                None => {
                    let page = pfn << PFN_SHIFT;
                    if !memory.is_accessible(page, BALLOON_PAGE_SIZE) {
                        result.pruned_pages += 1;
                        remove.push(pfn);
                        continue;
                    }
                    memory
                        .resident_page_map(page, BALLOON_PAGE_SIZE)
                        .is_some_and(|m| m[0])
                }
            };
            if !resident {
                continue;
            }
            if holds_only_zeros(memory, pfn << PFN_SHIFT) {
                result.refaulted_zero_pages += 1;
            } else {
                result.reused_pages += 1;
                push_page(&mut result.reused_ranges, pfn);
                if uncount {
                    remove.push(pfn);
                }
            }
        }
    }
    for pfn in remove {
        inflated.remove(pfn);
    }
    result
}

/// Whether the (accessible, resident) page at `gpa` reads as zeros. An unreadable page counts
/// as zeros: nothing can be said of it.
fn holds_only_zeros(memory: &MemoryManager, gpa: u64) -> bool {
    let mut page = [0u8; BALLOON_PAGE_SIZE as usize];
    if !memory.is_accessible(gpa, BALLOON_PAGE_SIZE) {
        return true;
    }
    memory
        .guest_memory()
        .read_slice(&mut page, GuestAddress(gpa))
        .map_or(true, |()| page.iter().all(|b| *b == 0))
}
