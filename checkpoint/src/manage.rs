//! Copying and removing checkpoints through an agent: between directories, object stores
//! (`s3://`) and, as a source, peers (`nixl://`).

use std::ops::Range;
use std::os::unix::fs::FileExt as _;

use nixl_core::{Agent, Desc, DescList, MemKind};

use crate::dir::{read_manifest_with, restore_chunks, write_manifest, Opened, Progress, Region};
use crate::error::{CkptError, Result};
use crate::fetch::{local_files, put_files, TempDir};
use crate::manifest::{Chunk, DataFile, Manifest};
use crate::mapped::map;
use crate::ops::{self, Location};
use crate::s3::{self, S3Loc};
use crate::RestoreOptions;

/// Most host memory [`copy_with`] stages at once (the bound is raised to one chunk when a
/// chunk is larger).
pub const COPY_BUFFER: u64 = 256 << 20;

/// Copies the checkpoint `src` to `dst` (each a directory or `s3://bucket/prefix`; `src` may
/// also be `nixl://HOST:PORT`), into a self-contained checkpoint (an incremental one loses its
/// dependence on its base) with the same regions, recorded addresses, chunk size and
/// metadata, and its artifact directories. `dst` must not hold a checkpoint.
///
/// Between two directories this is [`ops::copy`] (streamed, no agent work). Otherwise the
/// checkpoint is streamed through one staging buffer of at most [`COPY_BUFFER`] bytes
/// registered with `agent` (see [`copy_with_buffer`]), run of chunks by run of chunks: each run
/// is read, verified against the source's manifest, and written to `dst` (a data file per
/// region in a directory, an object per run under `s3://`); the manifest is written last, and
/// every run is read back from `dst` and verified again before the call returns. `agent` needs
/// the backends of both ends: `uring` or `posix` for directories, `object` for `s3://`, `tcp`
/// for `nixl://`.
///
/// Artifact directories are carried as their data files: fetched from `s3://` or `nixl://`
/// into a private temporary directory, every file checked against the manifest as it is
/// copied (one data file per artifact at `dst`, an object under `s3://`).
pub fn copy_with(
    agent: &Agent,
    src: &str,
    dst: &str,
    progress: Option<&Progress>,
) -> Result<Manifest> {
    copy_with_buffer(agent, src, dst, progress, COPY_BUFFER)
}

