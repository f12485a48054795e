//! A full disk pauses a download, which continues by itself once there is
//! room again; a file system too small for the file fails it at once.
//! Each test mounts a small tmpfs (root only; CI runs as root).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mftd_common::control::{DownloadInfo, DownloadState};
use mftd_tests::{sha256_file, stderr, stdout, wait_until, warm, write_file, Daemon};

const MIB: u64 = 1 << 20;

/// A tmpfs of `size` mounted at `path` for one test; unmounted on drop, so
/// a failing test leaves no mount behind.
struct SmallFs(PathBuf);

impl SmallFs {
    /// `None` (with the reason printed) when not root: mounting needs it.
    fn mount(path: &Path, size: &str) -> Option<SmallFs> {
        if !nix::unistd::geteuid().is_root() {
            mftd_tests::say_skipped("disk_full", "mounting a tmpfs for a full-disk test needs root (CI runs as root)");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot mount a tmpfs at {} although root", path.display());
        Some(SmallFs(path.to_path_buf()))
    }

    /// Bytes an unprivileged writer may still use on it.
    fn available(&self) -> u64 {
        let v = nix::sys::statvfs::statvfs(&self.0).expect("statvfs");
        v.blocks_available() * v.fragment_size()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The bytes a download paused for a full disk says it needs, from its
/// `disk full on DIR, N bytes needed; ...` error; panics on another error.
fn needed(dl: &DownloadInfo, dir: &Path) -> u64 {
    let err = dl.error.as_deref().unwrap_or("");
    let rest = err
        .strip_prefix(&format!("disk full on {}, ", dir.display()))
        .unwrap_or_else(|| panic!("not paused for a full {}: {dl:?}", dir.display()));
    rest.split(" bytes needed").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{err}"))
}

/// Asserts `id` stays paused for `d` (nothing resumes it while the disk is
/// still full), polling.
fn stays_paused(client: &Daemon, id: u64, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let dl = client.download(id);
        assert_eq!(dl.state, DownloadState::Paused, "resumed while the disk is still full: {dl:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_destination_pauses_and_continues_by_itself_when_space_is_back() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    let size = 24 * MIB;
    write_file(&server.export.join("f"), size, 81);
    warm(&server, "f");
    let base = tempfile::tempdir().unwrap();
    let out_dir = base.path().join("out");
    let Some(fs) = SmallFs::mount(&out_dir, "40m") else { return };
    let client = Daemon::builder(0).arg("--min-free-space").arg("0").start();

    // An attached get, as a user runs it.
    let get = std::process::Command::new(mftd_tests::mftctl_bin())
        .arg("--socket")
        .arg(&client.socket)
        .args(["get", "f", "--from", &server.sources()[0], "-o", out_dir.to_str().unwrap()])
        .env_remove("MFTD_SOCKET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mftctl get");
    assert!(wait_until(Duration::from_secs(20), || client
        .downloads_list()
        .first()
        .is_some_and(|d| d.bytes_done > 2 * MIB)));
    let id = client.downloads_list()[0].id;
    // Leave 6 MiB: the download fills it within about 2 s at 4 MiB/s.
    let filler = out_dir.join("filler");
    write_file(&filler, fs.available() - 6 * MIB, 1);

    assert!(
        wait_until(Duration::from_secs(30), || client.download(id).state == DownloadState::Paused),
        "did not pause on a full disk: {:?}\n{}",
        client.download(id),
        client.log()
    );
    let dl = client.download(id);
    let need = needed(&dl, &out_dir);
    assert_eq!(need, size - dl.bytes_done, "N is the bytes still to fetch: {dl:?}");
    assert!(dl.bytes_done > 2 * MIB && dl.bytes_done < size, "{dl:?}");
    // The attached get says why, and that it goes on by itself.
    let out = get.wait_with_output().expect("mftctl get");
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let said = stderr(&out);
    assert!(said.contains(&format!("download {id} is paused: disk full on {}", out_dir.display())), "{said}");
    assert!(said.contains("continues by itself when there is room"), "{said}");
    assert!(client.ctl(&["status"]).status.success(), "daemon keeps serving");

    stays_paused(&client, id, Duration::from_secs(3));
    let sent_before = server.bytes_sent(server.ports[0]);
    std::fs::remove_file(&filler).unwrap();
    let dl = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&out_dir.join("f")), sha256_file(&server.export.join("f")));
    // What was written before the disk filled up was kept, not fetched again.
    let refetched = server.bytes_sent(server.ports[0]) - sent_before;
    assert!(refetched <= need + 2 * MIB, "{refetched} bytes fetched after the pause, {need} were missing");
}

#[test]
fn no_room_at_the_start_waits_for_it() {
    let server = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&server.export.join("g"), size, 82);
    let base = tempfile::tempdir().unwrap();
    let out_dir = base.path().join("out");
    let Some(fs) = SmallFs::mount(&out_dir, "16m") else { return };
    let filler = out_dir.join("filler");
    write_file(&filler, fs.available() - 4 * MIB, 2);
    let client = Daemon::builder(0).arg("--min-free-space").arg("0").start();
    let out = client.ctl(&["get", "g", "--from", &server.sources()[0], "--detach", "-o", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().expect("download id");
    assert!(
        wait_until(Duration::from_secs(20), || client.download(id).state == DownloadState::Paused),
        "{:?}",
        client.download(id)
    );
    assert_eq!(needed(&client.download(id), &out_dir), size, "nothing is in yet");
    stays_paused(&client, id, Duration::from_secs(2));
    std::fs::remove_file(&filler).unwrap();
    let dl = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&out_dir.join("g")), sha256_file(&server.export.join("g")));
}

#[test]
fn a_user_pause_while_waiting_for_space_holds() {
    let server = Daemon::start(1);
    write_file(&server.export.join("h"), 8 * MIB, 83);
    let base = tempfile::tempdir().unwrap();
    let out_dir = base.path().join("out");
    let Some(fs) = SmallFs::mount(&out_dir, "16m") else { return };
    let filler = out_dir.join("filler");
    write_file(&filler, fs.available() - 4 * MIB, 3);
    let client = Daemon::builder(0).arg("--min-free-space").arg("0").start();
    let out = client.ctl(&["get", "h", "--from", &server.sources()[0], "--detach", "-o", out_dir.to_str().unwrap()]);
    let id: u64 = stdout(&out).trim().parse().expect("download id");
    assert!(wait_until(Duration::from_secs(20), || client.download(id).state == DownloadState::Paused));
    let out = client.ctl(&["downloads", "pause", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&filler).unwrap();
    // Checks back off to 30 s at most; the first ones come within 4 s.
    stays_paused(&client, id, Duration::from_secs(5));
    assert_eq!(client.download(id).error, None, "a user's pause shows no disk error");
    let out = client.ctl(&["downloads", "resume", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(client.wait_download(id, Duration::from_secs(60)).state, DownloadState::Done);
}

#[test]
fn a_full_state_directory_pauses_keeps_the_last_manifest_and_continues_by_itself() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("4M").start();
    write_file(&server.export.join("f"), 16 * MIB, 71);
    warm(&server, "f");
    // The state directory lives on a 1 MiB file system we can fill up.
    let base = tempfile::tempdir().unwrap();
    let state = base.path().join("state");
    let Some(_fs) = SmallFs::mount(&state, "1m") else { return };
    let client = Daemon::builder(0)
        .arg("--state-dir")
        .arg(state.to_str().unwrap())
        .arg("--checkpoint-interval")
        .arg("0.1")
        .start();
    let id = client.get_detached("f", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 2 * MIB));
    let manifest = state.join(format!("manifests/{id}.json"));
    let key: mftd_common::manifest::Key =
        std::fs::read(state.join("manifest.key")).unwrap().try_into().expect("a 32-byte manifest key");
    let before = std::fs::read(&manifest).unwrap();
    // Fill the file system: the next checkpoint cannot be written.
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 2 << 20]);
    assert!(
        wait_until(Duration::from_secs(30), || client.download(id).state == DownloadState::Paused),
        "download did not pause on a full disk: {:?}",
        client.download(id)
    );
    let dl = client.download(id);
    let err = dl.error.as_deref().unwrap_or("");
    assert!(err.starts_with(&format!("disk full on {}, ", state.join("manifests").display())), "{dl:?}");
    // The previous manifest is intact and still decodes.
    let now = std::fs::read(&manifest).unwrap();
    assert!(mftd_common::manifest::Manifest::decode(&now, &key).is_ok(), "manifest damaged");
    assert!(mftd_common::manifest::Manifest::decode(&before, &key).is_ok());
    assert!(client.ctl(&["status"]).status.success(), "daemon keeps serving");
    // Free the space: the download continues by itself and completes.
    std::fs::remove_file(&filler).unwrap();
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("f")), sha256_file(&server.export.join("f")));
}

