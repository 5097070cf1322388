//! Transfer requests: created once, posted many times, every post ending in exactly one terminal
//! state.
//!
//! The state of a request is one atomic word: the post's epoch in the high bits and its state in
//! the low three. Posting moves it to `InFlight(epoch + 1)`; the backend's [`Completion`], a
//! cancel, and the deadline watchdog all race to move `InFlight(epoch)` to a terminal state with
//! one compare-and-swap, so exactly one of them wins and a late completion of an old epoch is
//! ignored. Posting takes no lock: it touches this word, the access gates of the local regions,
//! and whatever the backend does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use parking_lot::{Condvar, Mutex};

use crate::backend::{BackendName, PreparedXfer};
use crate::error::{Error, ErrorClass, Result};
use crate::region::{enter_all, leave_all, Region, Ticket};

/// The direction of a transfer, seen from the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum XferOp {
    /// Remote to local.
    Read = 0,
    /// Local to remote.
    Write = 1,
}

impl XferOp {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            XferOp::Read => "read",
            XferOp::Write => "write",
        }
    }
}

/// Where a request stands.
#[derive(Clone, Debug)]
pub enum XferStatus {
    /// Never posted.
    Idle,
    /// Posted and not yet ended.
    InProgress,
    /// The data has landed (and the notification, if any, was delivered after it).
    Done,
    /// Failed with a reason.
    Failed(Error),
    /// Cancelled by the caller or by agent shutdown.
    Cancelled,
    /// Ran past its deadline.
    TimedOut,
}

impl XferStatus {
    /// Whether this is a terminal state of a post.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, XferStatus::Idle | XferStatus::InProgress)
    }

    /// `Ok` for Done, the matching error for the other terminal states; `Err(InFlight)` otherwise.
    pub fn into_result(self) -> Result<()> {
        match self {
            XferStatus::Done => Ok(()),
            XferStatus::Failed(e) => Err(e),
            XferStatus::Cancelled => Err(Error::Cancelled),
            XferStatus::TimedOut => Err(Error::TimedOut),
            XferStatus::Idle | XferStatus::InProgress => Err(Error::InFlight),
        }
    }
}

const IDLE: u64 = 0;
const IN_FLIGHT: u64 = 1;
const DONE: u64 = 2;
const FAILED: u64 = 3;
const CANCELLED: u64 = 4;
const TIMED_OUT: u64 = 5;
const STATE_BITS: u32 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

fn word(epoch: u64, state: u64) -> u64 {
    (epoch << STATE_BITS) | state
}

/// Static facts about a request, readable by the caller.
#[derive(Clone, Debug)]
pub struct XferInfo {
    /// Direction.
    pub op: XferOp,
    /// The backend chosen (or named) for it.
    pub backend: BackendName,
    /// The peer.
    pub peer: Arc<str>,
    /// Bytes per post.
    pub bytes: u64,
    /// Descriptors per post.
    pub descs: usize,
    /// Why this backend was chosen.
    pub reason: Choice,
    /// The backend whose stager copied the local device memory through host memory, when no
    /// backend could carry it directly (see [`crate::staging`]).
    pub staged: Option<BackendName>,
}

/// Why a request got its backend (printed by `Display`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The caller named it.
    Named,
    /// The first candidate by locality and preference carried it.
    Best,
    /// Better candidates could not carry it; each with the reason.
    PassedOver(String),
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Choice::Named => f.write_str("named by the caller"),
            Choice::Best => f.write_str("best by locality and preference"),
            Choice::PassedOver(why) => write!(f, "chosen after passing over:{why}"),
        }
    }
}

impl Choice {
    /// Whether the displayed reason contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.to_string().contains(needle)
    }
}

