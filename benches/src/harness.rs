//! Pieces of `nixl-bench`: size parsing, the memcpy ceiling, the progress line.

use std::io::Write;
use std::time::{Duration, Instant};

use nixl_tests::scripted_peer::percentile;

/// Two agents in this process, `bench-a` and `bench-b`, each running the `local` backend only:
/// what the criterion benches of core overheads and of local copies measure on.
pub fn local_agents() -> (nixl_core::Agent, nixl_core::Agent) {
    let agent = |name: &str| {
        nixl_core::Agent::builder(name)
            .backend(std::sync::Arc::new(
                nixl_transports::local::LocalBackend::new(),
            ))
            .build()
            .expect("agent")
    };
    (agent("bench-a"), agent("bench-b"))
}

/// Parses a comma-separated list of positive counts (`1,16`).
pub fn parse_counts(list: &str) -> Result<Vec<usize>, String> {
    list.split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(0) | Err(_) => Err(format!("bad count {s:?}: expected a whole number > 0")),
            Ok(n) => Ok(n),
        })
        .collect()
}

/// `4KiB`, `64MiB`, `100B`.
pub fn human(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

/// How a row is sized: posts per thread, or seconds per thread.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    /// Untimed posts (copies) per thread first.
    pub warmup: u64,
    /// Timed posts per thread; 0: as many as fit in `seconds`.
    pub iters: u64,
    /// Seconds per thread when `iters` is 0.
    pub seconds: f64,
}

/// What [`memcpy`] measured.
#[derive(Clone, Copy, Debug)]
pub struct CopyOutcome {
    /// 10^9 bytes per second, all threads together, over the wall time.
    pub gbps: f64,
    /// Timed "requests" (batches of copies) of all threads.
    pub posts: u64,
    /// Median time of one batch of copies, µs.
    pub p50_us: f64,
}

/// CPU cores this process may run on (the memcpy ceiling's thread count).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// memcpy of the same shape as a nixl row: `threads` threads, each copying `batch` blocks of
/// `block` bytes per "request" from its own part of a source buffer to the same part of a
/// destination buffer, sized like the row. The buffers are `buf_size` bytes (at least
/// `threads·batch·block`; pass the size of the benchmark's own buffers), page-aligned like the
/// agents' buffers, and touched before timing. The ceiling for the CPU-copy backends (`local`,
/// `shm`).
///
/// The alignment matters: with glibc's `rep movsb` path on AMD EPYC, a 4 KiB copy between two
/// small heap buffers 4 KiB + 16 bytes apart ran at 1.4 GB/s here, and at tens of GB/s between
/// page-aligned buffers.
pub fn memcpy(
    block: usize,
    batch: usize,
    threads: usize,
    buf_size: usize,
    sizing: Sizing,
) -> CopyOutcome {
    memcpy_spread(block, batch, 1, threads, buf_size, sizing)
}

/// [`memcpy`] of scattered blocks: each thread copies `batch` blocks of `block` bytes that lie
/// `spread` blocks apart (block `i` of its part at `i·spread·block`, on both sides), the very
/// blocks a `--prepped` or `--stride` row moves (spread 2: every other block). Spread 1 is
/// [`memcpy`]. The ceiling of those rows: a copy of the same scattered blocks.
pub fn memcpy_spread(
    block: usize,
    batch: usize,
    spread: usize,
    threads: usize,
    buf_size: usize,
    sizing: Sizing,
) -> CopyOutcome {
    let spread = spread.max(1);
    let moved = block * batch;
    let part = moved * spread;
    let len = buf_size.max(part * threads);
    let mut src_mem = vec![0x5au8; len + PAGE];
    let mut dst_mem = vec![0xa5u8; len + PAGE];
    let src = &page_aligned(&mut src_mem)[..part * threads];
    let dst = &mut page_aligned(&mut dst_mem)[..part * threads];
    let until = Duration::from_secs_f64(sizing.seconds.max(0.0));
    let barrier = std::sync::Barrier::new(threads);
    let runs: Vec<(Instant, Instant, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = src
            .chunks(part)
            .zip(dst.chunks_mut(part))
            .map(|(src, dst)| {
                let barrier = &barrier;
                s.spawn(move || {
                    let once = |dst: &mut [u8]| {
                        for (d, s) in dst.chunks_mut(block).zip(src.chunks(block)).step_by(spread) {
                            d.copy_from_slice(std::hint::black_box(s));
                        }
                        std::hint::black_box(&mut *dst);
                    };
                    for _ in 0..sizing.warmup {
                        once(dst);
                    }
                    barrier.wait();
                    let runs = nixl_tests::scripted_peer::timed_runs(sizing.iters, until, || {
                        once(&mut *dst);
                        Ok::<(), std::convert::Infallible>(())
                    });
                    runs.unwrap_or_else(|never| match never {})
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("memcpy thread panicked"))
            .collect()
    });
    let first = runs.iter().map(|r| r.0).min();
    let last = runs.iter().map(|r| r.1).max();
    let seconds = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let mut lat: Vec<f64> = runs.into_iter().flat_map(|r| r.2).collect();
    lat.sort_by(f64::total_cmp);
    let posts = lat.len() as u64;
    CopyOutcome {
        gbps: posts as f64 * moved as f64 / seconds.max(1e-9) / 1e9,
        posts,
        p50_us: percentile(&lat, 0.5),
    }
}

const PAGE: usize = 4096;

/// The part of `v` from its first page-aligned byte (`v` has at least [`PAGE`] spare bytes).
fn page_aligned(v: &mut [u8]) -> &mut [u8] {
    let skip = v.as_ptr().align_offset(PAGE);
    &mut v[skip..]
}

/// A one-line `row i/n ...` counter on stderr, redrawn with `\r`; silent when off (stderr not
/// a terminal, or `--json`).
#[derive(Debug)]
pub struct Progress {
    on: bool,
    done: usize,
    total: usize,
}

impl Progress {
    /// A counter of `total` rows, drawn only if `on`.
    pub fn new(on: bool, total: usize) -> Progress {
        Progress { on, done: 0, total }
    }

    /// Starts the next row, described by `what`.
    pub fn next(&mut self, what: &str) {
        self.done += 1;
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[Krow {}/{} {what}...", self.done, self.total);
            let _ = e.flush();
        }
    }

    /// Says what runs now within the current row (a reference tool, a check).
    pub fn step(&self, what: &str) {
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[Krow {}/{} {what}...", self.done, self.total);
            let _ = e.flush();
        }
    }

    /// Erases the line (before a table row is printed, and at the end).
    pub fn clear(&self) {
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_counts("1,16").unwrap(), [1, 16]);
        assert!(parse_counts("0").is_err());
        assert_eq!(human(4096), "4KiB");
        assert_eq!(human(64 << 20), "64MiB");
        assert_eq!(human(1000), "1000B");
    }

    #[test]
    fn memcpy_counts_what_it_copies() {
        let s = Sizing {
            warmup: 1,
            iters: 10,
            seconds: 0.0,
        };
        let c = memcpy(4096, 4, 2, 1 << 20, s);
        assert_eq!(c.posts, 20);
        assert!(c.gbps > 0.0 && c.p50_us > 0.0);
        let c = memcpy_spread(4096, 4, 2, 2, 1 << 20, s);
        assert_eq!(c.posts, 20);
        assert!(c.gbps > 0.0 && c.p50_us > 0.0);
    }
}
