//! The virtio-balloon device: config space, feature negotiation, queue roles and request
//! handling.
//!
//! Queues sit at the spec indices (0 inflate, 1 deflate, 2 stats, 3 free page hint, 4
//! reporting). Hinting is never offered, but queue 3 keeps a usable size: Linux before the
//! "fix vq # for balloon" change numbered only negotiated queues, and current Linux falls back
//! to reporting at index 3 (QEMU's historic layout), so the reporting queue is whichever of
//! 2/3/4 the driver enabled, decided at activation.

use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::chain::{
    complete, rings_accessible, run_pass, Completion, PASS_BUDGET,
};

use super::metrics::BalloonMetrics;
use super::pages::InflatedPages;
use super::request::{
    pfns_to_ranges, read_buffers, read_pfns, reported_ranges, split_accessible, walk_chain,
    DescriptorTable, RequestError, BALLOON_PAGE_SIZE, PFN_SHIFT,
};
use super::reuse::{self, ReusePolicy, ReuseScan};
use super::stats::{parse_stats, ReceivedStats, StatsSnapshot, ENTRY_SIZE, MAX_ENTRIES};
use crate::arch::x86_64::layout::GuestRange;
use crate::devices::virtio::{
    read_config_space, ActivateError, Signal, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::{DiscardOutcome, MemoryManager};

/// Virtio device ID of the traditional balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The driver must tell the host before reusing deflated pages.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
/// A statistics queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate on OOM.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Free page hinting (migration only; never offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Page poisoning (never offered: reported pages would have to be kept).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u64 = 1 << 4;
/// Free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Queue indices as the spec numbers them.
pub const INFLATE_QUEUE: usize = 0;
/// Deflate queue index.
pub const DEFLATE_QUEUE: usize = 1;
/// Statistics queue index.
pub const STATS_QUEUE: usize = 2;
/// Free page hint queue index (kept for layout; never used).
pub const FREE_PAGE_HINT_QUEUE: usize = 3;
/// Reporting queue index in the spec layout.
pub const REPORTING_QUEUE: usize = 4;
/// Queue sizes. Reporting needs >= 32 (`PAGE_REPORTING_CAPACITY`) wherever Linux puts it, so
/// queue 3 (fallback layout) gets the same size as queue 4.
const QUEUE_SIZES: [u16; 5] = [256, 256, 64, 128, 128];
/// Size of the config space (num_pages, actual, free_page_hint_cmd_id, poison_val).
pub const CONFIG_SIZE: usize = 16;
/// Largest target: `num_pages` is a u32 of 4 KiB pages (16 TiB).
pub const MAX_TARGET_BYTES: u64 = (u32::MAX as u64) << PFN_SHIFT;
/// RSS above what the balloon leaves the guest that [`BalloonDevice::audit`] tolerates: VMM
/// buffers, page tables and THP rounding inside guest mappings.
pub const AUDIT_SLACK_BYTES: u64 = 64 << 20;

/// How a balloon is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target balloon size in bytes (a multiple of 4 KiB).
    pub target_bytes: u64,
    /// Offer DEFLATE_ON_OOM: the guest may take pages back under memory pressure.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Offer the stats queue; the VMM calls [`BalloonDevice::request_stats`] this often.
    pub stats_interval: Option<Duration>,
    /// Discard every 4 KiB page with its own syscall instead of merging contiguous pages
    /// (QEMU's way; for benchmarks only).
    pub per_page_discard: bool,
    /// What to do when the guest touches pages it inflated.
    pub on_reuse: ReusePolicy,
}

/// Errors of the balloon's host API.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A target the device cannot express.
    #[error("balloon target {0:#x} must be a multiple of 4 KiB and at most 16 TiB")]
    Target(u64),
}

/// What the host API sees of the balloon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonStatus {
    /// Requested balloon size.
    pub target_bytes: u64,
    /// Balloon size the guest claims (`actual`, driver-written, unverified).
    pub actual_bytes: u64,
    /// Balloon size by the host's own count (acked inflates minus deflates, unique pages).
    pub inflated_bytes: u64,
    /// Host memory released (inflates and free page reports).
    pub discarded_bytes: u64,
    /// Bytes released through free page reporting.
    pub reported_free_bytes: u64,
    /// Inflated PFNs refused (outside guest-owned memory).
    pub bad_pfns: u64,
    /// Discard syscalls made.
    pub discard_syscalls: u64,
    /// Time spent in those syscalls.
    pub discard_time: Duration,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The queue index serving free page reporting, once active.
    pub reporting_queue: Option<usize>,
    /// Last statistics, if any arrived.
    pub stats: Option<StatsSnapshot>,
    /// Inflated pages found resident again by the last reuse scan (the guest used them
    /// without deflating), with their first ranges.
    pub reused: ReuseScan,
}

