//! The owner's Unix socket, shared by the backends that hand their memory to agents on the same
//! node (`shm`, `cuda`): the listener and its accept loop, the check that a peer runs as our
//! uid, the table of connections peers opened to us, which connection imported which region,
//! and revocation: tell every importer, wait (bounded) for each to acknowledge or end.
//!
//! What goes over the socket (frames, fds, grants) stays with each backend: this module only
//! keeps the connections and the bookkeeping both sides of a revocation need. The importer's side
//! keeps its connections in a [`Clients`] list.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nixl_core::{Error, Result};
use parking_lot::{Condvar, Mutex};

/// A connection's writer: the serving thread answers on it, a revocation sends on it.
pub(crate) type Writer = Arc<Mutex<UnixStream>>;

/// Binds `path` (inside `dir`, made private first: see `unix::secure_socket_dir`), replacing a
/// stale socket, and makes the listener non-blocking for [`spawn_accept`].
pub(crate) fn bind(dir: &Path, path: &Path, backend: &str) -> Result<UnixListener> {
    crate::unix::secure_socket_dir(dir, backend)?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("{backend}: bind {}", path.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(format!("{backend}: listener"), e))?;
    Ok(listener)
}

/// The socket's file name for the agent `target`: `{prefix}{name}-{instance id}.sock`, the name cut
/// to 40 characters of `[A-Za-z0-9_-]` (others become `_`).
pub(crate) fn socket_file(prefix: &str, target: &nixl_core::TargetHandle) -> String {
    let name: String = target
        .name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{prefix}{name}-{:032x}.sock", target.instance_id())
}

/// Accepts peers on `listener` on a thread named `thread` until `stopped()` says so; each peer is
/// served on its own thread (named `serve_thread`) by `serve`, whose error ends that connection
/// only (logged at debug).
pub(crate) fn spawn_accept<S, F>(
    listener: UnixListener,
    backend: &'static str,
    thread: &str,
    serve_thread: &'static str,
    stopped: S,
    serve: F,
) -> Result<()>
where
    S: Fn() -> bool + Send + 'static,
    F: Fn(UnixStream) -> io::Result<()> + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || accept_loop(&listener, backend, serve_thread, stopped, serve))
        .map(drop)
        .map_err(|e| Error::io(format!("{backend}: spawn the socket thread"), e))
}

fn accept_loop<S, F>(
    listener: &UnixListener,
    backend: &'static str,
    serve_thread: &'static str,
    stopped: S,
    serve: Arc<F>,
) where
    S: Fn() -> bool,
    F: Fn(UnixStream) -> io::Result<()> + Send + Sync + 'static,
{
    while !stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let serve = Arc::clone(&serve);
                let spawned =
                    std::thread::Builder::new()
                        .name(serve_thread.into())
                        .spawn(move || {
                            if let Err(e) = serve(stream) {
                                tracing::debug!(error = %e, "{backend}: connection ended");
                            }
                        });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "{backend}: cannot serve a connection");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Sleep in poll(2) until a peer connects (at once) or 200 ms pass (to look at
                // `stopped`): an idle agent wakes 5 times a second here, not 100.
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on our own listening socket, for the call's duration.
                unsafe { libc::poll(&mut pfd, 1, 200) };
            }
            Err(e) => {
                tracing::warn!(error = %e, "{backend}: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Makes an accepted `stream` blocking and checks with `SO_PEERCRED` that the peer runs as our
/// uid (else `PermissionDenied`); returns the peer's pid.
pub(crate) fn admit(stream: &UnixStream) -> io::Result<i32> {
    stream.set_nonblocking(false)?;
    let (pid, uid) = crate::unix::peer_cred(stream)?;
    if uid != crate::unix::uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {uid} is not ours"),
        ));
    }
    Ok(pid)
}

/// The outcome of a revocation: how many importers acknowledged, had gone, or were late.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RevokeReport {
    /// Connections that had imported the region.
    pub peers: usize,
    /// Those that acknowledged in time.
    pub acked: usize,
    /// Those whose connection had ended or ended meanwhile (skipped).
    pub gone: usize,
    /// Those still silent at the deadline (reported; the owner went on).
    pub late: usize,
}

/// The connections peers opened to an owner and what each imported, by region id `R`.
#[derive(Debug)]
pub(crate) struct Peers<R> {
    /// Writers of the live connections.
    conns: Mutex<HashMap<u64, Writer>>,
    next: AtomicU64,
    /// Which connections imported which region.
    imports: Mutex<HashMap<R, HashSet<u64>>>,
    /// Revocations in progress: (connection, region) → acknowledged.
    revokes: Mutex<HashMap<(u64, R), bool>>,
    revoke_cv: Condvar,
}

