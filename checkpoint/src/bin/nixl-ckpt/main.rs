//! `nixl-ckpt`: inspect, verify, copy and remove checkpoints; measure save and restore.
//!
//! ```text
//! nixl-ckpt inspect /ckpt/worker-0            # what it holds
//! nixl-ckpt verify  /ckpt/worker-0 --json     # read every chunk, check every checksum
//! nixl-ckpt copy    /ckpt/worker-0 /backup/w0 # verified, self-contained copy
//! nixl-ckpt rm      /ckpt/worker-0            # refused while an incremental over it is beside it
//! nixl-ckpt bench   /mnt/nvme/bench --size 1GiB
//! ```
//!
//! Progress goes to stderr; `--json` prints one JSON object on stdout. Exit status 0 on
//! success, 1 on failure (the error on stderr, and in the JSON as `error`), 2 on bad usage.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nixl_checkpoint::manifest::EntryKind;
use nixl_checkpoint::{ops, CkptError, Manifest, Progress};
use serde_json::{json, Value};
use throttle::Throttle;

#[derive(Parser, Debug)]
#[command(
    name = "nixl-ckpt",
    version,
    about = "Checkpoints of ready-to-serve state"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// No progress on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Connections per peer of this process's tcp backend (reads from nixl://; the backend's
    /// default, 2, when not given).
    #[arg(long, global = true, value_name = "N")]
    tcp_conns: Option<usize>,
}

/// `--tcp-conns`, for [`agent_for`].
static TCP_CONNS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show what a checkpoint holds (from its manifest).
    Inspect {
        /// Checkpoint: directory, s3://bucket/prefix or nixl://HOST:PORT.
        uri: String,
    },
    /// Read every chunk and check its checksum.
    Verify {
        /// Checkpoint: directory, s3://bucket/prefix or nixl://HOST:PORT.
        uri: String,
        /// Through an agent (s3://, nixl://): after the restore into fresh memory, restore and
        /// verify again into the same memory, now touched, and report that time too
        /// (`warm_seconds`): what the first touch of fresh memory costs (DRAM regions only).
        #[arg(long)]
        warm: bool,
    },
    /// Copy a checkpoint, verifying every chunk, into a self-contained one: between
    /// directories and s3://bucket/prefix either way (also from nixl://HOST:PORT).
    Copy {
        /// Source checkpoint.
        src: String,
        /// Destination directory or s3://bucket/prefix (must not hold a checkpoint).
        dst: String,
        /// Most host memory staged at once when the copy goes through an agent (s3:// or
        /// nixl:// at either end); raised to one chunk if a chunk is larger.
        #[arg(long, default_value = "256MiB")]
        buffer: String,
    },
    /// Remove a checkpoint (manifest first, then its data files or objects). Refused, listing
    /// them, while checkpoints beside it (same parent directory or prefix) are incremental
    /// saves over it.
    Rm {
        /// Checkpoint directory or s3://bucket/prefix.
        uri: String,
        /// Remove it even if incremental checkpoints over it are found (they stop restoring).
        #[arg(long)]
        force: bool,
    },
    /// Restore an artifact directory of a checkpoint into DEST (which must not exist, or be an
    /// empty directory): every file verified before the tree appears there.
    Artifact {
        /// Checkpoint directory.
        uri: String,
        /// The artifact directory's name (see `inspect`).
        name: String,
        /// Where to put it.
        dest: std::path::PathBuf,
    },
    /// Hold checkpoints in registered memory (every byte verified) and serve them to peers over
    /// tcp until killed: they restore from `nixl://HOST:PORT/NAME` (printed on stdout first), or
    /// `nixl://HOST:PORT` while one is served.
    Serve {
        /// Checkpoints (directory or s3://bucket/prefix), each `NAME=URI` or `URI` (the name is
        /// then the last component of its path, or --name).
        #[arg(required = true, num_args = 1..)]
        uris: Vec<String>,
        /// Listen address of the tcp backend.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Place it in the pool of the node daemon with this control socket instead, and exit:
        /// the daemon's agent serves it (at its tcp listener) until `nixl-ckpt unserve`.
        #[arg(long, value_name = "CONTROL_SOCKET")]
        daemon: Option<std::path::PathBuf>,
        /// The name of a single checkpoint given without `NAME=` (with --daemon the default
        /// is `ckpt`; the daemon's leases are named NAME/control, NAME/r0, ...).
        #[arg(long)]
        name: Option<String>,
    },
    /// Release a checkpoint placed in a daemon's pool by `serve --daemon`.
    Unserve {
        /// The name given to `serve --name`.
        #[arg(default_value = "ckpt")]
        name: String,
        /// The daemon's control socket.
        #[arg(long, value_name = "CONTROL_SOCKET")]
        daemon: std::path::PathBuf,
    },
    /// Save and restore SIZE bytes of host memory through an agent, with the GB/s of each.
    Bench {
        /// Directory to save into (removed afterwards).
        dir: String,
        /// Bytes (suffixes KiB, MiB, GiB).
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Regions the bytes are split into.
        #[arg(long, default_value_t = 4)]
        regions: usize,
        /// Chunk size (suffixes as --size).
        #[arg(long, default_value = "8MiB")]
        chunk: String,
        /// Percent of the chunks changed before an incremental save over the first one.
        #[arg(long, default_value_t = 1.0)]
        changed: f64,
        /// Buffered I/O instead of O_DIRECT.
        #[arg(long)]
        buffered: bool,
        /// Leave the full checkpoint at DIR (the incremental one is removed).
        #[arg(long)]
        keep: bool,
    },
}

