//! Part files: `NAME.mftpart`, where a download's bytes live until every
//! piece is verified and the file is renamed to `NAME`.
//!
//! A part file is the daemon's own. It is created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` (with the download owner's rights, see
//! [`crate::caller::as_caller`]), and its device, inode and owner go into
//! the manifest ([`ManifestPart`]). A later run continues in a part file
//! only if it is that record's file and belongs to the download's owner.
//! Anything else found at the name was not created by this download:
//!
//! * a symlink, a FIFO or another non-regular file, or a file with other
//!   names (hard links): the download is refused, as before;
//! * a file some running download holds: refused (`PartBusy`);
//! * any other regular file is moved aside to `NAME.mftpart.foreign-XXXXXXXX`
//!   (same directory, never replacing anything) and a new part file is
//!   created. If it belonged to the download's owner (a run whose manifest
//!   was lost or damaged, or is older than the record), its data is first
//!   copied into the new file, where every piece is verified again, and the
//!   moved file is removed; a file of anyone else is left aside untouched.
//!   If it cannot be moved (another user's file in a sticky directory, for
//!   a download that acts as a user), the download is refused with
//!   [`DownloadError::ForeignPart`], which says whose it is and what to do.
//!
//! So no byte is ever verified in a file someone else can write, and the
//! file renamed into place ([`rename_into_place`]) is the one verified.
//!
//! Must never: open an existing file at the part name with `O_CREAT`, write
//! to a file this download did not create, or follow a symlink.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fstatat, Mode};
use rand::Rng;
use tracing::{info, warn};

use mftd_common::manifest::ManifestPart;
use mftd_common::range::Range;

use super::error::DownloadError;
use super::run::part_path;

/// What a run asks of [`open_part`].
pub(super) struct PartRequest<'a> {
    /// The destination (possibly through a pinned directory descriptor).
    pub dest: &'a Path,
    /// The file's size: the part file is made this long.
    pub size: u64,
    /// Byte ranges the manifest claims are on disk (re-verified, never trusted).
    pub claimed: Option<Vec<Range>>,
    /// The part file the manifest says this download created.
    pub record: Option<ManifestPart>,
    /// Keep what is on disk (downloads with a manifest); else start empty.
    pub reuse: bool,
    /// Bytes to leave free on the file system (`None`: the smaller of 1 GiB and 5 %).
    pub keep_free: Option<u64>,
    /// The user the part file must belong to: the one whose rights it is written with.
    pub owner_uid: u32,
}

/// An open, locked part file of the download's own.
#[derive(Debug)]
pub(super) struct Opened {
    pub file: File,
    /// Byte ranges to re-verify before counting them.
    pub preload: Vec<Range>,
    /// What the manifest records about it from now on.
    pub record: ManifestPart,
}

/// The record of an open part file.
pub(super) fn record_of(file: &File) -> io::Result<ManifestPart> {
    let m = file.metadata()?;
    Ok(ManifestPart { dev: m.dev(), ino: m.ino(), uid: m.uid() })
}

