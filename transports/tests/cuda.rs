//! The `cuda` backend with real hardware, and its behaviour on hosts without it.
//!
//! The GPU tests run only with `NIXL_TEST_CUDA=1` (device 0, and device 1 where present) and
//! otherwise print `SKIPPED <test>: <reason>` to stderr. The two-process test re-executes this
//! binary as the peer (`NIXL_CUDA_TEST_CHILD` names the owner's metadata file); the owner
//! deregisters and frees its legacy buffer while the peer holds a mapping of it, and the peer's
//! next transfer must fail cleanly.
//!
//! The fabric test (`gpu_two_processes_fabric_handles`) also needs `NIXL_TEST_CUDA_FABRIC=1`
//! (GPUs that export fabric handles, with an IMEX channel); it forces two processes of this host
//! onto the cross-node path (each publishes another node id, with every device in one made-up
//! NVLink domain; announcements, the notification and the revocation go over the tcp backend's
//! control channel on loopback) and re-executes this binary as the peer
//! (`NIXL_CUDA_FABRIC_CHILD`).
//!
//! ```text
//! NIXL_TEST_CUDA=1 cargo test -p nixl-transports --test cuda -- --nocapture --test-threads=1
//! NIXL_TEST_CUDA=1 NIXL_TEST_CUDA_FABRIC=1 cargo test -p nixl-transports --test cuda fabric \
//!     -- --nocapture --test-threads=1
//! ```

mod common;
use common::{gpu, pattern, unavailable};

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nixl_core::*;
use nixl_transports::cuda::{
    device, CudaBackend, CudaConfig, DeviceFabric, FabricDomain, LegacyBuffer, NodeOverride,
    VmmBuffer,
};
use nixl_transports::fuzzing::cuda_nvml as nvml;
use nixl_transports::local::LocalBackend;
use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};

const CHILD_ENV: &str = "NIXL_CUDA_TEST_CHILD";

fn cfg(tag: &str) -> CudaConfig {
    CudaConfig {
        socket_dir: std::env::temp_dir()
            .join(format!("nixl-cuda-test-{tag}-{}", std::process::id())),
        ..CudaConfig::default()
    }
}

fn agent(name: &str, tag: &str) -> Agent {
    Agent::builder(name)
        .backend(CudaBackend::new(cfg(tag)))
        .build()
        .unwrap()
}

fn vram(d: Vec<Desc>) -> DescList {
    DescList::from_descs(MemKind::Vram, d).unwrap()
}

fn reg(a: &Agent, list: &DescList) -> Result<Registration> {
    // SAFETY: every buffer a test registers outlives its registration (declared before it).
    unsafe { a.register(list) }
}

#[test]
fn without_a_driver_cuda_is_unavailable_and_the_agent_runs() {
    let b = CudaBackend::new(cfg("nodrv"));
    if b.probe().is_ok() {
        nixl_testkit::skip("a CUDA driver is present", true, &[]);
        return;
    }
    let a = Agent::builder("nodrv")
        .backend(b)
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap();
    let reason = unavailable(&a, BackendName::Cuda).expect("cuda must be unavailable here");
    assert!(reason.starts_with("libcuda.so.1 not found: "), "{reason}");
    // Registering VRAM is refused with the reason; DRAM still works.
    let e = reg(&a, &vram(vec![Desc::new(0x7f00_0000_0000, 4096, 0)])).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    assert!(e.to_string().contains("libcuda.so.1 not found"), "{e}");
    let buf = vec![0u8; 64];
    let r = reg(
        &a,
        &DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap(),
    );
    assert!(r.is_ok());
    // Forcing cuda is refused with the same reason.
    let e = a.check_backend(BackendName::Cuda).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    assert!(e.to_string().contains("libcuda.so.1"), "{e}");
}

