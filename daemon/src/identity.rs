//! Content identities of exported files, computed once per file version.
//!
//! A file version is (device, inode, size, mtime, ctime); as long as it is
//! the same, the per-piece BLAKE3 hashes are served from memory (the 4096
//! most recently used versions) or from `STATE_DIR/identities`, where each
//! is kept across restarts (ctime catches a file rewritten with its mtime
//! put back). The first `STAT` of a
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

/// Most file versions kept in memory; beyond it the least recently used
/// finished one goes.
const MAX_ENTRIES: usize = 4096;
/// Most identity files kept on disk; beyond it the oldest eighth goes.
const MAX_PERSISTED: usize = 16384;
/// A file whose hashing failed is not hashed again sooner than this.
const RETRY_FAILED: std::time::Duration = std::time::Duration::from_secs(10);

/// (device, inode, size, mtime, ctime).
type Key = (u64, u64, u64, i64, i64);

fn key_of(meta: &std::fs::Metadata) -> Key {
    let ctime = meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec());
    (meta.dev(), meta.ino(), meta.size(), mtime_ns(meta), ctime)
}
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
    /// Each version with when it was last asked for.
    map: Mutex<HashMap<Key, (Hashing, std::time::Instant)>>,
    /// Threads one file is hashed on.
    threads: usize,
    turns: Arc<tokio::sync::Semaphore>,
    /// Where identities are kept across restarts.
    persist: Option<std::path::PathBuf>,
}

impl Default for IdentityCache {
    fn default() -> Self {
        IdentityCache::new(0, None)
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
    /// A cache hashing each file on `threads` threads (0: one per core),
    /// keeping identities in `persist` across restarts if given.
    pub fn new(threads: usize, persist: Option<std::path::PathBuf>) -> IdentityCache {
        if let Some(dir) = &persist {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot keep file identities across restarts");
            }
        }
        IdentityCache {
            map: Mutex::new(HashMap::new()),
            threads: hash_threads(threads),
            turns: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_FILES)),
            persist,
        }
    }

    /// The identity of `file` as described by `meta`: known (in memory or
    /// kept on disk), or being computed (started here if nobody asked
    /// before). Never waits for the hashing itself.
    pub async fn lookup(&self, file: &File, meta: &std::fs::Metadata) -> io::Result<Hashing> {
        let key = key_of(meta);
        if let Some(h) = self.cached(&key)? {
            return Ok(h);
        }
        // Kept from an earlier run?
        let path = self.persist.as_ref().map(|d| d.join(file_name(&key)));
        if let Some(p) = path.clone() {
            let size = meta.size();
            let loaded = tokio::task::spawn_blocking(move || load(&p, size)).await.ok().flatten();
            if let Some(id) = loaded {
                let (_, rx) = watch::channel(Some(Ok(Arc::new(id))));
                return Ok(self.insert(key, Hashing(rx)));
            }
        }
        let (tx, rx) = watch::channel(None);
        let hashing = self.insert(key, Hashing(rx));
        if hashing.now().is_some() {
            return Ok(hashing); // another task got there first
        }
        let file = file.try_clone()?;
        let (size, threads, turns) = (meta.size(), self.threads, self.turns.clone());
        tokio::spawn(async move {
            let Ok(_turn) = turns.acquire_owned().await else { return };
            let hashed = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let out = hash_file(&file, size, threads).map(Arc::new).map_err(|e| e.to_string());
                match &out {
                    Ok(id) => {
                        tracing::debug!(size, threads, secs = started.elapsed().as_secs_f64(), "file hashed");
                        if let Some(p) = &path {
                            if let Err(e) = store(p, id) {
                                tracing::warn!(file = %p.display(), error = %e, "cannot keep the file identity");
                            }
                        }
                    }
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

    /// The version in memory, unless its hashing failed long enough ago to
    /// try again.
    fn cached(&self, key: &Key) -> io::Result<Option<Hashing>> {
        let mut map = self.map.lock().map_err(|_| io::Error::other("identity cache poisoned"))?;
        let Some((h, used)) = map.get_mut(key) else { return Ok(None) };
        if matches!(h.now(), Some(Err(_))) && used.elapsed() >= RETRY_FAILED {
            return Ok(None);
        }
        if !matches!(h.now(), Some(Err(_))) {
            *used = std::time::Instant::now();
        }
        Ok(Some(h.clone()))
    }

    /// Records `h` for `key`, making room by dropping the least recently
    /// used finished version. Returns what is recorded for `key` now.
    fn insert(&self, key: Key, h: Hashing) -> Hashing {
        let Ok(mut map) = self.map.lock() else { return h };
        if let Some((old, _)) = map.get(&key) {
            if old.now().is_none() || matches!(old.now(), Some(Ok(_))) {
                return old.clone();
            }
        }
        if map.len() >= MAX_ENTRIES {
            let oldest =
                map.iter().filter(|(_, (h, _))| h.now().is_some()).min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k);
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        map.insert(key, (h.clone(), std::time::Instant::now()));
        h
    }
}

/// Magic of an identity file.
const ID_MAGIC: &[u8; 8] = b"MFTDID1\n";

fn file_name(key: &Key) -> String {
    let mut b = Vec::with_capacity(40);
    for v in [key.0, key.1, key.2, key.3 as u64, key.4 as u64] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    format!("{}.id", &blake3::hash(&b).to_hex()[..32])
}

/// Writes `id` to `path` (temp file and rename), then keeps the directory
/// under [`MAX_PERSISTED`] files.
fn store(path: &std::path::Path, id: &Identity) -> io::Result<()> {
    use std::io::Write;
    let mut body = Vec::with_capacity(24 + id.hashes.len() * 32 + 32);
    body.extend_from_slice(ID_MAGIC);
    body.extend_from_slice(&id.size.to_be_bytes());
    body.extend_from_slice(&id.piece_size.to_be_bytes());
    body.extend_from_slice(&(id.hashes.len() as u32).to_be_bytes());
    for h in &id.hashes {
        body.extend_from_slice(h);
    }
    let sum = *blake3::hash(&body).as_bytes();
    body.extend_from_slice(&sum);
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&body)?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        prune(dir);
    }
    Ok(())
}

/// Drops the oldest eighth of the identity files when there are too many.
fn prune(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, std::path::PathBuf)> =
        entries.flatten().filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
    if files.len() <= MAX_PERSISTED {
        return;
    }
    files.sort();
    for (_, p) in files.iter().take(files.len() / 8) {
        let _ = std::fs::remove_file(p);
    }
}

