//! Tests of the owner socket, the client and the import cache, over real Unix sockets.

use super::*;
use nixl_core::ErrorClass;
use std::io::{BufRead, Read};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicUsize;

fn memfd(bytes: &[u8]) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated static string.
    let fd = unsafe { libc::memfd_create(c"nixl-cuda-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: memfd_create returned a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(bytes).unwrap();
    fd
}

fn read_fd(fd: &OwnedFd, len: usize) -> Vec<u8> {
    let m = Mapped::new(fd, len, Arc::new(AtomicUsize::new(0)));
    // SAFETY: `m` maps `len` readable bytes until it is dropped below.
    unsafe { std::slice::from_raw_parts(m.base, len) }.to_vec()
}

/// The stand-in for a device mapping: the owner's memfd mapped here (as the peer maps a
/// granted VMM fd or opens a legacy IPC handle), unmapped on drop, drops counted.
#[derive(Debug)]
struct Mapped {
    base: *const u8,
    len: usize,
    closed: Arc<AtomicUsize>,
}

// SAFETY: a shared read-only mapping, readable from any thread while it exists.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn new(fd: &OwnedFd, len: usize, closed: Arc<AtomicUsize>) -> Mapped {
        // SAFETY: a fresh shared read-only mapping of `len` bytes of a file at least that
        // long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapped {
            base: p.cast(),
            len,
            closed,
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; the last Arc is gone, so no reader
        // holds a pointer into it (readers hold the region's gate, revocation drains it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// A prepared transfer as the backend keeps one: the regions it uses and addresses resolved
/// once, no mapping held directly.
struct Prepared {
    regions: Arc<[Arc<RegionImport<Mapped>>]>,
    src: usize,
    len: usize,
}

impl Prepared {
    fn new(region: &Arc<RegionImport<Mapped>>, m: &Mapped) -> Prepared {
        Prepared {
            regions: Arc::from(vec![Arc::clone(region)]),
            src: m.base as usize,
            len: m.len,
        }
    }

    /// One post: holds the regions as the backend's post does, "copies" after `dwell`.
    fn post(
        &self,
        entered: Option<&crossbeam_channel::Sender<()>>,
        dwell: Duration,
    ) -> Result<Vec<u8>> {
        self.post_then(entered, dwell, || {})
    }

    /// A post that also runs `during` while it holds the regions.
    fn post_then(
        &self,
        entered: Option<&crossbeam_channel::Sender<()>>,
        dwell: Duration,
        during: impl FnOnce(),
    ) -> Result<Vec<u8>> {
        let holds = hold_all(&self.regions)?;
        if let Some(tx) = entered {
            tx.send(()).unwrap();
        }
        std::thread::sleep(dwell);
        during();
        // SAFETY: the region's gate is held, so its mappings are open: a revocation closes
        // them only after every hold is released.
        let v = unsafe { std::slice::from_raw_parts(self.src as *const u8, self.len) }.to_vec();
        drop(holds);
        Ok(v)
    }
}

/// An owner with one region of two chunks, each backed by a memfd.
struct Owner {
    region: Desc,
    key: u64,
    registered: AtomicBool,
    chunks: Vec<OwnedFd>,
    notifs: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Owner {
    fn check(&self, region: &Desc, key: u64) -> std::result::Result<(), String> {
        if *region != self.region || !self.registered.load(Ordering::SeqCst) {
            return Err("not registered".into());
        }
        if key != self.key {
            return Err("wrong key".into());
        }
        Ok(())
    }
}

impl GrantSource for Owner {
    fn grant(&self, region: &Desc, key: u64, chunk: u32) -> std::result::Result<Grant, String> {
        self.check(region, key)?;
        let fd = self
            .chunks
            .get(chunk as usize)
            .ok_or_else(|| format!("no chunk {chunk}"))?;
        Ok(Grant {
            fd: fd.try_clone().map_err(|e| e.to_string())?,
            alloc_size: 4096,
            _hold: Box::new(()),
        })
    }

    fn opened(&self, region: &Desc, key: u64) -> std::result::Result<Hold, String> {
        self.check(region, key)?;
        Ok(Box::new(()))
    }

    fn notify(&self, from: &str, msg: Vec<u8>) {
        self.notifs.lock().push((from.to_owned(), msg));
    }
}

const REGION: Desc = Desc {
    addr: 0x7000_0000,
    len: 8192,
    dev_id: 0,
};

fn dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("nixl-cuda-ipc-{tag}-{}", std::process::id()))
}

