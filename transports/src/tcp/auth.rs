//! Connection authentication, before any framed byte is read.
//!
//! Both sides send a fixed-size hello with a fresh 32-byte nonce. With a shared secret, the
//! initiator proves it holds the secret by an HMAC-SHA256 over both nonces, and the listener
//! answers with its own HMAC over them in the other order, so each side knows the other holds the
//! secret and neither transcript can be replayed. Without a secret, the listener accepts only
//! connections from its own host, unless it is configured open.
//!
//! The exchange authenticates the connection; it does not encrypt or sign what follows (TLS is
//! not built yet): the secret protects against a stranger on the network, not against someone
//! who can rewrite packets on the path.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: [u8; 4] = *b"NXTP";
const VERSION: u16 = 1;
const NONCE: usize = 32;
const MAC: usize = 32;
/// Listener hello: magic, version, flags, nonce.
const SRV_HELLO_LEN: usize = 4 + 2 + 2 + NONCE;
/// Initiator hello: magic, version, flags, nonce, mac.
const CLI_HELLO_LEN: usize = 4 + 2 + 2 + NONCE + MAC;
/// Verdict: status byte, mac, reason length, reason (at most 255 bytes).
const VERDICT_HEAD: usize = 1 + MAC + 1;
const FLAG_SECRET: u16 = 1;

/// How a connection authenticates.
#[derive(Clone, Default)]
pub struct Auth {
    secret: Option<Vec<u8>>,
    allow_open: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("allow_open", &self.allow_open)
            .finish()
    }
}

impl Auth {
    /// A shared secret (an empty one counts as none).
    pub fn with_secret(secret: impl Into<Vec<u8>>) -> Auth {
        let secret = secret.into();
        Auth {
            secret: (!secret.is_empty()).then_some(secret),
            allow_open: false,
        }
    }

    /// No secret: accept connections from this host only.
    pub fn host_only() -> Auth {
        Auth::default()
    }

    /// No secret and connections from anywhere (logged as a warning when a listener starts).
    pub fn open() -> Auth {
        Auth {
            secret: None,
            allow_open: true,
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

    fn mac(&self, label: &[u8], a: &[u8; NONCE], b: &[u8; NONCE]) -> [u8; MAC] {
        let Some(secret) = &self.secret else {
            return [0; MAC];
        };
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
        m.update(label);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], a: &[u8; NONCE], b: &[u8; NONCE], tag: &[u8]) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
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
/// one of this host's. Reads exactly the initiator's fixed-size hello, nothing more.
pub fn accept(
    s: &mut TcpStream,
    auth: &Auth,
    peer: SocketAddr,
    local: impl Fn(IpAddr) -> bool,
) -> Result<(), AuthError> {
    let ours = nonce()?;
    let mut hello = Vec::with_capacity(SRV_HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    let flags = if auth.has_secret() { FLAG_SECRET } else { 0 };
    hello.extend_from_slice(&flags.to_le_bytes());
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
    if auth.has_secret() {
        if their_flags & FLAG_SECRET == 0 {
            let why = "this agent requires the shared secret; the initiator has none".to_owned();
            refuse(s, &why);
            return Err(AuthError::Denied(why));
        }
        if !auth.verify(CLIENT_LABEL, &ours, &theirs, tag) {
            let why = "wrong shared secret".to_owned();
            refuse(s, &why);
            return Err(AuthError::Denied(why));
        }
    } else if !auth.allow_open && !local(peer.ip()) {
        let why = format!(
            "no shared secret is configured, so only connections from this host are accepted \
             ({} is not one of its addresses)",
            peer.ip()
        );
        refuse(s, &why);
        return Err(AuthError::Denied(why));
    }
    let mut verdict = Vec::with_capacity(VERDICT_HEAD);
    verdict.push(0);
    verdict.extend_from_slice(&auth.mac(SERVER_LABEL, &theirs, &ours));
    verdict.push(0);
    s.write_all(&verdict)?;
    Ok(())
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

/// The initiator's side.
pub fn connect(s: &mut TcpStream, auth: &Auth) -> Result<(), AuthError> {
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
    let flags = if auth.has_secret() { FLAG_SECRET } else { 0 };
    hello.extend_from_slice(&flags.to_le_bytes());
    hello.extend_from_slice(&ours);
    hello.extend_from_slice(&auth.mac(CLIENT_LABEL, &theirs, &ours));
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
    if auth.has_secret() {
        if !server_secret {
            return Err(AuthError::Denied(
                "the listener has no shared secret, so it cannot prove who it is".into(),
            ));
        }
        if !auth.verify(SERVER_LABEL, &ours, &theirs, &head[1..1 + MAC]) {
            return Err(AuthError::Denied(
                "the listener does not hold the shared secret".into(),
            ));
        }
    }
    Ok(())
}
