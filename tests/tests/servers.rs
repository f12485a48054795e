//! Listener management through `mftctl servers ...`.

use std::net::TcpStream;
use std::time::Duration;

use mftd_common::control::ListenerState;
use mftd_tests::{sha256_file, stderr, stdout, write_file, Daemon};

#[test]
fn list_shows_state_and_bytes_sent() {
    let server = Daemon::start(3);
    let client = Daemon::start(0);
    write_file(&server.export.join("a"), 2 << 20, 3);
    let servers = server.servers();
    assert_eq!(servers.len(), 3);
    for s in &servers {
        assert_eq!(s.state, ListenerState::Running);
        assert_eq!(s.bytes_sent, 0);
        assert_eq!(s.rate_limit, 0);
    }
    let out = client.get("a", &server.sources()[0], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sent: Vec<u64> = server.servers().iter().map(|s| s.bytes_sent).collect();
    assert_eq!(sent[0], 2 << 20, "{sent:?}");
    assert_eq!(sent[1] + sent[2], 0, "{sent:?}");
    let table = stdout(&server.ctl(&["servers", "list"]));
    assert!(table.contains("PORT") && table.contains("2.0 MiB"), "{table}");
}

#[test]
fn stop_refuses_connections_and_start_reopens() {
    let server = Daemon::start(2);
    let port = server.ports[1];
    let out = server.ctl(&["servers", "stop", &port.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("stopped listener {port}")), "{}", stdout(&out));
    // Give the accept loop a moment to drop the socket.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused, "port {port} still accepts connections after stop");
    let st = server.listener(port);
    assert_eq!(st.state, ListenerState::Stopped);

    // Stopping twice and unknown ports are clear errors.
    let out = server.ctl(&["servers", "stop", &port.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already stopped"), "{}", stderr(&out));
    let out = server.ctl(&["servers", "stop", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no listener on port 1"), "{}", stderr(&out));

    let out = server.ctl(&["servers", "start", &port.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "port {port} not reopened");
    write_file(&server.export.join("b"), 300_000, 4);
    let client = Daemon::start(0);
    let out = client.get("b", &format!("127.0.0.1:{port}"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("b")), sha256_file(&server.export.join("b")));
}

#[test]
fn add_and_limit_listeners() {
    let server = Daemon::start(1);
    let (out, lines) = server.ctl_typed(&["servers", "add", "--rate-limit", "800K"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(lines[0].ok_message().contains("added listener"));
    let servers = server.servers();
    assert_eq!(servers.len(), 2);
    let added = servers.iter().find(|s| s.port != server.ports[0]).unwrap();
    assert_eq!(added.rate_limit, 800 * 1024);
    let p = added.port.to_string();
    let out = server.ctl(&["servers", "limit", &p, "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let added = server.listener(added.port);
    assert_eq!(added.rate_limit, 0);
    // Adding a port that is taken names the port.
    let out = server.ctl(&["servers", "add", "--port", &server.ports[0].to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&server.ports[0].to_string()), "{}", stderr(&out));
    let out = server.ctl(&["servers", "limit", &p, "fast"]);
    assert_eq!(out.status.code(), Some(2), "bad RATE is a usage error");
}

#[test]
fn remove_forgets_a_listener_and_runtime_changes_last_until_reload() {
    // Fixed ports: a reload matches listeners to the configured ports.
    let free = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let server = Daemon::builder(2).arg("--ports").arg(format!("{},{}", free(), free())).start();
    let (out, lines) = server.ctl_typed(&["servers", "add"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let msg = lines[0].ok_message();
    assert!(msg.contains("until mftd restarts or reloads its configuration"), "{msg}");
    let ports = |d: &Daemon| {
        let mut v: Vec<u64> = d.servers().iter().map(|s| u64::from(s.port)).collect();
        v.sort();
        v
    };
    assert_eq!(ports(&server).len(), 3);

    let gone = server.ports[1];
    let out = server.ctl(&["servers", "remove", &gone.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("removed listener {gone}")), "{}", stdout(&out));
    assert!(!ports(&server).contains(&(gone as u64)), "removed listener still listed");
    let refused = mftd_tests::wait_until(Duration::from_secs(5), || {
        TcpStream::connect_timeout(&([127, 0, 0, 1], gone).into(), Duration::from_millis(200)).is_err()
    });
    assert!(refused, "port {gone} still accepts connections after remove");
    let out = server.ctl(&["servers", "remove", &gone.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("no listener on port {gone}")), "{}", stderr(&out));

    // A reload brings back the configured set, as the replies said.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid()), nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let mut want: Vec<u64> = server.ports.iter().map(|p| *p as u64).collect();
    want.sort();
    let back = mftd_tests::wait_until(Duration::from_secs(10), || ports(&server) == want);
    assert!(back, "after a reload the listeners are {:?}, not the configured {want:?}", ports(&server));
}