/// Reads an identity file for a file of `size` bytes; `None` if it is
/// missing, damaged or does not fit.
fn load(path: &std::path::Path, size: u64) -> Option<Identity> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut body = Vec::new();
    let max = 24 + (MAX_PIECES_ON_DISK * 32) + 32;
    f.take(max as u64 + 1).read_to_end(&mut body).ok()?;
    if body.len() < 24 + 32 || body.len() > max || &body[..8] != ID_MAGIC {
        return None;
    }
    let (content, sum) = body.split_at(body.len() - 32);
    if blake3::hash(content).as_bytes() != sum {
        return None;
    }
    let stored = u64::from_be_bytes(content[8..16].try_into().ok()?);
    let piece_size = u32::from_be_bytes(content[16..20].try_into().ok()?);
    let count = u32::from_be_bytes(content[20..24].try_into().ok()?) as usize;
    if stored != size || piece_size != piece_size_for(size) || count as u64 != piece_count_for(size, piece_size) {
        return None;
    }
    let hashes: Vec<[u8; 32]> = content[24..].chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
    if hashes.len() != count {
        return None;
    }
    Some(Identity::from_hashes(size, piece_size, hashes))
}

/// Most pieces an identity file may list.
const MAX_PIECES_ON_DISK: usize = mftd_common::proto::MAX_PIECES as usize;

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
        let Ok(hashing) = cache.lookup(&file, &meta).await else { continue };
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
                    let r = mftd_common::proto::piece_range(size, piece_size, i as u64);
                    let (start, len) = (r.start, r.len() as usize);
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

    #[tokio::test]
    async fn two_lookups_of_a_new_file_share_one_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        let cache = IdentityCache::new(1, None);
        let (a, b) = (cache.lookup(&f, &meta).await.unwrap(), cache.lookup(&f, &meta).await.unwrap());
        let (a, b) = (a.wait().await.unwrap(), b.wait().await.unwrap());
        assert!(Arc::ptr_eq(&a, &b), "the second STAT started a hash of its own");
        assert_eq!(cache.map.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_least_recently_used_identity_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let cache = IdentityCache::new(1, None);
        let mut files = Vec::new();
        for i in 0..=MAX_ENTRIES {
            let p = dir.path().join(i.to_string());
            std::fs::write(&p, i.to_string()).unwrap();
            let f = File::open(&p).unwrap();
            let meta = f.metadata().unwrap();
            files.push((f, meta));
        }
        let key = |i: usize| key_of(&files[i].1);
        for (f, meta) in &files[..MAX_ENTRIES] {
            cache.lookup(f, meta).await.unwrap().wait().await.unwrap();
        }
        // Asked again: the first is now the most recently used.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        cache.lookup(&files[0].0, &files[0].1).await.unwrap();
        let (f, meta) = &files[MAX_ENTRIES];
        cache.lookup(f, meta).await.unwrap().wait().await.unwrap();
        let map = cache.map.lock().unwrap();
        assert_eq!(map.len(), MAX_ENTRIES, "not wiped, not grown");
        assert!(map.contains_key(&key(0)), "a recently used identity was evicted");
        assert!(!map.contains_key(&key(1)), "the least recently used one stayed");
        assert!(map.contains_key(&key(MAX_ENTRIES)));
    }

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
