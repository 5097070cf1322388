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
//! # Registered buffers and fixed files
//!
//! A FILE registration puts its fd in the ring's fixed-file table, so operations skip the
//! kernel's per-operation file lookup; a DRAM registration up to `max_fixed_buffer` bytes
//! becomes a registered buffer (its pages are pinned once, at registration, instead of on every
//! operation), and an operation whose memory is one piece inside such a buffer is sent as
//! `READ_FIXED`/`WRITE_FIXED`. Both tables are sparse (`fixed_files`, `fixed_buffers` entries)
//! and updated in place as regions come and go. Where the kernel refuses one (a memlock limit,
//! memory that cannot be pinned, a full table), that region simply goes through
//! `readv`/`writev`, and `debug` logs say so; nothing else changes. A fixed file refers to the
//! file that was registered: closing and reusing the fd number for another file does not
//! redirect the registration.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::{Condvar, Mutex};

use crate::files::OwnAgent;
use crate::files::{prepare_files, IoOp, Post};

/// Settings of the `uring` backend (`[uring]` in the agent's configuration).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UringConfig {
    /// Operations kept in flight (and the ring's size).
    pub queue_depth: u32,
    /// Largest single operation.
    pub max_io_bytes: usize,
    /// `false` turns the backend off (it reports itself unavailable; `posix` serves files).
    pub enabled: bool,
    /// Entries of the fixed-file table (0: no fixed files).
    pub fixed_files: u32,
    /// Entries of the registered-buffer table (0: no registered buffers; the kernel allows
    /// 16384).
    pub fixed_buffers: u32,
    /// Largest DRAM registration made a registered buffer (the kernel's limit is 1 GiB).
    pub max_fixed_buffer: u64,
}

