//! The `object` backend against a real S3-compatible server: moto's server, started by each
//! test on a free loopback port (`python3 -m moto.server`; `.ci/setup` installs it). Byte-exact
//! round trips (a single PUT with an odd tail, a multipart upload of many small parts, an
//! explicitly named object, thousands of small READ descriptors), a missing object, the server
//! killed mid-transfer (a many-range READ and a multipart WRITE end Failed within the request
//! timeout), cancellation (the multipart upload is aborted), and misuse refused when the
//! request is created.
//!
//! HTTPS: moto serves TLS with a certificate signed by a CA that each test makes (rcgen): a
//! byte-exact round trip trusting that CA through `ca_file` (by IP address and by host name),
//! the same server without the CA (fails: unknown issuer), a certificate for another name
//! (fails: not valid for the name), a server that never answers the handshake (fails within
//! the request timeout), and CA files that cannot be used (configuration errors naming them).
//!
//! Without moto the server tests print `SKIPPED <test>: moto not installed (...)` and pass,
//! unless `NIXL_REQUIRE_OBJECT_TESTS=1` or `NIXL_REQUIRE_ALL=1`.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, BackendName, Desc, DescList, Error, MemKind, Registration, XferOp, XferOptions,
    XferRequest, XferStatus,
};
use nixl_transports::config::Config;

mod common;
use common::{pattern, unavailable};

const BUCKET: &str = "nixl-test";

