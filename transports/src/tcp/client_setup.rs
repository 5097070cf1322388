//! Opening a connection (handshake, OPEN and OPENED), and the one-frame metadata and control
//! calls.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nixl_core::{BackendName, Error, Result};

use super::auth::{self, AuthError};
use super::client::give_up;
use super::identity::PeerIdentity;
use super::net::{self, peer_err, Link};
use super::wire::{self, Purpose, Status};

/// What a listener answered to our OPEN.
pub(super) struct Opened {
    pub(super) status: Status,
    /// The listener's instance id.
    pub(super) instance: u128,
    /// Its name (status Ok) or why it refused.
    pub(super) text: String,
}

impl Opened {
    /// The identity the listener proved (with status Ok).
    pub(super) fn identity(&self) -> PeerIdentity {
        PeerIdentity::new(self.text.clone(), self.instance)
    }
}

/// The initiator's side of opening a connection: the handshake (with a secret: TLS and the
/// proofs of both agents' names, `me` and the listener we `expect`, ("", 0) for whoever
/// listens), then OPEN (our name and instance, the purpose, the listener instance we expect, 0
/// for any) and OPENED, all before `deadline`. An OPENED that names another agent than the
/// handshake proved is refused. `peer` names the other side in errors. The link keeps the
/// deadline: the caller clears it.
pub(super) fn open_stream(
    s: TcpStream,
    auth: &auth::Auth,
    purpose: Purpose,
    me: &PeerIdentity,
    expect: (&str, u128),
    deadline: Instant,
    peer: &str,
) -> Result<(Link, Opened)> {
    let io_err = |e: io::Error| peer_err(peer, &e);
    let (s, proven) =
        auth::connect(s, auth, (&me.name, me.instance), expect, deadline).map_err(|e| match e {
            AuthError::Denied(reason) => Error::Denied {
                peer: peer.to_owned(),
                reason,
            },
            AuthError::Protocol(reason) => Error::RemoteDisconnect {
                peer: peer.to_owned(),
                reason,
            },
            AuthError::Io(e) => peer_err(peer, &e),
        })?;
    let bad = |reason: String| Error::RemoteDisconnect {
        peer: peer.to_owned(),
        reason,
    };
    let mut out = Vec::with_capacity(128);
    wire::open(&mut out, purpose, &me.name, me.instance, expect.1);
    net::send_all(&s, &out).map_err(io_err)?;
    let mut body = Vec::new();
    let ty = net::read_frame(&s, &mut body, wire::frame_limit, &mut give_up).map_err(io_err)?;
    if ty != wire::OPENED {
        return Err(bad(format!("expected OPENED, got frame type {ty}")));
    }
    let (status, instance, text) = wire::decode_opened(&body).map_err(|e| bad(e.to_string()))?;
    let o = Opened {
        status,
        instance,
        text,
    };
    if let Some(p) = proven.filter(|p| o.status == Status::Ok && *p != o.identity()) {
        return Err(Error::Denied {
            peer: peer.to_owned(),
            reason: format!(
                "the listener proved to be {p} but its OPENED names {}",
                o.identity()
            ),
        });
    }
    Ok((s, o))
}

/// An authenticated connection opened for `purpose` as `me`, past OPENED; returns the identity
/// the listener proved.
pub(super) fn open_call(
    addr: SocketAddr,
    auth: &auth::Auth,
    timeout: Duration,
    purpose: Purpose,
    me: &PeerIdentity,
) -> Result<(Link, PeerIdentity)> {
    let who = addr.to_string();
    let io_err = |e: io::Error| peer_err(&who, &e);
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(io_err)?;
    s.set_nodelay(true).map_err(io_err)?;
    let deadline = Instant::now() + timeout;
    let (s, o) = open_stream(s, auth, purpose, me, ("", 0), deadline, &who)?;
    if o.status != Status::Ok {
        return Err(match o.status {
            Status::Denied => Error::Denied {
                peer: who,
                reason: o.text,
            },
            _ => Error::RemoteDisconnect {
                peer: who,
                reason: o.text,
            },
        });
    }
    s.set_deadline(None);
    s.socket().set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.socket()
        .set_write_timeout(Some(timeout))
        .map_err(io_err)?;
    let id = o.identity();
    Ok((s, id))
}

