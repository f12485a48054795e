//! What the control socket lets each caller hold: connections (per user
//! and in total, with a reserve for operators) and requests being handled
//! at once (per restricted user).
//!
//! Owns: the counts of open connections by uid and the per-user request
//! semaphores. Must never: count a connection twice or forget one (a
//! [`Seat`] gives its place back when dropped), or limit an operator below
//! the total plus its reserve.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::caller::Caller;
use crate::quota::{Quota, OPERATOR_CONTROL_RESERVE};

/// Connection counts and request slots of the control socket.
#[derive(Debug)]
pub struct Limits {
    /// Connections of all callers together (restricted callers stop here;
    /// operators at `total + OPERATOR_CONTROL_RESERVE`).
    total: usize,
    per_user: usize,
    requests_per_user: usize,
    open: Mutex<Open>,
    requests: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

#[derive(Debug, Default)]
struct Open {
    all: usize,
    by_uid: HashMap<u32, usize>,
}

/// One open connection's place; given back when dropped.
#[derive(Debug)]
pub struct Seat {
    limits: Arc<Limits>,
    uid: u32,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        open.all = open.all.saturating_sub(1);
        if let Some(n) = open.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.by_uid.remove(&self.uid);
            }
        }
    }
}

impl Limits {
    /// The limits of `quota`, the total held to `fd_share` descriptors
    /// (reserve included).
    pub fn new(quota: &Quota, fd_share: usize) -> Arc<Limits> {
        let total = quota.control_connections.min(fd_share.saturating_sub(OPERATOR_CONTROL_RESERVE)).max(1);
        Arc::new(Limits {
            total,
            per_user: quota.control_connections_per_user,
            requests_per_user: quota.requests_per_user,
            open: Mutex::new(Open::default()),
            requests: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a new connection of `caller`, or why there is none (a
    /// sentence naming the limit and the setting that changes it).
    pub fn seat(self: &Arc<Self>, caller: &Caller) -> Result<Seat, String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.by_uid.get(&caller.uid).copied().unwrap_or(0);
        if caller.unrestricted() {
            let most = self.total + OPERATOR_CONTROL_RESERVE;
            if open.all >= most {
                return Err(format!(
                    "too many control connections: {} open, the most mftd takes even from root ([quota] control_connections in mftd.toml, plus {OPERATOR_CONTROL_RESERVE} kept for operators)",
                    open.all
                ));
            }
        } else {
            if mine >= self.per_user {
                return Err(format!(
                    "too many control connections from {}: {mine} open, the most one user may hold ([quota] control_connections_per_user in mftd.toml); close some",
                    caller.describe()
                ));
            }
            if open.all >= self.total {
                return Err(format!(
                    "too many control connections: {} open, the most mftd takes ([quota] control_connections in mftd.toml); try again later",
                    open.all
                ));
            }
        }
        open.all += 1;
        *open.by_uid.entry(caller.uid).or_insert(0) += 1;
        Ok(Seat { limits: self.clone(), uid: caller.uid })
    }

    /// Waits (at most `wait`) for a slot to handle a request of `caller`:
    /// `None` for an operator (never limited), `Some(permit)` for a
    /// restricted caller, `Err` with a sentence when none came in time.
    pub async fn request_slot(
        &self,
        caller: &Caller,
        wait: std::time::Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, String> {
        if caller.unrestricted() {
            return Ok(None);
        }
        let sem = {
            let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            // Users with nothing in flight are forgotten: the map holds only
            // users with requests, bounded by the connections they hold.
            map.retain(|_, s| s.available_permits() < self.requests_per_user || Arc::strong_count(s) > 1);
            map.entry(caller.uid).or_insert_with(|| Arc::new(Semaphore::new(self.requests_per_user))).clone()
        };
        match tokio::time::timeout(wait, sem.acquire_owned()).await {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(format!(
                "{} already has {} requests being handled, the most one user may ([quota] requests_per_user in mftd.toml); waited {} s for one to end",
                caller.describe(),
                self.requests_per_user,
                wait.as_secs()
            )),
        }
    }

    /// Open connections: all, and of `uid`.
    #[cfg(test)]
    fn count(&self, uid: u32) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        (open.all, open.by_uid.get(&uid).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> Caller {
        Caller { uid, gid: uid, groups: vec![], pid: 1 }
    }

    #[test]
    fn members_stop_at_their_share_and_the_total_and_operators_keep_a_reserve() {
        let q = Quota { control_connections: 5, control_connections_per_user: 3, ..Quota::default() };
        let l = Limits::new(&q, 1 << 20);
        let a: Vec<Seat> = (0..3).map(|_| l.seat(&user(1001)).unwrap()).collect();
        let e = l.seat(&user(1001)).unwrap_err();
        assert!(e.contains("control_connections_per_user") && e.contains("3 open"), "{e}");
        let b: Vec<Seat> = (0..2).map(|_| l.seat(&user(1002)).unwrap()).collect();
        let e = l.seat(&user(1003)).unwrap_err();
        assert!(e.contains("[quota] control_connections in"), "{e}");
        // Root gets in above the total, up to the reserve.
        let root = Caller { uid: 0, ..user(0) };
        let r: Vec<Seat> = (0..OPERATOR_CONTROL_RESERVE).map(|_| l.seat(&root).unwrap()).collect();
        assert!(l.seat(&root).is_err(), "even root stops at total + reserve");
        drop(r);
        drop(a);
        assert_eq!(l.count(1001), (2, 0), "dropped seats are given back");
        assert!(l.seat(&user(1001)).is_ok());
        drop(b);
    }

    #[test]
    fn the_total_fits_the_descriptor_share() {
        let l = Limits::new(&Quota::default(), 64);
        assert_eq!(l.total, 32, "1024 descriptors / 16, less the operators' reserve");
    }

    #[tokio::test]
    async fn a_members_requests_wait_for_its_own_slots_only() {
        let q = Quota { requests_per_user: 2, ..Quota::default() };
        let l = Limits::new(&q, 1 << 20);
        let wait = std::time::Duration::from_millis(50);
        let p1 = l.request_slot(&user(7), wait).await.unwrap();
        let _p2 = l.request_slot(&user(7), wait).await.unwrap();
        let e = l.request_slot(&user(7), wait).await.unwrap_err();
        assert!(e.contains("requests_per_user"), "{e}");
        assert!(l.request_slot(&user(8), wait).await.unwrap().is_some(), "another user is not held up");
        assert!(l.request_slot(&Caller { uid: 0, ..user(0) }, wait).await.unwrap().is_none());
        drop(p1);
        assert!(l.request_slot(&user(7), wait).await.is_ok());
    }
}
