//! What can go wrong in a download, as types: why a source's connection
//! ended or the source was dropped ([`SourceError`]), and why a download
//! stopped ([`DownloadError`]). Their `Display` is what users read in
//! `downloads show`, the live display and the log; the engine turns them
//! into text only there.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::client::ClientError;

/// Why a connection to a source ended, or why the source is of no further
/// use for this download.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connecting, the handshake, or the server's answer failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0} not found on this server")]
    NotFound(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The source serves another version than the one in use (the message
    /// names both).
    #[error("{0}")]
    DifferentVersion(String),
    #[error("file changed on the server: {0}")]
    FileChanged(String),
    #[error("sent {0} pieces that failed verification")]
    BadPieces(u32),
    #[error("sent piece hashes that do not add up to the identity it announced")]
    ForgedHashes,
    #[error("no data for {0:.1?} while a new connection got through; reconnecting")]
    Stalled(Duration),
    #[error("did not answer TRIM for {0:.1?}; reconnecting")]
    TrimIgnored(Duration),
}

/// Why a download stopped short of its file.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot {op} {}: {source}", path.display())]
    Disk {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `detail`: how much was available and kept free, if known.
    #[error("not enough disk space for {} ({size} bytes{detail})", dest.display())]
    NoSpace { dest: PathBuf, size: u64, detail: String },
    #[error("the file is {size} bytes, over max_download_size ({max} bytes)")]
    TooLarge { size: u64, max: u64 },
    #[error("{} is a symlink; refusing to write through it", .0.display())]
    Symlink(PathBuf),
    #[error("another download is already writing {}; cancel it or choose another -o", .0.display())]
    PartBusy(PathBuf),
    #[error("{} appeared while downloading; not replacing it without --force", .0.display())]
    DestinationAppeared(PathBuf),
    /// A file at the part name that this download did not create, which
    /// cannot be moved aside (see [`super::part`]).
    #[error("{} belongs to uid {uid} and was not created by this download, so mftd will not write into it, and cannot move it aside ({why}); remove it (or ask its owner to) and resume", path.display())]
    ForeignPart { path: PathBuf, uid: u32, why: &'static str },
    #[error("{} was replaced while downloading; not putting it in place", .0.display())]
    PartReplaced(PathBuf),
    #[error("{} is not fully verified against the file's identity", .0.display())]
    NotVerified(PathBuf),
    #[error("{} is {len} bytes, expected {want}", path.display())]
    WrongLength { path: PathBuf, len: u64, want: u64 },
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The vote cannot settle which file to fetch (the message names the
    /// versions).
    #[error("{0}")]
    Vote(String),
    #[error("the sources kept changing their answer about the file; try again")]
    Unsettled,
    #[error("the remote file changed since download {id} started (was {was}; the sources now serve {now}); refusing to mix versions: cancel it and start again")]
    RemoteChanged { id: u64, was: String, now: String },
    /// Every source was dropped: each with its reason.
    #[error("no usable source ({})", .0.join("; "))]
    NoUsableSource(Vec<String>),
    #[error("gave up after {secs}s without a reachable source ({})", reasons.join("; "))]
    GaveUp { secs: u64, reasons: Vec<String> },
    #[error("mftd shut down; this download was started with --no-resume")]
    NoResume,
}

impl DownloadError {
    /// A failed file-system call on `path`.
    pub fn disk(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> DownloadError {
        let path = path.into();
        move |source| DownloadError::Disk { op, path, source }
    }

    /// A blocking task that panicked or was cancelled.
    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> DownloadError {
        move |source| DownloadError::Task { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_the_cause() {
        let e = DownloadError::disk("write manifest", "/s/1.json")(io::Error::from_raw_os_error(28));
        assert!(e.to_string().starts_with("cannot write manifest /s/1.json: No space left"), "{e}");
        let e = DownloadError::NoUsableSource(vec!["a:1: refused".into(), "b:2: not found".into()]);
        assert_eq!(e.to_string(), "no usable source (a:1: refused; b:2: not found)");
        let e = SourceError::from(ClientError::Refused);
        assert_eq!(e.to_string(), "connection refused");
    }
}
