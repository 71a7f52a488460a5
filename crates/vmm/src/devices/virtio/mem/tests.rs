//! virtio-mem device tests on real guest memory and a mock split queue.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::*;
use super::request::*;
use crate::arch::x86_64::layout::{GuestLayout, GuestRange};
use crate::devices::virtio::chain::ChainError;
use crate::devices::virtio::{Signal, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::{Backing, BlockRangeState, HotplugRegionId, MemoryManager, PlugError};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const REGION: u64 = 1 << 30;
/// Start of the hotplug area of a 64 MiB VM, where the region goes.
const BASE: u64 = 4 << 30;
const QUEUE_ADDR: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x10_0100;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

struct Setup {
    mm: MemoryManager,
    mem: GuestMemoryMmap,
    dev: VirtioMem,
    id: HotplugRegionId,
}

fn setup_with(requested: u64, prealloc: bool) -> Setup {
    let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
    let base = mm.layout().hotplug_area.start;
    let region = GuestRange {
        start: base,
        size: REGION,
    };
    let id = mm
        .map_hotplug_region(region, BLOCK, Backing::Anonymous, prealloc)
        .unwrap();
    let dev = VirtioMem::new(VirtioMemConfig {
        id: "mem0".into(),
        region,
        block_size: BLOCK,
        node: None,
        requested_size: requested,
        hotplug: id,
    })
    .unwrap();
    dev.check_region(&mm).unwrap();
    let mem = mm.guest_memory().clone();
    Setup { mm, mem, dev, id }
}

fn setup(requested: u64) -> Setup {
    setup_with(requested, false)
}

/// Drives the device's queue: writes chains, processes them, reads the used ring.
struct Driver<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    next_used: u16,
}

impl<'a> Driver<'a> {
    fn start(s: &mut Setup, mem: &'a GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(QUEUE_ADDR), QUEUE_SIZE);
        assert!(s
            .dev
            .ack_features(VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE));
        s.dev
            .activate(vec![mock.create_queue::<Queue>().unwrap()])
            .unwrap();
        Driver {
            mock,
            next_desc: 0,
            next_used: 0,
        }
    }

    /// Submits `descs` as one chain (their `next` fields are relative: 1 = the following one).
    fn submit(&mut self, s: &mut Setup, descs: &[(u64, u32, u16)]) -> (Signal, u32) {
        let base = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = (base + i as u16 + 1) % QUEUE_SIZE;
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, base).unwrap();
        self.next_desc = (base + 4) % QUEUE_SIZE;
        let mem = s.mem.clone();
        let signal = s.dev.process_queue(0, &mem, &mut s.mm);
        let elem = self
            .mock
            .used()
            .ring()
            .ref_at(self.next_used as usize % 16)
            .unwrap()
            .load();
        self.next_used += 1;
        assert_eq!(
            self.mock.used().idx().load(),
            self.next_used,
            "one used buffer per chain"
        );
        assert_eq!(elem.id(), u32::from(base));
        (signal, elem.len())
    }

    /// Sends a well-formed request; returns (used len, response type, state).
    fn send(&mut self, s: &mut Setup, ty: u16, addr: u64, nb: u16) -> (u32, u16, u16) {
        s.mem
            .write_slice(&request(ty, addr, nb), GuestAddress(REQ))
            .unwrap();
        s.mem.write_slice(&[0xff; 10], GuestAddress(RESP)).unwrap();
        let (signal, len) = self.submit(s, &[(REQ, 24, NEXT), (RESP, 10, WRITE)]);
        assert!(signal.queue && !signal.config);
        let (ty, state) = response(&s.mem, RESP);
        (len, ty, state)
    }
}

fn request(ty: u16, addr: u64, nb: u16) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..2].copy_from_slice(&ty.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b[16..18].copy_from_slice(&nb.to_le_bytes());
    b
}

fn response(mem: &GuestMemoryMmap, at: u64) -> (u16, u16) {
    let ty: u16 = mem.read_obj(GuestAddress(at)).unwrap();
    let state: u16 = mem.read_obj(GuestAddress(at + 8)).unwrap();
    (ty, state)
}

