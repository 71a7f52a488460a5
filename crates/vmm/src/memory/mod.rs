//! The memory manager: the single owner of guest memory.
//!
//! It holds the guest-physical layout, the host backing of every range, and every KVM memory
//! slot. Devices ask it for access to guest memory; none of them maps, discards or registers
//! memory itself. `clippy.toml` makes that a rule: the syscalls and ioctls that map, protect,
//! discard or register memory are disallowed everywhere but here.
#![allow(clippy::disallowed_methods)]

mod backing;
mod bitmap;
mod dimm;
mod discard;
mod hotplug;
mod mapping;
pub mod placement;
pub mod planner;
#[cfg(test)]
mod tests_hotplug;
mod usage;

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::{GuestLayout, GuestRange};
pub use backing::host_memory_bytes;
pub use dimm::DimmMemoryError;
pub use discard::{DiscardError, DiscardOutcome, DISCARD_GRANULE};
pub use hotplug::{
    Backing, BlockRangeState, HotplugRegionId, HotplugRegionInfo, PlugError, UnpluggedAccess,
};
pub use usage::ResidentSplit;

/// Errors of the memory manager.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map guest memory.
    #[error("cannot map {size} bytes of guest memory at {start:#x}")]
    Map {
        /// Guest-physical start.
        start: u64,
        /// Size in bytes.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Building the guest memory collection failed (overlapping regions).
    #[error("guest memory regions are inconsistent")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} at {start:#x} (+{size:#x})")]
    Slot {
        /// The slot id.
        slot: u32,
        /// Guest-physical start.
        start: u64,
        /// Size in bytes.
        size: u64,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A hotplug region was asked for with an unusable range or block size.
    #[error("invalid hotplug region {start:#x}+{size:#x}: {reason}")]
    InvalidHotplugRegion {
        /// Guest-physical start.
        start: u64,
        /// Size in bytes.
        size: u64,
        /// What is wrong.
        reason: String,
    },
    /// A hugetlb-backed region needs blocks of at least one huge page.
    #[error("block size {block_size:#x} is smaller than the huge page size {page_size:#x}")]
    BlockSmallerThanPage {
        /// Requested block size.
        block_size: u64,
        /// Huge page size of the backing.
        page_size: u64,
    },
}

/// A KVM memory slot and what it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical range.
    pub range: GuestRange,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
}

/// Owns the guest's RAM and its KVM memory slots.
#[derive(Debug)]
pub struct MemoryManager {
    layout: GuestLayout,
    guest_memory: GuestMemoryMmap,
    slots: Vec<MemorySlot>,
    next_slot: u32,
    /// Hotplug regions by id; `None` where a region was removed.
    hotplug: Vec<Option<hotplug::HotplugRegion>>,
    /// The VM whose slots follow the plugged blocks (set when a hotplug region is added).
    vm: Option<Arc<VmFd>>,
}

impl MemoryManager {
    /// Maps the boot RAM of `layout` (not yet visible to any VM).
    pub fn new(layout: GuestLayout) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(layout.ram.len());
        for range in &layout.ram {
            let mapping =
                backing::map_anonymous(range.size).map_err(|source| MemoryError::Map {
                    start: range.start,
                    size: range.size,
                    source,
                })?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(range.start)).ok_or(
                MemoryError::Map {
                    start: range.start,
                    size: range.size,
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                },
            )?;
            regions.push(Arc::new(region));
        }
        let guest_memory =
            GuestMemoryMmap::from_arc_regions(regions).map_err(MemoryError::Collection)?;
        Ok(MemoryManager {
            layout,
            guest_memory,
            slots: Vec::new(),
            next_slot: 0,
            hotplug: Vec::new(),
            vm: None,
        })
    }

    /// The guest-physical layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Boot RAM and every hotplug region, for loaders and devices that read or write guest
    /// memory. Hotplug regions are only partly accessible: check
    /// [`MemoryManager::is_accessible`] before touching anything a guest driver pointed at.
    /// The collection is rebuilt when a region is added; clones taken before miss it.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    /// Memory slots currently registered with KVM.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Registers every boot RAM region with `vm`, one slot per region.
    pub fn register_boot_ram(&mut self, vm: &VmFd) -> Result<(), MemoryError> {
        let regions: Vec<(u64, u64, u64)> = self
            .guest_memory
            .iter()
            .filter(|r| self.is_boot_ram(r.start_addr().0, r.len()))
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
            .collect();
        for (start, size, host_addr) in regions {
            let slot = MemorySlot {
                slot: self.next_slot,
                range: GuestRange { start, size },
                host_addr,
            };
            self.set_slot(vm, &slot)?;
            self.next_slot += 1;
            self.slots.push(slot);
        }
        Ok(())
    }

    fn set_slot(&self, vm: &VmFd, slot: &MemorySlot) -> Result<(), MemoryError> {
        self.write_slot(vm, slot, slot.range.size)
    }

    /// Removes `slot` from KVM (memory size 0 deletes a slot).
    fn delete_slot(&self, vm: &VmFd, slot: &MemorySlot) -> Result<(), MemoryError> {
        self.write_slot(vm, slot, 0)
    }

    /// The lowest slot id not in use.
    fn free_slot_id(&self) -> u32 {
        (self.next_slot..)
            .find(|id| self.slots.iter().all(|s| s.slot != *id))
            .unwrap_or(self.next_slot)
    }

    fn write_slot(&self, vm: &VmFd, slot: &MemorySlot, size: u64) -> Result<(), MemoryError> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: 0,
            guest_phys_addr: slot.range.start,
            memory_size: size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: `host_addr..host_addr+size` is a live mapping owned by `self.guest_memory`
        // (or another mapping this manager owns). A slot is deleted before its mapping is
        // unmapped, and the manager's own mappings go only when the manager drops, after the
        // vCPU threads have stopped (the owner stops them first); the VM fd the slot lives in
        // closes with the last `Arc<VmFd>`, at the latest the manager's. Slots never overlap
        // because they come from the non-overlapping layout.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
            slot: slot.slot,
            start: slot.range.start,
            size: slot.range.size,
            source,
        })
    }

    /// Host RAM the process holds, split into guest memory (every region this manager
    /// maps) and the rest.
    pub fn resident(&self) -> ResidentSplit {
        let ranges: Vec<(u64, u64)> = self
            .guest_memory
            .iter()
            .map(|r| {
                let start = r.as_ptr() as u64;
                (start, start + r.len())
            })
            .collect();
        usage::measure_self(&ranges)
    }

    /// Whether `[addr, addr+len)` lies entirely in boot RAM.
    pub fn is_boot_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.layout
            .ram
            .iter()
            .any(|r| addr >= r.start && end <= r.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn boot_ram_is_mapped_across_the_hole() {
        let mm = MemoryManager::new(GuestLayout::new((3 << 30) + (64 << 20))).unwrap();
        let mem = mm.guest_memory();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xabcdu32, GuestAddress((4 << 30) + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((4 << 30) + 8)).unwrap(),
            0xabcd
        );
        assert!(mem.read_obj::<u32>(GuestAddress(3 << 30)).is_err());
        assert!(mm.is_boot_ram(0x1000, 0x1000));
        assert!(!mm.is_boot_ram((3 << 30) - 8, 16));
        assert!(!mm.is_boot_ram(u64::MAX - 1, 4));
    }
}
