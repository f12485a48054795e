//! A daemon built in-process for unit tests of the handlers and the
//! engine: the real [`Daemon`] with real listeners on loopback, real files
//! in a temp dir, and no control socket (tests call the handlers directly;
//! the end-to-end tests in `tests/` drive the real binaries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mftd_common::control::{DownloadInfo, DownloadState, GetRequest, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::caller::Caller;
use crate::config::{Args, Config, FileConfig};
use crate::control::handlers::{handle, Reply};
use crate::daemon::Daemon;

pub struct TestDaemon {
    pub daemon: Arc<Daemon>,
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
    /// A daemon with `listeners` TLS listeners (the default transport) on free loopback ports.
    pub async fn start(listeners: usize) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["export", "state", "downloads"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let sockets: Vec<tokio::net::TcpListener> = (0..listeners)
            .map(|_| crate::listener::bind("127.0.0.1:0".parse().expect("addr")).expect("bind a loopback port"))
            .collect();
        let ports: Vec<u16> = sockets.iter().map(|s| s.local_addr().expect("local addr").port()).collect();
        let p = |sub: &str| dir.path().join(sub).display().to_string();
        let mut argv = vec![
            "mftd".to_string(),
            format!("--export={}", p("export")),
            format!("--state-dir={}", p("state")),
            format!("--download-dir={}", p("downloads")),
            format!("--socket={}", p("control.sock")),
            "--listen=127.0.0.1".to_string(),
        ];
        if ports.is_empty() {
            argv.push("--servers=0".to_string());
        } else {
            argv.push(format!("--ports={}", ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")));
        }
        let args = Args::try_parse_from(&argv).expect("test flags parse");
        let config = Config::merge(&args, FileConfig::default(), None).expect("test config");
        let transfer = ports.iter().copied().zip(sockets).collect();
        let ground = crate::daemon::ground(&config).expect("state, export and identity open");
        let daemon = Daemon::start(config, ground, transfer, CancellationToken::new()).expect("daemon starts");
        TestDaemon { daemon, dir }
    }

    /// Writes an export file of `len` pseudo-random bytes and returns them.
    pub fn export(&self, name: &str, len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ len as u64;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(self.dir.path().join("export").join(name), &data).expect("write export file");
        data
    }

    /// A download of a new `len`-byte export file held slow by a 256 KiB/s
    /// limit on the first listener, once it is active: its ID and the bytes.
    pub async fn slow_download(&self, len: usize) -> (u64, Vec<u8>) {
        let data = self.export("slow.bin", len);
        let port = self.ports()[0];
        self.daemon.listeners.set_limit(port, 256 << 10).expect("limit the listener");
        let g = GetRequest {
            remote_path: "slow.bin".into(),
            sources: vec![format!("127.0.0.1:{port}")],
            ..Default::default()
        };
        match self.answer(Request::Get(g)).await {
            Response::Accepted { id, .. } => {
                self.wait_for(id, DownloadState::Active, Duration::from_secs(10)).await;
                (id, data)
            }
            other => panic!("{other:?}"),
        }
    }

    /// The running listeners' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.daemon.listeners.ports()
    }

    /// The daemon's download directory.
    pub fn downloads_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("downloads")
    }

    /// Asks as the operator (the daemon's own user).
    pub async fn ask(&self, req: Request) -> Reply {
        self.ask_as(Caller::daemon(), req).await
    }

    /// Asks as `caller`, off the runtime as the control socket does.
    pub async fn ask_as(&self, caller: Caller, req: Request) -> Reply {
        let d = self.daemon.clone();
        tokio::task::spawn_blocking(move || handle(&d, &caller, req)).await.expect("handler panicked")
    }

    /// The answer to a request that gets one response.
    pub async fn answer(&self, req: Request) -> Response {
        match self.ask(req).await {
            Reply::One(r) => r,
            other => panic!("expected one response, got {other:?}"),
        }
    }

    /// Someone in no special group: neither root nor the daemon's user.
    pub fn stranger() -> Caller {
        Caller { uid: 65534, gid: 65534, groups: vec![], pid: 0 }
    }

    /// Download `id` as `downloads show` gives it.
    pub fn info(&self, id: u64) -> DownloadInfo {
        self.daemon.downloads.get(id).unwrap_or_else(|| panic!("no download {id}")).info()
    }

    /// Waits (at most `within`) until download `id` is in `state`.
    pub async fn wait_for(&self, id: u64, state: DownloadState, within: Duration) -> DownloadInfo {
        let deadline = Instant::now() + within;
        loop {
            let info = self.info(id);
            if info.state == state {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "download {id} is {:?}, not {state:?}, after {within:?}: {info:?}",
                info.state
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.daemon.shutdown.cancel();
    }
}

/// The message of an `ok` reply; panics on anything else.
pub fn ok_message(reply: Reply) -> String {
    match reply {
        Reply::One(Response::Ok { message }) => message,
        other => panic!("expected ok, got {other:?}"),
    }
}
