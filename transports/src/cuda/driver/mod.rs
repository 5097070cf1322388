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
//! retained primary context, `Arc`'d, released last), [`Stream`], `Event`, `PinnedHost`,
//! `LegacyImport`, `VmmImport`, `DeviceAlloc`. Each child holds an `Arc<DeviceCtx>`, so
//! the context outlives every stream, event and mapping made in it. Nothing panics in `Drop`: a
//! failure there is logged and counted.

//!
//! Files: `sys` (types, constants, C structs, entry-point tables), this file (loading and the
//! probe), `ctx` (contexts), `owned` (`Owned<Kind>`: one object made in a context, released in
//! it on drop, which every wrapper below is), `stream` (streams, events), `mem` (pinned,
//! imported and allocated memory), `gather` (the gather kernel).

#![allow(non_snake_case)]

mod ctx;
mod gather;
mod mem;
mod owned;
mod stream;
mod sys;
#[cfg(test)]
mod tests;

pub use ctx::*;
pub(crate) use gather::*;
pub use mem::*;
use owned::{Kind, Owned};
pub use stream::*;
pub use sys::*;

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use libloading::Library;
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
pub(crate) struct DriverFacts {
    /// `cuDriverGetVersion` (e.g. 12080).
    pub version: i32,
    /// Number of devices.
    pub devices: i32,
}

/// The loaded driver: the library (kept open for the life of the process) and its entry points.
pub(crate) struct Driver {
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
pub(crate) const LIBRARY_NAMES: &[&str] = &["libcuda.so.1"];

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
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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
pub(crate) fn driver() -> Result<&'static Driver, String> {
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

    /// Number of devices.
    pub(crate) fn device_count(&self) -> i32 {
        self.facts.devices
    }

    /// The UUID of device `ordinal` (no context is created).
    pub(crate) fn device_uuid(&self, ordinal: i32) -> CuRes<[u8; 16]> {
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
    pub(crate) fn device_supports_fabric(&self, ordinal: i32) -> bool {
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

/// A PCI bus id as `cuDeviceGetPCIBusId` writes it (`0000:19:00.0`, or with an 8-digit domain
/// `00000000:19:00.0` as nvidia-smi does) in sysfs form: lower case, the domain cut to 4 hex
/// digits when its extra digits are zeros.
pub(crate) fn sysfs_bus_id(raw: &str) -> String {
    let s = raw.trim().to_ascii_lowercase();
    match s.split_once(':') {
        Some((dom, rest)) if dom.len() > 4 && dom[..dom.len() - 4].bytes().all(|b| b == b'0') => {
            format!("{}:{rest}", &dom[dom.len() - 4..])
        }
        _ => s,
    }
}
