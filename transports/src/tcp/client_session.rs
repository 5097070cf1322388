//! A session to one peer: its lanes (connections), the job queues, and the send and receive
//! loop of each lane.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{BackendName, Error, Result, XferOp};
use parking_lot::{Condvar, Mutex};

use super::client::Conn;
use super::client_plan::Local;
use super::client_post::Post;
use super::config::TcpConfig;
use super::net::{self, peer_err, Link, OnBlock, Span};
use super::wire::{self, Status};

/// Chunk index that marks the acknowledgement of a notification.
const NOTIF_CHUNK: u32 = u32::MAX;

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
    /// A notification: of a post once all its chunks are answered (no barrier), or a
    /// standalone one, written only once every post submitted before it has ended (the ids
    /// of the posts [`State::pending`] held then, ascending): each of their chunks answered,
    /// or dropped unsent because the post was abandoned.
    Notif(Arc<Post>, Option<Vec<u64>>),
}

pub(super) struct State {
    /// Jobs per lane: a post's chunks are dealt round-robin, so that a request of a few chunks
    /// runs on as many connections (a sender that answers fast would otherwise take them all).
    queues: Vec<VecDeque<Job>>,
    /// Lane the next post's first chunk goes to.
    next_lane: usize,
    /// Posts submitted and not ended: a post leaves once every chunk (and its notification)
    /// was answered or dropped, or when the session fails.
    pub(super) pending: HashMap<u64, Arc<Post>>,
    outstanding: Vec<usize>,
    /// What each lane has written and not had answered, in order.
    sent: Vec<VecDeque<Sent>>,
    /// A thread is writing on the lane (its sender, or a poster writing a small request inline).
    busy: Vec<bool>,
    pub(super) failed: Option<Error>,
}

impl State {
    /// The lane with the least work waiting or unanswered.
    fn quietest(&self) -> usize {
        (0..self.queues.len())
            .min_by_key(|&i| self.queues[i].len() + self.outstanding[i])
            .unwrap_or(0)
    }

    /// `lane` takes one more frame to write (unanswered until [`State::settle`]).
    fn claim(&mut self, lane: usize) {
        self.outstanding[lane] += 1;
    }

    /// A frame `lane` claimed was answered, or dropped without being written.
    fn settle(&mut self, lane: usize) {
        self.outstanding[lane] = self.outstanding[lane].saturating_sub(1);
    }

    /// Whether `lane`'s sender may take its next job now (never once the session failed: its
    /// queues are taken then, and a writer that ends after the failure still releases its lane).
    fn takeable(&self, lane: usize, window: usize) -> bool {
        !self.busy[lane]
            && self.outstanding[lane] < window
            && self
                .queues
                .get(lane)
                .and_then(VecDeque::front)
                .is_some_and(|j| self.ready(j))
    }

