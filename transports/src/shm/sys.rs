//! The unsafe bottom of the `shm` backend: thin checked wrappers over the syscalls it needs.
//! Every function returns `io::Result`; nothing above this module uses `unsafe` except the copy
//! into a peer's mapping.

use std::io;

pub(crate) use crate::unix::{boot_id, peer_cred, recv_with_fds, send_with_fd, uid};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `IOV_MAX` on Linux: the most iovecs one process_vm_* call takes.
pub(super) const IOV_MAX: usize = 1024;

fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Direction of a cross-memory copy, seen from the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cma {
    /// Copy from the other process into ours (process_vm_readv).
    Pull,
    /// Copy from ours into the other process (process_vm_writev).
    Push,
}

/// A list of copies between this process and another: pair `i` moves `len` bytes between
/// `ours` (an address here) and `theirs` (an address there). A request's runs, an Op's
/// descriptors: the copy reads them in place, so no list is built for it.
pub(super) trait Pairs: Sync {
    /// How many pairs.
    fn count(&self) -> usize;
    /// Pair `i < count()`: `(ours, theirs, len)`.
    fn pair(&self, i: usize) -> (u64, u64, u64);
}

impl Pairs for [(u64, u64, u64)] {
    fn count(&self) -> usize {
        self.len()
    }
    fn pair(&self, i: usize) -> (u64, u64, u64) {
        self[i]
    }
}

/// A place in a [`Pairs`] list: `off` bytes into pair `idx`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Cursor {
    pub idx: usize,
    pub off: u64,
}

impl Cursor {
    /// The end of `pairs`.
    pub(super) fn end(pairs: &(impl Pairs + ?Sized)) -> Cursor {
        Cursor {
            idx: pairs.count(),
            off: 0,
        }
    }
}

/// Copies the bytes of `pairs` from `from` up to `to` with process `pid`, in batches of up to
/// IOV_MAX pairs (iovecs built from the pairs as each batch goes: the buffers are the only
/// memory the copy takes), looping over short counts. Returns the bytes moved (always all of
/// them on success).
///
/// # Safety
/// Every `ours` range of the window must be valid for writes (Pull) or reads (Push) in this
/// process for the duration of the call. `theirs` is checked by the kernel (EFAULT).
pub(super) unsafe fn cross_copy<P: Pairs + ?Sized>(
    pid: i32,
    dir: Cma,
    pairs: &P,
    from: Cursor,
    to: Cursor,
) -> io::Result<u64> {
    // The end of pair `i` inside the window.
    let end_of = |i: usize| if i == to.idx { to.off } else { pairs.pair(i).2 };
    let batch_max = IOV_MAX.min(to.idx.saturating_sub(from.idx) + 1);
    let mut local: Vec<libc::iovec> = Vec::with_capacity(batch_max);
    let mut remote: Vec<libc::iovec> = Vec::with_capacity(batch_max);
    let mut cur = from;
    let mut moved = 0u64;
    loop {
        // Past the pairs (and pieces of them) with nothing left in the window.
        while cur < to && cur.off >= end_of(cur.idx) {
            cur = Cursor {
                idx: cur.idx + 1,
                off: 0,
            };
        }
        if cur >= to {
            return Ok(moved);
        }
        local.clear();
        remote.clear();
        let mut want = 0u64;
        let mut i = cur.idx;
        while local.len() < IOV_MAX && (i < to.idx || (i == to.idx && to.off > 0)) {
            let (o, t, _) = pairs.pair(i);
            let start = if i == cur.idx { cur.off } else { 0 };
            let len = end_of(i).saturating_sub(start);
            local.push(libc::iovec {
                iov_base: o.wrapping_add(start) as *mut libc::c_void,
                iov_len: len as usize,
            });
            remote.push(libc::iovec {
                iov_base: t.wrapping_add(start) as *mut libc::c_void,
                iov_len: len as usize,
            });
            want += len;
            i += 1;
        }
        let call = match dir {
            Cma::Pull => libc::process_vm_readv,
            Cma::Push => libc::process_vm_writev,
        };
        // SAFETY: the local iovecs point into `ours` ranges of the window, valid per the
        // caller's contract; the remote ones are addresses in the other process, which the
        // kernel checks. Both sides of the batch have the same lengths.
        let n = cvt(unsafe {
            call(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        } as libc::c_long)? as u64;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "process_vm moved 0 bytes",
            ));
        }
        moved += n;
        // Forward by `n` bytes (a short count stops inside a pair).
        let mut n = n;
        while n > 0 && cur < to {
            let step = (end_of(cur.idx) - cur.off).min(n);
            n -= step;
            cur.off += step;
            if cur.off == end_of(cur.idx) && cur.idx < to.idx {
                cur = Cursor {
                    idx: cur.idx + 1,
                    off: 0,
                };
            }
        }
    }
}