/// Opens the part file of `req.dest`: this download's own if the record
/// says it is there, else a new one (see the module docs for what happens
/// to a file found in the way).
pub(super) fn open_part(req: PartRequest<'_>) -> Result<Opened, DownloadError> {
    let part = part_path(req.dest);
    let dir = Dir::of(&part)?;
    let found = match fstatat(Some(dir.raw()), dir.name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Some(st),
        Err(nix::errno::Errno::ENOENT) => None,
        Err(e) => return Err(DownloadError::disk("inspect", &part)(e.into())),
    };
    let Some(st) = found else {
        if req.claimed.as_ref().is_some_and(|c| !c.is_empty()) {
            warn!(part = %part.display(), "partial file is missing; starting over");
        }
        return Ok(Opened { preload: Vec::new(), ..create(&dir, &part, req.dest, req.size, req.keep_free)? });
    };
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Err(DownloadError::Symlink(part));
    }
    if kind != libc::S_IFREG {
        return Err(DownloadError::disk("open", &part)(io::Error::other("not a regular file")));
    }
    if st.st_nlink != 1 {
        return Err(DownloadError::disk("open", &part)(io::Error::other(
            "it has other names (hard links); remove it and start again",
        )));
    }
    let seen = ManifestPart { dev: st.st_dev, ino: st.st_ino, uid: st.st_uid };
    if req.reuse && req.record == Some(seen) && seen.uid == req.owner_uid {
        if let Some(opened) = continue_own(&dir, &part, &req, seen)? {
            return Ok(opened);
        }
    }
    // Not this download's: never written to. A run holding it (this
    // download's previous run letting go, or another download) is waited
    // for or refused by the caller.
    let held = dir.open_read().ok();
    if held.as_ref().is_some_and(locked_by_other) {
        return Err(DownloadError::PartBusy(part));
    }
    let aside = move_aside(&dir, &part, seen)?;
    let opened = create(&dir, &part, req.dest, req.size, req.keep_free)?;
    // The owner's own leftovers are worth their data (verified again in
    // the new file); anyone else's file is left alone where it was moved.
    let own = seen.uid == req.owner_uid;
    let mut preload = Vec::new();
    if own && req.reuse {
        if let Some(from) = held.filter(|f| record_of(f).is_ok_and(|r| r == seen)) {
            preload = copy_data(&from, &opened.file, req.size).map_err(DownloadError::disk("copy", &aside))?;
            info!(part = %part.display(), bytes = preload.iter().map(|r| r.len()).sum::<u64>(),
                "found a partial file this download has no record of; re-verifying what it holds in a new one");
        }
    }
    if own {
        let _ = nix::unistd::unlinkat(
            Some(dir.raw()),
            aside.file_name().unwrap_or_default(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    } else {
        warn!(part = %part.display(), aside = %aside.display(), uid = seen.uid,
            "a partial file of another user was in the way; moved it aside and started a new one");
    }
    Ok(Opened { preload, ..opened })
}

/// The directory a part file is in, open, and the part file's name in it.
struct Dir {
    fd: OwnedFd,
    name: String,
}

impl Dir {
    fn of(part: &Path) -> Result<Dir, DownloadError> {
        let (Some(dir), Some(name)) = (part.parent(), part.file_name().and_then(|n| n.to_str())) else {
            return Err(DownloadError::disk("open", part)(io::Error::other("no directory or not UTF-8")));
        };
        // O_PATH: only search permission is needed, as for the path itself.
        let fd = nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| DownloadError::disk("open", dir)(e.into()))?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        Ok(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) }, name: name.to_string() })
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn open(&self, name: &str, flags: OFlag, mode: u32) -> io::Result<File> {
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(Some(self.raw()), name, flags, Mode::from_bits_truncate(mode))?;
        // SAFETY: `openat` returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The file at the part name, read-only and without `O_CREAT`.
    fn open_read(&self) -> io::Result<File> {
        self.open(&self.name, OFlag::O_RDONLY, 0)
    }
}

/// Opens this download's own part file to continue in it; `None` if what
/// is at the name changed since it was looked at.
fn continue_own(
    dir: &Dir,
    part: &Path,
    req: &PartRequest<'_>,
    seen: ManifestPart,
) -> Result<Option<Opened>, DownloadError> {
    let file = dir.open(&dir.name, OFlag::O_RDWR, 0).map_err(DownloadError::disk("open", part))?;
    if record_of(&file).ok() != Some(seen) {
        return Ok(None);
    }
    check_own_file(&file, part)?;
    lock_part(&file, part)?;
    let len = file.metadata().map_err(DownloadError::disk("inspect", part))?.len();
    let size = req.size;
    let preload = match req.claimed.clone() {
        Some(r) if len == size => r,
        Some(_) => {
            warn!(part = %part.display(), len, size, "partial file does not match its manifest; re-verifying what it holds");
            data_ranges(&file, len.min(size))
        }
        None => data_ranges(&file, len.min(size)),
    };
    if len != size {
        file.set_len(size).map_err(DownloadError::disk("size", part))?;
    }
    Ok(Some(Opened { file, preload, record: seen }))
}

/// Renames what is at the part name (`seen`) to a new name beside it,
/// never replacing anything. Refused when the directory does not allow it.
fn move_aside(dir: &Dir, part: &Path, seen: ManifestPart) -> Result<PathBuf, DownloadError> {
    for _ in 0..8 {
        let aside = format!("{}.foreign-{:08x}", dir.name, rand::thread_rng().gen::<u32>());
        match renameat2(
            Some(dir.raw()),
            dir.name.as_str(),
            Some(dir.raw()),
            aside.as_str(),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(part.with_file_name(aside)),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e @ (nix::errno::Errno::EPERM | nix::errno::Errno::EACCES)) => {
                return Err(DownloadError::ForeignPart { path: part.to_path_buf(), uid: seen.uid, why: e.desc() })
            }
            Err(e) => return Err(DownloadError::disk("move aside", part)(e.into())),
        }
    }
    Err(DownloadError::disk("move aside", part)(io::Error::other("no free name")))
}