/// A test CA (in a temporary directory, removed when dropped) and the server certificates it
/// signs.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("nixl-object-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nixl test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca_der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for `names` (host names or IP addresses) signed by the CA, and
    /// what the test's own client needs to reach the server (it verifies `names[0]`).
    fn server(&self, tag: &str, names: &[&str]) -> ServerTls {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{tag}.crt")),
            self.dir.join(format!("{tag}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        ServerTls {
            cert: cert_file,
            key: key_file,
            client: Arc::new(client),
            name: names[0].clone(),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TLS of a moto server: its certificate and key files, and the test client's settings.
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client: Arc<rustls::ClientConfig>,
    /// The name the test client verifies.
    name: String,
}

/// A moto server on 127.0.0.1 (`nixl_testkit::moto`) with the bucket made, over HTTP or HTTPS;
/// killed when dropped.
struct Moto {
    server: nixl_testkit::moto::Moto,
    port: u16,
    tls: Option<ServerTls>,
}

impl Moto {
    /// Starts moto, or returns `None` (after printing why) when it is not installed.
    fn start() -> Option<Moto> {
        Moto::launch(None)
    }

    /// Starts moto serving HTTPS with this certificate.
    fn start_tls(tls: ServerTls) -> Option<Moto> {
        Moto::launch(Some(tls))
    }

    fn launch(tls: Option<ServerTls>) -> Option<Moto> {
        if let Some(why) = nixl_testkit::moto::Moto::missing() {
            nixl_testkit::skip(why, false, &["NIXL_REQUIRE_OBJECT_TESTS"]);
            return None;
        }
        let args: Vec<&OsStr> = match &tls {
            Some(t) => vec![
                "--ssl-cert".as_ref(),
                t.cert.as_os_str(),
                "--ssl-key".as_ref(),
                t.key.as_os_str(),
            ],
            None => Vec::new(),
        };
        // Small parts for the multipart tests, objects kept in memory.
        let server = nixl_testkit::moto::Moto::start_with(
            &args,
            &[
                ("S3_UPLOAD_PART_MIN_SIZE", "65536"),
                ("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", "134217728"),
            ],
        );
        let m = Moto {
            port: server.port,
            server,
            tls,
        };
        let (status, body) = m.http("PUT", &format!("/{BUCKET}"), b"").unwrap();
        assert_eq!(
            status,
            200,
            "create bucket: {}",
            String::from_utf8_lossy(&body)
        );
        Some(m)
    }

    fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// One HTTP/1.0 exchange: (status, body), over TLS when the server speaks it.
    fn http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
        let Some(t) = &self.tls else {
            return self.server.http(method, path, body);
        };
        let tcp = TcpStream::connect(("127.0.0.1", self.port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = rustls::pki_types::ServerName::try_from(t.name.clone())
            .map_err(std::io::Error::other)?;
        let conn = rustls::ClientConnection::new(Arc::clone(&t.client), name)
            .map_err(std::io::Error::other)?;
        let tls = rustls::StreamOwned::new(conn, tcp);
        nixl_testkit::moto::exchange(tls, self.port, method, path, body)
    }

    fn kill(&mut self) {
        self.server.kill();
    }
}

fn agent(endpoint: &str, extra: &str) -> Agent {
    let cfg = Config::from_toml(&format!(
        "backends = [\"local\", \"object\"]\n[object]\nendpoint = \"{endpoint}\"\n\
         bucket = \"{BUCKET}\"\nregion = \"us-east-1\"\naccess_key_id = \"testing\"\n\
         secret_access_key = \"testing\"\n{extra}"
    ))
    .unwrap();
    Agent::builder("store")
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap()
}

fn reg(a: &Agent, kind: MemKind, descs: Vec<Desc>) -> Registration {
    let list = DescList::from_descs(kind, descs).unwrap();
    // SAFETY: DRAM descriptors name test buffers that outlive the registration; OBJECT ones
    // carry no memory contract.
    unsafe { a.register(&list) }.unwrap()
}

/// Registers the `sources` and `dests` of a round trip as DRAM.
fn reg_dram(a: &Agent, sources: &[&[u8]], dests: &mut [&mut [u8]]) -> Registration {
    let mut descs: Vec<Desc> = sources.iter().map(|s| Desc::from_slice(s)).collect();
    descs.extend(dests.iter_mut().map(|d| Desc::from_mut_slice(d)));
    reg(a, MemKind::Dram, descs)
}

fn create(a: &Agent, op: XferOp, mem: Vec<Desc>, obj: Vec<Desc>) -> nixl_core::Result<XferRequest> {
    let req = a.create_xfer(
        op,
        &DescList::from_descs(MemKind::Dram, mem).unwrap(),
        &DescList::from_descs(MemKind::Object, obj).unwrap(),
        a.name(),
        XferOptions::default(),
    )?;
    assert_eq!(req.backend(), BackendName::Object, "{}", req.info().reason);
    Ok(req)
}

fn run(a: &Agent, op: XferOp, mem: Vec<Desc>, obj: Vec<Desc>) -> XferStatus {
    let req = create(a, op, mem, obj).unwrap();
    req.post().unwrap();
    req.wait_blocking(Some(Duration::from_secs(60)))
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn assert_done(st: &XferStatus, what: &str) {
    assert!(matches!(st, XferStatus::Done), "{what}: {st:?}");
}

#[test]
fn single_put_and_multipart_round_trip_byte_exact() {
    let Some(moto) = Moto::start() else { return };
    let t0 = Instant::now();
    // Parts of 256 KiB; objects over 4 MiB are multipart uploads.
    let a = agent(
        &moto.endpoint(),
        "key_prefix = \"rt/\"\npart_size = 262144\nmultipart_threshold = 4194304",
    );
    let (n1, n2) = ((3 << 20) + 333, (6 << 20) + 777); // odd tails; n2 is 25 parts
    let (s1, s2) = (pattern(1, n1), pattern(2, n2));
    let (mut d1, mut d2) = (vec![0u8; n1], vec![0u8; n2]);
    let _m = reg_dram(&a, &[&s1, &s2], &mut [&mut d1, &mut d2]);
    // Object 1 by its default name (rt/1); object 99 named explicitly through the agent.
    nixl_transports::object::name_object(&a, 99, &format!("{BUCKET}/explicit/b.bin")).unwrap();
    let (o1, o2) = (Desc::new(0, n1 as u64, 1), Desc::new(0, n2 as u64, 99));
    let _o = reg(&a, MemKind::Object, vec![o1, o2]);
    let st = run(
        &a,
        XferOp::Write,
        vec![Desc::from_slice(&s1), Desc::from_slice(&s2)],
        vec![o1, o2],
    );
    assert_done(&st, "WRITE");
    // The store holds exactly what was written, under the names chosen.
    let (status, body) = moto.http("GET", &format!("/{BUCKET}/rt/1"), b"").unwrap();
    assert_eq!(status, 200);
    assert!(
        body == s1,
        "rt/1 differs in the store ({} bytes)",
        body.len()
    );
    let (status, body) = moto
        .http("GET", &format!("/{BUCKET}/explicit/b.bin"), b"")
        .unwrap();
    assert_eq!(status, 200);
    assert!(body == s2, "explicit/b.bin differs ({} bytes)", body.len());
    // READ back whole (split into 256 KiB ranges), twice through one request.
    let req = create(
        &a,
        XferOp::Read,
        vec![Desc::from_mut_slice(&mut d1), Desc::from_mut_slice(&mut d2)],
        vec![o1, o2],
    )
    .unwrap();
    for _ in 0..2 {
        req.post().unwrap();
        assert_done(&req.wait_blocking(Some(Duration::from_secs(60))), "READ");
    }
    assert!(d1 == s1, "object 1 read back differs");
    assert!(d2 == s2, "object 99 read back differs");
    println!("round trips: {:?}", t0.elapsed());
}

#[test]
fn thousands_of_small_read_descriptors() {
    let Some(moto) = Moto::start() else { return };
    let t0 = Instant::now();
    let a = agent(
        &moto.endpoint(),
        "key_prefix = \"many/\"\npart_size = 262144",
    );
    let n = (1 << 20) + 5;
    let src = pattern(3, n);
    let _s = reg(&a, MemKind::Dram, vec![Desc::from_slice(&src)]);
    let o = Desc::new(0, n as u64, 5);
    let _o = reg(&a, MemKind::Object, vec![o]);
    assert_done(
        &run(&a, XferOp::Write, vec![Desc::from_slice(&src)], vec![o]),
        "WRITE",
    );

    // (a) The object cut in ~4000 odd pieces, laid out in memory in reverse order: merged
    // into a few GETs that scatter. (b) 500 random ranges, each its own GET.
    let mut next = rng(11);
    let mut tiles = Vec::new();
    let mut off = 0u64;
    while off < n as u64 {
        let len = (1 + next() % 500).min(n as u64 - off);
        tiles.push((off, len));
        off += len;
    }
    let mut dst = vec![0u8; n];
    let mut dst2 = vec![0u8; 500 * 3000];
    let _d = reg(
        &a,
        MemKind::Dram,
        vec![
            Desc::from_mut_slice(&mut dst),
            Desc::from_mut_slice(&mut dst2),
        ],
    );
    let base = dst.as_mut_ptr() as u64;
    let base2 = dst2.as_mut_ptr() as u64;
    let (mut mem, mut obj, mut expect) = (Vec::new(), Vec::new(), Vec::new());
    for &(off, len) in &tiles {
        let at = n as u64 - off - len; // reversed
        mem.push(Desc::new(base + at, len, 0));
        obj.push(Desc::new(off, len, 5));
    }
    let mut at2 = 0u64;
    for _ in 0..500 {
        let len = 1 + next() % 3000;
        let off = next() % (n as u64 - len);
        mem.push(Desc::new(base2 + at2, len, 0));
        obj.push(Desc::new(off, len, 5));
        expect.push((at2, off, len));
        at2 += len;
    }
    let count = mem.len();
    assert!(count > 3000, "{count} descriptors");
    let st = run(&a, XferOp::Read, mem, obj);
    assert_done(&st, "READ");
    for &(off, len) in &tiles {
        let at = (n as u64 - off - len) as usize;
        let (off, len) = (off as usize, len as usize);
        assert!(dst[at..at + len] == src[off..off + len], "tile at {off}");
    }
    for &(at, off, len) in &expect {
        let (at, off, len) = (at as usize, off as usize, len as usize);
        assert!(dst2[at..at + len] == src[off..off + len], "range at {off}");
    }
    println!("{count} descriptors: {:?}", t0.elapsed());
}

#[test]
fn missing_object_fails_naming_the_key() {
    let Some(moto) = Moto::start() else { return };
    let a = agent(&moto.endpoint(), "key_prefix = \"gone/\"");
    let mut buf = vec![0u8; 4096];
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
    // Registration does not need the object to exist.
    let o = Desc::new(0, 1 << 20, 404);
    let _o = reg(&a, MemKind::Object, vec![o]);
    let st = run(
        &a,
        XferOp::Read,
        vec![Desc::from_mut_slice(&mut buf)],
        vec![Desc::new(100, 4096, 404)],
    );
    match st {
        XferStatus::Failed(e) => {
            let e = e.to_string();
            assert!(e.contains("nixl-test/gone/404"), "{e}");
            assert!(e.contains("404") && e.contains("NoSuchKey"), "{e}");
        }
        other => panic!("READ of a missing object ended {other:?}"),
    }
    // An object shorter than its registration: the READ past its end fails too.
    let small = pattern(4, 1000);
    let _s = reg(&a, MemKind::Dram, vec![Desc::from_slice(&small)]);
    let o2 = Desc::new(0, 1000, 7);
    let _o2 = reg(&a, MemKind::Object, vec![o2]);
    assert_done(
        &run(&a, XferOp::Write, vec![Desc::from_slice(&small)], vec![o2]),
        "WRITE",
    );
    let (status, _) = moto
        .http("PUT", &format!("/{BUCKET}/gone/8"), &small[..500])
        .unwrap();
    assert_eq!(status, 200);
    let o3 = Desc::new(0, 1000, 8);
    let _o3 = reg(&a, MemKind::Object, vec![o3]);
    let st = run(
        &a,
        XferOp::Read,
        vec![Desc::new(buf.as_mut_ptr() as u64, 200, 0)],
        vec![Desc::new(400, 200, 8)],
    );
    assert!(
        matches!(&st, XferStatus::Failed(e) if e.to_string().contains("gone/8")),
        "{st:?}"
    );
}

/// Posts `req`, kills the server once the request is under way, and checks that it ends
/// Failed (not Done, not hanging) within the request timeout.
fn killed_mid_transfer(moto: &mut Moto, req: &XferRequest, what: &str) {
    req.post().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        matches!(req.status(), XferStatus::InProgress),
        "{what} ended before the server was killed: {:?}",
        req.status()
    );
    let t = Instant::now();
    moto.kill();
    let st = req.wait_blocking(Some(Duration::from_secs(20)));
    let took = t.elapsed();
    match &st {
        XferStatus::Failed(e) => println!("{what}: Failed after {took:?}: {e}"),
        other => panic!("{what} with the server killed ended {other:?} after {took:?}"),
    }
    assert!(
        took < Duration::from_secs(8),
        "{what} took {took:?} to fail"
    );
    // Nothing holds the memory any more once the request is released.
    req.release();
    assert!(!req.is_held());
}

#[test]
fn server_killed_mid_transfer_fails_within_the_timeout() {
    // Small parts, a short timeout, a few requests at a time.
    const SETTINGS: &str = "key_prefix = \"kill/\"\npart_size = 65536\n\
         multipart_threshold = 65536\nrequest_timeout_ms = 3000\nmax_concurrency = 4";
    let Some(mut moto) = Moto::start() else {
        return;
    };
    let a = agent(&moto.endpoint(), SETTINGS);
    // A READ of 20000 separate 16-byte ranges: 20000 GETs, far more than moto serves in the
    // time before the kill.
    let n = 1 << 20;
    let src = pattern(5, n);
    let mut dst = vec![0u8; 20000 * 16];
    let _m = reg(
        &a,
        MemKind::Dram,
        vec![Desc::from_slice(&src), Desc::from_mut_slice(&mut dst)],
    );
    let o = Desc::new(0, n as u64, 1);
    let _o = reg(&a, MemKind::Object, vec![o]);
    assert_done(
        &run(&a, XferOp::Write, vec![Desc::from_slice(&src)], vec![o]),
        "WRITE",
    );
    let base = dst.as_mut_ptr() as u64;
    let mem: Vec<Desc> = (0..20000u64)
        .map(|i| Desc::new(base + i * 16, 16, 0))
        .collect();
    let obj: Vec<Desc> = (0..20000u64).map(|i| Desc::new(i * 48, 16, 1)).collect();
    let req = create(&a, XferOp::Read, mem, obj).unwrap();
    killed_mid_transfer(&mut moto, &req, "many-range READ");

    // A multipart WRITE of 1024 parts, against a fresh server killed the same way.
    let Some(mut moto) = Moto::start() else {
        return;
    };
    let a = agent(&moto.endpoint(), SETTINGS);
    let big = pattern(6, 64 << 20);
    let _b = reg(&a, MemKind::Dram, vec![Desc::from_slice(&big)]);
    let o = Desc::new(0, 64 << 20, 2);
    let _o = reg(&a, MemKind::Object, vec![o]);
    let req = create(&a, XferOp::Write, vec![Desc::from_slice(&big)], vec![o]).unwrap();
    killed_mid_transfer(&mut moto, &req, "multipart WRITE");
}

#[test]
fn cancelled_multipart_write_is_aborted() {
    let Some(moto) = Moto::start() else { return };
    let a = agent(
        &moto.endpoint(),
        "key_prefix = \"cancel/\"\npart_size = 65536\nmultipart_threshold = 65536\n\
         max_concurrency = 2",
    );
    let big = pattern(8, 32 << 20);
    let _b = reg(&a, MemKind::Dram, vec![Desc::from_slice(&big)]);
    let o = Desc::new(0, 32 << 20, 3);
    let _o = reg(&a, MemKind::Object, vec![o]);
    let req = create(&a, XferOp::Write, vec![Desc::from_slice(&big)], vec![o]).unwrap();
    req.post().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    req.release(); // cancels, waits until the backend let go (after aborting the upload)
    let st = req.status();
    assert!(matches!(st, XferStatus::Cancelled), "{st:?}");
    let (status, body) = moto
        .http("GET", &format!("/{BUCKET}?uploads"), b"")
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("<UploadId>"), "upload left behind: {body}");
    let (status, _) = moto
        .http("GET", &format!("/{BUCKET}/cancel/3"), b"")
        .unwrap();
    assert_eq!(status, 404, "a cancelled WRITE left an object");
    // Shutdown with a post in flight ends it (Cancelled, or Done if it won).
    req.post().unwrap();
    a.shutdown();
    let st = req.wait_blocking(Some(Duration::from_secs(20)));
    assert!(
        matches!(st, XferStatus::Cancelled | XferStatus::Done),
        "{st:?}"
    );
}

#[test]
fn silent_server_fails_the_request_after_the_timeout() {
    // A server that accepts connections and never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        l.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) && !stop2.load(Ordering::Relaxed) {
            if let Ok((c, _)) = l.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let a = agent(&endpoint, "request_timeout_ms = 500");
    let mut buf = vec![0u8; 1 << 20];
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
    let o = Desc::new(0, 1 << 20, 1);
    let _o = reg(&a, MemKind::Object, vec![o]);
    let t = Instant::now();
    let st = run(
        &a,
        XferOp::Read,
        vec![Desc::from_mut_slice(&mut buf)],
        vec![o],
    );
    let took = t.elapsed();
    match &st {
        XferStatus::Failed(e) => {
            let e = e.to_string();
            assert!(
                e.contains("within 500 ms") && e.contains("nixl-test/1"),
                "{e}"
            );
        }
        other => panic!("READ from a silent server ended {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // A PUT whose body the server never reads (the socket buffers fill): Failed after the
    // timeout, and the memory is let go (the HTTP client drops the body it held).
    let a = agent(
        &endpoint,
        "request_timeout_ms = 500\nmultipart_threshold = 67108864",
    );
    let big = pattern(9, 32 << 20);
    let _b = reg(&a, MemKind::Dram, vec![Desc::from_slice(&big)]);
    let o = Desc::new(0, 32 << 20, 2);
    let _o = reg(&a, MemKind::Object, vec![o]);
    let req = create(&a, XferOp::Write, vec![Desc::from_slice(&big)], vec![o]).unwrap();
    req.post().unwrap();
    let st = req.wait_blocking(Some(Duration::from_secs(10)));
    assert!(matches!(st, XferStatus::Failed(_)), "{st:?}");
    let t = Instant::now();
    req.release();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "release took {:?}",
        t.elapsed()
    );
    drop(a);
    stop.store(true, Ordering::Relaxed);
    let _ = held.join();
}

/// A store that answers ranged GETs wrongly, over plain HTTP on loopback: `answer` gets the
/// request's Range header and returns the whole response.
fn lying_store(answer: fn(&str) -> Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            c.set_nonblocking(false).unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                req.push(b[0]);
            }
            let req = String::from_utf8_lossy(&req).to_ascii_lowercase();
            let range = req
                .lines()
                .find_map(|l| l.strip_prefix("range: "))
                .unwrap_or("")
                .to_owned();
            let _ = c.write_all(&answer(&range));
        }
    });
    (endpoint, t)
}

