//! Bulk memory copies for the backends that copy with the CPU (`local`, `shm`'s mapped path).
//!
//! Two facts measured on our machines drive this (numbers in BENCHMARKS.md): glibc's memcpy
//! switches to non-temporal (streaming) stores only above a large threshold (here somewhere above
//! 32 MiB), so a big transfer cut into pieces for several threads loses 40% of its speed if each
//! piece goes through memcpy; and a copy with streaming stores runs at full memory bandwidth at
//! any piece size. So pieces of big transfers are copied with streaming stores, and small
//! transfers (whose destination is likely read soon, from cache) with memcpy.
//!
//! A third: glibc's memcpy copies mid-sized blocks with `rep movsb`, which on the AMD EPYC
//! machines we run on drops from 15–35 GB/s to under 1 GB/s when the destination lies 1 to 31
//! bytes past the source modulo 4 KiB (4K aliasing in the microcode loop). Heap buffers end up
//! there all the time (malloc returns addresses 16 bytes into a page; a memfd mapping is page
//! aligned), so an `shm` READ into a malloc'd buffer hit it on every post. Such copies go
//! through a plain SIMD load/store loop instead ([`ALIASING`]), which runs at memcpy speed.

/// Copies of at least this many bytes use streaming stores.
pub const STREAM_MIN: usize = 1 << 20;

/// Distances `(dst - src) mod 4096` below this go through a plain SIMD loop rather than memcpy.
pub const ALIASING: usize = 64;
/// Copies shorter than this always use memcpy (no `rep movsb` there).
const ALIAS_MIN: usize = 256;

/// Whether memcpy would run into the 4K-aliasing slow path for this pair of addresses.
fn aliased(dst: *mut u8, src: *const u8, len: usize) -> bool {
    let d = (dst as usize).wrapping_sub(src as usize) & 4095;
    len >= ALIAS_MIN && d != 0 && d < ALIASING
}