const ACK: u16 = ResponseType::Ack as u16;
const NACK: u16 = ResponseType::Nack as u16;
const BUSY: u16 = ResponseType::Busy as u16;
const ERROR: u16 = ResponseType::Error as u16;

fn config_u64(dev: &VirtioMem, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read_config(offset, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn config_space_and_features() {
    let s = setup(64 * MIB);
    let d = &s.dev;
    assert_eq!(d.device_type(), 24);
    assert_eq!(d.queue_max_sizes(), &[128]);
    assert_eq!(config_u64(d, 0x00), BLOCK);
    assert_eq!(config_u64(d, 0x10), BASE);
    assert_eq!(config_u64(d, 0x18), REGION);
    assert_eq!(
        config_u64(d, 0x20),
        384 * MIB,
        "64 MiB + 256 MiB slack, in 128 MiB blocks"
    );
    assert_eq!(config_u64(d, 0x28), 0);
    assert_eq!(config_u64(d, 0x30), 64 * MIB);
    let mut tail = [0xaau8; 12];
    d.read_config(0x34, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    d.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 12]);
    assert_eq!(
        d.features(),
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    );

    let mut dev = VirtioMem::new(VirtioMemConfig {
        node: Some(3),
        ..config_of(&s)
    })
    .unwrap();
    let all = dev.features();
    assert_eq!(all & VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_ACPI_PXM);
    let mut node = [0u8; 2];
    dev.read_config(0x08, &mut node);
    assert_eq!(u16::from_le_bytes(node), 3);
    assert!(
        !dev.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_ACPI_PXM),
        "must take INACCESSIBLE"
    );
    assert!(!dev.ack_features(all | 1 << 2), "unoffered feature");
    assert!(
        !dev.ack_features(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE),
        "no VERSION_1"
    );
    assert!(dev.ack_features(all));
    assert!(dev.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE));
}

fn config_of(s: &Setup) -> VirtioMemConfig {
    VirtioMemConfig {
        id: "mem1".into(),
        region: GuestRange {
            start: BASE,
            size: REGION,
        },
        block_size: BLOCK,
        node: None,
        requested_size: 0,
        hotplug: s.id,
    }
}

#[test]
fn invalid_configs_and_requested_sizes_are_refused() {
    let s = setup(0);
    let bad = |c: VirtioMemConfig| VirtioMem::new(c).unwrap_err();
    bad(VirtioMemConfig {
        block_size: 3 * MIB,
        ..config_of(&s)
    });
    bad(VirtioMemConfig {
        node: Some(1 << 16),
        ..config_of(&s)
    });
    bad(VirtioMemConfig {
        requested_size: REGION + BLOCK,
        ..config_of(&s)
    });
    bad(VirtioMemConfig {
        region: GuestRange {
            start: BASE + 4096,
            size: REGION,
        },
        ..config_of(&s)
    });
    let mut dev = VirtioMem::new(config_of(&s)).unwrap();
    assert_eq!(dev.status().usable_region_size, 0);
    assert!(dev.set_requested_size(MIB).is_err());
    assert!(dev.set_requested_size(REGION + BLOCK).is_err());
    let signal = dev.set_requested_size(REGION - BLOCK).unwrap();
    assert_eq!(
        signal,
        Signal {
            queue: false,
            config: true,
            ..Signal::default()
        }
    );
    assert_eq!(
        dev.status().usable_region_size,
        REGION,
        "capped at the region size"
    );
    dev.set_requested_size(0).unwrap();
    assert_eq!(
        dev.status().usable_region_size,
        REGION,
        "never shrinks on resize"
    );
    let other = VirtioMem::new(VirtioMemConfig {
        block_size: 4 * MIB,
        ..config_of(&s)
    })
    .unwrap();
    assert!(other.check_region(&s.mm).is_err());
}

