//! Two real processes on one node, every byte checked: a scripted peer process
//! (`nixl-test-peer`) and this test process as the initiator.
//!
//! Together these tests move more than 4 GiB: 1 GiB each way to a memfd target (mapped copies)
//! and to a heap target (cross-memory attach), plus many-descriptor and fault cases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::*;
use nixl_tests::{fill, fill_at, first_mismatch, hex, Peer};
use nixl_transports::shm::{ShmBackend, ShmConfig};

/// Registration for tests. Every buffer a test registers is declared before its registration
/// (so it is dropped after it), and the test reads it only after the transfers that write it
/// have completed: the contract of [`Agent::register`].
trait RegisterExt {
    fn reg(&self, list: &DescList) -> Result<Registration>;
}

impl RegisterExt for Agent {
    fn reg(&self, list: &DescList) -> Result<Registration> {
        // SAFETY: see the trait: test buffers outlive their registrations.
        unsafe { self.register(list) }
    }
}

const PEER: &str = env!("CARGO_BIN_EXE_nixl-test-peer");

fn initiator(name: &str) -> Agent {
    Agent::builder(name)
        .backends(nixl_transports::default_backends())
        .build()
        .unwrap()
}

/// An initiator whose cross-memory transfers are all carried out by the target (no grants):
/// for the tests of that round-trip path's faults (a stopped target, late answers).
fn round_trip_initiator(name: &str, op_timeout: Duration) -> Agent {
    let shm = ShmConfig {
        op_timeout,
        cma_grants: false,
        ..ShmConfig::default()
    };
    Agent::builder(name)
        .backend(Arc::new(ShmBackend::new(shm)))
        .build()
        .unwrap()
}

fn dram(d: Vec<Desc>) -> DescList {
    DescList::from_descs(MemKind::Dram, d).unwrap()
}

/// A request of `op` between DRAM descriptors, here and at `peer`.
fn dram_xfer(
    me: &Agent,
    op: XferOp,
    local: Vec<Desc>,
    remote: Vec<Desc>,
    peer: &str,
    opts: XferOptions,
) -> XferRequest {
    me.create_xfer(op, &dram(local), &dram(remote), peer, opts)
        .unwrap()
}

/// A WRITE of all of `src` into `remote` at `peer`.
fn write_xfer(me: &Agent, src: &[u8], remote: Desc, peer: &str, opts: XferOptions) -> XferRequest {
    dram_xfer(
        me,
        XferOp::Write,
        vec![Desc::from_slice(src)],
        vec![remote],
        peer,
        opts,
    )
}

/// Runs a request of `op` between DRAM descriptors to its end.
fn dram_run(me: &Agent, op: XferOp, local: Vec<Desc>, remote: Vec<Desc>, peer: &str) {
    dram_xfer(me, op, local, remote, peer, Default::default())
        .run_blocking()
        .unwrap();
}

/// Options that deliver `msg` to the peer after each post's data.
fn notif(msg: &[u8]) -> XferOptions {
    XferOptions {
        notif: Some(msg.to_vec()),
        ..Default::default()
    }
}

fn remote_region(p: &Peer) -> Desc {
    AgentMetadata::decode(&p.metadata).unwrap().regions[0].desc
}

/// Connects `me` and `peer` both ways.
fn connect(me: &Agent, peer: &mut Peer) -> String {
    let name = me.load_remote(&peer.metadata).unwrap();
    let reply = peer.cmd(&format!("load {}", hex(&me.metadata_bytes())));
    assert!(reply.starts_with("ok"), "{reply}");
    name
}

/// A peer process named `peer` serving `size` bytes, and an initiator `me` connected to it
/// both ways: (the peer, the initiator, the peer's agent name, the peer's region).
fn pair(peer: &str, me: &str, size: usize, memfd: bool) -> (Peer, Agent, String, Desc) {
    let mut peer = Peer::start(PEER, peer, size, memfd);
    let me = initiator(me);
    let name = connect(&me, &mut peer);
    let remote = remote_region(&peer);
    (peer, me, name, remote)
}

