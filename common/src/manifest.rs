//! Download manifests: what a download needs to continue after a crash.
//!
//! One JSON file per download, `<state_dir>/downloads/<ID>.json`:
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
//!   "received": [[212860928, 213385216]],
//!   "checksum": "5f1c…"
//! }
//! ```
//!
//! * `file` is absent until a source has told us what the file is.
//! * `verified` lists ranges of piece indices `[first, end)` whose hash was
//!   checked; `received` lists byte ranges on disk outside verified pieces
//!   (the exact progress inside partial pieces).
//! * `checksum` is the BLAKE3 hash (hex) of the document serialized with an
//!   empty checksum; a manifest whose checksum does not match was damaged
//!   after it was written.
//!
//! The daemon only claims bytes in a manifest after `fdatasync` of the data
//! file returned, and writes manifests to a temp file, fsyncs it, renames it
//! over the old one and fsyncs the directory. Even so, nothing in a manifest
//! is trusted blindly: on resume every claimed piece is hashed again.

use serde::{Deserialize, Serialize};

use crate::range::Range;

pub const FORMAT: &str = "mftd-manifest";
pub const VERSION: u32 = 1;
/// Manifests larger than this are refused before parsing.
pub const MAX_MANIFEST: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub size: u64,
    pub piece_size: u32,
    /// Root identity (hex) the sources agreed on; absent while they are
    /// still hashing the file (what is on disk is verified once it is known).
    #[serde(default)]
    pub identity: Option<String>,
}

/// The user a download acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestOwner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: u64,
    pub remote_path: String,
    pub sources: Vec<String>,
    pub destination: String,
    #[serde(default)]
    pub force: bool,
    pub connections_per_source: u32,
    #[serde(default)]
    pub give_up_after_secs: Option<u64>,
    /// Where the shared secret for the sources is read from (never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// Who asked for the download (uid, gid): a restart acts on the
    /// destination with that user's rights again. Absent: the daemon's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ManifestOwner>,
    /// Root identity (hex) the user pinned with `get --identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Paused by the user: not resumed by `auto_resume`.
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub file: Option<ManifestFile>,
    /// Piece index ranges `[first, end)` that passed verification.
    #[serde(default)]
    pub verified: Vec<(u64, u64)>,
    /// Byte ranges on disk outside verified pieces.
    #[serde(default)]
    pub received: Vec<Range>,
    #[serde(default)]
    pub checksum: String,
}

/// Why a manifest could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the file is empty (truncated)")]
    Empty,
    #[error("the file is all zero bytes")]
    Zeroed,
    #[error("the file is larger than {MAX_MANIFEST} bytes")]
    TooLarge,
    #[error("not valid manifest JSON ({0}); probably truncated or overwritten")]
    NotJson(String),
    #[error("not an mftd manifest (format {0:?})")]
    WrongFormat(String),
    #[error("manifest version {found} is not supported (this mftd reads version {VERSION})")]
    UnknownVersion { found: u32 },
    #[error("checksum mismatch: the manifest was modified or damaged after it was written")]
    Checksum,
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
}

impl Manifest {
    /// Serializes with a fresh checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.checksum = String::new();
        let body = serde_json::to_vec(&m).unwrap_or_default();
        m.checksum = blake3::hash(&body).to_hex().to_string();
        let mut out = serde_json::to_vec_pretty(&m).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses and checks a manifest. Total: never panics.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
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
        if blake3::hash(&body).to_hex().as_str() != m.checksum {
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
        if let Some(f) = &self.file {
            if f.piece_size == 0 {
                return bad("piece size is zero".into());
            }
            let pieces = f.size.div_ceil(f.piece_size as u64);
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

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id: 3,
            remote_path: "iso/big.iso".into(),
            sources: vec!["127.0.0.1:5001".into()],
            destination: "/tmp/big.iso".into(),
            force: false,
            connections_per_source: 2,
            give_up_after_secs: None,
            secret_file: None,
            owner: None,
            pin: None,
            paused: false,
            file: Some(ManifestFile { size: 10 << 20, piece_size: 256 << 10, identity: Some("ab".repeat(32)) }),
            verified: vec![(0, 4), (6, 7)],
            received: vec![Range::new(5 << 18, (5 << 18) + 1000)],
            checksum: String::new(),
        }
    }

    #[test]
    fn roundtrips() {
        let m = sample();
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back.verified, m.verified);
        assert_eq!(back.received, m.received);
        assert_eq!(back.verified_pieces().collect::<Vec<_>>(), vec![0, 1, 2, 3, 6]);
    }

    #[test]
    fn damaged_forms_are_errors_with_reasons() {
        let good = sample().encode();
        assert_eq!(Manifest::decode(b""), Err(ManifestError::Empty));
        assert_eq!(Manifest::decode(&vec![0u8; 4096]), Err(ManifestError::Zeroed));
        assert!(matches!(Manifest::decode(&good[..good.len() / 2]), Err(ManifestError::NotJson(_))));
        let future = String::from_utf8(good.clone()).unwrap().replace("\"version\": 1", "\"version\": 7");
        assert_eq!(Manifest::decode(future.as_bytes()), Err(ManifestError::UnknownVersion { found: 7 }));
        let tampered = String::from_utf8(good.clone()).unwrap().replace("\"id\": 3", "\"id\": 4");
        assert_eq!(Manifest::decode(tampered.as_bytes()), Err(ManifestError::Checksum));
        let mut m = sample();
        m.received = vec![Range::new(0, 11 << 20)];
        assert!(matches!(Manifest::decode(&m.encode()), Err(ManifestError::Inconsistent(_))));
        assert!(matches!(Manifest::decode(b"{\"format\":\"other\"}"), Err(ManifestError::WrongFormat(_))));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }

        /// Flipping any byte of a valid manifest is either caught or harmless.
        #[test]
        fn damaged_manifests_are_caught(pos in 0usize..4096, val in proptest::prelude::any::<u8>()) {
            let good = sample().encode();
            let mut bad = good.clone();
            let i = pos % bad.len();
            bad[i] = val;
            if let Ok(m) = Manifest::decode(&bad) {
                // Only whitespace-level changes can survive the checksum.
                let mut a = m.clone();
                a.checksum.clear();
                let mut b = Manifest::decode(&good).unwrap();
                b.checksum.clear();
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn runs_compress() {
        assert_eq!(piece_runs([0, 1, 2, 5, 6, 9]), vec![(0, 3), (5, 7), (9, 10)]);
        assert!(piece_runs([]).is_empty());
    }
}
