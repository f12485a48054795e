//! Admission: whether a download may start or run again, held to the
//! daemon's limits and to a restricted owner's quotas (see
//! [`crate::quota`]), and how many of a restricted user's ended downloads
//! stay listed.
//!
//! Owns: counting downloads per owner against the limits, the descriptor
//! check for new work, and the cap on sources. Must never: hold an
//! operator to a member's quota, or admit without the registry's
//! admission lock when a download is about to be added (see
//! `Downloads::register`).

use std::time::Instant;

use mftd_common::control::{DownloadState, ErrorCode};

use super::{DownloadDefaults, Downloads, Rejected, MAX_RUNNING, MAX_SOURCES};
use crate::caller::Caller;
use crate::quota::Quota;

impl DownloadDefaults {
    /// Downloads running at once: [`MAX_RUNNING`], or fewer when the
    /// descriptor limit could not hold that many (each holds a part file,
    /// a directory and its connections).
    pub fn max_running(&self) -> usize {
        MAX_RUNNING.min((self.fds.limit / 8) as usize).max(1)
    }
}

/// Most sources a download of `owner` may name, the code of a refusal and
/// the words that say why.
pub(super) fn source_cap(owner: &Caller, quota: &Quota) -> (usize, ErrorCode, String) {
    if owner.unrestricted() {
        return (MAX_SOURCES, ErrorCode::InvalidArgument, format!("a download takes at most {MAX_SOURCES}"));
    }
    let most = quota.sources_per_download.min(MAX_SOURCES);
    let why =
        format!("a download of {} takes at most {most} ([quota] sources_per_download in mftd.toml)", owner.describe());
    (most, ErrorCode::Limit, why)
}

impl Downloads {
    /// Whether `owner` may start a download (`new`) or run a listed one
    /// again: the daemon's running limit, the owner's quotas if it is
    /// restricted (restricted users together leave
    /// [`OPERATOR_RUNNING_RESERVE`] slots to operators), and room in the
    /// descriptor budget.
    pub(super) fn admit(&self, owner: &Caller, new: bool) -> Result<(), Rejected> {
        use crate::quota::OPERATOR_RUNNING_RESERVE;
        let limit = |msg: String| Err(Rejected(ErrorCode::Limit, msg));
        let most = self.defaults.max_running();
        let q = &self.defaults.quota;
        let (mut running, mut members, mut mine, mut listed) = (0, 0, 0, 0);
        for d in self.map().values() {
            let (state, member) = (d.state(), !d.job.owner.unrestricted());
            let runs = !state.is_final() && state != DownloadState::Paused;
            running += runs as usize;
            members += (runs && member) as usize;
            if d.job.owner.uid == owner.uid {
                mine += runs as usize;
                // A failed download whose data is kept for a retry holds a
                // manifest and a part file as a paused one does.
                let kept = state == DownloadState::Failed && self.store.path(d.id).exists();
                listed += (!state.is_final() || kept) as usize;
            }
        }
        if running >= most {
            return limit(format!(
                "{running} downloads are running, the most mftd runs at once; wait for some to finish"
            ));
        }
        if !owner.unrestricted() {
            let who = owner.describe();
            if mine >= q.running_per_user {
                return limit(format!(
                    "{who} has {mine} downloads running, the most one user may ([quota] running_per_user in mftd.toml); wait for some to finish or pause one"
                ));
            }
            if new && listed >= q.listed_per_user {
                return limit(format!(
                    "{who} has {listed} downloads listed and not ended (or failed with their data kept), the most one user may ([quota] listed_per_user in mftd.toml); cancel, resume or remove some"
                ));
            }
            let share = most.saturating_sub(OPERATOR_RUNNING_RESERVE);
            if members >= share {
                return limit(format!(
                    "users other than root and mftd's own have {members} downloads running, all mftd gives them (the last {OPERATOR_RUNNING_RESERVE} are kept for operators); wait for some to finish"
                ));
            }
        }
        match crate::fds::in_use() {
            Ok(open) => self.defaults.fds.room_for_new_work(open).or_else(limit),
            // Without /proc the budget's shares still hold.
            Err(_) => Ok(()),
        }
    }

    /// A restricted user's ended downloads stay listed for `retention`, and
    /// starting and cancelling one takes a few milliseconds: without a
    /// bound, one member could list hundreds of thousands within the hour
    /// (root's `status` and `downloads list` answer with all of them). So
    /// a restricted user keeps at most `listed_per_user` ended ones; the
    /// oldest make room for the next. Failed ones with data kept for a
    /// retry stay (they are the user's to resume or remove).
    pub(super) fn forget_ended_beyond_quota(&self, uid: u32) {
        let most = self.defaults.quota.listed_per_user.saturating_sub(1);
        let mut map = self.map();
        let mut ended: Vec<(Option<Instant>, u64)> = map
            .values()
            .filter(|d| d.job.owner.uid == uid && !d.job.owner.unrestricted() && d.state().is_final())
            .filter(|d| !self.store.path(d.id).exists())
            .map(|d| (d.progress().finished, d.id))
            .collect();
        if ended.len() <= most {
            return;
        }
        ended.sort();
        for (_, id) in &ended[..ended.len() - most] {
            map.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_names_at_most_its_quota_of_sources_and_an_operator_the_daemons() {
        let q = Quota { sources_per_download: 3, ..Quota::default() };
        let member = Caller { uid: 4242, gid: 4242, groups: vec![], pid: 1 };
        let (most, code, why) = source_cap(&member, &q);
        assert_eq!((most, code), (3, ErrorCode::Limit));
        assert!(why.contains("[quota] sources_per_download"), "{why}");
        let (most, code, _) = source_cap(&Caller::daemon(), &q);
        assert_eq!((most, code), (MAX_SOURCES, ErrorCode::InvalidArgument));
        // A quota above the daemon's limit does not lift it.
        let big = Quota { sources_per_download: 1000, ..Quota::default() };
        assert_eq!(source_cap(&member, &big).0, MAX_SOURCES);
    }
}
