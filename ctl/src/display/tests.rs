//! Every response mftctl renders for a person, built with a hostile string
//! in every string field: nothing that acts on a terminal may come out,
//! and no field may add a line. The structs are written out field by field
//! (no `..Default::default()`), so a field added to the protocol does not
//! compile here until it is given a hostile value too.

use mftd_common::control::{
    DownloadInfo, DownloadState, ErrorCode, ListenerInfo, ListenerState, Response, SourceInfo, SourceState, StatusInfo,
};

use super::progress::{notice, progress_line, source_row, summary, total_line};
use super::*;
use crate::shown::acts_on_terminal;

/// A field's text: harmless, or everything a terminal obeys (ESC sequences
/// that clear the screen, colour and retitle it, BEL, a line feed that
/// would fake a line, CR, tab, backspace, DEL, CSI as a C1 byte, a bidi
/// override) and a backslash that spells an escape.
type Text = fn(&str) -> String;

fn benign(tag: &str) -> String {
    tag.to_string()
}

fn hostile(tag: &str) -> String {
    format!("{tag}\x1b[2J\x1b[31mFAKE\x1b]0;owned\x07\nFAKE LINE\r\t\x08\x7f\u{9b}2J\u{202e}gpj.exe\u{2066}\\e[0m")
}

fn source(t: Text, n: usize, state: SourceState) -> SourceInfo {
    SourceInfo {
        address: t(&format!("source{n}")),
        state,
        bytes: 1 << 20,
        bytes_received: 2 << 20,
        speed: 1000,
        share: 0.25,
        ranges_done: 3,
        strikes: 1,
        connections: 2,
        rtt_ms: Some(1.5),
        transport: Some(t("transport")),
        node_id: Some(t("node_id")),
        last_error: Some(t("last_error")),
        recovered_from: Some(t("recovered_from")),
    }
}

fn download(t: Text, state: DownloadState) -> DownloadInfo {
    DownloadInfo {
        id: 7,
        remote_path: t("remote_path"),
        destination: t("destination"),
        state,
        size: Some(4 << 20),
        bytes_done: 2 << 20,
        pieces_verified: 8,
        pieces_total: 16,
        speed: 1 << 20,
        eta_secs: Some(2),
        elapsed_ms: 2000,
        sources: [SourceState::Active, SourceState::Waiting, SourceState::Failed, SourceState::Excluded]
            .into_iter()
            .enumerate()
            .map(|(n, st)| source(t, n, st))
            .collect(),
        found_on_disk: 1 << 20,
        identity: Some(t("identity")),
        vote: Some(t("vote")),
        version: Some(t("version")),
        waiting: Some(t("waiting")),
        error: Some(t("error")),
    }
}

fn listener(t: Text, port: u16) -> ListenerInfo {
    ListenerInfo {
        port,
        address: t("listener_address"),
        state: ListenerState::Running,
        connections: 1,
        total_connections: 2,
        bytes_sent: 3,
        rate: 4,
        rate_limit: 5,
        transport: t("listener_transport"),
    }
}

/// Every response the daemon sends, each variant once.
fn responses(t: Text) -> Vec<Response> {
    let d = download(t, DownloadState::Active);
    vec![
        Response::Hello { protocol: 1, daemon: t("daemon"), pid: 1 },
        Response::Ok { message: t("ok_message") },
        Response::Error { code: ErrorCode::BadPath, message: t("error_message") },
        Response::Status(StatusInfo {
            version: t("version"),
            pid: 1,
            uptime_secs: 5,
            listen: t("listen"),
            export_dir: t("export_dir"),
            download_dir: t("download_dir"),
            socket: t("socket"),
            node_id: t("node_id"),
            listeners: vec![listener(t, 5001), listener(t, 5002)],
            downloads: vec![d.clone(), download(t, DownloadState::Paused)],
            damaged_manifests: vec![t("damaged_manifest")],
        }),
        Response::Servers { servers: vec![listener(t, 5001)] },
        Response::Accepted { id: 7, destination: t("destination"), resumed: true, added_sources: vec![t("added")] },
        Response::Resumed { ids: vec![1, 2] },
        Response::Identical { destination: t("destination"), identity: t("identity") },
        Response::Downloads { downloads: vec![d.clone(), download(t, DownloadState::Failed)] },
        Response::Download { download: d.clone() },
        Response::Progress { download: d },
    ]
}

