//! Stateful fuzzing of the virtio-balloon device over real guest memory.
//!
//! Each input builds a fresh `MemoryManager` (64 MiB of boot RAM and a 16 MiB hotplug region
//! of 2 MiB blocks, some plugged, the rest `PROT_NONE`), activates a balloon with inflate,
//! deflate, stats and reporting queues (rings in boot RAM), and runs an input-chosen sequence
//! of operations: PFN arrays for inflate and deflate (well-formed or from arbitrary
//! descriptors), statistics buffers, free page reports, queue passes, stats polls, reuse
//! scans, plugs and unplugs of hotplug blocks under the balloon, device resets, and direct
//! `discard_ranges` calls on the manager.
//!
//! Invariants checked after every operation:
//! - the host's inflated count never exceeds the guest's memory, and after a reuse scan it
//!   never exceeds the memory the guest owns now;
//! - while the target can predict it (only well-formed requests, no discard of the harness's
//!   own pages), the inflated count is exactly the set of accessible pages inflated minus
//!   those deflated;
//! - the used rings only return heads that were made available;
//! - a direct discard rejects exactly the ranges `is_discardable` refuses (so never touches
//!   memory outside boot RAM and plugged blocks, per `DiscardOutcome`), releases exactly the
//!   bytes of the valid ranges, zeroes them, leaves the neighbouring pages alone, and changes
//!   no plug state.

#![no_main]

#[path = "common/split_ring.rs"]
mod split_ring;

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use split_ring::{guarded_read, guarded_write, Ring, F_NEXT, F_WRITE};
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::virtio::balloon::device::{
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
};
use tidevm_vmm::devices::virtio::balloon::{BalloonConfig, BalloonDevice, ReusePolicy};
use tidevm_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use tidevm_vmm::memory::{Backing, HotplugRegionId, MemoryManager};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const RAM: u64 = 64 * MIB;
const BLOCK: u64 = 2 * MIB;
const BLOCKS: u64 = 8;
const QUEUE_MAX: [u16; 5] = [256, 256, 64, 128, 128];
const RING_SIZE: u16 = 16;
const RINGS: u64 = 0x1_0000;
const BUFS: u64 = 0x20_0000;
/// The harness's own pages (rings and request buffers): a discard there changes what the
/// driver posted, so the model gives up.
const HARNESS_END: u64 = 0x40_0000;

