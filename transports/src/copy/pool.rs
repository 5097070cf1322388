//! The copy thread pool: a list of copies ([`CopyPlan`]) seen as one stream of bytes, cut into
//! ranges that [`CopyPool`]'s workers copy with the kernels of [`super`], in pieces, checking
//! for a cancel between pieces. Small transfers ([`INLINE_MAX`]) are copied inline instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use crossbeam_channel::Sender;
use nixl_core::Completion;
use parking_lot::Mutex;

use super::{copy_cached, copy_overlapping};

/// Transfers up to this many bytes are copied inline on the posting thread with memcpy.
pub(crate) const INLINE_MAX: u64 = 4 << 20;
/// Pool workers copy in pieces of this size, checking for a cancel between pieces.
const PIECE: u64 = 16 << 20;

/// One copy: `len` bytes from `src` to `dst`, addresses in this process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyOp {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// A list of copies, seen as one stream of bytes so it can be cut at any byte for workers.
#[derive(Clone, Debug)]
pub(crate) struct CopyPlan {
    /// Kept as given (no copy into a new allocation: a 100k-piece plan is made per request).
    ops: Arc<Vec<CopyOp>>,
    /// Byte offset at which each op starts in the stream.
    starts: Arc<[u64]>,
    total: u64,
}

impl CopyPlan {
    /// A plan over `ops`. Every op's ranges must have been validated by the caller (see
    /// [`CopyPlan::copy_range`]).
    pub(crate) fn new(ops: Vec<CopyOp>) -> CopyPlan {
        let mut total = 0u64;
        // Collected straight into its shared allocation (exact size: one allocation).
        let starts: Arc<[u64]> = ops
            .iter()
            .map(|op| {
                let start = total;
                total += op.len;
                start
            })
            .collect();
        CopyPlan {
            ops: Arc::new(ops),
            starts,
            total,
        }
    }

    /// Total bytes.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Copies the bytes `[from, to)` of the stream, with streaming stores for big pieces when
    /// `stream` is set (pool workers), plain memmove otherwise (inline copies).
    ///
    /// # Safety
    /// Every op's source must be valid for reads and destination for writes of its length for
    /// the duration of the call (the backends guarantee it by holding the regions' access gates).
    pub(crate) unsafe fn copy_range(&self, from: u64, to: u64, stream: bool) {
        let (ops, starts) = (&self.ops, &self.starts);
        let mut i = starts.partition_point(|&s| s <= from).saturating_sub(1);
        let mut pos = from;
        while pos < to && i < ops.len() {
            let op = ops[i];
            let off = pos - starts[i];
            let n = (op.len - off).min(to - pos);
            let (dst, src) = ((op.dst + off) as *mut u8, (op.src + off) as *const u8);
            // SAFETY: inside op `i`, valid per the caller's contract; `copy_overlapping` and
            // `ptr::copy` both allow overlap (an agent copying within its own region).
            unsafe {
                if stream {
                    copy_overlapping(dst, src, n as usize);
                } else if (dst as usize).abs_diff(src as usize) >= n as usize {
                    copy_cached(dst, src, n as usize);
                } else {
                    std::ptr::copy(src, dst, n as usize);
                }
            }
            pos += n;
            i += 1;
        }
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// A pool of copy workers, one per core (at most 8), shared by the CPU-copying backends.
#[derive(Debug)]
pub(crate) struct CopyPool {
    tx: Sender<Task>,
    workers: usize,
}

static POOL: LazyLock<CopyPool> = LazyLock::new(|| {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(8);
    let (tx, rx) = crossbeam_channel::unbounded::<Task>();
    let mut started = 0;
    for i in 0..n {
        let rx = rx.clone();
        match std::thread::Builder::new()
            .name(format!("nixl-copy-{i}"))
            .spawn(move || {
                while let Ok(task) = rx.recv() {
                    task();
                }
            }) {
            Ok(_) => started += 1,
            Err(e) => tracing::error!(error = %e, "cannot start a copy worker"),
        }
    }
    CopyPool {
        tx,
        workers: started,
    }
});

struct Split<F> {
    plan: CopyPlan,
    remaining: AtomicUsize,
    abandoned: Box<dyn Fn() -> bool + Send + Sync>,
    finish: Mutex<Option<F>>,
}

impl CopyPool {
    /// The process-wide pool (started on first use).
    pub(crate) fn global() -> &'static CopyPool {
        &POOL
    }

    /// Copies `plan` for the post that `done` ends: split over the workers; when every range is
    /// copied, `hold` is dropped and `finish(done)` runs, unless the post was cancelled or timed
    /// out meanwhile (then the copy stops early and `done` is dropped, which changes nothing).
    ///
    /// # Safety
    /// As [`CopyPool::run_split`]; `hold` (and the completion, which holds the local regions)
    /// must keep every op valid until dropped.
    pub(crate) unsafe fn run_post<H: Send + 'static>(
        &self,
        plan: CopyPlan,
        done: Completion,
        hold: H,
        finish: impl FnOnce(Completion) + Send + 'static,
    ) {
        let done = Arc::new(Mutex::new(Some(done)));
        let watch = Arc::clone(&done);
        let abandoned = move || watch.lock().as_ref().is_none_or(|d| d.is_abandoned());
        let end = move |completed: bool| {
            drop(hold);
            if let Some(done) = done.lock().take() {
                if completed {
                    finish(done);
                }
            }
        };
        // SAFETY: forwarded contract; `hold` and `done` live until `end` runs, after the copies.
        unsafe { self.run_split(plan, abandoned, end) };
    }

