//! Connection budgets shared by every download of the daemon: per source
//! host, per restricted user, and for the daemon as a whole.
//!
//! Servers cap connections per client address (`max_connections_per_ip`,
//! 16 by default, over all their listeners). A hundred downloads that each
//! opened their own connections into the same host would spend their time
//! being refused with `BUSY` and backing off; instead every connection to a
//! host first takes a permit from that host's budget, so the daemon as a
//! whole never opens more than [`PER_HOST`] to it and downloads wait their
//! turn in order. A host is its *resolved address*: `localhost`,
//! `127.0.0.1` and `LOCALHOST` are one host, and a name cannot buy a
//! second budget for an address it shares.
//!
//! A connection of a restricted user's download also takes a permit of
//! that user's budget (`[quota] connections_per_user`), and every
//! connection one of the daemon's (3/8 of its descriptors, see
//! [`crate::fds`]): one user naming 64 hosts that accept and stall holds
//! at most its own budget of descriptors, never the daemon's. A connection
//! with nothing left to do gives its permits back while others wait (see
//! the engine).
//!
//! Owns: the maps from host and user to semaphore. Must never: hand out
//! more permits than a budget, key two addresses of the same host apart,
//! wait on a budget while holding a later one (permits are taken in
//! one order: user, the user's share of the host, host, daemon), or keep
//! the budget of a host nobody uses any more (a member may name millions).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections the daemon opens to one source host at most, below the
/// default per-address cap of servers (16) so probes and other clients on
/// the same address still get in.
pub const PER_HOST: usize = 12;

/// Longest a host name is given to resolve for its budget.
const RESOLVE_TIME: Duration = super::client::CONNECT_TIMEOUT;

#[derive(Debug)]
pub struct Budgets {
    per_host: usize,
    per_user: usize,
    hosts: Mutex<Keyed<String>>,
    users: Mutex<HashMap<u32, Arc<Pool>>>,
    /// One restricted user's share of one host: half its budget, so a
    /// member's downloads never hold every connection to a host root
    /// also downloads from.
    user_hosts: Mutex<Keyed<(u32, String)>>,
    all: Arc<Pool>,
}

/// Budgets by a key callers choose (a host): an entry nobody holds (no
/// lane, no permit out) is the same as none, so such entries are dropped
/// whenever the map has doubled since it was last pruned.
#[derive(Debug)]
struct Keyed<K> {
    map: HashMap<K, Arc<Pool>>,
    prune_at: usize,
}

/// Entries a keyed map holds before it is first pruned.
const PRUNE_AT: usize = 256;

impl<K: std::hash::Hash + Eq> Keyed<K> {
    fn new() -> Mutex<Keyed<K>> {
        Mutex::new(Keyed { map: HashMap::new(), prune_at: PRUNE_AT })
    }

    /// The budget of `key`, made with `n` permits if there is none.
    fn get(&mut self, key: K, n: usize) -> Arc<Pool> {
        if self.map.len() >= self.prune_at && !self.map.contains_key(&key) {
            self.map.retain(|_, p| p.in_use());
            self.prune_at = (self.map.len() * 2).max(PRUNE_AT);
        }
        self.map.entry(key).or_insert_with(|| Pool::new(n)).clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// One budget: permits and who waits for them.
#[derive(Debug)]
pub struct Pool {
    permits: Arc<Semaphore>,
    /// Connections queued for a permit right now.
    waiting: AtomicUsize,
}

impl Pool {
    fn new(n: usize) -> Arc<Pool> {
        Arc::new(Pool { permits: Arc::new(Semaphore::new(n.max(1))), waiting: AtomicUsize::new(0) })
    }

    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let p = self.permits.clone().acquire_owned().await.ok();
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        p
    }

    fn contended(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Whether a lane holds this budget or a permit of it is out (only
    /// the map holds it otherwise).
    fn in_use(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) > 1 || Arc::strong_count(&self.permits) > 1
    }
}

/// The budgets one connection draws from, in the order they are taken.
#[derive(Debug, Clone)]
pub struct Lane {
    pools: Vec<Arc<Pool>>,
}

/// Permits of every budget of a [`Lane`]; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    _permits: Vec<OwnedSemaphorePermit>,
}

impl Lane {
    /// Waits for a permit of each budget, in arrival order per budget.
    pub async fn acquire(&self) -> Option<Permit> {
        let mut permits = Vec::with_capacity(self.pools.len());
        for p in &self.pools {
            permits.push(p.acquire().await?);
        }
        Some(Permit { _permits: permits })
    }

