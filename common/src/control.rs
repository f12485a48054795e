//! Control protocol between `mftctl` and `mftd`.
//!
//! A Unix-domain stream socket (mode 0600) carrying **newline-delimited
//! JSON**: one object per line, at most [`MAX_LINE`] bytes per line. Every
//! message is a tagged enum (`"type": "..."`, snake_case).
//!
//! A session starts with a version exchange:
//!
//! ```text
//! → {"type":"hello","protocol":1,"client":"mftctl 0.1.0"}
//! ← {"type":"hello","protocol":1,"daemon":"mftd 0.1.0","pid":4242}
//! ```
//!
//! A different `protocol` is answered with an `error` of code
//! `version_mismatch` naming both versions. Then the client sends requests;
//! each gets exactly one response, except `watch`, which turns the connection
//! into a stream of `progress` responses ending with the download's final one
//! (state `done`, `failed` or `cancelled`).
//!
//! ```text
//! → {"type":"servers_list"}
//! ← {"type":"servers","servers":[{"port":5001,"state":"running","connections":0,...}]}
//! → {"type":"server_stop","port":5003}
//! ← {"type":"ok","message":"stopped listener 5003 (closed 2 connections)"}
//! → {"type":"get","remote_path":"big.iso","sources":["127.0.0.1:5001"],"output_dir":"/tmp"}
//! ← {"type":"accepted","id":1,"destination":"/tmp/big.iso"}
//! → {"type":"watch","id":1,"interval_ms":1000}
//! ← {"type":"progress","download":{"id":1,"state":"active",...}}
//! → {"type":"bogus"}
//! ← {"type":"error","code":"bad_request","message":"unknown variant `bogus`..."}
//! ```
//!
//! A `get` whose destination already holds the file the sources serve is
//! answered with `identical` (destination, BLAKE3 root) instead of
//! `accepted`; one that continues a download of the same file says
//! `"resumed": true` and lists the `added_sources`.
//!
//! A line that is not valid JSON or not a known request gets an `error`
//! response and the connection stays open; a line longer than [`MAX_LINE`]
//! gets an `error` and the connection is closed (the rest of the line cannot
//! be skipped safely). Requests are shorter still: at most [`MAX_REQUEST`]
//! bytes, read into a buffer that grows only with what arrives.
//!
//! The socket is shared by everyone its mode admits, so the daemon holds
//! every caller to limits (the README's security model lists them with
//! their defaults): control connections per user and in total (root and
//! mftd's own user keep a reserve above the total), an idle timeout for a
//! connection with no request in flight and no `watch`, and per-user quotas
//! on downloads, their sources and connections. A connection or request
//! over a limit gets one `error` of code `limit` naming the limit and the
//! `[quota]` setting that changes it:
//!
//! ```text
//! ← {"type":"error","code":"limit","message":"too many control connections from uid 1001: 16 open, the most one user may hold ([quota] control_connections_per_user in mftd.toml)"}
//! ```
//!
//! A download of another user is, to a restricted caller, exactly an
//! unknown ID: same code, same message.

use serde::{Deserialize, Serialize};

/// Control protocol version.
pub const PROTOCOL: u32 = 1;
/// Longest response line, newline excluded: `downloads list` of a busy
/// daemon (thousands of downloads within `retention`) fits.
pub const MAX_LINE: usize = 16 << 20;
/// Longest request line, newline excluded: the largest real request (a
/// `get` naming 64 sources and paths of 4 KiB) is well under it.
pub const MAX_REQUEST: usize = 64 << 10;

