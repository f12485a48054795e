//! Downloads through the real binaries: sizes around the piece size, one and
//! four servers, checked by sha256 and by the bytes each listener sent.

use mftd_common::control::{DownloadState, Response, SourceState};
use mftd_tests::{sha256_file, stderr, stdout, write_file, Daemon, Line};

const PIECE: u64 = 256 << 10;

/// Downloads `name` from the given sources into a fresh client daemon and
/// returns the downloaded file's path.
fn fetch(server: &Daemon, client: &Daemon, name: &str, sources: &[String]) -> std::path::PathBuf {
    let out = client.get(name, &sources.join(","), &[]);
    assert!(
        out.status.success(),
        "get failed ({}): {}\n{}\nserver log:\n{}\nclient log:\n{}",
        out.status,
        stdout(&out),
        stderr(&out),
        server.log(),
        client.log()
    );
    client.downloads.join(name)
}

#[test]
fn sizes_from_one_and_four_servers() {
    let server = Daemon::start(4);
    let client = Daemon::start(0);
    let sizes = [0, 1, 3 * PIECE + 17, PIECE, 64 << 20];
    for (i, &size) in sizes.iter().enumerate() {
        let name = format!("f{i}.bin");
        write_file(&server.export.join(&name), size, i as u64 + 1);
        let want = sha256_file(&server.export.join(&name));
        // One server.
        let one = fetch(&server, &client, &name, &server.sources()[..1]);
        assert_eq!(sha256_file(&one), want, "size {size} from 1 server");
        assert_eq!(std::fs::metadata(&one).unwrap().len(), size);
        std::fs::remove_file(&one).unwrap();
        // Four servers.
        let before: Vec<u64> = server.ports.iter().map(|p| server.bytes_sent(*p)).collect();
        let four = fetch(&server, &client, &name, &server.sources());
        assert_eq!(sha256_file(&four), want, "size {size} from 4 servers");
        let after: Vec<u64> = server.ports.iter().map(|p| server.bytes_sent(*p)).collect();
        let sent: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let total: u64 = sent.iter().sum();
        assert!(total >= size, "listeners sent {total} < {size}");
        if size >= 64 << 20 {
            // Every server contributed, and duplicates were few.
            assert!(sent.iter().all(|&s| s > 0), "a server sent nothing: {sent:?}");
            assert!(total <= size + (8 << 20), "too many duplicate bytes: {sent:?}");
        }
        assert!(!client.downloads.join(format!("{name}.mftpart")).exists(), "part file left behind");
        std::fs::remove_file(&four).unwrap();
    }
}

