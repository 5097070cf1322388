//! Connection authentication: the handshake before any framed byte.
//!
//! Where the secret comes from ([`Auth`]): a shared secret given in the configuration or in
//! `NIXL_SECRET` (any host that holds it is let in); else this user's per-host secret file
//! ([`super::user_secret`]), and then only connections from this host are accepted (the file is
//! per host, and readable by its user alone); or, only with `[auth] allow_open = true`, none at
//! all: anyone who reaches the port is let in, loudly, and the connection stays plain.
//!
//! Both sides first exchange a plaintext hello (magic, protocol version, whether they hold a
//! secret and whether it is a per-user one), and the listener answers with a verdict: a listener
//! with a secret refuses an initiator without one, a listener with its user's secret refuses
//! other hosts, and an open listener refuses an initiator with a secret (it could not prove
//! itself to it).
//!
//! With a secret the rest of the connection is TLS 1.3 ([`super::tls`]), and inside it each side
//! proves the secret, bound to the channel and to both agents' identities:
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
//! The identities the proofs carry are the connection's [`PeerIdentity`]s: the listener takes
//! the OPEN frame that follows only if it names the proven initiator, and attributes every
//! notification, pushed metadata and control request on the connection to it; the initiator
//! takes only the listener its metadata names. On an open connection (no secret) names are what
//! peers claim, which is what "open" means.
//!
//! The whole handshake (TLS, proofs, and the OPEN/OPENED frames that follow) must finish before
//! a deadline, checked at every read, so a peer that trickles bytes cannot keep it open.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use super::identity::PeerIdentity;
use super::link::Link;
pub use super::tls::{CertFiles, TlsMode, TlsSettings};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: [u8; 4] = *b"NXTP";
const VERSION: u16 = 2;
const MAC: usize = 32;
/// Hello: magic, version, flags.
const HELLO_LEN: usize = 4 + 2 + 2;
/// The side holds a secret (and proves it inside TLS).
const FLAG_SECRET: u16 = 1;
/// The secret is its user's per-host secret file, not a shared secret.
const FLAG_USER: u16 = 2;
/// Wire feature: the side takes SPAN_READ / SPAN_WRITE frames ([`super::wire`]). Every agent
/// of this version sets it; an initiator sends those frames only to a listener whose hello has
/// it, so agents of the previous wire (which ignore unknown flags) keep working with the old
/// READ/WRITE frames. The hello is plaintext: an on-path attacker who clears the flag only
/// makes the initiator use the old frames, and one who sets it only gets the connection
/// dropped, which it could do anyway.
const FLAG_SPANS: u16 = 4;
/// Longest agent name or refusal text in the handshake.
const MAX_TEXT: usize = 1024;

/// Where the secret comes from (no `Debug`: it holds the secret).
#[derive(Clone)]
enum Source {
    /// A shared secret: any host that holds it is let in.
    Given(Arc<[u8]>),
    /// This user's per-host secret file (`None`: the default path): this host only.
    UserFile(Option<PathBuf>),
    /// No secret, anyone is let in (`allow_open`).
    Open,
}

/// The key connections are authenticated with (`None`: open), or why there is none.
type Key = Result<Option<Arc<[u8]>>, String>;

/// How a connection authenticates: a shared secret, this user's per-host secret (the default),
/// or nothing (open).
#[derive(Clone)]
pub struct Auth {
    source: Source,
    /// The secret, once read (the user file is read, or created, on first use).
    key: Arc<OnceLock<Key>>,
    /// TLS settings (used when there is a secret).
    tls: TlsSettings,
}

impl Default for Auth {
    /// This user's per-host secret file: agents of this user on this host only.
    fn default() -> Auth {
        Auth::user_file(None)
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.describe())
            .field("tls", &self.tls)
            .finish()
    }
}

impl Auth {
    fn from_source(source: Source) -> Auth {
        Auth {
            source,
            key: Arc::new(OnceLock::new()),
            tls: TlsSettings::default(),
        }
    }

    /// A shared secret (an empty one counts as none: then this user's secret file is used).
    pub fn with_secret(secret: impl Into<Vec<u8>>) -> Auth {
        let secret = secret.into();
        if secret.is_empty() {
            return Auth::default();
        }
        Auth::from_source(Source::Given(Arc::from(secret)))
    }

    /// No shared secret: this user's per-host secret file at its default path
    /// (`~/.config/nixl/secret` in the home directory of the effective uid, created 0600 on
    /// first use): connections from this host only, from agents of this user.
    pub fn host_only() -> Auth {
        Auth::default()
    }

