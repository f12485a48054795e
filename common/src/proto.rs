//! Transfer protocol v4 frames: encoding, decoding and limits.
//!
//! The normative description is in the [crate docs](crate). This module turns
//! frames into bytes and back; it never allocates more than [`MAX_FRAME`] for
//! a frame no matter what a peer announces.

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version spoken by this build.
pub const VERSION: u16 = 4;
/// Magic bytes opening every `HELLO`.
pub const MAGIC: [u8; 4] = *b"MFTD";
/// Largest frame body accepted from a peer, checked before allocating.
pub const MAX_FRAME: u32 = 1 << 20;
/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Most file bytes one `DATA` frame may announce. A `READ` may ask for any
/// range of the file; the server streams it as a sequence of `DATA` frames of
/// at most this many bytes each, so it can stop early after a `TRIM`.
pub const MAX_DATA: u64 = 4 << 20;
/// Largest `DATA` frame a server sends (a quarter of [`MAX_DATA`]): small
/// enough that a `TRIM` takes effect within about a megabyte.
pub const DATA_CHUNK: u64 = 1 << 20;
/// Sent in `TRIMMED` for a request the server no longer has open.
pub const TRIM_NOT_OPEN: u64 = u64::MAX;
/// Smallest piece size; see [`piece_size_for`].
pub const MIN_PIECE: u32 = 256 << 10;
/// Most pieces a file is cut into; bounds the size of `HASHES_OK`.
pub const MAX_PIECES: u64 = 16384;
/// Longest ERROR message kept, in bytes (longer ones are cut on both sides).
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Size of the fixed frame header: type (1) + length (4).
pub const HEADER_LEN: usize = 5;

/// Type byte of `HELLO`, the first frame both ways: magic (4) · version u16 · flags u16.
pub const T_HELLO: u8 = 0x01;
/// Type byte of `STAT`, client → server: the whole body is the path.
pub const T_STAT: u8 = 0x02;
/// Type byte of `READ`, client → server: a byte range to stream (see [`ReadReq`]).
pub const T_READ: u8 = 0x03;
/// Type byte of `AUTH`, both ways right behind a `HELLO` with [`FLAG_AUTH`]: a 32-byte proof.
pub const T_AUTH: u8 = 0x04;
/// Type byte of `TRIM`, client → server: id u32 · end u64.
pub const T_TRIM: u8 = 0x05;
/// Type byte of `HASHES`, client → server: size u64 · mtime_ns i64 · path (rest).
pub const T_HASHES: u8 = 0x06;
/// Type byte of `TRIMMED`, server → client: id u32 · end u64.
pub const T_TRIMMED: u8 = 0x85;
/// Type byte of `HASHES_OK`, server → client: count u32 · count × 32-byte hash.
pub const T_HASHES_OK: u8 = 0x86;
// 0x84 was CHALLENGE (versions 1-3); never reused.
/// Type byte of `STAT_OK`, server → client: a 57-byte body (see [`StatInfo`]).
pub const T_STAT_OK: u8 = 0x82;
/// Type byte of `DATA`, server → client: a 20-byte [`DataHeader`]; the file bytes follow outside the frame.
pub const T_DATA: u8 = 0x83;
/// Type byte of `ERROR`, server → client: id u32 · code u16 · message (rest).
pub const T_ERROR: u8 = 0x7f;

/// Stable error codes carried by `ERROR` frames. Numbers never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Frame could not be parsed (unknown type, short body, bad UTF-8...).
    BadFrame = 1,
    /// First frame was not a valid `HELLO`.
    BadHandshake = 2,
    /// Peers speak different protocol versions.
    VersionMismatch = 3,
    /// Path is malformed: empty, absolute, `..`, NUL, backslash, too long.
    BadPath = 4,
    /// No such file under the export root.
    NotFound = 5,
    /// Path resolves outside the export root or is not readable.
    PathRefused = 6,
    /// Path is a directory, device, FIFO or socket.
    NotRegular = 7,
    /// Byte range is outside the file.
    BadRange = 8,
    /// File changed since the client's `STAT`.
    FileChanged = 9,
    /// Listener is at its connection cap.
    Busy = 10,
    /// Server-side I/O error.
    Io = 11,
    /// Authentication required and missing or wrong.
    AuthFailed = 12,
    /// The client's address is not in the listener's allow list.
    NotAllowed = 13,
    /// Any code this build does not know.
    Unknown = 0xffff,
}