#[test]
fn get_reports_per_server_result_and_json_events() {
    let server = Daemon::start(4);
    let client = Daemon::start(0);
    write_file(&server.export.join("dir/data.bin"), 5 << 20, 9);
    let (out, lines) = client.ctl_typed(&[
        "get",
        "dir/data.bin",
        "--from",
        &server.sources().join(","),
        "-o",
        client.downloads.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(matches!(lines[0], Line::Response(Response::Accepted { .. })), "{}", lines[0]);
    let last = lines.iter().rev().find_map(Line::progress).unwrap();
    assert_eq!(last.state, DownloadState::Done);
    let srcs = &last.sources;
    assert_eq!(srcs.len(), 4);
    let sum: u64 = srcs.iter().map(|s| s.bytes).sum();
    assert_eq!(sum, 5 << 20, "per-source bytes add up to the file size");
    assert_eq!(sha256_file(&client.downloads.join("data.bin")), sha256_file(&server.export.join("dir/data.bin")));

    // Human output names every source in the summary.
    std::fs::remove_file(client.downloads.join("data.bin")).unwrap();
    let out = client.get("dir/data.bin", &server.sources().join(","), &[]);
    assert!(out.status.success());
    let text = stdout(&out);
    for p in &server.ports {
        assert!(text.contains(&format!("127.0.0.1:{p}")), "summary lacks port {p}: {text}");
    }
    assert!(text.contains("verified blake3:"), "{text}");
}

#[test]
fn several_downloads_at_once() {
    let server = Daemon::start(2);
    let client = Daemon::start(0);
    for i in 0..3 {
        write_file(&server.export.join(format!("c{i}")), 8 << 20, 100 + i);
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let out = client.ctl(&["get", &format!("c{i}"), "--from", &server.sources().join(","), "--detach"]);
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(stdout(&out).trim().to_string());
    }
    let start = std::time::Instant::now();
    loop {
        let ds = client.downloads_list();
        if ds.len() == 3 && ds.iter().all(|d| d.state == DownloadState::Done) {
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "downloads did not finish: {ds:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for i in 0..3 {
        assert_eq!(
            sha256_file(&client.downloads.join(format!("c{i}"))),
            sha256_file(&server.export.join(format!("c{i}")))
        );
    }
}

#[test]
fn file_not_found_is_a_clear_error() {
    let server = Daemon::start(2);
    let client = Daemon::start(0);
    let out = client.get("missing.iso", &server.sources().join(","), &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out) + &stderr(&out);
    assert!(text.contains("missing.iso not found"), "{text}");
    assert!(!client.downloads.join("missing.iso.mftpart").exists());
}

#[test]
fn bad_output_dir_and_existing_file_are_refused() {
    let server = Daemon::start(1);
    let client = Daemon::start(0);
    write_file(&server.export.join("x"), 10, 1);
    // A missing -o directory is created, as aria2c -d does...
    let fresh = client.dir.path().join("new/sub/dir");
    let out = client.ctl(&["get", "x", "--from", &server.sources()[0], "-o", fresh.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&fresh.join("x")), sha256_file(&server.export.join("x")));
    // ...unless it cannot be.
    let under_a_file = client.dir.path().join("plain");
    std::fs::write(&under_a_file, b"x").unwrap();
    let nowhere = under_a_file.join("dir");
    let out = client.ctl(&["get", "x", "--from", &server.sources()[0], "-o", nowhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot"), "{}", stderr(&out));

    let file_as_dir = client.dir.path().join("afile");
    std::fs::write(&file_as_dir, b"x").unwrap();
    let out = client.ctl(&["get", "x", "--from", &server.sources()[0], "-o", file_as_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));

    std::fs::write(client.downloads.join("x"), b"precious").unwrap();
    let out = client.get("x", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read(client.downloads.join("x")).unwrap(), b"precious");
    let out = client.get("x", &server.sources()[0], &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("x")), sha256_file(&server.export.join("x")));
}

#[test]
fn server_with_a_different_version_is_excluded() {
    // Capped so the download outlasts the election even on a loaded machine.
    let good = Daemon::builder(2).arg("--rate-limit").arg("3M").start();
    let odd = Daemon::start(1);
    let client = Daemon::start(0);
    write_file(&good.export.join("v.bin"), 6 << 20, 7);
    write_file(&odd.export.join("v.bin"), 6 << 20, 8);
    let mut sources = good.sources();
    sources.push(odd.sources()[0].clone());
    let (out, lines) =
        client.ctl_typed(&["get", "v.bin", "--from", &sources.join(","), "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("v.bin")), sha256_file(&good.export.join("v.bin")));
    let last = lines.iter().rev().find_map(Line::progress).unwrap();
    let odd_src = mftd_tests::source(last, &odd.sources()[0]);
    assert_eq!(odd_src.state, SourceState::Excluded, "{odd_src:?}");
    assert!(odd_src.last_error.as_deref().unwrap().contains("different version"), "{odd_src:?}");
    assert_eq!(odd_src.bytes, 0);
    assert_eq!(odd.bytes_sent(odd.ports[0]), 0, "excluded server sent file bytes");
}

#[test]
fn output_name_saves_under_another_name_and_survives_a_restart() {
    let server = Daemon::builder(1).arg("--rate-limit").arg("8M").start();
    let client = Daemon::start(0);
    write_file(&server.export.join("dir/remote.bin"), 300_000, 40);
    let out = client.get("dir/remote.bin", &server.sources()[0], &["-O", "local.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("-> {}", client.downloads.join("local.bin").display())), "{}", stderr(&out));
    assert_eq!(sha256_file(&client.downloads.join("local.bin")), sha256_file(&server.export.join("dir/remote.bin")));
    assert!(!client.downloads.join("remote.bin").exists());
    for (bad, why) in
        [("..", "`..`"), ("../up", "`/`"), ("a/b", "cannot contain `/`"), ("x.mftpart", "`.mftpart`"), ("", "empty")]
    {
        let out = client.get("dir/remote.bin", &server.sources()[0], &["-O", bad]);
        assert_eq!(out.status.code(), Some(1), "-O {bad:?}");
        assert!(
            stderr(&out).contains("invalid output name") && stderr(&out).contains(why),
            "-O {bad:?}: {}",
            stderr(&out)
        );
    }

    // Its manifest names the chosen name: a crash and resume finish it there.
    write_file(&server.export.join("big"), 16 << 20, 41);
    mftd_tests::warm(&server, "big");
    let mut client = Daemon::builder(0).arg("--checkpoint-interval").arg("0.1").start();
    let id = client.get_detached("big", &server.sources(), &["-O", "renamed"]);
    assert!(mftd_tests::wait_until(std::time::Duration::from_secs(20), || {
        client.download(id).bytes_done > 4 << 20
    }));
    client.kill();
    let log = std::fs::OpenOptions::new().append(true).open(client.dir.path().join("mftd.log")).unwrap();
    let mut cmd = client.command(0, &[]);
    cmd.stdout(std::process::Stdio::null()).stderr(log);
    client.child = Some(cmd.spawn().unwrap());
    client.wait_ready();
    let out = client.ctl(&["get", "--resume", &id.to_string()]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), client.log());
    assert_eq!(sha256_file(&client.downloads.join("renamed")), sha256_file(&server.export.join("big")));
    assert!(!client.log().contains("damaged"), "{}", client.log());
}

#[test]
fn input_file_downloads_every_listed_path() {
    let server = Daemon::start(2);
    let client = Daemon::start(0);
    for (i, n) in ["one", "two", "sub/three"].iter().enumerate() {
        write_file(&server.export.join(n), 200_000 + i as u64, 50 + i as u64);
    }
    let list = client.dir.path().join("list.txt");
    std::fs::write(&list, "# wanted\none\n\n  two  \nsub/three\n/etc/passwd\n").unwrap();
    let dl = client.downloads.to_str().unwrap().to_string();
    let from = server.sources().join(",");
    let out = client.ctl(&["get", "-i", list.to_str().unwrap(), "--from", &from, "-o", &dl]);
    // One refused line fails the whole command, after the others ran.
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("mftctl: /etc/passwd: invalid remote path"), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 of 4 downloads did not succeed"), "{}", stderr(&out));
    for n in ["one", "two", "three"] {
        let src = if n == "three" { "sub/three" } else { n };
        assert_eq!(sha256_file(&client.downloads.join(n)), sha256_file(&server.export.join(src)), "{n}");
    }
    // Detached: one ID per line; an empty list is a usage error.
    for n in ["one", "two"] {
        std::fs::remove_file(client.downloads.join(n)).unwrap();
    }
    std::fs::write(&list, "one\ntwo\n").unwrap();
    let out = client.ctl(&["get", "-i", list.to_str().unwrap(), "--from", &from, "-o", &dl, "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids: Vec<u64> = stdout(&out).lines().map(|l| l.parse().expect("an ID per line")).collect();
    assert_eq!(ids.len(), 2);
    for id in ids {
        assert_eq!(client.wait_download(id, std::time::Duration::from_secs(30)).state, DownloadState::Done);
    }
    std::fs::write(&list, "# nothing\n\n").unwrap();
    let out = client.ctl(&["get", "-i", list.to_str().unwrap(), "--from", &from]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("lists no remote paths"), "{}", stderr(&out));
    let out = client.ctl(&["get", "one", "-i", list.to_str().unwrap(), "--from", &from]);
    assert_eq!(out.status.code(), Some(2), "a path and a list together is a usage error");
}

#[test]
fn an_identical_file_already_there_is_not_downloaded_again() {
    let server = Daemon::start(2);
    let client = Daemon::start(0);
    write_file(&server.export.join("same"), 3 << 20, 60);
    let from = server.sources().join(",");
    let out = client.get("same", &from, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dest = client.downloads.join("same");
    let sent = |s: &Daemon| s.ports.iter().map(|p| s.bytes_sent(*p)).sum::<u64>();
    let sent_before = sent(&server);
    let mtime = std::fs::metadata(&dest).unwrap().modified().unwrap();

    let out = client.get("same", &from, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let identity = mftd_tests::identity_of(&server.export.join("same"));
    assert!(
        stderr(&out)
            .contains(&format!("is already the file the sources serve (blake3:{identity}); nothing to download")),
        "{}",
        stderr(&out)
    );
    assert_eq!(sent(&server), sent_before, "an identical file was fetched again");
    assert_eq!(std::fs::metadata(&dest).unwrap().modified().unwrap(), mtime, "the file was rewritten");
    let (out, lines) = client.ctl_typed(&["get", "same", "--from", &from, "-o", client.downloads.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let Line::Response(Response::Identical { identity: got, .. }) = &lines[0] else {
        panic!("not identical: {}", lines[0])
    };
    assert_eq!(*got, identity);

    // Same size, one byte changed: refused, and the file is left alone.
    let mut bytes = std::fs::read(&dest).unwrap();
    bytes[1 << 20] ^= 1;
    std::fs::write(&dest, &bytes).unwrap();
    let out = client.get("same", &from, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already exists and is not the file the sources serve (same size, but BLAKE3"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    // Another size.
    std::fs::write(&dest, b"short").unwrap();
    let out = client.get("same", &from, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("(5 bytes here, {} bytes at the sources)", 3 << 20)), "{}", stderr(&out));
    assert_eq!(sent(&server), sent_before, "a refused get fetched data");
    // No source to compare with: refused, saying why.
    for p in &server.ports {
        assert!(server.ctl(&["servers", "stop", &p.to_string()]).status.success());
    }
    let out = client.get("same", &from, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("could not be compared with the sources' file"), "{}", stderr(&out));
    assert!(stderr(&out).contains("connection refused"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), b"short");
}
