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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, Notify, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use mftd_common::control::{DownloadState, SourceState};
use mftd_common::proto::{root_of, ErrorCode, StatInfo, TRIM_NOT_OPEN};
use mftd_common::range::Range;

use super::budget::Lane;
use super::client::{ClientError, Conn, Event, Stream};
use super::error::{DownloadError, SourceError};
use super::part::{open_part, rename_into_place, PartRequest};
use super::run::{part_path, Download, SourceProgress, StopReason};
use super::scheduler::{ConnId, Hold, Scheduler, SourceId, Ticket, FROM_DISK};
use super::space::{self, SpaceWait};
use super::vote::{Ballot, Decision, Offer, Votes};
use mftd_common::manifest::{piece_runs, ManifestFile};

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

/// One bad copy of a piece with several authors: each author's span and
/// the hash of what it wrote there (see [`suspect`]).
type BadCopy = Vec<(SourceId, Range, [u8; 32])>;

/// Sources asked for their hash list, and roots whose list was asked for
/// with when (see [`Engine::should_ask_hashes`]).
type Asked = (HashSet<SourceId>, HashMap<[u8; 32], Instant>);

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
    asked: Mutex<Asked>,
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
            asked: Mutex::new((HashSet::new(), HashMap::new())),
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

/// Writes the manifest: fdatasync the data first, then claim it.
async fn checkpoint(eng: &Arc<Engine>, paused: bool) -> Result<(), DownloadError> {
    let Some(store) = eng.dl.store.clone() else { return Ok(()) };
    let mut m = eng.dl.base_manifest();
    m.paused = paused;
    match eng.chosen.get() {
        Some(c) => {
            record_progress(&mut m, c);
            let file = c.file.clone();
            let part = eng.dl.part_path();
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(DownloadError::task("fdatasync"))?
                .map_err(DownloadError::disk("fdatasync", part))?;
        }
        None => {
            // Progress from a previous run is not known to the scheduler
            // yet: what the manifest it started from recorded stands (with
            // this run's sources, stats and pause flag).
            if let Some(r) = lock(&eng.dl.resume).as_ref() {
                m.file = r.file.clone();
                m.verified = r.verified.clone();
                m.received = r.received.clone();
            }
        }
    }
    // The crash windows of a checkpoint with something to lose.
    let progress = !m.verified.is_empty() || !m.received.is_empty();
    let at = move |step: crate::store::Step| {
        if progress {
            crate::failpoint::hit(step.failpoint());
        }
    };
    if progress {
        crate::failpoint::hit("checkpoint-data-synced");
    }
    let path = store.path(m.id);
    tokio::task::spawn_blocking(move || store.save_with(&m, at))
        .await
        .map_err(DownloadError::task("manifest"))?
        .map_err(DownloadError::disk("write manifest", path))
}

/// Puts what the scheduler knows of the file into `m`.
fn record_progress(m: &mut mftd_common::manifest::Manifest, c: &Chosen) {
    let (verified, received) = {
        let s = lock(&c.sched);
        (piece_runs(s.verified_pieces()), s.received_unverified())
    };
    m.file = Some(ManifestFile { size: c.size, piece_size: c.piece_size, identity: c.root.get().map(hex::encode) });
    m.verified = verified;
    m.received = received;
}

