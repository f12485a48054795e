//! Where manifests live on disk, and the crash-consistent way they are
//! written: temp file, fsync, rename over the old one, fsync the directory.
//! At every instant either the old or the new manifest is complete on disk.
//!
//! Manifests live in `STATE_DIR/manifests` (mode 0700), never in a
//! directory downloads are written to, and carry a checksum keyed with
//! `STATE_DIR/manifest.key` (32 random bytes, mode 0600, created at first
//! start): a planted manifest is reported as damaged, never obeyed.
//! Manifests of an older mftd (`STATE_DIR/downloads/ID.json`, unkeyed) are
//! moved here once.
//!
//! This module must never report a manifest as written before its rename
//! and the directory fsync returned.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mftd_common::manifest::{Key, Manifest, ManifestError, MAX_MANIFEST};

/// Steps of [`write_atomic`], for failure injection in tests and crash
/// points ([`crate::failpoint`]): each is reached just before it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    WriteTemp,
    FsyncTemp,
    Rename,
    FsyncDir,
}

impl Step {
    /// The crash point of a checkpoint reaching this step.
    pub fn failpoint(self) -> &'static str {
        match self {
            Step::WriteTemp => "checkpoint-temp-created",
            Step::FsyncTemp => "checkpoint-temp-unsynced",
            Step::Rename => "checkpoint-temp-written",
            Step::FsyncDir => "checkpoint-renamed",
        }
    }
}

/// File in the manifest directory holding the next download ID.
const NEXT_ID: &str = "next-id";

#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    key: Key,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// A manifest file that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub path: PathBuf,
    pub error: ManifestError,
}

impl Store {
    pub fn new(state_dir: &Path) -> io::Result<Store> {
        let dir = state_dir.join("manifests");
        // Migration happens once: when this mftd makes the directory.
        let first = !dir.exists();
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let key = load_or_create_key(&state_dir.join("manifest.key"))?;
        let store = Store { dir, key };
        if first {
            store.migrate(&state_dir.join("downloads"));
        }
        Ok(store)
    }

    /// Where manifests are kept.
    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the manifests an older mftd kept in `old` (next to downloaded
    /// files) here, under the key. Only files an older mftd wrote count:
    /// owned by this user, mode 0600, not a symlink (a downloaded file that
    /// happens to look like a manifest is none of these); others stay.
    fn migrate(&self, old: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(old) else { return };
        let me = nix::unistd::geteuid().as_raw();
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if !meta.is_file() || meta.uid() != me || meta.mode() & 0o777 != 0o600 {
                continue;
            }
            let id = p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
            let (Some(id), true) = (id, p.extension().is_some_and(|x| x == "json")) else { continue };
            let Ok(bytes) = read_bounded(&p) else { continue };
            let Ok(m) = Manifest::decode_unkeyed(&bytes) else { continue };
            if m.id != id || self.path(id).exists() {
                continue;
            }
            match self.save(&m) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&p);
                    tracing::info!(from = %p.display(), to = %self.path(id).display(), "moved download manifest");
                }
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot move download manifest"),
            }
        }
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The next download ID to hand out, as last recorded (1 if never).
    /// Kept apart from manifests so that an ID is never reused, not even
    /// one whose download ended and left no manifest.
    pub fn next_id(&self) -> u64 {
        read_bounded(&self.dir.join(NEXT_ID))
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1)
            .max(1)
    }

    /// Records that IDs below `next` are taken.
    pub fn save_next_id(&self, next: u64) -> io::Result<()> {
        write_atomic(&self.dir.join(NEXT_ID), format!("{next}\n").as_bytes(), |_| Ok(()))
    }

    pub fn save(&self, m: &Manifest) -> io::Result<()> {
        self.save_with(m, |_| {})
    }

    /// [`Store::save`], calling `at` before each step (crash points).
    pub fn save_with(&self, m: &Manifest, at: impl Fn(Step)) -> io::Result<()> {
        write_atomic(&self.path(m.id), &m.encode(&self.key), |s| {
            at(s);
            Ok(())
        })
    }

    /// Removes the manifest, and its temp file if a crash left one.
    pub fn remove(&self, id: u64) {
        let _ = std::fs::remove_file(self.path(id));
        let _ = std::fs::remove_file(self.path(id).with_extension("json.tmp"));
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }

    /// Reads one manifest from disk.
    pub fn load(&self, id: u64) -> Result<Manifest, Damaged> {
        read_manifest(&self.path(id), &self.key)
    }

    /// Every manifest in the directory; damaged ones are returned apart,
    /// never deleted.
    pub fn load_all(&self) -> (Vec<Manifest>, Vec<Damaged>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return (good, bad) };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            match read_manifest(&p, &self.key) {
                Ok(m) => {
                    // The file name is the ID; a mismatch means it was copied
                    // or edited by hand.
                    let named = p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
                    if named != Some(m.id) {
                        bad.push(Damaged {
                            error: ManifestError::Inconsistent(format!("file name does not match its ID {}", m.id)),
                            path: p,
                        });
                    } else {
                        good.push(m);
                    }
                }
                Err(d) => bad.push(d),
            }
        }
        (good, bad)
    }
}

fn read_manifest(p: &Path, key: &Key) -> Result<Manifest, Damaged> {
    let damaged = |error| Damaged { path: p.to_path_buf(), error };
    let bytes = read_bounded(p).map_err(|e| damaged(ManifestError::NotJson(e)))?;
    Manifest::decode(&bytes, key).map_err(damaged)
}

