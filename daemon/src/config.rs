//! Configuration: command-line flags, the TOML config file, and defaults,
//! merged in that order of precedence (flags win).
//!
//! Default locations: when run as root (as a system service) the config is
//! `/etc/mftd/mftd.toml`, state `/var/lib/mftd`, socket `/run/mftd/mftd.sock`;
//! systemd's `CONFIGURATION_DIRECTORY`, `STATE_DIRECTORY` and
//! `RUNTIME_DIRECTORY` override those when set. For a normal user everything
//! lives under the XDG directories (via the `directories` crate).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use mftd_common::paths::{default_socket_path, env_dir, project_dirs, system_mode};
use mftd_common::rate::parse_rate;

/// Declares every setting once: its doc, its flag and the type of its
/// config-file key. From this one table follow the flags ([`Args`]), the
/// file keys ([`FileConfig`]), [`KEYS`] and where each value came from
/// ([`origins`]); a key left out of `--print-config` or of the shipped
/// `mftd.toml` fails a test.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $key:ident: $flag:ty => $file:ty,
    )*) => {
        /// Command-line flags of `mftd`.
        #[derive(Debug, Parser, Default, Clone)]
        #[command(name = "mftd", version, about = "Multi-server file transfer daemon")]
        pub struct Args {
            /// TOML config file (default: /etc/mftd/mftd.toml as root, else the XDG config dir).
            #[arg(long, value_name = "FILE", env = "MFTD_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                pub $key: $flag,
            )*
            /// Print the effective configuration, and where each value came from, then exit.
            #[arg(long)]
            pub print_config: bool,
            /// Print this node's ID (making its identity if it has none yet), then exit.
            #[arg(long)]
            pub print_node_id: bool,
            /// Write the mftd(8) man page into DIR and exit.
            #[arg(long, value_name = "DIR", hide = true)]
            pub manpage: Option<PathBuf>,
            /// More log output (-v debug, -vv trace); RUST_LOG overrides.
            #[arg(short, long, action = clap::ArgAction::Count)]
            pub verbose: u8,
        }

        /// The config file: every key is optional; flags win over it.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileConfig {
            $(
                $(#[doc = $doc])*
                pub $key: Option<$file>,
            )*
            /// Per-listener settings: `[listener.5001]` with `rate_limit = "4M"`.
            pub listener: Option<std::collections::BTreeMap<String, ListenerFileConfig>>,
            /// What one restricted user may take: `[quota]` (see [`crate::quota`]).
            pub quota: Option<crate::quota::QuotaFileConfig>,
        }

        /// Every setting: the flag is `--` and the key with dashes.
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        /// Where each setting came from (`flag`, `config file` or
        /// `default`), for `--print-config` and for telling a named
        /// directory from a default one.
        fn origins(args: &Args, file: &FileConfig) -> std::collections::BTreeMap<&'static str, &'static str> {
            let mut origins = std::collections::BTreeMap::new();
            $(
                origins.insert(stringify!($key), origin(Given::given(&args.$key), file.$key.is_some()));
            )*
            // The ports are given by any of three keys.
            let port_keys = ["ports", "servers", "base_port"];
            let from = |o: &str| port_keys.iter().any(|k| origins.get(k) == Some(&o));
            let ports = if from("flag") { "flag" } else if from("config file") { "config file" } else { "default" };
            origins.insert("ports", ports);
            origins.insert("listener", origin(false, file.listener.is_some()));
            for key in file.quota.as_ref().map(|q| q.given()).unwrap_or_default() {
                origins.insert(key, "config file");
            }
            origins
        }
    };
}

fn origin(flag: bool, file: bool) -> &'static str {
    if flag {
        "flag"
    } else if file {
        "config file"
    } else {
        "default"
    }
}

/// Whether a flag was given: an `Option` that is set, a switch that is on.
trait Given {
    fn given(&self) -> bool;
}

impl<T> Given for Option<T> {
    fn given(&self) -> bool {
        self.is_some()
    }
}

impl Given for bool {
    fn given(&self) -> bool {
        *self
    }
}

