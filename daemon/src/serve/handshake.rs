//! The handshake of a transfer connection: TLS (or plain TCP) as the
//! listener says, then mftd's HELLO, the node allow list and the proofs of
//! the shared secret.
//!
//! Owns: telling a TLS ClientHello from a plaintext HELLO on the first
//! byte, and refusing the wrong one in words the client can act on. Must
//! never: read more than a HELLO's worth before the handshake is done, or
//! wait past the handshake deadline.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use mftd_common::proto::{ErrorCode, Frame, ProtoError, MAGIC, VERSION};

use super::{send_error, ConnError, Egress, ServeContext, ServeSettings, WRITE_TIMEOUT};
use crate::transport::{Conn, Transport};

/// First byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The connection's transport: TLS on a TLS listener (within the handshake
/// deadline), else plain TCP. A plaintext mftd `HELLO` sent to a TLS
/// listener gets a plaintext `ERROR` that says so.
pub(super) async fn secure(
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

/// The mftd handshake over an established transport: the client's HELLO
/// (and proof, if it sends one), the allow list of node IDs, the shared
/// secret, then this server's HELLO (and proof). All within `deadline`.
pub(super) async fn hello(
    stream: &mut Conn,
    settings: &ServeSettings,
    deadline: tokio::time::Instant,
) -> Result<(), ConnError> {
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
    Ok(())
}
