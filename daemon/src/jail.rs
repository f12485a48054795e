//! The export jail: opens files strictly beneath the export root.
//!
//! Lexical checks come first ([`mftd_common::path::normalize_remote`]). The
//! path is then resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! relative to a directory descriptor of the root, so the kernel refuses any
//! resolution that leaves the root, including through a symlink or a
//! directory swapped for one mid-request. Symlinks that stay inside the root
//! are followed. The file is first opened `O_PATH` and checked to be a regular
//! file, so opening never touches a device or blocks on a FIFO, then reopened
//! for reading and checked to be the same inode.
//!
//! Where `openat2` is unavailable (kernels before 5.6, or seccomp filters
//! that answer it with ENOSYS, as systemd's `RestrictSUIDSGID=` does because
//! it cannot inspect the flags), the same rules are enforced by walking the
//! path one component at a time from the root's descriptor with
//! `openat(O_PATH | O_NOFOLLOW)`: `..` is resolved against our own stack of
//! directory descriptors and may not climb above the root, relative symlink
//! targets are spliced into the walk (at most 40), absolute symlink targets
//! are refused, and the file is finally opened `O_NOFOLLOW` relative to its
//! directory's descriptor. `MFTD_JAIL_RESOLVER=walk` forces this resolver
//! (for tests).
//!
//! This module must never open anything for writing.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use mftd_common::path::{normalize_remote, PathError};
use mftd_common::proto::ErrorCode;

/// Why a path was refused. Escapes and permission problems look the same to
/// the peer on purpose.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("bad path: {0}")]
    BadPath(#[from] PathError),
    #[error("no such file")]
    NotFound,
    #[error("path refused")]
    Refused,
    #[error("not a regular file (a directory, device or other special file): only files can be downloaded")]
    NotRegular,
    #[error("i/o error: {0}")]
    Io(io::Error),
}

impl JailError {
    pub fn code(&self) -> ErrorCode {
        match self {
            JailError::BadPath(_) => ErrorCode::BadPath,
            JailError::NotFound => ErrorCode::NotFound,
            JailError::Refused => ErrorCode::PathRefused,
            JailError::NotRegular => ErrorCode::NotRegular,
            JailError::Io(_) => ErrorCode::Io,
        }
    }
}

fn map_errno(e: Errno) -> JailError {
    match e {
        Errno::ENOENT | Errno::ENOTDIR => JailError::NotFound,
        // EXDEV: resolution would leave the root. ELOOP: too many links or a
        // magic link. EACCES/EPERM: not ours to read.
        Errno::EXDEV | Errno::ELOOP | Errno::EACCES | Errno::EPERM => JailError::Refused,
        Errno::ENXIO | Errno::ENODEV | Errno::EISDIR => JailError::NotRegular,
        Errno::ENAMETOOLONG => JailError::BadPath(PathError::TooLong),
        other => JailError::Io(io::Error::from_raw_os_error(other as i32)),
    }
}

/// How paths are resolved beneath the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2(RESOLVE_BENEATH)`: the kernel enforces the jail.
    Openat2,
    /// Component-by-component `openat(O_NOFOLLOW)` walk.
    Walk,
}

/// Most symlinks followed while resolving one path.
const MAX_LINKS: u32 = 40;

/// An export root.
#[derive(Debug)]
pub struct Jail {
    root: OwnedFd,
    root_path: PathBuf,
    resolver: Resolver,
}

