//! What the `shm` backend puts on the wire, all little-endian and decoded without trusting it:
//! its connection info (in agent metadata), its per-region public data (in agent metadata), and
//! the frames on its Unix socket.
//!
//! ```text
//! conn info  := version u8 (1) | boot_id str | pid_ns u64 | pid u32 | uid u32 | path str
//! public     := 0 (cross-memory attach only) | 1 | buffer id u64 | buffer start u64 (mappable)
//! frame      := len u32 (of type + payload, 1..=MAX_FRAME) | type u8 | payload
//!   HELLO      version u16 | name str | instance u128 | pid u32        initiator -> target
//!   WELCOME    version u16                                            target -> initiator
//!   REFUSED    text str                                               target -> initiator
//!   OP         id u64 | dir u8 | pid u32 | notif opt | count u32 | { init u64 | target u64
//!              | len u64 | key u64 }*                                 initiator -> target
//!   DONE       id u64 | status u8 | text str                          target -> initiator
//!   NOTIF      msg blob                                               initiator -> target
//!   MAP_REQ    id u64 | addr u64 | len u64 | key u64                  initiator -> target
//!   MAP_REPLY  id u64 | status u8 | buf_len u64 | offset u64 | page u64 | text str
//!              (+ the memfd by SCM_RIGHTS when status is OK)          target -> initiator
//!   REVOKE     key u64                                                target -> initiator
//!   REVOKE_ACK key u64                                                initiator -> target
//! str := len u16 | utf-8     blob := len u32 | bytes     opt := 0 | 1 blob
//! ```
//!
//! Every length and count is checked against a limit and against the bytes present before
//! anything is allocated; trailing bytes and unknown codes are errors. A frame that does not
//! decode ends its connection and nothing else.

use std::ops::Range;

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

/// Protocol version spoken in HELLO/WELCOME.
pub const PROTOCOL: u16 = 1;
/// Largest frame accepted (an OP frame of 64 MiB carries about two million descriptors).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest notification carried.
pub const MAX_NOTIF: usize = 16 << 20;
/// Bytes per descriptor pair in an OP frame.
pub const SEG_BYTES: usize = 32;
/// Offset of the op id in an encoded OP frame (after length and type).
pub const OP_ID_AT: usize = 5;
/// Longest text in a reply (longer texts are cut).
const MAX_TEXT: usize = 4096;
/// Longest agent name.
const MAX_NAME: usize = 255;
/// Longest boot id and socket path in connection info.
const MAX_BOOT_ID: usize = 64;
const MAX_PATH: usize = 4096;
const CONN_INFO_VERSION: u8 = 1;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn str_ref<'a>(
    r: &mut Reader<'a>,
    field: &'static str,
    limit: usize,
) -> Result<&'a str, DecodeError> {
    let len = usize::from(r.u16(field)?);
    if len > limit {
        return Err(DecodeError::TooLarge {
            field,
            got: len,
            limit,
        });
    }
    std::str::from_utf8(r.take(len, field)?).map_err(|e| DecodeError::Invalid {
        field,
        reason: e.to_string(),
    })
}

fn blob_ref<'a>(
    r: &mut Reader<'a>,
    field: &'static str,
    limit: usize,
) -> Result<&'a [u8], DecodeError> {
    let len = r.u32(field)? as usize;
    if len > limit {
        return Err(DecodeError::TooLarge {
            field,
            got: len,
            limit,
        });
    }
    r.take(len, field)
}

// ---------------------------------------------------------------------------------------------
// Connection info.

/// What an agent's `shm` backend publishes: enough to tell whether a peer shares our node, pid
/// namespace and uid, and where its socket is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// Inode of the pid namespace.
    pub pid_ns: u64,
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Socket path.
    pub path: String,
}

