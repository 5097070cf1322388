//! Connection authentication, before any framed byte is read.
//!
//! Both sides send a fixed-size hello with a fresh 32-byte nonce. With a secret, the initiator
//! proves it holds the secret by an HMAC-SHA256 over both nonces, and the listener answers with
//! its own HMAC over them in the other order, so each side knows the other holds the secret and
//! neither transcript can be replayed. The nonces are the connection's [`Binding`]: the frames
//! that then name each side ([`super::identity`]) are sealed to it.
//!
//! Where the secret comes from ([`Auth`]): a shared secret given in the configuration or in
//! `NIXL_SECRET` (any host that holds it is let in); else this user's per-host secret file
//! ([`super::user_secret`]), and then only connections from this host are accepted (the file is
//! per host, and readable by its user alone); or, only with `[auth] allow_open = true`, none at
//! all: anyone who reaches the port is let in, loudly.
//!
//! The exchange authenticates the connection; it does not encrypt or sign what follows (TLS is
//! not built yet): the secret protects against a stranger on the network, not against someone
//! who can rewrite packets on the path.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub(super) use super::identity::Binding;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: [u8; 4] = *b"NXTP";
/// 2: OPEN and OPENED are sealed ([`super::identity`]).
const VERSION: u16 = 2;
pub(super) const NONCE: usize = 32;
const MAC: usize = 32;
/// Listener hello: magic, version, flags, nonce.
const SRV_HELLO_LEN: usize = 4 + 2 + 2 + NONCE;
/// Initiator hello: magic, version, flags, nonce, mac.
const CLI_HELLO_LEN: usize = 4 + 2 + 2 + NONCE + MAC;
/// Verdict: status byte, mac, reason length, reason (at most 255 bytes).
const VERDICT_HEAD: usize = 1 + MAC + 1;
/// The side holds a secret (and MACs with it).
const FLAG_SECRET: u16 = 1;
/// The secret is its user's per-host secret file, not a shared secret.
const FLAG_USER: u16 = 2;

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
            .finish()
    }
}

impl Auth {
    fn from_source(source: Source) -> Auth {
        Auth {
            source,
            key: Arc::new(OnceLock::new()),
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
    pub fn user_file(path: Option<&Path>) -> Auth {
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
    pub fn is_user_secret(&self) -> bool {
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

    fn flags(&self) -> u16 {
        match self.source {
            Source::Given(_) => FLAG_SECRET,
            Source::UserFile(_) => FLAG_SECRET | FLAG_USER,
            Source::Open => 0,
        }
    }

    fn mac(key: Option<&[u8]>, label: &[u8], a: &[u8; NONCE], b: &[u8; NONCE]) -> [u8; MAC] {
        let Some(key) = key else {
            return [0; MAC];
        };
        let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key size");
        m.update(label);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }

    fn verify(key: &[u8], label: &[u8], a: &[u8; NONCE], b: &[u8; NONCE], tag: &[u8]) -> bool {
        let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key size");
        m.update(label);
        m.update(a);
        m.update(b);
        m.verify_slice(tag).is_ok()
    }
}

const CLIENT_LABEL: &[u8] = b"nixl-tcp v1 initiator";
const SERVER_LABEL: &[u8] = b"nixl-tcp v1 listener";

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
        if e.kind() == io::ErrorKind::UnexpectedEof {
            AuthError::Protocol("connection closed during the handshake".into())
        } else {
            AuthError::Io(e)
        }
    }
}

/// A fresh nonce from the OS generator; its failure fails the handshake (a guessable nonce
/// would let a transcript be replayed).
fn nonce() -> Result<[u8; NONCE], AuthError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| AuthError::Io(io::Error::other(e.to_string())))?;
    Ok(n)
}

