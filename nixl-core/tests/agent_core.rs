//! Core behaviour with a scripted backend: registration rules, metadata loading, backend
//! selection, and the request state machine (one terminal state per post, cancel, deadlines,
//! stale completions, deregistration waiting for transfers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::*;
use parking_lot::Mutex;

/// Registration for tests. Every buffer a test registers is declared before its registration
/// (so it is dropped after it), and the test reads it only after the transfers that write it
/// have completed: the contract of [`Agent::register`].
trait RegisterExt {
    fn reg(&self, list: &DescList) -> Result<Registration>;
    fn reg_with(&self, list: &DescList, backends: &[BackendName]) -> Result<Registration>;
}

impl RegisterExt for Agent {
    fn reg(&self, list: &DescList) -> Result<Registration> {
        // SAFETY: see the trait: test buffers outlive their registrations.
        unsafe { self.register(list) }
    }
    fn reg_with(&self, list: &DescList, backends: &[BackendName]) -> Result<Registration> {
        // SAFETY: as above.
        unsafe { self.register_with(list, backends) }
    }
}

/// A region a backend was told to forget: its key and the backend's public data.
type Forgotten = (u64, Vec<u8>);

/// A backend whose posts are parked until the test completes them.
#[derive(Debug)]
struct Scripted {
    name: BackendName,
    locality: Locality,
    parked: Arc<Mutex<Vec<Completion>>>,
    posts: Arc<AtomicUsize>,
    /// Complete every post inline with Ok instead of parking it.
    inline_ok: bool,
    unavailable: Option<&'static str>,
    /// Refuse every registration as Unavailable with this reason.
    refuse: Option<&'static str>,
    /// What each deregistration was given: the key and the public data.
    forgot: Arc<Mutex<Vec<Forgotten>>>,
}

impl Scripted {
    fn new(name: BackendName, locality: Locality) -> Scripted {
        Scripted {
            name,
            locality,
            parked: Arc::default(),
            posts: Arc::default(),
            inline_ok: false,
            unavailable: None,
            refuse: None,
            forgot: Arc::default(),
        }
    }
}

#[derive(Debug)]
struct ScriptedConn {
    parked: Arc<Mutex<Vec<Completion>>>,
    posts: Arc<AtomicUsize>,
    inline_ok: bool,
}

#[derive(Debug)]
struct ScriptedXfer {
    parked: Arc<Mutex<Vec<Completion>>>,
    posts: Arc<AtomicUsize>,
    inline_ok: bool,
}

const DRAM: &[MemKind] = &[MemKind::Dram];

impl Backend for Scripted {
    fn name(&self) -> BackendName {
        self.name
    }
    fn caps(&self) -> Caps {
        // The built-in backends' order, by name.
        let preference = match self.name {
            BackendName::Local => 0,
            BackendName::Cuda => 1,
            BackendName::Gds => 2,
            BackendName::Shm => 3,
            BackendName::Rdma => 4,
            BackendName::Uring => 5,
            BackendName::Posix => 6,
            BackendName::Object => 7,
            BackendName::Tcp => 8,
        };
        Caps::new(DRAM, self.locality, preference)
    }
    fn probe(&self) -> std::result::Result<(), Unusable> {
        match self.unavailable {
            Some(r) => Err(r.into()),
            None => Ok(()),
        }
    }
    fn start(&self, _target: TargetHandle) -> Result<()> {
        Ok(())
    }
    fn conn_info(&self) -> Vec<u8> {
        vec![self.name.code()]
    }
    fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
        match self.refuse {
            Some(reason) => Err(Error::Unavailable {
                backend: self.name,
                reason: reason.into(),
            }),
            None => Ok(vec![1, 2, 3]),
        }
    }
    fn deregister(&self, region: Registered<'_>) {
        self.forgot
            .lock()
            .push((region.key, region.public.to_vec()));
    }
    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        if conn_info == [self.name.code()] {
            Ok(())
        } else {
            Err("bad conn info".into())
        }
    }
    fn connect(&self, _peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        Ok(Arc::new(ScriptedConn {
            parked: Arc::clone(&self.parked),
            posts: Arc::clone(&self.posts),
            inline_ok: self.inline_ok,
        }))
    }
    fn shutdown(&self) {
        for c in self.parked.lock().drain(..) {
            c.complete(Err(Error::Cancelled));
        }
    }
}

