//! Helpers for end-to-end tests: run the real `mftd` in a temp dir, drive it
//! with the real `mftctl`, and check what a user would check.
//!
//! The binaries are found next to the test executable's target directory
//! (`target/<profile>/mftd`); `make test` builds them first. `MFTD_BIN_DIR`
//! overrides the location.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use mftd_common::control::{DownloadInfo, Event, Failure, ListenerInfo, Response, SourceInfo, StatusInfo, Summary};
use mftd_common::proto::{Frame, HEADER_LEN};

/// Directory holding the built `mftd` and `mftctl`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MFTD_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    assert!(
        dir.join("mftd").exists() && dir.join("mftctl").exists(),
        "mftd/mftctl not built in {}; run `make test` (or `cargo build --bins` first)",
        dir.display()
    );
    dir
}

pub fn mftd_bin() -> PathBuf {
    bin_dir().join("mftd")
}
pub fn mftctl_bin() -> PathBuf {
    bin_dir().join("mftctl")
}

/// Deterministic pseudo-random content (xorshift), fast for large files.
pub fn write_file(path: &Path, size: u64, seed: u64) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mut f = std::fs::File::create(path).expect("create test file");
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write test file");
        left -= n as u64;
    }
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// A running `mftd`, killed (by PID) when dropped.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub export: PathBuf,
    pub downloads: PathBuf,
    pub ports: Vec<u16>,
    /// Network namespace the daemon runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
    /// `RLIMIT_NOFILE` (soft, hard) the daemon starts with, if set.
    pub nofile: Option<(u64, u64)>,
}

pub struct DaemonBuilder {
    listeners: usize,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    netns: Option<String>,
    nofile: Option<(u64, u64)>,
}

impl DaemonBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra.push(a.into());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Runs the daemon inside network namespace `ns` (root only).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.into());
        self
    }
    /// Starts the daemon with this open-files limit (soft, hard), as a
    /// service manager would.
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }
    pub fn start(self) -> Daemon {
        Daemon::start_with(self.listeners, &self.extra, &self.env, self.netns, self.nofile)
    }
}

impl Daemon {
    /// A daemon with `n` listeners on free ports.
    pub fn builder(n: usize) -> DaemonBuilder {
        DaemonBuilder { listeners: n, extra: Vec::new(), env: Vec::new(), netns: None, nofile: None }
    }

    pub fn start(n: usize) -> Daemon {
        Daemon::start_with(n, &[], &[], None, None)
    }

    fn start_with(
        n: usize,
        extra: &[String],
        env: &[(String, String)],
        netns: Option<String>,
        nofile: Option<(u64, u64)>,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let export = dir.path().join("export");
        let downloads = dir.path().join("downloads");
        std::fs::create_dir_all(&export).expect("mkdir export");
        std::fs::create_dir_all(&downloads).expect("mkdir downloads");
        let socket = dir.path().join("mftd.sock");
        let mut d = Daemon { child: None, socket, export, downloads, ports: Vec::new(), dir, netns, nofile };
        d.spawn(n, extra, env);
        d
    }

