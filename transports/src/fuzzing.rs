//! What the fuzz targets (`fuzz/`) and this crate's integration tests reach inside the crate:
//! wire formats, raw connections that speak them, an in-process control channel. Not a stable
//! API: it changes with the wire formats.

/// `shm`: the frames on the owner's Unix socket.
pub mod shm_wire {
    pub use crate::shm::wire::{Frame, Framer};
}

/// `tcp`: the frames after the handshake, and the listener's admission check.
pub mod tcp_wire {
    pub use crate::tcp::wire::{
        decode_ctrl, decode_ctrl_re, decode_md, decode_md_drop, decode_notif, decode_open,
        decode_opened, decode_reply, decode_spans, decode_xfer, finish, frame_limit, notif, open,
        opened, purpose_limit, put_span, span_head, Purpose, ACK, DATA, MAX_CHUNK, MAX_FRAME,
        MAX_NOTIF, MAX_PIECES, MAX_SPANS, SPAN_READ,
    };
}

// tcp: connections that skip the backend, to send a listener what a liar or a fuzzer would.
pub use crate::tcp::{
    conn_info_for, push_metadata_as, raw_data_connection, raw_listener_opening, RawConnection,
};

// The control channel: an in-process one, for tests of the backends' control logic.
pub use crate::control::Loopback;

// cuda, rdma

/// `cuda`: what a peer publishes (region data, connection info), the control messages, and the
/// frames on the owner's Unix socket.
pub mod cuda_wire {
    pub use crate::cuda::handles::ctl::Ctl;
    pub use crate::cuda::handles::{ConnInfo, RegionPublic};
    pub use crate::cuda::ipc::Frame;
}

/// `cuda`: the local devices and their NVLink domains as NVML reports them.
pub mod cuda_nvml {
    pub use crate::cuda::nvml::{cuda_device_uuids, nvml, Nvml};
}

/// `rdma`: connection info, region keys and the queue-pair handshake.
pub mod rdma_wire {
    pub use crate::rdma::wire::{ConnInfo, Msg, RegionKeys};
}

/// `rdma`: the verbs declarations, to be checked against `<infiniband/verbs.h>`.
pub mod rdma_verbs {
    pub use crate::rdma::verbs::sys::{constants, layout, GROWN_STRUCTS};
}
