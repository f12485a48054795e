//! The export jail, probed with raw protocol frames.

use std::os::unix::fs::symlink;

use mftd_common::proto::{ErrorCode, Frame, ReadReq, MAGIC};
use mftd_tests::{write_file, Daemon, RawConn};

const SENTINEL: &[u8] = b"SENTINEL-outside-the-export-root";

fn setup() -> Daemon {
    let d = Daemon::start(1);
    write_file(&d.export.join("ok.bin"), 1000, 5);
    std::fs::write(d.dir.path().join("secret"), SENTINEL).unwrap();
    symlink(d.dir.path().join("secret"), d.export.join("link-out")).unwrap();
    symlink(d.dir.path(), d.export.join("dir-out")).unwrap();
    symlink("ok.bin", d.export.join("link-in")).unwrap();
    d
}

fn stat(c: &mut RawConn, path: &str) -> Frame {
    c.send(&Frame::Stat { path: path.into() });
    c.recv().expect("server answers")
}

#[test]
fn traversal_and_symlink_escapes_are_refused_then_valid_request_succeeds() {
    let d = setup();
    let mut c = RawConn::hello(d.ports[0]);
    let cases: &[(&str, ErrorCode)] = &[
        ("../secret", ErrorCode::BadPath),
        ("/etc/passwd", ErrorCode::BadPath),
        ("a/../../secret", ErrorCode::BadPath),
        ("ok.bin\0x", ErrorCode::BadPath),
        ("..\\secret", ErrorCode::BadPath),
        ("link-out", ErrorCode::PathRefused),
        ("dir-out/secret", ErrorCode::PathRefused),
        (".", ErrorCode::BadPath),
        ("nothing-here", ErrorCode::NotFound),
    ];
    for (path, code) in cases {
        match stat(&mut c, path) {
            Frame::Error(e) => {
                assert_eq!(e.code, *code, "{path:?}: {}", e.message);
                assert!(!e.message.contains("SENTINEL"));
            }
            other => panic!("{path:?} was not refused: {other:?}"),
        }
    }
    // READ of an escaping path is refused as well, with the request id.
    c.send(&Frame::Read(ReadReq {
        id: 42,
        offset: 0,
        len: 8,
        size: SENTINEL.len() as u64,
        mtime_ns: 0,
        path: "link-out".into(),
    }));
    match c.recv() {
        Some(Frame::Error(e)) => {
            assert_eq!(e.id, 42);
            assert_eq!(e.code, ErrorCode::PathRefused);
        }
        other => panic!("escaping READ answered with {other:?}"),
    }
    // Over-long path: rejected, connection closed with BAD_FRAME or BAD_PATH.
    let mut c2 = RawConn::hello(d.ports[0]);
    match stat(&mut c2, &"a".repeat(64 << 10)) {
        Frame::Error(e) => assert!(matches!(e.code, ErrorCode::BadFrame | ErrorCode::BadPath), "{e:?}"),
        other => panic!("{other:?}"),
    }
    // Invalid UTF-8 path bytes.
    let mut c3 = RawConn::hello(d.ports[0]);
    let mut frame = vec![0x02u8];
    frame.extend_from_slice(&3u32.to_be_bytes());
    frame.extend_from_slice(&[0xff, 0xfe, 0x2f]);
    c3.send_raw(&frame);
    assert!(matches!(c3.recv(), Some(Frame::Error(_))));

    // The same connection still serves valid requests, symlinks inside too.
    for p in ["ok.bin", "link-in"] {
        match stat(&mut c, p) {
            Frame::StatOk(s) => {
                assert_eq!(s.size, 1000);
                c.send(&Frame::Read(ReadReq {
                    id: 7,
                    offset: 0,
                    len: 1000,
                    size: s.size,
                    mtime_ns: s.mtime_ns,
                    path: p.into(),
                }));
                match c.recv() {
                    Some(Frame::Data(h)) => assert_eq!((h.id, h.len), (7, 1000)),
                    other => panic!("{other:?}"),
                }
                let bytes = c.read_payload(1000);
                assert_eq!(bytes, std::fs::read(d.export.join("ok.bin")).unwrap());
            }
            other => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn bad_handshake_version_and_ranges() {
    let d = setup();
    let mut c = RawConn::connect(d.ports[0]);
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n");
    match c.recv() {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::BadHandshake),
        other => panic!("{other:?}"),
    }
    // Before the handshake a peer gets no big buffer: a HELLO announcing
    // 1 MiB is refused at once, without reading (or waiting for) its body.
    let mut c = RawConn::connect(d.ports[0]);
    let mut header = vec![mftd_common::proto::T_HELLO];
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    c.send_raw(&header);
    let asked = std::time::Instant::now();
    match c.recv() {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::BadHandshake),
        other => panic!("{other:?}"),
    }
    assert!(asked.elapsed() < std::time::Duration::from_secs(5), "waited for the announced body");
    // A newer client, and old peers (v1: before streamed READs and TRIM;
    // v2: STAT only after hashing; v3: no TLS, challenge in clear), are
    // refused with both versions named.
    for v in [9u16, 1, 2, 3] {
        let mut c = RawConn::connect(d.ports[0]);
        c.send(&Frame::Hello { magic: MAGIC, version: v, flags: 0 });
        match c.recv() {
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::VersionMismatch);
                let want =
                    format!("server speaks mftd transfer protocol {}, client sent {v}", mftd_common::proto::VERSION);
                assert_eq!(e.message, want);
            }
            other => panic!("{other:?}"),
        }
    }
    let mut c = RawConn::hello(d.ports[0]);
    let Frame::StatOk(s) = stat(&mut c, "ok.bin") else { panic!() };
    for (offset, len) in [(999, 2), (u64::MAX, 2), (0, 1 << 40)] {
        c.send(&Frame::Read(ReadReq { id: 1, offset, len, size: s.size, mtime_ns: s.mtime_ns, path: "ok.bin".into() }));
        match c.recv() {
            Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::BadRange),
            other => panic!("{offset}+{len}: {other:?}"),
        }
    }
    c.send(&Frame::Read(ReadReq {
        id: 1,
        offset: 0,
        len: 1,
        size: s.size + 1,
        mtime_ns: s.mtime_ns,
        path: "ok.bin".into(),
    }));
    match c.recv() {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::FileChanged),
        other => panic!("{other:?}"),
    }
    // Oversized frame header: error, connection closed, listener fine.
    let mut c = RawConn::hello(d.ports[0]);
    let mut f = vec![0x02u8];
    f.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send_raw(&f);
    assert!(matches!(c.recv(), Some(Frame::Error(e)) if e.code == ErrorCode::BadFrame));
    assert!(c.recv().is_none(), "connection closed after a bad frame");
    let mut c = RawConn::hello(d.ports[0]);
    assert!(matches!(stat(&mut c, "ok.bin"), Frame::StatOk(_)));
}

#[test]
fn special_files_are_refused() {
    let d = setup();
    nix::unistd::mkfifo(&d.export.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::create_dir(d.export.join("subdir")).unwrap();
    let mut c = RawConn::hello(d.ports[0]);
    for p in ["fifo", "subdir"] {
        match stat(&mut c, p) {
            Frame::Error(e) => assert_eq!(e.code, ErrorCode::NotRegular, "{p}"),
            other => panic!("{p}: {other:?}"),
        }
    }
}
