//! The `posix` backend: DRAM ↔ FILE with `preadv`/`pwritev` on a small thread pool.
//!
//! A FILE registration is a descriptor `(offset, length, fd)`: `fd` is a file descriptor the
//! caller opened and keeps open while it is registered (as in NIXL). Registration checks that
//! it is an open regular file or block device and records whether it was opened for writing,
//! so a WRITE into a read-only file fails when the request is created, not half-way through.
//! A transfer names the agent itself as the remote: READ moves file → memory, WRITE memory →
//! file. BLOCK registrations are the same triple on a raw block device (an NVMe namespace, a
//! loop device), which must be one and must contain the range (`BLKGETSIZE64`); `uring` takes
//! them the same way.
//!
//! Posting cuts a request into I/O operations: consecutive descriptors whose file ranges follow
//! each other on one fd become one `preadv`/`pwritev` (up to [`MAX_IOV`] pieces), and an
//! operation is at most `max_io_bytes` long so a large request spreads over the workers. The
//! workers run the operations in parallel; the last one to finish completes the request. Every
//! operation finishes what it was given: partial reads and writes are resumed, `EINTR` is
//! retried, and a read that meets the end of the file (a file shorter than its registration,
//! or truncated under the agent) ends the request Failed with the offset; ENOSPC, EIO and
//! every other error likewise, with the fd and offset. A request ends Done only when every
//! byte has been read or written.
//!
//! This is the fallback for files and the baseline that the `uring` backend is measured
//! against.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use nixl_core::region::{enter_all, leave_all, Ticket};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::Mutex;

use crate::files::{check_request, inspect_fd, OwnAgent};

/// Most pieces in one `preadv`/`pwritev` (Linux's `IOV_MAX`).
pub const MAX_IOV: usize = 1024;

/// Settings of the `posix` backend (`[posix]` in the agent's configuration).
#[derive(Clone, Debug)]
pub struct PosixConfig {
    /// Worker threads that run the I/O.
    pub threads: usize,
    /// Largest single operation; larger requests are cut so the workers share them.
    pub max_io_bytes: usize,
}

impl Default for PosixConfig {
    fn default() -> PosixConfig {
        PosixConfig {
            threads: 4,
            max_io_bytes: 4 << 20,
        }
    }
}

/// The `posix` backend.
pub struct PosixBackend {
    cfg: PosixConfig,
    own: OwnAgent,
    pool: Mutex<Option<Pool>>,
}

impl fmt::Debug for PosixBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PosixBackend")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl PosixBackend {
    /// A backend with these settings (threads start with the agent).
    pub fn new(cfg: PosixConfig) -> PosixBackend {
        PosixBackend {
            cfg,
            own: OwnAgent::default(),
            pool: Mutex::new(None),
        }
    }
}

const KINDS: &[MemKind] = &[MemKind::Dram, MemKind::File, MemKind::Block];
const FILE: &[MemKind] = &[MemKind::File, MemKind::Block];

fn backend_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Posix,
        op,
        reason: reason.into(),
    }
}

impl Backend for PosixBackend {
    fn name(&self) -> BackendName {
        BackendName::Posix
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
        if self.cfg.threads == 0 {
            return Err("[posix] threads is 0".into());
        }
        if self.cfg.max_io_bytes == 0 {
            return Err("[posix] max_io_bytes is 0".into());
        }
        Ok(())
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        *self.pool.lock() = Some(Pool::start(self.cfg.threads)?);
        self.own.set(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        self.own.conn_info()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        crate::files::check_storage_region(kind, desc)?;
        Ok(Vec::new())
    }

    fn deregister(&self, _region: &Region) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        self.own.can_reach(conn_info, "files")
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let target = self.own.connect(BackendName::Posix, peer)?;
        let pool = self
            .pool
            .lock()
            .as_ref()
            .map(Pool::handle)
            .ok_or_else(|| Error::Shutdown("posix backend shut down".into()))?;
        Ok(Arc::new(PosixConn {
            target,
            pool,
            max_io: self.cfg.max_io_bytes,
        }))
    }

