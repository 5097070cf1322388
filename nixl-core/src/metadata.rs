//! Agent metadata: what a peer needs to reach this agent, and its wire format.
//!
//! Format (all integers little-endian), version 1:
//!
//! ```text
//! magic "NXMD" | version u16 | flags u16 (bit 0: partial) | body_len u32 | body
//! body := name str | instance_id u128 | generation u64
//!         | backend_count u16 | { code u8 | conn_info blob }*
//!         | region_count u32  | { kind u8 | addr u64 | len u64 | dev_id u64 | key u64
//!                               | bcount u8 | { code u8 | public blob }* }*
//! str  := len u16 | utf-8 bytes        blob := len u32 | bytes
//! ```
//!
//! Decoding never trusts its input: every length and count is checked against fixed limits and
//! against the bytes actually left before anything is allocated, so the memory a decode takes is
//! bounded by the size of its input; trailing bytes, unknown versions, bad UTF-8, zero-length or
//! wrapping regions are errors. Backends unknown to this build are skipped (a newer peer may offer
//! more than we know), regions keep only the backends we know.

use crate::backend::BackendName;
use crate::codec::Reader;
use crate::mem::{Desc, MemKind};

/// Magic bytes that start every metadata blob.
pub const MAGIC: [u8; 4] = *b"NXMD";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Largest metadata blob accepted.
pub const MAX_METADATA_BYTES: usize = 256 << 20;
/// Longest agent name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Largest backend connection-info or per-region public blob.
pub const MAX_BLOB_BYTES: usize = 1 << 20;
/// Most backends in one metadata blob.
pub const MAX_BACKENDS: usize = 64;
/// Most regions in one metadata blob.
pub const MAX_REGIONS: usize = 1 << 22;

const HEADER_LEN: usize = 4 + 2 + 2 + 4;
const FLAG_PARTIAL: u16 = 1;
// Smallest encodings, used to bound counts by the bytes left.
const MIN_BACKEND_LEN: usize = 1 + 4;
const MIN_REGION_LEN: usize = 1 + 8 * 4 + 1;
const MIN_REGION_BACKEND_LEN: usize = 1 + 4;

/// Why metadata bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before a field does.
    #[error("truncated: needed {needed} more bytes for {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// The magic bytes are wrong: not metadata.
    #[error("not nixl metadata (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported metadata version {0} (this build reads {VERSION})")]
    Version(u16),
    /// A length or count is over its limit.
    #[error("{field} is {got}, over the limit of {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Value found.
        got: usize,
        /// Limit.
        limit: usize,
    },
    /// A field holds a value that makes no sense.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Bytes left after the body.
    #[error("{0} trailing bytes after metadata")]
    Trailing(usize),
}

/// A backend's entry in metadata: its connection info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// The backend.
    pub name: BackendName,
    /// What a peer's instance of the backend needs to connect (opaque to the core).
    pub conn_info: Vec<u8>,
}

/// A region's entry in metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Memory kind.
    pub kind: MemKind,
    /// Range and device.
    pub desc: Desc,
    /// The key a peer must present.
    pub key: u64,
    /// Backends that registered it, with their public data.
    pub backends: Vec<(BackendName, Vec<u8>)>,
}

/// Everything a peer needs to reach an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentMetadata {
    /// The agent's name.
    pub name: String,
    /// Random id of this incarnation of the agent.
    pub instance_id: u128,
    /// Bumped on every registration change; a loaded generation is never replaced by an older one.
    pub generation: u64,
    /// Whether this describes only selected regions (merged into what a peer has, not replacing it).
    pub partial: bool,
    /// Available backends and their connection info.
    pub backends: Vec<BackendInfo>,
    /// Registered regions (all of them, or the selected ones when `partial`).
    pub regions: Vec<RegionInfo>,
}

