//! Sockets: this host's addresses, socket options, and reads and writes of frames and of
//! registered memory on a [`Link`]: on a plain link vectored straight between the socket and the
//! memory, on a TLS link through its record layer.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nixl_core::{Error, Run};

pub(super) use super::link::Link;

/// Most iovecs per readv/writev call (Linux's UIO_MAXIOV).
pub(super) const IOV_MAX: usize = 1024;

/// One contiguous range of memory to read into or write from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub addr: u64,
    pub len: u64,
}

/// Something that names one range of local memory: a [`Span`], or the local side of a core
/// [`Run`] (so a request made of runs is written and read without a second list).
pub(super) trait AsSpan {
    /// Address and length.
    fn span(&self) -> (u64, u64);
}

impl AsSpan for Span {
    fn span(&self) -> (u64, u64) {
        (self.addr, self.len)
    }
}

impl AsSpan for Run {
    fn span(&self) -> (u64, u64) {
        (self.local, self.len)
    }
}

/// The addresses of this host's interfaces that are up (loopback included).
pub(super) fn host_addrs() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `ifap`, which we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_UP as u32) == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push((
                name,
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
            ));
        } else if family == libc::AF_INET6 {
            // SAFETY: the family is AF_INET6, so the sockaddr is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
        }
    }
    // SAFETY: `ifap` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// Whether `ip` belongs to this host (loopback, or an address of one of its interfaces).
pub(super) fn is_local(ip: IpAddr, addrs: &[(String, IpAddr)]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || addrs.iter().any(|(_, a)| *a == ip)
}

/// The address an agent listens on by default: the host's first non-loopback IPv4 address, else
/// its first global-scope IPv6 address, else loopback.
pub(super) fn default_listen_ip() -> IpAddr {
    let addrs = host_addrs();
    let usable = |a: &IpAddr| match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    addrs
        .iter()
        .map(|(_, a)| *a)
        .find(|a| a.is_ipv4() && usable(a))
        .or_else(|| addrs.iter().map(|(_, a)| *a).find(usable))
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn setsockopt<T>(s: &TcpStream, level: i32, name: i32, value: T) -> io::Result<()> {
    // SAFETY: `value` is a live T for the call and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            &value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Low latency for small frames, large buffers for bulk data, keepalive to reap dead idle peers.
pub(super) fn tune(s: &TcpStream, buf_bytes: usize) -> io::Result<()> {
    s.set_nodelay(true)?;
    let b = i32::try_from(buf_bytes).unwrap_or(i32::MAX);
    // Buffer sizes are hints the kernel caps; failing to raise them is not an error.
    let _ = setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDBUF, b);
    let _ = setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVBUF, b);
    setsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1i32)?;
    let _ = setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10i32);
    let _ = setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5i32);
    let _ = setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3i32);
    Ok(())
}

/// A socket error as a request outcome: a path that stopped carrying packets (the kernel's
/// retransmission timeout, an unreachable network) is `TimedOut`; the peer closing or
/// resetting is a remote disconnect.
pub(super) fn peer_err(peer: &str, e: &io::Error) -> Error {
    use io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock | K::NetworkUnreachable | K::HostUnreachable => {
            tracing::warn!(peer, error = %e, "tcp: no path to the peer");
            Error::TimedOut
        }
        _ => Error::RemoteDisconnect {
            peer: peer.to_owned(),
            reason: e.to_string(),
        },
    }
}

pub(super) fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => {
                last = Some(io::Error::new(e.kind(), format!("connect to {a}: {e}")));
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address to connect to")))
}

/// Sets the receive timeout (how long one read may block).
pub(super) fn read_timeout(s: &Link, t: Duration) -> io::Result<()> {
    s.socket()
        .set_read_timeout(Some(t.max(Duration::from_millis(1))))
}

/// Sets the send timeout (how long one write may block) and the time unacknowledged data may
/// sit before the kernel gives the connection up.
pub(super) fn write_timeout(s: &Link, t: Duration, give_up: Duration) -> io::Result<()> {
    let s = s.socket();
    s.set_write_timeout(Some(t.max(Duration::from_millis(1))))?;
    let ms = u32::try_from(give_up.as_millis()).unwrap_or(u32::MAX);
    let _ = setsockopt(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms);
    Ok(())
}

