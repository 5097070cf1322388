//! A request's I/O operations: `prepare_files` checks the file regions and cuts the request
//! into operations (`IoOp`, at most `MAX_IOV` pieces each), and a `Post` tracks one post of
//! them across the threads that run them (the `posix` workers, the `uring` ring thread, the
//! `gds` workers); the last operation to finish completes the request.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use nixl_core::region::{enter_all, leave_all, Ticket};
use nixl_core::{
    BackendName, Completion, Desc, Error, MemKind, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::Mutex;

use super::fd::{check_request, inspect_fd};
use crate::local::owner_check;

/// Most pieces in one `preadv`/`pwritev` (Linux's `IOV_MAX`).
pub(crate) const MAX_IOV: usize = 1024;

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
    let remote_regions = owner_check(target, plan, target.name(), "file")?;
    check_files(plan)?;
    let segs: Vec<(Desc, Desc)> = plan.segments.iter().map(|s| (s.local, s.remote)).collect();
    let ops = plan_ops(&segs, max_io.max(1) as u64);
    Ok((ops.into(), remote_regions.into()))
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
    /// The backend is stopping (shared with its workers).
    pub(crate) stopping: Arc<AtomicBool>,
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
}

impl fmt::Debug for Post {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Post")
            .field("ops", &self.ops.len())
            .field("left", &self.left.load(Ordering::Relaxed))
            .finish()
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
