//! The unsafe bottom of the `cuda` backend: the CUDA driver API, loaded at run time.
//!
//! # Why not cudarc's `sys` functions directly
//!
//! cudarc (dynamic loading) resolves each driver symbol lazily on its first call and panics when
//! the library or the symbol is missing. Here every symbol the backend uses is resolved once, up
//! front, from `libcuda.so.1` (the driver's own soname; `libcuda.so` without a version is often
//! the toolkit's link-time stub), into a table of function pointers. A missing library, a
//! missing symbol, a failing `cuInit`, an old driver or no device each becomes an
//! `unavailable: <reason>` text, kept in a process-wide `OnceLock`, and no code path reaches a
//! driver call before that probe succeeded: [`driver`] is the only way to get the table. No
//! cudarc function is ever called, so cudarc's panics cannot be reached; cudarc's generated
//! struct definitions are used at compile time to check the layouts declared here.
//!
//! The structs declared here use plain integers where the C headers use enums: the driver may
//! write values (bit masks of handle types) that are not variants of a Rust enum, and reading
//! such a value as an enum would be undefined behaviour.
//!
//! Everything else in the backend is safe code over the wrappers below: [`DeviceCtx`] (a
//! retained primary context, `Arc`'d, released last), [`Stream`], [`Event`], [`PinnedHost`],
//! [`LegacyImport`], [`VmmImport`], [`DeviceAlloc`]. Each child holds an `Arc<DeviceCtx>`, so
//! the context outlives every stream, event and mapping made in it. Nothing panics in `Drop`: a
//! failure there is logged and counted.

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use libloading::Library;

/// `CUresult`.
pub type CuResult = c_int;
/// `CUdevice`.
pub type CuDevice = c_int;
/// `CUdeviceptr`.
pub type CuDevicePtr = c_ulonglong;
/// `CUmemGenericAllocationHandle`.
pub type CuMemHandle = c_ulonglong;
type CuContext = *mut c_void;
type CuStream = *mut c_void;
type CuEvent = *mut c_void;

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
pub const HANDLE_FABRIC: u32 = 8;

const CU_MEM_ALLOCATION_TYPE_PINNED: u32 = 1;
const CU_MEM_LOCATION_TYPE_DEVICE: u32 = 1;
const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: u32 = 3;
const CU_MEM_ALLOC_GRANULARITY_RECOMMENDED: u32 = 1;
const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: c_uint = 2;
const CU_POINTER_ATTRIBUTE_IS_MANAGED: c_uint = 8;
const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_uint = 9;
const CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: c_uint = 10;
const CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE: c_uint = 15;
const CU_POINTER_ATTRIBUTE_MAPPING_SIZE: c_uint = 18;
const CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR: c_uint = 19;
const CU_MEMORYTYPE_DEVICE: u64 = 2;
const CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: c_int = 41;
const CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: c_int = 102;
const CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: c_int = 103;
const CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED: c_int = 128;
const CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED: c_int = 110;
const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
const CU_STREAM_NON_BLOCKING: c_uint = 1;
const CU_EVENT_DISABLE_TIMING: c_uint = 2;
const CU_MEMHOSTALLOC_PORTABLE: c_uint = 1;

/// Oldest driver the backend runs on (CUDA 12.0: VMM export, `cuDeviceGetUuid_v2`, pointer
/// mapping attributes).
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MemLocation {
    type_: u32,
    id: c_int,
}

/// `CUmemAllocationProp` (CUDA 12.x layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MemAllocationProp {
    type_: u32,
    requested_handle_types: u32,
    location: MemLocation,
    win32_handle_meta_data: *mut c_void,
    compression_type: u8,
    gpu_direct_rdma_capable: u8,
    usage: u16,
    reserved: [u8; 4],
}

impl MemAllocationProp {
    fn zeroed() -> MemAllocationProp {
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
struct MemAccessDesc {
    location: MemLocation,
    flags: u32,
}

/// `CUmemcpyAttributes` (CUDA 12.8+): how `cuMemcpyBatchAsync` reads its sources.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MemcpyAttributes {
    src_access_order: c_int,
    src_loc_hint: MemLocation,
    dst_loc_hint: MemLocation,
    flags: c_uint,
}

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: sources are read in stream order.
const MEMCPY_SRC_ACCESS_ORDER_STREAM: c_int = 1;

/// `CUipcMemHandle`: 64 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct IpcMemHandle {
    reserved: [u8; 64],
}

/// `CUuuid`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CuUuid {
    bytes: [u8; 16],
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
        struct Api {
            $( $field: unsafe extern "C" fn($($arg),*) -> CuResult, )*
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
            unsafe fn load(lib: &Library, name: &str) -> Result<Api, String> {
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
        }
    };
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
type MemGetHandleForAddressRange =
    unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, c_uint, c_ulonglong) -> CuResult;

