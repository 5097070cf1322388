//! Restore into memory the library maps: anywhere, or at the addresses the regions had when
//! they were saved.

use std::io;

use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, Registration};

use nixl_transports::cuda::VmmAlloc;

use crate::dir::{restore_opened, Opened, Region, RestoreOptions};
use crate::error::{CkptError, Result};
use crate::manifest::{Manifest, RegionEntry};
use crate::vram::{self, merge_spans, vmm_span};

/// Where [`restore_mapped`] puts the regions (host memory for DRAM regions, device memory from
/// the CUDA VMM API on the recorded GPU for VRAM ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Wherever the kernel maps them.
    Anywhere,
    /// At the virtual addresses recorded when they were saved (`MAP_FIXED_NOREPLACE`; for VRAM
    /// `cuMemAddressReserve` at the address), so that pointers inside them stay valid; an error
    /// names the region whose range is taken or whose device is not here.
    Recorded,
}

/// One restored region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredRegion {
    /// Name.
    pub name: String,
    /// Its address now.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

/// Regions restored into memory mapped by the library, registered with the agent. Dropping it
/// deregisters and unmaps them.
#[derive(Debug)]
pub struct Restored {
    regions: Vec<RestoredRegion>,
    reg: Option<Registration>,
    vram_reg: Option<Registration>,
    maps: Vec<Mapping>,
    vmm: Vec<VmmAlloc>,
    manifest: Manifest,
}

