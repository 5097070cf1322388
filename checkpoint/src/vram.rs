//! VRAM regions: the CUDA driver (loaded at run time by the `cuda` backend of
//! `nixl-transports`; a host without it gets `unsupported: <reason>`), the choice between the
//! direct `gds` path and host staging, and the planning of device address ranges for restores
//! at the recorded addresses.
//!
//! **Moving the bytes.** Each VRAM region of a save or restore of a checkpoint *directory*
//! takes one of two paths, chosen by [`choose_path`] (a pure function of the facts below) and
//! reported per region ([`SaveReport::paths`](crate::SaveReport::paths),
//! [`RestoreReport::paths`](crate::RestoreReport::paths), `paths` in `nixl-ckpt bench --json`):
//!
//! - [`DataPath::Gds`]: VRAM <-> FILE through the agent's `gds` backend (cuFile), no host copy
//!   of the region. Taken when the agent runs `gds` (`Agent::check_backend`), the data files
//!   can be opened `O_DIRECT` (probed in the directory; `RestoreOptions::direct`/`SaveOptions::
//!   direct` on), the region lies inside a VRAM registration of the agent, and its device
//!   address, its length and (on restore) every chunk's file offset are multiples of
//!   [`GDS_ALIGN`] (the data files are laid out in chunk-size extents, so a save's offsets
//!   always are). Checksums need the bytes on the host: each chunk is copied from the device
//!   into one reused host buffer of one chunk (default 8 MiB) and hashed there, on save while
//!   the writes run, on restore after the reads and before success. The cost is one
//!   device-to-host copy of every byte over PCIe (tens of GB/s, above the storage's rate) and
//!   one chunk of host memory, instead of a host copy of the whole region.
//! - [`DataPath::Staged`]: through host memory, with the reason `gds` was not used (logged at
//!   `debug`). On save, the region is copied from the device into a host mapping of its size
//!   (registered with the agent as DRAM), which is then written like any DRAM region (checksums
//!   on the host copy); on restore, read and verified in a host mapping, then copied to the
//!   device. `s3://` and peer locations always take this path.
//!
//! The manifest records the region as VRAM with its device ordinal and device address either
//! way; the data files are the same, so a checkpoint saved on one path restores on the other.
//!
//! **At the recorded addresses.** [`restore_mapped`](crate::restore_mapped) with
//! [`Placement::Recorded`](crate::Placement::Recorded) maps fresh device memory (VMM:
//! `cuMemCreate`, `cuMemAddressReserve` at the recorded address, `cuMemMap`, `cuMemSetAccess`)
//! over the granularity-aligned span of each region ([`vmm_span`]; regions sharing granules
//! share one mapping, [`merge_spans`]), failing with the region's name when the range is taken
//! or the recorded device is not there.

use std::io;
use std::sync::Arc;

use std::path::Path;

use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, Registration};
use nixl_transports::cuda::{self, CuError, DeviceCtx, VmmAlloc, HANDLE_POSIX_FD};

use crate::dir::Progress;
use crate::dir::Region;
use crate::error::{CkptError, Result};
use crate::files::hash_all;
use crate::mapped::{map, Mapping};

/// Alignment the direct `gds` path needs of a region's device address and length and of each
/// chunk's file offset (`O_DIRECT`'s logical block size on the file systems cuFile supports).
pub const GDS_ALIGN: u64 = 4096;

/// How the bytes of a region moved between memory and the data files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// Host memory, through the agent's file backend.
    Host,
    /// VRAM <-> FILE through the `gds` backend, without a host copy of the region.
    Gds,
    /// VRAM through a host copy of the region; why `gds` was not used.
    Staged {
        /// Why.
        reason: String,
    },
}

impl DataPath {
    /// `"host"`, `"gds"` or `"staged"`.
    pub fn name(&self) -> &'static str {
        match self {
            DataPath::Host => "host",
            DataPath::Gds => "gds",
            DataPath::Staged { .. } => "staged",
        }
    }

    /// `{"path": NAME}`, with `"reason"` for a staged region.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            DataPath::Staged { reason } => {
                serde_json::json!({ "path": self.name(), "reason": reason })
            }
            _ => serde_json::json!({ "path": self.name() }),
        }
    }
}

