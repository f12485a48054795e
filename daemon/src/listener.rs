//! Transfer listeners: the set of TCP ports this daemon serves files on.
//!
//! Owns: binding, the accept loop with its connection cap, the handshake
//! rate and allow list it checks before any TLS work, and accept-error
//! backoff, per-listener statistics, and stopping/starting/adding listeners
//! at run time. Stopping a listener closes its socket *and* its open
//! connections, so clients fail over at once instead of finishing on a port
//! the operator wanted gone.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use mftd_common::control::{ListenerInfo, ListenerState};
use mftd_common::proto::{ErrorCode, ErrorFrame, Frame};

use crate::accept::AcceptBackoff;
use crate::ratelimit::RateLimiter;
use crate::serve::peerlog::Failure;
use crate::serve::{address_key, serve_connection, Egress, ServeContext};
use crate::transport::Transport;

/// Counters of one listener; they survive stop/start.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections: AtomicU64,
    pub total_connections: AtomicU64,
    /// Bytes/s over the last sampling period.
    pub rate: AtomicU64,
    sample: Mutex<Option<(Instant, u64)>>,
}

/// What the accept loop and its connections share.
#[derive(Debug)]
pub struct ListenerShared {
    pub port: u16,
    pub stats: ListenerStats,
    /// Transport, rate limit and bytes sent: what its connections use.
    pub egress: Arc<Egress>,
    /// Address ranges this listener accepts, over the global list.
    pub allow: std::sync::RwLock<Option<Vec<ipnet::IpNet>>>,
    /// Open connections: peer address, the token that closes them (so a
    /// new allow list can close those it forbids), and whether they have
    /// completed their handshake (see [`ListenerShared::evict_for`]).
    live: std::sync::Mutex<std::collections::HashMap<u64, Live>>,
}

/// Numbers every connection of every listener in the order accepted (the
/// oldest is closed first when room is made).
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// One open connection of a listener.
#[derive(Debug)]
struct Live {
    ip: std::net::IpAddr,
    token: CancellationToken,
    /// Set once the peer has completed its handshake (TLS, HELLO, proof).
    greeted: Arc<std::sync::atomic::AtomicBool>,
    /// Set once it holds its places (a newcomer waits for those of the
    /// connection closed for it; it counts for its address meanwhile,
    /// but closing it would make no room).
    placed: Arc<std::sync::atomic::AtomicBool>,
}

impl ListenerShared {
    /// A listener at its cap makes room for a connection from `ip` by
    /// closing one that has not completed its handshake, from the address
    /// holding the most connections, if that address holds more than
    /// `ip`: a few addresses holding every slot with sockets that never
    /// speak (one local user has all of 127.0.0.0/8) cannot lock out
    /// another address, and a connection that has greeted is never closed
    /// for a newcomer. Returns whether one was closed.
    fn evict_for(&self, ip: std::net::IpAddr) -> bool {
        evict_among(std::iter::once(self), ip)
    }

    /// Whether `ip` may connect, by this listener's list or else `global`.
    fn admits(&self, ip: &std::net::IpAddr, global: Option<&Vec<ipnet::IpNet>>) -> bool {
        let own = self.allow.read().unwrap_or_else(|p| p.into_inner());
        match own.as_ref().or(global) {
            Some(nets) => nets.iter().any(|n| n.contains(ip)),
            None => true,
        }
    }
}

/// Closes one connection of `listeners` to make room for one from `ip`
/// (see [`ListenerShared::evict_for`]); the listeners together when all
/// of them hold their share of the descriptors. Returns whether one was
/// closed.
fn evict_among<'a>(listeners: impl Iterator<Item = &'a ListenerShared>, ip: std::net::IpAddr) -> bool {
    // (address, closing it makes no room, id, token) of every open
    // connection and every newcomer waiting for its places.
    let mut open = Vec::new();
    for l in listeners {
        let live = l.live.lock().unwrap_or_else(|p| p.into_inner());
        for (id, c) in live.iter().filter(|(_, c)| !c.token.is_cancelled()) {
            let keep = c.greeted.load(Ordering::SeqCst) || !c.placed.load(Ordering::SeqCst);
            open.push((c.ip, keep, *id, c.token.clone()));
        }
    }
    // Addresses as the per-address cap counts them (an IPv6 client by its
    // /64), or one client on sixteen addresses would count as sixteen.
    let mut held: std::collections::HashMap<std::net::IpAddr, usize> = std::collections::HashMap::new();
    for (a, ..) in &open {
        *held.entry(address_key(*a)).or_insert(0) += 1;
    }
    let count = |a: &std::net::IpAddr| held.get(&address_key(*a)).copied().unwrap_or(0);
    let newcomer = count(&ip);
    let victim =
        open.iter().filter(|(_, keep, ..)| !keep).max_by_key(|(a, _, id, _)| (count(a), std::cmp::Reverse(*id)));
    match victim {
        Some((a, _, _, token)) if count(a) > newcomer => {
            token.cancel();
            true
        }
        _ => false,
    }
}

