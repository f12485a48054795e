//! `downloads cancel`: stop a download for good and delete its partial
//! data (a finished file is never touched).

use mftd_common::control::Response;

use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn cancel(d: &Daemon, caller: &Caller, id: u64) -> Response {
    match d.downloads.cancel(id, caller) {
        Ok(dl) => Response::ok(format!("cancelled download {id}; removed {}", dl.part_path().display())),
        Err(r) => r.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mftd_common::control::DownloadState;

    use super::*;
    use crate::testing::TestDaemon;

    #[tokio::test(flavor = "multi_thread")]
    async fn cancel_deletes_the_partial_file_and_says_which() {
        let t = TestDaemon::start(1).await;
        let (id, _) = t.slow_download(2 << 20).await;
        let part = t.daemon.downloads.get(id).expect("the download").part_path();
        assert!(part.exists(), "no partial file at {}", part.display());
        match cancel(&t.daemon, &Caller::daemon(), id) {
            Response::Ok { message } => {
                assert_eq!(message, format!("cancelled download {id}; removed {}", part.display()))
            }
            other => panic!("{other:?}"),
        }
        let info = t.wait_for(id, DownloadState::Cancelled, Duration::from_secs(10)).await;
        assert!(!part.exists(), "the partial file is still there");
        assert!(!t.downloads_dir().join("slow.bin").exists());
        assert!(info.error.as_deref().unwrap_or_default().contains("cancelled"), "{info:?}");
    }
}
