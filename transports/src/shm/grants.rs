//! Cross-memory grants (both sides): the grant table a target lends each connection, granting,
//! draining and revoking.

use super::*;

/// Slots in a connection's grant table.
pub(super) const GRANT_SLOTS: usize = 4096;
/// Bytes per slot: the live generation word, then the in-flight counter.
pub(super) const SLOT_BYTES: usize = 16;
/// Size of a grant table.
pub(super) const TABLE_BYTES: usize = GRANT_SLOTS * SLOT_BYTES;
/// How long deregistration waits for a peer's granted copy in flight (as long as the agent
/// waits for its own transfers holding a region).
pub(super) const GRANT_DRAIN_PATIENCE: Duration = Duration::from_secs(60);

/// A connection's grant table: a sealed memfd the target creates and maps, and lends to the
/// one initiator of that connection, which maps it too. Slot `i` holds two words: `live`, the
/// generation of the grant in it (0: revoked, written by the target only), and `inflight`, the
/// initiator's copies under way on it (written by the initiator only).
#[derive(Debug)]
pub(super) struct GrantTable {
    pub(super) base: *mut u8,
    /// The memfd, kept by the target to lend it.
    pub(super) fd: Option<OwnedFd>,
}

// SAFETY: the table is shared memory accessed only through atomics.
unsafe impl Send for GrantTable {}
// SAFETY: as above.
unsafe impl Sync for GrantTable {}

impl GrantTable {
    /// A fresh table (target side).
    pub(super) fn create() -> io::Result<GrantTable> {
        let fd = sys::memfd(TABLE_BYTES, false)?;
        let base = sys::map_shared(fd.as_raw_fd(), TABLE_BYTES, true)?;
        Ok(GrantTable { base, fd: Some(fd) })
    }

    /// Maps a table a target lent us (initiator side): a memfd sealed against shrinking and
    /// growing, of the right size, or nothing is mapped.
    pub(super) fn adopt(fd: &OwnedFd) -> std::result::Result<GrantTable, sys::MapError> {
        let base = sys::map_sealed(fd.as_raw_fd(), "grant table", TABLE_BYTES, |size| {
            if size == TABLE_BYTES as u64 {
                Ok(())
            } else {
                Err(format!("not {TABLE_BYTES}"))
            }
        })?;
        Ok(GrantTable { base, fd: None })
    }

    pub(super) fn word(&self, slot: u32, which: usize) -> &AtomicU64 {
        let i = (slot as usize).min(GRANT_SLOTS - 1) * SLOT_BYTES + which * 8;
        // SAFETY: `i + 8 <= TABLE_BYTES` (slot clamped), the mapping is page-aligned so the word
        // is 8-aligned, and it lives as long as `self`; it is only accessed atomically.
        unsafe { &*(self.base.add(i) as *const AtomicU64) }
    }

    pub(super) fn live(&self, slot: u32) -> &AtomicU64 {
        self.word(slot, 0)
    }

    pub(super) fn inflight(&self, slot: u32) -> &AtomicU64 {
        self.word(slot, 1)
    }
}

impl Drop for GrantTable {
    fn drop(&mut self) {
        // SAFETY: (base, TABLE_BYTES) is our mapping; the table is dropped with its last user.
        unsafe { sys::unmap(self.base, TABLE_BYTES) };
    }
}

/// The target's view of one connection's grant table.
#[derive(Debug)]
pub(super) struct TableSlots {
    pub(super) table: Arc<GrantTable>,
    /// The initiator process (None if no pidfd could be had: then only its count tells).
    pub(super) pidfd: Option<Arc<OwnedFd>>,
    pub(super) free: Vec<u32>,
    pub(super) next_gen: u64,
}