/// A cursor over spans for partial vectored I/O.
#[derive(Debug)]
pub(super) struct SpanCursor<'a, S: AsSpan = Span> {
    spans: &'a [S],
    idx: usize,
    off: u64,
}

impl<'a, S: AsSpan> SpanCursor<'a, S> {
    pub(super) fn new(spans: &'a [S]) -> SpanCursor<'a, S> {
        let mut c = SpanCursor {
            spans,
            idx: 0,
            off: 0,
        };
        c.skip_empty();
        c
    }

    fn skip_empty(&mut self) {
        while self.idx < self.spans.len() && self.off >= self.spans[self.idx].span().1 {
            self.idx += 1;
            self.off = 0;
        }
    }

    pub(super) fn done(&self) -> bool {
        self.idx >= self.spans.len()
    }

    /// Fills `iov` (after `head` entries already there) with what is left, up to IOV_MAX.
    fn fill(&self, iov: &mut Vec<libc::iovec>) {
        let mut off = self.off;
        for s in &self.spans[self.idx..] {
            if iov.len() >= IOV_MAX {
                break;
            }
            let (addr, len) = s.span();
            iov.push(libc::iovec {
                iov_base: (addr + off) as usize as *mut libc::c_void,
                iov_len: (len - off) as usize,
            });
            off = 0;
        }
    }

    /// The next contiguous range left (address, length), without moving.
    pub(super) fn peek(&self) -> Option<(u64, u64)> {
        let (addr, len) = self.spans.get(self.idx)?.span();
        Some((addr + self.off, len - self.off))
    }

    /// The next contiguous range left, at most `max` bytes, and moves past it.
    pub(super) fn take(&mut self, max: u64) -> Option<(u64, u64)> {
        let (addr, len) = self.peek()?;
        let len = len.min(max);
        if len == 0 {
            return None;
        }
        self.advance(len);
        Some((addr, len))
    }

    pub(super) fn advance(&mut self, mut n: u64) {
        while n > 0 && self.idx < self.spans.len() {
            let left = self.spans[self.idx].span().1 - self.off;
            if n < left {
                self.off += n;
                return;
            }
            n -= left;
            self.idx += 1;
            self.off = 0;
        }
        self.skip_empty();
    }
}

/// One `writev` of `head` (bytes not yet sent of a header) followed by the spans' memory.
/// Returns bytes written; the caller advances.
///
/// # Safety
/// Every span must be readable memory for the duration of the call.
pub(super) unsafe fn writev_once(
    s: &TcpStream,
    head: &[u8],
    cur: &SpanCursor<'_, impl AsSpan>,
    iov: &mut Vec<libc::iovec>,
) -> io::Result<usize> {
    iov.clear();
    if !head.is_empty() {
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
    }
    cur.fill(iov);
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: the iovecs point at `head` (borrowed for the call) and at spans the caller
    // guarantees readable; sendmsg only reads them. MSG_NOSIGNAL: a closed peer is an error,
    // not a SIGPIPE.
    let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One `readv` into the spans' memory.
///
/// # Safety
/// Every span must be writable memory that no Rust reference aliases for the call.
pub(super) unsafe fn readv_once(
    s: &TcpStream,
    cur: &SpanCursor<'_, impl AsSpan>,
    iov: &mut Vec<libc::iovec>,
) -> io::Result<usize> {
    iov.clear();
    cur.fill(iov);
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: the caller guarantees the spans are writable and unaliased; readv writes at most
    // iov_len bytes into each.
    let r = unsafe { libc::readv(s.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Writes all of `buf` (sealed on a TLS link); a socket timeout is an error.
pub(super) fn send_all(s: &Link, buf: &[u8]) -> io::Result<()> {
    s.send_all(buf)
}

/// What to do when a blocking call found nothing for one socket timeout period: `Ok` to try
/// again, an error to give up. `started` says whether part of the unit was already moved.
pub(super) trait OnBlock {
    fn blocked(&mut self, started: bool) -> io::Result<()>;
    /// Bytes moved (resets idle clocks).
    fn progress(&mut self) {}
    /// Bytes moved: [`OnBlock::progress`], or an error to stop (a deadline that passed).
    fn moved(&mut self) -> io::Result<()> {
        self.progress();
        Ok(())
    }
}

impl<F: FnMut(bool) -> io::Result<()>> OnBlock for F {
    fn blocked(&mut self, started: bool) -> io::Result<()> {
        self(started)
    }
}

pub(super) fn retry(e: &io::Error) -> Option<bool> {
    match e.kind() {
        io::ErrorKind::Interrupted => Some(false),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Some(true),
        _ => None,
    }
}

/// Reads exactly `buf`, asking `on` what to do whenever a read times out.
pub(super) fn read_exact_with(s: &Link, buf: &mut [u8], on: &mut dyn OnBlock) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the peer",
                ))
            }
            Ok(n) => {
                got += n;
                on.moved()?;
            }
            Err(e) => match retry(&e) {
                Some(true) => on.blocked(got > 0)?,
                Some(false) => {}
                None => return Err(e),
            },
        }
    }
    Ok(())
}

