//! Logging never stops the daemon: with stderr closed under it (`mftd 2>&1 |
//! head -1`) or a pipe nobody reads, it keeps serving and shuts down.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use mftd_tests::{sha256_file, stderr, write_file, Daemon};

/// Restarts `d` (a daemon without listeners) with `extra` flags and the
/// given stdout and stderr, and waits until it answers.
fn restart_with(d: &mut Daemon, extra: &[&str], out: Stdio, err: Stdio) {
    d.kill();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let mut cmd = d.command(0, &extra);
    cmd.stdout(out).stderr(err);
    d.child = Some(cmd.spawn().expect("spawn mftd"));
    d.wait_ready();
}

/// Downloads `name` from `server` through `client`, within a deadline.
fn download(server: &Daemon, client: &Daemon, name: &str) {
    let out = client.ctl_within(
        Duration::from_secs(60),
        &["get", name, "--from", &server.sources()[0], "-o", client.downloads.to_str().unwrap()],
    );
    assert!(out.status.success(), "get failed: {}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join(name)), sha256_file(&server.export.join(name)));
}

#[test]
fn closed_stderr_keeps_serving_and_shuts_down() {
    let server = Daemon::start(1);
    write_file(&server.export.join("a.bin"), 8 << 20, 1);
    let mut client = Daemon::start(0);

    // As `mftd 2>&1 | head -1`: one line is read, then the pipe is closed.
    let (reader, writer) = std::io::pipe().expect("pipe");
    let out = writer.try_clone().expect("dup pipe");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = BufReader::new(reader).read_line(&mut first);
        let _ = tx.send(first);
    });
    restart_with(&mut client, &[], out.into(), writer.into());
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("mftd logged a first line");
    assert!(!first.is_empty(), "stderr closed before any line");

    // Every later log line meets EPIPE, and SIGPIPE does not end mftd.
    kill(Pid::from_raw(client.pid()), Signal::SIGPIPE).expect("SIGPIPE");
    download(&server, &client, "a.bin");
    assert!(client.ctl_within(Duration::from_secs(5), &["status"]).status.success());

    let out = client.ctl_within(Duration::from_secs(5), &["shutdown"]);
    assert!(out.status.success(), "shutdown: {}", stderr(&out));
    let st = client.wait_exit(Duration::from_secs(8)).expect("mftd exits after shutdown with stderr closed");
    assert_eq!(st.code(), Some(0), "{st}");
}

#[test]
fn full_stderr_blocks_nothing() {
    let server = Daemon::start(1);
    write_file(&server.export.join("b.bin"), 16 << 20, 2);
    let mut client = Daemon::start(0);

    // A pipe of one page that nobody reads; the read end stays open.
    let (reader, writer) = std::io::pipe().expect("pipe");
    // SAFETY: fcntl on a pipe this test owns, with plain integers.
    let capacity = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(capacity > 0, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
    restart_with(&mut client, &["-vv"], Stdio::null(), writer.into());

    download(&server, &client, "b.bin");
    for _ in 0..50 {
        assert!(client.ctl_within(Duration::from_secs(5), &["status"]).status.success());
    }
    let st = client.terminate(Duration::from_secs(8)).expect("mftd exits on SIGTERM with stderr full");
    assert_eq!(st.code(), Some(0), "{st}");

    // The pipe holds the first lines but not the last: the daemon's
    // logging was stuck on it all along, and did not hold anything up.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut { reader }, &mut text).expect("read the pipe");
    assert!(text.contains("node identity"), "{text}");
    assert!(!text.contains("mftd stopped"), "stderr was never full, so this test proves nothing: {text}");
}