fn gib_each_way(memfd: bool) {
    let size = 1 << 30;
    let (mut peer, me, name, remote) = pair("target", "initiator", size, memfd);
    let mut src = vec![0u8; size];
    fill(&mut src, 11);
    let mut back = vec![0u8; size];
    let back_desc = Desc::from_mut_slice(&mut back);
    let _r = me
        .reg(&dram(vec![Desc::from_slice(&src), back_desc]))
        .unwrap();

    // WRITE 1 GiB with a notification; the target checks every byte when it arrives.
    let w = write_xfer(&me, &src, remote, &name, notif(b"gib"));
    assert_eq!(w.backend(), BackendName::Shm, "{}", w.info().reason);
    w.run_blocking().unwrap();
    assert_eq!(
        peer.cmd("notif-check 10000 11"),
        format!("ok {}", hex(b"gib"))
    );

    // The target writes another pattern; READ 1 GiB back and check every byte here.
    assert_eq!(peer.cmd("fill 12"), "ok");
    dram_run(&me, XferOp::Read, vec![back_desc], vec![remote], &name);
    assert_eq!(first_mismatch(&back, 12), None);
}

#[test]
fn one_gib_each_way_memfd_target() {
    gib_each_way(true);
}

#[test]
fn one_gib_each_way_heap_target() {
    gib_each_way(false);
}

/// Splits `len` into pieces of 1..=9000 bytes, deterministic per seed.
fn pieces(len: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut x = seed | 1;
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = ((x % 9000) as usize + 1).min(len - off);
        out.push((off, n));
        off += n;
    }
    out
}

fn many_descriptors(memfd: bool) {
    // 48 MiB in ~11k pieces of odd sizes, placed at odd offsets, in shuffled order.
    let size = 48 << 20;
    let (mut peer, me, name, remote) = pair("target-many", "initiator-many", size + 4096, memfd);
    let ps = pieces(size, 99);
    assert!(ps.len() > 10_000);
    let mut src = vec![0u8; size + 13];
    fill_at(&mut src, 0, 5);
    let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
    // Piece i goes from src[13 + off] to remote[off + 7] (odd alignment on both sides).
    let mut order: Vec<usize> = (0..ps.len()).collect();
    order.reverse();
    order.swap(0, ps.len() / 2);
    let local: Vec<Desc> = order
        .iter()
        .map(|&i| Desc::new(src.as_ptr() as u64 + 13 + ps[i].0 as u64, ps[i].1 as u64, 0))
        .collect();
    let remote_l: Vec<Desc> = order
        .iter()
        .map(|&i| Desc::new(remote.addr + 7 + ps[i].0 as u64, ps[i].1 as u64, 0))
        .collect();
    dram_run(&me, XferOp::Write, local, remote_l.clone(), &name);

    // READ the whole remote buffer back in one descriptor and compare every byte.
    let mut back = vec![0u8; size + 4096];
    let back_desc = Desc::from_mut_slice(&mut back);
    let _rb = me.reg(&dram(vec![back_desc])).unwrap();
    dram_run(&me, XferOp::Read, vec![back_desc], vec![remote], &name);
    assert!(
        back[..7].iter().all(|&b| b == 0),
        "bytes before the first piece touched"
    );
    assert!(
        back[7..7 + size] == src[13..13 + size],
        "scattered WRITE differs"
    );
    assert!(
        back[7 + size..].iter().all(|&b| b == 0),
        "bytes after the last piece touched"
    );

    // Scattered READ: the peer refills, we read the pieces back into place.
    assert_eq!(peer.cmd("fill 6"), "ok");
    let mut dst = vec![0u8; size + 13];
    let dst_base = Desc::from_mut_slice(&mut dst);
    let _rd = me.reg(&dram(vec![dst_base])).unwrap();
    let local: Vec<Desc> = order
        .iter()
        .map(|&i| Desc::new(dst_base.addr + 13 + ps[i].0 as u64, ps[i].1 as u64, 0))
        .collect();
    dram_run(&me, XferOp::Read, local, remote_l, &name);
    let mut expect = vec![0u8; size];
    fill_at(&mut expect, 7, 6);
    assert!(dst[13..] == expect[..], "scattered READ differs");
}

#[test]
fn thousands_of_odd_descriptors_memfd_target() {
    many_descriptors(true);
}

#[test]
fn thousands_of_odd_descriptors_heap_target() {
    many_descriptors(false);
}

/// Creates and runs a 4 KiB WRITE to `remote`; returns its error. The owner may refuse when
/// the request is prepared (the mapped path asks it for the mapping then) or when it is posted
/// (cross-memory attach: the owner checks every Op).
fn attempt(me: &Agent, peer: &str, src: &[u8], remote: Desc) -> Error {
    let created = me.create_xfer(
        XferOp::Write,
        &dram(vec![Desc::from_slice(&src[..4096])]),
        &dram(vec![remote]),
        peer,
        Default::default(),
    );
    match created {
        Err(e) => e,
        Ok(w) => w.run_blocking().expect_err("forged access succeeded"),
    }
}

