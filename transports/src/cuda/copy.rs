//! The batched copy planner and its executor.
//!
//! A transfer arrives as resolved segments (source and destination addresses in this process,
//! length), often many small ones: a vLLM user measured 112k descriptors per transfer. The
//! planner
//! 1. coalesces runs that are adjacent in both source and destination (neighbouring KV blocks
//!    usually are), in the caller's order, without sorting;
//! 2. cuts the runs into at most `streams` parts of about equal bytes and at least
//!    [`MIN_PART`] bytes each, splitting a run only where it is larger than [`MIN_SPLIT`], so a
//!    very large copy still uses several streams and small ones are never cut.
//!
//! The executor enqueues each part on its stream and records one event per stream; the backend
//! completes the request once every event has. A part of many small runs (at least
//! [`GATHER_MIN_RUNS`], averaging at most [`GATHER_MAX_AVG`]) is one launch of the gather kernel
//! over a table of its runs uploaded when the request was prepared ([`gather_tables`]); other
//! parts go as `cuMemcpyBatchAsync` where the driver has it, else `cuMemcpyDtoDAsync` per run.
//! Unified addressing makes each of them work across devices and into imported peer mappings.
//!
//! Why parts are large: measured on an H200 (BENCHMARKS.md, the `cuda` rows), spreading one
//! 4 MiB copy over 4 streams took 41 µs against 16 µs on one stream (each stream adds its own
//! event and launch), and at 256 MiB one stream reached the same 1.76 TB/s as four. Where many
//! small copies are batched, one `cuMemcpyBatchAsync` call replaces thousands of per-copy calls
//! of about 5.6 µs each, and the gather kernel replaces both (1024 scattered 64 KiB blocks: 4.1 ms
//! as batched copies, 48 µs as one launch).

use std::sync::Arc;

use super::driver::{CuRes, DeviceAlloc, DeviceCtx, Event, Gather, GatherEntry, Stream};

/// Smallest run the planner cuts to balance streams.
pub(super) const MIN_SPLIT: u64 = 1 << 20;

/// Fewest bytes per stream: a request uses `min(streams, bytes / MIN_PART)` streams (at least 1).
pub(super) const MIN_PART: u64 = 64 << 20;

/// Fewest runs in a part for the gather kernel (fewer go as batched copies).
pub(super) const GATHER_MIN_RUNS: usize = 16;

/// Largest average run (bytes) for the gather kernel: one thread block copies a run, so large
/// runs go faster as copies of their own.
pub(super) const GATHER_MAX_AVG: u64 = 1 << 20;

/// A part's runs as a table in device memory, uploaded once when the request is prepared, for
/// one launch of the gather kernel per post.
#[derive(Debug)]
pub(super) struct GatherTable {
    kernel: Arc<Gather>,
    table: DeviceAlloc,
    n: u32,
}

/// The gather tables of `plan`'s parts on device `ctx`: one per part that qualifies
/// ([`GATHER_MIN_RUNS`], [`GATHER_MAX_AVG`]) when `kernel` gives a kernel; empty when no part
/// does. The kernel is only asked for when a part qualifies.
pub(super) fn gather_tables(
    plan: &CopyPlan,
    ctx: &Arc<DeviceCtx>,
    kernel: impl FnOnce() -> Option<Arc<Gather>>,
) -> CuRes<Vec<Option<GatherTable>>> {
    let wants = |p: &Vec<Run>| {
        p.len() >= GATHER_MIN_RUNS
            && u32::try_from(p.len()).is_ok()
            && p.iter().map(|r| r.len).sum::<u64>() / p.len() as u64 <= GATHER_MAX_AVG
    };
    if !plan.parts.iter().any(wants) {
        return Ok(Vec::new());
    }
    let Some(kernel) = kernel() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(plan.parts.len());
    for part in &plan.parts {
        if !wants(part) {
            out.push(None);
            continue;
        }
        let entries: Vec<GatherEntry> = part
            .iter()
            .map(|r| GatherEntry {
                src: r.src,
                dst: r.dst,
                len: r.len,
            })
            .collect();
        // SAFETY: GatherEntry is plain repr(C) data (three u64): viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                entries.as_ptr().cast::<u8>(),
                std::mem::size_of_val(entries.as_slice()),
            )
        };
        let table = DeviceAlloc::new(ctx, bytes.len())?;
        // SAFETY: `table` is a live allocation of exactly `bytes.len()` bytes on this device.
        unsafe { super::driver::upload(ctx, table.addr(), bytes)? };
        out.push(Some(GatherTable {
            kernel: Arc::clone(&kernel),
            table,
            n: part.len() as u32,
        }));
    }
    Ok(out)
}

/// One copy: `len` bytes from `src` to `dst` (addresses in this process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Length.
    pub len: u64,
}

/// Runs per stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct CopyPlan {
    /// `parts[i]` goes on stream `i`; empty parts are left out of the executor's work.
    pub parts: Vec<Vec<Run>>,
    /// Total bytes.
    pub bytes: u64,
    /// Segments given.
    pub segments: usize,
    /// Runs after coalescing (before splitting).
    pub runs: usize,
}