/// A request from `mftctl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First line of every session; answered with `hello`, or an `error` of code `version_mismatch`.
    Hello {
        /// The control protocol the client speaks ([`PROTOCOL`]).
        protocol: u32,
        /// Client name and version, e.g. `mftctl 0.1.0`; informational only.
        client: String,
    },
    /// `mftctl status`: answered with `status`.
    Status,
    /// `mftctl servers list`: answered with `servers`.
    ServersList,
    /// `mftctl servers stop PORT`: close a listener and its connections; answered with `ok`.
    ServerStop {
        /// Port of the listener.
        port: u16,
    },
    /// `mftctl servers start PORT`: reopen a stopped listener; answered with `ok`.
    ServerStart {
        /// Port of the listener.
        port: u16,
    },
    /// `mftctl servers add`: open a new listener until mftd restarts or reloads; answered with `ok`.
    ServerAdd {
        /// Port to listen on; any free port if absent (the `ok` message names it).
        #[serde(default)]
        port: Option<u16>,
        /// Bandwidth cap in bytes per second, 0 for none; the daemon's `rate_limit` if absent.
        #[serde(default)]
        rate_limit: Option<u64>,
        /// `tls` or `plain`; default: the daemon's `transport`.
        #[serde(default)]
        transport: Option<String>,
    },
    /// `mftctl servers limit PORT RATE`: change a listener's bandwidth cap until mftd restarts
    /// or reloads; answered with `ok`.
    ServerLimit {
        /// Port of the listener.
        port: u16,
        /// New cap in bytes per second, 0 for none.
        rate_limit: u64,
    },
    /// `mftctl get`: start a download; answered with `accepted`, or `identical` if the file is
    /// already there.
    Get(GetRequest),
    /// `mftctl downloads list`: answered with `downloads` (those the caller may see).
    DownloadsList,
    /// `mftctl downloads show ID`: answered with `download`.
    DownloadShow {
        /// Download ID, as `downloads list` shows it.
        id: u64,
    },
    /// `mftctl downloads pause ID`: stop a download, keeping its data; answered with `ok` once it
    /// has paused (or after 10 s of winding down).
    DownloadPause {
        /// Download ID.
        id: u64,
    },
    /// `mftctl downloads resume ID`: continue a paused download; answered with `ok`.
    DownloadResume {
        /// Download ID.
        id: u64,
    },
    /// `mftctl downloads cancel ID`: stop a download and delete its partial file; answered with
    /// `ok`.
    DownloadCancel {
        /// Download ID.
        id: u64,
    },
    /// Take an ended download off the list (a failed one's kept data too).
    DownloadRemove {
        /// Download ID.
        id: u64,
    },
    /// Take every ended download off the list, except failed ones whose
    /// data was kept for a retry.
    DownloadsPurge,
    /// Close a listener and forget it (it no longer shows in `servers list`).
    ServerRemove {
        /// Port of the listener.
        port: u16,
    },
    /// Add sources to a download (a running one continues with them from
    /// where it is; a paused one uses them when resumed).
    DownloadAddSource {
        /// Download ID.
        id: u64,
        /// `host:port` of each new source (as in [`GetRequest::sources`]); ones it has are skipped.
        sources: Vec<String>,
    },
    /// Continue one download, or every paused/interrupted one.
    GetResume {
        /// The download to continue; absent: every paused one, and every failed one whose data
        /// was kept, that the caller may resume.
        #[serde(default)]
        id: Option<u64>,
    },
    /// Stream `progress` for a download every `interval_ms` until it ends.
    Watch {
        /// Download ID.
        id: u64,
        /// Milliseconds between snapshots, clamped to 50..=60000; state changes are sent at once.
        interval_ms: u64,
    },
    /// `mftctl shutdown`: answered with `ok`, then mftd stops as on SIGTERM.
    Shutdown,
}

/// Start a download.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetRequest {
    /// Path of the file on the servers, relative to their export root.
    pub remote_path: String,
    /// `host:port` of each source.
    pub sources: Vec<String>,
    /// Absolute output directory; the daemon's download directory if absent.
    #[serde(default)]
    pub output_dir: Option<String>,
    /// Save under this name instead of the remote file's (one path
    /// component).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_name: Option<String>,
    /// Replace an existing file at the destination.
    #[serde(default)]
    pub force: bool,
    /// TCP connections per source; the daemon's default if absent.
    #[serde(default)]
    pub connections_per_source: Option<u32>,
    /// Fail the download after this many seconds in a row without any
    /// reachable source; wait forever if absent.
    #[serde(default)]
    pub give_up_after_secs: Option<u64>,
    /// Do not persist a manifest: a daemon crash then starts over.
    #[serde(default)]
    pub no_resume: bool,
    /// File with the shared secret for servers that require
    /// authentication, read by the daemon; its own `auth_secret_file` if absent.
    #[serde(default)]
    pub secret_file: Option<String>,
    /// Expected BLAKE3 root identity (64 hex digits): sources serving
    /// anything else are excluded at once, and no vote is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The size the caller expects: sources announcing another are
    /// excluded at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_size: Option<u64>,
}

