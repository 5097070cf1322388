//! What the `rdma` backend publishes and exchanges: its connection info (in the agent's
//! metadata), the per-region public data, and the queue-pair handshake on the control channel.
//! Versioned, little-endian, decoded with bounds from untrusted bytes: garbage and truncated
//! input give a [`DecodeError`], never a panic, and nothing is allocated by a length read from
//! the input beyond its limit.

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

/// Version of every encoding in this module.
pub(crate) const VERSION: u8 = 2;
/// Most NICs one agent publishes.
pub(crate) const MAX_NICS: usize = 64;
/// Most lanes (QPs) in one handshake.
pub(crate) const MAX_LANES: usize = 1024;
/// Longest device name.
pub(crate) const MAX_NAME: usize = 64;
/// Longest control endpoint.
pub(crate) const MAX_ENDPOINT: usize = 4096;
/// QP numbers and PSNs are 24-bit.
pub(crate) const MAX_24: u32 = (1 << 24) - 1;

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    crate::frame::put_str(v, s, usize::from(u16::MAX));
}

fn version(r: &mut Reader<'_>, what: &'static str) -> Result<(), DecodeError> {
    let v = r.u8(what)?;
    if v != VERSION {
        return Err(invalid(
            what,
            format!("version {v}, this build reads {VERSION}"),
        ));
    }
    Ok(())
}

use crate::frame::end as finish;

/// One NIC as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicAddr {
    /// Device name.
    pub name: String,
    /// Port used.
    pub port: u8,
    /// LID (InfiniBand).
    pub lid: u16,
    /// GID (RoCE, or IB with a GRH).
    pub gid: [u8; 16],
    /// Active MTU as an `ibv_mtu` code (1 = 256 .. 5 = 4096).
    pub mtu: u8,
    /// `IBV_LINK_LAYER_INFINIBAND` (1) or `IBV_LINK_LAYER_ETHERNET` (2).
    pub link_layer: u8,
}

const NIC_MIN: usize = 2 + 1 + 2 + 16 + 1 + 1;

/// The backend's connection info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The control channel endpoint of the agent.
    pub endpoint: Vec<u8>,
    /// Node GUID of the first NIC (host order), identifying the host's fabric presence.
    pub node_guid: u64,
    /// Largest notification the agent receives.
    pub max_notif: u32,
    /// The NICs, in the order region data refers to them.
    pub nics: Vec<NicAddr>,
}

impl ConnInfo {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.endpoint.len() + self.nics.len() * 40);
        v.push(VERSION);
        v.extend_from_slice(&(self.endpoint.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.endpoint);
        v.extend_from_slice(&self.node_guid.to_le_bytes());
        v.extend_from_slice(&self.max_notif.to_le_bytes());
        v.push(self.nics.len().min(MAX_NICS) as u8);
        for n in self.nics.iter().take(MAX_NICS) {
            put_str(&mut v, &n.name);
            v.push(n.port);
            v.extend_from_slice(&n.lid.to_le_bytes());
            v.extend_from_slice(&n.gid);
            v.push(n.mtu);
            v.push(n.link_layer);
        }
        v
    }

    /// Decodes untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<ConnInfo, DecodeError> {
        let mut r = Reader::new(b);
        version(&mut r, "rdma connection info version")?;
        let endpoint = r.blob("control endpoint")?;
        if endpoint.len() > MAX_ENDPOINT {
            return Err(DecodeError::TooLarge {
                field: "control endpoint",
                got: endpoint.len(),
                limit: MAX_ENDPOINT,
            });
        }
        let endpoint = endpoint.to_vec();
        let node_guid = r.u64("node guid")?;
        let max_notif = r.u32("max notification")?;
        let n = usize::from(r.peek_u8()?);
        let n = r.count("nic count", n, 1, MAX_NICS, NIC_MIN)?;
        let mut nics = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.str("nic name", MAX_NAME)?;
            if name.is_empty() {
                return Err(invalid("nic name", "empty"));
            }
            let port = r.u8("port")?;
            if port == 0 {
                return Err(invalid("port", "0 (ports count from 1)"));
            }
            let lid = r.u16("lid")?;
            let gid = r.array::<16>("gid")?;
            let mtu = r.u8("mtu")?;
            if !(1..=5).contains(&mtu) {
                return Err(invalid("mtu", format!("code {mtu} (1..=5)")));
            }
            let link_layer = r.u8("link layer")?;
            if !(1..=2).contains(&link_layer) {
                return Err(invalid("link layer", format!("code {link_layer} (1 or 2)")));
            }
            nics.push(NicAddr {
                name,
                port,
                lid,
                gid,
                mtu,
                link_layer,
            });
        }
        finish(&r)?;
        Ok(ConnInfo {
            endpoint,
            node_guid,
            max_notif,
            nics,
        })
    }
}

