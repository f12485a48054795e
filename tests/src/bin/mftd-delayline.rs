//! A wide-area-network delay line for the WAN testbed (`make bench-wan` and
//! the latency regression test).
//!
//! The kernels this project runs on have no `sch_netem`, so delay cannot be
//! added with `tc`. This program owns two TAP devices and copies every
//! Ethernet frame from one to the other after a fixed one-way delay, in both
//! directions, so a path through it has a round-trip time of twice the delay
//! (plus what the kernel adds). One device goes into the client's network
//! namespace, the other onto the bridge the servers hang off.
//!
//! The TAPs are opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD`
//! (`TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`): the kernel then hands over whole
//! 64 KiB GSO frames with a virtio-net header instead of 1514-byte packets,
//! and one thread carries several Gbit/s. Frames are passed on unchanged,
//! header included, so the receiving TAP segments them as needed.
//!
//! Each direction is a FIFO of `(release time, frame)`; frames arriving at a
//! constant delay leave in arrival order, so the queue never needs sorting.
//! A frame is dropped only when its direction already holds `--queue-mib`
//! of frames; drops are counted and printed on exit (SIGINT/SIGTERM).
//!
//! Usage: `mftd-delayline --tap-a NAME --tap-b NAME --delay-ms MS [--queue-mib N]`
//! It prints `ready` on stdout once both devices exist.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// Largest frame a TAP with GSO offloads hands over, plus the vnet header.
const MAX_FRAME: usize = 65536 + 64;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    tap_a: String,
    tap_b: String,
    delay: Duration,
    queue_bytes: usize,
}

fn usage(why: &str) -> ! {
    eprintln!("mftd-delayline: {why}");
    eprintln!("usage: mftd-delayline --tap-a NAME --tap-b NAME --delay-ms MS [--queue-mib N]");
    exit(2)
}

