//! One run of one download and what can be seen of it: its progress, its
//! sources' progress, and how its run was stopped. The registry
//! ([`super::Downloads`]) makes runs; the [`super::engine`] drives one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use mftd_common::control::{DownloadInfo, DownloadState, SourceInfo, SourceState};
use mftd_common::manifest::{Manifest, ManifestOwner, ManifestPart, ManifestStats, SourceStats, FORMAT, VERSION};

use super::scheduler::Scheduler;
use super::{budget, client};
use crate::caller::Caller;
use crate::store::Store;

/// What was asked for, parsed: from a `get`, or from its manifest after a
/// pause or restart. The same for every run of a download; the manifest
/// records it (see [`Job::from_manifest`] and [`Download::base_manifest`]).
#[derive(Debug, Clone)]
pub struct Job {
    pub remote_path: String,
    pub destination: PathBuf,
    /// The name given with `get -O` (the destination's file name), if any.
    pub output_name: Option<String>,
    pub sources: Vec<String>,
    /// Replace an existing file at the destination.
    pub force: bool,
    pub connections_per_source: u32,
    /// Fail after this long in a row without a reachable source.
    pub give_up_after: Option<Duration>,
    /// Where the shared secret for the sources is read from.
    pub secret_file: Option<PathBuf>,
    /// Root identity the user pinned (`get --identity`).
    pub pin: Option<[u8; 32]>,
    /// Size the user expects (`get --size`).
    pub expected_size: Option<u64>,
    /// Who asked for it: the destination is written with their rights.
    pub owner: Caller,
}

impl Job {
    /// The job a manifest records. A pin that is not 64 hex digits cannot
    /// come from a manifest that loaded (see [`Manifest::validate`]).
    pub fn from_manifest(m: &Manifest) -> Job {
        Job {
            remote_path: m.remote_path.clone(),
            destination: PathBuf::from(&m.destination),
            output_name: m.output_name.clone(),
            sources: m.sources.clone(),
            force: m.force,
            connections_per_source: m.connections_per_source.min(16),
            give_up_after: m.give_up_after_secs.map(Duration::from_secs),
            secret_file: m.secret_file.as_ref().map(PathBuf::from),
            pin: m.pin.as_deref().and_then(|p| super::parse_identity(p).ok()),
            expected_size: m.expected_size,
            owner: m.owner.map(|o| Caller::user(o.uid, o.gid)).unwrap_or_else(Caller::daemon),
        }
    }
}

/// Why a download's run was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Pause,
    Cancel,
    /// Checkpoint and hand over to a new run with changed settings (sources
    /// added): the registry starts it, and watchers follow it.
    Restart,
}

#[derive(Debug, Clone)]
pub struct SourceProgress {
    pub address: String,
    pub state: SourceState,
    pub bytes: u64,
    pub bytes_received: u64,
    pub speed: u64,
    pub ranges_done: u64,
    pub strikes: u32,
    pub connections: u32,
    /// Smallest handshake round trip of this source's connections.
    pub rtt: Option<Duration>,
    /// How its last connection was made, and the node ID it proved.
    pub transport: Option<crate::transport::Transport>,
    pub node_id: Option<String>,
    pub last_error: Option<String>,
    /// The last error it recovered from (cleared from `last_error` when it
    /// connected again).
    pub recovered_from: Option<String>,
    pub(super) sample_bytes: u64,
}

impl SourceProgress {
    /// Dropped for the rest of this run: failed for good, or excluded for
    /// serving another version (`last_error` says why).
    pub fn dropped(&self) -> bool {
        matches!(self.state, SourceState::Failed | SourceState::Excluded)
    }
}

/// Where a download's pieces stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pieces {
    /// Bytes of the file on disk: verified pieces and received parts.
    pub bytes_done: u64,
    pub verified: u64,
    pub total: u64,
}

