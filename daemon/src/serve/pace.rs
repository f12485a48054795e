//! Slow-peer pacing: how long file data may wait for a peer that takes
//! none of it, and how fast a peer must take what it asked for.
//!
//! Owns: the stall limit and the `serve_min_rate` judgement of one
//! connection ([`PeerPace`]). Must never: count the server's own time
//! (pacing for the listener's rate limit, reading the file) against the
//! peer, or read from the socket.

use std::io;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{ConnError, ServeSettings, WRITE_TIMEOUT};
use crate::transport::WriteHalf;

/// How long file data may wait for a peer that takes none of it: half the
/// serve idle timeout, between 1 and 30 s. A peer that stops reading in the
/// middle of a READ (or reads so slowly that its TCP window never reopens)
/// gives back its connection slot and open file after that.
pub(super) fn stall_limit(idle: Duration) -> Duration {
    (idle / 2).clamp(Duration::from_secs(1), WRITE_TIMEOUT)
}

/// Over how long a window a peer's reading rate is judged against
/// `serve_min_rate`.
const MIN_RATE_WINDOW: Duration = Duration::from_secs(10);

/// How fast a peer takes the data it asked for. A peer that keeps its TCP
/// window barely open (a few bytes now and then) never trips the stall
/// limit; this catches it. What the peer took is what it acknowledged (the
/// kernel's `tcpi_bytes_acked`: frames, file data and TLS records alike).
/// Every [`MIN_RATE_WINDOW`] of the peer owing acknowledgements, fewer than
/// `min_rate` bytes per second close the connection. Time the server spent
/// on its own (pacing for the listener's rate limit, reading the file) does
/// not count, and the window closes whenever the peer has taken everything
/// sent (idle time between requests is not judged). It is judged also while
/// a write waits and while the writer is idle with data still unacknowledged,
/// so a peer cannot hide behind one long wait or a small request.
pub(super) struct PeerPace {
    stall: Duration,
    min_rate: u64,
    fd: std::os::fd::RawFd,
    /// Start of the window, and what the peer had acknowledged then.
    since: Option<(Instant, u64)>,
    /// Time in this window the server spent on its own.
    pub(super) excused: Duration,
}

impl PeerPace {
    pub(super) fn new(settings: &ServeSettings, fd: std::os::fd::RawFd) -> PeerPace {
        PeerPace {
            stall: stall_limit(settings.idle_timeout),
            min_rate: settings.min_rate,
            fd,
            since: None,
            excused: Duration::ZERO,
        }
    }

    /// Bytes the peer has acknowledged (`TCP_INFO`).
    fn acked(&self) -> Option<u64> {
        // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most
        // `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(info.tcpi_bytes_acked)
    }

    /// Data is about to be sent: opens a window if none is open.
    pub(super) fn start(&mut self) {
        if self.since.is_none() && self.min_rate > 0 {
            if let Some(acked) = self.acked() {
                self.since = Some((Instant::now(), acked));
                self.excused = Duration::ZERO;
            }
        }
    }

    /// The writer has nothing to send: the window closes if the peer has
    /// taken everything; otherwise it runs on.
    pub(super) fn settle(&mut self, wr: &WriteHalf<'_>) {
        if wr.unacked() == Some(0) {
            self.since = None;
        }
    }

    /// When the current window is over.
    pub(super) fn window_end(&self) -> Option<Instant> {
        self.since.map(|(t, _)| t + MIN_RATE_WINDOW + self.excused)
    }

    /// Judges the window if it is over: an error if the peer was too slow,
    /// else a new window.
    pub(super) fn judge(&mut self) -> Result<(), ConnError> {
        let (Some(end), Some((start, acked_then))) = (self.window_end(), self.since) else { return Ok(()) };
        let now = Instant::now();
        if now < end {
            return Ok(());
        }
        let Some(acked) = self.acked() else { return Ok(()) };
        let secs = (now - start).saturating_sub(self.excused).as_secs_f64().max(0.001);
        let rate = acked.saturating_sub(acked_then) as f64 / secs;
        debug!(rate = rate as u64, secs, "judged a peer's reading rate");
        if rate < self.min_rate as f64 {
            return Err(ConnError::TooSlow { rate: rate as u64, min: self.min_rate });
        }
        self.since = Some((now, acked));
        self.excused = Duration::ZERO;
        Ok(())
    }

    /// Waits for `fut` (a write to the peer) up to the stall limit, judging
    /// the peer's rate on the way.
    pub(super) async fn wait<T>(
        &mut self,
        fut: impl std::future::Future<Output = io::Result<T>>,
    ) -> Result<T, ConnError> {
        tokio::pin!(fut);
        let stall_end = tokio::time::Instant::now() + self.stall;
        loop {
            let wake = self.window_end().map_or(stall_end, |j| tokio::time::Instant::from_std(j).min(stall_end));
            match tokio::time::timeout_at(wake, &mut fut).await {
                Ok(r) => return Ok(r?),
                Err(_) if tokio::time::Instant::now() >= stall_end => return Err(ConnError::Stalled(self.stall)),
                Err(_) => self.judge()?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stall_limit_is_half_the_idle_timeout_between_1_and_30_s() {
        assert_eq!(stall_limit(Duration::from_secs(60)), Duration::from_secs(30));
        assert_eq!(stall_limit(Duration::from_secs(8)), Duration::from_secs(4));
        assert_eq!(stall_limit(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(stall_limit(Duration::from_secs(600)), WRITE_TIMEOUT);
    }
}
