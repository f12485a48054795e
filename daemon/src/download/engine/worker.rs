//! Workers and their sessions: one worker per connection slot, each
//! taking a permit of its host's connection budget for a session
//! (connect, STAT, elect, fetch), retrying with capped exponential
//! backoff; the adaptive number of connections per source ([`Growth`]);
//! proving a disputed claim of the pinned identity.
//!
//! Must never: hold a budget permit between sessions or while waiting to
//! retry, or keep a dropped source's worker running.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Notify;
use tracing::{debug, info};

use mftd_common::control::SourceState;
use mftd_common::proto::{root_of, ErrorCode, StatInfo};

use crate::download::budget::Lane;
use crate::download::client::{ClientError, Conn, Event};
use crate::download::error::{DownloadError, SourceError};
use crate::download::scheduler::{ConnId, SourceId};

use super::fetch::{fetch, ConnContext};
use super::{
    lock, Chosen, Engine, Outcome, BACKOFF_CAP, BACKOFF_START, CONNS_START, HASHES_PATIENCE, WINDOW_BOUND_BDP,
};

pub(super) struct Backoff(Duration);

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff(BACKOFF_START)
    }
    /// Next delay: doubling up to the cap, with ±25 % jitter so many
    /// clients do not retry in lockstep.
    pub(super) fn next(&mut self) -> Duration {
        let base = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_CAP);
        let jitter = rand::thread_rng().gen_range(0.75..1.25);
        base.mul_f64(jitter).min(BACKOFF_CAP)
    }
}
/// Adaptive connections per source.
///
/// A source gets more connections when its connections look window-bound
/// (rate x RTT of at least [`WINDOW_BOUND_BDP`] each: on a long path one TCP
/// connection is limited by the sender's socket buffer, 4 MiB by default),
/// its rate has stopped ramping up, and the previous addition raised the
/// source's rate by at least half of what the added connections would carry
/// at the mean per-connection rate. Additions double while they help (like
/// TCP's slow start) and stop for good once they do not. A source with a
/// long round trip gets one extra connection per 100 ms of RTT as soon as
/// the first handshake measured it (see `session`), so a short download
/// does not spend its life probing.
pub(super) struct Growth {
    sources: Vec<SourceGrowth>,
}

#[derive(Clone, Default)]
pub(super) struct SourceGrowth {
    /// Recent (time, source rate) samples, one per tick.
    samples: VecDeque<(Instant, f64)>,
    /// Last addition of connections.
    added: Option<Addition>,
    /// An addition did not help: stop adding.
    saturated: bool,
}

/// Connections added to a source, judged once they had time to ramp up.
#[derive(Clone, Copy)]
struct Addition {
    /// When they were added.
    at: Instant,
    /// The source's rate just before (0 for a head start).
    rate_before: f64,
    /// The source's connections carrying data just before.
    conns_before: usize,
    /// How many were added.
    count: usize,
}

impl Growth {
    pub(super) fn new(n: usize) -> Growth {
        Growth { sources: vec![SourceGrowth::default(); n] }
    }

    /// `k` connections were added to `src` as a head start for its long
    /// round trip; judge them like any other addition.
    pub(super) fn head_start(&mut self, src: SourceId, k: usize) {
        if let Some(g) = self.sources.get_mut(src) {
            g.added = Some(Addition { at: Instant::now(), rate_before: 0.0, conns_before: 0, count: k });
        }
    }

