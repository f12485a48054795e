//! Crash-safe resume: SIGKILL at random moments, SIGTERM, damaged
//! manifests, pause/resume/cancel, and safe destinations.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadInfo, DownloadState, Event, Response};
use mftd_tests::{sha256_file, stderr, stdout, typed_lines, wait_until, warm, write_file, Daemon, Line};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn sent_total(server: &Daemon) -> u64 {
    server.ports.iter().map(|p| server.bytes_sent(*p)).sum()
}

fn manifests(client: &Daemon) -> Vec<PathBuf> {
    let dir = client.dir.path().join("state/manifests");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "json"));
    v
}

/// Restarts a killed or stopped client daemon on the same dirs and socket.
fn restart(client: &mut Daemon, extra: &[String]) {
    client.spawn_again(extra);
}

#[test]
fn twenty_sigkills_then_resume_to_the_right_file() {
    // 4 listeners at 1 MiB/s: 160 MiB take at least 40 s of running, more
    // than 20 runs of at most 1.5 s, so all 20 kills land mid-download.
    let server = Daemon::builder(4).arg("--rate-limit").arg("1M").start();
    let size = 160 * MIB;
    let rate = 4 * MIB;
    write_file(&server.export.join("big"), size, 21);
    warm(&server, "big");
    let want = sha256_file(&server.export.join("big"));
    let interval = 0.1;
    let extra: Vec<String> = vec!["--checkpoint-interval".into(), interval.to_string()];
    let mut client = Daemon::builder(0).arg("--checkpoint-interval").arg(interval.to_string()).start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let id = client.get_detached("big", &server.sources(), &[]);
    // What a kill may lose of saved progress: the data of one checkpoint
    // interval, doubled for a checkpoint still being written, plus 1 MiB
    // (250 ms) for a checkpoint delayed on a loaded machine. A run moves
    // more than twice that (at least 1 s at 4 MiB/s), so without
    // checkpoints during the run a kill loses more.
    let may_lose = (2.0 * interval * rate as f64) as u64 + MIB;
    let mut kills = 0u64;
    for k in 0..20 {
        // Let it run a random while, then kill without warning.
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..1500)));
        let before = client.download(id);
        assert_ne!(before.state, DownloadState::Done, "finished before kill {k}: the test did not kill 20 times");
        let done_before = before.bytes_done;
        client.kill();
        kills += 1;
        restart(&mut client, &extra);
        let st = client.download(id);
        assert_eq!(st.state, DownloadState::Paused, "after kill {k}: {st:?}");
        let saved = st.bytes_done;
        println!("kill {k}: {done_before} bytes done before, {saved} saved, servers sent {}", sent_total(&server));
        assert!(
            saved + may_lose >= done_before,
            "kill {k}: {saved} bytes saved of {done_before} done, more than {may_lose} lost"
        );
        let out = client.ctl(&["get", "--resume", "--detach"]);
        assert!(out.status.success(), "resume after kill {k}: {}", stderr(&out));
    }
    assert_eq!(kills, 20);
    let dl = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}\n{}", client.log());
    assert_eq!(sha256_file(&client.downloads.join("big")), want);
    assert!(manifests(&client).is_empty(), "manifest removed after success");
    // Each kill may cost what it lost of saved progress plus what was in
    // flight; fetching everything again after each kill would cost the
    // progress at every kill (hundreds of MiB here).
    let sent = sent_total(&server);
    let bound = size + kills * (may_lose + MIB);
    println!(
        "{kills} SIGKILLs: servers sent {sent} bytes for a {size}-byte file (+{} = {:.1}%), bound {bound}",
        sent - size,
        (sent - size) as f64 * 100.0 / size as f64
    );
    assert!(sent <= bound, "sent {sent} > {bound}");
}

#[test]
fn sigterm_persists_and_next_start_resumes() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("8M").start();
    let size = 32 * MIB;
    write_file(&server.export.join("t"), size, 22);
    warm(&server, "t");
    let mut client = Daemon::start(0);
    let id = client.get_detached("t", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 8 * MIB));
    let t = Instant::now();
    let st = client.terminate(Duration::from_secs(5)).expect("exits within 5 s of SIGTERM with a download in flight");
    assert!(st.success(), "{st}");
    println!("SIGTERM with a download in flight: exited in {:?}", t.elapsed());
    assert_eq!(manifests(&client).len(), 1);
    let sent_before = sent_total(&server);
    restart(&mut client, &[]);
    let dl = client.download(id);
    assert_eq!(dl.state, DownloadState::Paused, "{dl:?}");
    assert!(dl.bytes_done >= 8 * MIB, "progress kept: {dl:?}");
    let out = client.ctl(&["get", "--resume", &id.to_string()]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("t")), sha256_file(&server.export.join("t")));
    let resent = sent_total(&server) - sent_before;
    println!("after restart the servers sent {resent} more bytes of {size}");
    assert!(resent < size - 6 * MIB, "the second run fetched {resent} bytes: progress was not reused");
}