mod throttle {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Lets one report through per interval.
    #[derive(Debug)]
    pub struct Throttle(Mutex<Option<Instant>>, Duration);

    impl Throttle {
        pub fn new(every: Duration) -> Throttle {
            Throttle(Mutex::new(None), every)
        }

        pub fn ready(&self) -> bool {
            let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if last.is_some_and(|l| now.duration_since(l) < self.1) {
                return false;
            }
            *last = Some(now);
            true
        }
    }
}

fn progress(quiet: bool) -> Option<Progress> {
    if quiet {
        return None;
    }
    let tty = std::io::stderr().is_terminal();
    let t = Throttle::new(if tty {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(2)
    });
    Some(Arc::new(move |phase: &str, done: u64, total: u64| {
        if done < total && !t.ready() {
            return;
        }
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let mut e = std::io::stderr().lock();
        let _ = if tty {
            write!(
                e,
                "\r{phase}: {} of {} ({pct:.0}%)   ",
                human(done),
                human(total)
            )
        } else {
            writeln!(
                e,
                "{phase}: {} of {} ({pct:.0}%)",
                human(done),
                human(total)
            )
        };
        if tty && done >= total {
            let _ = writeln!(e);
        }
    }))
}

/// This process's peak resident memory (`VmHWM`), when /proc says.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

use nixl_transports::units::parse_size;

fn manifest_json(uri: &str, m: &Manifest) -> Value {
    let metadata: Value =
        serde_json::from_str(&m.metadata).unwrap_or(Value::String(m.metadata.clone()));
    json!({
        "location": uri,
        "version": if m.artifacts.is_empty() { 1 } else { 2 },
        "save_id": format!("{:016x}", m.save_id),
        "created_unix_ms": m.created_unix_ms,
        "chunk_size": m.chunk_size,
        "base": m.base,
        "metadata": metadata,
        "bytes": m.total_bytes(),
        "regions": m.regions.iter().map(|r| json!({
            "name": r.name,
            "kind": r.kind.to_string(),
            "dev_id": r.dev_id,
            "addr": format!("{:#x}", r.addr),
            "len": r.len,
            "chunks": r.chunks.len(),
        })).collect::<Vec<_>>(),
        "files": m.files.iter().map(|f| json!({"name": f.name, "size": f.size})).collect::<Vec<_>>(),
        "artifacts": m.artifacts.iter().map(|a| {
            let (files, dirs, bytes) = artifact_counts(a);
            json!({"name": a.name, "files": files, "dirs": dirs, "bytes": bytes,
                   "entries": a.entries.iter().map(|e| json!({
                       "path": e.path,
                       "kind": if e.kind == EntryKind::Dir { "dir" } else { "file" },
                       "mode": format!("{:o}", e.mode),
                       "size": e.size,
                   })).collect::<Vec<_>>()})
        }).collect::<Vec<_>>(),
    })
}

