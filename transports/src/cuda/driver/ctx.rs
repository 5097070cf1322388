//! A device's retained primary context and what is asked of it: attributes, pointer queries,
//! exports, dmabuf.

use super::*;

/// A device's retained primary context (shared with the CUDA runtime and PyTorch), released
/// when the last holder drops it.
pub struct DeviceCtx {
    pub(super) drv: &'static Driver,
    pub(super) ordinal: i32,
    pub(super) dev: CuDevice,
    pub(super) ctx: CuContext,
    pub(super) uuid: [u8; 16],
    pub(super) vmm: bool,
    pub(super) posix_fd: bool,
    pub(super) fabric: bool,
    /// VMM allocations may be made GPUDirect RDMA capable (attribute 110).
    pub(super) gdr_vmm: bool,
}

// SAFETY: a CUcontext is a driver handle usable from any thread (the driver API is thread-safe;
// every use pushes it current first). The struct is immutable after creation.
unsafe impl Send for DeviceCtx {}
// SAFETY: as above.
unsafe impl Sync for DeviceCtx {}

impl fmt::Debug for DeviceCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCtx")
            .field("ordinal", &self.ordinal)
            .field("vmm", &self.vmm)
            .field("posix_fd", &self.posix_fd)
            .field("fabric", &self.fabric)
            .finish_non_exhaustive()
    }
}

/// Makes a context current on this thread until dropped (then restores the previous one).
#[derive(Debug)]
pub struct CtxGuard<'a> {
    pub(super) ctx: &'a DeviceCtx,
}

impl Drop for CtxGuard<'_> {
    fn drop(&mut self) {
        let mut old: CuContext = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `DeviceCtx::enter` on this thread.
        let r = unsafe { (self.ctx.drv.api.ctx_pop)(&mut old) };
        if let Err(e) = self.ctx.drv.check("cuCtxPopCurrent", r) {
            tracing::warn!(error = %e, "cuda: popping a context failed");
        }
    }
}

/// The teardown of a handle made in a context, for its `Drop`: the context is current while it
/// lives, and each release call's failure is logged (naming the call and what it released),
/// never raised, so no `Drop` panics and an agent serving peers does not abort.
pub(super) struct Releaser<'a> {
    ctx: &'a DeviceCtx,
    what: &'static str,
    _current: CtxGuard<'a>,
}

impl Releaser<'_> {
    /// The driver's entry points.
    pub(super) fn api(&self) -> &Api {
        &self.ctx.drv.api
    }

    /// The driver's optional entry points.
    pub(super) fn opt(&self) -> &OptionalApi {
        &self.ctx.drv.opt
    }

    /// Logs a failed release call.
    pub(super) fn check(&self, op: &'static str, r: CuResult) {
        if let Err(e) = self.ctx.check(op, r) {
            tracing::warn!(error = %e, what = self.what, "cuda: releasing failed");
        }
    }
}

