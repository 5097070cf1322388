//! The owner's Unix socket: grants exported VMM fds to peers that present the region key, records
//! which peer imported which region, revokes those imports when the owner deregisters, and
//! receives notifications; plus the importer's side: a client with a reader thread per
//! connection, and the cache of mappings with their revocation.
//!
//! # Wire format
//!
//! Every frame is `u32 length` (at most [`MAX_FRAME`]) then a body starting with a type byte:
//!
//! ```text
//!   peer → owner                                                         owner → peer
//! 1 Grant    u64 id, u64 dev, u64 addr, u64 len, u64 key, u32 chunk
//! 2                                                   Granted  u64 id, u64 alloc size + one fd
//! 3                                                   Refused  u64 id, str reason
//! 4 Notif    u64 id, str from, blob msg
//! 5                                                   Ack      u64 id
//! 6 Opened   u64 id, u64 dev, u64 addr, u64 len, u64 key
//! 7                                                   Revoke   u64 dev, u64 addr, u64 len, u64 key
//! 8 Revoked  u64 dev, u64 addr, u64 len, u64 key
//! ```
//!
//! The region in Grant, Opened, Revoke and Revoked is the whole registered region as the owner's
//! metadata publishes it, and `key` its key. Grant (answered Granted or Refused) asks for a VMM
//! chunk's fd; Opened (answered Ack or Refused) announces that the peer is about to map the
//! region through handles it holds from the metadata (legacy IPC, fabric). The owner checks both
//! with the region key (`TargetHandle::check`, whole region only), and records the import while
//! the check still holds the region, so a deregistration cannot slip between the check and the
//! record. A peer never uses a region whose announcement was refused.
//!
//! # Revocation
//!
//! On deregistration the owner sends Revoke to every connection that imported the region and
//! waits, at most its timeout, for Revoked from each ([`IpcServer::revoke`]). A connection that
//! has ended (the peer died) is skipped at once; one that does not answer in time is reported and
//! the owner goes on. The peer, on Revoke, closes the region's gate so no new copy starts, waits
//! (bounded) for copies in flight on it, closes its mappings, drops it from its [`ImportCache`]
//! and answers Revoked ([`RevokeSink`]). A connection to an owner that ends, for whatever reason,
//! makes the peer give up every mapping imported from that owner: the owner no longer tracks
//! them, so it could not revoke them.
//!
//! # Faults
//!
//! Both ends check `SO_PEERCRED`: the peer runs as our uid. Every frame is length-bounded and
//! decoded without trust; a malformed, oversized or out-of-direction frame drops that connection
//! only. The socket lives in a directory of mode 0700. A client waits at most its timeout for any
//! reply, and every write on either side has that timeout, so a dead or stuck owner or peer is a
//! clear error, never a hang.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nixl_core::codec::Reader;
use nixl_core::region::{enter_all, leave_all, AccessGate, Ticket};
use nixl_core::{DecodeError, Desc, Error, Result};
use parking_lot::{Condvar, Mutex};

use crate::owner::Peers;

mod client;
mod imports;
mod server;
#[cfg(test)]
mod tests;

pub(crate) use client::*;
pub(crate) use imports::*;
pub(crate) use server::*;

/// Largest frame body.
pub(crate) const MAX_FRAME: usize = (1 << 20) + 4096;
/// Longest notification message carried: the one limit of every backend.
pub(crate) const MAX_NOTIF: usize = nixl_core::MAX_NOTIF_BYTES;

const T_GRANT: u8 = 1;
const T_GRANTED: u8 = 2;
const T_REFUSED: u8 = 3;
const T_NOTIF: u8 = 4;
const T_ACK: u8 = 5;
const T_OPENED: u8 = 6;
const T_REVOKE: u8 = 7;
const T_REVOKED: u8 = 8;

/// One message on the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Asks for chunk `chunk` of the region `region`, presenting `key`.
    Grant {
        /// Request id.
        id: u64,
        /// The region as the peer's metadata describes it.
        region: Desc,
        /// The region key.
        key: u64,
        /// Chunk index.
        chunk: u32,
    },
    /// The fd comes with this frame.
    Granted {
        /// Request id.
        id: u64,
        /// Size of the exported allocation.
        alloc_size: u64,
    },
    /// Refused, with the reason.
    Refused {
        /// Request id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// A notification for the owner agent.
    Notif {
        /// Request id.
        id: u64,
        /// Sender agent name.
        from: String,
        /// The message.
        msg: Vec<u8>,
    },
    /// The notification was delivered, or the announcement accepted.
    Ack {
        /// Request id.
        id: u64,
    },
    /// The peer announces that it maps `region` through handles from the metadata.
    Opened {
        /// Request id.
        id: u64,
        /// The region as the peer's metadata describes it.
        region: Desc,
        /// The region key.
        key: u64,
    },
    /// The owner deregistered `region`: the peer must stop using it and close its mappings.
    Revoke {
        /// The region.
        region: Desc,
        /// Its key.
        key: u64,
    },
    /// The peer has closed its mappings of `region`.
    Revoked {
        /// The region.
        region: Desc,
        /// Its key.
        key: u64,
    },
}

