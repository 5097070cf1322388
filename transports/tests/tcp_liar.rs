//! A lying target: a fake agent that does the real handshake and speaks the `tcp` wire format
//! over real sockets, then answers the chunks of a READ wrongly: twice, under a chunk or request
//! nobody asked for, with more bytes than asked, with the wrong kind of answer, or after the
//! request ended. The initiator must fail the post, write nothing outside the request's
//! descriptors, and write nothing once the post has ended.
//!
//! The initiator's buffer is mapped with an inaccessible page on each side and sentinel bytes
//! around and between the descriptors; once a post has ended, the buffer is deregistered and
//! unmapped and a fresh mapping made at the same address, and the lying target then sends the
//! rest of what it held back: the fresh mapping must stay as it was.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixl_core::metadata::{BackendInfo, RegionInfo};
use nixl_core::*;
use nixl_transports::fuzzing::{conn_info_for, raw_listener_opening, RawConnection};
use nixl_transports::tcp::{Auth, PeerIdentity, TcpBackend, TcpConfig};

const PAGE: usize = 4096;
/// The mapping: guard, sentinel, descriptor A (2 pages), sentinel, descriptor B (2 pages),
/// sentinel, guard.
const MAP_PAGES: usize = 9;
const A: usize = 2 * PAGE;
const B: usize = 5 * PAGE;
const DESC: usize = 2 * PAGE;
const SENTINEL: u8 = 0x11;
const FRESH: u8 = 0x22;
const LIAR_BYTE: u8 = 0xab;
const LIAR_INSTANCE: u128 = 0x1ea5_0000_0000_0000_0000_0000_0000_0001;
const REMOTE: u64 = 0x10_0000_0000;
const KEY: u64 = 77;

/// What the fake target does with the chunks it is asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lie {
    /// Answers every chunk correctly.
    Honest,
    /// Answers chunk 0 twice.
    Duplicate,
    /// Answers chunk 0 as chunk 99.
    UnknownChunk,
    /// Answers chunk 0 under another request id.
    UnknownRequest,
    /// Answers chunk 0 with a page more than it asked for.
    Oversized,
    /// Answers READ chunk 0 with an ACK (no data).
    AckForRead,
    /// Answers chunks 0 and 2 twice each (four answers, as many as the request has chunks)
    /// while holding back the second half of chunk 1 on the other connection until released.
    Race,
    /// Answers everything, then, when released, chunk 0 again.
    Late,
}

struct Liar {
    addr: SocketAddr,
    lie: Arc<Mutex<Lie>>,
    release: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
    closed: mpsc::Receiver<()>,
}

fn read_frame(s: &mut RawConnection) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 1];
    s.read_exact(&mut body)?;
    Ok((head[4], body))
}

/// DATA: id, chunk, status, len, text; then `len` raw bytes follow.
fn data_head(id: u64, chunk: u32, len: u64) -> Vec<u8> {
    let mut f = Vec::new();
    let body_len = 1 + 8 + 4 + 1 + 8 + 2;
    f.extend_from_slice(&(body_len as u32).to_le_bytes());
    f.push(18);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&chunk.to_le_bytes());
    f.push(0);
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f
}

fn ack(id: u64, chunk: u32) -> Vec<u8> {
    let mut f = Vec::new();
    let body_len = 1 + 8 + 4 + 1 + 2;
    f.extend_from_slice(&(body_len as u32).to_le_bytes());
    f.push(17);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&chunk.to_le_bytes());
    f.push(0);
    f.extend_from_slice(&0u16.to_le_bytes());
    f
}

fn answer(s: &mut RawConnection, id: u64, chunk: u32, len: u64) -> std::io::Result<()> {
    s.write_all(&data_head(id, chunk, len))?;
    s.write_all(&vec![LIAR_BYTE; len as usize])
}