#[test]
fn plug_state_unplug_acks_and_track_plugged_size() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    let base = BASE;
    assert_eq!(drv.send(&mut s, 0, base + 4 * BLOCK, 4), (10, ACK, 0));
    assert_eq!(s.dev.status().plugged_size, 4 * BLOCK);
    assert_eq!(config_u64(&s.dev, 0x28), 4 * BLOCK);
    assert!(s.mm.is_accessible(base + 4 * BLOCK, 4 * BLOCK));
    mem.write_obj(0x5a5a_u64, GuestAddress(base + 5 * BLOCK))
        .unwrap();

    assert_eq!(
        drv.send(&mut s, 3, base + 4 * BLOCK, 4),
        (10, ACK, 0),
        "PLUGGED"
    );
    assert_eq!(drv.send(&mut s, 3, base, 4), (10, ACK, 1), "UNPLUGGED");
    assert_eq!(drv.send(&mut s, 3, base, 8), (10, ACK, 2), "MIXED");

    assert_eq!(drv.send(&mut s, 1, base + 6 * BLOCK, 2), (10, ACK, 0));
    assert_eq!(s.dev.status().plugged_size, 2 * BLOCK);
    assert_eq!(drv.send(&mut s, 3, base + 4 * BLOCK, 4), (10, ACK, 2));
    assert!(!s.mm.is_accessible(base + 6 * BLOCK, 1));
    let m = s.dev.metrics();
    assert_eq!((m.plug.ack, m.unplug.ack, m.state.ack), (1, 1, 4));
    assert_eq!((m.bytes_plugged, m.bytes_unplugged), (4 * BLOCK, 2 * BLOCK));
    assert_eq!(m.malformed, 0);
    // One handling-time observation per PLUG and per UNPLUG (STATE is not timed), summing to
    // the accumulated times.
    let (plugs, unplugs) = (m.plug_seconds.histogram(), m.unplug_seconds.histogram());
    assert_eq!((plugs.count(), unplugs.count()), (1, 1));
    assert!((plugs.sum() - m.plug_time.as_secs_f64()).abs() < 1e-9);
    assert!((unplugs.sum() - m.unplug_time.as_secs_f64()).abs() < 1e-9);
}

#[test]
fn invalid_ranges_and_states_answer_error() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    let base = BASE;
    let usable = s.dev.status().usable_region_size;
    let cases: &[(u16, u64, u16)] = &[
        (0, base + 4096, 1),                 // unaligned
        (0, base, 0),                        // nb_blocks == 0
        (0, base - BLOCK, 1),                // below the region
        (0, base + usable - BLOCK, 2),       // crosses usable_region_size
        (0, base + usable, 1),               // beyond usable, inside region
        (0, base, u16::MAX),                 // huge nb_blocks
        (0, u64::MAX - BLOCK + 1, 1),        // aligned, addr + size overflows
        (0, (u64::MAX / BLOCK) * BLOCK, 1),  // highest aligned block
        (1, base, 1),                        // unplug unplugged
        (3, base + usable, 1),               // state beyond usable
        (3, u64::MAX - BLOCK + 1, u16::MAX), // state overflow
    ];
    for &(ty, addr, nb) in cases {
        assert_eq!(
            drv.send(&mut s, ty, addr, nb),
            (10, ERROR, 0),
            "{ty} {addr:#x} {nb}"
        );
    }
    assert_eq!(drv.send(&mut s, 0, base, 2), (10, ACK, 0));
    assert_eq!(
        drv.send(&mut s, 0, base + BLOCK, 2),
        (10, ERROR, 0),
        "plug plugged"
    );
    assert_eq!(
        drv.send(&mut s, 1, base + BLOCK, 2),
        (10, ERROR, 0),
        "unplug mixed"
    );
    let m = s.dev.metrics();
    assert_eq!((m.plug.error, m.unplug.error, m.state.error), (9, 2, 2));
    assert_eq!(s.dev.status().plugged_size, 2 * BLOCK);
}

#[test]
fn plugging_beyond_requested_size_is_nacked() {
    let mut s = setup(4 * BLOCK);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    assert_eq!(drv.send(&mut s, 0, BASE, 5), (10, NACK, 0));
    assert_eq!(drv.send(&mut s, 0, BASE, 3), (10, ACK, 0));
    assert_eq!(drv.send(&mut s, 0, BASE + 3 * BLOCK, 2), (10, NACK, 0));
    assert_eq!(drv.send(&mut s, 0, BASE + 3 * BLOCK, 1), (10, ACK, 0));
    s.dev.set_requested_size(2 * BLOCK).unwrap();
    assert_eq!(drv.send(&mut s, 0, BASE + 8 * BLOCK, 1), (10, NACK, 0));
    assert_eq!(s.dev.metrics().plug.nack, 3);
    assert_eq!(s.dev.status().plugged_size, 4 * BLOCK);
}

