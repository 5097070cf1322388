//! Pull handoffs between a prefill and a decode agent (in one process, `local` backend): every
//! handoff ends in one terminal outcome on both sides, prefill frees only after decode's READ
//! landed or let go, and a peer's malformed messages change nothing.

mod common;
use common::{check, worker, Worker};

use std::time::{Duration, Instant};

use nixl_kv::handoff::*;
use nixl_kv::*;
use proptest::prelude::*;

fn shape(rank: u32, tp: u32) -> KvLayout {
    KvLayout {
        layers: 2,
        blocks: 16,
        tokens_per_block: 4,
        total_heads: 4,
        head_dim: 8,
        dtype_bytes: 2,
        kind: KvKind::Split,
        order: Order::LayerFirstNhd,
        tp_rank: rank,
        tp_size: tp,
        base: 0,
        dev_id: 0,
    }
}

fn setup() -> (Worker, Worker) {
    let p = worker("prefill", shape(0, 1), true);
    let d = worker("decode", shape(0, 1), false);
    p.agent.load_remote(&d.agent.metadata_bytes()).unwrap();
    d.agent.load_remote(&p.agent.metadata_bytes()).unwrap();
    (p, d)
}

/// Polls both sides until `until` says stop or 5 s pass.
fn drive(
    pre: &mut PrefillSide<'_>,
    dec: &mut DecodeSide<'_>,
    mut until: impl FnMut(&[Freed], &[DecodeEvent]) -> bool,
) -> (Vec<Freed>, Vec<DecodeEvent>) {
    let (mut f, mut e) = (Vec::new(), Vec::new());
    let t = Instant::now();
    while !until(&f, &e) {
        assert!(t.elapsed() < Duration::from_secs(5), "no end: {f:?} {e:?}");
        f.extend(pre.poll().0);
        e.extend(dec.poll().0);
        std::thread::sleep(Duration::from_millis(2));
    }
    (f, e)
}

/// Both sides, decode knowing prefill's layout.
fn sides<'a>(p: &'a Worker, d: &'a Worker) -> (PrefillSide<'a>, DecodeSide<'a>) {
    let pre = PrefillSide::new(&p.agent);
    let mut dec = DecodeSide::new(&d.agent, d.layout).unwrap();
    dec.add_prefill("prefill", vec![p.layout], vec!["prefill".into()])
        .unwrap();
    (pre, dec)
}

/// Prefill offers `blocks`; returns the handoff id and the offer as decode saw it.
fn offer(
    pre: &mut PrefillSide<'_>,
    dec: &mut DecodeSide<'_>,
    blocks: &[u32],
    lease: Duration,
) -> (u64, Offer) {
    let id = pre.offer("decode", "req-7", blocks, lease).unwrap();
    let (_, e) = drive(pre, dec, |_, e| offered(e).is_some());
    (id, offered(&e).unwrap())
}

fn offered(e: &[DecodeEvent]) -> Option<Offer> {
    e.iter().find_map(|x| match x {
        DecodeEvent::Offered(o) => Some(o.clone()),
        _ => None,
    })
}

#[test]
fn pull_lands_every_byte_then_prefill_frees() {
    let (p, d) = setup();
    let (mut pre, mut dec) = sides(&p, &d);
    let (id, o) = offer(&mut pre, &mut dec, &[3, 4, 9], Duration::from_secs(5));
    assert_eq!(
        (o.id, o.request.as_str(), &o.blocks[..]),
        (id, "req-7", &[3, 4, 9][..])
    );
    dec.pull(&o, &[0, 1, 2]).unwrap();
    let (f, e) = drive(&mut pre, &mut dec, |f, e| {
        !f.is_empty() && e.iter().any(|x| matches!(x, DecodeEvent::Ended { .. }))
    });
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].id, &f[0].outcome, &f[0].blocks[..]),
        (id, &Outcome::Done, &[3, 4, 9][..])
    );
    assert!(
        matches!(&e[0], DecodeEvent::Ended { outcome: Outcome::Done, blocks, .. } if blocks == &[0, 1, 2])
    );
    check(&d, &[(3, 0), (4, 1), (9, 2)]);
    assert_eq!(pre.held(), 0);
}