settings! {
    /// Directory whose files the transfer listeners serve.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf> => PathBuf,
    /// Address the transfer listeners bind to (default 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    listen: Option<IpAddr> => IpAddr,
    /// Number of transfer listeners, on consecutive ports from --base-port.
    #[arg(long, value_name = "N")]
    servers: Option<u16> => u16,
    /// First listener port (default 5001).
    #[arg(long, value_name = "PORT")]
    base_port: Option<u16> => u16,
    /// Explicit listener ports (overrides --servers/--base-port); 0 picks a free port.
    #[arg(long, value_name = "P1,P2,...", value_delimiter = ',')]
    ports: Option<Vec<u16>> => Vec<u16>,
    /// Bandwidth cap for every listener, bytes/s with K/M/G suffix (0 = none).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    rate_limit: Option<u64> => RateValue,
    /// Log a one-line status of every listener this often (0 = off).
    #[arg(long, value_name = "SECS")]
    status_interval: Option<u64> => u64,
    /// Control socket path.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf> => PathBuf,
    /// Make the control socket usable by this group (mode 0660) so operators
    /// need no root for mftctl.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String> => String,
    /// Directory for download manifests and daemon state.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf> => PathBuf,
    /// Where downloads go when `mftctl get` gives no -o.
    #[arg(long, value_name = "DIR")]
    download_dir: Option<PathBuf> => PathBuf,
    /// Directories that users other than root and mftd's own may download
    /// into (comma-separated; default: wherever they could write themselves).
    #[arg(long, value_name = "DIR,...", value_delimiter = ',')]
    download_roots: Option<Vec<PathBuf>> => Vec<PathBuf>,
    /// Most simultaneous connections per listener.
    #[arg(long, value_name = "N")]
    max_connections: Option<u32> => u32,
    /// Most simultaneous connections from one client address, all listeners together.
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<u32> => u32,
    /// New connections one client address may open per second, all
    /// listeners together, in bursts of twice that (0 = no limit; default 32).
    #[arg(long, value_name = "N")]
    handshake_rate: Option<u32> => u32,
    /// Seconds a new transfer connection has to complete its handshake.
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64> => u64,
    /// Seconds a transfer connection may stay silent before it is closed.
    #[arg(long, value_name = "SECS")]
    serve_idle_timeout: Option<u64> => u64,
    /// Slowest a client may take the file data it asked for (bytes/s, K/M/G
    /// suffixes; judged over 10 s of waiting on it; 0 turns it off; default 1K).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    serve_min_rate: Option<u64> => RateValue,
    /// File holding the shared secret that clients must prove (listeners)
    /// and that downloads prove to servers. Never pass secrets on the command line.
    #[arg(long, value_name = "FILE")]
    auth_secret_file: Option<PathBuf> => PathBuf,
    /// Client address ranges the listeners accept (CIDR, comma-separated); default all.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    allow: Option<Vec<String>> => Vec<String>,
    /// TCP connections a download opens to each source.
    #[arg(long, value_name = "N")]
    connections_per_server: Option<u32> => u32,
    /// Seconds without a byte before a source connection is abandoned.
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64> => u64,
    /// Write download progress to disk at least this often, in seconds (default 1).
    #[arg(long, value_name = "SECS")]
    checkpoint_interval: Option<f64> => f64,
    /// ...and after at most this many new bytes (default 64M).
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    checkpoint_bytes: Option<u64> => RateValue,
    /// Continue interrupted downloads by themselves after a restart.
    #[arg(long)]
    auto_resume: bool => bool,
    /// Free space a download leaves on its file system (default: the smaller
    /// of 1G and 5 % of it).
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    min_free_space: Option<u64> => RateValue,
    /// Largest file a download may fetch (default: no limit).
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    max_download_size: Option<u64> => RateValue,
    /// Seconds a finished, failed or cancelled download stays listed.
    #[arg(long, value_name = "SECS")]
    retention: Option<u64> => u64,
    /// Threads that hash one exported file (0 = one per core).
    #[arg(long, value_name = "N")]
    hash_threads: Option<usize> => usize,
    /// Hash every file of the export directory in the background at start,
    /// so the first download of each need not wait for its identity.
    #[arg(long)]
    index_export: bool => bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9105); off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr> => std::net::SocketAddr,
    /// Labels of the per-download metrics: none (download ID and source
    /// position only) or full (also the remote path and source address,
    /// which anyone who can reach metrics_listen then reads).
    #[arg(long, value_name = "none|full")]
    metrics_labels: Option<crate::metrics::MetricsLabels> => crate::metrics::MetricsLabels,
    /// Transport of the listeners: tls (default) or plain (unencrypted, for
    /// trusted networks); `[listener.PORT] transport` overrides per listener.
    #[arg(long, value_name = "tls|plain")]
    transport: Option<crate::transport::Transport> => crate::transport::Transport,
    /// Node IDs of the clients the listeners accept (comma-separated); default any.
    #[arg(long, value_name = "NODEID,...", value_delimiter = ',')]
    allow_nodes: Option<Vec<String>> => Vec<String>,
    /// Sources whose node ID nothing pins: any (accept), tofu (accept and
    /// record in known_nodes, refuse a change), known (refuse).
    #[arg(long, value_name = "any|tofu|known")]
    node_trust: Option<crate::node::TrustMode> => crate::node::TrustMode,
    /// File of `HOST:PORT NODEID` lines (default STATE_DIR/known_nodes).
    #[arg(long, value_name = "FILE")]
    known_nodes: Option<PathBuf> => PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFileConfig {
    pub rate_limit: Option<RateValue>,
    /// `tls` or `plain`, over the global `transport`.
    pub transport: Option<crate::transport::Transport>,
    /// CIDR ranges this listener accepts, over the global `allow`.
    pub allow: Option<Vec<String>>,
}

