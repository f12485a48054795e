//! Every crash window of a download ends well: the real mftd (a debug
//! build) is made to abort at a named point (`MFTD_FAILPOINT`, see the
//! daemon's `failpoint` module), restarted on the same state without it,
//! and the download resumed. It must end with the source's bytes at the
//! destination, no part file, no foreign file and no manifest left.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use mftd_common::control::DownloadState;
use mftd_tests::{sha256_file, stderr, stdout, warm, write_file, Daemon};

const MIB: u64 = 1 << 20;

/// The first download of a fresh state directory.
const ID: &str = "1";

/// Restarts the crashed client daemon on the same dirs and socket, without
/// the failpoint (the builder's environment is not carried over).
fn restart(client: &mut Daemon, extra: &[&str]) {
    let mut args: Vec<String> = vec!["--checkpoint-interval".into(), "0.1".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    client.spawn_again(&args);
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A server and a client daemon that aborted at a crash point.
struct Crash {
    server: Daemon,
    client: Daemon,
}

/// How the download is continued after the restart.
enum Resume {
    /// `mftctl get --resume ID`.
    Get,
    /// The restarted daemon's `--auto-resume`.
    Auto,
}

/// Starts an 8 MiB download from a server at 8 MiB/s (so checkpoints with
/// progress come before the end), with the client set to abort at `point`,
/// and waits for the abort.
fn crash_at(point: &str, seed: u64) -> Crash {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    write_file(&server.export.join("f"), 8 * MIB, seed);
    warm(&server, "f");
    let mut client = Daemon::builder(0).arg("--checkpoint-interval").arg("0.1").env("MFTD_FAILPOINT", point).start();
    let out_dir = client.downloads.to_str().unwrap().to_string();
    // The daemon may abort before it answers (the part file is created a
    // moment after the download is accepted): the answer is not checked.
    let _ = client.ctl(&["get", "f", "--from", &server.sources()[0], "-o", &out_dir, "--detach"]);
    let st = client.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("{point}: mftd did not abort"));
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{point}: {st}\n{}", client.log());
    assert!(client.log().contains(&format!("MFTD_FAILPOINT={point}: aborting here")), "{}", client.log());
    Crash { server, client }
}

impl Crash {
    /// Restarts, resumes, and checks the end: done, the right bytes, nothing
    /// left over. Returns the bytes the server sent after the restart.
    fn resume_and_check(mut self, point: &str, how: Resume) -> u64 {
        let sent_before = self.server.bytes_sent(self.server.ports[0]);
        match how {
            Resume::Get => {
                restart(&mut self.client, &[]);
                let st = self.client.download(1);
                assert_eq!(st.state, DownloadState::Paused, "{point}: {st:?}");
                let out = self.client.ctl(&["get", "--resume", ID]);
                assert!(
                    out.status.success(),
                    "{point}: get --resume exited {:?}: {}{}\n{}",
                    out.status.code(),
                    stdout(&out),
                    stderr(&out),
                    self.client.log()
                );
            }
            Resume::Auto => restart(&mut self.client, &["--auto-resume"]),
        }
        let dl = self.client.wait_download(1, Duration::from_secs(60));
        assert_eq!(dl.state, DownloadState::Done, "{point}: {dl:?}\n{}", self.client.log());
        assert_eq!(dl.bytes_done, 8 * MIB, "{point}: {dl:?}");
        let downloads = &self.client.downloads;
        assert_eq!(sha256_file(&downloads.join("f")), sha256_file(&self.server.export.join("f")), "{point}");
        assert_eq!(names(downloads), vec!["f".to_string()], "{point}: leftovers next to the file");
        let manifests = self.client.dir.path().join("state/manifests");
        assert_eq!(names(&manifests), vec!["next-id".to_string()], "{point}: leftover manifests");
        self.server.bytes_sent(self.server.ports[0]) - sent_before
    }
}

/// The window the issue found: the file has its final name, the manifest
/// is still there. The finished file is recognised, nothing is fetched.
#[test]
fn a_crash_after_the_final_rename_is_recognised_as_done() {
    for (how, name) in [(Resume::Get, "get --resume"), (Resume::Auto, "--auto-resume")] {
        let crash = crash_at("finish-renamed", 41);
        assert!(crash.client.downloads.join("f").exists(), "the rename happened before the crash");
        let resent = crash.resume_and_check("finish-renamed", how);
        assert_eq!(resent, 0, "{name}: {resent} bytes fetched again for a finished file");
    }
}

/// Marked finishing but not renamed: the part file is this download's,
/// re-verified and renamed.
#[test]
fn a_crash_before_the_final_rename_finishes_from_the_part_file() {
    let crash = crash_at("finish-marked", 42);
    assert!(!crash.client.downloads.join("f").exists());
    let resent = crash.resume_and_check("finish-marked", Resume::Get);
    assert!(resent < MIB, "{resent} bytes fetched again for a verified part file");
}

/// The part file exists, no manifest records it yet: it is the owner's own
/// leftover, copied into a new part file and re-verified; nothing remains.
#[test]
fn a_crash_between_part_creation_and_its_manifest() {
    let crash = crash_at("part-created", 43);
    assert!(crash.client.downloads.join("f.mftpart").exists());
    crash.resume_and_check("part-created", Resume::Get);
}

/// Each step of a checkpoint with progress to record: data fsynced, temp
/// manifest created, written, fsynced, renamed (directory not fsynced).
#[test]
fn a_crash_at_each_checkpoint_step() {
    for (i, point) in [
        "checkpoint-data-synced",
        "checkpoint-temp-created",
        "checkpoint-temp-unsynced",
        "checkpoint-temp-written",
        "checkpoint-renamed",
    ]
    .iter()
    .enumerate()
    {
        let crash = crash_at(point, 50 + i as u64);
        let resent = crash.resume_and_check(point, Resume::Get);
        println!("{point}: {resent} bytes fetched after the restart");
    }
}
