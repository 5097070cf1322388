//! NVML, loaded at run time, for one thing the CUDA driver API does not tell: a GPU's NVLink
//! domain (multi-node NVLink, GB200 NVL72), i.e. the cluster UUID and clique id its fabric
//! registration yields. Two GPUs with the same pair reach each other's memory through fabric
//! handles, on whichever node they are.
//!
//! Same style as [`super::driver`]: `libnvidia-ml.so.1` is opened once per process, every entry
//! point resolved up front into a table (those that only newer drivers have, as options),
//! `nvmlInit_v2` called once; a missing library, a missing symbol or a failing init is a reason
//! string kept in a `OnceLock` ([`nvml`]), and no code path reaches an NVML call before that
//! probe succeeded. Nothing here panics.
//!
//! # Sources of the declarations
//!
//! Checked against NVIDIA's NVML API reference (docs.nvidia.com/deploy/nvml-api/: "Fabric
//! definitions", `nvmlGpuFabricInfo_t`, `nvmlGpuFabricInfo_v2_t`, `nvmlGpuFabricInfo_v3_t`,
//! `nvmlDeviceGetGpuFabricInfo`, `nvmlDeviceGetGpuFabricInfoV`, `nvmlDeviceGetHandleByUUID`,
//! `nvmlDeviceGetHandleByPciBusId_v2`, `nvmlInit_v2`, `nvmlErrorString`; R550 and R590
//! editions) and the public `nvml.h` copies vendored by NVIDIA's go-nvml
//! (`pkg/nvml/nvml.h`) and nvshmem's `nvml_wrap.h`:
//!
//! ```c
//! #define NVML_GPU_FABRIC_UUID_LEN 16
//! #define NVML_GPU_FABRIC_STATE_NOT_SUPPORTED 0
//! #define NVML_GPU_FABRIC_STATE_NOT_STARTED   1
//! #define NVML_GPU_FABRIC_STATE_IN_PROGRESS   2
//! #define NVML_GPU_FABRIC_STATE_COMPLETED     3
//! typedef unsigned char nvmlGpuFabricState_t;
//! typedef struct {                       // nvmlGpuFabricInfo_t (nvmlDeviceGetGpuFabricInfo)
//!     unsigned char clusterUuid[16]; nvmlReturn_t status; unsigned int cliqueId;
//!     nvmlGpuFabricState_t state;
//! } nvmlGpuFabricInfo_t;                 // 28 bytes
//! typedef struct {                       // v2 (nvmlDeviceGetGpuFabricInfoV)
//!     unsigned int version; unsigned char clusterUuid[16]; nvmlReturn_t status;
//!     unsigned int cliqueId; nvmlGpuFabricState_t state; unsigned int healthMask;
//! } nvmlGpuFabricInfo_v2_t;              // 36 bytes
//! typedef struct { /* v2's fields */ unsigned char healthSummary; } nvmlGpuFabricInfo_v3_t;
//! #define NVML_STRUCT_VERSION(data, ver) \
//!     (unsigned int)(sizeof(nvml ## data ## _v ## ver ## _t) | (ver << 24U))
//! // nvmlGpuFabricInfo_v2 == 0x02000024, nvmlGpuFabricInfo_v3 == 0x03000028
//! ```
//!
//! `status` "must be checked only if state returns complete". A GPU's NVML UUID is the text
//! `GPU-` + the 16 bytes of `cuDeviceGetUuid` as `8-4-4-4-12` lower-case hex.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::sync::OnceLock;

use libloading::Library;

use super::driver::error_chain;
use super::handles::{uuid_str, FabricDomain};

/// `nvmlReturn_t`.
pub(crate) type NvmlReturn = c_int;
type NvmlDevice = *mut c_void;

const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;
const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;

/// `NVML_GPU_FABRIC_STATE_NOT_SUPPORTED`.
pub(crate) const FABRIC_STATE_NOT_SUPPORTED: u8 = 0;
/// `NVML_GPU_FABRIC_STATE_NOT_STARTED`.
pub(crate) const FABRIC_STATE_NOT_STARTED: u8 = 1;
/// `NVML_GPU_FABRIC_STATE_IN_PROGRESS`.
pub(crate) const FABRIC_STATE_IN_PROGRESS: u8 = 2;
/// `NVML_GPU_FABRIC_STATE_COMPLETED`.
pub(crate) const FABRIC_STATE_COMPLETED: u8 = 3;

/// `nvmlGpuFabricInfo_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FabricInfoV1 {
    cluster_uuid: [u8; 16],
    status: NvmlReturn,
    clique_id: c_uint,
    state: u8,
}

