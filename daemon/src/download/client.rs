//! Client side of the transfer protocol: connect, handshake, STAT, then a
//! [`Stream`] of READs and TRIMs whose answers a reader task turns into
//! [`Event`]s. Every wait on the peer has a timeout (the idle timeout is
//! applied by the caller, which knows whether it expects anything), and every
//! answer is checked against what was asked before a byte of it is used.

use std::io;
use std::time::{Duration, Instant};

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::TcpStream;

use crate::node::{KnownNodes, NodeId, SourceAddr, TlsConfigs};
use crate::transport::{Conn as Link, OwnedReadHalf, OwnedWriteHalf, Transport};
use tokio::sync::mpsc;
use tokio::time::timeout;

use mftd_common::proto::{read_frame, DataHeader, ErrorCode, Frame, ProtoError, ReadReq, StatInfo, MAGIC, VERSION};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// STAT may have to wait for the server to hash a large file.
pub const STAT_TIMEOUT: Duration = Duration::from_secs(300);

/// What went wrong talking to one source.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection refused")]
    Refused,
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("no data for {0:?}")]
    Idle(Duration),
    #[error("connection closed by server")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server answered with an error frame.
    #[error("{}", if message.is_empty() { format!("server error {code}") } else { message.clone() })]
    Server { code: ErrorCode, message: String },
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The TLS handshake failed (a plaintext server, a man in the middle
    /// cut off, a broken peer).
    #[error("{0}")]
    Tls(String),
    /// The source is not the node it must be, or cannot prove the secret.
    #[error("{0}")]
    Identity(String),
    /// An error from a server nothing has authenticated yet (a plaintext
    /// refusal before TLS, or an answer before its proof of the secret):
    /// anyone on the path could have sent it, so it is only retried.
    #[error("server error {code} (unauthenticated): {message}")]
    Unproven { code: ErrorCode, message: String },
}

/// What a download needs to open connections: the TLS configuration of
/// the node identity it presents and the rules for the node IDs of its
/// sources (the daemon's, or its owner's: see [`super::dialers`]).
pub struct Dialer {
    pub tls: Arc<TlsConfigs>,
    pub known: Arc<KnownNodes>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").field("node", &self.tls.id).finish_non_exhaustive()
    }
}

impl ClientError {
    /// Errors that will not go away by retrying the same source.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::NotFound
                    | ErrorCode::PathRefused
                    | ErrorCode::BadPath
                    | ErrorCode::NotRegular
                    | ErrorCode::VersionMismatch
                    | ErrorCode::BadHandshake
                    | ErrorCode::AuthFailed
                    | ErrorCode::NotAllowed
            ),
            ClientError::Protocol(_) | ClientError::Identity(_) => true,
            _ => false,
        }
    }
}

impl From<ProtoError> for ClientError {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Closed => ClientError::Closed,
            ProtoError::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

pub struct Conn {
    stream: Link,
    idle: Duration,
    /// The node ID the source proved (TLS).
    pub node: Option<NodeId>,
    /// Time from sending HELLO to the server's answer: one round trip plus
    /// the server's (tiny) handshake work.
    pub rtt: Duration,
}

impl Conn {
    /// Connects, completes the handshake and STATs `path`; the STAT goes
    /// out right behind the HELLO (and the proof of the secret, if any),
    /// saving a round trip.
    pub async fn open(
        source: &str,
        idle: Duration,
        secret: Option<&[u8]>,
        path: &str,
        dialer: &Dialer,
    ) -> Result<(Conn, StatInfo), ClientError> {
        let mut c = Conn::connect(source, idle, secret, Some(path), dialer).await?;
        let stat = c.stat_answer().await?;
        Ok((c, stat))
    }