/// A response from `mftd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to a `hello` of the same protocol version.
    Hello {
        /// The control protocol mftd speaks ([`PROTOCOL`]).
        protocol: u32,
        /// Daemon name and version, e.g. `mftd 0.1.0`.
        daemon: String,
        /// Process ID of mftd.
        pid: u32,
    },
    /// The request was carried out.
    Ok {
        /// One sentence for the person, saying what was done; mftctl prints it with
        /// control characters escaped (`ctl/src/shown.rs`).
        message: String,
    },
    /// A refused or failed request, or a line that is not a known request.
    Error {
        /// What kind of failure, for programs.
        code: ErrorCode,
        /// One sentence for the person, usually with what to do; mftctl prints it with
        /// control characters escaped (`ctl/src/shown.rs`).
        message: String,
    },
    /// Answer to `status`.
    Status(StatusInfo),
    /// Answer to `servers_list`.
    Servers {
        /// Every listener, running or stopped, by port.
        servers: Vec<ListenerInfo>,
    },
    /// `get` started a download (or continued one, see `resumed`).
    Accepted {
        /// Download ID, for `watch` and the `download_*` requests.
        id: u64,
        /// Absolute path the file will have once done.
        destination: String,
        /// An interrupted download of the same file continued instead.
        #[serde(default)]
        resumed: bool,
        /// Sources of this request the continued download did not have,
        /// now added to it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        added_sources: Vec<String>,
    },
    /// Answer to `get_resume`.
    Resumed {
        /// IDs of the downloads now running again; empty when there was nothing to resume.
        ids: Vec<u64>,
    },
    /// `get` found the file already at its destination, identical to the
    /// sources' (same size and BLAKE3 root): nothing was downloaded.
    Identical {
        /// Absolute path of the file found.
        destination: String,
        /// Its BLAKE3 root (64 hex digits).
        identity: String,
    },
    /// Answer to `downloads_list`.
    Downloads {
        /// The downloads the caller may see, by ID.
        downloads: Vec<DownloadInfo>,
    },
    /// Answer to `download_show`.
    Download {
        /// The download, with per-source detail.
        download: DownloadInfo,
    },
    /// One snapshot of a `watch` stream, which ends after a final or `paused` one (or when mftd stops).
    Progress {
        /// The download as it is now.
        download: DownloadInfo,
    },
}

/// Stable error codes of the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not valid JSON or not a known request; the connection stays open.
    BadRequest,
    /// `hello` named another protocol version; the message names both.
    VersionMismatch,
    /// A line longer than [`MAX_LINE`] (a request longer than
    /// [`MAX_REQUEST`]); the connection is closed.
    LineTooLong,
    /// No listener on this port.
    UnknownPort,
    /// The port is taken, by another listener or another program.
    PortInUse,
    /// No download with this ID that the caller may see.
    UnknownDownload,
    /// The remote path or output name is not a valid relative path or file name.
    BadPath,
    /// The output directory cannot be used: not absolute, missing, not a directory or not writable.
    OutputDir,
    /// Something is in the way at the destination (without `force`), or another download
    /// writes there.
    Exists,
    /// A value out of range, or an action the current state does not allow (stopping a stopped
    /// listener, removing a running download).
    InvalidArgument,
    /// mftd failed itself (a handler panicked, a manifest could not be written); see its log.
    Internal,
    /// The caller may not do this (see the README's security model).
    PermissionDenied,
    /// A limit or quota was reached (control connections, idle time,
    /// downloads, sources, descriptors); the message names it and the
    /// setting that changes it.
    Limit,
}

