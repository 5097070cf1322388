//! Floods against a real `tcp` listener: thousands of idle connections and a notification
//! flood leave the target's fds, threads and memory bounded by its configuration, while a
//! legitimate peer keeps being served. The flooding connections come from a child process (this
//! test binary run again), so that the fds and threads counted in `/proc/self` are the target's.
//!
//! The figures are printed (`--nocapture` shows them).

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use nixl_core::*;
use nixl_transports::tcp::{fetch_metadata, Auth, TcpBackend, TcpConfig};

/// The tests measure the whole process: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snap
    })
}

/// A counter's total so far (a snapshot drains every counter: the totals are kept here).
fn counter(name: &str) -> u64 {
    static TOTALS: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    for (k, _, _, v) in snapshotter().snapshot().into_vec() {
        if let DebugValue::Counter(c) = v {
            let key = k.key().name().to_owned();
            match totals.iter_mut().find(|(n, _)| *n == key) {
                Some((_, t)) => *t += c,
                None => totals.push((key, c)),
            }
        }
    }
    totals
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, t)| *t)
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until `f` holds, at most `secs` seconds; returns whether it did.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// The flooding child: `NIXL_FLOOD=addr,count,first_octet,sources` opens `count` connections to
/// `addr` from 127.0.0.{first_octet..first_octet+sources}, sends nothing, says `ready`, and holds
/// them until its stdin closes.
#[test]
#[ignore = "run by the flood tests as their child process"]
fn flood_child() {
    let Ok(spec) = std::env::var("NIXL_FLOOD") else {
        return;
    };
    let v: Vec<&str> = spec.split(',').collect();
    let to: SocketAddrV4 = v[0].parse().unwrap();
    let (count, first, sources): (usize, u8, u8) = (
        v[1].parse().unwrap(),
        v[2].parse().unwrap(),
        v[3].parse().unwrap(),
    );
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let src = Ipv4Addr::new(127, 0, 0, first + (i % usize::from(sources)) as u8);
        held.push(connect_from(src, to));
    }
    // Straight to fd 1: the test harness may capture `println!`.
    let line = format!("ready {}\n", held.iter().filter(|s| s.is_some()).count());
    // SAFETY: writes the bytes of a live String to stdout.
    let n = unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
    assert_eq!(n, line.len() as isize);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn connect_from(src: Ipv4Addr, to: SocketAddrV4) -> Option<TcpStream> {
    // SAFETY: a fresh socket; the sockaddrs are live locals of the size passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let s = TcpStream::from_raw_fd(fd);
        let me = sockaddr(SocketAddrV4::new(src, 0));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&me as *const libc::sockaddr_in).cast(), len) != 0 {
            return None;
        }
        let there = sockaddr(to);
        if libc::connect(fd, (&there as *const libc::sockaddr_in).cast(), len) != 0 {
            return None;
        }
        Some(s)
    }
}

/// Starts the flooding child; returns it once its connections are open, and how many are.
// The caller waits for the child in `end`; a panic on the way ends the whole test binary.
#[allow(clippy::zombie_processes)]
fn flood(to: SocketAddr, count: usize, first: u8, sources: u8) -> (std::process::Child, usize) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "flood_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NIXL_FLOOD", format!("{to},{count},{first},{sources}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            let status = child.wait();
            panic!("flood child ended: {status:?}");
        }
        // The harness may have printed "test flood_child ... " on the same line.
        if let Some(n) = line.trim().split("ready ").nth(1) {
            // Keep the pipe open (the child prints more at exit).
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = out.read_to_end(&mut sink);
            });
            return (child, n.parse().unwrap());
        }
    }
}

fn end(mut child: std::process::Child) {
    drop(child.stdin.take());
    child.wait().unwrap();
}

/// Fields drop in order: the registrations first, then the agents, then the buffers.
struct Pair {
    _regs: Vec<Registration>,
    a: Agent,
    b: Agent,
    tb: Arc<TcpBackend>,
    src: Vec<u8>,
    dst: Vec<u8>,
    back: Vec<u8>,
}

fn pair(cfg: TcpConfig, b_notif_bytes: Option<usize>) -> Pair {
    let tcp = |cfg: TcpConfig| TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: Auth::with_secret("flood"),
        ..cfg
    };
    let tb = Arc::new(TcpBackend::new(tcp(cfg)));
    let mut bb = Agent::builder("flood-b").backend(tb.clone());
    if let Some(n) = b_notif_bytes {
        bb = bb.notif_queue_bytes(n);
    }
    let b = bb.build().unwrap();
    let a = Agent::builder("flood-a")
        .backend(Arc::new(TcpBackend::new(tcp(TcpConfig::default()))))
        .build()
        .unwrap();
    let src: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 + 3) as u8).collect();
    let dst = vec![0u8; 4 << 20];
    let back = vec![0u8; 4 << 20];
    let one =
        |buf: &[u8]| DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(buf)]).unwrap();
    // SAFETY: the buffers outlive their registrations (`Pair` drops the registrations first, and
    // moving a Vec does not move its heap memory); they are read only after transfers end.
    let regs = unsafe {
        vec![
            a.register(&one(&src)).unwrap(),
            a.register(&one(&back)).unwrap(),
            b.register(&one(&dst)).unwrap(),
        ]
    };
    a.load_remote(&b.metadata_bytes()).unwrap();
    Pair {
        _regs: regs,
        a,
        b,
        tb,
        src,
        dst,
        back,
    }
}

