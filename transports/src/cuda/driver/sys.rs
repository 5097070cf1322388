//! The raw layer: the driver's types, constants and C structs (checked against cudarc's
//! generated layouts), and the tables of entry points resolved from the library.

use super::*;

/// `CUresult`.
pub(crate) type CuResult = c_int;
/// `CUdevice`.
pub(crate) type CuDevice = c_int;
/// `CUdeviceptr`.
pub(crate) type CuDevicePtr = c_ulonglong;
/// `CUmemGenericAllocationHandle`.
pub(crate) type CuMemHandle = c_ulonglong;
pub(super) type CuContext = *mut c_void;
pub(super) type CuStream = *mut c_void;
pub(super) type CuEvent = *mut c_void;

pub(crate) const CUDA_SUCCESS: CuResult = 0;
#[cfg(test)]
pub(crate) const CUDA_ERROR_NOT_INITIALIZED: CuResult = 3;
pub(crate) const CUDA_ERROR_STUB_LIBRARY: CuResult = 34;
pub(crate) const CUDA_ERROR_INSUFFICIENT_DRIVER: CuResult = 35;
pub(crate) const CUDA_ERROR_NO_DEVICE: CuResult = 100;
pub(crate) const CUDA_ERROR_NOT_READY: CuResult = 600;
pub(crate) const CUDA_ERROR_NOT_SUPPORTED: CuResult = 801;

