//! Memory the backend owns or maps: pinned host buffers, imports of peers' allocations
//! (legacy IPC and VMM), VMM and plain device allocations.

use super::*;

/// Page-locked host memory from `cuMemHostAlloc` (portable: usable by every context).
#[derive(Debug)]
pub(crate) struct PinnedHost(Owned<HostMem>);

/// Pinned host memory: where it starts and its length.
#[derive(Debug)]
pub(super) struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

pub(super) struct HostMem;

// SAFETY: owned host memory, like a Box<[u8]>; shared access only reads through `as_slice`.
unsafe impl Kind for HostMem {
    type Raw = HostBuf;
    const WHAT: &'static str = "pinned memory";

    unsafe fn release(rel: &Releaser<'_>, raw: &HostBuf) {
        // SAFETY: frees the memory cuMemHostAlloc gave us; no borrow outlives its owner.
        rel.check("cuMemFreeHost", unsafe {
            (rel.api().mem_free_host)(raw.ptr.cast())
        });
    }
}

impl PinnedHost {
    /// `len` bytes (at least 1) of pinned, zeroed host memory.
    pub(crate) fn new(ctx: &Arc<DeviceCtx>, len: usize) -> CuRes<PinnedHost> {
        let len = len.max(1);
        let _g = ctx.enter()?;
        let init = HostBuf {
            ptr: std::ptr::null_mut(),
            len,
        };
        // SAFETY: writes one pointer to `len` bytes of new host memory, ours to free.
        let mem = unsafe {
            Owned::<HostMem>::make(ctx, "cuMemHostAlloc", init, |b| {
                let mut p: *mut c_void = std::ptr::null_mut();
                let r = (ctx.drv.api.mem_host_alloc)(&mut p, len, CU_MEMHOSTALLOC_PORTABLE);
                b.ptr = p.cast();
                r
            })
        }?;
        // SAFETY: `ptr` is `len` writable bytes we own.
        unsafe { std::ptr::write_bytes(mem.raw.ptr, 0, len) };
        Ok(PinnedHost(mem))
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        let b = &self.0.raw;
        // SAFETY: `len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(b.ptr, b.len) }
    }
}

/// A peer's legacy allocation opened with `cuIpcOpenMemHandle`, closed on drop.
#[derive(Debug)]
pub(crate) struct LegacyImport(Owned<IpcMapping>);

pub(super) struct IpcMapping;

// SAFETY: a device address of a mapping in a context; usable from any thread.
unsafe impl Kind for IpcMapping {
    type Raw = CuDevicePtr;
    const WHAT: &'static str = "IPC mapping";

    unsafe fn release(rel: &Releaser<'_>, base: &CuDevicePtr) {
        // SAFETY: closes the mapping opened in `open`; the import cache drops us only when no
        // transfer holds us.
        rel.check("cuIpcCloseMemHandle", unsafe {
            (rel.api().ipc_close_mem_handle)(*base)
        });
    }
}

