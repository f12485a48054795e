//! Attacks on a shared daemon that the limits of "one daemon, many local
//! users" did not stop, played with a real second uid (65534 through
//! `setpriv`) against a real root daemon. Each test states what an
//! operator must be able to rely on; those marked `#[ignore = "finding:
//! ..."]` fail on the code they were written against.

use std::process::Output;
use std::time::{Duration, Instant};

use mftd_common::control::DownloadState;
use mftd_tests::member::{self, nobodys_dir};
use mftd_tests::{mftctl_bin, require_second_uid, stderr, stdout};

fn text(o: &Output) -> String {
    let all = format!("{}{}", stdout(o), stderr(o));
    // Answers that failed to parse quote the whole answer: keep it short.
    all.chars().take(600).collect()
}

/// Sixteen sources on loopback addresses nobody listens on (port 1).
fn dead_sources() -> String {
    (2..18).map(|k| format!("127.0.0.{k}:1")).collect::<Vec<_>>().join(",")
}

/// A member's `-o` directory named with a newline and terminal controls
/// must not end up in the daemon's log as it is: that would be a second,
/// forged log line, and escape sequences for whoever reads the log on a
/// terminal (`mftd` in the foreground, `tail -f`, a log file). Under
/// systemd, journald would split the newline into an entry of its own.
#[test]
fn a_members_directory_name_cannot_forge_log_lines_or_drive_a_terminal() {
    require_second_uid!();
    let d = member::builder(1).start();
    member::open_up(&d);
    mftd_tests::write_file(&d.export.join("f.bin"), 1000, 1);
    const FORGED: &str = "2026-01-01T00:00:00.000000Z  WARN mftd: forged by a member";
    let name = format!("x\n{FORGED}\x1b]0;owned\x07\x1b[2J");
    let dir = nobodys_dir(d.dir.path(), &name);
    let from = format!("127.0.0.1:{}", d.ports[0]);
    let out = member::ctl(&d, &["get", "f.bin", "--from", &from, "-o", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // "download complete dest=..." is logged as the download ends.
    std::thread::sleep(Duration::from_millis(500));
    let log = d.log();
    assert!(log.contains("download complete"), "{log}");
    let forged = log.lines().any(|l| l.starts_with(FORGED));
    let controls = log.bytes().any(|b| b == 0x1b || b == 0x07);
    assert!(
        !forged && !controls,
        "the member wrote into root's log (forged line: {forged}, controls: {controls}):\n{log:?}"
    );
}

/// Ended downloads stay listed for `retention` (an hour). Were they
/// counted by no quota, a member that starts and cancels 400 downloads
/// (five seconds of work) would make root's `status` and `downloads list`
/// answers longer than mftctl reads (1 MiB): root could no longer see the
/// daemon, and kept up, the list (and the daemon's memory) would grow by
/// thousands of entries a minute. A member keeps `listed_per_user` ended
/// downloads at most.
#[test]
fn a_members_ended_downloads_do_not_lock_root_out_of_status() {
    require_second_uid!();
    let d = member::daemon(&[]);
    let dir = nobodys_dir(d.dir.path(), "out");
    let ctl = format!("{} --socket {}", mftctl_bin().display(), d.socket.display());
    let script = format!(
        "i=0; while [ $i -lt 400 ]; do i=$((i+1)); \
         id=$({ctl} get f.bin --from {src} -O f$i -o {dir} --detach) || exit 1; \
         {ctl} downloads cancel $id >/dev/null || exit 1; done",
        src = dead_sources(),
        dir = dir.display()
    );
    let started = Instant::now();
    let out = member::command("sh").arg("-c").arg(&script).output().expect("run sh as the member");
    assert!(out.status.success(), "the member's loop failed: {}", text(&out));
    eprintln!("400 downloads started and cancelled by the member in {:?}", started.elapsed());
    for args in [&["status"][..], &["downloads", "list"], &["--json", "downloads", "list"]] {
        let out = d.ctl(args);
        assert!(out.status.success(), "root's {args:?} fails after a member's 400 cancelled downloads: {}", text(&out));
    }
    let listed = d.downloads_list();
    assert!(listed.len() <= 64, "{} of the member's ended downloads kept", listed.len());
    assert!(listed.iter().any(|x| x.id == 400), "the member's latest download is gone");
}

/// Any local user (no group needed: TCP) binds any of 127.0.0.0/8's
/// sixteen million addresses. The per-address cap (16) and handshake rate
/// then hold nothing: from four loopback addresses it holds a listener's
/// every connection (64) with sockets that never speak, reconnecting as the
/// handshake timeout closes them; until a full listener made room, every
/// other client, remote ones included, was refused.
#[test]
fn a_local_user_on_many_loopback_addresses_cannot_hold_a_whole_listener() {
    let d = mftd_tests::Daemon::start(1);
    let port = d.ports[0];
    assert!(!mftd_tests::refused_busy(port), "refused before any flood");
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    let end = Instant::now() + Duration::from_secs(6);
    let (mut tries, mut refused) = (0, 0);
    while Instant::now() < end {
        // Keep 16 from each of 127.0.0.2..5 (the handshake timeout, 10 s,
        // closes them; a closed one is replaced).
        held.retain(|s| {
            let mut b = [0u8; 1];
            s.set_nonblocking(true).unwrap();
            let alive =
                matches!(std::io::Read::read(&mut &*s, &mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            alive
        });
        for k in 2..6 {
            for _ in 0..(16
                - held.iter().filter(|s| s.local_addr().unwrap().ip().to_string() == format!("127.0.0.{k}")).count())
            {
                if let Some(s) = mftd_tests::connect_from(&format!("127.0.0.{k}"), port) {
                    held.push(s);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        tries += 1;
        refused += usize::from(mftd_tests::refused_busy(port));
    }
    eprintln!("{refused} of {tries} connections from 127.0.0.1 refused while the flood held {} sockets", held.len());
    assert!(refused * 2 < tries, "{refused} of {tries} connections of another client refused");
}

/// `running_per_user` is checked when a `get` arrives and the download is
/// added after the output directory has been checked: a member whose
/// four handler slots run `get`s at once (into a deep directory, whose
/// every step is checked) passes the check four times before any is added, and runs more downloads than its quota (several
/// members together eat into the slots kept for operators the same way).
#[test]
fn a_members_concurrent_gets_stay_within_its_running_quota() {
    require_second_uid!();
    let d = member::daemon(&[]);
    let dir = nobodys_dir(d.dir.path(), "out");
    let ctl = format!("{} --socket {}", mftctl_bin().display(), d.socket.display());
    // A deep directory: each `get` spends longer checking the way to it,
    // between its quota check and its download being added.
    let deep = dir.join("a/".repeat(900));
    let get = format!("{ctl} get f.bin --from 127.0.0.2:1 -o {} --detach", deep.display());
    let script = format!(
        "mkdir -p {} || exit 1; i=0; while [ $i -lt 12 ]; do i=$((i+1)); {get} -O a$i >/dev/null || exit 1; done; \
         i=0; while [ $i -lt 12 ]; do i=$((i+1)); {get} -O b$i >/dev/null 2>&1 & done; wait",
        deep.display()
    );
    let out = member::command("sh").arg("-c").arg(&script).output().expect("run sh as the member");
    assert!(out.status.success(), "{}", text(&out));
    let running = d.downloads_list().iter().filter(|x| !x.state.is_final() && x.state != DownloadState::Paused).count();
    assert!(running <= 16, "the member runs {running} downloads; running_per_user is 16");
}
