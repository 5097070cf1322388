//! Unit tests of the backend without a GPU: configuration, revocation bookkeeping, fabric
//! matching, the wire of regions.

use super::*;
use nixl_core::metadata::RegionInfo;
use nixl_core::Segment;

fn chunk(offset: u64, len: u64, alloc_size: u64, alloc_offset: u64, legacy: bool) -> Chunk {
    Chunk {
        offset,
        len,
        alloc_size,
        alloc_offset,
        handles: ChunkHandles {
            legacy: legacy.then_some([3; 64]),
            posix_fd: !legacy,
            fabric: None,
        },
    }
}

/// A peer region at 0x10_0000 of 300 bytes in three chunks: a legacy one 50 bytes into its
/// allocation, and two VMM chunks.
fn remote_region() -> RegionInfo {
    let public = RegionPublic {
        device: 1,
        uuid: [0; 16],
        chunks: vec![
            chunk(0, 100, 1000, 50, true),
            chunk(100, 100, 100, 0, false),
            chunk(200, 100, 4096, 0, false),
        ],
    };
    RegionInfo {
        kind: MemKind::Vram,
        desc: Desc::new(0x10_0000, 300, 1),
        key: 9,
        backends: vec![(BackendName::Cuda, public.encode())],
    }
}

fn xplan(op: XferOp, segs: Vec<(Desc, Desc)>, remote: RegionInfo) -> XferPlan {
    XferPlan {
        op,
        local_kind: MemKind::Vram,
        remote_kind: MemKind::Vram,
        segments: segs
            .into_iter()
            .map(|(local, remote)| Segment {
                local,
                remote,
                local_region: 0,
                remote_region: 0,
            })
            .collect(),
        local_regions: Vec::new(),
        remote_regions: vec![remote],
        notif: None,
        initiator: Arc::from("me"),
    }
}

#[test]
fn segments_are_cut_at_chunks_and_addressed_through_the_mappings() {
    // One segment over the whole region (3 chunks), one inside chunk 2, on two local devices.
    let p = xplan(
        XferOp::Read,
        vec![
            (Desc::new(0xa000, 300, 0), Desc::new(0x10_0000, 300, 1)),
            (Desc::new(0xb000, 10, 2), Desc::new(0x10_0000 + 250, 10, 1)),
        ],
        remote_region(),
    );
    let publics = decode_publics(&p, "peer").unwrap();
    let bases = [0x1_0000u64, 0x2_0000, 0x3_0000];
    let mut calls = Vec::new();
    let runs = resolve_runs(&p, &publics, |ri, ci, dev| {
        calls.push((ri, ci, dev));
        Ok(Some(bases[ci] + dev as u64 * 0x100_0000))
    })
    .unwrap();
    assert_eq!(
        runs[&0],
        vec![
            Run {
                src: 0x1_0000 + 50,
                dst: 0xa000,
                len: 100
            },
            Run {
                src: 0x2_0000,
                dst: 0xa000 + 100,
                len: 100
            },
            Run {
                src: 0x3_0000,
                dst: 0xa000 + 200,
                len: 100
            },
        ]
    );
    assert_eq!(
        runs[&2],
        vec![Run {
            src: 0x200_0000 + 0x3_0000 + 50,
            dst: 0xb000,
            len: 10
        }]
    );
    assert_eq!(calls, vec![(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 2, 2)]);

    // WRITE swaps the direction; a peer in this process is addressed directly.
    let p = xplan(
        XferOp::Write,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 90, 20, 1))],
        remote_region(),
    );
    let runs = resolve_runs(&p, &publics, |_, _, _| Ok(None)).unwrap();
    assert_eq!(
        runs[&0],
        vec![
            Run {
                src: 0xa000,
                dst: 0x10_0000 + 90,
                len: 10
            },
            Run {
                src: 0xa000 + 10,
                dst: 0x10_0000 + 100,
                len: 10
            },
        ]
    );
}