/// Metric handles of one (backend, peer, op): made once per peer, shared by its requests, so
/// creating a request allocates no label strings.
///
/// Besides the per-peer `nixl_xfer_*` series, every request that ends Done counts in the
/// agent-wide names of NIXL's telemetry (no peer label): a WRITE's bytes left this agent
/// (`nixl_agent_tx_bytes_total`, `nixl_agent_tx_requests_total`), a READ's arrived
/// (`nixl_agent_rx_bytes_total`, `nixl_agent_rx_requests_total`); its time from post to end is
/// `nixl_agent_xfer_seconds`, and a post that does not end Done counts in
/// `nixl_agent_errors_total{status}` (the C ABI's status names). Targets whose own threads move
/// the bytes (the `tcp` listener) count the same byte totals on their side.
#[derive(Debug)]
pub(crate) struct Telemetry {
    bytes: metrics::Counter,
    requests: metrics::Counter,
    latency: metrics::Histogram,
    agent_bytes: metrics::Counter,
    agent_requests: metrics::Counter,
    agent_latency: metrics::Histogram,
    /// Whether errors are counted too (not for the chunks of a staged request, which count
    /// once, as the request).
    errors: bool,
}

impl Telemetry {
    pub(crate) fn new(backend: BackendName, peer: &str, op: XferOp) -> Telemetry {
        let labels = [
            ("backend", backend.as_str().to_owned()),
            ("peer", peer.to_owned()),
            ("op", op.as_str().to_owned()),
        ];
        Telemetry {
            bytes: metrics::counter!("nixl_xfer_bytes_total", &labels),
            requests: metrics::counter!("nixl_xfer_requests_total", &labels),
            latency: metrics::histogram!("nixl_xfer_latency_seconds",
                "backend" => backend.as_str(), "op" => op.as_str()),
            agent_bytes: match op {
                XferOp::Write => metrics::counter!("nixl_agent_tx_bytes_total"),
                XferOp::Read => metrics::counter!("nixl_agent_rx_bytes_total"),
            },
            agent_requests: match op {
                XferOp::Write => metrics::counter!("nixl_agent_tx_requests_total"),
                XferOp::Read => metrics::counter!("nixl_agent_rx_requests_total"),
            },
            agent_latency: metrics::histogram!("nixl_agent_xfer_seconds"),
            errors: true,
        }
    }

    /// Records nothing: for the internal requests of a staged request.
    pub(crate) fn silent() -> Telemetry {
        Telemetry {
            bytes: metrics::Counter::noop(),
            requests: metrics::Counter::noop(),
            latency: metrics::Histogram::noop(),
            agent_bytes: metrics::Counter::noop(),
            agent_requests: metrics::Counter::noop(),
            agent_latency: metrics::Histogram::noop(),
            errors: false,
        }
    }
}

pub(crate) struct XferShared {
    state: AtomicU64,
    failure: Mutex<Option<Error>>,
    waker: AtomicWaker,
    prepared: Box<dyn PreparedXfer>,
    local_regions: Vec<Arc<Region>>,
    info: XferInfo,
    deadline: Option<Duration>,
    posted_at: Mutex<Option<Instant>>,
    watchdog: Arc<Watchdog>,
    telemetry: Arc<Telemetry>,
    /// Completions alive (handed to the backend and not yet dropped), for [`XferRequest::release`].
    holders: Mutex<usize>,
    released: Condvar,
}

