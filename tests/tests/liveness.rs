//! A download keeps going on whatever sources are left (issue 20): dead,
//! mistyped, unresolvable and silent sources cost at most the election
//! deadline, never the download, and the vote stays safe among the sources
//! that answered.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadInfo, DownloadState, SourceState};
use mftd_tests::{dead_port, identity_of, sha256_file, source, stderr, stdout, wait_until, warm, write_file, Daemon};

const MIB: u64 = 1 << 20;

/// The engine's election deadline (`ELECTION_DEADLINE`, the connect
/// timeout): sources silent this long are no longer waited for.
const DEADLINE: Duration = Duration::from_secs(5);

/// A host name no resolver can answer, rejected by the C library itself
/// (a 64-character label is longer than DNS allows), so looking it up
/// sends no packet anywhere.
fn unresolvable() -> String {
    format!("{}.invalid:5001", "a".repeat(64))
}

/// A black hole: a loopback port whose kernel accepts connections that
/// nobody ever reads or answers. Held open for the test's lifetime.
fn black_hole() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("127.0.0.1:{}", l.local_addr().expect("local addr").port());
    (l, addr)
}

fn get_timed(client: &Daemon, name: &str, from: &[String], limit: Duration) -> (std::process::Output, Duration) {
    let out_dir = client.downloads.to_str().expect("utf-8").to_string();
    let from = from.join(",");
    let started = Instant::now();
    let out = client.ctl_within(limit, &["get", name, "--from", &from, "-o", &out_dir]);
    (out, started.elapsed())
}

#[test]
fn two_sources_one_never_started_the_other_serves_the_file() {
    let server = Daemon::start(1);
    write_file(&server.export.join("f.bin"), 6 * MIB, 201);
    let client = Daemon::start(0);
    let dead = dead_port();
    let sources = vec![server.sources()[0].clone(), dead.clone()];
    let (out, took) = get_timed(&client, "f.bin", &sources, Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("f.bin")), sha256_file(&server.export.join("f.bin")));
    // The refused source is waited for until the election deadline (a
    // server restarting gets its vote), and no longer.
    assert!(took >= DEADLINE - Duration::from_millis(300), "took {took:?}: the refused source was not waited for");
    assert!(took < DEADLINE + Duration::from_secs(5), "took {took:?}: more than the deadline plus a few round trips");
    let d = client.download(1);
    let version = d.version.as_deref().expect("how the version was decided");
    assert!(version.starts_with("version from 1 of 2 sources"), "{version}");
    assert!(version.contains(&format!("{dead} unreachable (connection refused)")), "{version}");
    // The live display said so too.
    assert!(stdout(&out).contains("version from 1 of 2 sources"), "{}", stdout(&out));
    assert_eq!(source(&d, &server.sources()[0]).bytes, 6 * MIB, "{d:?}");
}

#[test]
fn four_sources_two_dead_refused_unresolvable_and_a_black_hole() {
    let server = Daemon::start(2);
    write_file(&server.export.join("g.bin"), 8 * MIB, 202);
    let client = Daemon::start(0);
    let (_hole, hole) = black_hole();
    let dead = dead_port();
    let nowhere = unresolvable();
    // Two of four answer: no strict majority of four, but of those heard.
    let mut sources = server.sources();
    sources.extend([dead.clone(), nowhere.clone()]);
    let (out, _) = get_timed(&client, "g.bin", &sources, Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("g.bin")), sha256_file(&server.export.join("g.bin")));
    let v = client.download(1).version.expect("version note");
    assert!(v.starts_with("version from 2 of 4 sources"), "{v}");
    assert!(v.contains(&format!("{nowhere} unreachable (cannot resolve")), "{v}");

    // One honest source and a black hole that accepts and never answers:
    // the start waits for the election deadline, and no longer.
    write_file(&server.export.join("h.bin"), 2 * MIB, 203);
    let sources = vec![server.sources()[0].clone(), hole.clone()];
    let (out, took) = get_timed(&client, "h.bin", &sources, Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("h.bin")), sha256_file(&server.export.join("h.bin")));
    assert!(
        took >= DEADLINE - Duration::from_millis(300),
        "took {took:?}: the vote did not wait for the silent source"
    );
    assert!(took < DEADLINE + Duration::from_secs(5), "took {took:?}: more than the deadline plus a few round trips");
    let d = client.download(2);
    let v = d.version.as_deref().expect("version note");
    assert!(v.starts_with("version from 1 of 2 sources") && v.contains(&hole), "{v}");
    assert_ne!(source(&d, &hole).state, SourceState::Active, "{d:?}");
}

