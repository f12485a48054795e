//! Choosing what to fetch: each source's ballot, the size and then the
//! root (the version) adopted by the vote, waiting for sources that are
//! silent or still hashing, excluding sources of other versions, creating
//! the part file once the size is chosen, and the per-source state
//! (dropped, why) shown by `downloads show`. Also the piece geometry and
//! hash list of the chosen file ([`Chosen`]).
//!
//! Must never: adopt a root before no source still to answer could
//! out-vote it, accept a hash list that does not add up to the adopted
//! root, or revive a source once it was dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use mftd_common::control::{DownloadState, SourceState};
use mftd_common::proto::{root_of, StatInfo};
use mftd_common::range::Range;

use crate::download::budget::Lane;
use crate::download::error::{DownloadError, SourceError};
use crate::download::part::{open_part, PartRequest};
use crate::download::run::{part_path, SourceProgress};
use crate::download::scheduler::{Scheduler, SourceId};
use crate::download::vote::{Ballot, Decision, Offer};
use mftd_common::manifest::ManifestFile;

use super::worker::ElectError;
use super::write::spawn_verify;
use super::{lock, Chosen, Engine, HashesAsked, Outcome, HASHES_PATIENCE};

/// Per-source state lives in one place, the download's progress (what
/// `downloads show` reports): whether a source was dropped and why, its
/// strikes, its bytes. The scheduler is told about drops as input.
impl Engine {
    pub(super) fn set_source(&self, src: SourceId, f: impl FnOnce(&mut SourceProgress)) {
        let mut p = self.dl.progress();
        if let Some(s) = p.sources.get_mut(src) {
            let was = s.state;
            f(s);
            // A dropped or excluded source stays so, whatever a straggling
            // connection of it reports.
            if matches!(was, SourceState::Failed | SourceState::Excluded) {
                s.state = was;
            }
        }
    }

    pub(super) fn is_dead(&self, src: SourceId) -> bool {
        self.dl.progress().sources.get(src).is_some_and(|s| s.dropped())
    }

    /// A source will never be useful for this download. The first reason
    /// stands.
    pub(super) fn kill_source(&self, src: SourceId, state: SourceState, why: SourceError) {
        {
            let mut p = self.dl.progress();
            let Some(s) = p.sources.get_mut(src) else { return };
            if s.dropped() {
                return;
            }
            s.state = state;
            s.last_error = Some(why.to_string());
        }
        warn!(source = %self.dl.job.sources[src], reason = %why, "source dropped");
        if let Some(c) = self.chosen.get() {
            lock(&c.sched).source_dead(src);
        }
        lock(&self.votes).gone(src);
        self.changed.notify_waiters();
        self.offered.notify_waiters();
    }

    /// Recomputes whether the download is waiting (no source connected).
    pub(super) fn refresh_state(&self) {
        let p = self.dl.progress();
        if p.state.is_final() || p.state == DownloadState::Verifying {
            return;
        }
        let connected = p.sources.iter().any(|s| s.connections > 0);
        let known = p.size.is_some();
        drop(p);
        let state = match (connected, known) {
            (true, true) => DownloadState::Active,
            (true, false) => DownloadState::Starting,
            (false, _) => DownloadState::Waiting,
        };
        self.dl.set_state(state);
    }

    /// Sources that have not answered are no longer waited for (the
    /// election deadline passed).
    pub(super) fn stop_waiting_for_silent(self: &Arc<Self>) {
        let changed = lock(&self.votes).deadline_passed();
        if changed {
            debug!("election deadline passed: sources that did not answer are not waited for");
            self.vote_changed();
        }
        self.note_waiting();
    }

    /// A source is no longer waited for: the vote may close now.
    pub(super) fn vote_changed(self: &Arc<Self>) {
        self.offered.notify_waiters();
        if let Some(c) = self.chosen.get() {
            self.decide_root(c);
        }
    }

    /// While no source has answered, says so and what to do; once one has,
    /// says nothing.
    pub(super) fn note_waiting(&self) {
        let answered = lock(&self.votes).any_answered();
        let note = (!answered).then(|| {
            format!(
                "no source has answered yet; repeat the get with the right --from, or `mftctl downloads add-source {} HOST:PORT`",
                self.dl.id
            )
        });
        self.dl.progress().waiting = note;
    }