/// What a queue is used for after activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// A virtio-balloon device.
#[derive(Debug)]
pub struct BalloonDevice {
    config: BalloonConfig,
    acked_features: u64,
    /// Guest-written `actual`, in pages.
    actual_pages: u32,
    /// Queues by index, with their role; `None` when not enabled or not active.
    queues: Vec<Option<(Role, Queue)>>,
    inflated: InflatedPages,
    /// Head of the stats buffer the device holds until the next poll.
    stats_buffer: Option<u16>,
    stats: Option<ReceivedStats>,
    metrics: BalloonMetrics,
    /// The last reuse scan.
    last_scan: ReuseScan,
}

impl BalloonDevice {
    /// Creates a device; no queue runs until the driver activates it.
    pub fn new(config: BalloonConfig) -> Result<Self, BalloonError> {
        check_target(config.target_bytes)?;
        Ok(BalloonDevice {
            config,
            acked_features: 0,
            actual_pages: 0,
            queues: Vec::new(),
            inflated: InflatedPages::default(),
            stats_buffer: None,
            stats: None,
            metrics: BalloonMetrics::default(),
            last_scan: ReuseScan::default(),
        })
    }

    /// Asks the guest for a balloon of `bytes`. Returns the interrupt to raise.
    pub fn set_target(&mut self, bytes: u64) -> Result<Signal, BalloonError> {
        check_target(bytes)?;
        self.config.target_bytes = bytes;
        Ok(Signal {
            config: true,
            ..Signal::default()
        })
    }

    /// The stats polling interval, if the stats queue is offered.
    pub fn stats_interval(&self) -> Option<Duration> {
        self.config.stats_interval
    }

    /// The device as the API shows it.
    pub fn status(&self) -> BalloonStatus {
        BalloonStatus {
            target_bytes: self.config.target_bytes,
            actual_bytes: u64::from(self.actual_pages) * BALLOON_PAGE_SIZE,
            inflated_bytes: self.inflated_bytes(),
            discarded_bytes: self.metrics.discarded_bytes,
            reported_free_bytes: self.metrics.reported_bytes,
            bad_pfns: self.metrics.bad_pfns,
            discard_syscalls: self.metrics.discard_syscalls,
            discard_time: self.metrics.discard_time,
            acked_features: self.acked_features,
            reporting_queue: self.index_of(Role::Reporting),
            stats: self
                .stats
                .as_ref()
                .map(|s| s.snapshot(self.config.stats_interval)),
            reused: self.last_scan.clone(),
        }
    }

    /// Looks for inflated pages the guest touched again, and drops pages that are no longer
    /// guest memory from the host's count (see [`reuse`](super::reuse)). Returns whether the
    /// policy asks to stop the VM. Cost: one `mincore` per 2 MiB chunk holding inflated pages.
    pub fn scan_for_reuse(&mut self, memory: &MemoryManager) -> bool {
        let uncount = self.config.on_reuse == ReusePolicy::Uncount;
        let scan = reuse::scan(&mut self.inflated, memory, uncount);
        self.metrics.pages_pruned += scan.pruned_pages;
        if scan.reused_pages > self.last_scan.reused_pages || uncount && scan.reused_pages > 0 {
            self.metrics.reuse_detections += 1;
            crate::guest_warn!(
                "virtio-balloon: the guest touched {} inflated pages without deflating them, \
                 first at {:?}",
                scan.reused_pages,
                scan.reused_ranges.first()
            );
        }
        if uncount {
            self.metrics.pages_reused_uncounted += scan.reused_pages;
        }
        let stop = self.config.on_reuse == ReusePolicy::Stop && scan.reused_pages > 0;
        self.last_scan = scan;
        stop
    }

    /// The device's counters.
    pub fn metrics(&self) -> &BalloonMetrics {
        &self.metrics
    }

    /// Host's count of inflated bytes.
    pub fn inflated_bytes(&self) -> u64 {
        self.inflated.len() * BALLOON_PAGE_SIZE
    }

