//! `mftd`: serves files from an export directory on N TCP listeners, runs
//! multi-source downloads, and is driven over a Unix control socket.
//!
//! [`run`] is the whole daemon; the binary only parses flags, sets up
//! logging and signals, and calls [`bind`] then [`run`]. This file keeps
//! only the module list and those two: the daemon itself is in
//! [`daemon`], which the control handlers import.

mod accept;
mod caller;
pub mod config;
mod control;
mod daemon;
mod download;
mod failpoint;
mod fds;
mod identity;
mod jail;
mod listener;
pub mod logging;
mod metrics;
pub mod node;
mod notify;
mod quota;
mod ratelimit;
mod serve;
mod store;
#[cfg(test)]
mod testing;
mod transport;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use config::Config;
use daemon::Daemon;

/// Re-reads the configuration on SIGHUP.
pub type Reloader = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// The sockets [`run`] serves on, bound by [`bind`] before anything else
/// happens: a second daemon, a busy port or a missing permission is said
/// first, and a test can hand in sockets of its own choosing.
pub struct Bound {
    control: control::ControlSocket,
    ground: daemon::Ground,
    metrics: Option<tokio::net::TcpListener>,
    /// Each configured transfer port (0 for "any") with its socket.
    transfer: Vec<(u16, tokio::net::TcpListener)>,
}

/// Binds the control socket, opens what the daemon stands on (see
/// [`daemon::Ground`]), then binds the metrics endpoint and the transfer ports, in
/// that order, so the first problem an operator reads is the one to fix.
pub async fn bind(config: &Config) -> anyhow::Result<Bound> {
    // Every connection and file takes a descriptor: take what the system
    // allows before taking any.
    match fds::raise_limit() {
        Ok((before, now)) if now > before => info!(before, now, "raised the open-files limit (RLIMIT_NOFILE)"),
        Ok((_, now)) => info!(limit = now, "open-files limit (RLIMIT_NOFILE)"),
        Err(e) => warn!(error = %e, limit = fds::limit(), "cannot raise the open-files limit"),
    }
    // The control socket first: a second daemon on the same socket must
    // say so, not complain about ports.
    let control = control::ControlSocket::bind(&config.socket, config.socket_group.as_deref())?;
    let ground = daemon::ground(config)?;
    let metrics = match config.metrics_listen {
        Some(a) => Some(metrics::bind(a).await?),
        None => None,
    };
    let mut transfer = Vec::with_capacity(config.ports.len());
    for &port in &config.ports {
        transfer.push((port, listener::bind(std::net::SocketAddr::new(config.listen, port))?));
    }
    Ok(Bound { control, ground, metrics, transfer })
}

/// Runs the daemon on `bound` until `shutdown` completes or a caller of
/// the control socket asks it to stop; then drains and returns.
pub async fn run(
    config: Config,
    bound: Bound,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    reloader: Option<Reloader>,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    let daemon = Daemon::start(config, bound.ground, bound.transfer, token.clone())?;
    // One shutdown path: the caller's future (signals, for the binary) and
    // `mftctl shutdown` both cancel `token`.
    daemon.tracker.spawn(async move {
        tokio::select! {
            _ = shutdown => token.cancel(),
            _ = token.cancelled() => {}
        }
    });
    daemon::spawn_sampler(&daemon);
    if let Some(m) = bound.metrics {
        daemon.tracker.spawn(metrics::serve(m, daemon.clone()));
    }
    if let Some(reload) = reloader {
        daemon::spawn_reloader(&daemon, reload)?;
    }
    let cfg = daemon.config();
    info!(
        socket = %cfg.socket.display(),
        export = %cfg.export.display(),
        ports = ?daemon.listeners.ports(),
        "mftd ready"
    );
    // Listeners are bound and the control socket listens: tell systemd.
    notify::ready(&daemon.summary());
    control::serve(bound.control, daemon.clone()).await;

    info!("shutting down");
    notify::stopping();
    daemon.drain().await;
    info!("mftd stopped");
    Ok(())
}
