//! The replica side: find sources, pull every chunk with one-sided READs spread over all live
//! sources, verify each chunk, write each verified chunk once, fall back to storage for chunks
//! no live source can give.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentMetadata, Desc, DescList, MemKind, Registration, XferOp, XferOptions, XferRequest,
};
use nixl_transports::tcp::{fetch_metadata, Auth};
use parking_lot::{Condvar, Mutex, RwLock};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, xxh3_64_with_seed};

use crate::error::{Error, Result};
use crate::manifest::{check_file_tensors, Chunk, Manifest};
use crate::mem::HostMem;
use crate::publish::{register, Header, Published, ABSENT, FETCHING, HAVE, HEADER};

/// Bad chunks after which a source is dropped.
pub const MAX_BAD_CHUNKS: u32 = 2;
/// Regions of a source whose first page is read to find a model's header.
pub const MAX_PROBED_REGIONS: usize = 64;
/// READs failed in a row after which a source is dropped (a dead source fails them at once; a
/// congested one may time out once and then go on).
pub const MAX_FAILED_READS: u32 = 3;

/// How often a pull reads the have bytes of the replicas it pulls from: the staler they are,
/// the more chunks two replicas fetch from an origin at once.
pub const HAVE_REFRESH: Duration = Duration::from_millis(100);

/// What a pull knows of the serving replicas, as of the last have-byte refresh.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    /// Per chunk, the serving replicas (live, no bad chunk so far; origins not counted) that
    /// hold it or are fetching it.
    pub(crate) holders: Vec<u16>,
    /// Per chunk, the replica (of this one and the serving replicas it knows, by rendezvous
    /// hashing on agent names; as [`salt`] of its name) that takes it from an origin: replicas
    /// that know each other agree on one taker per chunk without talking, so that an origin
    /// sends each chunk about once and the replicas spread it.
    pub(crate) owner: Vec<u64>,
    /// This replica's [`salt`].
    pub(crate) me: u64,
}

/// A replica's own pseudo-random order of the chunks (by agent name).
pub(crate) fn salt(agent_name: &str) -> u64 {
    xxh3_64(agent_name.as_bytes())
}

/// Where chunk `c` comes in the order of the replica with salt `s` (smaller first).
fn rank(c: usize, s: u64) -> u64 {
    xxh3_64_with_seed(&(c as u64).to_le_bytes(), s)
}

impl View {
    /// The view of `me` among `replicas` (agent names and have bytes).
    pub(crate) fn new(me: &str, replicas: &[(&str, &[u8])], chunks: usize) -> View {
        let mut holders = vec![0u16; chunks];
        for (_, have) in replicas {
            for (h, &b) in holders.iter_mut().zip(have.iter()) {
                if b != ABSENT {
                    *h = h.saturating_add(1);
                }
            }
        }
        let score =
            |name: &str, c: usize| (xxh3_64_with_seed(name.as_bytes(), c as u64), salt(name));
        let owner = (0..chunks)
            .map(|c| {
                std::iter::once(me)
                    .chain(replicas.iter().map(|(n, _)| *n))
                    .map(|n| score(n, c))
                    .max()
                    .map_or(0, |(_, s)| s)
            })
            .collect();
        View {
            holders,
            owner,
            me: salt(me),
        }
    }
}

/// Which kind of source a chunk is picked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum From {
    /// A replica serving what it pulled.
    Replica,
    /// An origin (complete from the start).
    Origin,
    /// An origin, after this replica's origin streams have found nothing to take for
    /// [`ENDGAME_PATIENCE`]: it helps even with another replica's last few chunks.
    OriginImpatient,
}

/// A replica leaves to their owner the last this many unheld chunks it owns (the owner's own
/// origin streams take them next; a helper would only send them twice over the origin's link,
/// which the owner has to itself by then) unless it has waited [`ENDGAME_PATIENCE`].
pub const ENDGAME_LEFT: usize = 2;

/// How long a replica's origin streams wait with nothing to take before they help with the
/// last chunks of another replica (one that is stuck or gone without being dropped yet).
pub const ENDGAME_PATIENCE: Duration = Duration::from_millis(1500);

/// The chunk to read next from one source, among `candidates` (pending here, held by that
/// source).
///
/// From a replica: the one the fewest serving replicas hold or are fetching, so that rare
/// chunks spread first and each replica soon holds something the others lack.
///
/// From an origin: only chunks no replica holds or fetches (the origin's link carries what
/// nobody else can serve); this replica's own ([`View::owner`]) first. With none of its own
/// left it helps the replica with the most left (one whose link to the origin is slower, or a
/// stuck one), taking from the back of that replica's order (the chunks it would take last,
/// so the two rarely take the same one), at an offset of its own (so that two helpers rarely
/// do either); but not with that replica's last [`ENDGAME_LEFT`] chunks (its own streams take
/// them next, with the origin's link to themselves by then: a helper would have the origin send
/// them twice), unless this replica's origin streams have waited [`ENDGAME_PATIENCE`]
/// (`From::OriginImpatient`: the owner may be stuck).
///
/// Ties go by this replica's own pseudo-random order, so that replicas picking at once from
/// stale have bytes rarely pick the same chunk (as they did sweeping forward from different
/// starts, each catching up with the next).
pub(crate) fn rarest(
    candidates: impl IntoIterator<Item = usize>,
    view: &View,
    from: From,
) -> Option<usize> {
    let held = |c: usize| view.holders.get(c).copied().unwrap_or(0);
    let owner = |c: usize| view.owner.get(c).copied().unwrap_or(view.me);
    let candidates = candidates.into_iter();
    if from == From::Replica {
        return candidates.min_by_key(|&c| (held(c), rank(c, view.me)));
    }
    let unheld: Vec<usize> = candidates.filter(|&c| held(c) == 0).collect();
    let own = unheld.iter().copied().filter(|&c| owner(c) == view.me);
    if let Some(c) = own.min_by_key(|&c| rank(c, view.me)) {
        return Some(c);
    }
    let mut left: BTreeMap<u64, usize> = BTreeMap::new();
    for &c in &unheld {
        *left.entry(owner(c)).or_default() += 1;
    }
    let (&behind, &n) = left.iter().max_by_key(|&(&o, &n)| (n, o))?;
    if n <= ENDGAME_LEFT && from == From::Origin {
        return None;
    }
    let mut theirs: Vec<usize> = unheld.into_iter().filter(|&c| owner(c) == behind).collect();
    theirs.sort_by_key(|&c| std::cmp::Reverse(rank(c, behind)));
    let k = rank(behind as usize, view.me) as usize
        % if n <= ENDGAME_LEFT {
            theirs.len()
        } else {
            (theirs.len() / 2).max(1)
        };
    theirs.get(k).copied()
}

/// Have-byte READs a refresh keeps in flight at once (its scratch buffer holds this many).
pub const REFRESH_BATCH: usize = 16;

/// Where chunks come from when no live source has them.
#[derive(Clone, Debug)]
pub enum Fallback {
    /// A local copy of the model directory.
    Dir(PathBuf),
    /// The model's files as objects `PREFIX<file name>` in an S3-compatible bucket, read with
    /// ranged GETs through the agent's `object` backend (endpoint and credentials from its
    /// `[object]` configuration or the `AWS_*` environment).
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix (empty, or ending in `/`).
        prefix: String,
    },
}

