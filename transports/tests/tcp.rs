//! The `tcp` backend with real sockets on loopback: two agents in one process talking through
//! their listeners (the cross-namespace and cross-process tests live in the `nixl-tests` crate).

mod common;
use common::{loopback, one, opts, pattern, reg, tcp_agent, xfer};

use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::*;
use nixl_transports::fuzzing::{push_metadata_as, raw_data_connection};
use nixl_transports::tcp::{
    fetch_metadata, invalidate_metadata, push_metadata, Auth, PeerIdentity, TcpConfig,
};

/// Two agents on loopback; `src` registered with `a`, `dst` with `b`, b's metadata loaded into
/// a. Fields drop in order: the registrations go before the buffers they cover.
struct Linked {
    _regs: Vec<Registration>,
    a: Agent,
    b: Agent,
    src: Vec<u8>,
    dst: Vec<u8>,
}

fn linked(prefix: &str, mut src: Vec<u8>, dst_len: usize) -> Linked {
    let (a, _) = tcp_agent(&format!("{prefix}-a"), loopback(Auth::host_only()));
    let (b, _) = tcp_agent(&format!("{prefix}-b"), loopback(Auth::host_only()));
    let mut dst = vec![0u8; dst_len];
    let regs = vec![reg(&a, &mut src), reg(&b, &mut dst)];
    a.load_remote(&b.metadata_bytes()).unwrap();
    Linked {
        _regs: regs,
        a,
        b,
        src,
        dst,
    }
}

#[test]
fn write_and_read_every_byte_with_notifications() {
    let len = 40 << 20;
    let l = linked("tcp", pattern(1, len), len);
    let (a, b, src, dst) = (&l.a, &l.b, &l.src, &l.dst);
    let x = xfer(a, XferOp::Write, src, dst, "tcp-b", Some(b"w1")).unwrap();
    assert_eq!(x.backend(), BackendName::Tcp);
    x.run_blocking().unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert_eq!(
        (n[0].from.as_str(), n[0].msg.as_slice()),
        ("tcp-a", &b"w1"[..])
    );
    assert!(*dst == pattern(1, len), "written bytes differ");

    // READ back into a fresh buffer, from 3000 odd pieces.
    let mut back = vec![0u8; len];
    let _rback = reg(a, &mut back);
    let mut local = Vec::new();
    let mut remote = Vec::new();
    let mut off = 0usize;
    let mut i = 0usize;
    while off < len {
        let n = ((i * 7919) % 30_000 + 1).min(len - off);
        local.push(Desc::from_slice(&back[off..off + n]));
        remote.push(Desc::from_slice(&dst[off..off + n]));
        off += n;
        i += 1;
    }
    let local = DescList::from_descs(MemKind::Dram, local).unwrap();
    let remote = DescList::from_descs(MemKind::Dram, remote).unwrap();
    let r = a
        .create_xfer(XferOp::Read, &local, &remote, "tcp-b", opts(Some(b"r1")))
        .unwrap();
    r.run_blocking().unwrap();
    r.run_blocking().unwrap();
    assert!(back == pattern(1, len), "read bytes differ");
    assert_eq!(b.wait_notifs(Duration::from_secs(5)).len(), 2);

    a.send_notif("tcp-b", b"hello").unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n[0].msg, b"hello");
}

#[test]
fn out_of_bounds_wrong_key_and_deregistered_are_refused_at_the_target() {
    let (a, _) = tcp_agent("oob-a", loopback(Auth::host_only()));
    let (b, _) = tcp_agent("oob-b", loopback(Auth::host_only()));
    let mut src = vec![7u8; 1 << 16];
    let mut dst = vec![0u8; 1 << 16];
    let _ra = reg(&a, &mut src);
    let rb = reg(&b, &mut dst);
    let good = b.metadata();
    // A forged copy of b's metadata: the region claims to be 1 MiB long, and a second copy
    // with the wrong key. The target checks both itself.
    let mut big = good.clone();
    big.regions[0].desc.len = 1 << 20;
    big.generation += 1;
    a.load_remote_md(big).unwrap();
    let far = Desc::new(dst.as_ptr() as u64 + (1 << 19), 4096, 0);
    let x = a
        .create_xfer(
            XferOp::Write,
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&src[..4096])]).unwrap(),
            &DescList::from_descs(MemKind::Dram, vec![far]).unwrap(),
            "oob-b",
            XferOptions::default(),
        )
        .unwrap();
    let err = x.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");

    let mut wrong = good.clone();
    wrong.regions[0].key ^= 1;
    wrong.generation += 2;
    a.load_remote_md(wrong).unwrap();
    let x = xfer(&a, XferOp::Read, &src, &dst, "oob-b", None).unwrap();
    let err = x.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(src.iter().all(|&v| v == 7), "a refused READ wrote memory");

    // Correct metadata, then the target deregisters: the next post is refused.
    let mut right = good.clone();
    right.generation += 3;
    a.load_remote_md(right).unwrap();
    let x = xfer(&a, XferOp::Write, &src, &dst, "oob-b", None).unwrap();
    x.run_blocking().unwrap();
    rb.deregister().unwrap();
    let err = x.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    // The session survives refusals: the connection still works for a good request.
    let _rb2 = reg(&b, &mut dst);
    let mut fresh = b.metadata();
    fresh.generation = 100;
    a.load_remote_md(fresh).unwrap();
    let x = xfer(&a, XferOp::Write, &src, &dst, "oob-b", None).unwrap();
    x.run_blocking().unwrap();
}

