//! Hostile and broken sources played against the live election, the
//! per-author strikes and the deadlines of issue 20 (a reviewer's session).
//! Each failed when it was written; the comments say what broke.

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
    let started = std::time::Instant::now();
    let id = client.get_detached("b.bin", &[honest.sources()[0].clone(), addr(&hashing)], &[]);
    let all_in = wait_until(Duration::from_secs(20), || client.download(id).bytes_done == size);
    let d = client.download(id);
    println!("all bytes in: {all_in}; {d:?}");
    assert!(d.vote.as_deref().is_some_and(|v| v.contains("1 still hashing")), "{d:?}");
    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    // Waited for as long as hashing 8 MiB may take (the vote's allowance),
    // and not much longer.
    let allowance = Duration::from_secs(10) + Duration::from_secs_f64(8.0 / 64.0);
    let took = started.elapsed();
    assert!(took >= allowance && took < allowance + Duration::from_secs(5), "took {took:?}");
}

/// A liar's unverified bytes are kept across a pause (the manifest records
/// them as received), and on resume nobody knows whose they were: the
/// honest source that completes each of those pieces is their only author
/// in the new run, and is struck for the liar's bytes, then dropped.
#[test]
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
/// own rule is that a tie is never broken by who answered first. (Fixed by
/// waiting for refused sources until the election deadline: the honest
/// source, back within it, votes, and the split fails naming both.)
#[test]
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
    std::thread::sleep(Duration::from_secs(1));
    assert!(client.download(id).identity.is_none(), "adopted while a source was away for a moment");
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
    // The split is the user's to settle, and the message says how.
    let why = d.error.as_deref().unwrap_or("");
    assert!(why.contains("disagree") && why.contains("--identity"), "{d:?}");
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
/// for a moment. (It used to decide the size alone, and the download
/// failed at once for want of disk space before the honest source was
/// back a second later.)
#[test]
fn a_huge_size_from_a_lone_liar_does_not_decide_the_download() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 4 * MIB;
    write_file(&honest.export.join("e.bin"), size, 306);
    write_file(&upstream.export.join("e.bin"), size, 306);
    warm(&honest, "e.bin");
    let liar = LyingServer::start(upstream.ports[0], Lie::Size { size: 1 << 40, keep_root: false });
    let port = honest.ports[0].to_string();
    assert!(honest.ctl(&["servers", "stop", &port]).status.success());
    let client = Daemon::start(0);
    let id = client.get_detached("e.bin", &[addr(&liar), honest.sources()[0].clone()], &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(honest.ctl(&["servers", "start", &port]).status.success());
    let d = client.wait_download(id, Duration::from_secs(60));
    println!("{d:?}");
    // The honest source is back before the election deadline and votes:
    // one against one, a split the user settles (with --identity), never a
    // failure for disk space that only the liar's size needed.
    assert_eq!(d.state, DownloadState::Failed, "{d:?}");
    let why = d.error.as_deref().unwrap_or("");
    assert!(why.contains("disagree") && why.contains("1099511627776 bytes") && why.contains("4194304 bytes"), "{why}");
    assert!(!why.contains("disk space"), "{why}");
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

/// With `--identity`, the "hashing forever" source cannot hold the vote:
/// the pinned root is adopted at once and the honest source's list verifies
/// the pieces. (Control for the unpinned test above.)
#[test]
fn a_source_that_is_hashing_forever_does_not_hold_a_pinned_download() {
    let honest = Daemon::start(1);
    let upstream = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&honest.export.join("f.bin"), size, 308);
    write_file(&upstream.export.join("f.bin"), size, 308);
    warm(&honest, "f.bin");
    warm(&upstream, "f.bin");
    let root = identity_of(&honest.export.join("f.bin"));
    let hashing = LyingServer::start(upstream.ports[0], Lie::Hashing);
    let client = Daemon::start(0);
    let id = client.get_detached("f.bin", &[honest.sources()[0].clone(), addr(&hashing)], &["--identity", &root]);
    let d = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("f.bin")), sha256_file(&honest.export.join("f.bin")));
}

/// A user's pause followed at once by `downloads add-source` (before the
/// run may have wound down): the pause holds and the source is kept for
/// the resume. (Held in review: a suspected race between `add_sources`'
/// restart and the pause did not show.)
#[test]
fn a_pause_followed_at_once_by_add_source_stays_paused() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("2M").start();
    write_file(&server.export.join("g.bin"), 32 * MIB, 309);
    warm(&server, "g.bin");
    let client = Daemon::start(0);
    let id = client.get_detached("g.bin", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > MIB));
    let extra = dead_port();
    // Both commands back to back, as a script would send them.
    let pause = client.ctl(&["downloads", "pause", &id.to_string()]);
    let add = client.ctl(&["downloads", "add-source", &id.to_string(), &extra]);
    println!("pause: {}{}", mftd_tests::stdout(&pause), mftd_tests::stderr(&pause));
    println!("add: {}{}", mftd_tests::stdout(&add), mftd_tests::stderr(&add));
    std::thread::sleep(Duration::from_secs(3));
    let d = client.download(id);
    assert_eq!(d.state, DownloadState::Paused, "the user's pause was undone: {d:?}");
    assert!(d.sources.iter().any(|s| s.address == extra), "{d:?}");
}