impl XferShared {
    /// Moves `InFlight(epoch)` to `terminal`; false if something else ended this post first.
    fn finish(&self, epoch: u64, outcome: Result<()>) -> bool {
        let (state, err) = match outcome {
            Ok(()) => (DONE, None),
            Err(Error::Cancelled) | Err(Error::Shutdown(_)) => (CANCELLED, None),
            Err(Error::TimedOut) => (TIMED_OUT, None),
            Err(e) => (FAILED, Some(e)),
        };
        // The failure slot is written under its lock together with the state change, so a
        // reader that sees FAILED and then takes the lock reads this post's reason.
        let mut slot = self.failure.lock();
        let won = self
            .state
            .compare_exchange(
                word(epoch, IN_FLIGHT),
                word(epoch, state),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if won {
            if let Some(e) = &err {
                if self.telemetry.errors {
                    metrics::counter!("nixl_xfer_errors_total",
                        "backend" => self.info.backend.as_str(), "kind" => e.metric_label())
                    .increment(1);
                }
                tracing::debug!(peer = %self.info.peer, backend = %self.info.backend, error = %e, "transfer failed");
            }
        }
        let failed_class = err.as_ref().map(Error::class);
        if won {
            *slot = err;
        }
        drop(slot);
        if won {
            let t = &self.telemetry;
            if state == DONE {
                t.bytes.increment(self.info.bytes);
                t.requests.increment(1);
                t.agent_bytes.increment(self.info.bytes);
                t.agent_requests.increment(1);
            } else if t.errors {
                let status = match (state, failed_class) {
                    (CANCELLED, _) => ErrorClass::Cancelled.status_name(),
                    (TIMED_OUT, _) => ErrorClass::TimedOut.status_name(),
                    (_, Some(c)) => c.status_name(),
                    (_, None) => ErrorClass::Backend.status_name(),
                };
                metrics::counter!("nixl_agent_errors_total", "status" => status).increment(1);
            }
            if let Some(p) = *self.posted_at.lock() {
                let secs = p.elapsed().as_secs_f64();
                if state == DONE {
                    t.latency.record(secs);
                }
                t.agent_latency.record(secs);
            }
            if state != DONE && state != FAILED && t.errors {
                let label = if state == CANCELLED {
                    "cancelled"
                } else {
                    "timed_out"
                };
                metrics::counter!("nixl_xfer_errors_total",
                    "backend" => self.info.backend.as_str(), "kind" => label)
                .increment(1);
            }
            self.waker.wake();
        }
        won
    }

    fn status(&self) -> XferStatus {
        let w = self.state.load(Ordering::Acquire);
        match w & STATE_MASK {
            IDLE => XferStatus::Idle,
            IN_FLIGHT => {
                if let Some(deadline) = self.deadline {
                    let late = self
                        .posted_at
                        .lock()
                        .is_some_and(|t| t.elapsed() >= deadline);
                    if late && self.finish(w >> STATE_BITS, Err(Error::TimedOut)) {
                        self.prepared.cancel();
                        return XferStatus::TimedOut;
                    }
                }
                XferStatus::InProgress
            }
            DONE => XferStatus::Done,
            FAILED => XferStatus::Failed(
                self.failure
                    .lock()
                    .clone()
                    .unwrap_or_else(|| Error::InvalidArgument("failure reason lost".into())),
            ),
            CANCELLED => XferStatus::Cancelled,
            _ => XferStatus::TimedOut,
        }
    }
}

/// The backend's handle on one post of a request. Call [`Completion::complete`] once; dropping
/// it uncompleted ends the post as failed, so a backend bug cannot leave a request hanging.
/// The local regions of the request stay held (deregistration waits) until it is dropped.
pub struct Completion {
    shared: Arc<XferShared>,
    epoch: u64,
    completed: bool,
    /// The holds on the local regions, released on drop.
    ticket: Option<Ticket>,
}

impl Completion {
    /// Ends the post: `Ok` is Done; `Err(Cancelled)`, `Err(TimedOut)` map to those states; any
    /// other error is Failed. Returns false if the post had already ended (cancel or deadline).
    pub fn complete(mut self, outcome: Result<()>) -> bool {
        self.completed = true;
        self.shared.finish(self.epoch, outcome)
    }

    /// Ends the post now (as [`Completion::complete`] would) but keeps the local regions held
    /// until this completion is dropped: for a backend that cannot stop the hardware or the peer
    /// that still works on the memory (a stuck target, a closed connection), so the caller sees
    /// the outcome at once and deregistration still waits until the memory is really let go.
    pub fn end_early(&self, outcome: Result<()>) -> bool {
        self.shared.finish(self.epoch, outcome)
    }

    /// Whether the post has already ended (cancelled or timed out): the backend may stop early.
    pub fn is_abandoned(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) != word(self.epoch, IN_FLIGHT)
    }

    /// Facts about the request.
    pub fn info(&self) -> &XferInfo {
        &self.shared.info
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("epoch", &self.epoch)
            .field("peer", &self.shared.info.peer)
            .finish()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.completed {
            self.shared.finish(
                self.epoch,
                Err(Error::Backend {
                    backend: self.shared.info.backend,
                    op: "transfer",
                    reason: "backend dropped the request without completing it".into(),
                }),
            );
        }
        leave_all(&self.shared.local_regions, |r| &r.gate, self.ticket);
        let mut h = self.shared.holders.lock();
        *h -= 1;
        if *h == 0 {
            self.shared.released.notify_all();
        }
    }
}

/// A transfer request: validated once, posted many times.
///
/// Cloning gives another handle to the same request.
#[derive(Clone)]
pub struct XferRequest {
    shared: Arc<XferShared>,
}

