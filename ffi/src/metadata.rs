//! Metadata exchange: this agent's metadata out, peers' metadata in (given or fetched), object
//! names, and forgetting a peer.

use super::*;

/// Writes a copy of the agent's metadata (its backends' connection info and its registered
/// regions) to `*md` and `*md_len`. Free it with `nixl_bytes_free`.
///
/// # Safety
/// `md` and `md_len` are writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_local_md(
    agent: *mut nixl_agent,
    md: *mut *mut u8,
    md_len: *mut usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        if md.is_null() || md_len.is_null() {
            return Err(Fail::invalid("md or md_len is NULL"));
        }
        let bytes = a.shared.agent.metadata_bytes();
        // SAFETY: plain allocation of at least one byte; checked for NULL below.
        let p = unsafe { libc::malloc(bytes.len().max(1)) }.cast::<u8>();
        if p.is_null() {
            return Err(Fail::new(
                NIXL_ERR_BACKEND,
                format!("out of memory for {} bytes of metadata", bytes.len()),
            ));
        }
        // SAFETY: `p` was just allocated with room for `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        if let Err(e) = write_out(md_len, bytes.len(), "md_len").and(write_out(md, p, "md")) {
            // SAFETY: allocated above with malloc and not handed out.
            unsafe { libc::free(p.cast()) };
            return Err(e);
        }
        Ok(())
    })
}

/// Frees bytes returned by this library (`nixl_local_md`). NULL is a no-op; `len` is not used.
///
/// # Safety
/// `bytes` is NULL or came from this library and was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn nixl_bytes_free(bytes: *mut u8, len: usize) {
    let _ = len;
    // SAFETY: the caller passes NULL or a pointer this library allocated with malloc.
    unsafe { libc::free(bytes.cast()) };
}

/// Loads a peer's metadata (from its `nixl_local_md`) and writes the peer's name,
/// NUL-terminated, to `name_out`. Garbage or truncated metadata is `NIXL_ERR_INVALID`; a
/// `name_out` too small is `NIXL_ERR_BUFFER_TOO_SMALL`, and then nothing is loaded. A newer
/// instance or generation of the peer replaces what was loaded; an older one is refused.
///
/// # Safety
/// `md` points to `md_len` readable bytes; `name_out` to `name_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_load_remote_md(
    agent: *mut nixl_agent,
    md: *const u8,
    md_len: usize,
    name_out: *mut c_char,
    name_cap: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let bytes = bytes_arg(md, md_len, "md")?;
        load_md(a, bytes, name_out, name_cap)
    })
}

pub(crate) fn load_md(
    a: &AgentHandle,
    bytes: &[u8],
    name_out: *mut c_char,
    name_cap: usize,
) -> Res<i32> {
    let md = AgentMetadata::decode(bytes).map_err(|e| Fail::invalid(format!("metadata: {e}")))?;
    let name = md.name.clone();
    check_str_out(name_out, name_cap, &name, "name_out")?;
    a.shared.agent.load_remote_md(md)?;
    put_str(name_out, &name);
    Ok(NIXL_OK)
}

/// Fetches a peer's metadata from its `tcp` listener at `addr` ("HOST:PORT", as in its
/// `[tcp] listen`), authenticated with this agent's `[auth]` settings, and loads it as
/// `nixl_load_remote_md` does. `timeout_ms` < 0 means 5 seconds.
///
/// # Safety
/// `addr` is a NUL-terminated string; `name_out` points to `name_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_fetch_remote_md(
    agent: *mut nixl_agent,
    addr: *const c_char,
    timeout_ms: i64,
    name_out: *mut c_char,
    name_cap: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let addr = str_arg(addr, "addr")?;
        if name_out.is_null() {
            return Err(Fail::invalid("name_out is NULL"));
        }
        let timeout = timeout_arg(timeout_ms).unwrap_or(Duration::from_secs(5));
        let bytes = fetch_metadata(addr, &a.shared.auth, timeout)?;
        load_md(a, &bytes, name_out, name_cap)
    })
}

/// Names object `id` of the `object` backend: OBJECT descriptors `(offset, len, id)` then
/// stand for `name` ("bucket/key"), for requests created from now on. (Without a name, `id`
/// is `{key_prefix}{id}` in the configured `[object] bucket`.) `NIXL_ERR_UNAVAILABLE` if the
/// agent runs no `object` backend.
///
/// # Safety
/// `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nixl_object_name(
    agent: *mut nixl_agent,
    id: u64,
    name: *const c_char,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let name = str_arg(name, "name")?;
        nixl_transports::object::name_object(&a.shared.agent, id, name)?;
        Ok(())
    })
}

/// Forgets a peer: its connections close and its transfers fail from then on.
/// `NIXL_ERR_NOT_FOUND` if no such peer is loaded.
///
/// # Safety
/// `remote_name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nixl_invalidate_remote(
    agent: *mut nixl_agent,
    remote_name: *const c_char,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let name = str_arg(remote_name, "remote_name")?;
        a.shared.agent.invalidate_remote(name)?;
        Ok(())
    })
}
