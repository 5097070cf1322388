//! Connection authentication: the handshake before any framed byte.
//!
//! Both sides first exchange a plaintext hello (magic, protocol version, whether they hold a
//! shared secret), and the listener answers with a verdict: a listener with a secret refuses an
//! initiator without one, and a listener without a secret accepts only connections from its own
//! host unless it is configured open. Without a secret the connection then stays plain.
//!
//! With a shared secret the rest of the connection is TLS 1.3 ([`super::tls`]), and inside it
//! each side proves the secret, bound to the channel and to both agents' identities:
//!
//! - the initiator sends its name and instance id, the name and instance id it expects to reach
//!   (empty and 0 when it does not know them: a metadata fetch by address), and
//!   `HMAC-SHA256(secret, "nixl-tcp v2 initiator" | E | initiator id | expected id)`;
//! - the listener checks it, refuses an initiator that expects another agent, and answers with
//!   its own name and instance id and `HMAC(secret, "nixl-tcp v2 listener" | E | listener id |
//!   initiator id)`; the initiator checks that proof and that the name is the one it expected.
//!
//! `E` is the TLS exporter value of the connection (RFC 8446 §7.5, label
//! `EXPORTER-nixl-tcp-auth-v2`), and identities are length-prefixed, so no two different inputs
//! give the same MAC input.
//!
//! Why a relay fails (channel binding). A stranger R without the secret, whom an agent A
//! connects to believing it is B (a poisoned discovery entry, a pushed address), can do one of
//! two things with A's handshake:
//! - forward the bytes unchanged to B: then A and B run TLS with each other through R; R sees
//!   only ciphertext, and any byte it changes or injects fails the record's AEAD tag, which ends
//!   the connection. R holds no key of the session, so it gets nothing usable.
//! - terminate TLS itself, once towards A and once towards B, and pass the proofs across: the
//!   two TLS sessions have different exporter values, since each TLS 1.3 exporter is derived
//!   from its own handshake's (EC)DHE secret and transcript, and R is a party to both and cannot
//!   make them equal (that would need the same transcript, including A's and B's fresh key
//!   shares, on both sides, and then R would not know the shared secret). A's proof is over
//!   `E(A,R)`, B checks it against `E(R,B)` and refuses; B's proof (had R got one) would be over
//!   `E(R,B)` and A would refuse it. Making a proof for the right exporter needs the secret.
//!
//! Replays fail the same way (every connection has a fresh exporter), a proof cannot be
//! reflected (the two roles use different labels), and a listener proof names both agents, so
//! an agent that holds the secret but is not the one the initiator expected (an address that
//! now belongs to another agent of the fleet) is refused instead of served. The plaintext hello
//! cannot downgrade anything: a side with a secret insists on TLS and the proof whatever the
//! other side's hello says; the flags only make mismatches clear errors. Every byte after the
//! handshake is inside TLS records, so an on-path attacker can neither read nor change nor
//! inject frames. What the shared secret cannot give: anyone holding it can claim any agent
//! name (with `[tls]` certificates, only holders of CA-issued keys can be endpoints at all); and
//! whoever takes part in a handshake sees a MAC under the secret over known inputs, so a
//! low-entropy secret (a password) can be guessed offline: use a random one (32 bytes).
//!
//! The whole handshake (TLS, proofs, and the OPEN/OPENED frames that follow) must finish before
//! a deadline, checked at every read, so a peer that trickles bytes cannot keep it open.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::link::Link;
pub use super::tls::{CertFiles, TlsMode, TlsSettings};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: [u8; 4] = *b"NXTP";
const VERSION: u16 = 2;
const MAC: usize = 32;
/// Hello: magic, version, flags.
const HELLO_LEN: usize = 4 + 2 + 2;
const FLAG_SECRET: u16 = 1;
/// Longest agent name or refusal text in the handshake.
const MAX_TEXT: usize = 1024;

/// An agent's identity, as a handshake proved it (with a shared secret): its name and the
/// instance id of this incarnation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub instance: u128,
}

