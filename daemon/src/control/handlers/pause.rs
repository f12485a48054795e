//! `downloads pause`: stop a download, keeping its data and manifest.
//! Answered once the pause holds, so a `resume` right after finds the
//! download paused, not still winding down.

use std::time::{Duration, Instant};

use mftd_common::control::{DownloadState, Response};

use crate::caller::Caller;
use crate::daemon::Daemon;

/// Longest a `pause` waits for the download to stop before answering.
const PAUSE_WAIT: Duration = Duration::from_secs(10);

pub(super) fn pause(d: &Daemon, caller: &Caller, id: u64) -> Response {
    let dl = match d.downloads.pause(id, caller) {
        Ok(dl) => dl,
        Err(r) => return r.into(),
    };
    // Handlers run off the async runtime, so waiting here blocks no one.
    let deadline = Instant::now() + PAUSE_WAIT;
    while dl.state() != DownloadState::Paused && !dl.state().is_final() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    match dl.state() {
        DownloadState::Paused => {
            Response::ok(format!("paused download {id}; `mftctl downloads resume {id}` continues it"))
        }
        s if s.is_final() => Response::ok(format!("download {id} ended before it could pause")),
        _ => Response::ok(format!(
            "pausing download {id} (still winding down); `mftctl downloads resume {id}` continues it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use mftd_common::control::{ErrorCode, Request};

    use super::*;
    use crate::testing::{ok_message, TestDaemon};

    #[tokio::test(flavor = "multi_thread")]
    async fn pause_answers_once_the_download_is_paused_and_resume_finishes_it() {
        let t = TestDaemon::start(1).await;
        let (id, data) = t.slow_download(4 << 20).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.info(id).bytes_done == 0 {
            assert!(Instant::now() < deadline, "no bytes in 10 s: {:?}", t.info(id));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let message = ok_message(t.ask(Request::DownloadPause { id }).await);
        assert_eq!(message, format!("paused download {id}; `mftctl downloads resume {id}` continues it"));
        // Already paused when the answer came, not some time after.
        assert_eq!(t.info(id).state, DownloadState::Paused);
        let paused = t.info(id);
        assert!(paused.bytes_done < data.len() as u64, "finished before the pause: the test proves nothing");
        assert!(paused.bytes_done > 0 && paused.pieces_total == 16, "progress was lost at the pause: {paused:?}");
        assert!(paused.pieces_verified <= paused.bytes_done.div_ceil(256 << 10), "{paused:?}");
        t.daemon.listeners.set_limit(t.ports()[0], 0).expect("lift the limit");
        assert_eq!(ok_message(t.ask(Request::DownloadResume { id }).await), format!("resumed download {id}"));
        t.wait_for(id, DownloadState::Done, Duration::from_secs(30)).await;
        let got = std::fs::read(t.downloads_dir().join("slow.bin")).expect("the downloaded file");
        assert!(got == data, "the resumed download differs from the exported file");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn someone_elses_download_cannot_be_paused_and_looks_unknown() {
        let t = TestDaemon::start(1).await;
        let (id, _) = t.slow_download(2 << 20).await;
        let theirs = pause(&t.daemon, &TestDaemon::stranger(), id);
        assert_eq!(t.info(id).state, DownloadState::Active);
        // An ID that does not exist, renumbered to this one: the same answer.
        let unknown = match pause(&t.daemon, &TestDaemon::stranger(), id + 100) {
            Response::Error { code, message } => {
                Response::Error { code, message: message.replace(&(id + 100).to_string(), &id.to_string()) }
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(theirs, unknown, "another user's download answers exactly like an unknown ID");
        assert!(matches!(theirs, Response::Error { code: ErrorCode::UnknownDownload, .. }), "{theirs:?}");
    }
}
