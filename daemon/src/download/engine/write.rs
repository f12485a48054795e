//! Received bytes to verified pieces: claiming and writing what arrives,
//! hashing a piece in stream when one connection wrote all of it,
//! verifying completed pieces (from that hash or by reading back), and
//! blame: strikes for the authors of a bad piece, or, when several wrote
//! it, suspecting each and judging them against a good copy.
//!
//! Must never: write a byte that was not claimed first, mark a piece
//! verified without checking it against the adopted hash list, or strike
//! an honest source for another's bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, warn};

use mftd_common::control::SourceState;
use mftd_common::range::Range;

use crate::download::error::{DownloadError, SourceError};
use crate::download::scheduler::{SourceId, Ticket, FROM_DISK};

use super::fetch::ConnContext;
use super::{lock, AuthorSpan, Chosen, Engine, Outcome, MAX_STRIKES};

/// Claims `got`, writes the claimed parts at their offsets, commits them and
/// starts verification of completed pieces. Returns the buffer.
pub(super) async fn write_received(
    cx: &ConnContext<'_>,
    ticket: Ticket,
    got: Range,
    buf: Vec<u8>,
    hasher: &mut Option<PieceHasher>,
) -> Result<Vec<u8>, DownloadError> {
    let &ConnContext { eng, chosen, src, conn_id, .. } = cx;
    let piece_size = chosen.piece_size as u64;
    let (claims, gens) = {
        let mut s = lock(&chosen.sched);
        let claims = s.claim(conn_id, ticket, got, Instant::now());
        let first = (got.start / piece_size) as usize;
        let last = (got.end.saturating_sub(1) / piece_size) as usize;
        let gens: Vec<(usize, u32)> = (first..=last).map(|p| (p, s.generation(p))).collect();
        (claims, gens)
    };
    eng.set_source(src, |s| s.bytes_received += got.len());
    if claims.is_empty() {
        *hasher = None;
        return Ok(buf);
    }
    let file = chosen.file.clone();
    let c2 = claims.clone();
    // Only bytes this connection wrote itself, all of them, can be hashed
    // in stream; anything else is verified by reading the piece back.
    let all_ours = claims.len() == 1 && claims[0] == got;
    let mut ph = if all_ours { hasher.take() } else { None };
    let size = chosen.size;
    let work = move || {
        let mut res: io::Result<()> = Ok(());
        for c in &c2 {
            let a = (c.start - got.start) as usize;
            let b = (c.end - got.start) as usize;
            if let Err(e) = file.write_all_at(&buf[a..b], c.start) {
                res = Err(e);
                break;
            }
        }
        let mut hashed = Vec::new();
        if all_ours && res.is_ok() {
            let mut at = got.start;
            while at < got.end {
                let piece = (at / piece_size) as usize;
                let Range { start: piece_start, end: piece_end } =
                    mftd_common::proto::piece_range(size, piece_size as u32, piece as u64);
                let end = piece_end.min(got.end);
                let gen = gens.iter().find(|(p, _)| *p == piece).map(|(_, g)| *g).unwrap_or(u32::MAX);
                if at == piece_start {
                    ph = Some(PieceHasher { piece, gen, next: at, hasher: blake3::Hasher::new() });
                }
                match ph.as_mut() {
                    Some(h) if h.piece == piece && h.next == at && h.gen == gen => {
                        h.hasher.update(&buf[(at - got.start) as usize..(end - got.start) as usize]);
                        h.next = end;
                        if end == piece_end {
                            hashed.push((piece, gen, *h.hasher.finalize().as_bytes()));
                            ph = None;
                        }
                    }
                    _ => ph = None,
                }
                at = end;
            }
        } else {
            ph = None;
        }
        (buf, res, ph, hashed)
    };
    eng.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(eng.clone());
    let (buf, res, ph, hashed) = tokio::task::spawn_blocking(move || {
        let r = work();
        drop(guard);
        r
    })
    .await
    .map_err(DownloadError::task("write"))?;
    *hasher = ph;
    if let Err(e) = res {
        let mut s = lock(&chosen.sched);
        for c in claims {
            s.unclaim(c);
        }
        return Err(DownloadError::disk("write", eng.dl.part_path())(e));
    }
    let mut ready = Vec::new();
    let written: u64 = claims.iter().map(|c| c.len()).sum();
    let hashed: Vec<(usize, [u8; 32])> = {
        let mut s = lock(&chosen.sched);
        for c in &claims {
            ready.extend(s.commit(src, *c));
        }
        // A hash started before the piece last failed describes an old copy.
        hashed.into_iter().filter(|(p, g, _)| s.generation(*p) == *g).map(|(p, _, h)| (p, h)).collect()
    };
    if let Some(s) = eng.dl.progress().sources.get_mut(src) {
        s.bytes += written;
    }
    for piece in ready {
        let eng = eng.clone();
        let chosen = chosen.clone();
        let known = hashed.iter().find(|(p, _)| *p == piece).map(|(_, h)| *h);
        spawn_verify(eng, chosen, piece, known);
    }
    eng.progressed.notify_one();
    Ok(buf)
}

