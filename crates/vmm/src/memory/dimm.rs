//! DIMMs: hotplug regions that are plugged whole, for their whole life.
//!
//! A DIMM is a hotplug region of a single block (its own size), so it gets exactly one KVM
//! memory slot, and the region machinery already handles backing, prealloc, discard and the
//! accessibility checks. Removing a DIMM deletes the slot first, then discards and unmaps the
//! memory.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::{Backing, HotplugRegionId, MemoryError, MemoryManager, PlugError};
use crate::arch::x86_64::layout::GuestRange;

/// Why a DIMM could not be added. Nothing is left behind after an error.
#[derive(Debug, thiserror::Error)]
pub enum DimmMemoryError {
    /// The range or backing is unusable.
    #[error(transparent)]
    Region(#[from] MemoryError),
    /// The host could not provide the memory, or KVM refused the slot.
    #[error(transparent)]
    Plug(#[from] PlugError),
}

impl MemoryManager {
    /// Maps `range` as a DIMM with `backing`, populates it first with `prealloc` (and always
    /// for hugetlbfs), and gives it to `vm` as one memory slot.
    pub fn add_dimm(
        &mut self,
        vm: &Arc<VmFd>,
        range: GuestRange,
        backing: Backing,
        prealloc: bool,
    ) -> Result<HotplugRegionId, DimmMemoryError> {
        let id = self.add_hotplug_region(vm, range, range.size, backing, prealloc)?;
        if let Err(e) = self.plug(id, 0, 1) {
            // Unmap it again: a failed add changes nothing.
            let _ = self.remove_hotplug_region(id);
            return Err(e.into());
        }
        Ok(id)
    }

    /// Takes a DIMM away: KVM slot, host memory and mapping.
    pub fn remove_dimm(&mut self, id: HotplugRegionId) -> Result<(), PlugError> {
        self.remove_hotplug_region(id)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::arch::x86_64::layout::GuestLayout;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    /// A manager with 256 MiB of boot RAM registered with a fresh VM, or `None` (and a loud
    /// SKIPPED) when this host has no usable /dev/kvm.
    pub(crate) fn manager_with_vm() -> Option<(MemoryManager, Arc<VmFd>)> {
        let vm = crate::vstate::vm::test_vm(false)?;
        let mut mm = MemoryManager::new(GuestLayout::new(256 * MIB)).unwrap();
        mm.register_boot_ram(&vm).unwrap();
        Some((mm, vm))
    }

    #[test]
    fn a_dimm_is_one_slot_and_leaves_no_trace() {
        let Some((mut mm, vm)) = manager_with_vm() else {
            return;
        };
        let boot_slots = mm.slots().len();
        let base = mm.layout().hotplug_area.start + (1 << 30);
        let range = GuestRange {
            start: base,
            size: 384 * MIB,
        };
        let id = mm
            .add_dimm(&vm, range, Backing::Anonymous, true)
            .expect("add a 384 MiB DIMM");
        assert_eq!(mm.slots().len(), boot_slots + 1);
        assert!(mm.is_accessible(base, range.size));
        assert_eq!(mm.resident_bytes(id), range.size, "prealloc populates it");
        mm.guest_memory()
            .write_obj(0x5a5au16, GuestAddress(base + range.size - 2))
            .unwrap();

        mm.remove_dimm(id).unwrap();
        assert_eq!(mm.slots().len(), boot_slots);
        assert!(!mm.is_accessible(base, 4096));
        assert!(mm.guest_memory().find_region(GuestAddress(base)).is_none());
        assert_eq!(mm.hotplug_region(id), None);
        assert!(mm.remove_dimm(id).is_err());

        // The place is free again, for a DIMM of another size, and the id is reused.
        let again = mm
            .add_dimm(
                &vm,
                GuestRange {
                    start: base,
                    size: 128 * MIB,
                },
                Backing::Memfd,
                false,
            )
            .unwrap();
        assert_eq!(again, id);
        assert_eq!(mm.resident_bytes(again), 0);
    }

    #[test]
    fn a_bad_dimm_is_refused_whole() {
        let Some((mut mm, vm)) = manager_with_vm() else {
            return;
        };
        let area = mm.layout().hotplug_area;
        // Outside the hotplug area.
        let outside = GuestRange {
            start: area.end(),
            size: 128 * MIB,
        };
        assert!(mm
            .add_dimm(&vm, outside, Backing::Anonymous, false)
            .is_err());
        // Overlapping another DIMM.
        let first = GuestRange {
            start: area.start,
            size: 256 * MIB,
        };
        mm.add_dimm(&vm, first, Backing::Anonymous, false).unwrap();
        let overlap = GuestRange {
            start: area.start + 128 * MIB,
            size: 256 * MIB,
        };
        assert!(mm
            .add_dimm(&vm, overlap, Backing::Anonymous, false)
            .is_err());
        assert_eq!(mm.slots().len(), 2);
    }
}
