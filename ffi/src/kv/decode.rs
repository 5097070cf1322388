//! The decode side of pull handoffs: learn of offers, pull, renew or cancel, learn when every
//! byte landed.

use super::*;

/// Opens the decode side of pull handoffs on `agent`, whose KV cache is `*layout` (registered
/// with the agent), and writes the handle to `*out`.
///
/// # Safety
/// `layout` is readable; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_new(
    agent: *mut nixl_agent,
    layout: *const nixl_kv_layout,
    out: *mut *mut nixl_kv_decode,
) -> nixl_status {
    open_side(agent, out, |agent| {
        let l = layout_arg(layout, "layout")?;
        Ok(DecodeInner {
            side: DecodeSide::new(agent, l).map_err(kv_fail)?,
            events: VecDeque::new(),
            offers: HashMap::new(),
        })
    })
}

/// Frees a decode side; READs still running are cancelled and let go first. NULL is a no-op.
///
/// # Safety
/// `d` is NULL or a handle from `nixl_kv_decode_new` not yet freed; no other thread uses it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_free(d: *mut nixl_kv_decode) {
    // SAFETY: the caller's contract (above) is `free_handle`'s.
    guard(|| unsafe {
        free_handle::<DecodeHandle>(d, |b| {
            b.inner
                .get_mut()
                .side
                .cancel_all("the decode side was closed");
            b.agent.kv_sides.fetch_sub(1, Ordering::AcqRel);
        })
    });
}

/// Accepts offers from the prefill group whose rank 0 is agent `peer`: `n` layouts in rank
/// order and the agent name of each rank. Layouts that cannot hand KV to this rank are
/// `NIXL_ERR_INVALID` with the reason.
///
/// # Safety
/// `peer` is NUL-terminated; `layouts` and `agents` have `n` entries, each agent name
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_add_prefill(
    d: *mut nixl_kv_decode,
    peer: *const c_char,
    layouts: *const nixl_kv_layout,
    agents: *const *const c_char,
    n: usize,
) -> nixl_status {
    DecodeHandle::with(d, |h| {
        let peer = str_arg(peer, "peer")?;
        let ls = layouts_arg(layouts, n, "layouts")?;
        let names = array_arg(agents, n, ls.len(), "agents")?
            .iter()
            .enumerate()
            .map(|(i, &a)| str_arg(a, &format!("agents[{i}]")).map(str::to_owned))
            .collect::<Res<Vec<String>>>()?;
        h.inner
            .lock()
            .side
            .add_prefill(peer, ls, names)
            .map_err(kv_fail)?;
        Ok(())
    })
}

/// Reads prefill's messages and the pulls' states, then hands out the oldest event:
/// `NIXL_KV_OFFERED` (pull it with `nixl_kv_pull`, or decline with `nixl_kv_decode_cancel`;
/// `blocks`: prefill's blocks) or `NIXL_KV_ENDED` (`blocks`: the decode blocks; with
/// `NIXL_KV_DONE` every byte landed, otherwise nothing writes them any more). `NIXL_EMPTY` when
/// there is none; `NIXL_ERR_BUFFER_TOO_SMALL` (event kept, `ev->nblocks` the count) when `cap`
/// is too small.
///
/// # Safety
/// `ev` is writable; `blocks` has `cap` writable entries (NULL with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_poll(
    d: *mut nixl_kv_decode,
    ev: *mut nixl_kv_event,
    blocks: *mut u32,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let h = handle_ref::<DecodeHandle>(d)?;
        let mut g = h.inner.lock();
        let notifs = take_kv_notifs(&h.agent);
        let (evs, other) = g.side.poll_notifs(notifs);
        give_back(&h.agent, other);
        for e in evs {
            queue_event(&mut g, e);
        }
        hand_event(&mut g.events, ev, blocks, cap)
    })
}

/// Queues what the side reported for the next poll to hand out; an offer is kept (by sender
/// and id) for `nixl_kv_pull`.
fn queue_event(g: &mut DecodeInner, e: DecodeEvent) {
    let ev = match e {
        DecodeEvent::Offered(o) => {
            let ev = Ev {
                kind: NIXL_KV_OFFERED,
                outcome: 0,
                id: o.id,
                lease_ms: u32::try_from(o.lease.as_millis()).unwrap_or(u32::MAX),
                peer: o.from.clone(),
                request: o.request.clone(),
                reason: String::new(),
                blocks: o.blocks.clone(),
                push: false,
            };
            g.offers.insert((o.from.clone(), o.id), o);
            ev
        }
        DecodeEvent::Ended {
            from,
            id,
            request,
            blocks,
            outcome,
            push,
        } => {
            let (outcome, reason) = outcome_parts(&outcome);
            Ev {
                kind: NIXL_KV_ENDED,
                outcome,
                id,
                lease_ms: 0,
                peer: from,
                request,
                reason,
                blocks,
                push,
            }
        }
    };
    g.events.push_back(ev);
}

/// READs offer `id` of prefill agent `from` (reported by `nixl_kv_decode_poll`) into the
/// `n` decode blocks `dst` (as many as the offer's), with a deadline inside its lease;
/// `nixl_kv_decode_poll` reports `NIXL_KV_ENDED` when it is over. An offer not reported, or
/// already pulled, is `NIXL_ERR_NOT_FOUND`.
///
/// # Safety
/// `from` is NUL-terminated; `dst` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_pull(
    d: *mut nixl_kv_decode,
    from: *const c_char,
    id: u64,
    dst: *const u32,
    n: usize,
) -> nixl_status {
    DecodeHandle::with(d, |h| {
        let from = str_arg(from, "from")?;
        let dst = array_arg(dst, n, NIXL_KV_MAX_BLOCKS, "dst")?;
        let mut g = h.inner.lock();
        let Some(offer) = g.offers.remove(&(from.to_owned(), id)) else {
            return Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!("no open offer {id} from '{from}'"),
            ));
        };
        g.side.pull(&offer, dst).map_err(kv_fail)?;
        Ok(())
    })
}

/// Asks prefill agent `from` to extend the lease of handoff `id` by its length from now.
///
/// # Safety
/// `from` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_renew(
    d: *mut nixl_kv_decode,
    from: *const c_char,
    id: u64,
) -> nixl_status {
    DecodeHandle::with(d, |h| {
        let from = str_arg(from, "from")?;
        h.inner.lock().side.renew(from, id).map_err(kv_fail)?;
        Ok(())
    })
}

/// Aborts pull `id` of `from` (or declines its offer): the READ is cancelled and let go, then
/// prefill is told; a pull that was running is reported `NIXL_KV_ENDED` (cancelled) by the next
/// poll.
///
/// # Safety
/// `from` is NUL-terminated; `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_cancel(
    d: *mut nixl_kv_decode,
    from: *const c_char,
    id: u64,
    reason: *const c_char,
) -> nixl_status {
    DecodeHandle::with(d, |h| {
        let from = str_arg(from, "from")?;
        let reason = opt_str_arg(reason, "reason", "cancelled")?;
        let mut g = h.inner.lock();
        g.offers.remove(&(from.to_owned(), id));
        if let Some(e) = g.side.cancel(from, id, reason) {
            queue_event(&mut g, e);
        }
        Ok(())
    })
}
