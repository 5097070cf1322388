//! Jobs: work the daemon does for local clients, created through the control API
//! (`POST /v1/jobs`), listed, watched and cancelled there. Later services (weight streaming,
//! checkpoint restore) add kinds; two are here:
//!
//! - `lease`: holds a named lease of the host memory pool until the job is deleted. Its
//!   `addr` is what peers name to reach it (and what a local `transfer` job refers to by name).
//! - `publish`: puts the daemon's agent metadata in etcd under another key prefix as well (as
//!   `[etcd]` configures it otherwise), kept alive until the job is deleted or the daemon
//!   drains: a service announces "this daemon serves X" (weight streaming's
//!   `/nixl/weights/<model>/`) for data it left in the daemon.
//! - `transfer`: one READ or WRITE between (part of) a lease and a peer's registered memory,
//!   through the agent (the selection policy picks the backend). Runs until it ends Done,
//!   Failed (with the reason), Cancelled (`DELETE`, or a drain past `drain_timeout`) or TimedOut.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use nixl_core::{Desc, DescList, MemKind, XferOp, XferOptions, XferRequest, XferStatus};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::serve::Daemon;

/// Jobs kept at once (ended ones are dropped oldest first past this).
pub const MAX_JOBS: usize = 1024;
/// Transfer jobs running at once.
pub const MAX_RUNNING: usize = 256;

/// A job's request body (`POST /v1/jobs`).
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobSpec {
    /// Hold a lease of the pool.
    Lease {
        /// The lease's name (unique among leases).
        name: String,
        /// Bytes, or a size such as `"64MiB"`.
        size: SizeArg,
    },
    /// Publish the agent's metadata under another etcd prefix until deleted.
    Publish {
        /// The prefix (`/` at both ends); the key is the prefix and the agent's name.
        prefix: String,
    },
    /// Move bytes between a lease and a peer.
    Transfer {
        /// `"read"` (peer to lease) or `"write"` (lease to peer).
        op: String,
        /// The local lease.
        lease: String,
        /// Offset in the lease (default 0).
        #[serde(default)]
        offset: u64,
        /// Bytes (default: the rest of the lease from `offset`).
        len: Option<u64>,
        /// The peer agent (loaded from etcd).
        peer: String,
        /// The address in the peer's registered memory (a lease's `addr` on its daemon).
        remote_addr: u64,
        /// A notification the peer receives after the data landed.
        notif: Option<String>,
    },
}

/// A size as a number of bytes or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeArg {
    /// Bytes.
    Bytes(u64),
    /// `"64MiB"`.
    Text(String),
}

/// Where a job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Holding a lease, or moving bytes.
    Running,
    /// Ended well (a lease released, a transfer Done).
    Done,
    /// Ended with this reason.
    Failed(String),
    /// Cancelled.
    Cancelled,
}

impl JobState {
    fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One job.
#[derive(Debug)]
pub(crate) struct Job {
    id: u64,
    kind: &'static str,
    created: SystemTime,
    detail: Value,
    state: Mutex<JobState>,
    /// The lease a `lease` job holds, or a `transfer` uses.
    lease: String,
    xfer: Option<Arc<XferRequest>>,
    /// A `publish` job's presence in etcd (dropped: the key goes).
    publication: Mutex<Option<nixl_discovery::Publication>>,
}

impl Job {
    fn json(&self) -> Value {
        let st = self.state.lock().clone();
        let mut v = json!({
            "id": self.id,
            "kind": self.kind,
            "state": st.name(),
            "created_unix_ms": self.created.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64).unwrap_or(0),
            "detail": self.detail,
        });
        if let JobState::Failed(why) = st {
            v["error"] = json!(why);
        }
        v
    }
}

/// The job table.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    /// Held across creating and deleting a job, so that a lease cannot be released between a
    /// transfer's check of it and the transfer's start.
    edit: Mutex<()>,
    next: AtomicU64,
    all: Mutex<BTreeMap<u64, Arc<Job>>>,
    changed: tokio::sync::Notify,
}

