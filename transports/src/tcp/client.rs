//! The initiator side: sessions of several connections per peer, chunked and pipelined posts.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nixl_core::{
    BackendName, Completion, Connection, Error, PreparedXfer, Result, Run, Runs, XferOp, XferPlan,
};
use parking_lot::{Condvar, Mutex};

use super::auth::{self, AuthError};
use super::identity::PeerIdentity;
use super::net::{self, Link, OnBlock, Span};
use super::server::TICK;
use super::wire::{self, Piece, Purpose, Status};
use super::{connect_any, peer_err, TcpConfig};

/// Chunk index that marks the acknowledgement of a notification.
const NOTIF_CHUNK: u32 = u32::MAX;

/// A connection (in the core's sense) to one peer: a session of sockets, remade when it fails.
pub(super) struct Conn {
    cfg: Arc<TcpConfig>,
    me: Arc<str>,
    my_instance: u128,
    peer: String,
    peer_instance: u128,
    addrs: Vec<SocketAddr>,
    backend_shut: Arc<AtomicBool>,
    session: Mutex<Option<Arc<Session>>>,
    closed: Mutex<Option<Error>>,
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

    /// Ends the connection for good: what is in flight ends with `e`, later posts fail with it.
    pub(super) fn fail(&self, e: Error) {
        self.closed.lock().get_or_insert(e.clone());
        if let Some(s) = self.session.lock().take() {
            s.fail(e);
        }
    }

    fn open_lane(&self) -> Result<Link> {
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

fn give_up(_: bool) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
}

/// A post's transfer, prepared once.
#[derive(Debug)]
struct Plan {
    op: XferOp,
    body: Body,
    chunks: Vec<Chunk>,
    notif: Option<Vec<u8>>,
}

/// The pieces of a plan; a [`Chunk`] indexes into them.
#[derive(Debug)]
enum Body {
    /// A local span and a remote piece (any region) per piece: WRITE and READ frames.
    Pieces {
        local: Vec<Span>,
        remote: Vec<Piece>,
    },
    /// The core's runs (one remote region, `key`), kept as they came: SPAN_WRITE and SPAN_READ
    /// frames of 12 bytes a span, the local side read and written straight from the runs.
    Runs { runs: Vec<Run>, key: u64 },
}

/// A chunk's local memory, of either body.
#[derive(Clone, Copy)]
enum Local<'a> {
    Spans(&'a [Span]),
    Runs(&'a [Run]),
}

impl Plan {
    fn local(&self, c: Chunk) -> Local<'_> {
        let r = c.start as usize..c.end as usize;
        match &self.body {
            Body::Pieces { local, .. } => Local::Spans(&local[r]),
            Body::Runs { runs, .. } => Local::Runs(&runs[r]),
        }
    }

    /// Writes the frame that asks for chunk `idx` of post `id` into `out`; returns whether it
    /// is a WRITE (its data follows it). `spans`: the lane's listener takes SPAN frames; a
    /// plan of runs cannot be sent without them.
    fn frame(&self, out: &mut Vec<u8>, id: u64, idx: u32, spans: bool) -> io::Result<bool> {
        let c = self.chunks[idx as usize];
        let write = self.op == XferOp::Write;
        let r = c.start as usize..c.end as usize;
        match &self.body {
            Body::Pieces { remote, .. } => {
                let ty = if write { wire::WRITE } else { wire::READ };
                wire::xfer_head(out, ty, id, idx, c.end - c.start);
                for p in &remote[r] {
                    wire::put_piece(out, p);
                }
            }
            Body::Runs { runs, key } => {
                if !spans {
                    return Err(io::Error::other(
                        "the peer's listener no longer takes SPAN frames (it was replaced by \
                         an older version): prepare the request again",
                    ));
                }
                let ty = if write {
                    wire::SPAN_WRITE
                } else {
                    wire::SPAN_READ
                };
                wire::span_head(out, ty, id, idx, *key, c.end - c.start);
                for run in &runs[r] {
                    // Runs are cut to at most a chunk (`cut_runs`), under u32::MAX.
                    wire::put_span(out, run.remote, run.len as u32);
                }
            }
        }
        wire::finish(out);
        Ok(write)
    }
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    start: u32,
    end: u32,
    bytes: u64,
}

fn make_plan(p: &XferPlan, chunk_bytes: u64) -> Plan {
    let mut local = Vec::with_capacity(p.segments.len());
    let mut remote = Vec::with_capacity(p.segments.len());
    let mut chunks = Vec::new();
    let mut start = 0u32;
    let mut bytes = 0u64;
    for seg in &p.segments {
        let key = p.remote_regions[seg.remote_region as usize].key;
        let mut off = 0u64;
        while off < seg.local.len {
            let take = (seg.local.len - off).min(chunk_bytes - bytes);
            local.push(Span {
                addr: seg.local.addr + off,
                len: take,
            });
            remote.push(Piece {
                addr: seg.remote.addr + off,
                len: take,
                key,
            });
            off += take;
            bytes += take;
            if bytes == chunk_bytes || local.len() - start as usize == wire::MAX_PIECES {
                chunks.push(Chunk {
                    start,
                    end: local.len() as u32,
                    bytes,
                });
                start = local.len() as u32;
                bytes = 0;
            }
        }
    }
    if (start as usize) < local.len() {
        chunks.push(Chunk {
            start,
            end: local.len() as u32,
            bytes,
        });
    }
    Plan {
        op: p.op,
        body: Body::Pieces { local, remote },
        chunks,
        notif: p.notif.clone(),
    }
}

/// Cuts runs into chunks of SPAN frames: a chunk ends before the run that would take it over
/// `chunk_bytes` or past [`wire::MAX_SPANS`] spans; a run longer than `chunk_bytes` is first cut
/// into pieces of `chunk_bytes` (a new list only then: blocks of a KV cache never are), and
/// empty runs are dropped. The runs' order is kept.
fn cut_runs(mut runs: Vec<Run>, chunk_bytes: u64) -> (Vec<Run>, Vec<Chunk>) {
    if runs.iter().any(|r| r.len > chunk_bytes || r.len == 0) {
        let mut cut = Vec::with_capacity(runs.len());
        for r in &runs {
            let mut off = 0;
            while off < r.len {
                let len = (r.len - off).min(chunk_bytes);
                cut.push(Run {
                    local: r.local + off,
                    remote: r.remote + off,
                    len,
                });
                off += len;
            }
        }
        runs = cut;
    }
    let mut chunks = Vec::with_capacity(runs.len() / 64 + 1);
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, r) in runs.iter().enumerate() {
        if i > start && (bytes + r.len > chunk_bytes || i - start == wire::MAX_SPANS) {
            chunks.push(Chunk {
                start: start as u32,
                end: i as u32,
                bytes,
            });
            (start, bytes) = (i, 0);
        }
        bytes += r.len;
    }
    if start < runs.len() {
        chunks.push(Chunk {
            start: start as u32,
            end: runs.len() as u32,
            bytes,
        });
    }
    (runs, chunks)
}

