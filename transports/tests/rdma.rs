//! The `rdma` backend: the verbs binding's layout against verbs.h, the probe's reasons, an
//! agent that runs without RDMA, and (with `NIXL_TEST_RDMA_DEVICE=<name>`) real transfers
//! between two agents in one process over one device.

mod common;
use common::{pattern, unavailable};

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nixl_core::*;
use nixl_transports::fuzzing::Loopback;
use nixl_transports::local::LocalBackend;
use nixl_transports::rdma::{RdmaBackend, RdmaConfig};

/// Compiles `tests/c/verbs_layout.c` against `<infiniband/verbs.h>` and compares every size,
/// offset and constant it prints with the Rust binding's.
#[test]
fn verbs_layout() {
    use nixl_transports::fuzzing::rdma_verbs as verbs;
    let header = PathBuf::from("/usr/include/infiniband/verbs.h");
    let gcc = Command::new("gcc").arg("--version").output();
    if gcc.is_err() || !header.exists() {
        let why = if gcc.is_err() {
            "gcc not found"
        } else {
            "<infiniband/verbs.h> not found (apt-get install libibverbs-dev)"
        };
        nixl_testkit::skip(why, false, &["NIXL_REQUIRE_VERBS_HEADERS"]);
        return;
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/verbs_layout.c");
    let exe = std::env::temp_dir().join(format!("nixl-verbs-layout-{}", std::process::id()));
    let out = Command::new("gcc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("running gcc");
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("running the layout program");
    let _ = std::fs::remove_file(&exe);
    assert!(run.status.success());
    let text = String::from_utf8(run.stdout).unwrap();
    let c: HashMap<String, i64> = text
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (name, rust) in verbs::layout() {
        match c.get(name) {
            Some(&v) if v == rust as i64 => checked += 1,
            // A verbs.h older than our declaration: its struct is our prefix.
            Some(&v) if verbs::GROWN_STRUCTS.contains(&name) && v < rust as i64 => checked += 1,
            Some(&v) => wrong.push(format!("{name}: C {v}, Rust {rust}")),
            None => wrong.push(format!("{name}: not printed by the C program")),
        }
    }
    for (name, rust) in verbs::constants() {
        match c.get(name) {
            Some(&v) if v == rust => checked += 1,
            Some(&v) => wrong.push(format!("{name}: C {v}, Rust {rust}")),
            None => wrong.push(format!("{name}: not printed by the C program")),
        }
    }
    assert!(wrong.is_empty(), "layout mismatches:\n{}", wrong.join("\n"));
    // Everything the C program prints is checked on the Rust side too.
    assert_eq!(
        checked,
        c.len(),
        "the C program prints entries the Rust side lacks"
    );
    assert!(checked > 100, "{checked}");
}

#[test]
fn probe_names_a_missing_library() {
    let b = RdmaBackend::with_library(
        RdmaConfig::default(),
        Loopback::new("rdma-probe-missing"),
        "libibverbs-nixl-missing.so.1",
    );
    let e = b.probe().unwrap_err().to_string();
    assert!(
        e.starts_with("libibverbs-nixl-missing.so.1 not found: "),
        "{e}"
    );
    assert!(e.contains("libibverbs-nixl-missing.so.1"), "{e}");
}

/// With the real library: no devices here gives the documented reason; on a host with
/// devices, a configured device that is absent is named.
#[test]
fn probe_with_the_real_library() {
    let b = RdmaBackend::new(RdmaConfig::default(), Loopback::new("rdma-probe-real"));
    match b.probe().map_err(|e| e.to_string()) {
        Err(e) if e.starts_with("libibverbs.so.1 not found") => {
            nixl_testkit::skip(&e, true, &[]);
        }
        Err(e) => assert!(
            e.starts_with("no RDMA devices (") && e.contains("/sys/class/infiniband"),
            "{e}"
        ),
        Ok(()) => {
            let cfg = RdmaConfig {
                devices: Some(vec!["nixl_absent_0".into()]),
                ..Default::default()
            };
            let b = RdmaBackend::new(cfg, Loopback::new("rdma-probe-absent"));
            let e = b.probe().unwrap_err().to_string();
            assert!(
                e.starts_with("configured RDMA device 'nixl_absent_0' is not present"),
                "{e}"
            );
        }
    }
}

/// An agent whose rdma backend cannot run reports why and works with the others.
#[test]
fn agent_runs_without_rdma() {
    let rdma = RdmaBackend::with_library(
        RdmaConfig::default(),
        Loopback::new("rdma-agent-none"),
        "libibverbs-nixl-missing.so.1",
    );
    let a = Agent::builder("rdma-none")
        .backend(rdma.clone())
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap();
    let why = unavailable(&a, BackendName::Rdma).expect("rdma unavailable");
    assert!(
        why.contains("libibverbs-nixl-missing.so.1 not found"),
        "{why}"
    );
    let e = rdma
        .register(MemKind::Dram, &Desc::new(4096, 4096, 0))
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
    assert!(rdma.conn_info().is_empty());
    a.check_backend(BackendName::Local).unwrap();
}

fn dram(d: Vec<Desc>) -> DescList {
    DescList::from_descs(MemKind::Dram, d).unwrap()
}

/// The RDMA device of the hardware tests (`NIXL_TEST_RDMA_DEVICE`); `None`, the skip printed,
/// where it is not set.
fn rdma_device() -> Option<String> {
    let dev = std::env::var("NIXL_TEST_RDMA_DEVICE").ok();
    if dev.is_none() {
        nixl_testkit::skip(
            "NIXL_TEST_RDMA_DEVICE is not set (name an RDMA device, e.g. mlx5_0)",
            true,
            &[],
        );
    }
    dev
}

/// Two agents named `a` and `b`, each with an rdma backend of `cfg` on its own loopback control
/// channel; fails the test where the backend cannot run on the device `cfg` names.
fn rdma_agents(cfg: &RdmaConfig, a: &str, b: &str) -> (Agent, Agent) {
    let mk = |name: &str| {
        let ch = Loopback::new(&format!("rdma-hw-{name}-{}", std::process::id()));
        let b = RdmaBackend::new(cfg.clone(), ch);
        if let Err(e) = b.probe() {
            let dev = cfg.devices.as_deref().unwrap_or_default().join(",");
            panic!("NIXL_TEST_RDMA_DEVICE={dev} but the rdma backend cannot run: {e}");
        }
        Agent::builder(name).backend(b).build().unwrap()
    };
    (mk(a), mk(b))
}

/// Two agents in one process, each with an rdma backend on `NIXL_TEST_RDMA_DEVICE`, connected
/// through loopback control channels: WRITE and READ with notifications, bytes checked, a
/// transfer striped over many WRs and lanes, and a standalone notification.
#[test]
fn hardware_write_and_read_with_notifications() {
    let Some(dev) = rdma_device() else {
        return;
    };
    let cfg = RdmaConfig {
        devices: Some(vec![dev]),
        slice_bytes: 256 << 10,
        qps_per_nic: 3,
        max_outstanding: 8,
        ..Default::default()
    };
    let (a, b) = rdma_agents(&cfg, "rdma-a", "rdma-b");
    let size = 16 << 20;
    let src = pattern(1, size);
    let a_buf = src.clone();
    let mut b_buf = vec![0u8; size + 8];
    let mut a_back = vec![0u8; size];
    // SAFETY: the buffers are declared before their registrations (dropped after them) and
    // read only after the transfers that write them have completed.
    let _ra = unsafe {
        a.register(&dram(vec![
            Desc::from_slice(&a_buf),
            Desc::from_mut_slice(&mut a_back),
        ]))
    }
    .unwrap();
    // SAFETY: as above.
    let _rb = unsafe { b.register(&dram(vec![Desc::from_mut_slice(&mut b_buf)])) }.unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();

    // WRITE 16 MiB to an odd offset: 64 slices over 3 lanes.
    let req = a
        .create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(&a_buf)]),
            &dram(vec![Desc::from_mut_slice(&mut b_buf[3..3 + size])]),
            "rdma-b",
            common::opts(Some(b"written")),
        )
        .unwrap();
    assert_eq!(req.backend(), BackendName::Rdma);
    for round in 0..3 {
        req.run_blocking().unwrap();
        let n = b.wait_notifs(Duration::from_secs(5));
        assert_eq!(
            n,
            vec![Notification {
                from: "rdma-a".into(),
                msg: b"written".to_vec()
            }],
            "round {round}"
        );
    }
    assert!(b_buf[3..3 + size] == src[..], "WRITE differs");

    // READ it back in 1000 scattered pieces, reversed, with a notification.
    let n = 1000;
    let piece = size / n;
    let remote: Vec<Desc> = (0..n)
        .rev()
        .map(|i| Desc::from_slice(&b_buf[3 + i * piece..3 + (i + 1) * piece]))
        .collect();
    let local: Vec<Desc> = (0..n)
        .rev()
        .map(|i| Desc::from_mut_slice(&mut a_back[i * piece..(i + 1) * piece]))
        .collect();
    let req = a
        .create_xfer(
            XferOp::Read,
            &dram(local),
            &dram(remote),
            "rdma-b",
            common::opts(Some(b"read")),
        )
        .unwrap();
    req.run_blocking().unwrap();
    assert!(a_back[..n * piece] == src[..n * piece], "READ differs");
    let got = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, b"read");

    // A standalone notification.
    a.send_notif("rdma-b", b"hello").unwrap();
    let got = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, b"hello");
    a.shutdown();
    b.shutdown();
}