#[test]
fn shared_secret_must_match_on_both_sides() {
    let (b, bb) = tcp_agent("sec-b", loopback(Auth::with_secret("s3cret")));
    let mut bbuf = [0u8; 16];
    let _rb = reg(&b, &mut bbuf);
    let addr = bb.listen_addrs()[0].to_string();
    let t = Duration::from_secs(2);
    // Right secret: metadata fetch works and matches.
    let md = fetch_metadata(&addr, &Auth::with_secret("s3cret"), t).unwrap();
    assert_eq!(AgentMetadata::decode(&md).unwrap().name, "sec-b");
    // Wrong secret, and none at all.
    for auth in [Auth::with_secret("nope"), Auth::host_only()] {
        let err = fetch_metadata(&addr, &auth, t).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    }
    // A client with a secret refuses a listener without one (it cannot prove itself).
    let (_c, cb) = tcp_agent("sec-c", loopback(Auth::host_only()));
    let err = fetch_metadata(
        &cb.listen_addrs()[0].to_string(),
        &Auth::with_secret("s3cret"),
        t,
    )
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    // Transfers between agents with different secrets are refused at connect.
    let (a, _) = tcp_agent("sec-a", loopback(Auth::with_secret("other")));
    let mut buf = [0u8; 16];
    let _ra = reg(&a, &mut buf);
    let err = a
        .load_remote(&md)
        .and_then(|_| xfer(&a, XferOp::Read, &buf, &bbuf, "sec-b", None).map(drop))
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    drop(b);
}

#[test]
fn metadata_push_loads_the_pusher_at_the_listener() {
    let (a, _) = tcp_agent("push-a", loopback(Auth::host_only()));
    let (b, bb) = tcp_agent(
        "push-b",
        TcpConfig {
            accept_pushes: true,
            ..loopback(Auth::host_only())
        },
    );
    let name = push_metadata(
        &bb.listen_addrs()[0].to_string(),
        &Auth::host_only(),
        &a.metadata_bytes(),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(name, "push-a");
    assert_eq!(b.peers(), vec!["push-a".to_owned()]);
    // Garbage is refused with a reason, and the listener keeps serving.
    let err = push_metadata(
        &bb.listen_addrs()[0].to_string(),
        &Auth::host_only(),
        b"garbage",
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert!(err.to_string().contains("metadata"), "{err}");
    assert!(fetch_metadata(
        &bb.listen_addrs()[0].to_string(),
        &Auth::host_only(),
        Duration::from_secs(2)
    )
    .is_ok());
}

#[test]
fn garbage_on_the_listener_drops_that_connection_only() {
    use std::io::{Read, Write};
    let (a, _) = tcp_agent("junk-a", loopback(Auth::host_only()));
    let (b, bb) = tcp_agent("junk-b", loopback(Auth::host_only()));
    let addr = bb.listen_addrs()[0];
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xffu8; 200][..], &[][..]] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let mut src = vec![3u8; 4096];
    let mut dst = vec![0u8; 4096];
    let _ra = reg(&a, &mut src);
    let _rb = reg(&b, &mut dst);
    a.load_remote(&b.metadata_bytes()).unwrap();
    xfer(&a, XferOp::Write, &src, &dst, "junk-b", None)
        .unwrap()
        .run_blocking()
        .unwrap();
    assert!(dst.iter().all(|&v| v == 3));
}

