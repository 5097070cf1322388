//! Device memory as a dmabuf, for backends that hand VRAM to another device driver (the `rdma`
//! backend registers it with `ibv_reg_dmabuf_mr`: GPUDirect RDMA without `nvidia-peermem`).
//!
//! `cuMemGetHandleForAddressRange` exports a range whose start and size are aligned to the host
//! page size, so [`export`] exports the aligned superset of the caller's range and says where
//! the caller's bytes start in it ([`DmabufRange::offset`]); the importer registers exactly the
//! caller's bytes (`offset`, `len`) at the caller's virtual address (`iova`), so a peer's
//! remote addresses stay the registering process's device addresses and nothing outside the
//! range is exposed.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nixl_core::{Desc, Error, Result};

use super::alloc::{cu_err, device, unavailable};
use super::driver::{self, DeviceCtx};

/// Where a range lies in its page-aligned superset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Start of the superset (the range's start rounded down to a page).
    pub start: u64,
    /// Size of the superset (a multiple of the page size).
    pub size: u64,
    /// The range's start within the superset.
    pub offset: u64,
}

/// The page-aligned superset of `[addr, addr + len)` for pages of `page` bytes (a power of
/// two); `None` for an empty range, a bad page size, or a range that overflows.
pub(crate) fn layout(addr: u64, len: u64, page: u64) -> Option<Layout> {
    if len == 0 || !page.is_power_of_two() {
        return None;
    }
    let end = addr.checked_add(len)?.checked_next_multiple_of(page)?;
    let start = addr & !(page - 1);
    Some(Layout {
        start,
        size: end - start,
        offset: addr - start,
    })
}

/// The host page size.
pub(crate) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// A dmabuf of device memory and where the caller's range lies in it.
#[derive(Debug)]
pub(crate) struct DmabufRange {
    /// The dmabuf (of the page-aligned superset). Close it once imported: the importer holds
    /// its own reference.
    pub fd: OwnedFd,
    /// The caller's first byte within the dmabuf.
    pub offset: u64,
    /// The caller's length.
    pub len: u64,
    /// The caller's device virtual address (the address to register the bytes at).
    pub iova: u64,
}

/// VRAM checked with the driver: device memory of one device, within one allocation.
#[derive(Debug)]
pub(crate) struct Vram {
    /// The device ordinal.
    pub ordinal: i32,
    /// The device's PCI bus id in sysfs form (`0000:19:00.0`), for choosing nearby devices.
    pub pci_bus_id: String,
    ctx: Arc<DeviceCtx>,
}

impl Vram {
    /// The device's context (for flushing GPUDirect RDMA writes before a notification).
    pub(crate) fn ctx(&self) -> &Arc<DeviceCtx> {
        &self.ctx
    }
}

/// Checks VRAM `desc` (`dev_id` = the device ordinal): device memory of that device, within
/// one allocation. Without a CUDA driver, `Unavailable` (backend `cuda`) with the driver's
/// reason; memory that is not so, `InvalidArgument`.
pub(crate) fn locate(desc: &Desc) -> Result<Vram> {
    driver::driver().map_err(unavailable)?;
    let ordinal = i32::try_from(desc.dev_id).map_err(|_| {
        Error::InvalidArgument(format!("VRAM {desc:?}: dev_id is not a device ordinal"))
    })?;
    if desc.len == 0 || desc.addr.checked_add(desc.len).is_none() {
        return Err(Error::InvalidArgument(format!(
            "VRAM {desc:?}: empty or overflowing range"
        )));
    }
    let ctx = device(ordinal)?;
    let pci_bus_id = ctx.pci_bus_id().map_err(|e| cu_err("PCI bus id", e))?;
    let a = {
        let _g = ctx.enter().map_err(|e| cu_err("locate VRAM", e))?;
        ctx.query_allocation(desc.addr)
            .map_err(|e| cu_err("locate VRAM", e))?
    };
    if !a.device_memory || a.ordinal != ordinal {
        return Err(Error::InvalidArgument(format!(
            "VRAM {desc:?} is not device memory of device {ordinal} (the driver says: device \
             memory {}, device {})",
            a.device_memory, a.ordinal
        )));
    }
    let end = desc.addr.saturating_add(desc.len);
    if desc.addr < a.base || end > a.base.saturating_add(a.size) {
        return Err(Error::InvalidArgument(format!(
            "VRAM {desc:?} spans more than its allocation {:#x}+{}: register each allocation \
             separately for rdma",
            a.base, a.size
        )));
    }
    Ok(Vram {
        ordinal,
        pci_bus_id,
        ctx,
    })
}