#[test]
fn populate_failure_answers_busy_and_remembers_why() {
    let mut s = setup_with(64 * MIB, true);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    s.mm.region_mut(s.id).unwrap().populate_budget = Some(0);
    assert_eq!(drv.send(&mut s, 0, BASE, 4), (10, BUSY, 0));
    let status = s.dev.status();
    assert_eq!(status.plugged_size, 0);
    assert!(matches!(
        status.last_busy_reason.as_deref(),
        Some(PlugError::Populate { .. })
    ));
    assert_eq!(
        s.mm.block_state(s.id, 0, 4).unwrap(),
        BlockRangeState::Unplugged
    );
    assert!(!s.mm.is_accessible(BASE, 8));
    assert_eq!(drv.send(&mut s, 0, BASE, 4), (10, ACK, 0));
    assert!(s.dev.status().last_busy_reason.is_none());
    assert_eq!(s.dev.metrics().plug.busy, 1);
}

#[test]
fn unplug_all_empties_and_shrinks_usable_size() {
    let mut s = setup(512 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    assert_eq!(s.dev.status().usable_region_size, 768 * MIB);
    assert_eq!(drv.send(&mut s, 0, BASE, 100), (10, ACK, 0));
    assert_eq!(drv.send(&mut s, 0, BASE + 200 * BLOCK, 50), (10, ACK, 0));
    s.dev.set_requested_size(10 * BLOCK).unwrap();
    assert_eq!(s.dev.status().usable_region_size, 768 * MIB);
    // UNPLUG_ALL ignores addr and nb_blocks.
    assert_eq!(drv.send(&mut s, 2, 0xdead, 0), (10, ACK, 0));
    let status = s.dev.status();
    assert_eq!(
        (status.plugged_size, status.usable_region_size),
        (0, 384 * MIB)
    );
    assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), 0);
    assert_eq!(s.dev.metrics().bytes_unplugged, 150 * BLOCK);
    assert_eq!(
        drv.send(&mut s, 2, 0, 0),
        (10, ACK, 0),
        "UNPLUG_ALL when empty"
    );
    assert_eq!(s.dev.metrics().unplug_all.ack, 2);
    // UNPLUG_ALL is timed with the unplugs, even when there was nothing to unplug.
    assert_eq!(s.dev.metrics().unplug_seconds.histogram().count(), 2);
    assert_eq!(s.dev.metrics().plug_seconds.histogram().count(), 2);
}

#[test]
fn buffers_in_plugged_hotplug_memory_are_used() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    assert_eq!(drv.send(&mut s, 0, BASE, 1), (10, ACK, 0));
    let (req, resp) = (BASE + 0x100, BASE + 0x200);
    mem.write_slice(&request(3, BASE, 1), GuestAddress(req))
        .unwrap();
    let (_, len) = drv.submit(&mut s, &[(req, 24, NEXT), (resp, 10, WRITE)]);
    assert_eq!((len, response(&mem, resp)), (10, (ACK, 0)));
}

/// Descriptors as (addr, len, flags).
type Chain = Vec<(u64, u32, u16)>;

/// Submits a raw chain with the standard request in REQ; returns the used len.
fn raw(s: &mut Setup, drv: &mut Driver, descs: &[(u64, u32, u16)], ty: u16) -> u32 {
    s.mem
        .write_slice(&request(ty, BASE, 1), GuestAddress(REQ))
        .unwrap();
    s.mem.write_slice(&[0xff; 10], GuestAddress(RESP)).unwrap();
    drv.submit(s, descs).1
}