#[test]
fn damaged_manifests_are_reported_and_data_is_reverified() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    let size = 24 * MIB;
    write_file(&server.export.join("d"), size, 23);
    warm(&server, "d");
    for (i, damage) in ["truncate", "zero", "version", "tamper", "inconsistent"].iter().enumerate() {
        let mut client = Daemon::start(0);
        let id = client.get_detached("d", &server.sources(), &[]);
        assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 8 * MIB));
        client.kill();
        let m = client.dir.path().join(format!("state/manifests/{id}.json"));
        let text = std::fs::read(&m).unwrap();
        let reason = match *damage {
            "truncate" => {
                std::fs::write(&m, &text[..text.len() / 3]).unwrap();
                "not valid manifest JSON"
            }
            "zero" => {
                std::fs::write(&m, vec![0u8; text.len()]).unwrap();
                "all zero bytes"
            }
            "version" => {
                let s = String::from_utf8(text).unwrap().replace("\"version\": 1", "\"version\": 99");
                std::fs::write(&m, s).unwrap();
                "version 99 is not supported"
            }
            "tamper" => {
                // Valid JSON, one field changed (a source redirected), as
                // someone without the manifest key would: never obeyed.
                let s = String::from_utf8(text).unwrap();
                let redirected = s.replace(&server.sources()[0], "127.0.0.1:1");
                assert_ne!(s, redirected, "the manifest does not name the source");
                std::fs::write(&m, redirected).unwrap();
                "checksum mismatch"
            }
            _ => {
                // The manifest is fine but the data file no longer matches it.
                let part = client.downloads.join("d.mftpart");
                let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
                f.set_len(3 * MIB).unwrap();
                ""
            }
        };
        let sent_before = server.bytes_sent(server.ports[0]);
        restart(&mut client, &[]);
        let damaged = client.status().damaged_manifests;
        if reason.is_empty() {
            assert!(damaged.is_empty(), "{damaged:?}");
        } else {
            assert_eq!(damaged.len(), 1, "{damage}: {damaged:?}");
            let msg = &damaged[0];
            assert!(msg.contains(&m.display().to_string()) && msg.contains(reason), "{damage}: {msg}");
            assert!(client.log().contains("damaged download manifest"), "logged");
            // Not obeyed: no download was loaded from it.
            assert_eq!(client.downloads_list(), vec![], "{damage}: a damaged manifest was loaded");
        }
        // Recover: the same get re-verifies what is on disk and finishes.
        let out = if reason.is_empty() {
            client.ctl(&["get", "--resume", &id.to_string()])
        } else {
            client.get("d", &server.sources()[0], &[])
        };
        assert!(out.status.success(), "{damage}: {}\n{}", stderr(&out), client.log());
        assert_eq!(sha256_file(&client.downloads.join("d")), sha256_file(&server.export.join("d")), "{damage}");
        let resent = server.bytes_sent(server.ports[0]) - sent_before;
        println!("{damage}: re-fetched {resent} of {size} bytes");
        if *damage != "inconsistent" {
            assert!(resent <= size - 6 * MIB, "{damage}: data on disk was not reused ({resent} bytes fetched again)");
        }
        assert!(client.log().contains("re-verifying"), "{damage}: {}", client.log());
        std::fs::remove_file(client.downloads.join("d")).unwrap();
        let _ = i;
    }
}

#[test]
fn no_resume_leaves_no_manifest() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    write_file(&server.export.join("n"), 8 * MIB, 24);
    let client = Daemon::start(0);
    let out = client.get("n", &server.sources()[0], &["--no-resume", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > MIB));
    assert!(manifests(&client).is_empty(), "manifest written during a --no-resume download");
    let dl = client.wait_download(id, Duration::from_secs(20));
    assert_eq!(dl.state, DownloadState::Done);
    assert!(manifests(&client).is_empty());
    // And the CLI says what --no-resume means.
    let out = client.get("n", &server.sources()[0], &["--no-resume", "--force"]);
    assert!(stderr(&out).contains("starts over"), "{}", stderr(&out));
}