#[test]
fn gpu_probe_finds_a_device() {
    if !gpu() {
        return;
    }
    let b = CudaBackend::new(cfg("probe"));
    b.probe().expect("the driver probe");
    let ctx = device(0).unwrap();
    eprintln!(
        "device 0: vmm {} posix_fd {} fabric {}",
        ctx.vmm_supported(),
        ctx.posix_fd_supported(),
        ctx.fabric_supported()
    );
    assert!(ctx.vmm_supported());
    // Our VMM allocations are GPUDirect RDMA capable exactly where the device allows it.
    let v = VmmBuffer::new(0, 2 << 20, false).unwrap();
    let cap = {
        let _g = ctx.enter().unwrap();
        ctx.gdr_capable(v.addr()).unwrap()
    };
    eprintln!(
        "device 0: gdr with vmm {}; a VmmBuffer is gdr capable: {cap}",
        ctx.gdr_vmm_supported()
    );
    assert_eq!(cap, ctx.gdr_vmm_supported());
}

#[test]
fn gpu_register_vmm_and_legacy_memory() {
    if !gpu() {
        return;
    }
    let a = agent("reg", "reg");
    let v = VmmBuffer::new(0, 3 << 20, true).unwrap();
    assert!(v.capacity() >= 3 << 20);
    let l = LegacyBuffer::new(0, 1 << 20).unwrap();
    let r1 = reg(&a, &vram(vec![v.desc()])).unwrap();
    // A sub-range of a cudaMalloc allocation: chunk offset from the allocation base.
    let sub = Desc::new(l.addr() + 4096, 8192, 0);
    let r2 = reg(&a, &vram(vec![sub])).unwrap();
    // Wrong dev_id: refused with the device named.
    let bad = Desc::new(l.addr() + 65536, 4096, 1);
    match reg(&a, &vram(vec![bad])) {
        Err(e) => eprintln!("dev_id 1 refused: {e}"),
        Ok(_) => panic!("dev_id 1 accepted for device 0 memory"),
    }
    // Host memory is not VRAM.
    let host = vec![0u8; 4096];
    let e = reg(&a, &vram(vec![Desc::new(host.as_ptr() as u64, 4096, 0)])).unwrap_err();
    eprintln!("host memory refused: {e}");
    r1.deregister().unwrap();
    r2.deregister().unwrap();
}