/// `nvmlGpuFabricInfo_v3_t`; its first 36 bytes are `nvmlGpuFabricInfo_v2_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FabricInfoV3 {
    version: c_uint,
    cluster_uuid: [u8; 16],
    status: NvmlReturn,
    clique_id: c_uint,
    state: u8,
    health_mask: c_uint,
    health_summary: u8,
}

/// `sizeof(nvmlGpuFabricInfo_v2_t)`: v3 without its last field, padded to 4.
const FABRIC_INFO_V2_SIZE: usize = offset_of!(FabricInfoV3, health_mask) + 4;
/// `nvmlGpuFabricInfo_v2`.
const FABRIC_INFO_V2: c_uint = FABRIC_INFO_V2_SIZE as c_uint | (2 << 24);
/// `nvmlGpuFabricInfo_v3`.
const FABRIC_INFO_V3: c_uint = size_of::<FabricInfoV3>() as c_uint | (3 << 24);

const _: () = {
    assert!(size_of::<FabricInfoV1>() == 28);
    assert!(offset_of!(FabricInfoV1, status) == 16);
    assert!(offset_of!(FabricInfoV1, clique_id) == 20);
    assert!(offset_of!(FabricInfoV1, state) == 24);
    assert!(offset_of!(FabricInfoV3, cluster_uuid) == 4);
    assert!(offset_of!(FabricInfoV3, status) == 20);
    assert!(offset_of!(FabricInfoV3, clique_id) == 24);
    assert!(offset_of!(FabricInfoV3, state) == 28);
    assert!(offset_of!(FabricInfoV3, health_mask) == 32);
    assert!(FABRIC_INFO_V2 == 0x0200_0024);
    assert!(FABRIC_INFO_V3 == 0x0300_0028);
};

type InitFn = unsafe extern "C" fn() -> NvmlReturn;
type ErrorStringFn = unsafe extern "C" fn(NvmlReturn) -> *const c_char;
type HandleByStrFn = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
type FabricInfoVFn = unsafe extern "C" fn(NvmlDevice, *mut FabricInfoV3) -> NvmlReturn;
type FabricInfoFn = unsafe extern "C" fn(NvmlDevice, *mut FabricInfoV1) -> NvmlReturn;

/// The entry points used, resolved once.
struct Api {
    init: InitFn,
    error_string: ErrorStringFn,
    by_uuid: HandleByStrFn,
    by_pci: HandleByStrFn,
    /// `nvmlDeviceGetGpuFabricInfoV` (R550 and newer).
    fabric_v: Option<FabricInfoVFn>,
    /// `nvmlDeviceGetGpuFabricInfo` (older drivers; deprecated in newer ones).
    fabric_v1: Option<FabricInfoFn>,
}

impl Api {
    /// Resolves the table.
    ///
    /// # Safety
    /// `lib` must be NVML (its exports have the C signatures of `nvml.h` declared above) and
    /// must outlive the returned pointers.
    unsafe fn load(lib: &Library, name: &str) -> Result<Api, String> {
        let missing = |sym: &str, e: libloading::Error| {
            format!("{name} lacks {sym}: NVML too old ({})", error_chain(&e))
        };
        // SAFETY: per the contract, each symbol has the declared signature.
        let init = *unsafe { lib.get::<InitFn>(b"nvmlInit_v2\0") }
            .map_err(|e| missing("nvmlInit_v2", e))?;
        // SAFETY: as above.
        let error_string = *unsafe { lib.get::<ErrorStringFn>(b"nvmlErrorString\0") }
            .map_err(|e| missing("nvmlErrorString", e))?;
        // SAFETY: as above.
        let by_uuid = *unsafe { lib.get::<HandleByStrFn>(b"nvmlDeviceGetHandleByUUID\0") }
            .map_err(|e| missing("nvmlDeviceGetHandleByUUID", e))?;
        // SAFETY: as above.
        let by_pci = *unsafe { lib.get::<HandleByStrFn>(b"nvmlDeviceGetHandleByPciBusId_v2\0") }
            .map_err(|e| missing("nvmlDeviceGetHandleByPciBusId_v2", e))?;
        // SAFETY: as above; optional symbols.
        let fabric_v = unsafe { lib.get::<FabricInfoVFn>(b"nvmlDeviceGetGpuFabricInfoV\0") }
            .ok()
            .map(|s| *s);
        // SAFETY: as above.
        let fabric_v1 = unsafe { lib.get::<FabricInfoFn>(b"nvmlDeviceGetGpuFabricInfo\0") }
            .ok()
            .map(|s| *s);
        Ok(Api {
            init,
            error_string,
            by_uuid,
            by_pci,
            fabric_v,
            fabric_v1,
        })
    }
}

