//! The addresses this peer owns, and which of them are free (spec §1.2 rule 7). Addresses are
//! u64 positions (a /0 universe ends at 2^32); ranges are half-open `[start, end)`.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included, Unbounded};

/// Sorted, disjoint, non-adjacent half-open intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Intervals(BTreeMap<u64, u64>);

impl Intervals {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Swallow every interval that touches [start, end).
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.0.remove(&s);
            }
        }
        let touching: Vec<(u64, u64)> = self
            .0
            .range((Included(start), Included(end)))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut hit: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.0.range(..start).next_back() {
            if e > start {
                hit.push((s, e));
            }
        }
        hit.extend(
            self.0
                .range((Included(start), Excluded(end)))
                .map(|(&s, &e)| (s, e)),
        );
        for (s, e) in hit {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    fn contains(&self, a: u64) -> bool {
        self.0.range(..=a).next_back().is_some_and(|(_, &e)| e > a)
    }

    /// The pieces of the intervals inside `[lo, hi)`, in order.
    fn clipped(&self, lo: u64, hi: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .0
            .range(..lo)
            .next_back()
            .filter(|(_, &e)| e > lo)
            .map(|(&s, &e)| (s, e));
        let rest = self
            .0
            .range((Included(lo), if hi > lo { Excluded(hi) } else { Unbounded }))
            .take_while(move |_| hi > lo)
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(rest)
            .map(move |(s, e)| (s.max(lo), e.min(hi)))
            .filter(|(s, e)| s < e)
    }

    fn count_in(&self, lo: u64, hi: u64) -> u64 {
        self.clipped(lo, hi).map(|(s, e)| e - s).sum()
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Owned ranges, and the free addresses among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Space {
    owned: Intervals,
    free: Intervals,
}

impl Space {
    /// Take ownership of `[start, end)`, all free (a grant or a transfer to us).
    pub fn add(&mut self, start: u64, end: u64) {
        self.owned.insert(start, end);
        self.free.insert(start, end);
    }

    /// Give up `[start, end)` (donated, or taken from us by a repair); whatever was allocated
    /// there is forgotten.
    pub fn remove(&mut self, start: u64, end: u64) {
        self.owned.remove(start, end);
        self.free.remove(start, end);
    }

    pub fn clear(&mut self) {
        *self = Space::default();
    }

    pub fn owns(&self, a: u64) -> bool {
        self.owned.contains(a)
    }

    pub fn is_free(&self, a: u64) -> bool {
        self.free.contains(a)
    }

    /// Mark `a` allocated; false when it is not ours or not free.
    pub fn take(&mut self, a: u64) -> bool {
        if !self.free.contains(a) {
            return false;
        }
        self.free.remove(a, a + 1);
        true
    }

    /// Mark `a` free again (ignored when we do not own it).
    pub fn release(&mut self, a: u64) {
        if self.owned.contains(a) {
            self.free.insert(a, a + 1);
        }
    }

    /// The lowest free address in `[lo, hi)`, taken.
    pub fn allocate_lowest(&mut self, lo: u64, hi: u64) -> Option<u64> {
        let (a, _) = self.free.clipped(lo, hi).next()?;
        self.free.remove(a, a + 1);
        Some(a)
    }

    pub fn free_in(&self, lo: u64, hi: u64) -> u64 {
        self.free.count_in(lo, hi)
    }

    pub fn owned_in(&self, lo: u64, hi: u64) -> u64 {
        self.owned.count_in(lo, hi)
    }

    /// Some address in `[lo, hi)` is ours and allocated.
    pub fn has_allocations_in(&self, lo: u64, hi: u64) -> bool {
        self.owned_in(lo, hi) != self.free_in(lo, hi)
    }

    pub fn total_free(&self) -> u64 {
        self.free.total()
    }

    pub fn total_owned(&self) -> u64 {
        self.owned.total()
    }

    /// Allocated addresses (owned minus free).
    pub fn allocated(&self) -> u64 {
        self.total_owned() - self.total_free()
    }

    /// Owned ranges, in order.
    pub fn owned_ranges(&self) -> Vec<(u64, u64)> {
        self.owned.0.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// The largest free block inside `[lo, hi)` that is aligned to its own (power of two)
    /// size, lowest first on ties: what a donor gives away (spec §1.4 donation).
    pub fn biggest_aligned_free(&self, lo: u64, hi: u64) -> Option<(u64, u64)> {
        let mut best: Option<(u64, u64)> = None;
        for (s, e) in self.free.clipped(lo, hi) {
            let block = largest_aligned(s, e);
            if best.is_none_or(|(bs, be)| block.1 - block.0 > be - bs) {
                best = Some(block);
            }
        }
        best
    }
}

/// The largest block `[a, a + 2^k)` with `a` a multiple of `2^k` inside `[s, e)` (non-empty).
fn largest_aligned(s: u64, e: u64) -> (u64, u64) {
    let mut size = 1u64 << (63 - (e - s).leading_zeros());
    loop {
        let a = s.div_ceil(size) * size;
        if a + size <= e {
            return (a, a + size);
        }
        size /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_and_releases() {
        let mut s = Space::default();
        s.add(10, 20);
        assert_eq!(s.allocate_lowest(0, 100), Some(10));
        assert_eq!(s.allocate_lowest(12, 100), Some(12));
        assert_eq!(s.allocate_lowest(0, 100), Some(11));
        assert_eq!(s.free_in(0, 100), 7);
        assert!(s.has_allocations_in(10, 13));
        assert!(!s.has_allocations_in(13, 20));
        s.release(11);
        assert_eq!(s.allocate_lowest(0, 100), Some(11));
        assert_eq!(s.allocate_lowest(20, 30), None);
        s.release(25); // not ours: ignored
        assert_eq!(s.total_free(), 7);
        assert_eq!(s.allocated(), 3);
    }

    #[test]
    fn intervals_merge_and_split() {
        let mut s = Space::default();
        s.add(0, 4);
        s.add(4, 8);
        s.add(20, 24);
        assert_eq!(s.owned_ranges(), vec![(0, 8), (20, 24)]);
        s.remove(2, 21);
        assert_eq!(s.owned_ranges(), vec![(0, 2), (21, 24)]);
        assert_eq!(s.total_free(), 5);
        assert!(s.take(22));
        assert!(!s.take(22));
        assert!(!s.take(2));
    }

    #[test]
    fn donation_block_is_aligned() {
        let mut s = Space::default();
        s.add(0, 256);
        for a in [0, 1, 2] {
            assert!(s.take(a));
        }
        // Free: [3, 256): biggest aligned block is [128, 256).
        assert_eq!(s.biggest_aligned_free(0, 256), Some((128, 256)));
        assert_eq!(s.biggest_aligned_free(3, 7), Some((4, 6)));
        assert_eq!(s.biggest_aligned_free(5, 6), Some((5, 6)));
        assert_eq!(s.biggest_aligned_free(0, 3), None);
    }
}
