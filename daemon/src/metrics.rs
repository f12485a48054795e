//! Optional Prometheus endpoint (`metrics_listen`): `GET /metrics` in the
//! text exposition format, version 0.0.4.
//!
//! A deliberately tiny HTTP/1 responder: one request per connection, the
//! request head capped at 8 KiB and read with a 5 s timeout, at most 16
//! scrapes served at once. Anything but `GET /metrics` gets a 404.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use mftd_common::control::{DownloadState, ListenerState, SourceState};

use crate::Daemon;

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))
}

pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    let slots = Arc::new(Semaphore::new(16));
    loop {
        let accepted = tokio::select! {
            _ = daemon.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
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

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The whole exposition, from the same data `status` shows.
pub fn render(d: &Daemon) -> String {
    let mut o = String::new();
    family(&mut o, "mftd_uptime_seconds", "gauge", "Seconds since mftd started.");
    let _ = writeln!(o, "mftd_uptime_seconds {}", d.started.elapsed().as_secs());

    let ls = d.listeners.list();
    family(&mut o, "mftd_listener_up", "gauge", "1 if the listener accepts connections, 0 if stopped.");
    for l in &ls {
        let _ = writeln!(o, "mftd_listener_up{{port=\"{}\"}} {}", l.port, u8::from(l.state == ListenerState::Running));
    }
    family(&mut o, "mftd_listener_bytes_sent_total", "counter", "File bytes sent by the listener.");
    for l in &ls {
        let _ = writeln!(o, "mftd_listener_bytes_sent_total{{port=\"{}\"}} {}", l.port, l.bytes_sent);
    }
    family(&mut o, "mftd_listener_connections", "gauge", "Connections open on the listener.");
    for l in &ls {
        let _ = writeln!(o, "mftd_listener_connections{{port=\"{}\"}} {}", l.port, l.connections);
    }
    family(&mut o, "mftd_listener_connections_total", "counter", "Connections accepted by the listener.");
    for l in &ls {
        let _ = writeln!(o, "mftd_listener_connections_total{{port=\"{}\"}} {}", l.port, l.total_connections);
    }
    family(&mut o, "mftd_listener_send_rate_bytes", "gauge", "Bytes per second sent over the last sampling interval.");
    for l in &ls {
        let _ = writeln!(o, "mftd_listener_send_rate_bytes{{port=\"{}\"}} {}", l.port, l.rate);
    }
    family(&mut o, "mftd_listener_rate_limit_bytes", "gauge", "Bandwidth cap in bytes per second (0 = none).");
    for l in &ls {
        let _ = writeln!(o, "mftd_listener_rate_limit_bytes{{port=\"{}\"}} {}", l.port, l.rate_limit);
    }

    let ds: Vec<_> = d.downloads.all().iter().map(|x| x.info(false)).collect();
    family(&mut o, "mftd_download_state", "gauge", "1 for the download's current state.");
    for dl in &ds {
        for (st, name) in [
            (DownloadState::Starting, "starting"),
            (DownloadState::Active, "active"),
            (DownloadState::Waiting, "waiting"),
            (DownloadState::Paused, "paused"),
            (DownloadState::Verifying, "verifying"),
            (DownloadState::Done, "done"),
            (DownloadState::Failed, "failed"),
            (DownloadState::Cancelled, "cancelled"),
        ] {
            let _ =
                writeln!(o, "mftd_download_state{{id=\"{}\",state=\"{name}\"}} {}", dl.id, u8::from(dl.state == st));
        }
    }
    family(&mut o, "mftd_download_size_bytes", "gauge", "Size of the file being downloaded.");
    for dl in &ds {
        if let Some(s) = dl.size {
            let _ = writeln!(o, "mftd_download_size_bytes{{id=\"{}\",path=\"{}\"}} {s}", dl.id, esc(&dl.remote_path));
        }
    }
    family(&mut o, "mftd_download_bytes_done", "gauge", "Bytes of the file on disk.");
    for dl in &ds {
        let _ = writeln!(
            o,
            "mftd_download_bytes_done{{id=\"{}\",path=\"{}\"}} {}",
            dl.id,
            esc(&dl.remote_path),
            dl.bytes_done
        );
    }
    family(&mut o, "mftd_download_speed_bytes", "gauge", "Download speed over the last sampling interval.");
    for dl in &ds {
        let _ = writeln!(o, "mftd_download_speed_bytes{{id=\"{}\"}} {}", dl.id, dl.speed);
    }
    family(&mut o, "mftd_download_source_bytes_received_total", "counter", "Bytes received from a source.");
    for dl in &ds {
        for s in &dl.sources {
            let _ = writeln!(
                o,
                "mftd_download_source_bytes_received_total{{id=\"{}\",source=\"{}\"}} {}",
                dl.id,
                esc(&s.address),
                s.bytes_received
            );
        }
    }
    family(&mut o, "mftd_download_source_speed_bytes", "gauge", "Bytes per second from a source.");
    for dl in &ds {
        for s in &dl.sources {
            let _ = writeln!(
                o,
                "mftd_download_source_speed_bytes{{id=\"{}\",source=\"{}\"}} {}",
                dl.id,
                esc(&s.address),
                s.speed
            );
        }
    }
    family(&mut o, "mftd_download_source_strikes_total", "counter", "Pieces from a source that failed verification.");
    for dl in &ds {
        for s in &dl.sources {
            let _ = writeln!(
                o,
                "mftd_download_source_strikes_total{{id=\"{}\",source=\"{}\"}} {}",
                dl.id,
                esc(&s.address),
                s.strikes
            );
        }
    }
    family(&mut o, "mftd_download_source_up", "gauge", "1 if the source is active for the download.");
    for dl in &ds {
        for s in &dl.sources {
            let _ = writeln!(
                o,
                "mftd_download_source_up{{id=\"{}\",source=\"{}\"}} {}",
                dl.id,
                esc(&s.address),
                u8::from(s.state == SourceState::Active)
            );
        }
    }
    o
}