/// A rate in the config: a number of bytes/s or a string like `"20M"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RateValue {
    Bytes(u64),
    Text(String),
}

impl RateValue {
    fn parse(&self) -> anyhow::Result<u64> {
        match self {
            RateValue::Bytes(b) => Ok(*b),
            RateValue::Text(t) => parse_rate(t).map_err(anyhow::Error::msg),
        }
    }
}

/// Effective configuration after merging.
#[derive(Debug, Clone)]
pub struct Config {
    pub export: PathBuf,
    pub listen: IpAddr,
    pub ports: Vec<u16>,
    pub rate_limit: u64,
    pub status_interval: u64,
    pub socket: PathBuf,
    pub socket_group: Option<String>,
    pub state_dir: PathBuf,
    pub download_dir: PathBuf,
    /// Where restricted callers may download to (empty: anywhere they could
    /// write themselves).
    pub download_roots: Vec<PathBuf>,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    /// New connections per second per client address (0: no limit).
    pub handshake_rate: u32,
    pub handshake_timeout: Duration,
    pub serve_idle_timeout: Duration,
    pub serve_min_rate: u64,
    pub transport: crate::transport::Transport,
    pub listener_transport: std::collections::BTreeMap<u16, crate::transport::Transport>,
    pub allow_nodes: Vec<crate::node::NodeId>,
    pub node_trust: crate::node::TrustMode,
    pub known_nodes: PathBuf,
    pub auth_secret_file: Option<PathBuf>,
    /// Address ranges listeners accept; `None` = everyone.
    pub allow: Option<Vec<ipnet::IpNet>>,
    pub listener_allow: std::collections::BTreeMap<u16, Vec<ipnet::IpNet>>,
    pub connections_per_server: u32,
    pub idle_timeout: Duration,
    pub checkpoint_interval: Duration,
    pub checkpoint_bytes: u64,
    pub auto_resume: bool,
    /// Free space a download leaves; `None`: the smaller of 1 GiB and 5 %.
    pub min_free_space: Option<u64>,
    /// Largest file a download may fetch.
    pub max_download_size: Option<u64>,
    /// How long ended downloads stay listed.
    pub retention: Duration,
    /// Threads hashing one exported file (0 = one per core).
    pub hash_threads: usize,
    /// Hash the whole export in the background at start.
    pub index_export: bool,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Whether the metrics carry download paths and source addresses.
    pub metrics_labels: crate::metrics::MetricsLabels,
    /// Where each setting came from: key → "default", "config file" or "flag".
    pub origins: std::collections::BTreeMap<&'static str, &'static str>,
    /// Rate limits of individual listeners, over `rate_limit`.
    pub listener_limits: std::collections::BTreeMap<u16, u64>,
    /// Per-user quotas and control-socket limits (`[quota]`).
    pub quota: crate::quota::Quota,
    pub config_file: Option<PathBuf>,
}

