//! The one error type of the core, with the context a user needs to act on it.

use std::io;
use std::sync::Arc;

use crate::backend::BackendName;
use crate::mem::{Desc, MemKind};
use crate::metadata::DecodeError;

/// Result alias for the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse classes of errors, stable across releases (the C ABI maps them to its status codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Bad argument or malformed input.
    Invalid,
    /// Unknown agent, region or backend.
    NotFound,
    /// A backend failed.
    Backend,
    /// The peer went away.
    RemoteDisconnect,
    /// The request was cancelled.
    Cancelled,
    /// The request ran past its deadline.
    TimedOut,
    /// A backend cannot run on this host.
    Unavailable,
    /// Authentication, key or bounds check refused the access.
    Denied,
}

impl ErrorClass {
    /// The C ABI's name of this class's status in lower case without `NIXL_ERR_`
    /// (`"remote_disconnect"` for `NIXL_ERR_REMOTE_DISCONNECT`): the `status` label of
    /// `nixl_agent_errors_total`.
    pub fn status_name(self) -> &'static str {
        match self {
            ErrorClass::Invalid => "invalid",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Backend => "backend",
            ErrorClass::RemoteDisconnect => "remote_disconnect",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::TimedOut => "timeout",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Denied => "denied",
        }
    }
}

/// Everything that can go wrong in the core. Cloneable, so that a failed request can hand its
/// reason to every caller that asks.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A descriptor is malformed.
    #[error("descriptor {index}: {reason}")]
    InvalidDesc {
        /// Position in its list.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A registration overlaps one that exists.
    #[error("{kind} region {new:?} overlaps registered region {existing:?}")]
    Overlap {
        /// Kind of both regions.
        kind: MemKind,
        /// The region asked for.
        new: Desc,
        /// The registered region it overlaps.
        existing: Desc,
    },
    /// Deregistration of a region that is not registered (or was deregistered already).
    #[error("{kind} region {desc:?} is not registered")]
    NotRegistered {
        /// Kind of the region.
        kind: MemKind,
        /// The region asked for.
        desc: Desc,
    },
    /// A local descriptor of a transfer lies outside every local registration.
    #[error("local descriptor {index} ({kind} {desc:?}) is not inside a registered region")]
    LocalNotRegistered {
        /// Position in the local list.
        index: usize,
        /// Kind of the list.
        kind: MemKind,
        /// The descriptor.
        desc: Desc,
    },
    /// A remote descriptor lies outside every region the peer's metadata describes.
    #[error("remote descriptor {index} ({kind} {desc:?}) is not inside a region of peer '{peer}'")]
    RemoteNotRegistered {
        /// The peer.
        peer: String,
        /// Position in the remote list.
        index: usize,
        /// Kind of the list.
        kind: MemKind,
        /// The descriptor.
        desc: Desc,
    },
    /// Local and remote lists do not pair up.
    #[error("local and remote lists differ: {0}")]
    Mismatch(String),
    /// No peer of that name has been loaded.
    #[error("unknown peer '{0}' (load its metadata first)")]
    UnknownPeer(String),
    /// A backend name that no backend has.
    #[error("unknown backend '{0}'")]
    UnknownBackend(String),
    /// The backend cannot run on this host (or cannot take this memory).
    #[error("backend {backend} unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: BackendName,
        /// Why it cannot run, with the error underneath where there is one (also this error's
        /// [`std::error::Error::source`]).
        #[source]
        reason: Unusable,
    },
    /// No backend can carry the transfer.
    #[error("no backend can move {local_kind} to/from {remote_kind} of peer '{peer}': {rejected}")]
    NoBackend {
        /// The peer.
        peer: String,
        /// Kind of the local list.
        local_kind: MemKind,
        /// Kind of the remote list.
        remote_kind: MemKind,
        /// What each candidate lacked (and why the staged path failed, where it was tried).
        #[source]
        rejected: Rejections,
    },
    /// Metadata bytes could not be decoded.
    #[error("bad metadata: {0}")]
    Metadata(#[from] DecodeError),
    /// Metadata older than what is loaded.
    #[error("stale metadata for peer '{peer}': generation {got} is older than loaded {have}")]
    StaleMetadata {
        /// The peer.
        peer: String,
        /// Generation loaded.
        have: u64,
        /// Generation offered.
        got: u64,
    },
    /// The request is already in flight; wait for it to end before posting again.
    #[error("request is still in flight")]
    InFlight,
    /// The owner of the memory refused the access.
    #[error("peer '{peer}' denied access: {reason}")]
    Denied {
        /// The peer that refused.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer went away or its connection broke.
    #[error("peer '{peer}' disconnected: {reason}")]
    RemoteDisconnect {
        /// The peer.
        peer: String,
        /// What was seen.
        reason: String,
    },
    /// The request was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The request ran past its deadline.
    #[error("timed out")]
    TimedOut,
    /// A backend operation failed.
    #[error("backend {backend}: {op} failed: {reason}")]
    Backend {
        /// The backend.
        backend: BackendName,
        /// The failing operation.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// An I/O error outside any backend.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// The agent has shut down.
    #[error("agent '{0}' has shut down")]
    Shutdown(String),
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidDesc { .. }
            | Error::InvalidArgument(_)
            | Error::Overlap { .. }
            | Error::Mismatch(_)
            | Error::Metadata(_)
            | Error::StaleMetadata { .. }
            | Error::InFlight
            | Error::LocalNotRegistered { .. }
            | Error::RemoteNotRegistered { .. } => ErrorClass::Invalid,
            Error::NotRegistered { .. } | Error::UnknownPeer(_) | Error::UnknownBackend(_) => {
                ErrorClass::NotFound
            }
            Error::Unavailable { .. } => ErrorClass::Unavailable,
            Error::NoBackend { .. } => ErrorClass::NotFound,
            Error::Denied { .. } => ErrorClass::Denied,
            Error::RemoteDisconnect { .. } => ErrorClass::RemoteDisconnect,
            Error::Cancelled | Error::Shutdown(_) => ErrorClass::Cancelled,
            Error::TimedOut => ErrorClass::TimedOut,
            Error::Backend { .. } | Error::Io { .. } => ErrorClass::Backend,
        }
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// A short label for metrics (`errors_total{kind=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self.class() {
            ErrorClass::Invalid => "invalid",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Backend => "backend",
            ErrorClass::RemoteDisconnect => "remote_disconnect",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::TimedOut => "timed_out",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Denied => "denied",
        }
    }
}