impl ErrorCode {
    /// The code a number off the wire stands for; numbers this build does not know are [`ErrorCode::Unknown`].
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        match v {
            1 => BadFrame,
            2 => BadHandshake,
            3 => VersionMismatch,
            4 => BadPath,
            5 => NotFound,
            6 => PathRefused,
            7 => NotRegular,
            8 => BadRange,
            9 => FileChanged,
            10 => Busy,
            11 => Io,
            12 => AuthFailed,
            13 => NotAllowed,
            _ => Unknown,
        }
    }

    /// Stable snake_case name (`not_found`), what `Display` prints in logs and messages.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadFrame => "bad_frame",
            BadHandshake => "bad_handshake",
            VersionMismatch => "version_mismatch",
            BadPath => "bad_path",
            NotFound => "not_found",
            PathRefused => "path_refused",
            NotRegular => "not_regular",
            BadRange => "bad_range",
            FileChanged => "file_changed",
            Busy => "busy",
            Io => "io",
            AuthFailed => "auth_failed",
            NotAllowed => "not_allowed",
            Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `READ` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReq {
    /// Client's number for the request, echoed in its `DATA`, `TRIMMED` and `ERROR`; mftd never uses 0.
    pub id: u32,
    /// File offset of the first byte asked for.
    pub offset: u64,
    /// Bytes asked for, any number (0 gets one empty `DATA`); past the end of the file gets `BAD_RANGE`.
    pub len: u64,
    /// File version the client expects (from its `STAT`).
    pub size: u64,
    /// Modification time from the same `STAT`, ns since the Unix epoch; with `size`, a mismatch gets `FILE_CHANGED`.
    pub mtime_ns: i64,
    /// Path relative to the export root: the rest of the body, at most [`MAX_PATH`] bytes.
    pub path: String,
}

/// Header of a `DATA` answer; `len` raw bytes follow it on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// The `READ` these bytes answer: the oldest one still open on the connection.
    pub id: u32,
    /// File offset of the first byte that follows: where the request's previous `DATA` stopped.
    pub offset: u64,
    /// Raw bytes after the header: at most [`MAX_DATA`] accepted, at most [`DATA_CHUNK`] sent.
    pub len: u64,
}

/// A file's content identity: per-piece BLAKE3 hashes and their root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// File size in bytes; hashed into the root, so files of other sizes never match.
    pub size: u64,
    /// Bytes per piece (the last piece may be shorter): [`piece_size_for`]`(size)`.
    pub piece_size: u32,
    /// BLAKE3 hash of each piece, in file order: what `HASHES_OK` carries.
    pub hashes: Vec<[u8; 32]>,
    /// [`root_of`]`(size, piece_size, hashes)`: what `STAT_OK` carries.
    pub root: [u8; 32],
}

impl Identity {
    /// Builds an identity from piece hashes, computing the root.
    pub fn from_hashes(size: u64, piece_size: u32, hashes: Vec<[u8; 32]>) -> Identity {
        let root = root_of(size, piece_size, &hashes);
        Identity { size, piece_size, hashes, root }
    }

    /// Pieces of the file (also when the hashes are not known yet).
    pub fn piece_count(&self) -> usize {
        piece_count_for(self.size, self.piece_size) as usize
    }

    /// Whether `hashes` are this identity's piece hashes.
    pub fn matches(&self, hashes: &[[u8; 32]]) -> bool {
        hashes.len() == self.piece_count() && root_of(self.size, self.piece_size, hashes) == self.root
    }

    /// Byte range `[start, end)` of piece `i`.
    pub fn piece_range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.piece_size as u64;
        (start, (start + self.piece_size as u64).min(self.size))
    }

    /// The root as 64 lowercase hex digits, for people and manifests.
    pub fn root_hex(&self) -> String {
        hex::encode(self.root)
    }
}

/// Root hash over a file's size, piece size and piece hashes.
pub fn root_of(size: u64, piece_size: u32, hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&size.to_be_bytes());
    h.update(&piece_size.to_be_bytes());
    for p in hashes {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Piece size for a file of `size` bytes: [`MIN_PIECE`], doubled until the
/// file has at most [`MAX_PIECES`] pieces.
pub fn piece_size_for(size: u64) -> u32 {
    let mut p = MIN_PIECE as u64;
    while size.div_ceil(p) > MAX_PIECES && p < (1u64 << 31) {
        p *= 2;
    }
    p as u32
}

/// Number of pieces of a file.
pub fn piece_count_for(size: u64, piece_size: u32) -> u64 {
    size.div_ceil(piece_size as u64)
}

/// The bytes of pieces `first..end` of a `size`-byte file (the last piece
/// may be short; pieces past the end are empty at the end).
pub fn pieces_range(size: u64, piece_size: u32, first: u64, end: u64) -> crate::range::Range {
    let ps = piece_size as u64;
    crate::range::Range::new(first.saturating_mul(ps).min(size), end.saturating_mul(ps).min(size))
}

/// The bytes of piece `i`.
pub fn piece_range(size: u64, piece_size: u32, i: u64) -> crate::range::Range {
    pieces_range(size, piece_size, i, i.saturating_add(1))
}

/// `STAT_OK` contents: what the vote and the first READ need, small on
/// the wire. The piece hashes come with `HASHES_OK`. `root` is `None` while
/// the server is still hashing the file: data can flow before it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatInfo {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, ns since the Unix epoch; the client sends it back in `READ` and `HASHES`.
    pub mtime_ns: i64,
    /// Bytes per piece, never 0; a client drops a source whose value is not [`piece_size_for`]`(size)`.
    pub piece_size: u32,
    /// Content identity root; `None` is sent as `hashed` = 0 and 32 zero bytes.
    pub root: Option<[u8; 32]>,
}