    fn shutdown(&self) {
        if let Some(p) = self.pool.lock().take() {
            p.stop();
        }
        self.own.clear();
    }
}

#[derive(Debug)]
struct PosixConn {
    target: TargetHandle,
    pool: PoolHandle,
    max_io: usize,
}

/// One `preadv`/`pwritev`: file range `[offset, offset + len)` of `fd`, to or from `pieces`.
#[derive(Clone, Debug)]
pub(crate) struct IoOp {
    pub(crate) fd: i32,
    pub(crate) offset: u64,
    /// (address, length) in registered DRAM, in file order.
    pub(crate) pieces: Vec<(u64, u64)>,
}

impl IoOp {
    pub(crate) fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.1).sum()
    }
}

/// Cuts the segments into operations: contiguous file ranges on one fd are merged (up to
/// `MAX_IOV` pieces and `max_io` bytes), long ones split.
pub(crate) fn plan_ops(segments: &[(Desc, Desc)], max_io: u64) -> Vec<IoOp> {
    let mut ops: Vec<IoOp> = Vec::new();
    for (mem, file) in segments {
        let mut done = 0u64;
        while done < mem.len {
            let (addr, off) = (mem.addr + done, file.addr + done);
            let fd = file.dev_id as i32;
            let room = match ops.last() {
                Some(op)
                    if op.fd == fd
                        && op.offset + op.len() == off
                        && op.pieces.len() < MAX_IOV
                        && op.len() < max_io =>
                {
                    max_io - op.len()
                }
                _ => {
                    ops.push(IoOp {
                        fd,
                        offset: off,
                        pieces: Vec::new(),
                    });
                    max_io
                }
            };
            let take = room.min(mem.len - done);
            let op = ops.last_mut().expect("pushed above");
            match op.pieces.last_mut() {
                Some(last) if last.0 + last.1 == addr => last.1 += take,
                _ => op.pieces.push((addr, take)),
            }
            done += take;
        }
    }
    ops
}

#[derive(Debug)]
struct PosixXfer {
    op: XferOp,
    ops: Arc<[IoOp]>,
    remote_regions: Arc<[Arc<Region>]>,
    pool: PoolHandle,
}

/// The I/O operations of a request and the file regions each post holds.
pub(crate) type FilePlan = (Arc<[IoOp]>, Arc<[Arc<Region>]>);

/// (index in the request, memory, file) of one descriptor pair.
pub(crate) type Pair = (usize, Desc, Desc);

/// What the file backends prepare from a plan: the owner-side check of every file region
/// (held on each post), the per-fd checks, and the I/O operations. `mem` is the memory kind
/// the backend moves to and from files (DRAM, or VRAM for `gds`).
pub(crate) fn prepare_files(
    backend: BackendName,
    target: &TargetHandle,
    plan: &XferPlan,
    max_io: usize,
    mem: MemKind,
) -> Result<FilePlan> {
    if plan.local_kind != mem || !matches!(plan.remote_kind, MemKind::File | MemKind::Block) {
        return Err(Error::InvalidArgument(format!(
            "{backend} moves {mem} <-> FILE or BLOCK, not {} <-> {}",
            plan.local_kind, plan.remote_kind
        )));
    }
    let mut remote_regions = Vec::with_capacity(plan.remote_regions.len());
    for (i, r) in plan.remote_regions.iter().enumerate() {
        let access = target
            .check(r.kind, &r.desc, r.key)
            .map_err(|denied| Error::Denied {
                peer: target.name().to_owned(),
                reason: format!("file region {i} {:?}: {denied}", r.desc),
            })?;
        remote_regions.push(Arc::clone(access.region()));
    }
    check_files(plan)?;
    let segs: Vec<(Desc, Desc)> = plan.segments.iter().map(|s| (s.local, s.remote)).collect();
    let ops = plan_ops(&segs, max_io.max(1) as u64);
    Ok((ops.into(), remote_regions.into()))
}