impl Jail {
    pub fn new(root_path: &Path) -> io::Result<Jail> {
        let dir = File::open(root_path)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "export path is not a directory"));
        }
        let root: OwnedFd = dir.into();
        let forced = match std::env::var("MFTD_JAIL_RESOLVER").as_deref() {
            Ok("walk") => Some(Resolver::Walk),
            Ok("openat2") => Some(Resolver::Openat2),
            _ => None,
        };
        let resolver = forced.unwrap_or_else(|| {
            let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC).resolve(ResolveFlag::RESOLVE_BENEATH);
            match openat2(root.as_raw_fd(), ".", how) {
                Ok(fd) => {
                    // SAFETY: fresh descriptor from openat2, closed right away.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    Resolver::Openat2
                }
                Err(_) => {
                    tracing::info!("openat2 is not available here; resolving export paths component by component");
                    Resolver::Walk
                }
            }
        });
        Ok(Jail { root, root_path: root_path.to_path_buf(), resolver })
    }

    /// A jail with a given resolver (tests).
    #[cfg(test)]
    pub fn with_resolver(root_path: &Path, resolver: Resolver) -> io::Result<Jail> {
        let mut j = Jail::new(root_path)?;
        j.resolver = resolver;
        Ok(j)
    }

    /// Walks `rel` from the root without following any symlink blindly.
    /// Returns the descriptor of the file's directory, the file's name in
    /// it, and the metadata of what that name is now.
    fn walk(&self, rel: &str) -> Result<(OwnedFd, String, std::fs::Metadata), JailError> {
        use std::collections::VecDeque;
        let root = self.root.try_clone().map_err(JailError::Io)?;
        let mut stack: Vec<OwnedFd> = vec![root];
        let mut queue: VecDeque<String> = rel.split('/').map(str::to_string).collect();
        let mut links = 0;
        let meaningful = |q: &VecDeque<String>| q.iter().any(|c| !c.is_empty() && c != ".");
        while let Some(comp) = queue.pop_front() {
            if comp.is_empty() || comp == "." {
                continue;
            }
            if comp == ".." {
                if stack.len() <= 1 {
                    return Err(JailError::Refused);
                }
                stack.pop();
                continue;
            }
            let Some(dir) = stack.last() else { return Err(JailError::Refused) };
            let fd = nix::fcntl::openat(
                Some(dir.as_raw_fd()),
                comp.as_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(map_errno)?;
            // SAFETY: fresh descriptor from openat.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let meta = File::from(fd.try_clone().map_err(JailError::Io)?).metadata().map_err(JailError::Io)?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Err(JailError::Refused);
                }
                let target = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), comp.as_str()).map_err(map_errno)?;
                let target = target.to_str().ok_or(JailError::Refused)?;
                if target.starts_with('/') {
                    return Err(JailError::Refused);
                }
                for (i, part) in target.split('/').enumerate() {
                    queue.insert(i, part.to_string());
                }
                continue;
            }
            if ft.is_dir() {
                if !meaningful(&queue) {
                    return Err(JailError::NotRegular);
                }
                stack.push(fd);
                continue;
            }
            if meaningful(&queue) {
                return Err(JailError::NotFound);
            }
            let dir = stack.pop().ok_or(JailError::Refused)?;
            return Ok((dir, comp, meta));
        }
        Err(JailError::NotRegular)
    }

    fn open_walk(&self, rel: &str) -> Result<(File, std::fs::Metadata), JailError> {
        let (dir, name, pmeta) = self.walk(rel)?;
        if !pmeta.file_type().is_file() {
            return Err(JailError::NotRegular);
        }
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(map_errno)?;
        // SAFETY: fresh descriptor from openat.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let meta = file.metadata().map_err(JailError::Io)?;
        if !meta.file_type().is_file() || meta.ino() != pmeta.ino() || meta.dev() != pmeta.dev() {
            return Err(JailError::Refused);
        }
        Ok((file, meta))
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    fn open_beneath(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, JailError> {
        // openat2 rejects O_PATH combined with most other flags.
        let extra = if flags.contains(OFlag::O_PATH) { OFlag::O_CLOEXEC } else { OFlag::O_CLOEXEC | OFlag::O_NOCTTY };
        let how = OpenHow::new()
            .flags(flags | extra)
            .mode(Mode::empty())
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let mut tries = 0;
        loop {
            tries += 1;
            match openat2(self.root.as_raw_fd(), rel, how) {
                // SAFETY: openat2 returned a fresh descriptor that we own.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                // openat2 can fail spuriously with EAGAIN when a rename races
                // resolution; a bounded retry is what the man page asks for.
                Err(Errno::EAGAIN) | Err(Errno::EINTR) if tries < 16 => continue,
                Err(e) => return Err(map_errno(e)),
            }
        }
    }

    /// Opens `path` (relative to the root) for reading. Returns the file and
    /// its metadata; the file is guaranteed to be a regular file beneath the
    /// root.
    pub fn open(&self, path: &str) -> Result<(File, std::fs::Metadata), JailError> {
        let rel = normalize_remote(path)?;
        if self.resolver == Resolver::Walk {
            return self.open_walk(&rel);
        }
        let probe = File::from(self.open_beneath(&rel, OFlag::O_PATH)?);
        let pmeta = probe.metadata().map_err(JailError::Io)?;
        if !pmeta.file_type().is_file() {
            return Err(JailError::NotRegular);
        }
        let file = File::from(self.open_beneath(&rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?);
        let meta = file.metadata().map_err(JailError::Io)?;
        if !meta.file_type().is_file() || meta.ino() != pmeta.ino() || meta.dev() != pmeta.dev() {
            // Swapped between the two opens: treat like any other refusal.
            return Err(JailError::Refused);
        }
        Ok((file, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup_with(resolver: Resolver) -> (tempfile::TempDir, Jail) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("export");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), b"hello").unwrap();
        std::fs::write(root.join("sub/b.txt"), b"world").unwrap();
        std::fs::write(dir.path().join("secret"), b"SENTINEL").unwrap();
        symlink("../secret", root.join("escape")).unwrap();
        symlink(dir.path(), root.join("escdir")).unwrap();
        symlink("sub/b.txt", root.join("inside")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        symlink("../a.txt", root.join("sub/up")).unwrap();
        symlink("../../secret", root.join("sub/up2")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let jail = Jail::with_resolver(&root, resolver).unwrap();
        (dir, jail)
    }

    #[test]
    fn serves_files_and_inside_symlinks() {
        for r in [Resolver::Openat2, Resolver::Walk] {
            serves(r);
        }
    }

    #[test]
    fn refuses_escapes_and_special_files() {
        for r in [Resolver::Openat2, Resolver::Walk] {
            refuses(r);
        }
    }

    fn serves(r: Resolver) {
        let (_d, j) = setup_with(r);
        assert_eq!(j.open("sub/up").unwrap().1.len(), 5, "{r:?}");
        assert_eq!(j.open("a.txt").unwrap().1.len(), 5);
        assert_eq!(j.open("sub/b.txt").unwrap().1.len(), 5);
        assert_eq!(j.open("./sub//b.txt").unwrap().1.len(), 5);
        assert_eq!(j.open("inside").unwrap().1.len(), 5);
    }

    fn refuses(r: Resolver) {
        let (_d, j) = setup_with(r);
        assert!(matches!(j.open("sub/up2"), Err(JailError::Refused)), "{r:?}");
        assert!(matches!(j.open("loop1"), Err(JailError::Refused)), "{r:?}");
        assert!(matches!(j.open("sub/deeper"), Err(JailError::NotRegular)), "{r:?}");
        assert!(matches!(j.open("escape"), Err(JailError::Refused)));
        assert!(matches!(j.open("escdir/secret"), Err(JailError::Refused)));
        assert!(matches!(j.open("../secret"), Err(JailError::BadPath(PathError::DotDot))));
        assert!(matches!(j.open("/etc/passwd"), Err(JailError::BadPath(PathError::Absolute))));
        assert!(matches!(j.open("sub"), Err(JailError::NotRegular)));
        assert!(matches!(j.open("fifo"), Err(JailError::NotRegular)));
        assert!(matches!(j.open("nope"), Err(JailError::NotFound)));
        assert!(matches!(j.open("a.txt/x"), Err(JailError::NotFound)));
    }
}