#[test]
fn bad_plans_and_bad_peer_data_are_errors() {
    let ok = |_: usize, _: usize, _: i32| -> Result<Option<u64>> { Ok(Some(0)) };
    // Past the region's end.
    let p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 290, 20, 1))],
        remote_region(),
    );
    let publics = decode_publics(&p, "peer").unwrap();
    let e = resolve_runs(&p, &publics, ok).unwrap_err();
    assert!(e.to_string().contains("outside its region"), "{e}");
    // Before the region's start.
    let p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 - 1, 20, 1))],
        remote_region(),
    );
    assert!(resolve_runs(&p, &publics, ok).is_err());
    // An import failure ends the resolution with that error.
    let p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000, 20, 1))],
        remote_region(),
    );
    let e = resolve_runs(&p, &publics, |_, _, _| {
        Err(Error::Denied {
            peer: "peer".into(),
            reason: "wrong key".into(),
        })
    })
    .unwrap_err();
    assert!(matches!(e, Error::Denied { .. }), "{e}");
    // Peer data that does not match the region, or is missing, or is garbage.
    let mut r = remote_region();
    r.desc.len = 301;
    let e = decode_publics(&xplan(XferOp::Read, vec![], r), "peer").unwrap_err();
    assert!(e.to_string().contains("bad cuda data"), "{e}");
    let mut r = remote_region();
    r.backends.clear();
    let e = decode_publics(&xplan(XferOp::Read, vec![], r), "peer").unwrap_err();
    assert!(e.to_string().contains("not registered with cuda"), "{e}");
    let mut r = remote_region();
    r.backends[0].1.truncate(20);
    assert!(decode_publics(&xplan(XferOp::Read, vec![], r), "peer").is_err());
}

#[test]
fn unavailable_without_a_driver_and_reachability() {
    let b = CudaBackend::new(CudaConfig::default());
    assert_eq!(b.name(), BackendName::Cuda);
    assert_eq!(b.caps().local_kinds, VRAM);
    assert_eq!(b.caps().locality, Locality::SameNode);
    match b.probe() {
        Ok(()) => eprintln!("SKIP: unavailable_without_a_driver_and_reachability (driver part): a CUDA driver is present"),
        Err(reason) => {
            let reason = reason.to_string();
            assert!(reason.starts_with("libcuda.so.1 not found: "), "{reason}");
            let e = b
                .register(MemKind::Vram, &Desc::new(0x1000, 10, 0))
                .unwrap_err();
            assert!(matches!(e, Error::Unavailable { .. }), "{e}");
            assert!(e.to_string().contains("libcuda.so.1 not found"), "{e}");
            assert!(b.stager().is_none());
        }
    }
    // DRAM is refused whatever the host.
    let e = b
        .register(MemKind::Dram, &Desc::new(0x1000, 10, 0))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");

    // Reachability from connection info alone.
    let ours = b.inner.our_conn_info("/tmp/x.sock");
    assert!(b.can_reach(&ours.encode()).is_ok());
    let mut other = ours.clone();
    other.boot_id = "another-node".into();
    let e = b.can_reach(&other.encode()).unwrap_err().to_string();
    assert!(e.starts_with("different node"), "{e}");
    if b.probe().is_err() {
        // No driver: no domain here, and the reason says why.
        assert!(e.contains("no NVLink domain here: cuda unavailable"), "{e}");
    }
    assert!(b
        .can_reach(b"garbage")
        .unwrap_err()
        .to_string()
        .contains("bad cuda connection info"));
    let info = b.conn_info();
    let d = ConnInfo::decode(&info).unwrap();
    assert_eq!(d.pid, std::process::id());
}
/// A region like [`remote_region`] whose chunks all carry fabric handles.
fn fabric_region() -> RegionInfo {
    let mut public = RegionPublic::decode(&remote_region().backends[0].1, 300).unwrap();
    for c in &mut public.chunks {
        c.handles = ChunkHandles {
            legacy: None,
            posix_fd: false,
            fabric: Some([5; 64]),
        };
    }
    let mut r = remote_region();
    r.backends = vec![(BackendName::Cuda, public.encode())];
    r
}

