//! KV handoffs between real processes: every prefill and decode rank is its own process (this
//! test binary run again with a role in `NIXL_KV_ROLE`), over `shm` on one host and over `tcp`
//! between two network namespaces (prefill ranks in `a`, decode ranks in `b`). Synthetic KV
//! with a known value per (layer, block, head, token, element); each decode rank checks every
//! byte of its mapped blocks at its place. Faults (between namespaces, prefill's sending rate
//! limited so a transfer stays in flight): prefill or decode SIGKILLed mid-transfer, and a lease
//! that runs out mid-READ.
//!
//! The parent only brokers metadata: each child prints `KV-META <hex>`, gets every other
//! rank's as `META <hex>` lines then `GO`, does its part, prints `KV-OK` and waits for its
//! stdin to close (so its memory outlives every peer's transfer).

mod common;
use common::{check, small_layout, worker_on, Worker};
use nixl_core::codec::{hex, unhex};

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nixl_core::Agent;
use nixl_kv::handoff::*;
use nixl_kv::*;
use nixl_transports::config::Config;

const ROLE: &str = "NIXL_KV_ROLE";
/// Prefill blocks -> decode blocks of every handoff here.
const MAPPING: [(u32, u32); 4] = [(3, 0), (4, 1), (9, 2), (12, 7)];
/// How long a child may take for its part.
const BOUND: Duration = Duration::from_secs(10);

/// `big` for the fault tests: 384 KiB per block, so a READ of the mapped blocks (1.5 MiB)
/// stays in flight for seconds behind a rate limit.
/// `mla`: one latent head, replicated on every rank.
fn shape(rank: u32, tp: u32, order: Order, big: bool, mla: bool) -> KvLayout {
    let small = small_layout(rank, tp, 16, order, mla);
    if big {
        KvLayout {
            tokens_per_block: 64,
            head_dim: 128,
            ..small
        }
    } else {
        small
    }
}

fn prefill_shape(rank: u32, tp: u32, big: bool, mla: bool) -> KvLayout {
    shape(rank, tp, Order::LayerFirstNhd, big, mla)
}

fn decode_shape(rank: u32, tp: u32, big: bool, mla: bool) -> KvLayout {
    shape(rank, tp, Order::BlockFirstHnd, big, mla)
}

/// Milliseconds since the epoch: instants compared between processes on one host.
fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// A child's role: `prefill|decode RANK PTP DTP MODE`, MODE `pull`, `push` (either with
/// `-mla`: MLA layouts, or `-big`: the fault tests' 384 KiB blocks), or a fault:
/// `killpre` (prefill is killed mid-READ), `killdec` (decode is killed mid-READ), `expire`
/// (the lease runs out mid-READ), `killpush` (prefill is killed mid-WRITE), the agent config in
/// `NIXL_KV_CONFIG`.
struct Role {
    prefill: bool,
    rank: u32,
    ptp: u32,
    dtp: u32,
    mode: String,
    /// MLA layouts (MODE ends in `-mla`).
    mla: bool,
    /// Big blocks (MODE ends in `-big`, and every fault).
    big: bool,
}

impl Role {
    fn fault(&self) -> bool {
        !matches!(self.mode.as_str(), "pull" | "push")
    }
}

fn role() -> Option<Role> {
    let r = std::env::var(ROLE).ok()?;
    let w: Vec<&str> = r.split_whitespace().collect();
    Some(Role {
        prefill: w[0] == "prefill",
        rank: w[1].parse().unwrap(),
        ptp: w[2].parse().unwrap(),
        dtp: w[3].parse().unwrap(),
        mode: w[4]
            .trim_end_matches("-mla")
            .trim_end_matches("-big")
            .to_owned(),
        mla: w[4].ends_with("-mla"),
        big: w[4].ends_with("-big") || !matches!(w[4], "pull" | "push" | "pull-mla" | "push-mla"),
    })
}

