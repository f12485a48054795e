//! The version vote: which file a download fetches, and which piece hashes
//! it verifies that file against.
//!
//! Plain synchronous data, tested without sockets (the engine keeps it
//! under a mutex). Each source casts one ballot: the size and mtime it
//! answered `STAT` with and, once it has hashed the file, its root (in
//! `STAT_OK`, or later computed from its `HASHES_OK`). A server that has not
//! hashed the file yet answers at once without a root, so data flows while
//! the vote is open.
//!
//! The vote is decided by the sources that answer, and it is **live**: a
//! source that has not answered by the election deadline (the connect
//! timeout from the start of the run; the engine marks it) is *absent*,
//! whether it was refused, unresolvable or silent, and an absent source
//! never holds up a decision. It is waited for until then even when its
//! connections fail: a source down for a moment (a restart) gets its vote,
//! so a liar cannot win by answering while an honest source is briefly
//! away. It is **safe** among those that answered: a version wins only
//! with a **strict majority of the usable sources**, more than half of
//! those that answered plus those that still may (not absent, or answered
//! but still hashing). So nobody still to answer can out-vote it, and a tie
//! is never broken by who was first:
//!
//! * **Layout** (the size to fetch): the size a strict majority of the
//!   usable sources announce.
//! * **Root** (what the bytes are verified against): the root a strict
//!   majority of the usable sources announce (sources of another size vote
//!   against it). No byte is verified, and so no file is completed, before a
//!   root is adopted: a fast liar cannot decide the file while honest servers
//!   are still hashing (a source that answered "hashing" counts as
//!   answered), and neither can two liars against two honest ones.
//! * A root pinned by the user (`get --identity`) is adopted at once, only
//!   sources that may serve it count, and its size is the one to fetch as
//!   soon as any source announces it.
//! * A source that failed for good (not found, refused, dropped) before its
//!   vote was complete does not count.
//! * Sources that answered and disagree with no majority among them: while
//!   an absent source could still break the tie the vote waits for it (the
//!   standing is shown); when nobody is left to answer it is a
//!   **conflict**: the download fails naming every version, and the user
//!   pins one.
//! * **Late sources**: a source that answers after the version was adopted
//!   and agrees joins the download; one that disagrees is excluded by the
//!   engine, unless the sources that answered now hold a strict majority
//!   for another version ([`Votes::overturned`]): then the download starts
//!   over with that one (a pin is never overturned).
//! * A source whose answer changes (another size or mtime on a later
//!   connection) keeps its first ballot and is excluded by the engine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::scheduler::SourceId;

/// How long a source that answered without a root (still hashing) is
/// waited for: ten seconds, plus the file's size at 64 MiB/s (a slow disk;
/// mftd hashes on every core at about 1 GB/s each). A liar saying "hashing"
/// forever, or an honest source that went down while hashing, costs that,
/// never the download.
pub fn hashing_allowance(size: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_secs_f64(size as f64 / (64u64 << 20) as f64)
}

/// What one source announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ballot {
    pub size: u64,
    pub mtime_ns: i64,
    /// `None` while the source is still hashing.
    pub root: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<T> {
    /// Not decided yet; ask again when a ballot changes.
    Wait,
    Adopt(T),
    /// Decided that nothing can be decided: the message names the versions.
    Conflict(String),
}

/// What became of a `STAT` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Counted (a first ballot, or the root a ballot was missing).
    Counted,
    /// The source announced another file (size or mtime) than it first did.
    Changed(Ballot),
}

#[derive(Debug)]
pub struct Votes {
    ballots: Vec<Option<Ballot>>,
    /// Failed for good: if its vote is not complete, it never will be.
    gone: Vec<bool>,
    /// Not answered, and no longer waited for (the election deadline
    /// passed). Its ballot counts if it comes.
    absent: Vec<bool>,
    /// Answered without a root (still hashing), and its root no longer
    /// waited for: its connection failed since, or its hashing deadline
    /// passed. The root counts if it comes.
    late_root: Vec<bool>,
    /// When each source answered.
    answered_at: Vec<Option<Instant>>,
    pin: Option<[u8; 32]>,
    /// The size the user expects: only sources announcing it count.
    size: Option<u64>,
}

