//! Save and restore of registered regions to and from a checkpoint directory, through the
//! agent's file backends.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nixl_core::{Agent, Desc, DescList, MemKind, Registration, XferOp, XferOptions, XferRequest};
use nixl_transports::files::{inspect_fd, FileInfo};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{CkptError, Result};
use crate::manifest::{self, Chunk, DataFile, Manifest, RegionEntry};
use crate::ops::{is_ours, read_manifest, Location, MANIFEST};
use crate::s3::{self, S3Loc};
use crate::serve;
use crate::vram::HostStage;

/// A region to save, or to restore into: a name, and where the memory is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Name (unique in a checkpoint; what restore matches on).
    pub name: String,
    /// Memory kind: DRAM, or VRAM (staged through host memory; see the crate's docs).
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
}

/// Saves `regions` of `agent`'s registered memory to the checkpoint directory `uri`, replacing
/// the checkpoint there (if any) only once the new one is complete and durable.
///
/// Every region must lie inside a registration of `agent`, and the agent must run a backend
/// that writes files (`uring` or `posix`). VRAM regions are copied to host memory first (the
/// CUDA driver is needed then; without it the error says so).
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
    match HostStage::new(agent, regions)? {
        // SAFETY: the caller's contract is this function's.
        None => unsafe { save_from(agent, uri, regions, regions, opts) },
        Some(st) => {
            // SAFETY: the caller keeps the VRAM regions readable; the host copies are ours.
            unsafe { st.download(regions) }?;
            // SAFETY: the host copies live as long as `st`, past the call.
            unsafe { save_from(agent, uri, &st.regions, regions, opts) }
        }
    }
}

