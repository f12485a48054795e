//! Persisting a run: the checkpointer that writes the manifest while bytes
//! arrive, the manifest built from what the scheduler knows, the final
//! check-fsync-rename of a finished file, and recognising a file renamed
//! into place just before a crash.
//!
//! Must never: claim bytes in a manifest before they are fdatasynced, or
//! rename a file whose every piece is not verified against the adopted
//! identity.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Instant;

use mftd_common::control::SourceState;

use crate::download::error::DownloadError;
use crate::download::part::rename_into_place;
use crate::download::run::{part_path, Download};
use mftd_common::manifest::{piece_runs, ManifestFile};

use super::{lock, Chosen, Engine, Outcome};

pub(super) async fn checkpoint(eng: &Arc<Engine>, paused: bool) -> Result<(), DownloadError> {
    let Some(store) = eng.dl.store.clone() else { return Ok(()) };
    let mut m = eng.dl.base_manifest();
    m.paused = paused;
    match eng.chosen.get() {
        Some(c) => {
            record_progress(&mut m, c);
            let file = c.file.clone();
            let part = eng.dl.part_path();
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(DownloadError::task("fdatasync"))?
                .map_err(DownloadError::disk("fdatasync", part))?;
        }
        None => {
            // Progress from a previous run is not known to the scheduler
            // yet: what the manifest it started from recorded stands (with
            // this run's sources, stats and pause flag).
            if let Some(r) = lock(&eng.dl.resume).as_ref() {
                m.file = r.file.clone();
                m.verified = r.verified.clone();
                m.received = r.received.clone();
            }
        }
    }
    // The crash windows of a checkpoint with something to lose.
    let progress = !m.verified.is_empty() || !m.received.is_empty();
    let at = move |step: crate::store::Step| {
        if progress {
            crate::failpoint::hit(step.failpoint());
        }
    };
    if progress {
        crate::failpoint::hit("checkpoint-data-synced");
    }
    let path = store.path(m.id);
    tokio::task::spawn_blocking(move || store.save_with(&m, at))
        .await
        .map_err(DownloadError::task("manifest"))?
        .map_err(DownloadError::disk("write manifest", path))
}

/// Puts what the scheduler knows of the file into `m`.
pub(super) fn record_progress(m: &mut mftd_common::manifest::Manifest, c: &Chosen) {
    let (verified, received) = {
        let s = lock(&c.sched);
        (piece_runs(s.verified_pieces()), s.received_unverified())
    };
    m.file = Some(ManifestFile { size: c.size, piece_size: c.piece_size, identity: c.root.get().map(hex::encode) });
    m.verified = verified;
    m.received = received;
}

/// Checkpoints while bytes arrive: at least every `checkpoint_interval`, and
/// after at most `checkpoint_bytes` new bytes.
pub(super) async fn checkpointer(eng: Arc<Engine>) {
    let interval = eng.dl.checkpoint_interval;
    let mut last = Instant::now();
    let mut last_sig = (0u64, 0usize);
    let mut root_saved = false;
    loop {
        // Wake on progress (for the byte threshold) and when the interval
        // is up; nothing wakes it while no byte arrives.
        let progressed = eng.progressed.notified();
        let due = tokio::time::Instant::from_std(last + interval);
        tokio::select! {
            _ = progressed => {}
            _ = tokio::time::sleep_until(due) => {}
            _ = eng.workers.cancelled() => return,
        }
        let Some(c) = eng.chosen.get() else {
            // Nothing to save before a version is chosen; the interval
            // starts over (else the passed deadline would wake this loop
            // again at once, spinning while a download waits to start).
            last = Instant::now();
            continue;
        };
        let sig = {
            let s = lock(&c.sched);
            (s.received_bytes(), s.verified_count())
        };
        // The adopted identity is recorded at once: a restart must be able
        // to tell that the remote file changed.
        if !root_saved && c.root.get().is_some() {
            root_saved = true;
            if let Err(e) = checkpoint(&eng, false).await {
                let _ = eng.outcome.try_send(Outcome::Suspend(e));
                return;
            }
            continue;
        }
        if sig == last_sig {
            if last.elapsed() >= interval {
                last = Instant::now();
            }
            continue;
        }
        if last.elapsed() >= interval || sig.0.abs_diff(last_sig.0) >= eng.dl.checkpoint_bytes {
            if let Err(e) = checkpoint(&eng, false).await {
                let _ = eng.outcome.try_send(Outcome::Suspend(e));
                return;
            }
            last = Instant::now();
            last_sig = sig;
        }
    }
}

