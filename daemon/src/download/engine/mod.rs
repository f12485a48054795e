//! The download engine: runs one download from its sources to a verified
//! file.
//!
//! Every source gets `connections_per_source` workers, or an adaptive number
//! (see `Growth`) when that is 0; each takes a permit of its host's
//! connection budget for its session. A worker connects, STATs the file,
//! takes part in choosing the file's identity (the version more than half of
//! the sources agree on; others are excluded and named), then asks the
//! [`Scheduler`] for ranges, requests each with one streamed READ (a range
//! taken from another connection only once that one's TRIMMED came back),
//! and writes what arrives straight to its offset in `NAME.mftpart`. A worker whose connection fails retries with capped
//! exponential backoff plus jitter; its unfinished range is taken over by
//! others from the exact byte reached. Completed pieces are verified against
//! their BLAKE3 hash: from the bytes as they were written when one
//! connection wrote the whole piece in its current generation, otherwise by
//! reading the piece back. A bad piece is fetched again and its senders get a
//! strike (dropped after [`MAX_STRIKES`]). When every piece is verified the
//! file is fsynced and renamed into place.
//!
//! Must never: write a byte that was not claimed first, let an unverified
//! byte reach the final name, or follow a symlink at the destination. Two
//! runs never write the same part file: it is `flock`ed for the run's
//! lifetime, and a run waits for its blocking writes before it ends.
//!
//! This file owns a run's lifecycle (start, the run loop, wind-down,
//! starting over for another size, the end of a stopped run). The rest, by
//! concern: `election` (the version to fetch), `worker` (workers, sessions,
//! backoff, connection growth), `fetch` (one connection's READ loop),
//! `write` (received bytes to verified pieces, blame), `checkpoint`
//! (manifests and the final rename).

mod checkpoint;
mod election;
mod fetch;
mod worker;
mod write;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use mftd_common::control::{DownloadState, SourceState};
use mftd_common::range::Range;

use super::error::DownloadError;
use super::run::{Download, StopReason};
use super::scheduler::{ConnId, Scheduler, SourceId};
use super::space::{self, SpaceWait};
use super::vote::Votes;

use checkpoint::{checkpoint, checkpointer, finish, finished_before};
use worker::Growth;

/// Bad pieces a source may send before it is dropped from the download.
pub const MAX_STRIKES: u32 = 3;
/// Connections per source when `connections_per_server` is 0 (adaptive):
/// start with [`CONNS_START`], add one at a time while each addition raises
/// the source's throughput, up to [`CONNS_MAX`].
pub const CONNS_START: usize = 2;
pub const CONNS_MAX: usize = 8;
/// A connection whose rate x round-trip time stays below this is not held
/// back by its window (the sender's socket buffer), so another connection
/// to the same source would not help.
const WINDOW_BOUND_BDP: f64 = (1u64 << 20) as f64;
/// Bytes a connection keeps asked for beyond one round trip of its
/// measured rate before it asks for its next range (so the next READ is
/// queued at the server before the current one ends).
const PREFETCH_MIN: u64 = 512 << 10;
/// First retry delay after a failure and the cap of the exponential backoff.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// A connection owed data that receives nothing for this long (or four
/// round trips, if longer) starts probing its path with fresh connections.
const STALL_AFTER: Duration = Duration::from_secs(1);
/// Longest pause between two probes of a stalled connection's path. A probe
/// is one SYN, so probing every second costs nothing, and a link that comes
/// back is noticed within about a second (plus one SYN retransmission).
const PROBE_CAP: Duration = Duration::from_secs(1);
/// How long a connection waits for a `HASHES_OK` while it has nothing else
/// to receive: the server may be hashing a large file.
const HASHES_TIMEOUT: Duration = super::client::STAT_TIMEOUT;
/// Least time a connection waits for the answer to its TRIM before it is
/// replaced (see `fetch`): honest servers answer within a round trip and
/// one paced frame.
const TRIM_PATIENCE: Duration = Duration::from_secs(1);
/// How long a hash list asked for from a source that announced its root
/// (so has hashed the file) may take before another source of that root is
/// asked as well: a source that never answers `HASHES` cannot hold up
/// verification.
const HASHES_PATIENCE: Duration = Duration::from_secs(2);
/// The election deadline: sources that have not answered `STAT` this long
/// after a run started are no longer waited for (see [`super::vote`]). A
/// source that answers later still joins, or is excluded if it disagrees.
pub const ELECTION_DEADLINE: Duration = super::client::CONNECT_TIMEOUT;