impl ConnInfo {
    /// Encodes (fields over their limits are cut, and then refused by the peer's decoder).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.boot_id.len() + self.path.len());
        v.push(CONN_INFO_VERSION);
        put_str(&mut v, &self.boot_id);
        v.extend_from_slice(&self.pid_ns.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.uid.to_le_bytes());
        put_str(&mut v, &self.path);
        v
    }

    /// Decodes a peer's bytes.
    pub fn decode(b: &[u8]) -> Result<ConnInfo, DecodeError> {
        let mut r = Reader::new(b);
        let version = r.u8("shm conn info version")?;
        if version != CONN_INFO_VERSION {
            return Err(DecodeError::Invalid {
                field: "shm conn info version",
                reason: format!("{version} (this build reads {CONN_INFO_VERSION})"),
            });
        }
        let boot_id = str_ref(&mut r, "boot id", MAX_BOOT_ID)?.to_owned();
        let pid_ns = r.u64("pid namespace")?;
        let pid = r.u32("pid")?;
        let uid = r.u32("uid")?;
        let path = str_ref(&mut r, "socket path", MAX_PATH)?.to_owned();
        if !r.is_empty() {
            return Err(DecodeError::Trailing(r.buf.len()));
        }
        if path.is_empty() {
            return Err(DecodeError::Invalid {
                field: "socket path",
                reason: "empty (the peer's backend did not start)".into(),
            });
        }
        Ok(ConnInfo {
            boot_id,
            pid_ns,
            pid,
            uid,
            path,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Per-region public data.

const NOT_MAPPABLE: u8 = 0;
const MAPPABLE: u8 = 1;

/// A mappable region's buffer, as published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mappable {
    /// The buffer's process-unique id.
    pub id: u64,
    /// The buffer's start address in its owner.
    pub start: u64,
}

/// Public data of a region: mappable (with its buffer) or not.
pub fn encode_public(m: Option<Mappable>) -> Vec<u8> {
    match m {
        None => vec![NOT_MAPPABLE],
        Some(m) => {
            let mut v = Vec::with_capacity(17);
            v.push(MAPPABLE);
            v.extend_from_slice(&m.id.to_le_bytes());
            v.extend_from_slice(&m.start.to_le_bytes());
            v
        }
    }
}

/// The buffer of a mappable region; `None` for anything else (including garbage).
pub fn decode_public(p: &[u8]) -> Option<Mappable> {
    let mut r = Reader::new(p);
    if r.u8("flag").ok()? != MAPPABLE {
        return None;
    }
    let m = Mappable {
        id: r.u64("buffer id").ok()?,
        start: r.u64("buffer start").ok()?,
    };
    r.is_empty().then_some(m)
}

// ---------------------------------------------------------------------------------------------
// Frames.

/// Outcome carried by DONE and MAP_REPLY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Carried out.
    Ok = 0,
    /// Refused by the owner's access check.
    Denied = 1,
    /// Failed otherwise.
    Failed = 2,
}

impl Status {
    fn from_code(c: u8) -> Result<Status, DecodeError> {
        match c {
            0 => Ok(Status::Ok),
            1 => Ok(Status::Denied),
            2 => Ok(Status::Failed),
            c => Err(DecodeError::Invalid {
                field: "status",
                reason: format!("unknown code {c}"),
            }),
        }
    }
}

/// One descriptor pair of an OP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireSeg {
    /// Address in the initiator.
    pub init: u64,
    /// Address in the target.
    pub target: u64,
    /// Bytes.
    pub len: u64,
    /// Key of the target region.
    pub key: u64,
}

/// An OP frame, borrowed from the receive buffer (the segments are decoded as they are read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpView<'a> {
    /// Op id, echoed in DONE.
    pub id: u64,
    /// WRITE (initiator to target) or READ.
    pub write: bool,
    /// The initiator's pid, as it claims.
    pub pid: u32,
    /// Notification to deliver after the data has landed.
    pub notif: Option<&'a [u8]>,
    segs: &'a [u8],
}

impl<'a> OpView<'a> {
    /// Number of segments.
    pub fn len(&self) -> usize {
        self.segs.len() / SEG_BYTES
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// The segments.
    pub fn segs(&self) -> impl ExactSizeIterator<Item = WireSeg> + 'a {
        self.segs.chunks_exact(SEG_BYTES).map(|c| {
            let w = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&c[i * 8..i * 8 + 8]);
                u64::from_le_bytes(a)
            };
            WireSeg {
                init: w(0),
                target: w(1),
                len: w(2),
                key: w(3),
            }
        })
    }
}

