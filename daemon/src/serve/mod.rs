//! Server side of the transfer protocol: one task per accepted connection.
//!
//! Owns: what every connection shares ([`ServeContext`]: the jail, the
//! identities, the settings a reload may change, the per-address count and
//! handshake rate ([`admit`]), the log of what peers do wrong ([`peerlog`]))
//! and the life of one connection, in four parts: the handshake
//! ([`handshake`]), the request queue and its reader ([`queue`]), the
//! writer that answers ([`writer`]) and the judgement of slow peers
//! ([`pace`]). Must never: read a path that the jail did not open, allocate
//! for a frame before checking its size, or wait on a peer without a timeout.

mod admit;
mod handshake;
mod pace;
pub mod peerlog;
mod queue;
mod writer;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use mftd_common::proto::{ErrorCode, ErrorFrame, Frame, ProtoError};

use crate::identity::IdentityCache;
use crate::jail::Jail;
use crate::node::NodeId;
use crate::transport::{Conn, Transport};
use peerlog::{Failure, PeerLog};
use queue::RequestQueue;
use writer::Writer;

/// How long writing one frame (not file data) may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection of every listener needs.
#[derive(Debug)]
pub struct ServeContext {
    pub jail: Jail,
    pub identities: IdentityCache,
    /// Replaced as a whole on reload; each connection reads them once.
    settings: std::sync::RwLock<Arc<ServeSettings>>,
    pub per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
    /// New connections per address lately (see [`admit`]).
    handshakes: std::sync::Mutex<admit::HandshakeRate>,
    /// What peers did wrong, logged once per interval per address.
    pub peer_log: PeerLog,
    /// This node's TLS configurations (for TLS listeners).
    pub tls: Option<Arc<crate::node::TlsConfigs>>,
}

/// The serving settings a reload may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    /// Shared secret clients must prove, if authentication is on.
    pub secret: Option<Vec<u8>>,
    /// How long a new connection may take to complete the handshake.
    pub handshake_timeout: Duration,
    /// How long a connection may sit without sending a request.
    pub idle_timeout: Duration,
    /// Connections per client address over all listeners.
    pub max_per_ip: u32,
    /// New connections per second per client address (0: no limit).
    pub handshake_rate: u32,
    /// Slowest a peer may take the file data it asked for, bytes/s (0: any).
    pub min_rate: u64,
    /// Node IDs TLS clients must have, if not empty.
    pub allow_nodes: Vec<NodeId>,
    /// Address ranges accepted when a listener has no list of its own.
    pub allow: Option<Vec<ipnet::IpNet>>,
}

impl ServeContext {
    pub fn new(
        jail: Jail,
        identities: IdentityCache,
        settings: ServeSettings,
        tls: Option<Arc<crate::node::TlsConfigs>>,
    ) -> ServeContext {
        ServeContext {
            jail,
            identities,
            settings: std::sync::RwLock::new(Arc::new(settings)),
            per_ip: Default::default(),
            handshakes: Default::default(),
            peer_log: PeerLog::default(),
            tls,
        }
    }

    pub fn settings(&self) -> Arc<ServeSettings> {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies reloaded settings to connections accepted from now on.
    pub fn set_settings(&self, s: ServeSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    /// Whether `ip` may open one more connection now under the handshake
    /// rate (see [`admit`]).
    pub fn admit(&self, ip: std::net::IpAddr) -> bool {
        let rate = self.settings().handshake_rate;
        let mut h = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        h.admit(address_key(ip), rate, std::time::Instant::now())
    }

    /// Counts a connection from `ip`; `None` if it is over the cap. An IPv6
    /// client is counted by its /64 (one host usually has a whole /64 to
    /// pick addresses from); an IPv4-mapped address as the IPv4 one.
    pub fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let ip = address_key(ip);
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.settings().max_per_ip;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot { ctx: self.clone(), ip })
    }
}