#[test]
fn malformed_chains_never_panic_and_are_counted() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    let unplugged = BASE + 8 * BLOCK;
    let indirect = VRING_DESC_F_INDIRECT as u16;
    // (chain, request type, whether an ERROR response is written)
    let cases: Vec<(Chain, u16, bool)> = vec![
        (vec![(unplugged, 24, NEXT), (RESP, 10, WRITE)], 0, true),
        (vec![(REQ, 24, NEXT), (unplugged, 10, WRITE)], 0, false),
        (vec![(REQ, 16, NEXT), (RESP, 10, WRITE)], 0, true),
        (vec![(REQ, 24, 0)], 0, false),
        (vec![(REQ, 24, NEXT), (RESP, 10, 0)], 0, false),
        (vec![(REQ, 24, NEXT), (RESP, 8, WRITE)], 0, false),
        (vec![(REQ, 24, NEXT | WRITE), (RESP, 10, WRITE)], 0, true),
        (vec![(REQ, 24, NEXT), (RESP, 10, WRITE)], 7, true),
        (vec![(REQ, 24, NEXT | indirect), (RESP, 10, WRITE)], 0, true),
        (
            vec![(REQ, 24, NEXT), (RESP, 10, WRITE | indirect)],
            0,
            false,
        ),
        (
            vec![(REQ, 24, NEXT), (RESP, 10, WRITE | NEXT), (RESP, 10, WRITE)],
            0,
            true,
        ),
        (vec![(u64::MAX - 8, 24, NEXT), (RESP, 10, WRITE)], 0, true),
        (vec![(REQ, 24, NEXT), (u64::MAX - 4, 10, WRITE)], 0, false),
    ];
    for (i, (chain, ty, answered)) in cases.iter().enumerate() {
        let len = raw(&mut s, &mut drv, chain, *ty);
        let expect = if *answered {
            (10, (ERROR, 0))
        } else {
            (0, (0xffff, 0xffff))
        };
        assert_eq!((len, response(&mem, RESP)), expect, "case {i}: {chain:?}");
        assert_eq!(s.dev.metrics().malformed, i as u64 + 1);
    }
    // The device still works afterwards, and no memory was plugged by the garbage.
    assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), 0);
    assert_eq!(drv.send(&mut s, 0, BASE, 1), (10, ACK, 0));
}

#[test]
fn next_index_beyond_the_queue_is_malformed() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let drv = Driver::start(&mut s, &mem);
    let raw_desc = RawDescriptor::from(Descriptor::new(REQ, 24, NEXT, 200));
    drv.mock.add_desc_chains(&[raw_desc], 0).unwrap();
    let signal = s.dev.process_queue(0, &mem, &mut s.mm);
    assert!(signal.queue);
    assert_eq!(drv.mock.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(s.dev.metrics().malformed, 1);
}

#[test]
fn rings_in_unplugged_memory_are_not_touched() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_ADDR), QUEUE_SIZE);
    let mut queue: Queue = mock.create_queue().unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(BASE))
        .unwrap();
    s.dev.activate(vec![queue]).unwrap();
    let signal = s.dev.process_queue(0, &mem, &mut s.mm);
    assert_eq!(
        signal,
        Signal {
            needs_reset: true,
            ..Signal::default()
        },
        "nothing touched; the driver is asked to reset"
    );
    assert_eq!(s.dev.metrics().bad_rings, 1);
}

#[test]
fn activation_and_queue_index_checks() {
    let mut s = setup(0);
    let mem = s.mem.clone();
    assert_eq!(
        s.dev.process_queue(0, &mem, &mut s.mm),
        Signal::default(),
        "not active"
    );
    assert!(s.dev.activate(vec![]).is_err());
    let mut drv = Driver::start(&mut s, &mem);
    assert_eq!(s.dev.process_queue(1, &mem, &mut s.mm), Signal::default());
    assert_eq!(
        drv.send(&mut s, 3, BASE, 1),
        (10, ERROR, 0),
        "usable size 0: nothing valid"
    );
}