    pub fn command(&self, n: usize, extra: &[String]) -> Command {
        let mut cmd = match &self.netns {
            // `ip netns exec` execs mftd, so the child's PID is mftd's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(mftd_bin());
                c
            }
            None => Command::new(mftd_bin()),
        };
        let given = |flag: &str| extra.iter().any(|a| a == flag);
        cmd.arg("--socket").arg(&self.socket).arg("--export").arg(&self.export);
        if !given("--state-dir") {
            cmd.arg("--state-dir").arg(self.dir.path().join("state"));
        }
        if !given("--download-dir") {
            cmd.arg("--download-dir").arg(&self.downloads);
        }
        // A missing config file must not pick up the user's.
        cmd.env("MFTD_CONFIG", self.dir.path().join("none.toml")).env_remove("MFTD_SOCKET");
        if n > 0 && !extra.iter().any(|a| a == "--ports") {
            cmd.arg("--ports").arg(vec!["0"; n].join(","));
        } else if n == 0 && !extra.iter().any(|a| a == "--ports") {
            cmd.arg("--servers").arg("0");
        }
        cmd.args(extra);
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd
    }

    fn spawn(&mut self, n: usize, extra: &[String], env: &[(String, String)]) {
        let log = std::fs::File::create(self.dir.path().join("mftd.log")).expect("log file");
        let mut cmd = self.command(n, extra);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        // MFTD_CONFIG pointing at a missing file would be an error; use an empty one.
        std::fs::write(self.dir.path().join("none.toml"), "").expect("config");
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("spawn mftd");
        self.child = Some(child);
        self.wait_ready();
        self.ports = self.servers().iter().map(|s| s.port).collect();
    }

    /// Polls until the control socket answers (at most 10 s).
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("mftd exited early with {st}: {}", self.log());
                }
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                let out = self.ctl(&["servers", "list"]);
                if out.status.success() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mftd did not become ready: {}", self.log());
    }

    /// Starts a client daemon (no listeners) again on the same directories
    /// and socket after it was stopped or killed; its log goes on.
    pub fn spawn_again(&mut self, extra: &[String]) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.path().join("mftd.log"))
            .expect("log file");
        let mut cmd = self.command(0, extra);
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("spawn mftd"));
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mftd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Runs `mftctl --socket S ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(mftctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("MFTD_SOCKET")
            .output()
            .expect("run mftctl")
    }

    /// A daemon whose listeners and serving settings come from the config
    /// file `cfg` alone, so a reload (SIGHUP) re-reads them (the builder's
    /// daemons pass --ports).
    pub fn from_config(cfg: &Path) -> Daemon {
        let mut server = Daemon::start(0);
        server.kill();
        let log = std::fs::File::create(server.dir.path().join("mftd.log")).expect("log file");
        let mut cmd = Command::new(mftd_bin());
        cmd.arg("--config")
            .arg(cfg)
            .arg("--export")
            .arg(&server.export)
            .arg("--state-dir")
            .arg(server.dir.path().join("state"))
            .arg("--socket")
            .arg(&server.socket)
            .env_remove("MFTD_SOCKET")
            .stdout(Stdio::null())
            .stderr(log);
        server.child = Some(cmd.spawn().expect("spawn mftd"));
        server.wait_ready();
        server.ports = server.servers().iter().map(|s| s.port).collect();
        server
    }

    /// Sends SIGHUP and waits (at most 5 s) until the log says the
    /// configuration was reloaded.
    pub fn reload(&self) {
        let before = self.log().matches("configuration reloaded").count();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGHUP)
            .expect("SIGHUP");
        assert!(
            wait_until(Duration::from_secs(5), || self.log().matches("configuration reloaded").count() > before),
            "no reload: {}",
            self.log()
        );
    }

    /// Runs `mftctl ARGS` and panics if it has not ended within `limit`
    /// (for commands that follow a download and would otherwise hang a
    /// test that should fail).
    pub fn ctl_within(&self, limit: Duration, args: &[&str]) -> Output {
        let mut cmd = Command::new(mftctl_bin());
        cmd.arg("--socket").arg(&self.socket).args(args).env_remove("MFTD_SOCKET");
        output_within(&mut cmd, limit)
            .unwrap_or_else(|| panic!("mftctl {args:?} did not end within {limit:?}\n{}", self.log()))
    }

    /// Runs `mftctl --json ...` and parses every stdout line into the
    /// protocol's types: a daemon [`Response`] or one of mftctl's events.
    pub fn ctl_typed(&self, args: &[&str]) -> (Output, Vec<Line>) {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        let lines = typed_lines(&stdout(&out));
        (out, lines)
    }

    /// Runs `mftctl --json ARGS`, checks that it succeeded and printed one
    /// line, and returns that line (a daemon [`Response`]).
    pub fn ctl_response(&self, args: &[&str]) -> Response {
        let (out, lines) = self.ctl_typed(args);
        assert!(out.status.success(), "mftctl {args:?} failed: {}", stderr(&out));
        assert_eq!(lines.len(), 1, "mftctl {args:?} printed {} lines, not one: {lines:?}", lines.len());
        lines[0].response().clone()
    }

    /// Runs `mftctl --json ...` and parses every stdout line.
    pub fn ctl_json(&self, args: &[&str]) -> (Output, Vec<serde_json::Value>) {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        (out, lines)
    }

    /// `servers list`: every listener, by port.
    pub fn servers(&self) -> Vec<ListenerInfo> {
        match self.ctl_response(&["servers", "list"]) {
            Response::Servers { servers } => servers,
            other => panic!("servers list answered {}", json_text(&other)),
        }
    }

    /// Listener `port` as `servers list` shows it; panics if there is none.
    pub fn listener(&self, port: u16) -> ListenerInfo {
        let servers = self.servers();
        servers.iter().find(|s| s.port == port).cloned().unwrap_or_else(|| panic!("no listener {port}: {servers:?}"))
    }

    /// File bytes listener `port` has sent; panics if there is no such
    /// listener (a 0 would make `<` assertions pass vacuously).
    pub fn bytes_sent(&self, port: u16) -> u64 {
        self.listener(port).bytes_sent
    }

    /// `status`: the daemon at a glance.
    pub fn status(&self) -> StatusInfo {
        match self.ctl_response(&["status"]) {
            Response::Status(st) => st,
            other => panic!("status answered {}", json_text(&other)),
        }
    }

    /// `downloads list`: the downloads the caller may see, by ID (named
    /// after the request, as `downloads` is the download directory).
    pub fn downloads_list(&self) -> Vec<DownloadInfo> {
        match self.ctl_response(&["downloads", "list"]) {
            Response::Downloads { downloads } => downloads,
            other => panic!("downloads list answered {}", json_text(&other)),
        }
    }

    pub fn sources(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// Sends SIGTERM and waits (at most `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.as_ref()?.id() as i32;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(limit)
    }

    /// Waits for the process to exit on its own (at most `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A raw transfer-protocol client for poking listeners directly.
pub struct RawConn {
    pub s: Stream,
}

