//! Prepared descriptor lists and strided descriptors, with real bytes over the `local` backend:
//! requests made by index arrays move exactly the bytes a naive per-block copy would, merge
//! exactly the runs that are contiguous on both sides, and refuse bad indices and stale sides.

mod common;
use common::pattern;

use std::sync::Arc;

use nixl_core::*;
use nixl_transports::local::LocalBackend;
use proptest::prelude::*;

fn agent(name: &str) -> Agent {
    Agent::builder(name)
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap()
}

fn blocks(base: u64, block: u64, count: u64) -> DescList {
    let mut l = DescList::new(MemKind::Dram);
    l.push_strided(Strided {
        addr: base,
        stride: block,
        count,
        len: block,
        dev_id: 0,
    })
    .unwrap();
    l
}

/// Two agents, `a` reading from / writing to `b`: buffers of `n` blocks each, registered.
struct Pair {
    // Dropped first: deregistration before the buffers go.
    _regs: Vec<Registration>,
    a: Agent,
    b: Agent,
    a_buf: Vec<u8>,
    b_buf: Vec<u8>,
    block: usize,
}

fn pair(n: usize, block: usize) -> Pair {
    let a = agent("a");
    let b = agent("b");
    let mut a_buf = pattern(7, n * block);
    let mut b_buf = pattern(9, n * block);
    // SAFETY: the buffers live in the `Pair` beside the registrations, which are dropped first
    // (field order); tests read them only after their transfers complete.
    let ra = unsafe {
        a.register(
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut a_buf)]).unwrap(),
        )
    }
    .unwrap();
    // SAFETY: as above.
    let rb = unsafe {
        b.register(
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut b_buf)]).unwrap(),
        )
    }
    .unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    Pair {
        a,
        b,
        a_buf,
        b_buf,
        block,
        _regs: vec![ra, rb],
    }
}

impl Pair {
    fn lists(&self) -> (PreppedList, PreppedList) {
        let n = (self.a_buf.len() / self.block) as u64;
        let l = self
            .a
            .prep_local(&blocks(self.a_buf.as_ptr() as u64, self.block as u64, n))
            .unwrap();
        let r = self
            .a
            .prep_remote(
                "b",
                &blocks(self.b_buf.as_ptr() as u64, self.block as u64, n),
            )
            .unwrap();
        (l, r)
    }

    /// The same lists, as one strided run each (computed per index, nothing stored).
    fn strided_lists(&self) -> (PreppedList, PreppedList) {
        let run = |base: &Vec<u8>| Strided {
            addr: base.as_ptr() as u64,
            stride: self.block as u64,
            count: (base.len() / self.block) as u64,
            len: self.block as u64,
            dev_id: 0,
        };
        let l = self
            .a
            .prep_local_strided(MemKind::Dram, run(&self.a_buf))
            .unwrap();
        let r = self
            .a
            .prep_remote_strided("b", MemKind::Dram, run(&self.b_buf))
            .unwrap();
        (l, r)
    }
}

/// Number of segments a naive merge of contiguous-on-both-sides runs gives.
fn naive_runs(li: &[u32], ri: &[u32]) -> usize {
    let mut runs = 0;
    for k in 0..li.len() {
        if k == 0 || li[k] != li[k - 1] + 1 || ri[k] != ri[k - 1] + 1 {
            runs += 1;
        }
    }
    runs
}

#[test]
fn read_by_index_moves_the_named_blocks_and_merges_runs() {
    let block = 512;
    let p = pair(64, block);
    let (l, r) = p.lists();
    // Every other block: nothing merges.
    let li: Vec<u32> = (0..32).map(|i| i * 2).collect();
    let ri: Vec<u32> = (0..32).map(|i| 63 - i * 2).collect();
    let req =
        p.a.create_xfer_prepped(XferOp::Read, &l, &li, &r, &ri, XferOptions::default())
            .unwrap();
    assert_eq!(req.info().descs, 32);
    assert_eq!(req.info().bytes, 32 * block as u64);
    let before = p.a_buf.clone();
    req.run_blocking().unwrap();
    for (k, (&x, &y)) in li.iter().zip(&ri).enumerate() {
        let (x, y) = (x as usize * block, y as usize * block);
        assert_eq!(p.a_buf[x..x + block], p.b_buf[y..y + block], "pair {k}");
    }
    for i in (1..64).step_by(2) {
        let o = i * block;
        assert_eq!(
            p.a_buf[o..o + block],
            before[o..o + block],
            "block {i} untouched"
        );
    }
    // Contiguous on both sides: one segment.
    let li: Vec<u32> = (10..20).collect();
    let ri: Vec<u32> = (30..40).collect();
    let req =
        p.a.create_xfer_prepped(XferOp::Write, &l, &li, &r, &ri, XferOptions::default())
            .unwrap();
    assert_eq!(req.info().descs, 1);
    req.run_blocking().unwrap();
    assert_eq!(
        p.b_buf[30 * block..40 * block],
        p.a_buf[10 * block..20 * block]
    );
    drop(p.b);
}