/// A frame, borrowed from the bytes it was decoded from.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// First frame of a connection, from the initiator.
    Hello {
        /// Protocol version.
        version: u16,
        /// The initiator's agent name.
        name: &'a str,
        /// Its instance id.
        instance: u128,
        /// Its pid (must match the socket's credentials).
        pid: u32,
    },
    /// The target accepted the connection.
    Welcome {
        /// Protocol version.
        version: u16,
    },
    /// The target refused the connection (it closes it next).
    Refused {
        /// Why.
        text: &'a str,
    },
    /// A transfer for the target to check and carry out.
    Op(OpView<'a>),
    /// The end of an OP.
    Done {
        /// Op id.
        id: u64,
        /// Outcome.
        status: Status,
        /// Reason when not OK.
        text: &'a str,
    },
    /// A standalone notification (or one that follows a mapped copy).
    Notif {
        /// The bytes.
        msg: &'a [u8],
    },
    /// Asks for the memfd behind a mappable region.
    MapReq {
        /// Request id, echoed in MAP_REPLY.
        id: u64,
        /// Region start.
        addr: u64,
        /// Region length.
        len: u64,
        /// Region key.
        key: u64,
    },
    /// Answer to MAP_REQ.
    MapReply {
        /// Request id.
        id: u64,
        /// Outcome.
        status: Status,
        /// Size of the buffer.
        buf_len: u64,
        /// Offset of the region in the buffer.
        offset: u64,
        /// Page size of the buffer (mapping granularity).
        page: u64,
        /// Reason when not OK.
        text: &'a str,
    },
    /// The target deregistered a mapped region: stop using the mapping, then acknowledge.
    Revoke {
        /// The region's key.
        key: u64,
    },
    /// The mapping of a revoked region is gone.
    RevokeAck {
        /// The region's key.
        key: u64,
    },
}

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSED: u8 = 3;
const OP: u8 = 4;
const DONE: u8 = 5;
const NOTIF: u8 = 6;
const MAP_REQ: u8 = 7;
const MAP_REPLY: u8 = 8;
const REVOKE: u8 = 9;
const REVOKE_ACK: u8 = 10;

/// Starts a frame in `out`; returns where its length goes (patched by [`end_frame`]).
fn begin_frame(out: &mut Vec<u8>, kind: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    at
}

