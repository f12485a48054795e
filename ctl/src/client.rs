//! Talking to the control socket: connect, version exchange, one JSON line
//! per message. Errors are phrased for the person at the terminal.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mftd_common::control::{to_line, ErrorCode, Request, Response, MAX_LINE, PROTOCOL};

#[derive(Debug)]
pub enum CtlError {
    NotRunning(PathBuf),
    Permission(PathBuf),
    Io(PathBuf, io::Error),
    Protocol(String),
    Daemon { code: ErrorCode, message: String },
    Usage(String),
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlError::NotRunning(p) => write!(
                f,
                "mftd is not running: no socket at {}; start it with `systemctl start mftd` or `mftd` (or pass --socket)",
                p.display()
            ),
            CtlError::Permission(p) => {
                use std::os::unix::fs::MetadataExt;
                // The socket's group, or its directory's when the socket
                    // itself cannot be seen.
                let group = std::fs::metadata(p)
                    .ok()
                    .or_else(|| p.parent().and_then(|d| std::fs::metadata(d).ok()))
                    .and_then(|m| nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid())).ok().flatten())
                    .map(|g| g.name);
                match group {
                    Some(g) if g != "root" => write!(
                        f,
                        "permission denied on {}; join the {g} group (`sudo usermod -aG {g} $USER`, then log in again) or run as root",
                        p.display()
                    ),
                    _ => write!(f, "permission denied on {}; run mftctl as the user mftd runs as, or as root", p.display()),
                }
            }
            CtlError::Io(p, e) => write!(f, "lost the connection to mftd at {}: {e}", p.display()),
            CtlError::Protocol(m) => write!(f, "unexpected answer from mftd: {m}"),
            CtlError::Daemon { message, .. } => write!(f, "{message}"),
            CtlError::Usage(m) => write!(f, "{m}"),
        }
    }
}

impl CtlError {
    pub fn code(&self) -> String {
        match self {
            CtlError::NotRunning(_) => "not_running".into(),
            CtlError::Permission(_) => "permission_denied".into(),
            CtlError::Io(..) => "io".into(),
            CtlError::Protocol(_) => "protocol".into(),
            CtlError::Daemon { code, .. } => mftd_common::control::word(code),
            CtlError::Usage(_) => "usage".into(),
        }
    }

    pub fn from_response(r: Response) -> CtlError {
        match r {
            Response::Error { code, message } => CtlError::Daemon { code, message },
            other => CtlError::Protocol(format!("{other:?}")),
        }
    }
}

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C while following a download detaches instead of killing mftctl
/// mid-line; the download goes on in the daemon.
pub fn install_sigint() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_sigint), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let _ = unsafe { sigaction(Signal::SIGINT, &act) };
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, CtlError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => CtlError::NotRunning(path.to_path_buf()),
            io::ErrorKind::PermissionDenied => CtlError::Permission(path.to_path_buf()),
            _ => CtlError::Io(path.to_path_buf(), e),
        })?;
        let writer = stream.try_clone().map_err(|e| CtlError::Io(path.to_path_buf(), e))?;
        let mut c = Client { path: path.to_path_buf(), reader: BufReader::new(stream), writer };
        match c
            .request(&Request::Hello { protocol: PROTOCOL, client: format!("mftctl {}", env!("CARGO_PKG_VERSION")) })?
        {
            Response::Hello { .. } => Ok(c),
            Response::Error { code: ErrorCode::PermissionDenied, .. } => Err(CtlError::Permission(path.to_path_buf())),
            other => Err(CtlError::from_response(other)),
        }
    }

    pub fn send(&mut self, req: &Request) -> Result<(), CtlError> {
        match self.writer.write_all(&to_line(req)) {
            Ok(()) => Ok(()),
            // mftd may have said why and closed before reading (a limit
            // reached): that sentence beats "broken pipe".
            Err(e) => match self.recv() {
                Ok(r @ Response::Error { .. }) => Err(CtlError::from_response(r)),
                _ => Err(CtlError::Io(self.path.clone(), e)),
            },
        }
    }

    pub fn recv(&mut self) -> Result<Response, CtlError> {
        let mut line = String::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .map_err(|e| CtlError::Io(self.path.clone(), e))?;
        if n == 0 {
            return Err(CtlError::Io(
                self.path.clone(),
                io::Error::new(io::ErrorKind::UnexpectedEof, "mftd closed the connection"),
            ));
        }
        serde_json::from_str(line.trim_end())
            .map_err(|e| CtlError::Protocol(format!("{e}: {}", start_of(line.trim_end()))))
    }

    /// Like `recv`, but returns `Ok(None)` once Ctrl-C was pressed.
    pub fn recv_interruptible(&mut self) -> Result<Option<Response>, CtlError> {
        let _ = self.reader.get_ref().set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = Vec::new();
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    return Err(CtlError::Io(
                        self.path.clone(),
                        io::Error::new(io::ErrorKind::UnexpectedEof, "mftd closed the connection"),
                    ))
                }
                Ok(_) if buf.ends_with(b"\n") => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    if buf.len() > MAX_LINE {
                        return Err(CtlError::Protocol("response line too long".into()));
                    }
                    continue;
                }
                Err(e) => return Err(CtlError::Io(self.path.clone(), e)),
            }
        }
        let text = String::from_utf8_lossy(&buf);
        serde_json::from_str(text.trim_end())
            .map(Some)
            .map_err(|e| CtlError::Protocol(format!("{e}: {}", start_of(text.trim_end()))))
    }

    pub fn request(&mut self, req: &Request) -> Result<Response, CtlError> {
        self.send(req)?;
        self.recv()
    }
}

/// The first 200 characters of an answer that could not be understood:
/// enough to tell what it was, not a screenful.
fn start_of(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}… ({} bytes)", &text[..i], text.len()),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::start_of;

    #[test]
    fn an_answer_not_understood_is_quoted_by_its_start() {
        assert_eq!(start_of("short"), "short");
        let long = "é".repeat(5000);
        let shown = start_of(&long);
        assert!(shown.starts_with(&"é".repeat(200)) && shown.ends_with("… (10000 bytes)"), "{shown}");
    }
}
