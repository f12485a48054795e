//! Changing a download's sources: the same `get` again with other sources,
//! and `downloads add-source`, on waiting, running and paused downloads.

use std::time::Duration;

use mftd_tests::{sha256_file, stderr, stdout, wait_until, warm, write_file, Daemon};

const MIB: u64 = 1 << 20;

/// A loopback port nothing listens on (bound once, then released).
fn dead_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    format!("127.0.0.1:{port}")
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Waits until the only source of download `id` says why it cannot be reached.
fn wait_refused(client: &Daemon, id: u64) {
    let ok = wait_until(Duration::from_secs(10), || {
        client.download(id)["sources"][0]["last_error"].as_str().is_some_and(|e| e.contains("refused"))
    });
    assert!(ok, "the dead source never reported its error: {}", client.download(id));
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
    assert_eq!(client.download(id)["sources"].as_array().expect("sources").len(), 1);

    // The same get with the right ports continues that download with them.
    let out = client.ctl_within(Duration::from_secs(60), &["--json", "get", "t", "--from", &right, "-o", &dl_dir]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), client.log());
    let lines = json_lines(&out);
    assert_eq!(lines[0]["type"], "accepted");
    assert_eq!(lines[0]["id"], id);
    assert_eq!(lines[0]["resumed"], true);
    assert_eq!(lines[0]["added_sources"], serde_json::json!(server.sources()));
    let last = lines.last().expect("a terminal event");
    assert_eq!(last["type"], "done", "{last}");
    // No run in between was reported as paused: the stream followed the
    // new run.
    assert!(lines.iter().all(|l| l["download"]["state"] != "paused" && l["type"] != "paused"), "{lines:?}");
    assert_eq!(sha256_file(&client.downloads.join("t")), sha256_file(&server.export.join("t")));
    let d = client.download(id);
    let addrs: Vec<&str> =
        d["sources"].as_array().expect("sources").iter().filter_map(|s| s["address"].as_str()).collect();
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
    assert!(wait_until(Duration::from_secs(20), || client.download(id)["bytes_done"].as_u64().unwrap_or(0) > 2 * MIB));
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
    assert_eq!(d["state"], "done", "{d}");
    assert_eq!(sha256_file(&client.downloads.join("r")), sha256_file(&server.export.join("r")));
    // The added source served part of the file.
    assert!(server.bytes_sent(server.ports[1]) >= 2 * MIB, "added source sent {}", server.bytes_sent(server.ports[1]));
    let w = watch.wait_with_output().expect("watch output");
    assert!(w.status.success(), "watch: {}", stderr(&w));
    let lines = json_lines(&w);
    assert_eq!(lines.last().expect("events")["type"], "done", "{lines:?}");
    assert!(lines.iter().all(|l| l["download"]["state"] != "paused"), "the watcher saw a pause: {lines:?}");
    assert!(lines.iter().any(|l| l["download"]["sources"].as_array().is_some_and(|s| s.len() == 2)));
    // Running time carries over to the new run without going back.
    let times: Vec<u64> = lines.iter().filter_map(|l| l["download"]["elapsed_ms"].as_u64()).collect();
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
    assert!(wait_until(Duration::from_secs(20), || client.download(id)["bytes_done"].as_u64().unwrap_or(0) > MIB));
    let out = client.ctl(&["downloads", "pause", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = client.ctl(&["downloads", "add-source", &id.to_string(), &server.sources()[1]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("it uses them when resumed (now 2 sources)"), "{}", stdout(&out));
    let d = client.download(id);
    assert_eq!(d["state"], "paused");
    assert_eq!(d["sources"].as_array().expect("sources").len(), 2);
    // A listed, paused download connects to nothing and keeps its pieces.
    assert!(d["sources"].as_array().unwrap().iter().all(|s| s["state"] == "idle"), "{d}");
    assert!(d["pieces_verified"].as_u64().unwrap_or(0) > 0, "{d}");
    let sent = server.bytes_sent(server.ports[1]);
    assert_eq!(sent, 0, "a paused download fetched from the added source");
    let out = client.ctl(&["downloads", "resume", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(d["state"], "done", "{d}");
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
    assert!(wait_until(Duration::from_secs(20), || client.download(id)["bytes_done"].as_u64().unwrap_or(0) > MIB));
    let port = server.ports[1].to_string();
    assert!(server.ctl(&["servers", "stop", &port]).status.success());
    let src = |d: &serde_json::Value| d["sources"][1].clone();
    let failed = wait_until(Duration::from_secs(20), || {
        src(&client.download(id))["last_error"].as_str().is_some_and(|e| e.contains("refused"))
    });
    assert!(failed, "the stopped source never reported its error: {}", client.download(id));
    assert!(server.ctl(&["servers", "start", &port]).status.success());
    let recovered = wait_until(Duration::from_secs(30), || {
        let s = src(&client.download(id));
        s["state"] == "active" && s["last_error"].is_null()
    });
    let s = src(&client.download(id));
    assert!(recovered, "the source is back but still shows its old error: {s}");
    assert!(s["recovered_from"].as_str().is_some_and(|e| e.contains("refused")), "{s}");
    let out = client.ctl(&["downloads", "show", &id.to_string()]);
    assert!(stdout(&out).contains(&format!("{} recovered from: ", server.sources()[1])), "{}", stdout(&out));
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());
}
