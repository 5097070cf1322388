//! VRAM ↔ DRAM staging through a pool of pinned host buffers, so that backends that move only
//! host memory (`tcp`, `shm`) can carry VRAM when no direct device path exists.
//!
//! [`StagePipeline::stage_out`] reads a list of device ranges as one logical byte stream and hands it to
//! a sink in buffer-sized pieces; [`StagePipeline::stage_in`] fills device ranges from a source. Both
//! are pipelined over the pool's buffers: while the sink sends piece k, the device copies piece
//! k+1 into another buffer. A buffer packs pieces of several descriptors (many small KV blocks
//! fill one buffer). The first error, on either side, ends the whole operation with that error;
//! every buffer goes back to the pool whatever happens.
//!
//! The device copy is behind [`DeviceCopy`], so the engine is tested here with host memory
//! standing in for device memory; [`CudaDeviceCopy`] is the real one (a stream of the device,
//! `cuMemcpyDtoHAsync`/`cuMemcpyHtoDAsync` into pinned buffers from `cuMemHostAlloc`).
//!
//! The agent's staged path (`nixl_core::staging`) uses [`CudaStager`], the backend's
//! [`nixl_core::Stager`]: one pinned host buffer per staged request, and batched copies of the
//! request's pieces spread over the device's streams (coalesced like device-to-device copies).
//! [`StagePipeline`] is for a backend that streams a VRAM request through a few fixed buffers
//! instead of one buffer of the request's size; [`StageStats::staged`] is what such a request
//! reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixl_core::{BackendName, Desc, Error, Result};
use parking_lot::{Condvar, Mutex};

use std::collections::HashMap;

use nixl_core::{HostBuffer, MemKind};

use super::copy::{self, Run};
use super::driver::{self as drv, DeviceCtx, PinnedHost, Stream};

