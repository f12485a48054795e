//! Live progress of one download, as `get` and `downloads watch` follow
//! it: indicatif rows on a terminal, a plain line per update otherwise,
//! JSON events with `--json`, and the summary left behind at the end. Every
//! name in them is [`Shown`].

use std::io::{IsTerminal, Write};

use mftd_common::control::{DownloadInfo, Event, Failure, Response, Summary};
use mftd_common::human_bytes;

use super::{
    duration, found_share, out, print_event, print_json, rtt, speed, state_name, waiting_notice, FOUND_ON_DISK,
};
use crate::shown::{guarded, Shown};

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

pub(super) fn source_row(s: &mftd_common::control::SourceInfo) -> String {
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
pub(super) fn notice(d: &DownloadInfo) -> Option<String> {
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

pub(super) fn total_line(d: &DownloadInfo) -> String {
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
