//! Handshake floods, from the attacker's seat: a replayed TLS ClientHello
//! thousands of times a second from one address costs the daemon little,
//! its log grows by one line per interval instead of one per handshake,
//! and other clients are served meanwhile.

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mftd_common::proto::{ErrorCode, Frame};
use mftd_tests::{connect_from, sha256_file, stderr, write_file, Daemon};

const MIB: u64 = 1 << 20;

/// The first flight of a real TLS client of mftd: what a replayer sends.
fn client_hello() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = mftd::node::NodeIdentity::load_or_create(dir.path()).expect("node identity");
    let tls = mftd::node::TlsConfigs::new(&id).expect("TLS configuration");
    let name = rustls::pki_types::ServerName::try_from("mftd").expect("name");
    let mut conn = rustls::ClientConnection::new(tls.client.clone(), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    assert_eq!(hello.first(), Some(&0x16), "a TLS handshake record");
    hello
}

/// Replays `hello` to `port` from `src` on `threads` threads, at most
/// `per_sec` connections a second in all, until `stop`. Returns the
/// number of connections made.
fn flood(
    src: &'static str,
    port: u16,
    threads: u64,
    per_sec: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let hello = Arc::new(client_hello());
    let made = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (hello, made, stop) = (hello.clone(), made.clone(), stop.clone());
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(mut s) = connect_from(src, port) {
                            let _ = s.write_all(&hello);
                            made.fetch_add(1, Ordering::Relaxed);
                        }
                        n += 1;
                        // Paced to the rate asked for, not beyond.
                        let due = start + Duration::from_secs_f64(n as f64 * threads as f64 / per_sec as f64);
                        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(ahead);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        made.load(Ordering::Relaxed)
    })
}

/// Downloads `name` from `server` into `dir` through `client`; returns how
/// long it took.
fn timed_download(server: &Daemon, client: &Daemon, name: &str, dir: &std::path::Path) -> Duration {
    std::fs::create_dir_all(dir).expect("mkdir");
    let t = Instant::now();
    let out = client.ctl_within(
        Duration::from_secs(120),
        &["get", name, "--from", &server.sources()[0], "-o", dir.to_str().expect("utf-8")],
    );
    let took = t.elapsed();
    assert!(out.status.success(), "get failed: {}\n{}", stderr(&out), client.log());
    assert_eq!(sha256_file(&dir.join(name)), sha256_file(&server.export.join(name)));
    took
}

fn log_size(d: &Daemon) -> u64 {
    std::fs::metadata(d.dir.path().join("mftd.log")).map_or(0, |m| m.len())
}

