//! File descriptors as a budget.
//!
//! Every connection, part file and manifest write takes a descriptor, and
//! the process has `RLIMIT_NOFILE` of them (systemd gives a service a soft
//! limit of 1024). mftd raises its soft limit to the hard one at start, then
//! splits what it has:
//!
//! * **transfer connections out** (downloads' connections to sources): at
//!   most 3/8 of the limit, daemon-wide; more wait their turn (see
//!   [`crate::download::budget`]);
//! * **connections served** by all listeners together: at most 1/4 (each
//!   listener also has its `max_connections`);
//! * **control connections**: at most 1/16 of the limit (and
//!   `[quota] control_connections`);
//! * **a reserve** of 1/8 of the limit (at least 64) for what must never
//!   fail: manifests, part files, the next download ID, accepting
//!   listeners' connections. New downloads are refused while fewer than
//!   that are free, so existing ones can always write their manifests.
//!
//! Owns: raising the limit and the shares. Must never: lower a limit, or
//! hand out more than the limit.

use std::io;

/// Descriptors counted as the reserve at least.
const MIN_RESERVE: u64 = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns
/// `(before, now)`.
pub fn raise_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    // A hard limit of "unlimited" is not something the kernel grants
    // (nr_open, usually 1M): stop at that.
    let want = hard.min(nr_open().unwrap_or(1 << 20));
    if want > soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).map_err(io::Error::from)?;
        return Ok((soft, want));
    }
    Ok((soft, soft))
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open").ok()?.trim().parse().ok()
}

/// The current soft limit.
pub fn limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(s, _)| s).unwrap_or(1024)
}

/// Descriptors open in this process right now.
pub fn in_use() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// The daemon's descriptor shares, from its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    pub limit: u64,
}

impl Shares {
    pub fn new(limit: u64) -> Shares {
        Shares { limit: limit.max(MIN_RESERVE * 2) }
    }

    /// Transfer connections out, all downloads together.
    pub fn outgoing(&self) -> usize {
        (self.limit * 3 / 8) as usize
    }

    /// Connections the listeners serve, all together.
    pub fn serving(&self) -> usize {
        (self.limit / 4) as usize
    }

    /// Control connections, all callers together (operators' reserve
    /// included).
    pub fn control(&self) -> usize {
        (self.limit / 16) as usize
    }

    /// Descriptors kept free for what must not fail.
    pub fn reserve(&self) -> u64 {
        (self.limit / 8).max(MIN_RESERVE)
    }

    /// Whether new work may start with `open` descriptors in use: `Err`
    /// names the numbers and what to do.
    pub fn room_for_new_work(&self, open: u64) -> Result<(), String> {
        if open + self.reserve() <= self.limit {
            return Ok(());
        }
        Err(format!(
            "mftd has {open} of its {} file descriptors open and keeps the last {} for the downloads it runs; \
             wait for some to finish, or raise its limit (LimitNOFILE= in mftd.service)",
            self.limit,
            self.reserve()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_never_exceed_the_limit_and_keep_a_reserve() {
        for limit in [256, 1024, 4096, 1 << 20] {
            let s = Shares::new(limit);
            let shared = s.outgoing() + s.serving() + s.control();
            assert!(shared as u64 + s.reserve() < limit, "{limit}");
            assert!(s.room_for_new_work(limit - s.reserve()).is_ok());
            let e = s.room_for_new_work(limit - s.reserve() + 1).unwrap_err();
            assert!(e.contains("LimitNOFILE"), "{e}");
        }
        assert_eq!(Shares::new(1024).outgoing(), 384);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (_, now) = raise_limit().unwrap();
        let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, now);
        assert!(soft == hard || soft == nr_open().unwrap_or(1 << 20), "soft {soft}, hard {hard}");
        assert!(in_use().unwrap() >= 3);
    }
}
