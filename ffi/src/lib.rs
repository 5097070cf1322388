//! The C ABI of nixl-rs: `libnixl.so`, `libnixl.a` and the header `include/nixl.h`.
//!
//! Engines written in C, C++ or Python (through ctypes/cffi) drive an agent through these
//! functions: create it, register memory, exchange metadata, create and post transfers, poll
//! them, and send and receive notifications, with the same backends as a Rust program.
//!
//! The names, signatures and status codes of the contract (issue 4) are fixed; see
//! `ffi/README.md` for the conventions (ownership, outputs, errors, threads). The header is
//! generated from this file by cbindgen (`NIXL_BLESS=1 cargo test -p nixl-ffi --test header`
//! rewrites it; the test fails when it is out of date).
//!
//! Every export catches panics (returning [`NIXL_ERR_PANIC`]), checks every pointer it is given
//! for NULL and alignment, and writes its outputs only on success.

#![allow(non_camel_case_types)]

// The exports, by what they serve. cbindgen writes them to the header in this order.
mod agent;
pub use agent::*;
mod metadata;
pub use metadata::*;
mod xfer;
pub use xfer::*;
mod notif;
pub use notif::*;
mod info;
pub use info::*;
// What the exports share.
mod args;
use args::*;
mod errors;
use errors::*;
mod handles;
use handles::*;

mod ckpt;
pub use ckpt::{nixl_ckpt_region, nixl_ckpt_restore, nixl_ckpt_save};
mod kv;
pub use kv::{
    nixl_kv_decode, nixl_kv_decode_add_prefill, nixl_kv_decode_cancel, nixl_kv_decode_free,
    nixl_kv_decode_new, nixl_kv_decode_poll, nixl_kv_descs, nixl_kv_event, nixl_kv_layout,
    nixl_kv_layout_decode, nixl_kv_layout_encode, nixl_kv_layout_validate, nixl_kv_offer,
    nixl_kv_prefill, nixl_kv_prefill_cancel, nixl_kv_prefill_free, nixl_kv_prefill_held,
    nixl_kv_prefill_new, nixl_kv_prefill_poll, nixl_kv_pull, nixl_kv_renew,
    NIXL_KV_BLOCK_FIRST_HND, NIXL_KV_BLOCK_FIRST_NHD, NIXL_KV_CANCELLED, NIXL_KV_DONE,
    NIXL_KV_ENDED, NIXL_KV_FAILED, NIXL_KV_FREED, NIXL_KV_LAYER_FIRST_HND, NIXL_KV_LAYER_FIRST_NHD,
    NIXL_KV_LAYOUT_BYTES, NIXL_KV_MAX_BLOCKS, NIXL_KV_MLA, NIXL_KV_OFFERED, NIXL_KV_SPLIT,
};
mod weights;
pub use weights::{
    nixl_weights, nixl_weights_close, nixl_weights_model_id, nixl_weights_open,
    nixl_weights_pull_tensor, nixl_weights_tensor_count, nixl_weights_tensor_info,
    nixl_weights_tensor_name, NIXL_WEIGHTS_MAX_DIMS,
};

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentMetadata, BackendName, Desc, DescList, Error, ErrorClass, MemKind, Notification,
    XferOp, XferOptions, XferRequest, XferStatus,
};
use nixl_transports::config::Config;
use nixl_transports::tcp::{fetch_metadata, Auth};
use parking_lot::Mutex;

/// The result of every call: `NIXL_OK`, `NIXL_IN_PROGRESS`, `NIXL_EMPTY`, or a negative error.
pub type nixl_status = i32;

/// Success.
pub const NIXL_OK: nixl_status = 0;
/// The transfer is still moving bytes.
pub const NIXL_IN_PROGRESS: nixl_status = 1;
/// Nothing to return (no notification waiting).
pub const NIXL_EMPTY: nixl_status = 2;
/// A bad argument or malformed input (NULL pointer, bad descriptor, garbage metadata, a
/// request posted while still in flight).
pub const NIXL_ERR_INVALID: nixl_status = -1;
/// An unknown agent, region or backend.
pub const NIXL_ERR_NOT_FOUND: nixl_status = -2;
/// The backend failed (I/O error, protocol error).
pub const NIXL_ERR_BACKEND: nixl_status = -3;
/// The peer went away.
pub const NIXL_ERR_REMOTE_DISCONNECT: nixl_status = -4;
/// Cancelled by the caller or by the agent shutting down.
pub const NIXL_ERR_CANCELLED: nixl_status = -5;
/// No progress within the timeout.
pub const NIXL_ERR_TIMEOUT: nixl_status = -6;
/// The backend cannot run on this host (the reason is in `nixl_last_error`).
pub const NIXL_ERR_UNAVAILABLE: nixl_status = -7;
/// Refused: authentication, region key or bounds.
pub const NIXL_ERR_DENIED: nixl_status = -8;
/// An output buffer is too small; nothing was written or taken.
pub const NIXL_ERR_BUFFER_TOO_SMALL: nixl_status = -9;
/// A bug in the library: the call was aborted safely.
pub const NIXL_ERR_PANIC: nixl_status = -100;