    /// How the version in use was decided, for `downloads show`: how many
    /// sources serve it, and which were not heard from and why.
    pub(super) fn note_version(&self, c: &Chosen, root: [u8; 32]) {
        let (agree, total, silent) = {
            let v = lock(&self.votes);
            let (agree, total) = v.support(c.size, root);
            (agree, total, v.silent().collect::<Vec<_>>())
        };
        let mut note = if self.dl.job.pin.is_some() {
            format!("pinned with --identity; served by {agree} of {total} sources")
        } else {
            format!("version from {agree} of {total} sources")
        };
        let p = self.dl.progress();
        let missing: Vec<String> = silent
            .iter()
            .filter_map(|&s| p.sources.get(s))
            .map(|s| match &s.last_error {
                Some(e) => format!("{} unreachable ({e})", s.address),
                None => format!("{} not answered", s.address),
            })
            .collect();
        drop(p);
        if !missing.is_empty() {
            note.push_str("; ");
            note.push_str(&missing.join("; "));
        }
        self.dl.progress().version = Some(note);
    }

    /// Casts `src`'s ballot and waits until the size to fetch is chosen.
    /// Returns the chosen file if this source serves it. While the vote is
    /// open and other connections wait for `budget`, the connection is not
    /// kept waiting: with every permit of a host held by connections of
    /// different downloads, each waiting for ballots from sources that
    /// cannot get a permit, no vote would ever close.
    pub(super) async fn elect(
        self: &Arc<Self>,
        src: SourceId,
        stat: &StatInfo,
        budget: &Lane,
    ) -> Result<Arc<Chosen>, ElectError> {
        // A file without pieces has one possible identity.
        let root = stat.root.or_else(|| (stat.size == 0).then(|| root_of(0, stat.piece_size, &[])));
        let ballot = Ballot { size: stat.size, mtime_ns: stat.mtime_ns, root };
        if let Offer::Changed(first) = lock(&self.votes).offer(src, ballot) {
            return Err(ElectError::Different(SourceError::FileChanged(format!(
                "it now serves {} bytes modified at {} ns, not the {} bytes modified at {} ns it first announced",
                stat.size, stat.mtime_ns, first.size, first.mtime_ns
            ))));
        }
        self.offered.notify_waiters();
        self.dl.progress().waiting = None;
        loop {
            // Registered before looking, so an offer in between is not missed.
            let offered = self.offered.notified();
            if let Some(c) = self.chosen.get() {
                self.decide_root(c);
                return self.compare(c, src, stat);
            }
            let decision = lock(&self.votes).layout();
            match decision {
                Decision::Adopt(size) => {
                    let eng = self.clone();
                    let c = match self.chosen.get_or_try_init(|| async move { eng.prepare(size).await }).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = self.outcome.try_send(Outcome::Fatal(e));
                            return Err(ElectError::Over);
                        }
                    };
                    self.decide_root(c);
                    return self.compare(c, src, stat);
                }
                Decision::Conflict(why) => {
                    let _ = self.outcome.try_send(Outcome::Fatal(DownloadError::Vote(why)));
                    return Err(ElectError::Over);
                }
                Decision::Wait => {}
            }
            if budget.contended() {
                return Err(ElectError::Yield);
            }
            tokio::select! {
                _ = offered => {}
                // Contention is looked at again now and then.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.workers.cancelled() => return Err(ElectError::Over),
            }
        }
    }

    /// Whether `src` (which answered `stat`) serves the chosen file, as far
    /// as is known.
    pub(super) fn compare(&self, c: &Arc<Chosen>, src: SourceId, stat: &StatInfo) -> Result<Arc<Chosen>, ElectError> {
        let root = lock(&self.votes).ballot(src).and_then(|b| b.root).or(stat.root);
        // The pinned root commits to one size: a source claiming it with
        // another than the one being fetched is either lying or right (and
        // whoever's claim decided the size lied). It proves its claim.
        if stat.size != c.size && root.is_some() && root == self.dl.job.pin {
            return Err(ElectError::Disputed);
        }
        match (stat.size == c.size, root, c.root.get()) {
            (true, Some(r), Some(a)) if r != *a => Err(ElectError::Different(self.different(stat.size, Some(r), c))),
            (true, _, _) => Ok(c.clone()),
            (false, r, _) => Err(ElectError::Different(self.different(stat.size, r, c))),
        }
    }

    pub(super) fn different(&self, size: u64, root: Option<[u8; 32]>, c: &Chosen) -> SourceError {
        let theirs = root.map(|r| format!(", identity {}", &hex::encode(r)[..16])).unwrap_or_default();
        let ours = c.root.get().map(|r| format!(", identity {}", &hex::encode(r)[..16])).unwrap_or_default();
        let who = if self.dl.job.pin.is_some() { "the pinned version" } else { "the majority of the sources" };
        SourceError::DifferentVersion(format!(
            "serves a different version of {} ({size} bytes{theirs}) than {who} ({} bytes{ours})",
            self.dl.job.remote_path, c.size
        ))
    }

    /// Looks at the vote on the root of the chosen file: once one is
    /// adopted, sources serving another are excluded and the pieces that
    /// waited are verified as soon as a hash list adding up to it is known.
    pub(super) fn decide_root(self: &Arc<Self>, c: &Arc<Chosen>) {
        // Adopted already: late sources may join, or out-vote it.
        if let Some(&adopted) = c.root.get() {
            let overturned = lock(&self.votes).overturned(c.size, adopted);
            if let Some(why) = overturned {
                info!(reason = %why, "late sources out-voted the adopted version: starting over");
                let _ = self.outcome.try_send(Outcome::Relayout);
                return;
            }
            self.settle_root(c, adopted);
            return;
        }
        let (decision, standing) = {
            let v = lock(&self.votes);
            (v.root(c.size), v.describe(c.size))
        };
        let root = match decision {
            Decision::Wait => {
                self.dl.progress().vote = Some(standing);
                return;
            }
            Decision::Conflict(why) => {
                // A majority for another size (the first answers came from
                // a minority) means starting over; anything else is a split
                // vote nobody can settle but the user.
                let layout = lock(&self.votes).layout();
                let outcome = match layout {
                    Decision::Adopt(size) if size != c.size => Outcome::Relayout,
                    _ => Outcome::Fatal(DownloadError::Vote(why)),
                };
                let _ = self.outcome.try_send(outcome);
                return;
            }
            Decision::Adopt(root) => root,
        };
        if c.root.set(root).is_ok() {
            // The partial file holds the version recorded before: a new one
            // at the sources fails the download and is not shown as its own.
            let earlier = lock(&self.dl.resume).as_ref().and_then(|m| m.file.as_ref()).and_then(|f| f.identity.clone());
            if let Some(was) = earlier.filter(|was| *was != hex::encode(root)) {
                let _ = self.outcome.try_send(Outcome::Fatal(DownloadError::RemoteChanged {
                    id: self.dl.id,
                    was: format!("identity {}", &was[..was.len().min(16)]),
                    now: format!("identity {}", &hex::encode(root)[..16]),
                }));
                return;
            }
            info!(identity = %hex::encode(root), pinned = self.dl.job.pin.is_some(), "file version adopted");
            self.dl.progress().identity = Some(hex::encode(root));
            self.progressed.notify_one();
        }
        self.settle_root(c, root);
    }

    /// With `root` adopted: sources of other versions are excluded, the
    /// pieces that waited are verified once a hash list adding up to it is
    /// known, and the download completes if every piece is verified.
    pub(super) fn settle_root(self: &Arc<Self>, c: &Arc<Chosen>, root: [u8; 32]) {
        self.exclude_others(c, root);
        self.note_version(c, root);
        let list = lock(&self.lists).get(&root).cloned();
        if let Some(list) = list {
            if c.hashes.get().is_none() {
                c.hashes_arrived(self, list);
            }
            lock(&self.lists).clear();
        }
        self.check_complete(c);
    }

    /// Excludes the sources whose ballot is for another version than the
    /// one adopted.
    pub(super) fn exclude_others(&self, c: &Chosen, root: [u8; 32]) {
        let others: Vec<(SourceId, Ballot)> = {
            let v = lock(&self.votes);
            (0..self.dl.job.sources.len())
                .filter_map(|s| v.ballot(s).map(|b| (s, b)))
                .filter(|(_, b)| b.size != c.size || b.root.is_some_and(|r| r != root))
                // A claim of the pinned root with another size is settled
                // by its proof (see `prove_pinned_size`), not by exclusion.
                .filter(|(_, b)| !(b.root.is_some() && b.root == self.dl.job.pin))
                .collect()
        };
        for (s, b) in others {
            if !self.is_dead(s) {
                self.kill_source(s, SourceState::Excluded, self.different(b.size, b.root, c));
            }
        }
    }

    /// Sends `Complete` when every piece is verified against the adopted
    /// identity.
    pub(super) fn check_complete(&self, c: &Chosen) {
        if c.verifiable() && lock(&c.sched).is_complete() {
            let _ = self.outcome.try_send(Outcome::Complete);
            self.changed.notify_waiters();
        }
    }

    /// Whether connection of `src` should ask its server for the piece hash
    /// list: its root is not known yet (the server was still hashing), or no
    /// list adding up to its root is known or asked for.
    pub(super) fn should_ask_hashes(&self, c: &Chosen, src: SourceId) -> Option<HashesAsked> {
        if c.hashes.get().is_some() || c.piece_count() == 0 {
            return None;
        }
        let root = lock(&self.votes).ballot(src)?.root;
        let mut asked = lock(&self.asked);
        if asked.sources.contains(&src) {
            return None;
        }
        if let Some(r) = root {
            // A source that announced its root has hashed the file: its
            // answer is due within a round trip and what is queued ahead of
            // it. Past that, another source of the same root is asked too.
            let waited = asked.roots.get(&r).map(|t| t.elapsed());
            if waited.is_some_and(|w| w < HASHES_PATIENCE) || lock(&self.lists).contains_key(&r) {
                return None;
            }
            asked.roots.insert(r, Instant::now());
        }
        asked.sources.insert(src);
        Some(HashesAsked { root })
    }

    /// Creates the part file for a file of `size` bytes.
    pub(super) async fn prepare(self: Arc<Self>, size: u64) -> Result<Arc<Chosen>, DownloadError> {
        let piece_size = mftd_common::proto::piece_size_for(size);
        let resume = lock(&self.dl.resume).clone();
        let claimed = match resume.as_ref().and_then(|m| m.file.as_ref().map(|f| (m, f))) {
            Some((m, f)) => {
                if f.size != size || f.piece_size != piece_size {
                    return Err(DownloadError::RemoteChanged {
                        id: self.dl.id,
                        was: format!("{} bytes", f.size),
                        now: format!("{size} bytes"),
                    });
                }
                let mut ranges: Vec<Range> = m
                    .verified
                    .iter()
                    .map(|&(a, b)| mftd_common::proto::pieces_range(f.size, f.piece_size, a, b))
                    .collect();
                ranges.extend(m.received.iter().copied());
                Some(ranges)
            }
            None => None,
        };
        let dest = self.dl.job.destination.clone();
        let reuse = self.dl.store.is_some();
        // The part file is created with the owner's rights and belongs to it.
        if let Some(max) = self.dl.max_size.filter(|m| size > *m) {
            return Err(DownloadError::TooLarge { size, max });
        }
        let owner = self.dl.restricted_owner().cloned();
        let keep_free = self.dl.min_free_space;
        let record = resume.as_ref().and_then(|m| m.part);
        let owner_uid = self.dl.part_owner_uid();
        let opened = tokio::task::spawn_blocking(move || {
            let (at, _pin) = crate::caller::pin_dir(&dest, owner.as_ref())
                .map_err(DownloadError::disk("open the directory of", part_path(&dest)))?;
            // The previous run of this download (paused or restarted a
            // moment ago) may still be letting go of the file: give it a
            // little time before calling the file busy.
            let mut tries = 0;
            loop {
                let r = crate::caller::as_caller(owner.as_ref(), || {
                    open_part(PartRequest {
                        dest: &at,
                        size,
                        claimed: claimed.clone(),
                        record,
                        reuse,
                        keep_free,
                        owner_uid,
                    })
                })
                .map_err(DownloadError::disk("act as the download's owner on", part_path(&dest)))?;
                match r {
                    Err(DownloadError::PartBusy(_)) if reuse && tries < 30 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    r => break r,
                }
            }
        })
        .await
        .map_err(DownloadError::task("prepare"))??;
        let (file, preload) = (opened.file, opened.preload);
        *lock(&self.dl.part) = Some(opened.record);
        {
            let mut p = self.dl.progress();
            p.size = Some(size);
            p.recorded.total = mftd_common::proto::piece_count_for(size, piece_size);
        }
        info!(size, "file size chosen");
        // Record the file and its part file before the first byte is
        // written, so a restart can tell whether the remote file changed
        // and which part file is this download's.
        let recorded = resume.as_ref().is_some_and(|m| m.file.is_some() && m.part == Some(opened.record));
        if let (Some(store), false) = (&self.dl.store, recorded) {
            let mut m = self.dl.base_manifest();
            m.file = Some(ManifestFile { size, piece_size, identity: None });
            if let Some(f) = resume.as_ref().and_then(|r| r.file.clone()) {
                // A new part file: the identity stays (a restart must still
                // tell a changed remote file); progress is claimed again
                // once checkpoints see it in this file.
                m.file = Some(f);
            }
            let store = store.clone();
            let path = store.path(m.id);
            tokio::task::spawn_blocking(move || store.save(&m))
                .await
                .map_err(DownloadError::task("manifest"))?
                .map_err(DownloadError::disk("write manifest", path))?;
        }
        let mut sched = Scheduler::new(size, piece_size);
        sched.set_sources(self.dl.job.sources.len());
        sched.set_expected_conns(lock(&self.slots).iter().sum());
        for (i, s) in self.dl.progress().sources.iter().enumerate() {
            if s.dropped() {
                sched.source_dead(i);
            }
        }
        // Bytes already on disk are re-verified, never trusted: they count
        // as received and every complete piece goes through verification.
        let mut recheck = Vec::new();
        for r in &preload {
            recheck.extend(sched.preload(*r));
        }
        if !preload.is_empty() {
            info!(bytes = sched.received_bytes(), pieces = recheck.len(), "re-verifying data already on disk");
        }
        let sched = Arc::new(Mutex::new(sched));
        *lock(&self.dl.pieces) = Some(sched.clone());
        let chosen = Arc::new(Chosen {
            size,
            piece_size,
            root: std::sync::OnceLock::new(),
            hashes: std::sync::OnceLock::new(),
            unchecked: Mutex::new(Vec::new()),
            file: Arc::new(file),
            sched,
        });
        for p in recheck {
            let eng = self.clone();
            let c = chosen.clone();
            spawn_verify(eng, c, p, None);
        }
        Ok(chosen)
    }
}

