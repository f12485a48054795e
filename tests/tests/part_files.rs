//! Part files are the daemon's own: a file another user put at
//! `NAME.mftpart` before the download is never written to, nor renamed
//! into place.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use mftd_tests::{sha256_file, stderr, stdout, warm, write_file, Daemon};

const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;

/// Runs `sh -c script` as uid/gid 65534 with no supplementary groups.
fn as_nobody(script: &str) {
    let out = Command::new("setpriv")
        .args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups", "sh", "-c", script])
        .output()
        .expect("setpriv");
    assert!(out.status.success(), "as uid {NOBODY}: {script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The attack of the issue: another local user creates `p.mftpart` in a
/// world-writable sticky directory (as `/tmp` is) before root downloads
/// `p` into it. With `fs.protected_regular=0` an open with `O_CREAT` adopts
/// it, and its owner can rewrite the verified bytes; with it set, such an
/// open fails. Either way the download must not use it: it is moved aside
/// untouched, and the file put in place is root's, with the source's bytes.
#[test]
fn a_part_file_planted_by_another_user_is_never_adopted() {
    if !nix::unistd::geteuid().is_root() {
        mftd_tests::say_skipped("part_files", "needs root to act as a second user (CI runs as root)");
        return;
    }
    let protected = std::fs::read_to_string("/proc/sys/fs/protected_regular").unwrap_or_default();
    println!("fs.protected_regular = {}", protected.trim());
    let server = Daemon::start(1);
    write_file(&server.export.join("p"), 4 * MIB, 61);
    warm(&server, "p");
    let client = Daemon::start(0);
    // A sticky, world-writable directory the other user can reach.
    std::fs::set_permissions(client.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let shared = client.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let planted = shared.join("p.mftpart");
    as_nobody(&format!("printf 'planted by uid {NOBODY}' > '{}'", planted.display()));
    let before = std::fs::metadata(&planted).unwrap();
    assert_eq!(before.uid(), NOBODY);
    let planted_bytes = std::fs::read(&planted).unwrap();

    let out = client.ctl(&["get", "p", "--from", &server.sources()[0], "-o", shared.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}\n{}", stdout(&out), stderr(&out), client.log());

    let done = shared.join("p");
    assert_eq!(sha256_file(&done), sha256_file(&server.export.join("p")));
    let meta = std::fs::metadata(&done).unwrap();
    assert_ne!(meta.ino(), before.ino(), "the planted file was renamed into place");
    assert_eq!(meta.uid(), 0, "the file put in place belongs to uid {}", meta.uid());
    // The planted file is still its owner's, with its bytes, moved aside.
    let aside = find_inode(&shared, before.ino()).expect("the planted file is gone");
    let name = aside.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("p.mftpart.foreign-"), "{name}");
    assert_eq!(std::fs::read(&aside).unwrap(), planted_bytes, "the planted file was written to");
    assert_eq!(std::fs::metadata(&aside).unwrap().uid(), NOBODY);
    assert!(!planted.exists(), "a part file was left behind");
    assert!(client.log().contains("moved it aside"), "{}", client.log());
}

/// A download acting for a user (a member of the socket group) cannot move
/// another user's file out of a sticky directory: it is refused with a
/// sentence that says whose the file is and what to do, and the file stays
/// as it was.
#[test]
fn a_part_file_that_cannot_be_moved_aside_is_refused_with_the_reason() {
    if !nix::unistd::geteuid().is_root() || nix::unistd::Group::from_gid(NOBODY.into()).ok().flatten().is_none() {
        mftd_tests::say_skipped("part_files", "needs root and a group with gid 65534");
        return;
    }
    let server = Daemon::start(1);
    write_file(&server.export.join("p"), MIB, 62);
    warm(&server, "p");
    let group = nix::unistd::Group::from_gid(NOBODY.into()).unwrap().unwrap().name;
    let client = Daemon::builder(0).arg("--socket-group").arg(group).start();
    std::fs::set_permissions(client.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = client.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Root's file this time; the download is uid 65534's.
    let planted = shared.join("p.mftpart");
    std::fs::write(&planted, b"root's file").unwrap();
    let ino = std::fs::metadata(&planted).unwrap().ino();
    let out = Command::new("setpriv")
        .args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups"])
        .arg(mftd_tests::mftctl_bin())
        .args(["--socket", client.socket.to_str().unwrap(), "get", "p", "--from", &server.sources()[0]])
        .args(["-o", shared.to_str().unwrap()])
        .env_remove("MFTD_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}{}\n{}", stdout(&out), stderr(&out), client.log());
    let said = format!("{}{}", stdout(&out), stderr(&out));
    let why = "belongs to uid 0 and was not created by this download";
    assert!(said.contains(why) && said.contains("remove it (or ask its owner to) and resume"), "{said}");
    let dl = client.downloads_list().into_iter().next().expect("the download is listed");
    assert!(dl.error.as_deref().unwrap_or_default().contains(why), "{dl:?}");
    assert_eq!(std::fs::read(&planted).unwrap(), b"root's file");
    assert_eq!(std::fs::metadata(&planted).unwrap().ino(), ino);
    assert!(!shared.join("p").exists());
}

fn find_inode(dir: &Path, ino: u64) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.ino() == ino))
}