/// The file the download is fetching: its size, chosen by the vote before
/// the first byte is asked for, and its root, adopted by the vote once no
/// source still to answer could out-vote it (see [`super::vote`]).
struct Chosen {
    size: u64,
    piece_size: u32,
    /// The adopted root identity.
    root: std::sync::OnceLock<[u8; 32]>,
    /// The piece hashes, once a list adding up to `root` is known.
    hashes: std::sync::OnceLock<Vec<[u8; 32]>>,
    /// Pieces waiting for `hashes` to be verified, with their in-stream
    /// hash if one was computed.
    unchecked: Mutex<Vec<(usize, Option<[u8; 32]>)>>,
    file: Arc<File>,
    /// Shared with [`Download::pieces`]: progress is read from here.
    sched: Arc<Mutex<Scheduler>>,
}

enum Outcome {
    Complete,
    /// The vote moved to a file of another size than the one being fetched
    /// (its first answers came from a minority): start over with it.
    Relayout,
    Fatal(DownloadError),
    /// Persisting failed (fsync, manifest write): stop and keep the last
    /// good manifest, never trusting data written since.
    Suspend(DownloadError),
}

/// One bad copy of a piece with several authors (see [`write::suspect`]).
type BadCopy = Vec<AuthorSpan>;

/// One author's span of a bad copy of a piece, and the hash of what it
/// wrote there.
struct AuthorSpan {
    src: SourceId,
    range: Range,
    hash: [u8; 32],
}

/// Hash lists asked for (see [`Engine::should_ask_hashes`]).
#[derive(Default)]
struct HashRequests {
    /// Sources a connection has asked for their hash list (and not failed).
    sources: HashSet<SourceId>,
    /// Roots whose list was asked for, with when.
    roots: HashMap<[u8; 32], Instant>,
}

/// One connection's request for a hash list.
#[derive(Clone, Copy)]
struct HashesAsked {
    /// The root the asked source announced; `None` while it was still
    /// hashing (its root not known).
    root: Option<[u8; 32]>,
}

