//! What the `cuda` backend publishes (connection info, per-region handles) and how a registered
//! range is cut into exportable chunks. All hardware-free: the driver is reached through the
//! [`AllocationMap`] trait.
//!
//! # Region public data (version 1, little-endian)
//!
//! ```text
//! u8  version = 1
//! u32 device ordinal          u8[16] device UUID
//! u32 chunk count (<= MAX_CHUNKS)
//! per chunk:
//!   u64 offset in the region  u64 len
//!   u64 allocation size       u64 offset of the chunk in its allocation
//!   u8  flags: 1 = legacy IPC, 2 = POSIX fd (granted over the socket), 4 = fabric
//!   [u8; 64] legacy IPC handle   if flag 1
//!   [u8; 64] fabric handle       if flag 4
//! ```
//!
//! Chunks tile the region exactly, in order. A legacy chunk carries its `cuIpcGetMemHandle`
//! handle (of the allocation base; the chunk starts `alloc_offset` bytes into it). A VMM chunk is
//! one physical allocation (as mapped: PyTorch's expandable segments map many chunks back to
//! back); its fd is not in the metadata: the importer asks the owner's socket for "chunk i of
//! the region", presenting the region key, and the owner checks the key. Legacy IPC and fabric
//! handles are capabilities that travel in the metadata, as in NIXL; metadata is exchanged over
//! the agents' authenticated channels.

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

use super::driver::{HANDLE_FABRIC, HANDLE_POSIX_FD};

/// Version of the region public data.
pub const REGION_VERSION: u8 = 1;
/// Version of the connection info.
pub const CONN_VERSION: u8 = 1;
/// Most chunks one region may have (a 64 GiB expandable segment in 2 MiB pieces is 32768).
pub const MAX_CHUNKS: usize = 1 << 16;

const FLAG_LEGACY: u8 = 1;
const FLAG_FD: u8 = 2;
const FLAG_FABRIC: u8 = 4;

/// How a peer can map one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHandles {
    /// `cuIpcGetMemHandle` of the allocation (legacy `cudaMalloc` memory).
    pub legacy: Option<[u8; 64]>,
    /// A POSIX fd is granted over the owner's socket (VMM memory).
    pub posix_fd: bool,
    /// A fabric handle (VMM memory created with `CU_MEM_HANDLE_TYPE_FABRIC`).
    pub fabric: Option<[u8; 64]>,
}

/// One exportable piece of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk in the region.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Size of the allocation (legacy) or mapping (VMM) the chunk lies in.
    pub alloc_size: u64,
    /// Offset of the chunk's first byte in that allocation.
    pub alloc_offset: u64,
    /// The handles.
    pub handles: ChunkHandles,
}

/// What a region's metadata says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPublic {
    /// Device ordinal in the owner's process.
    pub device: u32,
    /// Device UUID.
    pub uuid: [u8; 16],
    /// The chunks, tiling the region in order.
    pub chunks: Vec<Chunk>,
}

const MIN_CHUNK_BYTES: usize = 8 * 4 + 1;