#[test]
fn pause_resume_cancel() {
    let server = Daemon::builder(2).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("m"), 24 * MIB, 25);
    warm(&server, "m");
    let client = Daemon::start(0);
    let id = client.get_detached("m", &server.sources(), &[]);
    // Someone follows it with `downloads watch ID --json` (the same stream
    // as `get --json`).
    let follower = std::process::Command::new(mftd_tests::mftctl_bin())
        .arg("--socket")
        .arg(&client.socket)
        .args(["--json", "downloads", "watch", &id.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mftctl get");
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 2 * MIB));
    let out = client.ctl(&["downloads", "pause", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(30), || client.download(id).state == DownloadState::Paused));
    // Pause releases connections.
    assert!(wait_until(Duration::from_secs(30), || server.servers().iter().all(|s| s.connections == 0)));
    let frozen = client.download(id).bytes_done;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(client.download(id).bytes_done, frozen);
    assert_eq!(manifests(&client).len(), 1);
    // `status` does not count a paused download as active.
    let status = stdout(&client.ctl(&["status"]));
    assert!(status.contains("downloads: 0 active, 1 paused, 1 total"), "{status}");
    // `downloads list` has a header above its rows.
    let list = stdout(&client.ctl(&["downloads", "list"]));
    let first = list.lines().next().unwrap_or_default();
    assert!(first.contains("ID") && first.contains("STATE") && first.contains("DESTINATION"), "{list}");
    assert!(list.lines().nth(1).is_some_and(|l| l.contains("paused")), "{list}");
    // A `get --json` following it elsewhere ended with a terminal event.
    let events = follower_out(follower);
    let last = events.last().expect("get --json printed nothing");
    let Line::Event(Event::Paused { message, .. }) = last else {
        panic!("the stream did not end with `paused`: {events:?}")
    };
    assert!(message.contains("downloads resume"), "{last}");
    // Pausing twice is an error with a sentence.
    let out = client.ctl(&["downloads", "pause", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already paused"));

    // `pause` returns once the pause holds: a `resume` right behind it
    // works, and so does the next pause right behind that.
    let out = client.ctl(&["downloads", "resume", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = client.ctl(&["downloads", "pause", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paused download"), "{}", stdout(&out));
    assert_eq!(client.download(id).state, DownloadState::Paused, "the pause did not hold when `pause` returned");
    let out = client.ctl(&["downloads", "resume", &id.to_string()]);
    assert!(out.status.success(), "resume right after pause: {}", stderr(&out));
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("m")), sha256_file(&server.export.join("m")));

    // Cancel removes the partial file and the manifest.
    let id2 = client.get_detached("m", &server.sources(), &["--force"]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id2).bytes_done > MIB));
    let out = client.ctl(&["downloads", "cancel", &id2.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(30), || client.download(id2).state == DownloadState::Cancelled));
    assert!(wait_until(Duration::from_secs(30), || !client.downloads.join("m.mftpart").exists()));
    assert!(manifests(&client).is_empty());
    let out = client.ctl(&["downloads", "cancel", "999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no download with ID 999"));
}

#[test]
fn same_get_again_continues_the_interrupted_download() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    write_file(&server.export.join("g"), 24 * MIB, 26);
    warm(&server, "g");
    let mut client = Daemon::builder(0).arg("--checkpoint-interval").arg("0.1").start();
    let id = client.get_detached("g", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 8 * MIB));
    client.kill();
    restart(&mut client, &["--checkpoint-interval".into(), "0.1".into()]);
    let sent_before = sent_total(&server);
    let (out, lines) =
        client.ctl_typed(&["get", "g", "--from", &server.sources()[0], "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let Line::Response(Response::Accepted { id: accepted, resumed, .. }) = &lines[0] else {
        panic!("not accepted: {}", lines[0])
    };
    assert_eq!(*accepted, id);
    assert!(*resumed);
    assert_eq!(sha256_file(&client.downloads.join("g")), sha256_file(&server.export.join("g")));
    assert!(sent_total(&server) - sent_before < 18 * MIB);
}