impl Liar {
    fn start() -> Liar {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let lie = Arc::new(Mutex::new(Lie::Honest));
        let release: Arc<Mutex<Option<mpsc::Receiver<()>>>> = Arc::new(Mutex::new(None));
        let (closed_tx, closed) = mpsc::channel();
        let (lie2, rel2) = (Arc::clone(&lie), Arc::clone(&release));
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let (lie, rel, closed_tx) =
                    (Arc::clone(&lie2), Arc::clone(&rel2), closed_tx.clone());
                std::thread::spawn(move || {
                    let me = PeerIdentity::new("liar", LIAR_INSTANCE);
                    let Ok((_, _, mut s)) = raw_listener_opening(s, &Auth::host_only(), &me) else {
                        return;
                    };
                    let _ = serve(&mut s, &lie, &rel);
                    let _ = closed_tx.send(());
                });
            }
        });
        Liar {
            addr,
            lie,
            release,
            closed,
        }
    }

    fn set(&self, lie: Lie) -> mpsc::Sender<()> {
        *self.lie.lock().unwrap() = lie;
        let (tx, rx) = mpsc::channel();
        *self.release.lock().unwrap() = Some(rx);
        tx
    }

    fn metadata(&self) -> AgentMetadata {
        AgentMetadata {
            name: "liar".into(),
            instance_id: LIAR_INSTANCE,
            generation: 1,
            partial: false,
            backends: vec![BackendInfo {
                name: BackendName::Tcp,
                conn_info: conn_info_for(&[self.addr]),
            }],
            regions: vec![RegionInfo {
                kind: MemKind::Dram,
                desc: Desc::new(REMOTE, 1 << 20, 0),
                key: KEY,
                backends: vec![(BackendName::Tcp, Vec::new())],
            }],
        }
    }
}

fn wait_release(rel: &Mutex<Option<mpsc::Receiver<()>>>) {
    let rx = rel.lock().unwrap().take();
    if let Some(rx) = rx {
        let _ = rx.recv_timeout(Duration::from_secs(20));
    }
}

/// Answers the READ frames of one connection as the current lie says.
fn serve(
    s: &mut RawConnection,
    lie: &Mutex<Lie>,
    rel: &Mutex<Option<mpsc::Receiver<()>>>,
) -> std::io::Result<()> {
    loop {
        let (ty, body) = read_frame(s)?;
        assert_eq!(ty, 3, "the initiator only READs here");
        let id = u64::from_le_bytes(body[..8].try_into().unwrap());
        let chunk = u32::from_le_bytes(body[8..12].try_into().unwrap());
        let n = u32::from_le_bytes(body[12..16].try_into().unwrap()) as usize;
        let total: u64 = (0..n)
            .map(|i| {
                let p = &body[16 + i * 24..16 + (i + 1) * 24];
                u64::from_le_bytes(p[8..16].try_into().unwrap())
            })
            .sum();
        let lie = *lie.lock().unwrap();
        match (lie, chunk) {
            (Lie::Duplicate, 0) => {
                answer(s, id, chunk, total)?;
                answer(s, id, chunk, total)?;
            }
            (Lie::UnknownChunk, 0) => answer(s, id, 99, total)?,
            (Lie::UnknownRequest, 0) => answer(s, id + 1000, chunk, total)?,
            (Lie::Oversized, 0) => answer(s, id, chunk, total + PAGE as u64)?,
            (Lie::AckForRead, 0) => s.write_all(&ack(id, chunk))?,
            (Lie::Race, 0 | 2) => {
                answer(s, id, chunk, total)?;
                answer(s, id, chunk, total)?;
            }
            (Lie::Race, 1) => {
                s.write_all(&data_head(id, chunk, total))?;
                s.write_all(&vec![LIAR_BYTE; total as usize / 2])?;
                wait_release(rel);
                s.write_all(&vec![LIAR_BYTE; total as usize - total as usize / 2])?;
            }
            (Lie::Late, 3) => {
                answer(s, id, chunk, total)?;
                wait_release(rel);
                answer(s, id, 0, 2 * PAGE as u64)?;
                answer(s, id, chunk, total)?;
            }
            _ => answer(s, id, chunk, total)?,
        }
    }
}

/// An anonymous mapping of MAP_PAGES pages, the first and last inaccessible, the rest filled with
/// the sentinel.
struct Mapping {
    base: usize,
}