/// [`save`] of the bytes of `read` (registered host memory), recorded in the manifest as
/// `origin` (the caller's regions, same order, names and lengths).
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
    let progress = opts.progress.as_ref();
    let mut files: Vec<DataFile> = Vec::new();
    let mut entries = entries_of(origin);
    // Chunk placement: reused from the base, or written to this save's file of the region.
    let mut reuse: Vec<Option<Chunk>> = vec![None; chunks.len()];
    let mut hashes: Vec<u64> = Vec::new();
    if let Some((bdir, bm)) = &base {
        // SAFETY: the caller keeps the regions readable for the call.
        hashes = unsafe { hash_all(&chunks, progress, "hash") };
        for (k, &(ri, ci, _, len)) in chunks.iter().enumerate() {
            let Some(be) = bm.region(&regions[ri].name) else {
                continue;
            };
            if be.kind != origin[ri].kind || be.dev_id != origin[ri].dev_id {
                continue;
            }
            if let Some(bc) = be.chunks.get(ci) {
                if bc.len == len && bc.xxh3 == hashes[k] {
                    let name = &bm.files[bc.file as usize].name;
                    let rel = relative_to(&dir, &bdir.join(name))?;
                    let fi = file_index(&mut files, &rel, bm.files[bc.file as usize].size);
                    reuse[k] = Some(Chunk { file: fi, ..*bc });
                }
            }
        }
    }
    // Open this save's data files (only for regions with a chunk to write).
    let mut data: Vec<Option<(u32, DataFd)>> = (0..regions.len()).map(|_| None).collect();
    let mut placed: Vec<Chunk> = Vec::with_capacity(chunks.len());
    let mut next_off = vec![0u64; regions.len()];
    let mut pieces: Vec<(Desc, Desc, bool)> = Vec::new();
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
            fd.pieces(addr, off, len, &mut pieces);
            placed.push(Chunk {
                file: *fi,
                offset: off,
                len,
                xxh3: 0,
            });
        }
        let fds: Vec<&DataFd> = data.iter().flatten().map(|(_, fd)| fd).collect();
        if pieces.is_empty() {
            return Ok(None);
        }
        let _files_reg = register_files(agent, &fds, &files_sizes(&data, &files))?;
        let reqs = transfers(agent, XferOp::Write, &pieces)?;
        if hashes.is_empty() {
            // A full save: checksums on every core while the writes run.
            // SAFETY: the caller keeps the regions readable for the call.
            hashes = unsafe { hash_all(&chunks, progress, "save") };
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

/// The manifest of the checkpoint at `uri`: a directory, or `s3://bucket/prefix` read through
/// `agent`'s `object` backend.
pub fn read_manifest_with(agent: &Agent, uri: &str) -> Result<Manifest> {
    Ok(Opened::open(agent, uri)?.manifest)
}

/// A checkpoint location with its manifest read once (and, for a peer, the peer found: its
/// metadata fetched and its control region read), for a restore that goes on from there
/// without asking again.
pub(crate) struct Opened {
    pub uri: String,
    pub loc: Location,
    pub manifest: Manifest,
    pub peer: Option<serve::PeerCkpt>,
}

impl Opened {
    pub(crate) fn open(agent: &Agent, uri: &str) -> Result<Opened> {
        let loc = Location::parse(uri)?;
        let (manifest, peer) = match &loc {
            Location::S3 { bucket, prefix } => (
                s3::read_manifest(
                    agent,
                    &S3Loc {
                        bucket: bucket.clone(),
                        prefix: prefix.clone(),
                    },
                )?,
                None,
            ),
            Location::Peer { addr, name } => {
                let p = serve::open(agent, addr, name.as_deref(), &serve::auth())?;
                (p.manifest.clone(), Some(p))
            }
            Location::Dir(_) => (read_manifest(uri)?, None),
        };
        Ok(Opened {
            uri: uri.to_owned(),
            loc,
            manifest,
            peer,
        })
    }
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

/// A data file opened twice: buffered (any alignment) and, where possible, `O_DIRECT`.
pub(crate) struct DataFd {
    pub(crate) path: PathBuf,
    pub(crate) buffered: File,
    direct: Option<(File, FileInfo)>,
}

impl DataFd {
    pub(crate) fn open(path: &Path, write: bool, want_direct: bool) -> Result<DataFd> {
        let ctx = |what: &str| format!("{what} {}", path.display());
        let mut o = OpenOptions::new();
        if write {
            o.write(true).create_new(true);
        } else {
            o.read(true);
        }
        let buffered = o.open(path).map_err(|e| CkptError::io(ctx("open"), e))?;
        let direct = if want_direct {
            let mut o = OpenOptions::new();
            if write {
                o.write(true);
            } else {
                o.read(true);
            }
            match o.custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => {
                    let info =
                        inspect_fd(fd_of(&f)).map_err(|e| CkptError::agent(ctx("inspect"), e))?;
                    Some((f, info))
                }
                // The file system has no O_DIRECT (tmpfs): buffered it is.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                Err(e) => return Err(CkptError::io(ctx("open (O_DIRECT)"), e)),
            }
        } else {
            None
        };
        Ok(DataFd {
            path: path.to_owned(),
            buffered,
            direct,
        })
    }

    /// Splits `len` bytes at memory `addr` ↔ file offset `off` into an `O_DIRECT` piece (the
    /// aligned part) and a buffered one (the rest).
    pub(crate) fn pieces(&self, addr: u64, off: u64, len: u64, out: &mut Vec<(Desc, Desc, bool)>) {
        let mut done = 0;
        if let Some((f, info)) = &self.direct {
            if addr % info.mem_align == 0 && off % info.offset_align == 0 {
                let aligned = len - len % info.offset_align;
                if aligned > 0 {
                    out.push((
                        Desc::new(addr, aligned, 0),
                        Desc::new(off, aligned, fd_of(f)),
                        true,
                    ));
                    done = aligned;
                }
            }
        }
        if done < len {
            out.push((
                Desc::new(addr + done, len - done, 0),
                Desc::new(off + done, len - done, fd_of(&self.buffered)),
                false,
            ));
        }
    }
}

pub(crate) fn fd_of(f: &File) -> u64 {
    use std::os::fd::AsRawFd as _;
    f.as_raw_fd() as u64
}

/// Registers both fds of every data file, `sizes[i]` bytes each.
pub(crate) fn register_files(
    agent: &Agent,
    fds: &[&DataFd],
    sizes: &[u64],
) -> Result<Vec<Registration>> {
    let mut descs = Vec::new();
    for (fd, &size) in fds.iter().zip(sizes) {
        let size = size.max(1);
        descs.push(Desc::new(0, size, fd_of(&fd.buffered)));
        if let Some((f, _)) = &fd.direct {
            descs.push(Desc::new(0, size, fd_of(f)));
        }
    }
    let list = DescList::from_descs(MemKind::File, descs)
        .map_err(|e| CkptError::agent("data file descriptors", e))?;
    // SAFETY: FILE descriptors carry no memory contract; the fds outlive the registration
    // (dropped before the files are closed).
    let reg = unsafe { agent.register(&list) }
        .map_err(|e| CkptError::agent("register the data files with the agent", e))?;
    Ok(vec![reg])
}

/// Creates and posts one request for the `O_DIRECT` pieces and one for the buffered ones.
pub(crate) fn transfers(
    agent: &Agent,
    op: XferOp,
    pieces: &[(Desc, Desc, bool)],
) -> Result<Posted> {
    let mut reqs = Posted(Vec::new());
    for direct in [true, false] {
        let (mem, file): (Vec<Desc>, Vec<Desc>) = pieces
            .iter()
            .filter(|p| p.2 == direct)
            .map(|p| (p.0, p.1))
            .unzip();
        if mem.is_empty() {
            continue;
        }
        let ctx = if op == XferOp::Write {
            "write the regions to their data files"
        } else {
            "read the data files into the regions"
        };
        let local =
            DescList::from_descs(MemKind::Dram, mem).map_err(|e| CkptError::agent(ctx, e))?;
        let remote =
            DescList::from_descs(MemKind::File, file).map_err(|e| CkptError::agent(ctx, e))?;
        let req = agent
            .create_xfer(op, &local, &remote, agent.name(), XferOptions::default())
            .map_err(|e| CkptError::agent(ctx, e))?;
        req.post().map_err(|e| CkptError::agent(ctx, e))?;
        reqs.0.push(req);
    }
    Ok(reqs)
}

/// Posted requests: dropping them cancels what is still in flight and waits until no backend
/// touches the memory or the files any more (so an early return cannot close fds under them).
pub(crate) struct Posted(pub(crate) Vec<XferRequest>);

impl Drop for Posted {
    fn drop(&mut self) {
        for r in &self.0 {
            r.release();
        }
    }
}

/// xxh3 of every `(region, chunk, addr, len)` chunk, on every core.
///
/// # Safety
/// Every chunk must be valid for reads for the call.
pub(crate) unsafe fn hash_all(
    chunks: &[(usize, usize, u64, u64)],
    progress: Option<&Progress>,
    phase: &str,
) -> Vec<u64> {
    let out: Vec<AtomicU64> = chunks.iter().map(|_| AtomicU64::new(0)).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let total: u64 = chunks.iter().map(|c| c.3).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    std::thread::scope(|s| {
        for _ in 0..threads.min(chunks.len()) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(_, _, addr, len)) = chunks.get(k) else {
                    break;
                };
                // SAFETY: the caller guarantees every chunk is readable for the call.
                let bytes =
                    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len as usize) };
                out[k].store(xxh3_64(bytes), Ordering::Relaxed);
                let d = done.fetch_add(len, Ordering::Relaxed) + len;
                if let Some(p) = progress {
                    p(phase, d, total);
                }
            });
        }
    });
    out.into_iter().map(AtomicU64::into_inner).collect()
}

