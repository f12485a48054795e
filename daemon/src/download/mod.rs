//! Downloads: the registry of downloads this daemon runs, and each
//! download's observable progress. The fetching itself lives in
//! [`engine`]; who fetches what in [`scheduler`].

mod admit;
pub mod budget;
pub mod client;
pub mod dialers;
pub mod engine;
pub mod error;
pub mod existing;
mod part;
pub mod run;
pub mod scheduler;
pub mod space;
pub mod vote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, Instrument};

use mftd_common::control::{word, DownloadState, ErrorCode, GetRequest, SourceState};
use mftd_common::manifest::Manifest;
use mftd_common::path::{destination_name, local_name};
use tracing::{info, warn};

use crate::caller::{self, Caller};
use crate::store::{Damaged, Store};

use admit::source_cap;
use run::new_progress;
pub use run::{Download, Job, StopReason};

/// Settings every download starts from.
#[derive(Debug, Clone)]
pub struct DownloadDefaults {
    pub download_dir: PathBuf,
    pub connections_per_server: u32,
    pub idle_timeout: Duration,
    /// Checkpoint at least this often while bytes arrive...
    pub checkpoint_interval: Duration,
    /// ...and after at most this many new bytes.
    pub checkpoint_bytes: u64,
    /// The daemon's own secret file, used when a `get` names none.
    pub secret_file: Option<PathBuf>,
    /// Where callers other than root and mftd's own user may download to
    /// (empty: wherever they could write themselves).
    pub download_roots: Vec<PathBuf>,
    /// Free space a download leaves on its file system (`None`: the smaller
    /// of 1 GiB and 5 % of it).
    pub min_free_space: Option<u64>,
    /// Largest file a download may fetch.
    pub max_download_size: Option<u64>,
    /// How long ended downloads stay listed.
    pub retention: Duration,
    /// TLS and node-ID rules for connecting to sources, per owner.
    pub dialers: Arc<dialers::Dialers>,
    /// What one restricted user may take (`[quota]`).
    pub quota: crate::quota::Quota,
    /// The daemon's descriptor shares.
    pub fds: crate::fds::Shares,
}

/// Most sources one download may name.
pub const MAX_SOURCES: usize = 64;
/// Most downloads running (not ended, not paused) at once.
pub const MAX_RUNNING: usize = 256;

/// Longest a command waits for a run to stop (pause, adding sources).
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// What a `get` led to.
#[derive(Debug)]
pub enum Started {
    /// A download runs (a new one, or one of the same file continued, with
    /// the sources it did not have added).
    Download { dl: Arc<Download>, resumed: bool, added: Vec<String> },
    /// The destination already holds the file the sources serve (BLAKE3
    /// root given): nothing to fetch.
    Identical { destination: PathBuf, identity: String },
}

/// A request that could not be accepted: code and a sentence for the user.
#[derive(Debug)]
pub struct Rejected(pub ErrorCode, pub String);

pub struct Downloads {
    next_id: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<Download>>>,
    defaults: DownloadDefaults,
    parent: CancellationToken,
    tracker: TaskTracker,
    store: Store,
    damaged: Mutex<Vec<Damaged>>,
    budgets: Arc<budget::Budgets>,
    /// Held from a download's last quota check until it is in the map:
    /// requests handled at once would otherwise each pass the check
    /// before any of them counts.
    admission: Mutex<()>,
}

/// `[plain://]HOST:PORT[#NODEID]` with a numeric port; hosts may be names,
/// IPv4 or `[IPv6]`.
pub fn check_source(s: &str) -> Result<String, String> {
    crate::node::SourceAddr::parse(s).map(|_| s.trim().to_string())
}

/// What a new run of a download is made of.
struct Spec {
    id: u64,
    job: Job,
    /// Write manifests (`get --no-resume` turns it off).
    persist: bool,
    /// The manifest of the earlier runs, if any.
    resume: Option<Manifest>,
}

/// A `get`'s parts that passed [`Downloads::check`].
struct Checked {
    /// The file name at the destination.
    name: String,
    /// The sources, trimmed and without repeats.
    sources: Vec<String>,
    pin: Option<[u8; 32]>,
}

/// Parses a root identity given as 64 hex digits.
pub fn parse_identity(s: &str) -> Result<[u8; 32], String> {
    let s = s.strip_prefix("blake3:").unwrap_or(s);
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| format!("identity {s:?} is not 64 hexadecimal digits (as `downloads show` prints it)"))?;
    Ok(out)
}

impl Downloads {
    pub fn new(defaults: DownloadDefaults, parent: CancellationToken, tracker: TaskTracker, store: Store) -> Downloads {
        let budgets = Arc::new(budget::Budgets::new(
            budget::PER_HOST,
            defaults.fds.outgoing(),
            defaults.quota.connections_per_user,
        ));
        Downloads {
            next_id: AtomicU64::new(1),
            map: Mutex::new(BTreeMap::new()),
            defaults,
            parent,
            tracker,
            store,
            damaged: Mutex::new(Vec::new()),
            budgets,
            admission: Mutex::new(()),
        }
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

    /// Who `caller`'s downloads connect as.
    pub fn dialers(&self) -> &dialers::Dialers {
        &self.defaults.dialers
    }

    /// The downloads `caller` may see.
    pub fn visible_to(&self, caller: &Caller) -> Vec<Arc<Download>> {
        self.map().values().filter(|d| d.visible_to(caller)).cloned().collect()
    }

    /// Manifests that could not be loaded, as "path: reason".
    pub fn damaged(&self) -> Vec<String> {
        self.damaged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|d| format!("{}: {}", d.path.display(), d.error))
            .collect()
    }

