//! The `tcp` backend between agents that share a secret: every connection is TLS 1.3 with the
//! secret proved inside it, bound to the channel and to both agents' names. Strangers in the
//! middle (a relay that forwards bytes, one that terminates TLS on both sides, one that flips a
//! byte) get nothing and break nothing silently; slow handshakes are cut at their deadline.

mod common;
use common::{loopback, one, opts, pattern, reg, tcp_agent, xfer};

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nixl_core::*;
use nixl_transports::tcp::{fetch_metadata, push_metadata, Auth, TcpConfig};

const SECRET: &str = "tls test secret";

/// [`loopback`], connecting and its handshake cut after 1 s.
fn cfg(auth: Auth) -> TcpConfig {
    TcpConfig {
        connect_timeout: Duration::from_secs(1),
        ..loopback(auth)
    }
}

/// `md` with its tcp connection info pointing at `addr` (a poisoned discovery entry).
fn pointing_at(mut md: AgentMetadata, addr: SocketAddr) -> AgentMetadata {
    let SocketAddr::V4(v4) = addr else {
        panic!("loopback v4 expected")
    };
    let mut info = vec![1u8, 1, 4];
    info.extend_from_slice(&v4.ip().octets());
    info.extend_from_slice(&v4.port().to_le_bytes());
    for b in &mut md.backends {
        if b.name == BackendName::Tcp {
            b.conn_info = info.clone();
        }
    }
    md
}

/// Agents `{tag}-a` and `{tag}-b` with the shared secret (`tune` adjusts their tcp settings),
/// `a_mem` registered with a and `b_mem` with b, and a reaching b through a [`Relay`]. The
/// caller's buffers, declared before, outlive the registrations returned.
fn relayed(
    tag: &str,
    tune: impl Fn(TcpConfig) -> TcpConfig,
    a_mem: &mut [u8],
    b_mem: &mut [u8],
) -> (Agent, Agent, Relay, [Registration; 2]) {
    let secret = || tune(cfg(Auth::with_secret(SECRET)));
    let (b, bb) = tcp_agent(&format!("{tag}-b"), secret());
    let (a, _) = tcp_agent(&format!("{tag}-a"), secret());
    let regs = [reg(&a, a_mem), reg(&b, b_mem)];
    let relay = Relay::start(bb.listen_addrs()[0]);
    a.load_remote_md(pointing_at(b.metadata(), relay.addr))
        .unwrap();
    (a, b, relay, regs)
}

/// A stranger without the secret in the middle of tcp connections to `target`: it forwards
/// bytes both ways; once `hijack` is set it stops forwarding the initiator's bytes (the test then
/// writes its own into the target side); with `flip_in` set it flips one bit of the initiator's
/// stream that many bytes later; it forwards at most `back` bytes of the target's stream (then
/// holds the rest until `back` grows; `u64::MAX`: no limit); with `old_hello` set it clears the
/// span-frames flag in the listener's plaintext hello (counting in `cleared` the hellos it
/// changed), as an older listener would send it.
struct Relay {
    addr: SocketAddr,
    hijack: Arc<AtomicBool>,
    flip_in: Arc<AtomicU64>,
    back: Arc<AtomicU64>,
    old_hello: Arc<AtomicBool>,
    cleared: Arc<AtomicU64>,
    to_target: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let r = Relay {
            addr: l.local_addr().unwrap(),
            hijack: Arc::new(AtomicBool::new(false)),
            flip_in: Arc::new(AtomicU64::new(u64::MAX)),
            back: Arc::new(AtomicU64::new(u64::MAX)),
            old_hello: Arc::new(AtomicBool::new(false)),
            cleared: Arc::new(AtomicU64::new(0)),
            to_target: Arc::default(),
        };
        let (hijack, flip_in, back, to_target) = (
            Arc::clone(&r.hijack),
            Arc::clone(&r.flip_in),
            Arc::clone(&r.back),
            Arc::clone(&r.to_target),
        );
        let (old_hello, cleared) = (Arc::clone(&r.old_hello), Arc::clone(&r.cleared));
        std::thread::spawn(move || {
            for a in l.incoming() {
                let Ok(a) = a else { return };
                let Ok(b) = TcpStream::connect(target) else {
                    continue;
                };
                to_target.lock().unwrap().push(b.try_clone().unwrap());
                let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                let (hijack, flip_in) = (Arc::clone(&hijack), Arc::clone(&flip_in));
                std::thread::spawn(move || pump(a, b, Some((hijack, flip_in))));
                let back = Arc::clone(&back);
                let old = old_hello
                    .load(Ordering::SeqCst)
                    .then(|| Arc::clone(&cleared));
                std::thread::spawn(move || pump_back(b2, a2, back, old));
            }
        });
        r
    }

    /// Writes `bytes` into every connection to the target, as the stranger.
    fn inject(&self, bytes: &[u8]) {
        for s in self.to_target.lock().unwrap().iter_mut() {
            let _ = s.write_all(bytes);
        }
    }
}