/// A refusal: the HTTP status and the message.
pub(crate) type Refusal = (u16, String);

impl Jobs {
    pub(crate) fn list(&self) -> Vec<Value> {
        self.all.lock().values().map(|j| j.json()).collect()
    }

    pub(crate) fn get(&self, id: u64) -> Option<Value> {
        self.all.lock().get(&id).map(|j| j.json())
    }

    /// Transfer jobs still running.
    pub(crate) fn in_flight(&self) -> usize {
        self.all
            .lock()
            .values()
            .filter(|j| j.xfer.is_some() && *j.state.lock() == JobState::Running)
            .count()
    }

    fn insert(&self, job: Arc<Job>) -> Result<(), Refusal> {
        let mut all = self.all.lock();
        if all.len() >= MAX_JOBS {
            // Forget the oldest ended job to make room; refuse if all are running.
            let old = all
                .iter()
                .find(|(_, j)| *j.state.lock() != JobState::Running)
                .map(|(id, _)| *id);
            match old {
                Some(id) => {
                    all.remove(&id);
                }
                None => return Err((429, format!("{MAX_JOBS} jobs are running; none more"))),
            }
        }
        all.insert(job.id, job);
        Ok(())
    }

    /// Cancels every running transfer; returns how many.
    pub(crate) fn cancel_all(&self) -> usize {
        let all = self.all.lock();
        let mut n = 0;
        for j in all.values() {
            if let (Some(x), JobState::Running) = (&j.xfer, &*j.state.lock()) {
                x.cancel();
                n += 1;
            }
        }
        n
    }

    /// Ends every `publish` job's presence in etcd (the drain).
    pub(crate) fn unpublish_all(&self) {
        let all: Vec<Arc<Job>> = self.all.lock().values().cloned().collect();
        for j in all {
            if j.publication.lock().take().is_some() {
                *j.state.lock() = JobState::Done;
            }
        }
    }

    /// Waits until no transfer runs, or `deadline`; true if none runs.
    pub(crate) async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }
}