impl Connection for PosixConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let (ops, remote_regions) = prepare_files(
            BackendName::Posix,
            &self.target,
            &plan,
            self.max_io,
            MemKind::Dram,
        )?;
        Ok(Box::new(PosixXfer {
            op: plan.op,
            ops,
            remote_regions,
            pool: self.pool.clone(),
        }))
    }

    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Err(backend_err(
            "notification",
            "posix carries no notifications",
        ))
    }

    fn close(&self) {}
}

/// Checks every fd of the request: open for the operation, and for `O_DIRECT` every
/// descriptor aligned. Checked when the request is created rather than cached at
/// registration, since fd numbers are reused.
pub(crate) fn check_files(plan: &XferPlan) -> Result<()> {
    let mut by_fd: Vec<(u64, Vec<Pair>)> = Vec::new();
    for (i, s) in plan.segments.iter().enumerate() {
        let fd = s.remote.dev_id;
        match by_fd.iter_mut().find(|(f, _)| *f == fd) {
            Some((_, v)) => v.push((i, s.local, s.remote)),
            None => by_fd.push((fd, vec![(i, s.local, s.remote)])),
        }
    }
    for (fd, pairs) in &by_fd {
        let mut info = inspect_fd(*fd)?;
        if plan.local_kind != MemKind::Dram {
            // Device memory reaches O_DIRECT files through its backend's own alignment rules
            // (cuFile bounces what is not aligned); only file offsets are checked here.
            info.mem_align = 1;
        }
        check_request(&info, *fd, plan.op, pairs)?;
    }
    Ok(())
}

/// One post in progress: shared by the threads that run its operations (the `posix` workers,
/// or the `uring` ring thread). The last operation to finish completes the request.
pub(crate) struct Post {
    pub(crate) op: XferOp,
    pub(crate) ops: Arc<[IoOp]>,
    left: AtomicUsize,
    failed: Mutex<Option<Error>>,
    done: Mutex<Option<Completion>>,
    abandoned: AtomicBool,
    regions: Arc<[Arc<Region>]>,
    ticket: Option<Ticket>,
    stopping: Arc<AtomicBool>,
}

impl Drop for Post {
    fn drop(&mut self) {
        leave_all(&self.regions, |r| &r.gate, self.ticket);
    }
}

impl Post {
    /// Holds the file regions and starts a post of `ops`; `Err` gives the completion back
    /// with the reason when a region was deregistered.
    pub(crate) fn start(
        op: XferOp,
        ops: &Arc<[IoOp]>,
        regions: &Arc<[Arc<Region>]>,
        done: Completion,
        stopping: &Arc<AtomicBool>,
    ) -> Option<Arc<Post>> {
        let ticket = match enter_all(regions, |r| &r.gate) {
            Ok(t) => t,
            Err(i) => {
                let peer = done.info().peer.to_string();
                done.complete(Err(Error::Denied {
                    peer,
                    reason: format!("file region {:?} was deregistered", regions[i].desc),
                }));
                return None;
            }
        };
        Some(Arc::new(Post {
            op,
            ops: Arc::clone(ops),
            left: AtomicUsize::new(ops.len()),
            failed: Mutex::new(None),
            done: Mutex::new(Some(done)),
            abandoned: AtomicBool::new(false),
            regions: Arc::clone(regions),
            ticket,
            stopping: Arc::clone(stopping),
        }))
    }

    /// Whether the next operation should not run: the post failed, was cancelled or timed
    /// out, or the backend is stopping (which fails the post as Cancelled).
    pub(crate) fn should_skip(&self) -> bool {
        if self.stopping.load(Ordering::Acquire) && !self.abandoned.swap(true, Ordering::AcqRel) {
            self.record(Err(Error::Cancelled));
        }
        self.abandoned.load(Ordering::Acquire)
            || self
                .done
                .lock()
                .as_ref()
                .is_none_or(Completion::is_abandoned)
    }

