//! A fixed-size bitmap of plugged blocks, with word-at-a-time range operations.
//!
//! A 512 GiB hotplug area holds 256 Ki blocks of 2 MiB; the plug/unplug paths walk runs of equal
//! bits, so everything here works on 64-bit words rather than single bits.

/// One bit per block; bit set = plugged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BlockBitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

/// Mask of bits `[from, to)` inside one word (`from < to <= 64`).
fn word_mask(from: u64, to: u64) -> u64 {
    let high = if to == 64 { u64::MAX } else { (1u64 << to) - 1 };
    high & !((1u64 << from) - 1)
}

impl BlockBitmap {
    /// A bitmap of `len` clear bits.
    pub(crate) fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX);
        BlockBitmap {
            words: vec![0; words],
            len,
            ones: 0,
        }
    }

    /// Number of bits.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Number of set bits.
    pub(crate) fn count_ones(&self) -> u64 {
        self.ones
    }

    /// Whether bit `i` is set (false when out of range).
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Calls `f(word_index, mask)` for every word overlapping `[first, first+count)`.
    fn for_each_word(first: u64, count: u64, mut f: impl FnMut(usize, u64)) {
        let end = first + count;
        let mut i = first;
        while i < end {
            let word_end = (i / 64 + 1) * 64;
            let stop = end.min(word_end);
            f((i / 64) as usize, word_mask(i % 64, stop - (i / 64) * 64));
            i = stop;
        }
    }

    /// Sets (`value`) or clears every bit of `[first, first+count)`; the range must be in bounds.
    pub(crate) fn set_range(&mut self, first: u64, count: u64, value: bool) {
        debug_assert!(first + count <= self.len);
        let words = &mut self.words;
        let mut ones = self.ones;
        Self::for_each_word(first, count, |w, mask| {
            let before = u64::from((words[w] & mask).count_ones());
            if value {
                words[w] |= mask;
                ones += u64::from(mask.count_ones()) - before;
            } else {
                words[w] &= !mask;
                ones -= before;
            }
        });
        self.ones = ones;
    }

    /// Number of set bits in `[first, first+count)`; the range must be in bounds.
    pub(crate) fn count_range(&self, first: u64, count: u64) -> u64 {
        debug_assert!(first + count <= self.len);
        let mut n = 0;
        Self::for_each_word(first, count, |w, mask| {
            n += u64::from((self.words[w] & mask).count_ones());
        });
        n
    }

    /// First index in `[from, end)` whose bit equals `value`, or `end`.
    fn find(&self, from: u64, end: u64, value: bool) -> u64 {
        let mut i = from;
        while i < end {
            let word = self.words[(i / 64) as usize];
            let word = if value { word } else { !word };
            let rest = word >> (i % 64);
            if rest != 0 {
                return (i + u64::from(rest.trailing_zeros())).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// Maximal runs `(first, count)` of bits equal to `value` inside `[first, first+count)`.
    pub(crate) fn runs(&self, first: u64, count: u64, value: bool) -> Vec<(u64, u64)> {
        let end = first + count;
        let mut runs = Vec::new();
        let mut i = self.find(first, end, value);
        while i < end {
            let stop = self.find(i, end, !value);
            runs.push((i, stop - i));
            i = self.find(stop, end, value);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_across_words_count_and_run() {
        let mut b = BlockBitmap::new(200);
        b.set_range(60, 10, true);
        b.set_range(130, 70, true);
        assert_eq!(b.count_ones(), 80);
        assert_eq!(b.count_range(0, 200), 80);
        assert_eq!(b.count_range(62, 3), 3);
        assert!(b.get(69) && !b.get(70) && b.get(199) && !b.get(200));
        assert_eq!(b.runs(0, 200, true), vec![(60, 10), (130, 70)]);
        assert_eq!(b.runs(0, 200, false), vec![(0, 60), (70, 60)]);
        assert_eq!(b.runs(65, 70, true), vec![(65, 5), (130, 5)]);
        b.set_range(0, 200, true);
        assert_eq!(b.count_ones(), 200);
        assert_eq!(b.runs(0, 200, false), vec![]);
        b.set_range(64, 64, false);
        assert_eq!(b.count_ones(), 136);
        assert_eq!(b.runs(0, 200, false), vec![(64, 64)]);
        assert_eq!(b.runs(0, 0, false), vec![]);
    }

    #[test]
    fn matches_a_naive_model() {
        let mut b = BlockBitmap::new(300);
        let mut model = vec![false; 300];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let first = seed % 300;
            let count = (seed >> 20) % (300 - first + 1);
            let value = seed & (1 << 40) != 0;
            b.set_range(first, count, value);
            model[first as usize..(first + count) as usize].fill(value);
            let ones = model.iter().filter(|v| **v).count() as u64;
            assert_eq!(b.count_ones(), ones);
            let runs: u64 = b.runs(0, 300, true).iter().map(|r| r.1).sum();
            assert_eq!(runs, ones);
        }
        for (i, v) in model.iter().enumerate() {
            assert_eq!(b.get(i as u64), *v);
        }
    }
}
