//! The scheduler owns which connection fetches which bytes of a download.
//!
//! It is plain synchronous data (the engine keeps it under a mutex), so its
//! invariants are tested without sockets. Owns:
//!
//! * `received`: bytes on disk; `writing`: bytes claimed by a writer but not
//!   yet written. A byte is written by exactly one writer: the first
//!   connection to *claim* it. Late copies of the same bytes are discarded.
//! * assignments: each `READ` a connection has open is a [`Ticket`] for a
//!   range `[start, end)`, where `start` is the next byte expected to arrive.
//!   A connection asks for its whole assignment in one streamed `READ`, so
//!   TCP flow control, not the request size, paces it at any round-trip
//!   time. Another connection may take back the end of an assignment (the
//!   engine then sends `TRIM`); a connection that dies releases its
//!   assignments and their unreceived bytes become unassigned again, from
//!   the exact byte reached.
//! * pieces: complete pieces go to verification; a piece that fails is
//!   removed from `received`, its contributors are reported for a strike, and
//!   it is fetched again, preferably from a source that did not send it.
//!
//! Work is pulled: a connection that is about to run out of work (less than
//! about one round trip of bytes left) asks [`Scheduler::assign`]. A run of
//! unassigned bytes goes first, whole; then the assignment whose connection
//! would finish last is split, the newcomer taking the back part sized by
//! relative speed, but never the bytes the victim's server has probably
//! already sent (its rate times its round-trip time); finally, when nothing
//! is left to split, a range whose owner would need more than
//! [`DUPLICATE_AFTER`] to finish is requested a second time and the first
//! copy wins.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mftd_common::range::{IntervalSet, Range};

pub type ConnId = u64;
pub type SourceId = usize;
/// One open `READ`: an assignment of a connection.
pub type Ticket = u64;

/// Smallest unrequested tail worth splitting off another connection.
pub const MIN_SPLIT: u64 = 64 << 10;
/// An owner expected to need longer than this for its remaining bytes gets a
/// duplicate requester at the end of the download.
pub const DUPLICATE_AFTER: Duration = Duration::from_millis(1500);
/// What [`Scheduler::lag`] starts from before any TRIM was answered: about
/// what a 4 MiB socket buffer holds at 200 MB/s.
const LAG_PRIOR: f64 = 0.02;
/// Time constant of the per-connection speed estimate.
const SPEED_TAU: f64 = 0.5;
/// A connection delivering less than this fraction of what the other
/// connections of the download deliver each (their mean) is *crawling*: its
/// range is taken over without waiting for its `TRIMMED` (see
/// [`Scheduler::crawling`]).
const CRAWL_FRACTION: f64 = 1.0 / 16.0;
/// Longest others leave a piece to the one source it is fetched again from
/// (see [`Scheduler::refetch_from`]): a slow source cannot hold it for long.
const SOLO_MAX: Duration = Duration::from_secs(10);
/// How long a connection may carry a range before it can count as crawling:
/// a fresh connection is still ramping up.
const CRAWL_GRACE: f64 = 1.0;

#[derive(Debug, Clone)]
struct Assignment {
    conn: ConnId,
    source: SourceId,
    /// Next byte expected to arrive.
    start: u64,
    end: u64,
    /// Another connection is fetching the same bytes (end game).
    duplicated: bool,
    /// When the range was handed out.
    granted: Instant,
    /// Taken from this ticket's range: not to be requested until its owner
    /// learned (TRIMMED) where its server really stops, so no byte already
    /// on its way is fetched twice; or until the deadline for that answer
    /// passed (see [`Scheduler::trim_deadline`]).
    held_by: Option<Ticket>,
}

/// A range handed to a connection by [`Scheduler::assign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub ticket: Ticket,
    pub range: Range,
    /// The connection whose assignment was shortened to make room: it must
    /// send a `TRIM`, and this range waits for its answer (see
    /// [`Scheduler::held`]).
    pub shrunk: Option<ConnId>,
}

/// Whether a range taken from another connection may be requested yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The owner has not heard back from its server yet.
    Waiting,
    /// Request this (possibly shorter) range now.
    Ready(Range),
    /// Nothing is left of it: the owner's server sent all of it.
    Gone,
}

#[derive(Debug, Clone, Copy)]
struct ConnInfo {
    source: SourceId,
    meter: Meter,
    /// Round-trip time in seconds (0 when unknown).
    rtt: f64,
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
        // The first sample sets the estimate: starting from zero would
        // underrate a fresh connection for a whole time constant.
        self.rate = if self.rate == 0.0 { inst } else { self.rate + alpha * (inst - self.rate) };
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

/// Which source wrote which bytes of a piece: the exact spans, so a bad
/// piece can be blamed on the sources whose bytes were wrong.
pub type Spans = Vec<(SourceId, Range)>;

/// The author of bytes found on disk when a run started (resume): whoever
/// sent them, nobody can be struck for them, and nobody else is to blame
/// for them either.
pub const FROM_DISK: SourceId = SourceId::MAX;

#[derive(Debug)]
pub struct Scheduler {
    size: u64,
    piece_size: u64,
    received: IntervalSet,
    writing: IntervalSet,
    verified: Vec<bool>,
    verified_count: usize,
    verifying: HashSet<usize>,
    /// Bytes each source wrote into each unverified piece.
    contributors: HashMap<usize, Vec<(SourceId, u64)>>,
    /// The exact spans each source wrote into each unverified piece.
    spans: HashMap<usize, Spans>,
    /// Pieces to fetch again from one source alone (whole, so its copy
    /// tells whose bytes were wrong in the last one): others leave them to
    /// it while it has a connection open.
    solo: HashMap<usize, (SourceId, Instant)>,
    /// Sources that sent a bad copy of a piece; asked last for it.
    avoid: HashMap<usize, HashSet<SourceId>>,
    assignments: HashMap<Ticket, Assignment>,
    conns: HashMap<ConnId, ConnInfo>,
    next_ticket: Ticket,
    /// Connections the engine runs: a run of unassigned bytes is shared
    /// among them up front instead of being split later.
    expected_conns: usize,
    /// How far behind a TRIM a server's bytes run, in seconds of the
    /// connection's rate: the round trip plus what socket buffers hold
    /// (megabytes on a fast local link). Learned from TRIMMED answers.
    lag: f64,
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
            received: IntervalSet::new(),
            writing: IntervalSet::new(),
            verified: vec![false; pieces],
            verified_count: 0,
            verifying: HashSet::new(),
            contributors: HashMap::new(),
            spans: HashMap::new(),
            solo: HashMap::new(),
            avoid: HashMap::new(),
            assignments: HashMap::new(),
            conns: HashMap::new(),
            next_ticket: 1,
            expected_conns: 1,
            lag: LAG_PRIOR,
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
    pub fn piece_range(&self, i: usize) -> Range {
        mftd_common::proto::piece_range(self.size, self.piece_size as u32, i as u64)
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
        self.conns.get(&conn).map(|c| c.meter.rate(now)).unwrap_or(0.0)
    }

