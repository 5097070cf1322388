//! The `tcp` backend: one-sided READ and WRITE between agents on any hosts.
//!
//! The target agent carries out every request against its own registrations: each piece of a
//! WRITE or READ names a target range and the region key, and the target checks both (and that
//! the region is still registered) before a byte moves. On a plain connection data goes
//! straight between the socket and registered memory with vectored I/O, no staging copy on
//! either side; on a TLS connection (agents with a secret) it is sealed from and opened
//! into registered memory by rustls's record layer, one copy each way (`Link`).
//!
//! An initiator keeps a session per peer: `conns_per_peer` authenticated connections, each with a
//! sender and a receiver thread. A post splits its descriptors into chunks of at most
//! `chunk_bytes` (large descriptors are cut, small ones batched, up to 1000 per frame) and deals
//! them round-robin to the connections' queues; each connection sends its next chunk whenever it
//! has fewer than `window` unanswered, so large transfers are pipelined across all connections
//! (for a READ, the thread that has just read a chunk's DATA asks for the lane's next chunk
//! itself, a small frame, so the target is kept serving without waking the sender thread). A
//! request of one chunk of at most 64 KiB is written by the posting thread itself when a
//! connection is idle, which saves a thread hand-off (about half the latency of a small
//! request). A notification is sent once every chunk is acknowledged, so the
//! target sees it only after all the data landed.
//!
//! Faults: a connection closed under a request ends it `Failed(remote disconnect)`; a
//! connection that moves no byte for `io_timeout` while work is outstanding (a cut link, a
//! frozen peer) is dropped and its requests end `TimedOut`; either way the memory of a request
//! stays held until no thread touches it any more. The next post reconnects, and refuses a peer
//! that restarted (a new instance id) until its new metadata is loaded.
//!
//! A post that ends early (cancelled, past its deadline) lets go of its memory at once: no
//! further chunk is sent, a READ's DATA still on its way is read off the stream and thrown
//! away (a chunk being read stops after the current socket read), and its completion (the
//! core's hold on the local regions) is dropped as soon as no lane thread is inside that memory,
//! without waiting for the target's remaining answers, which a slow link can take seconds to
//! bring. The target cannot be stopped mid-chunk, but what it still serves of a READ comes from
//! its own memory: it knows when it stopped, and answers [`nixl_core::Backend::peer_idle`]
//! exactly (a data connection counts as idle only while its thread waits for a frame with
//! nothing unread on the socket), so the owner of that memory (a KV handoff's prefill side) frees
//! it only once every READ the peer had asked for was carried out. Notifications nobody waits
//! for ([`nixl_core::Agent::post_notif`]) return once queued, not after their acknowledgement,
//! which travels behind whatever DATA the peer still has queued on that connection.
//! A standalone notification (sent or posted) is written only once every frame that any
//! connection of the session had written, or was writing, when it was submitted has been
//! answered: so when the peer reads "I stopped reading your blocks", no READ asked before it
//! is still served, on any connection (a barrier across connections, which TCP does not order).
//!
//! A lying target cannot make the initiator write where or when it should not: each lane's
//! answers must match, in order, what that lane asked (DATA of exactly the chunk's length for a
//! READ chunk, ACK for the rest); an unknown, duplicate, late, oversized or wrong-kind answer is
//! a protocol error that fails the session before a byte of it lands, and a post ends (releasing
//! its memory) only once no lane thread reads into or writes from it any more.
//!
//! Every connection authenticates first, within a deadline (see [`Auth`]: by default with this
//! user's per-host secret file, so that only this user's agents on this host get in). With a
//! secret (that one or a shared one) the connection is TLS 1.3, and inside it each side proves
//! the secret bound to the TLS channel and to both agents' names and instance ids, so a relayed
//! handshake fails and every later byte is protected ([`PeerIdentity`]): notifications, pushed
//! metadata and control requests are attributed to the proven name only, and the initiator
//! checks that the listener is the agent its metadata names. The listener also serves the agent's metadata to peers that
//! fetch it ([`fetch_metadata`]) and, only with `accept_pushes`, loads metadata that an agent
//! pushes about itself ([`push_metadata`]), or drops it at that agent's request
//! ([`invalidate_metadata`]).
//!
//! What a peer can make the listener hold is bounded: one thread and one fd per connection,
//! at most `max_conns` connections (and at most half the process's fd limit), `max_conns_per_ip`
//! of them from one address, more closed on accept and counted (`nixl_tcp_conns_refused_total`);
//! a connection must finish its handshake within `handshake_timeout` and send OPEN within
//! `connect_timeout` of authenticating (and within that deadline), and is closed after
//! `idle_timeout` without a frame (`nixl_tcp_idle_closed_total`; initiators reconnect on their
//! next post); each connection takes only the frames of its purpose, each within its own size
//! limit checked from the header before the body is read (a data connection: WRITE and READ of
//! at most 1000 pieces, NOTIF; never a metadata push or a control request); bodies over 64 KiB
//! share one `frame_memory` budget (`nixl_tcp_frame_memory_refused_total`). Notifications go
//! into the agent's queue within its byte budget; one past it is answered `Denied` with the
//! reason, which the sender's `send_notif` or post returns.

