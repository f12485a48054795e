//! The running daemon: what the control handlers reach ([`Daemon`]), how it
//! starts over already bound sockets, how a reload (SIGHUP) is applied, and
//! the background tasks that keep its status current.
//!
//! Owns: the state every handler shares, the reload steps, and draining at
//! shutdown. Must never: bind a socket (that is [`crate::bind`], so the
//! first problem an operator reads is the one to fix) or import the control
//! socket (the handlers import this module, not the other way round).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::download::{self, DownloadDefaults, Downloads};
use crate::listener::Listeners;
use crate::serve::{self, ServeContext};
use crate::{fds, identity, jail, node, notify, store, transport};

/// Everything the control handlers reach.
pub struct Daemon {
    /// Replaced as a whole on reload (SIGHUP).
    config: std::sync::RwLock<Config>,
    pub started: Instant,
    pub listeners: Listeners,
    pub downloads: Downloads,
    /// Cancelled once to shut the daemon down (signal or `mftctl shutdown`).
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// How the daemon's file descriptors are shared out.
    pub fds: fds::Shares,
}

impl Daemon {
    /// The current configuration.
    pub fn config(&self) -> Config {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One line for systemd's STATUS= and the logs.
    pub fn summary(&self) -> String {
        let ls = self.listeners.list();
        let running = ls.iter().filter(|l| l.state == mftd_common::control::ListenerState::Running).count();
        let active = self
            .downloads
            .all()
            .iter()
            .filter(|d| !d.state().is_final() && d.state() != mftd_common::control::DownloadState::Paused)
            .count();
        format!("{running}/{} listeners running, {active} downloads active", ls.len())
    }

    /// Applies a re-read configuration: listeners are added, removed and
    /// re-limited to match it; running downloads are not touched. Other
    /// settings take effect for what starts after the reload.
    pub fn reload(&self, new: Config) {
        notify::reloading();
        let old = self.config();
        if let Err(e) = check_transports(&new, new.auth_secret_file.is_some()) {
            warn!(error = %format!("{e:#}"), "reload refused; the running configuration stays");
            notify::ready(&self.summary());
            return;
        }
        self.reload_listeners(&new);
        self.reload_serving(&new);
        warn_restart_only(&old, &new);
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = new;
        info!("configuration reloaded");
        notify::ready(&self.summary());
    }

    /// Adds, removes and re-limits listeners to match `new`.
    fn reload_listeners(&self, new: &Config) {
        if new.ports.contains(&0) {
            warn!(
                "reload: port 0 in the config cannot be matched to running listeners; the listener set is left as is"
            );
        } else {
            let current = self.listeners.ports();
            for port in &current {
                if !new.ports.contains(port) {
                    match self.listeners.remove(*port) {
                        Ok(n) => info!(port, closed = n, "reload: listener removed"),
                        Err(e) => warn!(port, error = %e, "reload: cannot remove listener"),
                    }
                }
            }
            for port in &new.ports {
                let limit = new.listener_limits.get(port).copied().unwrap_or(new.rate_limit);
                if current.contains(port) {
                    if self.listeners.limit(*port) != Some(limit) {
                        let _ = self.listeners.set_limit(*port, limit);
                    }
                } else {
                    let transport = new.listener_transport.get(port).copied().unwrap_or(new.transport);
                    match self.listeners.add(*port, limit, transport) {
                        Ok(_) => info!(port, "reload: listener added"),
                        Err(e) => warn!(port, error = %e, "reload: cannot add listener"),
                    }
                }
                self.listeners.set_allow(*port, new.listener_allow.get(port).cloned());
            }
        }
    }

    /// Serving settings apply to connections accepted from now on; open
    /// ones that the new allow lists forbid are closed.
    fn reload_serving(&self, new: &Config) {
        let ctx = self.listeners.context();
        let previous = ctx.settings();
        let secret = match &new.auth_secret_file {
            None => None,
            Some(p) => match config::read_secret(p) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "reload: cannot read auth_secret_file; keeping the previous secret");
                    previous.secret.clone()
                }
            },
        };
        let settings = serve_settings(new, secret);
        if settings != *previous {
            if settings.secret != previous.secret {
                info!(on = settings.secret.is_some(), "reload: transfer authentication changed");
            }
            ctx.set_settings(settings);
        }
        let closed = self.listeners.enforce_allow();
        if closed > 0 {
            info!(closed, "reload: closed connections the new allow lists forbid");
        }
    }
}

