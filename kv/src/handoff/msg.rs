//! The wire form of the handoff messages, and its bounded reader.

use std::time::Duration;

use super::{MAGIC, MAX_HANDOFF_BLOCKS, MAX_LEASE, MAX_REASON, MAX_REQUEST_ID};
use crate::{KvError, Result};

/// A message between the two sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Prefill → decode: the blocks of `request` are ready under a lease.
    Ready {
        /// Handoff id (chosen by prefill, unique per prefill agent).
        id: u64,
        /// The engine's request id.
        request: String,
        /// Prefill block indices, in token order.
        blocks: Vec<u32>,
        /// Lease, milliseconds.
        lease_ms: u32,
    },
    /// Decode → prefill, as the notification of decode's READ (after the data): done.
    Done {
        /// Handoff id.
        id: u64,
        /// Request id, for the engine's logs.
        request: String,
    },
    /// Either way: the handoff ends; the sender no longer touches the blocks.
    Abort {
        /// Handoff id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Decode → prefill: extend the lease by its length from now.
    Renew {
        /// Handoff id.
        id: u64,
    },
    /// Decode → prefill (push): decode reserved `blocks` for `request` until the lease ends;
    /// prefill WRITEs into them, its WRITE's notification (`Done`) confirms.
    Reserve {
        /// Handoff id (chosen by decode, unique per decode agent).
        id: u64,
        /// The engine's request id.
        request: String,
        /// Decode block indices, in token order.
        blocks: Vec<u32>,
        /// Lease, milliseconds.
        lease_ms: u32,
    },
}

impl Msg {
    /// Encodes (little-endian, `NKV1` first).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend_from_slice(&(x.len() as u32).to_le_bytes());
            b.extend_from_slice(x.as_bytes());
        };
        match self {
            Msg::Ready {
                id,
                request,
                blocks,
                lease_ms,
            }
            | Msg::Reserve {
                id,
                request,
                blocks,
                lease_ms,
            } => {
                b.push(if matches!(self, Msg::Ready { .. }) {
                    1
                } else {
                    5
                });
                b.extend_from_slice(&id.to_le_bytes());
                s(&mut b, request);
                b.extend_from_slice(&lease_ms.to_le_bytes());
                b.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
                for x in blocks {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
            Msg::Done { id, request } => {
                b.push(2);
                b.extend_from_slice(&id.to_le_bytes());
                s(&mut b, request);
            }
            Msg::Abort { id, reason } => {
                b.push(3);
                b.extend_from_slice(&id.to_le_bytes());
                s(&mut b, reason);
            }
            Msg::Renew { id } => {
                b.push(4);
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
        b
    }

    /// Decodes a peer's message: `None` if it is not a KV message at all (no magic),
    /// `Some(Err)` if it is one but malformed or out of bounds.
    pub fn decode(b: &[u8]) -> Option<Result<Msg>> {
        let rest = b.strip_prefix(MAGIC)?;
        Some(Self::decode_body(rest))
    }

    fn decode_body(b: &[u8]) -> Result<Msg> {
        let mut r = Reader(b);
        let bad = |w: &str| KvError::Protocol(w.to_owned());
        let t = r.u8()?;
        let id = r.u64()?;
        let m = match t {
            1 | 5 => {
                let request = r.str(MAX_REQUEST_ID)?;
                let lease_ms = r.u32()?;
                if lease_ms == 0 || Duration::from_millis(lease_ms.into()) > MAX_LEASE {
                    return Err(bad("lease out of range"));
                }
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_HANDOFF_BLOCKS {
                    return Err(bad("block count out of range"));
                }
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    blocks.push(r.u32()?);
                }
                if t == 1 {
                    Msg::Ready {
                        id,
                        request,
                        blocks,
                        lease_ms,
                    }
                } else {
                    Msg::Reserve {
                        id,
                        request,
                        blocks,
                        lease_ms,
                    }
                }
            }
            2 => Msg::Done {
                id,
                request: r.str(MAX_REQUEST_ID)?,
            },
            3 => Msg::Abort {
                id,
                reason: r.str(MAX_REASON)?,
            },
            4 => Msg::Renew { id },
            t => return Err(KvError::Protocol(format!("unknown message type {t}"))),
        };
        if !r.0.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(m)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(KvError::Protocol("truncated message".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, max: usize) -> Result<String> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(KvError::Protocol(format!("string of {n} bytes over {max}")));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| KvError::Protocol("string is not UTF-8".into()))
    }
}
