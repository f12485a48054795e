//! Bounded logging of what peers do wrong: failed handshakes, refused
//! connections, bad frames, slow readers.
//!
//! A replayed ClientHello at thousands of handshakes a second once wrote
//! one line each (17 MiB in 15 s). Here the first failure of a kind from an
//! address is logged in full; the ones that follow within
//! [`INTERVAL`] are counted and said in one line per interval ("N more
//! failed handshakes from IP in the last 10s"). An address quiet for a
//! whole interval is forgotten, so its next failure is logged in full again.
//!
//! Owns: that count, per address (an IPv6 client by its /64, as the
//! per-address connection cap counts it) and kind, in a map of at most
//! [`MAX_PEERS`] entries; failures from addresses beyond those are counted
//! together. Must never: grow with the number of failures or of addresses,
//! or log more than one line per entry per interval after the first.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// How often at most one address's failures of one kind are summed up.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Address-and-kind pairs counted one by one. A spray of addresses beyond
/// this shares one count, so memory stays bounded whatever the peer does.
pub const MAX_PEERS: usize = 256;

/// What went wrong with a peer, one kind per count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The TLS handshake failed (garbage, a replayed ClientHello).
    Handshake,
    /// Refused: more new connections than the handshake rate allows.
    OverRate,
    /// Refused: the address has its most connections open.
    OverCap,
    /// Refused: the listener has its most connections open.
    ListenerFull,
    /// Refused: the address is not in the allow list.
    NotAllowed,
    /// Closed: the peer sent a frame that is not one.
    BadFrame,
    /// Closed: the peer took its data too slowly, or not at all.
    SlowReader,
}

impl Failure {
    /// What a summary line calls several of them.
    fn plural(self) -> &'static str {
        match self {
            Failure::Handshake => "failed handshakes",
            Failure::OverRate => "connections refused over the handshake rate",
            Failure::OverCap => "connections refused over the per-address cap",
            Failure::ListenerFull => "connections refused at the listener's connection cap",
            Failure::NotAllowed => "connections refused by the allow list",
            Failure::BadFrame => "connections closed for bad frames",
            Failure::SlowReader => "slow readers closed",
        }
    }
}

/// What to log for one failure, besides the failure itself when `full`.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Log this failure in full (the first of its kind from its address in
    /// an interval).
    pub full: bool,
    /// A summary that is due now.
    pub summary: Option<Summary>,
}

/// "`count` more `failure`s from `peer` over `over`"; `peer` is `None`
/// for the addresses beyond [`MAX_PEERS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub peer: Option<IpAddr>,
    pub failure: Failure,
    pub count: u64,
    pub over: Duration,
}

/// One address's failures of one kind in the current interval.
#[derive(Debug)]
struct Window {
    /// When the interval began (with a failure logged in full, or with a
    /// summary).
    since: Instant,
    /// Failures since then that were not logged.
    unsaid: u64,
}

/// The counts, without I/O: tests drive it with their own clock.
#[derive(Debug)]
pub struct Aggregator {
    interval: Duration,
    cap: usize,
    windows: HashMap<(IpAddr, Failure), Window>,
    /// Failures from addresses that found the map full, by kind.
    overflow: HashMap<Failure, Window>,
}

impl Aggregator {
    pub fn new(interval: Duration, cap: usize) -> Aggregator {
        Aggregator { interval, cap, windows: HashMap::new(), overflow: HashMap::new() }
    }

    /// Counts one failure of `failure` from `peer` (already an address key).
    pub fn note(&mut self, peer: IpAddr, failure: Failure, now: Instant) -> Verdict {
        if let Some(w) = self.windows.get_mut(&(peer, failure)) {
            return Self::count(w, Some(peer), failure, now, self.interval);
        }
        if self.windows.len() >= self.cap {
            // Make room from addresses whose interval is over and that
            // have nothing left to say; their summaries are due anyway.
            let interval = self.interval;
            self.windows.retain(|_, w| w.unsaid > 0 || now.duration_since(w.since) < interval);
        }
        if self.windows.len() < self.cap {
            self.windows.insert((peer, failure), Window { since: now, unsaid: 0 });
            return Verdict { full: true, summary: None };
        }
        match self.overflow.get_mut(&failure) {
            Some(w) => Self::count(w, None, failure, now, self.interval),
            None => {
                self.overflow.insert(failure, Window { since: now, unsaid: 1 });
                Verdict { full: false, summary: None }
            }
        }
    }

