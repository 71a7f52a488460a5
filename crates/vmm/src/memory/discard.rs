//! Discarding guest-physical ranges the guest gave up (the balloon's inflated pages and free
//! page reports), and reading which of them hold host memory again. The syscalls themselves
//! are `mapping::release` and `mapping::residency`, shared with hotplug unplugs.
//!
//! The balloon hands the manager guest-physical ranges that the guest driver chose; the
//! driver may be buggy or hostile, so every range is checked here, against the manager's own
//! view of what the guest owns (boot RAM and plugged hotplug blocks), before any syscall. A
//! range that fails the check is returned to the caller untouched: discarding a hole would be
//! harmless, but discarding an unplugged virtio-mem block or a range the caller computed
//! wrongly would hide a bug, and the caller wants to count the guest's bad input anyway.

use std::io;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::MemoryManager;
use crate::arch::x86_64::layout::GuestRange;

/// Granularity of balloon discards: the virtio-balloon page, 4 KiB whatever the guest uses.
pub const DISCARD_GRANULE: u64 = 4096;

/// What one [`MemoryManager::discard_ranges`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscardOutcome {
    /// Input ranges that were valid and discarded.
    pub ranges_discarded: u64,
    /// Bytes whose host memory was released (the union of the valid ranges, minus parts of
    /// huge pages that could not be freed whole).
    pub bytes_discarded: u64,
    /// madvise/fallocate calls made: one per maximal contiguous run inside one mapping.
    pub syscalls: u64,
    /// Input ranges refused (empty, unaligned, wrapping, or not entirely guest-owned memory).
    pub ranges_rejected: u64,
    /// The refused ranges, in input order.
    pub rejected: Vec<GuestRange>,
}

/// A discard syscall failed. Ranges before the failing one were discarded.
#[derive(Debug, thiserror::Error)]
#[error("cannot discard {size:#x} bytes of guest memory at {gpa:#x}")]
pub struct DiscardError {
    /// Guest-physical start of the run that failed.
    pub gpa: u64,
    /// Its size.
    pub size: u64,
    /// What had been done before the failure.
    pub outcome: Box<DiscardOutcome>,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Sorts `ranges` and merges overlapping or touching ones, so each run costs one syscall.
fn coalesce(mut ranges: Vec<GuestRange>) -> Vec<GuestRange> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<GuestRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end() => {
                last.size = last.size.max(r.end() - last.start);
            }
            _ => merged.push(r),
        }
    }
    merged
}

impl MemoryManager {
    /// Whether the balloon may discard `range`: non-empty, 4 KiB aligned, and entirely boot
    /// RAM or plugged hotplug blocks (never a hole, never unplugged virtio-mem memory).
    pub fn is_discardable(&self, range: GuestRange) -> bool {
        range.size > 0
            && range.start.is_multiple_of(DISCARD_GRANULE)
            && range.size.is_multiple_of(DISCARD_GRANULE)
            && self.is_accessible(range.start, range.size)
    }

    /// Releases the host memory behind the guest ranges the balloon was given: private
    /// anonymous memory with `MADV_DONTNEED`, memfd-backed memory by punching holes. Invalid
    /// ranges (see [`MemoryManager::is_discardable`]) are counted and returned, never touched.
    /// Valid ranges are merged first, so adjacent pages cost one syscall per mapping.
    pub fn discard_ranges(
        &mut self,
        ranges: &[GuestRange],
    ) -> Result<DiscardOutcome, DiscardError> {
        self.discard(ranges, true)
    }

    /// Like [`MemoryManager::discard_ranges`], but one syscall per 4 KiB page: QEMU's way,
    /// kept so the benchmark can measure what merging saves. Each range is validated whole
    /// before it is cut into pages, and pages are never collected, so a guest naming
    /// gigabytes costs no host allocation.
    pub fn discard_ranges_per_page(
        &mut self,
        ranges: &[GuestRange],
    ) -> Result<DiscardOutcome, DiscardError> {
        self.discard(ranges, false)
    }

    fn discard(
        &mut self,
        ranges: &[GuestRange],
        merge: bool,
    ) -> Result<DiscardOutcome, DiscardError> {
        let mut outcome = DiscardOutcome::default();
        let mut valid = Vec::with_capacity(ranges.len());
        for &range in ranges {
            if self.is_discardable(range) {
                outcome.ranges_discarded += 1;
                valid.push(range);
            } else {
                outcome.ranges_rejected += 1;
                outcome.rejected.push(range);
            }
        }
        let runs = if merge { coalesce(valid) } else { valid };
        let step = if merge { u64::MAX } else { DISCARD_GRANULE };
        for run in runs {
            let mut cur = run.start;
            // A run may cross from one mapping into the next (boot RAM ending where a
            // hotplug region starts): one syscall per mapping.
            while cur < run.end() {
                let Some(region) = self.guest_memory.find_region(GuestAddress(cur)) else {
                    break; // unreachable: the run is accessible, hence mapped
                };
                let region_start = region.start_addr().0;
                let stop = run
                    .end()
                    .min(region_start + region.len())
                    .min(cur.saturating_add(step));
                let size = stop - cur;
                match super::mapping::release(region, cur - region_start, size) {
                    Ok(bytes) => {
                        outcome.syscalls += u64::from(bytes > 0);
                        outcome.bytes_discarded += bytes;
                    }
                    Err(source) => {
                        return Err(DiscardError {
                            gpa: cur,
                            size,
                            outcome: Box::new(outcome),
                            source,
                        })
                    }
                }
                cur = stop;
            }
        }
        Ok(outcome)
    }

