//! The storage topology of `nixl-bench`: one agent moving bytes between its registered memory
//! and a file it registered (naming itself as the remote), over `uring` or `posix`, next to fio
//! on the same file with the same block size, queue depth, access pattern and direct flag.
//!
//! Queue depth D means D requests in flight at once, each of one block at its own offset: the
//! loop posts D requests and, each time the oldest ends, posts the next one (fio's `iodepth`
//! with `ioengine=io_uring`). Offsets are random, block-aligned, over the whole file, like fio's
//! `randread`/`randwrite`; there are 256 prepared requests (or D, if more) so that the offsets
//! keep changing. Buffered mode goes through the page cache (the file was just written, so
//! buffered reads are memory-speed for both); direct mode opens the file with `O_DIRECT`.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, BackendName, Desc, DescList, MemKind, XferOp, XferOptions, XferRequest, XferStatus,
};
use nixl_tests::reference_tools::Measured;
use nixl_transports::config::Config;

/// What one storage row is.
#[derive(Clone, Copy, Debug)]
pub struct StorageSpec {
    /// READ (file to memory) or WRITE (memory to file).
    pub op: XferOp,
    /// Bytes per request.
    pub block: usize,
    /// Requests in flight.
    pub depth: usize,
    /// `O_DIRECT`.
    pub direct: bool,
    /// Seconds to run (after one warm-up pass of the in-flight window).
    pub seconds: f64,
}

