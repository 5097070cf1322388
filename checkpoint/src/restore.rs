//! Restore of registered regions from a checkpoint (a directory, `s3://`, or a peer), every
//! byte verified.

use std::io;
use std::ops::Range;
use std::path::Path;

use nixl_core::{Agent, MemKind, XferOp};

use crate::error::{CkptError, Result};
use crate::manifest::{Chunk, Manifest, RegionEntry};
use crate::ops::{read_manifest, Location};
use crate::s3::{self, S3Loc};
use crate::serve;
use crate::vram::{self, DataPath, HostStage, GDS_ALIGN};

use crate::dir::{Region, RestoreOptions};
use crate::files::{gds_transfers, register_files, transfers, DataFd};

/// What [`restore_report`] did.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    /// Bytes restored (every one verified).
    pub bytes: u64,
    /// How each region's bytes moved (`(name, path)`, in the order given): host memory, VRAM
    /// through `gds`, or VRAM staged through host memory with the reason (see [`crate::vram`]).
    pub paths: Vec<(String, DataPath)>,
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
    /// `Corrupt` for a read into the regions of `picks` that failed once their memory may have
    /// been written, naming every one of them.
    pub(crate) fn read_failed(picks: &[Pick], reason: String) -> CkptError {
        CkptError::Corrupt {
            region: crate::manifest::names(picks.iter().map(|pk| pk.into.name.as_str())),
            chunk: None,
            reason,
            memory_written: true,
        }
    }

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
/// backend that reads files (`uring` or `posix`). VRAM regions are read from a directory
/// through the agent's `gds` backend where it runs and the region allows
/// ([`vram::choose_path`]; each chunk is then copied back to a host buffer to be verified),
/// otherwise read and verified in host memory, then copied to the device (on the GPU the caller
/// names; the checkpoint's ordinal is informational here). [`restore_report`] says which.
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
    // SAFETY: the caller's contract is this function's.
    unsafe { restore_report(agent, uri, regions, opts) }.map(|r| r.bytes)
}

/// [`restore`], saying how each region's bytes moved.
///
/// # Safety
/// As [`restore`].
pub unsafe fn restore_report(
    agent: &Agent,
    uri: &str,
    regions: &[Region],
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let src = Opened::open(agent, uri)?;
    // SAFETY: the caller's contract is this function's.
    unsafe { restore_opened_report(agent, &src, regions, opts) }
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
    // SAFETY: the caller's contract is this function's.
    unsafe { restore_opened_report(agent, src, regions, opts) }.map(|r| r.bytes)
}

/// [`restore_opened`], saying how each region's bytes moved.
///
/// # Safety
/// As [`restore`].
unsafe fn restore_opened_report(
    agent: &Agent,
    src: &Opened,
    regions: &[Region],
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let dir = match &src.loc {
        Location::Dir(d) => Some(d.as_path()),
        _ => None,
    };
    let aligned = |i: usize| {
        src.manifest
            .find(&regions[i].name)
            .is_ok_and(|e| e.chunks.iter().all(|c| c.offset % GDS_ALIGN == 0))
    };
    let paths = vram::plan(agent, regions, dir, false, opts.direct, aligned);
    let bytes = match HostStage::new(agent, regions, &paths)? {
        // SAFETY: the caller's contract is this function's.
        None => unsafe { restore_into_opened(agent, src, regions, regions, opts) },
        Some(st) => {
            // SAFETY: the host copies are ours and live as long as `st`.
            let n = unsafe { restore_into_opened(agent, src, regions, &st.regions, opts) }?;
            // SAFETY: the caller keeps the VRAM regions writable for the call.
            unsafe { st.upload(regions) }?;
            Ok(n)
        }
    }?;
    Ok(RestoreReport {
        bytes,
        paths: regions.iter().map(|r| r.name.clone()).zip(paths).collect(),
    })
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
    let got = match hashed {
        Some(h) => h,
        None => {
            let into: Vec<&Region> = chosen.iter().map(|pk| pk.into).collect();
            // SAFETY: the caller keeps the regions valid for the call; the reads have ended.
            unsafe { vram::hash_chunks(&into, &chunks, opts.progress.as_ref(), "verify") }.map_err(
                |e| {
                    let why = format!("reading the restored bytes back to verify them failed: {e}");
                    Pick::read_failed(&chosen, why)
                },
            )?
        }
    };
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
    // Pieces into VRAM (regions going through `gds`), with their device.
    let mut vpieces = Vec::new();
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
            if r.kind == MemKind::Vram {
                let from = vpieces.len();
                fd.pieces(addr, c.offset, c.len, &mut vpieces);
                for p in &mut vpieces[from..] {
                    p.0.dev_id = r.dev_id;
                }
            } else {
                fd.pieces(addr, c.offset, c.len, &mut pieces);
            }
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
    // The VRAM requests first: one that cannot be made fails before any memory is written.
    let mut reqs = gds_transfers(agent, XferOp::Read, &vpieces)?;
    reqs.0
        .append(&mut transfers(agent, XferOp::Read, &pieces)?.0);
    let failed = reqs
        .0
        .iter()
        .find_map(|r| r.wait_blocking(None).into_result().err());
    drop(reqs);
    if let Some(e) = failed {
        return Err(Pick::read_failed(
            chosen,
            format!("reading the data files failed: {e}"),
        ));
    }
    Ok(chunks)
}
