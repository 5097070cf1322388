//! Streams and the copies enqueued on them, and events marking points in them.

use super::*;

/// Most copies in one `cuMemcpyBatchAsync` call.
pub(crate) const BATCH_MAX: usize = 4096;

/// A non-blocking stream of a device.
#[derive(Debug)]
pub struct Stream(Owned<StreamKind>);

pub(super) struct StreamKind;

// SAFETY: a CUstream may be used from any thread; the driver serialises work on it.
unsafe impl Kind for StreamKind {
    type Raw = CuStream;
    const WHAT: &'static str = "stream";

    unsafe fn release(rel: &Releaser<'_>, raw: &CuStream) {
        // SAFETY: destroys our stream; work still queued completes first (driver semantics),
        // and nobody holds the raw handle any more.
        rel.check("cuStreamDestroy", unsafe {
            (rel.api().stream_destroy)(*raw)
        });
    }
}

impl Stream {
    /// A new non-blocking stream in `ctx`.
    pub fn new(ctx: &Arc<DeviceCtx>) -> CuRes<Stream> {
        let _g = ctx.enter()?;
        // SAFETY: writes one CUstream, ours to destroy; our context is current.
        let s = unsafe {
            Owned::make(ctx, "cuStreamCreate", std::ptr::null_mut(), |raw| {
                (ctx.drv.api.stream_create)(raw, CU_STREAM_NON_BLOCKING)
            })
        }?;
        Ok(Stream(s))
    }

    /// The device context.
    pub fn ctx(&self) -> &Arc<DeviceCtx> {
        self.0.ctx()
    }

    /// The driver's handle (live while `self` is).
    pub(super) fn raw(&self) -> CuStream {
        self.0.raw
    }

    /// Enqueues a device-to-device copy of `len` bytes (any devices, unified addressing). The
    /// stream's context must be current ([`DeviceCtx::enter`]); the copies do not push it
    /// themselves, so a batch of thousands pays for one push.
    ///
    /// # Safety
    /// `src..src+len` must be readable and `dst..dst+len` writable device memory mapped in this
    /// process until the work is complete (an event recorded after it has completed).
    pub unsafe fn copy_dtod(&self, dst: u64, src: u64, len: usize) -> CuRes<()> {
        // SAFETY: per the contract.
        self.0.ctx.check("cuMemcpyDtoDAsync", unsafe {
            (self.0.ctx.drv.api.memcpy_dtod_async)(dst, src, len, self.raw())
        })
    }

    /// Enqueues device-to-device copies `(dst, src, len)` with as few driver calls as the
    /// driver allows: `cuMemcpyBatchAsync` (one call per [`BATCH_MAX`] copies, a few hundred
    /// nanoseconds per copy instead of microseconds) where present, else one
    /// [`Stream::copy_dtod`] each. As `copy_dtod`, the context must be current.
    ///
    /// # Safety
    /// As [`Stream::copy_dtod`], for every copy.
    pub(crate) unsafe fn copy_dtod_batch(&self, copies: &[(u64, u64, usize)]) -> CuRes<()> {
        let opt = &self.0.ctx.drv.opt;
        if copies.len() < 2 || (opt.memcpy_batch_v2.is_none() && opt.memcpy_batch_v1.is_none()) {
            for &(dst, src, len) in copies {
                // SAFETY: per the contract.
                unsafe { self.copy_dtod(dst, src, len)? };
            }
            return Ok(());
        }
        let loc = MemLocation {
            type_: CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.0.ctx.ordinal,
        };
        let mut attrs = MemcpyAttributes {
            src_access_order: MEMCPY_SRC_ACCESS_ORDER_STREAM,
            src_loc_hint: loc,
            dst_loc_hint: loc,
            flags: 0,
        };
        let mut dsts = Vec::with_capacity(copies.len().min(BATCH_MAX));
        let mut srcs = Vec::with_capacity(dsts.capacity());
        let mut sizes = Vec::with_capacity(dsts.capacity());
        for batch in copies.chunks(BATCH_MAX) {
            dsts.clear();
            srcs.clear();
            sizes.clear();
            for &(d, s, l) in batch {
                dsts.push(d);
                srcs.push(s);
                sizes.push(l);
            }
            let mut idx = [0usize];
            let r = if let Some(f) = opt.memcpy_batch_v2 {
                // SAFETY: three arrays of `batch.len()` entries and one attribute applying from
                // copy 0 (`attrsIdxs = [0]`), all live for the call (the driver copies the
                // descriptions); the copies' memory per the contract.
                unsafe {
                    f(
                        dsts.as_mut_ptr(),
                        srcs.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        batch.len(),
                        &mut attrs,
                        idx.as_mut_ptr(),
                        1,
                        self.raw(),
                    )
                }
            } else if let Some(f) = opt.memcpy_batch_v1 {
                let mut fail = usize::MAX;
                // SAFETY: as above, plus the failed-copy index written on error.
                unsafe {
                    f(
                        dsts.as_mut_ptr(),
                        srcs.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        batch.len(),
                        &mut attrs,
                        idx.as_mut_ptr(),
                        1,
                        &mut fail,
                        self.raw(),
                    )
                }
            } else {
                unreachable!("checked above")
            };
            self.0.ctx.check("cuMemcpyBatchAsync", r)?;
        }
        Ok(())
    }

