//! Client side of the transfer protocol: connect, handshake, STAT, and
//! pipelined READs. Every wait on the peer has a timeout, and every answer is
//! checked against what was asked before a byte of it is used.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use mftd_common::proto::{read_frame, DataHeader, ErrorCode, Frame, ProtoError, ReadReq, StatInfo, MAGIC, VERSION};
use mftd_common::range::Range;

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
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("cannot resolve {0}")]
    Resolve(String),
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
                    | ErrorCode::AuthFailed
                    | ErrorCode::NotAllowed
            ),
            ClientError::Protocol(_) => true,
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
    stream: TcpStream,
    idle: Duration,
    next_id: u32,
}

impl Conn {
    /// Connects and completes the handshake.
    pub async fn connect(addr: &str, idle: Duration, secret: Option<&[u8]>) -> Result<Conn, ClientError> {
        let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => return Err(ClientError::ConnectTimeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(ClientError::Refused),
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidInput || e.raw_os_error().is_none() => {
                return Err(ClientError::Resolve(format!("{addr}: {e}")))
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let mut c = Conn { stream, idle, next_id: 1 };
        let flags = if secret.is_some() { mftd_common::proto::FLAG_AUTH } else { 0 };
        c.send(&Frame::Hello { magic: MAGIC, version: VERSION, flags }).await?;
        let mut answer = c.recv(idle).await?;
        if let Frame::Challenge { nonce } = answer {
            let Some(secret) = secret else {
                return Err(ClientError::Server {
                    code: ErrorCode::AuthFailed,
                    message: "the server requires authentication; set auth_secret_file (or get --secret-file)".into(),
                });
            };
            c.send(&Frame::Auth { mac: mftd_common::proto::auth_mac(secret, &nonce) }).await?;
            answer = c.recv(idle).await?;
        }
        match answer {
            Frame::Hello { magic, version, .. } if magic == MAGIC && version == VERSION => Ok(c),
            Frame::Hello { version, .. } => Err(ClientError::Protocol(format!(
                "server speaks mftd transfer protocol {version}, this client {VERSION}"
            ))),
            Frame::Error(e) => Err(ClientError::Server { code: e.code, message: e.message }),
            _ => Err(ClientError::Protocol("expected HELLO".into())),
        }
    }

    async fn send(&mut self, f: &Frame) -> Result<(), ClientError> {
        match timeout(self.idle, self.stream.write_all(&f.encode())).await {
            Err(_) => Err(ClientError::Idle(self.idle)),
            Ok(r) => Ok(r?),
        }
    }

    async fn recv(&mut self, t: Duration) -> Result<Frame, ClientError> {
        match timeout(t, read_frame(&mut self.stream)).await {
            Err(_) => Err(ClientError::Idle(t)),
            Ok(r) => Ok(r?),
        }
    }

    pub async fn stat(&mut self, path: &str) -> Result<StatInfo, ClientError> {
        self.send(&Frame::Stat { path: path.to_string() }).await?;
        match self.recv(STAT_TIMEOUT).await? {
            Frame::StatOk(s) => Ok(s),
            Frame::Error(e) => Err(ClientError::Server { code: e.code, message: e.message }),
            _ => Err(ClientError::Protocol("expected STAT_OK or ERROR".into())),
        }
    }

    /// Sends a READ for `r`; returns its id.
    pub async fn request(&mut self, path: &str, size: u64, mtime_ns: i64, r: Range) -> Result<u32, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let req = ReadReq { id, offset: r.start, len: r.len(), size, mtime_ns, path: path.to_string() };
        self.send(&Frame::Read(req)).await?;
        Ok(id)
    }

    /// Reads the answer header for the request `(id, r)`, which must be the
    /// oldest outstanding one.
    pub async fn data_header(&mut self, id: u32, r: Range) -> Result<(), ClientError> {
        match self.recv(self.idle).await? {
            Frame::Data(DataHeader { id: got, offset, len }) => {
                if got != id || offset != r.start || len != r.len() {
                    return Err(ClientError::Protocol(format!(
                        "asked for id {id} bytes {}+{}, server sent id {got} bytes {offset}+{len}",
                        r.start,
                        r.len()
                    )));
                }
                Ok(())
            }
            Frame::Error(e) => Err(ClientError::Server { code: e.code, message: e.message }),
            _ => Err(ClientError::Protocol("expected DATA or ERROR".into())),
        }
    }

    /// Reads up to `buf.len()` payload bytes; at least one.
    pub async fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, ClientError> {
        match timeout(self.idle, self.stream.read(buf)).await {
            Err(_) => Err(ClientError::Idle(self.idle)),
            Ok(Ok(0)) => Err(ClientError::Closed),
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}