/// Why a backend cannot run on this host ([`crate::Backend::probe`]) or cannot reach a peer
/// ([`crate::Backend::can_reach`]): what is missing, and the error underneath where there is
/// one ([`std::error::Error::source`]). Its text is what users see after
/// `backend X unavailable:` or in a [`Error::NoBackend`] reason.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Unusable {
    /// A condition the backend checked itself (a setting, a peer on another node).
    Reason(String),
    /// An error underneath, said as it is.
    Error(Arc<dyn std::error::Error + Send + Sync>),
    /// A step failed: what was being done, and why.
    Failed {
        /// What was being done.
        context: String,
        /// The cause.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Reason(r) => f.write_str(r),
            Unusable::Error(e) => e.fmt(f),
            Unusable::Failed { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Unusable {
    /// The error underneath itself (not the `Arc` holding it), so that callers can downcast it.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Unusable::Reason(_) => None,
            Unusable::Error(e) | Unusable::Failed { source: e, .. } => Some(&**e),
        }
    }
}

impl Unusable {
    /// An [`Unusable::Failed`] with context.
    pub fn failed(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Unusable {
        Unusable::Failed {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// An [`Unusable::Error`]: the error's own text, and the error as the source.
    pub fn from_error(source: impl std::error::Error + Send + Sync + 'static) -> Unusable {
        Unusable::Error(Arc::new(source))
    }

    /// The same reason with `context` put in front (`"{context}: {self}"`), its source kept.
    pub fn context(self, context: impl std::fmt::Display) -> Unusable {
        match self {
            Unusable::Reason(r) => Unusable::Reason(format!("{context}: {r}")),
            Unusable::Error(source) => Unusable::Failed {
                context: context.to_string(),
                source,
            },
            Unusable::Failed { context: c, source } => Unusable::Failed {
                context: format!("{context}: {c}"),
                source,
            },
        }
    }
}

/// Why no backend carries a transfer ([`Error::NoBackend`]): each backend passed over with
/// what it lacked, in the order they were tried (the ones that do not run here last), and why
/// the staged path through host memory failed, where it was tried. Its text reads
/// `tcp: does not move local vram; cuda: unavailable: libcuda.so.1 not found; staged through
/// host memory: ...`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Rejections {
    /// Each backend passed over, with what it lacked.
    pub backends: Vec<(BackendName, Unusable)>,
    /// Why the staged path through host memory failed too, where it was tried.
    pub staged: Option<Unusable>,
}

impl Rejections {
    /// What `backend` lacked, if it was passed over.
    pub fn reason(&self, backend: BackendName) -> Option<&Unusable> {
        self.backends
            .iter()
            .find(|(n, _)| *n == backend)
            .map(|(_, why)| why)
    }

    /// Whether no backend was passed over and no staged path tried.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.staged.is_none()
    }
}

impl std::fmt::Display for Rejections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sep = "";
        for (name, why) in &self.backends {
            write!(f, "{sep}{name}: {why};")?;
            sep = " ";
        }
        if let Some(e) = &self.staged {
            write!(f, "{sep}staged through host memory: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejections {
    /// Why the staged path failed, where it was tried.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.staged.as_ref().map(|u| u as _)
    }
}

impl From<String> for Unusable {
    fn from(reason: String) -> Unusable {
        Unusable::Reason(reason)
    }
}

impl From<&str> for Unusable {
    fn from(reason: &str) -> Unusable {
        Unusable::Reason(reason.to_owned())
    }
}

impl PartialEq for Unusable {
    /// Equal when the texts are (sources compare by their text).
    fn eq(&self, other: &Unusable) -> bool {
        self.to_string() == other.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn an_unusable_reason_keeps_its_cause_as_the_source() {
        let io = io::Error::new(io::ErrorKind::PermissionDenied, "blocked by seccomp");
        let u = Unusable::failed("process_vm_readv does not work here", io);
        assert_eq!(
            u.to_string(),
            "process_vm_readv does not work here: blocked by seccomp"
        );
        assert_eq!(u.source().unwrap().to_string(), "blocked by seccomp");
        let u = u.context("shm");
        assert!(u.to_string().starts_with("shm: process_vm_readv"), "{u}");
        assert!(u.source().is_some());
        let plain = Unusable::from("peer is in another process");
        assert!(plain.source().is_none());
        assert_eq!(plain.to_string(), "peer is in another process");
        let wrapped = Unusable::from_error(io::Error::other("no such device"));
        assert_eq!(wrapped.to_string(), "no such device");
        assert!(wrapped.source().is_some());
    }

    #[test]
    fn unavailable_and_no_backend_keep_their_reasons_typed() {
        let io = io::Error::new(io::ErrorKind::NotFound, "libcuda.so.1: cannot open");
        let e = Error::Unavailable {
            backend: BackendName::Cuda,
            reason: Unusable::failed("dlopen", io),
        };
        assert_eq!(
            e.to_string(),
            "backend cuda unavailable: dlopen: libcuda.so.1: cannot open"
        );
        // The chain: the error, the backend's reason, the error underneath it.
        let why = e.source().expect("the reason");
        assert!(why.downcast_ref::<Unusable>().is_some());
        let io = why.source().expect("the cause");
        assert_eq!(
            io.downcast_ref::<io::Error>().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );

        let mut rejected = Rejections::default();
        rejected
            .backends
            .push((BackendName::Tcp, "does not move local VRAM".into()));
        rejected.backends.push((
            BackendName::Cuda,
            Unusable::from("no libcuda").context("unavailable"),
        ));
        let no = |rejected: Rejections| Error::NoBackend {
            peer: "b".into(),
            local_kind: MemKind::Vram,
            remote_kind: MemKind::Dram,
            rejected,
        };
        assert_eq!(
            no(rejected.clone()).to_string(),
            "no backend can move VRAM to/from DRAM of peer 'b': tcp: does not move local VRAM; \
             cuda: unavailable: no libcuda;"
        );
        assert_eq!(
            rejected.reason(BackendName::Tcp).map(ToString::to_string),
            Some("does not move local VRAM".into())
        );
        rejected.staged = Some(Unusable::from("request length overflows"));
        let e = no(rejected);
        assert!(
            e.to_string()
                .ends_with("; staged through host memory: request length overflows"),
            "{e}"
        );
        let staged = e
            .source()
            .and_then(|r| r.source())
            .expect("the staged reason");
        assert_eq!(staged.to_string(), "request length overflows");
        assert_eq!(e.class(), ErrorClass::NotFound);
    }
}
