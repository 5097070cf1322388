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
//! - `bench <peer> <read|write> <block> <batch> <seconds>`: repeats a request of `batch`
//!   descriptors of `block` bytes for about `seconds` (after one warm-up post) →
//!   `ok <GB/s> <posts> <p50 µs> <p99 µs>` (post-to-complete latency), or `err ...`
//! - `fetch <addr>` / `push <addr>`: metadata over a peer's tcp listener → `ok <name>`
//! - `exit`
//!
//! Flags: `--name`, `--size`, `--memfd`, `--config FILE` (the agent's TOML configuration).

use std::io::{BufRead, Write};
use std::time::Duration;

use std::collections::HashMap;
use std::time::Instant;

use crate::{fill, first_mismatch, hex, unhex};
use nixl_core::{Agent, AgentMetadata, Desc, DescList, MemKind, XferOp, XferOptions};
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
            ["bench", peer, op, block, batch, secs] => {
                let remote = remotes.get(*peer).copied().ok_or("peer not loaded")?;
                let block: usize = block.parse()?;
                let batch: usize = batch.parse()?;
                let until = Duration::from_secs_f64(secs.parse()?);
                if block * batch > buf.len().min(remote.len as usize) {
                    "err invalid block*batch is over the buffer".to_owned()
                } else {
                    let local = DescList::from_descs(
                        MemKind::Dram,
                        (0..batch)
                            .map(|i| Desc::from_slice(&buf[i * block..(i + 1) * block]))
                            .collect::<Vec<_>>(),
                    )?;
                    let remote = DescList::from_descs(
                        MemKind::Dram,
                        (0..batch)
                            .map(|i| Desc::new(remote.addr + (i * block) as u64, block as u64, 0))
                            .collect::<Vec<_>>(),
                    )?;
                    let res = agent
                        .create_xfer(parse_op(op)?, &local, &remote, peer, XferOptions::default())
                        .and_then(|x| {
                            x.run_blocking()?; // warm-up
                            let t = Instant::now();
                            let mut lat = Vec::with_capacity(1 << 16);
                            while t.elapsed() < until {
                                let p = Instant::now();
                                x.run_blocking()?;
                                lat.push(p.elapsed().as_secs_f64() * 1e6);
                            }
                            let bytes = lat.len() as f64 * (block * batch) as f64;
                            let gbps = bytes / t.elapsed().as_secs_f64() / 1e9;
                            lat.sort_by(f64::total_cmp);
                            let pct = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
                            Ok(format!(
                                "ok {gbps:.4} {} {:.1} {:.1}",
                                lat.len(),
                                pct(0.5),
                                pct(0.99)
                            ))
                        });
                    res.unwrap_or_else(|e| format!("err {} 0 {e}", e.metric_label()))
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