#[test]
fn dropping_the_initiator_cancels_what_is_in_flight_and_a_dead_target_fails_fast() {
    let len = 64 << 20;
    let l = linked("drop", vec![1u8; len], len);
    let (a, b, src, dst) = (&l.a, &l.b, &l.src, &l.dst);
    let x = xfer(a, XferOp::Write, src, dst, "drop-b", None).unwrap();
    // Target shuts down: in-flight and later posts fail, within the io timeout.
    x.post().unwrap();
    b.shutdown();
    let t = Instant::now();
    let st = x.wait_blocking(Some(Duration::from_secs(10)));
    assert!(st.is_terminal(), "{st:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let err = x.run_blocking().unwrap_err();
    assert!(
        matches!(
            err.class(),
            ErrorClass::RemoteDisconnect | ErrorClass::TimedOut
        ),
        "{err}"
    );

    // Initiator shuts down with a post in flight: it ends Cancelled.
    let (c, _) = tcp_agent("drop-c", loopback(Auth::host_only()));
    let mut dst2 = vec![0u8; len];
    let _rc = reg(&c, &mut dst2);
    a.load_remote(&c.metadata_bytes()).unwrap();
    let y = xfer(a, XferOp::Write, src, &dst2, "drop-c", None).unwrap();
    y.post().unwrap();
    a.shutdown();
    let st = y.wait_blocking(Some(Duration::from_secs(10)));
    assert!(
        matches!(st, XferStatus::Cancelled | XferStatus::Done),
        "{st:?}"
    );
}

#[test]
fn a_deadline_ends_a_post_and_the_session_stays_usable() {
    let len = 64 << 20;
    let l = linked("dl", pattern(9, len), len);
    let (a, _b, src, dst) = (&l.a, &l.b, &l.src, &l.dst);
    let slow = a
        .create_xfer(
            XferOp::Write,
            &one(src),
            &one(dst),
            "dl-b",
            XferOptions {
                deadline: Some(Duration::from_micros(200)),
                ..XferOptions::default()
            },
        )
        .unwrap();
    let err = slow.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::TimedOut, "{err}");
    // The chunks already on the wire finish; the rest are skipped; the connection is fine.
    let x = xfer(a, XferOp::Write, src, dst, "dl-b", None).unwrap();
    x.run_blocking().unwrap();
    assert!(*dst == pattern(9, len));
    // Cancelling a post in flight ends it Cancelled, and the next post still works.
    x.post().unwrap();
    x.cancel();
    assert!(matches!(
        x.wait_blocking(Some(Duration::from_secs(10))),
        XferStatus::Cancelled | XferStatus::Done
    ));
    x.run_blocking().unwrap();
}

