//! The `shm` backend's frames on its Unix socket: `len u32 | type u8 | payload`, little-endian,
//! at most [`MAX_FRAME`] bytes. A frame that does not decode drops its connection, nothing else.

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

pub(crate) use crate::frame::Status;
use crate::frame::{begin, end, finish, put_blob, put_u32, put_u64};

/// Cuts the socket's byte stream into frame bodies of at most `MAX_FRAME` bytes.
pub type Framer = crate::frame::Framer<MAX_FRAME>;

/// Largest frame accepted (a 64 MiB frame carries ~2M descriptors).
pub(crate) const MAX_FRAME: usize = 64 << 20;
/// Bytes per segment in an Op frame.
pub(crate) const SEG_BYTES: usize = 32;
/// Longest text in a reply.
const MAX_TEXT: usize = 4096;

/// One descriptor pair of an Op: initiator address, target address, length, target region key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireSeg {
    pub init: u64,
    pub target: u64,
    pub len: u64,
    pub key: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of a connection, from the initiator.
    Hello {
        name: String,
        instance: u128,
        pid: u32,
    },
    /// A transfer to carry out: `write` = initiator to target.
    Op {
        id: u64,
        write: bool,
        notif: Option<Vec<u8>>,
        segs: Vec<WireSeg>,
    },
    /// The end of an Op.
    Done {
        id: u64,
        status: Status,
        text: String,
    },
    /// A standalone notification.
    Notif { msg: Vec<u8> },
    /// Ask for the memfd behind a mappable region (fd arrives with the reply).
    MapReq {
        id: u64,
        addr: u64,
        len: u64,
        key: u64,
    },
    /// Answer to MapReq: the buffer length and the region's offset inside it.
    MapReply {
        id: u64,
        status: Status,
        buf_len: u64,
        offset: u64,
        text: String,
    },
    /// The target deregistered a mapped region: stop using it and acknowledge.
    Revoke { key: u64 },
    /// The mapping is gone.
    RevokeAck { key: u64 },
    /// Ask for a cross-memory grant on a region (the initiator then copies itself).
    GrantReq {
        id: u64,
        addr: u64,
        len: u64,
        key: u64,
    },
    /// Answer to GrantReq: the grant's slot in the connection's grant table and its
    /// generation; the table's memfd arrives with an Ok reply.
    GrantReply {
        id: u64,
        status: Status,
        slot: u32,
        gen: u64,
        text: String,
    },
}

const HELLO: u8 = 1;
const OP: u8 = 2;
const DONE: u8 = 3;
const NOTIF: u8 = 4;
const MAP_REQ: u8 = 5;
const MAP_REPLY: u8 = 6;
const REVOKE: u8 = 7;
const REVOKE_ACK: u8 = 8;
const GRANT_REQ: u8 = 9;
const GRANT_REPLY: u8 = 10;

fn put_str(out: &mut Vec<u8>, s: &str) {
    crate::frame::put_str(out, s, MAX_TEXT);
}

impl Frame {
    /// Appends the encoded frame (with its length prefix) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = begin(out, 0);
        let ty = start + 4;
        match self {
            Frame::Hello {
                name,
                instance,
                pid,
            } => {
                out[ty] = HELLO;
                put_str(out, name);
                out.extend_from_slice(&instance.to_le_bytes());
                put_u32(out, *pid);
            }
            Frame::Op {
                id,
                write,
                notif,
                segs,
            } => {
                out[ty] = OP;
                put_u64(out, *id);
                out.push(u8::from(*write));
                match notif {
                    Some(n) => {
                        out.push(1);
                        put_blob(out, n);
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&(segs.len() as u32).to_le_bytes());
                out.reserve(segs.len() * SEG_BYTES);
                for s in segs {
                    for v in [s.init, s.target, s.len, s.key] {
                        put_u64(out, v);
                    }
                }
            }
            Frame::Done { id, status, text } => {
                out[ty] = DONE;
                put_u64(out, *id);
                out.push(*status as u8);
                put_str(out, text);
            }
            Frame::Notif { msg } => {
                out[ty] = NOTIF;
                put_blob(out, msg);
            }
            Frame::MapReq { id, addr, len, key } => {
                out[ty] = MAP_REQ;
                for v in [*id, *addr, *len, *key] {
                    put_u64(out, v);
                }
            }
            Frame::MapReply {
                id,
                status,
                buf_len,
                offset,
                text,
            } => {
                out[ty] = MAP_REPLY;
                put_u64(out, *id);
                out.push(*status as u8);
                put_u64(out, *buf_len);
                put_u64(out, *offset);
                put_str(out, text);
            }
            Frame::Revoke { key } => {
                out[ty] = REVOKE;
                put_u64(out, *key);
            }
            Frame::RevokeAck { key } => {
                out[ty] = REVOKE_ACK;
                put_u64(out, *key);
            }
            Frame::GrantReq { id, addr, len, key } => {
                out[ty] = GRANT_REQ;
                for v in [*id, *addr, *len, *key] {
                    put_u64(out, v);
                }
            }
            Frame::GrantReply {
                id,
                status,
                slot,
                gen,
                text,
            } => {
                out[ty] = GRANT_REPLY;
                put_u64(out, *id);
                out.push(*status as u8);
                put_u32(out, *slot);
                put_u64(out, *gen);
                put_str(out, text);
            }
        }
        finish(out, start);
    }

