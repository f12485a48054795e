//! The scheduler owns which connection fetches which bytes of a download.
//!
//! It is plain synchronous data (the engine keeps it under a mutex), so its
//! invariants are tested without sockets. Owns:
//!
//! * `received`: bytes on disk; `writing`: bytes claimed by a writer but not
//!   yet written. A byte is written by exactly one writer: the first
//!   connection to *claim* it. Late copies of the same bytes are discarded.
//! * assignments: for each connection, a range `[start, end)` where `start` is
//!   the next byte it expects to arrive and `requested` the next byte it will
//!   ask for. A connection that dies releases its assignment and its
//!   unreceived bytes become unassigned again, from the exact byte reached.
//! * pieces: complete pieces go to verification; a piece that fails is
//!   removed from `received`, its contributors are reported for a strike, and
//!   it is fetched again, preferably from a source that did not send it.
//!
//! Work is pulled: a connection with nothing to do asks [`Scheduler::assign`].
//! Unassigned bytes go first; then the largest outstanding range is split,
//! the newcomer taking the back part sized by relative speed; finally, when
//! nothing is left to split, a range whose owner would need more than
//! [`DUPLICATE_AFTER`] to finish is requested a second time and the first copy
//! wins.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mftd_common::range::{IntervalSet, Range};

pub type ConnId = u64;
pub type SourceId = usize;

/// Smallest unrequested tail worth splitting off another connection.
pub const MIN_SPLIT: u64 = 64 << 10;
/// An owner expected to need longer than this for its remaining bytes gets a
/// duplicate requester at the end of the download.
pub const DUPLICATE_AFTER: Duration = Duration::from_millis(1500);
/// Time constant of the per-connection speed estimate.
const SPEED_TAU: f64 = 0.5;

#[derive(Debug, Clone)]
struct Assignment {
    source: SourceId,
    start: u64,
    requested: u64,
    end: u64,
    /// Another connection is fetching the same bytes (end game).
    duplicated: bool,
}

#[derive(Debug, Clone, Copy)]
struct Meter {
    last: Instant,
    rate: f64,
}

impl Meter {
    fn update(&mut self, bytes: u64, now: Instant) {
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-4);
        let inst = bytes as f64 / dt;
        let alpha = 1.0 - (-dt / SPEED_TAU).exp();
        self.rate += alpha * (inst - self.rate);
        self.last = now;
    }
    /// Estimated rate now: decays while nothing arrives.
    fn rate(&self, now: Instant) -> f64 {
        let idle = now.duration_since(self.last).as_secs_f64();
        if idle > SPEED_TAU {
            self.rate * (-(idle - SPEED_TAU) / SPEED_TAU).exp()
        } else {
            self.rate
        }
    }
}

/// Result of verifying a piece that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPiece {
    pub piece: usize,
    /// Who wrote how many bytes of the bad piece.
    pub contributors: Vec<(SourceId, u64)>,
}

#[derive(Debug)]
pub struct Scheduler {
    size: u64,
    piece_size: u64,
    /// Largest range handed out by one pull of unassigned bytes.
    chunk: u64,
    received: IntervalSet,
    writing: IntervalSet,
    verified: Vec<bool>,
    verified_count: usize,
    verifying: HashSet<usize>,
    /// Bytes each source wrote into each unverified piece.
    contributors: HashMap<usize, Vec<(SourceId, u64)>>,
    /// Sources that sent a bad copy of a piece; asked last for it.
    avoid: HashMap<usize, HashSet<SourceId>>,
    assignments: HashMap<ConnId, Assignment>,
    meters: HashMap<ConnId, Meter>,
    generations: HashMap<usize, u32>,
    /// Sources still in the download (not dropped or excluded), when the
    /// engine has told us; otherwise other sources count as alive while they
    /// hold an assignment.
    alive: Vec<bool>,
}

