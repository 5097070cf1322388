//! The node's host memory pool: one sealed memfd mapping (huge pages where the kernel has them
//! reserved), lent out in named leases, each lease registered with the agent as its own region.
//!
//! Jobs (a weight cache, a checkpoint staged in host memory) take a lease by name and move bytes
//! into and out of it through the agent; peers reach it like any registered memory (one-sided
//! READ/WRITE, checked against the registration by the daemon's agent), and find it among the
//! agent's regions (one region per lease, at the lease's `addr`, `len` bytes). A local process
//! of the daemon's user may map a lease itself and fill it (see [`crate::pool_client`]): the
//! memfd is sealed against shrinking and growing, so no client can truncate the pages under the
//! daemon's feet. The mapping is populated when the daemon starts, so a pool the node cannot
//! hold fails at start, never later with a fault. A restart rebuilds it empty: a lease is a
//! cache, never the only copy of anything.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use nixl_core::{Agent, Desc, DescList, MemKind, Registration};
use parking_lot::Mutex;

/// Alignment of leases on a pool of normal pages.
const SMALL: u64 = 4096;
/// Alignment of leases on a pool of 2 MiB huge pages.
const HUGE: u64 = 2 << 20;
/// Most leases at once.
pub const MAX_LEASES: usize = 4096;
/// Longest lease name.
pub const MAX_NAME: usize = 128;

/// One lease: a named range of the pool.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    /// Its name.
    pub name: String,
    /// Offset in the pool.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its address in this daemon's agent (what a peer names in a transfer).
    pub addr: u64,
}

/// What can go wrong with a lease.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseError {
    /// The name is taken.
    Exists(String),
    /// No such lease.
    Unknown(String),
    /// Not enough contiguous free space, or too many leases.
    Full(String),
    /// A bad name or size.
    Invalid(String),
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Exists(n) => write!(f, "a lease named {n:?} exists"),
            LeaseError::Unknown(n) => write!(f, "no lease named {n:?}"),
            LeaseError::Full(why) | LeaseError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for LeaseError {}

/// The pool (see the [module docs](self)).
pub struct Pool {
    agent: Arc<Agent>,
    base: *mut u8,
    len: u64,
    huge: bool,
    fd: OwnedFd,
    /// By offset, each with its registration (deregistered before the mapping goes: `Drop`).
    leases: Mutex<BTreeMap<u64, (Lease, Registration)>>,
}

// SAFETY: the raw pointer is the base of a shared mapping that lives as long as the pool; the
// pool itself never reads or writes through it (the agent's backends move the bytes, under the
// registration's rules), and the lease table is behind a mutex.
unsafe impl Send for Pool {}
// SAFETY: as above: `&Pool` gives access to the lease table (locked) and plain numbers only.
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("huge", &self.huge)
            .field("leases", &self.leases.lock().len())
            .finish()
    }
}

impl Pool {
    /// Maps `len` bytes (rounded up to the page size) of a sealed memfd; leases are registered
    /// with `agent` as they are taken.
    pub fn new(agent: &Arc<Agent>, len: u64) -> Result<Pool, String> {
        let (fd, base, len, huge) = map(len)?;
        Ok(Pool {
            agent: Arc::clone(agent),
            base,
            len,
            huge,
            fd,
            leases: Mutex::new(BTreeMap::new()),
        })
    }

    /// The pool's memfd (sealed against shrinking and growing): what a local client maps,
    /// at a lease's `offset`, to fill or read the lease.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes in the pool.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the pool is empty (never: a pool of 0 bytes is not made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its address in the agent.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    /// Whether it is on huge pages.
    pub fn huge_pages(&self) -> bool {
        self.huge
    }

    /// Bytes lent.
    pub fn used(&self) -> u64 {
        self.leases.lock().values().map(|(l, _)| l.len).sum()
    }