#[test]
fn bad_indices_lengths_and_sides_are_refused() {
    let p = pair(8, 256);
    let (l, r) = p.lists();
    let e =
        p.a.create_xfer_prepped(
            XferOp::Read,
            &l,
            &[0, 8],
            &r,
            &[0, 1],
            XferOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &l, &[0], &r, &[0, 1], XferOptions::default())
            .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &l, &[], &r, &[], XferOptions::default())
            .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &r, &[0], &l, &[0], XferOptions::default())
            .unwrap_err();
    assert!(e.to_string().contains("prep_local"), "{e}");
    // Different lengths.
    let half =
        p.a.prep_remote(
            "b",
            &DescList::from_descs(
                MemKind::Dram,
                vec![Desc::new(p.b_buf.as_ptr() as u64, 128, 0)],
            )
            .unwrap(),
        )
        .unwrap();
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &l, &[0], &half, &[0], XferOptions::default())
            .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    // Outside any registration, on either side.
    let outside = blocks(p.b_buf.as_ptr() as u64, 256, 9);
    let e = p.a.prep_remote("b", &outside).unwrap_err();
    assert!(
        matches!(e, Error::RemoteNotRegistered { index: 8, .. }),
        "{e}"
    );
    let e =
        p.a.prep_local(&blocks(p.a_buf.as_ptr() as u64, 256, 9))
            .unwrap_err();
    assert!(
        matches!(e, Error::LocalNotRegistered { index: 8, .. }),
        "{e}"
    );
    let e = p.a.prep_remote("nobody", &outside).unwrap_err();
    assert!(matches!(e, Error::UnknownPeer(_)), "{e}");
    // A strided run must lie in one region; its indices are bounded by its count.
    let run = Strided {
        addr: p.b_buf.as_ptr() as u64,
        stride: 256,
        count: 9,
        len: 256,
        dev_id: 0,
    };
    let e =
        p.a.prep_remote_strided("b", MemKind::Dram, run)
            .unwrap_err();
    assert!(matches!(e, Error::RemoteNotRegistered { .. }), "{e}");
    let rs =
        p.a.prep_remote_strided("b", MemKind::Dram, Strided { count: 8, ..run })
            .unwrap();
    assert_eq!(rs.len(), 8);
    assert_eq!(rs.desc(7), Some(Desc::new(run.addr + 7 * 256, 256, 0)));
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &l, &[0], &rs, &[8], XferOptions::default())
            .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
}

#[test]
fn stale_sides_are_refused() {
    let mut p = pair(8, 256);
    let (l, r) = p.lists();
    // A local deregistration: refused at creation.
    let ra = p._regs.remove(0);
    ra.deregister().unwrap();
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &l, &[0], &r, &[0], XferOptions::default())
            .unwrap_err();
    assert!(matches!(e, Error::LocalNotRegistered { .. }), "{e}");
    // The peer deregisters its buffer and republishes: the prepared remote list is stale
    // (checked before the local side).
    let rb = p._regs.pop().unwrap();
    rb.deregister().unwrap();
    p.a.load_remote(&p.b.metadata_bytes()).unwrap();
    let e =
        p.a.create_xfer_prepped(XferOp::Read, &l, &[0], &r, &[0], XferOptions::default())
            .unwrap_err();
    assert!(matches!(e, Error::RemoteNotRegistered { .. }), "{e}");
}

