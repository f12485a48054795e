//! The fetch loop of one connection: asking for ranges with streamed
//! READs, giving ranges others took over back with TRIM, the bookkeeping
//! of each open READ ([`OpenRead`]), stall detection and path probing.
//!
//! Must never: accept a byte outside what a READ asked for, or wait on an
//! unanswered TRIM past its patience.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::debug;

use mftd_common::control::SourceState;
use mftd_common::proto::{root_of, ErrorCode, StatInfo, TRIM_NOT_OPEN};
use mftd_common::range::Range;

use crate::download::budget::Lane;
use crate::download::client::{ClientError, Event, Stream};
use crate::download::error::SourceError;
use crate::download::scheduler::{ConnId, Hold, SourceId, Ticket};

use super::worker::{probe_path, WorkerEnd};
use super::write::{write_received, PieceHasher};
use super::{
    lock, Chosen, Engine, HashesAsked, Outcome, BACKOFF_START, HASHES_TIMEOUT, PREFETCH_MIN, PROBE_CAP, STALL_AFTER,
    TRIM_PATIENCE,
};

/// One `READ` open on a connection.
#[derive(Debug)]
pub(super) struct OpenRead {
    id: u32,
    ticket: Ticket,
    /// Next byte expected.
    next: u64,
    /// End first asked for: no byte beyond it is accepted.
    limit: u64,
    /// Where the server will stop, as far as we know: `limit` until a
    /// TRIMMED says otherwise.
    end: u64,
    /// End asked for by the last TRIM (or `limit`).
    told: u64,
    /// TRIMs sent and not answered yet.
    trims: u32,
    /// End of the DATA frame being received.
    frame_end: u64,
    /// Ends asked for by the TRIMs not answered yet, oldest first.
    trim_targets: VecDeque<u64>,
    /// Since when the oldest TRIM not answered yet has been waiting.
    trim_sent: Option<Instant>,
}

impl OpenRead {
    /// A READ for `r` just sent as `id`.
    pub(super) fn new(id: u32, ticket: Ticket, r: Range) -> OpenRead {
        OpenRead {
            id,
            ticket,
            next: r.start,
            limit: r.end,
            end: r.end,
            told: r.end,
            trims: 0,
            frame_end: r.start,
            trim_targets: VecDeque::new(),
            trim_sent: None,
        }
    }

    /// All its bytes arrived and no TRIMMED is outstanding.
    pub(super) fn over(&self) -> bool {
        self.trims == 0 && self.next >= self.end
    }
}

/// What one connection works with for its session, from the fetch loop
/// down to the writes of what it receives.
#[derive(Clone, Copy)]
pub(super) struct ConnContext<'a> {
    pub(super) eng: &'a Arc<Engine>,
    /// The file the vote chose.
    pub(super) chosen: &'a Arc<Chosen>,
    /// The source this connection is to.
    pub(super) src: SourceId,
    /// This connection, as the scheduler knows it.
    pub(super) conn_id: ConnId,
    /// The source's answer to `STAT`.
    pub(super) stat: &'a StatInfo,
    /// Round trip measured by the handshake.
    pub(super) rtt: Duration,
    /// Woken when another connection took part of this one's range.
    pub(super) wake: &'a Notify,
    /// The host's connection budget the session holds a permit of.
    pub(super) budget: &'a Lane,
}