/// (files, directories, bytes) of an artifact directory.
fn artifact_counts(a: &nixl_checkpoint::manifest::Artifact) -> (usize, usize, u64) {
    let files = a
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .count();
    let bytes = a.entries.iter().map(|e| e.size).sum();
    (files, a.entries.len() - files, bytes)
}

fn error_json(e: &CkptError) -> Value {
    let (region, chunk, written) = match e {
        CkptError::Corrupt {
            region,
            chunk,
            memory_written,
            ..
        } => (Some(region.as_str()), *chunk, Some(*memory_written)),
        CkptError::Mismatch { region, .. } | CkptError::NotFound { region, .. } => {
            (Some(region.as_str()), None, None)
        }
        _ => (None, None, None),
    };
    let mut v = json!({"ok": false, "error": e.to_string(), "region": region, "chunk": chunk, "memory_written": written});
    if let CkptError::HasDependents { dependents, .. } = e {
        v["dependents"] = json!(dependents);
    }
    v
}

fn is_s3(uri: &str) -> bool {
    uri.starts_with("s3://")
}

/// An agent with what `uris` need: `uring` and `posix` for directories, `object` for `s3://`
/// (configured from the AWS environment), `tcp` for `nixl://`.
fn agent_for(uris: &[&str]) -> Result<nixl_core::Agent, CkptError> {
    let bad = |e: nixl_core::Error| CkptError::InvalidArgument(format!("nixl-ckpt's agent: {e}"));
    let mut backends = vec!["\"uring\"", "\"posix\""];
    let s3 = uris.iter().any(|u| is_s3(u));
    if s3 {
        backends.push("\"object\"");
    }
    if uris.iter().any(|u| u.starts_with("nixl://")) {
        backends.push("\"tcp\"");
    }
    let tcp = TCP_CONNS
        .get()
        .map(|n| format!("\n[tcp]\nconns_per_peer = {n}\n"))
        .unwrap_or_default();
    let cfg = nixl_transports::config::Config::from_toml(&format!(
        "backends = [{}]{tcp}",
        backends.join(", ")
    ))
    .map_err(bad)?;
    let a = nixl_core::Agent::builder(format!("nixl-ckpt-{}", std::process::id()))
        .backends(cfg.backends().map_err(bad)?)
        .build()
        .map_err(bad)?;
    if s3 {
        a.check_backend(nixl_core::BackendName::Object)
            .map_err(bad)?;
    }
    Ok(a)
}

fn is_dir(uri: &str) -> bool {
    matches!(ops::Location::parse(uri), Ok(ops::Location::Dir(_)))
}

/// The `(name, uri)` of each `NAME=URI` or `URI` of `nixl-ckpt serve`: an unnamed one is named
/// `name` when it is the only one and `name` is given, else `fallback` when the only one, else
/// after its last path component.
fn serve_specs(
    specs: &[String],
    name: Option<&str>,
    fallback: Option<&str>,
) -> Result<Vec<(String, String)>, CkptError> {
    let one = specs.len() == 1;
    let mut out: Vec<(String, String)> = Vec::new();
    for s in specs {
        let (n, uri) = match s.split_once('=') {
            Some((n, u)) if nixl_checkpoint::serve::check_name(n).is_ok() => {
                (n.to_owned(), u.to_owned())
            }
            _ => {
                let n = match (one, name, fallback) {
                    (true, Some(n), _) | (true, None, Some(n)) => n.to_owned(),
                    _ => nixl_checkpoint::serve::default_name(s),
                };
                (n, s.clone())
            }
        };
        nixl_checkpoint::serve::check_name(&n).map_err(CkptError::InvalidArgument)?;
        if out.iter().any(|(o, _)| *o == n) {
            return Err(CkptError::InvalidArgument(format!(
                "the name {n:?} is given to two checkpoints: name them, NAME=URI"
            )));
        }
        out.push((n, uri));
    }
    Ok(out)
}

