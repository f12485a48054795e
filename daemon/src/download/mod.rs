//! Downloads: the registry of downloads this daemon runs, and each
//! download's observable progress. The fetching itself lives in
//! [`engine`]; who fetches what in [`scheduler`].

pub mod client;
pub mod engine;
pub mod scheduler;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, Instrument};

use mftd_common::control::{DownloadInfo, DownloadState, ErrorCode, GetRequest, SourceInfo, SourceState};
use mftd_common::path::local_name;

/// Settings every download starts from.
#[derive(Debug, Clone)]
pub struct DownloadDefaults {
    pub download_dir: PathBuf,
    pub connections_per_server: u32,
    pub idle_timeout: Duration,
}

/// A request that could not be accepted: code and a sentence for the user.
#[derive(Debug)]
pub struct Rejected(pub ErrorCode, pub String);

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
    pub last_error: Option<String>,
    sample_bytes: u64,
}

#[derive(Debug)]
pub struct Progress {
    pub state: DownloadState,
    pub size: Option<u64>,
    pub identity: Option<String>,
    pub error: Option<String>,
    pub bytes_done: u64,
    pub pieces_verified: u64,
    pub pieces_total: u64,
    pub speed: u64,
    pub sources: Vec<SourceProgress>,
    sample: Option<(Instant, u64)>,
    finished: Option<Instant>,
    /// Since when the download has been `waiting` without interruption.
    pub waiting_since: Option<Instant>,
}

/// One download: what was asked and how it is going.
#[derive(Debug)]
pub struct Download {
    pub id: u64,
    pub remote_path: String,
    pub destination: PathBuf,
    pub sources: Vec<String>,
    pub force: bool,
    pub connections_per_source: u32,
    pub idle_timeout: Duration,
    pub give_up_after: Option<Duration>,
    pub token: CancellationToken,
    started: Instant,
    progress: Mutex<Progress>,
    state_tx: watch::Sender<DownloadState>,
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

    pub fn part_path(&self) -> PathBuf {
        part_path(&self.destination)
    }

    /// Updates speeds; called periodically.
    pub fn sample(&self) {
        let now = Instant::now();
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
                p.speed = (p.bytes_done.saturating_sub(b) as f64 / dt) as u64;
                for s in &mut p.sources {
                    s.speed = (s.bytes_received.saturating_sub(s.sample_bytes) as f64 / dt) as u64;
                }
            }
        }
        p.sample = Some((now, p.bytes_done));
        for s in &mut p.sources {
            s.sample_bytes = s.bytes_received;
        }
    }

    pub fn info(&self, _detailed: bool) -> DownloadInfo {
        let p = self.progress();
        let end = p.finished.unwrap_or_else(Instant::now);
        let size = p.size;
        let eta_secs = match (size, p.speed) {
            (Some(s), sp) if sp > 0 && !p.state.is_final() => Some(s.saturating_sub(p.bytes_done) / sp),
            _ => None,
        };
        DownloadInfo {
            id: self.id,
            remote_path: self.remote_path.clone(),
            destination: self.destination.display().to_string(),
            state: p.state,
            size,
            bytes_done: p.bytes_done,
            pieces_verified: p.pieces_verified,
            pieces_total: p.pieces_total,
            speed: if p.state.is_final() { 0 } else { p.speed },
            eta_secs,
            elapsed_ms: end.duration_since(self.started).as_millis() as u64,
            sources: p
                .sources
                .iter()
                .map(|s| SourceInfo {
                    address: s.address.clone(),
                    state: s.state,
                    bytes: s.bytes,
                    bytes_received: s.bytes_received,
                    speed: if p.state.is_final() { 0 } else { s.speed },
                    share: match size {
                        Some(sz) if sz > 0 => s.bytes as f64 / sz as f64,
                        _ => 0.0,
                    },
                    ranges_done: s.ranges_done,
                    strikes: s.strikes,
                    connections: s.connections,
                    last_error: s.last_error.clone(),
                })
                .collect(),
            identity: p.identity.clone(),
            error: p.error.clone(),
            missing: Vec::new(),
        }
    }
}

/// `NAME.mftpart` next to the destination.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".mftpart");
    PathBuf::from(s)
}

pub struct Downloads {
    next_id: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<Download>>>,
    defaults: DownloadDefaults,
    parent: CancellationToken,
    tracker: TaskTracker,
}

/// `host:port` with a numeric port; hosts may be names, IPv4 or `[IPv6]`.
pub fn check_source(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("source {s:?} needs a port: HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("source {s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("source {s:?} has an invalid port {port:?}")),
    }
}