    /// Records an operation's outcome (the first error wins).
    pub(crate) fn record(&self, r: Result<()>) {
        if let Err(e) = r {
            self.abandoned.store(true, Ordering::Release);
            let mut f = self.failed.lock();
            if f.is_none() {
                *f = Some(e);
            }
        }
    }

    /// One operation is over (run, failed or skipped); the last one completes the request.
    pub(crate) fn finish_one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A cancelled or timed-out post has already ended: `complete` then changes nothing.
            let outcome = match self.failed.lock().take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            if let Some(done) = self.done.lock().take() {
                done.complete(outcome);
            }
        }
    }

    fn run(&self, i: usize) {
        if !self.should_skip() {
            self.record(run_op(self.op, &self.ops[i]));
        }
        self.finish_one();
    }
}

/// Runs one operation to the end: resumes partial transfers, retries EINTR.
fn run_op(op: XferOp, io_op: &IoOp) -> Result<()> {
    let mut iov: Vec<libc::iovec> = io_op
        .pieces
        .iter()
        .map(|&(addr, len)| libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len as usize,
        })
        .collect();
    let total = io_op.len();
    let mut moved = 0u64;
    let mut first = 0usize;
    while moved < total {
        let off = io_op.offset + moved;
        let n = iov.len() - first;
        // SAFETY: every iovec lies in registered DRAM held by this post's completion (the
        // local regions) for as long as the post runs; the pieces were checked inside their
        // regions when the request was created. preadv writes, pwritev reads, at most the
        // iovecs' lengths.
        let r = unsafe {
            match op {
                XferOp::Read => libc::preadv(
                    io_op.fd,
                    iov.as_ptr().add(first),
                    n as i32,
                    off as libc::off_t,
                ),
                XferOp::Write => libc::pwritev(
                    io_op.fd,
                    iov.as_ptr().add(first),
                    n as i32,
                    off as libc::off_t,
                ),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let what = if op == XferOp::Read {
                "preadv"
            } else {
                "pwritev"
            };
            return Err(Error::io(
                format!(
                    "{what} fd {} at offset {off} ({} bytes left)",
                    io_op.fd,
                    total - moved
                ),
                e,
            ));
        }
        if r == 0 {
            return Err(match op {
                XferOp::Read => backend_err(
                    "read",
                    format!(
                        "short read: fd {} ends at offset {off}, the request needs {} more bytes \
                         (file shorter than its registration, or truncated)",
                        io_op.fd,
                        total - moved
                    ),
                ),
                XferOp::Write => backend_err(
                    "write",
                    format!("pwritev on fd {} at offset {off} wrote nothing", io_op.fd),
                ),
            });
        }
        let mut r = r as u64;
        moved += r;
        // Drop the iovecs fully done and trim the one done in part.
        while r > 0 && first < iov.len() {
            let l = iov[first].iov_len as u64;
            if r >= l {
                r -= l;
                first += 1;
            } else {
                // SAFETY: advancing inside the same iovec by less than its length.
                iov[first].iov_base =
                    unsafe { iov[first].iov_base.cast::<u8>().add(r as usize) }.cast();
                iov[first].iov_len -= r as usize;
                r = 0;
            }
        }
    }
    Ok(())
}

impl PreparedXfer for PosixXfer {
    fn post(&self, done: Completion) {
        let Some(post) = Post::start(
            self.op,
            &self.ops,
            &self.remote_regions,
            done,
            &self.pool.stopping,
        ) else {
            return;
        };
        if self.ops.len() == 1 && self.ops[0].len() <= 64 << 10 {
            // Small: no thread hand-off.
            post.run(0);
            return;
        }
        for i in 0..self.ops.len() {
            if let Err(job) = self.pool.send(Job {
                post: Arc::clone(&post),
                index: i,
            }) {
                // The pool is gone (shutdown): finish this operation as cancelled.
                job.post.stopping.store(true, Ordering::Release);
                job.post.run(job.index);
            }
        }
    }
}