impl Connection for ScriptedConn {
    fn prepare(&self, _plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        Ok(Box::new(ScriptedXfer {
            parked: Arc::clone(&self.parked),
            posts: Arc::clone(&self.posts),
            inline_ok: self.inline_ok,
        }))
    }
    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Ok(())
    }
    fn close(&self) {}
}

impl PreparedXfer for ScriptedXfer {
    fn post(&self, done: Completion) {
        self.posts.fetch_add(1, Ordering::SeqCst);
        if self.inline_ok {
            done.complete(Ok(()));
        } else {
            self.parked.lock().push(done);
        }
    }
}

struct Pair {
    a: Agent,
    b: Agent,
    a_buf: Vec<u8>,
    b_buf: Vec<u8>,
    _regs: (Registration, Registration),
    parked: Arc<Mutex<Vec<Completion>>>,
    posts: Arc<AtomicUsize>,
}

fn pair_with(make: impl Fn() -> Scripted) -> Pair {
    let s = make();
    let parked = Arc::clone(&s.parked);
    let posts = Arc::clone(&s.posts);
    let a = Agent::builder("a").backend(Arc::new(s)).build().unwrap();
    let b = Agent::builder("b")
        .backend(Arc::new(make()))
        .build()
        .unwrap();
    let a_buf = vec![0u8; 4096];
    let b_buf = vec![0u8; 4096];
    let ra = a.reg(&dram(&[Desc::from_slice(&a_buf)])).unwrap();
    let rb = b.reg(&dram(&[Desc::from_slice(&b_buf)])).unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    Pair {
        a,
        b,
        a_buf,
        b_buf,
        _regs: (ra, rb),
        parked,
        posts,
    }
}

fn pair() -> Pair {
    pair_with(|| Scripted::new(BackendName::Shm, Locality::SameNode))
}

fn dram(d: &[Desc]) -> DescList {
    DescList::from_descs(MemKind::Dram, d.to_vec()).unwrap()
}

fn xfer(p: &Pair, opts: XferOptions) -> XferRequest {
    p.a.create_xfer(
        XferOp::Write,
        &dram(&[Desc::from_slice(&p.a_buf[..100])]),
        &dram(&[Desc::from_slice(&p.b_buf[100..200])]),
        "b",
        opts,
    )
    .unwrap()
}