impl RawConn {
    /// Connects over TLS (the listeners' default), as a node of its own.
    pub fn connect(port: u16) -> RawConn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        RawConn { s: tls::client(s, tls::Identity::shared()).expect("TLS handshake with the listener") }
    }

    /// Connects over plain TCP (a `transport = "plain"` listener).
    pub fn connect_plain(port: u16) -> RawConn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        RawConn { s: Stream::Plain(s) }
    }

    pub fn hello(port: u16) -> RawConn {
        let mut c = RawConn::connect(port);
        c.send(&Frame::Hello { magic: mftd_common::proto::MAGIC, version: mftd_common::proto::VERSION, flags: 0 });
        match c.recv() {
            Some(Frame::Hello { .. }) => c,
            other => panic!("handshake failed: {other:?}"),
        }
    }

    pub fn send(&mut self, f: &Frame) {
        self.s.write_all(&f.encode()).expect("send frame");
    }

    /// Like `send`, but a closed connection is not an error.
    pub fn try_send(&mut self, f: &Frame) {
        let _ = self.s.write_all(&f.encode());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send bytes");
    }

    /// Next frame, or None if the server closed the connection.
    pub fn recv(&mut self) -> Option<Frame> {
        let mut h = [0u8; HEADER_LEN];
        self.s.read_exact(&mut h).ok()?;
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        assert!(len <= mftd_common::proto::MAX_FRAME as usize, "server sent oversized frame");
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).ok()?;
        Some(Frame::decode(h[0], &body).expect("server frame decodes"))
    }

    pub fn read_payload(&mut self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.s.read_exact(&mut v).expect("payload");
        v
    }
}

/// The error a source of a `downloads show` object had: its current
/// `last_error`, or the one it recovered from since; panics if neither.
pub fn source_error(s: &SourceInfo) -> String {
    s.last_error
        .as_ref()
        .or(s.recovered_from.as_ref())
        .cloned()
        .unwrap_or_else(|| panic!("source reports no error: {s:?}"))
}

/// The source of `dl` with address `addr`; panics if it has none.
pub fn source<'a>(dl: &'a DownloadInfo, addr: &str) -> &'a SourceInfo {
    dl.sources.iter().find(|s| s.address == addr).unwrap_or_else(|| panic!("download has no source {addr}: {dl:?}"))
}

/// A protocol message as it is on the wire, for failure messages.
pub fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("<cannot encode: {e}>"))
}

/// Parses each line of `mftctl --json` output into the protocol's types;
/// panics on a line that is not JSON or no known message.
pub fn typed_lines(text: &str) -> Vec<Line> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?} is no known message: {e}")))
        .collect()
}

/// One line of `mftctl --json` output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Line {
    Response(Response),
    Event(Event),
}

/// The line as JSON (re-encoded from its type: the same fields and values).
impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&json_text(self))
    }
}

/// Accessors that panic with the line's text when it is not the variant
/// asked for.
impl Line {
    /// The daemon's response this line is.
    pub fn response(&self) -> &Response {
        match self {
            Line::Response(r) => r,
            Line::Event(_) => panic!("not a response: {self}"),
        }
    }

    /// The download of a `progress` line, or None for any other line (for
    /// filtering a stream).
    pub fn progress(&self) -> Option<&DownloadInfo> {
        match self {
            Line::Response(Response::Progress { download }) => Some(download),
            _ => None,
        }
    }

    /// The summary of a `done` event.
    pub fn done(&self) -> &Summary {
        match self {
            Line::Event(Event::Done(s)) => s,
            _ => panic!("not a done event: {self}"),
        }
    }

    /// The ID in an `accepted` response.
    pub fn accepted_id(&self) -> u64 {
        match self {
            Line::Response(Response::Accepted { id, .. }) => *id,
            _ => panic!("not an accepted response: {self}"),
        }
    }

    /// The message of an `ok` response.
    pub fn ok_message(&self) -> &str {
        match self {
            Line::Response(Response::Ok { message }) => message,
            _ => panic!("not an ok response: {self}"),
        }
    }

    /// The code and message of an `error`: a daemon's error response, or
    /// an error event for a command mftctl could not carry out (whose code
    /// may be one of mftctl's own). The code as on the wire.
    pub fn command_error(&self) -> (String, &str) {
        match self {
            Line::Response(Response::Error { code, message }) => (mftd_common::control::word(code), message),
            Line::Event(Event::Error(Failure::Command { code, message })) => (code.clone(), message),
            _ => panic!("not an error for a command: {self}"),
        }
    }
}

/// Connects to `127.0.0.1:port` from another loopback address `src`, so
/// a flood has its own per-address budget and the canary download keeps
/// 127.0.0.1's. The source port is picked at `connect` (not at `bind`),
/// so a long flood can reuse ports its earlier connections left in
/// TIME_WAIT instead of running out of them.
pub fn connect_from(src: &str, port: u16) -> Option<TcpStream> {
    use nix::sys::socket::{bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).ok()?;
    setsockopt(&fd, sockopt::IpBindAddressNoPort, &true).ok()?;
    let local: SocketAddr = format!("{src}:0").parse().ok()?;
    let SocketAddr::V4(l4) = local else { return None };
    bind(fd.as_raw_fd(), &SockaddrIn::from(l4)).ok()?;
    connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).ok()?;
    Some(TcpStream::from(fd))
}

