//! systemd integration without booting systemd: the notify protocol on a
//! socket the test owns, SIGHUP reloads, and `make install`.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mftd_common::control::DownloadState;
use mftd_tests::{free_ports, mftd_bin, sha256_file, stderr, wait_until, write_file, Daemon};

const MIB: u64 = 1 << 20;

#[test]
fn ready_only_after_listeners_accept_then_status_and_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ports = free_ports(3);
    let ports_arg = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let mut child = Command::new(mftd_bin())
        .args(["--ports", &ports_arg, "--export"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("mftd.sock"))
        .env("MFTD_CONFIG", "/dev/null")
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut ready_at = None;
    let mut status = None;
    let mut watchdogs = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) && (ready_at.is_none() || watchdogs < 2 || status.is_none()) {
        let Ok(n) = sock.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        for line in msg.lines() {
            if line == "READY=1" && ready_at.is_none() {
                // The moment READY=1 arrives, every listener and the control
                // socket must already accept connections.
                for p in &ports {
                    assert!(
                        std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok(),
                        "listener {p} not accepting at READY=1"
                    );
                }
                assert!(
                    std::os::unix::net::UnixStream::connect(dir.path().join("mftd.sock")).is_ok(),
                    "control socket not ready at READY=1"
                );
                ready_at = Some(start.elapsed());
            }
            if let Some(s) = line.strip_prefix("STATUS=") {
                status = Some(s.to_string());
            }
            if line == "WATCHDOG=1" {
                watchdogs += 1;
            }
        }
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let st = child.wait().unwrap();
    println!("READY=1 after {ready_at:?}; STATUS={status:?}; {watchdogs} watchdog pings");
    assert!(ready_at.is_some(), "no READY=1");
    assert!(status.as_deref().is_some_and(|s| s.contains("3/3 listeners running")), "{status:?}");
    assert!(watchdogs >= 2, "watchdog pings: {watchdogs}");
    assert!(st.success());
    // STOPPING=1 on the way out.
    let mut got_stopping = false;
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            got_stopping = true;
        }
    }
    assert!(got_stopping, "no STOPPING=1 at shutdown");
}

#[test]
fn sighup_adds_removes_and_relimits_listeners_while_a_download_runs() {
    let ports = free_ports(3);
    let (a, b, c) = (ports[0], ports[1], ports[2]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mftd.toml");
    std::fs::write(&cfg, format!("ports = [{a}, {b}]\nrate_limit = \"4M\"\n")).unwrap();
    let server = Daemon::from_config(&cfg);
    let size = 24 * MIB;
    write_file(&server.export.join("h"), size, 41);
    let client = Daemon::start(0);
    let id = client.get_detached("h", &[format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}")], &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 2 * MIB));

    std::fs::write(&cfg, format!("ports = [{b}, {c}]\nrate_limit = \"4M\"\n[listener.{b}]\nrate_limit = \"8M\"\n"))
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = server.servers();
            let mut ports: Vec<u64> = s.iter().map(|x| u64::from(x.port)).collect();
            ports.sort();
            let mut want = vec![b as u64, c as u64];
            want.sort();
            ports == want
        }),
        "listener set after reload: {:?}\n{}",
        server.servers(),
        server.log()
    );
    let s = server.servers();
    assert_eq!(s.iter().find(|x| x.port == b).unwrap().rate_limit, 8 * MIB);
    assert_eq!(s.iter().find(|x| x.port == c).unwrap().rate_limit, 4 * MIB);
    assert!(std::net::TcpStream::connect(("127.0.0.1", a)).is_err(), "removed listener {a} still accepts");
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("h")), sha256_file(&server.export.join("h")));
    assert!(server.ctl(&["status"]).status.success(), "daemon survived the reload");
    // A broken config on reload keeps the running one.
    std::fs::write(&cfg, "ports = \"nonsense\"\n").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(wait_until(Duration::from_secs(5), || server.log().contains("reload failed")));
    assert_eq!(server.servers().len(), 2);
}

