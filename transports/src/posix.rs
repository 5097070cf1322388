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
//! each other on one fd become one `preadv`/`pwritev` (up to `MAX_IOV` pieces), and an
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

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixl_core::{
    BackendName, Desc, Error, MemKind, Registered, Result, Unusable, XferOp, XferPlan,
};

use crate::files::{check_storage_region, FileBackend, FileEngine, IoOp, Post, Workers};

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

/// The `posix` backend: the file skeleton run by a thread pool.
pub type PosixBackend = FileBackend<PosixEngine>;

impl PosixBackend {
    /// A backend with these settings (threads start with the agent).
    pub fn new(cfg: PosixConfig) -> PosixBackend {
        FileBackend::with_engine(PosixEngine { cfg })
    }
}

/// The `posix` engine: `preadv`/`pwritev` on a thread pool.
#[derive(Debug)]
pub struct PosixEngine {
    cfg: PosixConfig,
}

/// The running engine: the workers and the flag that cancels what they have not started.
pub(crate) struct Pool {
    workers: Workers<(Arc<Post>, usize)>,
    /// Set when the backend shuts down: operations not yet started end the request Cancelled.
    stopping: Arc<AtomicBool>,
}

fn backend_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Posix,
        op,
        reason: reason.into(),
    }
}

impl FileEngine for PosixEngine {
    type Running = Pool;
    type Resolved = ();
    const NAME: BackendName = BackendName::Posix;
    const LOCAL_KINDS: &'static [MemKind] = &[MemKind::Dram, MemKind::File, MemKind::Block];
    const PREFERENCE: u8 = 6;
    const REMOTE_KINDS: &'static [MemKind] = &[MemKind::File, MemKind::Block];
    const MEM: MemKind = MemKind::Dram;

    fn max_io(&self) -> usize {
        self.cfg.max_io_bytes
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        if self.cfg.threads == 0 {
            return Err("[posix] threads is 0".into());
        }
        if self.cfg.max_io_bytes == 0 {
            return Err("[posix] max_io_bytes is 0".into());
        }
        Ok(())
    }

    fn start(&self) -> Result<Pool> {
        Ok(Pool {
            workers: Workers::start(
                "posix",
                self.cfg.threads,
                |(post, i): (Arc<Post>, usize)| run_one(&post, i),
            )?,
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    fn register(&self, _run: Option<&Pool>, kind: MemKind, desc: &Desc) -> Result<()> {
        check_storage_region(kind, desc)
    }

    fn deregister(&self, _run: &Pool, _region: Registered<'_>) {}

    fn resolve(_run: &Pool, _plan: &XferPlan, _ops: &[IoOp]) -> Result<()> {
        Ok(())
    }

    fn stopping(run: &Pool) -> &Arc<AtomicBool> {
        &run.stopping
    }

    fn submit(run: &Pool, post: Arc<Post>, _resolved: &Arc<()>) {
        if post.ops.len() == 1 && post.ops[0].len() <= 64 << 10 {
            // Small: no thread hand-off.
            run_one(&post, 0);
            return;
        }
        for i in 0..post.ops.len() {
            if let Err((post, i)) = run.workers.send((Arc::clone(&post), i)) {
                // The pool is gone (shutdown): finish this operation as cancelled.
                post.stopping.store(true, Ordering::Release);
                run_one(&post, i);
            }
        }
    }

    /// Stops taking work; queued operations still run (they end quickly once their requests
    /// are cancelled), then the workers exit.
    fn stop(run: &Pool) {
        run.stopping.store(true, Ordering::Release);
        run.workers.stop();
    }
}

/// Runs operation `i` of `post` unless the post is over, then counts it done.
fn run_one(post: &Post, i: usize) {
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