/// The target answers `peer_idle` for the initiator: busy while it serves a READ, idle once
/// the READ's chunks are carried out; a READ past its deadline lets go of the initiator's memory
/// (release returns) and the session stays usable; a posted notification arrives.
#[test]
fn the_target_knows_when_it_serves_a_peer_and_a_late_read_lets_go() {
    let len = 64 << 20;
    let l = linked("idle", vec![0u8; len], len);
    let (a, b, src, dst) = (&l.a, &l.b, &l.src, &l.dst);
    let idle_soon = |what: &str| {
        let until = Instant::now() + Duration::from_secs(5);
        while !b.peer_idle("idle-a") {
            assert!(Instant::now() < until, "{what}: the target never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    idle_soon("before any request");
    // b's memory holds the pattern (written through a WRITE of a's buffer first).
    let mut pat = pattern(5, len);
    let _r = reg(a, &mut pat);
    xfer(a, XferOp::Write, &pat, dst, "idle-b", None)
        .unwrap()
        .run_blocking()
        .unwrap();
    let read = xfer(a, XferOp::Read, src, dst, "idle-b", None).unwrap();
    read.post().unwrap();
    let mut busy_seen = false;
    while !read.status().is_terminal() {
        busy_seen |= !b.peer_idle("idle-a");
    }
    assert!(matches!(read.status(), XferStatus::Done));
    assert!(busy_seen, "the target never reported serving a 64 MiB READ");
    assert!(*src == pattern(5, len));
    idle_soon("after the READ");
    // Past its deadline: ends TimedOut, lets go, and the next READ works.
    let late = a
        .create_xfer(
            XferOp::Read,
            &one(src),
            &one(dst),
            "idle-b",
            XferOptions {
                deadline: Some(Duration::from_micros(200)),
                ..XferOptions::default()
            },
        )
        .unwrap();
    let err = late.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::TimedOut, "{err}");
    late.release();
    assert!(!late.is_held());
    idle_soon("after a READ past its deadline");
    read.run_blocking().unwrap();
    assert!(*src == pattern(5, len));
    // A posted notification (no wait for its acknowledgement) arrives.
    a.post_notif("idle-b", b"posted").unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n = b.wait_notifs(Duration::from_millis(100));
        if n.iter().any(|n| n.msg == b"posted" && n.from == "idle-a") {
            break;
        }
        assert!(Instant::now() < until, "the posted notification never came");
    }
}

/// After authentication, a peer sends frames of random types, lengths and bodies (and random
/// bytes after them), each on a fresh connection: every one may drop its own connection, none
/// may touch memory outside the registration or stop the agent from serving.
#[test]
fn random_frames_after_authentication_never_hurt_the_agent() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A panic on a server thread would not fail this test by itself: count them.
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    let l = linked("fz", pattern(4, 1 << 16), 1 << 16);
    let (a, b) = (&l.a, &l.b);
    let addr = {
        let md = nixl_core::AgentMetadata::decode(&b.metadata_bytes()).unwrap();
        let info = &md
            .backends
            .iter()
            .find(|i| i.name == BackendName::Tcp)
            .unwrap()
            .conn_info;
        // conn info v1: version, count, family 4, ipv4, port (little-endian).
        assert_eq!(&info[..3], &[1, 1, 4]);
        let ip = std::net::Ipv4Addr::new(info[3], info[4], info[5], info[6]);
        std::net::SocketAddr::new(ip.into(), u16::from_le_bytes([info[7], info[8]]))
    };
    // Memory next to the registration: a wild write would change it.
    let canary = vec![0x5au8; 1 << 16];
    let dst_addr = l.dst.as_ptr() as u64;
    let key = b.metadata().regions[0].key;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let mut s = raw_data_connection(addr, &Auth::host_only(), "fuzzer").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let ty = [1u8, 2, 3, 4, 5, 6, 16, 17, 18, 19, 0, 255][(rnd() % 12) as usize];
        let mut body = vec![ty];
        let n = (rnd() % 200) as usize;
        // Sometimes a plausible WRITE/READ head aimed around the registration, with lies.
        if ty == 2 || ty == 3 {
            body.extend_from_slice(&rnd().to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            let pieces = (rnd() % 4) as u32;
            body.extend_from_slice(&pieces.to_le_bytes());
            for _ in 0..pieces {
                // With the real key, only ranges that leave the registration (none may be
                // served); with a random key, anything near it.
                let (addr, len, k) = if rnd() % 2 == 0 {
                    let len = 2 + rnd() % 4096;
                    let addr = if rnd() % 2 == 0 {
                        dst_addr + (1 << 16) - len / 2
                    } else {
                        dst_addr.wrapping_sub(1 + rnd() % 4096)
                    };
                    (addr, len, key)
                } else {
                    let addr = dst_addr
                        .wrapping_add(rnd() % (1 << 18))
                        .wrapping_sub(1 << 17);
                    (addr, rnd() % (1 << 17), rnd())
                };
                body.extend_from_slice(&addr.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                body.extend_from_slice(&k.to_le_bytes());
            }
        } else {
            body.extend((0..n).map(|_| rnd() as u8));
        }
        let len = if round % 7 == 0 {
            (rnd() as u32) | 1
        } else {
            body.len() as u32
        };
        let mut frame = len.to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame.extend((0..(rnd() % 300)).map(|_| rnd() as u8));
        let _ = s.write_all(&frame);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked");
    assert!(canary.iter().all(|&v| v == 0x5a));
    assert!(
        l.dst.iter().all(|&v| v == 0),
        "a random frame wrote the registration"
    );
    // Still serving.
    let w = xfer(a, XferOp::Write, &l.src, &l.dst, "fz-b", None).unwrap();
    w.run_blocking().unwrap();
    assert!(l.dst == pattern(4, 1 << 16));
}

/// A control service for the test: echoes the request with the caller's name, refuses "no".
#[derive(Debug)]
struct Echo;

impl nixl_transports::control::ControlService for Echo {
    fn handle(&self, peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        if req == b"no" {
            return Err("refused by the service".into());
        }
        let mut out = peer.as_bytes().to_vec();
        out.push(b':');
        out.extend_from_slice(req);
        Ok(out)
    }
}

#[test]
fn control_requests_reach_the_named_service_through_the_authenticated_listener() {
    use nixl_transports::control::{ControlChannel, ControlService, MAX_CONTROL};
    let secret = || Auth::with_secret(b"control secret".to_vec());
    let (_a, ta) = tcp_agent("ctl-a", loopback(secret()));
    let (_b, tb) = tcp_agent("ctl-b", loopback(secret()));
    let (_c, tc) = tcp_agent("ctl-c", loopback(Auth::with_secret(b"other".to_vec())));
    let svc: Arc<dyn ControlService> = Arc::new(Echo);
    tb.control().serve(BackendName::Rdma, Arc::downgrade(&svc));
    let ep = tb.control().endpoint();
    assert!(!ep.is_empty(), "a started listener publishes its endpoint");
    let t = Duration::from_secs(3);
    let call =
        |ch: &dyn ControlChannel, backend, req: &[u8]| ch.call(&ep, "ctl-a", backend, req, t);

    // Served: the reply names the caller as its connection proved it.
    let reply = call(&*ta.control(), BackendName::Rdma, b"hello").unwrap();
    assert_eq!(reply, b"ctl-a:hello");
    // Large requests up to the limit pass; over it are refused before sending.
    let big = vec![7u8; MAX_CONTROL - 64];
    assert_eq!(
        call(&*ta.control(), BackendName::Rdma, &big).unwrap().len(),
        big.len() + 6
    );
    let err = call(&*ta.control(), BackendName::Rdma, &vec![0; MAX_CONTROL + 1]).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Invalid, "{err}");
    // The service's refusal and an unserved backend come back as Denied with the reason.
    let err = call(&*ta.control(), BackendName::Rdma, b"no").unwrap_err();
    assert!(
        matches!(err, Error::Denied { .. }) && err.to_string().contains("refused by the service"),
        "{err}"
    );
    let err = call(&*ta.control(), BackendName::Cuda, b"x").unwrap_err();
    assert!(err.to_string().contains("serves no cuda control"), "{err}");
    // The tcp backend answers a ping itself (the daemon's canary), and only that.
    ta.control().ping(&ep, "ctl-a", t).unwrap();
    assert_eq!(
        call(&*ta.control(), BackendName::Tcp, nixl_transports::tcp::PING).unwrap(),
        nixl_transports::tcp::PONG
    );
    let err = call(&*ta.control(), BackendName::Tcp, b"pong").unwrap_err();
    assert!(err.to_string().contains("answers only"), "{err}");
    let err = tc.control().ping(&ep, "ctl-c", t).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "wrong secret: {err}");
    // A caller with the wrong secret is refused at authentication.
    let err = tc
        .control()
        .call(&ep, "ctl-c", BackendName::Rdma, b"hello", t)
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    // A channel calls only as its own agent: it cannot name another.
    let err = tb
        .control()
        .call(&ep, "ctl-a", BackendName::Rdma, b"hello", t)
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Invalid, "{err}");
    // Garbage as an endpoint is a clear error, not a panic.
    let err = ta
        .control()
        .call(b"\x09garbage", "ctl-a", BackendName::Rdma, b"x", t)
        .unwrap_err();
    assert!(
        err.to_string().contains("connection info version 9"),
        "{err}"
    );
    // The service is held weakly: once its backend is gone the agent says so.
    drop(svc);
    let err = call(&*ta.control(), BackendName::Rdma, b"hello").unwrap_err();
    assert!(err.to_string().contains("serves no rdma control"), "{err}");
    // Data transfers still work beside control traffic.
    let l = linked("ctl-data", pattern(3, 4096), 4096);
    let x = xfer(&l.a, XferOp::Write, &l.src, &l.dst, "ctl-data-b", None).unwrap();
    x.run_blocking().unwrap();
    drop(x);
    assert!(
        l.dst == l.src,
        "bytes written beside control traffic differ"
    );
    let _ = &l.b;
}

