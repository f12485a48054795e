//! Where manifests live on disk, and the crash-consistent way they are
//! written: temp file, fsync, rename over the old one, fsync the directory.
//! At every instant either the old or the new manifest is complete on disk.
//!
//! This module must never report a manifest as written before its rename
//! and the directory fsync returned.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use mftd_common::manifest::{Manifest, ManifestError, MAX_MANIFEST};

/// Steps of [`write_atomic`], for failure injection in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    WriteTemp,
    FsyncTemp,
    Rename,
    FsyncDir,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A manifest file that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub path: PathBuf,
    pub error: ManifestError,
}

impl Store {
    pub fn new(state_dir: &Path) -> io::Result<Store> {
        let dir = state_dir.join("downloads");
        std::fs::create_dir_all(&dir)?;
        Ok(Store { dir })
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn save(&self, m: &Manifest) -> io::Result<()> {
        write_atomic(&self.path(m.id), &m.encode(), None)
    }

    pub fn remove(&self, id: u64) {
        let _ = std::fs::remove_file(self.path(id));
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }

    /// Reads one manifest from disk.
    pub fn load(&self, id: u64) -> Result<Manifest, Damaged> {
        read_manifest(&self.path(id))
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
            match read_manifest(&p) {
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

fn read_manifest(p: &Path) -> Result<Manifest, Damaged> {
    let damaged = |error| Damaged { path: p.to_path_buf(), error };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(p)
        .map_err(|e| damaged(ManifestError::NotJson(format!("cannot open: {e}"))))?;
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| damaged(ManifestError::NotJson(format!("cannot read: {e}"))))?;
    Manifest::decode(&bytes).map_err(damaged)
}

/// Writes `bytes` to `path` crash-consistently. `fail` makes the given step
/// fail (tests only).
pub fn write_atomic(path: &Path, bytes: &[u8], fail: Option<Step>) -> io::Result<()> {
    let injected = |s: Step| -> io::Result<()> {
        if fail == Some(s) {
            Err(io::Error::other(format!("injected failure at {s:?}")))
        } else {
            Ok(())
        }
    };
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
    use mftd_common::manifest::{FORMAT, VERSION};

    fn manifest(id: u64, path: &str) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id,
            remote_path: path.into(),
            sources: vec!["127.0.0.1:1".into()],
            destination: "/tmp/x".into(),
            force: false,
            connections_per_source: 1,
            give_up_after_secs: None,
            secret_file: None,
            owner: None,
            pin: None,
            paused: false,
            file: None,
            verified: vec![],
            received: vec![],
            checksum: String::new(),
        }
    }

    #[test]
    fn a_failure_at_any_step_leaves_old_or_new_readable() {
        for step in [Step::WriteTemp, Step::FsyncTemp, Step::Rename, Step::FsyncDir] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path()).unwrap();
            store.save(&manifest(1, "old")).unwrap();
            let new = manifest(1, "new");
            let r = write_atomic(&store.path(1), &new.encode(), Some(step));
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
}