    fn build(&self, spec: Spec, state: DownloadState) -> Result<Arc<Download>, Rejected> {
        self.download(spec, state).map(Arc::new)
    }

    /// A run of `spec` (its secret read), not yet shared.
    fn download(&self, spec: Spec, state: DownloadState) -> Result<Download, Rejected> {
        // A secret file the request names is read with the caller's rights;
        // the daemon's own (auth_secret_file) with the daemon's.
        // A restricted caller never borrows the daemon's own secret (its
        // proofs would go to servers of the caller's choosing), and its own
        // file is opened with its rights.
        let restricted = (!spec.job.owner.unrestricted()).then_some(&spec.job.owner);
        let secret = match (&spec.job.secret_file, &self.defaults.secret_file) {
            (Some(p), _) => Some(
                caller::as_caller(restricted, || caller::read_secret(&spec.job.owner, p))
                    .unwrap_or_else(|e| Err(caller::Denied(format!("secret file {}: {e}", p.display())))),
            ),
            (None, Some(p)) if restricted.is_none() => Some(caller::read_secret(&Caller::daemon(), p)),
            (None, _) => None,
        };
        let secret = match secret {
            Some(Ok(s)) => Some(Arc::new(s)),
            Some(Err(e)) => return Err(Rejected(ErrorCode::InvalidArgument, e.0)),
            None => None,
        };
        let secret_file = spec
            .job
            .secret_file
            .clone()
            .or_else(|| restricted.is_none().then(|| self.defaults.secret_file.clone()).flatten());
        // Never the daemon's node identity for a restricted owner.
        let dialer = self.defaults.dialers.for_owner(&spec.job.owner).map_err(|e| Rejected(ErrorCode::Internal, e))?;
        let (state_tx, _) = watch::channel(state);
        let mut progress = new_progress(&spec.job.sources, state);
        let started = Instant::now();
        if state.is_final() || state == DownloadState::Paused {
            // A listed but not running download: no time passes.
            progress.stopped = Some(started);
        }
        if state.is_final() || state == DownloadState::Paused {
            // Listed, not running: no source is being connected to, and
            // the verified pieces are the manifest's (a run verifies anew).
            for s in &mut progress.sources {
                s.state = SourceState::Idle;
            }
            if let Some(m) = &spec.resume {
                progress.recorded.verified = m.verified_pieces().count() as u64;
            }
        }
        let stats = spec.resume.as_ref().and_then(|m| m.stats.clone()).unwrap_or_default();
        for st in &stats.sources {
            if let Some(s) = progress.sources.iter_mut().find(|s| s.address == st.address) {
                s.bytes = st.bytes;
                s.bytes_received = st.bytes_received;
                s.sample_bytes = st.bytes_received;
                s.ranges_done = st.ranges_done;
            }
        }
        if let Some(f) = spec.resume.as_ref().and_then(|m| m.file.as_ref()) {
            progress.size = Some(f.size);
            progress.identity = f.identity.clone();
            progress.recorded.total = mftd_common::proto::piece_count_for(f.size, f.piece_size);
        }
        if let Some(m) = &spec.resume {
            let verified: u64 = match &m.file {
                Some(f) => {
                    m.verified_pieces().map(|p| mftd_common::proto::piece_range(f.size, f.piece_size, p).len()).sum()
                }
                None => 0,
            };
            let partial: u64 = m.received.iter().map(|r| r.len()).sum();
            progress.recorded.bytes_done = verified + partial;
        }
        let conns_max = if spec.job.owner.unrestricted() {
            engine::CONNS_MAX
        } else {
            engine::CONNS_MAX.min(self.defaults.quota.connections_per_source as usize)
        };
        Ok(Download {
            id: spec.id,
            job: Job { secret_file, ..spec.job },
            idle_timeout: self.defaults.idle_timeout,
            dialer,
            checkpoint_interval: self.defaults.checkpoint_interval,
            checkpoint_bytes: self.defaults.checkpoint_bytes,
            store: spec.persist.then(|| self.store.clone()),
            secret,
            min_free_space: self.defaults.min_free_space,
            max_size: self.defaults.max_download_size,
            token: self.parent.child_token(),
            budgets: self.budgets.clone(),
            conns_max,
            part: Mutex::new(spec.resume.as_ref().and_then(|m| m.part)),
            resume: Mutex::new(spec.resume),
            stop: Mutex::new(None),
            space_wait: Mutex::new(None),
            started,
            prior_elapsed: Duration::from_millis(stats.elapsed_ms),
            progress: Mutex::new(progress),
            pieces: Mutex::new(None),
            state_tx,
        })
    }