/// Whether the listener on `port` refuses a new connection from
/// `127.0.0.1` at once with `BUSY` (one let in gets nothing before its TLS
/// handshake, so a read times out).
pub fn refused_busy(port: u16) -> bool {
    use mftd_common::proto::{ErrorCode, Frame};
    use std::io::Read;
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return true };
    s.set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(n) if n > 5 => {
            Frame::decode(buf[0], &buf[5..n]).is_ok_and(|f| matches!(f, Frame::Error(e) if e.code == ErrorCode::Busy))
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

/// A loopback port nothing listens on (bound once, then released).
pub fn dead_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    format!("127.0.0.1:{port}")
}

/// `n` loopback ports free a moment ago (bound, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    ls.iter().map(|l| l.local_addr().expect("local addr").port()).collect()
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

impl Daemon {
    /// Runs `mftctl get REMOTE --from FROM -o <downloads> EXTRA...` and waits
    /// for it to end.
    pub fn get(&self, remote: &str, from: &str, extra: &[&str]) -> Output {
        let out_dir = self.downloads.to_str().expect("utf-8 path").to_string();
        let mut args = vec!["get", remote, "--from", from, "-o", &out_dir];
        args.extend_from_slice(extra);
        self.ctl(&args)
    }

    /// Starts a download detached; returns its ID.
    pub fn get_detached(&self, remote: &str, sources: &[String], extra: &[&str]) -> u64 {
        let from = sources.join(",");
        let mut args = vec!["get", remote, "--from", &from, "--detach"];
        let out_dir = self.downloads.to_str().expect("utf-8 path").to_string();
        args.extend_from_slice(&["-o", &out_dir]);
        args.extend_from_slice(extra);
        let out = self.ctl(&args);
        assert!(out.status.success(), "get failed: {}", stderr(&out));
        stdout(&out).trim().parse().expect("download id")
    }

    /// `downloads show ID`.
    pub fn download(&self, id: u64) -> DownloadInfo {
        let (out, lines) = self.ctl_typed(&["downloads", "show", &id.to_string()]);
        assert!(out.status.success(), "show failed: {}", stderr(&out));
        match lines.first() {
            Some(Line::Response(Response::Download { download })) => download.clone(),
            _ => panic!("downloads show {id} answered {lines:?}"),
        }
    }

    /// Waits for a download to end (`done`, `failed` or `cancelled`);
    /// returns it as it ended.
    pub fn wait_download(&self, id: u64, limit: Duration) -> DownloadInfo {
        let mut last = None;
        let ok = wait_until(limit, || {
            let d = self.download(id);
            let end = d.state.is_final();
            last = Some(d);
            end
        });
        assert!(ok, "download {id} did not end within {limit:?}: {last:?}\n{}", self.log());
        last.expect("polled at least once")
    }
}

/// A TCP proxy in front of a listener that forwards the first `limit`
/// bytes from server to client on each connection and then goes silent while
/// keeping the connection open: a source that "stops sending mid-range".
pub struct StallProxy {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl StallProxy {
    pub fn start(upstream: u16, limit: u64) -> StallProxy {
        StallProxy::spawn(upstream, limit, false)
    }

    /// Like [`StallProxy::start`], but takes one connection only: later
    /// ones (a client's probes and reconnections) are refused.
    pub fn start_once(upstream: u16, limit: u64) -> StallProxy {
        StallProxy::spawn(upstream, limit, true)
    }

