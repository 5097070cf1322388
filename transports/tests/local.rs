//! The `local` backend with real bytes: two agents in one process, and an agent to itself.

mod common;
use common::pattern;

use std::sync::Arc;
use std::time::Duration;

use nixl_core::*;
use nixl_transports::local::LocalBackend;

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

fn agent(name: &str) -> Agent {
    Agent::builder(name)
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap()
}

fn dram(d: Vec<Desc>) -> DescList {
    DescList::from_descs(MemKind::Dram, d).unwrap()
}

/// Splits `len` bytes into pieces of odd sizes (1..=4099), returning (offset, len).
fn odd_pieces(len: usize, seed: u64) -> Vec<(usize, usize)> {
    let sizes = pattern(seed, len);
    let mut out = Vec::new();
    let mut off = 0;
    let mut i = 0;
    while off < len {
        let n = ((sizes[i] as usize * 16 + sizes[i + 1] as usize) % 4099 + 1).min(len - off);
        out.push((off, n));
        off += n;
        i += 2;
    }
    out
}

#[test]
fn write_and_read_big_and_many_descriptors() {
    let a = agent("a");
    let b = agent("b");
    let size = 64 << 20;
    let src = pattern(1, size);
    let mut a_buf = src.clone();
    let mut b_buf = vec![0u8; size + 3];
    let _ra = a.reg(&dram(vec![Desc::from_slice(&a_buf)])).unwrap();
    let _rb = b
        .reg(&dram(vec![Desc::from_mut_slice(&mut b_buf)]))
        .unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();

    // One 64 MiB WRITE to an odd offset, with a notification.
    let req = a
        .create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(&a_buf)]),
            &dram(vec![Desc::from_mut_slice(&mut b_buf[3..])]),
            "b",
            common::opts(Some(b"layer-0")),
        )
        .unwrap();
    assert_eq!(req.backend(), BackendName::Local);
    req.run_blocking().unwrap();
    assert!(b_buf[3..] == src[..], "64 MiB write differs");
    let n = b.take_notifs();
    assert_eq!(
        n,
        vec![Notification {
            from: "a".into(),
            msg: b"layer-0".to_vec()
        }]
    );

    // READ back in ~thousands of odd pieces, scattered to shuffled local offsets.
    a_buf.iter_mut().for_each(|x| *x = 0);
    let pieces = odd_pieces(size, 7);
    assert!(pieces.len() > 10_000, "{}", pieces.len());
    let remote: Vec<Desc> = pieces
        .iter()
        .map(|&(o, n)| Desc::from_slice(&b_buf[3 + o..3 + o + n]))
        .collect();
    let local: Vec<Desc> = pieces
        .iter()
        .map(|&(o, n)| Desc::from_mut_slice(&mut a_buf[o..o + n]))
        .collect();
    // Reverse the local list so each descriptor pair is matched, not just the concatenation.
    let (mut local, mut remote) = (local, remote);
    local.reverse();
    remote.reverse();
    let req = a
        .create_xfer(
            XferOp::Read,
            &dram(local),
            &dram(remote),
            "b",
            Default::default(),
        )
        .unwrap();
    for _ in 0..3 {
        req.run_blocking().unwrap();
        assert!(a_buf == src, "scattered read differs");
    }
}

#[test]
fn small_transfers_inline_and_agent_to_itself() {
    let a = agent("solo");
    let mut buf = pattern(3, 8192);
    let expect = buf.clone();
    let _r = a.reg(&dram(vec![Desc::from_mut_slice(&mut buf)])).unwrap();
    // Copy the first half over the second half, within one region, to ourselves.
    let (lo, hi) = buf.split_at_mut(4096);
    let req = a
        .create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(lo)]),
            &dram(vec![Desc::from_mut_slice(hi)]),
            "solo",
            common::opts(Some(&[1])),
        )
        .unwrap();
    req.run_blocking().unwrap();
    assert_eq!(&buf[4096..], &expect[..4096]);
    assert_eq!(a.take_notifs().len(), 1);
    a.send_notif("solo", b"hello").unwrap();
    assert_eq!(a.wait_notifs(Duration::from_secs(1))[0].msg, b"hello");
}

#[test]
fn target_deregistration_refuses_later_posts() {
    let a = agent("a");
    let b = agent("b");
    let a_buf = vec![1u8; 1024];
    let mut b_buf = vec![0u8; 1024];
    let b_desc = Desc::from_mut_slice(&mut b_buf);
    let _ra = a.reg(&dram(vec![Desc::from_slice(&a_buf)])).unwrap();
    let rb = b.reg(&dram(vec![b_desc])).unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    // a's buffer written to b's, as the metadata a holds describes b.
    let write = || {
        a.create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(&a_buf)]),
            &dram(vec![b_desc]),
            "b",
            Default::default(),
        )
    };
    let req = write().unwrap();
    req.run_blocking().unwrap();
    rb.deregister().unwrap();
    // The stale request is refused by the owner (b's table), and b's memory is untouched.
    let b_copy = b_buf.clone();
    let err = req.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert_eq!(b_buf, b_copy);
    // A new request against the stale metadata is refused at preparation.
    let err = write().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    // Forged metadata with a wrong key is refused the same way.
    let mut md = b.metadata();
    let _rb2 = b.reg(&dram(vec![b_desc])).unwrap();
    md = AgentMetadata {
        generation: b.generation(),
        ..md
    };
    let mut real = b.metadata();
    real.regions[0].key ^= 1;
    real.generation = md.generation + 1;
    a.load_remote(&real.encode()).unwrap();
    let err = write().unwrap_err();
    assert!(err.to_string().contains("wrong region key"), "{err}");
}

#[test]
fn several_threads_post_concurrently() {
    let a = agent("a");
    let b = agent("b");
    let a_buf = pattern(5, 4 << 20);
    let mut b_buf = vec![0u8; 4 << 20];
    let b_desc = Desc::from_mut_slice(&mut b_buf);
    let _ra = a.reg(&dram(vec![Desc::from_slice(&a_buf)])).unwrap();
    let _rb = b.reg(&dram(vec![b_desc])).unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    let chunk = 1 << 20;
    std::thread::scope(|s| {
        for t in 0..4 {
            let (a, a_buf) = (&a, &a_buf);
            s.spawn(move || {
                let r = a
                    .create_xfer(
                        XferOp::Write,
                        &dram(vec![Desc::from_slice(&a_buf[t * chunk..(t + 1) * chunk])]),
                        &dram(vec![Desc::new(
                            b_desc.addr + (t * chunk) as u64,
                            chunk as u64,
                            0,
                        )]),
                        "b",
                        Default::default(),
                    )
                    .unwrap();
                for _ in 0..50 {
                    r.run_blocking().unwrap();
                }
            });
        }
    });
    assert!(a_buf == b_buf);
}

#[test]
fn invalidated_peer_fails_posts() {
    let a = agent("a");
    let b = agent("b");
    let a_buf = vec![1u8; 64];
    let b_buf = vec![0u8; 64];
    let _ra = a.reg(&dram(vec![Desc::from_slice(&a_buf)])).unwrap();
    let _rb = b.reg(&dram(vec![Desc::from_slice(&b_buf)])).unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    let req = a
        .create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(&a_buf)]),
            &dram(vec![Desc::from_slice(&b_buf)]),
            "b",
            Default::default(),
        )
        .unwrap();
    a.invalidate_remote("b").unwrap();
    let err = req.run_blocking().unwrap_err();
    assert_eq!(err.class(), ErrorClass::RemoteDisconnect, "{err}");
    assert_eq!(b_buf, vec![0u8; 64]);
}
