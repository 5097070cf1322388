//! The listener's limits seen from an authenticated peer: frames a connection's purpose does not
//! take, frame bodies over the listener's memory budget, connections idle past `idle_timeout`.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::Agent;

use super::link::Link;
use super::wire::{self, Purpose};
use super::{client_setup, Auth, PeerIdentity, TcpBackend, TcpConfig};

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
    let addr = tb.listen_addrs()[0];
    (agent, tb, addr)
}

fn open(addr: SocketAddr, purpose: Purpose) -> Link {
    client_setup::open_call(
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
    fetches_metadata(&open(addr, Purpose::Metadata));
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
    fetches_metadata(&open(addr, Purpose::Metadata));
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
    client_setup::open_call(
        addr,
        &Auth::with_secret(SECRET),
        Duration::from_secs(5),
        Purpose::Data,
        &PeerIdentity::new("n".repeat(1024), 1),
    )
    .unwrap();
}

/// A SPAN frame's head and spans, unchecked (a hostile peer's own encoding).
fn span_frame(ty: u8, id: u64, key: u64, count: u32, spans: &[(u64, u32)]) -> Vec<u8> {
    let mut f = Vec::new();
    wire::span_head(&mut f, ty, id, 0, key, count);
    for &(addr, len) in spans {
        wire::put_span(&mut f, addr, len);
    }
    wire::finish(&mut f);
    f
}

/// Asks for the listener's metadata on `s` and checks that it is served.
fn fetches_metadata(s: &Link) {
    let mut f = Vec::new();
    wire::begin(&mut f, wire::MD_GET);
    wire::finish(&mut f);
    s.send_all(&f).unwrap();
    let mut body = Vec::new();
    let ty = super::net::read_frame(s, &mut body, wire::frame_limit, &mut |_| Ok(())).unwrap();
    assert_eq!(ty, wire::MD);
}

/// Reads one answer; returns its frame type and decoded reply.
fn answer(s: &Link) -> (u8, wire::Reply) {
    let mut body = Vec::new();
    let ty = super::net::read_frame(s, &mut body, wire::frame_limit, &mut |_| Ok(())).unwrap();
    (ty, wire::decode_reply(ty, &body).unwrap())
}

#[test]
fn span_frames_are_bounded_and_checked_against_one_region() {
    let (agent, _tb, addr) = target(TcpConfig::default());
    let mut buf = vec![0u8; 64 << 10];
    let (base, len) = (buf.as_mut_ptr() as u64, buf.len() as u64);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8;
    }
    let list = nixl_core::DescList::from_descs(
        nixl_core::MemKind::Dram,
        vec![nixl_core::Desc::from_mut_slice(&mut buf)],
    )
    .unwrap();
    // SAFETY: `buf` outlives the registration (dropped at the end of the test, after `reg`),
    // and it is read only after the transfers that write it were answered.
    let reg = unsafe { agent.register(&list) }.unwrap();
    let md = nixl_core::AgentMetadata::decode(&agent.metadata_bytes()).unwrap();
    let key = md.regions[0].key;

    // The listener says in its hello that it takes SPAN frames.
    assert!(open(addr, Purpose::Data).takes_spans());

    // Malformed: each drops the connection, before any memory is touched.
    let too_many = span_frame(wire::SPAN_READ, 1, key, wire::MAX_SPANS as u32 + 1, &[]);
    let lying = span_frame(wire::SPAN_READ, 1, key, 3, &[(base, 8)]);
    let empty = span_frame(wire::SPAN_READ, 1, key, 1, &[(base, 0)]);
    let wraps = span_frame(wire::SPAN_WRITE, 1, key, 1, &[(u64::MAX - 10, 100)]);
    let huge: Vec<(u64, u32)> = (0..17).map(|_| (base, 4 << 20)).collect();
    let over_chunk = span_frame(wire::SPAN_READ, 1, key, 17, &huge);
    let mut trailing = span_frame(wire::SPAN_READ, 1, key, 1, &[(base, 8)]);
    trailing.push(0);
    let n = trailing.len() - 4;
    trailing[..4].copy_from_slice(&(n as u32).to_le_bytes());
    for (what, f) in [
        ("over MAX_SPANS", too_many),
        ("a count the body does not hold", lying),
        ("an empty span", empty),
        ("a span that wraps", wraps),
        ("over MAX_CHUNK", over_chunk),
        ("trailing bytes", trailing),
        (
            "a body over its limit",
            header(wire::SPAN_READ, wire::SPAN_XFER_BYTES + 1),
        ),
    ] {
        let s = open(addr, Purpose::Data);
        s.send_all(&f).unwrap();
        let t = closed_within(&s);
        assert!(
            t.is_some_and(|t| t < Duration::from_secs(2)),
            "SPAN frame with {what}: still open after {t:?}"
        );
    }

    // Access: refused with a reason, the connection goes on (a refused WRITE's data is read and
    // thrown away), and nothing outside the region is touched.
    let s = open(addr, Purpose::Data);
    let outside = [(base, 8), (base + len - 4, 8)];
    let below = [(base - 8, 8), (base, 8)];
    for (what, ty, k, spans) in [
        ("a wrong key", wire::SPAN_READ, key ^ 1, &[(base, 8)][..]),
        ("a span past the region", wire::SPAN_READ, key, &outside[..]),
        ("a span below the region", wire::SPAN_READ, key, &below[..]),
        (
            "a WRITE past the region",
            wire::SPAN_WRITE,
            key,
            &outside[..],
        ),
    ] {
        s.send_all(&span_frame(ty, 7, k, spans.len() as u32, spans))
            .unwrap();
        if ty == wire::SPAN_WRITE {
            s.send_all(&[0xEE; 16]).unwrap();
        }
        let (rty, r) = answer(&s);
        let want = if ty == wire::SPAN_WRITE {
            wire::ACK
        } else {
            wire::DATA
        };
        assert_eq!(
            (rty, r.status, r.len),
            (want, wire::Status::Denied, 0),
            "{what}"
        );
    }
    // Served: a READ of scattered spans answers their bytes in order, a WRITE lands them.
    let spans = [(base + 100, 3u32), (base + 7, 2), (base + len - 1, 1)];
    s.send_all(&span_frame(wire::SPAN_READ, 8, key, 3, &spans))
        .unwrap();
    let (rty, r) = answer(&s);
    assert_eq!((rty, r.status, r.len), (wire::DATA, wire::Status::Ok, 6));
    let mut got = [0u8; 6];
    super::net::read_exact_with(&s, &mut got, &mut |_| Ok(())).unwrap();
    assert_eq!(got, [100, 101, 102, 7, 8, (len - 1) as u8]);
    s.send_all(&span_frame(wire::SPAN_WRITE, 9, key, 2, &spans[..2]))
        .unwrap();
    s.send_all(&[1, 2, 3, 4, 5]).unwrap();
    let (rty, r) = answer(&s);
    assert_eq!((rty, r.status), (wire::ACK, wire::Status::Ok));
    drop(s);
    drop(reg);
    assert_eq!(&buf[100..103], &[1, 2, 3]);
    assert_eq!(&buf[7..9], &[4, 5]);
    // The refused WRITE's 0xEE bytes went nowhere.
    assert_eq!(&buf[..7], &[0, 1, 2, 3, 4, 5, 6]);
    let l = len as usize;
    assert_eq!(
        &buf[l - 4..],
        &[(l - 4) as u8, (l - 3) as u8, (l - 2) as u8, (l - 1) as u8]
    );
}
