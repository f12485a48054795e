//! `downloads remove ID` and `downloads purge`: take ended downloads off
//! the list. A failed download's kept data goes with `remove` (the caller
//! named it) but survives `purge` (a sweep should not delete what a retry
//! could still use).

use mftd_common::control::Response;

use super::plural;
use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn remove(d: &Daemon, caller: &Caller, id: u64) -> Response {
    match d.downloads.remove(id, caller) {
        Ok(true) => Response::ok(format!("removed download {id} and its partial data")),
        Ok(false) => Response::ok(format!("removed download {id} from the list")),
        Err(r) => r.into(),
    }
}

pub(super) fn purge(d: &Daemon, caller: &Caller) -> Response {
    let (removed, kept) = d.downloads.purge(caller);
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let mut msg = match removed.len() {
        0 => "no ended downloads to remove".to_string(),
        n => format!("removed {n} ended {}: {}", plural(n, "download", "downloads"), ids(&removed)),
    };
    if !kept.is_empty() {
        msg.push_str(&format!(
            "; kept failed {} {} with data (`mftctl downloads show ID` says why it failed, `mftctl get --resume ID` retries, `mftctl downloads remove ID` deletes)",
            plural(kept.len(), "download", "downloads"),
            ids(&kept)
        ));
    }
    Response::ok(msg)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mftd_common::control::{DownloadState, ErrorCode, GetRequest, Request};

    use super::*;
    use crate::testing::{ok_message, TestDaemon};

    #[tokio::test(flavor = "multi_thread")]
    async fn purge_takes_finished_downloads_off_the_list_and_keeps_their_files() {
        let t = TestDaemon::start(1).await;
        assert_eq!(ok_message(t.ask(Request::DownloadsPurge).await), "no ended downloads to remove");
        let mut ids = vec![];
        for name in ["a.bin", "b.bin"] {
            t.export(name, 100_000);
            let g = GetRequest {
                remote_path: name.into(),
                sources: vec![format!("127.0.0.1:{}", t.ports()[0])],
                ..Default::default()
            };
            match t.answer(Request::Get(g)).await {
                Response::Accepted { id, .. } => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        for &id in &ids {
            t.wait_for(id, DownloadState::Done, Duration::from_secs(30)).await;
        }
        // A stranger's purge sweeps only its own (none).
        assert_eq!(
            ok_message(t.ask_as(TestDaemon::stranger(), Request::DownloadsPurge).await),
            "no ended downloads to remove"
        );
        assert_eq!(
            purge(&t.daemon, &Caller::daemon()),
            Response::ok(format!("removed 2 ended downloads: {}, {}", ids[0], ids[1]))
        );
        assert!(t.daemon.downloads.all().is_empty());
        assert!(t.downloads_dir().join("a.bin").exists() && t.downloads_dir().join("b.bin").exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_running_download_is_not_removed() {
        let t = TestDaemon::start(1).await;
        let (id, _) = t.slow_download(2 << 20).await;
        match remove(&t.daemon, &Caller::daemon(), id) {
            Response::Error { code: ErrorCode::InvalidArgument, message } => {
                assert!(message.contains(&id.to_string()), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.info(id).state, DownloadState::Active);
    }
}