mod auth;
mod client;
mod client_plan;
mod client_post;
mod client_session;
mod client_setup;
mod identity;
#[cfg(test)]
mod limits_tests;
mod link;
mod net;
mod server;
mod server_conn;
mod server_control;
mod server_worker;
mod tls;
mod user_secret;
pub(crate) mod wire;

use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nixl_core::{
    Backend, BackendName, Caps, Connection, Desc, Error, Locality, MemKind, PeerInfo, Registered,
    Result, TargetHandle, Unusable,
};
use parking_lot::Mutex;

pub use auth::{Auth, CertFiles, PeerIdentity, TlsMode, TlsSettings};
pub(crate) use link::Link;

use client::Conn;
use server::Server;

use crate::control::{ControlChannel, ControlService, Services};

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
    #[serde(
        rename = "io_timeout_ms",
        deserialize_with = "crate::config::de::millis"
    )]
    pub io_timeout: Duration,
    /// How long connecting and authenticating may take (in all, at the initiator).
    #[serde(
        rename = "connect_timeout_ms",
        deserialize_with = "crate::config::de::millis"
    )]
    pub connect_timeout: Duration,
    /// How long a listener gives an accepted connection to finish its whole handshake (TLS, the
    /// proofs, and the OPEN frame); past it the connection is dropped, however the peer trickles.
    #[serde(
        rename = "handshake_timeout_ms",
        deserialize_with = "crate::config::de::millis"
    )]
    pub handshake_timeout: Duration,
    /// Socket send and receive buffer sizes asked of the kernel.
    pub socket_buffer: usize,
    /// How connections authenticate (from `[auth]` and `[tls]`).
    #[serde(skip)]
    pub auth: Auth,
    /// Whether the listener loads metadata that peers push ([`push_metadata`]); even then only
    /// an agent's own, under the name and instance its connection proved. Off by default.
    pub accept_pushes: bool,
    /// Most connections the listener serves at once (each is one thread and one fd); more are
    /// closed on accept and counted. Capped at half the process's fd limit when it starts.
    pub max_conns: usize,
    /// Most connections the listener serves at once from one peer address.
    pub max_conns_per_ip: usize,
    /// How long an opened connection may sit between frames before the listener closes it
    /// (initiators reconnect on their next post).
    #[serde(
        rename = "idle_timeout_ms",
        deserialize_with = "crate::config::de::millis"
    )]
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

fn listen_addr(s: &str) -> std::io::Result<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Ok(a),
        Err(_) => s
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    }
}

/// The `tcp` backend.
#[derive(Debug)]
pub struct TcpBackend {
    cfg: Arc<TcpConfig>,
    server: Mutex<Option<Server>>,
    conns: Arc<Mutex<Vec<Weak<Conn>>>>,
    shut: Arc<AtomicBool>,
    me: Mutex<Option<(Arc<str>, u128)>>,
    control: Arc<TcpControl>,
    /// The backend's own control service (held here; the channel holds it weakly).
    _ping: Arc<Ping>,
}

