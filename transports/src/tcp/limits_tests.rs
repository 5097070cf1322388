//! The listener's limits seen from an authenticated peer: frames a connection's purpose does not
//! take, frame bodies over the listener's memory budget, connections idle past `idle_timeout`.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::Agent;

use super::wire::{self, Purpose};
use super::{client, Auth, Link, PeerIdentity, TcpBackend, TcpConfig};

const SECRET: &str = "limits";

fn target(cfg: TcpConfig) -> (Agent, Arc<TcpBackend>, SocketAddr) {
    let tb = Arc::new(TcpBackend::new(TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: Auth::with_secret(SECRET),
        ..cfg
    }));
    let agent = Agent::builder(format!("limits-{:x}", nixl_core::random_u64().unwrap()))
        .backend(tb.clone())
        .build()
        .unwrap();
    let addr = tb.server.lock().as_ref().unwrap().published[0];
    (agent, tb, addr)
}

fn open(addr: SocketAddr, purpose: Purpose) -> Link {
    client::open_call(
        addr,
        &Auth::with_secret(SECRET),
        Duration::from_secs(5),
        purpose,
        &PeerIdentity::new("peer", 1),
    )
    .unwrap()
    .0
}

/// Waits (at most 5 s) for the listener to close `s`; returns how long that took.
fn closed_within(s: &Link) -> Option<Duration> {
    let t = Instant::now();
    s.set_deadline(None);
    s.socket()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 256];
    while t.elapsed() < Duration::from_secs(5) {
        match s.read(&mut b) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t.elapsed()),
        }
    }
    None
}

/// A connection past the handshake (TLS and the proofs), before OPEN.
fn authenticated(addr: SocketAddr) -> Link {
    let s = TcpStream::connect(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let me = ("peer", 1);
    let (s, proven) =
        super::auth::connect(s, &Auth::with_secret(SECRET), me, ("", 0), deadline).unwrap();
    assert!(proven.is_some());
    s
}

fn header(ty: u8, body_len: usize) -> Vec<u8> {
    let mut h = ((body_len + 1) as u32).to_le_bytes().to_vec();
    h.push(ty);
    h
}

#[test]
fn data_connections_take_only_data_frames() {
    let (_agent, _tb, addr) = target(TcpConfig::default());
    // A 256 MiB metadata push and a control request on a data connection: refused from the
    // header, before a byte of the body is buffered.
    for (ty, len) in [
        (wire::MD_PUSH, 256 << 20),
        (wire::CTRL, 1000),
        (wire::OPEN, 100),
        (wire::NOTIF, wire::MAX_NOTIF + 13),
        (wire::WRITE, wire::XFER_BYTES + 1),
    ] {
        let s = open(addr, Purpose::Data);
        s.send_all(&header(ty, len)).unwrap();
        let t = closed_within(&s);
        assert!(
            t.is_some_and(|t| t < Duration::from_secs(2)),
            "frame type {ty} of {len} bytes on a data connection: still open after {t:?}"
        );
    }
    // A metadata connection takes no data frame.
    let s = open(addr, Purpose::Metadata);
    s.send_all(&header(wire::WRITE, 40)).unwrap();
    assert!(closed_within(&s).is_some());
    // Frames of the purpose are still served.
    let s = open(addr, Purpose::Metadata);
    let mut f = Vec::new();
    wire::begin(&mut f, wire::MD_GET);
    wire::finish(&mut f);
    s.send_all(&f).unwrap();
    let mut body = Vec::new();
    let ty = super::net::read_frame(&s, &mut body, wire::frame_limit, &mut |_| Ok(())).unwrap();
    assert_eq!(ty, wire::MD);
}

#[test]
fn large_frames_share_one_memory_budget() {
    let (_agent, tb, addr) = target(TcpConfig {
        frame_memory: 3 << 20,
        ..TcpConfig::default()
    });
    // Two pushes of 1.5 MiB trickling in hold the whole budget...
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = open(addr, Purpose::Metadata);
        s.send_all(&header(wire::MD_PUSH, 3 << 19)).unwrap();
        s.send_all(&[0; 1000]).unwrap();
        held.push(s);
    }
    let held_now = || tb.server.lock().as_ref().unwrap().frame_bytes_held();
    // Waits (at most 10 s: a loaded machine schedules the listener's threads late) until the
    // listener holds `want` bytes of the budget.
    let settle = |want: usize| {
        let t = Instant::now();
        while held_now() != want && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(held_now(), want, "budget held after {:?}", t.elapsed());
    };
    settle(3 << 20);
    // ...so a third is refused from its header.
    let s = open(addr, Purpose::Metadata);
    s.send_all(&header(wire::MD_PUSH, 3 << 19)).unwrap();
    assert!(closed_within(&s).is_some(), "third large frame admitted");
    // Small frames need no budget.
    let s = open(addr, Purpose::Metadata);
    let mut f = Vec::new();
    wire::begin(&mut f, wire::MD_GET);
    wire::finish(&mut f);
    s.send_all(&f).unwrap();
    let mut body = Vec::new();
    let ty = super::net::read_frame(&s, &mut body, wire::frame_limit, &mut |_| Ok(())).unwrap();
    assert_eq!(ty, wire::MD);
    // A connection that ends gives its share back.
    drop(held.pop());
    settle(3 << 19);
    let s = open(addr, Purpose::Metadata);
    s.send_all(&header(wire::MD_PUSH, 3 << 19)).unwrap();
    s.send_all(&[0; 1000]).unwrap();
    assert!(
        closed_within(&s).is_none(),
        "budget not given back by a closed connection"
    );
}

#[test]
fn idle_connections_are_closed() {
    let (_agent, _tb, addr) = target(TcpConfig {
        idle_timeout: Duration::from_millis(500),
        ..TcpConfig::default()
    });
    for purpose in [Purpose::Data, Purpose::Metadata, Purpose::Control] {
        let s = open(addr, purpose);
        let t = closed_within(&s);
        assert!(
            t.is_some_and(|t| t >= Duration::from_millis(400)),
            "{purpose:?}: {t:?}"
        );
    }
}

#[test]
fn an_unopened_connection_must_open_in_time() {
    let (_agent, _tb, addr) = target(TcpConfig {
        connect_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    // Authenticated, then silent instead of sending OPEN.
    let s = authenticated(addr);
    let t = closed_within(&s);
    assert!(t.is_some_and(|t| t < Duration::from_secs(2)), "{t:?}");
}

#[test]
fn an_unopened_connection_takes_only_an_open_of_its_size() {
    let (_agent, _tb, addr) = target(TcpConfig::default());
    // Before OPEN: no other frame, and no OPEN longer than the longest there is, refused from
    // the header.
    for (ty, len) in [
        (wire::MD_PUSH, 256 << 20),
        (wire::NOTIF, 100),
        (wire::OPEN, wire::OPEN_BYTES + 1),
    ] {
        let s = authenticated(addr);
        s.send_all(&header(ty, len)).unwrap();
        let t = closed_within(&s);
        assert!(
            t.is_some_and(|t| t < Duration::from_secs(2)),
            "frame type {ty} of {len} bytes before OPEN: still open after {t:?}"
        );
    }
    // The longest name there is still opens.
    client::open_call(
        addr,
        &Auth::with_secret(SECRET),
        Duration::from_secs(5),
        Purpose::Data,
        &PeerIdentity::new("n".repeat(1024), 1),
    )
    .unwrap();
}