pub const DEFAULT_BASE_PORT: u16 = 5001;
pub const DEFAULT_SERVERS: u16 = 4;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// Two connections per source: measured on loopback, the second connection
/// hides the request round trip between pipelined reads on fast links; more
/// brings nothing but sockets.
/// 0: adapt the number of connections per source (see the download engine).
pub const DEFAULT_CONNECTIONS_PER_SERVER: u32 = 0;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 10;
/// Ended downloads stay listed for an hour.
pub const DEFAULT_RETENTION_SECS: u64 = 3600;
/// New connections per second per client address: far above a client's
/// (a download keeps at most 16 per source), far below a handshake flood.
pub const DEFAULT_HANDSHAKE_RATE: u32 = 32;

/// Default config file location.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(d) = env_dir("CONFIGURATION_DIRECTORY") {
        return Some(d.join("mftd.toml"));
    }
    if system_mode() {
        return Some(PathBuf::from("/etc/mftd/mftd.toml"));
    }
    project_dirs().map(|p| p.config_dir().join("mftd.toml"))
}

fn default_state_dir() -> PathBuf {
    if let Some(d) = env_dir("STATE_DIRECTORY") {
        return d;
    }
    if system_mode() {
        return PathBuf::from("/var/lib/mftd");
    }
    project_dirs()
        .map(|p| p.state_dir().unwrap_or(p.data_local_dir()).to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".mftd-state"))
}

fn default_export_dir(state: &Path) -> PathBuf {
    if system_mode() || std::env::var_os("STATE_DIRECTORY").is_some() {
        return state.join("export");
    }
    project_dirs().map(|p| p.data_dir().join("export")).unwrap_or_else(|| state.join("export"))
}

fn default_download_dir(state: &Path) -> PathBuf {
    if system_mode() || std::env::var_os("STATE_DIRECTORY").is_some() {
        return state.join("downloads");
    }
    directories::UserDirs::new()
        .and_then(|u| u.download_dir().map(Path::to_path_buf))
        .unwrap_or_else(|| state.join("downloads"))
}