impl fmt::Debug for XferRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XferRequest")
            .field("info", &self.shared.info)
            .field("status", &self.status())
            .finish()
    }
}

impl XferRequest {
    pub(crate) fn new(
        prepared: Box<dyn PreparedXfer>,
        local_regions: Vec<Arc<Region>>,
        info: XferInfo,
        deadline: Option<Duration>,
        watchdog: Arc<Watchdog>,
        telemetry: Arc<Telemetry>,
    ) -> XferRequest {
        XferRequest {
            shared: Arc::new(XferShared {
                state: AtomicU64::new(word(0, IDLE)),
                failure: Mutex::new(None),
                waker: AtomicWaker::new(),
                prepared,
                local_regions,
                info,
                deadline,
                posted_at: Mutex::new(None),
                watchdog,
                telemetry,
                holders: Mutex::new(0),
                released: Condvar::new(),
            }),
        }
    }

    /// Facts about the request, including the backend chosen for it.
    pub fn info(&self) -> &XferInfo {
        &self.shared.info
    }

    /// The backend that carries this request.
    pub fn backend(&self) -> BackendName {
        self.shared.info.backend
    }

    /// Starts one execution. Errors if the previous post is still in flight or a local region
    /// was deregistered; otherwise the outcome is read with [`XferRequest::status`] or a wait.
    pub fn post(&self) -> Result<()> {
        let s = &self.shared;
        let mut cur = s.state.load(Ordering::Acquire);
        let epoch = loop {
            if cur & STATE_MASK == IN_FLIGHT {
                return Err(Error::InFlight);
            }
            let next_epoch = (cur >> STATE_BITS).wrapping_add(1) & (u64::MAX >> STATE_BITS);
            match s.state.compare_exchange_weak(
                cur,
                word(next_epoch, IN_FLIGHT),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break next_epoch,
                Err(actual) => cur = actual,
            }
        };
        // Hold every local region for the duration of this post.
        let ticket = match enter_all(&s.local_regions, |r| &r.gate) {
            Ok(t) => t,
            Err(i) => {
                let r = &s.local_regions[i];
                let err = Error::LocalNotRegistered {
                    index: 0,
                    kind: r.kind,
                    desc: r.desc,
                };
                s.finish(epoch, Err(err.clone()));
                return Err(err);
            }
        };
        if let Some(deadline) = s.deadline {
            *s.posted_at.lock() = Some(Instant::now());
            s.watchdog.arm(
                Instant::now() + deadline,
                Arc::downgrade(&self.shared),
                epoch,
            );
        } else {
            *s.posted_at.lock() = Some(Instant::now());
        }
        *s.holders.lock() += 1;
        s.prepared.post(Completion {
            shared: Arc::clone(s),
            epoch,
            completed: false,
            ticket,
        });
        Ok(())
    }

    /// Where the request stands (also applies its deadline).
    pub fn status(&self) -> XferStatus {
        self.shared.status()
    }

    /// Cancels the post in flight, if any; it ends `Cancelled` unless it had already ended.
    pub fn cancel(&self) {
        let w = self.shared.state.load(Ordering::Acquire);
        if w & STATE_MASK == IN_FLIGHT && self.shared.finish(w >> STATE_BITS, Err(Error::Cancelled))
        {
            self.shared.prepared.cancel();
        }
    }

    /// Cancels the post in flight, if any, and blocks until no backend holds this request
    /// any more: from then on nothing touches its memory. A backend that cannot stop at once
    /// (a peer that still works on the memory, a stuck target) lets go within its own timeouts.
    pub fn release(&self) {
        self.cancel();
        let mut h = self.shared.holders.lock();
        while *h > 0 {
            self.shared.released.wait(&mut h);
        }
    }

    /// Whether a backend still holds this request (its post may still touch memory).
    pub fn is_held(&self) -> bool {
        *self.shared.holders.lock() > 0
    }