    fn spawn(upstream: u16, limit: u64, once: bool) -> StallProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (s2, c2) = (stop.clone(), conns.clone());
        std::thread::spawn(move || {
            // Bounded: ends when the proxy is dropped (or after 10 minutes).
            let start = Instant::now();
            while !s2.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(600) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                if let Ok(mut g) = c2.lock() {
                    g.extend([client.try_clone().expect("clone"), server.try_clone().expect("clone")]);
                }
                let (mut cr, mut sw) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut cr, &mut sw);
                });
                let (mut sr, mut cw) = (server, client);
                std::thread::spawn(move || {
                    let mut left = limit;
                    let mut buf = [0u8; 16 << 10];
                    while left > 0 {
                        let n = match sr.read(&mut buf[..(left.min(16 << 10)) as usize]) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    // Silent from now on; the connection stays open until the
                    // proxy is dropped.
                    let _ = sr.read_to_end(&mut Vec::new());
                });
                if once {
                    // Closing the listener: connects are refused from now on.
                    return;
                }
            }
        });
        StallProxy { port, stop, conns }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(g) = self.conns.lock() {
            for c in g.iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// How a [`LyingServer`] misbehaves when asked for bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// DATA announcing more bytes than were asked for.
    LongerRange,
    /// DATA whose offset + length overflows u64.
    OverflowRange,
    /// DATA announcing a length near u64::MAX.
    HugeLength,
    /// A frame header announcing a body near u32::MAX.
    HugeFrame,
    /// Relays the real file but flips the byte at `first` and every
    /// `every` bytes after it: bad pieces under the honest identity.
    Flip { first: u64, every: u64 },
    /// Sends the right bytes, one every `every_ms` milliseconds, and never
    /// answers TRIM: a source that is never silent long enough to count as
    /// stalled and never gives a range back.
    Trickle { every_ms: u64 },
    /// Relays the real file, but never answers HASHES: a source whose hash
    /// list, asked for, never comes.
    NoHashes,
    /// Answers each READ with its first byte wrong, then hangs up: the
    /// rest of the piece comes from an honest source.
    OneByte,
    /// Says it is still hashing the file (STAT_OK without a root), never
    /// answers HASHES, and relays the real bytes: a source whose vote on
    /// the identity never comes.
    Hashing,
    /// Announces a file of `size` bytes (with the piece size that goes
    /// with it) instead of the real one, with the real root if `keep_root`
    /// (else none); relays the rest.
    Size { size: u64, keep_root: bool },
    /// Answers STAT truthfully and hangs up right after, on every
    /// connection: a source that flaps.
    Flap,
    /// [`Lie::Flip`], but hangs up after `keep` bytes of each READ: the
    /// rest of each piece it started comes from another source.
    FlipCut { first: u64, every: u64, keep: u64 },
    /// Sends the right bytes in `chunk`-byte writes `every_ms` apart (a
    /// steady, slow rate) and never answers TRIM.
    Paced { chunk: usize, every_ms: u64 },
    /// Claims to hold the shared secret without it: answers the client's
    /// proof with that same proof sent back as its own (the best a server
    /// without the secret has to offer), then serves the real file.
    ForgedAuth,
}