#[test]
fn pushes_are_off_by_default_and_an_agent_pushes_only_its_own_metadata() {
    let auth = Auth::host_only;
    let t = Duration::from_secs(2);
    let (a, _) = tcp_agent("own-a", loopback(auth()));
    let (v, _) = tcp_agent("own-victim", loopback(auth()));
    // Off by default: refused, nothing loaded.
    let (b, bb) = tcp_agent("own-b", loopback(auth()));
    let addr = bb.listen_addrs()[0].to_string();
    let err = push_metadata(&addr, &auth(), &a.metadata_bytes(), t).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(err.to_string().contains("accept_pushes"), "{err}");
    assert!(b.peers().is_empty());

    // On: only under the name and instance the connection proved.
    let (c, cb) = tcp_agent(
        "own-c",
        TcpConfig {
            accept_pushes: true,
            ..loopback(auth())
        },
    );
    let addr = cb.listen_addrs()[0].to_string();
    let as_a = PeerIdentity::new("own-a", a.instance_id());
    let err = push_metadata_as(&addr, &auth(), &as_a, &v.metadata_bytes(), t).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(err.to_string().contains("only its own"), "{err}");
    let mut other_instance = a.metadata();
    other_instance.instance_id ^= 1;
    let err = push_metadata_as(&addr, &auth(), &as_a, &other_instance.encode(), t).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(c.peers().is_empty(), "{:?}", c.peers());
    assert_eq!(
        push_metadata(&addr, &auth(), &a.metadata_bytes(), t).unwrap(),
        "own-a"
    );
    assert_eq!(c.peers(), vec!["own-a".to_owned()]);
}