/// Object ids this crate names for an S3 fallback: `OBJECT_ID_BASE + file index`.
pub const OBJECT_ID_BASE: u64 = 0x5757_0000_0000;

impl Fallback {
    /// `s3://bucket/prefix` or a directory path.
    pub fn parse(s: &str) -> Result<Fallback> {
        match s.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(Error::Invalid(format!("{s}: no bucket")));
                }
                let mut prefix = prefix.to_owned();
                if !prefix.is_empty() && !prefix.ends_with('/') {
                    prefix.push('/');
                }
                Ok(Fallback::S3 {
                    bucket: bucket.to_owned(),
                    prefix,
                })
            }
            None => Ok(Fallback::Dir(PathBuf::from(s))),
        }
    }
}

/// How to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Model name.
    pub name: String,
    /// Source addresses (`HOST:PORT` of their tcp listeners).
    pub sources: Vec<String>,
    /// Storage fallback.
    pub fallback: Option<Fallback>,
    /// Become a source while pulling (each chunk served once verified).
    pub serve: bool,
    /// READs in flight per source.
    pub streams_per_source: usize,
    /// READs in flight per origin (a source complete from the start), at most
    /// `streams_per_source`: N replicas that start at once queue at most this times N READs on
    /// the origin's link, so none waits there past the tcp backend's no-progress timeout (a
    /// timed-out READ is sent again), and the replicas serve each other the rest.
    pub origin_streams: usize,
    /// One bounded attempt to reach a source (metadata and header).
    pub connect_timeout: Duration,
    /// Longest a chunk READ may take before its source is taken for dead.
    pub chunk_timeout: Duration,
    /// Longest the pull may go without progress before it gives up.
    pub stall_timeout: Duration,
    /// Progress line on stderr.
    pub progress: bool,
    /// The manifest to pull by when no source answers (as a pull leaves it beside the files,
    /// [`crate::MANIFEST_FILE`]): needed with an S3 fallback alone.
    pub manifest: Option<PathBuf>,
    /// Test-only fault hook: sources (by address, as given in `sources`) read from only once
    /// every other source has been dropped, so a test decides which source serves first
    /// instead of the machine's load deciding it.
    pub fault_hold_back: Vec<String>,
}

impl PullOptions {
    /// Defaults for `name`.
    pub fn new(name: impl Into<String>) -> PullOptions {
        PullOptions {
            name: name.into(),
            sources: Vec::new(),
            fallback: None,
            serve: false,
            streams_per_source: 1,
            origin_streams: 1,
            connect_timeout: Duration::from_secs(3),
            chunk_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            progress: false,
            manifest: None,
            fault_hold_back: Vec::new(),
        }
    }
}

/// What a pull did.
#[derive(Clone, Debug, Default)]
pub struct PullReport {
    /// Model id (`name@digest`).
    pub model_id: String,
    /// Bytes of the model.
    pub bytes: u64,
    /// Wall time of the transfer phase.
    pub seconds: f64,
    /// Bytes taken from each source (by address).
    pub sources: BTreeMap<String, u64>,
    /// Bytes read from the fallback.
    pub fallback_bytes: u64,
    /// Every chunk verified (always true in a report: a pull that cannot verify fails).
    pub verified: bool,
    /// Chunks that failed their checksum (and were fetched again elsewhere).
    pub corrupt_chunks: u64,
    /// Sources dropped during the pull, with the reason.
    pub dropped: Vec<String>,
    /// Sources skipped at the start (unreachable, or not serving this model), with the reason.
    pub skipped: Vec<String>,
    /// Chunk writes to the output files (equals the chunk count: nothing is written twice).
    pub chunks_written: u64,
}

/// A source that answered: its agent, its control and data regions, its manifest.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) label: String,
    pub(crate) agent_name: String,
    pub(crate) ctrl: Desc,
    pub(crate) header: Header,
    pub(crate) manifest: Arc<Manifest>,
}

/// A registered scratch buffer (the registration is dropped before the memory).
struct Scratch {
    reg: Option<Registration>,
    mem: Arc<HostMem>,
}