fn owner() -> Arc<Owner> {
    Arc::new(Owner {
        region: REGION,
        key: 42,
        registered: AtomicBool::new(true),
        chunks: vec![memfd(&[0xa1; 4096]), memfd(&[0xb2; 4096])],
        notifs: Mutex::new(Vec::new()),
    })
}

fn start(o: &Arc<Owner>, d: &Path, file: &str) -> (IpcServer, Arc<dyn GrantSource>) {
    let src: Arc<dyn GrantSource> = o.clone();
    let srv = IpcServer::start(d, file, Arc::downgrade(&src), Duration::from_secs(2)).unwrap();
    (srv, src)
}

/// The peer's side: its import cache, as the backend's sink does it.
struct Peer {
    cache: ImportCache<Mapped>,
    revokes: AtomicUsize,
    lost: Mutex<Vec<String>>,
}

const PEER: u128 = 7;

impl RevokeSink for Peer {
    fn revoke(&self, region: &Desc, key: u64) -> FinishRevoke {
        self.revokes.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = self
            .cache
            .begin_revoke(PEER, region, key, deregistered("owner", region));
        Box::new(move || e.is_none_or(|e| e.finish_revoke(deadline)))
    }

    fn link_lost(&self, reason: &str) {
        let e = Error::RemoteDisconnect {
            peer: "owner".into(),
            reason: format!("the cuda socket to the owner ended ({reason})"),
        };
        self.cache.revoke_peer(PEER, &e, Duration::from_secs(5));
        self.lost.lock().push(reason.to_owned());
    }
}

fn peer() -> Arc<Peer> {
    Arc::new(Peer {
        cache: ImportCache::default(),
        revokes: AtomicUsize::new(0),
        lost: Mutex::new(Vec::new()),
    })
}

fn client(p: &Arc<Peer>, path: &Path, timeout: Duration) -> IpcClient {
    let sink: Arc<dyn RevokeSink> = p.clone();
    IpcClient::new("owner", path, timeout, Some(sink))
}

fn rkey(key: u64) -> RegionKey {
    RegionKey {
        peer: PEER,
        region: REGION,
        key,
    }
}

fn import(p: &Peer, c: &IpcClient, key: u64) -> Result<Arc<RegionImport<Mapped>>> {
    p.cache
        .region(rkey(key), "owner", Duration::from_secs(5), || {
            c.announce(&REGION, key)
        })
}