    /// Connections to add now, per source.
    pub(super) fn due(&mut self, eng: &Engine) -> Vec<(SourceId, usize)> {
        let Some(chosen) = eng.chosen.get() else { return Vec::new() };
        let now = Instant::now();
        let slots = lock(&eng.slots).clone();
        let n = slots.len();
        let (conns, rates, rtts, left) = {
            let s = lock(&chosen.sched);
            let mut conns = vec![0usize; n];
            let mut rates = vec![0.0; n];
            let mut rtts = vec![f64::MAX; n];
            for (src, _, rate, rtt) in s.conn_stats(now) {
                if src < n {
                    conns[src] += 1;
                    rates[src] += rate;
                    rtts[src] = rtts[src].min(rtt);
                }
            }
            (conns, rates, rtts, s.size() - s.received_bytes())
        };
        let mut out = Vec::new();
        for (src, g) in self.sources.iter_mut().enumerate() {
            let rate = rates[src];
            g.samples.push_back((now, rate));
            while g.samples.len() > 64 {
                g.samples.pop_front();
            }
            let most = eng.dl.conns_max;
            if g.saturated || eng.is_dead(src) || slots[src] >= most || conns[src] == 0 {
                continue;
            }
            let rtt = rtts[src];
            let room = most - slots[src];
            // Every connection up and carrying data before judging.
            if conns[src] < slots[src] {
                continue;
            }
            // Give new connections time to ramp up before judging them.
            let settle = Duration::from_secs_f64((rtt * 6.0).max(0.5));
            let mut next = 1;
            if let Some(Addition { at, rate_before: before, conns_before: n_before, count: k }) = g.added {
                if now.duration_since(at) < settle {
                    continue;
                }
                if before > 0.0 {
                    let per_conn = before / n_before.max(1) as f64;
                    if rate < before + per_conn * k as f64 * 0.5 {
                        debug!(source = %eng.dl.job.sources[src], before, after = rate, conns = conns[src], "more connections did not help");
                        g.saturated = true;
                        continue;
                    }
                    next = (k * 2).max(1);
                } else {
                    next = k.max(1);
                }
            }
            // Still ramping up (rate grew by more than 10 % over the last
            // half settle time): adding now would judge TCP's ramp-up.
            let past =
                g.samples.iter().find(|(t, _)| now.duration_since(*t) <= settle / 2).map(|(_, r)| *r).unwrap_or(0.0);
            if past <= 0.0 || rate > past * 1.1 {
                continue;
            }
            let per_conn_bdp = rate / conns[src] as f64 * rtt;
            // Not worth it for the last second or so of the download.
            if per_conn_bdp < WINDOW_BOUND_BDP || (left as f64) < rate * settle.as_secs_f64() * 2.0 {
                continue;
            }
            let k = next.min(room);
            debug!(source = %eng.dl.job.sources[src], rate, conns = conns[src], add = k, "window-bound connections: adding");
            g.added = Some(Addition { at: now, rate_before: rate, conns_before: conns[src], count: k });
            out.push((src, k));
        }
        out
    }
}

/// Why a worker's connection ended.
pub(super) enum WorkerEnd {
    /// Nothing left to fetch.
    Done,
    /// Download over or cancelled.
    Stopped,
    /// Connection failed; retry after a backoff.
    Retry(SourceError),
    /// The connection stalled while the path works again: reconnect now.
    Reconnect(SourceError),
    /// Nothing to do while other connections wait for this host's budget:
    /// give the permit back and queue again.
    Yield,
    /// This source is of no further use.
    Dead(SourceState, SourceError),
}

/// Why a source takes no part in the file the vote chose.
pub(super) enum ElectError {
    /// It serves another version.
    Different(SourceError),
    /// The download is over (failed, cancelled, or the vote cannot settle).
    Over,
    /// The vote is still open and other connections wait for this host's
    /// budget: the ballot stays cast, the connection gives its permit back.
    Yield,
    /// It claims the pinned root with another size than the one being
    /// fetched: one of the claims is false, and its hash list tells which.
    Disputed,
}

impl Engine {
    pub(super) fn add_worker(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>, src: SourceId) {
        let total: usize = {
            let mut slots = lock(&self.slots);
            if let Some(n) = slots.get_mut(src) {
                *n += 1;
            }
            slots.iter().sum()
        };
        if let Some(c) = self.chosen.get() {
            lock(&c.sched).set_expected_conns(total);
        }
        self.live_workers.fetch_add(1, Ordering::SeqCst);
        tasks.spawn(worker(self.clone(), src));
    }

    /// Tells connection `conn` that part of its range was taken over.
    pub(super) fn wake_conn(&self, conn: ConnId) {
        if let Some(n) = lock(&self.wakers).get(&conn) {
            n.notify_one();
        }
    }
}