/// Whole-file check against the identity, fsync, the manifest marked
/// `finishing`, rename, directory fsync. The mark lets a run after a crash
/// between the rename and the manifest's removal recognise the finished
/// file ([`finished_before`]).
pub(super) async fn finish(eng: &Arc<Engine>) -> Result<(), DownloadError> {
    let Some(chosen) = eng.chosen.get().cloned() else { return Err(DownloadError::NotVerified(eng.dl.part_path())) };
    let dest = eng.dl.job.destination.clone();
    let force = eng.dl.job.force;
    let owner = eng.dl.restricted_owner().cloned();
    let c = chosen.clone();
    tokio::task::spawn_blocking(move || {
        let part = part_path(&dest);
        // The whole file is the union of its pieces, each checked against
        // its hash after it was written; the piece hashes must add up to
        // the announced root identity.
        let all = lock(&c.sched).verified_count() == c.piece_count();
        if !all || !c.identity_holds() {
            return Err(DownloadError::NotVerified(part));
        }
        let len = c.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        if len != c.size {
            return Err(DownloadError::WrongLength { path: part, len, want: c.size });
        }
        c.file.sync_all().map_err(DownloadError::disk("fsync", &part))
    })
    .await
    .map_err(DownloadError::task("final check"))??;
    if let Some(store) = eng.dl.store.clone() {
        let mut m = eng.dl.base_manifest();
        record_progress(&mut m, &chosen);
        m.finishing = true;
        let path = store.path(m.id);
        tokio::task::spawn_blocking(move || store.save(&m))
            .await
            .map_err(DownloadError::task("manifest"))?
            .map_err(DownloadError::disk("write manifest", path))?;
        crate::failpoint::hit("finish-marked");
    }
    let dest = eng.dl.job.destination.clone();
    tokio::task::spawn_blocking(move || {
        let part = part_path(&dest);
        let (at, _pin) = crate::caller::pin_dir(&dest, owner.as_ref())
            .map_err(DownloadError::disk("open the directory of", &part))?;
        crate::caller::as_caller(owner.as_ref(), || rename_into_place(&chosen.file, &part_path(&at), &at, force))
            .map_err(DownloadError::disk("act as the download's owner on", &part))??;
        Ok(())
    })
    .await
    .map_err(DownloadError::task("rename"))?
}

/// Whether a crash came between the final rename and the manifest's
/// removal: the manifest says `finishing`, and the destination is a
/// regular file of the recorded size and identity. Then the download is
/// done; what is left of it (the manifest, a part file of its own) is
/// removed. Blocking (it may hash the whole file).
pub(super) fn finished_before(dl: &Download) -> bool {
    let Some(m) = lock(&dl.resume).clone().filter(|m| m.finishing) else { return false };
    let Some((size, Some(identity))) = m.file.as_ref().map(|f| (f.size, f.identity.clone())) else { return false };
    let open = || {
        OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(&dl.job.destination)
    };
    let Ok(Ok(file)) = crate::caller::as_caller(dl.restricted_owner(), open) else { return false };
    if !file.metadata().is_ok_and(|meta| meta.is_file() && meta.len() == size) {
        return false;
    }
    match crate::identity::hash_file(&file, size, 2) {
        Ok(id) if hex::encode(id.root) == identity => {}
        _ => return false,
    }
    dl.remove_part_file();
    if let Some(st) = &dl.store {
        st.remove(dl.id);
    }
    let piece_size = mftd_common::proto::piece_size_for(size);
    let total = mftd_common::proto::piece_count_for(size, piece_size);
    let mut p = dl.progress();
    p.size = Some(size);
    p.identity = Some(identity);
    p.recorded = crate::download::run::Pieces { bytes_done: size, verified: total, total };
    for s in p.sources.iter_mut() {
        s.state = SourceState::Idle;
    }
    true
}