#[derive(Debug)]
pub struct Progress {
    pub state: DownloadState,
    pub size: Option<u64>,
    pub identity: Option<String>,
    /// How the version vote stands while no identity is adopted.
    pub vote: Option<String>,
    /// How the version in use was decided (see [`DownloadInfo::version`]).
    pub version: Option<String>,
    /// What the download waits for while no source has answered.
    pub waiting: Option<String>,
    pub error: Option<String>,
    /// Where the pieces stood by the manifest, shown while no run has a
    /// scheduler (see [`Download::pieces`]).
    pub recorded: Pieces,
    pub speed: u64,
    pub sources: Vec<SourceProgress>,
    pub(super) sample: Option<(Instant, u64)>,
    pub(super) finished: Option<Instant>,
    /// When the run stopped (paused or ended): its time stops counting.
    pub(super) stopped: Option<Instant>,
    /// Since when the download has been `waiting` without interruption.
    pub waiting_since: Option<Instant>,
}

/// One run of one download: what was asked and how it is going. Pausing
/// ends a run; resuming starts a new `Download` with the same ID from the
/// manifest on disk.
#[derive(Debug)]
pub struct Download {
    pub id: u64,
    pub job: Job,
    pub idle_timeout: Duration,
    pub checkpoint_interval: Duration,
    pub checkpoint_bytes: u64,
    /// Manifests are written for this download (`--no-resume` turns it off).
    pub store: Option<Store>,
    /// Shared secret for sources that require authentication (read from
    /// `job.secret_file`).
    pub secret: Option<Arc<Vec<u8>>>,
    /// Free space to leave (see [`DownloadDefaults::min_free_space`]).
    pub min_free_space: Option<u64>,
    /// Largest file it may fetch.
    pub max_size: Option<u64>,
    pub token: CancellationToken,
    /// Connection budgets per source host, shared by all downloads.
    pub budgets: Arc<budget::Budgets>,
    /// Most connections to one source (adaptive growth stops there): the
    /// engine's [`super::engine::CONNS_MAX`], or less for a restricted
    /// owner (`[quota] connections_per_source`).
    pub conns_max: usize,
    /// TLS and node-ID rules for connecting to sources.
    pub dialer: Arc<client::Dialer>,
    /// Progress to continue from, taken by the engine when it starts.
    pub resume: Mutex<Option<Manifest>>,
    /// The part file this download created (see [`super::part`]), as the
    /// manifest records it.
    pub(super) part: Mutex<Option<ManifestPart>>,
    pub stop: Mutex<Option<StopReason>>,
    /// Set when this run paused for a full disk: the registry resumes the
    /// download once there is room (never set by a user's pause).
    pub space_wait: Mutex<Option<super::space::SpaceWait>>,
    pub(super) started: Instant,
    /// Running time of earlier runs (from the manifest).
    pub(super) prior_elapsed: Duration,
    pub(super) progress: Mutex<Progress>,
    /// The running engine's scheduler, once the file's size is chosen: the
    /// one place that knows which bytes and pieces are in.
    pub(super) pieces: Mutex<Option<Arc<Mutex<Scheduler>>>>,
    pub(super) state_tx: watch::Sender<DownloadState>,
}

impl Download {
    pub fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_state(&self, state: DownloadState) {
        let mut p = self.progress();
        if p.state.is_final() || p.state == state {
            return;
        }
        p.state = state;
        p.waiting_since = if state == DownloadState::Waiting { Some(Instant::now()) } else { None };
        if state.is_final() {
            p.finished = Some(Instant::now());
        }
        p.stopped =
            (state.is_final() || state == DownloadState::Paused).then(|| p.stopped.unwrap_or_else(Instant::now));
        drop(p);
        self.state_tx.send_replace(state);
    }

    /// Sets a state even after a final one (cancelling a failed download).
    pub fn set_state_force(&self, state: DownloadState) {
        let mut p = self.progress();
        p.state = state;
        p.finished.get_or_insert_with(Instant::now);
        p.stopped.get_or_insert_with(Instant::now);
        drop(p);
        self.state_tx.send_replace(state);
    }

    pub fn fail(&self, error: String) {
        self.progress().error = Some(error);
        self.set_state(DownloadState::Failed);
    }