/// What the per-address cap counts `ip` as.
pub fn address_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// One counted connection from an address; released on drop.
pub struct IpSlot {
    ctx: Arc<ServeContext>,
    ip: std::net::IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Closed(String),
    #[error("{0}")]
    Handshake(#[from] crate::transport::HandshakeError),
    #[error("peer took no data for {0:?}")]
    Stalled(Duration),
    #[error("peer took file data at {rate} B/s, below serve_min_rate ({min} B/s)")]
    TooSlow { rate: u64, min: u64 },
}

/// What a connection's answers draw on, shared with the listener that
/// accepted it: its transport, its bandwidth cap and its count of file
/// bytes sent.
#[derive(Debug)]
pub struct Egress {
    pub transport: Transport,
    pub limiter: crate::ratelimit::RateLimiter,
    pub bytes_sent: std::sync::atomic::AtomicU64,
}

/// Serves one connection until the peer leaves, breaks the protocol, times
/// out, or `token` is cancelled (listener stopped, daemon shutting down).
pub async fn serve_connection(
    tcp: TcpStream,
    ctx: Arc<ServeContext>,
    egress: Arc<Egress>,
    token: CancellationToken,
    greeted: &std::sync::atomic::AtomicBool,
) {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let settings = ctx.settings();
    let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
    let result = tokio::select! {
        r = async {
            let mut conn = handshake::secure(tcp, &ctx, &egress, deadline).await?;
            let r = run(&mut conn, &ctx, &egress, &token, deadline, greeted).await;
            if matches!(r, Err(ConnError::TooSlow { .. } | ConnError::Stalled(_))) {
                // Reset rather than close: the data still queued for a
                // peer that does not take it would otherwise keep the
                // socket (and its memory) alive long after mftd let go.
                let _ = nix::sys::socket::setsockopt(conn.tcp(), nix::sys::socket::sockopt::Linger, &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                });
            }
            r
        } => r,
        _ = token.cancelled() => Err(ConnError::Cancelled),
    };
    match result {
        Ok(()) | Err(ConnError::Cancelled) => {}
        Err(ConnError::Proto(ProtoError::Closed)) => debug!("peer closed"),
        Err(e @ (ConnError::TooSlow { .. } | ConnError::Stalled(_))) => {
            ctx.peer_log.failed(peer, Failure::SlowReader, format_args!("closed a slow reader: {e}"))
        }
        Err(e @ ConnError::Handshake(_)) => ctx.peer_log.failed(peer, Failure::Handshake, e),
        Err(
            e @ ConnError::Proto(
                ProtoError::Malformed { .. } | ProtoError::UnknownType(_) | ProtoError::TooLarge { .. },
            ),
        ) => ctx.peer_log.failed(peer, Failure::BadFrame, format_args!("connection ended: {e}")),
        Err(e) => debug!(error = %e, "connection ended"),
    }
}

pub(super) async fn send_error<W: AsyncWrite + Unpin>(
    stream: &mut W,
    id: u32,
    code: ErrorCode,
    message: impl Into<String>,
) -> Result<(), ConnError> {
    let frame = Frame::Error(ErrorFrame { id, code, message: message.into() });
    write_frame(stream, &frame).await
}

pub(super) async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, frame: &Frame) -> Result<(), ConnError> {
    let bytes = frame.encode();
    match timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        // TLS holds a record back until it is flushed (a no-op on TCP).
        stream.flush().await
    })
    .await
    {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnError::Timeout),
    }
}

/// Serves a connection whose transport is up: the mftd handshake, then a
/// reader and a writer side by side until either ends.
async fn run(
    stream: &mut Conn,
    ctx: &ServeContext,
    egress: &Egress,
    token: &CancellationToken,
    deadline: tokio::time::Instant,
    greeted: &std::sync::atomic::AtomicBool,
) -> Result<(), ConnError> {
    let settings = ctx.settings();
    handshake::hello(stream, &settings, deadline).await?;
    // From here on a newcomer cannot close it to make room.
    greeted.store(true, std::sync::atomic::Ordering::SeqCst);

    let (rd, wr) = stream.split();
    let queue = RequestQueue::default();
    // The reader takes requests and TRIMs off the socket while the writer
    // streams answers, so a TRIM reaches a READ that is being sent.
    // A writer that fails (a peer too slow, a stall) ends the reader too,
    // so the connection closes now, not at the reader's idle timeout.
    let writer_failed = CancellationToken::new();
    let writer = async {
        let r = Writer::new(wr, ctx, egress, token, &queue).run().await;
        queue.close();
        if r.is_err() {
            writer_failed.cancel();
        }
        r
    };
    let reader = async {
        let r = tokio::select! {
            r = queue::read_loop(rd, settings.idle_timeout, &queue) => r,
            _ = writer_failed.cancelled() => Ok(()),
        };
        queue.close();
        r
    };
    let (r, w) = tokio::join!(reader, writer);
    match (r, w) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::address_key;

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(address_key(mapped), "10.1.2.3".parse::<std::net::IpAddr>().unwrap());
        let v4: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(address_key(v4), v4);
    }
}
