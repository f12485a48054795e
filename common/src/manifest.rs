//! Download manifests: what a download needs to continue after a crash.
//!
//! One JSON file per download, `<state_dir>/manifests/<ID>.json` (a
//! directory of its own, mode 0700: never the download directory):
//!
//! ```json
//! {
//!   "format": "mftd-manifest",
//!   "version": 1,
//!   "id": 3,
//!   "remote_path": "iso/big.iso",
//!   "sources": ["10.0.0.5:5001", "10.0.0.6:5001"],
//!   "destination": "/home/me/Downloads/big.iso",
//!   "force": false,
//!   "connections_per_source": 2,
//!   "give_up_after_secs": null,
//!   "paused": false,
//!   "file": { "size": 1073741824, "piece_size": 262144, "identity": "9ea8…" },
//!   "verified": [[0, 812]],
//!   "received": [{ "start": 212860928, "end": 213385216 }],
//!   "checksum": "5f1c…"
//! }
//! ```
//!
//! * `stats` (optional) carries what earlier runs did, for the record: active
//!   time and, per source, bytes delivered (`bytes` still in the file,
//!   `bytes_received` off the wire) and ranges completed. Nothing about the
//!   data is decided from it.
//! * `file` is absent until a source has told us what the file is.
//! * `verified` lists ranges of piece indices `[first, end)` whose hash was
//!   checked; `received` lists byte ranges on disk outside verified pieces
//!   (the exact progress inside partial pieces).
//! * `part` (optional) is the part file this download created, with
//!   `O_EXCL`: its device, inode and owner's uid. A file at the part name
//!   that does not match it is not this download's and is never written
//!   to (the daemon's `download::part` module says what happens to it).
//!   Absent in manifests of older mftd versions: their part file counts as
//!   one without a record.
//! * `finishing` (optional, `true` only) is written, after the part file's
//!   fsync, just before the verified file is renamed to `destination`. A
//!   run that finds it, and a file at `destination` of `file.size` bytes
//!   whose BLAKE3 identity is `file.identity`, marks the download done and
//!   removes what is left (manifest, part file) without fetching.
//! * Fields added later (`part`, `finishing`) are left out when absent, so
//!   the checksum of a manifest written before them still matches; an mftd
//!   older than them reads a manifest that has them as damaged.
//! * `checksum` is the keyed BLAKE3 hash (hex) of the document serialized
//!   with an empty checksum, under a 32-byte key only the daemon can read
//!   (`<state_dir>/manifest.key`, mode 0600). A manifest whose checksum does
//!   not match was damaged after it was written, or planted by someone
//!   without the key: either way it is reported and never obeyed.
//! * On load, `file.piece_size` must be the one the protocol derives from
//!   `file.size`, and the destination's name the one derived from
//!   `remote_path`.
//!
//! The daemon only claims bytes in a manifest after `fdatasync` of the data
//! file returned, and writes manifests to a temp file, fsyncs it, renames it
//! over the old one and fsyncs the directory. Even so, nothing in a manifest
//! is trusted blindly: on resume every claimed piece is hashed again.

use serde::{Deserialize, Serialize};

use crate::proto::{piece_count_for, piece_size_for, MAX_PIECES};
use crate::range::Range;

/// The key manifests are checksummed with.
pub type Key = [u8; 32];

/// The `format` field's value: tells a manifest from any other JSON file.
pub const FORMAT: &str = "mftd-manifest";
/// The `version` field's value, written and the only one read (others: [`ManifestError::UnknownVersion`]).
pub const VERSION: u32 = 1;
/// Manifests larger than this are refused before parsing.
pub const MAX_MANIFEST: u64 = 64 << 20;

/// The `file` object: what the sources said the file is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File size in bytes, as the sources' `STAT_OK` gave it.
    pub size: u64,
    /// Bytes per piece; a manifest whose value is not [`piece_size_for`]`(size)` is refused.
    pub piece_size: u32,
    /// Root identity (hex) the sources agreed on; absent while they are
    /// still hashing the file (what is on disk is verified once it is known).
    #[serde(default)]
    pub identity: Option<String>,
}

