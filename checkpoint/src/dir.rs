//! Save of registered regions to a checkpoint directory, through the agent's file backends,
//! and the types save and restore share. Restore is in `restore.rs`, the data files and the
//! manifest on disk in `files.rs`.

use std::path::{Component, Path};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nixl_core::{Agent, Desc, DescList, MemKind, XferOp};

use crate::error::{CkptError, Result};
use crate::manifest::{self, Chunk, DataFile, Manifest, RegionEntry};
use crate::ops::{read_manifest, Location};
use crate::s3::{self, S3Loc};
use crate::vram::{self, DataPath, HostStage};

pub(crate) use crate::files::{
    gds_transfers, hash_all, register_files, remove_stale, sync_dir, transfers, write_manifest,
    DataFd, Posted,
};
pub use crate::restore::{read_manifest_with, restore, restore_report, RestoreReport};
pub(crate) use crate::restore::{restore_chunks, restore_opened, ChunkAt, Opened, Pick};
/// A region to save, or to restore into: a name, and where the memory is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Name (unique in a checkpoint; what restore matches on).
    pub name: String,
    /// Memory kind: DRAM, or VRAM (through `gds` or staged through host memory; see
    /// [`crate::vram`]).
    pub kind: MemKind,
    /// Virtual address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// GPU ordinal for VRAM, 0 for DRAM.
    pub dev_id: u64,
}

impl Region {
    /// A DRAM region.
    pub fn dram(name: impl Into<String>, addr: u64, len: u64) -> Region {
        Region {
            name: name.into(),
            kind: MemKind::Dram,
            addr,
            len,
            dev_id: 0,
        }
    }

    /// A VRAM region on GPU `dev_id`.
    pub fn vram(name: impl Into<String>, addr: u64, len: u64, dev_id: u64) -> Region {
        Region {
            name: name.into(),
            kind: MemKind::Vram,
            addr,
            len,
            dev_id,
        }
    }

    fn desc(&self) -> Desc {
        Desc::new(self.addr, self.len, self.dev_id)
    }
}

/// Progress callback: `(phase, bytes done, bytes in all)`, called from worker threads.
pub type Progress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Options of [`save`].
#[derive(Clone)]
pub struct SaveOptions {
    /// Bytes per chunk (checksum and incremental granularity): a multiple of 4096 in
    /// 4096..=1 GiB. Default 8 MiB.
    pub chunk_size: u64,
    /// The caller's JSON metadata, stored in the manifest (at most 1 MiB).
    pub metadata: Option<String>,
    /// A checkpoint to save incrementally over: chunks whose checksum did not change are not
    /// written but referenced in the base's files (the base must stay where it is).
    pub base: Option<String>,
    /// Use `O_DIRECT` where the file system and alignment allow (default true).
    pub direct: bool,
    /// Progress reports.
    pub progress: Option<Progress>,
    /// Artifact directories saved with the regions: `(name, directory)` (in a checkpoint
    /// directory or under `s3://`; see [`crate::artifact`]). An incremental save writes them
    /// whole.
    pub artifacts: Vec<(String, std::path::PathBuf)>,
}

impl Default for SaveOptions {
    fn default() -> SaveOptions {
        SaveOptions {
            chunk_size: 8 << 20,
            metadata: None,
            artifacts: Vec::new(),
            base: None,
            direct: true,
            progress: None,
        }
    }
}

impl std::fmt::Debug for SaveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveOptions")
            .field("chunk_size", &self.chunk_size)
            .field("metadata", &self.metadata.as_ref().map(String::len))
            .field("base", &self.base)
            .field("direct", &self.direct)
            .field("artifacts", &self.artifacts)
            .finish_non_exhaustive()
    }
}

/// Options of [`restore`].
#[derive(Clone)]
pub struct RestoreOptions {
    /// Use `O_DIRECT` where the file system and alignment allow (default true).
    pub direct: bool,
    /// Progress reports.
    pub progress: Option<Progress>,
}