/// Checkpoints while bytes arrive: at least every `checkpoint_interval`, and
/// after at most `checkpoint_bytes` new bytes.
async fn checkpointer(eng: Arc<Engine>) {
    let interval = eng.dl.checkpoint_interval;
    let mut last = Instant::now();
    let mut last_sig = (0u64, 0usize);
    let mut root_saved = false;
    loop {
        // Wake on progress (for the byte threshold) and when the interval
        // is up; nothing wakes it while no byte arrives.
        let progressed = eng.progressed.notified();
        let due = tokio::time::Instant::from_std(last + interval);
        tokio::select! {
            _ = progressed => {}
            _ = tokio::time::sleep_until(due) => {}
            _ = eng.workers.cancelled() => return,
        }
        let Some(c) = eng.chosen.get() else {
            // Nothing to save before a version is chosen; the interval
            // starts over (else the passed deadline would wake this loop
            // again at once, spinning while a download waits to start).
            last = Instant::now();
            continue;
        };
        let sig = {
            let s = lock(&c.sched);
            (s.received_bytes(), s.verified_count())
        };
        // The adopted identity is recorded at once: a restart must be able
        // to tell that the remote file changed.
        if !root_saved && c.root.get().is_some() {
            root_saved = true;
            if let Err(e) = checkpoint(&eng, false).await {
                let _ = eng.outcome.try_send(Outcome::Suspend(e));
                return;
            }
            continue;
        }
        if sig == last_sig {
            if last.elapsed() >= interval {
                last = Instant::now();
            }
            continue;
        }
        if last.elapsed() >= interval || sig.0.abs_diff(last_sig.0) >= eng.dl.checkpoint_bytes {
            if let Err(e) = checkpoint(&eng, false).await {
                let _ = eng.outcome.try_send(Outcome::Suspend(e));
                return;
            }
            last = Instant::now();
            last_sig = sig;
        }
    }
}

/// Whole-file check against the identity, fsync, the manifest marked
/// `finishing`, rename, directory fsync. The mark lets a run after a crash
/// between the rename and the manifest's removal recognise the finished
/// file ([`finished_before`]).
async fn finish(eng: &Arc<Engine>) -> Result<(), DownloadError> {
    let Some(chosen) = eng.chosen.get().cloned() else { return Err(DownloadError::NotVerified(eng.dl.part_path())) };
    let dest = eng.dl.job.destination.clone();
    let force = eng.dl.job.force;
    let owner = eng.dl.restricted_owner().cloned();
    let c = chosen.clone();
    tokio::task::spawn_blocking(move || {
        let part = part_path(&dest);
        // The whole file is the union of its pieces, each checked against
        // its hash after it was written; the piece hashes must add up to
        // the announced root identity.
        let all = lock(&c.sched).verified_count() == c.piece_count();
        if !all || !c.identity_holds() {
            return Err(DownloadError::NotVerified(part));
        }
        let len = c.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        if len != c.size {
            return Err(DownloadError::WrongLength { path: part, len, want: c.size });
        }
        c.file.sync_all().map_err(DownloadError::disk("fsync", &part))
    })
    .await
    .map_err(DownloadError::task("final check"))??;
    if let Some(store) = eng.dl.store.clone() {
        let mut m = eng.dl.base_manifest();
        record_progress(&mut m, &chosen);
        m.finishing = true;
        let path = store.path(m.id);
        tokio::task::spawn_blocking(move || store.save(&m))
            .await
            .map_err(DownloadError::task("manifest"))?
            .map_err(DownloadError::disk("write manifest", path))?;
        crate::failpoint::hit("finish-marked");
    }
    let dest = eng.dl.job.destination.clone();
    tokio::task::spawn_blocking(move || {
        let part = part_path(&dest);
        let (at, _pin) = crate::caller::pin_dir(&dest, owner.as_ref())
            .map_err(DownloadError::disk("open the directory of", &part))?;
        crate::caller::as_caller(owner.as_ref(), || rename_into_place(&chosen.file, &part_path(&at), &at, force))
            .map_err(DownloadError::disk("act as the download's owner on", &part))??;
        Ok(())
    })
    .await
    .map_err(DownloadError::task("rename"))?
}