/// A region's public data: its address and, per NIC of the owner, the rkey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionKeys {
    /// Start address the MRs cover (the region's address).
    pub addr: u64,
    /// Length covered.
    pub len: u64,
    /// (index into the owner's [`ConnInfo::nics`], rkey).
    pub rkeys: Vec<(u8, u32)>,
}

impl RegionKeys {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(18 + 5 * self.rkeys.len());
        v.push(VERSION);
        v.extend_from_slice(&self.addr.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.push(self.rkeys.len().min(MAX_NICS) as u8);
        for (nic, rkey) in self.rkeys.iter().take(MAX_NICS) {
            v.push(*nic);
            v.extend_from_slice(&rkey.to_le_bytes());
        }
        v
    }

    /// Decodes untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<RegionKeys, DecodeError> {
        let mut r = Reader::new(b);
        version(&mut r, "rdma region data version")?;
        let addr = r.u64("region address")?;
        let len = r.u64("region length")?;
        if addr.checked_add(len).is_none() {
            return Err(invalid("region length", "address + length overflows"));
        }
        let n = usize::from(r.peek_u8()?);
        let n = r.count("rkey count", n, 1, MAX_NICS, 5)?;
        let mut rkeys = Vec::with_capacity(n);
        for _ in 0..n {
            let nic = r.u8("nic index")?;
            if usize::from(nic) >= MAX_NICS || rkeys.iter().any(|(i, _)| *i == nic) {
                return Err(invalid(
                    "nic index",
                    format!("{nic} out of range or repeated"),
                ));
            }
            rkeys.push((nic, r.u32("rkey")?));
        }
        finish(&r)?;
        Ok(RegionKeys { addr, len, rkeys })
    }

    /// The rkey for the owner's NIC `nic`.
    pub(crate) fn rkey(&self, nic: u8) -> Option<u32> {
        self.rkeys.iter().find(|(i, _)| *i == nic).map(|(_, k)| *k)
    }
}

/// One side of a lane in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpAddr {
    /// Index of the NIC on the *target* (in the target's [`ConnInfo::nics`]).
    pub target_nic: u8,
    /// QP number (24-bit).
    pub qpn: u32,
    /// Starting PSN (24-bit).
    pub psn: u32,
    /// LID of the sender's port.
    pub lid: u16,
    /// GID of the sender's port.
    pub gid: [u8; 16],
    /// MTU code of the sender's port.
    pub mtu: u8,
    /// RDMA READs the sender's QP answers at once (its responder resources, 1..=255).
    pub rd_atomic: u8,
}

const QP_MIN: usize = 1 + 4 + 4 + 2 + 16 + 1 + 1;

fn put_qp(v: &mut Vec<u8>, q: &QpAddr) {
    v.push(q.target_nic);
    v.extend_from_slice(&q.qpn.to_le_bytes());
    v.extend_from_slice(&q.psn.to_le_bytes());
    v.extend_from_slice(&q.lid.to_le_bytes());
    v.extend_from_slice(&q.gid);
    v.push(q.mtu);
    v.push(q.rd_atomic);
}