struct Entry {
    shared: Arc<ListenerShared>,
    addr: SocketAddr,
    /// Cancelled to stop this listener and all its connections.
    running: Option<CancellationToken>,
}

/// Why a listener operation failed; each names the port.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Port, and " by NAME (pid N)" when the owner could be found.
    #[error("port {0} is already in use{1}; choose another port (or stop that program)")]
    InUse(u16, String),
    #[error("no listener on port {0}; `mftctl servers list` shows the ports")]
    Unknown(u16),
    #[error("listener {0} is already running")]
    AlreadyRunning(u16),
    #[error("listener {0} is already stopped")]
    AlreadyStopped(u16),
    #[error("a listener on port {0} already exists")]
    Exists(u16),
    #[error("permission denied binding port {0}; ports below 1024 need privileges")]
    Permission(u16),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

pub struct Listeners {
    ip: IpAddr,
    max_connections: u32,
    /// Connections served by all listeners together: their share of the
    /// daemon's descriptors (see [`crate::fds`]).
    serving: Arc<Semaphore>,
    /// Every listener's shared part, for making room when all of them
    /// together hold their share (see [`evict_among`]).
    all_shared: Arc<Mutex<Vec<std::sync::Weak<ListenerShared>>>>,
    ctx: Arc<ServeContext>,
    entries: Mutex<BTreeMap<u16, Entry>>,
    parent: CancellationToken,
    tracker: TaskTracker,
}

/// Which process listens on a TCP port, as "NAME (pid N)", from /proc.
/// Best effort: `None` when it cannot be told (other users' processes).
pub fn port_owner(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let p = local.rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten().take(100_000) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                    return Some(format!("{} (pid {pid})", name.trim()));
                }
            }
        }
    }
    None
}

/// Binds a transfer port (port 0 picks a free one).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ListenerError> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|source| ListenerError::Bind { addr, source })?;
    // Reuse TIME_WAIT addresses so a quick restart or `servers start` works.
    let _ = sock.set_reuseaddr(true);
    let map = |source: io::Error| match source.kind() {
        io::ErrorKind::AddrInUse => {
            ListenerError::InUse(addr.port(), port_owner(addr.port()).map(|o| format!(" by {o}")).unwrap_or_default())
        }
        io::ErrorKind::PermissionDenied => ListenerError::Permission(addr.port()),
        _ => ListenerError::Bind { addr, source },
    };
    sock.bind(addr).map_err(map)?;
    sock.listen(1024).map_err(map)
}

