//! One daemon, many local users: a member of the socket group (uid 65534
//! through `setpriv`) tries to starve root of control connections,
//! descriptors and download slots, and to learn about root's downloads;
//! root is still served, and learns nothing it should not.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadState, ErrorCode, Response};
use mftd_tests::{
    bin_dir, dead_port, member, require_second_uid, sha256_file, stderr, stdout, wait_until, write_file, Daemon,
};

const MIB: u64 = 1 << 20;

fn flood_bin() -> std::path::PathBuf {
    bin_dir().join("mftd-flood")
}

/// A running `mftd-flood`, ready (its first round of connections made).
struct Flood {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    held: usize,
}

impl Flood {
    fn start(mut cmd: Command, socket: &std::path::Path, n: usize, secs: u64, partial: usize) -> Flood {
        let mut child = cmd
            .arg(socket)
            .arg(n.to_string())
            .arg(secs.to_string())
            .arg(partial.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start mftd-flood");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("mftd-flood says ready");
        let held = first
            .trim()
            .strip_prefix("ready held=")
            .and_then(|h| h.parse().ok())
            .unwrap_or_else(|| panic!("mftd-flood said {first:?}"));
        Flood { child, out, held }
    }

    /// Waits for it to end; returns (held_max, closed_by_daemon, said).
    fn finish(mut self) -> (usize, u64, String) {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).expect("mftd-flood output");
        assert!(self.child.wait().expect("wait").success(), "mftd-flood failed: {rest}");
        let field = |k: &str| -> String {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {rest:?}"))
                .to_string()
        };
        let said = rest.lines().find_map(|l| l.strip_prefix("said=")).unwrap_or_default().to_string();
        (field("held_max").parse().expect("held_max"), field("closed_by_daemon").parse().expect("closed"), said)
    }
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn config(d: &tempfile::TempDir, text: &str) -> String {
    let p = d.path().join("mftd.toml");
    std::fs::write(&p, text).expect("config");
    p.display().to_string()
}

#[test]
fn a_members_connection_flood_leaves_root_served() {
    require_second_uid!();
    let d = member::builder(1).start();
    member::open_up(&d);
    write_file(&d.export.join("f"), 8 * MIB, 2101);
    let flood = Flood::start(member::command(flood_bin()), &d.socket, 1100, 10, 0);
    // The member holds its share and no more, from the first round on.
    assert!(flood.held <= 16, "the member holds {} connections", flood.held);
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let out = d.ctl(&["status"]);
        assert!(out.status.success(), "root's status under the flood: {}", stderr(&out));
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("root's status under a member's 1,100-connection flood: slowest of 5 took {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "root's status took {slowest:?} under the flood");
    let dir = tempfile::tempdir().unwrap();
    let out = d.ctl(&["get", "f", "--from", &d.sources()[0], "-o", &dir.path().display().to_string()]);
    assert!(out.status.success(), "root's download under the flood: {}", stderr(&out));
    assert_eq!(sha256_file(&dir.path().join("f")), sha256_file(&d.export.join("f")));
    // What the member was told, by the daemon, on the connections it closed.
    let (held_max, closed, said) = flood.finish();
    eprintln!("the member held at most {held_max} connections; mftd closed {closed} of its attempts");
    assert!(held_max <= 16, "the member held {held_max} connections");
    assert!(closed > 1000, "the daemon closed only {closed} of the member's connections");
    let resp: Response = serde_json::from_str(&said).unwrap_or_else(|e| panic!("{e}: {said:?}"));
    match resp {
        Response::Error { code: ErrorCode::Limit, message } => {
            assert!(message.contains("control_connections_per_user"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // And mftctl run by the member, with its share held, says the same.
    let flood = Flood::start(member::command(flood_bin()), &d.socket, 16, 5, 0);
    assert_eq!(flood.held, 16);
    let out = member::ctl(&d, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let said = stderr(&out);
    assert!(said.contains("too many control connections from") && said.contains("uid 65534"), "{said}");
    flood.finish();
}

#[test]
fn held_connections_cost_little_memory_and_idle_ones_are_closed() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(&cfg_dir, "[quota]\ncontrol_connections = 1000\ncontrol_idle_timeout = 3\n");
    let d = Daemon::builder(1).arg("--config").arg(cfg).nofile(8192, 8192).start();
    let before = rss_kib(d.pid());
    // 400 connections, each with 60 KiB of a request that never ends.
    let flood = Flood::start(Command::new(flood_bin()), &d.socket, 400, 4, 60 << 10);
    assert_eq!(flood.held, 400, "the daemon should take 400 connections from root here");
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib(d.pid());
    let (held_max, _, _) = flood.finish();
    assert_eq!(held_max, 400);
    let grew = during.saturating_sub(before);
    eprintln!("400 held connections: RSS {before} KiB -> {during} KiB (+{grew} KiB)");
    assert!(grew < 64 << 10, "400 held connections cost {grew} KiB");
    // Requests longer than the limit are not buffered, however many: each
    // connection is told and closed (mftd 0.1 took up to 1 MiB each).
    let flood = Flood::start(Command::new(flood_bin()), &d.socket, 400, 4, 200_000);
    let during = rss_kib(d.pid());
    let (_, closed, said) = flood.finish();
    let grew = during.saturating_sub(before);
    eprintln!("400 connections sending 200 KB lines: RSS {before} KiB -> {during} KiB (+{grew} KiB), {closed} closed");
    assert!(closed >= 400 && said.contains("line_too_long"), "{closed} closed, said {said}");
    assert!(grew < 64 << 10, "connections with over-long requests cost {grew} KiB");

    // An idle connection is told why and closed after the timeout, not
    // before; a half-sent line is idle too.
    for partial in [&b""[..], b"{\"type\":\"sta"] {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(partial).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Instant::now();
        let mut said = String::new();
        BufReader::new(&s).read_line(&mut said).unwrap();
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(2900) && waited < Duration::from_secs(7), "closed after {waited:?}");
        assert!(said.contains("\"limit\"") && said.contains("control_idle_timeout"), "{said}");
    }
    // A request longer than the request limit ends the connection.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let _ = s.write_all(&vec![b'x'; 70 << 10]);
    let mut said = String::new();
    BufReader::new(&s).read_line(&mut said).unwrap();
    assert!(said.contains("line_too_long") && said.contains("65536"), "{said}");
    assert!(d.ctl(&["status"]).status.success(), "the daemon still serves");
}

/// Listeners on `n` loopback addresses that accept and never answer,
/// counting the connections open at once.
struct StallHosts {
    addrs: Vec<SocketAddr>,
    max_open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl StallHosts {
    fn start(n: usize) -> StallHosts {
        let mut listeners = Vec::new();
        for i in 0..n {
            let l = TcpListener::bind(("127.0.3.".to_string() + &(i + 1).to_string(), 0)).expect("bind 127.0.3.x");
            l.set_nonblocking(true).unwrap();
            listeners.push(l);
        }
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let (max_open, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (m, s) = (max_open.clone(), stop.clone());
        std::thread::spawn(move || {
            let open: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());
            let start = Instant::now();
            let mut buf = [0u8; 4096];
            // Bounded: until dropped, or 5 minutes.
            while !s.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(300) {
                let mut open = open.lock().unwrap();
                // Forget the ones the daemon closed before counting new ones.
                open.retain_mut(|c| !matches!(c.read(&mut buf), Ok(0)));
                for l in &listeners {
                    while let Ok((c, _)) = l.accept() {
                        c.set_nonblocking(true).unwrap();
                        open.push(c);
                    }
                }
                m.fetch_max(open.len(), Ordering::SeqCst);
                drop(open);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        StallHosts { addrs, max_open, stop }
    }
}

impl Drop for StallHosts {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_member_cannot_starve_root_of_descriptors_or_download_slots() {
    require_second_uid!();
    // What systemd gives a service; the daemon cannot raise it.
    let d = member::builder(1).nofile(1024, 1024).start();
    member::open_up(&d);
    write_file(&d.export.join("f"), 8 * MIB, 2102);
    let hosts = StallHosts::start(64);
    let out_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(out_dir.path(), Some(member::NOBODY), Some(member::NOBODY)).unwrap();
    let o = out_dir.path().display().to_string();
    // The member asks for 20 downloads of 16 stalling hosts each.
    let mut accepted = 0;
    let mut refused: Option<Output> = None;
    for i in 0..20 {
        let from: Vec<String> = (0..16).map(|k| hosts.addrs[(i * 16 + k) % 64].to_string()).collect();
        let out =
            member::ctl(&d, &["get", "x", "--from", &from.join(","), "-o", &o, "-O", &format!("x{i}"), "--detach"]);
        if out.status.success() {
            accepted += 1;
        } else if refused.is_none() {
            refused = Some(out);
        }
    }
    assert_eq!(accepted, 16, "a member runs 16 downloads at most");
    let refused = refused.expect("the 17th is refused");
    assert!(stderr(&refused).contains("[quota] running_per_user"), "{}", stderr(&refused));
    // Let the member's downloads open all they may.
    std::thread::sleep(Duration::from_secs(4));
    let held = hosts.max_open.load(Ordering::SeqCst);
    eprintln!("the member's downloads held at most {held} connections to the stalling hosts");
    assert!(held >= 16, "the stalling hosts saw only {held} connections: the test proves nothing");
    assert!(held <= 64 + 4, "the member's downloads held {held} connections, over its 64");
    // Root is served: status, a download with its manifest, a new ID.
    let t = Instant::now();
    assert!(d.ctl(&["status"]).status.success());
    assert!(t.elapsed() < Duration::from_secs(1), "status took {:?}", t.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let out = d.ctl(&["get", "f", "--from", &d.sources()[0], "-o", &dir.path().display().to_string()]);
    assert!(out.status.success(), "root's download: {}\n{}", stderr(&out), d.log());
    assert_eq!(sha256_file(&dir.path().join("f")), sha256_file(&d.export.join("f")));
    assert!(!d.log().contains("Too many open files"), "{}", d.log());
}

/// `mftctl ARGS` as the member, with the IDs in its output replaced by `#`.
fn member_says(d: &Daemon, args: &[&str], id: u64) -> (Option<i32>, String) {
    let out = member::ctl(d, args);
    let text = format!("{}{}", stdout(&out), stderr(&out)).replace(&id.to_string(), "#");
    (out.status.code(), text)
}

#[test]
fn another_users_download_is_an_unknown_id_and_cannot_be_touched() {
    require_second_uid!();
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("f"), 16 * MIB, 2103);
    let d = member::builder(0).start();
    member::open_up(&d);
    // Root's download that fails with its data kept, and one that runs.
    let failed = d.get_detached("f", &server.sources(), &["--give-up-after", "2s"]);
    assert!(wait_until(Duration::from_secs(20), || d.download(failed).bytes_done > 2 * MIB));
    assert!(server.ctl(&["servers", "stop", &server.ports[0].to_string()]).status.success());
    assert_eq!(d.wait_download(failed, Duration::from_secs(30)).state, DownloadState::Failed);
    let part = d.downloads.join("f.mftpart");
    assert!(part.exists(), "the failed download kept no data");
    let running = d.get_detached("g", &[dead_port()], &["-O", "g"]);
    let sources_before = d.download(running).sources.len();
    let unknown = running + 1000;
    let other = dead_port();
    for (id, verbs) in [
        (
            running,
            vec![
                vec!["downloads", "show"],
                vec!["downloads", "pause"],
                vec!["downloads", "cancel"],
                vec!["downloads", "remove"],
                vec!["downloads", "resume"],
                vec!["downloads", "watch"],
                vec!["get", "--resume"],
                vec!["downloads", "add-source"],
            ],
        ),
        (failed, vec![vec!["downloads", "remove"], vec!["downloads", "resume"], vec!["downloads", "add-source"]]),
    ] {
        for verb in verbs {
            let ask = |x: u64| -> (Option<i32>, String) {
                let x = x.to_string();
                let mut args: Vec<&str> = verb.clone();
                args.push(&x);
                if verb.contains(&"add-source") {
                    args.push(&other);
                }
                member_says(&d, &args, x.parse().expect("id"))
            };
            let (a, b) = (ask(id), ask(unknown));
            assert_eq!(a, b, "{verb:?} of root's download {id} answers unlike an unknown ID");
            assert_ne!(a.0, Some(0), "{verb:?} of root's download succeeded: {}", a.1);
        }
    }
    // Nothing happened to root's downloads.
    let r = d.download(running);
    assert!(!r.state.is_final() && r.state != DownloadState::Paused, "{r:?}");
    assert_eq!(r.sources.len(), sources_before, "the member added a source to root's download");
    assert_eq!(d.download(failed).state, DownloadState::Failed);
    assert!(part.exists(), "the member removed root's kept partial data");
    // The member sees neither in its lists.
    let out = member::ctl(&d, &["downloads", "list"]);
    assert!(out.status.success());
    assert!(!stdout(&out).contains(&format!(" {running} ")) && !stdout(&out).contains("dead"), "{}", stdout(&out));
}

#[test]
fn the_daemon_raises_its_open_files_limit_to_the_hard_one() {
    let d = Daemon::builder(0).nofile(1024, 4096).start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
    assert!(d.log().contains("raised the open-files limit"), "{}", d.log());
}

#[test]
fn a_members_slow_requests_take_only_its_own_handler_slots() {
    require_second_uid!();
    let d = member::builder(0).start();
    member::open_up(&d);
    let hosts = StallHosts::start(1);
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(member::NOBODY), Some(member::NOBODY)).unwrap();
    // A file already at the destination: each `get` compares it with the
    // sources first, and the source never answers.
    let present = dir.path().join("x");
    std::fs::write(&present, b"already here").unwrap();
    std::os::unix::fs::chown(&present, Some(member::NOBODY), Some(member::NOBODY)).unwrap();
    let (o, from) = (dir.path().display().to_string(), hosts.addrs[0].to_string());
    let mut gets: Vec<Child> = (0..6)
        .map(|_| {
            member::command(mftd_tests::mftctl_bin())
                .arg("--socket")
                .arg(&d.socket)
                .args(["get", "x", "--from", &from, "-o", &o, "--detach"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("member's get")
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let probing = hosts.max_open.load(Ordering::SeqCst);
    // Root is not held up by them.
    let t = Instant::now();
    assert!(d.ctl(&["status"]).status.success());
    let took = t.elapsed();
    for g in &mut gets {
        let _ = g.kill();
        let _ = g.wait();
    }
    assert_eq!(probing, 4, "the member's six comparing gets ran {probing} at once, not its 4 handler slots");
    assert!(took < Duration::from_secs(1), "root's status took {took:?}");
}

#[test]
fn damaged_manifests_are_the_operators_to_see() {
    require_second_uid!();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(state.path().join("manifests")).unwrap();
    std::fs::write(state.path().join("manifests/7.json"), b"{ not a manifest").unwrap();
    let d = member::builder(0).arg("--state-dir").arg(state.path().display().to_string()).start();
    member::open_up(&d);
    assert!(!d.status().damaged_manifests.is_empty(), "root is told of the damaged manifest");
    let out = member::ctl(&d, &["--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Response = serde_json::from_str(stdout(&out).trim()).expect("status JSON");
    match status {
        Response::Status(s) => assert!(s.damaged_manifests.is_empty(), "a member sees {:?}", s.damaged_manifests),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_members_failed_downloads_with_kept_data_count_against_its_list() {
    require_second_uid!();
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("f"), 16 * MIB, 2104);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(&cfg_dir, "[quota]\nrunning_per_user = 1\nlisted_per_user = 1\n");
    let d = member::builder(0).arg("--config").arg(cfg).start();
    member::open_up(&d);
    let dir = member::nobodys_dir(d.dir.path(), "mine");
    let o = dir.display().to_string();
    let out =
        member::ctl(&d, &["get", "f", "--from", &server.sources()[0], "-o", &o, "--give-up-after", "2s", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().expect("id");
    assert!(wait_until(Duration::from_secs(20), || d.download(id).bytes_done > 2 * MIB));
    assert!(server.ctl(&["servers", "stop", &server.ports[0].to_string()]).status.success());
    assert_eq!(d.wait_download(id, Duration::from_secs(30)).state, DownloadState::Failed);
    assert!(dir.join("f.mftpart").exists(), "the failed download kept no data");
    // Its kept data holds its place in the member's list.
    let out = member::ctl(&d, &["get", "g", "--from", &dead_port(), "-o", &o, "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("[quota] listed_per_user"), "{}", stderr(&out));
    // Removing it makes room.
    assert!(member::ctl(&d, &["downloads", "remove", &id.to_string()]).status.success());
    let out = member::ctl(&d, &["get", "g", "--from", &dead_port(), "-o", &o, "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_member_names_at_most_its_quota_of_sources() {
    require_second_uid!();
    let d = member::daemon(&[]);
    let dir = member::nobodys_dir(d.dir.path(), "mine");
    let o = dir.display().to_string();
    let many: Vec<String> = (0..17).map(|_| dead_port()).collect();
    let out = member::ctl(&d, &["get", "x", "--from", &many.join(","), "-o", &o, "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("17 sources given") && stderr(&out).contains("[quota] sources_per_download"),
        "{}",
        stderr(&out)
    );
    // Sixteen are taken; one more through add-source is not.
    let out = member::ctl(&d, &["get", "x", "--from", &many[..16].join(","), "-o", &o, "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let out = member::ctl(&d, &["downloads", "add-source", &id, &many[16]]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("[quota] sources_per_download"), "{}", stderr(&out));
    // Root is held only to the daemon's 64.
    let out = d.ctl(&["get", "y", "--from", &many.join(","), "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
