//! The control socket and the daemon lifecycle.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use mftd_common::control::{ErrorCode, Response};
use mftd_tests::{mftctl_bin, stderr, stdout, typed_lines, Daemon};

/// Sends `line` on a new connection (no hello) and returns the code and
/// message of the error it gets; panics on any other response.
fn raw_request(d: &Daemon, line: &[u8]) -> (ErrorCode, String) {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // mftd may answer and close before reading all of an over-long line.
    let _ = s.write_all(line);
    let mut r = BufReader::new(s);
    let mut resp = String::new();
    r.read_line(&mut resp).unwrap();
    match serde_json::from_str(&resp).unwrap_or_else(|e| panic!("bad reply {resp:?}: {e}")) {
        Response::Error { code, message } => (code, message),
        other => panic!("not an error: {other:?}"),
    }
}

#[test]
fn malformed_requests_get_errors_and_daemon_keeps_serving() {
    let d = Daemon::start(1);
    for bad in [
        &b"this is not json\n"[..],
        b"{\"type\":\"nope\"}\n",
        b"{\"type\":\"server_stop\",\"port\":99999}\n",
        b"[1,2,3]\n",
        b"\xff\xfe\n",
    ] {
        let v = raw_request(&d, bad);
        assert_eq!(v.0, ErrorCode::BadRequest, "{v:?}");
    }
    // Same connection keeps working after an error.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"garbage\n{\"type\":\"servers_list\"}\n").unwrap();
    let mut r = BufReader::new(s);
    let mut l1 = String::new();
    let mut l2 = String::new();
    r.read_line(&mut l1).unwrap();
    r.read_line(&mut l2).unwrap();
    assert!(l1.contains("\"error\""), "{l1}");
    assert!(l2.contains("\"servers\""), "{l2}");
    // An over-long line is refused without killing the daemon.
    let mut big = vec![b'x'; mftd_common::control::MAX_REQUEST + 10];
    big.push(b'\n');
    let (code, _) = raw_request(&d, &big);
    assert_eq!(code, ErrorCode::LineTooLong);
    // A version mismatch names both versions.
    let (code, message) = raw_request(&d, b"{\"type\":\"hello\",\"protocol\":99,\"client\":\"x\"}\n");
    assert_eq!(code, ErrorCode::VersionMismatch);
    assert!(message.contains("99"));
    assert!(d.ctl(&["status"]).status.success());
}

#[test]
fn second_daemon_on_same_socket_refuses() {
    let d = Daemon::start(1);
    let out = d.command(1, &[]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("another mftd is already running"), "{err}");
    assert!(d.ctl(&["status"]).status.success(), "first daemon still serves");
}

#[test]
fn stale_socket_is_replaced_and_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start(1);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // SIGKILL leaves a stale socket file behind; the next start must cope.
    d.kill();
    assert!(d.socket.exists());
    let mut cmd = d.command(1, &[]);
    let child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    d.child = Some(child);
    d.wait_ready();
    assert!(d.ctl(&["status"]).status.success());
}

#[test]
fn sigterm_and_shutdown_exit_zero() {
    let mut d = Daemon::start(2);
    let st = d.terminate(Duration::from_secs(5)).expect("mftd exits within 5 s of SIGTERM");
    assert!(st.success(), "exit status {st}");
    assert!(!d.socket.exists(), "socket unlinked on exit");

    let mut d = Daemon::start(1);
    let out = d.ctl(&["shutdown"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = d.wait_exit(Duration::from_secs(5)).expect("mftd exits after shutdown");
    assert!(st.success(), "exit status {st}");
}

#[test]
fn ctl_without_daemon_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nope.sock");
    let out = Command::new(mftctl_bin()).arg("--socket").arg(&sock).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("mftd is not running") && err.contains("systemctl start mftd"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    // --json still prints only JSON on stdout.
    let out = Command::new(mftctl_bin()).arg("--socket").arg(&sock).arg("--json").arg("status").output().unwrap();
    let lines = typed_lines(&stdout(&out));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0].command_error().0, "not_running");
}

#[test]
fn port_in_use_is_a_clear_startup_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(mftd_tests::mftd_bin())
        .args(["--ports", &port, "--export"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("s"))
        .env("MFTD_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("port {port} is already in use")), "{}", stderr(&out));
}

/// An export directory that was named and is missing (a typo, a disk not
/// mounted) is an error at start, not an empty directory served as if
/// nothing were wrong.
#[test]
fn a_named_export_directory_that_is_missing_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-mounted");
    let mut cmd = Command::new(mftd_tests::mftd_bin());
    cmd.args(["--ports", "0", "--export"])
        .arg(&missing)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("s"))
        .env("MFTD_CONFIG", "/dev/null");
    let out = exits_soon(cmd);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!missing.exists(), "created the missing export directory");
}

/// The socket never goes into a directory someone else could swap it out
/// of (like a `/tmp/mftd-UID` another user created first).
#[test]
fn a_socket_directory_controlled_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("mftd-run");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = Command::new(mftd_tests::mftd_bin());
    cmd.args(["--ports", "0", "--export"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(shared.join("mftd.sock"))
        .env("MFTD_CONFIG", "/dev/null");
    let out = exits_soon(cmd);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("writable by others"), "{}", stderr(&out));
    assert!(!shared.join("mftd.sock").exists());
}

/// Runs a daemon that is expected to refuse to start; panics (after
/// stopping it) if it is still running after 10 s.
fn exits_soon(mut cmd: Command) -> std::process::Output {
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn mftd");
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!("mftd started instead of refusing: {}", String::from_utf8_lossy(&out.stderr));
}

/// Bad usage exits 2 with a sentence that says what to do (failures exit 1),
/// as the README says; `get NAME --resume` is refused instead of ignoring
/// NAME.
#[test]
fn usage_errors_exit_2_with_a_sentence() {
    let d = Daemon::start(0);
    for (args, says) in [
        (&["get", "big.iso", "--resume", "3"][..], "--resume continues downloads by ID"),
        (&["get", "big.iso"][..], "no sources"),
        (&["get", "big.iso", "--from", "127.0.0.1:1", "--interval", "0"][..], "more than 0"),
        (&["downloads", "watch", "1", "--interval", "0"][..], "more than 0"),
        // A typo'd rate is refused, not taken as a huge limit.
        (&["servers", "limit", "5001", "99999999G"][..], "more than 1 PiB"),
    ] {
        let out = d.ctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // A failure (not usage) still exits 1.
    let out = d.ctl(&["downloads", "show", "999"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}