/// Host memory: descriptors are (address, length, 0).
pub const NIXL_DRAM: i32 = 0;
/// GPU memory: descriptors are (device address, length, GPU ordinal).
pub const NIXL_VRAM: i32 = 1;
/// A block device: descriptors are (offset, length, volume id).
pub const NIXL_BLOCK: i32 = 2;
/// An object store: descriptors are (offset, length, object id).
pub const NIXL_OBJECT: i32 = 3;
/// A file: descriptors are (offset, length, fd), the fd opened and kept open by the caller.
pub const NIXL_FILE: i32 = 4;

/// `nixl_register_file`: open with `O_DIRECT` (transfers must then be aligned as the file
/// system requires; a misaligned one is refused at creation, naming the descriptor).
pub const NIXL_FILE_DIRECT: u32 = 1;
/// `nixl_register_file`: open read-only (WRITE requests into it are refused).
pub const NIXL_FILE_READ_ONLY: u32 = 2;
/// `nixl_register_file`: create the file if it does not exist.
pub const NIXL_FILE_CREATE: u32 = 4;

/// Remote to local.
pub const NIXL_READ: i32 = 0;
/// Local to remote.
pub const NIXL_WRITE: i32 = 1;

/// One contiguous piece of memory, file or object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct nixl_desc {
    /// Address (DRAM, VRAM) or byte offset (FILE, BLOCK, OBJECT).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// 0 for DRAM, the GPU ordinal for VRAM, the fd for FILE, the id for BLOCK and OBJECT.
    pub dev_id: u64,
}

const AGENT_MAGIC: u64 = 0x6e69_786c_6167_6e74; // "nixlagnt"
const XFER_MAGIC: u64 = 0x6e69_786c_7866_6572; // "nixlxfer"
const DEAD_MAGIC: u64 = 0xdead_dead_dead_dead;

/// An agent (opaque). Create with `nixl_agent_new`, free with `nixl_agent_free`.
#[derive(Debug)]
pub struct nixl_agent {
    _opaque: [u8; 0],
}

/// A transfer request (opaque): created once, posted many times. It keeps what it needs of its
/// agent alive, so it may outlive `nixl_agent_free` of its agent.
#[derive(Debug)]
pub struct nixl_xfer {
    _opaque: [u8; 0],
}

/// What a `nixl_agent *` points to. The tag says the type in a debugger; calls find out
/// whether a pointer is a live handle of theirs from [`LIVE`], without reading it.
#[repr(C)]
struct AgentHandle {
    magic: u64,
    shared: Arc<Shared>,
}

/// What a `nixl_xfer *` points to.
#[repr(C)]
struct XferHandle {
    magic: u64,
    req: XferRequest,
    _agent: Arc<Shared>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nixl_agent")
            .field("name", &self.shared.agent.name())
            .finish()
    }
}

impl std::fmt::Debug for XferHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nixl_xfer").field("req", &self.req).finish()
    }
}

/// What an agent handle and its requests share.
struct Shared {
    /// Shared with the weight sources opened on it (`nixl_weights_open`).
    agent: Arc<Agent>,
    /// Notifications taken from the agent and not yet handed out by `nixl_notif_next`.
    notifs: Mutex<VecDeque<Notification>>,
    auth: Auth,
    /// Files the agent opened for `nixl_register_file`, by fd; closed on deregistration (and
    /// when the agent goes, after its backends stopped).
    files: Mutex<HashMap<u64, OwnedFd>>,
    /// KV sides open on the agent (`nixl_kv_prefill_new`, `nixl_kv_decode_new`): while any is,
    /// `nixl_notif_next` sets KV messages aside in `kv_pending` for them.
    kv_sides: std::sync::atomic::AtomicUsize,
    /// KV messages `nixl_notif_next` took from the agent, for the KV sides' next poll.
    kv_pending: Mutex<VecDeque<Notification>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let name = self.agent.name().to_owned();
        self.agent.shutdown();
        let mut names = NAMES.lock();
        if let Some(n) = names.get_mut(&name) {
            *n -= 1;
            if *n == 0 {
                names.remove(&name);
            }
        }
    }
}

/// Live agent names of this process and how many agents hold each.
static NAMES: std::sync::LazyLock<Mutex<HashMap<String, usize>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

#[cfg(test)]
mod tests;
