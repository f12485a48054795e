//! Hostile and broken sources played against the live election, the
//! per-author strikes and the deadlines of issue 20 (a reviewer's session).
//! Tests marked `#[ignore]` show a failure that is still there; each says
//! what breaks.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadState, SourceState};
use mftd_tests::{identity_of, sha256_file, source, wait_until, warm, write_file, Daemon, Lie, LyingServer};

const MIB: u64 = 1 << 20;

fn addr(l: &LyingServer) -> String {
    format!("127.0.0.1:{}", l.port)
}

/// A loopback port nothing listens on.
fn dead_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    format!("127.0.0.1:{port}")
}

/// An honest source and one that answered STAT "still hashing" and then
/// went down for good (a server of several going down, the seed's first
/// failure case). The vote on the identity counts the gone source as
/// undecided forever: every byte arrives, no piece is ever verified.
#[test]
#[ignore = "stalls: a source that answered STAT without a root and then went down holds the identity vote forever (vote.rs Votes::root counts it as undecided; engine.rs worker never calls Votes::gone on Retry)"]
fn a_source_that_answered_hashing_and_went_down_does_not_hold_the_download() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&honest.export.join("a.bin"), size, 301);
    write_file(&upstream.export.join("a.bin"), size, 301);
    warm(&honest, "a.bin");
    warm(&upstream, "a.bin");
    let hashing = LyingServer::start(upstream.ports[0], Lie::Hashing);
    let client = Daemon::start(0);
    let id = client.get_detached("a.bin", &[honest.sources()[0].clone(), addr(&hashing)], &[]);
    // Both answered (the hashing one has a connection, or sent bytes).
    let answered = wait_until(Duration::from_secs(10), || {
        let d = client.download(id);
        let h = source(&d, &addr(&hashing));
        h.connections > 0 || h.bytes_received > 0
    });
    assert!(answered, "{:?}", client.download(id));
    hashing.go_down();
    let went_down = Instant::now();
    let d = client.wait_download(id, Duration::from_secs(40));
    println!("ended {:?} after the hashing source went down: {d:?}", went_down.elapsed());
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("a.bin")), sha256_file(&honest.export.join("a.bin")));
}

/// The same, from a hostile source: it stays up, relays the right bytes,
/// says "hashing" on every STAT and never answers HASHES. One honest
/// source is there; the download never verifies a piece.
#[test]
#[ignore = "stalls: a source that says 'hashing' forever holds the identity vote of a two-source download forever (no deadline on a HASHES vote: vote.rs Votes::root, engine.rs should_ask_hashes/HASHES_TIMEOUT only reconnects)"]
fn a_source_that_is_hashing_forever_does_not_hold_the_download() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&honest.export.join("b.bin"), size, 302);
    write_file(&upstream.export.join("b.bin"), size, 302);
    warm(&honest, "b.bin");
    warm(&upstream, "b.bin");
    let hashing = LyingServer::start(upstream.ports[0], Lie::Hashing);
    let client = Daemon::start(0);
    let id = client.get_detached("b.bin", &[honest.sources()[0].clone(), addr(&hashing)], &[]);
    let all_in = wait_until(Duration::from_secs(20), || client.download(id).bytes_done == size);
    let d = client.download(id);
    println!("all bytes in: {all_in}; {d:?}");
    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
}

/// A liar's unverified bytes are kept across a pause (the manifest records
/// them as received), and on resume nobody knows whose they were: the
/// honest source that completes each of those pieces is their only author
/// in the new run, and is struck for the liar's bytes, then dropped.
#[test]
#[ignore = "honest source struck and dropped: bytes preloaded on resume carry no author (scheduler.rs Scheduler::preload; engine.rs suspect/settle blame the sole in-run author)"]
fn a_liars_bytes_kept_across_a_pause_never_get_the_honest_source_struck() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 16 * MIB;
    write_file(&honest.export.join("c.bin"), size, 303);
    write_file(&upstream.export.join("c.bin"), size, 303);
    warm(&honest, "c.bin");
    warm(&upstream, "c.bin");
    let root = identity_of(&honest.export.join("c.bin"));
    let liar = LyingServer::start(upstream.ports[0], Lie::OneByte);
    // The honest source is down at first: only the liar answers, and
    // leaves one wrong byte at the start of each range it is asked for.
    let port = honest.ports[0].to_string();
    assert!(honest.ctl(&["servers", "stop", &port]).status.success());
    let client = Daemon::start(0);
    let id = client.get_detached(
        "c.bin",
        &[addr(&liar), honest.sources()[0].clone()],
        &["--identity", &root, "--connections-per-server", "8"],
    );
    let some = wait_until(Duration::from_secs(20), || client.download(id).bytes_done >= 4);
    assert!(some, "{:?}", client.download(id));
    std::thread::sleep(Duration::from_secs(2));
    assert!(client.ctl(&["downloads", "pause", &id.to_string()]).status.success());
    assert!(wait_until(Duration::from_secs(10), || client.download(id).state == DownloadState::Paused));
    println!("paused with {:?}", client.download(id));
    // The liar goes away; the honest source comes back.
    liar.go_down();
    assert!(honest.ctl(&["servers", "start", &port]).status.success());
    assert!(client.ctl(&["downloads", "resume", &id.to_string()]).status.success());
    let honest_addr = honest.sources()[0].clone();
    let ended = wait_until(Duration::from_secs(60), || {
        let d = client.download(id);
        d.state.is_final() || source(&d, &honest_addr).strikes > 0
    });
    // Give a struck source time for its further strikes, to show the end.
    std::thread::sleep(Duration::from_secs(3));
    let d = client.download(id);
    let h = source(&d, &honest_addr);
    println!("ended {ended}; honest: {h:?}\n{d:?}");
    assert_eq!(h.strikes, 0, "the honest source was struck for the liar's bytes: {d:?}");
    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("c.bin")), sha256_file(&honest.export.join("c.bin")));
}