impl DeviceCtx {
    /// Makes this context current to release `what` (a `Drop`); `None`, logged as a leak,
    /// when it cannot be made current.
    pub(super) fn releaser(&self, what: &'static str) -> Option<Releaser<'_>> {
        match self.enter() {
            Ok(g) => Some(Releaser {
                ctx: self,
                what,
                _current: g,
            }),
            Err(e) => {
                tracing::warn!(error = %e, what, "cuda: leaked (context not current)");
                None
            }
        }
    }

    /// Retains the primary context of device `ordinal` and reads its properties.
    pub(crate) fn open(drv: &'static Driver, ordinal: i32) -> CuRes<Arc<DeviceCtx>> {
        if ordinal < 0 || ordinal >= drv.facts.devices {
            return Err(CuError {
                op: "cuDeviceGet",
                code: CUDA_ERROR_NO_DEVICE,
                name: format!(
                    "no device {ordinal} (this host has {} devices)",
                    drv.facts.devices
                ),
            });
        }
        let mut dev: CuDevice = 0;
        // SAFETY: writes one CUdevice; the ordinal is in range.
        drv.check("cuDeviceGet", unsafe {
            (drv.api.device_get)(&mut dev, ordinal)
        })?;
        let mut uuid = CuUuid { bytes: [0; 16] };
        // SAFETY: writes 16 bytes into `uuid`.
        drv.check("cuDeviceGetUuid", unsafe {
            (drv.api.device_get_uuid)(&mut uuid, dev)
        })?;
        if drv.attribute(dev, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? == 0 {
            return Err(CuError {
                op: "cuDeviceGetAttribute",
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: format!("device {ordinal} lacks unified addressing"),
            });
        }
        let vmm = drv.attribute(dev, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)? != 0;
        let posix_fd = drv.attribute(
            dev,
            CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
        )? != 0;
        // An older driver may not know attribute 128: treat an error as "no fabric".
        let fabric = drv
            .attribute(dev, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED)
            .unwrap_or(0)
            != 0;
        // Attribute 110 is CUDA 11.x+; an error reads as "not supported".
        let gdr_vmm = drv
            .attribute(
                dev,
                CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED,
            )
            .unwrap_or(0)
            != 0;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: writes one CUcontext.
        drv.check("cuDevicePrimaryCtxRetain", unsafe {
            (drv.api.primary_ctx_retain)(&mut ctx, dev)
        })?;
        Ok(Arc::new(DeviceCtx {
            drv,
            ordinal,
            dev,
            ctx,
            uuid: uuid.bytes,
            vmm,
            posix_fd,
            fabric,
            gdr_vmm,
        }))
    }

    /// Makes this context current on the calling thread until the guard drops.
    pub fn enter(&self) -> CuRes<CtxGuard<'_>> {
        // SAFETY: pushes a live context (retained for our lifetime) on this thread's stack.
        self.drv.check("cuCtxPushCurrent", unsafe {
            (self.drv.api.ctx_push)(self.ctx)
        })?;
        Ok(CtxGuard { ctx: self })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// The device UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Whether the device supports the VMM API.
    pub fn vmm_supported(&self) -> bool {
        self.vmm
    }

    /// Whether VMM allocations can be exported as POSIX fds.
    pub fn posix_fd_supported(&self) -> bool {
        self.posix_fd
    }

    /// Whether VMM allocations can be exported as fabric handles (multi-node NVLink).
    pub fn fabric_supported(&self) -> bool {
        self.fabric
    }

    /// Whether VMM allocations of this device can be made GPUDirect RDMA capable (our own
    /// [`VmmAlloc`]s are, where it is).
    pub fn gdr_vmm_supported(&self) -> bool {
        self.gdr_vmm
    }

    /// Makes the GPUDirect RDMA writes that NICs have completed into this device's memory
    /// visible to work the device runs next (`cuFlushGPUDirectRDMAWrites`, to the owner): to be
    /// called before telling the application that an RDMA WRITE into its VRAM has landed. A
    /// driver without the call has nothing to flush with (`Ok`).
    pub(crate) fn flush_gdr_writes(&self) -> CuRes<()> {
        let Some(f) = self.drv.opt.flush_gdr_writes else {
            return Ok(());
        };
        let _g = self.enter()?;
        // SAFETY: two enum values; the context is current.
        self.check("cuFlushGPUDirectRDMAWrites", unsafe {
            f(FLUSH_TARGET_CURRENT_CTX, FLUSH_TO_OWNER)
        })
    }

    /// Whether NICs may DMA to the memory at `addr` (`CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_
    /// CAPABLE`: false for VMM allocations made without `gpuDirectRDMACapable`). Call with this
    /// context current.
    pub fn gdr_capable(&self, addr: u64) -> CuRes<bool> {
        self.pointer_attr(
            CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE,
            addr,
            "cuPointerGetAttribute(IS_GPU_DIRECT_RDMA_CAPABLE)",
        )
        .map(|v| v & 0xff != 0)
    }

    /// The driver.
    pub(crate) fn driver(&self) -> &'static Driver {
        self.drv
    }

    pub(super) fn check(&self, op: &'static str, r: CuResult) -> CuRes<()> {
        self.drv.check(op, r)
    }

    fn pointer_attr(&self, attr: c_uint, ptr: u64, op: &'static str) -> CuRes<u64> {
        // Every attribute we read is at most 8 bytes (int, unsigned, bool, size_t, pointer,
        // u64 bit mask); a zeroed u64 holds any of them, little-endian.
        let mut v: u64 = 0;
        // SAFETY: the driver writes at most 8 bytes into `v` for these attributes.
        let r =
            unsafe { (self.drv.api.pointer_get_attribute)((&mut v as *mut u64).cast(), attr, ptr) };
        self.check(op, r)?;
        Ok(v)
    }

    /// What the driver knows about the allocation holding `addr`: must be device memory of this
    /// device. Call with this context current.
    pub(crate) fn query_allocation(&self, addr: u64) -> CuRes<RawAlloc> {
        let mut handle: CuMemHandle = 0;
        // SAFETY: writes one handle; `addr` is only looked up, not dereferenced.
        let r = unsafe {
            (self.drv.api.mem_retain_allocation_handle)(&mut handle, addr as usize as *mut c_void)
        };
        if r == CUDA_SUCCESS {
            // A VMM mapping: its properties say where the memory lives and how it may be shared.
            let mut prop = MemAllocationProp::zeroed();
            // SAFETY: writes one CUmemAllocationProp (declared with the driver's layout).
            let pr = unsafe { (self.drv.api.mem_get_allocation_properties)(&mut prop, handle) };
            // SAFETY: releases the reference cuMemRetainAllocationHandle took.
            let rr = unsafe { (self.drv.api.mem_release)(handle) };
            self.check("cuMemGetAllocationPropertiesFromHandle", pr)?;
            self.check("cuMemRelease", rr)?;
            let (base, size) = match (
                self.pointer_attr(
                    CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR,
                    addr,
                    "cuPointerGetAttribute(MAPPING_BASE_ADDR)",
                ),
                self.pointer_attr(
                    CU_POINTER_ATTRIBUTE_MAPPING_SIZE,
                    addr,
                    "cuPointerGetAttribute(MAPPING_SIZE)",
                ),
            ) {
                (Ok(b), Ok(s)) if s > 0 => (b, s),
                _ => self.address_range(addr)?,
            };
            let on_device = prop.location.type_ == CU_MEM_LOCATION_TYPE_DEVICE;
            return Ok(RawAlloc {
                device_memory: on_device,
                ordinal: if on_device { prop.location.id } else { -1 },
                base,
                size,
                vmm_handle_types: Some(prop.requested_handle_types),
                legacy_ipc: false,
            });
        }
        let mem_type = self.pointer_attr(
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
            "cuPointerGetAttribute(MEMORY_TYPE)",
        )?;
        let managed = self
            .pointer_attr(
                CU_POINTER_ATTRIBUTE_IS_MANAGED,
                addr,
                "cuPointerGetAttribute(IS_MANAGED)",
            )
            .is_ok_and(|v| v & 0xff != 0);
        let ordinal = self.pointer_attr(
            CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
            "cuPointerGetAttribute(DEVICE_ORDINAL)",
        )? as u32 as i32;
        let (base, size) = self.address_range(addr)?;
        let legacy_ipc = self
            .pointer_attr(
                CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                addr,
                "cuPointerGetAttribute(IS_LEGACY_CUDA_IPC_CAPABLE)",
            )
            .map(|v| v & 0xff != 0)
            .unwrap_or(true);
        Ok(RawAlloc {
            device_memory: mem_type == CU_MEMORYTYPE_DEVICE && !managed,
            ordinal,
            base,
            size,
            vmm_handle_types: None,
            legacy_ipc,
        })
    }

    fn address_range(&self, addr: u64) -> CuRes<(u64, u64)> {
        let mut base: CuDevicePtr = 0;
        let mut size: usize = 0;
        // SAFETY: writes the base and size of the allocation holding `addr`.
        let r = unsafe { (self.drv.api.mem_get_address_range)(&mut base, &mut size, addr) };
        self.check("cuMemGetAddressRange", r)?;
        Ok((base, size as u64))
    }

    /// The legacy IPC handle of the allocation starting at `base` (this context current).
    pub(crate) fn ipc_handle(&self, base: u64) -> CuRes<[u8; 64]> {
        let mut h = IpcMemHandle { reserved: [0; 64] };
        // SAFETY: writes 64 bytes into `h`.
        self.check("cuIpcGetMemHandle", unsafe {
            (self.drv.api.ipc_get_mem_handle)(&mut h, base)
        })?;
        Ok(h.reserved)
    }

    /// Exports the VMM allocation mapped at `addr` as a POSIX fd (this context current).
    pub(crate) fn export_fd(&self, addr: u64) -> CuRes<OwnedFd> {
        self.with_handle(addr, |h| {
            let mut fd: c_int = -1;
            // SAFETY: for POSIX_FD the driver writes one int (a new fd we then own).
            let r = unsafe {
                (self.drv.api.mem_export)((&mut fd as *mut c_int).cast(), h, HANDLE_POSIX_FD, 0)
            };
            self.check("cuMemExportToShareableHandle(POSIX_FD)", r)?;
            if fd < 0 {
                return Err(CuError {
                    op: "cuMemExportToShareableHandle(POSIX_FD)",
                    code: CUDA_ERROR_NOT_SUPPORTED,
                    name: format!("returned fd {fd}"),
                });
            }
            // SAFETY: the driver handed us a fresh descriptor.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        })
    }

    /// Exports the VMM allocation mapped at `addr` as a fabric handle (this context current).
    pub(crate) fn export_fabric(&self, addr: u64) -> CuRes<[u8; 64]> {
        self.with_handle(addr, |h| {
            let mut fh = [0u8; 64];
            // SAFETY: for FABRIC the driver writes one 64-byte CUmemFabricHandle.
            let r =
                unsafe { (self.drv.api.mem_export)(fh.as_mut_ptr().cast(), h, HANDLE_FABRIC, 0) };
            self.check("cuMemExportToShareableHandle(FABRIC)", r)?;
            Ok(fh)
        })
    }

    fn with_handle<T>(&self, addr: u64, f: impl FnOnce(CuMemHandle) -> CuRes<T>) -> CuRes<T> {
        let mut h: CuMemHandle = 0;
        // SAFETY: writes one handle; the address is only looked up.
        self.check("cuMemRetainAllocationHandle", unsafe {
            (self.drv.api.mem_retain_allocation_handle)(&mut h, addr as usize as *mut c_void)
        })?;
        let out = f(h);
        // SAFETY: releases the reference taken above.
        let r = unsafe { (self.drv.api.mem_release)(h) };
        if let Err(e) = self.check("cuMemRelease", r) {
            tracing::warn!(error = %e, "cuda: releasing a retained handle failed");
        }
        out
    }

    /// Allocation granularity for VMM allocations on this device with `handle_types`.
    pub fn granularity(&self, handle_types: u32) -> CuRes<usize> {
        let prop = self.vmm_prop(handle_types);
        let mut g = 0usize;
        // SAFETY: reads `prop`, writes one size_t.
        self.check("cuMemGetAllocationGranularity", unsafe {
            (self.drv.api.mem_get_granularity)(&mut g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        })?;
        Ok(g.max(1))
    }

    pub(super) fn vmm_prop(&self, handle_types: u32) -> MemAllocationProp {
        let mut prop = MemAllocationProp::zeroed();
        prop.type_ = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requested_handle_types = handle_types;
        prop.location = MemLocation {
            type_: CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ordinal,
        };
        // NICs can reach it by dmabuf or peermem only when marked so at creation.
        prop.gpu_direct_rdma_capable = u8::from(self.gdr_vmm);
        prop
    }

    /// Grants this device read-write access to the VMM mapping `[va, va + size)` (a whole
    /// mapping another device's allocation is mapped at, in this process): needed before a
    /// stream of this device copies to or from another GPU's VMM memory in the same process,
    /// which by default only its own device may touch. Peer access must be possible (NVLink or
    /// PCIe P2P); the driver refuses otherwise.
    pub(crate) fn grant_access(&self, va: u64, size: usize) -> CuRes<()> {
        let desc = self.access_desc();
        let _g = self.enter()?;
        // SAFETY: changes access flags of a mapped range of this process; one descriptor.
        self.check("cuMemSetAccess", unsafe {
            (self.drv.api.mem_set_access)(va, size, &desc, 1)
        })
    }

    pub(super) fn access_desc(&self) -> MemAccessDesc {
        MemAccessDesc {
            location: MemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ordinal,
            },
            flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        }
    }
}

impl Drop for DeviceCtx {
    fn drop(&mut self) {
        // SAFETY: releases the retain taken in `open`; every child holds an Arc to us, so none
        // is left.
        let r = unsafe { (self.drv.api.primary_ctx_release)(self.dev) };
        if let Err(e) = self.drv.check("cuDevicePrimaryCtxRelease", r) {
            tracing::warn!(error = %e, "cuda: releasing a primary context failed");
        }
    }
}

/// What [`DeviceCtx::query_allocation`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawAlloc {
    /// Whether the pointer is device memory (not host, not managed).
    pub device_memory: bool,
    /// The device the memory is on.
    pub ordinal: i32,
    /// Start of the allocation (legacy) or of the mapping (VMM).
    pub base: u64,
    /// Its size.
    pub size: u64,
    /// `Some(requested handle types)` for a VMM allocation.
    pub vmm_handle_types: Option<u32>,
    /// Whether `cuIpcGetMemHandle` works on it (false for stream-ordered pools).
    pub legacy_ipc: bool,
}

/// `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`.
pub(crate) const RANGE_HANDLE_DMA_BUF_FD: c_uint = 1;
const CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: c_int = 124;

impl Driver {
    /// Whether the driver exports device memory as dmabuf fds (`cuMemGetHandleForAddressRange`,
    /// CUDA 11.7 or newer); `Err` says why not.
    pub(crate) fn dmabuf_export(&self) -> Result<(), String> {
        match self.opt.mem_get_handle_for_address_range {
            Some(_) => Ok(()),
            None => Err(format!(
                "this CUDA driver ({}.{}) lacks cuMemGetHandleForAddressRange: dmabuf export \
                 needs a newer driver",
                self.facts.version / 1000,
                (self.facts.version % 1000) / 10
            )),
        }
    }
}

impl DeviceCtx {
    /// The device's PCI bus id as sysfs names it (`0000:19:00.0`, lower case).
    pub(crate) fn pci_bus_id(&self) -> CuRes<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: writes at most `len` bytes (NUL-terminated) into `buf`; `dev` is valid.
        self.check("cuDeviceGetPCIBusId", unsafe {
            (self.drv.api.device_get_pci_bus_id)(buf.as_mut_ptr(), buf.len() as c_int, self.dev)
        })?;
        // SAFETY: on success `buf` holds a NUL-terminated string (zeroed before, so a NUL
        // within its 64 bytes is guaranteed even if the driver wrote none).
        let raw = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        Ok(sysfs_bus_id(&raw))
    }

    /// Whether the device can export its memory as dmabuf (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`:
    /// the open kernel modules, or a proprietary driver with dmabuf support).
    pub(crate) fn dmabuf_supported(&self) -> bool {
        self.drv
            .attribute(self.dev, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)
            .unwrap_or(0)
            != 0
    }

    /// A dmabuf fd for the device memory `[start, start + size)`, both aligned to the host page
    /// size (`cuMemGetHandleForAddressRange` with `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`). The fd
    /// holds the memory's pages for whoever imports it (an RDMA NIC); call with this context
    /// current.
    pub(crate) fn export_dmabuf(&self, start: u64, size: u64) -> CuRes<OwnedFd> {
        let op = "cuMemGetHandleForAddressRange(DMA_BUF_FD)";
        let Some(f) = self.drv.opt.mem_get_handle_for_address_range else {
            return Err(CuError {
                op,
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: self.drv.dmabuf_export().err().unwrap_or_default(),
            });
        };
        let size = usize::try_from(size).map_err(|_| CuError {
            op,
            code: CUDA_ERROR_NOT_SUPPORTED,
            name: format!("size {size} does not fit usize"),
        })?;
        let mut fd: c_int = -1;
        // SAFETY: for DMA_BUF_FD the driver writes one int (a new fd we then own); the range is
        // only looked up (the driver checks that it is mapped device memory).
        let r = unsafe {
            f(
                (&mut fd as *mut c_int).cast(),
                start,
                size,
                RANGE_HANDLE_DMA_BUF_FD,
                0,
            )
        };
        self.check(op, r)?;
        if fd < 0 {
            return Err(CuError {
                op,
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: format!("returned fd {fd}"),
            });
        }
        // SAFETY: the driver handed us a fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}