#[test]
fn gpu_copy_between_two_agents_in_one_process() {
    if !gpu() {
        return;
    }
    let a = agent("a", "local-a");
    let b = agent("b", "local-b");
    let size = 8 << 20;
    let src = pattern(1, size);
    let va = VmmBuffer::new(0, size, false).unwrap();
    let lb = LegacyBuffer::new(0, size + 4096).unwrap();
    va.upload(0, &src).unwrap();
    lb.upload(0, &vec![0u8; size + 4096]).unwrap();
    let _ra = reg(&a, &vram(vec![va.desc()])).unwrap();
    let _rb = reg(&b, &vram(vec![lb.desc()])).unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();

    // WRITE a's VMM buffer into b's legacy buffer at an odd offset, with a notification.
    let req = a
        .create_xfer(
            XferOp::Write,
            &vram(vec![va.desc()]),
            &vram(vec![Desc::new(lb.addr() + 17, size as u64, 0)]),
            "b",
            common::opts(Some(b"vram-done")),
        )
        .unwrap();
    assert_eq!(req.backend(), BackendName::Cuda);
    req.run_blocking().unwrap();
    let mut out = vec![0u8; size];
    lb.download(17, &mut out).unwrap();
    assert!(out == src, "VRAM write differs");
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].msg, b"vram-done");

    // READ back in 4096 scattered 2 KiB blocks, reversed.
    va.upload(0, &vec![0u8; size]).unwrap();
    let blocks = 4096u64;
    let bs = (size as u64) / blocks;
    let mut local: Vec<Desc> = (0..blocks)
        .map(|i| Desc::new(va.addr() + i * bs, bs, 0))
        .collect();
    let mut remote: Vec<Desc> = (0..blocks)
        .map(|i| Desc::new(lb.addr() + 17 + i * bs, bs, 0))
        .collect();
    local.reverse();
    remote.reverse();
    let req = a
        .create_xfer(
            XferOp::Read,
            &vram(local),
            &vram(remote),
            "b",
            Default::default(),
        )
        .unwrap();
    for _ in 0..3 {
        req.run_blocking().unwrap();
    }
    let mut back = vec![0u8; size];
    va.download(0, &mut back).unwrap();
    assert!(back == src, "scattered VRAM read differs");

    // WRITE the same blocks, reversed, to 16-byte-aligned places (the gather kernel's vector
    // path; the READ above, 17 bytes off, took its byte path), then odd-sized pieces.
    lb.upload(0, &vec![0u8; size + 4096]).unwrap();
    let mut local: Vec<Desc> = (0..blocks)
        .map(|i| Desc::new(va.addr() + i * bs, bs, 0))
        .collect();
    let mut remote: Vec<Desc> = (0..blocks)
        .map(|i| Desc::new(lb.addr() + i * bs, bs, 0))
        .collect();
    local.reverse();
    remote.reverse();
    let req = a
        .create_xfer(
            XferOp::Write,
            &vram(local),
            &vram(remote),
            "b",
            Default::default(),
        )
        .unwrap();
    req.run_blocking().unwrap();
    let mut out = vec![0u8; size];
    lb.download(0, &mut out).unwrap();
    assert!(out == src, "scattered aligned VRAM write differs");
    let mut off = 0u64;
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for i in 0..300u64 {
        let n = 1 + (i * 37) % 999;
        local.push(Desc::new(va.addr() + off, n, 0));
        remote.push(Desc::new(lb.addr() + off + 3, n, 0));
        off += n + 5;
    }
    lb.upload(0, &vec![0u8; size + 4096]).unwrap();
    let req = a
        .create_xfer(
            XferOp::Write,
            &vram(local.clone()),
            &vram(remote),
            "b",
            Default::default(),
        )
        .unwrap();
    req.run_blocking().unwrap();
    lb.download(0, &mut out).unwrap();
    for d in &local {
        let o = (d.addr - va.addr()) as usize;
        let n = d.len as usize;
        assert!(
            out[o + 3..o + 3 + n] == src[o..o + n],
            "odd piece at {o}+{n} differs"
        );
    }
    // Bytes between the pieces stay untouched.
    assert!(
        out[..3].iter().all(|b| *b == 0),
        "written before the first piece"
    );
}

#[test]
fn gpu_staged_vram_to_a_dram_peer() {
    if !gpu() {
        return;
    }
    let a = Agent::builder("sa")
        .backend(CudaBackend::new(cfg("staged")))
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap();
    let b = Agent::builder("sb")
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap();
    let size = 1 << 20;
    let src = pattern(3, size);
    let v = VmmBuffer::new(0, size, false).unwrap();
    v.upload(0, &src).unwrap();
    let mut host = vec![0u8; size];
    let _ra = reg(&a, &vram(vec![v.desc()])).unwrap();
    let _rb = reg(
        &b,
        &DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut host)]).unwrap(),
    )
    .unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    let dst = Desc::new(host.as_ptr() as u64, size as u64, 0);
    let req = a
        .create_xfer(
            XferOp::Write,
            &vram(vec![v.desc()]),
            &DescList::from_descs(MemKind::Dram, vec![dst]).unwrap(),
            "sb",
            Default::default(),
        )
        .unwrap();
    assert_eq!(req.info().staged, Some(BackendName::Cuda));
    req.run_blocking().unwrap();
    assert!(host == src, "staged VRAM -> DRAM differs");
}