    /// One more failure in window `w`: said in full if the window was
    /// quiet and is over, else counted, with the summary if one is due.
    fn count(w: &mut Window, peer: Option<IpAddr>, failure: Failure, now: Instant, interval: Duration) -> Verdict {
        let over = now.duration_since(w.since);
        if over < interval {
            w.unsaid += 1;
            return Verdict { full: false, summary: None };
        }
        w.since = now;
        if w.unsaid == 0 {
            return Verdict { full: peer.is_some(), summary: None };
        }
        let summary = Summary { peer, failure, count: w.unsaid + 1, over };
        w.unsaid = 0;
        Verdict { full: false, summary: Some(summary) }
    }

    /// The summaries due at `now` for peers that went quiet (a peer still
    /// failing gets its summary from [`Aggregator::note`]); forgets the
    /// windows that are over with nothing to say.
    pub fn sweep(&mut self, now: Instant) -> Vec<Summary> {
        let interval = self.interval;
        let mut due = Vec::new();
        let mut close = |peer: Option<IpAddr>, failure: Failure, w: &mut Window| {
            let over = now.duration_since(w.since);
            if over < interval {
                return true;
            }
            if w.unsaid == 0 {
                return false;
            }
            due.push(Summary { peer, failure, count: w.unsaid, over });
            w.since = now;
            w.unsaid = 0;
            true
        };
        self.windows.retain(|(peer, failure), w| close(Some(*peer), *failure, w));
        self.overflow.retain(|failure, w| close(None, *failure, w));
        due
    }

    /// Entries held now (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.len() + self.overflow.len()
    }
}

/// The daemon's one aggregated log of peer failures.
#[derive(Debug)]
pub struct PeerLog {
    counts: Mutex<Aggregator>,
}

impl Default for PeerLog {
    fn default() -> PeerLog {
        PeerLog { counts: Mutex::new(Aggregator::new(INTERVAL, MAX_PEERS)) }
    }
}

impl PeerLog {
    fn counts(&self) -> std::sync::MutexGuard<'_, Aggregator> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs `what` about `peer` (at the level of `failure`), or counts it
    /// for a later summary.
    pub fn failed(&self, peer: SocketAddr, failure: Failure, what: impl Display) {
        let key = super::address_key(peer.ip().to_canonical());
        let verdict = self.counts().note(key, failure, Instant::now());
        if verdict.full {
            match level(failure) {
                tracing::Level::WARN => warn!(%peer, "{what}"),
                tracing::Level::INFO => info!(%peer, "{what}"),
                _ => debug!(%peer, "{what}"),
            }
        }
        if let Some(s) = verdict.summary {
            say(&s);
        }
    }

    /// Logs the summaries of peers that went quiet; called every few
    /// hundred milliseconds.
    pub fn sweep(&self) {
        let due = self.counts().sweep(Instant::now());
        for s in &due {
            say(s);
        }
    }
}

/// Refusals are warnings, as they were one by one; failures of the peer's
/// own making are information; bad frames are for debugging.
fn level(failure: Failure) -> tracing::Level {
    match failure {
        Failure::OverRate | Failure::OverCap | Failure::ListenerFull | Failure::NotAllowed => tracing::Level::WARN,
        Failure::Handshake | Failure::SlowReader => tracing::Level::INFO,
        Failure::BadFrame => tracing::Level::DEBUG,
    }
}