fn short(root: &[u8; 32]) -> String {
    hex::encode(&root[..8])
}

impl Votes {
    pub fn new(sources: usize, pin: Option<[u8; 32]>) -> Votes {
        Votes {
            ballots: vec![None; sources],
            gone: vec![false; sources],
            absent: vec![false; sources],
            late_root: vec![false; sources],
            answered_at: vec![None; sources],
            pin,
            size: None,
        }
    }

    /// Only sources announcing `size` count (`get --size`).
    pub fn expect_size(mut self, size: Option<u64>) -> Votes {
        self.size = size;
        self
    }

    /// Records `src`'s answer to `STAT`. A later answer of the same source
    /// may fill in the root it did not have, never change its vote.
    pub fn offer(&mut self, src: SourceId, ballot: Ballot) -> Offer {
        let Some(slot) = self.ballots.get_mut(src) else { return Offer::Counted };
        match slot {
            None => {
                *slot = Some(ballot);
                self.answered_at[src] = Some(Instant::now());
            }
            Some(b) if b.size != ballot.size || b.mtime_ns != ballot.mtime_ns => return Offer::Changed(*b),
            Some(b) if b.root.is_none() => b.root = ballot.root,
            Some(_) => {}
        }
        Offer::Counted
    }

    /// `src`, which answered `STAT` without a root, sent hashes adding up to
    /// `root`.
    pub fn root_known(&mut self, src: SourceId, root: [u8; 32]) {
        if let Some(Some(b)) = self.ballots.get_mut(src) {
            b.root.get_or_insert(root);
        }
    }

    /// `src` failed for good; a vote it has not completed never will be.
    pub fn gone(&mut self, src: SourceId) {
        if let Some(g) = self.gone.get_mut(src) {
            *g = true;
        }
    }

    /// `src` has not answered and is no longer waited for (the election
    /// deadline passed). Returns whether that changed anything.
    pub fn absent(&mut self, src: SourceId) -> bool {
        let answered = self.ballot(src).is_some();
        match self.absent.get_mut(src) {
            Some(a) if !*a && !answered => {
                *a = true;
                true
            }
            _ => false,
        }
    }

    /// Every source that has not answered is no longer waited for (the
    /// election deadline). Returns whether that changed anything.
    pub fn deadline_passed(&mut self) -> bool {
        let mut changed = false;
        for src in 0..self.ballots.len() {
            changed |= self.absent(src);
        }
        changed
    }

    /// `src` answered without a root and can no longer be waited for (its
    /// connection failed since). Returns whether that changed anything.
    pub fn stop_waiting_for_root(&mut self, src: SourceId) -> bool {
        let hashing = self.ballot(src).is_some_and(|b| b.root.is_none());
        match self.late_root.get_mut(src) {
            Some(l) if hashing && !*l => {
                *l = true;
                true
            }
            _ => false,
        }
    }

    /// Sources that answered without a root longer ago than hashing their
    /// file may take ([`hashing_allowance`]) are no longer waited for.
    /// Returns whether that changed anything.
    pub fn hashing_overdue(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for src in 0..self.ballots.len() {
            let due = match (self.ballots[src], self.answered_at[src]) {
                (Some(b), Some(at)) => {
                    b.root.is_none() && now.saturating_duration_since(at) >= hashing_allowance(b.size)
                }
                _ => false,
            };
            if due {
                changed |= self.stop_waiting_for_root(src);
            }
        }
        changed
    }

    /// Sources that answered without a root, no longer waited for, that
    /// may still send it (and break a tie).
    fn late_hashers(&self) -> usize {
        (0..self.ballots.len())
            .filter(|&s| self.late_root[s] && !self.gone[s] && self.ballots[s].is_some_and(|b| b.root.is_none()))
            .count()
    }