    /// Whether connections are queued behind any of its budgets.
    pub fn contended(&self) -> bool {
        self.pools.iter().any(|p| p.contended())
    }
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets::new(PER_HOST, usize::MAX >> 4, usize::MAX >> 4)
    }
}

impl Budgets {
    /// `per_host` connections to one host, `outgoing` in all, `per_user`
    /// for each restricted user.
    pub fn new(per_host: usize, outgoing: usize, per_user: usize) -> Budgets {
        Budgets {
            per_host: per_host.max(1),
            per_user: per_user.max(1),
            hosts: Keyed::new(),
            users: Mutex::new(HashMap::new()),
            user_hosts: Keyed::new(),
            all: Pool::new(outgoing.min(Semaphore::MAX_PERMITS)),
        }
    }

    /// The budgets a connection to `source` (`HOST:PORT`, `[V6]:PORT`) of
    /// a download owned by `restricted` (a restricted user's uid, `None`
    /// for an operator) draws from. The host is resolved (bounded); a name
    /// that does not resolve keys by itself.
    pub async fn lane(&self, source: &str, restricted: Option<u32>) -> Lane {
        let key = host_key(source).await;
        let mut pools = Vec::with_capacity(4);
        if let Some(uid) = restricted {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            pools.push(users.entry(uid).or_insert_with(|| Pool::new(self.per_user)).clone());
            drop(users);
            let mut shares = self.user_hosts.lock().unwrap_or_else(|p| p.into_inner());
            let share = (self.per_host / 2).max(1);
            pools.push(shares.get((uid, key.clone()), share));
        }
        {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            pools.push(hosts.get(key, self.per_host));
        }
        pools.push(self.all.clone());
        Lane { pools }
    }
}

/// The host of `source` as its budget knows it: the address it resolves
/// to (the first), or the lower-cased name without a trailing dot.
async fn host_key(source: &str) -> String {
    let host = host_of(source);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.to_canonical().to_string();
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    match tokio::time::timeout(RESOLVE_TIME, tokio::net::lookup_host((host, 0))).await {
        Ok(Ok(mut addrs)) => addrs.next().map(|a| a.ip().to_canonical().to_string()).unwrap_or(name),
        _ => name,
    }
}

