//! How responses look: tables for people, JSON lines for programs.
//!
//! Every string field a person sees is formatted through [`Shown`], and
//! every line reaches the terminal through [`out`] or [`err`] (the crate's
//! `clippy.toml` forbids `println!` and friends), so nothing a user, a
//! server or a file name chose can drive the terminal: see `shown.rs`.

use std::io::{IsTerminal, Write};

use mftd_common::control::{to_line, DownloadInfo, Event, Failure, ListenerInfo, Response, Summary};
use mftd_common::human_bytes;
use mftd_common::rate::format_rate;

use crate::shown::{guarded, Shown};

#[cfg(test)]
mod tests;

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

/// Live progress of one download: an indicatif display on a terminal (one
/// row per source plus a total bar), one plain line per update otherwise,
/// and JSON events with `--json`: `progress` snapshots, `source_state` when a
/// source changes state, and a final `done` or `error`.
pub struct ProgressView {
    json: bool,
    tty: bool,
    multi: Option<indicatif::MultiProgress>,
    rows: Vec<indicatif::ProgressBar>,
    total: Option<indicatif::ProgressBar>,
    /// Last state seen per source, to report changes.
    states: Vec<(String, String)>,
    /// The last notice printed (what the download waits for, how its
    /// version was decided), so each is printed once.
    notice: Option<String>,
}

fn source_row(s: &mftd_common::control::SourceInfo) -> String {
    format!(
        "{:<24} {:<9} {:>10} {:>12} {:>6.1}% {:>5} {:>8}",
        Shown(&s.address),
        state_name(&s.state),
        human_bytes(s.bytes),
        speed(s.speed),
        s.share * 100.0,
        conns(s),
        rtt(s)
    ) + unencrypted(s)
        + &why_not(s)
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

/// Why a source that is not working is not, from its last error.
fn why_not(s: &mftd_common::control::SourceInfo) -> String {
    use mftd_common::control::SourceState;
    match (&s.state, &s.last_error) {
        (SourceState::Waiting | SourceState::Failed | SourceState::Excluded, Some(e)) => format!(" ({})", Shown(e)),
        _ => String::new(),
    }
}

/// A warning mark for a source reached over plain TCP.
fn unencrypted(s: &mftd_common::control::SourceInfo) -> &'static str {
    if s.transport.as_deref() == Some("plain") {
        " unencrypted"
    } else {
        ""
    }
}

/// Open connections to a source, as `3 conn`.
fn conns(s: &mftd_common::control::SourceInfo) -> String {
    format!("{}c", s.connections)
}

/// A source's measured round-trip time, or `-` before it is known.
fn rtt(s: &mftd_common::control::SourceInfo) -> String {
    match s.rtt_ms {
        Some(ms) if ms >= 10.0 => format!("{ms:.0} ms"),
        Some(ms) => format!("{ms:.1} ms"),
        None => "-".into(),
    }
}

impl ProgressView {
    pub fn new(json: bool) -> ProgressView {
        ProgressView {
            json,
            tty: std::io::stdout().is_terminal(),
            multi: None,
            rows: Vec::new(),
            total: None,
            states: Vec::new(),
            notice: None,
        }
    }

    pub fn clear(&mut self) {
        for r in self.rows.drain(..) {
            r.finish_and_clear();
        }
        if let Some(t) = self.total.take() {
            t.finish_and_clear();
        }
        if let Some(m) = self.multi.take() {
            let _ = m.clear();
        }
    }

    fn json_events(&mut self, d: &DownloadInfo) {
        for (i, s) in d.sources.iter().enumerate() {
            let st = state_name(&s.state);
            let changed = match self.states.get(i) {
                Some((addr, old)) => addr != &s.address || old != &st,
                None => true,
            };
            if changed {
                print_event(&Event::SourceState {
                    id: d.id,
                    address: s.address.clone(),
                    state: s.state,
                    last_error: s.last_error.clone(),
                });
            }
        }
        self.states = d.sources.iter().map(|s| (s.address.clone(), state_name(&s.state))).collect();
        print_json(&Response::Progress { download: d.clone() });
    }