    /// This user's per-host secret in the file `path` (`None`: the default path), created on
    /// first use; connections from this host only.
    pub(crate) fn user_file(path: Option<&Path>) -> Auth {
        Auth::from_source(Source::UserFile(path.map(Path::to_path_buf)))
    }

    /// No secret and connections from anywhere by anyone (logged as a warning when a listener
    /// starts). Only for a network and a host where every user is trusted.
    pub fn open() -> Auth {
        Auth::from_source(Source::Open)
    }

    /// The secret from `secret`, or else from the environment variable `NIXL_SECRET`; without
    /// one, open if `allow_open`, else this user's secret file at the default path or the one
    /// `NIXL_SECRET_FILE` names.
    pub fn from_config(secret: Option<&str>, allow_open: bool) -> Auth {
        Auth::from_settings(secret, None, allow_open)
    }

    /// As [`Auth::from_config`], with `[auth] secret_file` (before `NIXL_SECRET_FILE`).
    pub fn from_settings(
        secret: Option<&str>,
        secret_file: Option<&Path>,
        allow_open: bool,
    ) -> Auth {
        let secret = secret
            .map(str::to_owned)
            .or_else(|| std::env::var("NIXL_SECRET").ok())
            .filter(|s| !s.is_empty());
        if let Some(s) = secret {
            return Auth::with_secret(s);
        }
        if allow_open {
            return Auth::open();
        }
        let file = secret_file.map(Path::to_path_buf).or_else(|| {
            std::env::var_os("NIXL_SECRET_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        Auth::user_file(file.as_deref())
    }

    /// Whether connections authenticate with a secret (a shared one or this user's).
    pub fn has_secret(&self) -> bool {
        !matches!(self.source, Source::Open)
    }

    /// Whether the secret is this user's per-host secret (connections from this host only).
    pub(crate) fn is_user_secret(&self) -> bool {
        matches!(self.source, Source::UserFile(_))
    }

    /// Whether connections from anyone are accepted without a secret.
    pub fn allow_open(&self) -> bool {
        matches!(self.source, Source::Open)
    }

    /// How connections authenticate, in words (for logs).
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Given(_) => "shared secret".into(),
            Source::UserFile(Some(p)) => format!("this user's secret in {}", p.display()),
            Source::UserFile(None) => "this user's secret file (default path)".into(),
            Source::Open => "open: no secret, anyone is let in".into(),
        }
    }

    /// Reads (or creates) the secret now, so that a missing or unsafe secret file is reported
    /// when the backend starts rather than at the first connection.
    pub fn ready(&self) -> Result<(), String> {
        self.key().map(drop)
    }

    /// The key connections are authenticated with (`None`: open).
    pub(super) fn key(&self) -> Key {
        self.key
            .get_or_init(|| match &self.source {
                Source::Given(s) => Ok(Some(Arc::clone(s))),
                Source::Open => Ok(None),
                Source::UserFile(p) => {
                    let path = match p {
                        Some(p) => p.clone(),
                        None => super::user_secret::default_path()?,
                    };
                    super::user_secret::load_or_create(&path)
                        .map(|k| Some(Arc::from(k)))
                        .map_err(|e| {
                            format!(
                                "no per-user secret ({e}); set [auth] secret (or NIXL_SECRET), or \
                                 [auth] secret_file (or NIXL_SECRET_FILE) to a path of this user"
                            )
                        })
                }
            })
            .clone()
    }

    /// Whether the secret is a shared one (`[auth] secret`), not this user's per-host one.
    pub(crate) fn is_shared_secret(&self) -> bool {
        matches!(self.source, Source::Given(_))
    }

    /// The same, with these TLS settings (used when there is a secret).
    pub fn with_tls(mut self, tls: TlsSettings) -> Auth {
        self.tls = tls;
        self
    }

    /// The TLS settings.
    pub(crate) fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    fn flags(&self) -> u16 {
        match self.source {
            Source::Given(_) => FLAG_SECRET,
            Source::UserFile(_) => FLAG_SECRET | FLAG_USER,
            Source::Open => 0,
        }
    }
}

fn proof(
    key: &[u8],
    label: &[u8],
    exporter: &[u8],
    a: (&str, u128),
    b: (&str, u128),
) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key size");
    m.update(label);
    m.update(exporter);
    for (name, instance) in [a, b] {
        m.update(&(name.len() as u64).to_le_bytes());
        m.update(name.as_bytes());
        m.update(&instance.to_le_bytes());
    }
    m
}

const CLIENT_LABEL: &[u8] = b"nixl-tcp v2 initiator";
const SERVER_LABEL: &[u8] = b"nixl-tcp v2 listener";

