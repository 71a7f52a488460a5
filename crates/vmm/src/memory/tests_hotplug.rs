//! Hotplug region tests against real host mappings.

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::arch::x86_64::layout::GuestRange;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const PAGES_PER_BLOCK: usize = (BLOCK / 4096) as usize;

fn manager() -> MemoryManager {
    MemoryManager::new(GuestLayout::new(256 * MIB)).unwrap()
}

/// A region at the start of the hotplug area.
fn region(mm: &mut MemoryManager, size: u64, backing: Backing, prealloc: bool) -> HotplugRegionId {
    let start = mm.layout().hotplug_area.start;
    let range = GuestRange { start, size };
    mm.map_hotplug_region(range, BLOCK, backing, prealloc)
        .unwrap()
}

fn resident(mm: &MemoryManager, id: HotplugRegionId, first: u64, count: u64) -> usize {
    mm.hotplug_mapping(id)
        .resident_pages(first * BLOCK, count * BLOCK)
        .unwrap()
}

#[test]
fn anonymous_prealloc_plug_populates_and_unplug_frees() {
    let mut mm = manager();
    let id = region(&mut mm, 64 * MIB, Backing::Anonymous, true);
    let base = mm.hotplug_region(id).unwrap().range.start;
    assert_eq!(resident(&mm, id, 0, 32), 0);
    assert_eq!(
        mm.block_state(id, 0, 32).unwrap(),
        BlockRangeState::Unplugged
    );

    mm.plug(id, 2, 4).unwrap();
    assert_eq!(resident(&mm, id, 2, 4), 4 * PAGES_PER_BLOCK);
    assert_eq!(resident(&mm, id, 0, 2), 0);
    assert_eq!(mm.plugged_bytes(id).unwrap(), 4 * BLOCK);
    assert_eq!(mm.block_state(id, 2, 4).unwrap(), BlockRangeState::Plugged);
    assert_eq!(mm.block_state(id, 0, 4).unwrap(), BlockRangeState::Mixed);
    assert!(mm.is_accessible(base + 2 * BLOCK, 4 * BLOCK));
    assert!(!mm.is_accessible(base + 2 * BLOCK, 4 * BLOCK + 1));
    assert!(!mm.is_accessible(base + BLOCK, 2));

    mm.unplug(id, 3, 2).unwrap();
    assert_eq!(resident(&mm, id, 2, 4), 2 * PAGES_PER_BLOCK);
    assert_eq!(mm.block_state(id, 2, 4).unwrap(), BlockRangeState::Mixed);
    mm.unplug_all(id).unwrap();
    assert_eq!(resident(&mm, id, 0, 32), 0);
    assert_eq!(mm.plugged_bytes(id).unwrap(), 0);
}

#[test]
fn lazy_plug_faults_on_touch_and_replug_reads_zero() {
    let mut mm = manager();
    let id = region(&mut mm, 16 * MIB, Backing::Anonymous, false);
    let base = mm.hotplug_region(id).unwrap().range.start;
    mm.plug(id, 0, 8).unwrap();
    assert_eq!(
        resident(&mm, id, 0, 8),
        0,
        "no prealloc: nothing faulted in"
    );
    let addr = GuestAddress(base + BLOCK + 8);
    mm.guest_memory().write_obj(0xfeed_u64, addr).unwrap();
    assert_eq!(mm.guest_memory().read_obj::<u64>(addr).unwrap(), 0xfeed);
    assert!(resident(&mm, id, 1, 1) >= 1);
    mm.unplug(id, 1, 1).unwrap();
    assert_eq!(resident(&mm, id, 1, 1), 0);
    mm.plug(id, 1, 1).unwrap();
    assert_eq!(mm.guest_memory().read_obj::<u64>(addr).unwrap(), 0);
}

#[test]
fn memfd_unplug_punches_holes() {
    let mut mm = manager();
    let id = region(&mut mm, 32 * MIB, Backing::Memfd, true);
    let file_blocks = |mm: &MemoryManager| {
        let file = mm.hotplug_mapping(id).file().unwrap();
        file.metadata().unwrap().blocks() * 512
    };
    assert_eq!(file_blocks(&mm), 0);
    mm.plug(id, 0, 4).unwrap();
    assert!(
        file_blocks(&mm) >= 4 * BLOCK,
        "populate allocates file pages"
    );
    assert_eq!(resident(&mm, id, 0, 4), 4 * PAGES_PER_BLOCK);
    mm.unplug(id, 0, 4).unwrap();
    assert_eq!(file_blocks(&mm), 0, "punch hole frees st_blocks");
    assert_eq!(resident(&mm, id, 0, 4), 0);
}

