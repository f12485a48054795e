//! How many new connections one address may open a second: a token bucket
//! per address, all listeners together, checked in the accept loop before
//! any TLS work.
//!
//! Each address (an IPv6 client by its /64, as the per-address connection
//! cap counts it) may open `handshake_rate` connections a second, with a
//! burst of twice that; one over it is refused at once with a plaintext
//! `ERROR BUSY`. The default (32 a second, bursts of 64) is far above what
//! a client needs: a download opens at most 16 connections per source and
//! keeps them. A replayed ClientHello at thousands a second costs the
//! daemon its accept and close only.
//!
//! Owns: the buckets, at most [`MAX_TRACKED`] of them; addresses beyond
//! those share one bucket of the same rate. Must never: grow with the
//! number of addresses, or refuse an address that stays within its rate
//! while the map has room.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses with a bucket of their own. A bucket that has refilled is
/// the same as none, so only addresses seen in the last two seconds or so
/// (burst / rate) hold one.
pub const MAX_TRACKED: usize = 4096;

/// How often at most a full map is searched for refilled buckets.
const PRUNE_EVERY: Duration = Duration::from_millis(100);

/// One address's allowance: `tokens` new connections, as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Bucket {
        Bucket { tokens: 2.0 * rate, at: now }
    }

    /// Refills at `rate` a second up to twice `rate`, then takes one
    /// token if there is one.
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(2.0 * rate);
        self.at = now;
    }
}

/// The buckets of all addresses.
#[derive(Debug)]
pub struct HandshakeRate {
    buckets: HashMap<IpAddr, Bucket>,
    /// Shared by the addresses that found the map full.
    beyond: Option<Bucket>,
    last_prune: Option<Instant>,
    cap: usize,
}

impl Default for HandshakeRate {
    fn default() -> HandshakeRate {
        HandshakeRate::with_cap(MAX_TRACKED)
    }
}

impl HandshakeRate {
    fn with_cap(cap: usize) -> HandshakeRate {
        HandshakeRate { buckets: HashMap::new(), beyond: None, last_prune: None, cap }
    }

    /// Whether `ip` (an address key) may open one more connection at `now`
    /// under `rate` a second (0: no limit).
    pub fn admit(&mut self, ip: IpAddr, rate: u32, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let rate = f64::from(rate);
        if let Some(b) = self.buckets.get_mut(&ip) {
            return b.take(rate, now);
        }
        if self.buckets.len() >= self.cap && self.last_prune.is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY) {
            self.last_prune = Some(now);
            self.buckets.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < 2.0 * rate
            });
        }
        let bucket = if self.buckets.len() < self.cap {
            self.buckets.entry(ip).or_insert(Bucket::full(rate, now))
        } else {
            self.beyond.get_or_insert(Bucket::full(rate, now))
        };
        bucket.take(rate, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    /// How many of `n` connections at once `ip` gets through.
    fn burst(r: &mut HandshakeRate, ip: IpAddr, rate: u32, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| r.admit(ip, rate, now)).count()
    }

    #[test]
    fn an_address_gets_a_burst_of_twice_the_rate_then_the_rate() {
        let t0 = Instant::now();
        let mut r = HandshakeRate::default();
        assert_eq!(burst(&mut r, ip(1), 32, 1000, t0), 64);
        // Another address has a bucket of its own.
        assert_eq!(burst(&mut r, ip(2), 32, 10, t0), 10);
        // Half a second refills 16; a long pause refills no more than 64.
        assert_eq!(burst(&mut r, ip(1), 32, 1000, t0 + Duration::from_millis(500)), 16);
        assert_eq!(burst(&mut r, ip(1), 32, 1000, t0 + Duration::from_secs(60)), 64);
        // Over 10 s at 1,000 a second, about 32 a second get through.
        let mut admitted = 0;
        let start = t0 + Duration::from_secs(120);
        for i in 0..10_000u64 {
            admitted += usize::from(r.admit(ip(3), 32, start + Duration::from_millis(i)));
        }
        assert!((64 + 315..=64 + 321).contains(&admitted), "{admitted}");
    }

    #[test]
    fn rate_0_admits_everything() {
        let mut r = HandshakeRate::default();
        assert_eq!(burst(&mut r, ip(1), 0, 10_000, Instant::now()), 10_000);
    }

    #[test]
    fn a_spray_of_addresses_is_bounded_and_shares_one_bucket_beyond_the_cap() {
        let t0 = Instant::now();
        let mut r = HandshakeRate::with_cap(100);
        let admitted = (0..10_000).filter(|n| r.admit(ip(*n), 2, t0)).count();
        assert_eq!(r.buckets.len(), 100);
        assert_eq!(admitted, 100 + 4, "100 tracked addresses, then one shared burst of 4");
        // Once their buckets have refilled, tracked addresses make room.
        let later = t0 + Duration::from_secs(5);
        assert!(r.admit(ip(20_000), 2, later));
        assert!(r.buckets.contains_key(&ip(20_000)));
        assert!(r.buckets.len() <= 100);
    }
}
