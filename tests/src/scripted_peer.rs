//! The scripted peer process of the multi-process tests and of `nixl-bench` (which runs itself
//! as one): the body of the `nixl-test-peer` binary.
//!
//! Starts one agent (all default backends) with one registered buffer, prints `MD <hex>` with its
//! metadata, then answers line commands on stdin, one reply line each:
//!
//! - `load <hex>`: load a peer's metadata → `ok <name>`
//! - `fill <seed>`: fill the buffer with the pattern → `ok`
//! - `check <seed>`: verify the whole buffer against the pattern → `ok` or `bad <offset>`
//! - `sum`: FNV-1a of the buffer → `sum <hex>`
//! - `notif <timeout_ms>`: wait for one notification → `notif <from> <hex msg>` or `none`
//! - `notif-check <timeout_ms> <seed>`: wait for a notification, then verify the buffer at once
//!   (proves the data landed before the notification) → `ok <msg hex>` / `bad <offset>` / `none`
//! - `send <peer> <hex>`: send a notification → `ok` or `err <text>`
//! - `dereg`: deregister the buffer (peers' mappings are revoked first) → `ok <milliseconds>`
//! - `xfer <peer> <read|write> <posts> <notif hex|->`: moves the whole buffer to or from the
//!   peer's first region `posts` times → `ok <bytes> <seconds>` or `err <class> <ms> <text>`
//! - `bench <peer> <read|write> <block> <batch> <seconds> [threads=N] [iters=N] [warmup=N]
//!   [backend=NAME]`: see [`bench()`]: each of `threads` threads (default 1) repeats its own
//!   request of `batch` descriptors of `block` bytes, over its own part of both buffers (part
//!   `t` is bytes `t·block·batch ..` of each), `iters` times after `warmup` posts (default 1),
//!   or for about `seconds` when `iters` is absent or 0; `backend` names the backend (default:
//!   the selection policy's choice) →
//!   `ok <GB/s> <posts> <p50 µs> <p99 µs> <backend> <seconds>` (GB/s = 10^9 bytes/s over all
//!   threads; posts of all threads; post-to-complete latency of all posts merged; the backend
//!   the requests used; the wall time), `unavailable <text>` when the request cannot be made
//!   (no backend can carry it, or the named one cannot), or `err <class> 0 <text>`
//! - `fill <seed> <part> <n>` / `check <seed> <part> <n>`: as `fill` / `check`, over the first
//!   `n` parts of `part` bytes only, part `t` with the pattern of `seed + t` (see
//!   [`fill_parts`]) → `ok` / `bad <offset>`
//! - `poke <offset>`: flips the bits of one byte (a test hook for `nixl-bench --verify`) → `ok`
//! - `backend <name>`: whether the agent runs that backend → `ok`, `unavailable <reason>` or
//!   `absent`
//! - `fetch <addr>` / `push <addr>`: metadata over a peer's tcp listener → `ok <name>`
//! - `exit`
//!
//! Flags: `--name`, `--size`, `--memfd`, `--config FILE` (the agent's TOML configuration).

use std::io::{BufRead, Write};
use std::time::Duration;

use std::collections::HashMap;
use std::time::Instant;

use crate::{fill, fill_at, first_mismatch, hex, unhex};
use nixl_core::{
    Agent, AgentMetadata, BackendName, Desc, DescList, Error, MemKind, XferOp, XferOptions,
};
use nixl_transports::config::Config;
use nixl_transports::shm::ShmBuffer;
use nixl_transports::tcp::{fetch_metadata, push_metadata};