/// Asserts that the request's last post failed, saying `why`.
fn assert_failed(req: &XferRequest, why: &str) {
    match req.status() {
        XferStatus::Failed(e) => assert!(e.to_string().contains(why), "{e}"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn registration_rules() {
    let p = pair();
    let err = DescList::from_descs(MemKind::Dram, vec![Desc::new(1, 0, 0)]).unwrap_err();
    assert!(err.to_string().contains("zero-length"), "{err}");
    // Overlap with an existing registration of the same kind.
    let err =
        p.a.reg(&dram(&[Desc::from_slice(&p.a_buf[10..20])]))
            .unwrap_err();
    assert!(matches!(err, Error::Overlap { .. }), "{err}");
    // All-or-nothing: a list whose second entry overlaps leaves nothing registered.
    let other = vec![0u8; 64];
    let err =
        p.a.reg(&dram(&[
            Desc::from_slice(&other),
            Desc::from_slice(&p.a_buf),
        ]))
        .unwrap_err();
    assert!(matches!(err, Error::Overlap { .. }));
    let r = p.a.reg(&dram(&[Desc::from_slice(&other)])).unwrap();
    // Deregister by descriptor, then again: a clear error.
    let gen = p.a.generation();
    r.forget();
    p.a.deregister(MemKind::Dram, &[Desc::from_slice(&other)])
        .unwrap();
    assert!(p.a.generation() > gen);
    let err =
        p.a.deregister(MemKind::Dram, &[Desc::from_slice(&other)])
            .unwrap_err();
    assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::NotFound);
    // The RAII handle deregisters on drop.
    let r = p.a.reg(&dram(&[Desc::from_slice(&other)])).unwrap();
    drop(r);
    p.a.reg(&dram(&[Desc::from_slice(&other)]))
        .unwrap()
        .deregister()
        .unwrap();
}

#[test]
fn vram_without_a_backend_says_why() {
    let a = Agent::builder("a")
        .backend(Arc::new(Scripted {
            unavailable: Some("no libcuda.so.1"),
            ..Scripted::new(BackendName::Cuda, Locality::SameNode)
        }))
        .build()
        .unwrap();
    assert_eq!(
        a.backends()[0].unavailable.as_deref(),
        Some("no libcuda.so.1")
    );
    let err = a
        .reg(&DescList::from_descs(MemKind::Vram, vec![Desc::new(0x1000, 10, 0)]).unwrap())
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable);
    assert!(err.to_string().contains("no libcuda.so.1"), "{err}");
    let src = std::error::Error::source(&err).expect("a source");
    assert!(src.downcast_ref::<Unusable>().is_some(), "{src:?}");
    // Asking for the backend: the probe's reason is the error's source, as the backend gave it.
    let err = a.check_backend(BackendName::Cuda).unwrap_err();
    let src = std::error::Error::source(&err).expect("a source");
    let why = src
        .downcast_ref::<Unusable>()
        .expect("the probe's Unusable");
    assert_eq!(why, &Unusable::from("no libcuda.so.1"));
    let err = a
        .reg_with(&dram(&[Desc::new(0x1000, 1, 0)]), &[BackendName::Cuda])
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
}

#[test]
fn post_complete_repost() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    assert!(matches!(req.status(), XferStatus::Idle));
    assert_eq!(req.backend(), BackendName::Shm);
    req.post().unwrap();
    assert!(matches!(req.status(), XferStatus::InProgress));
    assert!(
        matches!(req.post(), Err(Error::InFlight)),
        "repost in flight"
    );
    assert_eq!(
        p.posts.load(Ordering::SeqCst),
        1,
        "refused repost reached the backend"
    );
    let c = p.parked.lock().pop().unwrap();
    assert!(c.complete(Ok(())));
    assert!(matches!(req.status(), XferStatus::Done));
    // Post again: a new epoch.
    req.post().unwrap();
    let c = p.parked.lock().pop().unwrap();
    c.complete(Err(Error::Backend {
        backend: BackendName::Shm,
        op: "copy",
        reason: "EFAULT".into(),
    }));
    assert_failed(&req, "EFAULT");
}

#[test]
fn cancel_wins_once_and_late_completion_is_ignored() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    req.post().unwrap();
    req.cancel();
    assert!(matches!(req.status(), XferStatus::Cancelled));
    let late = p.parked.lock().pop().unwrap();
    assert!(!late.complete(Ok(())), "stale completion must lose");
    assert!(matches!(req.status(), XferStatus::Cancelled));
    // A completion from an old epoch cannot end a newer post.
    req.post().unwrap();
    let c1 = p.parked.lock().pop().unwrap();
    req.cancel();
    req.post().unwrap();
    assert!(!c1.complete(Ok(())));
    assert!(matches!(req.status(), XferStatus::InProgress));
    p.parked.lock().pop().unwrap().complete(Ok(()));
    assert!(matches!(req.status(), XferStatus::Done));
}

#[test]
fn release_waits_until_the_backend_lets_go() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    // Never posted, or ended: nothing to wait for.
    req.release();
    req.post().unwrap();
    assert!(req.is_held());
    let parked = Arc::clone(&p.parked);
    let let_go = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // The backend still has the completion after the cancel: it may still touch memory.
        let c = parked.lock().pop().unwrap();
        assert!(c.is_abandoned());
        drop(c);
    });
    let t = std::time::Instant::now();
    req.release();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "release returned while the backend held the request"
    );
    assert!(!req.is_held());
    assert!(matches!(req.status(), XferStatus::Cancelled));
    let_go.join().unwrap();
}