    /// Sources not answered and not failed for good, whether still waited
    /// for or not (absent).
    pub fn silent(&self) -> impl Iterator<Item = SourceId> + '_ {
        (0..self.ballots.len()).filter(|&s| self.ballots[s].is_none() && !self.gone[s])
    }

    /// Whether any source has answered `STAT`.
    pub fn any_answered(&self) -> bool {
        self.ballots.iter().any(|b| b.is_some())
    }

    pub fn ballot(&self, src: SourceId) -> Option<Ballot> {
        self.ballots.get(src).copied().flatten()
    }

    /// Ballots that count, with whether a root they lack is no longer
    /// waited for (the source is gone, or past its hashing deadline): with
    /// a pin, those that may serve it.
    fn counted(&self) -> impl Iterator<Item = (Ballot, bool)> + '_ {
        let stale = self.gone.iter().zip(&self.late_root).map(|(g, l)| *g || *l);
        self.ballots.iter().zip(stale).filter_map(|(b, st)| b.map(|b| (b, st))).filter(|(b, _)| {
            self.size.is_none_or(|s| s == b.size)
                && match (self.pin, b.root) {
                    (Some(pin), Some(root)) => pin == root,
                    _ => true,
                }
        })
    }

    /// Sources that may still answer and are waited for.
    fn unanswered(&self) -> usize {
        self.silent().filter(|&s| !self.absent[s]).count()
    }

    /// Absent sources that may still answer (and break a tie).
    fn absentees(&self) -> usize {
        self.silent().filter(|&s| self.absent[s]).count()
    }

    /// The size to fetch.
    pub fn layout(&self) -> Decision<u64> {
        if let Some(pin) = self.pin {
            // A claimant still in the download first: one dropped may have
            // lied about the size (the root commits to one).
            let claims = || self.counted().filter(|(b, _)| b.root == Some(pin));
            let live = (0..self.ballots.len())
                .filter(|&s| !self.gone[s])
                .filter_map(|s| self.ballots[s])
                .find(|b| b.root == Some(pin) && self.size.is_none_or(|x| x == b.size));
            if let Some(b) = live.or_else(|| claims().next().map(|(b, _)| b)) {
                return Decision::Adopt(b.size);
            }
        }
        let mut sizes: BTreeMap<u64, usize> = BTreeMap::new();
        for (b, _) in self.counted() {
            *sizes.entry(b.size).or_default() += 1;
        }
        let answered: usize = sizes.values().sum();
        let undecided = self.unanswered();
        if let Some((&size, &n)) = sizes.iter().max_by_key(|(_, n)| **n) {
            if 2 * n > answered + undecided {
                return Decision::Adopt(size);
            }
        }
        if undecided > 0 || self.absentees() > 0 {
            return Decision::Wait;
        }
        if answered == 0 {
            return Decision::Conflict(match (self.pin, self.size) {
                (Some(pin), _) => format!("no source serves the pinned identity {}…", short(&pin)),
                (None, Some(size)) => format!("no source serves a file of the expected {size} bytes"),
                (None, None) => "no source answered".into(),
            });
        }
        let list: Vec<String> = sizes.iter().map(|(s, n)| format!("{n} serve {s} bytes")).collect();
        Decision::Conflict(format!(
            "the sources disagree about the file ({}); pin the right version with --identity ROOT",
            list.join(", ")
        ))
    }

    /// How the vote on the root of a file of `size` bytes stands, for
    /// `downloads show` while it is not settled.
    pub fn describe(&self, size: u64) -> String {
        let mut roots: BTreeMap<[u8; 32], usize> = BTreeMap::new();
        let (mut hashing, mut other) = (0, 0);
        for (b, stale) in self.counted() {
            match b.root {
                _ if b.size != size => other += 1,
                Some(r) => *roots.entry(r).or_default() += 1,
                None if !stale => hashing += 1,
                None => {}
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
        let absent = self.absentees();
        if absent > 0 {
            parts.push(format!("{absent} unreachable"));
        }
        let late = self.late_hashers();
        if late > 0 {
            parts.push(format!("{late} hashing but no longer waited for"));
        }
        format!(
            "identity not settled: {}; no piece is verified before one identity has a majority of the usable sources",
            parts.join(", ")
        )
    }

    /// The root to verify a file of `size` bytes against.
    pub fn root(&self, size: u64) -> Decision<[u8; 32]> {
        if let Some(pin) = self.pin {
            // The pinned version has another size: fetch that one instead.
            // (A claimant dropped since, for a claim it could not prove,
            // does not count.)
            let other = (0..self.ballots.len())
                .filter(|&s| !self.gone[s])
                .filter_map(|s| self.ballots[s])
                .find(|b| b.root == Some(pin) && b.size != size && self.size.is_none_or(|x| x == b.size));
            if let Some(b) = other {
                return Decision::Conflict(format!(
                    "a source serves the pinned identity {}… with {} bytes, not {size}",
                    short(&pin),
                    b.size
                ));
            }
            return Decision::Adopt(pin);
        }
        // Versions whose root is known, and other sizes whatever their root.
        let mut versions: BTreeMap<(u64, [u8; 32]), usize> = BTreeMap::new();
        let mut undecided = self.unanswered();
        for (b, stale) in self.counted() {
            match b.root {
                Some(r) => *versions.entry((b.size, r)).or_default() += 1,
                None if b.size != size => *versions.entry((b.size, [0; 32])).or_default() += 1,
                None if !stale => undecided += 1,
                None => {}
            }
        }
        let known: usize = versions.values().sum();
        let mut ranked: Vec<(&(u64, [u8; 32]), &usize)> = versions.iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(a.1));
        if let Some((&(s, root), &n)) = ranked.first() {
            if s == size && root != [0; 32] && 2 * n > known + undecided {
                return Decision::Adopt(root);
            }
        }
        if undecided > 0 || known == 0 || self.absentees() > 0 || self.late_hashers() > 0 {
            return Decision::Wait;
        }
        let list: Vec<String> = ranked
            .iter()
            .map(|((s, r), n)| {
                let id = if *r == [0; 32] { "not hashed yet".to_string() } else { format!("identity {}…", short(r)) };
                format!("{n} serve {s} bytes, {id}")
            })
            .collect();
        Decision::Conflict(format!(
            "the sources disagree about the file ({}); no version has a majority: pin the right one with --identity ROOT",
            list.join("; ")
        ))
    }
}