impl Listeners {
    pub fn new(
        ip: IpAddr,
        max_connections: u32,
        serving: usize,
        ctx: Arc<ServeContext>,
        parent: CancellationToken,
        tracker: TaskTracker,
    ) -> Listeners {
        let serving = Arc::new(Semaphore::new(serving.clamp(1, Semaphore::MAX_PERMITS)));
        Listeners {
            ip,
            max_connections,
            serving,
            all_shared: Default::default(),
            ctx,
            entries: Mutex::new(BTreeMap::new()),
            parent,
            tracker,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Entry>> {
        // A poisoned lock only means a panic elsewhere mid-update of plain
        // data; the map itself is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds a new listener (port 0 picks a free one) and starts serving.
    pub fn add(&self, port: u16, rate_limit: u64, transport: Transport) -> Result<u16, ListenerError> {
        if port != 0 && self.entries().contains_key(&port) {
            return Err(ListenerError::Exists(port));
        }
        self.adopt(bind(SocketAddr::new(self.ip, port))?, rate_limit, transport)
    }

    /// Serves on a port bound beforehand (see [`bind`]).
    pub fn adopt(&self, listener: TcpListener, rate_limit: u64, transport: Transport) -> Result<u16, ListenerError> {
        let addr = listener
            .local_addr()
            .map_err(|source| ListenerError::Bind { addr: SocketAddr::new(self.ip, 0), source })?;
        let port = addr.port();
        if self.entries().contains_key(&port) {
            return Err(ListenerError::Exists(port));
        }
        let shared = Arc::new(ListenerShared {
            port,
            stats: ListenerStats::default(),
            egress: Arc::new(Egress {
                transport,
                limiter: RateLimiter::new(rate_limit),
                bytes_sent: AtomicU64::new(0),
            }),
            allow: std::sync::RwLock::new(None),
            live: Default::default(),
        });
        {
            let mut all = self.all_shared.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&shared));
        }
        let token = self.spawn(listener, shared.clone());
        self.entries().insert(port, Entry { shared, addr, running: Some(token) });
        info!(port, %addr, rate_limit, %transport, "listener started");
        Ok(port)
    }

    fn spawn(&self, listener: TcpListener, shared: Arc<ListenerShared>) -> CancellationToken {
        let token = self.parent.child_token();
        let sem = Arc::new(Semaphore::new(self.max_connections as usize));
        let ctx = self.ctx.clone();
        let tracker = self.tracker.clone();
        let t = token.clone();
        let span = info_span!("listener", port = shared.port);
        let sems = Permits { listener: sem, all: self.serving.clone(), all_shared: self.all_shared.clone() };
        self.tracker.spawn(accept_loop(listener, shared, ctx, sems, t, tracker).instrument(span));
        token
    }

    /// Stops a listener: closes its port and its connections. Returns how
    /// many connections were closed.
    pub fn stop(&self, port: u16) -> Result<u64, ListenerError> {
        let mut entries = self.entries();
        let e = entries.get_mut(&port).ok_or(ListenerError::Unknown(port))?;
        let token = e.running.take().ok_or(ListenerError::AlreadyStopped(port))?;
        let open = e.shared.stats.connections.load(Ordering::Relaxed);
        token.cancel();
        info!(port, closed = open, "listener stopped");
        Ok(open)
    }

    /// Reopens a stopped listener on the same address.
    pub fn start(&self, port: u16) -> Result<(), ListenerError> {
        let (addr, shared) = {
            let entries = self.entries();
            let e = entries.get(&port).ok_or(ListenerError::Unknown(port))?;
            if e.running.is_some() {
                return Err(ListenerError::AlreadyRunning(port));
            }
            (e.addr, e.shared.clone())
        };
        let listener = bind(addr)?;
        let token = self.spawn(listener, shared);
        if let Some(e) = self.entries().get_mut(&port) {
            e.running = Some(token);
        }
        info!(port, "listener restarted");
        Ok(())
    }

    /// Stops a listener and forgets it (reload removed it from the config).
    pub fn remove(&self, port: u16) -> Result<u64, ListenerError> {
        let e = self.entries().remove(&port).ok_or(ListenerError::Unknown(port))?;
        let open = e.shared.stats.connections.load(Ordering::Relaxed);
        if let Some(t) = e.running {
            t.cancel();
        }
        Ok(open)
    }

    /// Sets (or clears) the address ranges one listener accepts.
    pub fn set_allow(&self, port: u16, allow: Option<Vec<ipnet::IpNet>>) {
        if let Some(e) = self.entries().get(&port) {
            *e.shared.allow.write().unwrap_or_else(|p| p.into_inner()) = allow;
        }
    }

    /// The context every connection is served with.
    pub fn context(&self) -> &Arc<ServeContext> {
        &self.ctx
    }

    /// Closes open connections that the allow lists now in force forbid.
    /// Returns how many were closed.
    pub fn enforce_allow(&self) -> usize {
        let global = self.ctx.settings();
        let mut closed = 0;
        for e in self.entries().values() {
            let live = e.shared.live.lock().unwrap_or_else(|p| p.into_inner());
            for Live { ip, token, .. } in live.values() {
                if !e.shared.admits(ip, global.allow.as_ref()) && !token.is_cancelled() {
                    warn!(port = e.shared.port, %ip, "address no longer allowed; closing its connection");
                    token.cancel();
                    closed += 1;
                }
            }
        }
        closed
    }

    pub fn limit(&self, port: u16) -> Option<u64> {
        self.entries().get(&port).map(|e| e.shared.egress.limiter.rate())
    }

    pub fn set_limit(&self, port: u16, rate: u64) -> Result<(), ListenerError> {
        let entries = self.entries();
        let e = entries.get(&port).ok_or(ListenerError::Unknown(port))?;
        e.shared.egress.limiter.set_rate(rate);
        info!(port, rate, "rate limit changed");
        Ok(())
    }

    pub fn ports(&self) -> Vec<u16> {
        self.entries().keys().copied().collect()
    }

    pub fn list(&self) -> Vec<ListenerInfo> {
        self.entries()
            .values()
            .map(|e| {
                let s = &e.shared.stats;
                ListenerInfo {
                    port: e.shared.port,
                    address: e.addr.to_string(),
                    state: if e.running.is_some() { ListenerState::Running } else { ListenerState::Stopped },
                    connections: s.connections.load(Ordering::Relaxed),
                    total_connections: s.total_connections.load(Ordering::Relaxed),
                    bytes_sent: e.shared.egress.bytes_sent.load(Ordering::Relaxed),
                    rate: s.rate.load(Ordering::Relaxed),
                    rate_limit: e.shared.egress.limiter.rate(),
                    transport: e.shared.egress.transport.to_string(),
                }
            })
            .collect()
    }

    /// Updates each listener's current send rate; called every 500 ms.
    pub fn sample_rates(&self) {
        let now = Instant::now();
        for e in self.entries().values() {
            let s = &e.shared.stats;
            let bytes = e.shared.egress.bytes_sent.load(Ordering::Relaxed);
            let mut sample = s.sample.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((t, b)) = *sample {
                let dt = now.duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    s.rate.store(((bytes - b) as f64 / dt) as u64, Ordering::Relaxed);
                }
            }
            *sample = Some((now, bytes));
        }
    }

