//! A checkpoint held in registered memory and served to peers over `tcp`, as a weight source is
//! (`nixl-ckpt serve URI`), and restored from such a peer (`nixl://HOST:PORT`) with one-sided
//! READs alone.
//!
//! The server restores the checkpoint into memory it maps and registers (every byte verified),
//! and registers one more region, the control region:
//!
//! ```text
//! header page (4096 bytes): magic "NIXLCKSV" | version u32 | regions u32 | manifest_len u64
//!                           | xxh3-64 of everything after the header page, u64
//!                           | name_len u16 | name (UTF-8, [A-Za-z0-9._-], at most 128 bytes;
//!                             0 bytes from servers that predate names)
//!                           | at offset 168: files u32 | at 176: xxh3-64 of the file table, u64
//! manifest (as stored, see manifest/mod.rs), then per region in manifest order { addr u64, len u64 }:
//! where the region lives in the server's memory now
//! file table (after the digested part): per artifact data file served { index in the
//! manifest's files u64, addr u64, len u64 }
//! ```
//!
//! Artifact directories travel as their data files: the server holds each data file the
//! artifacts use in registered memory, and a restorer READs them into a private temporary
//! directory and restores from there, every file checked ([`crate::restore_artifact_with`]).
//!
//! One agent may serve several checkpoints, each under its own name (one control region
//! each): a restorer names the one it wants, `nixl://HOST:PORT/NAME`; without a name it takes
//! the only one there, and is refused, with the names listed, when there are several.
//!
//! A restorer fetches the server's agent metadata from its listener, finds the control region
//! among its registered DRAM regions by the magic (a bounded number of probes), READs the
//! manifest and table (checking the digest; the manifest decoded as untrusted, every served
//! region checked to lie inside a region the server registered and to have its entry's length),
//! then READs the chunks straight into the caller's memory; each chunk is verified against the
//! manifest before the restore reports success, as from a directory.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nixl_core::{Agent, AgentMetadata, Desc, DescList, MemKind, Registration, XferRequest};
use nixl_transports::tcp::{fetch_metadata, Auth};
use parking_lot::{Condvar, Mutex};
use xxhash_rust::xxh3::xxh3_64;

use crate::dir::{ChunkAt, Pick, RestoreOptions};
use crate::error::{CkptError, Result};
use crate::manifest::{Manifest, RegionEntry, MAX_FILES, MAX_MANIFEST_BYTES, MAX_REGIONS};
use crate::mapped::{restore_mapped, Placement, Restored};

/// The first bytes of a control region.
pub const MAGIC: [u8; 8] = *b"NIXLCKSV";
/// Version of the control region's layout.
pub const VERSION: u32 = 1;
/// Size of the header page.
pub const HEADER: u64 = 4096;
/// Most registered regions of a peer probed for the control region.
pub const MAX_PROBED_REGIONS: usize = 256;
/// Bound on one metadata fetch or one READ from a peer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest name of a served checkpoint.
pub const MAX_NAME: usize = 128;

/// Checks the name of a served checkpoint: 1 to [`MAX_NAME`] bytes of ASCII letters, digits,
/// `.`, `_` and `-`.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "{name:?}: a name is 1 to {MAX_NAME} bytes, this one {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?}: {c:?} is not allowed in a name (letters, digits, '.', '_', '-')"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a name"));
    }
    Ok(())
}