#[test]
fn strided_runs_are_checked_once_and_bounded() {
    let s = Strided {
        addr: 100,
        stride: 10,
        count: 5,
        len: 4,
        dev_id: 2,
    };
    assert_eq!(s.span().unwrap(), Desc::new(100, 44, 2));
    let mut list = DescList::new(MemKind::Dram);
    list.push_strided(s).unwrap();
    let naive: Vec<Desc> = (0..5).map(|i| Desc::new(100 + 10 * i, 4, 2)).collect();
    assert_eq!(list.descs(), &naive[..]);
    for bad in [
        Strided { count: 0, ..s },
        Strided { len: 0, ..s },
        Strided {
            count: MAX_STRIDED_COUNT + 1,
            ..s
        },
        Strided {
            stride: u64::MAX / 2,
            ..s
        },
        Strided {
            addr: u64::MAX - 3,
            count: 1,
            ..s
        },
    ] {
        let e = list.push_strided(bad).unwrap_err();
        assert!(
            matches!(e, Error::InvalidDesc { index: 5, .. }),
            "{bad:?}: {e}"
        );
    }
    assert_eq!(list.len(), 5, "a refused run adds nothing");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random index pairs (with repeats and runs): the bytes land as a naive per-block copy
    /// would put them, and the request has exactly the naive number of merged runs.
    #[test]
    fn prepped_matches_naive_copy(
        block in prop_oneof![Just(1usize), Just(3), Just(64), Just(4096)],
        pairs in proptest::collection::vec((0u32..48, 0u32..48, 1usize..6), 1..24),
        write in any::<bool>(),
        strided in any::<bool>(),
    ) {
        let p = pair(48, block);
        let (l, r) = if strided { p.strided_lists() } else { p.lists() };
        let (li, ri) = index_pairs(&pairs, write);
        let op = if write { XferOp::Write } else { XferOp::Read };
        let req = p.a.create_xfer_prepped(op, &l, &li, &r, &ri, XferOptions::default()).unwrap();
        prop_assert_eq!(req.info().descs, naive_runs(&li, &ri));
        let (a_exp, b_exp) = naive_copy(&p.a_buf, &p.b_buf, &li, &ri, block, write);
        req.run_blocking().unwrap();
        prop_assert!(p.a_buf == a_exp);
        prop_assert!(p.b_buf == b_exp);
    }
}

/// Local and remote block indices (of 48 a side) from runs of `(local, remote, length)`,
/// clipped at the end, each destination block written at most once (so the expected result is
/// well defined).
fn index_pairs(pairs: &[(u32, u32, usize)], write: bool) -> (Vec<u32>, Vec<u32>) {
    let (mut li, mut ri) = (Vec::new(), Vec::new());
    let mut dst_used = [false; 48];
    for &(x, y, n) in pairs {
        for k in 0..n as u32 {
            let (x, y) = (x + k, y + k);
            if x >= 48 || y >= 48 {
                break;
            }
            let d = if write { y } else { x } as usize;
            if dst_used[d] {
                continue;
            }
            dst_used[d] = true;
            li.push(x);
            ri.push(y);
        }
    }
    (li, ri)
}

/// What the local (`a`) and remote (`b`) buffers hold after a naive per-block copy of blocks
/// `li` <-> `ri` of `block` bytes (a WRITE copies local to remote, a READ remote to local).
fn naive_copy(
    a: &[u8],
    b: &[u8],
    li: &[u32],
    ri: &[u32],
    block: usize,
    write: bool,
) -> (Vec<u8>, Vec<u8>) {
    let (mut a_exp, mut b_exp) = (a.to_vec(), b.to_vec());
    for (&x, &y) in li.iter().zip(ri) {
        let (x, y) = (x as usize * block, y as usize * block);
        if write {
            b_exp[y..y + block].copy_from_slice(&a[x..x + block]);
        } else {
            a_exp[x..x + block].copy_from_slice(&b[y..y + block]);
        }
    }
    (a_exp, b_exp)
}

/// A test buffer: a memfd the peer maps (`shm` copies through the mapping), or plain heap
/// memory (no mapping: `shm` copies under a cross-memory grant).
enum Buf {
    Memfd(nixl_transports::shm::ShmBuffer),
    Heap(Vec<u8>),
}

