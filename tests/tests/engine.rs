//! The download engine against real daemons: load balancing over capped
//! listeners, failover, total outages, stalled and lying sources.

use std::time::{Duration, Instant};

use mftd_common::control::{DownloadInfo, DownloadState, SourceState};
use mftd_tests::{
    identity_of, sha256_file, source, stderr, wait_until, warm, write_file, Daemon, Lie, LyingServer, StallProxy,
    WINDOW_BYTES,
};

const MIB: u64 = 1 << 20;

fn received_total(dl: &DownloadInfo) -> u64 {
    dl.sources.iter().map(|s| s.bytes_received).sum()
}

#[test]
fn listener_rate_limit_holds_within_two_percent() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    write_file(&server.export.join("r"), 48 * MIB, 12);
    warm(&server, "r");
    let client = Daemon::start(0);
    let id = client.get_detached("r", &server.sources(), &[]);
    // Measure the listener's own counter over 4 s in the middle of the
    // transfer; each reading is timed by the midpoint of the query.
    let sample = || {
        let a = Instant::now();
        let b = server.bytes_sent(server.ports[0]);
        let c = Instant::now();
        (a + (c - a) / 2, b, c - a)
    };
    assert!(wait_until(Duration::from_secs(10), || server.bytes_sent(server.ports[0]) > 4 * MIB));
    let (t0, b0, q0) = sample();
    std::thread::sleep(Duration::from_secs(4));
    let (t1, b1, q1) = sample();
    let rate = (b1 - b0) as f64 / (t1 - t0).as_secs_f64();
    println!("8 MiB/s cap measured at {:.3} MiB/s over {:?} (query times {q0:?}, {q1:?})", rate / MIB as f64, t1 - t0);
    assert!((rate / (8.0 * MIB as f64) - 1.0).abs() <= 0.02, "rate {rate}");
    assert_eq!(client.wait_download(id, Duration::from_secs(30)).state, DownloadState::Done);
}

#[test]
fn stopped_listener_fails_over_refetching_at_most_a_window() {
    // The exact-byte hand-over itself is `scheduler::failed_connection_resumes_at_exact_byte`;
    // end to end (over TLS, where READ offsets cannot be watched) this checks
    // its cost: the stopped source's open ranges are not fetched again whole.
    let server = Daemon::builder(4).arg("--rate-limit").arg("8M").start();
    let size = 64 * MIB;
    write_file(&server.export.join("f"), size, 13);
    warm(&server, "f");
    let client = Daemon::start(0);
    let id = client.get_detached("f", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > size / 4));
    let victim = server.ports[2];
    let out = server.ctl(&["servers", "stop", &victim.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("f")), sha256_file(&server.export.join("f")));
    let total = received_total(&dl);
    println!("one listener stopped: received {total} bytes for a {size}-byte file (+{})", total - size);
    // One failure: at most one pipelined window per connection of that source.
    assert!(total <= size + 2 * WINDOW_BYTES, "received {total}");
    let v = source(&dl, &format!("127.0.0.1:{victim}"));
    assert!(v.last_error.is_some(), "{v:?}");
}

#[test]
fn killed_server_daemon_fails_over() {
    let mut a = Daemon::builder(2).arg("--rate-limit").arg("8M").start();
    let b = Daemon::builder(2).arg("--rate-limit").arg("8M").start();
    let size = 48 * MIB;
    write_file(&a.export.join("k"), size, 14);
    write_file(&b.export.join("k"), size, 14);
    warm(&a, "k");
    warm(&b, "k");
    let client = Daemon::start(0);
    let mut sources = a.sources();
    sources.extend(b.sources());
    let id = client.get_detached("k", &sources, &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > size / 4));
    a.kill(); // SIGKILL
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("k")), sha256_file(&b.export.join("k")));
    let total = received_total(&dl);
    println!("server SIGKILLed: received {total} bytes for {size} (+{})", total - size);
    // Two listeners died, two connections each.
    assert!(total <= size + 4 * WINDOW_BYTES, "received {total}");
}