#[test]
fn decode_abort_frees_both_sides() {
    let (p, d) = setup();
    let (mut pre, mut dec) = sides(&p, &d);
    let (id, o) = offer(&mut pre, &mut dec, &[1], Duration::from_secs(5));
    dec.cancel(&o.from, o.id, "client went away");
    let (f, _) = drive(&mut pre, &mut dec, |f, _| !f.is_empty());
    assert_eq!(f[0].id, id);
    assert!(
        matches!(&f[0].outcome, Outcome::Cancelled(w) if w.contains("client went away")),
        "{f:?}"
    );
}

#[test]
fn prefill_abort_is_acknowledged_before_freeing() {
    let (p, d) = setup();
    let (mut pre, mut dec) = sides(&p, &d);
    let (id, o) = offer(&mut pre, &mut dec, &[1, 2], Duration::from_secs(30));
    pre.cancel(id, "preempted");
    // Not freed before decode acknowledges (the lease is 30 s).
    assert!(pre.poll().0.is_empty());
    let t = Instant::now();
    let (f, _) = drive(&mut pre, &mut dec, |f, _| !f.is_empty());
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(&f[0].outcome, Outcome::Cancelled(w) if w.contains("preempted")),
        "{f:?}"
    );
    // The offer is gone on the decode side.
    assert!(dec.pull(&o, &[0, 1]).is_err());
}

/// Prefill and decode over `tcp` on loopback, each knowing the other, with 16 MiB of prefill's
/// other data (`other`) that decode can keep reading into `into` ([`OverTcp::keep_reading`]).
/// Fields drop in order: the registrations go before the buffers they cover.
struct OverTcp {
    _regs: [nixl_core::Registration; 2],
    p: Worker,
    d: Worker,
    /// The two buffers as descriptor lists; only transfers touch them.
    lists: [nixl_core::DescList; 2],
    bufs: [Vec<u8>; 2],
}

fn over_tcp() -> OverTcp {
    use nixl_core::{Agent, Desc, DescList, MemKind};
    use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};
    use std::sync::Arc;
    let tcp = |name: &str| {
        let c = TcpConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            auth: Auth::host_only(),
            // Enough READ chunks asked at once to keep prefill's listener writing.
            window: 64,
            // A READ whose DATA is not read holds the listener for this long.
            io_timeout: Duration::from_secs(30),
            ..TcpConfig::default()
        };
        let b = Arc::new(TcpBackend::new(c));
        Agent::builder(name).backend(b).build().unwrap()
    };
    let p = common::worker_on(tcp("prefill"), shape(0, 1), true);
    let d = common::worker_on(tcp("decode"), shape(0, 1), false);
    let len = 16 << 20;
    let mut other = vec![7u8; len];
    let mut into = vec![0u8; len];
    let list =
        |b: &mut [u8]| DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(b)]).unwrap();
    // SAFETY: both buffers outlive their registrations (dropped first, see `OverTcp`), and are
    // read and written only by transfers.
    let regs = unsafe {
        [
            p.agent.register(&list(&mut other)).unwrap(),
            d.agent.register(&list(&mut into)).unwrap(),
        ]
    };
    p.agent.load_remote(&d.agent.metadata_bytes()).unwrap();
    d.agent.load_remote(&p.agent.metadata_bytes()).unwrap();
    OverTcp {
        _regs: regs,
        p,
        d,
        lists: [list(&mut other), list(&mut into)],
        bufs: [other, into],
    }
}

impl OverTcp {
    /// Decode READs prefill's `other` into `into` with eight READs of 16 MiB each, each posted
    /// again as it ends, until `stop` is set or `busy_for` passed, so that both connections
    /// always have frames queued at prefill's listener. Counts in `failed` the READs that
    /// failed (posted again as well).
    fn keep_reading(
        &self,
        stop: &std::sync::atomic::AtomicBool,
        failed: &std::sync::atomic::AtomicUsize,
        busy_for: Duration,
    ) {
        use nixl_core::{XferOp, XferOptions, XferStatus};
        use std::sync::atomic::Ordering;
        let [other, into] = &self.lists;
        let reqs: Vec<_> = (0..8)
            .map(|_| {
                self.d
                    .agent
                    .create_xfer(XferOp::Read, into, other, "prefill", XferOptions::default())
                    .unwrap()
            })
            .collect();
        let t = Instant::now();
        while !stop.load(Ordering::Acquire) && t.elapsed() < busy_for {
            for x in &reqs {
                match x.status() {
                    XferStatus::InProgress => {}
                    XferStatus::Idle | XferStatus::Done => x.post().unwrap(),
                    _ => {
                        failed.fetch_add(1, Ordering::AcqRel);
                        // The next post connects again.
                        let _ = x.post();
                    }
                }
            }
            std::thread::yield_now();
        }
        for x in &reqs {
            x.release();
        }
    }