#[test]
fn inaccessible_ranges_are_refused() {
    let mut mm = manager();
    let id = region(&mut mm, 16 * MIB, Backing::Anonymous, false);
    let base = mm.hotplug_region(id).unwrap().range.start;
    // Boot RAM is fine, holes and unplugged blocks are not.
    assert!(mm.is_accessible(0x1000, 0x1000));
    assert!(mm.is_accessible(0x1000, 0));
    assert!(!mm.is_accessible(256 * MIB - 4, 8));
    assert!(!mm.is_accessible(base, 8));
    assert!(!mm.is_accessible(u64::MAX - 4, 8));
    assert!(!mm.is_accessible(base + 16 * MIB, 8));
    let unplugged = mm.find_unplugged_access(base + 3 * BLOCK + 5).unwrap();
    assert_eq!((unplugged.region, unplugged.block), (id, 3));
    assert_eq!(mm.find_unplugged_access(0x1000), None);
    assert_eq!(mm.find_unplugged_access(base + 16 * MIB), None);
    mm.plug(id, 3, 1).unwrap();
    assert_eq!(mm.find_unplugged_access(base + 3 * BLOCK + 5), None);
    assert!(mm.is_accessible(base + 3 * BLOCK, BLOCK));
    assert!(!mm.is_accessible(base + 3 * BLOCK, BLOCK + 1));
}

#[test]
fn region_parameters_are_validated() {
    let mut mm = manager();
    let start = mm.layout().hotplug_area.start;
    let bad = |mm: &mut MemoryManager, start, size, block, backing| {
        mm.map_hotplug_region(GuestRange { start, size }, block, backing, false)
            .unwrap_err()
    };
    bad(&mut mm, start, 0, BLOCK, Backing::Anonymous);
    // Not page aligned (block alignment is the device's rule, not the manager's).
    bad(&mut mm, start + 100, 4 * MIB, BLOCK, Backing::Anonymous);
    bad(
        &mut mm,
        start + 4096,
        4 * MIB,
        BLOCK,
        Backing::Hugetlbfs { page_size: BLOCK },
    );
    bad(&mut mm, start, 3 * MIB, BLOCK, Backing::Anonymous);
    bad(&mut mm, start, 4 * MIB, 3 * MIB, Backing::Anonymous);
    bad(&mut mm, 0, 4 * MIB, BLOCK, Backing::Anonymous);
    bad(
        &mut mm,
        u64::MAX - BLOCK + 1,
        BLOCK,
        BLOCK,
        Backing::Anonymous,
    );
    let err = bad(
        &mut mm,
        start,
        4 * MIB,
        MIB,
        Backing::Hugetlbfs { page_size: BLOCK },
    );
    let text = err.to_string();
    assert!(
        text.contains("0x100000") && text.contains("0x200000"),
        "{text}"
    );
    region(&mut mm, 4 * MIB, Backing::Anonymous, false);
    bad(&mut mm, start + BLOCK, 4 * MIB, BLOCK, Backing::Anonymous);
    let id = region_at(&mut mm, start + 4 * MIB, 4 * MIB);
    assert_eq!(id.index(), 1);
    assert!(matches!(
        mm.plug(id, 1, 2),
        Err(PlugError::OutOfRange { .. })
    ));
    assert!(matches!(
        mm.plug(id, u64::MAX, 2),
        Err(PlugError::OutOfRange { .. })
    ));
    assert_eq!(mm.guest_memory().num_regions(), 3);
}

fn region_at(mm: &mut MemoryManager, start: u64, size: u64) -> HotplugRegionId {
    mm.map_hotplug_region(GuestRange { start, size }, BLOCK, Backing::Anonymous, false)
        .unwrap()
}

