//! The owner's side: [`IpcServer`] grants exported VMM fds to peers that present the region key,
//! records which peer imported which region, revokes those imports when the owner deregisters,
//! and receives notifications (see the [module docs](super)).

use super::*;

/// Keeps the owner's region from being deregistered (its `RegionAccess`) until the server has
/// recorded an import and sent its answer.
pub type Hold = Box<dyn Send>;

/// A granted chunk.
pub struct Grant {
    /// A duplicate of the chunk's exported fd.
    pub fd: OwnedFd,
    /// Size of the exported allocation.
    pub alloc_size: u64,
    /// Held until the grant is recorded and sent.
    pub hold: Hold,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("fd", &self.fd)
            .field("alloc_size", &self.alloc_size)
            .finish_non_exhaustive()
    }
}

/// What the server asks its owner (the backend; a fake in tests).
pub trait GrantSource: Send + Sync {
    /// Checks the peer's access to chunk `chunk` of the whole region `region` with `key` and
    /// returns a duplicate of the chunk's exported fd and the allocation size, or the reason for
    /// refusing.
    fn grant(&self, region: &Desc, key: u64, chunk: u32) -> std::result::Result<Grant, String>;
    /// Checks the peer's announcement that it maps the whole region `region` (presenting `key`)
    /// through handles from the metadata; `Err(reason)` refuses it.
    fn opened(&self, region: &Desc, key: u64) -> std::result::Result<Hold, String>;
    /// Delivers a notification from agent `from`.
    fn notify(&self, from: &str, msg: Vec<u8>);
}

/// The outcome of [`IpcServer::revoke`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevokeReport {
    /// Connections that had imported the region.
    pub peers: usize,
    /// Those that acknowledged in time.
    pub acked: usize,
    /// Those whose connection had ended or ended meanwhile (skipped).
    pub gone: usize,
    /// Those still silent at the deadline (reported; the owner went on).
    pub late: usize,
}

/// A region as the owner published it, with its key.
type RegionId = (Desc, u64);

#[derive(Debug)]
pub(super) struct ServerShared {
    path: PathBuf,
    shut: AtomicBool,
    /// Writers of the live connections (the serving thread answers, `revoke` sends Revoke).
    conns: Mutex<HashMap<u64, Arc<Mutex<UnixStream>>>>,
    next: AtomicU64,
    /// Which connections imported which region.
    imports: Mutex<HashMap<RegionId, HashSet<u64>>>,
    /// Revocations in progress: (connection, region) → acknowledged.
    pub(super) revokes: Mutex<HashMap<(u64, RegionId), bool>>,
    revoke_cv: Condvar,
    /// Write timeout of every connection.
    io_timeout: Duration,
}

/// The owner's socket service. Stops (and removes its socket) on [`IpcServer::shutdown`] or drop.
#[derive(Debug)]
pub struct IpcServer {
    pub(super) shared: Arc<ServerShared>,
}