/// Warns about settings that changed but only take effect at a restart.
fn warn_restart_only(old: &Config, new: &Config) {
    for (what, changed) in [
        ("download_dir", old.download_dir != new.download_dir),
        ("download_roots", old.download_roots != new.download_roots),
        ("min_free_space", old.min_free_space != new.min_free_space),
        ("max_download_size", old.max_download_size != new.max_download_size),
        ("retention", old.retention != new.retention),
        ("connections_per_server", old.connections_per_server != new.connections_per_server),
        ("max_connections", old.max_connections != new.max_connections),
        ("listen", old.listen != new.listen),
        ("export", old.export != new.export),
        ("socket", old.socket != new.socket),
        ("state_dir", old.state_dir != new.state_dir),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        ("node_trust", old.node_trust != new.node_trust),
        ("known_nodes", old.known_nodes != new.known_nodes),
        ("[quota]", old.quota != new.quota),
        (
            "transport of a running listener",
            new.ports.iter().any(|p| {
                old.ports.contains(p)
                    && old.listener_transport.get(p).unwrap_or(&old.transport)
                        != new.listener_transport.get(p).unwrap_or(&new.transport)
            }),
        ),
    ] {
        if changed {
            warn!(setting = what, "reload: this setting only changes with a restart");
        }
    }
}

/// The serving settings `config` asks for, with `secret` read from its
/// `auth_secret_file`.
fn serve_settings(config: &Config, secret: Option<Vec<u8>>) -> serve::ServeSettings {
    serve::ServeSettings {
        secret,
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.serve_idle_timeout,
        max_per_ip: config.max_connections_per_ip,
        handshake_rate: config.handshake_rate,
        min_rate: config.serve_min_rate,
        allow_nodes: config.allow_nodes.clone(),
        allow: config.allow.clone(),
    }
}

/// Refuses a shared secret on plaintext listeners (a proof there would be
/// bound to nothing, and the data it seems to protect could be rewritten
/// anyway) and warns about plaintext on addresses others can reach.
fn check_transports(config: &Config, secret: bool) -> anyhow::Result<()> {
    let plain: Vec<u16> = config
        .ports
        .iter()
        .copied()
        .filter(|p| {
            config.listener_transport.get(p).copied().unwrap_or(config.transport) == transport::Transport::Plain
        })
        .collect();
    if plain.is_empty() {
        return Ok(());
    }
    if secret {
        anyhow::bail!(
            "listeners {plain:?} are plain TCP but auth_secret_file is set: a shared secret needs TLS, which binds its proofs to the channel; drop transport = \"plain\" or the secret"
        );
    }
    if !config.listen.is_loopback() {
        warn!(ports = ?plain, listen = %config.listen, "plain (unencrypted) listeners on an address others can reach: anyone on the path can read and rewrite what they send");
    }
    Ok(())
}

/// How long shutdown waits for connections and downloads to wind down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// What the daemon stands on, opened by [`crate::bind`] before any port is bound: a missing
/// export directory or secret file is said as such, not as a busy port.
pub(crate) struct Ground {
    jail: jail::Jail,
    secret: Option<Vec<u8>>,
    tls: Arc<node::TlsConfigs>,
}

/// Opens the state directory, the export directory, the secret and this
/// node's identity, and refuses a secret on plaintext listeners.
pub(crate) fn ground(config: &Config) -> anyhow::Result<Ground> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state directory {}", config.state_dir.display()))?;
    let jail = open_export(config)?;
    let secret = match &config.auth_secret_file {
        Some(p) => Some(config::read_secret(p)?),
        None => None,
    };
    if secret.is_some() {
        info!("transfer listeners require authentication");
    }
    let node = node::NodeIdentity::load_or_create(&config.state_dir)
        .with_context(|| format!("cannot load this node's identity from {}", config.state_dir.display()))?;
    let tls = Arc::new(node::TlsConfigs::new(&node)?);
    info!(node_id = %tls.id, "node identity");
    check_transports(config, secret.is_some())?;
    Ok(Ground { jail, secret, tls })
}

