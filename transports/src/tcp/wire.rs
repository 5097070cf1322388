//! The `tcp` backend's frames: `len u32 | type u8 | body`, little-endian, at most
//! [`MAX_FRAME`] bytes. Data follows its frame raw (WRITE from the initiator, DATA from the
//! target), at most [`MAX_CHUNK`] bytes. A frame that does not decode drops its connection.
//!
//! Versions: the handshake's hello carries the protocol version (a mismatch is refused) and
//! feature flags. SPAN_WRITE and SPAN_READ (a request of many spans in one region, 12 bytes a
//! span) are a feature: a listener that takes them says so in its hello, and an initiator sends
//! them only to such a listener; to others it sends the same chunks as WRITE and READ frames.

use std::io;

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

use super::net::Span;

pub(crate) use crate::frame::{put_blob, put_u32, put_u64, Status};

/// Largest frame accepted.
pub const MAX_FRAME: usize = 1 << 20;
/// Most descriptors in one WRITE or READ frame (bounded so a frame fits in one writev).
pub const MAX_PIECES: usize = 1000;
/// Largest data payload after one frame.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Bytes per piece on the wire.
pub(crate) const PIECE_BYTES: usize = 24;
/// Longest text in a reply.
pub(crate) const MAX_TEXT: usize = 1024;
/// Largest notification: the one limit of every backend ([`nixl_core::MAX_NOTIF_BYTES`]),
/// refused at the sender and accepted by the receiver.
pub const MAX_NOTIF: usize = nixl_core::MAX_NOTIF_BYTES;
/// Longest agent name.
const MAX_NAME: usize = 1024;
/// Most spans in one SPAN_WRITE or SPAN_READ frame.
pub const MAX_SPANS: usize = 16384;
/// Bytes per span on the wire: address u64, length u32.
pub(crate) const SPAN_BYTES: usize = 12;

/// One target range of a WRITE or READ: address, length, region key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub addr: u64,
    pub len: u64,
    pub key: u64,
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// Transfers and notifications.
    Data = 0,
    /// Fetching or pushing metadata.
    Metadata = 1,
    /// Other backends' control requests ([`crate::control`]).
    Control = 2,
}

pub(crate) const OPEN: u8 = 1;
pub(crate) const WRITE: u8 = 2;
pub(crate) const READ: u8 = 3;
pub(crate) const NOTIF: u8 = 4;
pub(crate) const MD_GET: u8 = 5;
pub(crate) const MD_PUSH: u8 = 6;
pub(crate) const CTRL: u8 = 7;
/// MD_DROP: the caller asks the listener to forget the caller's own metadata (answered with MD).
pub(crate) const MD_DROP: u8 = 8;
/// SPAN_WRITE: a WRITE of many spans of one region, `id u64 | chunk u32 | key u64 | count u32 |
/// count × (addr u64 | len u32)`; the spans' bytes follow raw, in order; answered by ACK.
pub(crate) const SPAN_WRITE: u8 = 9;
/// SPAN_READ: a READ of many spans of one region (body as SPAN_WRITE); answered by one DATA
/// with the spans' bytes in order.
pub const SPAN_READ: u8 = 10;
pub(crate) const OPENED: u8 = 16;
pub const ACK: u8 = 17;
pub const DATA: u8 = 18;
pub(crate) const MD: u8 = 19;
pub(crate) const CTRL_RE: u8 = 20;

/// Starts a frame in `out` (cleared): length placeholder and type.
pub(crate) fn begin(out: &mut Vec<u8>, ty: u8) {
    out.clear();
    crate::frame::begin(out, ty);
}

/// Patches the length of a frame begun with `begin`.
pub fn finish(out: &mut [u8]) {
    crate::frame::finish(out, 0);
}

/// Appends a text of at most [`MAX_TEXT`] bytes.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    crate::frame::put_str(out, s, MAX_TEXT);
}

/// OPEN: purpose, the initiator's name and instance, the instance it expects (0: any); with a
/// secret the listener takes it only if it names the initiator its handshake proved.
pub fn open(out: &mut Vec<u8>, purpose: Purpose, name: &str, instance: u128, expect: u128) {
    begin(out, OPEN);
    out.push(purpose as u8);
    put_str(out, name);
    out.extend_from_slice(&instance.to_le_bytes());
    out.extend_from_slice(&expect.to_le_bytes());
    finish(out);
}

/// A decoded OPEN.
#[derive(Debug, PartialEq, Eq)]
pub struct Open {
    pub purpose: Purpose,
    pub name: String,
    pub instance: u128,
    pub expect: u128,
}

