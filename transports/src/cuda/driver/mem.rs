//! Memory the backend owns or maps: pinned host buffers, imports of peers' allocations
//! (legacy IPC and VMM), VMM and plain device allocations.

use super::*;

/// Page-locked host memory from `cuMemHostAlloc` (portable: usable by every context).
pub struct PinnedHost {
    pub(super) ctx: Arc<DeviceCtx>,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: owned host memory, like a Box<[u8]>.
unsafe impl Send for PinnedHost {}
// SAFETY: shared access only reads through `as_slice`.
unsafe impl Sync for PinnedHost {}

impl fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHost")
            .field("len", &self.len)
            .finish()
    }
}

impl PinnedHost {
    /// `len` bytes (at least 1) of pinned, zeroed host memory.
    pub fn new(ctx: &Arc<DeviceCtx>, len: usize) -> CuRes<PinnedHost> {
        let len = len.max(1);
        let _g = ctx.enter()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one pointer to `len` bytes of new host memory.
        ctx.check("cuMemHostAlloc", unsafe {
            (ctx.drv.api.mem_host_alloc)(&mut p, len, CU_MEMHOSTALLOC_PORTABLE)
        })?;
        // SAFETY: `p` is `len` writable bytes we own.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len) };
        Ok(PinnedHost {
            ctx: Arc::clone(ctx),
            ptr: p.cast(),
            len,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if let Some(rel) = self.ctx.releaser("pinned memory") {
            // SAFETY: frees the memory cuMemHostAlloc gave us; no borrow outlives `self`.
            rel.check("cuMemFreeHost", unsafe {
                (rel.api().mem_free_host)(self.ptr.cast())
            });
        }
    }
}

/// A peer's legacy allocation opened with `cuIpcOpenMemHandle`, closed on drop.
pub struct LegacyImport {
    pub(super) ctx: Arc<DeviceCtx>,
    pub(super) base: u64,
}

// SAFETY: a device address and the context it lives in; both usable from any thread.
unsafe impl Send for LegacyImport {}
// SAFETY: as above.
unsafe impl Sync for LegacyImport {}

impl fmt::Debug for LegacyImport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LegacyImport({:#x})", self.base)
    }
}

impl LegacyImport {
    /// Opens a peer's IPC handle in `ctx` (peer access enabled lazily).
    pub fn open(ctx: &Arc<DeviceCtx>, handle: &[u8; 64]) -> CuRes<LegacyImport> {
        let _g = ctx.enter()?;
        let mut base: CuDevicePtr = 0;
        let h = IpcMemHandle { reserved: *handle };
        // SAFETY: writes one device pointer; the handle is passed by value as cuda.h declares.
        ctx.check("cuIpcOpenMemHandle", unsafe {
            (ctx.drv.api.ipc_open_mem_handle)(&mut base, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        })?;
        Ok(LegacyImport {
            ctx: Arc::clone(ctx),
            base,
        })
    }

    /// Where the peer's allocation starts in our address space.
    pub fn base(&self) -> u64 {
        self.base
    }
}

impl Drop for LegacyImport {
    fn drop(&mut self) {
        if let Some(rel) = self.ctx.releaser("IPC mapping") {
            // SAFETY: closes the mapping opened in `open`; the import cache drops us only
            // when no transfer holds us.
            rel.check("cuIpcCloseMemHandle", unsafe {
                (rel.api().ipc_close_mem_handle)(self.base)
            });
        }
    }
}

/// Where a VMM mapping's physical memory comes from.
#[derive(Debug)]
pub enum VmmSource<'a> {
    /// A POSIX fd from `cuMemExportToShareableHandle` (received over SCM_RIGHTS).
    Fd(&'a OwnedFd),
    /// A 64-byte fabric handle.
    Fabric(&'a [u8; 64]),
}

/// A VMM allocation mapped into our address space: reserved range, mapped handle, access set.
/// Unmapped, released and unreserved on drop, in that order.
pub struct VmmImport {
    pub(super) ctx: Arc<DeviceCtx>,
    pub(super) handle: CuMemHandle,
    pub(super) va: u64,
    pub(super) size: usize,
    pub(super) mapped: bool,
}

// SAFETY: driver handles and a device range; usable from any thread.
unsafe impl Send for VmmImport {}
// SAFETY: as above.
unsafe impl Sync for VmmImport {}

impl fmt::Debug for VmmImport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmmImport")
            .field("va", &format_args!("{:#x}", self.va))
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl VmmImport {
    /// Imports a shareable handle of an allocation of `size` bytes and maps it, readable and
    /// writable by `ctx`'s device.
    pub fn import(ctx: &Arc<DeviceCtx>, src: VmmSource<'_>, size: u64) -> CuRes<VmmImport> {
        use std::os::fd::AsRawFd;
        let _g = ctx.enter()?;
        let mut handle: CuMemHandle = 0;
        let (os_handle, kind, op): (*mut c_void, u32, &'static str) = match src {
            // The fd is passed as the pointer value itself (cuda.h: "(void *)(uintptr_t) fd").
            VmmSource::Fd(fd) => (
                fd.as_raw_fd() as usize as *mut c_void,
                HANDLE_POSIX_FD,
                "cuMemImportFromShareableHandle(POSIX_FD)",
            ),
            VmmSource::Fabric(h) => (
                h.as_ptr() as *mut c_void,
                HANDLE_FABRIC,
                "cuMemImportFromShareableHandle(FABRIC)",
            ),
        };
        // SAFETY: writes one handle; the fd is open (we hold it) or the fabric handle is 64
        // readable bytes, as the handle type says; the driver does not keep the pointer.
        ctx.check(op, unsafe {
            (ctx.drv.api.mem_import)(&mut handle, os_handle, kind)
        })?;
        let mut me = VmmImport {
            ctx: Arc::clone(ctx),
            handle,
            va: 0,
            size: 0,
            mapped: false,
        };
        let size = usize::try_from(size).map_err(|_| CuError {
            op: "cuMemAddressReserve",
            code: crate::cuda::driver::CUDA_ERROR_NOT_SUPPORTED,
            name: "size does not fit usize".into(),
        })?;
        let mut va: CuDevicePtr = 0;
        // SAFETY: reserves a fresh range of `size` bytes; writes its start.
        ctx.check("cuMemAddressReserve", unsafe {
            (ctx.drv.api.mem_address_reserve)(&mut va, size, 0, 0, 0)
        })?;
        me.va = va;
        me.size = size;
        // SAFETY: maps the whole imported allocation at offset 0 into the range just reserved.
        ctx.check("cuMemMap", unsafe {
            (ctx.drv.api.mem_map)(va, size, 0, handle, 0)
        })?;
        me.mapped = true;
        let desc = ctx.access_desc();
        // SAFETY: the range is mapped; one access descriptor.
        ctx.check("cuMemSetAccess", unsafe {
            (ctx.drv.api.mem_set_access)(va, size, &desc, 1)
        })?;
        Ok(me)
    }

    /// Where the allocation starts in our address space.
    pub fn base(&self) -> u64 {
        self.va
    }
}

impl Drop for VmmImport {
    fn drop(&mut self) {
        if let Some(rel) = self.ctx.releaser("VMM mapping") {
            // SAFETY: the range was mapped (if `mapped`) and reserved (if its size is not 0)
            // in `import`, and the handle imported there; no transfer holds them any more.
            unsafe {
                release_vmm(
                    &rel,
                    self.va,
                    self.size,
                    self.mapped,
                    self.size > 0,
                    self.handle,
                )
            };
        }
    }
}

/// A VMM allocation we created: `cuMemCreate` + reserve + map + access (see
/// [`crate::cuda::VmmBuffer`]).
pub struct VmmAlloc {
    pub(super) ctx: Arc<DeviceCtx>,
    pub(super) handle: CuMemHandle,
    pub(super) va: u64,
    pub(super) size: usize,
    pub(super) reserved: bool,
    pub(super) mapped: bool,
}

// SAFETY: driver handles and a device range; usable from any thread.
unsafe impl Send for VmmAlloc {}
// SAFETY: as above.
unsafe impl Sync for VmmAlloc {}

impl fmt::Debug for VmmAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmmAlloc")
            .field("va", &format_args!("{:#x}", self.va))
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl VmmAlloc {
    /// Creates `size` bytes (already rounded to the granularity) exportable as `handle_types`.
    pub fn new(ctx: &Arc<DeviceCtx>, size: usize, handle_types: u32) -> CuRes<VmmAlloc> {
        Self::create(ctx, size, handle_types, 0)
    }

    /// As [`VmmAlloc::new`], mapped at the device address `at` exactly (a multiple of the
    /// granularity): `cuMemAddressReserve` takes it as a hint, and a range it cannot give there
    /// (taken, or outside what the driver manages) is an error naming it, never another place.
    pub fn new_at(
        ctx: &Arc<DeviceCtx>,
        size: usize,
        handle_types: u32,
        at: u64,
    ) -> CuRes<VmmAlloc> {
        if at == 0 {
            return Err(CuError {
                op: "cuMemAddressReserve",
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: "a fixed address of 0".into(),
            });
        }
        Self::create(ctx, size, handle_types, at)
    }

    fn create(ctx: &Arc<DeviceCtx>, size: usize, handle_types: u32, at: u64) -> CuRes<VmmAlloc> {
        let _g = ctx.enter()?;
        let prop = ctx.vmm_prop(handle_types);
        let mut handle: CuMemHandle = 0;
        // SAFETY: reads `prop`, writes one handle.
        ctx.check("cuMemCreate", unsafe {
            (ctx.drv.api.mem_create)(&mut handle, size, &prop, 0)
        })?;
        let mut me = VmmAlloc {
            ctx: Arc::clone(ctx),
            handle,
            va: 0,
            size,
            reserved: false,
            mapped: false,
        };
        let mut va: CuDevicePtr = 0;
        // SAFETY: reserves a fresh range (at `at` when the driver can, a hint only); writes its
        // start.
        ctx.check("cuMemAddressReserve", unsafe {
            (ctx.drv.api.mem_address_reserve)(&mut va, size, 0, at, 0)
        })?;
        me.va = va;
        me.reserved = true;
        if at != 0 && va != at {
            // Dropping `me` frees the range given elsewhere and releases the handle.
            return Err(CuError {
                op: "cuMemAddressReserve",
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: format!(
                    "the range {at:#x}+{size} is taken in this process (the driver offered {va:#x})"
                ),
            });
        }
        // SAFETY: maps our whole allocation at offset 0 into our fresh range.
        ctx.check("cuMemMap", unsafe {
            (ctx.drv.api.mem_map)(va, size, 0, handle, 0)
        })?;
        me.mapped = true;
        let desc = ctx.access_desc();
        // SAFETY: the range is mapped; one access descriptor.
        ctx.check("cuMemSetAccess", unsafe {
            (ctx.drv.api.mem_set_access)(va, size, &desc, 1)
        })?;
        Ok(me)
    }

    /// Device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.va
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The device context.
    pub fn ctx(&self) -> &Arc<DeviceCtx> {
        &self.ctx
    }
}

impl Drop for VmmAlloc {
    fn drop(&mut self) {
        if let Some(rel) = self.ctx.releaser("VMM allocation") {
            // SAFETY: our mapping, reserved range and handle from cuMemCreate; the owner
            // guarantees nothing uses them (deregistered).
            unsafe {
                release_vmm(
                    &rel,
                    self.va,
                    self.size,
                    self.mapped,
                    self.reserved,
                    self.handle,
                )
            };
        }
    }
}

/// Releases a VMM mapping in order: unmap, free the range, release the handle (the physical
/// memory goes when the last mapping and handle are gone, so an importer's mapping keeps it
/// alive).
///
/// # Safety
/// `va..va+size` is mapped (if `mapped`) and reserved (if `reserved`) by the caller, `handle`
/// is the caller's, and nothing uses any of them any more.
unsafe fn release_vmm(
    rel: &Releaser<'_>,
    va: u64,
    size: usize,
    mapped: bool,
    reserved: bool,
    handle: CuMemHandle,
) {
    let api = rel.api();
    if mapped {
        // SAFETY: per the contract, a mapping nothing uses.
        rel.check("cuMemUnmap", unsafe { (api.mem_unmap)(va, size) });
    }
    if reserved {
        // SAFETY: per the contract, a reserved range, now unmapped.
        rel.check("cuMemAddressFree", unsafe {
            (api.mem_address_free)(va, size)
        });
    }
    // SAFETY: per the contract, the caller's handle.
    rel.check("cuMemRelease", unsafe { (api.mem_release)(handle) });
}

/// A legacy allocation from `cuMemAlloc` (what `cudaMalloc` gives), freed on drop.
pub struct DeviceAlloc {
    pub(super) ctx: Arc<DeviceCtx>,
    pub(super) ptr: u64,
    pub(super) size: usize,
}

// SAFETY: a device address; usable from any thread.
unsafe impl Send for DeviceAlloc {}
// SAFETY: as above.
unsafe impl Sync for DeviceAlloc {}

impl fmt::Debug for DeviceAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceAlloc({:#x}, {})", self.ptr, self.size)
    }
}

impl DeviceAlloc {
    /// `size` bytes of device memory.
    pub fn new(ctx: &Arc<DeviceCtx>, size: usize) -> CuRes<DeviceAlloc> {
        let _g = ctx.enter()?;
        let mut ptr: CuDevicePtr = 0;
        // SAFETY: writes one device pointer.
        ctx.check("cuMemAlloc", unsafe {
            (ctx.drv.api.mem_alloc)(&mut ptr, size.max(1))
        })?;
        Ok(DeviceAlloc {
            ctx: Arc::clone(ctx),
            ptr,
            size,
        })
    }

    /// Device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if let Some(rel) = self.ctx.releaser("device memory") {
            // SAFETY: frees our allocation; the owner guarantees nothing uses it.
            rel.check("cuMemFree", unsafe { (rel.api().mem_free)(self.ptr) });
        }
    }
}

/// Synchronous copies between host and device, through a temporary stream: for tests and
/// tools that fill and check device memory.
///
/// # Safety
/// `dst..dst+len` must be writable device memory of `ctx`'s process, nothing else using it.
pub unsafe fn upload(ctx: &Arc<DeviceCtx>, dst: u64, src: &[u8]) -> CuRes<()> {
    let s = Stream::new(ctx)?;
    let _g = ctx.enter()?;
    // SAFETY: per the contract; `src` is borrowed until the synchronize below.
    unsafe { s.copy_htod(dst, src.as_ptr(), src.len())? };
    s.synchronize()
}

/// Copies device memory into `dst`.
///
/// # Safety
/// `src..src+dst.len()` must be readable device memory of this process.
pub unsafe fn download(ctx: &Arc<DeviceCtx>, dst: &mut [u8], src: u64) -> CuRes<()> {
    let s = Stream::new(ctx)?;
    let _g = ctx.enter()?;
    // SAFETY: per the contract; `dst` is borrowed until the synchronize below.
    unsafe { s.copy_dtoh(dst.as_mut_ptr(), src, dst.len())? };
    s.synchronize()
}
