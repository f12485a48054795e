//! Content identities of exported files, computed once per file version.
//!
//! A file version is (device, inode, size, mtime); as long as it is the same,
//! the per-piece BLAKE3 hashes are served from memory. Concurrent `STAT`s of
//! the same version wait for one computation instead of each hashing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use mftd_common::proto::{piece_count_for, piece_size_for, Identity};

/// Most file versions kept; beyond it the cache starts over.
const MAX_ENTRIES: usize = 4096;

type Key = (u64, u64, u64, i64);
type Slot = Arc<OnceCell<Arc<Identity>>>;

#[derive(Default, Debug)]
pub struct IdentityCache {
    map: Mutex<HashMap<Key, Slot>>,
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

impl IdentityCache {
    /// Identity of `file` as described by `meta`, hashing it if needed.
    pub async fn get(&self, file: &File, meta: &std::fs::Metadata) -> io::Result<Arc<Identity>> {
        let key = (meta.dev(), meta.ino(), meta.size(), mtime_ns(meta));
        let slot = {
            let mut map = self.map.lock().map_err(|_| io::Error::other("identity cache poisoned"))?;
            if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
                map.clear();
            }
            map.entry(key).or_default().clone()
        };
        let file = file.try_clone()?;
        let size = meta.size();
        let id = slot
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || hash_file(&file, size))
                    .await
                    .map_err(|e| io::Error::other(format!("hashing task failed: {e}")))?
                    .map(Arc::new)
            })
            .await?;
        Ok(id.clone())
    }
}

/// Hashes every piece of `file`, on up to four threads.
pub fn hash_file(file: &File, size: u64) -> io::Result<Identity> {
    let piece_size = piece_size_for(size);
    let count = piece_count_for(size, piece_size) as usize;
    let mut hashes = vec![[0u8; 32]; count];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4).min(count.max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, [u8; 32])>> = Mutex::new(Vec::with_capacity(count));
    let first_err: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; piece_size as usize];
                let mut local = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let start = i as u64 * piece_size as u64;
                    let len = (size - start).min(piece_size as u64) as usize;
                    match read_full_at(file, &mut buf[..len], start) {
                        Ok(()) => local.push((i, *blake3::hash(&buf[..len]).as_bytes())),
                        Err(e) => {
                            if let Ok(mut fe) = first_err.lock() {
                                fe.get_or_insert(e);
                            }
                            next.store(count, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                if let Ok(mut r) = results.lock() {
                    r.extend(local);
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    for (i, h) in results.into_inner().map_err(|_| io::Error::other("hash results poisoned"))? {
        hashes[i] = h;
    }
    Ok(Identity::from_hashes(size, piece_size, hashes))
}

/// `read_exact_at` that reports a file that shrank as `UnexpectedEof`.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_matches_piecewise_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(600u32 << 10)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let id = hash_file(&f, data.len() as u64).unwrap();
        assert_eq!(id.piece_count(), 3);
        for i in 0..3 {
            let (s, e) = id.piece_range(i);
            assert_eq!(id.hashes[i], *blake3::hash(&data[s as usize..e as usize]).as_bytes());
        }
        let empty = hash_file(&f, 0).unwrap();
        assert_eq!(empty.piece_count(), 0);
    }
}