/// `cuMemcpyBatchAsync_v2` (CUDA 13.0): many copies in one call.
type MemcpyBatchV2 = unsafe extern "C" fn(
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
type MemcpyBatchV1 = unsafe extern "C" fn(
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

type CuModule = *mut c_void;
type CuFunction = *mut c_void;
type ModuleLoadData = unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult;
type ModuleGetFunction = unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult;
type ModuleUnload = unsafe extern "C" fn(CuModule) -> CuResult;
#[allow(clippy::type_complexity)]
type LaunchKernel = unsafe extern "C" fn(
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
type FlushGdrWrites = unsafe extern "C" fn(c_int, c_int) -> CuResult;

/// `CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX`.
const FLUSH_TARGET_CURRENT_CTX: c_int = 0;
/// `CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER`.
const FLUSH_TO_OWNER: c_int = 100;

/// Entry points that only some features need; `None` where the driver lacks them.
struct OptionalApi {
    flush_gdr_writes: Option<FlushGdrWrites>,
    module_load_data: Option<ModuleLoadData>,
    module_get_function: Option<ModuleGetFunction>,
    module_unload: Option<ModuleUnload>,
    launch_kernel: Option<LaunchKernel>,
    mem_get_handle_for_address_range: Option<MemGetHandleForAddressRange>,
    memcpy_batch_v2: Option<MemcpyBatchV2>,
    memcpy_batch_v1: Option<MemcpyBatchV1>,
}

impl OptionalApi {
    /// Resolves what `lib` has.
    ///
    /// # Safety
    /// As [`Api::load`].
    unsafe fn load(lib: &Library) -> OptionalApi {
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

/// A failed driver call: the operation, the `CUresult` and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CuError {
    /// The driver function that failed.
    pub op: &'static str,
    /// The `CUresult`.
    pub code: i32,
    /// The result's name (`CUDA_ERROR_...`).
    pub name: String,
}

impl fmt::Display for CuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {} ({})", self.op, self.name, self.code)
    }
}

impl std::error::Error for CuError {}

/// Result of a driver wrapper.
pub type CuRes<T> = Result<T, CuError>;

/// Facts the probe learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverFacts {
    /// `cuDriverGetVersion` (e.g. 12080).
    pub version: i32,
    /// Number of devices.
    pub devices: i32,
}

/// The loaded driver: the library (kept open for the life of the process) and its entry points.
pub struct Driver {
    api: Api,
    opt: OptionalApi,
    facts: DriverFacts,
    _lib: Library,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

/// The three calls the probe makes after loading, behind a trait so that the decisions on their
/// results (the `unavailable` reasons) are tested without a driver.
pub(crate) trait InitApi {
    /// `cuInit(0)`.
    fn init(&self) -> CuResult;
    /// `cuDriverGetVersion`.
    fn version(&self) -> Result<i32, CuResult>;
    /// `cuDeviceGetCount`.
    fn device_count(&self) -> Result<i32, CuResult>;
    /// The name of a result code.
    fn error_name(&self, code: CuResult) -> String;
}

/// Turns the probe's three results into facts or the reason the backend is unavailable.
pub(crate) fn check_init(api: &dyn InitApi) -> Result<DriverFacts, String> {
    let r = api.init();
    if r != CUDA_SUCCESS {
        let name = api.error_name(r);
        return Err(match r {
            CUDA_ERROR_NO_DEVICE => format!("no CUDA devices (cuInit: {name})"),
            CUDA_ERROR_INSUFFICIENT_DRIVER => format!(
                "driver too old: the kernel driver does not support this libcuda (cuInit: {name})"
            ),
            CUDA_ERROR_STUB_LIBRARY => format!(
                "libcuda.so.1 is the CUDA toolkit's stub library, not a driver (cuInit: {name})"
            ),
            _ => format!("cuInit failed: {name} ({r})"),
        });
    }
    let version = api
        .version()
        .map_err(|r| format!("cuDriverGetVersion failed: {}", api.error_name(r)))?;
    if version < MIN_DRIVER_VERSION {
        return Err(format!(
            "driver too old: CUDA {}.{} driver, {}.{} or newer needed",
            version / 1000,
            (version % 1000) / 10,
            MIN_DRIVER_VERSION / 1000,
            (MIN_DRIVER_VERSION % 1000) / 10
        ));
    }
    let devices = api
        .device_count()
        .map_err(|r| format!("cuDeviceGetCount failed: {}", api.error_name(r)))?;
    if devices <= 0 {
        return Err("no CUDA devices (cuDeviceGetCount returned 0)".into());
    }
    Ok(DriverFacts { version, devices })
}

impl InitApi for Api {
    fn init(&self) -> CuResult {
        // SAFETY: cuInit takes a flags word (must be 0) and has no other precondition.
        unsafe { (self.init)(0) }
    }

    fn version(&self) -> Result<i32, CuResult> {
        let mut v = 0;
        // SAFETY: writes one int into `v`.
        let r = unsafe { (self.driver_get_version)(&mut v) };
        if r == CUDA_SUCCESS {
            Ok(v)
        } else {
            Err(r)
        }
    }

    fn device_count(&self) -> Result<i32, CuResult> {
        let mut n = 0;
        // SAFETY: writes one int into `n`; cuInit succeeded before.
        let r = unsafe { (self.device_get_count)(&mut n) };
        if r == CUDA_SUCCESS {
            Ok(n)
        } else {
            Err(r)
        }
    }

    fn error_name(&self, code: CuResult) -> String {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string, or fails for an unknown
        // code (and may be called before cuInit).
        let r = unsafe { (self.get_error_name)(code, &mut p) };
        if r != CUDA_SUCCESS || p.is_null() {
            return format!("CUDA error {code}");
        }
        // SAFETY: on success `p` points to a NUL-terminated static string owned by the driver.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The library names tried, in order.
pub const LIBRARY_NAMES: &[&str] = &["libcuda.so.1"];

/// Opens the first of `names` that loads and resolves every symbol; the error names the library
/// and why (not found, symbol missing).
fn open(names: &[&str]) -> Result<(Library, Api), String> {
    let mut why = Vec::new();
    for name in names {
        // SAFETY: loading the CUDA driver runs its initialisers, which have no preconditions we
        // could violate; we do not call into it until its symbols are resolved.
        match unsafe { Library::new(*name) } {
            Ok(lib) => {
                // SAFETY: `lib` is a CUDA driver (it exports cuInit and the rest under the names
                // and C signatures of cuda.h) and lives in `Driver` as long as the pointers.
                let api = unsafe { Api::load(&lib, name) }?;
                return Ok((lib, api));
            }
            Err(e) => why.push(format!("{name} not found: {}", error_chain(&e))),
        }
    }
    Err(why.join("; "))
}

/// An error and its sources, `: `-separated (libloading puts dlerror's text in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Opens a driver library from `names` and initialises it: the probe, for tests that pass
/// names of their own.
pub(crate) fn probe_names(names: &[&str]) -> Result<Driver, String> {
    let (lib, api) = open(names)?;
    let facts = check_init(&api)?;
    // SAFETY: `lib` is the CUDA driver `open` resolved the required table from; it lives in
    // `Driver` as long as the pointers.
    let opt = unsafe { OptionalApi::load(&lib) };
    Ok(Driver {
        api,
        opt,
        facts,
        _lib: lib,
    })
}

/// The driver, loaded and initialised once per process; `Err` is the reason the backend is
/// unavailable here.
pub fn driver() -> Result<&'static Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| probe_names(LIBRARY_NAMES))
        .as_ref()
        .map_err(Clone::clone)
}

impl Driver {
    fn check(&self, op: &'static str, r: CuResult) -> CuRes<()> {
        if r == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(CuError {
                op,
                code: r,
                name: self.api.error_name(r),
            })
        }
    }

    /// What the probe learned.
    pub fn facts(&self) -> &DriverFacts {
        &self.facts
    }

    /// Number of devices.
    pub fn device_count(&self) -> i32 {
        self.facts.devices
    }

    /// The UUID of device `ordinal` (no context is created).
    pub fn device_uuid(&self, ordinal: i32) -> CuRes<[u8; 16]> {
        if ordinal < 0 || ordinal >= self.facts.devices {
            return Err(CuError {
                op: "cuDeviceGet",
                code: CUDA_ERROR_NO_DEVICE,
                name: format!(
                    "no device {ordinal} (this host has {} devices)",
                    self.facts.devices
                ),
            });
        }
        let mut dev: CuDevice = 0;
        // SAFETY: writes one CUdevice; the ordinal is in range.
        self.check("cuDeviceGet", unsafe {
            (self.api.device_get)(&mut dev, ordinal)
        })?;
        let mut uuid = CuUuid { bytes: [0; 16] };
        // SAFETY: writes 16 bytes into `uuid`; `dev` came from cuDeviceGet.
        self.check("cuDeviceGetUuid", unsafe {
            (self.api.device_get_uuid)(&mut uuid, dev)
        })?;
        Ok(uuid.bytes)
    }

    /// Whether device `ordinal` exports fabric handles (no context is created).
    pub fn device_supports_fabric(&self, ordinal: i32) -> bool {
        if ordinal < 0 || ordinal >= self.facts.devices {
            return false;
        }
        let mut dev: CuDevice = 0;
        // SAFETY: writes one CUdevice; the ordinal is in range.
        let r = unsafe { (self.api.device_get)(&mut dev, ordinal) };
        r == CUDA_SUCCESS
            && self
                .attribute(dev, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED)
                .unwrap_or(0)
                != 0
    }

    fn attribute(&self, dev: CuDevice, attr: c_int) -> CuRes<i32> {
        let mut v = 0;
        // SAFETY: writes one int; `dev` came from cuDeviceGet.
        let r = unsafe { (self.api.device_get_attribute)(&mut v, attr, dev) };
        self.check("cuDeviceGetAttribute", r)?;
        Ok(v)
    }
}

/// A device's retained primary context (shared with the CUDA runtime and PyTorch), released
/// when the last holder drops it.
pub struct DeviceCtx {
    drv: &'static Driver,
    ordinal: i32,
    dev: CuDevice,
    ctx: CuContext,
    uuid: [u8; 16],
    vmm: bool,
    posix_fd: bool,
    fabric: bool,
    /// VMM allocations may be made GPUDirect RDMA capable (attribute 110).
    gdr_vmm: bool,
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
    ctx: &'a DeviceCtx,
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

impl DeviceCtx {
    /// Retains the primary context of device `ordinal` and reads its properties.
    pub fn open(drv: &'static Driver, ordinal: i32) -> CuRes<Arc<DeviceCtx>> {
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
    pub fn flush_gdr_writes(&self) -> CuRes<()> {
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
    pub fn driver(&self) -> &'static Driver {
        self.drv
    }

    fn check(&self, op: &'static str, r: CuResult) -> CuRes<()> {
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
    pub fn query_allocation(&self, addr: u64) -> CuRes<RawAlloc> {
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
    pub fn ipc_handle(&self, base: u64) -> CuRes<[u8; 64]> {
        let mut h = IpcMemHandle { reserved: [0; 64] };
        // SAFETY: writes 64 bytes into `h`.
        self.check("cuIpcGetMemHandle", unsafe {
            (self.drv.api.ipc_get_mem_handle)(&mut h, base)
        })?;
        Ok(h.reserved)
    }

    /// Exports the VMM allocation mapped at `addr` as a POSIX fd (this context current).
    pub fn export_fd(&self, addr: u64) -> CuRes<OwnedFd> {
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
    pub fn export_fabric(&self, addr: u64) -> CuRes<[u8; 64]> {
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

    fn vmm_prop(&self, handle_types: u32) -> MemAllocationProp {
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
    pub fn grant_access(&self, va: u64, size: usize) -> CuRes<()> {
        let desc = self.access_desc();
        let _g = self.enter()?;
        // SAFETY: changes access flags of a mapped range of this process; one descriptor.
        self.check("cuMemSetAccess", unsafe {
            (self.drv.api.mem_set_access)(va, size, &desc, 1)
        })
    }

    fn access_desc(&self) -> MemAccessDesc {
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
pub struct RawAlloc {
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

/// Most copies in one `cuMemcpyBatchAsync` call.
pub const BATCH_MAX: usize = 4096;

/// A non-blocking stream of a device.
pub struct Stream {
    ctx: Arc<DeviceCtx>,
    raw: CuStream,
}

// SAFETY: a CUstream may be used from any thread; the driver serialises work on it.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("device", &self.ctx.ordinal)
            .finish_non_exhaustive()
    }
}

impl Stream {
    /// A new non-blocking stream in `ctx`.
    pub fn new(ctx: &Arc<DeviceCtx>) -> CuRes<Stream> {
        let _g = ctx.enter()?;
        let mut raw: CuStream = std::ptr::null_mut();
        // SAFETY: writes one CUstream; our context is current.
        ctx.check("cuStreamCreate", unsafe {
            (ctx.drv.api.stream_create)(&mut raw, CU_STREAM_NON_BLOCKING)
        })?;
        Ok(Stream {
            ctx: Arc::clone(ctx),
            raw,
        })
    }

    /// The device context.
    pub fn ctx(&self) -> &Arc<DeviceCtx> {
        &self.ctx
    }

    /// Enqueues a device-to-device copy of `len` bytes (any devices, unified addressing). The
    /// stream's context must be current ([`DeviceCtx::enter`]); the copies do not push it
    /// themselves, so a batch of thousands pays for one push.
    ///
    /// # Safety
    /// `src..src+len` must be readable and `dst..dst+len` writable device memory mapped in this
    /// process until the work is complete (an [`Event`] recorded after it has completed).
    pub unsafe fn copy_dtod(&self, dst: u64, src: u64, len: usize) -> CuRes<()> {
        // SAFETY: per the contract.
        self.ctx.check("cuMemcpyDtoDAsync", unsafe {
            (self.ctx.drv.api.memcpy_dtod_async)(dst, src, len, self.raw)
        })
    }

    /// Whether the driver has `cuMemcpyBatchAsync` (CUDA 12.8+), which
    /// [`Stream::copy_dtod_batch`] uses.
    pub fn has_batch_copy(&self) -> bool {
        self.ctx.drv.opt.memcpy_batch_v2.is_some() || self.ctx.drv.opt.memcpy_batch_v1.is_some()
    }

    /// Enqueues device-to-device copies `(dst, src, len)` with as few driver calls as the
    /// driver allows: `cuMemcpyBatchAsync` (one call per [`BATCH_MAX`] copies, a few hundred
    /// nanoseconds per copy instead of microseconds) where present, else one
    /// [`Stream::copy_dtod`] each. As `copy_dtod`, the context must be current.
    ///
    /// # Safety
    /// As [`Stream::copy_dtod`], for every copy.
    pub unsafe fn copy_dtod_batch(&self, copies: &[(u64, u64, usize)]) -> CuRes<()> {
        let opt = &self.ctx.drv.opt;
        if copies.len() < 2 || (opt.memcpy_batch_v2.is_none() && opt.memcpy_batch_v1.is_none()) {
            for &(dst, src, len) in copies {
                // SAFETY: per the contract.
                unsafe { self.copy_dtod(dst, src, len)? };
            }
            return Ok(());
        }
        let loc = MemLocation {
            type_: CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ctx.ordinal,
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
                        self.raw,
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
                        self.raw,
                    )
                }
            } else {
                unreachable!("checked above")
            };
            self.ctx.check("cuMemcpyBatchAsync", r)?;
        }
        Ok(())
    }

    /// Enqueues a device-to-host copy.
    ///
    /// # Safety
    /// `src..src+len` must be readable device memory and `dst..dst+len` writable host memory
    /// (pinned for a truly asynchronous copy) until the work is complete.
    pub unsafe fn copy_dtoh(&self, dst: *mut u8, src: u64, len: usize) -> CuRes<()> {
        // SAFETY: per the contract.
        self.ctx.check("cuMemcpyDtoHAsync", unsafe {
            (self.ctx.drv.api.memcpy_dtoh_async)(dst.cast(), src, len, self.raw)
        })
    }

    /// Enqueues a host-to-device copy.
    ///
    /// # Safety
    /// `src..src+len` must be readable host memory and `dst..dst+len` writable device memory
    /// until the work is complete.
    pub unsafe fn copy_htod(&self, dst: u64, src: *const u8, len: usize) -> CuRes<()> {
        // SAFETY: per the contract.
        self.ctx.check("cuMemcpyHtoDAsync", unsafe {
            (self.ctx.drv.api.memcpy_htod_async)(dst, src.cast(), len, self.raw)
        })
    }

    /// Waits until every enqueued piece of work is done.
    pub fn synchronize(&self) -> CuRes<()> {
        let _g = self.ctx.enter()?;
        // SAFETY: a live stream of the current context.
        self.ctx.check("cuStreamSynchronize", unsafe {
            (self.ctx.drv.api.stream_synchronize)(self.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        match self.ctx.enter() {
            Ok(_g) => {
                // SAFETY: destroys our stream; work still queued completes first (driver
                // semantics), and nobody holds the raw handle any more.
                let r = unsafe { (self.ctx.drv.api.stream_destroy)(self.raw) };
                if let Err(e) = self.ctx.check("cuStreamDestroy", r) {
                    tracing::warn!(error = %e, "cuda: destroying a stream failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cuda: stream leaked"),
        }
    }
}

/// An event (timing disabled) marking a point in a stream.
pub struct Event {
    ctx: Arc<DeviceCtx>,
    raw: CuEvent,
}

// SAFETY: a CUevent may be recorded, queried and synchronised from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("device", &self.ctx.ordinal)
            .finish_non_exhaustive()
    }
}

impl Event {
    /// Records a new event on `stream` (after everything enqueued so far).
    pub fn record(stream: &Stream) -> CuRes<Event> {
        let ctx = &stream.ctx;
        let _g = ctx.enter()?;
        let mut raw: CuEvent = std::ptr::null_mut();
        // SAFETY: writes one CUevent; our context is current.
        ctx.check("cuEventCreate", unsafe {
            (ctx.drv.api.event_create)(&mut raw, CU_EVENT_DISABLE_TIMING)
        })?;
        let ev = Event {
            ctx: Arc::clone(ctx),
            raw,
        };
        // SAFETY: a live event and stream of the same context.
        ctx.check("cuEventRecord", unsafe {
            (ctx.drv.api.event_record)(ev.raw, stream.raw)
        })?;
        Ok(ev)
    }

    /// Whether the work before the event is done (`Err` if it failed).
    pub fn is_done(&self) -> CuRes<bool> {
        let _g = self.ctx.enter()?;
        // SAFETY: a live event of the current context.
        let r = unsafe { (self.ctx.drv.api.event_query)(self.raw) };
        if r == CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        self.ctx.check("cuEventQuery", r)?;
        Ok(true)
    }

    /// Waits until the work before the event is done.
    pub fn wait(&self) -> CuRes<()> {
        let _g = self.ctx.enter()?;
        // SAFETY: a live event of the current context.
        self.ctx.check("cuEventSynchronize", unsafe {
            (self.ctx.drv.api.event_synchronize)(self.raw)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        match self.ctx.enter() {
            Ok(_g) => {
                // SAFETY: destroys our event (legal even while pending: its resources are freed
                // when the work completes).
                let r = unsafe { (self.ctx.drv.api.event_destroy)(self.raw) };
                if let Err(e) = self.ctx.check("cuEventDestroy", r) {
                    tracing::warn!(error = %e, "cuda: destroying an event failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cuda: event leaked"),
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc` (portable: usable by every context).
pub struct PinnedHost {
    ctx: Arc<DeviceCtx>,
    ptr: *mut u8,
    len: usize,
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
        match self.ctx.enter() {
            Ok(_g) => {
                // SAFETY: frees the memory cuMemHostAlloc gave us; no borrow outlives `self`.
                let r = unsafe { (self.ctx.drv.api.mem_free_host)(self.ptr.cast()) };
                if let Err(e) = self.ctx.check("cuMemFreeHost", r) {
                    tracing::warn!(error = %e, "cuda: freeing pinned memory failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cuda: pinned memory leaked"),
        }
    }
}

/// A peer's legacy allocation opened with `cuIpcOpenMemHandle`, closed on drop.
pub struct LegacyImport {
    ctx: Arc<DeviceCtx>,
    base: u64,
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
        match self.ctx.enter() {
            Ok(_g) => {
                // SAFETY: closes the mapping opened in `open`; the import cache drops us only
                // when no transfer holds us.
                let r = unsafe { (self.ctx.drv.api.ipc_close_mem_handle)(self.base) };
                if let Err(e) = self.ctx.check("cuIpcCloseMemHandle", r) {
                    tracing::warn!(error = %e, "cuda: closing an IPC mapping failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cuda: IPC mapping leaked"),
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
    ctx: Arc<DeviceCtx>,
    handle: CuMemHandle,
    va: u64,
    size: usize,
    mapped: bool,
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
        let _g = match self.ctx.enter() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cuda: VMM mapping leaked");
                return;
            }
        };
        let api = &self.ctx.drv.api;
        if self.mapped {
            // SAFETY: unmaps the range mapped in `import`; no transfer holds it any more.
            let r = unsafe { (api.mem_unmap)(self.va, self.size) };
            if let Err(e) = self.ctx.check("cuMemUnmap", r) {
                tracing::warn!(error = %e, "cuda: unmapping failed");
            }
        }
        if self.size > 0 {
            // SAFETY: frees the range reserved in `import` (now unmapped).
            let r = unsafe { (api.mem_address_free)(self.va, self.size) };
            if let Err(e) = self.ctx.check("cuMemAddressFree", r) {
                tracing::warn!(error = %e, "cuda: freeing a VA range failed");
            }
        }
        // SAFETY: releases the handle imported in `import`.
        let r = unsafe { (api.mem_release)(self.handle) };
        if let Err(e) = self.ctx.check("cuMemRelease", r) {
            tracing::warn!(error = %e, "cuda: releasing an imported handle failed");
        }
    }
}

/// A VMM allocation we created: `cuMemCreate` + reserve + map + access (see
/// [`crate::cuda::VmmBuffer`]).
pub struct VmmAlloc {
    ctx: Arc<DeviceCtx>,
    handle: CuMemHandle,
    va: u64,
    size: usize,
    reserved: bool,
    mapped: bool,
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
        let _g = match self.ctx.enter() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cuda: VMM allocation leaked");
                return;
            }
        };
        let api = &self.ctx.drv.api;
        // Order: unmap, free the range, release the handle (the physical memory goes when the
        // last mapping and handle are gone, so an importer's mapping keeps it alive).
        if self.mapped {
            // SAFETY: unmaps our mapping; the owner guarantees nothing uses it (deregistered).
            let r = unsafe { (api.mem_unmap)(self.va, self.size) };
            if let Err(e) = self.ctx.check("cuMemUnmap", r) {
                tracing::warn!(error = %e, "cuda: unmapping failed");
            }
        }
        if self.reserved {
            // SAFETY: frees our reserved range, now unmapped.
            let r = unsafe { (api.mem_address_free)(self.va, self.size) };
            if let Err(e) = self.ctx.check("cuMemAddressFree", r) {
                tracing::warn!(error = %e, "cuda: freeing a VA range failed");
            }
        }
        // SAFETY: releases the handle from cuMemCreate.
        let r = unsafe { (api.mem_release)(self.handle) };
        if let Err(e) = self.ctx.check("cuMemRelease", r) {
            tracing::warn!(error = %e, "cuda: releasing an allocation failed");
        }
    }
}

/// A legacy allocation from `cuMemAlloc` (what `cudaMalloc` gives), freed on drop.
pub struct DeviceAlloc {
    ctx: Arc<DeviceCtx>,
    ptr: u64,
    size: usize,
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

/// The PTX of `nixl_gather` (see `gather.ptx`): many copies in one kernel launch.
const GATHER_PTX: &str = concat!(include_str!("gather.ptx"), "\0");

/// One entry of a gather table, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherEntry {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// The gather kernel loaded in one device's context: copies a table of runs (in device memory)
/// in one launch, where one `cuMemcpyDtoDAsync` per run costs microseconds of driver time each.
pub struct Gather {
    ctx: Arc<DeviceCtx>,
    module: CuModule,
    func: CuFunction,
}

// SAFETY: module and function handles are driver objects usable from any thread (every use
// makes the context current first); the struct is immutable after creation.
unsafe impl Send for Gather {}
// SAFETY: as above.
unsafe impl Sync for Gather {}

impl fmt::Debug for Gather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field("device", &self.ctx.ordinal)
            .finish_non_exhaustive()
    }
}

/// Threads per block of the gather kernel.
const GATHER_THREADS: u32 = 256;
/// Most blocks of one launch (each loops over its share of the entries).
const GATHER_MAX_BLOCKS: u32 = 8192;

impl Gather {
    /// Loads the kernel into `ctx` (JIT-compiled from PTX by the driver). `Err` when the
    /// driver lacks the module API or refuses the PTX.
    pub fn load(ctx: &Arc<DeviceCtx>) -> CuRes<Gather> {
        let o = &ctx.drv.opt;
        let (Some(load), Some(get), Some(_), Some(_)) = (
            o.module_load_data,
            o.module_get_function,
            o.module_unload,
            o.launch_kernel,
        ) else {
            return Err(CuError {
                op: "cuModuleLoadData",
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: "the driver lacks the module API".into(),
            });
        };
        let _g = ctx.enter()?;
        let mut module: CuModule = std::ptr::null_mut();
        // SAFETY: a NUL-terminated PTX image; writes one module handle.
        ctx.check("cuModuleLoadData", unsafe {
            load(&mut module, GATHER_PTX.as_ptr().cast())
        })?;
        let mut func: CuFunction = std::ptr::null_mut();
        // SAFETY: a live module and a NUL-terminated name; writes one function handle.
        let r = unsafe { get(&mut func, module, c"nixl_gather".as_ptr()) };
        let me = Gather {
            ctx: Arc::clone(ctx),
            module,
            func,
        };
        ctx.check("cuModuleGetFunction", r)?;
        Ok(me)
    }

    /// Enqueues the copies of the `n`-entry table at device address `table` on `stream` (of
    /// this device; its context current, as for [`Stream::copy_dtod`]).
    ///
    /// # Safety
    /// `table` must hold `n` [`GatherEntry`]s in device memory, and every entry's source must be
    /// readable and destination writable device memory mapped in this process, all until the
    /// work is complete (as [`Stream::copy_dtod`]).
    pub unsafe fn launch(&self, stream: &Stream, table: u64, n: u32) -> CuRes<()> {
        if n == 0 {
            return Ok(());
        }
        let launch = self.ctx.drv.opt.launch_kernel.expect("checked at load");
        let mut p_table = table;
        let mut p_n = n;
        let mut params: [*mut c_void; 2] = [
            (&mut p_table as *mut u64).cast(),
            (&mut p_n as *mut u32).cast(),
        ];
        let blocks = n.min(GATHER_MAX_BLOCKS);
        // SAFETY: a live function of this context; `params` points at the kernel's two
        // parameters (u64, u32), live for the call (the driver copies them); the memory the
        // kernel touches per the contract.
        self.ctx.check("cuLaunchKernel", unsafe {
            launch(
                self.func,
                blocks,
                1,
                1,
                GATHER_THREADS,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        let Some(unload) = self.ctx.drv.opt.module_unload else {
            return;
        };
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: our module; no launch of it is pending once its owner drops it (the
            // tables' requests hold the owner).
            let r = unsafe { unload(self.module) };
            if let Err(e) = self.ctx.check("cuModuleUnload", r) {
                tracing::warn!(error = %e, "cuda: unloading the gather kernel failed");
            }
        }
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        match self.ctx.enter() {
            Ok(_g) => {
                // SAFETY: frees our allocation; the owner guarantees nothing uses it.
                let r = unsafe { (self.ctx.drv.api.mem_free)(self.ptr) };
                if let Err(e) = self.ctx.check("cuMemFree", r) {
                    tracing::warn!(error = %e, "cuda: freeing device memory failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cuda: device memory leaked"),
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

/// `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`.
pub const RANGE_HANDLE_DMA_BUF_FD: c_uint = 1;
const CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: c_int = 124;

impl Driver {
    /// Whether the driver exports device memory as dmabuf fds (`cuMemGetHandleForAddressRange`,
    /// CUDA 11.7 or newer); `Err` says why not.
    pub fn dmabuf_export(&self) -> Result<(), String> {
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
    pub fn pci_bus_id(&self) -> CuRes<String> {
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
    pub fn dmabuf_supported(&self) -> bool {
        self.drv
            .attribute(self.dev, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)
            .unwrap_or(0)
            != 0
    }

    /// A dmabuf fd for the device memory `[start, start + size)`, both aligned to the host page
    /// size (`cuMemGetHandleForAddressRange` with `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`). The fd
    /// holds the memory's pages for whoever imports it (an RDMA NIC); call with this context
    /// current.
    pub fn export_dmabuf(&self, start: u64, size: u64) -> CuRes<OwnedFd> {
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

/// A PCI bus id as `cuDeviceGetPCIBusId` writes it (`0000:19:00.0`, or with an 8-digit domain
/// `00000000:19:00.0` as nvidia-smi does) in sysfs form: lower case, the domain cut to 4 hex
/// digits when its extra digits are zeros.
pub fn sysfs_bus_id(raw: &str) -> String {
    let s = raw.trim().to_ascii_lowercase();
    match s.split_once(':') {
        Some((dom, rest)) if dom.len() > 4 && dom[..dom.len() - 4].bytes().all(|b| b == b'0') => {
            format!("{}:{rest}", &dom[dom.len() - 4..])
        }
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        init: CuResult,
        version: Result<i32, CuResult>,
        count: Result<i32, CuResult>,
    }

    impl InitApi for Fake {
        fn init(&self) -> CuResult {
            self.init
        }
        fn version(&self) -> Result<i32, CuResult> {
            self.version
        }
        fn device_count(&self) -> Result<i32, CuResult> {
            self.count
        }
        fn error_name(&self, code: CuResult) -> String {
            format!("E{code}")
        }
    }

    fn fake(init: CuResult, version: i32, count: i32) -> Fake {
        Fake {
            init,
            version: Ok(version),
            count: Ok(count),
        }
    }

    #[test]
    fn probe_reasons() {
        assert_eq!(
            check_init(&fake(0, 12080, 2)),
            Ok(DriverFacts {
                version: 12080,
                devices: 2
            })
        );
        let e = check_init(&fake(CUDA_ERROR_NO_DEVICE, 12080, 0)).unwrap_err();
        assert!(e.starts_with("no CUDA devices"), "{e}");
        let e = check_init(&fake(0, 12080, 0)).unwrap_err();
        assert!(e.starts_with("no CUDA devices"), "{e}");
        let e = check_init(&fake(0, 11040, 1)).unwrap_err();
        assert_eq!(e, "driver too old: CUDA 11.4 driver, 12.0 or newer needed");
        let e = check_init(&fake(CUDA_ERROR_INSUFFICIENT_DRIVER, 0, 0)).unwrap_err();
        assert!(e.starts_with("driver too old"), "{e}");
        let e = check_init(&fake(CUDA_ERROR_STUB_LIBRARY, 0, 0)).unwrap_err();
        assert!(e.contains("stub"), "{e}");
        let e = check_init(&fake(CUDA_ERROR_NOT_INITIALIZED, 0, 0)).unwrap_err();
        assert_eq!(e, "cuInit failed: E3 (3)");
        let e = check_init(&Fake {
            init: 0,
            version: Err(999),
            count: Ok(1),
        })
        .unwrap_err();
        assert!(e.contains("cuDriverGetVersion failed: E999"), "{e}");
        let e = check_init(&Fake {
            init: 0,
            version: Ok(12000),
            count: Err(101),
        })
        .unwrap_err();
        assert!(e.contains("cuDeviceGetCount failed: E101"), "{e}");
    }

    #[test]
    fn missing_library_is_a_reason_not_a_panic() {
        let e = probe_names(&["libnixl-no-such-cuda.so.1"]).unwrap_err();
        assert!(
            e.starts_with("libnixl-no-such-cuda.so.1 not found: "),
            "{e}"
        );
    }

    #[test]
    fn library_without_the_symbols_is_too_old() {
        // libc loads but exports no cuInit: reported as a missing symbol, not a panic.
        let e = probe_names(&["libc.so.6"]).unwrap_err();
        assert!(
            e.starts_with("libc.so.6 lacks cuInit: driver too old"),
            "{e}"
        );
    }

    #[test]
    fn real_probe_on_this_host() {
        match driver() {
            Ok(d) => {
                eprintln!("cuda driver present: {:?}", d.facts());
                assert!(d.device_count() > 0);
            }
            Err(e) => {
                // Without a driver the reason names the library, the cause, and never panics.
                eprintln!("cuda unavailable here: {e}");
                assert!(
                    e.starts_with("libcuda.so.1 not found: ")
                        || e.starts_with("no CUDA devices")
                        || e.starts_with("driver too old")
                        || e.contains("lacks"),
                    "{e}"
                );
                // The result is cached: the same text again.
                assert_eq!(driver().unwrap_err(), e);
            }
        }
    }

    #[test]
    fn every_symbol_is_listed_once() {
        let mut s = SYMBOLS.to_vec();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), SYMBOLS.len());
        assert!(SYMBOLS.contains(&"cuInit"));
        assert!(SYMBOLS.contains(&"cuDeviceGetPCIBusId"));
        // Optional: a driver without it still loads.
        assert!(!SYMBOLS.contains(&"cuMemGetHandleForAddressRange"));
    }

    #[test]
    fn bus_ids_in_sysfs_form() {
        assert_eq!(sysfs_bus_id("0000:19:00.0"), "0000:19:00.0");
        assert_eq!(sysfs_bus_id("00000000:1B:00.0"), "0000:1b:00.0");
        assert_eq!(sysfs_bus_id("00010000:1b:00.0"), "00010000:1b:00.0");
        assert_eq!(sysfs_bus_id(" 0001:AB:00.1\n"), "0001:ab:00.1");
        assert_eq!(sysfs_bus_id("garbage"), "garbage");
    }
}