    /// Speed of `conn`, or while it has none yet, the mean speed of the
    /// other connections to the same source.
    fn expected_rate(&self, conn: ConnId, source: SourceId, now: Instant) -> f64 {
        let own = self.conn_rate(conn, now);
        if own > 0.0 {
            return own;
        }
        let peers: Vec<f64> = self
            .conns
            .iter()
            .filter(|(c, i)| **c != conn && i.source == source)
            .map(|(_, i)| i.meter.rate(now))
            .filter(|r| *r > 0.0)
            .collect();
        if peers.is_empty() {
            0.0
        } else {
            peers.iter().sum::<f64>() / peers.len() as f64
        }
    }

    /// Registers `conn` (of `source`) with its measured round-trip time.
    pub fn open_conn(&mut self, conn: ConnId, source: SourceId, rtt: Duration, now: Instant) {
        self.conns.insert(conn, ConnInfo { source, meter: Meter { last: now, rate: 0.0 }, rtt: rtt.as_secs_f64() });
    }

    /// Bytes `conn` still expects over all its open tickets.
    pub fn pending(&self, conn: ConnId) -> u64 {
        self.assignments.values().filter(|a| a.conn == conn).map(|a| a.end.saturating_sub(a.start)).sum()
    }

    /// Bytes of a ticket's range that the server has probably sent already:
    /// its connection's rate times its round-trip time, with margin. Only
    /// the oldest ticket of a connection is being sent.
    fn in_flight(&self, t: Ticket, a: &Assignment, now: Instant) -> u64 {
        let front = !self.assignments.iter().any(|(o, b)| b.conn == a.conn && *o < t);
        if !front {
            return 0;
        }
        let info = self.conns.get(&a.conn);
        let ahead = info.map(|i| i.meter.rate(now) * (i.rtt * 1.5).max(self.lag * 1.2)).unwrap_or(0.0);
        ahead as u64 + MIN_SPLIT
    }

    /// Whether the connection owning `a` has gone quiet: nothing arrived
    /// for several round trips (at least 300 ms) although it is owed bytes.
    /// Its range is then taken over without waiting for the idle timeout
    /// (a silently dead link sends no reset).
    fn stalled(&self, a: &Assignment, now: Instant) -> bool {
        let Some(c) = self.conns.get(&a.conn) else { return false };
        let quiet = (4.0 * (c.rtt + self.lag)).max(0.3);
        let since_data = now.saturating_duration_since(c.meter.last).as_secs_f64();
        let since_grant = now.saturating_duration_since(a.granted).as_secs_f64();
        a.start < a.end && since_data > quiet && since_grant > quiet
    }

    /// Whether the connection owning `a` delivers far below what the rest of
    /// the download achieves: less than [`CRAWL_FRACTION`] of the mean rate
    /// of the other connections, after [`CRAWL_GRACE`] to ramp up. A source
    /// trickling a byte at a time is never stalled, but it is crawling, and
    /// it loses its range without being waited for.
    fn crawling(&self, a: &Assignment, now: Instant) -> bool {
        let Some(c) = self.conns.get(&a.conn) else { return false };
        let held_for = now.saturating_duration_since(a.granted).as_secs_f64();
        if a.start >= a.end || held_for < CRAWL_GRACE.max(4.0 * c.rtt) {
            return false;
        }
        let others: Vec<f64> = self
            .conns
            .iter()
            .filter(|(id, _)| **id != a.conn)
            .map(|(_, i)| i.meter.rate(now))
            .filter(|r| *r > 0.0)
            .collect();
        if others.is_empty() {
            return false;
        }
        let mean = others.iter().sum::<f64>() / others.len() as f64;
        c.meter.rate(now) < mean * CRAWL_FRACTION
    }

    /// Whether the owner of `a` is not worth waiting for: stalled or
    /// crawling.
    fn lagging(&self, a: &Assignment, now: Instant) -> bool {
        self.stalled(a, now) || self.crawling(a, now)
    }

    /// How long a range taken from `owner`'s connection waits for its
    /// `TRIMMED` before it is requested anyway: the answer follows the TRIM
    /// by a round trip plus what the owner's buffers hold (learned from
    /// earlier answers), so four times that, at least 300 ms. Bytes the
    /// owner still sends past the split are then late copies, discarded.
    pub fn trim_deadline(&self, owner: ConnId) -> Duration {
        let rtt = self.conns.get(&owner).map(|c| c.rtt).unwrap_or(0.0);
        Duration::from_secs_f64((4.0 * (rtt + self.lag)).max(0.3))
    }

