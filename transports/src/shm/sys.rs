//! The unsafe bottom of the `shm` backend: thin checked wrappers over the syscalls it needs.
//! Every function returns `io::Result`; nothing above this module uses `unsafe` except the copy
//! into a peer's mapping.

use std::io;

pub(crate) use crate::unix::{boot_id, peer_cred, recv_with_fds, send_with_fd, uid};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `IOV_MAX` on Linux: the most iovecs one process_vm_* call takes.
pub const IOV_MAX: usize = 1024;

fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One (address, length) pair in our or the other process.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub addr: u64,
    pub len: u64,
}

/// Direction of a cross-memory copy, seen from the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cma {
    /// Copy from the other process into ours (process_vm_readv).
    Pull,
    /// Copy from ours into the other process (process_vm_writev).
    Push,
}

/// Copies between `ours` and `theirs` (pairwise, equal total length) in process `pid`, looping
/// over short counts and IOV_MAX batches. Returns the bytes moved (always the total on success).
///
/// # Safety
/// Every span of `ours` must be valid for writes (Pull) or reads (Push) for its length in this
/// process for the duration of the call. `theirs` is checked by the kernel (EFAULT).
pub unsafe fn cross_copy(pid: i32, dir: Cma, ours: &[Span], theirs: &[Span]) -> io::Result<u64> {
    let mut moved = 0u64;
    // Walk both lists as byte streams; build at most IOV_MAX iovecs per side per call.
    let (mut oi, mut ooff) = (0usize, 0u64);
    let (mut ti, mut toff) = (0usize, 0u64);
    let mut local: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(ours.len().max(1)));
    let mut remote: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(theirs.len().max(1)));
    while oi < ours.len() && ti < theirs.len() {
        local.clear();
        remote.clear();
        let mut batch = 0u64;
        let (mut li, mut loff) = (oi, ooff);
        while li < ours.len() && local.len() < IOV_MAX {
            let s = ours[li];
            local.push(libc::iovec {
                iov_base: (s.addr + loff) as *mut libc::c_void,
                iov_len: (s.len - loff) as usize,
            });
            batch += s.len - loff;
            li += 1;
            loff = 0;
        }
        let mut rbatch = 0u64;
        let (mut ri, mut roff) = (ti, toff);
        while ri < theirs.len() && remote.len() < IOV_MAX && rbatch < batch {
            let s = theirs[ri];
            let take = (s.len - roff).min(batch - rbatch);
            remote.push(libc::iovec {
                iov_base: (s.addr + roff) as *mut libc::c_void,
                iov_len: take as usize,
            });
            rbatch += take;
            if take == s.len - roff {
                ri += 1;
                roff = 0;
            } else {
                roff += take;
            }
        }
        let want = batch.min(rbatch);
        // SAFETY: the local iovecs point into `ours`, valid per the caller's contract; the remote
        // ones are addresses in the other process, which the kernel checks. The kernel copies at
        // most min(local total, remote total) bytes.
        let n = cvt(unsafe {
            match dir {
                Cma::Pull => libc::process_vm_readv(
                    pid,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                ),
                Cma::Push => libc::process_vm_writev(
                    pid,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                ),
            }
        } as libc::c_long)? as u64;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "process_vm moved 0 bytes",
            ));
        }
        moved += n;
        advance(ours, &mut oi, &mut ooff, n);
        advance(theirs, &mut ti, &mut toff, n);
    }
    Ok(moved)
}

/// Moves a (span index, offset) cursor over `spans` forward by `n` bytes.
fn advance(spans: &[Span], idx: &mut usize, off: &mut u64, mut n: u64) {
    while n > 0 && *idx < spans.len() {
        let step = (spans[*idx].len - *off).min(n);
        n -= step;
        *off += step;
        if *off == spans[*idx].len {
            *idx += 1;
            *off = 0;
        }
    }
}

/// Whether process_vm_readv works here (reads one byte of our own memory).
pub fn probe_cma() -> io::Result<()> {
    let src = [0x5au8; 1];
    let mut dst = [0u8; 1];
    let ours = [Span {
        addr: dst.as_mut_ptr() as u64,
        len: 1,
    }];
    let theirs = [Span {
        addr: src.as_ptr() as u64,
        len: 1,
    }];
    // SAFETY: `dst` is a live local array valid for a 1-byte write.
    unsafe { cross_copy(std::process::id() as i32, Cma::Pull, &ours, &theirs)? };
    if dst[0] == 0x5a {
        Ok(())
    } else {
        Err(io::Error::other("process_vm_readv returned wrong bytes"))
    }
}

/// Lets any process of ours ptrace us (and so use process_vm_* on us) where Yama restricts it.
pub fn allow_any_ptracer() {
    // SAFETY: prctl with integer arguments; failure (EINVAL without Yama) is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0);
    }
}

/// The seals a mapped memfd must carry: its size is fixed for good, so no process holding it
/// (a peer it was lent to, or one it came from) can cut the pages under a mapping (SIGBUS).
pub const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A new memfd of `len` bytes, sealed against shrinking and growing.
pub fn memfd(len: usize, huge: bool) -> io::Result<OwnedFd> {
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

/// `Err(reason)` unless `fd` is a memfd sealed with [`SIZE_SEALS`] (a peer's buffer is mapped
/// only then).
pub fn check_sealed(fd: RawFd) -> Result<(), String> {
    // SAFETY: fcntl with integer arguments; an fd that is not a memfd fails with EINVAL.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(format!(
            "the peer's buffer is not a sealable memfd ({}): refusing to map it",
            io::Error::last_os_error()
        ));
    }
    if seals & SIZE_SEALS != SIZE_SEALS {
        return Err(format!(
            "the peer's memfd is not sealed against shrinking and growing (seals {seals:#x}): \
             refusing to map it, since anyone holding it could truncate it under the mapping"
        ));
    }
    Ok(())
}

/// Maps `len` bytes of `fd` shared, read-write; `populate` builds the page tables now
/// (MAP_POPULATE) so the first transfer does not pay a fault per page.
pub fn map_shared(fd: RawFd, len: usize, populate: bool) -> io::Result<*mut u8> {
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
pub unsafe fn unmap(p: *mut u8, len: usize) {
    // SAFETY: per the contract.
    unsafe { libc::munmap(p.cast(), len) };
}

/// The size of the file behind `fd`.
pub fn fd_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: fstat writes into a zeroed stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    cvt(unsafe { libc::fstat(fd, &mut st) } as libc::c_long)?;
    Ok(st.st_size as u64)
}

/// Inode of our pid namespace (0 if unreadable).
pub fn pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable once it has).
/// Whether the other end of the connected socket `s` has shut it down or closed it (a zero
/// timeout poll for POLLRDHUP/POLLHUP): known at once from the kernel, before any reader of the
/// socket has seen the end.
pub fn peer_hung_up(s: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor the caller holds open, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

pub fn pid_exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor we own, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
}