/// Runs the peer with these arguments (flags as above; the program name is not included).
pub fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let name = get("--name").ok_or("--name missing")?;
    let size: usize = get("--size").ok_or("--size missing")?.parse()?;
    let memfd = args.iter().any(|a| a == "--memfd");

    let config = match get("--config") {
        Some(path) => Config::from_file(std::path::Path::new(&path))?,
        None => Config::default(),
    };
    let agent = Agent::builder(name).backends(config.backends()?).build()?;
    let mut remotes: HashMap<String, Desc> = HashMap::new();
    let mut shm;
    let mut heap;
    let buf: &mut [u8] = if memfd {
        shm = ShmBuffer::new(size)?;
        shm.as_mut_slice()
    } else {
        heap = vec![0u8; size];
        &mut heap
    };
    buf.fill(0);
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(buf)])?;
    // SAFETY: the buffer outlives the registration (declared before it). The test driving this
    // process touches the buffer through commands only between its own transfers, so no Rust
    // reference made here is live while a transfer writes the memory.
    let mut reg = Some(unsafe { agent.register(&list)? });
    let mut out = std::io::stdout().lock();
    writeln!(out, "MD {}", hex(&agent.metadata_bytes()))?;
    out.flush()?;

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let reply = match w.as_slice() {
            ["load", h] => load(&agent, &mut remotes, &unhex(h)?),
            ["fetch", addr] => match fetch_metadata(addr, &config.auth(), Duration::from_secs(5)) {
                Ok(md) => load(&agent, &mut remotes, &md),
                Err(e) => format!("err {} {e}", e.metric_label()),
            },
            ["push", addr] => match push_metadata(
                addr,
                &config.auth(),
                &agent.metadata_bytes(),
                Duration::from_secs(5),
            ) {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("err {} {e}", e.metric_label()),
            },
            ["xfer", peer, op, posts, notif] => {
                let notif = (*notif != "-").then(|| unhex(notif)).transpose()?;
                let remote = remotes.get(*peer).copied().ok_or("peer not loaded")?;
                let n = buf.len().min(remote.len as usize);
                let local = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf[..n])])?;
                let remote =
                    DescList::from_descs(MemKind::Dram, vec![Desc::new(remote.addr, n as u64, 0)])?;
                let posts: u64 = posts.parse()?;
                let t = Instant::now();
                let res = agent
                    .create_xfer(
                        parse_op(op)?,
                        &local,
                        &remote,
                        peer,
                        XferOptions {
                            notif,
                            ..XferOptions::default()
                        },
                    )
                    .and_then(|x| (0..posts).try_for_each(|_| x.run_blocking()));
                match res {
                    Ok(()) => format!("ok {} {:.6}", n as u64 * posts, t.elapsed().as_secs_f64()),
                    Err(e) => format!("err {} {} {e}", e.metric_label(), t.elapsed().as_millis()),
                }
            }
            ["bench", peer, op, block, batch, secs, opts @ ..] => {
                let remote = remotes.get(*peer).copied().ok_or("peer not loaded")?;
                let mut spec = BenchSpec {
                    op: parse_op(op)?,
                    block: block.parse()?,
                    batch: batch.parse()?,
                    threads: 1,
                    iters: 0,
                    warmup: 1,
                    seconds: secs.parse()?,
                    backend: None,
                    mode: BenchMode::Plain,
                };
                for o in opts {
                    match o.split_once('=') {
                        Some(("threads", n)) => spec.threads = n.parse()?,
                        Some(("iters", n)) => spec.iters = n.parse()?,
                        Some(("warmup", n)) => spec.warmup = n.parse()?,
                        Some(("mode", "prepped")) => spec.mode = BenchMode::Prepped,
                        Some(("mode", "stride")) => spec.mode = BenchMode::Stride,
                        Some(("backend", b)) => {
                            spec.backend = Some(
                                BackendName::parse(b)
                                    .ok_or_else(|| format!("unknown backend {b:?}"))?,
                            )
                        }
                        _ => return Err(format!("bench: unknown option {o:?}").into()),
                    }
                }
                let local = Desc::from_mut_slice(buf);
                match bench(&agent, peer, local, remote, &spec) {
                    Ok(r) => format!(
                        "ok {:.6} {} {:.2} {:.2} {} {:.9} {:.3}",
                        r.gbps, r.posts, r.p50_us, r.p99_us, r.backend, r.seconds, r.create_us
                    ),
                    Err(BenchError::Unavailable(e)) => format!("unavailable {e}"),
                    Err(BenchError::Invalid(e)) => format!("err invalid 0 {e}"),
                    Err(BenchError::Failed(e)) => format!("err {} 0 {e}", e.metric_label()),
                }
            }
            ["fill", seed, part, n] => {
                match fill_parts(buf, seed.parse()?, part.parse()?, n.parse()?) {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("err {e}"),
                }
            }
            ["check", seed, part, n] => {
                match check_parts(buf, seed.parse()?, part.parse()?, n.parse()?) {
                    Ok(None) => "ok".into(),
                    Ok(Some(off)) => format!("bad {off}"),
                    Err(e) => format!("err {e}"),
                }
            }
            ["poke", off] => {
                let off: usize = off.parse()?;
                match buf.get_mut(off) {
                    Some(b) => {
                        *b ^= 0xff;
                        "ok".into()
                    }
                    None => "err offset past the buffer".into(),
                }
            }
            ["backend", b] => {
                let name = BackendName::parse(b).ok_or_else(|| format!("unknown backend {b:?}"))?;
                match agent.backends().iter().find(|s| s.name == name) {
                    None => "absent".into(),
                    Some(s) => match &s.unavailable {
                        None => "ok".into(),
                        Some(why) => format!("unavailable {why}"),
                    },
                }
            }
            ["fill", seed] => {
                fill(buf, seed.parse()?);
                "ok".into()
            }
            ["check", seed] => match first_mismatch(buf, seed.parse()?) {
                None => "ok".into(),
                Some(off) => format!("bad {off}"),
            },
            ["sum"] => {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in buf.iter() {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
                format!("sum {h:016x}")
            }
            ["notif", ms] => match agent
                .wait_notifs(Duration::from_millis(ms.parse()?))
                .first()
            {
                Some(n) => format!("notif {} {}", n.from, hex(&n.msg)),
                None => "none".into(),
            },
            ["notif-check", ms, seed] => {
                let got = agent.wait_notifs(Duration::from_millis(ms.parse()?));
                match got.first() {
                    None => "none".into(),
                    Some(n) => match first_mismatch(buf, seed.parse()?) {
                        None => format!("ok {}", hex(&n.msg)),
                        Some(off) => format!("bad {off}"),
                    },
                }
            }
            ["send", peer, h] => match agent.send_notif(peer, &unhex(h)?) {
                Ok(()) => "ok".into(),
                Err(e) => format!("err {e}"),
            },
            ["dereg"] => {
                let t = std::time::Instant::now();
                match reg.take().map(|r| r.deregister()) {
                    Some(Ok(())) => format!("ok {}", t.elapsed().as_millis()),
                    Some(Err(e)) => format!("err {e}"),
                    None => "err not registered".into(),
                }
            }
            ["exit"] => return Ok(()),
            _ => format!("err unknown command {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

fn load(agent: &Agent, remotes: &mut HashMap<String, Desc>, md: &[u8]) -> String {
    match agent.load_remote(md) {
        Ok(n) => {
            if let Some(r) = AgentMetadata::decode(md)
                .ok()
                .and_then(|m| m.regions.first().map(|r| r.desc))
            {
                remotes.insert(n.clone(), r);
            }
            format!("ok {n}")
        }
        Err(e) => format!("err {} {e}", e.metric_label()),
    }
}

fn parse_op(op: &str) -> Result<XferOp, String> {
    match op {
        "read" => Ok(XferOp::Read),
        "write" => Ok(XferOp::Write),
        _ => Err(format!("op must be read or write, not {op:?}")),
    }
}

/// One measured row: what [`bench()`] runs.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    /// Direction.
    pub op: XferOp,
    /// Bytes per descriptor.
    pub block: usize,
    /// Descriptors per request.
    pub batch: usize,
    /// Initiator threads, each with its own request over its own part of the buffers.
    pub threads: usize,
    /// Posts per thread after the warm-up; 0: as many as fit in `seconds`.
    pub iters: u64,
    /// Posts per thread before timing starts.
    pub warmup: u64,
    /// How long each thread posts when `iters` is 0.
    pub seconds: f64,
    /// The backend to use; `None`: the selection policy chooses.
    pub backend: Option<BackendName>,
    /// How the requests are made.
    pub mode: BenchMode,
}

/// How [`bench()`] makes its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// `create_xfer` from descriptor lists of `batch` adjacent blocks.
    Plain,
    /// `create_xfer_prepped` by index from lists of `2·batch` blocks prepared once on each
    /// side, taking every other block (so nothing merges).
    Prepped,
    /// As `Prepped`, each list prepared from one strided run (stride two blocks, indices
    /// `0..batch`): [`nixl_core::Agent::prep_local_strided`], nothing stored per block.
    Stride,
}