/// What earlier runs of a download did (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestStats {
    /// Time spent running (not paused), in milliseconds.
    pub elapsed_ms: u64,
    /// One entry per source, matched to [`Manifest::sources`] by address when loaded.
    #[serde(default)]
    pub sources: Vec<SourceStats>,
}

/// What one source did over the runs so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    /// The source as written in [`Manifest::sources`]; an entry matching none is ignored.
    pub address: String,
    /// Bytes it wrote that are still in the file (those of pieces that failed verification are taken off).
    pub bytes: u64,
    /// Bytes received from it off the wire, duplicates and discarded bytes included.
    #[serde(default)]
    pub bytes_received: u64,
    /// Ranges (one `READ` each) it finished, trimmed ones included.
    #[serde(default)]
    pub ranges_done: u64,
}

/// The part file a download created (see the module docs): a file at the
/// part name is this download's only if all three match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPart {
    /// `st_dev` of the file system it is on.
    pub dev: u64,
    /// `st_ino` when it was created.
    pub ino: u64,
    /// The user it belongs to: the one whose rights the download writes with.
    pub uid: u32,
}

/// The user a download acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestOwner {
    /// User ID whose rights the destination is written with.
    pub uid: u32,
    /// Group ID whose rights the destination is written with.
    pub gid: u32,
}

/// One download, as stored in `<state_dir>/manifests/<ID>.json` (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`]; checked before anything else is parsed.
    pub format: String,
    /// Always [`VERSION`]; checked before anything else is parsed.
    pub version: u32,
    /// The download's ID, never reused; must match the file name (`<ID>.json`).
    pub id: u64,
    /// The file's path on the sources, relative to their export roots.
    pub remote_path: String,
    /// Where to fetch from, each `[plain://]HOST:PORT[#NODEID]`; never empty.
    pub sources: Vec<String>,
    /// Absolute path of the finished file, named after `remote_path` or `output_name`;
    /// the data is written to `<destination>.mftpart` until it is verified.
    pub destination: String,
    /// Replace a file already at the destination (`get --force`).
    #[serde(default)]
    pub force: bool,
    /// Connections per source, 1 to 16 (more is cut to 16 when loaded); 0: adapt to the path.
    pub connections_per_source: u32,
    /// Fail after this many seconds in a row without a reachable source; absent: keep trying.
    #[serde(default)]
    pub give_up_after_secs: Option<u64>,
    /// Where the shared secret for the sources is read from (never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// Who asked for the download (uid, gid): a restart acts on the
    /// destination with that user's rights again. Absent: the daemon's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ManifestOwner>,
    /// The size the user expects (`get --size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_size: Option<u64>,
    /// Root identity (hex) the user pinned with `get --identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// The name the file is saved under, when not the remote one (`get -O`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_name: Option<String>,
    /// Paused by the user: not resumed by `auto_resume`.
    #[serde(default)]
    pub paused: bool,
    /// Time and per-source work of the runs so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ManifestStats>,
    /// Absent until a source has answered `STAT`; no progress may be recorded without it.
    #[serde(default)]
    pub file: Option<ManifestFile>,
    /// Piece index ranges `[first, end)` that passed verification.
    #[serde(default)]
    pub verified: Vec<(u64, u64)>,
    /// Byte ranges on disk outside verified pieces.
    #[serde(default)]
    pub received: Vec<Range>,
    /// The part file this download created; absent before it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<ManifestPart>,
    /// Every piece is verified and the file is being renamed into place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finishing: bool,
    /// Keyed BLAKE3 (hex) of the manifest serialized with this field empty; see the module docs.
    #[serde(default)]
    pub checksum: String,
}

