//! The one connection type listeners and downloads talk through: plain TCP
//! or TLS 1.3 over it, chosen per listener and per source.
//!
//! Plain connections keep the zero-copy `sendfile` path; TLS connections
//! send through rustls in large writes (full 16 KiB records). After the
//! handshake a TLS connection knows its peer's node ID and its channel
//! binding (the TLS exporter value both proofs of a shared secret are
//! bound to).
//!
//! Kernel TLS is the next step: after the handshake, rustls can hand its
//! traffic secrets over (`dangerous_extract_secrets`) to `setsockopt(SOL_TLS,
//! TLS_TX/TLS_RX)`, and the socket is a plain descriptor again on which
//! `sendfile` encrypts in the kernel. The probe is `setsockopt(fd,
//! SOL_TCP, TCP_ULP, "tls")` on a connected socket (ENOENT: no
//! `CONFIG_TLS`). This project's machines have no `CONFIG_TLS`, so no kTLS
//! path ships until a test can exercise it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use crate::node::{NodeId, TlsConfigs};
use mftd_common::proto::EXPORTER_LABEL;

/// Plain TCP or TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tls,
    Plain,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls" => Ok(Transport::Tls),
            "plain" => Ok(Transport::Plain),
            _ => Err(format!("{s:?}: transport is tls or plain")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tls => "tls",
            Transport::Plain => "plain",
        })
    }
}

/// A connected transfer connection.
pub struct Conn {
    io: Io,
    /// TLS exporter value ([`EXPORTER_LABEL`]); `None` on plain TCP.
    pub binding: Option<[u8; 32]>,
    /// The peer's node ID (TLS with a client certificate, or any TLS
    /// server).
    pub peer: Option<NodeId>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<Sniff>>),
}

/// A TCP stream that keeps a copy of the first bytes it reads, so a
/// client whose TLS handshake fails can tell a server's plaintext refusal
/// (`ERROR BUSY`, `NOT_ALLOWED`: sent before any TLS) from a broken peer.
pub struct Sniff {
    tcp: TcpStream,
    seen: Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>,
}

/// Bytes a client keeps of what arrives before its handshake is done.
const SNIFF: usize = 512;

impl AsyncRead for Sniff {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.tcp).poll_read(cx, buf);
        if let Some(seen) = &me.seen {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            let new = &buf.filled()[before..];
            let room = SNIFF.saturating_sub(seen.len()).min(new.len());
            seen.extend_from_slice(&new[..room]);
        }
        r
    }
}

impl AsyncWrite for Sniff {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server refused the connection in plaintext before TLS.
    #[error("server error {}: {}", .0.code, .0.message)]
    Refused(mftd_common::proto::ErrorFrame),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("TLS: {0}")]
    Export(String),
}

fn binding_of(common: &rustls::ConnectionCommon<impl Sized>) -> Result<[u8; 32], HandshakeError> {
    common
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| HandshakeError::Export(format!("cannot derive the channel binding: {e}")))
}

/// A plaintext `ERROR` frame at the start of what a server sent.
fn refusal(seen: &[u8]) -> Option<mftd_common::proto::ErrorFrame> {
    use mftd_common::proto::{Frame, HEADER_LEN, T_ERROR};
    if seen.len() < HEADER_LEN || seen[0] != T_ERROR {
        return None;
    }
    let len = u32::from_be_bytes([seen[1], seen[2], seen[3], seen[4]]) as usize;
    // Only what a server says before TLS: anything else in clear is no
    // server of ours speaking.
    use mftd_common::proto::ErrorCode;
    match Frame::decode(T_ERROR, seen.get(HEADER_LEN..HEADER_LEN + len)?) {
        Ok(Frame::Error(e)) if matches!(e.code, ErrorCode::Busy | ErrorCode::NotAllowed | ErrorCode::BadHandshake) => {
            Some(e)
        }
        _ => None,
    }
}