/// Copies `from` to `to` until either closes; for the initiator's direction, obeys the hijack
/// and flip controls.
fn pump(mut from: TcpStream, mut to: TcpStream, ctl: Option<(Arc<AtomicBool>, Arc<AtomicU64>)>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((hijack, flip_in)) = &ctl {
            if hijack.load(Ordering::SeqCst) {
                continue;
            }
            let left = flip_in.load(Ordering::SeqCst);
            if left != u64::MAX {
                if (n as u64) > left {
                    buf[left as usize] ^= 0x10;
                    flip_in.store(u64::MAX, Ordering::SeqCst);
                } else {
                    flip_in.store(left - n as u64, Ordering::SeqCst);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Copies the target's stream `from` to the initiator `to` until either closes, forwarding no
/// more than `budget` allows (held bytes wait for it to grow); with `old_hello`, first clears
/// the span-frames flag (bit 2 of the flags at bytes 6..8) of the listener's 8-byte hello.
fn pump_back(
    mut from: TcpStream,
    mut to: TcpStream,
    budget: Arc<AtomicU64>,
    old_hello: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 16 << 10];
    if let Some(cleared) = old_hello {
        let mut hello = [0u8; 8];
        if from.read_exact(&mut hello).is_err() {
            return;
        }
        if hello[6] & 4 != 0 {
            hello[6] &= !4;
            cleared.fetch_add(1, Ordering::SeqCst);
        }
        if to.write_all(&hello).is_err() {
            return;
        }
    }
    'outer: loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            let b = budget.load(Ordering::SeqCst);
            if b == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let k = (n - off).min(usize::try_from(b).unwrap_or(usize::MAX));
            if to.write_all(&buf[off..off + k]).is_err() {
                break 'outer;
            }
            if b != u64::MAX {
                budget.fetch_sub(k as u64, Ordering::SeqCst);
            }
            off += k;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A NOTIF frame as the wire format has it: length, type 4, id, message blob.
fn notif_frame(msg: &[u8]) -> Vec<u8> {
    let mut body = vec![4u8];
    body.extend_from_slice(&7u64.to_le_bytes());
    body.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    body.extend_from_slice(msg);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

#[test]
fn a_relay_that_forwards_the_handshake_cannot_use_the_session() {
    let mut src = pattern(5, 1 << 16);
    let mut dst = vec![0u8; 1 << 16];
    let one_lane = |c| TcpConfig {
        conns_per_peer: 1,
        ..c
    };
    let (a, b, relay, _regs) = relayed("relay", one_lane, &mut src, &mut dst);
    // The initiator connects through the relay: the handshake passes it untouched.
    let x = xfer(&a, XferOp::Write, &src, &dst, "relay-b", Some(b"from a")).unwrap();
    // Now the relay keeps the authenticated connection for itself and speaks on it.
    relay.hijack.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    relay.inject(&notif_frame(b"from the relay"));
    let got = b.wait_notifs(Duration::from_millis(700));
    assert!(
        got.iter().all(|n| n.msg != b"from the relay"),
        "the target delivered a notification a stranger injected: {got:?}"
    );
    // The initiator's own post, whose bytes the relay swallows, does not succeed.
    let res = x.run_blocking();
    assert!(res.is_err(), "a post through the hijacked relay succeeded");
    drop(x);
    assert!(dst.iter().all(|&v| v == 0), "bytes landed at the target");
}

#[test]
fn a_byte_flipped_on_the_wire_fails_the_transfer() {
    let len = 1 << 20;
    let mut src = pattern(6, len);
    let mut dst = vec![0u8; len];
    let one_lane = |c| TcpConfig {
        conns_per_peer: 1,
        chunk_bytes: 512 << 10,
        ..c
    };
    let (a, _b, relay, _regs) = relayed("flip", one_lane, &mut src, &mut dst);
    let x = xfer(&a, XferOp::Write, &src, &dst, "flip-b", None).unwrap();
    // One bit, well inside the first chunk's data.
    relay.flip_in.store(70_000, Ordering::SeqCst);
    let res = x.run_blocking();
    drop(x);
    assert_eq!(
        relay.flip_in.load(Ordering::SeqCst),
        u64::MAX,
        "the relay flipped nothing"
    );
    match &res {
        Err(e) => assert_ne!(e.class(), ErrorClass::Invalid, "{e}"),
        Ok(()) => assert!(
            dst == src,
            "the transfer ended Done with a byte changed on the wire"
        ),
    }
    assert!(
        res.is_err(),
        "a transfer whose bytes were changed ended Done"
    );
}

/// A READ whose DATA stops coming mid-chunk (a relay holds the target's stream) runs past its
/// deadline: it ends TimedOut and lets go of the initiator's memory within about a socket tick,
/// not after the connection's I/O timeout, though the TLS lane is inside that memory mid-chunk.
/// Then the held bytes flow again, are thrown away, and the next READ on the session is exact.
#[test]
fn a_read_stalled_mid_chunk_over_tls_lets_go_at_its_deadline() {
    let len = 8 << 20;
    let mut src = pattern(8, len);
    let mut dst = vec![0u8; len];
    let one_lane = |c| TcpConfig {
        conns_per_peer: 1,
        chunk_bytes: 8 << 20,
        io_timeout: Duration::from_secs(30),
        ..c
    };
    let (a, _b, relay, _regs) = relayed("stall", one_lane, &mut dst, &mut src);
    let read = |deadline| {
        a.create_xfer(
            XferOp::Read,
            &one(&dst),
            &one(&src),
            "stall-b",
            XferOptions {
                deadline,
                ..XferOptions::default()
            },
        )
        .unwrap()
    };
    // The session is up before the relay starts holding bytes. The deadline (1 s) leaves the
    // target time to send the first 1 MiB on a loaded machine; the bound on letting go (5 s) is
    // still far below the I/O timeout (30 s) that ended it before.
    a.send_notif("stall-b", b"hello").unwrap();
    relay.back.store(1 << 20, Ordering::SeqCst);
    let late = read(Some(Duration::from_secs(1)));
    let t = Instant::now();
    let err = late.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::TimedOut, "{err}");
    late.release();
    let took = t.elapsed();
    assert!(!late.is_held());
    assert!(
        took < Duration::from_secs(5),
        "the READ let go of its memory {took:?} after it was posted (I/O timeout 30 s)"
    );
    assert!(
        relay.back.load(Ordering::SeqCst) < 64 << 10,
        "the relay was not holding the DATA when the READ gave up"
    );
    drop(late);
    relay.back.store(u64::MAX, Ordering::SeqCst);
    let x = read(None);
    x.run_blocking().unwrap();
    drop(x);
    assert!(dst == src);
}

/// A listener whose hello does not offer span frames (an older one; or a stranger on the path
/// clearing the flag, which it can: the hello is plaintext, and all it gets is the old frames)
/// is sent the old one-piece-per-frame WRITEs and READs: requests made from prepared lists of
/// scattered blocks still move every byte to its place, both ways, over TLS.
#[test]
fn a_listener_without_span_frames_gets_old_frames_and_exact_bytes() {
    let (n, block) = (256usize, 4096usize);
    let mut at_b = pattern(3, n * block);
    let mut at_a = pattern(4, n * block);
    let (a, _b, relay, _regs) = relayed("old", |c| c, &mut at_a, &mut at_b);
    relay.old_hello.store(true, Ordering::SeqCst);
    let blocks = |base: *const u8| {
        DescList::from_descs(
            MemKind::Dram,
            (0..n)
                .map(|i| Desc::new(base as u64 + (i * block) as u64, block as u64, 0))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let l = a.prep_local(&blocks(at_a.as_ptr())).unwrap();
    let r = a.prep_remote("old-b", &blocks(at_b.as_ptr())).unwrap();
    // Every other block, the remote side reversed: no two neighbours merge into one run.
    let li: Vec<u32> = (0..n as u32).step_by(2).collect();
    let ri: Vec<u32> = li.iter().rev().copied().collect();
    let (a0, b0) = (at_a.clone(), at_b.clone());
    let x = a
        .create_xfer_prepped(XferOp::Read, &l, &li, &r, &ri, XferOptions::default())
        .unwrap();
    x.run_blocking().unwrap();
    drop(x);
    let w = a
        .create_xfer_prepped(XferOp::Write, &l, &ri, &r, &li, XferOptions::default())
        .unwrap();
    w.run_blocking().unwrap();
    drop(w);
    assert!(
        relay.cleared.load(Ordering::SeqCst) > 0,
        "the listener's hello never offered span frames, so nothing was downgraded"
    );
    let (mut want_a, mut want_b) = (a0.clone(), b0.clone());
    let at = |i: u32| i as usize * block..(i as usize + 1) * block;
    for (&x, &y) in li.iter().zip(&ri) {
        want_a[at(x)].copy_from_slice(&b0[at(y)]);
    }
    for (&x, &y) in ri.iter().zip(&li) {
        want_b[at(y)].copy_from_slice(&want_a[at(x)]);
    }
    assert!(at_a == want_a, "READ: a block landed in the wrong place");
    assert!(at_b == want_b, "WRITE: a block landed in the wrong place");
}

// --- a relay that terminates TLS on both sides ---------------------------------------------

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An initiator's opening on `s`, by hand: the plaintext hellos, then TLS 1.3 that trusts any
/// certificate (the proofs inside it are what authenticate).
fn tls_by_hand(s: &mut TcpStream) -> rustls::ClientConnection {
    let mut hello = [0u8; 8];
    s.read_exact(&mut hello).unwrap();
    s.write_all(b"NXTP\x02\x00\x01\x00").unwrap();
    let mut v = [0u8; 1];
    s.read_exact(&mut v).unwrap();
    assert_eq!(v[0], 0, "the target refused the plaintext hello");
    let ccfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    let mut cc =
        rustls::ClientConnection::new(Arc::new(ccfg), "nixl-agent".try_into().unwrap()).unwrap();
    while cc.is_handshaking() {
        cc.complete_io(s).unwrap();
    }
    cc
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_id(r: &mut impl Read, raw: &mut Vec<u8>) -> String {
    let mut n = [0u8; 2];
    r.read_exact(&mut n).unwrap();
    let mut name = vec![0u8; u16::from_le_bytes(n) as usize];
    r.read_exact(&mut name).unwrap();
    let mut inst = [0u8; 16];
    r.read_exact(&mut inst).unwrap();
    raw.extend_from_slice(&n);
    raw.extend_from_slice(&name);
    raw.extend_from_slice(&inst);
    String::from_utf8(name).unwrap()
}

/// What the terminating relay saw.
#[derive(Debug)]
struct Seen {
    claimed: String,
    target_verdict: u8,
    target_reason: String,
    metadata_leaked: bool,
}

#[test]
fn a_relay_that_terminates_tls_on_both_sides_is_refused_by_both() {
    let (b, bb) = tcp_agent("mitm-b", cfg(Auth::with_secret(SECRET)));
    let (a, _) = tcp_agent("mitm-a", cfg(Auth::with_secret(SECRET)));
    let mut dst = vec![0u8; 4096];
    let _rb = reg(&b, &mut dst);
    let target = bb.listen_addrs()[0];
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut sa, _) = l.accept().unwrap();
        // Towards the initiator: a listener with a "secret".
        sa.write_all(b"NXTP\x02\x00\x01\x00").unwrap();
        let mut hello = [0u8; 8];
        sa.read_exact(&mut hello).unwrap();
        sa.write_all(&[0]).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["mitm".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let scfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let mut sc = rustls::ServerConnection::new(Arc::new(scfg)).unwrap();
        while sc.is_handshaking() {
            sc.complete_io(&mut sa).unwrap();
        }
        let mut from_a = rustls::Stream::new(&mut sc, &mut sa);
        let mut proof = Vec::new();
        let claimed = read_id(&mut from_a, &mut proof);
        read_id(&mut from_a, &mut proof);
        let mut tag = [0u8; 32];
        from_a.read_exact(&mut tag).unwrap();
        proof.extend_from_slice(&tag);

        // Towards the target: an initiator, passing the initiator's proof on.
        let mut sb = TcpStream::connect(target).unwrap();
        let mut cc = tls_by_hand(&mut sb);
        let mut to_b = rustls::Stream::new(&mut cc, &mut sb);
        to_b.write_all(&proof).unwrap();
        let mut verdict = [0u8; 1];
        to_b.read_exact(&mut verdict).unwrap();
        let mut reason = String::new();
        if verdict[0] != 0 {
            let mut raw = Vec::new();
            let mut n = [0u8; 2];
            to_b.read_exact(&mut n).unwrap();
            raw.resize(u16::from_le_bytes(n) as usize, 0);
            to_b.read_exact(&mut raw).unwrap();
            reason = String::from_utf8_lossy(&raw).into_owned();
        }
        // Whatever the target said, try to use its session: OPEN(metadata) and MD_GET.
        let mut open = vec![1u8, 1];
        open.extend_from_slice(&4u16.to_le_bytes());
        open.extend_from_slice(b"mitm");
        open.extend_from_slice(&[0u8; 32]);
        let mut frames = (open.len() as u32).to_le_bytes().to_vec();
        frames.extend_from_slice(&open);
        frames.extend_from_slice(&[1, 0, 0, 0, 5]);
        let _ = to_b.write_all(&frames);
        let mut back = Vec::new();
        let _ = to_b.sock.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = to_b.read_to_end(&mut back);
        let metadata_leaked = back.windows(6).any(|w| w == b"mitm-b");

        // Towards the initiator: claim to be the target, with a proof the relay cannot make.
        let mut fake = vec![0u8];
        let mut id = Vec::new();
        id.extend_from_slice(&6u16.to_le_bytes());
        id.extend_from_slice(b"mitm-b");
        id.extend_from_slice(&[0u8; 16]);
        fake.extend_from_slice(&id);
        fake.extend_from_slice(&[0x42; 32]);
        let _ = from_a.write_all(&fake);
        let _ = from_a.flush();
        tx.send(Seen {
            claimed,
            target_verdict: verdict[0],
            target_reason: reason,
            metadata_leaked,
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    a.load_remote_md(pointing_at(b.metadata(), relay)).unwrap();
    let mut src = [1u8; 4096];
    let _ra = reg(&a, &mut src);
    let err = xfer(&a, XferOp::Write, &src, &dst, "mitm-b", None)
        .map(drop)
        .unwrap_err();
    let seen = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen.claimed, "mitm-a");
    assert_eq!(
        seen.target_verdict, 1,
        "the target accepted a proof made for another TLS session"
    );
    assert!(
        seen.target_reason.contains("relayed"),
        "{}",
        seen.target_reason
    );
    assert!(!seen.metadata_leaked, "the relay got the target's metadata");
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(dst.iter().all(|&v| v == 0));
}

#[test]
fn wrong_secret_and_wrong_peer_are_refused() {
    let (b, bb) = tcp_agent("who-b", cfg(Auth::with_secret(SECRET)));
    let (c, cb) = tcp_agent("who-c", cfg(Auth::with_secret(SECRET)));
    let (a, _) = tcp_agent("who-a", cfg(Auth::with_secret(SECRET)));
    let (w, _) = tcp_agent("who-w", cfg(Auth::with_secret("another secret")));
    let mut dst = vec![0u8; 4096];
    let _rb = reg(&b, &mut dst);
    let mut src = [3u8; 4096];
    let _ra = reg(&a, &mut src);
    let _rw = reg(&w, &mut src);
    let write = |from: &Agent, to: &str| {
        xfer(from, XferOp::Write, &src, &dst, to, None).and_then(|x| x.run_blocking())
    };
    // The wrong secret, both ways.
    w.load_remote(&b.metadata_bytes()).unwrap();
    let err = write(&w, "who-b").unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    let t = Duration::from_secs(2);
    let err = fetch_metadata(
        &bb.listen_addrs()[0].to_string(),
        &Auth::with_secret("nope"),
        t,
    )
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");

    // The right secret, but the address now belongs to another agent of the fleet.
    a.load_remote_md(pointing_at(b.metadata(), cb.listen_addrs()[0]))
        .unwrap();
    let err = write(&a, "who-b").unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(
        err.to_string().contains("who-c") && err.to_string().contains("who-b"),
        "{err}"
    );
    assert!(c.wait_notifs(Duration::from_millis(10)).is_empty());

    // The right agent, but another instance than the metadata says: refused too.
    let mut md = b.metadata();
    md.instance_id ^= 1;
    a.invalidate_remote("who-b").ok();
    a.load_remote_md(md).unwrap();
    assert!(write(&a, "who-b").is_err());
    assert!(dst.iter().all(|&v| v == 0));
}

#[test]
fn transfers_notifications_and_metadata_are_byte_exact_over_tls() {
    let c = |auth| TcpConfig {
        chunk_bytes: 256 << 10,
        // Pushes are off by default; on, an agent may push only its own metadata.
        accept_pushes: true,
        ..cfg(auth)
    };
    let (b, bb) = tcp_agent("rt-b", c(Auth::with_secret(SECRET)));
    let (a, ab) = tcp_agent("rt-a", c(Auth::with_secret(SECRET)));
    let len = 24 << 20;
    let mut src = pattern(9, len);
    let mut dst = vec![0u8; len];
    let mut back = vec![0u8; len];
    let _ra = reg(&a, &mut src);
    let _rb = reg(&b, &mut dst);
    let _rback = reg(&a, &mut back);
    // Metadata over TLS: fetched from the listener, pushed to it.
    let t = Duration::from_secs(3);
    let md = fetch_metadata(
        &bb.listen_addrs()[0].to_string(),
        &Auth::with_secret(SECRET),
        t,
    )
    .unwrap();
    assert_eq!(a.load_remote(&md).unwrap(), "rt-b");
    let name = push_metadata(
        &bb.listen_addrs()[0].to_string(),
        &Auth::with_secret(SECRET),
        &a.metadata_bytes(),
        t,
    )
    .unwrap();
    assert_eq!(name, "rt-a");
    let _ = ab;

    let w = xfer(&a, XferOp::Write, &src, &dst, "rt-b", Some(b"w")).unwrap();
    w.run_blocking().unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(
        (n[0].from.as_str(), n[0].msg.as_slice()),
        ("rt-a", &b"w"[..])
    );
    drop(w);
    assert!(dst == src, "written bytes differ");
    // READ back from odd pieces.
    let (mut local, mut remote, mut off, mut i) = (Vec::new(), Vec::new(), 0usize, 0usize);
    while off < len {
        let n = ((i * 7919) % 70_000 + 1).min(len - off);
        local.push(Desc::from_slice(&back[off..off + n]));
        remote.push(Desc::from_slice(&dst[off..off + n]));
        off += n;
        i += 1;
    }
    let r = a
        .create_xfer(
            XferOp::Read,
            &DescList::from_descs(MemKind::Dram, local).unwrap(),
            &DescList::from_descs(MemKind::Dram, remote).unwrap(),
            "rt-b",
            opts(Some(b"r")),
        )
        .unwrap();
    r.run_blocking().unwrap();
    drop(r);
    assert!(back == src, "read bytes differ");
    assert_eq!(b.wait_notifs(Duration::from_secs(5))[0].msg, b"r");
    a.send_notif("rt-b", b"hello").unwrap();
    assert_eq!(b.wait_notifs(Duration::from_secs(5))[0].msg, b"hello");
}

/// Opens a raw connection to `addr`, reads the listener's hello, then sends `bytes` one every
/// `gap`; returns how long the listener kept the connection open (at most `give_up`).
fn trickle(addr: SocketAddr, bytes: &[u8], gap: Duration, give_up: Duration) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 8];
    s.read_exact(&mut hello).unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let mut r = s.try_clone().unwrap();
    let c2 = Arc::clone(&closed);
    let reader = std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        while !matches!(r.read(&mut sink), Ok(0) | Err(_)) {}
        c2.store(true, Ordering::SeqCst);
        start.elapsed()
    });
    let mut i = 0;
    while start.elapsed() < give_up && !closed.load(Ordering::SeqCst) {
        let b = bytes[i % bytes.len()];
        i += 1;
        if s.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(gap);
    }
    let _ = s.shutdown(Shutdown::Both);
    reader.join().unwrap()
}

#[test]
fn a_handshake_that_trickles_is_cut_at_its_deadline() {
    let slow = |auth| TcpConfig {
        handshake_timeout: Duration::from_secs(1),
        ..cfg(auth)
    };
    let (_b, bb) = tcp_agent("loris-b", slow(Auth::with_secret(SECRET)));
    let (_p, pb) = tcp_agent("loris-p", slow(Auth::open()));
    // With a secret: the hello, then a TLS record header promising a long record, trickled.
    let mut tls = b"NXTP\x02\x00\x01\x00".to_vec();
    tls.extend_from_slice(&[0x16, 0x03, 0x01, 0x3f, 0xff]);
    tls.extend(std::iter::repeat_n(0u8, 4096));
    let open = trickle(
        bb.listen_addrs()[0],
        &tls,
        Duration::from_millis(150),
        Duration::from_secs(6),
    );
    assert!(open < Duration::from_millis(2500), "kept open {open:?}");
    // Without a secret: the hello, then an OPEN frame that never ends.
    let mut plain = b"NXTP\x02\x00\x00\x00".to_vec();
    plain.extend_from_slice(&[200, 0, 0, 0, 1, 0]);
    plain.extend(std::iter::repeat_n(b'x', 4096));
    let open = trickle(
        pb.listen_addrs()[0],
        &plain,
        Duration::from_millis(150),
        Duration::from_secs(6),
    );
    assert!(open < Duration::from_millis(2500), "kept open {open:?}");
}

#[test]
fn config_refuses_integrity_only_and_lone_certificates() {
    use nixl_transports::config::Config;
    let err =
        Config::from_toml("[auth]\nsecret = \"x\"\n[tls]\nmode = \"integrity-only\"").unwrap_err();
    assert!(err.to_string().contains("integrity-only"), "{err}");
    let err = Config::from_toml("[tls]\nmode = \"integrity-only\"").unwrap_err();
    assert!(err.to_string().contains("integrity-only"), "{err}");
    assert!(Config::from_toml("[tls]\nmode = \"none\"").is_err());
    assert!(Config::from_toml("[tls]\ncert = \"/x\"").is_err());
    let err = Config::from_toml("[tls]\ncert = \"/x\"\nkey = \"/y\"\nca = \"/z\"").unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    let err = Config::from_toml(
        "[auth]\nsecret = \"x\"\n[tls]\ncert = \"/nonexistent\"\nkey = \"/y\"\nca = \"/z\"",
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent"), "{err}");
    let c = Config::from_toml("[auth]\nsecret = \"x\"\n[tls]\nmode = \"encrypt\"").unwrap();
    assert!(c.tcp_config().unwrap().auth.has_secret());
}

/// A CA and certificates it issues, as PEM files in `dir`.
fn pki(dir: &std::path::Path, tag: &str, leaves: &[&str]) -> Vec<nixl_transports::tcp::CertFiles> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let ca_path = dir.join(format!("{tag}-ca.pem"));
    std::fs::write(&ca_path, ca.pem()).unwrap();
    leaves
        .iter()
        .map(|name| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![(*name).to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            let (c, k) = (
                dir.join(format!("{tag}-{name}.pem")),
                dir.join(format!("{tag}-{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            nixl_transports::tcp::CertFiles {
                cert: c,
                key: k,
                ca: ca_path.clone(),
            }
        })
        .collect()
}

#[test]
fn certificates_from_the_config_are_presented_and_verified_both_ways() {
    use nixl_transports::tcp::{TlsMode, TlsSettings};
    let dir = std::env::temp_dir().join(format!("nixl-tls-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = pki(&dir, "fleet", &["cert-x", "cert-y"]);
    let theirs = pki(&dir, "other", &["cert-z"]);
    let with = |f: &nixl_transports::tcp::CertFiles| {
        cfg(Auth::with_secret(SECRET).with_tls(TlsSettings::new(TlsMode::Encrypt, Some(f.clone()))))
    };
    let (x, _) = tcp_agent("cert-x", with(&ours[0]));
    let (y, yb) = tcp_agent("cert-y", with(&ours[1]));
    let (z, zb) = tcp_agent("cert-z", with(&theirs[0]));
    let mut src = pattern(11, 3 << 20);
    let mut dst = vec![0u8; 3 << 20];
    let _rx = reg(&x, &mut src);
    let _rz = reg(&z, &mut src);
    let _ry = reg(&y, &mut dst);
    // Same CA and secret: transfers are byte-exact.
    x.load_remote(&y.metadata_bytes()).unwrap();
    let w = xfer(&x, XferOp::Write, &src, &dst, "cert-y", None).unwrap();
    w.run_blocking().unwrap();
    drop(w);
    assert!(dst == src);
    // The secret but a certificate of another CA: refused at the TLS handshake, both ways.
    z.load_remote(&y.metadata_bytes()).unwrap();
    let err = xfer(&z, XferOp::Write, &src, &dst, "cert-y", None)
        .map(drop)
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert!(err.to_string().contains("tls"), "{err}");
    let err = fetch_metadata(
        &zb.listen_addrs()[0].to_string(),
        &Auth::with_secret(SECRET)
            .with_tls(TlsSettings::new(TlsMode::Encrypt, Some(ours[0].clone()))),
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    // And the right CA without a certificate of one's own (ephemeral): the listener refuses.
    assert!(fetch_metadata(
        &yb.listen_addrs()[0].to_string(),
        &Auth::with_secret(SECRET),
        Duration::from_secs(2)
    )
    .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The handshake of an initiator with the secret, done by hand (an independent implementation
/// of the proof): returns the TLS stream, past the listener's verdict, which must be OK.
fn handshake_by_hand(
    target: SocketAddr,
    me: (&str, u128),
) -> (rustls::ClientConnection, TcpStream) {
    use hmac::{Hmac, Mac};
    let mut s = TcpStream::connect(target).unwrap();
    let mut cc = tls_by_hand(&mut s);
    let e = cc
        .export_keying_material([0u8; 32], b"EXPORTER-nixl-tcp-auth-v2", None)
        .unwrap();
    let id = |out: &mut Vec<u8>, name: &str, inst: u128| {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&inst.to_le_bytes());
    };
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(b"nixl-tcp v2 initiator");
    m.update(&e);
    for (name, inst) in [me, ("", 0)] {
        m.update(&(name.len() as u64).to_le_bytes());
        m.update(name.as_bytes());
        m.update(&inst.to_le_bytes());
    }
    let mut msg = Vec::new();
    id(&mut msg, me.0, me.1);
    id(&mut msg, "", 0);
    msg.extend_from_slice(&m.finalize().into_bytes());
    let mut st = rustls::Stream::new(&mut cc, &mut s);
    st.write_all(&msg).unwrap();
    let mut v = [0u8; 1];
    st.read_exact(&mut v).unwrap();
    assert_eq!(v[0], 0, "the listener refused a proof made by hand");
    let mut raw = Vec::new();
    read_id(&mut st, &mut raw);
    let mut tag = [0u8; 32];
    st.read_exact(&mut tag).unwrap();
    (cc, s)
}

/// Sends OPEN(data) naming `name`/`instance` and returns OPENED's status byte.
fn open_as(cc: &mut rustls::ClientConnection, s: &mut TcpStream, name: &str, instance: u128) -> u8 {
    let mut body = vec![1u8, 0];
    body.extend_from_slice(&(name.len() as u16).to_le_bytes());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&instance.to_le_bytes());
    body.extend_from_slice(&0u128.to_le_bytes());
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    let mut st = rustls::Stream::new(cc, s);
    st.write_all(&f).unwrap();
    let mut head = [0u8; 6];
    st.read_exact(&mut head).unwrap();
    assert_eq!(head[4], 16, "OPENED expected");
    head[5]
}

#[test]
fn the_open_frame_must_name_the_agent_the_handshake_proved() {
    let (_b, bb) = tcp_agent("bind-b", cfg(Auth::with_secret(SECRET)));
    let target = bb.listen_addrs()[0];
    let (mut cc, mut s) = handshake_by_hand(target, ("bind-x", 5));
    assert_eq!(open_as(&mut cc, &mut s, "bind-x", 5), 0, "the proven name");
    let (mut cc, mut s) = handshake_by_hand(target, ("bind-x", 5));
    assert_eq!(open_as(&mut cc, &mut s, "bind-y", 5), 1, "another name");
    let (mut cc, mut s) = handshake_by_hand(target, ("bind-x", 5));
    assert_eq!(open_as(&mut cc, &mut s, "bind-x", 6), 1, "another instance");
}
