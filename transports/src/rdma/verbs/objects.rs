//! The safe layer's resources: device context, protection domain, memory regions, owned
//! buffers, completion queues. Each is an [`Owned`] verbs object holding its parent.

use super::*;

pub(super) fn log_destroy(call: &'static str, what: &str, rc: c_int) {
    if rc != 0 {
        let e = rc_err(call, rc);
        metrics::counter!("nixl_rdma_teardown_errors_total").increment(1);
        tracing::warn!(what, error = %e, "rdma teardown failed");
    }
}

/// A kind of verbs object an [`Owned`] holds: what it is made from (its parent) and the call
/// that destroys it.
///
/// # Safety
/// Any thread may use and destroy a `Raw` of this kind (the verbs API is thread-safe), and
/// destroying it when its `Owned` drops is sound: whatever was made from it holds the `Owned`
/// (or its parent), so none of it is alive any more. Implementing the trait makes `Owned<Self>`
/// `Send` and `Sync`.
pub(super) unsafe trait Kind {
    /// The object's C struct.
    type Raw;
    /// What keeps the objects it was made from alive: dropped after it is destroyed.
    type Parent;
    /// The destroy call's name.
    const DESTROY: &'static str;
    /// The destroy call, and the device name for its log line.
    fn destroy(parent: &Self::Parent) -> (unsafe extern "C" fn(*mut Self::Raw) -> c_int, &str);
}

/// A verbs object this process made, destroyed once, on drop, before its parent is dropped; a
/// failing destroy is logged and counted (`nixl_rdma_teardown_errors_total`), never a panic.
pub(super) struct Owned<K: Kind> {
    pub(super) ptr: *mut K::Raw,
    pub(super) parent: K::Parent,
}

// SAFETY: per `Kind`'s contract (the parents are Send and Sync themselves).
unsafe impl<K: Kind> Send for Owned<K> where K::Parent: Send {}
// SAFETY: as above.
unsafe impl<K: Kind> Sync for Owned<K> where K::Parent: Sync {}

impl<K: Kind> Owned<K> {
    /// Takes `ptr`, made from `parent`.
    ///
    /// # Safety
    /// `ptr` is a live object of kind `K` made from `parent`'s object, destroyed by nobody else.
    pub(super) unsafe fn new(ptr: *mut K::Raw, parent: K::Parent) -> Owned<K> {
        Owned { ptr, parent }
    }
}

impl<K: Kind> Drop for Owned<K> {
    fn drop(&mut self) {
        let (destroy, name) = K::destroy(&self.parent);
        // SAFETY: made by its kind's create call (`new`'s contract), destroyed once, here, with
        // nothing made from it alive (`Kind`'s contract); the parent is dropped after.
        let rc = unsafe { destroy(self.ptr) };
        log_destroy(K::DESTROY, name, rc);
    }
}

/// What a context is opened from: the library and the device's name.
pub(super) struct Opened {
    pub(super) verbs: Arc<Verbs>,
    pub(super) name: String,
}

pub(super) struct DeviceKind;

// SAFETY: a verbs context may be used from any thread (libibverbs serialises what needs it);
// every child holds its `Arc`, so none is alive when it is closed.
unsafe impl Kind for DeviceKind {
    type Raw = IbvContext;
    type Parent = Opened;
    const DESTROY: &'static str = "ibv_close_device";
    fn destroy(o: &Opened) -> (CloseDevice, &str) {
        (o.verbs.fns.close_device, &o.name)
    }
}

/// An open device.
#[derive(Clone)]
pub(crate) struct Context(pub(super) Arc<Owned<DeviceKind>>);

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({})", self.name())
    }
}

impl Context {
    /// The device name.
    pub(crate) fn name(&self) -> &str {
        &self.0.parent.name
    }

    /// The library.
    pub(crate) fn verbs(&self) -> &Arc<Verbs> {
        &self.0.parent.verbs
    }

