//! The initiator's prepared transfers: granted and round-trip cross-memory copies, mapped copies.

use super::*;

/// Granted copies up to this size run on the posting thread (a few milliseconds at most; from
/// 8 MiB with copy pool workers beside it): no thread to wake first, which on a busy host costs
/// more than the copy. Bigger ones run on a thread of their own.
pub(super) const GRANT_INLINE_MAX: u64 = 16 << 20;

/// A prepared transfer we copy ourselves with `process_vm_*` under the target's grants.
#[derive(Debug)]
pub(super) struct GrantedXfer {
    conn: Arc<Conn>,
    dir: Cma,
    total: u64,
    /// What each post copies, read in place (no list is built from it): the core's runs, or
    /// the pieces of a request made from descriptors.
    runs: Arc<Vec<Run>>,
    grants: Arc<[Arc<Grant>]>,
    notif: Option<Vec<u8>>,
}

impl Cma {
    /// The initiator's direction for `op`: a WRITE pushes into the target, a READ pulls.
    pub(super) fn of(op: XferOp) -> Cma {
        match op {
            XferOp::Write => Cma::Push,
            XferOp::Read => Cma::Pull,
        }
    }
}

impl GrantedXfer {
    /// A transfer of `runs` (every remote range checked against its grant by the caller) under
    /// `grants`, one per remote region of `plan`.
    pub(super) fn new(
        conn: Arc<Conn>,
        plan: &XferPlan,
        runs: Vec<Run>,
        grants: Vec<Arc<Grant>>,
    ) -> GrantedXfer {
        GrantedXfer {
            conn,
            dir: Cma::of(plan.op),
            total: runs.iter().map(|r| r.len).sum(),
            runs: Arc::new(runs),
            grants: grants.into(),
            notif: plan.notif.clone(),
        }
    }

