use super::*;
use nixl_core::Segment;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;

#[test]
fn conn_info_round_trips_and_garbage_is_refused() {
    let i = ConnInfo::ours("/tmp/x.sock");
    assert_eq!(ConnInfo::decode(&i.encode()).unwrap(), i);
    let b = i.encode();
    for n in 0..b.len() {
        assert!(ConnInfo::decode(&b[..n]).is_err());
    }
    let mut long = b.clone();
    long.push(0);
    assert!(ConnInfo::decode(&long).is_err());
    assert!(ConnInfo::decode(&[0xff; 64]).is_err());
}

#[test]
fn reach_rules() {
    let be = ShmBackend::new(ShmConfig::default());
    let mut i = ConnInfo::ours("/x");
    assert!(be.can_reach(&i.encode()).is_ok());
    i.boot_id = "other".into();
    assert!(be
        .can_reach(&i.encode())
        .unwrap_err()
        .to_string()
        .contains("another node"));
    let mut i = ConnInfo::ours("/x");
    i.uid += 1;
    assert!(be
        .can_reach(&i.encode())
        .unwrap_err()
        .to_string()
        .contains("uid"));
}

#[test]
fn split_points_cut_pairs_into_equal_windows() {
    let pairs = [(0, 1000, 10), (100, 2000, 0), (200, 3000, 7)];
    let cuts = split_points(&pairs[..], 6);
    let c = |idx, off| Cursor { idx, off };
    assert_eq!(cuts, [c(0, 0), c(0, 6), c(2, 2), c(3, 0)]);
    // A total that is a whole number of pieces ends at the last pair's end.
    assert_eq!(split_points(&pairs[..], 17), [c(0, 0), c(2, 7)]);
    assert_eq!(split_points(&pairs[..0], 4), [c(0, 0)]);
}

#[test]
fn cross_copy_moves_many_uneven_pairs_and_windows_of_them() {
    let src: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; 6000];
    // 2,400 pairs (more than IOV_MAX) of 1 to 4 bytes, in reverse order on their side.
    let (mut pairs, mut at) = (Vec::new(), 0u64);
    for i in 0..2400u64 {
        let len = 1 + i % 4;
        pairs.push((
            dst.as_mut_ptr() as u64 + at,
            src.as_ptr() as u64 + 6000 - at - len,
            len,
        ));
        at += len;
    }
    let me = std::process::id() as i32;
    let expect = |dst: &[u8], upto: u64| {
        for &(o, t, len) in &pairs {
            let o = (o - dst.as_ptr() as u64) as usize;
            let t = (t - src.as_ptr() as u64) as usize;
            if (o as u64) < upto {
                assert_eq!(
                    dst[o..o + len as usize],
                    src[t..t + len as usize],
                    "pair at {o}"
                );
            }
        }
    };
    // SAFETY: every `ours` range lies in `dst`, live and writable for the call.
    let n = unsafe {
        sys::cross_copy(
            me,
            Cma::Pull,
            &pairs[..],
            Cursor::default(),
            Cursor::end(&pairs[..]),
        )
    }
    .unwrap();
    assert_eq!(n, at);
    expect(&dst, at);
    // Windows that start and end inside pairs: together, every byte once.
    dst.fill(0);
    let cuts = split_points(&pairs[..], 777);
    assert!(cuts.len() > 5 && cuts.iter().any(|c| c.off != 0));
    let mut total = 0;
    for w in cuts.windows(2) {
        // SAFETY: as above.
        total += unsafe { sys::cross_copy(me, Cma::Pull, &pairs[..], w[0], w[1]) }.unwrap();
    }
    assert_eq!(total, at);
    expect(&dst, at);
}

#[test]
fn split_copy_moves_every_byte_and_reports_a_bad_span() {
    // 20 MiB + 3 bytes in runs of uneven lengths, over 4 threads: several pieces each, taken
    // by the caller and the copy pool's workers.
    let len = (20 << 20) + 3;
    let src: Vec<u8> = (0..len as u64).map(|i| (i * 7 % 251) as u8).collect();
    let mut dst = vec![0u8; len];
    let cuts = [0, 1, 4097, 3 << 20, (3 << 20) + 5, 11 << 20, len];
    let (ours, theirs) = (dst.as_mut_ptr() as u64, src.as_ptr() as u64);
    let mut runs: Vec<Run> = cuts
        .windows(2)
        .map(|w| Run {
            local: ours + w[0] as u64,
            remote: theirs + w[0] as u64,
            len: (w[1] - w[0]) as u64,
        })
        .collect();
    let me = std::process::id() as i32;
    // SAFETY: every local range lies in `dst`, live and writable for the call.
    let n = unsafe { copy_split(me, Cma::Pull, &runs[..], len as u64, 4) }.unwrap();
    assert_eq!(n, len as u64);
    assert!(dst == src, "bytes differ");
    // The far side's last run points at nothing mapped: an error, not a hang or a panic.
    runs.last_mut().unwrap().remote = 8;
    // SAFETY: as above.
    let r = unsafe { copy_split(me, Cma::Pull, &runs[..], len as u64, 4) };
    assert!(r.is_err(), "{r:?}");
}