impl Config {
    /// Merges flags over the config file over defaults.
    pub fn load(args: &Args) -> anyhow::Result<Config> {
        let (file, config_file) = match &args.config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("cannot read config file {}", p.display()))?;
                (parse_file(&text, p)?, Some(p.clone()))
            }
            None => match default_config_path() {
                Some(p) if p.exists() => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read config file {}", p.display()))?;
                    (parse_file(&text, &p)?, Some(p))
                }
                _ => (FileConfig::default(), None),
            },
        };
        Config::merge(args, file, config_file)
    }

    pub fn merge(args: &Args, mut file: FileConfig, config_file: Option<PathBuf>) -> anyhow::Result<Config> {
        let origins = origins(args, &file);
        let ports = ports(args, &file)?;
        let state_dir = args.state_dir.clone().or(file.state_dir).unwrap_or_else(default_state_dir);
        let export = args.export.clone().or(file.export).unwrap_or_else(|| default_export_dir(&state_dir));
        let download_dir =
            args.download_dir.clone().or(file.download_dir).unwrap_or_else(|| default_download_dir(&state_dir));
        let socket = args.socket.clone().or(file.socket).unwrap_or_else(default_socket_path);
        let listen = args.listen.or(file.listen).unwrap_or(IpAddr::from([127, 0, 0, 1]));

        let rate_limit = match (args.rate_limit, &file.rate_limit) {
            (Some(r), _) => r,
            (None, Some(r)) => r.parse().context("invalid rate_limit in config file")?,
            (None, None) => 0,
        };
        let max_connections = args.max_connections.or(file.max_connections).unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        let connections_per_server =
            args.connections_per_server.or(file.connections_per_server).unwrap_or(DEFAULT_CONNECTIONS_PER_SERVER);
        if connections_per_server > 16 {
            bail!("connections_per_server must be between 1 and 16 (or 0 to adapt)");
        }
        let Sections { limits: listener_limits, transport: listener_transport, allow: listener_allow } =
            listener_sections(file.listener.take().unwrap_or_default(), &ports)?;
        let allow = match args.allow.as_ref().or(file.allow.as_ref()) {
            Some(a) => Some(parse_cidrs(a).context("invalid allow list")?),
            None => None,
        };
        let max_connections_per_ip = args.max_connections_per_ip.or(file.max_connections_per_ip).unwrap_or(16);
        if max_connections_per_ip == 0 {
            bail!("max_connections_per_ip must be at least 1");
        }
        let handshake_rate = args.handshake_rate.or(file.handshake_rate).unwrap_or(DEFAULT_HANDSHAKE_RATE);
        let handshake_timeout = args.handshake_timeout.or(file.handshake_timeout).unwrap_or(10).max(1);
        let serve_idle_timeout = args.serve_idle_timeout.or(file.serve_idle_timeout).unwrap_or(60).max(1);
        let cp_secs = args.checkpoint_interval.or(file.checkpoint_interval).unwrap_or(1.0);
        if !(0.01..=3600.0).contains(&cp_secs) {
            bail!("checkpoint_interval must be between 0.01 and 3600 seconds");
        }
        let checkpoint_bytes = match (args.checkpoint_bytes, &file.checkpoint_bytes) {
            (Some(b), _) => b,
            (None, Some(b)) => b.parse().context("invalid checkpoint_bytes in config file")?,
            (None, None) => 64 << 20,
        }
        .max(1);
        let size_setting = |flag: Option<u64>, file: &Option<RateValue>, key: &str| -> anyhow::Result<Option<u64>> {
            Ok(match (flag, file) {
                (Some(b), _) => Some(b),
                (None, Some(b)) => Some(b.parse().with_context(|| format!("invalid {key} in config file"))?),
                (None, None) => None,
            })
        };
        let allow_nodes = args
            .allow_nodes
            .clone()
            .or(file.allow_nodes.clone())
            .unwrap_or_default()
            .iter()
            .map(|n| crate::node::NodeId::parse(n).map_err(|e| anyhow::anyhow!("allow_nodes: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let known_nodes =
            args.known_nodes.clone().or(file.known_nodes.clone()).unwrap_or(state_dir.join("known_nodes"));
        let serve_min_rate = size_setting(args.serve_min_rate, &file.serve_min_rate, "serve_min_rate")?.unwrap_or(1024);
        let min_free_space = size_setting(args.min_free_space, &file.min_free_space, "min_free_space")?;
        let max_download_size =
            size_setting(args.max_download_size, &file.max_download_size, "max_download_size")?.filter(|m| *m > 0);
        let retention = Duration::from_secs(args.retention.or(file.retention).unwrap_or(DEFAULT_RETENTION_SECS));
        let idle = args.idle_timeout.or(file.idle_timeout).unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS);
        if idle == 0 {
            bail!("idle_timeout must be at least 1 second");
        }
        // Relative paths are taken from where mftd was started, once, so
        // messages and status always show where things really are.
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let abs = |p: PathBuf| if p.is_absolute() { p } else { cwd.join(p) };
        let (export, state_dir, download_dir, socket) = (abs(export), abs(state_dir), abs(download_dir), abs(socket));
        Ok(Config {
            export,
            listen,
            ports,
            rate_limit,
            status_interval: args.status_interval.or(file.status_interval).unwrap_or(0),
            socket,
            socket_group: args.socket_group.clone().or(file.socket_group),
            state_dir,
            download_dir,
            download_roots: args
                .download_roots
                .clone()
                .or(file.download_roots)
                .unwrap_or_default()
                .into_iter()
                .map(abs)
                .collect(),
            max_connections,
            max_connections_per_ip,
            handshake_rate,
            handshake_timeout: Duration::from_secs(handshake_timeout),
            serve_idle_timeout: Duration::from_secs(serve_idle_timeout),
            serve_min_rate,
            transport: args.transport.or(file.transport).unwrap_or(crate::transport::Transport::Tls),
            listener_transport,
            allow_nodes,
            node_trust: args.node_trust.or(file.node_trust).unwrap_or(crate::node::TrustMode::Any),
            known_nodes: abs(known_nodes),
            auth_secret_file: args.auth_secret_file.clone().or(file.auth_secret_file).map(abs),
            allow,
            listener_allow,
            connections_per_server,
            idle_timeout: Duration::from_secs(idle),
            listener_limits,
            checkpoint_interval: Duration::from_secs_f64(cp_secs),
            checkpoint_bytes,
            auto_resume: args.auto_resume || file.auto_resume.unwrap_or(false),
            hash_threads: args.hash_threads.or(file.hash_threads).unwrap_or(0),
            min_free_space,
            max_download_size,
            retention,
            index_export: args.index_export || file.index_export.unwrap_or(false),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            quota: crate::quota::Quota::from_file(file.quota.take())?,
            metrics_labels: args.metrics_labels.or(file.metrics_labels).unwrap_or_default(),
            origins,
            config_file,
        })
    }

    /// The effective configuration as TOML, each value annotated with where
    /// it came from (`--print-config`).
    pub fn describe(&self) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut lines: Vec<(&str, String)> = vec![
            ("export", q(&self.export)),
            ("listen", format!("{:?}", self.listen.to_string())),
            ("ports", format!("{:?}", self.ports)),
            ("rate_limit", self.rate_limit.to_string()),
            ("status_interval", self.status_interval.to_string()),
            ("socket", q(&self.socket)),
            ("state_dir", q(&self.state_dir)),
            ("download_dir", q(&self.download_dir)),
            (
                "download_roots",
                format!("{:?}", self.download_roots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()),
            ),
            ("max_connections", self.max_connections.to_string()),
            ("connections_per_server", self.connections_per_server.to_string()),
            ("idle_timeout", self.idle_timeout.as_secs().to_string()),
            ("checkpoint_interval", self.checkpoint_interval.as_secs_f64().to_string()),
            ("checkpoint_bytes", self.checkpoint_bytes.to_string()),
            ("auto_resume", self.auto_resume.to_string()),
            ("hash_threads", self.hash_threads.to_string()),
            ("min_free_space", self.min_free_space.map_or("\"default\"".into(), |b| b.to_string())),
            ("max_download_size", self.max_download_size.unwrap_or(0).to_string()),
            ("retention", self.retention.as_secs().to_string()),
            ("index_export", self.index_export.to_string()),
        ];
        lines.push(("max_connections_per_ip", self.max_connections_per_ip.to_string()));
        lines.push(("handshake_rate", self.handshake_rate.to_string()));
        lines.push(("handshake_timeout", self.handshake_timeout.as_secs().to_string()));
        lines.push(("serve_idle_timeout", self.serve_idle_timeout.as_secs().to_string()));
        lines.push(("serve_min_rate", self.serve_min_rate.to_string()));
        lines.push(("transport", format!("{:?}", self.transport.to_string())));
        lines
            .push(("allow_nodes", format!("{:?}", self.allow_nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>())));
        lines.push(("node_trust", format!("{:?}", self.node_trust.to_string())));
        lines.push(("known_nodes", q(&self.known_nodes)));
        if let Some(f) = &self.auth_secret_file {
            lines.push(("auth_secret_file", q(f)));
        }
        if let Some(a) = &self.allow {
            lines.push(("allow", format!("{:?}", a.iter().map(|n| n.to_string()).collect::<Vec<_>>())));
        }
        if let Some(g) = &self.socket_group {
            lines.push(("socket_group", format!("{g:?}")));
        }
        if let Some(m) = self.metrics_listen {
            lines.push(("metrics_listen", format!("{:?}", m.to_string())));
        }
        lines.push(("metrics_labels", format!("{:?}", self.metrics_labels.to_string())));
        let mut out = match &self.config_file {
            Some(p) => format!("# effective mftd configuration; config file: {}\n", p.display()),
            None => "# effective mftd configuration; no config file\n".to_string(),
        };
        for (k, v) in lines {
            out.push_str(&format!("{k} = {v}  # {}\n", self.origins.get(k).copied().unwrap_or("default")));
        }
        for (port, rate) in &self.listener_limits {
            out.push_str(&format!("\n[listener.{port}]\nrate_limit = {rate}  # config file\n"));
        }
        for (port, t) in &self.listener_transport {
            out.push_str(&format!("\n[listener.{port}]\ntransport = \"{t}\"  # config file\n"));
        }
        out.push_str("\n[quota]\n");
        for (k, v) in self.quota.describe() {
            let from =
                self.origins.iter().find(|(o, _)| o.strip_prefix("quota.") == Some(k)).map_or("default", |(_, f)| f);
            out.push_str(&format!("{k} = {v}  # {from}\n"));
        }
        out
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
pub fn parse_cidrs(list: &[String]) -> anyhow::Result<Vec<ipnet::IpNet>> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| anyhow::anyhow!("{s:?} is not an address range like 10.0.0.0/8"))
        })
        .collect()
}