impl Daemon {
    /// Builds the daemon over already bound transfer ports: the state
    /// directory, the export jail, this node's identity, the listeners and
    /// the downloads of earlier runs. Everything it starts stops when
    /// `shutdown` is cancelled.
    pub(crate) fn start(
        config: Config,
        ground: Ground,
        transfer: Vec<(u16, tokio::net::TcpListener)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Daemon>> {
        let Ground { jail, secret, tls } = ground;
        let ctx = Arc::new(ServeContext::new(
            jail,
            identity::IdentityCache::new(config.hash_threads, Some(config.state_dir.join("identities"))),
            serve_settings(&config, secret),
            Some(tls.clone()),
        ));

        let tracker = TaskTracker::new();
        if config.index_export {
            let (ctx, stop) = (ctx.clone(), shutdown.child_token());
            tracker.spawn(async move { identity::index_export(&ctx.jail, &ctx.identities, stop).await });
        }
        let fds = fds::Shares::new(fds::limit());
        let serving = config.ports.len() as u64 * u64::from(config.max_connections);
        if serving > fds.serving() as u64 {
            warn!(
                limit = fds.limit,
                serving,
                share = fds.serving(),
                "the listeners' caps (ports × max_connections) add up to more than they may serve together (1/4 of the open-files limit); raise LimitNOFILE"
            );
        }
        let listeners = Listeners::new(
            config.listen,
            config.max_connections,
            fds.serving(),
            ctx,
            shutdown.child_token(),
            tracker.clone(),
        );
        for (port, socket) in transfer {
            let p = listeners.adopt(
                socket,
                config.listener_limits.get(&port).copied().unwrap_or(config.rate_limit),
                config.listener_transport.get(&port).copied().unwrap_or(config.transport),
            )?;
            if let Some(a) = config.listener_allow.get(&port) {
                listeners.set_allow(p, Some(a.clone()));
            }
        }
        if config.ports.is_empty() {
            info!("no transfer listeners (servers = 0): this mftd serves no files, it only downloads");
        }
        let store = store::Store::new(&config.state_dir)
            .with_context(|| format!("cannot create {}", config.state_dir.join("manifests").display()))?;
        let downloads = Downloads::new(
            DownloadDefaults {
                dialers: Arc::new(download::dialers::Dialers::new(
                    &config.state_dir,
                    download::client::Dialer {
                        tls: tls.clone(),
                        known: Arc::new(node::KnownNodes::load(&config.known_nodes, config.node_trust)?),
                    },
                )),
                download_dir: config.download_dir.clone(),
                connections_per_server: config.connections_per_server,
                idle_timeout: config.idle_timeout,
                checkpoint_interval: config.checkpoint_interval,
                checkpoint_bytes: config.checkpoint_bytes,
                secret_file: config.auth_secret_file.clone(),
                download_roots: config.download_roots.clone(),
                min_free_space: config.min_free_space,
                max_download_size: config.max_download_size,
                retention: config.retention,
                quota: config.quota.clone(),
                fds,
            },
            shutdown.child_token(),
            tracker.clone(),
            store,
        );
        downloads.load(config.auto_resume);
        Ok(Arc::new(Daemon {
            config: std::sync::RwLock::new(config),
            started: Instant::now(),
            listeners,
            downloads,
            shutdown,
            tracker,
            fds,
        }))
    }

    /// Closes the listeners and waits (at most [`SHUTDOWN_GRACE`]) for
    /// connections and downloads to wind down and checkpoint.
    pub(crate) async fn drain(&self) {
        self.listeners.stop_all();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait()).await.is_err() {
            warn!("some tasks did not finish within {SHUTDOWN_GRACE:?}; exiting anyway");
        }
    }
}

/// Opens the export directory as a jail, creating it when it is the
/// default; one someone named and that is not there is a mistake (a typo,
/// an unmounted disk), not something to create empty and serve.
fn open_export(config: &Config) -> anyhow::Result<jail::Jail> {
    let named = config.origins.get("export").is_some_and(|o| *o != "default");
    if named && !config.export.exists() {
        anyhow::bail!(
            "export directory {} does not exist; create it or fix --export / export in the config file",
            config.export.display()
        );
    }
    if !config.export.exists() {
        std::fs::create_dir_all(&config.export).with_context(|| {
            format!("export directory {} does not exist and cannot be created", config.export.display())
        })?;
        info!(export = %config.export.display(), "created empty export directory");
    }
    jail::Jail::new(&config.export).with_context(|| format!("cannot open export directory {}", config.export.display()))
}

/// Samples rates every 500 ms, says what peers that went quiet did wrong
/// (see [`crate::serve::peerlog`]), pings systemd's watchdog, keeps systemd's
/// STATUS= current and logs the periodic listener status line.
pub(crate) fn spawn_sampler(d: &Arc<Daemon>) {
    let d = d.clone();
    d.tracker.clone().spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_status = Instant::now();
        let watchdog = notify::watchdog_interval();
        let mut last_ping = Instant::now();
        let mut last_summary = String::new();
        loop {
            tokio::select! {
                _ = d.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            d.listeners.sample_rates();
            d.listeners.context().peer_log.sweep();
            d.downloads.sample();
            if let Some(w) = watchdog {
                if last_ping.elapsed() >= w {
                    notify::watchdog();
                    last_ping = Instant::now();
                }
            }
            let summary = d.summary();
            if summary != last_summary {
                notify::status(&summary);
                last_summary = summary;
            }
            let every = d.config().status_interval;
            if every > 0 && last_status.elapsed() >= Duration::from_secs(every) {
                last_status = Instant::now();
                for l in d.listeners.list() {
                    info!(port = l.port, state = ?l.state, connections = l.connections, bytes_sent = l.bytes_sent, rate = l.rate, rate_limit = l.rate_limit, "listener status");
                }
            }
        }
    });
}

/// Re-reads and applies the configuration on every SIGHUP.
pub(crate) fn spawn_reloader(d: &Arc<Daemon>, reload: crate::Reloader) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let d = d.clone();
    d.tracker.clone().spawn(async move {
        loop {
            tokio::select! {
                _ = d.shutdown.cancelled() => break,
                r = hup.recv() => if r.is_none() { break },
            }
            info!("SIGHUP: reloading configuration");
            match reload() {
                Ok(c) => d.reload(c),
                Err(e) => warn!(error = %format!("{e:#}"), "reload failed; keeping the current configuration"),
            }
        }
    });
    Ok(())
}
