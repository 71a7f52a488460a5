//! Per-device virtio-balloon counters (kept in the device, no globals).

use std::time::Duration;

/// Counters of one balloon device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonMetrics {
    /// Inflate requests processed (well-formed or not).
    pub inflate_requests: u64,
    /// Deflate requests processed (well-formed or not).
    pub deflate_requests: u64,
    /// Pages newly added to the host's inflated set.
    pub pages_inflated: u64,
    /// Pages inflated again while already inflated (not counted twice).
    pub pages_reinflated: u64,
    /// Pages removed from the inflated set by deflates.
    pub pages_deflated: u64,
    /// Deflated pages that were not inflated (balloon compaction after a reset, or a bug).
    pub pages_deflated_unknown: u64,
    /// Inflated PFNs refused: outside guest-owned memory (holes, beyond RAM, unplugged).
    pub bad_pfns: u64,
    /// Chains that were not a valid request (bad descriptors, lengths, inaccessible buffers).
    pub malformed: u64,
    /// Queue notifications ignored because the rings lie outside accessible memory.
    pub bad_rings: u64,
    /// Bytes of host memory released (inflates and free page reports).
    pub discarded_bytes: u64,
    /// madvise/fallocate calls made for them.
    pub discard_syscalls: u64,
    /// Discards that failed on the host (the request is still acknowledged).
    pub discard_errors: u64,
    /// Time spent in the memory manager's discards.
    pub discard_time: Duration,
    /// Free page reports processed.
    pub reporting_requests: u64,
    /// Bytes released through free page reports.
    pub reported_bytes: u64,
    /// Reported ranges refused by the memory manager.
    pub reporting_rejected_ranges: u64,
    /// Stats buffers received.
    pub stats_updates: u64,
    /// Stats buffers with unknown tags or a partial trailing entry.
    pub stats_irregular: u64,
    /// Writes of `actual` by the driver.
    pub actual_writes: u64,
    /// Scans that found more inflated pages touched again than the scan before.
    pub reuse_detections: u64,
    /// Reused pages removed from the inflated set (`on-reuse=uncount`).
    pub pages_reused_uncounted: u64,
    /// Inflated pages dropped because they stopped being guest memory (unplugged, ejected).
    pub pages_pruned: u64,
}
