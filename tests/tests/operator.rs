//! What an operator sees: progress in JSON, plain and terminal modes, the
//! `servers list`/`status` schemas, metrics, config, completions, man pages.

use std::process::Command;
use std::time::Duration;

use mftd_common::control::{DownloadInfo, DownloadState, Event, Response, SourceState};
use mftd_tests::{mftctl_bin, mftd_bin, sha256_file, stderr, stdout, wait_until, write_file, Daemon, Line};

const MIB: u64 = 1 << 20;

fn capped_server(n: usize) -> Daemon {
    // Capped so the download lasts long enough for several progress updates.
    Daemon::builder(n).arg("--rate-limit").arg("4M").start()
}

#[test]
fn json_stream_has_per_source_progress_and_a_done_event_that_adds_up() {
    let server = capped_server(4);
    let size = 24 * MIB;
    write_file(&server.export.join("j"), size, 31);
    let client = Daemon::start(0);
    let (out, lines) = client.ctl_typed(&[
        "get",
        "j",
        "--from",
        &server.sources().join(","),
        "-o",
        client.downloads.to_str().unwrap(),
        "--interval",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(matches!(lines[0], Line::Response(Response::Accepted { .. })), "{:?}", lines[0]);
    let progress: Vec<&DownloadInfo> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Response(Response::Progress { download }) => Some(download),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 3, "only {} progress events", progress.len());
    // Every source shows up with progress while the download runs.
    for addr in server.sources() {
        assert!(
            progress
                .iter()
                .any(|p| p.sources.iter().any(|s| s.address == addr && s.bytes > 0 && s.state == SourceState::Active)),
            "no active progress for {addr}"
        );
        assert!(
            lines.iter().any(|l| matches!(l, Line::Event(Event::SourceState { address, .. }) if *address == addr)),
            "no source_state for {addr}"
        );
    }
    let Some(Line::Event(Event::Done(done))) = lines.last() else { panic!("no done event last: {lines:?}") };
    assert_eq!(done.size, size);
    let sum: u64 = done.sources.iter().map(|s| s.bytes).sum();
    assert_eq!(sum, size, "per-source bytes add up to the file size: {done:?}");
    assert_eq!(done.identity.as_deref().map(str::len), Some(64));
    assert_eq!(sha256_file(&client.downloads.join("j")), sha256_file(&server.export.join("j")));
}

#[test]
fn plain_mode_prints_per_source_lines() {
    let server = capped_server(4);
    write_file(&server.export.join("p"), 16 * MIB, 32);
    let client = Daemon::start(0);
    let out = client.get("p", &server.sources().join(","), &["--interval", "0.3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let progress_lines: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
    assert!(progress_lines.len() >= 2, "{text}");
    for addr in server.sources() {
        assert!(progress_lines.iter().any(|l| l.contains(&addr)), "{addr} missing from plain lines:\n{text}");
    }
    assert!(!text.contains('\x1b'), "no terminal escapes when stdout is not a terminal");
    assert!(text.contains("verified blake3:") && text.contains("AVG SPEED"), "{text}");
}

#[test]
fn live_display_in_a_pseudo_terminal_shows_sources_and_total() {
    let server = capped_server(4);
    write_file(&server.export.join("t"), 16 * MIB, 33);
    let client = Daemon::start(0);
    let cmd = format!(
        "{} --socket {} get t --from {} -o {} --interval 0.2",
        mftctl_bin().display(),
        client.socket.display(),
        server.sources().join(","),
        client.downloads.display()
    );
    // `script` runs the command in a real pty and copies what it drew.
    let out =
        Command::new("script").args(["-qfec", &cmd, "/dev/null"]).env("TERM", "xterm").output().expect("run script(1)");
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let screen = stdout(&out);
    for addr in server.sources() {
        assert!(screen.contains(&addr), "{addr} not drawn:\n{screen}");
    }
    assert!(screen.contains("total ["), "no total row:\n{screen}");
    assert!(screen.contains("eta"), "{screen}");
    assert!(screen.contains('\x1b'), "the display redraws in place on a terminal");
    assert_eq!(sha256_file(&client.downloads.join("t")), sha256_file(&server.export.join("t")));
}

#[test]
fn watch_attaches_to_a_running_download() {
    let server = capped_server(2);
    write_file(&server.export.join("w"), 12 * MIB, 34);
    let client = Daemon::start(0);
    let id = client.get_detached("w", &server.sources(), &[]);
    let (out, lines) = client.ctl_typed(&["downloads", "watch", &id.to_string(), "--interval", "0.2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Attached while it ran (a finished download would give one final
    // event): progress events of a running download, with bytes moving.
    let running: Vec<u64> = lines
        .iter()
        .filter_map(Line::progress)
        .filter(|d| matches!(d.state, DownloadState::Active | DownloadState::Starting))
        .map(|d| d.bytes_done)
        .collect();
    assert!(running.len() >= 3, "watch did not follow a running download: {lines:?}");
    assert!(running.first() < running.last(), "no progress seen while watching: {running:?}");
    assert!(*running.first().unwrap() < 12 * MIB);
    assert!(matches!(lines.last().unwrap(), Line::Event(Event::Done(_))), "{:?}", lines.last());
}

#[test]
fn servers_list_and_status_json_schemas() {
    let server = Daemon::start(2);
    // Stays raw: this test checks the JSON schema on the wire, not the types.
    let (out, lines) = server.ctl_json(&["servers", "list"]);
    assert!(out.status.success());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "servers");
    for s in lines[0]["servers"].as_array().unwrap() {
        for (k, kind) in [
            ("port", "u"),
            ("address", "s"),
            ("state", "s"),
            ("connections", "u"),
            ("total_connections", "u"),
            ("bytes_sent", "u"),
            ("rate", "u"),
            ("rate_limit", "u"),
        ] {
            let v = &s[k];
            assert!(if kind == "u" { v.is_u64() } else { v.is_string() }, "servers[].{k} should be {kind}: {s}");
        }
        assert!(["running", "stopped"].contains(&s["state"].as_str().unwrap()));
    }
    let (out, lines) = server.ctl_json(&["status"]);
    assert!(out.status.success());
    let st = &lines[0];
    assert_eq!(st["type"], "status");
    for k in ["version", "listen", "export_dir", "download_dir", "socket"] {
        assert!(st[k].is_string(), "status.{k}: {st}");
    }
    for k in ["pid", "uptime_secs"] {
        assert!(st[k].is_u64(), "status.{k}: {st}");
    }
    for k in ["listeners", "downloads", "damaged_manifests"] {
        assert!(st[k].is_array(), "status.{k}: {st}");
    }
    // Human output of stop says how many connections it closed.
    let out = server.ctl(&["servers", "stop", &server.ports[0].to_string()]);
    assert!(stdout(&out).contains("closed 0 connections"), "{}", stdout(&out));
}

#[test]
fn metrics_endpoint_moves_during_a_download() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = Daemon::builder(2)
        .arg("--rate-limit")
        .arg("4M")
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .start();
    write_file(&server.export.join("m"), 12 * MIB, 35);
    let client = Daemon::start(0);
    let scrape = |p: u16| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    };
    // A series missing from the scrape is a failure, not a 0.
    let value = |text: &str, series: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number in {line:?}"))
    };
    let has = |text: &str, series: &str| text.lines().any(|l| l.starts_with(series));
    let id = client.get_detached("m", &server.sources(), &[]);
    let series = format!("mftd_listener_bytes_sent_total{{port=\"{}\"}}", server.ports[0]);
    assert!(wait_until(Duration::from_secs(10), || {
        let m = scrape(port);
        has(&m, &series) && value(&m, &series) > 0
    }));
    let a = value(&scrape(port), &series);
    std::thread::sleep(Duration::from_millis(500));
    let m = scrape(port);
    let b = value(&m, &series);
    assert!(b > a, "listener counter did not move: {a} -> {b}");
    assert!(m.contains("# TYPE mftd_listener_bytes_sent_total counter"), "{m}");
    assert!(m.contains(&format!("mftd_listener_connections{{port=\"{}\"}}", server.ports[0])));
    // Every series the README lists, with the values that are known.
    let p0 = server.ports[0];
    assert_eq!(value(&m, &format!("mftd_listener_rate_limit_bytes{{port=\"{p0}\"}}")), 4 << 20, "{m}");
    assert_eq!(value(&m, &format!("mftd_listener_up{{port=\"{p0}\"}}")), 1, "{m}");
    assert!(value(&m, &format!("mftd_listener_connections_total{{port=\"{p0}\"}}")) >= 1, "{m}");
    assert!(value(&m, &format!("mftd_listener_connections{{port=\"{p0}\"}}")) >= 1, "{m}");
    for series in ["mftd_listener_send_rate_bytes", "mftd_uptime_seconds"] {
        assert!(m.lines().any(|l| l.starts_with(series)), "{series} missing: {m}");
    }
    client.wait_download(id, Duration::from_secs(20));

    // The downloading side exports per-download, per-source series, by
    // download ID and source position (names only with metrics_labels =
    // "full": see metrics_name_no_file_or_source_unless_told_to).
    let cport = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client2 = Daemon::builder(0).arg("--metrics-listen").arg(format!("127.0.0.1:{cport}")).start();
    let id2 = client2.get_detached("m", &server.sources(), &[]);
    let src = format!("mftd_download_source_bytes_received_total{{id=\"{id2}\",source_index=\"0\"}}");
    assert!(wait_until(Duration::from_secs(10), || {
        let m = scrape(cport);
        has(&m, &src) && value(&m, &src) > 0
    }));
    let x = value(&scrape(cport), &src);
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(cport);
    assert!(value(&text, &src) > x, "source counter did not move");
    assert!(text.contains(&format!("mftd_download_state{{id=\"{id2}\",state=\"active\"}} 1")), "{text}");
    assert_eq!(value(&text, &format!("mftd_download_size_bytes{{id=\"{id2}\"}}")), 12 * MIB);
    assert!(value(&text, &format!("mftd_download_bytes_done{{id=\"{id2}\"}}")) > 0);
    let s0 = "source_index=\"0\"";
    assert_eq!(value(&text, &format!("mftd_download_source_up{{id=\"{id2}\",{s0}}}")), 1, "{text}");
    assert_eq!(value(&text, &format!("mftd_download_source_strikes_total{{id=\"{id2}\",{s0}}}")), 0);
    for series in ["mftd_download_speed_bytes", "mftd_download_source_speed_bytes", "mftd_uptime_seconds"] {
        assert!(text.lines().any(|l| l.starts_with(series)), "{series} missing: {text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("mftd_download_source_strikes_total{{id=\"{id2}\"")) && l.ends_with(" 0")),
        "{text}"
    );
    // Anything else is a 404, and the daemon keeps serving.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", cport)).unwrap();
    s.write_all(b"GET /../../etc/passwd HTTP/1.1\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 404"));
    client2.wait_download(id2, Duration::from_secs(20));
}