impl Default for RestoreOptions {
    fn default() -> RestoreOptions {
        RestoreOptions {
            direct: true,
            progress: None,
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// What [`save`] did.
#[derive(Clone, Debug)]
pub struct SaveReport {
    /// Bytes of every region.
    pub bytes: u64,
    /// Bytes written to data files (less than `bytes` for an incremental save).
    pub written: u64,
    /// Chunks in all.
    pub chunks: usize,
    /// Chunks taken from the base (incremental saves).
    pub reused: usize,
    /// The backend that carried the writes (when anything was written).
    pub backend: Option<String>,
    /// The manifest written.
    pub manifest: Manifest,
    /// How each region's bytes moved (`(name, path)`, in the order given): host memory, VRAM
    /// through `gds`, or VRAM staged through host memory with the reason (see [`crate::vram`]).
    pub paths: Vec<(String, DataPath)>,
}

/// Saves `regions` of `agent`'s registered memory to the checkpoint directory `uri`, replacing
/// the checkpoint there (if any) only once the new one is complete and durable.
///
/// Every region must lie inside a registration of `agent`, and the agent must run a backend
/// that writes files (`uring` or `posix`). VRAM regions go to a directory through the agent's
/// `gds` backend where it runs and the region allows ([`vram::choose_path`]); otherwise they
/// are copied to host memory first (the CUDA driver is needed then; without it the error says
/// so). [`SaveReport::paths`] says which.
///
/// # Safety
/// Every region's memory must stay valid for reads, and unchanged, for the whole call.
pub unsafe fn save(
    agent: &Agent,
    uri: &str,
    regions: &[Region],
    opts: &SaveOptions,
) -> Result<SaveReport> {
    Location::parse(uri)?;
    check_regions(regions)?;
    for r in regions {
        let list = DescList::from_descs(r.kind, vec![r.desc()])
            .map_err(|e| CkptError::agent(format!("region {:?}", r.name), e))?;
        agent.partial_metadata(&list).map_err(|_| {
            CkptError::InvalidArgument(format!(
                "region {:?} ({} {:#x}+{}) is not inside a registration of agent '{}'",
                r.name,
                r.kind,
                r.addr,
                r.len,
                agent.name()
            ))
        })?;
    }
    let dir = match Location::parse(uri)? {
        Location::Dir(d) => Some(d),
        _ => None,
    };
    let paths = vram::plan(agent, regions, dir.as_deref(), true, opts.direct, |_| true);
    let mut rep = match HostStage::new(agent, regions, &paths)? {
        // SAFETY: the caller's contract is this function's.
        None => unsafe { save_from(agent, uri, regions, regions, opts) },
        Some(st) => {
            // SAFETY: the caller keeps the VRAM regions readable; the host copies are ours.
            unsafe { st.download(regions) }?;
            // SAFETY: the host copies live as long as `st`, past the call.
            unsafe { save_from(agent, uri, &st.regions, regions, opts) }
        }
    }?;
    rep.paths = regions.iter().map(|r| r.name.clone()).zip(paths).collect();
    Ok(rep)
}

/// [`save`] of the bytes of `regions` (registered host memory, or VRAM that goes through
/// `gds`), recorded in the manifest as `origin` (the caller's regions, same order, names and
/// lengths).
///
/// # Safety
/// As [`save`], for `read`.
pub(crate) unsafe fn save_from(
    agent: &Agent,
    uri: &str,
    regions: &[Region],
    origin: &[Region],
    opts: &SaveOptions,
) -> Result<SaveReport> {
    let loc = Location::parse(uri)?;
    let (lo, hi) = manifest::CHUNK_BOUNDS;
    let cs = opts.chunk_size;
    if cs < lo || cs > hi || cs % lo != 0 {
        return Err(CkptError::InvalidArgument(format!(
            "chunk size {cs} must be a multiple of {lo} in {lo}..={hi}"
        )));
    }
    let metadata = opts.metadata.clone().unwrap_or_else(|| "{}".into());
    if metadata.len() > manifest::MAX_METADATA_BYTES {
        return Err(CkptError::InvalidArgument(format!(
            "metadata is {} bytes, over the limit of {}",
            metadata.len(),
            manifest::MAX_METADATA_BYTES
        )));
    }
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&metadata) {
        return Err(CkptError::InvalidArgument(format!(
            "metadata is not JSON: {e}"
        )));
    }
    let dir = match loc {
        Location::Dir(d) => d,
        Location::S3 { bucket, prefix } => {
            // SAFETY: the caller's contract is this function's.
            return unsafe {
                s3::save(
                    agent,
                    &S3Loc { bucket, prefix },
                    regions,
                    origin,
                    opts,
                    metadata,
                )
            };
        }
        Location::Peer { addr, .. } => {
            return Err(CkptError::Unsupported(format!(
                "nixl://{addr}: a save goes to a directory or s3://; to serve it from memory, \
                 save it there and run `nixl-ckpt serve` on it"
            )))
        }
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| CkptError::io(format!("create {}", dir.display()), e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| CkptError::io(format!("resolve {}", dir.display()), e))?;
    let base = match &opts.base {
        Some(b) => {
            let bdir = Location::parse(b)?.dir()?;
            let m = read_manifest(b)?;
            if m.chunk_size != cs {
                return Err(CkptError::InvalidArgument(format!(
                    "base {b} has chunk size {}, this save {cs}: they must be equal",
                    m.chunk_size
                )));
            }
            let bdir = bdir
                .canonicalize()
                .map_err(|e| CkptError::io(format!("resolve {}", bdir.display()), e))?;
            Some((bdir, m))
        }
        None => None,
    };
    let save_id = nixl_core::random_u64().map_err(|e| CkptError::agent("random save id", e))?;
    let total: u64 = regions.iter().map(|r| r.len).sum();

    // The chunks of every region, and (for an incremental save) which of them changed.
    let chunks = chunk_list(regions, cs);
    let refs: Vec<&Region> = regions.iter().collect();
    let progress = opts.progress.as_ref();
    let mut files: Vec<DataFile> = Vec::new();
    let mut entries = entries_of(origin);
    // Chunk placement: reused from the base, or written to this save's file of the region.
    let mut reuse: Vec<Option<Chunk>> = vec![None; chunks.len()];
    let mut hashes: Vec<u64> = Vec::new();
    if let Some((bdir, bm)) = &base {
        // SAFETY: the caller keeps the regions readable for the call.
        hashes = unsafe { vram::hash_chunks(&refs, &chunks, progress, "hash") }?;
        reuse = reused_chunks(bm, origin, &chunks, &hashes, &mut files, |f| {
            relative_to(&dir, &bdir.join(&f.name))
        })?;
    }
    // Open this save's data files (only for regions with a chunk to write).
    let mut data: Vec<Option<(u32, DataFd)>> = (0..regions.len()).map(|_| None).collect();
    let mut placed: Vec<Chunk> = Vec::with_capacity(chunks.len());
    let mut next_off = vec![0u64; regions.len()];
    let mut pieces: Vec<(Desc, Desc, bool)> = Vec::new();
    // Pieces of VRAM regions (only those going through `gds` reach here), per device.
    let mut vpieces: Vec<(Desc, Desc, bool)> = Vec::new();
    let result = (|| -> Result<Option<String>> {
        for (k, &(ri, _, addr, len)) in chunks.iter().enumerate() {
            if let Some(c) = reuse[k] {
                placed.push(c);
                continue;
            }
            if data[ri].is_none() {
                let name = format!("d{save_id:016x}-{ri}.dat");
                let fd = DataFd::open(&dir.join(&name), true, opts.direct)?;
                let fi = file_index(&mut files, &name, 0);
                data[ri] = Some((fi, fd));
            }
            let (fi, fd) = data[ri].as_ref().expect("opened above");
            let off = next_off[ri];
            next_off[ri] += cs;
            let size = &mut files[*fi as usize].size;
            *size = (*size).max(off + len);
            if regions[ri].kind == MemKind::Vram {
                let from = vpieces.len();
                fd.pieces(addr, off, len, &mut vpieces);
                for p in &mut vpieces[from..] {
                    p.0.dev_id = regions[ri].dev_id;
                }
            } else {
                fd.pieces(addr, off, len, &mut pieces);
            }
            placed.push(Chunk {
                file: *fi,
                offset: off,
                len,
                xxh3: 0,
            });
        }
        let fds: Vec<&DataFd> = data.iter().flatten().map(|(_, fd)| fd).collect();
        if pieces.is_empty() && vpieces.is_empty() {
            return Ok(None);
        }
        let _files_reg = register_files(agent, &fds, &files_sizes(&data, &files))?;
        let mut reqs = transfers(agent, XferOp::Write, &pieces)?;
        reqs.0
            .append(&mut gds_transfers(agent, XferOp::Write, &vpieces)?.0);
        if hashes.is_empty() {
            // A full save: checksums on every core while the writes run (VRAM chunks through
            // a bounded host bounce, see `vram`).
            // SAFETY: the caller keeps the regions readable for the call.
            hashes = unsafe { vram::hash_chunks(&refs, &chunks, progress, "save") }?;
        }
        let mut backend = None;
        for req in &reqs.0 {
            req.wait_blocking(None)
                .into_result()
                .map_err(|e| CkptError::agent(format!("write to {}", dir.display()), e))?;
            backend = Some(req.backend().to_string());
        }
        for fd in &fds {
            fd.buffered
                .sync_all()
                .map_err(|e| CkptError::io(format!("fsync {}", fd.path.display()), e))?;
        }
        Ok(backend)
    })();
    let backend = match result {
        Ok(b) => b,
        Err(e) => {
            drop(data);
            for f in files.iter().filter(|f| !f.name.contains('/')) {
                let _ = std::fs::remove_file(dir.join(&f.name));
            }
            return Err(e);
        }
    };
    drop(data);
    let first = files.len().max(regions.len());
    let artifacts =
        match crate::artifact::save_artifacts(&dir, save_id, first, &opts.artifacts, &mut files) {
            Ok(a) => a,
            Err(e) => {
                for f in files.iter().filter(|f| !f.name.contains('/')) {
                    let _ = std::fs::remove_file(dir.join(&f.name));
                }
                return Err(e);
            }
        };
    let mut k = 0;
    for (ri, e) in entries.iter_mut().enumerate() {
        while k < chunks.len() && chunks[k].0 == ri {
            e.chunks.push(Chunk {
                xxh3: hashes[k],
                ..placed[k]
            });
            k += 1;
        }
    }
    let written = chunks
        .iter()
        .zip(&reuse)
        .filter(|(_, r)| r.is_none())
        .map(|(c, _)| c.3)
        .sum();
    let m = Manifest {
        save_id,
        created_unix_ms: now_ms(),
        chunk_size: cs,
        base: opts.base.clone(),
        metadata,
        files,
        regions: entries,
        artifacts,
    };
    m.validate()?;
    write_manifest(&dir, &m)?;
    remove_stale(&dir, &m);
    Ok(SaveReport {
        bytes: total,
        written,
        chunks: chunks.len(),
        reused: reuse.iter().filter(|r| r.is_some()).count(),
        backend,
        manifest: m,
        paths: Vec::new(),
    })
}

/// Every chunk of `regions` in chunks of `cs`: `(region index, chunk index, address, length)`.
pub(crate) fn chunk_list(regions: &[Region], cs: u64) -> Vec<(usize, usize, u64, u64)> {
    regions
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            (0..r.len.div_ceil(cs)).map(move |ci| {
                let off = ci * cs;
                (ri, ci as usize, r.addr + off, (r.len - off).min(cs))
            })
        })
        .collect()
}

/// The chunks of an incremental save that its base `bm` holds already: chunk `k` of `chunks`
/// (of the caller's regions `origin`, hashed to `hashes[k]`) when the base's region of that
/// name, kind and device has a chunk of that index, length and hash; placed in `files` under
/// the name `rel` gives the base's file.
pub(crate) fn reused_chunks(
    bm: &Manifest,
    origin: &[Region],
    chunks: &[(usize, usize, u64, u64)],
    hashes: &[u64],
    files: &mut Vec<DataFile>,
    rel: impl Fn(&DataFile) -> Result<String>,
) -> Result<Vec<Option<Chunk>>> {
    let mut reuse = vec![None; chunks.len()];
    for (k, &(ri, ci, _, len)) in chunks.iter().enumerate() {
        let o = &origin[ri];
        let Some(be) = bm.region(&o.name) else {
            continue;
        };
        if be.kind != o.kind || be.dev_id != o.dev_id {
            continue;
        }
        if let Some(bc) = be.chunks.get(ci) {
            if bc.len == len && bc.xxh3 == hashes[k] {
                let bf = &bm.files[bc.file as usize];
                let fi = file_index(files, &rel(bf)?, bf.size);
                reuse[k] = Some(Chunk { file: fi, ..*bc });
            }
        }
    }
    Ok(reuse)
}

/// The manifest entries of `regions`, without their chunks yet.
pub(crate) fn entries_of(regions: &[Region]) -> Vec<RegionEntry> {
    regions
        .iter()
        .map(|r| RegionEntry {
            name: r.name.clone(),
            kind: r.kind,
            dev_id: r.dev_id,
            addr: r.addr,
            len: r.len,
            chunks: Vec::new(),
        })
        .collect()
}

/// Now, in ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn files_sizes(data: &[Option<(u32, DataFd)>], files: &[DataFile]) -> Vec<u64> {
    data.iter()
        .flatten()
        .map(|(fi, _)| files[*fi as usize].size)
        .collect()
}