/// `[{"region": NAME, "path": ..., "reason": ...}, ...]` of a report's `paths`.
pub fn paths_json(paths: &[(String, DataPath)]) -> serde_json::Value {
    paths
        .iter()
        .map(|(name, p)| {
            let mut j = p.to_json();
            j["region"] = serde_json::Value::from(name.as_str());
            j
        })
        .collect()
}

/// What decides a region's path: see [`choose_path`].
#[derive(Clone, Debug)]
pub struct PathFacts<'a> {
    /// The region's memory kind.
    pub kind: MemKind,
    /// `Ok` when the agent runs `gds`, else why not.
    pub gds: std::result::Result<(), &'a str>,
    /// `Ok` when the data files are in a directory and open `O_DIRECT`, else why not.
    pub files: std::result::Result<(), &'a str>,
    /// Whether the region lies inside a VRAM registration of the agent.
    pub registered: bool,
    /// Device address.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Whether every chunk's file offset is a multiple of [`GDS_ALIGN`].
    pub offsets_aligned: bool,
}

/// The path of a region: [`DataPath::Host`] for host memory, [`DataPath::Gds`] for VRAM when
/// every condition of the direct path holds, [`DataPath::Staged`] with the first that fails.
pub fn choose_path(f: &PathFacts<'_>) -> DataPath {
    let staged = |reason: String| DataPath::Staged { reason };
    if f.kind != MemKind::Vram {
        return DataPath::Host;
    }
    if let Err(r) = f.gds {
        return staged(format!("gds is unavailable: {r}"));
    }
    if let Err(r) = f.files {
        return staged(r.to_owned());
    }
    if !f.registered {
        return staged(
            "the region is not inside a VRAM registration of the agent (gds moves registered \
             memory)"
                .into(),
        );
    }
    if f.addr % GDS_ALIGN != 0 {
        return staged(format!(
            "device address {:#x} is not a multiple of {GDS_ALIGN}",
            f.addr
        ));
    }
    if f.len % GDS_ALIGN != 0 {
        return staged(format!(
            "length {} is not a multiple of {GDS_ALIGN} (the tail would need the page cache)",
            f.len
        ));
    }
    if !f.offsets_aligned {
        return staged(format!(
            "a chunk's file offset is not a multiple of {GDS_ALIGN}"
        ));
    }
    DataPath::Gds
}

/// Whether data files in `dir` open `O_DIRECT`: for a save, by creating (and removing) a probe
/// file; for a restore, by opening the manifest.
pub(crate) fn probe_o_direct(
    dir: &Path,
    write: bool,
    direct: bool,
) -> std::result::Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if !direct {
        return Err("O_DIRECT is off (direct = false)".into());
    }
    let mut o = std::fs::OpenOptions::new();
    // The directories a save's probe creates, removed again after it: a save that then fails
    // on its arguments leaves nothing behind.
    let mut created = Vec::new();
    let path = if write {
        created = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        if let Err(e) = std::fs::create_dir_all(dir) {
            return Err(format!("create {}: {e}", dir.display()));
        }
        let rnd = nixl_core::random_u64().unwrap_or(0);
        o.write(true).create_new(true);
        dir.join(format!(".gds-probe-{}-{rnd:016x}", std::process::id()))
    } else {
        o.read(true);
        dir.join(crate::ops::MANIFEST)
    };
    let r = o.custom_flags(libc::O_DIRECT).open(&path);
    if write {
        let _ = std::fs::remove_file(&path);
        // Innermost first; `remove_dir` leaves a directory someone filled meanwhile alone.
        for d in &created {
            let _ = std::fs::remove_dir(d);
        }
    }
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "the data files in {} do not open O_DIRECT: {e}",
            dir.display()
        )),
    }
}

