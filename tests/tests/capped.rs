//! Load balancing over capped listeners, timed. In a file of its own so
//! it runs alone: cargo runs test binaries one after another, while the
//! tests of one binary share this machine's two cores, and a timing bound
//! measured next to nine other downloads says more about them than about
//! the scheduler.

use std::time::Duration;

use mftd_common::control::DownloadState;
use mftd_tests::{sha256_file, warm, write_file, Daemon};

const MIB: u64 = 1 << 20;

#[test]
fn capped_listeners_share_in_proportion_and_finish_near_ideal() {
    let server = Daemon::start(4);
    let caps = [4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB];
    for (p, c) in server.ports.iter().zip(caps) {
        assert!(server.ctl(&["servers", "limit", &p.to_string(), &c.to_string()]).status.success());
    }
    let size = 120 * MIB;
    write_file(&server.export.join("big"), size, 11);
    warm(&server, "big");
    let client = Daemon::start(0);
    let id = client.get_detached("big", &server.sources(), &[]);
    let dl = client.wait_download(id, Duration::from_secs(30));
    assert_eq!(dl.state, DownloadState::Done, "{dl:?}");
    assert_eq!(sha256_file(&client.downloads.join("big")), sha256_file(&server.export.join("big")));
    let sum: u64 = caps.iter().sum();
    let ideal = size as f64 / sum as f64;
    let took = dl.elapsed_ms as f64 / 1000.0;
    let shares: Vec<f64> = dl.sources.iter().map(|s| s.share).collect();
    println!(
        "capped 4/8/16/32 MiB/s, {size} bytes: {took:.3}s, ideal {ideal:.3}s, ratio {:.3}, shares {shares:?}",
        took / ideal
    );
    // Loose on purpose (a shared 2-core machine moves a 2 s run by 20 %;
    // `make bench` measures this case precisely): a broken share of the
    // caps costs far more than 1.5x, and no download beats the caps (the
    // token buckets start full, hence 0.9).
    assert!(took <= ideal * 1.5 && took >= ideal * 0.9, "took {took:.2}s, ideal {ideal:.2}s");
    for (share, cap) in shares.iter().zip(caps) {
        let want = cap as f64 / sum as f64;
        assert!((share - want).abs() <= 0.03, "share {share:.3} vs bandwidth share {want:.3}: {shares:?}");
    }
}