pub(crate) fn file_index(files: &mut Vec<DataFile>, name: &str, size: u64) -> u32 {
    match files.iter().position(|f| f.name == name) {
        Some(i) => i as u32,
        None => {
            files.push(DataFile {
                name: name.to_owned(),
                size,
            });
            (files.len() - 1) as u32
        }
    }
}

/// `target` as a path relative to `dir` (both absolute), in the manifest's file name form.
fn relative_to(dir: &Path, target: &Path) -> Result<String> {
    let target = target
        .canonicalize()
        .map_err(|e| CkptError::io(format!("resolve base file {}", target.display()), e))?;
    let a: Vec<Component<'_>> = dir.components().collect();
    let b: Vec<Component<'_>> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); a.len() - common];
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    let rel = parts.join("/");
    manifest::check_file_name(&rel).map_err(CkptError::InvalidArgument)?;
    Ok(rel)
}

fn check_regions(regions: &[Region]) -> Result<()> {
    if regions.is_empty() {
        return Err(CkptError::InvalidArgument("no regions named".into()));
    }
    if regions.len() > manifest::MAX_REGIONS {
        return Err(CkptError::InvalidArgument(format!(
            "{} regions, over the limit of {}",
            regions.len(),
            manifest::MAX_REGIONS
        )));
    }
    for (i, r) in regions.iter().enumerate() {
        manifest::check_region_name(&r.name).map_err(CkptError::InvalidArgument)?;
        if regions[..i].iter().any(|o| o.name == r.name) {
            return Err(CkptError::InvalidArgument(format!(
                "region {:?} named twice",
                r.name
            )));
        }
        match r.kind {
            MemKind::Dram | MemKind::Vram => {}
            k => {
                return Err(CkptError::InvalidArgument(format!(
                    "region {:?} is {k} memory: only memory regions (DRAM, VRAM) are saved",
                    r.name
                )))
            }
        }
        if r.len == 0 || r.addr.checked_add(r.len).is_none() {
            return Err(CkptError::InvalidArgument(format!(
                "region {:?}: {:#x}+{} is empty or wraps",
                r.name, r.addr, r.len
            )));
        }
    }
    Ok(())
}