#[test]
fn total_outage_waits_then_resumes_by_itself() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("8M").start();
    let size = 40 * MIB;
    write_file(&server.export.join("o"), size, 15);
    warm(&server, "o");
    let client = Daemon::start(0);
    let id = client.get_detached("o", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > size / 5));
    for p in &server.ports {
        assert!(server.ctl(&["servers", "stop", &p.to_string()]).status.success());
    }
    assert!(
        wait_until(Duration::from_secs(15), || client.download(id).state == DownloadState::Waiting),
        "never showed waiting: {:?}",
        client.download(id)
    );
    let frozen = client.download(id).bytes_done;
    // Waiting costs no CPU to speak of: sample the client's CPU time.
    let cpu0 = cpu_ticks(client.pid());
    std::thread::sleep(Duration::from_secs(2));
    let cpu1 = cpu_ticks(client.pid());
    println!("CPU while waiting: {} ticks in 2 s", cpu1 - cpu0);
    assert!(cpu1 - cpu0 <= 10, "busy while waiting: {} ticks", cpu1 - cpu0);
    assert_eq!(client.download(id).bytes_done, frozen);
    for p in &server.ports {
        assert!(server.ctl(&["servers", "start", &p.to_string()]).status.success());
    }
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("o")), sha256_file(&server.export.join("o")));
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn download_started_before_any_source_is_up() {
    // Ports that nothing listens on yet.
    let ports: Vec<u16> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let client = Daemon::start(0);
    let sources: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let id = client.get_detached("late", &sources, &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).state == DownloadState::Waiting));
    // Waiting costs nothing: no loop of the download spins meanwhile
    // (a checkpointer once woke itself without pause until a version was
    // chosen). Bound: a tenth of one core over 3 s.
    let (ticks, hz) = (cpu_ticks(client.pid()), 100);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(client.pid()) - ticks;
    assert!(used * 10 < 3 * hz, "a waiting download used {used} ticks of CPU in 3 s");
    let ports_arg = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let server = Daemon::builder(0).arg("--ports").arg(ports_arg).start();
    write_file(&server.export.join("late"), 5 * MIB, 16);
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("late")), sha256_file(&server.export.join("late")));
}

#[test]
fn give_up_after_fails_a_download_with_no_source() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = Daemon::start(0);
    let t = Instant::now();
    let from = format!("127.0.0.1:{port}");
    let dl = client.downloads.to_str().expect("utf-8").to_string();
    // Bounded: without give-up the get would wait forever.
    let out =
        client.ctl_within(Duration::from_secs(30), &["get", "x", "--from", &from, "-o", &dl, "--give-up-after", "2s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).is_empty() || !stderr(&out).contains("panic"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gave up after 2s"), "{text}");
    // While it waited, the progress lines said why.
    assert!(
        text.lines().any(|l| l.contains(&format!("127.0.0.1:{port} waiting")) && l.contains("connection refused")),
        "no progress line names the reason the source waits:\n{text}"
    );
    // Both bounds: not at once, and not long after the configured 2 s.
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "gave up after {took:?}");
}

/// A connection that goes silent while its source still accepts new
/// connections is replaced once a probe gets through (after four round
/// trips, at least 1 s): well before the idle timeout.
#[test]
fn a_stalled_connection_is_replaced_when_a_probe_gets_through() {
    let server = Daemon::builder(2).start();
    let size = 16 * MIB;
    write_file(&server.export.join("s"), size, 17);
    warm(&server, "s");
    // Proxy forwards the handshake, STAT answer and ~1 MiB, then goes silent.
    let proxy = StallProxy::start(server.ports[0], MIB);
    let client = Daemon::builder(0).arg("--idle-timeout").arg("600").start();
    let stalled = format!("127.0.0.1:{}", proxy.port);
    // The good source is capped so the stalled one gets work to sit on.
    assert!(server.ctl(&["servers", "limit", &server.ports[1].to_string(), "4M"]).status.success());
    let t = Instant::now();
    let id = client.get_detached(
        "s",
        &[stalled.clone(), format!("127.0.0.1:{}", server.ports[1])],
        &["--connections-per-server", "1"],
    );
    let dl = client.wait_download(id, Duration::from_secs(30));
    let took = t.elapsed();
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("s")), sha256_file(&server.export.join("s")));
    let s = source(&dl, &stalled);
    println!("stalled source: {s:?}; took {took:?}");
    // The mechanism: the stall probe (the idle timeout is 600 s here). The
    // error is current, or what the source recovered from when its new
    // connection got through.
    let why = mftd_tests::source_error(s);
    assert!(why.contains("while a new connection got through"), "not replaced by the stall probe: {s:?}");
    // 16 MiB at 4 MiB/s is 4 s; the stall costs about a second on top.
    assert!(took < Duration::from_secs(4 + 4), "took {took:?}");
    drop(proxy);
}

