//! The object topology of `nixl-bench`: one agent moving whole objects between its registered
//! memory and an S3-compatible server that nixl-bench starts itself on a loopback port (moto,
//! `python3 -m moto.server`), or one given with `--endpoint` (plain HTTP, path-style).
//!
//! Depth D keeps D requests in flight, each one whole object of one block (WRITE = PUT, or a
//! multipart upload above the backend's threshold; READ = ranged GETs). The ceiling is the
//! same server reached without nixl: D threads each doing plain HTTP/1.1 PUTs or GETs of the
//! same size (a connection per request), so the row shows what the agent costs on
//! top of the server's own speed (moto is a Python server: its ceiling, not the network's, is
//! what these rows measure).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nixl_core::{BackendName, Desc, DescList, MemKind, XferOp, XferOptions};
use nixl_testkit::moto::Moto;
use nixl_tests::reference_tools::Measured;

use crate::storage::{agent_running, drive, Aligned, StorageRow, StorageSpec};

/// The bucket the rows use.
pub const BUCKET: &str = "nixl-bench";

/// An S3-compatible server on 127.0.0.1: moto started here (killed on drop), or one given.
#[derive(Debug)]
pub struct Server {
    moto: Option<Moto>,
    /// `host:port`.
    pub addr: String,
}

impl Server {
    /// Starts moto on a free loopback port and creates the bucket.
    pub fn start_moto() -> Result<Server, String> {
        if let Some(why) = Moto::missing() {
            return Err(why);
        }
        let moto = Moto::try_start_with(&[], &[("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", "268435456")])
            .map_err(|e| e.to_string())?;
        let s = Server {
            addr: format!("127.0.0.1:{}", moto.port),
            moto: Some(moto),
        };
        s.create_bucket()?;
        Ok(s)
    }

    /// A server that is already running (`host:port`); creates the bucket if missing.
    pub fn existing(addr: &str) -> Result<Server, String> {
        let s = Server {
            moto: None,
            addr: addr.to_owned(),
        };
        s.create_bucket()?;
        Ok(s)
    }

    /// Whether this is the moto server started here.
    pub fn is_moto(&self) -> bool {
        self.moto.is_some()
    }

    fn create_bucket(&self) -> Result<(), String> {
        let mut c = Http::connect(&self.addr)?;
        let status = c.request("PUT", &format!("/{BUCKET}"), &[], None)?;
        // 409: it exists already.
        if status == 200 || status == 409 {
            Ok(())
        } else {
            Err(format!("creating bucket {BUCKET}: HTTP {status}"))
        }
    }
}

/// A minimal HTTP client (no TLS, dummy signature: for loopback test servers only).
struct Http {
    r: BufReader<TcpStream>,
    host: String,
}

impl Http {
    fn connect(addr: &str) -> Result<Http, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        Ok(Http {
            r: BufReader::new(s),
            host: addr.to_owned(),
        })
    }

    /// Sends a request with `body`; reads the answer's body into `into` (or discards it).
    /// Returns the status.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        into: Option<&mut Vec<u8>>,
    ) -> Result<u16, String> {
        // One connection per request: moto's server (werkzeug) speaks HTTP/1.0 and closes
        // after each answer.
        *self = Http::connect(&self.host)?;
        // moto refuses anonymous writes but checks no signature: a well-formed header with a
        // dummy signature passes. (A real store would need SigV4: this client is for loopback
        // test servers only.)
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\
             x-amz-date: 20260101T000000Z\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=nixl-bench/20260101/us-east-1/s3/\
             aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
             Signature=0000000000000000000000000000000000000000000000000000000000000000\r\n\
             Connection: close\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.r.get_mut();
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(body))
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{method} {path}: bad status line {line:?}"))?;
        let mut len: Option<usize> = None;
        loop {
            line.clear();
            self.r
                .read_line(&mut line)
                .map_err(|e| format!("{method} {path}: {e}"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok();
                }
            }
        }
        let mut buf = Vec::new();
        let out = into.unwrap_or(&mut buf);
        out.clear();
        let r = match len {
            Some(n) => {
                out.resize(n, 0);
                self.r.read_exact(out)
            }
            None => self.r.read_to_end(out).map(drop),
        };
        r.map_err(|e| format!("{method} {path}: body: {e}"))?;
        Ok(status)
    }
}