/// Whether a crash came between the final rename and the manifest's
/// removal: the manifest says `finishing`, and the destination is a
/// regular file of the recorded size and identity. Then the download is
/// done; what is left of it (the manifest, a part file of its own) is
/// removed. Blocking (it may hash the whole file).
fn finished_before(dl: &Download) -> bool {
    let Some(m) = lock(&dl.resume).clone().filter(|m| m.finishing) else { return false };
    let Some((size, Some(identity))) = m.file.as_ref().map(|f| (f.size, f.identity.clone())) else { return false };
    let open = || {
        OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(&dl.job.destination)
    };
    let Ok(Ok(file)) = crate::caller::as_caller(dl.restricted_owner(), open) else { return false };
    if !file.metadata().is_ok_and(|meta| meta.is_file() && meta.len() == size) {
        return false;
    }
    match crate::identity::hash_file(&file, size, 2) {
        Ok(id) if hex::encode(id.root) == identity => {}
        _ => return false,
    }
    dl.remove_part_file();
    if let Some(st) = &dl.store {
        st.remove(dl.id);
    }
    let piece_size = mftd_common::proto::piece_size_for(size);
    let total = mftd_common::proto::piece_count_for(size, piece_size);
    let mut p = dl.progress();
    p.size = Some(size);
    p.identity = Some(identity);
    p.recorded = super::run::Pieces { bytes_done: size, verified: total, total };
    for s in p.sources.iter_mut() {
        s.state = SourceState::Idle;
    }
    true
}

struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(BACKOFF_START)
    }
    /// Next delay: doubling up to the cap, with ±25 % jitter so many
    /// clients do not retry in lockstep.
    fn next(&mut self) -> Duration {
        let base = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_CAP);
        let jitter = rand::thread_rng().gen_range(0.75..1.25);
        base.mul_f64(jitter).min(BACKOFF_CAP)
    }
}

