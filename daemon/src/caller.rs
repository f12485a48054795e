//! Who is on the other end of the control socket, and what the daemon may
//! do on their behalf.
//!
//! The daemon often has more rights than the people who use it (root, or
//! the `mftd` user whose state it keeps), so a request is never carried out
//! with the daemon's rights alone. The caller is known from the socket
//! (`SO_PEERCRED`: uid, gid, pid; `SO_PEERGROUPS`: supplementary groups, so
//! nothing is read from `/proc`, which `ProtectProc=invisible` hides).
//!
//! * Root and the daemon's own user are **unrestricted**: their requests
//!   run with the daemon's rights.
//! * Anyone else (a member of the socket group) is **restricted**: an output
//!   directory must be one they could write to themselves (search permission
//!   on every directory on the way, write and search on the last; by mode
//!   bits), inside one of `download_roots` if that is set; `--force` may
//!   replace only a file they could replace themselves (the sticky bit
//!   counts); a `--secret-file` must be a regular file they could read. When
//!   the daemon runs as root, the part file is also created, renamed into
//!   place and removed on a thread carrying the caller's file-system
//!   identity ([`as_caller`]), so the kernel checks every step (ACLs
//!   included, and a directory swapped for a symlink after the check is no
//!   way around it) and the file belongs to the caller.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Largest secret file read for a caller.
pub const MAX_SECRET: u64 = 4096;

/// The credentials of a control-socket peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub pid: i32,
}

impl Caller {
    /// The credentials of the process at the other end of `sock`.
    pub fn of(sock: &impl AsFd) -> io::Result<Caller> {
        use nix::sys::socket::{getsockopt, sockopt};
        let cred = getsockopt(sock, sockopt::PeerCredentials).map_err(io::Error::from)?;
        Ok(Caller { uid: cred.uid(), gid: cred.gid(), groups: peer_groups(sock)?, pid: cred.pid() })
    }

    /// The daemon itself (requests it makes on its own behalf).
    pub fn daemon() -> Caller {
        Caller {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            groups: nix::unistd::getgroups().map(|g| g.iter().map(|g| g.as_raw()).collect()).unwrap_or_default(),
            pid: std::process::id() as i32,
        }
    }