impl Engine {
    /// All workers of all sources gave up: fail with every source's reason.
    pub(super) fn check_all_dead(&self) {
        // Workers stopped by a pause, a cancel or a shutdown did not give up.
        if self.live_workers.load(Ordering::SeqCst) > 0 || self.workers.is_cancelled() {
            return;
        }
        // Workers also end because everything is there; that is no failure.
        if self.chosen.get().is_some_and(|c| lock(&c.sched).is_complete()) {
            return;
        }
        let reasons: Vec<String> = self
            .dl
            .progress()
            .sources
            .iter()
            .map(|s| match (s.dropped(), &s.last_error) {
                (true, Some(why)) => format!("{}: {why}", s.address),
                _ => format!("{}: gave up", s.address),
            })
            .collect();
        let _ = self.outcome.try_send(Outcome::Fatal(DownloadError::NoUsableSource(reasons)));
    }
}

/// One connection slot to one source, for the whole download.
pub(super) async fn worker(eng: Arc<Engine>, src: SourceId) {
    let addr = eng.dl.job.sources[src].clone();
    let restricted = eng.dl.restricted_owner().map(|o| o.uid);
    let budget = tokio::select! {
        b = eng.dl.budgets.lane(&addr, restricted) => b,
        _ = eng.workers.cancelled() => {
            eng.live_workers.fetch_sub(1, Ordering::SeqCst);
            eng.check_all_dead();
            return;
        }
    };
    let mut backoff = Backoff::new();
    loop {
        if eng.workers.is_cancelled() || eng.is_dead(src) {
            break;
        }
        // A connection to this host counts against the daemon-wide budget
        // for the whole session.
        let permit = tokio::select! {
            p = budget.acquire() => match p {
                Some(p) => p,
                None => break,
            },
            _ = eng.workers.cancelled() => break,
        };
        let end = tokio::select! {
            e = session(&eng, src, &addr, &mut backoff, &budget) => e,
            _ = eng.workers.cancelled() => WorkerEnd::Stopped,
        };
        drop(permit);
        match end {
            WorkerEnd::Done | WorkerEnd::Stopped => {
                debug!(source = %addr, done = matches!(end, WorkerEnd::Done), "source connection ended");
                break;
            }
            WorkerEnd::Dead(state, why) => {
                eng.kill_source(src, state, why);
                // One voter fewer may settle the vote.
                if let Some(c) = eng.chosen.get() {
                    eng.decide_root(c);
                }
                break;
            }
            WorkerEnd::Yield => {
                // Others wait for this host's budget: queue again behind them.
                tokio::task::yield_now().await;
            }
            WorkerEnd::Reconnect(why) => {
                debug!(source = %addr, reason = %why, "replacing a stalled connection");
                eng.set_source(src, |s| s.last_error = Some(why.to_string()));
                backoff = Backoff::new();
            }
            WorkerEnd::Retry(why) => {
                let delay = backoff.next();
                let ballot = lock(&eng.votes).ballot(src);
                match ballot {
                    None => {
                        // Still waited for until the election deadline: a
                        // source down for a moment (a restart) gets to vote,
                        // so a fast liar cannot win by its absence.
                        eng.set_source(src, |s| s.last_error = Some(why.to_string()));
                        eng.note_waiting();
                    }
                    // Answered "hashing", then went down: its root is no
                    // longer waited for (it counts if it comes).
                    Some(b) if b.root.is_none() => {
                        let changed = lock(&eng.votes).stop_waiting_for_root(src);
                        if changed {
                            eng.vote_changed();
                        }
                    }
                    Some(_) => {}
                }
                debug!(source = %addr, error = %why, retry_in = ?delay, "source connection failed");
                eng.set_source(src, |s| {
                    s.last_error = Some(why.to_string());
                    if s.connections == 0 && matches!(s.state, SourceState::Active | SourceState::Connecting) {
                        s.state = SourceState::Waiting;
                    }
                });
                eng.refresh_state();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = eng.workers.cancelled() => break,
                }
            }
        }
    }
    eng.live_workers.fetch_sub(1, Ordering::SeqCst);
    eng.check_all_dead();
}