/// Why a handshake failed.
#[derive(Debug)]
pub(super) enum AuthError {
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
    h[6..8].copy_from_slice(&(auth.flags() | FLAG_SPANS).to_le_bytes());
    h
}

/// Checks a hello; returns the other side's flags.
fn read_hello(r: &mut impl Read, what: &str) -> Result<u16, AuthError> {
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
    Ok(u16::from_le_bytes([h[6], h[7]]))
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
    let key = auth.key().map_err(AuthError::Denied)?;
    let mut io = Timed { s: &s, deadline };
    io.write_all(&hello(auth))?;
    let flags = read_hello(&mut io, "the initiator")?;
    let (theirs, their_user) = (flags & FLAG_SECRET != 0, flags & FLAG_USER != 0);
    let shared = auth.is_shared_secret();
    let refusal = if auth.is_user_secret() && !local(peer.ip()) {
        Some(format!(
            "no shared secret is configured, so only connections from this host are accepted, \
             from agents of this agent's user ({} is not one of its addresses)",
            peer.ip()
        ))
    } else if key.is_some() && !theirs {
        Some(if shared {
            "this agent requires the shared secret; the initiator has none".to_owned()
        } else {
            "this agent accepts only agents of its own user (proved by that user's secret \
             file); the initiator has no secret"
                .to_owned()
        })
    } else if key.is_none() && theirs {
        Some(
            "this agent has no secret (allow_open), so it cannot prove who it is; configure the \
             same secret on both agents"
                .to_owned(),
        )
    } else {
        None
    };
    plain_verdict(&mut io, refusal.as_deref())?;
    if let Some(why) = refusal {
        return Err(AuthError::Denied(why));
    }
    let Some(key) = key else {
        let link = Link::plain(s);
        link.set_deadline(Some(deadline));
        return Ok((link, None));
    };

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
    let ok = proof(
        &key,
        CLIENT_LABEL,
        &e,
        (&them.name, them.instance),
        (&expect.name, expect.instance),
    )
    .verify_slice(&tag)
    .is_ok();
    let refusal = if !ok {
        Some(match (shared, their_user) {
            (true, true) => "this agent requires the shared secret; the initiator has only its \
                             user's per-host secret (or the handshake was relayed from another \
                             connection)"
                .to_owned(),
            (true, false) => {
                "wrong shared secret, or a handshake relayed from another connection".to_owned()
            }
            (false, true) => "the initiator is not an agent of this agent's user (its per-user \
                              secret differs), or the handshake was relayed from another \
                              connection"
                .to_owned(),
            (false, false) => "this agent has no shared secret and accepts only agents of its \
                               own user; the initiator's secret is not that user's (or the \
                               handshake was relayed from another connection)"
                .to_owned(),
        })
    } else if !expect.name.is_empty() && expect.name != me.0 {
        Some(format!(
            "this is agent '{}', not '{}' (its address changed hands: load its metadata again)",
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
            let m = proof(&key, SERVER_LABEL, &e, me, (&them.name, them.instance));
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
    let key = auth.key().map_err(AuthError::Denied)?;
    let mut io = Timed { s: &s, deadline };
    let flags = read_hello(&mut io, "the listener")?;
    let (theirs, spans) = (flags & FLAG_SECRET != 0, flags & FLAG_SPANS != 0);
    io.write_all(&hello(auth))?;
    let mut status = [0u8; 1];
    io.read_exact(&mut status)?;
    if status[0] != 0 {
        let why = get_text(&mut io)?;
        return Err(AuthError::Denied(format!("refused by the listener: {why}")));
    }
    let Some(key) = key else {
        let link = Link::plain(s).with_spans(spans);
        link.set_deadline(Some(deadline));
        return Ok((link, None));
    };
    if !theirs {
        return Err(AuthError::Denied(
            "the listener has no secret (it is open), so it cannot prove who it is".into(),
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
    let m = proof(&key, CLIENT_LABEL, &e, me, expect);
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
    let ok = proof(&key, SERVER_LABEL, &e, (&them.name, them.instance), me)
        .verify_slice(&tag)
        .is_ok();
    if !ok {
        return Err(AuthError::Denied(
            "the listener does not hold our secret, or the handshake was relayed".into(),
        ));
    }
    if !expect.0.is_empty() && them.name != expect.0 {
        return Err(AuthError::Denied(format!(
            "the listener is agent '{}', not '{}'",
            them.name, expect.0
        )));
    }
    let link = Link::tls(s, rustls::Connection::Client(conn)).with_spans(spans);
    link.set_deadline(Some(deadline));
    Ok((link, Some(them)))
}
