//! nixl-rs backends.
//!
//! - [`local`]: copies inside one process (one agent to itself, or two agents in one process).
//! - [`shm`]: between processes on one node: cross-memory attach for memory allocated any way,
//!   and direct copies through memfd mappings for memory from [`shm::ShmBuffer`].
//! - [`tcp`]: between hosts: authenticated connections, the target checks every access.
//! - [`posix`]: DRAM ↔ FILE with `preadv`/`pwritev` on a thread pool.
//! - [`uring`]: DRAM ↔ FILE through io_uring, the ring kept full.
//! - [`object`]: DRAM ↔ OBJECT in S3-compatible object stores (ranged GETs, PUT and multipart).
//! - [`cuda`]: VRAM (CUDA driver loaded at run time): registration of cudaMalloc and VMM memory,
//!   CUDA IPC and VMM fd handles between processes of one node, batched device copies, staging.
//! - [`gds`]: VRAM ↔ FILE with GPUDirect Storage (cuFile loaded at run time).
//! - [`rdma`]: between hosts over RDMA verbs (libibverbs loaded at run time): one-sided READ/WRITE
//!   striped over the NICs nearest the memory and several queue pairs each, with failover.
//! - [`control`]: the control channel between agents (served by the `tcp` listener) that `rdma`
//!   and cross-node `cuda` use to set up queue pairs, announce imports and revoke them.
//!
//! [`config::Config`] reads the agent's TOML configuration and builds the backends it names.
//!
//! The public API is what a user needs: each backend with its config struct, [`config::Config`]
//! and [`default_backends`], [`shm::ShmBuffer`], the `tcp` functions that fetch and push
//! metadata with their [`tcp::Auth`], the control channel traits the `rdma` and `cuda` backends
//! take, [`units::parse_size`] and [`files::inspect_fd`]. Wire formats, socket plumbing, the frame
//! codec, planning and the copy pool are `pub(crate)`; the hidden `fuzzing` module re-exports
//! what the fuzz targets and the integration tests reach of them (not a stable API).
//!
//! # Map
//!
//! Each backend's whole story is in the file or folder named after it (`src/`):
//!
//! ```text
//! lib.rs              this map; default_backends()
//! config.rs           the TOML configuration: every backend's settings, building the backends
//! control.rs          the control channel between agents (rdma, cross-node cuda)
//! frame.rs            the length-prefixed frame codec of the shm and tcp wire formats
//! fuzzing.rs          hidden: what fuzz/ and the tests reach inside (wire formats, raw links)
//! limits.rs           process limits (locked memory, open files) with the fix in the error text
//! units.rs            parse_size: sizes as written in files and on command lines
//! unix.rs             Unix-socket plumbing (fd passing, peer credentials) for shm and cuda
//! owner.rs            the owner's socket of shm and cuda: accept, admit, who imported what, revoke
//! copy/mod.rs         CPU copy kernels (memcpy, streaming stores, the 4K-aliasing loop)
//! copy/pool.rs        the copy thread pool that runs big copies in pieces (local, shm)
//! files/mod.rs        the file backends' shared layer (posix, uring, gds)
//! files/backend.rs      FileBackend<E>: the agent-facing skeleton, generic over its engine
//! files/fd.rs           fd checks: open, how, O_DIRECT alignment, block device size
//! files/ops.rs          a request cut into I/O operations, and one post of them
//! files/workers.rs      the worker pool of the engines that block per operation
//! local.rs            `local`: copies inside one process
//! posix.rs            `posix`: the engine, preadv/pwritev on worker threads
//! uring/mod.rs        `uring`: the engine, DRAM <-> FILE through io_uring
//! uring/ring.rs         the ring: slots, submission, the completion thread
//! uring/fixed.rs        the fixed-file and registered-buffer tables
//! gds/mod.rs          `gds`: the engine, VRAM <-> FILE through cuFile
//! gds/cufile.rs         libcufile, loaded at run time
//! shm/mod.rs          `shm`: between processes of one node: the backend, what it publishes
//! shm/config.rs         ShmConfig, the [shm] section
//! shm/serve.rs          the target's side: Ops carried out, mappings granted and revoked
//! shm/split.rs          big cross-memory copies cut over the copy pool
//! shm/grants.rs         cross-memory grant tables (both sides)
//! shm/conn.rs           the initiator's connection, its reader thread, mappings and grants
//! shm/xfer.rs           the initiator's prepared transfers (granted, round trip, mapped)
//! shm/buffer.rs         ShmBuffer, memfd-backed host memory a peer may map
//! shm/sys.rs            the syscalls (process_vm_readv/writev, mmap, memfd)
//! shm/wire.rs           the frames on its Unix socket
//! tcp/mod.rs          `tcp`: between hosts: how it works, what it exports
//! tcp/config.rs         TcpConfig, the [tcp] section; parse_listen
//! tcp/backend.rs        TcpBackend: the Backend trait (start, connect, peer_idle, shutdown)
//! tcp/control.rs        the control channel through the listener (TcpControl), the ping service
//! tcp/conn_info.rs      what the listener publishes: its addresses
//! tcp/metadata.rs       fetch, push and drop metadata at a peer's listener
//! tcp/raw.rs            hidden: raw connections past the handshake, for tests and fuzzers
//! tcp/auth.rs           the handshake before any frame
//! tcp/identity.rs       who the other end proved to be
//! tcp/user_secret.rs    the per-user default secret
//! tcp/tls.rs            TLS 1.3 for agents with a secret
//! tcp/link.rs           one connection's byte stream (plain or TLS)
//! tcp/net.rs            addresses, connecting, socket options, frame reads and writes
//! tcp/wire.rs           the frames
//! tcp/client.rs         the initiator: its connections, prepared transfers, notifications
//! tcp/client_plan.rs    a post's plan: chunks and their span frames
//! tcp/client_post.rs    one post on a session, and how it ends
//! tcp/client_session.rs the lanes of a session: job queues, sends, answers (READ and WRITE)
//! tcp/client_setup.rs   opening a connection; the metadata and control calls
//! tcp/server.rs         the target: listener, admission, peer_idle bookkeeping
//! tcp/server_conn.rs    one accepted connection: handshake, OPEN, its frame reader
//! tcp/server_control.rs metadata (fetch, push, drop) and control frames
//! tcp/server_worker.rs  a data connection's frames: WRITE, READ, NOTIF served
//! object/mod.rs       `object`: DRAM <-> OBJECT in S3-compatible stores: the backend
//! object/config.rs      ObjectConfig (the [object] section), ObjectName
//! object/conn.rs        a request cut into ranged GETs and objects to write
//! object/post.rs        a post in progress and its reads
//! object/upload.rs      writes: single PUT or multipart upload
//! object/s3/mod.rs      the small S3 client (HTTP/1.1, SigV4, TLS)
//! cuda/mod.rs         `cuda`: the backend
//! cuda/config.rs        CudaConfig, the [cuda] section
//! cuda/register.rs      registering device memory, the completion thread, socket grants
//! cuda/remote.rs        peers on other nodes: fabric domains, announcements, revocations
//! cuda/conn.rs          a connection to a peer: resolving, planning and posting transfers
//! cuda/driver/mod.rs    the CUDA driver API, loaded at run time (the unsafe bottom): the probe
//! cuda/driver/sys.rs      types, constants, C structs, the entry-point tables
//! cuda/driver/ctx.rs      a device's primary context; the one teardown path of its handles
//! cuda/driver/stream.rs   streams, copies, events
//! cuda/driver/mem.rs      pinned host memory, imports, VMM and legacy allocations
//! cuda/driver/gather.rs   the gather kernel
//! cuda/alloc.rs         device buffers (VMM, legacy) for tests and benches
//! cuda/copy.rs          the batched copy planner and executor (gather kernel: gather.ptx)
//! cuda/handles/mod.rs   what cuda publishes: devices, NVLink domains, region handles
//! cuda/handles/ctl.rs     the cross-node control messages
//! cuda/handles/plan.rs    cutting a registered range into exportable chunks
//! cuda/ipc/mod.rs       the owner socket's wire format
//! cuda/ipc/server.rs      the owner's side: grants, imports recorded, revocation
//! cuda/ipc/client.rs      the importer's side: a connection with its reader thread
//! cuda/ipc/imports.rs     the cache of imported peer regions
//! cuda/staging.rs       the stager of the agent's staged path (pinned buffers)
//! cuda/dmabuf.rs        device memory as a dmabuf (for rdma)
//! cuda/nvml.rs          NVML, for a GPU's NVLink domain
//! rdma/mod.rs         `rdma`: opened NICs, lane QPs, the backend's state after start
//! rdma/config.rs        RdmaConfig, the [rdma] section; PollPolicy
//! rdma/backend.rs       the Backend trait (probe, start, register, connect) and control service
//! rdma/conn.rs          the initiator: a connection to a peer with its lanes
//! rdma/post.rs          a prepared transfer and its post state machine
//! rdma/served.rs        the target: served lanes, reachable regions
//! rdma/verbs/mod.rs     the verbs binding, loaded at run time
//! rdma/verbs/sys.rs       the raw layer: constants, repr(C) structs, entry-point types
//! rdma/verbs/objects.rs   context, PD, MR, owned buffers, CQ
//! rdma/verbs/qp.rs        queue pairs and posting
//! rdma/wire.rs          connection info and control messages
//! rdma/plan.rs          slicing, striping, completions, failover (pure logic)
//! rdma/slab.rs          the wr_id -> completion owner table
//! rdma/notif.rs         exactly-once notifications over several lanes
//! rdma/topo.rs          NIC discovery and choice by topology (sysfs)
//! rdma/place.rs         where memory lives, which NICs are nearest
//! rdma/dmabuf.rs        VRAM registration through dmabuf
//! ```
//!
//! The other crates: `nixl-core` (agent, descriptors, policy, staged path), `nixl-discovery`
//! (etcd), `nixl-agent` (daemon, demo), `nixl-ffi` (C ABI), `nixl` (Python), `nixl-kv`,
//! `nixl-weight-streamer`, `nixl-checkpoint`, `nixl-benches`, `nixl-tests` (multi-process test
//! helpers) and `nixl-testkit` (`require!`, the test byte pattern).