/// A transfer server that tells the truth about the file (it relays the
/// handshake and STAT to a real listener) and then lies in its DATA answers.
pub struct LyingServer {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Every connection accepted, so [`LyingServer::go_down`] can cut them.
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl LyingServer {
    /// A lying node speaking TLS with an identity of its own.
    pub fn start(upstream: u16, lie: Lie) -> LyingServer {
        LyingServer::start_with(upstream, lie, true)
    }

    /// The same liar over plain TCP: name it `plain://127.0.0.1:PORT`.
    pub fn start_plain(upstream: u16, lie: Lie) -> LyingServer {
        LyingServer::start_with(upstream, lie, false)
    }

    fn start_with(upstream: u16, lie: Lie, tls: bool) -> LyingServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let c2 = conns.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !s2.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(300) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let mine = client.try_clone().ok();
                if let Ok(c) = client.try_clone() {
                    c2.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                }
                std::thread::spawn(move || {
                    lie_to(client, upstream, lie, tls);
                    // The clone kept for `go_down` must not keep a connection
                    // the liar hung up on open.
                    if let Some(c) = mine {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                });
            }
        });
        LyingServer { port, stop, conns }
    }

    /// The server goes down: it stops listening (connections are refused
    /// from the next poll, within 10 ms) and every open connection is cut.
    pub fn go_down(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        for c in self.conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for LyingServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn lie_to(client: TcpStream, upstream: u16, lie: Lie, tls: bool) {
    // The client hangs up on a liar; that must not panic this thread.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lie_to_inner(client, upstream, lie, tls)));
}

fn lie_to_inner(client: TcpStream, upstream: u16, lie: Lie, over_tls: bool) {
    use mftd_common::proto::DataHeader;
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    // A lying node with a TLS identity of its own, or a plain one.
    let s = if over_tls {
        let Ok(s) = tls::server(client, tls::Identity::shared()) else { return };
        s
    } else {
        Stream::Plain(client)
    };
    let mut c = RawConn { s };
    let mut up = RawConn::hello(upstream);
    // Handshake: answer HELLO ourselves.
    let hello = |flags| Frame::Hello { magic: mftd_common::proto::MAGIC, version: mftd_common::proto::VERSION, flags };
    match c.recv() {
        Some(Frame::Hello { .. }) if lie == Lie::ForgedAuth => {
            let Some(Frame::Auth { mac }) = c.recv() else { return };
            c.try_send(&hello(mftd_common::proto::FLAG_AUTH));
            c.try_send(&Frame::Auth { mac });
        }
        Some(Frame::Hello { .. }) => c.try_send(&hello(0)),
        _ => return,
    }
    loop {
        let Some(f) = c.recv() else { return };
        match f {
            // The trickler ignores TRIM: no answer, no effect.
            Frame::Trim { .. } if matches!(lie, Lie::Trickle { .. } | Lie::Paced { .. }) => {}
            Frame::Stat { .. } if matches!(lie, Lie::Size { .. }) => {
                let Lie::Size { size, keep_root } = lie else { return };
                up.try_send(&f);
                let Some(answer) = up.recv() else { return };
                let answer = match answer {
                    Frame::StatOk(mut s) => {
                        s.size = size;
                        s.piece_size = mftd_common::proto::piece_size_for(size);
                        if !keep_root {
                            s.root = None;
                        }
                        Frame::StatOk(s)
                    }
                    other => other,
                };
                c.try_send(&answer);
            }
            Frame::Hashes { .. } if matches!(lie, Lie::NoHashes | Lie::Hashing) => {}
            Frame::Stat { .. } if lie == Lie::Hashing => {
                up.try_send(&f);
                let Some(answer) = up.recv() else { return };
                let answer = match answer {
                    Frame::StatOk(mut s) => {
                        s.root = None;
                        Frame::StatOk(s)
                    }
                    other => other,
                };
                c.try_send(&answer);
            }
            Frame::Stat { .. } if lie == Lie::Flap => {
                up.try_send(&f);
                let Some(answer) = up.recv() else { return };
                c.try_send(&answer);
                return;
            }
            Frame::Stat { .. } | Frame::Hashes { .. } | Frame::Trim { .. } => {
                up.try_send(&f);
                let Some(answer) = up.recv() else { return };
                c.try_send(&answer);
            }
            Frame::Read(r) => match lie {
                Lie::Flip { .. } | Lie::FlipCut { .. } | Lie::NoHashes | Lie::Hashing | Lie::ForgedAuth => {
                    let (first, every, keep) = match lie {
                        Lie::Flip { first, every } => (first, every, u64::MAX),
                        Lie::FlipCut { first, every, keep } => (first, every, keep),
                        _ => (u64::MAX, u64::MAX, u64::MAX),
                    };
                    up.try_send(&Frame::Read(r.clone()));
                    let mut got = 0u64;
                    while got < r.len {
                        match up.recv() {
                            Some(Frame::Data(h)) => {
                                let mut payload = up.read_payload(h.len);
                                let mut at = first;
                                while at < h.offset + h.len {
                                    if at >= h.offset {
                                        payload[(at - h.offset) as usize] ^= 0x55;
                                    }
                                    let Some(next) = at.checked_add(every.max(1)) else { break };
                                    at = next;
                                }
                                c.try_send(&Frame::Data(h));
                                if got + h.len > keep {
                                    let _ = c.s.write_all(&payload[..(keep - got) as usize]);
                                    let _ = c.s.flush();
                                    return;
                                }
                                let _ = c.s.write_all(&payload);
                                got += h.len;
                                if h.len == 0 {
                                    break;
                                }
                            }
                            Some(other) => {
                                let stop = matches!(other, Frame::Error(_));
                                c.try_send(&other);
                                if stop {
                                    break;
                                }
                            }
                            None => return,
                        }
                    }
                }
                Lie::OneByte => {
                    up.try_send(&Frame::Read(r.clone()));
                    let Some(Frame::Data(h)) = up.recv() else { return };
                    let payload = up.read_payload(h.len);
                    let Some(first) = payload.first() else { return };
                    c.try_send(&Frame::Data(h));
                    let _ = c.s.write_all(&[first ^ 0x55]);
                    let _ = c.s.flush();
                    return;
                }
                // The real bytes, announced as DATA frames of up to 1 MiB,
                // then written `chunk` bytes at a time (the trickler: one).
                Lie::Paced { .. } | Lie::Trickle { .. } => {
                    let (chunk, every_ms) = match lie {
                        Lie::Paced { chunk, every_ms } => (chunk, every_ms),
                        Lie::Trickle { every_ms } => (1, every_ms),
                        _ => return,
                    };
                    up.try_send(&Frame::Read(r.clone()));
                    let mut got = 0u64;
                    while got < r.len {
                        let Some(Frame::Data(h)) = up.recv() else { return };
                        let payload = up.read_payload(h.len);
                        got += h.len;
                        if h.len == 0 {
                            break;
                        }
                        c.try_send(&Frame::Data(h));
                        for b in payload.chunks(chunk.max(1)) {
                            if c.s.write_all(b).and_then(|_| c.s.flush()).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(every_ms));
                        }
                    }
                }
                Lie::Size { .. } | Lie::Flap => {
                    up.try_send(&Frame::Read(r.clone()));
                    let Some(answer) = up.recv() else { return };
                    c.try_send(&answer);
                    return;
                }
                Lie::LongerRange => {
                    c.try_send(&Frame::Data(DataHeader { id: r.id, offset: r.offset, len: r.len + 4096 }));
                    let _ = c.s.write_all(&vec![0x55u8; (r.len + 4096) as usize]);
                }
                Lie::OverflowRange => {
                    c.try_send(&Frame::Data(DataHeader { id: r.id, offset: u64::MAX - 10, len: r.len }));
                }
                Lie::HugeLength => {
                    c.try_send(&Frame::Data(DataHeader { id: r.id, offset: r.offset, len: u64::MAX - 5 }));
                    let _ = c.s.write_all(&vec![0x55u8; 1 << 20]);
                }
                Lie::HugeFrame => {
                    let mut h = vec![mftd_common::proto::T_DATA];
                    h.extend_from_slice(&(u32::MAX - 3).to_be_bytes());
                    let _ = c.s.write_all(&h);
                    let _ = c.s.write_all(&vec![0u8; 1 << 16]);
                }
            },
            _ => return,
        }
    }
}