/// The path of each of `regions` for a save to / restore from the directory `dir` (`None`:
/// not a directory). `offsets_aligned(i)` says whether region `i`'s chunks lie at aligned file
/// offsets. Logs at `debug` why each staged VRAM region is.
pub(crate) fn plan(
    agent: &Agent,
    regions: &[Region],
    dir: Option<&Path>,
    write: bool,
    direct: bool,
    offsets_aligned: impl Fn(usize) -> bool,
) -> Vec<DataPath> {
    if regions.iter().all(|r| r.kind != MemKind::Vram) {
        return vec![DataPath::Host; regions.len()];
    }
    let gds = agent.check_backend(BackendName::Gds).map_err(|e| match e {
        nixl_core::Error::Unavailable { reason, .. } => reason.to_string(),
        e => e.to_string(),
    });
    let files = match dir {
        None => Err("the checkpoint is not in a directory".to_owned()),
        Some(_) if gds.is_err() => Ok(()),
        Some(d) => probe_o_direct(d, write, direct),
    };
    regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let registered = r.kind == MemKind::Vram
                && DescList::from_descs(MemKind::Vram, vec![Desc::new(r.addr, r.len, r.dev_id)])
                    .ok()
                    .is_some_and(|l| agent.partial_metadata(&l).is_ok());
            let p = choose_path(&PathFacts {
                kind: r.kind,
                gds: gds.as_ref().map(|_| ()).map_err(String::as_str),
                files: files.as_ref().map(|_| ()).map_err(String::as_str),
                registered,
                addr: r.addr,
                len: r.len,
                offsets_aligned: offsets_aligned(i),
            });
            if let DataPath::Staged { reason } = &p {
                tracing::debug!(region = %r.name, "VRAM region staged through host memory: {reason}");
            }
            p
        })
        .collect()
}