impl Scheduler {
    pub fn new(size: u64, piece_size: u32) -> Scheduler {
        let piece_size = piece_size.max(1) as u64;
        let pieces = size.div_ceil(piece_size) as usize;
        Scheduler {
            size,
            piece_size,
            chunk: (4u64 << 20).max(piece_size),
            received: IntervalSet::new(),
            writing: IntervalSet::new(),
            verified: vec![false; pieces],
            verified_count: 0,
            verifying: HashSet::new(),
            contributors: HashMap::new(),
            avoid: HashMap::new(),
            assignments: HashMap::new(),
            meters: HashMap::new(),
            alive: Vec::new(),
            generations: HashMap::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn piece_count(&self) -> usize {
        self.verified.len()
    }
    pub fn verified_count(&self) -> usize {
        self.verified_count
    }
    pub fn received_bytes(&self) -> u64 {
        self.received.covered()
    }
    pub fn is_complete(&self) -> bool {
        self.verified_count == self.verified.len()
    }
    pub fn received(&self) -> &IntervalSet {
        &self.received
    }
    pub fn piece_range(&self, i: usize) -> Range {
        let s = i as u64 * self.piece_size;
        Range::new(s, (s + self.piece_size).min(self.size))
    }
    fn pieces_of(&self, r: Range) -> std::ops::Range<usize> {
        if r.is_empty() {
            return 0..0;
        }
        (r.start / self.piece_size) as usize..r.end.div_ceil(self.piece_size) as usize
    }

    /// Bytes not on disk and not claimed, in order.
    pub fn missing(&self) -> Vec<Range> {
        self.unclaimed(Range::new(0, self.size))
    }

    /// Parts of `r` neither on disk nor being written. Runs on every chunk
    /// received, so it works on `r` alone instead of copying the sets.
    fn unclaimed(&self, r: Range) -> Vec<Range> {
        self.received.gaps(r).into_iter().flat_map(|g| self.writing.gaps(g)).collect()
    }

    /// Missing bytes that no connection is responsible for.
    fn unassigned(&self) -> Vec<Range> {
        let mut covered = IntervalSet::new();
        for a in self.assignments.values() {
            covered.insert(Range::new(a.start.min(a.end), a.end));
        }
        let mut out = Vec::new();
        for m in self.missing() {
            out.extend(covered.gaps(m));
        }
        out
    }

    fn conn_rate(&self, conn: ConnId, now: Instant) -> f64 {
        self.meters.get(&conn).map(|m| m.rate(now)).unwrap_or(0.0)
    }

    /// Gives `conn` (of `source`) a new range to fetch, or `None` when there
    /// is nothing useful for it to do right now.
    pub fn assign(&mut self, conn: ConnId, source: SourceId, now: Instant) -> Option<Range> {
        self.assignments.remove(&conn);
        // 1. Unassigned bytes, avoiding pieces this source sent bad copies
        // of while another source is at work to fetch them instead.
        let unassigned = self.unassigned();
        let pick = unassigned.iter().find(|r| !self.avoided(source, **r)).copied();
        if let Some(r) = pick {
            // End on a piece boundary so pieces complete early and verify.
            let mut end = (r.start + self.chunk).min(r.end);
            if end < r.end {
                let aligned = end / self.piece_size * self.piece_size;
                if aligned > r.start {
                    end = aligned;
                }
            }
            return Some(self.give(conn, source, Range::new(r.start, end), false));
        }

        // 2. Split the outstanding range that would finish last.
        let my_rate = self.conn_rate(conn, now);
        let mut best: Option<(ConnId, f64)> = None;
        for (&c, a) in &self.assignments {
            if a.end.saturating_sub(a.requested) < MIN_SPLIT || self.avoided(source, Range::new(a.requested, a.end)) {
                continue;
            }
            let t = (a.end - a.start) as f64 / self.conn_rate(c, now).max(1.0);
            if best.map(|(_, bt)| t > bt).unwrap_or(true) {
                best = Some((c, t));
            }
        }
        if let Some((victim, _)) = best {
            let vr = self.conn_rate(victim, now);
            let a = &self.assignments[&victim];
            // Both should finish together: the victim keeps bytes in
            // proportion to its speed. Unknown speeds split in half.
            let frac = if vr > 0.0 && my_rate > 0.0 { vr / (vr + my_rate) } else { 0.5 };
            let remaining = a.end - a.start;
            let split = (a.start + (remaining as f64 * frac) as u64).max(a.requested).min(a.end);
            if a.end - split >= 1 {
                let end = a.end;
                if let Some(v) = self.assignments.get_mut(&victim) {
                    v.end = split;
                }
                return Some(self.give(conn, source, Range::new(split, end), false));
            }
        }

        // 3. End game: duplicate a slow owner's outstanding bytes.
        let mut best: Option<(ConnId, f64)> = None;
        for (&c, a) in &self.assignments {
            if a.source == source
                || a.duplicated
                || a.start >= a.end
                || self.avoided(source, Range::new(a.start, a.end))
            {
                continue;
            }
            let t = (a.end - a.start) as f64 / self.conn_rate(c, now).max(1.0);
            if t >= DUPLICATE_AFTER.as_secs_f64() && best.map(|(_, bt)| t > bt).unwrap_or(true) {
                best = Some((c, t));
            }
        }
        if let Some((victim, _)) = best {
            if let Some(v) = self.assignments.get_mut(&victim) {
                v.duplicated = true;
                let r = Range::new(v.start, v.end);
                return Some(self.give(conn, source, r, true));
            }
        }
        None
    }

    /// The download has `n` sources, all usable for now.
    pub fn set_sources(&mut self, n: usize) {
        self.alive = vec![true; n];
    }

    /// `source` was dropped or excluded: pieces it sent bad copies of may
    /// no longer wait for it to be replaced by another source.
    pub fn source_dead(&mut self, source: SourceId) {
        if let Some(a) = self.alive.get_mut(source) {
            *a = false;
        }
    }

    /// Whether `source` should leave `r` to others: it touches a piece this
    /// source sent a bad copy of, and some other source that did not is
    /// still in the download. When every remaining source sent a bad copy,
    /// nobody is avoided (otherwise the piece would never be fetched).
    fn avoided(&self, source: SourceId, r: Range) -> bool {
        if self.avoid.is_empty() {
            return false;
        }
        self.pieces_of(r).any(|p| {
            let Some(bad) = self.avoid.get(&p) else { return false };
            bad.contains(&source) && self.someone_else_for(p, source, bad)
        })
    }

    /// Another usable source exists that did not send a bad copy of `p`.
    fn someone_else_for(&self, _p: usize, source: SourceId, bad: &HashSet<SourceId>) -> bool {
        let by_assignment = self.assignments.values().any(|a| a.source != source && !bad.contains(&a.source));
        let by_liveness = self.alive.iter().enumerate().any(|(s, alive)| *alive && s != source && !bad.contains(&s));
        by_assignment || by_liveness
    }

    /// Generation of piece `p`: bumped every time it fails, so a hash
    /// computed over an earlier copy is never taken for the current one.
    pub fn generation(&self, p: usize) -> u32 {
        self.generations.get(&p).copied().unwrap_or(0)
    }

    fn give(&mut self, conn: ConnId, source: SourceId, r: Range, duplicated: bool) -> Range {
        self.assignments
            .insert(conn, Assignment { source, start: r.start, requested: r.start, end: r.end, duplicated });
        self.meters.entry(conn).or_insert(Meter { last: Instant::now(), rate: 0.0 });
        r
    }

    /// Next byte range `conn` should send a `READ` for, at most `max` bytes.
    pub fn next_request(&mut self, conn: ConnId, max: u64) -> Option<Range> {
        let a = self.assignments.get_mut(&conn)?;
        if a.requested >= a.end {
            return None;
        }
        let r = Range::new(a.requested, (a.requested + max).min(a.end));
        a.requested = r.end;
        Some(r)
    }

    /// Whether `conn` has asked for everything it was assigned.
    pub fn fully_requested(&self, conn: ConnId) -> bool {
        self.assignments.get(&conn).map(|a| a.requested >= a.end).unwrap_or(true)
    }

    /// Bytes `r` arrived on `conn`. Returns the parts nobody has claimed;
    /// the caller must write them and then call [`Scheduler::commit`] (or
    /// [`Scheduler::unclaim`] if the write failed).
    pub fn claim(&mut self, conn: ConnId, r: Range, now: Instant) -> Vec<Range> {
        if let Some(m) = self.meters.get_mut(&conn) {
            m.update(r.len(), now);
        }
        if let Some(a) = self.assignments.get_mut(&conn) {
            a.start = a.start.max(r.end);
        }
        let gaps = self.unclaimed(r);
        for g in &gaps {
            self.writing.insert(*g);
        }
        gaps
    }

    /// Claimed bytes `r` from `source` are on disk. Returns pieces that are
    /// now complete and must be verified.
    pub fn commit(&mut self, source: SourceId, r: Range) -> Vec<usize> {
        self.writing.remove(r);
        self.received.insert(r);
        let mut ready = Vec::new();
        for p in self.pieces_of(r) {
            let part = self.piece_range(p).intersect(&r).map(|x| x.len()).unwrap_or(0);
            let c = self.contributors.entry(p).or_default();
            match c.iter_mut().find(|(s, _)| *s == source) {
                Some((_, n)) => *n += part,
                None => c.push((source, part)),
            }
            if !self.verified[p] && !self.verifying.contains(&p) && self.received.contains_range(self.piece_range(p)) {
                self.verifying.insert(p);
                ready.push(p);
            }
        }
        ready
    }

    /// A claimed write failed; the bytes are missing again.
    pub fn unclaim(&mut self, r: Range) {
        self.writing.remove(r);
    }

    pub fn piece_verified(&mut self, p: usize) {
        self.verifying.remove(&p);
        self.contributors.remove(&p);
        if p < self.verified.len() && !self.verified[p] {
            self.verified[p] = true;
            self.verified_count += 1;
        }
    }

    /// Piece `p` failed verification: forget its bytes and report who sent them.
    pub fn piece_failed(&mut self, p: usize) -> BadPiece {
        *self.generations.entry(p).or_insert(0) += 1;
        self.verifying.remove(&p);
        let r = self.piece_range(p);
        self.received.remove(r);
        let contributors = self.contributors.remove(&p).unwrap_or_default();
        self.avoid.entry(p).or_default().extend(contributors.iter().map(|(s, _)| *s));
        BadPiece { piece: p, contributors }
    }

    /// Bytes found on disk (resume): they count as received, and the
    /// pieces they complete are returned for verification. Nobody gets a
    /// strike if they turn out bad.
    pub fn preload(&mut self, r: Range) -> Vec<usize> {
        let r = Range::new(r.start.min(self.size), r.end.min(self.size));
        self.received.insert(r);
        let mut ready = Vec::new();
        for p in self.pieces_of(r) {
            if !self.verified[p] && !self.verifying.contains(&p) && self.received.contains_range(self.piece_range(p)) {
                self.verifying.insert(p);
                ready.push(p);
            }
        }
        ready
    }

    /// Indices of verified pieces, ascending.
    pub fn verified_pieces(&self) -> impl Iterator<Item = u64> + '_ {
        self.verified.iter().enumerate().filter(|(_, v)| **v).map(|(i, _)| i as u64)
    }

    /// Received byte ranges outside verified pieces (exact partial progress).
    pub fn received_unverified(&self) -> Vec<Range> {
        let mut out = Vec::new();
        for r in self.received.ranges() {
            let mut cur = r.start;
            while cur < r.end {
                let p = (cur / self.piece_size) as usize;
                let pr = self.piece_range(p);
                let end = pr.end.min(r.end);
                if !self.verified.get(p).copied().unwrap_or(false) {
                    match out.last_mut() {
                        Some(Range { end: e, .. }) if *e == cur => *e = end,
                        _ => out.push(Range::new(cur, end)),
                    }
                }
                cur = end;
            }
        }
        out
    }

    /// `conn` is gone (failed, cancelled or done); its bytes that did not
    /// arrive are up for grabs again.
    pub fn release(&mut self, conn: ConnId) {
        if let Some(a) = self.assignments.remove(&conn) {
            // A duplicate's owner is free to be duplicated again.
            for other in self.assignments.values_mut() {
                if other.duplicated && other.start < a.end && a.start < other.end {
                    other.duplicated = false;
                }
            }
        }
        self.meters.remove(&conn);
    }

    /// Estimated bytes/s of a connection (0 when unknown).
    pub fn conn_speed(&self, conn: ConnId, now: Instant) -> f64 {
        self.conn_rate(conn, now)
    }

    /// Active assignment of a connection, for status displays and tests.
    pub fn assignment(&self, conn: ConnId) -> Option<Range> {
        self.assignments.get(&conn).map(|a| Range::new(a.start, a.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u32 = 256 << 10;

    /// Drives the scheduler like the engine does, with simulated connections.
    #[derive(Debug, Clone)]
    enum Op {
        /// Connection `c` receives up to `n` bytes of its outstanding requests.
        Deliver(u8, u32),
        /// Connection `c` dies.
        Fail(u8),
        /// Connection `c` asks for work / requests more.
        Pull(u8),
        /// Corrupt: the next completed piece fails verification once.
        Corrupt,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 1u32..2_000_000).prop_map(|(c, n)| Op::Deliver(c, n)),
            1 => (0u8..4).prop_map(Op::Fail),
            3 => (0u8..4).prop_map(Op::Pull),
            1 => Just(Op::Corrupt),
        ]
    }

    struct Sim {
        s: Scheduler,
        /// Outstanding requests per connection (in order).
        inflight: HashMap<ConnId, Vec<Range>>,
        /// conn id generation per slot, so a failed conn comes back as new.
        gen: [u64; 4],
        writes: Vec<u32>,
        corrupt_next: bool,
    }

    impl Sim {
        fn new(size: u64) -> Sim {
            Sim {
                s: Scheduler::new(size, PS),
                inflight: HashMap::new(),
                gen: [0; 4],
                writes: vec![0; size as usize / 4096 + 1],
                corrupt_next: false,
            }
        }
        fn conn(&self, slot: u8) -> ConnId {
            self.gen[slot as usize] * 10 + slot as u64
        }
        fn pull(&mut self, slot: u8) {
            let c = self.conn(slot);
            let now = Instant::now();
            let q = self.inflight.entry(c).or_default();
            if q.is_empty() && self.s.fully_requested(c) && self.s.assign(c, slot as usize, now).is_none() {
                return;
            }
            while self.inflight[&c].len() < 4 {
                match self.s.next_request(c, 512 << 10) {
                    Some(r) => self.inflight.get_mut(&c).unwrap().push(r),
                    None => break,
                }
            }
        }
        fn deliver(&mut self, slot: u8, mut n: u64) {
            let c = self.conn(slot);
            let now = Instant::now();
            while n > 0 {
                let Some(front) = self.inflight.get_mut(&c).and_then(|q| q.first_mut()) else { return };
                let take = n.min(front.len());
                let r = Range::new(front.start, front.start + take);
                front.start += take;
                if front.is_empty() {
                    self.inflight.get_mut(&c).unwrap().remove(0);
                }
                n -= take;
                for g in self.s.claim(c, r, now) {
                    let done = self.s.commit(slot as usize, g);
                    for p in done {
                        if self.corrupt_next {
                            self.corrupt_next = false;
                            self.s.piece_failed(p);
                        } else {
                            self.s.piece_verified(p);
                        }
                    }
                }
            }
        }
        fn fail(&mut self, slot: u8) {
            let c = self.conn(slot);
            self.inflight.remove(&c);
            self.s.release(c);
            self.gen[slot as usize] += 1;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        /// Whatever happens, every byte ends up received exactly once in
        /// the final accounting, with nothing left claimed.
        #[test]
        fn any_interleaving_covers_every_byte(size in 0u64..(3 << 20), ops in proptest::collection::vec(op(), 0..200)) {
            let mut sim = Sim::new(size);
            for o in ops {
                match o {
                    Op::Deliver(c, n) => sim.deliver(c, n as u64),
                    Op::Fail(c) => sim.fail(c),
                    Op::Pull(c) => sim.pull(c),
                    Op::Corrupt => sim.corrupt_next = true,
                }
                // Invariant: received and writing never overlap; writing is
                // empty between operations (writes are synchronous here).
                prop_assert_eq!(sim.s.writing.covered(), 0);
            }
            // Drain: keep pulling and delivering; bounded.
            sim.corrupt_next = false;
            for _ in 0..10_000 {
                if sim.s.is_complete() { break; }
                for slot in 0..4u8 {
                    sim.pull(slot);
                    sim.deliver(slot, 1 << 20);
                }
            }
            prop_assert!(sim.s.is_complete(), "not complete: missing {:?}", sim.s.missing());
            prop_assert_eq!(sim.s.received_bytes(), size);
            prop_assert!(sim.s.missing().is_empty());
            let _ = &sim.writes;
        }
    }

    #[test]
    fn failed_connection_resumes_at_exact_byte() {
        let mut s = Scheduler::new(8 << 20, PS);
        let now = Instant::now();
        let r = s.assign(1, 0, now).unwrap();
        assert_eq!(r.start, 0);
        let req = s.next_request(1, 1 << 20).unwrap();
        let got = s.claim(1, Range::new(req.start, 300_001), now);
        assert_eq!(got, vec![Range::new(0, 300_001)]);
        s.commit(0, got[0]);
        s.release(1);
        let r2 = s.assign(2, 1, now).unwrap();
        assert_eq!(r2.start, 300_001, "continues at the exact byte");
    }

    #[test]
    fn idle_connection_steals_back_half() {
        let mut s = Scheduler::new(4 << 20, PS);
        let now = Instant::now();
        assert_eq!(s.assign(1, 0, now).unwrap(), Range::new(0, 4 << 20));
        s.next_request(1, 512 << 10);
        let stolen = s.assign(2, 1, now).unwrap();
        assert!(stolen.start >= 512 << 10 && stolen.end == 4 << 20, "{stolen:?}");
        assert_eq!(s.assignment(1).unwrap().end, stolen.start);
    }

    /// Review finding: two sources both wrote part of a bad piece; neither
    /// may refuse it forever.
    #[test]
    fn a_piece_both_sources_spoiled_is_still_fetched() {
        let mut s = Scheduler::new(PS as u64, PS);
        s.set_sources(2);
        let now = Instant::now();
        let r = s.assign(1, 0, now).unwrap();
        s.next_request(1, r.len());
        let half = Range::new(0, r.len() / 2);
        let g = s.claim(1, half, now);
        s.commit(0, g[0]);
        let rest = Range::new(r.len() / 2, r.len());
        let g = s.claim(2, rest, now);
        assert_eq!(s.commit(1, g[0]), vec![0]);
        let bad = s.piece_failed(0);
        assert_eq!(bad.contributors.len(), 2);
        s.release(1);
        s.release(2);
        assert_eq!(s.generation(0), 1);
        assert!(s.assign(3, 0, now).is_some() || s.assign(4, 1, now).is_some(), "nobody fetches the piece again");
    }

    #[test]
    fn bad_piece_is_refetched_and_reported() {
        let mut s = Scheduler::new(PS as u64, PS);
        let now = Instant::now();
        let r = s.assign(1, 0, now).unwrap();
        s.next_request(1, r.len());
        let g = s.claim(1, r, now);
        assert_eq!(s.commit(0, g[0]), vec![0]);
        let bad = s.piece_failed(0);
        assert_eq!(bad.contributors, vec![(0, PS as u64)]);
        assert_eq!(s.missing(), vec![r]);
        s.release(1);
        // Source 1 gets it; source 0 would too, but only as a last resort.
        assert_eq!(s.assign(2, 1, now), Some(r));
    }
}