impl StatInfo {
    /// Pieces of the file: the `count` field on the wire, which decoding checks against size and piece size.
    pub fn piece_count(&self) -> u64 {
        piece_count_for(self.size, self.piece_size)
    }
}

/// An `ERROR` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The `READ` the error is about, or 0: the handshake, a `STAT`, a `HASHES` or the connection.
    pub id: u32,
    /// What went wrong; after some codes the server closes the connection (see the crate docs).
    pub code: ErrorCode,
    /// Detail for people, at most [`MAX_ERROR_MESSAGE`] bytes of UTF-8 (cut at a character boundary).
    pub message: String,
}

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame both ways: the protocol version, and whether an `AUTH` follows.
    Hello {
        /// Must be [`MAGIC`]; anything else gets `BAD_HANDSHAKE`.
        magic: [u8; 4],
        /// The sender's [`VERSION`]; the server answers another with `VERSION_MISMATCH`.
        version: u16,
        /// Bit set of `FLAG_*` ([`FLAG_AUTH`] only, so far); unknown bits are ignored.
        flags: u16,
    },
    /// Client → server: size, mtime and identity of a file, answered by `STAT_OK` or an `ERROR` with id 0.
    Stat {
        /// Relative to the export root: the whole body, at most [`MAX_PATH`] bytes.
        path: String,
    },
    /// Client → server: stream a byte range of a file as `DATA` frames.
    Read(ReadReq),
    /// Server → client: the answer to `STAT`.
    StatOk(StatInfo),
    /// Server → client: announces file bytes that follow the frame raw.
    Data(DataHeader),
    /// Server → client: a request or the whole connection failed.
    Error(ErrorFrame),
    /// Both ways, right behind a `HELLO` with [`FLAG_AUTH`]: proof of the
    /// shared secret, bound to this TLS channel ([`auth_mac`]).
    Auth {
        /// HMAC-SHA256(secret, role label · exporter value); checked in constant time by [`auth_ok`].
        mac: [u8; 32],
    },
    /// Client → server: stop request `id` at byte `end` (exclusive) instead
    /// of its original end, or as soon after as the server can.
    Trim {
        /// The `READ` to shorten.
        id: u32,
        /// File offset to stop at (exclusive); the offset of a request not yet started cancels it.
        end: u64,
    },
    /// Server → client: request `id` ends at byte `end` (never before what
    /// the server already sent), or [`TRIM_NOT_OPEN`] if it was finished.
    Trimmed {
        /// The `READ` a `TRIM` was about.
        id: u32,
        /// File offset where the server really stops (exclusive), or [`TRIM_NOT_OPEN`].
        end: u64,
    },
    /// Client → server: the piece hashes of `path` in the version `size`,
    /// `mtime_ns` (from STAT).
    Hashes {
        /// File size from `STAT_OK`; another version gets `FILE_CHANGED`.
        size: u64,
        /// Modification time from the same `STAT_OK`, ns since the Unix epoch.
        mtime_ns: i64,
        /// Path as sent in `STAT`: the rest of the body.
        path: String,
    },
    /// Server → client: every piece hash, in order.
    HashesOk {
        /// As many as `STAT_OK`'s piece count; the client checks them against the root before use.
        hashes: Vec<[u8; 32]>,
    },
}

/// HELLO flag: an `AUTH` frame (proof of the shared secret) follows.
pub const FLAG_AUTH: u16 = 0x0001;

/// TLS exporter label (RFC 8446 section 7.5) of the value both proofs of
/// the shared secret are bound to; 32 bytes, no context.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-mftd-v4-auth";

/// Which side of a connection a proof comes from: the two proofs differ,
/// so one cannot be reflected back as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected: a downloading `mftd` (label `mftd-v4 client proof`).
    Client,
    /// The transfer listener (label `mftd-v4 server proof`).
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"mftd-v4 client proof",
            Role::Server => b"mftd-v4 server proof",
        }
    }
}

fn auth_hmac(secret: &[u8], role: Role, binding: &[u8; 32]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::{Hmac, Mac};
    // HMAC accepts keys of any length, so this never fails.
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<sha2::Sha256> as Mac>::new_from_slice(&[0u8; 32]).expect("32-byte key"));
    m.update(role.label());
    m.update(binding);
    m
}

/// Proof of the shared secret by `role`: HMAC-SHA256(secret, label · binding)
/// where `binding` is the connection's TLS exporter value
/// ([`EXPORTER_LABEL`]): a proof is worth nothing on any other connection.
pub fn auth_mac(secret: &[u8], role: Role, binding: &[u8; 32]) -> [u8; 32] {
    use hmac::Mac;
    auth_hmac(secret, role, binding).finalize().into_bytes().into()
}

