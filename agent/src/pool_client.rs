//! A client of the daemon's host memory pool for local processes of the daemon's user: take a
//! named lease, map it into this process, fill it (or read it), and let the daemon's agent serve
//! it to peers. The lease outlives the client: it stays in the pool, registered and served,
//! until it is released ([`PoolClient::release`], or `DELETE /v1/jobs/ID` on the control API).
//!
//! Two sockets, both in the daemon's private socket directory:
//!
//! - the control socket (`[daemon] control_socket`): leases are control-API jobs
//!   (`POST /v1/jobs {"kind": "lease", "name", "size"}`), listed in `GET /v1/pool`;
//! - the pool socket beside it ([`crate::config::pool_socket_for`]: `agent.sock` ->
//!   `agent.pool.sock`, mode 0600): the daemon checks the caller's uid with SO_PEERCRED (its own
//!   uid only) and passes the pool's memfd (sealed against shrinking and growing) with the
//!   lease's offset and length; the client maps that range shared.
//!
//! Each lease is registered with the daemon's agent as its own region, at [`LeaseInfo::addr`]
//! (`len` bytes): a peer that loaded the daemon's metadata (from its tcp listener or etcd) READs
//! the bytes the client wrote there, and finds the lease among the daemon's regions.
//!
//! ```no_run
//! use nixl_agent::pool_client::PoolClient;
//! let pool = PoolClient::new(nixl_agent::config::default_control_socket());
//! let mut lease = pool.lease("my-model/data", 64 << 20)?;
//! // SAFETY: the lease is new: no peer knows it yet, so nothing else writes it meanwhile.
//! let bytes = unsafe { lease.as_mut_slice() };
//! bytes[..5].copy_from_slice(b"hello");
//! println!("peers READ it at {:#x} on the daemon's agent", lease.info().addr);
//! drop(lease); // unmaps here; the daemon keeps the lease and serves it
//! pool.release("my-model/data")?; // now it is gone
//! # Ok::<(), nixl_agent::pool_client::PoolError>(())
//! ```
//!
//! Rules a client keeps: it writes a lease only while no peer writes it (peers may WRITE into
//! any registered memory the daemon's auth lets them reach), and never after releasing it (the
//! range may be lent again). The pool is shared memory of one user: any process of that user
//! that maps it can reach every lease, as it could reach the daemon's memory anyway.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::control::{Client, ControlError};

/// What went wrong with a lease.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// The control API refused or could not be reached.
    Control(ControlError),
    /// The pool socket could not be reached or failed mid-exchange.
    Socket {
        /// The pool socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon refused to lend the lease's memory (the reason as it gave it).
    Refused(String),
    /// An answer this client cannot use.
    Malformed(String),
    /// Mapping the lease failed.
    Map(std::io::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Control(e) => e.fmt(f),
            PoolError::Socket { path, source } => {
                write!(f, "pool socket {}: {source}", path.display())
            }
            PoolError::Refused(m) => write!(f, "the daemon refused: {m}"),
            PoolError::Malformed(m) => write!(f, "bad answer from the daemon: {m}"),
            PoolError::Map(e) => write!(f, "mapping the lease: {e}"),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Control(e) => Some(e),
            PoolError::Socket { source, .. } => Some(source),
            PoolError::Map(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ControlError> for PoolError {
    fn from(e: ControlError) -> Self {
        PoolError::Control(e)
    }
}

/// A lease as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Its name.
    pub name: String,
    /// The control-API job that holds it (`DELETE /v1/jobs/ID` releases it).
    pub job: u64,
    /// Offset in the pool's memfd.
    pub offset: u64,
    /// Bytes (the size asked for, rounded up to the pool's page size).
    pub len: u64,
    /// Its address in the daemon's agent: the region peers READ.
    pub addr: u64,
}

/// A client of one daemon's pool (each call opens its own connections).
#[derive(Clone, Debug)]
pub struct PoolClient {
    control: Client,
    pool_socket: PathBuf,
}

impl PoolClient {
    /// A client of the daemon whose control socket is `control_socket` (its pool socket is
    /// [`crate::config::pool_socket_for`] that).
    pub fn new(control_socket: impl Into<PathBuf>) -> PoolClient {
        let control_socket = control_socket.into();
        PoolClient {
            pool_socket: crate::config::pool_socket_for(&control_socket),
            control: Client::new(control_socket),
        }
    }

    /// The control API client it uses.
    pub fn control(&self) -> &Client {
        &self.control
    }

    /// The pool socket.
    pub fn pool_socket(&self) -> &Path {
        &self.pool_socket
    }

    /// Takes a lease of `len` bytes named `name` (a control-API job; refused if the name is
    /// taken or the pool has no room) and maps it.
    pub fn lease(&self, name: &str, len: u64) -> Result<MappedLease, PoolError> {
        self.create(name, len)?;
        self.map(name)
    }

    /// Takes a lease of `len` bytes named `name` without mapping it.
    pub fn create(&self, name: &str, len: u64) -> Result<LeaseInfo, PoolError> {
        let job = self.control.post(
            "/v1/jobs",
            &json!({ "kind": "lease", "name": name, "size": len }),
        )?;
        lease_of_job(&job).ok_or_else(|| PoolError::Malformed(format!("lease job {job}")))
    }

    /// The lease named `name`, if the daemon holds one.
    pub fn find(&self, name: &str) -> Result<Option<LeaseInfo>, PoolError> {
        let jobs = self.control.get("/v1/jobs")?;
        Ok(jobs["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["kind"] == "lease" && j["state"] == "running")
            .filter_map(lease_of_job)
            .find(|l| l.name == name))
    }

    /// Maps the existing lease `name` into this process (shared with the daemon).
    pub fn map(&self, name: &str) -> Result<MappedLease, PoolError> {
        let sock = |source| PoolError::Socket {
            path: self.pool_socket.clone(),
            source,
        };
        let s = UnixStream::connect(&self.pool_socket).map_err(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(sock)?;
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(sock)?;
        let mut req = json!({ "lease": name }).to_string();
        req.push('\n');
        let wrote = std::io::Write::write_all(&mut &s, req.as_bytes());
        // A caller the daemon refuses (another uid) is answered and cut before its request is
        // read, so the request may not go out: the answer, still there to read, says why.
        let (line, fd) = match crate::fdpass::recv_line(&s, 64 << 10) {
            Ok(got) => got,
            Err(e) => return Err(sock(wrote.err().unwrap_or(e))),
        };
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| PoolError::Malformed(format!("answer is not JSON: {e}")))?;
        if let Some(e) = v["error"].as_str() {
            return Err(PoolError::Refused(e.to_owned()));
        }
        let fd = fd.ok_or_else(|| PoolError::Malformed("no descriptor with the answer".into()))?;
        let num = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| PoolError::Malformed(format!("answer without {k}: {v}")))
        };
        let (offset, len, addr, pool_len) =
            (num("offset")?, num("len")?, num("addr")?, num("pool_len")?);
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > pool_len) {
            return Err(PoolError::Malformed(format!(
                "lease {offset}+{len} outside a pool of {pool_len} bytes"
            )));
        }
        let info = LeaseInfo {
            name: v["name"].as_str().unwrap_or(name).to_owned(),
            job: 0,
            offset,
            len,
            addr,
        };
        let job = self.find(name)?.map_or(0, |l| l.job);
        MappedLease::new(LeaseInfo { job, ..info }, &fd)
    }

    /// Releases the lease `name`: the daemon deregisters it (waiting for transfers that use
    /// it) and may lend the bytes again. Mappings of it must no longer be written.
    pub fn release(&self, name: &str) -> Result<(), PoolError> {
        let l = self
            .find(name)?
            .ok_or_else(|| PoolError::Refused(format!("no lease named {name:?}")))?;
        self.control.delete(&format!("/v1/jobs/{}", l.job))?;
        Ok(())
    }
}

