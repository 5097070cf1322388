//! The `uring` backend: DRAM ↔ FILE through io_uring.
//!
//! Registrations and requests are those of [`crate::posix`] (FILE descriptors are
//! `(offset, length, fd)`; the agent names itself as the remote), and so are the checks made
//! when a request is created: the fd's mode, `O_DIRECT` alignment, the file regions' keys.
//!
//! The operations are planned when the request is created (one `readv`/`writev` per run of
//! contiguous file ranges on an fd, at most `max_io_bytes`). Posting puts them in the ring on the
//! posting thread, up to `queue_depth` in flight, all in one `io_uring_enter`, and reaps
//! whatever that already completed (buffered reads of cached pages finish inside the submit, so
//! such a request ends on the posting thread with no hand-off). A completion thread waits in the
//! kernel for the rest and refills the ring as completions arrive, rather than waiting op by
//! op. A completion that moved fewer
//! bytes than asked is resubmitted for the rest; `EINTR`/`EAGAIN` are retried; a read that
//! meets the end of the file, and every other error, fails the request with the fd and offset.
//!
//! At start the backend creates a ring: where io_uring is disabled (the
//! `kernel.io_uring_disabled` sysctl, a seccomp filter, an old kernel) it reports
//! `unavailable: <reason>` and the selection policy uses `posix` instead (the choice and the
//! reason are on the request). `[uring] enabled = false` turns it off by configuration.
//!
//! Not yet: registered buffers and fixed files (the kernel maps each buffer per operation).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::{Condvar, Mutex};

use crate::files::{inspect_fd, OwnAgent};
use crate::posix::{prepare_files, IoOp, Post};

/// Settings of the `uring` backend (`[uring]` in the agent's configuration).
#[derive(Clone, Debug)]
pub struct UringConfig {
    /// Operations kept in flight (and the ring's size).
    pub queue_depth: u32,
    /// Largest single operation.
    pub max_io_bytes: usize,
    /// `false` turns the backend off (it reports itself unavailable; `posix` serves files).
    pub enabled: bool,
}

impl Default for UringConfig {
    fn default() -> UringConfig {
        UringConfig {
            queue_depth: 64,
            max_io_bytes: 1 << 20,
            enabled: true,
        }
    }
}

/// The `uring` backend.
pub struct UringBackend {
    cfg: UringConfig,
    own: OwnAgent,
    ring: Mutex<Option<RingThread>>,
}

impl fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringBackend")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl UringBackend {
    /// A backend with these settings (the ring starts with the agent).
    pub fn new(cfg: UringConfig) -> UringBackend {
        UringBackend {
            cfg,
            own: OwnAgent::default(),
            ring: Mutex::new(None),
        }
    }
}

/// Why io_uring cannot be used, in words an operator can act on.
pub(crate) fn unavailable_reason(e: &io::Error, sysctl: Option<&str>) -> String {
    let disabled = sysctl.map(str::trim).filter(|v| *v != "0");
    match (e.raw_os_error(), disabled) {
        (_, Some(v)) => {
            format!("io_uring is disabled on this host (kernel.io_uring_disabled = {v}): {e}")
        }
        (Some(libc::ENOSYS), _) => format!("this kernel has no io_uring: {e}"),
        (Some(libc::EPERM), _) => {
            format!("io_uring is not permitted here (a seccomp filter or container policy): {e}")
        }
        _ => format!("io_uring_setup failed: {e}"),
    }
}

fn new_ring(depth: u32) -> std::result::Result<IoUring, String> {
    let ring = IoUring::new(depth.max(2)).map_err(|e| {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
        unavailable_reason(&e, sysctl.as_deref())
    })?;
    if !ring.params().is_feature_ext_arg() {
        // The completion thread waits with a timeout (IORING_ENTER_EXT_ARG).
        return Err("this kernel's io_uring lacks IORING_FEAT_EXT_ARG (Linux 5.11+)".into());
    }
    Ok(ring)
}

const KINDS: &[MemKind] = &[MemKind::Dram, MemKind::File];
const FILE: &[MemKind] = &[MemKind::File];

impl Backend for UringBackend {
    fn name(&self) -> BackendName {
        BackendName::Uring
    }

    fn caps(&self) -> Caps {
        Caps {
            local_kinds: KINDS,
            remote_kinds: FILE,
            notifications: false,
            locality: Locality::SameProcess,
        }
    }