pub(crate) fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join(format!("{MANIFEST}.tmp-{:016x}", m.save_id));
    let bytes = m.encode();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| CkptError::io(format!("create {}", tmp.display()), e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| CkptError::io(format!("write {}", tmp.display()), e))?;
    drop(f);
    let dst = dir.join(MANIFEST);
    std::fs::rename(&tmp, &dst).map_err(|e| {
        CkptError::io(
            format!("rename {} over {}", tmp.display(), dst.display()),
            e,
        )
    })?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CkptError::io(format!("fsync directory {}", dir.display()), e))
}

/// Removes what earlier saves left in `dir` that `m` does not reference: their data files and
/// temporary manifests (a save killed before its rename leaves both).
fn remove_stale(dir: &Path, m: &Manifest) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_ours(&name) && !m.files.iter().any(|f| f.name == name) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), "could not remove a stale file: {err}");
            }
        }
    }
}

/// A chunk read: `(index of its region in the restore, chunk index, where it landed, len)`.
pub(crate) type ChunkAt = (usize, usize, u64, u64);

/// A region of a restore: the memory it goes into, its entry in the manifest, and the chunks
/// read (all of them, or a run: chunk `chunks.start` lands at `into.addr`).
pub(crate) struct Pick<'a> {
    pub into: &'a Region,
    pub entry: &'a RegionEntry,
    pub chunks: Range<usize>,
}

impl Pick<'_> {
    /// The chunks read, with their index in the region.
    pub(crate) fn each(&self) -> impl Iterator<Item = (usize, &Chunk)> {
        self.entry
            .chunks
            .iter()
            .enumerate()
            .skip(self.chunks.start)
            .take(self.chunks.len())
    }

    /// Where chunk `ci` lands.
    pub(crate) fn addr(&self, ci: usize, cs: u64) -> u64 {
        self.into.addr + (ci - self.chunks.start) as u64 * cs
    }

    /// Bytes read.
    pub(crate) fn bytes(&self) -> u64 {
        self.each().map(|(_, c)| c.len).sum()
    }
}