    /// A user known only by uid and gid (the owner recorded in a manifest):
    /// supplementary groups from the group database.
    pub fn user(uid: u32, gid: u32) -> Caller {
        let groups = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name).ok()?;
                nix::unistd::getgrouplist(&name, gid.into()).ok()
            })
            .map(|g| g.iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Caller { uid, gid, groups, pid: 0 }
    }

    /// Root and the daemon's own user act with the daemon's rights.
    pub fn unrestricted(&self) -> bool {
        self.uid == 0 || self.uid == nix::unistd::geteuid().as_raw()
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether mode bits grant `want` (4 read, 2 write, 1 search/execute)
    /// on a file with `meta` to this caller.
    pub fn may(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            (mode >> 6) & 7
        } else if self.in_group(meta.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }

    pub fn describe(&self) -> String {
        let name = nix::unistd::User::from_uid(self.uid.into()).ok().flatten().map(|u| u.name);
        match name {
            Some(n) => format!("{n} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }
}

/// Supplementary groups of a socket peer (`SO_PEERGROUPS`, Linux 4.13).
fn peer_groups(sock: &impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..4 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of writable gid_t storage.
        let r = unsafe {
            libc::getsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
    Err(io::Error::other("the peer's group list kept growing"))
}

/// Why a caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

/// Checks that `caller` may have files written into `dir` (absolute) and,
/// with `download_roots` set, that it lies inside one of them. Returns the
/// directory's canonical path.
pub fn check_output_dir(caller: &Caller, dir: &Path, roots: &[PathBuf]) -> Result<PathBuf, Denied> {
    let real =
        dir.canonicalize().map_err(|e| Denied(format!("cannot resolve output directory {}: {e}", dir.display())))?;
    if caller.unrestricted() {
        return Ok(real);
    }
    if !roots.is_empty() && !roots.iter().any(|r| r.canonicalize().is_ok_and(|r| real.starts_with(r))) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(Denied(format!(
            "permission denied: {} may download only into {} (download_roots), not {}",
            caller.describe(),
            list.join(", "),
            real.display()
        )));
    }
    // Every directory on the way must be searchable by the caller, the last
    // one writable too. The walk is over the canonical path: no symlinks.
    let mut at = PathBuf::from("/");
    let comps: Vec<Component> = real.components().collect();
    for (i, c) in comps.iter().enumerate() {
        if let Component::Normal(n) = c {
            at.push(n);
        } else if i > 0 {
            continue;
        }
        let meta =
            std::fs::symlink_metadata(&at).map_err(|e| Denied(format!("cannot inspect {}: {e}", at.display())))?;
        let last = i + 1 == comps.len();
        let want = if last { 3 } else { 1 };
        if !meta.is_dir() || !caller.may(&meta, want) {
            let what = if last { "write to" } else { "enter" };
            return Err(Denied(format!(
                "permission denied: {} cannot {what} {}, so mftd will not write there on its behalf",
                caller.describe(),
                at.display()
            )));
        }
    }
    Ok(real)
}

/// Checks, before anything else is said about `dir`, that `caller` could
/// reach it: every existing directory on the way must be searchable by it.
/// So answers such as "does not exist" or "not a directory" never describe
/// what lies behind a directory the caller may not enter.
pub fn check_reachable(caller: &Caller, dir: &Path) -> Result<(), Denied> {
    if caller.unrestricted() {
        return Ok(());
    }
    let mut at = PathBuf::from("/");
    let comps: Vec<Component> = dir.components().collect();
    for (i, c) in comps.iter().enumerate() {
        if let Component::Normal(n) = c {
            at.push(n);
        } else if i > 0 {
            continue;
        }
        if i + 1 == comps.len() {
            // The directory itself is judged by check_output_dir; a symlink
            // here would send the answers about its target instead.
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Denied(format!(
                    "{} is a symbolic link; give mftd the directory it points to",
                    at.display()
                )));
            }
            break;
        }
        let Ok(meta) = std::fs::metadata(&at) else { break };
        if meta.is_dir() && !caller.may(&meta, 1) {
            return Err(Denied(format!(
                "permission denied: {} cannot enter {}, so mftd will not write there on its behalf",
                caller.describe(),
                at.display()
            )));
        }
    }
    Ok(())
}

/// Checks that `caller` could replace (or create) `name` in `dir`, which it
/// may write to: in a sticky directory only its own files.
pub fn check_replace(caller: &Caller, dir: &Path, name: &str) -> Result<(), Denied> {
    if caller.unrestricted() {
        return Ok(());
    }
    let (Ok(dmeta), Ok(fmeta)) = (std::fs::metadata(dir), std::fs::symlink_metadata(dir.join(name))) else {
        return Ok(());
    };
    let sticky = dmeta.mode() & 0o1000 != 0;
    if sticky && fmeta.uid() != caller.uid && dmeta.uid() != caller.uid {
        return Err(Denied(format!(
            "permission denied: {} does not own {} in the sticky directory {}",
            caller.describe(),
            name,
            dir.display()
        )));
    }
    Ok(())
}

/// Reads a shared-secret file for `caller`: a regular file of at most
/// [`MAX_SECRET`] bytes that the caller could read, opened without following
/// a symlink and without blocking on a FIFO. Blocking: call it off the
/// async runtime.
pub fn read_secret(caller: &Caller, path: &Path) -> Result<Vec<u8>, Denied> {
    use std::io::Read;
    let denied = |why: String| Denied(format!("secret file {}: {why}", path.display()));
    if !path.is_absolute() {
        return Err(denied("must be an absolute path".into()));
    }
    let nofollow = |e: io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) => denied("is a symlink; give the file itself".into()),
        _ => denied(format!("cannot open: {e}")),
    };
    let mut f = if caller.unrestricted() {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(nofollow)?
    } else {
        // Walk to the file through descriptors, each directory checked for
        // the caller's search right and none reached through a symlink, so
        // the file opened is the one the caller could reach: no directory
        // swapped for a symlink between a check and the open leads mftd
        // somewhere only it may enter.
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(denied("names no file".into()));
        };
        let dir = open_dir_checked(parent, Some(caller)).map_err(|e| denied(e.to_string()))?;
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_NOCTTY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| nofollow(e.into()))?;
        // SAFETY: a new descriptor nothing else owns.
        std::fs::File::from(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    };
    let meta = f.metadata().map_err(|e| denied(format!("cannot inspect: {e}")))?;
    if !meta.is_file() {
        return Err(denied("is not a regular file".into()));
    }
    if meta.len() > MAX_SECRET {
        return Err(denied(format!("is larger than {MAX_SECRET} bytes")));
    }
    if !caller.unrestricted() && !caller.may(&meta, 4) {
        return Err(denied(format!("{} may not read it", caller.describe())));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "secret file is readable by group or others; chmod 600 it");
    }
    let mut bytes = Vec::new();
    f.by_ref().take(MAX_SECRET + 1).read_to_end(&mut bytes).map_err(|e| denied(format!("cannot read: {e}")))?;
    let trimmed = bytes.trim_ascii().to_vec();
    if trimmed.is_empty() {
        return Err(denied("is empty".into()));
    }
    Ok(trimmed)
}