#[test]
fn fabric_path_refuses_chunks_without_fabric_handles() {
    let check = |p: &XferPlan| {
        let publics = decode_publics(p, "peer").unwrap();
        resolve_runs(p, &publics, |ri, ci, _| {
            fabric_handle(&p.remote_regions[ri], &publics[ri], ci, "peer").map(|_| None)
        })
    };
    // The legacy chunk 0.
    let p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 10, 20, 1))],
        remote_region(),
    );
    let e = check(&p).unwrap_err();
    let t = e.to_string();
    assert!(matches!(e, Error::Backend { op: "prepare", .. }), "{e}");
    assert!(
        t.contains("chunk 0 (bytes 0..100 of its region 0x100000+300"),
        "{t}"
    );
    assert!(t.contains("cudaMalloc memory"), "{t}");
    assert!(t.contains("VmmBuffer with fabric"), "{t}");
    // A VMM chunk exported as an fd only (chunk 2, touched by the segment's end).
    let p = xplan(
        XferOp::Write,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 190, 20, 1))],
        fabric_region(),
    );
    assert!(check(&p).is_ok());
    let mut r = fabric_region();
    let mut public = RegionPublic::decode(&r.backends[0].1, 300).unwrap();
    public.chunks[2].handles = ChunkHandles {
        legacy: None,
        posix_fd: true,
        fabric: None,
    };
    r.backends[0].1 = public.encode();
    let p = xplan(
        XferOp::Write,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 190, 20, 1))],
        r,
    );
    let t = check(&p).unwrap_err().to_string();
    assert!(t.contains("chunk 2 (bytes 200..300"), "{t}");
    assert!(t.contains("without CU_MEM_HANDLE_TYPE_FABRIC"), "{t}");
}

fn domain(c: u8) -> Option<FabricDomain> {
    Some(FabricDomain {
        cluster_uuid: [c; 16],
        clique_id: 1,
    })
}

/// A backend pretending to be on node "node-a" with one device in domain 7, and the
/// connection info of a peer on "node-b" whose device is in `peer_domain` and whose socket
/// is a live listener (to prove nothing connects to it).
fn fabric_pair(
    tag: &str,
    allow_fabric: bool,
    peer_domain: Option<FabricDomain>,
) -> (Arc<CudaBackend>, ConnInfo, std::os::unix::net::UnixListener) {
    fabric_pair_with(tag, allow_fabric, peer_domain, None)
}