/// A child process of this test binary that runs the ignored test `name` as a peer of
/// `owner` (its metadata in a file named by `env`), given the owner's VMM and legacy buffers'
/// addresses: it prints `HOLDING` once it maps them, then waits for `GO` on stdin.
struct OwnerChild {
    child: Child,
    md: PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl OwnerChild {
    fn start(name: &str, env: &str, owner: &Agent, vmm: u64, legacy: u64) -> OwnerChild {
        let md = std::env::temp_dir().join(format!("nixl-cuda-{name}-md-{}", std::process::id()));
        std::fs::write(&md, owner.metadata_bytes()).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                name,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(env, &md)
            .env("NIXL_CUDA_TEST_VMM", vmm.to_string())
            .env("NIXL_CUDA_TEST_LEGACY", legacy.to_string())
            .env("NIXL_TEST_CUDA", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        let stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s);
            s
        });
        OwnerChild {
            child,
            md,
            lines,
            stdout,
            stderr,
        }
    }

    /// Waits until the child holds its mappings: `false` if it ended or said nothing in 120 s.
    fn holding(&self) -> bool {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line.contains("HOLDING") => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Lets the child go on after `HOLDING`.
    fn go(&mut self) {
        let mut stdin = self.child.stdin.take().unwrap();
        writeln!(stdin, "GO").unwrap();
    }

    /// Waits for the child, which must succeed; its stdout.
    fn finish(mut self) -> String {
        let status = self.child.wait().unwrap();
        let out = self.stdout.join().unwrap();
        let err = self.stderr.join().unwrap();
        let _ = std::fs::remove_file(&self.md);
        eprintln!("child stdout:\n{out}\nchild stderr:\n{err}");
        assert!(status.success(), "child failed");
        out
    }
}

/// The owner's side of the two-process test: legacy and VMM regions filled with patterns; the
/// child READs both and then holds its mappings; the owner deregisters and frees the legacy
/// buffer (the child's mapping is revoked first), the child checks that its next transfer to it
/// fails cleanly, WRITEs its own pattern into the VMM region, and notifies.
#[test]
fn gpu_two_processes_legacy_and_vmm_ipc() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // in the child, only `ipc_child` runs
    }
    if !gpu() {
        return;
    }
    let owner = agent("owner", "ipc-owner");
    let size = 6 << 20;
    let v = VmmBuffer::new(0, size, false).unwrap();
    let l = LegacyBuffer::new(0, size).unwrap();
    v.upload(0, &pattern(10, size)).unwrap();
    l.upload(0, &pattern(11, size)).unwrap();
    let _rv = reg(&owner, &vram(vec![v.desc()])).unwrap();
    let rl = reg(&owner, &vram(vec![l.desc()])).unwrap();
    let mut child = OwnerChild::start("ipc_child", CHILD_ENV, &owner, v.addr(), l.addr());
    let holding = child.holding();
    if holding {
        // Deregistration revokes the child's legacy mapping; the child answers at once.
        let t = std::time::Instant::now();
        rl.deregister().unwrap();
        let took = t.elapsed();
        eprintln!("deregistration with a peer mapping took {took:?}");
        assert!(
            took < CudaConfig::default().op_timeout,
            "the peer did not acknowledge the revocation ({took:?})"
        );
        // The memory can be freed now: nobody maps it any more.
        drop(l);
        child.go();
    }
    let out = child.finish();
    assert!(holding, "the child never reported holding its mappings");
    assert!(out.contains("CHILD OK"), "the child did not run its checks");
    let n = owner.wait_notifs(Duration::from_secs(10));
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].from, "peer");
    assert_eq!(n[0].msg, b"written");
    let mut got = vec![0u8; size];
    v.download(0, &mut got).unwrap();
    assert!(got == pattern(12, size), "the child's VMM write differs");
}

