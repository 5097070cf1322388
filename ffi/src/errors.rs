//! A failed call: its status code, the thread's last error text, and the guard every export
//! runs its body in (errors become the last error, panics `NIXL_ERR_PANIC`).

use super::*;

thread_local! {
    pub(crate) static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failed call: the code returned and the text `nixl_last_error` gives.
pub(crate) struct Fail {
    pub(crate) code: nixl_status,
    pub(crate) msg: String,
}

impl Fail {
    pub(crate) fn new(code: nixl_status, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Fail {
        Fail::new(NIXL_ERR_INVALID, msg)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::new(code_of(&e), e.to_string())
    }
}

pub(crate) fn code_of(e: &Error) -> nixl_status {
    match e.class() {
        ErrorClass::Invalid => NIXL_ERR_INVALID,
        ErrorClass::NotFound => NIXL_ERR_NOT_FOUND,
        ErrorClass::Backend => NIXL_ERR_BACKEND,
        ErrorClass::RemoteDisconnect => NIXL_ERR_REMOTE_DISCONNECT,
        ErrorClass::Cancelled => NIXL_ERR_CANCELLED,
        ErrorClass::TimedOut => NIXL_ERR_TIMEOUT,
        ErrorClass::Unavailable => NIXL_ERR_UNAVAILABLE,
        ErrorClass::Denied => NIXL_ERR_DENIED,
        // A class added to the core later still reaches C as an error.
        #[allow(unreachable_patterns)]
        _ => NIXL_ERR_BACKEND,
    }
}

pub(crate) type Res<T> = std::result::Result<T, Fail>;

pub(crate) fn set_last_error(msg: &str) {
    // Interior NULs cannot be shown in a C string: replace them.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

pub(crate) fn panic_text(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs the body of an export: its error becomes the thread's last error, a panic becomes
/// `NIXL_ERR_PANIC`.
pub(crate) fn guard(f: impl FnOnce() -> Res<nixl_status>) -> nixl_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(fail)) => {
            set_last_error(&fail.msg);
            fail.code
        }
        Err(p) => {
            set_last_error(&format!(
                "internal error (a bug; the call was aborted): {}",
                panic_text(&*p)
            ));
            NIXL_ERR_PANIC
        }
    }
}