fn vram(d: Vec<Desc>) -> DescList {
    DescList::from_descs(MemKind::Vram, d).unwrap()
}

/// VRAM through dmabuf (`NIXL_TEST_RDMA_DEVICE=<name>` and `NIXL_TEST_CUDA=1`, GPU 0): DRAM of
/// one agent to VRAM of another at an address that is not page-aligned (the dmabuf covers the
/// aligned superset, the MR exactly the region), back, and VRAM as the local side; the bytes
/// around the region stay untouched.
#[test]
fn hardware_vram_through_dmabuf() {
    let Some(dev) = rdma_device() else {
        return;
    };
    if std::env::var("NIXL_TEST_CUDA").as_deref() != Ok("1") {
        nixl_testkit::skip(
            "NIXL_TEST_CUDA=1 is not set (needs an NVIDIA GPU with dmabuf support)",
            true,
            &[],
        );
        return;
    }
    use nixl_transports::cuda::LegacyBuffer;
    let cfg = RdmaConfig {
        devices: Some(vec![dev]),
        slice_bytes: 256 << 10,
        qps_per_nic: 2,
        ..Default::default()
    };
    let (a, b) = rdma_agents(&cfg, "rdma-vram-a", "rdma-vram-b");
    let size = (4 << 20) + 777;
    let off = 4096 + 123;
    let gpu = LegacyBuffer::new(0, size + 3 * 4096).unwrap();
    gpu.upload(0, &vec![0u8; gpu.len()]).unwrap();
    let vdesc = Desc::new(gpu.addr() + off as u64, size as u64, 0);
    // SAFETY: `gpu` outlives the registration (declared before it, dropped after it).
    let _rv = unsafe { b.register(&vram(vec![vdesc])) }
        .unwrap_or_else(|e| panic!("VRAM registration with rdma failed: {e}"));
    let src = pattern(7, size);
    let mut back = vec![0u8; size];
    let mut from_gpu = vec![0u8; size];
    // SAFETY: the buffers outlive their registration and are read after the transfers end.
    let _ra = unsafe {
        a.register(&dram(vec![
            Desc::from_slice(&src),
            Desc::from_mut_slice(&mut back),
            Desc::from_mut_slice(&mut from_gpu),
        ]))
    }
    .unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    b.load_remote(&a.metadata_bytes()).unwrap();

    // DRAM -> remote VRAM, with a notification.
    let w = a
        .create_xfer(
            XferOp::Write,
            &dram(vec![Desc::from_slice(&src)]),
            &vram(vec![vdesc]),
            "rdma-vram-b",
            common::opts(Some(b"vram written")),
        )
        .unwrap();
    assert_eq!(w.backend(), BackendName::Rdma);
    w.run_blocking().unwrap();
    let n = b.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].msg, b"vram written");
    let mut all = vec![0u8; gpu.len()];
    gpu.download(0, &mut all).unwrap();
    assert!(all[off..off + size] == src[..], "WRITE into VRAM differs");
    assert!(
        all[..off].iter().all(|&x| x == 0) && all[off + size..].iter().all(|&x| x == 0),
        "bytes outside the region changed"
    );

    // Remote VRAM -> DRAM.
    let r = a
        .create_xfer(
            XferOp::Read,
            &dram(vec![Desc::from_mut_slice(&mut back)]),
            &vram(vec![vdesc]),
            "rdma-vram-b",
            XferOptions::default(),
        )
        .unwrap();
    r.run_blocking().unwrap();
    assert!(back == src, "READ from VRAM differs");

    // Local VRAM -> remote DRAM (the VRAM MR's lkey on the initiator).
    let w2 = b
        .create_xfer(
            XferOp::Write,
            &vram(vec![vdesc]),
            &dram(vec![Desc::from_mut_slice(&mut from_gpu)]),
            "rdma-vram-a",
            XferOptions::default(),
        )
        .unwrap();
    w2.run_blocking().unwrap();
    assert!(from_gpu == src, "WRITE from VRAM differs");
    a.shutdown();
    b.shutdown();
}