/// How a connection authenticates.
#[derive(Clone, Default)]
pub struct Auth {
    secret: Option<Vec<u8>>,
    allow_open: bool,
    tls: TlsSettings,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("allow_open", &self.allow_open)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Auth {
    /// A shared secret (an empty one counts as none).
    pub fn with_secret(secret: impl Into<Vec<u8>>) -> Auth {
        let secret = secret.into();
        Auth {
            secret: (!secret.is_empty()).then_some(secret),
            ..Auth::default()
        }
    }

    /// No secret: accept connections from this host only.
    pub fn host_only() -> Auth {
        Auth::default()
    }

    /// No secret and connections from anywhere (logged as a warning when a listener starts).
    pub fn open() -> Auth {
        Auth {
            allow_open: true,
            ..Auth::default()
        }
    }

    /// The secret from `secret`, or else from the environment variable `NIXL_SECRET`.
    pub fn from_config(secret: Option<&str>, allow_open: bool) -> Auth {
        let secret = secret
            .map(str::to_owned)
            .or_else(|| std::env::var("NIXL_SECRET").ok())
            .filter(|s| !s.is_empty());
        Auth {
            secret: secret.map(String::into_bytes),
            allow_open,
            ..Auth::default()
        }
    }

    /// Whether a secret is set.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// Whether connections from other hosts are accepted without a secret.
    pub fn allow_open(&self) -> bool {
        self.allow_open
    }

    /// The same, with these TLS settings (used when a secret is set).
    pub fn with_tls(mut self, tls: TlsSettings) -> Auth {
        self.tls = tls;
        self
    }

    /// The TLS settings.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    fn proof(
        &self,
        label: &[u8],
        exporter: &[u8],
        a: (&str, u128),
        b: (&str, u128),
    ) -> Option<HmacSha256> {
        let secret = self.secret.as_ref()?;
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
        m.update(label);
        m.update(exporter);
        for (name, instance) in [a, b] {
            m.update(&(name.len() as u64).to_le_bytes());
            m.update(name.as_bytes());
            m.update(&instance.to_le_bytes());
        }
        Some(m)
    }
}

const CLIENT_LABEL: &[u8] = b"nixl-tcp v2 initiator";
const SERVER_LABEL: &[u8] = b"nixl-tcp v2 listener";

/// Why a handshake failed.
#[derive(Debug)]
pub enum AuthError {
    /// The other side is not a nixl-rs agent, or the bytes were cut short.
    Protocol(String),
    /// Authentication failed; the text says why.
    Denied(String),
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Protocol(s) => write!(f, "handshake: {s}"),
            AuthError::Denied(s) => write!(f, "authentication failed: {s}"),
            AuthError::Io(e) => write!(f, "handshake: {e}"),
        }
    }
}

impl From<io::Error> for AuthError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                AuthError::Protocol("connection closed during the handshake".into())
            }
            io::ErrorKind::InvalidData => AuthError::Protocol(e.to_string()),
            _ => AuthError::Io(e),
        }
    }
}

/// The socket under a handshake: every read and write is bounded by the deadline.
struct Timed<'a> {
    s: &'a TcpStream,
    deadline: Instant,
}

impl Timed<'_> {
    fn left(&self) -> io::Result<std::time::Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(late())
        } else {
            Ok(left)
        }
    }
}

fn late() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the handshake did not finish within its deadline",
    )
}