    /// Which 4 KiB pages of `[gpa, gpa+len)` hold host memory right now, one `bool` per page,
    /// without faulting anything in. `None` when the range is not accessible guest memory
    /// inside one mapping, or lies in hugetlbfs memory (a huge page is resident as a whole,
    /// so 4 KiB residency says nothing about what the guest touched).
    pub fn resident_page_map(&self, gpa: u64, len: u64) -> Option<Vec<bool>> {
        if !self.is_accessible(gpa, len) {
            return None;
        }
        let region = self.guest_memory.find_region(GuestAddress(gpa))?;
        if region.is_hugetlbfs() == Some(true) {
            return None;
        }
        let offset = gpa - region.start_addr().0;
        let map = super::mapping::residency(region, offset, len).ok()?;
        Some(map.iter().map(|b| b & 1 != 0).collect())
    }

    /// Resident 4 KiB host pages behind `[gpa, gpa+len)` of one mapping (tests only).
    #[cfg(test)]
    pub(crate) fn resident_guest_pages(&self, gpa: u64, len: u64) -> usize {
        let region = self.guest_memory.find_region(GuestAddress(gpa)).unwrap();
        super::mapping::resident_pages(region, gpa - region.start_addr().0, len).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    use super::*;
    use crate::arch::x86_64::layout::GuestLayout;
    use crate::memory::Backing;

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    fn range(start: u64, size: u64) -> GuestRange {
        GuestRange { start, size }
    }

    fn touch(mm: &MemoryManager, gpa: u64, len: u64) {
        let data = vec![0x5au8; len as usize];
        mm.guest_memory()
            .write_slice(&data, GuestAddress(gpa))
            .unwrap();
    }

    #[test]
    fn discarding_touched_boot_ram_releases_it() {
        let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
        touch(&mm, 2 * MIB, 4 * MIB);
        assert_eq!(mm.resident_guest_pages(2 * MIB, 4 * MIB), 1024);
        let out = mm.discard_ranges(&[range(2 * MIB, 2 * MIB)]).unwrap();
        assert_eq!(
            (out.ranges_discarded, out.bytes_discarded, out.syscalls),
            (1, 2 * MIB, 1)
        );
        assert_eq!(mm.resident_guest_pages(2 * MIB, 2 * MIB), 0);
        assert_eq!(
            mm.resident_guest_pages(4 * MIB, 2 * MIB),
            512,
            "neighbour kept"
        );
        let back: u64 = mm.guest_memory().read_obj(GuestAddress(3 * MIB)).unwrap();
        assert_eq!(back, 0, "discarded memory reads as zero");
    }

    #[test]
    fn adjacent_ranges_cost_one_syscall() {
        let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
        touch(&mm, 8 * MIB, 64 * PAGE);
        // Shuffled, duplicated and overlapping pages of one 64-page run, plus a lone page.
        let mut ranges: Vec<GuestRange> = (0..64)
            .rev()
            .map(|i| range(8 * MIB + i * PAGE, PAGE))
            .collect();
        ranges.push(range(8 * MIB + 5 * PAGE, 2 * PAGE));
        ranges.push(range(16 * MIB, PAGE));
        let out = mm.discard_ranges(&ranges).unwrap();
        assert_eq!(out.ranges_discarded, 66);
        assert_eq!(out.syscalls, 2);
        assert_eq!(out.bytes_discarded, 65 * PAGE);
        assert_eq!(out.ranges_rejected, 0);
        assert_eq!(mm.resident_guest_pages(8 * MIB, 64 * PAGE), 0);
    }

    #[test]
    fn per_page_discard_costs_one_syscall_per_page() {
        let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
        touch(&mm, 8 * MIB, 64 * PAGE);
        let pages: Vec<GuestRange> = (0..32).map(|i| range(8 * MIB + i * PAGE, PAGE)).collect();
        let out = mm.discard_ranges_per_page(&pages).unwrap();
        assert_eq!(out.syscalls, 32);
        let out = mm
            .discard_ranges_per_page(&[range(8 * MIB + 32 * PAGE, 32 * PAGE)])
            .unwrap();
        assert_eq!(out.syscalls, 32, "a 32-page range is 32 syscalls");
        assert_eq!(mm.resident_guest_pages(8 * MIB, 64 * PAGE), 0);
        // Validation is the same as for merged discards.
        let out = mm.discard_ranges_per_page(&[range(MIB + 1, PAGE)]).unwrap();
        assert_eq!((out.syscalls, out.ranges_rejected), (0, 1));
    }

    /// Hostile-guest defect 2: with per-page discards, a reported range was cut into 4 KiB
    /// pieces before it was validated, so ranges of ~4 GiB made gigabytes of host
    /// allocations. Now they are refused whole, with no allocation per page.
    #[test]
    fn per_page_discard_validates_whole_ranges_first() {
        let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
        let huge: Vec<GuestRange> = (0..128)
            .map(|i| range(i * PAGE, u64::from(u32::MAX) & !(PAGE - 1)))
            .collect();
        let out = mm.discard_ranges_per_page(&huge).unwrap();
        assert_eq!((out.syscalls, out.ranges_rejected), (0, 128));
        let wrapping = range(!(PAGE - 1), 2 * PAGE);
        let out = mm.discard_ranges_per_page(&[wrapping]).unwrap();
        assert_eq!((out.syscalls, out.ranges_rejected), (0, 1));
    }

    #[test]
    fn invalid_ranges_are_rejected_and_valid_ones_still_discarded() {
        let mut mm = MemoryManager::new(GuestLayout::new((3 << 30) + 64 * MIB)).unwrap();
        let high = 4u64 << 30;
        touch(&mm, high, 2 * MIB);
        let bad = vec![
            range((3 << 30) - PAGE, 2 * PAGE), // crosses into the 32-bit hole
            range(0xC000_0000 + 16 * PAGE, PAGE), // in the hole
            range(high + 64 * MIB - PAGE, 2 * PAGE), // crosses the end of RAM
            range(high + 64 * MIB, PAGE),      // past the end of RAM
            range(MIB + 1, PAGE),              // unaligned start
            range(MIB, 100),                   // unaligned size
            range(MIB, 0),                     // empty
            range(u64::MAX - PAGE + 1, PAGE),  // wraps
        ];
        let mut all = bad.clone();
        all.push(range(high, 2 * MIB));
        let out = mm.discard_ranges(&all).unwrap();
        assert_eq!(out.ranges_rejected, bad.len() as u64);
        assert_eq!(out.rejected, bad);
        assert_eq!((out.ranges_discarded, out.syscalls), (1, 1));
        assert_eq!(mm.resident_guest_pages(high, 2 * MIB), 0);
        // Boot RAM below the hole stays untouched by the rejected crossing range.
        touch(&mm, (3 << 30) - PAGE, PAGE);
        let out = mm.discard_ranges(&bad[..1]).unwrap();
        assert_eq!((out.syscalls, out.bytes_discarded), (0, 0));
        assert_eq!(mm.resident_guest_pages((3 << 30) - PAGE, PAGE), 1);
    }

    #[test]
    fn memfd_hotplug_blocks_are_hole_punched_and_unplugged_ones_refused() {
        const BLOCK: u64 = 2 * MIB;
        let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
        let base = mm.layout().hotplug_area.start;
        let id = mm
            .map_hotplug_region(range(base, 16 * BLOCK), BLOCK, Backing::Memfd, false)
            .unwrap();
        mm.plug(id, 0, 2).unwrap();
        touch(&mm, base, 2 * BLOCK);
        let file_bytes = |mm: &MemoryManager| {
            let file = mm.hotplug_mapping(id).file().unwrap();
            file.metadata().unwrap().blocks() * 512
        };
        assert!(file_bytes(&mm) >= 2 * BLOCK);
        let out = mm
            .discard_ranges(&[
                range(base, BLOCK),
                range(base + 2 * BLOCK, PAGE), // unplugged block
                range(base + 2 * BLOCK - PAGE, 2 * PAGE), // straddles into it
            ])
            .unwrap();
        assert_eq!((out.ranges_discarded, out.ranges_rejected), (1, 2));
        assert_eq!(out.bytes_discarded, BLOCK);
        assert_eq!(file_bytes(&mm), BLOCK, "the hole is punched in the file");
        let back: u64 = mm.guest_memory().read_obj(GuestAddress(base + 8)).unwrap();
        assert_eq!(back, 0);
    }

    #[test]
    fn a_run_across_two_mappings_is_split_per_mapping() {
        // 4 GiB of boot RAM ends at 5 GiB, exactly where the hotplug area begins.
        let mut mm = MemoryManager::new(GuestLayout::new(4 << 30)).unwrap();
        let base = mm.layout().hotplug_area.start;
        assert_eq!(base, 5 << 30);
        let id = mm
            .map_hotplug_region(range(base, 4 * MIB), 2 * MIB, Backing::Anonymous, false)
            .unwrap();
        mm.plug(id, 0, 1).unwrap();
        touch(&mm, base - 4 * PAGE, 8 * PAGE);
        let out = mm
            .discard_ranges(&[range(base - 4 * PAGE, 8 * PAGE)])
            .unwrap();
        assert_eq!((out.ranges_discarded, out.syscalls), (1, 2));
        assert_eq!(out.bytes_discarded, 8 * PAGE);
        assert_eq!(mm.resident_guest_pages(base - 4 * PAGE, 4 * PAGE), 0);
        assert_eq!(mm.resident_guest_pages(base, 4 * PAGE), 0);
    }
}