/// The request the `tcp` backend answers itself on the control channel, with [`PONG`]: a health
/// check of a peer (the daemon's canary) that proves the peer's listener is up, holds the secret
/// and answers, without touching its memory. See [`TcpControl::ping`].
pub const PING: &[u8] = b"ping";
/// The answer to [`PING`].
pub const PONG: &[u8] = b"pong";

/// Answers [`PING`] with [`PONG`]; refuses anything else.
#[derive(Debug)]
struct Ping;

impl ControlService for Ping {
    fn handle(&self, _peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        if req == PING {
            Ok(PONG.to_vec())
        } else {
            Err(format!(
                "unknown tcp control request of {} bytes (the tcp backend answers only \"ping\")",
                req.len()
            ))
        }
    }
}

impl TcpControl {
    /// One authenticated round trip to the listener at `endpoint` (a peer's `tcp` connection
    /// info), as this agent `from`, within `timeout`: `Ok` once it answered [`PONG`]. It opens a
    /// connection of its own (handshake included), so it also checks that the peer accepts new
    /// connections.
    pub fn ping(&self, endpoint: &[u8], from: &str, timeout: Duration) -> Result<()> {
        let reply = self.call(endpoint, from, BackendName::Tcp, PING, timeout)?;
        if reply == PONG {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: BackendName::Tcp,
                op: "ping",
                reason: format!("answered {} bytes, not \"pong\"", reply.len()),
            })
        }
    }
}

/// The agent's control channel ([`crate::control`]) over its `tcp` listener: requests travel on
/// their own authenticated connections, so a slow service never stalls data.
#[derive(Debug)]
pub struct TcpControl {
    cfg: Arc<TcpConfig>,
    services: Arc<Services>,
    published: Mutex<Vec<SocketAddr>>,
    /// This agent, as its calls name it (set when the backend starts).
    me: Mutex<Option<PeerIdentity>>,
}

impl ControlChannel for TcpControl {
    fn endpoint(&self) -> Vec<u8> {
        let p = self.published.lock();
        if p.is_empty() {
            Vec::new()
        } else {
            encode_conn_info(&p)
        }
    }

    fn serve(&self, backend: BackendName, svc: Weak<dyn ControlService>) {
        self.services.insert(backend, svc);
    }

    fn call(
        &self,
        endpoint: &[u8],
        from: &str,
        backend: BackendName,
        req: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        if req.len() > crate::control::MAX_CONTROL {
            return Err(Error::InvalidArgument(format!(
                "control request of {} bytes exceeds {}",
                req.len(),
                crate::control::MAX_CONTROL
            )));
        }
        let addrs = decode_conn_info(endpoint).map_err(|reason| Error::Backend {
            backend,
            op: "control endpoint",
            reason,
        })?;
        // Calls go out as this agent, under the name its connections prove.
        let me = self
            .me
            .lock()
            .clone()
            .ok_or_else(|| Error::InvalidArgument("tcp backend not started".into()))?;
        if from != me.name {
            return Err(Error::InvalidArgument(format!(
                "a control call from '{from}' through the tcp listener of agent '{}'",
                me.name
            )));
        }
        let mut last = None;
        for a in addrs {
            match client_setup::control_call(a, &self.cfg.auth, timeout, &me, backend, req) {
                Ok(r) => return Ok(r),
                // A refusal or a bad answer came from the agent itself: another address of it
                // would answer the same.
                Err(e @ (Error::Denied { .. } | Error::Backend { .. })) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::InvalidArgument("empty control endpoint".into())))
    }
}
impl TcpBackend {
    /// A backend with these settings (it listens once its agent starts it).
    pub fn new(cfg: TcpConfig) -> TcpBackend {
        let cfg = Arc::new(cfg);
        let ping = Arc::new(Ping);
        let services = Arc::<Services>::default();
        services.insert(
            BackendName::Tcp,
            Arc::downgrade(&ping) as Weak<dyn ControlService>,
        );
        TcpBackend {
            cfg: Arc::clone(&cfg),
            server: Mutex::new(None),
            conns: Arc::default(),
            shut: Arc::new(AtomicBool::new(false)),
            me: Mutex::new(None),
            _ping: ping,
            control: Arc::new(TcpControl {
                cfg: Arc::clone(&cfg),
                services,
                published: Mutex::new(Vec::new()),
                me: Mutex::new(None),
            }),
        }
    }