/// What `nvmlInit_v2` returning `r` means: `Ok` or the reason NVML is unavailable.
pub(crate) fn init_reason(r: NvmlReturn, name: &str) -> Result<(), String> {
    match r {
        NVML_SUCCESS => Ok(()),
        9 => Err(format!(
            "nvmlInit_v2 failed: {name} ({r}): the NVIDIA kernel driver is not loaded"
        )),
        18 => Err(format!(
            "nvmlInit_v2 failed: {name} ({r}): libnvidia-ml and the kernel driver differ in \
             version (driver upgraded without a reboot?)"
        )),
        4 => Err(format!(
            "nvmlInit_v2 failed: {name} ({r}): no permission on the NVIDIA device files"
        )),
        _ => Err(format!("nvmlInit_v2 failed: {name} ({r})")),
    }
}

/// A GPU's fabric information as NVML reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FabricInfo {
    /// `clusterUuid`.
    pub cluster_uuid: [u8; 16],
    /// `cliqueId`.
    pub clique_id: u32,
    /// `state` (`NVML_GPU_FABRIC_STATE_*`).
    pub state: u8,
    /// `status` (an `nvmlReturn_t`; meaningful once `state` is COMPLETED).
    pub status: NvmlReturn,
}

impl FabricInfo {
    /// The NVLink domain, when the registration completed successfully into a cluster; otherwise
    /// why not (`status_name` names an `nvmlReturn_t`).
    pub(crate) fn domain(
        &self,
        status_name: &dyn Fn(NvmlReturn) -> String,
    ) -> Result<FabricDomain, String> {
        match self.state {
            FABRIC_STATE_COMPLETED => {}
            FABRIC_STATE_NOT_SUPPORTED => {
                return Err("the GPU is not part of a multi-node NVLink fabric \
                            (NVML fabric state NOT_SUPPORTED)"
                    .into())
            }
            FABRIC_STATE_NOT_STARTED => {
                return Err(
                    "the GPU's fabric registration has not started (NVML fabric state \
                            NOT_STARTED: is the fabric manager / IMEX running?)"
                        .into(),
                )
            }
            FABRIC_STATE_IN_PROGRESS => {
                return Err(
                    "the GPU's fabric registration is in progress (NVML fabric state \
                            IN_PROGRESS); restart the agent once it completed"
                        .into(),
                )
            }
            s => return Err(format!("unknown NVML fabric state {s}")),
        }
        if self.status != NVML_SUCCESS {
            return Err(format!(
                "the GPU's fabric registration failed: {} ({})",
                status_name(self.status),
                self.status
            ));
        }
        if self.cluster_uuid == [0; 16] {
            return Err("NVML reports the fabric registration complete but no cluster UUID".into());
        }
        Ok(FabricDomain {
            cluster_uuid: self.cluster_uuid,
            clique_id: self.clique_id,
        })
    }
}

/// NVML, loaded and initialised.
pub struct Nvml {
    api: Api,
    _lib: Library,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvml")
            .field("fabric_info_v", &self.api.fabric_v.is_some())
            .field("fabric_info", &self.api.fabric_v1.is_some())
            .finish_non_exhaustive()
    }
}

/// The library names tried, in order (`libnvidia-ml.so` without a version is the toolkit's
/// link-time stub).
pub(crate) const LIBRARY_NAMES: &[&str] = &["libnvidia-ml.so.1"];

/// Opens NVML from the first of `names` that loads and initialises it; the error names each
/// library tried and why. For tests that pass names of their own.
pub(crate) fn probe_names(names: &[&str]) -> Result<Nvml, String> {
    let mut why = Vec::new();
    for name in names {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions we could
        // violate; nothing is called before the table is resolved.
        let lib = match unsafe { Library::new(*name) } {
            Ok(l) => l,
            Err(e) => {
                why.push(format!("{name} not found: {}", error_chain(&e)));
                continue;
            }
        };
        // SAFETY: `lib` is NVML and lives in the returned `Nvml` as long as the pointers.
        let api = unsafe { Api::load(&lib, name) }?;
        // SAFETY: nvmlInit_v2 takes no argument; it may be called more than once (reference
        // counted) and from any thread.
        let r = unsafe { (api.init)() };
        let nv = Nvml { api, _lib: lib };
        init_reason(r, &nv.error_name(r))?;
        return Ok(nv);
    }
    Err(why.join("; "))
}