/// An agent asks a peer's listener to drop its metadata (NIXL's `invalidate_local_metadata`):
/// the peer's requests to it fail from then on. Whose metadata goes is the name and instance the
/// connection proved (the frame names nobody), and only where pushes are accepted.
#[test]
fn an_agent_invalidates_only_its_own_metadata_and_only_where_pushes_are_accepted() {
    let auth = Auth::host_only;
    let t = Duration::from_secs(2);
    let me = |x: &Agent| PeerIdentity::new(x.name(), x.instance_id());
    let (a, _) = tcp_agent("inv-a", loopback(auth()));
    let (c, _) = tcp_agent("inv-c", loopback(auth()));
    let (b, bb) = tcp_agent(
        "inv-b",
        TcpConfig {
            accept_pushes: true,
            ..loopback(auth())
        },
    );
    let addr = bb.listen_addrs()[0].to_string();
    let mut src = vec![7u8; 4096];
    let mut dst = vec![0u8; 4096];
    let _ra = reg(&a, &mut dst);
    let _rb = reg(&b, &mut src);
    for x in [&a, &c] {
        push_metadata(&addr, &auth(), &x.metadata_bytes(), t).unwrap();
    }
    // B writes to A: a connection to A is open when A invalidates.
    xfer(&b, XferOp::Write, &src, &dst, "inv-a", None)
        .unwrap()
        .run_blocking()
        .unwrap();

    // C drops only C, whatever it wishes; another instance of A, an anonymous caller, nobody.
    assert!(invalidate_metadata(&addr, &auth(), &me(&c), t).unwrap());
    assert!(!invalidate_metadata(&addr, &auth(), &me(&c), t).unwrap());
    let mut stale = me(&a);
    stale.instance ^= 1;
    let err = invalidate_metadata(&addr, &auth(), &stale, t).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(err.to_string().contains("only its own"), "{err}");
    let err = invalidate_metadata(&addr, &auth(), &PeerIdentity::anonymous(), t).unwrap_err();
    assert!(err.to_string().contains("anonymous"), "{err}");
    assert_eq!(b.peers(), vec!["inv-a".to_owned()]);

    // A drops A: B's next request to A fails cleanly, and nothing of A is left at B.
    assert!(invalidate_metadata(&addr, &auth(), &me(&a), t).unwrap());
    assert!(b.peers().is_empty(), "{:?}", b.peers());
    let err = xfer(&b, XferOp::Write, &src, &dst, "inv-a", None)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownPeer(ref p) if p == "inv-a"),
        "{err}"
    );

    // A listener that takes no pushes takes no invalidation either, and keeps what it loaded.
    let (d, db) = tcp_agent("inv-d", loopback(auth()));
    d.load_remote(&a.metadata_bytes()).unwrap();
    let addr = db.listen_addrs()[0].to_string();
    let err = invalidate_metadata(&addr, &auth(), &me(&a), t).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(err.to_string().contains("accept_pushes"), "{err}");
    assert_eq!(d.peers(), vec!["inv-a".to_owned()]);
}

/// Metadata that names one agent but sends the initiator to another's listener (a poisoned
/// etcd entry, a forged file): the listener proves who it is, and the initiator refuses.
#[test]
fn the_initiator_refuses_a_listener_that_is_not_the_agent_its_metadata_names() {
    let (a, _) = tcp_agent("who-a", loopback(Auth::host_only()));
    let (m, _) = tcp_agent("who-mallory", loopback(Auth::host_only()));
    let mut src = vec![1u8; 4096];
    let mut dst = vec![0u8; 4096];
    let _ra = reg(&a, &mut src);
    let _rm = reg(&m, &mut dst);
    // "who-victim", at mallory's address, with mallory's instance and regions.
    let mut forged = m.metadata();
    forged.name = "who-victim".into();
    a.load_remote_md(forged).unwrap();
    let err = xfer(&a, XferOp::Write, &src, &dst, "who-victim", None)
        .and_then(|x| x.run_blocking())
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(err.to_string().contains("is agent 'who-mallory'"), "{err}");
    assert!(dst.iter().all(|&b| b == 0));
}

