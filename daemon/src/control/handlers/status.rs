//! `status`: the daemon at a glance. A restricted caller sees only its own
//! downloads and its own node ID (the one its downloads present), and no
//! damaged manifests (their paths name other users' downloads); listeners
//! and the daemon's directories are everyone's to see.

use mftd_common::control::{ErrorCode, Response, StatusInfo};

use crate::caller::Caller;
use crate::daemon::Daemon;

pub(super) fn status(d: &Daemon, caller: &Caller) -> Response {
    // The node ID the caller's downloads present: a restricted caller's own
    // (made now if it has none yet, so it can be given to a server's
    // `allow_nodes` before the first download), else the daemon's.
    let node_id = match d.downloads.dialers().for_owner(caller) {
        Ok(dialer) => dialer.tls.id.to_string(),
        Err(e) => return Response::error(ErrorCode::Internal, e),
    };
    let cfg = d.config();
    Response::Status(StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: d.started.elapsed().as_secs(),
        listen: cfg.listen.to_string(),
        export_dir: cfg.export.display().to_string(),
        download_dir: cfg.download_dir.display().to_string(),
        socket: cfg.socket.display().to_string(),
        node_id,
        listeners: d.listeners.list(),
        downloads: d.downloads.visible_to(caller).iter().map(|x| x.info()).collect(),
        damaged_manifests: if caller.unrestricted() { d.downloads.damaged() } else { Vec::new() },
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
                let own = crate::node::NodeIdentity::load_or_create(&t.dir.path().join("state/users/65534"))
                    .expect("the stranger's node identity");
                assert_eq!(s.node_id, own.id.to_string(), "a restricted caller is shown the daemon's node ID");
                assert_eq!(s.listeners.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }
}