impl Chosen {
    pub(super) fn piece_count(&self) -> usize {
        mftd_common::proto::piece_count_for(self.size, self.piece_size) as usize
    }

    /// Byte range of piece `i`.
    pub(super) fn piece_range(&self, i: usize) -> Range {
        mftd_common::proto::piece_range(self.size, self.piece_size, i as u64)
    }

    /// Whether pieces can be checked against an adopted identity: its root
    /// is adopted and its hash list known (none is needed without pieces).
    /// Cheap: `hashes` is only ever set to a list that adds up to `root`.
    pub(super) fn verifiable(&self) -> bool {
        self.root.get().is_some() && (self.piece_count() == 0 || self.hashes.get().is_some())
    }

    /// [`Chosen::verifiable`], checked in full: the hash list (none without
    /// pieces) adds up to the adopted root.
    pub(super) fn identity_holds(&self) -> bool {
        let hashes: &[[u8; 32]] = match (self.piece_count(), self.hashes.get()) {
            (0, _) => &[],
            (_, Some(h)) => h,
            (_, None) => return false,
        };
        self.root.get() == Some(&root_of(self.size, self.piece_size, hashes))
    }

    /// The piece hashes, or `None` after recording that piece `p` waits
    /// for them.
    pub(super) fn hashes_or_park(&self, p: usize, known: Option<[u8; 32]>) -> Option<&Vec<[u8; 32]>> {
        let mut waiting = lock(&self.unchecked);
        match self.hashes.get() {
            Some(h) => Some(h),
            None => {
                waiting.push((p, known));
                None
            }
        }
    }

    /// The hash list of the adopted root is known. Returns false if it
    /// does not add up to it; otherwise the pieces that waited for it are
    /// verified now.
    pub(super) fn hashes_arrived(self: &Arc<Self>, eng: &Arc<Engine>, hashes: Vec<[u8; 32]>) -> bool {
        let adds_up = hashes.len() == self.piece_count()
            && Some(&root_of(self.size, self.piece_size, &hashes)) == self.root.get();
        if !adds_up {
            return false;
        }
        let waiting = {
            let mut w = lock(&self.unchecked);
            let _ = self.hashes.set(hashes);
            std::mem::take(&mut *w)
        };
        for (p, known) in waiting {
            spawn_verify(eng.clone(), self.clone(), p, known);
        }
        true
    }
}