#[test]
fn forged_metadata_is_refused_by_the_owner() {
    for memfd in [false, true] {
        let mut peer = Peer::start(PEER, "owner", 1 << 20, memfd);
        let me = initiator("forger");
        let name = connect(&me, &mut peer);
        assert_eq!(peer.cmd("fill 3"), "ok");
        let src = vec![0xAAu8; 2 << 20];
        let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
        let real = AgentMetadata::decode(&peer.metadata).unwrap();
        let region = real.regions[0].desc;

        // A wrong key.
        let mut forged = real.clone();
        forged.generation += 1;
        forged.regions[0].key ^= 0x5555;
        me.load_remote(&forged.encode()).unwrap();
        let err = attempt(&me, &name, &src, Desc::new(region.addr, 4096, 0));
        assert_eq!(err.class(), ErrorClass::Denied, "memfd={memfd}: {err}");
        assert!(err.to_string().contains("key"), "{err}");

        // A region claimed twice as large: the part beyond the real one is refused.
        let mut forged = real.clone();
        forged.generation += 2;
        forged.regions[0].desc.len *= 2;
        me.load_remote(&forged.encode()).unwrap();
        let err = attempt(
            &me,
            &name,
            &src,
            Desc::new(region.addr + region.len, 4096, 0),
        );
        assert_eq!(err.class(), ErrorClass::Denied, "memfd={memfd}: {err}");
        // Nothing was touched.
        assert_eq!(peer.cmd("check 3"), "ok", "memfd={memfd}");
    }
}

#[test]
fn notifications_both_ways() {
    let mut peer = Peer::start(PEER, "chatty", 4096, false);
    let me = initiator("listener");
    let name = connect(&me, &mut peer);
    me.send_notif(&name, b"hello").unwrap();
    assert_eq!(
        peer.cmd("notif 5000"),
        format!("notif listener {}", hex(b"hello"))
    );
    assert_eq!(peer.cmd(&format!("send listener {}", hex(b"world"))), "ok");
    let got = me.wait_notifs(Duration::from_secs(5));
    assert_eq!(
        got,
        vec![Notification {
            from: "chatty".into(),
            msg: b"world".to_vec()
        }]
    );
}

fn kill_mid_transfer(memfd: bool) {
    let size = 512 << 20;
    let (mut peer, me, name, remote) = pair("victim", "survivor", size, memfd);
    let src = vec![1u8; size];
    let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
    let w = write_xfer(&me, &src, remote, &name, notif(b"x"));
    w.run_blocking().unwrap();
    // Post in a loop and kill the target while a post is in flight.
    let killer = {
        let pid = peer.child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            // SAFETY: kill(2) takes plain integers; the pid is our child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
    };
    let start = Instant::now();
    let mut outcome = None;
    while start.elapsed() < Duration::from_secs(20) {
        w.post().unwrap();
        let st = w.wait_blocking(Some(Duration::from_secs(10)));
        assert!(st.is_terminal(), "post did not end within 10 s: {st:?}");
        if let XferStatus::Failed(e) = st {
            outcome = Some((e, start.elapsed()));
            break;
        }
    }
    killer.join().unwrap();
    peer.kill();
    let (err, _) = outcome.expect("posts kept succeeding after the target died");
    assert_eq!(
        err.class(),
        ErrorClass::RemoteDisconnect,
        "memfd={memfd}: {err}"
    );
    // The agent keeps working, and the peer restarted under the same name (a new instance)
    // replaces the dead one: connections are made again and transfers work.
    let mut fresh = Peer::start(PEER, "victim", size, memfd);
    let name = connect(&me, &mut fresh);
    let remote = remote_region(&fresh);
    dram_run(
        &me,
        XferOp::Write,
        vec![Desc::from_slice(&src[..4096])],
        vec![Desc::new(remote.addr, 4096, 0)],
        &name,
    );
    me.send_notif(&name, b"still here").unwrap();
    assert!(fresh.cmd("notif 5000").starts_with("notif survivor"));
}

#[test]
fn target_killed_mid_transfer_heap() {
    kill_mid_transfer(false);
}

#[test]
fn target_killed_mid_transfer_memfd() {
    kill_mid_transfer(true);
}