    /// A data connection to prefill's listener in decode's name, opened by hand, that asks for
    /// a READ of all of `other` and never reads the answer: the listener's thread stays blocked
    /// writing it (until `io_timeout`), so the listener is never idle for decode, whatever the
    /// scheduler does with decode's own READs (which leave an idle instant now and then).
    fn stuck_read(&self) -> nixl_transports::fuzzing::RawConnection {
        use nixl_transports::fuzzing::tcp_wire::{finish, put_span, span_head, SPAN_READ};
        use std::io::Write;
        let other = self.bufs[0].as_ptr() as u64;
        let md = self.p.agent.metadata();
        let key = md
            .regions
            .iter()
            .find(|r| r.desc.addr == other)
            .unwrap()
            .key;
        let addr = nixl_transports::tcp::listen_addrs_in(&md)[0];
        let auth = nixl_transports::tcp::Auth::host_only();
        let mut s = nixl_transports::fuzzing::raw_data_connection(addr, &auth, "decode").unwrap();
        let mut f = Vec::new();
        span_head(&mut f, SPAN_READ, 1, 0, key, 1);
        put_span(&mut f, other, self.bufs[0].len() as u32);
        finish(&mut f);
        s.write_all(&f).unwrap();
        s
    }

    /// Waits until decode's READs keep prefill's listener busy.
    fn wait_busy(&self) {
        let t = Instant::now();
        while self.p.agent.peer_idle("decode") {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "decode's READs never came"
            );
        }
    }
}

/// Over `tcp`, decode's abort frees prefill's blocks at once, even while decode keeps every
/// connection to prefill's listener busy with other READs (so prefill's listener never goes
/// idle for that peer): the abort reaches prefill only after every frame decode wrote before
/// it was served. Without that, prefill waited for an idle listener, i.e. until decode's other
/// work stopped.
#[test]
fn over_tcp_decode_abort_frees_while_decode_keeps_every_connection_busy() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let w = over_tcp();
    let (mut pre, mut dec) = sides(&w.p, &w.d);
    let (id, o) = offer(&mut pre, &mut dec, &[1, 2], Duration::from_secs(30));
    let (stop, failed) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|s| {
        let busy = s.spawn(|| w.keep_reading(&stop, &failed, Duration::from_secs(6)));
        // Let the busy READs start, then decode aborts.
        w.wait_busy();
        dec.cancel(&o.from, o.id, "client went away");
        let t = Instant::now();
        let (f, _) = drive(&mut pre, &mut dec, |f, _| !f.is_empty());
        let took = t.elapsed();
        let still_busy = !busy.is_finished();
        stop.store(true, Ordering::Release);
        busy.join().unwrap();
        assert_eq!(failed.load(Ordering::Acquire), 0, "a busy READ failed");
        assert_eq!(f[0].id, id);
        assert!(matches!(&f[0].outcome, Outcome::Cancelled(_)), "{f:?}");
        assert!(
            still_busy && took < Duration::from_millis(1500),
            "freed after {took:?}, once decode's other READs stopped"
        );
    });
}

/// Over `tcp`, a decode that takes an offer and then says nothing (no renewal, no READ of the
/// blocks, no abort) while it keeps every connection to prefill's listener busy with READs of
/// other memory (and one connection more whose READ it never reads, so that the listener is
/// never idle for it): prefill still frees the blocks, by fencing decode `fence_after` past the
/// lease and its grace, and says so. Before the fence existed the blocks stayed held for as
/// long as decode kept its connections busy. Decode's other READs fail at the fence and
/// connect again.
#[test]
fn over_tcp_a_silent_decode_that_keeps_every_connection_busy_is_fenced_and_the_blocks_freed() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let w = over_tcp();
    let (mut pre, mut dec) = sides(&w.p, &w.d);
    let (lease, fence_after) = (Duration::from_millis(400), Duration::from_millis(300));
    pre.set_fence_after(fence_after);
    let (stop, failed) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|s| {
        let busy = s.spawn(|| w.keep_reading(&stop, &failed, Duration::from_secs(8)));
        let _stuck = w.stuck_read();
        w.wait_busy();
        let t = Instant::now();
        // Decode takes the offer, then goes silent (it never polls again).
        let (id, _) = offer(&mut pre, &mut dec, &[1, 2], lease);
        let mut f = Vec::new();
        while f.is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(4),
                "never freed while decode kept its connections busy"
            );
            f = pre.poll().0;
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = t.elapsed();
        let still_busy = !busy.is_finished();
        // Decode learns of the fence as its sessions fail: its READs in flight fail.
        let t2 = Instant::now();
        while failed.load(Ordering::Acquire) == 0 && t2.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Release);
        busy.join().unwrap();
        let failed = failed.load(Ordering::Acquire);
        eprintln!("freed {took:?} after the offer (lease {lease:?}, fence_after {fence_after:?}); {failed} busy READs failed at the fence");
        assert_eq!(
            (f[0].id, &f[0].outcome),
            (id, &Outcome::Failed("lease expired; decode fenced".into()))
        );
        assert!(still_busy, "decode's READs stopped before the free");
        let bound = 2 * lease + fence_after;
        assert!(
            took >= bound && took < bound + Duration::from_millis(700),
            "freed after {took:?}, bound {bound:?}"
        );
        assert!(failed > 0, "no READ of decode's was in flight at the fence");
        assert_eq!(pre.held(), 0);
    });
}

