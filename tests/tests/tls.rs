//! TLS between daemons, tried from the attacker's seat: node IDs pinned,
//! known or allowed; proofs of the shared secret that a man in the middle
//! cannot carry across; a flipped byte on the wire is a transport error,
//! not a bad piece; plain TCP only where a listener or source asks for it.

use std::process::Command;
use std::time::Duration;

use mftd_common::control::DownloadState;
use mftd_common::proto::{ErrorCode, Frame, MAGIC, VERSION};
use mftd_tests::{
    mftd_bin, sha256_file, stderr, stdout, tls, write_file, Daemon, Lie, LyingServer, RawConn, Relay, RelayMode,
};

const MIB: u64 = 1 << 20;

/// A daemon's node ID, from `mftctl status`.
fn node_id(d: &Daemon) -> String {
    let id = d.status().node_id;
    assert_eq!(id.len(), 26, "{id}");
    id
}

/// What a failed `get` said, both streams.
fn said(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

fn same_file(client: &Daemon, server: &Daemon, name: &str) {
    assert_eq!(sha256_file(&client.downloads.join(name)), sha256_file(&server.export.join(name)));
}

/// Two ports free right now (for a config that names them).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    (a.local_addr().expect("addr").port(), b.local_addr().expect("addr").port())
}

#[test]
fn four_tls_sources_and_every_one_proves_its_node() {
    let server = Daemon::start(4);
    write_file(&server.export.join("a"), 24 * MIB + 7, 1);
    let id = node_id(&server);
    let listeners = server.servers();
    assert!(listeners.iter().all(|l| l.transport == "tls"), "{listeners:?}");
    let client = Daemon::start(0);
    let dl = client.get_detached("a", &server.sources(), &[]);
    let info = client.wait_download(dl, Duration::from_secs(60));
    assert_eq!(info.state, DownloadState::Done, "{info:?}");
    same_file(&client, &server, "a");
    for s in &info.sources {
        assert_eq!(s.transport.as_deref(), Some("tls"), "{s:?}");
        assert_eq!(s.node_id.as_deref(), Some(id.as_str()), "{s:?}");
    }
    // `mftd --print-node-id` shows the same ID from the same state.
    let out = Command::new(mftd_bin())
        .args(["--print-node-id", "--state-dir"])
        .arg(server.export.parent().expect("dir").join("state"))
        .env("MFTD_CONFIG", "/dev/null")
        .output()
        .expect("mftd");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id, "{}", stderr(&out));
}

