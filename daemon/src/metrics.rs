//! Optional Prometheus endpoint (`metrics_listen`): `GET /metrics` in the
//! text exposition format, version 0.0.4.
//!
//! A deliberately tiny HTTP/1 responder: one request per connection, the
//! request head capped at 8 KiB and read with a 5 s timeout, at most 16
//! scrapes served at once. Anything but `GET /metrics` gets a 404.
//!
//! The endpoint has no authentication: whoever can connect to its address
//! reads it, which on a shared machine is every local user. So by default
//! ([`MetricsLabels::None`]) a download's series carry its ID (and state)
//! and a source's its position in the download, never a path, file name or
//! source address that one user's download would tell all the others;
//! `metrics_labels = "full"` adds them for an operator who wants them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use mftd_common::control::{word, DownloadInfo, DownloadState, ListenerInfo, ListenerState, SourceInfo, SourceState};

use crate::daemon::Daemon;

/// Which labels the per-download and per-source series carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsLabels {
    /// `id` (and `state`) per download, `id` and `source_index` per source.
    #[default]
    None,
    /// Also the remote `path` of a download and the `source` address.
    Full,
}

impl std::str::FromStr for MetricsLabels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(MetricsLabels::None),
            "full" => Ok(MetricsLabels::Full),
            _ => Err(format!("{s:?}: metrics_labels is one of none, full")),
        }
    }
}

impl std::fmt::Display for MetricsLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricsLabels::None => "none",
            MetricsLabels::Full => "full",
        })
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))
}

pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    let slots = Arc::new(Semaphore::new(16));
    let mut backoff = crate::accept::AcceptBackoff::new("metrics endpoint");
    loop {
        let accepted = tokio::select! {
            _ = daemon.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff.ok();
                s
            }
            Err(e) if backoff.failed(&e, &daemon.shutdown).await => continue,
            Err(_) => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let d = daemon.clone();
        daemon.tracker.spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), answer(stream, &d)).await {
                warn!(error = %e, "metrics request timed out");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, d: &Daemon) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > 8192 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let first = line.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(d))
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "only /metrics is served here\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// Escapes a label value: backslash, double quote and newline.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One metric family: its HELP and TYPE lines, then one sample per row of
/// (labels, value); labels are preformatted (`port="5001"`), empty for none.
fn series(o: &mut String, name: &str, kind: &str, help: &str, rows: impl IntoIterator<Item = (String, u64)>) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in rows {
        if labels.is_empty() {
            let _ = writeln!(o, "{name} {value}");
        } else {
            let _ = writeln!(o, "{name}{{{labels}}} {value}");
        }
    }
}

/// The whole exposition, from the same data `status` shows.
pub fn render(d: &Daemon) -> String {
    let mut o = String::new();
    series(
        &mut o,
        "mftd_uptime_seconds",
        "gauge",
        "Seconds since mftd started.",
        [(String::new(), d.started.elapsed().as_secs())],
    );

    listeners(&mut o, &d.listeners.list());
    let ds: Vec<DownloadInfo> = d.downloads.all().iter().map(|x| x.info()).collect();
    downloads(&mut o, &ds, d.config().metrics_labels);
    o
}

/// Per listener: up, bytes and connections, rate and cap.
fn listeners(o: &mut String, ls: &[ListenerInfo]) {
    let per_listener = |o: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&ListenerInfo) -> u64| {
        series(o, name, kind, help, ls.iter().map(|l| (format!("port=\"{}\"", l.port), value(l))));
    };
    per_listener(o, "mftd_listener_up", "gauge", "1 if the listener accepts connections, 0 if stopped.", &|l| {
        u64::from(l.state == ListenerState::Running)
    });
    per_listener(o, "mftd_listener_bytes_sent_total", "counter", "File bytes sent by the listener.", &|l| l.bytes_sent);
    per_listener(o, "mftd_listener_connections", "gauge", "Connections open on the listener.", &|l| l.connections);
    per_listener(o, "mftd_listener_connections_total", "counter", "Connections accepted by the listener.", &|l| {
        l.total_connections
    });
    per_listener(
        o,
        "mftd_listener_send_rate_bytes",
        "gauge",
        "Bytes per second sent over the last sampling interval.",
        &|l| l.rate,
    );
    per_listener(o, "mftd_listener_rate_limit_bytes", "gauge", "Bandwidth cap in bytes per second (0 = none).", &|l| {
        l.rate_limit
    });
}