/// At most `MAX_MANIFEST` + 1 bytes of `p`, never through a symlink.
fn read_bounded(p: &Path) -> Result<Vec<u8>, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(p)
        .map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    Ok(bytes)
}

/// The manifest key at `path`, created (32 random bytes, mode 0600) if
/// there is none yet.
fn load_or_create_key(path: &Path) -> io::Result<Key> {
    let open = || OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits()).open(path);
    let mut f = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(&key)?;
                    f.sync_all()?;
                    if let Some(dir) = path.parent() {
                        File::open(dir)?.sync_all()?;
                    }
                    return Ok(key);
                }
                // Another start created it meanwhile: read that one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open()?,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() != 32 {
        return Err(io::Error::other(format!("{} is not a 32-byte key file", path.display())));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let mut key = [0u8; 32];
    f.read_exact(&mut key)?;
    Ok(key)
}

/// Writes `bytes` to `path` crash-consistently. `injected` is called
/// before each step; an error it returns fails the write there (tests).
pub fn write_atomic(path: &Path, bytes: &[u8], injected: impl Fn(Step) -> io::Result<()>) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("manifest path has no directory"))?;
    let tmp = path.with_extension("json.tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)?;
        injected(Step::WriteTemp)?;
        f.write_all(bytes)?;
        injected(Step::FsyncTemp)?;
        f.sync_all()?;
        drop(f);
        injected(Step::Rename)?;
        std::fs::rename(&tmp, path)?;
        injected(Step::FsyncDir)?;
        File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: u64, path: &str) -> Manifest {
        Manifest { connections_per_source: 1, ..Manifest::new(id, path, &["127.0.0.1:1"], &format!("/tmp/{path}")) }
    }

    #[test]
    fn a_failure_at_any_step_leaves_old_or_new_readable() {
        for step in [Step::WriteTemp, Step::FsyncTemp, Step::Rename, Step::FsyncDir] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path()).unwrap();
            store.save(&manifest(1, "old")).unwrap();
            let new = manifest(1, "new");
            let fail = |s: Step| {
                if s == step {
                    Err(io::Error::other(format!("injected failure at {s:?}")))
                } else {
                    Ok(())
                }
            };
            let r = write_atomic(&store.path(1), &new.encode(&store.key), fail);
            assert!(r.is_err());
            let got = store.load(1).expect("a complete manifest is always there");
            // Before the rename the old one stays; after it, the new one.
            let want = if step == Step::FsyncDir { "new" } else { "old" };
            assert_eq!(got.remote_path, want, "failure at {step:?}");
            assert!(!store.path(1).with_extension("json.tmp").exists(), "temp file cleaned up at {step:?}");
        }
    }

    #[test]
    fn load_all_separates_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        store.save(&manifest(1, "a")).unwrap();
        store.save(&manifest(2, "b")).unwrap();
        std::fs::write(store.path(3), b"").unwrap();
        std::fs::write(store.path(4), vec![0u8; 100]).unwrap();
        std::fs::copy(store.path(1), store.path(5)).unwrap();
        let (good, bad) = store.load_all();
        assert_eq!(good.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(bad.len(), 3);
    }

    #[test]
    fn old_manifests_move_under_the_key_and_other_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("downloads");
        std::fs::create_dir(&old).unwrap();
        // What an older mftd wrote: checksummed without a key.
        let m = manifest(7, "seven");
        let mut unkeyed = m.clone();
        unkeyed.checksum = blake3::hash(&serde_json::to_vec(&unkeyed).unwrap()).to_hex().to_string();
        std::fs::write(old.join("7.json"), serde_json::to_vec(&unkeyed).unwrap()).unwrap();
        std::fs::set_permissions(old.join("7.json"), std::fs::Permissions::from_mode(0o600)).unwrap();
        // A user's downloaded file that happens to be called 8.json, and one
        // made to look like a manifest (but not written the way mftd writes
        // them: mode 0644).
        std::fs::write(old.join("8.json"), b"{\"mine\": true}").unwrap();
        let mut forged = manifest(6, "six");
        forged.checksum = blake3::hash(&serde_json::to_vec(&forged).unwrap()).to_hex().to_string();
        std::fs::write(old.join("6.json"), serde_json::to_vec(&forged).unwrap()).unwrap();
        std::fs::set_permissions(old.join("6.json"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::new(dir.path()).unwrap();
        assert_eq!(store.load(7).unwrap().remote_path, "seven");
        assert!(!old.join("7.json").exists());
        assert_eq!(std::fs::read(old.join("8.json")).unwrap(), b"{\"mine\": true}");
        assert!(store.load(6).is_err() && old.join("6.json").exists(), "a downloaded look-alike was migrated");
        // Migration happens once: a manifest-like file appearing later stays.
        std::fs::write(old.join("9.json"), serde_json::to_vec(&unkeyed).unwrap()).unwrap();
        std::fs::set_permissions(old.join("9.json"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let mode = std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let kmode = std::fs::metadata(dir.path().join("manifest.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(kmode, 0o600);
        // The key survives a restart; a manifest under another key does not pass.
        let again = Store::new(dir.path()).unwrap();
        assert!(again.load(7).is_ok());
        assert!(old.join("9.json").exists(), "migrated again on a later start");
        std::fs::write(again.path(9), manifest(9, "nine").encode(&[1; 32])).unwrap();
        assert!(matches!(again.load(9), Err(Damaged { error: ManifestError::Checksum, .. })));
    }
}