impl Buf {
    fn new(len: usize, memfd: bool) -> Buf {
        if memfd {
            Buf::Memfd(nixl_transports::shm::ShmBuffer::new(len).unwrap())
        } else {
            Buf::Heap(vec![0u8; len])
        }
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Memfd(b) => b.as_slice(),
            Buf::Heap(v) => v,
        }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buf::Memfd(b) => b.as_mut_slice(),
            Buf::Heap(v) => v,
        }
    }
    fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn desc(&mut self) -> Desc {
        match self {
            Buf::Memfd(b) => b.desc(),
            Buf::Heap(v) => Desc::from_mut_slice(v),
        }
    }
}

/// `a` and `b` over `shm`, each with a buffer of `n` blocks (plus a spare 64 bytes): memfds, so
/// `a` copies through `b`'s buffer mapped in its address space, or heap memory, so `a` copies
/// under a cross-memory grant on `b`'s region.
struct ShmPair {
    // Dropped first: deregistration before the buffers go.
    _regs: Vec<Registration>,
    a: Agent,
    _b: Agent,
    a_buf: Buf,
    b_buf: Buf,
}

fn shm_pair(n: usize, block: usize, memfd: bool) -> ShmPair {
    use nixl_transports::shm::{ShmBackend, ShmConfig};
    let agent = |name: &str| {
        Agent::builder(name)
            .backend(Arc::new(ShmBackend::new(ShmConfig::default())))
            .build()
            .unwrap()
    };
    let (a, b) = (agent("shm-a"), agent("shm-b"));
    let mut a_buf = Buf::new(n * block + 64, memfd);
    let mut b_buf = Buf::new(n * block + 64, memfd);
    a_buf
        .as_mut_slice()
        .copy_from_slice(&pattern(7, n * block + 64));
    b_buf
        .as_mut_slice()
        .copy_from_slice(&pattern(9, n * block + 64));
    let reg = |agent: &Agent, d: Desc| {
        // SAFETY: the buffers live in the `ShmPair` beside the registrations, which are dropped
        // first (field order); the test reads them only after its transfers complete.
        unsafe { agent.register(&DescList::from_descs(MemKind::Dram, vec![d]).unwrap()) }.unwrap()
    };
    let regs = vec![reg(&a, a_buf.desc()), reg(&b, b_buf.desc())];
    a.load_remote(&b.metadata_bytes()).unwrap();
    ShmPair {
        _regs: regs,
        a,
        _b: b,
        a_buf,
        b_buf,
    }
}

/// How a side's list is prepared in [`prepped_over_shm_matches_naive_copy`].
#[derive(Clone, Copy, Debug)]
enum ListKind {
    /// Explicit blocks of one length: the compact list, the backend's runs path.
    Uniform,
    /// One strided run: the runs path, nothing stored per block.
    Strided,
    /// Explicit blocks and one more descriptor of another length: the segments path.
    Mixed,
}