    fn draw_tty(&mut self, d: &DownloadInfo) {
        use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
        if self.multi.is_none() {
            let m = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10));
            let row_style = ProgressStyle::with_template("  {msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
            for _ in &d.sources {
                let b = m.add(ProgressBar::new(0));
                b.set_style(row_style.clone());
                self.rows.push(b);
            }
            let t = m.add(ProgressBar::new(d.size.unwrap_or(0)));
            t.set_style(
                ProgressStyle::with_template("  total [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            self.total = Some(t);
            self.multi = Some(m);
        }
        for (row, s) in self.rows.iter().zip(&d.sources) {
            row.set_message(guarded(&source_row(s)).into_owned());
        }
        if let Some(t) = &self.total {
            t.set_length(d.size.unwrap_or(0).max(1));
            t.set_position(d.bytes_done);
            t.set_message(guarded(&total_line(d)).into_owned());
        }
    }

    pub fn update(&mut self, d: &DownloadInfo) {
        if self.json {
            self.json_events(d);
            return;
        }
        if d.state.is_final() {
            return;
        }
        self.notices(d);
        if self.tty {
            self.draw_tty(d);
        } else {
            out(&progress_line(d));
        }
        let _ = std::io::stdout().flush();
    }

    /// Prints what the download waits for, or how its version was
    /// decided, when that changes: above the live rows on a terminal.
    fn notices(&mut self, d: &DownloadInfo) {
        let notice = notice(d);
        if notice.is_none() || notice == self.notice {
            return;
        }
        self.notice = notice.clone();
        let text = notice.unwrap_or_default();
        match &self.multi {
            Some(m) => {
                let _ = m.println(guarded(text.trim_end()));
            }
            None => out(&text),
        }
    }

    /// The stream ends without a result (`paused` elsewhere, `detached`
    /// by Ctrl-C): with `--json`, a last event that says so, so every
    /// stream ends with a terminal event.
    pub fn stopped(&mut self, event: &Event) {
        if self.json {
            print_event(event);
            let _ = std::io::stdout().flush();
        }
    }

    pub fn finish(&mut self, d: &DownloadInfo) {
        if self.json {
            let summary = Summary::of(d);
            print_event(&match d.state {
                mftd_common::control::DownloadState::Done => Event::Done(summary),
                _ => Event::Error(Failure::Download(summary)),
            });
            return;
        }
        self.clear();
        out(&summary(d));
        let _ = std::io::stdout().flush();
    }
}

/// What the download waits for, or how its version was decided.
fn notice(d: &DownloadInfo) -> Option<String> {
    waiting_notice(d).or_else(|| d.version.as_ref().map(|v| format!("{}\n", Shown(v))))
}

/// One update of a download's progress when stdout is not a terminal.
pub fn progress_line(d: &DownloadInfo) -> String {
    let per: Vec<String> = d
        .sources
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {} {} {}{}{}",
                Shown(&s.address),
                state_name(&s.state),
                human_bytes(s.bytes),
                speed(s.speed),
                conns(s),
                rtt(s),
                unencrypted(s),
                why_not(s)
            )
        })
        .collect();
    format!("{} | {}\n", total_line(d), per.join(" | "))
}

/// What `get` leaves behind when a download ends: the result and where
/// the bytes came from.
pub fn summary(d: &DownloadInfo) -> String {
    use std::fmt::Write as _;
    let secs = d.elapsed_ms as f64 / 1000.0;
    let size = d.size.unwrap_or(0);
    let mut o = match d.state {
        mftd_common::control::DownloadState::Done => format!(
            "downloaded {} ({}) in {:.2}s, {}\n",
            Shown(&d.destination),
            human_bytes(size),
            secs,
            speed((size as f64 / secs.max(1e-3)) as u64)
        ),
        _ => {
            format!("download {} {}: {}\n", d.id, state_name(&d.state), crate::shown::shown_or(d.error.as_deref(), ""))
        }
    };
    // `writeln!` into a String cannot fail.
    let _ = writeln!(o, "  {:<24} {:>12} {:>7} {:>12}", "SOURCE", "BYTES", "SHARE", "AVG SPEED");
    for s in &d.sources {
        let _ = writeln!(
            o,
            "  {:<24} {:>12} {:>6.1}% {:>12}",
            Shown(&s.address),
            human_bytes(s.bytes),
            s.share * 100.0,
            speed((s.bytes as f64 / secs.max(1e-3)) as u64)
        );
    }
    if d.found_on_disk > 0 {
        let _ = writeln!(
            o,
            "  {:<24} {:>12} {:>6.1}% {:>12}",
            FOUND_ON_DISK,
            human_bytes(d.found_on_disk),
            found_share(d) * 100.0,
            "-"
        );
    }
    if let Some(id) = &d.identity {
        if d.state == mftd_common::control::DownloadState::Done {
            let _ = writeln!(o, "  verified blake3:{}", Shown(id));
        }
    }
    o
}

fn total_line(d: &DownloadInfo) -> String {
    let eta = d.eta_secs.map(duration).unwrap_or_else(|| "-".into());
    format!(
        "[{}] {:>5.1}%  {} / {}  {}  eta {}",
        state_name(&d.state),
        d.percent(),
        human_bytes(d.bytes_done),
        d.size.map(human_bytes).unwrap_or_else(|| "?".into()),
        speed(d.speed),
        eta
    )
}