/// Why a manifest could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Zero bytes long: a write cut short.
    #[error("the file is empty (truncated)")]
    Empty,
    /// Nothing but zero bytes, as a crash can leave a file whose data never reached the disk.
    #[error("the file is all zero bytes")]
    Zeroed,
    /// Over [`MAX_MANIFEST`] bytes: refused unparsed.
    #[error("the file is larger than {MAX_MANIFEST} bytes")]
    TooLarge,
    /// Unreadable, not JSON, or JSON without a manifest's fields; carries the reader's or parser's reason.
    #[error("not valid manifest JSON ({0}); probably truncated or overwritten")]
    NotJson(String),
    /// `format` is not [`FORMAT`]; carries what it is (empty if missing).
    #[error("not an mftd manifest (format {0:?})")]
    WrongFormat(String),
    /// `version` is not [`VERSION`]: written by another mftd (or missing).
    #[error("manifest version {found} is not supported (this mftd reads version {VERSION})")]
    UnknownVersion {
        /// The version found: 0 if missing or not a number, at most `u32::MAX`.
        found: u32,
    },
    /// The checksum does not match under this daemon's key: damaged, edited or planted.
    #[error("checksum mismatch: the manifest was modified or damaged after it was written")]
    Checksum,
    /// Fields contradict each other or the protocol (piece size, ranges, destination name); carries which.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
}

impl Manifest {
    /// A manifest of download `id` with nothing but what to fetch from
    /// where: every other field at its default, no progress.
    pub fn new(id: u64, remote_path: &str, sources: &[&str], destination: &str) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id,
            remote_path: remote_path.into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            destination: destination.into(),
            force: false,
            connections_per_source: 0,
            give_up_after_secs: None,
            secret_file: None,
            owner: None,
            expected_size: None,
            pin: None,
            output_name: None,
            paused: false,
            stats: None,
            file: None,
            verified: Vec::new(),
            received: Vec::new(),
            part: None,
            finishing: false,
            checksum: String::new(),
        }
    }

    /// Serializes with a fresh checksum under `key`.
    pub fn encode(&self, key: &Key) -> Vec<u8> {
        let mut m = self.clone();
        m.checksum = String::new();
        let body = serde_json::to_vec(&m).unwrap_or_default();
        m.checksum = blake3::keyed_hash(key, &body).to_hex().to_string();
        let mut out = serde_json::to_vec_pretty(&m).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses and checks a manifest written under `key`. Total: never panics.
    pub fn decode(bytes: &[u8], key: &Key) -> Result<Manifest, ManifestError> {
        Self::decode_with(bytes, |body| blake3::keyed_hash(key, body))
    }

    /// Parses a manifest of an older mftd, checksummed without a key (only
    /// to move it where manifests live now, under the key).
    pub fn decode_unkeyed(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Self::decode_with(bytes, blake3::hash)
    }

    fn decode_with(bytes: &[u8], sum: impl Fn(&[u8]) -> blake3::Hash) -> Result<Manifest, ManifestError> {
        if bytes.is_empty() {
            return Err(ManifestError::Empty);
        }
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(ManifestError::TooLarge);
        }
        if bytes.iter().all(|&b| b == 0) {
            return Err(ManifestError::Zeroed);
        }
        // Look at format and version first so a future version is reported
        // as such rather than as a parse error.
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson(e.to_string()))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(ManifestError::WrongFormat(format.to_string()));
        }
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if version != VERSION as u64 {
            return Err(ManifestError::UnknownVersion { found: version.min(u32::MAX as u64) as u32 });
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| ManifestError::NotJson(e.to_string()))?;
        let mut unsummed = m.clone();
        unsummed.checksum = String::new();
        let body = serde_json::to_vec(&unsummed).unwrap_or_default();
        // blake3::Hash compares in constant time.
        if blake3::Hash::from_hex(&m.checksum).ok() != Some(sum(&body)) {
            return Err(ManifestError::Checksum);
        }
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Inconsistent(s));
        if self.sources.is_empty() {
            return bad("no sources".into());
        }
        // The destination is the remote file's name (or the checked name
        // given for it) in some directory.
        let name = crate::path::destination_name(&self.remote_path, self.output_name.as_deref());
        let dest = std::path::Path::new(&self.destination);
        let named = name.as_ref().ok().map(|n| std::ffi::OsStr::new(n.as_str()));
        if !dest.is_absolute() || named.is_none() || dest.file_name() != named {
            return bad(format!("destination {:?} is not named after {:?}", self.destination, self.remote_path));
        }
        // Identities are 64 hex digits (they are sliced and compared as such).
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        for (what, id) in
            [("identity", self.file.as_ref().and_then(|f| f.identity.as_deref())), ("pin", self.pin.as_deref())]
        {
            if let Some(id) = id.filter(|id| !hex64(id)) {
                return bad(format!("{what} {id:?} is not 64 hexadecimal digits"));
            }
        }
        if let Some(f) = &self.file {
            if f.piece_size != piece_size_for(f.size) || piece_count_for(f.size, f.piece_size) > MAX_PIECES {
                return bad(format!("piece size {} does not fit a {}-byte file", f.piece_size, f.size));
            }
            let pieces = piece_count_for(f.size, f.piece_size);
            for &(a, b) in &self.verified {
                if a > b || b > pieces {
                    return bad(format!("verified pieces {a}..{b} outside 0..{pieces}"));
                }
            }
            for r in &self.received {
                if r.start > r.end || r.end > f.size {
                    return bad(format!("received range {}..{} outside the {}-byte file", r.start, r.end, f.size));
                }
            }
        } else if !self.verified.is_empty() || !self.received.is_empty() {
            return bad("progress recorded without a file size".into());
        }
        Ok(())
    }

    /// Verified pieces as a flat list of indices.
    pub fn verified_pieces(&self) -> impl Iterator<Item = u64> + '_ {
        self.verified.iter().flat_map(|&(a, b)| a..b)
    }
}

