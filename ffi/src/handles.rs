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

/// A Rust value handed to C as an opaque `*mut Self::C`: made by [`publish`], reached by
/// [`handle_ref`], freed by [`free_handle`], each of them checked against [`LIVE`].
pub(crate) trait Handle: Sized {
    /// The opaque C type of the pointer.
    type C;
    /// Its tag in [`LIVE`] (and in its `magic` field while it is live).
    const MAGIC: u64;
    /// What errors call it ("agent", "xfer", ...).
    const WHAT: &'static str;
    /// Its `magic` field, set to [`DEAD_MAGIC`] when it is freed.
    fn magic(&mut self) -> &mut u64;

    /// The body of an export that acts on the live handle `p` ([`handle_ref`]), run in
    /// [`guard`]: `NIXL_OK` once `f` succeeds.
    fn with(p: *const Self::C, f: impl FnOnce(&Self) -> Res<()>) -> nixl_status {
        guard(|| {
            f(handle_ref(p)?)?;
            Ok(NIXL_OK)
        })
    }
}

/// Ends a `_new` export: boxes `handle`, writes the pointer to `*out`, and records it live.
pub(crate) fn publish<H: Handle>(out: *mut *mut H::C, handle: H) -> Res<()> {
    let p = Box::into_raw(Box::new(handle));
    if let Err(e) = write_out(out, p.cast::<H::C>(), "out") {
        // SAFETY: `p` is the box made just above, handed to no one.
        drop(unsafe { Box::from_raw(p) });
        return Err(e);
    }
    hand_out(p, H::MAGIC);
    Ok(())
}

/// A reference to the handle behind `p`, once [`LIVE`] says it is a live `H`.
pub(crate) fn handle_ref<'a, H: Handle>(p: *const H::C) -> Res<&'a H> {
    tagged(p.cast(), H::WHAT, H::MAGIC)
}

/// The body of a `_free` export: NULL is a no-op; otherwise the handle leaves [`LIVE`] (so of
/// two frees of one handle only the first frees it), `before_drop` runs on it, and it is
/// dropped.
///
/// # Safety
/// No other thread uses the handle during or after this call (the API's contract).
pub(crate) unsafe fn free_handle<H: Handle>(
    p: *mut H::C,
    before_drop: impl FnOnce(&mut H),
) -> Res<nixl_status> {
    if p.is_null() {
        return Ok(NIXL_OK);
    }
    take_back(p.cast(), H::WHAT, H::MAGIC)?;
    // SAFETY: a live handle made by `Box::into_raw` in `publish`, given up by the caller, and
    // now out of LIVE, so no later call (a second free included) touches it.
    let mut b = unsafe { Box::from_raw(p.cast::<H>()) };
    *b.magic() = DEAD_MAGIC;
    before_drop(&mut b);
    drop(b);
    Ok(NIXL_OK)
}

/// Implements [`Handle`] for a handle struct whose first field is `magic: u64`.
macro_rules! handle {
    ($t:ty, $c:ty, $magic:expr, $what:literal) => {
        impl $crate::handles::Handle for $t {
            type C = $c;
            const MAGIC: u64 = $magic;
            const WHAT: &'static str = $what;
            fn magic(&mut self) -> &mut u64 {
                &mut self.magic
            }
        }
    };
}
pub(crate) use handle;

handle!(AgentHandle, nixl_agent, AGENT_MAGIC, "agent");
handle!(XferHandle, nixl_xfer, XFER_MAGIC, "xfer");

pub(crate) fn agent_ref<'a>(p: *const nixl_agent) -> Res<&'a AgentHandle> {
    handle_ref(p)
}

pub(crate) fn xfer_ref<'a>(p: *const nixl_xfer) -> Res<&'a XferHandle> {
    handle_ref(p)
}
