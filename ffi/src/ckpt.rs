//! Checkpoint and restore of registered regions (the `nixl-checkpoint` crate) from C.

use super::*;

use nixl_checkpoint::{CkptError, Region, RestoreOptions, SaveOptions};

/// A named region of a checkpoint: memory of `kind` (`NIXL_DRAM`) at `addr`, `len` bytes, on
/// device `dev_id` (0 for DRAM).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nixl_ckpt_region {
    /// NUL-terminated UTF-8 name, unique in the checkpoint.
    pub name: *const c_char,
    /// Memory kind: `NIXL_DRAM`, or `NIXL_VRAM` (staged through host memory;
    /// `NIXL_ERR_UNAVAILABLE` without a CUDA driver).
    pub kind: i32,
    /// Virtual address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// 0 for DRAM, the GPU ordinal for VRAM.
    pub dev_id: u64,
}

fn ckpt_fail(e: CkptError) -> Fail {
    let code = match &e {
        CkptError::NotFound { .. } => NIXL_ERR_NOT_FOUND,
        CkptError::Unsupported(_) => NIXL_ERR_UNAVAILABLE,
        CkptError::Agent { source, .. } => code_of(source),
        CkptError::Io { .. } => NIXL_ERR_BACKEND,
        _ => NIXL_ERR_INVALID,
    };
    Fail::new(code, e.to_string())
}

fn regions_arg(p: *const nixl_ckpt_region, count: usize) -> Res<Vec<Region>> {
    if count == 0 {
        return Err(Fail::invalid("regions: none given (count is 0)"));
    }
    if count > nixl_checkpoint::manifest::MAX_REGIONS {
        return Err(Fail::invalid(format!(
            "regions: count {count} is over the limit of {}",
            nixl_checkpoint::manifest::MAX_REGIONS
        )));
    }
    slice_arg(p, count, "regions")?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(Region {
                name: str_arg(r.name, &format!("regions[{i}].name"))?.to_owned(),
                kind: kind_arg(r.kind)?,
                addr: r.addr,
                len: r.len,
                dev_id: r.dev_id,
            })
        })
        .collect()
}

/// Saves the named regions (each inside a registration of `agent` made with the `uring` or
/// `posix` backend) to `uri`: a directory path, or `s3://bucket/prefix` (the agent then needs
/// the `object` backend; full saves only). `base_uri` NULL: a full checkpoint; else an
/// incremental one over that base (only changed chunks are written; the base must stay).
/// The checkpoint already at `uri`, if any, is replaced only once the new one is complete and
/// durable.
///
/// # Safety
/// `regions` points to `count` regions whose names are NUL-terminated strings; the memory of
/// every region stays readable and unchanged for the call.
#[no_mangle]
pub unsafe extern "C" fn nixl_ckpt_save(
    agent: *mut nixl_agent,
    uri: *const c_char,
    regions: *const nixl_ckpt_region,
    count: usize,
    base_uri: *const c_char,
) -> nixl_status {
    let none = std::ptr::null();
    // SAFETY: the caller's contract (above) is `nixl_ckpt_save_artifacts`' with no artifacts.
    unsafe { nixl_ckpt_save_artifacts(agent, uri, regions, count, base_uri, none, none, 0) }
}

/// Restores the named regions of `uri` into the caller's registered memory described by
/// `regions` (matched by name, lengths must equal), verifying every byte;
/// `NIXL_ERR_NOT_FOUND` for a missing name, `NIXL_ERR_INVALID` for a corrupt or mismatched
/// checkpoint, with the region and chunk in `nixl_last_error`, which also says whether the
/// caller's memory was partly written.
///
/// # Safety
/// `regions` points to `count` regions whose names are NUL-terminated strings; the memory of
/// every region stays writable for the call.
#[no_mangle]
pub unsafe extern "C" fn nixl_ckpt_restore(
    agent: *mut nixl_agent,
    uri: *const c_char,
    regions: *const nixl_ckpt_region,
    count: usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let uri = str_arg(uri, "uri")?;
        let regions = regions_arg(regions, count)?;
        // SAFETY: the caller's contract (above) is `restore`'s.
        unsafe {
            nixl_checkpoint::restore(&a.shared.agent, uri, &regions, &RestoreOptions::default())
        }
        .map_err(ckpt_fail)?;
        Ok(())
    })
}

/// Most artifact directories one call takes.
const MAX_C_ARTIFACTS: usize = 4096;

