//! Serving a model from the per-node daemon's host memory pool (`nixl-weights serve --daemon`).
//!
//! The CLI takes two leases of the daemon's pool through [`nixl_agent::pool_client`]: the data
//! (`nixl-weights/<model>/data`, the files at their [`FILE_ALIGN`](crate::manifest::FILE_ALIGN)
//! offsets) and the control region (`nixl-weights/<model>/ctrl`: header, manifest, have bytes,
//! laid out as [`crate::publish`] describes). It maps each, reads every file once into the data
//! lease, builds the manifest, writes the control lease last, and exits. Each lease is a region
//! of the daemon's agent, so pullers pointed at the daemon's tcp listener (`--source`) find the
//! control region among its regions and READ the data as from any origin: nothing changes for
//! them. Where the daemon has an `[etcd]` section, it also announces itself as a source of the
//! model (a `publish` job under `/nixl/weights/<model>/`, as [`crate::pull::announce`] does for
//! a CLI origin), so pullers with `--etcd` find it. The daemon serves the model until the leases
//! are released ([`release`], or `DELETE /v1/jobs/ID`); a restart of the daemon forgets it.
//!
//! The daemon's copy is checked against the files while they are read (a file that changes
//! meanwhile is refused); after that it is the model as loaded, whatever happens on disk.

use std::path::Path;

use nixl_agent::pool_client::{LeaseInfo, PoolClient};
use nixl_core::Desc;

use crate::error::{Error, Result};
use crate::publish::{fill_control, header_for};
use crate::source::{Plan, SourceOptions};

/// A model the daemon serves.
#[derive(Clone, Debug)]
pub struct DaemonModel {
    /// The manifest.
    pub manifest: crate::Manifest,
    /// The control lease.
    pub ctrl: LeaseInfo,
    /// The data lease.
    pub data: LeaseInfo,
    /// The daemon's tcp listener(s): what pullers name with `--source`.
    pub tcp_listen: Vec<String>,
    /// How the files were read.
    pub read: crate::source::ReadModes,
    /// The `publish` job that announces the daemon in etcd as a source of the model (when the
    /// daemon has `[etcd]`).
    pub publish_job: Option<u64>,
}

/// The etcd prefix under which sources of `model` announce themselves.
pub fn etcd_prefix(model: &str) -> String {
    format!("{}{model}/", crate::ETCD_PREFIX)
}

/// The running `publish` job of `prefix`, if any.
fn publish_job(pool: &PoolClient, prefix: &str) -> Result<Option<u64>> {
    let jobs = pool
        .control()
        .get("/v1/jobs")
        .map_err(|e| pool_err("listing the daemon's jobs")(e.into()))?;
    Ok(jobs["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| {
            j["kind"] == "publish" && j["state"] == "running" && j["detail"]["prefix"] == prefix
        })
        .and_then(|j| j["id"].as_u64()))
}

/// The lease names of model `name`: (control, data).
pub fn lease_names(name: &str) -> (String, String) {
    (
        format!("nixl-weights/{name}/ctrl"),
        format!("nixl-weights/{name}/data"),
    )
}

fn pool_err(what: impl Into<String>) -> impl FnOnce(nixl_agent::pool_client::PoolError) -> Error {
    let what = what.into();
    move |source| Error::Daemon { what, source }
}

/// Loads `dir` into leases of the daemon at `control_socket` and leaves it served there (see
/// the [module docs](self)). A model of that name already in the daemon is refused (release it
/// first); on any failure, the leases taken are released again.
pub fn load(control_socket: &Path, dir: &Path, opts: &SourceOptions) -> Result<DaemonModel> {
    let pool = PoolClient::new(control_socket);
    let plan = Plan::new(dir, opts)?;
    let (ctrl_name, data_name) = lease_names(&plan.name);
    let status = pool
        .control()
        .get("/v1/status")
        .map_err(|e| pool_err("asking the daemon its status")(e.into()))?;
    let tcp_listen: Vec<String> = status["tcp_listen"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let mut taken = Taken {
        pool: &pool,
        names: Vec::new(),
    };
    let mut data = pool
        .lease(&data_name, plan.len.max(1))
        .map_err(pool_err(format!("leasing {} bytes for the data", plan.len)))?;
    taken.names.push(data_name);
    // SAFETY: the lease is new and not yet described anywhere peers could learn of it (its
    // control region does not exist yet), and this process is its only client.
    let (manifest, read) = plan.fill(unsafe { data.as_mut_slice() }, opts)?;
    let enc = manifest.encode();
    let header = header_for(
        &manifest,
        &enc,
        Desc::new(data.info().addr, data.info().len, 0),
        true,
    );
    let mut ctrl = pool
        .lease(&ctrl_name, header.control_len())
        .map_err(pool_err("leasing the control region"))?;
    taken.names.push(ctrl_name);
    // SAFETY: as for the data lease: new, and only this process writes it.
    fill_control(unsafe { ctrl.as_mut_slice() }, &header, &enc)?;
    let publish_job = match status["etcd"]["state"].as_str() {
        None | Some("off") => None,
        Some(_) => {
            let prefix = etcd_prefix(&plan.name);
            let job = match publish_job(&pool, &prefix)? {
                Some(id) => id,
                None => pool
                    .control()
                    .post(
                        "/v1/jobs",
                        &serde_json::json!({ "kind": "publish", "prefix": prefix }),
                    )
                    .map_err(|e| {
                        pool_err(format!("announcing the daemon under {prefix}"))(e.into())
                    })?["id"]
                    .as_u64()
                    .unwrap_or(0),
            };
            Some(job)
        }
    };
    let m = DaemonModel {
        manifest,
        ctrl: ctrl.info().clone(),
        data: data.info().clone(),
        tcp_listen,
        publish_job,
        read,
    };
    taken.names.clear();
    tracing::info!(model = %m.manifest.model_id(), data_job = m.data.job, ctrl_job = m.ctrl.job,
        "model loaded into the daemon's pool");
    Ok(m)
}

/// Stops the daemon serving model `name`: its etcd announcement, its control lease (pullers
/// stop finding it), then its data.
pub fn release(control_socket: &Path, name: &str) -> Result<()> {
    let pool = PoolClient::new(control_socket);
    let (ctrl, data) = lease_names(name);
    if let Some(id) = publish_job(&pool, &etcd_prefix(name))? {
        pool.control()
            .delete(&format!("/v1/jobs/{id}"))
            .map_err(|e| pool_err("withdrawing the etcd announcement")(e.into()))?;
    }
    pool.release(&ctrl)
        .map_err(pool_err(format!("releasing {ctrl}")))?;
    pool.release(&data)
        .map_err(pool_err(format!("releasing {data}")))
}

/// Leases to give back if loading fails.
struct Taken<'a> {
    pool: &'a PoolClient,
    names: Vec<String>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            if let Err(e) = self.pool.release(n) {
                tracing::warn!(lease = %n, error = %e, "releasing a lease after a failed load");
            }
        }
    }
}