    /// Stops every listener (daemon shutdown).
    pub fn stop_all(&self) {
        for e in self.entries().values_mut() {
            if let Some(t) = e.running.take() {
                t.cancel();
            }
        }
    }
}

/// The connection caps a listener's connection takes a place in.
struct Permits {
    /// This listener's (`max_connections`).
    listener: Arc<Semaphore>,
    /// All listeners' (their share of the descriptors).
    all: Arc<Semaphore>,
    /// All listeners, to make room among when `all` is taken.
    all_shared: Arc<Mutex<Vec<std::sync::Weak<ListenerShared>>>>,
}

impl Permits {
    /// Makes room among all listeners for a connection from `ip`.
    fn evict_among_all(&self, ip: std::net::IpAddr) -> bool {
        let all: Vec<Arc<ListenerShared>> =
            self.all_shared.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(|w| w.upgrade()).collect();
        evict_among(all.iter().map(|l| &**l), ip)
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<ListenerShared>,
    ctx: Arc<ServeContext>,
    sems: Permits,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = AcceptBackoff::new("transfer listener");
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff.ok();
                x
            }
            Err(e) if backoff.failed(&e, &token).await => continue,
            Err(_) => break,
        };
        shared.stats.total_connections.fetch_add(1, Ordering::Relaxed);
        let ip = peer.ip().to_canonical();
        let log = &ctx.peer_log;
        if !shared.admits(&ip, ctx.settings().allow.as_ref()) {
            log.failed(peer, Failure::NotAllowed, "address not in the allow list; refusing");
            refuse(&tracker, stream, ErrorCode::NotAllowed, "your address is not allowed on this listener");
            continue;
        }
        if !ctx.admit(ip) {
            log.failed(peer, Failure::OverRate, "handshake rate exceeded; refusing");
            refuse_now(stream, ErrorCode::Busy, "too many new connections from your address; slow down");
            continue;
        }
        let Some(ip_slot) = ctx.enter(ip) else {
            log.failed(peer, Failure::OverCap, "per-address connection cap reached; refusing");
            refuse(&tracker, stream, ErrorCode::Busy, "too many connections from your address");
            continue;
        };
        // A full listener makes room among its own connections (the one
        // closed gives back its place in the share too); listeners that
        // together hold their share make room among all of theirs. The
        // places are taken below, once the closed connection gives them
        // back.
        let permit = sems.listener.clone().try_acquire_owned().ok();
        let all_permit = sems.all.clone().try_acquire_owned().ok();
        if permit.is_none() && !shared.evict_for(ip) {
            log.failed(peer, Failure::ListenerFull, "connection cap reached; refusing");
            refuse(&tracker, stream, ErrorCode::Busy, "listener is at its connection cap; try another server");
            continue;
        }
        if permit.is_some() && all_permit.is_none() && !sems.evict_among_all(ip) {
            log.failed(
                peer,
                Failure::ListenerFull,
                "all listeners together serve their share of descriptors; refusing",
            );
            refuse(&tracker, stream, ErrorCode::Busy, "this server is at its connection cap; try another server");
            continue;
        }
        // Counted for its address from now on, so that a burst from one
        // address is not taken for a newcomer each time.
        let conn_token = token.child_token();
        let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let greeted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let placed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = Live { ip, token: conn_token.clone(), greeted: greeted.clone(), placed: placed.clone() };
        shared.live.lock().unwrap_or_else(|p| p.into_inner()).insert(conn_id, live);
        let (shared, ctx2, tracker2) = (shared.clone(), ctx.clone(), tracker.clone());
        let (listener_sem, all_sem) = (sems.listener.clone(), sems.all.clone());
        let span = info_span!("conn", port = shared.port, %peer);
        tracker.spawn(
            async move {
                let deadline = tokio::time::Instant::now() + EVICTION_WAIT;
                let why = match permit {
                    Some(_) => "this server is at its connection cap; try another server",
                    None => "listener is at its connection cap; try another server",
                };
                let permits = async {
                    let p = match permit {
                        Some(p) => p,
                        None => listener_sem.acquire_owned().await.ok()?,
                    };
                    let a = match all_permit {
                        Some(a) => a,
                        None => all_sem.acquire_owned().await.ok()?,
                    };
                    Some((p, a))
                };
                let Ok(Some((permit, all_permit))) = tokio::time::timeout_at(deadline, permits).await else {
                    shared.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn_id);
                    refuse(&tracker2, stream, ErrorCode::Busy, why);
                    return;
                };
                placed.store(true, Ordering::SeqCst);
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                // A reload between the check above and the registration would
                // have missed this connection: check again now that a reload
                // sees it.
                if !shared.admits(&ip, ctx2.settings().allow.as_ref()) {
                    conn_token.cancel();
                }
                serve_connection(stream, ctx2, shared.egress.clone(), conn_token, &greeted).await;
                shared.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn_id);
                shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
                drop(all_permit);
                drop(ip_slot);
            }
            .instrument(span),
        );
    }
}

