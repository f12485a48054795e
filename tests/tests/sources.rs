//! Changing a download's sources: the same `get` again with other sources,
//! and `downloads add-source`, on waiting, running and paused downloads.

use std::time::Duration;

use mftd_common::control::{DownloadInfo, DownloadState, Event, Response, SourceInfo, SourceState};
use mftd_tests::{dead_port, sha256_file, stderr, stdout, typed_lines, wait_until, warm, write_file, Daemon, Line};

const MIB: u64 = 1 << 20;

fn json_lines(out: &std::process::Output) -> Vec<Line> {
    typed_lines(&stdout(out))
}

/// Whether a line of a followed download shows it paused (a `progress`
/// in state `paused`).
fn shows_paused(l: &Line) -> bool {
    l.progress().is_some_and(|d| d.state == DownloadState::Paused)
}

/// Waits until the only source of download `id` says why it cannot be reached.
fn wait_refused(client: &Daemon, id: u64) {
    let ok = wait_until(Duration::from_secs(10), || {
        client.download(id).sources.first().and_then(|s| s.last_error.as_deref()).is_some_and(|e| e.contains("refused"))
    });
    assert!(ok, "the dead source never reported its error: {:?}", client.download(id));
}

#[test]
fn the_same_get_with_the_right_ports_adds_them_to_the_waiting_download() {
    let server = Daemon::start(2);
    write_file(&server.export.join("t"), 8 * MIB, 140);
    let client = Daemon::start(0);
    let typo = dead_port();
    // The first attempt names a port nothing listens on, and is left behind
    // (as after Ctrl-C): it waits for its source.
    let id = client.get_detached("t", std::slice::from_ref(&typo), &[]);
    wait_refused(&client, id);
    let dl_dir = client.downloads.to_str().expect("utf-8").to_string();
    let right = server.sources().join(",");

    // --no-resume cannot apply to a download that keeps resume state.
    let out = client.ctl(&["get", "t", "--from", &right, "-o", &dl_dir, "--no-resume"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains(&format!("download {id} is already writing")), "{}", stderr(&out));
    assert!(stderr(&out).contains("--no-resume"), "{}", stderr(&out));
    assert_eq!(client.download(id).sources.len(), 1);

    // The same get with the right ports continues that download with them.
    let out = client.ctl_within(Duration::from_secs(60), &["--json", "get", "t", "--from", &right, "-o", &dl_dir]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), client.log());
    let lines = json_lines(&out);
    let Line::Response(Response::Accepted { id: accepted, resumed, added_sources, .. }) = &lines[0] else {
        panic!("not accepted: {}", lines[0])
    };
    assert_eq!(*accepted, id);
    assert!(*resumed);
    assert_eq!(*added_sources, server.sources());
    let last = lines.last().expect("a terminal event");
    assert!(matches!(last, Line::Event(Event::Done(_))), "{last}");
    // No run in between was reported as paused: the stream followed the
    // new run.
    assert!(lines.iter().all(|l| !shows_paused(l) && !matches!(l, Line::Event(Event::Paused { .. }))), "{lines:?}");
    assert_eq!(sha256_file(&client.downloads.join("t")), sha256_file(&server.export.join("t")));
    let d = client.download(id);
    let addrs: Vec<&str> = d.sources.iter().map(|s| s.address.as_str()).collect();
    assert_eq!(addrs, [typo.as_str(), server.sources()[0].as_str(), server.sources()[1].as_str()]);
    assert!(server.bytes_sent(server.ports[0]) > 0 && server.bytes_sent(server.ports[1]) > 0);

    // Human output says what was added.
    write_file(&server.export.join("u"), MIB, 141);
    let id2 = client.get_detached("u", std::slice::from_ref(&typo), &[]);
    wait_refused(&client, id2);
    let out = client.ctl_within(Duration::from_secs(60), &["get", "u", "--from", &right, "-o", &dl_dir, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("continuing download {id2}")), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("added to download {id2}: {}", server.sources().join(", "))),
        "{}",
        stderr(&out)
    );
}

