//! The control socket: a Unix-domain socket speaking newline-delimited JSON
//! (see [`mftd_common::control`]).
//!
//! Owns: creating the socket safely (refusing to start if another daemon
//! answers on it, removing only a stale *socket*, mode 0600 set before
//! `listen()`), checking the peer's credentials, holding each caller to
//! its connection and request limits ([`limits`]), closing idle
//! connections, reading bounded lines, and dispatching requests. Must
//! never: let a bad line end the daemon, let one caller's connections or
//! requests lock out an operator, or delete a file at the socket path that
//! is not a socket.

pub(crate) mod handlers;
mod limits;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info};

use mftd_common::control::{to_line, DownloadState, ErrorCode, Request, Response, MAX_REQUEST};

use crate::caller::Caller;
use crate::daemon::Daemon;
use handlers::Reply;

/// A bound control socket; unlinked when dropped.
pub struct ControlSocket {
    pub listener: UnixListener,
    path: PathBuf,
    /// Group whose members may use the socket, if configured.
    pub group: Option<nix::unistd::Gid>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Creates the socket at `path`.
    pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<ControlSocket> {
        let gid = match group {
            Some(name) => {
                Some(nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid).with_context(|| {
                    format!("socket group {name:?} does not exist; create it (groupadd {name}) or drop socket_group")
                })?)
            }
            None => None,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                let mode = if gid.is_some() { 0o750 } else { 0o700 };
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
                if gid.is_some() {
                    let _ = nix::unistd::chown(dir, None, gid);
                }
            }
        }
        // A directory someone else controls could swap our socket for theirs
        // (the /tmp/mftd-UID fallback is the usual suspect): refuse it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
            let me = nix::unistd::geteuid().as_raw();
            let sticky = meta.mode() & 0o1000 != 0;
            if meta.file_type().is_symlink() && dir == std::env::temp_dir().join(format!("mftd-{me}")) {
                bail!("{} is a symlink; remove it (mftd keeps its socket there)", dir.display());
            }
            if !meta.file_type().is_symlink()
                && ((meta.uid() != me && meta.uid() != 0) || (meta.mode() & 0o022 != 0 && !sticky))
            {
                bail!(
                    "the socket directory {} belongs to uid {} or is writable by others (mode {:o}); remove it or choose another --socket",
                    dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                );
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // Someone may be listening: ask before removing anything.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => bail!(
                        "another mftd is already running on {} (stop it with `mftctl shutdown`, or give this one another --socket)",
                        path.display()
                    ),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused || e.kind() == io::ErrorKind::NotFound => {
                        info!(path = %path.display(), "removing stale control socket");
                        std::fs::remove_file(path)
                            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
                    }
                    Err(e) => bail!("cannot check existing socket {}: {e}", path.display()),
                }
            }
            Ok(_) => bail!("{} exists and is not a socket; refusing to replace it", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot inspect {}: {e}", path.display()),
        }
        let fd: OwnedFd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .context("cannot create control socket")?;
        let addr = UnixAddr::new(path).with_context(|| format!("invalid socket path {}", path.display()))?;
        socket::bind(fd.as_raw_fd(), &addr)
            .with_context(|| format!("cannot bind control socket {}", path.display()))?;
        // Restrict before anyone can connect: connect() needs listen().
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        if gid.is_some() {
            nix::unistd::chown(path, None, gid)
                .with_context(|| format!("cannot give {} to group {}", path.display(), group.unwrap_or("")))?;
        }
        socket::listen(&fd, socket::Backlog::new(128).unwrap_or(socket::Backlog::MAXCONN))
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let std_listener = StdUnixListener::from(fd);
        let listener = UnixListener::from_std(std_listener).context("cannot register control socket")?;
        Ok(ControlSocket { listener, path: path.to_path_buf(), group: gid })
    }
}

/// Refusals that wait (up to a second) for the client's first line, so it
/// reads the answer rather than a broken pipe; beyond this many at once,
/// the answer is written at once and the connection closed.
const PATIENT_REFUSALS: usize = 64;

