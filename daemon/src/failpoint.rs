//! Deterministic crash points for the end-to-end tests of crash recovery.
//!
//! A debug build started with `MFTD_FAILPOINT=NAME` aborts (no unwinding,
//! no cleanup: as a power cut or `SIGKILL` would leave things) the first
//! time it reaches the point called `NAME`. Release builds compile the
//! check away. The points, in the order a download passes them:
//!
//! * `part-created`: the part file exists; no manifest records it yet.
//! * `checkpoint-data-synced`: a checkpoint with progress to record fsynced
//!   the data; its manifest is not written yet.
//! * `checkpoint-temp-created`: the manifest's temp file exists, empty.
//! * `checkpoint-temp-unsynced`: the temp file is written, not fsynced.
//! * `checkpoint-temp-written`: the manifest's temp file is written and
//!   fsynced, not yet renamed over the manifest.
//! * `checkpoint-renamed`: the manifest is renamed into place; its
//!   directory is not fsynced yet.
//! * `finish-marked`: the manifest says the download is finishing; the
//!   verified file is not renamed yet.
//! * `finish-renamed`: the file has its final name; the manifest is still
//!   there.
//!
//! Must never: do anything in a release build, or in a debug build without
//! the variable.

/// Aborts the process if `MFTD_FAILPOINT` names `point` (debug builds only).
pub fn hit(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("MFTD_FAILPOINT").is_some_and(|v| v == point) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "mftd: MFTD_FAILPOINT={point}: aborting here");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
