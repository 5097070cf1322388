//! Arguments from C (strings, byte buffers, descriptor arrays, kinds, timeouts) checked into
//! Rust values, and outputs written back only once a call succeeded.

use super::*;

/// A required C string argument, as UTF-8.
pub(crate) fn str_arg<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL; the caller passes a NUL-terminated string that stays valid for the call.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| Fail::invalid(format!("{what} is not UTF-8")))
}

/// An optional C string argument: NULL gives `default`.
pub(crate) fn opt_str_arg<'a>(p: *const c_char, what: &str, default: &'a str) -> Res<&'a str> {
    if p.is_null() {
        Ok(default)
    } else {
        str_arg(p, what)
    }
}

/// Checks an output pointer up front (before the call does its work): non-NULL and aligned.
pub(crate) fn out_arg<T>(out: *mut T, what: &str) -> Res<()> {
    if out.is_null() || !out.is_aligned() {
        return Err(Fail::invalid(format!("{what} is NULL or misaligned")));
    }
    Ok(())
}

/// `len` bytes at `p`; NULL is accepted for an empty buffer only.
pub(crate) fn bytes_arg<'a>(p: *const u8, len: usize, what: &str) -> Res<&'a [u8]> {
    if p.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(Fail::invalid(format!("{what} is NULL with length {len}")))
        };
    }
    if len > isize::MAX as usize {
        return Err(Fail::invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: non-NULL, length within isize::MAX; the caller passes `len` readable bytes that
    // stay valid and unchanged for the call.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `count` elements of `T` at `p` (the caller checks `count` against its own bounds first):
/// non-NULL, aligned, at most `isize::MAX` bytes.
pub(crate) fn slice_arg<'a, T>(p: *const T, count: usize, what: &str) -> Res<&'a [T]> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL with count {count}")));
    }
    if !p.is_aligned() {
        return Err(Fail::invalid(format!("{what} is misaligned")));
    }
    if count > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Fail::invalid(format!("{what}: count {count} is too large")));
    }
    // SAFETY: non-NULL, aligned, size within isize::MAX; the caller passes `count` elements
    // that stay valid and unchanged for the call.
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

/// A descriptor array: non-NULL, aligned, at least one element.
pub(crate) fn descs_arg(kind: i32, p: *const nixl_desc, count: usize, what: &str) -> Res<DescList> {
    let kind = kind_arg(kind)?;
    if count == 0 {
        return Err(Fail::invalid(format!(
            "{what}: no descriptors (count is 0)"
        )));
    }
    let descs: Vec<Desc> = slice_arg(p, count, what)?
        .iter()
        .map(|d| Desc::new(d.addr, d.len, d.dev_id))
        .collect();
    DescList::from_descs(kind, descs).map_err(|e| Fail::new(code_of(&e), format!("{what}: {e}")))
}

pub(crate) fn kind_arg(kind: i32) -> Res<MemKind> {
    u8::try_from(kind)
        .ok()
        .and_then(MemKind::from_code)
        .ok_or_else(|| {
            Fail::invalid(format!(
                "memory kind {kind} is not one of NIXL_DRAM, NIXL_VRAM, NIXL_BLOCK, NIXL_OBJECT, \
                 NIXL_FILE"
            ))
        })
}

/// Checks that `s` and its NUL fit in `cap` bytes at `out`; the write happens in [`put_str`],
/// after everything else of the call succeeded.
pub(crate) fn check_str_out(out: *mut c_char, cap: usize, s: &str, what: &str) -> Res<()> {
    if out.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if s.len() + 1 > cap {
        return Err(Fail::new(
            NIXL_ERR_BUFFER_TOO_SMALL,
            format!(
                "{what}: {} bytes needed (with the NUL), capacity is {cap}",
                s.len() + 1
            ),
        ));
    }
    Ok(())
}

/// Writes `s` and its NUL to `out` (`cap` bytes) as a call's last step: [`check_str_out`],
/// then [`put_str`].
pub(crate) fn str_out(out: *mut c_char, cap: usize, s: &str, what: &str) -> Res<()> {
    check_str_out(out, cap, s, what)?;
    put_str(out, s);
    Ok(())
}

/// Writes `s` and a NUL to `out`, checked by [`check_str_out`].
pub(crate) fn put_str(out: *mut c_char, s: &str) {
    // SAFETY: `check_str_out` found `out` non-NULL with room for `s.len() + 1` bytes (the
    // caller's `cap`), and `s` is a Rust string that cannot overlap the caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), out.cast::<u8>(), s.len());
        *out.add(s.len()) = 0;
    }
}

pub(crate) fn write_out<T>(out: *mut T, v: T, what: &str) -> Res<()> {
    if out.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if !out.is_aligned() {
        return Err(Fail::invalid(format!("{what} is misaligned")));
    }
    // SAFETY: non-NULL and aligned; the caller passes a writable `T`. `write` does not drop
    // the (possibly uninitialised) old value.
    unsafe { out.write(v) };
    Ok(())
}

pub(crate) fn timeout_arg(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}