impl Mapping {
    fn new() -> Mapping {
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let m = Mapping { base: p as usize };
        m.guard();
        m.fill(SENTINEL);
        m
    }

    fn guard(&self) {
        for page in [0, MAP_PAGES - 1] {
            // SAFETY: the page lies inside our own mapping.
            let r = unsafe {
                libc::mprotect(
                    (self.base + page * PAGE) as *mut libc::c_void,
                    PAGE,
                    libc::PROT_NONE,
                )
            };
            assert_eq!(r, 0);
        }
    }

    fn inner(&self) -> (usize, usize) {
        (self.base + PAGE, (MAP_PAGES - 2) * PAGE)
    }

    fn fill(&self, v: u8) {
        let (at, len) = self.inner();
        // SAFETY: the accessible pages of our mapping; no transfer holds them now.
        unsafe { std::ptr::write_bytes(at as *mut u8, v, len) };
    }

    /// The accessible pages, copied.
    fn bytes(&self) -> Vec<u8> {
        let (at, len) = self.inner();
        // SAFETY: as in `fill`; read only.
        unsafe { std::slice::from_raw_parts(at as *const u8, len) }.to_vec()
    }

    /// Frees the mapping and maps fresh memory at the same address, filled with `FRESH`.
    fn free_and_remap(&self) {
        // SAFETY: our own mapping, no longer registered.
        let r = unsafe { libc::munmap(self.base as *mut libc::c_void, MAP_PAGES * PAGE) };
        assert_eq!(r, 0);
        // SAFETY: NOREPLACE maps only where nothing is mapped: it cannot clobber anything.
        let p = unsafe {
            libc::mmap(
                self.base as *mut libc::c_void,
                MAP_PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(
            p as usize, self.base,
            "could not map again at the freed address"
        );
        self.guard();
        self.fill(FRESH);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.base as *mut libc::c_void, MAP_PAGES * PAGE) };
    }
}

struct Setup {
    agent: Agent,
    liar: Liar,
}

fn setup() -> Setup {
    let liar = Liar::start();
    let tcp = TcpBackend::new(TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        conns_per_peer: 2,
        chunk_bytes: PAGE,
        io_timeout: Duration::from_secs(3),
        auth: Auth::host_only(),
        ..TcpConfig::default()
    });
    let agent = Agent::builder("reader")
        .backend(Arc::new(tcp))
        .build()
        .unwrap();
    agent.load_remote_md(liar.metadata()).unwrap();
    Setup { agent, liar }
}

/// Registers the mapping's inner pages and READs 4 chunks into descriptors A and B.
fn read_request(s: &Setup, m: &Mapping) -> (Registration, XferRequest) {
    let (at, len) = m.inner();
    let list =
        DescList::from_descs(MemKind::Dram, vec![Desc::new(at as u64, len as u64, 0)]).unwrap();
    // SAFETY: the mapping outlives the registration (every test drops the registration first),
    // and the test reads it only once the transfers on it have ended.
    let reg = unsafe { s.agent.register(&list) }.unwrap();
    let local = DescList::from_descs(
        MemKind::Dram,
        vec![
            Desc::new((m.base + A) as u64, DESC as u64, 0),
            Desc::new((m.base + B) as u64, DESC as u64, 0),
        ],
    )
    .unwrap();
    let remote = DescList::from_descs(
        MemKind::Dram,
        vec![
            Desc::new(REMOTE, DESC as u64, 0),
            Desc::new(REMOTE + 0x10000, DESC as u64, 0),
        ],
    )
    .unwrap();
    let x = s
        .agent
        .create_xfer(
            XferOp::Read,
            &local,
            &remote,
            "liar",
            XferOptions::default(),
        )
        .unwrap();
    (reg, x)
}

/// Nothing outside descriptors A and B changed; inside them, only the liar's byte or the
/// sentinel.
fn check_bounds(m: &Mapping, what: &str) {
    let b = m.bytes();
    for (i, &v) in b.iter().enumerate() {
        let off = i + PAGE;
        let inside = (A..A + DESC).contains(&off) || (B..B + DESC).contains(&off);
        if inside {
            assert!(
                v == SENTINEL || v == LIAR_BYTE,
                "{what}: byte {off:#x} is {v:#x}"
            );
        } else {
            assert_eq!(
                v, SENTINEL,
                "{what}: byte {off:#x} outside the descriptors changed"
            );
        }
    }
}