    /// Copies `plan` split into one byte range per worker, with streaming stores, checking
    /// `abandoned` between pieces; the last range to end calls `finish(completed)`, where
    /// `completed` is false if a piece was skipped because the work was abandoned.
    ///
    /// # Safety
    /// As [`CopyPlan::copy_range`], for as long as the copies run (until `finish` is called):
    /// callers keep the regions held in the state `finish` releases.
    pub(crate) unsafe fn run_split<F>(
        &self,
        plan: CopyPlan,
        abandoned: impl Fn() -> bool + Send + Sync + 'static,
        finish: F,
    ) where
        F: FnOnce(bool) + Send + 'static,
    {
        let workers = self.workers.max(1) as u64;
        let chunk = plan.total.div_ceil(workers).max(INLINE_MAX);
        let n = plan.total.div_ceil(chunk).max(1) as usize;
        let total = plan.total;
        let split = Arc::new(Split {
            plan,
            remaining: AtomicUsize::new(n),
            abandoned: Box::new(abandoned),
            finish: Mutex::new(Some(finish)),
        });
        let skipped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for k in 0..n {
            let from = k as u64 * chunk;
            let to = (from + chunk).min(total);
            let s = Arc::clone(&split);
            let skipped = Arc::clone(&skipped);
            let task: Task = Box::new(move || {
                let mut pos = from;
                while pos < to {
                    if (s.abandoned)() {
                        skipped.store(true, Ordering::Release);
                        break;
                    }
                    let end = (pos + PIECE).min(to);
                    // SAFETY: the caller of `run_split` keeps every op valid until `finish`,
                    // which runs only after this range is done.
                    unsafe { s.plan.copy_range(pos, end, true) };
                    pos = end;
                }
                if s.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    if let Some(f) = s.finish.lock().take() {
                        f(!skipped.load(Ordering::Acquire));
                    }
                }
            });
            if let Err(e) = self.tx.send(task) {
                // No worker left (process teardown): do the range here.
                (e.into_inner())();
            }
        }
    }
}

/// A part of a [`CopyPool::join`], with its lifetime erased (see the safety argument there).
type Part<T> = Box<dyn FnOnce() -> T + Send + 'static>;

/// One part's state: the work until someone takes it, then its outcome.
struct Slot<T> {
    part: Mutex<Option<Part<T>>>,
    out: Mutex<Option<std::thread::Result<T>>>,
}

/// What the caller of [`CopyPool::join`] and the workers that took its parts share.
struct Join<T> {
    slots: Vec<Slot<T>>,
    /// Parts not yet finished by the one that took them (the caller counts its own).
    left: AtomicUsize,
    caller: std::thread::Thread,
}

impl<T> Join<T> {
    /// Runs part `i` if nobody has taken it yet; says whether it did.
    fn run(&self, i: usize) -> bool {
        let Some(part) = self.slots[i].part.lock().take() else {
            return false;
        };
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(part));
        *self.slots[i].out.lock() = Some(out);
        true
    }
}

