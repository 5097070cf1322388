//! nixl-core: the transfer core of nixl-rs.
//!
//! Memory of any kind is registered once with an [`Agent`], described by [`DescList`]s, and
//! moved by one-sided READ/WRITE [`XferRequest`]s through whichever [`Backend`] fits both sides.
//! The core knows no concrete backend: the `nixl-transports` crate provides them.
//!
//! ```
//! use nixl_core::{Agent, DescList, Desc, MemKind};
//! let agent = Agent::builder("doc").build().unwrap();
//! let list = DescList::from_descs(MemKind::Dram, vec![Desc::new(0x1000, 64, 0)]).unwrap();
//! // No backend registers DRAM in a bare agent: the error says so.
//! // SAFETY: nothing gets registered (and the address is never touched).
//! assert!(unsafe { agent.register(&list) }.is_err());
//! ```
//!
//! # Map
//!
//! ```text
//! lib.rs              this map; the public API's re-exports
//! agent/mod.rs        Agent and the state its parts share; liveness, shutdown
//! agent/build.rs        AgentBuilder: starting the backends; which run, and why others do not
//! agent/random.rs       keys and ids from the OS random generator
//! agent/register.rs     registering and deregistering memory; Registration
//! agent/peers.rs        this agent's metadata; loading, merging, forgetting peers'; connections
//! agent/create.rs       creating requests: resolving descriptors, choosing the backend or staging
//! agent/prepped.rs      prepared descriptor lists, and requests made from them by index
//! agent/notif.rs        standalone notifications
//! agent/tests.rs        the agent's unit tests
//! backend.rs          the backend contract: Backend, Connection, plans, notifications' target
//! codec.rs            bounds-checked decoding of untrusted bytes (metadata, wire formats); hex
//! log.rs              init_logging_from_env for the C and Python embeddings (feature log-init)
//! error.rs            Error, its classes, Unusable, Rejections
//! mem.rs              memory kinds and descriptors
//! metadata.rs         agent metadata and its wire format
//! region.rs           registered regions and the access gates transfers hold
//! staging.rs          the staged path: host buffer, chunk cutting, the pipelined posts
//! xfer.rs             transfer requests, their posts and completions, telemetry, the watchdog
//! ```

mod agent;
pub mod backend;
pub mod codec;
#[cfg(feature = "log-init")]
mod log;
#[cfg(feature = "log-init")]
pub use log::init_logging_from_env;
mod error;
pub mod mem;
pub mod metadata;
pub mod region;
pub mod staging;
pub mod xfer;

pub use agent::{
    random_u64, Agent, AgentBuilder, BackendState, PreppedList, Registration, XferOptions,
};
pub use backend::{
    Backend, BackendName, Caps, Connection, Locality, NotifRefused, Notification, PeerInfo,
    PreparedXfer, Registered, Run, Runs, Segment, TargetHandle, XferPlan,
    DEFAULT_NOTIF_QUEUE_BYTES, MAX_NOTIF_BYTES,
};
pub use error::{Error, ErrorClass, Rejections, Result, Unusable};
pub use mem::{Desc, DescList, MemKind, Strided, MAX_STRIDED_COUNT};
pub use metadata::{AgentMetadata, DecodeError};
pub use region::{AccessDenied, Region, RegionAccess};
pub use staging::{HostBuffer, Stager};
pub use xfer::{Choice, Completion, XferInfo, XferOp, XferRequest, XferStatus};
