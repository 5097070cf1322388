//! What the `cuda` backend publishes (connection info with the devices' NVLink domains,
//! per-region handles), how a peer is reached ([`ConnInfo::route_from`]), the messages its
//! backends exchange across nodes over the control channel ([`Ctl`]), and how a registered range
//! is cut into exportable chunks. All hardware-free: the driver is reached through the
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
//!
//! Files: this one the region public data and the connection info; `ctl.rs` the control
//! messages; `plan.rs` cutting a range into chunks; `tests.rs` the unit tests.

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

use super::driver::{HANDLE_FABRIC, HANDLE_POSIX_FD};

pub(crate) mod ctl;
mod plan;
#[cfg(test)]
mod tests;

pub(crate) use ctl::*;
pub(crate) use plan::*;

/// Version of the region public data.
pub(crate) const REGION_VERSION: u8 = 1;
/// Version of the connection info (version 1 is still decoded).
pub(crate) const CONN_VERSION: u8 = 2;
/// Most chunks one region may have (a 64 GiB expandable segment in 2 MiB pieces is 32768).
pub(crate) const MAX_CHUNKS: usize = 1 << 16;

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
    pub(crate) fn chunk_at(&self, off: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.offset + c.len <= off);
        (i < self.chunks.len() && self.chunks[i].offset <= off).then_some(i)
    }
}

fn invalid(field: &'static str, reason: String) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

/// A GPU's NVLink domain, as NVML reports it once the GPU's fabric registration completed: GPUs
/// with the same cluster UUID and clique id reach each other's memory over NVLink (through
/// fabric handles), on whichever node they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FabricDomain {
    /// `nvmlGpuFabricInfo*_t::clusterUuid`.
    pub cluster_uuid: [u8; 16],
    /// `nvmlGpuFabricInfo*_t::cliqueId`.
    pub clique_id: u32,
}

impl std::fmt::Display for FabricDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cluster {} clique {}",
            uuid_str(&self.cluster_uuid),
            self.clique_id
        )
    }
}

/// A UUID in its usual text form (`8-4-4-4-12` lower-case hex digits).
pub(crate) fn uuid_str(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// One of an agent's devices and its NVLink domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFabric {
    /// The CUDA ordinal in the agent's process.
    pub ordinal: u32,
    /// The device UUID (`cuDeviceGetUuid`; what a region's public data names).
    pub uuid: [u8; 16],
    /// Its NVLink domain, when NVML reports the fabric registration completed.
    pub domain: Option<FabricDomain>,
}

/// Longest control endpoint kept in the connection info.
pub(crate) const MAX_ENDPOINT: usize = 4096;
/// Most devices one agent's connection info may list.
pub(crate) const MAX_DEVICES: usize = 256;
/// Longest fabric note kept in the connection info.
pub(crate) const MAX_NOTE: usize = 1024;
/// The fabric note of a peer whose connection info predates fabric domains (version 1).
pub(crate) const V1_NOTE: &str =
    "the peer's cuda backend publishes no NVLink domains (connection info version 1)";

/// What a peer publishes as the backend's connection info, version 2 (little-endian):
///
/// ```text
/// u8  version = 2
/// str boot id (u16 length, at most 64 bytes)     str socket path (at most 4096 bytes)
/// u32 uid     u32 pid     u8 fabric (0 or 1)
/// str fabric note (at most 1024 bytes: why devices below lack a domain; empty if none does)
/// u16 device count (<= MAX_DEVICES)
/// per device: u32 ordinal, u8[16] device UUID, u8 has domain (0 or 1),
///             then if 1: u8[16] cluster UUID, u32 clique id
/// u16 length + bytes: the agent's control endpoint (at most MAX_ENDPOINT; empty: none)
/// ```
///
/// Version 1 (still decoded: devices empty, the note `V1_NOTE`) ended after the fabric byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// `/proc/sys/kernel/random/boot_id`: same value, same node (same kernel).
    pub boot_id: String,
    /// The owner's Unix socket (fd grants, announcements, revocations and notifications).
    pub socket: String,
    /// The owner's uid (the socket only serves the same uid).
    pub uid: u32,
    /// The owner's pid (same pid: same process, no import needed).
    pub pid: u32,
    /// Whether the owner's devices export fabric handles (and its `allow_fabric` is set).
    pub fabric: bool,
    /// The owner's devices and their NVLink domains.
    pub devices: Vec<DeviceFabric>,
    /// Why devices lack a domain (NVML unavailable, fabric not started...); empty when none does.
    pub fabric_note: String,
    /// Where the owner's cuda control service is reached over the agents' control channel
    /// (announcements, revocations and notifications across nodes); empty: not served.
    pub control: Vec<u8>,
}