/// The child of the two-process test (does nothing unless started by it).
#[test]
#[ignore = "run by gpu_two_processes_legacy_and_vmm_ipc as its child process"]
fn ipc_child() {
    let Some(md) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let addr = |var: &str| -> u64 { std::env::var(var).unwrap().parse().unwrap() };
    let (vmm_addr, legacy_addr) = (addr("NIXL_CUDA_TEST_VMM"), addr("NIXL_CUDA_TEST_LEGACY"));
    let bytes = std::fs::read(md).unwrap();
    let cuda = CudaBackend::new(cfg("ipc-peer"));
    let peer = Agent::builder("peer")
        .backend(cuda.clone())
        .build()
        .unwrap();
    assert_eq!(peer.load_remote(&bytes).unwrap(), "owner");
    let size = 6 << 20;
    let mine = VmmBuffer::new(0, size, false).unwrap();
    let _r = reg(&peer, &vram(vec![mine.desc()])).unwrap();
    // READ both owner regions (VMM through a granted fd, legacy through an IPC handle), twice
    // each (the second post reuses the cached mappings), in 3 pieces with an odd split.
    let cut = [0u64, 1_000_003, 4 << 20, size as u64];
    let local: Vec<Desc> = cut
        .windows(2)
        .map(|w| Desc::new(mine.addr() + w[0], w[1] - w[0], 0))
        .collect();
    let mut reqs = Vec::new();
    for (remote, seed) in [(vmm_addr, 10u64), (legacy_addr, 11)] {
        let rem: Vec<Desc> = cut
            .windows(2)
            .map(|w| Desc::new(remote + w[0], w[1] - w[0], 0))
            .collect();
        let req = peer
            .create_xfer(
                XferOp::Read,
                &vram(local.clone()),
                &vram(rem),
                "owner",
                Default::default(),
            )
            .unwrap();
        assert_eq!(req.backend(), BackendName::Cuda);
        for round in 0..2 {
            mine.upload(0, &vec![0u8; size]).unwrap();
            req.run_blocking().unwrap();
            let mut got = vec![0u8; size];
            mine.download(0, &mut got).unwrap();
            assert!(
                got == pattern(seed, size),
                "READ of {remote:#x} round {round} differs"
            );
        }
        reqs.push(req);
    }
    assert_eq!(cuda.imported_regions(), 2);
    // Hold the mappings while the owner deregisters (and frees) its legacy region.
    println!("HOLDING");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO");
    // The revocation came before the owner's deregistration returned: the legacy region is no
    // longer mapped, and the prepared READ fails cleanly instead of touching freed memory.
    assert_eq!(cuda.imported_regions(), 1, "the legacy import was dropped");
    let e = reqs[1].run_blocking().unwrap_err();
    assert_eq!(e.class(), ErrorClass::Denied, "{e}");
    assert!(e.to_string().contains("deregistered by its owner"), "{e}");
    println!("post after deregistration: {e}");
    // Preparing it anew (the metadata still lists it) is refused by the owner.
    let rem = vec![Desc::new(legacy_addr, size as u64, 0)];
    match peer.create_xfer(
        XferOp::Read,
        &vram(vec![mine.desc()]),
        &vram(rem),
        "owner",
        Default::default(),
    ) {
        Err(e) => {
            assert_eq!(e.class(), ErrorClass::Denied, "{e}");
            println!("new transfer to the deregistered region refused: {e}");
        }
        Ok(_) => panic!("a deregistered region must be refused"),
    }
    // The VMM region is untouched.
    reqs[0].run_blocking().unwrap();
    // A wrong key is refused by the owner (VMM fds are granted only with the region key).
    let mut md = AgentMetadata::decode(&bytes).unwrap();
    md.name = "forged".into();
    md.instance_id ^= 1;
    for r in &mut md.regions {
        r.key ^= 0x5555;
    }
    peer.load_remote(&md.encode()).unwrap();
    let forged = peer.create_xfer(
        XferOp::Read,
        &vram(vec![mine.desc()]),
        &vram(vec![Desc::new(vmm_addr, size as u64, 0)]),
        "forged",
        Default::default(),
    );
    match forged {
        Err(e) => {
            assert_eq!(e.class(), ErrorClass::Denied, "{e}");
            println!("forged key refused: {e}");
        }
        Ok(_) => panic!("a forged key must be refused"),
    }
    // WRITE our pattern into the owner's VMM region, with a notification.
    mine.upload(0, &pattern(12, size)).unwrap();
    let req = peer
        .create_xfer(
            XferOp::Write,
            &vram(vec![mine.desc()]),
            &vram(vec![Desc::new(vmm_addr, size as u64, 0)]),
            "owner",
            common::opts(Some(b"written")),
        )
        .unwrap();
    req.run_blocking().unwrap();
    println!("CHILD OK");
}