/// A fake peer answers a mapping request with `fd`; returns what the initiator made of it.
fn map_from_fake_peer(fd: OwnedFd) -> Option<MapResult> {
    with_fake_peer(fd, 0, 0, |conn| {
        conn.map_region(&Desc::new(0x10000, 4096, 0), 7)
    })
}

/// Runs `ask` on a connection to a fake peer that answers a MapReq or a GrantReq with
/// success, `fd` attached (and `slot`, `gen` in a GrantReply).
fn with_fake_peer<T>(fd: OwnedFd, slot: u32, gen: u64, ask: impl FnOnce(&Conn) -> T) -> Option<T> {
    let dir = std::env::temp_dir().join(format!(
        "nixl-seal-{}-{:x}",
        std::process::id(),
        nixl_core::random_u64().unwrap()
    ));
    let be = Arc::new(ShmBackend::new(ShmConfig {
        socket_dir: dir.join("agent"),
        ..ShmConfig::default()
    }));
    let agent = nixl_core::Agent::builder("seal-initiator")
        .backend(be.clone())
        .build()
        .unwrap();
    if be.inner.target.get().is_none() {
        eprintln!("skipped: the shm backend does not run here");
        return None;
    }
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut framer = Framer::default();
        loop {
            while let Some(body) = framer.next_frame().unwrap() {
                let reply = match Frame::decode(&body).unwrap() {
                    Frame::MapReq { id, .. } => Frame::MapReply {
                        id,
                        status: Status::Ok,
                        buf_len: 4096,
                        offset: 0,
                        text: String::new(),
                    },
                    Frame::GrantReq { id, .. } => Frame::GrantReply {
                        id,
                        status: Status::Ok,
                        slot,
                        gen,
                        text: String::new(),
                    },
                    _ => continue,
                };
                sys::send_with_fd(&s, &reply.encode(), fd.as_raw_fd()).unwrap();
                // Hold the socket until the initiator is done.
                let _ = (&s).read(&mut [0u8; 64]);
                return;
            }
            let spare = framer.spare(4096);
            let n = (&s).read(spare).unwrap();
            framer.commit(4096, n);
            assert!(n > 0, "initiator went away");
        }
    });
    let mut info = ConnInfo::ours(&path.to_string_lossy());
    info.pid = std::process::id();
    let conn = Conn::open(&be.inner, "fake", &info).unwrap();
    let got = ask(&conn);
    conn.mark_closed("test over");
    drop(conn);
    drop(agent);
    peer.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(got)
}

fn memfd_of(len: i64, seals: libc::c_int) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated static string.
    let raw =
        unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate and fcntl with integer arguments on an fd we own.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), len), 0);
        if seals != 0 {
            assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
        }
    }
    fd
}

