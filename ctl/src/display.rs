//! How responses look: tables for people, JSON lines for programs.
//!
//! Every string field a person sees is formatted through [`Shown`], and
//! every line reaches the terminal through [`out`] or [`err`] (the crate's
//! `clippy.toml` forbids `println!` and friends), so nothing a user, a
//! server or a file name chose can drive the terminal: see `shown.rs`.

use std::io::Write;

use mftd_common::control::{to_line, DownloadInfo, Event, ListenerInfo, Response};
use mftd_common::human_bytes;
use mftd_common::rate::format_rate;

use crate::shown::{guarded, Shown};

mod progress;
#[cfg(test)]
mod tests;

pub use progress::ProgressView;

/// Writes human-form text to stdout. A failed write (a closed pipe) is
/// ignored: SIGPIPE already ends mftctl quietly.
pub fn out(text: &str) {
    let _ = std::io::stdout().lock().write_all(guarded(text).as_bytes());
}

/// Writes human-form text to stderr.
pub fn err(text: &str) {
    let _ = std::io::stderr().lock().write_all(guarded(text).as_bytes());
}

/// One JSON line as it is printed: serde_json escapes the C0 controls, `"`
/// and `\`; this also escapes DEL, the C1 controls and the bidirectional
/// controls (as `\u009b`), so that `cat`-ing the output shows them no more
/// than the human form does. Still the same JSON: these characters can only
/// occur inside strings, where `\uXXXX` stands for them exactly.
pub fn json_line(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && crate::shown::escaped(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints a response as one JSON line.
pub fn print_json(r: &Response) {
    let _ = std::io::stdout().lock().write_all(json_line(&to_line(r)).as_bytes());
}

/// Prints one of mftctl's own events as one JSON line.
pub fn print_event(e: &Event) {
    let _ = std::io::stdout().lock().write_all(json_line(&to_line(e)).as_bytes());
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn speed(bps: u64) -> String {
    format!("{}/s", human_bytes(bps))
}

pub fn listeners_table(ls: &[ListenerInfo]) -> String {
    if ls.is_empty() {
        return "no transfer listeners: this mftd serves no files (`mftctl servers add` opens one)\n".into();
    }
    let mut out = format!(
        "{:<6} {:<8} {:<11} {:>5} {:>12} {:>12} {:>12}\n",
        "PORT", "STATE", "TRANSPORT", "CONNS", "SENT", "RATE", "LIMIT"
    );
    for l in ls {
        let state = state_name(&l.state);
        out.push_str(&format!(
            "{:<6} {:<8} {:<11} {:>5} {:>12} {:>12} {:>12}\n",
            l.port,
            state,
            Shown(transport_name(&l.transport)),
            l.connections,
            human_bytes(l.bytes_sent),
            speed(l.rate),
            format_rate(l.rate_limit)
        ));
    }
    out
}

/// `tls`, or `unencrypted` for plain TCP.
pub fn transport_name(t: &str) -> &str {
    match t {
        "plain" => "unencrypted",
        t => t,
    }
}

fn state_name<T: serde::Serialize>(s: &T) -> String {
    mftd_common::control::word(s)
}

/// The header above [`download_line`]s.
pub fn downloads_header() -> String {
    format!(
        "{:>4}  {:<10} {:>7}  {:>10}    {:<10} {:>12}  {}",
        "ID", "STATE", "DONE", "BYTES", "SIZE", "SPEED", "DESTINATION"
    )
}

pub fn download_line(d: &DownloadInfo) -> String {
    let size = d.size.map(human_bytes).unwrap_or_else(|| "?".into());
    format!(
        "{:>4}  {:<10} {:>6.1}%  {:>10} of {:<10} {:>12}  {}",
        d.id,
        state_name(&d.state),
        d.percent(),
        human_bytes(d.bytes_done),
        size,
        speed(d.speed),
        Shown(&d.destination)
    )
}

fn sources_table(d: &DownloadInfo) -> String {
    let mut out = format!(
        "  {:<24} {:<9} {:<11} {:>12} {:>12} {:>7} {:>5} {:>8} {:>7}  {}\n",
        "SOURCE", "STATE", "TRANSPORT", "BYTES", "SPEED", "SHARE", "CONNS", "RTT", "STRIKES", "LAST ERROR"
    );
    for s in &d.sources {
        out.push_str(&format!(
            "  {:<24} {:<9} {:<11} {:>12} {:>12} {:>6.1}% {:>5} {:>8} {:>7}  {}\n",
            Shown(&s.address),
            state_name(&s.state),
            Shown(s.transport.as_deref().map_or("-", transport_name)),
            human_bytes(s.bytes),
            speed(s.speed),
            s.share * 100.0,
            s.connections,
            rtt(s),
            s.strikes,
            crate::shown::shown_or(s.last_error.as_deref(), "")
        ));
    }
    if d.found_on_disk > 0 {
        out.push_str(&format!(
            "  {:<24} {:<9} {:<11} {:>12} {:>12} {:>6.1}%\n",
            FOUND_ON_DISK,
            "-",
            "-",
            human_bytes(d.found_on_disk),
            "-",
            found_share(d) * 100.0
        ));
    }
    out
}

/// The row for bytes no source is credited with.
const FOUND_ON_DISK: &str = "(found on disk)";

fn found_share(d: &DownloadInfo) -> f64 {
    let whole = d.bytes_done.max(d.sources.iter().map(|s| s.bytes).sum());
    if whole > 0 {
        d.found_on_disk as f64 / whole as f64
    } else {
        0.0
    }
}

/// What `get` says when the file is already there.
pub fn identical(destination: &str, identity: &str) -> String {
    format!(
        "{} is already the file the sources serve (blake3:{}); nothing to download",
        Shown(destination),
        Shown(identity)
    )
}

/// Prints a response for a person: on stdout, or on stderr for an error.
pub fn print_human(r: &Response) {
    match r {
        Response::Error { .. } => err(&human(r)),
        _ => out(&human(r)),
    }
}

/// A response as a person reads it, ending with a newline (or empty).
pub fn human(r: &Response) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    // `writeln!` into a String cannot fail.
    macro_rules! say {
        ($($t:tt)*) => {{
            let _ = writeln!(o, $($t)*);
        }};
    }
    match r {
        Response::Ok { message } => say!("{}", Shown(message)),
        Response::Servers { servers } => o.push_str(&listeners_table(servers)),
        Response::Status(s) => {
            say!("mftd {} (pid {}), up {}", Shown(&s.version), s.pid, duration(s.uptime_secs));
            say!("socket     {}", Shown(&s.socket));
            say!("export     {}", Shown(&s.export_dir));
            say!("downloads  {}", Shown(&s.download_dir));
            say!("listen     {}", Shown(&s.listen));
            say!("node ID    {}", Shown(&s.node_id));
            let running =
                s.listeners.iter().filter(|l| l.state == mftd_common::control::ListenerState::Running).count();
            say!("\nlisteners: {running} running, {} stopped", s.listeners.len() - running);
            o.push_str(&listeners_table(&s.listeners));
            for d in &s.damaged_manifests {
                say!("damaged manifest: {}", Shown(d));
            }
            use mftd_common::control::DownloadState;
            let paused = s.downloads.iter().filter(|d| d.state == DownloadState::Paused).count();
            let active = s.downloads.iter().filter(|d| !d.state.is_final() && d.state != DownloadState::Paused).count();
            say!("\ndownloads: {active} active, {paused} paused, {} total", s.downloads.len());
            if !s.downloads.is_empty() {
                say!("{}", downloads_header());
            }
            for d in &s.downloads {
                say!("{}", download_line(d));
            }
        }
        Response::Downloads { downloads } => {
            if downloads.is_empty() {
                say!("no downloads");
            } else {
                say!("{}", downloads_header());
            }
            for d in downloads {
                say!("{}", download_line(d));
            }
        }
        Response::Download { download: d } | Response::Progress { download: d } => {
            say!("{}", download_line(d));
            say!("  remote    {}", Shown(&d.remote_path));
            if let Some(id) = &d.identity {
                say!("  identity  blake3:{}", Shown(id));
            }
            if let Some(v) = &d.vote {
                say!("  vote      {}", Shown(v));
            }
            if let Some(v) = &d.version {
                say!("  version   {}", Shown(v));
            }
            if let Some(w) = waiting_notice(d) {
                for l in w.lines() {
                    say!("  {l}");
                }
            }
            say!("  pieces    {}/{}", d.pieces_verified, d.pieces_total);
            if let Some(e) = &d.error {
                say!("  error     {}", Shown(e));
            }
            o.push_str(&sources_table(d));
            for s in &d.sources {
                if let Some(n) = &s.node_id {
                    say!("  {} is node {}", Shown(&s.address), Shown(n));
                }
            }
            for s in &d.sources {
                if let Some(e) = &s.recovered_from {
                    say!("  {} recovered from: {}", Shown(&s.address), Shown(e));
                }
            }
        }
        Response::Accepted { id, destination, resumed, added_sources } => {
            let how = if *resumed { "continued" } else { "accepted" };
            say!("download {id} {how}: {}", Shown(destination));
            if !added_sources.is_empty() {
                say!("added sources: {}", shown_list(added_sources));
            }
        }
        Response::Identical { destination, identity } => say!("{}", identical(destination, identity)),
        Response::Resumed { ids } if ids.is_empty() => say!("nothing to resume"),
        Response::Resumed { ids } => {
            let list: Vec<String> = ids.iter().map(u64::to_string).collect();
            say!("resumed download{} {}", if ids.len() == 1 { "" } else { "s" }, list.join(", "))
        }
        Response::Hello { daemon, .. } => say!("{}", Shown(daemon)),
        Response::Error { message, .. } => say!("{}", Shown(message)),
    }
    o
}

/// What mftctl says when a command fails: the daemon's sentence may quote
/// a path or a server's words.
pub fn failure(message: &str) -> String {
    format!("mftctl: {}\n", Shown(message))
}

/// What `get` says when the daemon accepted a download it will follow.
pub fn started(id: u64, resumed: bool, remote_path: &str, destination: &str, added: &[String]) -> String {
    let how = if resumed { "continuing download" } else { "download" };
    let mut o = format!("{how} {id}: {} -> {}\n", Shown(remote_path), Shown(destination));
    if !added.is_empty() {
        o.push_str(&format!("added to download {id}: {}\n", shown_list(added)));
    }
    o
}

/// Names, each shown, separated by commas.
pub fn shown_list(names: &[String]) -> String {
    names.iter().map(|n| Shown(n).to_string()).collect::<Vec<_>>().join(", ")
}

/// While no source has answered: the daemon's sentence, then one line per
/// source with its last answer.
pub fn waiting_notice(d: &DownloadInfo) -> Option<String> {
    let w = d.waiting.as_ref()?;
    let mut out = format!("{}\n", Shown(w));
    for s in &d.sources {
        let last = crate::shown::shown_or(s.last_error.as_deref(), "no answer yet");
        out.push_str(&format!("  {}: {last}\n", Shown(&s.address)));
    }
    Some(out)
}

/// A source's measured round-trip time, or `-` before it is known.
fn rtt(s: &mftd_common::control::SourceInfo) -> String {
    match s.rtt_ms {
        Some(ms) if ms >= 10.0 => format!("{ms:.0} ms"),
        Some(ms) => format!("{ms:.1} ms"),
        None => "-".into(),
    }
}