/// Reads a shared secret: the file's bytes without surrounding whitespace;
/// 1 to 4096 bytes. The secret is never logged.
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
    if meta.len() > 4096 {
        bail!("secret file {} is larger than 4096 bytes", path.display());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "secret file is readable by group or others; chmod 600 it");
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read secret file {}", path.display()))?;
    let trimmed = bytes.trim_ascii().to_vec();
    if trimmed.is_empty() {
        bail!("secret file {} is empty", path.display());
    }
    if trimmed.len() < 16 {
        // A proof is an HMAC under it that a server (or a man in the
        // middle) sees: a short secret can be guessed offline.
        tracing::warn!(file = %path.display(), bytes = trimmed.len(), "shared secret is short; use at least 16 random bytes (e.g. `head -c 32 /dev/urandom | base64`)");
    }
    Ok(trimmed)
}

fn parse_file(text: &str, path: &Path) -> anyhow::Result<FileConfig> {
    toml::from_str(text).with_context(|| format!("invalid config file {}", path.display()))
}

fn consecutive(base: u16, n: u16) -> anyhow::Result<Vec<u16>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let last = base as u32 + n as u32 - 1;
    if base == 0 || last > u16::MAX as u32 {
        bail!("{n} listeners (servers) from port {base} (base_port) do not fit in the port range 1-65535");
    }
    Ok((base..=last as u16).collect())
}