struct Waiter {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

enum Done {
    Xfer(Completion),
    Wait(Arc<Waiter>),
}

/// One execution of a plan (or a standalone notification) on a session.
///
/// A post ends when its last holder lets go of it ([`Drop`]): the session's tables, the job
/// queues, the record of what a lane has sent, and the lane threads that read into or write from
/// its memory all hold it. So whatever the peer answers, and whenever the session fails, the
/// post's completion (which releases its memory to the caller) comes after every thread that
/// touches that memory is done with it.
struct Post {
    id: u64,
    plan: Option<Arc<Plan>>,
    msg: Option<Vec<u8>>,
    left: AtomicUsize,
    in_notif: AtomicBool,
    error: Mutex<Option<Error>>,
    done: Mutex<Option<Done>>,
    /// Lane threads inside the post's local memory now (reading DATA into it, writing it out).
    users: AtomicUsize,
    /// The post was abandoned and its completion let go before every answer came (see
    /// [`Post::let_go_if_abandoned`]).
    let_go: AtomicBool,
}

impl Post {
    fn new(
        id: u64,
        plan: Option<Arc<Plan>>,
        msg: Option<Vec<u8>>,
        left: usize,
        done: Option<Done>,
    ) -> Post {
        Post {
            id,
            in_notif: AtomicBool::new(plan.is_none()),
            plan,
            msg,
            left: AtomicUsize::new(left),
            error: Mutex::new(None),
            done: Mutex::new(done),
            users: AtomicUsize::new(0),
            let_go: AtomicBool::new(false),
        }
    }

    fn abandoned(&self) -> bool {
        self.let_go.load(Ordering::Acquire)
            || matches!(&*self.done.lock(), Some(Done::Xfer(c)) if c.is_abandoned())
    }