    fn spawn(&self, dl: Arc<Download>) {
        self.map().insert(dl.id, dl.clone());
        let span = info_span!("download", download_id = dl.id);
        self.tracker.spawn(engine::run(dl).instrument(span));
    }

    fn spec_from(m: Manifest) -> Spec {
        Spec { id: m.id, job: Job::from_manifest(&m), persist: true, resume: Some(m) }
    }

    /// A restricted owner's rights are checked again before its download
    /// runs anew (after a pause or a restart): the directory, the roots and
    /// group membership may have changed since.
    fn recheck(&self, spec: &Spec) -> Result<(), Rejected> {
        if spec.job.owner.unrestricted() {
            return Ok(());
        }
        let dir = spec.job.destination.parent().unwrap_or(Path::new("/"));
        let denied = |e: caller::Denied| Rejected(ErrorCode::PermissionDenied, e.0);
        caller::check_reachable(&spec.job.owner, dir).map_err(denied)?;
        caller::check_output_dir(&spec.job.owner, dir, &self.defaults.download_roots).map_err(denied)?;
        if spec.job.force {
            let name = spec.job.destination.file_name().and_then(|n| n.to_str()).unwrap_or("");
            caller::check_replace(&spec.job.owner, dir, name).map_err(denied)?;
        }
        Ok(())
    }

    /// Loads every manifest after a start. Downloads come back `paused`, or
    /// running if `auto_resume` is set and the user had not paused them.
    pub fn load(&self, auto_resume: bool) {
        let (good, bad) = self.store.load_all();
        for d in &bad {
            warn!(
                manifest = %d.path.display(),
                reason = %d.error,
                "damaged download manifest; left in place. Its partial file, if any, is re-verified when the same `mftctl get` is run again"
            );
        }
        *self.damaged.lock().unwrap_or_else(|p| p.into_inner()) = bad;
        let mut max = 0;
        for m in good {
            max = max.max(m.id);
            let paused = m.paused;
            let dest = PathBuf::from(&m.destination);
            if !dest.is_absolute() || local_name(&m.remote_path).is_err() {
                warn!(id = m.id, "manifest names an unsafe destination; ignoring it");
                continue;
            }
            let spec = Self::spec_from(m);
            let id = spec.id;
            let allowed = self.recheck(&spec);
            if let Err(e) = &allowed {
                warn!(id, reason = %e.1, "download loaded as paused: its owner may no longer write there");
            }
            let state =
                if auto_resume && !paused && allowed.is_ok() { DownloadState::Starting } else { DownloadState::Paused };
            match self.build(spec, state) {
                Ok(dl) if state == DownloadState::Starting => {
                    info!(id, "resuming download after restart");
                    self.spawn(dl);
                }
                Ok(dl) => {
                    info!(id, "download loaded as paused; `mftctl get --resume` continues it");
                    self.map().insert(dl.id, dl);
                }
                Err(e) => warn!(id, error = %e.1, "cannot load download"),
            }
        }
        self.next_id.fetch_max(max.saturating_add(1).max(self.store.next_id()), Ordering::Relaxed);
    }

    /// Checks a `get` request and starts the download, or continues the
    /// download already writing the same file with the request's sources
    /// added. Returns whether it continued one, and the sources added.
    pub fn start(&self, req: GetRequest, caller: &Caller) -> Result<Started, Rejected> {
        let Checked { name, sources, pin } = self.check(&req, caller)?;
        let dir = self.output_dir(&req, caller)?;
        let destination = dir.join(&name);

        // The same file into the same place: continue that download (also a
        // failed one whose data and manifest were kept).
        let existing = self
            .map()
            .values()
            .find(|d| {
                d.job.destination == destination
                    && (!d.state().is_final() || (d.state() == DownloadState::Failed && self.store.path(d.id).exists()))
            })
            .cloned();
        if let Some(other) = existing {
            return self.continue_same(other, &req, &sources, &destination, caller);
        }
        if req.force {
            caller::check_replace(caller, &dir, &name).map_err(|e| Rejected(ErrorCode::PermissionDenied, e.0))?;
        }
        // A file already there is compared with what the sources serve
        // (below); anything else there is in the way.
        let present = match std::fs::symlink_metadata(&destination) {
            Ok(_) if req.force => false,
            Ok(m) if m.is_file() => true,
            Ok(_) => {
                return Err(Rejected(
                    ErrorCode::Exists,
                    format!("{} already exists; remove it or pass --force to replace it", destination.display()),
                ))
            }
            Err(_) => false,
        };
        let spec = Spec {
            // Given below, once the download is sure to exist.
            id: 0,
            job: Job {
                remote_path: req.remote_path.clone(),
                destination,
                output_name: req.output_name.clone(),
                sources,
                force: req.force,
                connections_per_source: req
                    .connections_per_source
                    .unwrap_or(self.defaults.connections_per_server)
                    .min(16),
                give_up_after: req.give_up_after_secs.map(Duration::from_secs),
                secret_file: req.secret_file.as_ref().map(PathBuf::from),
                pin,
                expected_size: req.expected_size,
                owner: caller.clone(),
            },
            persist: !req.no_resume,
            resume: None,
        };
        // Built before it has an ID: a refused or needless `get` takes none.
        let dl = self.download(spec, DownloadState::Starting)?;
        if present {
            return self.compare_with_present(&dl);
        }
        let dl = self.register(dl)?;
        Ok(Started::Download { dl, resumed: false, added: Vec::new() })
    }

