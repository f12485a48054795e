//! What each control request does and answers: one file per request (or
//! per family of requests of the same shape), each tested in-process
//! against a real [`Daemon`]. Handlers never see the socket; `watch` and
//! `shutdown` shape the connection itself, so their [`Reply`] tells the
//! control socket what to do with it.
//!
//! Handlers are blocking: the control socket runs them off the async
//! runtime, so a handler may wait (`pause` does) without stalling anyone.

mod add_source;
mod cancel;
mod get;
mod hello;
mod pause;
mod remove;
mod resume;
mod servers;
mod show;
mod status;

use mftd_common::control::{ErrorCode, Request, Response};

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::download::Rejected;

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
/// may do).
pub fn handle(d: &Daemon, caller: &Caller, req: Request) -> Reply {
    if operator_only(&req) && !caller.unrestricted() {
        return Reply::One(Response::error(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: only root or mftd's own user may change listeners or stop mftd, not {}",
                caller.describe()
            ),
        ));
    }
    Reply::One(match req {
        Request::Hello { protocol, .. } => hello::hello(protocol),
        Request::Watch { id, interval_ms } => return Reply::Watch { id, interval_ms },
        Request::Shutdown => return Reply::Shutdown(Response::ok("mftd is shutting down")),
        Request::Status => status::status(d, caller),
        Request::ServersList => Response::Servers { servers: d.listeners.list() },
        Request::ServerStop { port } => servers::stop(d, port),
        Request::ServerRemove { port } => servers::remove(d, port),
        Request::ServerStart { port } => servers::start(d, port),
        Request::ServerAdd { port, rate_limit, transport } => servers::add(d, port, rate_limit, transport.as_deref()),
        Request::ServerLimit { port, rate_limit } => servers::limit(d, port, rate_limit),
        Request::Get(g) => get::get(d, caller, g),
        Request::GetResume { id } => resume::get_resume(d, caller, id),
        Request::DownloadResume { id } => resume::resume(d, caller, id),
        Request::DownloadPause { id } => pause::pause(d, caller, id),
        Request::DownloadCancel { id } => cancel::cancel(d, caller, id),
        Request::DownloadRemove { id } => remove::remove(d, caller, id),
        Request::DownloadsPurge => remove::purge(d, caller),
        Request::DownloadAddSource { id, sources } => add_source::add_source(d, caller, id, &sources),
        Request::DownloadsList => show::list(d, caller),
        Request::DownloadShow { id } => show::show(d, caller, id),
    })
}

/// Listeners and the daemon itself are the operator's, not every
/// socket-group member's.
fn operator_only(req: &Request) -> bool {
    matches!(
        req,
        Request::ServerStop { .. }
            | Request::ServerRemove { .. }
            | Request::ServerStart { .. }
            | Request::ServerAdd { .. }
            | Request::ServerLimit { .. }
            | Request::Shutdown
    )
}

impl From<Rejected> for Response {
    fn from(r: Rejected) -> Response {
        Response::error(r.0, r.1)
    }
}

/// `one` for one thing, else `many`.
fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ok_message, TestDaemon};

    #[tokio::test(flavor = "multi_thread")]
    async fn a_restricted_caller_may_not_touch_listeners_or_stop_the_daemon() {
        let t = TestDaemon::start(1).await;
        let port = t.ports()[0];
        for req in [
            Request::ServerStop { port },
            Request::ServerRemove { port },
            Request::ServerStart { port },
            Request::ServerAdd { port: None, rate_limit: None, transport: None },
            Request::ServerLimit { port, rate_limit: 1 },
            Request::Shutdown,
        ] {
            match t.ask_as(TestDaemon::stranger(), req.clone()).await {
                Reply::One(Response::Error { code: ErrorCode::PermissionDenied, message }) => {
                    assert!(message.contains("uid 65534"), "{message}")
                }
                other => panic!("{req:?} from a stranger: {other:?}"),
            }
        }
        // Nothing changed: the listener still runs, the daemon still serves.
        assert_eq!(t.ports(), vec![port]);
        assert!(!t.daemon.shutdown.is_cancelled());
        ok_message(t.ask(Request::ServerStop { port }).await);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn watch_and_shutdown_shape_the_connection() {
        let t = TestDaemon::start(0).await;
        assert!(matches!(
            t.ask(Request::Watch { id: 7, interval_ms: 250 }).await,
            Reply::Watch { id: 7, interval_ms: 250 }
        ));
        match t.ask(Request::Shutdown).await {
            Reply::Shutdown(Response::Ok { message }) => assert_eq!(message, "mftd is shutting down"),
            other => panic!("shutdown: {other:?}"),
        }
    }
}