/// A tcp worker `me` (rank 0 of 1) that has talked to `peer`, which then went: its address now
/// accepts connections that never finish a handshake (the listener returned keeps it so).
fn with_frozen_peer(me: &str, peer: &str, fill: bool) -> (Worker, std::net::TcpListener) {
    use nixl_core::Agent;
    use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};
    use std::sync::Arc;
    let tcp = |name: &str| {
        let c = TcpConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            auth: Auth::host_only(),
            connect_timeout: Duration::from_secs(3),
            ..TcpConfig::default()
        };
        let b = Arc::new(TcpBackend::new(c));
        (Agent::builder(name).backend(b.clone()).build().unwrap(), b)
    };
    let ((a, _), (pa, pb)) = (tcp(me), tcp(peer));
    let w = common::worker_on(a, shape(0, 1), fill);
    w.agent.load_remote(&pa.metadata_bytes()).unwrap();
    w.agent.send_notif(peer, b"hello").unwrap();
    let addr = pb.listen_addrs()[0];
    drop((pa, pb));
    let silent = std::net::TcpListener::bind(addr).unwrap();
    // The session to the peer sees it go before the handoff starts.
    std::thread::sleep(Duration::from_millis(200));
    (w, silent)
}

/// Waits for one poll to report something; fails after 10 s.
fn first<T>(t: Instant, mut poll: impl FnMut() -> Vec<T>) -> Vec<T> {
    loop {
        let got = poll();
        if !got.is_empty() {
            return got;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the handoff never ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls (`poll`) until a side reports something, within 5 s of `t` (when the handoff of
/// `lease` started): its peer gone, that is after the lease and one more (the grace), not before.
fn poll_after_lease_and_grace<T>(
    t: Instant,
    lease: Duration,
    mut poll: impl FnMut() -> Vec<T>,
) -> Vec<T> {
    loop {
        let got = poll();
        if !got.is_empty() {
            assert!(t.elapsed() >= 2 * lease, "{:?}", t.elapsed());
            return got;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Offering to a decode that stopped answering returns at once: the offer is posted, not sent,
/// so the engine's poll loop never waits on the peer (a blocking send waited the whole
/// connect timeout here and failed); the handoff then ends `Failed(lease expired)` through
/// poll within two leases.
#[test]
fn over_tcp_an_offer_to_a_frozen_decode_never_blocks_and_ends_by_its_lease() {
    let (p, _silent) = with_frozen_peer("prefill", "decode", true);
    let mut pre = PrefillSide::new(&p.agent);
    let t = Instant::now();
    let id = pre
        .offer("decode", "r", &[1], Duration::from_millis(300))
        .unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "offer blocked for {took:?}"
    );
    let f = first(t, || pre.poll().0);
    assert_eq!(
        (f[0].id, &f[0].outcome),
        (id, &Outcome::Failed("lease expired".into()))
    );
}

/// As above for a push reservation asked of a prefill writer that stopped answering.
#[test]
fn over_tcp_a_reservation_with_a_frozen_prefill_never_blocks_and_ends_by_its_lease() {
    let (d, _silent) = with_frozen_peer("decode", "prefill", false);
    let mut dec = DecodeSide::new(&d.agent, d.layout).unwrap();
    dec.add_prefill("prefill", vec![shape(0, 1)], vec!["prefill".into()])
        .unwrap();
    let t = Instant::now();
    let id = dec
        .reserve("prefill", "r", &[1], Duration::from_millis(300))
        .unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "reserve blocked for {took:?}"
    );
    let e = first(t, || dec.poll().0);
    assert!(
        matches!(&e[0], DecodeEvent::Ended { id: i, outcome: Outcome::Failed(_), push: true, .. } if *i == id),
        "{e:?}"
    );
}

#[test]
fn lease_expiry_frees_after_a_grace_period_when_decode_is_gone() {
    let (p, d) = setup();
    let mut pre = PrefillSide::new(&p.agent);
    let lease = Duration::from_millis(150);
    let t = Instant::now();
    let id = pre.offer("decode", "r", &[1], lease).unwrap();
    // Decode never answers (killed): prefill frees after the lease and one more, not before.
    drop(d);
    let f = poll_after_lease_and_grace(t, lease, || pre.poll().0);
    assert_eq!(f[0].id, id);
    assert_eq!(f[0].outcome, Outcome::Failed("lease expired".into()));
}

#[test]
fn renewal_keeps_the_lease() {
    let (p, d) = setup();
    let (mut pre, mut dec) = sides(&p, &d);
    let lease = Duration::from_millis(200);
    let (_, o) = offer(&mut pre, &mut dec, &[1], lease);
    let t = Instant::now();
    while t.elapsed() < 3 * lease {
        dec.renew(&o.from, o.id).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert!(pre.poll().0.is_empty(), "freed while renewed");
    }
    assert_eq!(pre.held(), 1);
}

#[test]
fn mismatched_layouts_are_refused_at_handshake() {
    let d = shape(0, 1);
    let mut p = shape(0, 1);
    p.head_dim = 16;
    let a = nixl_core::Agent::builder("x").build().unwrap();
    let mut dec = DecodeSide::new(&a, d).unwrap();
    let e = dec.add_prefill("p", vec![p], vec!["p".into()]).unwrap_err();
    assert!(
        e.to_string().contains("head_dim: prefill 16, decode 8"),
        "{e}"
    );
}

#[test]
fn peer_messages_out_of_bounds_are_refused() {
    let ready = |blocks: Vec<u32>, lease_ms| {
        Msg::Ready {
            id: 1,
            request: "r".into(),
            blocks,
            lease_ms,
        }
        .encode()
    };
    assert!(
        Msg::decode(&ready(vec![1], 0)).unwrap().is_err(),
        "zero lease"
    );
    assert!(
        Msg::decode(&ready(vec![1], 700_000)).unwrap().is_err(),
        "lease over the max"
    );
    assert!(
        Msg::decode(&ready(vec![], 10)).unwrap().is_err(),
        "no blocks"
    );
    assert!(Msg::decode(&ready(vec![0; MAX_HANDOFF_BLOCKS + 1], 10))
        .unwrap()
        .is_err());
    let mut b = ready(vec![1, 2], 10);
    b.push(0);
    assert!(Msg::decode(&b).unwrap().is_err(), "trailing byte");
    assert!(Msg::decode(b"not kv").is_none());
    let long = Msg::Abort {
        id: 1,
        reason: "x".repeat(MAX_REASON + 1),
    };
    assert!(Msg::decode(&long.encode()).unwrap().is_err());
}

proptest! {
    #[test]
    fn messages_round_trip_and_garbage_never_panics(
        id in any::<u64>(), req in "[a-z0-9-]{0,40}",
        blocks in proptest::collection::vec(any::<u32>(), 1..50),
        lease in 1u32..600_000,
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        cut in 0usize..64,
    ) {
        for m in [
            Msg::Ready { id, request: req.clone(), blocks: blocks.clone(), lease_ms: lease },
            Msg::Done { id, request: req.clone() },
            Msg::Abort { id, reason: req.clone() },
            Msg::Renew { id },
            Msg::Reserve { id, request: req.clone(), blocks: blocks.clone(), lease_ms: lease },
        ] {
            let b = m.encode();
            prop_assert_eq!(Msg::decode(&b).unwrap().unwrap(), m);
            if cut < b.len() {
                prop_assert!(Msg::decode(&b[..cut]).is_none_or(|r| r.is_err()));
            }
        }
        let mut g = b"NKV1".to_vec();
        g.extend(garbage);
        let _ = Msg::decode(&g);
    }
}

/// Push from a prefill group of `ptp` ranks into one decode rank; returns the workers.
fn push_setup(ptp: u32) -> (Vec<Worker>, Worker) {
    let ps: Vec<Worker> = (0..ptp)
        .map(|r| worker(&format!("prefill-{r}"), shape(r, ptp), true))
        .collect();
    let d = worker("decode", shape(0, 1), false);
    for p in &ps {
        p.agent.load_remote(&d.agent.metadata_bytes()).unwrap();
        d.agent.load_remote(&p.agent.metadata_bytes()).unwrap();
    }
    (ps, d)
}

#[test]
fn push_tp_2_to_1_lands_every_byte_on_both_sides() {
    let (ps, d) = push_setup(2);
    let group: Vec<KvLayout> = ps.iter().map(|w| w.layout).collect();
    let mut pres: Vec<PrefillSide<'_>> = ps
        .iter()
        .enumerate()
        .map(|(r, w)| {
            let mut s = PrefillSide::new(&w.agent);
            s.add_decode("decode", d.layout, group.clone(), r as u32)
                .unwrap();
            s
        })
        .collect();
    let mut dec = DecodeSide::new(&d.agent, d.layout).unwrap();
    dec.add_prefill(
        "prefill-0",
        group.clone(),
        vec!["prefill-0".into(), "prefill-1".into()],
    )
    .unwrap();
    let id = dec
        .reserve("prefill-0", "req-9", &[5, 6], Duration::from_secs(5))
        .unwrap();
    assert!(id >= PUSH_ID_BASE);
    let t = Instant::now();
    let (mut freed, mut ended) = (Vec::new(), Vec::new());
    while ended.is_empty() || freed.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(5), "{freed:?} {ended:?}");
        for p in pres.iter_mut() {
            let (f, _) = p.poll();
            freed.extend(f);
            for r in p.take_reservations() {
                assert_eq!((r.id, r.request.as_str()), (id, "req-9"));
                p.push(&r, &[2, 11]).unwrap();
            }
        }
        ended.extend(dec.poll().0);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        freed
            .iter()
            .all(|f| f.outcome == Outcome::Done && f.blocks == [2, 11]),
        "{freed:?}"
    );
    assert!(
        matches!(&ended[0], DecodeEvent::Ended { outcome: Outcome::Done, blocks, .. } if blocks == &[5, 6]),
        "{ended:?}"
    );
    check(&d, &[(2, 5), (11, 6)]);
}

#[test]
fn push_reservation_expires_when_prefill_never_writes() {
    let (ps, d) = push_setup(1);
    let mut dec = DecodeSide::new(&d.agent, d.layout).unwrap();
    dec.add_prefill("prefill-0", vec![ps[0].layout], vec!["prefill-0".into()])
        .unwrap();
    let lease = Duration::from_millis(150);
    let t = Instant::now();
    dec.reserve("prefill-0", "r", &[1], lease).unwrap();
    // Prefill is gone (killed): decode frees after the lease and one more, not before.
    drop(ps);
    let ev = poll_after_lease_and_grace(t, lease, || dec.poll().0);
    assert!(
        matches!(&ev[0], DecodeEvent::Ended { outcome: Outcome::Failed(w), .. } if w == "lease expired"),
        "{ev:?}"
    );
}

#[test]
fn push_reservation_cancelled_before_the_write_is_acknowledged() {
    let (ps, d) = push_setup(1);
    let mut pre = PrefillSide::new(&ps[0].agent);
    pre.add_decode("decode", d.layout, vec![ps[0].layout], 0)
        .unwrap();
    let mut dec = DecodeSide::new(&d.agent, d.layout).unwrap();
    dec.add_prefill("prefill-0", vec![ps[0].layout], vec!["prefill-0".into()])
        .unwrap();
    let id = dec
        .reserve("prefill-0", "r", &[1], Duration::from_secs(30))
        .unwrap();
    let t = Instant::now();
    while pre.reservations_pending() == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
        pre.poll();
    }
    dec.cancel_reservation(id, "client went away");
    let mut ev = Vec::new();
    while ev.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(2), "not acknowledged");
        pre.poll();
        ev = dec.poll().0;
    }
    assert!(
        matches!(&ev[0], DecodeEvent::Ended { outcome: Outcome::Cancelled(w), .. } if w.contains("client went away")),
        "{ev:?}"
    );
    assert!(
        pre.take_reservations().is_empty(),
        "the reservation is gone on prefill"
    );
}