/// `status`: the daemon at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// mftd's version, without the name (`0.1.0`).
    pub version: String,
    /// Process ID of mftd.
    pub pid: u32,
    /// Seconds since mftd started.
    pub uptime_secs: u64,
    /// IP address the transfer listeners bind (`listen` in the config).
    pub listen: String,
    /// Directory whose files the listeners serve (`export`).
    pub export_dir: String,
    /// Where downloads go when `get` names no output directory.
    pub download_dir: String,
    /// Path of this control socket.
    pub socket: String,
    /// The node ID the caller's downloads present to servers (what their
    /// `allow_nodes` lists): the daemon's own (what sources are pinned
    /// with) for root and mftd's user, the caller's own for anyone else.
    #[serde(default)]
    pub node_id: String,
    /// Every listener, running or stopped, by port.
    pub listeners: Vec<ListenerInfo>,
    /// The downloads the caller may see (all for root and mftd's user), by ID.
    pub downloads: Vec<DownloadInfo>,
    /// Manifests that could not be loaded, as "path: reason".
    #[serde(default)]
    pub damaged_manifests: Vec<String>,
}

/// Whether a listener accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerState {
    /// Bound and accepting connections.
    Running,
    /// Closed by `servers stop`, port and settings kept; `servers start` reopens it.
    Stopped,
}

/// One transfer listener, as `servers list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// TCP port, the listener's name in `server_*` requests.
    pub port: u16,
    /// Bound address, `IP:PORT`.
    pub address: String,
    /// Whether it accepts connections now.
    pub state: ListenerState,
    /// Connections open right now.
    pub connections: u64,
    /// Connections accepted since start.
    pub total_connections: u64,
    /// File bytes sent since start (all connections).
    pub bytes_sent: u64,
    /// Bytes per second over the last sampling interval.
    pub rate: u64,
    /// Bandwidth cap in bytes per second, 0 for none.
    pub rate_limit: u64,
    /// `tls`, or `plain` (unencrypted).
    #[serde(default)]
    pub transport: String,
}

/// Where a download is in its life, as `downloads list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadState {
    /// Asking the sources about the file.
    Starting,
    /// The size is known and a source is connected: data flows.
    Active,
    /// Every source is unreachable; retrying with backoff.
    Waiting,
    /// Stopped with data and progress kept: by `downloads pause`, an mftd restart, or a full
    /// disk or failed checkpoint (then `error` says why; after a full disk it begins with
    /// [`DISK_FULL`] and the download continues by itself when there is room).
    Paused,
    /// All bytes are in; final checks, fsync and rename.
    Verifying,
    /// The file is verified and in place under its name.
    Done,
    /// Ended without the file; `error` says why (`get --resume` retries if data was kept).
    Failed,
    /// Stopped by `downloads cancel`; the partial file is deleted.
    Cancelled,
}

/// How the `error` of a download paused for lack of disk space begins:
/// `disk full on DIR, N bytes needed; ...`. mftd resumes such a download by
/// itself once the file system of DIR has N bytes free (beyond
/// `min_free_space` when DIR is the destination's directory).
pub const DISK_FULL: &str = "disk full on ";

impl DownloadState {
    /// Whether the download has ended (`done`, `failed` or `cancelled`); `paused` has not.
    pub fn is_final(self) -> bool {
        matches!(self, DownloadState::Done | DownloadState::Failed | DownloadState::Cancelled)
    }
}

/// What one source of a download is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Not connected yet in this run (connect, handshake and `STAT`).
    Connecting,
    /// At least one connection open to it, serving the chosen file.
    Active,
    /// Unreachable for now; retried with backoff.
    Waiting,
    /// Dropped for this download (too many bad pieces, protocol violations).
    Failed,
    /// Serves a different version of the file than the other sources.
    Excluded,
    /// Nothing left for it to do.
    Idle,
}

/// One source of one download.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The source as the `get` named it: `[plain://]HOST:PORT[#NODEID]`.
    pub address: String,
    /// What it is doing now.
    pub state: SourceState,
    /// Bytes from this source that ended up in the file.
    pub bytes: u64,
    /// Bytes read off the wire (includes duplicates and discarded data).
    pub bytes_received: u64,
    /// Bytes per second over the last sampling interval.
    pub speed: u64,
    /// `bytes` as a fraction of the bytes in the file so far (0..=1; the
    /// file size once done). All sources' shares and `found_on_disk`'s
    /// add up to 1.
    pub share: f64,
    /// Ranges finished by this source.
    pub ranges_done: u64,
    /// Pieces from this source that failed verification.
    pub strikes: u32,
    /// TCP connections open to this source now (adapted to what the path
    /// needs unless `connections_per_server` fixes it).
    pub connections: u32,
    /// Round-trip time to this source measured at the handshake, in
    /// milliseconds (the smallest of its connections); absent until known.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// `tls` or `plain` (unencrypted), once a connection was made.
    #[serde(default)]
    pub transport: Option<String>,
    /// The node ID the source proved over TLS.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Why it is not working now (cleared when it connects again).
    #[serde(default)]
    pub last_error: Option<String>,
    /// The last error it recovered from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_from: Option<String>,
}

