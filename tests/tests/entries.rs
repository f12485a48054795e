//! The download list over time: IDs that are never reused, and removing
//! ended entries.

use std::time::Duration;

use mftd_common::control::DownloadState;
use mftd_tests::{stderr, stdout, wait_until, write_file, Daemon};

const MIB: u64 = 1 << 20;

fn ids(d: &Daemon) -> Vec<u64> {
    d.downloads_list().iter().map(|x| x.id).collect()
}

#[test]
fn download_ids_are_never_reused_after_a_restart() {
    let server = Daemon::start(1);
    write_file(&server.export.join("a"), MIB, 150);
    write_file(&server.export.join("b"), MIB, 151);
    let mut client = Daemon::start(0);
    let first = client.get_detached("a", &server.sources(), &[]);
    assert_eq!(client.wait_download(first, Duration::from_secs(30)).state, DownloadState::Done);
    // A get with nothing to do and a refused one take no ID.
    let out = client.get("a", &server.sources()[0], &[]);
    assert!(out.status.success() && stderr(&out).contains("nothing to download"), "{}", stderr(&out));
    let out = client.get("missing/../../x", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1));
    // Finished: no manifest is left to remember the ID by.
    assert!(client.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
    let client2 = Daemon::builder(0).arg("--state-dir").arg(client.dir.path().join("state").to_str().unwrap()).start();
    let second = client2.get_detached("b", &server.sources(), &[]);
    assert_eq!(second, first + 1, "after a restart download {second} follows {first} (no ID reused, none skipped)");
}

#[test]
fn remove_and_purge_take_ended_downloads_off_the_list() {
    let server = Daemon::start(1);
    for (i, n) in ["x", "y", "z"].iter().enumerate() {
        write_file(&server.export.join(n), MIB, 160 + i as u64);
    }
    let client = Daemon::start(0);
    let x = client.get_detached("x", &server.sources(), &[]);
    let y = client.get_detached("y", &server.sources(), &[]);
    for id in [x, y] {
        assert_eq!(client.wait_download(id, Duration::from_secs(30)).state, DownloadState::Done);
    }
    // A download waiting on a dead port cannot be removed, only cancelled.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
    };
    let z = client.get_detached("z", &[dead], &[]);
    let out = client.ctl(&["downloads", "remove", &z.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("download {z} is still running")), "{}", stderr(&out));

    let out = client.ctl(&["downloads", "remove", &x.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("removed download {x} from the list"));
    assert_eq!(ids(&client), [y, z]);
    assert!(client.downloads.join("x").exists(), "remove must not touch the finished file");
    let out = client.ctl(&["downloads", "show", &x.to_string()]);
    assert_eq!(out.status.code(), Some(1));

    assert!(client.ctl(&["downloads", "cancel", &z.to_string()]).status.success());
    assert!(wait_until(Duration::from_secs(10), || client.download(z).state == DownloadState::Cancelled));
    let out = client.ctl(&["downloads", "purge"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("removed 2 ended downloads: {y}, {z}"));
    assert!(ids(&client).is_empty());
    let out = client.ctl(&["downloads", "purge"]);
    assert_eq!(stdout(&out).trim(), "no ended downloads to remove");
    let out = client.ctl(&["downloads", "remove", "999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no download with ID 999"), "{}", stderr(&out));
}

#[test]
fn purge_keeps_failed_downloads_with_data_and_remove_deletes_it() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("f"), 16 * MIB, 170);
    let client = Daemon::start(0);
    let id = client.get_detached("f", &server.sources(), &["--give-up-after", "2s"]);
    assert!(wait_until(Duration::from_secs(20), || client.download(id).bytes_done > 2 * MIB));
    assert!(server.ctl(&["servers", "stop", &server.ports[0].to_string()]).status.success());
    assert_eq!(client.wait_download(id, Duration::from_secs(30)).state, DownloadState::Failed);
    let part = client.downloads.join("f.mftpart");
    assert!(part.exists(), "failed download kept no data to retry from");
    let out = client.ctl(&["downloads", "purge"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("kept failed download {id} with data")), "{}", stdout(&out));
    assert_eq!(ids(&client), [id]);
    let out = client.ctl(&["downloads", "remove", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("removed download {id} and its partial data"));
    assert!(!part.exists(), "the partial file outlived remove");
    assert!(ids(&client).is_empty());
}

#[test]
fn get_resume_detached_prints_bare_ids_and_names_a_running_download() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("2M").start();
    write_file(&server.export.join("r"), 8 * MIB, 171);
    let client = Daemon::start(0);
    let id = client.get_detached("r", &server.sources(), &[]);
    let out = client.ctl(&["get", "--resume", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("`mftctl downloads watch {id}` follows it")), "{}", stderr(&out));
    assert!(client.ctl(&["downloads", "pause", &id.to_string()]).status.success());
    let out = client.ctl(&["get", "--resume", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), id.to_string());
    assert_eq!(client.wait_download(id, Duration::from_secs(30)).state, DownloadState::Done);
}
