//! The frame shape the `shm` and `tcp` wire formats share, `len u32 | type u8 | body`
//! (little-endian; `len` counts the type byte and the body), and the pieces their bodies are
//! made of: fixed-width integers, a `u16`-prefixed text, a `u32`-prefixed blob, a reply status.
//! Encoding is [`begin`], the body, [`finish`]; a byte stream is cut back into frames by
//! [`Framer`] (or by `tcp`'s blocking reader, which admits a frame from its header).

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

/// Starts a frame at the end of `out`: the length placeholder and the type. Returns where it
/// starts, for [`finish`].
pub(crate) fn begin(out: &mut Vec<u8>, ty: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, ty]);
    start
}

/// Patches the length of the frame begun at `start`.
pub(crate) fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a `u32`.
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a `u64`.
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a text as `len u16 | bytes`, cut to at most `max` bytes at a character boundary (so
/// what is sent still decodes as UTF-8).
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut end = s.len().min(max).min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Appends a blob as `len u32 | bytes`.
pub(crate) fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

/// That a body was read to its end.
pub(crate) fn end(r: &Reader<'_>) -> Result<(), DecodeError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Trailing(r.buf.len()))
    }
}

/// Status of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    Denied = 1,
    Failed = 2,
}

impl Status {
    /// The status of a code on the wire.
    pub fn from_code(c: u8) -> Result<Status, DecodeError> {
        match c {
            0 => Ok(Status::Ok),
            1 => Ok(Status::Denied),
            2 => Ok(Status::Failed),
            _ => Err(DecodeError::Invalid {
                field: "status",
                reason: format!("unknown code {c}"),
            }),
        }
    }
}

/// Accumulates stream bytes and yields whole frame bodies (type byte first) of at most `MAX`
/// bytes; a length prefix over the limit is an error before anything is allocated for it.
#[derive(Debug, Default)]
pub struct Framer<const MAX: usize> {
    buf: Vec<u8>,
    start: usize,
}

impl<const MAX: usize> Framer<MAX> {
    /// Room to read into: at least `min` bytes at the end of the buffer.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 20) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + min, 0);
        &mut self.buf[len..]
    }

    /// Keeps `n` bytes of what [`Framer::spare`] returned; drops the rest of it.
    pub fn commit(&mut self, min: usize, n: usize) {
        let len = self.buf.len();
        self.buf.truncate(len - min + n);
    }

    /// The next whole frame body, if buffered; an error if the length prefix is 0 or over the
    /// limit.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX || len == 0 {
            return Err(DecodeError::TooLarge {
                field: "frame",
                got: len,
                limit: MAX,
            });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = avail[4..4 + len].to_vec();
        self.start += 4 + len;
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        let mut out = Vec::new();
        put_str(&mut out, "aé", 2);
        assert_eq!(out, [1, 0, b'a']);
        let mut r = Reader::new(&out);
        assert_eq!(r.str("t", 2).unwrap(), "a");
        assert!(end(&r).is_ok());
    }

    #[test]
    fn a_frame_is_its_length_then_its_type_and_body() {
        let mut out = vec![9];
        let at = begin(&mut out, 7);
        put_u64(&mut out, 1);
        finish(&mut out, at);
        assert_eq!(&out[..6], &[9, 9, 0, 0, 0, 7]);
        let mut f = Framer::<16>::default();
        f.spare(out.len() - 1).copy_from_slice(&out[1..]);
        f.commit(out.len() - 1, out.len() - 1);
        assert_eq!(f.next_frame().unwrap().unwrap(), &out[5..]);
        assert_eq!(f.next_frame().unwrap(), None);
        f.spare(4).copy_from_slice(&17u32.to_le_bytes());
        f.commit(4, 4);
        assert!(f.next_frame().is_err());
    }
}