#[test]
fn nothing_answered_yet_says_so_per_source_and_what_to_do() {
    let client = Daemon::start(0);
    let (_hole, hole) = black_hole();
    let dead = dead_port();
    let id = client.get_detached("w.bin", &[dead.clone(), hole.clone()], &[]);
    let said = wait_until(Duration::from_secs(15), || {
        let d = client.download(id);
        d.waiting.is_some() && source(&d, &dead).last_error.is_some()
    });
    let d = client.download(id);
    assert!(said, "{d:?}");
    let w = d.waiting.as_deref().expect("waiting");
    assert!(w.contains("no source has answered yet"), "{w}");
    assert!(w.contains(&format!("mftctl downloads add-source {id} HOST:PORT")), "{w}");
    // `downloads show` prints one line per source with its last answer.
    let out = client.ctl(&["downloads", "show", &id.to_string()]);
    let text = stdout(&out);
    assert!(text.contains("no source has answered yet"), "{text}");
    assert!(text.contains(&format!("  {dead}: connection refused")), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with(&format!("{hole}: "))), "{text}");
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());
}

/// The mistyped port is rescued by repeating the get with the right one,
/// and the added source stays through pause, resume and a restart.
#[test]
fn a_mistyped_source_is_rescued_and_the_added_source_persists() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("m.bin"), 24 * MIB, 204);
    warm(&server, "m.bin");
    let mut client = Daemon::start(0);
    let typo = dead_port();
    let right = server.sources()[0].clone();
    let id = client.get_detached("m.bin", std::slice::from_ref(&typo), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).waiting.is_some()));
    // The same get with the right port (detached): added, and data flows.
    let out_dir = client.downloads.to_str().expect("utf-8").to_string();
    let out = client.ctl(&["get", "m.bin", "--from", &right, "-o", &out_dir, "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let flowing = wait_until(Duration::from_secs(DEADLINE.as_secs() + 5), || client.download(id).bytes_done > MIB);
    assert!(flowing, "the added source did not join: {:?}\n{}", client.download(id), client.log());
    // Pause and resume: the added source is still there and serving.
    assert!(client.ctl(&["downloads", "pause", &id.to_string()]).status.success());
    assert!(wait_until(Duration::from_secs(10), || client.download(id).state == DownloadState::Paused));
    let addrs = |d: &DownloadInfo| d.sources.iter().map(|s| s.address.clone()).collect::<Vec<_>>();
    assert_eq!(addrs(&client.download(id)), [typo.clone(), right.clone()]);
    assert!(client.ctl(&["downloads", "resume", &id.to_string()]).status.success());
    let before = client.download(id).bytes_done;
    assert!(wait_until(Duration::from_secs(15), || client.download(id).bytes_done > before + MIB));
    // A restart (SIGTERM, then a new daemon on the same state): still both.
    assert!(client.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
    client.spawn_again(&[]);
    assert_eq!(addrs(&client.download(id)), [typo.clone(), right.clone()]);
    let out = client.ctl_within(Duration::from_secs(60), &["get", "--resume", &id.to_string()]);
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("m.bin")), sha256_file(&server.export.join("m.bin")));

    // The same through add-source, on a download waiting for its typo. A
    // second typo added while nothing answers survives pause and resume
    // too (before any run had chosen the file, it was dropped).
    write_file(&server.export.join("n.bin"), 4 * MIB, 205);
    let id = client.get_detached("n.bin", std::slice::from_ref(&typo), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).waiting.is_some()));
    let typo2 = dead_port();
    assert!(client.ctl(&["downloads", "add-source", &id.to_string(), &typo2]).status.success());
    assert!(client.ctl(&["downloads", "pause", &id.to_string()]).status.success());
    assert!(client.ctl(&["downloads", "resume", &id.to_string()]).status.success());
    assert_eq!(addrs(&client.download(id)), [typo.clone(), typo2.clone()]);
    let out = client.ctl(&["downloads", "add-source", &id.to_string(), &right]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("n.bin")), sha256_file(&server.export.join("n.bin")));
}

/// A file that takes as long to hash as any other but costs nothing to
/// write: sparse, with some data at the front.
fn sparse_file(path: &std::path::Path, size: u64) {
    write_file(path, MIB, 77);
    std::fs::OpenOptions::new().write(true).open(path).expect("open").set_len(size).expect("set_len");
}

