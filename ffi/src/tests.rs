//! Unit tests of the exports, called from Rust.

use super::*;

fn last_error() -> String {
    // SAFETY: nixl_last_error never returns NULL, and the string lives until this thread's
    // next call into the library.
    unsafe { CStr::from_ptr(nixl_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_panic_is_a_status_and_a_message() {
    let code = guard(|| panic!("boom {}", 42));
    assert_eq!(code, NIXL_ERR_PANIC);
    assert!(last_error().contains("boom 42"), "{}", last_error());
    let code = guard(|| std::panic::panic_any(7u32));
    assert_eq!(code, NIXL_ERR_PANIC);
    assert!(last_error().contains("no message"));
}

#[test]
fn last_error_is_per_thread_and_kept_across_successes() {
    assert_eq!(guard(|| Err(Fail::invalid("mine"))), NIXL_ERR_INVALID);
    std::thread::spawn(|| {
        assert_eq!(last_error(), "");
        assert_eq!(guard(|| Err(Fail::invalid("theirs\0x"))), NIXL_ERR_INVALID);
        assert_eq!(last_error(), "theirs\\0x");
    })
    .join()
    .unwrap();
    assert_eq!(guard(|| Ok(NIXL_OK)), NIXL_OK);
    assert_eq!(last_error(), "mine");
}

#[test]
fn every_status_has_its_name() {
    for (code, name) in [
        (NIXL_OK, "NIXL_OK"),
        (NIXL_IN_PROGRESS, "NIXL_IN_PROGRESS"),
        (NIXL_EMPTY, "NIXL_EMPTY"),
        (NIXL_ERR_INVALID, "NIXL_ERR_INVALID"),
        (NIXL_ERR_NOT_FOUND, "NIXL_ERR_NOT_FOUND"),
        (NIXL_ERR_BACKEND, "NIXL_ERR_BACKEND"),
        (NIXL_ERR_REMOTE_DISCONNECT, "NIXL_ERR_REMOTE_DISCONNECT"),
        (NIXL_ERR_CANCELLED, "NIXL_ERR_CANCELLED"),
        (NIXL_ERR_TIMEOUT, "NIXL_ERR_TIMEOUT"),
        (NIXL_ERR_UNAVAILABLE, "NIXL_ERR_UNAVAILABLE"),
        (NIXL_ERR_DENIED, "NIXL_ERR_DENIED"),
        (NIXL_ERR_BUFFER_TOO_SMALL, "NIXL_ERR_BUFFER_TOO_SMALL"),
        (NIXL_ERR_PANIC, "NIXL_ERR_PANIC"),
        (12345, "NIXL_UNKNOWN_STATUS"),
    ] {
        // SAFETY: static NUL-terminated strings.
        let got = unsafe { CStr::from_ptr(nixl_status_str(code)) };
        assert_eq!(got.to_str().unwrap(), name);
    }
}

#[test]
fn error_classes_map_to_the_contract_codes() {
    let cases: [(Error, nixl_status); 9] = [
        (Error::InvalidArgument("x".into()), NIXL_ERR_INVALID),
        (Error::UnknownPeer("p".into()), NIXL_ERR_NOT_FOUND),
        (Error::TimedOut, NIXL_ERR_TIMEOUT),
        (Error::Cancelled, NIXL_ERR_CANCELLED),
        (
            Error::Unavailable {
                backend: BackendName::Cuda,
                reason: "no libcuda".into(),
            },
            NIXL_ERR_UNAVAILABLE,
        ),
        (
            Error::RemoteDisconnect {
                peer: "p".into(),
                reason: "gone".into(),
            },
            NIXL_ERR_REMOTE_DISCONNECT,
        ),
        (
            Error::Backend {
                backend: BackendName::Tcp,
                op: "write",
                reason: "x".into(),
            },
            NIXL_ERR_BACKEND,
        ),
        (Error::InFlight, NIXL_ERR_INVALID),
        (
            Error::Denied {
                peer: "p".into(),
                reason: "bounds".into(),
            },
            NIXL_ERR_DENIED,
        ),
    ];
    for (e, code) in cases {
        assert_eq!(code_of(&e), code, "{e}");
    }
}