/// `nixl-ckpt serve`: never returns unless it fails.
fn serve(
    cli: &Cli,
    specs: &[String],
    name: Option<&str>,
    listen: &str,
) -> Result<Value, CkptError> {
    let specs = serve_specs(specs, name, None)?;
    let bad = |e: nixl_core::Error| CkptError::InvalidArgument(format!("serving agent: {e}"));
    if listen.contains('"') || listen.contains('\n') {
        return Err(CkptError::InvalidArgument(format!("--listen {listen:?}")));
    }
    let extra = if specs.iter().any(|(_, u)| is_s3(u)) {
        ", \"object\""
    } else {
        ""
    };
    let cfg = nixl_transports::config::Config::from_toml(&format!(
        "backends = [\"tcp\", \"uring\", \"posix\"{extra}]\n[tcp]\nlisten = \"{listen}\"\n"
    ))
    .map_err(bad)?;
    let a = nixl_core::Agent::builder(format!("nixl-ckpt-serve-{}", std::process::id()))
        .backends(cfg.backends().map_err(bad)?)
        .build()
        .map_err(bad)?;
    let mut served = Vec::with_capacity(specs.len());
    for (n, uri) in &specs {
        served.push(nixl_checkpoint::serve_named(&a, uri, n)?);
    }
    let addrs = nixl_transports::tcp::listen_addrs_in(&a.metadata());
    let at = addrs
        .first()
        .ok_or_else(|| CkptError::InvalidArgument("the tcp backend has no listener".into()))?;
    let each: Vec<Value> = specs
        .iter()
        .zip(&served)
        .map(|((n, uri), s)| {
            let m = s.manifest();
            json!({
                "name": n, "serving": uri, "uri": format!("nixl://{at}/{n}"),
                "regions": m.regions.len(), "bytes": m.total_bytes(),
            })
        })
        .collect();
    let mut v = json!({ "ok": true, "uri": format!("nixl://{at}"), "served": each });
    if let [one] = &each[..] {
        for k in ["name", "serving", "regions", "bytes"] {
            v[k] = one[k].clone();
        }
    }
    if cli.json {
        println!("{v}");
    } else {
        for ((n, uri), s) in specs.iter().zip(&served) {
            let m = s.manifest();
            println!(
                "serving {uri} ({} in {} regions) at nixl://{at}/{n}",
                human(m.total_bytes()),
                m.regions.len()
            );
        }
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

fn run(cli: &Cli) -> Result<Value, CkptError> {
    let p = progress(cli.quiet);
    match &cli.cmd {
        Cmd::Serve {
            uris,
            daemon: Some(sock),
            name,
            ..
        } => {
            let specs = serve_specs(uris, name.as_deref(), Some("ckpt"))?;
            let all: Vec<&str> = specs.iter().map(|(_, u)| u.as_str()).collect();
            let agent = agent_for(&all)?;
            let mut each = Vec::new();
            for (k, (name, uri)) in specs.iter().enumerate() {
                let d = match nixl_checkpoint::daemon::serve_in_daemon(&agent, uri, sock, name) {
                    Ok(d) => d,
                    Err(e) => {
                        // All or none: release the ones placed before this one.
                        for (n, _) in &specs[..k] {
                            let _ = nixl_checkpoint::daemon::release_from_daemon(sock, n);
                        }
                        return Err(e);
                    }
                };
                let at = d.tcp_listen.first().map(|a| format!("nixl://{a}"));
                if !cli.json {
                    println!(
                        "placed {uri} ({} in {} regions) in the pool of {} as {name}/...; served at {}/{name}",
                        human(d.manifest.total_bytes()),
                        d.manifest.regions.len(),
                        sock.display(),
                        at.as_deref().unwrap_or("(the daemon has no tcp listener)")
                    );
                }
                each.push(json!({
                    "serving": uri, "uri": at, "name": name,
                    "leases": d.leases.iter().map(|l| json!({"name": l.name, "addr": format!("{:#x}", l.addr), "len": l.len})).collect::<Vec<_>>(),
                    "regions": d.manifest.regions.len(), "bytes": d.manifest.total_bytes(),
                }));
            }
            let mut v = json!({"ok": true, "served": each});
            if let [one] = &each[..] {
                for k in ["serving", "uri", "name", "leases", "regions", "bytes"] {
                    v[k] = one[k].clone();
                }
            }
            Ok(v)
        }
        Cmd::Serve {
            uris, listen, name, ..
        } => serve(cli, uris, name.as_deref(), listen),
        Cmd::Unserve { name, daemon } => {
            let n = nixl_checkpoint::daemon::release_from_daemon(daemon, name)?;
            if !cli.json {
                println!("released {name} from {} ({n} leases)", daemon.display());
            }
            Ok(json!({"ok": true, "leases_released": n}))
        }
        Cmd::Inspect { uri } => {
            let m = if !is_dir(uri) {
                nixl_checkpoint::read_manifest_with(&agent_for(&[uri])?, uri)?
            } else {
                ops::read_manifest(uri)?
            };
            if !cli.json {
                println!(
                    "checkpoint {uri}: manifest v{}, save {:016x}, {} in {} regions, chunks of {}{}",
                    if m.artifacts.is_empty() { 1 } else { 2 },
                    m.save_id,
                    human(m.total_bytes()),
                    m.regions.len(),
                    human(m.chunk_size),
                    m.base.as_ref().map(|b| format!(", incremental over {b}")).unwrap_or_default()
                );
                println!("metadata: {}", m.metadata);
                println!(
                    "{:<24} {:<5} {:>3} {:>18} {:>14} {:>7}",
                    "REGION", "KIND", "DEV", "ADDR", "BYTES", "CHUNKS"
                );
                for r in &m.regions {
                    println!(
                        "{:<24} {:<5} {:>3} {:>#18x} {:>14} {:>7}",
                        r.name,
                        r.kind.to_string(),
                        r.dev_id,
                        r.addr,
                        r.len,
                        r.chunks.len()
                    );
                }
                if !m.artifacts.is_empty() {
                    println!(
                        "{:<24} {:>8} {:>8} {:>14}",
                        "ARTIFACT", "FILES", "DIRS", "BYTES"
                    );
                    for a in &m.artifacts {
                        let (files, dirs, bytes) = artifact_counts(a);
                        println!("{:<24} {files:>8} {dirs:>8} {bytes:>14}", a.name);
                    }
                }
            }
            Ok(manifest_json(uri, &m))
        }
        Cmd::Verify { uri, warm } => {
            let t = Instant::now();
            let mut warm_s = None;
            let r = if !is_dir(uri) {
                // Every region read into memory mapped for the purpose, every chunk checked.
                let a = agent_for(&[uri])?;
                let restored = nixl_checkpoint::restore_mapped(
                    &a,
                    uri,
                    None,
                    nixl_checkpoint::Placement::Anywhere,
                )?;
                let m = restored.manifest().clone();
                if *warm {
                    let t = Instant::now();
                    let regions: Vec<nixl_checkpoint::Region> = restored
                        .regions()
                        .iter()
                        .map(|r| nixl_checkpoint::Region::dram(r.name.clone(), r.addr, r.len))
                        .collect();
                    // SAFETY: the regions are the restore's mappings, registered, alive until
                    // `restored` drops, and not referenced meanwhile.
                    unsafe { nixl_checkpoint::restore(&a, uri, &regions, &Default::default()) }?;
                    warm_s = Some(t.elapsed().as_secs_f64());
                }
                drop(restored);
                ops::VerifyReport {
                    regions: m.regions.len(),
                    chunks: m.regions.iter().map(|r| r.chunks.len()).sum(),
                    bytes: m.total_bytes(),
                }
            } else {
                ops::verify(uri, p.as_ref())?
            };
            let s = t.elapsed().as_secs_f64() - warm_s.unwrap_or(0.0);
            if !cli.json {
                println!(
                    "ok: {} regions, {} chunks, {} verified in {s:.2} s ({:.2} GB/s)",
                    r.regions,
                    r.chunks,
                    human(r.bytes),
                    r.bytes as f64 / s / 1e9
                );
                if let Some(w) = warm_s {
                    println!(
                        "again into the same memory: {w:.2} s ({:.2} GB/s)",
                        r.bytes as f64 / w / 1e9
                    );
                }
            }
            Ok(
                json!({"ok": true, "regions": r.regions, "chunks": r.chunks, "bytes": r.bytes, "seconds": s, "warm_seconds": warm_s}),
            )
        }
        Cmd::Copy { src, dst, buffer } => {
            let buffer =
                parse_size(buffer).map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
            let m = if is_dir(src) && is_dir(dst) {
                ops::copy(src, dst, p.as_ref())?
            } else {
                nixl_checkpoint::copy_with_buffer(
                    &agent_for(&[src, dst])?,
                    src,
                    dst,
                    p.as_ref(),
                    buffer,
                )?
            };
            if !cli.json {
                println!(
                    "copied {src} to {dst}: {} in {} regions, verified",
                    human(m.total_bytes()),
                    m.regions.len()
                );
            }
            Ok(json!({
                "ok": true, "bytes": m.total_bytes(), "regions": m.regions.len(),
                "peak_rss_bytes": peak_rss(),
            }))
        }
        Cmd::Artifact { uri, name, dest } => {
            let r = if is_dir(uri) {
                nixl_checkpoint::restore_artifact(uri, name, dest)?
            } else {
                nixl_checkpoint::restore_artifact_with(&agent_for(&[uri])?, uri, name, dest)?
            };
            if !cli.json {
                println!(
                    "restored artifact {name} of {uri} into {}: {} files, {} directories, {}, verified",
                    dest.display(),
                    r.files,
                    r.dirs,
                    human(r.bytes)
                );
            }
            Ok(json!({"ok": true, "files": r.files, "dirs": r.dirs, "bytes": r.bytes}))
        }
        Cmd::Rm { uri, force } => {
            let opts = ops::RemoveOptions { force: *force };
            let n = if is_dir(uri) {
                ops::remove_opts(uri, &opts)?
            } else {
                nixl_checkpoint::remove_with_opts(&agent_for(&[uri])?, uri, &opts)?
            };
            if !cli.json {
                println!("removed {uri} ({n} files)");
            }
            Ok(json!({"ok": true, "files_removed": n}))
        }
        Cmd::Bench {
            dir,
            size,
            regions,
            chunk,
            changed,
            buffered,
            keep,
        } => {
            let size = parse_size(size).map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
            let chunk = parse_size(chunk).map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
            let v = bench::run(dir, size, *regions, chunk, *changed, !*buffered, *keep, p)?;
            if !cli.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            Ok(v)
        }
    }
}

mod bench;

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.tcp_conns {
        let _ = TCP_CONNS.set(n);
    }
    match run(&cli) {
        Ok(v) => {
            if cli.json {
                println!("{v}");
            }
        }
        Err(e) => {
            if cli.json {
                println!("{}", error_json(&e));
            }
            eprintln!("nixl-ckpt: {e}");
            std::process::exit(1);
        }
    }
}