impl Restored {
    /// The manifest of the checkpoint restored (read once, at the start of the restore).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The regions, in the order asked (or the checkpoint's order).
    pub fn regions(&self) -> &[RestoredRegion] {
        &self.regions
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&RestoredRegion> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The registration of the regions with the agent (they can be the source of transfers):
    /// with every backend of the agent that registers their memory, or, restored from a peer
    /// (`nixl://`), with its network backends alone (`rdma` where it runs, and `tcp`).
    pub fn registration(&self) -> Option<&Registration> {
        self.reg.as_ref()
    }

    /// Keeps the memory mapped and registered for the rest of the process (state restored at
    /// its recorded addresses usually lives that long). Returns the regions.
    pub fn leak(mut self) -> Vec<RestoredRegion> {
        for r in [self.reg.take(), self.vram_reg.take()]
            .into_iter()
            .flatten()
        {
            r.forget();
        }
        self.maps.clear();
        for a in self.vmm.drain(..) {
            std::mem::forget(a);
        }
        std::mem::take(&mut self.regions)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        // Deregistration first: it waits for transfers that still use the memory.
        drop(self.reg.take());
        drop(self.vram_reg.take());
        // VMM allocations unmap and release themselves (errors logged, never a panic).
        self.vmm.clear();
        for m in self.maps.drain(..) {
            // SAFETY: the mapping was made by `map` and nothing registered refers to it now.
            if unsafe { libc::munmap(m.addr as *mut libc::c_void, m.len) } != 0 {
                tracing::error!(
                    addr = m.addr,
                    len = m.len,
                    "munmap failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Maps `len` bytes of fresh anonymous memory, at `at` exactly (`MAP_FIXED_NOREPLACE`) or
/// anywhere.
pub(crate) fn map(at: Option<u64>, len: u64, what: &str) -> Result<Mapping> {
    let len = usize::try_from(len)
        .map_err(|_| CkptError::InvalidArgument(format!("{what}: {len} bytes do not fit")))?;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if at.is_some() {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    let hint = at.unwrap_or(0) as usize as *mut libc::c_void;
    // SAFETY: an anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe { libc::mmap(hint, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return Err(match (at, e.raw_os_error()) {
            (Some(a), Some(libc::EEXIST)) => CkptError::InvalidArgument(format!(
                "{what}: the recorded range {a:#x}+{len} is taken in this process (restore it \
                 anywhere, or earlier in the process's life, before that range is used)"
            )),
            _ => CkptError::io(format!("{what}: mmap of {len} bytes"), e),
        });
    }
    // Transparent huge pages where the kernel gives them for the asking (`madvise` mode):
    // restoring into fresh memory costs a page fault per page the data lands on, and on a
    // virtual machine that returns freed memory to its host, a host fault too; 2 MiB pages cut
    // the faults 512-fold. Advice only: without THP the mapping works as before.
    if len >= 2 << 20 {
        // SAFETY: advice on the mapping just made, `len` bytes at `p`.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
    }
    if let Some(a) = at {
        if p as u64 != a {
            // A kernel before 4.17 treats the flag as a hint.
            // SAFETY: `p` was just mapped, `len` bytes, and is unused.
            unsafe { libc::munmap(p, len) };
            return Err(CkptError::Unsupported(format!(
                "{what}: this kernel does not honour MAP_FIXED_NOREPLACE (Linux 4.17+)"
            )));
        }
    }
    Ok(Mapping {
        addr: p as usize,
        len,
    })
}

/// Restores the regions `names` (all when `None`) of the checkpoint at `uri` into memory the
/// library maps and registers with `agent`, every byte verified; see [`Placement`].
pub fn restore_mapped(
    agent: &Agent,
    uri: &str,
    names: Option<&[&str]>,
    placement: Placement,
) -> Result<Restored> {
    let src = Opened::open(agent, uri)?;
    let m = &src.manifest;
    let entries: Vec<_> = match names {
        None => m.regions.iter().collect(),
        Some(ns) => ns.iter().map(|n| m.find(n)).collect::<Result<_>>()?,
    };
    if let Some(e) = entries
        .iter()
        .find(|e| e.kind != MemKind::Dram && e.kind != MemKind::Vram)
    {
        return Err(CkptError::Manifest(format!(
            "region {:?} is {} memory",
            e.name, e.kind
        )));
    }
    let page = page_size();
    let mut out = Restored {
        regions: Vec::new(),
        reg: None,
        vram_reg: None,
        maps: Vec::new(),
        vmm: Vec::new(),
        manifest: m.clone(),
    };
    let (vram, dram): (Vec<&RegionEntry>, Vec<&RegionEntry>) =
        entries.iter().partition(|e| e.kind == MemKind::Vram);
    let mut regions = Vec::new();
    match placement {
        Placement::Anywhere => {
            for e in &dram {
                let mp = map(
                    None,
                    e.len.div_ceil(page) * page,
                    &format!("region {:?}", e.name),
                )?;
                regions.push(Region::dram(e.name.clone(), mp.addr as u64, e.len));
                out.maps.push(mp);
            }
        }
        Placement::Recorded => {
            // Page spans of the regions, merged where regions share pages.
            let mut spans: Vec<(u64, u64, String)> = Vec::new();
            for e in &dram {
                let (start, end) = vmm_span(e.addr, e.len, page)?;
                spans.push((start, end, e.name.clone()));
                regions.push(Region::dram(e.name.clone(), e.addr, e.len));
            }
            for (start, end, who) in merge_spans(spans) {
                let what = format!("region {who}");
                let mp = map(Some(start), end - start, &what)?;
                out.maps.push(mp);
            }
        }
    }
    // VRAM: device memory on the recorded GPU, one VMM allocation per region (anywhere) or per
    // granule-aligned span of regions on one GPU (at the recorded addresses).
    let mut vregions = Vec::new();
    let mut devs: Vec<u64> = vram.iter().map(|e| e.dev_id).collect();
    devs.sort_unstable();
    devs.dedup();
    for dev in devs {
        let on: Vec<_> = vram.iter().filter(|e| e.dev_id == dev).collect();
        let ctx = vram::device(&on[0].name, dev)?;
        match placement {
            Placement::Anywhere => {
                for e in on {
                    let what = format!("region {:?}", e.name);
                    let a = vram::vmm_alloc(&ctx, None, e.len, &what)?;
                    vregions.push(vram_region(e, a.addr()));
                    out.vmm.push(a);
                }
            }
            Placement::Recorded => {
                let g = vram::granularity(&ctx, &format!("region {:?}", on[0].name))?;
                let mut spans = Vec::new();
                for e in on {
                    let (start, end) = vmm_span(e.addr, e.len, g)?;
                    spans.push((start, end, e.name.clone()));
                    vregions.push(vram_region(e, e.addr));
                }
                for (start, end, who) in merge_spans(spans) {
                    let what = format!("region {who}");
                    out.vmm.push(vram::vmm_alloc(
                        &ctx,
                        Some((start, end)),
                        end - start,
                        &what,
                    )?);
                }
            }
        }
    }
    if !regions.is_empty() {
        // From a peer, the memory is registered with the network backends alone (those that
        // fill it, `rdma` where it runs, and `tcp`): `uring` would pin it as fixed buffers,
        // faulting in and zeroing every page on this thread before the first byte is asked
        // for; the tcp receivers fault the pages in as the data lands, on their own threads,
        // overlapped with the network.
        let net = network_backends(agent);
        let only = src.peer.as_ref().map(|_| &net[..]);
        out.reg = Some(register(agent, MemKind::Dram, &regions, only)?);
    }
    if !vregions.is_empty() {
        out.vram_reg = Some(register(agent, MemKind::Vram, &vregions, None)?);
    }
    regions.extend(vregions);
    // SAFETY: the memory is ours, mapped above, and no reference to it exists.
    unsafe { restore_opened(agent, &src, &regions, &RestoreOptions::default()) }?;
    out.regions = regions
        .into_iter()
        .map(|r| RestoredRegion {
            name: r.name,
            addr: r.addr,
            len: r.len,
        })
        .collect();
    Ok(out)
}

fn vram_region(e: &RegionEntry, addr: u64) -> Region {
    Region {
        name: e.name.clone(),
        kind: MemKind::Vram,
        addr,
        len: e.len,
        dev_id: e.dev_id,
    }
}

/// Registers `regions` (all of `kind`, in memory owned by a [`Restored`], which deregisters
/// before unmapping) with `agent`: with every backend that registers `kind`, or `only` those.
/// The backends that can fill memory from a peer, among those `agent` runs: `rdma` (first, when
/// it runs) and `tcp`. `tcp` stays in the list even when it does not run, so that registering
/// with the list fails with the reason it is unavailable.
pub(crate) fn network_backends(agent: &Agent) -> Vec<BackendName> {
    let mut v: Vec<BackendName> = [BackendName::Rdma]
        .into_iter()
        .filter(|&n| agent.check_backend(n).is_ok())
        .collect();
    v.push(BackendName::Tcp);
    v
}

fn register(
    agent: &Agent,
    kind: MemKind,
    regions: &[Region],
    only: Option<&[BackendName]>,
) -> Result<Registration> {
    let descs: Vec<Desc> = regions
        .iter()
        .map(|r| Desc::new(r.addr, r.len, r.dev_id))
        .collect();
    let list =
        DescList::from_descs(kind, descs).map_err(|e| CkptError::agent("restored regions", e))?;
    // SAFETY: the regions lie in mappings owned by the `Restored` the registration goes into,
    // which deregisters before unmapping.
    let reg = unsafe {
        match only {
            Some(names) => agent.register_with(&list, names),
            None => agent.register(&list),
        }
    };
    reg.map_err(|e| {
        CkptError::agent(
            format!("register the restored {kind} regions with the agent"),
            e,
        )
    })
}
