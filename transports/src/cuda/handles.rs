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

use nixl_core::codec::Reader;
use nixl_core::DecodeError;

use super::driver::{HANDLE_FABRIC, HANDLE_POSIX_FD};

/// Version of the region public data.
pub const REGION_VERSION: u8 = 1;
/// Version of the connection info (version 1 is still decoded).
pub const CONN_VERSION: u8 = 2;
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
pub fn uuid_str(u: &[u8; 16]) -> String {
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
pub const MAX_ENDPOINT: usize = 4096;
/// Most devices one agent's connection info may list.
pub const MAX_DEVICES: usize = 256;
/// Longest fabric note kept in the connection info.
pub const MAX_NOTE: usize = 1024;
/// The fabric note of a peer whose connection info predates fabric domains (version 1).
pub const V1_NOTE: &str =
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
/// Version 1 (still decoded: devices empty, the note [`V1_NOTE`]) ended after the fabric byte.
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
pub enum Route {
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
    pub fn has_domain(&self) -> bool {
        self.devices.iter().any(|d| d.domain.is_some())
    }

    /// How a peer with this info is reached from `ours` (with our `allow_fabric`), or why it
    /// is not: the same node (boot id) and uid; or another node with which we share an NVLink
    /// domain (same cluster UUID and clique id), where the peer exports fabric handles and
    /// fabric is allowed here.
    pub fn route_from(&self, ours: &ConnInfo, allow_fabric: bool) -> Result<Route, String> {
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
pub fn common_domain(
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

/// Largest notification carried in a [`Ctl::Notif`]: the one limit of every backend (the
/// control channel leaves room for it and the header).
pub const MAX_CTL_NOTIF: usize = nixl_core::MAX_NOTIF_BYTES;

/// A request between two agents' cuda backends over the agents' control channel: what the Unix
/// socket carries on one node, for peers on other nodes. Encoded as a type byte, then
/// (little-endian):
///
/// ```text
/// 1 Opened  u128 importer instance, u16 length + importer's control endpoint,
///           u64 dev, u64 addr, u64 len, u64 key          importer → owner; reply: empty
/// 2 Notif   u32 length + message                         importer → owner; reply: empty
/// 3 Revoke  u128 owner instance, u64 dev, u64 addr, u64 len, u64 key
///                                                        owner → importer; reply: u8 1 = closed,
///                                                        0 = copies still running at the bound
/// ```
///
/// A refusal is the channel's error reply (the caller gets `Denied` with the reason). The
/// sender's agent name is the one the channel authenticated, never a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ctl {
    /// The importer is about to map `region` (whole, as published, with its `key`) through
    /// fabric handles; the owner checks the key and records the import for revocation.
    Opened {
        /// The importer's instance id.
        instance: u128,
        /// Where the owner reaches the importer's cuda service (to revoke).
        endpoint: Vec<u8>,
        /// The region.
        region: nixl_core::Desc,
        /// Its key.
        key: u64,
    },
    /// A notification for the owner's agent.
    Notif {
        /// The message.
        msg: Vec<u8>,
    },
    /// The owner deregistered `region`: the importer must stop using it and close its mappings.
    Revoke {
        /// The owner's instance id.
        instance: u128,
        /// The region.
        region: nixl_core::Desc,
        /// Its key.
        key: u64,
    },
}

const CTL_OPENED: u8 = 1;
const CTL_NOTIF: u8 = 2;
const CTL_REVOKE: u8 = 3;

fn put_region(v: &mut Vec<u8>, region: &nixl_core::Desc, key: u64) {
    for x in [region.dev_id, region.addr, region.len, key] {
        v.extend_from_slice(&x.to_le_bytes());
    }
}

fn get_region(r: &mut Reader<'_>) -> Result<(nixl_core::Desc, u64), DecodeError> {
    let dev = r.u64("dev")?;
    let addr = r.u64("addr")?;
    let len = r.u64("len")?;
    Ok((nixl_core::Desc::new(addr, len, dev), r.u64("key")?))
}

impl Ctl {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        match self {
            Ctl::Opened {
                instance,
                endpoint,
                region,
                key,
            } => {
                v.push(CTL_OPENED);
                v.extend_from_slice(&instance.to_le_bytes());
                let ep = &endpoint[..endpoint.len().min(MAX_ENDPOINT)];
                v.extend_from_slice(&(ep.len() as u16).to_le_bytes());
                v.extend_from_slice(ep);
                put_region(&mut v, region, *key);
            }
            Ctl::Notif { msg } => {
                v.reserve(msg.len());
                v.push(CTL_NOTIF);
                v.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                v.extend_from_slice(msg);
            }
            Ctl::Revoke {
                instance,
                region,
                key,
            } => {
                v.push(CTL_REVOKE);
                v.extend_from_slice(&instance.to_le_bytes());
                put_region(&mut v, region, *key);
            }
        }
        v
    }

    /// Decodes, without trusting.
    pub fn decode(b: &[u8]) -> Result<Ctl, DecodeError> {
        let mut r = Reader::new(b);
        let m = match r.u8("cuda control type")? {
            CTL_OPENED => {
                let instance = u128::from_le_bytes(r.array::<16>("instance")?);
                let n = usize::from(r.u16("endpoint")?);
                if n > MAX_ENDPOINT {
                    return Err(DecodeError::TooLarge {
                        field: "endpoint",
                        got: n,
                        limit: MAX_ENDPOINT,
                    });
                }
                let endpoint = r.take(n, "endpoint")?.to_vec();
                let (region, key) = get_region(&mut r)?;
                Ctl::Opened {
                    instance,
                    endpoint,
                    region,
                    key,
                }
            }
            CTL_NOTIF => {
                let n = r.u32("notification")? as usize;
                if n > MAX_CTL_NOTIF {
                    return Err(DecodeError::TooLarge {
                        field: "notification",
                        got: n,
                        limit: MAX_CTL_NOTIF,
                    });
                }
                Ctl::Notif {
                    msg: r.take(n, "notification")?.to_vec(),
                }
            }
            CTL_REVOKE => {
                let instance = u128::from_le_bytes(r.array::<16>("instance")?);
                let (region, key) = get_region(&mut r)?;
                Ctl::Revoke {
                    instance,
                    region,
                    key,
                }
            }
            t => {
                return Err(invalid(
                    "cuda control type",
                    format!("unknown message type {t}"),
                ))
            }
        };
        if !r.is_empty() {
            return Err(invalid("cuda control message", "trailing bytes".into()));
        }
        Ok(m)
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
}