/// Everything mftctl prints for a person, from strings made by `t`.
fn renderings(t: Text) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = responses(t)
        .iter()
        .map(|r| (format!("{r:?}").split([' ', '(']).next().unwrap_or_default().to_string(), human(r)))
        .collect();
    for state in [DownloadState::Active, DownloadState::Done, DownloadState::Failed, DownloadState::Cancelled] {
        let d = download(t, state);
        all.push((format!("progress line, {state:?}"), progress_line(&d)));
        all.push((format!("summary, {state:?}"), summary(&d)));
        all.push((format!("notice, {state:?}"), notice(&d).unwrap_or_default()));
        for s in &d.sources {
            all.push((format!("source row {}", s.address), source_row(s)));
        }
        all.push((format!("total line, {state:?}"), total_line(&d)));
    }
    let d = download(t, DownloadState::Active);
    all.push(("waiting notice".into(), waiting_notice(&d).unwrap_or_default()));
    all.push(("identical".into(), identical(&t("destination"), &t("identity"))));
    all.push(("failure".into(), failure(&t("failure"))));
    all.push(("started".into(), started(7, false, &t("remote"), &t("destination"), &[t("added1"), t("added2")])));
    all
}

#[test]
fn no_field_reaches_the_terminal_raw() {
    let calm = renderings(benign);
    let wild = renderings(hostile);
    assert_eq!(calm.len(), wild.len());
    for ((what, calm), (_, wild)) in calm.iter().zip(&wild) {
        assert!(!acts_on_terminal(wild), "{what} prints a raw control character:\n{wild:?}");
        assert_eq!(
            calm.lines().count(),
            wild.lines().count(),
            "{what}: a field's line feed made a line of its own:\n{wild}"
        );
        assert!(!wild.lines().any(|l| l.starts_with("FAKE")), "{what}:\n{wild}");
    }
    // The hostile text is there, escaped visibly, not dropped.
    let everything: String = wild.iter().map(|(_, t)| t.as_str()).collect();
    for shown in ["\\e[2J", "\\e]0;owned\\x07", "\\nFAKE LINE\\r\\t\\x08\\x7f\\u{9b}2J\\u{202e}", "\\\\e[0m"] {
        assert!(everything.contains(shown), "{shown} not in:\n{everything}");
    }
    // Every string field of a download and a status is printed somewhere.
    for tag in [
        "remote_path",
        "destination",
        "source0",
        "transport",
        "node_id",
        "last_error",
        "recovered_from",
        "identity",
        "vote",
        "version",
        "waiting",
        "error",
        "listener_transport",
        "listen",
        "export_dir",
        "download_dir",
        "socket",
        "damaged_manifest",
        "daemon",
        "ok_message",
        "error_message",
        "added",
        "failure",
    ] {
        assert!(everything.contains(&format!("{tag}\\e[2J")), "{tag} is never printed, or printed raw");
    }
}

#[test]
fn json_stays_json_and_keeps_every_character() {
    for r in responses(hostile) {
        let line = json_line(&mftd_common::control::to_line(&r));
        assert!(!acts_on_terminal(line.trim_end_matches('\n')), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let back: Response = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(back, r);
    }
    // DEL, C1 and bidi controls are escaped too, as JSON does it.
    let line = json_line(&mftd_common::control::to_line(&Response::ok("a\u{7f}\u{9b}\u{202e}b")));
    assert!(line.contains(r"a\u007f\u009b\u202eb"), "{line}");
}
