//! NUMA: the SRAT (which CPUs and memory ranges belong to which proximity domain, including
//! the hotplug regions that will only be plugged later) and the SLIT (distances).

use acpi_tables::sdt::Sdt;

use crate::arch::x86_64::layout::GuestRange;

/// One proximity domain as the guest will see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaNode {
    /// Proximity domain (node id).
    pub id: u32,
    /// APIC IDs of its vCPUs.
    pub cpus: Vec<u8>,
    /// Its boot RAM.
    pub memory: Vec<GuestRange>,
    /// Hotplug regions (virtio-mem) whose memory belongs to it.
    pub hotplug: Vec<GuestRange>,
}

const SRAT_MEMORY_AFFINITY: u8 = 1;
const SRAT_X2APIC_AFFINITY: u8 = 2;
const AFFINITY_ENABLED: u32 = 1;
const MEMORY_HOTPLUGGABLE: u32 = 2;
/// Distance of a node to itself, and to any other node (ACPI's convention).
const LOCAL_DISTANCE: u8 = 10;
const REMOTE_DISTANCE: u8 = 20;

fn memory_affinity(node: u32, range: GuestRange, flags: u32) -> Vec<u8> {
    let mut entry = vec![SRAT_MEMORY_AFFINITY, 40];
    entry.extend_from_slice(&node.to_le_bytes());
    entry.extend_from_slice(&[0, 0]);
    entry.extend_from_slice(&range.start.to_le_bytes());
    entry.extend_from_slice(&range.size.to_le_bytes());
    entry.extend_from_slice(&[0; 4]);
    entry.extend_from_slice(&flags.to_le_bytes());
    entry.extend_from_slice(&[0; 8]);
    entry
}

fn x2apic_affinity(node: u32, apic_id: u8) -> Vec<u8> {
    let mut entry = vec![SRAT_X2APIC_AFFINITY, 24, 0, 0];
    entry.extend_from_slice(&node.to_le_bytes());
    entry.extend_from_slice(&u32::from(apic_id).to_le_bytes());
    entry.extend_from_slice(&AFFINITY_ENABLED.to_le_bytes());
    entry.extend_from_slice(&[0; 8]);
    entry
}

/// The System Resource Affinity Table.
pub fn build_srat(nodes: &[NumaNode], oem_id: [u8; 6], oem_table_id: [u8; 8]) -> Vec<u8> {
    let mut srat = Sdt::new(*b"SRAT", 48, 3, oem_id, oem_table_id, 1);
    // Reserved dword "1" for backward compatibility, then 8 reserved bytes.
    srat.write_u32(36, 1);
    for node in nodes {
        for &cpu in &node.cpus {
            srat.append_slice(&x2apic_affinity(node.id, cpu));
        }
        for &range in &node.memory {
            srat.append_slice(&memory_affinity(node.id, range, AFFINITY_ENABLED));
        }
        for &range in &node.hotplug {
            srat.append_slice(&memory_affinity(
                node.id,
                range,
                AFFINITY_ENABLED | MEMORY_HOTPLUGGABLE,
            ));
        }
    }
    srat.update_checksum();
    srat.as_slice().to_vec()
}

/// The System Locality Information Table: 10 to itself, 20 to every other node. Indexed by
/// proximity domain, so the nodes must be numbered 0..n.
pub fn build_slit(node_count: usize, oem_id: [u8; 6], oem_table_id: [u8; 8]) -> Vec<u8> {
    let mut slit = Sdt::new(*b"SLIT", 44, 1, oem_id, oem_table_id, 1);
    slit.write_u64(36, node_count as u64);
    for from in 0..node_count {
        let row: Vec<u8> = (0..node_count)
            .map(|to| {
                if from == to {
                    LOCAL_DISTANCE
                } else {
                    REMOTE_DISTANCE
                }
            })
            .collect();
        slit.append_slice(&row);
    }
    slit.update_checksum();
    slit.as_slice().to_vec()
}

/// Splits boot RAM among nodes in order: node i gets the next `sizes[i]` bytes of the RAM
/// ranges (a node may straddle the 32-bit hole and get two ranges).
pub fn split_boot_ram(ram: &[GuestRange], sizes: &[u64]) -> Vec<Vec<GuestRange>> {
    let mut result = Vec::with_capacity(sizes.len());
    let mut ranges = ram.iter().copied();
    let mut current = ranges.next();
    for &size in sizes {
        let mut left = size;
        let mut mine = Vec::new();
        while left > 0 {
            let Some(range) = current else { break };
            let take = left.min(range.size);
            mine.push(GuestRange {
                start: range.start,
                size: take,
            });
            left -= take;
            current = if take == range.size {
                ranges.next()
            } else {
                Some(GuestRange {
                    start: range.start + take,
                    size: range.size - take,
                })
            };
        }
        result.push(mine);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn srat_lists_cpus_boot_memory_and_hotplug_ranges() {
        let nodes = vec![
            NumaNode {
                id: 0,
                cpus: vec![0],
                memory: vec![GuestRange {
                    start: 0,
                    size: 1 << 30,
                }],
                hotplug: vec![GuestRange {
                    start: 4 << 30,
                    size: 4 << 30,
                }],
            },
            NumaNode {
                id: 1,
                cpus: vec![1],
                memory: vec![GuestRange {
                    start: 1 << 30,
                    size: 1 << 30,
                }],
                hotplug: vec![GuestRange {
                    start: 8 << 30,
                    size: 4 << 30,
                }],
            },
        ];
        let srat = build_srat(&nodes, *b"TIDEVM", *b"TIDEVMVM");
        assert_eq!(&srat[..4], b"SRAT");
        assert_eq!(srat.len(), 48 + 2 * 24 + 4 * 40);
        assert_eq!(sum(&srat), 0);
        // The second node's hotplug entry: proximity 1, base 8 GiB, hotpluggable.
        let last = &srat[srat.len() - 40..];
        assert_eq!(last[0], SRAT_MEMORY_AFFINITY);
        assert_eq!(u32::from_le_bytes(last[2..6].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(last[8..16].try_into().unwrap()), 8 << 30);
        assert_eq!(u32::from_le_bytes(last[28..32].try_into().unwrap()), 3);
        let slit = build_slit(2, *b"TIDEVM", *b"TIDEVMVM");
        assert_eq!(&slit[44..], &[10, 20, 20, 10]);
        assert_eq!(sum(&slit), 0);
    }

    #[test]
    fn boot_ram_is_split_in_order_across_the_hole() {
        let ram = [
            GuestRange {
                start: 0,
                size: 3 << 30,
            },
            GuestRange {
                start: 4 << 30,
                size: 1 << 30,
            },
        ];
        let split = split_boot_ram(&ram, &[2 << 30, 2 << 30]);
        assert_eq!(
            split[0],
            vec![GuestRange {
                start: 0,
                size: 2 << 30
            }]
        );
        assert_eq!(
            split[1],
            vec![
                GuestRange {
                    start: 2 << 30,
                    size: 1 << 30
                },
                GuestRange {
                    start: 4 << 30,
                    size: 1 << 30
                },
            ]
        );
    }
}