impl Pair {
    /// WRITE `src` to the peer and READ it back into `back`; checks every byte.
    fn round_trip(&mut self) {
        let one =
            |buf: &[u8]| DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(buf)]).unwrap();
        self.back.iter_mut().for_each(|b| *b = 0);
        for (op, local) in [(XferOp::Write, &self.src), (XferOp::Read, &self.back)] {
            let x = self
                .a
                .create_xfer(
                    op,
                    &one(local),
                    &one(&self.dst),
                    "flood-b",
                    XferOptions::default(),
                )
                .unwrap();
            x.run_blocking().unwrap();
        }
        assert!(self.back == self.src, "data read back differs");
    }
}

#[test]
fn thousands_of_idle_connections_leave_fds_and_threads_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    snapshotter();
    const CAP: usize = 256;
    const PER_IP: usize = 64;
    let mut p = pair(
        TcpConfig {
            max_conns: CAP,
            max_conns_per_ip: PER_IP,
            // The flood's connections sit idle for the whole test, as idle authenticated
            // connections would (they never start their handshake: its deadline, which would
            // close them after 5 s, is set past the test too).
            connect_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(60),
            ..TcpConfig::default()
        },
        None,
    );
    p.round_trip();
    let to = p.tb.listen_addrs()[0];
    let (fd0, th0, rss0) = (fds(), threads(), rss_kib());

    // 5,000 connections from 20 addresses: the total cap holds.
    let t = Instant::now();
    let (child, open) = flood(to, 5000, 2, 20);
    let refused0 = 5000 - CAP;
    let counted = eventually(20, || {
        counter("nixl_tcp_conns_refused_total") >= refused0 as u64
    });
    let (fd1, th1, rss1) = (fds(), threads(), rss_kib());
    println!(
        "5000 idle connections from 20 addresses ({open} connected, {:?}): fds {fd0} -> {fd1}, \
         threads {th0} -> {th1}, rss {rss0} -> {rss1} KiB, refused {}",
        t.elapsed(),
        counter("nixl_tcp_conns_refused_total")
    );
    assert!(counted, "refusals not counted");
    assert!(fd1 <= fd0 + CAP + 8, "fds {fd0} -> {fd1}");
    assert!(th1 <= th0 + CAP + 4, "threads {th0} -> {th1}");
    assert!(rss1 < rss0 + 64 * 1024, "rss {rss0} -> {rss1} KiB");
    // The peer's session keeps being served.
    p.round_trip();
    end(child);
    assert!(
        eventually(20, || fds() <= fd0 + 4 && threads() <= th0 + 2),
        "the flood's connections were not let go: fds {}, threads {}",
        fds(),
        threads()
    );

    // 1,000 connections from one address: that address's cap holds, and a new peer from another
    // address still gets in.
    let before = counter("nixl_tcp_conns_refused_total");
    let (child, _) = flood(to, 1000, 2, 1);
    assert!(eventually(20, || counter("nixl_tcp_conns_refused_total")
        >= before + (1000 - PER_IP) as u64));
    let fd2 = fds();
    println!("1000 idle connections from one address: fds {fd0} -> {fd2}");
    assert!(fd2 <= fd0 + PER_IP + 8, "fds {fd0} -> {fd2}");
    let md = fetch_metadata(
        &to.to_string(),
        &Auth::with_secret("flood"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!md.is_empty());
    p.round_trip();
    end(child);
}

#[test]
fn a_notification_flood_is_refused_to_the_sender_within_the_byte_budget() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    snapshotter();
    const BUDGET: usize = 32 << 20;
    let mut p = pair(TcpConfig::default(), Some(BUDGET));
    p.round_trip();
    let rss0 = rss_kib();
    let msg = vec![0x5a_u8; 1 << 20];
    let (mut ok, mut refused) = (0usize, 0usize);
    let t = Instant::now();
    for _ in 0..600 {
        match p.a.send_notif("flood-b", &msg) {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.class(), ErrorClass::Denied, "{e}");
                assert!(e.to_string().contains("too slowly"), "{e}");
                refused += 1;
            }
        }
    }
    let rss1 = rss_kib();
    println!(
        "600 notifications of 1 MiB to a queue of {BUDGET} bytes ({:?}): {ok} queued, \
         {refused} refused, rss {rss0} -> {rss1} KiB",
        t.elapsed()
    );
    assert!(ok * ((1 << 20) + 64) <= BUDGET && ok >= 30, "{ok} queued");
    assert_eq!(ok + refused, 600);
    assert!(rss1 < rss0 + 160 * 1024, "rss {rss0} -> {rss1} KiB");
    assert!(counter("nixl_notifs_dropped_total") >= refused as u64);
    // Data keeps moving, and once the owner takes its notifications there is room again.
    p.round_trip();
    assert_eq!(p.b.take_notifs().len(), ok);
    p.a.send_notif("flood-b", &msg).unwrap();
}
