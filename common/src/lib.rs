//! Shared vocabulary of `mftd` and `mftctl`: the transfer protocol spoken
//! between a downloading daemon and transfer listeners, the JSON control
//! protocol spoken between `mftctl` and `mftd`, and the small types both sides
//! need (byte ranges, rates, piece identities).
//!
//! Nothing in this crate opens a socket or a file on its own initiative: it
//! turns bytes into typed messages and back, and checks limits while doing so.
//!
//! # Transfer protocol, version 1
//!
//! A client (a downloading `mftd`) opens a TCP connection to a transfer
//! listener. Everything on the wire is a **frame**; all integers are
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
//! it announces follow it raw on the stream (so the server can `sendfile` them
//! without copying).
//!
//! | type | name     | direction       | body                                                                   |
//! |------|----------|-----------------|------------------------------------------------------------------------|
//! | 0x01 | HELLO    | both, first     | magic `b"MFTD"` (4) · version u16 · flags u16                          |
//! | 0x02 | STAT     | client → server | path (UTF-8, rest of body, 1..=4096 bytes)                             |
//! | 0x03 | READ     | client → server | id u32 · offset u64 · len u64 · size u64 · mtime_ns i64 · path (rest)  |
//! | 0x82 | STAT_OK  | server → client | size u64 · mtime_ns i64 · piece_size u32 · count u32 · root \[32\] · count × hash \[32\] |
//! | 0x83 | DATA     | server → client | id u32 · offset u64 · len u64, then `len` raw bytes outside the frame |
//! | 0x7f | ERROR    | server → client | id u32 (0: not about a request) · code u16 · message (UTF-8, rest)     |
//! | 0x84 | CHALLENGE| server → client | nonce \[32\] (only when the listener requires authentication)          |
//! | 0x04 | AUTH     | client → server | mac \[32\] = HMAC-SHA256(secret, `"mftd-auth-v1"` · nonce)             |
//!
//! ## Examples on the wire (hex; spaces separate fields)
//!
//! ```text
//! HELLO v1, no flags     01 00000008 4d465444 0001 0000
//! STAT "a.bin"           02 00000005 612e62696e
//! READ id 7, 512 KiB at 0 of a 1 MiB file, mtime 1.7e18 ns, "a.bin"
//!                        03 00000029 00000007 0000000000000000 0000000000080000
//!                           0000000000100000 17979cfe362a0000 612e62696e
//! STAT_OK, 1-byte file   82 00000058 0000000000000001 17979cfe362a0000 00040000 00000001
//!                           <root: 32 bytes> <hash of piece 0: 32 bytes>
//! DATA answering it      83 00000014 00000007 0000000000000000 0000000000080000
//!                           <524288 raw bytes follow, outside the frame>
//! ERROR NOT_FOUND        7f 00000012 00000000 0005 6e6f2073756368...  ("no such file")
//! CHALLENGE              84 00000020 <32 random bytes>
//! AUTH                   04 00000020 <HMAC-SHA256, 32 bytes>
//! ```
//!
//! ## Handshake
//! The client sends `HELLO` with version 1; the server answers `HELLO` with its
//! own version, or an `ERROR` with code `VERSION_MISMATCH` whose message names
//! both versions (for example `server speaks mftd transfer protocol 1, client
//! sent 2`) and closes. A first frame that is not `HELLO`, or a wrong magic,
//! gets `BAD_HANDSHAKE` and the connection is closed. The server waits at most
//! 10 s for the `HELLO`.
//!
//! ## Authentication (optional)
//! A listener configured with a shared secret (`auth_secret_file`) answers a
//! valid `HELLO` with `CHALLENGE` (32 random bytes) instead of `HELLO`. The
//! client answers `AUTH` with HMAC-SHA256 keyed by the secret over
//! `"mftd-auth-v1"` followed by the nonce; the server checks it in constant
//! time and then sends its `HELLO`, or `ERROR AUTH_FAILED` and closes. The
//! whole exchange must finish within the handshake timeout. A client sets
//! `FLAG_AUTH` (0x0001) in its `HELLO` flags when it has a secret; a client
//! without one receiving `CHALLENGE` reports that the server requires
//! authentication. The secret itself never crosses the wire. Listeners may
//! also restrict peers to CIDR ranges (`allow`); others get
//! `ERROR NOT_ALLOWED` and are disconnected before any other byte.
//!
//! ## STAT
//! `STAT "iso/big.iso"` asks for a file's size, modification time
//! (nanoseconds since the Unix epoch) and **content identity**: the file is cut
//! into pieces of `piece_size` bytes (the last one shorter) and each piece is
//! hashed with BLAKE3; `root` is the BLAKE3 hash of
//! `size (u64 BE) · piece_size (u32 BE) · hash₀ · hash₁ · …`. Two servers
//! whose `size` and `root` agree serve the same bytes. The server computes
//! the identity once per file version (device, inode, size, mtime) and caches
//! it. The piece size is chosen by [`proto::piece_size_for`]: 256 KiB, doubled
//! until the file has at most 16 384 pieces, which keeps `STAT_OK` under
//! 512 KiB + 56 bytes for any file size. A zero-byte file has zero pieces.
//!
//! ## READ
//! `READ id=7 offset=1048576 len=524288 size=… mtime_ns=… "iso/big.iso"` asks
//! for a byte range. `size` and `mtime_ns` are the version the client got from
//! `STAT`; if the file on the server no longer matches, the answer is
//! `ERROR FILE_CHANGED`. The answer to a good request is `DATA` with the same
//! `id`, `offset` and `len`, followed by exactly `len` bytes. `len` may be at
//! most [`proto::MAX_READ`] (16 MiB) and the range must lie within the file.
//! Requests may be **pipelined**: a client may send several `READ`s without
//! waiting; the server answers them strictly in order. If the file shrinks
//! while its bytes are being sent, the server closes the connection (it has
//! already promised `len` bytes), and the client treats that like any other
//! connection failure.
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
//! * frames: 1 MiB body; paths: 4096 bytes; one `READ`: 16 MiB;
//! * the server waits 10 s for the handshake (`handshake_timeout`) and closes a
//!   connection that sends no request for 60 s (`serve_idle_timeout`); each
//!   listener serves at most `max_connections` connections at once (default
//!   64) and each client address at most `max_connections_per_ip` across all
//!   listeners (default 16); the next gets `BUSY`;
//! * requests are read one at a time: a client that pipelines more than the
//!   server is answering is held back by TCP flow control, so the server never
//!   buffers more than one request per connection;
//! * the client gives up on a connection that delivers no byte for its idle
//!   timeout (default 10 s) and continues the range elsewhere.
//!
//! # Control protocol
//! See [`control`]: newline-delimited JSON over a Unix-domain socket.

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
