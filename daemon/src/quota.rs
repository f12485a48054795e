//! What one user of a shared daemon may take: the `[quota]` table of the
//! config file.
//!
//! Root and mftd's own user are operators; everyone else who reaches the
//! control socket (a member of `socket_group`) is a *restricted* caller
//! (see [`crate::caller`]). Restricted callers are held to per-user quotas
//! on control connections, downloads, their sources and connections, and
//! blocking work; together they never take the slots kept for operators.
//! Operators are held only to the daemon-wide limits (and get a reserve
//! above them), so a member can never take what an operator needs.
//!
//! Owns: the quota values, their defaults, and their checks against the
//! config. Must never: apply a per-user quota to an operator, or let a
//! zero quota mean "unlimited" (zero refuses).

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

/// Control connections root and mftd's own user may open above
/// `control_connections`, so members at the total never lock them out.
pub const OPERATOR_CONTROL_RESERVE: usize = 32;
/// Download slots (of [`crate::download::MAX_RUNNING`]) only operators may
/// take: members together stop this far below the daemon's limit.
pub const OPERATOR_RUNNING_RESERVE: usize = 32;

/// `[quota]` in the config file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaFileConfig {
    pub control_connections: Option<usize>,
    pub control_connections_per_user: Option<usize>,
    pub control_idle_timeout: Option<u64>,
    pub running_per_user: Option<usize>,
    pub listed_per_user: Option<usize>,
    pub sources_per_download: Option<usize>,
    pub connections_per_source: Option<u32>,
    pub connections_per_user: Option<usize>,
    pub requests_per_user: Option<usize>,
}

impl QuotaFileConfig {
    /// The keys the file sets, as `quota.KEY` (for `--print-config`).
    pub fn given(&self) -> Vec<&'static str> {
        let keys = [
            ("quota.control_connections", self.control_connections.is_some()),
            ("quota.control_connections_per_user", self.control_connections_per_user.is_some()),
            ("quota.control_idle_timeout", self.control_idle_timeout.is_some()),
            ("quota.running_per_user", self.running_per_user.is_some()),
            ("quota.listed_per_user", self.listed_per_user.is_some()),
            ("quota.sources_per_download", self.sources_per_download.is_some()),
            ("quota.connections_per_source", self.connections_per_source.is_some()),
            ("quota.connections_per_user", self.connections_per_user.is_some()),
            ("quota.requests_per_user", self.requests_per_user.is_some()),
        ];
        keys.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect()
    }
}

/// The effective quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// Control connections open at once, all users together (operators
    /// have [`OPERATOR_CONTROL_RESERVE`] more).
    pub control_connections: usize,
    /// Control connections one restricted user may hold.
    pub control_connections_per_user: usize,
    /// A control connection with no request in flight and no `watch` is
    /// closed after this long (a half-sent request line counts as idle).
    pub control_idle_timeout: Duration,
    /// Downloads one restricted user may have running (not paused, not
    /// ended).
    pub running_per_user: usize,
    /// Downloads one restricted user may have listed and not ended
    /// (running, paused, waiting for space), failed ones whose data is
    /// kept for a retry included.
    pub listed_per_user: usize,
    /// Sources one download of a restricted user may name.
    pub sources_per_download: usize,
    /// Connections one download of a restricted user opens to a source
    /// at most (fixed or adaptive).
    pub connections_per_source: u32,
    /// Transfer connections one restricted user's downloads hold open
    /// together; more wait their turn.
    pub connections_per_user: usize,
    /// Requests of one restricted user handled at once (each may take a
    /// thread: file checks, comparing an existing file with its sources);
    /// more wait, up to [`REQUEST_WAIT`].
    pub requests_per_user: usize,
}

/// Longest a request waits for a free handler slot of its user.
pub const REQUEST_WAIT: Duration = Duration::from_secs(30);

impl Default for Quota {
    fn default() -> Quota {
        Quota {
            control_connections: 256,
            control_connections_per_user: 16,
            control_idle_timeout: Duration::from_secs(300),
            running_per_user: 16,
            listed_per_user: 64,
            sources_per_download: 16,
            connections_per_source: 4,
            connections_per_user: 64,
            requests_per_user: 4,
        }
    }
}

