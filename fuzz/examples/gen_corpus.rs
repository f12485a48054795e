//! Regenerates the committed seed corpus under `fuzz/corpus/` from real
//! values of the `mftd-common` types. Run from the repository root:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//!
//! Seeds are small on purpose; the fuzzer grows its own working copy.
use std::fs;
use std::path::{Path, PathBuf};

use mftd_common::control::{GetRequest, Request};
use mftd_common::manifest::{Key, Manifest, FORMAT, VERSION as MANIFEST_VERSION};

/// The key the manifest fuzz target checksums with.
const KEY: Key = [0x5a; 32];
use mftd_common::proto::{
    piece_count_for, piece_size_for, DataHeader, ErrorCode, ErrorFrame, Frame, Identity, ReadReq, StatInfo, HEADER_LEN,
    MAGIC, VERSION,
};
use mftd_common::range::Range;
use serde_json::json;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).unwrap();
}

fn ident(size: u64) -> Identity {
    let ps = piece_size_for(size);
    let n = piece_count_for(size, ps) as usize;
    let hashes = (0..n as u64).map(piece_hash).collect();
    Identity::from_hashes(size, ps, hashes)
}

fn stat(size: u64, mtime_ns: i64, hashed: bool) -> StatInfo {
    let id = ident(size);
    StatInfo { size, mtime_ns, piece_size: id.piece_size, root: hashed.then_some(id.root) }
}

// Any 32 bytes do as a piece hash (the root is computed from them).
fn piece_hash(i: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (k, b) in out.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(k as u8 * 7);
    }
    out
}

fn frames() -> Vec<(&'static str, Frame)> {
    vec![
        ("hello", Frame::Hello { magic: MAGIC, version: VERSION, flags: 0 }),
        ("stat", Frame::Stat { path: "iso/big.iso".into() }),
        (
            "read",
            Frame::Read(ReadReq {
                id: 7,
                offset: 1 << 20,
                len: 512 << 10,
                size: 1 << 30,
                mtime_ns: -5,
                path: "a/b".into(),
            }),
        ),
        ("stat_ok_empty", Frame::StatOk(stat(0, 1_700_000_000_000_000_000, true))),
        ("stat_ok_1piece", Frame::StatOk(stat(1000, 1, true))),
        ("stat_ok_2pieces", Frame::StatOk(stat((256 << 10) + 1, 2, true))),
        ("stat_ok_hashing", Frame::StatOk(stat(5 << 30, 3, false))),
        ("data", Frame::Data(DataHeader { id: 1, offset: 2, len: 3 })),
        ("error", Frame::Error(ErrorFrame { id: 0, code: ErrorCode::NotFound, message: "no such file".into() })),
        ("auth", Frame::Auth { mac: piece_hash(9) }),
    ]
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        ("hello", Request::Hello { protocol: 1, client: "mftctl 0.1.0".into() }),
        ("status", Request::Status),
        ("servers_list", Request::ServersList),
        ("server_stop", Request::ServerStop { port: 5003 }),
        ("server_start", Request::ServerStart { port: 5003 }),
        ("server_add", Request::ServerAdd { port: Some(5004), rate_limit: Some(1 << 20), transport: Some("plain".into()) }),
        ("server_remove", Request::ServerRemove { port: 5004 }),
        ("server_limit", Request::ServerLimit { port: 5001, rate_limit: 0 }),
        (
            "get_full",
            // Built from JSON so fields added later with serde defaults need no edit here.
            Request::Get(
                serde_json::from_value::<GetRequest>(json!({
                    "remote_path": "iso/big.iso",
                    "sources": ["127.0.0.1:5001", "[::1]:5002"],
                    "output_dir": "/tmp",
                    "force": true,
                    "connections_per_source": 4,
                    "give_up_after_secs": 30,
                    "no_resume": false,
                    "secret_file": "/etc/mftd/secret",
                    "output_name": "local.iso",
                }))
                .unwrap(),
            ),
        ),
        ("downloads_list", Request::DownloadsList),
        ("download_show", Request::DownloadShow { id: 1 }),
        ("download_pause", Request::DownloadPause { id: 1 }),
        ("download_resume", Request::DownloadResume { id: 1 }),
        ("download_cancel", Request::DownloadCancel { id: 1 }),
        ("download_remove", Request::DownloadRemove { id: 1 }),
        ("downloads_purge", Request::DownloadsPurge),
        ("download_add_source", Request::DownloadAddSource { id: 1, sources: vec!["10.0.0.7:5001".into()] }),
        ("get_resume", Request::GetResume { id: None }),
        ("watch", Request::Watch { id: 1, interval_ms: 1000 }),
        ("shutdown", Request::Shutdown),
    ]
}