    /// The agent's control channel through this listener, for backends that must talk to a
    /// peer before moving bytes (`rdma` queue pairs).
    pub fn control(&self) -> Arc<TcpControl> {
        Arc::clone(&self.control)
    }

    /// The addresses peers reach this agent at (empty before the agent starts it).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.server
            .lock()
            .as_ref()
            .map(|s| s.published.clone())
            .unwrap_or_default()
    }
}

const DRAM: &[MemKind] = &[MemKind::Dram];
const CONN_INFO_VERSION: u8 = 1;

fn encode_conn_info(addrs: &[SocketAddr]) -> Vec<u8> {
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

fn decode_conn_info(b: &[u8]) -> std::result::Result<Vec<SocketAddr>, String> {
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

impl Backend for TcpBackend {
    fn name(&self) -> BackendName {
        BackendName::Tcp
    }

    fn caps(&self) -> Caps {
        Caps::new(DRAM, Locality::AnyNode, 8)
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        self.cfg.check().map_err(Unusable::from_error)?;
        // Reads (or creates) the per-user secret file now: a missing or unsafe one makes the
        // backend unavailable with the reason, rather than failing every connection.
        self.cfg
            .auth
            .ready()
            .map_err(|e| Unusable::Reason(format!("tcp auth: {e}")))
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        self.cfg.check()?;
        self.cfg
            .auth
            .ready()
            .map_err(|e| Error::InvalidArgument(format!("tcp auth: {e}")))?;
        *self.me.lock() = Some((target.name_arc(), target.instance_id()));
        *self.control.me.lock() = Some(PeerIdentity::new(target.name(), target.instance_id()));
        let server = Server::start(
            Arc::clone(&self.cfg),
            target,
            Arc::clone(&self.control.services),
        )?;
        self.control.published.lock().clone_from(&server.published);
        *self.server.lock() = Some(server);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        encode_conn_info(&self.listen_addrs())
    }

    fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
        // The target checks ranges and keys itself; peers need nothing more than the key.
        Ok(Vec::new())
    }

    fn deregister(&self, _region: Registered<'_>) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        decode_conn_info(conn_info)
            .map(|_| ())
            .map_err(Unusable::Reason)
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        let addrs = decode_conn_info(peer.conn_info).map_err(|reason| Error::Backend {
            backend: BackendName::Tcp,
            op: "connect",
            reason,
        })?;
        let (me, my_instance) = self
            .me
            .lock()
            .clone()
            .ok_or_else(|| Error::InvalidArgument("tcp backend not started".into()))?;
        let conn = Conn::new(
            Arc::clone(&self.cfg),
            me,
            my_instance,
            peer.name.to_owned(),
            peer.instance_id,
            addrs,
            Arc::clone(&self.shut),
        );
        conn.warm_up()?;
        let mut conns = self.conns.lock();
        conns.retain(|c| c.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn peer_idle(&self, peer: &str) -> bool {
        self.server
            .lock()
            .as_ref()
            .is_none_or(|s| s.peer_idle(peer))
    }

    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for c in self.conns.lock().drain(..) {
            if let Some(c) = c.upgrade() {
                c.fail(Error::Cancelled);
            }
        }
        if let Some(s) = self.server.lock().take() {
            s.stop();
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Fetches an agent's metadata from its `tcp` listener (authenticating with `auth`, as an
/// anonymous caller): only metadata of the agent the listener proves to be is returned.
pub fn fetch_metadata(addr: &str, auth: &Auth, timeout: Duration) -> Result<Vec<u8>> {
    let addr = parse_listen(addr)?;
    client_setup::metadata_call(
        addr,
        auth,
        timeout,
        &PeerIdentity::anonymous(),
        client_setup::MdRequest::Get,
    )
}

/// Pushes this agent's metadata to a peer's `tcp` listener, which loads it if it accepts pushes
/// (`accept_pushes`); returns the peer's answer (the name it loaded it as). The connection names
/// itself as the agent the metadata describes: a listener loads only an agent's own metadata.
pub fn push_metadata(addr: &str, auth: &Auth, md: &[u8], timeout: Duration) -> Result<String> {
    let d = nixl_core::AgentMetadata::decode(md)
        .map_err(|e| Error::InvalidArgument(format!("push metadata: not valid metadata: {e}")))?;
    push_metadata_as(
        addr,
        auth,
        &PeerIdentity::new(d.name, d.instance_id),
        md,
        timeout,
    )
}

/// [`push_metadata`] over a connection that names itself `me`, whatever `md` says: for tests of
/// the listener's rule that an agent pushes only its own metadata.
#[doc(hidden)]
pub fn push_metadata_as(
    addr: &str,
    auth: &Auth,
    me: &PeerIdentity,
    md: &[u8],
    timeout: Duration,
) -> Result<String> {
    let addr = parse_listen(addr)?;
    client_setup::metadata_call(addr, auth, timeout, me, client_setup::MdRequest::Push(md))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Asks a peer's `tcp` listener to drop the metadata it loaded of this agent, `me` (its name and
/// instance id), as [`nixl_core::Agent::invalidate_remote`] would there: the peer's later
/// requests to this agent fail. The listener acts only on the name and instance the connection
/// proved, and only if it accepts pushes (`accept_pushes`); it refuses (`Denied`) to drop
/// metadata of another instance of `me`. Returns whether it had this agent's metadata loaded.
pub fn invalidate_metadata(
    addr: &str,
    auth: &Auth,
    me: &PeerIdentity,
    timeout: Duration,
) -> Result<bool> {
    let addr = parse_listen(addr)?;
    let answer =
        client_setup::metadata_call(addr, auth, timeout, me, client_setup::MdRequest::Drop)?;
    match answer.as_slice() {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(Error::RemoteDisconnect {
            peer: addr.to_string(),
            reason: format!("invalidate metadata: an answer of {} bytes", answer.len()),
        }),
    }
}

/// An authenticated data connection to a listener, as an initiator named `name` opens it, for
/// tests that speak the wire protocol by hand (garbage after authentication, say).
#[doc(hidden)]
pub fn raw_data_connection(addr: SocketAddr, auth: &Auth, name: &str) -> Result<RawConnection> {
    let io = |e: std::io::Error| Error::io(format!("raw connection to {addr}"), e);
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(io)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let me = PeerIdentity::new(name, 1);
    let (s, o) = client_setup::open_stream(
        s,
        auth,
        wire::Purpose::Data,
        &me,
        ("", 0),
        deadline,
        &addr.to_string(),
    )?;
    if o.status != wire::Status::Ok {
        return Err(Error::InvalidArgument(format!("refused: {}", o.text)));
    }
    s.set_deadline(None);
    s.socket()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(io)?;
    Ok(RawConnection(s))
}

/// The listener's side of a connection's opening, for tests that play a target by hand (a
/// target that lies in its answers, say): the real handshake (TLS and the proofs with a secret),
/// then the OPEN (which must name the proven initiator), answered by an OPENED naming this side
/// `me`. Returns the initiator's identity, whether it opened the connection for data (1),
/// metadata (2) or control (3), and the connection to speak frames on.
#[doc(hidden)]
pub fn raw_listener_opening(
    s: TcpStream,
    auth: &Auth,
    me: &PeerIdentity,
) -> Result<(PeerIdentity, u8, RawConnection)> {
    let peer = s
        .peer_addr()
        .map_err(|e| Error::io("raw listener: peer address", e))?;
    let io = |e: std::io::Error| Error::io(format!("raw listener: {peer}"), e);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (s, proven) = auth::accept(
        s,
        auth,
        peer,
        |ip| ip.is_loopback(),
        (&me.name, me.instance),
        deadline,
    )
    .map_err(|e| Error::Denied {
        peer: peer.to_string(),
        reason: e.to_string(),
    })?;
    let mut body = Vec::new();
    let mut give_up = |_: bool| Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
    let ty = net::read_frame(&s, &mut body, wire::frame_limit, &mut give_up).map_err(io)?;
    if ty != wire::OPEN {
        return Err(Error::InvalidArgument(format!("expected OPEN, got {ty}")));
    }
    let open = wire::decode_open(&body).map_err(|e| io(wire::bad(e)))?;
    let who = PeerIdentity::new(open.name, open.instance);
    if proven.is_some_and(|p| p != who) {
        return Err(Error::Denied {
            peer: peer.to_string(),
            reason: "the OPEN frame names another agent than the handshake proved".into(),
        });
    }
    let mut out = Vec::new();
    wire::opened(&mut out, wire::Status::Ok, me.instance, &me.name);
    net::send_all(&s, &out).map_err(io)?;
    s.set_deadline(None);
    s.socket().set_read_timeout(None).map_err(io)?;
    s.socket().set_write_timeout(None).map_err(io)?;
    Ok((who, open.purpose as u8 + 1, RawConnection(s)))
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

/// A connection past the handshake, for tests that write frames by hand.
#[doc(hidden)]
#[derive(Debug)]
pub struct RawConnection(Link);

impl RawConnection {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.socket().set_read_timeout(t)
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.0.shutdown(how)
    }
}

impl std::io::Read for RawConnection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for RawConnection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send_all(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A socket error as a request outcome: a path that stopped carrying packets (the kernel's
/// retransmission timeout, an unreachable network) is `TimedOut`; the peer closing or
/// resetting is a remote disconnect.
fn peer_err(peer: &str, e: &std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock | K::NetworkUnreachable | K::HostUnreachable => {
            tracing::warn!(peer, error = %e, "tcp: no path to the peer");
            Error::TimedOut
        }
        _ => Error::RemoteDisconnect {
            peer: peer.to_owned(),
            reason: e.to_string(),
        },
    }
}

fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => {
                last = Some(std::io::Error::new(
                    e.kind(),
                    format!("connect to {a}: {e}"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address to connect to")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_info_round_trips_and_garbage_is_refused() {
        let addrs: Vec<SocketAddr> = vec![
            "10.1.2.3:4000".parse().unwrap(),
            "[fd00::2]:5000".parse().unwrap(),
        ];
        assert_eq!(decode_conn_info(&encode_conn_info(&addrs)).unwrap(), addrs);
        assert!(decode_conn_info(&encode_conn_info(&[])).is_err());
        assert!(decode_conn_info(&[]).is_err());
        assert!(decode_conn_info(&[1, 1, 4, 1, 2, 3, 4, 0, 0]).is_err());
        assert!(decode_conn_info(&[1, 1, 9]).is_err());
        assert!(decode_conn_info(&[2, 0]).is_err());
        let mut long = encode_conn_info(&addrs);
        long.push(0);
        assert!(decode_conn_info(&long).is_err());
    }

    #[test]
    fn listen_addrs_are_read_from_metadata() {
        let addrs: Vec<SocketAddr> = vec!["10.1.2.3:4000".parse().unwrap()];
        let mut md = nixl_core::AgentMetadata {
            name: "a".into(),
            instance_id: 1,
            generation: 1,
            partial: false,
            backends: vec![nixl_core::metadata::BackendInfo {
                name: nixl_core::BackendName::Tcp,
                conn_info: encode_conn_info(&addrs),
            }],
            regions: Vec::new(),
        };
        assert_eq!(listen_addrs_in(&md), addrs);
        md.backends[0].conn_info = vec![9];
        assert!(listen_addrs_in(&md).is_empty());
        md.backends.clear();
        assert!(listen_addrs_in(&md).is_empty());
    }

    #[test]
    fn config_limits() {
        assert!(TcpConfig::default().check().is_ok());
        for c in [
            TcpConfig {
                conns_per_peer: 0,
                ..TcpConfig::default()
            },
            TcpConfig {
                chunk_bytes: 10,
                ..TcpConfig::default()
            },
            TcpConfig {
                window: 0,
                ..TcpConfig::default()
            },
        ] {
            assert!(c.check().is_err());
        }
        assert_eq!(
            parse_listen("[::1]:0").unwrap(),
            "[::1]:0".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("nonsense").is_err());
    }
}