fn http_206(content_range: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(cr) = content_range {
        r += &format!("Content-Range: {cr}\r\n");
    }
    r += "\r\n";
    let mut v = r.into_bytes();
    v.extend_from_slice(body);
    v
}

/// A store that answers a ranged GET with other bytes of the object (another range, no range,
/// or more than asked) fails the request, and nothing lands outside the descriptor (nor, for an
/// answer of the wrong range, inside it).
#[test]
fn a_lying_store_fails_the_read_and_writes_nothing_out_of_place() {
    type Answer = fn(&str) -> Vec<u8>;
    let cases: [(&str, Answer, bool); 3] = [
        (
            "another range",
            |_| http_206(Some("bytes 0-4095/8192"), &[0xab; 4096]),
            false,
        ),
        ("no Content-Range", |_| http_206(None, &[0xab; 4096]), false),
        (
            "more bytes than asked",
            |_| http_206(Some("bytes 4096-8191/8192"), &[0xab; 8192]),
            true,
        ),
    ];
    for (what, answer, may_fill) in cases {
        let (endpoint, server) = lying_store(answer);
        let a = agent(&endpoint, "request_timeout_ms = 3000");
        let mut buf = vec![0x11u8; 3 * 4096];
        let _m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
        let _o = reg(&a, MemKind::Object, vec![Desc::new(0, 8192, 1)]);
        let st = run(
            &a,
            XferOp::Read,
            vec![Desc::from_mut_slice(&mut buf[4096..8192])],
            vec![Desc::new(4096, 4096, 1)],
        );
        assert!(matches!(st, XferStatus::Failed(_)), "{what}: {st:?}");
        drop(a);
        assert!(buf[..4096].iter().all(|&v| v == 0x11), "{what}: before");
        assert!(buf[8192..].iter().all(|&v| v == 0x11), "{what}: after");
        if !may_fill {
            assert!(buf[4096..8192].iter().all(|&v| v == 0x11), "{what}: inside");
        }
        drop(server);
    }
}