/// Resident memory of a process in KiB.
/// Resident memory of a process in KiB; panics if it cannot be read (a 0
/// would make `<` assertions pass vacuously).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Open file descriptors of a process; panics if they cannot be listed.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}")).count()
}

/// Slack the engine tests allow for duplicate bytes per failed connection
/// (2 MiB): what its server may have sent that never arrived, or that
/// arrived after another connection had fetched it.
pub const WINDOW_BYTES: u64 = 4 * 512 * 1024;

/// Makes a server hash `name` now, so timings measure transfers: a STAT,
/// and if the server answered before it had hashed the file, a HASHES,
/// which it answers once it has.
pub fn warm(d: &Daemon, name: &str) {
    let mut c = RawConn::hello(d.ports[0]);
    c.send(&Frame::Stat { path: name.into() });
    let stat = match c.recv() {
        Some(Frame::StatOk(s)) => s,
        other => panic!("STAT {name} failed: {other:?}"),
    };
    if stat.root.is_none() {
        c.send(&Frame::Hashes { size: stat.size, mtime_ns: stat.mtime_ns, path: name.into() });
        assert!(matches!(c.recv(), Some(Frame::HashesOk { .. })), "HASHES {name} failed");
    }
}

/// The BLAKE3 root identity of a local file (hex), computed as the
/// protocol defines it.
pub fn identity_of(path: &Path) -> String {
    use mftd_common::proto::{piece_size_for, root_of};
    let data = std::fs::read(path).expect("read file to hash");
    let size = data.len() as u64;
    let ps = piece_size_for(size);
    let hashes: Vec<[u8; 32]> = data.chunks(ps as usize).map(|c| *blake3::hash(c).as_bytes()).collect();
    hex::encode(root_of(size, ps, &hashes))
}

/// A transfer connection as the raw test clients see it: plain TCP, or
/// TLS on either side (rustls' blocking streams).
pub enum Stream {
    Plain(TcpStream),
    TlsClient(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    TlsServer(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::TlsClient(s) => &s.sock,
            Stream::TlsServer(s) => &s.sock,
        }
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_read_timeout(d)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::TlsClient(s) => s.read(buf),
            Stream::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::TlsClient(s) => s.write(buf),
            Stream::TlsServer(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::TlsClient(s) => s.flush(),
            Stream::TlsServer(s) => s.flush(),
        }
    }
}

/// TLS for the raw test peers, with mftd's own node identity and TLS
/// configuration (`mftd::node`): a node identity of their own and a
/// verifier that accepts any node (what is checked is up to each test).
pub mod tls {
    use std::net::TcpStream;
    use std::sync::{Arc, OnceLock};

    use mftd::node::{NodeIdentity, TlsConfigs};

    use super::Stream;

    /// A node identity (key and certificate in a temp dir of its own).
    pub struct Identity {
        configs: TlsConfigs,
        _dir: tempfile::TempDir,
    }

    impl Identity {
        pub fn generate() -> Identity {
            let dir = tempfile::tempdir().expect("temp dir");
            let id = NodeIdentity::load_or_create(dir.path()).expect("node identity");
            Identity { configs: TlsConfigs::new(&id).expect("TLS configuration"), _dir: dir }
        }

        /// One identity for the whole test process.
        pub fn shared() -> &'static Identity {
            static ID: OnceLock<Identity> = OnceLock::new();
            ID.get_or_init(Identity::generate)
        }

        /// Its node ID.
        pub fn node_id(&self) -> String {
            self.configs.id.to_string()
        }
    }

    /// Client side of a TLS handshake over `tcp`, completed before return.
    pub fn client(mut tcp: TcpStream, id: &Identity) -> std::io::Result<Stream> {
        let name = rustls::pki_types::ServerName::try_from("mftd").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::clone(&id.configs.client), name)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(Stream::TlsClient(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    /// Server side of a TLS handshake over `tcp`, completed before return.
    pub fn server(mut tcp: TcpStream, id: &Identity) -> std::io::Result<Stream> {
        let mut conn = rustls::ServerConnection::new(Arc::clone(&id.configs.server))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(Stream::TlsServer(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }
}

/// What a [`Relay`] does with the bytes between a client and a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Copies bytes both ways untouched (and records what the server sent).
    Transparent,
    /// Like `Transparent`, but flips one bit of the server's byte number
    /// `at` (counted over the whole connection).
    FlipServerByte { at: u64 },
    /// A man in the middle: answers the client's TLS with its own identity,
    /// opens its own TLS connection to the listener, and relays the
    /// plaintext each side sends after the handshakes.
    Mitm,
}

/// A TCP relay on a port of its own in front of a listener, for on-path
/// attacker tests. Bounded: it stops when dropped or after 5 minutes.
pub struct Relay {
    pub port: u16,
    /// Bytes the server sent through the relay (raw, as on the wire).
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn start(upstream: u16, mode: RelayMode) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s2, seen2) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !s2.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(300) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let (seen3, stop3) = (seen2.clone(), s2.clone());
                std::thread::spawn(move || {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match mode {
                        RelayMode::Mitm => mitm(client, server, &stop3),
                        _ => pipe(client, server, mode, &seen3),
                    }));
                });
            }
        });
        Relay { port, seen, stop }
    }

    pub fn source(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pipe(client: TcpStream, server: TcpStream, mode: RelayMode, seen: &std::sync::Mutex<Vec<u8>>) {
    let (mut cr, mut sw) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut cr, &mut sw);
        let _ = sw.shutdown(std::net::Shutdown::Write);
    });
    let (mut sr, mut cw) = (server, client);
    let mut at = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match sr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let RelayMode::FlipServerByte { at: target } = mode {
            if (at..at + n as u64).contains(&target) {
                buf[(target - at) as usize] ^= 0x01;
            }
        }
        at += n as u64;
        if let Ok(mut s) = seen.lock() {
            if s.len() < 64 << 20 {
                s.extend_from_slice(&buf[..n]);
            }
        }
        if cw.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = cw.shutdown(std::net::Shutdown::Both);
}

