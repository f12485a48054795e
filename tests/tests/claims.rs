//! README claims that no other test covered: Ctrl-C detaching, SIGINT,
//! per-listener allow lists and their reload, checkpoint settings, what is
//! at the socket path, the socket group's mode, status lines, `--host` /
//! `--ports` and how mftctl finds the socket.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadState, Event, Response};
use mftd_common::manifest::Manifest;
use mftd_common::proto::{ErrorCode, Frame};
use mftd_tests::{
    free_ports, mftctl_bin, mftd_bin, sha256_file, stderr, stdout, typed_lines, wait_until, warm, write_file, Daemon,
    Line, RawConn,
};

const MIB: u64 = 1 << 20;

fn sigint(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
}

/// `mftctl ARGS` on `d`'s socket, started (not waited for), output piped.
fn spawn_ctl(d: &Daemon, args: &[&str]) -> std::process::Child {
    Command::new(mftctl_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .env_remove("MFTD_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mftctl")
}

#[test]
fn ctrl_c_detaches_get_and_watch_and_the_download_goes_on() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("c"), 24 * MIB, 200);
    warm(&server, "c");
    let client = Daemon::start(0);
    let dl = client.downloads.to_str().expect("utf-8").to_string();
    let get = spawn_ctl(&client, &["--json", "get", "c", "--from", &server.sources()[0], "-o", &dl]);
    let started = wait_until(Duration::from_secs(10), || !client.downloads_list().is_empty());
    assert!(started);
    std::thread::sleep(Duration::from_millis(300));
    sigint(get.id());
    let out = get.wait_with_output().expect("get");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let last: Line = serde_json::from_str(stdout(&out).lines().last().expect("events")).expect("JSON");
    let Line::Event(Event::Detached { id, .. }) = last else { panic!("not detached: {last}") };
    // Still running after mftctl left.
    let a = client.download(id).bytes_done;
    assert!(wait_until(Duration::from_secs(5), || client.download(id).bytes_done > a));

    let watch = spawn_ctl(&client, &["downloads", "watch", &id.to_string(), "--interval", "0.2"]);
    std::thread::sleep(Duration::from_millis(500));
    sigint(watch.id());
    let out = watch.wait_with_output().expect("watch");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("detached; download {id} continues in mftd")), "{}", stderr(&out));
    assert_eq!(client.wait_download(id, Duration::from_secs(30)).state, DownloadState::Done);
    assert_eq!(sha256_file(&client.downloads.join("c")), sha256_file(&server.export.join("c")));
}

#[test]
fn sigint_persists_downloads_and_exits_0() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("i"), 16 * MIB, 201);
    warm(&server, "i");
    let mut client = Daemon::start(0);
    let id = client.get_detached("i", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 2 * MIB));
    let done = client.download(id).bytes_done;
    sigint(client.pid() as u32);
    let status = client.wait_exit(Duration::from_secs(10)).expect("mftd did not exit on SIGINT");
    assert_eq!(status.code(), Some(0), "{}", client.log());
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(client.dir.path().join(format!("state/manifests/{id}.json"))).expect("manifest kept"),
    )
    .expect("manifest JSON");
    let claimed: u64 = m.received.iter().map(|r| r.end - r.start).sum::<u64>()
        + m.verified.iter().map(|&(a, b)| (b - a) * (256 << 10)).sum::<u64>();
    assert!(claimed >= done, "SIGINT persisted {claimed} bytes of the {done} done before it");
}

#[test]
fn per_listener_allow_lists_refuse_others_and_follow_a_reload() {
    let ports = free_ports(2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mftd.toml");
    let config = |allowed: &str| {
        format!("ports = [{}, {}]\n[listener.{}]\nallow = [\"{allowed}\"]\n", ports[0], ports[1], ports[0])
    };
    std::fs::write(&cfg, config("127.0.0.2/32")).unwrap();
    let server = Daemon::from_config(&cfg);
    let refused = |port: u16| {
        let mut c = RawConn::connect_plain(port);
        matches!(c.recv(), Some(Frame::Error(e)) if e.code == ErrorCode::NotAllowed)
    };
    // 127.0.0.1 is not on port 0's list; port 1 has none.
    assert!(refused(ports[0]), "a listener served an address its allow list leaves out");
    RawConn::hello(ports[1]);
    // Reloaded with 127.0.0.1 on the list: served.
    std::fs::write(&cfg, config("127.0.0.0/8")).unwrap();
    server.reload();
    RawConn::hello(ports[0]);
    assert!(!refused(ports[1]));
}

/// Sum of the bytes a manifest claims (verified pieces and received ranges).
fn claimed(d: &Daemon, id: u64) -> Option<u64> {
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(d.dir.path().join(format!("state/manifests/{id}.json"))).ok()?).ok()?;
    let file = m.file?;
    let (ps, size) = (u64::from(file.piece_size), file.size);
    let verified: u64 = m.verified.iter().map(|&(a, b)| (b * ps).min(size) - a * ps).sum();
    let received: u64 = m.received.iter().map(|r| r.end - r.start).sum();
    Some(verified + received)
}