#[test]
fn misuse_is_refused_when_the_request_is_created() {
    // No server needed: nothing here reaches one.
    let a = agent("http://127.0.0.1:1", "key_prefix = \"m/\"");
    let mut buf = vec![0u8; 1000];
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
    let o = Desc::new(0, 1000, 1);
    let _o = reg(&a, MemKind::Object, vec![o]);
    let p = buf.as_mut_ptr() as u64;
    // WRITE of part of an object.
    for (off, len) in [(10, 100), (0, 999)] {
        let e = create(
            &a,
            XferOp::Write,
            vec![Desc::new(p, len, 0)],
            vec![Desc::new(off, len, 1)],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("must cover the whole object") && e.contains("nixl-test/m/1"),
            "{e}"
        );
    }
    // One object written twice in one WRITE.
    let _o2 = reg(&a, MemKind::Object, vec![Desc::new(0, 500, 2)]);
    let e = create(
        &a,
        XferOp::Write,
        vec![Desc::new(p, 500, 0), Desc::new(p + 500, 500, 0)],
        vec![Desc::new(0, 500, 2), Desc::new(0, 500, 2)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("two descriptors"), "{e}");
    // Outside the registered size: refused by the core.
    let e = create(
        &a,
        XferOp::Read,
        vec![Desc::new(p, 200, 0)],
        vec![Desc::new(900, 200, 1)],
    )
    .unwrap_err();
    assert!(matches!(e, Error::RemoteNotRegistered { .. }), "{e}");
    // A registration that does not start at 0.
    let list = DescList::from_descs(MemKind::Object, vec![Desc::new(8, 100, 3)]).unwrap();
    // SAFETY: OBJECT descriptors carry no memory contract.
    let e = unsafe { a.register(&list) }.unwrap_err().to_string();
    assert!(e.contains("(0, size, object id)"), "{e}");

    // Without a bucket an id has no name until one is given.
    let cfg = Config::from_toml(
        "backends = [\"local\", \"object\"]\n[object]\nendpoint = \"http://127.0.0.1:1\"",
    )
    .unwrap();
    let b = Agent::builder("nameless")
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap();
    let list = DescList::from_descs(MemKind::Object, vec![Desc::new(0, 100, 9)]).unwrap();
    // SAFETY: as above.
    let e = unsafe { b.register(&list) }.unwrap_err().to_string();
    assert!(e.contains("object 9 has no name"), "{e}");
    nixl_transports::object::name_object(&b, 9, "bkt/some/key").unwrap();
    // SAFETY: as above.
    let _r = unsafe { b.register(&list) }.unwrap();
    assert!(nixl_transports::object::name_object(&b, 9, "no-key").is_err());

    // Unconfigured: the agent starts, the backend says why it is unavailable.
    let cfg = Config::from_toml("backends = [\"local\", \"object\"]").unwrap();
    let mut backends = cfg.backends().unwrap();
    // Build the object backend without the environment, so AWS_* on this host cannot
    // configure it.
    backends.pop();
    backends.push(std::sync::Arc::new(
        nixl_transports::object::ObjectBackend::new(nixl_transports::object::ObjectConfig {
            use_env: false,
            ..Default::default()
        }),
    ));
    let c = Agent::builder("plain").backends(backends).build().unwrap();
    assert_eq!(
        unavailable(&c, BackendName::Object).as_deref(),
        Some("no object store configured ([object] endpoint/bucket or AWS_* environment)")
    );
    let e = nixl_transports::object::name_object(&c, 1, "b/k").unwrap_err();
    assert!(e.to_string().contains("no object store configured"), "{e}");
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

/// Expects a READ of `len` bytes of object `id` to fail within `limit`; returns the error.
fn read_fails(a: &Agent, id: u64, len: usize, limit: Duration) -> String {
    let mut buf = vec![0u8; len];
    let _m = reg(a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
    let o = Desc::new(0, len as u64, id);
    let _o = reg(a, MemKind::Object, vec![o]);
    let t = Instant::now();
    let st = run(
        a,
        XferOp::Read,
        vec![Desc::from_mut_slice(&mut buf)],
        vec![o],
    );
    let took = t.elapsed();
    let e = match st {
        XferStatus::Failed(e) => e.to_string(),
        other => panic!("READ of object {id} ended {other:?}"),
    };
    assert!(took < limit, "took {took:?} to fail: {e}");
    e
}

#[test]
fn https_round_trip_byte_exact_and_an_untrusted_server_refused() {
    let pki = Pki::new("tls-rt");
    let tls = pki.server("srv", &["localhost", "127.0.0.1"]);
    let Some(moto) = Moto::start_tls(tls) else {
        return;
    };
    let t0 = Instant::now();
    let ca = format!("ca_file = \"{}\"\n", toml_path(&pki.ca_file()));
    let a = agent(
        &moto.endpoint(),
        &format!("{ca}key_prefix = \"tls/\"\npart_size = 65536\nmultipart_threshold = 1048576"),
    );
    // A single PUT with an odd tail, and a multipart upload of 33 parts.
    let (n1, n2) = (100_003, (2 << 20) + 4321);
    let (s1, s2) = (pattern(21, n1), pattern(22, n2));
    let (mut d1, mut d2) = (vec![0u8; n1], vec![0u8; n2]);
    let _m = reg_dram(&a, &[&s1, &s2], &mut [&mut d1, &mut d2]);
    let (o1, o2) = (Desc::new(0, n1 as u64, 1), Desc::new(0, n2 as u64, 2));
    let _o = reg(&a, MemKind::Object, vec![o1, o2]);
    assert_done(
        &run(
            &a,
            XferOp::Write,
            vec![Desc::from_slice(&s1), Desc::from_slice(&s2)],
            vec![o1, o2],
        ),
        "WRITE over https",
    );
    for (key, want) in [("tls/1", &s1), ("tls/2", &s2)] {
        let (status, body) = moto.http("GET", &format!("/{BUCKET}/{key}"), b"").unwrap();
        assert_eq!(status, 200, "{key}");
        assert!(
            &body == want,
            "{key} differs in the store ({} bytes)",
            body.len()
        );
    }
    assert_done(
        &run(
            &a,
            XferOp::Read,
            vec![Desc::from_mut_slice(&mut d1), Desc::from_mut_slice(&mut d2)],
            vec![o1, o2],
        ),
        "READ over https",
    );
    assert!(d1 == s1, "object 1 read back over https differs");
    assert!(d2 == s2, "object 2 read back over https differs");

    // By host name: the certificate names localhost too.
    let b = agent(
        &format!("https://localhost:{}", moto.port),
        &format!("{ca}key_prefix = \"tls/\""),
    );
    let mut d3 = vec![0u8; n1];
    let _m3 = reg(&b, MemKind::Dram, vec![Desc::from_mut_slice(&mut d3)]);
    let _o3 = reg(&b, MemKind::Object, vec![o1]);
    assert_done(
        &run(
            &b,
            XferOp::Read,
            vec![Desc::from_mut_slice(&mut d3)],
            vec![o1],
        ),
        "READ over https by host name",
    );
    assert!(d3 == s1, "object 1 read back by host name differs");

    // The same server, without its CA: refused with the cause, well within the timeout.
    let c = agent(
        &moto.endpoint(),
        "key_prefix = \"tls/\"\nrequest_timeout_ms = 5000",
    );
    let e = read_fails(&c, 1, n1, Duration::from_secs(5));
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    assert!(
        e.contains("nixl-test/tls/1") && e.contains("ca_file"),
        "{e}"
    );
    println!("https: {:?}; untrusted: {e}", t0.elapsed());
}

#[test]
fn https_certificate_for_another_name_is_refused() {
    let pki = Pki::new("tls-name");
    let tls = pki.server("other", &["wrong.example"]);
    let Some(moto) = Moto::start_tls(tls) else {
        return;
    };
    let a = agent(
        &moto.endpoint(),
        &format!(
            "ca_file = \"{}\"\nkey_prefix = \"n/\"\nrequest_timeout_ms = 5000",
            toml_path(&pki.ca_file())
        ),
    );
    let e = read_fails(&a, 1, 1000, Duration::from_secs(5));
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert!(
        e.contains("127.0.0.1") && e.contains("wrong.example"),
        "{e}"
    );
    assert!(e.contains("does not name the endpoint's host"), "{e}");
    println!("name mismatch: {e}");
}

#[test]
fn https_server_that_never_answers_the_handshake_fails_within_the_timeout() {
    // Accepts connections, reads nothing, answers nothing: the ClientHello goes unanswered.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("https://{}", l.local_addr().unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    l.set_nonblocking(true).unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((c, _)) = l.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let pki = Pki::new("tls-silent");
    let a = agent(
        &endpoint,
        &format!(
            "ca_file = \"{}\"\nrequest_timeout_ms = 500",
            toml_path(&pki.ca_file())
        ),
    );
    let e = read_fails(&a, 1, 4096, Duration::from_secs(5));
    assert!(
        e.contains("within 500 ms") && e.contains("nixl-test/1"),
        "{e}"
    );
    drop(a);
    stop.store(true, Ordering::Relaxed);
    held.join().unwrap();
}

#[test]
fn unusable_ca_file_is_a_config_error_naming_it() {
    let pki = Pki::new("tls-cfg");
    let cfg = |ca: &Path| {
        Config::from_toml(&format!(
            "backends = [\"object\"]\n[object]\nendpoint = \"https://127.0.0.1:1\"\n\
             bucket = \"{BUCKET}\"\nca_file = \"{}\"",
            toml_path(ca)
        ))
    };
    // The good one is accepted.
    let c = cfg(&pki.ca_file()).unwrap();
    assert_eq!(c.object_config().unwrap().ca_file, Some(pki.ca_file()));
    let missing = pki.dir.join("missing.pem");
    let garbage = pki.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let bad_b64 = pki.dir.join("bad.pem");
    std::fs::write(
        &bad_b64,
        "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (file, why) in [
        (&missing, "cannot read"),
        (&pki.dir, "cannot read"), // a directory
        (&garbage, "no certificate"),
        (&bad_b64, "not a PEM certificate bundle"),
    ] {
        let e = cfg(file).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("[object] ca_file"), "{e}");
        assert!(
            e.contains(&file.display().to_string()) && e.contains(why),
            "{e}"
        );
    }
    // A backend built by hand with such a file is unavailable, naming it.
    let backend =
        nixl_transports::object::ObjectBackend::new(nixl_transports::object::ObjectConfig {
            endpoint: Some("https://127.0.0.1:1".into()),
            bucket: Some(BUCKET.into()),
            ca_file: Some(missing.clone()),
            use_env: false,
            ..Default::default()
        });
    let backends: Vec<Arc<dyn nixl_core::Backend>> = vec![Arc::new(backend)];
    let a = Agent::builder("bad-ca").backends(backends).build().unwrap();
    let why = unavailable(&a, BackendName::Object).unwrap_or_default();
    assert!(
        why.contains("missing.pem") && why.contains("cannot read"),
        "{why}"
    );
}
