//! Memory statistics: the 10-byte `le16 tag, le64 value` entries the guest driver sends on the
//! stats queue, and the snapshot the host API shows.
//!
//! Every value is the guest's claim: a snapshot keeps its age and lists values that
//! contradict each other, and nothing in the VMM acts on them without that context.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Size of one entry on the wire (the spec's "multiple of 6 bytes" is a known wording error).
pub const ENTRY_SIZE: usize = 10;
/// Most entries parsed from one buffer: Linux sends 16 distinct tags; the cap bounds what a
/// guest can make the VMM store.
pub const MAX_ENTRIES: usize = 64;

/// Names of the tags Linux defines (`VIRTIO_BALLOON_S_*`), indexed by tag.
pub const TAG_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// The name under which a tag's value is recorded; unknown tags (newer drivers) are kept
/// under their number rather than dropped.
pub fn tag_name(tag: u16) -> String {
    match TAG_NAMES.get(usize::from(tag)) {
        Some(name) => (*name).to_string(),
        None => format!("tag_{tag}"),
    }
}

/// One decoded stats buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedStats {
    /// Values by name (the last one wins if a tag repeats).
    pub values: BTreeMap<String, u64>,
    /// Entries with a tag this VMM does not know.
    pub unknown_tags: u32,
    /// Bytes after the last whole entry (a short or odd-sized buffer).
    pub trailing_bytes: usize,
}

/// Decodes as many whole entries as `bytes` holds (at most [`MAX_ENTRIES`]).
pub fn parse_stats(bytes: &[u8]) -> ParsedStats {
    let mut parsed = ParsedStats {
        trailing_bytes: bytes.len() % ENTRY_SIZE,
        ..ParsedStats::default()
    };
    for entry in bytes.chunks_exact(ENTRY_SIZE).take(MAX_ENTRIES) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..10]);
        if usize::from(tag) >= TAG_NAMES.len() {
            parsed.unknown_tags += 1;
        }
        parsed
            .values
            .insert(tag_name(tag), u64::from_le_bytes(value));
    }
    parsed
}

/// Values that cannot all be true at once (a buggy or lying driver).
pub fn inconsistencies(values: &BTreeMap<String, u64>) -> Vec<String> {
    let get = |name: &str| values.get(name).copied();
    let mut found = Vec::new();
    if let Some(total) = get("total_memory") {
        for part in ["free_memory", "available_memory", "disk_caches"] {
            if let Some(v) = get(part).filter(|v| *v > total) {
                found.push(format!("{part} {v} exceeds total_memory {total}"));
            }
        }
    }
    if let (Some(free), Some(avail)) = (get("free_memory"), get("available_memory")) {
        // MemAvailable counts free memory plus reclaimable caches, minus reserves; a gap of
        // more than the total is nonsense, small negative gaps are normal (watermarks).
        if let Some(total) = get("total_memory") {
            if free > avail.saturating_add(total / 2) {
                found.push(format!(
                    "free_memory {free} far exceeds available_memory {avail}"
                ));
            }
        }
    }
    found
}

/// The last statistics the guest sent, as the host API shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// How long ago they arrived.
    pub age: Duration,
    /// Values by name (see [`TAG_NAMES`]; unknown tags as `tag_<n>`).
    pub values: BTreeMap<String, u64>,
    /// Older than three stats intervals: the guest stopped answering.
    pub stale: bool,
    /// Values that contradict each other.
    pub inconsistencies: Vec<String>,
}

/// Stats as stored by the device.
#[derive(Clone, Debug)]
pub(crate) struct ReceivedStats {
    pub(crate) at: Instant,
    pub(crate) values: BTreeMap<String, u64>,
}

impl ReceivedStats {
    pub(crate) fn snapshot(&self, interval: Option<Duration>) -> StatsSnapshot {
        let age = self.at.elapsed();
        StatsSnapshot {
            age,
            stale: interval.is_some_and(|i| age > i.saturating_mul(3)),
            inconsistencies: inconsistencies(&self.values),
            values: self.values.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn known_unknown_and_trailing_entries() {
        let mut bytes = entry(4, 100);
        bytes.extend(entry(5, 1000));
        bytes.extend(entry(99, 7));
        bytes.extend(entry(11, 3));
        bytes.extend([1, 2, 3]);
        let p = parse_stats(&bytes);
        assert_eq!(p.values["free_memory"], 100);
        assert_eq!(p.values["total_memory"], 1000);
        assert_eq!(p.values["alloc_stalls"], 3);
        assert_eq!(p.values["tag_99"], 7);
        assert_eq!((p.unknown_tags, p.trailing_bytes), (1, 3));
        assert!(inconsistencies(&p.values).is_empty());
        assert_eq!(parse_stats(&[0; 9]).values.len(), 0);
        let many: Vec<u8> = (0..200).flat_map(|t| entry(t, 1)).collect();
        assert_eq!(parse_stats(&many).values.len(), MAX_ENTRIES);
    }

    #[test]
    fn contradictions_are_listed() {
        let mut values = BTreeMap::new();
        values.insert("total_memory".to_string(), 100);
        values.insert("free_memory".to_string(), 200);
        values.insert("available_memory".to_string(), 10);
        let found = inconsistencies(&values);
        assert_eq!(found.len(), 2, "{found:?}");
    }
}