/// Answers a GrantReq: checks the region as for an Op, records the grant, lends the table.
#[allow(clippy::too_many_arguments)]
pub(super) fn grant_cma(
    inner: &Inner,
    target: &TargetHandle,
    writer: &Mutex<UnixStream>,
    (conn_id, peer_pid): (u64, i32),
    id: u64,
    addr: u64,
    len: u64,
    key: u64,
) -> io::Result<()> {
    let refuse = |status, text: String| {
        let f = Frame::GrantReply {
            id,
            status,
            slot: 0,
            gen: 0,
            text,
        };
        send(writer, &f)
    };
    if !inner.cfg.cma_grants {
        return refuse(
            Status::Failed,
            "this agent gives no cross-memory grants".into(),
        );
    }
    let d = Desc::new(addr, len, 0);
    if len == 0 || d.end().is_none() {
        return refuse(Status::Denied, "empty or wrapping region".into());
    }
    // Held until the grant is recorded: a deregistration drains it before it revokes grants.
    let access = match target.check(MemKind::Dram, &d, key) {
        Ok(a) => a,
        Err(denied) => {
            metrics::counter!("nixl_access_denied_total", "backend" => "shm").increment(1);
            return refuse(Status::Denied, denied.to_string());
        }
    };
    if access.region().desc != d {
        return refuse(Status::Denied, "a grant covers a whole region".into());
    }
    let mut tables = inner.grant_tables.lock();
    let slots = match tables.entry(conn_id) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => match GrantTable::create() {
            Ok(t) => v.insert(TableSlots {
                table: Arc::new(t),
                pidfd: sys::pidfd_open(peer_pid).ok().map(Arc::new),
                free: (0..GRANT_SLOTS as u32).rev().collect(),
                next_gen: 0,
            }),
            Err(e) => {
                drop(tables);
                return refuse(Status::Failed, format!("grant table: {e}"));
            }
        },
    };
    let Some(slot) = slots.free.pop() else {
        drop(tables);
        return refuse(Status::Failed, "grant table full".into());
    };
    slots.next_gen += 1;
    let gen = slots.next_gen;
    let table = Arc::clone(&slots.table);
    table.live(slot).store(gen, Ordering::SeqCst);
    inner
        .cma_grants
        .lock()
        .entry(key)
        .or_default()
        .push((conn_id, slot));
    drop(tables);
    drop(access);
    let reply = Frame::GrantReply {
        id,
        status: Status::Ok,
        slot,
        gen,
        text: String::new(),
    };
    let fd = table.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let w = writer.lock();
    sys::send_with_fd(&w, &reply.encode(), fd)
}

/// Waits until `idle()`, or the process behind `pidfd` has exited (its copies with it), or
/// `deadline`; false on the deadline.
pub(super) fn drain(idle: impl Fn() -> bool, pidfd: Option<&OwnedFd>, deadline: Instant) -> bool {
    let mut spins = 0u32;
    loop {
        if idle() || pidfd.is_some_and(sys::pid_exited) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        spins += 1;
        if spins < 100 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Inner {
    /// The connection `conn` has ended: revokes every grant given on it and waits for the
    /// copies under way, then forgets them. (A connection ends when the peer closes its side,
    /// which it also does on invalidation, alive and possibly still copying: so the end of
    /// the connection alone is not the end of its copies.)
    pub(super) fn end_grants(&self, conn: u64) {
        let entry = self
            .grant_tables
            .lock()
            .get(&conn)
            .map(|t| (Arc::clone(&t.table), t.pidfd.clone()));
        if let Some((table, pidfd)) = entry {
            for slot in 0..GRANT_SLOTS as u32 {
                table.live(slot).store(0, Ordering::SeqCst);
            }
            let idle =
                || (0..GRANT_SLOTS as u32).all(|s| table.inflight(s).load(Ordering::SeqCst) == 0);
            if !drain(
                idle,
                pidfd.as_deref(),
                Instant::now() + GRANT_DRAIN_PATIENCE,
            ) {
                tracing::error!(
                    conn,
                    "shm: a closed peer's granted copies did not end in time"
                );
            }
        }
        // Only now: a revocation meanwhile found the table and waited on its slot itself.
        self.grant_tables.lock().remove(&conn);
        for grants in self.cma_grants.lock().values_mut() {
            grants.retain(|(c, _)| *c != conn);
        }
    }

    /// Revokes every cross-memory grant on the region with `key`: marks each slot revoked, then
    /// waits (bounded) until the copies the initiator started before that have ended.
    pub(super) fn revoke_grants(&self, key: u64) {
        let Some(grants) = self.cma_grants.lock().remove(&key) else {
            return;
        };
        // A copy under way ends in microseconds to milliseconds; a peer stopped in the middle
        // of one (SIGSTOP, a debugger) holds us as long as a held local transfer holds the
        // agent's deregistration, since the memory may be freed and reused once we return.
        let deadline = Instant::now() + GRANT_DRAIN_PATIENCE.max(self.cfg.revoke_timeout);
        for (conn, slot) in grants {
            let Some((table, pidfd)) = self
                .grant_tables
                .lock()
                .get(&conn)
                .map(|t| (Arc::clone(&t.table), t.pidfd.clone()))
            else {
                continue; // that connection's grants were all revoked and drained when it ended
            };
            // Dekker with the initiator's `inflight += 1; check live`: both SeqCst, so either
            // it sees 0 here and backs off, or we see its count below and wait for the copy.
            table.live(slot).store(0, Ordering::SeqCst);
            let idle = || table.inflight(slot).load(Ordering::SeqCst) == 0;
            let drained = drain(idle, pidfd.as_deref(), deadline);
            if drained {
                if let Some(t) = self.grant_tables.lock().get_mut(&conn) {
                    t.free.push(slot);
                }
            } else {
                // The slot is not reused (its counter is not trusted any more).
                tracing::error!(
                    key,
                    "shm: a peer's copy on a deregistered region did not end in time"
                );
            }
        }
    }
}