#[test]
fn failed_populate_rolls_back_every_run() {
    let mut mm = manager();
    let id = region(&mut mm, 32 * MIB, Backing::Anonymous, true);
    mm.plug(id, 1, 1).unwrap();
    mm.plug(id, 3, 1).unwrap();
    // Unplugged runs inside 0..8 are 0, 2 and 4..8: let the first populate, fail the second.
    mm.region_mut(id).unwrap().populate_budget = Some(1);
    let err = mm.plug(id, 0, 8).unwrap_err();
    assert!(matches!(err, PlugError::Populate { .. }), "{err}");
    assert_eq!(mm.plugged_bytes(id).unwrap(), 2 * BLOCK);
    assert_eq!(mm.block_state(id, 1, 1).unwrap(), BlockRangeState::Plugged);
    assert_eq!(mm.block_state(id, 3, 1).unwrap(), BlockRangeState::Plugged);
    assert_eq!(resident(&mm, id, 0, 1) + resident(&mm, id, 4, 4), 0);
    assert!(!mm.is_accessible(mm.hotplug_region(id).unwrap().range.start, 8));
    mm.plug(id, 0, 8).unwrap();
    assert_eq!(mm.plugged_bytes(id).unwrap(), 8 * BLOCK);
}

#[test]
fn a_gib_plug_and_unplug_is_cheap() {
    let mut mm = manager();
    let id = region(&mut mm, 1 << 30, Backing::Anonymous, false);
    // Worst case for run merging: every other block plugged first.
    for b in (0..512).step_by(2) {
        mm.plug(id, b, 1).unwrap();
    }
    mm.unplug_all(id).unwrap();
    let t = Instant::now();
    mm.plug(id, 0, 512).unwrap();
    let plug = t.elapsed();
    let t = Instant::now();
    mm.unplug(id, 0, 512).unwrap();
    let unplug = t.elapsed();
    eprintln!("1 GiB plug {plug:?}, unplug {unplug:?} (nothing resident)");
    assert!(plug.as_millis() < 20 && unplug.as_millis() < 20);
}

/// Sets /proc/sys/vm/nr_hugepages and returns the previous value, or None if it cannot.
fn set_hugepages(n: u64) -> Option<u64> {
    let path = "/proc/sys/vm/nr_hugepages";
    let old = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    std::fs::write(path, n.to_string()).ok()?;
    Some(old)
}

fn free_hugepages() -> u64 {
    let text = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
    text.ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn hugetlbfs_plug_unplug_and_pool_exhaustion() {
    let Some(old) = set_hugepages(64) else {
        eprintln!("SKIPPED: hugetlbfs test: cannot write /proc/sys/vm/nr_hugepages");
        return;
    };
    let free = free_hugepages();
    if free < 8 {
        set_hugepages(old);
        eprintln!("SKIPPED: hugetlbfs test: only {free} free 2 MiB huge pages after reserving 64");
        return;
    }
    let result = std::panic::catch_unwind(|| hugetlb_checks(free));
    set_hugepages(old);
    result.unwrap();
}

fn hugetlb_checks(free: u64) {
    let mut mm = manager();
    // Twice the pool: plugging it all must fail cleanly, not SIGBUS.
    let size = (free + 8) * BLOCK;
    let id = region(
        &mut mm,
        size,
        Backing::Hugetlbfs { page_size: BLOCK },
        false,
    );
    mm.plug(id, 0, 4).unwrap();
    assert_eq!(free_hugepages(), free - 4);
    let addr = GuestAddress(mm.hotplug_region(id).unwrap().range.start + 8);
    mm.guest_memory().write_obj(7u32, addr).unwrap();
    mm.unplug(id, 0, 4).unwrap();
    assert_eq!(
        free_hugepages(),
        free,
        "punch hole returns pages to the pool"
    );

    let blocks = size / BLOCK;
    let err = mm.plug(id, 0, blocks).unwrap_err();
    assert!(matches!(err, PlugError::Populate { .. }), "{err}");
    assert_eq!(
        free_hugepages(),
        free,
        "a failed populate gives its pages back"
    );
    assert_eq!(mm.plugged_bytes(id).unwrap(), 0);
    assert!(!mm.is_accessible(addr.0, 4));
}

#[test]
fn kvm_slots_cover_the_chunks_holding_plugged_blocks() {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!(
                "SKIPPED: no /dev/kvm ({e}): kvm_slots_cover_the_chunks_holding_plugged_blocks not run"
            );
            return;
        }
    };
    let vm = std::sync::Arc::new(kvm.create_vm().unwrap());
    let mut mm = manager();
    mm.register_boot_ram(&vm).unwrap();
    let boot_slots = mm.slots().len();
    let start = mm.layout().hotplug_area.start;
    let range = GuestRange {
        start,
        size: 1 << 30,
    };
    let id = mm
        .add_hotplug_region(&vm, range, BLOCK, Backing::Anonymous, false)
        .unwrap();
    let hotplug_slots = |mm: &MemoryManager| -> Vec<GuestRange> {
        let mut ranges: Vec<GuestRange> = mm
            .slots()
            .iter()
            .filter(|s| range.contains(s.range.start))
            .map(|s| s.range)
            .collect();
        ranges.sort_by_key(|r| r.start);
        ranges
    };
    // Nothing plugged: KVM maps none of the region, so guest accesses exit to the VMM.
    assert!(hotplug_slots(&mm).is_empty());
    // One slot per 128 MiB chunk holding plugged blocks, not one per 2 MiB block.
    let chunk = |i: u64| GuestRange {
        start: start + i * (128 << 20),
        size: 128 << 20,
    };
    mm.plug(id, 0, 1).unwrap();
    assert_eq!(hotplug_slots(&mm), vec![chunk(0)]);
    mm.plug(id, 1, 255).unwrap();
    assert_eq!(
        hotplug_slots(&mm),
        vec![chunk(0), chunk(1), chunk(2), chunk(3)]
    );
    let slot = mm
        .slots()
        .iter()
        .find(|s| s.range == chunk(0))
        .copied()
        .unwrap();
    assert_eq!(slot.host_addr, mm.hotplug_mapping(id).host_addr());
    // A slot is never re-created while part of its chunk stays plugged: memory in use is
    // never unmapped.
    mm.unplug(id, 100, 10).unwrap();
    assert_eq!(
        hotplug_slots(&mm),
        vec![chunk(0), chunk(1), chunk(2), chunk(3)]
    );
    mm.unplug(id, 64, 64).unwrap();
    assert_eq!(hotplug_slots(&mm), vec![chunk(0), chunk(2), chunk(3)]);
    mm.unplug_all(id).unwrap();
    assert!(hotplug_slots(&mm).is_empty());
    assert_eq!(mm.slots().len(), boot_slots);
}