    /// Trust but verify: compares the guest's claims with what the host sees. Returns a
    /// description of every discrepancy, or `None`.
    ///
    /// `host_guest_rss_bytes` is the resident host memory of guest mappings; `ram_bytes` the
    /// memory the guest legitimately owns (boot RAM plus plugged hotplug memory). RSS above
    /// `ram_bytes - inflated` (plus [`AUDIT_SLACK_BYTES`]) means the guest touches pages it
    /// gave to the balloon. A guest `actual` different from the host's count means it claims
    /// a balloon it did not give (or the driver has not updated `actual` yet, if the VMM calls
    /// this in the middle of an inflate).
    pub fn audit(&self, host_guest_rss_bytes: u64, ram_bytes: u64) -> Option<String> {
        let mut notes = Vec::new();
        let inflated = self.inflated_bytes();
        let allowed = ram_bytes.saturating_sub(inflated);
        if host_guest_rss_bytes > allowed.saturating_add(AUDIT_SLACK_BYTES) {
            let rule = if self.acked_features & VIRTIO_BALLOON_F_MUST_TELL_HOST != 0 {
                "it agreed to MUST_TELL_HOST"
            } else {
                "it did not deflate first"
            };
            notes.push(format!(
                "guest memory RSS {host_guest_rss_bytes:#x} exceeds RAM {ram_bytes:#x} minus \
                 balloon {inflated:#x} by {:#x}: the guest is using inflated pages ({rule})",
                host_guest_rss_bytes - allowed
            ));
        }
        let actual = u64::from(self.actual_pages) * BALLOON_PAGE_SIZE;
        if actual != inflated {
            notes.push(format!(
                "guest claims a balloon of {actual:#x} bytes, host counted {inflated:#x}"
            ));
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }

    /// Returns the held stats buffer to the driver so that it refills it (the stats protocol
    /// is device-driven). Call every [`BalloonDevice::stats_interval`]; the signal is for
    /// queue [`STATS_QUEUE`]. Needs guest memory to write the used ring, after checking the
    /// ring is still accessible.
    pub fn request_stats(
        &mut self,
        guest_memory: &GuestMemoryMmap,
        memory: &MemoryManager,
    ) -> Signal {
        let Some(Some((Role::Stats, queue))) = self.queues.get_mut(STATS_QUEUE) else {
            return Signal::default();
        };
        if !rings_accessible(queue, memory) {
            self.metrics.bad_rings += 1;
            return Signal::default();
        }
        let Some(head) = self.stats_buffer.take() else {
            return Signal::default();
        };
        Signal {
            queue: complete(queue, guest_memory, memory, head, 0),
            ..Signal::default()
        }
    }

    fn index_of(&self, role: Role) -> Option<usize> {
        self.queues
            .iter()
            .position(|q| q.as_ref().is_some_and(|(r, _)| *r == role))
    }

    fn negotiated(&self, feature: u64) -> bool {
        self.acked_features & feature != 0
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        // check_target keeps the page count within u32.
        let num_pages = (self.config.target_bytes >> PFN_SHIFT) as u32;
        b[0..4].copy_from_slice(&num_pages.to_le_bytes());
        b[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        b
    }

    /// Discards `ranges` through the manager and records the outcome.
    fn discard(&mut self, memory: &mut MemoryManager, ranges: &[GuestRange]) -> DiscardOutcome {
        let started = Instant::now();
        let result = if self.config.per_page_discard {
            memory.discard_ranges_per_page(ranges)
        } else {
            memory.discard_ranges(ranges)
        };
        self.metrics.discard_time += started.elapsed();
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                self.metrics.discard_errors += 1;
                tracing::warn!("virtio-balloon: {e}: {}", e.source);
                *e.outcome
            }
        };
        self.metrics.discarded_bytes += outcome.bytes_discarded;
        self.metrics.discard_syscalls += outcome.syscalls;
        outcome
    }

    fn malformed(&mut self, what: &str, e: &RequestError) {
        self.metrics.malformed += 1;
        crate::guest_warn!("virtio-balloon: malformed {what} request: {e}");
    }