impl Votes {
    /// Whether the sources that answered now hold a strict majority of the
    /// usable sources for another version than the adopted one (`size`,
    /// `root`): late sources out-voted the first to answer. Returns the
    /// sentence that says so. A pin is never overturned.
    pub fn overturned(&self, size: u64, root: [u8; 32]) -> Option<String> {
        if self.pin.is_some() {
            return None;
        }
        // Another size with a majority of all that may vote.
        if let Decision::Adopt(other) = self.layout() {
            if other != size {
                return Some(format!(
                    "a majority of the sources now serves {other} bytes, not the {size} bytes first adopted"
                ));
            }
        }
        match self.root(size) {
            Decision::Adopt(other) if other != root => Some(format!(
                "a majority of the sources now serves identity {}…, not {}… first adopted",
                short(&other),
                short(&root)
            )),
            _ => None,
        }
    }

    /// How the adopted version was decided, for `downloads show`: how many
    /// of the sources that count serve it, of how many there are.
    pub fn support(&self, size: u64, root: [u8; 32]) -> (usize, usize) {
        let agree = self.ballots.iter().flatten().filter(|b| b.size == size && b.root == Some(root)).count();
        (agree, self.ballots.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: [u8; 32] = [1; 32];
    const R2: [u8; 32] = [2; 32];

    fn b(size: u64, root: Option<[u8; 32]>) -> Ballot {
        Ballot { size, mtime_ns: 7, root }
    }

    #[test]
    fn a_fast_liar_does_not_decide_while_honest_sources_hash() {
        let mut v = Votes::new(4, None);
        // The liar answers first, with a root, and a 1-byte file: alone it
        // is no majority of the four, however long the others take.
        v.offer(0, b(1, Some(R1)));
        assert_eq!(v.layout(), Decision::Wait);
        // The honest ones answer without a root (still hashing).
        for s in 1..4 {
            v.offer(s, b(1 << 30, None));
        }
        assert_eq!(v.layout(), Decision::Adopt(1 << 30));
        assert_eq!(v.root(1 << 30), Decision::Wait, "nothing known about the big file's root");
        v.root_known(1, R2);
        assert_eq!(v.root(1 << 30), Decision::Wait, "1 of 4");
        let standing = v.describe(1 << 30);
        assert!(
            standing.contains("1 for 0202020202020202…")
                && standing.contains("1 for another size")
                && standing.contains("2 still hashing"),
            "{standing}"
        );
        v.root_known(2, R2);
        assert_eq!(v.root(1 << 30), Decision::Wait, "2 of 4 is no strict majority");
        v.root_known(3, R2);
        assert_eq!(v.root(1 << 30), Decision::Adopt(R2));
    }

    /// Review finding: with `>=`, a tie went to the first to answer.
    #[test]
    fn a_tie_is_never_broken_by_who_answered_first() {
        // Liar with a root, honest one still hashing.
        let mut v = Votes::new(2, None);
        v.offer(0, b(100 << 20, Some(R1)));
        v.offer(1, b(100 << 20, None));
        assert_eq!(v.root(100 << 20), Decision::Wait);
        v.root_known(1, R2);
        assert!(matches!(v.root(100 << 20), Decision::Conflict(_)));
        // Two liars against two honest ones still hashing.
        let mut v = Votes::new(4, None);
        v.offer(0, b(9, Some(R1)));
        v.offer(1, b(9, Some(R1)));
        v.offer(2, b(9, None));
        v.offer(3, b(9, None));
        assert_eq!(v.root(9), Decision::Wait);
        // A liar claiming an empty file while the other is slow to answer.
        let mut v = Votes::new(2, None);
        v.offer(0, b(0, Some(R1)));
        assert_eq!(v.layout(), Decision::Wait);
    }

    #[test]
    fn same_size_liar_waits_for_the_majority() {
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, None));
        v.offer(2, b(100, None));
        assert_eq!(v.layout(), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Wait);
        v.root_known(1, R2);
        assert_eq!(v.root(100), Decision::Wait, "a tie with one undecided");
        v.root_known(2, R2);
        assert_eq!(v.root(100), Decision::Adopt(R2));
    }

