//! What each control request does and answers. `watch` and `shutdown`
//! shape the connection itself: their [`Reply`] tells the control socket
//! what to do with it.

use mftd_common::control::{DownloadState, ErrorCode, Request, Response, StatusInfo, PROTOCOL};

/// Longest a `pause` waits for the download to stop before answering.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
use mftd_common::rate::format_rate;

use crate::caller::Caller;
use crate::listener::ListenerError;
use crate::Daemon;

/// What the control socket does after a request.
#[derive(Debug)]
pub enum Reply {
    /// Send this; the session goes on.
    One(Response),
    /// Turn the connection into the `progress` stream of download `id`.
    Watch { id: u64, interval_ms: u64 },
    /// Send this, then stop the daemon.
    Shutdown(Response),
}

/// Answers `req` from `caller` (see [`crate::caller`] for what each caller
/// may do). Blocking: runs off the async runtime.
pub fn handle(d: &Daemon, caller: &Caller, req: Request) -> Reply {
    match req {
        Request::Hello { protocol, .. } if protocol == PROTOCOL => Reply::One(Response::Hello {
            protocol: PROTOCOL,
            daemon: format!("mftd {}", env!("CARGO_PKG_VERSION")),
            pid: std::process::id(),
        }),
        Request::Hello { protocol, .. } => Reply::One(Response::error(
            ErrorCode::VersionMismatch,
            format!("mftd speaks control protocol {PROTOCOL}, mftctl sent {protocol}; use matching versions"),
        )),
        Request::Watch { id, interval_ms } => Reply::Watch { id, interval_ms },
        Request::Shutdown if caller.unrestricted() => Reply::Shutdown(Response::ok("mftd is shutting down")),
        other => Reply::One(answer(d, caller, other)),
    }
}