impl LegacyImport {
    /// Opens a peer's IPC handle in `ctx` (peer access enabled lazily).
    pub(crate) fn open(ctx: &Arc<DeviceCtx>, handle: &[u8; 64]) -> CuRes<LegacyImport> {
        let _g = ctx.enter()?;
        let h = IpcMemHandle { reserved: *handle };
        // SAFETY: writes one device pointer, a mapping ours to close; the handle is passed by
        // value as cuda.h declares.
        let m = unsafe {
            Owned::make(ctx, "cuIpcOpenMemHandle", 0, |base| {
                (ctx.drv.api.ipc_open_mem_handle)(base, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            })
        }?;
        Ok(LegacyImport(m))
    }

    /// Where the peer's allocation starts in our address space.
    pub(crate) fn base(&self) -> u64 {
        self.0.raw
    }
}

/// Where a VMM mapping's physical memory comes from.
#[derive(Debug)]
pub(crate) enum VmmSource<'a> {
    /// A POSIX fd from `cuMemExportToShareableHandle` (received over SCM_RIGHTS).
    Fd(&'a OwnedFd),
    /// A 64-byte fabric handle.
    Fabric(&'a [u8; 64]),
}

/// A VMM mapping's parts, each set once the call that made it succeeded: released by
/// [`release_vmm`] in order (unmap, free the range, release the handle).
#[derive(Debug)]
pub(super) struct VmmParts {
    handle: CuMemHandle,
    va: u64,
    size: usize,
    reserved: bool,
    mapped: bool,
}

impl VmmParts {
    fn new(size: usize) -> VmmParts {
        VmmParts {
            handle: 0,
            va: 0,
            size,
            reserved: false,
            mapped: false,
        }
    }

    /// Reserves a range of `size` bytes (at `at` when the driver can: a hint only).
    fn reserve(&mut self, ctx: &DeviceCtx, at: u64) -> CuRes<()> {
        let mut va: CuDevicePtr = 0;
        // SAFETY: reserves a fresh range of `size` bytes; writes its start.
        ctx.check("cuMemAddressReserve", unsafe {
            (ctx.drv.api.mem_address_reserve)(&mut va, self.size, 0, at, 0)
        })?;
        self.va = va;
        self.reserved = true;
        Ok(())
    }

    /// Maps the whole allocation at offset 0 into the reserved range, readable and writable
    /// by `ctx`'s device.
    fn map(&mut self, ctx: &DeviceCtx) -> CuRes<()> {
        // SAFETY: maps our whole allocation at offset 0 into the range just reserved.
        ctx.check("cuMemMap", unsafe {
            (ctx.drv.api.mem_map)(self.va, self.size, 0, self.handle, 0)
        })?;
        self.mapped = true;
        let desc = ctx.access_desc();
        // SAFETY: the range is mapped; one access descriptor.
        ctx.check("cuMemSetAccess", unsafe {
            (ctx.drv.api.mem_set_access)(self.va, self.size, &desc, 1)
        })
    }
}

/// A peer's VMM allocation mapped into our address space: reserved range, mapped handle,
/// access set. Unmapped, released and unreserved on drop, in that order.
#[derive(Debug)]
pub(crate) struct VmmImport(Owned<VmmMapping>);

pub(super) struct VmmMapping;

// SAFETY: driver handles and a device range; usable from any thread.
unsafe impl Kind for VmmMapping {
    type Raw = VmmParts;
    const WHAT: &'static str = "VMM mapping";

    unsafe fn release(rel: &Releaser<'_>, parts: &VmmParts) {
        // SAFETY: the range was mapped (if `mapped`) and reserved (if `reserved`) in `import`,
        // and the handle imported there; no transfer holds them any more.
        unsafe { release_vmm(rel, parts) };
    }
}

impl VmmImport {
    /// Imports a shareable handle of an allocation of `size` bytes and maps it, readable and
    /// writable by `ctx`'s device.
    pub(crate) fn import(ctx: &Arc<DeviceCtx>, src: VmmSource<'_>, size: u64) -> CuRes<VmmImport> {
        use std::os::fd::AsRawFd;
        let _g = ctx.enter()?;
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
        // SAFETY: writes one handle, ours to release; the fd is open (we hold it) or the
        // fabric handle is 64 readable bytes, as the handle type says; the driver does not keep
        // the pointer.
        let mut me = unsafe {
            Owned::<VmmMapping>::make(ctx, op, VmmParts::new(0), |p| {
                (ctx.drv.api.mem_import)(&mut p.handle, os_handle, kind)
            })
        }?;
        let size = usize::try_from(size).map_err(|_| CuError {
            op: "cuMemAddressReserve",
            code: crate::cuda::driver::CUDA_ERROR_NOT_SUPPORTED,
            name: "size does not fit usize".into(),
        })?;
        me.raw.size = size;
        me.raw.reserve(ctx, 0)?;
        me.raw.map(ctx)?;
        Ok(VmmImport(me))
    }

    /// Where the allocation starts in our address space.
    pub(crate) fn base(&self) -> u64 {
        self.0.raw.va
    }
}

/// A VMM allocation we created: `cuMemCreate` + reserve + map + access (see
/// [`crate::cuda::VmmBuffer`]).
#[derive(Debug)]
pub struct VmmAlloc(Owned<VmmAllocation>);

pub(super) struct VmmAllocation;

// SAFETY: driver handles and a device range; usable from any thread.
unsafe impl Kind for VmmAllocation {
    type Raw = VmmParts;
    const WHAT: &'static str = "VMM allocation";

    unsafe fn release(rel: &Releaser<'_>, parts: &VmmParts) {
        // SAFETY: our mapping, reserved range and handle from cuMemCreate; the owner
        // guarantees nothing uses them (deregistered).
        unsafe { release_vmm(rel, parts) };
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
        // SAFETY: reads `prop`, writes one handle, ours to release.
        let mut me = unsafe {
            Owned::<VmmAllocation>::make(ctx, "cuMemCreate", VmmParts::new(size), |p| {
                (ctx.drv.api.mem_create)(&mut p.handle, size, &prop, 0)
            })
        }?;
        me.raw.reserve(ctx, at)?;
        let va = me.raw.va;
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
        me.raw.map(ctx)?;
        Ok(VmmAlloc(me))
    }

    /// Device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.0.raw.va
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.0.raw.size
    }

    /// The device context.
    pub fn ctx(&self) -> &Arc<DeviceCtx> {
        self.0.ctx()
    }
}

/// Releases a VMM mapping in order: unmap, free the range, release the handle (the physical
/// memory goes when the last mapping and handle are gone, so an importer's mapping keeps it
/// alive).
///
/// # Safety
/// `va..va+size` is mapped (if `mapped`) and reserved (if `reserved`) by the caller, `handle`
/// is the caller's, and nothing uses any of them any more.
unsafe fn release_vmm(rel: &Releaser<'_>, p: &VmmParts) {
    let api = rel.api();
    if p.mapped {
        // SAFETY: per the contract, a mapping nothing uses.
        rel.check("cuMemUnmap", unsafe { (api.mem_unmap)(p.va, p.size) });
    }
    if p.reserved {
        // SAFETY: per the contract, a reserved range, now unmapped.
        rel.check("cuMemAddressFree", unsafe {
            (api.mem_address_free)(p.va, p.size)
        });
    }
    // SAFETY: per the contract, the caller's handle.
    rel.check("cuMemRelease", unsafe { (api.mem_release)(p.handle) });
}

/// A legacy allocation from `cuMemAlloc` (what `cudaMalloc` gives), freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceAlloc {
    mem: Owned<DeviceMem>,
    size: usize,
}

pub(super) struct DeviceMem;

// SAFETY: a device address; usable from any thread.
unsafe impl Kind for DeviceMem {
    type Raw = CuDevicePtr;
    const WHAT: &'static str = "device memory";

    unsafe fn release(rel: &Releaser<'_>, ptr: &CuDevicePtr) {
        // SAFETY: frees our allocation; the owner guarantees nothing uses it.
        rel.check("cuMemFree", unsafe { (rel.api().mem_free)(*ptr) });
    }
}

impl DeviceAlloc {
    /// `size` bytes of device memory.
    pub(crate) fn new(ctx: &Arc<DeviceCtx>, size: usize) -> CuRes<DeviceAlloc> {
        let _g = ctx.enter()?;
        // SAFETY: writes one device pointer, an allocation ours to free.
        let mem = unsafe {
            Owned::make(ctx, "cuMemAlloc", 0, |ptr| {
                (ctx.drv.api.mem_alloc)(ptr, size.max(1))
            })
        }?;
        Ok(DeviceAlloc { mem, size })
    }

    /// Device address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.mem.raw
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
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
