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
    #[error("not a regular file")]
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

/// An export root.
#[derive(Debug)]
pub struct Jail {
    root: OwnedFd,
    root_path: PathBuf,
}

impl Jail {
    pub fn new(root_path: &Path) -> io::Result<Jail> {
        let dir = File::open(root_path)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "export path is not a directory"));
        }
        Ok(Jail { root: dir.into(), root_path: root_path.to_path_buf() })
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

    fn setup() -> (tempfile::TempDir, Jail) {
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
        let jail = Jail::new(&root).unwrap();
        (dir, jail)
    }

    #[test]
    fn serves_files_and_inside_symlinks() {
        let (_d, j) = setup();
        assert_eq!(j.open("a.txt").unwrap().1.len(), 5);
        assert_eq!(j.open("sub/b.txt").unwrap().1.len(), 5);
        assert_eq!(j.open("./sub//b.txt").unwrap().1.len(), 5);
        assert_eq!(j.open("inside").unwrap().1.len(), 5);
    }

    #[test]
    fn refuses_escapes_and_special_files() {
        let (_d, j) = setup();
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
