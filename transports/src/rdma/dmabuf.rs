//! VRAM registration: device memory exported by the cuda driver layer as a dmabuf
//! ([`crate::cuda::dmabuf`]) and registered with `ibv_reg_dmabuf_mr` on the NICs nearest to
//! the GPU. Where dmabuf is not available (a proprietary kernel driver without it, an old
//! rdma-core) the device address is registered with `ibv_reg_mr`, which works when the
//! `nvidia-peermem` module is loaded; the reason names both when neither works.
//!
//! The dmabuf covers the page-aligned superset of the region; the MR covers exactly the
//! region (`offset` = the region's start within the dmabuf, `iova` = the region's device
//! address), so a peer's remote addresses are the owner's device virtual addresses, as for
//! DRAM, and nothing outside the region is reachable with the rkey.
//!
//! NICs: those named for the GPU in [`RdmaConfig::gpu_devices`] (by PCI bus id), else the
//! opened NICs nearest to the GPU by [`topo`] (behind the same PCIe switch first). Only those
//! get an MR, so a region's published rkeys name only them and transfers of it use only
//! their lanes.

use std::os::fd::AsRawFd;
use std::path::Path;

use nixl_core::{BackendName, Desc, Error, Result};

use super::place::{self, NicMask};
use super::topo::{self, MemLocation, NicInfo};
use super::verbs::Mr;
use super::{unavailable, RdmaConfig, State};

/// The opened NICs (`opened[i]` = NIC `i`'s name) to register VRAM of the GPU at `pci_bus_id`
/// with: the configured ones for that GPU, else the nearest by topology. `Err`: a configured
/// NIC that is not opened.
pub(crate) fn vram_nics(
    cfg: &RdmaConfig,
    sysfs: &Path,
    nics: &[NicInfo],
    opened: &[String],
    pci_bus_id: &str,
) -> std::result::Result<NicMask, String> {
    let bus = pci_bus_id.to_ascii_lowercase();
    let configured = cfg
        .gpu_devices
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&bus))
        .map(|(_, v)| v);
    if let Some(names) = configured {
        if names.is_empty() {
            return Err(format!("[rdma] gpu_devices for GPU {bus} is an empty list"));
        }
        return place::named(opened, names)
            .map_err(|e| format!("[rdma] gpu_devices for GPU {bus}: {e}"));
    }
    Ok(place::nearest(
        sysfs,
        nics,
        opened,
        &MemLocation::Gpu { pci_bus_id: bus },
    ))
}