/// The majority rule end to end, with a single fast liar of the same size
/// (one that has hashed its version ahead and answers with a root at once)
/// against two honest sources still hashing: the liar never wins.
#[test]
fn a_single_fast_same_size_liar_loses_to_two_honest_sources_still_hashing() {
    let size = 256 * MIB;
    let honest = Daemon::builder(2).arg("--hash-threads").arg("1").start();
    sparse_file(&honest.export.join("s.bin"), size);
    let liar = Daemon::builder(1).start();
    write_file(&liar.export.join("s.bin"), size, 206);
    warm(&liar, "s.bin");
    let client = Daemon::start(0);
    let mut sources = vec![liar.sources()[0].clone()];
    sources.extend(honest.sources());
    let (out, _) = get_timed(&client, "s.bin", &sources, Duration::from_secs(120));
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("s.bin")), sha256_file(&honest.export.join("s.bin")));
    let d = client.download(1);
    assert_eq!(d.identity, Some(identity_of(&honest.export.join("s.bin"))), "{d:?}");
    let s = source(&d, &liar.sources()[0]);
    assert_eq!(s.state, SourceState::Excluded, "{s:?}");
    assert!(d.version.as_deref().is_some_and(|v| v.starts_with("version from 2 of 3 sources")), "{d:?}");
}

/// A source that announces the right identity, sends the right bytes one
/// every 250 ms and never answers TRIM costs at most 1.5 times what the
/// honest sources alone need: its ranges are taken from it without waiting
/// for an answer that never comes.
#[test]
fn a_trickling_source_that_ignores_trim_cannot_hold_the_download() {
    let honest = Daemon::builder(2).arg("--rate-limit").arg("4M").start();
    let size = 24 * MIB;
    write_file(&honest.export.join("t.bin"), size, 207);
    warm(&honest, "t.bin");
    // The trickler relays the file from a server of its own, so what it
    // reads does not eat into the honest listeners' caps.
    let upstream = Daemon::start(1);
    write_file(&upstream.export.join("t.bin"), size, 207);
    warm(&upstream, "t.bin");
    let trickler = mftd_tests::LyingServer::start(upstream.ports[0], mftd_tests::Lie::Trickle { every_ms: 250 });
    let trickle_addr = format!("127.0.0.1:{}", trickler.port);
    let client = Daemon::start(0);
    // The honest sources alone, measured in the same run: 24 MiB at 2 x 4 MiB/s.
    let (out, alone) = get_timed(&client, "t.bin", &honest.sources(), Duration::from_secs(60));
    assert!(out.status.success(), "{}\n{}", stderr(&out), client.log());
    std::fs::remove_file(client.downloads.join("t.bin")).expect("remove");
    let mut sources = honest.sources();
    sources.push(trickle_addr.clone());
    let (out, with) = get_timed(&client, "t.bin", &sources, Duration::from_secs(120));
    assert!(out.status.success(), "{}\n{}", stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("t.bin")), sha256_file(&honest.export.join("t.bin")));
    println!("honest sources alone {alone:?}, with the trickler {with:?}");
    // At least what the honest sources' caps allow (the caps hold), at
    // most 1.5 times what they alone took.
    assert!(with >= Duration::from_millis(2900), "{with:?}: faster than 8 MiB/s, the caps did not hold");
    assert!(with <= alone.mul_f64(1.5), "with the trickler {with:?}, honest sources alone {alone:?}");
    let d = client.download(2);
    let t = source(&d, &trickle_addr);
    assert!(t.bytes < MIB, "the trickler delivered {} bytes: {t:?}", t.bytes);
}

/// A source that announced its root but never answers HASHES cannot hold
/// up verification: after a short patience another source of the same
/// root is asked for the hash list.
#[test]
fn a_source_that_never_sends_its_hash_list_does_not_hold_verification() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&honest.export.join("v.bin"), size, 208);
    write_file(&upstream.export.join("v.bin"), size, 208);
    warm(&honest, "v.bin");
    warm(&upstream, "v.bin");
    let mute = mftd_tests::LyingServer::start_plain(upstream.ports[0], mftd_tests::Lie::NoHashes);
    let mute_addr = format!("plain://127.0.0.1:{}", mute.port);
    // The honest source is down at first: the mute one is asked for the
    // hash list, and sends every byte of the file.
    let port = honest.ports[0].to_string();
    assert!(honest.ctl(&["servers", "stop", &port]).status.success());
    let client = Daemon::start(0);
    let id = client.get_detached("v.bin", &[mute_addr.clone(), honest.sources()[0].clone()], &[]);
    assert!(
        wait_until(Duration::from_secs(15), || client.download(id).bytes_done == size),
        "{:?}",
        client.download(id)
    );
    let d = client.download(id);
    assert_eq!(d.pieces_verified, 0, "verified without a hash list: {d:?}");
    assert!(honest.ctl(&["servers", "start", &port]).status.success());
    let back = Instant::now();
    let d = client.wait_download(id, Duration::from_secs(20));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("v.bin")), sha256_file(&honest.export.join("v.bin")));
    println!("done {:?} after the honest source came back", back.elapsed());
    // It came from the mute source; the honest one sent only its list.
    assert_eq!(source(&d, &mute_addr).bytes, size, "{d:?}");
}