impl BenchMode {
    /// Blocks of the buffers each request spans per block it moves.
    pub fn spread(self) -> usize {
        match self {
            BenchMode::Plain => 1,
            BenchMode::Prepped | BenchMode::Stride => 2,
        }
    }

    /// Name, as in nixl-bench's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BenchMode::Plain => "plain",
            BenchMode::Prepped => "prepped",
            BenchMode::Stride => "stride",
        }
    }
}

/// What [`bench()`] measured.
#[derive(Clone, Debug)]
pub struct BenchOutcome {
    /// 10^9 bytes per second, all threads together, over the wall time.
    pub gbps: f64,
    /// Timed posts of all threads.
    pub posts: u64,
    /// Median post-to-complete latency of all timed posts, in µs.
    pub p50_us: f64,
    /// 99th percentile of the same, in µs.
    pub p99_us: f64,
    /// The backend the requests used.
    pub backend: BackendName,
    /// Wall time from the first thread's start to the last thread's end.
    pub seconds: f64,
    /// Median time to create one request (of thread 0's shape), in µs: [`CREATE_REPS`] tries.
    pub create_us: f64,
}

/// Requests [`bench()`] creates (and drops) to time their creation.
pub const CREATE_REPS: usize = 15;

/// Why [`bench()`] gave no figure.
#[derive(Debug)]
pub enum BenchError {
    /// The spec does not fit the buffers (or is empty).
    Invalid(String),
    /// The request could not be made: no backend (or not the named one) can carry it.
    Unavailable(Error),
    /// A post failed.
    Failed(Error),
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::Invalid(e) => write!(f, "invalid: {e}"),
            BenchError::Unavailable(e) => write!(f, "unavailable: {e}"),
            BenchError::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

impl std::error::Error for BenchError {}

/// Measures `spec` between the registered memory `local` (this agent's) and `remote` (`peer`'s
/// registered memory; `peer` may be this agent's own name). Thread `t` moves bytes
/// `t·block·batch .. (t+1)·block·batch` of `local` to or from the same bytes of `remote`, as
/// `batch` descriptors of `block` bytes, with a request of its own; all requests are made
/// first (on this thread), then every thread warms up, waits for the others, and times its
/// posts (post, wait, repeat: one request in flight per thread).
pub fn bench(
    agent: &Agent,
    peer: &str,
    local: Desc,
    remote: Desc,
    spec: &BenchSpec,
) -> Result<BenchOutcome, BenchError> {
    let part = spec.block * spec.batch * spec.mode.spread();
    let need = part as u64 * spec.threads as u64;
    if part == 0 || spec.threads == 0 {
        return Err(BenchError::Invalid(
            "block, batch and threads must be > 0".into(),
        ));
    }
    if need > local.len.min(remote.len) {
        return Err(BenchError::Invalid(format!(
            "block*batch*threads = {need} bytes is over the buffers ({} local, {} remote)",
            local.len, remote.len
        )));
    }
    let invalid = |e: Error| BenchError::Invalid(e.to_string());
    let block = spec.block as u64;
    // Thread t's list on one side: its blocks, as the mode makes them.
    let list = |base: Desc, t: usize| -> Result<DescList, BenchError> {
        let addr = base.addr + (t * part) as u64;
        let mut l = DescList::new(MemKind::Dram);
        let (stride, count) = match spec.mode {
            BenchMode::Plain => (block, spec.batch),
            BenchMode::Prepped => (block, 2 * spec.batch),
            BenchMode::Stride => (2 * block, spec.batch),
        };
        l.push_strided(nixl_core::Strided {
            addr,
            stride,
            count: count as u64,
            len: block,
            dev_id: 0,
        })
        .map_err(invalid)?;
        Ok(l)
    };
    let idx: Vec<u32> = match spec.mode {
        BenchMode::Prepped => (0..spec.batch as u32).map(|i| 2 * i).collect(),
        _ => (0..spec.batch as u32).collect(),
    };
    let mut reqs = Vec::with_capacity(spec.threads);
    let mut create = Vec::with_capacity(CREATE_REPS);
    for t in 0..spec.threads {
        let opts = XferOptions {
            backend: spec.backend,
            ..XferOptions::default()
        };
        let (l, r) = (list(local, t)?, list(remote, t)?);
        let strided = |base: Desc| nixl_core::Strided {
            addr: base.addr + (t * part) as u64,
            stride: 2 * block,
            count: spec.batch as u64,
            len: block,
            dev_id: 0,
        };
        let prepped = match spec.mode {
            BenchMode::Plain => None,
            BenchMode::Stride => Some((
                agent
                    .prep_local_strided(MemKind::Dram, strided(local))
                    .map_err(BenchError::Unavailable)?,
                agent
                    .prep_remote_strided(peer, MemKind::Dram, strided(remote))
                    .map_err(BenchError::Unavailable)?,
            )),
            BenchMode::Prepped => Some((
                agent.prep_local(&l).map_err(BenchError::Unavailable)?,
                agent
                    .prep_remote(peer, &r)
                    .map_err(BenchError::Unavailable)?,
            )),
        };
        let make = || match &prepped {
            None => agent.create_xfer(spec.op, &l, &r, peer, opts.clone()),
            Some((pl, pr)) => agent.create_xfer_prepped(spec.op, pl, &idx, pr, &idx, opts.clone()),
        };
        if t == 0 {
            for _ in 0..CREATE_REPS {
                let c = Instant::now();
                let x = make().map_err(BenchError::Unavailable)?;
                create.push(c.elapsed().as_secs_f64() * 1e6);
                drop(x);
            }
        }
        reqs.push(make().map_err(BenchError::Unavailable)?);
    }
    create.sort_by(f64::total_cmp);
    let create_us = percentile(&create, 0.5);
    let backend = reqs[0].backend();
    let barrier = std::sync::Barrier::new(spec.threads);
    let until = Duration::from_secs_f64(spec.seconds.max(0.0));
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|x| {
                let barrier = &barrier;
                s.spawn(move || -> nixl_core::Result<(Instant, Instant, Vec<f64>)> {
                    let mut warm = Ok(());
                    for _ in 0..spec.warmup {
                        warm = x.run_blocking();
                        if warm.is_err() {
                            break;
                        }
                    }
                    // Every thread reaches the barrier, failed warm-up or not.
                    barrier.wait();
                    warm?;
                    timed_runs(spec.iters, until, || x.run_blocking())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect::<Vec<_>>()
    });
    let mut lat = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for r in runs {
        let (t0, t1, l) = r.map_err(BenchError::Failed)?;
        first = Some(first.map_or(t0, |f| f.min(t0)));
        last = Some(last.map_or(t1, |l| l.max(t1)));
        lat.extend(l);
    }
    let seconds = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    lat.sort_by(f64::total_cmp);
    let (p50_us, p99_us) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let posts = lat.len() as u64;
    Ok(BenchOutcome {
        gbps: posts as f64 * (spec.block * spec.batch) as f64 / seconds.max(1e-9) / 1e9,
        posts,
        p50_us,
        p99_us,
        backend,
        seconds,
        create_us,
    })
}

/// The `q` quantile (0..=1) of sorted values: the value at index `⌊(n-1)·q⌋`; 0 if empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// Fills the first `n` parts of `part` bytes of `buf`: part `t` gets the bytes the pattern of
/// `seed + t` has at its offsets (so every part, and every seed, differs).
pub fn fill_parts(buf: &mut [u8], seed: u64, part: usize, n: usize) -> Result<(), String> {
    if part.checked_mul(n).is_none_or(|b| b > buf.len()) {
        return Err(format!("{n} parts of {part} bytes are over the buffer"));
    }
    for t in 0..n {
        fill_at(
            &mut buf[t * part..(t + 1) * part],
            t * part,
            seed + t as u64,
        );
    }
    Ok(())
}

/// The first offset in the first `n` parts of `part` bytes of `buf` that differs from what
/// [`fill_parts`] wrote with `seed`, if any.
pub fn check_parts(buf: &[u8], seed: u64, part: usize, n: usize) -> Result<Option<usize>, String> {
    if part.checked_mul(n).is_none_or(|b| b > buf.len()) {
        return Err(format!("{n} parts of {part} bytes are over the buffer"));
    }
    const CHUNK: usize = 1 << 20;
    let mut expect = vec![0u8; CHUNK.min(part)];
    for t in 0..n {
        let mut off = t * part;
        for chunk in buf[t * part..(t + 1) * part].chunks(CHUNK) {
            let e = &mut expect[..chunk.len()];
            fill_at(e, off, seed + t as u64);
            if chunk != e {
                let p = chunk.iter().zip(e.iter()).position(|(a, b)| a != b);
                return Ok(Some(off + p.unwrap_or(0)));
            }
            off += chunk.len();
        }
    }
    Ok(None)
}

/// The timed part of one benchmark thread: `once` run `iters` times, or (`iters` 0) until
/// `until` has passed and it ran at least once. Returns when it started and ended and each
/// run's time in µs; the first error ends it.
pub fn timed_runs<E>(
    iters: u64,
    until: Duration,
    mut once: impl FnMut() -> Result<(), E>,
) -> Result<(Instant, Instant, Vec<f64>), E> {
    let mut lat = Vec::with_capacity(if iters > 0 { iters as usize } else { 1 << 16 });
    let t0 = Instant::now();
    loop {
        if iters > 0 {
            if lat.len() as u64 >= iters {
                break;
            }
        } else if t0.elapsed() >= until && !lat.is_empty() {
            break;
        }
        let p = Instant::now();
        once()?;
        lat.push(p.elapsed().as_secs_f64() * 1e6);
    }
    Ok((t0, Instant::now(), lat))
}