/// When no probe gets through (the source takes no new connection), the
/// idle timeout is the backstop: the silent connection is cut after it.
#[test]
fn the_idle_timeout_cuts_a_stall_that_no_probe_gets_past() {
    let server = Daemon::builder(2).start();
    let size = 16 * MIB;
    write_file(&server.export.join("s"), size, 18);
    warm(&server, "s");
    let proxy = StallProxy::start_once(server.ports[0], MIB);
    let client = Daemon::builder(0).arg("--idle-timeout").arg("3").arg("-v").start();
    let stalled = format!("127.0.0.1:{}", proxy.port);
    assert!(server.ctl(&["servers", "limit", &server.ports[1].to_string(), "2M"]).status.success());
    let t = Instant::now();
    let id = client.get_detached(
        "s",
        &[stalled.clone(), format!("127.0.0.1:{}", server.ports[1])],
        &["--connections-per-server", "1"],
    );
    // The silent connection is cut for its silence, naming the configured
    // idle timeout; then reconnecting is refused.
    let cut = wait_until(Duration::from_secs(20), || client.log().contains("error=no data for 3s"));
    let at = t.elapsed();
    assert!(cut, "the silent connection was never cut by the idle timeout: {}", client.log());
    // Not before the stall plus the timeout (the proxy forwards its 1 MiB
    // at once), not long after.
    assert!(at >= Duration::from_secs(3), "cut after {at:?}, before the 3 s idle timeout");
    assert!(at < Duration::from_secs(3 + 5), "cut only after {at:?}");
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("s")), sha256_file(&server.export.join("s")));
    drop(proxy);
}

#[test]
fn corrupt_pieces_are_refetched_and_the_liar_is_dropped() {
    let upstream = Daemon::start(1);
    let good = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    let size = 4 * MIB;
    write_file(&upstream.export.join("c"), size, 18);
    write_file(&good.export.join("c"), size, 18);
    warm(&upstream, "c");
    warm(&good, "c");
    // The liar announces the identity of the good file (it relays STAT and
    // HASHES from a real server) and flips a byte in every piece it sends.
    let liar = LyingServer::start(upstream.ports[0], Lie::Flip { first: 1000, every: 256 * 1024 });
    let client = Daemon::start(0);
    let liar_addr = format!("127.0.0.1:{}", liar.port);
    let id = client.get_detached("c", &[liar_addr.clone(), good.sources()[0].clone()], &[]);
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("c")), sha256_file(&good.export.join("c")));
    let l = source(&dl, &liar_addr);
    println!("liar: {l:?}");
    // Dropped at the third strike exactly: a dropped source gets no more.
    assert_eq!(l.strikes, 3, "{l:?}");
    assert_eq!(l.state, SourceState::Failed, "{l:?}");
    assert!(l.last_error.as_deref().unwrap().contains("failed verification"), "{l:?}");
}

#[test]
fn one_corrupt_piece_is_refetched_from_another_source() {
    let upstream = Daemon::start(1);
    let good = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&upstream.export.join("p"), size, 19);
    write_file(&good.export.join("p"), size, 19);
    warm(&upstream, "p");
    // One flipped byte in piece 5 of what the liar sends, same announced identity.
    let liar = LyingServer::start(upstream.ports[0], Lie::Flip { first: 5 * 256 * 1024 + 77, every: u64::MAX });
    // The good source is down at first, so the liar fetches everything,
    // piece 5 included. (With one of two sources down no version has a
    // majority: the identity is pinned, as a user would.)
    let good_port = good.ports[0].to_string();
    assert!(good.ctl(&["servers", "stop", &good_port]).status.success());
    let client = Daemon::start(0);
    let liar_addr = format!("127.0.0.1:{}", liar.port);
    let good_addr = good.sources()[0].clone();
    let root = identity_of(&good.export.join("p"));
    let id = client.get_detached("p", &[liar_addr.clone(), good_addr.clone()], &["--identity", &root]);
    assert!(
        wait_until(Duration::from_secs(15), || source(&client.download(id), &liar_addr).strikes == 1),
        "liar never struck: {:?}",
        client.download(id)
    );
    // The bad piece is not taken from the liar again while another source
    // may still deliver it.
    std::thread::sleep(Duration::from_millis(500));
    let dl = client.download(id);
    assert_ne!(dl.state, DownloadState::Done);
    assert_eq!(source(&dl, &liar_addr).strikes, 1, "{dl:?}");
    assert!(good.ctl(&["servers", "start", &good_port]).status.success());
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("p")), sha256_file(&good.export.join("p")));
    let l = source(&dl, &liar_addr);
    let g = source(&dl, &good_addr);
    println!("liar: {l:?}\ngood: {g:?}");
    assert_eq!(l.strikes, 1, "{l:?}");
    assert_ne!(l.state, SourceState::Failed, "{l:?}");
    assert_eq!(g.bytes, 256 * 1024, "the good source sent exactly the bad piece: {g:?}");
    // The liar's bytes of the bad piece are no longer credited to it.
    assert_eq!(l.bytes + g.bytes, size, "{dl:?}");
}