/// Checks a proof from `role` in constant time.
pub fn auth_ok(secret: &[u8], role: Role, binding: &[u8; 32], mac: &[u8; 32]) -> bool {
    use hmac::Mac;
    auth_hmac(secret, role, binding).verify_slice(mac).is_ok()
}

/// Why bytes from a peer could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// End of stream before a whole frame: between two frames or inside one.
    #[error("connection closed by peer")]
    Closed,
    /// The header announced a body over the limit in force (smaller during
    /// the handshake); nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The body length the header announced.
        len: u32,
        /// The limit in force where it was read.
        limit: u32,
    },
    /// The type byte, none of the `T_*` constants; [`read_frame`] does not read the body.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body does not fit its type: too short, trailing bytes, a value out of range.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// The frame's name as the protocol docs spell it (`STAT_OK`).
        kind: &'static str,
        /// What is wrong with the body.
        why: &'static str,
    },
    /// Reading the stream failed other than by end of stream.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl Frame {
    /// The frame's name as the protocol docs spell it (`STAT_OK`), for
    /// messages about unexpected frames.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Stat { .. } => "STAT",
            Frame::Read(_) => "READ",
            Frame::StatOk(_) => "STAT_OK",
            Frame::Data(_) => "DATA",
            Frame::Error(_) => "ERROR",
            Frame::Auth { .. } => "AUTH",
            Frame::Trim { .. } => "TRIM",
            Frame::Trimmed { .. } => "TRIMMED",
            Frame::Hashes { .. } => "HASHES",
            Frame::HashesOk { .. } => "HASHES_OK",
        }
    }

    /// The frame as bytes on the wire, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Frame::Hello { magic, version, flags } => {
                body.extend_from_slice(magic);
                body.extend_from_slice(&version.to_be_bytes());
                body.extend_from_slice(&flags.to_be_bytes());
                T_HELLO
            }
            Frame::Stat { path } => {
                body.extend_from_slice(path.as_bytes());
                T_STAT
            }
            Frame::Read(r) => {
                body.extend_from_slice(&r.id.to_be_bytes());
                body.extend_from_slice(&r.offset.to_be_bytes());
                body.extend_from_slice(&r.len.to_be_bytes());
                body.extend_from_slice(&r.size.to_be_bytes());
                body.extend_from_slice(&r.mtime_ns.to_be_bytes());
                body.extend_from_slice(r.path.as_bytes());
                T_READ
            }
            Frame::StatOk(s) => {
                body.extend_from_slice(&s.size.to_be_bytes());
                body.extend_from_slice(&s.mtime_ns.to_be_bytes());
                body.extend_from_slice(&s.piece_size.to_be_bytes());
                body.extend_from_slice(&(s.piece_count() as u32).to_be_bytes());
                body.push(s.root.is_some() as u8);
                body.extend_from_slice(&s.root.unwrap_or([0; 32]));
                T_STAT_OK
            }
            Frame::Hashes { size, mtime_ns, path } => {
                body.extend_from_slice(&size.to_be_bytes());
                body.extend_from_slice(&mtime_ns.to_be_bytes());
                body.extend_from_slice(path.as_bytes());
                T_HASHES
            }
            Frame::HashesOk { hashes } => {
                body.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
                for h in hashes {
                    body.extend_from_slice(h);
                }
                T_HASHES_OK
            }
            Frame::Data(d) => {
                body.extend_from_slice(&d.id.to_be_bytes());
                body.extend_from_slice(&d.offset.to_be_bytes());
                body.extend_from_slice(&d.len.to_be_bytes());
                T_DATA
            }
            Frame::Auth { mac } => {
                body.extend_from_slice(mac);
                T_AUTH
            }
            Frame::Trim { id, end } => {
                body.extend_from_slice(&id.to_be_bytes());
                body.extend_from_slice(&end.to_be_bytes());
                T_TRIM
            }
            Frame::Trimmed { id, end } => {
                body.extend_from_slice(&id.to_be_bytes());
                body.extend_from_slice(&end.to_be_bytes());
                T_TRIMMED
            }
            Frame::Error(e) => {
                body.extend_from_slice(&e.id.to_be_bytes());
                body.extend_from_slice(&(e.code as u16).to_be_bytes());
                // Messages are for people; keep them short enough to never
                // push a frame near the limit.
                let msg = truncate_utf8(&e.message, MAX_ERROR_MESSAGE);
                body.extend_from_slice(msg.as_bytes());
                T_ERROR
            }
        };
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.push(kind);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a frame body of type `kind`. Total: never panics.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Frame, ProtoError> {
        let mut c = Cursor { buf: body, kind: kind_name(kind) };
        let frame = match kind {
            T_HELLO => {
                let magic = c.array::<4>()?;
                let version = c.u16()?;
                let flags = c.u16()?;
                c.end()?;
                Frame::Hello { magic, version, flags }
            }
            T_STAT => Frame::Stat { path: c.path()? },
            T_READ => {
                let id = c.u32()?;
                let offset = c.u64()?;
                let len = c.u64()?;
                let size = c.u64()?;
                let mtime_ns = c.u64()? as i64;
                let path = c.path()?;
                Frame::Read(ReadReq { id, offset, len, size, mtime_ns, path })
            }
            T_STAT_OK => {
                let size = c.u64()?;
                let mtime_ns = c.u64()? as i64;
                let piece_size = c.u32()?;
                let count = c.u32()? as usize;
                let hashed = c.u8()?;
                let root = c.array::<32>()?;
                c.end()?;
                if piece_size == 0 {
                    return Err(c.bad("piece size is zero"));
                }
                if piece_count_for(size, piece_size) != count as u64 {
                    return Err(c.bad("piece count does not match size and piece size"));
                }
                let root = match hashed {
                    1 => Some(root),
                    0 if root == [0; 32] => None,
                    0 => return Err(c.bad("root given for a file not hashed yet")),
                    _ => return Err(c.bad("hashed flag is neither 0 nor 1")),
                };
                Frame::StatOk(StatInfo { size, mtime_ns, piece_size, root })
            }
            T_HASHES => {
                let size = c.u64()?;
                let mtime_ns = c.u64()? as i64;
                let path = c.path()?;
                Frame::Hashes { size, mtime_ns, path }
            }
            T_HASHES_OK => {
                let count = c.u32()? as usize;
                if c.buf.len() != count.saturating_mul(32) {
                    return Err(c.bad("hash list length does not match the count"));
                }
                let mut hashes = Vec::with_capacity(count);
                for _ in 0..count {
                    hashes.push(c.array::<32>()?);
                }
                Frame::HashesOk { hashes }
            }
            T_DATA => {
                let id = c.u32()?;
                let offset = c.u64()?;
                let len = c.u64()?;
                c.end()?;
                if len > MAX_DATA {
                    return Err(c.bad("DATA announces more than 4 MiB"));
                }
                Frame::Data(DataHeader { id, offset, len })
            }
            T_AUTH => {
                let mac = c.array::<32>()?;
                c.end()?;
                Frame::Auth { mac }
            }
            T_TRIM | T_TRIMMED => {
                let id = c.u32()?;
                let end = c.u64()?;
                c.end()?;
                if kind == T_TRIM {
                    Frame::Trim { id, end }
                } else {
                    Frame::Trimmed { id, end }
                }
            }
            T_ERROR => {
                let id = c.u32()?;
                let code = ErrorCode::from_u16(c.u16()?);
                // Same cap as `encode`, so a decoded frame re-encodes to
                // itself (found by the `frame` fuzz target).
                let lossy = String::from_utf8_lossy(c.buf);
                let message = truncate_utf8(&lossy, MAX_ERROR_MESSAGE).to_string();
                Frame::Error(ErrorFrame { id, code, message })
            }
            other => return Err(ProtoError::UnknownType(other)),
        };
        Ok(frame)
    }
}

