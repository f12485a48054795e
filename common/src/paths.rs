//! Default locations shared by `mftd` and `mftctl`, so both agree on where
//! the control socket is without being told.
//!
//! As root (a system service): `/run/mftd/mftd.sock`, `/var/lib/mftd`,
//! `/etc/mftd/mftd.toml`; systemd's `RUNTIME_DIRECTORY`, `STATE_DIRECTORY`
//! and `CONFIGURATION_DIRECTORY` take precedence when set. As a user: the XDG
//! directories (`$XDG_RUNTIME_DIR/mftd/mftd.sock`, `~/.local/state/mftd`,
//! `~/.config/mftd/mftd.toml`). `MFTD_SOCKET` overrides the socket for both
//! programs.

use std::path::{Path, PathBuf};

/// Whether defaults are those of a system service (running as root).
pub fn system_mode() -> bool {
    nix::unistd::geteuid().is_root()
}

/// First directory of a systemd `*_DIRECTORY` variable, if set.
pub fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .and_then(|v| v.to_str().map(|s| s.split(':').next().unwrap_or("").to_string()))
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// The user's `mftd` directories (XDG: `~/.config/mftd`, `~/.local/state/mftd`, …); `None` without a home directory.
pub fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "mftd")
}

/// Where the control socket is unless configured otherwise.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MFTD_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(d) = env_dir("RUNTIME_DIRECTORY") {
        return d.join("mftd.sock");
    }
    if system_mode() {
        return PathBuf::from("/run/mftd/mftd.sock");
    }
    if let Some(r) = project_dirs().and_then(|p| p.runtime_dir().map(Path::to_path_buf)) {
        return r.join("mftd.sock");
    }
    std::env::temp_dir().join(format!("mftd-{}", nix::unistd::geteuid())).join("mftd.sock")
}

/// The socket `mftctl` talks to by default: the daemon default for this
/// user, or, for a non-root operator whose own daemon is not running, the
/// system service's `/run/mftd/mftd.sock` (usable by the `mftd` group).
pub fn client_socket_path() -> PathBuf {
    let own = default_socket_path();
    if std::env::var_os("MFTD_SOCKET").is_some() || own.exists() {
        return own;
    }
    let system = PathBuf::from("/run/mftd/mftd.sock");
    match std::fs::symlink_metadata(&system) {
        // There, or there but not for this user (not in the mftd group):
        // connecting says so, which beats "not running".
        Ok(_) => system,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => system,
        Err(_) => own,
    }
}