    /// Whether `a`'s owner has not received a byte yet but was granted the
    /// range so recently that all of it may well be on its way: neither
    /// split nor duplicated until it looks stuck (a loaded machine can take
    /// a while to schedule the owner's reader).
    fn fresh(&self, a: &Assignment, now: Instant) -> bool {
        let rtt = self.conns.get(&a.conn).map(|c| c.rtt).unwrap_or(0.0);
        let patience = 2.0 * (rtt + self.lag) + 0.05;
        self.conn_rate(a.conn, now) <= 0.0 && now.saturating_duration_since(a.granted).as_secs_f64() < patience
    }

    /// The engine runs `n` connections now.
    pub fn set_expected_conns(&mut self, n: usize) {
        self.expected_conns = n.max(1);
    }

    /// A TRIM of `conn`'s range was answered with an end `overshoot` bytes
    /// past what was asked: that many were already on their way.
    pub fn observe_overshoot(&mut self, conn: ConnId, overshoot: u64, now: Instant) {
        let rate = self.conn_rate(conn, now);
        if rate > 0.0 {
            let lag = overshoot as f64 / rate;
            // Remember the worst recent lag, forgetting slowly.
            self.lag = (self.lag * 0.9).max(lag.min(5.0)).max(LAG_PRIOR);
        }
    }

    /// How long before its open ranges run dry `conn` should ask for the
    /// next one, in seconds: a range taken from another connection starts
    /// only when that one's TRIMMED came back, a round trip plus what its
    /// buffers hold.
    pub fn lead_time(&self, conn: ConnId) -> f64 {
        let rtt = self.conns.get(&conn).map(|c| c.rtt).unwrap_or(0.0);
        2.0 * rtt + 2.0 * self.lag
    }

