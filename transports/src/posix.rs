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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::Mutex;

pub use crate::files::MAX_IOV;
use crate::files::{prepare_files, IoOp, OwnAgent, Post};

/// Settings of the `posix` backend (`[posix]` in the agent's configuration).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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

#[derive(Debug)]
struct PosixXfer {
    op: XferOp,
    ops: Arc<[IoOp]>,
    remote_regions: Arc<[Arc<Region>]>,
    pool: PoolHandle,
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

/// Runs operation `i` of `post` unless the post is over, then counts it done.
fn run(post: &Post, i: usize) {
    if !post.should_skip() {
        post.record(run_op(post.op, &post.ops[i]));
    }
    post.finish_one();
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
            run(&post, 0);
            return;
        }
        for i in 0..self.ops.len() {
            if let Err(job) = self.pool.send(Job {
                post: Arc::clone(&post),
                index: i,
            }) {
                // The pool is gone (shutdown): finish this operation as cancelled.
                job.post.stopping.store(true, Ordering::Release);
                run(&job.post, job.index);
            }
        }
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
                        Ok(job) => run(&job.post, job.index),
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
