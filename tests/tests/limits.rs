//! Bounds a download keeps whatever its sources say: disk space, file size,
//! how long ended downloads stay in memory, how many sources and downloads.

use std::time::{Duration, Instant};

use mftd_tests::{stderr, stdout, wait_until, write_file, Daemon};

#[test]
fn a_file_over_max_download_size_is_refused() {
    let server = Daemon::start(1);
    write_file(&server.export.join("big"), 2 << 20, 1);
    let client = Daemon::builder(0).arg("--max-download-size").arg("1M").start();
    let out = client.get("big", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("over max_download_size"), "{text}");
    assert!(!client.downloads.join("big").exists() && !client.downloads.join("big.mftpart").exists());
    // Within the limit: fine.
    write_file(&server.export.join("small"), 1 << 20, 2);
    assert!(client.get("small", &server.sources()[0], &[]).status.success());
}

#[test]
fn a_download_leaves_min_free_space() {
    let server = Daemon::start(1);
    write_file(&server.export.join("f"), 4096, 3);
    // More free space to keep than any disk here has.
    let client = Daemon::builder(0).arg("--min-free-space").arg("1024T").start();
    let out = client.get("f", &server.sources()[0], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("not enough disk space") && text.contains("kept free"), "{text}");
    assert!(!client.downloads.join("f.mftpart").exists());
    // The default keeps at most 1 GiB (5 % of small file systems): fine here.
    let client = Daemon::start(0);
    assert!(client.get("f", &server.sources()[0], &[]).status.success());
}

#[test]
fn ended_downloads_leave_the_registry_after_retention() {
    let server = Daemon::start(1);
    write_file(&server.export.join("r"), 4096, 4);
    let client = Daemon::builder(0).arg("--retention").arg("2").start();
    let out = client.get("r", &server.sources()[0], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ended = Instant::now();
    let listed = || client.downloads_list().len();
    assert_eq!(listed(), 1, "gone before its retention");
    assert!(wait_until(Duration::from_secs(10), || listed() == 0), "still listed after 10 s");
    let after = ended.elapsed();
    assert!(after >= Duration::from_secs(2), "removed after {after:?}, retention is 2 s");
}

#[test]
fn too_many_sources_is_a_clear_error() {
    let client = Daemon::start(0);
    let sources: Vec<String> = (1..=65).map(|p| format!("127.0.0.1:{p}")).collect();
    let out = client.get("x", &sources.join(","), &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("at most 64"), "{}", stderr(&out));
}