#[test]
fn changed_remote_file_is_not_mixed() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    write_file(&server.export.join("c"), 16 * MIB, 27);
    warm(&server, "c");
    let mut client = Daemon::start(0);
    let id = client.get_detached("c", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 2 * MIB));
    let old = mftd_tests::identity_of(&server.export.join("c"));
    client.kill();
    write_file(&server.export.join("c"), 16 * MIB, 28); // new version
    restart(&mut client, &[]);
    let out = client.ctl(&["get", "--resume", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    let dl = client.download(id);
    assert_eq!(dl.state, DownloadState::Failed);
    assert!(dl.error.as_deref().unwrap().contains("remote file changed"), "{dl:?}");
    // It shows the version its partial file holds, not the new one.
    assert_eq!(dl.identity.as_deref(), Some(old.as_str()), "{dl:?}");
    assert!(!client.downloads.join("c").exists());
}

#[test]
fn auto_resume_continues_after_restart() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    write_file(&server.export.join("a"), 16 * MIB, 29);
    warm(&server, "a");
    let mut client = Daemon::start(0);
    let id = client.get_detached("a", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 2 * MIB));
    client.kill();
    restart(&mut client, &["--auto-resume".into()]);
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("a")), sha256_file(&server.export.join("a")));
}

#[test]
fn symlink_planted_at_the_part_file_is_not_followed() {
    let server = Daemon::start(1);
    write_file(&server.export.join("s"), MIB, 30);
    let client = Daemon::start(0);
    let target = client.dir.path().join("victim");
    std::fs::write(&target, b"do not touch").unwrap();
    std::os::unix::fs::symlink(&target, client.downloads.join("s.mftpart")).unwrap();
    let out = client.get("s", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("symlink"), "{}", stdout(&out));
    assert_eq!(std::fs::read(&target).unwrap(), b"do not touch");
}

