//! One accepted connection: its handshake and OPEN within deadlines, and the reading of its
//! frames within their limits.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth;
use super::identity::PeerIdentity;
use super::net::{self, Link, OnBlock};
use super::server::{DataConn, DataEntry, Reserved, Shared, Slot, SMALL_FRAME, TICK};
use super::server_control::{serve_control, serve_metadata};
use super::server_worker::Worker;
use super::wire::{self, Purpose, Status};

/// Reads give up mid-frame once the peer has been silent for `io_timeout`, and between frames
/// once it has sent nothing for `idle` (the OPEN after authentication: `connect_timeout`; later
/// frames: `idle_timeout`).
pub(super) struct Idle<'a> {
    shared: &'a Shared,
    since: Instant,
    waiting: Instant,
    idle: Duration,
}

impl<'a> Idle<'a> {
    pub(super) fn new(shared: &'a Shared, idle: Duration) -> Idle<'a> {
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

/// A connection past its handshake, its socket registered for
/// [`Server::stop`](super::server::Server::stop) to shut down. Dropping it removes the entry
/// (under the lock) before the socket is closed, so every fd in the map is open.
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

pub(super) fn serve(shared: Arc<Shared>, s: TcpStream, peer: SocketAddr, slot: Slot) {
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
    // A data connection is in `data` (busy) before the peer learns it is open: a READ it sends
    // the moment OPENED arrives is counted by `peer_idle` and ended by a fence from then on.
    // The entry leaves (DataEntry's drop) on every way out below.
    let waiting = Arc::new(AtomicBool::new(false));
    let _entry = (open.purpose == Purpose::Data).then(|| {
        shared.data.lock().insert(
            served.id,
            DataConn {
                peer: Arc::from(who.name.as_str()),
                waiting: Arc::clone(&waiting),
                fd: s.socket().as_raw_fd(),
            },
        );
        DataEntry(shared, served.id)
    });
    wire::opened(&mut out, Status::Ok, me, shared.target.name());
    net::send_all(s, &out)?;
    s.set_deadline(None);
    net::read_timeout(s, TICK)?;
    net::write_timeout(s, TICK, cfg.io_timeout)?;
    let frames = Frames::new(shared, Some(open.purpose));
    match open.purpose {
        Purpose::Metadata => serve_metadata(shared, s, frames, &who, &mut body, &mut out),
        Purpose::Control => serve_control(shared, s, frames, &who.name, &mut body, &mut out),
        Purpose::Data => Worker::new(shared, who.name).run(s, frames, &mut body, &waiting),
    }
}

/// Reads the frames of one connection: only those of its purpose, each within its size limit
/// (see [`wire::purpose_limit`]), bodies over [`SMALL_FRAME`] only within the listener's frame
/// memory budget, each held until the next frame is asked for.
pub(super) struct Frames<'a> {
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
    pub(super) fn next(&mut self, s: &Link, body: &mut Vec<u8>) -> io::Result<u8> {
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