/// Copies between device addresses and host bytes (synchronously: done when it returns).
pub trait DeviceCopy: Send + Sync {
    /// Copies `dst.len()` bytes from device address `src` into `dst`.
    ///
    /// # Safety
    /// `src .. src + dst.len()` is device memory of this copier's device (or memory the device
    /// maps) that stays allocated for the call.
    unsafe fn to_host(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Copies `src` to device address `dst`.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` is device memory of this copier's device (or memory the device
    /// maps) that stays allocated for the call and that nothing else reads or writes during it:
    /// the device writes whatever address it is given.
    unsafe fn to_device(&self, src: &[u8], dst: u64) -> Result<()>;
}

/// A host buffer of the pool.
pub trait HostBuf: Send {
    /// The bytes.
    fn bytes(&mut self) -> &mut [u8];
}

impl HostBuf for Vec<u8> {
    fn bytes(&mut self) -> &mut [u8] {
        self
    }
}

impl HostBuf for PinnedHost {
    fn bytes(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

/// A fixed set of host buffers shared by every staging operation of a backend.
pub struct StagingPool {
    bufs: Mutex<Vec<Box<dyn HostBuf>>>,
    cv: Condvar,
    count: usize,
    size: usize,
}

impl std::fmt::Debug for StagingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingPool")
            .field("count", &self.count)
            .field("size", &self.size)
            .field("available", &self.available())
            .finish()
    }
}

impl StagingPool {
    /// `count` buffers (at least 1) of `size` bytes (at least 1), made by `alloc`.
    pub fn new(
        count: usize,
        size: usize,
        mut alloc: impl FnMut(usize) -> Result<Box<dyn HostBuf>>,
    ) -> Result<Arc<StagingPool>> {
        let count = count.max(1);
        let size = size.max(1);
        let mut bufs = Vec::with_capacity(count);
        for _ in 0..count {
            let mut b = alloc(size)?;
            if b.bytes().len() < size {
                return Err(Error::InvalidArgument(format!(
                    "staging buffer of {} bytes, {size} asked",
                    b.bytes().len()
                )));
            }
            bufs.push(b);
        }
        Ok(Arc::new(StagingPool {
            bufs: Mutex::new(bufs),
            cv: Condvar::new(),
            count,
            size,
        }))
    }

    /// A pool of ordinary (pageable) host memory.
    pub fn host(count: usize, size: usize) -> Arc<StagingPool> {
        StagingPool::new(count, size, |n| Ok(Box::new(vec![0u8; n]))).unwrap_or_else(|_| {
            // Vec buffers are always the size asked; this branch is never taken.
            Arc::new(StagingPool {
                bufs: Mutex::new(Vec::new()),
                cv: Condvar::new(),
                count: 0,
                size: size.max(1),
            })
        })
    }

    /// A pool of pinned buffers (`cuMemHostAlloc`, portable to every context).
    pub fn pinned(ctx: &Arc<DeviceCtx>, count: usize, size: usize) -> Result<Arc<StagingPool>> {
        StagingPool::new(count, size, |n| {
            PinnedHost::new(ctx, n)
                .map(|p| Box::new(p) as Box<dyn HostBuf>)
                .map_err(|e| Error::Backend {
                    backend: BackendName::Cuda,
                    op: "staging buffer",
                    reason: e.to_string(),
                })
        })
    }

    /// Buffers not in use now.
    pub fn available(&self) -> usize {
        self.bufs.lock().len()
    }

    /// Buffers in the pool.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Size of each buffer.
    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// Takes between 1 and `max` buffers: waits for the first, takes the rest if free.
    fn take_some(&self, max: usize) -> Vec<Box<dyn HostBuf>> {
        let mut bufs = self.bufs.lock();
        while bufs.is_empty() {
            self.cv.wait(&mut bufs);
        }
        let n = max.clamp(1, bufs.len());
        let at = bufs.len() - n;
        bufs.split_off(at)
    }

    fn give(&self, b: impl IntoIterator<Item = Box<dyn HostBuf>>) {
        self.bufs.lock().extend(b);
        self.cv.notify_all();
    }
}

/// What a staging operation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageStats {
    /// Bytes moved.
    pub bytes: u64,
    /// Buffer fills (pieces handed to the sink or taken from the source).
    pub pieces: u64,
    /// Always true: the request took the staged path (for telemetry).
    pub staged: bool,
}

/// Walks descriptors as one byte stream, cutting it into buffer-sized pieces.
struct Cursor<'a> {
    segs: &'a [Desc],
    i: usize,
    off: u64,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Desc]) -> Cursor<'a> {
        Cursor { segs, i: 0, off: 0 }
    }

    fn done(&self) -> bool {
        self.i >= self.segs.len()
    }

    /// The next pieces (device address, length) filling at most `room` bytes.
    fn next_pieces(&mut self, room: usize, out: &mut Vec<(u64, usize)>) -> usize {
        out.clear();
        let mut filled = 0usize;
        while filled < room && self.i < self.segs.len() {
            let d = self.segs[self.i];
            let left = d.len - self.off;
            let take = left.min((room - filled) as u64);
            if take > 0 {
                out.push((d.addr + self.off, take as usize));
                filled += take as usize;
                self.off += take;
            }
            if self.off >= d.len {
                self.i += 1;
                self.off = 0;
            }
        }
        filled
    }
}

/// Pipelined VRAM ↔ DRAM staging over a pool of host buffers.
#[derive(Clone)]
pub struct StagePipeline {
    pool: Arc<StagingPool>,
    dev: Arc<dyn DeviceCopy>,
    depth: usize,
}

impl std::fmt::Debug for StagePipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagePipeline")
            .field("pool", &self.pool)
            .field("depth", &self.depth)
            .finish()
    }
}

type Filled = (Box<dyn HostBuf>, u64, usize, Vec<(u64, usize)>);

impl StagePipeline {
    /// A stager over `pool`, copying with `dev`, using up to `depth` buffers (at least 2 for
    /// overlap; fewer if the pool is busy) per operation.
    pub fn new(pool: Arc<StagingPool>, dev: Arc<dyn DeviceCopy>, depth: usize) -> StagePipeline {
        StagePipeline {
            pool,
            dev,
            depth: depth.max(1),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<StagingPool> {
        &self.pool
    }

    /// Reads the device ranges `segs` (in order, as one stream) and calls `sink(offset, bytes)`
    /// for consecutive pieces of the stream, while the next piece is being copied off the device.
    ///
    /// # Safety
    /// Every range of `segs` keeps the contract of [`DeviceCopy::to_host`] for this pipeline's
    /// copier until this returns.
    pub unsafe fn stage_out(
        &self,
        segs: &[Desc],
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<StageStats> {
        check_segs(segs)?;
        let bufs = self.pool.take_some(self.depth);
        let (free_tx, free_rx) = crossbeam_channel::unbounded::<Box<dyn HostBuf>>();
        let (full_tx, full_rx) = crossbeam_channel::unbounded::<Filled>();
        for b in bufs {
            let _ = free_tx.send(b);
        }
        let stop = AtomicBool::new(false);
        let dev = &*self.dev;
        let mut stats = StageStats {
            staged: true,
            ..Default::default()
        };
        let result = std::thread::scope(|sc| {
            let free_rx2 = free_rx.clone();
            let free_tx2 = free_tx.clone();
            let stop = &stop;
            let producer = sc.spawn(move || -> Result<()> {
                let mut cur = Cursor::new(segs);
                let mut off = 0u64;
                let mut pieces = Vec::new();
                while !cur.done() {
                    let Ok(mut b) = free_rx2.recv() else {
                        return Ok(());
                    };
                    if stop.load(Ordering::Acquire) {
                        let _ = free_tx2.send(b);
                        return Ok(());
                    }
                    let n = cur.next_pieces(b.bytes().len(), &mut pieces);
                    let mut at = 0usize;
                    for &(addr, len) in &pieces {
                        // SAFETY: (addr, len) is cut from `segs`, which the caller vouches for.
                        let r = unsafe { dev.to_host(addr, &mut b.bytes()[at..at + len]) };
                        if let Err(e) = r {
                            let _ = free_tx2.send(b);
                            return Err(e);
                        }
                        at += len;
                    }
                    if let Err(crossbeam_channel::SendError((b, ..))) =
                        full_tx.send((b, off, n, Vec::new()))
                    {
                        let _ = free_tx2.send(b);
                        return Ok(());
                    }
                    off += n as u64;
                }
                Ok(())
            });
            let mut sink_result = Ok(());
            for (mut b, off, n, _) in full_rx.iter() {
                if sink_result.is_ok() {
                    match sink(off, &b.bytes()[..n]) {
                        Ok(()) => {
                            stats.bytes += n as u64;
                            stats.pieces += 1;
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Release);
                            sink_result = Err(e);
                        }
                    }
                }
                let _ = free_tx.send(b);
            }
            let produced = producer.join().unwrap_or_else(|_| {
                Err(Error::Backend {
                    backend: BackendName::Cuda,
                    op: "stage out",
                    reason: "device copy thread panicked".into(),
                })
            });
            // The device side's error came first if the sink saw nothing wrong.
            sink_result.and(produced)
        });
        drop(full_rx);
        self.pool.give(free_rx.try_iter());
        result.map(|()| stats)
    }

    /// Fills the device ranges `segs` (in order, as one stream) from `source(offset, buf)`, which
    /// must fill `buf` entirely with the stream's bytes at `offset`; the device copy of piece k
    /// runs while the source fills piece k+1.
    ///
    /// # Safety
    /// Every range of `segs` keeps the contract of [`DeviceCopy::to_device`] for this pipeline's
    /// copier until this returns.
    pub unsafe fn stage_in(
        &self,
        segs: &[Desc],
        source: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<StageStats> {
        check_segs(segs)?;
        let bufs = self.pool.take_some(self.depth);
        let (free_tx, free_rx) = crossbeam_channel::unbounded::<Box<dyn HostBuf>>();
        let (full_tx, full_rx) = crossbeam_channel::unbounded::<Filled>();
        for b in bufs {
            let _ = free_tx.send(b);
        }
        let stop = AtomicBool::new(false);
        let dev = &*self.dev;
        let mut stats = StageStats {
            staged: true,
            ..Default::default()
        };
        let result = std::thread::scope(|sc| {
            let free_tx2 = free_tx.clone();
            let stop = &stop;
            let consumer = sc.spawn(move || -> Result<u64> {
                let mut moved = 0u64;
                let mut failed = None;
                for (mut b, _off, n, pieces) in full_rx.iter() {
                    if failed.is_none() {
                        let mut at = 0usize;
                        for &(addr, len) in &pieces {
                            // SAFETY: (addr, len) is cut from `segs`, which the caller vouches
                            // for.
                            let r = unsafe { dev.to_device(&b.bytes()[at..at + len], addr) };
                            if let Err(e) = r {
                                stop.store(true, Ordering::Release);
                                failed = Some(e);
                                break;
                            }
                            at += len;
                        }
                        if failed.is_none() {
                            moved += n as u64;
                        }
                    }
                    let _ = free_tx2.send(b);
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(moved),
                }
            });
            let mut cur = Cursor::new(segs);
            let mut off = 0u64;
            let mut src_result = Ok(());
            while !cur.done() && !stop.load(Ordering::Acquire) {
                let Ok(mut b) = free_rx.recv() else { break };
                let mut pieces = Vec::new();
                let n = cur.next_pieces(b.bytes().len(), &mut pieces);
                if let Err(e) = source(off, &mut b.bytes()[..n]) {
                    let _ = free_tx.send(b);
                    src_result = Err(e);
                    break;
                }
                stats.pieces += 1;
                if let Err(crossbeam_channel::SendError((b, ..))) =
                    full_tx.send((b, off, n, pieces))
                {
                    let _ = free_tx.send(b);
                    break;
                }
                off += n as u64;
            }
            drop(full_tx);
            let consumed = consumer.join().unwrap_or_else(|_| {
                Err(Error::Backend {
                    backend: BackendName::Cuda,
                    op: "stage in",
                    reason: "device copy thread panicked".into(),
                })
            });
            src_result?;
            stats.bytes = consumed?;
            Ok(())
        });
        self.pool.give(free_rx.try_iter());
        result.map(|()| stats)
    }
}

fn check_segs(segs: &[Desc]) -> Result<()> {
    for (index, d) in segs.iter().enumerate() {
        if d.len == 0 || d.end().is_none() {
            return Err(Error::InvalidDesc {
                index,
                reason: format!("staging range {:#x}+{} is empty or wraps", d.addr, d.len),
            });
        }
    }
    Ok(())
}

/// The real device side: synchronous copies on a stream of the device (into pinned buffers the
/// copies run at PCIe/C2C speed).
#[derive(Debug)]
pub struct CudaDeviceCopy {
    stream: Stream,
}

impl CudaDeviceCopy {
    /// A copier on a new stream of `ctx`'s device.
    pub fn new(ctx: &Arc<DeviceCtx>) -> Result<CudaDeviceCopy> {
        Ok(CudaDeviceCopy {
            stream: Stream::new(ctx).map_err(|e| cu("staging stream", e))?,
        })
    }
}

fn cu(op: &'static str, e: super::driver::CuError) -> Error {
    Error::Backend {
        backend: BackendName::Cuda,
        op,
        reason: e.to_string(),
    }
}

impl DeviceCopy for CudaDeviceCopy {
    unsafe fn to_host(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        let _g = self.stream.ctx().enter().map_err(|e| cu("stage out", e))?;
        // SAFETY: the caller vouches for the device range (`DeviceCopy::to_host`), `dst` is a
        // host slice we borrow; we synchronize before returning, so both stay valid for the
        // whole copy.
        unsafe { self.stream.copy_dtoh(dst.as_mut_ptr(), src, dst.len()) }
            .map_err(|e| cu("stage out", e))?;
        self.stream.synchronize().map_err(|e| cu("stage out", e))
    }

    unsafe fn to_device(&self, src: &[u8], dst: u64) -> Result<()> {
        let _g = self.stream.ctx().enter().map_err(|e| cu("stage in", e))?;
        // SAFETY: as in `to_host`, the other way round.
        unsafe { self.stream.copy_htod(dst, src.as_ptr(), src.len()) }
            .map_err(|e| cu("stage in", e))?;
        self.stream.synchronize().map_err(|e| cu("stage in", e))
    }
}

/// Pinned host memory handed to the agent's staged path.
#[derive(Debug)]
pub struct PinnedBuffer(PinnedHost);

// SAFETY: the pinned allocation is owned by this value, never resized, used by nothing else
// (the slice is never handed out), and freed only on drop.
unsafe impl HostBuffer for PinnedBuffer {
    fn addr(&self) -> u64 {
        self.0.as_slice().as_ptr() as u64
    }

    fn len(&self) -> u64 {
        self.0.as_slice().len() as u64
    }
}

/// The `cuda` backend's [`nixl_core::Stager`]: pinned host buffers (`cuMemHostAlloc`, portable)
/// and batched device ↔ host copies over a pool of streams per device.
#[derive(Debug)]
pub struct CudaStager {
    streams: usize,
    /// Chunk size and chunks in flight of the agent's staged path (`[cuda]
    /// staging_buffer_size`, `staging_buffers`).
    chunk: (u64, usize),
    devices: Mutex<HashMap<u64, Arc<Vec<Stream>>>>,
}

impl CudaStager {
    /// A stager using `streams` streams per device, staging in `chunk_bytes` chunks with
    /// `slots` of them in flight; `Err` is why there is none (no driver).
    pub fn new(
        streams: usize,
        chunk_bytes: usize,
        slots: usize,
    ) -> std::result::Result<CudaStager, String> {
        // No context is retained here: each request's own device is opened when it needs one
        // (retaining GPU 0's would cost every staging process memory on GPU 0, and fail where
        // GPU 0 is exclusive or hidden).
        drv::driver()?;
        Ok(CudaStager {
            streams: streams.max(1),
            chunk: ((chunk_bytes as u64).max(4096), slots.max(1)),
            devices: Mutex::new(HashMap::new()),
        })
    }

