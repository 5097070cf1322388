//! The importer's side: [`IpcClient`], one connection to an owner with its reader thread, which
//! hands revocations to a [`RevokeSink`] (see the [module docs](super)).

use super::*;

/// The second half of a revocation (see [`RevokeSink::revoke`]): waits (bounded) for the copies
/// in flight, closes the mappings; `true` once done, `false` if copies were still running at the
/// bound.
pub(crate) type FinishRevoke = Box<dyn FnOnce() -> bool + Send>;

/// What a client does when its owner revokes a region or the connection ends (the backend's
/// import cache; a fake in tests).
pub(crate) trait RevokeSink: Send + Sync {
    /// The owner revoked `region` (with key `key`). Called on the connection's reader, in frame
    /// order, so it must be quick: stop new copies on the region and forget it. The returned
    /// rest runs on another thread (waiting for copies must not stop the reader, which carries
    /// the answers those copies' notifications wait for); when it returns `true` the client
    /// answers Revoked, otherwise it stays silent and the owner reports it.
    fn revoke(&self, region: &Desc, key: u64) -> FinishRevoke;
    /// The connection to the owner ended (`reason`): the owner no longer tracks what we mapped,
    /// so everything imported from it must be given up.
    fn link_lost(&self, reason: &str);
}

type Reply = (Frame, Vec<OwnedFd>);

/// One connection to the owner: a writer shared by the callers, a reader thread that routes
/// replies to them and handles revocations.
#[derive(Debug)]
struct Link {
    writer: Mutex<UnixStream>,
    waits: Mutex<HashMap<u64, Option<Reply>>>,
    cv: Condvar,
    closed: AtomicBool,
    reason: Mutex<String>,
}

impl Link {
    /// Ends the link (the first reason is kept): callers waiting get an error, the reader sees
    /// the end of the stream.
    fn fail(&self, reason: &str) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            *self.reason.lock() = reason.to_owned();
        }
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
        let _w = self.waits.lock();
        self.cv.notify_all();
    }

    fn reason(&self) -> String {
        let r = self.reason.lock().clone();
        if r.is_empty() {
            "connection closed".into()
        } else {
            r
        }
    }
}

/// A connection to a peer's socket; calls from several threads share it. Connects on first
/// use, and again after the connection ended.
pub(crate) struct IpcClient {
    peer: String,
    path: PathBuf,
    next: AtomicU64,
    timeout: Duration,
    link: Mutex<Option<Arc<Link>>>,
    sink: Option<Arc<dyn RevokeSink>>,
}

impl std::fmt::Debug for IpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcClient")
            .field("peer", &self.peer)
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IpcClient {
    /// A client of the socket at `path` of agent `peer`; every reply is awaited at most
    /// `timeout`. Revocations go to `sink` (without one they are acknowledged at once: nothing
    /// is mapped through such a client).
    pub(crate) fn new(
        peer: &str,
        path: &Path,
        timeout: Duration,
        sink: Option<Arc<dyn RevokeSink>>,
    ) -> IpcClient {
        IpcClient {
            peer: peer.to_owned(),
            path: path.to_owned(),
            next: AtomicU64::new(1),
            timeout: timeout.max(Duration::from_millis(1)),
            link: Mutex::new(None),
            sink,
        }
    }

    fn disconnect(&self, reason: String) -> Error {
        Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason,
        }
    }

    fn open(&self) -> Result<Arc<Link>> {
        let s = UnixStream::connect(&self.path)
            .map_err(|e| self.disconnect(format!("cuda socket {}: {e}", self.path.display())))?;
        let (_, cred_uid) =
            peer_cred(&s).map_err(|e| self.disconnect(format!("SO_PEERCRED: {e}")))?;
        if cred_uid != uid() {
            return Err(Error::Denied {
                peer: self.peer.clone(),
                reason: format!("cuda socket is owned by uid {cred_uid}, not ours"),
            });
        }
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| self.disconnect(format!("socket timeouts: {e}")))?;
        let reader = s
            .try_clone()
            .map_err(|e| self.disconnect(format!("clone the socket: {e}")))?;
        let link = Arc::new(Link {
            writer: Mutex::new(s),
            waits: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
        });
        let l = Arc::clone(&link);
        let sink = self.sink.clone();
        std::thread::Builder::new()
            .name("nixl-cuda-link".into())
            .spawn(move || read_loop(l, &reader, sink.as_deref()))
            .map_err(|e| Error::io("cuda: spawn the socket reader", e))?;
        Ok(link)
    }

    fn link(&self) -> Result<Arc<Link>> {
        let mut g = self.link.lock();
        if let Some(l) = g.as_ref() {
            if !l.closed.load(Ordering::Acquire) {
                return Ok(Arc::clone(l));
            }
        }
        let l = self.open()?;
        *g = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Sends request `id` and waits for its reply (with its fds).
    fn call(&self, id: u64, f: &Frame) -> Result<Reply> {
        let link = self.link()?;
        link.waits.lock().insert(id, None);
        if let Err(e) = write_frame(&link.writer, &f.encode(), None) {
            link.waits.lock().remove(&id);
            let reason = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!("the owner took no data for {:?}", self.timeout)
            } else {
                format!("cuda socket: {e}")
            };
            link.fail(&reason);
            return Err(self.disconnect(reason));
        }
        let deadline = Instant::now() + self.timeout;
        let mut waits = link.waits.lock();
        let got = loop {
            if let Some(Some(r)) = waits.get_mut(&id).map(Option::take) {
                break Ok(r);
            }
            if link.closed.load(Ordering::Acquire) {
                break Err(self.disconnect(link.reason()));
            }
            if link.cv.wait_until(&mut waits, deadline).timed_out() {
                break Err(self.disconnect(format!(
                    "no reply on the cuda socket within {:?}",
                    self.timeout
                )));
            }
        };
        waits.remove(&id);
        drop(waits);
        if got.is_err() && !link.closed.load(Ordering::Acquire) {
            // A stuck owner: the connection is not reused.
            link.fail("no reply in time");
        }
        got
    }

    fn unexpected(&self, reply: &Frame) -> Error {
        if let Some(l) = self.link.lock().as_ref() {
            l.fail("unexpected reply");
        }
        self.disconnect(format!("unexpected reply {reply:?}"))
    }

    /// Asks for chunk `chunk` of `region` with `key`: the exported fd and the allocation size.
    pub(crate) fn grant(&self, region: &Desc, key: u64, chunk: u32) -> Result<(OwnedFd, u64)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, mut fds) = self.call(
            id,
            &Frame::Grant {
                id,
                region: *region,
                key,
                chunk,
            },
        )?;
        match reply {
            Frame::Granted { alloc_size, .. } => match fds.len() {
                1 => Ok((fds.remove(0), alloc_size)),
                n => Err(self.disconnect(format!("grant came with {n} fds, not 1"))),
            },
            Frame::Refused { reason, .. } => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Announces that we map `region` (presenting `key`) through handles from the metadata;
    /// `Err(Denied)` if the owner refused (the region must then not be used).
    pub(crate) fn announce(&self, region: &Desc, key: u64) -> Result<()> {
        self.call_acked(|id| Frame::Opened {
            id,
            region: *region,
            key,
        })
    }

    /// Delivers a notification from `from` and waits for the owner's acknowledgement.
    pub(crate) fn notify(&self, from: &str, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_NOTIF {
            return Err(Error::InvalidArgument(format!(
                "notification of {} bytes exceeds {MAX_NOTIF}",
                msg.len()
            )));
        }
        self.call_acked(|id| Frame::Notif {
            id,
            from: from.to_owned(),
            msg: msg.to_vec(),
        })
    }

    /// Sends the frame `frame` makes with a fresh id and waits for the owner's answer: `Ok` for
    /// an acknowledgement, `Err(Denied)` with the owner's reason for a refusal.
    fn call_acked(&self, frame: impl FnOnce(u64) -> Frame) -> Result<()> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, _) = self.call(id, &frame(id))?;
        match reply {
            Frame::Ack { .. } => Ok(()),
            Frame::Refused { reason, .. } => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Closes the connection (a later call reconnects).
    pub(crate) fn close(&self) {
        if let Some(l) = self.link.lock().take() {
            l.fail("closed by us");
        }
    }
}