    /// Waits for the post in flight to end.
    pub fn wait(&self) -> Wait<'_> {
        Wait { req: self }
    }

    /// Blocks until the post in flight ends, or `timeout` passes (then `InProgress` is returned
    /// and the request goes on).
    pub fn wait_blocking(&self, timeout: Option<Duration>) -> XferStatus {
        // Small transfers are usually done by the time we look: no waker, no allocation.
        let st = self.status();
        if st.is_terminal() || matches!(st, XferStatus::Idle) {
            return st;
        }
        let start = Instant::now();
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        loop {
            let st = self.status();
            if st.is_terminal() || matches!(st, XferStatus::Idle) {
                return st;
            }
            self.shared.waker.register(&waker);
            let st = self.status();
            if st.is_terminal() {
                return st;
            }
            let mut nap = Duration::from_millis(10);
            if let Some(t) = timeout {
                let left = t.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return st;
                }
                nap = nap.min(left);
            }
            std::thread::park_timeout(nap);
        }
    }

    /// Posts and waits (blocking) for the outcome.
    pub fn run_blocking(&self) -> Result<()> {
        self.post()?;
        self.wait_blocking(None).into_result()
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Future returned by [`XferRequest::wait`]: resolves to the terminal status of the post in flight
/// (or `Idle` if never posted).
#[derive(Debug)]
pub struct Wait<'a> {
    req: &'a XferRequest,
}

impl Future for Wait<'_> {
    type Output = XferStatus;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<XferStatus> {
        let st = self.req.status();
        if st.is_terminal() || matches!(st, XferStatus::Idle) {
            return Poll::Ready(st);
        }
        self.req.shared.waker.register(cx.waker());
        let st = self.req.status();
        if st.is_terminal() {
            Poll::Ready(st)
        } else {
            Poll::Pending
        }
    }
}

type Timer = (Reverse<(Instant, u64)>, Weak<XferShared>, u64);

/// One thread per agent that ends posts whose deadline passed, so a request with a deadline ends
/// on time even if nobody polls it. Started on the first post with a deadline.
pub(crate) struct Watchdog {
    inner: Mutex<WatchdogState>,
    cv: Condvar,
    agent: Arc<str>,
}

struct WatchdogState {
    heap: BinaryHeap<TimerEntry>,
    seq: u64,
    running: bool,
    stopped: bool,
}

struct TimerEntry(Timer);

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0 .0 == other.0 .0
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0 .0.cmp(&other.0 .0)
    }
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watchdog")
            .field("agent", &self.agent)
            .finish()
    }
}

impl Watchdog {
    pub(crate) fn new(agent: Arc<str>) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            inner: Mutex::new(WatchdogState {
                heap: BinaryHeap::new(),
                seq: 0,
                running: false,
                stopped: false,
            }),
            cv: Condvar::new(),
            agent,
        })
    }

    fn arm(self: &Arc<Self>, at: Instant, req: Weak<XferShared>, epoch: u64) {
        let mut st = self.inner.lock();
        if st.stopped {
            return;
        }
        st.seq += 1;
        let seq = st.seq;
        st.heap.push(TimerEntry((Reverse((at, seq)), req, epoch)));
        if !st.running {
            st.running = true;
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("nixl-deadline-{}", self.agent))
                .spawn(move || me.run());
            if let Err(e) = spawned {
                // Deadlines are still applied by status() polls.
                st.running = false;
                tracing::error!(error = %e, "cannot start the deadline thread");
            }
        }
        drop(st);
        self.cv.notify_one();
    }

    fn run(&self) {
        let mut st = self.inner.lock();
        loop {
            if st.stopped {
                st.heap.clear();
                return;
            }
            let now = Instant::now();
            match st.heap.peek() {
                Some(TimerEntry((Reverse((at, _)), _, _))) if *at <= now => {
                    let TimerEntry((_, req, epoch)) = st.heap.pop().expect("peeked");
                    drop(st);
                    if let Some(req) = req.upgrade() {
                        if req.finish(epoch, Err(Error::TimedOut)) {
                            req.prepared.cancel();
                        }
                    }
                    st = self.inner.lock();
                }
                Some(TimerEntry((Reverse((at, _)), _, _))) => {
                    let at = *at;
                    self.cv.wait_until(&mut st, at);
                }
                None => {
                    self.cv.wait(&mut st);
                }
            }
        }
    }

    pub(crate) fn stop(&self) {
        self.inner.lock().stopped = true;
        self.cv.notify_all();
    }
}
