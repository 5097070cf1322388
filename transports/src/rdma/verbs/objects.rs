//! The safe layer's resources: device context, protection domain, memory regions, owned
//! buffers, completion queues. Each holds an `Arc` of its parent's inner struct.

use super::*;

// ---------------------------------------------------------------------------------------------
// Safe layer.
// ---------------------------------------------------------------------------------------------

pub(super) fn log_destroy(call: &'static str, what: &str, rc: c_int) {
    if rc != 0 {
        let e = rc_err(call, rc);
        metrics::counter!("nixl_rdma_teardown_errors_total").increment(1);
        tracing::warn!(what, error = %e, "rdma teardown failed");
    }
}

pub(super) struct CtxInner {
    pub(super) verbs: Arc<Verbs>,
    pub(super) ptr: *mut IbvContext,
    pub(super) name: String,
}

// SAFETY: a verbs context may be used from any thread (libibverbs serialises what needs it);
// the pointer is owned by this struct and closed once in Drop.
unsafe impl Send for CtxInner {}
// SAFETY: as for Send: every call through it is thread-safe per the verbs API.
unsafe impl Sync for CtxInner {}

impl Drop for CtxInner {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, closed once; every child holds this Arc, so none
        // is alive any more.
        let rc = unsafe { (self.verbs.fns.close_device)(self.ptr) };
        log_destroy("ibv_close_device", &self.name, rc);
    }
}

/// An open device.
#[derive(Clone)]
pub struct Context(pub(super) Arc<CtxInner>);

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({})", self.0.name)
    }
}

impl Context {
    /// The device name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The library.
    pub fn verbs(&self) -> &Arc<Verbs> {
        &self.0.verbs
    }

    /// `ibv_query_device`.
    pub fn query_device(&self) -> VResult<IbvDeviceAttr> {
        // SAFETY: all-zero is a valid IbvDeviceAttr (integers and a char array).
        let mut a: IbvDeviceAttr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, `a` is a complete ibv_device_attr (layout test).
        let rc = unsafe { (self.0.verbs.fns.query_device)(self.0.ptr, &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(a)
    }

    /// `ibv_query_port` (zeroed first, as the inline wrapper in verbs.h does).
    pub fn query_port(&self, port: u8) -> VResult<IbvPortAttr> {
        let mut a = IbvPortAttr::default();
        // SAFETY: live context; the exported symbol fills the compat prefix of `a`, which is a
        // complete ibv_port_attr.
        let rc = unsafe { (self.0.verbs.fns.query_port)(self.0.ptr, port, &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_port", rc));
        }
        Ok(a)
    }

    /// `ibv_query_gid`.
    pub fn query_gid(&self, port: u8, index: u8) -> VResult<[u8; 16]> {
        let mut g = IbvGid::default();
        // SAFETY: live context, `g` is a valid union ibv_gid.
        let rc = unsafe { (self.0.verbs.fns.query_gid)(self.0.ptr, port, index.into(), &mut g) };
        if rc != 0 {
            return Err(rc_err("ibv_query_gid", rc));
        }
        Ok(g.raw)
    }

    /// `ibv_alloc_pd`.
    pub fn alloc_pd(&self) -> VResult<Pd> {
        // SAFETY: live context.
        let p = unsafe { (self.0.verbs.fns.alloc_pd)(self.0.ptr) };
        if p.is_null() {
            return Err(errno_err("ibv_alloc_pd"));
        }
        Ok(Pd(Arc::new(PdInner {
            ctx: self.clone(),
            ptr: p,
        })))
    }

    /// `ibv_create_cq` with `depth` entries and no completion channel (the backend polls).
    pub fn create_cq(&self, depth: u32) -> VResult<Cq> {
        let depth = c_int::try_from(depth).unwrap_or(c_int::MAX);
        // SAFETY: live context; no channel, no user context, vector 0.
        let p = unsafe {
            (self.0.verbs.fns.create_cq)(
                self.0.ptr,
                depth,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if p.is_null() {
            return Err(errno_err("ibv_create_cq"));
        }
        Ok(Cq(Arc::new(CqInner {
            ctx: self.clone(),
            ptr: p,
        })))
    }
}

pub(super) struct PdInner {
    pub(super) ctx: Context,
    pub(super) ptr: *mut IbvPd,
}

// SAFETY: a PD is used from any thread per the verbs API; owned, freed once in Drop.
unsafe impl Send for PdInner {}
// SAFETY: as for Send.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; MRs and QPs hold this Arc, so none is alive.
        let rc = unsafe { (self.ctx.0.verbs.fns.dealloc_pd)(self.ptr) };
        log_destroy("ibv_dealloc_pd", self.ctx.name(), rc);
    }
}

/// A protection domain.
#[derive(Clone)]
pub struct Pd(pub(super) Arc<PdInner>);

impl fmt::Debug for Pd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pd({})", self.0.ctx.name())
    }
}

impl Pd {
    /// The device context.
    pub fn context(&self) -> &Context {
        &self.0.ctx
    }

