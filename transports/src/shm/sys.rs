//! The unsafe bottom of the `shm` backend: thin wrappers over the syscalls it needs, each
//! returning `io::Result`. Above this module, `unsafe` appears only where memory is copied
//! (cross-memory attach here, plain copies into a peer's mapping in `client`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// `IOV_MAX` on Linux: the most iovecs one `process_vm_*` call takes per side.
pub const IOV_MAX: usize = 1024;

fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One pair of a cross-memory copy: `len` bytes at `ours` (this process) and at `theirs` (the
/// other process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    /// Address in this process.
    pub ours: u64,
    /// Address in the other process.
    pub theirs: u64,
    /// Bytes.
    pub len: u64,
}

/// Direction of a cross-memory copy, seen from the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cma {
    /// From the other process into ours (`process_vm_readv`).
    Pull,
    /// From ours into the other process (`process_vm_writev`).
    Push,
}

impl Cma {
    /// The syscall's name, for error messages.
    pub fn syscall(self) -> &'static str {
        match self {
            Cma::Pull => "process_vm_readv",
            Cma::Push => "process_vm_writev",
        }
    }
}

/// A position in a list of pairs seen as one stream of bytes: pair index and offset in it.
pub type Cursor = (usize, u64);

/// Copies `bytes` bytes of the stream `pairs`, starting at `start`, between this process and
/// process `pid`. Batches up to [`IOV_MAX`] pairs per call and resumes after short counts (the
/// kernel moves at most about 2 GiB per call). Returns the bytes moved, which is `bytes` unless
/// the pairs end first.
///
/// # Safety
/// For every pair the caller copies, `ours..ours+len` must be valid for writes (`Pull`) or
/// reads (`Push`) in this process for the duration of the call. The other process's addresses
/// are checked by the kernel (`EFAULT`); they need no promise.
pub unsafe fn cma_copy(
    pid: i32,
    dir: Cma,
    pairs: &[Pair],
    start: Cursor,
    bytes: u64,
) -> io::Result<u64> {
    const EMPTY: libc::iovec = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut local = [EMPTY; IOV_MAX];
    let mut remote = [EMPTY; IOV_MAX];
    let (mut i, mut off) = start;
    let mut moved = 0u64;
    while moved < bytes && i < pairs.len() {
        let left = bytes - moved;
        let (mut n, mut batch) = (0usize, 0u64);
        let (mut j, mut o) = (i, off);
        while n < IOV_MAX && batch < left && j < pairs.len() {
            let p = pairs[j];
            let take = p.len.saturating_sub(o).min(left - batch);
            local[n] = libc::iovec {
                iov_base: (p.ours + o) as *mut libc::c_void,
                iov_len: take as usize,
            };
            remote[n] = libc::iovec {
                iov_base: (p.theirs + o) as *mut libc::c_void,
                iov_len: take as usize,
            };
            n += 1;
            batch += take;
            j += 1;
            o = 0;
        }
        // SAFETY: the first `n` local iovecs lie inside pairs the caller promised valid for
        // this direction; the remote ones are addresses in process `pid`, which the kernel
        // checks. The kernel moves at most min(local total, remote total) bytes.
        let r = unsafe {
            match dir {
                Cma::Pull => libc::process_vm_readv(
                    pid,
                    local.as_ptr(),
                    n as libc::c_ulong,
                    remote.as_ptr(),
                    n as libc::c_ulong,
                    0,
                ),
                Cma::Push => libc::process_vm_writev(
                    pid,
                    local.as_ptr(),
                    n as libc::c_ulong,
                    remote.as_ptr(),
                    n as libc::c_ulong,
                    0,
                ),
            }
        };
        let got = cvt(r as libc::c_long)? as u64;
        if got == 0 && batch > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} moved 0 bytes", dir.syscall()),
            ));
        }
        moved += got;
        // Advance the cursor by `got` bytes.
        let mut adv = got;
        while adv > 0 && i < pairs.len() {
            let step = (pairs[i].len - off).min(adv);
            adv -= step;
            off += step;
            if off == pairs[i].len {
                i += 1;
                off = 0;
            }
        }
    }
    Ok(moved)
}

/// Checks that `process_vm_readv` works here by reading one byte of our own memory.
pub fn probe_cma() -> io::Result<()> {
    let src = [0x5au8; 1];
    let mut dst = [0u8; 1];
    let pairs = [Pair {
        ours: dst.as_mut_ptr() as u64,
        theirs: src.as_ptr() as u64,
        len: 1,
    }];
    // SAFETY: `dst` is a live local array valid for a 1-byte write.
    let n = unsafe { cma_copy(std::process::id() as i32, Cma::Pull, &pairs, (0, 0), 1)? };
    if n == 1 && dst[0] == 0x5a {
        Ok(())
    } else {
        Err(io::Error::other("process_vm_readv returned wrong bytes"))
    }
}

