//! A second local user against a root daemon: uid 65534 in the socket
//! group, played with `setpriv`, for the tests of what one user of a shared
//! mftd may do to, or show, another.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{mftctl_bin, Daemon};

/// The second user's uid, and the gid of its group (the socket group).
pub const NOBODY: u32 = 65534;

/// Why such a test cannot run here, if it cannot.
pub fn cannot_run() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to act as a second uid");
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return Some("needs setpriv (util-linux)");
    }
    if nix::unistd::Group::from_gid(NOBODY.into()).ok().flatten().is_none() {
        return Some("needs a group with gid 65534");
    }
    None
}

/// A daemon (no listeners) whose socket group is gid 65534's group, in a
/// directory uid 65534 may enter.
pub fn daemon(extra: &[&str]) -> Daemon {
    let group = nix::unistd::Group::from_gid(NOBODY.into()).ok().flatten().expect("group 65534").name;
    let mut b = Daemon::builder(0).arg("--socket-group").arg(group);
    for a in extra {
        b = b.arg(*a);
    }
    let d = b.start();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// `mftctl --socket S ARGS` as uid 65534, group 65534 only.
pub fn nobody(d: &Daemon, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", &NOBODY.to_string(), "--regid", &NOBODY.to_string(), "--clear-groups"])
        .arg(mftctl_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .env_remove("MFTD_SOCKET")
        .output()
        .expect("run setpriv")
}

/// A directory `parent/name` owned by uid/gid 65534, mode 0755.
pub fn nobodys_dir(parent: &Path, name: &str) -> PathBuf {
    let p = parent.join(name);
    std::fs::create_dir(&p).expect("mkdir");
    nix::unistd::chown(&p, Some(NOBODY.into()), Some(NOBODY.into())).expect("chown");
    p
}