impl Engine {
    pub(super) fn strike(&self, src: SourceId, piece: usize) {
        // Bytes of a source already dropped (typically one excluded for
        // serving another version, whose parked pieces fail once the
        // majority's hashes are known): its first reason stands.
        if self.is_dead(src) {
            debug!(source = %self.dl.job.sources[src], piece, "piece of a dropped source failed verification");
            return;
        }
        let mut n = 0;
        self.set_source(src, |s| {
            // Checked again under the lock: two verifications failing at
            // once must not take a source past its last strike.
            if s.dropped() || s.strikes >= MAX_STRIKES {
                return;
            }
            s.strikes += 1;
            n = s.strikes;
            s.last_error = Some(format!("piece {piece} failed verification"));
        });
        if n == 0 {
            return;
        }
        warn!(source = %self.dl.job.sources[src], piece, strikes = n, "piece failed verification");
        if n >= MAX_STRIKES {
            self.kill_source(src, SourceState::Failed, SourceError::BadPieces(n));
        }
    }
}

/// Counts one blocking task of the engine while it lives.
pub(super) struct InFlight(Arc<Engine>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// BLAKE3 state of the piece a connection is writing from its first byte.
pub struct PieceHasher {
    piece: usize,
    /// The piece's generation when hashing started (see `Scheduler::generation`).
    gen: u32,
    /// Next byte expected; anything else ends in-stream hashing.
    next: u64,
    hasher: blake3::Hasher,
}

/// Checks piece `p` against its hash: the hash computed while its bytes
/// were written when one connection wrote all of them (`known`), otherwise
/// by reading the piece back from disk.
/// Starts verifying piece `p`; counted in `in_flight` until done.
pub(super) fn spawn_verify(eng: Arc<Engine>, chosen: Arc<Chosen>, p: usize, known: Option<[u8; 32]>) {
    eng.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(eng.clone());
    tokio::spawn(async move {
        let _guard = guard;
        verify(eng, chosen, p, known).await
    });
}

pub(super) async fn verify(eng: Arc<Engine>, chosen: Arc<Chosen>, p: usize, known: Option<[u8; 32]>) {
    // The run is over (paused, cancelled, shut down): the next run
    // re-verifies whatever this one did not.
    if eng.workers.is_cancelled() {
        return;
    }
    // Pieces may complete before any source sent the hash list; they are
    // checked when it arrives (see `Chosen::hashes_arrived`).
    let Some(hashes) = chosen.hashes_or_park(p, known) else { return };
    let ok = match known {
        Some(h) => Ok(Ok(hashes.get(p) == Some(&h))),
        None => read_back(&eng, &chosen, p, hashes).await,
    };
    match ok {
        // A good copy tells whose bytes in earlier bad ones were wrong.
        Ok(Ok(true)) => judge(&eng, &chosen, p).await,
        Ok(Ok(false)) => {
            if let Some(solo) = suspect(&eng, &chosen, p).await {
                settle(eng, chosen.clone(), p, ok, false);
                lock(&chosen.sched).refetch_from(p, solo);
                return;
            }
        }
        _ => {}
    }
    settle(eng, chosen, p, ok, true);
}

/// BLAKE3 of bytes `r` of `file`.
pub(super) fn hash_range(file: &File, r: Range) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; (r.len() as usize).min(1 << 20)];
    let mut at = r.start;
    while at < r.end {
        let n = ((r.end - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// Piece `p` failed with bytes of several sources in it (none dropped):
/// nobody is struck yet. The hash of each source's span of the bad copy is
/// kept, and the piece is fetched again whole from one source (the one
/// that wrote most of it). When a good copy is verified, [`judge`] strikes
/// exactly the sources whose spans differ from it: an honest source that
/// finished a piece a liar started is never struck for the liar's bytes.
/// Bytes found on disk when the run started count as an author of their
/// own ([`FROM_DISK`]): nobody is struck for them, and a source that only
/// completed such a piece is not blamed for what it found there.
/// Returns the source to fetch it from, or `None` when one source alone is
/// to blame (a sole author, or a dropped source among the authors).
pub(super) async fn suspect(eng: &Arc<Engine>, chosen: &Arc<Chosen>, p: usize) -> Option<SourceId> {
    let spans = lock(&chosen.sched).spans_of(p);
    let mut bytes: HashMap<SourceId, u64> = HashMap::new();
    for (s, r) in &spans {
        *bytes.entry(*s).or_default() += r.len();
    }
    if bytes.len() < 2 || bytes.keys().any(|s| eng.is_dead(*s)) {
        return None;
    }
    let file = chosen.file.clone();
    let hashed = tokio::task::spawn_blocking(move || {
        spans
            .into_iter()
            .map(|(src, range)| hash_range(&file, range).map(|hash| AuthorSpan { src, range, hash }))
            .collect::<io::Result<Vec<_>>>()
    })
    .await
    .ok()?
    .ok()?;
    debug!(piece = p, authors = ?bytes, "bad piece with several authors: fetching it again from one to tell who was wrong");
    lock(&eng.suspects).entry(p).or_default().push(hashed);
    // Bytes found on disk have no source to fetch from again.
    bytes.into_iter().filter(|(s, _)| *s != FROM_DISK).max_by_key(|(s, n)| (*n, std::cmp::Reverse(*s))).map(|(s, _)| s)
}

/// Piece `p` verified: every source whose span of an earlier bad copy of
/// it differs from the good bytes gets a strike; the others were honest.
pub(super) async fn judge(eng: &Arc<Engine>, chosen: &Arc<Chosen>, p: usize) {
    let Some(copies) = lock(&eng.suspects).remove(&p) else { return };
    let file = chosen.file.clone();
    let guilty = tokio::task::spawn_blocking(move || {
        let mut guilty = Vec::new();
        for copy in copies {
            let mut spoiled: Vec<SourceId> = Vec::new();
            for AuthorSpan { src: s, range: r, hash: bad } in copy {
                // Bytes found on disk: nobody to strike for them.
                if s == FROM_DISK {
                    continue;
                }
                if hash_range(&file, r).is_ok_and(|good| good != bad) && !spoiled.contains(&s) {
                    spoiled.push(s);
                }
            }
            guilty.extend(spoiled);
        }
        guilty
    })
    .await
    .unwrap_or_default();
    for s in guilty {
        eng.strike(s, p);
    }
}

pub(super) async fn read_back(
    eng: &Arc<Engine>,
    chosen: &Arc<Chosen>,
    p: usize,
    hashes: &[[u8; 32]],
) -> Result<io::Result<bool>, tokio::task::JoinError> {
    let Some(want) = hashes.get(p).copied() else { return Ok(Ok(false)) };
    let Ok(_slot) = eng.verify_slots.acquire().await else { return Ok(Ok(false)) };
    let c2 = chosen.clone();
    tokio::task::spawn_blocking(move || Ok(hash_range(&c2.file, c2.piece_range(p))? == want)).await
}

/// Records the outcome of verifying piece `p`; with `blame`, a bad piece's
/// authors are struck at once (see [`suspect`] for when they are not).
pub(super) fn settle(
    eng: Arc<Engine>,
    chosen: Arc<Chosen>,
    p: usize,
    ok: Result<io::Result<bool>, tokio::task::JoinError>,
    blame: bool,
) {
    match ok {
        Ok(Ok(true)) => {
            lock(&chosen.sched).piece_verified(p);
            eng.check_complete(&chosen);
        }
        Ok(Ok(false)) => {
            let bad = lock(&chosen.sched).piece_failed(p);
            {
                // Those bytes are no longer part of the file.
                let mut prog = eng.dl.progress();
                for &(s, n) in &bad.contributors {
                    if let Some(sp) = prog.sources.get_mut(s) {
                        sp.bytes = sp.bytes.saturating_sub(n);
                    }
                }
            }
            // A piece that a dropped source (typically one excluded for
            // serving another version) helped write is its fault alone.
            let blame_dropped = bad.contributors.iter().any(|(s, _)| eng.is_dead(*s));
            if blame && !blame_dropped {
                for (s, _) in bad.contributors {
                    eng.strike(s, p);
                }
            }
            eng.changed.notify_waiters();
        }
        Ok(Err(e)) => {
            let _ = eng.outcome.try_send(Outcome::Fatal(DownloadError::disk("read back", eng.dl.part_path())(e)));
        }
        Err(e) => {
            let _ = eng.outcome.try_send(Outcome::Fatal(DownloadError::task("verification")(e)));
        }
    }
}