/// One download, as `downloads show` and `progress` carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownloadInfo {
    /// Download ID: never reused, not even across restarts.
    pub id: u64,
    /// Path of the file on the servers, as the `get` gave it.
    pub remote_path: String,
    /// Absolute path of the file once done (the data is in `DESTINATION.mftpart` until then).
    pub destination: String,
    /// Where it is in its life.
    pub state: DownloadState,
    /// File size, once a source has answered.
    #[serde(default)]
    pub size: Option<u64>,
    /// Bytes written to the file.
    pub bytes_done: u64,
    /// Pieces verified / total.
    pub pieces_verified: u64,
    /// Pieces in the file (256 KiB each, larger over 4 GiB); 0 until the size is known.
    pub pieces_total: u64,
    /// Bytes per second into the file over the last sample (0.5 s); 0 when paused or ended.
    pub speed: u64,
    /// Seconds left at the current `speed`; absent while the size or speed is unknown, paused
    /// or ended.
    #[serde(default)]
    pub eta_secs: Option<u64>,
    /// Time spent running, over all runs (pauses and restarts excluded).
    pub elapsed_ms: u64,
    /// One per source, in the order they were given (added ones last).
    pub sources: Vec<SourceInfo>,
    /// Bytes in the file that no listed source is credited with: found in
    /// the partial file and re-verified when its record of who delivered
    /// them was lost (a damaged manifest). With the sources' `share`s, its
    /// share (`found_on_disk / max(bytes_done, sum of source bytes)`) makes
    /// 100 %.
    #[serde(default)]
    pub found_on_disk: u64,
    /// BLAKE3 root identity of the file (hex), once adopted.
    #[serde(default)]
    pub identity: Option<String>,
    /// While no identity is adopted: how the sources voted so far (data
    /// flows meanwhile; no piece is verified before the vote is settled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<String>,
    /// Once an identity is adopted: how it was decided, e.g. `version from
    /// 1 of 2 sources; 127.0.0.1:37002 unreachable (connection refused)`
    /// (the sources that had not answered, and why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// While no source has answered: that, and what to do about it (each
    /// source's last answer is its `last_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// What went wrong: why it failed or paused itself, or who cancelled it; absent if nothing did.
    #[serde(default)]
    pub error: Option<String>,
}

impl DownloadInfo {
    /// How much of the file is in, 0 to 100: 100 for an empty file, 0 while the size is unknown.
    pub fn percent(&self) -> f64 {
        match self.size {
            Some(0) => 100.0,
            Some(s) => self.bytes_done as f64 * 100.0 / s as f64,
            None => 0.0,
        }
    }
}

impl Response {
    /// An `error` response; `message` is for the person and should say what to do.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error { code, message: message.into() }
    }
    /// An `ok` response saying, in one sentence, what was done.
    pub fn ok(message: impl Into<String>) -> Response {
        Response::Ok { message: message.into() }
    }
}

/// What `mftctl --json` prints besides the daemon's own responses
/// (`accepted`, `identical`, `resumed`, `progress`, ...), one object per
/// line: while following a download, a `source_state` whenever a source
/// changes state, and one terminal event (`done`, `error`, `paused` or
/// `detached`); an `error` also when mftctl cannot carry out a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A source of the followed download changed state (each source's first state included).
    SourceState {
        /// Download ID.
        id: u64,
        /// The source, as in [`SourceInfo::address`].
        address: String,
        /// Its new state.
        state: SourceState,
        /// Why it is not working, as in [`SourceInfo::last_error`].
        #[serde(default)]
        last_error: Option<String>,
    },
    /// The file is in place.
    Done(Summary),
    /// The download ended without its file, or a command failed.
    Error(Failure),
    /// Paused elsewhere (or by a full disk); `message` says how to continue.
    Paused {
        /// Download ID.
        id: u64,
        /// As mftctl prints it without `--json`: why it paused, and the command that continues it.
        message: String,
    },
    /// mftctl stopped following (Ctrl-C); the download goes on.
    Detached {
        /// Download ID.
        id: u64,
        /// As mftctl prints it without `--json`: the download goes on, and how to look at it.
        message: String,
    },
}