impl Scratch {
    fn new(agent: &Agent, len: u64) -> Result<Scratch> {
        let mem = Arc::new(HostMem::new(len as usize)?);
        let reg = register(agent, &mem)?;
        Ok(Scratch {
            reg: Some(reg),
            mem,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        drop(self.reg.take());
    }
}

/// READs `len` bytes of peer memory at `remote` into `local` at `off`.
fn read_remote(
    agent: &Agent,
    peer: &str,
    local: &HostMem,
    off: u64,
    remote: u64,
    len: u64,
    timeout: Duration,
) -> nixl_core::Result<()> {
    let x = post_read(agent, peer, local, off, remote, len, timeout)?;
    x.wait_blocking(Some(timeout + Duration::from_secs(1)))
        .into_result()
}

/// Posts the READ of [`read_remote`] and returns it in flight.
fn post_read(
    agent: &Agent,
    peer: &str,
    local: &HostMem,
    off: u64,
    remote: u64,
    len: u64,
    timeout: Duration,
) -> nixl_core::Result<XferRequest> {
    let l = DescList::from_descs(MemKind::Dram, vec![Desc::new(local.addr() + off, len, 0)])?;
    let r = DescList::from_descs(MemKind::Dram, vec![Desc::new(remote, len, 0)])?;
    let x = agent.create_xfer(
        XferOp::Read,
        &l,
        &r,
        peer,
        XferOptions {
            deadline: Some(timeout),
            ..Default::default()
        },
    )?;
    x.post()?;
    Ok(x)
}

/// One bounded attempt to reach a source at `addr` and read its description of `name`.
fn probe(agent: &Agent, auth: &Auth, addr: &str, name: &str, t: Duration) -> Result<Peer> {
    let md_bytes =
        fetch_metadata(addr, auth, t).map_err(|e| Error::core(format!("metadata of {addr}"), e))?;
    probe_loaded(agent, &md_bytes, addr, name, t)
}

/// Loads a source's metadata (from its listener or from etcd), then reads its control region's
/// header and manifest: one bounded attempt.
pub(crate) fn probe_loaded(
    agent: &Agent,
    md_bytes: &[u8],
    addr: &str,
    name: &str,
    t: Duration,
) -> Result<Peer> {
    let md = AgentMetadata::decode(md_bytes)
        .map_err(|e| Error::Invalid(format!("metadata of {addr}: {e}")))?;
    let peer = agent
        .load_remote_md(md.clone())
        .map_err(|e| Error::core(format!("loading metadata of {addr}"), e))?;
    let page = Scratch::new(agent, HEADER)?;
    // A source registers two regions per model it serves: a peer listing thousands costs one
    // bounded READ each, up to this many.
    for r in md
        .regions
        .iter()
        .filter(|r| r.kind == MemKind::Dram)
        .take(MAX_PROBED_REGIONS)
    {
        if r.desc.len < HEADER {
            continue;
        }
        read_remote(agent, &peer, &page.mem, 0, r.desc.addr, HEADER, t)
            .map_err(|e| Error::core(format!("reading a header from {addr}"), e))?;
        // SAFETY: the READ into the page has ended; nothing else writes it.
        let bytes = unsafe { page.mem.slice(0, HEADER)? }.to_vec();
        let Some(h) = Header::decode(&bytes) else {
            continue;
        };
        let h = h?;
        if h.name != name {
            continue;
        }
        if h.control_len() > r.desc.len {
            return Err(Error::Invalid(format!(
                "{addr}: control region of {} bytes shorter than its header says",
                r.desc.len
            )));
        }
        let ms = Scratch::new(agent, h.manifest_len.max(1))?;
        read_remote(
            agent,
            &peer,
            &ms.mem,
            0,
            r.desc.addr + HEADER,
            h.manifest_len,
            t,
        )
        .map_err(|e| Error::core(format!("reading the manifest from {addr}"), e))?;
        // SAFETY: the READ has ended; nothing else writes this scratch buffer.
        let enc = unsafe { ms.mem.slice(0, h.manifest_len)? };
        if xxh3_128(enc) != h.digest {
            return Err(Error::Invalid(format!(
                "{addr}: manifest does not match the digest in its header"
            )));
        }
        let m = Manifest::decode(enc)?;
        if m.name != name || m.chunk_count() as u64 != h.chunks {
            return Err(Error::Invalid(format!(
                "{addr}: manifest of {:?} with {} chunks under a header of {:?} with {}",
                m.name,
                m.chunk_count(),
                h.name,
                h.chunks
            )));
        }
        let (_, data_len) = m.layout();
        let data_ok = md.regions.iter().any(|x| {
            x.kind == MemKind::Dram
                && x.desc.addr == h.data.addr
                && x.desc.len == h.data.len
                && x.desc.len >= data_len
        });
        if !data_ok {
            return Err(Error::Invalid(format!(
                "{addr}: the data region its header names is not registered or too short"
            )));
        }
        return Ok(Peer {
            label: addr.to_owned(),
            agent_name: peer,
            ctrl: r.desc,
            header: h,
            manifest: Arc::new(m),
        });
    }
    Err(Error::Invalid(format!(
        "{addr} does not serve a model named {name:?}"
    )))
}

/// The sources of `name` at `sources` and in etcd: one bounded attempt each; the failures as
/// "skipped" lines.
pub(crate) fn discover_all(
    agent: &Agent,
    auth: &Auth,
    etcd: Option<&nixl_discovery::EtcdConfig>,
    name: &str,
    sources: &[String],
    t: Duration,
) -> Result<(Vec<Peer>, Vec<String>)> {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for addr in sources {
        match probe(agent, auth, addr, name, t) {
            Ok(p) => peers.push(p),
            Err(e) => {
                tracing::warn!(source = %addr, "source skipped: {e}");
                skipped.push(format!("{addr}: {e}"));
            }
        }
    }
    if let Some(cfg) = etcd {
        let reg = nixl_discovery::Registry::connect(&etcd_prefix(cfg, name))
            .map_err(|e| Error::Invalid(format!("etcd: {e}")))?;
        let (found, sk) = discover(agent, &reg, name, &[], t);
        peers.extend(found);
        skipped.extend(sk);
    }
    Ok((peers, skipped))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Pending,
    InFlight,
    Done,
}

struct SourceState {
    label: String,
    agent_name: String,
    data_addr: u64,
    ctrl: Desc,
    have_offset: u64,
    /// Each chunk's have byte as last read ([`HAVE`], [`FETCHING`] or [`ABSENT`]).
    have: Mutex<Vec<u8>>,
    complete: AtomicBool,
    /// Published complete from the start (an origin, not a replica serving what it pulled).
    origin: bool,
    alive: AtomicBool,
    bad: AtomicU32,
    failed_reads: AtomicU32,
    bytes: AtomicU64,
}

struct Board {
    st: Vec<St>,
    /// Sources (by index) whose copy of the chunk failed its checksum.
    failed_on: Vec<Vec<u16>>,
    done: usize,
    last_progress: Instant,
}

struct Run<'a> {
    agent: &'a Agent,
    chunks: Vec<Chunk>,
    sources: RwLock<Vec<Arc<SourceState>>>,
    board: Mutex<Board>,
    cv: Condvar,
    finished: AtomicBool,
    data: Arc<HostMem>,
    outs: Option<Vec<File>>,
    published: Option<&'a Published>,
    fallback: Option<Fallback>,
    manifest: Arc<Manifest>,
    fallback_bytes: AtomicU64,
    corrupt: AtomicU64,
    writes: AtomicU64,
    dropped: Mutex<Vec<String>>,
    fatal: Mutex<Option<Error>>,
    chunk_timeout: Duration,
    /// The serving replicas as of the last have-byte refresh.
    view: RwLock<View>,
    /// [`PullOptions::fault_hold_back`].
    hold_back: Vec<String>,
    /// Since when the origin streams found nothing to take ([`ENDGAME_PATIENCE`]).
    origin_idle_since: Mutex<Option<Instant>>,
}

impl Run<'_> {
    /// Whether source `s` may serve chunk `c`.
    fn src(&self, s: usize) -> Arc<SourceState> {
        Arc::clone(&self.sources.read()[s])
    }

    fn eligible(&self, b: &Board, s: usize, c: usize) -> bool {
        let src = self.src(s);
        src.alive.load(Ordering::Acquire)
            && src.have.lock().get(c) == Some(&HAVE)
            && !b.failed_on[c].contains(&(s as u16))
    }

    fn pick(&self, s: usize) -> Option<usize> {
        let mut b = self.board.lock();
        let src = self.src(s);
        let view = self.view.read();
        let c = {
            let have = src.have.lock();
            let b = &*b;
            let idle = *self.origin_idle_since.lock();
            let from = match (src.origin, idle) {
                (false, _) => From::Replica,
                (true, Some(t)) if t.elapsed() >= ENDGAME_PATIENCE => From::OriginImpatient,
                (true, _) => From::Origin,
            };
            let candidates = (0..self.chunks.len()).filter(|&c| {
                b.st[c] == St::Pending && have[c] == HAVE && !b.failed_on[c].contains(&(s as u16))
            });
            // An origin leaves to serving replicas (complete or not) the chunks they hold or
            // are fetching, so that it sends each chunk about once however many replicas pull.
            let c = rarest(candidates, &view, from);
            if src.origin {
                let mut idle = self.origin_idle_since.lock();
                match c {
                    Some(_) => *idle = None,
                    None => {
                        idle.get_or_insert_with(Instant::now);
                    }
                }
            }
            c
        }?;
        b.st[c] = St::InFlight;
        if let Some(p) = self.published {
            // Peers see it coming and wait for it here rather than ask an origin.
            let _ = p.mark(c, FETCHING);
        }
        Some(c)
    }

    fn pick_fallback(&self) -> Option<usize> {
        let mut b = self.board.lock();
        for c in 0..self.chunks.len() {
            let n = self.sources.read().len();
            if b.st[c] == St::Pending && !(0..n).any(|s| self.eligible(&b, s, c)) {
                b.st[c] = St::InFlight;
                return Some(c);
            }
        }
        None
    }

    fn requeue(&self, c: usize, bad_from: Option<usize>) {
        if let Some(p) = self.published {
            let _ = p.mark(c, ABSENT);
        }
        let mut b = self.board.lock();
        b.st[c] = St::Pending;
        if let Some(s) = bad_from {
            b.failed_on[c].push(s as u16);
        }
        drop(b);
        self.cv.notify_all();
    }

