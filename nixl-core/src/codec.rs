//! Bounds-checked little-endian decoding of untrusted bytes, shared by the metadata format and
//! the backends' wire protocols. Every read checks the bytes left; nothing allocates by a length
//! read from the input.

use crate::metadata::{DecodeError, MAX_BLOB_BYTES};

/// Lower-case hex of `bytes` (how the text protocols of the tools carry metadata).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of the hex `s` (either case; white space around it is ignored), or why not.
pub fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if s.len() % 2 != 0 || !s.is_ascii() {
        return Err(format!("not hex: {} bytes, odd or not ASCII", s.len()));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("not hex: {e}")))
        .collect()
}

/// A bounds-checked little-endian reader over untrusted bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    /// The bytes not read yet.
    pub buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                field,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    /// Reads a u8.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    /// Reads a little-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// Reads a little-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// The next u8, not consumed.
    pub fn peek_u8(&self) -> Result<u8, DecodeError> {
        Reader { buf: self.buf }.u8("count")
    }

    /// The next u16, not consumed.
    pub fn peek_u16(&self) -> Result<u16, DecodeError> {
        Reader { buf: self.buf }.u16("count")
    }

    /// The next u32, not consumed.
    pub fn peek_u32(&self) -> Result<u32, DecodeError> {
        Reader { buf: self.buf }.u32("count")
    }

    /// Consumes a count field of `width` bytes whose value (already peeked) is `n`, and checks it
    /// against `limit` and against the bytes left, given each entry takes at least `min_entry`.
    #[allow(clippy::too_many_arguments)]
    pub fn count(
        &mut self,
        field: &'static str,
        n: usize,
        width: usize,
        limit: usize,
        min_entry: usize,
    ) -> Result<usize, DecodeError> {
        self.take(width, field)?;
        if n > limit {
            return Err(DecodeError::TooLarge {
                field,
                got: n,
                limit,
            });
        }
        let needed = n.saturating_mul(min_entry);
        if needed > self.buf.len() {
            return Err(DecodeError::Truncated {
                field,
                needed: needed - self.buf.len(),
            });
        }
        Ok(n)
    }

    /// Reads a u32-length-prefixed byte string of at most `MAX_BLOB_BYTES`.
    pub fn blob(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        self.blob_max(field, MAX_BLOB_BYTES)
    }

    /// Reads a u32-length-prefixed byte string of at most `limit` bytes.
    pub fn blob_max(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        if len > limit {
            return Err(DecodeError::TooLarge {
                field,
                got: len,
                limit,
            });
        }
        self.take(len, field)
    }

    /// Reads a u16-length-prefixed UTF-8 string of at most `limit` bytes.
    pub fn str(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > limit {
            return Err(DecodeError::TooLarge {
                field,
                got: len,
                limit,
            });
        }
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| DecodeError::Invalid {
                field,
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_bad_hex_is_an_error_not_a_panic() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex(" 0001ABff\n").unwrap(), b);
        for bad in ["abc", "zz", "é0", "éé"] {
            assert!(unhex(bad).is_err(), "{bad:?}");
        }
    }
}