impl RegionPublic {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.chunks.len() * (MIN_CHUNK_BYTES + 64));
        v.push(REGION_VERSION);
        v.extend_from_slice(&self.device.to_le_bytes());
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            for x in [c.offset, c.len, c.alloc_size, c.alloc_offset] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            let mut flags = 0;
            if c.handles.legacy.is_some() {
                flags |= FLAG_LEGACY;
            }
            if c.handles.posix_fd {
                flags |= FLAG_FD;
            }
            if c.handles.fabric.is_some() {
                flags |= FLAG_FABRIC;
            }
            v.push(flags);
            if let Some(h) = &c.handles.legacy {
                v.extend_from_slice(h);
            }
            if let Some(h) = &c.handles.fabric {
                v.extend_from_slice(h);
            }
        }
        v
    }

    /// Decodes and checks against the region's length: chunks must tile `[0, region_len)`
    /// exactly, lie inside their allocations, and name exactly one kind of memory.
    pub fn decode(b: &[u8], region_len: u64) -> Result<RegionPublic, DecodeError> {
        let mut r = Reader::new(b);
        let version = r.u8("cuda region version")?;
        if version != REGION_VERSION {
            return Err(invalid(
                "cuda region version",
                format!("version {version}, this build reads {REGION_VERSION}"),
            ));
        }
        let device = r.u32("cuda device")?;
        let uuid = r.array::<16>("cuda device uuid")?;
        let n = r.peek_u32()? as usize;
        let n = r.count("cuda chunks", n, 4, MAX_CHUNKS, MIN_CHUNK_BYTES)?;
        let mut chunks = Vec::with_capacity(n);
        let mut expect = 0u64;
        for i in 0..n {
            let offset = r.u64("chunk offset")?;
            let len = r.u64("chunk len")?;
            let alloc_size = r.u64("chunk allocation size")?;
            let alloc_offset = r.u64("chunk allocation offset")?;
            let flags = r.u8("chunk flags")?;
            if flags & !(FLAG_LEGACY | FLAG_FD | FLAG_FABRIC) != 0 {
                return Err(invalid(
                    "chunk flags",
                    format!("chunk {i}: unknown flags {flags:#x}"),
                ));
            }
            let legacy = flags & FLAG_LEGACY != 0;
            if legacy == (flags & (FLAG_FD | FLAG_FABRIC) != 0) {
                return Err(invalid(
                    "chunk flags",
                    format!("chunk {i}: flags {flags:#x} must name legacy IPC or VMM handles"),
                ));
            }
            let legacy = if legacy {
                Some(r.array::<64>("legacy IPC handle")?)
            } else {
                None
            };
            let fabric = if flags & FLAG_FABRIC != 0 {
                Some(r.array::<64>("fabric handle")?)
            } else {
                None
            };
            if offset != expect || len == 0 {
                return Err(invalid(
                    "chunk offset",
                    format!("chunk {i} at {offset}+{len}: chunks must tile the region (next at {expect})"),
                ));
            }
            let in_alloc = alloc_offset
                .checked_add(len)
                .is_some_and(|e| e <= alloc_size);
            if !in_alloc {
                return Err(invalid(
                    "chunk allocation",
                    format!(
                        "chunk {i}: {alloc_offset}+{len} outside its allocation of {alloc_size}"
                    ),
                ));
            }
            expect = offset
                .checked_add(len)
                .ok_or_else(|| invalid("chunk len", format!("chunk {i} overflows")))?;
            chunks.push(Chunk {
                offset,
                len,
                alloc_size,
                alloc_offset,
                handles: ChunkHandles {
                    legacy,
                    posix_fd: flags & FLAG_FD != 0,
                    fabric,
                },
            });
        }
        if !r.is_empty() {
            return Err(invalid("cuda region", "trailing bytes".into()));
        }
        if expect != region_len {
            return Err(invalid(
                "cuda chunks",
                format!("chunks cover {expect} bytes, the region has {region_len}"),
            ));
        }
        Ok(RegionPublic {
            device,
            uuid,
            chunks,
        })
    }

    /// Index of the chunk holding region offset `off` (chunks are sorted and tile the region).
    pub fn chunk_at(&self, off: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.offset + c.len <= off);
        (i < self.chunks.len() && self.chunks[i].offset <= off).then_some(i)
    }
}

fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

/// What a peer publishes as the backend's connection info (version 1):
/// `u8 version, str boot id, str socket path, u32 uid, u32 pid, u8 fabric`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// `/proc/sys/kernel/random/boot_id`: same value, same node (same kernel).
    pub boot_id: String,
    /// The owner's Unix socket (fd grants and notifications).
    pub socket: String,
    /// The owner's uid (the socket only serves the same uid).
    pub uid: u32,
    /// The owner's pid (same pid: same process, no import needed).
    pub pid: u32,
    /// Whether the owner's devices export fabric handles.
    pub fabric: bool,
}

impl ConnInfo {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.boot_id.len() + self.socket.len());
        v.push(CONN_VERSION);
        for s in [&self.boot_id, &self.socket] {
            let s = &s.as_bytes()[..s.len().min(4096)];
            v.extend_from_slice(&(s.len() as u16).to_le_bytes());
            v.extend_from_slice(s);
        }
        v.extend_from_slice(&self.uid.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.push(u8::from(self.fabric));
        v
    }

    /// Decodes, without trusting.
    pub fn decode(b: &[u8]) -> Result<ConnInfo, String> {
        let e = |e: DecodeError| format!("bad cuda connection info: {e}");
        let mut r = Reader::new(b);
        let v = r.u8("version").map_err(e)?;
        if v != CONN_VERSION {
            return Err(format!(
                "bad cuda connection info: version {v}, this build reads {CONN_VERSION}"
            ));
        }
        let boot_id = r.str("boot id", 64).map_err(e)?;
        let socket = r.str("socket path", 4096).map_err(e)?;
        let uid = r.u32("uid").map_err(e)?;
        let pid = r.u32("pid").map_err(e)?;
        let fabric = match r.u8("fabric").map_err(e)? {
            0 => false,
            1 => true,
            x => return Err(format!("bad cuda connection info: fabric flag {x}")),
        };
        if !r.is_empty() {
            return Err("bad cuda connection info: trailing bytes".into());
        }
        Ok(ConnInfo {
            boot_id,
            socket,
            uid,
            pid,
            fabric,
        })
    }

    /// Whether a peer with this info can be reached from `ours`: same node (boot id) and uid.
    /// Fabric handles would reach further (see the module docs of `cuda`), but without a
    /// driver-API way to learn the NVLink domain this stays on one node.
    pub fn reachable_from(&self, ours: &ConnInfo) -> Result<(), String> {
        if self.boot_id.is_empty() || self.boot_id != ours.boot_id {
            return Err("different node (boot id differs); cuda reaches one node".into());
        }
        if self.uid != ours.uid {
            return Err(format!("peer runs as uid {}, we as {}", self.uid, ours.uid));
        }
        Ok(())
    }
}

