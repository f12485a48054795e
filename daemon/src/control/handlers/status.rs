//! `status`: the daemon at a glance. A restricted caller sees only its own
//! downloads; listeners and paths are everyone's to see.

use mftd_common::control::{Response, StatusInfo};

use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn status(d: &Daemon, caller: &Caller) -> Response {
    let cfg = d.config();
    Response::Status(StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: d.started.elapsed().as_secs(),
        listen: cfg.listen.to_string(),
        export_dir: cfg.export.display().to_string(),
        download_dir: cfg.download_dir.display().to_string(),
        socket: cfg.socket.display().to_string(),
        node_id: d.node_id.clone(),
        listeners: d.listeners.list(),
        downloads: d.downloads.visible_to(caller).iter().map(|x| x.info()).collect(),
        damaged_manifests: d.downloads.damaged(),
    })
}

#[cfg(test)]
mod tests {
    use mftd_common::control::{GetRequest, Request};

    use super::*;
    use crate::testing::TestDaemon;

    #[tokio::test(flavor = "multi_thread")]
    async fn status_names_the_paths_listeners_and_only_the_callers_downloads() {
        let t = TestDaemon::start(2).await;
        t.export("f.bin", 1000);
        let port = t.ports()[0];
        let get = GetRequest {
            remote_path: "f.bin".into(),
            sources: vec![format!("127.0.0.1:{port}")],
            ..Default::default()
        };
        assert!(matches!(t.answer(Request::Get(get)).await, Response::Accepted { .. }));
        let operator = match status(&t.daemon, &Caller::daemon()) {
            Response::Status(s) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(operator.export_dir, t.dir.path().join("export").display().to_string());
        assert_eq!(operator.download_dir, t.downloads_dir().display().to_string());
        assert_eq!(operator.listeners.iter().map(|l| l.port).collect::<Vec<_>>(), t.ports());
        assert_eq!(operator.downloads.len(), 1);
        // The ID the node identity in the state directory has.
        let node = crate::node::NodeIdentity::load_or_create(&t.dir.path().join("state")).expect("node identity");
        assert_eq!(operator.node_id, node.id.to_string());
        match status(&t.daemon, &TestDaemon::stranger()) {
            Response::Status(s) => {
                assert!(s.downloads.is_empty(), "a stranger sees the operator's download: {:?}", s.downloads);
                assert_eq!(s.listeners.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }
}