/// Hostile-guest defect 7: when KVM refused the memory slot for a plug, the blocks stayed
/// open (readable, writable, counted as plugged) while the guest was told BUSY. A plug is
/// all-or-nothing: on a slot failure the blocks are closed again and nothing is plugged.
#[test]
fn plug_is_all_or_nothing_when_kvm_refuses_the_slot() {
    let Some((mut mm, vm)) = super::dimm::tests::manager_with_vm() else {
        return;
    };
    let start = mm.layout().hotplug_area.start;
    let range = GuestRange {
        start,
        size: 256 * MIB,
    };
    let id = mm
        .add_hotplug_region(&vm, range, BLOCK, Backing::Anonymous, false)
        .unwrap();
    mm.plug(id, 0, 1).unwrap();
    // A slot of someone else's over the second 128 MiB chunk: KVM refuses an overlapping one.
    let host = mm.guest_memory().get_host_address(GuestAddress(0)).unwrap() as u64;
    let foreign = kvm_userspace_memory_region {
        slot: 1000,
        flags: 0,
        guest_phys_addr: start + 128 * MIB,
        memory_size: BLOCK,
        userspace_addr: host,
    };
    // SAFETY: the slot maps 2 MiB of the manager's boot RAM, which lives as long as `mm`,
    // dropped after the VM at the end of the test; the guest never runs.
    unsafe { vm.set_user_memory_region(foreign) }.unwrap();
    let first_of_chunk_1 = 128 * MIB / BLOCK;
    let err = mm.plug(id, first_of_chunk_1, 2).unwrap_err();
    assert!(matches!(err, PlugError::Slot(_)), "{err}");
    assert_eq!(mm.plugged_bytes(id).unwrap(), BLOCK, "only the first plug");
    assert!(
        !mm.is_accessible(start + 128 * MIB, 2 * BLOCK),
        "the refused blocks are closed again"
    );
    assert_eq!(
        mm.block_state(id, first_of_chunk_1, 2).unwrap(),
        BlockRangeState::Unplugged
    );
    // The earlier plug is untouched, and once KVM agrees the same plug works.
    assert!(mm.is_accessible(start, BLOCK));
    let remove = kvm_userspace_memory_region {
        memory_size: 0,
        ..foreign
    };
    // SAFETY: deletes the slot added above.
    unsafe { vm.set_user_memory_region(remove) }.unwrap();
    mm.plug(id, first_of_chunk_1, 2).unwrap();
    assert!(mm.is_accessible(start + 128 * MIB, 2 * BLOCK));
}
