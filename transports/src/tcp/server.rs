//! The target side: a listener, and one thread per accepted connection that authenticates it and
//! then carries out its frames in order against the agent's registrations.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{BackendName, Desc, Error, MemKind, RegionAccess, Result, TargetHandle};
use parking_lot::Mutex;

use super::identity::PeerIdentity;
use super::net::{self, Link, OnBlock, Span};
use super::wire::{self, Piece, Purpose, Status};
use super::{auth, TcpConfig};
use crate::control::Services;

/// How often a blocked read or write wakes up to check the clock and the shutdown flag.
pub(super) const TICK: Duration = Duration::from_millis(200);

/// Frame bodies up to this size are read without asking the listener's frame memory budget.
const SMALL_FRAME: usize = 64 << 10;

#[derive(Debug)]
struct Shared {
    cfg: Arc<TcpConfig>,
    target: TargetHandle,
    host: Vec<(String, IpAddr)>,
    /// The socket of each connection being served, to shut down on stop. A connection's entry is
    /// removed (under this lock) before its socket is closed, so every fd here is open.
    conns: Mutex<HashMap<u64, RawFd>>,
    /// Data connections past their OPEN, by connection id: the peer's name, whether the
    /// connection's thread waits for a frame with nothing received left to carry out, and the
    /// socket (open while its entry is here, as in `conns`). See [`Server::peer_idle`].
    data: Mutex<HashMap<u64, DataConn>>,
    /// Connections being served, in total and per peer address.
    admitted: Mutex<Admitted>,
    /// `max_conns`, capped by the fd limit.
    max_conns: usize,
    /// Bytes reserved by frame bodies over [`SMALL_FRAME`] being read or handled.
    frame_bytes: AtomicUsize,
    /// When a refusal was last logged (ms since `started`), so a flood logs once a second.
    last_warn: AtomicU64,
    started: Instant,
    next: AtomicU64,
    shut: AtomicBool,
    services: Arc<Services>,
}

#[derive(Debug)]
struct DataConn {
    peer: Arc<str>,
    waiting: Arc<AtomicBool>,
    fd: RawFd,
}

/// A data connection's entry in [`Shared::data`], removed on drop (before the socket closes).
struct DataEntry<'a>(&'a Shared, u64);

impl Drop for DataEntry<'_> {
    fn drop(&mut self) {
        self.0.data.lock().remove(&self.1);
    }
}

/// Bytes received on `fd` and not read yet.
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the caller keeps `fd` open.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        // Unknown: count it as work, the answer that can only delay a free.
        1
    } else {
        n.max(0) as usize
    }
}

#[derive(Debug, Default)]
struct Admitted {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A connection's place under the listener's caps, given back on drop.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.shared.admitted.lock();
        a.total -= 1;
        if let Some(n) = a.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                a.per_ip.remove(&self.ip);
            }
        }
        metrics::gauge!("nixl_tcp_conns_open").set(a.total as f64);
    }
}

impl Shared {
    /// Takes a slot for a connection from `ip`, or says which cap refuses it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> std::result::Result<Slot, &'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut a = self.admitted.lock();
        if a.total >= self.max_conns {
            return Err("total");
        }
        let n = a.per_ip.entry(ip).or_insert(0);
        if *n >= self.cfg.max_conns_per_ip {
            return Err("per_ip");
        }
        *n += 1;
        a.total += 1;
        metrics::gauge!("nixl_tcp_conns_open").set(a.total as f64);
        Ok(Slot {
            shared: Arc::clone(self),
            ip,
        })
    }

    /// Whether a refusal may be logged now (at most one a second).
    fn may_warn(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_warn.load(Ordering::Relaxed);
        (last == 0 || now >= last + 1000)
            && self
                .last_warn
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Bytes of the frame memory budget held by one frame body, given back on drop.
struct Reserved<'a>(&'a AtomicUsize, usize);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// The fd limit of the process (soft), if it can be read.
fn fd_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    usize::try_from(r.rlim_cur).ok()
}

