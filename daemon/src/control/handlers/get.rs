//! `get`: start a download, or add sources to the same one already under
//! way, or say the destination already holds the file. The checks (what
//! the caller may write, which sources, which name) live in
//! [`crate::download::Downloads::start`]; this says what came of them.

use mftd_common::control::{GetRequest, Response};

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::download::Started;

pub(super) fn get(d: &Daemon, caller: &Caller, g: GetRequest) -> Response {
    match d.downloads.start(g, caller) {
        Ok(Started::Download { dl, resumed, added }) => Response::Accepted {
            id: dl.id,
            destination: dl.job.destination.display().to_string(),
            resumed,
            added_sources: added,
        },
        Ok(Started::Identical { destination, identity }) => {
            Response::Identical { destination: destination.display().to_string(), identity }
        }
        Err(r) => r.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mftd_common::control::{DownloadState, ErrorCode, Request};

    use super::*;
    use crate::testing::TestDaemon;

    fn request(t: &TestDaemon, name: &str) -> GetRequest {
        GetRequest {
            remote_path: name.into(),
            sources: t.ports().iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_get_from_two_listeners_arrives_whole_and_a_repeat_is_identical() {
        let t = TestDaemon::start(2).await;
        let data = t.export("whole.bin", 5 << 20);
        let (id, destination) = match t.answer(Request::Get(request(&t, "whole.bin"))).await {
            Response::Accepted { id, destination, resumed: false, added_sources } if added_sources.is_empty() => {
                (id, destination)
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(destination, t.downloads_dir().join("whole.bin").display().to_string());
        let info = t.wait_for(id, DownloadState::Done, Duration::from_secs(30)).await;
        let got = std::fs::read(&destination).expect("the downloaded file");
        assert!(got == data, "the downloaded file differs from the exported one");
        let served: u64 = t.daemon.listeners.list().iter().map(|l| l.bytes_sent).sum();
        assert!(served >= data.len() as u64, "the listeners sent {served} bytes of {}", data.len());
        assert_eq!(info.sources.len(), 2);
        // Progress is the scheduler's, kept when the run ended.
        assert_eq!(info.bytes_done, data.len() as u64);
        assert_eq!(info.pieces_total, (data.len() as u64).div_ceil(256 << 10));
        assert_eq!(info.pieces_verified, info.pieces_total);
        match t.answer(Request::Get(request(&t, "whole.bin"))).await {
            Response::Identical { destination: again, identity } => {
                assert_eq!(again, destination);
                assert_eq!(identity.len(), 64, "{identity}");
            }
            other => panic!("a repeat of a finished get: {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_source_that_hangs_up_at_once_is_given_up_on_after_the_time_asked() {
        let t = TestDaemon::start(0).await;
        // A fake source: accepts every connection and closes it unanswered.
        let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = format!("127.0.0.1:{}", fake.local_addr().expect("addr").port());
        let hang_up = tokio::spawn(async move {
            while let Ok((conn, _)) = fake.accept().await {
                drop(conn);
            }
        });
        let g = GetRequest {
            remote_path: "f.bin".into(),
            sources: vec![address.clone()],
            give_up_after_secs: Some(1),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let id = match t.answer(Request::Get(g)).await {
            Response::Accepted { id, .. } => id,
            other => panic!("{other:?}"),
        };
        let info = t.wait_for(id, DownloadState::Failed, Duration::from_secs(15)).await;
        let took = started.elapsed();
        hang_up.abort();
        assert!(took >= Duration::from_secs(1), "gave up after {took:?}, before the 1 s asked");
        assert!(took < Duration::from_secs(10), "took {took:?} to give up after 1 s");
        let error = info.error.expect("a failed download says why");
        assert!(error.contains("gave up") && error.contains(&address), "{error}");
        assert!(!t.downloads_dir().join("f.bin").exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_request_is_refused_before_any_download_exists() {
        let t = TestDaemon::start(1).await;
        let mut no_sources = request(&t, "x.bin");
        no_sources.sources.clear();
        let mut traversal = request(&t, "x.bin");
        traversal.remote_path = "../etc/passwd".into();
        let mut bad_source = request(&t, "x.bin");
        bad_source.sources = vec!["no-port-here".into()];
        for g in [no_sources, traversal, bad_source] {
            match t.answer(Request::Get(g.clone())).await {
                Response::Error { code, message } => {
                    assert!(
                        matches!(code, ErrorCode::InvalidArgument | ErrorCode::BadPath),
                        "{g:?}: {code:?} {message}"
                    )
                }
                other => panic!("{g:?}: {other:?}"),
            }
        }
        assert!(t.daemon.downloads.all().is_empty(), "a refused get left a download behind");
    }
}