/// Accepts control connections until shutdown.
pub async fn serve(sock: ControlSocket, daemon: Arc<Daemon>) {
    let group = sock.group;
    let quota = daemon.config().quota;
    let limits = limits::Limits::new(&quota, daemon.fds.control());
    let idle = quota.control_idle_timeout;
    let patient = Arc::new(tokio::sync::Semaphore::new(PATIENT_REFUSALS));
    let mut backoff = crate::accept::AcceptBackoff::new("control socket");
    loop {
        let accepted = tokio::select! {
            _ = daemon.shutdown.cancelled() => break,
            r = sock.listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff.ok();
                let caller = Caller::of(&stream);
                if let Err(e) = &caller {
                    debug!(error = %e, "cannot read the control peer's credentials");
                }
                // Checked here, before a task exists: a flood of
                // connections costs an accept and a close each.
                let admitted = match caller.ok().filter(|c| peer_allowed(c, group)) {
                    None => Err((ErrorCode::PermissionDenied, DENIED.to_string())),
                    Some(c) => limits.seat(&c).map(|seat| (c, seat)).map_err(|e| (ErrorCode::Limit, e)),
                };
                let (caller, seat) = match admitted {
                    Ok(x) => x,
                    Err((code, why)) => {
                        let resp = Response::error(code, why);
                        match patient.clone().try_acquire_owned() {
                            Ok(p) => {
                                daemon.tracker.spawn(async move {
                                    refuse(stream, &resp).await;
                                    drop(p);
                                });
                            }
                            Err(_) => {
                                let _ = stream.try_write(&to_line(&resp));
                            }
                        }
                        continue;
                    }
                };
                let (d, limits) = (daemon.clone(), limits.clone());
                daemon.tracker.spawn(async move {
                    if let Err(e) = handle_conn(stream, d, caller, &limits, idle).await {
                        debug!(error = %e, "control connection ended");
                    }
                    drop(seat);
                });
            }
            Err(e) if backoff.failed(&e, &daemon.shutdown).await => {}
            Err(_) => break,
        }
    }
    drop(sock);
}

const DENIED: &str = "permission denied: only root, mftd's own user or its socket group may use this socket";

/// Root, the daemon's own user, and members of the socket group (primary or
/// supplementary, from the socket itself) may drive it. The file mode
/// already says so; this is the second lock.
fn peer_allowed(caller: &Caller, group: Option<nix::unistd::Gid>) -> bool {
    caller.unrestricted() || group.is_some_and(|g| caller.in_group(g.as_raw()))
}

/// Reads one line of at most `MAX_REQUEST` bytes, into a buffer that grows
/// only with what arrives. `Ok(None)` on EOF,
/// `Err(LineTooLong)` when the limit is hit.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
    buf.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() { None } else { Some(()) });
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > MAX_REQUEST + 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            buf.pop();
            return Ok(Some(()));
        }
    }
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, resp: &Response) -> io::Result<()> {
    w.write_all(&to_line(resp)).await?;
    w.flush().await
}

/// Tells a peer that may not use the socket, or is over a limit, why, and
/// closes.
async fn refuse(stream: UnixStream, resp: &Response) {
    let (r, mut w) = stream.into_split();
    // Let the client's first line arrive (bounded) so it reads our answer
    // instead of a broken pipe.
    let mut r = BufReader::with_capacity(1024, r);
    let mut first = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), read_line(&mut r, &mut first)).await;
    let _ = send(&mut w, resp).await;
}

