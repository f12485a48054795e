//! Where the daemon's log lines go: stderr, through a bounded queue that one
//! thread drains.
//!
//! Owns the promise that logging never stops the daemon. A caller of
//! `tracing` (a download, a control handler, the shutdown path) only puts a
//! line on the queue; when the queue is full because nobody reads stderr,
//! the line is dropped and counted. The draining thread is the only one
//! that can block on a full pipe, and it ignores write errors: after EPIPE
//! (the reader went away) it stops writing and only empties the queue.
//! Must never panic on a failed write (as `eprintln!` does) and never make
//! the process wait on stderr for more than [`FLUSH_LIMIT`] at exit.
//!
//! `tracing-appender`'s non-blocking writer was the first choice, but its
//! guard `println!`s when the queue is still full at exit, which panics on
//! a closed stdout and blocks on a full one: the two cases this is for.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Lines the queue holds while stderr is slow or stuck (about 10 MiB of
/// typical lines); more are dropped.
pub const QUEUE_LINES: usize = 65_536;

/// How long exit waits for queued lines to reach stderr.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(1);

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it has been written (or dropped).
    Flush(SyncSender<()>),
}

/// A `tracing` writer that queues each line and never waits or fails.
#[derive(Clone)]
pub struct QueueWriter {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.tx.try_send(Msg::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter(self.clone())
    }
}

/// The writer of `tracing` events: one formatted event per write, its
/// control characters made visible ([`escape_controls`]) so that a name
/// someone else chose (a member's `-o` directory, a server's error text)
/// can neither start a forged log line nor drive the terminal of whoever
/// reads the log.
pub struct EventWriter(QueueWriter);

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(&escape_controls(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `line` with C0 controls (but tab and a final newline), DEL, C1 controls
/// and the bidirectional controls shown as escapes (`\n`, `\e`, `\x07`,
/// `\u{9b}`, `\u{202e}`), as mftctl shows them.
pub fn escape_controls(line: &[u8]) -> Vec<u8> {
    let (body, newline) = match line.strip_suffix(b"\n") {
        Some(b) => (b, true),
        None => (line, false),
    };
    let text = String::from_utf8_lossy(body);
    let bidi =
        |c: char| matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(|c| (c.is_control() && c != '\t') || bidi(c)) && text.len() == body.len() {
        return line.to_vec();
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x1b' => out.push_str("\\e"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() || bidi(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    if newline {
        out.push('\n');
    }
    out.into_bytes()
}

impl QueueWriter {
    /// Queues one line of text (a newline is added), for messages that are
    /// not log events, such as the error `main` exits with.
    pub fn say(&self, line: std::fmt::Arguments) {
        // One write, so the line is one message on the queue.
        let _ = self.clone().write_all(format!("{line}\n").as_bytes());
    }

    /// Waits at most `limit` for the lines queued so far to be written.
    /// Returns whether they were.
    pub fn flush_within(&self, limit: Duration) -> bool {
        let start = Instant::now();
        let (ack, done) = sync_channel(1);
        let mut msg = Msg::Flush(ack);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if start.elapsed() >= limit {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        done.recv_timeout(limit.saturating_sub(start.elapsed())).is_ok()
    }
}

/// Starts the draining thread writing to `out` with a queue of `lines`.
pub fn queue(out: impl Write + Send + 'static, lines: usize) -> io::Result<QueueWriter> {
    let (tx, rx) = sync_channel(lines);
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = dropped.clone();
    std::thread::Builder::new().name("mftd-log".into()).spawn(move || drain(rx, out, &counter))?;
    Ok(QueueWriter { tx, dropped })
}

/// Writes each queued line to `out`, first saying how many lines the full
/// queue turned away since it last said so (the notice can come a few lines
/// early: lines queued before the drops may follow it). After EPIPE nothing
/// can read what follows, so it only answers flushes.
fn drain(rx: Receiver<Msg>, mut out: impl Write, dropped: &AtomicU64) {
    let mut closed = false;
    for msg in rx {
        match msg {
            Msg::Line(line) if !closed => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = writeln!(out, "mftd: {lost} log lines dropped while stderr could not take them");
                }
                match out.write_all(&line) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => closed = true,
                    // EAGAIN on a non-blocking stderr, ENOSPC on a log
                    // file: this line is lost, the next may get through.
                    Err(_) => {}
                }
            }
            Msg::Line(_) => {}
            Msg::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.try_send(());
            }
        }
    }
}