/// A running listener.
#[derive(Debug)]
pub(super) struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// The addresses published in the agent's metadata.
    pub(super) published: Vec<SocketAddr>,
}

impl Server {
    pub(super) fn start(
        cfg: Arc<TcpConfig>,
        target: TargetHandle,
        services: Arc<Services>,
    ) -> Result<Server> {
        let want = cfg
            .listen
            .unwrap_or_else(|| SocketAddr::new(net::default_listen_ip(), 0));
        let listener =
            TcpListener::bind(want).map_err(|e| Error::io(format!("tcp listen on {want}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("tcp listener address", e))?;
        let host = net::host_addrs();
        let published = publish(bound, &host);
        if cfg.auth.allow_open() {
            let warning = format!(
                "nixl: WARNING: agent '{}' listens on {bound} with NO AUTHENTICATION \
                 ([auth] allow_open = true): anyone who reaches this port, any local user \
                 included, can read and write this agent's registered memory",
                target.name()
            );
            tracing::warn!(agent = %target.name(), %bound, "{warning}");
            eprintln!("{warning}");
        }
        // Each connection holds one fd: keep at least half of the process's fds for the rest
        // of the application whatever the configuration says.
        let max_conns = match fd_limit() {
            Some(fds) if cfg.max_conns > fds / 2 => {
                let capped = (fds / 2).max(16);
                tracing::warn!(agent = %target.name(), max_conns = cfg.max_conns, fd_limit = fds,
                    capped, "tcp: max_conns capped at half the fd limit");
                capped
            }
            _ => cfg.max_conns,
        };
        tracing::info!(agent = %target.name(), ?published, auth = %cfg.auth.describe(),
            max_conns, "tcp listening");
        let shared = Arc::new(Shared {
            cfg,
            target,
            host,
            conns: Mutex::new(HashMap::new()),
            data: Mutex::new(HashMap::new()),
            admitted: Mutex::new(Admitted::default()),
            max_conns,
            frame_bytes: AtomicUsize::new(0),
            last_warn: AtomicU64::new(0),
            started: Instant::now(),
            next: AtomicU64::new(1),
            shut: AtomicBool::new(false),
            services,
        });
        let l2 = listener
            .try_clone()
            .map_err(|e| Error::io("tcp listener", e))?;
        let s2 = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nixl-tcp-accept".into())
            .spawn(move || accept_loop(s2, l2))
            .map_err(|e| Error::io("spawn tcp accept thread", e))?;
        Ok(Server {
            shared,
            listener,
            published,
        })
    }

    /// Whether no data connection of `peer` has a frame being carried out or received and
    /// waiting: every READ it asked of this agent so far has stopped reading the memory. Exact
    /// for what arrived before the call: a connection counts as idle only while its thread
    /// waits for a frame with nothing read and nothing unread (it marks itself busy before it
    /// takes a byte off the socket, and the socket's unread count is read between two looks
    /// at that mark).
    pub(super) fn peer_idle(&self, peer: &str) -> bool {
        let data = self.shared.data.lock();
        data.values().filter(|c| &*c.peer == peer).all(|c| {
            // SeqCst on both sides: the thread clears `waiting` before it reads the socket.
            c.waiting.load(Ordering::SeqCst)
                && unread(c.fd) == 0
                && c.waiting.load(Ordering::SeqCst)
        })
    }

    /// Bytes of the `frame_memory` budget that admitted frames hold now (for tests).
    #[cfg(test)]
    pub(super) fn frame_bytes_held(&self) -> usize {
        self.shared.frame_bytes.load(Ordering::Acquire)
    }

    /// Stops accepting and drops every connection (their threads end soon after).
    pub(super) fn stop(&self) {
        self.shared.shut.store(true, Ordering::Release);
        // SAFETY: shutdown on our own listening socket only wakes the blocked accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let mut conns = self.shared.conns.lock();
        for (_, fd) in conns.drain() {
            // SAFETY: the fd is open: its connection removes it from the map, under this lock,
            // before closing it. Shutdown only wakes the connection's blocked reads and writes.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A wildcard bind publishes every non-loopback address of the host (loopback last, so that
/// agents on one host still find each other); a specific bind publishes itself.
fn publish(bound: SocketAddr, host: &[(String, IpAddr)]) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let v6 = bound.is_ipv6();
    let mut out: Vec<SocketAddr> = host
        .iter()
        .map(|(_, ip)| *ip)
        .filter(|ip| !ip.is_loopback() && (v6 || ip.is_ipv4()))
        .filter(|ip| match ip {
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    out.push(SocketAddr::new(
        if v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        },
        bound.port(),
    ));
    out
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                if shared.shut.load(Ordering::Acquire) {
                    return;
                }
                // One thread per connection, as many as connections are admitted: the caps
                // bound both.
                let slot = match shared.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(cap) => {
                        metrics::counter!("nixl_tcp_conns_refused_total", "cap" => cap)
                            .increment(1);
                        if shared.may_warn() {
                            tracing::warn!(agent = %shared.target.name(), %peer, cap,
                                max_conns = shared.max_conns,
                                max_conns_per_ip = shared.cfg.max_conns_per_ip,
                                "tcp: connection refused, the listener is at its cap");
                        }
                        drop(s);
                        continue;
                    }
                };
                let sh = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("nixl-tcp-serve".into())
                    .spawn(move || serve(sh, s, peer, slot));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a tcp connection thread");
                }
            }
            Err(e) => {
                if shared.shut.load(Ordering::Acquire) {
                    return;
                }
                tracing::warn!(error = %e, "tcp accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads give up mid-frame once the peer has been silent for `io_timeout`, and between frames
/// once it has sent nothing for `idle` (the OPEN after authentication: `connect_timeout`; later
/// frames: `idle_timeout`).
struct Idle<'a> {
    shared: &'a Shared,
    since: Instant,
    waiting: Instant,
    idle: Duration,
}

impl<'a> Idle<'a> {
    fn new(shared: &'a Shared, idle: Duration) -> Idle<'a> {
        let now = Instant::now();
        Idle {
            shared,
            since: now,
            waiting: now,
            idle,
        }
    }
}

impl OnBlock for Idle<'_> {
    fn blocked(&mut self, started: bool) -> io::Result<()> {
        if self.shared.shut.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "agent shutting down",
            ));
        }
        if started && self.since.elapsed() > self.shared.cfg.io_timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer silent mid-frame",
            ));
        }
        if !started {
            self.since = Instant::now();
            if self.waiting.elapsed() > self.idle {
                metrics::counter!("nixl_tcp_idle_closed_total").increment(1);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {:?}", self.idle),
                ));
            }
        }
        Ok(())
    }

    fn progress(&mut self) {
        self.since = Instant::now();
    }
}

