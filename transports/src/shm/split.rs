//! Big cross-memory copies cut into pieces over the copy pool's workers.

use super::*;

/// Cross-memory copies from this many bytes are split over the copy pool's workers (see
/// [`copy_split`]).
pub(super) const SPLIT_MIN: u64 = 8 << 20;
/// A split copy is cut into pieces that its threads take in turn: about four per thread, and
/// at least this big.
pub(super) const SPLIT_PIECE_MIN: u64 = 1 << 20;

/// Cross-memory copy of `pairs` (`total` bytes in all) with process `pid`, split over up to
/// `threads` threads when it is big: the calling thread and parked workers of the copy pool (no
/// thread is started per copy). The copy is cut into pieces (about four per thread, at least
/// [`SPLIT_PIECE_MIN`]), windows of the pair list that each thread takes in turn, so a worker
/// that starts late (a busy host) takes fewer and the caller never waits for more than the
/// piece a worker is copying. Returns the bytes moved.
///
/// # Safety
/// As [`sys::cross_copy`]: every `ours` range of `pairs` stays valid for the whole call.
pub(super) unsafe fn copy_split<P: Pairs + ?Sized>(
    pid: i32,
    dir: Cma,
    pairs: &P,
    total: u64,
    threads: usize,
) -> io::Result<u64> {
    let pool = CopyPool::global();
    let threads = threads.min(pool.workers() + 1).max(1);
    let (start, end) = (Cursor::default(), Cursor::end(pairs));
    if total < SPLIT_MIN || threads == 1 {
        // SAFETY: forwarded contract.
        return unsafe { sys::cross_copy(pid, dir, pairs, start, end) };
    }
    let piece = total.div_ceil(threads as u64 * 4).max(SPLIT_PIECE_MIN);
    let cuts = split_points(pairs, piece);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take = || -> io::Result<u64> {
        let mut moved = 0;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let (Some(&from), Some(&to)) = (cuts.get(i), cuts.get(i + 1)) else {
                return Ok(moved);
            };
            // SAFETY: forwarded contract; `join` returns only once every part has ended.
            match unsafe { sys::cross_copy(pid, dir, pairs, from, to) } {
                Ok(n) => moved += n,
                Err(e) => {
                    // The others stop at their next piece.
                    next.store(cuts.len(), Ordering::Relaxed);
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

/// Where to cut `pairs` into pieces of `piece` bytes (the last one shorter): the first point
/// is the start, the last the end, so piece `i` is the window from point `i` to point `i + 1`.
pub(super) fn split_points<P: Pairs + ?Sized>(pairs: &P, piece: u64) -> Vec<Cursor> {
    let piece = piece.max(1);
    let mut cuts = vec![Cursor::default()];
    let mut in_piece = 0u64;
    for idx in 0..pairs.count() {
        let len = pairs.pair(idx).2;
        let mut off = 0;
        while len - off >= piece - in_piece {
            off += piece - in_piece;
            in_piece = 0;
            cuts.push(Cursor { idx, off });
        }
        in_piece += len - off;
    }
    let end = Cursor::end(pairs);
    if cuts.last().is_some_and(|c| *c < end) && in_piece > 0 {
        cuts.push(end);
    }
    cuts
}

/// The initiator's side of a request's runs: ours local, theirs remote.
impl Pairs for [Run] {
    fn count(&self) -> usize {
        self.len()
    }
    fn pair(&self, i: usize) -> (u64, u64, u64) {
        let r = &self[i];
        (r.local, r.remote, r.len)
    }
}

/// The target's side of an Op's descriptors: ours the target's, theirs the initiator's.
impl Pairs for [WireSeg] {
    fn count(&self) -> usize {
        self.len()
    }
    fn pair(&self, i: usize) -> (u64, u64, u64) {
        let s = &self[i];
        (s.target, s.init, s.len)
    }
}