fn end_frame(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encodes an OP frame with id 0 (patched per post at [`OP_ID_AT`]).
pub fn encode_op(
    write: bool,
    pid: u32,
    notif: Option<&[u8]>,
    segs: impl ExactSizeIterator<Item = WireSeg>,
) -> Vec<u8> {
    let n = segs.len();
    let mut out = Vec::with_capacity(32 + notif.map_or(0, <[u8]>::len) + n * SEG_BYTES);
    let at = begin_frame(&mut out, OP);
    out.extend_from_slice(&0u64.to_le_bytes());
    out.push(u8::from(write));
    out.extend_from_slice(&pid.to_le_bytes());
    match notif {
        Some(m) => {
            out.push(1);
            put_blob(&mut out, m);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for s in segs {
        for v in [s.init, s.target, s.len, s.key] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    end_frame(&mut out, at);
    out
}

impl Frame<'_> {
    /// Appends the encoded frame, length prefix included, to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                version,
                name,
                instance,
                pid,
            } => {
                let at = begin_frame(out, HELLO);
                out.extend_from_slice(&version.to_le_bytes());
                put_str(out, name);
                out.extend_from_slice(&instance.to_le_bytes());
                out.extend_from_slice(&pid.to_le_bytes());
                end_frame(out, at);
            }
            Frame::Welcome { version } => {
                let at = begin_frame(out, WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
                end_frame(out, at);
            }
            Frame::Refused { text } => {
                let at = begin_frame(out, REFUSED);
                put_str(out, text);
                end_frame(out, at);
            }
            Frame::Op(op) => {
                let start = out.len();
                out.extend_from_slice(&encode_op(op.write, op.pid, op.notif, op.segs()));
                let at = start + OP_ID_AT;
                out[at..at + 8].copy_from_slice(&op.id.to_le_bytes());
            }
            Frame::Done { id, status, text } => {
                let at = begin_frame(out, DONE);
                out.extend_from_slice(&id.to_le_bytes());
                out.push(*status as u8);
                put_str(out, text);
                end_frame(out, at);
            }
            Frame::Notif { msg } => {
                let at = begin_frame(out, NOTIF);
                put_blob(out, msg);
                end_frame(out, at);
            }
            Frame::MapReq { id, addr, len, key } => {
                let at = begin_frame(out, MAP_REQ);
                for v in [*id, *addr, *len, *key] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                end_frame(out, at);
            }
            Frame::MapReply {
                id,
                status,
                buf_len,
                offset,
                page,
                text,
            } => {
                let at = begin_frame(out, MAP_REPLY);
                out.extend_from_slice(&id.to_le_bytes());
                out.push(*status as u8);
                for v in [*buf_len, *offset, *page] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                put_str(out, text);
                end_frame(out, at);
            }
            Frame::Revoke { key } => {
                let at = begin_frame(out, REVOKE);
                out.extend_from_slice(&key.to_le_bytes());
                end_frame(out, at);
            }
            Frame::RevokeAck { key } => {
                let at = begin_frame(out, REVOKE_ACK);
                out.extend_from_slice(&key.to_le_bytes());
                end_frame(out, at);
            }
        }
    }

    /// Encodes to a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }
}

/// Decodes one frame body (type and payload, without the length prefix).
pub fn decode(body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut r = Reader::new(body);
    let kind = r.u8("frame type")?;
    let f = match kind {
        HELLO => Frame::Hello {
            version: r.u16("version")?,
            name: str_ref(&mut r, "name", MAX_NAME)?,
            instance: u128::from_le_bytes(r.array("instance")?),
            pid: r.u32("pid")?,
        },
        WELCOME => Frame::Welcome {
            version: r.u16("version")?,
        },
        REFUSED => Frame::Refused {
            text: str_ref(&mut r, "text", MAX_TEXT)?,
        },
        OP => {
            let id = r.u64("op id")?;
            let write = match r.u8("direction")? {
                0 => false,
                1 => true,
                d => {
                    return Err(DecodeError::Invalid {
                        field: "direction",
                        reason: format!("unknown code {d}"),
                    })
                }
            };
            let pid = r.u32("pid")?;
            let notif = match r.u8("notification flag")? {
                0 => None,
                1 => Some(blob_ref(&mut r, "notification", MAX_NOTIF)?),
                f => {
                    return Err(DecodeError::Invalid {
                        field: "notification flag",
                        reason: format!("unknown code {f}"),
                    })
                }
            };
            let n = r.peek_u32()? as usize;
            let n = r.count("segment count", n, 4, MAX_FRAME / SEG_BYTES, SEG_BYTES)?;
            let segs = r.take(n * SEG_BYTES, "segments")?;
            Frame::Op(OpView {
                id,
                write,
                pid,
                notif,
                segs,
            })
        }
        DONE => Frame::Done {
            id: r.u64("op id")?,
            status: Status::from_code(r.u8("status")?)?,
            text: str_ref(&mut r, "text", MAX_TEXT)?,
        },
        NOTIF => Frame::Notif {
            msg: blob_ref(&mut r, "notification", MAX_NOTIF)?,
        },
        MAP_REQ => Frame::MapReq {
            id: r.u64("id")?,
            addr: r.u64("addr")?,
            len: r.u64("len")?,
            key: r.u64("key")?,
        },
        MAP_REPLY => Frame::MapReply {
            id: r.u64("id")?,
            status: Status::from_code(r.u8("status")?)?,
            buf_len: r.u64("buffer length")?,
            offset: r.u64("offset")?,
            page: r.u64("page size")?,
            text: str_ref(&mut r, "text", MAX_TEXT)?,
        },
        REVOKE => Frame::Revoke { key: r.u64("key")? },
        REVOKE_ACK => Frame::RevokeAck { key: r.u64("key")? },
        k => {
            return Err(DecodeError::Invalid {
                field: "frame type",
                reason: format!("unknown type {k}"),
            })
        }
    };
    if !r.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len()));
    }
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Framing.

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 64 << 10;
/// An idle receive buffer larger than this is given back.
const KEEP_MAX: usize = 1 << 20;

