//! `downloads add-source`: more sources for a download. A running one
//! continues with them from where it is; a paused one uses them when
//! resumed.

use mftd_common::control::{DownloadState, Response};

use super::plural;
use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn add_source(d: &Daemon, caller: &Caller, id: u64, sources: &[String]) -> Response {
    let (dl, added) = match d.downloads.add_sources(id, sources, caller) {
        Ok(x) => x,
        Err(r) => return r.into(),
    };
    let n = dl.job.sources.len();
    let now = format!("(now {n} {})", plural(n, "source", "sources"));
    if added.is_empty() {
        return Response::ok(format!(
            "download {id} already has {} {now}",
            plural(sources.len(), "this source", "these sources")
        ));
    }
    let when = if dl.state() == DownloadState::Paused { "; it uses them when resumed" } else { "" };
    Response::ok(format!("added {} to download {id}{when} {now}", added.join(", ")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mftd_common::control::Request;

    use super::*;
    use crate::testing::{ok_message, TestDaemon};

    #[tokio::test(flavor = "multi_thread")]
    async fn a_paused_download_gets_the_source_and_uses_it_when_resumed() {
        let t = TestDaemon::start(2).await;
        let (id, data) = t.slow_download(3 << 20).await;
        ok_message(t.ask(Request::DownloadPause { id }).await);
        let second = format!("127.0.0.1:{}", t.ports()[1]);
        assert_eq!(
            add_source(&t.daemon, &Caller::daemon(), id, std::slice::from_ref(&second)),
            Response::ok(format!("added {second} to download {id}; it uses them when resumed (now 2 sources)"))
        );
        assert_eq!(
            add_source(&t.daemon, &Caller::daemon(), id, std::slice::from_ref(&second)),
            Response::ok(format!("download {id} already has this source (now 2 sources)"))
        );
        ok_message(t.ask(Request::DownloadResume { id }).await);
        t.wait_for(id, DownloadState::Done, Duration::from_secs(60)).await;
        let sent =
            t.daemon.listeners.list().iter().find(|l| l.port == t.ports()[1]).expect("second listener").bytes_sent;
        assert!(sent > 0, "the added source sent nothing");
        assert!(std::fs::read(t.downloads_dir().join("slow.bin")).expect("file") == data);
    }
}
