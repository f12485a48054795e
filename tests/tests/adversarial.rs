//! Hostile peers, hostile paths, floods and faults. Every case ends by
//! checking that the daemon still serves a normal download correctly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadState, SourceState};
use mftd_common::proto::{ErrorCode, Frame, ReadReq};
use mftd_tests::{
    connect_from, fd_count, mftctl_bin, rss_kib, sha256_file, stderr, stdout, tls, wait_until, write_file, Daemon, Lie,
    LyingServer, RawConn,
};

const MIB: u64 = 1 << 20;
const SENTINEL: &[u8] = b"SENTINEL-outside-the-export-root-do-not-serve";

/// A normal download from `server` into a fresh client must still work.
fn still_serves(server: &Daemon) {
    write_file(&server.export.join("canary.bin"), 3 * MIB + 5, 99);
    let client = Daemon::start(0);
    let out = client.get("canary.bin", &server.sources().join(","), &[]);
    assert!(out.status.success(), "normal download failed afterwards: {}\n{}", stderr(&out), server.log());
    assert_eq!(sha256_file(&client.downloads.join("canary.bin")), sha256_file(&server.export.join("canary.bin")));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends raw bytes after a handshake and returns everything the server
/// answers until it closes or goes quiet.
fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut c = RawConn::hello(port);
    c.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    c.send_raw(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn stat_frame(path: &[u8]) -> Vec<u8> {
    let mut f = vec![mftd_common::proto::T_STAT];
    f.extend_from_slice(&(path.len() as u32).to_be_bytes());
    f.extend_from_slice(path);
    f
}

#[test]
fn hostile_paths_get_uniform_errors_and_no_sentinel_byte() {
    let server = Daemon::start(1);
    std::fs::write(server.dir.path().join("secret"), SENTINEL).unwrap();
    std::fs::write(server.export.join("ok"), b"fine").unwrap();
    let long = vec![b'a'; 64 << 10];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("../x", b"../secret".to_vec()),
        ("/etc/passwd", b"/etc/passwd".to_vec()),
        ("a/../../x", b"a/../../secret".to_vec()),
        ("NUL", b"ok\0../../secret".to_vec()),
        ("64 KiB", long),
        ("invalid UTF-8", vec![0xff, 0xfe, b'/', b's']),
        ("backslashes", b"..\\..\\secret".to_vec()),
    ];
    for (name, path) in &cases {
        let answer = raw_exchange(server.ports[0], &stat_frame(path));
        assert!(!contains(&answer, SENTINEL), "{name}: sentinel bytes served");
        assert!(answer.len() >= 5, "{name}: no answer");
        let body_len = u32::from_be_bytes([answer[1], answer[2], answer[3], answer[4]]) as usize;
        let f = Frame::decode(answer[0], &answer[5..5 + body_len.min(answer.len() - 5)]).expect("decodes");
        match f {
            Frame::Error(e) => assert!(matches!(e.code, ErrorCode::BadPath | ErrorCode::BadFrame), "{name}: {e:?}"),
            other => panic!("{name}: not refused: {other:?}"),
        }
        // READ with the same path, as a raw frame.
        let mut r =
            Frame::Read(ReadReq { id: 1, offset: 0, len: 8, size: 45, mtime_ns: 0, path: String::new() }).encode();
        r.truncate(5 + 36);
        r.extend_from_slice(path);
        let len = (r.len() - 5) as u32;
        r[1..5].copy_from_slice(&len.to_be_bytes());
        let answer = raw_exchange(server.ports[0], &r);
        assert!(!contains(&answer, SENTINEL), "{name}: sentinel bytes served on READ");
    }
    still_serves(&server);
}

#[test]
fn swapping_a_parent_for_a_symlink_never_leaks() {
    swap_race(Daemon::start(1));
}

/// The same race against the fallback resolver used where openat2 is
/// unavailable (old kernels, seccomp sandboxes such as systemd's
/// RestrictSUIDSGID=).
#[test]
fn swapping_a_parent_never_leaks_with_the_walking_resolver() {
    let server = Daemon::builder(1).env("MFTD_JAIL_RESOLVER", "walk").start();
    swap_race(server);
}

fn swap_race(server: Daemon) {
    let outside = server.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("f.txt"), SENTINEL).unwrap();
    let d = server.export.join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f.txt"), vec![b'G'; SENTINEL.len()]).unwrap();
    // Symlinks that point out, file and directory, are refused outright.
    symlink(outside.join("f.txt"), server.export.join("out-file")).unwrap();
    symlink(&outside, server.export.join("out-dir")).unwrap();
    let mut c = RawConn::hello(server.ports[0]);
    for p in ["out-file", "out-dir/f.txt"] {
        c.send(&Frame::Stat { path: p.into() });
        assert!(matches!(c.recv(), Some(Frame::Error(e)) if e.code == ErrorCode::PathRefused), "{p}");
    }

    // As many swaps as the README claims, while requests keep coming.
    const SWAPS: u64 = 20_000;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s2, n2, d2, real, out2) =
        (stop.clone(), done.clone(), d.clone(), server.export.join("d.real"), outside.clone());
    let swapper = std::thread::spawn(move || {
        let mut swaps = 0u64;
        let start = Instant::now();
        while !s2.load(std::sync::atomic::Ordering::SeqCst)
            && swaps < SWAPS
            && start.elapsed() < Duration::from_secs(30)
        {
            if std::fs::rename(&d2, &real).is_ok() {
                let _ = symlink(&out2, &d2);
                let _ = std::fs::remove_file(&d2);
                let _ = std::fs::rename(&real, &d2);
                swaps += 1;
                n2.store(swaps, std::sync::atomic::Ordering::Relaxed);
            }
        }
        swaps
    });
    let mut leaked = 0;
    let mut served = 0;
    let mut requests = 0;
    // Answers that show a request met the swap: the path led through the
    // symlink (refused) or the directory was away (not found).
    let mut refused = 0;
    let mut missing = 0;
    let start = Instant::now();
    while done.load(std::sync::atomic::Ordering::Relaxed) < SWAPS && start.elapsed() < Duration::from_secs(30) {
        c.send(&Frame::Stat { path: "d/f.txt".into() });
        requests += 1;
        match c.recv() {
            Some(Frame::StatOk(s)) => {
                c.send(&Frame::Read(ReadReq {
                    id: 2,
                    offset: 0,
                    len: s.size,
                    size: s.size,
                    mtime_ns: s.mtime_ns,
                    path: "d/f.txt".into(),
                }));
                requests += 1;
                match c.recv() {
                    Some(Frame::Data(h)) => {
                        let bytes = c.read_payload(h.len);
                        served += 1;
                        if contains(&bytes, b"SENTINEL") {
                            leaked += 1;
                        }
                    }
                    Some(Frame::Error(e)) if e.code == ErrorCode::PathRefused => refused += 1,
                    Some(Frame::Error(e)) if e.code == ErrorCode::NotFound => missing += 1,
                    Some(Frame::Error(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
            Some(Frame::Error(e)) if e.code == ErrorCode::PathRefused => refused += 1,
            Some(Frame::Error(e)) if e.code == ErrorCode::NotFound => missing += 1,
            Some(Frame::Error(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let swaps = swapper.join().unwrap();
    println!(
        "{swaps} directory/symlink swaps, {requests} requests: {served} reads served, {refused} refused through the symlink, {missing} found the directory away, {leaked} leaked"
    );
    assert_eq!(swaps, SWAPS, "only {swaps} swaps");
    assert!(served > 0, "nothing served at all");
    assert!(refused > 0, "no request ever met the symlink: the race window was never hit");
    assert_eq!(leaked, 0, "sentinel bytes leaked");
    let _ = std::fs::remove_file(&d);
    if !d.exists() {
        let _ = std::fs::rename(server.export.join("d.real"), &d);
    }
    still_serves(&server);
}

#[test]
fn lying_servers_are_dropped_and_the_others_finish() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("6M").start();
    let size = 8 * MIB;
    write_file(&server.export.join("l"), size, 51);
    for lie in [Lie::LongerRange, Lie::OverflowRange, Lie::HugeLength, Lie::HugeFrame] {
        let liar = LyingServer::start(server.ports[0], lie);
        let client = Daemon::start(0);
        let liar_addr = format!("127.0.0.1:{}", liar.port);
        let id = client.get_detached("l", &[liar_addr.clone(), server.sources()[1].clone()], &[]);
        let dl = client.wait_download(id, Duration::from_secs(30));
        assert_eq!(dl.state, DownloadState::Done, "{lie:?}: {dl:?}");
        assert_eq!(sha256_file(&client.downloads.join("l")), sha256_file(&server.export.join("l")), "{lie:?}");
        let l = mftd_tests::source(&dl, &liar_addr);
        println!("{lie:?}: {l:?}");
        assert_eq!(l.state, SourceState::Failed, "{lie:?}: {l:?}");
        let err = l.last_error.as_deref().unwrap();
        assert!(err.contains("protocol violation") || err.contains("exceeds"), "{lie:?}: {err}");
        assert!(rss_kib(client.pid()) < 200 * 1024, "{lie:?}: client memory grew to {} KiB", rss_kib(client.pid()));
        // Nothing but the file was written to the output directory.
        let names: Vec<String> = std::fs::read_dir(&client.downloads)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["l".to_string()], "{lie:?}");
    }
    // A hostile remote name never escapes the output directory.
    let client = Daemon::start(0);
    let out = client.get("../../.ssh/authorized_keys", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid remote path"), "{}", stderr(&out));
    assert!(!client.dir.path().join(".ssh").exists());
    still_serves(&server);
}

#[test]
fn floods_of_silent_connections_are_capped_and_timed_out() {
    let server = Daemon::builder(2)
        .arg("--handshake-timeout")
        .arg("2")
        .arg("--serve-idle-timeout")
        .arg("2")
        .arg("--max-connections-per-ip")
        .arg("16")
        .arg("--max-connections")
        .arg("200")
        .start();
    let pid = server.pid();
    let fds_before = fd_count(pid);
    // One address floods both listeners: the per-address cap counts across
    // them. First connections that complete the handshake, then go quiet...
    let mut quiet = Vec::new();
    for _ in 0..20 {
        if let Some(Ok(s)) = connect_from("127.0.0.2", server.ports[1]).map(|s| tls::client(s, tls::Identity::shared()))
        {
            let mut c = RawConn { s };
            c.try_send(&Frame::Hello {
                magic: mftd_common::proto::MAGIC,
                version: mftd_common::proto::VERSION,
                flags: 0,
            });
            quiet.push(c);
        }
    }
    // ...then 1,000 that send nothing, to the other listener.
    let mut silent = Vec::new();
    for _ in 0..1000 {
        if let Some(s) = connect_from("127.0.0.2", server.ports[0]) {
            silent.push(s);
        }
    }
    // Polled, not slept: once the refusals are written, the cap's 16
    // connections are held, and no more (the quiet ones' idle timeout is
    // 2 s away).
    let mut now = 0;
    let settled = wait_until(Duration::from_millis(1500), || {
        now = fd_count(pid);
        (fds_before + 12..=fds_before + 16 + 4).contains(&now)
    });
    println!("fds before {fds_before}, after the flood {now}");
    assert!(settled, "descriptors not bounded by the per-address cap across listeners: {now}, {fds_before} before");
    // A normal download from 127.0.0.1 completes meanwhile.
    still_serves(&server);
    // The silent flood found the address's budget spent on the other
    // listener: told BUSY for the address, not for the listener's cap.
    let mut busy = 0;
    for s in silent.iter_mut().take(50) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = s.read(&mut buf) {
            if n > 5
                && Frame::decode(buf[0], &buf[5..n]).is_ok_and(
                    |f| matches!(f, Frame::Error(e) if e.code == ErrorCode::Busy && e.message.contains("your address")),
                )
            {
                busy += 1;
            }
        }
    }
    assert!(busy >= 45, "over-cap connections not refused with BUSY ({busy} of 50)");
    // The quiet ones are closed by the idle timeout: EOF or a reset, not a
    // read timeout.
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(8), || fd_count(pid) <= fds_before + 4),
        "connections not closed by the timeouts: {} fds",
        fd_count(pid)
    );
    println!("flood drained in {:?}", t.elapsed());
    let mut closed = 0;
    for c in quiet.iter_mut().take(16) {
        c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        // The HELLO answer, then the end once the idle timeout fired.
        let _ = c.s.read(&mut buf);
        match c.s.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => closed += 1,
            _ => {}
        }
    }
    assert!(closed >= 15, "quiet connections not closed: {closed}");
    still_serves(&server);
}

/// `mftctl status` run as uid/gid 65534 with no supplementary groups.
fn as_nobody(server: &Daemon) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(mftctl_bin())
        .arg("--socket")
        .arg(&server.socket)
        .arg("status")
        .output()
        .unwrap()
}

#[test]
fn control_socket_abuse_is_refused_and_daemon_keeps_serving() {
    let server = Daemon::start(1);
    // A 100 MiB line.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..100 {
        if s.write_all(&chunk).is_err() {
            break; // the daemon hung up after the limit, as it should
        }
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    assert!(line.contains("line_too_long"), "{line}");
    // Deeply nested JSON and unknown types.
    for bad in
        ["[".repeat(100_000), "{\"type\":\"rm_rf\"}".to_string(), "{\"type\":\"get\",\"remote_path\":{}}".to_string()]
    {
        let mut s = UnixStream::connect(&server.socket).unwrap();
        // 100 KB of brackets is over the 64 KiB request limit: mftd may
        // answer and close before reading it all.
        let _ = s.write_all(bad.as_bytes()).and_then(|_| s.write_all(b"\n"));
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"error\""), "{line}");
    }
    // Another uid: the socket mode stops it...
    let out = as_nobody(&server);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));
    // ...and if the mode were opened up, the peer-credential check would.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&server.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&server);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));
    assert!(server.ctl(&["status"]).status.success());
    still_serves(&server);
}