struct Engine {
    dl: Arc<Download>,
    /// Cancelled when the download ends for any reason: stops all workers.
    workers: CancellationToken,
    chosen: OnceCell<Arc<Chosen>>,
    votes: Mutex<Votes>,
    /// Piece hash lists received, by the root they add up to.
    lists: Mutex<HashMap<[u8; 32], Vec<[u8; 32]>>>,
    /// Sources a connection has asked for their hash list (and not failed),
    /// and the roots whose list was asked for, with when.
    asked: Mutex<HashRequests>,
    next_conn: AtomicU64,
    live_workers: AtomicUsize,
    /// Workers started per source.
    slots: Mutex<Vec<usize>>,
    /// Wakes a connection whose range another one took part of, so it
    /// sends its TRIM at once.
    wakers: Mutex<HashMap<ConnId, Arc<Notify>>>,
    /// Woken when work may have become available (failures, bad pieces).
    changed: Notify,
    verify_slots: Semaphore,
    outcome: mpsc::Sender<Outcome>,
    /// Blocking writes and verifications still running; the run waits for
    /// them so nothing from it lands after it ended.
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    drained: Notify,
    /// Bad copies of pieces with several authors, waiting for a good copy
    /// to tell who was wrong: per copy, each author's span and its hash.
    suspects: Mutex<HashMap<usize, Vec<BadCopy>>>,
    /// Woken when bytes were committed or a piece verified (checkpointer).
    progressed: Notify,
    /// Woken when a source offered a version or was dropped (election).
    offered: Notify,
    /// Sources whose round trip is known (the first connection measured it).
    rtt_known: Mutex<Vec<bool>>,
    /// Asks the run loop for more connections to a source.
    more_conns: mpsc::UnboundedSender<(SourceId, usize)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a download to its end. Never panics on peer or disk input.
pub async fn run(dl: Arc<Download>) {
    let d = dl.clone();
    if tokio::task::spawn_blocking(move || finished_before(&d)).await.unwrap_or(false) {
        info!(dest = %dl.job.destination.display(), "already renamed into place before a crash: download complete");
        dl.stop_clock();
        dl.set_state(DownloadState::Done);
        return;
    }
    let mut votes = Votes::new(dl.job.sources.len(), dl.job.pin).expect_size(dl.job.expected_size);
    // Bounded: each start over follows a new majority, and ballots never
    // change, so there are at most as many as there are sources.
    for _ in 0..=dl.job.sources.len() {
        match run_once(dl.clone(), votes).await {
            Some(v) => votes = v,
            None => return,
        }
        info!("the sources' majority serves another file size: starting over with it");
    }
    dl.fail(DownloadError::Unsettled.to_string());
}

/// One attempt: returns the votes when the download must start over with
/// another file size.
async fn run_once(dl: Arc<Download>, votes: Votes) -> Option<Votes> {
    let (eng, mut rx, mut more_rx) = Engine::start(dl.clone(), votes);
    info!(remote = %dl.job.remote_path, dest = %dl.job.destination.display(), sources = ?dl.job.sources, "download started");
    let mut tasks = tokio::task::JoinSet::new();
    let fixed = dl.job.connections_per_source as usize;
    for src in 0..dl.job.sources.len() {
        for _ in 0..if fixed > 0 { fixed } else { CONNS_START.min(dl.conns_max) } {
            eng.add_worker(&mut tasks, src);
        }
    }
    if dl.store.is_some() {
        tasks.spawn(checkpointer(eng.clone()));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut grow = Growth::new(dl.job.sources.len());
    let run_started = Instant::now();
    let mut deadline_passed = false;
    let outcome = loop {
        tokio::select! {
            o = rx.recv() => break o,
            _ = dl.token.cancelled() => break None,
            Some((src, k)) = more_rx.recv() => {
                grow.head_start(src, k);
                for _ in 0..k {
                    eng.add_worker(&mut tasks, src);
                }
            }
            _ = tick.tick() => {
                if !deadline_passed && run_started.elapsed() >= ELECTION_DEADLINE {
                    deadline_passed = true;
                    eng.stop_waiting_for_silent();
                }
                let overdue = lock(&eng.votes).hashing_overdue(Instant::now());
                if overdue {
                    debug!("sources still hashing past their deadline are no longer waited for");
                    eng.vote_changed();
                }
                if fixed == 0 {
                    for (src, k) in grow.due(&eng) {
                        for _ in 0..k {
                            eng.add_worker(&mut tasks, src);
                        }
                    }
                }
                if let Some(limit) = dl.job.give_up_after {
                    let since = dl.progress().waiting_since;
                    if since.is_some_and(|t| t.elapsed() >= limit) {
                        let reasons: Vec<String> = dl.progress().sources.iter()
                            .map(|s| format!("{}: {}", s.address, s.last_error.as_deref().unwrap_or("unreachable")))
                            .collect();
                        break Some(Outcome::Fatal(DownloadError::GaveUp { secs: limit.as_secs(), reasons }));
                    }
                }
            }
        }
    };
    wind_down(&eng, tasks).await;
    if let Some(Outcome::Fatal(e) | Outcome::Suspend(e)) = &outcome {
        if let Some(wait) = space::wait_for(e, &dl, remaining(&dl)) {
            // A failed write left what was committed before it intact; a
            // failed checkpoint means nothing since the last one is trusted.
            let keep = matches!(outcome, Some(Outcome::Fatal(_)));
            pause_for_space(&eng, &dl, e, wait, keep).await;
            return None;
        }
    }

    let store = dl.store.clone();
    let forget = |why: &str| {
        dl.remove_part_file();
        if let Some(st) = &store {
            st.remove(dl.id);
        }
        info!("{why}: removed partial file and manifest");
    };
    match outcome {
        Some(Outcome::Relayout) => {
            return Some(relayout(eng, &dl));
        }
        Some(Outcome::Complete) => {
            dl.set_state(DownloadState::Verifying);
            debug!("all pieces verified; putting the file in place");
            match finish(&eng).await {
                Ok(()) => {
                    if let Some(st) = &store {
                        st.remove(dl.id);
                    }
                    info!(dest = %dl.job.destination.display(), "download complete");
                    dl.set_state(DownloadState::Done);
                }
                Err(e) => {
                    // The data is verified; keep it (and the manifest) so a
                    // later `get --resume` or `--force` need not fetch it again.
                    warn!(error = %e, "could not put the file in place");
                    let _ = checkpoint(&eng, false).await;
                    dl.fail(e.to_string());
                }
            }
        }
        Some(Outcome::Fatal(e)) => {
            warn!(error = %e, "download failed");
            // Keep what is on disk if there is something worth resuming.
            let worth = dl.pieces().bytes_done > 0 && store.is_some();
            if worth && checkpoint(&eng, false).await.is_ok() {
                info!("partial data kept; `mftctl get --resume {}` retries", dl.id);
            } else {
                forget("download failed");
            }
            dl.fail(e.to_string());
        }
        Some(Outcome::Suspend(e)) => {
            warn!(error = %e, "cannot persist progress; download paused, last good manifest kept");
            dl.progress().error = Some(format!("{e}; fix the problem and resume the download"));
            dl.set_state(DownloadState::Paused);
        }
        None => {
            // Paused, restarted, cancelled or shut down: the checkpoint
            // below records the running time as it is now, and it stays so.
            dl.stop_clock();
            stopped(eng, &dl, &forget).await;
        }
    }
    None
}

/// Bytes of the file not on disk yet (all of it while the size is unknown).
fn remaining(dl: &Download) -> u64 {
    let size = dl.progress().size.unwrap_or(0);
    size.saturating_sub(dl.pieces().bytes_done)
}

/// The disk is full: keep what is in (checkpointed when `keep`), pause, and
/// leave `wait` for the registry, which resumes the download when there is
/// room (see [`space`]).
async fn pause_for_space(eng: &Arc<Engine>, dl: &Arc<Download>, e: &DownloadError, wait: SpaceWait, keep: bool) {
    warn!(error = %e, dir = %wait.dir.display(), needed = wait.needed, "disk full; download paused until there is room");
    if keep {
        if let Err(c) = checkpoint(eng, false).await {
            warn!(error = %c, "could not persist progress; the last good manifest stays");
        }
    }
    dl.progress().error = Some(wait.message());
    *lock(&dl.space_wait) = Some(wait);
    dl.set_state(DownloadState::Paused);
}

/// The end of every run: stops the workers and waits (bounded) for writes
/// and verifications handed to the blocking pool; the scheduler's counts
/// are kept as the recorded ones, and sources the cancelled workers did not
/// count out are shown idle.
async fn wind_down(eng: &Arc<Engine>, mut tasks: tokio::task::JoinSet<()>) {
    let dl = &eng.dl;
    debug!("run over; stopping workers");
    eng.workers.cancel();
    // Workers stop at their next await; bound the wait anyway.
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    // A write or verification handed to the blocking pool cannot be
    // cancelled; wait (bounded) until they are done before the next run
    // could open the file.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let drained = eng.drained.notified();
            if eng.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            drained.await;
        }
    })
    .await;
    // The scheduler goes with the run; what it knew stays on show.
    // (Recorded before the scheduler is let go, so no reader sees neither.)
    let pieces = dl.pieces();
    dl.progress().recorded = pieces;
    *lock(&dl.pieces) = None;
    let mut p = dl.progress();
    // Workers cancelled mid-session did not get to count themselves out.
    for s in p.sources.iter_mut() {
        if s.dropped() {
            continue;
        }
        s.connections = 0;
        if matches!(s.state, SourceState::Active | SourceState::Connecting | SourceState::Waiting) {
            s.state = SourceState::Idle;
        }
    }
}

