//! Who is at the other end of a `tcp` connection, as the connection proved it.
//!
//! After the secret handshake ([`super::auth`]) each side names itself once: the initiator in its
//! OPEN frame (purpose, agent name, instance id, the instance it expects), the listener in its
//! OPENED answer (status, instance id, agent name). Both frames are *sealed*: they end with an
//! HMAC-SHA256, under the connection's secret, over a label, the handshake's [`Binding`] (both
//! nonces) and the frame's body. So a name is accepted only from a holder of the secret, only on
//! the connection it was sealed for (no replay, no splicing onto another connection), and only
//! once: the listener binds the [`PeerIdentity`] of the OPEN to the connection and uses that for
//! every notification, pushed metadata and control request that arrives on it; the initiator
//! checks that the listener is the agent (name and instance) its metadata promised.
//!
//! An open listener (`[auth] allow_open = true`, no secret) seals with zeros and accepts any
//! seal: its peers' names are what they claim, which is what "open" means.
//!
//! When the transport gains a TLS channel, the binding becomes the channel's exporter value; the
//! identity and the rules that use it stay as they are.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::auth::{Auth, NONCE};

/// Bytes of a seal.
pub(super) const TAG: usize = 32;

/// Label of the initiator's OPEN.
pub(super) const OPEN_LABEL: &[u8] = b"nixl-tcp v2 open";
/// Label of the listener's OPENED.
pub(super) const OPENED_LABEL: &[u8] = b"nixl-tcp v2 opened";

/// What ties a sealed frame to one connection: the listener's nonce, then the initiator's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding(pub(super) [u8; 2 * NONCE]);

/// The agent at the other end of a connection, as it proved itself on that connection: its name
/// and instance id. An anonymous initiator (a metadata fetch by a tool) has an empty name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The agent's name.
    pub name: String,
    /// The agent's instance id (0: an anonymous caller).
    pub instance: u128,
}

impl PeerIdentity {
    /// An agent's identity.
    pub fn new(name: impl Into<String>, instance: u128) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            instance,
        }
    }

    /// The identity of a caller that is no agent (a tool fetching metadata).
    pub fn anonymous() -> PeerIdentity {
        PeerIdentity::new("", 0)
    }

    /// Whether this is [`PeerIdentity::anonymous`].
    pub fn is_anonymous(&self) -> bool {
        self.name.is_empty()
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_anonymous() {
            write!(f, "an anonymous caller")
        } else {
            write!(f, "'{}' (instance {:032x})", self.name, self.instance)
        }
    }
}

fn tag(key: &[u8], label: &[u8], binding: &Binding, body: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key size");
    m.update(label);
    m.update(&binding.0);
    m.update(&(body.len() as u64).to_le_bytes());
    m.update(body);
    m
}

/// Seals a frame built with `wire::begin` .. `wire::finish`: appends the tag over its body (type
/// byte included) and fixes its length.
pub(super) fn seal(
    frame: &mut Vec<u8>,
    auth: &Auth,
    binding: &Binding,
    label: &[u8],
) -> Result<(), String> {
    let t: [u8; TAG] = match auth.key()? {
        Some(key) => tag(&key, label, binding, &frame[4..])
            .finalize()
            .into_bytes()
            .into(),
        None => [0; TAG],
    };
    frame.extend_from_slice(&t);
    super::wire::finish(frame);
    Ok(())
}

/// Checks the seal of a frame body read with `net::read_frame` (`ty` is its type) and returns the
/// body without it.
pub(super) fn unseal<'a>(
    ty: u8,
    body: &'a [u8],
    auth: &Auth,
    binding: &Binding,
    label: &[u8],
) -> Result<&'a [u8], String> {
    let Some(split) = body.len().checked_sub(TAG) else {
        return Err("frame too short for its seal".into());
    };
    let (inner, t) = body.split_at(split);
    let Some(key) = auth.key()? else {
        return Ok(inner);
    };
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key size");
    m.update(label);
    m.update(&binding.0);
    m.update(&((inner.len() + 1) as u64).to_le_bytes());
    m.update(&[ty]);
    m.update(inner);
    m.verify_slice(t)
        .map(|()| inner)
        .map_err(|_| "the seal does not match: not sealed under this connection's secret".into())
}

