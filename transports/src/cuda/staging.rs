//! VRAM ↔ DRAM staging, so that backends that move only host memory (`tcp`, `shm`, the file
//! backends) can carry VRAM when no direct device path exists.
//!
//! The agent's staged path (`nixl_core::staging`) uses [`CudaStager`], the backend's
//! [`nixl_core::Stager`]: one pinned host buffer per staged request, and batched copies of the
//! request's pieces spread over the device's streams (coalesced like device-to-device copies).

use std::collections::HashMap;
use std::sync::Arc;

use nixl_core::{BackendName, Desc, Error, HostBuffer, MemKind, Result};
use parking_lot::Mutex;

use super::copy::{self, Run};
use super::driver::{self as drv, PinnedHost, Stream};

fn cu(op: &'static str, e: super::driver::CuError) -> Error {
    Error::Backend {
        backend: BackendName::Cuda,
        op,
        reason: e.to_string(),
    }
}

/// Pinned host memory handed to the agent's staged path.
#[derive(Debug)]
pub(super) struct PinnedBuffer(PinnedHost);

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
pub(super) struct CudaStager {
    streams: usize,
    /// Chunk size and chunks in flight of the agent's staged path (`[cuda]
    /// staging_buffer_size`, `staging_buffers`).
    chunk: (u64, usize),
    devices: Mutex<HashMap<u64, Arc<Vec<Stream>>>>,
}

impl CudaStager {
    /// A stager using `streams` streams per device, staging in `chunk_bytes` chunks with
    /// `slots` of them in flight; `Err` is why there is none (no driver).
    pub(super) fn new(
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
