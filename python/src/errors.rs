//! NIXL's exception classes, and the one for each kind of core error.

use nixl_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    nixl._bindings,
    nixlNotPostedError,
    PyException,
    "The request was never posted."
);
create_exception!(
    nixl._bindings,
    nixlInvalidParamError,
    PyException,
    "A bad argument or malformed input."
);
create_exception!(
    nixl._bindings,
    nixlBackendError,
    PyException,
    "A backend failed."
);
create_exception!(
    nixl._bindings,
    nixlNotFoundError,
    PyException,
    "An unknown agent, region, descriptor or backend."
);
create_exception!(
    nixl._bindings,
    nixlMismatchError,
    PyException,
    "Local and remote descriptor lists do not pair up."
);
create_exception!(
    nixl._bindings,
    nixlNotAllowedError,
    PyException,
    "Refused: authentication, region key or bounds."
);
create_exception!(
    nixl._bindings,
    nixlRepostActiveError,
    PyException,
    "The request is still in flight."
);
create_exception!(
    nixl._bindings,
    nixlUnknownError,
    PyException,
    "An error of no other class."
);
create_exception!(
    nixl._bindings,
    nixlNotSupportedError,
    PyException,
    "Not supported here (a backend that cannot run on this host, say)."
);
create_exception!(
    nixl._bindings,
    nixlRemoteDisconnectError,
    PyException,
    "The peer went away."
);
create_exception!(
    nixl._bindings,
    nixlCancelledError,
    PyException,
    "The request was cancelled (or its agent shut down)."
);
create_exception!(
    nixl._bindings,
    nixlNoTelemetryError,
    PyException,
    "Telemetry was not enabled (capture_telemetry)."
);
create_exception!(
    nixl._bindings,
    nixlTimeoutError,
    nixlBackendError,
    "nixl-rs: the request ran past its deadline (a nixlBackendError)."
);

/// The Python exception for a core error, by its kind.
pub(crate) fn err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidDesc { .. }
        | Error::InvalidArgument(_)
        | Error::Overlap { .. }
        | Error::Metadata(_)
        | Error::StaleMetadata { .. } => nixlInvalidParamError::new_err(msg),
        Error::Mismatch(_) => nixlMismatchError::new_err(msg),
        Error::InFlight => nixlRepostActiveError::new_err(msg),
        Error::NotRegistered { .. }
        | Error::LocalNotRegistered { .. }
        | Error::RemoteNotRegistered { .. }
        | Error::UnknownPeer(_)
        | Error::UnknownBackend(_)
        | Error::NoBackend { .. } => nixlNotFoundError::new_err(msg),
        Error::Unavailable { .. } => nixlNotSupportedError::new_err(msg),
        Error::Denied { .. } => nixlNotAllowedError::new_err(msg),
        Error::RemoteDisconnect { .. } => nixlRemoteDisconnectError::new_err(msg),
        Error::Cancelled | Error::Shutdown(_) => nixlCancelledError::new_err(msg),
        Error::TimedOut => nixlTimeoutError::new_err(msg),
        Error::Backend { .. } | Error::Io { .. } => nixlBackendError::new_err(msg),
        _ => nixlUnknownError::new_err(msg),
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> PyErr {
    nixlInvalidParamError::new_err(msg.into())
}

/// Adds the exception classes to the module `m`.
pub(crate) fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    for (name, e) in [
        ("nixlNotPostedError", py.get_type::<nixlNotPostedError>()),
        (
            "nixlInvalidParamError",
            py.get_type::<nixlInvalidParamError>(),
        ),
        ("nixlBackendError", py.get_type::<nixlBackendError>()),
        ("nixlNotFoundError", py.get_type::<nixlNotFoundError>()),
        ("nixlMismatchError", py.get_type::<nixlMismatchError>()),
        ("nixlNotAllowedError", py.get_type::<nixlNotAllowedError>()),
        (
            "nixlRepostActiveError",
            py.get_type::<nixlRepostActiveError>(),
        ),
        ("nixlUnknownError", py.get_type::<nixlUnknownError>()),
        (
            "nixlNotSupportedError",
            py.get_type::<nixlNotSupportedError>(),
        ),
        (
            "nixlRemoteDisconnectError",
            py.get_type::<nixlRemoteDisconnectError>(),
        ),
        ("nixlCancelledError", py.get_type::<nixlCancelledError>()),
        (
            "nixlNoTelemetryError",
            py.get_type::<nixlNoTelemetryError>(),
        ),
        ("nixlTimeoutError", py.get_type::<nixlTimeoutError>()),
    ] {
        m.add(name, e)?;
    }
    Ok(())
}
