//! One message with a descriptor attached (SCM_RIGHTS) over a Unix stream socket, and the
//! peer's credentials (SO_PEERCRED): the plumbing of the pool socket, on top of the transports'
//! own (`nixl_transports::unix_socket`, which `shm` and `cuda` use).

use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nixl_transports::unix_socket;

/// The (pid, uid) of the process at the other end.
pub(crate) use unix_socket::peer_cred;

/// Sends all of `data`, with `fd` attached to its first byte when given.
pub(crate) fn send(s: &UnixStream, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    match fd {
        Some(fd) => unix_socket::send_with_fd(s, data, fd),
        None => (&*s).write_all(data),
    }
}

/// Reads until a newline (at most `max` bytes), keeping the first descriptor that arrives
/// (any others are closed at once). Returns the line without its newline.
pub(crate) fn recv_line(s: &UnixStream, max: usize) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut out = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = unix_socket::recv_with_fds(s, &mut buf, &mut fds)?;
        // Only the first descriptor is kept: the rest are closed as they come, so a peer
        // cannot pile descriptors up in this process.
        fds.truncate(1);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a full line",
            ));
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(i) = out.iter().position(|&b| b == b'\n') {
            out.truncate(i);
            return Ok((out, fds.pop()));
        }
        if out.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes"),
            ));
        }
    }
}