/// A source that sends one wrong byte at the start of each READ and hangs
/// up, so an honest source writes the rest of each piece: only the liar is
/// struck (and dropped at the third strike), with and without a pin.
#[test]
fn a_one_byte_liar_never_gets_the_honest_source_struck() {
    // Slow enough (4 s a run) that the liar reaches its third strike
    // before the honest source has sent everything.
    let honest = Daemon::builder(1).arg("--rate-limit").arg("3M").start();
    let upstream = Daemon::start(1);
    let size = 12 * MIB;
    write_file(&honest.export.join("l.bin"), size, 209);
    write_file(&upstream.export.join("l.bin"), size, 209);
    warm(&honest, "l.bin");
    warm(&upstream, "l.bin");
    // The pinned run meets the liar over TLS, the voting one over plain TCP.
    let tls_liar = mftd_tests::LyingServer::start(upstream.ports[0], mftd_tests::Lie::OneByte);
    let plain_liar = mftd_tests::LyingServer::start_plain(upstream.ports[0], mftd_tests::Lie::OneByte);
    let honest_addr = honest.sources()[0].clone();
    let root = identity_of(&honest.export.join("l.bin"));
    let client = Daemon::start(0);
    let runs = [
        (vec!["--identity", root.as_str()], format!("127.0.0.1:{}", tls_liar.port)),
        (vec![], format!("plain://127.0.0.1:{}", plain_liar.port)),
    ];
    for (i, (pin, liar_addr)) in runs.into_iter().enumerate() {
        let name = "l.bin";
        let _ = std::fs::remove_file(client.downloads.join(name));
        let id = client.get_detached(name, &[liar_addr.clone(), honest_addr.clone()], &pin);
        let d = client.wait_download(id, Duration::from_secs(60));
        assert_eq!(d.state, DownloadState::Done, "run {i}: {d:?}\n{}", client.log());
        assert_eq!(sha256_file(&client.downloads.join(name)), sha256_file(&honest.export.join(name)));
        let h = source(&d, &honest_addr);
        let l = source(&d, &liar_addr);
        println!("run {i}: honest {h:?}\nliar {l:?}");
        assert_eq!(h.strikes, 0, "run {i}: the honest source was struck: {h:?}");
        assert_eq!(l.strikes, 3, "run {i}: {l:?}");
        assert_eq!(l.state, SourceState::Failed, "run {i}: {l:?}");
        assert!(l.last_error.as_deref().is_some_and(|e| e.contains("failed verification")), "{l:?}");
        assert_eq!(h.bytes, size, "run {i}: every byte in the file is the honest source's: {d:?}");
        assert_eq!(l.bytes, 0, "run {i}: the liar's bytes all failed and are not credited: {l:?}");
    }
}

/// Safety with liveness: a liar that answered alone while the honest
/// sources were down had its version adopted (1 of 3); when both honest
/// sources come back and agree, they hold a majority against it, and the
/// download starts over with their version. The liar is excluded.
#[test]
fn late_sources_that_agree_overturn_a_version_adopted_from_one() {
    let size = 16 * MIB;
    let liar = Daemon::builder(1).arg("--rate-limit").arg("2M").start();
    write_file(&liar.export.join("o.bin"), size, 210);
    warm(&liar, "o.bin");
    let honest = Daemon::start(2);
    write_file(&honest.export.join("o.bin"), size, 211);
    warm(&honest, "o.bin");
    for p in &honest.ports {
        assert!(honest.ctl(&["servers", "stop", &p.to_string()]).status.success());
    }
    let client = Daemon::start(0);
    let mut sources = vec![liar.sources()[0].clone()];
    sources.extend(honest.sources());
    let id = client.get_detached("o.bin", &sources, &[]);
    let adopted = wait_until(Duration::from_secs(10), || client.download(id).identity.is_some());
    let d = client.download(id);
    assert!(adopted, "{d:?}");
    assert_eq!(d.identity, Some(identity_of(&liar.export.join("o.bin"))), "{d:?}");
    assert!(d.version.as_deref().is_some_and(|v| v.starts_with("version from 1 of 3 sources")), "{d:?}");
    for p in &honest.ports {
        assert!(honest.ctl(&["servers", "start", &p.to_string()]).status.success());
    }
    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d.state, DownloadState::Done, "{d:?}\n{}", client.log());
    assert_eq!(sha256_file(&client.downloads.join("o.bin")), sha256_file(&honest.export.join("o.bin")));
    assert_eq!(d.identity, Some(identity_of(&honest.export.join("o.bin"))), "{d:?}");
    assert_eq!(source(&d, &liar.sources()[0]).state, SourceState::Excluded, "{d:?}");
    assert!(client.log().contains("late sources out-voted the adopted version"), "{}", client.log());
}