/// The listener ports: an explicit list wins; a flag for count or base
/// port overrides the file's list. A port may appear once (0 any number
/// of times: each picks a free one).
fn ports(args: &Args, file: &FileConfig) -> anyhow::Result<Vec<u16>> {
    let ports = if let Some(p) = &args.ports {
        p.clone()
    } else if args.servers.is_some() || args.base_port.is_some() {
        let n = args.servers.or(file.servers).unwrap_or(DEFAULT_SERVERS);
        let base = args.base_port.or(file.base_port).unwrap_or(DEFAULT_BASE_PORT);
        consecutive(base, n)?
    } else if let Some(p) = &file.ports {
        p.clone()
    } else {
        let n = file.servers.unwrap_or(DEFAULT_SERVERS);
        let base = file.base_port.unwrap_or(DEFAULT_BASE_PORT);
        consecutive(base, n)?
    };
    let mut seen = std::collections::HashSet::new();
    for p in &ports {
        if *p != 0 && !seen.insert(*p) {
            bail!("port {p} is listed twice");
        }
    }

    Ok(ports)
}

/// The `[listener.PORT]` sections, per setting.
struct Sections {
    limits: std::collections::BTreeMap<u16, u64>,
    transport: std::collections::BTreeMap<u16, crate::transport::Transport>,
    allow: std::collections::BTreeMap<u16, Vec<ipnet::IpNet>>,
}

