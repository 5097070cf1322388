//! The topologies' set-up: one agent with two buffers (`local`), or two agent processes
//! (`shm`, `tcp`; `tcp` across two network namespaces when it can make them).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Topo {
    Local,
    Shm,
    Tcp,
}

impl Topo {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Topo::Local => "local",
            Topo::Shm => "shm",
            Topo::Tcp => "tcp",
        }
    }
}

/// The network side of the `tcp` topology.
pub(crate) struct Net {
    pub(crate) lab: Option<Lab>,
    pub(crate) target_ip: IpAddr,
    pub(crate) initiator_ip: IpAddr,
    pub(crate) what: String,
}

impl Net {
    pub(crate) fn new() -> Net {
        match skip_reason() {
            None => {
                let lab = Lab::pair();
                Net {
                    target_ip: lab.addr(1),
                    initiator_ip: lab.addr(0),
                    what: format!(
                        "two network namespaces joined by veth ({} -> {})",
                        lab.addr(0),
                        lab.addr(1)
                    ),
                    lab: Some(lab),
                }
            }
            Some(why) => Net {
                lab: None,
                target_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                initiator_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                what: format!("loopback, one network namespace ({why})"),
            },
        }
    }

    /// iperf3 from the initiator's host to the target's, `streams` streams.
    pub(crate) fn iperf3(&self, block: usize, streams: usize, seconds: f64) -> Measured {
        match &self.lab {
            Some(l) => reference_tools::iperf3(l, 1, 0, block, seconds, streams),
            None => reference_tools::iperf3_loopback(block, seconds, streams),
        }
    }

    /// ucx_perftest's one-sided put from the initiator's host to the target's.
    pub(crate) fn ucx_put_bw(&self, block: usize, iters: usize) -> Measured {
        match &self.lab {
            Some(l) => reference_tools::ucx_put_bw(l, 1, 0, block, iters),
            None => reference_tools::ucx_put_bw_loopback(block, iters),
        }
    }

    pub(crate) fn command(&self, i: usize, exe: &str) -> Command {
        match &self.lab {
            Some(l) => l.command(i, exe),
            None => Command::new(exe),
        }
    }
}

/// The `local` topology: one agent, two registered buffers, transfers to itself.
pub(crate) struct LocalSide {
    // Dropped first: deregistration before the buffers go.
    pub(crate) _reg: Registration,
    pub(crate) agent: Agent,
    /// The initiator's buffer (WRITE's source, READ's destination).
    pub(crate) a: Vec<u8>,
    /// The "target's" buffer.
    pub(crate) b: Vec<u8>,
}

/// Two agent processes: `shm` and `tcp`.
pub(crate) struct Procs {
    // Dropped before `net` (whose namespaces they run in).
    pub(crate) init: Peer,
    pub(crate) target: Peer,
    pub(crate) target_name: String,
    pub(crate) net: Option<Net>,
    pub(crate) dir: std::path::PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) enum Setup {
    Local(LocalSide),
    Procs(Box<Procs>),
}

/// Which buffer: the initiator's or the target's.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    Init,
    Target,
}

impl Setup {
    pub(crate) fn what(&self) -> String {
        match self {
            Setup::Local(_) => "one process, transfers between two of its own buffers".into(),
            Setup::Procs(p) => match &p.net {
                Some(n) => format!("two processes, {}", n.what),
                None => "two processes on this node".into(),
            },
        }
    }

    pub(crate) fn fill(&mut self, side: Side, seed: u64, part: usize, n: usize) -> Res<()> {
        match (self, side) {
            (Setup::Local(l), Side::Init) => Ok(fill_parts(&mut l.a, seed, part, n)?),
            (Setup::Local(l), Side::Target) => Ok(fill_parts(&mut l.b, seed, part, n)?),
            (Setup::Procs(p), side) => {
                let peer = p.peer(side);
                let r = peer.cmd(&format!("fill {seed} {part} {n}"));
                if r == "ok" {
                    Ok(())
                } else {
                    Err(Fail::Other(format!("fill: {r}")))
                }
            }
        }
    }