    /// Encodes to a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decodes one frame body (type and payload, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame, DecodeError> {
        let mut r = Reader::new(body);
        let kind = r.u8("frame type")?;
        let status = Status::from_code;
        let f = match kind {
            HELLO => Frame::Hello {
                name: r.str("name", 255)?,
                instance: u128::from_le_bytes(r.array("instance")?),
                pid: r.u32("pid")?,
            },
            OP => {
                let id = r.u64("op id")?;
                let write = match r.u8("direction")? {
                    0 => false,
                    1 => true,
                    d => {
                        return Err(DecodeError::Invalid {
                            field: "direction",
                            reason: format!("{d}"),
                        })
                    }
                };
                let notif = match r.u8("notif flag")? {
                    0 => None,
                    _ => Some(r.blob_max("notif", nixl_core::MAX_NOTIF_BYTES)?.to_vec()),
                };
                let n = r.peek_u32()? as usize;
                let n = r.count("segment count", n, 4, MAX_FRAME / SEG_BYTES, SEG_BYTES)?;
                let mut segs = Vec::with_capacity(n);
                for _ in 0..n {
                    segs.push(WireSeg {
                        init: r.u64("seg init")?,
                        target: r.u64("seg target")?,
                        len: r.u64("seg len")?,
                        key: r.u64("seg key")?,
                    });
                }
                Frame::Op {
                    id,
                    write,
                    notif,
                    segs,
                }
            }
            DONE => Frame::Done {
                id: r.u64("op id")?,
                status: status(r.u8("status")?)?,
                text: r.str("text", MAX_TEXT)?,
            },
            NOTIF => Frame::Notif {
                msg: r.blob_max("notif", nixl_core::MAX_NOTIF_BYTES)?.to_vec(),
            },
            MAP_REQ => Frame::MapReq {
                id: r.u64("id")?,
                addr: r.u64("addr")?,
                len: r.u64("len")?,
                key: r.u64("key")?,
            },
            MAP_REPLY => Frame::MapReply {
                id: r.u64("id")?,
                status: status(r.u8("status")?)?,
                buf_len: r.u64("buffer length")?,
                offset: r.u64("offset")?,
                text: r.str("text", MAX_TEXT)?,
            },
            REVOKE => Frame::Revoke { key: r.u64("key")? },
            REVOKE_ACK => Frame::RevokeAck { key: r.u64("key")? },
            GRANT_REQ => Frame::GrantReq {
                id: r.u64("id")?,
                addr: r.u64("addr")?,
                len: r.u64("len")?,
                key: r.u64("key")?,
            },
            GRANT_REPLY => Frame::GrantReply {
                id: r.u64("id")?,
                status: status(r.u8("status")?)?,
                slot: r.u32("slot")?,
                gen: r.u64("generation")?,
                text: r.str("text", MAX_TEXT)?,
            },
            k => {
                return Err(DecodeError::Invalid {
                    field: "frame type",
                    reason: format!("unknown type {k}"),
                })
            }
        };
        end(&r)?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello {
                name: "a".into(),
                instance: 7,
                pid: 9,
            },
            Frame::Op {
                id: 1,
                write: true,
                notif: Some(b"n".to_vec()),
                segs: vec![WireSeg {
                    init: 1,
                    target: 2,
                    len: 3,
                    key: 4,
                }],
            },
            Frame::Op {
                id: 2,
                write: false,
                notif: None,
                segs: vec![],
            },
            Frame::Done {
                id: 1,
                status: Status::Denied,
                text: "no".into(),
            },
            Frame::Notif { msg: vec![1, 2] },
            Frame::MapReq {
                id: 1,
                addr: 2,
                len: 3,
                key: 4,
            },
            Frame::MapReply {
                id: 1,
                status: Status::Ok,
                buf_len: 10,
                offset: 2,
                text: String::new(),
            },
            Frame::Revoke { key: 5 },
            Frame::RevokeAck { key: 5 },
            Frame::GrantReq {
                id: 3,
                addr: 0x1000,
                len: 4096,
                key: 77,
            },
            Frame::GrantReply {
                id: 3,
                status: Status::Ok,
                slot: 9,
                gen: 12,
                text: String::new(),
            },
        ]
    }

    #[test]
    fn frames_round_trip_through_the_framer_byte_by_byte() {
        let mut stream = Vec::new();
        for f in all() {
            f.encode_into(&mut stream);
        }
        let mut framer = Framer::default();
        let mut got = Vec::new();
        for b in stream {
            framer.spare(1)[0] = b;
            framer.commit(1, 1);
            while let Some(body) = framer.next_frame().unwrap() {
                got.push(Frame::decode(&body).unwrap());
            }
        }
        assert_eq!(got, all());
    }

    #[test]
    fn garbage_is_an_error() {
        for f in all() {
            let bytes = f.encode();
            let body = &bytes[4..];
            for n in 0..body.len() {
                assert!(Frame::decode(&body[..n]).is_err(), "{f:?} prefix {n}");
            }
            let mut extra = body.to_vec();
            extra.push(0);
            assert!(Frame::decode(&extra).is_err());
        }
        assert!(Frame::decode(&[99]).is_err());
        // A huge segment count is refused before allocating.
        let mut op = vec![OP];
        op.extend_from_slice(&1u64.to_le_bytes());
        op.extend_from_slice(&[1, 0]);
        op.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::decode(&op).is_err());
        // A huge length prefix is refused by the framer.
        let mut framer = Framer::default();
        framer.spare(4).copy_from_slice(&u32::MAX.to_le_bytes());
        framer.commit(4, 4);
        assert!(framer.next_frame().is_err());
    }
}