/// Registers VRAM `desc` on the NICs chosen for its GPU: one MR per NIC (`None` for the
/// others, in NIC order) and the mask of the chosen NICs. Through a dmabuf when the driver,
/// the device and libibverbs allow it; else by the device address itself, which works where
/// the `nvidia-peermem` kernel module is loaded; `Unavailable` with both reasons when neither
/// does.
pub(super) fn register(st: &State, desc: &Desc, access: i32) -> Result<(Vec<Option<Mr>>, NicMask)> {
    let vram = crate::cuda::dmabuf::locate(desc).map_err(from_cuda)?;
    {
        let mut f = st.gdr_flush.lock();
        if !f.iter().any(|c| c.ordinal() == vram.ordinal) {
            f.push(std::sync::Arc::clone(vram.ctx()));
        }
    }
    let mask = vram_nics(
        &st.cfg,
        &st.cfg.sysfs,
        &st.topo,
        &st.names,
        &vram.pci_bus_id,
    )
    .map_err(Error::InvalidArgument)?;
    let chosen = || {
        st.nics
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i < 64 && mask & (1u64 << i) != 0)
    };
    let has_dmabuf = st.nics.first().is_some_and(|n| n.ctx.verbs().has_dmabuf());
    let dmabuf_failed = if !has_dmabuf {
        "this libibverbs lacks ibv_reg_dmabuf_mr (rdma-core 34 or later needed)".to_owned()
    } else {
        match vram.export(desc) {
            Err(Error::Unavailable {
                backend: BackendName::Cuda,
                reason,
            }) => reason.to_string(),
            Err(e) => return Err(e),
            Ok(exp) => {
                let mut mrs: Vec<Option<Mr>> = (0..st.nics.len()).map(|_| None).collect();
                let mut failed = None;
                for (i, nic) in chosen() {
                    match nic.pd.reg_dmabuf_mr(
                        exp.offset,
                        exp.len,
                        exp.iova,
                        exp.fd.as_raw_fd(),
                        access,
                    ) {
                        Ok(mr) => mrs[i] = Some(mr),
                        Err(e) => {
                            failed = Some(format!("{}: {e}", nic.name));
                            break;
                        }
                    }
                }
                match failed {
                    // The fd closes here; the MRs hold the dmabuf.
                    None => {
                        log_nics(st, mask, &vram.pci_bus_id, "dmabuf");
                        return Ok((mrs, mask));
                    }
                    Some(why) => why,
                }
            }
        }
    };
    // The device address itself: the NIC driver asks nvidia-peermem for the pages.
    let mut mrs: Vec<Option<Mr>> = (0..st.nics.len()).map(|_| None).collect();
    for (i, nic) in chosen() {
        // SAFETY: as for DRAM: `register` runs under `Agent::register`'s contract (the memory
        // stays allocated until the region is deregistered, which drops these MRs); with
        // nvidia-peermem the GPU driver also revokes the NIC's mapping if it is freed first.
        match unsafe { nic.pd.reg_mr(desc.addr, desc.len, access) } {
            Ok(mr) => mrs[i] = Some(mr),
            Err(e) => {
                return Err(unavailable(format!(
                    "VRAM {desc:?} of GPU {} cannot be registered with rdma: no dmabuf \
                     ({dmabuf_failed}), and ibv_reg_mr of the device address on {} failed \
                     ({e}: is the nvidia-peermem module loaded?)",
                    vram.pci_bus_id, nic.name
                )))
            }
        }
    }
    log_nics(st, mask, &vram.pci_bus_id, "nvidia-peermem");
    Ok((mrs, mask))
}

fn log_nics(st: &State, mask: NicMask, gpu: &str, how: &str) {
    tracing::debug!(
        gpu,
        how,
        nics = ?st
            .nics
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < 64 && mask & (1u64 << i) != 0)
            .map(|(_, n)| n.name.as_str())
            .collect::<Vec<_>>(),
        "rdma: VRAM registered"
    );
}

/// A failed export: the cuda layer's `Unavailable` becomes the rdma backend's with the cuda
/// reason (no driver, a driver without dmabuf export, a device without dmabuf support); other
/// errors (a bad device id, memory that is not VRAM) pass as they are.
fn from_cuda(e: Error) -> Error {
    match e {
        Error::Unavailable {
            backend: BackendName::Cuda,
            reason,
        } => unavailable(
            reason.context("VRAM registration with rdma needs the cuda driver's dmabuf export"),
        ),
        other => other,
    }
}