#[test]
fn dropped_completion_fails_the_post() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    req.post().unwrap();
    drop(p.parked.lock().pop());
    assert_failed(&req, "without completing");
}

#[test]
fn deadline_fires_without_polling() {
    let p = pair();
    let req = xfer(
        &p,
        XferOptions {
            deadline: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    );
    let t = Instant::now();
    req.post().unwrap();
    // The watchdog ends it and wakes the waiter.
    let st = req.wait_blocking(Some(Duration::from_secs(5)));
    assert!(matches!(st, XferStatus::TimedOut), "{st:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // The backend's late completion changes nothing.
    assert!(!p.parked.lock().pop().unwrap().complete(Ok(())));
    assert!(matches!(req.status(), XferStatus::TimedOut));
}

#[test]
fn async_wait_resolves_on_completion() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    req.post().unwrap();
    let parked = Arc::clone(&p.parked);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        parked.lock().pop().unwrap().complete(Ok(()));
    });
    let st = block_on(req.wait());
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    t.join().unwrap();
}

/// A minimal executor: polls with a thread-unparking waker.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct W(std::thread::Thread);
    impl std::task::Wake for W {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(W(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn deregistration_waits_for_the_transfer_in_flight() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    req.post().unwrap();
    let a = &p.a;
    let desc = Desc::from_slice(&p.a_buf);
    let completed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let completed = &completed;
        let dereg = s.spawn(move || {
            a.deregister(MemKind::Dram, &[desc]).unwrap();
            // Returned only once the backend let go of the post.
            completed.load(Ordering::SeqCst)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !dereg.is_finished(),
            "deregistration must wait for the post"
        );
        let c = p.parked.lock().pop().unwrap();
        completed.store(true, Ordering::SeqCst);
        c.complete(Ok(()));
        assert!(
            dereg.join().unwrap(),
            "deregistration returned before the completion"
        );
    });
    // The region is gone: posting again fails cleanly.
    assert!(req.post().is_err());
    assert!(matches!(req.status(), XferStatus::Failed(_)));
}

#[test]
fn validation_errors_name_the_descriptor() {
    let p = pair();
    let l = dram(&[
        Desc::from_slice(&p.a_buf[..10]),
        Desc::from_slice(&p.a_buf[10..20]),
    ]);
    let outside = dram(&[
        Desc::from_slice(&p.b_buf[..10]),
        Desc::new(p.b_buf.as_ptr() as u64 + 4090, 10, 0),
    ]);
    let err =
        p.a.create_xfer(XferOp::Read, &l, &outside, "b", Default::default())
            .unwrap_err();
    assert!(
        matches!(err, Error::RemoteNotRegistered { index: 1, .. }),
        "{err}"
    );
    let short = dram(&[Desc::from_slice(&p.b_buf[..10])]);
    let err =
        p.a.create_xfer(XferOp::Read, &l, &short, "b", Default::default())
            .unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    let bad_len = dram(&[
        Desc::from_slice(&p.b_buf[..10]),
        Desc::from_slice(&p.b_buf[..11]),
    ]);
    let err =
        p.a.create_xfer(XferOp::Read, &l, &bad_len, "b", Default::default())
            .unwrap_err();
    assert!(err.to_string().contains("descriptor 1"), "{err}");
    let stray = [0u8; 16];
    let err =
        p.a.create_xfer(
            XferOp::Read,
            &dram(&[Desc::from_slice(&stray[..10])]),
            &short,
            "b",
            Default::default(),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::LocalNotRegistered { index: 0, .. }),
        "{err}"
    );
    let err =
        p.a.create_xfer(XferOp::Read, &l, &outside, "nobody", Default::default())
            .unwrap_err();
    assert!(matches!(err, Error::UnknownPeer(_)), "{err}");
}