    fn probe(&self) -> std::result::Result<(), String> {
        if !self.cfg.enabled {
            return Err("turned off by configuration ([uring] enabled = false)".into());
        }
        if self.cfg.queue_depth == 0 || self.cfg.max_io_bytes == 0 {
            return Err("[uring] queue_depth and max_io_bytes must be positive".into());
        }
        new_ring(2).map(drop)
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        let ring = new_ring(self.cfg.queue_depth).map_err(|reason| Error::Unavailable {
            backend: BackendName::Uring,
            reason,
        })?;
        *self.ring.lock() = Some(RingThread::start(ring, self.cfg.queue_depth)?);
        self.own.set(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        self.own.conn_info()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        if kind == MemKind::File {
            inspect_fd(desc.dev_id)?;
        }
        Ok(Vec::new())
    }

    fn deregister(&self, _region: &Region) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        self.own.can_reach(conn_info, "files")
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let target = self.own.connect(BackendName::Uring, peer)?;
        let queue = self
            .ring
            .lock()
            .as_ref()
            .map(RingThread::queue)
            .ok_or_else(|| Error::Shutdown("uring backend shut down".into()))?;
        Ok(Arc::new(UringConn {
            target,
            queue,
            max_io: self.cfg.max_io_bytes,
        }))
    }

    fn shutdown(&self) {
        if let Some(r) = self.ring.lock().take() {
            r.stop();
        }
        self.own.clear();
    }
}

#[derive(Debug)]
struct UringConn {
    target: TargetHandle,
    queue: Queue,
    max_io: usize,
}

impl Connection for UringConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let (ops, remote_regions) =
            prepare_files(BackendName::Uring, &self.target, &plan, self.max_io)?;
        Ok(Box::new(UringXfer {
            op: plan.op,
            ops,
            remote_regions,
            queue: self.queue.clone(),
        }))
    }

    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Err(Error::Backend {
            backend: BackendName::Uring,
            op: "notification",
            reason: "uring carries no notifications".into(),
        })
    }

    fn close(&self) {}
}

#[derive(Debug)]
struct UringXfer {
    op: XferOp,
    ops: Arc<[IoOp]>,
    remote_regions: Arc<[Arc<Region>]>,
    queue: Queue,
}

impl PreparedXfer for UringXfer {
    fn post(&self, done: Completion) {
        let Some(post) = Post::start(
            self.op,
            &self.ops,
            &self.remote_regions,
            done,
            &self.queue.shared.stopping,
        ) else {
            return;
        };
        self.queue.shared.post(post);
    }
}

/// The way to the ring, held by connections and requests.
#[derive(Clone, Debug)]
struct Queue {
    shared: Arc<Shared>,
}