    pub fn state(&self) -> DownloadState {
        self.progress().state
    }

    pub fn subscribe(&self) -> watch::Receiver<DownloadState> {
        self.state_tx.subscribe()
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops this run's clock (it is about to stop running): the time a
    /// last checkpoint records is the time it shows.
    pub fn stop_clock(&self) {
        self.progress().stopped.get_or_insert_with(Instant::now);
    }

    /// Running time over all runs.
    fn elapsed(&self, p: &Progress) -> Duration {
        self.prior_elapsed + p.stopped.unwrap_or_else(Instant::now).saturating_duration_since(self.started)
    }

    /// The manifest for this download without data progress (but with the
    /// time and per-source work so far).
    pub fn base_manifest(&self) -> Manifest {
        let stats = {
            let p = self.progress();
            ManifestStats {
                elapsed_ms: self.elapsed(&p).as_millis() as u64,
                sources: p
                    .sources
                    .iter()
                    .map(|s| SourceStats {
                        address: s.address.clone(),
                        bytes: s.bytes,
                        bytes_received: s.bytes_received,
                        ranges_done: s.ranges_done,
                    })
                    .collect(),
            }
        };
        let job = &self.job;
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id: self.id,
            remote_path: job.remote_path.clone(),
            sources: job.sources.clone(),
            destination: job.destination.display().to_string(),
            output_name: job.output_name.clone(),
            force: job.force,
            connections_per_source: job.connections_per_source,
            give_up_after_secs: job.give_up_after.map(|d| d.as_secs()),
            secret_file: job.secret_file.as_ref().map(|p| p.display().to_string()),
            pin: job.pin.map(hex::encode),
            expected_size: job.expected_size,
            owner: Some(ManifestOwner { uid: job.owner.uid, gid: job.owner.gid }),
            paused: false,
            stats: Some(stats),
            file: None,
            verified: Vec::new(),
            received: Vec::new(),
            part: *self.part.lock().unwrap_or_else(|p| p.into_inner()),
            finishing: false,
            checksum: String::new(),
        }
    }

    /// Deletes the partial file if it is this download's (with the owner's
    /// rights, through the pinned directory, so a swapped-in link cannot
    /// redirect it); a file already gone is fine, anyone else's stays.
    pub fn remove_part_file(&self) {
        let record = *self.part.lock().unwrap_or_else(|p| p.into_inner());
        let uid = self.part_owner_uid();
        if let Ok((dest, _pin)) = crate::caller::pin_dir(&self.job.destination, self.restricted_owner()) {
            let _ = crate::caller::as_caller(self.restricted_owner(), || {
                super::part::remove_own(&part_path(&dest), record, uid)
            });
        }
    }

    /// The user the part file belongs to: the owner when the daemon is root
    /// and acts with the owner's rights, else the daemon's (as
    /// [`crate::caller::as_caller`] decides).
    pub fn part_owner_uid(&self) -> u32 {
        let me = nix::unistd::geteuid();
        match self.restricted_owner() {
            Some(o) if me.is_root() => o.uid,
            _ => me.as_raw(),
        }
    }

    pub fn part_path(&self) -> PathBuf {
        part_path(&self.job.destination)
    }

    /// Whether `caller` may see this download (its destination, sources
    /// and progress): the unrestricted see all, others their own.
    pub fn visible_to(&self, caller: &Caller) -> bool {
        caller.unrestricted() || self.job.owner.uid == caller.uid
    }

    /// The owner when its rights are not the daemon's: file operations on
    /// the destination then run with them (see [`caller::as_caller`]).
    pub fn restricted_owner(&self) -> Option<&Caller> {
        (!self.job.owner.unrestricted()).then_some(&self.job.owner)
    }