    fn streams(&self, dev: u64) -> Result<Arc<Vec<Stream>>> {
        let mut m = self.devices.lock();
        if let Some(s) = m.get(&dev) {
            return Ok(Arc::clone(s));
        }
        let ordinal = i32::try_from(dev).map_err(|_| {
            Error::InvalidArgument(format!("VRAM dev_id {dev} is not a GPU ordinal"))
        })?;
        let ctx = super::device(ordinal)?;
        let mut v = Vec::with_capacity(self.streams);
        for _ in 0..self.streams {
            v.push(Stream::new(&ctx).map_err(|e| cu("staging stream", e))?);
        }
        let v = Arc::new(v);
        m.insert(dev, Arc::clone(&v));
        Ok(v)
    }

    /// # Safety
    /// The contract of [`nixl_core::Stager::to_host`] (or `to_device`).
    unsafe fn copy(&self, pieces: &[(Desc, u64)], to_host: bool) -> Result<()> {
        let mut by_dev: HashMap<u64, Vec<Run>> = HashMap::new();
        for (d, host) in pieces {
            let run = if to_host {
                Run {
                    src: d.addr,
                    dst: *host,
                    len: d.len,
                }
            } else {
                Run {
                    src: *host,
                    dst: d.addr,
                    len: d.len,
                }
            };
            by_dev.entry(d.dev_id).or_default().push(run);
        }
        let op = if to_host {
            "stage to host"
        } else {
            "stage to device"
        };
        for (dev, runs) in by_dev {
            let streams = self.streams(dev)?;
            let plan = copy::plan(runs, streams.len());
            let mut first_err = None;
            for (i, part) in plan.parts.iter().enumerate() {
                if part.is_empty() || first_err.is_some() {
                    continue;
                }
                let s = &streams[i % streams.len()];
                let r = (|| {
                    let _g = s.ctx().enter()?;
                    for r in part {
                        let len = usize::try_from(r.len).unwrap_or(usize::MAX);
                        // SAFETY: the caller of `Stager::to_host`/`to_device` vouches for both
                        // ranges (registered VRAM it holds, and a buffer this stager
                        // allocated); both stay valid until the synchronize below.
                        unsafe {
                            if to_host {
                                s.copy_dtoh(r.dst as *mut u8, r.src, len)?
                            } else {
                                s.copy_htod(r.dst, r.src as *const u8, len)?
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    first_err = Some(cu(op, e));
                }
            }
            // Every stream is drained, even after an error, before the memory is let go.
            for s in streams.iter() {
                if let Err(e) = s.synchronize() {
                    first_err.get_or_insert(cu(op, e));
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(())
    }
}

// SAFETY: `alloc` returns a `PinnedBuffer` of the length asked; the copies touch only the
// ranges given and synchronize every stream before returning.
unsafe impl nixl_core::Stager for CudaStager {
    fn backend(&self) -> BackendName {
        BackendName::Cuda
    }

    fn kind(&self) -> MemKind {
        MemKind::Vram
    }

    fn alloc(&self, len: u64, dev_id: u64) -> Result<Box<dyn HostBuffer>> {
        let n = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("{len} bytes of staging memory")))?;
        let ordinal = i32::try_from(dev_id).map_err(|_| {
            Error::InvalidArgument(format!("VRAM dev_id {dev_id} is not a GPU ordinal"))
        })?;
        let ctx = super::device(ordinal)?;
        let p = PinnedHost::new(&ctx, n).map_err(|e| cu("pinned staging buffer", e))?;
        Ok(Box::new(PinnedBuffer(p)))
    }

    unsafe fn to_host(&self, pieces: &[(Desc, u64)]) -> Result<()> {
        // SAFETY: forwarded from our caller.
        unsafe { self.copy(pieces, true) }
    }

    unsafe fn to_device(&self, pieces: &[(Desc, u64)]) -> Result<()> {
        // SAFETY: forwarded from our caller.
        unsafe { self.copy(pieces, false) }
    }

    fn chunk_bytes(&self) -> u64 {
        self.chunk.0
    }

    fn slots(&self) -> usize {
        self.chunk.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Host memory standing in for device memory: "device addresses" are offsets into it.
    struct FakeDevice {
        mem: Mutex<Vec<u8>>,
        fail_at: Option<u64>,
        calls: AtomicUsize,
    }

    impl FakeDevice {
        fn new(mem: Vec<u8>) -> FakeDevice {
            FakeDevice {
                mem: Mutex::new(mem),
                fail_at: None,
                calls: AtomicUsize::new(0),
            }
        }
    }

    impl DeviceCopy for FakeDevice {
        unsafe fn to_host(&self, src: u64, dst: &mut [u8]) -> Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self
                .fail_at
                .is_some_and(|f| f >= src && f < src + dst.len() as u64)
            {
                return Err(Error::Backend {
                    backend: BackendName::Cuda,
                    op: "fake",
                    reason: format!("device fault at {src:#x}"),
                });
            }
            let m = self.mem.lock();
            dst.copy_from_slice(&m[src as usize..src as usize + dst.len()]);
            Ok(())
        }

        unsafe fn to_device(&self, src: &[u8], dst: u64) -> Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self
                .fail_at
                .is_some_and(|f| f >= dst && f < dst + src.len() as u64)
            {
                return Err(Error::Backend {
                    backend: BackendName::Cuda,
                    op: "fake",
                    reason: format!("device fault at {dst:#x}"),
                });
            }
            let mut m = self.mem.lock();
            m[dst as usize..dst as usize + src.len()].copy_from_slice(src);
            Ok(())
        }
    }

    /// The pipeline over a [`FakeDevice`], whose "device addresses" are offsets into its own
    /// memory, bounds-checked (a bad one panics, touching nothing).
    fn stage_out(
        st: &StagePipeline,
        segs: &[Desc],
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<StageStats> {
        // SAFETY: the copier is a FakeDevice: any device range is safe to name.
        unsafe { st.stage_out(segs, sink) }
    }

    /// As [`stage_out`], inbound.
    fn stage_in(
        st: &StagePipeline,
        segs: &[Desc],
        source: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<StageStats> {
        // SAFETY: as in `stage_out`.
        unsafe { st.stage_in(segs, source) }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Odd-sized descriptors scattered over `mem_len` bytes (non-overlapping, shuffled order).
    fn odd_segs(mem_len: u64, seed: u64) -> Vec<Desc> {
        let r = pattern(seed, 4096);
        let mut segs = Vec::new();
        let mut at = 0u64;
        let mut i = 0;
        while at < mem_len {
            let len =
                (u64::from(r[i % 4096]) * 37 + u64::from(r[(i + 1) % 4096]) + 1).min(mem_len - at);
            segs.push(Desc::new(at, len, 0));
            at += len + u64::from(r[(i + 2) % 4096] % 5);
            i += 3;
        }
        // Reverse pairs so the stream order is not the address order.
        for c in segs.chunks_mut(2) {
            c.reverse();
        }
        segs
    }

    fn expected(mem: &[u8], segs: &[Desc]) -> Vec<u8> {
        segs.iter()
            .flat_map(|d| {
                mem[d.addr as usize..(d.addr + d.len) as usize]
                    .iter()
                    .copied()
            })
            .collect()
    }

    #[test]
    fn stage_out_is_byte_exact_with_odd_sizes_and_many_descriptors() {
        let mem = pattern(1, 3 << 20);
        let dev = Arc::new(FakeDevice::new(mem.clone()));
        let pool = StagingPool::host(4, 64 * 1024 + 7);
        let st = StagePipeline::new(Arc::clone(&pool), dev, 3);
        let segs = odd_segs(mem.len() as u64, 5);
        assert!(segs.len() > 500, "{}", segs.len());
        let mut out = Vec::new();
        let stats = stage_out(&st, &segs, &mut |off, b| {
            assert_eq!(off, out.len() as u64, "pieces arrive in order");
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert!(out == expected(&mem, &segs), "staged bytes differ");
        assert_eq!(stats.bytes, out.len() as u64);
        assert!(stats.staged);
        assert!(stats.pieces >= out.len() as u64 / (64 * 1024 + 7));
        assert_eq!(pool.available(), 4, "buffers back in the pool");
    }

    #[test]
    fn stage_in_is_byte_exact() {
        let mem_len = (2 << 20) + 13;
        let dev = Arc::new(FakeDevice::new(vec![0u8; mem_len]));
        let pool = StagingPool::host(3, 10_007);
        let st = StagePipeline::new(
            Arc::clone(&pool),
            Arc::clone(&dev) as Arc<dyn DeviceCopy>,
            3,
        );
        let segs = odd_segs(mem_len as u64, 9);
        let total: u64 = segs.iter().map(|d| d.len).sum();
        let stream = pattern(2, total as usize);
        let stats = stage_in(&st, &segs, &mut |off, buf| {
            buf.copy_from_slice(&stream[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(stats.bytes, total);
        let mem = dev.mem.lock().clone();
        assert!(expected(&mem, &segs) == stream, "device bytes differ");
        // Gaps between descriptors untouched.
        let mut covered = vec![false; mem_len];
        for d in &segs {
            covered[d.addr as usize..(d.addr + d.len) as usize].fill(true);
        }
        assert!(mem.iter().zip(&covered).all(|(b, c)| *c || *b == 0));
        assert_eq!(pool.available(), 3);
    }

    #[test]
    fn device_error_midway_ends_everything_and_returns_buffers() {
        let mem = pattern(3, 1 << 20);
        let mut d = FakeDevice::new(mem);
        d.fail_at = Some(600_000);
        let dev = Arc::new(d);
        let pool = StagingPool::host(2, 4096);
        let st = StagePipeline::new(
            Arc::clone(&pool),
            Arc::clone(&dev) as Arc<dyn DeviceCopy>,
            2,
        );
        let segs = vec![Desc::new(0, 1 << 20, 0)];
        let mut got = 0u64;
        let e = stage_out(&st, &segs, &mut |_, b| {
            got += b.len() as u64;
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("device fault"), "{e}");
        assert!(got <= 600_000, "nothing past the fault was sent");
        assert_eq!(pool.available(), 2);
        // And inbound.
        let e = stage_in(&st, &segs, &mut |_, b| {
            b.fill(1);
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("device fault"), "{e}");
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn sink_or_source_error_stops_the_device_side() {
        let mem = pattern(4, 1 << 20);
        let dev = Arc::new(FakeDevice::new(mem));
        let pool = StagingPool::host(3, 1000);
        let st = StagePipeline::new(
            Arc::clone(&pool),
            Arc::clone(&dev) as Arc<dyn DeviceCopy>,
            3,
        );
        let segs = vec![Desc::new(0, 1 << 20, 0)];
        let mut n = 0;
        let e = stage_out(&st, &segs, &mut |_, _| {
            n += 1;
            if n == 5 {
                Err(Error::RemoteDisconnect {
                    peer: "p".into(),
                    reason: "socket closed".into(),
                })
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
        assert_eq!(n, 5, "the sink is not called after its error");
        // The device side stopped early: far fewer than the 1049 copies the whole range takes.
        assert!(dev.calls.load(Ordering::Relaxed) < 100);
        assert_eq!(pool.available(), 3);

        dev.calls.store(0, Ordering::Relaxed);
        let mut n = 0;
        let e = stage_in(&st, &segs, &mut |_, _| {
            n += 1;
            if n == 3 {
                Err(Error::TimedOut)
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, Error::TimedOut), "{e}");
        assert!(dev.calls.load(Ordering::Relaxed) <= 2);
        assert_eq!(pool.available(), 3);
    }

    #[test]
    fn concurrent_operations_share_a_small_pool() {
        let mem = pattern(5, 1 << 20);
        let dev = Arc::new(FakeDevice::new(mem.clone()));
        let pool = StagingPool::host(2, 3000);
        let st = StagePipeline::new(Arc::clone(&pool), dev, 2);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let st = st.clone();
                let mem = &mem;
                s.spawn(move || {
                    let segs = vec![Desc::new(t * 1000, 200_000, 0)];
                    let mut out = Vec::new();
                    stage_out(&st, &segs, &mut |_, b| {
                        out.extend_from_slice(b);
                        Ok(())
                    })
                    .unwrap();
                    assert!(out == expected(mem, &segs));
                });
            }
        });
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let dev = Arc::new(FakeDevice::new(vec![0; 10]));
        let st = StagePipeline::new(StagingPool::host(1, 10), dev, 2);
        let e = stage_out(&st, &[Desc::new(0, 0, 0)], &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, Error::InvalidDesc { index: 0, .. }), "{e}");
        let e = stage_in(
            &st,
            &[Desc::new(1, 1, 0), Desc::new(u64::MAX, 2, 0)],
            &mut |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::InvalidDesc { index: 1, .. }), "{e}");
    }
}
