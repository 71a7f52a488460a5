//! The host's own record of which 4 KiB pages the guest has inflated.
//!
//! The guest writes `actual` itself, so it cannot be trusted; this set counts acknowledged
//! inflates minus deflates, ignoring duplicates (a page inflated twice is one page) and
//! deflates of pages that were never inflated. It is sparse (one bitmap per 2 MiB of guest
//! memory that holds inflated pages), so its size is bounded by guest memory / 2 MiB entries
//! of 72 bytes, whatever PFNs the guest sends: only PFNs the memory manager accepted are
//! inserted.

use std::collections::BTreeMap;

/// Pages per chunk: 512 x 4 KiB = 2 MiB.
pub const CHUNK_PAGES: u64 = 512;
/// 64-bit words in a chunk's page mask.
pub const WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// A set of page frame numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InflatedPages {
    chunks: BTreeMap<u64, [u64; WORDS]>,
    count: u64,
}

fn split(pfn: u64) -> (u64, usize, u64) {
    let bit = pfn % CHUNK_PAGES;
    (pfn / CHUNK_PAGES, (bit / 64) as usize, 1 << (bit % 64))
}

impl InflatedPages {
    /// Adds one page; returns whether it was new.
    pub fn insert(&mut self, pfn: u64) -> bool {
        let (chunk, word, mask) = split(pfn);
        let words = self.chunks.entry(chunk).or_insert([0; WORDS]);
        let new = words[word] & mask == 0;
        words[word] |= mask;
        self.count += u64::from(new);
        new
    }

    /// Adds `count` pages from `first`; returns how many were new.
    pub fn insert_range(&mut self, first: u64, count: u64) -> u64 {
        (first..first.saturating_add(count))
            .map(|pfn| u64::from(self.insert(pfn)))
            .sum()
    }

    /// Removes one page; returns whether it was present.
    pub fn remove(&mut self, pfn: u64) -> bool {
        let (chunk, word, mask) = split(pfn);
        let Some(words) = self.chunks.get_mut(&chunk) else {
            return false;
        };
        let present = words[word] & mask != 0;
        words[word] &= !mask;
        if words.iter().all(|w| *w == 0) {
            self.chunks.remove(&chunk);
        }
        self.count -= u64::from(present);
        present
    }

    /// Whether `pfn` is in the set.
    pub fn contains(&self, pfn: u64) -> bool {
        let (chunk, word, mask) = split(pfn);
        self.chunks.get(&chunk).is_some_and(|w| w[word] & mask != 0)
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The 2 MiB chunks holding pages, as (first PFN, 512-bit page mask), in PFN order.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, [u64; WORDS])> + '_ {
        self.chunks
            .iter()
            .map(|(chunk, words)| (chunk * CHUNK_PAGES, *words))
    }

    /// Empties the set (the guest dropped its balloon: device reset).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_unique_pages_and_frees_empty_chunks() {
        let mut set = InflatedPages::default();
        assert_eq!(set.insert_range(510, 4), 4);
        assert_eq!(set.insert_range(511, 2), 0, "duplicates are not counted");
        assert!(set.insert(u64::from(u32::MAX)));
        assert_eq!(set.len(), 5);
        assert!(set.contains(513) && !set.contains(514));
        assert!(set.remove(510) && !set.remove(510) && !set.remove(7));
        assert_eq!(set.len(), 4);
        for pfn in [511, 512, 513, u64::from(u32::MAX)] {
            assert!(set.remove(pfn));
        }
        assert!(set.is_empty() && set.chunks.is_empty());
        set.insert(1);
        set.clear();
        assert!(set.is_empty());
    }
}