pub fn decode_open(body: &[u8]) -> Result<Open, DecodeError> {
    let mut r = Reader::new(body);
    let purpose = match r.u8("purpose")? {
        0 => Purpose::Data,
        1 => Purpose::Metadata,
        2 => Purpose::Control,
        p => {
            return Err(DecodeError::Invalid {
                field: "purpose",
                reason: format!("unknown {p}"),
            })
        }
    };
    let name = r.str("name", MAX_NAME)?;
    let instance = u128::from_le_bytes(r.array("instance")?);
    let expect = u128::from_le_bytes(r.array("expected instance")?);
    end(&r)?;
    Ok(Open {
        purpose,
        name,
        instance,
        expect,
    })
}

/// OPENED: the target's instance and name, or a refusal.
pub fn opened(out: &mut Vec<u8>, status: Status, instance: u128, text: &str) {
    begin(out, OPENED);
    out.push(status as u8);
    out.extend_from_slice(&instance.to_le_bytes());
    put_str(out, text);
    finish(out);
}

pub fn decode_opened(body: &[u8]) -> Result<(Status, u128, String), DecodeError> {
    let mut r = Reader::new(body);
    let status = Status::from_code(r.u8("status")?)?;
    let instance = u128::from_le_bytes(r.array("instance")?);
    let text = r.str("text", MAX_TEXT)?;
    end(&r)?;
    Ok((status, instance, text))
}

/// The head of a WRITE or READ frame; pieces are appended with [`put_piece`].
pub(crate) fn xfer_head(out: &mut Vec<u8>, ty: u8, id: u64, chunk: u32, pieces: u32) {
    begin(out, ty);
    put_u64(out, id);
    put_u32(out, chunk);
    put_u32(out, pieces);
}

pub(crate) fn put_piece(out: &mut Vec<u8>, p: &Piece) {
    put_u64(out, p.addr);
    put_u64(out, p.len);
    put_u64(out, p.key);
}

/// Decodes a WRITE or READ body into `pieces` (cleared); returns (id, chunk, payload bytes).
pub fn decode_xfer(body: &[u8], pieces: &mut Vec<Piece>) -> Result<(u64, u32, u64), DecodeError> {
    let mut r = Reader::new(body);
    let id = r.u64("id")?;
    let chunk = r.u32("chunk")?;
    let n = r.count("pieces", r.peek_u32()? as usize, 4, MAX_PIECES, PIECE_BYTES)?;
    pieces.clear();
    let mut total = 0u64;
    for _ in 0..n {
        let p = Piece {
            addr: r.u64("addr")?,
            len: r.u64("len")?,
            key: r.u64("key")?,
        };
        total = total.saturating_add(p.len);
        pieces.push(p);
    }
    end(&r)?;
    if total > MAX_CHUNK {
        return Err(DecodeError::TooLarge {
            field: "chunk payload",
            got: usize::try_from(total).unwrap_or(usize::MAX),
            limit: MAX_CHUNK as usize,
        });
    }
    Ok((id, chunk, total))
}

/// The head of a SPAN_WRITE or SPAN_READ frame; spans are appended with [`put_span`] (each at
/// most `u32::MAX` bytes: a chunk is at most [`MAX_CHUNK`]).
pub fn span_head(out: &mut Vec<u8>, ty: u8, id: u64, chunk: u32, key: u64, spans: u32) {
    begin(out, ty);
    put_u64(out, id);
    put_u32(out, chunk);
    put_u64(out, key);
    put_u32(out, spans);
}

/// Appends one span of a SPAN frame.
pub fn put_span(out: &mut Vec<u8>, addr: u64, len: u32) {
    put_u64(out, addr);
    put_u32(out, len);
}

/// A decoded SPAN_WRITE or SPAN_READ head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanXfer {
    pub id: u64,
    pub chunk: u32,
    pub key: u64,
    /// Payload bytes (the spans' lengths added up).
    pub total: u64,
    /// The lowest address and the end of the highest span: every span lies in `lo..hi`, so a
    /// region that holds `lo..hi` holds them all.
    pub lo: u64,
    pub hi: u64,
}