/// Per-source state lives in one place, the download's progress (what
/// `downloads show` reports): whether a source was dropped and why, its
/// strikes, its bytes. The scheduler is told about drops as input.
impl Engine {
    fn set_source(&self, src: SourceId, f: impl FnOnce(&mut SourceProgress)) {
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

    fn is_dead(&self, src: SourceId) -> bool {
        self.dl.progress().sources.get(src).is_some_and(|s| s.dropped())
    }

    /// A source will never be useful for this download. The first reason
    /// stands.
    fn kill_source(&self, src: SourceId, state: SourceState, why: SourceError) {
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
    fn refresh_state(&self) {
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
    fn stop_waiting_for_silent(self: &Arc<Self>) {
        let changed = lock(&self.votes).deadline_passed();
        if changed {
            debug!("election deadline passed: sources that did not answer are not waited for");
            self.vote_changed();
        }
        self.note_waiting();
    }

    /// A source is no longer waited for: the vote may close now.
    fn vote_changed(self: &Arc<Self>) {
        self.offered.notify_waiters();
        if let Some(c) = self.chosen.get() {
            self.decide_root(c);
        }
    }

    /// While no source has answered, says so and what to do; once one has,
    /// says nothing.
    fn note_waiting(&self) {
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
    fn note_version(&self, c: &Chosen, root: [u8; 32]) {
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
    async fn elect(self: &Arc<Self>, src: SourceId, stat: &StatInfo, budget: &Lane) -> Result<Arc<Chosen>, ElectError> {
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
    fn compare(&self, c: &Arc<Chosen>, src: SourceId, stat: &StatInfo) -> Result<Arc<Chosen>, ElectError> {
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

    fn different(&self, size: u64, root: Option<[u8; 32]>, c: &Chosen) -> SourceError {
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
    fn decide_root(self: &Arc<Self>, c: &Arc<Chosen>) {
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
    fn settle_root(self: &Arc<Self>, c: &Arc<Chosen>, root: [u8; 32]) {
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
    fn exclude_others(&self, c: &Chosen, root: [u8; 32]) {
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
    fn check_complete(&self, c: &Chosen) {
        if c.verifiable() && lock(&c.sched).is_complete() {
            let _ = self.outcome.try_send(Outcome::Complete);
            self.changed.notify_waiters();
        }
    }

    /// Whether connection of `src` should ask its server for the piece hash
    /// list: its root is not known yet (the server was still hashing), or no
    /// list adding up to its root is known or asked for.
    fn should_ask_hashes(&self, c: &Chosen, src: SourceId) -> Option<Option<[u8; 32]>> {
        if c.hashes.get().is_some() || c.piece_count() == 0 {
            return None;
        }
        let root = lock(&self.votes).ballot(src)?.root;
        let mut asked = lock(&self.asked);
        if asked.0.contains(&src) {
            return None;
        }
        if let Some(r) = root {
            // A source that announced its root has hashed the file: its
            // answer is due within a round trip and what is queued ahead of
            // it. Past that, another source of the same root is asked too.
            let waited = asked.1.get(&r).map(|t| t.elapsed());
            if waited.is_some_and(|w| w < HASHES_PATIENCE) || lock(&self.lists).contains_key(&r) {
                return None;
            }
            asked.1.insert(r, Instant::now());
        }
        asked.0.insert(src);
        Some(root)
    }

    /// Creates the part file for a file of `size` bytes.
    async fn prepare(self: Arc<Self>, size: u64) -> Result<Arc<Chosen>, DownloadError> {
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

    fn strike(&self, src: SourceId, piece: usize) {
        // Bytes of a source already dropped (typically one excluded for
        // serving another version, whose parked pieces fail once the
        // majority's hashes are known): its first reason stands.
        if self.is_dead(src) {
            debug!(source = %self.dl.job.sources[src], piece, "piece of a dropped source failed verification");
            return;
        }
        let mut n = 0;
        self.set_source(src, |s| {
            // Checked again under the lock: two verifications failing at
            // once must not take a source past its last strike.
            if s.dropped() || s.strikes >= MAX_STRIKES {
                return;
            }
            s.strikes += 1;
            n = s.strikes;
            s.last_error = Some(format!("piece {piece} failed verification"));
        });
        if n == 0 {
            return;
        }
        warn!(source = %self.dl.job.sources[src], piece, strikes = n, "piece failed verification");
        if n >= MAX_STRIKES {
            self.kill_source(src, SourceState::Failed, SourceError::BadPieces(n));
        }
    }

    /// All workers of all sources gave up: fail with every source's reason.
    fn check_all_dead(&self) {
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
struct Growth {
    sources: Vec<SourceGrowth>,
}

#[derive(Clone, Default)]
struct SourceGrowth {
    /// Recent (time, source rate) samples, one per tick.
    samples: VecDeque<(Instant, f64)>,
    /// Last addition: when, the source's rate and connections before it,
    /// and how many were added.
    added: Option<(Instant, f64, usize, usize)>,
    /// An addition did not help: stop adding.
    saturated: bool,
}

impl Growth {
    fn new(n: usize) -> Growth {
        Growth { sources: vec![SourceGrowth::default(); n] }
    }

    /// `k` connections were added to `src` as a head start for its long
    /// round trip; judge them like any other addition.
    fn head_start(&mut self, src: SourceId, k: usize) {
        if let Some(g) = self.sources.get_mut(src) {
            g.added = Some((Instant::now(), 0.0, 0, k));
        }
    }

    /// Connections to add now, per source.
    fn due(&mut self, eng: &Engine) -> Vec<(SourceId, usize)> {
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
            if let Some((at, before, n_before, k)) = g.added {
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
            g.added = Some((now, rate, conns[src], k));
            out.push((src, k));
        }
        out
    }
}

/// Why a worker's connection ended.
enum WorkerEnd {
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
enum ElectError {
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
    fn add_worker(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>, src: SourceId) {
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
    fn wake_conn(&self, conn: ConnId) {
        if let Some(n) = lock(&self.wakers).get(&conn) {
            n.notify_one();
        }
    }
}

/// One connection slot to one source, for the whole download.
async fn worker(eng: Arc<Engine>, src: SourceId) {
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
async fn session(eng: &Arc<Engine>, src: SourceId, addr: &str, backoff: &mut Backoff, budget: &Lane) -> WorkerEnd {
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
    let end = fetch(eng, &chosen, src, conn_id, &mut stream, &stat, rtt, &wake, budget).await;
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
async fn prove_pinned_size(eng: &Arc<Engine>, src: SourceId, conn: Conn, stat: &StatInfo) -> WorkerEnd {
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

/// One `READ` open on a connection.
#[derive(Debug)]
struct OpenRead {
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
    fn new(id: u32, ticket: Ticket, r: Range) -> OpenRead {
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
    fn over(&self) -> bool {
        self.trims == 0 && self.next >= self.end
    }
}

/// Fetches over one connection until there is nothing left to do: each
/// assignment is one streamed READ; the next is asked for about one round
/// trip before the current one ends; ranges others took over are given
/// back with TRIM.
#[allow(clippy::too_many_arguments)]
async fn fetch(
    eng: &Arc<Engine>,
    chosen: &Arc<Chosen>,
    src: SourceId,
    conn_id: ConnId,
    stream: &mut Stream,
    stat: &StatInfo,
    rtt: Duration,
    wake: &Notify,
    budget: &Lane,
) -> WorkerEnd {
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
        /// Asked, and for which root (`None`: the source's is not known).
        asked: Option<Option<[u8; 32]>>,
        answered: bool,
    }
    impl Drop for AskedHashes<'_> {
        fn drop(&mut self) {
            if let (Some(root), false) = (self.asked, self.answered) {
                let mut a = lock(&self.eng.asked);
                a.0.remove(&self.src);
                if let Some(r) = root {
                    a.1.remove(&r);
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
                let buf = match write_received(eng, chosen, src, conn_id, ticket, got, buf, &mut hasher).await {
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

/// Claims `got`, writes the claimed parts at their offsets, commits them and
/// starts verification of completed pieces. Returns the buffer.
#[allow(clippy::too_many_arguments)]
async fn write_received(
    eng: &Arc<Engine>,
    chosen: &Arc<Chosen>,
    src: SourceId,
    conn_id: ConnId,
    ticket: Ticket,
    got: Range,
    buf: Vec<u8>,
    hasher: &mut Option<PieceHasher>,
) -> Result<Vec<u8>, DownloadError> {
    let piece_size = chosen.piece_size as u64;
    let (claims, gens) = {
        let mut s = lock(&chosen.sched);
        let claims = s.claim(conn_id, ticket, got, Instant::now());
        let first = (got.start / piece_size) as usize;
        let last = (got.end.saturating_sub(1) / piece_size) as usize;
        let gens: Vec<(usize, u32)> = (first..=last).map(|p| (p, s.generation(p))).collect();
        (claims, gens)
    };
    eng.set_source(src, |s| s.bytes_received += got.len());
    if claims.is_empty() {
        *hasher = None;
        return Ok(buf);
    }
    let file = chosen.file.clone();
    let c2 = claims.clone();
    // Only bytes this connection wrote itself, all of them, can be hashed
    // in stream; anything else is verified by reading the piece back.
    let all_ours = claims.len() == 1 && claims[0] == got;
    let mut ph = if all_ours { hasher.take() } else { None };
    let size = chosen.size;
    let work = move || {
        let mut res: io::Result<()> = Ok(());
        for c in &c2 {
            let a = (c.start - got.start) as usize;
            let b = (c.end - got.start) as usize;
            if let Err(e) = file.write_all_at(&buf[a..b], c.start) {
                res = Err(e);
                break;
            }
        }
        let mut hashed = Vec::new();
        if all_ours && res.is_ok() {
            let mut at = got.start;
            while at < got.end {
                let piece = (at / piece_size) as usize;
                let Range { start: piece_start, end: piece_end } =
                    mftd_common::proto::piece_range(size, piece_size as u32, piece as u64);
                let end = piece_end.min(got.end);
                let gen = gens.iter().find(|(p, _)| *p == piece).map(|(_, g)| *g).unwrap_or(u32::MAX);
                if at == piece_start {
                    ph = Some(PieceHasher { piece, gen, next: at, hasher: blake3::Hasher::new() });
                }
                match ph.as_mut() {
                    Some(h) if h.piece == piece && h.next == at && h.gen == gen => {
                        h.hasher.update(&buf[(at - got.start) as usize..(end - got.start) as usize]);
                        h.next = end;
                        if end == piece_end {
                            hashed.push((piece, gen, *h.hasher.finalize().as_bytes()));
                            ph = None;
                        }
                    }
                    _ => ph = None,
                }
                at = end;
            }
        } else {
            ph = None;
        }
        (buf, res, ph, hashed)
    };
    eng.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(eng.clone());
    let (buf, res, ph, hashed) = tokio::task::spawn_blocking(move || {
        let r = work();
        drop(guard);
        r
    })
    .await
    .map_err(DownloadError::task("write"))?;
    *hasher = ph;
    if let Err(e) = res {
        let mut s = lock(&chosen.sched);
        for c in claims {
            s.unclaim(c);
        }
        return Err(DownloadError::disk("write", eng.dl.part_path())(e));
    }
    let mut ready = Vec::new();
    let written: u64 = claims.iter().map(|c| c.len()).sum();
    let hashed: Vec<(usize, [u8; 32])> = {
        let mut s = lock(&chosen.sched);
        for c in &claims {
            ready.extend(s.commit(src, *c));
        }
        // A hash started before the piece last failed describes an old copy.
        hashed.into_iter().filter(|(p, g, _)| s.generation(*p) == *g).map(|(p, _, h)| (p, h)).collect()
    };
    if let Some(s) = eng.dl.progress().sources.get_mut(src) {
        s.bytes += written;
    }
    for piece in ready {
        let eng = eng.clone();
        let chosen = chosen.clone();
        let known = hashed.iter().find(|(p, _)| *p == piece).map(|(_, h)| *h);
        spawn_verify(eng, chosen, piece, known);
    }
    eng.progressed.notify_one();
    Ok(buf)
}

impl Chosen {
    fn piece_count(&self) -> usize {
        mftd_common::proto::piece_count_for(self.size, self.piece_size) as usize
    }

    /// Byte range of piece `i`.
    fn piece_range(&self, i: usize) -> Range {
        mftd_common::proto::piece_range(self.size, self.piece_size, i as u64)
    }

    /// Whether pieces can be checked against an adopted identity: its root
    /// is adopted and its hash list known (none is needed without pieces).
    /// Cheap: `hashes` is only ever set to a list that adds up to `root`.
    fn verifiable(&self) -> bool {
        self.root.get().is_some() && (self.piece_count() == 0 || self.hashes.get().is_some())
    }

    /// [`Chosen::verifiable`], checked in full: the hash list (none without
    /// pieces) adds up to the adopted root.
    fn identity_holds(&self) -> bool {
        let hashes: &[[u8; 32]] = match (self.piece_count(), self.hashes.get()) {
            (0, _) => &[],
            (_, Some(h)) => h,
            (_, None) => return false,
        };
        self.root.get() == Some(&root_of(self.size, self.piece_size, hashes))
    }

    /// The piece hashes, or `None` after recording that piece `p` waits
    /// for them.
    fn hashes_or_park(&self, p: usize, known: Option<[u8; 32]>) -> Option<&Vec<[u8; 32]>> {
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
    fn hashes_arrived(self: &Arc<Self>, eng: &Arc<Engine>, hashes: Vec<[u8; 32]>) -> bool {
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

/// Whether a TCP connection to `addr` completes within `step` (the probe is
/// closed at once). Takes at least `step`, so probes are paced.
async fn probe_path(addr: String, step: Duration) -> bool {
    let start = tokio::time::Instant::now();
    let addr = crate::node::SourceAddr::parse(&addr).map(|s| s.addr).unwrap_or(addr);
    let up = matches!(tokio::time::timeout(step, tokio::net::TcpStream::connect(&addr)).await, Ok(Ok(_)));
    if !up {
        tokio::time::sleep_until(start + step).await;
    }
    up
}

/// Counts one blocking task of the engine while it lives.
struct InFlight(Arc<Engine>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// BLAKE3 state of the piece a connection is writing from its first byte.
pub struct PieceHasher {
    piece: usize,
    /// The piece's generation when hashing started (see `Scheduler::generation`).
    gen: u32,
    /// Next byte expected; anything else ends in-stream hashing.
    next: u64,
    hasher: blake3::Hasher,
}

/// Checks piece `p` against its hash: the hash computed while its bytes
/// were written when one connection wrote all of them (`known`), otherwise
/// by reading the piece back from disk.
/// Starts verifying piece `p`; counted in `in_flight` until done.
fn spawn_verify(eng: Arc<Engine>, chosen: Arc<Chosen>, p: usize, known: Option<[u8; 32]>) {
    eng.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(eng.clone());
    tokio::spawn(async move {
        let _guard = guard;
        verify(eng, chosen, p, known).await
    });
}

async fn verify(eng: Arc<Engine>, chosen: Arc<Chosen>, p: usize, known: Option<[u8; 32]>) {
    // The run is over (paused, cancelled, shut down): the next run
    // re-verifies whatever this one did not.
    if eng.workers.is_cancelled() {
        return;
    }
    // Pieces may complete before any source sent the hash list; they are
    // checked when it arrives (see `Chosen::hashes_arrived`).
    let Some(hashes) = chosen.hashes_or_park(p, known) else { return };
    let ok = match known {
        Some(h) => Ok(Ok(hashes.get(p) == Some(&h))),
        None => read_back(&eng, &chosen, p, hashes).await,
    };
    match ok {
        // A good copy tells whose bytes in earlier bad ones were wrong.
        Ok(Ok(true)) => judge(&eng, &chosen, p).await,
        Ok(Ok(false)) => {
            if let Some(solo) = suspect(&eng, &chosen, p).await {
                settle(eng, chosen.clone(), p, ok, false);
                lock(&chosen.sched).refetch_from(p, solo);
                return;
            }
        }
        _ => {}
    }
    settle(eng, chosen, p, ok, true);
}

/// BLAKE3 of bytes `r` of `file`.
fn hash_range(file: &File, r: Range) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; (r.len() as usize).min(1 << 20)];
    let mut at = r.start;
    while at < r.end {
        let n = ((r.end - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// Piece `p` failed with bytes of several sources in it (none dropped):
/// nobody is struck yet. The hash of each source's span of the bad copy is
/// kept, and the piece is fetched again whole from one source (the one
/// that wrote most of it). When a good copy is verified, [`judge`] strikes
/// exactly the sources whose spans differ from it: an honest source that
/// finished a piece a liar started is never struck for the liar's bytes.
/// Bytes found on disk when the run started count as an author of their
/// own ([`FROM_DISK`]): nobody is struck for them, and a source that only
/// completed such a piece is not blamed for what it found there.
/// Returns the source to fetch it from, or `None` when one source alone is
/// to blame (a sole author, or a dropped source among the authors).
async fn suspect(eng: &Arc<Engine>, chosen: &Arc<Chosen>, p: usize) -> Option<SourceId> {
    let spans = lock(&chosen.sched).spans_of(p);
    let mut bytes: HashMap<SourceId, u64> = HashMap::new();
    for (s, r) in &spans {
        *bytes.entry(*s).or_default() += r.len();
    }
    if bytes.len() < 2 || bytes.keys().any(|s| eng.is_dead(*s)) {
        return None;
    }
    let file = chosen.file.clone();
    let hashed = tokio::task::spawn_blocking(move || {
        spans.into_iter().map(|(s, r)| hash_range(&file, r).map(|h| (s, r, h))).collect::<io::Result<Vec<_>>>()
    })
    .await
    .ok()?
    .ok()?;
    debug!(piece = p, authors = ?bytes, "bad piece with several authors: fetching it again from one to tell who was wrong");
    lock(&eng.suspects).entry(p).or_default().push(hashed);
    // Bytes found on disk have no source to fetch from again.
    bytes.into_iter().filter(|(s, _)| *s != FROM_DISK).max_by_key(|(s, n)| (*n, std::cmp::Reverse(*s))).map(|(s, _)| s)
}

/// Piece `p` verified: every source whose span of an earlier bad copy of
/// it differs from the good bytes gets a strike; the others were honest.
async fn judge(eng: &Arc<Engine>, chosen: &Arc<Chosen>, p: usize) {
    let Some(copies) = lock(&eng.suspects).remove(&p) else { return };
    let file = chosen.file.clone();
    let guilty = tokio::task::spawn_blocking(move || {
        let mut guilty = Vec::new();
        for copy in copies {
            let mut spoiled: Vec<SourceId> = Vec::new();
            for (s, r, bad) in copy {
                // Bytes found on disk: nobody to strike for them.
                if s == FROM_DISK {
                    continue;
                }
                if hash_range(&file, r).is_ok_and(|good| good != bad) && !spoiled.contains(&s) {
                    spoiled.push(s);
                }
            }
            guilty.extend(spoiled);
        }
        guilty
    })
    .await
    .unwrap_or_default();
    for s in guilty {
        eng.strike(s, p);
    }
}

async fn read_back(
    eng: &Arc<Engine>,
    chosen: &Arc<Chosen>,
    p: usize,
    hashes: &[[u8; 32]],
) -> Result<io::Result<bool>, tokio::task::JoinError> {
    let Some(want) = hashes.get(p).copied() else { return Ok(Ok(false)) };
    let Ok(_slot) = eng.verify_slots.acquire().await else { return Ok(Ok(false)) };
    let c2 = chosen.clone();
    tokio::task::spawn_blocking(move || Ok(hash_range(&c2.file, c2.piece_range(p))? == want)).await
}

/// Records the outcome of verifying piece `p`; with `blame`, a bad piece's
/// authors are struck at once (see [`suspect`] for when they are not).
fn settle(
    eng: Arc<Engine>,
    chosen: Arc<Chosen>,
    p: usize,
    ok: Result<io::Result<bool>, tokio::task::JoinError>,
    blame: bool,
) {
    match ok {
        Ok(Ok(true)) => {
            lock(&chosen.sched).piece_verified(p);
            eng.check_complete(&chosen);
        }
        Ok(Ok(false)) => {
            let bad = lock(&chosen.sched).piece_failed(p);
            {
                // Those bytes are no longer part of the file.
                let mut prog = eng.dl.progress();
                for &(s, n) in &bad.contributors {
                    if let Some(sp) = prog.sources.get_mut(s) {
                        sp.bytes = sp.bytes.saturating_sub(n);
                    }
                }
            }
            // A piece that a dropped source (typically one excluded for
            // serving another version) helped write is its fault alone.
            let blame_dropped = bad.contributors.iter().any(|(s, _)| eng.is_dead(*s));
            if blame && !blame_dropped {
                for (s, _) in bad.contributors {
                    eng.strike(s, p);
                }
            }
            eng.changed.notify_waiters();
        }
        Ok(Err(e)) => {
            let _ = eng.outcome.try_send(Outcome::Fatal(DownloadError::disk("read back", eng.dl.part_path())(e)));
        }
        Err(e) => {
            let _ = eng.outcome.try_send(Outcome::Fatal(DownloadError::task("verification")(e)));
        }
    }
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