/// A relay on the path that changes a connection's OPEN: inside TLS it cannot even find the
/// name, and a changed byte fails the record's authentication, so the listener drops the
/// connection and nothing is attributed to any name.
#[test]
fn a_name_rewritten_on_the_path_is_refused_and_notifications_name_the_proven_sender() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let (b, bb) = tcp_agent("seal-b", loopback(Auth::host_only()));
    let target = bb.listen_addrs()[0];

    // Straight: a notification names the sender its connection proved.
    let mut s = raw_data_connection(target, &Auth::host_only(), "mallory").unwrap();
    s.write_all(&notif_frame(1, b"hi")).unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert_eq!(
        (n[0].from.as_str(), n[0].msg.as_slice()),
        ("mallory", &b"hi"[..])
    );

    // Through a relay that changes the record carrying the OPEN frame (the initiator's third
    // encrypted record, after its TLS Finished and its proof).
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = relay.accept().unwrap();
        let mut up = TcpStream::connect(target).unwrap();
        let mut down = up.try_clone().unwrap();
        let mut c2 = c.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut down, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        let mut seen = Vec::new();
        let mut hello = [0u8; 8];
        if c.read_exact(&mut hello).is_ok() && up.write_all(&hello).is_ok() {
            seen.extend_from_slice(&hello);
            let mut encrypted = 0;
            loop {
                let mut head = [0u8; 5];
                if c.read_exact(&mut head).is_err() {
                    break;
                }
                let mut rec = vec![0u8; usize::from(u16::from_be_bytes([head[3], head[4]]))];
                if c.read_exact(&mut rec).is_err() {
                    break;
                }
                seen.extend_from_slice(&head);
                seen.extend_from_slice(&rec);
                if head[0] == 23 {
                    encrypted += 1;
                    if encrypted >= 3 {
                        if let Some(last) = rec.last_mut() {
                            *last ^= 1;
                        }
                    }
                }
                if up.write_all(&head).is_err() || up.write_all(&rec).is_err() {
                    break;
                }
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        seen
    });
    let r = raw_data_connection(relay_addr, &Auth::host_only(), "mallory");
    assert!(
        r.is_err(),
        "the listener must drop a connection whose OPEN was changed"
    );
    drop(r);
    let seen = t.join().unwrap();
    assert!(
        !seen.windows(7).any(|w| w == b"mallory"),
        "the initiator's name crossed the relay in the clear"
    );
    assert!(b.wait_notifs(Duration::from_millis(300)).is_empty());
}

fn notif_frame(id: u64, msg: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let body_len = 1 + 8 + 4 + msg.len();
    f.extend_from_slice(&(body_len as u32).to_le_bytes());
    f.push(4); // NOTIF
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    f.extend_from_slice(msg);
    f
}

/// One limit for notifications, checked where they are made: the largest arrives whole, with a
/// transfer or alone; one byte more is refused at the sender with the limit in the error, and the
/// connection to the peer is untouched.
#[test]
fn notifications_up_to_the_one_limit_arrive_and_longer_ones_are_refused_at_the_sender() {
    let l = linked("nsz", pattern(2, 8192), 8192);
    let (a, b) = (&l.a, &l.b);
    let largest = pattern(3, MAX_NOTIF_BYTES);
    a.send_notif("nsz-b", &largest).unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert!(n[0].msg == largest);

    let over = vec![1u8; MAX_NOTIF_BYTES + 1];
    let err = a.send_notif("nsz-b", &over).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Invalid, "{err}");
    // Refused by the agent itself, whichever backend would carry it.
    assert!(err.to_string().contains("MAX_NOTIF_BYTES"), "{err}");
    let err = xfer(
        a,
        XferOp::Write,
        &l.src,
        &l.dst,
        "nsz-b",
        Some(&vec![2u8; 2 << 20]),
    )
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Invalid, "{err}");

    let x = xfer(a, XferOp::Write, &l.src, &l.dst, "nsz-b", Some(&largest)).unwrap();
    x.run_blocking().unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert!(n[0].msg == largest);
    assert!(l.dst == l.src);
}

/// A standalone notification reaches the target only after every transfer its sender had
/// posted before it was carried out, on every connection: here a READ of one 64 MiB chunk on
/// one connection, and a notification posted either at once (the READ may still wait in its
/// lane's queue, not yet written) or once the target serves it; the notification goes on the
/// other connection. At the notification the target overwrites the READ's source (as a KV
/// prefill side frees and reuses blocks once decode says it stopped reading them): the READ must
/// have got only the old bytes. Without the barrier the notification overtakes the READ on the
/// idle connection and the READ's tail (or all of it) carries the new bytes.
#[test]
fn a_notification_arrives_after_every_frame_written_before_it_on_any_connection() {
    let len = 64 << 20;
    let mk = |name: &str| {
        let c = TcpConfig {
            chunk_bytes: len,
            conns_per_peer: 2,
            ..loopback(Auth::host_only())
        };
        tcp_agent(name, c).0
    };
    let (a, b) = (mk("barrier-a"), mk("barrier-b"));
    let mut src = pattern(9, len);
    let mut dst = vec![0u8; len];
    let _regs = [reg(&a, &mut dst), reg(&b, &mut src)];
    a.load_remote(&b.metadata_bytes()).unwrap();
    let src_addr = src.as_mut_ptr();
    for round in 0..4 {
        let read = a
            .create_xfer(
                XferOp::Read,
                &one(&dst),
                &one(&src),
                "barrier-b",
                opts(None),
            )
            .unwrap();
        read.post().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        // Odd rounds: once the target serves the READ. The session's connections are open
        // and idle by then (round 0 opened them), so a busy one is the READ being served.
        while round % 2 == 1 && b.peer_idle("barrier-a") {
            assert!(Instant::now() < until, "the READ never reached the target");
        }
        a.post_notif("barrier-b", b"stopped").unwrap();
        loop {
            let n = b.wait_notifs(Duration::from_millis(100));
            if n.iter().any(|n| n.msg == b"stopped") {
                break;
            }
            assert!(Instant::now() < until, "the notification never came");
        }
        // SAFETY: b's registered buffer, which b may reuse now that a said it stopped; the
        // kernel reading it for a READ still served is the race this test looks for.
        unsafe { std::ptr::write_bytes(src_addr, 0xEE, len) };
        read.wait_blocking(None).into_result().unwrap();
        let want = pattern(9, len);
        let late = dst.iter().zip(&want).filter(|(d, w)| d != w).count();
        assert!(
            late == 0,
            "round {round}: the READ was still served after the notification ({late} bytes of \
             the reused source landed)"
        );
        read.release();
        // SAFETY: as above; no transfer runs; restores the source for the next round.
        unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), src_addr, len) };
    }
}