    /// Enqueues a device-to-host copy.
    ///
    /// # Safety
    /// `src..src+len` must be readable device memory and `dst..dst+len` writable host memory
    /// (pinned for a truly asynchronous copy) until the work is complete.
    pub(crate) unsafe fn copy_dtoh(&self, dst: *mut u8, src: u64, len: usize) -> CuRes<()> {
        // SAFETY: per the contract.
        self.0.ctx.check("cuMemcpyDtoHAsync", unsafe {
            (self.0.ctx.drv.api.memcpy_dtoh_async)(dst.cast(), src, len, self.raw())
        })
    }

    /// Enqueues a host-to-device copy.
    ///
    /// # Safety
    /// `src..src+len` must be readable host memory and `dst..dst+len` writable device memory
    /// until the work is complete.
    pub(crate) unsafe fn copy_htod(&self, dst: u64, src: *const u8, len: usize) -> CuRes<()> {
        // SAFETY: per the contract.
        self.0.ctx.check("cuMemcpyHtoDAsync", unsafe {
            (self.0.ctx.drv.api.memcpy_htod_async)(dst, src.cast(), len, self.raw())
        })
    }

    /// Waits until every enqueued piece of work is done.
    pub fn synchronize(&self) -> CuRes<()> {
        let _g = self.0.ctx.enter()?;
        // SAFETY: a live stream of the current context.
        self.0.ctx.check("cuStreamSynchronize", unsafe {
            (self.0.ctx.drv.api.stream_synchronize)(self.0.raw)
        })
    }
}

/// An event (timing disabled) marking a point in a stream.
#[derive(Debug)]
pub(crate) struct Event(Owned<EventKind>);

pub(super) struct EventKind;

// SAFETY: a CUevent may be recorded, queried and synchronised from any thread.
unsafe impl Kind for EventKind {
    type Raw = CuEvent;
    const WHAT: &'static str = "event";

    unsafe fn release(rel: &Releaser<'_>, raw: &CuEvent) {
        // SAFETY: destroys our event (legal even while pending: its resources are freed when
        // the work completes).
        rel.check("cuEventDestroy", unsafe { (rel.api().event_destroy)(*raw) });
    }
}

impl Event {
    /// Records a new event on `stream` (after everything enqueued so far).
    pub(crate) fn record(stream: &Stream) -> CuRes<Event> {
        let ctx = stream.ctx();
        let _g = ctx.enter()?;
        // SAFETY: writes one CUevent, ours to destroy; our context is current.
        let ev = unsafe {
            Owned::<EventKind>::make(ctx, "cuEventCreate", std::ptr::null_mut(), |raw| {
                (ctx.drv.api.event_create)(raw, CU_EVENT_DISABLE_TIMING)
            })
        }?;
        // SAFETY: a live event and stream of the same context.
        ctx.check("cuEventRecord", unsafe {
            (ctx.drv.api.event_record)(ev.raw, stream.raw())
        })?;
        Ok(Event(ev))
    }

    /// Whether the work before the event is done (`Err` if it failed).
    pub(crate) fn is_done(&self) -> CuRes<bool> {
        let _g = self.0.ctx.enter()?;
        // SAFETY: a live event of the current context.
        let r = unsafe { (self.0.ctx.drv.api.event_query)(self.0.raw) };
        if r == CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        self.0.ctx.check("cuEventQuery", r)?;
        Ok(true)
    }

    /// Waits until the work before the event is done.
    pub(crate) fn wait(&self) -> CuRes<()> {
        let _g = self.0.ctx.enter()?;
        // SAFETY: a live event of the current context.
        self.0.ctx.check("cuEventSynchronize", unsafe {
            (self.0.ctx.drv.api.event_synchronize)(self.0.raw)
        })
    }
}