fn lease_of_job(j: &Value) -> Option<LeaseInfo> {
    let d = &j["detail"];
    Some(LeaseInfo {
        name: d["name"].as_str()?.to_owned(),
        job: j["id"].as_u64()?,
        offset: d["offset"].as_u64()?,
        len: d["len"].as_u64()?,
        addr: d["addr"].as_u64()?,
    })
}

/// A lease mapped into this process (shared: what it writes, the daemon's agent serves).
/// Dropping it unmaps it here; the lease stays in the daemon.
#[derive(Debug)]
pub struct MappedLease {
    info: LeaseInfo,
    ptr: *mut u8,
}

// SAFETY: the mapping is owned by this value and only reached through its methods, whose
// contracts (unsafe where another writer may exist) do not depend on the thread.
unsafe impl Send for MappedLease {}
// SAFETY: as above: `&MappedLease` exposes numbers and unsafe accessors only.
unsafe impl Sync for MappedLease {}

impl MappedLease {
    fn new(info: LeaseInfo, fd: &OwnedFd) -> Result<MappedLease, PoolError> {
        let len = usize::try_from(info.len)
            .map_err(|_| PoolError::Malformed(format!("a lease of {} bytes", info.len)))?;
        let off = libc::off_t::try_from(info.offset)
            .map_err(|_| PoolError::Malformed(format!("lease offset {}", info.offset)))?;
        // SAFETY: a new shared mapping of the daemon's memfd at an address the kernel picks;
        // offset and length are page multiples the daemon's pool hands out (the kernel checks
        // the offset's alignment), within the memfd's sealed size (checked above).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(PoolError::Map(std::io::Error::last_os_error()));
        }
        Ok(MappedLease {
            info,
            ptr: p.cast(),
        })
    }

    /// The lease.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// Bytes mapped (the lease's length).
    pub fn len(&self) -> usize {
        self.info.len as usize
    }

    /// Never: a lease has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapping's address in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The lease's bytes, to fill.
    ///
    /// # Safety
    /// Nothing else may write these bytes while the slice lives: no peer WRITE into the lease,
    /// no daemon transfer job into it, no other mapping of it written by another process, and
    /// the lease must not be released meanwhile.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by `self`; the
        // caller excludes other writers, and `&mut self` other borrows through this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len()) }
    }

    /// The lease's bytes, to read.
    ///
    /// # Safety
    /// As [`MappedLease::as_mut_slice`]: nothing may write them while the slice lives.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: in bounds of the mapping; the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len()) }
    }
}

impl Drop for MappedLease {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once, here; no slice of it outlives
        // `self` (both accessors borrow it).
        unsafe { libc::munmap(self.ptr.cast(), self.len()) };
    }
}