/// NVML, loaded and initialised once per process (never shut down: other users in the process
/// may share it); `Err` is the reason it is unavailable here.
pub fn nvml() -> Result<&'static Nvml, String> {
    static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| probe_names(LIBRARY_NAMES))
        .as_ref()
        .map_err(Clone::clone)
}

impl Nvml {
    /// The name of an `nvmlReturn_t`.
    pub(crate) fn error_name(&self, r: NvmlReturn) -> String {
        // SAFETY: nvmlErrorString accepts any code and returns a static string (or NULL).
        let p = unsafe { (self.api.error_string)(r) };
        if p.is_null() {
            return format!("NVML error {r}");
        }
        // SAFETY: non-NULL: a NUL-terminated static string owned by NVML.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn handle(&self, f: HandleByStrFn, key: &str, what: &str) -> Result<NvmlDevice, String> {
        let c = CString::new(key).map_err(|_| format!("{what} {key:?} contains a NUL"))?;
        let mut dev: NvmlDevice = std::ptr::null_mut();
        // SAFETY: `c` is a NUL-terminated string alive for the call; writes one handle.
        let r = unsafe { f(c.as_ptr(), &mut dev) };
        if r != NVML_SUCCESS || dev.is_null() {
            return Err(format!(
                "NVML has no device with {what} {key}: {} ({r})",
                self.error_name(r)
            ));
        }
        Ok(dev)
    }

    fn fabric_info(&self, dev: NvmlDevice) -> Result<FabricInfo, String> {
        if let Some(f) = self.api.fabric_v {
            let mut last = NVML_SUCCESS;
            for version in [FABRIC_INFO_V2, FABRIC_INFO_V3] {
                // The buffer is v3-sized, so a driver writing v2 or v3 stays inside it.
                let mut info = FabricInfoV3 {
                    version,
                    ..FabricInfoV3::default()
                };
                // SAFETY: `dev` came from NVML; the driver writes at most the size the version
                // announces (<= size_of::<FabricInfoV3>()).
                let r = unsafe { f(dev, &mut info) };
                if r == NVML_SUCCESS {
                    return Ok(FabricInfo {
                        cluster_uuid: info.cluster_uuid,
                        clique_id: info.clique_id,
                        state: info.state,
                        status: info.status,
                    });
                }
                last = r;
                if r != NVML_ERROR_ARGUMENT_VERSION_MISMATCH {
                    break;
                }
            }
            if last != NVML_ERROR_FUNCTION_NOT_FOUND || self.api.fabric_v1.is_none() {
                return Err(self.fabric_call_error("nvmlDeviceGetGpuFabricInfoV", last));
            }
        }
        let Some(f) = self.api.fabric_v1 else {
            return Err(
                "this NVML lacks nvmlDeviceGetGpuFabricInfo(V): the driver predates \
                        multi-node NVLink"
                    .into(),
            );
        };
        let mut info = FabricInfoV1::default();
        // SAFETY: `dev` came from NVML; writes one nvmlGpuFabricInfo_t.
        let r = unsafe { f(dev, &mut info) };
        if r != NVML_SUCCESS {
            return Err(self.fabric_call_error("nvmlDeviceGetGpuFabricInfo", r));
        }
        Ok(FabricInfo {
            cluster_uuid: info.cluster_uuid,
            clique_id: info.clique_id,
            state: info.state,
            status: info.status,
        })
    }

    fn fabric_call_error(&self, op: &str, r: NvmlReturn) -> String {
        if r == NVML_ERROR_NOT_SUPPORTED {
            format!("the GPU reports no fabric information ({op}: Not Supported)")
        } else {
            format!("{op} failed: {} ({r})", self.error_name(r))
        }
    }

    /// The fabric information of the GPU with CUDA UUID `uuid` (looked up by `GPU-<uuid>`, then
    /// by `pci_bus_id` where given).
    pub(crate) fn fabric_of(
        &self,
        uuid: &[u8; 16],
        pci_bus_id: Option<&str>,
    ) -> Result<FabricInfo, String> {
        let by_uuid = self.handle(self.api.by_uuid, &format!("GPU-{}", uuid_str(uuid)), "UUID");
        let dev = match (by_uuid, pci_bus_id) {
            (Ok(d), _) => d,
            (Err(_), Some(pci)) => self.handle(self.api.by_pci, pci, "PCI bus id")?,
            (Err(e), None) => return Err(e),
        };
        self.fabric_info(dev)
    }

