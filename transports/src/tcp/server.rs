//! The target side: a listener, and one thread per accepted connection that authenticates it and
//! then carries out its frames in order against the agent's registrations.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{Error, Result, TargetHandle};
use parking_lot::{Condvar, Mutex};

use super::net;
use super::server_conn::serve;
use super::TcpConfig;
use crate::control::Services;

/// How often a blocked read or write wakes up to check the clock and the shutdown flag.
pub(super) const TICK: Duration = Duration::from_millis(200);

/// Frame bodies up to this size are read without asking the listener's frame memory budget.
pub(super) const SMALL_FRAME: usize = 64 << 10;

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) cfg: Arc<TcpConfig>,
    pub(super) target: TargetHandle,
    pub(super) host: Vec<(String, IpAddr)>,
    /// The socket of each connection being served, to shut down on stop. A connection's entry is
    /// removed (under this lock) before its socket is closed, so every fd here is open.
    pub(super) conns: Mutex<HashMap<u64, RawFd>>,
    /// Data connections past their OPEN, by connection id: the peer's name, whether the
    /// connection's thread waits for a frame with nothing received left to carry out, and the
    /// socket (open while its entry is here, as in `conns`). See [`Server::peer_idle`].
    pub(super) data: Mutex<HashMap<u64, DataConn>>,
    /// Signalled whenever an entry leaves `data` (its thread no longer touches memory), for
    /// [`Fence::wait`].
    data_gone: Condvar,
    /// Connections being served, in total and per peer address.
    admitted: Mutex<Admitted>,
    /// `max_conns`, capped by the fd limit.
    max_conns: usize,
    /// Bytes reserved by frame bodies over [`SMALL_FRAME`] being read or handled.
    pub(super) frame_bytes: AtomicUsize,
    /// When a refusal was last logged (ms since `started`), so a flood logs once a second.
    last_warn: AtomicU64,
    started: Instant,
    pub(super) next: AtomicU64,
    pub(super) shut: AtomicBool,
    pub(super) services: Arc<Services>,
}

#[derive(Debug)]
pub(super) struct DataConn {
    pub(super) peer: Arc<str>,
    pub(super) waiting: Arc<AtomicBool>,
    pub(super) fd: RawFd,
}

/// A data connection's entry in [`Shared::data`], removed on drop (before the socket closes),
/// once its worker (and with it every hold on registered memory) is gone.
pub(super) struct DataEntry<'a>(pub(super) &'a Shared, pub(super) u64);

impl Drop for DataEntry<'_> {
    fn drop(&mut self) {
        let mut data = self.0.data.lock();
        data.remove(&self.1);
        self.0.data_gone.notify_all();
    }
}

/// The data connections of one peer that [`Server::fence_peer`] shut down: waits for their
/// threads to end.
#[derive(Debug)]
pub(super) struct Fence {
    shared: Arc<Shared>,
    ids: Vec<u64>,
}

impl Fence {
    /// Waits up to `wait` until the thread of every fenced connection has ended (its worker,
    /// and every access to registered memory it held, dropped); returns whether they all have.
    /// A shut socket fails the thread's blocked reads and writes at once, so this takes as long
    /// as the threads take to be scheduled and unwind, not as long as the peer lets it.
    pub(super) fn wait(&self, wait: Duration) -> bool {
        let until = Instant::now().checked_add(wait);
        let mut data = self.shared.data.lock();
        while self.ids.iter().any(|id| data.contains_key(id)) {
            match until {
                Some(until) => {
                    if self
                        .shared
                        .data_gone
                        .wait_until(&mut data, until)
                        .timed_out()
                    {
                        return !self.ids.iter().any(|id| data.contains_key(id));
                    }
                }
                None => self.shared.data_gone.wait(&mut data),
            }
        }
        true
    }
}

/// Bytes received on `fd` and not read yet.
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the caller keeps `fd` open.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        // Unknown: count it as work, the answer that can only delay a free.
        1
    } else {
        n.max(0) as usize
    }
}