    /// `ibv_reg_mr` of `[addr, addr + len)`.
    ///
    /// # Safety
    /// The memory must stay allocated until the returned [`Mr`] is dropped: the NIC reads and
    /// writes it (with `access`) for peers and for work requests at any time until then.
    pub unsafe fn reg_mr(&self, addr: u64, len: u64, access: c_int) -> VResult<Mr> {
        let len = usize::try_from(len).map_err(|_| VerbsError {
            call: "ibv_reg_mr",
            reason: format!("length {len} does not fit usize"),
        })?;
        // SAFETY: live PD; the caller keeps the memory valid while the MR lives.
        let p = unsafe {
            (self.0.ctx.0.verbs.fns.reg_mr)(self.0.ptr, addr as *mut c_void, len, access)
        };
        if p.is_null() {
            return Err(errno_err("ibv_reg_mr"));
        }
        Ok(Mr::wrap(self.clone(), p))
    }

    /// `ibv_reg_dmabuf_mr` of `len` bytes at `offset` of the dmabuf `fd`, at address `iova`.
    /// The kernel holds the dmabuf (and so the device memory) until the MR is deregistered, so
    /// no contract is left to the caller.
    pub fn reg_dmabuf_mr(
        &self,
        offset: u64,
        len: u64,
        iova: u64,
        fd: i32,
        access: c_int,
    ) -> VResult<Mr> {
        let f = self.0.ctx.0.verbs.fns.reg_dmabuf_mr.ok_or(VerbsError {
            call: "ibv_reg_dmabuf_mr",
            reason: "this libibverbs lacks ibv_reg_dmabuf_mr (rdma-core 34 or later needed)".into(),
        })?;
        let len = usize::try_from(len).map_err(|_| VerbsError {
            call: "ibv_reg_dmabuf_mr",
            reason: format!("length {len} does not fit usize"),
        })?;
        // SAFETY: live PD; the kernel takes its own reference on the dmabuf behind `fd`.
        let p = unsafe { f(self.0.ptr, offset, len, iova, fd, access) };
        if p.is_null() {
            return Err(errno_err("ibv_reg_dmabuf_mr"));
        }
        Ok(Mr::wrap(self.clone(), p))
    }

    /// `ibv_create_qp`: a reliable-connected QP on `cq` (send and receive), with `cap`.
    pub fn create_rc_qp(&self, cq: &Cq, cap: IbvQpCap) -> VResult<Qp> {
        let mut attr = IbvQpInitAttr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.0.ptr,
            recv_cq: cq.0.ptr,
            srq: std::ptr::null_mut(),
            cap,
            qp_type: QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: live PD and CQ (of the same context, checked by the provider), `attr` complete.
        let p = unsafe { (self.0.ctx.0.verbs.fns.create_qp)(self.0.ptr, &mut attr) };
        if p.is_null() {
            return Err(errno_err("ibv_create_qp"));
        }
        Ok(Qp {
            ptr: p,
            cap: attr.cap,
            _cq: cq.clone(),
            pd: self.clone(),
        })
    }
}

/// A memory region.
pub struct Mr {
    pub(super) ptr: *mut IbvMr,
    pub(super) lkey: u32,
    pub(super) rkey: u32,
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) pd: Pd,
}

// SAFETY: an MR handle is plain data plus a pointer freed once in Drop; verbs allow any thread.
unsafe impl Send for Mr {}
// SAFETY: no interior mutation through &Mr.
unsafe impl Sync for Mr {}

impl fmt::Debug for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mr")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .finish()
    }
}

impl Mr {
    fn wrap(pd: Pd, p: *mut IbvMr) -> Mr {
        // SAFETY: `p` is a live MR just returned by libibverbs; its fields are plain data.
        let (lkey, rkey, addr, len) =
            unsafe { ((*p).lkey, (*p).rkey, (*p).addr as u64, (*p).length as u64) };
        Mr {
            ptr: p,
            lkey,
            rkey,
            addr,
            len,
            pd,
        }
    }

