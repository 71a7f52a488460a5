//! virtio-balloon device tests on real guest memory and mock split queues.

use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::*;
use super::reuse::ReusePolicy;
use crate::arch::x86_64::layout::{GuestLayout, GuestRange};
use crate::devices::virtio::{Signal, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::{Backing, MemoryManager};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// 3 GiB below the hole plus 64 MiB above 4 GiB.
const RAM: u64 = (3 << 30) + 64 * MIB;
const HIGH_END: u64 = (4 << 30) + 64 * MIB;
const HOLE: u64 = 0xC000_0000;
const QUEUE_BASE: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const BUF: u64 = 0x10_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const ALL: [bool; 5] = [true; 5];

fn config(stats: bool, oom: bool, reporting: bool) -> BalloonConfig {
    BalloonConfig {
        on_reuse: ReusePolicy::Report,
        target_bytes: 0,
        deflate_on_oom: oom,
        free_page_reporting: reporting,
        stats_interval: stats.then_some(Duration::from_secs(1)),
        per_page_discard: false,
    }
}

struct Setup {
    mm: MemoryManager,
    mem: GuestMemoryMmap,
    dev: BalloonDevice,
}

fn setup(cfg: BalloonConfig) -> Setup {
    let mm = MemoryManager::new(GuestLayout::new(RAM)).unwrap();
    let mem = mm.guest_memory().clone();
    Setup {
        mm,
        mem,
        dev: BalloonDevice::new(cfg).unwrap(),
    }
}

/// One mock queue of the driver.
struct DriverQueue<'a> {
    index: usize,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
}

/// The driver side: acks every offered feature unless told otherwise and enables `enabled`.
fn start<'a>(
    s: &mut Setup,
    mem: &'a GuestMemoryMmap,
    features: u64,
    enabled: [bool; 5],
) -> Vec<Option<DriverQueue<'a>>> {
    assert!(s.dev.ack_features(features));
    let mut queues = Vec::new();
    let mut driver = Vec::new();
    for (index, on) in enabled.iter().enumerate() {
        if *on {
            let addr = QUEUE_BASE + index as u64 * 0x1000;
            let mock = MockSplitQueue::create(mem, GuestAddress(addr), QUEUE_SIZE);
            queues.push(mock.create_queue::<Queue>().unwrap());
            driver.push(Some(DriverQueue {
                index,
                mock,
                next_desc: 0,
            }));
        } else {
            queues.push(Queue::new(QUEUE_SIZE).unwrap());
            driver.push(None);
        }
    }
    s.dev.activate(queues).unwrap();
    driver
}

impl DriverQueue<'_> {
    /// Submits one chain (`next` fields point to the following descriptor) and processes it.
    fn submit(&mut self, s: &mut Setup, descs: &[(u64, u32, u16)]) -> Signal {
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
        s.dev.process_queue(self.index, &mem, &mut s.mm)
    }

    fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// (id, len) of used element `n`.
    fn used(&self, n: u16) -> (u32, u32) {
        let e = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(n % QUEUE_SIZE))
            .unwrap()
            .load();
        (e.id(), e.len())
    }
}

fn write_pfns(s: &Setup, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    s.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    bytes.len() as u32
}

/// Sends PFNs on queue `q`; checks the buffer came back with used len 0 and a signal.
fn send_pfns(s: &mut Setup, q: &mut DriverQueue, pfns: &[u32]) {
    let len = write_pfns(s, pfns);
    let before = q.used_idx();
    let signal = q.submit(s, &[(BUF, len, 0)]);
    assert_eq!(
        signal,
        Signal {
            queue: true,
            config: false,
            ..Signal::default()
        }
    );
    assert_eq!(q.used_idx(), before.wrapping_add(1));
    assert_eq!(q.used(before).1, 0);
}

fn touch(s: &Setup, gpa: u64, len: u64) {
    s.mem
        .write_slice(&vec![0xa5; len as usize], GuestAddress(gpa))
        .unwrap();
}