#[test]
fn grant_maps_the_same_bytes_and_wrong_key_is_denied() {
    let o = owner();
    let d = dir("grant");
    let (srv, _src) = start(&o, &d, "a.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
    let c = IpcClient::new("a", srv.path(), Duration::from_secs(5), None);
    let (fd, size) = c.grant(&o.region, 42, 1).unwrap();
    assert_eq!(size, 4096);
    assert_eq!(read_fd(&fd, 4096), vec![0xb2; 4096]);
    let (fd, _) = c.grant(&o.region, 42, 0).unwrap();
    assert_eq!(read_fd(&fd, 4096), vec![0xa1; 4096]);
    // The granted fd is a separate descriptor of the same file.
    assert_ne!(fd.as_raw_fd(), o.chunks[0].as_raw_fd());
    assert_eq!(srv.importers(&o.region, 42), 1, "the grant is recorded");

    let e = c.grant(&o.region, 41, 0).unwrap_err();
    assert!(
        matches!(&e, Error::Denied { reason, .. } if reason == "wrong key"),
        "{e}"
    );
    let e = c.grant(&o.region, 42, 2).unwrap_err();
    assert!(
        matches!(&e, Error::Denied { reason, .. } if reason == "no chunk 2"),
        "{e}"
    );
    let e = c
        .grant(&Desc::new(0x7000_0000, 8193, 0), 42, 0)
        .unwrap_err();
    assert!(matches!(e, Error::Denied { .. }), "{e}");
    // Announcements are checked the same way, and refusals are not recorded.
    let e = c.announce(&o.region, 41).unwrap_err();
    assert!(
        matches!(&e, Error::Denied { reason, .. } if reason == "wrong key"),
        "{e}"
    );
    assert_eq!(srv.importers(&o.region, 41), 0);
    c.announce(&o.region, 42).unwrap();
    // The connection survives refusals.
    c.notify("b", b"hello").unwrap();
    assert_eq!(
        o.notifs.lock().clone(),
        vec![("b".to_owned(), b"hello".to_vec())]
    );
    // Calls from several threads share the connection.
    let c = Arc::new(c);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                for j in 0..20 {
                    c.notify("t", &[i, j]).unwrap();
                    let (fd, _) = c.grant(&REGION, 42, u32::from(j % 2)).unwrap();
                    assert_eq!(read_fd(&fd, 1)[0], if j % 2 == 0 { 0xa1 } else { 0xb2 });
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(o.notifs.lock().len(), 1 + 8 * 20);
    drop(srv);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn garbage_frames_drop_only_that_connection() {
    let o = owner();
    let d = dir("garbage");
    let (srv, _src) = start(&o, &d, "a.sock");
    let good = IpcClient::new("a", srv.path(), Duration::from_secs(5), None);
    good.notify("x", b"1").unwrap();
    let cases: Vec<Vec<u8>> = vec![
        vec![0xff; 4],    // huge length
        vec![0, 0, 0, 0], // empty frame
        {
            let mut v = 3u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[9, 9, 9]); // unknown type
            v
        },
        {
            let mut v = 2u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[T_GRANT, 0]); // truncated grant
            v
        },
        {
            let mut v = 9u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[T_OPENED, 0, 0, 0, 0, 0, 0, 0, 0]); // truncated announcement
            v
        },
        Frame::Ack { id: 1 }.encode(), // a reply sent as a request
        Frame::Revoke {
            region: REGION,
            key: 42,
        }
        .encode(), // the owner's frame sent to the owner
    ];
    for bytes in cases {
        let mut s = UnixStream::connect(srv.path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut buf = [0u8; 16];
        // The server closes the connection: EOF (or reset), not a hang.
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "connection dropped for {bytes:?}");
    }
    // An unsolicited Revoked is ignored (no state kept), the connection stays.
    let mut s = UnixStream::connect(srv.path()).unwrap();
    s.write_all(
        &Frame::Revoked {
            region: REGION,
            key: 42,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(
        &Frame::Notif {
            id: 5,
            from: "raw".into(),
            msg: vec![1],
        }
        .encode(),
    )
    .unwrap();
    let mut fds = Vec::new();
    let body = read_frame(&s, &mut fds).unwrap().unwrap();
    assert_eq!(Frame::decode(&body).unwrap(), Frame::Ack { id: 5 });
    assert_eq!(srv.shared.peers.revoking(), 0);
    // The good connection and new ones still work.
    good.notify("x", b"2").unwrap();
    let (fd, _) = IpcClient::new("a", srv.path(), Duration::from_secs(5), None)
        .grant(&o.region, 42, 0)
        .unwrap();
    assert_eq!(read_fd(&fd, 16), vec![0xa1; 16]);
    assert_eq!(o.notifs.lock().len(), 3);
    drop(srv);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn dead_or_stuck_server_is_a_clear_error() {
    // Nobody listening.
    let d = dir("dead");
    std::fs::create_dir_all(&d).unwrap();
    let c = IpcClient::new("gone", &d.join("none.sock"), Duration::from_secs(1), None);
    let e = c.grant(&Desc::new(0, 1, 0), 1, 0).unwrap_err();
    assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
    assert!(e.to_string().contains("none.sock"), "{e}");

    // A server that shut down after the client connected.
    let o = owner();
    let (srv, src) = start(&o, &d, "b.sock");
    let c = IpcClient::new("b", srv.path(), Duration::from_secs(5), None);
    c.notify("x", b"1").unwrap();
    srv.shutdown();
    let t = Instant::now();
    let e = c.notify("x", b"2").unwrap_err();
    assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));

    // The owner agent is gone but the socket thread still answers: refused, not a hang.
    let srv = IpcServer::start(&d, "c.sock", Arc::downgrade(&src), Duration::from_secs(2)).unwrap();
    let c = IpcClient::new("c", srv.path(), Duration::from_secs(5), None);
    drop(src);
    drop(o);
    let e = c.grant(&REGION, 42, 0).unwrap_err();
    assert!(e.to_string().contains("shut down"), "{e}");

    // A stuck server (accepts, never answers): the client's timeout.
    let stuck_path = d.join("stuck.sock");
    let _ = std::fs::remove_file(&stuck_path);
    let l = UnixListener::bind(&stuck_path).unwrap();
    let c = IpcClient::new("stuck", &stuck_path, Duration::from_millis(300), None);
    let t = Instant::now();
    let e = c.notify("x", b"1").unwrap_err();
    assert!(e.to_string().contains("no reply"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(l);
    drop(srv);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn frames_round_trip_and_truncations_fail() {
    let frames = vec![
        Frame::Grant {
            id: 1,
            region: Desc::new(2, 3, 4),
            key: 5,
            chunk: 6,
        },
        Frame::Granted {
            id: 7,
            alloc_size: 8,
        },
        Frame::Refused {
            id: 9,
            reason: "nope".into(),
        },
        Frame::Notif {
            id: 10,
            from: "agent".into(),
            msg: vec![1, 2, 3],
        },
        Frame::Ack { id: 11 },
        Frame::Opened {
            id: 12,
            region: Desc::new(13, 14, 15),
            key: 16,
        },
        Frame::Revoke {
            region: Desc::new(17, 18, 19),
            key: 20,
        },
        Frame::Revoked {
            region: Desc::new(21, 22, 23),
            key: 24,
        },
    ];
    for f in frames {
        let b = f.encode();
        assert_eq!(
            u32::from_le_bytes(b[..4].try_into().unwrap()) as usize,
            b.len() - 4
        );
        assert_eq!(Frame::decode(&b[4..]).unwrap(), f);
        for n in 4..b.len() {
            assert!(Frame::decode(&b[4..n]).is_err(), "{f:?} cut at {n}");
        }
        let mut long = b[4..].to_vec();
        long.push(0);
        assert!(Frame::decode(&long).is_err(), "{f:?} with a trailing byte");
    }
}

/// Owner and peer in two threads over the real socket: the peer imports both chunks (one
/// through a granted fd, one "opened" from a handle after announcing it), the owner
/// deregisters while a copy is in flight, the peer waits for it, closes both mappings,
/// drops the region and answers; its next transfer fails with the clear error.
#[test]
fn owner_deregistration_revokes_the_peer_mapping() {
    let o = owner();
    let d = dir("revoke");
    let (srv, _src) = start(&o, &d, "a.sock");
    let p = peer();
    let c = Arc::new(client(&p, srv.path(), Duration::from_secs(5)));
    let closed = Arc::new(AtomicUsize::new(0));

    let r = import(&p, &c, 42).unwrap();
    assert_eq!(
        srv.importers(&REGION, 42),
        1,
        "the announcement is recorded"
    );
    let m0 = r
        .mapping(0, 0, || {
            let (fd, size) = c.grant(&REGION, 42, 0)?;
            Ok(Arc::new(Mapped::new(
                &fd,
                size as usize,
                Arc::clone(&closed),
            )))
        })
        .unwrap();
    let m1 = r
        .mapping(1, 0, || {
            Ok(Arc::new(Mapped::new(
                &o.chunks[1],
                4096,
                Arc::clone(&closed),
            )))
        })
        .unwrap();
    // Made once, then shared; a second user of the region does not announce again.
    let again = r.mapping(0, 0, || Err(Error::TimedOut)).unwrap();
    assert!(Arc::ptr_eq(&again, &m0));
    let r2 = p
        .cache
        .region(rkey(42), "owner", Duration::from_secs(5), || {
            Err(Error::TimedOut)
        })
        .unwrap();
    assert!(Arc::ptr_eq(&r, &r2));
    assert_eq!(p.cache.mappings(), 2);
    let x0 = Arc::new(Prepared::new(&r, &m0));
    let x1 = Prepared::new(&r, &m1);
    drop((again, m0, m1, r, r2));
    assert_eq!(x0.post(None, Duration::ZERO).unwrap(), vec![0xa1; 4096]);
    assert_eq!(x1.post(None, Duration::ZERO).unwrap(), vec![0xb2; 4096]);

    // A copy in flight when the owner deregisters: the revocation waits for it.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let slow = {
        let x0 = Arc::clone(&x0);
        let c = Arc::clone(&c);
        // The copy's completion also needs the reader (a notification's answer): the
        // revocation must not block it.
        std::thread::spawn(move || {
            x0.post_then(Some(&tx), Duration::from_millis(300), || {
                c.notify("peer", b"in flight").unwrap()
            })
        })
    };
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    o.registered.store(false, Ordering::SeqCst); // the agent removed the region
    let t = Instant::now();
    let report = srv.revoke(&REGION, 42, Duration::from_secs(5));
    let took = t.elapsed();
    assert_eq!(
        report,
        RevokeReport {
            peers: 1,
            acked: 1,
            gone: 0,
            late: 0
        }
    );
    assert!(
        took >= Duration::from_millis(250),
        "answered after the copy: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        slow.join().unwrap().unwrap(),
        vec![0xa1; 4096],
        "the copy in flight ended well"
    );
    assert_eq!(p.revokes.load(Ordering::SeqCst), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 2, "both mappings closed");
    assert!(!p.cache.contains(&rkey(42)) && p.cache.is_empty());
    assert_eq!(srv.importers(&REGION, 42), 0);

    // Later transfers fail cleanly, without touching the (unmapped) memory.
    for x in [&*x0, &x1] {
        let e = x.post(None, Duration::ZERO).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Denied, "{e}");
        assert!(
            e.to_string().contains("was deregistered by its owner"),
            "{e}"
        );
    }
    // A new import is refused by the owner and not kept.
    let e = import(&p, &c, 42).unwrap_err();
    assert!(
        matches!(&e, Error::Denied { reason, .. } if reason == "not registered"),
        "{e}"
    );
    assert!(p.cache.is_empty());
    // Nothing to revoke a second time; the connection is still good.
    assert_eq!(srv.revoke(&REGION, 42, Duration::from_secs(5)).peers, 0);
    c.notify("peer", b"still here").unwrap();
    assert!(p.lost.lock().is_empty());
    drop(srv);
    let _ = std::fs::remove_dir_all(&d);
}

fn raw_announce(path: &Path, key: u64) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let f = Frame::Opened {
        id: 1,
        region: REGION,
        key,
    };
    (&s).write_all(&f.encode()).unwrap();
    let body = read_frame(&s, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(Frame::decode(&body).unwrap(), Frame::Ack { id: 1 });
    s
}

const CHILD_ENV: &str = "NIXL_CUDA_IPC_TEST_CHILD";

/// The peer that dies (does nothing unless started by the test below): announces, says so,
/// and waits to be killed.
#[test]
fn revoke_child_announces_and_waits() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let _s = raw_announce(Path::new(&path), 42);
    println!("ANNOUNCED");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn silent_peers_cost_only_the_bound_and_dead_ones_are_skipped() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let o = owner();
    let d = dir("silent");
    let (srv, _src) = start(&o, &d, "a.sock");
    let p = peer();
    let c = client(&p, srv.path(), Duration::from_secs(5));

    // A peer process that announced and was then killed.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cuda::ipc::tests::revoke_child_announces_and_waits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, srv.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if line.is_ok_and(|l| l.contains("ANNOUNCED")) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the child announced");
    import(&p, &c, 42).unwrap();
    assert_eq!(srv.importers(&REGION, 42), 2);
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    let report = srv.revoke(&REGION, 42, Duration::from_secs(5));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!((report.acked, report.late), (1, 0), "{report:?}");
    assert_eq!(report.gone + report.acked, report.peers, "{report:?}");
    assert!(p.cache.is_empty());

    // A live peer that never answers: the owner waits the bound, reports it, goes on.
    let silent = raw_announce(srv.path(), 42);
    import(&p, &c, 42).unwrap();
    assert_eq!(srv.importers(&REGION, 42), 2);
    let bound = Duration::from_millis(600);
    let t = Instant::now();
    let report = srv.revoke(&REGION, 42, bound);
    let took = t.elapsed();
    assert_eq!(
        report,
        RevokeReport {
            peers: 2,
            acked: 1,
            gone: 0,
            late: 1
        }
    );
    assert!(took >= bound - Duration::from_millis(20), "{took:?}");
    assert!(took < bound + Duration::from_secs(2), "{took:?}");
    assert!(p.cache.is_empty(), "the good peer gave its import up");
    // The silent peer did receive the revocation.
    let body = read_frame(&silent, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(
        Frame::decode(&body).unwrap(),
        Frame::Revoke {
            region: REGION,
            key: 42
        }
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(&d);
}

/// A fake owner on a raw socket: answers the first announcement with `script`, then runs
/// `then` on the connection.
fn fake_owner(
    path: &Path,
    script: impl FnOnce(&UnixStream, u64) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let body = read_frame(&s, &mut Vec::new()).unwrap().unwrap();
        let Frame::Opened { id, .. } = Frame::decode(&body).unwrap() else {
            panic!("expected an announcement");
        };
        script(&s, id);
    })
}

#[test]
fn a_revocation_racing_the_announcement_wins() {
    let d = dir("race");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("fake.sock");
    // The owner deregisters between recording the import and answering it.
    let owner = fake_owner(&path, |s, id| {
        let revoke = Frame::Revoke {
            region: REGION,
            key: 42,
        };
        (&*s).write_all(&revoke.encode()).unwrap();
        (&*s).write_all(&Frame::Ack { id }.encode()).unwrap();
        let body = read_frame(s, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(
            Frame::decode(&body).unwrap(),
            Frame::Revoked {
                region: REGION,
                key: 42
            }
        );
    });
    let p = peer();
    let c = client(&p, &path, Duration::from_secs(5));
    let e = import(&p, &c, 42).unwrap_err();
    assert!(e.to_string().contains("deregistered by its owner"), "{e}");
    assert!(p.cache.is_empty());
    owner.join().unwrap(); // it got the answer
    c.close();

    // A mapping made while its region is being revoked is closed, not kept.
    let r: Arc<RegionImport<Mapped>> = Arc::new(RegionImport::new(rkey(1), "owner"));
    let closed = Arc::new(AtomicUsize::new(0));
    let fd = memfd(&[1; 4096]);
    let e = r
        .mapping(0, 0, || {
            assert!(r.revoke(deregistered("owner", &REGION), Duration::from_secs(1)));
            Ok(Arc::new(Mapped::new(&fd, 4096, Arc::clone(&closed))))
        })
        .unwrap_err();
    assert!(e.to_string().contains("deregistered by its owner"), "{e}");
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    assert_eq!(r.mappings(), 0);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn garbage_or_a_dead_owner_makes_the_peer_give_its_mappings_up() {
    let d = dir("owner-garbage");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("fake.sock");
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("unknown type", {
            let mut v = 3u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[9, 9, 9]);
            v
        }),
        ("oversized", ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec()),
        (
            "wrong direction",
            Frame::Opened {
                id: 1,
                region: REGION,
                key: 42,
            }
            .encode(),
        ),
        ("truncated revoke", {
            let mut v = 9u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[T_REVOKE, 1, 2, 3, 4, 5, 6, 7, 8]);
            v
        }),
        ("owner died", Vec::new()),
    ];
    for (what, bytes) in garbage {
        let owner = fake_owner(&path, move |s, id| {
            (&*s).write_all(&Frame::Ack { id }.encode()).unwrap();
            // A revocation of a region the peer never imported is simply answered.
            let other = Frame::Revoke {
                region: Desc::new(1, 2, 3),
                key: 4,
            };
            (&*s).write_all(&other.encode()).unwrap();
            let body = read_frame(s, &mut Vec::new()).unwrap().unwrap();
            assert!(matches!(
                Frame::decode(&body).unwrap(),
                Frame::Revoked { .. }
            ));
            (&*s).write_all(&bytes).unwrap();
            // Then the connection ends (or the client drops it first).
        });
        let p = peer();
        let c = client(&p, &path, Duration::from_secs(5));
        let closed = Arc::new(AtomicUsize::new(0));
        let fd = memfd(&[3; 4096]);
        let r = import(&p, &c, 42).unwrap();
        let m = r
            .mapping(0, 0, || {
                Ok(Arc::new(Mapped::new(&fd, 4096, Arc::clone(&closed))))
            })
            .unwrap();
        let x = Prepared::new(&r, &m);
        drop((m, r));
        owner.join().unwrap();
        let t = Instant::now();
        while p.lost.lock().is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let lost = p.lost.lock().clone();
        assert_eq!(lost.len(), 1, "{what}: {lost:?}");
        assert_eq!(closed.load(Ordering::SeqCst), 1, "{what}: mapping closed");
        assert!(p.cache.is_empty(), "{what}");
        let e = x.post(None, Duration::ZERO).unwrap_err();
        assert_eq!(e.class(), ErrorClass::RemoteDisconnect, "{what}: {e}");
        assert!(
            e.to_string().contains("the cuda socket to the owner ended"),
            "{what}: {e}"
        );
        eprintln!("{what}: {e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn import_cache_replaces_re_registered_regions_and_revokes_peers() {
    let p = peer();
    let closed = Arc::new(AtomicUsize::new(0));
    let fd = memfd(&[5; 4096]);
    let mk = || Ok(Arc::new(Mapped::new(&fd, 4096, Arc::clone(&closed))));
    let ok = || Ok(());
    let a = p
        .cache
        .region(rkey(7), "owner", Duration::from_secs(1), ok)
        .unwrap();
    a.mapping(0, 0, mk).unwrap();
    a.mapping(0, 1, mk).unwrap();
    let other = RegionKey { peer: 8, ..rkey(7) };
    let b = p
        .cache
        .region(other, "other", Duration::from_secs(1), ok)
        .unwrap();
    b.mapping(0, 0, mk).unwrap();
    assert_eq!((p.cache.len(), p.cache.mappings()), (2, 3));
    // A failed announcement is returned and not cached; the next call asks again.
    let elsewhere = RegionKey {
        region: Desc::new(0x9000_0000, 100, 0),
        ..rkey(9)
    };
    let e = p
        .cache
        .region(elsewhere, "owner", Duration::from_secs(1), || {
            Err(Error::TimedOut)
        })
        .unwrap_err();
    assert!(matches!(e, Error::TimedOut));
    assert_eq!(p.cache.len(), 2);
    // Peer 7 re-registered the region (new key): the old import is revoked and dropped.
    let a2 = p
        .cache
        .region(rkey(8), "owner", Duration::from_secs(1), ok)
        .unwrap();
    assert_eq!(closed.load(Ordering::SeqCst), 2);
    assert!(a.revoked().is_some() && a2.revoked().is_none());
    assert!(hold_all(&Arc::from(vec![Arc::clone(&a)])).is_err());
    // Holds on several regions are all or nothing.
    let both: Arc<[Arc<RegionImport<Mapped>>]> = Arc::from(vec![Arc::clone(&a2), Arc::clone(&b)]);
    let h = hold_all(&both).unwrap();
    let mixed: Arc<[Arc<RegionImport<Mapped>>]> = Arc::from(vec![Arc::clone(&a2), Arc::clone(&a)]);
    assert!(hold_all(&mixed).is_err());
    drop(h);
    // Invalidating peer 8 revokes its regions.
    let e = Error::RemoteDisconnect {
        peer: "other".into(),
        reason: "connection closed".into(),
    };
    assert_eq!(p.cache.revoke_peer(8, &e, Duration::from_secs(1)), (1, 0));
    assert_eq!(closed.load(Ordering::SeqCst), 3);
    let e = hold_all(&both).unwrap_err();
    assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
    assert_eq!(p.cache.len(), 1);
    // A revocation with a copy still running gives up at the bound and keeps the mapping
    // until the copy lets go.
    a2.mapping(0, 0, mk).unwrap();
    let only: Arc<[Arc<RegionImport<Mapped>>]> = Arc::from(vec![Arc::clone(&a2)]);
    let h = hold_all(&only).unwrap();
    let t = Instant::now();
    assert!(!p.cache.revoke_region(
        PEER,
        &REGION,
        8,
        deregistered("owner", &REGION),
        Duration::from_millis(100)
    ));
    assert!(t.elapsed() >= Duration::from_millis(90));
    assert_eq!(closed.load(Ordering::SeqCst), 3, "still mapped while held");
    drop(h);
    drop((only, a2, both, mixed));
    assert_eq!(
        closed.load(Ordering::SeqCst),
        4,
        "closed with the last holder"
    );
}