/// How a peer is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Same node: CUDA IPC (legacy handles, VMM fds over the owner's socket, fabric handles).
    SameNode,
    /// Another node of a common NVLink domain: fabric handles only, no socket.
    Fabric,
}

const MIN_DEVICE_BYTES: usize = 4 + 16 + 1;

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &[u8] {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

fn domains_text(devices: &[DeviceFabric]) -> String {
    let mut v: Vec<String> = Vec::new();
    for d in devices.iter().filter_map(|d| d.domain) {
        let t = d.to_string();
        if !v.contains(&t) {
            v.push(t);
        }
    }
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

impl ConnInfo {
    /// Encodes (version 2).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(
            32 + self.boot_id.len()
                + self.socket.len()
                + self.fabric_note.len().min(MAX_NOTE)
                + self.devices.len() * (MIN_DEVICE_BYTES + 20),
        );
        v.push(CONN_VERSION);
        let put = |v: &mut Vec<u8>, s: &[u8]| {
            v.extend_from_slice(&(s.len() as u16).to_le_bytes());
            v.extend_from_slice(s);
        };
        put(&mut v, cut(&self.boot_id, 64));
        put(&mut v, cut(&self.socket, 4096));
        v.extend_from_slice(&self.uid.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.push(u8::from(self.fabric));
        put(&mut v, cut(&self.fabric_note, MAX_NOTE));
        let devices = &self.devices[..self.devices.len().min(MAX_DEVICES)];
        v.extend_from_slice(&(devices.len() as u16).to_le_bytes());
        for d in devices {
            v.extend_from_slice(&d.ordinal.to_le_bytes());
            v.extend_from_slice(&d.uuid);
            match &d.domain {
                None => v.push(0),
                Some(f) => {
                    v.push(1);
                    v.extend_from_slice(&f.cluster_uuid);
                    v.extend_from_slice(&f.clique_id.to_le_bytes());
                }
            }
        }
        let control = &self.control[..self.control.len().min(MAX_ENDPOINT)];
        put(&mut v, control);
        v
    }

    /// Decodes version 2 or 1, without trusting.
    pub fn decode(b: &[u8]) -> Result<ConnInfo, String> {
        let e = |e: DecodeError| format!("bad cuda connection info: {e}");
        let mut r = Reader::new(b);
        let v = r.u8("version").map_err(e)?;
        if v != CONN_VERSION && v != 1 {
            return Err(format!(
                "bad cuda connection info: version {v}, this build reads 1 and {CONN_VERSION}"
            ));
        }
        let boot_id = r.str("boot id", 64).map_err(e)?;
        let socket = r.str("socket path", 4096).map_err(e)?;
        let uid = r.u32("uid").map_err(e)?;
        let pid = r.u32("pid").map_err(e)?;
        let flag = |r: &mut Reader<'_>, field: &'static str| match r.u8(field).map_err(e)? {
            0 => Ok(false),
            1 => Ok(true),
            x => Err(format!("bad cuda connection info: {field} {x}")),
        };
        let fabric = flag(&mut r, "fabric flag")?;
        let mut devices = Vec::new();
        let mut control = Vec::new();
        let fabric_note = if v == 1 {
            V1_NOTE.to_owned()
        } else {
            let note = r.str("fabric note", MAX_NOTE).map_err(e)?;
            let n = usize::from(r.peek_u16().map_err(e)?);
            let n = r
                .count("devices", n, 2, MAX_DEVICES, MIN_DEVICE_BYTES)
                .map_err(e)?;
            devices.reserve(n);
            for _ in 0..n {
                let ordinal = r.u32("device ordinal").map_err(e)?;
                let uuid = r.array::<16>("device uuid").map_err(e)?;
                let domain = if flag(&mut r, "domain flag")? {
                    Some(FabricDomain {
                        cluster_uuid: r.array::<16>("cluster uuid").map_err(e)?,
                        clique_id: r.u32("clique id").map_err(e)?,
                    })
                } else {
                    None
                };
                devices.push(DeviceFabric {
                    ordinal,
                    uuid,
                    domain,
                });
            }
            let n = usize::from(r.u16("control endpoint").map_err(e)?);
            if n > MAX_ENDPOINT {
                return Err(format!(
                    "bad cuda connection info: control endpoint of {n} bytes (limit {MAX_ENDPOINT})"
                ));
            }
            control = r.take(n, "control endpoint").map_err(e)?.to_vec();
            note
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
            devices,
            fabric_note,
            control,
        })
    }

    /// Whether any of the devices has an NVLink domain.
    pub(crate) fn has_domain(&self) -> bool {
        self.devices.iter().any(|d| d.domain.is_some())
    }

    /// How a peer with this info is reached from `ours` (with our `allow_fabric`), or why it
    /// is not: the same node (boot id) and uid; or another node with which we share an NVLink
    /// domain (same cluster UUID and clique id), where the peer exports fabric handles and
    /// fabric is allowed here.
    pub(crate) fn route_from(&self, ours: &ConnInfo, allow_fabric: bool) -> Result<Route, String> {
        if !self.boot_id.is_empty() && self.boot_id == ours.boot_id {
            if self.uid != ours.uid {
                return Err(format!("peer runs as uid {}, we as {}", self.uid, ours.uid));
            }
            return Ok(Route::SameNode);
        }
        const OTHER: &str = "different node (boot id differs)";
        if !allow_fabric {
            return Err(format!(
                "{OTHER} and fabric is not allowed here (cuda allow_fabric = false)"
            ));
        }
        if !ours.has_domain() {
            let why = if ours.fabric_note.is_empty() {
                "no device reports one"
            } else {
                ours.fabric_note.as_str()
            };
            return Err(format!("{OTHER} and no NVLink domain here: {why}"));
        }
        if !self.has_domain() {
            let why = if self.fabric_note.is_empty() {
                "none of its devices reports one"
            } else {
                self.fabric_note.as_str()
            };
            return Err(format!(
                "{OTHER} and the peer is in no NVLink domain: {why}"
            ));
        }
        let common = self
            .devices
            .iter()
            .filter_map(|d| d.domain)
            .any(|p| ours.devices.iter().any(|d| d.domain == Some(p)));
        if !common {
            return Err(format!(
                "{OTHER} and no common NVLink domain (ours: {}; the peer's: {})",
                domains_text(&ours.devices),
                domains_text(&self.devices)
            ));
        }
        if !self.fabric {
            return Err(format!(
                "{OTHER} and the peer does not export fabric handles (its allow_fabric is off, \
                 or its devices lack CU_MEM_HANDLE_TYPE_FABRIC support)"
            ));
        }
        Ok(Route::Fabric)
    }
}

/// The NVLink domain shared by the peer's device `remote` (its UUID, from a region's public
/// data) and our device `local`, or why there is none.
pub(crate) fn common_domain(
    peer: &[DeviceFabric],
    remote: &[u8; 16],
    ours: &[DeviceFabric],
    local: &[u8; 16],
) -> Result<FabricDomain, String> {
    let theirs = peer
        .iter()
        .find(|d| d.uuid == *remote)
        .ok_or_else(|| {
            format!(
                "the peer's device {} is not in its connection info",
                uuid_str(remote)
            )
        })?
        .domain
        .ok_or_else(|| {
            format!(
                "the peer's device {} is in no NVLink domain",
                uuid_str(remote)
            )
        })?;
    let mine = ours
        .iter()
        .find(|d| d.uuid == *local)
        .and_then(|d| d.domain)
        .ok_or_else(|| format!("our device {} is in no NVLink domain", uuid_str(local)))?;
    if mine != theirs {
        return Err(format!(
            "the peer's device {} is in NVLink domain {theirs}, our device {} in {mine}",
            uuid_str(remote),
            uuid_str(local)
        ));
    }
    Ok(mine)
}