    /// What a `get` is refused for before anything is looked at on disk:
    /// bad paths or sources, too many of them or of running downloads.
    fn check(&self, req: &GetRequest, caller: &Caller) -> Result<Checked, Rejected> {
        local_name(&req.remote_path)
            .map_err(|e| Rejected(ErrorCode::BadPath, format!("invalid remote path {:?}: {e}", req.remote_path)))?;
        let name = destination_name(&req.remote_path, req.output_name.as_deref()).map_err(|e| {
            Rejected(
                ErrorCode::BadPath,
                format!("invalid output name {:?}: {e}", req.output_name.as_deref().unwrap_or_default()),
            )
        })?;
        let mut sources: Vec<String> = Vec::new();
        for s in &req.sources {
            let s = check_source(s).map_err(|e| Rejected(ErrorCode::InvalidArgument, e))?;
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
        if sources.is_empty() {
            return Err(Rejected(
                ErrorCode::InvalidArgument,
                "no sources given; use --from HOST:PORT or --host with --ports".into(),
            ));
        }
        let (most, code, why) = source_cap(caller, &self.defaults.quota);
        if sources.len() > most {
            return Err(Rejected(code, format!("{} sources given; {why}", sources.len())));
        }
        self.admit(caller, true)?;
        if let Some(n) = req.connections_per_source.filter(|n| *n > 16) {
            return Err(Rejected(
                ErrorCode::InvalidArgument,
                format!("{n} connections per source: give 1 to 16, or 0 to adapt to the path"),
            ));
        }
        let pin = match &req.identity {
            Some(i) => Some(parse_identity(i).map_err(|e| Rejected(ErrorCode::InvalidArgument, e))?),
            None => None,
        };
        Ok(Checked { name, sources, pin })
    }

    /// The destination holds a file: nothing to fetch if it is the sources'
    /// file, else the `get` is refused (without `--force`).
    fn compare_with_present(&self, dl: &Download) -> Result<Started, Rejected> {
        let shown = dl.job.destination.display().to_string();
        let (why, how) = match self.compare_existing(dl) {
            existing::Verdict::Identical(identity) => {
                info!(dest = %shown, identity, "already identical to the sources' file; nothing to download");
                return Ok(Started::Identical { destination: dl.job.destination.clone(), identity });
            }
            existing::Verdict::Different(why) => (why, "is not the file the sources serve"),
            existing::Verdict::Unknown(why) => (why, "could not be compared with the sources' file"),
        };
        Err(Rejected(
            ErrorCode::Exists,
            format!("{shown} already exists and {how} ({why}); remove it or pass --force to replace it"),
        ))
    }

    /// Gives a new download its ID (never reused, not even after a
    /// restart), writes its first manifest and starts it.
    fn register(&self, mut dl: Download) -> Result<Arc<Download>, Rejected> {
        // Checked again, now that it is sure to be added: others may have
        // been added since the request was first checked.
        let _admitted = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        self.admit(&dl.job.owner, true)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // IDs are never reused, not even after a restart: a script holding
        // an old ID must not act on someone else's download.
        if let Err(e) = self.store.save_next_id(id + 1) {
            warn!(error = %e, "cannot record the next download ID; IDs may repeat after a restart");
        }
        dl.id = id;
        let dl = Arc::new(dl);
        if let Some(owner) = dl.restricted_owner() {
            self.forget_ended_beyond_quota(owner.uid);
        }
        if let Some(store) = &dl.store {
            // The manifest exists before the first byte is written.
            store.save(&dl.base_manifest()).map_err(|e| {
                Rejected(ErrorCode::Internal, format!("cannot write manifest {}: {e}", store.path(id).display()))
            })?;
        }
        self.spawn(dl.clone());
        Ok(dl)
    }

    /// Compares the file at `dl`'s destination (opened with its owner's
    /// rights, never through a symlink) with the sources' version.
    fn compare_existing(&self, dl: &Download) -> existing::Verdict {
        use std::os::unix::fs::OpenOptionsExt;
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
                .open(&dl.job.destination)
        };
        let file = match caller::as_caller(dl.restricted_owner(), open).and_then(|r| r) {
            Ok(f) => f,
            Err(e) => return existing::Verdict::Unknown(format!("cannot open it: {e}")),
        };
        let size = match file.metadata() {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => return existing::Verdict::Different("it is not a regular file".into()),
            Err(e) => return existing::Verdict::Unknown(format!("cannot stat it: {e}")),
        };
        let ask = existing::Ask {
            sources: &dl.job.sources,
            path: &dl.job.remote_path,
            secret: dl.secret.clone(),
            dialer: dl.dialer.clone(),
            idle: dl.idle_timeout,
            pin: dl.job.pin,
        };
        existing::compare(&file, size, &ask)
    }