/// Restores the regions of the checkpoint `uri` named in `regions` into the memory they
/// describe (matched by name, kinds and lengths equal), verifying every byte before it returns
/// `Ok`. Every DRAM region must lie inside a registration of `agent`, and the agent must run a
/// backend that reads files (`uring` or `posix`). VRAM regions are read and verified in host
/// memory, then copied to the device (on the GPU the caller names; the checkpoint's ordinal is
/// informational here).
///
/// Everything that can be checked before memory is written is (the manifest, names, lengths,
/// data files present and long enough); a checksum mismatch found afterwards says that the
/// caller's memory was partly written.
///
/// # Safety
/// Every region's memory must stay valid for writes for the whole call, and no Rust reference
/// to it may be held meanwhile.
pub unsafe fn restore(
    agent: &Agent,
    uri: &str,
    regions: &[Region],
    opts: &RestoreOptions,
) -> Result<u64> {
    let src = Opened::open(agent, uri)?;
    // SAFETY: the caller's contract is this function's.
    unsafe { restore_opened(agent, &src, regions, opts) }
}

/// [`restore`] from a location already opened.
///
/// # Safety
/// As [`restore`].
pub(crate) unsafe fn restore_opened(
    agent: &Agent,
    src: &Opened,
    regions: &[Region],
    opts: &RestoreOptions,
) -> Result<u64> {
    match HostStage::new(agent, regions)? {
        // SAFETY: the caller's contract is this function's.
        None => unsafe { restore_into_opened(agent, src, regions, regions, opts) },
        Some(st) => {
            // SAFETY: the host copies are ours and live as long as `st`.
            let n = unsafe { restore_into_opened(agent, src, regions, &st.regions, opts) }?;
            // SAFETY: the caller keeps the VRAM regions writable for the call.
            unsafe { st.upload(regions) }?;
            Ok(n)
        }
    }
}

/// [`restore`] of the regions `asked` (what the checkpoint's entries are checked against)
/// into the memory of `into` (same order, names and lengths; registered host memory), from a
/// location already opened.
///
/// # Safety
/// As [`restore`], for `into`.
pub(crate) unsafe fn restore_into_opened(
    agent: &Agent,
    src: &Opened,
    asked: &[Region],
    into: &[Region],
    opts: &RestoreOptions,
) -> Result<u64> {
    // SAFETY: the caller's contract is this function's.
    unsafe { restore_chunks(agent, src, asked, into, None, opts) }
}

/// [`restore_into_opened`] of the chunks `runs[i]` of region `i` only (all when `None`): the
/// first chunk of a run lands at the start of its region in `into`. Returns the bytes read.
///
/// # Safety
/// As [`restore`], for the memory of `into` that the chunks read land in.
pub(crate) unsafe fn restore_chunks(
    agent: &Agent,
    src: &Opened,
    asked: &[Region],
    into: &[Region],
    runs: Option<&[Range<usize>]>,
    opts: &RestoreOptions,
) -> Result<u64> {
    let regions = asked;
    let m = &src.manifest;
    if regions.is_empty() {
        return Err(CkptError::InvalidArgument("no regions named".into()));
    }
    let mut chosen: Vec<Pick> = Vec::with_capacity(regions.len());
    for (i, r) in regions.iter().enumerate() {
        if regions[..i].iter().any(|o| o.name == r.name) {
            return Err(CkptError::InvalidArgument(format!(
                "region {:?} named twice",
                r.name
            )));
        }
        let e = m.find(&r.name)?;
        if e.kind != r.kind || e.len != r.len {
            return Err(CkptError::Mismatch {
                region: r.name.clone(),
                reason: format!(
                    "checkpoint has {} bytes of {}, the caller gave {} bytes of {}",
                    e.len, e.kind, r.len, r.kind
                ),
            });
        }
        let chunks = match runs {
            Some(rs) => {
                let r = rs.get(i).cloned().unwrap_or(0..0);
                if r.start > r.end || r.end > e.chunks.len() {
                    return Err(CkptError::InvalidArgument(format!(
                        "chunks {r:?} of region {:?}, which has {}",
                        e.name,
                        e.chunks.len()
                    )));
                }
                r
            }
            None => 0..e.chunks.len(),
        };
        chosen.push(Pick {
            into: &into[i],
            entry: e,
            chunks,
        });
    }
    let (chunks, hashed) = match (&src.loc, &src.peer) {
        (Location::S3 { bucket, prefix }, _) => {
            let loc = S3Loc {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            };
            // SAFETY: the caller's contract is this function's.
            (
                unsafe { s3::read_regions(agent, &loc, m, &chosen, opts) }?,
                None,
            )
        }
        (Location::Dir(dir), _) => (read_files(agent, dir, m, &chosen, opts)?, None),
        (Location::Peer { .. }, Some(p)) => {
            // SAFETY: the caller's contract is this function's.
            let (c, h) = unsafe { serve::read_regions(agent, p, &chosen, opts) }?;
            (c, Some(h))
        }
        (Location::Peer { addr, .. }, None) => {
            return Err(CkptError::InvalidArgument(format!(
                "nixl://{addr} ({}): the peer was not opened",
                src.uri
            )))
        }
    };
    let total: u64 = chosen.iter().map(Pick::bytes).sum();
    // SAFETY: the caller keeps the regions valid for the call; the reads have ended.
    let got =
        hashed.unwrap_or_else(|| unsafe { hash_all(&chunks, opts.progress.as_ref(), "verify") });
    for (k, &(ri, ci, _, _)) in chunks.iter().enumerate() {
        let want = chosen[ri].entry.chunks[ci].xxh3;
        if got[k] != want {
            return Err(CkptError::Corrupt {
                region: chosen[ri].into.name.clone(),
                chunk: Some(ci),
                reason: format!(
                    "checksum mismatch (manifest xxh3 {want:016x}, data {:016x})",
                    got[k]
                ),
                memory_written: true,
            });
        }
    }
    Ok(total)
}