    /// Every lease, by offset.
    pub fn leases(&self) -> Vec<Lease> {
        self.leases
            .lock()
            .values()
            .map(|(l, _)| l.clone())
            .collect()
    }

    /// The lease named `name`.
    pub fn get(&self, name: &str) -> Option<Lease> {
        self.leases
            .lock()
            .values()
            .find(|(l, _)| l.name == name)
            .map(|(l, _)| l.clone())
    }

    /// Lends `len` bytes (rounded up to the lease alignment) under `name`, first fit, and
    /// registers them with the agent as one region (at the lease's `addr`).
    pub fn lease(&self, name: &str, len: u64) -> Result<Lease, LeaseError> {
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(LeaseError::Invalid(format!(
                "a lease name is 1..={MAX_NAME} characters without control characters"
            )));
        }
        if len == 0 {
            return Err(LeaseError::Invalid("a lease of 0 bytes".into()));
        }
        let align = if self.huge { HUGE } else { SMALL };
        let want = len
            .checked_next_multiple_of(align)
            .filter(|&w| w <= self.len)
            .ok_or_else(|| {
                LeaseError::Full(format!(
                    "a lease of {len} bytes exceeds the pool of {} bytes",
                    self.len
                ))
            })?;
        let mut leases = self.leases.lock();
        if leases.values().any(|(l, _)| l.name == name) {
            return Err(LeaseError::Exists(name.to_owned()));
        }
        if leases.len() >= MAX_LEASES {
            return Err(LeaseError::Full(format!("{MAX_LEASES} leases at most")));
        }
        let mut at = 0u64;
        for (l, _) in leases.values() {
            if l.offset - at >= want {
                break;
            }
            at = (l.offset + l.len).next_multiple_of(align);
        }
        if self.len - at.min(self.len) < want {
            let used: u64 = leases.values().map(|(l, _)| l.len).sum();
            return Err(LeaseError::Full(format!(
                "no {want} contiguous free bytes in the pool ({used} of {} bytes lent)",
                self.len
            )));
        }
        let lease = Lease {
            name: name.to_owned(),
            offset: at,
            len: want,
            addr: self.base as u64 + at,
        };
        let list = DescList::from_descs(MemKind::Dram, vec![Desc::new(lease.addr, want, 0)])
            .map_err(|e| LeaseError::Invalid(e.to_string()))?;
        // SAFETY: the range lies inside the pool's mapping (checked above), which stays mapped
        // until `Drop`, and `Drop` and `release` deregister first (deregistration waits for
        // transfers that still use it). Leases do not overlap, so neither do the regions.
        // Nothing in this process holds a Rust reference into the pool.
        let reg = unsafe { self.agent.register(&list) }.map_err(|e| {
            LeaseError::Full(format!("registering the {want}-byte lease {name:?}: {e}"))
        })?;
        leases.insert(at, (lease.clone(), reg));
        Ok(lease)
    }

    /// Returns the lease `name`: its region is deregistered first (which waits for transfers
    /// that still use it), so peers cannot reach the bytes once it is lent again.
    pub fn release(&self, name: &str) -> Result<Lease, LeaseError> {
        let mut leases = self.leases.lock();
        let off = leases
            .iter()
            .find(|(_, (l, _))| l.name == name)
            .map(|(o, _)| *o)
            .ok_or_else(|| LeaseError::Unknown(name.to_owned()))?;
        let (lease, reg) = leases.remove(&off).expect("found above");
        if let Err(e) = reg.deregister() {
            tracing::warn!(lease = %lease.name, error = %e, "deregistering a released lease");
        }
        Ok(lease)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Deregister first: it waits until no transfer uses the memory.
        for (_, (l, reg)) in std::mem::take(&mut *self.leases.lock()) {
            if let Err(e) = reg.deregister() {
                tracing::warn!(lease = %l.name, error = %e, "deregistering a lease");
            }
        }
        // SAFETY: `base`/`len` are the mapping made in `map`, unmapped once, here; nothing in
        // this process uses it any more (deregistered above, and the pool never lent out
        // references). Clients' own mappings of the memfd are theirs and stay valid.
        unsafe { libc::munmap(self.base.cast(), self.len as usize) };
    }
}