/// The handshake's reads: past the deadline they fail, however the peer trickles bytes.
struct Deadline(Instant);

impl OnBlock for Deadline {
    fn blocked(&mut self, _: bool) -> io::Result<()> {
        self.moved()
    }

    fn moved(&mut self) -> io::Result<()> {
        if Instant::now() >= self.0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake did not finish within its deadline",
            ));
        }
        Ok(())
    }
}

/// A connection past its handshake, its socket registered for [`Server::stop`] to shut down.
/// Dropping it removes the entry (under the lock) before the socket is closed, so every fd in
/// the map is open.
struct Served<'a> {
    shared: &'a Shared,
    id: u64,
    link: Link,
}

impl<'a> Served<'a> {
    fn new(shared: &'a Shared, link: Link) -> Served<'a> {
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        shared.conns.lock().insert(id, link.socket().as_raw_fd());
        Served { shared, id, link }
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        self.shared.conns.lock().remove(&self.id);
        // The link (and its socket) is dropped after this, with the struct's fields.
    }
}

fn serve(shared: Arc<Shared>, s: TcpStream, peer: SocketAddr, slot: Slot) {
    let res = serve_inner(&shared, s, peer);
    // The socket is closed by now: only then does the connection give its place back.
    drop(slot);
    match res {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            metrics::counter!("nixl_tcp_bad_frames_total").increment(1);
            tracing::warn!(%peer, error = %e, "tcp: malformed frame, connection dropped");
        }
        Err(e) => tracing::debug!(%peer, error = %e, "tcp connection ended"),
    }
}

