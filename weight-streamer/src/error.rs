//! The crate's error type.

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a weight stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input: a manifest, a model directory, an argument.
    #[error("{0}")]
    Invalid(String),
    /// A file or directory operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and on which path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The transfer core refused or failed something.
    #[error("{what}: {source}")]
    Core {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: nixl_core::Error,
    },
    /// Two descriptions of one model disagree; names the tensor where they part.
    #[error("manifest mismatch at tensor {tensor:?}: {detail}")]
    ManifestMismatch {
        /// The tensor.
        tensor: String,
        /// How they differ, and between whom.
        detail: String,
    },
    /// A model file changed on disk while it was loaded or served.
    #[error("file {path} changed on disk while served ({detail}): refusing to serve it")]
    Changed {
        /// The file.
        path: String,
        /// What changed.
        detail: String,
    },
    /// The per-node daemon's pool refused or failed something.
    #[error("{what}: {source}")]
    Daemon {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: nixl_agent::pool_client::PoolError,
    },
    /// The pull could not get every chunk.
    #[error("pull incomplete: {0}")]
    Incomplete(String),
}

impl Error {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// A core error with context.
    pub fn core(what: impl Into<String>, source: nixl_core::Error) -> Error {
        Error::Core {
            what: what.into(),
            source,
        }
    }
}