/// Starts over for the size the majority now serves: nothing fetched so far
/// belongs to that file. Returns the votes (ballots stay).
fn relayout(eng: Arc<Engine>, dl: &Arc<Download>) -> Votes {
    let votes = std::mem::replace(&mut *lock(&eng.votes), Votes::new(0, None));
    drop(eng);
    // (wind_down has already let the scheduler go.)
    dl.remove_part_file();
    if let Some(m) = lock(&dl.resume).as_mut() {
        m.file = None;
        m.verified.clear();
        m.received.clear();
    }
    {
        let mut p = dl.progress();
        p.size = None;
        p.identity = None;
        p.recorded = Default::default();
        for s in p.sources.iter_mut() {
            s.bytes = 0;
            // Excluded for serving the size now chosen, perhaps:
            // every source gets a new chance (ballots stay).
            if s.dropped() {
                s.state = SourceState::Connecting;
                s.strikes = 0;
            }
        }
    }
    votes
}

impl Engine {
    /// The engine of one run, with the channel its workers report the
    /// run's outcome on and the one they ask for more connections on.
    #[allow(clippy::type_complexity)]
    fn start(
        dl: Arc<Download>,
        votes: Votes,
    ) -> (Arc<Engine>, mpsc::Receiver<Outcome>, mpsc::UnboundedReceiver<(usize, usize)>) {
        let (tx, rx) = mpsc::channel(8);
        let (more_tx, more_rx) = mpsc::unbounded_channel();
        let eng = Arc::new(Engine {
            dl: dl.clone(),
            workers: dl.token.child_token(),
            chosen: OnceCell::new(),
            votes: Mutex::new(votes),
            lists: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashRequests::default()),
            next_conn: AtomicU64::new(1),
            live_workers: AtomicUsize::new(0),
            slots: Mutex::new(vec![0; dl.job.sources.len()]),
            wakers: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            verify_slots: Semaphore::new(2),
            outcome: tx,
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            suspects: Mutex::new(HashMap::new()),
            progressed: Notify::new(),
            offered: Notify::new(),
            rtt_known: Mutex::new(vec![false; dl.job.sources.len()]),
            more_conns: more_tx,
        });
        (eng, rx, more_rx)
    }
}