#[test]
fn a_15_s_handshake_flood_grows_the_log_by_under_100_kib_and_a_download_goes_on() {
    let server = Daemon::builder(1).arg("--index-export").start();
    write_file(&server.export.join("big.bin"), 64 * MIB, 21);
    let client = Daemon::start(0);
    let port = server.ports[0];

    // The same download without a flood, for comparison (the first run
    // also has the file hashed).
    timed_download(&server, &client, "big.bin", &client.downloads.join("warm"));
    let calm = timed_download(&server, &client, "big.bin", &client.downloads.join("calm"));

    let before = log_size(&server);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let flooder = flood("127.0.0.2", port, 8, 7_000, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let flooded = timed_download(&server, &client, "big.bin", &client.downloads.join("flooded"));
    std::thread::sleep(Duration::from_secs(15).saturating_sub(started.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let made = flooder.join().expect("flood threads");
    let lasted = started.elapsed();
    // Lines of the last moments reach the file.
    std::thread::sleep(Duration::from_secs(1));
    let grew = log_size(&server) - before;
    let log = server.log();
    println!(
        "flood: {made} connections in {lasted:.1?} ({:.0}/s); log grew {grew} bytes; download {calm:.2?} calm, {flooded:.2?} flooded",
        made as f64 / lasted.as_secs_f64()
    );

    assert!(made > 15_000, "the flood did not run: {made} connections");
    assert!(
        grew < 100 * 1024,
        "the log grew by {grew} bytes over the flood:\n{}",
        &log[log.len().saturating_sub(2000)..]
    );
    // The mechanism: counted, and said with the count.
    let summary = log.lines().find(|l| l.contains("from 127.0.0.2 in the last") && l.contains(" more "));
    assert!(summary.is_some_and(|l| l.contains("count=")), "no summary line with a count:\n{log}");
    assert!(flooded < calm * 3 + Duration::from_secs(2), "the flood slowed the download from {calm:?} to {flooded:?}");
    // The server still serves after the flood.
    assert!(server.ctl_within(Duration::from_secs(5), &["status"]).status.success());
}

#[test]
fn connections_over_the_handshake_rate_are_refused_and_another_address_is_served() {
    let server = Daemon::builder(1).arg("--handshake-rate").arg("5").arg("--max-connections-per-ip").arg("64").start();
    write_file(&server.export.join("a.bin"), 3 * MIB, 22);
    let port = server.ports[0];

    // 40 connections at once from one address: a burst of 10 (twice the
    // rate) is taken, the rest told BUSY before any TLS.
    let mut conns: Vec<_> = (0..40).filter_map(|_| connect_from("127.0.0.3", port)).collect();
    assert_eq!(conns.len(), 40);
    std::thread::sleep(Duration::from_millis(500));
    let (taken, refused) = taken_and_refused(&mut conns, "slow down");
    println!("{taken} taken, {refused} refused");
    assert!((10..=13).contains(&taken), "{taken} of 40 taken at a rate of 5/s");
    assert_eq!(refused + taken, 40);

    // Another address is served meanwhile.
    let client = Daemon::start(0);
    let out = client.get("a.bin", &server.sources()[0], &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), server.log());
    assert_eq!(sha256_file(&client.downloads.join("a.bin")), sha256_file(&server.export.join("a.bin")));

    // The refusals are logged once, the rest counted.
    let log = server.log();
    assert_eq!(log.matches("handshake rate exceeded").count(), 1, "{log}");
}

#[test]
fn all_listeners_together_serve_only_their_share_of_descriptors() {
    // 256 descriptors: the listeners together serve 64 connections, though
    // each of the two may take 64 (max_connections) on its own.
    let server = Daemon::builder(2).nofile(256, 256).start();
    assert!(server.log().contains("add up to more than they may serve together"), "{}", server.log());
    let mut conns = Vec::new();
    // From 8 addresses (under the per-address cap and rate), both ports.
    for i in 0..80 {
        let src = format!("127.0.5.{}", i % 8 + 1);
        conns.push(connect_from(&src, server.ports[i % 2]).expect("connect"));
    }
    // Past the second a newcomer waits for the room made for it.
    std::thread::sleep(Duration::from_millis(1500));
    // Addresses holding more make room for those holding fewer (closed
    // unanswered), among all listeners once the share is taken.
    let (taken, refused, closed) = taken_refused_closed(&mut conns, "this server is at its connection cap");
    println!("{taken} taken, {refused} refused, {closed} closed to make room");
    assert_eq!((taken, refused + closed), (64, 16), "the listeners took {taken} of 80 with a share of 64");
    // Given back as they close: a download is served again.
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    write_file(&server.export.join("a.bin"), 3 * MIB, 23);
    let client = Daemon::start(0);
    let out = client.get("a.bin", &server.sources()[0], &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), server.log());
}

/// How many of `conns` the server took (it waits for their ClientHello)
/// and how many it refused with a BUSY saying `why`; panics on anything
/// else.
fn taken_and_refused(conns: &mut [std::net::TcpStream], why: &str) -> (usize, usize) {
    let (taken, refused, closed) = taken_refused_closed(conns, why);
    assert_eq!(closed, 0, "{closed} closed without an answer");
    (taken, refused)
}

/// Like [`taken_and_refused`], and how many were closed unanswered (to
/// make room for another address).
fn taken_refused_closed(conns: &mut [std::net::TcpStream], why: &str) -> (usize, usize, usize) {
    let (mut taken, mut refused, mut closed) = (0, 0, 0);
    for s in conns {
        s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => taken += 1,
            Ok(n) if n > 5 => {
                let f = Frame::decode(buf[0], &buf[5..n]).expect("an ERROR frame");
                assert!(matches!(&f, Frame::Error(e) if e.code == ErrorCode::Busy && e.message.contains(why)), "{f:?}");
                refused += 1;
            }
            Ok(0) => closed += 1,
            other => panic!("neither waiting for a ClientHello nor refused: {other:?}"),
        }
    }
    (taken, refused, closed)
}

#[test]
fn addresses_holding_every_slot_with_silent_sockets_do_not_lock_out_a_download() {
    // One listener of 16 connections; four addresses keep all 16 with
    // sockets that never speak, replacing each one that is closed.
    let server = Daemon::builder(1).arg("--max-connections").arg("16").start();
    write_file(&server.export.join("a.bin"), 4 * MIB, 24);
    let port = server.ports[0];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held_max = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s2, h2) = (stop.clone(), held_max.clone());
    let flooder = std::thread::spawn(move || {
        let mut held: Vec<std::net::TcpStream> = Vec::new();
        let end = Instant::now() + Duration::from_secs(30);
        while !s2.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
            held.retain(|s| {
                let mut b = [0u8; 64];
                s.set_nonblocking(true).expect("nonblocking");
                matches!((&*s).read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock)
            });
            h2.fetch_max(held.len(), std::sync::atomic::Ordering::SeqCst);
            for k in 0..4 {
                let src = format!("127.0.6.{}", k + 1);
                let mine =
                    held.iter().filter(|s| s.local_addr().map(|a| a.ip().to_string() == src).unwrap_or(false)).count();
                for _ in mine..4 {
                    if let Some(s) = connect_from(&src, port) {
                        held.push(s);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(server.listener(port).connections, 16, "the flood holds every slot");
    let client = Daemon::start(0);
    let out = client.ctl_within(Duration::from_secs(30), &["get", "a.bin", "--from", &server.sources()[0]]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    flooder.join().expect("flooder");
    assert!(
        out.status.success(),
        "a download while four addresses hold every slot: {}\n{}",
        stderr(&out),
        server.log()
    );
    assert_eq!(sha256_file(&client.downloads.join("a.bin")), sha256_file(&server.export.join("a.bin")));
    assert!(held_max.load(std::sync::atomic::Ordering::SeqCst) >= 16, "the flood never held the listener");
}