/// One control session: requests in, replies out, until the peer closes,
/// stays idle too long, a reply ends it (`watch`, `shutdown`) or the
/// daemon stops.
async fn handle_conn(
    stream: UnixStream,
    daemon: Arc<Daemon>,
    caller: Caller,
    limits: &limits::Limits,
    idle: Duration,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    // Small: a request is one line, and most are a few hundred bytes.
    let mut r = BufReader::with_capacity(4096, r);
    let mut line = Vec::new();
    loop {
        let got = tokio::select! {
            _ = daemon.shutdown.cancelled() => return Ok(()),
            g = tokio::time::timeout(idle, read_line(&mut r, &mut line)) => g,
        };
        let got = match got {
            Ok(g) => g,
            Err(_) => {
                let why = format!(
                    "closing this control connection: no request for {} s ([quota] control_idle_timeout in mftd.toml)",
                    idle.as_secs()
                );
                let _ = send(&mut w, &Response::error(ErrorCode::Limit, why)).await;
                return Ok(());
            }
        };
        // A long-idle connection's buffer goes back to the allocator.
        if line.capacity() > 64 << 10 {
            line = Vec::new();
        }
        match got {
            Ok(None) => return Ok(()),
            Ok(Some(())) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = send(
                    &mut w,
                    &Response::error(ErrorCode::LineTooLong, format!("request longer than {MAX_REQUEST} bytes")),
                )
                .await;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                send(&mut w, &Response::error(ErrorCode::BadRequest, format!("malformed request: {e}"))).await?;
                continue;
            }
        };
        // Handlers touch the file system (output directories, secret files,
        // manifests) and may wait on sources (comparing an existing file):
        // off the runtime's threads, and a restricted user's no more than
        // its share at once. The slot goes with the work, not the wait for
        // it, so a handler that outlives its caller still counts.
        let slot = match limits.request_slot(&caller, crate::quota::REQUEST_WAIT).await {
            Ok(s) => s,
            Err(why) => {
                send(&mut w, &Response::error(ErrorCode::Limit, why)).await?;
                continue;
            }
        };
        let (d, c) = (daemon.clone(), caller.clone());
        let reply = tokio::task::spawn_blocking(move || {
            let reply = handlers::handle(&d, &c, req);
            drop(slot);
            reply
        })
        .await
        .unwrap_or_else(|e| Reply::One(Response::error(ErrorCode::Internal, format!("request handler failed: {e}"))));
        match reply {
            Reply::One(resp) => send(&mut w, &resp).await?,
            Reply::Watch { id, interval_ms } => {
                watch(&daemon, &caller, id, interval_ms, &mut w).await?;
                return Ok(());
            }
            Reply::Shutdown(resp) => {
                send(&mut w, &resp).await?;
                info!("shutdown requested over the control socket");
                daemon.shutdown.cancel();
                return Ok(());
            }
        }
    }
}

/// Streams `progress` for download `id` every `interval_ms` and once more
/// when it ends.
async fn watch<W: tokio::io::AsyncWrite + Unpin>(
    daemon: &Daemon,
    caller: &Caller,
    id: u64,
    interval_ms: u64,
    w: &mut W,
) -> io::Result<()> {
    let Some(dl) = daemon.downloads.get(id).filter(|dl| dl.visible_to(caller)) else {
        let r = crate::download::unknown(id);
        return send(w, &Response::error(r.0, r.1)).await;
    };
    let interval = Duration::from_millis(interval_ms.clamp(50, 60_000));
    let mut dl = dl;
    let mut state = dl.subscribe();
    loop {
        if dl.state() == DownloadState::Paused && dl.stop_reason() == Some(crate::download::StopReason::Restart) {
            // Sources were added: follow the next run, which the handler
            // starts right after this one paused (bounded wait).
            let deadline = tokio::time::Instant::now() + crate::download::STOP_WAIT;
            loop {
                match daemon.downloads.get(id) {
                    Some(next) if !Arc::ptr_eq(&next, &dl) => {
                        dl = next;
                        state = dl.subscribe();
                        break;
                    }
                    _ if dl.stop_reason() != Some(crate::download::StopReason::Restart)
                        || tokio::time::Instant::now() >= deadline =>
                    {
                        break
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        let info = dl.info();
        // A paused download's run is over: the stream ends with it.
        let last = info.state.is_final() || info.state == DownloadState::Paused;
        send(w, &Response::Progress { download: info }).await?;
        if last {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = state.changed() => {
                if r.is_err() { return Ok(()); }
                // Report state changes promptly, final ones above all.
                if !matches!(*state.borrow(), DownloadState::Done | DownloadState::Failed | DownloadState::Cancelled | DownloadState::Paused) {
                    continue;
                }
            }
            _ = daemon.shutdown.cancelled() => {
                let info = dl.info();
                return send(w, &Response::Progress { download: info }).await;
            }
        }
    }
}