#[derive(Debug, Default)]
struct Admitted {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A connection's place under the listener's caps, given back on drop.
pub(super) struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.shared.admitted.lock();
        a.total -= 1;
        if let Some(n) = a.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                a.per_ip.remove(&self.ip);
            }
        }
        metrics::gauge!("nixl_tcp_conns_open").set(a.total as f64);
    }
}

impl Shared {
    /// Takes a slot for a connection from `ip`, or says which cap refuses it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> std::result::Result<Slot, &'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut a = self.admitted.lock();
        if a.total >= self.max_conns {
            return Err("total");
        }
        let n = a.per_ip.entry(ip).or_insert(0);
        if *n >= self.cfg.max_conns_per_ip {
            return Err("per_ip");
        }
        *n += 1;
        a.total += 1;
        metrics::gauge!("nixl_tcp_conns_open").set(a.total as f64);
        Ok(Slot {
            shared: Arc::clone(self),
            ip,
        })
    }

    /// Whether a refusal may be logged now (at most one a second).
    fn may_warn(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_warn.load(Ordering::Relaxed);
        (last == 0 || now >= last + 1000)
            && self
                .last_warn
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Bytes of the frame memory budget held by one frame body, given back on drop.
pub(super) struct Reserved<'a>(pub(super) &'a AtomicUsize, pub(super) usize);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// The fd limit of the process (soft), if it can be read.
fn fd_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    usize::try_from(r.rlim_cur).ok()
}

/// A running listener.
#[derive(Debug)]
pub(super) struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// The addresses published in the agent's metadata.
    pub(super) published: Vec<SocketAddr>,
}