/// The child: a prefill or decode rank in its own process.
fn child(r: Role) {
    let cfg = Config::from_toml(&std::env::var("NIXL_KV_CONFIG").unwrap()).unwrap();
    let name = if r.prefill {
        format!("prefill-{}", r.rank)
    } else {
        format!("decode-{}", r.rank)
    };
    let agent = Agent::builder(&name)
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap();
    let big = r.big;
    let layout = if r.prefill {
        prefill_shape(r.rank, r.ptp, big, r.mla)
    } else {
        decode_shape(r.rank, r.dtp, big, r.mla)
    };
    let w = worker_on(agent, layout, r.prefill);
    say(&format!(
        "KV-META {} {}",
        hex(&w.agent.metadata_bytes()),
        hex(&w.layout.encode())
    ));
    // Every peer's metadata and layout (untrusted: decoded and checked), by agent name.
    let mut layouts = std::collections::HashMap::new();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        let l = lines.next().unwrap().unwrap();
        if l == "GO" {
            break;
        }
        let w2: Vec<&str> = l.split_whitespace().collect();
        assert_eq!((w2.len(), w2[0]), (3, "META"), "{l}");
        let peer = w.agent.load_remote(&unhex(w2[1]).unwrap()).unwrap();
        layouts.insert(peer, KvLayout::decode(&unhex(w2[2]).unwrap()).unwrap());
    }
    let peers = Peers(layouts);
    if r.prefill {
        prefill_child(&w, &r, &peers);
    } else {
        decode_child(&w, &r, &peers);
    }
    say("KV-OK");
    // Keep the memory until the parent says every peer is done.
    for _ in lines {}
}

/// The peers' layouts as they sent them (their own region addresses), by agent name.
struct Peers(std::collections::HashMap<String, KvLayout>);

impl Peers {
    fn get(&self, name: &str) -> KvLayout {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no layout from {name}"))
    }
}

/// The prefill group's layouts and agent names, rank order; `me` is this rank's own layout if
/// it is one of them.
fn group(ptp: u32, peers: &Peers, me: Option<KvLayout>) -> (Vec<KvLayout>, Vec<String>) {
    let names: Vec<String> = (0..ptp).map(|r| format!("prefill-{r}")).collect();
    let layouts = (0..ptp)
        .map(|r| match me {
            Some(l) if l.tp_rank == r => l,
            _ => peers.get(&names[r as usize]),
        })
        .collect();
    (layouts, names)
}