/// Coalesces segments that are adjacent in both source and destination, in order.
pub(super) fn coalesce(segs: impl IntoIterator<Item = Run>) -> (Vec<Run>, usize) {
    let it = segs.into_iter();
    let mut out: Vec<Run> = Vec::with_capacity(it.size_hint().0);
    let mut n = 0usize;
    for s in it {
        n += 1;
        if s.len == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            if last.src.checked_add(last.len) == Some(s.src)
                && last.dst.checked_add(last.len) == Some(s.dst)
            {
                if let Some(l) = last.len.checked_add(s.len) {
                    last.len = l;
                    continue;
                }
            }
        }
        out.push(s);
    }
    (out, n)
}

/// Plans segments onto `streams` streams (at least 1).
pub(super) fn plan(segs: impl IntoIterator<Item = Run>, streams: usize) -> CopyPlan {
    let streams = streams.max(1);
    let (runs, segments) = coalesce(segs);
    let bytes = runs.iter().fold(0u64, |a, r| a.saturating_add(r.len));
    let n_runs = runs.len();
    let streams = streams.min(
        usize::try_from(bytes / MIN_PART)
            .unwrap_or(usize::MAX)
            .max(1),
    );
    let mut parts: Vec<Vec<Run>> = vec![Vec::new(); streams];
    if streams == 1 || bytes == 0 {
        parts[0] = runs;
        return CopyPlan {
            parts,
            bytes,
            segments,
            runs: n_runs,
        };
    }
    let per = bytes.div_ceil(streams as u64).max(1);
    let mut k = 0usize;
    let mut in_part = 0u64;
    for mut r in runs {
        while r.len > 0 {
            let room = per.saturating_sub(in_part);
            if k + 1 < streams && room == 0 {
                k += 1;
                in_part = 0;
                continue;
            }
            let last = k + 1 == streams;
            let take = if last || r.len <= room {
                r.len
            } else if r.len > MIN_SPLIT && room >= MIN_SPLIT / 2 {
                // Split a large run at the part boundary.
                room
            } else if room * 2 >= r.len {
                // Most of the run fits: keep it whole here.
                r.len
            } else {
                // Move on; the run starts the next part.
                k += 1;
                in_part = 0;
                continue;
            };
            parts[k].push(Run {
                src: r.src,
                dst: r.dst,
                len: take,
            });
            in_part += take;
            r.src += take;
            r.dst += take;
            r.len -= take;
        }
    }
    CopyPlan {
        parts,
        bytes,
        segments,
        runs: n_runs,
    }
}