fn timed_out(e: io::Error) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        late()
    } else {
        e
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.s.set_read_timeout(Some(self.left()?))?;
        let mut s = self.s;
        s.read(buf).map_err(timed_out)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.set_write_timeout(Some(self.left()?))?;
        // SAFETY: `buf` is a live byte slice for the call; MSG_NOSIGNAL: a closed peer is an
        // error, not a SIGPIPE.
        let r = unsafe {
            libc::send(
                self.s.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            Err(timed_out(io::Error::last_os_error()))
        } else {
            Ok(r as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hello(auth: &Auth) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let flags = if auth.has_secret() { FLAG_SECRET } else { 0 };
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h
}

/// Checks a hello; returns whether the other side holds a secret.
fn read_hello(r: &mut impl Read, what: &str) -> Result<bool, AuthError> {
    let mut h = [0u8; HELLO_LEN];
    r.read_exact(&mut h)?;
    if h[..4] != MAGIC {
        return Err(AuthError::Protocol(format!(
            "{what} is not a nixl-rs tcp agent"
        )));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(AuthError::Protocol(format!(
            "{what} speaks protocol version {version}, this agent {VERSION}"
        )));
    }
    Ok(u16::from_le_bytes([h[6], h[7]]) & FLAG_SECRET != 0)
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_TEXT)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn get_text(r: &mut impl Read) -> Result<String, AuthError> {
    let mut n = [0u8; 2];
    r.read_exact(&mut n)?;
    let n = usize::from(u16::from_le_bytes(n));
    if n > MAX_TEXT {
        return Err(AuthError::Protocol(format!(
            "text of {n} bytes in the handshake"
        )));
    }
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    String::from_utf8(b)
        .map_err(|_| AuthError::Protocol("text in the handshake is not UTF-8".into()))
}

fn put_id(out: &mut Vec<u8>, (name, instance): (&str, u128)) {
    put_text(out, name);
    out.extend_from_slice(&instance.to_le_bytes());
}

fn get_id(r: &mut impl Read) -> Result<PeerIdentity, AuthError> {
    let name = get_text(r)?;
    let mut i = [0u8; 16];
    r.read_exact(&mut i)?;
    Ok(PeerIdentity {
        name,
        instance: u128::from_le_bytes(i),
    })
}

fn exporter<D>(c: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], AuthError> {
    c.export_keying_material([0u8; 32], super::tls::EXPORTER_LABEL, None)
        .map_err(|e| AuthError::Protocol(format!("tls exporter: {e}")))
}

fn tls_err(e: io::Error) -> AuthError {
    if e.kind() == io::ErrorKind::InvalidData {
        AuthError::Denied(format!("tls: {e}"))
    } else {
        AuthError::from(e)
    }
}

/// Plaintext verdict of the listener on the hellos: 0 = go on, else refused with a reason.
fn plain_verdict(w: &mut impl Write, refusal: Option<&str>) -> io::Result<()> {
    let mut v = Vec::with_capacity(3);
    match refusal {
        None => v.push(0),
        Some(why) => {
            v.push(1);
            put_text(&mut v, why);
        }
    }
    w.write_all(&v)
}

/// The listener's side, as the agent `me`. `peer` is the connecting address, `local` tells
/// whether an address is one of this host's. Returns the link (with the deadline still set: the
/// caller reads OPEN under it, then clears it) and, with a secret, the initiator's proven
/// identity.
pub(super) fn accept(
    s: TcpStream,
    auth: &Auth,
    peer: SocketAddr,
    local: impl Fn(IpAddr) -> bool,
    me: (&str, u128),
    deadline: Instant,
) -> Result<(Link, Option<PeerIdentity>), AuthError> {
    let mut io = Timed { s: &s, deadline };
    io.write_all(&hello(auth))?;
    let theirs = read_hello(&mut io, "the initiator")?;
    let refusal = if auth.has_secret() && !theirs {
        Some("this agent requires the shared secret; the initiator has none".to_owned())
    } else if !auth.has_secret() && theirs {
        Some("this agent has no shared secret; set the same one on both agents".to_owned())
    } else if !auth.has_secret() && !auth.allow_open && !local(peer.ip()) {
        Some(format!(
            "no shared secret is configured, so only connections from this host are accepted \
             ({} is not one of its addresses)",
            peer.ip()
        ))
    } else {
        None
    };
    plain_verdict(&mut io, refusal.as_deref())?;
    if let Some(why) = refusal {
        return Err(AuthError::Denied(why));
    }
    if !auth.has_secret() {
        let link = Link::plain(s);
        link.set_deadline(Some(deadline));
        return Ok((link, None));
    }

    let cfg = auth.tls.configs().map_err(AuthError::Protocol)?;
    let mut conn = rustls::ServerConnection::new(cfg.server)
        .map_err(|e| AuthError::Protocol(format!("tls: {e}")))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(tls_err)?;
    }
    let e = exporter(&*conn)?;
    let mut st = rustls::Stream::new(&mut conn, &mut io);
    let them = get_id(&mut st)?;
    let expect = get_id(&mut st)?;
    let mut tag = [0u8; MAC];
    st.read_exact(&mut tag)?;
    let ok = auth
        .proof(
            CLIENT_LABEL,
            &e,
            (&them.name, them.instance),
            (&expect.name, expect.instance),
        )
        .is_some_and(|m| m.verify_slice(&tag).is_ok());
    let refusal = if !ok {
        Some("wrong shared secret, or a handshake relayed from another connection".to_owned())
    } else if !expect.name.is_empty() && expect.name != me.0 {
        Some(format!(
            "this is agent {:?}, not {:?} (its address changed hands: load its metadata again)",
            me.0, expect.name
        ))
    } else {
        None
    };
    let mut v = Vec::with_capacity(64);
    match &refusal {
        Some(why) => {
            v.push(1);
            put_text(&mut v, why);
        }
        None => {
            v.push(0);
            put_id(&mut v, me);
            let m = auth
                .proof(SERVER_LABEL, &e, me, (&them.name, them.instance))
                .expect("a secret is set");
            v.extend_from_slice(&m.finalize().into_bytes());
        }
    }
    st.write_all(&v)?;
    st.flush()?;
    while conn.wants_write() {
        conn.write_tls(&mut io)?;
    }
    if let Some(why) = refusal {
        return Err(AuthError::Denied(why));
    }
    let link = Link::tls(s, rustls::Connection::Server(conn));
    link.set_deadline(Some(deadline));
    Ok((link, Some(them)))
}

/// The initiator's side, as the agent `me` (name "" and instance 0 for a one-off call without
/// an agent), expecting to reach `expect` ("" and 0: whoever listens). Returns the link (with
/// the deadline still set: the caller reads OPENED under it, then clears it) and, with a
/// secret, the listener's proven identity.
pub(super) fn connect(
    s: TcpStream,
    auth: &Auth,
    me: (&str, u128),
    expect: (&str, u128),
    deadline: Instant,
) -> Result<(Link, Option<PeerIdentity>), AuthError> {
    let mut io = Timed { s: &s, deadline };
    let theirs = read_hello(&mut io, "the listener")?;
    io.write_all(&hello(auth))?;
    let mut status = [0u8; 1];
    io.read_exact(&mut status)?;
    if status[0] != 0 {
        let why = get_text(&mut io)?;
        return Err(AuthError::Denied(format!("refused by the listener: {why}")));
    }
    if !auth.has_secret() {
        let link = Link::plain(s);
        link.set_deadline(Some(deadline));
        return Ok((link, None));
    }
    if !theirs {
        return Err(AuthError::Denied(
            "the listener has no shared secret, so it cannot prove who it is".into(),
        ));
    }

    let cfg = auth.tls.configs().map_err(AuthError::Protocol)?;
    let mut conn = rustls::ClientConnection::new(cfg.client, super::tls::server_name())
        .map_err(|e| AuthError::Protocol(format!("tls: {e}")))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(tls_err)?;
    }
    let e = exporter(&*conn)?;
    let mut st = rustls::Stream::new(&mut conn, &mut io);
    let mut v = Vec::with_capacity(128);
    put_id(&mut v, me);
    put_id(&mut v, expect);
    let m = auth
        .proof(CLIENT_LABEL, &e, me, expect)
        .expect("a secret is set");
    v.extend_from_slice(&m.finalize().into_bytes());
    st.write_all(&v)?;
    st.flush()?;
    let mut status = [0u8; 1];
    st.read_exact(&mut status)?;
    if status[0] != 0 {
        let why = get_text(&mut st)?;
        return Err(AuthError::Denied(format!("refused by the listener: {why}")));
    }
    let them = get_id(&mut st)?;
    let mut tag = [0u8; MAC];
    st.read_exact(&mut tag)?;
    let ok = auth
        .proof(SERVER_LABEL, &e, (&them.name, them.instance), me)
        .is_some_and(|m| m.verify_slice(&tag).is_ok());
    if !ok {
        return Err(AuthError::Denied(
            "the listener does not hold the shared secret, or the handshake was relayed".into(),
        ));
    }
    if !expect.0.is_empty() && them.name != expect.0 {
        return Err(AuthError::Denied(format!(
            "reached agent {:?} where {:?} was expected",
            them.name, expect.0
        )));
    }
    let link = Link::tls(s, rustls::Connection::Client(conn));
    link.set_deadline(Some(deadline));
    Ok((link, Some(them)))
}