/// The listener's side. `peer` is the connecting address, `local` tells whether an address is
/// one of this host's. Reads exactly the initiator's fixed-size hello, nothing more. Returns the
/// connection's binding (for the sealed OPEN and OPENED that follow).
pub fn accept(
    s: &mut TcpStream,
    auth: &Auth,
    peer: SocketAddr,
    local: impl Fn(IpAddr) -> bool,
) -> Result<Binding, AuthError> {
    let key = auth.key().map_err(AuthError::Denied)?;
    let ours = nonce()?;
    let mut hello = Vec::with_capacity(SRV_HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&auth.flags().to_le_bytes());
    hello.extend_from_slice(&ours);
    s.write_all(&hello)?;

    let mut buf = [0u8; CLI_HELLO_LEN];
    s.read_exact(&mut buf)?;
    if buf[..4] != MAGIC {
        return Err(AuthError::Protocol("not a nixl-rs tcp initiator".into()));
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != VERSION {
        let why = format!("protocol version {version}, this agent speaks {VERSION}");
        refuse(s, &why);
        return Err(AuthError::Protocol(why));
    }
    let their_flags = u16::from_le_bytes([buf[6], buf[7]]);
    let theirs: [u8; NONCE] = buf[8..8 + NONCE].try_into().expect("length");
    let tag = &buf[8 + NONCE..];
    let deny = |s: &mut TcpStream, why: String| {
        refuse(s, &why);
        Err(AuthError::Denied(why))
    };
    if auth.is_user_secret() && !local(peer.ip()) {
        return deny(
            s,
            format!(
                "no shared secret is configured, so only connections from this host are \
                 accepted, from agents of this agent's user ({} is not one of its addresses)",
                peer.ip()
            ),
        );
    }
    if let Some(key) = &key {
        let shared = !auth.is_user_secret();
        if their_flags & FLAG_SECRET == 0 {
            return deny(
                s,
                if shared {
                    "this agent requires the shared secret; the initiator has none".into()
                } else {
                    "this agent accepts only agents of its own user (proved by that user's \
                     secret file); the initiator has no secret"
                        .into()
                },
            );
        }
        if !Auth::verify(key, CLIENT_LABEL, &ours, &theirs, tag) {
            let why = match (shared, their_flags & FLAG_USER != 0) {
                (true, true) => "this agent requires the shared secret; the initiator has only \
                                 its user's per-host secret"
                    .into(),
                (true, false) => "wrong shared secret".into(),
                (false, true) => "the initiator is not an agent of this agent's user (its \
                                  per-user secret differs)"
                    .into(),
                (false, false) => "this agent has no shared secret and accepts only agents of \
                                   its own user; the initiator's secret is not that user's"
                    .into(),
            };
            return deny(s, why);
        }
    }
    let mut verdict = Vec::with_capacity(VERDICT_HEAD);
    verdict.push(0);
    verdict.extend_from_slice(&Auth::mac(key.as_deref(), SERVER_LABEL, &theirs, &ours));
    verdict.push(0);
    s.write_all(&verdict)?;
    Ok(binding(&ours, &theirs))
}

fn binding(listener: &[u8; NONCE], initiator: &[u8; NONCE]) -> Binding {
    let mut b = [0u8; 2 * NONCE];
    b[..NONCE].copy_from_slice(listener);
    b[NONCE..].copy_from_slice(initiator);
    Binding(b)
}

fn refuse(s: &mut TcpStream, why: &str) {
    let why = &why.as_bytes()[..why.len().min(255)];
    let mut verdict = Vec::with_capacity(VERDICT_HEAD + why.len());
    verdict.push(1);
    verdict.extend_from_slice(&[0; MAC]);
    verdict.push(why.len() as u8);
    verdict.extend_from_slice(why);
    let _ = s.write_all(&verdict);
}

/// The initiator's side. Returns the connection's binding.
pub fn connect(s: &mut TcpStream, auth: &Auth) -> Result<Binding, AuthError> {
    let key = auth.key().map_err(AuthError::Denied)?;
    let mut buf = [0u8; SRV_HELLO_LEN];
    s.read_exact(&mut buf)?;
    if buf[..4] != MAGIC {
        return Err(AuthError::Protocol(
            "the listener is not a nixl-rs tcp agent".into(),
        ));
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != VERSION {
        return Err(AuthError::Protocol(format!(
            "listener speaks protocol version {version}, this agent {VERSION}"
        )));
    }
    let server_secret = u16::from_le_bytes([buf[6], buf[7]]) & FLAG_SECRET != 0;
    let theirs: [u8; NONCE] = buf[8..].try_into().expect("length");
    let ours = nonce()?;
    let mut hello = Vec::with_capacity(CLI_HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&auth.flags().to_le_bytes());
    hello.extend_from_slice(&ours);
    hello.extend_from_slice(&Auth::mac(key.as_deref(), CLIENT_LABEL, &theirs, &ours));
    s.write_all(&hello)?;

    let mut head = [0u8; VERDICT_HEAD];
    s.read_exact(&mut head)?;
    if head[0] != 0 {
        let mut why = vec![0u8; usize::from(head[VERDICT_HEAD - 1])];
        s.read_exact(&mut why)?;
        return Err(AuthError::Denied(format!(
            "refused by the listener: {}",
            String::from_utf8_lossy(&why)
        )));
    }
    if let Some(key) = &key {
        if !server_secret {
            return Err(AuthError::Denied(
                "the listener has no secret (it is open), so it cannot prove who it is".into(),
            ));
        }
        if !Auth::verify(key, SERVER_LABEL, &ours, &theirs, &head[1..1 + MAC]) {
            return Err(AuthError::Denied(
                "the listener does not hold our secret".into(),
            ));
        }
    }
    Ok(binding(&theirs, &ours))
}