/// Enqueues a plan: part `i` on `streams[i % streams.len()]`, one event per used stream pushed
/// to `events` (so that, after an error midway, the caller still has the events of what was
/// enqueued; it should also synchronize the streams).
///
/// # Safety
/// Every run's source must be readable and its destination writable device memory mapped in
/// this process (own allocations or imported peer mappings) until every event has completed (or
/// the streams were synchronized); the caller keeps the mappings and region holds alive until
/// then.
pub(super) unsafe fn enqueue(
    plan: &CopyPlan,
    streams: &[Arc<Stream>],
    events: &mut Vec<Event>,
    batch: bool,
    gathers: &[Option<GatherTable>],
) -> CuRes<()> {
    if streams.is_empty() {
        return Ok(());
    }
    for (i, part) in plan.parts.iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        let s = &streams[i % streams.len()];
        let _g = s.ctx().enter()?;
        if let Some(Some(g)) = gathers.get(i) {
            // SAFETY: the table holds this part's runs (uploaded at prepare, owned by the
            // request's plan, which the post holds); the runs' memory per this function's
            // contract.
            unsafe { g.kernel.launch(s, g.table.addr(), g.n)? };
        } else if batch {
            let copies: Vec<(u64, u64, usize)> = part
                .iter()
                .map(|r| (r.dst, r.src, usize::try_from(r.len).unwrap_or(usize::MAX)))
                .collect();
            // SAFETY: per this function's contract.
            unsafe { s.copy_dtod_batch(&copies)? };
        } else {
            for r in part {
                let len = usize::try_from(r.len).unwrap_or(usize::MAX);
                // SAFETY: per this function's contract.
                unsafe { s.copy_dtod(r.dst, r.src, len)? };
            }
        }
        events.push(Event::record(s)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src: u64, dst: u64, len: u64) -> Run {
        Run { src, dst, len }
    }

    fn flatten(p: &CopyPlan) -> Vec<(u64, u64)> {
        // Every byte: (src, dst) pairs as runs, for equality of coverage.
        let mut v: Vec<Run> = p.parts.iter().flatten().copied().collect();
        v.sort_by_key(|r| r.src);
        let (c, _) = coalesce(v);
        c.iter().map(|r| (r.src, r.len)).collect()
    }

    #[test]
    fn coalesces_only_when_both_sides_are_adjacent() {
        let segs = vec![
            run(0, 1000, 10),
            run(10, 1010, 10), // adjacent both: merged
            run(20, 2000, 10), // src adjacent only: new run
            run(31, 2010, 10), // dst adjacent only: new run
            run(41, 2020, 0),  // empty: dropped
            run(41, 2020, 5),  // adjacent to previous: merged
        ];
        let (runs, n) = coalesce(segs);
        assert_eq!(n, 6);
        assert_eq!(
            runs,
            vec![run(0, 1000, 20), run(20, 2000, 10), run(31, 2010, 15)]
        );
    }

    #[test]
    fn balances_bytes_over_streams() {
        // One 256 MiB run over 4 streams: split into 4 equal parts.
        let p = plan([run(0, 1 << 40, 256 << 20)], 4);
        assert_eq!(p.parts.len(), 4);
        for part in &p.parts {
            assert_eq!(part.iter().map(|r| r.len).sum::<u64>(), 64 << 20);
        }
        assert_eq!(flatten(&p), vec![(0, 256 << 20)]);
        // Below MIN_PART per stream, fewer streams: 64 MiB stays on one, 128 MiB takes two.
        let p = plan([run(0, 1 << 40, 64 << 20)], 4);
        assert_eq!(p.parts.len(), 1);
        assert_eq!(p.parts[0], vec![run(0, 1 << 40, 64 << 20)]);
        let p = plan([run(0, 1 << 40, 128 << 20)], 4);
        assert_eq!(p.parts.len(), 2);
        // Many scattered runs: no run is cut; parts within one run of the target.
        let segs: Vec<Run> = (0..1000u64)
            .map(|i| {
                run(
                    i * (1 << 20),
                    (1 << 40) + i * (3 << 20),
                    400_000 + (i % 7) * 100,
                )
            })
            .collect();
        let total: u64 = segs.iter().map(|r| r.len).sum();
        let p = plan(segs.clone(), 3);
        assert_eq!(p.parts.len(), 3);
        assert_eq!(p.bytes, total);
        assert_eq!(p.parts.iter().map(Vec::len).sum::<usize>(), 1000);
        for part in &p.parts {
            let b: u64 = part.iter().map(|r| r.len).sum();
            assert!(b.abs_diff(total / 3) <= 500_000, "{b} vs {}", total / 3);
        }
        // Order inside each part and across parts is the caller's order.
        let all: Vec<Run> = p.parts.iter().flatten().copied().collect();
        assert_eq!(all, segs);
        // One stream: everything on it.
        let p = plan(segs, 1);
        assert_eq!(p.parts.len(), 1);
        assert_eq!(p.parts[0].len(), 1000);
        // Empty input.
        let p = plan(std::iter::empty(), 4);
        assert_eq!(p.bytes, 0);
        assert!(p.parts.iter().all(Vec::is_empty));
    }

    #[test]
    fn every_byte_once_with_mixed_sizes() {
        let mut x = 99u64;
        let mut segs = Vec::new();
        let mut src = 0u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = if x % 50 == 0 {
                (x % 9) << 20
            } else {
                1 + x % 70_000
            };
            let gap = if x % 3 == 0 { 0 } else { 64 };
            segs.push(run(src, src + (1 << 44), len));
            src += len + gap;
        }
        for streams in [1, 2, 3, 4, 8] {
            let p = plan(segs.clone(), streams);
            let mut bytes: Vec<Run> = p.parts.iter().flatten().copied().collect();
            assert_eq!(bytes.iter().map(|r| r.len).sum::<u64>(), p.bytes);
            bytes.sort_by_key(|r| r.src);
            for w in bytes.windows(2) {
                assert!(w[0].src + w[0].len <= w[1].src, "overlap");
            }
            for r in &bytes {
                assert_eq!(r.dst - r.src, 1 << 44, "src/dst pairing kept");
            }
        }
    }

    #[test]
    fn plans_112k_descriptors_fast() {
        // 112k KV blocks of 16 KiB, every other one adjacent to the previous on both sides.
        let n = 112_000u64;
        let segs: Vec<Run> = (0..n)
            .map(|i| {
                let gap = (i / 2) * 4096;
                run(i * 16384 + gap, (1 << 40) + i * 16384 + gap * 3, 16384)
            })
            .collect();
        // Warm up, then time the best of a few rounds (a loaded CI host is noisy).
        let _ = plan(segs.iter().copied(), 4);
        let mut best = std::time::Duration::MAX;
        let mut p = CopyPlan::default();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            p = plan(segs.iter().copied(), 4);
            best = best.min(t.elapsed());
        }
        assert_eq!(p.segments, n as usize);
        assert_eq!(p.runs, n as usize / 2);
        assert_eq!(p.bytes, n * 16384);
        let per_10k = best.as_secs_f64() * 1e3 / (n as f64 / 10_000.0);
        eprintln!("planned {n} descriptors in {best:?} ({per_10k:.3} ms per 10k)");
        // Well under a millisecond per 10k in an optimised build (about 0.05 ms); an
        // unoptimised test build is about 10 times slower, so it gets a looser bound.
        let limit = if cfg!(debug_assertions) { 2.0 } else { 0.5 };
        assert!(
            per_10k < limit,
            "{per_10k} ms per 10k descriptors (limit {limit})"
        );
    }
}