/// Saves like [`nixl_ckpt_save`], plus `n_artifacts` artifact directories (file trees such as
/// kernel and compile caches): artifact `i` is the tree at `artifact_dirs[i]`, saved under the
/// name `artifact_names[i]` with a checksum per file. Directories and regular files only (a
/// symbolic link or special file in a tree fails the save naming it); into a checkpoint
/// directory or under `s3://`. Restore them with [`nixl_ckpt_restore_artifact`] (from a
/// directory, `s3://` or a peer) or [`nixl_ckpt_restore_artifact_with`].
///
/// # Safety
/// As [`nixl_ckpt_save`]; `artifact_names` and `artifact_dirs` each point to `n_artifacts`
/// NUL-terminated strings (both may be NULL when `n_artifacts` is 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_ckpt_save_artifacts(
    agent: *mut nixl_agent,
    uri: *const c_char,
    regions: *const nixl_ckpt_region,
    count: usize,
    base_uri: *const c_char,
    artifact_names: *const *const c_char,
    artifact_dirs: *const *const c_char,
    n_artifacts: usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let uri = str_arg(uri, "uri")?;
        let regions = regions_arg(regions, count)?;
        let base = if base_uri.is_null() {
            None
        } else {
            Some(str_arg(base_uri, "base_uri")?.to_owned())
        };
        if n_artifacts > MAX_C_ARTIFACTS {
            return Err(Fail::invalid(format!(
                "n_artifacts {n_artifacts} is over the limit of {MAX_C_ARTIFACTS}"
            )));
        }
        let mut artifacts = Vec::with_capacity(n_artifacts);
        if n_artifacts > 0 {
            let names = slice_arg(artifact_names, n_artifacts, "artifact_names")?;
            let dirs = slice_arg(artifact_dirs, n_artifacts, "artifact_dirs")?;
            for i in 0..n_artifacts {
                let n = str_arg(names[i], &format!("artifact_names[{i}]"))?;
                let d = str_arg(dirs[i], &format!("artifact_dirs[{i}]"))?;
                artifacts.push((n.to_owned(), std::path::PathBuf::from(d)));
            }
        }
        let opts = SaveOptions {
            base,
            artifacts,
            ..SaveOptions::default()
        };
        // SAFETY: the caller's contract (above) is `save`'s.
        unsafe { nixl_checkpoint::save(&a.shared.agent, uri, &regions, &opts) }
            .map_err(ckpt_fail)?;
        Ok(())
    })
}

/// Restores the artifact directory `name` of the checkpoint `uri` into `dest_dir`, which must
/// not exist or be an empty directory (its parent must exist). `uri` is a checkpoint
/// directory, `s3://bucket/prefix` (read by a private agent whose `object` backend is
/// configured from the standard `AWS_*` environment, as `nixl-ckpt` does), or
/// `nixl://HOST:PORT[/NAME]` (a peer serving it, read over `tcp`); to read through an agent
/// of your own configuration use [`nixl_ckpt_restore_artifact_with`]. Every file is written
/// into a hidden directory beside `dest_dir` and checked against the checkpoint before that
/// directory is renamed onto `dest_dir`: on any error `dest_dir` is left as it was.
/// `NIXL_ERR_NOT_FOUND` for a name the checkpoint lacks, `NIXL_ERR_INVALID` for a damaged
/// file (named in `nixl_last_error`), no checkpoint there, or a taken destination.
///
/// # Safety
/// The strings are NUL-terminated (or NULL: `NIXL_ERR_INVALID`).
#[no_mangle]
pub unsafe extern "C" fn nixl_ckpt_restore_artifact(
    uri: *const c_char,
    name: *const c_char,
    dest_dir: *const c_char,
) -> nixl_status {
    guard(|| {
        let uri = str_arg(uri, "uri")?;
        let name = str_arg(name, "name")?;
        let dest = std::path::Path::new(str_arg(dest_dir, "dest_dir")?);
        let backend = if uri.starts_with("s3://") {
            "object"
        } else if uri.starts_with("nixl://") {
            "tcp"
        } else {
            nixl_checkpoint::restore_artifact(uri, name, dest).map_err(ckpt_fail)?;
            return Ok(NIXL_OK);
        };
        let cfg =
            nixl_transports::config::Config::from_toml(&format!("backends = [\"{backend}\"]"))
                .and_then(|c| c.backends())
                .map_err(|e| {
                    Fail::new(
                        NIXL_ERR_INVALID,
                        format!("the private agent for {uri}: {e}"),
                    )
                })?;
        let agent = nixl_core::Agent::builder(format!("nixl-ckpt-artifact-{}", std::process::id()))
            .backends(cfg)
            .build()
            .map_err(|e| Fail::new(code_of(&e), format!("the private agent for {uri}: {e}")))?;
        nixl_checkpoint::restore_artifact_with(&agent, uri, name, dest).map_err(ckpt_fail)?;
        Ok(NIXL_OK)
    })
}

/// [`nixl_ckpt_restore_artifact`] through `agent`: `s3://` with its `object` backend (as
/// configured when the agent was made), `nixl://` with its `tcp` backend, a directory
/// directly.
///
/// # Safety
/// `agent` is NULL or a live agent; the strings are NUL-terminated (or NULL:
/// `NIXL_ERR_INVALID`).
#[no_mangle]
pub unsafe extern "C" fn nixl_ckpt_restore_artifact_with(
    agent: *mut nixl_agent,
    uri: *const c_char,
    name: *const c_char,
    dest_dir: *const c_char,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let uri = str_arg(uri, "uri")?;
        let name = str_arg(name, "name")?;
        let dest = std::path::Path::new(str_arg(dest_dir, "dest_dir")?);
        nixl_checkpoint::restore_artifact_with(&a.shared.agent, uri, name, dest)
            .map_err(ckpt_fail)?;
        Ok(())
    })
}