/// Whether another open file description holds `file`'s lock.
fn locked_by_other(file: &File) -> bool {
    #[allow(deprecated)] // nix's Flock wrapper would take ownership of the File.
    let r = nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockSharedNonblock);
    matches!(r, Err(nix::errno::Errno::EWOULDBLOCK))
}

/// Copies the data extents of the first `size` bytes of `from` into `to`
/// at the same offsets; returns them (to be verified again).
fn copy_data(from: &File, to: &File, size: u64) -> io::Result<Vec<Range>> {
    let len = from.metadata()?.len().min(size);
    let ranges = data_ranges(from, len);
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = Vec::new();
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = ((r.end - at) as usize).min(buf.len());
            let got = from.read_at(&mut buf[..n], at)?;
            if got == 0 {
                break;
            }
            to.write_all_at(&buf[..got], at)?;
            at += got as u64;
        }
        if at > r.start {
            copied.push(Range::new(r.start, at));
        }
    }
    Ok(copied)
}

/// The parts of the first `len` bytes of `file` that hold data: a part file
/// is created sparse at its full size, so its holes are what was never
/// written (SEEK_DATA/SEEK_HOLE). Where the file system cannot tell, all of
/// it.
pub(super) fn data_ranges(file: &File, len: u64) -> Vec<Range> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    // Bounded: each turn moves past one extent.
    for _ in 0..1_000_000 {
        if pos >= len {
            return out;
        }
        let start = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => return out, // only a hole is left
            Err(_) => return vec![Range::new(0, len)],
        };
        if start >= len {
            return out;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(_) => return vec![Range::new(0, len)],
        };
        if end <= start {
            return vec![Range::new(0, len)];
        }
        out.push(Range::new(start, end));
        pos = end;
    }
    vec![Range::new(0, len)]
}

/// Creates `NAME.mftpart` with `O_EXCL` at the file's size, locked.
/// `keep_free`: bytes to leave free on the file system (`None`: see
/// [`super::space::keep_free`]), so no source can make mftd fill a disk.
fn create(dir: &Dir, part: &Path, dest: &Path, size: u64, keep_free: Option<u64>) -> Result<Opened, DownloadError> {
    let file = dir.open(&dir.name, OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL, 0o644).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ELOOP) => DownloadError::Symlink(part.to_path_buf()),
            // Planted between the look and the create: never opened.
            Some(libc::EEXIST) => DownloadError::PartReplaced(part.to_path_buf()),
            _ => DownloadError::disk("create", part)(e),
        }
    })?;
    let remove = || {
        let _ = nix::unistd::unlinkat(Some(dir.raw()), dir.name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    };
    check_own_file(&file, part)?;
    lock_part(&file, part)?;
    if let Ok(v) = nix::sys::statvfs::fstatvfs(&file) {
        let avail = v.blocks_available().saturating_mul(v.fragment_size());
        let total = v.blocks().saturating_mul(v.fragment_size());
        let keep = super::space::keep_free(keep_free, total);
        if size.saturating_add(keep) > avail {
            remove();
            let detail = format!(", {avail} bytes available, {keep} kept free (min_free_space)");
            return Err(DownloadError::NoSpace { dest: dest.to_path_buf(), size, detail });
        }
    }
    // On tmpfs, fallocate zeroes every page up front (0.37 s per GiB
    // measured here) for memory the writes fill anyway: check the free
    // space instead and let the file grow sparse.
    if size > 0 && on_tmpfs(&file) {
        file.set_len(size).map_err(DownloadError::disk("size", part))?;
    } else if size > 0 {
        match nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, size as i64) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOSPC) => {
                remove();
                return Err(DownloadError::NoSpace { dest: dest.to_path_buf(), size, detail: String::new() });
            }
            Err(_) => file.set_len(size).map_err(DownloadError::disk("size", part))?,
        }
    }
    let record = record_of(&file).map_err(DownloadError::disk("inspect", part))?;
    crate::failpoint::hit("part-created");
    Ok(Opened { file, preload: Vec::new(), record })
}

/// A part file must be a regular file with no other name: a hard link
/// someone made to another file mftd may write (its manifest key, say) is
/// never written through.
fn check_own_file(file: &File, part: &Path) -> Result<(), DownloadError> {
    let meta = file.metadata().map_err(DownloadError::disk("inspect", part))?;
    if !meta.is_file() {
        return Err(DownloadError::disk("open", part)(io::Error::other("not a regular file")));
    }
    if meta.nlink() != 1 {
        return Err(DownloadError::disk("open", part)(io::Error::other(
            "it has other names (hard links); remove it and start again",
        )));
    }
    Ok(())
}