/// The name a checkpoint at `uri` is served under when none is given: the last component of
/// its directory or prefix, with other characters than a name's replaced by `_` (`ckpt` when
/// nothing is left).
pub fn default_name(uri: &str) -> String {
    let last = match crate::ops::Location::parse(uri) {
        Ok(crate::ops::Location::Dir(d)) => d
            .canonicalize()
            .unwrap_or(d)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Ok(crate::ops::Location::S3 { prefix, .. }) => {
            prefix.rsplit('/').next().unwrap_or_default().to_owned()
        }
        Ok(crate::ops::Location::Peer { name, .. }) => name.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let n: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    if check_name(&n).is_ok() {
        n
    } else {
        "ckpt".into()
    }
}

/// How a restorer authenticates to the peer: `NIXL_SECRET`, else this user's per-host secret
/// (as the `tcp` backend's defaults).
pub(crate) fn auth() -> Auth {
    Auth::from_settings(None, None, false)
}

/// A checkpoint served from this process's memory; dropping it stops serving it.
#[derive(Debug)]
pub struct Served {
    // Field order: the control registration goes before its buffer, the artifact files'
    // before theirs.
    ctrl_reg: Option<Registration>,
    ctrl: Vec<u8>,
    files_reg: Option<Registration>,
    _files: Vec<(u32, Vec<u8>)>,
    restored: Restored,
    manifest: Manifest,
    name: String,
    agent: String,
}

impl Served {
    /// The name restorers ask for (`nixl://HOST:PORT/NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The checkpoint's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The control region peers find the checkpoint by.
    pub fn control_region(&self) -> Desc {
        Desc::new(self.ctrl.as_ptr() as u64, self.ctrl.len() as u64, 0)
    }

    /// The regions, where they live in this process.
    pub fn restored(&self) -> &Restored {
        &self.restored
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(self.ctrl_reg.take());
        drop(self.files_reg.take());
        unlist(&self.agent, &self.name);
    }
}

/// Loads the checkpoint at `uri` into memory registered with `agent` (every byte verified) and
/// publishes it for peers that reach `agent` (its `tcp` backend) to restore from, under the
/// name [`default_name`] gives. VRAM regions are not served (the error says so).
pub fn serve(agent: &Agent, uri: &str) -> Result<Served> {
    serve_named(agent, uri, &default_name(uri))
}

/// [`serve`] under `name` ([`check_name`]): restorers find it at `nixl://HOST:PORT/NAME`, or
/// without the name while it is the only checkpoint `agent` serves. Serving several
/// checkpoints from one agent is several calls with different names (the same name twice is
/// refused while the first is served).
pub fn serve_named(agent: &Agent, uri: &str, name: &str) -> Result<Served> {
    check_name(name).map_err(CkptError::InvalidArgument)?;
    {
        let mut names = SERVED.lock();
        let key = (agent.name().to_owned(), name.to_owned());
        if names.contains(&key) {
            return Err(CkptError::InvalidArgument(format!(
                "agent '{}' already serves a checkpoint named {name:?}",
                agent.name()
            )));
        }
        names.push(key);
    }
    let r = serve_as(agent, uri, name);
    if r.is_err() {
        unlist(agent.name(), name);
    }
    r
}

/// `(agent, name)` of every checkpoint served from this process.
static SERVED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn unlist(agent: &str, name: &str) {
    SERVED.lock().retain(|(a, n)| !(a == agent && n == name));
}

fn serve_as(agent: &Agent, uri: &str, name: &str) -> Result<Served> {
    let src = crate::dir::Opened::open(agent, uri)?;
    let files = crate::fetch::artifact_file_bytes(agent, &src)?;
    let m = src.manifest;
    if let Some(e) = m.regions.iter().find(|e| e.kind != MemKind::Dram) {
        return Err(CkptError::Unsupported(format!(
            "region {:?} is {}: only DRAM regions are served to peers",
            e.name, e.kind
        )));
    }
    let restored = restore_mapped(agent, uri, None, Placement::Anywhere)?;
    let mut at = Vec::with_capacity(m.regions.len());
    for e in &m.regions {
        let r = restored.region(&e.name).ok_or_else(|| {
            CkptError::InvalidArgument(format!("region {:?} was not restored", e.name))
        })?;
        at.push(Desc::new(r.addr, r.len, 0));
    }
    let table: Vec<(u32, Desc)> = files
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(i, b)| (*i, Desc::new(b.as_ptr() as u64, b.len() as u64, 0)))
        .collect();
    let files_reg = if table.is_empty() {
        None
    } else {
        let list =
            DescList::from_descs(MemKind::Dram, table.iter().map(|t| t.1).collect::<Vec<_>>())
                .map_err(|e| CkptError::agent("artifact data files", e))?;
        // SAFETY: the buffers are owned by the `Served` the registration goes into, never
        // resized, and dropped after the registration (its Drop deregisters first).
        Some(
            unsafe { agent.register(&list) }
                .map_err(|e| CkptError::agent("register the artifact data files", e))?,
        )
    };
    let ctrl = control_bytes(&m, &at, name, &table);
    let desc = Desc::new(ctrl.as_ptr() as u64, ctrl.len() as u64, 0);
    let list = DescList::from_descs(MemKind::Dram, vec![desc])
        .map_err(|e| CkptError::agent("control region", e))?;
    // SAFETY: `ctrl` is owned by the `Served` the registration goes into, never resized, and
    // dropped after the registration (its Drop deregisters first).
    let reg = unsafe { agent.register(&list) }
        .map_err(|e| CkptError::agent("register the control region", e))?;
    Ok(Served {
        ctrl_reg: Some(reg),
        ctrl,
        files_reg,
        _files: files,
        restored,
        manifest: m,
        name: name.to_owned(),
        agent: agent.name().to_owned(),
    })
}

