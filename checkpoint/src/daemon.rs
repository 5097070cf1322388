//! A checkpoint held in a node daemon's memory pool (`nixl-agent serve` with `[daemon]
//! pool_size`), served by the daemon's agent to peers that restore from `nixl://HOST:PORT`
//! (the daemon's tcp listener) exactly as from `nixl-ckpt serve`.
//!
//! [`serve_in_daemon`] takes one lease of the daemon's pool per region (`NAME/r<i>`), one per
//! data file of its artifact directories (`NAME/a<j>`) and one for the control region
//! (`NAME/control`), restores the checkpoint into the leases (mapped into
//! this process, registered with the caller's agent for the reads, every byte verified), then
//! writes the control region ([`mod@crate::serve`]'s layout, with the regions at the leases'
//! addresses in the daemon's agent), its header page last, so that a peer probing meanwhile
//! finds nothing rather than half a checkpoint. The leases outlive this process: the daemon
//! serves them until [`release_from_daemon`] (control region first). A failure releases the
//! leases taken.
//!
//! A daemon holds any number of checkpoints, each under its own name: restorers ask for one
//! with `nixl://HOST:PORT/NAME` (without a name they take the only one, and are refused, with
//! the names listed, when there are several).

use std::path::Path;

use nixl_agent::pool_client::{LeaseInfo, MappedLease, PoolClient};
use nixl_core::{Agent, Desc, DescList, MemKind};

use crate::dir::{read_manifest_with, restore, Region, RestoreOptions};
use crate::error::{CkptError, Result};
use crate::manifest::{Manifest, MAX_FILES, MAX_REGIONS};
use crate::serve::{control_bytes, HEADER};

/// A checkpoint placed in a daemon's pool.
#[derive(Clone, Debug)]
pub struct DaemonServed {
    /// The leases' name prefix.
    pub name: String,
    /// The daemon's tcp listeners (`HOST:PORT`): restorers use `nixl://` one of them.
    pub tcp_listen: Vec<String>,
    /// The control region's lease, then each region's, in manifest order.
    pub leases: Vec<LeaseInfo>,
    /// The checkpoint's manifest.
    pub manifest: Manifest,
}

fn pool_err(what: String) -> impl FnOnce(nixl_agent::pool_client::PoolError) -> CkptError {
    move |e| CkptError::InvalidArgument(format!("{what}: {e}"))
}