fn serve_inner(shared: &Shared, s: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let cfg = &shared.cfg;
    net::tune(&s, cfg.socket_buffer)?;
    // The whole handshake, up to the OPEN frame, within one deadline. The socket is not in the
    // map `stop` shuts down until the handshake is over: the deadline bounds it.
    let deadline = Instant::now() + cfg.handshake_timeout;
    let me = (shared.target.name(), shared.target.instance_id());
    let local = |ip| net::is_local(ip, &shared.host);
    let (link, proven) = match auth::accept(s, &cfg.auth, peer, local, me, deadline) {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!("nixl_tcp_auth_failures_total").increment(1);
            tracing::warn!(agent = %shared.target.name(), %peer, "tcp: {e}");
            return Ok(());
        }
    };
    let served = Served::new(shared, link);
    let s = &served.link;
    let mut body = Vec::new();
    // The OPEN must come within the handshake's deadline and within `connect_timeout` of
    // authenticating, and be no more than an OPEN (checked from the header).
    let open_by = deadline.min(Instant::now() + cfg.connect_timeout);
    s.set_deadline(Some(open_by));
    let mut frames = Frames::opening(shared, open_by);
    frames.next(s, &mut body)?;
    drop(frames);
    let open = wire::decode_open(&body).map_err(wire::bad)?;
    let me = shared.target.instance_id();
    let mut out = Vec::with_capacity(256);
    // With a secret the handshake proved who the initiator is: the OPEN frame may not claim
    // anyone else. From here on `who` is the peer, whatever later frames say.
    let who = PeerIdentity::new(open.name, open.instance);
    if let Some(p) = proven.filter(|p| *p != who) {
        metrics::counter!("nixl_tcp_auth_failures_total").increment(1);
        tracing::warn!(agent = %shared.target.name(), %peer, proven = %p, claimed = %who,
            "tcp: OPEN names another agent than the handshake proved");
        wire::opened(
            &mut out,
            Status::Denied,
            me,
            "the OPEN frame names another agent than the handshake proved",
        );
        net::send_all(s, &out)?;
        return Ok(());
    }
    let refusal = if open.expect != 0 && open.expect != me {
        Some("this agent restarted: load its new metadata")
    } else if who.is_anonymous() && open.purpose != Purpose::Metadata {
        Some("an anonymous caller may only fetch metadata")
    } else {
        None
    };
    if let Some(why) = refusal {
        wire::opened(&mut out, Status::Denied, me, why);
        net::send_all(s, &out)?;
        return Ok(());
    }
    wire::opened(&mut out, Status::Ok, me, shared.target.name());
    net::send_all(s, &out)?;
    s.set_deadline(None);
    net::read_timeout(s, TICK)?;
    net::write_timeout(s, TICK, cfg.io_timeout)?;
    let frames = Frames::new(shared, Some(open.purpose));
    match open.purpose {
        Purpose::Metadata => serve_metadata(shared, s, frames, &who, &mut body, &mut out),
        Purpose::Control => serve_control(shared, s, frames, &who.name, &mut body, &mut out),
        Purpose::Data => {
            let waiting = Arc::new(AtomicBool::new(false));
            shared.data.lock().insert(
                served.id,
                DataConn {
                    peer: Arc::from(who.name.as_str()),
                    waiting: Arc::clone(&waiting),
                    fd: s.socket().as_raw_fd(),
                },
            );
            let _entry = DataEntry(shared, served.id);
            Worker::new(shared, who.name).run(s, frames, &mut body, &waiting)
        }
    }
}