/// The control region of `m` whose regions are served at `at` (manifest order): the header
/// page, then the manifest and the table.
pub(crate) fn control_bytes(
    m: &Manifest,
    at: &[Desc],
    name: &str,
    files: &[(u32, Desc)],
) -> Vec<u8> {
    let mut body = m.encode();
    let manifest_len = body.len() as u64;
    for d in at {
        body.extend_from_slice(&d.addr.to_le_bytes());
        body.extend_from_slice(&d.len.to_le_bytes());
    }
    let mut ctrl = vec![0u8; HEADER as usize];
    ctrl[..8].copy_from_slice(&MAGIC);
    ctrl[8..12].copy_from_slice(&VERSION.to_le_bytes());
    ctrl[12..16].copy_from_slice(&(m.regions.len() as u32).to_le_bytes());
    ctrl[16..24].copy_from_slice(&manifest_len.to_le_bytes());
    ctrl[24..32].copy_from_slice(&xxh3_64(&body).to_le_bytes());
    // Names are checked (at most MAX_NAME bytes) before they get here.
    let nb = &name.as_bytes()[..name.len().min(MAX_NAME)];
    ctrl[32..34].copy_from_slice(&(nb.len() as u16).to_le_bytes());
    ctrl[34..34 + nb.len()].copy_from_slice(nb);
    let mut table = Vec::with_capacity(24 * files.len());
    for (i, d) in files {
        table.extend_from_slice(&u64::from(*i).to_le_bytes());
        table.extend_from_slice(&d.addr.to_le_bytes());
        table.extend_from_slice(&d.len.to_le_bytes());
    }
    ctrl[168..172].copy_from_slice(&(files.len() as u32).to_le_bytes());
    ctrl[176..184].copy_from_slice(&xxh3_64(&table).to_le_bytes());
    ctrl.extend_from_slice(&body);
    ctrl.extend_from_slice(&table);
    ctrl
}

/// A peer serving a checkpoint, as found by [`open`].
pub(crate) struct PeerCkpt {
    pub agent: String,
    pub manifest: Manifest,
    /// Where each region of the manifest lives in the peer, in manifest order.
    pub served: Vec<Desc>,
    /// Where the artifact data files live in the peer: `(index in the manifest's files, where)`.
    pub files: Vec<(u32, Desc)>,
}

