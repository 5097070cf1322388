//! One connection's byte stream once the handshake is done: plain, or TLS.
//!
//! A plain link (no shared secret: a host-only or open listener) moves bytes straight between
//! the socket and registered memory with `readv`/`writev` ([`super::net`]). A TLS link runs the
//! record layer in user space with rustls (kernel TLS is not assumed): plaintext is copied out of
//! registered memory into records as they are encrypted, and decrypted records are copied into
//! it, one copy each way.
//!
//! A link is shared by the threads of a connection (an initiator's lane has a sender, a
//! receiver, and posting threads that write small requests themselves), so the TLS state sits
//! behind a lock that is held only while encrypting or decrypting, never across a socket call:
//! - writers take `tx` for a whole frame (records leave in the order they were sealed), seal up
//!   to [`STEP`] bytes under the connection's lock, and send them without it;
//! - the one reader takes `rx`, reads ciphertext from the socket without the connection's lock,
//!   then feeds it to rustls and copies the plaintext out under it. TLS messages the reader's
//!   processing queues (a key update) leave with the next write.
//!
//! While a handshake deadline is set ([`Link::set_deadline`]) every read checks it, so a peer
//! that trickles bytes cannot keep a handshake open past it.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::net::{after_error, fill_spans, AsSpan, OnBlock, SpanCursor};

/// Most plaintext sealed under the connection's lock at once.
const STEP: u64 = 256 << 10;
/// Ciphertext read from the socket at once.
const RX_BUF: usize = 256 << 10;

