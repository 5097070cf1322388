//! The staged path (nixl_core::staging) with real transports: device memory that no backend
//! carries directly goes through host memory, over `tcp` to a peer and through `uring` to a file.
//! A stand-in device backend ("cuda", whose "VRAM" is host memory and whose stager copies with
//! memcpy) takes the place of a GPU, so everything around the device copies runs here for real.

mod common;
use common::pattern;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixl_core::*;
use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};
use nixl_transports::uring::{UringBackend, UringConfig};

/// Host memory standing in for pinned staging memory.
#[derive(Debug)]
struct HostBuf(Vec<u8>);

// SAFETY: the Vec's heap memory is owned by the buffer, never resized, and used by no one else
// (the agent only lends it to backends through raw pointers); it lives until the drop.
unsafe impl HostBuffer for HostBuf {
    fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Copies with memcpy in chunks of 64 KiB over 3 slots (small, so that requests of a few MiB
/// cross many chunk boundaries); fails every copy while `fail` is set.
#[derive(Debug, Default)]
struct HostStager {
    fail: AtomicBool,
    copies: AtomicU64,
    /// Largest host buffer asked for.
    most: AtomicU64,
    /// Fail the copy with this number (counting from 1), once.
    fail_at: AtomicU64,
}

const CHUNK: u64 = 64 << 10;
const SLOTS: usize = 3;

impl HostStager {
    fn copy(&self, pieces: &[(Desc, u64)], to_host: bool) -> Result<()> {
        let nth = self.copies.load(Ordering::Relaxed) + 1;
        if self.fail.load(Ordering::Acquire)
            || self
                .fail_at
                .compare_exchange(nth, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Err(Error::Backend {
                backend: BackendName::Cuda,
                op: "stand-in device copy",
                reason: "injected device fault".into(),
            });
        }
        for (dev, host) in pieces {
            let (src, dst) = if to_host {
                (dev.addr, *host)
            } else {
                (*host, dev.addr)
            };
            // SAFETY: both ranges are registered test buffers of `dev.len` bytes (the "device"
            // range was checked against its registration by the agent; the host one lies in the
            // buffer this stager allocated), alive for the post, and they do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, dev.len as usize)
            };
        }
        self.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

// SAFETY: `alloc` returns a `HostBuf` of the length asked; the copies touch only the ranges
// they are given, and return when done.
unsafe impl Stager for HostStager {
    fn backend(&self) -> BackendName {
        BackendName::Cuda
    }
    fn kind(&self) -> MemKind {
        MemKind::Vram
    }
    fn alloc(&self, len: u64, _dev_id: u64) -> Result<Box<dyn HostBuffer>> {
        self.most.fetch_max(len, Ordering::Relaxed);
        Ok(Box::new(HostBuf(vec![0; len as usize])))
    }
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }
    fn slots(&self) -> usize {
        SLOTS
    }
    unsafe fn to_host(&self, pieces: &[(Desc, u64)]) -> Result<()> {
        self.copy(pieces, true)
    }
    unsafe fn to_device(&self, pieces: &[(Desc, u64)]) -> Result<()> {
        self.copy(pieces, false)
    }
}

/// A device backend that registers "VRAM" and reaches no peer: only its stager is useful.
#[derive(Debug)]
struct StandInGpu(Arc<HostStager>);

const VRAM: &[MemKind] = &[MemKind::Vram];

impl Backend for StandInGpu {
    fn name(&self) -> BackendName {
        BackendName::Cuda
    }
    fn caps(&self) -> Caps {
        Caps::new(VRAM, Locality::SameNode, 1).without_notifications()
    }
    fn probe(&self) -> std::result::Result<(), Unusable> {
        Ok(())
    }
    fn start(&self, _target: TargetHandle) -> Result<()> {
        Ok(())
    }
    fn conn_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn deregister(&self, _region: Registered<'_>) {}
    fn can_reach(&self, _conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        Err("the stand-in device reaches no peer".into())
    }
    fn connect(&self, _peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        Err(Error::InvalidArgument(
            "the stand-in device reaches no peer".into(),
        ))
    }
    fn shutdown(&self) {}
    fn stager(&self) -> Option<Arc<dyn Stager>> {
        Some(self.0.clone())
    }
}

fn tcp() -> Arc<TcpBackend> {
    Arc::new(TcpBackend::new(TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: Auth::host_only(),
        ..TcpConfig::default()
    }))
}

fn list(kind: MemKind, descs: Vec<Desc>) -> DescList {
    DescList::from_descs(kind, descs).unwrap()
}

/// Registers `descs` of `kind`: the memory they name outlives the registration.
fn reg(a: &Agent, kind: MemKind, descs: Vec<Desc>) -> Registration {
    // SAFETY: every caller declares its buffers before the registration, so they outlive it,
    // and reads them only after the transfers that write them have ended.
    unsafe { a.register(&list(kind, descs)) }.unwrap()
}

/// `n` contiguous descriptors of odd lengths covering `buf`, in order.
fn pieces(buf: &[u8], n: usize) -> Vec<Desc> {
    let step = buf.len() / n;
    let cut = |i: usize| match i {
        0 => 0,
        i if i == n => buf.len(),
        i => i * step + i % 7,
    };
    (0..n)
        .map(|i| {
            Desc::new(
                buf.as_ptr() as u64 + cut(i) as u64,
                (cut(i + 1) - cut(i)) as u64,
                0,
            )
        })
        .collect()
}

#[test]
fn device_memory_goes_over_tcp_through_host_memory_and_says_so() {
    let stager = Arc::new(HostStager::default());
    let a = Agent::builder("stage-a")
        .backend(Arc::new(StandInGpu(stager.clone())))
        .backend(tcp())
        .build()
        .unwrap();
    let b = Agent::builder("stage-b").backend(tcp()).build().unwrap();
    let len = (3 << 20) + 77;
    let gpu = pattern(5, len);
    let mut gpu_back = vec![0u8; len];
    let mut host = vec![0u8; len];
    let _g = reg(
        &a,
        MemKind::Vram,
        vec![Desc::from_slice(&gpu), Desc::from_mut_slice(&mut gpu_back)],
    );
    let _h = reg(&b, MemKind::Dram, vec![Desc::from_mut_slice(&mut host)]);
    let regions_before = a.metadata().regions.len();
    a.load_remote(&b.metadata_bytes()).unwrap();

    // WRITE: 300 odd pieces of "VRAM" into the peer's DRAM, with a notification, posted twice.
    let local = pieces(&gpu, 300);
    let remote: Vec<Desc> = local
        .iter()
        .map(|d| {
            Desc::new(
                host.as_ptr() as u64 + (d.addr - gpu.as_ptr() as u64),
                d.len,
                0,
            )
        })
        .collect();
    let w = a
        .create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, local.clone()),
            &list(MemKind::Dram, remote.clone()),
            "stage-b",
            common::opts(Some(b"staged")),
        )
        .unwrap();
    assert_eq!(w.info().backend, BackendName::Tcp);
    assert_eq!(w.info().staged, Some(BackendName::Cuda));
    assert!(w.info().reason.contains("cuda"), "{}", w.info().reason);
    assert_eq!(
        a.metadata().regions.len(),
        regions_before,
        "the staging buffer is not published"
    );
    w.run_blocking().unwrap();
    w.run_blocking().unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert!(n.iter().all(|x| x.msg == b"staged") && !n.is_empty());
    assert!(host == gpu, "bytes staged over tcp differ");