impl Default for UringConfig {
    fn default() -> UringConfig {
        UringConfig {
            queue_depth: 64,
            max_io_bytes: 1 << 20,
            enabled: true,
            fixed_files: 1024,
            fixed_buffers: 1024,
            max_fixed_buffer: 1 << 30,
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

impl UringBackend {
    /// Operations submitted since start: all of them, those that named a fixed file, and those
    /// sent as `READ_FIXED`/`WRITE_FIXED` from a registered buffer (zeros before start).
    pub fn op_counts(&self) -> UringCounts {
        self.ring
            .lock()
            .as_ref()
            .map(|r| {
                let c = &r.shared.counts;
                UringCounts {
                    ops: c[0].load(Ordering::Relaxed),
                    fixed_file_ops: c[1].load(Ordering::Relaxed),
                    fixed_buffer_ops: c[2].load(Ordering::Relaxed),
                }
            })
            .unwrap_or_default()
    }
}

/// What [`UringBackend::op_counts`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringCounts {
    /// Operations submitted (resubmissions of partial ones included).
    pub ops: u64,
    /// Of those, naming a fixed file.
    pub fixed_file_ops: u64,
    /// Of those, reading or writing a registered buffer.
    pub fixed_buffer_ops: u64,
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

const KINDS: &[MemKind] = &[MemKind::Dram, MemKind::File, MemKind::Block];
const FILE: &[MemKind] = &[MemKind::File, MemKind::Block];

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
        let fixed = Fixed::new(&ring, &self.cfg);
        *self.ring.lock() = Some(RingThread::start(ring, self.cfg.queue_depth, fixed)?);
        self.own.set(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        self.own.conn_info()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        crate::files::check_storage_region(kind, desc)?;
        if let Some(r) = self.ring.lock().as_ref() {
            let sh = &r.shared;
            let fx = &mut sh.state.lock().fixed;
            match kind {
                MemKind::File | MemKind::Block => fx.add_file(&sh.ring, desc.dev_id as i32),
                MemKind::Dram => fx.add_buffer(&sh.ring, desc, self.cfg.max_fixed_buffer),
                _ => {}
            }
        }
        Ok(Vec::new())
    }

    fn deregister(&self, region: &Region) {
        if let Some(r) = self.ring.lock().as_ref() {
            let sh = &r.shared;
            let fx = &mut sh.state.lock().fixed;
            match region.kind {
                MemKind::File | MemKind::Block => {
                    fx.remove_file(&sh.ring, region.desc.dev_id as i32)
                }
                MemKind::Dram => fx.remove_buffer(&sh.ring, &region.desc),
                _ => {}
            }
        }
    }

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
        let (ops, remote_regions) = prepare_files(
            BackendName::Uring,
            &self.target,
            &plan,
            self.max_io,
            MemKind::Dram,
        )?;
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
    /// Submitted operations: all, with a fixed file, from a registered buffer.
    counts: [AtomicU64; 3],
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
    /// The fixed-file and registered-buffer tables (under the same lock: filling a slot looks
    /// them up with no second lock).
    fixed: Fixed,
}

/// One operation in the kernel (or about to be): where it stands.
struct Slot {
    post: Arc<Post>,
    fd: i32,
    /// The fd's entry in the fixed-file table.
    fixed_file: Option<u32>,
    /// The registered buffer holding the operation's memory, when it is one piece.
    fixed_buf: Option<u16>,
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
    fn start(ring: IoUring, depth: u32, fixed: Fixed) -> Result<RingThread> {
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
                fixed,
            }),
            counts: Default::default(),
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
            let fixed_buf = match op.pieces.as_slice() {
                [(addr, len)] if *len <= u64::from(u32::MAX) => st.fixed.buffer_of(*addr, *len),
                _ => None,
            };
            let fixed_file = st.fixed.file_of(op.fd);
            st.slots[idx] = Some(Slot {
                fd: op.fd,
                fixed_file,
                fixed_buf,
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
        let iov = &st.iovs[idx].0[slot.first..];
        // One piece in a registered buffer goes as READ/WRITE_FIXED (its length fits in u32:
        // checked when the slot was filled); the fd is its fixed-table entry where it has one.
        macro_rules! entry {
            ($fd:expr) => {
                match (slot.post.op, slot.fixed_buf, iov) {
                    (XferOp::Read, Some(b), [v]) => {
                        opcode::ReadFixed::new($fd, v.iov_base.cast(), v.iov_len as u32, b)
                            .offset(slot.offset)
                            .build()
                    }
                    (XferOp::Write, Some(b), [v]) => {
                        opcode::WriteFixed::new($fd, v.iov_base.cast(), v.iov_len as u32, b)
                            .offset(slot.offset)
                            .build()
                    }
                    (XferOp::Read, ..) => opcode::Readv::new($fd, iov.as_ptr(), iov.len() as u32)
                        .offset(slot.offset)
                        .build(),
                    (XferOp::Write, ..) => opcode::Writev::new($fd, iov.as_ptr(), iov.len() as u32)
                        .offset(slot.offset)
                        .build(),
                }
            };
        }
        let entry = match slot.fixed_file {
            Some(f) => entry!(types::Fixed(f)),
            None => entry!(types::Fd(slot.fd)),
        }
        .user_data(idx as u64);
        let counted = [
            true,
            slot.fixed_file.is_some(),
            slot.fixed_buf.is_some() && iov.len() == 1,
        ];
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
            for (c, on) in self.counts.iter().zip(counted) {
                if on {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
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

/// The ring's fixed-file and registered-buffer tables, updated in place as regions come and go.
#[derive(Debug, Default)]
struct Fixed {
    /// fd → (table entry, registrations using it).
    files: HashMap<i32, (u32, usize)>,
    free_files: Vec<u32>,
    /// Registered buffers by start address: (end, table entry, registrations using it).
    bufs: BTreeMap<u64, (u64, u16, usize)>,
    free_bufs: Vec<u16>,
}

impl Fixed {
    /// Creates the sparse tables the configuration asks for; a table the kernel refuses is
    /// left empty (operations then name fds and map memory per operation, as before).
    fn new(ring: &IoUring, cfg: &UringConfig) -> Fixed {
        let mut fx = Fixed::default();
        let sub = ring.submitter();
        if cfg.fixed_files > 0 {
            match sub.register_files_sparse(cfg.fixed_files) {
                Ok(()) => fx.free_files = (0..cfg.fixed_files).rev().collect(),
                Err(e) => tracing::info!(error = %e, "io_uring: no fixed-file table"),
            }
        }
        let nbufs = cfg.fixed_buffers.min(u32::from(u16::MAX));
        if nbufs > 0 {
            match sub.register_buffers_sparse(nbufs) {
                Ok(()) => fx.free_bufs = (0..nbufs as u16).rev().collect(),
                Err(e) => tracing::info!(error = %e, "io_uring: no registered-buffer table"),
            }
        }
        fx
    }

    fn add_file(&mut self, ring: &IoUring, fd: i32) {
        if let Some(e) = self.files.get_mut(&fd) {
            e.1 += 1;
            return;
        }
        let Some(slot) = self.free_files.pop() else {
            tracing::debug!(
                fd,
                "io_uring: fixed-file table full; this fd goes by number"
            );
            return;
        };
        match ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => {
                self.files.insert(fd, (slot, 1));
            }
            Err(e) => {
                tracing::debug!(fd, error = %e, "io_uring: fd not made a fixed file");
                self.free_files.push(slot);
            }
        }
    }

    fn remove_file(&mut self, ring: &IoUring, fd: i32) {
        let Some(e) = self.files.get_mut(&fd) else {
            return;
        };
        e.1 -= 1;
        if e.1 > 0 {
            return;
        }
        let slot = e.0;
        self.files.remove(&fd);
        // The core removes a region only when no transfer uses it; an operation the kernel
        // still holds keeps its own reference to the file.
        if let Err(e) = ring.submitter().register_files_update(slot, &[-1]) {
            tracing::warn!(fd, error = %e, "io_uring: fixed-file entry not cleared; not reused");
            return;
        }
        self.free_files.push(slot);
    }

    fn file_of(&self, fd: i32) -> Option<u32> {
        self.files.get(&fd).map(|e| e.0)
    }

    fn add_buffer(&mut self, ring: &IoUring, desc: &Desc, max: u64) {
        if desc.len == 0 || desc.len > max || desc.len > usize::MAX as u64 {
            return;
        }
        let Some(end) = desc.addr.checked_add(desc.len) else {
            return;
        };
        if let Some(e) = self.bufs.get_mut(&desc.addr).filter(|e| e.0 == end) {
            e.2 += 1;
            return;
        }
        if self.bufs.contains_key(&desc.addr) {
            return;
        }
        let Some(slot) = self.free_bufs.pop() else {
            tracing::debug!(
                addr = desc.addr,
                len = desc.len,
                "io_uring: registered-buffer table full; this region maps per operation"
            );
            return;
        };
        let iov = libc::iovec {
            iov_base: desc.addr as *mut libc::c_void,
            iov_len: desc.len as usize,
        };
        // SAFETY: the range is DRAM the caller registered with the agent, valid until it is
        // deregistered (`Agent::register`'s contract); the kernel pins its pages now and keeps
        // them until the entry is replaced in `remove_buffer` and its last operation is done.
        match unsafe {
            ring.submitter()
                .register_buffers_update(u32::from(slot), &[iov], None)
        } {
            Ok(()) => {
                self.bufs.insert(desc.addr, (end, slot, 1));
            }
            Err(e) => {
                tracing::debug!(addr = desc.addr, len = desc.len, error = %e,
                    "io_uring: region not made a registered buffer; it maps per operation");
                self.free_bufs.push(slot);
            }
        }
    }

    fn remove_buffer(&mut self, ring: &IoUring, desc: &Desc) {
        let end = desc.addr.wrapping_add(desc.len);
        let Some(e) = self.bufs.get_mut(&desc.addr).filter(|e| e.0 == end) else {
            return;
        };
        e.2 -= 1;
        if e.2 > 0 {
            return;
        }
        let slot = e.1;
        self.bufs.remove(&desc.addr);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty entry names no memory; the kernel drops the old pages once the
        // operations still using them complete.
        match unsafe {
            ring.submitter()
                .register_buffers_update(u32::from(slot), &[empty], None)
        } {
            Ok(()) => self.free_bufs.push(slot),
            Err(e) => tracing::warn!(error = %e,
                "io_uring: registered buffer not cleared; its entry is not reused"),
        }
    }

    /// The registered buffer that holds `[addr, addr + len)`, if any.
    fn buffer_of(&self, addr: u64, len: u64) -> Option<u16> {
        let (_, &(end, slot, _)) = self.bufs.range(..=addr).next_back()?;
        (addr.checked_add(len)? <= end).then_some(slot)
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
    fn buffer_lookup_finds_only_ranges_wholly_inside_one_buffer() {
        let mut fx = Fixed::default();
        fx.bufs.insert(1000, (2000, 3, 1));
        fx.bufs.insert(4096, (8192, 7, 1));
        assert_eq!(fx.buffer_of(1000, 1000), Some(3));
        assert_eq!(fx.buffer_of(1500, 10), Some(3));
        assert_eq!(fx.buffer_of(1999, 2), None, "runs past the end");
        assert_eq!(fx.buffer_of(999, 1), None, "starts before the first");
        assert_eq!(fx.buffer_of(3000, 10), None, "between buffers");
        assert_eq!(fx.buffer_of(8000, 192), Some(7));
        assert_eq!(fx.buffer_of(u64::MAX - 1, 5), None, "overflow");
    }

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