    /// Connects to `source` (`[plain://]HOST:PORT[#NODEID]`), over TLS
    /// unless it says plain, checks its node ID, and completes the
    /// handshake; with `stat`, a STAT for it is sent together with the
    /// HELLO (its answer is left to read).
    pub async fn connect(
        source: &str,
        idle: Duration,
        secret: Option<&[u8]>,
        stat: Option<&str>,
        dialer: &Dialer,
    ) -> Result<Conn, ClientError> {
        use mftd_common::proto::{auth_mac, auth_ok, Role, FLAG_AUTH};
        let src = SourceAddr::parse(source).map_err(ClientError::Protocol)?;
        let addr = src.addr.as_str();
        let sent = Instant::now();
        let tcp = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => return Err(ClientError::ConnectTimeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(ClientError::Refused),
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidInput || e.raw_os_error().is_none() => {
                return Err(ClientError::Resolve(format!("{addr}: {e}")))
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let mut vouched = false;
        let stream = if src.plain {
            if !dialer.known.allows_plain() {
                return Err(ClientError::Identity(format!(
                    "{addr} is a plain:// source, which proves no node ID: refused under node_trust = \"known\""
                )));
            }
            if secret.is_some() {
                return Err(ClientError::Identity(format!(
                    "{addr} is a plain:// source, which cannot prove the shared secret: use TLS (drop plain://)"
                )));
            }
            Link::plain(tcp)
        } else {
            let link = match timeout(idle.max(CONNECT_TIMEOUT), Link::connect(tcp, &dialer.tls)).await {
                Err(_) => return Err(ClientError::Idle(idle)),
                Ok(Err(crate::transport::HandshakeError::Refused(e))) => {
                    return Err(ClientError::Unproven { code: e.code, message: e.message })
                }
                Ok(Err(e)) => return Err(ClientError::Tls(format!("{addr}: {e}"))),
                Ok(Ok(l)) => l,
            };
            let Some(seen) = link.peer.clone() else {
                return Err(ClientError::Identity(format!("{addr} presented no node identity")));
            };
            vouched = dialer.known.check(&src, &seen).map_err(ClientError::Identity)?;
            link
        };
        let node = stream.peer.clone();
        let binding = stream.binding;
        let mut c = Conn { stream, idle, node, rtt: Duration::ZERO };
        let flags = if secret.is_some() { FLAG_AUTH } else { 0 };
        let mut hello = Frame::Hello { magic: MAGIC, version: VERSION, flags }.encode();
        if let (Some(secret), Some(binding)) = (secret, binding) {
            hello.extend_from_slice(&Frame::Auth { mac: auth_mac(secret, Role::Client, &binding) }.encode());
        }
        if let Some(path) = stat {
            hello.extend_from_slice(&Frame::Stat { path: path.to_string() }.encode());
        }
        let hello_sent = Instant::now();
        match timeout(idle, async {
            c.stream.write_all(&hello).await?;
            c.stream.flush().await
        })
        .await
        {
            Err(_) => return Err(ClientError::Idle(idle)),
            Ok(r) => r?,
        }
        let answer = c.recv(idle).await?;
        // The round trip of the HELLO (plain TCP: that of the connect too).
        c.rtt = if src.plain { sent.elapsed() } else { hello_sent.elapsed() };
        match answer {
            Frame::Hello { magic, version, flags } if magic == MAGIC && version == VERSION => {
                let Some(secret) = secret else { return Ok(c) };
                let proof = if flags & FLAG_AUTH != 0 {
                    match c.recv(idle).await? {
                        Frame::Auth { mac } => Some(mac),
                        _ => None,
                    }
                } else {
                    None
                };
                let proven = match (proof, binding) {
                    (Some(mac), Some(b)) => auth_ok(secret, Role::Server, &b, &mac),
                    _ => false,
                };
                if !proven {
                    return Err(ClientError::Identity(format!(
                        "{addr} did not prove the shared secret: refusing it (a server without the secret, or someone in between)"
                    )));
                }
                Ok(c)
            }
            Frame::Hello { version, .. } => Err(ClientError::Protocol(format!(
                "server speaks mftd transfer protocol {version}, this client {VERSION}"
            ))),
            // With a secret, the server is proven only by its AUTH: until
            // then its errors are anyone's (unless a pin vouches for it).
            Frame::Error(e) if secret.is_some() && !vouched && e.code != ErrorCode::AuthFailed => {
                Err(ClientError::Unproven { code: e.code, message: e.message })
            }
            Frame::Error(e) => Err(ClientError::Server { code: e.code, message: e.message }),
            _ => Err(ClientError::Protocol("expected HELLO".into())),
        }
    }

    pub fn transport(&self) -> Transport {
        self.stream.transport()
    }

    async fn recv(&mut self, t: Duration) -> Result<Frame, ClientError> {
        match timeout(t, read_frame(&mut self.stream)).await {
            Err(_) => Err(ClientError::Idle(t)),
            Ok(r) => Ok(r?),
        }
    }

    async fn stat_answer(&mut self) -> Result<StatInfo, ClientError> {
        match self.recv(STAT_TIMEOUT).await? {
            Frame::StatOk(s) => Ok(s),
            Frame::Error(e) => Err(ClientError::Server { code: e.code, message: e.message }),
            _ => Err(ClientError::Protocol("expected STAT_OK or ERROR".into())),
        }
    }

    /// Turns the connection into a stream of requests and answers: the
    /// caller keeps the sending half, a reader task parses what arrives.
    /// The reader ends (and its socket half closes) when the [`Stream`] is
    /// dropped.
    pub fn into_stream(self) -> Stream {
        let (rd, wr) = self.stream.into_split();
        let (tx, events) = mpsc::channel(4);
        let (free_tx, free_rx) = mpsc::channel(8);
        let reader = tokio::spawn(read_events(rd, tx, free_rx));
        Stream { wr, idle: self.idle, next_id: 1, events, free: free_tx, reader }
    }
}

/// Payload buffer size of the reader: bytes are handed on in pieces of up
/// to this size (1 MiB: fewer hand-offs to the blocking pool than 256 KiB,
/// measured at about 10 % less CPU per GiB on loopback).
pub const BUF: usize = 1 << 20;

/// Longest a received byte waits in the reader before it is handed on.
const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// What the server sent, in order.
#[derive(Debug)]
pub enum Event {
    /// A DATA frame announces `len` bytes of request `id` at `offset`; its
    /// bytes follow as `Data` events.
    Header {
        id: u32,
        offset: u64,
        len: u64,
    },
    /// `len` bytes of request `id` at `offset`, in `buf[..len]`.
    Data {
        id: u32,
        offset: u64,
        buf: Vec<u8>,
        len: usize,
    },
    Trimmed {
        id: u32,
        end: u64,
    },
    /// The piece hashes asked for with [`Stream::hashes`].
    Hashes(Vec<[u8; 32]>),
    /// An ERROR frame from the server.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The connection is over; bytes received before it were delivered.
    Failed(ClientError),
}

/// A connection after STAT: READs and TRIMs go out here, answers come back
/// as [`Event`]s.
pub struct Stream {
    wr: OwnedWriteHalf,
    idle: Duration,
    next_id: u32,
    events: mpsc::Receiver<Event>,
    free: mpsc::Sender<Vec<u8>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Stream {
    async fn send(&mut self, f: &Frame) -> Result<(), ClientError> {
        let bytes = f.encode();
        match timeout(self.idle, async {
            self.wr.write_all(&bytes).await?;
            // TLS holds a record back until it is flushed.
            self.wr.flush().await
        })
        .await
        {
            Err(_) => Err(ClientError::Idle(self.idle)),
            Ok(r) => Ok(r?),
        }
    }

    /// Sends a READ for `len` bytes at `offset`; returns its id.
    pub async fn read(
        &mut self,
        path: &str,
        size: u64,
        mtime_ns: i64,
        offset: u64,
        len: u64,
    ) -> Result<u32, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.send(&Frame::Read(ReadReq { id, offset, len, size, mtime_ns, path: path.to_string() })).await?;
        Ok(id)
    }

    /// Asks for the piece hashes of the version `size`, `mtime_ns`.
    pub async fn hashes(&mut self, path: &str, size: u64, mtime_ns: i64) -> Result<(), ClientError> {
        self.send(&Frame::Hashes { size, mtime_ns, path: path.to_string() }).await
    }

    /// Asks the server to end request `id` at `end`.
    pub async fn trim(&mut self, id: u32, end: u64) -> Result<(), ClientError> {
        self.send(&Frame::Trim { id, end }).await
    }

    /// The next event, or `None` if the reader is gone. Cancel-safe.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Gives a payload buffer back to the reader for reuse.
    pub fn recycle(&self, buf: Vec<u8>) {
        let _ = self.free.try_send(buf);
    }
}

/// Reads frames and payload until the connection ends or the receiver is
/// dropped. Payload is delivered in pieces as it arrives, so a connection
/// that fails mid-frame loses nothing that reached us.
async fn read_events(mut rd: OwnedReadHalf, tx: mpsc::Sender<Event>, mut free: mpsc::Receiver<Vec<u8>>) {
    loop {
        let frame = match read_frame(&mut rd).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Event::Failed(e.into())).await;
                return;
            }
        };
        let ev = match frame {
            Frame::Data(DataHeader { id, offset, len }) => {
                // The header goes first so the caller can check it against
                // what it asked for before any byte of it is used.
                if tx.send(Event::Header { id, offset, len }).await.is_err() {
                    return;
                }
                let mut at = offset;
                let end = offset.saturating_add(len);
                while at < end {
                    let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; BUF]);
                    buf.resize(BUF, 0);
                    let want = ((end - at) as usize).min(BUF);
                    let mut filled = 0;
                    let mut err = None;
                    // Hand bytes on at least every FLUSH_AFTER, so a slow
                    // source's progress (and liveness) shows without waiting
                    // for a full buffer.
                    let mut deadline = None;
                    while filled < want {
                        let read = rd.read(&mut buf[filled..want]);
                        let r = match deadline {
                            None => read.await,
                            Some(d) => match tokio::time::timeout_at(d, read).await {
                                Err(_) => break,
                                Ok(r) => r,
                            },
                        };
                        if deadline.is_none() {
                            deadline = Some(tokio::time::Instant::now() + FLUSH_AFTER);
                        }
                        match r {
                            Ok(0) => {
                                err = Some(ClientError::Closed);
                                break;
                            }
                            Ok(n) => filled += n,
                            Err(e) => {
                                err = Some(e.into());
                                break;
                            }
                        }
                    }
                    if filled > 0 && tx.send(Event::Data { id, offset: at, buf, len: filled }).await.is_err() {
                        return;
                    }
                    at += filled as u64;
                    if let Some(e) = err {
                        let _ = tx.send(Event::Failed(e)).await;
                        return;
                    }
                }
                continue;
            }
            Frame::Trimmed { id, end } => Event::Trimmed { id, end },
            Frame::HashesOk { hashes } => Event::Hashes(hashes),
            Frame::Error(e) => Event::Error { code: e.code, message: e.message },
            other => Event::Failed(ClientError::Protocol(format!("unexpected {} frame", other.name()))),
        };
        let last = matches!(ev, Event::Failed(_));
        if tx.send(ev).await.is_err() || last {
            return;
        }
    }
}