/// How a download ended (the `done` event, and `error` for a download).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Download ID.
    pub id: u64,
    /// `done` in a `done` event; `failed` or `cancelled` in an `error`.
    pub state: DownloadState,
    /// Absolute path of the file (where it would have been, for an `error`).
    pub destination: String,
    /// File size in bytes; 0 if no source ever told it.
    pub size: u64,
    /// Bytes in the file.
    pub bytes: u64,
    /// Running time over all runs, in milliseconds (as [`DownloadInfo::elapsed_ms`]).
    pub elapsed_ms: u64,
    /// BLAKE3 root (hex) adopted for the file (what `done` was verified against); absent if none was.
    #[serde(default)]
    pub identity: Option<String>,
    /// Why it failed (`error` only).
    #[serde(default)]
    pub message: Option<String>,
    /// Each source's part, in the download's order.
    pub sources: Vec<SourceSummary>,
    /// Bytes no source is credited with (see [`DownloadInfo::found_on_disk`]).
    #[serde(default)]
    pub found_on_disk: u64,
}

/// One source's part in a finished download.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceSummary {
    /// The source, as in [`SourceInfo::address`].
    pub address: String,
    /// Bytes from this source that ended up in the file.
    pub bytes: u64,
    /// `bytes` over the download's running time, bytes/s.
    pub avg_speed: u64,
}

/// An `error` event: a download that ended without its file, or a command
/// mftctl could not carry out (`code` as in [`ErrorCode`], or one of
/// mftctl's own: `not_running`, `permission_denied`, `io`, `protocol`,
/// `usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Failure {
    /// A download that ended `failed` or `cancelled`; `message` says why.
    Download(Summary),
    /// A command mftctl could not carry out (exit status 1, or 2 for `usage`).
    Command {
        /// An [`ErrorCode`] word from mftd, or one of mftctl's own listed above.
        code: String,
        /// The sentence mftctl also prints on stderr.
        message: String,
    },
}

impl Summary {
    /// The summary of a download as it ended.
    pub fn of(d: &DownloadInfo) -> Summary {
        let secs = (d.elapsed_ms as f64 / 1000.0).max(1e-3);
        Summary {
            id: d.id,
            state: d.state,
            destination: d.destination.clone(),
            size: d.size.unwrap_or(0),
            bytes: d.bytes_done,
            elapsed_ms: d.elapsed_ms,
            identity: d.identity.clone(),
            message: if d.state == DownloadState::Done { None } else { d.error.clone() },
            sources: d
                .sources
                .iter()
                .map(|s| SourceSummary {
                    address: s.address.clone(),
                    bytes: s.bytes,
                    avg_speed: (s.bytes as f64 / secs) as u64,
                })
                .collect(),
            found_on_disk: d.found_on_disk,
        }
    }
}

