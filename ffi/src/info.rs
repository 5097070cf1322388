//! What the library says of itself and an agent: names, backend status, the last error,
//! status names and the version.

use super::*;

/// Writes the agent's name (NUL-terminated) to `out`.
///
/// # Safety
/// `out` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_agent_name(
    agent: *const nixl_agent,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let name = a.shared.agent.name();
        str_out(out, cap, name, "out")?;
        Ok(())
    })
}

/// Whether the agent runs `backend`: `NIXL_OK`; `NIXL_ERR_UNAVAILABLE` with the reason in
/// `nixl_last_error` (no GPU, no RDMA device, not configured); `NIXL_ERR_NOT_FOUND` for a name
/// this library does not know.
///
/// # Safety
/// `backend` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nixl_backend_status(
    agent: *const nixl_agent,
    backend: *const c_char,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        let name = str_arg(backend, "backend")?;
        a.shared.agent.check_backend(backend_arg(name)?)?;
        Ok(())
    })
}

/// The calling thread's last error text: never NULL, "" before any error. Valid until this
/// thread's next call into the library. Successful calls leave it as it was.
#[no_mangle]
pub extern "C" fn nixl_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|l| l.borrow().as_ptr())
        .unwrap_or(c"(thread is exiting)".as_ptr())
}

/// The name of a status code ("NIXL_OK", "NIXL_ERR_INVALID", ...), or "NIXL_UNKNOWN_STATUS".
/// The string is static.
#[no_mangle]
pub extern "C" fn nixl_status_str(status: nixl_status) -> *const c_char {
    let s = match status {
        NIXL_OK => c"NIXL_OK",
        NIXL_IN_PROGRESS => c"NIXL_IN_PROGRESS",
        NIXL_EMPTY => c"NIXL_EMPTY",
        NIXL_ERR_INVALID => c"NIXL_ERR_INVALID",
        NIXL_ERR_NOT_FOUND => c"NIXL_ERR_NOT_FOUND",
        NIXL_ERR_BACKEND => c"NIXL_ERR_BACKEND",
        NIXL_ERR_REMOTE_DISCONNECT => c"NIXL_ERR_REMOTE_DISCONNECT",
        NIXL_ERR_CANCELLED => c"NIXL_ERR_CANCELLED",
        NIXL_ERR_TIMEOUT => c"NIXL_ERR_TIMEOUT",
        NIXL_ERR_UNAVAILABLE => c"NIXL_ERR_UNAVAILABLE",
        NIXL_ERR_DENIED => c"NIXL_ERR_DENIED",
        NIXL_ERR_BUFFER_TOO_SMALL => c"NIXL_ERR_BUFFER_TOO_SMALL",
        NIXL_ERR_PANIC => c"NIXL_ERR_PANIC",
        _ => c"NIXL_UNKNOWN_STATUS",
    };
    s.as_ptr()
}

/// The library's version ("0.1.0"), static.
#[no_mangle]
pub extern "C" fn nixl_version() -> *const c_char {
    static V: std::sync::LazyLock<CString> =
        std::sync::LazyLock::new(|| CString::new(env!("CARGO_PKG_VERSION")).unwrap_or_default());
    V.as_ptr()
}