const FABRIC_CHILD_ENV: &str = "NIXL_CUDA_FABRIC_CHILD";

fn fabric_gpu() -> bool {
    if !gpu() {
        return false;
    }
    if !nixl_testkit::env_is_1("NIXL_TEST_CUDA_FABRIC") {
        let why = "NIXL_TEST_CUDA_FABRIC=1 not set (needs GPUs that export fabric handles: \
                   CU_MEM_HANDLE_TYPE_FABRIC with an IMEX channel)";
        nixl_testkit::skip(why, true, &[]);
        return false;
    }
    true
}

/// Every local device in one made-up NVLink domain (real UUIDs, so the per-device check holds):
/// on a single node NVML usually reports no multi-node fabric, but fabric handles still import.
fn fabric_node(node_id: &str) -> NodeOverride {
    let uuids = nvml::cuda_device_uuids().expect("device UUIDs");
    match nvml::nvml() {
        Ok(n) => {
            for u in &uuids {
                eprintln!("NVML fabric of {:02x?}: {:?}", &u[..4], n.domain_of(u));
            }
        }
        Err(e) => eprintln!("NVML: {e}"),
    }
    NodeOverride {
        node_id: node_id.into(),
        devices: Some(
            uuids
                .iter()
                .enumerate()
                .map(|(i, u)| DeviceFabric {
                    ordinal: i as u32,
                    uuid: *u,
                    domain: Some(FabricDomain {
                        cluster_uuid: [0x42; 16],
                        clique_id: 1,
                    }),
                })
                .collect(),
        ),
    }
}

/// An agent with a tcp backend (for its control channel) and a cuda backend that publishes
/// `node_id` as its node, every device in one made-up NVLink domain.
fn fabric_agent(name: &str, node_id: &str) -> (Agent, Arc<CudaBackend>) {
    let tcp = Arc::new(TcpBackend::new(TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: Auth::with_secret(b"nixl cuda fabric test".to_vec()),
        ..TcpConfig::default()
    }));
    let cuda = CudaBackend::with_node_override(
        cfg(&format!("fabric-{name}")),
        Some(tcp.control()),
        fabric_node(node_id),
    );
    let a = Agent::builder(name)
        .backend(tcp)
        .backend(cuda.clone())
        .build()
        .unwrap();
    (a, cuda)
}

/// Two processes of this host forced onto the cross-node path (each publishes another node id):
/// the child imports the owner's VMM region through its fabric handle only (announced over the
/// tcp control channel), READs and WRITEs it byte-checked with a notification, is refused a
/// legacy region (no fabric handle), and holds its mapping while the owner deregisters the
/// region: the owner's revocation reaches it over the control channel, and its next post fails
/// cleanly.
#[test]
fn gpu_two_processes_fabric_handles() {
    if std::env::var_os(FABRIC_CHILD_ENV).is_some() || std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    if !fabric_gpu() {
        return;
    }
    let (owner, _cuda) = fabric_agent("fowner", "node-owner");
    let size = 4 << 20;
    let v = VmmBuffer::new(0, size, true).unwrap();
    assert!(
        v.has_fabric(),
        "NIXL_TEST_CUDA_FABRIC=1 but device 0 gave no fabric allocation (IMEX channel?)"
    );
    let l = LegacyBuffer::new(0, 1 << 20).unwrap();
    v.upload(0, &pattern(20, size)).unwrap();
    let rv = reg(&owner, &vram(vec![v.desc()])).unwrap();
    let _rl = reg(&owner, &vram(vec![l.desc()])).unwrap();
    let mut child = OwnerChild::start("fabric_child", FABRIC_CHILD_ENV, &owner, v.addr(), l.addr());
    let holding = child.holding();
    let mut notifs = Vec::new();
    if holding {
        // The child's WRITE landed and its notification came over the control channel.
        notifs = owner.wait_notifs(Duration::from_secs(10));
        let mut got = vec![0u8; size];
        v.download(0, &mut got).unwrap();
        assert!(got == pattern(21, size), "the child's fabric WRITE differs");
        // Deregistration revokes the child's import over the control channel.
        let t = std::time::Instant::now();
        rv.deregister().unwrap();
        let took = t.elapsed();
        eprintln!("deregistration with a peer on another node mapping took {took:?}");
        assert!(
            took < CudaConfig::default().op_timeout,
            "the peer did not acknowledge the revocation ({took:?})"
        );
        child.go();
    }
    let out = child.finish();
    assert!(holding, "the child never reported holding its mapping");
    assert!(
        out.contains("FABRIC CHILD OK"),
        "the child did not run its checks"
    );
    assert_eq!(notifs.len(), 1, "{notifs:?}");
    assert_eq!(notifs[0].from, "fpeer");
    assert_eq!(notifs[0].msg, b"fabric-written");
}