    /// The output directory of a `get`, checked: absolute, reachable and
    /// writable by the caller (within the download roots for a restricted
    /// one) and by mftd; a missing `-o` directory is created with the
    /// caller's rights.
    fn output_dir(&self, req: &GetRequest, caller: &Caller) -> Result<PathBuf, Rejected> {
        // Lexically tidy (`a/./b` is `a/b`): the destination is shown and
        // compared as written here.
        let dir: PathBuf = match &req.output_dir {
            Some(d) => Path::new(d).components().collect(),
            None => self.defaults.download_dir.clone(),
        };
        if !dir.is_absolute() {
            return Err(Rejected(
                ErrorCode::OutputDir,
                format!("output directory {} must be an absolute path", dir.display()),
            ));
        }
        if req.output_dir.is_none() && !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| {
                Rejected(ErrorCode::OutputDir, format!("cannot create download directory {}: {e}", dir.display()))
            })?;
        }
        // A missing -o directory is created (as aria2c -d does), if the
        // caller may create it: it must be allowed to write where the first
        // missing component goes, and the directories are made with its
        // rights.
        let restricted = !caller.unrestricted();
        if restricted && dir.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Rejected(ErrorCode::OutputDir, format!("output directory {} contains `..`", dir.display())));
        }
        caller::check_reachable(caller, &dir).map_err(|e| Rejected(ErrorCode::PermissionDenied, e.0))?;
        let looked = std::fs::symlink_metadata(&dir);
        if let Some(e) = looked.as_ref().err().filter(|e| e.kind() != std::io::ErrorKind::NotFound) {
            return Err(Rejected(ErrorCode::OutputDir, format!("cannot use output directory {}: {e}", dir.display())));
        }
        if req.output_dir.is_some() && looked.is_err() {
            let existing = dir.ancestors().skip(1).find(|a| a.exists()).unwrap_or(Path::new("/"));
            let base = caller::check_output_dir(caller, existing, &self.defaults.download_roots)
                .map_err(|e| Rejected(ErrorCode::PermissionDenied, e.0))?;
            let owner = restricted.then_some(caller);
            if restricted && !nix::unistd::geteuid().is_root() {
                // mftd cannot make a directory that belongs to the caller:
                // it would be mftd's, and not the caller's to write.
                let _ = base;
                return Err(Rejected(
                    ErrorCode::OutputDir,
                    format!("output directory {} does not exist; create it yourself first", dir.display()),
                ));
            }
            let made = caller::as_caller(owner, || std::fs::create_dir_all(&dir)).and_then(|r| r);
            made.map_err(|e| {
                Rejected(ErrorCode::OutputDir, format!("cannot create output directory {}: {e}", dir.display()))
            })?;
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Rejected(
                    ErrorCode::OutputDir,
                    format!("output directory {} is not a directory", dir.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Rejected(
                    ErrorCode::OutputDir,
                    format!("output directory {} does not exist; create it first", dir.display()),
                ))
            }
            Err(e) => {
                return Err(Rejected(
                    ErrorCode::OutputDir,
                    format!("cannot use output directory {}: {e}", dir.display()),
                ))
            }
        }
        // The caller's rights first: mftd writes only where they could.
        let dir = caller::check_output_dir(caller, &dir, &self.defaults.download_roots)
            .map_err(|e| Rejected(ErrorCode::PermissionDenied, e.0))?;
        if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).is_err() {
            return Err(Rejected(
                ErrorCode::OutputDir,
                format!("output directory {} is not writable by mftd; choose another with -o", dir.display()),
            ));
        }
        Ok(dir)
    }

    /// A `get` of the file `other` is already writing into the same place:
    /// continue it with the request's sources added (and its `--force`).
    fn continue_same(
        &self,
        other: Arc<Download>,
        req: &GetRequest,
        sources: &[String],
        destination: &Path,
        caller: &Caller,
    ) -> Result<Started, Rejected> {
        if !other.visible_to(caller) {
            // Its ID and owner are not the caller's to learn.
            return Err(Rejected(
                ErrorCode::Exists,
                format!(
                    "another user's download is already writing {}; choose another directory (-o) or name (-O)",
                    destination.display()
                ),
            ));
        }
        if other.job.remote_path != req.remote_path {
            return Err(Rejected(
                ErrorCode::Exists,
                format!(
                    "download {} is already writing {} (from {})",
                    other.id,
                    destination.display(),
                    other.job.remote_path
                ),
            ));
        }
        if req.no_resume {
            return Err(Rejected(
            ErrorCode::Exists,
            format!(
                "download {id} is already writing {} and keeps resume state, which --no-resume cannot take away: drop --no-resume to continue it, or `mftctl downloads cancel {id}` to start over",
                destination.display(),
                id = other.id,
            ),
        ));
        }
        let added = new_sources(&other, sources, &self.defaults.quota)?;
        let all: Vec<String> = other.job.sources.iter().chain(&added).cloned().collect();
        let force = req.force && !other.job.force;
        let dl = match other.state() {
            DownloadState::Paused | DownloadState::Failed => self.resume_with(other.id, Some(all), force)?,
            _ if added.is_empty() && !force => other,
            _ => self.restart(&other, all, force)?,
        };
        Ok(Started::Download { dl, resumed: true, added })
    }

    /// Adds sources to a download: a running one checkpoints and continues
    /// with them at once (from where it is), a paused or failed one keeps
    /// them in its manifest for when it is resumed. Returns the download
    /// (its new run, if it was running) and the sources it did not have.
    pub fn add_sources(
        &self,
        id: u64,
        sources: &[String],
        caller: &Caller,
    ) -> Result<(Arc<Download>, Vec<String>), Rejected> {
        let dl = self.get(id).ok_or_else(|| unknown(id))?;
        owned_by(&dl, caller)?;
        let mut checked = Vec::new();
        for s in sources {
            checked.push(check_source(s).map_err(|e| Rejected(ErrorCode::InvalidArgument, e))?);
        }
        if checked.is_empty() {
            return Err(Rejected(ErrorCode::InvalidArgument, "no sources given".into()));
        }
        let added = new_sources(&dl, &checked, &self.defaults.quota)?;
        if added.is_empty() {
            return Ok((dl, added));
        }
        let all: Vec<String> = dl.job.sources.iter().chain(&added).cloned().collect();
        let state = dl.state();
        match state {
            DownloadState::Paused | DownloadState::Failed if self.store.path(id).exists() => {
                let mut m = self.store.load(id).map_err(|d| {
                    Rejected(
                        ErrorCode::InvalidArgument,
                        format!("cannot change download {id}: manifest {} is damaged ({})", d.path.display(), d.error),
                    )
                })?;
                m.sources = all;
                self.store.save(&m).map_err(|e| {
                    Rejected(
                        ErrorCode::Internal,
                        format!("cannot write manifest {}: {e}", self.store.path(id).display()),
                    )
                })?;
                // The listed entry shows the sources the next run will use.
                let error = dl.progress().error.clone();
                let stub = self.build(Self::spec_from(m), state)?;
                stub.progress().error = error;
                // A download waiting for disk space still continues by
                // itself when there is room.
                *stub.space_wait.lock().unwrap_or_else(|p| p.into_inner()) =
                    dl.space_wait.lock().unwrap_or_else(|p| p.into_inner()).take();
                self.map().insert(id, stub.clone());
                Ok((stub, added))
            }
            s if s.is_final() => Err(Rejected(
                ErrorCode::InvalidArgument,
                format!("download {id} has already ended ({}); start it again with `mftctl get`", word(&s)),
            )),
            _ => Ok((self.restart(&dl, all, false)?, added)),
        }
    }

    /// Ends a running download's run with a checkpoint and starts the next
    /// from it with `sources` (and `force`, if set). Watchers follow.
    fn restart(&self, dl: &Arc<Download>, sources: Vec<String>, force: bool) -> Result<Arc<Download>, Rejected> {
        let id = dl.id;
        if dl.store.is_none() {
            return Err(Rejected(
                ErrorCode::InvalidArgument,
                format!(
                    "download {id} was started with --no-resume: its progress cannot carry over to a run with other settings; cancel it and start again"
                ),
            ));
        }
        if dl.state() == DownloadState::Verifying {
            return Err(Rejected(
                ErrorCode::InvalidArgument,
                format!("download {id} is finishing; it cannot be changed now"),
            ));
        }
        *dl.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(StopReason::Restart);
        dl.token.cancel();
        let deadline = Instant::now() + STOP_WAIT;
        while dl.state() != DownloadState::Paused && !dl.state().is_final() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let give_up = |why: String| {
            // The run ends paused instead, and says why.
            *dl.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(StopReason::Pause);
            dl.progress().error = Some(why.clone());
            Rejected(ErrorCode::Internal, why)
        };
        match dl.state() {
            DownloadState::Paused => self.resume_with(id, Some(sources), force).inspect_err(|e| {
                give_up(format!("download {id} could not continue with the new sources: {}", e.1));
            }),
            s if s.is_final() => Err(Rejected(
                ErrorCode::InvalidArgument,
                format!("download {id} ended ({}) before the sources could be added", word(&s)),
            )),
            _ => Err(give_up(format!(
                "download {id} did not stop within {} s to take the new sources; it will be paused: resume it to use them",
                STOP_WAIT.as_secs()
            ))),
        }
    }

    /// Stops a running download, keeping its data and manifest.
    pub fn pause(&self, id: u64, caller: &Caller) -> Result<Arc<Download>, Rejected> {
        let dl = self.get(id).ok_or_else(|| unknown(id))?;
        owned_by(&dl, caller)?;
        match dl.state() {
            DownloadState::Paused => {
                if dl.space_wait.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
                    self.hold(&dl)?;
                    return Ok(dl);
                }
                return Err(Rejected(ErrorCode::InvalidArgument, format!("download {id} is already paused")));
            }
            DownloadState::Verifying => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} is finishing; it cannot be paused now"),
                ))
            }
            s if s.is_final() => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} has already ended ({})", word(&s)),
                ))
            }
            _ => {}
        }
        if dl.store.is_none() {
            return Err(Rejected(
                ErrorCode::InvalidArgument,
                format!("download {id} was started with --no-resume and cannot be paused; cancel it instead"),
            ));
        }
        *dl.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(StopReason::Pause);
        dl.token.cancel();
        Ok(dl)
    }

    /// Continues a paused (or failed but resumable) download from its manifest.
    pub fn resume(&self, id: u64, caller: &Caller) -> Result<Arc<Download>, Rejected> {
        if let Some(dl) = self.get(id) {
            owned_by(&dl, caller)?;
        }
        self.resume_with(id, None, false)
    }

    /// Starts a new run from the manifest, with `sources` instead of its
    /// own if given, and `force` set if asked.
    fn resume_with(&self, id: u64, sources: Option<Vec<String>>, force: bool) -> Result<Arc<Download>, Rejected> {
        let dl = self.get(id).ok_or_else(|| unknown(id))?;
        match dl.state() {
            DownloadState::Paused | DownloadState::Failed => {}
            DownloadState::Done | DownloadState::Cancelled => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} has already ended ({})", word(&dl.state())),
                ))
            }
            _ => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} is already running; `mftctl downloads watch {id}` follows it"),
                ))
            }
        }
        // Two downloads must never write the same part file.
        if let Some(other) = self.map().values().find(|d| {
            d.id != id
                && d.job.destination == dl.job.destination
                && !d.state().is_final()
                && d.state() != DownloadState::Paused
        }) {
            let other = if other.visible_to(&dl.job.owner) {
                format!("download {}", other.id)
            } else {
                "another user's download".to_string()
            };
            return Err(Rejected(
                ErrorCode::Exists,
                format!("{other} is already writing {}; cancel one of them", dl.job.destination.display()),
            ));
        }
        let mut m = self.store.load(id).map_err(|d| {
            Rejected(
                ErrorCode::InvalidArgument,
                format!(
                    "cannot resume download {id}: manifest {} is damaged ({}); run the same `mftctl get` again to re-verify its data",
                    d.path.display(),
                    d.error
                ),
            )
        })?;
        self.admit(&dl.job.owner, false)?;
        m.paused = false;
        let changed = sources.as_ref().is_some_and(|s| *s != m.sources) || (force && !m.force);
        if let Some(s) = sources {
            m.sources = s;
        }
        m.force |= force;
        if changed {
            // Recorded before the run starts: the sources and --force stay
            // through a pause, a restart or a crash, even if the run never
            // gets to a checkpoint of its own.
            self.store.save(&m).map_err(|e| {
                Rejected(ErrorCode::Internal, format!("cannot write manifest {}: {e}", self.store.path(id).display()))
            })?;
        }
        let mut spec = Self::spec_from(m);
        spec.id = id;
        self.recheck(&spec)?;
        let dl = self.build(spec, DownloadState::Starting)?;
        // Checked again, as it starts (see `register`); and another request
        // may have resumed it meanwhile: a second run would write the same
        // part file, and the first, no longer listed, could be neither
        // paused nor cancelled and would count against no quota.
        let _admitted = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        match self.get(id).map(|d| d.state()) {
            None => return Err(unknown(id)),
            Some(DownloadState::Paused | DownloadState::Failed) => {}
            Some(s) if s.is_final() => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} has already ended ({})", word(&s)),
                ))
            }
            Some(_) => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} is already running; `mftctl downloads watch {id}` follows it"),
                ))
            }
        }
        self.admit(&dl.job.owner, false)?;
        self.spawn(dl.clone());
        Ok(dl)
    }

    /// IDs of downloads that `get --resume` without an ID continues.
    pub fn resumable(&self) -> Vec<u64> {
        self.map()
            .values()
            .filter(|d| {
                d.state() == DownloadState::Paused
                    || (d.state() == DownloadState::Failed && self.store.path(d.id).exists())
            })
            .map(|d| d.id)
            .collect()
    }

    /// Cancels a download; its partial file and manifest are removed.
    pub fn cancel(&self, id: u64, caller: &Caller) -> Result<Arc<Download>, Rejected> {
        let dl = self.get(id).ok_or_else(|| unknown(id))?;
        owned_by(&dl, caller)?;
        match dl.state() {
            DownloadState::Done | DownloadState::Cancelled => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} has already ended ({})", word(&dl.state())),
                ))
            }
            DownloadState::Paused | DownloadState::Failed => {
                // No engine runs: clean up here, unless another download
                // (same destination) is writing that part file now.
                if !part::part_in_use(&dl.part_path()) {
                    dl.remove_part_file();
                }
                self.store.remove(id);
                dl.progress().error = Some(cancelled_by(caller));
                dl.set_state_force(DownloadState::Cancelled);
            }
            DownloadState::Verifying => {
                return Err(Rejected(
                    ErrorCode::InvalidArgument,
                    format!("download {id} is finishing; it cannot be cancelled now"),
                ))
            }
            _ => {
                dl.progress().error = Some(cancelled_by(caller));
                *dl.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(StopReason::Cancel);
                dl.token.cancel();
            }
        }
        Ok(dl)
    }

    /// Takes an ended download off the list. A failed one's kept partial
    /// file and manifest go with it (the user asked to forget it). Returns
    /// whether there was such data.
    pub fn remove(&self, id: u64, caller: &Caller) -> Result<bool, Rejected> {
        let dl = self.get(id).ok_or_else(|| unknown(id))?;
        owned_by(&dl, caller)?;
        let state = dl.state();
        if !state.is_final() {
            let what = if state == DownloadState::Paused { "paused" } else { "still running" };
            return Err(Rejected(
                ErrorCode::InvalidArgument,
                format!("download {id} is {what}; `mftctl downloads cancel {id}` stops it and removes its data"),
            ));
        }
        let kept = state == DownloadState::Failed && self.store.path(id).exists();
        if kept {
            if !part::part_in_use(&dl.part_path()) {
                dl.remove_part_file();
            }
            self.store.remove(id);
        }
        self.map().remove(&id);
        Ok(kept)
    }

    /// Takes every ended download `caller` may see off the list, except
    /// failed ones whose data was kept for a retry. Returns the IDs removed
    /// and those kept.
    pub fn purge(&self, caller: &Caller) -> (Vec<u64>, Vec<u64>) {
        let mut removed = Vec::new();
        let mut kept = Vec::new();
        self.map().retain(|id, d| {
            if !d.visible_to(caller) || !d.state().is_final() {
                return true;
            }
            if d.state() == DownloadState::Failed && self.store.path(*id).exists() {
                kept.push(*id);
                return true;
            }
            removed.push(*id);
            false
        });
        (removed, kept)
    }

    pub fn sample(&self) {
        for d in self.all() {
            d.sample();
        }
        self.resume_when_room();
        // Ended downloads leave the registry (and the metrics) after the
        // retention period; failed ones whose data and manifest were kept
        // for a retry stay until resumed or cancelled.
        let retention = self.defaults.retention;
        self.map().retain(|id, d| {
            let ended = d.progress().finished.is_some_and(|t| t.elapsed() >= retention);
            !(ended && d.state().is_final() && !self.store.path(*id).exists())
        });
    }
}

