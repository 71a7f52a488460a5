//! Where hotplug memory goes in the guest-physical hotplug area: the one allocator for it.
//!
//! The area starts after boot RAM (see `GuestLayout`). virtio-mem regions come first, one
//! after the other, each on a 1 GiB boundary (Linux wants whole 128 MiB memory blocks; 1 GiB
//! also suits gigantic pages); the DIMM area follows the last of them. DIMMs are placed inside
//! the DIMM area first-fit on 128 MiB boundaries. Pure functions: the builder and the memory
//! service ask, the memory manager maps.

use crate::arch::x86_64::layout::{align_up, GuestRange, HOTPLUG_AREA_ALIGN};

pub use crate::config::DIMM_ALIGN;

/// The hotplug area divided up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotplugPlan {
    /// One region per virtio-mem device, in order.
    pub virtio_mem: Vec<GuestRange>,
    /// Where DIMMs go, when the VM has DIMM slots (`dimm_budget` > 0).
    pub dimm_area: Option<GuestRange>,
}

/// Places virtio-mem regions of `virtio_mem_sizes` and a DIMM area of `dimm_budget` bytes
/// (none if 0) from `area_start`.
pub fn plan_hotplug_area(
    area_start: u64,
    virtio_mem_sizes: &[u64],
    dimm_budget: u64,
) -> HotplugPlan {
    let mut next = area_start;
    let virtio_mem = virtio_mem_sizes
        .iter()
        .map(|&size| {
            let range = GuestRange { start: next, size };
            next = align_up(range.end(), HOTPLUG_AREA_ALIGN);
            range
        })
        .collect();
    HotplugPlan {
        virtio_mem,
        dimm_area: (dimm_budget > 0).then_some(GuestRange {
            start: next,
            size: dimm_budget,
        }),
    }
}

/// The lowest [`DIMM_ALIGN`]-aligned start in `area` where `size` bytes fit between the
/// `used` ranges, or `None`.
pub fn place_dimm(area: GuestRange, used: &[GuestRange], size: u64) -> Option<u64> {
    let mut used: Vec<GuestRange> = used.to_vec();
    used.sort_by_key(|r| r.start);
    let mut candidate = area.start;
    for range in used {
        if candidate.checked_add(size)? <= range.start {
            break;
        }
        candidate = candidate.max(range.end().next_multiple_of(DIMM_ALIGN));
    }
    (candidate.checked_add(size)? <= area.end()).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn range(start: u64, size: u64) -> GuestRange {
        GuestRange { start, size }
    }

    #[test]
    fn virtio_mem_regions_then_the_dimm_area_on_gib_boundaries() {
        let plan = plan_hotplug_area(4 * GIB, &[GIB + 2 * MIB, 2 * GIB], 3 * GIB);
        assert_eq!(
            plan.virtio_mem,
            vec![range(4 * GIB, GIB + 2 * MIB), range(6 * GIB, 2 * GIB)]
        );
        assert_eq!(plan.dimm_area, Some(range(8 * GIB, 3 * GIB)));
        let none = plan_hotplug_area(4 * GIB, &[], 0);
        assert!(none.virtio_mem.is_empty() && none.dimm_area.is_none());
        assert_eq!(
            plan_hotplug_area(4 * GIB, &[], GIB).dimm_area,
            Some(range(4 * GIB, GIB))
        );
    }

    #[test]
    fn dimms_go_in_the_first_gap_that_fits() {
        let area = range(1 << 32, 1024 * MIB);
        assert_eq!(place_dimm(area, &[], 256 * MIB), Some(1 << 32));
        let used = [
            range((1 << 32) + 256 * MIB, 128 * MIB),
            range(1 << 32, 128 * MIB),
        ];
        // 128 MiB gap at +128 MiB fits a 128 MiB DIMM but not a 256 MiB one.
        assert_eq!(
            place_dimm(area, &used, 128 * MIB),
            Some((1 << 32) + 128 * MIB)
        );
        assert_eq!(
            place_dimm(area, &used, 256 * MIB),
            Some((1 << 32) + 384 * MIB)
        );
        assert_eq!(
            place_dimm(area, &used, 640 * MIB),
            Some((1 << 32) + 384 * MIB)
        );
        assert_eq!(place_dimm(area, &used, 768 * MIB), None);
        assert_eq!(place_dimm(area, &[], u64::MAX), None, "no wrap");
    }
}
