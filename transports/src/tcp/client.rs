//! The initiator side: sessions of several connections per peer, chunked and pipelined posts.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use nixl_core::{Completion, Connection, Error, PreparedXfer, Result, Runs, XferPlan};
use parking_lot::{Condvar, Mutex};

use super::client_plan::{cut_runs, make_plan, Body, Plan};
use super::client_post::{Done, Post, Waiter};
use super::client_session::Session;
use super::client_setup::open_stream;
use super::config::TcpConfig;
use super::identity::PeerIdentity;
use super::net::{self, connect_any, peer_err, Link};
use super::server::TICK;
use super::wire::{self, Purpose, Status};

/// A connection (in the core's sense) to one peer: a session of sockets, remade when it fails.
pub(super) struct Conn {
    pub(super) cfg: Arc<TcpConfig>,
    me: Arc<str>,
    my_instance: u128,
    pub(super) peer: String,
    peer_instance: u128,
    addrs: Vec<SocketAddr>,
    backend_shut: Arc<AtomicBool>,
    session: Mutex<Option<Arc<Session>>>,
    closed: Mutex<Option<Error>>,
    /// Posted notifications waiting for a session that a thread of its own is opening, in
    /// order; `true` while that thread runs (later ones queue behind, to keep the order).
    backlog: Mutex<(Vec<Vec<u8>>, bool)>,
    this: Weak<Conn>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tcp::Conn")
            .field("peer", &self.peer)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(super) fn new(
        cfg: Arc<TcpConfig>,
        me: Arc<str>,
        my_instance: u128,
        peer: String,
        peer_instance: u128,
        addrs: Vec<SocketAddr>,
        backend_shut: Arc<AtomicBool>,
    ) -> Arc<Conn> {
        Arc::new_cyclic(|this| Conn {
            cfg,
            me,
            my_instance,
            peer,
            peer_instance,
            addrs,
            backend_shut,
            session: Mutex::new(None),
            closed: Mutex::new(None),
            backlog: Mutex::new((Vec::new(), false)),
            this: this.clone(),
        })
    }

    /// Opens the session now, so that an unreachable or refusing peer is reported at once.
    pub(super) fn warm_up(&self) -> Result<()> {
        self.session().map(drop)
    }

    fn session(&self) -> Result<Arc<Session>> {
        if let Some(e) = self.closed.lock().clone() {
            return Err(e);
        }
        if self.backend_shut.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        let mut g = self.session.lock();
        if let Some(s) = g.as_ref() {
            if s.state.lock().failed.is_none() {
                return Ok(Arc::clone(s));
            }
        }
        let s = Session::open(self)?;
        *g = Some(Arc::clone(&s));
        Ok(s)
    }

    /// Opens the session and queues the posted notifications that waited for it, in order (or
    /// drops them, logged, if it cannot be opened).
    fn send_backlog(&self) {
        let sess = self.session();
        let mut backlog = self.backlog.lock();
        let msgs = std::mem::take(&mut backlog.0);
        backlog.1 = false;
        match sess {
            Ok(sess) => msgs.iter().for_each(|m| submit_notif(&sess, m)),
            Err(e) => tracing::warn!(peer = %self.peer, error = %e, dropped = msgs.len(),
                "tcp: posted notifications not sent"),
        }
    }

    /// Ends the connection for good: what is in flight ends with `e`, later posts fail with it.
    pub(super) fn fail(&self, e: Error) {
        self.closed.lock().get_or_insert(e.clone());
        if let Some(s) = self.session.lock().take() {
            s.fail(e);
        }
    }

    pub(super) fn open_lane(&self) -> Result<Link> {
        let cfg = &self.cfg;
        let s = connect_any(&self.addrs, cfg.connect_timeout).map_err(|e| {
            if e.kind() == io::ErrorKind::TimedOut {
                tracing::warn!(peer = %self.peer, error = %e, "tcp connect timed out");
                Error::TimedOut
            } else {
                peer_err(&self.peer, &e)
            }
        })?;
        let io_err = |e: io::Error| peer_err(&self.peer, &e);
        net::tune(&s, cfg.socket_buffer).map_err(io_err)?;
        let deadline = Instant::now() + cfg.connect_timeout;
        let me = PeerIdentity::new(&*self.me, self.my_instance);
        let (s, o) = open_stream(
            s,
            &cfg.auth,
            Purpose::Data,
            &me,
            (&self.peer, self.peer_instance),
            deadline,
            &self.peer,
        )?;
        if o.status == Status::Ok && o.text != self.peer {
            // The listener proved another name: the metadata that sent us here (from etcd, a
            // push, a file) does not describe who answers at its address.
            return Err(Error::Denied {
                peer: self.peer.clone(),
                reason: format!(
                    "the listener at {} is agent '{}', not '{}'",
                    s.socket()
                        .peer_addr()
                        .map_or_else(|_| "?".into(), |a| a.to_string()),
                    o.text,
                    self.peer
                ),
            });
        }
        if o.status != Status::Ok || o.instance != self.peer_instance {
            return Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: if o.status == Status::Ok {
                    "the peer restarted: load its new metadata".into()
                } else {
                    o.text
                },
            });
        }
        s.set_deadline(None);
        net::read_timeout(&s, TICK).map_err(io_err)?;
        net::write_timeout(&s, TICK, cfg.io_timeout).map_err(io_err)?;
        Ok(s)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(s) = self.session.get_mut().take() {
            s.fail(Error::Cancelled);
        }
    }
}

