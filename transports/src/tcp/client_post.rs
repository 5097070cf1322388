//! One execution of a plan on a session, and how it ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use nixl_core::{BackendName, Completion, Error, Result, XferOp};
use parking_lot::{Condvar, Mutex};

use super::client_plan::Plan;

pub(super) struct Waiter {
    pub(super) result: Mutex<Option<Result<()>>>,
    pub(super) cv: Condvar,
}

pub(super) enum Done {
    Xfer(Completion),
    Wait(Arc<Waiter>),
}

/// One execution of a plan (or a standalone notification) on a session.
///
/// A post ends when its last holder lets go of it ([`Drop`]): the session's tables, the job
/// queues, the record of what a lane has sent, and the lane threads that read into or write from
/// its memory all hold it. So whatever the peer answers, and whenever the session fails, the
/// post's completion (which releases its memory to the caller) comes after every thread that
/// touches that memory is done with it.
pub(super) struct Post {
    pub(super) id: u64,
    pub(super) plan: Option<Arc<Plan>>,
    msg: Option<Vec<u8>>,
    pub(super) left: AtomicUsize,
    pub(super) in_notif: AtomicBool,
    pub(super) error: Mutex<Option<Error>>,
    done: Mutex<Option<Done>>,
    /// Lane threads inside the post's local memory now (reading DATA into it, writing it out).
    users: AtomicUsize,
    /// The post was abandoned and its completion let go before every answer came (see
    /// [`Post::let_go_if_abandoned`]).
    let_go: AtomicBool,
}

impl Post {
    pub(super) fn new(
        id: u64,
        plan: Option<Arc<Plan>>,
        msg: Option<Vec<u8>>,
        left: usize,
        done: Option<Done>,
    ) -> Post {
        Post {
            id,
            in_notif: AtomicBool::new(plan.is_none()),
            plan,
            msg,
            left: AtomicUsize::new(left),
            error: Mutex::new(None),
            done: Mutex::new(done),
            users: AtomicUsize::new(0),
            let_go: AtomicBool::new(false),
        }
    }

    pub(super) fn abandoned(&self) -> bool {
        self.let_go.load(Ordering::Acquire)
            || matches!(&*self.done.lock(), Some(Done::Xfer(c)) if c.is_abandoned())
    }

    /// Enters the post's local memory: false once the post was abandoned (cancelled, past its
    /// deadline), when its memory must not be touched any more.
    pub(super) fn enter_mem(&self) -> bool {
        let d = self.done.lock();
        match &*d {
            Some(Done::Xfer(c)) if !c.is_abandoned() => {
                self.users.fetch_add(1, Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    /// Leaves the post's local memory (after [`Post::enter_mem`]).
    pub(super) fn leave_mem(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.let_go_if_abandoned();
        }
    }

    /// An abandoned post lets go of its memory (its completion: the core's holds on the local
    /// regions) as soon as no lane thread is inside that memory, without waiting for the
    /// peer's remaining answers: their DATA is read and thrown away as it comes. So a READ
    /// that ran past its deadline lets go in about one socket read, however much of it the
    /// target had already queued.
    ///
    /// Only READs let go early: a WRITE's chunks already sent still land in the peer's memory,
    /// so an abandoned WRITE keeps its completion until every sent chunk is answered (chunks
    /// not yet sent are skipped): freeing or deregistering it returns only once it can no
    /// longer change the peer's memory.
    pub(super) fn let_go_if_abandoned(&self) {
        let read = self.plan.as_ref().is_some_and(|p| p.op == XferOp::Read);
        let taken = {
            let mut d = self.done.lock();
            match &*d {
                Some(Done::Xfer(c))
                    if read && c.is_abandoned() && self.users.load(Ordering::Acquire) == 0 =>
                {
                    self.let_go.store(true, Ordering::Release);
                    d.take()
                }
                _ => None,
            }
        };
        if let Some(Done::Xfer(c)) = taken {
            // The post already ended (cancelled or timed out): this only lets go.
            c.complete(Err(Error::Cancelled));
        }
    }

    pub(super) fn notif_msg(&self) -> Option<&[u8]> {
        self.msg
            .as_deref()
            .or_else(|| self.plan.as_ref().and_then(|p| p.notif.as_deref()))
    }

    /// Records a failure (the first one wins); the post ends with it when it is let go.
    pub(super) fn fail(&self, e: Error) {
        self.error.lock().get_or_insert(e);
    }
}

impl Drop for Post {
    fn drop(&mut self) {
        let outcome = match self.error.get_mut().take() {
            Some(e) => Err(e),
            None if *self.left.get_mut() == 0 => Ok(()),
            None => Err(Error::Backend {
                backend: BackendName::Tcp,
                op: "transfer",
                reason: "the request ended before every chunk was answered".into(),
            }),
        };
        match self.done.get_mut().take() {
            Some(Done::Xfer(c)) => {
                c.complete(outcome);
            }
            Some(Done::Wait(w)) => {
                *w.result.lock() = Some(outcome);
                w.cv.notify_all();
            }
            None => {
                // A posted notification nobody waits for, or a post let go early.
                if let (Err(e), false) = (outcome, self.let_go.load(Ordering::Acquire)) {
                    tracing::warn!(error = %e, "tcp: a posted notification was not delivered");
                }
            }
        }
    }
}