/// A copy for cache-resident destinations: memcpy, or the SIMD loop where memcpy would alias.
///
/// # Safety
/// As [`copy_bytes`].
pub unsafe fn copy_cached(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if aliased(dst, src, len) {
        // SAFETY: forwarded contract.
        unsafe { simd_copy(dst, src, len) };
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Copies `len` bytes from `src` to `dst`; regions may not overlap (use [`copy_overlapping`]).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges must not
/// overlap. Other threads or processes may write the same memory concurrently (that is the
/// one-sided model): the bytes then are unspecified, but memory safety holds since only raw
/// pointer accesses are made.
pub unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= STREAM_MIN {
        // SAFETY: forwarded contract.
        unsafe { stream_copy(dst, src, len) };
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { copy_cached(dst, src, len) };
}

/// Copies `len` bytes from `src` to `dst`, which may overlap.
///
/// # Safety
/// As [`copy_bytes`], except that the ranges may overlap.
pub unsafe fn copy_overlapping(dst: *mut u8, src: *const u8, len: usize) {
    let (d, s) = (dst as usize, src as usize);
    if d.abs_diff(s) >= len {
        // SAFETY: the ranges are disjoint; the rest is the caller's contract.
        unsafe { copy_bytes(dst, src, len) };
    } else {
        // SAFETY: the caller's contract; ptr::copy handles overlap.
        unsafe { std::ptr::copy(src, dst, len) };
    }
}

/// A plain copy loop, 64 bytes per round (all loads, then all stores), with the widest vectors
/// the CPU has; the tail goes through memcpy (short, no `rep movsb`).
///
/// # Safety
/// As [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
unsafe fn simd_copy(dst: *mut u8, src: *const u8, len: usize) {
    static AVX2: LazyLock<bool> = LazyLock::new(|| std::arch::is_x86_feature_detected!("avx2"));
    if *AVX2 {
        // SAFETY: AVX2 is present (checked above); the rest is the forwarded contract.
        unsafe { simd_copy_avx2(dst, src, len) };
        return;
    }
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let mut i = 0;
    while i + 64 <= len {
        // SAFETY: `i + 64 <= len` keeps the four 16-byte loads and stores inside the ranges
        // (unaligned forms); SSE2 is part of the x86_64 baseline.
        unsafe {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_storeu_si128(d, a);
            _mm_storeu_si128(d.add(1), b);
            _mm_storeu_si128(d.add(2), c);
            _mm_storeu_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: the tail `i..len` lies inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
}

/// [`simd_copy`] with 32-byte AVX2 vectors, 128 bytes per round.
///
/// # Safety
/// As [`copy_bytes`], and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn simd_copy_avx2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_storeu_si256};
    let mut i = 0;
    while i + 128 <= len {
        // SAFETY: `i + 128 <= len` keeps the four 32-byte loads and stores inside the ranges
        // (unaligned forms); the caller checked AVX2.
        unsafe {
            let s = src.add(i) as *const __m256i;
            let d = dst.add(i) as *mut __m256i;
            let (a, b, c, e) = (
                _mm256_loadu_si256(s),
                _mm256_loadu_si256(s.add(1)),
                _mm256_loadu_si256(s.add(2)),
                _mm256_loadu_si256(s.add(3)),
            );
            _mm256_storeu_si256(d, a);
            _mm256_storeu_si256(d.add(1), b);
            _mm256_storeu_si256(d.add(2), c);
            _mm256_storeu_si256(d.add(3), e);
        }
        i += 128;
    }
    // SAFETY: the tail `i..len` lies inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
}

/// SSE2 streaming copy: unaligned 16-byte loads, aligned non-temporal stores, then a fence so
/// the data is globally visible before anything that follows (a completion, a notification).
///
/// # Safety
/// As [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = ((16 - (dst as usize & 15)) & 15).min(len);
    // SAFETY: `head <= len`, inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut i = head;
    while i + 64 <= len {
        // SAFETY: `i + 64 <= len` keeps all four 16-byte loads and stores inside the ranges;
        // `dst + i` is 16-byte aligned (the head brought it there, and `i` advances by 64);
        // SSE2 is part of the x86_64 baseline, so the intrinsics are always available.
        unsafe {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: the tail `i..len` lies inside both ranges; the fence orders the streaming stores
    // before later stores (SSE2 baseline).
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_and_length_copies_exactly() {
        let src: Vec<u8> = (0..(3 * STREAM_MIN + 200))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for (soff, doff, len) in [
            (0, 0, 0),
            (1, 0, 17),
            (0, 3, 100),
            (5, 11, STREAM_MIN),
            (1, 15, STREAM_MIN + 63),
            (0, 0, 3 * STREAM_MIN),
            (7, 9, 2 * STREAM_MIN + 1),
        ] {
            let mut dst = vec![0u8; len + 32];
            // SAFETY: both ranges are inside their vectors and do not overlap.
            unsafe { copy_bytes(dst.as_mut_ptr().add(doff), src.as_ptr().add(soff), len) };
            assert_eq!(
                &dst[doff..doff + len],
                &src[soff..soff + len],
                "{soff} {doff} {len}"
            );
            assert!(dst[..doff].iter().all(|&b| b == 0));
            assert!(dst[doff + len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn aliased_copies_take_the_loop_and_copy_exactly() {
        let src: Vec<u8> = (0..70_000).map(|i| (i * 7 % 253) as u8).collect();
        let mut dst = vec![0u8; 70_000 + 8192];
        let base = dst.as_mut_ptr() as usize;
        for dist in [1usize, 16, 31, 63, 64, 100] {
            for len in [255usize, 256, 257, 1000, 4096 + 13, 65_536 + 7] {
                dst.fill(0);
                // A destination `dist` past the source modulo 4 KiB.
                let want = (src.as_ptr() as usize + dist) & 4095;
                let off = (want + 4096 - base % 4096) % 4096;
                let d = dst[off..].as_mut_ptr();
                assert_eq!(
                    (d as usize).wrapping_sub(src.as_ptr() as usize) & 4095,
                    dist
                );
                assert_eq!(aliased(d, src.as_ptr(), len), dist < ALIASING && len >= 256);
                // SAFETY: both ranges lie inside their vectors and do not overlap.
                unsafe { copy_bytes(d, src.as_ptr(), len) };
                assert!(dst[off..off + len] == src[..len], "{dist} {len}");
                assert!(dst[..off].iter().all(|&b| b == 0));
                assert!(dst[off + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn overlapping_copy_is_a_memmove() {
        let mut v: Vec<u8> = (0..200u8).collect();
        let p = v.as_mut_ptr();
        // SAFETY: both ranges lie inside `v`.
        unsafe { copy_overlapping(p.add(10), p, 100) };
        assert_eq!(v[10..110], (0..100u8).collect::<Vec<_>>()[..]);
    }
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use crossbeam_channel::Sender;
use nixl_core::Completion;
use parking_lot::Mutex;

/// Transfers up to this many bytes are copied inline on the posting thread with memcpy.
pub const INLINE_MAX: u64 = 4 << 20;
/// Pool workers copy in pieces of this size, checking for a cancel between pieces.
const PIECE: u64 = 16 << 20;

/// One copy: `len` bytes from `src` to `dst`, addresses in this process.
#[derive(Clone, Copy, Debug)]
pub struct CopyOp {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// A list of copies, seen as one stream of bytes so it can be cut at any byte for workers.
#[derive(Clone, Debug)]
pub struct CopyPlan {
    ops: Arc<[CopyOp]>,
    /// Byte offset at which each op starts in the stream.
    starts: Arc<[u64]>,
    total: u64,
}

impl CopyPlan {
    /// A plan over `ops`. Every op's ranges must have been validated by the caller (see
    /// [`CopyPlan::copy_range`]).
    pub fn new(ops: Vec<CopyOp>) -> CopyPlan {
        let mut starts = Vec::with_capacity(ops.len());
        let mut total = 0u64;
        for op in &ops {
            starts.push(total);
            total += op.len;
        }
        CopyPlan {
            ops: ops.into(),
            starts: starts.into(),
            total,
        }
    }

    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Copies the bytes `[from, to)` of the stream, with streaming stores for big pieces when
    /// `stream` is set (pool workers), plain memmove otherwise (inline copies).
    ///
    /// # Safety
    /// Every op's source must be valid for reads and destination for writes of its length for
    /// the duration of the call (the backends guarantee it by holding the regions' access gates).
    pub unsafe fn copy_range(&self, from: u64, to: u64, stream: bool) {
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
pub struct CopyPool {
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
    pub fn global() -> &'static CopyPool {
        &POOL
    }

    /// Copies `plan` for the post that `done` ends: split over the workers; when every range is
    /// copied, `hold` is dropped and `finish(done)` runs, unless the post was cancelled or timed
    /// out meanwhile (then the copy stops early and `done` is dropped, which changes nothing).
    ///
    /// # Safety
    /// As [`CopyPool::run_split`]; `hold` (and the completion, which holds the local regions)
    /// must keep every op valid until dropped.
    pub unsafe fn run_post<H: Send + 'static>(
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
    pub unsafe fn run_split<F>(
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
