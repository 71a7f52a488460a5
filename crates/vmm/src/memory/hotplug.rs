//! Hotplug regions: guest-physical ranges whose memory is plugged and unplugged in blocks.
//!
//! A region is mapped once (`MAP_NORESERVE`, `PROT_NONE`) and starts fully unplugged. KVM gets
//! one memory slot per 128 MiB chunk that holds a plugged block. Unplugged blocks are
//! discarded and `PROT_NONE`, so a guest access to them exits to the VMM instead of silently
//! allocating host memory: an MMIO exit where no slot covers the block, a memory fault
//! (KVM_EXIT_MEMORY_FAULT with the address) inside a partly plugged chunk. The plug state (one bit per block)
//! lives here, in the manager, so that the guest-memory accessors and the vCPU exit handler can
//! consult it; devices only ask for state changes.

use super::bitmap::BlockBitmap;
use std::sync::Arc;

use super::mapping::HostMapping;

/// Granularity of the KVM slots over a hotplug region: Linux's memory block on x86-64.
const SLOT_CHUNK: u64 = 128 << 20;
use super::{MemoryError, MemoryManager, MemorySlot};
use crate::arch::x86_64::layout::GuestRange;
use kvm_ioctls::VmFd;

/// Smallest block: one host page.
const MIN_BLOCK_SIZE: u64 = 4096;

/// How a hotplug region is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory; discarded with `MADV_DONTNEED`.
    Anonymous,
    /// A shared memfd; discarded by punching holes in the file.
    Memfd,
    /// A hugetlb memfd with pages of `page_size` bytes (2 MiB or 1 GiB). Blocks are always
    /// populated on plug, because a fault on an empty pool would be a SIGBUS at guest run time.
    Hugetlbfs {
        /// Huge page size in bytes.
        page_size: u64,
    },
}

/// Names a hotplug region of one [`MemoryManager`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HotplugRegionId(usize);

impl HotplugRegionId {
    /// Position of the region in the manager (a removed region leaves its position empty,
    /// so ids stay stable).
    pub fn index(self) -> usize {
        self.0
    }
}

/// Plug state of a range of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRangeState {
    /// Every block is plugged.
    Plugged,
    /// No block is plugged.
    Unplugged,
    /// Some blocks are plugged, some not.
    Mixed,
}

/// A guest-physical address inside a hotplug region that is not plugged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpluggedAccess {
    /// The region.
    pub region: HotplugRegionId,
    /// The region's guest-physical range.
    pub range: GuestRange,
    /// Index of the unplugged block containing the address.
    pub block: u64,
}

/// Description of a hotplug region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotplugRegionInfo {
    /// Guest-physical range.
    pub range: GuestRange,
    /// Block size in bytes.
    pub block_size: u64,
    /// Host backing.
    pub backing: Backing,
    /// Whether plugging faults the backing in first.
    pub prealloc: bool,
}

