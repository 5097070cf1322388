//! Unix-socket plumbing shared by the backends that talk to agents on the same node (`shm`,
//! `cuda`): peer credentials, fds passed with SCM_RIGHTS, the host's boot id.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nixl_core::Error;

/// Where agents' Unix sockets live by default: `$XDG_RUNTIME_DIR/nixl` (the user's own runtime
/// directory), else `nixl-<uid>` in the temp dir (one per user, so that users do not share it).
pub(crate) fn default_socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("nixl"),
        _ => std::env::temp_dir().join(format!("nixl-{}", euid())),
    }
}

/// Our effective uid (the owner of what we create).
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir` fit to hold `backend`'s socket before it binds there: created with mode 0700
/// where missing; an existing one must be a real directory (not a link) of our own uid that
/// nobody else can write (else anyone who can write it can delete or replace our socket, or
/// created it first to do so). Our own directory that others can only read or search is
/// tightened to 0700. Anything else is refused with the path and the fix.
pub(crate) fn secure_socket_dir(dir: &Path, backend: &str) -> nixl_core::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let refuse = |why: String| {
        Err(Error::InvalidArgument(format!(
            "{backend}: socket directory {}: {why}",
            dir.display()
        )))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("{backend}: create {}", dir.display()), e))?;
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("{backend}: inspect {}", dir.display()), e))?;
    if !md.file_type().is_dir() {
        return refuse(format!(
            "not a directory (a {}); remove it or set [{backend}] socket_dir elsewhere",
            if md.file_type().is_symlink() {
                "symbolic link"
            } else {
                "file"
            }
        ));
    }
    let me = euid();
    if md.uid() != me {
        return refuse(format!(
            "owned by uid {}, not by this process's uid {me}: another user could delete or \
             replace the socket; remove the directory, or set [{backend}] socket_dir to a \
             directory of your own (mode 0700)",
            md.uid()
        ));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return refuse(format!(
            "writable by group or others (mode {mode:o}): they could delete or replace the \
             socket; run `chmod 700 {}` or set [{backend}] socket_dir elsewhere",
            dir.display()
        ));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("{backend}: chmod 700 {}", dir.display()), e))?;
        let now = std::fs::symlink_metadata(dir)
            .map_err(|e| Error::io(format!("{backend}: inspect {}", dir.display()), e))?;
        if now.mode() & 0o077 != 0 || now.uid() != me {
            return refuse(format!(
                "still mode {:o} after chmod 700",
                now.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

pub(crate) fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The (pid, uid) of the process at the other end of a Unix socket.
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
pub(crate) fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Contents of /proc/sys/kernel/random/boot_id (empty if unreadable).
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Sends `data` with `fd` attached to its first byte (SCM_RIGHTS).
pub fn send_with_fd(s: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: a zeroed msghdr is a valid value; the fields set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE(sizeof fd) bytes (8-aligned), so the first header
    // and its payload fit; the macros only compute addresses inside it.
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
        // The fd went with the first byte; the rest is ordinary stream data.
        (&*s).write_all(&data[sent..])?;
    }
    Ok(())
}

/// Receives into `buf`, keeping any fds that came with the bytes. Returns bytes read (0 = EOF).
pub fn recv_with_fds(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: a zeroed msghdr is a valid value; the fields point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let r = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match cvt(r as libc::c_long) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    // SAFETY: walks the control messages the kernel wrote, with the kernel's macros, within
    // msg_controllen; each SCM_RIGHTS payload is an array of fds that we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
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
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nixl-sockdir-{name}-{}-{:x}",
            std::process::id(),
            nixl_core::random_u64().unwrap()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn socket_dir_is_created_private() {
        let d = scratch("new").join("a/b");
        secure_socket_dir(&d, "shm").unwrap();
        let md = std::fs::metadata(&d).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        assert_eq!(md.uid(), euid());
        // Our own directory that others may only read is tightened.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_socket_dir(&d, "shm").unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(d.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn socket_dir_others_can_write_is_refused() {
        let d = scratch("wide");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = secure_socket_dir(&d, "shm").unwrap_err().to_string();
        assert!(e.contains(&d.display().to_string()), "{e}");
        assert!(e.contains("chmod 700"), "{e}");
        assert_eq!(
            std::fs::metadata(&d).unwrap().mode() & 0o7777,
            0o1777,
            "left alone"
        );
        let link = scratch("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = secure_socket_dir(&link, "cuda").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir(&d).unwrap();
    }

    #[test]
    fn socket_dir_of_another_user_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: needs root to make a directory another user owns");
            return;
        }
        let d = scratch("theirs");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let p = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: chown on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::chown(p.as_ptr(), 65534, 65534) }, 0);
        let e = secure_socket_dir(&d, "shm").unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        assert!(e.contains(&d.display().to_string()), "{e}");
        std::fs::remove_dir(&d).unwrap();
    }
}