    /// Gives `conn` (of `source`) a new range to fetch, or `None` when there
    /// is nothing useful for it to do right now.
    pub fn assign(&mut self, conn: ConnId, source: SourceId, now: Instant) -> Option<Grant> {
        // 1. Unassigned bytes, avoiding pieces this source sent bad copies
        // of while another source is at work to fetch them instead. A whole
        // run at once: others take back its end as they come free.
        let unassigned = self.unassigned();
        let pick = unassigned.iter().find_map(|r| self.first_not_avoided(source, *r));
        if let Some(r) = pick {
            // A fair share of what is missing, so connections starting
            // together do not split each other (splitting a range whose
            // bytes are already on their way fetches them twice).
            let missing: u64 = unassigned.iter().map(|r| r.len()).sum();
            let busy: HashSet<ConnId> = self.assignments.values().map(|a| a.conn).collect();
            let idle = self.expected_conns.saturating_sub(busy.len()).max(1);
            let share = missing.div_ceil(idle as u64).max(self.piece_size);
            let mut end = r.end;
            if r.len() > share + share / 2 {
                end = ((r.start + share).div_ceil(self.piece_size) * self.piece_size).min(r.end);
            }
            return Some(self.give(conn, source, Range::new(r.start, end), false, None));
        }

        // 2. Split the assignment whose connection would finish last.
        let my_rate = self.expected_rate(conn, source, now);
        // What a new READ costs before its first byte arrives: a round trip,
        // and the victim's bytes already on their way are lost work.
        let my_start = self.conns.get(&conn).map(|c| c.rtt).unwrap_or(0.0) + self.lag;
        let mut best: Option<(Ticket, f64, u64)> = None;
        for (&t, a) in &self.assignments {
            if a.conn == conn {
                continue;
            }
            // A lagging owner has next to nothing on its way: everything it
            // has not delivered may be taken (a late copy is discarded).
            let floor = if self.lagging(a, now) { a.start } else { a.start.saturating_add(self.in_flight(t, a, now)) };
            if a.end.saturating_sub(floor) < MIN_SPLIT || self.avoided(source, Range::new(floor, a.end)) {
                continue;
            }
            // Not worth a READ if the owner gets there first anyway.
            let vr = self.conn_rate(a.conn, now);
            if vr > 0.0 && ((a.end - floor) as f64 / vr) < my_start {
                continue;
            }
            if self.fresh(a, now) {
                continue;
            }
            let rate = if self.lagging(a, now) { 0.0 } else { self.conn_rate(a.conn, now) };
            let when = self.pending(a.conn) as f64 / rate.max(1.0);
            if best.map(|(_, bt, _)| when > bt).unwrap_or(true) {
                best = Some((t, when, floor));
            }
        }
        if let Some((victim, _, floor)) = best {
            let a = &self.assignments[&victim];
            let vr = self.conn_rate(a.conn, now);
            // Both should finish together: the victim keeps bytes in
            // proportion to its speed. Unknown speeds split in half; a
            // stalled owner keeps only what may still be on its way.
            let lagging = self.lagging(a, now);
            let frac = if lagging {
                0.0
            } else if vr > 0.0 && my_rate > 0.0 {
                vr / (vr + my_rate)
            } else {
                0.5
            };
            let remaining = a.end - a.start;
            let mut split = (a.start + (remaining as f64 * frac) as u64).max(floor);
            // On a piece boundary, so both sides can hash whole pieces
            // (not for a lagging owner: it would keep the rest of its piece).
            let aligned = split.div_ceil(self.piece_size) * self.piece_size;
            if aligned < a.end && !lagging {
                split = aligned;
            }
            if split < a.end {
                let end = a.end;
                let vconn = a.conn;
                if let Some(v) = self.assignments.get_mut(&victim) {
                    v.end = split;
                }
                // A stalled or crawling owner's server will not answer the
                // TRIM soon: what it may still send is small next to what
                // it owes, and a late copy of it is discarded.
                let stalled = lagging;
                let g = self.give(conn, source, Range::new(split, end), false, Some(vconn));
                if let Some(a) = self.assignments.get_mut(&g.ticket) {
                    a.held_by = (!stalled).then_some(victim);
                }
                return Some(g);
            }
        }

        // 3. End game: duplicate a slow owner's outstanding bytes.
        let mut best: Option<(Ticket, f64)> = None;
        for (&t, a) in &self.assignments {
            if a.source == source
                || a.duplicated
                || a.start >= a.end
                || self.fresh(a, now)
                || self.avoided(source, Range::new(a.start, a.end))
            {
                continue;
            }
            let rate = if self.lagging(a, now) { 0.0 } else { self.conn_rate(a.conn, now) };
            let when = (a.end - a.start) as f64 / rate.max(1.0);
            // Worth it when the owner needs long, or when this connection
            // would clearly finish first (the last piece on a slow source).
            let mine = my_start + (a.end - a.start) as f64 / my_rate.max(1.0);
            let worth = when >= DUPLICATE_AFTER.as_secs_f64() || (my_rate > 0.0 && when > 2.0 * mine + 0.05);
            if worth && best.map(|(_, bt)| when > bt).unwrap_or(true) {
                best = Some((t, when));
            }
        }
        if let Some((victim, _)) = best {
            if let Some(v) = self.assignments.get_mut(&victim) {
                v.duplicated = true;
                let r = Range::new(v.start, v.end);
                return Some(self.give(conn, source, r, true, None));
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
        if self.avoid.is_empty() && self.solo.is_empty() {
            return false;
        }
        self.pieces_of(r).any(|p| {
            // A piece to fetch again from one source: its own, and left to
            // it by the others while it is connected (for at most SOLO_MAX).
            if let Some(&(s, since)) = self.solo.get(&p) {
                if s == source {
                    return false;
                }
                if since.elapsed() < SOLO_MAX
                    && self.alive.get(s).copied().unwrap_or(true)
                    && self.conns.values().any(|c| c.source == s)
                {
                    return true;
                }
            }
            let Some(bad) = self.avoid.get(&p) else { return false };
            bad.contains(&source) && self.someone_else_for(p, source, bad)
        })
    }

    /// The first stretch of `r`, piece by piece, that `source` need not
    /// leave to others: a run holding pieces avoided by different sources
    /// is still taken, each part by a source that may fetch it.
    fn first_not_avoided(&self, source: SourceId, r: Range) -> Option<Range> {
        if !self.avoided(source, r) {
            return Some(r);
        }
        let mut start: Option<u64> = None;
        for p in self.pieces_of(r) {
            let part = self.piece_range(p).intersect(&r)?;
            match (start, self.avoided(source, part)) {
                (None, false) => start = Some(part.start),
                (Some(s), true) => return Some(Range::new(s, part.start)),
                _ => {}
            }
        }
        start.map(|s| Range::new(s, r.end))
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

    fn give(&mut self, conn: ConnId, source: SourceId, r: Range, duplicated: bool, shrunk: Option<ConnId>) -> Grant {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let granted = Instant::now();
        self.assignments.insert(
            ticket,
            Assignment { conn, source, start: r.start, end: r.end, duplicated, granted, held_by: None },
        );
        self.conns.entry(conn).or_insert(ConnInfo {
            source,
            meter: Meter { last: Instant::now(), rate: 0.0 },
            rtt: 0.0,
        });
        Grant { ticket, range: r, shrunk }
    }

    /// Current end of `ticket`'s range (it shrinks when others take over
    /// its back part), or `None` once it is finished or released.
    pub fn end_of(&self, ticket: Ticket) -> Option<u64> {
        self.assignments.get(&ticket).map(|a| a.end)
    }

    /// Whether every byte `ticket` still expects is already on disk or being
    /// written by someone else: the connection can stop its `READ` now.
    pub fn exhausted(&self, ticket: Ticket) -> bool {
        match self.assignments.get(&ticket) {
            Some(a) => a.start >= a.end || self.unclaimed(Range::new(a.start, a.end)).is_empty(),
            None => true,
        }
    }

    /// Bytes `r` arrived on `conn` for `ticket`. Returns the parts nobody
    /// has claimed; the caller must write them and then call
    /// [`Scheduler::commit`] (or [`Scheduler::unclaim`] if the write failed).
    pub fn claim(&mut self, conn: ConnId, ticket: Ticket, r: Range, now: Instant) -> Vec<Range> {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.meter.update(r.len(), now);
        }
        if let Some(a) = self.assignments.get_mut(&ticket) {
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
            if let Some(span) = self.piece_range(p).intersect(&r) {
                let spans = self.spans.entry(p).or_default();
                match spans.last_mut() {
                    Some((s, last)) if *s == source && last.end == span.start => last.end = span.end,
                    _ => spans.push((source, span)),
                }
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
        self.spans.remove(&p);
        self.solo.remove(&p);
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
        self.spans.remove(&p);
        self.solo.remove(&p);
        self.avoid.entry(p).or_default().extend(contributors.iter().map(|(s, _)| *s));
        BadPiece { piece: p, contributors }
    }

    /// Who wrote which bytes of piece `p` (not verified yet).
    pub fn spans_of(&self, p: usize) -> Spans {
        self.spans.get(&p).cloned().unwrap_or_default()
    }

    /// Piece `p`, which failed with several sources' bytes in it, is to be
    /// fetched again whole from `source`: others leave it alone while that
    /// source has a connection open (so a source that is down does not
    /// hold it up).
    pub fn refetch_from(&mut self, p: usize, source: SourceId) {
        self.solo.insert(p, (source, Instant::now()));
    }

    /// Bytes found on disk (resume): they count as received, and the
    /// pieces they complete are returned for verification. Nobody gets a
    /// strike if they turn out bad.
    pub fn preload(&mut self, r: Range) -> Vec<usize> {
        let r = Range::new(r.start.min(self.size), r.end.min(self.size));
        self.received.insert(r);
        let mut ready = Vec::new();
        for p in self.pieces_of(r) {
            if let Some(span) = self.piece_range(p).intersect(&r) {
                self.spans.entry(p).or_default().push((FROM_DISK, span));
            }
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

    /// The `READ` of `ticket` ended; bytes of it that did not arrive are up
    /// for grabs again.
    pub fn finish(&mut self, ticket: Ticket) -> Vec<ConnId> {
        let woken = self.unhold(ticket);
        if let Some(a) = self.assignments.remove(&ticket) {
            // A duplicate's owner is free to be duplicated again.
            for other in self.assignments.values_mut() {
                if other.duplicated && other.start < a.end && a.start < other.end {
                    other.duplicated = false;
                }
            }
        }
        woken
    }

    /// Whether the range of `ticket` (granted with `shrunk`) may be
    /// requested now.
    pub fn held(&mut self, ticket: Ticket, now: Instant) -> Hold {
        // An owner that stalled or crawls since (a link gone silent, a
        // source trickling bytes) will not answer soon, and no owner is
        // waited for past the deadline of its answer: go ahead without its
        // TRIMMED.
        let owner_stalled = match self.assignments.get(&ticket).and_then(|a| a.held_by.map(|o| (a, o))) {
            Some((a, owner)) => self.assignments.get(&owner).is_none_or(|o| {
                self.lagging(o, now) || now.saturating_duration_since(a.granted) >= self.trim_deadline(o.conn)
            }),
            None => false,
        };
        if owner_stalled {
            if let Some(a) = self.assignments.get_mut(&ticket) {
                a.held_by = None;
            }
            self.skip_claimed(ticket);
        }
        match self.assignments.get(&ticket) {
            None => Hold::Gone,
            Some(a) if a.held_by.is_some() => Hold::Waiting,
            Some(a) if a.start >= a.end => Hold::Gone,
            Some(a) => Hold::Ready(Range::new(a.start, a.end)),
        }
    }

    /// The server of `ticket` answered a TRIM to `told` with `stops_at`:
    /// ranges taken from it at `told` start there instead (the bytes before
    /// come from `ticket`'s server) and may be requested. Returns their
    /// connections, to be woken.
    pub fn trimmed(&mut self, ticket: Ticket, told: u64, stops_at: u64) -> Vec<ConnId> {
        let mut woken = Vec::new();
        let held: Vec<Ticket> = self
            .assignments
            .iter()
            .filter(|(_, a)| a.held_by == Some(ticket) && a.start == told)
            .map(|(t, _)| *t)
            .collect();
        for t in held {
            if let Some(a) = self.assignments.get_mut(&t) {
                a.held_by = None;
                a.start = a.start.max(stops_at).min(a.end);
                woken.push(a.conn);
            }
            self.skip_claimed(t);
        }
        woken
    }

    /// Moves the start of `ticket` past bytes already on disk or being
    /// written (they arrived through the connection it was taken from).
    fn skip_claimed(&mut self, ticket: Ticket) {
        let Some(a) = self.assignments.get(&ticket) else { return };
        let first_gap = self.unclaimed(Range::new(a.start, a.end)).first().map(|g| g.start);
        if let Some(a) = self.assignments.get_mut(&ticket) {
            a.start = first_gap.unwrap_or(a.end);
        }
    }

    /// Ranges held for `ticket` go ahead as they are (its connection ended
    /// without an answer: whatever it did not receive is fetched again).
    fn unhold(&mut self, ticket: Ticket) -> Vec<ConnId> {
        let held: Vec<Ticket> =
            self.assignments.iter().filter(|(_, a)| a.held_by == Some(ticket)).map(|(t, _)| *t).collect();
        let mut woken = Vec::new();
        for t in held {
            if let Some(a) = self.assignments.get_mut(&t) {
                a.held_by = None;
                woken.push(a.conn);
            }
            self.skip_claimed(t);
        }
        woken
    }

    /// `conn` is gone (failed, cancelled or done); its bytes that did not
    /// arrive are up for grabs again.
    pub fn release(&mut self, conn: ConnId) -> Vec<ConnId> {
        let tickets: Vec<Ticket> = self.assignments.iter().filter(|(_, a)| a.conn == conn).map(|(t, _)| *t).collect();
        let mut woken = Vec::new();
        for t in tickets {
            woken.extend(self.finish(t));
        }
        self.conns.remove(&conn);
        woken
    }

    /// Estimated bytes/s of a connection (0 when unknown).
    pub fn conn_speed(&self, conn: ConnId, now: Instant) -> f64 {
        self.conn_rate(conn, now)
    }

    /// Every open connection: its source, id, rate (bytes/s) and RTT (s).
    pub fn conn_stats(&self, now: Instant) -> Vec<(SourceId, ConnId, f64, f64)> {
        self.conns.iter().map(|(c, i)| (i.source, *c, i.meter.rate(now), i.rtt)).collect()
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

    /// One simulated open READ: the server sends from `next` up to the
    /// ticket's current end (it honours a TRIM at once).
    #[derive(Debug)]
    struct Req {
        ticket: Ticket,
        next: u64,
    }

    struct Sim {
        s: Scheduler,
        /// Open requests per connection (in order).
        inflight: HashMap<ConnId, Vec<Req>>,
        /// conn id generation per slot, so a failed conn comes back as new.
        gen: [u64; 4],
        corrupt_next: bool,
        /// Every byte handed out for writing so far (a failed piece's bytes
        /// leave it: they are to be written again).
        written: IntervalSet,
        /// Bytes handed out twice for writing (must stay 0).
        twice: u64,
    }

    impl Sim {
        fn new(size: u64) -> Sim {
            Sim {
                s: Scheduler::new(size, PS),
                inflight: HashMap::new(),
                gen: [0; 4],
                corrupt_next: false,
                written: IntervalSet::new(),
                twice: 0,
            }
        }
        fn conn(&self, slot: u8) -> ConnId {
            self.gen[slot as usize] * 10 + slot as u64
        }
        fn pull(&mut self, slot: u8) {
            let c = self.conn(slot);
            let now = Instant::now();
            if self.inflight.get(&c).map(|q| q.len()).unwrap_or(0) >= 2 {
                return;
            }
            if let Some(g) = self.s.assign(c, slot as usize, now) {
                self.inflight.entry(c).or_default().push(Req { ticket: g.ticket, next: g.range.start });
            }
        }
        fn deliver(&mut self, slot: u8, mut n: u64) {
            let c = self.conn(slot);
            let now = Instant::now();
            while n > 0 {
                let Some(front) = self.inflight.get_mut(&c).and_then(|q| q.first_mut()) else { return };
                let end = self.s.end_of(front.ticket).unwrap_or(front.next).max(front.next);
                let take = n.min(end - front.next);
                let r = Range::new(front.next, front.next + take);
                front.next += take;
                let ticket = front.ticket;
                if front.next >= end {
                    self.inflight.get_mut(&c).unwrap().remove(0);
                }
                n -= take;
                for g in self.s.claim(c, ticket, r, now) {
                    self.twice += self.written.intersecting(g).iter().map(|r| r.len()).sum::<u64>();
                    self.written.insert(g);
                    let done = self.s.commit(slot as usize, g);
                    for p in done {
                        if self.corrupt_next {
                            self.corrupt_next = false;
                            self.s.piece_failed(p);
                            self.written.remove(self.s.piece_range(p));
                        } else {
                            self.s.piece_verified(p);
                        }
                    }
                }
                if r.end >= end {
                    self.s.finish(ticket);
                }
                if take == 0 {
                    break;
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
                // No byte is handed out for writing twice, except again
                // after its piece failed verification.
                prop_assert_eq!(sim.twice, 0);
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
            prop_assert_eq!(sim.twice, 0);
            prop_assert_eq!(sim.written.covered(), size);
            prop_assert_eq!(sim.s.received_bytes(), size);
            prop_assert!(sim.s.missing().is_empty());
        }
    }

    #[test]
    fn failed_connection_resumes_at_exact_byte() {
        let mut s = Scheduler::new(8 << 20, PS);
        let now = Instant::now();
        let g = s.assign(1, 0, now).unwrap();
        assert_eq!(g.range, Range::new(0, 8 << 20), "a whole unassigned run at once");
        let got = s.claim(1, g.ticket, Range::new(0, 300_001), now);
        assert_eq!(got, vec![Range::new(0, 300_001)]);
        s.commit(0, got[0]);
        s.release(1);
        let g2 = s.assign(2, 1, now).unwrap();
        assert_eq!(g2.range.start, 300_001, "continues at the exact byte");
    }

    #[test]
    fn idle_connection_takes_back_half_beyond_what_is_in_flight() {
        let mut s = Scheduler::new(64 << 20, PS);
        let t0 = Instant::now();
        s.open_conn(1, 0, Duration::from_millis(100), t0);
        let g = s.assign(1, 0, t0).unwrap();
        // Connection 1 runs at about 10 MB/s with a 100 ms round trip:
        // about 1 MB is on its way and must stay with it.
        let mut at = 0;
        for i in 1..=20u32 {
            let now = t0 + Duration::from_millis(50 * i as u64);
            let r = Range::new(at, at + 500_000);
            for c in s.claim(1, g.ticket, r, now) {
                s.commit(0, c);
            }
            at = r.end;
        }
        let now = t0 + Duration::from_millis(1000);
        let stolen = s.assign(2, 1, now).unwrap();
        assert_eq!(stolen.shrunk, Some(1), "the victim is told to trim");
        assert_eq!(stolen.range.end, 64 << 20);
        assert_eq!(stolen.range.start % PS as u64, 0, "split on a piece boundary");
        assert!(stolen.range.start >= at + 1_000_000, "{stolen:?} would take bytes in flight");
        assert_eq!(s.end_of(g.ticket), Some(stolen.range.start));
        // Speeds unknown for the newcomer: about half of what is left.
        let left = (64u64 << 20) - at;
        assert!(stolen.range.len() <= left / 2 + (PS as u64) && stolen.range.len() >= left / 2 - 2_000_000);
    }

    #[test]
    fn a_range_taken_over_waits_for_trimmed_and_starts_where_the_owner_stops() {
        let mut s = Scheduler::new(64 << 20, PS);
        let t0 = Instant::now();
        s.open_conn(1, 0, Duration::from_millis(1), t0);
        let a = s.assign(1, 0, t0).unwrap();
        for i in 1..=10u64 {
            for c in s.claim(1, a.ticket, Range::new((i - 1) << 20, i << 20), t0 + Duration::from_millis(i)) {
                s.commit(0, c);
            }
        }
        // Still receiving (its last bytes 10 ms ago), past the patience for
        // a fresh owner.
        let now = t0 + Duration::from_millis(20);
        let b = s.assign(2, 1, now).unwrap();
        assert_eq!(b.shrunk, Some(1));
        assert_eq!(s.held(b.ticket, now), Hold::Waiting, "not requested before the owner's server answers");
        let told = b.range.start;
        // The owner's server had already sent 3 MiB past the TRIM point.
        assert_eq!(s.trimmed(a.ticket, told, told + (3 << 20)), vec![2]);
        assert_eq!(s.held(b.ticket, now), Hold::Ready(Range::new(told + (3 << 20), 64 << 20)));
        // A range whose bytes all came through the owner is gone.
        let mut s = Scheduler::new(16 << 20, PS);
        s.open_conn(1, 0, Duration::from_millis(1), t0);
        let a = s.assign(1, 0, t0).unwrap();
        for c in s.claim(1, a.ticket, Range::new(0, 1 << 20), t0 + Duration::from_millis(5)) {
            s.commit(0, c);
        }
        let b = s.assign(2, 1, now).unwrap();
        for c in s.claim(1, a.ticket, Range::new(1 << 20, 16 << 20), now) {
            s.commit(0, c);
        }
        assert_eq!(s.finish(a.ticket), vec![2], "the owner's READ ended without an answer to the TRIM");
        assert_eq!(s.held(b.ticket, now), Hold::Gone);
        // An owner whose link went silent will not answer: after a few
        // quiet round trips the range goes ahead without it.
        let mut s = Scheduler::new(16 << 20, PS);
        s.open_conn(1, 0, Duration::from_millis(1), t0);
        let a = s.assign(1, 0, t0).unwrap();
        for c in s.claim(1, a.ticket, Range::new(0, 1 << 20), t0 + Duration::from_millis(5)) {
            s.commit(0, c);
        }
        let b = s.assign(2, 1, t0 + Duration::from_millis(100)).unwrap();
        assert_eq!(s.held(b.ticket, t0 + Duration::from_millis(150)), Hold::Waiting);
        assert_eq!(s.held(b.ticket, t0 + Duration::from_secs(2)), Hold::Ready(b.range));
    }

    /// Issue 20: a range taken from an owner that keeps receiving but whose
    /// server never answers the TRIM waited forever.
    #[test]
    fn a_trimmed_answer_is_waited_for_only_until_its_deadline() {
        let mut s = Scheduler::new(64 << 20, PS);
        let t0 = Instant::now();
        s.open_conn(1, 0, Duration::from_millis(1), t0);
        let a = s.assign(1, 0, t0).unwrap();
        let mut at = 0;
        let mut deliver = |s: &mut Scheduler, now: Instant| {
            for c in s.claim(1, a.ticket, Range::new(at, at + (1 << 20)), now) {
                s.commit(0, c);
            }
            at += 1 << 20;
        };
        for i in 1..=10 {
            deliver(&mut s, t0 + Duration::from_millis(i));
        }
        let now = t0 + Duration::from_millis(20);
        let b = s.assign(2, 1, now).unwrap();
        assert_eq!(b.shrunk, Some(1));
        let deadline = s.trim_deadline(1);
        assert!(deadline >= Duration::from_millis(300), "{deadline:?}");
        // The owner keeps receiving (never stalled), its TRIMMED never comes.
        let mut t = now;
        while t < now + deadline - Duration::from_millis(50) {
            t += Duration::from_millis(10);
            deliver(&mut s, t);
            assert_eq!(s.held(b.ticket, t), Hold::Waiting, "at {:?}", t - now);
        }
        let late = now + deadline + Duration::from_millis(10);
        deliver(&mut s, late);
        assert!(matches!(s.held(b.ticket, late), Hold::Ready(_)), "past the deadline");
    }

    /// A connection trickling bytes is never stalled, but it crawls: its
    /// range is taken whole, without waiting for its TRIMMED.
    #[test]
    fn a_crawling_owner_loses_its_range_without_being_waited_for() {
        let mut s = Scheduler::new(64 << 20, PS);
        s.set_expected_conns(2);
        let t0 = Instant::now();
        s.open_conn(1, 0, Duration::from_millis(1), t0);
        s.open_conn(3, 1, Duration::from_millis(1), t0);
        let slow = s.assign(1, 0, t0).unwrap();
        let fast = s.assign(3, 1, t0).unwrap();
        assert_eq!(slow.range, Range::new(0, 32 << 20));
        // For two seconds the slow one gets 4 bytes every 200 ms, the fast
        // one 1 MiB every 100 ms.
        let (mut s_at, mut f_at) = (0u64, 32u64 << 20);
        for i in 1..=20u64 {
            let now = t0 + Duration::from_millis(100 * i);
            for c in s.claim(3, fast.ticket, Range::new(f_at, f_at + (1 << 20)), now) {
                s.commit(1, c);
            }
            f_at += 1 << 20;
            if i % 2 == 0 {
                for c in s.claim(1, slow.ticket, Range::new(s_at, s_at + 4), now) {
                    s.commit(0, c);
                }
                s_at += 4;
            }
        }
        let now = t0 + Duration::from_millis(2010);
        let a = slow_assignment(&s, slow.ticket);
        assert!(!s.stalled(&a, now), "a trickle is not a stall");
        assert!(s.crawling(&a, now));
        let g = s.assign(2, 1, now).unwrap();
        assert_eq!(g.shrunk, Some(1));
        assert_eq!(g.range.start, s_at, "everything the crawler has not delivered is taken");
        assert_eq!(s.held(g.ticket, now), Hold::Ready(g.range), "no wait for the crawler's TRIMMED");
    }

    fn slow_assignment(s: &Scheduler, t: Ticket) -> Assignment {
        s.assignments.get(&t).cloned().expect("assignment")
    }

    #[test]
    fn exhausted_when_others_wrote_the_rest() {
        let mut s = Scheduler::new(4 << 20, PS);
        let now = Instant::now();
        let a = s.assign(1, 0, now).unwrap();
        assert_eq!(a.range, Range::new(0, 4 << 20));
        // An end-game duplicate (another source) wrote the back part first.
        for c in s.claim(2, 999, Range::new(1 << 20, 4 << 20), now) {
            s.commit(1, c);
        }
        assert!(!s.exhausted(a.ticket), "1 still has its own front part to fetch");
        for c in s.claim(1, a.ticket, Range::new(0, 1 << 20), now) {
            s.commit(0, c);
        }
        assert!(s.exhausted(a.ticket));
    }

    #[test]
    fn connections_starting_together_share_instead_of_splitting() {
        let mut s = Scheduler::new(8 << 20, PS);
        s.set_expected_conns(4);
        let now = Instant::now();
        let grants: Vec<Grant> = (1..=4).map(|c| s.assign(c, 0, now).unwrap()).collect();
        for (i, g) in grants.iter().enumerate() {
            assert_eq!(g.range, Range::new(i as u64 * (2 << 20), (i as u64 + 1) * (2 << 20)));
            assert_eq!(g.shrunk, None);
        }
        // A fifth connection does not split owners that have not received
        // a byte yet: their bytes may all be on the way. Nor does one of
        // another source request them a second time (CI found 8 MiB
        // duplicates per owner whose reader a loaded machine ran late).
        assert_eq!(s.assign(5, 0, now), None);
        assert_eq!(s.assign(6, 1, now + Duration::from_millis(40)), None);
    }

    /// Review finding: two sources both wrote part of a bad piece; neither
    /// may refuse it forever.
    #[test]
    fn a_piece_both_sources_spoiled_is_still_fetched() {
        let mut s = Scheduler::new(PS as u64, PS);
        s.set_sources(2);
        let now = Instant::now();
        let g = s.assign(1, 0, now).unwrap();
        let r = g.range;
        let half = Range::new(0, r.len() / 2);
        let c = s.claim(1, g.ticket, half, now);
        s.commit(0, c[0]);
        let rest = Range::new(r.len() / 2, r.len());
        let c = s.claim(2, 0, rest, now);
        assert_eq!(s.commit(1, c[0]), vec![0]);
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
        let g = s.assign(1, 0, now).unwrap();
        let r = g.range;
        let c = s.claim(1, g.ticket, r, now);
        assert_eq!(s.commit(0, c[0]), vec![0]);
        let bad = s.piece_failed(0);
        assert_eq!(bad.contributors, vec![(0, PS as u64)]);
        assert_eq!(s.missing(), vec![r]);
        s.release(1);
        // Source 1 gets it; source 0 would too, but only as a last resort.
        assert_eq!(s.assign(2, 1, now).map(|g| g.range), Some(r));
    }

    /// Hostile review: a liar (source 0) wrote most of two adjacent pieces,
    /// each finished by a different honest source (1 and 2), and both
    /// failed. Each honest source now avoids the piece it helped spoil while
    /// the other is alive, and `assign` looks at whole unassigned runs: the
    /// run holding both pieces is avoided by everyone, so nobody ever
    /// fetches it (the liar dropped or not).
    #[test]
    fn adjacent_pieces_spoiled_with_different_honest_sources_are_still_fetched() {
        let ps = PS as u64;
        let mut s = Scheduler::new(4 * ps, PS);
        s.set_sources(3);
        let now = Instant::now();
        let put = |s: &mut Scheduler, src: SourceId, r: Range| {
            let c = s.claim(99, 0, r, now);
            let mut ready = Vec::new();
            for c in c {
                ready.extend(s.commit(src, c));
            }
            ready
        };
        // Pieces 0 and 3 are good.
        assert_eq!(put(&mut s, 1, Range::new(0, ps)), vec![0]);
        s.piece_verified(0);
        assert_eq!(put(&mut s, 2, Range::new(3 * ps, 4 * ps)), vec![3]);
        s.piece_verified(3);
        // Piece 1: the liar's bytes, then source 1's; piece 2: the liar's,
        // then source 2's. Both fail.
        put(&mut s, 0, Range::new(ps, ps + ps / 2));
        assert_eq!(put(&mut s, 1, Range::new(ps + ps / 2, 2 * ps)), vec![1]);
        put(&mut s, 0, Range::new(2 * ps, 2 * ps + ps / 2));
        assert_eq!(put(&mut s, 2, Range::new(2 * ps + ps / 2, 3 * ps)), vec![2]);
        s.piece_failed(1);
        s.piece_failed(2);
        // What the engine does next (`suspect`): fetch each again whole
        // from the source that wrote most of it, the liar on a tie.
        s.refetch_from(1, 0);
        s.refetch_from(2, 0);
        s.release(99);
        // The liar is dropped (or it keeps lying; either way).
        s.source_dead(0);
        s.open_conn(10, 1, Duration::from_millis(1), now);
        s.open_conn(11, 2, Duration::from_millis(1), now);
        assert_eq!(s.missing(), vec![Range::new(ps, 3 * ps)]);
        let a = s.assign(10, 1, now);
        let b = s.assign(11, 2, now);
        assert!(a.is_some() || b.is_some(), "pieces 1 and 2 are fetched by nobody: {a:?} {b:?}");
    }
}
