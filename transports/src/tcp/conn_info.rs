//! What a `tcp` listener publishes in its agent's metadata: the addresses it listens at.

use std::net::{IpAddr, SocketAddr};

const CONN_INFO_VERSION: u8 = 1;

pub(super) fn encode_conn_info(addrs: &[SocketAddr]) -> Vec<u8> {
    let mut out = vec![CONN_INFO_VERSION, addrs.len().min(255) as u8];
    for a in addrs.iter().take(255) {
        match a.ip() {
            IpAddr::V4(v4) => {
                out.push(4);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.push(6);
                out.extend_from_slice(&v6.octets());
            }
        }
        out.extend_from_slice(&a.port().to_le_bytes());
    }
    out
}

pub(super) fn decode_conn_info(b: &[u8]) -> std::result::Result<Vec<SocketAddr>, String> {
    let mut r = nixl_core::codec::Reader::new(b);
    let e = |e: nixl_core::DecodeError| format!("bad tcp connection info: {e}");
    let v = r.u8("version").map_err(e)?;
    if v != CONN_INFO_VERSION {
        return Err(format!(
            "tcp connection info version {v}, expected {CONN_INFO_VERSION}"
        ));
    }
    let n = r.u8("count").map_err(e)?;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let ip = match r.u8("family").map_err(e)? {
            4 => IpAddr::from(r.array::<4>("ipv4").map_err(e)?),
            6 => IpAddr::from(r.array::<16>("ipv6").map_err(e)?),
            f => return Err(format!("bad tcp connection info: address family {f}")),
        };
        let port = r.u16("port").map_err(e)?;
        if port == 0 {
            return Err("bad tcp connection info: port 0".into());
        }
        out.push(SocketAddr::new(ip, port));
    }
    if !r.is_empty() {
        return Err("bad tcp connection info: trailing bytes".into());
    }
    if out.is_empty() {
        return Err("the peer's tcp listener has no address".into());
    }
    Ok(out)
}

/// The addresses at which the agent that `md` describes runs its `tcp` listener (empty when it
/// runs none, or its connection info is malformed): where peers fetch its metadata and push
/// theirs, and the port a binding reports as its listen port.
pub fn listen_addrs_in(md: &nixl_core::AgentMetadata) -> Vec<SocketAddr> {
    md.backends
        .iter()
        .find(|b| b.name == nixl_core::BackendName::Tcp)
        .and_then(|b| decode_conn_info(&b.conn_info).ok())
        .unwrap_or_default()
}

/// The connection info a `tcp` listener at `addrs` publishes in its agent's metadata, for tests
/// that forge metadata.
#[doc(hidden)]
pub fn conn_info_for(addrs: &[SocketAddr]) -> Vec<u8> {
    encode_conn_info(addrs)
}
