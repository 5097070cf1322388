//! The `cuda` topology of `nixl-bench`: two agent processes on this node moving VRAM to VRAM
//! through the `cuda` backend (the target's buffer mapped by the initiator through a CUDA IPC
//! or VMM handle), next to `cuMemcpyDtoDAsync` between two buffers of one process as the
//! ceiling.
//!
//! The target is this binary started again with the hidden `--cuda-target FILE`: it allocates
//! its buffer (`VmmBuffer`, or `cuMemAlloc` memory with `--cuda-mem legacy`) on its GPU,
//! registers it, writes its metadata to FILE, prints `ready`, and lives until its standard
//! input closes. The initiator allocates its own buffer, loads the metadata, and times one
//! request of one descriptor per post, posted again and again (as an engine re-posts a prepared
//! handoff): GB/s is the bytes of the timed posts over their time, and the latency the
//! post-to-completion time of each.
//!
//! The ceiling runs the same block sizes as `cuMemcpyDtoDAsync` between two buffers of one
//! process on the initiator's GPU, one copy at a time, each waited for: the speed of the copy
//! engine itself, with no request, no IPC mapping and no second process.
//!
//! `--verify` fills the initiator's buffer with a pattern, WRITEs it all to the target, clears
//! the local buffer, READs it back and compares every byte, before the timed rows.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, XferOp, XferOptions};
use nixl_transports::cuda::Stream;
use nixl_transports::cuda::{device, CudaBackend, CudaConfig, LegacyBuffer, VmmBuffer};

/// VRAM of one of two kinds: what engines register.
#[derive(Debug)]
pub enum Vram {
    /// `cuMemCreate` memory (PyTorch's expandable segments), shared by VMM fds.
    Vmm(VmmBuffer),
    /// `cuMemAlloc` memory (`cudaMalloc`), shared by legacy IPC handles.
    Legacy(LegacyBuffer),
}

impl Vram {
    /// `len` bytes on GPU `dev`; `legacy` picks `cuMemAlloc`.
    pub fn new(dev: i32, len: usize, legacy: bool) -> Result<Vram, String> {
        if legacy {
            LegacyBuffer::new(dev, len)
                .map(Vram::Legacy)
                .map_err(|e| e.to_string())
        } else {
            VmmBuffer::new(dev, len, false)
                .map(Vram::Vmm)
                .map_err(|e| e.to_string())
        }
    }

    /// The whole buffer as one descriptor.
    pub fn desc(&self) -> Desc {
        match self {
            Vram::Vmm(b) => b.desc(),
            Vram::Legacy(b) => b.desc(),
        }
    }

    fn upload(&self, off: usize, bytes: &[u8]) -> Result<(), String> {
        match self {
            Vram::Vmm(b) => b.upload(off, bytes),
            Vram::Legacy(b) => b.upload(off, bytes),
        }
        .map_err(|e| e.to_string())
    }

    fn download(&self, off: usize, out: &mut [u8]) -> Result<(), String> {
        match self {
            Vram::Vmm(b) => b.download(off, out),
            Vram::Legacy(b) => b.download(off, out),
        }
        .map_err(|e| e.to_string())
    }
}

fn agent(name: &str, cfg: CudaConfig) -> Result<Agent, String> {
    let dir = std::env::temp_dir().join(format!("nixl-bench-cuda-{}", std::process::id()));
    Agent::builder(name)
        .backend(CudaBackend::new(CudaConfig {
            socket_dir: dir,
            ..cfg
        }))
        .build()
        .map_err(|e| e.to_string())
}

fn vram_list(d: Desc) -> Result<DescList, String> {
    DescList::from_descs(MemKind::Vram, vec![d]).map_err(|e| e.to_string())
}

/// The target process's whole life (`--cuda-target FILE`).
pub fn target_main(meta: &Path, dev: i32, size: usize, legacy: bool) -> Result<(), String> {
    let a = agent("bench-cuda-target", CudaConfig::default())?;
    let buf = Vram::new(dev, size, legacy)?;
    // SAFETY: `buf` outlives the registration (dropped after it, below); peers write it while
    // this process only waits.
    let reg = unsafe { a.register(&vram_list(buf.desc())?) }.map_err(|e| e.to_string())?;
    std::fs::write(meta, a.metadata_bytes()).map_err(|e| format!("{}: {e}", meta.display()))?;
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Lives until the initiator closes our standard input.
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?
        > 0
    {
        line.clear();
    }
    drop(reg);
    drop(buf);
    Ok(())
}