/// Fetches over one connection until there is nothing left to do: each
/// assignment is one streamed READ; the next is asked for about one round
/// trip before the current one ends; ranges others took over are given
/// back with TRIM.
pub(super) async fn fetch(cx: &ConnContext<'_>, stream: &mut Stream) -> WorkerEnd {
    let &ConnContext { eng, chosen, src, conn_id, stat, rtt, wake, budget } = cx;
    let path = eng.dl.job.remote_path.clone();
    let idle = eng.dl.idle_timeout;
    // Quiet for longer than this while owed data counts as stalled: at
    // least STALL_AFTER and four round trips, and three times the longest
    // gap this connection has shown (a source paced to a few KB/s sends a
    // chunk every second or two).
    let mut stall_after = (rtt * 4).max(STALL_AFTER);
    let mut last_event = Instant::now();
    let mut got_data = false;
    let mut probe: Option<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>> = None;
    let mut probe_step = BACKOFF_START;
    let mut open: VecDeque<OpenRead> = VecDeque::new();
    // Ranges taken from other connections, waiting for their TRIMMED.
    let mut held: Vec<Ticket> = Vec::new();
    let mut hasher: Option<PieceHasher> = None;
    let violation = |why: String| WorkerEnd::Dead(SourceState::Failed, SourceError::Protocol(why));
    // A hash list this connection asked for and did not get: if it ends,
    // another connection (of this source, or of another with the same
    // root) asks again.
    struct AskedHashes<'a> {
        eng: &'a Engine,
        src: SourceId,
        /// Asked, and for which root.
        asked: Option<HashesAsked>,
        answered: bool,
    }
    impl Drop for AskedHashes<'_> {
        fn drop(&mut self) {
            if let (Some(HashesAsked { root }), false) = (self.asked, self.answered) {
                let mut a = lock(&self.eng.asked);
                a.sources.remove(&self.src);
                if let Some(r) = root {
                    a.roots.remove(&r);
                }
            }
        }
    }
    let mut asked = AskedHashes { eng, src, asked: None, answered: false };
    loop {
        if eng.is_dead(src) {
            return WorkerEnd::Stopped;
        }
        // 0. Ask for the piece hashes, ahead of the data: every source that
        // has not told its root yet (its vote), and one per root otherwise.
        if asked.asked.is_none() {
            if let Some(root) = eng.should_ask_hashes(chosen, src) {
                asked.asked = Some(root);
                if let Err(e) = stream.hashes(&path, stat.size, stat.mtime_ns).await {
                    return WorkerEnd::Retry(e.into());
                }
            }
        }
        // 1. Give back what others took over, or what they already wrote.
        let mut trims = Vec::new();
        {
            let s = lock(&chosen.sched);
            for o in open.iter_mut() {
                let want = match s.end_of(o.ticket) {
                    Some(_) if s.exhausted(o.ticket) => o.next,
                    Some(e) => e,
                    None => o.next,
                };
                let want = want.max(o.next);
                if want < o.told {
                    o.told = want;
                    o.trims += 1;
                    o.trim_sent.get_or_insert_with(Instant::now);
                    o.trim_targets.push_back(want);
                    trims.push((o.id, want));
                }
            }
        }
        for (id, end) in trims {
            if let Err(e) = stream.trim(id, end).await {
                return WorkerEnd::Retry(e.into());
            }
        }
        // 1b. Ranges taken from others whose owners have heard back.
        let mut ready = Vec::new();
        held.retain(|t| {
            let state = lock(&chosen.sched).held(*t, Instant::now());
            match state {
                Hold::Waiting => true,
                Hold::Ready(r) => {
                    ready.push((*t, r));
                    false
                }
                Hold::Gone => {
                    let woken = lock(&chosen.sched).finish(*t);
                    for c in woken {
                        eng.wake_conn(c);
                    }
                    false
                }
            }
        });
        for (ticket, r) in ready {
            match stream.read(&path, stat.size, stat.mtime_ns, r.start, r.len()).await {
                Ok(id) => open.push_back(OpenRead::new(id, ticket, r)),
                Err(e) => return WorkerEnd::Retry(e.into()),
            }
        }
        // 2. Ask for the next range before the open ones run dry.
        if open.len() + held.len() < 2 {
            let grant = {
                let mut s = lock(&chosen.sched);
                let now = Instant::now();
                let pending: u64 = open.iter().map(|o| o.told.saturating_sub(o.next)).sum();
                let low = (s.conn_speed(conn_id, now) * s.lead_time(conn_id)) as u64 + PREFETCH_MIN;
                if open.is_empty() || pending < low {
                    s.assign(conn_id, src, now)
                } else {
                    None
                }
            };
            if let Some(g) = grant {
                debug!(conn = conn_id, src, start = g.range.start, len = g.range.len(), shrunk = ?g.shrunk, open = open.len(), "range granted");
                if let Some(v) = g.shrunk {
                    // Taken from another connection: requested once its
                    // server said where it stops (no byte fetched twice).
                    eng.wake_conn(v);
                    held.push(g.ticket);
                    continue;
                }
                let r = g.range;
                match stream.read(&path, stat.size, stat.mtime_ns, r.start, r.len()).await {
                    Ok(id) => open.push_back(OpenRead::new(id, g.ticket, r)),
                    Err(e) => return WorkerEnd::Retry(e.into()),
                }
                continue;
            }
        }
        // The hash list asked for is an answer to wait for, like a READ.
        let awaiting_hashes = asked.asked.is_some() && !asked.answered && chosen.hashes.get().is_none();
        if open.is_empty() && !awaiting_hashes && !held.is_empty() {
            // Only ranges waiting for their owners' TRIMMED: they wake us.
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            last_event = Instant::now();
            continue;
        }
        if open.is_empty() && !awaiting_hashes {
            if lock(&chosen.sched).is_complete() {
                return WorkerEnd::Done;
            }
            if budget.contended() {
                return WorkerEnd::Yield;
            }
            // Nothing to do now; wait for a failure elsewhere, a bad piece,
            // or for a slow owner to become worth duplicating.
            let changed = eng.changed.notified();
            tokio::select! {
                _ = changed => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            // Nothing was owed meanwhile: silence so far is no stall.
            last_event = Instant::now();
            got_data = false;
            continue;
        }
        // 3. Wait for the server, or for another connection taking over
        // part of our range.
        // A connection owed data that has gone quiet may sit on a link that
        // died silently, or on one that came back while TCP's retransmission
        // timer is backed off for seconds. Probe the path with fresh
        // connections (backoff steps apart); once one gets through, this
        // connection is abandoned and replaced at once.
        let quiet = last_event.elapsed();
        // A server hashing a large file says nothing until it is done.
        let patience = if open.is_empty() && awaiting_hashes { HASHES_TIMEOUT } else { idle };
        if quiet >= patience {
            return WorkerEnd::Retry(ClientError::Idle(patience).into());
        }
        let owed = !open.is_empty();
        if owed && quiet >= stall_after && probe.is_none() {
            probe = Some(Box::pin(probe_path(eng.dl.job.sources[src].clone(), probe_step)));
            probe_step = (probe_step * 2).min(PROBE_CAP);
        }
        // A server that does not answer a TRIM in time never gives the range
        // back, and the READs queued behind its stream wait on it: replace
        // the connection (its unreceived bytes go to others at once).
        // (The scheduler is asked only while a TRIM is unanswered: this
        // loop runs for every chunk received.)
        let trim_wait = open.iter().filter_map(|o| o.trim_sent).min().map(|t| {
            let patience = (lock(&chosen.sched).trim_deadline(conn_id) * 2).max(TRIM_PATIENCE);
            (t.elapsed(), patience)
        });
        if let Some((waited, _)) = trim_wait.filter(|(w, p)| w >= p) {
            return WorkerEnd::Reconnect(SourceError::TrimIgnored(waited));
        }
        let next_check = if owed && probe.is_none() { stall_after.saturating_sub(quiet) } else { patience - quiet };
        let next_check = match trim_wait {
            Some((waited, p)) => next_check.min(p.saturating_sub(waited) + Duration::from_millis(1)),
            None => next_check,
        };
        let ev = tokio::select! {
            ev = stream.next() => match ev {
                None => return WorkerEnd::Retry(ClientError::Closed.into()),
                Some(ev) => ev,
            },
            _ = wake.notified() => continue,
            _ = tokio::time::sleep(next_check) => continue,
            up = async { match probe.as_mut() { Some(p) => p.await, None => std::future::pending().await } } => {
                probe = None;
                if up && last_event.elapsed() >= stall_after {
                    return WorkerEnd::Reconnect(SourceError::Stalled(last_event.elapsed()));
                }
                continue;
            }
        };
        if got_data && probe.is_none() {
            stall_after = stall_after.max(last_event.elapsed() * 3).min(idle);
        }
        got_data = got_data || matches!(ev, Event::Data { .. });
        last_event = Instant::now();
        probe = None;
        probe_step = BACKOFF_START;
        match ev {
            Event::Header { id, offset, len } => {
                // Answers come strictly in order: requests before `id` are over.
                while open.front().is_some_and(|o| o.id != id) {
                    let Some(o) = open.pop_front() else { break };
                    if o.next < o.told.min(o.end) {
                        return violation(format!("request {} ended at {} before its end {}", o.id, o.next, o.told));
                    }
                    for c in {
                        let w = lock(&chosen.sched).finish(o.ticket);
                        w
                    } {
                        eng.wake_conn(c);
                    }
                }
                let Some(o) = open.front_mut() else {
                    return violation(format!("DATA for request {id}, which is not open"));
                };
                if offset != o.next || offset.checked_add(len).is_none_or(|e| e > o.limit) {
                    return violation(format!(
                        "asked for bytes {}..{}, server announced {len} bytes at {offset}",
                        o.next, o.limit
                    ));
                }
                o.frame_end = offset + len;
            }
            Event::Data { id, offset, buf, len } => {
                let Some(o) = open.front_mut().filter(|o| o.id == id) else {
                    return violation(format!("bytes for request {id}, which is not the one being answered"));
                };
                let got = Range::new(offset, offset.saturating_add(len as u64));
                if offset != o.next || got.end > o.frame_end {
                    return violation(format!("bytes {}..{} outside the announced DATA frame", got.start, got.end));
                }
                let ticket = o.ticket;
                o.next = got.end;
                let buf = match write_received(cx, ticket, got, buf, &mut hasher).await {
                    Ok(b) => b,
                    Err(fatal) => {
                        let _ = eng.outcome.try_send(Outcome::Fatal(fatal));
                        return WorkerEnd::Stopped;
                    }
                };
                stream.recycle(buf);
                if open.front().is_some_and(|o| o.over()) {
                    if let Some(o) = open.pop_front() {
                        for c in {
                            let w = lock(&chosen.sched).finish(o.ticket);
                            w
                        } {
                            eng.wake_conn(c);
                        }
                        eng.set_source(src, |s| s.ranges_done += 1);
                    }
                }
            }
            Event::Trimmed { id, end } => {
                let Some(i) = open.iter().position(|o| o.id == id) else { continue };
                let o = &mut open[i];
                o.trims = o.trims.saturating_sub(1);
                // The next TRIM in line has waited since this answer.
                o.trim_sent = (o.trims > 0).then(Instant::now);
                // How far past the TRIM the server had gone: at least to the
                // end asked for if it had already finished the request.
                let reached = if end == TRIM_NOT_OPEN { o.limit } else { end };
                let told = o.trim_targets.pop_front().unwrap_or(o.told);
                {
                    let mut sched = lock(&chosen.sched);
                    if reached > told {
                        sched.observe_overshoot(conn_id, reached - told, Instant::now());
                    }
                    for c in sched.trimmed(o.ticket, told, reached) {
                        eng.wake_conn(c);
                    }
                }
                if end == TRIM_NOT_OPEN {
                    // Finished on the server before the TRIM: all of it is here.
                    o.end = o.next;
                } else if end < o.next || end > o.limit {
                    return violation(format!("TRIMMED request {id} to {end}, outside {}..{}", o.next, o.limit));
                } else {
                    o.end = end;
                }
                debug!(conn = conn_id, id, end, "trimmed");
                if o.over() {
                    if let Some(o) = open.remove(i) {
                        for c in {
                            let w = lock(&chosen.sched).finish(o.ticket);
                            w
                        } {
                            eng.wake_conn(c);
                        }
                        eng.set_source(src, |s| s.ranges_done += 1);
                    }
                }
            }
            Event::Hashes(hashes) => {
                if asked.asked.is_none() || asked.answered {
                    return violation("HASHES_OK without a HASHES request".into());
                }
                // Marked answered only once accepted: a rejected list ends
                // this connection, and the guard lets another one ask.
                if hashes.len() != chosen.piece_count() {
                    return violation(format!(
                        "{} piece hashes for a file of {} pieces",
                        hashes.len(),
                        chosen.piece_count()
                    ));
                }
                let root = root_of(chosen.size, chosen.piece_size, &hashes);
                let announced = lock(&eng.votes).ballot(src).and_then(|b| b.root);
                if announced.is_some_and(|a| a != root) {
                    return WorkerEnd::Dead(SourceState::Failed, SourceError::ForgedHashes);
                }
                asked.answered = true;
                // Its vote, if it was still hashing when it answered STAT.
                lock(&eng.votes).root_known(src, root);
                if chosen.hashes.get().is_none() {
                    lock(&eng.lists).entry(root).or_insert(hashes);
                }
                eng.offered.notify_waiters();
                eng.decide_root(chosen);
                if eng.is_dead(src) {
                    return WorkerEnd::Stopped;
                }
            }
            Event::Error { code: ErrorCode::FileChanged, message, .. } => {
                return WorkerEnd::Dead(SourceState::Excluded, SourceError::FileChanged(message))
            }
            Event::Error { code, message, .. } => {
                let e = ClientError::Server { code, message };
                return if e.is_permanent() {
                    WorkerEnd::Dead(SourceState::Failed, e.into())
                } else {
                    WorkerEnd::Retry(e.into())
                };
            }
            Event::Failed(e) if e.is_permanent() => return WorkerEnd::Dead(SourceState::Failed, e.into()),
            Event::Failed(e) => return WorkerEnd::Retry(e.into()),
        }
    }
}