/// Decodes a SPAN_WRITE or SPAN_READ body into `spans` (cleared). Refused: more than
/// [`MAX_SPANS`] spans, or a count the bytes do not hold; an empty span; a span whose end
/// overflows; a payload over [`MAX_CHUNK`]; trailing bytes.
pub fn decode_spans(body: &[u8], spans: &mut Vec<Span>) -> Result<SpanXfer, DecodeError> {
    let mut r = Reader::new(body);
    let id = r.u64("id")?;
    let chunk = r.u32("chunk")?;
    let key = r.u64("key")?;
    let n = r.count("spans", r.peek_u32()? as usize, 4, MAX_SPANS, SPAN_BYTES)?;
    spans.clear();
    spans.reserve(n);
    let (mut lo, mut hi, mut total) = (u64::MAX, 0u64, 0u64);
    for i in 0..n {
        let addr = r.u64("span address")?;
        let len = u64::from(r.u32("span length")?);
        let end =
            addr.checked_add(len)
                .filter(|_| len > 0)
                .ok_or_else(|| DecodeError::Invalid {
                    field: "span",
                    reason: format!("span {i} ({addr:#x}+{len}) is empty or wraps"),
                })?;
        lo = lo.min(addr);
        hi = hi.max(end);
        total += len;
        if total > MAX_CHUNK {
            return Err(DecodeError::TooLarge {
                field: "chunk payload",
                got: usize::try_from(total).unwrap_or(usize::MAX),
                limit: MAX_CHUNK as usize,
            });
        }
        spans.push(Span { addr, len });
    }
    end(&r)?;
    if n == 0 {
        lo = 0;
    }
    Ok(SpanXfer {
        id,
        chunk,
        key,
        total,
        lo,
        hi,
    })
}

/// ACK of a WRITE chunk, a NOTIF or a pushed metadata.
pub(crate) fn ack(out: &mut Vec<u8>, id: u64, chunk: u32, status: Status, text: &str) {
    begin(out, ACK);
    put_u64(out, id);
    put_u32(out, chunk);
    out.push(status as u8);
    put_str(out, text);
    finish(out);
}

/// DATA: the answer to a READ chunk; `len` raw bytes follow when the status is Ok.
pub(crate) fn data(out: &mut Vec<u8>, id: u64, chunk: u32, status: Status, len: u64, text: &str) {
    begin(out, DATA);
    put_u64(out, id);
    put_u32(out, chunk);
    out.push(status as u8);
    put_u64(out, len);
    put_str(out, text);
    finish(out);
}

/// A decoded ACK or DATA.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub id: u64,
    pub chunk: u32,
    pub status: Status,
    /// Raw bytes that follow (DATA only).
    pub len: u64,
    pub text: String,
}

pub fn decode_reply(ty: u8, body: &[u8]) -> Result<Reply, DecodeError> {
    let mut r = Reader::new(body);
    let id = r.u64("id")?;
    let chunk = r.u32("chunk")?;
    let status = Status::from_code(r.u8("status")?)?;
    let len = if ty == DATA { r.u64("len")? } else { 0 };
    let text = r.str("text", MAX_TEXT)?;
    end(&r)?;
    if len > MAX_CHUNK || (status != Status::Ok && len != 0) {
        return Err(DecodeError::Invalid {
            field: "data length",
            reason: format!("{len} bytes with status {status:?}"),
        });
    }
    Ok(Reply {
        id,
        chunk,
        status,
        len,
        text,
    })
}

/// NOTIF: a notification for the target (acknowledged with ACK of the same id).
pub fn notif(out: &mut Vec<u8>, id: u64, msg: &[u8]) {
    begin(out, NOTIF);
    put_u64(out, id);
    put_blob(out, msg);
    finish(out);
}

pub fn decode_notif(body: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let mut r = Reader::new(body);
    let id = r.u64("id")?;
    let msg = r.blob_max("message", MAX_NOTIF)?;
    end(&r)?;
    Ok((id, msg))
}

/// MD: metadata bytes or a refusal text.
pub(crate) fn md(out: &mut Vec<u8>, status: Status, bytes: &[u8]) {
    begin(out, MD);
    out.push(status as u8);
    put_blob(out, bytes);
    finish(out);
}

pub fn decode_md(body: &[u8]) -> Result<(Status, &[u8]), DecodeError> {
    let mut r = Reader::new(body);
    let status = Status::from_code(r.u8("status")?)?;
    let bytes = r.blob("metadata")?;
    end(&r)?;
    Ok((status, bytes))
}

/// MD_DROP: asks the listener to drop the caller's metadata. The body is empty: whose metadata
/// is dropped is the name the connection proved, never anything a frame says.
pub(crate) fn md_drop(out: &mut Vec<u8>) {
    begin(out, MD_DROP);
    finish(out);
}

