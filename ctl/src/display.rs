//! How responses look: tables for people, JSON lines for programs.

use std::io::{IsTerminal, Write};

use mftd_common::control::{to_line, DownloadInfo, Event, Failure, ListenerInfo, Response, Summary};
use mftd_common::human_bytes;
use mftd_common::rate::format_rate;

/// Prints a response as one JSON line.
pub fn print_json(r: &Response) {
    print!("{}", String::from_utf8_lossy(&to_line(r)));
}

/// Prints one of mftctl's own events as one JSON line.
pub fn print_event(e: &Event) {
    print!("{}", String::from_utf8_lossy(&to_line(e)));
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
            transport_name(&l.transport),
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
        d.destination
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
            s.address,
            state_name(&s.state),
            s.transport.as_deref().map_or("-", transport_name),
            human_bytes(s.bytes),
            speed(s.speed),
            s.share * 100.0,
            s.connections,
            rtt(s),
            s.strikes,
            s.last_error.as_deref().unwrap_or("")
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
    format!("{destination} is already the file the sources serve (blake3:{identity}); nothing to download")
}

pub fn print_human(r: &Response) {
    match r {
        Response::Ok { message } => println!("{message}"),
        Response::Servers { servers } => print!("{}", listeners_table(servers)),
        Response::Status(s) => {
            println!("mftd {} (pid {}), up {}", s.version, s.pid, duration(s.uptime_secs));
            println!("socket     {}", s.socket);
            println!("export     {}", s.export_dir);
            println!("downloads  {}", s.download_dir);
            println!("listen     {}", s.listen);
            println!("node ID    {}", s.node_id);
            let running =
                s.listeners.iter().filter(|l| l.state == mftd_common::control::ListenerState::Running).count();
            println!("\nlisteners: {running} running, {} stopped", s.listeners.len() - running);
            print!("{}", listeners_table(&s.listeners));
            for d in &s.damaged_manifests {
                println!("damaged manifest: {d}");
            }
            use mftd_common::control::DownloadState;
            let paused = s.downloads.iter().filter(|d| d.state == DownloadState::Paused).count();
            let active = s.downloads.iter().filter(|d| !d.state.is_final() && d.state != DownloadState::Paused).count();
            println!("\ndownloads: {active} active, {paused} paused, {} total", s.downloads.len());
            if !s.downloads.is_empty() {
                println!("{}", downloads_header());
            }
            for d in &s.downloads {
                println!("{}", download_line(d));
            }
        }
        Response::Downloads { downloads } => {
            if downloads.is_empty() {
                println!("no downloads");
            } else {
                println!("{}", downloads_header());
            }
            for d in downloads {
                println!("{}", download_line(d));
            }
        }
        Response::Download { download: d } | Response::Progress { download: d } => {
            println!("{}", download_line(d));
            println!("  remote    {}", d.remote_path);
            if let Some(id) = &d.identity {
                println!("  identity  blake3:{id}");
            }
            if let Some(v) = &d.vote {
                println!("  vote      {v}");
            }
            if let Some(v) = &d.version {
                println!("  version   {v}");
            }
            if let Some(w) = waiting_notice(d) {
                for line in w.lines() {
                    println!("  {line}");
                }
            }
            println!("  pieces    {}/{}", d.pieces_verified, d.pieces_total);
            if let Some(e) = &d.error {
                println!("  error     {e}");
            }
            print!("{}", sources_table(d));
            for s in d.sources.iter().filter(|s| s.node_id.is_some()) {
                println!("  {} is node {}", s.address, s.node_id.as_deref().unwrap_or(""));
            }
            for s in &d.sources {
                if let Some(e) = &s.recovered_from {
                    println!("  {} recovered from: {e}", s.address);
                }
            }
        }
        Response::Accepted { id, destination, resumed, added_sources } => {
            let how = if *resumed { "continued" } else { "accepted" };
            println!("download {id} {how}: {destination}");
            if !added_sources.is_empty() {
                println!("added sources: {}", added_sources.join(", "));
            }
        }
        Response::Identical { destination, identity } => println!("{}", identical(destination, identity)),
        Response::Resumed { ids } if ids.is_empty() => println!("nothing to resume"),
        Response::Resumed { ids } => {
            let list: Vec<String> = ids.iter().map(u64::to_string).collect();
            println!("resumed download{} {}", if ids.len() == 1 { "" } else { "s" }, list.join(", "))
        }
        Response::Hello { daemon, .. } => println!("{daemon}"),
        Response::Error { message, .. } => eprintln!("{message}"),
    }
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
        s.address,
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
    let mut out = format!("{w}\n");
    for s in &d.sources {
        let last = s.last_error.as_deref().unwrap_or("no answer yet");
        out.push_str(&format!("  {}: {last}\n", s.address));
    }
    Some(out)
}