impl<R: Copy + Eq + Hash> Default for Peers<R> {
    fn default() -> Self {
        Peers {
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            imports: Mutex::new(HashMap::new()),
            revokes: Mutex::new(HashMap::new()),
            revoke_cv: Condvar::new(),
        }
    }
}

impl<R: Copy + Eq + Hash> Peers<R> {
    /// Adds a served connection; returns its id.
    pub(crate) fn join(&self, writer: Writer) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().insert(id, writer);
        id
    }

    /// The connection is over: nothing it imported is tracked any more (the peer gives its
    /// imports up when it sees the end), and a revocation waiting for it goes on.
    pub(crate) fn leave(&self, conn: u64) {
        self.conns.lock().remove(&conn);
        self.imports.lock().retain(|_, conns| {
            conns.remove(&conn);
            !conns.is_empty()
        });
        let _r = self.revokes.lock();
        self.revoke_cv.notify_all();
    }

    /// Records that connection `conn` imported `region`.
    pub(crate) fn record(&self, conn: u64, region: R) {
        self.imports.lock().entry(region).or_default().insert(conn);
    }

    #[cfg(test)]
    /// Connections that imported `region` and have not given it up.
    pub(crate) fn importers(&self, region: &R) -> usize {
        self.imports.lock().get(region).map_or(0, HashSet::len)
    }

    /// Connection `conn` acknowledged the revocation of `region`; an acknowledgement of no
    /// revocation in progress is ignored.
    pub(crate) fn acked(&self, conn: u64, region: R) {
        let mut r = self.revokes.lock();
        if let Some(acked) = r.get_mut(&(conn, region)) {
            *acked = true;
            self.revoke_cv.notify_all();
        }
    }

    /// Revocations in progress (none once every `revoke` has returned).
    #[cfg(test)]
    pub(crate) fn revoking(&self) -> usize {
        self.revokes.lock().len()
    }

    /// Revokes every import of `region`: `send`s the revocation on each importer's connection
    /// and waits until each has acknowledged ([`Peers::acked`]) or ended, until `deadline` or
    /// until `stopped()`.
    pub(crate) fn revoke(
        &self,
        region: R,
        send: impl Fn(u64, &Mutex<UnixStream>),
        deadline: Instant,
        stopped: impl Fn() -> bool,
    ) -> RevokeReport {
        let holders: Vec<u64> = self
            .imports
            .lock()
            .remove(&region)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        let mut report = RevokeReport {
            peers: holders.len(),
            ..RevokeReport::default()
        };
        if holders.is_empty() {
            return report;
        }
        {
            // Registered before sending, so that an answer cannot come before its slot.
            let mut r = self.revokes.lock();
            for c in &holders {
                r.insert((*c, region), false);
            }
        }
        for c in &holders {
            let w = self.conns.lock().get(c).cloned();
            if let Some(w) = w {
                send(*c, &w);
            }
        }
        let mut r = self.revokes.lock();
        loop {
            let waiting = {
                let conns = self.conns.lock();
                holders
                    .iter()
                    .filter(|c| conns.contains_key(c) && r.get(&(**c, region)) == Some(&false))
                    .count()
            };
            if waiting == 0 || stopped() {
                break;
            }
            if self.revoke_cv.wait_until(&mut r, deadline).timed_out() {
                break;
            }
        }
        let conns = self.conns.lock();
        for c in &holders {
            match r.remove(&(*c, region)) {
                Some(true) => report.acked += 1,
                _ if !conns.contains_key(c) => report.gone += 1,
                _ => report.late += 1,
            }
        }
        report
    }

    /// Shuts every served connection down (their serving threads see the end and leave) and
    /// wakes revocations waiting on them.
    pub(crate) fn close_all(&self) {
        for (_, w) in self.conns.lock().drain() {
            let _ = w.lock().shutdown(std::net::Shutdown::Both);
        }
        let _r = self.revokes.lock();
        self.revoke_cv.notify_all();
    }
}

/// The connections an importer opened to owners, held weakly (a connection its user dropped is
/// forgotten): closed all at once when the backend shuts down.
#[derive(Debug)]
pub(crate) struct Clients<T>(Mutex<Vec<Weak<T>>>);

impl<T> Default for Clients<T> {
    fn default() -> Self {
        Clients(Mutex::new(Vec::new()))
    }
}

impl<T> Clients<T> {
    /// Adds `conn`, forgetting the dropped ones.
    pub(crate) fn add(&self, conn: &Arc<T>) {
        let mut conns = self.0.lock();
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(conn));
    }

    /// The live connections (the list is left as it is).
    pub(crate) fn live(&self) -> Vec<Arc<T>> {
        self.0.lock().iter().filter_map(Weak::upgrade).collect()
    }

    /// Takes every live connection out of the list.
    pub(crate) fn drain(&self) -> Vec<Arc<T>> {
        self.0
            .lock()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect()
    }
}