/// Checks an MD_DROP body (empty).
pub fn decode_md_drop(body: &[u8]) -> Result<(), DecodeError> {
    end(&Reader::new(body))
}

/// The answer to MD_DROP in an MD frame's bytes: whether the caller's metadata was loaded.
pub(crate) fn dropped(loaded: bool) -> &'static [u8] {
    if loaded {
        b"\x01"
    } else {
        b"\x00"
    }
}

/// CTRL: a control request for a backend's service.
pub(crate) fn ctrl(out: &mut Vec<u8>, backend: u8, req: &[u8]) {
    begin(out, CTRL);
    out.push(backend);
    put_blob(out, req);
    finish(out);
}

pub fn decode_ctrl(body: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    let mut r = Reader::new(body);
    let backend = r.u8("backend")?;
    let req = r.blob_max("request", crate::control::MAX_CONTROL)?;
    end(&r)?;
    Ok((backend, req))
}

/// CTRL_RE: the service's reply (status Ok) or its refusal text (Denied).
pub(crate) fn ctrl_re(out: &mut Vec<u8>, status: Status, bytes: &[u8]) {
    begin(out, CTRL_RE);
    out.push(status as u8);
    put_blob(out, bytes);
    finish(out);
}

pub fn decode_ctrl_re(body: &[u8]) -> Result<(Status, &[u8]), DecodeError> {
    let mut r = Reader::new(body);
    let status = Status::from_code(r.u8("status")?)?;
    let bytes = r.blob_max("reply", crate::control::MAX_CONTROL)?;
    end(&r)?;
    Ok((status, bytes))
}

use crate::frame::end;

/// Largest frame a peer may send for a purpose (metadata frames carry whole metadata).
pub fn frame_limit(ty: u8) -> usize {
    match ty {
        MD | MD_PUSH => nixl_core::metadata::MAX_METADATA_BYTES + 64,
        CTRL | CTRL_RE => crate::control::MAX_CONTROL + 64,
        NOTIF => MAX_NOTIF + 64,
        _ => MAX_FRAME,
    }
}

/// Largest OPEN body: purpose, a name, two instance ids.
pub(crate) const OPEN_BYTES: usize = 1 + 2 + MAX_NAME + 32;
/// Largest WRITE or READ body: id, chunk, count, [`MAX_PIECES`] pieces.
pub(crate) const XFER_BYTES: usize = 16 + MAX_PIECES * PIECE_BYTES;
/// Largest SPAN_WRITE or SPAN_READ body: id, chunk, key, count, [`MAX_SPANS`] spans.
pub(crate) const SPAN_XFER_BYTES: usize = 24 + MAX_SPANS * SPAN_BYTES;

/// The frames a listener takes on a connection opened for `purpose` (`None`: not opened yet,
/// only OPEN), and the largest body of each; `None` for a frame that has no business there.
/// A data connection takes WRITE, READ (a few KiB) and NOTIF, never a metadata push or a
/// control request, so a peer cannot make it buffer more than a notification.
pub fn purpose_limit(purpose: Option<Purpose>, ty: u8) -> Option<usize> {
    match (purpose, ty) {
        (None, OPEN) => Some(OPEN_BYTES),
        (Some(Purpose::Data), WRITE | READ) => Some(XFER_BYTES),
        (Some(Purpose::Data), SPAN_WRITE | SPAN_READ) => Some(SPAN_XFER_BYTES),
        (Some(Purpose::Data), NOTIF) => Some(MAX_NOTIF + 12),
        (Some(Purpose::Metadata), MD_GET | MD_DROP) => Some(0),
        (Some(Purpose::Metadata), MD_PUSH) => Some(nixl_core::metadata::MAX_METADATA_BYTES + 4),
        (Some(Purpose::Control), CTRL) => Some(crate::control::MAX_CONTROL + 5),
        _ => None,
    }
}

