//! The listener requests: `servers stop/start/remove/add/limit` (the
//! operator's only; see [`super::handle`]). Each is a [`Listeners`] call and
//! a sentence saying what changed and for how long it holds.
//!
//! [`Listeners`]: crate::listener::Listeners

use mftd_common::control::{ErrorCode, Response};
use mftd_common::rate::format_rate;

use super::plural;
use crate::daemon::Daemon;
use crate::listener::ListenerError;
use crate::transport::Transport;

pub(super) fn stop(d: &Daemon, port: u16) -> Response {
    match d.listeners.stop(port) {
        Ok(n) => Response::ok(format!(
            "stopped listener {port} (closed {n} {})",
            plural(n as usize, "connection", "connections")
        )),
        Err(e) => listener_error(e),
    }
}

pub(super) fn start(d: &Daemon, port: u16) -> Response {
    match d.listeners.start(port) {
        Ok(()) => Response::ok(format!("started listener {port}")),
        Err(e) => listener_error(e),
    }
}

pub(super) fn remove(d: &Daemon, port: u16) -> Response {
    match d.listeners.remove(port) {
        Ok(n) => Response::ok(format!(
            "removed listener {port} (closed {n} {}); until mftd restarts or reloads its configuration",
            plural(n as usize, "connection", "connections")
        )),
        Err(e) => listener_error(e),
    }
}

/// Adds a listener with the daemon's rate limit and transport unless the
/// request names its own.
pub(super) fn add(d: &Daemon, port: Option<u16>, rate_limit: Option<u64>, transport: Option<&str>) -> Response {
    let cfg = d.config();
    let rate = rate_limit.unwrap_or(cfg.rate_limit);
    let transport = match transport.map(str::parse::<Transport>) {
        None => cfg.transport,
        Some(Ok(t)) => t,
        Some(Err(e)) => return Response::error(ErrorCode::InvalidArgument, e),
    };
    if transport == Transport::Plain && cfg.auth_secret_file.is_some() {
        return Response::error(
            ErrorCode::InvalidArgument,
            "a plain listener cannot check the shared secret (it needs TLS); this daemon has auth_secret_file",
        );
    }
    match d.listeners.add(port.unwrap_or(0), rate, transport) {
        Ok(p) => {
            let how = if transport == Transport::Plain { ", unencrypted" } else { ", TLS" };
            Response::ok(format!(
                "added listener {p} (rate limit {}{how}); until mftd restarts or reloads its configuration: add it to the config file to keep it",
                format_rate(rate)
            ))
        }
        Err(e) => listener_error(e),
    }
}

pub(super) fn limit(d: &Daemon, port: u16, rate_limit: u64) -> Response {
    match d.listeners.set_limit(port, rate_limit) {
        Ok(()) => Response::ok(format!(
            "listener {port} rate limit is now {} (until mftd restarts or reloads its configuration)",
            format_rate(rate_limit)
        )),
        Err(e) => listener_error(e),
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

#[cfg(test)]
mod tests {
    use mftd_common::control::ListenerState;

    use super::*;
    use crate::testing::TestDaemon;

    fn error(r: Response) -> (ErrorCode, String) {
        match r {
            Response::Error { code, message } => (code, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn ok(r: Response) -> String {
        match r {
            Response::Ok { message } => message,
            other => panic!("expected ok, got {other:?}"),
        }
    }

    fn state(d: &Daemon, port: u16) -> ListenerState {
        d.listeners.list().into_iter().find(|l| l.port == port).unwrap_or_else(|| panic!("no listener {port}")).state
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stop_closes_the_port_and_start_reopens_it() {
        let t = TestDaemon::start(1).await;
        let port = t.ports()[0];
        let d = &t.daemon;
        assert_eq!(ok(stop(d, port)), format!("stopped listener {port} (closed 0 connections)"));
        assert_eq!(state(d, port), ListenerState::Stopped);
        // The accept loop closes the port as it sees the stop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(std::time::Instant::now() < deadline, "a stopped listener still accepts after 5 s");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (code, message) = error(stop(d, port));
        assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
        assert!(message.contains("already stopped"), "{message}");
        assert_eq!(ok(start(d, port)), format!("started listener {port}"));
        assert_eq!(state(d, port), ListenerState::Running);
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("a restarted listener accepts");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unknown_port_is_said_with_its_code() {
        let t = TestDaemon::start(1).await;
        let unknown = t.ports()[0].wrapping_add(1).max(1);
        for r in [
            stop(&t.daemon, unknown),
            start(&t.daemon, unknown),
            remove(&t.daemon, unknown),
            limit(&t.daemon, unknown, 5),
        ] {
            let (code, message) = error(r);
            assert_eq!(code, ErrorCode::UnknownPort, "{message}");
            assert!(message.contains(&unknown.to_string()), "{message}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn add_limit_and_remove_a_listener() {
        let t = TestDaemon::start(0).await;
        let d = &t.daemon;
        let message = ok(add(d, None, Some(1 << 20), Some("plain")));
        let port = t.ports()[0];
        assert!(
            message.starts_with(&format!("added listener {port} (rate limit 1.0 MiB/s, unencrypted)")),
            "{message}"
        );
        let (code, message) = error(add(d, Some(port), None, None));
        assert_eq!(code, ErrorCode::PortInUse, "{message}");
        let (code, message) = error(add(d, None, None, Some("carrier-pigeon")));
        assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
        assert_eq!(t.ports(), vec![port], "a refused add left a listener behind");
        ok(limit(d, port, 2048));
        assert_eq!(d.listeners.limit(port), Some(2048));
        assert!(ok(remove(d, port)).starts_with(&format!("removed listener {port}")));
        assert!(t.ports().is_empty());
    }
}
