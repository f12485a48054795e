//! Content identities of exported files, computed once per file version.
//!
//! A file version is (device, inode, size, mtime); as long as it is the same,
//! the per-piece BLAKE3 hashes are served from memory. The first `STAT` of a
//! version starts hashing it in the background and is answered at once
//! ("not hashed yet"): clients fetch data meanwhile and verify it when the
//! hashes come. Concurrent requests for the same version share one
//! computation.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use mftd_common::proto::{piece_count_for, piece_size_for, Identity};

/// Most file versions kept; beyond it the cache starts over.
const MAX_ENTRIES: usize = 4096;

type Key = (u64, u64, u64, i64);
/// `None` while hashing; then the identity, or why it could not be computed.
type Outcome = Option<Result<Arc<Identity>, String>>;

/// A file version being hashed or hashed: see [`Hashing::now`] and
/// [`Hashing::wait`].
#[derive(Clone, Debug)]
pub struct Hashing(watch::Receiver<Outcome>);

impl Hashing {
    /// The identity if hashing is over (or its error); `None` while it runs.
    pub fn now(&self) -> Option<Result<Arc<Identity>, String>> {
        self.0.borrow().clone()
    }

    /// Waits until hashing is over.
    pub async fn wait(mut self) -> Result<Arc<Identity>, String> {
        match self.0.wait_for(|o| o.is_some()).await {
            Ok(o) => o.clone().unwrap_or_else(|| Err("hashing stopped".into())),
            Err(_) => Err("hashing task ended without a result".into()),
        }
    }
}

/// Files hashed at the same time; more wait their turn (each uses
/// `hash_threads` threads and reads the whole file).
const CONCURRENT_FILES: usize = 2;

#[derive(Debug)]
pub struct IdentityCache {
    map: Mutex<HashMap<Key, Hashing>>,
    /// Threads one file is hashed on.
    threads: usize,
    turns: Arc<tokio::sync::Semaphore>,
}

impl Default for IdentityCache {
    fn default() -> Self {
        IdentityCache::new(0)
    }
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

/// Hashing threads for `configured` (0: one per core).
pub fn hash_threads(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

impl IdentityCache {
    /// A cache hashing each file on `threads` threads (0: one per core).
    pub fn new(threads: usize) -> IdentityCache {
        IdentityCache {
            map: Mutex::new(HashMap::new()),
            threads: hash_threads(threads),
            turns: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_FILES)),
        }
    }

    /// The identity of `file` as described by `meta`: known, or being
    /// computed (started here if nobody asked before). Never waits for the
    /// hashing itself. Must be called within the runtime.
    pub fn lookup(&self, file: &File, meta: &std::fs::Metadata) -> io::Result<Hashing> {
        let key = (meta.dev(), meta.ino(), meta.size(), mtime_ns(meta));
        let mut map = self.map.lock().map_err(|_| io::Error::other("identity cache poisoned"))?;
        if let Some(h) = map.get(&key) {
            // A failed computation (a read error) is tried again.
            if !matches!(h.now(), Some(Err(_))) {
                return Ok(h.clone());
            }
        }
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, h| h.now().is_none());
        }
        let (tx, rx) = watch::channel(None);
        let hashing = Hashing(rx);
        map.insert(key, hashing.clone());
        let file = file.try_clone()?;
        let (size, threads, turns) = (meta.size(), self.threads, self.turns.clone());
        tokio::spawn(async move {
            let Ok(_turn) = turns.acquire_owned().await else { return };
            let hashed = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let out = hash_file(&file, size, threads).map(Arc::new).map_err(|e| e.to_string());
                match &out {
                    Ok(_) => tracing::debug!(size, threads, secs = started.elapsed().as_secs_f64(), "file hashed"),
                    Err(e) => tracing::warn!(size, error = %e, "hashing failed"),
                }
                out
            })
            .await
            .unwrap_or_else(|e| Err(format!("hashing task failed: {e}")));
            tx.send_replace(Some(hashed));
        });
        Ok(hashing)
    }

    /// The identity of `file`, waiting for its hashing if needed.
    pub async fn get(&self, file: &File, meta: &std::fs::Metadata) -> io::Result<Arc<Identity>> {
        self.lookup(file, meta)?.wait().await.map_err(io::Error::other)
    }
}

/// Most files `index_export` looks at.
const INDEX_MAX_FILES: usize = 100_000;

/// Hashes every regular file under the export root, one after the other, so
/// that the first download of each finds its identity ready. Stops when
/// `stop` is cancelled. Files are opened through the jail, as `STAT` opens
/// them; symbolic links are not followed while walking.
pub async fn index_export(jail: &crate::jail::Jail, cache: &IdentityCache, stop: tokio_util::sync::CancellationToken) {
    let root = jail.root_path().to_path_buf();
    let started = std::time::Instant::now();
    let found = match tokio::task::spawn_blocking(move || walk(&root)).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "indexing the export failed");
            return;
        }
    };
    let (mut files, mut bytes) = (0u64, 0u64);
    for rel in found {
        let Ok((file, meta)) = jail.open(&rel) else { continue };
        let Ok(hashing) = cache.lookup(&file, &meta) else { continue };
        tokio::select! {
            r = hashing.wait() => if r.is_ok() {
                files += 1;
                bytes += meta.len();
            },
            _ = stop.cancelled() => return,
        }
    }
    tracing::info!(files, bytes, secs = started.elapsed().as_secs_f64(), "export indexed");
}

/// Relative paths of the regular files under `root`, without following
/// symbolic links, at most [`INDEX_MAX_FILES`].
fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![std::path::PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&rel)) else { continue };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = rel.join(e.file_name());
            if ft.is_dir() {
                dirs.push(path);
            } else if ft.is_file() {
                if let Some(s) = path.to_str() {
                    out.push(s.to_string());
                }
                if out.len() >= INDEX_MAX_FILES {
                    return out;
                }
            }
        }
    }
    out
}

/// Hashes every piece of `file` on `threads` threads.
pub fn hash_file(file: &File, size: u64, threads: usize) -> io::Result<Identity> {
    let piece_size = piece_size_for(size);
    let count = piece_count_for(size, piece_size) as usize;
    let mut hashes = vec![[0u8; 32]; count];
    let threads = threads.max(1).min(count.max(1));
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
        let id = hash_file(&f, data.len() as u64, 2).unwrap();
        assert_eq!(id.piece_count(), 3);
        for i in 0..3 {
            let (s, e) = id.piece_range(i);
            assert_eq!(id.hashes[i], *blake3::hash(&data[s as usize..e as usize]).as_bytes());
        }
        let empty = hash_file(&f, 0, 1).unwrap();
        assert_eq!(empty.piece_count(), 0);
    }
}