/// Why a source that is not working is not, from its last error.
fn why_not(s: &mftd_common::control::SourceInfo) -> String {
    use mftd_common::control::SourceState;
    match (&s.state, &s.last_error) {
        (SourceState::Waiting | SourceState::Failed | SourceState::Excluded, Some(e)) => format!(" ({e})"),
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
            row.set_message(source_row(s));
        }
        if let Some(t) = &self.total {
            t.set_length(d.size.unwrap_or(0).max(1));
            t.set_position(d.bytes_done);
            t.set_message(total_line(d));
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
            let per: Vec<String> = d
                .sources
                .iter()
                .map(|s| {
                    format!(
                        "{} {} {} {} {} {}{}{}",
                        s.address,
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
            println!("{} | {}", total_line(d), per.join(" | "));
        }
        let _ = std::io::stdout().flush();
    }

    /// Prints what the download waits for, or how its version was
    /// decided, when that changes: above the live rows on a terminal.
    fn notices(&mut self, d: &DownloadInfo) {
        let notice = waiting_notice(d).or_else(|| d.version.as_ref().map(|v| format!("{v}\n")));
        if notice.is_none() || notice == self.notice {
            return;
        }
        self.notice = notice.clone();
        let text = notice.unwrap_or_default();
        match &self.multi {
            Some(m) => {
                let _ = m.println(text.trim_end());
            }
            None => print!("{text}"),
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
        let secs = d.elapsed_ms as f64 / 1000.0;
        let size = d.size.unwrap_or(0);
        if self.json {
            let summary = Summary::of(d);
            print_event(&match d.state {
                mftd_common::control::DownloadState::Done => Event::Done(summary),
                _ => Event::Error(Failure::Download(summary)),
            });
            return;
        }
        self.clear();
        match d.state {
            mftd_common::control::DownloadState::Done => {
                println!(
                    "downloaded {} ({}) in {:.2}s, {}",
                    d.destination,
                    human_bytes(size),
                    secs,
                    speed((size as f64 / secs.max(1e-3)) as u64)
                );
            }
            _ => println!("download {} {}: {}", d.id, state_name(&d.state), d.error.as_deref().unwrap_or("")),
        }
        println!("  {:<24} {:>12} {:>7} {:>12}", "SOURCE", "BYTES", "SHARE", "AVG SPEED");
        for s in &d.sources {
            println!(
                "  {:<24} {:>12} {:>6.1}% {:>12}",
                s.address,
                human_bytes(s.bytes),
                s.share * 100.0,
                speed((s.bytes as f64 / secs.max(1e-3)) as u64)
            );
        }
        if d.found_on_disk > 0 {
            println!(
                "  {:<24} {:>12} {:>6.1}% {:>12}",
                FOUND_ON_DISK,
                human_bytes(d.found_on_disk),
                found_share(d) * 100.0,
                "-"
            );
        }
        if let Some(id) = &d.identity {
            if d.state == mftd_common::control::DownloadState::Done {
                println!("  verified blake3:{id}");
            }
        }
        let _ = std::io::stdout().flush();
    }
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
