//! `downloads list` and `downloads show`: what the caller may see. A
//! restricted caller sees its own downloads only; someone else's ID reads
//! as unknown, so IDs do not leak what others fetch.

use mftd_common::control::Response;

use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn list(d: &Daemon, caller: &Caller) -> Response {
    Response::Downloads { downloads: d.downloads.visible_to(caller).iter().map(|x| x.info()).collect() }
}

pub(super) fn show(d: &Daemon, caller: &Caller, id: u64) -> Response {
    match d.downloads.get(id).filter(|dl| dl.visible_to(caller)) {
        Some(dl) => Response::Download { download: dl.info() },
        None => crate::download::unknown(id).into(),
    }
}

#[cfg(test)]
mod tests {
    use mftd_common::control::ErrorCode;

    use super::*;
    use crate::testing::TestDaemon;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stranger_neither_lists_nor_shows_the_operators_download() {
        let t = TestDaemon::start(1).await;
        let (id, data) = t.slow_download(1 << 20).await;
        match show(&t.daemon, &Caller::daemon(), id) {
            Response::Download { download } => {
                assert_eq!(download.id, id);
                assert_eq!(download.size, Some(data.len() as u64));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(list(&t.daemon, &Caller::daemon()), Response::Downloads { downloads } if downloads.len() == 1)
        );
        assert_eq!(list(&t.daemon, &TestDaemon::stranger()), Response::Downloads { downloads: vec![] });
        match show(&t.daemon, &TestDaemon::stranger(), id) {
            Response::Error { code: ErrorCode::UnknownDownload, message } => {
                assert_eq!(message, format!("no download with ID {id}; `mftctl downloads list` shows them"))
            }
            other => panic!("{other:?}"),
        }
    }
}