/// A memfd of `len` bytes mapped shared and populated: on 2 MiB huge pages when the kernel has
/// enough reserved, else on normal pages.
fn map(len: u64) -> Result<(OwnedFd, *mut u8, u64, bool), String> {
    if let Ok(m) = try_map(len.next_multiple_of(HUGE), true) {
        return Ok(m);
    }
    try_map(len.next_multiple_of(SMALL), false)
}

fn try_map(len: u64, huge: bool) -> Result<(OwnedFd, *mut u8, u64, bool), String> {
    let size = usize::try_from(len).map_err(|_| format!("pool of {len} bytes is too large"))?;
    let flags =
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: the name is a NUL-terminated literal; the call has no other preconditions.
    let raw = unsafe { libc::memfd_create(c"nixl-pool".as_ptr(), flags) };
    if raw < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscall on our own descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(format!(
            "sizing the pool to {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Sealed: a client given the fd can neither shrink it (the daemon's mapping would fault
    // with SIGBUS) nor grow it, nor change the seals.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on our own descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(format!(
            "sealing the pool's memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new shared mapping of our memfd at an address the kernel picks; MAP_POPULATE
    // faults it in now, so an over-committed pool fails here and not on first use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mapping the {len}-byte pool: {}",
            std::io::Error::last_os_error()
        ));
    }
    // On huge pages, a shortage already failed the mmap above with ENOMEM: hugetlbfs reserves
    // the pages at mmap time (no MAP_NORESERVE), so the pool never faults for lack of them later.
    Ok((fd, p.cast(), len, huge))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn agent() -> Arc<Agent> {
        Arc::new(
            Agent::builder("pool-test")
                .backend(Arc::new(nixl_transports::local::LocalBackend::new()))
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn leases_fit_free_and_refuse_clearly() {
        let a = agent();
        let p = Pool::new(&a, 1 << 20).unwrap();
        assert!(p.len() >= 1 << 20);
        assert!(
            a.metadata().regions.is_empty(),
            "nothing registered before a lease"
        );
        // SAFETY: F_GET_SEALS on the pool's own descriptor.
        let seals = unsafe { libc::fcntl(p.fd().as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "sealed");
        let align = if p.huge_pages() { HUGE } else { SMALL };
        let x = p.lease("x", 1).unwrap();
        assert_eq!((x.offset, x.len, x.addr), (0, align, p.base()));
        let regions: Vec<_> = a.metadata().regions.iter().map(|r| r.desc).collect();
        assert_eq!(
            regions,
            vec![Desc::new(x.addr, x.len, 0)],
            "the lease is its region"
        );
        assert_eq!(p.lease("x", 10), Err(LeaseError::Exists("x".into())));
        assert!(matches!(p.lease("", 10), Err(LeaseError::Invalid(_))));
        assert!(matches!(
            p.lease("big", p.len() + 1),
            Err(LeaseError::Full(_))
        ));
        if !p.huge_pages() {
            let y = p.lease("y", 8192).unwrap();
            assert_eq!(y.offset, 4096);
            p.release("x").unwrap();
            // The hole at 0 is reused by what fits in it.
            assert_eq!(p.lease("z", 4096).unwrap().offset, 0);
            assert_eq!(p.lease("w", 4097).unwrap().offset, 12288);
            assert_eq!(p.used(), 4096 + 8192 + 8192);
        }
        assert!(matches!(p.release("nope"), Err(LeaseError::Unknown(_))));
        assert_eq!(a.metadata().regions.len(), p.leases().len());
        drop(p);
        assert!(a.metadata().regions.is_empty(), "deregistered on drop");
    }
}