/// Two sources of another version come up after the honest one's version
/// was adopted and out-vote it: the download starts over with theirs (the
/// vote's rule), once, and ends. Bounded, no relayout loop.
#[test]
fn two_late_sources_that_out_vote_the_adopted_version_start_it_over_once() {
    let honest = Daemon::builder(1).arg("--rate-limit").arg("2M").start();
    let others = Daemon::start(2);
    let size = 8 * MIB;
    write_file(&honest.export.join("h.bin"), size, 310);
    write_file(&others.export.join("h.bin"), size, 311);
    warm(&honest, "h.bin");
    warm(&others, "h.bin");
    for p in &others.ports {
        assert!(others.ctl(&["servers", "stop", &p.to_string()]).status.success());
    }
    let client = Daemon::start(0);
    let mut sources = honest.sources();
    sources.extend(others.sources());
    let id = client.get_detached("h.bin", &sources, &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > MIB));
    for p in &others.ports {
        assert!(others.ctl(&["servers", "start", &p.to_string()]).status.success());
    }
    let d = client.wait_download(id, Duration::from_secs(60));
    println!("{d:?}");
    let log = client.log();
    let overs = log.matches("out-voted the adopted version").count();
    println!("start-overs: {overs}");
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(d.identity, Some(identity_of(&others.export.join("h.bin"))));
    assert_eq!(source(&d, &honest.sources()[0]).state, SourceState::Excluded, "{d:?}");
    assert!((1..=3).contains(&overs), "{overs} start-overs");
}

/// A liar flipping one byte in the middle of every piece, with two honest
/// sources: only the liar is struck, and the download completes.
#[test]
fn a_liar_flipping_mid_piece_bytes_next_to_two_honest_sources() {
    let honest = Daemon::builder(2).arg("--rate-limit").arg("6M").start();
    let upstream = Daemon::start(1);
    let size = 24 * MIB;
    write_file(&honest.export.join("i.bin"), size, 312);
    write_file(&upstream.export.join("i.bin"), size, 312);
    warm(&honest, "i.bin");
    warm(&upstream, "i.bin");
    let liar = LyingServer::start(upstream.ports[0], Lie::Flip { first: 128 * 1024 + 77, every: 256 * 1024 });
    let client = Daemon::start(0);
    let mut sources = vec![addr(&liar)];
    sources.extend(honest.sources());
    let id = client.get_detached("i.bin", &sources, &[]);
    let d = client.wait_download(id, Duration::from_secs(60));
    for s in &d.sources {
        println!("{} {:?} strikes {} bytes {}", s.address, s.state, s.strikes, s.bytes);
    }
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    for h in honest.sources() {
        assert_eq!(source(&d, &h).strikes, 0, "{d:?}");
    }
    assert_eq!(source(&d, &addr(&liar)).state, SourceState::Failed, "{d:?}");
}

/// A liar that writes the first 160 KiB of each range it is asked for, with
/// one byte flipped, and hangs up: two honest sources finish its pieces, so
/// the bad pieces have several authors, the liar the largest share of each.
/// Only the liar may be struck, and the download must not stall.
#[test]
fn a_liar_writing_most_of_pieces_others_finish() {
    let honest = Daemon::builder(2).arg("--rate-limit").arg("3M").start();
    let upstream = Daemon::start(1);
    let size = 24 * MIB;
    write_file(&honest.export.join("j.bin"), size, 313);
    write_file(&upstream.export.join("j.bin"), size, 313);
    warm(&honest, "j.bin");
    warm(&upstream, "j.bin");
    let liar = LyingServer::start(upstream.ports[0], Lie::FlipCut { first: 1000, every: 256 * 1024, keep: 160 * 1024 });
    let client = Daemon::start(0);
    let mut sources = vec![addr(&liar)];
    sources.extend(honest.sources());
    let id = client.get_detached("j.bin", &sources, &["--connections-per-server", "4"]);
    let ended = wait_until(Duration::from_secs(60), || client.download(id).state.is_final());
    let d = client.download(id);
    for s in &d.sources {
        println!("{} {:?} strikes {} bytes {} err {:?}", s.address, s.state, s.strikes, s.bytes, s.last_error);
    }
    println!("{} of {} pieces verified, {} bytes", d.pieces_verified, d.pieces_total, d.bytes_done);
    assert!(ended, "stalled: {d:?}");
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    for h in honest.sources() {
        assert_eq!(source(&d, &h).strikes, 0, "{d:?}");
    }
}

