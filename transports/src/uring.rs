//! The `uring` backend: DRAM ↔ FILE through io_uring.
//!
//! Registrations and requests are those of [`crate::posix`] (FILE descriptors are
//! `(offset, length, fd)`; the agent names itself as the remote), and so are the checks made
//! when a request is created: the fd's mode, `O_DIRECT` alignment, the file regions' keys.
//!
//! One ring thread owns the ring. Posts reach it through a queue; it cuts nothing itself (the
//! operations are planned when the request is created: one `readv`/`writev` per run of
//! contiguous file ranges on an fd, at most `max_io_bytes`) and keeps up to `queue_depth`
//! operations in flight, submitting every operation it can in one `io_uring_enter` and refilling
//! the ring as completions arrive, rather than waiting op by op. A completion that moved fewer
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
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::Mutex;

use crate::files::inspect_fd;
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
    target: Mutex<Option<TargetHandle>>,
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
            target: Mutex::new(None),
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
    IoUring::new(depth.max(2)).map_err(|e| {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
        unavailable_reason(&e, sysctl.as_deref())
    })
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
        *self.target.lock() = Some(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        let instance = self.target.lock().as_ref().map_or(0, |t| t.instance_id());
        instance.to_le_bytes().to_vec()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        if kind == MemKind::File {
            inspect_fd(desc.dev_id)?;
        }
        Ok(Vec::new())
    }

    fn deregister(&self, _region: &Region) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        if conn_info == self.conn_info().as_slice() {
            Ok(())
        } else {
            Err(
                "files are reached by their own agent only (name the agent itself as the remote)"
                    .into(),
            )
        }
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let target = self
            .target
            .lock()
            .clone()
            .ok_or_else(|| Error::Shutdown("uring backend not started".into()))?;
        if peer.instance_id != target.instance_id() {
            return Err(Error::Backend {
                backend: BackendName::Uring,
                op: "connect",
                reason: format!(
                    "'{}' is another agent: uring reaches this agent's files only",
                    peer.name
                ),
            });
        }
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
        self.target.lock().take();
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
            &self.queue.stopping,
        ) else {
            return;
        };
        if let Err(post) = self.queue.send(post) {
            // The ring is gone (shutdown): every operation ends the post as cancelled.
            for _ in 0..post.ops.len() {
                let _ = post.should_skip();
                post.finish_one();
            }
        }
    }
}

/// The way into the ring thread.
#[derive(Clone, Debug)]
struct Queue {
    tx: Arc<Mutex<Option<Sender<Arc<Post>>>>>,
    stopping: Arc<AtomicBool>,
}

impl Queue {
    fn send(&self, post: Arc<Post>) -> std::result::Result<(), Arc<Post>> {
        match &*self.tx.lock() {
            Some(tx) => tx.send(post).map_err(|e| e.0),
            None => Err(post),
        }
    }
}

struct RingThread {
    queue: Queue,
    thread: std::thread::JoinHandle<()>,
}

impl RingThread {
    fn start(ring: IoUring, depth: u32) -> Result<RingThread> {
        let (tx, rx) = channel();
        let queue = Queue {
            tx: Arc::new(Mutex::new(Some(tx))),
            stopping: Arc::new(AtomicBool::new(false)),
        };
        let thread = std::thread::Builder::new()
            .name("nixl-uring".into())
            .spawn(move || Ring::new(ring, depth as usize).run(rx))
            .map_err(|e| Error::io("spawning the uring thread", e))?;
        Ok(RingThread { queue, thread })
    }

    fn queue(&self) -> Queue {
        self.queue.clone()
    }

    /// Operations not started end their posts `Cancelled`; those in the kernel are waited for
    /// (their memory is in use until the kernel says so); then the thread exits.
    fn stop(self) {
        self.queue.stopping.store(true, Ordering::Release);
        self.queue.tx.lock().take();
        let _ = self.thread.join();
    }
}

/// One operation in the kernel (or about to be): where it stands.
struct Slot {
    post: Arc<Post>,
    fd: i32,
    /// The iovecs still to move (the kernel reads this array until the operation completes).
    iov: Vec<libc::iovec>,
    first: usize,
    offset: u64,
    left: u64,
}

struct Ring {
    ring: IoUring,
    depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    pending: VecDeque<(Arc<Post>, usize)>,
    in_flight: usize,
}

impl Ring {
    fn new(ring: IoUring, depth: usize) -> Ring {
        let depth = depth.clamp(1, ring.params().sq_entries() as usize);
        Ring {
            ring,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            pending: VecDeque::new(),
            in_flight: 0,
        }
    }

