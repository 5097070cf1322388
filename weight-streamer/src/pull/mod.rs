//! The replica side: find sources, pull every chunk with one-sided READs spread over all live
//! sources, verify each chunk, write each verified chunk once, fall back to storage for chunks
//! no live source can give.
//!
//! Files: this one [`pull`] itself, announcing and listing; `schedule.rs` which chunk to take from
//! which source next; `options.rs` the options, the storage fallback and the report; `peers.rs`
//! probing and discovering sources and the one-sided READs; `run.rs` a pull in progress;
//! `support.rs` object registration, disk room and progress; `tests.rs` the unit tests.

mod options;
mod peers;
mod run;
mod schedule;
mod support;
#[cfg(test)]
mod tests;

pub use options::*;
use peers::*;
pub(crate) use peers::{discover_all, Peer};
pub use run::Pulled;
use run::*;
use schedule::*;
pub(crate) use support::mismatch;
use support::*;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{Agent, AgentMetadata, Desc, DescList, MemKind, Registration, XferRequest};
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