    // READ back into the other "VRAM" buffer.
    let back: Vec<Desc> = local
        .iter()
        .map(|d| {
            Desc::new(
                gpu_back.as_ptr() as u64 + (d.addr - gpu.as_ptr() as u64),
                d.len,
                0,
            )
        })
        .collect();
    let r = a
        .create_xfer(
            XferOp::Read,
            &list(MemKind::Vram, back),
            &list(MemKind::Dram, remote),
            "stage-b",
            XferOptions::default(),
        )
        .unwrap();
    assert_eq!(r.info().staged, Some(BackendName::Cuda));
    r.run_blocking().unwrap();
    drop(r);
    assert!(gpu_back == gpu, "bytes read back through staging differ");

    // A device fault fails the post with its cause, and the request works again afterwards.
    stager.fail.store(true, Ordering::Release);
    let e = w.run_blocking().unwrap_err();
    assert!(e.to_string().contains("injected device fault"), "{e}");
    stager.fail.store(false, Ordering::Release);
    w.run_blocking().unwrap();
    // Chunked: about len / 64 KiB copies per post, through a buffer of 3 chunks at most.
    assert!(stager.copies.load(Ordering::Relaxed) >= 4 * (len as u64 / CHUNK));
    assert!(stager.most.load(Ordering::Relaxed) <= CHUNK * SLOTS as u64);

    // A fault half-way (the 10th chunk's copy) ends the post Failed with its cause once the
    // chunks in flight have stopped; the next post runs whole.
    stager.fail_at.store(
        stager.copies.load(Ordering::Relaxed) + 10,
        Ordering::Release,
    );
    let e = w.run_blocking().unwrap_err();
    assert!(e.to_string().contains("injected device fault"), "{e}");
    host.iter_mut().for_each(|b| *b = 0);
    w.run_blocking().unwrap();
    assert!(host == gpu, "bytes staged after a failed post differ");

    // A deadline ends a post TimedOut (or Done, if it won), and the request is reusable.
    let quick = a
        .create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, local.clone()),
            &list(
                MemKind::Dram,
                local
                    .iter()
                    .map(|d| {
                        Desc::new(
                            host.as_ptr() as u64 + (d.addr - gpu.as_ptr() as u64),
                            d.len,
                            0,
                        )
                    })
                    .collect(),
            ),
            "stage-b",
            XferOptions {
                deadline: Some(Duration::from_micros(50)),
                ..Default::default()
            },
        )
        .unwrap();
    let st = {
        quick.post().unwrap();
        quick.wait_blocking(Some(Duration::from_secs(10)))
    };
    assert!(
        matches!(st, XferStatus::TimedOut | XferStatus::Done),
        "{st:?}"
    );
    quick.release();
    drop(quick);
    drop(w);
}

