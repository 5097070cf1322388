//! Device memory the backend can share: [`VmmBuffer`] (CUDA VMM, exportable as a POSIX fd and,
//! where the device supports it, a fabric handle) and [`LegacyBuffer`] (`cuMemAlloc`, what
//! `cudaMalloc` gives: shared with legacy IPC handles). Plus the process-wide device table.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use nixl_core::{BackendName, Desc, Error, Result, Unusable};
use parking_lot::Mutex;

use super::driver::{
    self, CuError, DeviceAlloc, DeviceCtx, VmmAlloc, HANDLE_FABRIC, HANDLE_POSIX_FD,
};

pub(crate) fn unavailable(reason: impl Into<Unusable>) -> Error {
    Error::Unavailable {
        backend: BackendName::Cuda,
        reason: reason.into(),
    }
}

pub(crate) fn cu_err(op: &'static str, e: CuError) -> Error {
    Error::Backend {
        backend: BackendName::Cuda,
        op,
        reason: e.to_string(),
    }
}

/// The retained primary context of device `ordinal`, shared by everything in the process
/// (retained once, kept for the life of the process, like the CUDA runtime does).
pub fn device(ordinal: i32) -> Result<Arc<DeviceCtx>> {
    static DEVICES: OnceLock<Mutex<HashMap<i32, Arc<DeviceCtx>>>> = OnceLock::new();
    let drv = driver::driver().map_err(unavailable)?;
    let mut m = DEVICES.get_or_init(Default::default).lock();
    if let Some(c) = m.get(&ordinal) {
        return Ok(Arc::clone(c));
    }
    let c = DeviceCtx::open(drv, ordinal).map_err(|e| cu_err("open device", e))?;
    m.insert(ordinal, Arc::clone(&c));
    Ok(c)
}

/// The number of CUDA devices this process sees, or why the CUDA driver cannot be used here
/// (no `libcuda.so.1`, a driver too old, no device): the text the `cuda` backend reports as
/// `unavailable`.
pub fn device_count() -> std::result::Result<i32, Unusable> {
    driver::driver()
        .map(driver::Driver::device_count)
        .map_err(Unusable::Reason)
}

/// Rounds `len` up to a multiple of `granularity` (at least one granule).
pub(super) fn round_up(len: usize, granularity: usize) -> Option<usize> {
    let g = granularity.max(1);
    len.max(1).checked_next_multiple_of(g)
}

/// VRAM from the CUDA VMM API (`cuMemCreate` with `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`,
/// plus FABRIC when asked and supported; rounded to the recommended granularity;
/// `cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess` read-write for the device). Unmapped,
/// unreserved and released, in that order, on drop. Deregister it before dropping it.
#[derive(Debug)]
pub struct VmmBuffer {
    alloc: VmmAlloc,
    len: usize,
    fabric: bool,
}

impl VmmBuffer {
    /// At least `len` bytes on device `dev`; `fabric` asks for fabric handles too (used only if
    /// the device supports them: see [`VmmBuffer::has_fabric`]).
    pub fn new(dev: i32, len: usize, fabric: bool) -> Result<VmmBuffer> {
        let ctx = device(dev)?;
        if !ctx.vmm_supported() {
            return Err(unavailable(format!(
                "device {dev} does not support the CUDA VMM API"
            )));
        }
        if !ctx.posix_fd_supported() {
            return Err(unavailable(format!(
                "device {dev} cannot export POSIX file descriptors"
            )));
        }
        if fabric && ctx.fabric_supported() {
            // Fabric allocations need IMEX channel access; without it cuMemCreate refuses, and
            // an fd-only allocation still serves this node.
            match Self::create(&ctx, len, HANDLE_POSIX_FD | HANDLE_FABRIC) {
                Ok(alloc) => {
                    return Ok(VmmBuffer {
                        alloc,
                        len,
                        fabric: true,
                    })
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cuda: no fabric handles; allocating without")
                }
            }
        }
        let alloc = Self::create(&ctx, len, HANDLE_POSIX_FD)?;
        Ok(VmmBuffer {
            alloc,
            len,
            fabric: false,
        })
    }

    fn create(ctx: &Arc<DeviceCtx>, len: usize, types: u32) -> Result<VmmAlloc> {
        let g = ctx
            .granularity(types)
            .map_err(|e| cu_err("VMM granularity", e))?;
        let size = round_up(len, g)
            .ok_or_else(|| Error::InvalidArgument(format!("VMM buffer of {len} bytes")))?;
        VmmAlloc::new(ctx, size, types).map_err(|e| cu_err("VMM allocation", e))
    }

