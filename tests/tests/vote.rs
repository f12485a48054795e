//! The version vote and cold starts, through the real binaries: servers
//! answer STAT before they have hashed a file, data flows meanwhile, and a
//! fast liar cannot pick the file while honest servers are still hashing.

use std::time::{Duration, Instant};

use mftd_common::control::{DownloadInfo, SourceState};
use mftd_common::proto::{DataHeader, Frame, ReadReq};
use mftd_tests::{identity_of, sha256_file, source, stderr, stdout, warm, write_file, Daemon, RawConn};

const MIB: u64 = 1 << 20;

/// A file of `size` bytes that takes as long to hash as any other but
/// costs nothing to write: sparse, with some data at the front.
fn sparse_file(path: &std::path::Path, size: u64) {
    write_file(path, MIB, 77);
    std::fs::OpenOptions::new().write(true).open(path).expect("open").set_len(size).expect("set_len");
}

#[test]
fn stat_is_answered_before_hashing_and_hashes_do_not_block_reads() {
    // One hashing thread and 512 MiB: hashing takes a few hundred ms here.
    let server = Daemon::builder(1).arg("--hash-threads").arg("1").start();
    sparse_file(&server.export.join("big"), 512 * MIB);
    write_file(&server.export.join("small"), 3 * MIB, 5);
    let mut c = RawConn::hello(server.ports[0]);
    // A small file is hashed before the answer: it carries the root.
    c.send(&Frame::Stat { path: "small".into() });
    match c.recv() {
        Some(Frame::StatOk(s)) => assert!(s.root.is_some(), "{s:?}"),
        other => panic!("{other:?}"),
    }
    let asked = Instant::now();
    c.send(&Frame::Stat { path: "big".into() });
    let stat = match c.recv() {
        Some(Frame::StatOk(s)) => s,
        other => panic!("{other:?}"),
    };
    let stat_took = asked.elapsed();
    assert_eq!(stat.root, None, "a cold 512 MiB file answered with a root after {stat_took:?}");
    assert_eq!(stat.size, 512 * MIB);
    // HASHES, then a READ behind it: the READ is answered first, the hash
    // list when the server has it.
    c.send(&Frame::Hashes { size: stat.size, mtime_ns: stat.mtime_ns, path: "big".into() });
    c.send(&Frame::Read(ReadReq {
        id: 1,
        offset: 0,
        len: MIB,
        size: stat.size,
        mtime_ns: stat.mtime_ns,
        path: "big".into(),
    }));
    match c.recv() {
        Some(Frame::Data(DataHeader { id: 1, offset: 0, len })) => assert_eq!(len, MIB),
        other => panic!("expected DATA before HASHES_OK, got {other:?}"),
    }
    let data = c.read_payload(MIB);
    let want = std::fs::read(server.export.join("big")).expect("read")[..MIB as usize].to_vec();
    assert!(data == want, "DATA is not the file's first MiB");
    match c.recv() {
        Some(Frame::HashesOk { hashes }) => assert_eq!(hashes.len(), 2048),
        other => panic!("expected HASHES_OK, got {other:?}"),
    }
    let hashed_after = asked.elapsed();
    assert!(
        hashed_after > stat_took * 2,
        "STAT ({stat_took:?}) was not answered well before the hashes ({hashed_after:?})"
    );
    // Now hashed: STAT carries the root.
    c.send(&Frame::Stat { path: "big".into() });
    match c.recv() {
        Some(Frame::StatOk(s)) => assert!(s.root.is_some()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_fast_liar_cannot_pick_the_file_while_honest_servers_hash() {
    let size = 256 * MIB;
    // Three honest listeners, cold, hashing on one thread.
    let honest = Daemon::builder(3).arg("--hash-threads").arg("1").start();
    write_file(&honest.export.join("f.bin"), size, 41);
    // Two liars that have hashed their versions ahead: one a 1-byte file,
    // one the same size with other bytes. Both answer STAT at once, with a
    // root, while the honest servers are still hashing.
    let tiny = Daemon::builder(1).arg("--index-export").start();
    write_file(&tiny.export.join("f.bin"), 1, 42);
    warm(&tiny, "f.bin");
    let same = Daemon::builder(1).start();
    write_file(&same.export.join("f.bin"), size, 43);
    warm(&same, "f.bin");
    let client = Daemon::start(0);
    let mut sources = vec![tiny.sources()[0].clone(), same.sources()[0].clone()];
    sources.extend(honest.sources());
    let out = client.get("f.bin", &sources.join(","), &[]);
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), client.log());
    let dest = client.downloads.join("f.bin");
    assert_eq!(std::fs::metadata(&dest).expect("downloaded").len(), size);
    assert_eq!(sha256_file(&dest), sha256_file(&honest.export.join("f.bin")));
    // Each liar is excluded by name, and the version in use is the honest one.
    let dl: &DownloadInfo = &client.download(1);
    assert_eq!(dl.identity, Some(identity_of(&honest.export.join("f.bin"))), "{dl:?}");
    for liar in [&tiny, &same] {
        let s = source(dl, &liar.sources()[0]);
        assert_eq!(s.state, SourceState::Excluded, "{s:?}");
        let why = s.last_error.as_deref().expect("reason");
        assert!(why.contains("different version") && why.contains("majority"), "{why}");
    }
    assert!(source(dl, &tiny.sources()[0]).last_error.as_deref().unwrap().contains("(1 bytes"), "{dl:?}");
    // The same-size liar's bytes, if any arrived, were not kept.
    assert!(client.log().contains("file version adopted"), "{}", client.log());
}

#[test]
fn a_pinned_identity_excludes_others_and_needs_no_majority() {
    let size = 24 * MIB;
    let honest = Daemon::start(1);
    write_file(&honest.export.join("p.bin"), size, 51);
    let liars = Daemon::start(2);
    write_file(&liars.export.join("p.bin"), size, 52);
    warm(&liars, "p.bin");
    let root = identity_of(&honest.export.join("p.bin"));
    let client = Daemon::start(0);
    let mut sources = liars.sources();
    sources.push(honest.sources()[0].clone());
    // Two against one: only the pin lets the one win.
    let out = client.get("p.bin", &sources.join(","), &["--identity", &root]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("p.bin")), sha256_file(&honest.export.join("p.bin")));
    let dl: &DownloadInfo = &client.download(1);
    for l in liars.sources() {
        let s = source(dl, &l);
        assert_eq!(s.state, SourceState::Excluded, "{s:?}");
        assert!(s.last_error.as_deref().unwrap().contains("pinned version"), "{s:?}");
    }
    // Without the pin, the majority's version wins and the honest one is out.
    std::fs::remove_file(client.downloads.join("p.bin")).expect("rm");
    let out = client.get("p.bin", &sources.join(","), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("p.bin")), sha256_file(&liars.export.join("p.bin")));
    // A pin nobody serves is an error that says so; a malformed one is refused.
    let elsewhere = client.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let elsewhere = elsewhere.to_str().expect("utf-8 path");
    let pin = "ab".repeat(32);
    let out = client.ctl(&["get", "p.bin", "--from", &honest.sources()[0], "-o", elsewhere, "--identity", &pin]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("pinned"), "{text}");
    let out = client.ctl(&["get", "p.bin", "--from", &honest.sources()[0], "-o", elsewhere, "--identity", "xyz"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("64 hexadecimal digits"), "{}", stderr(&out));
}