impl Downloads {
    /// Resumes the downloads paused for a full disk whose file system has
    /// room again, through the same path as `downloads resume`. Each looks
    /// when its [`space::SpaceWait`] is due (backing off from 1 s to 30 s):
    /// one `statvfs`, cheap enough for the sampler's tick.
    fn resume_when_room(&self) {
        let now = Instant::now();
        for d in self.all() {
            if d.state() != DownloadState::Paused {
                continue;
            }
            let wait = {
                let mut w = d.space_wait.lock().unwrap_or_else(|p| p.into_inner());
                if !w.as_ref().is_some_and(|w| w.due(now)) {
                    continue;
                }
                w.take()
            };
            let Some(wait) = wait else { continue };
            let dir = wait.dir.clone();
            match wait.check() {
                Err(later) => *d.space_wait.lock().unwrap_or_else(|p| p.into_inner()) = Some(later),
                Ok(()) => {
                    info!(id = d.id, dir = %dir.display(), "disk space is back; resuming the download");
                    if let Err(e) = self.resume_with(d.id, None, false) {
                        warn!(id = d.id, error = %e.1, "disk space is back but the download cannot resume");
                        d.progress().error =
                            Some(format!("disk space is back but the download cannot resume: {}", e.1));
                    }
                }
            }
        }
    }