/// `fence_peer` ends what the listener serves one peer at once, even a READ whose DATA that
/// peer does not read (the listener's thread blocked writing it, which would otherwise last
/// until `io_timeout`); afterwards the peer counts as idle. Another peer's READ, blocked the
/// same way, is untouched: all of its DATA comes once it reads.
#[test]
fn fence_peer_ends_a_peer_s_blocked_read_at_once_and_leaves_other_peers_alone() {
    use nixl_transports::fuzzing::tcp_wire::{decode_reply, finish, put_span, span_head};
    use nixl_transports::fuzzing::tcp_wire::{DATA, SPAN_READ};
    use std::io::{Read, Write};
    let len = 32 << 20;
    let (b, tb) = tcp_agent(
        "fence-b",
        TcpConfig {
            io_timeout: Duration::from_secs(10),
            ..loopback(Auth::host_only())
        },
    );
    let mut src = pattern(3, len);
    let _r = reg(&b, &mut src);
    let key = b.metadata().regions[0].key;
    let addr = tb.listen_addrs()[0];
    let read = |name: &str| {
        let mut s = raw_data_connection(addr, &Auth::host_only(), name).unwrap();
        let mut f = Vec::new();
        span_head(&mut f, SPAN_READ, 1, 0, key, 1);
        put_span(&mut f, src.as_ptr() as u64, len as u32);
        finish(&mut f);
        s.write_all(&f).unwrap();
        s
    };
    let (mut fenced, mut other) = (read("fence-a"), read("fence-c"));
    // Both READs are served and neither peer reads: the listener's threads block writing.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!b.peer_idle("fence-a") && !b.peer_idle("fence-c"));
    let t = Instant::now();
    assert!(b.fence_peer("fence-a", Duration::from_secs(5)));
    let took = t.elapsed();
    eprintln!("fence_peer returned after {took:?}");
    assert!(took < Duration::from_millis(500), "fence took {took:?}");
    assert!(b.peer_idle("fence-a"));
    assert!(!b.peer_idle("fence-c"), "the other peer's READ was touched");
    // A peer with nothing served is fenced at once.
    assert!(b.fence_peer("nobody", Duration::ZERO));
    // The fenced peer's stream ends (after what the kernel had buffered) before its DATA did.
    fenced
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let r = fenced.read_to_end(&mut got);
    assert!(
        r.as_ref().map_or_else(
            |e| !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            |_| true
        ),
        "{r:?}"
    );
    assert!(got.len() < len, "the fenced READ was carried out whole");
    // The other peer's READ goes on: its DATA, whole and right.
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = [0u8; 4];
    other.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(head) as usize];
    other.read_exact(&mut body).unwrap();
    assert_eq!(body[0], DATA);
    let reply = decode_reply(DATA, &body[1..]).unwrap();
    assert_eq!(reply.len, len as u64, "{reply:?}");
    let mut data = vec![0u8; len];
    other.read_exact(&mut data).unwrap();
    assert!(data == pattern(3, len), "the other peer's READ differs");
    // Fenced connections are gone: a new one of the fenced peer is served as usual.
    let mut again = read("fence-a");
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    again.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(head) as usize];
    again.read_exact(&mut body).unwrap();
    assert_eq!(decode_reply(DATA, &body[1..]).unwrap().len, len as u64);
    again.read_exact(&mut data).unwrap();
    assert!(data == pattern(3, len));
}