/// READs data file `i` of the peer's checkpoint (an artifact's) into registered local memory
/// `mem` (its length), in requests of at most [`BATCH_BYTES`].
pub(crate) fn read_file(agent: &Agent, p: &PeerCkpt, i: u32, mem: Desc) -> Result<()> {
    let at = p
        .files
        .iter()
        .find(|f| f.0 == i)
        .map(|f| f.1)
        .ok_or_else(|| {
            CkptError::Manifest(format!(
                "the peer does not serve data file {i} (an artifact's)"
            ))
        })?;
    if at.len != mem.len {
        return Err(CkptError::Manifest(format!(
            "the peer serves data file {i} with {} bytes, {} expected",
            at.len, mem.len
        )));
    }
    let mut off = 0;
    while off < mem.len {
        let n = (mem.len - off).min(BATCH_BYTES);
        read(
            agent,
            &p.agent,
            vec![Desc::new(mem.addr + off, n, 0)],
            vec![Desc::new(at.addr + off, n, 0)],
        )
        .map_err(|e| CkptError::agent(format!("READ of data file {i}"), e))?;
        off += n;
    }
    Ok(())
}

/// READs `len` bytes of peer memory at `remote` into registered local memory at `local`.
fn read(agent: &Agent, peer: &str, local: Vec<Desc>, remote: Vec<Desc>) -> nixl_core::Result<()> {
    let l = DescList::from_descs(MemKind::Dram, local)?;
    let r = DescList::from_descs(MemKind::Dram, remote)?;
    let x = agent.post_read(&l, &r, peer, PEER_TIMEOUT)?;
    x.wait_blocking(Some(PEER_TIMEOUT + Duration::from_secs(1)))
        .into_result()
}

/// A buffer registered with the agent for the length of one READ.
fn read_buf(agent: &Agent, peer: &str, remote: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let d = Desc::from_mut_slice(&mut buf);
    let list = DescList::from_descs(MemKind::Dram, vec![d])
        .map_err(|e| CkptError::agent(what.to_owned(), e))?;
    // SAFETY: `buf` outlives the registration (dropped at the end of this function, after the
    // READ has ended) and is not touched meanwhile.
    let reg = unsafe { agent.register(&list) }.map_err(|e| CkptError::agent(what.to_owned(), e))?;
    read(agent, peer, vec![d], vec![Desc::new(remote, len, 0)])
        .map_err(|e| CkptError::agent(what.to_owned(), e))?;
    drop(reg);
    Ok(buf)
}

