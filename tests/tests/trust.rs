//! The control socket is not a root shell: a member of the socket group who
//! is neither root nor mftd's own user gets only what they could do
//! themselves, and other servers see them as themselves (a node identity of
//! their own, not mftd's; trust on first use recorded for them alone).
//! Played from the attacker's seat with a real second uid (`setpriv`),
//! against a real daemon running as root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};
use std::time::Duration;

use mftd_common::control::{DownloadState, ListenerState};
use mftd_tests::member::{daemon, nobodys_dir, NOBODY};
use mftd_tests::{mftctl_bin, sha256_file, stderr, stdout, wait_until, write_file, Daemon};

/// A group nobody else uses, for "not the socket group".
const OTHER_GID: u32 = 4711;

macro_rules! skip_unless_possible {
    () => {
        mftd_tests::require_second_uid!();
    };
}

/// The name of gid 65534's group (the socket group of [`daemon`]).
fn nobodys_group() -> String {
    nix::unistd::Group::from_gid(NOBODY.into()).ok().flatten().expect("group 65534").name
}

/// `mftctl --socket S ARGS` as uid 65534 with primary group `gid` and
/// supplementary `groups`.
fn ctl_as(d: &Daemon, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", &NOBODY.to_string(), "--regid", &gid.to_string()]);
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        c.args(["--groups", &list.join(",")]);
    }
    c.arg(mftctl_bin()).arg("--socket").arg(&d.socket).args(args).env_remove("MFTD_SOCKET");
    c.output().expect("run setpriv")
}

