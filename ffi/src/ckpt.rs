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
    if p.is_null() {
        return Err(Fail::invalid(format!("regions is NULL with count {count}")));
    }
    if !p.is_aligned() {
        return Err(Fail::invalid("regions is misaligned"));
    }
    if count > nixl_checkpoint::manifest::MAX_REGIONS {
        return Err(Fail::invalid(format!(
            "regions: count {count} is over the limit of {}",
            nixl_checkpoint::manifest::MAX_REGIONS
        )));
    }
    // SAFETY: non-NULL, aligned, count bounded; the caller passes `count` regions that stay
    // valid for the call.
    let s = unsafe { std::slice::from_raw_parts(p, count) };
    s.iter()
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
    guard(|| {
        let a = agent_ref(agent)?;
        let uri = str_arg(uri, "uri")?;
        let regions = regions_arg(regions, count)?;
        let base = if base_uri.is_null() {
            None
        } else {
            Some(str_arg(base_uri, "base_uri")?.to_owned())
        };
        let opts = SaveOptions {
            base,
            ..SaveOptions::default()
        };
        // SAFETY: the caller's contract (above) is `save`'s.
        unsafe { nixl_checkpoint::save(&a.shared.agent, uri, &regions, &opts) }
            .map_err(ckpt_fail)?;
        Ok(NIXL_OK)
    })
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
    guard(|| {
        let a = agent_ref(agent)?;
        let uri = str_arg(uri, "uri")?;
        let regions = regions_arg(regions, count)?;
        // SAFETY: the caller's contract (above) is `restore`'s.
        unsafe {
            nixl_checkpoint::restore(&a.shared.agent, uri, &regions, &RestoreOptions::default())
        }
        .map_err(ckpt_fail)?;
        Ok(NIXL_OK)
    })
}