/// The ring and what is in it. Whoever holds `state` may touch the submission and completion
/// queues: a posting thread submits its operations and reaps what is already done (buffered
/// reads of cached pages complete during the submit, so they end on the posting thread with no
/// hand-off); the completion thread waits in the kernel for the rest, without the lock.
struct Shared {
    ring: IoUring,
    state: Mutex<State>,
    /// Wakes the completion thread when operations are left in flight (it sleeps here, not in
    /// the kernel, while the ring is idle).
    work: Condvar,
    stopping: Arc<AtomicBool>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

struct State {
    depth: usize,
    slots: Vec<Option<Slot>>,
    /// Each slot's iovec array (the kernel reads it until the slot's operation completes),
    /// kept across operations so filling a slot allocates nothing.
    iovs: Vec<Iovecs>,
    /// Reused buffer of reaped completions.
    reaped: Vec<(u64, i32)>,
    free: Vec<usize>,
    pending: VecDeque<(Arc<Post>, usize)>,
    in_flight: usize,
    /// The completion thread was asked to exit (once nothing is in flight).
    stopped: bool,
}

/// One operation in the kernel (or about to be): where it stands.
struct Slot {
    post: Arc<Post>,
    fd: i32,
    /// First iovec of the slot's array still to move.
    first: usize,
    offset: u64,
    left: u64,
}

/// A slot's iovecs.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs are addresses in registered DRAM, not references; they are only read or
// changed under the state lock, by whichever thread holds it, and the memory they point to
// stays registered and held by the slot's post until the slot is cleared.
unsafe impl Send for Iovecs {}

/// Longest wait of the completion thread before it looks at the state again.
const WAIT: std::time::Duration = std::time::Duration::from_millis(50);

struct RingThread {
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

impl RingThread {
    fn start(ring: IoUring, depth: u32) -> Result<RingThread> {
        let depth = (depth as usize).clamp(1, ring.params().sq_entries() as usize);
        let shared = Arc::new(Shared {
            ring,
            state: Mutex::new(State {
                depth,
                slots: (0..depth).map(|_| None).collect(),
                iovs: (0..depth).map(|_| Iovecs(Vec::new())).collect(),
                reaped: Vec::with_capacity(depth),
                free: (0..depth).rev().collect(),
                pending: VecDeque::new(),
                in_flight: 0,
                stopped: false,
            }),
            work: Condvar::new(),
            stopping: Arc::new(AtomicBool::new(false)),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nixl-uring".into())
            .spawn(move || s.completions())
            .map_err(|e| Error::io("spawning the uring thread", e))?;
        Ok(RingThread { shared, thread })
    }

    fn queue(&self) -> Queue {
        Queue {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Operations not started end their posts `Cancelled`; those in the kernel are waited for
    /// (their memory is in use until the kernel says so); then the thread exits.
    fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.state.lock().stopped = true;
        self.shared.work.notify_all();
        let _ = self.thread.join();
    }
}

impl Shared {
    /// Takes a post's operations and runs as much as it can at once.
    fn post(&self, post: Arc<Post>) {
        let mut st = self.state.lock();
        for i in 0..post.ops.len() {
            st.pending.push_back((Arc::clone(&post), i));
        }
        self.pump(&mut st);
        if st.in_flight > 0 || !st.pending.is_empty() {
            self.work.notify_one();
        }
    }

    /// Under the lock: reaps what is done, fills the ring up to its depth, submits, and reaps
    /// again what the submit completed.
    fn pump(&self, st: &mut State) {
        for _ in 0..2 {
            self.reap(st);
            if self.fill(st) == 0 {
                break;
            }
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    // The entries stay in the queue: the next submit (here or on the
                    // completion thread) sends them.
                    tracing::warn!(error = %e, "io_uring submit failed; retrying later");
                }
            }
        }
    }

    /// The completion thread: waits in the kernel (without the lock) until something
    /// completes, then reaps and refills.
    fn completions(&self) {
        loop {
            {
                let mut st = self.state.lock();
                self.pump(&mut st);
                if st.in_flight == 0 && st.pending.is_empty() {
                    if st.stopped {
                        return;
                    }
                    // Idle: sleep here rather than in the kernel (a thread blocked in
                    // io_uring_enter also stalls tools such as valgrind).
                    self.work.wait_for(&mut st, WAIT);
                    continue;
                }
            }
            // Waits for a completion, at most WAIT: a completion that a posting thread reaped
            // first must not leave this thread asleep. Entries queued meanwhile by posting
            // threads (already published) may be submitted by this call too, which is harmless.
            let ts = types::Timespec::from(WAIT);
            let args = types::SubmitArgs::new().timespec(&ts);
            let r = self.ring.submitter().submit_with_args(1, &args);
            if let Err(e) = r {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY)
                ) {
                    // The kernel still owns what is in flight: retry rather than give up on
                    // memory it may write.
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Puts pending operations into the submission queue, up to the depth; how many.
    fn fill(&self, st: &mut State) -> usize {
        let mut pushed = 0;
        while st.in_flight < st.depth {
            let Some((post, i)) = st.pending.pop_front() else {
                break;
            };
            if post.should_skip() {
                post.finish_one();
                continue;
            }
            let Some(idx) = st.free.pop() else {
                st.pending.push_front((post, i));
                break;
            };
            let op = &post.ops[i];
            let iov = &mut st.iovs[idx].0;
            iov.clear();
            iov.extend(op.pieces.iter().map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len as usize,
            }));
            st.slots[idx] = Some(Slot {
                fd: op.fd,
                left: op.len(),
                offset: op.offset,
                first: 0,
                post: Arc::clone(&post),
            });
            if self.submit_slot(st, idx) {
                pushed += 1;
            }
        }
        pushed
    }

    /// Pushes the submission of slot `idx` (its remaining iovecs at its offset).
    fn submit_slot(&self, st: &mut State, idx: usize) -> bool {
        let Some(slot) = st.slots[idx].as_ref() else {
            return false;
        };
        let fd = types::Fd(slot.fd);
        let iov = &st.iovs[idx].0[slot.first..];
        let entry = match slot.post.op {
            XferOp::Read => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(slot.offset)
                .build(),
            XferOp::Write => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(slot.offset)
                .build(),
        }
        .user_data(idx as u64);
        // SAFETY: the state lock serialises every use of the submission queue. The iovec array
        // lives in the slot until the completion of this entry is reaped, and the buffers it
        // points to are registered DRAM held by the post (its completion holds the local
        // regions, the post the file regions) until then. There is room: at most `depth`
        // entries are in flight and the ring has at least that many.
        let mut pushed = unsafe { self.ring.submission_shared().push(&entry) }.is_ok();
        if !pushed && self.ring.submit().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission_shared().push(&entry) }.is_ok();
        }
        if pushed {
            st.in_flight += 1;
            return true;
        }
        if let Some(slot) = st.slots[idx].take() {
            slot.post.record(Err(Error::Backend {
                backend: BackendName::Uring,
                op: "submit",
                reason: "submission queue full".into(),
            }));
            slot.post.finish_one();
        }
        st.free.push(idx);
        false
    }

