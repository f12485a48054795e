//! What mftctl shows of names another user chose. One user of a shared
//! mftd names a directory after terminal control sequences; root, listing
//! the downloads, must see them escaped, never obeyed. Played with a real
//! second uid (`setpriv`) against a real root daemon.

use std::process::Output;

use mftd_common::control::Response;
use mftd_tests::member::{ctl as nobody, daemon, nobodys_dir};
use mftd_tests::{dead_port, stderr, stdout};

/// Clears the screen, turns the text red, retitles the window, rings.
const HOSTILE: &str = "x\x1b[2J\x1b[31mFAKE\x1b]0;owned\x07";
/// The same, as mftctl shows it.
const SHOWN: &str = "x\\e[2J\\e[31mFAKE\\e]0;owned\\x07";

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// Whether `o` wrote a byte that drives a terminal (ESC, BEL, CSI as C1).
fn drives_terminal(o: &Output) -> bool {
    let all = [&o.stdout[..], &o.stderr[..]].concat();
    all.contains(&0x1b) || all.contains(&0x07) || String::from_utf8_lossy(&all).contains('\u{9b}')
}

#[test]
fn a_directory_named_with_terminal_escapes_is_shown_escaped_to_root() {
    mftd_tests::require_second_uid!();
    let d = daemon(&[]);
    let dir = nobodys_dir(d.dir.path(), HOSTILE);
    // From a port nobody listens on: the download waits, and stays listed.
    let out = nobody(&d, &["get", "report.pdf", "--from", &dead_port(), "-o", dir.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}\n{}", text(&out), d.log());
    let id = stdout(&out).trim().to_string();
    let destination = dir.join("report.pdf").to_str().unwrap().to_string();

    for args in [&["downloads", "list"][..], &["downloads", "show", &id], &["status"]] {
        let out = d.ctl(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(!drives_terminal(&out), "{args:?} wrote terminal controls: {:?}", text(&out));
        assert!(stdout(&out).contains(&format!("{SHOWN}/report.pdf")), "{args:?}: {}", text(&out));
    }
    // The user who chose the name sees it the same way.
    let out = nobody(&d, &["downloads", "show", &id]);
    assert!(out.status.success() && !drives_terminal(&out), "{:?}", text(&out));

    // JSON stays JSON, with the exact name.
    for args in [&["--json", "downloads", "list"][..], &["--json", "downloads", "show", &id]] {
        let out = d.ctl(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(!drives_terminal(&out), "{args:?}: {:?}", text(&out));
        let downloads = match serde_json::from_slice::<Response>(&out.stdout) {
            Ok(Response::Downloads { downloads }) => downloads,
            Ok(Response::Download { download }) => vec![download],
            other => panic!("{args:?}: {other:?}"),
        };
        let mine = downloads.iter().find(|x| x.id.to_string() == id).expect("the download is listed");
        assert_eq!(mine.destination, destination);
    }

    // A source cannot be named so: the daemon refuses it, quoting it harmlessly.
    let out = nobody(&d, &["downloads", "add-source", &id, "evil\x1b]0;x\x07.invalid:5001"]);
    assert!(!out.status.success() && !drives_terminal(&out), "{:?}", text(&out));
    assert!(text(&out).contains("is not a host name"), "{}", text(&out));

    // The daemon's own sentences quote the name: shown escaped as well.
    let out = d.ctl(&["downloads", "cancel", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!drives_terminal(&out), "{:?}", text(&out));
    assert!(stdout(&out).contains(SHOWN), "{}", text(&out));
}
