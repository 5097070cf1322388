//! Hidden: connections past the handshake that skip the backend, for tests and fuzzers that
//! write frames by hand (a liar, garbage after authentication). Not a stable API.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nixl_core::{Error, Result};

use super::auth::{self, Auth};
use super::client_setup;
use super::identity::PeerIdentity;
use super::link::Link;
use super::{net, wire};

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