impl IpcServer {
    /// Binds `dir/<file>` (`dir` created with mode 0700, or refused unless ours and private:
    /// see `unix::secure_socket_dir`) and serves `source` (held weakly: a dropped owner is
    /// answered "shut down"). Writes to a peer time out after `io_timeout`.
    pub fn start(
        dir: &Path,
        file: &str,
        source: Weak<dyn GrantSource>,
        io_timeout: Duration,
    ) -> Result<IpcServer> {
        crate::unix::secure_socket_dir(dir, "cuda")?;
        let path = dir.join(file);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("cuda: bind {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("cuda: listener", e))?;
        let shared = Arc::new(ServerShared {
            path,
            shut: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            imports: Mutex::new(HashMap::new()),
            revokes: Mutex::new(HashMap::new()),
            revoke_cv: Condvar::new(),
            io_timeout: io_timeout.max(Duration::from_millis(1)),
        });
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nixl-cuda-ipc".into())
            .spawn(move || accept_loop(sh, listener, source))
            .map_err(|e| Error::io("cuda: spawn the socket thread", e))?;
        Ok(IpcServer { shared })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Connections that imported `region` (with key `key`) and have not given it up.
    pub fn importers(&self, region: &Desc, key: u64) -> usize {
        self.shared
            .imports
            .lock()
            .get(&(*region, key))
            .map_or(0, HashSet::len)
    }

    /// Revokes every peer's import of `region` (with key `key`): sends Revoke to each connection
    /// that imported it and waits until each has answered Revoked or ended, at most `timeout`.
    /// Peers still silent then are logged and counted in [`RevokeReport::late`].
    pub fn revoke(&self, region: &Desc, key: u64, timeout: Duration) -> RevokeReport {
        let sh = &self.shared;
        let id: RegionId = (*region, key);
        let holders: Vec<u64> = sh
            .imports
            .lock()
            .remove(&id)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        let mut report = RevokeReport {
            peers: holders.len(),
            ..RevokeReport::default()
        };
        if holders.is_empty() {
            return report;
        }
        let deadline = Instant::now() + timeout;
        {
            // Registered before sending, so that an answer cannot come before its slot.
            let mut r = sh.revokes.lock();
            for c in &holders {
                r.insert((*c, id), false);
            }
        }
        let frame = Frame::Revoke {
            region: *region,
            key,
        }
        .encode();
        for c in &holders {
            let w = sh.conns.lock().get(c).cloned();
            if let Some(w) = w {
                if let Err(e) = write_frame(&w, &frame, None) {
                    tracing::debug!(conn = c, error = %e, "cuda: sending a revocation failed");
                }
            }
        }
        let mut r = sh.revokes.lock();
        loop {
            let waiting = {
                let conns = sh.conns.lock();
                holders
                    .iter()
                    .filter(|c| conns.contains_key(c) && r.get(&(**c, id)) == Some(&false))
                    .count()
            };
            if waiting == 0 || sh.shut.load(Ordering::Acquire) {
                break;
            }
            if sh.revoke_cv.wait_until(&mut r, deadline).timed_out() {
                break;
            }
        }
        let conns = sh.conns.lock();
        for c in &holders {
            match r.remove(&(*c, id)) {
                Some(true) => report.acked += 1,
                _ if !conns.contains_key(c) => report.gone += 1,
                _ => report.late += 1,
            }
        }
        drop(conns);
        drop(r);
        if report.late > 0 {
            metrics::counter!("nixl_cuda_revoke_timeouts_total").increment(report.late as u64);
            tracing::warn!(
                region = format_args!("{:#x}+{} dev {}", region.addr, region.len, region.dev_id),
                late = report.late,
                ?timeout,
                "cuda: peers did not give up their mappings of a deregistered region in time"
            );
        }
        report
    }

    /// Stops accepting, closes every connection, removes the socket.
    pub fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, c) in self.shared.conns.lock().drain() {
            let _ = c.lock().shutdown(std::net::Shutdown::Both);
        }
        self.shared.revoke_cv.notify_all();
        let _ = std::fs::remove_file(&self.shared.path);
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(sh: Arc<ServerShared>, listener: UnixListener, source: Weak<dyn GrantSource>) {
    while !sh.shut.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let sh2 = Arc::clone(&sh);
                let source = source.clone();
                let spawned = std::thread::Builder::new()
                    .name("nixl-cuda-serve".into())
                    .spawn(move || {
                        if let Err(e) = serve(&sh2, stream, &source) {
                            tracing::debug!(error = %e, "cuda: socket connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cuda: cannot serve a connection");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cuda: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve(sh: &ServerShared, stream: UnixStream, source: &Weak<dyn GrantSource>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let (_, cred_uid) = peer_cred(&stream)?;
    if cred_uid != uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {cred_uid} is not ours"),
        ));
    }
    stream.set_write_timeout(Some(sh.io_timeout))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let id = sh.next.fetch_add(1, Ordering::Relaxed);
    sh.conns.lock().insert(id, Arc::clone(&writer));
    let result = if sh.shut.load(Ordering::Acquire) {
        Ok(())
    } else {
        serve_frames(sh, id, &stream, &writer, source)
    };
    // The connection is over: nothing it imported is tracked any more (the peer gives its
    // mappings up when it sees the end), and a revocation waiting for it goes on.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sh.conns.lock().remove(&id);
    sh.imports.lock().retain(|_, conns| {
        conns.remove(&id);
        !conns.is_empty()
    });
    let _r = sh.revokes.lock();
    sh.revoke_cv.notify_all();
    result
}

fn record(sh: &ServerShared, conn: u64, region: &Desc, key: u64) {
    sh.imports
        .lock()
        .entry((*region, key))
        .or_default()
        .insert(conn);
}

fn serve_frames(
    sh: &ServerShared,
    conn: u64,
    stream: &UnixStream,
    writer: &Mutex<UnixStream>,
    source: &Weak<dyn GrantSource>,
) -> io::Result<()> {
    let mut junk = Vec::new();
    loop {
        let Some(body) = read_frame(stream, &mut junk)? else {
            return Ok(());
        };
        // A client never sends fds; drop any it did.
        junk.clear();
        let frame = Frame::decode(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let Some(src) = source.upgrade() else {
            let id = match frame {
                Frame::Grant { id, .. } | Frame::Notif { id, .. } | Frame::Opened { id, .. } => id,
                _ => 0,
            };
            let f = Frame::Refused {
                id,
                reason: "the agent has shut down".into(),
            };
            write_frame(writer, &f.encode(), None)?;
            return Ok(());
        };
        let refuse = |id: u64, reason: String| {
            metrics::counter!("nixl_access_denied_total", "backend" => "cuda").increment(1);
            write_frame(writer, &Frame::Refused { id, reason }.encode(), None)
        };
        match frame {
            Frame::Grant {
                id,
                region,
                key,
                chunk,
            } => match src.grant(&region, key, chunk) {
                Ok(g) => {
                    // Recorded and answered while the region is held: a deregistration waits
                    // for both and then finds this import.
                    record(sh, conn, &region, key);
                    let f = Frame::Granted {
                        id,
                        alloc_size: g.alloc_size,
                    };
                    write_frame(writer, &f.encode(), Some(g.fd.as_raw_fd()))?;
                    drop(g);
                }
                Err(reason) => refuse(id, reason)?,
            },
            Frame::Opened { id, region, key } => match src.opened(&region, key) {
                Ok(hold) => {
                    record(sh, conn, &region, key);
                    write_frame(writer, &Frame::Ack { id }.encode(), None)?;
                    drop(hold);
                }
                Err(reason) => refuse(id, reason)?,
            },
            Frame::Notif { id, from, msg } => {
                src.notify(&from, msg);
                write_frame(writer, &Frame::Ack { id }.encode(), None)?;
            }
            Frame::Revoked { region, key } => {
                // Only an answer to a revocation in progress counts; others are ignored.
                let mut r = sh.revokes.lock();
                if let Some(acked) = r.get_mut(&(conn, (region, key))) {
                    *acked = true;
                    sh.revoke_cv.notify_all();
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected frame {other:?}"),
                ))
            }
        }
    }
}
