//! `TcpConfig`, the `[tcp]` section, and the listen address it names.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use nixl_core::{Error, Result};

use super::auth::Auth;
use super::wire;
use crate::config::de;

/// Settings of the `tcp` backend: the `[tcp]` section of the agent's configuration, keys as the
/// fields except the durations (`io_timeout_ms`, `connect_timeout_ms`, `handshake_timeout_ms`,
/// `idle_timeout_ms`); `auth` comes from `[auth]` and `[tls]` instead.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// Where to listen; `None` is the host's first non-loopback address with a free port.
    #[serde(deserialize_with = "de_listen")]
    pub listen: Option<SocketAddr>,
    /// Connections per peer.
    pub conns_per_peer: usize,
    /// Most bytes per chunk (one frame of a WRITE or READ).
    pub chunk_bytes: usize,
    /// Most unanswered chunks per connection.
    pub window: usize,
    /// How long a connection with work outstanding may move no byte before it is dropped.
    #[serde(rename = "io_timeout_ms", deserialize_with = "de::millis")]
    pub io_timeout: Duration,
    /// How long connecting and authenticating may take (in all, at the initiator).
    #[serde(rename = "connect_timeout_ms", deserialize_with = "de::millis")]
    pub connect_timeout: Duration,
    /// How long a listener gives an accepted connection to finish its whole handshake (TLS, the
    /// proofs, and the OPEN frame); past it the connection is dropped, however the peer trickles.
    #[serde(rename = "handshake_timeout_ms", deserialize_with = "de::millis")]
    pub handshake_timeout: Duration,
    /// Socket send and receive buffer sizes asked of the kernel.
    pub socket_buffer: usize,
    /// How connections authenticate (from `[auth]` and `[tls]`).
    #[serde(skip)]
    pub auth: Auth,
    /// Whether the listener loads metadata that peers push ([`push_metadata`](super::push_metadata));
    /// even then only an agent's own, under the name and instance its connection proved. Off by
    /// default.
    pub accept_pushes: bool,
    /// Most connections the listener serves at once (each is one thread and one fd); more are
    /// closed on accept and counted. Capped at half the process's fd limit when it starts.
    pub max_conns: usize,
    /// Most connections the listener serves at once from one peer address.
    pub max_conns_per_ip: usize,
    /// How long an opened connection may sit between frames before the listener closes it
    /// (initiators reconnect on their next post).
    #[serde(rename = "idle_timeout_ms", deserialize_with = "de::millis")]
    pub idle_timeout: Duration,
    /// Bytes the listener may buffer at once for frame bodies over 64 KiB (metadata pushes,
    /// control requests, large notifications), over all its connections.
    pub frame_memory: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            listen: None,
            conns_per_peer: 2,
            chunk_bytes: 512 << 10,
            window: 4,
            io_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            socket_buffer: 4 << 20,
            auth: Auth::from_config(None, false),
            accept_pushes: false,
            max_conns: 1024,
            max_conns_per_ip: 256,
            idle_timeout: Duration::from_secs(300),
            frame_memory: 256 << 20,
        }
    }
}

/// `listen = "ADDR:PORT"` in `[tcp]`.
fn de_listen<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<SocketAddr>, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    listen_addr(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("tcp listen address {s:?}: {e}")))
}

impl TcpConfig {
    /// Listens on `addr`, unless the configuration named an address.
    pub fn listen_unless_set(&mut self, addr: SocketAddr) -> &mut TcpConfig {
        self.listen.get_or_insert(addr);
        self
    }

    /// Listens on `addr` when it is given, in place of the configuration's address.
    pub fn listen_on(&mut self, addr: Option<SocketAddr>) -> &mut TcpConfig {
        if addr.is_some() {
            self.listen = addr;
        }
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("tcp config: {what}")));
        if !(1..=64).contains(&self.conns_per_peer) {
            return bad(format!(
                "conns_per_peer {} not in 1..=64",
                self.conns_per_peer
            ));
        }
        if self.chunk_bytes < 4096 || self.chunk_bytes as u64 > wire::MAX_CHUNK {
            return bad(format!(
                "chunk_bytes {} not in 4096..={}",
                self.chunk_bytes,
                wire::MAX_CHUNK
            ));
        }
        if !(1..=1024).contains(&self.window) {
            return bad(format!("window {} not in 1..=1024", self.window));
        }
        if self.io_timeout < Duration::from_millis(10)
            || self.connect_timeout < Duration::from_millis(10)
            || self.handshake_timeout < Duration::from_millis(10)
        {
            return bad("timeouts must be at least 10 ms".into());
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return bad("idle_timeout must be at least 100 ms".into());
        }
        if self.max_conns == 0 || self.max_conns_per_ip == 0 {
            return bad("max_conns and max_conns_per_ip must be at least 1".into());
        }
        if self.frame_memory < (1 << 20) {
            return bad(format!("frame_memory {} is under 1 MiB", self.frame_memory));
        }
        if self.auth.tls().files.is_some() && !self.auth.is_shared_secret() {
            return bad("[tls] certificates are used together with [auth] secret, \
                        which proves the agents' names; set one"
                .into());
        }
        if self.auth.has_secret() {
            self.auth.tls().check().map_err(Error::InvalidArgument)?;
        }
        Ok(())
    }
}

/// Parses a listen address `"ADDR:PORT"` (IPv6 as `"[ADDR]:PORT"`); port 0 picks a free one.
pub fn parse_listen(s: &str) -> Result<SocketAddr> {
    listen_addr(s).map_err(|e| Error::InvalidArgument(format!("tcp listen address {s:?}: {e}")))
}

pub(super) fn listen_addr(s: &str) -> std::io::Result<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Ok(a),
        Err(_) => s
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    }
}
