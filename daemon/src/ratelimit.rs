//! Token-bucket bandwidth limiter shared by all connections of a listener.
//!
//! Senders debit what they are about to send, possibly driving the bucket
//! negative, and sleep until the debt is paid. Because the debt carries over,
//! the long-run average equals the configured rate regardless of chunk sizes
//! or how many connections share the bucket; the bucket holds at most
//! [`BURST`] worth of credit so an idle listener cannot burst far above it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Credit an idle bucket may accumulate, as time at the configured rate.
const BURST: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct RateLimiter {
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter { rate: AtomicU64::new(rate), bucket: Mutex::new(Bucket { tokens: 0.0, last: Instant::now() }) }
    }

    /// Bytes per second, 0 for unlimited.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        if let Ok(mut b) = self.bucket.lock() {
            b.tokens = 0.0;
            b.last = Instant::now();
        }
    }

    /// A good chunk size for one send under the current rate: about 20 ms
    /// worth, between 16 KiB and 1 MiB.
    pub fn chunk(&self) -> u64 {
        match self.rate() {
            0 => 1 << 20,
            r => (r / 50).clamp(16 << 10, 1 << 20),
        }
    }

    /// Debits `n` bytes and returns how long to wait before sending them.
    pub fn debit(&self, n: u64) -> Duration {
        let rate = self.rate();
        if rate == 0 {
            return Duration::ZERO;
        }
        let Ok(mut b) = self.bucket.lock() else { return Duration::ZERO };
        let now = Instant::now();
        let dt = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        let cap = rate as f64 * BURST.as_secs_f64();
        b.tokens = (b.tokens + dt * rate as f64).min(cap);
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate as f64)
        }
    }

    pub async fn acquire(&self, n: u64) {
        let wait = self.debit(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn average_stays_at_rate() {
        let l = RateLimiter::new(4 << 20);
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < 2 << 20 {
            let c = l.chunk();
            l.acquire(c).await;
            sent += c;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = sent as f64 / secs;
        // 2 MiB at 4 MiB/s: about 0.5 s. Allow scheduler jitter upward only.
        assert!(rate <= (4 << 20) as f64 * 1.1, "rate {rate}");
        assert!(rate >= (4 << 20) as f64 * 0.8, "rate {rate}");
    }

    #[test]
    fn unlimited_never_waits() {
        let l = RateLimiter::new(0);
        assert_eq!(l.debit(u64::MAX / 2), Duration::ZERO);
    }
}