impl fmt::Debug for Post {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Post")
            .field("ops", &self.ops.len())
            .field("left", &self.left.load(Ordering::Relaxed))
            .finish()
    }
}

struct Job {
    post: Arc<Post>,
    index: usize,
}

/// The worker threads.
struct Pool {
    tx: PoolHandle,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The pool's queue, shared by connections and requests; emptied (`None`) when the pool stops.
#[derive(Clone, Debug)]
struct PoolHandle {
    tx: Arc<Mutex<Option<Sender<Job>>>>,
    /// Set when the backend shuts down: operations not yet started end the request Cancelled.
    stopping: Arc<AtomicBool>,
}

impl PoolHandle {
    fn send(&self, job: Job) -> std::result::Result<(), Job> {
        match &*self.tx.lock() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl Pool {
    fn start(n: usize) -> Result<Pool> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx: Arc<Mutex<Receiver<Job>>> = Arc::clone(&rx);
            let t = std::thread::Builder::new()
                .name(format!("nixl-posix-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().recv();
                    match job {
                        Ok(job) => job.post.run(job.index),
                        Err(_) => return,
                    }
                })
                .map_err(|e| Error::io("spawning posix workers", e))?;
            threads.push(t);
        }
        Ok(Pool {
            tx: PoolHandle {
                tx: Arc::new(Mutex::new(Some(tx))),
                stopping: Arc::new(AtomicBool::new(false)),
            },
            threads,
        })
    }

    fn handle(&self) -> PoolHandle {
        self.tx.clone()
    }

    /// Stops taking work; queued operations still run (they end quickly once their requests
    /// are cancelled), then the workers exit.
    fn stop(self) {
        self.tx.stopping.store(true, Ordering::Release);
        // The only sender: once it is gone the workers drain the queue and see the end.
        self.tx.tx.lock().take();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, off: u64, len: u64, fd: u64) -> (Desc, Desc) {
        (Desc::new(addr, len, 0), Desc::new(off, len, fd))
    }

    #[test]
    fn contiguous_file_ranges_merge_and_long_ones_split() {
        // Two pieces adjacent in the file (not in memory), then a jump.
        let ops = plan_ops(
            &[
                seg(1000, 0, 10, 3),
                seg(5000, 10, 20, 3),
                seg(9000, 100, 5, 3),
            ],
            1 << 20,
        );
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].pieces, vec![(1000, 10), (5000, 20)]);
        assert_eq!((ops[1].offset, ops[1].len()), (100, 5));
        // Another fd never merges.
        let ops = plan_ops(&[seg(0, 0, 10, 3), seg(10, 10, 10, 4)], 1 << 20);
        assert_eq!(ops.len(), 2);
        // Adjacent in memory and file: one piece.
        let ops = plan_ops(&[seg(0, 0, 10, 3), seg(10, 10, 10, 3)], 1 << 20);
        assert_eq!(ops[0].pieces, vec![(0, 20)]);
        // Split at max_io, every byte once, in order.
        let ops = plan_ops(&[seg(0, 0, 25, 3)], 10);
        let lens: Vec<u64> = ops.iter().map(IoOp::len).collect();
        assert_eq!(lens, vec![10, 10, 5]);
        assert_eq!(ops[2].offset, 20);
        assert_eq!(ops[2].pieces, vec![(20, 5)]);
    }

    #[test]
    fn iov_max_bounds_one_operation() {
        let segs: Vec<_> = (0..2500u64).map(|i| seg(i * 100, i * 10, 10, 3)).collect();
        let ops = plan_ops(&segs, 1 << 30);
        assert_eq!(ops.len(), 3);
        assert!(ops.iter().all(|o| o.pieces.len() <= MAX_IOV));
        assert_eq!(ops.iter().map(IoOp::len).sum::<u64>(), 25_000);
    }
}