impl Drop for IpcClient {
    fn drop(&mut self) {
        self.close();
    }
}

type RevokeJob = (Desc, u64, FinishRevoke);

/// Finishes revocations in order and answers each (one thread per link, started on the first).
fn revoke_worker(link: &Link, jobs: &crossbeam_channel::Receiver<RevokeJob>) {
    for (region, key, finish) in jobs.iter() {
        if finish() {
            let f = Frame::Revoked { region, key };
            if let Err(e) = write_frame(&link.writer, &f.encode(), None) {
                link.fail(&format!("answering a revocation: {e}"));
            }
        }
    }
}

/// The reader of one link: replies go to their callers, revocations to the sink (then to the
/// link's revocation worker); anything else, or garbage, ends the link. At the end the sink
/// gives up what was imported through it.
fn read_loop(link: Arc<Link>, stream: &UnixStream, sink: Option<&dyn RevokeSink>) {
    let mut worker: Option<crossbeam_channel::Sender<RevokeJob>> = None;
    let reason = loop {
        let mut fds = Vec::new();
        let body = match read_frame(stream, &mut fds) {
            Ok(Some(b)) => b,
            Ok(None) => break "the owner closed its cuda socket".to_owned(),
            Err(e) => break format!("cuda socket: {e}"),
        };
        let frame = match Frame::decode(&body) {
            Ok(f) => f,
            Err(e) => break format!("bad frame from the owner: {e}"),
        };
        match frame {
            Frame::Granted { id, .. } | Frame::Refused { id, .. } | Frame::Ack { id } => {
                let mut waits = link.waits.lock();
                // A reply nobody waits for (its caller gave up) is dropped, fds closed.
                if let Some(slot @ None) = waits.get_mut(&id) {
                    *slot = Some((frame, fds));
                    link.cv.notify_all();
                }
            }
            Frame::Revoke { region, key } => {
                drop(fds);
                let finish: FinishRevoke = match sink {
                    Some(s) => s.revoke(&region, key),
                    None => Box::new(|| true),
                };
                if worker.is_none() {
                    let (tx, rx) = crossbeam_channel::unbounded::<RevokeJob>();
                    let l = Arc::clone(&link);
                    let spawned = std::thread::Builder::new()
                        .name("nixl-cuda-revoke".into())
                        .spawn(move || revoke_worker(&l, &rx));
                    match spawned {
                        Ok(_) => worker = Some(tx),
                        Err(e) => break format!("cannot start the revocation thread: {e}"),
                    }
                }
                if let Some(tx) = &worker {
                    if tx.send((region, key, finish)).is_err() {
                        break "the revocation thread ended".to_owned();
                    }
                }
            }
            other => break format!("unexpected frame from the owner: {other:?}"),
        }
    };
    link.fail(&reason);
    // The worker finishes what it was given (its answers fail on the closed link) and ends.
    drop(worker);
    if let Some(s) = sink {
        s.link_lost(&link.reason());
    }
}
