//! The version vote: which file a download fetches, and which piece hashes
//! it verifies that file against.
//!
//! Plain synchronous data, tested without sockets (the engine keeps it
//! under a mutex). Each source casts one ballot: the size it answered `STAT`
//! with and, once it has hashed the file, its root (in `STAT_OK`, or later
//! computed from its `HASHES_OK`). A server that has not hashed the file yet
//! answers at once without a root, so data flows while the vote is open.
//!
//! * **Layout** (the size to fetch): the size a strict majority of the usable
//!   sources announce; or, once every usable source answered or the
//!   [`WINDOW`] after the first answer passed, the size of a strict majority
//!   of those that answered.
//! * **Root** (what the bytes are verified against): adopted when it has a
//!   strict majority of the sources whose version is known *and* cannot be
//!   out-voted any more: its votes are at least those of the strongest other
//!   version plus all sources still undecided (not answered, or answered
//!   without a root). No byte is verified, and so no file is completed,
//!   before a root is adopted: a fast liar cannot decide the file while
//!   honest servers are still hashing. A root pinned by the user
//!   (`get --identity`) is adopted at once and only its sources count.
//! * A source that never answers because it failed for good (not found,
//!   refused) does not count; a source that is merely unreachable stays
//!   undecided, and the vote waits for it as a download waits through an
//!   outage.
//! * When no source is undecided and no version has a strict majority, the
//!   vote is a **conflict**: the download fails naming every version, and
//!   the user pins one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::scheduler::SourceId;

/// How long the layout waits for more answers after the first one when no
/// size has a majority of all usable sources yet.
pub const WINDOW: Duration = Duration::from_secs(1);

/// What one source announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ballot {
    pub size: u64,
    /// `None` while the source is still hashing.
    pub root: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<T> {
    /// Not decided yet; ask again when a ballot changes or at `until`.
    Wait {
        until: Option<Instant>,
    },
    Adopt(T),
    /// Decided that nothing can be decided: the message names the versions.
    Conflict(String),
}

#[derive(Debug)]
pub struct Votes {
    ballots: Vec<Option<Ballot>>,
    /// Failed for good before answering: never votes.
    gone: Vec<bool>,
    pin: Option<[u8; 32]>,
    first: Option<Instant>,
}

fn short(root: &[u8; 32]) -> String {
    hex::encode(&root[..8])
}

impl Votes {
    pub fn new(sources: usize, pin: Option<[u8; 32]>) -> Votes {
        Votes { ballots: vec![None; sources], gone: vec![false; sources], pin, first: None }
    }

    pub fn pin(&self) -> Option<[u8; 32]> {
        self.pin
    }

    /// Records `src`'s answer to `STAT`. A later answer of the same source
    /// fills in a root it did not have but never changes its vote.
    pub fn offer(&mut self, src: SourceId, ballot: Ballot, now: Instant) {
        self.first.get_or_insert(now);
        let Some(slot) = self.ballots.get_mut(src) else { return };
        match slot {
            None => *slot = Some(ballot),
            Some(b) if b.size == ballot.size && b.root.is_none() => b.root = ballot.root,
            Some(_) => {}
        }
    }

    /// `src`, which answered `STAT` without a root, sent hashes adding up to
    /// `root`.
    pub fn root_known(&mut self, src: SourceId, root: [u8; 32]) {
        if let Some(Some(b)) = self.ballots.get_mut(src) {
            b.root.get_or_insert(root);
        }
    }

    /// `src` failed for good; if it has not voted, it never will.
    pub fn gone(&mut self, src: SourceId) {
        if let Some(g) = self.gone.get_mut(src) {
            *g = true;
        }
    }

    pub fn ballot(&self, src: SourceId) -> Option<Ballot> {
        self.ballots.get(src).copied().flatten()
    }

