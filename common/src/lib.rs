//! Shared vocabulary of `mftd` and `mftctl`: the transfer protocol spoken
//! between a downloading daemon and transfer listeners, the JSON control
//! protocol spoken between `mftctl` and `mftd`, and the small types both sides
//! need (byte ranges, rates, piece identities).
//!
//! Nothing in this crate opens a socket or a file on its own initiative: it
//! turns bytes into typed messages and back, and checks limits while doing so.
//!
//! # Transfer protocol, version 4
//!
//! A client (a downloading `mftd`) opens a TCP connection to a transfer
//! listener and, unless either side is configured for plain TCP, runs a
//! TLS 1.3 handshake over it first (see *Transport and node identities*).
//! Everything inside is a **frame**; all integers are
//! big-endian (network order).
//!
//! ```text
//!  0        1                 5
//! +--------+-----------------+---------------------------+
//! |  type  |  length (u32)   |  body (length bytes)      |
//! +--------+-----------------+---------------------------+
//! ```
//!
//! `length` counts the body only and is checked against [`proto::MAX_FRAME`]
//! (1 MiB) *before* any buffer is allocated. The one exception to "the body is
//! the frame" is `DATA`: its body is a fixed 20-byte header, and the file bytes
//! it announces (at most [`proto::MAX_DATA`], 4 MiB) follow it raw on the
//! stream, so the server can `sendfile` them without copying.
//!
//! | type | name      | direction       | body                                                                   |
//! |------|-----------|-----------------|------------------------------------------------------------------------|
//! | 0x01 | HELLO     | both, first     | magic `b"MFTD"` (4) · version u16 · flags u16                          |
//! | 0x02 | STAT      | client → server | path (UTF-8, rest of body, 1..=4096 bytes)                             |
//! | 0x03 | READ      | client → server | id u32 · offset u64 · len u64 · size u64 · mtime_ns i64 · path (rest)  |
//! | 0x05 | TRIM      | client → server | id u32 · end u64                                                       |
//! | 0x06 | HASHES    | client → server | size u64 · mtime_ns i64 · path (rest)                                  |
//! | 0x82 | STAT_OK   | server → client | size u64 · mtime_ns i64 · piece_size u32 · count u32 · hashed u8 · root \[32\] |
//! | 0x83 | DATA      | server → client | id u32 · offset u64 · len u64, then `len` raw bytes outside the frame |
//! | 0x85 | TRIMMED   | server → client | id u32 · end u64 (`u64::MAX`: the request was no longer open)          |
//! | 0x86 | HASHES_OK | server → client | count u32 · count × hash \[32\]                                        |
//! | 0x7f | ERROR     | server → client | id u32 (0: not about a request) · code u16 · message (UTF-8, rest)     |
//! | 0x04 | AUTH      | both, after HELLO | mac \[32\]: proof of the shared secret bound to the TLS channel       |
//!
//! ## Examples on the wire (hex; spaces separate fields)
//!
//! ```text
//! HELLO v4, no flags     01 00000008 4d465444 0004 0000
//! STAT "a.bin"           02 00000005 612e62696e
//! READ id 7, 1 MiB at 0 of a 1 MiB file, mtime 1.7e18 ns, "a.bin"
//!                        03 00000029 00000007 0000000000000000 0000000000100000
//!                           0000000000100000 17979cfe362a0000 612e62696e
//! STAT_OK, 1-byte file   82 00000039 0000000000000001 17979cfe362a0000 00040000 00000001
//!                           01 <root: 32 bytes>
//! STAT_OK, not hashed yet 82 00000039 0000000000000001 17979cfe362a0000 00040000 00000001
//!                           00 <32 zero bytes>
//! HASHES "a.bin"         06 00000015 0000000000000001 17979cfe362a0000 612e62696e
//! HASHES_OK, one piece   86 00000024 00000001 <hash of piece 0: 32 bytes>
//! DATA, first frame      83 00000014 00000007 0000000000000000 0000000000080000
//!                           <524288 raw bytes follow, outside the frame>
//! TRIM id 7 at 256 KiB   05 0000000c 00000007 0000000000040000
//! TRIMMED id 7 at 256 KiB 85 0000000c 00000007 0000000000040000
//! ERROR NOT_FOUND        7f 00000012 00000000 0005 6e6f2073756368...  ("no such file")
//! AUTH                   04 00000020 <HMAC-SHA256, 32 bytes>
//! ```
//!
//! ## Transport and node identities
//! Every daemon has a long-term key and a self-signed certificate, made at
//! its first start (`STATE_DIR/node.key`, mode 0600, and `node.crt`). Its
//! **node ID** is the first 128 bits of the SHA-256 of the certificate (DER),
//! in lowercase base32: 26 characters (`mftd --print-node-id`, `mftctl
//! status`). No certificate authority is involved.
//!
//! A TLS listener (the default) and a TLS source (the default) run a TLS 1.3
//! handshake (rustls, ALPN `mftd/4`, TLS 1.2 not offered) in which **both**
//! sides present their certificate and sign the handshake with its key
//! (`CertificateVerify`); chains, names and dates are not looked at. Once
//! the handshake is over:
//! * the client checks the server's node ID against the one pinned in the
//!   source (`HOST:PORT#NODEID`), else against the `known_nodes` file
//!   (`HOST:PORT NODEID` lines); with `node_trust = "tofu"` an unknown server
//!   is recorded there on first use, with `"known"` it is refused, with
//!   `"any"` (the default) it is accepted; a mismatch is refused with a
//!   message naming both IDs;
//! * a listener with `allow_nodes` refuses a client whose node ID is not on
//!   it with `ERROR NOT_ALLOWED` (inside TLS).
//!
//! Plain TCP is an explicit opt-in per listener (`transport = "plain"`) and
//! per source (`plain://HOST:PORT`); it carries the same frames without
//! encryption or integrity. A plaintext `HELLO` sent to a TLS listener gets
//! a plaintext `ERROR BAD_HANDSHAKE` saying so. Refusals made before any
//! TLS (`BUSY`, `NOT_ALLOWED` by address) are plaintext `ERROR` frames on
//! both kinds of listener; a TLS client recognises one in place of the
//! server's TLS answer and reports it.
//!
//! ## Handshake
//! The client sends `HELLO` with version 4; the server answers `HELLO` with its
//! own version, or an `ERROR` with code `VERSION_MISMATCH` whose message names
//! both versions (`server speaks mftd transfer protocol 4, client sent 3`)
//! and closes (over TLS, a peer of another version usually fails already at
//! ALPN). A first frame that is not `HELLO`, or a wrong magic, gets
//! `BAD_HANDSHAKE` and the connection is closed. The server waits at most 10
//! s for the TLS handshake and the `HELLO` together. The client sends its
//! first `STAT` right behind its `HELLO` (and its `AUTH`, if any), without
//! waiting for the answer.
//!
//! ## Shared secret, bound to the channel (optional)
//! Both sides derive a 32-byte value from the TLS session with the exporter
//! of RFC 8446 section 7.5 (label `"EXPORTER-mftd-v4-auth"`, no context).
//! A side that has a secret sets `FLAG_AUTH` (0x0001) in its `HELLO` and
//! sends `AUTH` right behind it with HMAC-SHA256(secret, role label ·
//! exporter value), the role label being `"mftd-v4 client proof"` or
//! `"mftd-v4 server proof"`. So a proof is worth nothing on another
//! connection (a relay that terminates TLS on each side sees two different
//! exporter values) and cannot be reflected back as the other role.
//! * A listener with a secret checks the client's proof (constant time) and
//!   answers `HELLO` + its own `AUTH`, or `ERROR AUTH_FAILED` and closes.
//! * A client with a secret accepts the connection only if the server's
//!   `HELLO` carries `FLAG_AUTH` and a valid proof follows: a server without
//!   the secret (or a man in the middle) is refused.
//! * Secrets need TLS: a plain listener with `auth_secret_file` is a startup
//!   error, and a client with a secret refuses `plain://` sources.
//!
//! The secret never crosses the wire. Listeners may also restrict peers to
//! CIDR ranges (`allow`); others get `ERROR NOT_ALLOWED` and are disconnected
//! before any other byte.
//!
//! ## STAT and HASHES
//! `STAT "iso/big.iso"` asks for a file's size, modification time
//! (nanoseconds since the Unix epoch) and **content identity**: the file is cut
//! into pieces of `piece_size` bytes (the last one shorter) and each piece is
//! hashed with BLAKE3; `root` is the BLAKE3 hash of
//! `size (u64 BE) · piece_size (u32 BE) · hash₀ · hash₁ · …`. Two servers
//! whose `size` and `root` agree serve the same bytes. `STAT_OK` carries the
//! root and the piece count but not the piece hashes, so the answer that the
//! version vote and the first READ wait for is 62 bytes on the wire (with
//! every hash it was up to 512 KiB, four round trips of TCP slow start on a
//! fresh connection). `HASHES` (with the `size` and `mtime_ns` from `STAT`)
//! asks for the piece hashes; `HASHES_OK` lists all of them, in order, and
//! the client checks that they add up to the root before it trusts any of
//! them. A changed file gets `ERROR FILE_CHANGED`. The server computes the
//! identity once per file version (device, inode, size, mtime) and caches
//! it.
//!
//! **Cold files.** Hashing reads the whole file (a 50 GiB image takes tens of
//! seconds even at BLAKE3's speed), so `STAT` does not wait for it: the
//! first `STAT` of a file version starts hashing in the background and the
//! answer has `hashed` = 0 and 32 zero bytes in place of the root (files of
//! at most 8 MiB are hashed before answering: `hashed` = 1). `READ`s of such
//! a file are served at once. A `HASHES` is answered when the hashing is
//! over: **not in request order** but as soon as it can, between two `DATA`
//! frames of later `READ`s or while the connection is idle, so the data
//! keeps flowing; a client waiting only for it must allow for the time the
//! hashing takes. The client computes the root from `HASHES_OK` itself. A
//! `hashed` byte other than 0 or 1, or a non-zero root with `hashed` = 0, is
//! malformed. Servers can hash their export ahead of time (`index_export`). The piece size is chosen by [`proto::piece_size_for`]: 256 KiB,
//! doubled until the file has at most 16 384 pieces, which keeps
//! `HASHES_OK` under 512 KiB + 4 bytes for any file size. A zero-byte file
//! has zero pieces.
//!
//! ## READ, DATA and TRIM
//! `READ id=7 offset=1048576 len=… size=… mtime_ns=… "iso/big.iso"` asks
//! for a byte range of any length within the file. `size` and `mtime_ns` are
//! the version the client got from `STAT`; if the file on the server no
//! longer matches, the answer is `ERROR FILE_CHANGED`. The server **streams**
//! the range as a sequence of `DATA` frames, in order and contiguous, each of
//! at most [`proto::DATA_CHUNK`] (1 MiB) bytes, so a client asks for a whole
//! assignment at once and TCP flow control, not a request window, paces the
//! connection at any round-trip time. A `READ` of length 0 is answered by one
//! `DATA` of length 0.
//!
//! `TRIM id end` asks the server to stop request `id` at byte `end` instead
//! of its original end: the client gives the back part of its range to
//! another connection without closing this one or waiting for it to drain.
//! The server applies it between two `DATA` frames and answers `TRIMMED id
//! end'`, where `end'` is where it really stops: never before what it has
//! already sent, never after the original end. A `TRIMMED` for a request is
//! sent before any `DATA` of a later request. A `TRIM` for a request that is
//! queued but not started shortens it the same way (to nothing if `end` is
//! its offset: then `TRIMMED` is the whole answer); a `TRIM` for a request
//! the server has finished gets `TRIMMED id u64::MAX`. Bytes that were
//! already on their way when the server applied the `TRIM` still arrive;
//! the client keeps the first copy of every byte.
//!
//! Requests may be **pipelined**: a client may send several `READ`s (and a
//! `HASHES`) without waiting; the server answers them strictly in order,
//! except that a `HASHES` for a file still being hashed is answered when
//! the hashing is over (see above).
//! If the file shrinks while its bytes are being sent, the server closes the
//! connection (it has already announced them), and the client treats that
//! like any other connection failure. Every `DATA` header must continue the
//! oldest open request exactly where the previous one stopped and stay
//! within what was asked; anything else is a protocol violation and the
//! client drops the source.
//!
//! ## ERROR codes (stable)
//! See [`proto::ErrorCode`]. After an `ERROR` about a request the connection
//! stays usable; after `BAD_HANDSHAKE`, `VERSION_MISMATCH`, `BAD_FRAME`,
//! `BUSY`, `AUTH_FAILED` and `NOT_ALLOWED` the server closes it. An `ERROR`
//! message is at most 1024 bytes of UTF-8; longer ones are cut.
//!
//! ## Paths and the export jail
//! A path is relative to the listener's export root, UTF-8, `/`-separated, at
//! most 4096 bytes. Refused with `BAD_PATH` before touching the file system:
//! empty paths, absolute paths, `..` components, NUL bytes, backslashes and
//! other control characters. The server then resolves the path beneath the
//! export root so that no symbolic link may lead out of it (symlinks that stay
//! inside are followed); a path that would escape is refused with
//! `PATH_REFUSED`, indistinguishable from the outside from a file that is
//! forbidden. Directories, devices, FIFOs and sockets get `NOT_REGULAR`.
//!
//! ## Limits and timeouts
//! * frames: 1 MiB body, 64 bytes before the handshake is complete (a
//!   larger announced length gets `BAD_HANDSHAKE` without its body being
//!   read); `DATA`: 4 MiB announced per frame (servers send 1 MiB); paths:
//!   4096 bytes;
//! * the server waits 10 s for the handshake (`handshake_timeout`) and closes a
//!   connection that sends no request for 60 s while it is answering nothing
//!   (`serve_idle_timeout`; a client receiving a long READ has nothing to
//!   say); each listener serves at most `max_connections` connections at once
//!   (default 64) and each client address at most `max_connections_per_ip`
//!   across all listeners (default 16; IPv6 clients count by their /64); the
//!   next gets `BUSY`; so does a connection over `handshake_rate` new ones a
//!   second from its address (default 32, bursts of 64), before any TLS;
//! * a server hashes at most two files at a time, and a connection may have
//!   at most four `HASHES` waiting for hashing (one more closes it);
//! * a peer that stops taking the bytes of a READ (its TCP window stays
//!   shut) is disconnected after half `serve_idle_timeout` (1 to 30 s), and
//!   one that takes them slower than `serve_min_rate` (default 1 KiB/s,
//!   judged every 10 s of sending by the bytes it acknowledged) is reset;
//! * the server reads requests while it answers (so a `TRIM` reaches a READ
//!   being sent) and queues at most 8 beyond the one it is answering; more
//!   are held back by TCP flow control; it keeps at most 64 unanswered TRIMs;
//! * the client gives up on a connection that delivers no byte for its idle
//!   timeout (default 10 s) and continues the range elsewhere; before that, a
//!   connection owed data that has been quiet for a few round trips (at least
//!   1 s) has its range handed to others and probes the path with fresh
//!   connections.
//!
//! # Control protocol
//! See [`control`]: newline-delimited JSON over a Unix-domain socket.

#![warn(missing_docs)]

pub mod control;
pub mod manifest;
pub mod path;
pub mod paths;
pub mod proto;
pub mod range;
pub mod rate;

/// Human-friendly byte count, binary units: `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