fn prefill_child(w: &Worker, r: &Role, peers: &Peers) {
    let mut pre = PrefillSide::new(&w.agent);
    let src: Vec<u32> = MAPPING.iter().map(|m| m.0).collect();
    let t = Instant::now();
    match r.mode.as_str() {
        "pull" | "killpre" | "killdec" | "expire" => {
            if r.rank != 0 {
                return;
            }
            let lease = match r.mode.as_str() {
                "killdec" | "expire" => Duration::from_secs(1),
                _ => Duration::from_secs(5),
            };
            for d in 0..r.dtp {
                pre.offer(&format!("decode-{d}"), "req-1", &src, lease)
                    .unwrap();
            }
            let mut freed = Vec::new();
            while freed.len() < r.dtp as usize {
                assert!(t.elapsed() < BOUND, "prefill: {freed:?}");
                freed.extend(pre.poll().0);
                std::thread::sleep(Duration::from_millis(2));
            }
            match r.mode.as_str() {
                "killdec" => {
                    // Decode is gone: freed after the lease and one more, not before.
                    assert!(t.elapsed() >= 2 * lease, "{:?}", t.elapsed());
                    assert_eq!(freed[0].outcome, Outcome::Failed("lease expired".into()));
                }
                "expire" => {
                    assert_ne!(freed[0].outcome, Outcome::Done);
                    say(&format!("KV-FREED {} {:?}", now_ms(), freed[0].outcome));
                }
                _ => assert!(
                    freed.iter().all(|f| f.outcome == Outcome::Done),
                    "{freed:?}"
                ),
            }
        }
        "push" | "killpush" => {
            let (g, _) = group(r.ptp, peers, Some(w.layout));
            for d in 0..r.dtp {
                let name = format!("decode-{d}");
                pre.add_decode(&name, peers.get(&name), g.clone(), r.rank)
                    .unwrap();
            }
            // The decode ranks whose heads this rank holds write to it.
            let writers = (0..r.dtp)
                .filter(|&d| {
                    plan(&g, &peers.get(&format!("decode-{d}")), &MAPPING)
                        .unwrap()
                        .iter()
                        .any(|x| x.src_rank == r.rank)
                })
                .count();
            let (mut pushed, mut freed) = (0, Vec::new());
            while freed.len() < writers {
                assert!(t.elapsed() < BOUND, "prefill: {pushed} {freed:?}");
                freed.extend(pre.poll().0);
                for res in pre.take_reservations() {
                    pre.push(&res, &src).unwrap();
                    pushed += 1;
                    if r.fault() {
                        say("KV-PUSHING");
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(
                freed.iter().all(|f| f.outcome == Outcome::Done),
                "{freed:?}"
            );
        }
        m => panic!("mode {m}"),
    }
}

fn decode_child(w: &Worker, r: &Role, peers: &Peers) {
    let mut dec = DecodeSide::new(&w.agent, w.layout).unwrap();
    let (g, names) = group(r.ptp, peers, None);
    dec.add_prefill("prefill-0", g, names).unwrap();
    let dst: Vec<u32> = MAPPING.iter().map(|m| m.1).collect();
    match r.mode.as_str() {
        "push" => {
            dec.reserve("prefill-0", "req-1", &dst, Duration::from_secs(5))
                .unwrap();
        }
        "killpush" => {
            dec.reserve("prefill-0", "req-1", &dst, Duration::from_secs(1))
                .unwrap();
        }
        _ => {}
    }
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < BOUND, "decode: no end");
        for e in dec.poll().0 {
            match e {
                DecodeEvent::Offered(o) => {
                    assert_eq!(o.request, "req-1");
                    dec.pull(&o, &dst).unwrap();
                    if r.fault() {
                        say("KV-PULLING");
                    }
                }
                DecodeEvent::Ended {
                    outcome, blocks, ..
                } => {
                    assert_eq!(blocks, dst);
                    if r.fault() {
                        // Not every byte can have landed: never reported done.
                        assert_ne!(outcome, Outcome::Done);
                        say(&format!("KV-ENDED {} {outcome:?}", now_ms()));
                    } else {
                        assert_eq!(outcome, Outcome::Done);
                        check(w, &MAPPING);
                    }
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A running child and its lines on stdout.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Proc {
    fn start(mut cmd: Command, what: String) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = nixl_testkit::child::lines_of(out);
        Proc {
            stdin: child.stdin.take(),
            child,
            lines,
            what,
        }
    }

    /// The rest of the first line starting with `prefix`, within `BOUND`.
    fn wait_for(&self, prefix: &str) -> String {
        let end = Instant::now() + BOUND;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    // The harness's `test NAME ... ` may start the line.
                    if let Some(at) = l.find(prefix) {
                        return l[at + prefix.len()..].trim().to_owned();
                    }
                }
                Err(e) => panic!("{}: no {prefix}: {e}", self.what),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the ranks run: on this host over `shm`, or prefill in namespace `a` and decode in
/// `b` over `tcp`.
enum Place {
    Shm,
    Netns(nixl_tests::netns::Lab),
}

impl Place {
    fn command(&self, test: &str, role: &str) -> Command {
        let exe = std::env::current_exe().unwrap();
        let prefill = role.starts_with("prefill");
        let (mut c, cfg) = match self {
            Place::Shm => (Command::new(&exe), "backends = [\"shm\"]".to_owned()),
            Place::Netns(lab) => {
                let i = if prefill { 0 } else { 1 };
                (
                    lab.command(i, &exe),
                    format!(
                        "backends = [\"tcp\"]\n[tcp]\nlisten = \"{}:0\"\n",
                        lab.addr(i)
                    ),
                )
            }
        };
        c.args([
            test,
            "--exact",
            "--nocapture",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env("NIXL_KV_CONFIG", cfg)
        .env("NIXL_SECRET", "nixl-kv-processes-test-secret");
        c
    }
}

/// Starts every rank, brokers the metadata, returns the processes (prefill ranks first).
fn start(place: &Place, test: &str, ptp: u32, dtp: u32, mode: &str) -> Vec<Proc> {
    let mut ps: Vec<Proc> = (0..ptp)
        .map(|r| ("prefill", r))
        .chain((0..dtp).map(|r| ("decode", r)))
        .map(|(k, r)| {
            let role = format!("{k} {r} {ptp} {dtp} {mode}");
            Proc::start(place.command(test, &role), role)
        })
        .collect();
    let metas: Vec<String> = ps.iter().map(|p| p.wait_for("KV-META ")).collect();
    for (i, p) in ps.iter_mut().enumerate() {
        for (j, m) in metas.iter().enumerate() {
            if i != j {
                p.send(&format!("META {m}"));
            }
        }
        p.send("GO");
    }
    ps
}

/// A whole handoff: every rank reports `KV-OK` (decode ranks after checking every byte),
/// then all are let go and must exit cleanly.
fn handoff(place: Place, test: &str, ptp: u32, dtp: u32, mode: &str) {
    let mut ps = start(&place, test, ptp, dtp, mode);
    for p in &ps {
        p.wait_for("KV-OK");
    }
    for p in ps.iter_mut() {
        drop(p.stdin.take());
    }
    for p in ps.iter_mut() {
        let s = p.child.wait().unwrap();
        assert!(s.success(), "{}: {s}", p.what);
    }
}

/// The lab for a netns test, or `None` after a visible skip (`nixl_testkit::skip`: a failure
/// instead under `NIXL_REQUIRE_ALL=1`, as `require!`).
fn lab(test: &str) -> Option<Place> {
    if let Some(why) = nixl_tests::netns::skip_reason() {
        nixl_testkit::skip(format!("{test}: {why}"), false, &[]);
        return None;
    }
    Some(Place::Netns(nixl_tests::netns::Lab::pair()))
}

macro_rules! cases {
    ($($name:ident: $place:ident $ptp:literal -> $dtp:literal $mode:literal;)*) => {$(
        #[test]
        fn $name() {
            if let Some(r) = role() {
                return child(r);
            }
            let place = match stringify!($place) {
                "shm" => Place::Shm,
                _ => match lab(stringify!($name)) {
                    Some(p) => p,
                    None => return,
                },
            };
            handoff(place, stringify!($name), $ptp, $dtp, $mode);
        }
    )*};
}

cases! {
    shm_pull_tp_1_to_2: shm 1 -> 2 "pull";
    shm_pull_tp_2_to_1: shm 2 -> 1 "pull";
    shm_push_tp_1_to_2: shm 1 -> 2 "push";
    shm_push_tp_2_to_1: shm 2 -> 1 "push";
    shm_pull_tp_4_to_2: shm 4 -> 2 "pull";
    shm_push_tp_4_to_2: shm 4 -> 2 "push";
    shm_pull_tp_2_to_4: shm 2 -> 4 "pull";
    shm_pull_mla_2_to_4: shm 2 -> 4 "pull-mla";
    shm_push_mla_2_to_4: shm 2 -> 4 "push-mla";
    tcp_netns_pull_tp_1_to_2: netns 1 -> 2 "pull";
    tcp_netns_pull_tp_2_to_1: netns 2 -> 1 "pull";
    tcp_netns_push_tp_1_to_2: netns 1 -> 2 "push";
    tcp_netns_push_tp_2_to_1: netns 2 -> 1 "push";
    tcp_netns_pull_tp_4_to_2: netns 4 -> 2 "pull";
    tcp_netns_push_tp_4_to_2: netns 4 -> 2 "push";
    tcp_netns_pull_mla_2_to_4: netns 2 -> 4 "pull-mla";
    shm_pull_big_blocks_tp_2_to_1: shm 2 -> 1 "pull-big";
    shm_push_big_blocks_tp_1_to_2: shm 1 -> 2 "push-big";
    tcp_netns_pull_big_blocks_tp_1_to_2: netns 1 -> 2 "pull-big";
    tcp_netns_push_big_blocks_tp_2_to_1: netns 2 -> 1 "push-big";
}

/// Starts a fault case between namespaces, prefill's sending rate limited so the READ (or
/// WRITE) of 1.5 MiB takes about 3 s; returns once it is in flight.
fn fault_start(test: &str, mode: &str) -> Option<(Place, Vec<Proc>)> {
    let place = lab(test)?;
    let Place::Netns(l) = &place else {
        unreachable!()
    };
    l.set_rate(0, 4_000_000).unwrap();
    let ps = start(&place, test, 1, 1, mode);
    if mode == "killpush" {
        ps[0].wait_for("KV-PUSHING");
    } else {
        ps[1].wait_for("KV-PULLING");
    }
    std::thread::sleep(Duration::from_millis(200));
    Some((place, ps))
}

/// The unix-ms instant at the start of what follows `prefix`.
fn at_ms(p: &Proc, prefix: &str) -> (u128, String) {
    let l = p.wait_for(prefix);
    let (ms, rest) = l.split_once(' ').unwrap();
    (ms.parse().unwrap(), rest.to_owned())
}

/// Kills prefill mid-transfer (`mode` `killpre`: mid-READ, `killpush`: mid-WRITE): decode
/// must end not-done, its blocks reported free, within 3 s of the kill (not after the 5 s
/// pull lease; a push reservation's 1 s lease and one more at the latest).
fn prefill_killed(test: &str, mode: &str) {
    if let Some(r) = role() {
        return child(r);
    }
    let Some((_place, mut ps)) = fault_start(test, mode) else {
        return;
    };
    let killed = now_ms();
    ps[0].child.kill().unwrap();
    let _ = ps[0].child.wait();
    let (ended, why) = at_ms(&ps[1], "KV-ENDED ");
    assert!(ended - killed < 3000, "{} ms: {why}", ended - killed);
    drop(ps[1].stdin.take());
    assert!(ps[1].child.wait().unwrap().success());
}

#[test]
fn tcp_netns_prefill_killed_mid_pull_fails_decode_in_bounded_time() {
    prefill_killed(
        "tcp_netns_prefill_killed_mid_pull_fails_decode_in_bounded_time",
        "killpre",
    );
}

#[test]
fn tcp_netns_prefill_killed_mid_push_frees_decode_reservation() {
    prefill_killed(
        "tcp_netns_prefill_killed_mid_push_frees_decode_reservation",
        "killpush",
    );
}

#[test]
fn tcp_netns_decode_killed_mid_pull_prefill_frees_after_the_lease() {
    const TEST: &str = "tcp_netns_decode_killed_mid_pull_prefill_frees_after_the_lease";
    if let Some(r) = role() {
        return child(r);
    }
    let Some((_place, mut ps)) = fault_start(TEST, "killdec") else {
        return;
    };
    ps[1].child.kill().unwrap();
    let _ = ps[1].child.wait();
    // Prefill checks it freed with `lease expired`, two leases after its offer at the earliest.
    ps[0].wait_for("KV-OK");
    drop(ps[0].stdin.take());
    assert!(ps[0].child.wait().unwrap().success());
}

/// The lease runs out while the READ (3 s at the rate) is in flight: the READ's deadline (inside
/// the lease) ends it, the `tcp` initiator lets go of decode's memory at once (the DATA still
/// queued is read and thrown away), decode reports the end and tells prefill, and prefill frees
/// only after that and once its listener serves decode nothing any more.
#[test]
fn tcp_netns_lease_expires_mid_pull_prefill_frees_after_the_read_ended() {
    const TEST: &str = "tcp_netns_lease_expires_mid_pull_prefill_frees_after_the_read_ended";
    if let Some(r) = role() {
        return child(r);
    }
    let Some((_place, mut ps)) = fault_start(TEST, "expire") else {
        return;
    };
    let (ended, why) = at_ms(&ps[1], "KV-ENDED ");
    let (freed, outcome) = at_ms(&ps[0], "KV-FREED ");
    // The READ (3 s at the rate) outlives the 1 s lease: decode ends Failed and lets go of the
    // memory before prefill frees it.
    assert!(
        freed >= ended,
        "freed {freed} ({outcome}) before decode ended {ended} ({why})"
    );
    for p in ps.iter_mut() {
        drop(p.stdin.take());
    }
    for p in ps.iter_mut() {
        assert!(p.child.wait().unwrap().success(), "{}", p.what);
    }
}