#[test]
fn metadata_generations_partial_merge_and_restart() {
    let p = pair();
    let b_md = p.b.metadata();
    // Same generation again: accepted (idempotent); older: refused.
    p.a.load_remote(&b_md.encode()).unwrap();
    let mut old = b_md.clone();
    old.generation -= 1;
    let err = p.a.load_remote(&old.encode()).unwrap_err();
    assert!(matches!(err, Error::StaleMetadata { .. }), "{err}");

    // A new region on b, published as partial metadata, is merged.
    let extra = vec![0u8; 256];
    let _r = p.b.reg(&dram(&[Desc::from_slice(&extra)])).unwrap();
    let partial =
        p.b.partial_metadata(&dram(&[Desc::from_slice(&extra[..8])]))
            .unwrap();
    assert!(partial.partial && partial.regions.len() == 1);
    p.a.load_remote(&partial.encode()).unwrap();
    let l = dram(&[
        Desc::from_slice(&p.a_buf[..8]),
        Desc::from_slice(&p.a_buf[8..16]),
    ]);
    let r = dram(&[
        Desc::from_slice(&extra[..8]),
        Desc::from_slice(&p.b_buf[..8]),
    ]);
    p.a.create_xfer(XferOp::Read, &l, &r, "b", Default::default())
        .expect("both the merged and the original region are known");

    // A restarted b (new instance) replaces everything, even with a lower generation.
    let b2 = Agent::builder("b")
        .backend(Arc::new(Scripted::new(
            BackendName::Shm,
            Locality::SameNode,
        )))
        .build()
        .unwrap();
    p.a.load_remote(&b2.metadata_bytes()).unwrap();
    let err =
        p.a.create_xfer(XferOp::Read, &l, &r, "b", Default::default())
            .unwrap_err();
    assert!(matches!(err, Error::RemoteNotRegistered { .. }), "{err}");

    p.a.invalidate_remote("b").unwrap();
    assert!(matches!(
        p.a.invalidate_remote("b"),
        Err(Error::UnknownPeer(_))
    ));
    assert!(
        p.a.load_remote(&p.a.metadata_bytes()).is_err(),
        "own metadata refused"
    );
    assert!(p.a.load_remote(b"garbage").is_err());
}

#[test]
fn selection_prefers_locality_and_says_why() {
    let mk = |n, l| -> Arc<dyn Backend> {
        Arc::new(Scripted {
            inline_ok: true,
            ..Scripted::new(n, l)
        })
    };
    let a = Agent::builder("a")
        .backend(mk(BackendName::Tcp, Locality::AnyNode))
        .backend(mk(BackendName::Shm, Locality::SameNode))
        .build()
        .unwrap();
    let b = Agent::builder("b")
        .backend(mk(BackendName::Tcp, Locality::AnyNode))
        .backend(mk(BackendName::Shm, Locality::SameNode))
        .build()
        .unwrap();
    let (ab, bb, cb) = (vec![0u8; 64], vec![0u8; 64], vec![0u8; 64]);
    let _ra = a.reg(&dram(&[Desc::from_slice(&ab)])).unwrap();
    let _rc = b.reg(&dram(&[Desc::from_slice(&cb)])).unwrap();
    // b registers one buffer with tcp only: shm cannot carry it, and the request says so.
    let _rb = b
        .reg_with(&dram(&[Desc::from_slice(&bb)]), &[BackendName::Tcp])
        .unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    let l = dram(&[Desc::from_slice(&ab)]);
    // Both registered everywhere: shm wins by locality though tcp was added first.
    let req = a
        .create_xfer(
            XferOp::Write,
            &l,
            &dram(&[Desc::from_slice(&cb)]),
            "b",
            Default::default(),
        )
        .unwrap();
    assert_eq!(req.backend(), BackendName::Shm);
    let r = dram(&[Desc::from_slice(&bb)]);
    let req = a
        .create_xfer(XferOp::Write, &l, &r, "b", Default::default())
        .unwrap();
    assert_eq!(req.backend(), BackendName::Tcp);
    assert!(
        req.info().reason.contains("shm: remote region"),
        "{}",
        req.info().reason
    );
    req.run_blocking().unwrap();
    // Naming a backend that cannot carry it is an error with the reason.
    let named = |b| XferOptions {
        backend: Some(b),
        ..Default::default()
    };
    let err = a
        .create_xfer(XferOp::Write, &l, &r, "b", named(BackendName::Shm))
        .unwrap_err();
    assert!(matches!(err, Error::NoBackend { .. }), "{err}");
    // Naming one this agent does not run: unavailable here (as the C ABI reports it), with why.
    let err = a
        .create_xfer(XferOp::Write, &l, &r, "b", named(BackendName::Rdma))
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
    assert!(err.to_string().contains("not run by agent 'a'"), "{err}");
    assert!(a.check_backend(BackendName::Rdma).is_err());
    assert!(a.check_backend(BackendName::Shm).is_ok());
}