impl Vram {
    /// Exports `desc` (the range [`locate`] checked) as a dmabuf of its page-aligned superset.
    /// A driver without dmabuf export or a device without dmabuf support is `Unavailable`
    /// (backend `cuda`) with the reason.
    pub(crate) fn export(&self, desc: &Desc) -> Result<DmabufRange> {
        self.ctx.driver().dmabuf_export().map_err(unavailable)?;
        if !self.ctx.dmabuf_supported() {
            return Err(unavailable(format!(
                "device {} cannot export dmabuf (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0: it \
                 needs the NVIDIA open kernel modules and a kernel with dmabuf support)",
                self.ordinal
            )));
        }
        let lay = layout(desc.addr, desc.len, host_page_size()).ok_or_else(|| {
            Error::InvalidArgument(format!("VRAM {desc:?}: empty or overflowing range"))
        })?;
        let fd = {
            let _g = self.ctx.enter().map_err(|e| cu_err("dmabuf export", e))?;
            // VMM memory made without gpuDirectRDMACapable (PyTorch's expandable segments on
            // some versions) exports, but NICs then fail or read garbage: refuse it here.
            if let Ok(false) = self.ctx.gdr_capable(desc.addr) {
                return Err(Error::InvalidArgument(format!(
                    "VRAM {desc:?} is not GPUDirect RDMA capable (a VMM allocation made without \
                     CUmemAllocationProp.allocFlags.gpuDirectRDMACapable): allocate it with that \
                     flag (nixl's VmmBuffer does where the device supports it), or let rdma \
                     carry it staged through host memory"
                )));
            }
            self.ctx
                .export_dmabuf(lay.start, lay.size)
                .map_err(|e| cu_err("dmabuf export", e))?
        };
        Ok(DmabufRange {
            fd,
            offset: lay.offset,
            len: desc.len,
            iova: desc.addr,
        })
    }
}

/// [`locate`] then [`Vram::export`].
#[cfg(test)]
pub(crate) fn export(desc: &Desc) -> Result<DmabufRange> {
    locate(desc)?.export(desc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_superset_and_offset() {
        let p = 4096;
        // Aligned already.
        assert_eq!(
            layout(0x7f00_0000_0000, 8192, p),
            Some(Layout {
                start: 0x7f00_0000_0000,
                size: 8192,
                offset: 0
            })
        );
        // Unaligned start and end: one page more on each side.
        let l = layout(0x7f00_0000_1234, 10_000, p).unwrap();
        assert_eq!(l.start, 0x7f00_0000_1000);
        assert_eq!(l.offset, 0x234);
        assert_eq!(l.size % p, 0);
        assert!(l.start + l.size >= 0x7f00_0000_1234 + 10_000);
        assert!(l.start + l.size - (0x7f00_0000_1234 + 10_000) < p);
        assert_eq!(l.size, 3 * 4096);
        // One byte in the middle of a page.
        assert_eq!(
            layout(0x2001, 1, p),
            Some(Layout {
                start: 0x2000,
                size: 4096,
                offset: 1
            })
        );
        // 64 KiB pages (aarch64).
        let l = layout(0x1_0000_8000, 0x1_0000, 1 << 16).unwrap();
        assert_eq!(
            (l.start, l.size, l.offset),
            (0x1_0000_0000, 0x2_0000, 0x8000)
        );
        // Refused: empty, bad page size, overflow.
        assert_eq!(layout(0x1000, 0, p), None);
        assert_eq!(layout(0x1000, 1, 3000), None);
        assert_eq!(layout(u64::MAX - 10, 100, p), None);
        assert_eq!(layout(u64::MAX - 4094, 1, p), None, "end rounds past u64");
        assert!(host_page_size().is_power_of_two());
    }

    /// The caller's bytes, registered at (offset, len, iova = addr), map every remote address
    /// `addr + k` to dmabuf byte `offset + k`, which is device address `start + offset + k`.
    #[test]
    fn iova_addresses_the_callers_bytes_exactly() {
        for (addr, len) in [
            (0x1000u64, 1u64),
            (0x1fff, 2),
            (0x12345, 99_999),
            (0x5000, 4096),
        ] {
            let l = layout(addr, len, 4096).unwrap();
            for k in [0, len / 2, len - 1] {
                let dmabuf_byte = l.offset + k;
                assert!(dmabuf_byte < l.size);
                assert_eq!(l.start + dmabuf_byte, addr + k);
            }
        }
    }

    #[test]
    fn export_without_a_driver_says_why() {
        match driver::driver() {
            Err(why) => {
                let e = export(&Desc::new(0x1000, 4096, 0)).unwrap_err();
                assert_eq!(e.class(), nixl_core::ErrorClass::Unavailable, "{e}");
                assert!(e.to_string().contains(&why), "{e}");
            }
            Ok(_) => eprintln!("SKIP: export_without_a_driver_says_why: a CUDA driver is present"),
        }
    }
}
