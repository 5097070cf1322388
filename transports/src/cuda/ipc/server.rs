//! The owner's side: [`IpcServer`] grants exported VMM fds to peers that present the region key,
//! records which peer imported which region, revokes those imports when the owner deregisters,
//! and receives notifications (see the [module docs](super)).

use super::*;

/// Keeps the owner's region from being deregistered (its `RegionAccess`) until the server has
/// recorded an import and sent its answer.
pub(crate) type Hold = Box<dyn Send>;

/// A granted chunk.
pub(crate) struct Grant {
    /// A duplicate of the chunk's exported fd.
    pub fd: OwnedFd,
    /// Size of the exported allocation.
    pub alloc_size: u64,
    /// Held until the grant is recorded and sent.
    pub _hold: Hold,
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
pub(crate) trait GrantSource: Send + Sync {
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

pub(crate) use crate::owner::RevokeReport;

/// A region as the owner published it, with its key.
type RegionId = (Desc, u64);

#[derive(Debug)]
pub(super) struct ServerShared {
    path: PathBuf,
    shut: AtomicBool,
    /// The live connections, what each imported, the revocations in progress.
    pub(super) peers: Peers<RegionId>,
    /// Write timeout of every connection.
    io_timeout: Duration,
}

/// The owner's socket service. Stops (and removes its socket) on [`IpcServer::shutdown`] or drop.
#[derive(Debug)]
pub(crate) struct IpcServer {
    pub(super) shared: Arc<ServerShared>,
}

impl IpcServer {
    /// Binds `dir/<file>` (`dir` created with mode 0700, or refused unless ours and private:
    /// see `unix::secure_socket_dir`) and serves `source` (held weakly: a dropped owner is
    /// answered "shut down"). Writes to a peer time out after `io_timeout`.
    pub(crate) fn start(
        dir: &Path,
        file: &str,
        source: Weak<dyn GrantSource>,
        io_timeout: Duration,
    ) -> Result<IpcServer> {
        let path = dir.join(file);
        let listener = crate::owner::bind(dir, &path, "cuda")?;
        let shared = Arc::new(ServerShared {
            path,
            shut: AtomicBool::new(false),
            peers: Peers::default(),
            io_timeout: io_timeout.max(Duration::from_millis(1)),
        });
        let (sh, sh2) = (Arc::clone(&shared), Arc::clone(&shared));
        crate::owner::spawn_accept(
            listener,
            "cuda",
            "nixl-cuda-ipc",
            "nixl-cuda-serve",
            move || sh.shut.load(Ordering::Acquire),
            move |stream| serve(&sh2, stream, &source),
        )?;
        Ok(IpcServer { shared })
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.shared.path
    }

    #[cfg(test)]
    /// Connections that imported `region` (with key `key`) and have not given it up.
    pub(crate) fn importers(&self, region: &Desc, key: u64) -> usize {
        self.shared.peers.importers(&(*region, key))
    }

    /// Revokes every peer's import of `region` (with key `key`): sends Revoke to each connection
    /// that imported it and waits until each has answered Revoked or ended, at most `timeout`.
    /// Peers still silent then are logged and counted in [`RevokeReport::late`].
    pub(crate) fn revoke(&self, region: &Desc, key: u64, timeout: Duration) -> RevokeReport {
        let sh = &self.shared;
        let frame = Frame::Revoke {
            region: *region,
            key,
        }
        .encode();
        let report = sh.peers.revoke(
            (*region, key),
            |c, w| {
                if let Err(e) = write_frame(w, &frame, None) {
                    tracing::debug!(conn = c, error = %e, "cuda: sending a revocation failed");
                }
            },
            Instant::now() + timeout,
            || sh.shut.load(Ordering::Acquire),
        );
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
    pub(crate) fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.peers.close_all();
        let _ = std::fs::remove_file(&self.shared.path);
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(sh: &ServerShared, stream: UnixStream, source: &Weak<dyn GrantSource>) -> io::Result<()> {
    crate::owner::admit(&stream)?;
    stream.set_write_timeout(Some(sh.io_timeout))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let id = sh.peers.join(Arc::clone(&writer));
    let result = if sh.shut.load(Ordering::Acquire) {
        Ok(())
    } else {
        serve_frames(sh, id, &stream, &writer, source)
    };
    // The connection is over: nothing it imported is tracked any more (the peer gives its
    // mappings up when it sees the end), and a revocation waiting for it goes on.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sh.peers.leave(id);
    result
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
                    sh.peers.record(conn, (region, key));
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
                    sh.peers.record(conn, (region, key));
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
                sh.peers.acked(conn, (region, key));
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