#[test]
fn a_file_system_too_small_for_the_file_fails_at_once() {
    let server = Daemon::start(1);
    write_file(&server.export.join("big"), 8 * MIB, 72);
    let base = tempfile::tempdir().unwrap();
    let out_dir = base.path().join("out");
    let Some(_fs) = SmallFs::mount(&out_dir, "2m") else { return };
    let client = Daemon::start(0);
    let out = client.ctl(&["get", "big", "--from", &server.sources()[0], "-o", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("not enough disk space"), "{}", stdout(&out));
    assert!(!out_dir.join("big.mftpart").exists(), "partial file left behind");
    assert!(client.ctl(&["status"]).status.success());
}

/// Hostile review: a source added (`downloads add-source`, or a repeated
/// get) to a download paused for a full disk replaces the paused entry with
/// a new one that has no space wait: it no longer continues by itself when
/// the space is back.
#[test]
fn adding_a_source_while_waiting_for_space_keeps_the_automatic_resume() {
    let server = Daemon::start(1);
    let size = 8 * MIB;
    write_file(&server.export.join("k"), size, 84);
    let base = tempfile::tempdir().unwrap();
    let out_dir = base.path().join("out");
    let Some(fs) = SmallFs::mount(&out_dir, "16m") else { return };
    let filler = out_dir.join("filler");
    write_file(&filler, fs.available() - 4 * MIB, 4);
    let client = Daemon::builder(0).arg("--min-free-space").arg("0").start();
    let out = client.ctl(&["get", "k", "--from", &server.sources()[0], "--detach", "-o", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().expect("download id");
    assert!(wait_until(Duration::from_secs(20), || client.download(id).state == DownloadState::Paused));
    // A second server of the same file.
    let other = Daemon::start(1);
    write_file(&other.export.join("k"), size, 84);
    let out = client.ctl(&["downloads", "add-source", &id.to_string(), &other.sources()[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&filler).unwrap();
    let dl = client.wait_download(id, Duration::from_secs(45));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
}
