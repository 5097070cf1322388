//! Transfer requests: create, post, poll, wait, cancel, inspect and free.

use super::*;

/// A backend name from C: unknown is NOT_FOUND (the core decides about known ones).
pub(crate) fn backend_arg(name: &str) -> Res<BackendName> {
    BackendName::parse(name).ok_or_else(|| {
        let known: Vec<&str> = BackendName::ALL.iter().map(|b| b.as_str()).collect();
        Fail::new(
            NIXL_ERR_NOT_FOUND,
            format!("unknown backend '{name}' (known: {})", known.join(", ")),
        )
    })
}

/// Creates a transfer request of `op` (`NIXL_READ`: remote to local, `NIXL_WRITE`: local to
/// remote) between `local` and `remote` descriptors (same count, same lengths pairwise) of the
/// peer `remote_name` (the agent's own name for storage and local copies). Every descriptor is
/// checked here against the registrations of both sides. `notif` (NULL for none) is delivered
/// to the peer after the data of each post has landed. `backend` NULL lets the policy choose;
/// a name forces that backend (`NIXL_ERR_NOT_FOUND` if unknown, `NIXL_ERR_UNAVAILABLE` if it
/// cannot run). Free the request with `nixl_xfer_free`.
///
/// # Safety
/// `local` and `remote` point to their counts of descriptors; `remote_name` and `backend` are
/// NUL-terminated strings (`backend` may be NULL); `notif` points to `notif_len` bytes or is
/// NULL; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_create(
    agent: *mut nixl_agent,
    op: i32,
    local_kind: i32,
    local: *const nixl_desc,
    local_count: usize,
    remote_kind: i32,
    remote: *const nixl_desc,
    remote_count: usize,
    remote_name: *const c_char,
    notif: *const u8,
    notif_len: usize,
    backend: *const c_char,
    out: *mut *mut nixl_xfer,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        if out.is_null() {
            return Err(Fail::invalid("out is NULL"));
        }
        let op = match op {
            NIXL_READ => XferOp::Read,
            NIXL_WRITE => XferOp::Write,
            o => {
                return Err(Fail::invalid(format!(
                    "op {o} is not NIXL_READ or NIXL_WRITE"
                )))
            }
        };
        let local = descs_arg(local_kind, local, local_count, "local")?;
        let remote = descs_arg(remote_kind, remote, remote_count, "remote")?;
        let peer = str_arg(remote_name, "remote_name")?;
        let notif = if notif.is_null() {
            if notif_len > 0 {
                return Err(Fail::invalid(format!(
                    "notif is NULL with length {notif_len}"
                )));
            }
            None
        } else {
            Some(bytes_arg(notif, notif_len, "notif")?.to_vec())
        };
        let backend = if backend.is_null() {
            None
        } else {
            Some(backend_arg(str_arg(backend, "backend")?)?)
        };
        let opts = XferOptions {
            notif,
            backend,
            deadline: None,
        };
        let req = a
            .shared
            .agent
            .create_xfer(op, &local, &remote, peer, opts)?;
        let x = XferHandle {
            magic: XFER_MAGIC,
            req,
            _agent: Arc::clone(&a.shared),
        };
        publish(out, x)?;
        Ok(())
    })
}

pub(crate) fn status_code(st: XferStatus) -> Res<nixl_status> {
    match st {
        XferStatus::Idle => Err(Fail::invalid("the request was never posted")),
        XferStatus::InProgress => Ok(NIXL_IN_PROGRESS),
        XferStatus::Done => Ok(NIXL_OK),
        XferStatus::Failed(e) => Err(e.into()),
        XferStatus::Cancelled => Err(Fail::new(NIXL_ERR_CANCELLED, "the transfer was cancelled")),
        XferStatus::TimedOut => Err(Fail::new(NIXL_ERR_TIMEOUT, "the transfer timed out")),
    }
}

/// Starts one execution of the request: `NIXL_OK` if it completed inline, `NIXL_IN_PROGRESS`
/// if not (poll `nixl_xfer_status` or block in `nixl_xfer_wait`), or the error. Posting a
/// request still in flight is `NIXL_ERR_INVALID`; a request that ended may be posted again.
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_post(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| {
        let x = xfer_ref(xfer)?;
        x.req.post()?;
        status_code(x.req.status())
    })
}

/// Where the request's last post stands: `NIXL_IN_PROGRESS`, `NIXL_OK`, or its terminal
/// error (`NIXL_ERR_INVALID` if it was never posted).
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_status(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| status_code(xfer_ref(xfer)?.req.status()))
}

/// Blocks until the post in flight ends or `timeout_ms` passes (< 0: no limit), then returns
/// what `nixl_xfer_status` would (`NIXL_IN_PROGRESS` if the time ran out first).
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_wait(xfer: *mut nixl_xfer, timeout_ms: i64) -> nixl_status {
    guard(|| {
        let x = xfer_ref(xfer)?;
        status_code(x.req.wait_blocking(timeout_arg(timeout_ms)))
    })
}

/// Cancels the post in flight: it ends `NIXL_ERR_CANCELLED` unless it had already ended.
/// Returns at once; `nixl_xfer_free` is what waits until no backend touches the memory.
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_cancel(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| {
        xfer_ref(xfer)?.req.cancel();
        Ok(NIXL_OK)
    })
}

/// Writes the name of the backend that carries the request ("shm", "tcp", ...) to `out`.
///
/// # Safety
/// `xfer` is NULL or a live request; `out` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_backend(
    xfer: *const nixl_xfer,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    name_out(xfer, out, cap, |r| r.backend().as_str())
}

/// Writes the name of the backend whose stager copies the request's device memory through
/// host memory ("cuda") to `out`, or an empty string when the request moves its memory directly.
/// A staged request is slower than a direct one: engines that must not fall back silently check
/// this after `nixl_xfer_create`.
///
/// # Safety
/// `xfer` is NULL or a live request; `out` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_staged(
    xfer: *const nixl_xfer,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    name_out(xfer, out, cap, |r| {
        r.info().staged.map_or("", |b| b.as_str())
    })
}

/// Writes the name `name_of` gives of the request behind `xfer` to `out` (`cap` bytes).
fn name_out(
    xfer: *const nixl_xfer,
    out: *mut c_char,
    cap: usize,
    name_of: impl FnOnce(&XferRequest) -> &'static str,
) -> nixl_status {
    XferHandle::with(xfer, |x| str_out(out, cap, name_of(&x.req), "out"))
}

/// Frees a request. A post still in flight is cancelled, and the call returns only when no
/// backend will touch the request's memory again (a backend that cannot stop at once lets go
/// within its own timeouts). NULL is a no-op.
///
/// # Safety
/// `xfer` is NULL or a live request that no other thread uses during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_free(xfer: *mut nixl_xfer) -> nixl_status {
    // SAFETY: the caller's contract (above) is `free_handle`'s.
    guard(|| unsafe { free_handle::<XferHandle>(xfer, |x| x.req.release()) })
}