/// One connection: connect, STAT, elect, fetch until it ends.
pub(super) async fn session(
    eng: &Arc<Engine>,
    src: SourceId,
    addr: &str,
    backoff: &mut Backoff,
    budget: &Lane,
) -> WorkerEnd {
    let idle = eng.dl.idle_timeout;
    let secret = eng.dl.secret.as_deref().map(|s| s.as_slice());
    let (conn, stat) = match Conn::open(addr, idle, secret, &eng.dl.job.remote_path, &eng.dl.dialer).await {
        Ok(x) => x,
        Err(ClientError::Server { code: ErrorCode::NotFound, .. }) => {
            return WorkerEnd::Dead(SourceState::Failed, SourceError::NotFound(eng.dl.job.remote_path.clone()))
        }
        Err(e) if e.is_permanent() => return WorkerEnd::Dead(SourceState::Failed, e.into()),
        Err(e) => return WorkerEnd::Retry(e.into()),
    };
    let (rtt, transport, node_id) = (conn.rtt, conn.transport(), conn.node.as_ref().map(|n| n.to_string()));
    // The first round trip measured to a source sets its head start: one
    // more connection per 100 ms (a window-bound TCP connection carries
    // about its socket buffer per round trip), asked for now so they are
    // connected by the time the version is chosen and get their shares.
    if eng.dl.job.connections_per_source == 0 {
        let first = lock(&eng.rtt_known).get_mut(src).map(|k| !std::mem::replace(k, true)).unwrap_or(false);
        let extra = ((rtt.as_secs_f64() / 0.1) as usize).min(eng.dl.conns_max.saturating_sub(CONNS_START));
        if first && extra > 0 {
            debug!(source = %addr, rtt_ms = rtt.as_secs_f64() * 1e3, extra, "long round trip: more connections from the start");
            let _ = eng.more_conns.send((src, extra));
        }
    }
    // The piece size follows from the file size; a server announcing another
    // could make us allocate or hash absurd pieces.
    let want = mftd_common::proto::piece_size_for(stat.size);
    if stat.piece_count() > mftd_common::proto::MAX_PIECES {
        return WorkerEnd::Dead(
            SourceState::Failed,
            SourceError::Protocol(format!("a {}-byte file is larger than mftd can fetch", stat.size)),
        );
    }
    if stat.piece_size != want {
        return WorkerEnd::Dead(
            SourceState::Failed,
            SourceError::Protocol(format!(
                "piece size {} for a {}-byte file (expected {want})",
                stat.piece_size, stat.size
            )),
        );
    }
    let chosen = match eng.elect(src, &stat, budget).await {
        Ok(c) => c,
        Err(ElectError::Over) => return WorkerEnd::Stopped,
        Err(ElectError::Yield) => return WorkerEnd::Yield,
        Err(ElectError::Different(e)) => return WorkerEnd::Dead(SourceState::Excluded, e),
        Err(ElectError::Disputed) => return prove_pinned_size(eng, src, conn, &stat).await,
    };
    // Connected and serving the right file: reset the backoff.
    *backoff = Backoff::new();
    eng.set_source(src, |s| {
        // Working again: the error is history, not the source's state
        // (unless the source was dropped meanwhile: its reason stands).
        if !s.dropped() {
            if let Some(e) = s.last_error.take() {
                s.recovered_from = Some(e);
            }
        }
        s.connections += 1;
        s.state = SourceState::Active;
        s.rtt = Some(s.rtt.map_or(rtt, |r| r.min(rtt)));
        s.transport = Some(transport);
        s.node_id = node_id;
    });
    eng.refresh_state();
    let conn_id = eng.next_conn.fetch_add(1, Ordering::Relaxed);
    let wake = Arc::new(Notify::new());
    lock(&eng.wakers).insert(conn_id, wake.clone());
    lock(&chosen.sched).open_conn(conn_id, src, rtt, Instant::now());
    // Give the ranges back even if this future is dropped (download over).
    struct Open<'a>(&'a Engine, &'a Chosen, ConnId);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            let woken = lock(&self.1.sched).release(self.2);
            lock(&self.0.wakers).remove(&self.2);
            for c in woken {
                self.0.wake_conn(c);
            }
        }
    }
    let guard = Open(eng, &chosen, conn_id);
    let mut stream = conn.into_stream();
    let cx = ConnContext { eng, chosen: &chosen, src, conn_id, stat: &stat, rtt, wake: &wake, budget };
    let end = fetch(&cx, &mut stream).await;
    drop(stream);
    drop(guard);
    eng.changed.notify_waiters();
    eng.set_source(src, |s| {
        s.connections = s.connections.saturating_sub(1);
        if s.connections == 0 && s.state == SourceState::Active {
            s.state = if matches!(end, WorkerEnd::Done | WorkerEnd::Yield) {
                SourceState::Idle
            } else {
                SourceState::Waiting
            };
        }
    });
    eng.refresh_state();
    end
}