/// The host part of `HOST:PORT`; the whole string if it has no port.
fn host_of(source: &str) -> &str {
    let source = source.strip_prefix("plain://").unwrap_or(source);
    let source = source.split_once('#').map_or(source, |(a, _)| a);
    let host = source.rsplit_once(':').map(|(h, _)| h).unwrap_or(source);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &Lane, b: &Lane) -> bool {
        a.pools.len() == b.pools.len() && a.pools.iter().zip(&b.pools).all(|(x, y)| Arc::ptr_eq(x, y))
    }

    #[tokio::test]
    async fn ports_of_one_host_share_a_budget() {
        let b = Budgets::new(3, 100, 100);
        let a = b.lane("10.0.0.5:5001", None).await;
        let c = b.lane("10.0.0.5:5002", None).await;
        assert!(same(&a, &c));
        assert!(!same(&a, &b.lane("10.0.0.6:5001", None).await));
        assert!(same(&b.lane("[::1]:5001", None).await, &b.lane("[::1]:5009", None).await));
        let p1 = a.acquire().await.unwrap();
        let _p2 = c.acquire().await.unwrap();
        let _p3 = a.acquire().await.unwrap();
        assert!(!a.contended());
        let c2 = c.clone();
        let fourth = tokio::spawn(async move { c2.acquire().await.is_some() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a.contended(), "the budget is per host, not per port: the fourth waits");
        drop(p1);
        assert!(fourth.await.unwrap());
        assert!(!a.contended());
    }

    #[tokio::test]
    async fn names_of_one_address_share_its_budget() {
        let b = Budgets::new(2, 100, 100);
        let by_ip = b.lane("127.0.0.1:5001", None).await;
        for name in ["localhost:5002", "LOCALHOST:5003", "plain://localhost:5004#abc", "[::ffff:127.0.0.1]:5005"] {
            let by_name = b.lane(name, None).await;
            // localhost may resolve to ::1 first on some machines; then it
            // is that address's budget, and ::1's name forms share it.
            if host_key(name).await == "127.0.0.1" {
                assert!(same(&by_ip, &by_name), "{name} keys by its address");
            } else {
                assert!(same(&b.lane("[::1]:1", None).await, &by_name), "{name} keys by its address");
            }
        }
        // A name that does not resolve keys by itself, and fails later.
        let odd = format!("{}.invalid:5001", "a".repeat(64));
        assert_eq!(host_key(&odd).await, format!("{}.invalid", "a".repeat(64)));
    }

    #[tokio::test]
    async fn a_restricted_user_waits_on_its_own_budget_and_the_daemons_is_shared() {
        let b = Budgets::new(12, 3, 2);
        let u1 = b.lane("10.0.0.1:1", Some(1000)).await;
        let u1b = b.lane("10.0.0.2:1", Some(1000)).await;
        let _a = u1.acquire().await.unwrap();
        let _b = u1b.acquire().await.unwrap();
        // The user's third connection waits, whatever host it goes to.
        let u1c = b.lane("10.0.0.3:1", Some(1000)).await;
        let t = u1c.clone();
        let third = tokio::spawn(async move { t.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "a user's budget holds its third connection");
        assert!(u1c.contended());
        // A user holds at most half of one host's budget.
        let b2 = Budgets::new(4, 100, 100);
        let m = b2.lane("10.0.0.9:1", Some(7)).await;
        let (_m1, _m2) = (m.acquire().await.unwrap(), m.acquire().await.unwrap());
        assert!(tokio::time::timeout(Duration::from_millis(50), m.acquire()).await.is_err());
        let root = b2.lane("10.0.0.9:2", None).await;
        let (_r1, _r2) = (root.acquire().await.unwrap(), root.acquire().await.unwrap());
        // An operator still gets the daemon's last permit...
        let op = b.lane("10.0.0.3:1", None).await;
        let _o = tokio::time::timeout(Duration::from_secs(1), op.acquire()).await.unwrap().unwrap();
        // ...and then the daemon's budget is spent for everyone.
        let op2 = b.lane("10.0.0.4:1", None).await;
        assert!(tokio::time::timeout(Duration::from_millis(50), op2.acquire()).await.is_err());
        third.abort();
    }

    /// A member names a new loopback address in every source of every
    /// download (16M of them in 127.0.0.0/8): each leaves an entry in
    /// `hosts` and one in `user_hosts` that nothing ever removes.
    #[tokio::test]
    async fn budgets_of_hosts_nobody_uses_are_forgotten() {
        let b = Budgets::new(12, 1000, 64);
        for n in 0..10_000u32 {
            let lane = b.lane(&format!("127.{}.{}.{}:1", 1 + (n >> 16), (n >> 8) & 255, n & 255), Some(65534)).await;
            drop(lane.acquire().await);
        }
        let hosts = b.hosts.lock().unwrap().len();
        let shares = b.user_hosts.lock().unwrap().len();
        assert!(
            hosts <= 1024 && shares <= 1024,
            "{hosts} host budgets and {shares} user shares kept for lanes long gone"
        );
        // A budget still held (a lane, or only a permit) is never dropped:
        // its next lane shares it.
        let held = b.lane("10.9.9.9:1", None).await;
        let permit = held.acquire().await.unwrap();
        drop(held);
        for n in 0..2_000u32 {
            drop(b.lane(&format!("127.200.{}.{}:1", n >> 8, n & 255), None).await);
        }
        let again = b.lane("10.9.9.9:2", None).await;
        assert_eq!(Arc::strong_count(&again.pools[0].permits), 2, "a budget with a permit out was dropped");
        assert_eq!(again.pools[0].permits.available_permits(), 11);
        drop(permit);
    }
}