fn get_qp(r: &mut Reader<'_>) -> Result<QpAddr, DecodeError> {
    let target_nic = r.u8("target nic")?;
    let qpn = r.u32("qp number")?;
    if qpn > MAX_24 || qpn == 0 {
        return Err(invalid("qp number", format!("{qpn} is not a 24-bit QPN")));
    }
    let psn = r.u32("psn")?;
    if psn > MAX_24 {
        return Err(invalid("psn", format!("{psn} is not 24-bit")));
    }
    let lid = r.u16("lid")?;
    let gid = r.array::<16>("gid")?;
    let mtu = r.u8("mtu")?;
    if !(1..=5).contains(&mtu) {
        return Err(invalid("mtu", format!("code {mtu} (1..=5)")));
    }
    let rd_atomic = r.u8("rd atomic")?;
    if rd_atomic == 0 {
        return Err(invalid("rd atomic", "0"));
    }
    Ok(QpAddr {
        target_nic,
        qpn,
        psn,
        lid,
        gid,
        mtu,
        rd_atomic,
    })
}

/// A control message of the `rdma` backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Initiator → target: connect these lanes (initiator's QP side of each).
    Connect {
        /// Initiator-chosen id of the connection (to close it later).
        conn_id: u64,
        /// The initiator instance id the target's metadata of us should match.
        instance_id: u128,
        /// One per lane.
        lanes: Vec<QpAddr>,
    },
    /// Target → initiator: the target's QP side of each lane, in the same order.
    Accept {
        /// One per lane of the request.
        lanes: Vec<QpAddr>,
    },
    /// Initiator → target: the connection is gone, free its QPs.
    Close {
        /// The id given in `Connect`.
        conn_id: u64,
    },
    /// Target → initiator: done.
    Ok,
}

const CONNECT: u8 = 1;
const ACCEPT: u8 = 2;
const CLOSE: u8 = 3;
const OK: u8 = 4;