#[test]
fn device_reset_keeps_memory_and_system_reset_unplugs() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    assert_eq!(drv.send(&mut s, 0, BASE, 4), (10, ACK, 0));
    mem.write_obj(0x77u8, GuestAddress(BASE + 1)).unwrap();
    s.dev.reset();
    assert_eq!(s.dev.status().plugged_size, 4 * BLOCK);
    assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), 4 * BLOCK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BASE + 1)).unwrap(), 0x77);
    assert_eq!(s.dev.process_queue(0, &mem, &mut s.mm), Signal::default());
    s.dev.set_requested_size(600 * MIB).unwrap();
    s.dev.set_requested_size(64 * MIB).unwrap();
    s.dev.system_reset(&mut s.mm).unwrap();
    let status = s.dev.status();
    assert_eq!(
        (status.plugged_size, status.usable_region_size),
        (0, 384 * MIB)
    );
    assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), 0);
}

#[test]
fn parser_accepts_longer_buffers_and_decodes_every_type() {
    let s = setup(0);
    let table = DescriptorTable {
        addr: QUEUE_ADDR,
        size: QUEUE_SIZE,
    };
    let write = |i: u16, d: Descriptor| {
        s.mem
            .write_obj(
                RawDescriptor::from(d),
                GuestAddress(QUEUE_ADDR + 16 * u64::from(i)),
            )
            .unwrap()
    };
    write(0, Descriptor::new(REQ, 4096, NEXT, 5));
    write(5, Descriptor::new(RESP, 64, WRITE, 0));
    for (ty, want) in [
        (
            0,
            Request::Plug {
                addr: 0x1234,
                nb_blocks: 9,
            },
        ),
        (
            1,
            Request::Unplug {
                addr: 0x1234,
                nb_blocks: 9,
            },
        ),
        (2, Request::UnplugAll),
        (
            3,
            Request::State {
                addr: 0x1234,
                nb_blocks: 9,
            },
        ),
    ] {
        s.mem
            .write_slice(&request(ty, 0x1234, 9), GuestAddress(REQ))
            .unwrap();
        let parsed = parse_chain(&s.mem, &s.mm, table, 0);
        assert_eq!(parsed.request.unwrap(), want);
        assert_eq!(parsed.response, Some(RESP));
    }
    let parsed = parse_chain(&s.mem, &s.mm, table, QUEUE_SIZE);
    assert!(matches!(
        parsed.request,
        Err(RequestError::Chain(ChainError::DescriptorIndex { .. }))
    ));
    assert_eq!(
        encode_response(ResponseType::Busy, 2),
        [2, 0, 0, 0, 0, 0, 0, 0, 2, 0]
    );
}

/// Hostile-guest defect 1: a request whose own unplug would close the memory its response
/// buffer lies in. Checked before the request ran, the buffer was open; the unplug then made
/// it PROT_NONE and the response write killed the VMM with SIGSEGV. The device must answer
/// ERROR (the request is invalid) and leave the block plugged.
#[test]
fn unplug_of_the_block_holding_the_response_is_refused_not_a_crash() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let mut drv = Driver::start(&mut s, &mem);
    assert_eq!(drv.send(&mut s, 0, BASE, 1), (10, ACK, 0));
    let resp = BASE + 0x200;
    mem.write_slice(&request(1, BASE, 1), GuestAddress(REQ))
        .unwrap();
    let (_, len) = drv.submit(&mut s, &[(REQ, 24, NEXT), (resp, 10, WRITE)]);
    assert_eq!((len, response(&mem, resp)), (10, (ERROR, 0)));
    assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), BLOCK, "still plugged");
    // UNPLUG_ALL with the response in plugged memory: the same.
    mem.write_slice(&request(2, 0, 0), GuestAddress(REQ))
        .unwrap();
    let (_, len) = drv.submit(&mut s, &[(REQ, 24, NEXT), (resp, 10, WRITE)]);
    assert_eq!((len, response(&mem, resp)), (10, (ERROR, 0)));
    assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), BLOCK, "still plugged");
    // The request buffer itself in the block: it was read before the unplug, so only the
    // response matters; an unplug of another block with the same response works.
    assert_eq!(drv.send(&mut s, 0, BASE + BLOCK, 1), (10, ACK, 0));
    assert_eq!(drv.send(&mut s, 1, BASE + BLOCK, 1), (10, ACK, 0));
}