fn say(s: &Summary) {
    let what = s.failure.plural();
    let secs = s.over.as_secs();
    let from = match s.peer {
        Some(IpAddr::V6(a)) => format!("{a}/64"),
        Some(a) => a.to_string(),
        None => format!("addresses beyond the {MAX_PEERS} counted one by one"),
    };
    let count = s.count;
    match level(s.failure) {
        tracing::Level::WARN => warn!(count, secs, "{count} more {what} from {from} in the last {secs}s"),
        tracing::Level::INFO => info!(count, secs, "{count} more {what} from {from} in the last {secs}s"),
        _ => debug!(count, secs, "{count} more {what} from {from} in the last {secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn quiet() -> Verdict {
        Verdict { full: false, summary: None }
    }

    #[test]
    fn the_first_failure_is_logged_then_one_summary_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(10 * S, 8);
        assert_eq!(a.note(ip(1), Failure::Handshake, t0), Verdict { full: true, summary: None });
        // 7,000 a second for 15 s: one summary at 10 s, the rest counted.
        let mut summaries = Vec::new();
        for i in 1..=105_000u64 {
            let v = a.note(ip(1), Failure::Handshake, t0 + Duration::from_micros(i * 1_000_000 / 7_000));
            assert!(!v.full, "failure {i} logged in full");
            summaries.extend(v.summary);
        }
        assert_eq!(summaries.len(), 1, "{summaries:?}");
        assert_eq!(summaries[0].peer, Some(ip(1)));
        assert_eq!(summaries[0].count, 70_000);
        assert_eq!(summaries[0].over, 10 * S);
        // The peer stops: the rest is said by the sweep once its interval
        // is over, then the peer is forgotten.
        assert!(a.sweep(t0 + 19 * S).is_empty());
        let rest = a.sweep(t0 + 20 * S);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].count, 35_000);
        assert!(a.sweep(t0 + 31 * S).is_empty());
        assert_eq!(a.len(), 0);
        assert_eq!(a.note(ip(1), Failure::Handshake, t0 + 32 * S), Verdict { full: true, summary: None });
    }

    #[test]
    fn kinds_and_addresses_are_counted_apart() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(10 * S, 8);
        assert!(a.note(ip(1), Failure::Handshake, t0).full);
        assert!(a.note(ip(1), Failure::OverRate, t0).full);
        assert!(a.note(ip(2), Failure::Handshake, t0).full);
        assert_eq!(a.note(ip(1), Failure::Handshake, t0 + S), quiet());
        assert_eq!(a.note(ip(1), Failure::Handshake, t0 + 2 * S), quiet());
        assert_eq!(a.note(ip(2), Failure::Handshake, t0 + 3 * S), quiet());
        let mut due = a.sweep(t0 + 10 * S);
        due.sort_by_key(|s| (s.peer, s.count));
        let counts: Vec<_> = due.iter().map(|s| (s.peer, s.failure, s.count)).collect();
        assert_eq!(counts, [(Some(ip(1)), Failure::Handshake, 2), (Some(ip(2)), Failure::Handshake, 1)]);
    }

    #[test]
    fn a_failure_after_a_quiet_interval_is_logged_in_full_again() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(10 * S, 8);
        assert!(a.note(ip(1), Failure::SlowReader, t0).full);
        assert!(a.note(ip(1), Failure::SlowReader, t0 + 11 * S).full, "nothing was counted meanwhile");
        assert!(!a.note(ip(1), Failure::SlowReader, t0 + 12 * S).full);
    }

    #[test]
    fn a_spray_of_addresses_holds_at_most_the_cap_and_is_summed_up_together() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(10 * S, 4);
        let mut full = 0;
        for n in 0..100_000 {
            let v = a.note(ip(n), Failure::Handshake, t0 + Duration::from_micros(n as u64));
            full += usize::from(v.full);
            assert!(v.summary.is_none());
        }
        assert_eq!(full, 4, "only the counted addresses are logged in full");
        assert!(a.len() <= 5, "{} entries", a.len());
        let due = a.sweep(t0 + 11 * S);
        let beyond: Vec<_> = due.iter().filter(|s| s.peer.is_none()).collect();
        assert_eq!(beyond.len(), 1, "{due:?}");
        assert_eq!(beyond[0].count, 100_000 - 4);
        // Once their intervals are over, quiet entries make room again.
        assert!(a.sweep(t0 + 22 * S).is_empty());
        assert!(a.note(ip(1_000_000), Failure::Handshake, t0 + 23 * S).full);
    }

    #[test]
    fn a_full_map_makes_room_from_entries_that_have_nothing_left_to_say() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(10 * S, 2);
        assert!(a.note(ip(1), Failure::Handshake, t0).full);
        assert!(a.note(ip(2), Failure::Handshake, t0).full);
        assert!(!a.note(ip(3), Failure::Handshake, t0 + S).full, "full: counted together");
        // ip(1)'s interval is over and it said everything: its place is
        // taken without waiting for a sweep.
        assert!(a.note(ip(4), Failure::Handshake, t0 + 11 * S).full);
    }
}