#[test]
fn shared_secret_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "correct-horse-battery-staple-7d1f";
    let good = dir.path().join("secret");
    std::fs::write(&good, format!("{secret}\n")).unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&good, &wrong] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let server = Daemon::builder(2).arg("--auth-secret-file").arg(good.to_str().unwrap()).start();
    write_file(&server.export.join("a"), 2 * MIB, 61);
    // Right secret: works.
    let client = Daemon::builder(0).arg("--auth-secret-file").arg(good.to_str().unwrap()).start();
    let out = client.get("a", &server.sources().join(","), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("a")), sha256_file(&server.export.join("a")));
    // Missing secret: refused with a message that says what to do.
    let anon = Daemon::start(0);
    let out = anon.get("a", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("requires authentication"), "{}", stdout(&out));
    // Wrong secret: refused.
    let out = anon.get("a", &server.sources()[0], &["--secret-file", wrong.to_str().unwrap(), "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("authentication failed"), "{}", stdout(&out));
    // Raw: a client that skips AUTH gets AUTH_FAILED.
    let mut c = RawConn::connect(server.ports[0]);
    c.send(&Frame::Hello { magic: mftd_common::proto::MAGIC, version: mftd_common::proto::VERSION, flags: 0 });
    c.send(&Frame::Stat { path: "a".into() });
    assert!(matches!(c.recv(), Some(Frame::Error(e)) if e.code == ErrorCode::AuthFailed));
    // The secret is never on a command line or in a log.
    for pid in [server.pid(), client.pid()] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!contains(&cmdline, secret.as_bytes()), "secret in argv of {pid}");
    }
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!contains(&ps.stdout, secret.as_bytes()), "secret visible in ps");
    for log in [server.log(), client.log(), anon.log()] {
        assert!(!log.contains(secret), "secret in a log");
    }
    // The next valid download still works.
    let out = client.get("a", &server.sources().join(","), &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn allow_list_refuses_other_addresses() {
    let server = Daemon::builder(1).arg("--allow").arg("127.0.0.1/32").start();
    let mut s = connect_from("127.0.0.9", server.ports[0]).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    let f = Frame::decode(buf[0], &buf[5..n]).unwrap();
    assert!(matches!(f, Frame::Error(ref e) if e.code == ErrorCode::NotAllowed), "{f:?}");
    still_serves(&server);
}

#[test]
fn accept_errors_back_off_and_the_listener_survives() {
    // Few descriptors: a small flood makes accept() fail with EMFILE.
    let server =
        Daemon::builder(1).arg("--max-connections-per-ip").arg("1000").arg("--handshake-timeout").arg("2").start();
    let pid = server.pid().to_string();
    let out = Command::new("prlimit").args(["--pid", &pid, "--nofile=48:"]).output().expect("prlimit");
    assert!(out.status.success(), "{}", stderr(&out));
    let mut flood = Vec::new();
    for _ in 0..120 {
        if let Some(s) = connect_from("127.0.0.4", server.ports[0]) {
            flood.push(s);
        }
    }
    assert!(
        wait_until(Duration::from_secs(5), || server.log().contains("accept failed")),
        "accept never failed; the test did not exercise EMFILE:\n{}",
        server.log()
    );
    drop(flood);
    // Once the flood is gone (closed by us and by the handshake timeout),
    // the same listener serves again.
    let out = Command::new("prlimit").args(["--pid", &pid, "--nofile=1024:"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    still_serves(&server);
}

/// Connects with a 4 KiB receive buffer, asks `server` for its whole `big`
/// file and then takes 4 KiB every 250 ms (16 KiB/s): a trickle that
/// reopens the TCP window often enough that the stall limit never fires.
/// Returns how long the server kept the connection, at most `limit`.
fn trickle(server: &Daemon, limit: Duration) -> Duration {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&fd, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    let addr = SockaddrIn::new(127, 0, 0, 1, server.ports[0]);
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).expect("connect");
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut c = RawConn { s: tls::client(s, tls::Identity::shared()).expect("TLS handshake") };
    c.send(&Frame::Hello { magic: mftd_common::proto::MAGIC, version: mftd_common::proto::VERSION, flags: 0 });
    let Some(Frame::Hello { .. }) = c.recv() else { panic!("handshake failed") };
    c.send(&Frame::Stat { path: "big".into() });
    let Some(Frame::StatOk(st)) = c.recv() else { panic!("no STAT_OK") };
    c.send(&Frame::Read(ReadReq {
        id: 1,
        offset: 0,
        len: st.size,
        size: st.size,
        mtime_ns: st.mtime_ns,
        path: "big".into(),
    }));
    let asked = Instant::now();
    let mut buf = [0u8; 4096];
    while asked.elapsed() < limit {
        match c.s.read(&mut buf) {
            Ok(0) | Err(_) => return asked.elapsed(),
            Ok(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    limit
}

/// A peer that takes its data at a trickle (16 KiB/s, below the configured
/// 1 MiB/s minimum) is closed by the minimum-rate rule after 10 s of the
/// server waiting on it, and the log names the rule. With the rule off the
/// same trickle keeps its connection: the stall limit (30 s here) does not
/// catch it, so nothing else closed it.
#[test]
fn a_peer_that_reads_a_trickle_is_closed_at_the_minimum_rate() {
    let big = |server: &Daemon| {
        let path = server.export.join("big");
        write_file(&path, 1 << 20, 6);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(256 << 20).unwrap();
    };
    let judged = Daemon::builder(1).arg("--serve-min-rate").arg("1M").start();
    let unjudged = Daemon::builder(1).arg("--serve-min-rate").arg("0").start();
    big(&judged);
    big(&unjudged);
    let (kept_on, kept_off) = std::thread::scope(|s| {
        let on = s.spawn(|| trickle(&judged, Duration::from_secs(30)));
        let off = s.spawn(|| trickle(&unjudged, Duration::from_secs(16)));
        (on.join().unwrap(), off.join().unwrap())
    });
    assert!(
        kept_on >= Duration::from_secs(9) && kept_on < Duration::from_secs(25),
        "slow reader closed after {kept_on:?}, not after about 10 s of waiting\n{}",
        judged.log()
    );
    assert!(judged.log().contains("below serve_min_rate"), "closed, but not by the minimum rate:\n{}", judged.log());
    assert!(kept_off >= Duration::from_secs(16), "with serve_min_rate 0 the trickle was closed after {kept_off:?}");
    still_serves(&judged);
}

/// A peer that asks for a large range and then stops reading gives its
/// connection slot and open file back after half the serve idle timeout,
/// not after the 30 s a small frame may take.
#[test]
fn a_peer_that_stops_reading_gives_its_slot_back() {
    // A stall limit of 4 s (half the idle timeout): room for a loaded
    // machine to run `servers list` before it.
    let server = Daemon::builder(1).arg("--serve-idle-timeout").arg("8").start();
    let path = server.export.join("big");
    write_file(&path, 1 << 20, 5);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(256 << 20).unwrap();
    let mut c = RawConn::hello(server.ports[0]);
    c.send(&Frame::Stat { path: "big".into() });
    let Some(Frame::StatOk(st)) = c.recv() else { panic!("no STAT_OK") };
    c.send(&Frame::Read(mftd_common::proto::ReadReq {
        id: 1,
        offset: 0,
        len: st.size,
        size: st.size,
        mtime_ns: st.mtime_ns,
        path: "big".into(),
    }));
    // Not a byte read from here on.
    let asked = Instant::now();
    let open = || server.servers()[0].connections;
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(open(), 1, "closed before the stall limit");
    assert!(wait_until(Duration::from_secs(16), || open() == 0), "a peer that reads nothing kept its slot");
    let took = asked.elapsed();
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(16), "closed after {took:?}");
    drop(c);
    still_serves(&server);
}