/// The listener's side: reads the initiator's OPEN (only an OPEN, within
/// [`super::wire::OPEN_BYTES`], checked from the header) and checks its seal (see
/// [`check_open`]).
pub(super) fn read_open(
    s: &std::net::TcpStream,
    body: &mut Vec<u8>,
    auth: &Auth,
    binding: &Binding,
    on: &mut dyn super::net::OnBlock,
) -> std::io::Result<Result<super::wire::Open, String>> {
    use super::wire;
    let mut admit = |ty: u8, len: usize| match wire::purpose_limit(None, ty) {
        Some(limit) if len <= limit => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected OPEN, got frame type {ty} of {len} bytes"),
        )),
    };
    let ty = super::net::read_frame_admit(s, body, &mut admit, on)?;
    check_open(ty, body, auth, binding)
}

/// The listener's side: checks that a frame (type `ty`, body `body`) is an OPEN sealed for this
/// connection. `Ok(Err(why))` when the seal does not match (the connection is to be dropped and
/// counted as an authentication failure); the OPEN's name and instance are the initiator's
/// [`PeerIdentity`] otherwise.
pub(super) fn check_open(
    ty: u8,
    body: &[u8],
    auth: &Auth,
    binding: &Binding,
) -> std::io::Result<Result<super::wire::Open, String>> {
    use super::wire;
    if ty != wire::OPEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected OPEN, got frame type {ty}"),
        ));
    }
    match unseal(ty, body, auth, binding, OPEN_LABEL) {
        Ok(inner) => Ok(Ok(wire::decode_open(inner).map_err(wire::bad)?)),
        Err(why) => Ok(Err(why)),
    }
}

/// The listener's side: its sealed OPENED (`text`: its name, or why it refuses) in `out`.
pub(super) fn opened(
    out: &mut Vec<u8>,
    auth: &Auth,
    binding: &Binding,
    status: super::wire::Status,
    instance: u128,
    text: &str,
) -> std::io::Result<()> {
    super::wire::opened(out, status, instance, text);
    seal(out, auth, binding, OPENED_LABEL).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        super::super::wire::begin(&mut f, ty);
        f.extend_from_slice(body);
        super::super::wire::finish(&mut f);
        f
    }

    #[test]
    fn seals_bind_secret_connection_label_and_body() {
        let auth = Auth::with_secret("k");
        let b1 = Binding([1; 2 * NONCE]);
        let b2 = Binding([2; 2 * NONCE]);
        let mut f = frame(9, b"name=a");
        seal(&mut f, &auth, &b1, OPEN_LABEL).unwrap();
        let (ty, body) = (f[4], &f[5..]);
        assert_eq!(
            u32::from_le_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
        assert_eq!(unseal(ty, body, &auth, &b1, OPEN_LABEL).unwrap(), b"name=a");
        // Another connection, another label, another secret, another type, a changed byte.
        assert!(unseal(ty, body, &auth, &b2, OPEN_LABEL).is_err());
        assert!(unseal(ty, body, &auth, &b1, OPENED_LABEL).is_err());
        assert!(unseal(ty, body, &Auth::with_secret("j"), &b1, OPEN_LABEL).is_err());
        assert!(unseal(ty + 1, body, &auth, &b1, OPEN_LABEL).is_err());
        let mut bent = body.to_vec();
        bent[0] ^= 1;
        assert!(unseal(ty, &bent, &auth, &b1, OPEN_LABEL).is_err());
        assert!(unseal(ty, &body[..10], &auth, &b1, OPEN_LABEL).is_err());
        // Open: zeros, and anything goes.
        let mut f = frame(9, b"x");
        seal(&mut f, &Auth::open(), &b1, OPEN_LABEL).unwrap();
        assert_eq!(&f[f.len() - TAG..], &[0; TAG]);
        assert_eq!(
            unseal(9, &f[5..], &Auth::open(), &b2, OPEN_LABEL).unwrap(),
            b"x"
        );
    }
}