/// Parses the `[listener.PORT]` sections; one for a port mftd does not
/// listen on would silently do nothing (a typo, or a port dropped from
/// `ports`), so it is an error.
fn listener_sections(
    sections: std::collections::BTreeMap<String, ListenerFileConfig>,
    ports: &[u16],
) -> anyhow::Result<Sections> {
    let mut listener_limits = std::collections::BTreeMap::new();
    let mut listener_allow = std::collections::BTreeMap::new();
    let mut listener_transport = std::collections::BTreeMap::new();
    for (port, lc) in sections {
        let p: u16 =
            port.parse().ok().filter(|p| *p > 0).with_context(|| format!("[listener.{port}]: not a port number"))?;
        if let Some(r) = &lc.rate_limit {
            listener_limits.insert(p, r.parse().with_context(|| format!("invalid rate_limit in [listener.{port}]"))?);
        }
        if let Some(t) = lc.transport {
            listener_transport.insert(p, t);
        }
        if let Some(a) = &lc.allow {
            listener_allow.insert(p, parse_cidrs(a).with_context(|| format!("invalid allow in [listener.{port}]"))?);
        }
    }
    let sections: std::collections::BTreeSet<u16> =
        listener_limits.keys().chain(listener_transport.keys()).chain(listener_allow.keys()).copied().collect();
    for p in sections {
        if !ports.contains(&p) {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            bail!(
                "[listener.{p}] is for port {p}, which is not one of the listener ports ({}); add {p} to `ports` or remove the section",
                if list.is_empty() { "none".to_string() } else { list.join(", ") }
            );
        }
    }
    Ok(Sections { limits: listener_limits, transport: listener_transport, allow: listener_allow })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let file: FileConfig =
            toml::from_str("ports = [6001, 6002]\nrate_limit = \"20M\"\nexport = \"/srv/x\"\nidle_timeout = 3\n")
                .unwrap();
        let args = Args { rate_limit: Some(1024), ..Args::default() };
        let c = Config::merge(&args, file, None).unwrap();
        assert_eq!(c.ports, vec![6001, 6002]);
        assert_eq!(c.rate_limit, 1024);
        assert_eq!(c.export, PathBuf::from("/srv/x"));
        assert_eq!(c.idle_timeout, Duration::from_secs(3));
        let text = c.describe();
        assert!(text.contains("rate_limit = 1024  # flag"), "{text}");
        assert!(text.contains("ports = [6001, 6002]  # config file"), "{text}");
        assert!(text.contains("listen = \"127.0.0.1\"  # default"), "{text}");
        let file: FileConfig =
            toml::from_str("[listener.5001]\nrate_limit = \"4M\"\n[listener.5002]\nrate_limit = 0\n").unwrap();
        let c = Config::merge(&Args::default(), file, None).unwrap();
        assert_eq!(c.listener_limits.get(&5001), Some(&(4 << 20)));
        assert_eq!(c.listener_limits.get(&5002), Some(&0));
    }

    /// A config with every setting given, in the file or by flag.
    fn everything_set() -> Config {
        let file: FileConfig = toml::from_str(
            "auth_secret_file = \"/etc/mftd/secret\"\nallow = [\"10.0.0.0/8\"]\nsocket_group = \"mftd\"\nmetrics_listen = \"127.0.0.1:9105\"\n",
        )
        .unwrap();
        Config::merge(&Args::default(), file, None).unwrap()
    }

    #[test]
    fn print_config_shows_every_setting_and_where_it_came_from() {
        let text = everything_set().describe();
        for key in KEYS {
            // `servers` and `base_port` are shown as the ports they make.
            let shown = if matches!(*key, "servers" | "base_port") { "ports" } else { key };
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{shown} = ")))
                .unwrap_or_else(|| panic!("--print-config does not show {key}:\n{text}"));
            assert!(line.ends_with("# default") || line.ends_with("# config file"), "{line}");
        }
    }

    #[test]
    fn the_shipped_config_file_names_every_setting() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/mftd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        for key in KEYS {
            assert!(
                text.lines().any(|l| l.trim_start_matches('#').starts_with(&format!("{key} = "))),
                "{} does not mention {key}",
                path.display()
            );
        }
        // And it is valid with each key's first example uncommented.
        let mut seen = std::collections::HashSet::new();
        let uncommented: String = text
            .lines()
            .map(|l| {
                let key = l.strip_prefix('#').and_then(|r| KEYS.iter().find(|k| r.starts_with(&format!("{k} = "))));
                match key {
                    Some(k) if seen.insert(*k) => &l[1..],
                    _ => l,
                }
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let file: FileConfig = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert!(file.ports.is_some() && file.auth_secret_file.is_some());
    }

    #[test]
    fn the_readme_options_table_names_every_setting() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let table = text.split("### mftd options").nth(1).expect("README has an mftd options section");
        for key in KEYS {
            let flag = format!("`--{}", key.replace('_', "-"));
            assert!(
                table.lines().any(|l| l.starts_with('|') && l.contains(&flag) && l.contains(&format!("`{key}`"))),
                "the README's mftd options table has no row with {flag}` and `{key}`"
            );
        }
    }

    #[test]
    fn servers_and_base_port_make_consecutive_ports() {
        let args = Args { servers: Some(3), base_port: Some(7000), ..Args::default() };
        let c = Config::merge(&args, FileConfig::default(), None).unwrap();
        assert_eq!(c.ports, vec![7000, 7001, 7002]);
        let c = Config::merge(&Args::default(), FileConfig::default(), None).unwrap();
        assert_eq!(c.ports, vec![5001, 5002, 5003, 5004]);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<FileConfig>("ports = \"x\"").is_err());
        let args = Args { ports: Some(vec![5001, 5001]), ..Args::default() };
        assert!(Config::merge(&args, FileConfig::default(), None).is_err());
        let args = Args { servers: Some(10), base_port: Some(65530), ..Args::default() };
        assert!(Config::merge(&args, FileConfig::default(), None).is_err());
    }
}