/// The requests answered with one response.
fn answer(d: &Daemon, caller: &Caller, req: Request) -> Response {
    // Listeners and the daemon itself are the operator's, not every
    // socket-group member's.
    if matches!(
        req,
        Request::ServerStop { .. }
            | Request::ServerRemove { .. }
            | Request::ServerStart { .. }
            | Request::ServerAdd { .. }
            | Request::ServerLimit { .. }
            | Request::Shutdown
    ) && !caller.unrestricted()
    {
        return Response::error(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: only root or mftd's own user may change listeners or stop mftd, not {}",
                caller.describe()
            ),
        );
    }
    match req {
        Request::Status => status(d, caller),
        Request::ServersList => Response::Servers { servers: d.listeners.list() },
        Request::ServerStop { port } => match d.listeners.stop(port) {
            Ok(n) => Response::ok(format!(
                "stopped listener {port} (closed {n} connection{})",
                if n == 1 { "" } else { "s" }
            )),
            Err(e) => listener_error(e),
        },
        Request::ServerRemove { port } => match d.listeners.remove(port) {
            Ok(n) => Response::ok(format!(
                "removed listener {port} (closed {n} connection{}); until mftd restarts or reloads its configuration",
                if n == 1 { "" } else { "s" }
            )),
            Err(e) => listener_error(e),
        },
        Request::ServerStart { port } => match d.listeners.start(port) {
            Ok(()) => Response::ok(format!("started listener {port}")),
            Err(e) => listener_error(e),
        },
        Request::ServerAdd { port, rate_limit, transport } => {
            let cfg = d.config();
            let rate = rate_limit.unwrap_or(cfg.rate_limit);
            let transport = match transport.as_deref().map(str::parse::<crate::transport::Transport>) {
                None => cfg.transport,
                Some(Ok(t)) => t,
                Some(Err(e)) => return Response::error(ErrorCode::InvalidArgument, e),
            };
            if transport == crate::transport::Transport::Plain && cfg.auth_secret_file.is_some() {
                return Response::error(
                    ErrorCode::InvalidArgument,
                    "a plain listener cannot check the shared secret (it needs TLS); this daemon has auth_secret_file",
                );
            }
            match d.listeners.add(port.unwrap_or(0), rate, transport) {
                Ok(p) => {
                    let how = if transport == crate::transport::Transport::Plain { ", unencrypted" } else { ", TLS" };
                    Response::ok(format!(
                        "added listener {p} (rate limit {}{how}); until mftd restarts or reloads its configuration: add it to the config file to keep it",
                        format_rate(rate)
                    ))
                }
                Err(e) => listener_error(e),
            }
        }
        Request::ServerLimit { port, rate_limit } => match d.listeners.set_limit(port, rate_limit) {
            Ok(()) => Response::ok(format!(
                "listener {port} rate limit is now {} (until mftd restarts or reloads its configuration)",
                format_rate(rate_limit)
            )),
            Err(e) => listener_error(e),
        },
        Request::Get(g) => match d.downloads.start(g, caller) {
            Ok(crate::download::Started::Download { dl, resumed, added }) => Response::Accepted {
                id: dl.id,
                destination: dl.destination.display().to_string(),
                resumed,
                added_sources: added,
            },
            Ok(crate::download::Started::Identical { destination, identity }) => {
                Response::Identical { destination: destination.display().to_string(), identity }
            }
            Err(r) => Response::error(r.0, r.1),
        },
        Request::DownloadRemove { id } => match d.downloads.remove(id, caller) {
            Ok(true) => Response::ok(format!("removed download {id} and its partial data")),
            Ok(false) => Response::ok(format!("removed download {id} from the list")),
            Err(r) => Response::error(r.0, r.1),
        },
        Request::DownloadsPurge => {
            let (removed, kept) = d.downloads.purge(caller);
            let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            let mut msg = match removed.len() {
                0 => "no ended downloads to remove".to_string(),
                n => format!("removed {n} ended download{}: {}", if n == 1 { "" } else { "s" }, ids(&removed)),
            };
            if !kept.is_empty() {
                msg.push_str(&format!(
                    "; kept failed download{} {} with data (`mftctl downloads show ID` says why it failed, `mftctl get --resume ID` retries, `mftctl downloads remove ID` deletes)",
                    if kept.len() == 1 { "" } else { "s" },
                    ids(&kept)
                ));
            }
            Response::ok(msg)
        }
        Request::DownloadAddSource { id, sources } => match d.downloads.add_sources(id, &sources, caller) {
            Ok((dl, added)) if added.is_empty() => Response::ok(format!(
                "download {id} already has {}",
                plural(sources.len(), "this source", "these sources")
            ))
            .with_sources(dl.sources.len()),
            Ok((dl, added)) => {
                let when = if dl.state() == DownloadState::Paused { "; it uses them when resumed" } else { "" };
                Response::ok(format!("added {} to download {id}{when}", added.join(", ")))
                    .with_sources(dl.sources.len())
            }
            Err(r) => Response::error(r.0, r.1),
        },
        Request::GetResume { id: Some(id) } => match d.downloads.resume(id, caller) {
            Ok(dl) => Response::Resumed { ids: vec![dl.id] },
            Err(r) => Response::error(r.0, r.1),
        },
        Request::GetResume { id: None } => {
            let ids = d
                .downloads
                .resumable()
                .into_iter()
                .filter_map(|id| d.downloads.resume(id, caller).ok().map(|dl| dl.id))
                .collect();
            Response::Resumed { ids }
        }
        Request::DownloadPause { id } => match d.downloads.pause(id, caller) {
            // Answered once the pause holds (handlers run off the async
            // runtime, so waiting here blocks no one), so a `resume` right
            // after it finds the download paused.
            Ok(dl) => {
                let deadline = std::time::Instant::now() + PAUSE_WAIT;
                while dl.state() != DownloadState::Paused
                    && !dl.state().is_final()
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                match dl.state() {
                    DownloadState::Paused => {
                        Response::ok(format!("paused download {id}; `mftctl downloads resume {id}` continues it"))
                    }
                    s if s.is_final() => Response::ok(format!("download {id} ended before it could pause")),
                    _ => Response::ok(format!(
                        "pausing download {id} (still winding down); `mftctl downloads resume {id}` continues it"
                    )),
                }
            }
            Err(r) => Response::error(r.0, r.1),
        },
        Request::DownloadResume { id } => match d.downloads.resume(id, caller) {
            Ok(_) => Response::ok(format!("resumed download {id}")),
            Err(r) => Response::error(r.0, r.1),
        },
        Request::DownloadsList => {
            Response::Downloads { downloads: d.downloads.visible_to(caller).iter().map(|x| x.info()).collect() }
        }
        Request::DownloadShow { id } => match d.downloads.get(id).filter(|dl| dl.visible_to(caller)) {
            Some(dl) => Response::Download { download: dl.info() },
            None => {
                let r = crate::download::unknown(id);
                Response::error(r.0, r.1)
            }
        },
        Request::DownloadCancel { id } => match d.downloads.cancel(id, caller) {
            Ok(dl) => Response::ok(format!("cancelled download {id}; removed {}", dl.part_path().display())),
            Err(r) => Response::error(r.0, r.1),
        },
        // A restricted caller's shutdown is refused above; hello, watch and
        // the operator's shutdown are answered by `handle`.
        Request::Hello { .. } | Request::Watch { .. } | Request::Shutdown => {
            Response::error(ErrorCode::Internal, "hello, watch and shutdown are answered by handle")
        }
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// Appends "(now N sources)" to an `ok` message.
trait WithSources {
    fn with_sources(self, n: usize) -> Response;
}

impl WithSources for Response {
    fn with_sources(self, n: usize) -> Response {
        match self {
            Response::Ok { message } => {
                Response::ok(format!("{message} (now {n} source{})", if n == 1 { "" } else { "s" }))
            }
            other => other,
        }
    }
}

fn listener_error(e: ListenerError) -> Response {
    let code = match e {
        ListenerError::Unknown(_) => ErrorCode::UnknownPort,
        ListenerError::InUse(..) | ListenerError::Exists(_) => ErrorCode::PortInUse,
        _ => ErrorCode::InvalidArgument,
    };
    Response::error(code, e.to_string())
}

fn status(d: &Daemon, caller: &Caller) -> Response {
    let cfg = d.config();
    Response::Status(StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: d.started.elapsed().as_secs(),
        listen: cfg.listen.to_string(),
        export_dir: cfg.export.display().to_string(),
        download_dir: cfg.download_dir.display().to_string(),
        socket: cfg.socket.display().to_string(),
        node_id: d.node_id.clone(),
        listeners: d.listeners.list(),
        downloads: d.downloads.visible_to(caller).iter().map(|x| x.info()).collect(),
        damaged_manifests: d.downloads.damaged(),
    })
}