    /// The local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The remote key.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr/ibv_reg_dmabuf_mr, deregistered once.
        let rc = unsafe { (self.pd.0.ctx.0.verbs.fns.dereg_mr)(self.ptr) };
        log_destroy("ibv_dereg_mr", self.pd.0.ctx.name(), rc);
    }
}

/// A buffer owned by the backend and registered on one PD (notification slots). The NIC
/// writes into it for posted receives; the backend reads a slot only after its receive has
/// completed and before it is posted again.
pub struct OwnedBuf {
    // ManuallyDrop: deregistered in Drop before the memory is freed.
    pub(super) mr: std::mem::ManuallyDrop<Mr>,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: the buffer is a private heap allocation; access goes through raw pointers only, in
// the slot discipline described on the type.
unsafe impl Send for OwnedBuf {}
// SAFETY: as for Send.
unsafe impl Sync for OwnedBuf {}

impl fmt::Debug for OwnedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedBuf").field("len", &self.len).finish()
    }
}

impl OwnedBuf {
    /// A zeroed buffer of `len` bytes registered on `pd` with local write access (and remote
    /// access `extra`).
    pub fn new(pd: &Pd, len: usize, extra: c_int) -> VResult<OwnedBuf> {
        let len = len.max(1);
        let boxed: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let ptr = Box::into_raw(boxed).cast::<u8>();
        // SAFETY: `ptr` is a live allocation of `len` bytes freed only in Drop, after `mr`.
        let mr = unsafe { pd.reg_mr(ptr as u64, len as u64, ACCESS_LOCAL_WRITE | extra) };
        match mr {
            Ok(mr) => Ok(OwnedBuf {
                mr: std::mem::ManuallyDrop::new(mr),
                ptr,
                len,
            }),
            Err(e) => {
                // SAFETY: reconstitutes the box leaked just above; nothing else refers to it.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
                Err(e)
            }
        }
    }

    /// The MR.
    pub fn mr(&self) -> &Mr {
        &self.mr
    }

    /// Address of byte `off`.
    pub fn addr(&self, off: usize) -> u64 {
        self.ptr as u64 + off.min(self.len) as u64
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the buffer at `off` (before the send that reads it is posted).
    pub fn write(&self, off: usize, src: &[u8]) -> bool {
        if off.checked_add(src.len()).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: in bounds (checked); the slot is not in use by the NIC (slot discipline), and
        // only raw pointers are used, so no Rust reference aliases the NIC's writes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        true
    }

    /// Copies `len` bytes at `off` out of the buffer (after the receive into it completed).
    pub fn read(&self, off: usize, len: usize) -> Option<Vec<u8>> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return None;
        }
        let mut v = vec![0u8; len];
        // SAFETY: in bounds (checked); the slot's receive has completed (slot discipline).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) };
        Some(v)
    }
}

impl Drop for OwnedBuf {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; `mr` is not used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.mr) };
        // SAFETY: the allocation leaked in `new`, freed once, after its MR is gone (so the NIC
        // no longer writes into it).
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct Cq(pub(super) Arc<CqInner>);

pub(super) struct CqInner {
    pub(super) ctx: Context,
    pub(super) ptr: *mut IbvCq,
}

// SAFETY: polling a CQ is thread-safe per the verbs API (providers lock); owned, freed once.
unsafe impl Send for CqInner {}
// SAFETY: as for Send.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; every QP on it holds this Arc, so none is alive.
        let rc = unsafe { (self.ctx.0.verbs.fns.destroy_cq)(self.ptr) };
        log_destroy("ibv_destroy_cq", self.ctx.name(), rc);
    }
}

impl fmt::Debug for Cq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cq({})", self.0.ctx.name())
    }
}

impl Cq {
    /// Polls up to `wcs.len()` completions (no syscall: the provider reads the CQ ring in user
    /// space). Returns how many were written.
    pub fn poll(&self, wcs: &mut [IbvWc]) -> VResult<usize> {
        let n = c_int::try_from(wcs.len()).unwrap_or(c_int::MAX);
        // SAFETY: live CQ; its context's ops table is filled by the provider (as the inline
        // ibv_poll_cq reads it).
        let f = unsafe { (*(*self.0.ptr).context).ops.poll_cq };
        let Some(f) = f else {
            return Err(VerbsError {
                call: "ibv_poll_cq",
                reason: "provider has no poll_cq".into(),
            });
        };
        // SAFETY: `wcs` has room for `n` entries.
        let rc = unsafe { f(self.0.ptr, n, wcs.as_mut_ptr()) };
        if rc < 0 {
            return Err(rc_err("ibv_poll_cq", rc));
        }
        Ok(rc as usize)
    }
}