#[test]
fn garbage_metadata_is_an_error_not_a_crash() {
    let me = initiator("careful");
    for bad in [&b""[..], b"NXMD", b"garbage garbage garbage", &[0xff; 4096]] {
        let err = me.load_remote(bad).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Invalid, "{err}");
    }
}

#[test]
fn owner_deregistration_revokes_access() {
    for memfd in [true, false] {
        let (mut peer, me, name, remote) = pair("revoker", "revoked", 1 << 20, memfd);
        let src = vec![9u8; 1 << 20];
        let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
        let w = write_xfer(&me, &src, remote, &name, Default::default());
        w.run_blocking().unwrap();
        // The owner deregisters; with a mapping out, it revokes it and waits for our ack.
        let reply = peer.cmd("dereg");
        let ms: u64 = reply.strip_prefix("ok ").expect(&reply).parse().unwrap();
        assert!(ms < 1000, "memfd={memfd}: deregistration took {ms} ms");
        let err = w.run_blocking().unwrap_err();
        assert_eq!(err.class(), ErrorClass::Denied, "memfd={memfd}: {err}");
    }
}

/// Cross-memory grants: the initiator copies into a heap target itself (it does so even while
/// the target is stopped, which only a grant allows), and the owner's deregistration revokes the
/// grant with copies in flight: once it has returned, no byte of the buffer changes.
#[test]
fn grant_revocation_stops_copies_in_flight() {
    let size = 4 << 20;
    let (mut peer, me, name, remote) = pair("granter", "grantee", size, false);
    let src = vec![9u8; size];
    let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
    let make = |len: usize| {
        let to = Desc::new(remote.addr, len as u64, 0);
        write_xfer(&me, &src[..len], to, &name, Default::default())
    };
    let small = make(4096);
    small.run_blocking().unwrap();
    let pid = peer.child.id() as i32;
    // SAFETY: kill(2) takes plain integers; the pid is our child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_stopped(pid);
    small.post().unwrap();
    let st = small.wait_blocking(Some(Duration::from_secs(10)));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        matches!(st, XferStatus::Done),
        "a granted WRITE to a stopped target: {st:?}"
    );
    let big = make(size);
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};
    let (stop, ok, denied) = (AtomicBool::new(false), AtomicU32::new(0), AtomicU32::new(0));
    // Waits (bounded) until `n` reaches `at_least`; false if it does not.
    let reach = |n: &AtomicU32, at_least: u32| {
        let t = Instant::now();
        while n.load(Acquire) < at_least && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        n.load(Acquire) >= at_least
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Acquire) {
                match big.run_blocking() {
                    Ok(()) => ok.fetch_add(1, AcqRel),
                    Err(e) => {
                        assert_eq!(e.class(), ErrorClass::Denied, "{e}");
                        denied.fetch_add(1, AcqRel)
                    }
                };
            }
        });
        // Deregister while WRITEs keep coming, then overwrite the buffer: none of the WRITEs
        // posted meanwhile or later may land on it.
        let started = reach(&ok, 3);
        let reply = peer.cmd("dereg");
        let filled = peer.cmd("fill 33");
        let after = denied.load(Acquire);
        let refused = reach(&denied, after + 10);
        stop.store(true, Release); // before any assertion: the writer must end either way
        assert!(started, "no WRITE completed before deregistration");
        assert!(reply.starts_with("ok "), "{reply}");
        assert_eq!(filled, "ok");
        assert!(refused, "WRITEs were not refused after deregistration");
    });
    assert_eq!(
        peer.cmd("check 33"),
        "ok",
        "a WRITE landed after deregistration"
    );
}

#[test]
fn garbage_on_the_socket_drops_only_that_connection() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    let mut peer = Peer::start(PEER, "garbled", 1 << 20, false);
    let dir = nixl_transports::shm::ShmConfig::default().socket_dir;
    let instance = AgentMetadata::decode(&peer.metadata).unwrap().instance_id;
    let sock = dir.join(format!("garbled-{instance:032x}.sock"));
    assert!(sock.exists(), "{}", sock.display());
    let attacks: [&[u8]; 4] = [
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],   // length over the limit
        &[5, 0, 0, 0, 2, 0, 0, 0, 0],         // an Op before any Hello
        &[3, 0, 0, 0, 1, 200, 0],             // a Hello with a truncated name
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", // not our protocol at all
    ];
    for bytes in attacks {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(bytes);
        // The agent closes this connection; reading sees EOF (or a reset) soon.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the agent answered garbage");
    }
    // The agent still serves a well-behaved peer.
    let me = initiator("polite");
    let name = connect(&me, &mut peer);
    let src = vec![4u8; 4096];
    let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
    let remote = remote_region(&peer);
    let to = Desc::new(remote.addr, 4096, 0);
    write_xfer(&me, &src, to, &name, Default::default())
        .run_blocking()
        .unwrap();
}

