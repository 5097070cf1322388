//! VRAM regions: the CUDA driver (loaded at run time by the `cuda` backend of
//! `nixl-transports`; a host without it gets `unsupported: <reason>`), host staging, and the
//! planning of device address ranges for restores at the recorded addresses.
//!
//! **Moving the bytes.** A VRAM region is staged through host memory: on save, copied from the
//! device into a host mapping of its size (registered with the agent as DRAM), which is then
//! written like any DRAM region (checksums are computed on the host copy); on restore, read and
//! verified in a host mapping, then copied to the device. The manifest records the region as
//! VRAM with its device ordinal and device address. (A direct `gds` path, VRAM<->FILE without
//! the host copy, is not built.)
//!
//! **At the recorded addresses.** [`restore_mapped`](crate::restore_mapped) with
//! [`Placement::Recorded`](crate::Placement::Recorded) maps fresh device memory (VMM:
//! `cuMemCreate`, `cuMemAddressReserve` at the recorded address, `cuMemMap`, `cuMemSetAccess`)
//! over the granularity-aligned span of each region ([`vmm_span`]; regions sharing granules
//! share one mapping, [`merge_spans`]), failing with the region's name when the range is taken
//! or the recorded device is not there.

use std::io;
use std::sync::Arc;

use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, Registration};
use nixl_transports::cuda::driver::{self, CuError, DeviceCtx, VmmAlloc, HANDLE_POSIX_FD};

use crate::dir::Region;
use crate::error::{CkptError, Result};
use crate::mapped::{map, Mapping};

/// The device address span `[start, end)` covering `addr..addr + len`, with both ends on a
/// multiple of `granularity` (what `cuMemAddressReserve` and `cuMemMap` need).
pub fn vmm_span(addr: u64, len: u64, granularity: u64) -> Result<(u64, u64)> {
    if granularity == 0 || !granularity.is_power_of_two() {
        return Err(CkptError::InvalidArgument(format!(
            "VMM granularity {granularity} is not a power of two"
        )));
    }
    if len == 0 {
        return Err(CkptError::InvalidArgument(format!(
            "empty region at {addr:#x}"
        )));
    }
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(granularity))
        .ok_or_else(|| {
            CkptError::Manifest(format!("region {addr:#x}+{len} wraps the address space"))
        })?;
    if addr == 0 {
        return Err(CkptError::Manifest(
            "a region recorded at address 0 cannot be restored in place".into(),
        ));
    }
    Ok((addr - addr % granularity, end))
}

/// Sorts `(start, end, name)` spans and merges those that overlap or touch; a merged span
/// names every region in it.
pub fn merge_spans(mut spans: Vec<(u64, u64, String)>) -> Vec<(u64, u64, String)> {
    spans.sort();
    let mut merged: Vec<(u64, u64, String)> = Vec::new();
    for s in spans {
        match merged.last_mut() {
            Some(last) if s.0 <= last.1 => {
                last.1 = last.1.max(s.1);
                last.2 = format!("{}, {:?}", last.2, s.2);
            }
            _ => merged.push((s.0, s.1, format!("{:?}", s.2))),
        }
    }
    merged
}

fn cuda_err(context: String, op: &'static str, e: CuError) -> CkptError {
    CkptError::agent(
        context,
        nixl_core::Error::Backend {
            backend: BackendName::Cuda,
            op,
            reason: e.to_string(),
        },
    )
}

/// The context of device `dev_id` for region `name`, or why VRAM cannot be reached here (no
/// driver, no such device).
pub(crate) fn device(name: &str, dev_id: u64) -> Result<Arc<DeviceCtx>> {
    let drv = driver::driver().map_err(|reason| {
        CkptError::Unsupported(format!(
            "region {name:?} is VRAM and the CUDA driver is unavailable: {reason}"
        ))
    })?;
    let count = drv.device_count();
    let ord = i32::try_from(dev_id)
        .ok()
        .filter(|&d| d >= 0 && d < count)
        .ok_or_else(|| CkptError::Mismatch {
            region: name.to_owned(),
            reason: format!(
                "it is on GPU {dev_id}, and this process sees {count} GPU(s) (the device \
                     differs: restore with CUDA_VISIBLE_DEVICES naming it, or into memory of a \
                     device that is here)"
            ),
        })?;
    nixl_transports::cuda::device(ord).map_err(|e| CkptError::agent(format!("region {name:?}"), e))
}

