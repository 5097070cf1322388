//! Notifications: send one, and take or wait for the next (leaving KV messages to KV sides).

use super::*;

/// Sends `len` bytes to the peer as a standalone notification, over the best backend that
/// carries notifications to it.
///
/// # Safety
/// `remote_name` is a NUL-terminated string; `msg` points to `len` bytes (NULL if `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_notif_send(
    agent: *mut nixl_agent,
    remote_name: *const c_char,
    msg: *const u8,
    len: usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let peer = str_arg(remote_name, "remote_name")?;
        let msg = bytes_arg(msg, len, "msg")?;
        a.shared.agent.send_notif(peer, msg)?;
        Ok(())
    })
}

/// Takes the oldest notification received: writes the sender's name (NUL-terminated) to
/// `from`, the message to `msg` and its length to `*msg_len`, and returns `NIXL_OK`; or
/// returns `NIXL_EMPTY` when there is none. When `from` or `msg` is too small it returns
/// `NIXL_ERR_BUFFER_TOO_SMALL`, sets `*msg_len` to the message's length, and keeps the
/// message. `msg` may be NULL when `msg_cap` is 0 (to learn the length).
///
/// # Safety
/// `from` points to `from_cap` writable bytes, `msg` to `msg_cap`, `msg_len` to a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn nixl_notif_next(
    agent: *mut nixl_agent,
    from: *mut c_char,
    from_cap: usize,
    msg: *mut u8,
    msg_cap: usize,
    msg_len: *mut usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        if msg_len.is_null() || !msg_len.is_aligned() {
            return Err(Fail::invalid("msg_len is NULL or misaligned"));
        }
        if msg.is_null() && msg_cap > 0 {
            return Err(Fail::invalid(format!(
                "msg is NULL with capacity {msg_cap}"
            )));
        }
        if from.is_null() {
            return Err(Fail::invalid("from is NULL"));
        }
        let mut q = a.shared.notifs.lock();
        if q.is_empty() {
            let got = a.shared.agent.take_notifs();
            q.extend(not_kv(&a.shared, got));
        }
        let Some(n) = q.front() else {
            return Ok(NIXL_EMPTY);
        };
        let need = n.msg.len();
        let too_small = if n.from.len() + 1 > from_cap {
            Some(format!(
                "from: {} bytes needed for the sender's name, capacity is {from_cap}",
                n.from.len() + 1
            ))
        } else if need > msg_cap {
            Some(format!("msg: {need} bytes needed, capacity is {msg_cap}"))
        } else {
            None
        };
        if let Some(why) = too_small {
            // SAFETY: checked non-NULL and aligned above; the caller passes a writable size_t.
            unsafe { msg_len.write(need) };
            return Err(Fail::new(NIXL_ERR_BUFFER_TOO_SMALL, why));
        }
        let Some(n) = q.pop_front() else {
            return Ok(NIXL_EMPTY);
        };
        drop(q);
        put_str(from, &n.from);
        if need > 0 {
            // SAFETY: `msg` is non-NULL (need > 0 and need <= msg_cap, and NULL only goes with
            // a capacity of 0) with room for `msg_cap >= need` bytes.
            unsafe { std::ptr::copy_nonoverlapping(n.msg.as_ptr(), msg, need) };
        }
        // SAFETY: checked non-NULL and aligned above.
        unsafe { msg_len.write(need) };
        Ok(NIXL_OK)
    })
}

/// The notifications of `got` that are not KV messages; while a KV side is open on the agent,
/// its messages are set aside in `kv_pending` for it (it reads them at its next poll).
pub(crate) fn not_kv(s: &Shared, got: Vec<Notification>) -> Vec<Notification> {
    if got.is_empty() || s.kv_sides.load(std::sync::atomic::Ordering::Acquire) == 0 {
        return got;
    }
    let (kv, other): (Vec<_>, Vec<_>) = got
        .into_iter()
        .partition(|n| n.msg.starts_with(nixl_kv::handoff::MAGIC));
    if !kv.is_empty() {
        s.kv_pending.lock().extend(kv);
    }
    other
}

/// Waits up to `timeout_ms` (< 0: no limit) for a notification: `NIXL_OK` when one is ready
/// for `nixl_notif_next`, `NIXL_EMPTY` when the time ran out. While a KV side is open on the
/// agent, its messages do not count (`nixl_notif_next` would not hand them out).
///
/// # Safety
/// `agent` is NULL or a live agent.
#[no_mangle]
pub unsafe extern "C" fn nixl_notif_wait(agent: *mut nixl_agent, timeout_ms: i64) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let start = Instant::now();
        let limit = timeout_arg(timeout_ms);
        loop {
            {
                let mut q = a.shared.notifs.lock();
                if q.is_empty() {
                    let got = a.shared.agent.take_notifs();
                    q.extend(not_kv(&a.shared, got));
                }
                if !q.is_empty() {
                    return Ok(NIXL_OK);
                }
            }
            let left = match limit {
                Some(l) => l.saturating_sub(start.elapsed()),
                None => Duration::from_secs(1),
            };
            if left.is_zero() {
                return Ok(NIXL_EMPTY);
            }
            // Taken without the queue's lock, so nixl_notif_next is not held up meanwhile.
            let got = a.shared.agent.wait_notifs(left.min(Duration::from_secs(1)));
            // Ready only for what nixl_notif_next will hand out: not a KV side's message.
            let got = not_kv(&a.shared, got);
            if !got.is_empty() {
                a.shared.notifs.lock().extend(got);
                return Ok(NIXL_OK);
            }
        }
    })
}