/// With `--identity ROOT`, a liar announcing the pinned root with another
/// size (a claim it can never back: the root binds the size) while the
/// honest source is down for a second decides the size of a pinned
/// download; the honest source, back, is excluded for its (right) size.
/// (When the honest source answers first, the liar is excluded: held.)
#[test]
fn a_liar_claiming_the_pinned_root_with_another_size_does_not_fail_the_download() {
    // Slow enough that the liar's answer comes while the download runs.
    let honest = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    let upstream = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&honest.export.join("k.bin"), size, 314);
    write_file(&upstream.export.join("k.bin"), size, 314);
    warm(&honest, "k.bin");
    warm(&upstream, "k.bin");
    let root = identity_of(&honest.export.join("k.bin"));
    let liar = LyingServer::start(upstream.ports[0], Lie::Size { size: size + 4096, keep_root: true });
    let client = Daemon::start(0);
    for (i, sources) in [vec![honest.sources()[0].clone(), addr(&liar)], vec![addr(&liar), honest.sources()[0].clone()]]
        .into_iter()
        .enumerate()
    {
        let _ = std::fs::remove_file(client.downloads.join("k.bin"));
        // The honest source is down for the first second: the liar answers first.
        let port = honest.ports[0].to_string();
        assert!(honest.ctl(&["servers", "stop", &port]).status.success());
        let id = client.get_detached("k.bin", &sources, &["--identity", &root]);
        std::thread::sleep(Duration::from_secs(1));
        assert!(honest.ctl(&["servers", "start", &port]).status.success());
        let d = client.wait_download(id, Duration::from_secs(30));
        println!("order {i}: {:?} {:?} {:?}", d.state, d.error, source(&d, &addr(&liar)));
        assert_eq!(d.state, DownloadState::Done, "order {i}: {d:?}");
        assert_eq!(sha256_file(&client.downloads.join("k.bin")), sha256_file(&honest.export.join("k.bin")));
        // Not a byte of the file is the liar's, and the honest source is
        // not excluded for its (right) size.
        let l = source(&d, &addr(&liar));
        assert_eq!(l.bytes, 0, "order {i}: {l:?}");
        assert_ne!(source(&d, &honest.sources()[0]).state, SourceState::Excluded, "order {i}: {d:?}");
    }
}

/// The same stall with real servers only: a server still hashing a large
/// file answers STAT without a root and is then stopped (a server of
/// several going down); the other server, which has hashed the file,
/// serves all of it. No piece is verified while the stopped server is
/// down.
#[test]
fn a_real_server_stopped_while_hashing_does_not_hold_the_download() {
    let size = 256 * MIB;
    let hashing = Daemon::builder(1).arg("--hash-threads").arg("1").start();
    let honest = Daemon::start(1);
    for d in [&hashing, &honest] {
        let p = d.export.join("r.bin");
        write_file(&p, MIB, 77);
        std::fs::OpenOptions::new().write(true).open(&p).expect("open").set_len(size).expect("set_len");
    }
    warm(&honest, "r.bin");
    let client = Daemon::start(0);
    let id = client.get_detached("r.bin", &[honest.sources()[0].clone(), hashing.sources()[0].clone()], &[]);
    // Once both answered (the hashing one cannot have a root yet, or the
    // identity would be settled), the hashing server goes down.
    let both = wait_until(Duration::from_secs(10), || {
        let d = client.download(id);
        d.vote.as_deref().is_some_and(|v| v.contains("still hashing"))
    });
    let d = client.download(id);
    assert!(both, "{d:?}");
    assert!(hashing.ctl(&["servers", "stop", &hashing.ports[0].to_string()]).status.success());
    let d = client.wait_download(id, Duration::from_secs(90));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
}

/// A source that answers STAT (truthfully) and hangs up right after, on
/// every connection, next to one honest source, with and without a pin:
/// it is counted as answered and costs little.
#[test]
fn a_source_that_hangs_up_after_every_stat_costs_little() {
    let honest = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    let upstream = Daemon::start(1);
    let size = 16 * MIB;
    write_file(&honest.export.join("l.bin"), size, 315);
    write_file(&upstream.export.join("l.bin"), size, 315);
    warm(&honest, "l.bin");
    warm(&upstream, "l.bin");
    let root = identity_of(&honest.export.join("l.bin"));
    let flap = LyingServer::start(upstream.ports[0], Lie::Flap);
    let client = Daemon::start(0);
    for (i, pin) in [vec![], vec!["--identity", root.as_str()]].into_iter().enumerate() {
        let _ = std::fs::remove_file(client.downloads.join("l.bin"));
        let t = Instant::now();
        let id = client.get_detached("l.bin", &[addr(&flap), honest.sources()[0].clone()], &pin);
        let d = client.wait_download(id, Duration::from_secs(30));
        println!("run {i}: {:?} in {:?}; flapper {:?}", d.state, t.elapsed(), source(&d, &addr(&flap)));
        assert_eq!(d.state, DownloadState::Done, "{d:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