fn mitm(client: TcpStream, server: TcpStream, stop: &std::sync::atomic::AtomicBool) {
    let me = tls::Identity::shared();
    let Ok(mut c) = tls::server(client, me) else { return };
    let Ok(mut s) = tls::client(server, me) else { return };
    for t in [c.tcp(), s.tcp()] {
        let _ = t.set_read_timeout(Some(Duration::from_millis(5)));
    }
    let start = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    // One thread, both directions: rustls streams cannot be split.
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && start.elapsed() < Duration::from_secs(120) {
        if !shuttle(&mut c, &mut s, &mut buf) || !shuttle(&mut s, &mut c, &mut buf) {
            return;
        }
    }
}

/// Moves what `from` has now to `to`; false once either side is done.
fn shuttle(from: &mut Stream, to: &mut Stream, buf: &mut [u8]) -> bool {
    match from.read(buf) {
        Ok(0) => false,
        Ok(n) => to.write_all(&buf[..n]).and_then(|_| to.flush()).is_ok(),
        Err(e) => matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// Says loudly that a test did not run here and why (a test that needs
/// root passes silently otherwise, and a green run would claim too much).
pub fn say_skipped(test: &str, why: &str) {
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Runs `cmd` to its end, or kills it after `limit` and returns `None`
/// (so a test that should fail does not hang instead).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Some(out.expect("wait for the child")),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            None
        }
    }
}

/// Playing a second local user: uid 65534 through `setpriv`, against a
/// daemon whose socket group is gid 65534's group (CI runs as root).
pub mod member {
    use std::process::{Command, Output};

    use super::{mftctl_bin, Daemon, DaemonBuilder};

    pub const NOBODY: u32 = 65534;

    /// Why a second uid cannot be played here, if it cannot.
    pub fn cannot_run() -> Option<&'static str> {
        if !nix::unistd::geteuid().is_root() {
            return Some("needs root to act as a second uid (uid 65534 through setpriv)");
        }
        if Command::new("setpriv").arg("--version").output().is_err() {
            return Some("needs setpriv (util-linux)");
        }
        if nix::unistd::Group::from_gid(NOBODY.into()).ok().flatten().is_none() {
            return Some("needs a group with gid 65534");
        }
        None
    }

    /// Returns from the test, saying so loudly, when a second uid cannot
    /// be played here.
    #[macro_export]
    macro_rules! require_second_uid {
        () => {
            if let Some(why) = $crate::member::cannot_run() {
                $crate::say_skipped(module_path!(), why);
                return;
            }
        };
    }

    /// A builder for a daemon whose socket group is gid 65534's.
    pub fn builder(n: usize) -> DaemonBuilder {
        let group = nix::unistd::Group::from_gid(NOBODY.into()).ok().flatten().expect("group 65534").name;
        Daemon::builder(n).arg("--socket-group").arg(group)
    }

    /// Lets uid 65534 reach the daemon's socket (its directory is a
    /// tempdir, mode 0700).
    pub fn open_up(d: &Daemon) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// `program` run as uid/gid 65534 with no supplementary groups.
    pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        let id = NOBODY.to_string();
        c.args(["--reuid", &id, "--regid", &id, "--clear-groups"]).arg(program);
        c.env_remove("MFTD_SOCKET");
        c
    }

    /// `mftctl --socket S ARGS` as uid 65534.
    pub fn ctl(d: &Daemon, args: &[&str]) -> Output {
        command(mftctl_bin()).arg("--socket").arg(&d.socket).args(args).output().expect("run setpriv")
    }

    /// A daemon (no listeners) whose socket group is gid 65534's group, in
    /// a directory uid 65534 may enter.
    pub fn daemon(extra: &[&str]) -> Daemon {
        let mut b = builder(0);
        for a in extra {
            b = b.arg(*a);
        }
        let d = b.start();
        open_up(&d);
        d
    }

    /// A directory `parent/name` owned by uid/gid 65534, mode 0755.
    pub fn nobodys_dir(parent: &std::path::Path, name: &str) -> std::path::PathBuf {
        let p = parent.join(name);
        std::fs::create_dir(&p).expect("mkdir");
        nix::unistd::chown(&p, Some(NOBODY.into()), Some(NOBODY.into())).expect("chown");
        p
    }
}