/// Sends one frame on a call connection and reads the reply frame of type `want`.
fn exchange(s: &Link, who: &str, frame: &[u8], want: u8, body: &mut Vec<u8>) -> Result<()> {
    let io_err = |e: io::Error| peer_err(who, &e);
    net::send_all(s, frame).map_err(io_err)?;
    let ty = net::read_frame(s, body, wire::frame_limit, &mut give_up).map_err(io_err)?;
    if ty != want {
        return Err(Error::RemoteDisconnect {
            peer: who.to_owned(),
            reason: format!("expected frame type {want}, got {ty}"),
        });
    }
    Ok(())
}

/// A one-off metadata exchange with a listener, as `me`: fetch (`push` None) or push. A fetch
/// returns only metadata of the agent the listener proved to be; a push is accepted by the
/// listener only as the pusher's own (`me` is the name and instance in `push`).
pub(super) fn metadata_call(
    addr: SocketAddr,
    auth: &auth::Auth,
    timeout: Duration,
    me: &PeerIdentity,
    req: MdRequest<'_>,
) -> Result<Vec<u8>> {
    let who = addr.to_string();
    let (s, listener) = open_call(addr, auth, timeout, Purpose::Metadata, me)?;
    let mut f = Vec::with_capacity(16);
    let op = match req {
        MdRequest::Get => {
            wire::begin(&mut f, wire::MD_GET);
            wire::finish(&mut f);
            "fetch metadata"
        }
        MdRequest::Push(md) => {
            f.reserve(md.len());
            wire::begin(&mut f, wire::MD_PUSH);
            wire::put_blob(&mut f, md);
            wire::finish(&mut f);
            "push metadata"
        }
        MdRequest::Drop => {
            wire::md_drop(&mut f);
            "invalidate metadata"
        }
    };
    let mut body = Vec::new();
    exchange(&s, &who, &f, wire::MD, &mut body)?;
    let (status, bytes) = wire::decode_md(&body).map_err(|e| Error::RemoteDisconnect {
        peer: who.clone(),
        reason: e.to_string(),
    })?;
    match status {
        Status::Ok => {
            if matches!(req, MdRequest::Get) {
                let md = nixl_core::AgentMetadata::decode(bytes)?;
                if md.name != listener.name || md.instance_id != listener.instance {
                    return Err(Error::Denied {
                        peer: who,
                        reason: format!(
                            "the listener proved to be {listener} but served the metadata of \
                             '{}' (instance {:032x})",
                            md.name, md.instance_id
                        ),
                    });
                }
            }
            Ok(bytes.to_vec())
        }
        Status::Denied => Err(Error::Denied {
            peer: who,
            reason: format!("{op}: {}", String::from_utf8_lossy(bytes)),
        }),
        Status::Failed => Err(Error::Backend {
            backend: BackendName::Tcp,
            op,
            reason: String::from_utf8_lossy(bytes).into_owned(),
        }),
    }
}

/// What a metadata connection asks of a listener.
#[derive(Clone, Copy, Debug)]
pub(super) enum MdRequest<'a> {
    /// Its agent's metadata (MD_GET).
    Get,
    /// Load these, the caller's own (MD_PUSH).
    Push(&'a [u8]),
    /// Drop the caller's metadata (MD_DROP).
    Drop,
}

/// One control request to the service of `backend` at a listener, as the agent `me`.
pub(super) fn control_call(
    addr: SocketAddr,
    auth: &auth::Auth,
    timeout: Duration,
    me: &PeerIdentity,
    backend: BackendName,
    req: &[u8],
) -> Result<Vec<u8>> {
    let who = addr.to_string();
    let (s, _) = open_call(addr, auth, timeout, Purpose::Control, me)?;
    let mut f = Vec::with_capacity(req.len() + 16);
    wire::ctrl(&mut f, backend.code(), req);
    let mut body = Vec::new();
    exchange(&s, &who, &f, wire::CTRL_RE, &mut body)?;
    let (status, bytes) = wire::decode_ctrl_re(&body).map_err(|e| Error::RemoteDisconnect {
        peer: who.clone(),
        reason: e.to_string(),
    })?;
    match status {
        Status::Ok => Ok(bytes.to_vec()),
        _ => Err(Error::Denied {
            peer: who,
            reason: String::from_utf8_lossy(bytes).into_owned(),
        }),
    }
}