/// Host copies of the VRAM regions of a save or restore, registered with the agent as DRAM.
pub(crate) struct HostStage {
    /// The regions as the file transfers see them: each VRAM one replaced by its host copy.
    pub regions: Vec<Region>,
    reg: Option<Registration>,
    maps: Vec<Mapping>,
    ctxs: Vec<Option<Arc<DeviceCtx>>>,
}

impl HostStage {
    /// Stages `regions` (`None` when none is VRAM).
    pub fn new(agent: &Agent, regions: &[Region]) -> Result<Option<HostStage>> {
        if regions.iter().all(|r| r.kind != MemKind::Vram) {
            return Ok(None);
        }
        let mut st = HostStage {
            regions: Vec::with_capacity(regions.len()),
            reg: None,
            maps: Vec::new(),
            ctxs: Vec::new(),
        };
        let mut descs = Vec::new();
        for r in regions {
            if r.kind != MemKind::Vram {
                st.regions.push(r.clone());
                st.ctxs.push(None);
                continue;
            }
            st.ctxs.push(Some(device(&r.name, r.dev_id)?));
            let mp = map(
                None,
                r.len,
                &format!("host copy of VRAM region {:?}", r.name),
            )?;
            st.regions
                .push(Region::dram(r.name.clone(), mp.addr as u64, r.len));
            descs.push(Desc::new(mp.addr as u64, r.len, 0));
            st.maps.push(mp);
        }
        let list = DescList::from_descs(MemKind::Dram, descs)
            .map_err(|e| CkptError::agent("host copies of VRAM regions", e))?;
        // SAFETY: the mappings are owned by `st`, whose Drop deregisters before unmapping.
        st.reg = Some(
            unsafe { agent.register(&list) }
                .map_err(|e| CkptError::agent("register host copies of VRAM regions", e))?,
        );
        Ok(Some(st))
    }