/// Creates a job (the control API's `POST /v1/jobs`); returns it as JSON. Blocks (a transfer
/// to a peer not yet connected connects first): call it off the async workers.
pub(crate) fn create(d: &Arc<Daemon>, spec: JobSpec) -> Result<Value, Refusal> {
    let _edit = d.jobs.edit.lock();
    let no_pool = || {
        (
            409,
            "this daemon has no host memory pool ([daemon] pool_size = 0)".to_owned(),
        )
    };
    let id = d.jobs.next.fetch_add(1, Ordering::Relaxed) + 1;
    match spec {
        JobSpec::Publish { prefix } => {
            let Some(etcd) = &d.cfg.etcd else {
                return Err((409, "this daemon has no [etcd] to publish in".to_owned()));
            };
            if prefix.len() < 2
                || prefix.len() > 256
                || !prefix.starts_with('/')
                || !prefix.ends_with('/')
                || prefix.chars().any(char::is_control)
                || prefix == etcd.prefix
            {
                return Err((
                    400,
                    format!(
                        "prefix {prefix:?}: 2 to 256 characters, '/' at both ends, no control \
                         characters, not the daemon's own prefix"
                    ),
                ));
            }
            let cfg = nixl_discovery::EtcdConfig {
                prefix: prefix.clone(),
                ..etcd.clone()
            };
            let p = nixl_discovery::Registry::connect(&cfg)
                .and_then(|r| r.publish(&d.agent))
                .map_err(|e| (503, format!("publishing under {prefix}: {e}")))?;
            let job = Arc::new(Job {
                id,
                kind: "publish",
                created: SystemTime::now(),
                detail: json!({ "prefix": prefix, "key": p.key() }),
                state: Mutex::new(JobState::Running),
                lease: String::new(),
                xfer: None,
                publication: Mutex::new(Some(p)),
            });
            d.jobs.insert(Arc::clone(&job))?;
            tracing::info!(job = id, %prefix, "published under another prefix");
            Ok(job.json())
        }
        JobSpec::Lease { name, size } => {
            let pool = d.pool.as_ref().ok_or_else(no_pool)?;
            let len = match size {
                SizeArg::Bytes(n) => n,
                SizeArg::Text(t) => {
                    crate::config::parse_size(&t).map_err(|e| (400, e.to_string()))?
                }
            };
            let lease = pool.lease(&name, len).map_err(|e| {
                let code = match e {
                    crate::pool::LeaseError::Exists(_) => 409,
                    crate::pool::LeaseError::Invalid(_) => 400,
                    _ => 507,
                };
                (code, e.to_string())
            })?;
            let job = Arc::new(Job {
                id,
                kind: "lease",
                created: SystemTime::now(),
                detail: json!(lease),
                state: Mutex::new(JobState::Running),
                lease: name.clone(),
                xfer: None,
                publication: Mutex::new(None),
            });
            if let Err(e) = d.jobs.insert(Arc::clone(&job)) {
                let _ = pool.release(&name);
                return Err(e);
            }
            republish(d);
            tracing::info!(job = id, lease = %name, bytes = lease.len, "lease taken");
            Ok(job.json())
        }
        JobSpec::Transfer {
            op,
            lease,
            offset,
            len,
            peer,
            remote_addr,
            notif,
        } => {
            let op = match op.as_str() {
                "read" => XferOp::Read,
                "write" => XferOp::Write,
                o => return Err((400, format!("op {o:?}: \"read\" or \"write\""))),
            };
            let pool = d.pool.as_ref().ok_or_else(no_pool)?;
            if d.jobs.in_flight() >= MAX_RUNNING {
                return Err((
                    429,
                    format!("{MAX_RUNNING} transfers are running; none more"),
                ));
            }
            let l = pool
                .get(&lease)
                .ok_or_else(|| (404, format!("no lease named {lease:?}")))?;
            let len = len.unwrap_or(l.len.saturating_sub(offset));
            if len == 0 || offset.checked_add(len).is_none_or(|end| end > l.len) {
                return Err((
                    400,
                    format!(
                        "{len} bytes at offset {offset} do not fit lease {lease:?} of {} bytes",
                        l.len
                    ),
                ));
            }
            let local =
                DescList::from_descs(MemKind::Dram, vec![Desc::new(l.addr + offset, len, 0)])
                    .map_err(|e| (400, e.to_string()))?;
            let remote = DescList::from_descs(MemKind::Dram, vec![Desc::new(remote_addr, len, 0)])
                .map_err(|e| (400, e.to_string()))?;
            let opts = XferOptions {
                notif: notif.map(String::into_bytes),
                ..XferOptions::default()
            };
            // Leases come and go (each is its own region), so a peer's metadata loaded a moment
            // ago may not show the lease named yet: reload it from etcd once and retry.
            let x = match d
                .agent
                .create_xfer(op, &local, &remote, &peer, opts.clone())
            {
                Ok(x) => x,
                Err(e) if reload_peer(d, &peer) => d
                    .agent
                    .create_xfer(op, &local, &remote, &peer, opts)
                    .map_err(|e2| {
                        tracing::debug!(first = %e, "transfer refused before and after a reload");
                        (status_of(&e2), e2.to_string())
                    })?,
                Err(e) => return Err((status_of(&e), e.to_string())),
            };
            let backend = x.info().backend;
            x.post().map_err(|e| (status_of(&e), e.to_string()))?;
            let x = Arc::new(x);
            let job = Arc::new(Job {
                id,
                kind: "transfer",
                created: SystemTime::now(),
                detail: json!({
                    "op": op.as_str(), "lease": lease, "offset": offset, "len": len,
                    "peer": peer, "remote_addr": remote_addr, "backend": backend.as_str(),
                }),
                state: Mutex::new(JobState::Running),
                lease,
                xfer: Some(Arc::clone(&x)),
                publication: Mutex::new(None),
            });
            if let Err(e) = d.jobs.insert(Arc::clone(&job)) {
                x.cancel();
                return Err(e);
            }
            let dd = Arc::clone(d);
            let j = Arc::clone(&job);
            tokio::spawn(async move {
                let st = x.wait().await;
                let end = match st {
                    XferStatus::Done => JobState::Done,
                    XferStatus::Cancelled => JobState::Cancelled,
                    XferStatus::TimedOut => JobState::Failed("timed out".into()),
                    XferStatus::Failed(e) => JobState::Failed(e.to_string()),
                    XferStatus::Idle | XferStatus::InProgress => {
                        JobState::Failed("ended without a terminal state".into())
                    }
                };
                tracing::info!(job = j.id, state = end.name(), "transfer ended");
                *j.state.lock() = end;
                dd.jobs.changed.notify_waiters();
            });
            Ok(job.json())
        }
    }
}

