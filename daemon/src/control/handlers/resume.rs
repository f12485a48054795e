//! `downloads resume ID` and `get --resume [ID]`: continue a paused or
//! interrupted download from its manifest. `get --resume` with no ID
//! continues every one the caller may.

use mftd_common::control::Response;

use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn resume(d: &Daemon, caller: &Caller, id: u64) -> Response {
    match d.downloads.resume(id, caller) {
        Ok(_) => Response::ok(format!("resumed download {id}")),
        Err(r) => r.into(),
    }
}

pub(super) fn get_resume(d: &Daemon, caller: &Caller, id: Option<u64>) -> Response {
    match id {
        Some(id) => match d.downloads.resume(id, caller) {
            Ok(dl) => Response::Resumed { ids: vec![dl.id] },
            Err(r) => r.into(),
        },
        None => {
            // Those the caller may not touch are left alone, not reported:
            // they are someone else's business.
            let ids = d
                .downloads
                .resumable()
                .into_iter()
                .filter_map(|id| d.downloads.resume(id, caller).ok().map(|dl| dl.id))
                .collect();
            Response::Resumed { ids }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mftd_common::control::{DownloadState, ErrorCode, Request};

    use super::*;
    use crate::testing::{ok_message, TestDaemon};

    #[tokio::test(flavor = "multi_thread")]
    async fn resume_all_takes_only_the_callers_downloads() {
        let t = TestDaemon::start(1).await;
        let (id, _) = t.slow_download(2 << 20).await;
        ok_message(t.ask(Request::DownloadPause { id }).await);
        assert_eq!(get_resume(&t.daemon, &TestDaemon::stranger(), None), Response::Resumed { ids: vec![] });
        assert_eq!(t.info(id).state, DownloadState::Paused, "a stranger's resume-all resumed the operator's download");
        assert_eq!(get_resume(&t.daemon, &Caller::daemon(), None), Response::Resumed { ids: vec![id] });
        t.wait_for(id, DownloadState::Active, Duration::from_secs(10)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unknown_id_is_said() {
        let t = TestDaemon::start(0).await;
        for r in [resume(&t.daemon, &Caller::daemon(), 42), get_resume(&t.daemon, &Caller::daemon(), Some(42))] {
            match r {
                Response::Error { code: ErrorCode::UnknownDownload, message } => {
                    assert!(message.contains("no download with ID 42"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
