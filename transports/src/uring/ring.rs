//! The ring: slots of operations in the kernel, filled and reaped under one lock by posting
//! threads and by the completion thread, which waits in the kernel for the rest.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use nixl_core::{BackendName, Error, Result, XferOp};
use parking_lot::{Condvar, Mutex};

use super::fixed::Fixed;
use crate::files::Post;

/// The ring and what is in it. Whoever holds `state` may touch the submission and completion
/// queues: a posting thread submits its operations and reaps what is already done (buffered
/// reads of cached pages complete during the submit, so they end on the posting thread with no
/// hand-off); the completion thread waits in the kernel for the rest, without the lock.
pub(super) struct Shared {
    pub(super) ring: IoUring,
    pub(super) state: Mutex<State>,
    /// Submitted operations: all, with a fixed file, from a registered buffer.
    pub(super) counts: [AtomicU64; 3],
    /// Wakes the completion thread when operations are left in flight (it sleeps here, not in
    /// the kernel, while the ring is idle).
    work: Condvar,
    pub(super) stopping: Arc<AtomicBool>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

pub(super) struct State {
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
    pub(super) fixed: Fixed,
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

/// The running ring: what posting threads share with the completion thread, and that thread.
pub(crate) struct RingThread {
    pub(super) shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RingThread {
    pub(super) fn start(ring: IoUring, depth: u32, fixed: Fixed) -> Result<RingThread> {
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
        Ok(RingThread {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Operations not started end their posts `Cancelled`; those in the kernel are waited for
    /// (their memory is in use until the kernel says so); then the thread exits.
    pub(super) fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.state.lock().stopped = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Takes a post's operations and runs as much as it can at once.
    pub(super) fn post(&self, post: Arc<Post>) {
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
