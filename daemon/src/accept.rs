//! What the accept loops (transfer listeners, control socket, metrics)
//! share: surviving `accept()` errors (EMFILE, ENFILE, ENOBUFS...) by
//! waiting a little longer after each, from 10 ms up to 1 s, until one
//! succeeds.

use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

const FIRST: Duration = Duration::from_millis(10);
const CAP: Duration = Duration::from_secs(1);

/// Back-off of one accept loop.
pub struct AcceptBackoff {
    next: Duration,
    /// Which loop, for the log.
    what: &'static str,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff { next: FIRST, what }
    }

    /// An accept succeeded: the next failure waits the shortest time again.
    pub fn ok(&mut self) {
        self.next = FIRST;
    }

    /// An accept failed: logs it and waits. False if `stop` fired meanwhile
    /// (the loop should end).
    pub async fn failed(&mut self, e: &io::Error, stop: &CancellationToken) -> bool {
        warn!(error = %e, retry_in = ?self.next, "{} accept failed", self.what);
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(self.next) => {}
        }
        self.next = (self.next * 2).min(CAP);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_double_up_to_a_second_and_reset_on_success() {
        let stop = CancellationToken::new();
        let mut b = AcceptBackoff::new("test");
        let e = io::Error::from_raw_os_error(24); // EMFILE
        let mut waits = Vec::new();
        for _ in 0..9 {
            let t = tokio::time::Instant::now();
            assert!(b.failed(&e, &stop).await);
            waits.push(t.elapsed().as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.ok();
        let t = tokio::time::Instant::now();
        assert!(b.failed(&e, &stop).await);
        assert_eq!(t.elapsed().as_millis(), 10);
        stop.cancel();
        assert!(!b.failed(&e, &stop).await, "a stopped loop does not wait");
    }
}