    fn inflate(
        &mut self,
        mem: &GuestMemoryMmap,
        memory: &mut MemoryManager,
        table: DescriptorTable,
        head: u16,
    ) {
        self.metrics.inflate_requests += 1;
        let pfns = walk_chain(mem, memory, table, head).and_then(|b| read_pfns(mem, memory, &b));
        let pfns = match pfns {
            Ok(pfns) => pfns,
            Err(e) => return self.malformed("inflate", &e),
        };
        let (valid, mut bad) = split_accessible(&pfns_to_ranges(pfns), memory);
        let outcome = self.discard(memory, &valid);
        let mut accepted = valid;
        if outcome.ranges_rejected > 0 {
            // The manager is the authority; anything it refused was never the guest's.
            accepted.retain(|r| !outcome.rejected.contains(r));
            bad += outcome
                .rejected
                .iter()
                .map(|r| r.size / BALLOON_PAGE_SIZE)
                .sum::<u64>();
        }
        if bad > 0 {
            self.metrics.bad_pfns += bad;
            crate::guest_warn!("virtio-balloon: guest inflated {bad} pages outside its memory");
        }
        for r in accepted {
            let pages = r.size / BALLOON_PAGE_SIZE;
            let new = self.inflated.insert_range(r.start >> PFN_SHIFT, pages);
            self.metrics.pages_inflated += new;
            self.metrics.pages_reinflated += pages - new;
        }
    }

    fn deflate(
        &mut self,
        mem: &GuestMemoryMmap,
        memory: &MemoryManager,
        table: DescriptorTable,
        head: u16,
    ) {
        self.metrics.deflate_requests += 1;
        let pfns = walk_chain(mem, memory, table, head).and_then(|b| read_pfns(mem, memory, &b));
        let mut pfns = match pfns {
            Ok(pfns) => pfns,
            Err(e) => return self.malformed("deflate", &e),
        };
        pfns.sort_unstable();
        pfns.dedup();
        // Nothing to do on the host: the next guest access faults in a fresh zero page.
        for pfn in pfns {
            if self.inflated.remove(u64::from(pfn)) {
                self.metrics.pages_deflated += 1;
            } else {
                self.metrics.pages_deflated_unknown += 1;
            }
        }
    }

    fn report(
        &mut self,
        mem: &GuestMemoryMmap,
        memory: &mut MemoryManager,
        table: DescriptorTable,
        head: u16,
    ) {
        self.metrics.reporting_requests += 1;
        let ranges = walk_chain(mem, memory, table, head).and_then(|b| reported_ranges(&b));
        let ranges = match ranges {
            Ok(ranges) => ranges,
            Err(e) => return self.malformed("free page report", &e),
        };
        let outcome = self.discard(memory, &ranges);
        self.metrics.reported_bytes += outcome.bytes_discarded;
        if outcome.ranges_rejected > 0 {
            self.metrics.reporting_rejected_ranges += outcome.ranges_rejected;
            crate::guest_warn!(
                "virtio-balloon: guest reported {} free ranges outside its memory, first {:?}",
                outcome.ranges_rejected,
                outcome.rejected.first()
            );
        }
    }

    fn stats_arrived(
        &mut self,
        mem: &GuestMemoryMmap,
        memory: &MemoryManager,
        table: DescriptorTable,
        head: u16,
    ) {
        let limit = (ENTRY_SIZE * MAX_ENTRIES) as u64;
        let bytes =
            walk_chain(mem, memory, table, head).and_then(|b| read_buffers(mem, memory, &b, limit));
        let bytes = match bytes {
            Ok((bytes, _)) => bytes,
            Err(e) => return self.malformed("stats", &e),
        };
        let parsed = parse_stats(&bytes);
        self.metrics.stats_updates += 1;
        if parsed.unknown_tags > 0 || parsed.trailing_bytes > 0 {
            self.metrics.stats_irregular += 1;
        }
        self.stats = Some(ReceivedStats {
            at: Instant::now(),
            values: parsed.values,
        });
    }
}