fn expect_protocol_failure(st: XferStatus, what: &str) {
    match st {
        XferStatus::Failed(e) => {
            let text = e.to_string();
            assert!(text.contains("protocol error"), "{what}: {text}");
            assert!(
                !text.contains("os error 14"),
                "{what}: wrote into a guard page: {text}"
            );
        }
        other => panic!("{what}: the post must fail, it ended {other:?}"),
    }
}

#[test]
fn honest_answers_fill_exactly_the_descriptors() {
    let s = setup();
    let m = Mapping::new();
    let (reg, x) = read_request(&s, &m);
    s.liar.set(Lie::Honest);
    x.run_blocking().unwrap();
    x.run_blocking().unwrap();
    drop(x);
    drop(reg);
    let b = m.bytes();
    for (i, &v) in b.iter().enumerate() {
        let off = i + PAGE;
        let inside = (A..A + DESC).contains(&off) || (B..B + DESC).contains(&off);
        assert_eq!(
            v,
            if inside { LIAR_BYTE } else { SENTINEL },
            "byte {off:#x}"
        );
    }
}

#[test]
fn unknown_duplicate_oversized_and_wrong_kind_answers_fail_the_post_within_bounds() {
    let s = setup();
    for lie in [
        Lie::Duplicate,
        Lie::UnknownChunk,
        Lie::UnknownRequest,
        Lie::Oversized,
        Lie::AckForRead,
    ] {
        let m = Mapping::new();
        let (reg, x) = read_request(&s, &m);
        let _release = s.liar.set(lie);
        x.post().unwrap();
        let st = x.wait_blocking(Some(Duration::from_secs(20)));
        expect_protocol_failure(st, &format!("{lie:?}"));
        drop(x);
        drop(reg);
        check_bounds(&m, &format!("{lie:?}"));
        // The session was dropped: the liar saw its connections close.
        s.liar
            .closed
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{lie:?}: the session was not dropped"));
        std::thread::sleep(Duration::from_millis(100));
        while s.liar.closed.try_recv().is_ok() {}
    }
}

/// Four answers for a request of four chunks, while the other connection is in the middle of
/// chunk 1: the post must fail, and must not end before that connection's thread has stopped
/// reading into its memory (the rest of chunk 1 is sent into the freed, remapped address).
#[test]
fn a_post_ends_only_when_no_connection_reads_into_it() {
    let s = setup();
    let m = Mapping::new();
    let (reg, x) = read_request(&s, &m);
    let release = s.liar.set(Lie::Race);
    x.post().unwrap();
    let st = x.wait_blocking(Some(Duration::from_secs(20)));
    assert!(st.is_terminal(), "{st:?}");
    drop(x);
    drop(reg);
    check_bounds(&m, "race");
    m.free_and_remap();
    let _ = release.send(());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        m.bytes().iter().all(|&v| v == FRESH),
        "the initiator wrote into memory after the post ended ({st:?})"
    );
    expect_protocol_failure(st, "race");
}

/// An answer after the request ended (and its memory was freed and mapped again) is a protocol
/// error, and not a byte of it lands.
#[test]
fn a_late_answer_after_the_post_ended_writes_nothing() {
    let s = setup();
    let m = Mapping::new();
    let (reg, x) = read_request(&s, &m);
    let release = s.liar.set(Lie::Late);
    x.post().unwrap();
    let st = x.wait_blocking(Some(Duration::from_secs(20)));
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    drop(x);
    drop(reg);
    m.free_and_remap();
    let _ = release.send(());
    s.liar
        .closed
        .recv_timeout(Duration::from_secs(10))
        .expect("a late answer drops the session");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        m.bytes().iter().all(|&v| v == FRESH),
        "the initiator wrote a late answer into freed memory"
    );
}