fn on_tmpfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Takes an exclusive lock on a part file for as long as the file stays
/// open, so two downloads can never write (or truncate) the same one.
fn lock_part(file: &File, part: &Path) -> Result<(), DownloadError> {
    #[allow(deprecated)] // nix's Flock wrapper would take ownership of the File.
    let r = nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock);
    match r {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EWOULDBLOCK) => Err(DownloadError::PartBusy(part.to_path_buf())),
        Err(e) => Err(DownloadError::disk("lock", part)(e.into())),
    }
}

/// Whether some running download holds the lock on `part`.
pub fn part_in_use(part: &Path) -> bool {
    let Ok(dir) = Dir::of(part) else { return false };
    // O_NONBLOCK: a FIFO planted at the part file's name must not hang us.
    let Ok(f) = dir.open_read() else { return false };
    f.metadata().is_ok_and(|m| m.is_file()) && locked_by_other(&f)
}

/// Removes the part file at `part` if it is the one `record` describes (a
/// file someone else put there stays). Without a record, only a file of
/// `owner_uid` is removed.
pub(super) fn remove_own(part: &Path, record: Option<ManifestPart>, owner_uid: u32) {
    let Ok(dir) = Dir::of(part) else { return };
    let Ok(st) = fstatat(Some(dir.raw()), dir.name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else { return };
    let seen = ManifestPart { dev: st.st_dev, ino: st.st_ino, uid: st.st_uid };
    let ours = match record {
        Some(r) => r == seen,
        None => seen.uid == owner_uid && st.st_mode & libc::S_IFMT == libc::S_IFREG,
    };
    if ours {
        let _ = nix::unistd::unlinkat(Some(dir.raw()), dir.name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
}

/// Renames the verified part file to its final name through one descriptor
/// of the directory, after checking that the part file there is still the
/// one that was verified (`verified`, the open file): a part file swapped
/// for another, or a directory swapped for a symlink, is never renamed into
/// place. Then fsyncs the directory.
pub(super) fn rename_into_place(verified: &File, part: &Path, dest: &Path, force: bool) -> Result<(), DownloadError> {
    let (Some(dir), Some(part_name), Some(dest_name)) = (dest.parent(), part.file_name(), dest.file_name()) else {
        return Err(DownloadError::NotVerified(part.to_path_buf()));
    };
    let dirfd = nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| DownloadError::disk("open", dir)(e.into()))?;
    // SAFETY: `open` returned a new descriptor that nothing else owns.
    let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
    let raw = dirfd.as_raw_fd();
    let there = fstatat(Some(raw), part_name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| DownloadError::disk("inspect", part)(e.into()))?;
    let ours = verified.metadata().map_err(DownloadError::disk("inspect", part))?;
    if there.st_dev != ours.dev() || there.st_ino != ours.ino() {
        return Err(DownloadError::PartReplaced(part.to_path_buf()));
    }
    renameat2(
        Some(raw),
        part_name,
        Some(raw),
        dest_name,
        if force { RenameFlags::empty() } else { RenameFlags::RENAME_NOREPLACE },
    )
    .map_err(|e| match e {
        nix::errno::Errno::EEXIST => DownloadError::DestinationAppeared(dest.to_path_buf()),
        e => DownloadError::disk("rename to its final name", part)(e.into()),
    })?;
    crate::failpoint::hit("finish-renamed");
    nix::unistd::fsync(raw).map_err(|e| DownloadError::disk("fsync", dir)(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn req(dest: &Path, size: u64, record: Option<ManifestPart>, reuse: bool) -> PartRequest<'_> {
        PartRequest { dest, size, claimed: None, record, reuse, keep_free: Some(0), owner_uid: me() }
    }

    #[test]
    fn only_the_written_parts_of_a_sparse_part_file_are_re_verified() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("p"))
            .unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 4 << 20).unwrap();
        f.write_all_at(&vec![9u8; 1 << 20], 10 << 20).unwrap();
        f.sync_all().unwrap();
        let r = data_ranges(&f, 16 << 20);
        let covered: u64 = r.iter().map(|r| r.len()).sum();
        // The written 2 MiB, at block granularity (every file system Linux
        // offers for /tmp answers SEEK_DATA/SEEK_HOLE).
        assert!((2 << 20..(2 << 20) + (256 << 10)).contains(&covered), "{r:?}");
        assert!(r.iter().any(|x| x.start <= 4 << 20 && x.end >= 5 << 20), "{r:?}");
        assert!(r.iter().any(|x| x.start <= 10 << 20 && x.end >= 11 << 20), "{r:?}");
        assert_eq!(data_ranges(&f, 0), vec![]);
    }

    /// A hard link planted at the part file's name is never written
    /// through, nor moved.
    #[test]
    fn a_hard_link_at_the_part_file_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("precious");
        std::fs::write(&precious, b"keep me").unwrap();
        let dest = dir.path().join("f");
        std::fs::hard_link(&precious, part_path(&dest)).unwrap();
        assert!(open_part(req(&dest, 10, None, true)).is_err());
        assert!(open_part(req(&dest, 10, None, false)).is_err());
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    }

    /// A FIFO planted at the part file's name hangs nothing and is refused.
    #[test]
    fn a_fifo_at_the_part_file_neither_hangs_nor_counts() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        nix::unistd::mkfifo(&part_path(&dest), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let t = std::time::Instant::now();
        assert!(!part_in_use(&part_path(&dest)));
        assert!(open_part(req(&dest, 10, None, true)).is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn only_the_verified_part_file_is_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        let verified = open_part(req(&dest, 10, None, false)).unwrap().file;
        // Someone swaps the part file for their own.
        std::fs::remove_file(part_path(&dest)).unwrap();
        std::fs::write(part_path(&dest), b"planted!!!").unwrap();
        let err = rename_into_place(&verified, &part_path(&dest), &dest, false).unwrap_err();
        assert!(matches!(err, DownloadError::PartReplaced(_)), "{err}");
        assert!(!dest.exists());
        // The real one goes in place.
        std::fs::remove_file(part_path(&dest)).unwrap();
        let verified = open_part(req(&dest, 10, None, false)).unwrap().file;
        rename_into_place(&verified, &part_path(&dest), &dest, false).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 10);
    }

    #[test]
    fn a_part_file_is_never_shared_between_runs() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        let first = open_part(req(&dest, 1000, None, true)).unwrap();
        assert!(part_in_use(&part_path(&dest)));
        // A second run, resuming or starting over, is refused while the
        // first holds the file, and nothing gets truncated or moved.
        std::fs::write(part_path(&dest), vec![7u8; 1000]).unwrap();
        let err = open_part(req(&dest, 1000, Some(first.record), true)).unwrap_err();
        assert!(matches!(err, DownloadError::PartBusy(_)), "{err}");
        let err = open_part(req(&dest, 1000, None, false)).unwrap_err();
        assert!(err.to_string().contains("another download is already writing"), "{err}");
        assert_eq!(std::fs::read(part_path(&dest)).unwrap(), vec![7u8; 1000]);
        let record = first.record;
        drop(first);
        assert!(!part_in_use(&part_path(&dest)));
        let again =
            open_part(PartRequest { claimed: Some(vec![Range::new(0, 1000)]), ..req(&dest, 1000, Some(record), true) })
                .unwrap();
        assert_eq!(again.record, record, "its own part file is continued");
        assert_eq!(again.preload, vec![Range::new(0, 1000)]);
    }

    /// A file at the part name that this download did not create is never
    /// continued in: the owner's own is copied into a new file (and
    /// re-verified there), anyone else's is moved aside untouched.
    #[test]
    fn a_part_file_without_a_record_is_never_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        std::fs::write(part_path(&dest), vec![5u8; 1000]).unwrap();
        let old = std::fs::metadata(part_path(&dest)).unwrap().ino();
        let got = open_part(req(&dest, 1000, None, true)).unwrap();
        assert_ne!(got.record.ino, old, "adopted a file without a record");
        assert_eq!(got.preload, vec![Range::new(0, 1000)], "the owner's data is re-verified");
        let mut back = vec![0u8; 1000];
        got.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, vec![5u8; 1000]);
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, vec!["f.mftpart".to_string()], "the owner's old file is removed once copied");
        drop(got);

        // Someone else's file (as seen from a download acting for another
        // user): moved aside with its bytes, nothing copied.
        let stranger = req(&dest, 1000, None, true);
        let before = std::fs::read(part_path(&dest)).unwrap();
        let old = std::fs::metadata(part_path(&dest)).unwrap().ino();
        let got = open_part(PartRequest { owner_uid: me() + 1, ..stranger }).unwrap();
        assert!(got.preload.is_empty());
        let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".foreign-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::metadata(&aside[0]).unwrap().ino(), old);
        assert_eq!(std::fs::read(&aside[0]).unwrap(), before);

        // A record that names another file does not make this one ours.
        drop(got);
        let wrong = ManifestPart { dev: 1, ino: 1, uid: me() };
        let cur = std::fs::metadata(part_path(&dest)).unwrap().ino();
        assert_ne!(open_part(req(&dest, 1000, Some(wrong), true)).unwrap().record.ino, cur);
    }
}