/// The body of `GET /metrics` on `port`.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// Anyone who can connect reads the metrics, so by default they tell which
/// downloads run by ID only: not what file, from where, or to where.
#[test]
fn metrics_name_no_file_or_source_unless_told_to() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("1M").start();
    std::fs::create_dir(server.export.join("hr")).unwrap();
    write_file(&server.export.join("hr/layoffs-2027.xlsx"), 8 * MIB, 36);
    let from = server.sources()[0].clone();
    let secret = ["layoffs", "hr/", &from];
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let port = free_port();
    let quiet = Daemon::builder(0).arg("--metrics-listen").arg(format!("127.0.0.1:{port}")).start();
    let id = quiet.get_detached("hr/layoffs-2027.xlsx", &server.sources(), &[]);
    let series = format!("mftd_download_source_bytes_received_total{{id=\"{id}\",source_index=\"0\"}}");
    assert!(wait_until(Duration::from_secs(10), || scrape(port).contains(&series)), "{}", scrape(port));
    let text = scrape(port);
    for word in secret.iter().chain([&quiet.downloads.to_str().unwrap()]) {
        assert!(!text.contains(word), "the default metrics name {word:?}:\n{text}");
    }
    assert!(text.contains(&format!("mftd_download_bytes_done{{id=\"{id}\"}}")), "{text}");

    // The operator may ask for the names, in the config file.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mftd.toml");
    let port = free_port();
    std::fs::write(&cfg, format!("metrics_listen = \"127.0.0.1:{port}\"\nmetrics_labels = \"full\"\n")).unwrap();
    let told = Daemon::builder(0).arg("--config").arg(cfg.to_str().unwrap()).start();
    let id = told.get_detached("hr/layoffs-2027.xlsx", &server.sources(), &[]);
    let series = format!("mftd_download_source_bytes_received_total{{id=\"{id}\",source=\"{from}\"}}");
    assert!(wait_until(Duration::from_secs(10), || scrape(port).contains(&series)), "{}", scrape(port));
    let text = scrape(port);
    assert!(text.contains(&format!("mftd_download_bytes_done{{id=\"{id}\",path=\"hr/layoffs-2027.xlsx\"}}")), "{text}");
    let printed =
        Command::new(mftd_bin()).args(["--config", cfg.to_str().unwrap(), "--print-config"]).output().unwrap();
    assert!(stdout(&printed).contains("metrics_labels = \"full\"  # config file"), "{}", stdout(&printed));
}