/// Whether process_vm_readv works here (reads one byte of our own memory).
pub(super) fn probe_cma() -> io::Result<()> {
    let src = [0x5au8; 1];
    let mut dst = [0u8; 1];
    let pairs = [(dst.as_mut_ptr() as u64, src.as_ptr() as u64, 1)];
    let (from, to) = (Cursor::default(), Cursor::end(&pairs[..]));
    // SAFETY: `dst` is a live local array valid for a 1-byte write.
    unsafe { cross_copy(std::process::id() as i32, Cma::Pull, &pairs[..], from, to)? };
    if dst[0] == 0x5a {
        Ok(())
    } else {
        Err(io::Error::other("process_vm_readv returned wrong bytes"))
    }
}

/// Lets any process of ours ptrace us (and so use process_vm_* on us) where Yama restricts it.
pub(super) fn allow_any_ptracer() {
    // SAFETY: prctl with integer arguments; failure (EINVAL without Yama) is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0);
    }
}

/// The seals a mapped memfd must carry: its size is fixed for good, so no process holding it
/// (a peer it was lent to, or one it came from) can cut the pages under a mapping (SIGBUS).
pub(super) const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A new memfd of `len` bytes, sealed against shrinking and growing.
pub(super) fn memfd(len: usize, huge: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: the name is a NUL-terminated static string.
    let fd = cvt(unsafe { libc::memfd_create(c"nixl-shm".as_ptr(), flags) } as libc::c_long)?;
    // SAFETY: memfd_create returned a fresh descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: ftruncate on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } as libc::c_long)?;
    // SAFETY: fcntl with integer arguments on an fd we own.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) } as libc::c_long)?;
    Ok(fd)
}

/// Why a peer's memfd (one of its buffers, or its grant table) was not mapped.
#[derive(Debug, thiserror::Error)]
pub(super) enum MapError {
    /// The peer refused or failed the request: its answer.
    #[error("{0}")]
    Peer(String),
    /// The descriptor is not a memfd that takes seals.
    #[error("the peer's buffer is not a sealable memfd ({0}): refusing to map it")]
    NotMemfd(#[source] io::Error),
    /// A memfd without both [`SIZE_SEALS`]: anyone holding it could truncate it under us.
    #[error(
        "the peer's memfd is not sealed against shrinking and growing (seals {0:#x}): refusing \
         to map it, since anyone holding it could truncate it under the mapping"
    )]
    Unsealed(libc::c_int),
    /// The memfd's size does not hold what the peer says is in it.
    #[error("the peer's {what} is {size} bytes, {why}")]
    Size {
        /// What the memfd holds.
        what: &'static str,
        /// Its size.
        size: u64,
        /// What it should be.
        why: String,
    },
    /// A system call on the memfd failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step that failed.
        what: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
}

/// `Err` unless `fd` is a memfd sealed with [`SIZE_SEALS`] (a peer's buffer is mapped only then).
pub(super) fn check_sealed(fd: RawFd) -> Result<(), MapError> {
    // SAFETY: fcntl with integer arguments; an fd that is not a memfd fails with EINVAL.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(MapError::NotMemfd(io::Error::last_os_error()));
    }
    if seals & SIZE_SEALS != SIZE_SEALS {
        return Err(MapError::Unsealed(seals));
    }
    Ok(())
}

/// A sealed peer memfd of `len` bytes mapped shared: sealed first (only then does the size,
/// checked next by `fits`, stay the size), then mapped whole. `fits` says why a size is wrong.
pub(super) fn map_sealed(
    fd: RawFd,
    what: &'static str,
    len: usize,
    fits: impl FnOnce(u64) -> Result<(), String>,
) -> Result<*mut u8, MapError> {
    check_sealed(fd)?;
    let size = fd_size(fd).map_err(|source| MapError::Sys {
        what: "reading the peer's memfd size",
        source,
    })?;
    fits(size).map_err(|why| MapError::Size { what, size, why })?;
    map_shared(fd, len, true).map_err(|source| MapError::Sys {
        what: "mapping the peer's memfd",
        source,
    })
}

/// Maps `len` bytes of `fd` shared, read-write; `populate` builds the page tables now
/// (MAP_POPULATE) so the first transfer does not pay a fault per page.
pub(super) fn map_shared(fd: RawFd, len: usize, populate: bool) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 },
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// Unmaps a mapping made by [`map_shared`].
///
/// # Safety
/// `(p, len)` must be exactly a live mapping from [`map_shared`] that nothing uses any more.
pub(super) unsafe fn unmap(p: *mut u8, len: usize) {
    // SAFETY: per the contract.
    unsafe { libc::munmap(p.cast(), len) };
}

/// The size of the file behind `fd`.
pub(super) fn fd_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: fstat writes into a zeroed stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    cvt(unsafe { libc::fstat(fd, &mut st) } as libc::c_long)?;
    Ok(st.st_size as u64)
}

/// Inode of our pid namespace (0 if unreadable).
pub(super) fn pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+).
pub(super) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable once it has).
/// Whether the other end of the connected socket `s` has shut it down or closed it (a zero
/// timeout poll for POLLRDHUP/POLLHUP): known at once from the kernel, before any reader of the
/// socket has seen the end.
pub(super) fn peer_hung_up(s: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor the caller holds open, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

pub(super) fn pid_exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor we own, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
}