    /// Copies each VRAM region of `orig` (the regions `new` was given) into its host copy.
    ///
    /// # Safety
    /// Every VRAM region of `orig` must be readable device memory of this process.
    pub unsafe fn download(&self, orig: &[Region]) -> Result<()> {
        for ((o, h), ctx) in orig.iter().zip(&self.regions).zip(&self.ctxs) {
            let Some(ctx) = ctx else { continue };
            // SAFETY: `h` is our host mapping of `o.len` bytes, and no reference to it is held
            // elsewhere; the device range is readable per the contract.
            let r = unsafe {
                let dst =
                    std::slice::from_raw_parts_mut(h.addr as usize as *mut u8, o.len as usize);
                driver::download(ctx, dst, o.addr)
            };
            r.map_err(|e| {
                cuda_err(
                    format!("copy VRAM region {:?} to host", o.name),
                    "download",
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Copies each host copy to its VRAM region of `orig`.
    ///
    /// # Safety
    /// Every VRAM region of `orig` must be writable device memory of this process.
    pub unsafe fn upload(&self, orig: &[Region]) -> Result<()> {
        for ((o, h), ctx) in orig.iter().zip(&self.regions).zip(&self.ctxs) {
            let Some(ctx) = ctx else { continue };
            // SAFETY: `h` is our host mapping of `o.len` bytes, written and verified by the
            // restore and not referenced elsewhere; the device range is writable per the
            // contract.
            let r = unsafe {
                let src = std::slice::from_raw_parts(h.addr as usize as *const u8, o.len as usize);
                driver::upload(ctx, o.addr, src)
            };
            r.map_err(|e| CkptError::Corrupt {
                region: o.name.clone(),
                chunk: None,
                reason: format!("copying the verified host copy to the device failed: {e}"),
                memory_written: true,
            })?;
        }
        Ok(())
    }
}

impl Drop for HostStage {
    fn drop(&mut self) {
        // Deregistration first: it waits for transfers that still use the memory.
        drop(self.reg.take());
        for m in self.maps.drain(..) {
            // SAFETY: the mapping was made by `map`, and nothing registered refers to it now.
            if unsafe { libc::munmap(m.addr as *mut libc::c_void, m.len) } != 0 {
                tracing::error!(
                    addr = m.addr,
                    "munmap failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// Fresh device memory (VMM) for `len` bytes on `ctx`'s device: at `at` exactly (a span from
/// [`vmm_span`]) or anywhere.
pub(crate) fn vmm_alloc(
    ctx: &Arc<DeviceCtx>,
    at: Option<(u64, u64)>,
    len: u64,
    what: &str,
) -> Result<VmmAlloc> {
    if !ctx.vmm_supported() || !ctx.posix_fd_supported() {
        return Err(CkptError::Unsupported(format!(
            "{what}: GPU {} does not support the CUDA VMM API with POSIX fd handles",
            ctx.ordinal()
        )));
    }
    let g = ctx
        .granularity(HANDLE_POSIX_FD)
        .map_err(|e| cuda_err(what.into(), "VMM granularity", e))? as u64;
    match at {
        Some((start, end)) => {
            if start % g != 0 || end % g != 0 {
                return Err(CkptError::InvalidArgument(format!(
                    "{what}: span {start:#x}..{end:#x} is not aligned to the granularity {g}"
                )));
            }
            let size = usize::try_from(end - start)
                .map_err(|_| CkptError::InvalidArgument(format!("{what}: span too large")))?;
            VmmAlloc::new_at(ctx, size, HANDLE_POSIX_FD, start).map_err(|e| {
                CkptError::InvalidArgument(format!(
                    "{what}: cannot map VRAM at the recorded range {start:#x}..{end:#x} on GPU \
                     {}: {e} (restore it anywhere, or earlier in the process's life)",
                    ctx.ordinal()
                ))
            })
        }
        None => {
            let size = len
                .checked_next_multiple_of(g)
                .and_then(|s| usize::try_from(s).ok())
                .ok_or_else(|| CkptError::InvalidArgument(format!("{what}: {len} bytes")))?;
            VmmAlloc::new(ctx, size, HANDLE_POSIX_FD)
                .map_err(|e| cuda_err(what.into(), "VMM allocation", e))
        }
    }
}

/// The VMM granularity of `ctx`'s device.
pub(crate) fn granularity(ctx: &Arc<DeviceCtx>, what: &str) -> Result<u64> {
    ctx.granularity(HANDLE_POSIX_FD)
        .map(|g| g as u64)
        .map_err(|e| cuda_err(what.into(), "VMM granularity", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_region_on_granule_boundaries() {
        let g = 2 << 20;
        assert_eq!(
            vmm_span(0x7f00_0000_0000, 1, g).unwrap(),
            (0x7f00_0000_0000, 0x7f00_0020_0000)
        );
        let a = 0x7f00_0010_0000;
        let (s, e) = vmm_span(a, 3 << 20, g).unwrap();
        assert_eq!((s, e), (0x7f00_0000_0000, 0x7f00_0040_0000));
        assert!(s <= a && e >= a + (3 << 20) && s % g == 0 && e % g == 0);
        assert!(vmm_span(u64::MAX - 10, 100, g).is_err());
        assert!(
            vmm_span(u64::MAX - (1 << 20), 1, g).is_err(),
            "end rounds past 2^64"
        );
        assert!(vmm_span(0, 10, g).is_err());
        assert!(vmm_span(a, 0, g).is_err());
        assert!(vmm_span(a, 1, 3).is_err());
        assert!(vmm_span(a, 1, 0).is_err());
    }

    #[test]
    fn spans_that_share_granules_merge() {
        let m = merge_spans(vec![
            (0x40_0000, 0x60_0000, "b".into()),
            (0x20_0000, 0x40_0000, "a".into()),
            (0x80_0000, 0xa0_0000, "c".into()),
            (0x80_0000, 0xc0_0000, "d".into()),
        ]);
        assert_eq!(
            m,
            vec![
                (0x20_0000, 0x60_0000, "\"a\", \"b\"".into()),
                (0x80_0000, 0xc0_0000, "\"c\", \"d\"".into()),
            ]
        );
    }

    #[test]
    fn a_missing_driver_or_device_is_a_clear_error() {
        // Without a GPU: unsupported with the driver's reason. With one: device 4096 is absent.
        match device("w", 4096) {
            Err(CkptError::Unsupported(m)) => {
                assert!(m.contains("\"w\"") && m.contains("CUDA"), "{m}")
            }
            Err(CkptError::Mismatch { region, reason }) => {
                assert_eq!(region, "w");
                assert!(reason.contains("GPU 4096"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