fn parse_args() -> Args {
    let mut tap_a = None;
    let mut tap_b = None;
    let mut delay_ms: Option<f64> = None;
    let mut queue_mib: usize = 256;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--tap-a" => tap_a = Some(val()),
            "--tap-b" => tap_b = Some(val()),
            "--delay-ms" => {
                let v = val();
                delay_ms = Some(v.parse().unwrap_or_else(|_| usage(&format!("bad --delay-ms {v:?}"))));
            }
            "--queue-mib" => {
                let v = val();
                queue_mib = v.parse().unwrap_or_else(|_| usage(&format!("bad --queue-mib {v:?}")));
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let delay_ms = delay_ms.unwrap_or_else(|| usage("--delay-ms is required"));
    if !(0.0..=10_000.0).contains(&delay_ms) {
        usage("--delay-ms must be between 0 and 10000");
    }
    Args {
        tap_a: tap_a.unwrap_or_else(|| usage("--tap-a is required")),
        tap_b: tap_b.unwrap_or_else(|| usage("--tap-b is required")),
        delay: Duration::from_secs_f64(delay_ms / 1000.0),
        queue_bytes: queue_mib.max(1) << 20,
    }
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates (or attaches to) TAP device `name` with vnet headers and GSO.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").expect("static path");
    // SAFETY: plain open(2) of a constant path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad device name {name:?}")));
    }
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq matches in size and layout.
    if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes an unsigned int by value.
    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, offload as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

/// One direction of the line: frames read from `from`, written to `to`.
struct Lane {
    from: RawFd,
    to: RawFd,
    /// (release time, buffer of MAX_FRAME bytes, frame length)
    queue: VecDeque<(Instant, Vec<u8>, usize)>,
    queued_bytes: usize,
    frames: u64,
    bytes: u64,
    drops: u64,
    write_errors: u64,
}

impl Lane {
    fn new(from: RawFd, to: RawFd) -> Lane {
        Lane { from, to, queue: VecDeque::new(), queued_bytes: 0, frames: 0, bytes: 0, drops: 0, write_errors: 0 }
    }

    /// Reads every frame waiting on `from` (bounded per call), stamping it.
    fn read_all(&mut self, delay: Duration, cap: usize, pool: &mut Vec<Vec<u8>>) {
        for _ in 0..4096 {
            // Buffers keep their full length, so reuse never re-zeroes them.
            let mut buf = pool.pop().unwrap_or_else(|| vec![0u8; MAX_FRAME]);
            // SAFETY: buf is MAX_FRAME bytes long and owned here.
            let n = unsafe { libc::read(self.from, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                pool.push(buf);
                return;
            }
            let n = n as usize;
            if self.queued_bytes + n > cap {
                self.drops += 1;
                pool.push(buf);
                continue;
            }
            self.queued_bytes += n;
            self.queue.push_back((Instant::now() + delay, buf, n));
        }
    }

    /// Writes every frame whose time has come; returns the next release time.
    fn release(&mut self, now: Instant, pool: &mut Vec<Vec<u8>>) -> Option<Instant> {
        while let Some((at, _, _)) = self.queue.front() {
            if *at > now {
                return Some(*at);
            }
            let Some((_, frame, len)) = self.queue.pop_front() else { break };
            self.queued_bytes -= len;
            // SAFETY: frame holds at least len bytes.
            let n = unsafe { libc::write(self.to, frame.as_ptr().cast(), len) };
            if n < 0 {
                // A TAP whose other side is down refuses frames: that is a
                // dead link, which is what the testbed wants to emulate.
                self.write_errors += 1;
            } else {
                self.frames += 1;
                self.bytes += len as u64;
            }
            pool.push(frame);
        }
        None
    }
}

fn main() {
    let args = parse_args();
    let a = open_tap(&args.tap_a).unwrap_or_else(|e| {
        eprintln!("mftd-delayline: cannot create TAP {}: {e} (needs root and /dev/net/tun)", args.tap_a);
        exit(1)
    });
    let b = open_tap(&args.tap_b).unwrap_or_else(|e| {
        eprintln!("mftd-delayline: cannot create TAP {}: {e} (needs root and /dev/net/tun)", args.tap_b);
        exit(1)
    });
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    println!("ready");
    let _ = std::io::stdout().flush();

    let mut ab = Lane::new(a.as_raw_fd(), b.as_raw_fd());
    let mut ba = Lane::new(b.as_raw_fd(), a.as_raw_fd());
    let mut pool: Vec<Vec<u8>> = Vec::new();
    while !STOP.load(Ordering::SeqCst) {
        let now = Instant::now();
        let next = [ab.release(now, &mut pool), ba.release(now, &mut pool)].into_iter().flatten().min();
        // Sleep until the next frame is due or a frame arrives; wake at
        // least every 100 ms to notice a signal.
        let wait = next.map(|t| t.saturating_duration_since(Instant::now())).unwrap_or(Duration::from_millis(100));
        let wait = wait.min(Duration::from_millis(100));
        let ts =
            libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long };
        let mut fds = [
            libc::pollfd { fd: ab.from, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: ba.from, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: fds is a valid array of two pollfd; ts is a valid timespec.
        let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("mftd-delayline: poll failed: {e}");
            exit(1);
        }
        // A device that went away (its namespace was deleted) ends the line.
        if (fds[0].revents | fds[1].revents) & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            eprintln!("mftd-delayline: a TAP device went away; stopping");
            break;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            ab.read_all(args.delay, args.queue_bytes, &mut pool);
        }
        if fds[1].revents & libc::POLLIN != 0 {
            ba.read_all(args.delay, args.queue_bytes, &mut pool);
        }
        pool.truncate(1024);
    }
    for (name, l) in
        [(format!("{}->{}", args.tap_a, args.tap_b), &ab), (format!("{}->{}", args.tap_b, args.tap_a), &ba)]
    {
        eprintln!(
            "mftd-delayline: {name}: {} frames, {} bytes, {} dropped (queue full), {} refused by the device",
            l.frames, l.bytes, l.drops, l.write_errors
        );
    }
}