fn put_region(b: &mut Vec<u8>, region: &Desc, key: u64) {
    for x in [region.dev_id, region.addr, region.len, key] {
        b.extend_from_slice(&x.to_le_bytes());
    }
}

fn get_region(r: &mut Reader<'_>) -> std::result::Result<(Desc, u64), DecodeError> {
    let dev = r.u64("dev")?;
    let addr = r.u64("addr")?;
    let len = r.u64("len")?;
    Ok((Desc::new(addr, len, dev), r.u64("key")?))
}

impl Frame {
    /// Encodes with the length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        match self {
            Frame::Grant {
                id,
                region,
                key,
                chunk,
            } => {
                b.push(T_GRANT);
                b.extend_from_slice(&id.to_le_bytes());
                put_region(&mut b, region, *key);
                b.extend_from_slice(&chunk.to_le_bytes());
            }
            Frame::Granted { id, alloc_size } => {
                b.push(T_GRANTED);
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&alloc_size.to_le_bytes());
            }
            Frame::Refused { id, reason } => {
                b.push(T_REFUSED);
                b.extend_from_slice(&id.to_le_bytes());
                let r = truncate(reason, 4000);
                b.extend_from_slice(&(r.len() as u16).to_le_bytes());
                b.extend_from_slice(r.as_bytes());
            }
            Frame::Notif { id, from, msg } => {
                b.push(T_NOTIF);
                b.extend_from_slice(&id.to_le_bytes());
                let f = truncate(from, 256);
                b.extend_from_slice(&(f.len() as u16).to_le_bytes());
                b.extend_from_slice(f.as_bytes());
                b.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                b.extend_from_slice(msg);
            }
            Frame::Ack { id } => {
                b.push(T_ACK);
                b.extend_from_slice(&id.to_le_bytes());
            }
            Frame::Opened { id, region, key } => {
                b.push(T_OPENED);
                b.extend_from_slice(&id.to_le_bytes());
                put_region(&mut b, region, *key);
            }
            Frame::Revoke { region, key } => {
                b.push(T_REVOKE);
                put_region(&mut b, region, *key);
            }
            Frame::Revoked { region, key } => {
                b.push(T_REVOKED);
                put_region(&mut b, region, *key);
            }
        }
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_le_bytes());
        b
    }

    /// Decodes a body (without the length prefix).
    pub fn decode(body: &[u8]) -> std::result::Result<Frame, DecodeError> {
        let mut r = Reader::new(body);
        let f = match r.u8("frame type")? {
            T_GRANT => {
                let id = r.u64("id")?;
                let (region, key) = get_region(&mut r)?;
                Frame::Grant {
                    id,
                    region,
                    key,
                    chunk: r.u32("chunk")?,
                }
            }
            T_GRANTED => Frame::Granted {
                id: r.u64("id")?,
                alloc_size: r.u64("alloc size")?,
            },
            T_REFUSED => Frame::Refused {
                id: r.u64("id")?,
                reason: r.str("reason", 4000)?,
            },
            T_NOTIF => {
                let id = r.u64("id")?;
                let from = r.str("from", 256)?;
                let msg = r.blob("notification")?;
                if msg.len() > MAX_NOTIF {
                    return Err(DecodeError::TooLarge {
                        field: "notification",
                        got: msg.len(),
                        limit: MAX_NOTIF,
                    });
                }
                Frame::Notif {
                    id,
                    from,
                    msg: msg.to_vec(),
                }
            }
            T_ACK => Frame::Ack { id: r.u64("id")? },
            T_OPENED => {
                let id = r.u64("id")?;
                let (region, key) = get_region(&mut r)?;
                Frame::Opened { id, region, key }
            }
            T_REVOKE => {
                let (region, key) = get_region(&mut r)?;
                Frame::Revoke { region, key }
            }
            T_REVOKED => {
                let (region, key) = get_region(&mut r)?;
                Frame::Revoked { region, key }
            }
            t => {
                return Err(DecodeError::Invalid {
                    field: "frame type",
                    reason: format!("unknown type {t}"),
                })
            }
        };
        if !r.is_empty() {
            return Err(DecodeError::Invalid {
                field: "frame",
                reason: "trailing bytes".into(),
            });
        }
        Ok(f)
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) use crate::unix::{boot_id, peer_cred, uid};
use crate::unix::{recv_with_fds, send_with_fd};

/// Reads one frame body (and any fds that came with it). `Ok(None)` on a clean EOF.
fn read_frame(s: &UnixStream, fds: &mut Vec<OwnedFd>) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = recv_with_fds(s, &mut head[got..], fds)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "frame cut short",
                ))
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(head) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (limit {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = recv_with_fds(s, &mut body[got..], fds)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "frame cut short",
            ));
        }
        got += n;
    }
    Ok(Some(body))
}

/// Writes one whole frame; a failed or timed-out write leaves the stream mid-frame, so the
/// connection is shut down (its reader sees the end and cleans up).
fn write_frame(w: &Mutex<UnixStream>, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let s = w.lock();
    let r = match fd {
        Some(fd) => send_with_fd(&s, bytes, fd),
        None => (&*s).write_all(bytes),
    };
    if r.is_err() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    r
}