fn nobody(d: &Daemon, args: &[&str]) -> Output {
    ctl_as(d, NOBODY, &[], args)
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

#[test]
fn a_group_member_downloads_only_where_it_could_write_itself() {
    skip_unless_possible!();
    let server = Daemon::start(1);
    write_file(&server.export.join("authorized_keys"), 300 << 10, 3);
    let client = daemon(&[]);
    let from = &server.sources()[0];
    // The reproduction from the issue: a directory the caller cannot even
    // list, written by the daemon as root. Now refused, nothing written.
    let protected = client.dir.path().join("protected");
    std::fs::create_dir(&protected).unwrap();
    std::fs::set_permissions(&protected, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", protected.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("permission denied") && text(&out).contains("cannot write to"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(&protected).unwrap().count(), 0, "something was written");
    // What lies behind a directory it may not enter stays unsaid.
    let behind = protected.join("no/such/dir");
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", behind.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("cannot enter") && !text(&out).contains("does not exist"), "{}", text(&out));
    // Nor through a symlink of its own pointing there.
    let link = client.dir.path().join("link-to-protected");
    std::os::unix::fs::symlink(protected.join("no/such"), &link).unwrap();
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", link.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("symbolic link") && !text(&out).contains("does not exist"), "{}", text(&out));
    // Nor may it have mftd create a directory there for it.
    let sub = protected.join("sub");
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", sub.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("permission denied"), "{}", text(&out));
    assert!(!sub.exists(), "created a directory for the caller where it may not");
    // Root may (its rights are the daemon's).
    let out = client.ctl(&["get", "authorized_keys", "--from", from, "-o", protected.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // Its own directory: allowed, and the file is its own; a missing
    // directory inside it is created, as its own too.
    let mine = nobodys_dir(client.dir.path(), "mine");
    let made = mine.join("made/here");
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", made.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), NOBODY);
    assert_eq!(std::fs::metadata(made.join("authorized_keys")).unwrap().uid(), NOBODY);
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", mine.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out), client.log());
    let got = mine.join("authorized_keys");
    assert_eq!(sha256_file(&got), sha256_file(&server.export.join("authorized_keys")));
    assert_eq!(std::fs::metadata(&got).unwrap().uid(), NOBODY, "the file belongs to the caller");
    // --force replaces only what it could replace itself: not root's file in
    // a sticky directory.
    let sticky = client.dir.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(sticky.join("authorized_keys"), b"root's").unwrap();
    let out = nobody(&client, &["get", "authorized_keys", "--from", from, "-o", sticky.to_str().unwrap(), "--force"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("does not own"), "{}", text(&out));
    assert_eq!(std::fs::read(sticky.join("authorized_keys")).unwrap(), b"root's");
}

#[test]
fn a_directory_swapped_for_a_symlink_after_the_check_leads_nowhere() {
    skip_unless_possible!();
    // The check passes on the caller's own directory; before the part file
    // is created, the caller swaps that directory for a symlink into one
    // only root may enter. The file operations run with the caller's
    // file-system identity, so the kernel refuses them.
    let server = Daemon::start(1);
    write_file(&server.export.join("x.bin"), 1 << 20, 5);
    let port = server.ports[0].to_string();
    assert!(server.ctl(&["servers", "stop", &port]).status.success());
    let client = daemon(&[]);
    let home = nobodys_dir(client.dir.path(), "home");
    let out_dir = nobodys_dir(&home, "out");
    let root_only = client.dir.path().join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out =
        nobody(&client, &["get", "x.bin", "--from", &server.sources()[0], "-o", out_dir.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let id: u64 = stdout(&out).trim().parse().expect("id");
    // Accepted, waiting for its source: now the swap.
    std::fs::rename(&out_dir, home.join("moved")).unwrap();
    std::os::unix::fs::symlink(&root_only, &out_dir).unwrap();
    assert!(server.ctl(&["servers", "start", &port]).status.success());
    assert!(
        wait_until(Duration::from_secs(20), || client.download(id).state == DownloadState::Failed),
        "{:?}\n{}",
        client.download(id),
        client.log()
    );
    assert!(
        client.download(id).error.as_deref().unwrap_or("").contains("Permission denied"),
        "{:?}",
        client.download(id)
    );
    assert_eq!(std::fs::read_dir(&root_only).unwrap().count(), 0, "wrote into root's directory");
}

#[test]
fn supplementary_groups_come_from_the_socket() {
    skip_unless_possible!();
    let d = daemon(&[]);
    // In the socket group only as a supplementary group.
    let out = ctl_as(&d, OTHER_GID, &[NOBODY], &["servers", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    // Not in it at all.
    let out = ctl_as(&d, OTHER_GID, &[], &["servers", "list"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("permission denied"), "{}", text(&out));
}

#[test]
fn a_secret_file_is_read_with_the_callers_rights() {
    skip_unless_possible!();
    let server = Daemon::start(1);
    write_file(&server.export.join("s.bin"), 1000, 9);
    let client = daemon(&[]);
    let mine = nobodys_dir(client.dir.path(), "mine");
    let from = &server.sources()[0];
    let secret = client.dir.path().join("root-secret");
    std::fs::write(&secret, "s3cret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = |s: &str| {
        vec![
            "get".to_string(),
            "s.bin".into(),
            "--from".into(),
            from.clone(),
            "-o".into(),
            mine.display().to_string(),
            "--secret-file".into(),
            s.into(),
        ]
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        nobody(&client, &a)
    };
    let out = run(args(secret.to_str().unwrap()));
    assert_ne!(out.status.code(), Some(0));
    // Opened with the caller's rights (the daemon runs as root here): the
    // kernel refuses it before anything about the file is learnt.
    assert!(text(&out).contains("secret file") && text(&out).contains("Permission denied"), "{}", text(&out));
    // A FIFO would block a reader forever: refused at once, daemon fine.
    let fifo = mine.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let started = std::time::Instant::now();
    let out = run(args(fifo.to_str().unwrap()));
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("not a regular file"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(client.ctl(&["status"]).status.success());
}

#[test]
fn download_roots_confine_restricted_callers() {
    skip_unless_possible!();
    let server = Daemon::start(1);
    write_file(&server.export.join("r.bin"), 5000, 11);
    let roots = tempfile::tempdir().unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let inside = nobodys_dir(roots.path(), "in");
    let client = daemon(&["--download-roots", roots.path().to_str().unwrap()]);
    let outside = nobodys_dir(client.dir.path(), "out");
    let from = &server.sources()[0];
    let out = nobody(&client, &["get", "r.bin", "--from", from, "-o", outside.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("download_roots"), "{}", text(&out));
    let out = nobody(&client, &["get", "r.bin", "--from", from, "-o", inside.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(inside.join("r.bin").exists());
}

#[test]
fn a_group_member_manages_only_its_own_downloads() {
    skip_unless_possible!();
    let server = Daemon::builder(1).arg("--rate-limit").arg("1M").start();
    write_file(&server.export.join("slow.bin"), 16 << 20, 13);
    let client = daemon(&[]);
    let id = client.get_detached("slow.bin", &server.sources(), &[]);
    assert!(wait_until(Duration::from_secs(10), || client.download(id).state == DownloadState::Active));
    for verb in ["cancel", "pause"] {
        let out = nobody(&client, &["downloads", verb, &id.to_string()]);
        assert_ne!(out.status.code(), Some(0), "{verb}: {}", text(&out));
        // Exactly what an unknown ID gets: nothing about whose it is.
        assert_eq!(text(&out), format!("mftctl: no download with ID {id}; `mftctl downloads list` shows them\n"));
    }
    // Nor may it see them: where root writes is root's business.
    let out = nobody(&client, &["--json", "downloads", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains("slow.bin"), "{}", stdout(&out));
    let out = nobody(&client, &["downloads", "show", &id.to_string()]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("slow.bin"), "{}", text(&out));
    assert_eq!(client.download(id).state, DownloadState::Active);
    assert!(client.ctl(&["downloads", "cancel", &id.to_string()]).status.success());
}

/// Listeners and the daemon itself are the operator's: a group member may
/// look, not stop, add, limit or shut down.
#[test]
fn a_group_member_cannot_change_listeners_or_stop_mftd() {
    skip_unless_possible!();
    let d = daemon(&["--ports", "0"]);
    let port = d.servers()[0].port.to_string();
    for args in [
        vec!["servers", "stop", port.as_str()],
        vec!["servers", "limit", port.as_str(), "1K"],
        vec!["servers", "add"],
        vec!["shutdown"],
    ] {
        let out = nobody(&d, &args);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("permission denied"), "{args:?}: {}", text(&out));
    }
    assert_eq!(d.servers().len(), 1);
    assert_eq!(d.servers()[0].state, ListenerState::Running);
    assert!(d.ctl(&["status"]).status.success(), "the daemon stopped");
}

/// A group member never borrows the daemon's own shared secret: its
/// downloads would send proofs under it to servers of its choosing.
#[test]
fn a_group_member_does_not_borrow_the_daemons_secret() {
    skip_unless_possible!();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "daemon-secret-1234").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = Daemon::builder(1).arg("--auth-secret-file").arg(secret.to_str().unwrap()).start();
    write_file(&server.export.join("a.bin"), 1000, 3);
    let client = daemon(&["--auth-secret-file", secret.to_str().unwrap()]);
    let mine = nobodys_dir(client.dir.path(), "mine");
    // Root downloads with the daemon's secret...
    let out = client.ctl(&["get", "a.bin", "--from", &server.sources()[0], "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // ...a group member does not.
    let out = nobody(
        &client,
        &["get", "a.bin", "--from", &server.sources()[0], "-o", mine.to_str().unwrap(), "--give-up-after", "5s"],
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("requires authentication"), "{}", text(&out));
    assert!(!mine.join("a.bin").exists());
}

/// Rights are checked again when a paused download runs anew: a directory
/// the member may no longer write to is not written on its behalf.
#[test]
fn a_resumed_download_is_checked_against_the_rights_of_now() {
    skip_unless_possible!();
    let server = Daemon::builder(1).arg("--rate-limit").arg("1M").start();
    write_file(&server.export.join("r.bin"), 8 << 20, 21);
    let client = daemon(&[]);
    let mine = nobodys_dir(client.dir.path(), "mine");
    let out =
        nobody(&client, &["get", "r.bin", "--from", &server.sources()[0], "-o", mine.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let id = stdout(&out).trim().to_string();
    let id_n: u64 = id.parse().expect("id");
    assert!(wait_until(Duration::from_secs(10), || client.download(id_n).bytes_done > 0));
    assert!(nobody(&client, &["downloads", "pause", &id]).status.success());
    assert!(
        wait_until(Duration::from_secs(10), || client.download(id_n).state == DownloadState::Paused),
        "{:?}\n{}",
        client.download(id_n),
        client.log()
    );
    // The directory is taken away from it.
    nix::unistd::chown(&mine, Some(0.into()), Some(0.into())).unwrap();
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = nobody(&client, &["downloads", "resume", &id]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("cannot write to"), "{}", text(&out));
    assert_eq!(client.download(id_n).state, DownloadState::Paused);
}

/// The node ID `mftctl --json status` shows uid 65534.
fn nobodys_node_id(d: &Daemon) -> String {
    let out = nobody(d, &["--json", "status"]);
    assert!(out.status.success(), "{}", text(&out));
    match mftd_tests::typed_lines(&stdout(&out)).first().map(|l| l.response().clone()) {
        Some(mftd_common::control::Response::Status(s)) => s.node_id,
        other => panic!("status answered {other:?}"),
    }
}

/// A server's `allow_nodes` means what it says: one that allows mftd's node
/// does not serve every member of mftd's socket group through it. A member's
/// download presents the member's own node ID (shown to it by `status`),
/// which a server may allow in its own right.
#[test]
fn a_members_download_presents_its_own_node_not_mftds() {
    skip_unless_possible!();
    let client = daemon(&[]);
    let daemons_id = client.status().node_id;
    let only_mftd = Daemon::builder(1).arg("--allow-nodes").arg(&daemons_id).start();
    write_file(&only_mftd.export.join("conf.txt"), 200 << 10, 41);
    let from = &only_mftd.sources()[0];
    let mine = nobodys_dir(client.dir.path(), "mine");
    let members_id = nobodys_node_id(&client);
    assert_eq!(members_id.len(), 26, "{members_id}");
    assert_ne!(members_id, daemons_id, "the member is shown mftd's node ID");
    let out = nobody(&client, &["status"]);
    assert!(stdout(&out).contains(&members_id) && !stdout(&out).contains(&daemons_id), "{}", stdout(&out));
    // The reproduction from the issue: refused, and the refusal names the
    // node the member presented.
    let out = nobody(&client, &["get", "conf.txt", "--from", from, "-o", mine.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0), "a member was served as mftd: {}", text(&out));
    assert!(text(&out).contains("allow_nodes") && text(&out).contains(&members_id), "{}", text(&out));
    assert!(!mine.join("conf.txt").exists());
    // Root's download through the same daemon is mftd's, and allowed.
    let out = client.ctl(&["get", "conf.txt", "--from", from, "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sha256_file(&client.downloads.join("conf.txt")), sha256_file(&only_mftd.export.join("conf.txt")));
    // A server that allows the member's own node serves it.
    let members_server = Daemon::builder(1).arg("--allow-nodes").arg(&members_id).start();
    write_file(&members_server.export.join("conf.txt"), 200 << 10, 42);
    let from = &members_server.sources()[0];
    let out = nobody(&client, &["get", "conf.txt", "--from", from, "-o", mine.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out), client.log());
    assert_eq!(sha256_file(&mine.join("conf.txt")), sha256_file(&members_server.export.join("conf.txt")));
    // ...and not root: its downloads are mftd's.
    let out = client.ctl(&["get", "conf.txt", "--from", from, "-o", client.downloads.to_str().unwrap(), "--force"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("allow_nodes") && text(&out).contains(&daemons_id), "{}", text(&out));
}

/// A member's download resumed after a restart (from its manifest) still
/// presents the member's node: a server that allows only the member keeps
/// serving it, one that allows only mftd would not.
#[test]
fn a_members_download_resumed_after_a_restart_keeps_its_node() {
    skip_unless_possible!();
    let mut client = daemon(&[]);
    let members_id = nobodys_node_id(&client);
    assert_ne!(members_id, client.status().node_id, "the member is shown mftd's node ID");
    let server = Daemon::builder(1).arg("--allow-nodes").arg(&members_id).arg("--rate-limit").arg("2M").start();
    write_file(&server.export.join("r.bin"), 8 << 20, 43);
    let mine = nobodys_dir(client.dir.path(), "mine");
    let out =
        nobody(&client, &["get", "r.bin", "--from", &server.sources()[0], "-o", mine.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let id: u64 = stdout(&out).trim().parse().expect("id");
    assert!(
        wait_until(Duration::from_secs(10), || client.download(id).bytes_done > 1 << 20),
        "{:?}\n{}",
        client.download(id),
        client.log()
    );
    client.kill();
    client.spawn_again(&["--socket-group".into(), nobodys_group(), "--auto-resume".into()]);
    let dl = client.wait_download(id, Duration::from_secs(60));
    assert_eq!(dl.state, DownloadState::Done, "resumed as mftd's node? {dl:?}\n{}", client.log());
    assert_eq!(sha256_file(&mine.join("r.bin")), sha256_file(&server.export.join("r.bin")));
    assert_eq!(nobodys_node_id(&client), members_id, "the member's node changed across a restart");
}

/// Under trust on first use a member's downloads record the nodes they met
/// in the member's own `known_nodes`: mftd's stays byte for byte as it was,
/// so a member can neither pin nor deny an address for root.
#[test]
fn a_members_first_use_is_recorded_for_the_member_alone() {
    skip_unless_possible!();
    let client = daemon(&["--node-trust", "tofu"]);
    let state = client.dir.path().join("state");
    let (daemons, members) = (state.join("known_nodes"), state.join("users/65534/known_nodes"));
    let mut first = Daemon::start(1);
    let port = first.ports[0];
    write_file(&first.export.join("a"), 300 << 10, 44);
    let (first_id, addr) = (first.status().node_id, format!("127.0.0.1:{port}"));
    // Something of the operator's own already recorded, to compare against.
    std::fs::write(&daemons, "# the operator's\n").unwrap();
    let before = std::fs::read(&daemons).unwrap();
    let mine = nobodys_dir(client.dir.path(), "mine");
    let out = nobody(&client, &["get", "a", "--from", &addr, "-o", mine.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out), client.log());
    assert_eq!(std::fs::read(&daemons).unwrap(), before, "a member's first use was recorded in mftd's known_nodes");
    let recorded = std::fs::read_to_string(&members).expect("the member's known_nodes");
    assert!(recorded.contains(&format!("{addr} {first_id}")), "{recorded}");
    // Another node on the same address: the member's record refuses it...
    first.terminate(Duration::from_secs(10)).expect("server exits");
    let second = Daemon::builder(0).arg("--ports").arg(port.to_string()).start();
    write_file(&second.export.join("a"), 300 << 10, 45);
    let second_id = second.status().node_id;
    let out = nobody(&client, &["get", "a", "--from", &addr, "-o", mine.to_str().unwrap(), "--force"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains(&first_id) && text(&out).contains(&second_id), "{}", text(&out));
    // ...but binds nobody else: root meets the address for the first time.
    let out = client.ctl(&["get", "a", "--from", &addr, "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "root is bound by the member's record: {}", text(&out));
    assert_eq!(sha256_file(&client.downloads.join("a")), sha256_file(&second.export.join("a")));
    let operators = std::fs::read_to_string(&daemons).unwrap();
    assert!(operators.contains(&format!("{addr} {second_id}")), "{operators}");
    // What the operator recorded is read for members too, before their own.
    let out = nobody(&client, &["get", "a", "--from", &addr, "-o", mine.to_str().unwrap(), "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sha256_file(&mine.join("a")), sha256_file(&second.export.join("a")));
    assert_eq!(std::fs::read_to_string(&members).unwrap(), recorded, "the member's record changed");
}
