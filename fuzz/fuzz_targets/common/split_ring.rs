//! The driver side of one split virtqueue, written by hand over real guest memory, for the
//! stateful device targets.
//!
//! Every write the driver makes is guarded by `MemoryManager::is_accessible`: a real guest
//! touching unplugged memory gets a violation, it does not crash the VMM, so the harness must
//! not crash on it either. The driver remembers which heads it made available and checks the
//! device's used ring against them.

#![allow(dead_code)]

use tidevm_vmm::memory::MemoryManager;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Writes `bytes` at `gpa` if the manager says the range is accessible now.
pub fn guarded_write(mem: &GuestMemoryMmap, mm: &MemoryManager, gpa: u64, bytes: &[u8]) -> bool {
    if !mm.is_accessible(gpa, bytes.len() as u64) {
        return false;
    }
    mem.write_slice(bytes, GuestAddress(gpa)).is_ok()
}

/// Reads `out.len()` bytes at `gpa` if the manager says the range is accessible now.
pub fn guarded_read(mem: &GuestMemoryMmap, mm: &MemoryManager, gpa: u64, out: &mut [u8]) -> bool {
    if !mm.is_accessible(gpa, out.len() as u64) {
        return false;
    }
    mem.read_slice(out, GuestAddress(gpa)).is_ok()
}

/// Whether `[a, a+al)` and `[b, b+bl)` share a byte.
pub fn overlaps(a: u64, al: u64, b: u64, bl: u64) -> bool {
    al > 0 && bl > 0 && a < b.saturating_add(bl) && b < a.saturating_add(al)
}

/// One queue as its driver sees it.
#[derive(Debug, Clone)]
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// The driver's available index.
    pub avail_idx: u16,
    /// Used entries already checked.
    pub seen_used: u16,
    /// Heads made available and not yet returned (a multiset).
    pub outstanding: Vec<u16>,
    /// The driver (or a buffer the device writes) scribbled over the rings: the used ring is
    /// no longer checked against `outstanding`.
    pub tainted: bool,
}

impl Ring {
    /// Rings laid out back to back from `base` (descriptor table, available ring, used ring).
    pub fn at(base: u64, size: u16) -> Ring {
        let n = u64::from(size);
        let desc = base;
        // Wrapping: the input may put the rings anywhere, the top of the address space too.
        let avail = desc.wrapping_add(16 * n);
        let used = avail.wrapping_add(6 + 2 * n).wrapping_add(3) & !3;
        Ring {
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            seen_used: 0,
            outstanding: Vec::new(),
            tainted: false,
        }
    }

    /// The ranges the rings occupy.
    pub fn ranges(&self) -> [(u64, u64); 3] {
        let n = u64::from(self.size);
        [
            (self.desc, 16 * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + 8 * n),
        ]
    }

    /// Whether all the rings are accessible now.
    pub fn accessible(&self, mm: &MemoryManager) -> bool {
        self.ranges().iter().all(|&(a, l)| mm.is_accessible(a, l))
    }

    /// Whether `[addr, addr+len)` overlaps the available or used ring.
    pub fn hits_rings(&self, addr: u64, len: u64) -> bool {
        self.ranges()[1..]
            .iter()
            .any(|&(a, l)| overlaps(a, l, addr, len))
    }

    /// Zeroes the rings (where accessible) for a fresh activation.
    pub fn clear(&self, mem: &GuestMemoryMmap, mm: &MemoryManager) {
        for (a, l) in self.ranges() {
            guarded_write(mem, mm, a, &vec![0u8; l as usize]);
        }
    }

    /// The queue the transport would hand the device, or `None` where the transport would
    /// refuse to activate (invalid queue, rings not in accessible memory).
    pub fn queue(&self, max_size: u16, mem: &GuestMemoryMmap, mm: &MemoryManager) -> Option<Queue> {
        let mut q = Queue::new(max_size).ok()?;
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        (q.is_valid(mem) && self.accessible(mm) && q.size() == self.size).then_some(q)
    }

    /// Writes descriptor `index`.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        mm: &MemoryManager,
        index: u16,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) -> bool {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc.wrapping_add(16 * u64::from(index % self.size));
        guarded_write(mem, mm, at, &d)
    }

    /// Makes `head` available and publishes the new index.
    pub fn post(&mut self, mem: &GuestMemoryMmap, mm: &MemoryManager, head: u16) -> bool {
        let slot = u64::from(self.avail_idx % self.size);
        let entry = guarded_write(
            mem,
            mm,
            self.avail.wrapping_add(4 + 2 * slot),
            &head.to_le_bytes(),
        );
        let idx = self.avail_idx.wrapping_add(1);
        if entry && guarded_write(mem, mm, self.avail.wrapping_add(2), &idx.to_le_bytes()) {
            self.avail_idx = idx;
            self.outstanding.push(head);
            true
        } else {
            false
        }
    }

    /// The driver writes any available index it likes: from now on the used ring cannot be
    /// checked against what was posted.
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, mm: &MemoryManager, idx: u16) {
        if guarded_write(mem, mm, self.avail.wrapping_add(2), &idx.to_le_bytes()) {
            self.avail_idx = idx;
            self.tainted = true;
        }
    }

    /// Reads the used entries added since the last call and checks each returns a head that
    /// was made available and is still outstanding. Returns the new `(id, len)` entries, or
    /// `None` when the used ring is not readable or tainted.
    pub fn take_used(
        &mut self,
        mem: &GuestMemoryMmap,
        mm: &MemoryManager,
    ) -> Option<Vec<(u32, u32)>> {
        let mut idx = [0u8; 2];
        if !guarded_read(mem, mm, self.used.wrapping_add(2), &mut idx) {
            return None;
        }
        let idx = u16::from_le_bytes(idx);
        let new = idx.wrapping_sub(self.seen_used);
        if self.tainted {
            self.seen_used = idx;
            return None;
        }
        assert!(
            usize::from(new) <= self.outstanding.len(),
            "used index moved by {new} with {} chains outstanding",
            self.outstanding.len()
        );
        let mut out = Vec::new();
        for i in 0..new {
            let slot = u64::from(self.seen_used.wrapping_add(i) % self.size);
            let mut e = [0u8; 8];
            assert!(guarded_read(
                mem,
                mm,
                self.used.wrapping_add(4 + 8 * slot),
                &mut e
            ));
            let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
            let pos = self
                .outstanding
                .iter()
                .position(|h| u32::from(*h) == id)
                .unwrap_or_else(|| {
                    panic!(
                        "used entry for head {id}, never made available: {:?}",
                        self.outstanding
                    )
                });
            self.outstanding.remove(pos);
            out.push((id, len));
        }
        self.seen_used = idx;
        Some(out)
    }
}