// Built from JSON so fields added later with serde defaults need no edit here.
fn manifest(file: bool) -> Manifest {
    let v = if file {
        json!({
            "format": FORMAT, "version": MANIFEST_VERSION, "id": 3,
            "remote_path": "iso/big.iso",
            "sources": ["127.0.0.1:5001", "127.0.0.1:5002"],
            "destination": "/tmp/big.iso",
            "force": false, "connections_per_source": 2, "give_up_after_secs": null,
            "secret_file": "/etc/mftd/secret",
            "paused": false,
            "stats": { "elapsed_ms": 15200, "sources": [
                { "address": "127.0.0.1:5001", "bytes": 1048576, "bytes_received": 1100000, "ranges_done": 3 } ] },
            "file": { "size": 10u64 << 20, "piece_size": 256u32 << 10, "identity": "ab".repeat(32) },
            "verified": [[0, 4], [6, 7]],
            "received": [Range::new(5 << 18, (5 << 18) + 1000)],
            "checksum": "",
        })
    } else {
        json!({
            "format": FORMAT, "version": MANIFEST_VERSION, "id": 4,
            "remote_path": "notes.txt",
            "sources": ["127.0.0.1:5001"],
            "destination": "/tmp/notes.txt",
            "connections_per_source": 1, "give_up_after_secs": 60,
            "paused": true,
        })
    };
    serde_json::from_value(v).unwrap()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");

    // frame: decode form (type byte + body) and whole wire streams.
    let dir = root.join("frame");
    fs::create_dir_all(&dir).unwrap();
    let mut stream = Vec::new();
    for (name, f) in frames() {
        let wire = f.encode();
        let mut decode_form = vec![wire[0]];
        decode_form.extend_from_slice(&wire[HEADER_LEN..]);
        write(&dir, &format!("decode_{name}"), &decode_form);
        stream.extend_from_slice(&wire);
    }
    let hello = frames()[0].1.encode();
    let stat = frames()[1].1.encode();
    write(&dir, "stream_hello_stat", &[hello.clone(), stat].concat());
    write(&dir, "stream_all_types", &stream);
    let mut truncated = hello;
    truncated.pop();
    write(&dir, "stream_truncated_hello", &truncated);

    // control: one JSON line per request type, plus hand-written minimal ones.
    let dir = root.join("control");
    fs::create_dir_all(&dir).unwrap();
    for (name, r) in requests() {
        let mut line = serde_json::to_vec(&r).unwrap();
        line.push(b'\n');
        write(&dir, name, &line);
    }
    write(&dir, "get_minimal", br#"{"type":"get","remote_path":"a","sources":["127.0.0.1:5001"]}"#);
    write(&dir, "server_add_empty", br#"{"type":"server_add"}"#);
    write(&dir, "bad_unknown_type", br#"{"type":"bogus"}"#);
    write(&dir, "bad_port_range", br#"{"type":"server_stop","port":70000}"#);

    // manifest: valid encodings and typical damage.
    let dir = root.join("manifest");
    fs::create_dir_all(&dir).unwrap();
    let good = manifest(true).encode(&KEY);
    assert!(Manifest::decode(&good, &KEY).is_ok());
    write(&dir, "valid_with_file", &good);
    let no_file = manifest(false).encode(&KEY);
    assert!(Manifest::decode(&no_file, &KEY).is_ok());
    write(&dir, "valid_no_file", &no_file);
    write(&dir, "damaged_truncated", &good[..good.len() / 2]);
    let s = String::from_utf8(good.clone()).unwrap();
    write(&dir, "damaged_checksum", s.replacen("\"id\": 3", "\"id\": 4", 1).as_bytes());
    write(&dir, "damaged_version", s.replacen("\"version\": 1", "\"version\": 7", 1).as_bytes());
    let mut inconsistent = manifest(true);
    inconsistent.received = vec![Range::new(0, 11 << 20)];
    write(&dir, "inconsistent_received", &inconsistent.encode(&KEY));
    write(&dir, "zeroed", &[0u8; 64]);

    println!("seed corpus written under {}", root.display());
}