/// How memory at an address was allocated, as the driver tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    /// `cudaMalloc` / `cuMemAlloc`: exported with `cuIpcGetMemHandle` on the base.
    Legacy {
        /// Whether legacy IPC works on it (false for stream-ordered pools).
        ipc_capable: bool,
    },
    /// A VMM mapping (`cuMemCreate` + `cuMemMap`): exported per physical allocation.
    Vmm {
        /// The handle types it was created with (`CU_MEM_HANDLE_TYPE_*` bits).
        handle_types: u32,
    },
}

/// The allocation holding an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocInfo {
    /// First byte of the allocation (legacy) or mapping (VMM).
    pub base: u64,
    /// Its size.
    pub size: u64,
    /// How it was allocated.
    pub kind: AllocKind,
}

/// Address → allocation: the driver in production, a fake in tests.
pub trait AllocationMap {
    /// The allocation holding `addr`, or why there is none.
    fn lookup(&self, addr: u64) -> Result<AllocInfo, String>;
}

/// A chunk as the walk finds it, before export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    /// Offset in the region.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// The allocation (or mapping) it lies in.
    pub alloc: AllocInfo,
    /// Offset of the chunk in the allocation.
    pub alloc_offset: u64,
    /// Export fabric handles for it (VMM allocated with FABRIC, and asked for).
    pub fabric: bool,
}

/// Walks `[addr, addr + len)` allocation by allocation and checks each piece can be exported.
pub fn plan_chunks(
    map: &dyn AllocationMap,
    addr: u64,
    len: u64,
    allow_fabric: bool,
) -> Result<Vec<PlannedChunk>, String> {
    let end = addr
        .checked_add(len)
        .ok_or_else(|| format!("range {addr:#x}+{len} wraps"))?;
    let mut out = Vec::new();
    let mut cur = addr;
    while cur < end {
        if out.len() >= MAX_CHUNKS {
            return Err(format!(
                "range {addr:#x}+{len} spans more than {MAX_CHUNKS} allocations; register it in \
                 smaller regions"
            ));
        }
        let a = map.lookup(cur)?;
        let a_end = a.base.saturating_add(a.size);
        if a.size == 0 || cur < a.base || cur >= a_end {
            return Err(format!(
                "driver reports allocation {:#x}+{} for address {cur:#x}, which it does not hold",
                a.base, a.size
            ));
        }
        let fabric = match a.kind {
            AllocKind::Legacy { ipc_capable: true } => false,
            AllocKind::Legacy { ipc_capable: false } => {
                return Err(format!(
                    "memory at {cur:#x} cannot be shared with CUDA IPC (a cudaMallocAsync pool \
                     without IPC export?); allocate it with cudaMalloc, nixl's VmmBuffer, or \
                     PyTorch with expandable_segments:True"
                ))
            }
            AllocKind::Vmm { handle_types } => {
                if handle_types & (HANDLE_POSIX_FD | HANDLE_FABRIC) == 0 {
                    return Err(format!(
                        "VMM allocation {:#x}+{} at {cur:#x} was allocated without \
                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (handle types {handle_types:#x}) \
                         and cannot be shared; use nixl's VmmBuffer, or allocate with \
                         requestedHandleTypes including POSIX_FILE_DESCRIPTOR (PyTorch's \
                         expandable segments do where the driver supports it)",
                        a.base, a.size
                    ));
                }
                allow_fabric && handle_types & HANDLE_FABRIC != 0
            }
        };
        let chunk_end = end.min(a_end);
        out.push(PlannedChunk {
            offset: cur - addr,
            len: chunk_end - cur,
            alloc: a,
            alloc_offset: cur - a.base,
            fabric,
        });
        cur = chunk_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn conn_info_round_trip_garbage_and_reach() {
        let c = ConnInfo {
            boot_id: "b-1".into(),
            socket: "/run/nixl/x.sock".into(),
            uid: 1000,
            pid: 42,
            fabric: true,
        };
        let b = c.encode();
        assert_eq!(ConnInfo::decode(&b).unwrap(), c);
        for n in 0..b.len() {
            assert!(ConnInfo::decode(&b[..n]).is_err());
        }
        let mut t = b.clone();
        t.push(1);
        assert!(ConnInfo::decode(&t).unwrap_err().contains("trailing"));
        let mut t = b.clone();
        *t.last_mut().unwrap() = 2;
        assert!(ConnInfo::decode(&t).is_err());
        t[0] = 2;
        assert!(ConnInfo::decode(&t).unwrap_err().contains("version"));

        let mut other = c.clone();
        assert!(other.reachable_from(&c).is_ok());
        other.boot_id = "b-2".into();
        assert!(other
            .reachable_from(&c)
            .unwrap_err()
            .starts_with("different node"));
        other.boot_id = c.boot_id.clone();
        other.uid = 0;
        assert!(other.reachable_from(&c).unwrap_err().contains("uid"));
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
}