#[test]
fn a_lying_peers_grant_is_refused() {
    let region = Desc::new(0x10000, 4096, 0);
    let table = TABLE_BYTES as i64;
    // A grant table that is not sealed, or of the wrong size, or a slot out of range or a
    // zero generation: refused (the transfer then goes the round-trip way).
    let cases: [(OwnedFd, u32, u64, &str); 5] = [
        (memfd_of(table, 0), 1, 1, "not sealed"),
        (memfd_of(table, libc::F_SEAL_SHRINK), 1, 1, "not sealed"),
        (memfd_of(4096, sys::SIZE_SEALS), 1, 1, "bytes, not"),
        (
            memfd_of(table, sys::SIZE_SEALS),
            GRANT_SLOTS as u32,
            1,
            "slot",
        ),
        (memfd_of(table, sys::SIZE_SEALS), 3, 0, "generation 0"),
    ];
    for (fd, slot, gen, want) in cases {
        let Some(got) = with_fake_peer(fd, slot, gen, |c| c.grant_region(&region, 7)) else {
            return;
        };
        let e = got.unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // A good one is taken, but its slot is live only when the target set it so.
    let fd = memfd_of(table, sys::SIZE_SEALS);
    let Some(got) = with_fake_peer(fd, 3, 9, |c| c.grant_region(&region, 7)) else {
        return;
    };
    let g = got.unwrap();
    assert!(
        !g.live(),
        "the fake peer never wrote generation 9 in slot 3"
    );
    assert!(GrantHold::enter(std::slice::from_ref(&g)).is_none());
    assert_eq!(
        g.table.inflight(3).load(Ordering::SeqCst),
        0,
        "enter backed out"
    );
}

#[test]
fn a_peer_memfd_that_can_shrink_is_not_mapped() {
    // Unsealed: the peer (or anyone holding the fd) could truncate it under our mapping.
    // SAFETY: the name is a NUL-terminated static string.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on an fd we own.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
    let Some(got) = map_from_fake_peer(fd) else {
        return;
    };
    let e = got.unwrap_err().to_string();
    assert!(e.contains("not sealed"), "{e}");

    // Sealed against shrinking only: growing is refused as well (both seals are asked).
    // SAFETY: as above.
    let raw = unsafe {
        libc::memfd_create(
            c"shrink-only".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    // SAFETY: as above.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fcntl and ftruncate with integer arguments on an fd we own.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), 0);
        assert_eq!(
            libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
            0
        );
    }
    let e = map_from_fake_peer(fd).unwrap().unwrap_err().to_string();
    assert!(e.contains("not sealed"), "{e}");

    // Our own buffers are sealed, and a peer's sealed memfd maps.
    let fd = sys::memfd(4096, false).unwrap();
    // SAFETY: ftruncate on an fd we own; the seal makes it fail.
    assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
    let m = map_from_fake_peer(fd).unwrap().unwrap();
    assert_eq!(m.buf_len, 4096);
}

#[test]
fn granted_pieces_outside_the_grant_are_refused_before_any_copy() {
    let region = Desc::new(0x10000, 4096, 0);
    let fd = memfd_of(TABLE_BYTES as i64, sys::SIZE_SEALS);
    // (`with_fake_peer` says when it skips.)
    with_fake_peer(fd, 3, 9, |c| {
        let g = c.grant_region(&region, 7).unwrap();
        let plan = |segments| XferPlan {
            op: XferOp::Read,
            local_kind: MemKind::Dram,
            remote_kind: MemKind::Dram,
            segments,
            local_regions: Vec::new(),
            remote_regions: Vec::new(),
            notif: None,
            initiator: "t".into(),
        };
        let run = |remote, len| Run {
            local: 0x1000,
            remote,
            len,
        };
        let by_runs = |runs: Vec<Run>| {
            let runs = Runs {
                runs,
                local_dev: 0,
                remote_dev: 0,
            };
            c.granted_runs(
                c.self_arc().unwrap(),
                &plan(Vec::new()),
                runs,
                Arc::clone(&g),
            )
        };
        let by_segments = |runs: Vec<Run>| {
            let segments = runs
                .iter()
                .map(|r| Segment {
                    local: Desc::new(r.local, r.len, 0),
                    remote: Desc::new(r.remote, r.len, 0),
                    local_region: 0,
                    remote_region: 0,
                })
                .collect();
            c.granted_xfer(c.self_arc().unwrap(), &plan(segments), vec![Arc::clone(&g)])
        };
        assert!(by_runs(vec![run(0x10000, 4096)]).is_ok());
        assert!(by_segments(vec![run(0x10000, 16), run(0x10ff0, 16)]).is_ok());
        // Before, after, across either end, empty, wrapping: a peer's indices or descriptors
        // reach nothing outside the region the target granted.
        let bad = [
            (0xfff0, 32),
            (0x10ff0, 32),
            (0x11000, 1),
            (0x10000, 0),
            (0x10000, 4097),
            (u64::MAX - 3, 8),
        ];
        for (remote, len) in bad {
            for made in [&by_runs as &dyn Fn(Vec<Run>) -> _, &by_segments] {
                match made(vec![run(0x10000, 16), run(remote, len)]) {
                    Ok(_) => panic!("{remote:#x}+{len} was taken"),
                    Err(e) => {
                        let text = e.to_string();
                        assert!(matches!(e, Error::Denied { .. }), "{text}");
                        assert!(text.contains("piece 1"), "{text}");
                    }
                }
            }
        }
    });
}