/// Reads one frame into `body` (type byte first); returns the type. Grows `body` as bytes
/// arrive, so a length prefix alone cannot make it allocate much.
pub(super) fn read_frame(
    s: &Link,
    body: &mut Vec<u8>,
    limit: impl Fn(u8) -> usize,
    on: &mut dyn OnBlock,
) -> io::Result<u8> {
    let mut admit = |ty: u8, len: usize| {
        if len > limit(ty) {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of type {ty} with a body of {len} bytes is over its limit"),
            ))
        } else {
            Ok(())
        }
    };
    read_frame_admit(s, body, &mut admit, on)
}

/// As [`read_frame`], with `admit(type, body length)` deciding from the header alone, before a
/// byte of the body is read or allocated, whether the frame may come in.
pub(super) fn read_frame_admit(
    s: &Link,
    body: &mut Vec<u8>,
    admit: &mut dyn FnMut(u8, usize) -> io::Result<()>,
    on: &mut dyn OnBlock,
) -> io::Result<u8> {
    let mut head = [0u8; 5];
    read_exact_with(s, &mut head, on)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let ty = head[4];
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of type {ty} with length 0"),
        ));
    }
    let len = len - 1;
    admit(ty, len)?;
    body.clear();
    while body.len() < len {
        let have = body.len();
        let step = (len - have).min(1 << 20);
        body.resize(have + step, 0);
        let res = read_exact_with(s, &mut body[have..], &mut Started(on));
        if let Err(e) = res {
            body.truncate(have);
            return Err(e);
        }
    }
    Ok(ty)
}

/// Marks every block inside a unit as "started".
struct Started<'a>(&'a mut dyn OnBlock);

impl OnBlock for Started<'_> {
    fn blocked(&mut self, _: bool) -> io::Result<()> {
        self.0.blocked(true)
    }
    fn progress(&mut self) {
        self.0.progress();
    }
    fn moved(&mut self) -> io::Result<()> {
        self.0.moved()
    }
}

/// Reads exactly the spans' total length into their memory.
///
/// # Safety
/// Every span must be writable memory that no Rust reference aliases until this returns.
pub(super) unsafe fn read_spans<S: AsSpan>(
    s: &Link,
    spans: &[S],
    iov: &mut Vec<libc::iovec>,
    on: &mut dyn OnBlock,
) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { read_spans_until(s, spans, iov, on, &mut || false) }.map(drop)
}

/// As [`read_spans`], but asks `stop` after every read and every socket timeout (a tick) that
/// leaves the spans unfilled, and returns early when it says so: the bytes read into the spans
/// (all of them unless it stopped). The caller reads the rest of the frame off the stream. So an
/// abandoned READ leaves its memory within one socket read or one tick, over TLS too.
///
/// # Safety
/// As [`read_spans`].
pub(super) unsafe fn read_spans_until<S: AsSpan>(
    s: &Link,
    spans: &[S],
    iov: &mut Vec<libc::iovec>,
    on: &mut dyn OnBlock,
    stop: &mut dyn FnMut() -> bool,
) -> io::Result<u64> {
    if s.is_tls() {
        // SAFETY: forwarded from the caller.
        return unsafe { s.tls_read_spans_until(spans, on, stop) };
    }
    let sock = s.socket();
    // SAFETY: forwarded from the caller.
    fill_spans(spans, on, stop, |cur| unsafe { readv_once(sock, cur, iov) })
}