/// Lets any process ptrace us (and so use `process_vm_*` on us) where Yama restricts ptrace to
/// ancestors (`ptrace_scope = 1`). Without Yama the call fails with `EINVAL`, which is fine.
pub fn allow_any_ptracer() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
    match cvt(r as libc::c_long) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The pid and uid of the process at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_cred(s: &UnixStream) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    cvt(r as libc::c_long)?;
    Ok((cred.pid, cred.uid))
}

/// Our uid.
pub fn uid() -> u32 {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// Contents of /proc/sys/kernel/random/boot_id (empty if unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Inode of our pid namespace (0 if unreadable).
pub fn pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Shuts down one or both directions of a socket (also wakes a thread blocked in `accept` on a
/// listening socket, with `EINVAL`).
pub fn shutdown(fd: RawFd, how: std::net::Shutdown) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown on a descriptor number; at worst EBADF/ENOTCONN, reported.
    cvt(unsafe { libc::shutdown(fd, how) } as libc::c_long).map(drop)
}

/// Connects to the Unix socket at `path`, giving up after `timeout` (a listener whose backlog
/// is full makes a non-blocking connect fail with `EAGAIN`; we retry until the deadline).
pub fn connect_timeout(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid (family set below).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path is longer than {} bytes or holds a NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket creation.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    } as libc::c_long)?;
    // SAFETY: socket() returned a fresh descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(200);
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `addr_len` bytes.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                addr_len,
            )
        };
        match cvt(r as libc::c_long) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                wait_writable(fd.as_raw_fd(), deadline)?;
                break;
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EAGAIN)
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {timeout:?} (listener backlog full)"),
                    ));
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn wait_writable(fd: RawFd, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        match cvt(unsafe { libc::poll(&mut p, 1, ms) } as libc::c_long) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `err`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(r as libc::c_long)?;
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

/// A new sealable memfd of `len` bytes that can never shrink (`F_SEAL_SHRINK`): a peer that
/// maps it cannot be made to fault (SIGBUS) by truncation.
pub fn memfd(len: usize, huge: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: the name is a NUL-terminated static string.
    let fd = cvt(unsafe { libc::memfd_create(c"nixl-shm".as_ptr(), flags) } as libc::c_long)?;
    // SAFETY: memfd_create returned a fresh descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let size = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    // SAFETY: ftruncate on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) } as libc::c_long)?;
    // SAFETY: fcntl with an integer argument on a descriptor we own.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    } as libc::c_long)?;
    Ok(fd)
}

/// Whether the file behind `fd` is sealed against shrinking.
pub fn is_shrink_sealed(fd: RawFd) -> io::Result<bool> {
    // SAFETY: fcntl F_GET_SEALS takes no argument; EINVAL on files that are not memfds.
    let seals = cvt(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) } as libc::c_long)?;
    Ok(seals as libc::c_int & libc::F_SEAL_SHRINK != 0)
}

/// Maps `len` bytes of `fd` from `offset`, shared, read-write. `populate` builds the page
/// tables now (`MAP_POPULATE`), so later copies take no fault per page and a hugetlb mapping
/// without reserved huge pages fails here rather than with SIGBUS later.
pub fn map_shared(fd: RawFd, offset: u64, len: usize, populate: bool) -> io::Result<*mut u8> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: a fresh mapping placed by the kernel; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 },
            fd,
            off,
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
    // SAFETY: per the contract, nothing refers to the mapping any more.
    unsafe { libc::munmap(p.cast(), len) };
}

/// The size of the file behind `fd`.
pub fn fd_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: a zeroed stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which we own.
    cvt(unsafe { libc::fstat(fd, &mut st) } as libc::c_long)?;
    Ok(st.st_size as u64)
}

/// The size of the pages behind `fd` (the huge page size for hugetlb files).
pub fn fd_page_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: a zeroed statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, which we own.
    cvt(unsafe { libc::fstatfs(fd, &mut st) } as libc::c_long)?;
    Ok((st.f_bsize as u64).max(page_size()))
}