/// A 4 KiB page chosen by the input.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pfn {
    Ram(u16),
    Block(u8, u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct RawDesc {
    addr: Pfn,
    offset: u16,
    len: u16,
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A well-formed PFN array on queue 0 (inflate) or 1 (deflate), in `split` descriptors.
    Pfns {
        deflate: bool,
        pfns: Vec<Pfn>,
        run: u8,
        split: u8,
    },
    /// Arbitrary descriptors on queue `queue`.
    Chain {
        queue: u8,
        descs: Vec<RawDesc>,
        head: u8,
    },
    Stats {
        bytes: Vec<u8>,
    },
    Report {
        ranges: Vec<(Pfn, u16)>,
    },
    Process {
        queue: u8,
    },
    RequestStats,
    Scan,
    Plug {
        first: u8,
        count: u8,
    },
    Unplug {
        first: u8,
        count: u8,
    },
    Reset,
    SetTarget(u32),
    WriteActual {
        offset: u8,
        bytes: Vec<u8>,
    },
    Discard {
        ranges: Vec<(Pfn, u16, u8)>,
        per_page: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    plugged: u8,
    memfd: bool,
    features: u8,
    policy: u8,
    per_page: bool,
    ops: Vec<Op>,
}

#[derive(Debug)]
enum Effect {
    Inflate(Vec<u64>),
    Deflate(Vec<u64>),
    Unknown,
}

struct World {
    mm: MemoryManager,
    mem: GuestMemoryMmap,
    dev: BalloonDevice,
    id: HotplugRegionId,
    base: u64,
    features: u64,
    rings: Vec<Option<Ring>>,
    pending: Vec<VecDeque<Effect>>,
    /// The pages the host should count as inflated, while predictable.
    model: Option<BTreeSet<u64>>,
    uncount: bool,
}

impl World {
    fn pfn(&self, p: Pfn) -> u64 {
        match p {
            Pfn::Ram(i) => u64::from(i) % (RAM / PAGE),
            Pfn::Block(b, i) => {
                (self.base + u64::from(b) % (BLOCKS + 1) * BLOCK) / PAGE + u64::from(i) % 512
            }
            Pfn::Raw(r) => u64::from(r),
        }
    }

    fn activate(&mut self) {
        self.dev.reset();
        assert!(self.dev.ack_features(self.features));
        let mut queues = Vec::new();
        self.rings.clear();
        for (i, max) in QUEUE_MAX.iter().enumerate() {
            let ring = Ring::at(RINGS + i as u64 * 0x1000, RING_SIZE);
            ring.clear(&self.mem, &self.mm);
            let q = ring.queue(*max, &self.mem, &self.mm).unwrap();
            queues.push(q);
            self.rings.push(Some(ring));
        }
        // The free page hint queue is never enabled by Linux.
        queues[3] = Queue::new(QUEUE_MAX[3]).unwrap();
        self.rings[3] = None;
        self.dev.activate(queues).unwrap();
        self.pending = (0..5).map(|_| VecDeque::new()).collect();
        self.model = Some(BTreeSet::new());
    }

    fn post(&mut self, q: usize, descs: &[(u64, u32, u16)], effect: Effect) {
        let Some(ring) = self.rings[q].as_mut() else {
            return;
        };
        // Four chains of four descriptors fill the table: never overwrite one still posted.
        if ring.outstanding.len() >= 4 {
            return;
        }
        let head = ring.avail_idx.wrapping_mul(4) % ring.size;
        for (i, &(addr, len, flags)) in descs.iter().take(4).enumerate() {
            let index = (head + i as u16) % ring.size;
            let next = (index + 1) % ring.size;
            ring.write_desc(&self.mem, &self.mm, index, (addr, len, flags, next));
        }
        if ring.post(&self.mem, &self.mm, head) {
            self.pending[q].push_back(effect);
        }
    }

    fn harness_touched(&mut self, start: u64, len: u64) {
        if start < HARNESS_END && len > 0 {
            self.model = None;
            for r in self.rings.iter_mut().flatten() {
                r.tainted = true;
            }
        }
    }

    fn process(&mut self, q: usize) {
        let mem = self.mem.clone();
        let _ = self.dev.process_queue(q, &mem, &mut self.mm);
        self.collect(q);
    }

    fn collect(&mut self, q: usize) {
        let Some(ring) = self.rings[q].as_mut() else {
            return;
        };
        let used = ring.take_used(&self.mem, &self.mm);
        let Some(used) = used else {
            self.model = None;
            return;
        };
        if q > 1 {
            return;
        }
        for _ in &used {
            let effect = self.pending[q].pop_front().unwrap_or(Effect::Unknown);
            match (effect, self.model.as_mut()) {
                (Effect::Inflate(pfns), Some(model)) => {
                    for pfn in pfns {
                        if self.mm.is_discardable(GuestRange {
                            start: pfn * PAGE,
                            size: PAGE,
                        }) {
                            model.insert(pfn);
                        }
                    }
                }
                (Effect::Deflate(pfns), Some(model)) => {
                    for pfn in pfns {
                        model.remove(&pfn);
                    }
                }
                (Effect::Unknown, _) => self.model = None,
                (_, None) => {}
            }
        }
    }

    fn check(&self) {
        let inflated = self.dev.status().inflated_bytes;
        assert!(
            inflated <= RAM + BLOCKS * BLOCK,
            "inflated {inflated:#x} exceeds all guest memory"
        );
        if let Some(model) = &self.model {
            assert_eq!(
                inflated,
                model.len() as u64 * PAGE,
                "host's inflated count disagrees with the model"
            );
        }
    }

    fn discard(&mut self, ranges: &[(Pfn, u16, u8)], per_page: bool) {
        let ranges: Vec<GuestRange> = ranges
            .iter()
            .take(16)
            .map(|&(p, pages, skew)| GuestRange {
                start: (self.pfn(p) * PAGE).wrapping_add(u64::from(skew % 4) * 1024),
                size: u64::from(pages % 1024) * PAGE + u64::from(skew / 64) * 512,
            })
            .collect();
        let valid: Vec<GuestRange> = ranges
            .iter()
            .copied()
            .filter(|r| self.mm.is_discardable(*r))
            .collect();
        let rejected: Vec<GuestRange> = ranges
            .iter()
            .copied()
            .filter(|r| !self.mm.is_discardable(*r))
            .collect();
        for r in &valid {
            self.harness_touched(r.start, r.size);
        }
        // Marks: the first byte of each valid range, and canaries in the accessible pages
        // next to them that no valid range covers.
        let covered = |page: u64| valid.iter().any(|r| page >= r.start && page < r.end());
        let mut canaries = Vec::new();
        for r in &valid {
            for page in [r.start.wrapping_sub(PAGE), r.end()] {
                if page >= HARNESS_END && !covered(page) && self.mm.is_accessible(page, PAGE) {
                    canaries.push(page);
                }
            }
        }
        for r in &valid {
            assert!(guarded_write(&self.mem, &self.mm, r.start, &[0x5a]));
        }
        for &page in &canaries {
            assert!(guarded_write(&self.mem, &self.mm, page, &[0xa5]));
        }
        let plugged_before: Vec<bool> = (0..BLOCKS)
            .map(|b| self.mm.is_accessible(self.base + b * BLOCK, BLOCK))
            .collect();
        let outcome = if per_page {
            self.mm.discard_ranges_per_page(&ranges)
        } else {
            self.mm.discard_ranges(&ranges)
        }
        .expect("discarding valid anonymous/memfd ranges fails");
        assert_eq!(outcome.rejected, rejected, "rejected ranges");
        assert_eq!(outcome.ranges_rejected, rejected.len() as u64);
        assert_eq!(outcome.ranges_discarded, valid.len() as u64);
        let expected_bytes = if per_page {
            valid.iter().map(|r| r.size).sum::<u64>()
        } else {
            // The union of the valid ranges.
            let mut pages = BTreeSet::new();
            for r in &valid {
                pages.extend((r.start / PAGE)..(r.end() / PAGE));
            }
            pages.len() as u64 * PAGE
        };
        assert_eq!(outcome.bytes_discarded, expected_bytes, "bytes discarded");
        for r in &valid {
            let mut b = [0xffu8];
            assert!(guarded_read(&self.mem, &self.mm, r.start, &mut b));
            assert_eq!(b[0], 0, "discarded page {:#x} not zero", r.start);
        }
        for &page in &canaries {
            let mut b = [0u8];
            assert!(guarded_read(&self.mem, &self.mm, page, &mut b));
            assert_eq!(
                b[0], 0xa5,
                "page {page:#x} next to a discarded range lost its data"
            );
        }
        let plugged_after: Vec<bool> = (0..BLOCKS)
            .map(|b| self.mm.is_accessible(self.base + b * BLOCK, BLOCK))
            .collect();
        assert_eq!(
            plugged_before, plugged_after,
            "a discard changed plug state"
        );
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Pfns {
                deflate,
                ref pfns,
                run,
                split,
            } => {
                let mut list: Vec<u64> = Vec::new();
                for p in pfns.iter().take(64) {
                    let first = self.pfn(*p);
                    for i in 0..u64::from(run % 8) + 1 {
                        list.push(first.wrapping_add(i) & u64::from(u32::MAX));
                    }
                }
                let bytes: Vec<u8> = list
                    .iter()
                    .flat_map(|p| (*p as u32).to_le_bytes())
                    .collect();
                let q = usize::from(deflate);
                // Each chain in flight has its own buffer: chain slot = avail index % 4 (see
                // `post`), so a later request never rewrites one not yet processed.
                let Some(ring) = self.rings[q].as_ref() else {
                    return;
                };
                if ring.outstanding.len() >= 4 {
                    return; // `post` would refuse it: do not rewrite a buffer still posted
                }
                let slot = ring.avail_idx % 4;
                let buf = BUFS + q as u64 * 0x4000 + u64::from(slot) * 0x1000;
                if !guarded_write(&self.mem, &self.mm, buf, &bytes) {
                    return;
                }
                // Split the array over up to 4 descriptors at 4-byte boundaries.
                let parts = usize::from(split % 4) + 1;
                let words = list.len().div_ceil(parts).max(1);
                let descs: Vec<(u64, u32, u16)> = (0..parts)
                    .map(|i| {
                        let start = (i * words).min(list.len());
                        let end = ((i + 1) * words).min(list.len());
                        let flags = if i + 1 < parts { F_NEXT } else { 0 };
                        (buf + 4 * start as u64, 4 * (end - start) as u32, flags)
                    })
                    .collect();
                if !deflate {
                    // Inflating the harness's own pages zeroes rings and buffers.
                    for p in &list {
                        self.harness_touched(p * PAGE, PAGE);
                    }
                }
                let effect = if deflate {
                    Effect::Deflate(list)
                } else {
                    Effect::Inflate(list)
                };
                self.post(q, &descs, effect);
            }
            Op::Chain {
                queue,
                ref descs,
                head,
            } => {
                let q = usize::from(queue % 5);
                let descs: Vec<(u64, u32, u16, u16)> = descs
                    .iter()
                    .take(usize::from(RING_SIZE))
                    .map(|d| {
                        let addr = (self.pfn(d.addr) * PAGE).wrapping_add(u64::from(d.offset));
                        let next = u16::from(d.next) % (RING_SIZE + 2);
                        (addr, u32::from(d.len), u16::from(d.flags & 7), next)
                    })
                    .collect();
                // The descriptors overwrite those of chains still posted, and inflates and
                // reports discard whatever they name (the rings too).
                self.model = None;
                if q == 0 || q == 4 || q == 2 {
                    for r in self.rings.iter_mut().flatten() {
                        r.tainted = true;
                    }
                }
                let Some(ring) = self.rings[q].as_mut() else {
                    return;
                };
                for (i, d) in descs.iter().enumerate() {
                    ring.write_desc(&self.mem, &self.mm, i as u16, *d);
                }
                let head = u16::from(head) % RING_SIZE;
                if ring.post(&self.mem, &self.mm, head) {
                    self.pending[q].push_back(Effect::Unknown);
                }
            }
            Op::Stats { ref bytes } => {
                let bytes = &bytes[..bytes.len().min(200)];
                let buf = BUFS + 0x1_0000;
                guarded_write(&self.mem, &self.mm, buf, bytes);
                self.post(2, &[(buf, bytes.len() as u32, 0)], Effect::Unknown);
            }
            Op::Report { ref ranges } => {
                let descs: Vec<(u64, u32, u16)> = ranges
                    .iter()
                    .take(4)
                    .enumerate()
                    .map(|(i, &(p, pages))| {
                        let flags = F_WRITE
                            | if i + 1 < ranges.len().min(4) {
                                F_NEXT
                            } else {
                                0
                            };
                        (self.pfn(p) * PAGE, u32::from(pages % 1024) * 4096, flags)
                    })
                    .collect();
                for &(addr, len, _) in &descs {
                    self.harness_touched(addr, u64::from(len));
                }
                // Reports go to whichever queue the device picked: 4 when enabled.
                self.post(4, &descs, Effect::Unknown);
            }
            Op::Process { queue } => self.process(usize::from(queue % 5)),
            Op::RequestStats => {
                let mem = self.mem.clone();
                let _ = self.dev.request_stats(&mem, &self.mm);
                self.collect(2);
            }
            Op::Scan => {
                let _stop = self.dev.scan_for_reuse(&self.mm);
                let owned = RAM + self.mm.plugged_bytes(self.id).unwrap();
                let inflated = self.dev.status().inflated_bytes;
                assert!(
                    inflated <= owned,
                    "after a scan, inflated {inflated:#x} > owned memory {owned:#x}"
                );
                if self.uncount {
                    self.model = None;
                }
                if let Some(model) = self.model.as_mut() {
                    let mm = &self.mm;
                    model.retain(|pfn| mm.is_accessible(pfn * PAGE, PAGE));
                }
            }
            Op::Plug { first, count } => {
                let _ = self
                    .mm
                    .plug(self.id, u64::from(first), u64::from(count % 4));
            }
            Op::Unplug { first, count } => {
                // The harness's rings and buffers are in boot RAM, never unplugged.
                let _ = self
                    .mm
                    .unplug(self.id, u64::from(first), u64::from(count % 4));
            }
            Op::Reset => self.activate(),
            Op::SetTarget(pages) => {
                self.dev.set_target(u64::from(pages) * PAGE).unwrap();
            }
            Op::WriteActual { offset, ref bytes } => {
                self.dev
                    .write_config(u64::from(offset % 16), &bytes[..bytes.len().min(8)]);
            }
            Op::Discard {
                ref ranges,
                per_page,
            } => self.discard(ranges, per_page),
        }
    }
}

fuzz_target!(|input: Input| {
    let mut mm = MemoryManager::new(GuestLayout::new(RAM)).unwrap();
    let base = mm.layout().hotplug_area.start;
    let backing = if input.memfd {
        Backing::Memfd
    } else {
        Backing::Anonymous
    };
    let id = mm
        .map_hotplug_region(
            GuestRange {
                start: base,
                size: BLOCKS * BLOCK,
            },
            BLOCK,
            backing,
            false,
        )
        .unwrap();
    for b in 0..BLOCKS {
        if input.plugged & (1 << b) != 0 {
            mm.plug(id, b, 1).unwrap();
        }
    }
    let policy = match input.policy % 3 {
        0 => ReusePolicy::Report,
        1 => ReusePolicy::Stop,
        _ => ReusePolicy::Uncount,
    };
    let dev = BalloonDevice::new(BalloonConfig {
        target_bytes: 0,
        deflate_on_oom: input.features & 1 != 0,
        free_page_reporting: true,
        stats_interval: Some(Duration::from_secs(1)),
        per_page_discard: input.per_page,
        on_reuse: policy,
    })
    .unwrap();
    let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING | VIRTIO_BALLOON_F_STATS_VQ;
    if input.features & 1 != 0 {
        features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    }
    if input.features & 2 != 0 {
        features |= VIRTIO_BALLOON_F_MUST_TELL_HOST;
    }
    let mem = mm.guest_memory().clone();
    let mut w = World {
        mm,
        mem,
        dev,
        id,
        base,
        features,
        rings: Vec::new(),
        pending: Vec::new(),
        model: None,
        uncount: policy == ReusePolicy::Uncount,
    };
    w.activate();
    for op in input.ops.iter().take(64) {
        w.run(op);
        w.check();
    }
});