pub(super) fn give_up(_: bool) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
}

#[derive(Debug)]
struct TcpXfer {
    conn: Arc<Conn>,
    plan: Arc<Plan>,
}

impl PreparedXfer for TcpXfer {
    fn post(&self, done: Completion) {
        let sess = match self.conn.session() {
            Ok(s) => s,
            Err(e) => {
                done.complete(Err(e));
                return;
            }
        };
        let post = Arc::new(Post::new(
            sess.next_id.fetch_add(1, Ordering::Relaxed),
            Some(Arc::clone(&self.plan)),
            None,
            self.plan.chunks.len(),
            Some(Done::Xfer(done)),
        ));
        sess.submit(post);
    }

    fn cancel(&self) {
        // The core marked the post ended: let its memory go now unless a lane thread is inside
        // it (that thread lets go as it leaves). Its remaining answers are thrown away.
        let Some(sess) = self.conn.session.lock().clone() else {
            return;
        };
        let posts: Vec<Arc<Post>> = sess
            .state
            .lock()
            .pending
            .values()
            .filter(|p| p.plan.as_ref().is_some_and(|x| Arc::ptr_eq(x, &self.plan)))
            .cloned()
            .collect();
        for p in posts {
            p.let_go_if_abandoned();
        }
    }
}

impl Connection for Conn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let conn = self
            .this
            .upgrade()
            .ok_or_else(|| Error::InvalidArgument("tcp connection is gone".into()))?;
        check_notif(plan.notif.as_deref())?;
        let plan = Arc::new(make_plan(&plan, self.cfg.chunk_bytes as u64));
        Ok(Box::new(TcpXfer { conn, plan }))
    }

    fn prepare_runs(&self, mut plan: XferPlan, runs: Runs) -> Result<Box<dyn PreparedXfer>> {
        // SPAN frames only to a listener that takes them (its hello said so); else the runs
        // go as segments, in WRITE and READ frames.
        let spans = self.session().is_ok_and(|s| s.spans);
        let key = plan.remote_regions.first().map(|r| r.key);
        let (true, Some(key)) = (spans, key) else {
            plan.segments = runs.to_segments();
            return self.prepare(plan);
        };
        let conn = self
            .this
            .upgrade()
            .ok_or_else(|| Error::InvalidArgument("tcp connection is gone".into()))?;
        check_notif(plan.notif.as_deref())?;
        let (runs, chunks) = cut_runs(runs.runs, self.cfg.chunk_bytes as u64);
        let plan = Arc::new(Plan {
            op: plan.op,
            body: Body::Runs { runs, key },
            chunks,
            notif: plan.notif,
        });
        Ok(Box::new(TcpXfer { conn, plan }))
    }

    fn post_notif(&self, _from: &str, msg: &[u8]) -> Result<()> {
        check_notif(Some(msg))?;
        if let Some(e) = self.closed.lock().clone() {
            return Err(e);
        }
        // No one waits: the post ends when its ACK comes (a refusal is only logged). Without a
        // live session, connecting (up to `connect_timeout`) is left to a thread of its own, so
        // that the caller never waits on the peer; messages keep their order.
        let mut backlog = self.backlog.lock();
        if !backlog.1 {
            let live = self.session.lock().clone();
            if let Some(sess) = live.filter(|s| s.state.lock().failed.is_none()) {
                submit_notif(&sess, msg);
                return Ok(());
            }
        }
        backlog.0.push(msg.to_vec());
        if !backlog.1 {
            let conn = self.this.upgrade().ok_or(Error::Cancelled)?;
            std::thread::Builder::new()
                .name("nixl-tcp-notif".into())
                .spawn(move || conn.send_backlog())
                .map_err(|e| Error::io("spawn tcp notification thread", e))?;
            backlog.1 = true;
        }
        Ok(())
    }

    fn send_notif(&self, _from: &str, msg: &[u8]) -> Result<()> {
        check_notif(Some(msg))?;
        let sess = self.session()?;
        let waiter = Arc::new(Waiter {
            result: Mutex::new(None),
            cv: Condvar::new(),
        });
        let post = Arc::new(Post::new(
            sess.next_id.fetch_add(1, Ordering::Relaxed),
            None,
            Some(msg.to_vec()),
            1,
            Some(Done::Wait(Arc::clone(&waiter))),
        ));
        sess.submit(post);
        let deadline = Instant::now() + self.cfg.io_timeout * 2;
        let mut r = waiter.result.lock();
        while r.is_none() {
            if waiter.cv.wait_until(&mut r, deadline).timed_out() {
                return Err(Error::TimedOut);
            }
        }
        r.take().unwrap_or(Err(Error::TimedOut))
    }

    fn close(&self) {
        self.fail(Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: "the peer was invalidated".into(),
        });
    }
}

/// Queues a notification nobody waits for on `sess`.
fn submit_notif(sess: &Session, msg: &[u8]) {
    let post = Arc::new(Post::new(
        sess.next_id.fetch_add(1, Ordering::Relaxed),
        None,
        Some(msg.to_vec()),
        1,
        None,
    ));
    sess.submit(post);
}

/// Refuses a notification over the one limit.
fn check_notif(msg: Option<&[u8]>) -> Result<()> {
    match msg {
        Some(n) if n.len() > wire::MAX_NOTIF => Err(Error::InvalidArgument(format!(
            "notification of {} bytes is over the {} byte limit",
            n.len(),
            wire::MAX_NOTIF
        ))),
        _ => Ok(()),
    }
}