/// Scans sysfs for the topology once at start; an unreadable tree is no topology (every NIC
/// ties), said in the log.
pub(super) fn scan_topology(sysfs: &Path) -> Vec<NicInfo> {
    match topo::scan(sysfs) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(sysfs = %sysfs.display(), error = %e, "rdma: no NIC topology; every NIC counts as near");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::topo::fake::FakeSys;
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Two switches, a GPU and two NICs behind the first, one NIC behind the second.
    fn tree() -> FakeSys {
        let fs = FakeSys::new("vram").unwrap();
        let sw0 = "pci0000:00/0000:00:01.0/0000:01:00.0";
        let sw1 = "pci0000:40/0000:40:01.0/0000:41:00.0";
        fs.pci(&format!("{sw0}/0000:02:00.0/0000:03:00.0"), 0)
            .unwrap();
        fs.pci(&format!("{sw1}/0000:42:00.0/0000:43:00.0"), 0)
            .unwrap();
        for (n, p) in [
            ("mlx5_0", format!("{sw0}/0000:02:01.0/0000:04:00.0")),
            ("mlx5_1", format!("{sw0}/0000:02:02.0/0000:05:00.0")),
            ("mlx5_2", format!("{sw1}/0000:42:01.0/0000:44:00.0")),
        ] {
            fs.nic(n, &p, 0, &[(true, "InfiniBand")]).unwrap();
        }
        fs
    }

    #[test]
    fn vram_goes_to_the_nics_behind_the_gpus_switch() {
        let fs = tree();
        let nics = topo::scan(&fs.root).unwrap();
        let cfg = RdmaConfig::default();
        let opened = names(&["mlx5_0", "mlx5_1", "mlx5_2"]);
        assert_eq!(
            vram_nics(&cfg, &fs.root, &nics, &opened, "0000:03:00.0"),
            Ok(0b011)
        );
        // Upper case, as some tools write it.
        assert_eq!(
            vram_nics(
                &cfg,
                &fs.root,
                &nics,
                &opened,
                "0000:43:00.0".to_uppercase().as_str()
            ),
            Ok(0b100)
        );
        // Only some NICs opened ([rdma] devices): the nearest of those.
        let opened = names(&["mlx5_2", "mlx5_1"]);
        assert_eq!(
            vram_nics(&cfg, &fs.root, &nics, &opened, "0000:03:00.0"),
            Ok(0b10)
        );
    }

    #[test]
    fn cuda_reasons_become_rdma_ones() {
        let e = from_cuda(Error::Unavailable {
            backend: BackendName::Cuda,
            reason: "libcuda.so.1 not found: x".into(),
        });
        assert_eq!(
            e.to_string(),
            unavailable(
                "VRAM registration with rdma needs the cuda driver's dmabuf export: \
                 libcuda.so.1 not found: x"
            )
            .to_string()
        );
        assert!(matches!(
            e,
            Error::Unavailable {
                backend: BackendName::Rdma,
                ..
            }
        ));
        let e = from_cuda(Error::InvalidArgument("not device memory".into()));
        assert!(matches!(e, Error::InvalidArgument(_)));
        // Without a driver here, the real export gives the driver's own reason.
        if let Err(why) = crate::cuda::driver::driver() {
            let e =
                from_cuda(crate::cuda::dmabuf::export(&Desc::new(0x1000, 4096, 0)).unwrap_err());
            assert!(e.to_string().contains(&why), "{e}");
            assert!(e.to_string().contains("dmabuf export"), "{e}");
        }
    }

    #[test]
    fn configured_nics_for_a_gpu_win_and_must_be_opened() {
        let fs = tree();
        let nics = topo::scan(&fs.root).unwrap();
        let opened = names(&["mlx5_0", "mlx5_1", "mlx5_2"]);
        let mut cfg = RdmaConfig::default();
        cfg.gpu_devices
            .insert("0000:03:00.0".into(), names(&["mlx5_2"]));
        assert_eq!(
            vram_nics(&cfg, &fs.root, &nics, &opened, "0000:03:00.0"),
            Ok(0b100)
        );
        // Another GPU still follows the topology.
        assert_eq!(
            vram_nics(&cfg, &fs.root, &nics, &opened, "0000:43:00.0"),
            Ok(0b100)
        );
        cfg.gpu_devices
            .insert("0000:03:00.0".into(), names(&["mlx5_9"]));
        let e = vram_nics(&cfg, &fs.root, &nics, &opened, "0000:03:00.0").unwrap_err();
        assert_eq!(
            e,
            "[rdma] gpu_devices for GPU 0000:03:00.0: RDMA device 'mlx5_9' is not opened by this \
             agent (opened: mlx5_0, mlx5_1, mlx5_2)"
        );
        cfg.gpu_devices.insert("0000:03:00.0".into(), Vec::new());
        assert!(vram_nics(&cfg, &fs.root, &nics, &opened, "0000:03:00.0")
            .unwrap_err()
            .contains("empty list"));
    }
}