impl Downloads {
    pub fn new(defaults: DownloadDefaults, parent: CancellationToken, tracker: TaskTracker) -> Downloads {
        Downloads { next_id: AtomicU64::new(1), map: Mutex::new(BTreeMap::new()), defaults, parent, tracker }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Download>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: u64) -> Option<Arc<Download>> {
        self.map().get(&id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Download>> {
        self.map().values().cloned().collect()
    }

    /// Checks a `get` request and starts the download.
    pub fn start(&self, req: GetRequest) -> Result<Arc<Download>, Rejected> {
        let name = local_name(&req.remote_path)
            .map_err(|e| Rejected(ErrorCode::BadPath, format!("invalid remote path {:?}: {e}", req.remote_path)))?;
        let mut sources: Vec<String> = Vec::new();
        for s in &req.sources {
            let s = check_source(s).map_err(|e| Rejected(ErrorCode::InvalidArgument, e))?;
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
        if sources.is_empty() {
            return Err(Rejected(ErrorCode::InvalidArgument, "no sources given; use --from HOST:PORT or --host with --ports".into()));
        }
        let dir = match &req.output_dir {
            Some(d) => PathBuf::from(d),
            None => self.defaults.download_dir.clone(),
        };
        if !dir.is_absolute() {
            return Err(Rejected(ErrorCode::OutputDir, format!("output directory {} must be an absolute path", dir.display())));
        }
        if req.output_dir.is_none() && !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| {
                Rejected(ErrorCode::OutputDir, format!("cannot create download directory {}: {e}", dir.display()))
            })?;
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Rejected(ErrorCode::OutputDir, format!("output directory {} is not a directory", dir.display()))),
            Err(_) => return Err(Rejected(ErrorCode::OutputDir, format!("output directory {} does not exist; create it first", dir.display()))),
        }
        if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).is_err() {
            return Err(Rejected(
                ErrorCode::OutputDir,
                format!("output directory {} is not writable by mftd; choose another with -o", dir.display()),
            ));
        }
        let destination = dir.join(&name);
        if !req.force && std::fs::symlink_metadata(&destination).is_ok() {
            return Err(Rejected(
                ErrorCode::Exists,
                format!("{} already exists; remove it or pass --force to replace it", destination.display()),
            ));
        }
        let mut map = self.map();
        if let Some(other) = map.values().find(|d| d.destination == destination && !d.state().is_final()) {
            return Err(Rejected(
                ErrorCode::Exists,
                format!("download {} is already writing {}", other.id, destination.display()),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (state_tx, _) = watch::channel(DownloadState::Starting);
        let dl = Arc::new(Download {
            id,
            remote_path: req.remote_path.clone(),
            destination,
            force: req.force,
            connections_per_source: req.connections_per_source.unwrap_or(self.defaults.connections_per_server).clamp(1, 16),
            idle_timeout: self.defaults.idle_timeout,
            give_up_after: req.give_up_after_secs.map(Duration::from_secs),
            token: self.parent.child_token(),
            started: Instant::now(),
            progress: Mutex::new(Progress {
                state: DownloadState::Starting,
                size: None,
                identity: None,
                error: None,
                bytes_done: 0,
                pieces_verified: 0,
                pieces_total: 0,
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
                        last_error: None,
                        sample_bytes: 0,
                    })
                    .collect(),
                sample: None,
                finished: None,
                waiting_since: None,
            }),
            sources,
            state_tx,
        });
        map.insert(id, dl.clone());
        drop(map);
        let span = info_span!("download", download_id = id);
        self.tracker.spawn(engine::run(dl.clone()).instrument(span));
        Ok(dl)
    }

    /// Cancels a download; its partial file is removed.
    pub fn cancel(&self, id: u64) -> Result<Arc<Download>, Rejected> {
        let dl = self.get(id).ok_or_else(|| unknown(id))?;
        if dl.state().is_final() {
            return Err(Rejected(ErrorCode::InvalidArgument, format!("download {id} has already ended ({:?})", dl.state())));
        }
        dl.set_state(DownloadState::Cancelled);
        dl.token.cancel();
        Ok(dl)
    }

    pub fn sample(&self) {
        for d in self.all() {
            d.sample();
        }
    }
}

pub fn unknown(id: u64) -> Rejected {
    Rejected(ErrorCode::UnknownDownload, format!("no download with ID {id}; `mftctl downloads list` shows them"))
}