/// Reads the chunks of `chosen` from the data files in `dir` into the caller's regions; returns
/// the chunks read, `(index in chosen, chunk, addr, len)`, for the caller to verify.
fn read_files(
    agent: &Agent,
    dir: &Path,
    m: &Manifest,
    chosen: &[Pick],
    opts: &RestoreOptions,
) -> Result<Vec<(usize, usize, u64, u64)>> {
    // Open every data file needed, checking it is there and long enough.
    let mut open: Vec<(u32, DataFd)> = Vec::new();
    let mut pieces = Vec::new();
    let mut chunks = Vec::new();
    for (ri, pk) in chosen.iter().enumerate() {
        let r = pk.into;
        for (ci, c) in pk.each() {
            let corrupt = |reason: String| CkptError::Corrupt {
                region: r.name.clone(),
                chunk: Some(ci),
                reason,
                memory_written: false,
            };
            let pos = match open.iter().position(|(f, _)| *f == c.file) {
                Some(p) => p,
                None => {
                    let name = &m.files[c.file as usize].name;
                    let path = dir.join(name);
                    let fd = match DataFd::open(&path, false, opts.direct) {
                        Ok(fd) => fd,
                        Err(CkptError::Io { source, .. })
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            return Err(corrupt(format!(
                                "data file {name:?} is missing{}",
                                crate::ops::base_note(m, name)
                            )));
                        }
                        Err(e) => return Err(e),
                    };
                    open.push((c.file, fd));
                    open.len() - 1
                }
            };
            let fd = &open[pos].1;
            let size = fd
                .buffered
                .metadata()
                .map_err(|e| CkptError::io(format!("stat {}", fd.path.display()), e))?
                .len();
            if c.offset + c.len > size {
                return Err(corrupt(format!(
                    "data file {:?} is truncated: {size} bytes, the chunk needs {}",
                    m.files[c.file as usize].name,
                    c.offset + c.len
                )));
            }
            let addr = pk.addr(ci, m.chunk_size);
            fd.pieces(addr, c.offset, c.len, &mut pieces);
            chunks.push((ri, ci, addr, c.len));
        }
    }
    let fds: Vec<&DataFd> = open.iter().map(|(_, fd)| fd).collect();
    let sizes: Vec<u64> = open
        .iter()
        .map(|(fi, _)| m.files[*fi as usize].size)
        .collect();
    let _reg = register_files(agent, &fds, &sizes)?;
    if let Some(p) = &opts.progress {
        p("read", 0, chosen.iter().map(Pick::bytes).sum());
    }
    let reqs = transfers(agent, XferOp::Read, &pieces)?;
    let failed = reqs
        .0
        .iter()
        .find_map(|r| r.wait_blocking(None).into_result().err());
    drop(reqs);
    if let Some(e) = failed {
        return Err(CkptError::Corrupt {
            region: chosen
                .iter()
                .map(|pk| pk.into.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            chunk: None,
            reason: format!("reading the data files failed: {e}"),
            memory_written: true,
        });
    }
    Ok(chunks)
}