#[test]
fn without_a_stager_device_memory_has_no_backend_and_the_error_says_why() {
    // The peer's VRAM cannot be reached over tcp, staged or not.
    let stager = Arc::new(HostStager::default());
    let a = Agent::builder("nostage-a")
        .backend(Arc::new(StandInGpu(stager)))
        .backend(tcp())
        .build()
        .unwrap();
    let b = Agent::builder("nostage-b")
        .backend(Arc::new(StandInGpu(Arc::default())))
        .backend(tcp())
        .build()
        .unwrap();
    let src = pattern(1, 4096);
    let dst = vec![0u8; 4096];
    let _s = reg(&a, MemKind::Vram, vec![Desc::from_slice(&src)]);
    let _d = reg(&b, MemKind::Vram, vec![Desc::from_slice(&dst)]);
    a.load_remote(&b.metadata_bytes()).unwrap();
    let e = a
        .create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, vec![Desc::from_slice(&src)]),
            &list(MemKind::Vram, vec![Desc::from_slice(&dst)]),
            "nostage-b",
            XferOptions::default(),
        )
        .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("staged through host memory") && s.contains("does not move remote VRAM"),
        "{s}"
    );
}

#[test]
fn device_memory_goes_to_files_through_uring_the_gds_compatible_path() {
    let stager = Arc::new(HostStager::default());
    let u = Arc::new(UringBackend::new(UringConfig::default()));
    let a = Agent::builder("stage-file")
        .backend(Arc::new(StandInGpu(stager)))
        .backend(u.clone())
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("nixl-stage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kv.bin");
    let f = common::open_rw(&path, 0).unwrap();
    let len = (5 << 20) + 4095;
    let gpu = pattern(9, len);
    let mut back = vec![0u8; len];
    let _g = reg(
        &a,
        MemKind::Vram,
        vec![Desc::from_slice(&gpu), Desc::from_mut_slice(&mut back)],
    );
    let fd = f.as_raw_fd() as u64;
    let _f = reg(&a, MemKind::File, vec![Desc::new(0, len as u64, fd)]);
    let file = list(MemKind::File, vec![Desc::new(0, len as u64, fd)]);
    let w = a
        .create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, vec![Desc::from_slice(&gpu)]),
            &file,
            "stage-file",
            XferOptions::default(),
        )
        .unwrap();
    assert_eq!(
        (w.info().backend, w.info().staged),
        (BackendName::Uring, Some(BackendName::Cuda))
    );
    w.run_blocking().unwrap();
    assert!(std::fs::read(&path).unwrap() == gpu, "file differs");
    let r = a
        .create_xfer(
            XferOp::Read,
            &list(MemKind::Vram, vec![Desc::from_mut_slice(&mut back)]),
            &file,
            "stage-file",
            XferOptions::default(),
        )
        .unwrap();
    r.run_blocking().unwrap();
    drop((r, w));
    assert!(back == gpu, "read back differs");
    // The staging buffer was a registered io_uring buffer: the operations were fixed.
    let c = u.op_counts();
    assert!(
        c.fixed_buffer_ops > 0 && c.fixed_buffer_ops == c.ops,
        "{c:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_staged_request_counts_once_in_the_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let a = Agent::builder("stage-m-a")
        .backend(Arc::new(StandInGpu(Arc::default())))
        .backend(tcp())
        .build()
        .unwrap();
    let b = Agent::builder("stage-m-b").backend(tcp()).build().unwrap();
    let len = 1 << 20; // 16 chunks of 64 KiB
    let gpu = pattern(7, len);
    let host = vec![0u8; len];
    let _g = reg(&a, MemKind::Vram, vec![Desc::from_slice(&gpu)]);
    let _h = reg(&b, MemKind::Dram, vec![Desc::from_slice(&host)]);
    a.load_remote(&b.metadata_bytes()).unwrap();
    let w = a
        .create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, vec![Desc::from_slice(&gpu)]),
            &list(MemKind::Dram, vec![Desc::from_slice(&host)]),
            "stage-m-b",
            XferOptions::default(),
        )
        .unwrap();
    w.run_blocking().unwrap();
    w.run_blocking().unwrap();
    drop(w);
    assert!(host == gpu);
    // One snapshot: the debugging recorder's counters are read (and reset) by each snapshot.
    let all = snap.snapshot().into_vec();
    let counter = |name: &str| -> u64 {
        all.iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "peer" && l.value() == "stage-m-b")
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(
        counter("nixl_xfer_requests_total"),
        2,
        "two posts, not 2 x 16 chunks"
    );
    assert_eq!(counter("nixl_xfer_bytes_total"), 2 * len as u64);
}