    fn run(mut self, rx: Receiver<Arc<Post>>) {
        let mut open = true;
        loop {
            // Take new posts: block only when there is nothing else to do.
            if open && self.in_flight == 0 && self.pending.is_empty() {
                match rx.recv() {
                    Ok(p) => self.enqueue(p),
                    Err(_) => open = false,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(p) => self.enqueue(p),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.fill();
            if self.in_flight == 0 {
                if !open && self.pending.is_empty() {
                    return;
                }
                continue;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    // The kernel still owns what is in flight: retry rather than give up on
                    // memory it may write.
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.reap();
        }
    }

    fn enqueue(&mut self, post: Arc<Post>) {
        for i in 0..post.ops.len() {
            self.pending.push_back((Arc::clone(&post), i));
        }
    }

    /// Puts pending operations into the ring, up to the queue depth.
    fn fill(&mut self) {
        while self.in_flight < self.depth {
            let Some((post, i)) = self.pending.pop_front() else {
                return;
            };
            if post.should_skip() {
                post.finish_one();
                continue;
            }
            let op = &post.ops[i];
            let iov: Vec<libc::iovec> = op
                .pieces
                .iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len as usize,
                })
                .collect();
            let slot = Slot {
                fd: op.fd,
                left: op.len(),
                offset: op.offset,
                first: 0,
                iov,
                post: Arc::clone(&post),
            };
            let Some(idx) = self.free.pop() else {
                self.pending.push_front((post, i));
                return;
            };
            self.slots[idx] = Some(slot);
            self.submit(idx);
        }
    }

    /// Pushes the submission of slot `idx` (its remaining iovecs at its offset).
    fn submit(&mut self, idx: usize) {
        let Some(slot) = self.slots[idx].as_ref() else {
            return;
        };
        let fd = types::Fd(slot.fd);
        let iov = &slot.iov[slot.first..];
        let entry = match slot.post.op {
            XferOp::Read => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(slot.offset)
                .build(),
            XferOp::Write => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(slot.offset)
                .build(),
        }
        .user_data(idx as u64);
        // SAFETY: the iovec array lives in the slot until the completion of this entry is
        // reaped, and the buffers it points to are registered DRAM held by the post (its
        // completion holds the local regions, the post the file regions) until then. There is
        // room: at most `depth` entries are in flight and the ring has at least that many.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Cannot happen (see above); keep the operation for later rather than lose it.
            if self.ring.submit().is_ok() {
                // SAFETY: as above.
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    self.in_flight += 1;
                    return;
                }
            }
            if let Some(slot) = self.slots[idx].take() {
                slot.post.record(Err(Error::Backend {
                    backend: BackendName::Uring,
                    op: "submit",
                    reason: "submission queue full".into(),
                }));
                slot.post.finish_one();
            }
            self.free.push(idx);
            return;
        }
        self.in_flight += 1;
    }

    /// Handles every completion that has arrived.
    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            self.in_flight -= 1;
            let idx = ud as usize;
            let Some(slot) = self.slots[idx].as_mut() else {
                continue;
            };
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.submit(idx);
                continue;
            }
            let outcome = if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                let what = match slot.post.op {
                    XferOp::Read => "readv",
                    XferOp::Write => "writev",
                };
                Err(Error::io(
                    format!(
                        "io_uring {what} fd {} at offset {} ({} bytes left)",
                        slot.fd, slot.offset, slot.left
                    ),
                    e,
                ))
            } else if res == 0 {
                Err(Error::Backend {
                    backend: BackendName::Uring,
                    op: if slot.post.op == XferOp::Read {
                        "read"
                    } else {
                        "write"
                    },
                    reason: format!(
                        "short {}: fd {} ends at offset {}, the request needs {} more bytes \
                         (file shorter than its registration, or truncated)",
                        if slot.post.op == XferOp::Read {
                            "read"
                        } else {
                            "write"
                        },
                        slot.fd,
                        slot.offset,
                        slot.left
                    ),
                })
            } else {
                advance(slot, res as u64);
                if slot.left > 0 && !slot.post.should_skip() {
                    self.submit(idx);
                    continue;
                }
                Ok(())
            };
            if let Some(slot) = self.slots[idx].take() {
                slot.post.record(outcome);
                slot.post.finish_one();
            }
            self.free.push(idx);
        }
    }
}

/// Moves a slot past `n` bytes done.
fn advance(slot: &mut Slot, mut n: u64) {
    slot.left = slot.left.saturating_sub(n);
    slot.offset += n;
    while n > 0 && slot.first < slot.iov.len() {
        let l = slot.iov[slot.first].iov_len as u64;
        if n >= l {
            n -= l;
            slot.first += 1;
        } else {
            let v = &mut slot.iov[slot.first];
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