#[test]
fn a_split_vote_fails_naming_both_versions() {
    let a = Daemon::start(1);
    let b = Daemon::start(1);
    write_file(&a.export.join("s.bin"), 4 * MIB, 61);
    write_file(&b.export.join("s.bin"), 4 * MIB, 62);
    let client = Daemon::start(0);
    let started = Instant::now();
    let out = client.get("s.bin", &format!("{},{}", a.sources()[0], b.sources()[0]), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    let (ra, rb) = (identity_of(&a.export.join("s.bin")), identity_of(&b.export.join("s.bin")));
    assert!(text.contains(&ra[..16]) && text.contains(&rb[..16]) && text.contains("--identity"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(20), "a conflict is reported, not waited out");
    assert!(!client.downloads.join("s.bin").exists());
}

/// A server keeps file identities across restarts, so a big file is not
/// hashed again; a file rewritten with its mtime put back (same size) is
/// noticed by its ctime and hashed again.
#[test]
fn identities_survive_a_restart_and_a_rewrite_is_noticed() {
    let mut server = Daemon::builder(1).arg("--hash-threads").arg("1").start();
    let path = server.export.join("kept.bin");
    write_file(&path, 64 * MIB, 91);
    warm(&server, "kept.bin");
    let stat_of = |server: &Daemon| {
        let port = server.servers()[0].port;
        let mut c = RawConn::hello(port);
        c.send(&Frame::Stat { path: "kept.bin".into() });
        match c.recv() {
            Some(Frame::StatOk(s)) => s,
            other => panic!("{other:?}"),
        }
    };
    let restart = |server: &mut Daemon| {
        server.kill();
        let log = std::fs::OpenOptions::new().append(true).open(server.dir.path().join("mftd.log")).expect("log");
        let mut cmd = server.command(1, &["--hash-threads".into(), "1".into()]);
        cmd.stdout(std::process::Stdio::null()).stderr(log);
        server.child = Some(cmd.spawn().expect("spawn"));
        server.wait_ready();
    };
    restart(&mut server);
    let first = stat_of(&server);
    assert!(first.root.is_some(), "a 64 MiB file was not known after a restart: {first:?}");
    // Same size, same mtime, other bytes: only the ctime tells.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    write_file(&path, 64 * MIB, 92);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    restart(&mut server);
    let after = stat_of(&server);
    assert_eq!(after.mtime_ns, first.mtime_ns, "the test failed to put the mtime back");
    assert_eq!(after.root, None, "a rewritten file was served with its old identity");
    // A damaged identity file is ignored, not trusted.
    let port = server.servers()[0].port;
    let mut c = RawConn::hello(port);
    c.send(&Frame::Hashes { size: after.size, mtime_ns: after.mtime_ns, path: "kept.bin".into() });
    assert!(matches!(c.recv(), Some(Frame::HashesOk { .. })), "not hashed");
    for e in std::fs::read_dir(server.dir.path().join("state/identities")).unwrap().flatten() {
        let mut b = std::fs::read(e.path()).unwrap();
        let n = b.len();
        b[n / 2] ^= 1;
        std::fs::write(e.path(), b).unwrap();
    }
    restart(&mut server);
    assert_eq!(stat_of(&server).root, None, "a damaged identity file was trusted");
}

/// `get --size` leaves out sources of another size: two sources that
/// disagree (a conflict without it) settle on the expected one.
#[test]
fn an_expected_size_settles_a_disagreement_about_the_size() {
    let a = Daemon::start(1);
    let b = Daemon::start(1);
    write_file(&a.export.join("z.bin"), MIB, 71);
    write_file(&b.export.join("z.bin"), 2 * MIB, 72);
    let client = Daemon::start(0);
    let from = format!("{},{}", a.sources()[0], b.sources()[0]);
    let out = client.get("z.bin", &from, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(format!("{}{}", stdout(&out), stderr(&out)).contains("disagree"));
    let out = client.get("z.bin", &from, &["--size", "2M"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("z.bin")), sha256_file(&b.export.join("z.bin")));
}