    /// A download waiting for disk space, paused by its user: it stops
    /// waiting, and stays paused across restarts like any user's pause.
    fn hold(&self, dl: &Download) -> Result<(), Rejected> {
        let mut m = self.store.load(dl.id).map_err(|d| Rejected(ErrorCode::Internal, d.error.to_string()))?;
        m.paused = true;
        self.store.save(&m).map_err(|e| {
            Rejected(ErrorCode::Internal, format!("cannot write manifest {}: {e}", self.store.path(dl.id).display()))
        })?;
        dl.progress().error = None;
        Ok(())
    }
}

/// The sources of `new` that `dl` does not have yet, in order; an error if
/// they would make too many.
fn new_sources(dl: &Download, new: &[String], quota: &crate::quota::Quota) -> Result<Vec<String>, Rejected> {
    let mut added: Vec<String> = Vec::new();
    for s in new {
        if !dl.job.sources.contains(s) && !added.contains(s) {
            added.push(s.clone());
        }
    }
    let (most, code, why) = source_cap(&dl.job.owner, quota);
    if dl.job.sources.len() + added.len() > most {
        return Err(Rejected(
            code,
            format!(
                "download {} has {} sources; {} more would be too many: {why}",
                dl.id,
                dl.job.sources.len(),
                added.len()
            ),
        ));
    }
    Ok(added)
}

/// The reason a cancelled download shows.
fn cancelled_by(caller: &Caller) -> String {
    format!("cancelled by {} (`mftctl downloads cancel`); its partial file was removed", caller.describe())
}

/// A restricted caller manages only its own downloads; another user's is,
/// to it, exactly an unknown ID (same code, same words), so IDs and their
/// owners cannot be probed.
fn owned_by(dl: &Download, caller: &Caller) -> Result<(), Rejected> {
    if dl.visible_to(caller) {
        return Ok(());
    }
    Err(unknown(dl.id))
}

pub fn unknown(id: u64) -> Rejected {
    Rejected(ErrorCode::UnknownDownload, format!("no download with ID {id}; `mftctl downloads list` shows them"))
}
