//! The messages the `cuda` backends of two agents exchange across nodes ([`Ctl`]).

use super::*;

/// Largest notification carried in a [`Ctl::Notif`]: the one limit of every backend (the
/// control channel leaves room for it and the header).
pub(crate) const MAX_CTL_NOTIF: usize = nixl_core::MAX_NOTIF_BYTES;

/// A request between two agents' cuda backends over the agents' control channel: what the Unix
/// socket carries on one node, for peers on other nodes. Encoded as a type byte, then
/// (little-endian):
///
/// ```text
/// 1 Opened  u128 importer instance, u16 length + importer's control endpoint,
///           u64 dev, u64 addr, u64 len, u64 key          importer → owner; reply: empty
/// 2 Notif   u32 length + message                         importer → owner; reply: empty
/// 3 Revoke  u128 owner instance, u64 dev, u64 addr, u64 len, u64 key
///                                                        owner → importer; reply: u8 1 = closed,
///                                                        0 = copies still running at the bound
/// ```
///
/// A refusal is the channel's error reply (the caller gets `Denied` with the reason). The
/// sender's agent name is the one the channel authenticated, never a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ctl {
    /// The importer is about to map `region` (whole, as published, with its `key`) through
    /// fabric handles; the owner checks the key and records the import for revocation.
    Opened {
        /// The importer's instance id.
        instance: u128,
        /// Where the owner reaches the importer's cuda service (to revoke).
        endpoint: Vec<u8>,
        /// The region.
        region: nixl_core::Desc,
        /// Its key.
        key: u64,
    },
    /// A notification for the owner's agent.
    Notif {
        /// The message.
        msg: Vec<u8>,
    },
    /// The owner deregistered `region`: the importer must stop using it and close its mappings.
    Revoke {
        /// The owner's instance id.
        instance: u128,
        /// The region.
        region: nixl_core::Desc,
        /// Its key.
        key: u64,
    },
}

pub(super) const CTL_OPENED: u8 = 1;
pub(super) const CTL_NOTIF: u8 = 2;
pub(super) const CTL_REVOKE: u8 = 3;

pub(super) fn put_region(v: &mut Vec<u8>, region: &nixl_core::Desc, key: u64) {
    for x in [region.dev_id, region.addr, region.len, key] {
        v.extend_from_slice(&x.to_le_bytes());
    }
}

pub(super) fn get_region(r: &mut Reader<'_>) -> Result<(nixl_core::Desc, u64), DecodeError> {
    let dev = r.u64("dev")?;
    let addr = r.u64("addr")?;
    let len = r.u64("len")?;
    Ok((nixl_core::Desc::new(addr, len, dev), r.u64("key")?))
}

impl Ctl {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        match self {
            Ctl::Opened {
                instance,
                endpoint,
                region,
                key,
            } => {
                v.push(CTL_OPENED);
                v.extend_from_slice(&instance.to_le_bytes());
                let ep = &endpoint[..endpoint.len().min(MAX_ENDPOINT)];
                v.extend_from_slice(&(ep.len() as u16).to_le_bytes());
                v.extend_from_slice(ep);
                put_region(&mut v, region, *key);
            }
            Ctl::Notif { msg } => {
                v.reserve(msg.len());
                v.push(CTL_NOTIF);
                v.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                v.extend_from_slice(msg);
            }
            Ctl::Revoke {
                instance,
                region,
                key,
            } => {
                v.push(CTL_REVOKE);
                v.extend_from_slice(&instance.to_le_bytes());
                put_region(&mut v, region, *key);
            }
        }
        v
    }

    /// Decodes, without trusting.
    pub fn decode(b: &[u8]) -> Result<Ctl, DecodeError> {
        let mut r = Reader::new(b);
        let m = match r.u8("cuda control type")? {
            CTL_OPENED => {
                let instance = u128::from_le_bytes(r.array::<16>("instance")?);
                let n = usize::from(r.u16("endpoint")?);
                if n > MAX_ENDPOINT {
                    return Err(DecodeError::TooLarge {
                        field: "endpoint",
                        got: n,
                        limit: MAX_ENDPOINT,
                    });
                }
                let endpoint = r.take(n, "endpoint")?.to_vec();
                let (region, key) = get_region(&mut r)?;
                Ctl::Opened {
                    instance,
                    endpoint,
                    region,
                    key,
                }
            }
            CTL_NOTIF => {
                let n = r.u32("notification")? as usize;
                if n > MAX_CTL_NOTIF {
                    return Err(DecodeError::TooLarge {
                        field: "notification",
                        got: n,
                        limit: MAX_CTL_NOTIF,
                    });
                }
                Ctl::Notif {
                    msg: r.take(n, "notification")?.to_vec(),
                }
            }
            CTL_REVOKE => {
                let instance = u128::from_le_bytes(r.array::<16>("instance")?);
                let (region, key) = get_region(&mut r)?;
                Ctl::Revoke {
                    instance,
                    region,
                    key,
                }
            }
            t => {
                return Err(invalid(
                    "cuda control type",
                    format!("unknown message type {t}"),
                ))
            }
        };
        if !r.is_empty() {
            return Err(invalid("cuda control message", "trailing bytes".into()));
        }
        Ok(m)
    }
}