/// Sends the daemon's `tracing` events to stderr through a [`queue`]: `-v`
/// counts set the level, `RUST_LOG` overrides. A panic's message goes
/// through the same queue, so a stuck stderr cannot hold a panicking thread.
/// Returns the writer, for `main`'s own messages and the flush at exit.
pub fn init(verbose: u8) -> io::Result<QueueWriter> {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let writer = queue(io::stderr(), QUEUE_LINES)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        // No colours: the writer escapes every control character, theirs
        // too.
        .with_ansi(false)
        // Writes cannot fail; and the fallback would be `eprintln!`.
        .log_internal_errors(false)
        .init();
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), "{info}");
    }));
    Ok(writer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn control_characters_of_an_event_are_escaped_and_its_newline_kept() {
        let line = "INFO dest=/x\n2026 WARN forged\x1b]0;t\x07\u{9b}2J\u{202e}\tend\n";
        let out = String::from_utf8(escape_controls(line.as_bytes())).unwrap();
        assert_eq!(out, "INFO dest=/x\\n2026 WARN forged\\e]0;t\\x07\\u{9b}2J\\u{202e}\tend\n");
        assert_eq!(escape_controls(b"plain line\n"), b"plain line\n");
        assert_eq!(escape_controls(b"no newline"), b"no newline");
    }

    /// A writer that blocks every write until `open` is set, or fails with
    /// `error` when one is given.
    #[derive(Clone, Default)]
    struct Stuck {
        open: Arc<Mutex<bool>>,
        error: Option<io::ErrorKind>,
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if let Some(kind) = self.error {
                return Err(io::Error::from(kind));
            }
            while !*self.open.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_stderr_drops_lines_and_never_blocks_the_writer() {
        let out = Stuck::default();
        let w = queue(out.clone(), 4).unwrap();
        let start = Instant::now();
        for i in 0..100 {
            w.say(format_args!("line {i}"));
        }
        assert!(start.elapsed() < Duration::from_millis(500), "writing blocked: {:?}", start.elapsed());
        assert!(!w.flush_within(Duration::from_millis(100)), "a flush through a stuck writer cannot succeed");
        *out.open.lock().unwrap() = true;
        assert!(w.flush_within(Duration::from_secs(5)));
        w.say(format_args!("after"));
        assert!(w.flush_within(Duration::from_secs(5)));
        let text = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
        assert!(text.contains("line 0\n"), "{text}");
        assert!(text.contains("log lines dropped while stderr could not take them\n"), "{text}");
        assert!(text.ends_with("\nafter\n"), "{text}");
        assert!(text.lines().count() < 10, "the queue of 4 kept more than it holds: {text}");
    }

    #[test]
    fn a_closed_stderr_is_written_to_once() {
        let out = Stuck { error: Some(io::ErrorKind::BrokenPipe), ..Stuck::default() };
        let w = queue(out.clone(), 16).unwrap();
        for i in 0..10 {
            w.say(format_args!("line {i}"));
        }
        assert!(w.flush_within(Duration::from_secs(5)));
        assert_eq!(out.writes.load(Ordering::Relaxed), 1, "wrote on after EPIPE");
    }

    #[test]
    fn other_write_errors_lose_only_their_line() {
        let out = Stuck { error: Some(io::ErrorKind::WouldBlock), ..Stuck::default() };
        let w = queue(out.clone(), 16).unwrap();
        for i in 0..10 {
            w.say(format_args!("line {i}"));
        }
        assert!(w.flush_within(Duration::from_secs(5)));
        assert_eq!(out.writes.load(Ordering::Relaxed), 10);
    }
}