/// `src` claims the pinned root with another size than the one being
/// fetched. The root commits to the size: its hash list either adds up to
/// the pin for its size, proving its claim (then every source that claimed
/// the pin with the size being fetched lied, and is dropped, and the
/// download starts over with the proven size), or it does not, and this
/// source is dropped for forged hashes.
pub(super) async fn prove_pinned_size(eng: &Arc<Engine>, src: SourceId, conn: Conn, stat: &StatInfo) -> WorkerEnd {
    let Some(pin) = eng.dl.job.pin else { return WorkerEnd::Stopped };
    let mut stream = conn.into_stream();
    if let Err(e) = stream.hashes(&eng.dl.job.remote_path, stat.size, stat.mtime_ns).await {
        return WorkerEnd::Retry(e.into());
    }
    // It announced a root, so it has hashed the file: the list is due in
    // about a round trip.
    let patience = HASHES_PATIENCE * 5;
    let hashes = match tokio::time::timeout(patience, stream.next()).await {
        Err(_) => return WorkerEnd::Retry(ClientError::Idle(patience).into()),
        Ok(None) => return WorkerEnd::Retry(ClientError::Closed.into()),
        Ok(Some(Event::Hashes(h))) => h,
        Ok(Some(Event::Failed(e))) => return WorkerEnd::Retry(e.into()),
        Ok(Some(Event::Error { code, message, .. })) => {
            return WorkerEnd::Retry(ClientError::Server { code, message }.into())
        }
        Ok(Some(_)) => return WorkerEnd::Dead(SourceState::Failed, SourceError::Protocol("unasked data".into())),
    };
    if hashes.len() as u64 != stat.piece_count() || root_of(stat.size, stat.piece_size, &hashes) != pin {
        return WorkerEnd::Dead(SourceState::Failed, SourceError::ForgedHashes);
    }
    let liars: Vec<SourceId> = {
        let v = lock(&eng.votes);
        (0..eng.dl.job.sources.len())
            .filter(|&s| v.ballot(s).is_some_and(|b| b.root == Some(pin) && b.size != stat.size))
            .collect()
    };
    info!(source = %eng.dl.job.sources[src], size = stat.size, "proved the pinned identity's size: starting over with it");
    for s in liars {
        eng.kill_source(
            s,
            SourceState::Failed,
            SourceError::Protocol(format!(
                "claimed the pinned identity with another size than it has ({} bytes, proven by {})",
                stat.size, eng.dl.job.sources[src]
            )),
        );
    }
    let _ = eng.outcome.try_send(Outcome::Relayout);
    WorkerEnd::Stopped
}

/// Whether a TCP connection to `addr` completes within `step` (the probe is
/// closed at once). Takes at least `step`, so probes are paced.
pub(super) async fn probe_path(addr: String, step: Duration) -> bool {
    let start = tokio::time::Instant::now();
    let addr = crate::node::SourceAddr::parse(&addr).map(|s| s.addr).unwrap_or(addr);
    let up = matches!(tokio::time::timeout(step, tokio::net::TcpStream::connect(&addr)).await, Ok(Ok(_)));
    if !up {
        tokio::time::sleep_until(start + step).await;
    }
    up
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's schedule: from 250 ms, doubling to a 5 s cap, each
    /// delay within ±25 % of its step, and not all alike.
    #[test]
    fn backoff_doubles_from_250_ms_to_a_5_s_cap_with_jitter() {
        assert_eq!(BACKOFF_START, Duration::from_millis(250));
        assert_eq!(BACKOFF_CAP, Duration::from_secs(5));
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new();
            let mut step = BACKOFF_START;
            for i in 0..10 {
                let d = b.next();
                assert!(
                    d >= step.mul_f64(0.75) && d <= step.mul_f64(1.25).min(BACKOFF_CAP),
                    "try {i}: {d:?} for step {step:?}"
                );
                if i == 0 {
                    firsts.insert(d);
                }
                step = (step * 2).min(BACKOFF_CAP);
            }
            assert_eq!(step, BACKOFF_CAP, "ten tries reach the cap");
        }
        assert!(firsts.len() > 10, "no jitter: {firsts:?}");
    }
}