    /// The first bad offset of the destination, if any.
    pub(crate) fn check(
        &mut self,
        side: Side,
        seed: u64,
        part: usize,
        n: usize,
    ) -> Res<Option<usize>> {
        match (self, side) {
            (Setup::Local(l), Side::Init) => Ok(check_parts(&l.a, seed, part, n)?),
            (Setup::Local(l), Side::Target) => Ok(check_parts(&l.b, seed, part, n)?),
            (Setup::Procs(p), side) => {
                let r = p.peer(side).cmd(&format!("check {seed} {part} {n}"));
                match r.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["ok"] => Ok(None),
                    ["bad", off] => Ok(Some(off.parse()?)),
                    _ => Err(Fail::Other(format!("check: {r}"))),
                }
            }
        }
    }

    pub(crate) fn poke(&mut self, side: Side, off: usize) -> Res<()> {
        let buf = match (self, side) {
            (Setup::Local(l), Side::Init) => &mut l.a,
            (Setup::Local(l), Side::Target) => &mut l.b,
            (Setup::Procs(p), side) => {
                let r = p.peer(side).cmd(&format!("poke {off}"));
                return if r == "ok" {
                    Ok(())
                } else {
                    Err(Fail::Other(format!("poke: {r}")))
                };
            }
        };
        let b = buf
            .get_mut(off)
            .ok_or_else(|| Fail::Other(format!("--test-corrupt-at {off}: past the buffer")))?;
        *b ^= 0xff;
        Ok(())
    }

    /// Runs one row; returns what the initiator measured.
    pub(crate) fn bench(&mut self, spec: &BenchSpec, backend_arg: &str) -> Res<Row> {
        match self {
            Setup::Local(l) => {
                let a = Desc::new(l.a.as_ptr() as u64, l.a.len() as u64, 0);
                let b = Desc::new(l.b.as_ptr() as u64, l.b.len() as u64, 0);
                match nixl_tests::scripted_peer::bench(&l.agent, l.agent.name(), a, b, spec) {
                    Ok(r) => Ok(Row {
                        gbps: r.gbps,
                        posts: r.posts,
                        p50_us: r.p50_us,
                        p99_us: r.p99_us,
                        backend: r.backend.to_string(),
                        seconds: r.seconds,
                        create_us: r.create_us,
                    }),
                    Err(BenchError::Unavailable(e)) => {
                        Err(Fail::Unavailable(backend_arg.into(), e.to_string()))
                    }
                    Err(e) => Err(Fail::Other(e.to_string())),
                }
            }
            Setup::Procs(p) => {
                let mut c = format!(
                    "bench {} {} {} {} {} threads={} iters={} warmup={}",
                    p.target_name,
                    spec.op.as_str(),
                    spec.block,
                    spec.batch,
                    spec.seconds,
                    spec.threads,
                    spec.iters,
                    spec.warmup
                );
                if let Some(b) = spec.backend {
                    c += &format!(" backend={b}");
                }
                if spec.mode != BenchMode::Plain {
                    c += &format!(" mode={}", spec.mode.as_str());
                }
                let r = p.init.cmd(&c);
                if let Some(why) = r.strip_prefix("unavailable ") {
                    return Err(Fail::Unavailable(backend_arg.into(), why.into()));
                }
                let w: Vec<&str> = r.split_whitespace().collect();
                if w.first() != Some(&"ok") || w.len() < 8 {
                    return Err(Fail::Other(format!("bench: {r}")));
                }
                Ok(Row {
                    gbps: w[1].parse()?,
                    posts: w[2].parse()?,
                    p50_us: w[3].parse()?,
                    p99_us: w[4].parse()?,
                    backend: w[5].into(),
                    seconds: w[6].parse()?,
                    create_us: w[7].parse()?,
                })
            }
        }
    }
}

impl Procs {
    pub(crate) fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Init => &mut self.init,
            Side::Target => &mut self.target,
        }
    }
}

/// What the initiator measured for one row.
pub(crate) struct Row {
    pub(crate) gbps: f64,
    pub(crate) posts: u64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) backend: String,
    pub(crate) seconds: f64,
    /// Median time to create one request, µs.
    pub(crate) create_us: f64,
}