#[test]
fn add_source_joins_a_running_download_and_watchers_follow() {
    // One slow source; a second, added mid-download, takes a share.
    let server = Daemon::builder(2).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("r"), 24 * MIB, 142);
    warm(&server, "r");
    let client = Daemon::start(0);
    let first = vec![server.sources()[0].clone()];
    let id = client.get_detached("r", &first, &[]);
    assert!(wait_until(Duration::from_secs(20), || client.download(id).bytes_done > 2 * MIB));
    let watch = std::process::Command::new(mftd_tests::mftctl_bin())
        .arg("--socket")
        .arg(&client.socket)
        .args(["--json", "downloads", "watch", &id.to_string(), "--interval", "0.2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");

    let out = client.ctl(&["downloads", "add-source", &id.to_string(), &server.sources()[1]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("added {} to download {id} (now 2 sources)", server.sources()[1]));
    let again = client.ctl(&["downloads", "add-source", &id.to_string(), &server.sources()[1]]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains(&format!("download {id} already has this source")), "{}", stdout(&again));

    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("r")), sha256_file(&server.export.join("r")));
    // The added source served part of the file.
    assert!(server.bytes_sent(server.ports[1]) >= 2 * MIB, "added source sent {}", server.bytes_sent(server.ports[1]));
    let w = watch.wait_with_output().expect("watch output");
    assert!(w.status.success(), "watch: {}", stderr(&w));
    let lines = json_lines(&w);
    assert!(matches!(lines.last().expect("events"), Line::Event(Event::Done(_))), "{lines:?}");
    assert!(lines.iter().all(|l| !shows_paused(l)), "the watcher saw a pause: {lines:?}");
    assert!(lines.iter().filter_map(Line::progress).any(|d| d.sources.len() == 2));
    // Running time carries over to the new run without going back.
    let times: Vec<u64> = lines.iter().filter_map(Line::progress).map(|d| d.elapsed_ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "elapsed_ms went backwards: {times:?}");

    // Bad input: unknown ID, a source without a port.
    let out = client.ctl(&["downloads", "add-source", "999", &server.sources()[1]]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no download with ID 999"), "{}", stderr(&out));
    let out = client.ctl(&["downloads", "add-source", &id.to_string(), "127.0.0.1"]);
    assert_eq!(out.status.code(), Some(1));
    let out = client.ctl(&["downloads", "add-source", &id.to_string(), &dead_port()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("download {id} has already ended (done)")), "{}", stderr(&out));
}

#[test]
fn add_source_to_a_paused_download_is_used_when_it_resumes() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("p"), 16 * MIB, 143);
    warm(&server, "p");
    let client = Daemon::start(0);
    let id = client.get_detached("p", &[server.sources()[0].clone()], &[]);
    assert!(wait_until(Duration::from_secs(20), || client.download(id).bytes_done > MIB));
    let out = client.ctl(&["downloads", "pause", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = client.ctl(&["downloads", "add-source", &id.to_string(), &server.sources()[1]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("it uses them when resumed (now 2 sources)"), "{}", stdout(&out));
    let d = client.download(id);
    assert_eq!(d.state, DownloadState::Paused);
    assert_eq!(d.sources.len(), 2);
    // A listed, paused download connects to nothing and keeps its pieces.
    assert!(d.sources.iter().all(|s| s.state == SourceState::Idle), "{d:?}");
    assert!(d.pieces_verified > 0, "{d:?}");
    let sent = server.bytes_sent(server.ports[1]);
    assert_eq!(sent, 0, "a paused download fetched from the added source");
    let out = client.ctl(&["downloads", "resume", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d.state, DownloadState::Done, "{d:?}");
    assert_eq!(sha256_file(&client.downloads.join("p")), sha256_file(&server.export.join("p")));
    assert!(server.bytes_sent(server.ports[1]) >= MIB);
}

#[test]
fn a_recovered_source_shows_no_stale_error() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("2M").start();
    write_file(&server.export.join("e"), 24 * MIB, 144);
    warm(&server, "e");
    let client = Daemon::start(0);
    let id = client.get_detached("e", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(20), || client.download(id).bytes_done > MIB));
    let port = server.ports[1].to_string();
    assert!(server.ctl(&["servers", "stop", &port]).status.success());
    let src = |d: &DownloadInfo| -> SourceInfo { d.sources[1].clone() };
    let failed = wait_until(Duration::from_secs(20), || {
        src(&client.download(id)).last_error.is_some_and(|e| e.contains("refused"))
    });
    assert!(failed, "the stopped source never reported its error: {:?}", client.download(id));
    assert!(server.ctl(&["servers", "start", &port]).status.success());
    let recovered = wait_until(Duration::from_secs(30), || {
        let s = src(&client.download(id));
        s.state == SourceState::Active && s.last_error.is_none()
    });
    let s = src(&client.download(id));
    assert!(recovered, "the source is back but still shows its old error: {s:?}");
    assert!(s.recovered_from.as_deref().is_some_and(|e| e.contains("refused")), "{s:?}");
    let out = client.ctl(&["downloads", "show", &id.to_string()]);
    assert!(stdout(&out).contains(&format!("{} recovered from: ", server.sources()[1])), "{}", stdout(&out));
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());
}