/// The child of the fabric test (does nothing unless started by it).
#[test]
#[ignore = "run by gpu_two_processes_fabric_handles as its child process"]
fn fabric_child() {
    let Some(md) = std::env::var_os(FABRIC_CHILD_ENV) else {
        return;
    };
    let addr = |var: &str| -> u64 { std::env::var(var).unwrap().parse().unwrap() };
    let (vmm_addr, legacy_addr) = (addr("NIXL_CUDA_TEST_VMM"), addr("NIXL_CUDA_TEST_LEGACY"));
    let (peer, cuda) = fabric_agent("fpeer", "node-peer");
    assert_eq!(
        peer.load_remote(&std::fs::read(md).unwrap()).unwrap(),
        "fowner"
    );
    let size = 4 << 20;
    let mine = VmmBuffer::new(0, size, false).unwrap();
    let _r = reg(&peer, &vram(vec![mine.desc()])).unwrap();
    let remote = vram(vec![Desc::new(vmm_addr, size as u64, 0)]);
    let read = peer
        .create_xfer(
            XferOp::Read,
            &vram(vec![mine.desc()]),
            &remote,
            "fowner",
            Default::default(),
        )
        .unwrap();
    assert_eq!(read.backend(), BackendName::Cuda);
    for round in 0..2 {
        mine.upload(0, &vec![0u8; size]).unwrap();
        read.run_blocking().unwrap();
        let mut got = vec![0u8; size];
        mine.download(0, &mut got).unwrap();
        assert!(
            got == pattern(20, size),
            "fabric READ round {round} differs"
        );
    }
    assert_eq!(cuda.imported_regions(), 1);
    // WRITE back a pattern of ours, with a notification (over the control channel).
    mine.upload(0, &pattern(21, size)).unwrap();
    peer.create_xfer(
        XferOp::Write,
        &vram(vec![mine.desc()]),
        &remote,
        "fowner",
        common::opts(Some(b"fabric-written")),
    )
    .unwrap()
    .run_blocking()
    .unwrap();
    // Legacy memory has no fabric handle: refused with the chunk named.
    match peer.create_xfer(
        XferOp::Read,
        &vram(vec![Desc::new(mine.addr(), 4096, 0)]),
        &vram(vec![Desc::new(legacy_addr, 4096, 0)]),
        "fowner",
        Default::default(),
    ) {
        Err(e) => {
            let t = e.to_string();
            assert!(
                t.contains("chunk 0 (bytes") && t.contains("has none") && t.contains("cudaMalloc"),
                "{t}"
            );
            println!("legacy region over fabric refused: {e}");
        }
        Ok(_) => panic!("a region without fabric handles must be refused"),
    }
    // Hold the mapping while the owner deregisters the region.
    println!("HOLDING");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO");
    assert_eq!(cuda.imported_regions(), 0, "the revoked import was dropped");
    let e = read.run_blocking().unwrap_err();
    assert_eq!(e.class(), ErrorClass::Denied, "{e}");
    assert!(e.to_string().contains("deregistered by its owner"), "{e}");
    println!("post after deregistration: {e}");
    println!("FABRIC CHILD OK");
}
