//! The target side: a listener, and one thread per accepted connection that authenticates it and
//! then carries out its frames in order against the agent's registrations.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{BackendName, Desc, Error, MemKind, RegionAccess, Result, TargetHandle};
use parking_lot::Mutex;

use super::net::{self, Link, OnBlock, Span};
use super::wire::{self, Piece, Purpose, Status};
use super::{auth, TcpConfig};
use crate::control::Services;

/// How often a blocked read or write wakes up to check the clock and the shutdown flag.
pub(super) const TICK: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Shared {
    cfg: Arc<TcpConfig>,
    target: TargetHandle,
    host: Vec<(String, IpAddr)>,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
    shut: AtomicBool,
    services: Arc<Services>,
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
        if cfg.auth.allow_open() && !cfg.auth.has_secret() {
            tracing::warn!(agent = %target.name(), %bound,
                "tcp listener accepts unauthenticated connections from any host (allow_open)");
        }
        tracing::info!(agent = %target.name(), ?published, secret = cfg.auth.has_secret(),
            "tcp listening");
        let shared = Arc::new(Shared {
            cfg,
            target,
            host,
            conns: Mutex::new(HashMap::new()),
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

    /// Stops accepting and drops every connection (their threads end soon after).
    pub(super) fn stop(&self) {
        self.shared.shut.store(true, Ordering::Release);
        // SAFETY: shutdown on our own listening socket only wakes the blocked accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for (_, c) in self.shared.conns.lock().drain() {
            let _ = c.shutdown(Shutdown::Both);
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
                let sh = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("nixl-tcp-serve".into())
                    .spawn(move || serve(sh, s, peer));
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

/// Reads give up mid-frame once the peer has been silent for `io_timeout`; between frames they
/// wait for as long as the connection lives.
struct Idle<'a> {
    shared: &'a Shared,
    since: Instant,
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

fn serve(shared: Arc<Shared>, mut s: TcpStream, peer: SocketAddr) {
    let id = shared.next.fetch_add(1, Ordering::Relaxed);
    if let Ok(c) = s.try_clone() {
        shared.conns.lock().insert(id, c);
    }
    let res = serve_inner(&shared, &mut s, peer);
    shared.conns.lock().remove(&id);
    let _ = s.shutdown(Shutdown::Both);
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

fn serve_inner(shared: &Shared, s: &mut TcpStream, peer: SocketAddr) -> io::Result<()> {
    let cfg = &shared.cfg;
    net::tune(s, cfg.socket_buffer)?;
    // The whole handshake, up to the OPEN frame, within one deadline.
    let deadline = Instant::now() + cfg.handshake_timeout;
    let me = (shared.target.name(), shared.target.instance_id());
    let local = |ip| net::is_local(ip, &shared.host);
    let (link, proven) = match auth::accept(s.try_clone()?, &cfg.auth, peer, local, me, deadline) {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!("nixl_tcp_auth_failures_total").increment(1);
            tracing::warn!(agent = %shared.target.name(), %peer, "tcp: {e}");
            return Ok(());
        }
    };
    let s = &link;
    let mut body = Vec::new();
    let ty = net::read_frame(s, &mut body, wire::frame_limit, &mut Deadline(deadline))?;
    if ty != wire::OPEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected OPEN, got frame type {ty}"),
        ));
    }
    let open = wire::decode_open(&body).map_err(wire::bad)?;
    let me = shared.target.instance_id();
    let mut out = Vec::with_capacity(256);
    // With a secret the handshake proved who the initiator is: the OPEN frame may not claim
    // anyone else.
    if let Some(p) = proven.filter(|p| p.name != open.name || p.instance != open.instance) {
        tracing::warn!(agent = %shared.target.name(), %peer, proven = %p.name, claimed = %open.name,
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
    if open.expect != 0 && open.expect != me {
        wire::opened(
            &mut out,
            Status::Denied,
            me,
            "this agent restarted: load its new metadata",
        );
        net::send_all(s, &out)?;
        return Ok(());
    }
    wire::opened(&mut out, Status::Ok, me, shared.target.name());
    net::send_all(s, &out)?;
    s.set_deadline(None);
    net::read_timeout(s, TICK)?;
    net::write_timeout(s, TICK, cfg.io_timeout)?;
    match open.purpose {
        Purpose::Metadata => serve_metadata(shared, s, &mut body, &mut out),
        Purpose::Control => serve_control(shared, s, &open.name, &mut body, &mut out),
        Purpose::Data => Worker::new(shared, open.name).run(s, &mut body),
    }
}

fn serve_metadata(
    shared: &Shared,
    s: &Link,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        let mut idle = Idle {
            shared,
            since: Instant::now(),
        };
        let ty = net::read_frame(s, body, wire::frame_limit, &mut idle)?;
        match ty {
            wire::MD_GET => match shared.target.local_metadata() {
                Ok(md) => wire::md(out, Status::Ok, &md),
                Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
            },
            wire::MD_PUSH => {
                let mut r = nixl_core::codec::Reader::new(body);
                let md = r.blob("metadata").map_err(wire::bad)?;
                match shared.target.load_pushed(md) {
                    Ok(name) => {
                        tracing::info!(agent = %shared.target.name(), peer = %name,
                            "loaded pushed metadata");
                        wire::md(out, Status::Ok, name.as_bytes());
                    }
                    Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
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

/// Answers control requests for other backends' services, one at a time, until the peer closes.
fn serve_control(
    shared: &Shared,
    s: &Link,
    peer: &str,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        let mut idle = Idle {
            shared,
            since: Instant::now(),
        };
        let ty = net::read_frame(s, body, wire::frame_limit, &mut idle)?;
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

    fn run(mut self, s: &Link, body: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let mut idle = Idle {
                shared: self.shared,
                since: Instant::now(),
            };
            let ty = net::read_frame(s, body, wire::frame_limit, &mut idle)?;
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
                wire::NOTIF => {
                    let (id, msg) = wire::decode_notif(body).map_err(wire::bad)?;
                    self.shared.target.deliver(&self.peer, msg.to_vec());
                    wire::ack(&mut self.out, id, u32::MAX, Status::Ok, "");
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
                Ok(())
            }
            Err(why) => {
                wire::data(&mut self.out, id, chunk, Status::Denied, 0, &why);
                net::send_all(s, &self.out)
            }
        }
    }
}