/// The base page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf with a constant name.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Sends all of `parts`, in order, with as few syscalls as the kernel allows. Uses
/// `MSG_NOSIGNAL`: a peer that went away gives `EPIPE`, never a SIGPIPE (which would kill a host
/// process that has not ignored it, as C programs using the C ABI often have not).
pub fn send_all(s: &UnixStream, parts: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    let mut parts = parts;
    // Drops empty leading slices.
    io::IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let n = parts.len().min(IOV_MAX);
        // SAFETY: a zeroed msghdr is valid; the iovec array is `parts` itself (IoSlice is
        // ABI-compatible with iovec on Unix), live and unmodified during the call.
        let r = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = n as _;
            libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        match cvt(r as libc::c_long) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => io::IoSlice::advance_slices(&mut parts, k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends all of `data` (see [`send_all`]).
pub fn send_bytes(s: &UnixStream, data: &[u8]) -> io::Result<()> {
    send_all(s, &mut [io::IoSlice::new(data)])
}

/// Waits until `fd` is readable (or hung up), at most `timeout`. Returns whether it is.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    match cvt(unsafe { libc::poll(&mut p, 1, ms) } as libc::c_long) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// A new descriptor for the same open file (close-on-exec).
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl F_DUPFD_CLOEXEC on a descriptor number; EBADF if it is not open.
    let n = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) } as libc::c_long)?;
    // SAFETY: fcntl returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(n as RawFd) })
}

/// Sends `data` with one descriptor attached (`SCM_RIGHTS`).
pub fn send_with_fd(s: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one cmsg header and one int, 8-aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&cbuf));
    // SAFETY: a zeroed msghdr is valid; the fields set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(sizeof fd) bytes, so the first header and its
    // data fit; the macros only compute addresses inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    let sent = loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        match cvt(unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } as libc::c_long)
        {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if sent < data.len() {
        // The descriptor went with the first bytes; the rest is ordinary stream data.
        send_bytes(s, &data[sent..])?;
    }
    Ok(())
}

/// Receives into `buf`, collecting descriptors passed with the data into `fds`. Returns the
/// bytes read (0: end of stream).
pub fn recv_with_fds(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16]; // 128 bytes, 8-aligned: room for several descriptors
    // SAFETY: a zeroed msghdr is valid; the fields set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = cvt(
        unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) } as libc::c_long,
    )?;
    // SAFETY: we walk the control messages the kernel wrote with the kernel's own macros, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors that are now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = ((*c).cmsg_len as usize).saturating_sub(data as usize - c as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cma_copy_handles_many_uneven_pairs_and_cursors() {
        let src: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; 50_000];
        // 2500 pairs of 20 bytes, more than IOV_MAX, reversed order on the other side.
        let pairs: Vec<Pair> = (0..2500u64)
            .map(|i| Pair {
                ours: dst.as_mut_ptr() as u64 + i * 20,
                theirs: src.as_ptr() as u64 + (2499 - i) * 20,
                len: 20,
            })
            .collect();
        let pid = std::process::id() as i32;
        // Three pieces with cursors in the middle of pairs, as the splitter makes them.
        let mut moved = 0;
        for (start, bytes) in [((0, 0), 15_005), ((750, 5), 20_000), ((1750, 5), 14_995)] {
            // SAFETY: every `ours` range lies inside `dst`, live and writable for the call.
            moved += unsafe { cma_copy(pid, Cma::Pull, &pairs, start, bytes) }.unwrap();
        }
        assert_eq!(moved, 50_000);
        for i in 0..2500 {
            assert_eq!(
                &dst[i * 20..i * 20 + 20],
                &src[(2499 - i) * 20..(2499 - i) * 20 + 20]
            );
        }
    }

    #[test]
    fn cma_copy_reports_bad_remote_addresses() {
        let mut dst = [0u8; 8];
        let pairs = [Pair {
            ours: dst.as_mut_ptr() as u64,
            theirs: 8, // never mapped
            len: 8,
        }];
        // SAFETY: `dst` is valid for the write.
        let err =
            unsafe { cma_copy(std::process::id() as i32, Cma::Pull, &pairs, (0, 0), 8) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn probe_works_and_ptracer_call_is_harmless() {
        probe_cma().unwrap();
        allow_any_ptracer().unwrap();
    }

    #[test]
    fn memfd_is_shrink_sealed() {
        let fd = memfd(8192, false).unwrap();
        assert!(is_shrink_sealed(fd.as_raw_fd()).unwrap());
        assert_eq!(fd_size(fd.as_raw_fd()).unwrap(), 8192);
        // SAFETY: ftruncate on our own descriptor.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
        assert_eq!(r, -1, "shrinking a sealed memfd must fail");
    }

    #[test]
    fn connect_to_nothing_fails_fast() {
        let err = connect_timeout(
            Path::new("/nonexistent-nixl/x.sock"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let long = "x".repeat(200);
        assert!(connect_timeout(Path::new(&long), Duration::from_secs(1)).is_err());
    }
}