/// The server's own speed for this row: `depth` threads, each PUTting (WRITE) or GETting
/// (READ) objects of `block` bytes back to back, for `seconds`.
pub fn ceiling(server: &Server, spec: &StorageSpec) -> Measured {
    let body = vec![7u8; spec.block];
    let t0 = Instant::now();
    let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..spec.depth)
            .map(|t| {
                let body = &body;
                s.spawn(move || -> Result<u64, String> {
                    let mut c = Http::connect(&server.addr)?;
                    let key = format!("/{BUCKET}/ceiling-{}-{t}", spec.block);
                    if c.request("PUT", &key, body, None)? != 200 {
                        return Err("PUT failed".into());
                    }
                    let mut into = Vec::with_capacity(spec.block);
                    let mut n = 0u64;
                    let start = Instant::now();
                    while start.elapsed().as_secs_f64() < spec.seconds {
                        let st = match spec.op {
                            XferOp::Write => c.request("PUT", &key, body, None)?,
                            XferOp::Read => c.request("GET", &key, &[], Some(&mut into))?,
                        };
                        if st != 200 {
                            return Err(format!("HTTP {st}"));
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut total = 0u64;
    for r in results {
        match r {
            Ok(n) => total += n,
            Err(e) => return Measured::Missing(format!("plain HTTP to the server: {e}")),
        }
    }
    Measured::Gbps(total as f64 * spec.block as f64 / secs / 1e9)
}

/// One nixl row against `server`: `depth` objects of one block, whole-object WRITEs or READs.
pub fn nixl_row(server: &Server, spec: &StorageSpec) -> Result<StorageRow, String> {
    let toml = format!(
        "backends = [\"object\"]\n[object]\nendpoint = \"http://{}\"\nbucket = \"{BUCKET}\"\n\
         region = \"us-east-1\"\nkey_prefix = \"bench-{}-\"\n{}",
        server.addr,
        spec.block,
        // moto takes any credentials (it checks no signatures) but refuses unsigned PUTs;
        // for another server, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
        if server.is_moto() {
            "access_key_id = \"nixl-bench\"\nsecret_access_key = \"nixl-bench\"\n"
        } else {
            ""
        }
    );
    let agent = agent_running("bench-object", &toml, BackendName::Object)?;
    let n = spec.depth * 2;
    let mem = Aligned::new(spec.block * n);
    let dram = DescList::from_descs(
        MemKind::Dram,
        vec![Desc::new(mem.ptr as u64, mem.len as u64, 0)],
    )
    .map_err(|e| e.to_string())?;
    let objects: Vec<Desc> = (0..n as u64)
        .map(|id| Desc::new(0, spec.block as u64, id))
        .collect();
    let objs = DescList::from_descs(MemKind::Object, objects.clone()).map_err(|e| e.to_string())?;
    // SAFETY: `mem` outlives the registrations (dropped after them, below); OBJECT
    // descriptors carry no memory contract.
    let (_r1, _r2) = unsafe {
        (
            agent.register(&dram).map_err(|e| e.to_string())?,
            agent.register(&objs).map_err(|e| e.to_string())?,
        )
    };
    let mk = |op: XferOp, j: usize| {
        let local = DescList::from_descs(
            MemKind::Dram,
            vec![Desc::new(
                mem.ptr as u64 + (j * spec.block) as u64,
                spec.block as u64,
                0,
            )],
        )
        .map_err(|e| e.to_string())?;
        let remote =
            DescList::from_descs(MemKind::Object, vec![objects[j]]).map_err(|e| e.to_string())?;
        agent
            .create_xfer(
                op,
                &local,
                &remote,
                "bench-object",
                XferOptions {
                    backend: Some(BackendName::Object),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())
    };
    if spec.op == XferOp::Read {
        // The objects must exist: write each once.
        for j in 0..n {
            mk(XferOp::Write, j)?
                .run_blocking()
                .map_err(|e| format!("writing object {j} before the READ row: {e}"))?;
        }
    }
    let reqs = (0..n)
        .map(|j| mk(spec.op, j))
        .collect::<Result<Vec<_>, _>>()?;
    drive(&reqs, spec.depth, spec.block, spec.seconds)
}
