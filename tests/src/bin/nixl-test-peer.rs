//! A scripted peer process for the multi-process tests.
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
//! - `exit`

use std::io::{BufRead, Write};
use std::time::Duration;

use nixl_core::{Agent, Desc, DescList, MemKind};
use nixl_tests::{fill, first_mismatch, hex, unhex};
use nixl_transports::shm::ShmBuffer;

fn main() {
    if let Err(e) = run() {
        eprintln!("nixl-test-peer: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let name = get("--name").ok_or("--name missing")?;
    let size: usize = get("--size").ok_or("--size missing")?.parse()?;
    let memfd = args.iter().any(|a| a == "--memfd");

    let agent = Agent::builder(name)
        .backends(nixl_transports::default_backends())
        .build()?;
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
            ["load", h] => match agent.load_remote(&unhex(h)?) {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("err {e}"),
            },
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