/// The end of a run stopped from outside (see [`StopReason`]).
async fn stopped(eng: Arc<Engine>, dl: &Arc<Download>, forget: &impl Fn(&str)) {
    let store = dl.store.clone();
    match dl.stop_reason() {
        Some(StopReason::Cancel) => {
            forget("download cancelled");
            dl.set_state(DownloadState::Cancelled);
        }
        // The registry starts the next run from this checkpoint.
        Some(StopReason::Restart) => {
            if let Err(e) = checkpoint(&eng, false).await {
                dl.progress().error = Some(e.to_string());
            }
            drop(eng);
            dl.set_state(DownloadState::Paused);
        }
        Some(StopReason::Pause) => match checkpoint(&eng, true).await {
            Ok(()) => {
                info!("download paused");
                dl.set_state(DownloadState::Paused);
            }
            Err(e) => {
                dl.progress().error = Some(e.to_string());
                dl.set_state(DownloadState::Paused);
            }
        },
        None if store.is_some() => {
            // Daemon shutdown: persist, and come back paused next time.
            if let Err(e) = checkpoint(&eng, false).await {
                warn!(error = %e, "could not persist progress at shutdown");
            }
            info!("download state saved for the next start");
            dl.set_state(DownloadState::Paused);
        }
        None => {
            forget("mftd stopped and this download has no resume state");
            dl.fail(DownloadError::NoResume.to_string());
        }
    }
}
