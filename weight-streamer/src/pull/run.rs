//! A pull in progress: the state of each source and of each chunk, and the workers.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum St {
    Pending,
    InFlight,
    Done,
}

pub(super) struct SourceState {
    pub(super) label: String,
    pub(super) agent_name: String,
    pub(super) data_addr: u64,
    pub(super) ctrl: Desc,
    pub(super) have_offset: u64,
    /// Each chunk's have byte as last read ([`HAVE`], [`FETCHING`] or [`ABSENT`]).
    pub(super) have: Mutex<Vec<u8>>,
    pub(super) complete: AtomicBool,
    /// Published complete from the start (an origin, not a replica serving what it pulled).
    pub(super) origin: bool,
    pub(super) alive: AtomicBool,
    pub(super) bad: AtomicU32,
    pub(super) failed_reads: AtomicU32,
    pub(super) bytes: AtomicU64,
}

pub(super) struct Board {
    pub(super) st: Vec<St>,
    /// Sources (by index) whose copy of the chunk failed its checksum.
    pub(super) failed_on: Vec<Vec<u16>>,
    pub(super) done: usize,
    pub(super) last_progress: Instant,
}

pub(super) struct Run<'a> {
    pub(super) agent: &'a Agent,
    pub(super) chunks: Vec<Chunk>,
    pub(super) sources: RwLock<Vec<Arc<SourceState>>>,
    pub(super) board: Mutex<Board>,
    pub(super) cv: Condvar,
    pub(super) finished: AtomicBool,
    pub(super) data: Arc<HostMem>,
    pub(super) outs: Option<Vec<File>>,
    pub(super) published: Option<&'a Published>,
    pub(super) fallback: Option<Fallback>,
    pub(super) manifest: Arc<Manifest>,
    pub(super) fallback_bytes: AtomicU64,
    pub(super) corrupt: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) dropped: Mutex<Vec<String>>,
    pub(super) fatal: Mutex<Option<Error>>,
    pub(super) chunk_timeout: Duration,
    /// The serving replicas as of the last have-byte refresh.
    pub(super) view: RwLock<View>,
    /// [`PullOptions::fault_hold_back`].
    pub(super) hold_back: Vec<String>,
    /// Since when the origin streams found nothing to take ([`ENDGAME_PATIENCE`]).
    pub(super) origin_idle_since: Mutex<Option<Instant>>,
}

impl Run<'_> {
    /// Whether source `s` may serve chunk `c`.
    pub(super) fn src(&self, s: usize) -> Arc<SourceState> {
        Arc::clone(&self.sources.read()[s])
    }

    pub(super) fn eligible(&self, b: &Board, s: usize, c: usize) -> bool {
        let src = self.src(s);
        src.alive.load(Ordering::Acquire)
            && src.have.lock().get(c) == Some(&HAVE)
            && !b.failed_on[c].contains(&(s as u16))
    }

    pub(super) fn pick(&self, s: usize) -> Option<usize> {
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

    pub(super) fn pick_fallback(&self) -> Option<usize> {
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

    pub(super) fn requeue(&self, c: usize, bad_from: Option<usize>) {
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

    pub(super) fn drop_source(&self, s: usize, why: String) {
        let src = self.src(s);
        if src.alive.swap(false, Ordering::AcqRel) {
            tracing::warn!(source = %src.label, "source dropped: {why}");
            self.dropped.lock().push(format!("{}: {why}", src.label));
            self.cv.notify_all();
        }
    }

    /// Verifies chunk `c` (now in the data buffer) and, if good, writes it out once.
    pub(super) fn accept(&self, c: usize) -> Result<bool> {
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

    pub(super) fn fail(&self, e: Error) {
        let mut f = self.fatal.lock();
        if f.is_none() {
            *f = Some(e);
        }
        self.finished.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Whether another source than `s` is still alive (for the hold-back fault hook).
    pub(super) fn others_alive(&self, s: usize) -> bool {
        self.sources
            .read()
            .iter()
            .enumerate()
            .any(|(i, o)| i != s && o.alive.load(Ordering::Acquire))
    }

    pub(super) fn source_worker(&self, s: usize) {
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

    pub(super) fn fallback_worker(&self, fb: &Fallback) {
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
                        self.agent
                            .post_read(
                                &DescList::from_descs(MemKind::Dram, vec![local])?,
                                &DescList::from_descs(MemKind::Object, vec![object])?,
                                self.agent.name(),
                                self.chunk_timeout,
                            )?
                            .wait_blocking(None)
                            .into_result()
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
    pub(super) fn refresh_have(&self, scratch: &HostMem) {
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
    pub(super) fn take_have(&self, s: &SourceState, scratch: &HostMem, off: u64) {
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
    pub(super) fn new(p: &Peer, chunks: usize) -> SourceState {
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
pub(super) fn discover(
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