#[test]
fn stuck_target_cannot_hang_a_request() {
    let mut peer = Peer::start(PEER, "sleepy", 1 << 20, false);
    let me = round_trip_initiator("impatient", ShmConfig::default().op_timeout);
    let name = connect(&me, &mut peer);
    let remote = remote_region(&peer);
    let src = vec![5u8; 1 << 20];
    let _r = me.reg(&dram(vec![Desc::from_slice(&src)])).unwrap();
    let make = |deadline| {
        me.create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(&src)]),
            &dram(vec![remote]),
            &name,
            XferOptions {
                deadline,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let with_deadline = make(Some(Duration::from_millis(300)));
    let without = make(None);
    with_deadline.run_blocking().unwrap();
    let pid = peer.child.id() as i32;
    // SAFETY: kill(2) takes plain integers; the pid is our child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // SIGSTOP lands asynchronously: wait until every thread of the target is stopped, or a
    // thread still running could serve the next post.
    wait_stopped(pid);

    // A request deadline ends the post on time.
    let t = Instant::now();
    with_deadline.post().unwrap();
    let st = with_deadline.wait_blocking(Some(Duration::from_secs(10)));
    assert!(matches!(st, XferStatus::TimedOut), "{st:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Without one, the backend's operation timeout (5 s by default) ends it.
    let t = Instant::now();
    without.post().unwrap();
    let st = without.wait_blocking(Some(Duration::from_secs(20)));
    let took = t.elapsed();
    match st {
        XferStatus::Failed(e) => assert_eq!(e.class(), ErrorClass::RemoteDisconnect, "{e}"),
        s => panic!("{s:?} after {took:?}"),
    }
    assert!(took < Duration::from_secs(8), "{took:?}");

    // Once the target runs again, its late answers are ignored and new posts work.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    with_deadline.run_blocking().unwrap();
    without.run_blocking().unwrap();
}

#[test]
fn late_answer_keeps_local_memory_held_until_it_lands() {
    let mut peer = Peer::start(PEER, "late", 1 << 20, false);
    // A short operation timeout: the post is ended by it (and by the deadline) long before the
    // target answers, and the memory must stay held all the same.
    let me = round_trip_initiator("waiting", Duration::from_millis(300));
    let name = connect(&me, &mut peer);
    assert_eq!(peer.cmd("fill 21"), "ok");
    let remote = remote_region(&peer);
    let mut dst = vec![0u8; 1 << 20];
    let dd = Desc::from_mut_slice(&mut dst);
    let reg = me.reg(&dram(vec![dd])).unwrap();
    let read = me
        .create_xfer(
            XferOp::Read,
            &dram(vec![dd]),
            &dram(vec![remote]),
            &name,
            XferOptions {
                deadline: Some(Duration::from_millis(200)),
                ..Default::default()
            },
        )
        .unwrap();
    let pid = peer.child.id() as i32;
    // SAFETY: kill(2) takes plain integers; the pid is our child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_stopped(pid);
    read.post().unwrap();
    let st = read.wait_blocking(Some(Duration::from_secs(5)));
    assert!(matches!(st, XferStatus::TimedOut), "{st:?}");
    // The target will still write into `dst` when it runs again: deregistration must wait.
    std::thread::scope(|s| {
        let dereg = s.spawn(move || {
            reg.deregister().unwrap();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(1000));
        assert!(
            !dereg.is_finished(),
            "deregistered while the target still owed a write"
        );
        let resumed = Instant::now();
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        // Ordering, not a duration (a thread that starts late under load must not fail it):
        // deregistration returned only after the target ran again.
        assert!(
            dereg.join().unwrap() >= resumed,
            "deregistration returned before the stopped target resumed"
        );
    });
    // The late READ landed before deregistration returned.
    assert_eq!(first_mismatch(&dst, 21), None);
}

/// Waits (up to 5 s) until every thread of `pid` is in the stopped state.
fn wait_stopped(pid: i32) {
    let t = Instant::now();
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|st| {
                            st.rsplit(')')
                                .next()
                                .map(|r| r.trim_start().starts_with('T'))
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if all || t.elapsed() > Duration::from_secs(5) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
