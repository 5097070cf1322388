use super::*;
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
fn split_spans_preserves_pairs_and_bytes() {
    let ours = [Span { addr: 0, len: 10 }, Span { addr: 100, len: 7 }];
    let theirs = [
        Span {
            addr: 1000,
            len: 10,
        },
        Span { addr: 2000, len: 7 },
    ];
    let parts = split_spans(&ours, &theirs, 3);
    assert_eq!(parts.len(), 3);
    let flat: Vec<(u64, u64, u64)> = parts
        .iter()
        .flat_map(|(o, t)| o.iter().zip(t).map(|(a, b)| (a.addr, b.addr, a.len)))
        .collect();
    let total: u64 = flat.iter().map(|x| x.2).sum();
    assert_eq!(total, 17);
    for (a, b, _) in flat {
        assert!(b == a + 1000 || b == a + 1900, "pairing kept: {a} {b}");
    }
}

#[test]
fn cross_copy_handles_many_uneven_spans() {
    let src: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; 5000];
    // 2500 spans of 2 bytes on our side, 1000 of 5 on theirs: more than IOV_MAX.
    let ours: Vec<Span> = (0..2500)
        .map(|i| Span {
            addr: dst.as_mut_ptr() as u64 + i * 2,
            len: 2,
        })
        .collect();
    let theirs: Vec<Span> = (0..1000)
        .map(|i| Span {
            addr: src.as_ptr() as u64 + i * 5,
            len: 5,
        })
        .collect();
    // SAFETY: `ours` covers `dst`, live and writable for the call.
    let n =
        unsafe { sys::cross_copy(std::process::id() as i32, Cma::Pull, &ours, &theirs) }.unwrap();
    assert_eq!(n, 5000);
    assert_eq!(dst, src);
}

#[test]
fn split_copy_moves_every_byte_and_reports_a_bad_span() {
    // 20 MiB + 3 bytes in spans of uneven lengths (pairwise equal), over 4 threads: several
    // pieces each, taken by the caller and the copy pool's workers.
    let len = (20 << 20) + 3;
    let src: Vec<u8> = (0..len as u64).map(|i| (i * 7 % 251) as u8).collect();
    let mut dst = vec![0u8; len];
    let cuts = [0, 1, 4097, 3 << 20, (3 << 20) + 5, 11 << 20, len];
    let spans = |base: u64| -> Vec<Span> {
        cuts.windows(2)
            .map(|w| Span {
                addr: base + w[0] as u64,
                len: (w[1] - w[0]) as u64,
            })
            .collect()
    };
    let ours = spans(dst.as_mut_ptr() as u64);
    let theirs = spans(src.as_ptr() as u64);
    let me = std::process::id() as i32;
    // SAFETY: `ours` covers `dst`, live and writable for the call.
    let n = unsafe { copy_split(me, Cma::Pull, &ours, &theirs, 4) }.unwrap();
    assert_eq!(n, len as u64);
    assert!(dst == src, "bytes differ");
    // The far side's last span points at nothing mapped: an error, not a hang or a panic.
    let mut bad = theirs.clone();
    bad.last_mut().unwrap().addr = 8;
    // SAFETY: as above.
    let r = unsafe { copy_split(me, Cma::Pull, &ours, &bad, 4) };
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
    let e = got.unwrap_err();
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
    let e = map_from_fake_peer(fd).unwrap().unwrap_err();
    assert!(e.contains("not sealed"), "{e}");

    // Our own buffers are sealed, and a peer's sealed memfd maps.
    let fd = sys::memfd(4096, false).unwrap();
    // SAFETY: ftruncate on an fd we own; the seal makes it fail.
    assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
    let m = map_from_fake_peer(fd).unwrap().unwrap();
    assert_eq!(m.buf_len, 4096);
}