/// A connection's stream (see the module docs).
pub(crate) struct Link {
    sock: TcpStream,
    /// Milliseconds since [`epoch`] (plus one) after which reads fail; 0: no deadline.
    deadline: AtomicU64,
    tls: Option<Box<Tls>>,
    /// The other side said in its hello that it takes SPAN frames ([`super::wire::SPAN_READ`]).
    spans: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.sock.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

struct Tls {
    conn: Mutex<rustls::Connection>,
    rx: Mutex<Rx>,
    /// Sealed records on their way to the socket; held by a writer for a whole frame.
    tx: Mutex<Vec<u8>>,
}

/// Ciphertext read from the socket and not yet given to rustls.
struct Rx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn epoch_ms(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

impl Link {
    /// A plain link: bytes move as they are.
    pub(super) fn plain(sock: TcpStream) -> Link {
        Link {
            sock,
            deadline: AtomicU64::new(0),
            tls: None,
            spans: false,
        }
    }

    /// A TLS link over `sock`, whose handshake `conn` has completed.
    pub(super) fn tls(sock: TcpStream, mut conn: rustls::Connection) -> Link {
        // We drain sealed records after every step, so rustls's own limit is not needed.
        conn.set_buffer_limit(None);
        Link {
            sock,
            deadline: AtomicU64::new(0),
            tls: Some(Box::new(Tls {
                conn: Mutex::new(conn),
                rx: Mutex::new(Rx {
                    buf: vec![0u8; RX_BUF].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
                tx: Mutex::new(Vec::with_capacity(STEP as usize + (STEP as usize >> 6))),
            })),
            spans: false,
        }
    }

    /// Records whether the other side takes SPAN frames (from its hello).
    pub(super) fn with_spans(mut self, spans: bool) -> Link {
        self.spans = spans;
        self
    }

    /// Whether the other side takes SPAN frames (its hello said so).
    pub(crate) fn takes_spans(&self) -> bool {
        self.spans
    }

    /// The socket (for its options).
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Whether the link is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Shuts the socket down (wakes a thread blocked on it).
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }

    /// From now on reads fail with `TimedOut` once `deadline` has passed (`None`: no deadline;
    /// the caller then sets the socket's timeouts it wants).
    pub(crate) fn set_deadline(&self, deadline: Option<Instant>) {
        self.deadline
            .store(deadline.map_or(0, epoch_ms), Ordering::Release);
    }

    /// Fails past the deadline; before it, bounds the next socket read by it.
    fn check_deadline(&self) -> io::Result<()> {
        let d = self.deadline.load(Ordering::Acquire);
        if d == 0 {
            return Ok(());
        }
        let now = epoch_ms(Instant::now());
        if now >= d {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake did not finish within its deadline",
            ));
        }
        self.sock
            .set_read_timeout(Some(Duration::from_millis(d - now)))
    }

    /// One read of at most `buf.len()` bytes (0: the peer closed the stream). Errors of kind
    /// `WouldBlock`/`TimedOut` mean the socket's timeout passed with nothing to read.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            None => {
                self.check_deadline()?;
                (&self.sock).read(buf)
            }
            Some(t) => self.tls_read(t, buf),
        }
    }

    fn tls_read(&self, t: &Tls, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = t.rx.lock();
        let mut got = 0;
        loop {
            {
                let mut c = t.conn.lock();
                loop {
                    match c.reader().read(&mut buf[got..]) {
                        // A close_notify: the end of the stream.
                        Ok(0) => return Ok(got),
                        Ok(n) => {
                            got += n;
                            if got == buf.len() {
                                return Ok(got);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if got > 0 => {
                            drop(e);
                            return Ok(got);
                        }
                        Err(e) => return Err(e),
                    }
                    if rx.start == rx.end {
                        break;
                    }
                    let mut src = &rx.buf[rx.start..rx.end];
                    let n = c.read_tls(&mut src)?;
                    rx.start = if n == 0 { rx.end } else { rx.start + n };
                    c.process_new_packets().map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("tls: {e}"))
                    })?;
                }
            }
            if got > 0 {
                return Ok(got);
            }
            self.check_deadline()?;
            let n = (&self.sock).read(&mut rx.buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the peer",
                ));
            }
            rx.start = 0;
            rx.end = n;
        }
    }

    /// Whether bytes already read from the socket wait inside the link (TLS records not yet
    /// opened, or opened and not yet read): a reader has more to do before it blocks.
    pub(crate) fn pending(&self) -> bool {
        match &self.tls {
            None => false,
            Some(t) => {
                let rx = t.rx.lock();
                if rx.start != rx.end {
                    return true;
                }
                let mut c = t.conn.lock();
                // An error is kept by rustls and met by the next read: work to do.
                c.process_new_packets()
                    .map_or(true, |st| st.plaintext_bytes_to_read() > 0)
            }
        }
    }

    /// Writes all of `buf`; a socket timeout is an error.
    pub(crate) fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        match &self.tls {
            None => send_with(&self.sock, buf, &mut GiveUp),
            // SAFETY: no spans.
            Some(t) => unsafe { self.tls_write::<super::net::Span>(t, buf, &[], &mut GiveUp) },
        }
    }

    /// Seals `head` then the spans' memory and sends the records.
    ///
    /// # Safety
    /// Every span must be readable memory until this returns.
    pub(super) unsafe fn tls_write_spans<S: AsSpan>(
        &self,
        head: &[u8],
        spans: &[S],
        on: &mut dyn OnBlock,
    ) -> io::Result<()> {
        let t = self.tls.as_ref().expect("a TLS link");
        // SAFETY: forwarded from the caller.
        unsafe { self.tls_write(t, head, spans, on) }
    }

    /// # Safety
    /// Every span must be readable memory until this returns.
    unsafe fn tls_write<S: AsSpan>(
        &self,
        t: &Tls,
        head: &[u8],
        spans: &[S],
        on: &mut dyn OnBlock,
    ) -> io::Result<()> {
        let mut tx = t.tx.lock();
        let mut head = head;
        let mut cur = SpanCursor::new(spans);
        let mut parts: Vec<(u64, u64)> = Vec::with_capacity(16);
        while !head.is_empty() || !cur.done() {
            let mut budget = STEP;
            let h = head.len().min(STEP as usize);
            budget -= h as u64;
            parts.clear();
            while budget > 0 {
                let Some((addr, len)) = cur.take(budget) else {
                    break;
                };
                parts.push((addr, len));
                budget -= len;
            }
            let mut slices: Vec<io::IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
            if h > 0 {
                slices.push(io::IoSlice::new(&head[..h]));
            }
            for &(addr, len) in &parts {
                // SAFETY: the caller guarantees the spans are readable until this returns;
                // the slice is only read, while this call runs.
                slices.push(io::IoSlice::new(unsafe {
                    std::slice::from_raw_parts(addr as usize as *const u8, len as usize)
                }));
            }
            let want: usize = slices.iter().map(|s| s.len()).sum();
            tx.clear();
            {
                let mut c = t.conn.lock();
                let n = io::Write::write_vectored(&mut c.writer(), &slices)?;
                if n != want {
                    return Err(io::Error::other(
                        "tls: the record layer took part of a frame",
                    ));
                }
                while c.wants_write() {
                    c.write_tls(&mut *tx)?;
                }
            }
            drop(slices);
            head = &head[h..];
            send_with(&self.sock, &tx, on)?;
        }
        // Messages a read queued (a key update) with nothing after them.
        let mut c = t.conn.lock();
        if c.wants_write() {
            tx.clear();
            while c.wants_write() {
                c.write_tls(&mut *tx)?;
            }
            drop(c);
            send_with(&self.sock, &tx, on)?;
        }
        Ok(())
    }

    /// Reads the spans' total length into their memory, decrypting, asking `stop` after every
    /// read (and every socket timeout) that leaves the spans unfilled, and returns early with
    /// the bytes read when it says so. The TLS stream stays in step: what was not read is still
    /// there to read or discard.
    ///
    /// # Safety
    /// Every span must be writable memory that no Rust reference aliases until this returns.
    pub(super) unsafe fn tls_read_spans_until<S: AsSpan>(
        &self,
        spans: &[S],
        on: &mut dyn OnBlock,
        stop: &mut dyn FnMut() -> bool,
    ) -> io::Result<u64> {
        fill_spans(spans, on, stop, |cur| {
            let Some((addr, len)) = cur.peek() else {
                return Ok(0); // never: `fill_spans` reads only while a range is left
            };
            // SAFETY: the caller guarantees the span is writable and unaliased until this
            // returns; the slice lives only for this read.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len as usize) };
            self.read(dst)
        })
    }
}

/// Gives up at the first socket timeout.
struct GiveUp;

impl OnBlock for GiveUp {
    fn blocked(&mut self, _: bool) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    }
}

/// Sends all of `buf`, asking `on` whenever the socket's send timeout passes.
fn send_with(s: &TcpStream, mut buf: &[u8], on: &mut dyn OnBlock) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live byte slice for the call; MSG_NOSIGNAL: a closed peer is an
        // error, not a SIGPIPE.
        let r = unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            after_error(io::Error::last_os_error(), on)?;
            continue;
        }
        buf = &buf[r as usize..];
        on.moved()?;
    }
    Ok(())
}