    /// Copies under the grants and ends the post.
    pub(super) fn run(
        conn: &Conn,
        dir: Cma,
        total: u64,
        runs: &[Run],
        grants: &[Arc<Grant>],
        notif: Option<&[u8]>,
        done: Completion,
    ) {
        let Some(hold) = GrantHold::enter(grants) else {
            done.complete(Err(conn.revoked()));
            return;
        };
        // Checked after entering: a target that exits can no longer revoke, and its pid must
        // not be written once it may have been reused.
        if conn.target_exited() {
            drop(hold);
            done.complete(Err(Error::RemoteDisconnect {
                peer: conn.peer.to_string(),
                reason: "the target process has exited".into(),
            }));
            return;
        }
        let threads = conn.backend.cfg.copy_threads;
        // SAFETY: our ranges lie in our registered regions, held by `done` until it completes;
        // the target's were checked against its grants, held live by `hold`.
        let r = unsafe { copy_split(conn.pid, dir, runs, total, threads) };
        drop(hold);
        let outcome = match r {
            Ok(n) if n == total => match notif {
                // The data has landed: the notification follows it on the socket.
                Some(msg) => conn.send(&Frame::Notif { msg: msg.to_vec() }),
                None => Ok(()),
            },
            Ok(n) => Err(Error::Backend {
                backend: BackendName::Shm,
                op: "copy",
                reason: format!("moved {n} of {total} bytes"),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) || conn.target_exited() => {
                Err(Error::RemoteDisconnect {
                    peer: conn.peer.to_string(),
                    reason: format!("the target process has exited ({e})"),
                })
            }
            Err(e) => Err(Error::Backend {
                backend: BackendName::Shm,
                op: "copy",
                reason: cma_failure(&e, conn.pid, dir),
            }),
        };
        done.complete(outcome);
    }
}

impl PreparedXfer for GrantedXfer {
    fn post(&self, done: Completion) {
        let c = &self.conn;
        if c.closed.load(Ordering::Acquire) {
            done.complete(Err(c.disconnected()));
            return;
        }
        if self.total <= GRANT_INLINE_MAX {
            let notif = self.notif.as_deref();
            GrantedXfer::run(
                c,
                self.dir,
                self.total,
                &self.runs,
                &self.grants,
                notif,
                done,
            );
            return;
        }
        // Big: on a thread of its own (which splits the copy further), not the caller's.
        let (conn, dir, total) = (Arc::clone(c), self.dir, self.total);
        let runs = Arc::clone(&self.runs);
        let (grants, notif) = (Arc::clone(&self.grants), self.notif.clone());
        let spawned = std::thread::Builder::new()
            .name("nixl-shm-copy".into())
            .spawn(move || {
                GrantedXfer::run(&conn, dir, total, &runs, &grants, notif.as_deref(), done);
            });
        if let Err(e) = spawned {
            // The closure (and the completion in it) is dropped: the post ends as failed.
            tracing::error!(error = %e, "shm: cannot start a copy thread");
        }
    }
}

/// A prepared transfer the target carries out (cross-memory attach).
#[derive(Debug)]
pub(super) struct CmaXfer {
    pub(super) conn: Arc<Conn>,
    /// The encoded Op frame; its id (bytes 5..13) is set per post.
    pub(super) frame: Vec<u8>,
    pub(super) timeout: Duration,
}

impl PreparedXfer for CmaXfer {
    fn post(&self, done: Completion) {
        let c = &self.conn;
        if c.closed.load(Ordering::Acquire) {
            done.complete(Err(c.disconnected()));
            return;
        }
        let id = c.next_id.fetch_add(1, Ordering::Relaxed);
        c.pending.lock().insert(
            id,
            Pending {
                done,
                deadline: Instant::now() + self.timeout,
                ended: false,
            },
        );
        // One write per post: the prepared frame with this post's id patched in.
        let mut frame = self.frame.clone();
        frame[5..13].copy_from_slice(&id.to_le_bytes());
        let r = c.writer.lock().write_all(&frame);
        if let Err(e) = r {
            c.mark_closed(&format!("send: {e}"));
            if let Some(p) = c.pending.lock().remove(&id) {
                p.done.complete(Err(c.disconnected()));
            }
        }
    }
}

/// A prepared transfer we copy ourselves through the peer's mapped buffer.
#[derive(Debug)]
pub(super) struct MappedXfer {
    pub(super) conn: Arc<Conn>,
    pub(super) plan: CopyPlan,
    pub(super) maps: Arc<[Arc<Mapping>]>,
    pub(super) notif: Option<Vec<u8>>,
}

pub(super) struct MapHold(Arc<[Arc<Mapping>]>, Option<Ticket>);

impl Drop for MapHold {
    fn drop(&mut self) {
        leave_all(&self.0, |m| &m.gate, self.1);
    }
}

pub(super) fn finish_mapped(conn: &Conn, notif: Option<&[u8]>, done: Completion) {
    let outcome = match notif {
        Some(msg) => conn.send(&Frame::Notif { msg: msg.to_vec() }),
        None if conn.closed.load(Ordering::Acquire) => Err(conn.disconnected()),
        None => Ok(()),
    };
    done.complete(outcome);
}

impl PreparedXfer for MappedXfer {
    fn post(&self, done: Completion) {
        let Ok(ticket) = enter_all(&self.maps, |m| &m.gate) else {
            done.complete(Err(self.conn.revoked()));
            return;
        };
        let hold = MapHold(Arc::clone(&self.maps), ticket);
        if self.plan.total() <= INLINE_MAX {
            // SAFETY: local ranges lie in our registered regions (held by the completion), the
            // remote ones inside the peer's buffer mapped here (bounds checked against the
            // peer's metadata at creation, and the mapping covers the whole buffer), held open
            // by `hold`.
            unsafe { self.plan.copy_range(0, self.plan.total(), false) };
            drop(hold);
            finish_mapped(&self.conn, self.notif.as_deref(), done);
            return;
        }
        let conn = Arc::clone(&self.conn);
        let notif = self.notif.clone();
        let finish = move |done: Completion| finish_mapped(&conn, notif.as_deref(), done);
        // SAFETY: as above; the mappings (`hold`) and the local regions (the completion) stay
        // held until every range is copied.
        unsafe { CopyPool::global().run_post(self.plan.clone(), done, hold, finish) };
    }
}