/// Runs `f` with `caller`'s file-system identity when the daemon is root
/// and the caller is not: on a thread of its own whose file-system uid and
/// gid and supplementary groups are the caller's (per-thread system calls,
/// so no other thread of the daemon changes identity), which ends with `f`.
/// Otherwise runs `f` here. Files `f` creates belong to the caller.
pub fn as_caller<T: Send>(caller: Option<&Caller>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let Some(c) = caller.filter(|c| c.uid != 0 && nix::unistd::geteuid().is_root()) else { return Ok(f()) };
    std::thread::scope(|s| {
        s.spawn(|| {
            let groups: Vec<libc::gid_t> = c.groups.clone();
            // SAFETY: raw per-thread credential calls with valid arguments;
            // the glibc wrappers would change every thread of the process.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::syscall(libc::SYS_setfsgid, c.gid);
                libc::syscall(libc::SYS_setfsuid, c.uid);
                // setfs*id report the previous value, not errors: ask again.
                let (uid, gid) = (libc::syscall(libc::SYS_setfsuid, -1i32), libc::syscall(libc::SYS_setfsgid, -1i32));
                if uid as u32 != c.uid || gid as u32 != c.gid {
                    return Err(io::Error::other("cannot take on the caller's file-system identity"));
                }
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("file operation on the caller's behalf panicked"))?
    })
}

/// Opens directory `dir` (absolute, without `..`) so that no symbolic link
/// on the way is followed: each component is opened relative to the one
/// before with `O_NOFOLLOW`. What a restricted caller's download does in
/// its directory then happens in the directory that was checked, whatever
/// the caller renames or swaps for a symlink meanwhile (`O_PATH`: only
/// search permission is needed on the way).
pub fn open_dir_nofollow(dir: &Path) -> io::Result<std::os::fd::OwnedFd> {
    open_dir_checked(dir, None)
}

/// [`open_dir_nofollow`], and if `caller` is given, each directory opened
/// on the way (the last one included) must grant it search permission,
/// judged on the descriptor itself.
fn open_dir_checked(dir: &Path, caller: Option<&Caller>) -> io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    use std::os::fd::FromRawFd;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !dir.is_absolute() {
        return Err(io::Error::other(format!("{} is not an absolute path", dir.display())));
    }
    let raw = nix::fcntl::open("/", flags, Mode::empty())?;
    // SAFETY: a new descriptor nothing else owns.
    let mut fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let mut at = PathBuf::from("/");
    loop {
        if let Some(c) = caller {
            let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
            if !c.may(&meta, 1) {
                return Err(io::Error::other(format!("{} cannot enter {}", c.describe(), at.display())));
            }
        }
        let Some(comp) = dir.components().nth(at.components().count()) else { return Ok(fd) };
        match comp {
            Component::Normal(name) => {
                let raw = openat(Some(fd.as_raw_fd()), name, flags | OFlag::O_NOFOLLOW, Mode::empty()).map_err(
                    |e| match e {
                        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => io::Error::other(format!(
                            "{} leads through a symbolic link or non-directory; refusing to follow it",
                            dir.display()
                        )),
                        e => io::Error::from(e),
                    },
                )?;
                // SAFETY: as above.
                fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
                at.push(name);
            }
            _ => return Err(io::Error::other(format!("{} contains `..` or `.`", dir.display()))),
        }
    }
}