    /// Device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.alloc.addr()
    }

    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes were asked for.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (rounded to the granularity).
    pub fn capacity(&self) -> usize {
        self.alloc.size()
    }

    /// Whether fabric handles can be exported.
    pub fn has_fabric(&self) -> bool {
        self.fabric
    }

    /// The device ordinal.
    pub fn device(&self) -> i32 {
        self.alloc.ctx().ordinal()
    }

    /// A VRAM descriptor of the asked bytes.
    pub fn desc(&self) -> Desc {
        Desc::new(self.addr(), self.len as u64, self.device() as u64)
    }

    /// Copies `bytes` to offset `off` (synchronously).
    pub fn upload(&self, off: usize, bytes: &[u8]) -> Result<()> {
        check_range(off, bytes.len(), self.alloc.size())?;
        // SAFETY: in bounds of our live allocation.
        unsafe { driver::upload(self.alloc.ctx(), self.addr() + off as u64, bytes) }
            .map_err(|e| cu_err("upload", e))
    }

    /// Copies from offset `off` into `out` (synchronously).
    pub fn download(&self, off: usize, out: &mut [u8]) -> Result<()> {
        check_range(off, out.len(), self.alloc.size())?;
        // SAFETY: in bounds of our live allocation.
        unsafe { driver::download(self.alloc.ctx(), out, self.addr() + off as u64) }
            .map_err(|e| cu_err("download", e))
    }
}

fn check_range(off: usize, len: usize, size: usize) -> Result<()> {
    if off.checked_add(len).is_some_and(|e| e <= size) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "range {off}+{len} outside a buffer of {size} bytes"
        )))
    }
}

/// VRAM from `cuMemAlloc` (the driver-API `cudaMalloc`), shared through legacy IPC handles.
/// Freed on drop; deregister it first.
#[derive(Debug)]
pub struct LegacyBuffer {
    alloc: DeviceAlloc,
    ctx: Arc<DeviceCtx>,
}

impl LegacyBuffer {
    /// `len` bytes on device `dev`.
    pub fn new(dev: i32, len: usize) -> Result<LegacyBuffer> {
        let ctx = device(dev)?;
        let alloc = DeviceAlloc::new(&ctx, len).map_err(|e| cu_err("cuMemAlloc", e))?;
        Ok(LegacyBuffer { alloc, ctx })
    }

    /// Device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.alloc.addr()
    }

    /// Size.
    pub fn len(&self) -> usize {
        self.alloc.size()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.alloc.size() == 0
    }

    /// A VRAM descriptor of the buffer.
    pub fn desc(&self) -> Desc {
        Desc::new(self.addr(), self.len() as u64, self.ctx.ordinal() as u64)
    }

    /// Copies `bytes` to offset `off` (synchronously).
    pub fn upload(&self, off: usize, bytes: &[u8]) -> Result<()> {
        check_range(off, bytes.len(), self.len())?;
        // SAFETY: in bounds of our live allocation.
        unsafe { driver::upload(&self.ctx, self.addr() + off as u64, bytes) }
            .map_err(|e| cu_err("upload", e))
    }

    /// Copies from offset `off` into `out` (synchronously).
    pub fn download(&self, off: usize, out: &mut [u8]) -> Result<()> {
        check_range(off, out.len(), self.len())?;
        // SAFETY: in bounds of our live allocation.
        unsafe { driver::download(&self.ctx, out, self.addr() + off as u64) }
            .map_err(|e| cu_err("download", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, 2 << 20), Some(2 << 20));
        assert_eq!(round_up(1, 2 << 20), Some(2 << 20));
        assert_eq!(round_up(2 << 20, 2 << 20), Some(2 << 20));
        assert_eq!(round_up((2 << 20) + 1, 2 << 20), Some(4 << 20));
        assert_eq!(round_up(7, 0), Some(7));
        assert_eq!(round_up(usize::MAX, 2 << 20), None);
        assert!(check_range(10, 5, 15).is_ok());
        assert!(check_range(10, 6, 15).is_err());
        assert!(check_range(usize::MAX, 2, 15).is_err());
    }

    #[test]
    fn without_a_driver_allocation_is_unavailable() {
        if driver::driver().is_ok() {
            eprintln!("SKIP: without_a_driver_allocation_is_unavailable: a CUDA driver is present");
            return;
        }
        let e = VmmBuffer::new(0, 1 << 20, false).unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e}");
        assert!(e.to_string().contains("libcuda.so.1"), "{e}");
        let e = LegacyBuffer::new(0, 10).unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    }
}