/// Turns a decode error into an I/O error of kind InvalidData.
pub(crate) fn bad(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(f: &[u8]) -> (u8, &[u8]) {
        let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 4);
        (f[4], &f[5..])
    }

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        open(&mut out, Purpose::Data, "a-ü", 7, 9);
        let (ty, b) = body(&out);
        assert_eq!(ty, OPEN);
        assert_eq!(
            decode_open(b).unwrap(),
            Open {
                purpose: Purpose::Data,
                name: "a-ü".into(),
                instance: 7,
                expect: 9
            }
        );
        let p = Piece {
            addr: 1,
            len: 2,
            key: 3,
        };
        xfer_head(&mut out, WRITE, 5, 6, 2);
        put_piece(&mut out, &p);
        put_piece(&mut out, &p);
        finish(&mut out);
        let mut pieces = Vec::new();
        assert_eq!(decode_xfer(body(&out).1, &mut pieces).unwrap(), (5, 6, 4));
        assert_eq!(pieces, vec![p, p]);
        data(&mut out, 1, 2, Status::Ok, 99, "");
        let (ty, b) = body(&out);
        assert_eq!(decode_reply(ty, b).unwrap().len, 99);
        ack(&mut out, 1, 2, Status::Denied, "no");
        let (ty, b) = body(&out);
        assert_eq!(decode_reply(ty, b).unwrap().status, Status::Denied);
    }

    #[test]
    fn notifications_decode_up_to_the_one_limit() {
        let mut out = Vec::new();
        notif(&mut out, 3, &vec![7u8; MAX_NOTIF]);
        let (ty, b) = body(&out);
        assert!(b.len() <= frame_limit(ty));
        assert_eq!(decode_notif(b).unwrap().1.len(), MAX_NOTIF);
        notif(&mut out, 3, &vec![7u8; MAX_NOTIF + 1]);
        assert!(decode_notif(body(&out).1).is_err());
    }

    #[test]
    fn each_purpose_takes_only_its_frames() {
        let mut out = Vec::new();
        open(
            &mut out,
            Purpose::Data,
            &"n".repeat(MAX_NAME + 50),
            u128::MAX,
            1,
        );
        assert!(out.len() - 5 <= OPEN_BYTES);
        xfer_head(&mut out, WRITE, 1, 2, MAX_PIECES as u32);
        for _ in 0..MAX_PIECES {
            put_piece(
                &mut out,
                &Piece {
                    addr: 1,
                    len: 1,
                    key: 1,
                },
            );
        }
        finish(&mut out);
        assert_eq!(out.len() - 5, XFER_BYTES);
        notif(&mut out, 3, &vec![0; MAX_NOTIF]);
        assert_eq!(
            Some(out.len() - 5),
            purpose_limit(Some(Purpose::Data), NOTIF)
        );
        for ty in [MD_PUSH, MD_GET, MD_DROP, CTRL, OPEN, ACK, DATA, 0, 255] {
            assert_eq!(purpose_limit(Some(Purpose::Data), ty), None, "type {ty}");
        }
        for ty in [WRITE, READ, NOTIF, CTRL] {
            assert_eq!(
                purpose_limit(Some(Purpose::Metadata), ty),
                None,
                "type {ty}"
            );
        }
        for ty in [WRITE, MD_PUSH, MD_GET, MD_DROP, OPEN] {
            assert_eq!(purpose_limit(Some(Purpose::Control), ty), None, "type {ty}");
        }
        for ty in [WRITE, READ, NOTIF, MD_PUSH, MD_DROP, CTRL] {
            assert_eq!(purpose_limit(None, ty), None, "type {ty} before OPEN");
        }
    }

    #[test]
    fn garbage_and_lies_are_errors() {
        let mut pieces = Vec::new();
        // Claims more pieces than the bytes hold.
        let mut out = Vec::new();
        xfer_head(&mut out, READ, 1, 0, 50);
        finish(&mut out);
        assert!(decode_xfer(body(&out).1, &mut pieces).is_err());
        // A payload over the chunk limit.
        xfer_head(&mut out, WRITE, 1, 0, 1);
        put_piece(
            &mut out,
            &Piece {
                addr: 0,
                len: MAX_CHUNK + 1,
                key: 0,
            },
        );
        finish(&mut out);
        assert!(decode_xfer(body(&out).1, &mut pieces).is_err());
        // Denied with data attached.
        data(&mut out, 1, 2, Status::Denied, 5, "x");
        let (ty, b) = body(&out);
        assert!(decode_reply(ty, b).is_err());
        for junk in [&[][..], &[9u8; 3], &[0xff; 40]] {
            let _ = decode_open(junk);
            let _ = decode_reply(ACK, junk);
            let _ = decode_reply(DATA, junk);
            let _ = decode_xfer(junk, &mut pieces);
            let _ = decode_md(junk);
            let _ = decode_notif(junk);
            let _ = decode_md_drop(junk);
        }
        md_drop(&mut out);
        let (ty, b) = body(&out);
        assert_eq!(ty, MD_DROP);
        assert_eq!(decode_md_drop(b), Ok(()));
        assert!(decode_md_drop(&[0]).is_err());
        assert_eq!(purpose_limit(Some(Purpose::Metadata), MD_DROP), Some(0));
    }
}