#[test]
fn print_config_shows_origins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mftd.toml");
    std::fs::write(&cfg, "ports = [7001, 7002]\nrate_limit = \"20M\"\nmetrics_listen = \"127.0.0.1:9105\"\n\n[listener.7002]\nrate_limit = \"1M\"\n").unwrap();
    let out = Command::new(mftd_bin())
        .args(["--config", cfg.to_str().unwrap(), "--rate-limit", "5M", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ports = [7001, 7002]  # config file"), "{text}");
    assert!(text.contains(&format!("rate_limit = {}  # flag", 5 * MIB)), "{text}");
    assert!(text.contains("idle_timeout = 10  # default"), "{text}");
    assert!(text.contains("metrics_listen = \"127.0.0.1:9105\"  # config file"), "{text}");
    assert!(text.contains("[listener.7002]"), "{text}");
    // A config with a typo is an error that names the file.
    std::fs::write(&cfg, "prots = [1]\n").unwrap();
    let out = Command::new(mftd_bin()).args(["--config", cfg.to_str().unwrap(), "--print-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(cfg.to_str().unwrap()), "{}", stderr(&out));
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(mftctl_bin()).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = stdout(&out);
        assert!(text.contains("servers") && text.contains("downloads"), "{shell}: {text}");
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(Command::new(mftctl_bin()).arg("manpages").arg(dir.path()).status().unwrap().success());
    assert!(Command::new(mftd_bin()).arg("--manpage").arg(dir.path()).status().unwrap().success());
    let ctl = std::fs::read_to_string(dir.path().join("mftctl.1")).unwrap();
    assert!(ctl.contains(".TH mftctl"), "{ctl}");
    let d = std::fs::read_to_string(dir.path().join("mftd.8")).unwrap();
    assert!(d.contains("rate\\-limit"), "{d}");
    assert!(dir.path().join("mftctl-get.1").exists());
}

#[test]
fn errors_say_what_to_do() {
    // Port taken by another program: name it.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(mftd_bin())
        .args(["--ports", &port, "--export"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path().join("s"))
        .arg("--socket")
        .arg(dir.path().join("sock"))
        .env("MFTD_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("already in use by") && err.contains("(pid"), "{err}");
}

#[test]
fn messages_say_what_happened_in_words() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    std::fs::create_dir(server.export.join("adir")).unwrap();
    write_file(&server.export.join("f"), 16 << 20, 90);
    let client = Daemon::start(0);
    // A directory as the remote path: said in words, not as a code.
    let out = client.get("adir", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out) + &stderr(&out);
    assert!(text.contains("\"adir\": not a regular file (a directory"), "{text}");
    assert!(!text.contains("not_regular"), "{text}");

    // A relative -o is shown normalised.
    let cwd = client.dir.path();
    let out = Command::new(mftctl_bin())
        .current_dir(cwd)
        .arg("--socket")
        .arg(&client.socket)
        .args(["get", "f", "--from", &server.sources()[0], "-o", "./here/./sub", "--detach"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().unwrap();
    let d = client.download(id);
    assert_eq!(d.destination, cwd.join("here/sub/f").display().to_string());

    // Paused: no speed, no ETA, at once.
    assert!(wait_until(Duration::from_secs(20), || client.download(id).speed > 0));
    assert!(client.ctl(&["downloads", "pause", &id.to_string()]).status.success());
    let d = client.download(id);
    assert_eq!(d.state, DownloadState::Paused);
    assert_eq!(d.speed, 0, "a paused download shows its old speed: {d:?}");
    assert!(d.eta_secs.is_none(), "a paused download shows an ETA: {d:?}");
    assert!(d.sources.iter().all(|s| s.speed == 0), "{d:?}");

    // Cancelled: the reason says who and what happened.
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());
    let d = client.download(id);
    assert_eq!(d.state, DownloadState::Cancelled);
    let why = d.error.as_deref().unwrap_or_default();
    assert!(why.starts_with("cancelled by ") && why.contains("partial file was removed"), "{d:?}");

    // Out-of-range connection counts and --json completions are usage errors.
    let out = client.get("f", &server.sources()[0], &["--connections-per-server", "17"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = client.ctl(&["--json", "completions", "bash"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--json does not apply"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("complete"), "a shell script went to a --json stdout");
}

#[test]
fn config_mistakes_are_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &str, extra: &[&str]| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, config).unwrap();
        Command::new(mftd_bin())
            .args(["--state-dir"])
            .arg(dir.path().join("s"))
            .arg("--socket")
            .arg(dir.path().join("sock"))
            .arg("--config")
            .arg(&cfg)
            .args(extra)
            .output()
            .unwrap()
    };
    // A [listener.P] section for a port mftd does not listen on.
    let exp = dir.path().join("exp");
    std::fs::create_dir(&exp).unwrap();
    let out = run(
        &format!("export = {:?}\nports = [0]\n[listener.5999]\nrate_limit = \"1M\"\n", exp.display().to_string()),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("[listener.5999] is for port 5999, which is not one of the listener ports (0)"),
        "{}",
        stderr(&out)
    );
    // A mistyped --export is not created.
    let typo = dir.path().join("exprot");
    let out = run("", &["--export", typo.to_str().unwrap(), "--ports", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!typo.exists(), "a mistyped export directory was created");
    // With a busy port too, the export is what is said: it is checked
    // before any port is bound, so the first error read is the one to fix.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = run("", &["--export", typo.to_str().unwrap(), "--ports", &port]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist") && !stderr(&out).contains("in use"), "{}", stderr(&out));
    let out = run("", &["--export", exp.to_str().unwrap(), "--ports", &port]);
    assert!(stderr(&out).contains(&format!("port {port} is already in use")), "{}", stderr(&out));
}
