//! The writer of a transfer connection: answers the requests the reader
//! queued, one at a time, in order.
//!
//! Owns: STAT, HASHES and READ answers, the file a READ keeps open for the
//! next one, HASHES waiting for hashing, and sending file bytes (`sendfile`
//! on plain TCP, large writes through rustls on TLS) paced by the listener's
//! rate limit and judged by [`PeerPace`]. Must never: read a path that the
//! jail did not open, or send a byte past the end a TRIM left a READ.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, Interest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use mftd_common::proto::{DataHeader, ErrorCode, ErrorFrame, Frame, ReadReq, StatInfo, DATA_CHUNK};

use super::pace::PeerPace;
use super::queue::{trim_current, Request, RequestQueue};
use super::{send_error, write_frame, ConnError, Egress, ServeContext};
use crate::identity::{mtime_ns, Hashing};
use crate::jail::JailError;
use crate::transport::WriteHalf;

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

struct OpenFile {
    path: String,
    file: File,
}

/// One connection's writer and what its answers carry from one request to
/// the next.
pub(super) struct Writer<'a, 'c> {
    wr: WriteHalf<'c>,
    ctx: &'a ServeContext,
    egress: &'a Egress,
    /// Cancelled when the listener stops or the daemon shuts down.
    token: &'a CancellationToken,
    queue: &'a RequestQueue,
    /// The file of the last READ, reused by the next READ of the same path.
    open: Option<OpenFile>,
    /// HASHES waiting for their files' hashing, oldest first.
    hashes: VecDeque<PendingHashes>,
    pace: PeerPace,
}

impl<'a, 'c> Writer<'a, 'c> {
    pub(super) fn new(
        wr: WriteHalf<'c>,
        ctx: &'a ServeContext,
        egress: &'a Egress,
        token: &'a CancellationToken,
        queue: &'a RequestQueue,
    ) -> Writer<'a, 'c> {
        let pace = PeerPace::new(&ctx.settings(), wr.fd());
        Writer { wr, ctx, egress, token, queue, open: None, hashes: VecDeque::new(), pace }
    }

    /// Answers requests in order until the reader ends and nothing is
    /// left to answer, or the connection fails.
    pub(super) async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            let next = loop {
                let arrived = self.queue.arrived.notified();
                let (fatal, req, closed) = {
                    let mut st = self.queue.lock();
                    let fatal = st.fatal.take();
                    let req = st.requests.pop_front();
                    st.busy = req.is_some();
                    (fatal, req, st.closed)
                };
                if req.is_none() {
                    // Nothing open: TRIMs can only be about finished requests.
                    for (id, end) in self.queue.take_trims(None) {
                        write_frame(&mut self.wr, &Frame::Trimmed { id, end }).await?;
                    }
                }
                if let Some(e) = fatal {
                    let _ = write_frame(&mut self.wr, &Frame::Error(e)).await;
                    return Ok(());
                }
                if let Some(r) = req {
                    self.queue.taken.notify_one();
                    break r;
                }
                if closed && self.hashes.is_empty() {
                    return Ok(());
                }
                // Idle: wait for a request, or for the oldest pending HASHES.
                match self.hashes.front() {
                    Some(h) => {
                        let done = h.hashing.clone().wait();
                        tokio::select! {
                            _ = arrived => {}
                            _ = done => {}
                        }
                        answer_hashes(&mut self.wr, &mut self.hashes).await?;
                    }
                    None => {
                        // Idle, but a peer that still owes acknowledgements
                        // is judged on.
                        self.pace.settle(&self.wr);
                        match self.pace.window_end() {
                            None => arrived.await,
                            Some(end) => tokio::select! {
                                _ = arrived => {}
                                _ = tokio::time::sleep_until(end.into()) => self.pace.judge()?,
                            },
                        }
                    }
                }
            };
            match next {
                Request::Stat(path) => self.stat(&path).await?,
                Request::Hashes { size, mtime_ns, path } => {
                    if let Some(p) = self.take_hashes(&path, size, mtime_ns).await? {
                        if self.hashes.len() >= MAX_PENDING_HASHES {
                            let message = format!("more than {MAX_PENDING_HASHES} HASHES waiting for hashing");
                            let _ = write_frame(
                                &mut self.wr,
                                &Frame::Error(ErrorFrame { id: 0, code: ErrorCode::BadFrame, message }),
                            )
                            .await;
                            return Err(ConnError::Closed("too many pending HASHES".into()));
                        }
                        self.hashes.push_back(p);
                    }
                }
                Request::Read(req, trimmed) => self.read(req, trimmed).await?,
            }
        }
    }

    /// Answers a STAT: the file's size, mtime and piece size, and its root
    /// when it is hashed (or small enough to hash now).
    async fn stat(&mut self, path: &str) -> Result<(), ConnError> {
        let (stream, ctx) = (&mut self.wr, self.ctx);
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
            return send_error(
                stream,
                0,
                ErrorCode::FileChanged,
                format!("{path:?} changed while being hashed; retry"),
            )
            .await;
        }
        let piece_size = mftd_common::proto::piece_size_for(meta.size());
        let info = StatInfo { size: meta.size(), mtime_ns: mtime_ns(&meta), piece_size, root };
        write_frame(stream, &Frame::StatOk(info)).await
    }

    /// Takes a HASHES: the piece hashes of the version the client STATed. The
    /// answer goes out now if the file is hashed, otherwise the request is
    /// returned to be answered when it is (see [`answer_hashes`]).
    async fn take_hashes(&mut self, path: &str, size: u64, mtime: i64) -> Result<Option<PendingHashes>, ConnError> {
        let (stream, ctx) = (&mut self.wr, self.ctx);
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
        let mut pending = VecDeque::from([PendingHashes { path: path.into(), file, size, mtime, hashing }]);
        answer_hashes(stream, &mut pending).await?;
        Ok(pending.pop_front())
    }

    /// Answers a READ: DATA frames of the range asked for, applying TRIMs
    /// between them and answering HASHES whose hashing is over.
    async fn read(&mut self, req: ReadReq, trimmed: Option<u64>) -> Result<(), ConnError> {
        let Writer { wr: stream, ctx, egress, token, queue, open, hashes, pace } = self;
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
}

fn jail_message(e: &JailError, path: &str) -> String {
    match e {
        // Uniform on purpose: the peer must not learn what lies outside.
        JailError::Refused => format!("{path:?}: not accessible"),
        JailError::Io(_) => format!("{path:?}: server i/o error"),
        other => format!("{path:?}: {other}"),
    }
}

/// Answers the pending HASHES whose files are hashed, oldest first.
async fn answer_hashes(stream: &mut WriteHalf<'_>, pending: &mut VecDeque<PendingHashes>) -> Result<(), ConnError> {
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

/// Applies pending TRIMs: those for `id` (being sent from `pos`, currently
/// ending at `end`) move its end, never below `pos`; every TRIM is answered
/// with TRIMMED. Returns the new end of `id`.
async fn apply_trims(
    stream: &mut WriteHalf<'_>,
    queue: &RequestQueue,
    id: u32,
    pos: u64,
    end: u64,
) -> Result<u64, ConnError> {
    let (end, answers) = trim_current(queue.take_trims(Some(id)), id, pos, end);
    for (tid, answer) in answers {
        write_frame(stream, &Frame::Trimmed { id: tid, end: answer }).await?;
    }
    Ok(end)
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
