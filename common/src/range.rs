//! Byte ranges and sets of them. The download engine keeps "which bytes of
//! the file are on disk" as an [`IntervalSet`]; the manifest stores it.

use std::collections::BTreeMap;

/// A half-open byte range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Range {
    /// Offset of the first byte in the range.
    pub start: u64,
    /// Offset one past the last byte (exclusive); equal to `start` for an empty range.
    pub end: u64,
}

impl Range {
    /// `[start, end)`; `start > end` is a bug, caught in debug builds only.
    pub fn new(start: u64, end: u64) -> Range {
        debug_assert!(start <= end);
        Range { start, end }
    }
    /// Bytes in the range; 0 if it is empty (or inverted).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    /// Whether it holds no byte (`end <= start`, so an inverted range counts as empty).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    /// The bytes both ranges hold; `None` if they share none.
    pub fn intersect(&self, other: &Range) -> Option<Range> {
        let s = self.start.max(other.start);
        let e = self.end.min(other.end);
        (s < e).then_some(Range { start: s, end: e })
    }
}

/// A set of disjoint, non-adjacent byte ranges, merged on insert.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    /// start → end, disjoint and never touching.
    map: BTreeMap<u64, u64>,
    total: u64,
}

impl IntervalSet {
    /// An empty set.
    pub fn new() -> IntervalSet {
        IntervalSet::default()
    }

    /// Total number of bytes covered.
    pub fn covered(&self) -> u64 {
        self.total
    }

    /// The set's ranges in ascending order, each as long as it can be (no two touch).
    pub fn ranges(&self) -> impl Iterator<Item = Range> + '_ {
        self.map.iter().map(|(&s, &e)| Range { start: s, end: e })
    }

    /// Adds `r`, merging with neighbours.
    pub fn insert(&mut self, r: Range) {
        if r.is_empty() {
            return;
        }
        let mut start = r.start;
        let mut end = r.end;
        // A range starting before `start` that reaches it.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let overlapping: Vec<(u64, u64)> = self.map.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in overlapping {
            self.map.remove(&s);
            self.total -= e - s;
            end = end.max(e);
        }
        if let Some(e) = self.map.remove(&start) {
            self.total -= e - start;
            end = end.max(e);
        }
        self.map.insert(start, end);
        self.total += end - start;
    }

    /// Removes `r` from the set.
    pub fn remove(&mut self, r: Range) {
        if r.is_empty() {
            return;
        }
        let mut touched: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.map.range(..r.start).next_back() {
            if e > r.start {
                touched.push((s, e));
            }
        }
        touched.extend(self.map.range(r.start..r.end).map(|(&s, &e)| (s, e)));
        for (s, e) in touched {
            self.map.remove(&s);
            self.total -= e - s;
            if s < r.start {
                self.map.insert(s, r.start);
                self.total += r.start - s;
            }
            if e > r.end {
                self.map.insert(r.end, e);
                self.total += e - r.end;
            }
        }
    }

    /// Whether every byte of `r` is in the set.
    pub fn contains_range(&self, r: Range) -> bool {
        if r.is_empty() {
            return true;
        }
        match self.map.range(..=r.start).next_back() {
            Some((_, &e)) => e >= r.end,
            None => false,
        }
    }

    /// Parts of `r` that are in the set.
    pub fn intersecting(&self, r: Range) -> Vec<Range> {
        let mut out = Vec::new();
        if let Some((&s, &e)) = self.map.range(..r.start).next_back() {
            if let Some(x) = (Range { start: s, end: e }).intersect(&r) {
                out.push(x);
            }
        }
        for (&s, &e) in self.map.range(r.start..r.end) {
            if let Some(x) = (Range { start: s, end: e }).intersect(&r) {
                out.push(x);
            }
        }
        out
    }

    /// Parts of `r` that are not in the set, in order.
    pub fn gaps(&self, r: Range) -> Vec<Range> {
        let mut out = Vec::new();
        let mut cur = r.start;
        for have in self.intersecting(r) {
            if have.start > cur {
                out.push(Range { start: cur, end: have.start });
            }
            cur = cur.max(have.end);
        }
        if cur < r.end {
            out.push(Range { start: cur, end: r.end });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut s = IntervalSet::new();
        s.insert(Range::new(10, 20));
        s.insert(Range::new(30, 40));
        s.insert(Range::new(20, 30));
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![Range::new(10, 40)]);
        assert_eq!(s.covered(), 30);
        s.remove(Range::new(15, 25));
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![Range::new(10, 15), Range::new(25, 40)]);
        assert_eq!(s.covered(), 20);
        assert!(s.contains_range(Range::new(26, 40)));
        assert!(!s.contains_range(Range::new(14, 26)));
        assert_eq!(s.gaps(Range::new(0, 50)), vec![Range::new(0, 10), Range::new(15, 25), Range::new(40, 50)]);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..40), 0..60)) {
            let mut s = IntervalSet::new();
            let mut bits = [false; 240];
            for (add, start, len) in ops {
                let r = Range::new(start, start + len);
                if add { s.insert(r) } else { s.remove(r) }
                for b in &mut bits[start as usize..(start + len) as usize] { *b = add; }
            }
            let count = bits.iter().filter(|b| **b).count() as u64;
            prop_assert_eq!(s.covered(), count);
            for (i, b) in bits.iter().enumerate() {
                prop_assert_eq!(s.contains_range(Range::new(i as u64, i as u64 + 1)), *b);
            }
            let ranges: Vec<_> = s.ranges().collect();
            for w in ranges.windows(2) { prop_assert!(w[0].end < w[1].start); }
        }
    }
}