    fn drop_source(&self, s: usize, why: String) {
        let src = self.src(s);
        if src.alive.swap(false, Ordering::AcqRel) {
            tracing::warn!(source = %src.label, "source dropped: {why}");
            self.dropped.lock().push(format!("{}: {why}", src.label));
            self.cv.notify_all();
        }
    }

    /// Verifies chunk `c` (now in the data buffer) and, if good, writes it out once.
    fn accept(&self, c: usize) -> Result<bool> {
        let ch = &self.chunks[c];
        // SAFETY: chunk `c` is InFlight for this thread alone: the READ (or fallback copy) into
        // it has ended, and no other transfer targets it until it is requeued.
        let bytes = unsafe { self.data.slice(ch.data_offset, ch.len)? };
        if xxh3_64(bytes) != ch.sum {
            return Ok(false);
        }
        if let Some(outs) = &self.outs {
            outs[ch.file]
                .write_all_at(bytes, ch.file_offset)
                .map_err(|e| {
                    Error::io(format!("writing {}", self.manifest.files[ch.file].name), e)
                })?;
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = self.published {
            p.mark(c, HAVE)?;
        }
        let mut b = self.board.lock();
        debug_assert_eq!(b.st[c], St::InFlight);
        b.st[c] = St::Done;
        b.done += 1;
        b.last_progress = Instant::now();
        drop(b);
        self.cv.notify_all();
        Ok(true)
    }

    fn fail(&self, e: Error) {
        let mut f = self.fatal.lock();
        if f.is_none() {
            *f = Some(e);
        }
        self.finished.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Whether another source than `s` is still alive (for the hold-back fault hook).
    fn others_alive(&self, s: usize) -> bool {
        self.sources
            .read()
            .iter()
            .enumerate()
            .any(|(i, o)| i != s && o.alive.load(Ordering::Acquire))
    }

    fn source_worker(&self, s: usize) {
        let src = self.src(s);
        if self.hold_back.contains(&src.label) {
            while !self.finished.load(Ordering::Acquire) && self.others_alive(s) {
                let mut b = self.board.lock();
                self.cv.wait_for(&mut b, Duration::from_millis(20));
            }
            tracing::warn!(source = %src.label, "fault hook: held-back source starts");
        }
        while !self.finished.load(Ordering::Acquire) && src.alive.load(Ordering::Acquire) {
            let Some(c) = self.pick(s) else {
                let mut b = self.board.lock();
                self.cv.wait_for(&mut b, Duration::from_millis(50));
                continue;
            };
            let ch = self.chunks[c];
            let r = read_remote(
                self.agent,
                &src.agent_name,
                &self.data,
                ch.data_offset,
                src.data_addr + ch.data_offset,
                ch.len,
                self.chunk_timeout,
            );
            if let Err(e) = r {
                self.requeue(c, None);
                let n = src.failed_reads.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= MAX_FAILED_READS {
                    self.drop_source(s, format!("{n} READs failed in a row, the last: {e}"));
                    return;
                }
                tracing::info!(source = %src.label, chunk = c, "READ failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(100 * u64::from(n)));
                continue;
            }
            src.failed_reads.store(0, Ordering::Release);
            match self.accept(c) {
                Ok(true) => {
                    src.bytes.fetch_add(ch.len, Ordering::Relaxed);
                }
                Ok(false) => {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %src.label, chunk = c, "chunk failed its checksum");
                    self.requeue(c, Some(s));
                    if src.bad.fetch_add(1, Ordering::AcqRel) + 1 >= MAX_BAD_CHUNKS {
                        self.drop_source(
                            s,
                            format!("{MAX_BAD_CHUNKS} chunks failed their checksum"),
                        );
                        return;
                    }
                }
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    fn fallback_worker(&self, fb: &Fallback) {
        let mut open: BTreeMap<usize, File> = BTreeMap::new();
        while !self.finished.load(Ordering::Acquire) {
            let Some(c) = self.pick_fallback() else {
                let mut b = self.board.lock();
                self.cv.wait_for(&mut b, Duration::from_millis(50));
                continue;
            };
            let ch = self.chunks[c];
            let r = match fb {
                Fallback::Dir(dir) => {
                    let name = &self.manifest.files[ch.file].name;
                    let f = match open.entry(ch.file) {
                        std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => {
                            match File::open(dir.join(name)) {
                                Ok(f) => v.insert(f),
                                Err(e) => {
                                    self.fail(Error::io(
                                        format!("fallback {}", dir.join(name).display()),
                                        e,
                                    ));
                                    return;
                                }
                            }
                        }
                    };
                    let mut buf = vec![0u8; ch.len as usize];
                    f.read_exact_at(&mut buf, ch.file_offset)
                        .map_err(|e| Error::io(format!("fallback {}", dir.join(name).display()), e))
                        // SAFETY: chunk `c` is InFlight for this thread alone (no transfer
                        // targets it) and no reference into it is alive.
                        .and_then(|()| unsafe { self.data.write(ch.data_offset, &buf) })
                }
                Fallback::S3 { .. } => {
                    // A ranged GET straight into the data buffer, through the object backend.
                    let object = Desc::new(ch.file_offset, ch.len, OBJECT_ID_BASE + ch.file as u64);
                    let local = Desc::new(self.data.addr() + ch.data_offset, ch.len, 0);
                    (|| {
                        let x = self.agent.create_xfer(
                            XferOp::Read,
                            &DescList::from_descs(MemKind::Dram, vec![local])?,
                            &DescList::from_descs(MemKind::Object, vec![object])?,
                            self.agent.name(),
                            XferOptions {
                                deadline: Some(self.chunk_timeout),
                                ..Default::default()
                            },
                        )?;
                        x.run_blocking()
                    })()
                    .map_err(|e| {
                        Error::core(
                            format!(
                                "fallback GET of {} at {}",
                                self.manifest.files[ch.file].name, ch.file_offset
                            ),
                            e,
                        )
                    })
                }
            };
            let ok = r.and_then(|()| self.accept(c));
            match ok {
                Ok(true) => {
                    self.fallback_bytes.fetch_add(ch.len, Ordering::Relaxed);
                }
                Ok(false) => {
                    self.fail(Error::Incomplete(format!(
                        "chunk {c} of {} fails its checksum in the fallback too",
                        self.manifest.files[ch.file].name
                    )));
                    return;
                }
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Reads the have bytes of every serving replica: [`REFRESH_BATCH`] READs at once into
    /// `scratch` (that many times the chunk count), since each may wait behind chunk data on
    /// a busy link and one after another they made the view seconds old.
    fn refresh_have(&self, scratch: &HostMem) {
        let sources: Vec<Arc<SourceState>> = self
            .sources
            .read()
            .iter()
            .filter(|s| s.alive.load(Ordering::Acquire) && !s.complete.load(Ordering::Acquire))
            .cloned()
            .collect();
        let n = self.chunks.len() as u64;
        let t = Duration::from_secs(5);
        for batch in sources.chunks(REFRESH_BATCH) {
            let posted: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let at = s.ctrl.addr + s.have_offset;
                    post_read(self.agent, &s.agent_name, scratch, i as u64 * n, at, n, t)
                })
                .collect();
            for (i, (s, x)) in batch.iter().zip(posted).enumerate() {
                let r = x.and_then(|x| {
                    let r = x
                        .wait_blocking(Some(t + Duration::from_secs(1)))
                        .into_result();
                    if r.is_err() {
                        // Its slot of the scratch buffer is read again next time: nothing
                        // of this READ may land there later.
                        x.release();
                    }
                    r
                });
                if let Err(e) = r {
                    // A source that cannot tell what it holds is gone (or going): peers
                    // waiting for chunks it announced must not wait on it.
                    let i = self.sources.read().iter().position(|x| Arc::ptr_eq(x, s));
                    if let Some(i) = i {
                        self.drop_source(i, format!("reading what it holds failed: {e}"));
                    }
                    continue;
                }
                self.take_have(s, scratch, i as u64 * n);
            }
        }
        let replicas: Vec<(String, Vec<u8>)> = self
            .sources
            .read()
            .iter()
            .filter(|o| {
                !o.origin && o.alive.load(Ordering::Acquire) && o.bad.load(Ordering::Acquire) == 0
            })
            .map(|o| (o.agent_name.clone(), o.have.lock().clone()))
            .collect();
        let replicas: Vec<(&str, &[u8])> = replicas
            .iter()
            .map(|(n, h)| (n.as_str(), h.as_slice()))
            .collect();
        *self.view.write() = View::new(self.agent.name(), &replicas, self.chunks.len());
        self.cv.notify_all();
    }

    /// Takes in the have bytes of `s` read into `scratch` at `off`.
    fn take_have(&self, s: &SourceState, scratch: &HostMem, off: u64) {
        let n = self.chunks.len() as u64;
        // SAFETY: the READ into the scratch buffer has ended; only this thread uses it.
        let Ok(bytes) = (unsafe { scratch.slice(off, n) }) else {
            return;
        };
        let mut have = s.have.lock();
        for (h, &b) in have.iter_mut().zip(bytes) {
            // Held stays held (its chunks are verified by whoever reads them anyway).
            if *h != HAVE {
                *h = if b == HAVE || b == FETCHING {
                    b
                } else {
                    ABSENT
                };
            }
        }
        if have.iter().all(|&x| x == HAVE) {
            s.complete.store(true, Ordering::Release);
        }
    }
}

/// The result of a pull: its report, the pulled model in registered memory (published when
/// `serve`), and the manifest.
#[derive(Debug)]
pub struct Pulled {
    /// What happened.
    pub report: PullReport,
    /// The model's manifest.
    pub manifest: Arc<Manifest>,
    /// The model, published by the agent when the pull was asked to serve.
    pub published: Published,
    /// The etcd entries that announce this replica as a source (when serving with etcd); the
    /// announcement ends when they are dropped.
    pub announcements: Vec<nixl_discovery::Publication>,
}

impl SourceState {
    fn new(p: &Peer, chunks: usize) -> SourceState {
        SourceState {
            label: p.label.clone(),
            agent_name: p.agent_name.clone(),
            data_addr: p.header.data.addr,
            ctrl: p.ctrl,
            have_offset: p.header.have_offset(),
            have: Mutex::new(vec![if p.header.complete { HAVE } else { ABSENT }; chunks]),
            complete: AtomicBool::new(p.header.complete),
            origin: p.header.complete,
            alive: AtomicBool::new(true),
            bad: AtomicU32::new(0),
            failed_reads: AtomicU32::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

/// Sources of `name` announced in etcd now (skipping `me` and `known` agents): one bounded
/// attempt each; the failures are returned as "skipped" lines.
fn discover(
    agent: &Agent,
    reg: &nixl_discovery::Registry,
    name: &str,
    known: &[String],
    t: Duration,
) -> (Vec<Peer>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let names = match reg.list() {
        Ok(n) => n,
        Err(e) => {
            skipped.push(format!("etcd: {e}"));
            return (found, skipped);
        }
    };
    for n in names {
        if n == agent.name() || known.contains(&n) {
            continue;
        }
        let r = match reg.fetch(&n) {
            Ok(Some(md)) => probe_loaded(agent, &md, &n, name, t),
            Ok(None) => continue,
            Err(e) => Err(Error::Invalid(format!("etcd: {e}"))),
        };
        match r {
            Ok(p) => found.push(p),
            Err(e) => {
                tracing::warn!(source = %n, "etcd entry skipped: {e}");
                skipped.push(format!("{n}: {e}"));
            }
        }
    }
    (found, skipped)
}

/// The etcd prefix under which the sources of `model` are announced.
pub fn etcd_prefix(cfg: &nixl_discovery::EtcdConfig, model: &str) -> nixl_discovery::EtcdConfig {
    nixl_discovery::EtcdConfig {
        prefix: format!("{}{model}/", crate::ETCD_PREFIX),
        ..cfg.clone()
    }
}

/// Announces `agent` in etcd as a source of `model` (under a lease, kept alive until the
/// returned publications are dropped), and under the agents' prefix as any agent is.
pub fn announce(
    agent: &Arc<Agent>,
    cfg: &nixl_discovery::EtcdConfig,
    model: &str,
) -> Result<Vec<nixl_discovery::Publication>> {
    let e = |e: nixl_discovery::DiscoveryError| Error::Invalid(format!("etcd: {e}"));
    let weights = nixl_discovery::Registry::connect(&etcd_prefix(cfg, model)).map_err(e)?;
    let agents = nixl_discovery::Registry::connect(cfg).map_err(e)?;
    Ok(vec![
        weights.publish(agent).map_err(e)?,
        agents.publish(agent).map_err(e)?,
    ])
}

/// Pulls model `opts.name` into registered memory of `agent`, and writes its files into `out`
/// (when given) byte-identical to the source's. Sources are the `opts.sources` addresses and,
/// with `etcd`, the agents announced there (looked up again every 300 ms while pulling, so
/// replicas that start later are used too).
pub fn pull(
    agent: &Arc<Agent>,
    auth: &Auth,
    etcd: Option<&nixl_discovery::EtcdConfig>,
    out: Option<&Path>,
    opts: &PullOptions,
) -> Result<Pulled> {
    let (peers, skipped) = discover_all(
        agent,
        auth,
        etcd,
        &opts.name,
        &opts.sources,
        opts.connect_timeout,
    )?;
    // Sources announced later are looked up while pulling.
    let registry = match etcd {
        Some(cfg) => Some(
            nixl_discovery::Registry::connect(&etcd_prefix(cfg, &opts.name))
                .map_err(|e| Error::Invalid(format!("etcd: {e}")))?,
        ),
        None => None,
    };
    let manifest: Arc<Manifest> = match (peers.first(), &opts.fallback) {
        (Some(p), _) => Arc::clone(&p.manifest),
        (None, _) if opts.manifest.is_some() => {
            let p = opts.manifest.as_deref().unwrap_or(Path::new(""));
            let b = std::fs::read(p)
                .map_err(|e| Error::io(format!("reading the manifest {}", p.display()), e))?;
            let m = Manifest::decode(&b)?;
            if m.name != opts.name {
                return Err(Error::Invalid(format!(
                    "{} is the manifest of {:?}, not {:?}",
                    p.display(),
                    m.name,
                    opts.name
                )));
            }
            Arc::new(m)
        }
        (None, Some(Fallback::Dir(d))) => Arc::new(crate::source::manifest_of_dir(
            d,
            &opts.name,
            crate::manifest::DEFAULT_CHUNK,
        )?),
        (None, Some(Fallback::S3 { .. })) => {
            return Err(Error::Incomplete(format!(
                "no source of {:?} answered, and an S3 fallback alone needs --manifest{}{}",
                opts.name,
                if skipped.is_empty() { "" } else { ": " },
                skipped.join("; ")
            )))
        }
        (None, None) => {
            return Err(Error::Incomplete(format!(
                "no source of {:?} answered and no fallback was given{}{}",
                opts.name,
                if skipped.is_empty() { "" } else { ": " },
                skipped.join("; ")
            )))
        }
    };
    for p in peers.iter().skip(1) {
        if p.header.digest != peers[0].header.digest {
            return Err(mismatch(&manifest, &peers[0].label, p));
        }
    }
    let chunks = manifest.chunks();
    let (_, data_len) = manifest.layout();
    // The manifest came from a peer: a size it claims is checked against what this node has
    // before any memory is mapped or any file is sized.
    check_room(&manifest, data_len, out)?;
    let data = Arc::new(HostMem::new(data_len as usize)?);
    // Registered either way: as the published model when serving, else on its own.
    let published = Published::new(agent, Arc::clone(&manifest), Arc::clone(&data), false)?;
    let have_scratch = Scratch::new(agent, (chunks.len() * REFRESH_BATCH) as u64)?;
    let _objects = match &opts.fallback {
        Some(Fallback::S3 { bucket, prefix }) => {
            Some(register_objects(agent, &manifest, bucket, prefix)?)
        }
        _ => None,
    };
    let announcements = match (etcd, opts.serve) {
        (Some(cfg), true) => announce(agent, cfg, &opts.name)?,
        _ => Vec::new(),
    };

    let outs = match out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let mut v = Vec::new();
            for f in &manifest.files {
                let p = dir.join(format!(".{}.nixl-partial", f.name));
                let file = File::create(&p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
                file.set_len(f.size)
                    .map_err(|e| Error::io(format!("sizing {}", p.display()), e))?;
                v.push(file);
            }
            Some(v)
        }
        None => None,
    };
    let sources: Vec<Arc<SourceState>> = peers
        .iter()
        .map(|p| Arc::new(SourceState::new(p, chunks.len())))
        .collect();
    let run = Run {
        agent,
        board: Mutex::new(Board {
            st: vec![St::Pending; chunks.len()],
            failed_on: vec![Vec::new(); chunks.len()],
            done: 0,
            last_progress: Instant::now(),
        }),
        view: RwLock::new(View::new(agent.name(), &[], chunks.len())),
        chunks,
        sources: RwLock::new(sources),
        cv: Condvar::new(),
        finished: AtomicBool::new(false),
        data: Arc::clone(&data),
        outs,
        published: opts.serve.then_some(&published),
        fallback: opts.fallback.clone(),
        manifest: Arc::clone(&manifest),
        fallback_bytes: AtomicU64::new(0),
        corrupt: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        dropped: Mutex::new(Vec::new()),
        fatal: Mutex::new(None),
        chunk_timeout: opts.chunk_timeout,
        hold_back: opts.fault_hold_back.clone(),
        origin_idle_since: Mutex::new(None),
    };
    let skipped = Mutex::new(skipped);
    let start = Instant::now();
    let total = run.chunks.len();
    let streams = opts.streams_per_source.clamp(1, 64);
    let streams_to = |origin: bool| {
        if origin {
            opts.origin_streams.clamp(1, streams)
        } else {
            streams
        }
    };
    // What the other replicas hold or fetch, read before the first pick (not 100 ms into the
    // pull, after each replica's first picks went to the origin blind).
    run.refresh_have(&have_scratch.mem);
    std::thread::scope(|sc| {
        let spawn_workers = |s: usize| {
            for _ in 0..streams_to(run.src(s).origin) {
                let run = &run;
                sc.spawn(move || run.source_worker(s));
            }
        };
        for s in 0..run.sources.read().len() {
            spawn_workers(s);
        }
        if let Some(fb) = &run.fallback {
            for _ in 0..streams {
                let run = &run;
                sc.spawn(move || run.fallback_worker(fb));
            }
        }
        if let Some(reg) = &registry {
            // Replicas that join later are sources too: look etcd up again every 300 ms.
            let (run, skipped, manifest) = (&run, &skipped, &manifest);
            sc.spawn(move || {
                let mut last = Instant::now();
                while !run.finished.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() < Duration::from_millis(300) {
                        continue;
                    }
                    last = Instant::now();
                    let known: Vec<String> = run
                        .sources
                        .read()
                        .iter()
                        .map(|s| s.agent_name.clone())
                        .collect();
                    let (found, sk) =
                        discover(run.agent, reg, &opts.name, &known, opts.connect_timeout);
                    skipped.lock().extend(sk);
                    for p in found {
                        if p.header.digest != manifest.digest() {
                            let e = mismatch(manifest, "this pull", &p);
                            skipped.lock().push(format!("{}: {e}", p.label));
                            continue;
                        }
                        let s = {
                            let mut v = run.sources.write();
                            let i = v.len();
                            if i >= usize::from(u16::MAX) {
                                break;
                            }
                            v.push(Arc::new(SourceState::new(&p, total)));
                            i
                        };
                        tracing::info!(source = %p.label, "new source from etcd");
                        for _ in 0..streams_to(p.header.complete) {
                            sc.spawn(move || run.source_worker(s));
                        }
                    }
                }
            });
        }
        let mut last_refresh = Instant::now();
        let mut last_print = Instant::now();
        loop {
            {
                let mut b = run.board.lock();
                if b.done == total || run.finished.load(Ordering::Acquire) {
                    break;
                }
                run.cv.wait_for(&mut b, Duration::from_millis(50));
                if b.done == total {
                    break;
                }
                let any_alive = run
                    .sources
                    .read()
                    .iter()
                    .any(|s| s.alive.load(Ordering::Acquire));
                if !any_alive && run.fallback.is_none() && registry.is_none() {
                    drop(b);
                    let dropped = run.dropped.lock().join("; ");
                    run.fail(Error::Incomplete(format!(
                        "every source is gone and no fallback was given ({dropped})"
                    )));
                    break;
                }
                if b.last_progress.elapsed() > opts.stall_timeout {
                    let missing = total - b.done;
                    drop(b);
                    let dropped = run.dropped.lock().join("; ");
                    run.fail(Error::Incomplete(format!(
                        "no progress for {:?}: {missing} of {total} chunks held by no live \
                         source (dropped: {dropped})",
                        opts.stall_timeout
                    )));
                    break;
                }
            }
            if last_refresh.elapsed() > HAVE_REFRESH {
                run.refresh_have(&have_scratch.mem);
                last_refresh = Instant::now();
            }
            if opts.progress && last_print.elapsed() > Duration::from_millis(500) {
                print_progress(&run, start, total);
                last_print = Instant::now();
            }
        }
        run.finished.store(true, Ordering::Release);
        run.cv.notify_all();
    });
    if opts.progress {
        print_progress(&run, start, total);
        eprintln!();
    }
    if let Some(e) = run.fatal.lock().take() {
        return Err(e);
    }
    let seconds = start.elapsed().as_secs_f64();
    // Every chunk verified; now the tensors of each safetensors file against the manifest.
    let (offs, _) = manifest.layout();
    for (i, f) in manifest.files.iter().enumerate() {
        // SAFETY: every transfer into the buffer has ended; peers only read it.
        let bytes = unsafe { data.slice(offs[i], f.size)? };
        check_file_tensors(&manifest, i, bytes)?;
    }
    if let (Some(dir), Some(outs)) = (out, &run.outs) {
        for (f, file) in manifest.files.iter().zip(outs) {
            file.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", f.name), e))?;
            let from = dir.join(format!(".{}.nixl-partial", f.name));
            std::fs::rename(&from, dir.join(&f.name))
                .map_err(|e| Error::io(format!("renaming {}", from.display()), e))?;
        }
        let mpath = dir.join(crate::MANIFEST_FILE);
        std::fs::write(&mpath, manifest.encode())
            .map_err(|e| Error::io(format!("writing {}", mpath.display()), e))?;
    }
    drop(have_scratch);
    let mut sources_bytes = BTreeMap::new();
    for s in run.sources.read().iter() {
        *sources_bytes.entry(s.label.clone()).or_insert(0) += s.bytes.load(Ordering::Relaxed);
    }
    let report = PullReport {
        model_id: manifest.model_id(),
        bytes: manifest.total_bytes(),
        seconds,
        sources: sources_bytes,
        fallback_bytes: run.fallback_bytes.load(Ordering::Relaxed),
        verified: true,
        corrupt_chunks: run.corrupt.load(Ordering::Relaxed),
        dropped: run.dropped.lock().clone(),
        skipped: skipped.into_inner(),
        chunks_written: run.writes.load(Ordering::Relaxed),
    };
    Ok(Pulled {
        report,
        manifest,
        published,
        announcements,
    })
}

/// Names and registers the model's files as objects of the agent (the S3 fallback).
fn register_objects(
    agent: &Agent,
    manifest: &Manifest,
    bucket: &str,
    prefix: &str,
) -> Result<Registration> {
    let mut descs = Vec::new();
    for (i, f) in manifest.files.iter().enumerate() {
        let id = OBJECT_ID_BASE + i as u64;
        nixl_transports::object::name_object(agent, id, &format!("{bucket}/{prefix}{}", f.name))
            .map_err(|e| Error::core("the S3 fallback", e))?;
        if f.size > 0 {
            descs.push(Desc::new(0, f.size, id));
        }
    }
    let list = DescList::from_descs(MemKind::Object, descs)
        .map_err(|e| Error::core("the S3 fallback", e))?;
    // SAFETY: object descriptors name no memory of this process.
    unsafe { agent.register(&list) }.map_err(|e| Error::core("registering the S3 fallback", e))
}

/// Refuses a model that this node cannot hold: its bytes (`data_len`, as the manifest lays them
/// out) beyond the host's physical memory, or its files beyond the free space under `out`. A
/// source that lies about a model's size then costs a clear error, not a mapping or sparse files
/// of any size it names.
fn check_room(manifest: &Manifest, data_len: u64, out: Option<&Path>) -> Result<()> {
    // SAFETY: sysconf reads system constants and touches no memory of ours.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    if ram > 0 && data_len > ram {
        return Err(Error::Invalid(format!(
            "model {:?} claims {data_len} bytes, more than this host's {ram} bytes of memory",
            manifest.name
        )));
    }
    if let Some(dir) = out {
        let files: u64 = manifest
            .files
            .iter()
            .fold(0u64, |a, f| a.saturating_add(f.size));
        // The directory may not exist yet: ask the nearest ancestor that does.
        let mut probe = dir;
        while !probe.exists() {
            match probe.parent() {
                Some(p) if !p.as_os_str().is_empty() => probe = p,
                _ => {
                    probe = Path::new(".");
                    break;
                }
            }
        }
        let free = free_bytes(probe)
            .map_err(|e| Error::io(format!("checking free space under {}", probe.display()), e))?;
        if files > free {
            return Err(Error::Invalid(format!(
                "model {:?} has {files} bytes of files, more than the {free} bytes free under {}",
                manifest.name,
                probe.display()
            )));
        }
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` is writable memory of the struct's size.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

pub(crate) fn mismatch(manifest: &Manifest, first: &str, p: &Peer) -> Error {
    let detail = manifest.difference(&p.manifest).unwrap_or_default();
    let tensor = detail
        .split('"')
        .nth(1)
        .unwrap_or("(none: files differ)")
        .to_owned();
    Error::ManifestMismatch {
        tensor,
        detail: format!("{first} vs {}: {detail}", p.label),
    }
}

fn print_progress(run: &Run<'_>, start: Instant, total: usize) {
    let sources = run.sources.read().clone();
    let done_bytes: u64 = sources
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .sum::<u64>()
        + run.fallback_bytes.load(Ordering::Relaxed);
    let all = run.manifest.total_bytes().max(1);
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    let rate = done_bytes as f64 / secs;
    let live = sources
        .iter()
        .filter(|s| s.alive.load(Ordering::Relaxed))
        .count();
    let eta = if rate > 0.0 {
        (all - done_bytes.min(all)) as f64 / rate
    } else {
        f64::INFINITY
    };
    let done = run.board.lock().done;
    let width = 30usize;
    let filled = (done * width) / total.max(1);
    eprint!(
        "\r[{}{}] {:>7.1}/{:.1} MiB {:>8.1} MB/s  sources {live}  ETA {:>5.1}s ",
        "#".repeat(filled),
        " ".repeat(width - filled),
        done_bytes as f64 / (1 << 20) as f64,
        all as f64 / (1 << 20) as f64,
        rate / 1e6,
        eta
    );
}

/// What etcd announces: per model, its sources and how much each holds (read from each source's
/// have bytes, one bounded attempt each), as JSON objects (`model`, `sources`: `agent`,
/// `model_id`, `chunks`, `chunks_held`, `bytes_held`, or `error`).
pub fn list(
    agent: &Agent,
    etcd: &nixl_discovery::EtcdConfig,
    t: Duration,
) -> Result<Vec<serde_json::Value>> {
    let e = |e: nixl_discovery::DiscoveryError| Error::Invalid(format!("etcd: {e}"));
    let all = nixl_discovery::EtcdConfig {
        prefix: crate::ETCD_PREFIX.to_owned(),
        ..etcd.clone()
    };
    let reg = nixl_discovery::Registry::connect(&all).map_err(e)?;
    let mut by_model: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for key in reg.list().map_err(e)? {
        let Some((model, who)) = key.split_once('/') else {
            continue;
        };
        let entry = match reg.fetch(&key) {
            Ok(Some(md)) => match holdings(agent, &md, who, model, t) {
                Ok(v) => v,
                Err(err) => serde_json::json!({ "agent": who, "error": err.to_string() }),
            },
            Ok(None) => continue,
            Err(err) => serde_json::json!({ "agent": who, "error": err.to_string() }),
        };
        by_model.entry(model.to_owned()).or_default().push(entry);
    }
    Ok(by_model
        .into_iter()
        .map(|(m, s)| serde_json::json!({ "model": m, "sources": s }))
        .collect())
}

fn holdings(
    agent: &Agent,
    md: &[u8],
    who: &str,
    model: &str,
    t: Duration,
) -> Result<serde_json::Value> {
    let p = probe_loaded(agent, md, who, model, t)?;
    let n = p.header.chunks;
    let scratch = Scratch::new(agent, n.max(1))?;
    if n > 0 {
        let at = p.ctrl.addr + p.header.have_offset();
        read_remote(agent, &p.agent_name, &scratch.mem, 0, at, n, t)
            .map_err(|e| Error::core(format!("reading what {who} holds"), e))?;
    }
    // SAFETY: the READ has ended; only this thread uses the scratch buffer.
    let have = unsafe { scratch.mem.slice(0, n)? };
    let chunks = p.manifest.chunks();
    let held: Vec<&Chunk> = chunks.iter().filter(|c| have[c.index] == HAVE).collect();
    Ok(serde_json::json!({
        "agent": who,
        "model_id": p.manifest.model_id(),
        "chunks": n,
        "chunks_held": held.len(),
        "bytes_held": held.iter().map(|c| c.len).sum::<u64>(),
        "bytes": p.manifest.total_bytes(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::FileEntry;

    fn claiming(size: u64) -> Manifest {
        Manifest {
            name: "liar".into(),
            chunk_size: crate::manifest::DEFAULT_CHUNK,
            files: vec![FileEntry {
                name: "model.safetensors".into(),
                size,
                header_bytes: 0,
                chunk_sums: Vec::new(),
            }],
            tensors: Vec::new(),
        }
    }

    fn view(holders: Vec<u16>, me: u64) -> View {
        View {
            owner: vec![me; holders.len()],
            holders,
            me,
        }
    }

    #[test]
    fn the_picker_takes_the_rarest_chunk_and_leaves_to_an_origin_only_what_nobody_has() {
        // Chunks 0..6; holders per chunk among the serving replicas (held or being fetched).
        let holders = vec![3, 1, 0, 2, 1, 0];
        for me in 0..64 {
            let v = view(holders.clone(), me);
            // From a replica: the rarest chunk it holds, whatever the tie-break order.
            assert_eq!(rarest([0, 1, 3], &v, From::Replica), Some(1));
            assert_eq!(rarest([0, 3], &v, From::Replica), Some(3));
            let c = rarest(0..6, &v, From::Replica).unwrap();
            assert!(c == 2 || c == 5, "salt {me}: chunk {c} has holders");
            // From an origin: only chunks no replica holds or fetches, never a held one.
            assert_eq!(rarest([0, 1, 3, 4], &v, From::Origin), None);
            assert_eq!(rarest([0, 1, 5], &v, From::Origin), Some(5));
            assert_eq!(rarest(std::iter::empty(), &v, From::Replica), None);
        }
        // Ties go by each replica's own order: replicas picking at once from the same stale
        // view spread over the unheld chunks rather than all taking the first.
        let firsts: std::collections::BTreeSet<usize> = (0..8)
            .map(|r| {
                rarest(
                    0..64,
                    &view(vec![0; 64], salt(&format!("r{r}"))),
                    From::Origin,
                )
            })
            .map(Option::unwrap)
            .collect();
        assert!(firsts.len() >= 6, "eight replicas' first picks: {firsts:?}");
        // The same replica picks the same way every time (deterministic).
        let v = view(vec![0; 64], 42);
        assert_eq!(
            rarest(0..64, &v, From::Origin),
            rarest(0..64, &v, From::Origin)
        );
    }

    #[test]
    fn replicas_that_know_each_other_split_the_origin_chunks_and_help_the_one_behind() {
        let names = ["a", "b", "c", "d"];
        let absent = vec![ABSENT; 256];
        let views: Vec<View> = names
            .iter()
            .map(|me| {
                let others: Vec<(&str, &[u8])> = names
                    .iter()
                    .filter(|n| *n != me)
                    .map(|n| (*n, absent.as_slice()))
                    .collect();
                View::new(me, &others, 256)
            })
            .collect();
        // Each chunk has the same taker in every view, and each replica about a quarter.
        for c in 0..256 {
            assert!(views.iter().all(|v| v.owner[c] == views[0].owner[c]), "{c}");
        }
        for v in &views {
            let n = v.owner.iter().filter(|&&o| o == v.me).count();
            assert!((40..=90).contains(&n), "{n} of 256 chunks");
        }
        // From an origin a replica takes its own unheld chunks first.
        let a = &views[0];
        let pick = rarest(0..256, a, From::Origin).unwrap();
        assert_eq!(a.owner[pick], a.me);
        // With none of its own left, it helps the replica with the most unheld chunks left,
        // from the back of that replica's order: not what that replica takes next.
        let (b, c) = (salt("b"), salt("c"));
        let left: Vec<usize> = (0..256)
            .filter(|&x| a.owner[x] == b)
            .take(6)
            .chain((0..256).filter(|&x| a.owner[x] == c).take(2))
            .collect();
        let help = rarest(left.iter().copied(), a, From::Origin).unwrap();
        assert_eq!(a.owner[help], b);
        let b_next = rarest(left.iter().copied(), &views[1], From::Origin).unwrap();
        assert_eq!(views[1].owner[b_next], b);
        assert_ne!(help, b_next, "a helper took what the owner takes next");
        // The owner's last few are its own, unless the helper has waited long enough.
        let last: Vec<usize> = (0..256).filter(|&x| a.owner[x] == b).take(2).collect();
        assert_eq!(rarest(last.iter().copied(), a, From::Origin), None);
        let late = rarest(last.iter().copied(), a, From::OriginImpatient).unwrap();
        assert!(last.contains(&late));
        // A chunk someone holds or fetches, never.
        let mut held = a.clone();
        for &x in &left {
            held.holders[x] = 1;
        }
        assert_eq!(rarest(left.iter().copied(), &held, From::Origin), None);
        // Alone, a replica takes everything.
        let alone = View::new("a", &[], 8);
        assert!(alone.owner.iter().all(|&o| o == alone.me));
        // A replica counts as a holder once it holds or fetches a chunk.
        let have = [HAVE, FETCHING, ABSENT];
        let v = View::new("a", &[("b", &have), ("c", &have[..1])], 3);
        assert_eq!(v.holders, vec![2, 1, 0]);
    }

    #[test]
    fn a_model_larger_than_the_node_is_refused_before_anything_is_mapped() {
        let dir = std::env::temp_dir();
        // More memory than any host has: refused by the memory check.
        let e = check_room(&claiming(1 << 62), 1 << 62, Some(&dir)).unwrap_err();
        assert!(e.to_string().contains("bytes of memory"), "{e}");
        // Fits in memory, but not on the filesystem of the output directory (which need not
        // exist yet).
        let free = free_bytes(&dir).unwrap();
        let e = check_room(&claiming(free + (1 << 30)), 4096, Some(&dir.join("a/b"))).unwrap_err();
        assert!(e.to_string().contains("bytes free under"), "{e}");
        // A model that fits passes, with an output directory or without one.
        check_room(&claiming(1 << 20), 1 << 20, Some(&dir)).unwrap();
        check_room(&claiming(1 << 20), 1 << 20, None).unwrap();
    }
}