/// Accumulates stream bytes and cuts them into frames, reusing one buffer.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Framer {
    /// Room to read into: the rest of the current frame if its length is known, else a chunk.
    /// Call [`Framer::filled`] with the bytes read into it.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_MAX {
                self.buf = Vec::new();
            }
        }
        let pending = self.end - self.start;
        let want = match self.header() {
            Some(len) if len <= MAX_FRAME => (4 + len).max(pending + READ_CHUNK),
            _ => pending + READ_CHUNK,
        };
        if self.start + want > self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
        }
        if self.buf.len() < self.start + want {
            self.buf.resize(self.start + want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records `n` bytes read into the slice [`Framer::spare`] returned.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    fn header(&self) -> Option<usize> {
        let avail = &self.buf[self.start..self.end];
        (avail.len() >= 4).then(|| u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize)
    }

    /// The next whole frame's body (as a range of [`Framer::bytes`]), consumed; `None` until one
    /// is buffered; an error if its length prefix is zero or over [`MAX_FRAME`].
    pub fn next_frame(&mut self) -> Result<Option<Range<usize>>, DecodeError> {
        let Some(len) = self.header() else {
            return Ok(None);
        };
        if len == 0 || len > MAX_FRAME {
            return Err(DecodeError::TooLarge {
                field: "frame length",
                got: len,
                limit: MAX_FRAME,
            });
        }
        if self.end - self.start < 4 + len {
            return Ok(None);
        }
        let body = self.start + 4..self.start + 4 + len;
        self.start += 4 + len;
        Ok(Some(body))
    }

    /// The buffer that ranges from [`Framer::next_frame`] index (valid until the next `spare`).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_segs() -> Vec<WireSeg> {
        (0..3)
            .map(|i| WireSeg {
                init: 100 + i,
                target: 200 + i,
                len: 3 + i,
                key: 9,
            })
            .collect()
    }

    fn all_frames(segs: &[u8]) -> Vec<Frame<'_>> {
        vec![
            Frame::Hello {
                version: PROTOCOL,
                name: "a",
                instance: 7,
                pid: 9,
            },
            Frame::Welcome { version: PROTOCOL },
            Frame::Refused { text: "no" },
            Frame::Op(OpView {
                id: 1,
                write: true,
                pid: 44,
                notif: Some(b"n"),
                segs,
            }),
            Frame::Op(OpView {
                id: 2,
                write: false,
                pid: 44,
                notif: None,
                segs: &[],
            }),
            Frame::Done {
                id: 1,
                status: Status::Denied,
                text: "no",
            },
            Frame::Notif { msg: &[1, 2] },
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
                page: 4096,
                text: "",
            },
            Frame::Revoke { key: 5 },
            Frame::RevokeAck { key: 5 },
        ]
    }

    fn seg_bytes() -> Vec<u8> {
        let op = encode_op(true, 1, None, sample_segs().into_iter());
        op[op.len() - 3 * SEG_BYTES..].to_vec()
    }

    #[test]
    fn op_encoding_and_view_agree() {
        let segs = sample_segs();
        let mut op = encode_op(true, 1234, Some(b"hi"), segs.clone().into_iter());
        op[OP_ID_AT..OP_ID_AT + 8].copy_from_slice(&77u64.to_le_bytes());
        let len = u32::from_le_bytes(op[..4].try_into().unwrap()) as usize;
        assert_eq!(len, op.len() - 4);
        let Frame::Op(v) = decode(&op[4..]).unwrap() else {
            panic!("not an op")
        };
        assert_eq!((v.id, v.write, v.pid, v.notif), (77, true, 1234, Some(&b"hi"[..])));
        assert_eq!(v.len(), 3);
        assert_eq!(v.segs().collect::<Vec<_>>(), segs);
    }

    #[test]
    fn frames_round_trip_through_the_framer_byte_by_byte() {
        let sb = seg_bytes();
        let frames = all_frames(&sb);
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream);
        }
        let mut framer = Framer::default();
        let mut got = Vec::new();
        for b in stream {
            framer.spare()[0] = b;
            framer.filled(1);
            while let Some(r) = framer.next_frame().unwrap() {
                got.push(framer.bytes()[r].to_vec());
            }
        }
        let decoded: Vec<Frame<'_>> = got.iter().map(|b| decode(b).unwrap()).collect();
        assert_eq!(decoded, frames);
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let sb = seg_bytes();
        for f in all_frames(&sb) {
            let bytes = f.encode();
            let body = &bytes[4..];
            for n in 0..body.len() {
                assert!(decode(&body[..n]).is_err(), "{f:?} prefix {n}");
            }
            let mut extra = body.to_vec();
            extra.push(0);
            assert!(decode(&extra).is_err(), "{f:?} with a trailing byte");
        }
        assert!(decode(&[]).is_err());
        assert!(decode(&[99]).is_err());
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_before_allocating() {
        // OP with a huge segment count.
        let mut op = vec![OP];
        op.extend_from_slice(&1u64.to_le_bytes());
        op.push(1);
        op.extend_from_slice(&5u32.to_le_bytes());
        op.push(0);
        op.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&op), Err(DecodeError::TooLarge { .. })));
        // A count that fits the limit but not the bytes present.
        let n = op.len();
        op[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(decode(&op), Err(DecodeError::Truncated { .. })));
        // NOTIF with a huge blob length.
        let mut notif = vec![NOTIF];
        notif.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&notif), Err(DecodeError::TooLarge { .. })));
        // Bad direction, flag, status, UTF-8.
        let sb = seg_bytes();
        let good = Frame::Op(OpView {
            id: 1,
            write: true,
            pid: 1,
            notif: None,
            segs: &sb,
        })
        .encode();
        let mut bad = good[4..].to_vec();
        bad[9] = 7;
        assert!(decode(&bad).is_err(), "direction");
        let mut bad = good[4..].to_vec();
        bad[14] = 7;
        assert!(decode(&bad).is_err(), "notification flag");
        let mut done = Frame::Done {
            id: 1,
            status: Status::Ok,
            text: "ab",
        }
        .encode();
        done[13] = 9;
        assert!(decode(&done[4..]).is_err(), "status");
        done[13] = 0;
        done[16] = 0xff;
        assert!(decode(&done[4..]).is_err(), "utf-8");
    }

    #[test]
    fn framer_refuses_zero_and_huge_lengths_and_handles_big_frames() {
        for len in [0u32, u32::MAX, MAX_FRAME as u32 + 1] {
            let mut framer = Framer::default();
            framer.spare()[..4].copy_from_slice(&len.to_le_bytes());
            framer.filled(4);
            assert!(framer.next_frame().is_err(), "{len}");
        }
        // A frame larger than one read chunk arrives in pieces.
        let msg = vec![7u8; 300_000];
        let bytes = Frame::Notif { msg: &msg }.encode();
        let mut framer = Framer::default();
        let mut fed = 0;
        let mut frames = 0;
        while fed < bytes.len() {
            let spare = framer.spare();
            let n = spare.len().min(bytes.len() - fed).min(50_000);
            spare[..n].copy_from_slice(&bytes[fed..fed + n]);
            framer.filled(n);
            fed += n;
            while let Some(r) = framer.next_frame().unwrap() {
                assert_eq!(decode(&framer.bytes()[r]).unwrap(), Frame::Notif { msg: &msg });
                frames += 1;
            }
        }
        assert_eq!(frames, 1);
    }

    #[test]
    fn conn_info_round_trips_and_garbage_is_refused() {
        let i = ConnInfo {
            boot_id: "1234-abcd".into(),
            pid_ns: 4026531836,
            pid: 77,
            uid: 1000,
            path: "/tmp/nixl/a-00.sock".into(),
        };
        let b = i.encode();
        assert_eq!(ConnInfo::decode(&b).unwrap(), i);
        for n in 0..b.len() {
            assert!(ConnInfo::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(ConnInfo::decode(&long).is_err());
        assert!(ConnInfo::decode(&[0xff; 64]).is_err());
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(ConnInfo::decode(&v2).is_err(), "unknown version");
        let mut huge = vec![CONN_INFO_VERSION];
        huge.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            ConnInfo::decode(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        let empty_path = ConnInfo {
            path: String::new(),
            ..i
        };
        assert!(ConnInfo::decode(&empty_path.encode()).is_err());
    }

    #[test]
    fn public_data_round_trips_and_garbage_is_not_mappable() {
        let m = Mappable { id: 3, start: 0x1000 };
        assert_eq!(decode_public(&encode_public(Some(m))), Some(m));
        assert_eq!(decode_public(&encode_public(None)), None);
        let b = encode_public(Some(m));
        for n in 0..b.len() {
            assert_eq!(decode_public(&b[..n]), None);
        }
        let mut long = b.clone();
        long.push(1);
        assert_eq!(decode_public(&long), None);
    }
}
