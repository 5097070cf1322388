//! Weight streaming across replicas: a model's safetensors files are published from registered
//! memory by a source and pulled by replicas with one-sided READs, spread over every live
//! source, each chunk verified against the manifest before it is written (once) or served on.
//!
//! ```text
//!  origin: nixl-weights serve /models/llama --name llama      (reads each file once)
//!  replica: nixl-weights pull llama --out /models/llama --source 10.0.0.5:7000 --serve
//! ```
//!
//! - [`manifest`]: files, tensors (name, dtype, shape, byte range, checksum) and chunk checksums,
//!   versioned and decoded with bounds; the model id is the name plus the manifest's digest.
//! - [`publish`]: how a model sits in registered memory so that a puller needs READs alone (a
//!   control region with a header, the manifest and one "have" byte per chunk; a data region).
//! - [`source`]: an origin loads a directory, publishes it, and refuses files changed on disk.
//! - [`mod@pull`]: a replica pulls, verifies, writes, falls back to storage, and may serve on.
//! - [`tensors`]: single tensors pulled by name into memory the caller registered.
//! - [`daemon`]: an origin loads a directory into the per-node daemon's pool, which serves it
//!   after the CLI exits.
//!
//! Without a daemon everything runs in the CLI's own agent, the model in a [`mem::HostMem`].

pub mod daemon;
pub mod error;
pub mod load;
pub mod manifest;
pub mod mem;
pub mod publish;
pub mod pull;
pub mod source;
pub mod tensors;

pub use error::{Error, Result};
pub use manifest::Manifest;
pub use pull::{pull, Fallback, PullOptions, PullReport, Pulled};
pub use source::{Source, SourceOptions};

/// etcd key prefix under which sources of a model announce themselves:
/// `/nixl/weights/<model>/<agent>` holds the agent's metadata, under a lease.
pub const ETCD_PREFIX: &str = "/nixl/weights/";

/// Name of the manifest a pull writes beside the files (read by `nixl-weights verify`).
pub const MANIFEST_FILE: &str = ".nixl-weights-manifest";