/// What one row measured.
#[derive(Clone, Debug)]
pub struct CudaRow {
    /// The backend that carried the requests (`cuda` for the nixl rows).
    pub backend: String,
    /// GB/s (10^9 bytes per second).
    pub gbps: f64,
    /// Timed posts (or copies).
    pub posts: u64,
    /// Seconds of the timed part.
    pub seconds: f64,
    /// Post-to-completion latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

fn row(backend: &str, block: usize, lat: &mut [Duration], total: Duration) -> CudaRow {
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_secs_f64() * 1e6
    };
    let secs = total.as_secs_f64().max(1e-9);
    CudaRow {
        backend: backend.into(),
        gbps: (block as f64 * lat.len() as f64) / secs / 1e9,
        posts: lat.len() as u64,
        seconds: secs,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

/// Times `f` (one post or copy, waited for) for `seconds` after `warmup` untimed calls.
fn timed(
    warmup: u64,
    seconds: f64,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<(Vec<Duration>, Duration), String> {
    for _ in 0..warmup {
        f()?;
    }
    let mut lat = Vec::with_capacity(4096);
    let start = Instant::now();
    let budget = Duration::from_secs_f64(seconds.max(0.01));
    while start.elapsed() < budget || lat.is_empty() {
        let t = Instant::now();
        f()?;
        lat.push(t.elapsed());
    }
    Ok((lat, start.elapsed()))
}

/// The two processes of the topology: this one (the initiator) and the target child.
#[derive(Debug)]
pub struct CudaPair {
    // Field order is drop order: requests' agent before its buffer, the child last.
    agent: Agent,
    _reg: nixl_core::Registration,
    local: Vram,
    remote: Desc,
    target: String,
    child: Child,
    stdin: Option<ChildStdin>,
    _dir: TempDir,
}

#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for CudaPair {
    fn drop(&mut self) {
        // Closing its standard input ends the target.
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl CudaPair {
    /// Starts the target (`exe --cuda-target ...` on GPU `target_dev`) and the initiator's
    /// side on GPU `init_dev` (its backend configured by `cfg`), each with `size` bytes.
    pub fn start(
        exe: &Path,
        init_dev: i32,
        target_dev: i32,
        size: usize,
        legacy: bool,
        cfg: CudaConfig,
    ) -> Result<CudaPair, String> {
        let dir = TempDir(std::env::temp_dir().join(format!(
            "nixl-bench-cuda-pair-{}-{}",
            std::process::id(),
            nixl_core::random_u64().map_err(|e| e.to_string())?
        )));
        std::fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
        let meta = dir.0.join("target.md");
        let mut child = Command::new(exe)
            .arg("--cuda-target")
            .arg(&meta)
            .arg("--cuda-target-gpu")
            .arg(target_dev.to_string())
            .arg("--cuda-target-size")
            .arg(size.to_string())
            .arg("--cuda-mem")
            .arg(if legacy { "legacy" } else { "vmm" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the target process: {e}"))?;
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(|e| format!("target process: {e}"))?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the target process did not start (it said {:?}; its error is above)",
                line.trim()
            ));
        }
        let md = std::fs::read(&meta).map_err(|e| format!("{}: {e}", meta.display()))?;
        let agent = agent("bench-cuda-init", cfg)?;
        let target = agent.load_remote(&md).map_err(|e| e.to_string())?;
        let remote = nixl_core::AgentMetadata::decode(&md)
            .map_err(|e| e.to_string())?
            .regions
            .first()
            .ok_or("the target published no region")?
            .desc;
        let local = Vram::new(init_dev, size, false)?;
        // SAFETY: `local` outlives the registration (declared after it in the struct, so
        // dropped after it).
        let reg =
            unsafe { agent.register(&vram_list(local.desc())?) }.map_err(|e| e.to_string())?;
        Ok(CudaPair {
            agent,
            _reg: reg,
            local,
            remote,
            target,
            child,
            stdin,
            _dir: dir,
        })
    }

    /// A request of `batch` descriptors of `len` bytes, `stride` bytes apart on both sides (a
    /// stride above `len` keeps the copy planner from merging them into one copy).
    fn request(
        &self,
        op: XferOp,
        len: u64,
        batch: usize,
        stride: u64,
    ) -> Result<nixl_core::XferRequest, String> {
        let l = self.local.desc();
        let r = self.remote;
        let list = |base: u64, dev: u64| {
            let d: Vec<Desc> = (0..batch as u64)
                .map(|i| Desc::new(base + i * stride, len, dev))
                .collect();
            DescList::from_descs(MemKind::Vram, d).map_err(|e| e.to_string())
        };
        self.agent
            .create_xfer(
                op,
                &list(l.addr, l.dev_id)?,
                &list(r.addr, r.dev_id)?,
                &self.target,
                XferOptions {
                    backend: Some(BackendName::Cuda),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())
    }

    /// WRITEs a pattern over the whole buffer, READs it back into a cleared buffer and compares.
    pub fn verify(&self) -> Result<(), String> {
        let len = self.local.desc().len as usize;
        let pattern: Vec<u8> = (0..len)
            .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7])
            .collect();
        self.local.upload(0, &pattern)?;
        let w = self.request(XferOp::Write, len as u64, 1, 0)?;
        w.run_blocking().map_err(|e| format!("WRITE: {e}"))?;
        self.local.upload(0, &vec![0u8; len])?;
        let r = self.request(XferOp::Read, len as u64, 1, 0)?;
        r.run_blocking().map_err(|e| format!("READ: {e}"))?;
        let mut back = vec![0u8; len];
        self.local.download(0, &mut back)?;
        match back.iter().zip(&pattern).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(i) => Err(format!(
                "--verify: byte {i} differs after WRITE then READ of {len} bytes"
            )),
        }
    }

    /// One row: one request of `batch` descriptors of `block` bytes (2 × `block` apart when
    /// `batch` > 1), posted again and again. Needs a buffer of [`buffer_bytes`].
    pub fn row(
        &self,
        op: XferOp,
        block: usize,
        batch: usize,
        warmup: u64,
        seconds: f64,
    ) -> Result<CudaRow, String> {
        let stride = if batch > 1 { 2 * block as u64 } else { 0 };
        let req = self.request(op, block as u64, batch, stride)?;
        let (mut lat, total) = timed(warmup, seconds, || {
            req.run_blocking().map_err(|e| e.to_string())
        })?;
        Ok(row(req.backend().as_str(), block * batch, &mut lat, total))
    }
}

/// Bytes of each side's buffer for rows of `block` × `batch`.
pub fn buffer_bytes(block: usize, batch: usize) -> Option<usize> {
    if batch > 1 {
        block.checked_mul(2)?.checked_mul(batch)
    } else {
        Some(block)
    }
}

/// The ceiling: `batch` × `cuMemcpyDtoDAsync` of `block` bytes (2 × `block` apart) between two
/// buffers on GPU `dev`, on one stream, then waited for; one batch at a time.
pub fn ceiling(
    dev: i32,
    block: usize,
    batch: usize,
    warmup: u64,
    seconds: f64,
) -> Result<CudaRow, String> {
    let size = buffer_bytes(block, batch).ok_or("block × batch overflows")?;
    let stride = if batch > 1 { 2 * block as u64 } else { 0 };
    let a = Vram::new(dev, size, true)?;
    let b = Vram::new(dev, size, true)?;
    let ctx: Arc<_> = device(dev).map_err(|e| e.to_string())?;
    let s = Stream::new(&ctx).map_err(|e| e.to_string())?;
    let (src, dst) = (a.desc().addr, b.desc().addr);
    let (mut lat, total) = timed(warmup, seconds, || {
        let _g = ctx.enter().map_err(|e| e.to_string())?;
        for i in 0..batch as u64 {
            // SAFETY: every range is `block` bytes inside live allocations of this device of
            // `size` bytes, kept until after the synchronize below.
            unsafe { s.copy_dtod(dst + i * stride, src + i * stride, block) }
                .map_err(|e| e.to_string())?;
        }
        s.synchronize().map_err(|e| e.to_string())
    })?;
    Ok(row("memcpy-dtod", block * batch, &mut lat, total))
}