/// Reads the frames of one connection: only those of its purpose, each within its size limit
/// (see [`wire::purpose_limit`]), bodies over [`SMALL_FRAME`] only within the listener's frame
/// memory budget, each held until the next frame is asked for.
struct Frames<'a> {
    shared: &'a Shared,
    purpose: Option<Purpose>,
    /// Before OPEN: when it must have arrived, however the peer trickles it.
    until: Option<Instant>,
    held: Option<Reserved<'a>>,
}

impl<'a> Frames<'a> {
    fn new(shared: &'a Shared, purpose: Option<Purpose>) -> Frames<'a> {
        Frames {
            shared,
            purpose,
            until: None,
            held: None,
        }
    }

    /// The frames of a connection not opened yet: only an OPEN, by `until`.
    fn opening(shared: &'a Shared, until: Instant) -> Frames<'a> {
        Frames {
            until: Some(until),
            ..Frames::new(shared, None)
        }
    }

    /// The next frame's type, its body in `body`; `idle` counts from now.
    fn next(&mut self, s: &Link, body: &mut Vec<u8>) -> io::Result<u8> {
        // The last frame is handled: give its memory back.
        if self.held.take().is_some() || body.capacity() > SMALL_FRAME {
            *body = Vec::new();
        }
        let shared = self.shared;
        let purpose = self.purpose;
        let mut deadline;
        let mut idle;
        let on: &mut dyn OnBlock = match self.until {
            Some(until) => {
                deadline = Deadline(until);
                &mut deadline
            }
            None => {
                idle = Idle::new(shared, shared.cfg.idle_timeout);
                &mut idle
            }
        };
        let held = &mut self.held;
        let mut admit = |ty: u8, len: usize| -> io::Result<()> {
            let what = match purpose {
                None => "an unopened",
                Some(Purpose::Data) => "a data",
                Some(Purpose::Metadata) => "a metadata",
                Some(Purpose::Control) => "a control",
            };
            let Some(limit) = wire::purpose_limit(purpose, ty) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame type {ty} on {what} connection"),
                ));
            };
            if len > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame type {ty} of {len} bytes on {what} connection (limit {limit})"),
                ));
            }
            if len > SMALL_FRAME {
                let budget = shared.cfg.frame_memory;
                let got =
                    shared
                        .frame_bytes
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                            used.checked_add(len).filter(|&n| n <= budget)
                        });
                if got.is_err() {
                    metrics::counter!("nixl_tcp_frame_memory_refused_total").increment(1);
                    return Err(io::Error::other(format!(
                        "frame type {ty} of {len} bytes refused: the listener's frame_memory \
                         budget ({budget} bytes) is taken by other connections' frames"
                    )));
                }
                *held = Some(Reserved(&shared.frame_bytes, len));
            }
            Ok(())
        };
        net::read_frame_admit(s, body, &mut admit, on)
    }
}