fn shm_list(a: &Agent, peer: Option<&str>, base: u64, block: usize, kind: ListKind) -> PreppedList {
    let run = Strided {
        addr: base,
        stride: block as u64,
        count: 48,
        len: block as u64,
        dev_id: 0,
    };
    let mut list = blocks(base, block as u64, 48);
    match (kind, peer) {
        (ListKind::Strided, None) => return a.prep_local_strided(MemKind::Dram, run).unwrap(),
        (ListKind::Strided, Some(p)) => {
            return a.prep_remote_strided(p, MemKind::Dram, run).unwrap()
        }
        (ListKind::Mixed, _) => {
            list = DescList::from_descs(
                MemKind::Dram,
                list.descs()
                    .iter()
                    .copied()
                    .chain([Desc::new(base + 48 * block as u64, 64, 0)])
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        }
        (ListKind::Uniform, _) => {}
    }
    match peer {
        None => a.prep_local(&list).unwrap(),
        Some(p) => a.prep_remote(p, &list).unwrap(),
    }
}

fn list_kind() -> impl Strategy<Value = ListKind> {
    prop_oneof![
        Just(ListKind::Uniform),
        Just(ListKind::Strided),
        Just(ListKind::Mixed)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Over `shm` (the copy through the peer's mapped buffer, or under a cross-memory grant on
    /// heap memory), with each side's list compact, strided or explicit with mixed lengths: the
    /// bytes land as a naive per-block copy would put them, nothing else changes, and the
    /// request has the naive number of merged runs.
    #[test]
    fn prepped_over_shm_matches_naive_copy(
        block in prop_oneof![Just(1usize), Just(24), Just(4096)],
        pairs in proptest::collection::vec((0u32..48, 0u32..48, 1usize..6), 1..24),
        write in any::<bool>(),
        kinds in (list_kind(), list_kind()),
        memfd in any::<bool>(),
    ) {
        let mut p = shm_pair(48, block, memfd);
        let l = shm_list(&p.a, None, p.a_buf.as_ptr() as u64, block, kinds.0);
        let r = shm_list(&p.a, Some("shm-b"), p.b_buf.as_ptr() as u64, block, kinds.1);
        let (li, ri) = index_pairs(&pairs, write);
        let op = if write { XferOp::Write } else { XferOp::Read };
        let req = p.a.create_xfer_prepped(op, &l, &li, &r, &ri, XferOptions::default()).unwrap();
        prop_assert_eq!(req.info().backend, BackendName::Shm);
        prop_assert_eq!(req.info().descs, naive_runs(&li, &ri));
        prop_assert_eq!(req.info().bytes, (li.len() * block) as u64);
        let (a0, b0) = (p.a_buf.as_slice().to_vec(), p.b_buf.as_slice().to_vec());
        let (a_exp, b_exp) = naive_copy(&a0, &b0, &li, &ri, block, write);
        // Twice: a prepared request posts any number of times.
        req.run_blocking().unwrap();
        prop_assert!(p.a_buf.as_slice() == &a_exp[..]);
        prop_assert!(p.b_buf.as_slice() == &b_exp[..]);
        p.a_buf.as_mut_slice().copy_from_slice(&a0);
        req.run_blocking().unwrap();
        prop_assert!(p.a_buf.as_slice() == &a_exp[..]);
        prop_assert!(p.b_buf.as_slice() == &b_exp[..]);
        // An index past either list is refused with its pair, on every path.
        let mut bad = li.clone();
        let k = bad.len() / 2;
        bad[k] = if matches!(kinds.0, ListKind::Mixed) { 49 } else { 48 };
        let e = p.a.create_xfer_prepped(op, &l, &bad, &r, &ri, XferOptions::default())
            .unwrap_err();
        prop_assert!(e.to_string().contains(&format!("pair {k}:")), "{}", e);
        prop_assert!(e.to_string().contains("out of range"), "{}", e);
    }
}

/// `a` and `b` over `tcp` on loopback (plain, or TLS with a shared secret), with `chunk` bytes
/// per wire chunk, each with a buffer of `n` blocks (plus a spare 64 bytes).
struct TcpPair {
    // Dropped first: deregistration before the buffers go.
    _regs: Vec<Registration>,
    a: Agent,
    _b: Agent,
    a_buf: Vec<u8>,
    b_buf: Vec<u8>,
}

fn tcp_pair(n: usize, block: usize, chunk: usize, tls: bool) -> TcpPair {
    use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};
    let agent = |name: &str| {
        let cfg = TcpConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            io_timeout: std::time::Duration::from_secs(5),
            auth: if tls {
                Auth::with_secret(b"prepped-over-tcp-test-secret-32b".to_vec())
            } else {
                Auth::open()
            },
            chunk_bytes: chunk,
            ..TcpConfig::default()
        };
        Agent::builder(name)
            .backend(Arc::new(TcpBackend::new(cfg)))
            .build()
            .unwrap()
    };
    let (a, b) = (agent("tcp-a"), agent("tcp-b"));
    let mut a_buf = pattern(7, n * block + 64);
    let mut b_buf = pattern(9, n * block + 64);
    let reg = |agent: &Agent, buf: &mut Vec<u8>| {
        let d = Desc::from_mut_slice(buf);
        // SAFETY: the buffers live in the `TcpPair` beside the registrations, which are dropped
        // first (field order); the test reads them only after its transfers complete.
        unsafe { agent.register(&DescList::from_descs(MemKind::Dram, vec![d]).unwrap()) }.unwrap()
    };
    let regs = vec![reg(&a, &mut a_buf), reg(&b, &mut b_buf)];
    a.load_remote(&b.metadata_bytes()).unwrap();
    TcpPair {
        _regs: regs,
        a,
        _b: b,
        a_buf,
        b_buf,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Over `tcp` (runs in SPAN frames for compact and strided lists, pieces in WRITE/READ
    /// frames for mixed ones), with wire chunks of 4 KiB (many spans a chunk, runs cut across
    /// chunks) or 1 MiB, plain or TLS: the bytes land as a naive per-block copy would put them,
    /// nothing else changes, and a request posts twice.
    #[test]
    fn prepped_over_tcp_matches_naive_copy(
        block in prop_oneof![Just(1usize), Just(24), Just(4096)],
        pairs in proptest::collection::vec((0u32..48, 0u32..48, 1usize..6), 1..24),
        write in any::<bool>(),
        kinds in (list_kind(), list_kind()),
        chunk in prop_oneof![Just(4096usize), Just(1 << 20)],
        tls in any::<bool>(),
    ) {
        let mut p = tcp_pair(48, block, chunk, tls);
        let l = shm_list(&p.a, None, p.a_buf.as_ptr() as u64, block, kinds.0);
        let r = shm_list(&p.a, Some("tcp-b"), p.b_buf.as_ptr() as u64, block, kinds.1);
        let (li, ri) = index_pairs(&pairs, write);
        let op = if write { XferOp::Write } else { XferOp::Read };
        let req = p.a.create_xfer_prepped(op, &l, &li, &r, &ri, XferOptions::default()).unwrap();
        prop_assert_eq!(req.info().backend, BackendName::Tcp);
        prop_assert_eq!(req.info().bytes, (li.len() * block) as u64);
        let (a0, b0) = (p.a_buf.clone(), p.b_buf.clone());
        let (a_exp, b_exp) = naive_copy(&a0, &b0, &li, &ri, block, write);
        req.run_blocking().unwrap();
        prop_assert!(p.a_buf == a_exp);
        prop_assert!(p.b_buf == b_exp);
        // Twice: a prepared request posts any number of times.
        p.a_buf.copy_from_slice(&a0);
        p.b_buf.copy_from_slice(&b0);
        req.run_blocking().unwrap();
        prop_assert!(p.a_buf == a_exp);
        prop_assert!(p.b_buf == b_exp);
    }
}

/// A target that deregisters everything and frees its agent (closing its connections) before
/// the initiator posts a prepared request: the post ends as a disconnect, not as a refusal,
/// whether or not the initiator's reader thread has seen the connection end yet, through a
/// cross-memory grant (heap memory) and through a mapping (memfd) alike.
#[test]
fn a_post_to_a_target_that_left_is_a_disconnect_not_a_refusal() {
    use nixl_transports::shm::{ShmBackend, ShmConfig};
    for memfd in [false, true] {
        for _ in 0..20 {
            let agent = |name: &str| {
                Agent::builder(name)
                    .backend(Arc::new(ShmBackend::new(ShmConfig::default())))
                    .build()
                    .unwrap()
            };
            let (a, b) = (agent("left-a"), agent("left-b"));
            let mut a_buf = Buf::new(1 << 16, memfd);
            let mut b_buf = Buf::new(1 << 16, memfd);
            let reg = |agent: &Agent, d: Desc| {
                // SAFETY: the buffers are declared before the registrations and outlive them
                // (dropped at the end of the loop body, after the registrations).
                unsafe { agent.register(&DescList::from_descs(MemKind::Dram, vec![d]).unwrap()) }
                    .unwrap()
            };
            let ra = reg(&a, a_buf.desc());
            let rb = reg(&b, b_buf.desc());
            a.load_remote(&b.metadata_bytes()).unwrap();
            let l = a
                .prep_local(&blocks(a_buf.as_ptr() as u64, 4096, 16))
                .unwrap();
            let r = a
                .prep_remote("left-b", &blocks(b_buf.as_ptr() as u64, 4096, 16))
                .unwrap();
            let idx: Vec<u32> = (0..16).step_by(2).collect();
            let x = a
                .create_xfer_prepped(XferOp::Read, &l, &idx, &r, &idx, XferOptions::default())
                .unwrap();
            x.run_blocking().unwrap();
            drop(rb);
            drop(b);
            let e = x.run_blocking().unwrap_err();
            assert_eq!(
                e.class(),
                ErrorClass::RemoteDisconnect,
                "memfd {memfd}: a post to a target that left ended {e}"
            );
            drop(x);
            drop(ra);
        }
    }
}