/// Loads the checkpoint at `uri` (read through `agent`: a directory, `s3://`, or a peer) into
/// leases of the daemon whose control socket is `control_socket`, named `NAME/...`, and
/// publishes it there for peers. DRAM regions only.
pub fn serve_in_daemon(
    agent: &Agent,
    uri: &str,
    control_socket: &Path,
    name: &str,
) -> Result<DaemonServed> {
    crate::serve::check_name(name).map_err(CkptError::InvalidArgument)?;
    let m = read_manifest_with(agent, uri)?;
    if let Some(e) = m.regions.iter().find(|e| e.kind != MemKind::Dram) {
        return Err(CkptError::Unsupported(format!(
            "region {:?} is {}: only DRAM regions are served to peers",
            e.name, e.kind
        )));
    }
    let pool = PoolClient::new(control_socket);
    let ctrl_name = format!("{name}/control");
    if pool
        .find(&ctrl_name)
        .map_err(pool_err(format!("daemon at {}", control_socket.display())))?
        .is_some()
    {
        return Err(CkptError::InvalidArgument(format!(
            "the daemon already holds a checkpoint named {name:?} (release it first)"
        )));
    }
    let mut taken: Vec<String> = Vec::new();
    let r = place(agent, uri, &m, &pool, name, &mut taken);
    if r.is_err() {
        for n in taken.iter().rev() {
            let _ = pool.release(n);
        }
    }
    let leases = r?;
    let status = pool
        .control()
        .get("/v1/status")
        .map_err(|e| CkptError::InvalidArgument(format!("daemon status: {e}")))?;
    let tcp_listen = status["tcp_listen"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(DaemonServed {
        name: name.to_owned(),
        tcp_listen,
        leases,
        manifest: m,
    })
}

fn place(
    agent: &Agent,
    uri: &str,
    m: &Manifest,
    pool: &PoolClient,
    name: &str,
    taken: &mut Vec<String>,
) -> Result<Vec<LeaseInfo>> {
    let mut maps: Vec<MappedLease> = Vec::with_capacity(m.regions.len());
    for (i, e) in m.regions.iter().enumerate() {
        let n = format!("{name}/r{i}");
        let l = pool
            .lease(&n, e.len)
            .map_err(pool_err(format!("lease {n:?} of {} bytes", e.len)))?;
        taken.push(n);
        maps.push(l);
    }
    let into: Vec<Region> = m
        .regions
        .iter()
        .zip(&maps)
        .map(|(e, l)| Region::dram(e.name.clone(), l.as_ptr() as u64, e.len))
        .collect();
    {
        let list = DescList::from_descs(
            MemKind::Dram,
            into.iter()
                .map(|r| Desc::new(r.addr, r.len, 0))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| CkptError::agent("lease mappings", e))?;
        // SAFETY: the mappings live in `maps` until after the registration is dropped (end of
        // this block); nothing else writes the new leases (no peer knows of them yet).
        let _reg = unsafe { agent.register(&list) }
            .map_err(|e| CkptError::agent("register the lease mappings", e))?;
        // SAFETY: as above; the restore is the only writer for the call.
        unsafe { restore(agent, uri, &into, &RestoreOptions::default()) }?;
    }
    let at: Vec<Desc> = maps
        .iter()
        .zip(&m.regions)
        .map(|(l, e)| Desc::new(l.info().addr, e.len, 0))
        .collect();
    // The artifacts' data files, a lease each (NAME/a<j>).
    let src = crate::dir::Opened::open(agent, uri)?;
    let mut table = Vec::new();
    for (j, (i, bytes)) in crate::fetch::artifact_file_bytes(agent, &src)?
        .into_iter()
        .filter(|(_, b)| !b.is_empty())
        .enumerate()
    {
        let n = format!("{name}/a{j}");
        let mut l = pool
            .lease(&n, bytes.len() as u64)
            .map_err(pool_err(format!("lease {n:?} of {} bytes", bytes.len())))?;
        taken.push(n);
        // SAFETY: a new lease that no peer knows of yet (the control region comes last).
        let dst = unsafe { l.as_mut_slice() };
        dst[..bytes.len()].copy_from_slice(&bytes);
        table.push((i, Desc::new(l.info().addr, bytes.len() as u64, 0)));
        maps.push(l);
    }
    let ctrl = control_bytes(m, &at, name, &table);
    let n = format!("{name}/control");
    let mut cl = pool
        .lease(&n, ctrl.len() as u64)
        .map_err(pool_err(format!("lease {n:?}")))?;
    taken.push(n);
    // SAFETY: a new lease; peers that probe it before the header is written find no magic.
    let dst = unsafe { cl.as_mut_slice() };
    let h = HEADER as usize;
    dst[h..ctrl.len()].copy_from_slice(&ctrl[h..]);
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    dst[..h].copy_from_slice(&ctrl[..h]);
    let mut out = vec![cl.info().clone()];
    out.extend(maps.iter().map(|l| l.info().clone()));
    Ok(out)
}

/// Releases the checkpoint `name` held by the daemon at `control_socket`: the control region
/// first (restorers stop finding it), then the regions. Returns the leases released.
pub fn release_from_daemon(control_socket: &Path, name: &str) -> Result<usize> {
    let pool = PoolClient::new(control_socket);
    let what = format!("daemon at {}", control_socket.display());
    let ctrl = format!("{name}/control");
    let mut n = 0;
    if pool.find(&ctrl).map_err(pool_err(what.clone()))?.is_some() {
        pool.release(&ctrl)
            .map_err(pool_err(format!("release {ctrl:?}")))?;
        n += 1;
    }
    for (prefix, most) in [("r", MAX_REGIONS), ("a", MAX_FILES)] {
        for i in 0..most {
            let r = format!("{name}/{prefix}{i}");
            if pool.find(&r).map_err(pool_err(what.clone()))?.is_none() {
                break;
            }
            pool.release(&r)
                .map_err(pool_err(format!("release {r:?}")))?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(CkptError::NoCheckpoint {
            location: what,
            reason: format!("no leases named {name}/..."),
        });
    }
    Ok(n)
}
