//! nixl-checkpoint: checkpoint and restore of ready-to-serve state.
//!
//! A checkpoint is a set of named regions of registered memory (with the kind, device, length
//! and virtual address each had) plus the caller's JSON metadata, stored in a directory:
//!
//! ```text
//! DIR/manifest.nckpt             versioned, checksummed manifest (written and renamed last)
//! DIR/d<save id>-<region>.dat    one data file per region, chunks at chunk-size-aligned offsets
//! ```
//!
//! Or under `s3://bucket/prefix` through the agent's `object` backend: one object per region
//! (per run of changed chunks in an incremental save), the manifest object
//! (`prefix/manifest.nckpt`) PUT last; see `s3.rs`, [`copy_with`] and [`remove_with`].
//! Artifact directories (file trees) travel with a checkpoint directory: [`artifact`]. A node
//! daemon's pool can hold a checkpoint for peers: [`daemon`].
//!
//! **Moving the bytes.** [`save`] and [`restore`] go through the caller's [`nixl_core::Agent`]
//! as any user would: the data files are opened (with `O_DIRECT` where the file system and the
//! memory's alignment allow, a buffered fd for the unaligned tail), registered as FILE regions,
//! and every chunk of every region is moved by one WRITE (save) or READ (restore) request that
//! the agent's `uring` (or `posix`) backend keeps many operations deep. Checksums (xxh3-64 per
//! chunk) are computed on all cores while the writes run, and checked after the reads land:
//! [`restore`] reports success only when every byte matched.
//!
//! **Crash safety.** Data files carry the save's random id in their names, so a save never
//! writes over the files of the checkpoint already there. Data is written, then `fsync`ed;
//! then the manifest is written to a temporary name, `fsync`ed, renamed over `manifest.nckpt`,
//! and the directory `fsync`ed; only then are the previous checkpoint's files removed. A save
//! killed at any point leaves the previous checkpoint intact (or nothing, which restores as
//! "no checkpoint"), never something that restores as valid.
//!
//! **Bad input.** The manifest is untrusted: bounded decoding, a checksum over it, and every
//! chunk checked against its file. A truncated or missing data file, a flipped byte, a newer
//! manifest version or regions that do not match fail with [`CkptError`], naming the region and
//! the chunk and saying whether the caller's memory had been written.
//!
//! **At the recorded addresses.** [`restore_mapped`] with [`Placement::Recorded`] maps host
//! memory at the addresses the regions had when saved (`mmap` with `MAP_FIXED_NOREPLACE`,
//! failing clearly when the range is taken), so state holding pointers into itself is valid
//! without fixing up.
//!
//! **VRAM and peers.** VRAM regions are staged through host memory with the CUDA driver loaded
//! at run time, and restored at their recorded device addresses with the VMM API (see
//! [`vram`]). A checkpoint held in a peer's registered memory ([`serve()`], `nixl-ckpt serve`) is
//! restored from `nixl://HOST:PORT` over `tcp` with one-sided READs, every chunk verified.
//!
//! ```no_run
//! use nixl_checkpoint::{restore_mapped, save, Placement, Region, SaveOptions};
//! use nixl_core::{Agent, DescList, Desc, MemKind};
//! let agent = Agent::builder("worker")
//!     .backends(nixl_transports::default_backends())
//!     .build()?;
//! let mut weights = vec![7u8; 1 << 20];
//! let desc = Desc::from_mut_slice(&mut weights);
//! // SAFETY: `weights` outlives the registration and is not touched while it is registered.
//! let _reg = unsafe { agent.register(&DescList::from_descs(MemKind::Dram, vec![desc])?) }?;
//! let regions = [Region::dram("weights", desc.addr, desc.len)];
//! // SAFETY: the region is readable for the whole call.
//! unsafe { save(&agent, "/tmp/ckpt", &regions, &SaveOptions::default()) }?;
//! // Later, in a fresh process: memory mapped by the library, every byte verified.
//! let restored = restore_mapped(&agent, "/tmp/ckpt", None, Placement::Anywhere)?;
//! assert_eq!(restored.regions()[0].len, 1 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod artifact;
pub mod daemon;
mod dir;
mod error;
mod fetch;
mod files;
mod manage;
pub mod manifest;
mod mapped;
pub mod ops;
mod restore;
mod s3;
pub mod serve;
pub mod vram;

pub use artifact::{restore_artifact, restore_artifact_with, ArtifactReport};
pub use dir::{
    read_manifest_with, restore, save, Progress, Region, RestoreOptions, SaveOptions, SaveReport,
};
pub use error::{CkptError, Result};
pub use manage::{copy_with, copy_with_buffer, remove_with, remove_with_opts, COPY_BUFFER};
pub use manifest::Manifest;
pub use mapped::{restore_mapped, Placement, Restored, RestoredRegion};
pub use ops::{
    dependents, read_manifest, remove, remove_opts, verify, Location, RemoveOptions, VerifyReport,
};
pub use serve::{serve, serve_named, Served};
