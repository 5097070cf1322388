use super::*;

fn region() -> RegionPublic {
    RegionPublic {
        device: 3,
        uuid: [7; 16],
        chunks: vec![
            Chunk {
                offset: 0,
                len: 100,
                alloc_size: 4096,
                alloc_offset: 96,
                handles: ChunkHandles {
                    legacy: Some([1; 64]),
                    posix_fd: false,
                    fabric: None,
                },
            },
            Chunk {
                offset: 100,
                len: 2 << 20,
                alloc_size: 2 << 20,
                alloc_offset: 0,
                handles: ChunkHandles {
                    legacy: None,
                    posix_fd: true,
                    fabric: Some([9; 64]),
                },
            },
            Chunk {
                offset: 100 + (2 << 20),
                len: 5,
                alloc_size: 2 << 20,
                alloc_offset: 0,
                handles: ChunkHandles {
                    legacy: None,
                    posix_fd: true,
                    fabric: None,
                },
            },
        ],
    }
}

#[test]
fn region_round_trip_and_lookup() {
    let r = region();
    let len = 105 + (2 << 20);
    let b = r.encode();
    assert_eq!(RegionPublic::decode(&b, len).unwrap(), r);
    assert_eq!(r.chunk_at(0), Some(0));
    assert_eq!(r.chunk_at(99), Some(0));
    assert_eq!(r.chunk_at(100), Some(1));
    assert_eq!(r.chunk_at(len - 1), Some(2));
    assert_eq!(r.chunk_at(len), None);
    // Wrong region length: refused.
    let e = RegionPublic::decode(&b, len + 1).unwrap_err();
    assert!(e.to_string().contains("cover"), "{e}");
}