    /// Enters the post's local memory: false once the post was abandoned (cancelled, past its
    /// deadline), when its memory must not be touched any more.
    fn enter_mem(&self) -> bool {
        let d = self.done.lock();
        match &*d {
            Some(Done::Xfer(c)) if !c.is_abandoned() => {
                self.users.fetch_add(1, Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    /// Leaves the post's local memory (after [`Post::enter_mem`]).
    fn leave_mem(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.let_go_if_abandoned();
        }
    }

    /// An abandoned post lets go of its memory (its completion: the core's holds on the local
    /// regions) as soon as no lane thread is inside that memory, without waiting for the
    /// peer's remaining answers: their DATA is read and thrown away as it comes. So a READ
    /// that ran past its deadline lets go in about one socket read, however much of it the
    /// target had already queued.
    ///
    /// Only READs let go early: a WRITE's chunks already sent still land in the peer's memory,
    /// so an abandoned WRITE keeps its completion until every sent chunk is answered (chunks
    /// not yet sent are skipped): freeing or deregistering it returns only once it can no
    /// longer change the peer's memory.
    fn let_go_if_abandoned(&self) {
        let read = self.plan.as_ref().is_some_and(|p| p.op == XferOp::Read);
        let taken = {
            let mut d = self.done.lock();
            match &*d {
                Some(Done::Xfer(c))
                    if read && c.is_abandoned() && self.users.load(Ordering::Acquire) == 0 =>
                {
                    self.let_go.store(true, Ordering::Release);
                    d.take()
                }
                _ => None,
            }
        };
        if let Some(Done::Xfer(c)) = taken {
            // The post already ended (cancelled or timed out): this only lets go.
            c.complete(Err(Error::Cancelled));
        }
    }

    fn notif_msg(&self) -> Option<&[u8]> {
        self.msg
            .as_deref()
            .or_else(|| self.plan.as_ref().and_then(|p| p.notif.as_deref()))
    }

    /// Records a failure (the first one wins); the post ends with it when it is let go.
    fn fail(&self, e: Error) {
        self.error.lock().get_or_insert(e);
    }
}

impl Drop for Post {
    fn drop(&mut self) {
        let outcome = match self.error.get_mut().take() {
            Some(e) => Err(e),
            None if *self.left.get_mut() == 0 => Ok(()),
            None => Err(Error::Backend {
                backend: BackendName::Tcp,
                op: "transfer",
                reason: "the request ended before every chunk was answered".into(),
            }),
        };
        match self.done.get_mut().take() {
            Some(Done::Xfer(c)) => {
                c.complete(outcome);
            }
            Some(Done::Wait(w)) => {
                *w.result.lock() = Some(outcome);
                w.cv.notify_all();
            }
            None => {
                // A posted notification nobody waits for, or a post let go early.
                if let (Err(e), false) = (outcome, self.let_go.load(Ordering::Acquire)) {
                    tracing::warn!(error = %e, "tcp: a posted notification was not delivered");
                }
            }
        }
    }
}

/// A chunk (or a notification: [`NOTIF_CHUNK`]) written on a lane and not answered yet. The
/// target answers a lane's frames in the order it reads them, so each lane's answers must match
/// its record front to back: an answer to anything else (a chunk never asked, asked on another
/// lane, answered already, or of a request that ended) is a protocol error.
struct Sent {
    post: Arc<Post>,
    chunk: u32,
}

enum Job {
    Chunk(Arc<Post>, u32),
    Notif(Arc<Post>),
}

struct State {
    /// Jobs per lane: a post's chunks are dealt round-robin, so that a request of a few chunks
    /// runs on as many connections (a sender that answers fast would otherwise take them all).
    queues: Vec<VecDeque<Job>>,
    /// Lane the next post's first chunk goes to.
    next_lane: usize,
    pending: HashMap<u64, Arc<Post>>,
    outstanding: Vec<usize>,
    /// What each lane has written and not had answered, in order.
    sent: Vec<VecDeque<Sent>>,
    /// A thread is writing on the lane (its sender, or a poster writing a small request inline).
    busy: Vec<bool>,
    failed: Option<Error>,
}

impl State {
    /// The lane with the least work waiting or unanswered.
    fn quietest(&self) -> usize {
        (0..self.queues.len())
            .min_by_key(|&i| self.queues[i].len() + self.outstanding[i])
            .unwrap_or(0)
    }
}

/// Reusable buffers of a writer: a frame header and the iovecs.
struct WriteBufs {
    hdr: Vec<u8>,
    iov: Vec<libc::iovec>,
}

impl Default for WriteBufs {
    fn default() -> Self {
        WriteBufs {
            hdr: Vec::with_capacity(64 + wire::MAX_PIECES * wire::PIECE_BYTES),
            iov: Vec::with_capacity(net::IOV_MAX),
        }
    }
}

thread_local! {
    /// The buffers a posting thread uses when it writes a small request itself.
    static INLINE_BUFS: std::cell::RefCell<WriteBufs> = std::cell::RefCell::new(WriteBufs::default());
}

/// Requests of one chunk up to this size are written by the posting thread when a connection
/// is idle, saving the hand-off to a sender thread.
const INLINE_MAX: u64 = 64 << 10;

struct Lane {
    stream: Link,
    /// Milliseconds since the session's epoch when this lane last moved a byte.
    last: AtomicU64,
}

struct Session {
    peer: String,
    /// Every lane's listener takes SPAN frames (said so in its hello).
    spans: bool,
    cfg: Arc<TcpConfig>,
    lanes: Vec<Lane>,
    state: Mutex<State>,
    cv: Condvar,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Session {
    fn open(conn: &Conn) -> Result<Arc<Session>> {
        let n = conn.cfg.conns_per_peer;
        let mut lanes = Vec::with_capacity(n);
        for _ in 0..n {
            lanes.push(Lane {
                stream: conn.open_lane()?,
                last: AtomicU64::new(0),
            });
        }
        let s = Arc::new(Session {
            peer: conn.peer.clone(),
            spans: lanes.iter().all(|l| l.stream.takes_spans()),
            cfg: Arc::clone(&conn.cfg),
            lanes,
            state: Mutex::new(State {
                queues: (0..n).map(|_| VecDeque::new()).collect(),
                next_lane: 0,
                pending: HashMap::new(),
                outstanding: vec![0; n],
                sent: (0..n).map(|_| VecDeque::new()).collect(),
                busy: vec![false; n],
                failed: None,
            }),
            cv: Condvar::new(),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
        });
        for i in 0..n {
            for tx in [true, false] {
                let s2 = Arc::clone(&s);
                let spawned = std::thread::Builder::new()
                    .name(if tx { "nixl-tcp-tx" } else { "nixl-tcp-rx" }.into())
                    .spawn(move || if tx { s2.send_loop(i) } else { s2.recv_loop(i) });
                if let Err(e) = spawned {
                    let err = Error::io("spawn tcp lane thread", e);
                    s.fail(err.clone());
                    return Err(err);
                }
            }
        }
        tracing::debug!(peer = %conn.peer, lanes = n, "tcp session open");
        Ok(s)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn submit(&self, post: Arc<Post>) {
        let mut st = self.state.lock();
        if let Some(e) = st.failed.clone() {
            drop(st);
            post.fail(e);
            return;
        }
        st.pending.insert(post.id, Arc::clone(&post));
        match &post.plan {
            Some(plan) if !post.in_notif.load(Ordering::Acquire) => {
                let small = plan.chunks.len() == 1 && plan.chunks[0].bytes <= INLINE_MAX;
                let idle = (0..self.lanes.len())
                    .find(|&i| !st.busy[i] && st.outstanding[i] < self.cfg.window);
                let idle = idle.filter(|&i| st.queues[i].is_empty());
                if let (true, Some(lane)) = (small, idle) {
                    st.busy[lane] = true;
                    st.outstanding[lane] += 1;
                    self.lanes[lane]
                        .last
                        .store(self.now_ms(), Ordering::Release);
                    drop(st);
                    INLINE_BUFS.with(|b| match b.try_borrow_mut() {
                        Ok(mut bufs) => {
                            self.send_job(lane, Job::Chunk(post, 0), &mut bufs);
                        }
                        Err(_) => {
                            self.send_job(lane, Job::Chunk(post, 0), &mut WriteBufs::default());
                        }
                    });
                    return;
                }
                let n = self.lanes.len();
                let first = st.next_lane;
                st.next_lane = (first + plan.chunks.len()) % n;
                for i in 0..plan.chunks.len() {
                    st.queues[(first + i) % n].push_back(Job::Chunk(Arc::clone(&post), i as u32));
                }
            }
            _ => {
                let lane = st.quietest();
                st.queues[lane].push_back(Job::Notif(Arc::clone(&post)));
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Fails the session: every post on it fails with `e`, each ending once the lane threads
    /// that still touch its memory have stopped (the sockets are shut down to stop them).
    fn fail(&self, e: Error) {
        let (posts, jobs, sent) = {
            let mut st = self.state.lock();
            if st.failed.is_some() {
                return;
            }
            st.failed = Some(e.clone());
            let posts: Vec<_> = st.pending.drain().map(|(_, p)| p).collect();
            (
                posts,
                std::mem::take(&mut st.queues),
                std::mem::take(&mut st.sent),
            )
        };
        self.cv.notify_all();
        if !matches!(e, Error::Cancelled) {
            tracing::warn!(peer = %self.peer, error = %e, "tcp session failed");
        }
        for l in &self.lanes {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
        for p in &posts {
            p.fail(e.clone());
        }
        // Let go outside the lock: the last holder of a post completes it.
        drop(posts);
        drop(jobs);
        drop(sent);
    }

    fn chunk_done(&self, post: &Arc<Post>, res: Result<()>) {
        if let Err(e) = res {
            post.fail(e);
        }
        if post.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let failed = post.error.lock().is_some();
        if !failed
            && !post.in_notif.load(Ordering::Acquire)
            && post.notif_msg().is_some()
            && !post.abandoned()
        {
            post.in_notif.store(true, Ordering::Release);
            post.left.store(1, Ordering::Release);
            let mut st = self.state.lock();
            if st.failed.is_none() {
                let lane = st.quietest();
                st.queues[lane].push_front(Job::Notif(Arc::clone(post)));
                drop(st);
                self.cv.notify_all();
            }
            return;
        }
        // Every chunk is answered: the post ends as its last holder (often our caller) lets go.
        let gone = self.state.lock().pending.remove(&post.id);
        drop(gone);
    }

    /// Records that `lane` is about to write `chunk` of `post`; false if the session failed.
    fn mark_sent(&self, lane: usize, post: &Arc<Post>, chunk: u32) -> bool {
        let mut st = self.state.lock();
        if st.failed.is_some() {
            return false;
        }
        st.sent[lane].push_back(Sent {
            post: Arc::clone(post),
            chunk,
        });
        true
    }

    /// What `lane` must be answered next, if anything.
    fn next_answer(&self, lane: usize) -> Option<(Arc<Post>, u32)> {
        let st = self.state.lock();
        st.sent
            .get(lane)?
            .front()
            .map(|x| (Arc::clone(&x.post), x.chunk))
    }

    /// The answer `lane` expected next has been read in full.
    fn answered(&self, lane: usize) {
        let done = {
            let mut st = self.state.lock();
            st.outstanding[lane] = st.outstanding[lane].saturating_sub(1);
            st.sent.get_mut(lane).and_then(VecDeque::pop_front)
        };
        self.cv.notify_all();
        // Outside the lock: the last holder of a post completes it.
        drop(done);
    }

    fn take_job(&self, lane: usize) -> Option<Job> {
        let mut st = self.state.lock();
        loop {
            if st.failed.is_some() {
                return None;
            }
            if st.outstanding[lane] < self.cfg.window && !st.busy[lane] {
                if let Some(j) = st.queues[lane].pop_front() {
                    st.outstanding[lane] += 1;
                    st.busy[lane] = true;
                    self.lanes[lane]
                        .last
                        .store(self.now_ms(), Ordering::Release);
                    return Some(j);
                }
            }
            self.cv.wait(&mut st);
        }
    }

    fn lane_reply(&self, lane: usize) {
        let mut st = self.state.lock();
        st.outstanding[lane] = st.outstanding[lane].saturating_sub(1);
        drop(st);
        self.cv.notify_all();
    }

    fn send_loop(self: Arc<Self>, lane: usize) {
        let mut bufs = WriteBufs::default();
        while let Some(job) = self.take_job(lane) {
            if !self.send_job(lane, job, &mut bufs) {
                return;
            }
        }
    }

    /// Writes one job on `lane` (which the caller has claimed: `busy[lane]` set, counted in
    /// `outstanding`), then frees the lane. False if the session failed.
    fn send_job(&self, lane: usize, job: Job, bufs: &mut WriteBufs) -> bool {
        let s = &self.lanes[lane].stream;
        let (hdr, iov) = (&mut bufs.hdr, &mut bufs.iov);
        let res = match &job {
            Job::Chunk(post, idx) if post.abandoned() => {
                self.release(lane);
                self.lane_reply(lane);
                self.chunk_done(post, Err(Error::Cancelled));
                return true;
            }
            Job::Chunk(post, idx) => {
                let plan = post.plan.as_ref().expect("chunk jobs have a plan");
                let inside = match plan.frame(hdr, post.id, *idx, s.takes_spans()) {
                    Ok(write) => write,
                    Err(e) => {
                        // Nothing was written: the chunk fails, the session goes on.
                        self.release(lane);
                        self.lane_reply(lane);
                        self.chunk_done(
                            post,
                            Err(Error::Backend {
                                backend: BackendName::Tcp,
                                op: "transfer",
                                reason: e.to_string(),
                            }),
                        );
                        return true;
                    }
                };
                let c = plan.chunks[*idx as usize];
                let data = if inside {
                    plan.local(c)
                } else {
                    Local::Spans(&[])
                };
                if inside && !post.enter_mem() {
                    // Abandoned since the check above: as there, nothing is sent.
                    self.release(lane);
                    self.lane_reply(lane);
                    self.chunk_done(post, Err(Error::Cancelled));
                    return true;
                }
                if !self.mark_sent(lane, post, *idx) {
                    if inside {
                        post.leave_mem();
                    }
                    self.release(lane);
                    return false;
                }
                let on = &mut LaneIdle(self, lane);
                // SAFETY: the local spans lie in regions the core validated at prepare and
                // holds for as long as the post's completion lives; the completion is not let
                // go while a thread is inside the memory (`enter_mem` above, for WRITE data).
                // The memory is only read.
                let r = unsafe {
                    match data {
                        Local::Spans(x) => net::write_spans(s, hdr, x, iov, on),
                        Local::Runs(x) => net::write_spans(s, hdr, x, iov, on),
                    }
                };
                if inside {
                    post.leave_mem();
                }
                r
            }
            Job::Notif(post) => {
                wire::notif(hdr, post.id, post.notif_msg().unwrap_or_default());
                if !self.mark_sent(lane, post, NOTIF_CHUNK) {
                    self.release(lane);
                    return false;
                }
                // SAFETY: no spans; only `hdr` is written.
                unsafe { net::write_spans::<Span>(s, hdr, &[], iov, &mut LaneIdle(self, lane)) }
            }
        };
        drop(job);
        self.release(lane);
        match res {
            Ok(()) => true,
            Err(e) => {
                self.fail(self.io_error(&e));
                false
            }
        }
    }

    /// Frees a lane claimed for a write.
    fn release(&self, lane: usize) {
        self.state.lock().busy[lane] = false;
        self.cv.notify_all();
    }

    fn io_error(&self, e: &io::Error) -> Error {
        if let Some(f) = self.state.lock().failed.clone() {
            return f;
        }
        peer_err(&self.peer, e)
    }

    fn recv_loop(self: Arc<Self>, lane: usize) {
        let s = &self.lanes[lane].stream;
        let mut body = Vec::with_capacity(256);
        let mut iov = Vec::with_capacity(net::IOV_MAX);
        let mut scratch = Vec::new();
        loop {
            if let Err(e) = self.recv_one(lane, s, &mut body, &mut iov, &mut scratch) {
                let err = if e.kind() == io::ErrorKind::InvalidData {
                    metrics::counter!("nixl_tcp_bad_frames_total").increment(1);
                    Error::RemoteDisconnect {
                        peer: self.peer.clone(),
                        reason: format!("protocol error, connection dropped: {e}"),
                    }
                } else {
                    self.io_error(&e)
                };
                self.fail(err);
                return;
            }
        }
    }

    /// Reads one answer on `lane`. It must answer the lane's oldest unanswered frame, with the
    /// kind of answer that frame asks for (DATA of exactly the chunk's bytes for a READ chunk,
    /// ACK for a WRITE chunk or a notification); anything else is a protocol error that fails
    /// the session before a byte of it is written to memory.
    fn recv_one(
        &self,
        lane: usize,
        s: &Link,
        body: &mut Vec<u8>,
        iov: &mut Vec<libc::iovec>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let ty = net::read_frame(s, body, wire::frame_limit, &mut LaneIdle(self, lane))?;
        if ty != wire::ACK && ty != wire::DATA {
            return Err(protocol(format!("unexpected frame type {ty}")));
        }
        let r = wire::decode_reply(ty, body).map_err(wire::bad)?;
        let Some((post, chunk)) = self.next_answer(lane) else {
            return Err(protocol(format!(
                "an answer to chunk {} of request {} while nothing is outstanding on this \
                 connection",
                r.chunk, r.id
            )));
        };
        if r.id != post.id || r.chunk != chunk {
            return Err(protocol(format!(
                "an answer to chunk {} of request {}, but chunk {} of request {} is the one \
                 to answer next on this connection (an unknown, duplicate or late answer)",
                r.chunk, r.id, chunk, post.id
            )));
        }
        let spans = match &post.plan {
            Some(plan) if chunk != NOTIF_CHUNK && plan.op == XferOp::Read => {
                if ty != wire::DATA {
                    return Err(protocol(format!(
                        "chunk {chunk} of READ request {} answered by an ACK",
                        post.id
                    )));
                }
                let c = plan.chunks[chunk as usize];
                if r.status == Status::Ok && r.len != c.bytes {
                    return Err(protocol(format!(
                        "{} bytes of DATA for chunk {chunk} of request {}, which asked for {}",
                        r.len, post.id, c.bytes
                    )));
                }
                Some(plan.local(c))
            }
            _ => {
                if ty != wire::ACK {
                    return Err(protocol(format!(
                        "{} of request {} answered by DATA",
                        if chunk == NOTIF_CHUNK {
                            "the notification".to_owned()
                        } else {
                            format!("WRITE chunk {chunk}")
                        },
                        post.id
                    )));
                }
                None
            }
        };
        if let (Some(spans), Status::Ok) = (spans, r.status) {
            if post.enter_mem() {
                let mut stop = || post.abandoned();
                let on = &mut LaneIdle(self, lane);
                // SAFETY: the spans are the local descriptors of this chunk, which lie in
                // regions the core validated and holds while the post's completion lives; the
                // completion is not let go while this thread is inside the memory (`enter_mem`,
                // left below), and the length was checked to be exactly the chunk's.
                // Registered memory is lent to transfers by contract, so no Rust reference
                // aliases it.
                let got = unsafe {
                    match spans {
                        Local::Spans(x) => net::read_spans_until(s, x, iov, on, &mut stop),
                        Local::Runs(x) => net::read_spans_until(s, x, iov, on, &mut stop),
                    }
                };
                post.leave_mem();
                // Abandoned mid-chunk: the rest is read off the stream and thrown away.
                net::discard(s, r.len - got?, scratch, &mut LaneIdle(self, lane))?;
            } else {
                net::discard(s, r.len, scratch, &mut LaneIdle(self, lane))?;
            }
        }
        self.answered(lane);
        let res = match r.status {
            Status::Ok => Ok(()),
            Status::Denied => Err(Error::Denied {
                peer: self.peer.clone(),
                reason: r.text,
            }),
            Status::Failed => Err(Error::Backend {
                backend: BackendName::Tcp,
                op: "target",
                reason: r.text,
            }),
        };
        self.chunk_done(&post, res);
        Ok(())
    }
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A lane blocked for one tick: give up when the session failed, or when work is outstanding
/// and the lane moved nothing for `io_timeout`.
struct LaneIdle<'a>(&'a Session, usize);

impl OnBlock for LaneIdle<'_> {
    fn blocked(&mut self, _started: bool) -> io::Result<()> {
        let st = self.0.state.lock();
        if st.failed.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session closed",
            ));
        }
        let busy = st.outstanding[self.1] > 0;
        drop(st);
        let last = self.0.lanes[self.1].last.load(Ordering::Acquire);
        let silent = Duration::from_millis(self.0.now_ms().saturating_sub(last));
        if busy && silent > self.0.cfg.io_timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress for {silent:?} with work outstanding"),
            ));
        }
        Ok(())
    }

    fn progress(&mut self) {
        self.0.lanes[self.1]
            .last
            .store(self.0.now_ms(), Ordering::Release);
    }
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
        let sess = self.session()?;
        // No one waits: the post ends when its ACK comes (a refusal is only logged).
        let post = Arc::new(Post::new(
            sess.next_id.fetch_add(1, Ordering::Relaxed),
            None,
            Some(msg.to_vec()),
            1,
            None,
        ));
        sess.submit(post);
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

/// What a listener answered to our OPEN.
pub(super) struct Opened {
    pub(super) status: Status,
    /// The listener's instance id.
    pub(super) instance: u128,
    /// Its name (status Ok) or why it refused.
    pub(super) text: String,
}

impl Opened {
    /// The identity the listener proved (with status Ok).
    pub(super) fn identity(&self) -> PeerIdentity {
        PeerIdentity::new(self.text.clone(), self.instance)
    }
}

/// The initiator's side of opening a connection: the handshake (with a secret: TLS and the
/// proofs of both agents' names, `me` and the listener we `expect`, ("", 0) for whoever
/// listens), then OPEN (our name and instance, the purpose, the listener instance we expect, 0
/// for any) and OPENED, all before `deadline`. An OPENED that names another agent than the
/// handshake proved is refused. `peer` names the other side in errors. The link keeps the
/// deadline: the caller clears it.
pub(super) fn open_stream(
    s: TcpStream,
    auth: &auth::Auth,
    purpose: Purpose,
    me: &PeerIdentity,
    expect: (&str, u128),
    deadline: Instant,
    peer: &str,
) -> Result<(Link, Opened)> {
    let io_err = |e: io::Error| peer_err(peer, &e);
    let (s, proven) =
        auth::connect(s, auth, (&me.name, me.instance), expect, deadline).map_err(|e| match e {
            AuthError::Denied(reason) => Error::Denied {
                peer: peer.to_owned(),
                reason,
            },
            AuthError::Protocol(reason) => Error::RemoteDisconnect {
                peer: peer.to_owned(),
                reason,
            },
            AuthError::Io(e) => peer_err(peer, &e),
        })?;
    let bad = |reason: String| Error::RemoteDisconnect {
        peer: peer.to_owned(),
        reason,
    };
    let mut out = Vec::with_capacity(128);
    wire::open(&mut out, purpose, &me.name, me.instance, expect.1);
    net::send_all(&s, &out).map_err(io_err)?;
    let mut body = Vec::new();
    let ty = net::read_frame(&s, &mut body, wire::frame_limit, &mut give_up).map_err(io_err)?;
    if ty != wire::OPENED {
        return Err(bad(format!("expected OPENED, got frame type {ty}")));
    }
    let (status, instance, text) = wire::decode_opened(&body).map_err(|e| bad(e.to_string()))?;
    let o = Opened {
        status,
        instance,
        text,
    };
    if let Some(p) = proven.filter(|p| o.status == Status::Ok && *p != o.identity()) {
        return Err(Error::Denied {
            peer: peer.to_owned(),
            reason: format!(
                "the listener proved to be {p} but its OPENED names {}",
                o.identity()
            ),
        });
    }
    Ok((s, o))
}

/// An authenticated connection opened for `purpose` as `me`, past OPENED; returns the identity
/// the listener proved.
pub(super) fn open_call(
    addr: SocketAddr,
    auth: &auth::Auth,
    timeout: Duration,
    purpose: Purpose,
    me: &PeerIdentity,
) -> Result<(Link, PeerIdentity)> {
    let who = addr.to_string();
    let io_err = |e: io::Error| peer_err(&who, &e);
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(io_err)?;
    s.set_nodelay(true).map_err(io_err)?;
    let deadline = Instant::now() + timeout;
    let (s, o) = open_stream(s, auth, purpose, me, ("", 0), deadline, &who)?;
    if o.status != Status::Ok {
        return Err(match o.status {
            Status::Denied => Error::Denied {
                peer: who,
                reason: o.text,
            },
            _ => Error::RemoteDisconnect {
                peer: who,
                reason: o.text,
            },
        });
    }
    s.set_deadline(None);
    s.socket().set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.socket()
        .set_write_timeout(Some(timeout))
        .map_err(io_err)?;
    let id = o.identity();
    Ok((s, id))
}

/// Sends one frame on a call connection and reads the reply frame of type `want`.
fn exchange(s: &Link, who: &str, frame: &[u8], want: u8, body: &mut Vec<u8>) -> Result<()> {
    let io_err = |e: io::Error| peer_err(who, &e);
    net::send_all(s, frame).map_err(io_err)?;
    let ty = net::read_frame(s, body, wire::frame_limit, &mut give_up).map_err(io_err)?;
    if ty != want {
        return Err(Error::RemoteDisconnect {
            peer: who.to_owned(),
            reason: format!("expected frame type {want}, got {ty}"),
        });
    }
    Ok(())
}

/// A one-off metadata exchange with a listener, as `me`: fetch (`push` None) or push. A fetch
/// returns only metadata of the agent the listener proved to be; a push is accepted by the
/// listener only as the pusher's own (`me` is the name and instance in `push`).
pub(super) fn metadata_call(
    addr: SocketAddr,
    auth: &auth::Auth,
    timeout: Duration,
    me: &PeerIdentity,
    req: MdRequest<'_>,
) -> Result<Vec<u8>> {
    let who = addr.to_string();
    let (s, listener) = open_call(addr, auth, timeout, Purpose::Metadata, me)?;
    let mut f = Vec::with_capacity(16);
    let op = match req {
        MdRequest::Get => {
            wire::begin(&mut f, wire::MD_GET);
            wire::finish(&mut f);
            "fetch metadata"
        }
        MdRequest::Push(md) => {
            f.reserve(md.len());
            wire::begin(&mut f, wire::MD_PUSH);
            wire::put_blob(&mut f, md);
            wire::finish(&mut f);
            "push metadata"
        }
        MdRequest::Drop => {
            wire::md_drop(&mut f);
            "invalidate metadata"
        }
    };
    let mut body = Vec::new();
    exchange(&s, &who, &f, wire::MD, &mut body)?;
    let (status, bytes) = wire::decode_md(&body).map_err(|e| Error::RemoteDisconnect {
        peer: who.clone(),
        reason: e.to_string(),
    })?;
    match status {
        Status::Ok => {
            if matches!(req, MdRequest::Get) {
                let md = nixl_core::AgentMetadata::decode(bytes)?;
                if md.name != listener.name || md.instance_id != listener.instance {
                    return Err(Error::Denied {
                        peer: who,
                        reason: format!(
                            "the listener proved to be {listener} but served the metadata of \
                             '{}' (instance {:032x})",
                            md.name, md.instance_id
                        ),
                    });
                }
            }
            Ok(bytes.to_vec())
        }
        Status::Denied => Err(Error::Denied {
            peer: who,
            reason: format!("{op}: {}", String::from_utf8_lossy(bytes)),
        }),
        Status::Failed => Err(Error::Backend {
            backend: BackendName::Tcp,
            op,
            reason: String::from_utf8_lossy(bytes).into_owned(),
        }),
    }
}

/// What a metadata connection asks of a listener.
#[derive(Clone, Copy, Debug)]
pub(super) enum MdRequest<'a> {
    /// Its agent's metadata (MD_GET).
    Get,
    /// Load these, the caller's own (MD_PUSH).
    Push(&'a [u8]),
    /// Drop the caller's metadata (MD_DROP).
    Drop,
}

/// One control request to the service of `backend` at a listener, as the agent `me`.
pub(super) fn control_call(
    addr: SocketAddr,
    auth: &auth::Auth,
    timeout: Duration,
    me: &PeerIdentity,
    backend: BackendName,
    req: &[u8],
) -> Result<Vec<u8>> {
    let who = addr.to_string();
    let (s, _) = open_call(addr, auth, timeout, Purpose::Control, me)?;
    let mut f = Vec::with_capacity(req.len() + 16);
    wire::ctrl(&mut f, backend.code(), req);
    let mut body = Vec::new();
    exchange(&s, &who, &f, wire::CTRL_RE, &mut body)?;
    let (status, bytes) = wire::decode_ctrl_re(&body).map_err(|e| Error::RemoteDisconnect {
        peer: who.clone(),
        reason: e.to_string(),
    })?;
    match status {
        Status::Ok => Ok(bytes.to_vec()),
        _ => Err(Error::Denied {
            peer: who,
            reason: String::from_utf8_lossy(bytes).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_core::{Desc, MemKind, Segment};

    fn xplan(segs: &[(u64, u64)]) -> XferPlan {
        XferPlan {
            op: XferOp::Write,
            local_kind: MemKind::Dram,
            remote_kind: MemKind::Dram,
            segments: segs
                .iter()
                .map(|&(addr, len)| Segment {
                    local: Desc::new(addr, len, 0),
                    remote: Desc::new(addr + (1 << 40), len, 0),
                    local_region: 0,
                    remote_region: 0,
                })
                .collect(),
            local_regions: Vec::new(),
            remote_regions: vec![nixl_core::metadata::RegionInfo {
                kind: MemKind::Dram,
                desc: Desc::new(1 << 40, 1 << 40, 0),
                key: 77,
                backends: Vec::new(),
            }],
            notif: None,
            initiator: Arc::from("me"),
        }
    }

    #[test]
    fn large_segments_are_cut_and_small_ones_batched() {
        let p = make_plan(&xplan(&[(0, 10_000), (20_000, 100), (30_000, 100)]), 4096);
        let Body::Pieces { local, remote } = &p.body else {
            panic!("segments make pieces")
        };
        let bytes: Vec<u64> = p.chunks.iter().map(|c| c.bytes).collect();
        assert_eq!(bytes, vec![4096, 4096, 2008]);
        assert_eq!(local.iter().map(|s| s.len).sum::<u64>(), 10_200);
        for (l, r) in local.iter().zip(remote) {
            assert_eq!(l.len, r.len);
            assert_eq!(l.addr + (1 << 40), r.addr);
            assert_eq!(r.key, 77);
        }
        // Every chunk's pieces add up to its bytes, and chunks tile the pieces.
        let mut next = 0;
        for c in &p.chunks {
            assert_eq!(c.start, next);
            let sum: u64 = local[c.start as usize..c.end as usize]
                .iter()
                .map(|s| s.len)
                .sum();
            assert_eq!(sum, c.bytes);
            next = c.end;
        }
        assert_eq!(next as usize, local.len());
    }

    fn run(local: u64, len: u64) -> Run {
        Run {
            local,
            remote: local + (1 << 40),
            len,
        }
    }

    #[test]
    fn runs_are_chunked_at_run_boundaries_and_long_ones_cut() {
        // 4 KiB blocks fill 512 KiB chunks exactly, in place.
        let runs: Vec<Run> = (0..300).map(|i| run(i * 8192, 4096)).collect();
        let ptr = runs.as_ptr();
        let (out, chunks) = cut_runs(runs, 512 << 10);
        assert_eq!(out.as_ptr(), ptr, "no new list when nothing is cut");
        let n: Vec<u32> = chunks.iter().map(|c| c.end - c.start).collect();
        assert_eq!(n, vec![128, 128, 44]);
        // A long run is cut, empty ones dropped, and a chunk never goes over its bytes.
        let (out, chunks) = cut_runs(vec![run(0, 3000), run(10_000, 0), run(20_000, 9000)], 4096);
        assert_eq!(
            out,
            vec![
                run(0, 3000),
                run(20_000, 4096),
                run(24_096, 4096),
                run(28_192, 808)
            ]
        );
        let bytes: Vec<u64> = chunks.iter().map(|c| c.bytes).collect();
        assert_eq!(bytes, vec![3000, 4096, 4096, 808]);
        // Many tiny runs: at most MAX_SPANS per chunk.
        let runs: Vec<Run> = (0..40_000).map(|i| run(i * 16, 8)).collect();
        let (_, chunks) = cut_runs(runs, 64 << 20);
        let n: Vec<u32> = chunks.iter().map(|c| c.end - c.start).collect();
        assert_eq!(n, vec![16384, 16384, 7232]);
    }

    #[test]
    fn many_small_descriptors_fill_frames_up_to_the_piece_limit() {
        let segs: Vec<(u64, u64)> = (0..2500).map(|i| (i * 64, 8)).collect();
        let p = make_plan(&xplan(&segs), 1 << 20);
        let pieces: Vec<u32> = p.chunks.iter().map(|c| c.end - c.start).collect();
        assert_eq!(pieces, vec![1000, 1000, 500]);
    }
}