fn fabric_pair_with(
    tag: &str,
    allow_fabric: bool,
    peer_domain: Option<FabricDomain>,
    control: Option<Arc<dyn ControlChannel>>,
) -> (Arc<CudaBackend>, ConnInfo, std::os::unix::net::UnixListener) {
    let dir = std::env::temp_dir().join(format!("nixl-cuda-fabric-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("peer.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let b = CudaBackend::with_node_override(
        CudaConfig {
            allow_fabric,
            socket_dir: dir,
            op_timeout: Duration::from_millis(500),
            ..CudaConfig::default()
        },
        control,
        NodeOverride {
            node_id: "node-a".into(),
            devices: Some(vec![DeviceFabric {
                ordinal: 0,
                uuid: [1; 16],
                domain: domain(7),
            }]),
        },
    );
    let peer = ConnInfo {
        boot_id: "node-b".into(),
        socket: path.to_string_lossy().into_owned(),
        uid: ipc::uid(),
        pid: std::process::id() + 1,
        fabric: true,
        devices: vec![DeviceFabric {
            ordinal: 0,
            uuid: [2; 16],
            domain: peer_domain,
        }],
        fabric_note: String::new(),
        control: Vec::new(),
    };
    (b, peer, listener)
}

#[test]
fn fabric_reach_connect_and_prepare_refusals() {
    // Reachability.
    let (b, peer, listener) = fabric_pair("reach", true, domain(7));
    assert_eq!(b.can_reach(&peer.encode()), Ok(()));
    let published = ConnInfo::decode(&b.conn_info()).unwrap();
    assert_eq!(published.boot_id, "node-a");
    assert_eq!(published.devices[0].domain, domain(7));
    assert!(published.fabric);
    let mut other = peer.clone();
    other.devices[0].domain = domain(8);
    let e = b.can_reach(&other.encode()).unwrap_err().to_string();
    assert!(e.contains("no common NVLink domain"), "{e}");
    let mut same = peer.clone();
    same.boot_id = "node-a".into();
    assert_eq!(b.can_reach(&same.encode()), Ok(()));
    let (nb, npeer, _l) = fabric_pair("nofabric", false, domain(7));
    let e = nb.can_reach(&npeer.encode()).unwrap_err().to_string();
    assert!(e.contains("fabric is not allowed here"), "{e}");
    assert!(!ConnInfo::decode(&nb.conn_info()).unwrap().fabric);

    // A connection over fabric: notifications refused, chunks without fabric handles
    // refused with the chunk named, and the peer's socket never touched.
    let conn = b
        .connect(&PeerInfo {
            name: "far",
            instance_id: 77,
            conn_info: &peer.encode(),
        })
        .unwrap();
    let mut p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000, 20, 1))],
        fabric_region(),
    );
    p.notif = Some(b"done".to_vec());
    let refused = |r: Result<Box<dyn PreparedXfer>>, what: &str| match r {
        Ok(_) => panic!("{what} must be refused"),
        Err(e) => e.to_string(),
    };
    let t = refused(conn.prepare(p), "a notification over fabric");
    assert!(t.contains("peer 'far' is on another node"), "{t}");
    assert!(t.contains("Unix socket"), "{t}");
    let e = conn.send_notif("me", b"x").unwrap_err();
    assert!(e.to_string().contains("another node"), "{e}");
    let p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 150, 20, 1))],
        remote_region(),
    );
    let t = refused(conn.prepare(p), "a chunk without a fabric handle");
    assert!(t.contains("chunk 1 (bytes 100..200"), "{t}");
    // Fabric chunks pass the check and go on to the device (absent here, or present but
    // with other UUIDs than the override's: either way a clear error, never a socket).
    let p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000, 20, 1))],
        fabric_region(),
    );
    match conn.prepare(p) {
        Ok(_) => panic!("cannot map fabric handles of a made-up peer"),
        Err(e) => {
            let t = e.to_string();
            assert!(
                matches!(e, Error::Unavailable { .. }) || t.contains("NVLink domain"),
                "{t}"
            );
        }
    }
    assert_eq!(b.imported_chunks(), 0);
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the fabric path touched the peer's socket: {other:?}"),
    }
    conn.close();
}
#[test]
fn control_carrier_announces_notifies_and_takes_revocations() {
    use crate::control::Loopback;
    let pid = std::process::id();
    let owner_ch = Loopback::new(&format!("cuda-owner-{pid}"));
    let peer_ch = Loopback::new(&format!("cuda-peer-{pid}"));
    let owner_ctl: Arc<dyn ControlChannel> = owner_ch.clone();
    // The owner side: its service answers over the channel (without a driver its agent
    // never started it, so it refuses announcements and notifications as "starting").
    let (owner, _, _l1) = fabric_pair_with("ctl-owner", true, domain(7), Some(owner_ctl));
    owner
        .inner
        .control
        .as_ref()
        .unwrap()
        .serve(BackendName::Cuda, {
            let w: Weak<Inner> = Arc::downgrade(&owner.inner);
            w
        });
    let mut owner_info = ConnInfo::decode(&owner.conn_info()).unwrap();
    assert_eq!(owner_info.control, format!("cuda-owner-{pid}").into_bytes());
    owner_info.boot_id = "node-b".into(); // the owner is on another node than the peer
    let (peer, _, _l2) = fabric_pair_with("ctl-peer", true, domain(7), Some(peer_ch.clone()));
    peer.inner
        .control
        .as_ref()
        .unwrap()
        .serve(BackendName::Cuda, {
            let w: Weak<Inner> = Arc::downgrade(&peer.inner);
            w
        });
    let conn = peer
        .connect(&PeerInfo {
            name: "owner",
            instance_id: 77,
            conn_info: &owner_info.encode(),
        })
        .unwrap();

    // A notification goes over the channel to the owner's service (which answers that it
    // is starting): carried, not refused for want of a carrier.
    let e = conn.send_notif("peer", b"hi").unwrap_err();
    assert!(
        matches!(&e, Error::Denied { peer, .. } if peer == "owner"),
        "{e}"
    );
    assert!(e.to_string().contains("the agent is starting"), "{e}");
    // A prepare with a notification is accepted as far as the carrier goes; the import is
    // announced first (here our own agent never started, so it cannot say who we are) and
    // the failed announcement fails the prepare.
    let mut p = xplan(
        XferOp::Read,
        vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000, 20, 1))],
        fabric_region(),
    );
    p.notif = Some(b"done".to_vec());
    match conn.prepare(p) {
        Ok(_) => panic!("the announcement cannot be made"),
        Err(e) => {
            let t = e.to_string();
            assert!(t.contains("announce failed: the agent is starting"), "{t}");
            assert!(!t.contains("Unix socket"), "{t}");
        }
    }
    assert_eq!(peer.imported_regions(), 0, "a refused import is dropped");
    assert!(owner.inner.remote_importers.lock().is_empty());

    // The owner revokes an import: the peer drops it and confirms; an agent that is not
    // the owner of that instance is refused; an unknown instance is "nothing imported".
    let region = Desc::new(0x10_0000, 300, 1);
    let key = RegionKey {
        peer: 77,
        region,
        key: 9,
    };
    peer.inner
        .imports
        .region(key, "owner", Duration::from_millis(100), || Ok(()))
        .unwrap();
    assert_eq!(peer.imported_regions(), 1);
    let revoke = |from: &str, instance: u128| {
        owner_ch.call(
            &peer_ch.endpoint(),
            from,
            BackendName::Cuda,
            &Ctl::Revoke {
                instance,
                region,
                key: 9,
            }
            .encode(),
            Duration::from_secs(1),
        )
    };
    let e = revoke("mallory", 77).unwrap_err();
    assert!(e.to_string().contains("cannot revoke"), "{e}");
    assert_eq!(peer.imported_regions(), 1);
    assert_eq!(revoke("owner", 78).unwrap(), vec![1]);
    assert_eq!(peer.imported_regions(), 1);
    assert_eq!(revoke("owner", 77).unwrap(), vec![1]);
    assert_eq!(peer.imported_regions(), 0, "the revoked import is gone");
    // Garbage is refused with the reason, never a panic.
    let e = owner_ch
        .call(
            &peer_ch.endpoint(),
            "owner",
            BackendName::Cuda,
            &[3, 1],
            Duration::from_secs(1),
        )
        .unwrap_err();
    assert!(e.to_string().contains("bad cuda control message"), "{e}");
    conn.close();
}