fn serve_metadata(
    shared: &Shared,
    s: &Link,
    mut frames: Frames<'_>,
    who: &PeerIdentity,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        let ty = frames.next(s, body)?;
        match ty {
            wire::MD_GET => match shared.target.local_metadata() {
                Ok(md) => wire::md(out, Status::Ok, &md),
                Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
            },
            wire::MD_PUSH => {
                let mut r = nixl_core::codec::Reader::new(body);
                let md = r.blob("metadata").map_err(wire::bad)?;
                match check_push(&shared.cfg, who, md) {
                    Err(why) => {
                        metrics::counter!("nixl_tcp_pushes_refused_total").increment(1);
                        tracing::warn!(agent = %shared.target.name(), peer = %who,
                            "pushed metadata refused: {why}");
                        wire::md(out, Status::Denied, why.as_bytes());
                    }
                    Ok(()) => match shared.target.load_pushed(md) {
                        Ok(name) => {
                            tracing::info!(agent = %shared.target.name(), peer = %name,
                                "loaded pushed metadata");
                            wire::md(out, Status::Ok, name.as_bytes());
                        }
                        Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
                    },
                }
            }
            wire::MD_DROP => {
                wire::decode_md_drop(body).map_err(wire::bad)?;
                match check_drop(&shared.cfg, who) {
                    Err(why) => {
                        metrics::counter!("nixl_tcp_pushes_refused_total").increment(1);
                        tracing::warn!(agent = %shared.target.name(), peer = %who,
                            "metadata invalidation refused: {why}");
                        wire::md(out, Status::Denied, why.as_bytes());
                    }
                    // Only the proven caller's own metadata: no frame names anyone.
                    Ok(()) => match shared.target.drop_pushed(&who.name, who.instance) {
                        Ok(loaded) => wire::md(out, Status::Ok, wire::dropped(loaded)),
                        Err(Error::Denied { reason, .. }) => {
                            wire::md(out, Status::Denied, reason.as_bytes())
                        }
                        Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
                    },
                }
            }
            t => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame type {t} on a metadata connection"),
                ))
            }
        }
        net::send_all(s, out)?;
    }
}

/// Whether pushed metadata may be loaded: pushes must be on (`[tcp] accept_pushes`), and an agent
/// may push only its own metadata, the name and instance its connection proved.
fn check_push(cfg: &TcpConfig, who: &PeerIdentity, md: &[u8]) -> std::result::Result<(), String> {
    if !cfg.accept_pushes {
        return Err(
            "this agent does not accept pushed metadata ([tcp] accept_pushes = false)".into(),
        );
    }
    let got = nixl_core::AgentMetadata::decode(md).map_err(|e| format!("bad metadata: {e}"))?;
    if got.name != who.name || got.instance_id != who.instance {
        return Err(format!(
            "metadata of '{}' (instance {:032x}) pushed by {who}: an agent may push only its own",
            got.name, got.instance_id
        ));
    }
    Ok(())
}

/// Whether a caller may have its metadata dropped: as for pushes, they must be on
/// (`[tcp] accept_pushes`), and the caller must be an agent (an anonymous caller has no metadata).
fn check_drop(cfg: &TcpConfig, who: &PeerIdentity) -> std::result::Result<(), String> {
    if !cfg.accept_pushes {
        return Err(
            "this agent does not accept pushed metadata nor its invalidation \
                    ([tcp] accept_pushes = false)"
                .into(),
        );
    }
    if who.is_anonymous() {
        return Err("an anonymous caller has no metadata to invalidate".into());
    }
    Ok(())
}

/// Answers control requests for other backends' services, one at a time, until the peer closes.
fn serve_control(
    shared: &Shared,
    s: &Link,
    mut frames: Frames<'_>,
    peer: &str,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        let ty = frames.next(s, body)?;
        if ty != wire::CTRL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame type {ty} on a control connection"),
            ));
        }
        let (code, req) = wire::decode_ctrl(body).map_err(wire::bad)?;
        let answer = match BackendName::from_code(code) {
            Some(b) => shared.services.dispatch(peer, b, req),
            None => Err(format!("unknown backend code {code}")),
        };
        match answer {
            Ok(reply) => wire::ctrl_re(out, Status::Ok, &reply),
            Err(reason) => {
                tracing::debug!(agent = %shared.target.name(), peer, %reason,
                    "control request refused");
                wire::ctrl_re(out, Status::Denied, reason.as_bytes());
            }
        }
        net::send_all(s, out)?;
    }
}

