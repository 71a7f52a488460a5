//! How much host RAM guest memory really holds, measured from `/proc/self/smaps`.

/// Resident bytes, split into guest memory and the rest of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResidentSplit {
    /// All resident memory of the process.
    pub total: u64,
    /// Resident memory inside the given host ranges (guest memory).
    pub guest: u64,
}

/// Sums the `Rss:` of every mapping in `smaps`, and separately of those overlapping one of
/// `guest_ranges` (host virtual `[start, end)` ranges).
pub fn split_resident(smaps: &str, guest_ranges: &[(u64, u64)]) -> ResidentSplit {
    let mut split = ResidentSplit::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(range) = mapping_range(line) {
            in_guest = guest_ranges
                .iter()
                .any(|&(start, end)| range.0 < end && start < range.1);
            continue;
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            split.total += kib * 1024;
            if in_guest {
                split.guest += kib * 1024;
            }
        }
    }
    split
}

/// Parses the `start-end` of an smaps mapping header line.
fn mapping_range(line: &str) -> Option<(u64, u64)> {
    let first = line.split_whitespace().next()?;
    let (start, end) = first.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// Measures this process.
pub fn measure_self(guest_ranges: &[(u64, u64)]) -> ResidentSplit {
    std::fs::read_to_string("/proc/self/smaps")
        .map(|smaps| split_resident(&smaps, guest_ranges))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_mappings_from_the_rest() {
        let smaps = "\
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Rss:              204800 kB
Pss:              204800 kB
55d000000000-55d000100000 r-xp 00000000 fd:01 123 /usr/bin/tidevm
Size:               1024 kB
Rss:                 900 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  24 kB
";
        let split = split_resident(smaps, &[(0x7f00_0000_0000, 0x7f00_4000_0000)]);
        assert_eq!(split.guest, 204_800 * 1024);
        assert_eq!(split.total, (204_800 + 900 + 24) * 1024);
    }

    #[test]
    fn measures_a_real_mapping() {
        let mut data = vec![1u8; 8 << 20];
        data[4096] = 2;
        let start = data.as_ptr() as u64;
        let split = measure_self(&[(start, start + data.len() as u64)]);
        assert!(split.guest >= 7 << 20, "{split:?}");
        assert!(split.total > split.guest);
    }
}