    /// Whether a job may be written now: a standalone notification waits for its barrier.
    /// Posts mostly end in the order they were submitted, so the oldest id still pending is
    /// usually the first one looked at.
    fn ready(&self, job: &Job) -> bool {
        match job {
            Job::Notif(_, Some(barrier)) => barrier.iter().all(|id| !self.pending.contains_key(id)),
            _ => true,
        }
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

pub(super) struct Session {
    peer: String,
    /// Every lane's listener takes SPAN frames (said so in its hello).
    pub(super) spans: bool,
    /// Receiving threads ask for a lane's next READ chunk themselves ([`Session::claim_read`]).
    inline_reads: bool,
    cfg: Arc<TcpConfig>,
    lanes: Vec<Lane>,
    pub(super) state: Mutex<State>,
    /// One per lane: its sender thread waits there for a job it may write.
    cv: Vec<Condvar>,
    pub(super) next_id: AtomicU64,
    epoch: Instant,
}

impl Session {
    pub(super) fn open(conn: &Conn) -> Result<Arc<Session>> {
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
            inline_reads: conn.cfg.window * (wire::MAX_SPANS * wire::SPAN_BYTES + 64)
                <= conn.cfg.socket_buffer,
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
            cv: (0..n).map(|_| Condvar::new()).collect(),
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

    pub(super) fn submit(&self, post: Arc<Post>) {
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
                    st.claim(lane);
                    self.lanes[lane]
                        .last
                        .store(self.now_ms(), Ordering::Release);
                    drop(st);
                    self.send_inline(lane, Job::Chunk(post, 0));
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
                // A standalone notification goes after everything asked before it: every post
                // submitted so far ends first, whether its chunks were written or still wait
                // in a queue (a READ that the caller gave up on, then says so, is no longer
                // served when the peer reads the message; one still running is carried out).
                // Their chunks are queued ahead of this one on every lane, so the wait ends.
                let mut barrier: Vec<u64> = st
                    .pending
                    .keys()
                    .copied()
                    .filter(|&id| id != post.id)
                    .collect();
                barrier.sort_unstable();
                let lane = st.quietest();
                st.queues[lane].push_back(Job::Notif(Arc::clone(&post), Some(barrier)));
            }
        }
        drop(st);
        self.wake_all();
    }

    fn wake_all(&self) {
        for cv in &self.cv {
            cv.notify_all();
        }
    }

    /// After `lane` settled a frame: its sender may have a job to write now. Only it is woken
    /// (a post that ended wakes the barriers: [`Session::wake_barriers`]).
    fn wake_settled(&self, st: &State, lane: usize) {
        if st.takeable(lane, self.cfg.window) {
            self.cv[lane].notify_all();
        }
    }

    /// After a post ended: a lane whose next job is a notification waiting for its barrier
    /// may write it now.
    fn wake_barriers(&self, st: &State) {
        for (i, q) in st.queues.iter().enumerate() {
            let barrier = matches!(q.front(), Some(Job::Notif(_, Some(_))));
            if barrier && st.takeable(i, self.cfg.window) {
                self.cv[i].notify_all();
            }
        }
    }

    /// Fails the session: every post on it fails with `e`, each ending once the lane threads
    /// that still touch its memory have stopped (the sockets are shut down to stop them).
    pub(super) fn fail(&self, e: Error) {
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
        self.wake_all();
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
                st.queues[lane].push_front(Job::Notif(Arc::clone(post), None));
                drop(st);
                self.cv[lane].notify_all();
            }
            return;
        }
        // Every chunk is answered: the post ends as its last holder (often our caller) lets go.
        let gone = {
            let mut st = self.state.lock();
            let gone = st.pending.remove(&post.id);
            self.wake_barriers(&st);
            gone
        };
        drop(gone);
    }

    /// Writes a job this thread claimed on `lane` (not a lane's sender thread).
    fn send_inline(&self, lane: usize, job: Job) {
        INLINE_BUFS.with(|b| match b.try_borrow_mut() {
            Ok(mut bufs) => self.send_job(lane, job, &mut bufs),
            Err(_) => self.send_job(lane, job, &mut WriteBufs::default()),
        });
    }

    /// Claims `lane`'s next job if it is a READ chunk the lane may write now, for the thread
    /// that just read an answer on that lane to ask for it itself: a READ request is a small
    /// frame, and this spares the sender thread's wake-up in the chain that keeps the target
    /// serving (answer read, next chunk asked, target serves it). Only where every request the
    /// window allows fits in the socket buffer, so the write does not wait on the target.
    fn claim_read(&self, st: &mut State, lane: usize) -> Option<Job> {
        let is_read = |j: &Job| match j {
            Job::Chunk(p, _) => p.plan.as_ref().is_some_and(|x| x.op == XferOp::Read),
            Job::Notif(..) => false,
        };
        let free = st.failed.is_none() && !st.busy[lane] && st.outstanding[lane] < self.cfg.window;
        if !self.inline_reads || !free || !st.queues[lane].front().is_some_and(is_read) {
            return None;
        }
        let job = st.queues[lane].pop_front()?;
        st.claim(lane);
        st.busy[lane] = true;
        self.lanes[lane]
            .last
            .store(self.now_ms(), Ordering::Release);
        Some(job)
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

    /// The answer `lane` expected next has been read in full. Returns the lane's next job if
    /// the caller is to write it ([`Session::claim_read`]).
    fn answered(&self, lane: usize) -> Option<Job> {
        let (done, next) = {
            let mut st = self.state.lock();
            st.settle(lane);
            let done = st.sent.get_mut(lane).and_then(VecDeque::pop_front);
            let next = self.claim_read(&mut st, lane);
            // With a job claimed the lane is busy: its sender is not woken.
            self.wake_settled(&st, lane);
            (done, next)
        };
        // Outside the lock: the last holder of a post completes it.
        drop(done);
        next
    }

    fn take_job(&self, lane: usize) -> Option<Job> {
        let mut st = self.state.lock();
        loop {
            if st.failed.is_some() {
                return None;
            }
            if st.takeable(lane, self.cfg.window) {
                if let Some(j) = st.queues[lane].pop_front() {
                    st.claim(lane);
                    st.busy[lane] = true;
                    self.lanes[lane]
                        .last
                        .store(self.now_ms(), Ordering::Release);
                    return Some(j);
                }
            }
            self.cv[lane].wait(&mut st);
        }
    }

    fn lane_reply(&self, lane: usize) {
        let mut st = self.state.lock();
        st.settle(lane);
        self.wake_settled(&st, lane);
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
            Job::Notif(post, _) => {
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
        let mut st = self.state.lock();
        st.busy[lane] = false;
        if st.takeable(lane, self.cfg.window) {
            self.cv[lane].notify_all();
        }
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
        if let Some(next) = self.answered(lane) {
            self.send_inline(lane, next);
        }
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