impl Msg {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        let lanes = |v: &mut Vec<u8>, l: &[QpAddr]| {
            let n = l.len().min(MAX_LANES);
            v.extend_from_slice(&(n as u16).to_le_bytes());
            for q in &l[..n] {
                put_qp(v, q);
            }
        };
        match self {
            Msg::Connect {
                conn_id,
                instance_id,
                lanes: l,
            } => {
                v.push(CONNECT);
                v.extend_from_slice(&conn_id.to_le_bytes());
                v.extend_from_slice(&instance_id.to_le_bytes());
                lanes(&mut v, l);
            }
            Msg::Accept { lanes: l } => {
                v.push(ACCEPT);
                lanes(&mut v, l);
            }
            Msg::Close { conn_id } => {
                v.push(CLOSE);
                v.extend_from_slice(&conn_id.to_le_bytes());
            }
            Msg::Ok => v.push(OK),
        }
        v
    }

    /// Decodes untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<Msg, DecodeError> {
        let mut r = Reader::new(b);
        version(&mut r, "rdma control version")?;
        let lanes = |r: &mut Reader<'_>| -> Result<Vec<QpAddr>, DecodeError> {
            let n = usize::from(r.peek_u16()?);
            let n = r.count("lane count", n, 2, MAX_LANES, QP_MIN)?;
            (0..n).map(|_| get_qp(r)).collect()
        };
        let msg = match r.u8("rdma control message")? {
            CONNECT => {
                let conn_id = r.u64("connection id")?;
                let lo = r.u64("instance id")?;
                let hi = r.u64("instance id")?;
                let l = lanes(&mut r)?;
                if l.is_empty() {
                    return Err(invalid("lane count", "0"));
                }
                Msg::Connect {
                    conn_id,
                    instance_id: u128::from(lo) | (u128::from(hi) << 64),
                    lanes: l,
                }
            }
            ACCEPT => Msg::Accept {
                lanes: lanes(&mut r)?,
            },
            CLOSE => Msg::Close {
                conn_id: r.u64("connection id")?,
            },
            OK => Msg::Ok,
            k => return Err(invalid("rdma control message", format!("unknown kind {k}"))),
        };
        finish(&r)?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nic(name: &str) -> NicAddr {
        NicAddr {
            name: name.into(),
            port: 1,
            lid: 7,
            gid: [9; 16],
            mtu: 5,
            link_layer: 1,
        }
    }

    fn qp(i: u8) -> QpAddr {
        QpAddr {
            target_nic: i,
            qpn: 0x12_3456,
            psn: 77,
            lid: 3,
            gid: [i; 16],
            mtu: 4,
            rd_atomic: 16,
        }
    }

    #[test]
    fn round_trips() {
        let ci = ConnInfo {
            endpoint: b"tcp://10.0.0.1:5000".to_vec(),
            node_guid: 0xdead_beef,
            max_notif: 4096,
            nics: vec![nic("mlx5_0"), nic("mlx5_1")],
        };
        assert_eq!(ConnInfo::decode(&ci.encode()).unwrap(), ci);
        let rk = RegionKeys {
            addr: 0x1000,
            len: 4096,
            rkeys: vec![(0, 11), (1, 22)],
        };
        assert_eq!(RegionKeys::decode(&rk.encode()).unwrap(), rk);
        assert_eq!(rk.rkey(1), Some(22));
        for m in [
            Msg::Connect {
                conn_id: 5,
                instance_id: u128::MAX - 3,
                lanes: vec![qp(0), qp(1)],
            },
            Msg::Accept { lanes: vec![qp(2)] },
            Msg::Close { conn_id: 9 },
            Msg::Ok,
        ] {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn truncation_everywhere_is_an_error() {
        let ci = ConnInfo {
            endpoint: b"ep".to_vec(),
            node_guid: 1,
            max_notif: 64,
            nics: vec![nic("a")],
        }
        .encode();
        for n in 0..ci.len() {
            assert!(ConnInfo::decode(&ci[..n]).is_err(), "prefix {n}");
        }
        let m = Msg::Connect {
            conn_id: 1,
            instance_id: 2,
            lanes: vec![qp(0)],
        }
        .encode();
        for n in 0..m.len() {
            assert!(Msg::decode(&m[..n]).is_err(), "prefix {n}");
        }
        let mut t = m.clone();
        t.push(0);
        assert!(matches!(Msg::decode(&t), Err(DecodeError::Trailing(1))));
    }

    #[test]
    fn bad_values_are_named() {
        let mut m = Msg::Accept { lanes: vec![qp(0)] }.encode();
        m[0] = 9;
        let e = Msg::decode(&m).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
        let mut bad = qp(0);
        bad.qpn = 1 << 24;
        let e = Msg::decode(&Msg::Accept { lanes: vec![bad] }.encode())
            .unwrap_err()
            .to_string();
        assert!(e.contains("qp number"), "{e}");
        let mut bad = nic("x");
        bad.mtu = 9;
        let e = ConnInfo::decode(
            &ConnInfo {
                endpoint: vec![],
                node_guid: 0,
                max_notif: 0,
                nics: vec![bad],
            }
            .encode(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mtu"), "{e}");
        // A lane count far beyond the bytes present.
        let mut m = vec![VERSION, ACCEPT];
        m.extend_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(
            Msg::decode(&m),
            Err(DecodeError::Truncated { .. })
        ));
        let mut m = vec![VERSION, ACCEPT];
        m.extend_from_slice(&60000u16.to_le_bytes());
        assert!(matches!(Msg::decode(&m), Err(DecodeError::TooLarge { .. })));
        assert!(Msg::decode(&[VERSION, 77])
            .unwrap_err()
            .to_string()
            .contains("unknown kind 77"));
        // Repeated NIC in region data.
        let rk = RegionKeys {
            addr: 0,
            len: 1,
            rkeys: vec![(1, 1), (1, 2)],
        };
        assert!(RegionKeys::decode(&rk.encode()).is_err());
        // Overflowing region.
        let rk = RegionKeys {
            addr: u64::MAX,
            len: 2,
            rkeys: vec![],
        };
        assert!(RegionKeys::decode(&rk.encode()).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = ConnInfo::decode(&b);
            let _ = RegionKeys::decode(&b);
            let _ = Msg::decode(&b);
        }

        #[test]
        fn mutated_messages_never_panic(i in 0usize..200, x in any::<u8>()) {
            let mut m = Msg::Connect { conn_id: 1, instance_id: 2, lanes: vec![qp(0), qp(1)] }.encode();
            let k = i % m.len();
            m[k] ^= x;
            let _ = Msg::decode(&m);
            let mut c = ConnInfo { endpoint: b"e".to_vec(), node_guid: 1, max_notif: 2, nics: vec![nic("n")] }.encode();
            let k = i % c.len();
            c[k] ^= x;
            let _ = ConnInfo::decode(&c);
        }
    }
}