#[test]
fn shutdown_cancels_in_flight() {
    let p = pair();
    let req = xfer(&p, XferOptions::default());
    req.post().unwrap();
    p.a.shutdown();
    assert!(
        matches!(req.status(), XferStatus::Cancelled),
        "{:?}",
        req.status()
    );
    let err = p.a.create_xfer(
        XferOp::Write,
        &dram(&[Desc::from_slice(&p.a_buf[..1])]),
        &dram(&[Desc::from_slice(&p.b_buf[..1])]),
        "b",
        Default::default(),
    );
    assert!(matches!(err, Err(Error::Shutdown(_))));
}

#[test]
fn many_threads_post_at_once() {
    let p = pair_with(|| Scripted {
        inline_ok: true,
        ..Scripted::new(BackendName::Shm, Locality::SameNode)
    });
    let reqs: Vec<XferRequest> = (0..4).map(|_| xfer(&p, XferOptions::default())).collect();
    std::thread::scope(|s| {
        for r in &reqs {
            s.spawn(move || {
                for _ in 0..10_000 {
                    r.run_blocking().unwrap();
                }
            });
        }
    });
    assert_eq!(p.posts.load(Ordering::SeqCst), 40_000);
}

#[test]
fn metrics_count_bytes_requests_errors_and_latency() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let p = pair_with(|| Scripted {
            inline_ok: true,
            ..Scripted::new(BackendName::Shm, Locality::SameNode)
        });
        let req = xfer(&p, XferOptions::default());
        req.run_blocking().unwrap();
        req.run_blocking().unwrap();
        // A failing post counts an error of its kind.
        let q = pair();
        let bad = xfer(&q, XferOptions::default());
        bad.post().unwrap();
        q.parked
            .lock()
            .pop()
            .unwrap()
            .complete(Err(Error::RemoteDisconnect {
                peer: "b".into(),
                reason: "test".into(),
            }));
    });
    let snap = snapshotter.snapshot().into_vec();
    let find = |name: &str, label: (&str, &str)| {
        snap.iter()
            .find(|(k, _, _, _)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == label.0 && l.value() == label.1)
            })
            .map(|(_, _, _, v)| v)
    };
    assert_eq!(
        find("nixl_xfer_bytes_total", ("backend", "shm")),
        Some(&DebugValue::Counter(200))
    );
    assert_eq!(
        find("nixl_xfer_requests_total", ("peer", "b")),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(
        find("nixl_xfer_errors_total", ("kind", "remote_disconnect")),
        Some(&DebugValue::Counter(1))
    );
    match find("nixl_xfer_latency_seconds", ("op", "write")) {
        Some(DebugValue::Histogram(v)) => assert_eq!(v.len(), 2),
        other => panic!("{other:?}"),
    }
    // The agent-wide names of NIXL's telemetry: WRITEs are tx, no peer label.
    let plain = |name: &str| {
        snap.iter()
            .find(|(k, _, _, _)| k.key().name() == name && k.key().labels().count() == 0)
            .map(|(_, _, _, v)| v)
    };
    assert_eq!(
        plain("nixl_agent_tx_bytes_total"),
        Some(&DebugValue::Counter(200))
    );
    assert_eq!(
        plain("nixl_agent_tx_requests_total"),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(plain("nixl_agent_rx_bytes_total"), None, "no READ was made");
    assert_eq!(
        find("nixl_agent_errors_total", ("status", "remote_disconnect")),
        Some(&DebugValue::Counter(1))
    );
    match plain("nixl_agent_xfer_seconds") {
        Some(DebugValue::Histogram(v)) => assert_eq!(v.len(), 3, "two Done, one Failed"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_backend_that_cannot_take_a_region_is_left_out_unless_named() {
    let picky = Scripted {
        refuse: Some("no peer memory for this"),
        ..Scripted::new(BackendName::Rdma, Locality::AnyNode)
    };
    let a = Agent::builder("picky")
        .backend(Arc::new(picky))
        .backend(Arc::new(Scripted::new(BackendName::Tcp, Locality::AnyNode)))
        .build()
        .unwrap();
    let buf = vec![0u8; 4096];
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap();
    // Not named: registered with the backends that could take it.
    let r = a.reg(&list).unwrap();
    let md = a.metadata();
    let names: Vec<BackendName> = md.regions[0].backends.iter().map(|b| b.0).collect();
    assert_eq!(names, vec![BackendName::Tcp]);
    drop(r);
    // Named: its refusal is the answer.
    let e = a.reg_with(&list, &[BackendName::Rdma]).unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable { backend: BackendName::Rdma, reason } if reason.to_string() == "no peer memory for this"),
        "{e}"
    );
    // Nobody takes it: the refusal is the answer too, and nothing stays registered.
    let only = Agent::builder("only-picky")
        .backend(Arc::new(Scripted {
            refuse: Some("no peer memory for this"),
            ..Scripted::new(BackendName::Rdma, Locality::AnyNode)
        }))
        .build()
        .unwrap();
    let e = only.reg(&list).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    assert!(only.metadata().regions.is_empty());
}

#[test]
fn a_backend_is_told_the_key_and_its_data_of_a_region_it_forgets() {
    let tcp = Scripted::new(BackendName::Tcp, Locality::AnyNode);
    let forgot = Arc::clone(&tcp.forgot);
    let a = Agent::builder("forgets")
        .backend(Arc::new(tcp))
        .backend(Arc::new(Scripted {
            refuse: Some("no peer memory for this"),
            ..Scripted::new(BackendName::Rdma, Locality::AnyNode)
        }))
        .build()
        .unwrap();
    let buf = vec![0u8; 4096];
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap();
    // Deregistered after use: the region's own key and what tcp published for it.
    let r = a.reg_with(&list, &[BackendName::Tcp]).unwrap();
    let key = a.metadata().regions[0].key;
    r.deregister().unwrap();
    assert_eq!(forgot.lock().as_slice(), &[(key, vec![1, 2, 3])]);
    // Undone because a later backend refused: tcp forgets what it took, with its data.
    forgot.lock().clear();
    a.reg_with(&list, &[BackendName::Tcp, BackendName::Rdma])
        .unwrap_err();
    let undone = forgot.lock().clone();
    assert_eq!(undone.len(), 1, "{undone:?}");
    assert_ne!(undone[0].0, 0, "a real key, not a placeholder's");
    assert_eq!(undone[0].1, vec![1, 2, 3]);
    assert!(a.metadata().regions.is_empty());
}

#[test]
fn peer_metadata_is_what_was_loaded_and_goes_with_the_peer() {
    let p = pair();
    let md = p.a.peer_metadata("b").expect("b is loaded");
    assert_eq!(md.instance_id, p.b.instance_id());
    assert_eq!(md.regions.len(), 1);
    assert!(p.a.peer_metadata("nobody").is_none());
    p.a.invalidate_remote("b").unwrap();
    assert!(p.a.peer_metadata("b").is_none());
}