/// Why a plug or unplug failed. After an error the blocks named in it keep their old state.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    /// No such region.
    #[error("no hotplug region {0:?}")]
    UnknownRegion(HotplugRegionId),
    /// The block range does not lie inside the region.
    #[error("blocks {first}+{count} are outside the region's {blocks} blocks")]
    OutOfRange {
        /// First block asked for.
        first: u64,
        /// Number of blocks asked for.
        count: u64,
        /// Blocks in the region.
        blocks: u64,
    },
    /// The host could not provide memory for the blocks (hugetlb pool empty, cgroup limit, ...).
    #[error("cannot populate {size:#x} bytes at {gpa:#x}")]
    Populate {
        /// Guest-physical start of the failed run.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Changing the protection of the host mapping failed.
    #[error("cannot change protection of {size:#x} bytes at {gpa:#x}")]
    Protect {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot change.
    #[error("cannot update the memory slots of plugged blocks")]
    Slot(#[source] Box<MemoryError>),
    /// Discarding the memory of unplugged blocks failed.
    #[error("cannot discard {size:#x} bytes at {gpa:#x}")]
    Discard {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One hotplug region and its plug bitmap.
#[derive(Debug)]
pub(crate) struct HotplugRegion {
    range: GuestRange,
    block_size: u64,
    prealloc: bool,
    mapping: HostMapping,
    plugged: BlockBitmap,
    /// Test hook: `Some(n)` lets n more populate calls succeed, then fails one as if the host
    /// were out of memory.
    #[cfg(test)]
    pub(crate) populate_budget: Option<u32>,
}

impl HotplugRegion {
    fn info(&self) -> HotplugRegionInfo {
        HotplugRegionInfo {
            range: self.range,
            block_size: self.block_size,
            backing: self.mapping.backing(),
            prealloc: self.prealloc,
        }
    }

    fn check(&self, first: u64, count: u64) -> Result<(), PlugError> {
        let blocks = self.plugged.len();
        match first.checked_add(count) {
            Some(end) if end <= blocks => Ok(()),
            _ => Err(PlugError::OutOfRange {
                first,
                count,
                blocks,
            }),
        }
    }

    /// Guest address and byte offset/length of a block run.
    fn bytes(&self, first: u64, count: u64) -> (u64, u64, u64) {
        let offset = first * self.block_size;
        (self.range.start + offset, offset, count * self.block_size)
    }

    fn populate(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        match self.populate_budget {
            Some(0) => {
                self.populate_budget = None;
                return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
            }
            Some(n) => self.populate_budget = Some(n - 1),
            None => {}
        }
        self.mapping.populate(offset, len)
    }

    /// Plugs one run of unplugged blocks; on failure the run is left unplugged.
    fn plug_run(&mut self, first: u64, count: u64) -> Result<(), PlugError> {
        let (gpa, offset, size) = self.bytes(first, count);
        self.mapping
            .protect(offset, size, true)
            .map_err(|source| PlugError::Protect { gpa, size, source })?;
        let populate = self.prealloc || matches!(self.mapping.backing(), Backing::Hugetlbfs { .. });
        if populate {
            if let Err(source) = self.populate(offset, size) {
                // Give back whatever got faulted in before the failure, and close the range
                // again. Errors here would leave RW-but-unplugged memory, so report them.
                self.unplug_run(first, count)?;
                return Err(PlugError::Populate { gpa, size, source });
            }
        }
        self.plugged.set_range(first, count, true);
        Ok(())
    }

    /// Closes one run of blocks, discards it and marks it unplugged. Closing comes first, so
    /// that no access (of a guest whose KVM slot still covers the run) can fault the
    /// memory back in between the discard and the protection.
    fn unplug_run(&mut self, first: u64, count: u64) -> Result<(), PlugError> {
        let (gpa, offset, size) = self.bytes(first, count);
        self.mapping
            .protect(offset, size, false)
            .map_err(|source| PlugError::Protect { gpa, size, source })?;
        self.mapping
            .discard(offset, size)
            .map_err(|source| PlugError::Discard { gpa, size, source })?;
        self.plugged.set_range(first, count, false);
        Ok(())
    }

    /// Whether `[gpa, end)` (inside this region) is entirely plugged.
    fn all_plugged(&self, gpa: u64, end: u64) -> bool {
        let first = (gpa - self.range.start) / self.block_size;
        let last = (end - 1 - self.range.start) / self.block_size;
        self.plugged.count_range(first, last - first + 1) == last - first + 1
    }
}

impl MemoryManager {
    /// Maps a hotplug region over `range`, fully unplugged, for `vm`. It becomes part of
    /// [`MemoryManager::guest_memory`]; KVM sees only its plugged blocks.
    ///
    /// Unplugged blocks are kept out of the guest twice over: whole unplugged 128 MiB chunks
    /// have no memory slot (a guest access is an MMIO exit), and every unplugged block is
    /// `PROT_NONE` on the host (an access inside a partly plugged chunk is a memory fault).
    /// Both reach the vCPU loop with the address. Slots cover 128 MiB chunks (see
    /// `sync_slots`): a 4 GiB plug is 32 slots, not 2048 (one per block).
    pub fn add_hotplug_region(
        &mut self,
        vm: &Arc<VmFd>,
        range: GuestRange,
        block_size: u64,
        backing: Backing,
        prealloc: bool,
    ) -> Result<HotplugRegionId, MemoryError> {
        let id = self.map_hotplug_region(range, block_size, backing, prealloc)?;
        self.vm = Some(vm.clone());
        Ok(id)
    }

    /// Makes KVM's slots over region `id` follow its plug state, one slot per 128 MiB chunk
    /// (a Linux memory block) that holds any plugged block.
    ///
    /// Why chunks and not exact runs: KVM cannot shrink or split a slot, only delete and
    /// re-create it, and in between the guest would lose memory it is using (its memmap lives
    /// in hotplugged memory). A chunk's slot is only ever created when its first block is
    /// plugged and deleted when its last block is unplugged, so memory in use is never
    /// unmapped. Unplugged blocks inside a partly plugged chunk stay in the slot but are
    /// `PROT_NONE` (KVM cannot fault them in); whole unplugged chunks are not mapped at all.
    fn sync_slots(&mut self, id: HotplugRegionId) -> Result<(), PlugError> {
        let Some(vm) = self.vm.clone() else {
            return Ok(());
        };
        let region = self.region(id)?;
        let (range, block_size, host_base) =
            (region.range, region.block_size, region.mapping.host_addr());
        let chunk = SLOT_CHUNK.max(block_size).min(range.size);
        let blocks_per_chunk = chunk / block_size;
        let wanted: Vec<GuestRange> = (0..range.size / chunk)
            .filter(|&c| {
                region
                    .plugged
                    .count_range(c * blocks_per_chunk, blocks_per_chunk)
                    > 0
            })
            .map(|c| GuestRange {
                start: range.start + c * chunk,
                size: chunk,
            })
            .collect();
        let slot_error = |source: MemoryError| PlugError::Slot(Box::new(source));
        let stale: Vec<MemorySlot> = self
            .slots
            .iter()
            .filter(|s| range.contains(s.range.start) && !wanted.contains(&s.range))
            .copied()
            .collect();
        for slot in &stale {
            self.delete_slot(&vm, slot).map_err(slot_error)?;
            self.slots.retain(|s| s.slot != slot.slot);
        }
        for run in wanted {
            if self.slots.iter().any(|s| s.range == run) {
                continue;
            }
            let slot = MemorySlot {
                slot: self.free_slot_id(),
                range: run,
                host_addr: host_base + (run.start - range.start),
            };
            self.set_slot(&vm, &slot).map_err(slot_error)?;
            self.slots.push(slot);
        }
        Ok(())
    }

    fn check_hotplug_range(
        &self,
        range: GuestRange,
        block_size: u64,
        backing: Backing,
    ) -> Result<(), MemoryError> {
        let bad = |reason: String| MemoryError::InvalidHotplugRegion {
            start: range.start,
            size: range.size,
            reason,
        };
        if let Backing::Hugetlbfs { page_size } = backing {
            if !page_size.is_power_of_two() || page_size < MIN_BLOCK_SIZE {
                return Err(bad(format!("huge page size {page_size:#x} is invalid")));
            }
            if block_size < page_size {
                return Err(MemoryError::BlockSmallerThanPage {
                    block_size,
                    page_size,
                });
            }
        }
        // Devices choose their own granularity rules (virtio-mem: powers of two); the
        // manager needs only whole host pages. A DIMM is one block of its own size.
        if block_size < MIN_BLOCK_SIZE || !block_size.is_multiple_of(MIN_BLOCK_SIZE) {
            return Err(bad(format!(
                "block size {block_size:#x} is not a multiple of 4 KiB"
            )));
        }
        if let Backing::Hugetlbfs { page_size } = backing {
            if !block_size.is_multiple_of(page_size) {
                return Err(bad(format!(
                    "block size {block_size:#x} is not a multiple of the huge page size {page_size:#x}"
                )));
            }
        }
        if range.size == 0 || !range.size.is_multiple_of(block_size) {
            return Err(bad(format!(
                "not a non-empty multiple of the block size {block_size:#x}"
            )));
        }
        // Blocks are counted from the region's start, which need only be page aligned (a
        // DIMM is one block of its own size, placed on a 128 MiB boundary).
        let page = match backing {
            Backing::Hugetlbfs { page_size } => page_size,
            _ => MIN_BLOCK_SIZE,
        };
        if !range.start.is_multiple_of(page) {
            return Err(bad(format!(
                "start is not aligned to the page size {page:#x}"
            )));
        }
        let area = self.layout.hotplug_area;
        let inside = range.start >= area.start
            && range
                .start
                .checked_add(range.size)
                .is_some_and(|end| end <= area.end());
        if !inside {
            return Err(bad(format!(
                "outside the hotplug area {:#x}+{:#x}",
                area.start, area.size
            )));
        }
        let end = range.end();
        if let Some(other) = self
            .regions()
            .find(|r| range.start < r.range.end() && r.range.start < end)
        {
            return Err(bad(format!(
                "overlaps the region at {:#x}",
                other.range.start
            )));
        }
        Ok(())
    }

    /// Maps a hotplug region like [`MemoryManager::add_hotplug_region`] but registers it with
    /// no VM: for tests and the fuzz targets, which need the real plug/protect machinery but
    /// no guest. A VM must not run on a region added this way (it has no memory slot).
    pub fn map_hotplug_region(
        &mut self,
        range: GuestRange,
        block_size: u64,
        backing: Backing,
        prealloc: bool,
    ) -> Result<HotplugRegionId, MemoryError> {
        self.check_hotplug_range(range, block_size, backing)?;
        let map_err = |source| MemoryError::Map {
            start: range.start,
            size: range.size,
            source,
        };
        let mapping = HostMapping::new(range.start, range.size, backing).map_err(map_err)?;
        let guest_memory = self
            .guest_memory
            .insert_region(mapping.region().clone())
            .map_err(MemoryError::Collection)?;
        self.guest_memory = guest_memory;
        let region = HotplugRegion {
            range,
            block_size,
            prealloc,
            plugged: BlockBitmap::new(range.size / block_size),
            mapping,
            #[cfg(test)]
            populate_budget: None,
        };
        // Reuse the place of a removed region so that DIMMs coming and going do not grow
        // the list.
        let index = match self.hotplug.iter().position(Option::is_none) {
            Some(free) => {
                self.hotplug[free] = Some(region);
                free
            }
            None => {
                self.hotplug.push(Some(region));
                self.hotplug.len() - 1
            }
        };
        Ok(HotplugRegionId(index))
    }

    /// Removes region `id` for good: its KVM slots go first, then its memory is discarded,
    /// taken out of [`MemoryManager::guest_memory`] and unmapped. A guest access to the
    /// range afterwards exits to the VMM like any access to unplugged memory.
    pub fn remove_hotplug_region(&mut self, id: HotplugRegionId) -> Result<(), PlugError> {
        self.unplug_all(id)?;
        let range = self.region(id)?.range;
        match self
            .guest_memory
            .remove_region(vm_memory::GuestAddress(range.start), range.size)
        {
            Ok((guest_memory, _removed)) => self.guest_memory = guest_memory,
            // Not in the collection: nothing to take out (cannot happen for a mapped region).
            Err(e) => tracing::warn!("hotplug region {:#x} not in guest memory: {e}", range.start),
        }
        // Dropping the mapping unmaps it once the last clone of the old collection is gone.
        self.hotplug[id.0] = None;
        Ok(())
    }

    /// The hotplug regions that exist.
    fn regions(&self) -> impl Iterator<Item = &HotplugRegion> {
        self.hotplug.iter().flatten()
    }

    pub(crate) fn region_mut(
        &mut self,
        id: HotplugRegionId,
    ) -> Result<&mut HotplugRegion, PlugError> {
        self.hotplug
            .get_mut(id.0)
            .and_then(Option::as_mut)
            .ok_or(PlugError::UnknownRegion(id))
    }

    fn region(&self, id: HotplugRegionId) -> Result<&HotplugRegion, PlugError> {
        self.hotplug
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or(PlugError::UnknownRegion(id))
    }

    /// Describes a hotplug region.
    pub fn hotplug_region(&self, id: HotplugRegionId) -> Option<HotplugRegionInfo> {
        self.region(id).ok().map(HotplugRegion::info)
    }

    /// Host memory resident in region `id`'s mapping, in bytes (0 for an unknown region).
    pub fn resident_bytes(&self, id: HotplugRegionId) -> u64 {
        self.region(id)
            .ok()
            .and_then(|r| r.mapping.resident_pages(0, r.range.size).ok())
            .map_or(0, |pages| pages as u64 * MIN_BLOCK_SIZE)
    }

    /// Plugs `count` blocks from `first_block`: makes them accessible and, with prealloc,
    /// faults their backing in. Blocks already plugged stay as they are. All or nothing: on
    /// error no block of the range changes state.
    pub fn plug(
        &mut self,
        id: HotplugRegionId,
        first_block: u64,
        count: u64,
    ) -> Result<(), PlugError> {
        let region = self.region_mut(id)?;
        region.check(first_block, count)?;
        let runs = region.plugged.runs(first_block, count, false);
        for (i, &(first, n)) in runs.iter().enumerate() {
            if let Err(e) = region.plug_run(first, n) {
                for &(first, n) in &runs[..i] {
                    // Best effort: the original error is the one worth reporting.
                    let _ = region.unplug_run(first, n);
                }
                return Err(e);
            }
        }
        if let Err(e) = self.sync_slots(id) {
            // All or nothing: KVM refused a slot, so the blocks are closed again and the
            // slots put back as they were, before the guest hears BUSY.
            let region = self.region_mut(id)?;
            for &(first, n) in &runs {
                let _ = region.unplug_run(first, n);
            }
            let _ = self.sync_slots(id);
            return Err(e);
        }
        Ok(())
    }

    /// Unplugs `count` blocks from `first_block`: discards their memory and makes them
    /// inaccessible. Blocks already unplugged stay as they are.
    pub fn unplug(
        &mut self,
        id: HotplugRegionId,
        first_block: u64,
        count: u64,
    ) -> Result<(), PlugError> {
        let region = self.region_mut(id)?;
        region.check(first_block, count)?;
        // The slots go first: once KVM no longer maps the blocks, discarding them cannot race
        // with a guest access that would fault them back in.
        let runs = region.plugged.runs(first_block, count, true);
        for &(first, n) in &runs {
            region.plugged.set_range(first, n, false);
        }
        if let Err(e) = self.sync_slots(id) {
            // Nothing was discarded yet: the blocks keep their old state (plugged), as
            // `PlugError` promises, and the guest may retry after BUSY.
            let region = self.region_mut(id)?;
            for &(first, n) in &runs {
                region.plugged.set_range(first, n, true);
            }
            let _ = self.sync_slots(id);
            return Err(e);
        }
        let region = self.region_mut(id)?;
        for (first, n) in runs {
            region.unplug_run(first, n)?;
        }
        Ok(())
    }

    /// Unplugs every block of the region.
    pub fn unplug_all(&mut self, id: HotplugRegionId) -> Result<(), PlugError> {
        let blocks = self.region(id)?.plugged.len();
        self.unplug(id, 0, blocks)
    }

    /// Plug state of `count` blocks from `first_block` (`count` 0 reads as unplugged).
    pub fn block_state(
        &self,
        id: HotplugRegionId,
        first_block: u64,
        count: u64,
    ) -> Result<BlockRangeState, PlugError> {
        let region = self.region(id)?;
        region.check(first_block, count)?;
        Ok(match region.plugged.count_range(first_block, count) {
            0 => BlockRangeState::Unplugged,
            n if n == count => BlockRangeState::Plugged,
            _ => BlockRangeState::Mixed,
        })
    }

    /// Bytes currently plugged in the region.
    pub fn plugged_bytes(&self, id: HotplugRegionId) -> Result<u64, PlugError> {
        let region = self.region(id)?;
        Ok(region.plugged.count_ones() * region.block_size)
    }

    /// Whether the VMM may read or write all of `[gpa, gpa+len)`: true only if every byte is
    /// boot RAM or a plugged hotplug block. Every VMM access to guest memory that a guest
    /// driver can steer must pass this check first: unplugged blocks are `PROT_NONE` and
    /// touching them would kill the VMM with SIGSEGV. A zero-length range touches nothing.
    pub fn is_accessible(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut cur = gpa;
        while cur < end {
            if let Some(ram) = self.layout.ram.iter().find(|r| r.contains(cur)) {
                cur = end.min(ram.end());
            } else if let Some(region) = self.regions().find(|r| r.range.contains(cur)) {
                let stop = end.min(region.range.end());
                if !region.all_plugged(cur, stop) {
                    return false;
                }
                cur = stop;
            } else {
                return false;
            }
        }
        true
    }

    /// If `gpa` lies in a hotplug region but not in a plugged block, says where (the vCPU
    /// loop decides by `hotplug_ranges` alone, which needs no lock on the manager; tests use
    /// this to check the state behind a report).
    pub fn find_unplugged_access(&self, gpa: u64) -> Option<UnpluggedAccess> {
        self.hotplug.iter().enumerate().find_map(|(i, region)| {
            let region = region.as_ref()?;
            if !region.range.contains(gpa) {
                return None;
            }
            let block = (gpa - region.range.start) / region.block_size;
            (!region.plugged.get(block)).then_some(UnpluggedAccess {
                region: HotplugRegionId(i),
                range: region.range,
                block,
            })
        })
    }

    /// The host mapping of a region (tests measure residency through it).
    #[cfg(test)]
    pub(crate) fn hotplug_mapping(&self, id: HotplugRegionId) -> &HostMapping {
        &self.region(id).expect("a live hotplug region").mapping
    }
}