#[test]
fn checkpoint_interval_and_checkpoint_bytes_are_honoured() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("2M").start();
    write_file(&server.export.join("k"), 24 * MIB, 202);
    warm(&server, "k");
    // By bytes: an hour's interval, a checkpoint every 2 MiB.
    let client =
        Daemon::builder(0).arg("--checkpoint-interval").arg("3600").arg("--checkpoint-bytes").arg("2M").start();
    let id = client.get_detached("k", &server.sources(), &[]);
    let mut seen = std::collections::BTreeSet::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        if let Some(c) = claimed(&client, id) {
            seen.insert(c);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let steps: Vec<u64> = seen.iter().copied().collect();
    println!("by bytes: manifests claimed {steps:?}");
    assert!(steps.len() >= 4, "with checkpoint_bytes 2 MiB at 4 MiB/s, expected several checkpoints: {steps:?}");
    for w in steps.windows(2).skip(1) {
        assert!(w[1] - w[0] >= 2 * MIB - 256 * 1024, "checkpoints closer than checkpoint_bytes: {steps:?}");
        // And not much further apart: checkpoints at twice checkpoint_bytes
        // would leave twice the data unclaimed after a crash.
        assert!(w[1] - w[0] <= 3 * MIB, "checkpoints further apart than checkpoint_bytes: {steps:?}");
    }
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());

    // By time: an interval of 1 s and no byte threshold to speak of.
    let client = Daemon::builder(0).arg("--checkpoint-interval").arg("1").arg("--checkpoint-bytes").arg("1G").start();
    let id = client.get_detached("k", &server.sources(), &[]);
    let mut changes = Vec::new();
    let mut last = None;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(3500) {
        let c = claimed(&client, id);
        if c.is_some() && c != last {
            changes.push(t.elapsed());
            last = c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("by time: manifest changed at {changes:?}");
    // The first write records the file (at 0 bytes); then about one a second.
    assert!((3..=5).contains(&changes.len()), "expected a checkpoint about every second: {changes:?}");
    for w in changes.windows(2).skip(1) {
        assert!(w[1] - w[0] >= Duration::from_millis(800), "checkpoints closer than the interval: {changes:?}");
    }
}

#[test]
fn a_file_or_symlink_at_the_socket_path_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    // Bounded: a daemon that wrongly starts must fail the test, not hang it.
    let start = |socket: &std::path::Path| {
        let mut cmd = Command::new(mftd_bin());
        cmd.arg("--socket")
            .arg(socket)
            .arg("--export")
            .arg(dir.path())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--servers", "0"])
            .env("MFTD_CONFIG", "/dev/null");
        mftd_tests::output_within(&mut cmd, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("mftd started on {} instead of refusing it", socket.display()))
    };
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = start(&link);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists and is not a socket; refusing to replace it"), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink was replaced");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let out = start(&file);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists and is not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

#[test]
fn the_socket_group_gets_a_0660_socket() {
    let group = nix::unistd::Group::from_gid(65534.into()).ok().flatten().expect("group 65534");
    let d = Daemon::builder(0).arg("--socket-group").arg(group.name.as_str()).start();
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode() & 0o777);
    assert_eq!(meta.gid(), 65534);
    let plain = Daemon::start(0);
    assert_eq!(std::fs::metadata(&plain.socket).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn status_interval_logs_listener_lines() {
    let d = Daemon::builder(2).arg("--status-interval").arg("1").start();
    let t = Instant::now();
    let lines = |d: &Daemon| d.log().matches("listener status").count();
    assert!(wait_until(Duration::from_secs(5), || lines(&d) >= 4), "{}", d.log());
    // Two listeners, a line each per interval: not faster than the interval.
    assert!(t.elapsed() >= Duration::from_millis(900), "status lines came faster than every second");
    for p in &d.ports {
        assert!(d.log().contains(&format!("port={p}")), "{}", d.log());
    }
    let quiet = Daemon::start(1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lines(&quiet), 0, "status lines without --status-interval");
}

#[test]
fn host_and_ports_name_the_sources() {
    let server = Daemon::start(3);
    write_file(&server.export.join("h"), 3 * MIB, 203);
    let client = Daemon::start(0);
    let ports: Vec<String> = server.ports.iter().map(u16::to_string).collect();
    let out = client.ctl(&[
        "get",
        "h",
        "--host",
        "127.0.0.1",
        "--ports",
        &ports.join(","),
        "-o",
        client.downloads.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("h")), sha256_file(&server.export.join("h")));
    let sources: Vec<String> = client.downloads_list()[0].sources.iter().map(|s| s.address.clone()).collect();
    assert_eq!(sources, server.sources());
    // --ports without --host is a usage error.
    let out = client.ctl(&["get", "h", "--ports", &ports[0]]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn mftctl_finds_the_socket_by_flag_then_environment() {
    let a = Daemon::start(1);
    let b = Daemon::start(2);
    let servers = |cmd: &mut Command| -> usize {
        let out = cmd.args(["--json", "servers", "list"]).output().expect("mftctl");
        assert!(out.status.success(), "{}", stderr(&out));
        match typed_lines(&stdout(&out)).as_slice() {
            [Line::Response(Response::Servers { servers })] => servers.len(),
            lines => panic!("not one servers line: {lines:?}"),
        }
    };
    // MFTD_SOCKET is used when no --socket is given...
    assert_eq!(servers(Command::new(mftctl_bin()).env("MFTD_SOCKET", &a.socket)), 1);
    // ...and --socket wins over it.
    assert_eq!(servers(Command::new(mftctl_bin()).env("MFTD_SOCKET", &a.socket).arg("--socket").arg(&b.socket)), 2);
    // A socket nobody listens on is a clear error naming it.
    let out =
        Command::new(mftctl_bin()).env("MFTD_SOCKET", a.dir.path().join("none.sock")).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("none.sock"), "{}", stderr(&out));
}

#[test]
fn a_daemon_without_listeners_says_so() {
    let d = Daemon::start(0);
    let out = d.ctl(&["servers", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("no transfer listeners: this mftd serves no files"), "{}", stdout(&out));
    assert!(d.log().contains("no transfer listeners (servers = 0)"), "{}", d.log());
    let with = Daemon::start(1);
    assert!(!with.log().contains("no transfer listeners"), "{}", with.log());
}