/// Per download: state, size, progress and speed; per source of each: bytes,
/// speed, strikes and whether it is active. The path and source labels only
/// with [`MetricsLabels::Full`].
fn downloads(o: &mut String, ds: &[DownloadInfo], labels: MetricsLabels) {
    const STATES: [DownloadState; 8] = [
        DownloadState::Starting,
        DownloadState::Active,
        DownloadState::Waiting,
        DownloadState::Paused,
        DownloadState::Verifying,
        DownloadState::Done,
        DownloadState::Failed,
        DownloadState::Cancelled,
    ];
    series(
        o,
        "mftd_download_state",
        "gauge",
        "1 for the download's current state.",
        ds.iter().flat_map(|dl| {
            STATES
                .iter()
                .map(move |st| (format!("id=\"{}\",state=\"{}\"", dl.id, word(st)), u64::from(dl.state == *st)))
        }),
    );
    let id_path = |dl: &DownloadInfo| match labels {
        MetricsLabels::Full => format!("id=\"{}\",path=\"{}\"", dl.id, esc(&dl.remote_path)),
        MetricsLabels::None => format!("id=\"{}\"", dl.id),
    };
    series(
        o,
        "mftd_download_size_bytes",
        "gauge",
        "Size of the file being downloaded.",
        ds.iter().filter_map(|dl| dl.size.map(|s| (id_path(dl), s))),
    );
    series(
        o,
        "mftd_download_bytes_done",
        "gauge",
        "Bytes of the file on disk.",
        ds.iter().map(|dl| (id_path(dl), dl.bytes_done)),
    );
    series(
        o,
        "mftd_download_speed_bytes",
        "gauge",
        "Download speed over the last sampling interval.",
        ds.iter().map(|dl| (format!("id=\"{}\"", dl.id), dl.speed)),
    );
    let per_source = |o: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&SourceInfo) -> u64| {
        series(
            o,
            name,
            kind,
            help,
            ds.iter().flat_map(|dl| {
                dl.sources.iter().enumerate().map(move |(i, s)| {
                    let source = match labels {
                        MetricsLabels::Full => format!("source=\"{}\"", esc(&s.address)),
                        MetricsLabels::None => format!("source_index=\"{i}\""),
                    };
                    (format!("id=\"{}\",{source}", dl.id), value(s))
                })
            }),
        );
    };
    per_source(o, "mftd_download_source_bytes_received_total", "counter", "Bytes received from a source.", &|s| {
        s.bytes_received
    });
    per_source(o, "mftd_download_source_speed_bytes", "gauge", "Bytes per second from a source.", &|s| s.speed);
    per_source(
        o,
        "mftd_download_source_strikes_total",
        "counter",
        "Pieces from a source that failed verification.",
        &|s| u64::from(s.strikes),
    );
    per_source(o, "mftd_download_source_up", "gauge", "1 if the source is active for the download.", &|s| {
        u64::from(s.state == SourceState::Active)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn download() -> DownloadInfo {
        let source = SourceInfo {
            address: "files.example:5001".into(),
            state: SourceState::Active,
            bytes: 10,
            bytes_received: 10,
            speed: 1,
            share: 1.0,
            ranges_done: 1,
            strikes: 0,
            connections: 1,
            rtt_ms: None,
            transport: None,
            node_id: None,
            last_error: None,
            recovered_from: None,
        };
        DownloadInfo {
            id: 3,
            remote_path: "hr/layoffs-2027.xlsx".into(),
            destination: "/home/alice/secret/layoffs-2027.xlsx".into(),
            state: DownloadState::Active,
            size: Some(100),
            bytes_done: 10,
            pieces_verified: 0,
            pieces_total: 1,
            speed: 1,
            eta_secs: None,
            elapsed_ms: 1,
            sources: vec![source],
            found_on_disk: 0,
            identity: None,
            vote: None,
            version: None,
            waiting: None,
            error: None,
        }
    }

    #[test]
    fn downloads_are_named_only_when_asked() {
        let mut quiet = String::new();
        downloads(&mut quiet, &[download()], MetricsLabels::None);
        for word in ["layoffs", "hr/", "alice", "files.example"] {
            assert!(!quiet.contains(word), "{word} in:\n{quiet}");
        }
        assert!(quiet.contains("mftd_download_bytes_done{id=\"3\"} 10"), "{quiet}");
        assert!(quiet.contains("mftd_download_source_up{id=\"3\",source_index=\"0\"} 1"), "{quiet}");
        let mut full = String::new();
        downloads(&mut full, &[download()], MetricsLabels::Full);
        assert!(full.contains("mftd_download_bytes_done{id=\"3\",path=\"hr/layoffs-2027.xlsx\"} 10"), "{full}");
        assert!(full.contains("mftd_download_source_up{id=\"3\",source=\"files.example:5001\"} 1"), "{full}");
        // Where the file goes is not a label in either.
        assert!(!full.contains("alice"), "{full}");
    }
}