/// [`copy_with`] staging at most `buffer` bytes at once (at least one chunk, whatever `buffer`
/// says).
pub fn copy_with_buffer(
    agent: &Agent,
    src: &str,
    dst: &str,
    progress: Option<&Progress>,
    buffer: u64,
) -> Result<Manifest> {
    let (sl, dl) = (Location::parse(src)?, Location::parse(dst)?);
    if matches!((&sl, &dl), (Location::Dir(_), Location::Dir(_))) {
        return ops::copy(src, dst, progress);
    }
    if let Location::Peer { addr, .. } = &dl {
        return Err(CkptError::Unsupported(format!(
            "nixl://{addr}: a copy goes to a directory or s3://; to serve a checkpoint from \
             memory, run `nixl-ckpt serve` on it"
        )));
    }
    match read_manifest_with(agent, dst) {
        Err(CkptError::NoCheckpoint { .. }) => {}
        Ok(_) => {
            return Err(CkptError::InvalidArgument(format!(
                "{dst} already holds a checkpoint (remove it first)"
            )))
        }
        Err(e) => return Err(e),
    }
    let source = Opened::open(agent, src)?;
    let m = &source.manifest;
    let cs = m.chunk_size;
    // Runs of consecutive chunks of one region, each at most `per` chunks.
    let per = (buffer / cs).max(1) as usize;
    let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
    for (ri, e) in m.regions.iter().enumerate() {
        let n = e.chunks.len();
        runs.extend((0..n).step_by(per).map(|a| (ri, a..(a + per).min(n))));
    }
    let run_bytes = |ri: usize, r: &Range<usize>| -> u64 {
        m.regions[ri].chunks[r.clone()].iter().map(|c| c.len).sum()
    };
    let staged = runs
        .iter()
        .map(|(ri, r)| run_bytes(*ri, r))
        .max()
        .unwrap_or(0);
    let total = m.total_bytes();
    let id = nixl_core::random_u64().map_err(|e| CkptError::agent("random save id", e))?;
    let mut out = m.clone();
    out.save_id = id;
    out.base = None;
    out.files = Vec::new();
    out.created_unix_ms = crate::dir::now_ms();

    // The staging buffer, registered with the agent.
    let buf = map(None, staged.max(1), "the copy's staging buffer")?;
    let _buf = Unmap(buf.addr, buf.len);
    let list = DescList::from_descs(
        MemKind::Dram,
        vec![Desc::new(buf.addr as u64, buf.len as u64, 0)],
    )
    .map_err(|e| CkptError::agent("copy buffer", e))?;
    // SAFETY: the buffer is mapped until `_buf` drops, after the registration (declared later,
    // dropped first), and is touched only through the agent and below between transfers.
    let reg = unsafe { agent.register(&list) }
        .map_err(|e| CkptError::agent("register the copy buffer", e))?;

    // Reads the chunks `r` of region `ri` of `from` into the buffer, every chunk verified.
    let read_run = |from: &Opened, ri: usize, r: &Range<usize>| -> Result<u64> {
        let e = &from.manifest.regions[ri];
        let asked = [Region {
            name: e.name.clone(),
            kind: e.kind,
            addr: e.addr,
            len: e.len,
            dev_id: e.dev_id,
        }];
        let into = [Region::dram(e.name.clone(), buf.addr as u64, e.len)];
        // SAFETY: the run's chunks land in the registered buffer, which holds the largest run;
        // nothing else touches it meanwhile.
        unsafe {
            restore_chunks(
                agent,
                from,
                &asked,
                &into,
                Some(std::slice::from_ref(r)),
                &RestoreOptions::default(),
            )
        }
    };

    let mut done = 0u64;
    match &dl {
        Location::Dir(ddir) => {
            std::fs::create_dir_all(ddir)
                .map_err(|e| CkptError::io(format!("create {}", ddir.display()), e))?;
            let files = ops::new_data_files(ddir, id, &mut out)?;
            for (ri, r) in &runs {
                let n = read_run(&source, *ri, r)?;
                // SAFETY: the run has landed in the buffer (its READ ended) and no transfer
                // touches the buffer until the next run.
                let bytes =
                    unsafe { std::slice::from_raw_parts(buf.addr as *const u8, n as usize) };
                files[*ri]
                    .write_all_at(bytes, r.start as u64 * cs)
                    .map_err(|e| CkptError::io(format!("write in {}", ddir.display()), e))?;
                done += n;
                if let Some(p) = progress {
                    p("copy", done, total);
                }
            }
            for f in &files {
                f.sync_all()
                    .map_err(|e| CkptError::io(format!("fsync in {}", ddir.display()), e))?;
            }
            if !m.artifacts.is_empty() {
                let tmp = TempDir::new("copy")?;
                let (sdir, local) = local_files(agent, &source, &m.artifacts, &tmp.0, "(all)")?;
                let first = out.files.len();
                crate::artifact::copy_artifacts(&sdir, &local, ddir, id, first, &mut out)?;
            }
            out.validate()?;
            write_manifest(ddir, &out)?;
        }
        Location::S3 { bucket, prefix } => {
            let loc = S3Loc {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            };
            for (k, (ri, r)) in runs.iter().enumerate() {
                let n = read_run(&source, *ri, r)?;
                let name = format!("d{id:016x}-{k}.dat");
                s3::put_data(agent, &loc, &name, Desc::new(buf.addr as u64, n, 0))?;
                out.files.push(DataFile { name, size: n });
                for ci in r.clone() {
                    let c = &mut out.regions[*ri].chunks[ci];
                    *c = Chunk {
                        file: k as u32,
                        offset: (ci - r.start) as u64 * cs,
                        ..*c
                    };
                }
                done += n;
                if let Some(p) = progress {
                    p("copy", done, total);
                }
            }
            if !m.artifacts.is_empty() {
                // Packed as a directory copy packs them, then PUT an object per artifact.
                let (tmp, pack) = (TempDir::new("copy")?, TempDir::new("pack")?);
                let (sdir, local) = local_files(agent, &source, &m.artifacts, &tmp.0, "(all)")?;
                let first = out.files.len();
                crate::artifact::copy_artifacts(&sdir, &local, &pack.0, id, first, &mut out)?;
                put_files(agent, &loc, &pack.0, &out.files[first..])?;
            }
            s3::put_manifest(agent, &loc, &out)?;
        }
        Location::Peer { .. } => unreachable!("refused above"),
    }
    // Read back what was stored, every chunk checked against the new manifest.
    let stored = Opened::open(agent, dst)?;
    if stored.manifest != out {
        return Err(CkptError::Manifest(format!(
            "{dst}: the manifest read back differs from the one written"
        )));
    }
    let mut checked = 0u64;
    for (ri, r) in &runs {
        checked += read_run(&stored, *ri, r)?;
        if let Some(p) = progress {
            p("verify", checked, total);
        }
    }
    drop(reg);
    Ok(out)
}

/// Unmaps a mapping made by [`map`] when dropped.
struct Unmap(usize, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map`, and the registration of it was dropped first.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

/// Removes the checkpoint at `uri`: a directory ([`ops::remove`]) or `s3://bucket/prefix` (the
/// manifest object first, so that a removal cut short never leaves something that restores as
/// valid, then the data objects directly under the prefix; objects of another checkpoint it
/// references stay). Returns the files or objects removed.
///
/// Refused with [`CkptError::HasDependents`] when checkpoints beside it (same parent directory,
/// or same parent prefix in the bucket) are incremental saves over it; see [`ops::dependents`]
/// and [`remove_with_opts`].
pub fn remove_with(agent: &Agent, uri: &str) -> Result<usize> {
    remove_with_opts(agent, uri, &ops::RemoveOptions::default())
}

/// [`remove_with`] with options (`force`: remove it even when incremental checkpoints over it
/// are found).
pub fn remove_with_opts(agent: &Agent, uri: &str, opts: &ops::RemoveOptions) -> Result<usize> {
    match Location::parse(uri)? {
        Location::S3 { bucket, prefix } => s3::remove(agent, &S3Loc { bucket, prefix }, opts.force),
        Location::Dir(_) => ops::remove_opts(uri, opts),
        Location::Peer { addr, .. } => Err(CkptError::Unsupported(format!(
            "nixl://{addr}: a served checkpoint is removed by stopping its server"
        ))),
    }
}