impl CopyPool {
    /// Runs `parts` at once and returns their outcomes in order (`Err` for a part that
    /// panicked): the first on the calling thread, the others on the pool's parked workers (a
    /// wake-up each, no thread started). A part no worker has picked up by the time the caller
    /// has finished its own runs on the caller as well, so a pool busy with other copies (or a
    /// call from a pool worker) never makes the caller wait for a queue; it returns once every
    /// part has ended, so the parts may borrow from the caller.
    pub(crate) fn join<'a, T: Send + 'static>(
        &self,
        parts: Vec<Box<dyn FnOnce() -> T + Send + 'a>>,
    ) -> Vec<std::thread::Result<T>> {
        let n = parts.len();
        let slots = parts
            .into_iter()
            .map(|p| {
                // SAFETY: only the lifetime changes. Each part is taken (under its slot's lock)
                // and run to its end before `left` counts it done, and this function does not
                // return before `left` is zero, so no part runs or is dropped after 'a; a
                // worker that finds its slot empty later touches nothing of 'a.
                let p: Part<T> = unsafe {
                    std::mem::transmute::<Box<dyn FnOnce() -> T + Send + 'a>, Part<T>>(p)
                };
                Slot {
                    part: Mutex::new(Some(p)),
                    out: Mutex::new(None),
                }
            })
            .collect();
        let join = Arc::new(Join {
            slots,
            left: AtomicUsize::new(n),
            caller: std::thread::current(),
        });
        for i in 1..n {
            let j = Arc::clone(&join);
            let task: Task = Box::new(move || {
                if j.run(i) && j.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    j.caller.unpark();
                }
            });
            if self.tx.send(task).is_err() {
                // No worker left (process teardown): the caller takes the part below.
                break;
            }
        }
        for i in 0..n {
            if join.run(i) {
                join.left.fetch_sub(1, Ordering::AcqRel);
            }
        }
        while join.left.load(Ordering::Acquire) != 0 {
            std::thread::park();
        }
        join.slots
            .iter()
            .map(|s| {
                s.out
                    .lock()
                    .take()
                    .unwrap_or_else(|| Err(Box::new("copy part never ran")))
            })
            .collect()
    }

    /// Workers in the pool (0 only when none could be started).
    pub(crate) fn workers(&self) -> usize {
        self.workers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Duration;

    fn boxed<'a>(f: impl FnOnce() -> u64 + Send + 'a) -> Box<dyn FnOnce() -> u64 + Send + 'a> {
        Box::new(f)
    }

    #[test]
    fn join_runs_every_part_once_and_keeps_the_order() {
        let pool = CopyPool::global();
        let data: Vec<u64> = (0..64).collect();
        let ran = AtomicUsize::new(0);
        for n in [1, 2, 3, 9] {
            ran.store(0, Ordering::Relaxed);
            let parts = (0..n)
                .map(|k| {
                    let (data, ran) = (&data, &ran);
                    boxed(move || {
                        ran.fetch_add(1, Ordering::Relaxed);
                        data.iter().skip(k).step_by(n).sum()
                    })
                })
                .collect();
            let out: Vec<u64> = pool.join(parts).into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(ran.load(Ordering::Relaxed), n);
            let want: Vec<u64> = (0..n)
                .map(|k| data.iter().skip(k).step_by(n).sum())
                .collect();
            assert_eq!(out, want);
        }
    }

    #[test]
    fn a_panicking_part_is_an_error_and_the_others_finish() {
        let parts = vec![boxed(|| 1), boxed(|| panic!("part two fails")), boxed(|| 3)];
        let out = CopyPool::global().join(parts);
        assert_eq!(*out[0].as_ref().unwrap(), 1);
        assert!(out[1].is_err());
        assert_eq!(*out[2].as_ref().unwrap(), 3);
    }

    #[test]
    fn join_does_not_wait_for_a_busy_pool() {
        // Every worker is held until the join is over: the caller must run all parts itself.
        let pool = CopyPool::global();
        let n = pool.workers();
        let hold = Arc::new(Barrier::new(n + 1));
        for _ in 0..n {
            let h = Arc::clone(&hold);
            pool.tx
                .send(Box::new(move || {
                    h.wait();
                }))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let parts = (0..4u64).map(|k| boxed(move || k * 10)).collect();
        let out: Vec<u64> = pool.join(parts).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(out, [0, 10, 20, 30]);
        hold.wait();
    }
}