/// A manifest planted by someone who cannot read the key is reported as
/// damaged and never acted on; a download whose name looks like a manifest
/// does not collide with one.
#[test]
fn planted_manifests_are_refused_and_downloads_never_collide_with_state() {
    let server = Daemon::start(1);
    write_file(&server.export.join("3.json"), 4096, 31);
    let mut client = Daemon::start(0);
    // A forged manifest: resume "download 3" from a server of the forger's
    // choice into a place of its choice, checksummed the way an older mftd
    // did (no key).
    let planted = serde_json::json!({
        "format": "mftd-manifest", "version": 1, "id": 3,
        "remote_path": "authorized_keys", "sources": [server.sources()[0]],
        "destination": client.dir.path().join("victim/authorized_keys"),
        "force": true, "connections_per_source": 1, "paused": false, "checksum": ""
    });
    let mut m: mftd_common::manifest::Manifest = serde_json::from_value(planted).unwrap();
    m.checksum = String::new();
    m.checksum = blake3_hex(&serde_json::to_vec(&m).unwrap());
    let dir = client.dir.path().join("state/manifests");
    std::fs::write(dir.join("3.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    client.kill();
    restart(&mut client, &["--auto-resume".into()]);
    let damaged = client.status().damaged_manifests;
    assert!(damaged.iter().any(|d| d.contains("checksum")), "{damaged:?}");
    assert!(!client.dir.path().join("victim").exists());
    // A download named 3.json into the state directory's downloads/ (the
    // default download directory of the system service): it is a file like
    // any other, and survives restarts untouched.
    let dl_dir = client.dir.path().join("state/downloads");
    std::fs::create_dir_all(&dl_dir).unwrap();
    let out = client.ctl(&["get", "3.json", "--from", &server.sources()[0], "-o", dl_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    client.kill();
    restart(&mut client, &[]);
    assert_eq!(sha256_file(&dl_dir.join("3.json")), sha256_file(&server.export.join("3.json")));
    let damaged = client.status().damaged_manifests;
    assert!(damaged.iter().all(|d| !d.contains("state/downloads")), "{damaged:?}");
    assert!(dir.join("3.json").exists(), "the planted manifest is left in place for the operator");
}

fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// The JSON lines a following `mftctl --json` child printed before it exited
/// (within 20 s, or the test fails), checking it exited 1.
fn follower_out(mut child: std::process::Child) -> Vec<Line> {
    if !wait_until(Duration::from_secs(20), || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
        panic!("the follower did not exit within 20 s of the pause");
    }
    let out = child.wait_with_output().expect("mftctl get");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    typed_lines(&String::from_utf8_lossy(&out.stdout))
}

/// Sum of the sources' shares and the found-on-disk share of a download.
fn shares(d: &DownloadInfo) -> f64 {
    let credited: u64 = d.sources.iter().map(|s| s.bytes).sum();
    let whole = d.bytes_done.max(credited) as f64;
    d.sources.iter().map(|s| s.share).sum::<f64>() + d.found_on_disk as f64 / whole
}

#[test]
fn per_source_work_and_running_time_survive_pause_and_restart() {
    // Two sources at 4 MiB/s each: 24 MiB take at least 3 s of running.
    let server = Daemon::builder(2).arg("--rate-limit").arg("4M").start();
    let size = 24 * MIB;
    write_file(&server.export.join("w"), size, 29);
    warm(&server, "w");
    let mut client = Daemon::builder(0).arg("--checkpoint-interval").arg("0.1").start();
    let t0 = Instant::now();
    let id = client.get_detached("w", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(20), || client.download(id).bytes_done > 6 * MIB));
    assert!(client.ctl(&["downloads", "pause", &id.to_string()]).status.success());
    let paused = client.download(id);
    let before: Vec<u64> = paused.sources.iter().map(|s| s.bytes).collect();
    assert!(before.iter().all(|b| *b > 0), "{paused:?}");
    // Paused time does not count.
    std::thread::sleep(Duration::from_millis(1500));
    let still = client.download(id);
    assert_eq!(still.elapsed_ms, paused.elapsed_ms, "elapsed time ran on while paused");
    assert!(client.ctl(&["downloads", "resume", &id.to_string()]).status.success());
    assert!(wait_until(Duration::from_secs(20), || client.download(id).bytes_done > 14 * MIB));
    // A crash and restart keep them too (from the last checkpoint).
    client.kill();
    restart(&mut client, &["--checkpoint-interval".into(), "0.1".into()]);
    let reloaded = client.download(id);
    let after: Vec<u64> = reloaded.sources.iter().map(|s| s.bytes).collect();
    for (a, b) in after.iter().zip(&before) {
        assert!(a >= b, "a source's bytes went back from {b} to {a} after the restart: {reloaded:?}");
    }
    assert!(reloaded.elapsed_ms >= paused.elapsed_ms);
    let out = client.ctl(&["get", "--resume", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let wall = t0.elapsed();
    let d = client.download(id);
    assert_eq!(d.state, DownloadState::Done);
    assert_eq!(sha256_file(&client.downloads.join("w")), sha256_file(&server.export.join("w")));
    let credited: u64 = d.sources.iter().map(|s| s.bytes).sum();
    assert_eq!(d.found_on_disk, 0, "{d:?}");
    assert_eq!(credited, size, "the sources' bytes do not add up to the file: {d:?}");
    assert!((shares(&d) - 1.0).abs() < 1e-9, "shares add to {}: {d:?}", shares(&d));
    // Running time: at least what the rate limit allows, less than the wall
    // time minus the pause.
    let elapsed = Duration::from_millis(d.elapsed_ms);
    assert!(elapsed >= Duration::from_millis(2500), "elapsed {elapsed:?} is less than 24 MiB at 8 MiB/s takes");
    assert!(elapsed + Duration::from_millis(1500) <= wall, "elapsed {elapsed:?} counts the pause (wall {wall:?})");
}

#[test]
fn bytes_found_on_disk_without_a_record_are_shown_as_such() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    let size = 16 * MIB;
    write_file(&server.export.join("f"), size, 30);
    warm(&server, "f");
    let mut client = Daemon::start(0);
    let id = client.get_detached("f", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 6 * MIB));
    client.kill();
    std::fs::write(client.dir.path().join(format!("state/manifests/{id}.json")), b"{").unwrap();
    restart(&mut client, &[]);
    let (out, lines) =
        client.ctl_typed(&["get", "f", "--from", &server.sources()[0], "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done = lines.last().expect("events").done();
    let found = done.found_on_disk;
    assert!(found >= 4 * MIB, "reused data is not shown: {done:?}");
    // While it was re-verified, never more was claimed than the partial
    // file held (it is sparse: its holes are not data).
    let most = lines.iter().filter_map(|l| Some(l.progress()?.found_on_disk)).max().unwrap_or(0);
    assert!(most <= found + MIB, "{most} bytes claimed found on disk while re-verifying, {found} in the end");
    let new_id = lines[0].accepted_id();
    let d = client.download(new_id);
    assert!((shares(&d) - 1.0).abs() < 1e-9, "shares add to {}: {d:?}", shares(&d));
    let out = client.ctl(&["downloads", "show", &new_id.to_string()]);
    assert!(stdout(&out).contains("(found on disk)"), "{}", stdout(&out));
}