#[test]
fn region_garbage_is_refused_never_panics() {
    let r = region();
    let len = 105 + (2 << 20);
    let b = r.encode();
    // Every truncation fails.
    for n in 0..b.len() {
        assert!(RegionPublic::decode(&b[..n], len).is_err(), "prefix {n}");
    }
    // Trailing byte.
    let mut t = b.clone();
    t.push(0);
    assert!(RegionPublic::decode(&t, len).is_err());
    // Bad version, flags, huge count.
    let mut t = b.clone();
    t[0] = 9;
    assert!(RegionPublic::decode(&t, len)
        .unwrap_err()
        .to_string()
        .contains("version"));
    let flags_at = 1 + 4 + 16 + 4 + 32;
    for bad in [0u8, 1 | 2, 0x10] {
        let mut t = b.clone();
        t[flags_at] = bad;
        assert!(RegionPublic::decode(&t, len).is_err(), "flags {bad:#x}");
    }
    let mut t = b.clone();
    t[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(RegionPublic::decode(&t, len).is_err());
    // Chunk outside its allocation, gap, overlap.
    let mut bad = r.clone();
    bad.chunks[0].alloc_offset = 4000;
    assert!(RegionPublic::decode(&bad.encode(), len).is_err());
    let mut bad = r.clone();
    bad.chunks[1].offset = 101;
    assert!(RegionPublic::decode(&bad.encode(), len).is_err());
    let mut bad = r.clone();
    bad.chunks[0].alloc_offset = u64::MAX;
    assert!(RegionPublic::decode(&bad.encode(), len).is_err());
    // Pseudo-random bytes.
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..20_000 {
        let n = (x % 300) as usize;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        if !v.is_empty() {
            v[0] = REGION_VERSION;
        }
        let _ = RegionPublic::decode(&v, x % 1000);
        // Bit flips of a valid encoding.
        let mut f = b.clone();
        let i = (x as usize) % f.len();
        f[i] ^= 1 << (x % 8);
        let _ = RegionPublic::decode(&f, len);
    }
}

fn dom(c: u8, clique: u32) -> Option<FabricDomain> {
    Some(FabricDomain {
        cluster_uuid: [c; 16],
        clique_id: clique,
    })
}

fn dev(ordinal: u32, u: u8, domain: Option<FabricDomain>) -> DeviceFabric {
    DeviceFabric {
        ordinal,
        uuid: [u; 16],
        domain,
    }
}

fn conn(boot: &str, devices: Vec<DeviceFabric>, note: &str) -> ConnInfo {
    ConnInfo {
        boot_id: boot.into(),
        socket: "/run/nixl/x.sock".into(),
        uid: 1000,
        pid: 42,
        fabric: true,
        devices,
        fabric_note: note.into(),
        control: b"ctl-endpoint".to_vec(),
    }
}

/// Version 1 as the previous build wrote it.
fn encode_v1(c: &ConnInfo) -> Vec<u8> {
    let mut v = vec![1u8];
    for s in [&c.boot_id, &c.socket] {
        v.extend_from_slice(&(s.len() as u16).to_le_bytes());
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(&c.uid.to_le_bytes());
    v.extend_from_slice(&c.pid.to_le_bytes());
    v.push(u8::from(c.fabric));
    v
}

#[test]
fn conn_info_v2_round_trip_and_garbage() {
    let c = conn(
        "b-1",
        vec![dev(0, 1, dom(7, 3)), dev(1, 2, None), dev(5, 3, dom(8, 0))],
        "device 1: fabric registration in progress",
    );
    let b = c.encode();
    assert_eq!(b[0], 2);
    assert_eq!(ConnInfo::decode(&b).unwrap(), c);
    // Every truncation fails; so do a trailing byte, bad flags, a bad version.
    for n in 0..b.len() {
        assert!(ConnInfo::decode(&b[..n]).is_err(), "prefix {n}");
    }
    let mut t = b.clone();
    t.push(1);
    assert!(ConnInfo::decode(&t).unwrap_err().contains("trailing"));
    let fabric_at = 1 + 2 + 3 + 2 + c.socket.len() + 8;
    assert_eq!(b[fabric_at], 1);
    let mut t = b.clone();
    t[fabric_at] = 2;
    assert!(ConnInfo::decode(&t).unwrap_err().contains("fabric flag 2"));
    let count_at = fabric_at + 1 + 2 + c.fabric_note.len();
    assert_eq!(b[count_at], 3);
    let mut t = b.clone();
    t[count_at + 2 + 20] = 9; // the first device's domain flag
    assert!(ConnInfo::decode(&t).unwrap_err().contains("domain flag 9"));
    let mut t = b.clone();
    t[count_at..count_at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(ConnInfo::decode(&t).unwrap_err().contains("devices"));
    let mut t = b.clone();
    t[0] = 3;
    assert!(ConnInfo::decode(&t).unwrap_err().contains("version 3"));
    let ep_at = b.len() - 2 - c.control.len();
    let mut t = b.clone();
    t[ep_at..ep_at + 2].copy_from_slice(&(MAX_ENDPOINT as u16 + 1).to_le_bytes());
    assert!(ConnInfo::decode(&t)
        .unwrap_err()
        .contains("control endpoint"));
    // A note too long is cut on a character boundary; too many devices are cut too.
    let mut long = c.clone();
    long.fabric_note = "é".repeat(MAX_NOTE);
    long.devices = (0..MAX_DEVICES as u32 + 5)
        .map(|i| dev(i, 1, None))
        .collect();
    let d = ConnInfo::decode(&long.encode()).unwrap();
    assert_eq!(d.fabric_note.len(), MAX_NOTE);
    assert_eq!(d.devices.len(), MAX_DEVICES);
    // Pseudo-random bytes and bit flips never panic.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut f = b.clone();
        let i = (x as usize) % f.len();
        f[i] ^= 1 << (x % 8);
        let _ = ConnInfo::decode(&f);
        let n = (x % 97) as usize;
        let junk: Vec<u8> = (0..n).map(|k| (x >> (k % 57)) as u8).collect();
        let _ = ConnInfo::decode(&junk);
    }
}

#[test]
fn control_messages_round_trip_and_garbage() {
    let region = nixl_core::Desc::new(0x7f00_0000_0000, 2 << 20, 3);
    let msgs = [
        Ctl::Opened {
            instance: u128::MAX - 5,
            endpoint: b"10.0.0.7:4500".to_vec(),
            region,
            key: 0xdead_beef,
        },
        Ctl::Notif {
            msg: b"kv blocks 17..33 ready".to_vec(),
        },
        Ctl::Notif { msg: Vec::new() },
        Ctl::Revoke {
            instance: 9,
            region,
            key: 1,
        },
    ];
    for m in &msgs {
        let b = m.encode();
        assert_eq!(&Ctl::decode(&b).unwrap(), m);
        for n in 0..b.len() {
            assert!(Ctl::decode(&b[..n]).is_err(), "{m:?} prefix {n}");
        }
        let mut t = b.clone();
        t.push(0);
        assert!(Ctl::decode(&t)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
    }
    assert!(Ctl::decode(&[9])
        .unwrap_err()
        .to_string()
        .contains("unknown"));
    let mut big = vec![CTL_NOTIF];
    big.extend_from_slice(&(MAX_CTL_NOTIF as u32 + 1).to_le_bytes());
    assert!(Ctl::decode(&big).is_err());
    let mut ep = msgs[0].encode();
    ep[17..19].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(Ctl::decode(&ep).is_err());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut f = msgs[(x % 4) as usize].encode();
        let i = (x as usize >> 8) % f.len();
        f[i] ^= 1 << (x % 8);
        let _ = Ctl::decode(&f);
    }
}

#[test]
fn conn_info_v1_is_still_read() {
    let mut c = conn("b-1", vec![], "");
    c.fabric = false;
    let b = encode_v1(&c);
    let d = ConnInfo::decode(&b).unwrap();
    assert_eq!(d.boot_id, "b-1");
    assert_eq!(d.socket, c.socket);
    assert_eq!((d.uid, d.pid, d.fabric), (1000, 42, false));
    assert!(d.devices.is_empty());
    assert!(d.control.is_empty());
    assert_eq!(d.fabric_note, V1_NOTE);
    for n in 0..b.len() {
        assert!(ConnInfo::decode(&b[..n]).is_err(), "prefix {n}");
    }
    let mut t = b.clone();
    t.push(0);
    assert!(ConnInfo::decode(&t).unwrap_err().contains("trailing"));
    // A v1 peer on the same node is reached as before; on another node it has no domain.
    let ours = conn("b-1", vec![dev(0, 1, dom(7, 3))], "");
    assert_eq!(d.route_from(&ours, true), Ok(Route::SameNode));
    let ours = conn("b-2", vec![dev(0, 1, dom(7, 3))], "");
    let e = d.route_from(&ours, true).unwrap_err();
    assert!(
        e.contains("peer is in no NVLink domain") && e.contains("version 1"),
        "{e}"
    );
}

#[test]
fn routes_over_a_table_of_cases() {
    let a = dom(7, 3);
    let other_clique = dom(7, 4);
    let other_cluster = dom(8, 3);
    // (case, peer, ours, allow_fabric, expected route or a piece of the reason)
    let mut peer_no_fabric = conn("n2", vec![dev(0, 2, a)], "");
    peer_no_fabric.fabric = false;
    let mut other_uid = conn("n1", vec![], "");
    other_uid.uid = 0;
    let nvml_missing = "NVML unavailable: libnvidia-ml.so.1 not found: no such file";
    /// (case, peer, ours, allow_fabric, the route or a piece of the reason)
    type Case = (
        &'static str,
        ConnInfo,
        ConnInfo,
        bool,
        Result<Route, &'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "same node",
            conn("n1", vec![], ""),
            conn("n1", vec![], ""),
            false,
            Ok(Route::SameNode),
        ),
        (
            "same node, other uid",
            other_uid,
            conn("n1", vec![], ""),
            true,
            Err("uid 0"),
        ),
        (
            "empty boot ids are not a node",
            conn("", vec![], ""),
            conn("", vec![dev(0, 1, a)], ""),
            false,
            Err("different node"),
        ),
        (
            "same domain",
            conn("n2", vec![dev(0, 2, a)], ""),
            conn("n1", vec![dev(0, 1, a)], ""),
            true,
            Ok(Route::Fabric),
        ),
        (
            "one common domain among several",
            conn("n2", vec![dev(0, 2, other_cluster), dev(1, 3, a)], ""),
            conn("n1", vec![dev(0, 1, None), dev(1, 4, a)], ""),
            true,
            Ok(Route::Fabric),
        ),
        (
            "fabric not allowed",
            conn("n2", vec![dev(0, 2, a)], ""),
            conn("n1", vec![dev(0, 1, a)], ""),
            false,
            Err("fabric is not allowed here"),
        ),
        (
            "NVML missing here",
            conn("n2", vec![dev(0, 2, a)], ""),
            conn("n1", vec![dev(0, 1, None)], nvml_missing),
            true,
            Err("no NVLink domain here: NVML unavailable: libnvidia-ml.so.1 not found"),
        ),
        (
            "no devices here",
            conn("n2", vec![dev(0, 2, a)], ""),
            conn("n1", vec![], ""),
            true,
            Err("no NVLink domain here: no device reports one"),
        ),
        (
            "peer without domain",
            conn(
                "n2",
                vec![dev(0, 2, None)],
                "device 0: fabric state NOT_STARTED",
            ),
            conn("n1", vec![dev(0, 1, a)], ""),
            true,
            Err("peer is in no NVLink domain: device 0: fabric state NOT_STARTED"),
        ),
        (
            "other clique",
            conn("n2", vec![dev(0, 2, other_clique)], ""),
            conn("n1", vec![dev(0, 1, a)], ""),
            true,
            Err("no common NVLink domain"),
        ),
        (
            "other cluster",
            conn("n2", vec![dev(0, 2, other_cluster)], ""),
            conn("n1", vec![dev(0, 1, a)], ""),
            true,
            Err("clique 3; the peer's: cluster 08080808"),
        ),
        (
            "peer exports no fabric handles",
            peer_no_fabric,
            conn("n1", vec![dev(0, 1, a)], ""),
            true,
            Err("does not export fabric handles"),
        ),
    ];
    for (case, peer, ours, allow, want) in cases {
        let got = peer.route_from(&ours, allow);
        match (want, got) {
            (Ok(w), Ok(g)) => assert_eq!(w, g, "{case}"),
            (Err(piece), Err(reason)) => {
                assert!(reason.contains(piece), "{case}: {reason}");
                if piece != "uid 0" {
                    assert!(reason.starts_with("different node"), "{case}: {reason}");
                }
            }
            (w, g) => panic!("{case}: wanted {w:?}, got {g:?}"),
        }
    }
}

#[test]
fn common_domain_per_device_pair() {
    let a = dom(7, 3);
    let peer = vec![dev(0, 2, a), dev(1, 3, dom(7, 4)), dev(2, 5, None)];
    let ours = vec![dev(0, 1, a), dev(1, 6, None)];
    assert_eq!(
        common_domain(&peer, &[2; 16], &ours, &[1; 16]),
        Ok(a.unwrap())
    );
    let e = common_domain(&peer, &[3; 16], &ours, &[1; 16]).unwrap_err();
    assert!(e.contains("clique 4") && e.contains("clique 3"), "{e}");
    let e = common_domain(&peer, &[5; 16], &ours, &[1; 16]).unwrap_err();
    assert!(
        e.contains("peer's device 05050505-0505") && e.contains("no NVLink"),
        "{e}"
    );
    let e = common_domain(&peer, &[9; 16], &ours, &[1; 16]).unwrap_err();
    assert!(e.contains("not in its connection info"), "{e}");
    let e = common_domain(&peer, &[2; 16], &ours, &[6; 16]).unwrap_err();
    assert!(e.contains("our device"), "{e}");
    assert_eq!(
        uuid_str(&[0xab; 16]),
        "abababab-abab-abab-abab-abababababab"
    );
}

/// A fake address space: sorted (base, size, kind).
struct FakeMap(Vec<AllocInfo>);

impl AllocationMap for FakeMap {
    fn lookup(&self, addr: u64) -> Result<AllocInfo, String> {
        self.0
            .iter()
            .find(|a| addr >= a.base && addr < a.base + a.size)
            .copied()
            .ok_or_else(|| format!("{addr:#x} is not device memory"))
    }
}

const MB2: u64 = 2 << 20;

fn vmm(base: u64, size: u64, handle_types: u32) -> AllocInfo {
    AllocInfo {
        base,
        size,
        kind: AllocKind::Vmm { handle_types },
    }
}

#[test]
fn walk_expandable_segment_chunk_by_chunk() {
    // Eight 2 MiB physical chunks mapped back to back, like PyTorch's expandable segments.
    let base = 0x7f00_0000_0000u64;
    let map = FakeMap(
        (0..8)
            .map(|i| vmm(base + i * MB2, MB2, HANDLE_POSIX_FD | HANDLE_FABRIC))
            .collect(),
    );
    let start = base + MB2 / 2;
    let len = 5 * MB2;
    let chunks = plan_chunks(&map, start, len, true).unwrap();
    assert_eq!(chunks.len(), 6);
    assert_eq!(chunks[0].offset, 0);
    assert_eq!(chunks[0].len, MB2 / 2);
    assert_eq!(chunks[0].alloc_offset, MB2 / 2);
    assert!(chunks.iter().all(|c| c.fabric));
    assert_eq!(chunks[5].len, MB2 / 2);
    assert_eq!(chunks.iter().map(|c| c.len).sum::<u64>(), len);
    for w in chunks.windows(2) {
        assert_eq!(w[0].offset + w[0].len, w[1].offset);
    }
    // Fabric not asked for: none.
    let chunks = plan_chunks(&map, start, len, false).unwrap();
    assert!(chunks.iter().all(|c| !c.fabric));
}

#[test]
fn walk_errors_name_the_cause() {
    let base = 0x1000_0000u64;
    // A VMM chunk without exportable handle types in the middle.
    let map = FakeMap(vec![
        vmm(base, MB2, HANDLE_POSIX_FD),
        vmm(base + MB2, MB2, 0),
    ]);
    let e = plan_chunks(&map, base, 2 * MB2, false).unwrap_err();
    assert!(
        e.contains("without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR"),
        "{e}"
    );
    assert!(e.contains("VmmBuffer"), "{e}");
    // A hole: the range runs past the last allocation.
    let map = FakeMap(vec![vmm(base, MB2, HANDLE_POSIX_FD)]);
    let e = plan_chunks(&map, base, MB2 + 1, false).unwrap_err();
    assert!(e.contains("not device memory"), "{e}");
    // Legacy memory: one chunk per allocation, offset from the base.
    let map = FakeMap(vec![AllocInfo {
        base,
        size: 1 << 20,
        kind: AllocKind::Legacy { ipc_capable: true },
    }]);
    let c = plan_chunks(&map, base + 4096, 8192, true).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].alloc_offset, 4096);
    assert!(!c[0].fabric);
    // A pool allocation that cannot do legacy IPC.
    let map = FakeMap(vec![AllocInfo {
        base,
        size: 1 << 20,
        kind: AllocKind::Legacy { ipc_capable: false },
    }]);
    assert!(plan_chunks(&map, base, 10, false)
        .unwrap_err()
        .contains("cudaMallocAsync"));
    // A lying driver (allocation not holding the address) is an error, not a loop.
    struct Liar;
    impl AllocationMap for Liar {
        fn lookup(&self, _addr: u64) -> Result<AllocInfo, String> {
            Ok(AllocInfo {
                base: 0,
                size: 1,
                kind: AllocKind::Legacy { ipc_capable: true },
            })
        }
    }
    assert!(plan_chunks(&Liar, 100, 10, false)
        .unwrap_err()
        .contains("does not hold"));
    assert!(plan_chunks(&Liar, u64::MAX, 10, false).is_err());
}

#[test]
fn walk_is_bounded() {
    // A million 1-byte allocations: stops at MAX_CHUNKS with a clear error.
    struct Tiny;
    impl AllocationMap for Tiny {
        fn lookup(&self, addr: u64) -> Result<AllocInfo, String> {
            Ok(vmm(addr, 1, HANDLE_POSIX_FD))
        }
    }
    let e = plan_chunks(&Tiny, 0, 1 << 20, false).unwrap_err();
    assert!(e.contains("more than"), "{e}");
}