/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`.
pub const HANDLE_POSIX_FD: u32 = 1;
/// `CU_MEM_HANDLE_TYPE_FABRIC`.
pub(crate) const HANDLE_FABRIC: u32 = 8;

pub(super) const CU_MEM_ALLOCATION_TYPE_PINNED: u32 = 1;
pub(super) const CU_MEM_LOCATION_TYPE_DEVICE: u32 = 1;
pub(super) const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: u32 = 3;
pub(super) const CU_MEM_ALLOC_GRANULARITY_RECOMMENDED: u32 = 1;
pub(super) const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: c_uint = 2;
pub(super) const CU_POINTER_ATTRIBUTE_IS_MANAGED: c_uint = 8;
pub(super) const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_uint = 9;
pub(super) const CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: c_uint = 10;
pub(super) const CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE: c_uint = 15;
pub(super) const CU_POINTER_ATTRIBUTE_MAPPING_SIZE: c_uint = 18;
pub(super) const CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR: c_uint = 19;
pub(super) const CU_MEMORYTYPE_DEVICE: u64 = 2;
pub(super) const CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: c_int = 41;
pub(super) const CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: c_int = 102;
pub(super) const CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: c_int = 103;
pub(super) const CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED: c_int = 128;
pub(super) const CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED: c_int = 110;
pub(super) const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
pub(super) const CU_STREAM_NON_BLOCKING: c_uint = 1;
pub(super) const CU_EVENT_DISABLE_TIMING: c_uint = 2;
pub(super) const CU_MEMHOSTALLOC_PORTABLE: c_uint = 1;

/// Oldest driver the backend runs on (CUDA 12.0: VMM export, `cuDeviceGetUuid_v2`, pointer
/// mapping attributes).
pub(crate) const MIN_DRIVER_VERSION: i32 = 12000;

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct MemLocation {
    pub(super) type_: u32,
    pub(super) id: c_int,
}

/// `CUmemAllocationProp` (CUDA 12.x layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct MemAllocationProp {
    pub(super) type_: u32,
    pub(super) requested_handle_types: u32,
    pub(super) location: MemLocation,
    pub(super) win32_handle_meta_data: *mut c_void,
    pub(super) compression_type: u8,
    pub(super) gpu_direct_rdma_capable: u8,
    pub(super) usage: u16,
    pub(super) reserved: [u8; 4],
}

impl MemAllocationProp {
    pub(super) fn zeroed() -> MemAllocationProp {
        MemAllocationProp {
            type_: 0,
            requested_handle_types: 0,
            location: MemLocation::default(),
            win32_handle_meta_data: std::ptr::null_mut(),
            compression_type: 0,
            gpu_direct_rdma_capable: 0,
            usage: 0,
            reserved: [0; 4],
        }
    }
}

/// `CUmemAccessDesc`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct MemAccessDesc {
    pub(super) location: MemLocation,
    pub(super) flags: u32,
}

/// `CUmemcpyAttributes` (CUDA 12.8+): how `cuMemcpyBatchAsync` reads its sources.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct MemcpyAttributes {
    pub(super) src_access_order: c_int,
    pub(super) src_loc_hint: MemLocation,
    pub(super) dst_loc_hint: MemLocation,
    pub(super) flags: c_uint,
}

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: sources are read in stream order.
pub(super) const MEMCPY_SRC_ACCESS_ORDER_STREAM: c_int = 1;

/// `CUipcMemHandle`: 64 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct IpcMemHandle {
    pub(super) reserved: [u8; 64],
}

/// `CUuuid`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct CuUuid {
    pub(super) bytes: [u8; 16],
}

// The layouts above must match the driver's; cudarc's bindings are generated from cuda.h.
const _: () = {
    use cudarc::driver::sys as s;
    use std::mem::{align_of, size_of};
    assert!(size_of::<MemLocation>() == size_of::<s::CUmemLocation>());
    assert!(size_of::<MemAllocationProp>() == size_of::<s::CUmemAllocationProp>());
    assert!(align_of::<MemAllocationProp>() == align_of::<s::CUmemAllocationProp>());
    assert!(size_of::<MemAccessDesc>() == size_of::<s::CUmemAccessDesc>());
    assert!(size_of::<MemcpyAttributes>() == size_of::<s::CUmemcpyAttributes>());
    assert!(align_of::<MemcpyAttributes>() == align_of::<s::CUmemcpyAttributes>());
    assert!(size_of::<IpcMemHandle>() == size_of::<s::CUipcMemHandle>());
    assert!(size_of::<CuUuid>() == size_of::<s::CUuuid>());
    assert!(size_of::<[u8; 64]>() == size_of::<s::CUmemFabricHandle>());
    assert!(size_of::<CuDevicePtr>() == size_of::<s::CUdeviceptr>());
    assert!(size_of::<CuMemHandle>() == size_of::<s::CUmemGenericAllocationHandle>());
};

macro_rules! api {
    ($( $field:ident = $sym:literal ( $($arg:ty),* ); )*) => {
        /// The driver entry points the backend uses, resolved once.
        pub(super) struct Api {
            $( pub(super) $field: unsafe extern "C" fn($($arg),*) -> CuResult, )*
        }

        /// Every symbol the backend needs, by its exported name.
        #[cfg(test)]
        pub(crate) const SYMBOLS: &[&str] = &[$($sym),*];

        impl Api {
            /// Resolves every symbol.
            ///
            /// # Safety
            /// `lib` must be the CUDA driver library, whose exports have the C signatures
            /// declared in the table, and must outlive the returned pointers.
            pub(super) unsafe fn load(lib: &Library, name: &str) -> Result<Api, String> {
                Ok(Api {
                    $( $field: {
                        // SAFETY: per the contract, the symbol has this signature.
                        let s = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) -> CuResult>($sym)
                        };
                        *s.map_err(|e| format!(
                            "{name} lacks {}: driver too old for the cuda backend (CUDA {}.{} \
                             or newer needed): {}", $sym, MIN_DRIVER_VERSION / 1000,
                            (MIN_DRIVER_VERSION % 1000) / 10, error_chain(&e)))?
                    }, )*
                })
            }

            /// Entry points that do nothing, each recording its name in [`FAKE_CALLS`] and
            /// returning success, or `CUDA_ERROR_NOT_SUPPORTED` for the name in [`FAKE_FAIL`]:
            /// the order of the driver calls, tested without a driver.
            #[cfg(test)]
            pub(super) fn fake() -> Api {
                Api {
                    $( $field: {
                        unsafe extern "C" fn f($(_: $arg),*) -> CuResult {
                            FAKE_CALLS.with(|c| c.borrow_mut().push($sym));
                            if FAKE_FAIL.with(|f| f.get() == Some($sym)) {
                                CUDA_ERROR_NOT_SUPPORTED
                            } else {
                                CUDA_SUCCESS
                            }
                        }
                        f
                    }, )*
                }
            }
        }
    };
}

#[cfg(test)]
thread_local! {
    /// The calls of [`Api::fake`] on this thread, in order.
    pub(super) static FAKE_CALLS: std::cell::RefCell<Vec<&'static str>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The call [`Api::fake`] fails on this thread.
    pub(super) static FAKE_FAIL: std::cell::Cell<Option<&'static str>> =
        const { std::cell::Cell::new(None) };
}

api! {
    init = "cuInit"(c_uint);
    driver_get_version = "cuDriverGetVersion"(*mut c_int);
    device_get_count = "cuDeviceGetCount"(*mut c_int);
    device_get = "cuDeviceGet"(*mut CuDevice, c_int);
    device_get_attribute = "cuDeviceGetAttribute"(*mut c_int, c_int, CuDevice);
    device_get_uuid = "cuDeviceGetUuid_v2"(*mut CuUuid, CuDevice);
    primary_ctx_retain = "cuDevicePrimaryCtxRetain"(*mut CuContext, CuDevice);
    primary_ctx_release = "cuDevicePrimaryCtxRelease_v2"(CuDevice);
    ctx_push = "cuCtxPushCurrent_v2"(CuContext);
    ctx_pop = "cuCtxPopCurrent_v2"(*mut CuContext);
    get_error_name = "cuGetErrorName"(CuResult, *mut *const c_char);
    pointer_get_attribute = "cuPointerGetAttribute"(*mut c_void, c_uint, CuDevicePtr);
    mem_get_address_range = "cuMemGetAddressRange_v2"(*mut CuDevicePtr, *mut usize, CuDevicePtr);
    mem_alloc = "cuMemAlloc_v2"(*mut CuDevicePtr, usize);
    mem_free = "cuMemFree_v2"(CuDevicePtr);
    ipc_get_mem_handle = "cuIpcGetMemHandle"(*mut IpcMemHandle, CuDevicePtr);
    ipc_open_mem_handle = "cuIpcOpenMemHandle_v2"(*mut CuDevicePtr, IpcMemHandle, c_uint);
    ipc_close_mem_handle = "cuIpcCloseMemHandle"(CuDevicePtr);
    mem_retain_allocation_handle = "cuMemRetainAllocationHandle"(*mut CuMemHandle, *mut c_void);
    mem_release = "cuMemRelease"(CuMemHandle);
    mem_get_allocation_properties =
        "cuMemGetAllocationPropertiesFromHandle"(*mut MemAllocationProp, CuMemHandle);
    mem_export = "cuMemExportToShareableHandle"(*mut c_void, CuMemHandle, u32, c_ulonglong);
    mem_import = "cuMemImportFromShareableHandle"(*mut CuMemHandle, *mut c_void, u32);
    mem_create = "cuMemCreate"(*mut CuMemHandle, usize, *const MemAllocationProp, c_ulonglong);
    mem_address_reserve =
        "cuMemAddressReserve"(*mut CuDevicePtr, usize, usize, CuDevicePtr, c_ulonglong);
    mem_address_free = "cuMemAddressFree"(CuDevicePtr, usize);
    mem_map = "cuMemMap"(CuDevicePtr, usize, usize, CuMemHandle, c_ulonglong);
    mem_unmap = "cuMemUnmap"(CuDevicePtr, usize);
    mem_set_access = "cuMemSetAccess"(CuDevicePtr, usize, *const MemAccessDesc, usize);
    mem_get_granularity =
        "cuMemGetAllocationGranularity"(*mut usize, *const MemAllocationProp, u32);
    stream_create = "cuStreamCreate"(*mut CuStream, c_uint);
    stream_destroy = "cuStreamDestroy_v2"(CuStream);
    stream_synchronize = "cuStreamSynchronize"(CuStream);
    event_create = "cuEventCreate"(*mut CuEvent, c_uint);
    event_record = "cuEventRecord"(CuEvent, CuStream);
    event_query = "cuEventQuery"(CuEvent);
    event_synchronize = "cuEventSynchronize"(CuEvent);
    event_destroy = "cuEventDestroy_v2"(CuEvent);
    memcpy_dtod_async = "cuMemcpyDtoDAsync_v2"(CuDevicePtr, CuDevicePtr, usize, CuStream);
    memcpy_dtoh_async = "cuMemcpyDtoHAsync_v2"(*mut c_void, CuDevicePtr, usize, CuStream);
    memcpy_htod_async = "cuMemcpyHtoDAsync_v2"(CuDevicePtr, *const c_void, usize, CuStream);
    mem_host_alloc = "cuMemHostAlloc"(*mut *mut c_void, usize, c_uint);
    mem_free_host = "cuMemFreeHost"(*mut c_void);
    device_get_pci_bus_id = "cuDeviceGetPCIBusId"(*mut c_char, c_int, CuDevice);
}

/// `cuMemGetHandleForAddressRange` (CUDA 11.7+): resolved when present, as older drivers lack
/// it (only dmabuf export needs it).
pub(super) type MemGetHandleForAddressRange =
    unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, c_uint, c_ulonglong) -> CuResult;

/// `cuMemcpyBatchAsync_v2` (CUDA 13.0): many copies in one call.
pub(super) type MemcpyBatchV2 = unsafe extern "C" fn(
    *mut CuDevicePtr,
    *mut CuDevicePtr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    CuStream,
) -> CuResult;

/// `cuMemcpyBatchAsync` (CUDA 12.8 and 12.9): as v2, with the index of a failed copy.
pub(super) type MemcpyBatchV1 = unsafe extern "C" fn(
    *mut CuDevicePtr,
    *mut CuDevicePtr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    CuStream,
) -> CuResult;

pub(super) type CuModule = *mut c_void;
pub(super) type CuFunction = *mut c_void;
pub(super) type ModuleLoadData = unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult;
pub(super) type ModuleGetFunction =
    unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult;
pub(super) type ModuleUnload = unsafe extern "C" fn(CuModule) -> CuResult;
#[allow(clippy::type_complexity)]
pub(super) type LaunchKernel = unsafe extern "C" fn(
    CuFunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CuStream,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;

/// `cuFlushGPUDirectRDMAWrites` (CUDA 11.3+).
pub(super) type FlushGdrWrites = unsafe extern "C" fn(c_int, c_int) -> CuResult;

/// `CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX`.
pub(super) const FLUSH_TARGET_CURRENT_CTX: c_int = 0;
/// `CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER`.
pub(super) const FLUSH_TO_OWNER: c_int = 100;

/// Entry points that only some features need; `None` where the driver lacks them.
pub(super) struct OptionalApi {
    pub(super) flush_gdr_writes: Option<FlushGdrWrites>,
    pub(super) module_load_data: Option<ModuleLoadData>,
    pub(super) module_get_function: Option<ModuleGetFunction>,
    pub(super) module_unload: Option<ModuleUnload>,
    pub(super) launch_kernel: Option<LaunchKernel>,
    pub(super) mem_get_handle_for_address_range: Option<MemGetHandleForAddressRange>,
    pub(super) memcpy_batch_v2: Option<MemcpyBatchV2>,
    pub(super) memcpy_batch_v1: Option<MemcpyBatchV1>,
}

impl OptionalApi {
    /// Resolves what `lib` has.
    ///
    /// # Safety
    /// As [`Api::load`].
    pub(super) unsafe fn load(lib: &Library) -> OptionalApi {
        OptionalApi {
            // SAFETY: per the contract, each symbol (if exported) has its declared signature.
            module_load_data: unsafe { lib.get::<ModuleLoadData>(b"cuModuleLoadData\0") }
                .ok()
                .map(|s| *s),
            // SAFETY: as above.
            module_get_function: unsafe { lib.get::<ModuleGetFunction>(b"cuModuleGetFunction\0") }
                .ok()
                .map(|s| *s),
            // SAFETY: as above.
            module_unload: unsafe { lib.get::<ModuleUnload>(b"cuModuleUnload\0") }
                .ok()
                .map(|s| *s),
            // SAFETY: as above.
            launch_kernel: unsafe { lib.get::<LaunchKernel>(b"cuLaunchKernel\0") }
                .ok()
                .map(|s| *s),
            // SAFETY: per the contract, the symbol (if exported) has this signature.
            flush_gdr_writes: unsafe { lib.get::<FlushGdrWrites>(b"cuFlushGPUDirectRDMAWrites\0") }
                .ok()
                .map(|s| *s),
            // SAFETY: per the contract, the symbol (if exported) has this signature.
            mem_get_handle_for_address_range: unsafe {
                lib.get::<MemGetHandleForAddressRange>(b"cuMemGetHandleForAddressRange\0")
            }
            .ok()
            .map(|s| *s),
            // SAFETY: as above (the CUDA 13.0 signature under its versioned name).
            memcpy_batch_v2: unsafe { lib.get::<MemcpyBatchV2>(b"cuMemcpyBatchAsync_v2\0") }
                .ok()
                .map(|s| *s),
            // SAFETY: as above (the CUDA 12.8 signature under the unversioned name).
            memcpy_batch_v1: unsafe { lib.get::<MemcpyBatchV1>(b"cuMemcpyBatchAsync\0") }
                .ok()
                .map(|s| *s),
        }
    }
}