/// Where a restricted owner's destination `dest` is reached safely when the
/// daemon is not root (no per-thread identity to take on): through a
/// descriptor of its directory opened without following symlinks
/// (`/proc/self/fd/N/NAME`), so a directory the owner swaps for a symlink
/// to somewhere only mftd may write leads nowhere. Keep the descriptor
/// until the operations are done. Otherwise `dest` as it is.
pub fn pin_dir(dest: &Path, owner: Option<&Caller>) -> io::Result<(PathBuf, Option<std::os::fd::OwnedFd>)> {
    if owner.is_none() || nix::unistd::geteuid().is_root() {
        return Ok((dest.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(io::Error::other(format!("{} has no directory", dest.display())));
    };
    let fd = open_dir_nofollow(dir)?;
    let pinned = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name);
    Ok((pinned, Some(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn stranger() -> Caller {
        Caller { uid: 4242, gid: 4242, groups: vec![4243], pid: 1 }
    }

    /// Review finding: with mftd not root, a directory swapped for a
    /// symlink after the check led into mftd's own state.
    #[test]
    fn directories_are_opened_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        assert!(open_dir_nofollow(&real).is_ok());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let e = open_dir_nofollow(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(open_dir_nofollow(&link.join("below")).is_err());
        assert!(open_dir_nofollow(&real.join("..").join("real")).is_err(), "`..` accepted");
        // Through a pinned descriptor, a later swap changes nothing.
        let fd = open_dir_nofollow(&real).unwrap();
        let pinned = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join("f");
        std::fs::rename(&real, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &real).unwrap();
        std::fs::write(&pinned, b"x").unwrap();
        assert!(dir.path().join("moved/f").exists() && !elsewhere.join("f").exists());
    }

    #[test]
    fn mode_bits_decide_for_a_restricted_caller() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let c = stranger();
        assert!(c.may(&meta, 1) && c.may(&meta, 4) && !c.may(&meta, 2));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(c.may(&std::fs::metadata(&p).unwrap(), 3));
        // Group bits count through a supplementary group.
        nix::unistd::chown(&p, None, Some(4243.into())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(c.may(&std::fs::metadata(&p).unwrap(), 3));
        let other = Caller { groups: vec![], ..stranger() };
        assert!(!other.may(&std::fs::metadata(&p).unwrap(), 1));
    }

    #[test]
    fn output_dir_needs_search_on_the_way_and_write_at_the_end() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown test directories");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mine = dir.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        nix::unistd::chown(&mine, Some(4242.into()), Some(4242.into())).unwrap();
        let c = stranger();
        assert!(check_output_dir(&c, &mine, &[]).is_ok());
        // Behind a directory it cannot enter: refused although the last one is its own.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_output_dir(&c, &mine, &[]).unwrap_err();
        assert!(e.0.contains("cannot enter"), "{e:?}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Not its own: refused.
        let e = check_output_dir(&c, dir.path(), &[]).unwrap_err();
        assert!(e.0.contains("cannot write to"), "{e:?}");
        // Outside the configured roots: refused.
        let e = check_output_dir(&c, &mine, &[PathBuf::from("/nonexistent-root")]).unwrap_err();
        assert!(e.0.contains("download_roots"), "{e:?}");
        assert!(check_output_dir(&c, &mine, &[dir.path().to_path_buf()]).is_ok());
        // The daemon's own rights for the unrestricted.
        assert!(check_output_dir(&Caller::daemon(), dir.path(), &[PathBuf::from("/nonexistent")]).is_ok());
    }

    #[test]
    fn secrets_are_small_regular_files_read_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        std::fs::write(&s, "hunter2\n").unwrap();
        assert_eq!(read_secret(&Caller::daemon(), &s).unwrap(), b"hunter2");
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&s, &l).unwrap();
        assert!(read_secret(&Caller::daemon(), &l).unwrap_err().0.contains("symlink"));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 5000]).unwrap();
        assert!(read_secret(&Caller::daemon(), &big).unwrap_err().0.contains("larger than 4096"));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_secret(&Caller::daemon(), &fifo).unwrap_err().0.contains("not a regular file"));
        assert!(read_secret(&Caller::daemon(), Path::new("rel")).unwrap_err().0.contains("absolute"));
    }

    #[test]
    fn a_restricted_callers_secret_is_reached_only_through_directories_it_may_enter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::write(private.join("s"), "daemon-secret").unwrap();
        std::fs::set_permissions(private.join("s"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let c = stranger();
        // The file's own bits would let anyone read it; the directory does not.
        let e = read_secret(&c, &private.join("s")).unwrap_err().0;
        assert!(e.contains("cannot enter"), "{e}");
        // Nor does a symlink the caller points at the private directory.
        let public = dir.path().join("public");
        std::fs::create_dir(&public).unwrap();
        std::os::unix::fs::symlink(&private, public.join("via")).unwrap();
        let e = read_secret(&c, &public.join("via/s")).unwrap_err().0;
        assert!(e.contains("symbolic link"), "{e}");
        // A readable file in an open directory is read.
        std::fs::write(public.join("mine"), "caller-secret\n").unwrap();
        std::fs::set_permissions(public.join("mine"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_secret(&c, &public.join("mine")).unwrap(), b"caller-secret");
        // The daemon itself still reads through its own rights.
        assert_eq!(read_secret(&Caller::daemon(), &private.join("s")).unwrap(), b"daemon-secret");
    }

    #[test]
    fn as_caller_creates_files_as_the_caller_on_its_own_thread() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = stranger();
        // A root-only directory: the kernel refuses the caller.
        let e = as_caller(Some(&c), || std::fs::File::create(dir.path().join("x"))).unwrap();
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        // Its own directory: allowed, and the file is its own.
        let mine = dir.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        nix::unistd::chown(&mine, Some(4242.into()), Some(4242.into())).unwrap();
        as_caller(Some(&c), || std::fs::File::create(mine.join("y"))).unwrap().unwrap();
        assert_eq!(std::fs::metadata(mine.join("y")).unwrap().uid(), 4242);
        // This thread kept its identity.
        std::fs::File::create(dir.path().join("z")).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("z")).unwrap().uid(), 0);
    }
}