impl Quota {
    /// The quotas of `[quota]` over the defaults.
    pub fn from_file(f: Option<QuotaFileConfig>) -> anyhow::Result<Quota> {
        let f = f.unwrap_or_default();
        let d = Quota::default();
        let q = Quota {
            control_connections: f.control_connections.unwrap_or(d.control_connections),
            control_connections_per_user: f.control_connections_per_user.unwrap_or(d.control_connections_per_user),
            control_idle_timeout: f.control_idle_timeout.map(Duration::from_secs).unwrap_or(d.control_idle_timeout),
            running_per_user: f.running_per_user.unwrap_or(d.running_per_user),
            listed_per_user: f.listed_per_user.unwrap_or(d.listed_per_user),
            sources_per_download: f.sources_per_download.unwrap_or(d.sources_per_download),
            connections_per_source: f.connections_per_source.unwrap_or(d.connections_per_source),
            connections_per_user: f.connections_per_user.unwrap_or(d.connections_per_user),
            requests_per_user: f.requests_per_user.unwrap_or(d.requests_per_user),
        };
        if q.control_connections == 0 || q.control_connections_per_user == 0 {
            bail!("[quota] control_connections and control_connections_per_user must be at least 1");
        }
        if q.control_idle_timeout < Duration::from_secs(1) {
            bail!("[quota] control_idle_timeout must be at least 1 (seconds)");
        }
        if q.requests_per_user == 0 || q.connections_per_user == 0 || q.sources_per_download == 0 {
            bail!("[quota] requests_per_user, connections_per_user and sources_per_download must be at least 1");
        }
        if q.connections_per_source == 0 || q.connections_per_source > 16 {
            bail!("[quota] connections_per_source must be between 1 and 16");
        }
        if q.listed_per_user < q.running_per_user {
            bail!(
                "[quota] listed_per_user ({}) must be at least running_per_user ({})",
                q.listed_per_user,
                q.running_per_user
            );
        }
        Ok(q)
    }

    /// The `[quota]` table as `--print-config` shows it.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("control_connections", self.control_connections.to_string()),
            ("control_connections_per_user", self.control_connections_per_user.to_string()),
            ("control_idle_timeout", self.control_idle_timeout.as_secs().to_string()),
            ("running_per_user", self.running_per_user.to_string()),
            ("listed_per_user", self.listed_per_user.to_string()),
            ("sources_per_download", self.sources_per_download.to_string()),
            ("connections_per_source", self.connections_per_source.to_string()),
            ("connections_per_user", self.connections_per_user.to_string()),
            ("requests_per_user", self.requests_per_user.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_table_is_read_and_shown() {
        let text = "control_connections = 7\ncontrol_connections_per_user = 2\ncontrol_idle_timeout = 9\n\
                    running_per_user = 3\nlisted_per_user = 5\nsources_per_download = 4\n\
                    connections_per_source = 2\nconnections_per_user = 6\nrequests_per_user = 1\n";
        let q = Quota::from_file(Some(toml::from_str(text).unwrap())).unwrap();
        let shown: String = q.describe().iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        assert_eq!(shown, text, "describe() shows each key as read");
        assert!(toml::from_str::<QuotaFileConfig>("bogus = 1").is_err());
    }

    #[test]
    fn the_shipped_config_shows_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/mftd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let block = text.split("#[quota]\n").nth(1).expect("mftd.toml has a [quota] block");
        let table: String = block
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#')))
            .collect();
        let q = Quota::from_file(Some(toml::from_str(&table).unwrap_or_else(|e| panic!("{e}\n{table}")))).unwrap();
        assert_eq!(q, Quota::default(), "mftd.toml's [quota] block says other defaults than the code");
        assert_eq!(table.lines().count(), Quota::default().describe().len(), "every key is in mftd.toml");
    }

    #[test]
    fn zero_refuses_instead_of_meaning_unlimited() {
        for key in
            ["control_connections", "control_connections_per_user", "requests_per_user", "connections_per_source"]
        {
            let f: QuotaFileConfig = toml::from_str(&format!("{key} = 0")).unwrap();
            assert!(Quota::from_file(Some(f)).is_err(), "{key} = 0 is refused");
        }
        let f: QuotaFileConfig = toml::from_str("running_per_user = 9\nlisted_per_user = 8").unwrap();
        assert!(Quota::from_file(Some(f)).is_err());
    }
}
