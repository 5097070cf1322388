//! The handles handed to C: which are live, and the checked way from a pointer to its handle.

use super::*;

/// The handles this library has handed out and not freed yet: address -> type tag. Checked
/// before any handle is dereferenced, so a freed or foreign pointer is an error, never a read.
pub(crate) static LIVE: std::sync::LazyLock<parking_lot::RwLock<HashMap<usize, u64>>> =
    std::sync::LazyLock::new(Default::default);

pub(crate) fn not_live(what: &str, magic: u64) -> Fail {
    Fail::invalid(format!(
        "{what} is not a live {} (freed, or another object)",
        match magic {
            AGENT_MAGIC => "nixl_agent",
            weights::WEIGHTS_MAGIC => "nixl_weights",
            kv::PREFILL_MAGIC => "nixl_kv_prefill",
            kv::DECODE_MAGIC => "nixl_kv_decode",
            _ => "nixl_xfer",
        }
    ))
}

/// Records a handle just handed to C as live.
pub(crate) fn hand_out<T>(p: *mut T, magic: u64) {
    LIVE.write().insert(p as usize, magic);
}

/// Takes a handle out of the live set for freeing: `Err` unless it is a live handle of this
/// type, so that of two frees of one handle only the first gets to free it.
pub(crate) fn take_back(p: *const (), what: &str, magic: u64) -> Res<()> {
    let mut live = LIVE.write();
    if live.get(&(p as usize)) != Some(&magic) {
        return Err(not_live(what, magic));
    }
    live.remove(&(p as usize));
    Ok(())
}

/// A reference to a handle, once [`LIVE`] says it is a live handle of this type.
pub(crate) fn tagged<'a, T>(p: *const (), what: &str, magic: u64) -> Res<&'a T> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if LIVE.read().get(&(p as usize)) != Some(&magic) {
        return Err(not_live(what, magic));
    }
    // SAFETY: a live handle of type T, made by Box::into_raw and not freed (freeing takes it
    // out of LIVE first); the caller does not free it during the call (the API's contract).
    Ok(unsafe { &*p.cast::<T>() })
}

pub(crate) fn agent_ref<'a>(p: *const nixl_agent) -> Res<&'a AgentHandle> {
    let h: &AgentHandle = tagged(p.cast(), "agent", AGENT_MAGIC)?;
    debug_assert_eq!(h.magic, AGENT_MAGIC);
    Ok(h)
}

pub(crate) fn xfer_ref<'a>(p: *const nixl_xfer) -> Res<&'a XferHandle> {
    let h: &XferHandle = tagged(p.cast(), "xfer", XFER_MAGIC)?;
    debug_assert_eq!(h.magic, XFER_MAGIC);
    Ok(h)
}
