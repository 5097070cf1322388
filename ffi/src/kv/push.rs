//! Push handoffs: decode reserves blocks and asks prefill to WRITE into them.

use super::*;

/// Push: accepts reservations from decode agent `decode`, whose KV cache is `*decode_layout`;
/// this worker is rank `rank` of the prefill group whose layouts are `group` (`n`, rank
/// order). Layouts that cannot hand KV over are `NIXL_ERR_INVALID` with the reason.
///
/// # Safety
/// `decode` is NUL-terminated; `decode_layout` is readable; `group` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_add_decode(
    p: *mut nixl_kv_prefill,
    decode: *const c_char,
    decode_layout: *const nixl_kv_layout,
    group: *const nixl_kv_layout,
    n: usize,
    rank: u32,
) -> nixl_status {
    PrefillHandle::with(p, |h| {
        let decode = str_arg(decode, "decode")?;
        let dl = layout_arg(decode_layout, "decode_layout")?;
        let group = layouts_arg(group, n, "group")?;
        h.inner
            .lock()
            .side
            .add_decode(decode, dl, group, rank)
            .map_err(kv_fail)?;
        Ok(())
    })
}

/// Push: WRITEs this rank's share of prefill blocks `src` (`n`, as many as reserved) into the
/// blocks of reservation `id` of decode agent `decode` (reported by `nixl_kv_prefill_poll` as
/// `NIXL_KV_RESERVED`), with a deadline inside its lease; decode learns of it after the data.
/// `nixl_kv_prefill_poll` reports `src` free (`NIXL_KV_FREED`, `push` set) once the WRITE
/// ended. A reservation not reported, or already pushed, is `NIXL_ERR_NOT_FOUND`; a failed
/// start is reported to decode, which ends the handoff.
///
/// # Safety
/// `decode` is NUL-terminated; `src` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_push(
    p: *mut nixl_kv_prefill,
    decode: *const c_char,
    id: u64,
    src: *const u32,
    n: usize,
) -> nixl_status {
    guard(|| {
        let h = handle_ref::<PrefillHandle>(p)?;
        let decode = str_arg(decode, "decode")?;
        let src = array_arg(src, n, NIXL_KV_MAX_BLOCKS, "src")?;
        let mut g = h.inner.lock();
        let g = &mut *g;
        if !g.reported.remove(&(decode.to_owned(), id)) {
            return Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!(
                    "no open reservation {id} from '{decode}' (not reported, pushed or aborted)"
                ),
            ));
        }
        match g.side.push_reserved(decode, id, src) {
            None => Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!("reservation {id} from '{decode}' was aborted"),
            )),
            Some(r) => {
                r.map_err(kv_fail)?;
                Ok(NIXL_OK)
            }
        }
    })
}

/// Push: reserves the `n` decode blocks `blocks` for `request` and asks the prefill group of
/// `prefill` (added with `nixl_kv_decode_add_prefill`) to WRITE into them within `lease_ms`;
/// writes the reservation id to `*id`. `nixl_kv_decode_poll` reports `NIXL_KV_ENDED` (`push`
/// set) once every writing rank's data landed, or why not; the blocks are never reported
/// while a WRITE may still land in them.
///
/// # Safety
/// `prefill` and `request` are NUL-terminated; `blocks` has `n` entries; `id` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_reserve(
    d: *mut nixl_kv_decode,
    prefill: *const c_char,
    request: *const c_char,
    blocks: *const u32,
    n: usize,
    lease_ms: u32,
    id: *mut u64,
) -> nixl_status {
    DecodeHandle::with(d, |h| {
        let (prefill, request, blocks, lease) =
            handoff_args((prefill, "prefill"), request, (blocks, n), lease_ms, id)?;
        let got = h
            .inner
            .lock()
            .side
            .reserve(prefill, request, blocks, lease)
            .map_err(kv_fail)?;
        write_out(id, got, "id")
    })
}

/// Push: aborts reservation `id`: the writers are told; `nixl_kv_decode_poll` reports it ended
/// (cancelled) once they let go, or a lease from now at the latest.
///
/// # Safety
/// `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_cancel_reservation(
    d: *mut nixl_kv_decode,
    id: u64,
    reason: *const c_char,
) -> nixl_status {
    DecodeHandle::with(d, |h| {
        let reason = opt_str_arg(reason, "reason", "cancelled")?;
        h.inner.lock().side.cancel_reservation(id, reason);
        Ok(())
    })
}
