//! One connection budget per source host, shared by every download of the
//! daemon.
//!
//! Servers cap connections per client address (`max_connections_per_ip`,
//! 16 by default, over all their listeners). A hundred downloads that each
//! opened their own connections into the same host would spend their time
//! being refused with `BUSY` and backing off; instead every connection to a
//! host first takes a permit from that host's budget, so the daemon as a
//! whole never opens more than [`PER_HOST`] to it and downloads wait their
//! turn in order. A connection with nothing left to do gives its permit
//! back while others wait (see the engine).
//!
//! Owns: the map from host to semaphore. Must never: hand out more permits
//! than the budget, or key two addresses of the same host apart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections the daemon opens to one source host at most, below the
/// default per-address cap of servers (16) so probes and other clients on
/// the same address still get in.
pub const PER_HOST: usize = 12;

#[derive(Debug)]
pub struct Budgets {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<HostBudget>>>,
}

/// The budget of one host.
#[derive(Debug)]
pub struct HostBudget {
    permits: Arc<Semaphore>,
    /// Connections queued for a permit right now.
    waiting: AtomicUsize,
}

impl HostBudget {
    /// Waits for a permit, in arrival order.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let p = self.permits.clone().acquire_owned().await.ok();
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        p
    }

    /// Whether connections are queued behind the budget.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets::new(PER_HOST)
    }
}

impl Budgets {
    pub fn new(per_host: usize) -> Budgets {
        Budgets { per_host: per_host.max(1), hosts: Mutex::new(HashMap::new()) }
    }

    /// The budget of the host of `source` (`HOST:PORT`, `[V6]:PORT`).
    pub fn for_source(&self, source: &str) -> Arc<HostBudget> {
        let host = host_of(source).to_ascii_lowercase();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(host)
            .or_insert_with(|| {
                Arc::new(HostBudget { permits: Arc::new(Semaphore::new(self.per_host)), waiting: AtomicUsize::new(0) })
            })
            .clone()
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

    #[tokio::test]
    async fn ports_of_one_host_share_a_budget() {
        let b = Budgets::new(3);
        let a = b.for_source("10.0.0.5:5001");
        let c = b.for_source("10.0.0.5:5002");
        assert!(Arc::ptr_eq(&a, &c));
        assert!(!Arc::ptr_eq(&a, &b.for_source("10.0.0.6:5001")));
        assert!(Arc::ptr_eq(&b.for_source("[::1]:5001"), &b.for_source("[::1]:5009")));
        let p1 = a.acquire().await.unwrap();
        let _p2 = c.acquire().await.unwrap();
        let _p3 = a.acquire().await.unwrap();
        assert!(!a.contended());
        let c2 = c.clone();
        let fourth = tokio::spawn(async move { c2.acquire().await.is_some() });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(a.contended(), "the budget is per host, not per port: the fourth waits");
        drop(p1);
        assert!(fourth.await.unwrap());
        assert!(!a.contended());
    }
}
