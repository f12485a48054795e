//! A second hostile review, of the fixes the first one led to: the
//! admission of downloads under one lock, and a full listener making room.
//! Each test states what an operator must be able to rely on; those marked
//! `#[ignore = "finding: ..."]` fail on the code they were written against.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mftd_common::control::DownloadState;
use mftd_tests::{stderr, wait_until, write_file, Daemon};

const MIB: u64 = 1 << 20;

/// Sends `line` on each of `socks` at once (as near as threads allow) and
/// returns the answers' first lines.
fn at_once(socks: Vec<UnixStream>, line: &str) -> Vec<String> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(socks.len()));
    let threads: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            let (barrier, line) = (barrier.clone(), line.to_string());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
                barrier.wait();
                let _ = s.write_all(line.as_bytes());
                let mut answer = String::new();
                let _ = BufReader::new(s).read_line(&mut answer);
                answer
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("thread")).collect()
}

/// A paused download resumed by several requests at once must run once:
/// a second run of the same download would write the same part file, and
/// the run the list no longer holds could be neither paused nor cancelled,
/// nor counted against any quota.
#[test]
fn a_paused_download_resumed_by_requests_at_once_runs_once() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("1M").start();
    write_file(&server.export.join("r.bin"), 64 * MIB, 31);
    let port = server.ports[0];
    let client = Daemon::start(0);
    let id = client.get_detached("r.bin", &server.sources(), &["--connections-per-server", "2"]);
    let line = format!("{{\"type\":\"download_resume\",\"id\":{id}}}\n");
    let mut doubled = 0;
    let end = Instant::now() + Duration::from_secs(60);
    for _round in 0..10 {
        if Instant::now() > end {
            break;
        }
        assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 0));
        let out = client.ctl(&["downloads", "pause", &id.to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(wait_until(Duration::from_secs(10), || client.download(id).state == DownloadState::Paused));
        let socks: Vec<UnixStream> =
            (0..6).map(|_| UnixStream::connect(&client.socket).expect("control socket")).collect();
        let answers = at_once(socks, &line);
        let ok = answers.iter().filter(|a| a.contains("\"ok\"")).count();
        if ok > 1 {
            doubled += 1;
            eprintln!("{ok} of 6 resumes of download {id} were accepted: {answers:?}");
            break;
        }
    }
    // Whatever the answers: once paused (or failed), nothing of it is left
    // running.
    std::thread::sleep(Duration::from_secs(1));
    let _ = client.ctl(&["downloads", "pause", &id.to_string()]);
    let stopped = |s: DownloadState| s == DownloadState::Paused || s.is_final();
    assert!(wait_until(Duration::from_secs(10), || stopped(client.download(id).state)));
    let quiet = wait_until(Duration::from_secs(5), || server.listener(port).connections == 0);
    assert!(
        quiet && doubled == 0,
        "download {id} is paused yet the server still serves {} connections (resumed twice: {doubled})\n{}",
        server.listener(port).connections,
        client.log()
    );
}

/// Keeps `per` silent sockets from each of `addrs` on each of `ports`
/// until `stop` (or 40 s), replacing any the server closes. Returns the
/// most it held at once.
fn hold_silent(
    addrs: Vec<String>,
    ports: Vec<u16>,
    per: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::io::{ErrorKind, Read};
    std::thread::spawn(move || {
        let mut held: Vec<(String, u16, std::net::TcpStream)> = Vec::new();
        let mut most = 0;
        let end = Instant::now() + Duration::from_secs(40);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
            held.retain(|(_, _, s)| {
                let mut b = [0u8; 64];
                s.set_nonblocking(true).expect("nonblocking");
                matches!((&*s).read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock)
            });
            most = most.max(held.len());
            for a in &addrs {
                for p in &ports {
                    let mine = held.iter().filter(|(x, q, _)| x == a && q == p).count();
                    for _ in mine..per {
                        if let Some(s) = mftd_tests::connect_from(a, *p) {
                            held.push((a.clone(), *p, s));
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        most
    })
}

/// The listeners together serve at most 1/4 of the open-files limit; a
/// daemon of several listeners reaches that share before any listener is
/// full. Silent sockets from a few addresses that hold the share must not
/// lock other clients out there either: a full listener makes room, and so
/// must a full share. (Here: 256 descriptors, a share of 64, two listeners
/// of 64 each; four loopback addresses keep 8 silent sockets on each.)
#[test]
fn silent_sockets_holding_the_listeners_share_do_not_lock_out_other_clients() {
    let server = Daemon::builder(2).nofile(256, 256).start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addrs = (1..5).map(|k| format!("127.0.8.{k}")).collect();
    let flood = hold_silent(addrs, server.ports.clone(), 8, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let held: u64 = server.ports.iter().map(|p| server.listener(*p).connections).sum();
    let (mut tries, mut refused) = (0, 0);
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        tries += 1;
        refused += usize::from(mftd_tests::refused_busy(server.ports[tries % 2]));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = flood.join().expect("flooder");
    eprintln!("{refused} of {tries} connections from 127.0.0.1 refused while the flood held {most} ({held} served)");
    assert!(most >= 64 && held >= 64, "the flood never held the share: {most} sockets, {held} served");
    assert!(refused * 2 < tries, "{refused} of {tries} connections of another client refused\n{}", server.log());
}