/// Builds the `local` topology with buffers of `size` bytes.
pub(crate) fn local_setup(backends: &str, size: usize) -> Res<LocalSide> {
    let cfg = Config::from_toml(backends)?;
    let agent = Agent::builder("bench-local")
        .backends(cfg.backends()?)
        .build()?;
    // Filled, so every page is faulted in before timing.
    let mut a = vec![1u8; size];
    let mut b = vec![2u8; size];
    let list = DescList::from_descs(
        MemKind::Dram,
        vec![Desc::from_mut_slice(&mut a), Desc::from_mut_slice(&mut b)],
    )?;
    // SAFETY: `a` and `b` are moved into the `LocalSide` that also holds the registration,
    // which is dropped (deregistered) first; moving a Vec does not move its heap buffer. This
    // process touches the buffers (fill, check, poke) only between rows, when no transfer runs.
    let reg = unsafe { agent.register(&list)? };
    Ok(LocalSide {
        _reg: reg,
        agent,
        a,
        b,
    })
}

/// Starts the two agent processes of `shm` or `tcp`, with buffers of `size` bytes.
pub(crate) fn procs_setup(topo: Topo, args: &Args, backends: &str, size: usize) -> Res<Procs> {
    let dir = std::env::temp_dir().join(format!("nixl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let write_cfg = |name: &str, body: &str| -> Res<String> {
        let p = dir.join(name);
        std::fs::write(&p, format!("{backends}{body}"))?;
        Ok(p.to_string_lossy().into_owned())
    };
    match topo {
        Topo::Shm => {
            let tcfg = write_cfg("target.toml", "")?;
            let icfg = write_cfg("initiator.toml", "")?;
            let mut t = Command::new(&exe);
            t.args(["--peer-mode", "--config", &tcfg]);
            if !args.plain {
                t.arg("--memfd");
            }
            let target = Peer::spawn(t, "bench-target", size);
            let mut i = Command::new(&exe);
            i.args(["--peer-mode", "--config", &icfg]);
            let mut init = Peer::spawn(i, "bench-initiator", size);
            let r = init.cmd(&format!("load {}", nixl_tests::hex(&target.metadata)));
            if !r.starts_with("ok") {
                return Err(Fail::Other(format!(
                    "initiator could not load the target: {r}"
                )));
            }
            Ok(Procs {
                init,
                target,
                target_name: "bench-target".into(),
                net: None,
                dir,
            })
        }
        Topo::Tcp | Topo::Local => {
            let net = Net::new();
            let secret = format!("{:016x}", nixl_core::random_u64()?);
            let mut tuning = String::new();
            if let Some(c) = args.conns {
                tuning += &format!("conns_per_peer = {c}\n");
            }
            if let Some(c) = args.chunk {
                tuning += &format!("chunk_bytes = {c}\n");
            }
            if let Some(w) = args.window {
                tuning += &format!("window = {w}\n");
            }
            let target_addr =
                SocketAddr::new(net.target_ip, 17000 + (std::process::id() % 1000) as u16);
            let auth = if args.tls == "off" {
                "allow_open = true\n".to_owned()
            } else {
                format!("secret = \"{secret}\"\n")
            };
            let body =
                |listen: String| format!("[tcp]\nlisten = \"{listen}\"\n{tuning}[auth]\n{auth}");
            let tcfg = write_cfg("target.toml", &body(target_addr.to_string()))?;
            let icfg = write_cfg(
                "initiator.toml",
                &body(SocketAddr::new(net.initiator_ip, 0).to_string()),
            )?;
            let start = |i: usize, name: &str, cfg: &str| {
                let mut c = net.command(i, &exe);
                c.args(["--peer-mode", "--config", cfg]);
                Peer::spawn(c, name, size)
            };
            let target = start(1, "bench-target", &tcfg);
            let mut init = start(0, "bench-initiator", &icfg);
            let r = init.cmd(&format!("fetch {target_addr}"));
            if !r.starts_with("ok") {
                return Err(Fail::Other(format!(
                    "initiator could not reach the target: {r}"
                )));
            }
            Ok(Procs {
                init,
                target,
                target_name: "bench-target".into(),
                net: Some(net),
                dir,
            })
        }
    }
}

/// Why backend `b` cannot run on this host (its own probe), or `None` when it can.
pub(crate) fn probe_reason(b: &str) -> Option<String> {
    let cfg = Config::from_toml(&format!("backends = [\"{b}\"]\n")).ok()?;
    let backends = cfg.backends().ok()?;
    backends
        .iter()
        .find_map(|x| x.probe().err().map(|e| e.to_string()))
}