/// Compresses sorted piece indices into `[first, end)` runs.
pub fn piece_runs(pieces: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pieces {
        match out.last_mut() {
            Some(last) if last.1 == p => last.1 = p + 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Key = [7; 32];

    fn sample() -> Manifest {
        Manifest {
            connections_per_source: 2,
            file: Some(ManifestFile { size: 10 << 20, piece_size: 256 << 10, identity: Some("ab".repeat(32)) }),
            verified: vec![(0, 4), (6, 7)],
            received: vec![Range::new(5 << 18, (5 << 18) + 1000)],
            ..Manifest::new(3, "iso/big.iso", &["127.0.0.1:5001"], "/tmp/big.iso")
        }
    }

    #[test]
    fn roundtrips() {
        let m = sample();
        let back = Manifest::decode(&m.encode(&KEY), &KEY).unwrap();
        assert_eq!(back.verified, m.verified);
        assert_eq!(back.received, m.received);
        assert_eq!(back.verified_pieces().collect::<Vec<_>>(), vec![0, 1, 2, 3, 6]);
    }

    #[test]
    fn damaged_forms_are_errors_with_reasons() {
        let good = sample().encode(&KEY);
        assert_eq!(Manifest::decode(b"", &KEY), Err(ManifestError::Empty));
        assert_eq!(Manifest::decode(&vec![0u8; 4096], &KEY), Err(ManifestError::Zeroed));
        assert!(matches!(Manifest::decode(&good[..good.len() / 2], &KEY), Err(ManifestError::NotJson(_))));
        let future = String::from_utf8(good.clone()).unwrap().replace("\"version\": 1", "\"version\": 7");
        assert_eq!(Manifest::decode(future.as_bytes(), &KEY), Err(ManifestError::UnknownVersion { found: 7 }));
        let tampered = String::from_utf8(good.clone()).unwrap().replace("\"id\": 3", "\"id\": 4");
        assert_eq!(Manifest::decode(tampered.as_bytes(), &KEY), Err(ManifestError::Checksum));
        let mut m = sample();
        m.received = vec![Range::new(0, 11 << 20)];
        assert!(matches!(Manifest::decode(&m.encode(&KEY), &KEY), Err(ManifestError::Inconsistent(_))));
        assert!(matches!(Manifest::decode(b"{\"format\":\"other\"}", &KEY), Err(ManifestError::WrongFormat(_))));
    }

    /// A manifest planted by someone without the key is refused, and so is
    /// one that would make the daemon loop for ages or write elsewhere.
    #[test]
    fn planted_and_absurd_manifests_are_refused() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode(&[8; 32]), &KEY), Err(ManifestError::Checksum));
        let unkeyed = {
            let mut u = m.clone();
            u.checksum = String::new();
            u.checksum = blake3::hash(&serde_json::to_vec(&u).unwrap()).to_hex().to_string();
            serde_json::to_vec(&u).unwrap()
        };
        assert_eq!(Manifest::decode(&unkeyed, &KEY), Err(ManifestError::Checksum));
        assert_eq!(
            Manifest::decode_unkeyed(&unkeyed).unwrap().id,
            3,
            "an older mftd's manifest is readable for migration"
        );
        let mut huge = sample();
        huge.file = Some(ManifestFile { size: u64::MAX, piece_size: 1, identity: None });
        huge.verified.clear();
        huge.received.clear();
        assert!(
            matches!(Manifest::decode(&huge.encode(&KEY), &KEY), Err(ManifestError::Inconsistent(m)) if m.contains("piece size"))
        );
        let mut elsewhere = sample();
        elsewhere.destination = "/root/.ssh/authorized_keys".into();
        assert!(
            matches!(Manifest::decode(&elsewhere.encode(&KEY), &KEY), Err(ManifestError::Inconsistent(m)) if m.contains("not named after"))
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes, &KEY);
        }

        /// A manifest carrying any identity or pin string is accepted only
        /// if it is 64 hex digits (it is sliced as such later), and never
        /// panics the decoder.
        #[test]
        fn identities_must_be_hex(id in "\\PC{0,80}", as_pin in proptest::prelude::any::<bool>()) {
            let mut m = sample();
            if as_pin { m.pin = Some(id.clone()) } else if let Some(f) = m.file.as_mut() { f.identity = Some(id.clone()) }
            let ok = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
            let got = Manifest::decode(&m.encode(&KEY), &KEY);
            proptest::prop_assert_eq!(got.is_ok(), ok, "{:?}", got);
        }

        /// Flipping any byte of a valid manifest is either caught or harmless.
        #[test]
        fn damaged_manifests_are_caught(pos in 0usize..4096, val in proptest::prelude::any::<u8>()) {
            let good = sample().encode(&KEY);
            let mut bad = good.clone();
            let i = pos % bad.len();
            bad[i] = val;
            if let Ok(m) = Manifest::decode(&bad, &KEY) {
                // Only whitespace-level changes can survive the checksum.
                let mut a = m.clone();
                a.checksum.clear();
                let mut b = Manifest::decode(&good, &KEY).unwrap();
                b.checksum.clear();
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    /// A manifest written before `part` and `finishing` existed still
    /// passes its checksum, and the new fields survive a round trip.
    #[test]
    fn older_manifests_load_and_new_fields_roundtrip() {
        let old = sample();
        let v: serde_json::Value = serde_json::from_slice(&old.encode(&KEY)).unwrap();
        assert!(v.get("part").is_none() && v.get("finishing").is_none(), "absent fields are written: {v}");
        let back = Manifest::decode(&serde_json::to_vec(&v).unwrap(), &KEY).unwrap();
        assert_eq!((back.part, back.finishing), (None, false));
        let new = Manifest { part: Some(ManifestPart { dev: 2049, ino: 77, uid: 1000 }), finishing: true, ..sample() };
        let back = Manifest::decode(&new.encode(&KEY), &KEY).unwrap();
        assert_eq!((back.part, back.finishing), (new.part, true));
    }

    #[test]
    fn runs_compress() {
        assert_eq!(piece_runs([0, 1, 2, 5, 6, 9]), vec![(0, 3), (5, 7), (9, 10)]);
        assert!(piece_runs([]).is_empty());
    }
}