fn peer_of(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<NodeId> {
    certs.and_then(|c| c.first()).map(|c| NodeId::of(c))
}

impl Conn {
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn { io: Io::Plain(tcp), binding: None, peer: None }
    }

    /// Server side of the TLS handshake.
    pub async fn accept(tcp: TcpStream, tls: &TlsConfigs) -> Result<Conn, HandshakeError> {
        let tcp = Sniff { tcp, seen: None };
        let s = tokio_rustls::TlsAcceptor::from(tls.server.clone()).accept(tcp).await.map_err(HandshakeError::Tls)?;
        let (_, c) = s.get_ref();
        let binding = binding_of(c)?;
        let peer = peer_of(c.peer_certificates());
        Ok(Conn { io: Io::Tls(Box::new(TlsStream::Server(s))), binding: Some(binding), peer })
    }

    /// Client side of the TLS handshake.
    pub async fn connect(tcp: TcpStream, tls: &TlsConfigs) -> Result<Conn, HandshakeError> {
        let name = rustls::pki_types::ServerName::try_from("mftd").expect("a valid name");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tcp = Sniff { tcp, seen: Some(seen.clone()) };
        let mut s = match tokio_rustls::TlsConnector::from(tls.client.clone()).connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => {
                let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                return Err(refusal(&seen).map_or(HandshakeError::Tls(e), HandshakeError::Refused));
            }
        };
        // Handshake done: stop copying.
        s.get_mut().0.seen = None;
        let (_, c) = s.get_ref();
        let binding = binding_of(c)?;
        let peer = peer_of(c.peer_certificates());
        Ok(Conn { io: Io::Tls(Box::new(TlsStream::Client(s))), binding: Some(binding), peer })
    }

    pub fn transport(&self) -> Transport {
        match self.io {
            Io::Plain(_) => Transport::Plain,
            Io::Tls(_) => Transport::Tls,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(s) => s,
            Io::Tls(s) => &s.get_ref().0.tcp,
        }
    }

    /// Borrowed halves, for a reader and a writer working at once.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match &mut self.io {
            Io::Plain(s) => {
                let fd = s.as_raw_fd();
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf { inner: WriteInner::Plain(w), fd })
            }
            Io::Tls(s) => {
                let fd = s.get_ref().0.tcp.as_raw_fd();
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf { inner: WriteInner::Tls(w), fd })
            }
        }
    }

    /// Owned halves.
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        match self.io {
            Io::Plain(s) => {
                let (r, w) = s.into_split();
                (OwnedReadHalf::Plain(r), OwnedWriteHalf::Plain(w))
            }
            Io::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (OwnedReadHalf::Tls(r), OwnedWriteHalf::Tls(w))
            }
        }
    }
}

macro_rules! delegate_read {
    ($t:ty, $($v:ident),+) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty, $($v:ident),+) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$v(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

pub enum ReadHalf<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<Sniff>>),
}
delegate_read!(ReadHalf<'_>, Plain, Tls);

/// The sending half, with the socket's descriptor for what only the socket
/// knows (its send queue, `sendfile`).
pub struct WriteHalf<'a> {
    inner: WriteInner<'a>,
    fd: RawFd,
}

pub enum WriteInner<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<Sniff>>),
}
delegate_write!(WriteInner<'_>, Plain, Tls);

impl WriteHalf<'_> {
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The plain TCP stream, when there is no TLS in the way (`sendfile`).
    pub fn plain_tcp(&self) -> Option<&TcpStream> {
        match &self.inner {
            WriteInner::Plain(w) => Some(w.as_ref()),
            WriteInner::Tls(_) => None,
        }
    }

    /// Bytes in the socket's send queue not yet acknowledged by the peer.
    pub fn unacked(&self) -> Option<u64> {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the pointer; the socket
        // lives as long as the connection this half borrows.
        let r = unsafe { libc::ioctl(self.fd, libc::TIOCOUTQ, &mut queued) };
        (r == 0).then_some(queued.max(0) as u64)
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

pub enum OwnedReadHalf {
    Plain(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<Sniff>>),
}
delegate_read!(OwnedReadHalf, Plain, Tls);

pub enum OwnedWriteHalf {
    Plain(tokio::net::tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<Sniff>>),
}
delegate_write!(OwnedWriteHalf, Plain, Tls);