/// The name a unit enum of this protocol has on the wire (`"paused"`,
/// `"unknown_download"`): the one string form of states, codes and kinds.
pub fn word<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Encodes a message as one line, newline included.
pub fn to_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these types cannot fail: no maps with non-string keys, no
    // custom serializers.
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|e| {
        format!("{{\"type\":\"error\",\"code\":\"internal\",\"message\":\"cannot encode: {e}\"}}").into_bytes()
    });
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_snake_case() {
        let r = Request::ServerStop { port: 5003 };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"type":"server_stop","port":5003}"#);
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        let g: Request =
            serde_json::from_str(r#"{"type":"get","remote_path":"a","sources":["127.0.0.1:5001"]}"#).unwrap();
        assert!(matches!(g, Request::Get(GetRequest { ref remote_path, .. }) if remote_path == "a"));
    }

    #[test]
    fn events_have_the_documented_shape_and_round_trip() {
        let summary = Summary {
            id: 3,
            state: DownloadState::Failed,
            destination: "/tmp/x".into(),
            size: 10,
            bytes: 4,
            elapsed_ms: 1500,
            identity: None,
            message: Some("gave up".into()),
            sources: vec![SourceSummary { address: "h:1".into(), bytes: 4, avg_speed: 2 }],
            found_on_disk: 0,
        };
        let cases = [
            (
                Event::SourceState { id: 3, address: "h:1".into(), state: SourceState::Waiting, last_error: None },
                r#"{"type":"source_state","id":3,"address":"h:1","state":"waiting","last_error":null}"#,
            ),
            (Event::Paused { id: 3, message: "m".into() }, r#"{"type":"paused","id":3,"message":"m"}"#),
            (
                Event::Error(Failure::Command { code: "usage".into(), message: "m".into() }),
                r#"{"type":"error","code":"usage","message":"m"}"#,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(serde_json::to_string(&e).unwrap(), want);
            assert_eq!(serde_json::from_str::<Event>(want).unwrap(), e);
        }
        for e in [Event::Error(Failure::Download(summary.clone())), Event::Done(summary)] {
            let line = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e, "{line}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for s in ["", "{", "[]", "{\"type\":\"nope\"}", "{\"type\":\"server_stop\",\"port\":70000}", "\u{0}"] {
            assert!(serde_json::from_str::<Request>(s).is_err(), "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            let _ = serde_json::from_str::<Request>(&s);
        }

        /// Valid request lines with bytes replaced or cut: parsed or
        /// refused, never a panic (random text rarely gets past `{`).
        #[test]
        fn mutated_valid_requests_never_panic(which in 0usize..6, at in proptest::prelude::any::<usize>(),
                                              val in proptest::prelude::any::<u8>(), cut in proptest::prelude::any::<bool>()) {
            let reqs = [
                Request::Hello { protocol: PROTOCOL, client: "mftctl".into() },
                Request::ServerAdd { port: Some(5004), rate_limit: Some(1 << 20), transport: Some("plain".into()) },
                Request::DownloadAddSource { id: 3, sources: vec!["10.0.0.7:5001".into(), "[::1]:5002#abc".into()] },
                Request::Watch { id: 1, interval_ms: 1000 },
                Request::GetResume { id: Some(9) },
                Request::Get(GetRequest { remote_path: "iso/big.iso".into(), sources: vec!["h:1".into()], output_dir: Some("/tmp".into()),
                    output_name: Some("x".into()), force: true, connections_per_source: Some(4), give_up_after_secs: Some(30),
                    no_resume: false, secret_file: Some("/s".into()), identity: Some("ab".repeat(32)), expected_size: Some(7) }),
            ];
            let mut line = to_line(&reqs[which]);
            line.pop();
            let i = at % line.len();
            if cut { line.truncate(i) } else { line[i] = val }
            let _ = serde_json::from_slice::<Request>(&line);
        }

        #[test]
        fn structured_garbage_never_panics(port in proptest::prelude::any::<i64>(), t in "[a-z_]{0,20}", n in 0usize..200) {
            let line = format!("{{\"type\":\"{t}\",\"port\":{port},\"id\":{port},\"sources\":{}}}", "[".repeat(n));
            let _ = serde_json::from_str::<Request>(&line);
        }

        #[test]
        fn requests_roundtrip(port in proptest::prelude::any::<u16>(), id in proptest::prelude::any::<u64>(), path in "[a-z/.]{1,40}") {
            for r in [
                Request::ServerStop { port },
                Request::ServerLimit { port, rate_limit: id },
                Request::DownloadShow { id },
                Request::GetResume { id: Some(id) },
                Request::Get(GetRequest { remote_path: path.clone(), sources: vec![format!("h:{port}")], output_dir: None, output_name: None, force: false,
                    connections_per_source: None, give_up_after_secs: Some(id), no_resume: true, secret_file: None, identity: Some(path.clone()), expected_size: Some(id) }),
            ] {
                let back: Request = serde_json::from_slice(&to_line(&r)).unwrap();
                proptest::prop_assert_eq!(back, r);
            }
        }
    }

    #[test]
    fn line_ends_in_newline() {
        let l = to_line(&Response::ok("x"));
        assert_eq!(l.last(), Some(&b'\n'));
        assert_eq!(l.iter().filter(|b| **b == b'\n').count(), 1);
    }
}
