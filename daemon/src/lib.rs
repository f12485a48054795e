//! `mftd`: serves files from an export directory on N TCP listeners, runs
//! multi-source downloads, and is driven over a Unix control socket.
//!
//! [`run`] is the whole daemon; the binary only parses flags, sets up
//! logging and signals, and calls it.

pub mod config;
pub mod control;
pub mod download;
pub mod handlers;
pub mod identity;
pub mod jail;
pub mod listener;
pub mod metrics;
pub mod ratelimit;
pub mod serve;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::Config;
use download::{DownloadDefaults, Downloads};
use listener::Listeners;
use serve::ServeContext;

/// Everything the control handlers reach.
pub struct Daemon {
    pub config: Config,
    pub started: Instant,
    pub listeners: Listeners,
    pub downloads: Downloads,
    /// Cancelled once to shut the daemon down (signal or `mftctl shutdown`).
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// How long shutdown waits for connections and downloads to wind down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Runs the daemon until `shutdown` is cancelled. `ready` is called once
/// every listener is bound and the control socket accepts connections.
pub async fn run(config: Config, shutdown: CancellationToken, ready: impl FnOnce(&Daemon)) -> anyhow::Result<()> {
    // The control socket first: a second daemon on the same socket must
    // say so, not complain about ports.
    let sock = control::ControlSocket::bind(&config.socket)?;

    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state directory {}", config.state_dir.display()))?;
    if !config.export.exists() {
        std::fs::create_dir_all(&config.export).with_context(|| {
            format!("export directory {} does not exist and cannot be created", config.export.display())
        })?;
        info!(export = %config.export.display(), "created empty export directory");
    }
    let jail = jail::Jail::new(&config.export)
        .with_context(|| format!("cannot open export directory {}", config.export.display()))?;
    let ctx = Arc::new(ServeContext { jail, identities: Default::default() });

    let metrics = match config.metrics_listen {
        Some(a) => Some(metrics::bind(a).await?),
        None => None,
    };
    let tracker = TaskTracker::new();
    let listeners = Listeners::new(config.listen, config.max_connections, ctx, shutdown.child_token(), tracker.clone());
    for &port in &config.ports {
        listeners.add(port, config.listener_limits.get(&port).copied().unwrap_or(config.rate_limit))?;
    }
    let store = store::Store::new(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.join("downloads").display()))?;
    let downloads = Downloads::new(
        DownloadDefaults {
            download_dir: config.download_dir.clone(),
            connections_per_server: config.connections_per_server,
            idle_timeout: config.idle_timeout,
            checkpoint_interval: config.checkpoint_interval,
            checkpoint_bytes: config.checkpoint_bytes,
        },
        shutdown.child_token(),
        tracker.clone(),
        store,
    );
    downloads.load(config.auto_resume);
    let daemon = Arc::new(Daemon {
        config,
        started: Instant::now(),
        listeners,
        downloads,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });

    // Samplers for rates and the periodic status line.
    {
        let d = daemon.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last_status = Instant::now();
            loop {
                tokio::select! {
                    _ = d.shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                d.listeners.sample_rates();
                d.downloads.sample();
                let every = d.config.status_interval;
                if every > 0 && last_status.elapsed() >= Duration::from_secs(every) {
                    last_status = Instant::now();
                    for l in d.listeners.list() {
                        info!(port = l.port, state = ?l.state, connections = l.connections, bytes_sent = l.bytes_sent, rate = l.rate, rate_limit = l.rate_limit, "listener status");
                    }
                }
            }
        });
    }

    if let Some(m) = metrics {
        tracker.spawn(metrics::serve(m, daemon.clone()));
    }
    info!(
        socket = %daemon.config.socket.display(),
        export = %daemon.config.export.display(),
        ports = ?daemon.listeners.ports(),
        "mftd ready"
    );
    ready(&daemon);
    control::serve(sock, daemon.clone()).await;

    // One shutdown path for signals and `mftctl shutdown`.
    info!("shutting down");
    daemon.listeners.stop_all();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        warn!("some tasks did not finish within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    info!("mftd stopped");
    Ok(())
}