    /// Updates speeds; called periodically.
    pub fn sample(&self) {
        let now = Instant::now();
        let done = self.pieces().bytes_done;
        let mut p = self.progress();
        if p.state.is_final() {
            p.speed = 0;
            for s in &mut p.sources {
                s.speed = 0;
            }
            return;
        }
        if let Some((t, b)) = p.sample {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                p.speed = (done.saturating_sub(b) as f64 / dt) as u64;
                for s in &mut p.sources {
                    s.speed = (s.bytes_received.saturating_sub(s.sample_bytes) as f64 / dt) as u64;
                }
            }
        }
        p.sample = Some((now, done));
        for s in &mut p.sources {
            s.sample_bytes = s.bytes_received;
        }
    }

    /// Where the pieces stand: the scheduler's count while a run has one,
    /// else the manifest's.
    pub fn pieces(&self) -> Pieces {
        let sched = self.pieces.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match sched {
            // Never held together with the progress lock.
            Some(s) => {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                Pieces {
                    bytes_done: s.received_bytes(),
                    verified: s.verified_count() as u64,
                    total: s.piece_count() as u64,
                }
            }
            None => self.progress().recorded,
        }
    }

    pub fn info(&self) -> DownloadInfo {
        let pieces = self.pieces();
        let p = self.progress();
        let size = p.size;
        // Shares are of what is in the file, so they (with what was found
        // on disk without a record) always add up to 100 %.
        let credited: u64 = p.sources.iter().map(|s| s.bytes).sum();
        let found_on_disk = pieces.bytes_done.saturating_sub(credited);
        let whole = pieces.bytes_done.max(credited);
        // A paused download moves no bytes: no speed, no ETA.
        let stopped = p.state.is_final() || p.state == DownloadState::Paused;
        let eta_secs = match (size, p.speed) {
            (Some(s), sp) if sp > 0 && !stopped => Some(s.saturating_sub(pieces.bytes_done) / sp),
            _ => None,
        };
        DownloadInfo {
            id: self.id,
            remote_path: self.job.remote_path.clone(),
            destination: self.job.destination.display().to_string(),
            state: p.state,
            size,
            bytes_done: pieces.bytes_done,
            pieces_verified: pieces.verified,
            pieces_total: pieces.total,
            speed: if stopped { 0 } else { p.speed },
            eta_secs,
            elapsed_ms: self.elapsed(&p).as_millis() as u64,
            found_on_disk,
            sources: p
                .sources
                .iter()
                .map(|s| SourceInfo {
                    address: s.address.clone(),
                    state: s.state,
                    bytes: s.bytes,
                    bytes_received: s.bytes_received,
                    speed: if stopped { 0 } else { s.speed },
                    share: if whole > 0 { s.bytes as f64 / whole as f64 } else { 0.0 },
                    ranges_done: s.ranges_done,
                    strikes: s.strikes,
                    connections: s.connections,
                    rtt_ms: s.rtt.map(|r| (r.as_secs_f64() * 1e5).round() / 100.0),
                    transport: s.transport.map(|t| t.to_string()),
                    node_id: s.node_id.clone(),
                    last_error: s.last_error.clone(),
                    recovered_from: s.recovered_from.clone(),
                })
                .collect(),
            identity: p.identity.clone(),
            vote: if p.identity.is_none() { p.vote.clone() } else { None },
            version: if p.identity.is_some() { p.version.clone() } else { None },
            waiting: if stopped { None } else { p.waiting.clone() },
            error: p.error.clone(),
        }
    }
}

/// `NAME.mftpart` next to the destination.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".mftpart");
    PathBuf::from(s)
}

pub(super) fn new_progress(sources: &[String], state: DownloadState) -> Progress {
    Progress {
        state,
        size: None,
        identity: None,
        vote: None,
        version: None,
        waiting: None,
        error: None,
        recorded: Pieces::default(),
        speed: 0,
        sources: sources
            .iter()
            .map(|a| SourceProgress {
                address: a.clone(),
                state: SourceState::Connecting,
                bytes: 0,
                bytes_received: 0,
                speed: 0,
                ranges_done: 0,
                strikes: 0,
                connections: 0,
                rtt: None,
                transport: None,
                node_id: None,
                last_error: None,
                recovered_from: None,
                sample_bytes: 0,
            })
            .collect(),
        sample: None,
        finished: None,
        stopped: None,
        waiting_since: None,
    }
}
