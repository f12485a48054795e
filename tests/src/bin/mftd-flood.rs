//! `mftd-flood SOCKET N SECS [PARTIAL_BYTES]`: holds up to N connections to
//! the control socket SOCKET for SECS seconds, opening a new one for every
//! one the daemon closes, each having sent PARTIAL_BYTES of a request line
//! that never ends. Played by a test as a local user who wants to starve
//! the daemon (run it under `setpriv` to be someone else).
//!
//! A connection counts as *held* once it has stayed open for 2 s (a
//! refused one may linger a moment while the daemon says why). Prints
//! `ready held=H` once connections have had 2.5 s to be held, then at the
//! end `held_max=H opened=O closed_by_daemon=C` and the first line the
//! daemon said on a connection it closed (`said=...`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: mftd-flood SOCKET N SECS [PARTIAL_BYTES]");
        std::process::exit(2);
    }
    let socket = &args[1];
    let n: usize = args[2].parse().expect("N");
    let secs: f64 = args[3].parse().expect("SECS");
    let partial: usize = args.get(4).map(|a| a.parse().expect("PARTIAL_BYTES")).unwrap_or(0);
    // One descriptor per connection: take what the hard limit allows.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let line = vec![b'x'; partial];
    let mut conns: Vec<Option<(UnixStream, Instant)>> = (0..n).map(|_| None).collect();
    const HELD: Duration = Duration::from_secs(2);
    let started = Instant::now();
    let (mut opened, mut closed, mut held_max) = (0u64, 0u64, 0usize);
    let mut said: Option<String> = None;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut first_round = true;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        for slot in conns.iter_mut() {
            if slot.is_none() {
                if let Ok(mut s) = UnixStream::connect(socket) {
                    opened += 1;
                    let _ = s.set_nonblocking(true);
                    let _ = s.write(&line);
                    *slot = Some((s, Instant::now()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        for slot in conns.iter_mut() {
            let Some((s, _)) = slot.as_mut() else { continue };
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    *slot = None;
                }
                Ok(k) => {
                    if said.is_none() {
                        said = Some(String::from_utf8_lossy(&buf[..k]).trim_end().to_string());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    closed += 1;
                    *slot = None;
                }
            }
        }
        let held = conns.iter().flatten().filter(|(_, t)| t.elapsed() >= HELD).count();
        held_max = held_max.max(held);
        if first_round && started.elapsed() >= HELD + Duration::from_millis(500) {
            println!("ready held={held}");
            let _ = std::io::stdout().flush();
            first_round = false;
        }
    }
    println!("held_max={held_max} opened={opened} closed_by_daemon={closed}");
    println!("said={}", said.unwrap_or_default());
}