impl Server {
    pub(super) fn start(
        cfg: Arc<TcpConfig>,
        target: TargetHandle,
        services: Arc<Services>,
    ) -> Result<Server> {
        let want = cfg
            .listen
            .unwrap_or_else(|| SocketAddr::new(net::default_listen_ip(), 0));
        let listener =
            TcpListener::bind(want).map_err(|e| Error::io(format!("tcp listen on {want}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("tcp listener address", e))?;
        let host = net::host_addrs();
        let published = publish(bound, &host);
        if cfg.auth.allow_open() {
            let warning = format!(
                "nixl: WARNING: agent '{}' listens on {bound} with NO AUTHENTICATION \
                 ([auth] allow_open = true): anyone who reaches this port, any local user \
                 included, can read and write this agent's registered memory",
                target.name()
            );
            tracing::warn!(agent = %target.name(), %bound, "{warning}");
            eprintln!("{warning}");
        }
        // Each connection holds one fd: keep at least half of the process's fds for the rest
        // of the application whatever the configuration says.
        let max_conns = match fd_limit() {
            Some(fds) if cfg.max_conns > fds / 2 => {
                let capped = (fds / 2).max(16);
                tracing::warn!(agent = %target.name(), max_conns = cfg.max_conns, fd_limit = fds,
                    capped, "tcp: max_conns capped at half the fd limit");
                capped
            }
            _ => cfg.max_conns,
        };
        tracing::info!(agent = %target.name(), ?published, auth = %cfg.auth.describe(),
            max_conns, "tcp listening");
        let shared = Arc::new(Shared {
            cfg,
            target,
            host,
            conns: Mutex::new(HashMap::new()),
            data: Mutex::new(HashMap::new()),
            data_gone: Condvar::new(),
            admitted: Mutex::new(Admitted::default()),
            max_conns,
            frame_bytes: AtomicUsize::new(0),
            last_warn: AtomicU64::new(0),
            started: Instant::now(),
            next: AtomicU64::new(1),
            shut: AtomicBool::new(false),
            services,
        });
        let l2 = listener
            .try_clone()
            .map_err(|e| Error::io("tcp listener", e))?;
        let s2 = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nixl-tcp-accept".into())
            .spawn(move || accept_loop(s2, l2))
            .map_err(|e| Error::io("spawn tcp accept thread", e))?;
        Ok(Server {
            shared,
            listener,
            published,
        })
    }

    /// Whether no data connection of `peer` has a frame being carried out or received and
    /// waiting: every READ it asked of this agent so far has stopped reading the memory. Exact
    /// for what arrived before the call: a connection counts as idle only while its thread
    /// waits for a frame with nothing read and nothing unread (it marks itself busy before it
    /// takes a byte off the socket, and the socket's unread count is read between two looks
    /// at that mark).
    pub(super) fn peer_idle(&self, peer: &str) -> bool {
        let data = self.shared.data.lock();
        data.values().filter(|c| &*c.peer == peer).all(|c| {
            // SeqCst on both sides: the thread clears `waiting` before it reads the socket.
            c.waiting.load(Ordering::SeqCst)
                && unread(c.fd) == 0
                && c.waiting.load(Ordering::SeqCst)
        })
    }

    /// Ends what this listener serves `peer`: shuts down (both ways) every data connection of
    /// `peer` past its OPEN, so that their threads' blocked reads and writes fail at once, a
    /// chunk being served stops mid-way and frames the peer queued are not carried out (the
    /// first that answers fails on the shut socket). [`Fence::wait`] waits for the threads to
    /// end; once they have, [`Server::peer_idle`] no longer counts them. Connections the peer
    /// opens afterwards are served as usual: they carry requests made after the fence.
    pub(super) fn fence_peer(&self, peer: &str) -> Fence {
        let data = self.shared.data.lock();
        let ids: Vec<u64> = data
            .iter()
            .filter(|(_, c)| &*c.peer == peer)
            .map(|(id, c)| {
                // SAFETY: the fd is open while its entry is in the map (the entry is removed,
                // under this lock, before the socket closes). Shutdown only makes the
                // connection's reads and writes fail; its thread then ends and closes it.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
                *id
            })
            .collect();
        drop(data);
        if !ids.is_empty() {
            metrics::counter!("nixl_tcp_fenced_conns_total").increment(ids.len() as u64);
            tracing::info!(agent = %self.shared.target.name(), peer, conns = ids.len(),
                "tcp: fenced a peer: its data connections are shut down");
        }
        Fence {
            shared: Arc::clone(&self.shared),
            ids,
        }
    }

    /// Bytes of the `frame_memory` budget that admitted frames hold now (for tests).
    #[cfg(test)]
    pub(super) fn frame_bytes_held(&self) -> usize {
        self.shared.frame_bytes.load(Ordering::Acquire)
    }

    /// Stops accepting and drops every connection (their threads end soon after).
    pub(super) fn stop(&self) {
        self.shared.shut.store(true, Ordering::Release);
        // SAFETY: shutdown on our own listening socket only wakes the blocked accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let mut conns = self.shared.conns.lock();
        for (_, fd) in conns.drain() {
            // SAFETY: the fd is open: its connection removes it from the map, under this lock,
            // before closing it. Shutdown only wakes the connection's blocked reads and writes.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A wildcard bind publishes every non-loopback address of the host (loopback last, so that
/// agents on one host still find each other); a specific bind publishes itself.
fn publish(bound: SocketAddr, host: &[(String, IpAddr)]) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let v6 = bound.is_ipv6();
    let mut out: Vec<SocketAddr> = host
        .iter()
        .map(|(_, ip)| *ip)
        .filter(|ip| !ip.is_loopback() && (v6 || ip.is_ipv4()))
        .filter(|ip| match ip {
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    out.push(SocketAddr::new(
        if v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        },
        bound.port(),
    ));
    out
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                if shared.shut.load(Ordering::Acquire) {
                    return;
                }
                // One thread per connection, as many as connections are admitted: the caps
                // bound both.
                let slot = match shared.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(cap) => {
                        metrics::counter!("nixl_tcp_conns_refused_total", "cap" => cap)
                            .increment(1);
                        if shared.may_warn() {
                            tracing::warn!(agent = %shared.target.name(), %peer, cap,
                                max_conns = shared.max_conns,
                                max_conns_per_ip = shared.cfg.max_conns_per_ip,
                                "tcp: connection refused, the listener is at its cap");
                        }
                        drop(s);
                        continue;
                    }
                };
                let sh = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("nixl-tcp-serve".into())
                    .spawn(move || serve(sh, s, peer, slot));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a tcp connection thread");
                }
            }
            Err(e) => {
                if shared.shut.load(Ordering::Acquire) {
                    return;
                }
                tracing::warn!(error = %e, "tcp accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