/// Deletes a job: a lease is released (refused while a transfer uses it), a running transfer
/// cancelled. May wait for a job being created: call it off the async workers.
pub(crate) fn delete(d: &Daemon, id: u64) -> Result<Value, Refusal> {
    let _edit = d.jobs.edit.lock();
    let job = d
        .jobs
        .all
        .lock()
        .get(&id)
        .cloned()
        .ok_or_else(|| (404, format!("no job {id}")))?;
    if let Some(x) = &job.xfer {
        x.cancel();
        return Ok(job.json());
    }
    if job.kind == "publish" {
        // Dropping the publication revokes its etcd lease: the key goes at once.
        if job.publication.lock().take().is_some() {
            *job.state.lock() = JobState::Done;
            tracing::info!(job = id, "unpublished");
        }
        d.jobs.changed.notify_waiters();
        return Ok(job.json());
    }
    // Lock order: the table, then a job's state; never the other way round.
    let busy =
        d.jobs.all.lock().values().any(|j| {
            j.xfer.is_some() && j.lease == job.lease && *j.state.lock() == JobState::Running
        });
    let mut st = job.state.lock();
    if *st == JobState::Running {
        if busy {
            return Err((
                409,
                format!("lease {:?} is in use by a running transfer", job.lease),
            ));
        }
        if let Some(p) = &d.pool {
            let _ = p.release(&job.lease);
        }
        republish(d);
        *st = JobState::Done;
        tracing::info!(job = id, lease = %job.lease, "lease released");
    }
    drop(st);
    d.jobs.changed.notify_waiters();
    Ok(job.json())
}

/// Puts the agent's metadata in etcd now (a lease taken or released changed its regions), so
/// peers see the change without waiting for the periodic check.
fn republish(d: &Daemon) {
    if let Some((_, p, _)) = &*d.discovery.lock() {
        if let Err(e) = p.refresh() {
            tracing::debug!(error = %e, "republishing after a lease change");
        }
    }
}

/// Loads `peer`'s metadata from etcd again; whether a newer one was loaded.
fn reload_peer(d: &Daemon, peer: &str) -> bool {
    let generation = |a: &nixl_core::Agent| a.peer_metadata(peer).map(|m| m.generation);
    let before = generation(&d.agent);
    let loaded = match &*d.discovery.lock() {
        Some((r, _, _)) => r.load_peer(&d.agent, peer).unwrap_or(false),
        None => false,
    };
    loaded && generation(&d.agent) != before
}

fn status_of(e: &nixl_core::Error) -> u16 {
    use nixl_core::ErrorClass as C;
    match e.class() {
        C::Invalid => 400,
        C::NotFound => 404,
        C::Denied => 403,
        C::Unavailable | C::RemoteDisconnect => 503,
        _ => 500,
    }
}
