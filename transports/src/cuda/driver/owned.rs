//! [`Owned`]: one driver object made in a device's context and released in it, once, on drop.
//! Every wrapper of this layer ([`Stream`], [`Event`], [`PinnedHost`], [`LegacyImport`],
//! [`VmmImport`], [`VmmAlloc`], [`DeviceAlloc`], [`Gather`]) is an `Owned` of its [`Kind`] and
//! the methods of what it is.

use super::*;

/// A kind of driver object an [`Owned`] holds: its raw value, its name in the logs, and the
/// calls that release it.
///
/// # Safety
/// Any thread may use and release a `Raw` of this kind (the driver API is thread-safe; host
/// memory is owned like a `Box`), and shared access through `&Owned` only reads it:
/// implementing the trait makes `Owned<Self>` `Send` and `Sync`.
pub(super) unsafe trait Kind {
    /// The handle (or handles) the driver gave.
    type Raw: fmt::Debug;
    /// What it is, for the log line of a failed release or a leak.
    const WHAT: &'static str;

    /// Releases `raw`, each failing call logged through `rel`, never raised.
    ///
    /// # Safety
    /// `raw` was made in `rel`'s context (current now), and nothing uses it any more.
    unsafe fn release(rel: &Releaser<'_>, raw: &Self::Raw);
}

/// A driver object of kind `K` made in `ctx`: the context outlives it (the `Arc`), and dropping
/// it makes the context current and releases the object ([`DeviceCtx::releaser`]: a failure is
/// logged, never a panic; a context that cannot be made current leaks it, logged).
pub(super) struct Owned<K: Kind> {
    pub(super) ctx: Arc<DeviceCtx>,
    pub(super) raw: K::Raw,
}

// SAFETY: per `Kind`'s contract; the `Arc<DeviceCtx>` is Send and Sync.
unsafe impl<K: Kind> Send for Owned<K> {}
// SAFETY: as above.
unsafe impl<K: Kind> Sync for Owned<K> {}

impl<K: Kind> fmt::Debug for Owned<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(K::WHAT)
            .field("device", &self.ctx.ordinal)
            .field("raw", &self.raw)
            .finish()
    }
}

impl<K: Kind> Owned<K> {
    /// Takes `raw` as made in `ctx`.
    ///
    /// # Safety
    /// `raw` is a live object of kind `K` made in `ctx`, released by nobody else.
    pub(super) unsafe fn new(ctx: &Arc<DeviceCtx>, raw: K::Raw) -> Owned<K> {
        Owned {
            ctx: Arc::clone(ctx),
            raw,
        }
    }

    /// Makes one: `make` has the driver write the new handle into a `K::Raw` starting as
    /// `init` and returns its result, checked as `op` (an error leaves nothing to release).
    /// The caller has made `ctx` current.
    ///
    /// # Safety
    /// On success, `make` leaves a live object of kind `K` made in `ctx`, ours to release.
    pub(super) unsafe fn make(
        ctx: &Arc<DeviceCtx>,
        op: &'static str,
        init: K::Raw,
        make: impl FnOnce(&mut K::Raw) -> CuResult,
    ) -> CuRes<Owned<K>> {
        let mut raw = init;
        ctx.check(op, make(&mut raw))?;
        // SAFETY: per the contract.
        Ok(unsafe { Owned::new(ctx, raw) })
    }

    /// The device context it was made in.
    pub(super) fn ctx(&self) -> &Arc<DeviceCtx> {
        &self.ctx
    }
}

impl<K: Kind> Drop for Owned<K> {
    fn drop(&mut self) {
        if let Some(rel) = self.ctx.releaser(K::WHAT) {
            // SAFETY: `raw` was made in `ctx` (the constructors' contract), which the releaser
            // made current; it is dropped once, here, when its owner no longer uses it (each
            // kind's `release` says why that holds for it).
            unsafe { K::release(&rel, &self.raw) };
        }
    }
}