    /// The NVLink domain of the GPU with CUDA UUID `uuid`, or why it has none.
    pub fn domain_of(&self, uuid: &[u8; 16]) -> Result<FabricDomain, String> {
        self.fabric_of(uuid, None)?.domain(&|r| self.error_name(r))
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA device UUIDs without a context.

/// The UUIDs of the CUDA devices this process sees, by ordinal, read with `cuDeviceGet` and
/// `cuDeviceGetUuid_v2` (no context is created: retaining a primary context on every visible
/// GPU would cost each of them memory), through the driver's table (`driver::driver`).
pub fn cuda_device_uuids() -> Result<Vec<[u8; 16]>, nixl_core::Unusable> {
    let drv = super::driver::driver().map_err(nixl_core::Unusable::Reason)?;
    (0..drv.device_count())
        .map(|ordinal| {
            drv.device_uuid(ordinal)
                .map_err(nixl_core::Unusable::from_error)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_a_reason() {
        let e = probe_names(&["libnvidia-ml-test-missing.so.1"]).unwrap_err();
        assert!(
            e.starts_with("libnvidia-ml-test-missing.so.1 not found: "),
            "{e}"
        );
        let e = probe_names(&["libnixl-nope-a.so", "libnixl-nope-b.so"]).unwrap_err();
        assert!(
            e.contains("libnixl-nope-a.so not found")
                && e.contains("; libnixl-nope-b.so not found"),
            "{e}"
        );
        // A library without NVML's symbols: the first missing one is named.
        let e = probe_names(&["libc.so.6"]).unwrap_err();
        assert!(e.contains("libc.so.6 lacks nvmlInit_v2"), "{e}");
        // The process-wide probe here: either NVML works or it says why, never panics.
        match nvml() {
            Ok(n) => eprintln!("NVML present: {n:?}"),
            Err(e) => assert!(
                e.contains("libnvidia-ml.so.1") || e.contains("nvmlInit"),
                "{e}"
            ),
        }
    }

    #[test]
    fn init_results() {
        assert!(init_reason(0, "Success").is_ok());
        let e = init_reason(9, "Driver Not Loaded").unwrap_err();
        assert!(e.contains("kernel driver is not loaded"), "{e}");
        let e = init_reason(18, "RM has detected an NVML/RM version mismatch").unwrap_err();
        assert!(e.contains("differ in version"), "{e}");
        let e = init_reason(999, "Unknown Error").unwrap_err();
        assert_eq!(e, "nvmlInit_v2 failed: Unknown Error (999)");
    }

    #[test]
    fn fabric_states_and_statuses() {
        let name = |r: NvmlReturn| format!("code{r}");
        let ok = FabricInfo {
            cluster_uuid: [5; 16],
            clique_id: 32766,
            state: FABRIC_STATE_COMPLETED,
            status: 0,
        };
        assert_eq!(
            ok.domain(&name),
            Ok(FabricDomain {
                cluster_uuid: [5; 16],
                clique_id: 32766
            })
        );
        for (state, piece) in [
            (FABRIC_STATE_NOT_SUPPORTED, "NOT_SUPPORTED"),
            (FABRIC_STATE_NOT_STARTED, "NOT_STARTED"),
            (FABRIC_STATE_IN_PROGRESS, "IN_PROGRESS"),
            (9, "unknown NVML fabric state 9"),
        ] {
            let e = FabricInfo { state, ..ok }.domain(&name).unwrap_err();
            assert!(e.contains(piece), "{state}: {e}");
        }
        // A failed registration, and a completed one without a cluster.
        let e = FabricInfo { status: 3, ..ok }.domain(&name).unwrap_err();
        assert!(e.contains("registration failed: code3 (3)"), "{e}");
        let e = FabricInfo {
            cluster_uuid: [0; 16],
            ..ok
        }
        .domain(&name)
        .unwrap_err();
        assert!(e.contains("no cluster UUID"), "{e}");
        // Status is ignored until the state is COMPLETED.
        let e = FabricInfo {
            state: FABRIC_STATE_IN_PROGRESS,
            status: 3,
            ..ok
        }
        .domain(&name)
        .unwrap_err();
        assert!(e.contains("IN_PROGRESS"), "{e}");
    }

    #[test]
    fn uuids_without_a_driver_say_why() {
        match cuda_device_uuids() {
            Ok(v) => eprintln!("CUDA devices: {}", v.len()),
            Err(e) => assert!(e.to_string().contains("libcuda.so.1"), "{e}"),
        }
    }
}