fn check_target(bytes: u64) -> Result<(), BalloonError> {
    if !bytes.is_multiple_of(BALLOON_PAGE_SIZE) || bytes > MAX_TARGET_BYTES {
        return Err(BalloonError::Target(bytes));
    }
    Ok(())
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_MUST_TELL_HOST;
        if self.config.stats_interval.is_some() {
            features |= VIRTIO_BALLOON_F_STATS_VQ;
        }
        if self.config.deflate_on_oom {
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            features |= VIRTIO_BALLOON_F_REPORTING;
        }
        features
    }

    fn ack_features(&mut self, features: u64) -> bool {
        // MUST_TELL_HOST may be declined (the spec lets the device refuse, but the host loses
        // nothing it relies on: deflate needs no host action); VERSION_1 is required because
        // the transport is modern only.
        if features & !self.features() != 0 || features & VIRTIO_F_VERSION_1 == 0 {
            return false;
        }
        self.acked_features = features;
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is driver-writable; accept partial writes byte by byte.
        let mut actual = self.actual_pages.to_le_bytes();
        let mut touched = false;
        for (i, byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(at @ 4..=7) => {
                    actual[(at - 4) as usize] = *byte;
                    touched = true;
                }
                _ => crate::guest_warn!(
                    "virtio-balloon: driver wrote read-only config byte at {:#x}",
                    offset.saturating_add(i as u64)
                ),
            }
        }
        if touched {
            self.actual_pages = u32::from_le_bytes(actual);
            self.metrics.actual_writes += 1;
        }
    }

    fn activate(&mut self, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: QUEUE_SIZES.len(),
            });
        }
        if !queues[INFLATE_QUEUE].ready() {
            return Err(ActivateError::QueueNotEnabled("inflate"));
        }
        if !queues[DEFLATE_QUEUE].ready() {
            return Err(ActivateError::QueueNotEnabled("deflate"));
        }
        let stats = self.negotiated(VIRTIO_BALLOON_F_STATS_VQ);
        let mut roles: [Option<Role>; 5] =
            [Some(Role::Inflate), Some(Role::Deflate), None, None, None];
        if stats && queues[STATS_QUEUE].ready() {
            roles[STATS_QUEUE] = Some(Role::Stats);
        }
        if self.negotiated(VIRTIO_BALLOON_F_REPORTING) {
            // Spec layout first, then QEMU's historic index 3, then the pre-6.11 Linux layout
            // (consecutive numbering: index 2 when stats are not negotiated).
            let candidates: &[usize] = if stats {
                &[REPORTING_QUEUE, FREE_PAGE_HINT_QUEUE]
            } else {
                &[REPORTING_QUEUE, FREE_PAGE_HINT_QUEUE, STATS_QUEUE]
            };
            match candidates.iter().find(|i| queues[**i].ready()) {
                Some(&i) => roles[i] = Some(Role::Reporting),
                None => tracing::warn!("virtio-balloon: reporting negotiated but no queue enabled"),
            }
        }
        self.queues = queues
            .into_iter()
            .zip(roles)
            .map(|(queue, role)| role.map(|r| (r, queue)))
            .collect();
        self.stats_buffer = None;
        Ok(())
    }

    fn reset(&mut self) {
        // The driver let go of the balloon (module removal deflates first; a reboot simply
        // forgets): every page is the guest's again. The target stays.
        self.queues.clear();
        self.acked_features = 0;
        self.actual_pages = 0;
        self.inflated.clear();
        self.stats_buffer = None;
    }

    fn process_queue(
        &mut self,
        index: usize,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    ) -> Signal {
        // Taken out so that request handling can borrow the device mutably; put back below.
        let Some((role, mut queue)) = self.queues.get_mut(index).and_then(Option::take) else {
            return Signal::default();
        };
        let mut returned_old_stats = false;
        let mut stats_to_return = Vec::new();
        let pass = run_pass(
            &mut queue,
            guest_memory,
            memory,
            PASS_BUDGET,
            |memory, table, head| {
                match role {
                    Role::Inflate => self.inflate(guest_memory, memory, table, head),
                    Role::Deflate => self.deflate(guest_memory, memory, table, head),
                    Role::Reporting => self.report(guest_memory, memory, table, head),
                    Role::Stats => {
                        self.stats_arrived(guest_memory, memory, table, head);
                        // Hold the buffer until the next poll. A driver that posts a second
                        // one gets the first back below, so none is lost.
                        if let Some(old) = self.stats_buffer.replace(head) {
                            stats_to_return.push(old);
                        }
                        return Completion::Held;
                    }
                }
                Completion::Used(0)
            },
        );
        for old in stats_to_return {
            returned_old_stats |= complete(&mut queue, guest_memory, memory, old, 0);
        }
        if pass.rings_lost {
            self.metrics.bad_rings += 1;
            crate::guest_warn!("virtio-balloon: queue {index} rings are not in accessible memory");
        }
        if let Some(slot) = self.queues.get_mut(index) {
            *slot = Some((role, queue));
        }
        Signal {
            queue: pass.used || returned_old_stats,
            more: pass.more,
            needs_reset: pass.rings_lost,
            ..Signal::default()
        }
    }
}