/// A source serving another version of the file answers at once; the
/// honest source is down for the first second (refused), so it is absent
/// and the other version is adopted alone. The honest source then answers
/// while the download is still running: one against one, a tie. The vote's
/// own rule is that a tie is never broken by who answered first, yet the
/// download completes with the version that answered first, and the
/// honest source is excluded.
#[test]
#[ignore = "safety: after adoption by a lone early source, a late disagreeing source makes a tie that is not treated as a conflict (engine.rs decide_root/exclude_others; vote.rs overturned needs a strict majority)"]
fn a_late_honest_source_that_ties_the_vote_is_not_overruled_by_who_came_first() {
    let other = Daemon::builder(1).arg("--rate-limit").arg("2M").start();
    let honest = Daemon::start(1);
    let size = 12 * MIB;
    write_file(&other.export.join("d.bin"), size, 304);
    write_file(&honest.export.join("d.bin"), size, 305);
    warm(&other, "d.bin");
    warm(&honest, "d.bin");
    let port = honest.ports[0].to_string();
    assert!(honest.ctl(&["servers", "stop", &port]).status.success());
    let client = Daemon::start(0);
    let id = client.get_detached("d.bin", &[other.sources()[0].clone(), honest.sources()[0].clone()], &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).identity.is_some()));
    assert!(honest.ctl(&["servers", "start", &port]).status.success());
    let d = client.wait_download(id, Duration::from_secs(60));
    println!("{d:?}");
    let h = source(&d, &honest.sources()[0]);
    println!("honest: {h:?}");
    assert_ne!(
        d.state,
        DownloadState::Done,
        "completed with the version of whoever answered first ({:?}), the late honest source {:?}",
        d.identity,
        h.state
    );
    assert_ne!(h.state, SourceState::Excluded, "{h:?}");
}

/// A dead source alone: the waiting note is there; the live election does
/// not adopt anything from nobody. (Control for the tests above.)
#[test]
fn nothing_is_adopted_from_nobody() {
    let client = Daemon::start(0);
    let id = client.get_detached("z.bin", &[dead_port()], &[]);
    std::thread::sleep(Duration::from_secs(6));
    let d = client.download(id);
    assert!(d.identity.is_none() && d.size.is_none(), "{d:?}");
    assert!(d.waiting.is_some(), "{d:?}");
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());
}

/// A liar announcing a 1 TiB file answers while the honest source is down
/// for a moment: alone, it decides the size, and the download fails at
/// once for want of disk space (a file system far too small), before the
/// honest source is back a second later.
#[test]
#[ignore = "a lone fast liar decides the size while the honest source is briefly down, and a 1 TiB size fails the download at once (engine.rs elect/prepare: a layout adopted from one answer is acted on before anyone could object)"]
fn a_huge_size_from_a_lone_liar_does_not_fail_the_download() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 4 * MIB;
    write_file(&honest.export.join("e.bin"), size, 306);
    write_file(&upstream.export.join("e.bin"), size, 306);
    warm(&honest, "e.bin");
    let liar = LyingServer::start(upstream.ports[0], Lie::Size { size: 1 << 40 });
    let port = honest.ports[0].to_string();
    assert!(honest.ctl(&["servers", "stop", &port]).status.success());
    let client = Daemon::start(0);
    let id = client.get_detached("e.bin", &[addr(&liar), honest.sources()[0].clone()], &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(honest.ctl(&["servers", "start", &port]).status.success());
    let d = client.wait_download(id, Duration::from_secs(60));
    println!("{d:?}");
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
}

/// A source sending the right bytes steadily at about 200 KiB/s, above
/// the crawl threshold (1/16 of the mean connection rate, here about 2 MiB/s
/// a connection), and never answering TRIM, next to two honest 4 MiB/s
/// sources: it costs at most 1.5 times what the honest sources alone take.
#[test]
fn a_slow_source_just_above_the_crawl_threshold_cannot_hold_the_download() {
    let honest = Daemon::builder(2).arg("--rate-limit").arg("4M").start();
    let size = 24 * MIB;
    write_file(&honest.export.join("p.bin"), size, 307);
    warm(&honest, "p.bin");
    let upstream = Daemon::start(1);
    write_file(&upstream.export.join("p.bin"), size, 307);
    warm(&upstream, "p.bin");
    let slow = LyingServer::start(upstream.ports[0], Lie::Paced { chunk: 4096, every_ms: 20 });
    let client = Daemon::start(0);
    let out_dir = client.downloads.to_str().expect("utf-8").to_string();
    let t = Instant::now();
    let out = client
        .ctl_within(Duration::from_secs(60), &["get", "p.bin", "--from", &honest.sources().join(","), "-o", &out_dir]);
    let alone = t.elapsed();
    assert!(out.status.success());
    std::fs::remove_file(client.downloads.join("p.bin")).expect("remove");
    let mut sources = honest.sources();
    sources.push(addr(&slow));
    let t = Instant::now();
    let out =
        client.ctl_within(Duration::from_secs(120), &["get", "p.bin", "--from", &sources.join(","), "-o", &out_dir]);
    let with = t.elapsed();
    assert!(out.status.success(), "{}", client.log());
    assert_eq!(sha256_file(&client.downloads.join("p.bin")), sha256_file(&honest.export.join("p.bin")));
    let d = client.download(2);
    println!("alone {alone:?}, with the slow source {with:?}; slow source {:?}", source(&d, &addr(&slow)));
    assert!(with <= alone.mul_f64(1.5), "with the slow source {with:?}, honest sources alone {alone:?}");
}