    /// `ibv_query_device`.
    pub(crate) fn query_device(&self) -> VResult<IbvDeviceAttr> {
        // SAFETY: all-zero is a valid IbvDeviceAttr (integers and a char array).
        let mut a: IbvDeviceAttr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, `a` is a complete ibv_device_attr (layout test).
        let rc = unsafe { (self.verbs().fns.query_device)(self.0.ptr, &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(a)
    }

    /// `ibv_query_port` (zeroed first, as the inline wrapper in verbs.h does).
    pub(crate) fn query_port(&self, port: u8) -> VResult<IbvPortAttr> {
        let mut a = IbvPortAttr::default();
        // SAFETY: live context; the exported symbol fills the compat prefix of `a`, which is a
        // complete ibv_port_attr.
        let rc = unsafe { (self.verbs().fns.query_port)(self.0.ptr, port, &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_port", rc));
        }
        Ok(a)
    }

    /// `ibv_query_gid`.
    pub(crate) fn query_gid(&self, port: u8, index: u8) -> VResult<[u8; 16]> {
        let mut g = IbvGid::default();
        // SAFETY: live context, `g` is a valid union ibv_gid.
        let rc = unsafe { (self.verbs().fns.query_gid)(self.0.ptr, port, index.into(), &mut g) };
        if rc != 0 {
            return Err(rc_err("ibv_query_gid", rc));
        }
        Ok(g.raw)
    }

    /// `ibv_alloc_pd`.
    pub(crate) fn alloc_pd(&self) -> VResult<Pd> {
        // SAFETY: live context.
        let p = unsafe { (self.verbs().fns.alloc_pd)(self.0.ptr) };
        if p.is_null() {
            return Err(errno_err("ibv_alloc_pd"));
        }
        // SAFETY: a PD just allocated on this context.
        Ok(Pd(Arc::new(unsafe { Owned::new(p, self.clone()) })))
    }

    /// `ibv_create_cq` with `depth` entries and no completion channel (the backend polls).
    pub(crate) fn create_cq(&self, depth: u32) -> VResult<Cq> {
        let depth = c_int::try_from(depth).unwrap_or(c_int::MAX);
        // SAFETY: live context; no channel, no user context, vector 0.
        let p = unsafe {
            (self.verbs().fns.create_cq)(
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
        // SAFETY: a CQ just created on this context.
        Ok(Cq(Arc::new(unsafe { Owned::new(p, self.clone()) })))
    }
}

pub(super) struct PdKind;

// SAFETY: a PD is used from any thread per the verbs API; MRs and QPs hold its `Arc`, so none
// is alive when it is freed.
unsafe impl Kind for PdKind {
    type Raw = IbvPd;
    type Parent = Context;
    const DESTROY: &'static str = "ibv_dealloc_pd";
    fn destroy(ctx: &Context) -> (DeallocPd, &str) {
        (ctx.verbs().fns.dealloc_pd, ctx.name())
    }
}

/// A protection domain.
#[derive(Clone)]
pub(crate) struct Pd(pub(super) Arc<Owned<PdKind>>);

impl fmt::Debug for Pd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pd({})", self.context().name())
    }
}

impl Pd {
    /// The device context.
    pub(crate) fn context(&self) -> &Context {
        &self.0.parent
    }

    /// `ibv_reg_mr` of `[addr, addr + len)`.
    ///
    /// # Safety
    /// The memory must stay allocated until the returned [`Mr`] is dropped: the NIC reads and
    /// writes it (with `access`) for peers and for work requests at any time until then.
    pub(crate) unsafe fn reg_mr(&self, addr: u64, len: u64, access: c_int) -> VResult<Mr> {
        let len = usize::try_from(len).map_err(|_| VerbsError {
            call: "ibv_reg_mr",
            reason: format!("length {len} does not fit usize"),
        })?;
        // SAFETY: live PD; the caller keeps the memory valid while the MR lives.
        let p = unsafe {
            (self.context().verbs().fns.reg_mr)(self.0.ptr, addr as *mut c_void, len, access)
        };
        if p.is_null() {
            return Err(errno_err("ibv_reg_mr"));
        }
        Ok(Mr::wrap(self.clone(), p))
    }

    /// `ibv_reg_dmabuf_mr` of `len` bytes at `offset` of the dmabuf `fd`, at address `iova`.
    /// The kernel holds the dmabuf (and so the device memory) until the MR is deregistered, so
    /// no contract is left to the caller.
    pub(crate) fn reg_dmabuf_mr(
        &self,
        offset: u64,
        len: u64,
        iova: u64,
        fd: i32,
        access: c_int,
    ) -> VResult<Mr> {
        let f = self.context().verbs().fns.reg_dmabuf_mr.ok_or(VerbsError {
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
    pub(crate) fn create_rc_qp(&self, cq: &Cq, cap: IbvQpCap) -> VResult<Qp> {
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
        let p = unsafe { (self.context().verbs().fns.create_qp)(self.0.ptr, &mut attr) };
        if p.is_null() {
            return Err(errno_err("ibv_create_qp"));
        }
        Ok(Qp {
            // SAFETY: a QP just created on this PD and `cq`.
            obj: unsafe {
                Owned::new(
                    p,
                    QpParents {
                        _cq: cq.clone(),
                        pd: self.clone(),
                    },
                )
            },
        })
    }
}

/// A memory region.
pub(crate) struct Mr {
    // Deregistered when dropped.
    pub(super) _reg: Owned<MrKind>,
    pub(super) lkey: u32,
    pub(super) rkey: u32,
    pub(super) addr: u64,
    pub(super) len: u64,
}

pub(super) struct MrKind;

// SAFETY: an MR is plain data behind a pointer, deregistered once; verbs allow any thread, and
// there is no interior mutation through `&Mr`.
unsafe impl Kind for MrKind {
    type Raw = IbvMr;
    type Parent = Pd;
    const DESTROY: &'static str = "ibv_dereg_mr";
    fn destroy(pd: &Pd) -> (DeregMr, &str) {
        (pd.context().verbs().fns.dereg_mr, pd.context().name())
    }
}

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
            // SAFETY: registered on `pd` by ibv_reg_mr/ibv_reg_dmabuf_mr just now.
            _reg: unsafe { Owned::new(p, pd) },
            lkey,
            rkey,
            addr,
            len,
        }
    }

    /// The local key.
    pub(crate) fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The remote key.
    pub(crate) fn rkey(&self) -> u32 {
        self.rkey
    }
}

/// A buffer owned by the backend and registered on one PD (notification slots). The NIC
/// writes into it for posted receives; the backend reads a slot only after its receive has
/// completed and before it is posted again.
pub(crate) struct OwnedBuf {
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
    pub(crate) fn new(pd: &Pd, len: usize, extra: c_int) -> VResult<OwnedBuf> {
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
    pub(crate) fn mr(&self) -> &Mr {
        &self.mr
    }

    /// Address of byte `off`.
    pub(crate) fn addr(&self, off: usize) -> u64 {
        self.ptr as u64 + off.min(self.len) as u64
    }

    /// Length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `src` into the buffer at `off` (before the send that reads it is posted).
    pub(crate) fn write(&self, off: usize, src: &[u8]) -> bool {
        if off.checked_add(src.len()).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: in bounds (checked); the slot is not in use by the NIC (slot discipline), and
        // only raw pointers are used, so no Rust reference aliases the NIC's writes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        true
    }

    /// Copies `len` bytes at `off` out of the buffer (after the receive into it completed).
    pub(crate) fn read(&self, off: usize, len: usize) -> Option<Vec<u8>> {
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
pub(crate) struct Cq(pub(super) Arc<Owned<CqKind>>);

pub(super) struct CqKind;

// SAFETY: polling a CQ is thread-safe per the verbs API (providers lock); every QP on it holds
// its `Arc`, so none is alive when it is destroyed.
unsafe impl Kind for CqKind {
    type Raw = IbvCq;
    type Parent = Context;
    const DESTROY: &'static str = "ibv_destroy_cq";
    fn destroy(ctx: &Context) -> (DestroyCq, &str) {
        (ctx.verbs().fns.destroy_cq, ctx.name())
    }
}

impl fmt::Debug for Cq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cq({})", self.0.parent.name())
    }
}

impl Cq {
    /// Polls up to `wcs.len()` completions (no syscall: the provider reads the CQ ring in user
    /// space). Returns how many were written.
    pub(crate) fn poll(&self, wcs: &mut [IbvWc]) -> VResult<usize> {
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