    /// Handles every completion that has arrived.
    fn reap(&self, st: &mut State) {
        let mut done = std::mem::take(&mut st.reaped);
        done.clear();
        // SAFETY: the state lock serialises every use of the completion queue.
        let cq = unsafe { self.ring.completion_shared() };
        done.extend(cq.map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &done {
            st.in_flight -= 1;
            let idx = ud as usize;
            let State { slots, iovs, .. } = &mut *st;
            let Some(slot) = slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            if res == -libc::EINTR || res == -libc::EAGAIN {
                if !self.submit_slot(st, idx) {
                    continue;
                }
                let _ = self.ring.submit();
                continue;
            }
            let verb = match slot.post.op {
                XferOp::Read => "read",
                XferOp::Write => "write",
            };
            let outcome = if res < 0 {
                Err(Error::io(
                    format!(
                        "io_uring {verb}v fd {} at offset {} ({} bytes left)",
                        slot.fd, slot.offset, slot.left
                    ),
                    io::Error::from_raw_os_error(-res),
                ))
            } else if res == 0 {
                Err(Error::Backend {
                    backend: BackendName::Uring,
                    op: verb,
                    reason: format!(
                        "short {verb}: fd {} ends at offset {}, the request needs {} more bytes \
                         (file shorter than its registration, or truncated)",
                        slot.fd, slot.offset, slot.left
                    ),
                })
            } else {
                advance(slot, &mut iovs[idx].0, res as u64);
                if slot.left > 0 && !slot.post.should_skip() {
                    if self.submit_slot(st, idx) {
                        let _ = self.ring.submit();
                    }
                    continue;
                }
                Ok(())
            };
            if let Some(slot) = st.slots[idx].take() {
                slot.post.record(outcome);
                slot.post.finish_one();
            }
            st.free.push(idx);
        }
        st.reaped = done;
    }
}

/// Moves a slot past `n` bytes done.
fn advance(slot: &mut Slot, iov: &mut [libc::iovec], mut n: u64) {
    slot.left = slot.left.saturating_sub(n);
    slot.offset += n;
    while n > 0 && slot.first < iov.len() {
        let l = iov[slot.first].iov_len as u64;
        if n >= l {
            n -= l;
            slot.first += 1;
        } else {
            let v = &mut iov[slot.first];
            v.iov_base = (v.iov_base as u64 + n) as *mut libc::c_void;
            v.iov_len -= n as usize;
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_reasons_say_what_to_do() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let r = unavailable_reason(&eperm, Some("2\n"));
        assert!(r.contains("kernel.io_uring_disabled = 2"), "{r}");
        let r = unavailable_reason(&eperm, Some("0\n"));
        assert!(r.contains("seccomp"), "{r}");
        let r = unavailable_reason(&io::Error::from_raw_os_error(libc::ENOSYS), None);
        assert!(r.contains("no io_uring"), "{r}");
        let r = unavailable_reason(&io::Error::from_raw_os_error(libc::ENOMEM), None);
        assert!(r.contains("io_uring_setup failed"), "{r}");
    }
}