fn pfn(gpa: u64) -> u32 {
    (gpa / PAGE) as u32
}

fn take<'a>(q: &mut [Option<DriverQueue<'a>>], i: usize) -> DriverQueue<'a> {
    q[i].take().unwrap()
}

const BASIC: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_MUST_TELL_HOST;

#[test]
fn identity_features_and_config_space() {
    let mut s = setup(config(false, false, false));
    let d = &mut s.dev;
    assert_eq!(d.device_type(), 5);
    let sizes = d.queue_max_sizes();
    assert_eq!(sizes.len(), 5);
    assert!(sizes.iter().all(|q| *q > 0));
    assert!(
        sizes[3] >= 32 && sizes[4] >= 32,
        "reporting needs 32 entries"
    );
    assert_eq!(d.features(), BASIC);
    assert!(
        !d.ack_features(BASIC | VIRTIO_BALLOON_F_STATS_VQ),
        "not offered"
    );
    assert!(
        !d.ack_features(VIRTIO_BALLOON_F_MUST_TELL_HOST),
        "no VERSION_1"
    );
    assert!(
        d.ack_features(VIRTIO_F_VERSION_1),
        "MUST_TELL_HOST may be declined"
    );

    let d = BalloonDevice::new(config(true, true, true)).unwrap();
    let all = d.features();
    assert_eq!(
        all,
        BASIC
            | VIRTIO_BALLOON_F_STATS_VQ
            | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | VIRTIO_BALLOON_F_REPORTING
    );
    assert_eq!(
        all & (VIRTIO_BALLOON_F_FREE_PAGE_HINT | VIRTIO_BALLOON_F_PAGE_POISON),
        0
    );
    let d = BalloonDevice::new(config(false, true, false)).unwrap();
    assert_eq!(d.features(), BASIC | VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
}

fn config_u32(dev: &BalloonDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn target_and_actual_in_config_space() {
    let mut cfg = config(false, false, false);
    cfg.target_bytes = 3 * PAGE + 1;
    assert!(BalloonDevice::new(cfg.clone()).is_err());
    cfg.target_bytes = 64 * MIB;
    let mut d = BalloonDevice::new(cfg).unwrap();
    assert_eq!(config_u32(&d, 0), (64 * MIB / PAGE) as u32);
    assert_eq!(config_u32(&d, 4), 0);
    assert_eq!(
        d.set_target(128 * MIB).unwrap(),
        Signal {
            queue: false,
            config: true,
            ..Signal::default()
        }
    );
    assert_eq!(config_u32(&d, 0), 32768);
    assert!(d.set_target(PAGE + 512).is_err());
    assert!(d.set_target(MAX_TARGET_BYTES + PAGE).is_err());
    assert!(d.set_target(MAX_TARGET_BYTES).is_ok());
    assert_eq!(config_u32(&d, 0), u32::MAX);
    d.set_target(128 * MIB).unwrap();

    d.write_config(4, &1234u32.to_le_bytes());
    assert_eq!(config_u32(&d, 4), 1234);
    d.write_config(5, &[0x01]); // byte-wise write of the second byte
    assert_eq!(config_u32(&d, 4), 1234 & 0xff | 0x100);
    d.write_config(0, &7u32.to_le_bytes()); // num_pages is read-only for the driver
    d.write_config(u64::MAX, &[1, 2]);
    assert_eq!(config_u32(&d, 0), 32768);
    assert_eq!(d.status().actual_bytes, 0x1d2 * PAGE);
    assert_eq!(d.metrics().actual_writes, 2);
    let mut tail = [0xffu8; 12];
    d.read_config(8, &mut tail);
    assert_eq!(tail, [0; 12]);
    d.read_config(u64::MAX - 1, &mut tail);
    assert_eq!(tail, [0; 12]);
}

#[test]
fn inflate_merges_pfns_and_really_frees_memory() {
    let mut s = setup(config(false, false, false));
    let mem = s.mem.clone();
    let mut q = start(&mut s, &mem, BASIC, ALL);
    let mut inflate = take(&mut q, 0);
    let run = 8 * MIB;
    touch(&s, run, 2 * MIB);
    touch(&s, 32 * MIB, PAGE);
    assert_eq!(s.mm.resident_guest_pages(run, 2 * MIB), 512);
    // 512 pages in reverse order, one duplicate, and a lone page elsewhere.
    let mut pfns: Vec<u32> = (0..512).rev().map(|i| pfn(run) + i).collect();
    pfns.push(pfn(run) + 7);
    pfns.push(pfn(32 * MIB));
    send_pfns(&mut s, &mut inflate, &pfns);
    assert_eq!(s.mm.resident_guest_pages(run, 2 * MIB), 0);
    assert_eq!(s.mm.resident_guest_pages(32 * MIB, PAGE), 0);
    let m = s.dev.metrics();
    assert_eq!((m.discard_syscalls, m.discarded_bytes), (2, 2 * MIB + PAGE));
    assert_eq!(
        (m.pages_inflated, m.bad_pfns, m.inflate_requests),
        (513, 0, 1)
    );
    assert_eq!(s.dev.inflated_bytes(), 2 * MIB + PAGE);
    // Inflating the same page again does not grow the host's count.
    send_pfns(&mut s, &mut inflate, &[pfn(32 * MIB)]);
    assert_eq!(s.dev.inflated_bytes(), 2 * MIB + PAGE);
    assert_eq!(s.dev.metrics().pages_reinflated, 1);
    let st = s.dev.status();
    assert_eq!((st.inflated_bytes, st.actual_bytes), (2 * MIB + PAGE, 0));
    assert_eq!(st.discard_syscalls, 3);
}

#[test]
fn bad_pfns_are_counted_and_never_discarded() {
    let mut s = setup(config(false, false, false));
    let block = 2 * MIB;
    let base = s.mm.layout().hotplug_area.start;
    let id =
        s.mm.map_hotplug_region(
            GuestRange {
                start: base,
                size: 4 * block,
            },
            block,
            Backing::Anonymous,
            false,
        )
        .unwrap();
    s.mm.plug(id, 0, 1).unwrap();
    let mem = s.mm.guest_memory().clone();
    s.mem = mem.clone();
    let mut q = start(&mut s, &mem, BASIC, ALL);
    let mut inflate = take(&mut q, 0);
    let last_low = HOLE - PAGE;
    touch(&s, last_low, PAGE);
    touch(&s, HIGH_END - PAGE, PAGE);
    let good = [last_low, HIGH_END - PAGE, base];
    let bad = [
        HOLE,
        HOLE + 0x1000_0000,
        HIGH_END,
        base + block,
        u64::from(u32::MAX) * PAGE,
    ];
    let pfns: Vec<u32> = good.iter().chain(&bad).map(|g| pfn(*g)).collect();
    send_pfns(&mut s, &mut inflate, &pfns);
    let m = s.dev.metrics();
    assert_eq!(m.bad_pfns, bad.len() as u64);
    assert_eq!(m.pages_inflated, good.len() as u64);
    assert_eq!(s.dev.inflated_bytes(), 3 * PAGE);
    assert_eq!(s.mm.resident_guest_pages(last_low, PAGE), 0);
    assert_eq!(s.mm.resident_guest_pages(HIGH_END - PAGE, PAGE), 0);
    // The unplugged block was not touched (it would read as resident had it been written).
    assert_eq!(s.mm.plugged_bytes(id).unwrap(), block);
    assert_eq!(s.dev.status().bad_pfns, bad.len() as u64);
}

#[test]
fn deflate_counts_pages_back_and_audit_compares_claims() {
    let mut s = setup(config(false, true, false));
    let mem = s.mem.clone();
    let features = BASIC | VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    let mut q = start(&mut s, &mem, features, ALL);
    let (mut inflate, mut deflate) = (take(&mut q, 0), take(&mut q, 1));
    let first = pfn(16 * MIB);
    send_pfns(
        &mut s,
        &mut inflate,
        &(first..first + 8).collect::<Vec<_>>(),
    );
    // Guest has not written actual yet: the audit notes the mismatch.
    let note = s.dev.audit(0, RAM).unwrap();
    assert!(note.contains("claims"), "{note}");
    s.dev.write_config(4, &8u32.to_le_bytes());
    assert_eq!(s.dev.audit(0, RAM), None);
    // Deflate four of them, twice one of them, plus two pages never inflated.
    send_pfns(
        &mut s,
        &mut deflate,
        &[first, first + 1, first + 2, first + 3, first + 3, 7, 9],
    );
    let m = s.dev.metrics();
    assert_eq!((m.pages_deflated, m.pages_deflated_unknown), (4, 2));
    assert_eq!(s.dev.inflated_bytes(), 4 * PAGE);
    s.dev.write_config(4, &4u32.to_le_bytes());
    assert_eq!(s.dev.audit(RAM - 4 * PAGE, RAM), None);
    // RSS above RAM minus the balloon plus slack: the guest uses pages it gave away.
    let warning = s
        .dev
        .audit(RAM, RAM + AUDIT_SLACK_BYTES)
        .unwrap_or_default();
    assert_eq!(warning, "");
    let warning = s.dev.audit(RAM + AUDIT_SLACK_BYTES, RAM).unwrap();
    assert!(
        warning.contains("inflated pages") && warning.contains("MUST_TELL_HOST"),
        "{warning}"
    );
    // A device reset forgets the balloon: the guest owns everything again.
    s.dev.reset();
    assert_eq!(
        (s.dev.inflated_bytes(), s.dev.status().actual_bytes),
        (0, 0)
    );
}

#[test]
fn malformed_chains_are_counted_acked_and_harmless() {
    let mut s = setup(config(false, false, false));
    let mem = s.mem.clone();
    let mut q = start(&mut s, &mem, BASIC, ALL);
    let mut inflate = take(&mut q, 0);
    touch(&s, 8 * MIB, PAGE);
    write_pfns(&s, &[pfn(8 * MIB), pfn(8 * MIB)]);
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let cases: Vec<Vec<(u64, u32, u16)>> = vec![
        vec![(BUF, 8, WRITE)],                     // write-only inflate buffer
        vec![(HOLE, 8, 0)],                        // buffer in the hole
        vec![(HIGH_END - 4, 8, 0)],                // buffer crossing the end of RAM
        vec![(u64::MAX - 2, 8, 0)],                // wrapping buffer
        vec![(BUF, 6, 0)],                         // odd length
        vec![(BUF, 2 << 20, 0)],                   // larger than the cap
        vec![(BUF, 8, indirect)],                  // indirect (not offered)
        vec![(BUF, 4, NEXT), (BUF + 4, 4, WRITE)], // readable then writable
    ];
    for (i, chain) in cases.iter().enumerate() {
        let before = inflate.used_idx();
        let signal = inflate.submit(&mut s, chain);
        assert!(signal.queue, "case {i}: the buffer must still be returned");
        assert_eq!(inflate.used(before).1, 0);
        assert_eq!(
            s.dev.metrics().malformed,
            i as u64 + 1,
            "case {i}: {chain:?}"
        );
    }
    // A chain looping on itself and a next index beyond the queue.
    let head = inflate.next_desc;
    let looping = RawDescriptor::from(Descriptor::new(BUF, 4, NEXT, head));
    inflate.mock.add_desc_chains(&[looping], head).unwrap();
    assert!(s.dev.process_queue(0, &mem, &mut s.mm).queue);
    let beyond = RawDescriptor::from(Descriptor::new(BUF, 4, NEXT, 200));
    inflate.mock.add_desc_chains(&[beyond], head).unwrap();
    assert!(s.dev.process_queue(0, &mem, &mut s.mm).queue);
    assert_eq!(s.dev.metrics().malformed, cases.len() as u64 + 2);
    assert_eq!(s.dev.inflated_bytes(), 0);
    assert_eq!(s.dev.metrics().discard_syscalls, 0);
    assert_eq!(s.mm.resident_guest_pages(8 * MIB, PAGE), 1);
    // Two readable descriptors are fine: the PFN array may be split.
    inflate.next_desc = (head + 4) % QUEUE_SIZE;
    inflate.submit(&mut s, &[(BUF, 4, NEXT), (BUF + 4, 4, 0)]);
    assert_eq!(s.dev.inflated_bytes(), PAGE);
    assert_eq!(s.mm.resident_guest_pages(8 * MIB, PAGE), 0);
}

#[test]
fn rings_outside_guest_memory_are_not_touched() {
    let mut s = setup(config(false, false, false));
    let mem = s.mem.clone();
    let mut queues = Vec::new();
    for i in 0..5 {
        let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_BASE + i * 0x1000), QUEUE_SIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        if i == 0 {
            queue
                .try_set_desc_table_address(GuestAddress(HOLE))
                .unwrap();
        }
        queues.push(queue);
    }
    assert!(s.dev.ack_features(BASIC));
    s.dev.activate(queues).unwrap();
    assert_eq!(
        s.dev.process_queue(0, &mem, &mut s.mm),
        Signal {
            needs_reset: true,
            ..Signal::default()
        },
        "nothing touched; the driver is asked to reset"
    );
    assert_eq!(s.dev.metrics().bad_rings, 1);
}

fn stats_entry(tag: u16, value: u64) -> Vec<u8> {
    let mut e = tag.to_le_bytes().to_vec();
    e.extend_from_slice(&value.to_le_bytes());
    e
}

#[test]
fn stats_buffer_is_held_parsed_and_returned_on_request() {
    let mut s = setup(config(true, false, false));
    let mem = s.mem.clone();
    assert_eq!(
        s.dev.request_stats(&mem, &s.mm),
        Signal::default(),
        "not active"
    );
    let features = BASIC | VIRTIO_BALLOON_F_STATS_VQ;
    let mut q = start(&mut s, &mem, features, [true, true, true, false, false]);
    let mut stats = take(&mut q, STATS_QUEUE);
    let mut bytes = stats_entry(4, 100 * MIB);
    bytes.extend(stats_entry(5, 1 << 30));
    bytes.extend(stats_entry(10, 2));
    bytes.extend(stats_entry(77, 5)); // unknown tag: kept, not an error
    s.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let signal = stats.submit(&mut s, &[(BUF, bytes.len() as u32, 0)]);
    assert_eq!(
        signal,
        Signal::default(),
        "the buffer is held, not returned"
    );
    assert_eq!(stats.used_idx(), 0);
    let snap = s.dev.status().stats.unwrap();
    assert_eq!(snap.values["free_memory"], 100 * MIB);
    assert_eq!(snap.values["total_memory"], 1 << 30);
    assert_eq!(snap.values["oom_kills"], 2);
    assert_eq!(snap.values["tag_77"], 5);
    assert!(!snap.stale && snap.inconsistencies.is_empty() && snap.age < Duration::from_secs(5));

    assert_eq!(
        s.dev.request_stats(&mem, &s.mm),
        Signal {
            queue: true,
            config: false,
            ..Signal::default()
        }
    );
    assert_eq!((stats.used_idx(), stats.used(0)), (1, (0, 0)));
    assert_eq!(
        s.dev.request_stats(&mem, &s.mm),
        Signal::default(),
        "nothing held"
    );

    // A short buffer (half an entry) is accepted and yields no values.
    s.mem
        .write_slice(&[1, 0, 5, 0, 0], GuestAddress(BUF))
        .unwrap();
    stats.submit(&mut s, &[(BUF, 5, 0)]);
    assert!(s.dev.status().stats.unwrap().values.is_empty());
    let m = s.dev.metrics();
    assert_eq!((m.stats_updates, m.stats_irregular), (2, 2));
    // A second buffer without a poll: the first comes back at once.
    s.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let signal = stats.submit(&mut s, &[(BUF, 20, 0)]);
    assert!(signal.queue);
    assert_eq!((stats.used_idx(), stats.used(1)), (2, (4, 0)));
    // Stats in inaccessible memory are malformed and leave the last values in place.
    stats.submit(&mut s, &[(HOLE, 20, 0)]);
    assert_eq!(s.dev.metrics().malformed, 1);
    assert_eq!(s.dev.status().stats.unwrap().values.len(), 2);
}

#[test]
fn free_page_reports_are_discarded() {
    let mut s = setup(config(false, false, true));
    let mem = s.mem.clone();
    let features = BASIC | VIRTIO_BALLOON_F_REPORTING;
    let mut q = start(&mut s, &mem, features, ALL);
    assert_eq!(s.dev.status().reporting_queue, Some(REPORTING_QUEUE));
    let mut report = take(&mut q, REPORTING_QUEUE);
    touch(&s, 16 * MIB, 2 * MIB);
    touch(&s, 32 * MIB, 4 * MIB);
    let chain = [
        (16 * MIB, 2 * MIB as u32, WRITE | NEXT),
        (32 * MIB, 4 * MIB as u32, WRITE | NEXT),
        (HOLE, 2 * MIB as u32, WRITE), // not guest memory: refused
    ];
    assert!(report.submit(&mut s, &chain).queue);
    assert_eq!(report.used(0).1, 0);
    assert_eq!(s.mm.resident_guest_pages(16 * MIB, 2 * MIB), 0);
    assert_eq!(s.mm.resident_guest_pages(32 * MIB, 4 * MIB), 0);
    let m = s.dev.metrics();
    assert_eq!((m.reporting_requests, m.reported_bytes), (1, 6 * MIB));
    assert_eq!((m.reporting_rejected_ranges, m.discard_syscalls), (1, 2));
    assert_eq!(s.dev.status().reported_free_bytes, 6 * MIB);
    assert_eq!(
        s.dev.inflated_bytes(),
        0,
        "reported pages are not ballooned"
    );
    // A device-readable descriptor is not a report.
    touch(&s, 16 * MIB, PAGE);
    report.submit(&mut s, &[(16 * MIB, PAGE as u32, 0)]);
    assert_eq!(s.dev.metrics().malformed, 1);
    assert_eq!(s.mm.resident_guest_pages(16 * MIB, PAGE), 1);
}

#[test]
fn reporting_queue_is_whichever_the_driver_enabled() {
    let reporting = BASIC | VIRTIO_BALLOON_F_REPORTING;
    let stats = VIRTIO_BALLOON_F_STATS_VQ;
    // (features, enabled queues, expected reporting queue)
    let cases = [
        (reporting | stats, [true, true, true, false, true], Some(4)),
        (reporting | stats, [true, true, true, true, false], Some(3)),
        (reporting, [true, true, false, true, false], Some(3)),
        (reporting, [true, true, true, false, false], Some(2)), // pre-6.11 Linux numbering
        (reporting | stats, [true, true, true, false, false], None),
        (BASIC | stats, [true, true, true, false, true], None),
    ];
    for (i, (features, enabled, expect)) in cases.into_iter().enumerate() {
        let mut s = setup(config(true, false, true));
        let mem = s.mem.clone();
        let mut q = start(&mut s, &mem, features, enabled);
        assert_eq!(s.dev.status().reporting_queue, expect, "case {i}");
        if let Some(index) = expect {
            touch(&s, 16 * MIB, 2 * MIB);
            let mut report = take(&mut q, index);
            report.submit(&mut s, &[(16 * MIB, 2 * MIB as u32, WRITE)]);
            assert_eq!(s.dev.metrics().reported_bytes, 2 * MIB, "case {i}");
        } else {
            assert_eq!(s.dev.process_queue(4, &mem, &mut s.mm), Signal::default());
        }
    }
}

#[test]
fn activation_checks_and_unknown_queues() {
    let mut s = setup(config(false, false, false));
    let mem = s.mem.clone();
    assert_eq!(
        s.dev.process_queue(0, &mem, &mut s.mm),
        Signal::default(),
        "inactive"
    );
    assert!(s.dev.activate(vec![]).is_err());
    let unready: Vec<Queue> = (0..5).map(|_| Queue::new(QUEUE_SIZE).unwrap()).collect();
    assert!(s.dev.activate(unready).is_err());
    let mut q = start(&mut s, &mem, BASIC, ALL);
    assert_eq!(s.dev.process_queue(7, &mem, &mut s.mm), Signal::default());
    // Stats were not negotiated: queue 2 has no role.
    assert_eq!(s.dev.process_queue(2, &mem, &mut s.mm), Signal::default());
    let mut inflate = take(&mut q, 0);
    send_pfns(&mut s, &mut inflate, &[pfn(8 * MIB)]);
    assert_eq!(s.dev.inflated_bytes(), PAGE);
}

fn with_reuse(policy: ReusePolicy) -> BalloonConfig {
    BalloonConfig {
        on_reuse: policy,
        ..config(false, false, false)
    }
}

/// Exact cheating detection: a guest that writes to (or reads) pages it inflated is caught
/// page by page, with the pages' guest-physical ranges; untouched inflated pages are not
/// reported, and a deflate makes a page the guest's again.
#[test]
fn a_guest_touching_inflated_pages_is_caught_page_by_page() {
    let mut s = setup(with_reuse(ReusePolicy::Report));
    let mem = s.mem.clone();
    let mut q = start(&mut s, &mem, BASIC, ALL);
    let mut inflate = take(&mut q, 0);
    let mut deflate = take(&mut q, 1);
    let run = 8 * MIB;
    touch(&s, run, 2 * MIB);
    let mut pfns: Vec<u32> = (0..512).map(|i| pfn(run) + i).collect();
    pfns.push(pfn(32 * MIB));
    send_pfns(&mut s, &mut inflate, &pfns);
    assert!(!s.dev.scan_for_reuse(&s.mm));
    assert_eq!(s.dev.status().reused.reused_pages, 0, "nothing touched yet");
    // The guest writes two adjacent inflated pages and one elsewhere, and reads a fourth.
    touch(&s, run + 5 * PAGE, 2 * PAGE);
    touch(&s, 32 * MIB, 8);
    let _: u64 = mem.read_obj(GuestAddress(run + 100 * PAGE)).unwrap();
    assert!(!s.dev.scan_for_reuse(&s.mm), "report only");
    let reused = s.dev.status().reused;
    assert_eq!(reused.reused_pages, 3, "{reused:?}");
    assert_eq!(
        reused.reused_ranges,
        vec![
            GuestRange {
                start: run + 5 * PAGE,
                size: 2 * PAGE
            },
            GuestRange {
                start: 32 * MIB,
                size: PAGE
            }
        ]
    );
    assert!(
        reused.refaulted_zero_pages >= 1,
        "the read page holds host memory again, but was not written: {reused:?}"
    );
    assert_eq!(reused.chunks_scanned, 2);
    assert_eq!(s.dev.metrics().reuse_detections, 1);
    assert_eq!(
        s.dev.inflated_bytes(),
        2 * MIB + PAGE,
        "report keeps counting"
    );
    // Deflating two of them first is the honest way: they are no longer reported.
    send_pfns(&mut s, &mut deflate, &[pfn(run) + 5, pfn(run) + 6]);
    s.dev.scan_for_reuse(&s.mm);
    assert_eq!(s.dev.status().reused.reused_pages, 1);
}

#[test]
fn reuse_policies_stop_and_uncount() {
    for policy in [ReusePolicy::Stop, ReusePolicy::Uncount] {
        let mut s = setup(with_reuse(policy));
        let mem = s.mem.clone();
        let mut q = start(&mut s, &mem, BASIC, ALL);
        let mut inflate = take(&mut q, 0);
        let pfns: Vec<u32> = (0..16).map(|i| pfn(8 * MIB) + i).collect();
        send_pfns(&mut s, &mut inflate, &pfns);
        assert!(!s.dev.scan_for_reuse(&s.mm), "{policy:?}: clean");
        touch(&s, 8 * MIB, 4 * PAGE);
        let stop = s.dev.scan_for_reuse(&s.mm);
        assert_eq!(stop, policy == ReusePolicy::Stop, "{policy:?}");
        let expected = if policy == ReusePolicy::Uncount {
            12
        } else {
            16
        };
        assert_eq!(s.dev.inflated_bytes(), expected * PAGE, "{policy:?}");
    }
}

/// Hostile-guest defect 5: inflated pages inside memory that later leaves the guest (a
/// virtio-mem block unplugged, a DIMM ejected) stayed in the host's count. The reuse scan
/// drops them.
#[test]
fn inflated_pages_in_unplugged_memory_leave_the_count() {
    let mut s = setup(with_reuse(ReusePolicy::Report));
    let start_gpa = s.mm.layout().hotplug_area.start;
    let id =
        s.mm.map_hotplug_region(
            GuestRange {
                start: start_gpa,
                size: 4 * MIB,
            },
            2 * MIB,
            Backing::Anonymous,
            false,
        )
        .unwrap();
    s.mm.plug(id, 0, 2).unwrap();
    let mem = s.mm.guest_memory().clone();
    s.mem = mem.clone();
    let mut q = start(&mut s, &mem, BASIC, ALL);
    let mut inflate = take(&mut q, 0);
    let pfns: Vec<u32> = (0..8)
        .map(|i| pfn(start_gpa) + i)
        .chain([pfn(start_gpa + 2 * MIB)])
        .collect();
    send_pfns(&mut s, &mut inflate, &pfns);
    assert_eq!(s.dev.inflated_bytes(), 9 * PAGE);
    s.mm.unplug(id, 0, 1).unwrap();
    s.dev.scan_for_reuse(&s.mm);
    assert_eq!(
        s.dev.inflated_bytes(),
        PAGE,
        "the unplugged block's 8 pages are gone"
    );
    assert_eq!(s.dev.metrics().pages_pruned, 8);
    assert_eq!(s.dev.status().reused.reused_pages, 0, "pruned, not reused");
}

/// The cost of the reuse scan: one mincore per 2 MiB chunk. Printed for the record (run
/// with `--release --nocapture` for figures worth quoting).
#[test]
fn reuse_scan_cost_per_gib_inflated() {
    let mut s = setup(with_reuse(ReusePolicy::Report));
    let mem = s.mem.clone();
    let mut q = start(&mut s, &mem, BASIC, ALL);
    let mut inflate = take(&mut q, 0);
    let pfns: Vec<u32> = (0..(1 << 18)).map(|i| pfn(64 * MIB) + i).collect();
    send_pfns(&mut s, &mut inflate, &pfns);
    assert_eq!(s.dev.inflated_bytes(), 1 << 30);
    let started = std::time::Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        s.dev.scan_for_reuse(&s.mm);
    }
    let per_scan = started.elapsed() / rounds;
    assert_eq!(s.dev.status().reused.chunks_scanned, 512);
    assert_eq!(s.dev.status().reused.reused_pages, 0);
    println!("reuse scan of 1 GiB inflated (512 chunks): {per_scan:?} per scan");
}
