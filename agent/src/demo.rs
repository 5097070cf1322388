//! The two-process demo: an initiator and a target agent on one node.
//!
//! 1. The initiator starts the target as a child process; they swap metadata over the child's
//!    stdin/stdout (the only out-of-band channel; everything else goes through the agents).
//! 2. The initiator WRITEs the whole buffer into the target with a notification; the target
//!    verifies every byte when the notification arrives (so it also checks that the data landed
//!    before the notification), refills its buffer with a second pattern, and notifies back.
//! 3. The initiator READs the buffer back and verifies every byte.
//! 4. A sweep at 64 KiB, 1 MiB and 64 MiB reports GB/s for WRITE and READ next to a memcpy of the
//!    same size measured in the same run, with the ratio and the backend used.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::codec::{hex, unhex};
use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, XferOp, XferOptions, XferRequest};
use nixl_transports::shm::ShmBuffer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Options of `nixl-agent demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Bytes moved each way (suffixes KiB, MiB, GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Target memory from malloc (cross-memory attach) instead of a memfd buffer (mapped copies).
    #[arg(long)]
    pub plain: bool,
    /// Skip the 64 KiB / 1 MiB / 64 MiB sweep.
    #[arg(long)]
    pub no_sweep: bool,
    /// Force a backend (`shm`, `tcp`) instead of the selection policy's choice.
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<BackendName>,
}

fn parse_backend(s: &str) -> Result<BackendName, String> {
    BackendName::parse(s).ok_or_else(|| format!("unknown backend {s:?}"))
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            size: 1 << 30,
            plain: false,
            no_sweep: false,
            backend: None,
        }
    }
}

/// Options of the hidden target process.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long)]
    plain: bool,
}

pub use nixl_agent::config::parse_size;

fn human(n: u64) -> String {
    if n >= 1 << 30 && n % (1 << 30) == 0 {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Host memory for the demo: a memfd buffer (a peer may map it) or plain heap memory.
enum Buf {
    Shm(ShmBuffer),
    Heap(Vec<u8>),
}

impl Buf {
    fn new(len: usize, shm: bool) -> Res<Buf> {
        Ok(if shm {
            Buf::Shm(ShmBuffer::new(len)?)
        } else {
            Buf::Heap(vec![0u8; len])
        })
    }
    fn slice(&mut self) -> &mut [u8] {
        match self {
            Buf::Shm(b) => b.as_mut_slice(),
            Buf::Heap(v) => v.as_mut_slice(),
        }
    }
    fn desc(&mut self) -> Desc {
        Desc::from_mut_slice(self.slice())
    }
}

fn word(i: usize, seed: u64) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed
}

fn fill(buf: &mut [u8], seed: u64) {
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&word(i, seed).to_le_bytes());
    }
    let tail = buf.len() / 8;
    for (j, b) in buf[tail * 8..].iter_mut().enumerate() {
        *b = word(tail, seed).to_le_bytes()[j];
    }
}

/// The offset of the first byte that differs from the pattern, if any.
fn check(buf: &[u8], seed: u64) -> Option<usize> {
    for (i, c) in buf.chunks_exact(8).enumerate() {
        if c != word(i, seed).to_le_bytes() {
            let expect = word(i, seed).to_le_bytes();
            return Some(i * 8 + c.iter().zip(expect).position(|(a, b)| *a != b).unwrap_or(0));
        }
    }
    let tail = buf.len() / 8;
    let expect = word(tail, seed).to_le_bytes();
    buf[tail * 8..]
        .iter()
        .zip(expect)
        .position(|(a, b)| *a != b)
        .map(|p| tail * 8 + p)
}

/// Builds the demo's agent. The reasons a backend is unavailable go to the debug log
/// (`NIXL_LOG=debug`); the initiator prints them as one summary line.
fn agent(name: &str) -> Res<Agent> {
    let agent = Agent::builder(name)
        .backends(nixl_transports::default_backends())
        .build()?;
    for b in agent.backends() {
        if let Some(reason) = &b.unavailable {
            tracing::debug!(agent = %name, backend = %b.name, "backend unavailable: {reason}");
        }
    }
    Ok(agent)
}

/// `backends: local shm tcp uring posix; unavailable: cuda (libcuda.so.1 not found), ...`: the
/// running backends, then each unavailable one with its reason cut at its first detail.
fn backend_summary(backends: &[nixl_core::BackendState]) -> String {
    let running: Vec<String> = backends
        .iter()
        .filter(|b| b.unavailable.is_none())
        .map(|b| b.name.to_string())
        .collect();
    let unavailable: Vec<String> = backends
        .iter()
        .filter_map(|b| {
            let reason = b.unavailable.as_deref()?;
            Some(format!("{} ({})", b.name, short_reason(reason)))
        })
        .collect();
    let mut line = format!("backends: {}", running.join(" "));
    if !unavailable.is_empty() {
        line.push_str("; unavailable: ");
        line.push_str(&unavailable.join(", "));
        line.push_str(" (details: NIXL_LOG=debug)");
    }
    line
}

/// A reason up to its first `: ` or ` (`, where the details start ("libcuda.so.1 not found:
/// dlopen failed: ..." becomes "libcuda.so.1 not found").
fn short_reason(reason: &str) -> &str {
    let end = [": ", " ("]
        .iter()
        .filter_map(|sep| reason.find(sep))
        .min()
        .unwrap_or(reason.len());
    reason[..end].trim()
}

fn dram(d: Desc) -> Res<DescList> {
    Ok(DescList::from_descs(MemKind::Dram, vec![d])?)
}

/// Waits for one notification from `from`; everything else received meanwhile is an error.
fn expect_notif(agent: &Agent, from: &str, timeout: Duration) -> Res<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no notification from {from} within {timeout:?}").into());
        }
        let mut got = agent.wait_notifs(left);
        if let Some(pos) = got.iter().position(|n| n.from == from) {
            if got.len() > 1 {
                return Err(format!("unexpected extra notifications: {}", got.len()).into());
            }
            return Ok(got.swap_remove(pos).msg);
        }
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Runs the initiator side.
pub fn run(args: &DemoArgs) -> Res<()> {
    let size = usize::try_from(args.size)?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("demo-target")
        .arg("--size")
        .arg(args.size.to_string())
        .args(args.plain.then_some("--plain"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let result = drive(args, size, &mut child);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    result?;
    if !status.success() {
        return Err(format!("target process failed: {status}").into());
    }
    Ok(())
}

fn drive(args: &DemoArgs, size: usize, child: &mut std::process::Child) -> Res<()> {
    let me = agent("demo-initiator")?;
    println!("{}", backend_summary(me.backends()));
    let mut out = BufReader::new(child.stdout.take().ok_or("no child stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let md = unhex(line.strip_prefix("MD ").ok_or("target sent no metadata")?)?;
    let peer = me.load_remote(&md)?;
    let mut stdin = child.stdin.take().ok_or("no child stdin")?;
    writeln!(stdin, "MD {}", hex(&me.metadata_bytes()))?;
    stdin.flush()?;
    let remote_md = nixl_core::AgentMetadata::decode(&md)?;
    let remote = remote_md
        .regions
        .first()
        .ok_or("target registered nothing")?
        .desc;

    println!(
        "nixl-rs demo: initiator pid {} -> target pid {} on one node; target memory: {}",
        std::process::id(),
        child.id(),
        if args.plain {
            "malloc (cross-memory attach)"
        } else {
            "memfd (peer maps it)"
        }
    );

    let mut src = Buf::new(size, false)?;
    let mut back = Buf::new(size, false)?;
    fill(src.slice(), 1);
    back.slice().fill(0);
    let list = DescList::from_descs(MemKind::Dram, vec![src.desc(), back.desc()])?;
    // SAFETY: `src` and `back` outlive `reg` (dropped explicitly before them), and this thread
    // reads `back` only after the READ that writes it has completed.
    let reg = unsafe { me.register(&list)? };

    // WRITE the whole buffer; the target verifies it when the notification arrives.
    let write = me.create_xfer(
        XferOp::Write,
        &dram(src.desc())?,
        &dram(remote)?,
        &peer,
        XferOptions {
            notif: Some(b"verify 1 2".to_vec()),
            backend: args.backend,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    write.run_blocking()?;
    let secs = t.elapsed().as_secs_f64();
    let reply = expect_notif(&me, &peer, Duration::from_secs(120))?;
    if reply != b"ok" {
        return Err(format!("target says: {}", String::from_utf8_lossy(&reply)).into());
    }
    println!(
        "WRITE {:>8}  initiator -> target  {:>7.2} GB/s  backend={}  every byte verified by the target",
        human(size as u64),
        gbps(size as u64, secs),
        write.backend()
    );

    // READ it back (the target refilled it with pattern 2) and verify here.
    let read = me.create_xfer(
        XferOp::Read,
        &dram(back.desc())?,
        &dram(remote)?,
        &peer,
        XferOptions {
            backend: args.backend,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    read.run_blocking()?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(off) = check(back.slice(), 2) {
        return Err(format!("READ data differs at offset {off}").into());
    }
    println!(
        "READ  {:>8}  target -> initiator  {:>7.2} GB/s  backend={}  every byte verified by the initiator",
        human(size as u64),
        gbps(size as u64, secs),
        read.backend()
    );

    if !args.no_sweep {
        sweep(&me, &peer, &mut src, &mut back, remote, args.backend)?;
    }
    drop(reg);
    me.send_notif(&peer, b"done")?;
    Ok(())
}

/// Times `iters` runs of `req`; returns seconds per run (best of three rounds).
fn time_xfer(req: &XferRequest, iters: usize) -> Res<f64> {
    req.run_blocking()?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..iters {
            req.run_blocking()?;
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    Ok(best)
}

fn time_memcpy(dst: &mut [u8], src: &[u8], iters: usize) -> f64 {
    dst.copy_from_slice(src);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..iters {
            dst.copy_from_slice(std::hint::black_box(src));
            std::hint::black_box(&mut *dst);
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

fn sweep(
    me: &Agent,
    peer: &str,
    src: &mut Buf,
    back: &mut Buf,
    remote: Desc,
    forced: Option<BackendName>,
) -> Res<()> {
    println!();
    println!(
        "{:>8}  {:>5}  {:>9}  {:>11}  {:>6}  backend",
        "size", "op", "nixl GB/s", "memcpy GB/s", "ratio"
    );
    let avail = src.slice().len().min(remote.len as usize);
    let memcpy_src = Arc::new(vec![7u8; 64 << 20]);
    let mut memcpy_dst = vec![0u8; 64 << 20];
    for size in [64usize << 10, 1 << 20, 64 << 20] {
        if size > avail {
            println!(
                "{:>8}  skipped: buffer is only {}",
                human(size as u64),
                human(avail as u64)
            );
            continue;
        }
        let iters = ((512usize << 20) / size).clamp(4, 2000);
        let cpy = time_memcpy(&mut memcpy_dst[..size], &memcpy_src[..size], iters);
        for (op, local) in [(XferOp::Write, src.desc()), (XferOp::Read, back.desc())] {
            let req = me.create_xfer(
                op,
                &dram(Desc::new(local.addr, size as u64, 0))?,
                &dram(Desc::new(remote.addr, size as u64, remote.dev_id))?,
                peer,
                XferOptions {
                    backend: forced,
                    ..Default::default()
                },
            )?;
            let t = time_xfer(&req, iters)?;
            let (g, m) = (gbps(size as u64, t), gbps(size as u64, cpy));
            println!(
                "{:>8}  {:>5}  {:>9.2}  {:>11.2}  {:>6.2}  {}",
                human(size as u64),
                op.as_str(),
                g,
                m,
                g / m,
                req.backend()
            );
        }
    }
    Ok(())
}

/// Runs the target side: registers a buffer, serves, verifies on notification.
pub fn target(args: &TargetArgs) -> Res<()> {
    let size = usize::try_from(args.size)?;
    let me = agent("demo-target")?;
    let mut buf = Buf::new(size, !args.plain)?;
    buf.slice().fill(0);
    // SAFETY: `buf` outlives `_reg` (declared before it). The initiator writes it only between
    // our "ok" replies, and we read or refill it only when its notification says the WRITE has
    // landed, so no Rust reference is live while a transfer touches it.
    let _reg = unsafe { me.register(&dram(buf.desc())?)? };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "MD {}", hex(&me.metadata_bytes()))?;
    stdout.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let peer = me.load_remote(&unhex(
        line.strip_prefix("MD ").ok_or("no initiator metadata")?,
    )?)?;
    loop {
        let msg = expect_notif(&me, &peer, Duration::from_secs(600))?;
        let text = String::from_utf8_lossy(&msg).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["verify", seed, next] => {
                let (seed, next): (u64, u64) = (seed.parse()?, next.parse()?);
                let reply = match check(buf.slice(), seed) {
                    None => {
                        fill(buf.slice(), next);
                        "ok".to_owned()
                    }
                    Some(off) => format!("WRITE data differs at offset {off}"),
                };
                me.send_notif(&peer, reply.as_bytes())?;
            }
            ["done"] => return Ok(()),
            _ => return Err(format!("unexpected notification {text:?}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("10"), Ok(10));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn pattern_check_finds_the_first_bad_byte() {
        let mut b = vec![0u8; 1003];
        fill(&mut b, 5);
        assert_eq!(check(&b, 5), None);
        b[1001] ^= 1;
        assert_eq!(check(&b, 5), Some(1001));
        b[17] ^= 1;
        assert_eq!(check(&b, 5), Some(17));
        assert!(check(&b, 6).is_some());
    }

    #[test]
    fn backend_summary_is_one_short_line() {
        let state = |name: &str, why: Option<&str>| nixl_core::BackendState {
            name: nixl_core::BackendName::parse(name).unwrap(),
            unavailable: why.map(str::to_string),
        };
        let line = backend_summary(&[
            state("shm", None),
            state("tcp", None),
            state(
                "cuda",
                Some("libcuda.so.1 not found: dlopen failed: no such file"),
            ),
            state(
                "rdma",
                Some("no RDMA devices (ibv_get_device_list: os error 38)"),
            ),
        ]);
        assert_eq!(
            line,
            "backends: shm tcp; unavailable: cuda (libcuda.so.1 not found), \
             rdma (no RDMA devices) (details: NIXL_LOG=debug)"
        );
        assert_eq!(backend_summary(&[state("tcp", None)]), "backends: tcp");
    }
}