/// Defect 1, the rings: the descriptor table, the available and the used ring in the block a
/// request unplugs. `add_used` and the next pop would write and read closed memory.
#[test]
fn unplug_of_the_block_holding_the_rings_is_refused_not_a_crash() {
    for (ring, ty) in [(0u64, 1u16), (0, 2)] {
        let mut s = setup(64 * MIB);
        let mem = s.mem.clone();
        // Plug block 0 through a queue in boot RAM, then move the rings into block 0.
        let mut drv = Driver::start(&mut s, &mem);
        assert_eq!(drv.send(&mut s, 0, BASE, 1), (10, ACK, 0));
        drop(drv);
        let queue_addr = BASE + ring;
        let mock = MockSplitQueue::create(&mem, GuestAddress(queue_addr), QUEUE_SIZE);
        s.dev.reset();
        assert!(s
            .dev
            .ack_features(VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE));
        s.dev
            .activate(vec![mock.create_queue::<Queue>().unwrap()])
            .unwrap();
        mem.write_slice(&request(ty, BASE, 1), GuestAddress(REQ))
            .unwrap();
        let raw = [
            RawDescriptor::from(Descriptor::new(REQ, 24, NEXT, 1)),
            RawDescriptor::from(Descriptor::new(RESP, 10, WRITE, 0)),
        ];
        mock.add_desc_chains(&raw, 0).unwrap();
        let signal = s.dev.process_queue(0, &mem, &mut s.mm);
        assert!(signal.queue, "type {ty}: answered");
        assert_eq!(response(&mem, RESP), (ERROR, 0), "type {ty}");
        assert_eq!(mock.used().idx().load(), 1, "type {ty}");
        assert_eq!(s.mm.plugged_bytes(s.id).unwrap(), BLOCK, "type {ty}");
    }
}

/// Hostile-guest defect 3: a driver that keeps reposting a chain held the control loop for as
/// long as it kept going. One pass now completes at most `PASS_BUDGET` chains and says there
/// is more, so the transport notifies the queue again after the loop's other work.
#[test]
fn one_pass_is_bounded_by_its_budget() {
    use crate::devices::virtio::chain::PASS_BUDGET;
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let size = 128u16;
    let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_ADDR), size);
    // The mock lays a 128-entry used ring over its available ring; give it its own page.
    let used_ring = QUEUE_ADDR + 0x4000;
    let mut queue: Queue = mock.create_queue().unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(used_ring))
        .unwrap();
    let used_idx = || mem.read_obj::<u16>(GuestAddress(used_ring + 2)).unwrap();
    assert!(s
        .dev
        .ack_features(VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE));
    s.dev.activate(vec![queue]).unwrap();
    mem.write_slice(&request(3, BASE, 1), GuestAddress(REQ))
        .unwrap();
    let raw = [
        RawDescriptor::from(Descriptor::new(REQ, 24, NEXT, 1)),
        RawDescriptor::from(Descriptor::new(RESP, 10, WRITE, 0)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    // The same chain, made available 100 times.
    let posted = 100u16;
    for i in 0..posted {
        mock.avail().ring().ref_at(usize::from(i)).unwrap().store(0);
    }
    mock.avail().idx().store(posted);
    let first = s.dev.process_queue(0, &mem, &mut s.mm);
    assert!(first.queue && first.more, "{first:?}");
    assert_eq!(used_idx(), PASS_BUDGET as u16);
    let second = s.dev.process_queue(0, &mem, &mut s.mm);
    assert!(second.queue && !second.more, "{second:?}");
    assert_eq!(used_idx(), posted);
    assert_eq!(
        s.dev.metrics().state.ack,
        u64::from(posted),
        "{:?}",
        s.dev.metrics()
    );
}

/// A driver whose available index runs more than a queue ahead is broken: the queue is
/// given up (the driver is asked to reset) instead of logging an error per notification.
#[test]
fn an_available_index_beyond_the_queue_asks_for_a_reset() {
    let mut s = setup(64 * MIB);
    let mem = s.mem.clone();
    let drv = Driver::start(&mut s, &mem);
    drv.mock.avail().idx().store(QUEUE_SIZE + 1);
    let signal = s.dev.process_queue(0, &mem, &mut s.mm);
    assert!(signal.needs_reset && !signal.queue, "{signal:?}");
    assert_eq!(drv.mock.used().idx().load(), 0, "nothing popped");
}
