//! Big cross-memory copies cut into pieces over the copy pool's workers.

use super::*;

/// Cross-memory copies from this many bytes are split over the copy pool's workers (see
/// [`copy_split`]).
pub(super) const SPLIT_MIN: u64 = 8 << 20;
/// A split copy is cut into pieces that its threads take in turn: about four per thread, and
/// at least this big.
pub(super) const SPLIT_PIECE_MIN: u64 = 1 << 20;

/// Cross-memory copy of `ours` with `theirs` in process `pid`, split over up to `threads`
/// threads when it is big: the calling thread and parked workers of the copy pool (no thread is
/// started per copy). The copy is cut into pieces (about four per thread, at least
/// [`SPLIT_PIECE_MIN`]) that each thread takes in turn, so a worker that starts late (a busy
/// host) takes fewer and the caller never waits for more than the piece a worker is copying.
/// Returns the bytes moved.
///
/// # Safety
/// As [`sys::cross_copy`]: every span of `ours` stays valid for the whole call.
pub(super) unsafe fn copy_split(
    pid: i32,
    dir: Cma,
    ours: &[Span],
    theirs: &[Span],
    threads: usize,
) -> io::Result<u64> {
    let total: u64 = ours.iter().map(|s| s.len).sum();
    let pool = CopyPool::global();
    let threads = threads.min(pool.workers() + 1).max(1);
    if total < SPLIT_MIN || threads == 1 {
        // SAFETY: forwarded contract.
        return unsafe { sys::cross_copy(pid, dir, ours, theirs) };
    }
    let piece = total.div_ceil(threads as u64 * 4).max(SPLIT_PIECE_MIN);
    let pieces = split_spans(ours, theirs, total.div_ceil(piece) as usize);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take = || -> io::Result<u64> {
        let mut moved = 0;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((o, t)) = pieces.get(i) else {
                return Ok(moved);
            };
            // SAFETY: forwarded contract; `join` returns only once every part has ended.
            match unsafe { sys::cross_copy(pid, dir, o, t) } {
                Ok(n) => moved += n,
                Err(e) => {
                    // The others stop at their next piece.
                    next.store(pieces.len(), Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    let parts = (0..threads)
        .map(|_| Box::new(&take) as Box<dyn FnOnce() -> io::Result<u64> + Send + '_>)
        .collect();
    pool.join(parts).into_iter().try_fold(0u64, |acc, r| {
        let n = r.unwrap_or_else(|_| Err(io::Error::other("copy part panicked")))?;
        Ok(acc + n)
    })
}

/// Cuts paired span lists (equal lengths pairwise) into `n` parts of about equal bytes.
pub(super) fn split_spans(ours: &[Span], theirs: &[Span], n: usize) -> Vec<(Vec<Span>, Vec<Span>)> {
    let total: u64 = ours.iter().map(|s| s.len).sum();
    let per = total.div_ceil(n as u64).max(1);
    let mut parts = Vec::with_capacity(n);
    let (mut o, mut t) = (Vec::new(), Vec::new());
    let mut in_part = 0u64;
    for (a, b) in ours.iter().zip(theirs) {
        let mut off = 0;
        while off < a.len {
            let take = (a.len - off).min(per - in_part);
            o.push(Span {
                addr: a.addr + off,
                len: take,
            });
            t.push(Span {
                addr: b.addr + off,
                len: take,
            });
            off += take;
            in_part += take;
            if in_part == per {
                parts.push((std::mem::take(&mut o), std::mem::take(&mut t)));
                in_part = 0;
            }
        }
    }
    if !o.is_empty() {
        parts.push((o, t));
    }
    parts
}