/// xxh3 of every `(region, chunk, addr, len)` chunk, `regions[region]` saying where the chunk
/// is: host chunks on every core ([`hash_all`]), VRAM chunks copied one at a time into one host
/// buffer of the largest chunk.
///
/// # Safety
/// Every chunk must be valid for reads (host or device memory of this process) for the call.
pub(crate) unsafe fn hash_chunks(
    regions: &[&Region],
    chunks: &[(usize, usize, u64, u64)],
    progress: Option<&Progress>,
    phase: &str,
) -> Result<Vec<u64>> {
    let on_dev = |c: &(usize, usize, u64, u64)| regions[c.0].kind == MemKind::Vram;
    if !chunks.iter().any(on_dev) {
        // SAFETY: the caller's contract.
        return Ok(unsafe { hash_all(chunks, progress, phase) });
    }
    let host: Vec<_> = chunks.iter().copied().filter(|c| !on_dev(c)).collect();
    // SAFETY: the caller's contract, for the host chunks.
    let mut host_h = unsafe { hash_all(&host, progress, phase) }.into_iter();
    let biggest = chunks
        .iter()
        .filter(|c| on_dev(c))
        .map(|c| c.3)
        .max()
        .unwrap_or(0);
    let mut buf = vec![0u8; biggest as usize];
    let total: u64 = chunks.iter().map(|c| c.3).sum();
    let mut done: u64 = host.iter().map(|c| c.3).sum();
    let mut ctxs: Vec<Option<Arc<DeviceCtx>>> = vec![None; regions.len()];
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        if !on_dev(c) {
            out.push(host_h.next().expect("one hash per host chunk"));
            continue;
        }
        let r = regions[c.0];
        let ctx = match &ctxs[c.0] {
            Some(x) => x.clone(),
            None => {
                let x = device(&r.name, r.dev_id)?;
                ctxs[c.0] = Some(x.clone());
                x
            }
        };
        let dst = &mut buf[..c.3 as usize];
        // SAFETY: the chunk is readable device memory per the contract; `dst` is ours.
        unsafe { cuda::download(&ctx, dst, c.2) }.map_err(|e| {
            cuda_err(
                format!(
                    "copy chunk {} of VRAM region {:?} to host to hash it",
                    c.1, r.name
                ),
                "download",
                e,
            )
        })?;
        out.push(xxhash_rust::xxh3::xxh3_64(dst));
        done += c.3;
        if let Some(p) = progress {
            p(phase, done, total);
        }
    }
    Ok(out)
}

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
    let count = cuda::device_count().map_err(|reason| {
        CkptError::Unsupported(format!(
            "region {name:?} is VRAM and the CUDA driver is unavailable: {reason}"
        ))
    })?;
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
    cuda::device(ord).map_err(|e| CkptError::agent(format!("region {name:?}"), e))
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
    /// Stages the VRAM regions of `regions` whose path is [`DataPath::Staged`] (`None` when
    /// there is none); the others are left as they are.
    pub fn new(agent: &Agent, regions: &[Region], paths: &[DataPath]) -> Result<Option<HostStage>> {
        let staged = |i: usize| {
            regions[i].kind == MemKind::Vram
                && matches!(paths.get(i), Some(DataPath::Staged { .. }))
        };
        if !(0..regions.len()).any(staged) {
            return Ok(None);
        }
        let mut st = HostStage {
            regions: Vec::with_capacity(regions.len()),
            reg: None,
            maps: Vec::new(),
            ctxs: Vec::new(),
        };
        let mut descs = Vec::new();
        for (i, r) in regions.iter().enumerate() {
            if !staged(i) {
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
                cuda::download(ctx, dst, o.addr)
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
                cuda::upload(ctx, o.addr, src)
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

    fn facts() -> PathFacts<'static> {
        PathFacts {
            kind: MemKind::Vram,
            gds: Ok(()),
            files: Ok(()),
            registered: true,
            addr: 0x7f00_0000_0000,
            len: 64 << 20,
            offsets_aligned: true,
        }
    }

    fn reason(p: DataPath) -> String {
        match p {
            DataPath::Staged { reason } => reason,
            other => panic!("expected staged, got {other:?}"),
        }
    }

    #[test]
    fn vram_goes_through_gds_only_when_every_condition_holds() {
        assert_eq!(choose_path(&facts()), DataPath::Gds);
        // Host memory never takes gds, whatever else holds.
        let f = PathFacts {
            kind: MemKind::Dram,
            gds: Err("x"),
            ..facts()
        };
        assert_eq!(choose_path(&f), DataPath::Host);
        // Each condition that fails, alone, and what the reason says.
        type Edit = fn(&mut PathFacts);
        let cases: [(Edit, &[&str]); 6] = [
            (
                |f| f.gds = Err("needs libcufile.so.0: not found"),
                &["gds is unavailable", "libcufile"],
            ),
            (
                |f| f.files = Err("the data files do not open O_DIRECT"),
                &["O_DIRECT"],
            ),
            (|f| f.registered = false, &["registration"]),
            (|f| f.addr = 0x7f00_0000_0200, &["0x7f0000000200", "4096"]),
            (|f| f.len = (5 << 20) + 123, &["length 5243003"]),
            (|f| f.offsets_aligned = false, &["file offset"]),
        ];
        for (edit, wants) in cases {
            let mut f = facts();
            edit(&mut f);
            let r = reason(choose_path(&f));
            assert!(wants.iter().all(|w| r.contains(w)), "{wants:?}: {r}");
        }
        // The first failing condition is the one reported: gds before the files.
        let r = reason(choose_path(&PathFacts {
            gds: Err("no GPU"),
            files: Err("no O_DIRECT"),
            addr: 1,
            ..facts()
        }));
        assert!(r.contains("no GPU") && !r.contains("O_DIRECT"), "{r}");
        assert_eq!(DataPath::Gds.to_json()["path"], "gds");
        let j = DataPath::Staged {
            reason: "why".into(),
        }
        .to_json();
        assert_eq!(
            (j["path"].as_str(), j["reason"].as_str()),
            (Some("staged"), Some("why"))
        );
    }

    #[test]
    fn the_o_direct_probe_leaves_nothing_and_says_why() {
        let base = std::env::temp_dir().join(format!("nixl-ckpt-odirect-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let d = base.join("new").join("ckpt");
        let r = probe_o_direct(&d, true, true);
        // tmpfs has no O_DIRECT; other file systems do. Either way neither the probe file nor
        // the directories it created are left (a save that then fails leaves nothing), and a
        // directory it did not create stays.
        if let Err(m) = &r {
            assert!(m.contains("O_DIRECT"), "{m}");
        }
        assert!(!base.join("new").exists(), "the probe left {}", d.display());
        std::fs::create_dir_all(&d).unwrap();
        let _ = probe_o_direct(&d, true, true);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let off = probe_o_direct(&d, true, false).unwrap_err();
        assert!(off.contains("direct = false"), "{off}");
        // A restore probes the manifest, which is not there.
        assert!(probe_o_direct(&d, false, true).is_err());
        std::fs::remove_dir_all(&base).unwrap();
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
