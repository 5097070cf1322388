//! Copying and removing checkpoints through an agent: between directories, object stores
//! (`s3://`) and, as a source, peers (`nixl://`).

use nixl_core::{Agent, Desc, DescList, MemKind};

use crate::dir::{read_manifest_with, restore_into, save_from, Progress, Region};
use crate::error::{CkptError, Result};
use crate::manifest::Manifest;
use crate::ops::{self, Location};
use crate::s3::{self, S3Loc};
use crate::{RestoreOptions, SaveOptions};

/// Copies the checkpoint `src` to `dst` (each a directory or `s3://bucket/prefix`; `src` may
/// also be `nixl://HOST:PORT`), into a self-contained checkpoint (an incremental one loses its
/// dependence on its base) with the same regions, recorded addresses, chunk size and
/// metadata. `dst` must not hold a checkpoint.
///
/// Between two directories this is [`ops::copy`] (streamed, no agent work). Otherwise every
/// region is read into host memory registered with `agent` (the whole checkpoint is held at
/// once), every chunk verified against the source's manifest, saved to `dst` (manifest last),
/// and read back from `dst` and verified again before the call returns. `agent` needs the
/// backends of both ends: `uring` or `posix` for directories, `object` for `s3://`, `tcp` for
/// `nixl://`.
pub fn copy_with(
    agent: &Agent,
    src: &str,
    dst: &str,
    progress: Option<&Progress>,
) -> Result<Manifest> {
    let (sl, dl) = (Location::parse(src)?, Location::parse(dst)?);
    if matches!((&sl, &dl), (Location::Dir(_), Location::Dir(_))) {
        return ops::copy(src, dst, progress);
    }
    if let Location::Peer { addr } = &dl {
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
    let m = read_manifest_with(agent, src)?;
    if let Some(a) = m.artifacts.first() {
        return Err(CkptError::Unsupported(format!(
            "{src} holds artifact directories ({:?}, ...), which are stored in checkpoint \
             directories only: copy it between directories",
            a.name
        )));
    }
    let asked: Vec<Region> = m
        .regions
        .iter()
        .map(|e| Region {
            name: e.name.clone(),
            kind: e.kind,
            addr: e.addr,
            len: e.len,
            dev_id: e.dev_id,
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = m
        .regions
        .iter()
        .map(|e| vec![0u8; e.len as usize])
        .collect();
    let into: Vec<Region> = bufs
        .iter_mut()
        .zip(&m.regions)
        .map(|(b, e)| Region::dram(e.name.clone(), b.as_mut_ptr() as u64, e.len))
        .collect();
    let list = DescList::from_descs(
        MemKind::Dram,
        into.iter()
            .map(|r| Desc::new(r.addr, r.len, 0))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| CkptError::agent("copy buffers", e))?;
    // SAFETY: the buffers outlive the registration (dropped before them, at the end of this
    // function) and are touched only through the agent meanwhile.
    let reg = unsafe { agent.register(&list) }
        .map_err(|e| CkptError::agent("register the copy buffers", e))?;
    let ropts = RestoreOptions {
        progress: progress.cloned(),
        ..RestoreOptions::default()
    };
    // SAFETY: `into` is registered host memory of ours, valid for the call.
    unsafe { restore_into(agent, src, &asked, &into, &ropts) }?;
    let sopts = SaveOptions {
        chunk_size: m.chunk_size,
        metadata: Some(m.metadata.clone()),
        base: None,
        progress: progress.cloned(),
        ..SaveOptions::default()
    };
    // SAFETY: as above; the buffers are unchanged for the call.
    let rep = unsafe { save_from(agent, dst, &into, &asked, &sopts) }?;
    // Read back what was stored, every chunk checked against the new manifest.
    // SAFETY: as above.
    unsafe { restore_into(agent, dst, &asked, &into, &ropts) }?;
    drop(reg);
    drop(bufs);
    Ok(rep.manifest)
}

/// Removes the checkpoint at `uri`: a directory ([`ops::remove`]) or `s3://bucket/prefix` (the
/// manifest object first, so that a removal cut short never leaves something that restores as
/// valid, then the data objects directly under the prefix; objects of another checkpoint it
/// references stay). Returns the files or objects removed.
pub fn remove_with(agent: &Agent, uri: &str) -> Result<usize> {
    match Location::parse(uri)? {
        Location::S3 { bucket, prefix } => s3::remove(agent, &S3Loc { bucket, prefix }),
        Location::Dir(_) => ops::remove(uri),
        Location::Peer { addr } => Err(CkptError::Unsupported(format!(
            "nixl://{addr}: a served checkpoint is removed by stopping its server"
        ))),
    }
}