/// Finds the checkpoint served at `addr` (`HOST:PORT`) under `name` (the only one there when
/// `None`) and reads its manifest.
pub(crate) fn open(agent: &Agent, addr: &str, name: Option<&str>, auth: &Auth) -> Result<PeerCkpt> {
    let bytes = fetch_metadata(addr, auth, PEER_TIMEOUT)
        .map_err(|e| CkptError::agent(format!("metadata of the peer {addr}"), e))?;
    let md = AgentMetadata::decode(&bytes)
        .map_err(|e| CkptError::Manifest(format!("metadata of the peer {addr}: {e}")))?;
    let peer = agent
        .load_remote_md(md.clone())
        .map_err(|e| CkptError::agent(format!("loading the metadata of {addr}"), e))?;
    let registered: Vec<Desc> = md
        .regions
        .iter()
        .filter(|r| r.kind == MemKind::Dram)
        .map(|r| r.desc)
        .collect();
    // The names of the control regions passed over (another name, or a second one).
    let mut others: Vec<String> = Vec::new();
    let mut found: Option<(String, PeerCkpt)> = None;
    for r in registered.iter().take(MAX_PROBED_REGIONS) {
        if r.len < HEADER {
            continue;
        }
        let head = read_buf(agent, &peer, r.addr, HEADER, &format!("header from {addr}"))?;
        if head[..8] != MAGIC {
            continue;
        }
        let bad = |why: String| CkptError::Manifest(format!("control region of {addr}: {why}"));
        let nlen = u16::from_le_bytes([head[32], head[33]]) as usize;
        let here = if nlen == 0 {
            String::new()
        } else {
            let n = std::str::from_utf8(&head[34..34 + nlen.min(MAX_NAME)])
                .ok()
                .filter(|n| nlen <= MAX_NAME && check_name(n).is_ok())
                .ok_or_else(|| bad(format!("a name of {nlen} bytes that is not a name")))?;
            n.to_owned()
        };
        if name.is_some_and(|n| n != here) || found.is_some() {
            others.push(here);
            continue;
        }
        let p = read_control(agent, addr, &peer, &registered, r, &head)?;
        found = Some((here, p));
    }
    let listed = |v: &[String]| {
        v.iter()
            .map(|n| {
                if n.is_empty() {
                    "(unnamed)"
                } else {
                    n.as_str()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (found, name) {
        (Some((here, _)), None) if !others.is_empty() => Err(CkptError::InvalidArgument(format!(
            "nixl://{addr} serves several checkpoints ({}, {}): name one, nixl://{addr}/NAME",
            listed(std::slice::from_ref(&here)),
            listed(&others)
        ))),
        (Some((_, p)), _) => Ok(p),
        (None, Some(n)) if !others.is_empty() => Err(CkptError::NoCheckpoint {
            location: format!("nixl://{addr}/{n}"),
            reason: format!(
                "the agent there ({}) serves no checkpoint named {n:?} (it serves: {})",
                md.name,
                listed(&others)
            ),
        }),
        (None, _) => Err(CkptError::NoCheckpoint {
            location: format!("nixl://{addr}"),
            reason: format!(
                "the agent there ({}) registers no control region of a served checkpoint",
                md.name
            ),
        }),
    }
}

/// Reads and checks the control region `r` of the peer whose header page is `head`.
fn read_control(
    agent: &Agent,
    addr: &str,
    peer: &str,
    registered: &[Desc],
    r: &Desc,
    head: &[u8],
) -> Result<PeerCkpt> {
    {
        let u32_at =
            |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let bad = |why: String| CkptError::Manifest(format!("control region of {addr}: {why}"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        let n = u32_at(12) as usize;
        let mlen = u64_at(16);
        if n > MAX_REGIONS || mlen > MAX_MANIFEST_BYTES as u64 {
            return Err(bad(format!(
                "{n} regions, a manifest of {mlen} bytes: over the limits"
            )));
        }
        let k = u32_at(168) as usize;
        if k > MAX_FILES {
            return Err(bad(format!("{k} artifact data files: over the limit")));
        }
        let body_len = mlen + 16 * n as u64;
        let all_len = body_len + 24 * k as u64;
        if HEADER + all_len > r.len {
            return Err(bad(format!(
                "{all_len} bytes after the header, and the region holds {}",
                r.len
            )));
        }
        let all = read_buf(
            agent,
            peer,
            r.addr + HEADER,
            all_len,
            &format!("manifest from {addr}"),
        )?;
        let (body, table) = all.split_at(body_len as usize);
        if xxh3_64(table) != u64_at(176) {
            return Err(bad(
                "the file table does not match the digest in the header".into(),
            ));
        }
        if xxh3_64(body) != u64_at(24) {
            return Err(bad(
                "the manifest does not match the digest in the header".into()
            ));
        }
        let manifest = Manifest::decode(&body[..mlen as usize])?;
        if manifest.regions.len() != n {
            return Err(bad(format!(
                "a table of {n} regions for a manifest of {}",
                manifest.regions.len()
            )));
        }
        let mut served = Vec::with_capacity(n);
        for (i, e) in manifest.regions.iter().enumerate() {
            let o = mlen as usize + 16 * i;
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            let mut l = [0u8; 8];
            l.copy_from_slice(&body[o + 8..o + 16]);
            let d = Desc::new(u64::from_le_bytes(a), u64::from_le_bytes(l), 0);
            check_served(registered, e, d).map_err(bad)?;
            served.push(d);
        }
        let mut files: Vec<(u32, Desc)> = Vec::with_capacity(k);
        for t in table.chunks_exact(24) {
            let word = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&t[o..o + 8]);
                u64::from_le_bytes(b)
            };
            let (i, d) = (word(0), Desc::new(word(8), word(16), 0));
            let f = usize::try_from(i)
                .ok()
                .and_then(|i| manifest.files.get(i))
                .ok_or_else(|| bad(format!("the file table names data file {i}, not listed")))?;
            let what = RegionEntry {
                name: format!("data file {i}"),
                kind: MemKind::Dram,
                dev_id: 0,
                addr: 0,
                len: f.size,
                chunks: Vec::new(),
            };
            check_served(registered, &what, d).map_err(bad)?;
            if files.iter().any(|x| u64::from(x.0) == i) {
                return Err(bad(format!("data file {i} is in the file table twice")));
            }
            files.push((i as u32, d));
        }
        Ok(PeerCkpt {
            agent: peer.to_owned(),
            manifest,
            served,
            files,
        })
    }
}

/// Whether the served copy `d` of `e` has its length and lies inside a registered region.
fn check_served(registered: &[Desc], e: &RegionEntry, d: Desc) -> std::result::Result<(), String> {
    if d.len != e.len {
        return Err(format!(
            "region {:?} served with {} bytes, the manifest says {}",
            e.name, d.len, e.len
        ));
    }
    let end = d.addr.checked_add(d.len);
    let inside = registered
        .iter()
        .any(|r| r.addr <= d.addr && end.is_some_and(|x| x <= r.addr.saturating_add(r.len)));
    if !inside {
        return Err(format!(
            "region {:?} served at {:#x}+{}, outside what the peer registered",
            e.name, d.addr, d.len
        ));
    }
    Ok(())
}

/// Most bytes of one READ request of a restore (whole chunks; at least one).
pub const BATCH_BYTES: u64 = 32 << 20;
/// READ requests of a restore in flight at once (the backend queues them on its connections in
/// order, so its pipeline never runs dry between them).
pub const BATCHES_IN_FLIGHT: usize = 8;

/// READs the chunks of `chosen` from the peer into the caller's regions and hashes each as soon
/// as it has landed, while later ones still travel; returns the chunks read,
/// `(index in chosen, chunk, addr, len)`, and their xxh3, for the caller to compare with the
/// manifest.
///
/// The chunks go in requests of at most [`BATCH_BYTES`] (a 16th of the restore when that is
/// less, whole chunks), at most [`BATCHES_IN_FLIGHT`] posted at
/// once (each with its own deadline, so a restore of any size fits the per-request bound), and
/// hashing threads follow the requests as they complete: the verification costs the hash of
/// the last request after the last byte, not a pass over everything.
///
/// # Safety
/// As [`crate::restore`].
pub(crate) unsafe fn read_regions(
    agent: &Agent,
    p: &PeerCkpt,
    chosen: &[Pick],
    opts: &RestoreOptions,
) -> Result<(Vec<ChunkAt>, Vec<u64>)> {
    let cs = p.manifest.chunk_size;
    let mut local = Vec::new();
    let mut remote = Vec::new();
    let mut chunks = Vec::new();
    for (ri, pk) in chosen.iter().enumerate() {
        let e = pk.entry;
        let i = p
            .manifest
            .regions
            .iter()
            .position(|x| x.name == e.name)
            .ok_or_else(|| {
                CkptError::Manifest(format!("region {:?} changed on the peer", e.name))
            })?;
        for (ci, c) in pk.each() {
            let at = pk.addr(ci, cs);
            local.push(Desc::new(at, c.len, 0));
            remote.push(Desc::new(p.served[i].addr + ci as u64 * cs, c.len, 0));
            chunks.push((ri, ci, at, c.len));
        }
    }
    // At most BATCH_BYTES a request, and at least 16 requests where the chunks allow, so that
    // hashing follows the data closely in small restores too.
    let all: u64 = chunks.iter().map(|c| c.3).sum();
    let per = ((all / 16).min(BATCH_BYTES) / cs.max(1)).max(1) as usize;
    let batches: Vec<Range<usize>> = (0..chunks.len())
        .step_by(per)
        .map(|a| a..(a + per).min(chunks.len()))
        .collect();
    let total: u64 = chunks.iter().map(|c| c.3).sum();
    let failed =
        |e: String| Pick::read_failed(chosen, format!("reading from the peer failed: {e}"));
    let post = |b: &Range<usize>| -> nixl_core::Result<XferRequest> {
        let l = DescList::from_descs(MemKind::Dram, local[b.clone()].to_vec())?;
        let r = DescList::from_descs(MemKind::Dram, remote[b.clone()].to_vec())?;
        agent.post_read(&l, &r, &p.agent, PEER_TIMEOUT)
    };
    let hashes: Vec<AtomicU64> = chunks.iter().map(|_| AtomicU64::new(0)).collect();
    // Chunks below `landed` are in memory; `stop` ends the hashing threads early.
    let landed = Mutex::new((0usize, false));
    let cv = Condvar::new();
    let next = AtomicUsize::new(0);
    let hashed = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(chunks.len().max(1));
    let progress = opts.progress.as_ref();
    let outcome = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(_, _, addr, len)) = chunks.get(k) else {
                    return;
                };
                {
                    let mut g = landed.lock();
                    while g.0 <= k && !g.1 {
                        cv.wait(&mut g);
                    }
                    if g.0 <= k {
                        return;
                    }
                }
                // SAFETY: the chunk lies in the caller's region (valid for the call, per the
                // caller's contract) and the request that wrote it has ended; no request
                // writes it again.
                let bytes =
                    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len as usize) };
                hashes[k].store(xxh3_64(bytes), Ordering::Relaxed);
                let d = hashed.fetch_add(len, Ordering::Relaxed) + len;
                if let Some(pr) = progress {
                    pr("verify", d, total);
                }
            });
        }
        let stop = |r: Result<()>| {
            landed.lock().1 = true;
            cv.notify_all();
            r
        };
        // Requests in flight, oldest first; dropping it releases (cancels) what is left.
        let mut inflight = Posted(std::collections::VecDeque::new());
        let mut posted = 0;
        let mut read = 0u64;
        for (bi, b) in batches.iter().enumerate() {
            while posted < batches.len() && posted < bi + BATCHES_IN_FLIGHT {
                match post(&batches[posted]) {
                    Ok(x) => inflight.0.push_back(x),
                    Err(e) => return stop(Err(failed(e.to_string()))),
                }
                posted += 1;
            }
            let Some(x) = inflight.0.pop_front() else {
                return stop(Err(failed("a request went missing".into())));
            };
            let r = x
                .wait_blocking(Some(PEER_TIMEOUT + Duration::from_secs(1)))
                .into_result();
            x.release();
            if let Err(e) = r {
                return stop(Err(failed(e.to_string())));
            }
            read += chunks[b.clone()].iter().map(|c| c.3).sum::<u64>();
            if let Some(pr) = progress {
                pr("read", read, total);
            }
            landed.lock().0 = b.end;
            cv.notify_all();
        }
        Ok(())
    });
    outcome?;
    Ok((
        chunks,
        hashes.into_iter().map(AtomicU64::into_inner).collect(),
    ))
}

/// Posted requests: dropping them releases (cancels) what is still in flight and waits until
/// no backend touches the memory any more.
struct Posted(std::collections::VecDeque<XferRequest>);

impl Drop for Posted {
    fn drop(&mut self) {
        for r in &self.0 {
            r.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_regions_must_match_and_lie_inside_registrations() {
        let e = RegionEntry {
            name: "w".into(),
            kind: MemKind::Dram,
            dev_id: 0,
            addr: 0x1000,
            len: 100,
            chunks: Vec::new(),
        };
        let regs = [Desc::new(0x10_000, 4096, 0)];
        assert!(check_served(&regs, &e, Desc::new(0x10_000, 100, 0)).is_ok());
        assert!(check_served(&regs, &e, Desc::new(0x10_000 + 3996, 100, 0)).is_ok());
        let err = check_served(&regs, &e, Desc::new(0x10_000 + 3997, 100, 0)).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        let err = check_served(&regs, &e, Desc::new(0x10_000, 99, 0)).unwrap_err();
        assert!(err.contains("99 bytes"), "{err}");
        assert!(check_served(&regs, &e, Desc::new(u64::MAX - 10, 100, 0)).is_err());
    }
}