/// A peer service for [`revoke_remote`]: answers `reply` after `delay`.
#[derive(Debug)]
struct FakePeer {
    reply: Vec<u8>,
    delay: Duration,
    seen: Mutex<Vec<(String, Ctl)>>,
}

impl ControlService for FakePeer {
    fn handle(&self, peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        self.seen.lock().push((
            peer.to_owned(),
            Ctl::decode(req).map_err(|e| e.to_string())?,
        ));
        std::thread::sleep(self.delay);
        Ok(self.reply.clone())
    }
}

#[test]
fn revocations_across_nodes_are_bounded() {
    use crate::control::Loopback;
    let pid = std::process::id();
    let owner: Arc<dyn ControlChannel> = Loopback::new(&format!("rv-owner-{pid}"));
    let timeout = Duration::from_millis(300);
    let mut keep = Vec::new();
    let mut importers = Vec::new();
    for (name, reply, delay) in [
        ("acks", vec![1u8], Duration::ZERO),
        ("busy", vec![0u8], Duration::ZERO),
        ("silent", vec![1u8], timeout * 4),
    ] {
        let ch = Loopback::new(&format!("rv-{name}-{pid}"));
        let svc = Arc::new(FakePeer {
            reply,
            delay,
            seen: Mutex::new(Vec::new()),
        });
        let w: Weak<FakePeer> = Arc::downgrade(&svc);
        ch.serve(BackendName::Cuda, w);
        importers.push(Importer {
            name: name.into(),
            instance: 1,
            endpoint: ch.endpoint(),
        });
        keep.push((ch, svc));
    }
    importers.push(Importer {
        name: "dead".into(),
        instance: 2,
        endpoint: b"rv-nobody".to_vec(),
    });
    let region = Desc::new(0x1000, 64, 0);
    let t = Instant::now();
    let r = revoke_remote(&owner, "owner", 5, &region, 9, importers, timeout);
    let took = t.elapsed();
    assert_eq!(
        r,
        ipc::RevokeReport {
            peers: 4,
            acked: 1,
            gone: 1,
            late: 2
        }
    );
    assert!(took < timeout * 3, "took {took:?}");
    let (from, m) = keep[0].1.seen.lock()[0].clone();
    assert_eq!(from, "owner");
    assert_eq!(
        m,
        Ctl::Revoke {
            instance: 5,
            region,
            key: 9
        }
    );
    // Nobody to tell: nothing to wait for.
    let r = revoke_remote(&owner, "owner", 5, &region, 9, Vec::new(), timeout);
    assert_eq!(r, ipc::RevokeReport::default());
}