/// The loop of the span reads, plain or TLS: `read_once` reads at the cursor (one `readv`, or
/// one TLS read into the next range) until the spans are full, and `stop` is asked after every
/// read and every socket timeout that leaves them unfilled. Returns the bytes read.
pub(super) fn fill_spans<S: AsSpan>(
    spans: &[S],
    on: &mut dyn OnBlock,
    stop: &mut dyn FnMut() -> bool,
    mut read_once: impl FnMut(&SpanCursor<'_, S>) -> io::Result<usize>,
) -> io::Result<u64> {
    let mut cur = SpanCursor::new(spans);
    let mut got = 0u64;
    while !cur.done() {
        let r = read_once(&cur);
        if let Ok(n) = &r {
            got += *n as u64;
        }
        after_read(r, &mut cur, on)?;
        if !cur.done() && stop() {
            break;
        }
    }
    Ok(got)
}

/// Writes `head` then the spans' memory, all of it.
///
/// # Safety
/// Every span must be readable memory until this returns.
pub(super) unsafe fn write_spans<S: AsSpan>(
    s: &Link,
    head: &[u8],
    spans: &[S],
    iov: &mut Vec<libc::iovec>,
    on: &mut dyn OnBlock,
) -> io::Result<()> {
    if s.is_tls() {
        // SAFETY: forwarded from the caller.
        return unsafe { s.tls_write_spans(head, spans, on) };
    }
    let s = s.socket();
    let mut head = head;
    let mut cur = SpanCursor::new(spans);
    while !head.is_empty() || !cur.done() {
        // SAFETY: forwarded from the caller.
        match unsafe { writev_once(s, head, &cur, iov) } {
            Ok(n) => {
                let h = n.min(head.len());
                head = &head[h..];
                cur.advance((n - h) as u64);
                on.moved()?;
            }
            Err(e) => after_error(e, on)?,
        }
    }
    Ok(())
}

/// One step of a loop that reads into spans: end of stream is an error, bytes advance the
/// cursor, a timeout or interruption is retried (after telling `on`), anything else ends it.
pub(super) fn after_read<S: AsSpan>(
    r: io::Result<usize>,
    cur: &mut SpanCursor<'_, S>,
    on: &mut dyn OnBlock,
) -> io::Result<()> {
    match r {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by the peer",
        )),
        Ok(n) => {
            cur.advance(n as u64);
            on.moved()
        }
        Err(e) => after_error(e, on),
    }
}

/// A failed socket call of a span loop: retried (`Ok`) if it timed out or was interrupted,
/// after telling `on` about a timeout; else the error.
pub(super) fn after_error(e: io::Error, on: &mut dyn OnBlock) -> io::Result<()> {
    match retry(&e) {
        Some(true) => on.blocked(true),
        Some(false) => Ok(()),
        None => Err(e),
    }
}

/// Reads and throws away `n` bytes (the data of a refused WRITE, to keep the stream in step).
pub(super) fn discard(
    s: &Link,
    mut n: u64,
    scratch: &mut Vec<u8>,
    on: &mut dyn OnBlock,
) -> io::Result<()> {
    scratch.resize(64 << 10, 0);
    while n > 0 {
        let step = n.min(scratch.len() as u64) as usize;
        read_exact_with(s, &mut scratch[..step], &mut Started(on))?;
        n -= step as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_own_addresses_are_local() {
        let addrs = host_addrs();
        assert!(is_local("127.0.0.1".parse().unwrap(), &addrs));
        assert!(is_local("::1".parse().unwrap(), &addrs));
        assert!(is_local("::ffff:127.0.0.1".parse().unwrap(), &addrs));
        for (_, a) in &addrs {
            assert!(is_local(*a, &addrs));
        }
        assert!(!is_local("203.0.113.9".parse().unwrap(), &addrs));
    }

    #[test]
    fn cursor_advances_across_spans() {
        let spans = [
            Span { addr: 0, len: 3 },
            Span { addr: 10, len: 0 },
            Span { addr: 20, len: 5 },
        ];
        let mut c = SpanCursor::new(&spans);
        c.advance(2);
        assert_eq!((c.idx, c.off), (0, 2));
        c.advance(1);
        assert_eq!((c.idx, c.off), (2, 0));
        c.advance(4);
        assert!(!c.done());
        c.advance(1);
        assert!(c.done());
    }
}