impl AgentMetadata {
    /// Encodes to the wire format.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(
            64 + self.regions.len() * (MIN_REGION_LEN + 16)
                + self
                    .backends
                    .iter()
                    .map(|b| b.conn_info.len() + 5)
                    .sum::<usize>(),
        );
        put_str(&mut body, &self.name);
        body.extend_from_slice(&self.instance_id.to_le_bytes());
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&(self.backends.len() as u16).to_le_bytes());
        for b in &self.backends {
            body.push(b.name.code());
            put_blob(&mut body, &b.conn_info);
        }
        body.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            body.push(r.kind.code());
            for v in [r.desc.addr, r.desc.len, r.desc.dev_id, r.key] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.push(r.backends.len() as u8);
            for (name, public) in &r.backends {
                body.push(name.code());
                put_blob(&mut body, public);
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.partial { FLAG_PARTIAL } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes the wire format, checking everything.
    pub fn decode(bytes: &[u8]) -> Result<AgentMetadata, DecodeError> {
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(DecodeError::TooLarge {
                field: "metadata",
                got: bytes.len(),
                limit: MAX_METADATA_BYTES,
            });
        }
        let mut r = Reader { buf: bytes };
        if r.take(4, "magic")? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let flags = r.u16("flags")?;
        if flags & !FLAG_PARTIAL != 0 {
            return Err(DecodeError::Invalid {
                field: "flags",
                reason: format!("unknown bits {flags:#x}"),
            });
        }
        let body_len = r.u32("body length")? as usize;
        if body_len != r.buf.len() {
            return if body_len > r.buf.len() {
                Err(DecodeError::Truncated {
                    field: "body",
                    needed: body_len - r.buf.len(),
                })
            } else {
                Err(DecodeError::Trailing(r.buf.len() - body_len))
            };
        }

        let name = r.str("name", MAX_NAME_BYTES)?;
        if name.is_empty() || name.contains('\0') {
            return Err(DecodeError::Invalid {
                field: "name",
                reason: "empty or contains NUL".into(),
            });
        }
        let instance_id = u128::from_le_bytes(r.array("instance id")?);
        let generation = r.u64("generation")?;

        let backend_count = r.count(
            "backend count",
            usize::from(r.peek_u16()?),
            2,
            MAX_BACKENDS,
            MIN_BACKEND_LEN,
        )?;
        let fields = ["backend code", "backend connection info", "backends"];
        let backends = backend_blobs(&mut r, backend_count, fields)?
            .into_iter()
            .map(|(name, conn_info)| BackendInfo { name, conn_info })
            .collect();

        let region_count = r.count(
            "region count",
            r.peek_u32()? as usize,
            4,
            MAX_REGIONS,
            MIN_REGION_LEN,
        )?;
        let mut regions = Vec::with_capacity(region_count);
        for _ in 0..region_count {
            let code = r.u8("region kind")?;
            let kind = MemKind::from_code(code).ok_or_else(|| DecodeError::Invalid {
                field: "region kind",
                reason: format!("unknown code {code}"),
            })?;
            let desc = Desc::new(r.u64("addr")?, r.u64("len")?, r.u64("dev id")?);
            if desc.len == 0 || desc.end().is_none() {
                return Err(DecodeError::Invalid {
                    field: "region",
                    reason: format!("{kind} region {desc:?} is empty or wraps"),
                });
            }
            let key = r.u64("key")?;
            let bcount = r.count(
                "region backend count",
                usize::from(r.peek_u8()?),
                1,
                MAX_BACKENDS,
                MIN_REGION_BACKEND_LEN,
            )?;
            let fields = [
                "region backend code",
                "region public data",
                "region backends",
            ];
            regions.push(RegionInfo {
                kind,
                desc,
                key,
                backends: backend_blobs(&mut r, bcount, fields)?,
            });
        }
        if !r.buf.is_empty() {
            return Err(DecodeError::Trailing(r.buf.len()));
        }
        Ok(AgentMetadata {
            name,
            instance_id,
            generation,
            partial: flags & FLAG_PARTIAL != 0,
            backends,
            regions,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// `count` entries of a backend's code and its bytes (`fields`: the names of the code, of the
/// bytes and of the list, for errors): those of the backends this build knows, each at most
/// once; entries of unknown backends (a newer peer's) are skipped.
fn backend_blobs(
    r: &mut Reader<'_>,
    count: usize,
    [code_field, blob_field, list_field]: [&'static str; 3],
) -> Result<Vec<(BackendName, Vec<u8>)>, DecodeError> {
    let mut out: Vec<(BackendName, Vec<u8>)> = Vec::with_capacity(count);
    for _ in 0..count {
        let code = r.u8(code_field)?;
        let blob = r.blob(blob_field)?;
        if let Some(name) = BackendName::from_code(code) {
            if out.iter().any(|(n, _)| *n == name) {
                return Err(DecodeError::Invalid {
                    field: list_field,
                    reason: format!("{name} listed twice"),
                });
            }
            out.push((name, blob.to_vec()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> AgentMetadata {
        AgentMetadata {
            name: "prefill-0".into(),
            instance_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            generation: 7,
            partial: false,
            backends: vec![
                BackendInfo {
                    name: BackendName::Shm,
                    conn_info: b"/run/nixl/x.sock".to_vec(),
                },
                BackendInfo {
                    name: BackendName::Local,
                    conn_info: vec![1, 2, 3],
                },
            ],
            regions: vec![RegionInfo {
                kind: MemKind::Dram,
                desc: Desc::new(0x1000, 4096, 0),
                key: 99,
                backends: vec![
                    (BackendName::Shm, vec![9; 12]),
                    (BackendName::Local, vec![]),
                ],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let md = sample();
        let bytes = md.encode();
        assert_eq!(&bytes[..4], b"NXMD");
        assert_eq!(AgentMetadata::decode(&bytes).unwrap(), md);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(AgentMetadata::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn trailing_version_and_magic() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(
            AgentMetadata::decode(&bytes),
            Err(DecodeError::Trailing(1))
        ));
        let mut bytes = sample().encode();
        bytes[4] = 2;
        assert_eq!(AgentMetadata::decode(&bytes), Err(DecodeError::Version(2)));
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert_eq!(AgentMetadata::decode(&bytes), Err(DecodeError::BadMagic));
    }

    #[test]
    fn huge_count_is_refused_before_allocating() {
        let mut md = sample();
        md.regions.clear();
        let mut bytes = md.encode();
        // Region count is the last 4 bytes of an encoding without regions.
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = AgentMetadata::decode(&bytes).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
        bytes[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
        let err = AgentMetadata::decode(&bytes).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
    }

    #[test]
    fn unknown_backend_is_skipped() {
        let mut bytes = sample().encode();
        // First backend code sits right after header, name, instance id, generation, count.
        let at = HEADER_LEN + 2 + "prefill-0".len() + 16 + 8 + 2;
        assert_eq!(bytes[at], BackendName::Shm.code());
        bytes[at] = 200;
        let md = AgentMetadata::decode(&bytes).unwrap();
        assert_eq!(md.backends.len(), 1);
        assert_eq!(md.backends[0].name, BackendName::Local);
    }
}
