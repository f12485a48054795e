//! Server side of the transfer protocol: one task per accepted connection.
//!
//! Owns: the handshake, request dispatch, and sending file bytes with
//! `sendfile`. Must never: read a path that the jail did not open, allocate
//! for a frame before checking its size, or wait on a peer without a timeout.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use mftd_common::proto::{
    read_frame, DataHeader, ErrorCode, ErrorFrame, Frame, ProtoError, ReadReq, StatInfo, DATA_CHUNK, MAGIC,
    TRIM_NOT_OPEN, VERSION,
};

use crate::identity::{mtime_ns, Hashing, IdentityCache};
use crate::jail::{Jail, JailError};
use crate::node::NodeId;
use crate::transport::{Conn, Transport, WriteHalf};

/// How long writing one frame (not file data) may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long file data may wait for a peer that takes none of it: half the
/// serve idle timeout, between 1 and 30 s. A peer that stops reading in the
/// middle of a READ (or reads so slowly that its TCP window never reopens)
/// gives back its connection slot and open file after that.
fn stall_limit(idle: Duration) -> Duration {
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
struct PeerPace {
    stall: Duration,
    min_rate: u64,
    fd: std::os::fd::RawFd,
    /// Start of the window, and what the peer had acknowledged then.
    since: Option<(Instant, u64)>,
    /// Time in this window the server spent on its own.
    excused: Duration,
}

impl PeerPace {
    fn new(settings: &ServeSettings, fd: std::os::fd::RawFd) -> PeerPace {
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
    fn start(&mut self) {
        if self.since.is_none() && self.min_rate > 0 {
            if let Some(acked) = self.acked() {
                self.since = Some((Instant::now(), acked));
                self.excused = Duration::ZERO;
            }
        }
    }

    /// The writer has nothing to send: the window closes if the peer has
    /// taken everything; otherwise it runs on.
    fn settle(&mut self, wr: &WriteHalf<'_>) {
        if wr.unacked() == Some(0) {
            self.since = None;
        }
    }

    /// When the current window is over.
    fn window_end(&self) -> Option<Instant> {
        self.since.map(|(t, _)| t + MIN_RATE_WINDOW + self.excused)
    }

    /// Judges the window if it is over: an error if the peer was too slow,
    /// else a new window.
    fn judge(&mut self) -> Result<(), ConnError> {
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
    async fn wait<T>(&mut self, fut: impl std::future::Future<Output = io::Result<T>>) -> Result<T, ConnError> {
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

/// Files up to this size are hashed before `STAT` is answered (a few
/// milliseconds): the answer then carries the root and spares the client a
/// `HASHES` round trip before it can vote. Larger files are answered at once
/// as "not hashed yet".
const HASH_BEFORE_STAT: u64 = 8 << 20;

/// `HASHES` a connection may have waiting for their files' hashing; one
/// more closes it (each holds an open file).
const MAX_PENDING_HASHES: usize = 4;

/// A `HASHES` waiting for its file to be hashed; answered between two `DATA`
/// frames or while the connection is idle, as soon as the hashing is over.
struct PendingHashes {
    path: String,
    file: File,
    size: u64,
    mtime: i64,
    hashing: Hashing,
}

/// What every connection of every listener needs.
#[derive(Debug)]
pub struct ServeContext {
    pub jail: Jail,
    pub identities: IdentityCache,
    /// Replaced as a whole on reload; each connection reads them once.
    settings: std::sync::RwLock<Arc<ServeSettings>>,
    pub per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
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
enum ConnError {
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
pub async fn serve_connection(tcp: TcpStream, ctx: Arc<ServeContext>, egress: Arc<Egress>, token: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    let settings = ctx.settings();
    let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
    let result = tokio::select! {
        r = async {
            let mut conn = secure(tcp, &ctx, &egress, deadline).await?;
            let r = run(&mut conn, &ctx, &egress, &token, deadline).await;
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
            info!(peer = %peer, "closed a slow reader: {e}")
        }
        Err(e @ ConnError::Handshake(_)) => info!(peer = %peer, "{e}"),
        Err(e) => debug!(error = %e, "connection ended"),
    }
}

/// First byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The connection's transport: TLS on a TLS listener (within the handshake
/// deadline), else plain TCP. A plaintext mftd `HELLO` sent to a TLS
/// listener gets a plaintext `ERROR` that says so.
async fn secure(
    tcp: TcpStream,
    ctx: &ServeContext,
    egress: &Egress,
    deadline: tokio::time::Instant,
) -> Result<Conn, ConnError> {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Err(_) => {
            let mut conn = Conn::plain(tcp);
            let _ = send_error(&mut conn, 0, ErrorCode::BadHandshake, "no HELLO within the handshake timeout").await;
            return Err(ConnError::Timeout);
        }
        Ok(Ok(0)) => return Err(ConnError::Proto(ProtoError::Closed)),
        Ok(r) => r?,
    };
    let Some(tls) = ctx.tls.as_ref().filter(|_| egress.transport == Transport::Tls) else {
        if first[0] == TLS_HANDSHAKE_RECORD {
            let mut conn = Conn::plain(tcp);
            let msg = "this listener is plain TCP (unencrypted): name it as plain://HOST:PORT";
            let _ = send_error(&mut conn, 0, ErrorCode::BadHandshake, msg).await;
            return Err(ConnError::Closed("TLS ClientHello on a plain listener".into()));
        }
        return Ok(Conn::plain(tcp));
    };
    if first[0] == mftd_common::proto::T_HELLO {
        let mut conn = Conn::plain(tcp);
        let msg = "this listener speaks TLS; name it without plain:// (or give the listener transport = \"plain\")";
        let _ = send_error(&mut conn, 0, ErrorCode::BadHandshake, msg).await;
        return Err(ConnError::Closed("plaintext HELLO on a TLS listener".into()));
    }
    match tokio::time::timeout_at(deadline, Conn::accept(tcp, tls)).await {
        Err(_) => Err(ConnError::Timeout),
        Ok(r) => Ok(r?),
    }
}

async fn send_error<W: AsyncWrite + Unpin>(
    stream: &mut W,
    id: u32,
    code: ErrorCode,
    message: impl Into<String>,
) -> Result<(), ConnError> {
    let frame = Frame::Error(ErrorFrame { id, code, message: message.into() });
    write_frame(stream, &frame).await
}

async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, frame: &Frame) -> Result<(), ConnError> {
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

async fn run(
    stream: &mut Conn,
    ctx: &ServeContext,
    egress: &Egress,
    token: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Result<(), ConnError> {
    let settings = ctx.settings();
    // Before the handshake is done a peer gets no more than a HELLO's worth
    // of buffer, whatever length it announces.
    use mftd_common::proto::{auth_mac, auth_ok, read_frame_limited, Role, FLAG_AUTH, HANDSHAKE_MAX_FRAME};
    let hello = match tokio::time::timeout_at(deadline, read_frame_limited(stream, HANDSHAKE_MAX_FRAME)).await {
        Err(_) => {
            let _ = send_error(stream, 0, ErrorCode::BadHandshake, "no HELLO within the handshake timeout").await;
            return Err(ConnError::Timeout);
        }
        Ok(r) => r,
    };
    let client_proves = match hello {
        Ok(Frame::Hello { magic, version, flags }) if magic == MAGIC => {
            if version != VERSION {
                let msg = format!("server speaks mftd transfer protocol {VERSION}, client sent {version}");
                send_error(stream, 0, ErrorCode::VersionMismatch, msg.clone()).await?;
                return Err(ConnError::Closed(msg));
            }
            flags & FLAG_AUTH != 0
        }
        Ok(_)
        | Err(ProtoError::Malformed { .. })
        | Err(ProtoError::UnknownType(_))
        | Err(ProtoError::TooLarge { .. }) => {
            send_error(stream, 0, ErrorCode::BadHandshake, "expected HELLO with magic MFTD").await?;
            return Err(ConnError::Closed("bad handshake".into()));
        }
        Err(e) => return Err(e.into()),
    };
    // Only nodes on the allow list, when there is one.
    if !settings.allow_nodes.is_empty() {
        let allowed = stream.peer.as_ref().is_some_and(|id| settings.allow_nodes.contains(id));
        if !allowed {
            let who =
                stream.peer.as_ref().map_or("a client without a node identity".to_string(), |id| format!("node {id}"));
            let msg = format!("{who} is not in this server's allow_nodes");
            let _ = send_error(stream, 0, ErrorCode::NotAllowed, msg.clone()).await;
            return Err(ConnError::Closed(msg));
        }
    }
    // The client's proof comes right behind its HELLO; it is read even if
    // this server has no secret (the client then learns that from our
    // HELLO, which carries no proof).
    let client_mac = if client_proves {
        match tokio::time::timeout_at(deadline, read_frame_limited(stream, HANDSHAKE_MAX_FRAME)).await {
            Ok(Ok(Frame::Auth { mac })) => Some(mac),
            _ => None,
        }
    } else {
        None
    };
    let mut proof = None;
    if let Some(secret) = &settings.secret {
        let Some(binding) = stream.binding else {
            // Configuration refuses this; a plaintext channel has nothing
            // to bind a proof to.
            let msg = "this listener has a shared secret but no TLS";
            let _ = send_error(stream, 0, ErrorCode::AuthFailed, msg).await;
            return Err(ConnError::Closed(msg.into()));
        };
        if !client_mac.is_some_and(|mac| auth_ok(secret, Role::Client, &binding, &mac)) {
            let msg = if client_proves {
                "authentication failed: wrong shared secret (or a proof made for another connection)"
            } else {
                "this server requires authentication: set auth_secret_file (or get --secret-file) to its shared secret"
            };
            let _ = send_error(stream, 0, ErrorCode::AuthFailed, msg).await;
            return Err(ConnError::Closed("authentication failed".into()));
        }
        proof = Some(auth_mac(secret, Role::Server, &binding));
    }
    let flags = if proof.is_some() { FLAG_AUTH } else { 0 };
    let mut answer = Frame::Hello { magic: MAGIC, version: VERSION, flags }.encode();
    if let Some(mac) = proof {
        answer.extend_from_slice(&Frame::Auth { mac }.encode());
    }
    match timeout(WRITE_TIMEOUT, async {
        stream.write_all(&answer).await?;
        stream.flush().await
    })
    .await
    {
        Ok(r) => r?,
        Err(_) => return Err(ConnError::Timeout),
    }

    let (rd, mut wr) = stream.split();
    let queue = RequestQueue::default();
    // The reader takes requests and TRIMs off the socket while the writer
    // streams answers, so a TRIM reaches a READ that is being sent.
    // A writer that fails (a peer too slow, a stall) ends the reader too,
    // so the connection closes now, not at the reader's idle timeout.
    let writer_failed = CancellationToken::new();
    let writer = async {
        let r = write_loop(&mut wr, ctx, egress, token, &queue).await;
        queue.close();
        if r.is_err() {
            writer_failed.cancel();
        }
        r
    };
    let reader = async {
        let r = tokio::select! {
            r = read_loop(rd, settings.idle_timeout, &queue) => r,
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

/// Requests read but not yet answered, and TRIMs not yet applied.
#[derive(Default)]
struct RequestQueue {
    state: std::sync::Mutex<QueueState>,
    /// Woken when a request or TRIM arrives, or the reader ends.
    arrived: tokio::sync::Notify,
    /// Woken when the writer takes a request (room in the queue).
    taken: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    requests: std::collections::VecDeque<Request>,
    trims: Vec<(u32, u64)>,
    /// The writer is answering a request.
    busy: bool,
    /// The reader ended (peer closed, error) or the writer failed.
    closed: bool,
    /// Why the reader stopped, sent to the peer by the writer.
    fatal: Option<ErrorFrame>,
}

enum Request {
    Stat(String),
    Hashes {
        size: u64,
        mtime_ns: i64,
        path: String,
    },
    /// A READ and, if a TRIM reached it while it waited, its new end.
    Read(ReadReq, Option<u64>),
}

/// Requests a client may have queued beyond the one being answered; more
/// are held back by TCP flow control.
const MAX_QUEUED: usize = 8;

impl RequestQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_one();
        self.taken.notify_one();
    }
}

async fn read_loop(
    mut rd: crate::transport::ReadHalf<'_>,
    idle: Duration,
    queue: &RequestQueue,
) -> Result<(), ConnError> {
    loop {
        // Room for one more request (bounded memory per connection).
        loop {
            let taken = queue.taken.notified();
            {
                let st = queue.lock();
                if st.closed {
                    return Ok(());
                }
                if st.requests.len() < MAX_QUEUED {
                    break;
                }
            }
            taken.await;
        }
        // The idle timeout applies only while nothing is being answered: a
        // client streaming a large READ has nothing to say for a long time.
        // The same read future is kept across checks (read_frame is not
        // cancel-safe).
        let read = read_frame(&mut rd);
        tokio::pin!(read);
        let frame = loop {
            tokio::select! {
                f = &mut read => break f,
                _ = tokio::time::sleep(idle) => {
                    let st = queue.lock();
                    if st.closed {
                        return Ok(());
                    }
                    if !st.busy && st.requests.is_empty() {
                        return Err(ConnError::Timeout);
                    }
                }
            }
        };
        let frame = match frame {
            Err(ProtoError::Closed) => return Ok(()),
            Err(e @ (ProtoError::Malformed { .. } | ProtoError::UnknownType(_) | ProtoError::TooLarge { .. })) => {
                queue.lock().fatal = Some(ErrorFrame { id: 0, code: ErrorCode::BadFrame, message: e.to_string() });
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
            Ok(f) => f,
        };
        let mut st = queue.lock();
        match frame {
            Frame::Stat { path } => st.requests.push_back(Request::Stat(path)),
            Frame::Read(req) => st.requests.push_back(Request::Read(req, None)),
            Frame::Hashes { size, mtime_ns, path } => st.requests.push_back(Request::Hashes { size, mtime_ns, path }),
            Frame::Trim { id, end } => {
                // Bounded: a client flooding TRIMs keeps only the latest few.
                if st.trims.len() >= 64 {
                    st.trims.remove(0);
                }
                st.trims.push((id, end));
            }
            other => {
                let name = other.name();
                st.fatal = Some(ErrorFrame {
                    id: 0,
                    code: ErrorCode::BadFrame,
                    message: format!("unexpected {name} frame from client"),
                });
                drop(st);
                return Err(ConnError::Closed("unexpected frame".into()));
            }
        }
        drop(st);
        queue.arrived.notify_one();
    }
}

async fn write_loop(
    wr: &mut WriteHalf<'_>,
    ctx: &ServeContext,
    egress: &Egress,
    token: &CancellationToken,
    queue: &RequestQueue,
) -> Result<(), ConnError> {
    let mut open: Option<OpenFile> = None;
    let mut hashes: std::collections::VecDeque<PendingHashes> = Default::default();
    let mut pace = PeerPace::new(&ctx.settings(), wr.fd());
    loop {
        let next = loop {
            let arrived = queue.arrived.notified();
            let (fatal, req, closed) = {
                let mut st = queue.lock();
                let fatal = st.fatal.take();
                let req = st.requests.pop_front();
                st.busy = req.is_some();
                (fatal, req, st.closed)
            };
            if req.is_none() {
                // Nothing open: TRIMs can only be about finished requests.
                for (id, end) in take_trims(queue, None) {
                    write_frame(wr, &Frame::Trimmed { id, end }).await?;
                }
            }
            if let Some(e) = fatal {
                let _ = write_frame(wr, &Frame::Error(e)).await;
                return Ok(());
            }
            if let Some(r) = req {
                queue.taken.notify_one();
                break r;
            }
            if closed && hashes.is_empty() {
                return Ok(());
            }
            // Idle: wait for a request, or for the oldest pending HASHES.
            match hashes.front() {
                Some(h) => {
                    let done = h.hashing.clone().wait();
                    tokio::select! {
                        _ = arrived => {}
                        _ = done => {}
                    }
                    answer_hashes(wr, &mut hashes).await?;
                }
                None => {
                    // Idle, but a peer that still owes acknowledgements
                    // is judged on.
                    pace.settle(wr);
                    match pace.window_end() {
                        None => arrived.await,
                        Some(end) => tokio::select! {
                            _ = arrived => {}
                            _ = tokio::time::sleep_until(end.into()) => pace.judge()?,
                        },
                    }
                }
            }
        };
        match next {
            Request::Stat(path) => handle_stat(wr, ctx, &path).await?,
            Request::Hashes { size, mtime_ns, path } => {
                if let Some(p) = handle_hashes(wr, ctx, &path, size, mtime_ns).await? {
                    if hashes.len() >= MAX_PENDING_HASHES {
                        let message = format!("more than {MAX_PENDING_HASHES} HASHES waiting for hashing");
                        let _ =
                            write_frame(wr, &Frame::Error(ErrorFrame { id: 0, code: ErrorCode::BadFrame, message }))
                                .await;
                        return Err(ConnError::Closed("too many pending HASHES".into()));
                    }
                    hashes.push_back(p);
                }
            }
            Request::Read(req, trimmed) => {
                handle_read(wr, ctx, egress, token, &mut open, queue, &mut hashes, &mut pace, req, trimmed).await?
            }
        }
    }
}

fn jail_message(e: &JailError, path: &str) -> String {
    match e {
        // Uniform on purpose: the peer must not learn what lies outside.
        JailError::Refused => format!("{path:?}: not accessible"),
        JailError::Io(_) => format!("{path:?}: server i/o error"),
        other => format!("{path:?}: {other}"),
    }
}

async fn handle_stat(stream: &mut WriteHalf<'_>, ctx: &ServeContext, path: &str) -> Result<(), ConnError> {
    let (file, meta) = match ctx.jail.open(path) {
        Ok(x) => x,
        Err(e) => {
            debug!(path, error = %e, "STAT refused");
            return send_error(stream, 0, e.code(), jail_message(&e, path)).await;
        }
    };
    let hashing = ctx.identities.lookup(&file, &meta).await?;
    let outcome = match hashing.now() {
        None if meta.size() <= HASH_BEFORE_STAT => Some(hashing.wait().await),
        now => now,
    };
    let root = match outcome {
        None => None,
        Some(Ok(id)) => Some(id.root),
        Some(Err(e)) => {
            warn!(path, error = %e, "hashing failed");
            return send_error(stream, 0, ErrorCode::Io, format!("{path:?}: cannot read file")).await;
        }
    };
    // The file may have changed while it was hashed; the identity is only
    // valid for the version it was computed from.
    let now = file.metadata()?;
    if now.size() != meta.size() || mtime_ns(&now) != mtime_ns(&meta) {
        return send_error(stream, 0, ErrorCode::FileChanged, format!("{path:?} changed while being hashed; retry"))
            .await;
    }
    let piece_size = mftd_common::proto::piece_size_for(meta.size());
    let info = StatInfo { size: meta.size(), mtime_ns: mtime_ns(&meta), piece_size, root };
    write_frame(stream, &Frame::StatOk(info)).await
}

/// Takes a HASHES: the piece hashes of the version the client STATed. The
/// answer goes out now if the file is hashed, otherwise the request is
/// returned to be answered when it is (see [`answer_hashes`]).
async fn handle_hashes(
    stream: &mut WriteHalf<'_>,
    ctx: &ServeContext,
    path: &str,
    size: u64,
    mtime: i64,
) -> Result<Option<PendingHashes>, ConnError> {
    let (file, meta) = match ctx.jail.open(path) {
        Ok(x) => x,
        Err(e) => {
            send_error(stream, 0, e.code(), jail_message(&e, path)).await?;
            return Ok(None);
        }
    };
    if meta.size() != size || mtime_ns(&meta) != mtime {
        send_error(stream, 0, ErrorCode::FileChanged, format!("{path:?} changed since STAT")).await?;
        return Ok(None);
    }
    let hashing = ctx.identities.lookup(&file, &meta).await?;
    let mut pending =
        std::collections::VecDeque::from([PendingHashes { path: path.into(), file, size, mtime, hashing }]);
    answer_hashes(stream, &mut pending).await?;
    Ok(pending.pop_front())
}

/// Answers the pending HASHES whose files are hashed, oldest first.
async fn answer_hashes(
    stream: &mut WriteHalf<'_>,
    pending: &mut std::collections::VecDeque<PendingHashes>,
) -> Result<(), ConnError> {
    while let Some(outcome) = pending.front().and_then(|p| p.hashing.now()) {
        let Some(p) = pending.pop_front() else { break };
        let path = &p.path;
        let now = p.file.metadata()?;
        if now.size() != p.size || mtime_ns(&now) != p.mtime {
            send_error(stream, 0, ErrorCode::FileChanged, format!("{path:?} changed while being hashed")).await?;
            continue;
        }
        match outcome {
            Ok(id) => write_frame(stream, &Frame::HashesOk { hashes: id.hashes.clone() }).await?,
            Err(e) => {
                warn!(path, error = %e, "hashing failed");
                send_error(stream, 0, ErrorCode::Io, format!("{path:?}: cannot read file")).await?;
            }
        }
    }
    Ok(())
}

struct OpenFile {
    path: String,
    file: File,
}

#[allow(clippy::too_many_arguments)]
async fn handle_read(
    stream: &mut WriteHalf<'_>,
    ctx: &ServeContext,
    egress: &Egress,
    token: &CancellationToken,
    open: &mut Option<OpenFile>,
    queue: &RequestQueue,
    hashes: &mut std::collections::VecDeque<PendingHashes>,
    pace: &mut PeerPace,
    req: ReadReq,
    trimmed: Option<u64>,
) -> Result<(), ConnError> {
    let id = req.id;
    // Reuse the descriptor from the previous READ of the same path.
    if open.as_ref().map(|o| o.path != req.path).unwrap_or(true) {
        match ctx.jail.open(&req.path) {
            Ok((file, _)) => *open = Some(OpenFile { path: req.path.clone(), file }),
            Err(e) => {
                *open = None;
                return send_error(stream, id, e.code(), jail_message(&e, &req.path)).await;
            }
        }
    }
    let Some(of) = open.as_ref() else { return Ok(()) };
    let meta = of.file.metadata()?;
    if meta.size() != req.size || mtime_ns(&meta) != req.mtime_ns {
        return send_error(stream, id, ErrorCode::FileChanged, format!("{:?} changed since STAT", req.path)).await;
    }
    let end = match req.offset.checked_add(req.len) {
        Some(end) if end <= meta.size() => end,
        _ => {
            return send_error(
                stream,
                id,
                ErrorCode::BadRange,
                format!("range {}+{} is outside the {}-byte file", req.offset, req.len, meta.size()),
            )
            .await
        }
    };
    if req.len == 0 {
        return write_frame(stream, &Frame::Data(DataHeader { id, offset: req.offset, len: 0 })).await;
    }
    // A TRIM that reached this READ while it was queued was answered then;
    // one that arrives now is answered here. A READ trimmed to its start is
    // answered by that TRIMMED alone.
    let end = trimmed.map_or(end, |t| t.clamp(req.offset, end));
    let mut end = apply_trims(stream, queue, id, req.offset, end).await?;
    // Stream the range as DATA frames of at most DATA_CHUNK bytes; between
    // frames, apply TRIMs so a client can take back the end of the range.
    let mut pos = req.offset;
    pace.start();
    while pos < end {
        end = apply_trims(stream, queue, id, pos, end).await?;
        if pos >= end {
            break;
        }
        answer_hashes(stream, hashes).await?;
        // A paced listener sends smaller frames (about 20 ms of its rate),
        // so a TRIM never waits behind half a second of one frame.
        let len = (end - pos).min(DATA_CHUNK).min(egress.limiter.chunk());
        write_frame(stream, &Frame::Data(DataHeader { id, offset: pos, len })).await?;
        send_range(stream, &of.file, pos, len, egress, token, pace).await?;
        pace.judge()?;
        pos += len;
    }
    Ok(())
}

/// Applies pending TRIMs: those for `id` (being sent from `pos`, currently
/// ending at `end`) move its end, never below `pos`; every TRIM is answered
/// with TRIMMED. Returns the new end of `id`.
async fn apply_trims(
    stream: &mut WriteHalf<'_>,
    queue: &RequestQueue,
    id: u32,
    pos: u64,
    mut end: u64,
) -> Result<u64, ConnError> {
    let trims = take_trims(queue, Some(id));
    for (tid, tend) in trims {
        let answer = if tid == id {
            end = tend.clamp(pos, end);
            end
        } else {
            tend
        };
        write_frame(stream, &Frame::Trimmed { id: tid, end: answer }).await?;
    }
    Ok(end)
}

/// Takes the pending TRIMs. Those for queued READs are applied to them here
/// (answered with their new end), those for finished ones answered with
/// [`TRIM_NOT_OPEN`]; those for `current` are left for the caller to apply.
fn take_trims(queue: &RequestQueue, current: Option<u32>) -> Vec<(u32, u64)> {
    let mut st = queue.lock();
    let trims = std::mem::take(&mut st.trims);
    let mut out = Vec::with_capacity(trims.len());
    for (tid, tend) in trims {
        if Some(tid) == current {
            out.push((tid, tend));
            continue;
        }
        let queued = st.requests.iter_mut().find_map(|r| match r {
            Request::Read(q, trimmed) if q.id == tid => Some((q, trimmed)),
            _ => None,
        });
        match queued {
            Some((q, trimmed)) => {
                let end = trimmed.unwrap_or(q.offset.saturating_add(q.len));
                let new_end = tend.clamp(q.offset, end);
                *trimmed = Some(new_end);
                out.push((tid, new_end));
            }
            None => out.push((tid, TRIM_NOT_OPEN)),
        }
    }
    out
}

/// Bytes a TLS connection reads from the file and hands to rustls at a
/// time: it cuts them into full 16 KiB records.
const TLS_CHUNK: usize = 256 << 10;

/// Sends `len` bytes of `file` from `offset`, paced by the listener's rate
/// limiter: with `sendfile` on plain TCP, through rustls in large writes on
/// TLS.
async fn send_range(
    stream: &mut WriteHalf<'_>,
    file: &File,
    offset: u64,
    len: u64,
    egress: &Egress,
    token: &CancellationToken,
    pace: &mut PeerPace,
) -> Result<(), ConnError> {
    use std::os::unix::fs::FileExt;
    let mut off = offset;
    let mut left = len;
    let mut buf = match stream.plain_tcp() {
        Some(_) => Vec::new(),
        None => vec![0u8; TLS_CHUNK.min(len as usize)],
    };
    while left > 0 {
        if token.is_cancelled() {
            return Err(ConnError::Cancelled);
        }
        let chunk = left.min(egress.limiter.chunk());
        let paced = Instant::now();
        egress.limiter.acquire(chunk).await;
        pace.excused += paced.elapsed();
        let mut chunk_left = chunk;
        while chunk_left > 0 {
            // Time in system calls that read the file is the server's own.
            let mut own = Duration::ZERO;
            let sent = if let Some(tcp) = stream.plain_tcp() {
                let mut at = off as i64;
                let sent = pace
                    .wait(async {
                        loop {
                            tcp.writable().await?;
                            let t = Instant::now();
                            let r = tcp.try_io(Interest::WRITABLE, || {
                                nix::sys::sendfile::sendfile(
                                    tcp.as_fd(),
                                    file.as_fd(),
                                    Some(&mut at),
                                    chunk_left as usize,
                                )
                                .map_err(io::Error::from)
                            });
                            own += t.elapsed();
                            match r {
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                                r => return r,
                            }
                        }
                    })
                    .await?;
                pace.excused += own;
                sent as u64
            } else {
                let n = (chunk_left as usize).min(buf.len());
                let t = Instant::now();
                let got = file.read_at(&mut buf[..n], off)?;
                pace.excused += t.elapsed();
                let mut done = 0;
                while done < got {
                    let w = pace.wait(stream.write(&buf[done..got])).await?;
                    if w == 0 {
                        return Err(ConnError::Closed("peer closed while receiving".into()));
                    }
                    done += w;
                }
                got as u64
            };
            if sent == 0 {
                // The file shrank under us; we promised `len` bytes, so the
                // only honest thing left is to close the connection.
                return Err(ConnError::Closed("file shrank while sending".into()));
            }
            off += sent;
            chunk_left -= sent;
            left -= sent;
            egress.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        }
    }
    // TLS keeps the last record in rustls until it is flushed.
    pace.wait(stream.flush()).await
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
