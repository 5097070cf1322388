//! The errors of checkpoint and restore.

use std::io;

/// Result of this crate.
pub type Result<T, E = CkptError> = std::result::Result<T, E>;

/// Why a save, restore or check failed. Errors about the data name the region and the chunk,
/// and a restore says whether the caller's memory was written before the failure was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CkptError {
    /// The checkpoint has no region of this name.
    #[error("region {region:?} is not in the checkpoint (it holds: {holds})")]
    NotFound {
        /// The name asked for.
        region: String,
        /// The names it holds, comma-separated.
        holds: String,
    },
    /// There is no complete checkpoint at the location (nothing there, or a save that never
    /// finished: its manifest is written last).
    #[error("no checkpoint at {location}: {reason}")]
    NoCheckpoint {
        /// Directory or URI.
        location: String,
        /// Why.
        reason: String,
    },
    /// The manifest is damaged or lies.
    #[error("corrupt manifest: {0}")]
    Manifest(String),
    /// The manifest was written by a newer version of the library.
    #[error("manifest version {found} is newer than this build, which reads up to {supported}: upgrade nixl-ckpt")]
    NewerVersion {
        /// Version found.
        found: u16,
        /// Newest version this build reads.
        supported: u16,
    },
    /// Data of a region is damaged, missing or truncated.
    #[error("region {region:?}{}: {reason}; {}", chunk.map(|c| format!(" chunk {c}")).unwrap_or_default(),
        if *memory_written { "the caller's memory was partly written" } else { "the caller's memory was not touched" })]
    Corrupt {
        /// The region.
        region: String,
        /// The chunk, when one is to blame.
        chunk: Option<usize>,
        /// What is wrong.
        reason: String,
        /// Whether restore had written the caller's memory before this was found.
        memory_written: bool,
    },
    /// A file of an artifact directory is damaged or missing in the checkpoint.
    #[error(
        "artifact {artifact:?} file {path:?}: {reason}; nothing was restored to the destination"
    )]
    ArtifactCorrupt {
        /// The artifact directory.
        artifact: String,
        /// The file's path inside it.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The caller's region does not match the checkpoint's (kind or length).
    #[error("region {region:?} does not match the checkpoint: {reason}; the caller's memory was not touched")]
    Mismatch {
        /// The region.
        region: String,
        /// How.
        reason: String,
    },
    /// A removal refused: other checkpoints are incremental saves over this one and read their
    /// unchanged chunks from its data files (removing it would leave them unrestorable). Copy
    /// them into self-contained ones (`nixl-ckpt copy`), remove them first, or force.
    #[error(
        "{location} is the base of {} incremental checkpoint(s) that read data from it: {}; \
         removing it would leave them unrestorable (copy them into self-contained ones with \
         `nixl-ckpt copy`, or remove them first, or force the removal: `nixl-ckpt rm --force`)",
        dependents.len(),
        dependents.join(", ")
    )]
    HasDependents {
        /// The checkpoint asked to be removed.
        location: String,
        /// The checkpoints found to depend on it (directories or `s3://` URIs).
        dependents: Vec<String>,
    },
    /// A bad argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not supported (yet), with what to do instead.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A file system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which file.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The agent refused or failed a registration or transfer.
    #[error("{context}: {source}")]
    Agent {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: nixl_core::Error,
    },
}

impl CkptError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> CkptError {
        CkptError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn agent(context: impl Into<String>, source: nixl_core::Error) -> CkptError {
        CkptError::Agent {
            context: context.into(),
            source,
        }
    }

    /// Whether the error says the checkpoint (or the caller's regions) is wrong, rather than
    /// that something failed while reading or writing a sound one.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            CkptError::NoCheckpoint { .. }
                | CkptError::Manifest(_)
                | CkptError::NewerVersion { .. }
                | CkptError::Corrupt { .. }
                | CkptError::ArtifactCorrupt { .. }
                | CkptError::Mismatch { .. }
        )
    }

    /// Whether the caller's memory was written before the error (restore only).
    pub fn memory_written(&self) -> bool {
        matches!(
            self,
            CkptError::Corrupt {
                memory_written: true,
                ..
            }
        )
    }
}