/// Carries out the frames of one data connection.
struct Worker<'a> {
    shared: &'a Shared,
    peer: String,
    pieces: Vec<Piece>,
    spans: Vec<Span>,
    holds: Vec<RegionAccess>,
    iov: Vec<libc::iovec>,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared, peer: String) -> Worker<'a> {
        Worker {
            shared,
            peer,
            pieces: Vec::new(),
            spans: Vec::new(),
            holds: Vec::new(),
            iov: Vec::with_capacity(net::IOV_MAX),
            out: Vec::with_capacity(256),
            scratch: Vec::new(),
        }
    }

    fn run(
        mut self,
        s: &Link,
        mut frames: Frames<'_>,
        body: &mut Vec<u8>,
        waiting: &AtomicBool,
    ) -> io::Result<()> {
        loop {
            self.await_frame(s, waiting)?;
            let ty = frames.next(s, body)?;
            // Data moving after a frame gives up after `io_timeout` of silence (`started`).
            let mut idle = Idle::new(self.shared, self.shared.cfg.idle_timeout);
            match ty {
                wire::WRITE | wire::READ => {
                    let (id, chunk, total) =
                        wire::decode_xfer(body, &mut self.pieces).map_err(wire::bad)?;
                    let verdict = self.check();
                    if ty == wire::WRITE {
                        self.write(s, id, chunk, total, verdict, &mut idle)?;
                    } else {
                        self.read(s, id, chunk, total, verdict, &mut idle)?;
                    }
                    self.holds.clear();
                }
                wire::SPAN_WRITE | wire::SPAN_READ => {
                    let x = wire::decode_spans(body, &mut self.spans).map_err(wire::bad)?;
                    let verdict = self.check_hull(&x);
                    if ty == wire::SPAN_WRITE {
                        self.write(s, x.id, x.chunk, x.total, verdict, &mut idle)?;
                    } else {
                        self.read(s, x.id, x.chunk, x.total, verdict, &mut idle)?;
                    }
                    self.holds.clear();
                }
                wire::NOTIF => {
                    let (id, msg) = wire::decode_notif(body).map_err(wire::bad)?;
                    match self.shared.target.deliver(&self.peer, msg.to_vec()) {
                        Ok(()) => wire::ack(&mut self.out, id, u32::MAX, Status::Ok, ""),
                        Err(full) => wire::ack(
                            &mut self.out,
                            id,
                            u32::MAX,
                            Status::Denied,
                            &full.to_string(),
                        ),
                    }
                    net::send_all(s, &self.out)?;
                }
                t => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("frame type {t} on a data connection"),
                    ))
                }
            }
        }
    }

    /// Returns once a frame's first bytes are here (or the stream ended), marked idle in
    /// `waiting` meanwhile, and busy again before a byte is taken off the socket: what
    /// [`Server::peer_idle`] reads. Gives up as a read between frames does (shutdown, idle).
    fn await_frame(&self, s: &Link, waiting: &AtomicBool) -> io::Result<()> {
        if s.pending() {
            return Ok(());
        }
        waiting.store(true, Ordering::SeqCst);
        let mut idle = Idle::new(self.shared, self.shared.cfg.idle_timeout);
        let fd = s.socket().as_raw_fd();
        let res = loop {
            let mut b = 0u8;
            // SAFETY: peeks at most one byte into `b`; the socket is ours and open. It blocks
            // for at most the socket's read timeout (TICK).
            let r = unsafe { libc::recv(fd, (&mut b as *mut u8).cast(), 1, libc::MSG_PEEK) };
            if r >= 0 {
                // Bytes, or the end of the stream (the frame read reports it).
                break Ok(());
            }
            let e = io::Error::last_os_error();
            match net::retry(&e) {
                Some(true) => {
                    if let Err(e) = idle.blocked(false) {
                        break Err(e);
                    }
                }
                Some(false) => {}
                None => break Err(e),
            }
        };
        waiting.store(false, Ordering::SeqCst);
        res
    }

    /// Checks every piece against the registrations; holds the regions while the data moves.
    fn check(&mut self) -> std::result::Result<(), String> {
        self.spans.clear();
        self.holds.clear();
        for (i, p) in self.pieces.iter().enumerate() {
            match self
                .shared
                .target
                .check(MemKind::Dram, &Desc::new(p.addr, p.len, 0), p.key)
            {
                Ok(access) => {
                    self.holds.push(access);
                    self.spans.push(Span {
                        addr: p.addr,
                        len: p.len,
                    });
                }
                Err(denied) => {
                    self.holds.clear();
                    metrics::counter!("nixl_tcp_denied_total").increment(1);
                    tracing::warn!(agent = %self.shared.target.name(), peer = %self.peer,
                        piece = i, "tcp: refused remote access: {denied}");
                    return Err(format!("piece {i} ({:#x}+{}): {denied}", p.addr, p.len));
                }
            }
        }
        Ok(())
    }

    /// Checks a SPAN frame: every span lies in `lo..hi` (the decoder checked), so one check that
    /// a region registered with `key` holds all of `lo..hi` covers them all; holds that region
    /// while the data moves.
    fn check_hull(&mut self, x: &wire::SpanXfer) -> std::result::Result<(), String> {
        self.holds.clear();
        if self.spans.is_empty() {
            return Ok(());
        }
        let desc = Desc::new(x.lo, x.hi - x.lo, 0);
        match self.shared.target.check(MemKind::Dram, &desc, x.key) {
            Ok(access) => {
                self.holds.push(access);
                Ok(())
            }
            Err(denied) => {
                self.spans.clear();
                metrics::counter!("nixl_tcp_denied_total").increment(1);
                tracing::warn!(agent = %self.shared.target.name(), peer = %self.peer,
                    bytes = x.total, "tcp: refused remote access: {denied}");
                Err(format!(
                    "spans in {:#x}..{:#x} (key {:#x}): {denied}",
                    x.lo, x.hi, x.key
                ))
            }
        }
    }

    fn write(
        &mut self,
        s: &Link,
        id: u64,
        chunk: u32,
        total: u64,
        verdict: std::result::Result<(), String>,
        idle: &mut Idle<'_>,
    ) -> io::Result<()> {
        match verdict {
            Ok(()) => {
                // SAFETY: every span was checked to lie inside a registered DRAM region of this
                // agent, and `holds` keeps those regions registered (deregistration waits) until
                // the read returns. Registered memory is lent to peers by contract
                // (`Agent::register`), so no Rust reference of ours aliases it.
                unsafe { net::read_spans(s, &self.spans, &mut self.iov, idle)? };
                metrics::counter!("nixl_tcp_bytes_in_total").increment(total);
                // A peer's WRITE: these bytes arrived at this agent.
                metrics::counter!("nixl_agent_rx_bytes_total").increment(total);
                wire::ack(&mut self.out, id, chunk, Status::Ok, "");
            }
            Err(why) => {
                net::discard(s, total, &mut self.scratch, idle)?;
                wire::ack(&mut self.out, id, chunk, Status::Denied, &why);
            }
        }
        net::send_all(s, &self.out)
    }

    fn read(
        &mut self,
        s: &Link,
        id: u64,
        chunk: u32,
        total: u64,
        verdict: std::result::Result<(), String>,
        idle: &mut Idle<'_>,
    ) -> io::Result<()> {
        match verdict {
            Ok(()) => {
                wire::data(&mut self.out, id, chunk, Status::Ok, total, "");
                // SAFETY: as in `write`: checked, held registered memory, read only.
                unsafe { net::write_spans(s, &self.out, &self.spans, &mut self.iov, idle)? };
                metrics::counter!("nixl_tcp_bytes_out_total").increment(total);
                // A peer's READ: these bytes left this agent.
                metrics::counter!("nixl_agent_tx_bytes_total").increment(total);
                Ok(())
            }
            Err(why) => {
                wire::data(&mut self.out, id, chunk, Status::Denied, 0, &why);
                net::send_all(s, &self.out)
            }
        }
    }
}