    /// Ballots that count: with a pin, those that may serve it.
    fn counted(&self) -> impl Iterator<Item = Ballot> + '_ {
        self.ballots.iter().flatten().copied().filter(|b| match (self.pin, b.root) {
            (Some(pin), Some(root)) => pin == root,
            _ => true,
        })
    }

    /// Sources that may still answer.
    fn unanswered(&self) -> usize {
        self.ballots.iter().zip(&self.gone).filter(|(b, g)| b.is_none() && !**g).count()
    }

    /// The size to fetch.
    pub fn layout(&self, now: Instant) -> Decision<u64> {
        let mut sizes: BTreeMap<u64, usize> = BTreeMap::new();
        for b in self.counted() {
            *sizes.entry(b.size).or_default() += 1;
        }
        let answered: usize = sizes.values().sum();
        let undecided = self.unanswered();
        let usable = answered + undecided;
        let window_over = self.first.is_some_and(|f| now >= f + WINDOW);
        let top = sizes.iter().max_by_key(|(_, n)| **n).map(|(s, n)| (*s, *n));
        if let Some((size, n)) = top {
            if 2 * n > usable || ((undecided == 0 || window_over) && 2 * n > answered) {
                return Decision::Adopt(size);
            }
        }
        if undecided == 0 {
            if answered == 0 {
                return Decision::Conflict(match self.pin {
                    Some(pin) => format!("no source serves the pinned identity {}…", short(&pin)),
                    None => "no source answered".into(),
                });
            }
            let list: Vec<String> = sizes.iter().map(|(s, n)| format!("{n} serve {s} bytes")).collect();
            return Decision::Conflict(format!(
                "the sources disagree about the file ({}); pin the right version with --identity ROOT",
                list.join(", ")
            ));
        }
        Decision::Wait { until: self.first.map(|f| f + WINDOW).filter(|t| *t > now) }
    }

    /// How the vote on the root of a file of `size` bytes stands, for
    /// `downloads show` while it is not settled.
    pub fn describe(&self, size: u64) -> String {
        let mut roots: BTreeMap<[u8; 32], usize> = BTreeMap::new();
        let (mut hashing, mut other) = (0, 0);
        for b in self.counted() {
            match b.root {
                _ if b.size != size => other += 1,
                Some(r) => *roots.entry(r).or_default() += 1,
                None => hashing += 1,
            }
        }
        let mut parts: Vec<String> = roots.iter().map(|(r, n)| format!("{n} for {}…", short(r))).collect();
        if other > 0 {
            parts.push(format!("{other} for another size"));
        }
        if hashing > 0 {
            parts.push(format!("{hashing} still hashing"));
        }
        let unanswered = self.unanswered();
        if unanswered > 0 {
            parts.push(format!("{unanswered} not answered"));
        }
        format!(
            "identity not settled: {}; no piece is verified until no source can out-vote the leader",
            parts.join(", ")
        )
    }

    /// The root to verify a file of `size` bytes against.
    pub fn root(&self, size: u64) -> Decision<[u8; 32]> {
        if let Some(pin) = self.pin {
            return Decision::Adopt(pin);
        }
        // Versions whose root is known, and other sizes whatever their root.
        let mut versions: BTreeMap<(u64, [u8; 32]), usize> = BTreeMap::new();
        let mut undecided = self.unanswered();
        for b in self.counted() {
            match b.root {
                Some(r) => *versions.entry((b.size, r)).or_default() += 1,
                None if b.size == size => undecided += 1,
                None => *versions.entry((b.size, [0; 32])).or_default() += 1,
            }
        }
        let known: usize = versions.values().sum();
        let mut ranked: Vec<(&(u64, [u8; 32]), &usize)> = versions.iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(a.1));
        if let Some((&(s, root), &n)) = ranked.first() {
            let other = ranked.get(1).map(|(_, n)| **n).unwrap_or(0);
            if s == size && 2 * n > known && n >= undecided + other {
                return Decision::Adopt(root);
            }
        }
        if undecided == 0 && known > 0 {
            let list: Vec<String> = ranked
                .iter()
                .map(|((s, r), n)| {
                    let id =
                        if *r == [0; 32] { "not hashed yet".to_string() } else { format!("identity {}…", short(r)) };
                    format!("{n} serve {s} bytes, {id}")
                })
                .collect();
            return Decision::Conflict(format!(
                "the sources disagree about the file ({}); no version has a majority: pin the right one with --identity ROOT",
                list.join("; ")
            ));
        }
        Decision::Wait { until: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: [u8; 32] = [1; 32];
    const R2: [u8; 32] = [2; 32];

    fn b(size: u64, root: Option<[u8; 32]>) -> Ballot {
        Ballot { size, root }
    }

    #[test]
    fn a_fast_liar_does_not_decide_while_honest_sources_hash() {
        let t0 = Instant::now();
        let mut v = Votes::new(4, None);
        // The liar answers first, with a root, and a 1-byte file.
        v.offer(0, b(1, Some(R1)), t0);
        assert!(matches!(v.layout(t0), Decision::Wait { .. }), "1 of 4 is no majority");
        // Long after the window, still nobody else: not a majority of the usable.
        assert!(matches!(v.layout(t0 + Duration::from_secs(5)), Decision::Adopt(1)), "alone in the window");
        // The honest ones answer without a root (still hashing): the size flips.
        for s in 1..4 {
            v.offer(s, b(1 << 30, None), t0);
        }
        assert_eq!(v.layout(t0), Decision::Adopt(1 << 30));
        assert_eq!(v.root(1 << 30), Decision::Wait { until: None }, "nothing known about the big file's root");
        v.root_known(1, R2);
        assert_eq!(v.root(1 << 30), Decision::Wait { until: None }, "1 vote; 2 undecided and 1 other could out-vote");
        let standing = v.describe(1 << 30);
        assert!(
            standing.contains("1 for 0202020202020202…")
                && standing.contains("1 for another size")
                && standing.contains("2 still hashing"),
            "{standing}"
        );
        v.root_known(2, R2);
        assert_eq!(v.root(1 << 30), Decision::Adopt(R2), "2 votes: the liar and the last one can only tie");
    }

    #[test]
    fn same_size_liar_waits_for_the_majority() {
        let t0 = Instant::now();
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)), t0);
        v.offer(1, b(100, None), t0);
        v.offer(2, b(100, None), t0);
        assert_eq!(v.layout(t0), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Wait { until: None });
        v.root_known(1, R2);
        assert_eq!(v.root(100), Decision::Wait { until: None }, "a tie with one undecided");
        v.root_known(2, R2);
        assert_eq!(v.root(100), Decision::Adopt(R2));
    }

    #[test]
    fn honest_agreement_is_adopted_without_waiting_for_the_unreachable() {
        let t0 = Instant::now();
        let mut v = Votes::new(4, None);
        v.offer(0, b(100, Some(R1)), t0);
        v.offer(1, b(100, Some(R1)), t0);
        v.offer(2, b(100, Some(R1)), t0);
        // Source 3 never answers: 3 votes cannot be out-voted by 1.
        assert_eq!(v.layout(t0), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Adopt(R1));
        // Two of four agreeing, two unreachable: the two could out-vote.
        let mut v = Votes::new(4, None);
        v.offer(0, b(100, Some(R1)), t0);
        v.offer(1, b(100, Some(R1)), t0);
        assert_eq!(v.root(100), Decision::Adopt(R1), "2 >= 2 undecided: they can tie, not out-vote");
        let mut v = Votes::new(5, None);
        v.offer(0, b(100, Some(R1)), t0);
        v.offer(1, b(100, Some(R1)), t0);
        v.offer(2, b(100, Some(R2)), t0);
        assert_eq!(v.root(100), Decision::Wait { until: None }, "2 < 2 undecided + 1 other");
        // A single source decides for itself; one failed for good does not count.
        let mut v = Votes::new(2, None);
        v.gone(1);
        v.offer(0, b(7, None), t0);
        assert_eq!(v.layout(t0), Decision::Adopt(7));
        v.root_known(0, R1);
        assert_eq!(v.root(7), Decision::Adopt(R1));
    }

    #[test]
    fn a_split_vote_is_a_conflict_that_names_the_versions() {
        let t0 = Instant::now();
        let mut v = Votes::new(2, None);
        v.offer(0, b(100, Some(R1)), t0);
        v.offer(1, b(100, Some(R2)), t0);
        let Decision::Conflict(msg) = v.root(100) else { panic!("no conflict: {:?}", v.root(100)) };
        assert!(
            msg.contains("0101010101010101") && msg.contains("0202020202020202") && msg.contains("--identity"),
            "{msg}"
        );
        let mut v = Votes::new(2, None);
        v.offer(0, b(1, None), t0);
        v.offer(1, b(2, None), t0);
        let Decision::Conflict(msg) = v.layout(t0) else { panic!("no conflict") };
        assert!(msg.contains("1 serve 1 bytes") && msg.contains("1 serve 2 bytes"), "{msg}");
    }

    #[test]
    fn a_pin_is_adopted_at_once_and_only_its_sources_count() {
        let t0 = Instant::now();
        let mut v = Votes::new(3, Some(R2));
        v.offer(0, b(1, Some(R1)), t0);
        v.offer(1, b(1, Some(R1)), t0);
        assert!(matches!(v.layout(t0), Decision::Wait { .. }), "the majority's version is not the pinned one");
        v.offer(2, b(100, None), t0);
        assert_eq!(v.layout(t0), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Adopt(R2));
        let mut v = Votes::new(1, Some(R2));
        v.offer(0, b(1, Some(R1)), t0);
        assert!(matches!(v.layout(t0), Decision::Conflict(m) if m.contains("pinned")));
    }

    #[test]
    fn a_ballot_is_never_changed_only_completed() {
        let t0 = Instant::now();
        let mut v = Votes::new(1, None);
        v.offer(0, b(100, None), t0);
        v.offer(0, b(100, Some(R1)), t0);
        assert_eq!(v.ballot(0), Some(b(100, Some(R1))));
        v.offer(0, b(5, Some(R2)), t0);
        v.root_known(0, R2);
        assert_eq!(v.ballot(0), Some(b(100, Some(R1))));
    }
}
