//! The frames of a data connection: WRITE, READ and NOTIF carried out against the agent's
//! registrations.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nixl_core::{Desc, MemKind, RegionAccess};

use super::net::{self, Link, OnBlock, Span};
use super::server::Shared;
use super::server_conn::{Frames, Idle};
use super::wire::{self, Piece, Status};

/// Carries out the frames of one data connection.
pub(super) struct Worker<'a> {
    shared: &'a Shared,
    peer: String,
    pieces: Vec<Piece>,
    spans: Vec<Span>,
    holds: Vec<RegionAccess>,
    iov: Vec<libc::iovec>,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

impl<'a> Worker<'a> {
    pub(super) fn new(shared: &'a Shared, peer: String) -> Worker<'a> {
        Worker {
            shared,
            peer,
            pieces: Vec::new(),
            spans: Vec::new(),
            holds: Vec::new(),
            iov: Vec::with_capacity(net::IOV_MAX),
            out: Vec::with_capacity(256),
            scratch: Vec::new(),
        }
    }

    pub(super) fn run(
        mut self,
        s: &Link,
        mut frames: Frames<'_>,
        body: &mut Vec<u8>,
        waiting: &AtomicBool,
    ) -> io::Result<()> {
        loop {
            self.await_frame(s, waiting)?;
            let ty = frames.next(s, body)?;
            // Data moving after a frame gives up after `io_timeout` of silence (`started`).
            let mut idle = Idle::new(self.shared, self.shared.cfg.idle_timeout);
            match ty {
                wire::WRITE | wire::READ => {
                    let (id, chunk, total) =
                        wire::decode_xfer(body, &mut self.pieces).map_err(wire::bad)?;
                    let verdict = self.check();
                    if ty == wire::WRITE {
                        self.write(s, id, chunk, total, verdict, &mut idle)?;
                    } else {
                        self.read(s, id, chunk, total, verdict, &mut idle)?;
                    }
                    self.holds.clear();
                }
                wire::SPAN_WRITE | wire::SPAN_READ => {
                    let x = wire::decode_spans(body, &mut self.spans).map_err(wire::bad)?;
                    let verdict = self.check_hull(&x);
                    if ty == wire::SPAN_WRITE {
                        self.write(s, x.id, x.chunk, x.total, verdict, &mut idle)?;
                    } else {
                        self.read(s, x.id, x.chunk, x.total, verdict, &mut idle)?;
                    }
                    self.holds.clear();
                }
                wire::NOTIF => {
                    let (id, msg) = wire::decode_notif(body).map_err(wire::bad)?;
                    match self.shared.target.deliver(&self.peer, msg.to_vec()) {
                        Ok(()) => wire::ack(&mut self.out, id, u32::MAX, Status::Ok, ""),
                        Err(full) => wire::ack(
                            &mut self.out,
                            id,
                            u32::MAX,
                            Status::Denied,
                            &full.to_string(),
                        ),
                    }
                    net::send_all(s, &self.out)?;
                }
                t => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("frame type {t} on a data connection"),
                    ))
                }
            }
        }
    }

    /// Returns once a frame's first bytes are here (or the stream ended), marked idle in
    /// `waiting` meanwhile, and busy again before a byte is taken off the socket: what
    /// [`Server::peer_idle`](super::server::Server::peer_idle) reads. Gives up as a read between
    /// frames does (shutdown, idle).
    fn await_frame(&self, s: &Link, waiting: &AtomicBool) -> io::Result<()> {
        if s.pending() {
            return Ok(());
        }
        waiting.store(true, Ordering::SeqCst);
        let mut idle = Idle::new(self.shared, self.shared.cfg.idle_timeout);
        let fd = s.socket().as_raw_fd();
        let res = loop {
            let mut b = 0u8;
            // SAFETY: peeks at most one byte into `b`; the socket is ours and open. It blocks
            // for at most the socket's read timeout (TICK).
            let r = unsafe { libc::recv(fd, (&mut b as *mut u8).cast(), 1, libc::MSG_PEEK) };
            if r >= 0 {
                // Bytes, or the end of the stream (the frame read reports it).
                break Ok(());
            }
            let e = io::Error::last_os_error();
            match net::retry(&e) {
                Some(true) => {
                    if let Err(e) = idle.blocked(false) {
                        break Err(e);
                    }
                }
                Some(false) => {}
                None => break Err(e),
            }
        };
        waiting.store(false, Ordering::SeqCst);
        res
    }

    /// Checks every piece against the registrations; holds the regions while the data moves.
    fn check(&mut self) -> std::result::Result<(), String> {
        self.spans.clear();
        self.holds.clear();
        for (i, p) in self.pieces.iter().enumerate() {
            match self
                .shared
                .target
                .check(MemKind::Dram, &Desc::new(p.addr, p.len, 0), p.key)
            {
                Ok(access) => {
                    self.holds.push(access);
                    self.spans.push(Span {
                        addr: p.addr,
                        len: p.len,
                    });
                }
                Err(denied) => {
                    self.holds.clear();
                    metrics::counter!("nixl_tcp_denied_total").increment(1);
                    tracing::warn!(agent = %self.shared.target.name(), peer = %self.peer,
                        piece = i, "tcp: refused remote access: {denied}");
                    return Err(format!("piece {i} ({:#x}+{}): {denied}", p.addr, p.len));
                }
            }
        }
        Ok(())
    }

    /// Checks a SPAN frame: every span lies in `lo..hi` (the decoder checked), so one check that
    /// a region registered with `key` holds all of `lo..hi` covers them all; holds that region
    /// while the data moves.
    fn check_hull(&mut self, x: &wire::SpanXfer) -> std::result::Result<(), String> {
        self.holds.clear();
        if self.spans.is_empty() {
            return Ok(());
        }
        let desc = Desc::new(x.lo, x.hi - x.lo, 0);
        match self.shared.target.check(MemKind::Dram, &desc, x.key) {
            Ok(access) => {
                self.holds.push(access);
                Ok(())
            }
            Err(denied) => {
                self.spans.clear();
                metrics::counter!("nixl_tcp_denied_total").increment(1);
                tracing::warn!(agent = %self.shared.target.name(), peer = %self.peer,
                    bytes = x.total, "tcp: refused remote access: {denied}");
                Err(format!(
                    "spans in {:#x}..{:#x} (key {:#x}): {denied}",
                    x.lo, x.hi, x.key
                ))
            }
        }
    }

    fn write(
        &mut self,
        s: &Link,
        id: u64,
        chunk: u32,
        total: u64,
        verdict: std::result::Result<(), String>,
        idle: &mut Idle<'_>,
    ) -> io::Result<()> {
        match verdict {
            Ok(()) => {
                // SAFETY: every span was checked to lie inside a registered DRAM region of this
                // agent, and `holds` keeps those regions registered (deregistration waits) until
                // the read returns. Registered memory is lent to peers by contract
                // (`Agent::register`), so no Rust reference of ours aliases it.
                unsafe { net::read_spans(s, &self.spans, &mut self.iov, idle)? };
                metrics::counter!("nixl_tcp_bytes_in_total").increment(total);
                // A peer's WRITE: these bytes arrived at this agent.
                metrics::counter!("nixl_agent_rx_bytes_total").increment(total);
                wire::ack(&mut self.out, id, chunk, Status::Ok, "");
            }
            Err(why) => {
                net::discard(s, total, &mut self.scratch, idle)?;
                wire::ack(&mut self.out, id, chunk, Status::Denied, &why);
            }
        }
        net::send_all(s, &self.out)
    }

    fn read(
        &mut self,
        s: &Link,
        id: u64,
        chunk: u32,
        total: u64,
        verdict: std::result::Result<(), String>,
        idle: &mut Idle<'_>,
    ) -> io::Result<()> {
        match verdict {
            Ok(()) => {
                wire::data(&mut self.out, id, chunk, Status::Ok, total, "");
                // SAFETY: as in `write`: checked, held registered memory, read only.
                unsafe { net::write_spans(s, &self.out, &self.spans, &mut self.iov, idle)? };
                metrics::counter!("nixl_tcp_bytes_out_total").increment(total);
                // A peer's READ: these bytes left this agent.
                metrics::counter!("nixl_agent_tx_bytes_total").increment(total);
                Ok(())
            }
            Err(why) => {
                wire::data(&mut self.out, id, chunk, Status::Denied, 0, &why);
                net::send_all(s, &self.out)
            }
        }
    }
}