/// Longest a newcomer waits for the slot of the connection closed to make
/// room for it.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Sends one ERROR frame if the socket takes it at once, and closes: the
/// cheapest answer, for a peer that may be opening thousands a second.
fn refuse_now(stream: tokio::net::TcpStream, code: ErrorCode, message: &str) {
    let frame = Frame::Error(ErrorFrame { id: 0, code, message: message.into() });
    let _ = stream.try_write(&frame.encode());
}

/// Sends one ERROR frame (bounded to 2 s) and closes.
fn refuse(tracker: &TaskTracker, mut stream: tokio::net::TcpStream, code: ErrorCode, message: &str) {
    let frame = Frame::Error(ErrorFrame { id: 0, code, message: message.into() });
    tracker.spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&frame.encode())).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> ListenerShared {
        ListenerShared {
            port: 1,
            stats: ListenerStats::default(),
            egress: Arc::new(Egress {
                transport: Transport::Plain,
                limiter: RateLimiter::new(0),
                bytes_sent: AtomicU64::new(0),
            }),
            allow: std::sync::RwLock::new(None),
            live: Default::default(),
        }
    }

    /// Adds a connection from `ip` that holds its places but has not
    /// greeted; returns its token.
    fn open(l: &ListenerShared, ip: &str) -> CancellationToken {
        let token = CancellationToken::new();
        let live = Live {
            ip: ip.parse().expect("address"),
            token: token.clone(),
            greeted: Default::default(),
            placed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        l.live.lock().expect("live").insert(NEXT_CONN.fetch_add(1, Ordering::Relaxed), live);
        token
    }

    /// An IPv6 client is one address by its /64, as the per-address cap
    /// counts it: sixteen connections from sixteen addresses of one /64
    /// hold more than twelve from one IPv4 address behind a NAT, and the
    /// room is made among the sixteen.
    #[test]
    fn room_is_made_among_an_ipv6_clients_slash_64_as_one_address() {
        let l = listener();
        let nat: Vec<_> = (0..12).map(|_| open(&l, "192.0.2.1")).collect();
        let v6: Vec<_> = (0..16).map(|k| open(&l, &format!("2001:db8::{:x}", k + 1))).collect();
        assert!(l.evict_for("198.51.100.7".parse().expect("address")));
        assert!(nat.iter().all(|t| !t.is_cancelled()), "a connection of the NAT'd client was closed");
        assert_eq!(v6.iter().filter(|t| t.is_cancelled()).count(), 1);
    }
}