    #[test]
    fn a_majority_is_adopted_without_waiting_for_the_unreachable() {
        let mut v = Votes::new(4, None);
        for s in 0..3 {
            v.offer(s, b(100, Some(R1)));
        }
        // Source 3 never answers: 3 of 4 cannot be out-voted.
        assert_eq!(v.layout(), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Adopt(R1));
        // Two of four agreeing, two unreachable: no majority yet.
        let mut v = Votes::new(4, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, Some(R1)));
        assert_eq!(v.root(100), Decision::Wait);
        // ...until one of them fails for good.
        v.gone(3);
        assert_eq!(v.root(100), Decision::Adopt(R1));
        // A single source decides for itself; one failed for good does not count.
        let mut v = Votes::new(2, None);
        v.gone(1);
        v.offer(0, b(7, None));
        assert_eq!(v.layout(), Decision::Adopt(7));
        v.root_known(0, R1);
        assert_eq!(v.root(7), Decision::Adopt(R1));
    }

    /// Issue 20: with half the sources down the vote never closed.
    #[test]
    fn absent_sources_do_not_hold_up_the_sources_that_answered() {
        // Two sources, one refused: the other decides once the refused
        // one is absent (the election deadline passed), not before.
        let mut v = Votes::new(2, None);
        v.offer(0, b(100, Some(R1)));
        assert_eq!(v.layout(), Decision::Wait);
        assert_eq!(v.root(100), Decision::Wait);
        assert!(v.absent(1));
        assert!(!v.absent(1), "marked once");
        assert_eq!(v.layout(), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Adopt(R1));
        assert_eq!(v.support(100, R1), (1, 2));
        // Four sources, two silent past the deadline: the two that agree.
        let mut v = Votes::new(4, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, Some(R1)));
        assert_eq!(v.root(100), Decision::Wait);
        assert!(v.deadline_passed());
        assert_eq!(v.layout(), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Adopt(R1));
        // A source that answered counts even if marked absent afterwards.
        assert!(!v.absent(0));
        // Nobody answered: wait, whatever the deadline says.
        let mut v = Votes::new(2, None);
        v.deadline_passed();
        assert_eq!(v.layout(), Decision::Wait);
        assert!(!v.any_answered());
    }

    #[test]
    fn a_source_still_hashing_is_answered_and_holds_off_a_fast_liar() {
        // The liar has a root, the honest source is hashing: absent
        // sources do not change that a hashing one is waited for.
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, None));
        v.deadline_passed();
        assert_eq!(v.layout(), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Wait);
        v.root_known(1, R2);
        // 1 against 1 with one absent that could still break the tie.
        assert_eq!(v.root(100), Decision::Wait);
        assert!(v.describe(100).contains("1 unreachable"), "{}", v.describe(100));
        v.gone(2);
        assert!(matches!(v.root(100), Decision::Conflict(_)));
    }

    /// Hostile review: a source that answered "hashing" and went down, or
    /// hashes forever, held the identity vote forever.
    #[test]
    fn a_hashing_source_is_waited_for_until_it_fails_or_its_deadline() {
        let mut v = Votes::new(2, None);
        v.offer(0, b(8 << 20, Some(R1)));
        v.offer(1, b(8 << 20, None));
        assert_eq!(v.root(8 << 20), Decision::Wait);
        assert!(!v.hashing_overdue(Instant::now()), "not overdue at once");
        let later = Instant::now() + hashing_allowance(8 << 20) + Duration::from_millis(1);
        assert!(v.hashing_overdue(later));
        assert_eq!(v.root(8 << 20), Decision::Adopt(R1));
        // Its root, if it comes, still counts: a tie now, no overturn.
        v.root_known(1, R2);
        assert_eq!(v.overturned(8 << 20, R1), None);
        // A connection failure ends the wait at once.
        let mut v = Votes::new(2, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, None));
        assert!(v.stop_waiting_for_root(1));
        assert!(!v.stop_waiting_for_root(1));
        assert!(!v.stop_waiting_for_root(0), "a source with a root is not hashing");
        assert_eq!(v.root(100), Decision::Adopt(R1));
        assert!(hashing_allowance(1 << 30) >= Duration::from_secs(26));
    }

    #[test]
    fn a_single_fast_liar_of_the_same_size_never_wins_against_two_honest_sources() {
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)));
        assert_eq!(v.layout(), Decision::Wait, "1 of 3 answered, the others not absent");
        v.offer(1, b(100, None));
        v.offer(2, b(100, None));
        assert_eq!(v.root(100), Decision::Wait);
        v.root_known(1, R2);
        assert_eq!(v.root(100), Decision::Wait);
        v.root_known(2, R2);
        assert_eq!(v.root(100), Decision::Adopt(R2));
    }

    #[test]
    fn late_sources_that_out_vote_the_adopted_version_overturn_it() {
        // A answered alone (B and C absent) and its version was adopted.
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)));
        v.deadline_passed();
        assert_eq!(v.root(100), Decision::Adopt(R1));
        assert_eq!(v.overturned(100, R1), None);
        // B comes back with another version: 1 against 1, not overturned.
        v.offer(1, b(100, Some(R2)));
        assert_eq!(v.overturned(100, R1), None);
        // C agrees with B: 2 of 3 for R2.
        v.offer(2, b(100, Some(R2)));
        let why = v.overturned(100, R1).expect("overturned");
        assert!(why.contains("0202020202020202"), "{why}");
        // Another size works the same way.
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)));
        v.deadline_passed();
        v.offer(1, b(7, None));
        v.offer(2, b(7, None));
        assert!(v.overturned(100, R1).is_some_and(|w| w.contains("7 bytes")));
        // A pin is never overturned.
        let mut v = Votes::new(3, Some(R1));
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, Some(R2)));
        v.offer(2, b(100, Some(R2)));
        assert_eq!(v.overturned(100, R1), None);
    }

    /// Review finding: sources dropped while still hashing stayed undecided.
    #[test]
    fn a_source_dropped_before_its_root_is_known_no_longer_counts() {
        let mut v = Votes::new(3, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, None));
        v.offer(2, b(100, None));
        assert_eq!(v.root(100), Decision::Wait);
        v.gone(1);
        v.gone(2);
        assert_eq!(v.root(100), Decision::Adopt(R1));
    }

    #[test]
    fn a_split_vote_is_a_conflict_that_names_the_versions() {
        let mut v = Votes::new(2, None);
        v.offer(0, b(100, Some(R1)));
        v.offer(1, b(100, Some(R2)));
        let Decision::Conflict(msg) = v.root(100) else { panic!("no conflict: {:?}", v.root(100)) };
        assert!(
            msg.contains("0101010101010101") && msg.contains("0202020202020202") && msg.contains("--identity"),
            "{msg}"
        );
        let mut v = Votes::new(2, None);
        v.offer(0, b(1, None));
        v.offer(1, b(2, None));
        let Decision::Conflict(msg) = v.layout() else { panic!("no conflict") };
        assert!(msg.contains("1 serve 1 bytes") && msg.contains("1 serve 2 bytes"), "{msg}");
    }

    #[test]
    fn a_pin_is_adopted_at_once_and_decides_the_size() {
        let mut v = Votes::new(3, Some(R2));
        v.offer(0, b(1, Some(R1)));
        v.offer(1, b(1, Some(R1)));
        assert_eq!(v.layout(), Decision::Wait, "the majority's version is not the pinned one");
        v.offer(2, b(100, None));
        assert_eq!(v.layout(), Decision::Adopt(100));
        assert_eq!(v.root(100), Decision::Adopt(R2));
        let mut v = Votes::new(1, Some(R2));
        v.offer(0, b(1, Some(R1)));
        assert!(matches!(v.layout(), Decision::Conflict(m) if m.contains("pinned")));
        // Review finding: stale mirrors of another size decided the layout
        // and the pinned source was excluded for its size.
        let mut v = Votes::new(3, Some(R2));
        v.offer(0, b(5, None));
        v.offer(1, b(5, None));
        assert_eq!(v.layout(), Decision::Adopt(5));
        v.offer(2, b(9, Some(R2)));
        assert_eq!(v.layout(), Decision::Adopt(9), "the pinned version's size");
        assert!(matches!(v.root(5), Decision::Conflict(_)), "fetching size 5 must start over");
        assert_eq!(v.root(9), Decision::Adopt(R2));
    }

    #[test]
    fn an_expected_size_leaves_out_sources_of_another() {
        let mut v = Votes::new(2, None).expect_size(Some(9));
        v.offer(0, b(5, Some(R1)));
        v.offer(1, b(9, Some(R2)));
        assert_eq!(v.layout(), Decision::Adopt(9));
        assert_eq!(v.root(9), Decision::Adopt(R2));
        let mut v = Votes::new(1, None).expect_size(Some(9));
        v.offer(0, b(5, Some(R1)));
        assert!(matches!(v.layout(), Decision::Conflict(m) if m.contains("expected 9 bytes")));
    }

    #[test]
    fn a_ballot_is_never_changed_only_completed() {
        let mut v = Votes::new(1, None);
        assert_eq!(v.offer(0, b(100, None)), Offer::Counted);
        assert_eq!(v.offer(0, b(100, Some(R1))), Offer::Counted);
        assert_eq!(v.ballot(0), Some(b(100, Some(R1))));
        assert_eq!(v.offer(0, b(5, Some(R2))), Offer::Changed(b(100, Some(R1))));
        let rewritten = Ballot { mtime_ns: 8, ..b(100, None) };
        assert_eq!(v.offer(0, rewritten), Offer::Changed(b(100, Some(R1))));
        v.root_known(0, R2);
        assert_eq!(v.ballot(0), Some(b(100, Some(R1))));
    }
}