#[test]
fn a_pinned_node_id_is_required_and_a_wrong_one_named() {
    let server = Daemon::start(1);
    write_file(&server.export.join("a"), 3 * MIB, 2);
    let (id, port) = (node_id(&server), server.ports[0]);
    let client = Daemon::start(0);
    let out = client.get("a", &format!("127.0.0.1:{port}#{id}"), &[]);
    assert!(out.status.success(), "{}", said(&out));
    same_file(&client, &server, "a");
    // Pinned to another node (the client's own ID): refused, both named.
    let other = node_id(&client);
    let out = client.get("a", &format!("127.0.0.1:{port}#{other}"), &["--force"]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let text = said(&out);
    assert!(text.contains(&id) && text.contains(&other) && text.contains("pinned"), "{text}");
}

#[test]
fn trust_on_first_use_records_then_refuses_a_changed_node() {
    let mut first = Daemon::start(1);
    let port = first.ports[0];
    write_file(&first.export.join("a"), MIB, 3);
    let old = node_id(&first);
    let client = Daemon::builder(0).arg("--node-trust").arg("tofu").start();
    let out = client.get("a", &format!("127.0.0.1:{port}"), &[]);
    assert!(out.status.success(), "{}", said(&out));
    let known = std::fs::read_to_string(client.downloads.parent().expect("dir").join("state/known_nodes"))
        .expect("known_nodes written");
    assert!(known.contains(&format!("127.0.0.1:{port} {old}")), "{known}");
    // Another node (new identity) on the same address.
    first.terminate(Duration::from_secs(10)).expect("server exits");
    let second = Daemon::builder(0).arg("--ports").arg(port.to_string()).start();
    write_file(&second.export.join("a"), MIB, 3);
    let new = node_id(&second);
    assert_ne!(old, new);
    let out = client.get("a", &format!("127.0.0.1:{port}"), &["--force"]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let text = said(&out);
    assert!(text.contains(&old) && text.contains(&new), "{text}");
}

#[test]
fn allow_nodes_refuses_a_client_not_on_it() {
    let friend = Daemon::start(0);
    let stranger = Daemon::start(0);
    let server = Daemon::builder(1).arg("--allow-nodes").arg(node_id(&friend)).start();
    write_file(&server.export.join("a"), 2 * MIB, 4);
    let out = friend.get("a", &server.sources()[0], &[]);
    assert!(out.status.success(), "{}", said(&out));
    same_file(&friend, &server, "a");
    let out = stranger.get("a", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let text = said(&out);
    assert!(text.contains("allow_nodes") && text.contains(&node_id(&stranger)), "{text}");
    assert!(!stranger.downloads.join("a").exists());
    // A raw client with an identity of its own is refused the same way.
    let mut c = RawConn::connect(server.ports[0]);
    c.send(&Frame::Hello { magic: MAGIC, version: VERSION, flags: 0 });
    match c.recv() {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::NotAllowed);
            assert!(e.message.contains(&tls::Identity::shared().node_id()), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

/// A man in the middle that terminates TLS on both sides cannot complete a
/// secret-authenticated session: the proofs are bound to each TLS channel.
/// Without a secret the same relay works (so it really relays), and a pin
/// catches it; a transparent byte relay keeps working with the secret.
#[test]
fn a_man_in_the_middle_cannot_carry_a_secret_across() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "correct horse battery staple\n").expect("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let s = secret.to_str().expect("utf-8");
    let server = Daemon::builder(1).arg("--auth-secret-file").arg(s).start();
    write_file(&server.export.join("a"), 2 * MIB, 5);
    let client = Daemon::builder(0).arg("--auth-secret-file").arg(s).start();

    let mitm = Relay::start(server.ports[0], RelayMode::Mitm);
    let out = client.get("a", &mitm.source(), &[]);
    assert_eq!(out.status.code(), Some(1), "the man in the middle got through: {}", said(&out));
    let text = said(&out);
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!client.downloads.join("a").exists());

    // The transparent relay: the TLS session is end to end, proofs hold.
    let relay = Relay::start(server.ports[0], RelayMode::Transparent);
    let out = client.get("a", &relay.source(), &[]);
    assert!(out.status.success(), "{}", said(&out));
    same_file(&client, &server, "a");

    // Without a secret the man in the middle relays fine...
    let open_server = Daemon::start(1);
    write_file(&open_server.export.join("b"), 2 * MIB, 6);
    let anon = Daemon::start(0);
    let mitm2 = Relay::start(open_server.ports[0], RelayMode::Mitm);
    let out = anon.get("b", &mitm2.source(), &[]);
    assert!(out.status.success(), "the test relay does not relay: {}", said(&out));
    same_file(&anon, &open_server, "b");
    // ...and pinning the real node catches it, naming both IDs.
    let real = node_id(&open_server);
    let out = anon.get("b", &format!("{}#{real}", mitm2.source()), &["--force"]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let text = said(&out);
    assert!(text.contains(&real) && text.contains(&tls::Identity::shared().node_id()), "{text}");
}

/// A server that cannot prove the shared secret is refused, however it
/// answers: this one sends the client's own proof back as its own (proofs
/// are labelled with the sender's role, so a reflection proves nothing) and
/// would then serve the real file.
#[test]
fn a_server_that_forges_its_proof_of_the_secret_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "correct horse battery staple\n").expect("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let upstream = Daemon::start(1);
    write_file(&upstream.export.join("a"), 2 * MIB, 9);
    let liar = LyingServer::start(upstream.ports[0], Lie::ForgedAuth);
    let source = format!("127.0.0.1:{}", liar.port);
    let client = Daemon::builder(0).arg("--auth-secret-file").arg(secret.to_str().expect("utf-8")).start();
    let out = client.get("a", &source, &[]);
    assert_eq!(out.status.code(), Some(1), "a forged proof was accepted: {}", said(&out));
    let text = said(&out);
    assert!(text.contains("did not prove the shared secret"), "{text}");
    assert!(!client.downloads.join("a").exists());
    let dl = client.downloads_list().pop().expect("the download");
    let why = mftd_tests::source_error(mftd_tests::source(&dl, &source));
    assert!(why.contains("did not prove the shared secret"), "{why}");
}

/// One flipped bit of ciphertext breaks the TLS record: the connection
/// fails as a transport error (no strike against a piece), and the
/// download completes, verified.
#[test]
fn a_flipped_byte_on_the_wire_is_a_transport_error_not_a_bad_piece() {
    let server = Daemon::start(2);
    write_file(&server.export.join("a"), 16 * MIB, 7);
    let flip = Relay::start(server.ports[0], RelayMode::FlipServerByte { at: 300_000 });
    let client = Daemon::start(0);
    let dl = client.get_detached("a", &[flip.source(), server.sources()[1].clone()], &[]);
    let info = client.wait_download(dl, Duration::from_secs(60));
    assert_eq!(info.state, DownloadState::Done, "{info:?}");
    same_file(&client, &server, "a");
    for s in &info.sources {
        assert_eq!(s.strikes, 0, "a wire error counted against pieces: {s:?}");
    }
    let relayed = info.sources.iter().find(|s| s.address == flip.source());
    let why = mftd_tests::source_error(relayed.expect("relayed source"));
    assert!(why.contains("decrypt"), "the flipped byte never surfaced as a TLS error: {info:?}");
}

#[test]
fn plain_and_tls_listeners_side_by_side() {
    let (t, p) = free_ports();
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("mftd.toml");
    std::fs::write(&cfg, format!("[listener.{p}]\ntransport = \"plain\"\n")).expect("config");
    let server = Daemon::builder(0)
        .arg("--ports")
        .arg(format!("{t},{p}"))
        .env("MFTD_CONFIG", cfg.to_str().expect("utf-8"))
        .start();
    write_file(&server.export.join("a"), 8 * MIB, 8);
    let by_port = |port: u16| server.listener(port);
    assert_eq!(by_port(t).transport, "tls");
    assert_eq!(by_port(p).transport, "plain");
    let list = server.ctl(&["servers", "list"]);
    assert!(stdout(&list).contains("unencrypted"), "{}", stdout(&list));
    // `servers add --plain` opens another plain listener; the default is TLS.
    for (flag, want) in [(Some("--plain"), "plain"), (None, "tls")] {
        let mut args = vec!["servers", "add"];
        args.extend(flag);
        let out = server.ctl(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let port: u16 = stdout(&out)
            .split_whitespace()
            .nth(2)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no port in {:?}", stdout(&out)));
        assert_eq!(by_port(port).transport, want);
    }

    let client = Daemon::start(0);
    let plain = format!("plain://127.0.0.1:{p}");
    let dl = client.get_detached("a", &[format!("127.0.0.1:{t}"), plain.clone()], &[]);
    let info = client.wait_download(dl, Duration::from_secs(60));
    assert_eq!(info.state, DownloadState::Done, "{info:?}");
    same_file(&client, &server, "a");
    let transport = |addr: &str| info.sources.iter().find(|s| s.address == addr).expect("source").transport.clone();
    assert_eq!(transport(&format!("127.0.0.1:{t}")).as_deref(), Some("tls"));
    assert_eq!(transport(&plain).as_deref(), Some("plain"));

    // A plaintext HELLO to the TLS listener is told what is wrong.
    let mut c = RawConn::connect_plain(t);
    c.send(&Frame::Hello { magic: MAGIC, version: VERSION, flags: 0 });
    match c.recv() {
        Some(Frame::Error(e)) => assert!(e.message.contains("speaks TLS"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    // And TLS to the plain listener fails with a message that says so.
    // (Refusals before TLS are unauthenticated, so they are only retried.)
    let out = client.get("a", &format!("127.0.0.1:{p}"), &["--force", "--give-up-after", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("plain://") && said(&out).contains("unauthenticated"), "{}", said(&out));

    // On the wire: file bytes are readable through a relay in front of the
    // plain listener, and nowhere in front of the TLS one.
    let bytes = std::fs::read(server.export.join("a")).expect("read");
    let probe = &bytes[4 * MIB as usize..4 * MIB as usize + 64];
    let seen = |relay: &Relay| {
        let s = relay.seen.lock().expect("lock");
        assert!(s.len() as u64 >= 8 * MIB, "the relay carried only {} bytes", s.len());
        s.windows(probe.len()).any(|w| w == probe)
    };
    let via_plain = Relay::start(p, RelayMode::Transparent);
    let out = client.get("a", &format!("plain://{}", via_plain.source()), &["--force"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(seen(&via_plain), "plaintext bytes not found on a plain wire: the check cannot see anything");
    let via_tls = Relay::start(t, RelayMode::Transparent);
    let out = client.get("a", &via_tls.source(), &["--force"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(!seen(&via_tls), "file bytes in clear on a TLS wire");
}

#[test]
fn a_shared_secret_on_a_plain_listener_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").expect("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let out = Command::new(mftd_bin())
        .args(["--transport", "plain", "--ports", "0", "--auth-secret-file"])
        .arg(&secret)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--export")
        .arg(dir.path())
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .env("MFTD_CONFIG", "/dev/null")
        .output()
        .expect("mftd");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs TLS"), "{}", stderr(&out));
}