/// What one row measured.
#[derive(Clone, Debug)]
pub struct StorageRow {
    /// The backend that carried the requests.
    pub backend: BackendName,
    /// GB/s (10^9 bytes per second).
    pub gbps: f64,
    /// Requests completed in the timed part.
    pub posts: u64,
    /// Seconds of the timed part.
    pub seconds: f64,
    /// Post-to-complete latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

/// A file of `size` bytes, written with a pattern, removed on drop.
#[derive(Debug)]
pub struct TestFile {
    path: PathBuf,
    size: u64,
}

impl TestFile {
    /// Creates `dir/nixl-bench-<pid>.dat` of `size` bytes (a multiple of 4 KiB).
    pub fn create(dir: &Path, size: u64) -> std::io::Result<TestFile> {
        let path = dir.join(format!("nixl-bench-{}.dat", std::process::id()));
        let size = size / 4096 * 4096;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let chunk: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 131 % 251) as u8).collect();
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        Ok(TestFile { path, size })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Page-aligned memory (O_DIRECT needs aligned buffers).
pub(crate) struct Aligned {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

impl Aligned {
    pub(crate) fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory for {len} bytes");
        Aligned { ptr, len }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// xorshift, for offsets.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// An agent named `name`, configured by `toml`, on which `backend` runs: `Err` says why not
/// (`unavailable: <reason>`), or what failed.
pub(crate) fn agent_running(name: &str, toml: &str, backend: BackendName) -> Result<Agent, String> {
    let cfg = Config::from_toml(toml).map_err(|e| e.to_string())?;
    let agent = Agent::builder(name)
        .backends(cfg.backends().map_err(|e| e.to_string())?)
        .build()
        .map_err(|e| e.to_string())?;
    if let Some(why) = agent
        .backends()
        .iter()
        .find(|s| s.name == backend)
        .and_then(|s| s.unavailable.clone())
    {
        return Err(format!("unavailable: {why}"));
    }
    Ok(agent)
}

/// Runs one row with `backend` on `file`.
pub fn nixl_row(
    backend: BackendName,
    file: &TestFile,
    spec: &StorageSpec,
) -> Result<StorageRow, String> {
    let agent = agent_running(
        "bench-storage",
        &format!(
            "backends = [\"{backend}\"]\n[{backend}]\nmax_io_bytes = {}\n",
            spec.block.max(1 << 20)
        ),
        backend,
    )?;
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if spec.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o
        .open(file.path())
        .map_err(|e| format!("open {}: {e}", file.path().display()))?;
    let fd = f.as_raw_fd() as u64;
    let mem = Aligned::new(spec.block * spec.depth);
    let mem_desc = Desc::new(mem.ptr as u64, mem.len as u64, 0);
    let file_desc = Desc::new(0, file.size, fd);
    let regs = DescList::from_descs(MemKind::Dram, vec![mem_desc]).map_err(|e| e.to_string())?;
    let fregs = DescList::from_descs(MemKind::File, vec![file_desc]).map_err(|e| e.to_string())?;
    // SAFETY: `mem` outlives both registrations (dropped after them, below); the file
    // descriptor carries no memory contract.
    let (_r1, _r2) = unsafe {
        (
            agent.register(&regs).map_err(|e| e.to_string())?,
            agent.register(&fregs).map_err(|e| e.to_string())?,
        )
    };
    let blocks_in_file = file.size / spec.block as u64;
    if blocks_in_file == 0 {
        return Err(format!(
            "the file ({} bytes) is smaller than one block",
            file.size
        ));
    }
    let n = spec.depth.max(1) * 2.max(256 / spec.depth.max(1));
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut reqs: Vec<XferRequest> = Vec::with_capacity(n);
    for j in 0..n {
        let slot = (j % spec.depth) as u64 * spec.block as u64;
        let off = next(&mut seed) % blocks_in_file * spec.block as u64;
        let local = DescList::from_descs(
            MemKind::Dram,
            vec![Desc::new(mem.ptr as u64 + slot, spec.block as u64, 0)],
        )
        .map_err(|e| e.to_string())?;
        let remote =
            DescList::from_descs(MemKind::File, vec![Desc::new(off, spec.block as u64, fd)])
                .map_err(|e| e.to_string())?;
        let r = agent
            .create_xfer(
                spec.op,
                &local,
                &remote,
                "bench-storage",
                XferOptions {
                    backend: Some(backend),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
        reqs.push(r);
    }
    drive(&reqs, spec.depth, spec.block, spec.seconds)
}

/// Keeps `depth` of `reqs` in flight (in order, round robin) for `seconds` after one warm-up
/// window; each request moves `block` bytes. Requests `j` and `j + depth` must not share
/// memory that both write (the caller lays them out so).
pub fn drive(
    reqs: &[XferRequest],
    depth: usize,
    block: usize,
    seconds: f64,
) -> Result<StorageRow, String> {
    let n = reqs.len();
    if n < depth || depth == 0 {
        return Err(format!("{n} requests cannot keep {depth} in flight"));
    }
    let used = reqs[0].backend();
    let mut posted_at = vec![Instant::now(); n];
    let mut lat: Vec<f64> = Vec::new();
    let mut window: VecDeque<usize> = VecDeque::new();
    let mut next_req = 0usize;
    let post = |j: usize, posted_at: &mut Vec<Instant>| -> Result<(), String> {
        posted_at[j] = Instant::now();
        reqs[j].post().map_err(|e| e.to_string())
    };
    // Warm-up: one pass of the window.
    for _ in 0..depth {
        post(next_req % n, &mut posted_at)?;
        window.push_back(next_req % n);
        next_req += 1;
    }
    let wait = |r: &XferRequest| match r.wait_blocking(Some(Duration::from_secs(60))) {
        XferStatus::Done => Ok(()),
        other => Err(format!("a request ended {other:?}")),
    };
    let mut warm = depth;
    let mut posts = 0u64;
    let mut start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    while let Some(j) = window.pop_front() {
        wait(&reqs[j])?;
        if warm > 0 {
            warm -= 1;
            if warm == 0 {
                start = Instant::now();
            }
        } else {
            posts += 1;
            lat.push(posted_at[j].elapsed().as_secs_f64() * 1e6);
        }
        if warm > 0 || start.elapsed() < limit {
            let k = next_req % n;
            post(k, &mut posted_at)?;
            window.push_back(k);
            next_req += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    Ok(StorageRow {
        backend: used,
        gbps: posts as f64 * block as f64 / secs / 1e9,
        posts,
        seconds: secs,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}

/// fio on the same file: `--rw=randread|randwrite --bs=BLOCK --iodepth=DEPTH
/// --ioengine=io_uring --direct=0|1 --time_based --runtime=SECONDS`. Its bandwidth in GB/s.
pub fn fio(file: &TestFile, spec: &StorageSpec) -> Measured {
    let rw = match spec.op {
        XferOp::Read => "randread",
        XferOp::Write => "randwrite",
    };
    let runtime = spec.seconds.ceil().max(1.0) as u64;
    let out = Command::new("fio")
        .arg("--name=nixl-bench")
        .arg(format!("--filename={}", file.path().display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", spec.block))
        .arg(format!("--iodepth={}", spec.depth))
        .arg("--ioengine=io_uring")
        .arg(format!("--direct={}", u8::from(spec.direct)))
        .arg(format!("--size={}", file.size))
        .arg("--time_based")
        .arg(format!("--runtime={runtime}"))
        .arg("--ramp_time=0")
        .arg("--norandommap")
        // Keep the page cache as it is, as nixl's rows do (fio drops it by default, which
        // would send its buffered reads to the disk).
        .arg("--invalidate=0")
        .arg("--output-format=json")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Measured::Missing("fio not installed (Debian: apt-get install fio)".into())
        }
        Err(e) => return Measured::Missing(format!("fio: {e}")),
    };
    if !out.status.success() {
        return Measured::Missing(format!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return Measured::Missing(format!("fio output not understood: {e}")),
    };
    let side = match spec.op {
        XferOp::Read => "read",
        XferOp::Write => "write",
    };
    match v["jobs"][0][side]["bw_bytes"].as_f64() {
        Some(b) if b > 0.0 => Measured::Gbps(b / 1e9),
        _ => Measured::Missing(format!("fio reported no {side} bandwidth")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_row_moves_bytes_and_reports_its_backend() {
        let dir = std::env::temp_dir();
        let f = TestFile::create(&dir, 8 << 20).unwrap();
        for b in [BackendName::Uring, BackendName::Posix] {
            for op in [XferOp::Write, XferOp::Read] {
                let spec = StorageSpec {
                    op,
                    block: 64 << 10,
                    depth: 4,
                    direct: false,
                    seconds: 0.05,
                };
                match nixl_row(b, &f, &spec) {
                    Ok(r) => {
                        assert_eq!(r.backend, b);
                        assert!(r.posts > 0 && r.gbps > 0.0, "{r:?}");
                        assert!(r.p50_us <= r.p99_us);
                    }
                    Err(e) if e.starts_with("unavailable") => println!("SKIP: {b}: {e}"),
                    Err(e) => panic!("{b} {op:?}: {e}"),
                }
            }
        }
    }
}
