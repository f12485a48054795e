//! A download whose disk is full waits for space instead of failing.
//!
//! Owns the rule for when running out of space pauses a download (and when
//! it still fails), how much room the paused download needs, and how often
//! the registry looks for that room ([`SpaceWait`]). The engine decides
//! with [`wait_for`] when a run ends on an error; the registry checks the
//! waits in [`super::Downloads::sample`] and resumes through its normal
//! resume path. Must never resume a download a user paused: only a run
//! that ended with a [`SpaceWait`] carries one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;

use super::error::DownloadError;
use super::run::Download;

/// First check for space after a download paused for it; each check that
/// finds too little doubles the delay, up to [`CHECK_CAP`].
pub const CHECK_FIRST: Duration = Duration::from_secs(1);
pub const CHECK_CAP: Duration = Duration::from_secs(30);

/// Room asked for a manifest on a full state directory, at least: the new
/// manifest is written beside the old one before it replaces it.
const MANIFEST_ROOM: u64 = 64 << 10;

/// What a download paused for lack of space waits for: `needed` bytes free
/// beyond `keep_free` on the file system of `dir`.
#[derive(Debug, Clone)]
pub struct SpaceWait {
    /// A directory on the file system that is full.
    pub dir: PathBuf,
    /// Bytes the download still has to write there (the bytes still to
    /// fetch, or room for its manifest).
    pub needed: u64,
    /// Bytes `min_free_space` keeps free there (0 for the state directory).
    pub keep_free: u64,
    next: Instant,
    delay: Duration,
}

impl SpaceWait {
    fn new(dir: PathBuf, needed: u64, keep_free: u64) -> SpaceWait {
        SpaceWait { dir, needed, keep_free, next: Instant::now(), delay: CHECK_FIRST }.backed_off()
    }

    /// The sentence `downloads show` and an attached `get` give as the
    /// download's error.
    pub fn message(&self) -> String {
        format!(
            "{}{}, {} bytes needed; it continues by itself when there is room",
            mftd_common::control::DISK_FULL,
            self.dir.display(),
            self.needed
        )
    }

    /// Whether it is time to look at the free space again.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Schedules the next check: the current delay, jittered by ±25 % so
    /// downloads waiting on one disk do not look in lockstep, then doubled.
    fn backed_off(mut self) -> SpaceWait {
        let jitter = rand::thread_rng().gen_range(0.75..1.25);
        self.next = Instant::now() + self.delay.mul_f64(jitter);
        self.delay = (self.delay * 2).min(CHECK_CAP);
        self
    }

    /// Looks at the free space: `Ok` when the download fits now, else the
    /// wait with its next check scheduled.
    pub fn check(self) -> Result<(), SpaceWait> {
        match room(&self.dir) {
            Some(r) if r.available >= self.needed.saturating_add(self.keep_free) => Ok(()),
            _ => Err(self.backed_off()),
        }
    }
}

/// Free and total bytes of a file system, as an unprivileged writer sees it.
struct Room {
    available: u64,
    total: u64,
}

fn room(dir: &Path) -> Option<Room> {
    let v = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(Room {
        available: v.blocks_available().saturating_mul(v.fragment_size()),
        total: v.blocks().saturating_mul(v.fragment_size()),
    })
}

/// Bytes `min_free_space` keeps free on a file system of `total` bytes:
/// the setting, or by default the smaller of 1 GiB and 5 %. One rule for
/// creating a part file and for resuming after a full disk.
pub fn keep_free(setting: Option<u64>, total: u64) -> u64 {
    setting.unwrap_or((1u64 << 30).min(total / 20))
}

/// Whether `e` is the disk running out of space (ENOSPC, EDQUOT, or too
/// little room for the part file), and on which path.
fn full_at(e: &DownloadError) -> Option<&Path> {
    match e {
        DownloadError::Disk { path, source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) =>
        {
            Some(path)
        }
        DownloadError::NoSpace { dest, .. } => Some(dest),
        _ => None,
    }
}

/// What the download stopped by `e` waits for, or `None` if it must fail:
/// `e` is not about space, the download has no manifest to resume from
/// (`--no-resume`), or the file system could never hold what is missing
/// (even empty, beyond `min_free_space`). `remaining`: bytes still to
/// fetch. A full destination needs room for those; a full state directory
/// (the manifest could not be written) needs room for a manifest.
pub fn wait_for(e: &DownloadError, dl: &Download, remaining: u64) -> Option<SpaceWait> {
    let store = dl.store.as_ref()?;
    let path = full_at(e)?;
    // At the start, before the size is on show, the whole file is missing.
    let remaining = match e {
        DownloadError::NoSpace { size, .. } => *size,
        _ => remaining,
    };
    let dest_dir = dl.job.destination.parent()?;
    let dir = path.parent().unwrap_or(dest_dir).to_path_buf();
    let r = room(&dir)?;
    if dir.starts_with(dest_dir) && dest_dir.starts_with(&dir) {
        let keep = keep_free(dl.min_free_space, r.total);
        if remaining.saturating_add(keep) > r.total {
            return None;
        }
        Some(SpaceWait::new(dir, remaining, keep))
    } else {
        let manifest = std::fs::metadata(store.path(dl.id)).map(|m| m.len()).unwrap_or(0);
        let needed = manifest.saturating_mul(2).max(MANIFEST_ROOM);
        (needed <= r.total).then(|| SpaceWait::new(dir, needed, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_back_off_from_1_s_to_30_s_with_jitter() {
        let mut w = SpaceWait::new(PathBuf::from("/nonexistent-mftd-dir"), 1, 0);
        let mut delays = Vec::new();
        for _ in 0..8 {
            let before = Instant::now();
            let next = w.next;
            delays.push(next.saturating_duration_since(before));
            w = w.check().expect_err("no file system there: no room");
        }
        let secs: Vec<f64> = delays.iter().map(Duration::as_secs_f64).collect();
        assert!((0.7..=1.26).contains(&secs[0]), "{secs:?}");
        assert!((1.45..=2.51).contains(&secs[1]), "{secs:?}");
        assert!(secs.iter().all(|&s| s <= 30.0 * 1.25 + 0.01), "{secs:?}");
        assert!(secs[7] >= 30.0 * 0.75 - 0.01, "{secs:?}");
    }

    #[test]
    fn only_a_full_disk_waits() {
        let full = DownloadError::disk("write", "/d/f.mftpart")(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full_at(&full), Some(Path::new("/d/f.mftpart")));
        let quota = DownloadError::disk("fdatasync", "/d/f.mftpart")(std::io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(full_at(&quota).is_some());
        let other = DownloadError::disk("write", "/d/f.mftpart")(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(full_at(&other).is_none());
        assert!(full_at(&DownloadError::TooLarge { size: 2, max: 1 }).is_none());
    }

    #[test]
    fn room_is_checked_against_needed_plus_keep_free() {
        let dir = tempfile::tempdir().unwrap();
        let ok = SpaceWait::new(dir.path().to_path_buf(), 1, 0);
        assert!(ok.check().is_ok());
        let never = SpaceWait::new(dir.path().to_path_buf(), 1, u64::MAX / 2);
        assert!(never.check().is_err());
    }
}