#![warn(unreachable_pub)]
pub mod config;
pub mod control;
mod copy;
pub mod cuda;
pub mod files;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod gds;
mod limits;
pub mod local;
pub mod object;
mod owner;
pub mod posix;
pub mod rdma;
pub mod shm;
pub mod tcp;
pub mod units;
mod unix;
/// Unix-socket plumbing the agent's pool socket shares with `shm` and `cuda`: descriptors
/// passed with SCM_RIGHTS and the peer's credentials. Not a stable API.
#[doc(hidden)]
pub mod unix_socket {
    pub use crate::unix::{peer_cred, recv_with_fds, send_with_fd};
}
pub mod uring;

use std::sync::Arc;

use nixl_core::Backend;

/// Every backend this crate builds, with default settings: what an agent that wants "whatever
/// works here" is built with. Backends that cannot run on this host report why through
/// [`nixl_core::Agent::backends`] and are never chosen.
///
/// `object` runs only when an object store is configured (`AWS_*` environment variables here);
/// otherwise it reports itself unavailable and costs nothing. `cuda`, `gds` and `rdma` load
/// their libraries at run time and report `unavailable: <reason>` on a host without a GPU,
/// cuFile or an RDMA device.
///
/// `tcp` listens on the host's first non-loopback address with a free port and, without
/// `NIXL_SECRET` in the environment, accepts only agents of this user on this host (proved by the
/// user's secret file, see [`tcp::Auth`]).
pub fn default_backends() -> Vec<Arc<dyn Backend>> {
    config::Config::default()
        .backends()
        .expect("the default configuration is valid")
}