/// Reads one frame. The announced length is checked against [`MAX_FRAME`]
/// before the body buffer is allocated. Callers wrap this in a timeout.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    read_frame_limited(r, MAX_FRAME).await
}

/// Largest frame body a server reads before the handshake is complete
/// (`HELLO` is 8 bytes, `AUTH` 32).
pub const HANDSHAKE_MAX_FRAME: u32 = 64;

/// [`read_frame`] with a smaller body limit (see [`HANDSHAKE_MAX_FRAME`]).
pub async fn read_frame_limited<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Frame, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
        Err(e) => return Err(e.into()),
    }
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let limit = max.min(MAX_FRAME);
    if len > limit {
        return Err(ProtoError::TooLarge { len, limit });
    }
    if !matches!(
        kind,
        T_HELLO | T_STAT | T_READ | T_AUTH | T_TRIM | T_HASHES | T_STAT_OK | T_DATA | T_ERROR | T_TRIMMED | T_HASHES_OK
    ) {
        return Err(ProtoError::UnknownType(kind));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Closed
        } else {
            e.into()
        }
    })?;
    Frame::decode(kind, &body)
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        T_HELLO => "HELLO",
        T_STAT => "STAT",
        T_READ => "READ",
        T_AUTH => "AUTH",
        T_TRIM => "TRIM",
        T_TRIMMED => "TRIMMED",
        T_HASHES => "HASHES",
        T_HASHES_OK => "HASHES_OK",
        T_STAT_OK => "STAT_OK",
        T_DATA => "DATA",
        T_ERROR => "ERROR",
        _ => "unknown",
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Cursor<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn bad(&self, why: &'static str) -> ProtoError {
        ProtoError::Malformed { kind: self.kind, why }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(self.bad("body too short"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
    /// The rest of the body as a path. Only length and UTF-8 are checked
    /// here; the path rules live in [`crate::path`] so the server can answer
    /// `BAD_PATH` with a reason instead of `BAD_FRAME`.
    fn path(&mut self) -> Result<String, ProtoError> {
        let rest = std::mem::take(&mut self.buf);
        if rest.len() > MAX_PATH {
            return Err(self.bad("path longer than 4096 bytes"));
        }
        String::from_utf8(rest.to_vec()).map_err(|_| self.bad("path is not valid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - HEADER_LEN);
        let back = Frame::decode(bytes[0], &bytes[HEADER_LEN..]).expect("decodes");
        assert_eq!(back, f);
    }

    fn ident(size: u64) -> Identity {
        let ps = piece_size_for(size);
        let n = piece_count_for(size, ps) as usize;
        let hashes = (0..n).map(|i| *blake3::hash(&i.to_be_bytes()).as_bytes()).collect();
        Identity::from_hashes(size, ps, hashes)
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Hello { magic: MAGIC, version: VERSION, flags: 0 });
        roundtrip(Frame::Stat { path: "iso/big.iso".into() });
        roundtrip(Frame::Read(ReadReq {
            id: 7,
            offset: 1 << 20,
            len: 512 << 10,
            size: 1 << 30,
            mtime_ns: -5,
            path: "a/b".into(),
        }));
        for size in [0, 1, 256 << 10, (256 << 10) + 1, 5 << 30] {
            let identity = ident(size);
            let (piece_size, root) = (identity.piece_size, Some(identity.root));
            roundtrip(Frame::StatOk(StatInfo { size, mtime_ns: 1_700_000_000_000_000_000, piece_size, root }));
            roundtrip(Frame::StatOk(StatInfo { size, mtime_ns: -3, piece_size, root: None }));
            roundtrip(Frame::HashesOk { hashes: identity.hashes });
        }
        roundtrip(Frame::Hashes { size: 5, mtime_ns: -1, path: "a/b".into() });
        roundtrip(Frame::Data(DataHeader { id: 1, offset: 2, len: 3 }));
        roundtrip(Frame::Auth { mac: [9; 32] });
        roundtrip(Frame::Trim { id: 3, end: 1 << 33 });
        roundtrip(Frame::Trimmed { id: 3, end: TRIM_NOT_OPEN });
        roundtrip(Frame::Error(ErrorFrame { id: 0, code: ErrorCode::NotFound, message: "no such file".into() }));
    }

    #[test]
    fn the_largest_fetchable_file_fits_in_a_frame() {
        // MAX_PIECES pieces of the largest piece size: 32 TiB.
        let largest = MAX_PIECES * (1u64 << 31);
        let min = MIN_PIECE as u64;
        for size in [0, 1, min * MAX_PIECES, min * MAX_PIECES + 1, 1 << 40, largest - 1, largest] {
            let ps = piece_size_for(size);
            let n = piece_count_for(size, ps);
            assert!(n <= MAX_PIECES, "{size} bytes: {n} pieces");
        }
        // One byte more has more pieces than a client accepts (it refuses
        // such a file, see the engine's STAT check).
        assert!(piece_count_for(largest + 1, piece_size_for(largest + 1)) > MAX_PIECES);
        // The most hashes a HASHES_OK carries fit in a frame, and decode.
        let f = Frame::HashesOk { hashes: vec![[7u8; 32]; MAX_PIECES as usize] };
        let bytes = f.encode();
        assert!(bytes.len() - HEADER_LEN <= MAX_FRAME as usize, "{} bytes", bytes.len());
        assert_eq!(Frame::decode(bytes[0], &bytes[HEADER_LEN..]).ok(), Some(f));
    }

    /// The hex examples in the crate docs are what the encoder produces.
    #[test]
    fn documented_examples_match_the_encoder() {
        let hex = |f: Frame| hex::encode(f.encode());
        assert_eq!(hex(Frame::Hello { magic: MAGIC, version: VERSION, flags: 0 }), "01000000084d46544400040000");
        assert_eq!(hex(Frame::Trim { id: 7, end: 1 << 18 }), "050000000c000000070000000000040000");
        assert_eq!(hex(Frame::Trimmed { id: 7, end: 1 << 18 }), "850000000c000000070000000000040000");
        assert_eq!(hex(Frame::Stat { path: "a.bin".into() }), "0200000005612e62696e");
        assert_eq!(
            hex(Frame::Read(ReadReq {
                id: 7,
                offset: 0,
                len: 1 << 20,
                size: 1 << 20,
                mtime_ns: 1_700_000_000_000_000_000,
                path: "a.bin".into()
            })),
            "03000000290000000700000000000000000000000000100000000000000010000017979cfe362a0000612e62696e"
        );
        assert_eq!(
            hex(Frame::Data(DataHeader { id: 7, offset: 0, len: 512 << 10 })),
            "830000001400000007000000000000000000000000000800 00".replace(' ', "")
        );
        assert_eq!(
            hex(Frame::Error(ErrorFrame { id: 0, code: ErrorCode::NotFound, message: "no such file".into() })),
            "7f000000120000000000056e6f20737563682066696c65"
        );
        let root = Identity::from_hashes(1, MIN_PIECE, vec![[0; 32]]).root;
        let stat = |root| StatInfo { size: 1, mtime_ns: 1_700_000_000_000_000_000, piece_size: MIN_PIECE, root };
        let ok = hex(Frame::StatOk(stat(Some(root))));
        assert_eq!(ok, format!("8200000039000000000000000117979cfe362a0000000400000000000101{}", hex::encode(root)));
        assert_eq!(
            hex(Frame::StatOk(stat(None))),
            format!("8200000039000000000000000117979cfe362a0000000400000000000100{}", "00".repeat(32))
        );
        assert_eq!(
            hex(Frame::Hashes { size: 1, mtime_ns: 1_700_000_000_000_000_000, path: "a.bin".into() }),
            "0600000015000000000000000117979cfe362a0000612e62696e"
        );
        assert_eq!(
            hex(Frame::HashesOk { hashes: vec![[0xab; 32]] }),
            format!("8600000024{}{}", "00000001", "ab".repeat(32))
        );
    }

    #[test]
    fn long_error_messages_roundtrip_after_the_cut() {
        // Fuzzer finding: 342 invalid bytes become 1026 bytes of U+FFFD.
        let mut body = vec![0, 0, 0, 0, 0, 0];
        body.extend(std::iter::repeat_n(0xff, 342));
        let f = Frame::decode(T_ERROR, &body).unwrap();
        let bytes = f.encode();
        assert_eq!(Frame::decode(bytes[0], &bytes[HEADER_LEN..]).unwrap(), f);
    }

    #[test]
    fn auth_mac_checks() {
        let n = [3u8; 32];
        let mac = auth_mac(b"s3cret", Role::Client, &n);
        assert!(auth_ok(b"s3cret", Role::Client, &n, &mac));
        assert!(!auth_ok(b"other", Role::Client, &n, &mac));
        assert!(!auth_ok(b"s3cret", Role::Client, &[4u8; 32], &mac));
        // A client's proof is no server's proof.
        assert!(!auth_ok(b"s3cret", Role::Server, &n, &mac));
    }

    #[test]
    fn piece_size_grows_with_file() {
        assert_eq!(piece_size_for(0), MIN_PIECE);
        assert_eq!(piece_size_for(1 << 30), MIN_PIECE);
        assert_eq!(piece_size_for(8 << 30), 512 << 10);
        assert_eq!(piece_count_for(0, MIN_PIECE), 0);
        assert_eq!(piece_count_for(1, MIN_PIECE), 1);
    }

    #[test]
    fn piece_ranges_cover_the_file_once() {
        let (size, ps) = (1_000_000u64, MIN_PIECE);
        let n = piece_count_for(size, ps);
        assert_eq!(n, 4);
        let all: Vec<_> = (0..n).map(|i| piece_range(size, ps, i)).collect();
        assert_eq!(all[0], crate::range::Range::new(0, 262_144));
        assert_eq!(all[3], crate::range::Range::new(786_432, 1_000_000), "the last piece is short");
        assert_eq!(all.iter().map(|r| r.len()).sum::<u64>(), size);
        assert_eq!(pieces_range(size, ps, 1, 3), crate::range::Range::new(262_144, 786_432));
        assert!(piece_range(size, ps, 9).is_empty(), "past the end");
        assert!(piece_range(u64::MAX, 1 << 31, u64::MAX).is_empty(), "no overflow");
    }

    #[test]
    fn forged_hashes_do_not_match_the_root() {
        let id = ident(1000 << 10);
        let mut forged = id.hashes.clone();
        assert!(id.matches(&forged));
        forged[1][0] ^= 1;
        assert!(!id.matches(&forged));
        assert!(!id.matches(&id.hashes[1..]), "a short list never matches");
    }

    #[test]
    fn stat_ok_with_wrong_piece_count_is_rejected() {
        let s = StatInfo { size: 1000, mtime_ns: 0, piece_size: MIN_PIECE, root: Some(ident(1000).root) };
        let good = Frame::StatOk(s).encode();
        let mut bytes = good.clone();
        bytes[HEADER_LEN + 20 + 3] = 2; // count 1 -> 2
        assert!(Frame::decode(bytes[0], &bytes[HEADER_LEN..]).is_err());
        // "Not hashed yet" with a root, or a flag that is neither 0 nor 1.
        for flag in [0u8, 2] {
            let mut bytes = good.clone();
            bytes[HEADER_LEN + 24] = flag;
            assert!(Frame::decode(bytes[0], &bytes[HEADER_LEN..]).is_err(), "flag {flag}");
        }
    }

    #[test]
    fn data_announcing_more_than_max_data_is_malformed() {
        let bytes = Frame::Data(DataHeader { id: 1, offset: 0, len: MAX_DATA + 1 }).encode();
        assert!(Frame::decode(bytes[0], &bytes[HEADER_LEN..]).is_err());
        let bytes = Frame::Data(DataHeader { id: 1, offset: 0, len: MAX_DATA }).encode();
        assert!(Frame::decode(bytes[0], &bytes[HEADER_LEN..]).is_ok());
    }

    #[tokio::test]
    async fn oversized_frame_rejected_before_allocation() {
        let mut bytes = vec![T_STAT];
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut r = &bytes[..];
        assert!(matches!(read_frame(&mut r).await, Err(ProtoError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn truncated_frame_is_closed_not_panic() {
        let bytes = Frame::Stat { path: "abc".into() }.encode();
        let mut r = &bytes[..bytes.len() - 1];
        assert!(matches!(read_frame(&mut r).await, Err(ProtoError::Closed)));
    }

    /// Valid frames of every type (sizes and piece counts consistent), to
    /// be mutated: random bytes rarely get past the first length check.
    fn frame() -> impl Strategy<Value = Frame> {
        let path = "[a-z/._-]{0,64}";
        prop_oneof![
            (any::<u16>(), any::<u16>()).prop_map(|(version, flags)| Frame::Hello { magic: MAGIC, version, flags }),
            path.prop_map(|path| Frame::Stat { path }),
            (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<i64>(), path).prop_map(
                |(id, offset, len, size, mtime_ns, path)| Frame::Read(ReadReq {
                    id,
                    offset,
                    len,
                    size,
                    mtime_ns,
                    path
                })
            ),
            (0u64..(64 << 20), any::<i64>(), any::<bool>()).prop_map(|(size, mtime_ns, hashed)| {
                let id = ident(size);
                Frame::StatOk(StatInfo { size, mtime_ns, piece_size: id.piece_size, root: hashed.then_some(id.root) })
            }),
            (any::<u32>(), any::<u64>(), 0..=MAX_DATA).prop_map(|(id, offset, len)| Frame::Data(DataHeader {
                id,
                offset,
                len
            })),
            (any::<u32>(), 1u16..20, "\\PC{0,80}").prop_map(|(id, c, message)| Frame::Error(ErrorFrame {
                id,
                code: ErrorCode::from_u16(c),
                message
            })),
            any::<[u8; 32]>().prop_map(|mac| Frame::Auth { mac }),
            (any::<u32>(), any::<u64>()).prop_map(|(id, end)| Frame::Trim { id, end }),
            (any::<u32>(), any::<u64>()).prop_map(|(id, end)| Frame::Trimmed { id, end }),
            (any::<u64>(), any::<i64>(), path).prop_map(|(size, mtime_ns, path)| Frame::Hashes {
                size,
                mtime_ns,
                path
            }),
            proptest::collection::vec(any::<[u8; 32]>(), 0..8).prop_map(|hashes| Frame::HashesOk { hashes }),
        ]
    }

    /// A mutation of an encoded frame body.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Truncate(usize),
        Extend(Vec<u8>),
        Retype(u8),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
            1 => any::<usize>().prop_map(Mutation::Truncate),
            1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
            1 => any::<u8>().prop_map(Mutation::Retype),
        ]
    }

    proptest! {
        #[test]
        fn decode_never_panics(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode(kind, &body);
        }

        /// Valid frames decode to themselves; the same frames damaged in up
        /// to four ways decode to something or an error, never a panic.
        #[test]
        fn mutated_valid_frames_never_panic(f in frame(), muts in proptest::collection::vec(mutation(), 1..4)) {
            let bytes = f.encode();
            let back = Frame::decode(bytes[0], &bytes[HEADER_LEN..]);
            prop_assert_eq!(back.as_ref().ok(), Some(&f), "a valid frame did not decode to itself");
            let mut kind = bytes[0];
            let mut body = bytes[HEADER_LEN..].to_vec();
            for m in muts {
                match m {
                    Mutation::Set(i, v) if !body.is_empty() => {
                        let n = body.len();
                        body[i % n] = v;
                    }
                    Mutation::Set(..) => {}
                    Mutation::Truncate(i) => body.truncate(i % (body.len() + 1)),
                    Mutation::Extend(more) => body.extend(more),
                    Mutation::Retype(k) => kind = k,
                }
                let _ = Frame::decode(kind, &body);
            }
        }

        #[test]
        fn read_roundtrips(id in any::<u32>(), offset in any::<u64>(), len in any::<u64>(),
                           size in any::<u64>(), mtime in any::<i64>(), path in "[a-z/._-]{1,64}") {
            roundtrip(Frame::Read(ReadReq { id, offset, len, size, mtime_ns: mtime, path }));
        }
    }
}
