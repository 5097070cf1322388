//! The prefill side of pull handoffs: offer a request's blocks, learn when they are free.

use super::*;

/// Opens the prefill side of pull handoffs on `agent` (which has loaded the decode peers'
/// metadata) and writes the handle to `*out`.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_new(
    agent: *mut nixl_agent,
    out: *mut *mut nixl_kv_prefill,
) -> nixl_status {
    open_side(agent, out, |agent| {
        Ok(PrefillInner {
            side: PrefillSide::new(agent),
            events: VecDeque::new(),
            reported: HashSet::new(),
        })
    })
}

/// Frees a prefill side. Handoffs still held are forgotten (their blocks are the engine's
/// again at once: free only when no decode reads them). NULL is a no-op.
///
/// # Safety
/// `p` is NULL or a handle from `nixl_kv_prefill_new` not yet freed; no other thread uses it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_free(p: *mut nixl_kv_prefill) {
    // SAFETY: the caller's contract (above) is `free_handle`'s.
    guard(|| unsafe {
        free_handle::<PrefillHandle>(p, |b| {
            b.agent.kv_sides.fetch_sub(1, Ordering::AcqRel);
        })
    });
}

/// Offers `nblocks` blocks of `request` to agent `decode` under a lease of `lease_ms`; writes
/// the handoff id to `*id`. The blocks stay held until `nixl_kv_prefill_poll` reports them
/// freed (`NIXL_KV_FREED`).
///
/// # Safety
/// `decode` and `request` are NUL-terminated; `blocks` has `nblocks` entries; `id` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_offer(
    p: *mut nixl_kv_prefill,
    decode: *const c_char,
    request: *const c_char,
    blocks: *const u32,
    nblocks: usize,
    lease_ms: u32,
    id: *mut u64,
) -> nixl_status {
    PrefillHandle::with(p, |h| {
        let (decode, request, blocks, lease) =
            handoff_args((decode, "decode"), request, (blocks, nblocks), lease_ms, id)?;
        let got = h
            .inner
            .lock()
            .side
            .offer(decode, request, blocks, lease)
            .map_err(kv_fail)?;
        write_out(id, got, "id")
    })
}

/// Aborts handoff `id`: decode is told; the blocks are reported freed once decode let go (or a
/// lease from now at the latest). An unknown id is `NIXL_ERR_NOT_FOUND`.
///
/// # Safety
/// `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_cancel(
    p: *mut nixl_kv_prefill,
    id: u64,
    reason: *const c_char,
) -> nixl_status {
    PrefillHandle::with(p, |h| {
        let reason = opt_str_arg(reason, "reason", "cancelled")?;
        let mut g = h.inner.lock();
        if !g.side.is_held(id) {
            return Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!("no handoff {id} held"),
            ));
        }
        g.side.cancel(id, reason);
        Ok(())
    })
}

/// Reads decode's messages and the clock, then hands out the oldest event (`NIXL_KV_FREED`:
/// the handoff's blocks, written to `blocks`, are the engine's to free): `NIXL_OK`, or
/// `NIXL_EMPTY` when there is none. With fewer than `ev->nblocks` places (`cap`) it returns
/// `NIXL_ERR_BUFFER_TOO_SMALL` and keeps the event.
///
/// # Safety
/// `ev` is writable; `blocks` has `cap` writable entries (NULL with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_poll(
    p: *mut nixl_kv_prefill,
    ev: *mut nixl_kv_event,
    blocks: *mut u32,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let h = handle_ref::<PrefillHandle>(p)?;
        let mut g = h.inner.lock();
        let notifs = take_kv_notifs(&h.agent);
        let (freed, other) = g.side.poll_notifs(notifs);
        give_back(&h.agent, other);
        for f in freed {
            g.events.push_back(freed_ev(f));
        }
        let g = &mut *g;
        let open: HashSet<(String, u64)> = g
            .side
            .reservations()
            .iter()
            .map(|r| (r.from.clone(), r.id))
            .collect();
        for r in g.side.reservations() {
            if g.reported.insert((r.from.clone(), r.id)) {
                g.events.push_back(Ev {
                    kind: NIXL_KV_RESERVED,
                    outcome: 0,
                    id: r.id,
                    lease_ms: u32::try_from(r.lease.as_millis()).unwrap_or(u32::MAX),
                    peer: r.from.clone(),
                    request: r.request.clone(),
                    reason: String::new(),
                    blocks: r.blocks.clone(),
                    push: true,
                });
            }
        }
        // Forget the ones pushed or aborted since.
        g.reported.retain(|k| open.contains(k));
        hand_event(&mut g.events, ev, blocks, cap)
    })
}

/// Writes how many handoffs still hold blocks to `*count`.
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_held(
    p: *mut nixl_kv_prefill,
    count: *mut usize,
) -> nixl_status {
    PrefillHandle::with(p, |h| {
        let n = h.inner.lock().side.held();
        write_out(count, n, "count")?;
        Ok(())
    })
}

/// How long a pull handoff that ended without decode's word (its lease and the grace after it
/// ran out, or a cancel decode did not answer) waits for this agent to serve decode nothing
/// any more before decode is fenced (its connections to this agent dropped, every READ on them
/// failed) and the blocks are freed, reported with `; decode fenced` in the reason. By default
/// the handoff's lease; `ms` 0 fences at once. Applies to handoffs that reach that point after
/// the call.
///
/// # Safety
/// `p` is NULL (`NIXL_ERR_INVALID`) or a live handle from `nixl_kv_prefill_new`.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_set_fence_after(
    p: *mut nixl_kv_prefill,
    ms: u32,
) -> nixl_status {
    PrefillHandle::with(p, |h| {
        h.inner
            .lock()
            .side
            .set_fence_after(Duration::from_millis(u64::from(ms)));
        Ok(())
    })
}