#[test]
fn make_install_into_destdir_produces_the_documented_tree() {
    let dest = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/usr")
        .arg("PROFILE=debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    let d = dest.path();
    for f in [
        "usr/bin/mftd",
        "usr/bin/mftctl",
        "usr/lib/systemd/system/mftd.service",
        "usr/lib/systemd/user/mftd.service",
        "usr/lib/sysusers.d/mftd.conf",
        "etc/mftd/mftd.toml",
        "usr/share/man/man8/mftd.8",
        "usr/share/man/man1/mftctl.1",
        "usr/share/man/man1/mftctl-get.1",
        "usr/share/bash-completion/completions/mftctl",
        "usr/share/zsh/site-functions/_mftctl",
        "usr/share/fish/vendor_completions.d/mftctl.fish",
    ] {
        assert!(d.join(f).exists(), "missing {f}");
    }
    let unit = std::fs::read_to_string(d.join("usr/lib/systemd/system/mftd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/mftd"), "{unit}");
    assert!(unit.contains("Type=notify"));
    // The installed default config is valid and all comments.
    let out = Command::new(d.join("usr/bin/mftd"))
        .arg("--config")
        .arg(d.join("etc/mftd/mftd.toml"))
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // An existing config survives a re-install; uninstall removes the rest.
    std::fs::write(d.join("etc/mftd/mftd.toml"), "rate_limit = \"1M\"\n").unwrap();
    let again = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("install")
        .arg(format!("DESTDIR={}", d.display()))
        .arg("PREFIX=/usr")
        .arg("PROFILE=debug")
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(d.join("etc/mftd/mftd.toml")).unwrap(), "rate_limit = \"1M\"\n");
    let un = Command::new("make")
        .arg("-C")
        .arg(repo)
        .arg("uninstall")
        .arg(format!("DESTDIR={}", d.display()))
        .arg("PREFIX=/usr")
        .output()
        .unwrap();
    assert!(un.status.success());
    assert!(!d.join("usr/bin/mftd").exists() && !d.join("usr/lib/systemd/system/mftd.service").exists());
}

/// `systemctl reload` (SIGHUP) applies the allow list, the shared secret and
/// the handshake timeout, closes open connections the new allow list
/// forbids, and keeps the old secret (saying so) when the new one cannot be
/// read.
#[test]
fn sighup_applies_allow_list_secret_and_timeouts() {
    use mftd_common::proto::{ErrorCode, Frame, MAGIC, VERSION};
    use mftd_tests::RawConn;
    let port = free_ports(1)[0];
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mftd.toml");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "reloaded-secret-42").unwrap();
    std::fs::write(&cfg, format!("ports = [{port}]\n")).unwrap();
    let server = Daemon::from_config(&cfg);

    // An open connection from 127.0.0.1, then an allow list without it.
    let mut open = RawConn::hello(port);
    std::fs::write(&cfg, format!("ports = [{port}]\nallow = [\"10.0.0.0/8\"]\n")).unwrap();
    let t = Instant::now();
    server.reload();
    // Closed (EOF), not merely silent until the 10 s read timeout.
    assert!(open.recv().is_none(), "a connection the new allow list forbids stayed open");
    assert!(t.elapsed() < Duration::from_secs(5), "closed only after {:?}", t.elapsed());
    // Refused in plaintext, before any TLS.
    let mut c = RawConn::connect_plain(port);
    match c.recv() {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::NotAllowed),
        other => panic!("{other:?}"),
    }

    // A shared secret: new connections must prove it.
    std::fs::write(&cfg, format!("ports = [{port}]\nauth_secret_file = {:?}\n", secret.display().to_string())).unwrap();
    server.reload();
    let challenged = |port| {
        let mut c = RawConn::connect(port);
        c.send(&Frame::Hello { magic: MAGIC, version: VERSION, flags: 0 });
        matches!(c.recv(), Some(Frame::Error(e)) if e.code == ErrorCode::AuthFailed)
    };
    assert!(challenged(port), "a client without the secret was let in after the secret was configured");

    // A secret file that cannot be read: the old secret stays, with a reason.
    let missing = dir.path().join("missing");
    std::fs::write(&cfg, format!("ports = [{port}]\nauth_secret_file = {:?}\n", missing.display().to_string()))
        .unwrap();
    server.reload();
    assert!(server.log().contains("keeping the previous secret"), "{}", server.log());
    assert!(challenged(port), "the previous secret was dropped");

    // A shorter handshake timeout: a silent connection is cut after it
    // (at least the configured 1 s, well before the default 10 s).
    std::fs::write(&cfg, format!("ports = [{port}]\nhandshake_timeout = 1\n")).unwrap();
    server.reload();
    let mut silent = RawConn::connect(port);
    let t = Instant::now();
    let got = silent.recv();
    let waited = t.elapsed();
    assert!(matches!(got, Some(Frame::Error(ref e)) if e.code == ErrorCode::BadHandshake), "{got:?}");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "cut after {waited:?}");
}
