//! A minimal verbs binding, loaded at run time, and a thin safe layer over it.
//!
//! Every `unsafe` of the `rdma` backend but one lives in this file (the other is the
//! registration of agent memory in `mod.rs`, whose contract is the agent's). The raw layer
//! is hand-written `repr(C)` structs for exactly the fields the backend uses, checked against
//! `<infiniband/verbs.h>` by the `verbs_layout` test (a C program prints `sizeof`/`offsetof`
//! of each and the test compares them with [`layout`]). Structs the backend only reads through
//! pointers that libibverbs hands out (`ibv_context`, `ibv_cq`, `ibv_qp`) are declared as
//! their leading fields only; structs the backend allocates and passes in are complete.
//!
//! The data path (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`) is `static inline` in
//! verbs.h: it is called here through `context->ops`, exactly as the inline functions do.
//!
//! The safe layer follows the ownership of the verbs objects: each child holds an `Arc` of its
//! parent's inner struct ([`Mr`] and [`Qp`] hold the [`Pd`], the [`Pd`] and [`Cq`] hold the
//! [`Context`], a [`Qp`] holds its [`Cq`]), so teardown runs in dependency order whatever the
//! order of the last drops. `Drop` never panics: a failing destroy is logged and counted.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt;
use std::sync::Arc;

use libloading::Library;

/// The library name loaded by [`Verbs::load`].
pub const LIBIBVERBS: &str = "libibverbs.so.1";

// ---------------------------------------------------------------------------------------------
// Raw layer: constants.
// ---------------------------------------------------------------------------------------------

/// `IBV_ACCESS_LOCAL_WRITE`.
pub const ACCESS_LOCAL_WRITE: c_int = 1;
/// `IBV_ACCESS_REMOTE_WRITE`.
pub const ACCESS_REMOTE_WRITE: c_int = 1 << 1;
/// `IBV_ACCESS_REMOTE_READ`.
pub const ACCESS_REMOTE_READ: c_int = 1 << 2;

/// `IBV_QPT_RC`.
pub const QPT_RC: c_uint = 2;
/// `IBV_QPS_RESET` .. `IBV_QPS_ERR`.
pub const QPS_INIT: c_uint = 1;
/// `IBV_QPS_RTR`.
pub const QPS_RTR: c_uint = 2;
/// `IBV_QPS_RTS`.
pub const QPS_RTS: c_uint = 3;
/// `IBV_QPS_ERR`.
pub const QPS_ERR: c_uint = 6;

/// `ibv_qp_attr_mask` bits.
pub mod qp_mask {
    use std::ffi::c_int;
    /// `IBV_QP_STATE`.
    pub const STATE: c_int = 1;
    /// `IBV_QP_ACCESS_FLAGS`.
    pub const ACCESS_FLAGS: c_int = 1 << 3;
    /// `IBV_QP_PKEY_INDEX`.
    pub const PKEY_INDEX: c_int = 1 << 4;
    /// `IBV_QP_PORT`.
    pub const PORT: c_int = 1 << 5;
    /// `IBV_QP_AV`.
    pub const AV: c_int = 1 << 7;
    /// `IBV_QP_PATH_MTU`.
    pub const PATH_MTU: c_int = 1 << 8;
    /// `IBV_QP_TIMEOUT`.
    pub const TIMEOUT: c_int = 1 << 9;
    /// `IBV_QP_RETRY_CNT`.
    pub const RETRY_CNT: c_int = 1 << 10;
    /// `IBV_QP_RNR_RETRY`.
    pub const RNR_RETRY: c_int = 1 << 11;
    /// `IBV_QP_RQ_PSN`.
    pub const RQ_PSN: c_int = 1 << 12;
    /// `IBV_QP_MAX_QP_RD_ATOMIC`.
    pub const MAX_QP_RD_ATOMIC: c_int = 1 << 13;
    /// `IBV_QP_MIN_RNR_TIMER`.
    pub const MIN_RNR_TIMER: c_int = 1 << 15;
    /// `IBV_QP_SQ_PSN`.
    pub const SQ_PSN: c_int = 1 << 16;
    /// `IBV_QP_MAX_DEST_RD_ATOMIC`.
    pub const MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
    /// `IBV_QP_DEST_QPN`.
    pub const DEST_QPN: c_int = 1 << 20;
}

/// `IBV_WR_RDMA_WRITE`.
pub const WR_RDMA_WRITE: c_uint = 0;
/// `IBV_WR_SEND`.
pub const WR_SEND: c_uint = 2;
/// `IBV_WR_RDMA_READ`.
pub const WR_RDMA_READ: c_uint = 4;
/// `IBV_SEND_SIGNALED`.
pub const SEND_SIGNALED: c_uint = 1 << 1;

/// `IBV_WC_SUCCESS`.
pub const WC_SUCCESS: c_uint = 0;
/// `IBV_WC_WR_FLUSH_ERR`.
pub const WC_WR_FLUSH_ERR: c_uint = 5;
/// `IBV_WC_REM_ACCESS_ERR`.
pub const WC_REM_ACCESS_ERR: c_uint = 10;
/// `IBV_WC_RETRY_EXC_ERR`.
pub const WC_RETRY_EXC_ERR: c_uint = 12;
/// `IBV_WC_RNR_RETRY_EXC_ERR`.
pub const WC_RNR_RETRY_EXC_ERR: c_uint = 13;
/// `IBV_WC_RECV`.
pub const WC_RECV: c_uint = 128;

/// `IBV_PORT_ACTIVE`.
pub const PORT_ACTIVE: c_uint = 4;
/// `IBV_LINK_LAYER_INFINIBAND`.
pub const LINK_LAYER_INFINIBAND: u8 = 1;
/// `IBV_LINK_LAYER_ETHERNET`.
pub const LINK_LAYER_ETHERNET: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Raw layer: structs.
// ---------------------------------------------------------------------------------------------

/// `struct ibv_device` (opaque).
#[repr(C)]
#[derive(Debug)]
pub struct IbvDevice {
    _opaque: [u8; 0],
}

/// `struct ibv_context_ops`: 32 function pointers; the data path uses three of them.
#[repr(C)]
#[derive(Debug)]
pub struct IbvContextOps {
    _before_poll_cq: [*const c_void; 11],
    /// `poll_cq`.
    pub poll_cq: Option<unsafe extern "C" fn(*mut IbvCq, c_int, *mut IbvWc) -> c_int>,
    _before_post_send: [*const c_void; 13],
    /// `post_send`.
    pub post_send:
        Option<unsafe extern "C" fn(*mut IbvQp, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int>,
    /// `post_recv`.
    pub post_recv:
        Option<unsafe extern "C" fn(*mut IbvQp, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int>,
    _after_post_recv: [*const c_void; 5],
}

/// `struct ibv_context` (leading fields only; never allocated here).
#[repr(C)]
#[derive(Debug)]
pub struct IbvContext {
    /// `device`.
    pub device: *mut IbvDevice,
    /// `ops`.
    pub ops: IbvContextOps,
    /// `cmd_fd`.
    pub cmd_fd: c_int,
}

/// `struct ibv_device_attr` (complete).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IbvDeviceAttr {
    /// `fw_ver`.
    pub fw_ver: [c_char; 64],
    /// `node_guid` (big-endian).
    pub node_guid: u64,
    /// `sys_image_guid`.
    pub sys_image_guid: u64,
    /// `max_mr_size`.
    pub max_mr_size: u64,
    /// `page_size_cap`.
    pub page_size_cap: u64,
    /// `vendor_id`.
    pub vendor_id: u32,
    /// `vendor_part_id`.
    pub vendor_part_id: u32,
    /// `hw_ver`.
    pub hw_ver: u32,
    /// `max_qp`.
    pub max_qp: c_int,
    /// `max_qp_wr`.
    pub max_qp_wr: c_int,
    /// `device_cap_flags`.
    pub device_cap_flags: c_uint,
    /// `max_sge`.
    pub max_sge: c_int,
    /// `max_sge_rd`.
    pub max_sge_rd: c_int,
    /// `max_cq`.
    pub max_cq: c_int,
    /// `max_cqe`.
    pub max_cqe: c_int,
    /// `max_mr` .. `max_ee_rd_atom` and others up to `max_qp_rd_atom`.
    pub max_mr: c_int,
    /// `max_pd`.
    pub max_pd: c_int,
    /// `max_qp_rd_atom`.
    pub max_qp_rd_atom: c_int,
    _max_ee_rd_atom: c_int,
    _max_res_rd_atom: c_int,
    /// `max_qp_init_rd_atom`.
    pub max_qp_init_rd_atom: c_int,
    _rest: [c_int; 16],
    /// `max_pkeys`.
    pub max_pkeys: u16,
    /// `local_ca_ack_delay`.
    pub local_ca_ack_delay: u8,
    /// `phys_port_cnt`.
    pub phys_port_cnt: u8,
}

/// `struct ibv_port_attr` as of rdma-core 47 (with `active_speed_ex`); the exported
/// `ibv_query_port` fills its compat prefix. Older verbs.h declare a shorter struct: the layout
/// check accepts a Rust struct at least as large, with every shared field at the same offset.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvPortAttr {
    /// `state`.
    pub state: c_uint,
    /// `max_mtu`.
    pub max_mtu: c_uint,
    /// `active_mtu`.
    pub active_mtu: c_uint,
    /// `gid_tbl_len`.
    pub gid_tbl_len: c_int,
    /// `port_cap_flags`.
    pub port_cap_flags: u32,
    /// `max_msg_sz`.
    pub max_msg_sz: u32,
    _bad_pkey_cntr: u32,
    _qkey_viol_cntr: u32,
    _pkey_tbl_len: u16,
    /// `lid`.
    pub lid: u16,
    /// `sm_lid`.
    pub sm_lid: u16,
    _lmc: u8,
    _max_vl_num: u8,
    _sm_sl: u8,
    _subnet_timeout: u8,
    _init_type_reply: u8,
    /// `active_width`.
    pub active_width: u8,
    /// `active_speed`.
    pub active_speed: u8,
    /// `phys_state`.
    pub phys_state: u8,
    /// `link_layer`.
    pub link_layer: u8,
    _flags: u8,
    _port_cap_flags2: u16,
    /// `active_speed_ex` (rdma-core 47+, DOCA/MLNX-OFED: speeds past what `active_speed` can
    /// name). The exported `ibv_query_port` fills only the compat prefix, so it reads 0 here;
    /// it is declared so that this struct is at least as large as any verbs.h's.
    pub active_speed_ex: u32,
}

/// `union ibv_gid`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct IbvGid {
    /// `raw`.
    pub raw: [u8; 16],
}

/// `struct ibv_pd`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvPd {
    /// `context`.
    pub context: *mut IbvContext,
    /// `handle`.
    pub handle: u32,
}

/// `struct ibv_mr`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvMr {
    /// `context`.
    pub context: *mut IbvContext,
    /// `pd`.
    pub pd: *mut IbvPd,
    /// `addr`.
    pub addr: *mut c_void,
    /// `length`.
    pub length: usize,
    /// `handle`.
    pub handle: u32,
    /// `lkey`.
    pub lkey: u32,
    /// `rkey`.
    pub rkey: u32,
}

/// `struct ibv_cq` (leading fields only).
#[repr(C)]
#[derive(Debug)]
pub struct IbvCq {
    /// `context`.
    pub context: *mut IbvContext,
}

/// `struct ibv_qp` (leading fields only).
#[repr(C)]
#[derive(Debug)]
pub struct IbvQp {
    /// `context`.
    pub context: *mut IbvContext,
    /// `qp_context`.
    pub qp_context: *mut c_void,
    /// `pd`.
    pub pd: *mut IbvPd,
    /// `send_cq`.
    pub send_cq: *mut IbvCq,
    /// `recv_cq`.
    pub recv_cq: *mut IbvCq,
    /// `srq`.
    pub srq: *mut c_void,
    /// `handle`.
    pub handle: u32,
    /// `qp_num`.
    pub qp_num: u32,
    /// `state`.
    pub state: c_uint,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvQpCap {
    /// `max_send_wr`.
    pub max_send_wr: u32,
    /// `max_recv_wr`.
    pub max_recv_wr: u32,
    /// `max_send_sge`.
    pub max_send_sge: u32,
    /// `max_recv_sge`.
    pub max_recv_sge: u32,
    /// `max_inline_data`.
    pub max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvQpInitAttr {
    /// `qp_context`.
    pub qp_context: *mut c_void,
    /// `send_cq`.
    pub send_cq: *mut IbvCq,
    /// `recv_cq`.
    pub recv_cq: *mut IbvCq,
    /// `srq`.
    pub srq: *mut c_void,
    /// `cap`.
    pub cap: IbvQpCap,
    /// `qp_type`.
    pub qp_type: c_uint,
    /// `sq_sig_all`.
    pub sq_sig_all: c_int,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvGlobalRoute {
    /// `dgid`.
    pub dgid: IbvGid,
    /// `flow_label`.
    pub flow_label: u32,
    /// `sgid_index`.
    pub sgid_index: u8,
    /// `hop_limit`.
    pub hop_limit: u8,
    /// `traffic_class`.
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvAhAttr {
    /// `grh`.
    pub grh: IbvGlobalRoute,
    /// `dlid`.
    pub dlid: u16,
    /// `sl`.
    pub sl: u8,
    /// `src_path_bits`.
    pub src_path_bits: u8,
    /// `static_rate`.
    pub static_rate: u8,
    /// `is_global`.
    pub is_global: u8,
    /// `port_num`.
    pub port_num: u8,
}

/// `struct ibv_qp_attr` (complete).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvQpAttr {
    /// `qp_state`.
    pub qp_state: c_uint,
    /// `cur_qp_state`.
    pub cur_qp_state: c_uint,
    /// `path_mtu`.
    pub path_mtu: c_uint,
    /// `path_mig_state`.
    pub path_mig_state: c_uint,
    /// `qkey`.
    pub qkey: u32,
    /// `rq_psn`.
    pub rq_psn: u32,
    /// `sq_psn`.
    pub sq_psn: u32,
    /// `dest_qp_num`.
    pub dest_qp_num: u32,
    /// `qp_access_flags`.
    pub qp_access_flags: c_uint,
    /// `cap`.
    pub cap: IbvQpCap,
    /// `ah_attr`.
    pub ah_attr: IbvAhAttr,
    /// `alt_ah_attr`.
    pub alt_ah_attr: IbvAhAttr,
    /// `pkey_index`.
    pub pkey_index: u16,
    /// `alt_pkey_index`.
    pub alt_pkey_index: u16,
    /// `en_sqd_async_notify`.
    pub en_sqd_async_notify: u8,
    /// `sq_draining`.
    pub sq_draining: u8,
    /// `max_rd_atomic`.
    pub max_rd_atomic: u8,
    /// `max_dest_rd_atomic`.
    pub max_dest_rd_atomic: u8,
    /// `min_rnr_timer`.
    pub min_rnr_timer: u8,
    /// `port_num`.
    pub port_num: u8,
    /// `timeout`.
    pub timeout: u8,
    /// `retry_cnt`.
    pub retry_cnt: u8,
    /// `rnr_retry`.
    pub rnr_retry: u8,
    /// `alt_port_num`.
    pub alt_port_num: u8,
    /// `alt_timeout`.
    pub alt_timeout: u8,
    /// `rate_limit`.
    pub rate_limit: u32,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct IbvSge {
    /// `addr`.
    pub addr: u64,
    /// `length`.
    pub length: u32,
    /// `lkey`.
    pub lkey: u32,
}

/// `struct ibv_send_wr` (complete; the `wr` union as its `rdma` member).
#[repr(C)]
#[derive(Debug)]
pub struct IbvSendWr {
    /// `wr_id`.
    pub wr_id: u64,
    /// `next`.
    pub next: *mut IbvSendWr,
    /// `sg_list`.
    pub sg_list: *mut IbvSge,
    /// `num_sge`.
    pub num_sge: c_int,
    /// `opcode`.
    pub opcode: c_uint,
    /// `send_flags`.
    pub send_flags: c_uint,
    /// `imm_data` (network order).
    pub imm_data: u32,
    /// `wr.rdma.remote_addr`.
    pub rdma_remote_addr: u64,
    /// `wr.rdma.rkey`.
    pub rdma_rkey: u32,
    _wr_rest: [u32; 5],
    _qp_type: u32,
    _bind_mw_or_tso: [u64; 6],
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvRecvWr {
    /// `wr_id`.
    pub wr_id: u64,
    /// `next`.
    pub next: *mut IbvRecvWr,
    /// `sg_list`.
    pub sg_list: *mut IbvSge,
    /// `num_sge`.
    pub num_sge: c_int,
}

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvWc {
    /// `wr_id`.
    pub wr_id: u64,
    /// `status`.
    pub status: c_uint,
    /// `opcode`.
    pub opcode: c_uint,
    /// `vendor_err`.
    pub vendor_err: u32,
    /// `byte_len`.
    pub byte_len: u32,
    /// `imm_data` / `invalidated_rkey`.
    pub imm_data: u32,
    /// `qp_num`.
    pub qp_num: u32,
    /// `src_qp`.
    pub src_qp: u32,
    /// `wc_flags`.
    pub wc_flags: c_uint,
    /// `pkey_index`.
    pub pkey_index: u16,
    /// `slid`.
    pub slid: u16,
    /// `sl`.
    pub sl: u8,
    /// `dlid_path_bits`.
    pub dlid_path_bits: u8,
}

/// Structs whose Rust declaration may be larger than an older verbs.h's (fields appended by newer
/// rdma-core releases; the library fills only what the caller's size covers).
pub const GROWN_STRUCTS: &[&str] = &["sizeof ibv_port_attr"];

/// The Rust side of the layout check: (`struct.field` or `sizeof struct`, value), in the same
/// names as `tests/c/verbs_layout.c` prints them. Sizes named in [`GROWN_STRUCTS`] may exceed
/// the C size (verbs.h versions differ in trailing fields).
pub fn layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    macro_rules! off {
        ($v:ident, $t:ty, $cname:literal, $($f:ident => $cf:literal),* $(,)?) => {
            $v.push((concat!("sizeof ", $cname), size_of::<$t>()));
            $( $v.push((concat!($cname, ".", $cf), offset_of!($t, $f))); )*
        };
    }
    let mut v = Vec::new();
    off!(v, IbvContextOps, "ibv_context_ops",
        poll_cq => "poll_cq", post_send => "post_send", post_recv => "post_recv");
    v.retain(|(n, _)| *n != "sizeof ibv_context_ops");
    v.push(("sizeof ibv_context_ops", size_of::<IbvContextOps>()));
    v.push(("ibv_context.device", offset_of!(IbvContext, device)));
    v.push(("ibv_context.ops", offset_of!(IbvContext, ops)));
    v.push(("ibv_context.cmd_fd", offset_of!(IbvContext, cmd_fd)));
    off!(v, IbvDeviceAttr, "ibv_device_attr",
        node_guid => "node_guid", max_mr_size => "max_mr_size", vendor_id => "vendor_id",
        max_qp => "max_qp", max_qp_wr => "max_qp_wr", max_sge => "max_sge",
        max_sge_rd => "max_sge_rd", max_cqe => "max_cqe", max_qp_rd_atom => "max_qp_rd_atom",
        max_qp_init_rd_atom => "max_qp_init_rd_atom", max_pkeys => "max_pkeys",
        phys_port_cnt => "phys_port_cnt");
    off!(v, IbvPortAttr, "ibv_port_attr",
        state => "state", active_mtu => "active_mtu", gid_tbl_len => "gid_tbl_len",
        max_msg_sz => "max_msg_sz", lid => "lid", active_width => "active_width",
        active_speed => "active_speed", phys_state => "phys_state",
        link_layer => "link_layer");
    v.push(("sizeof ibv_gid", size_of::<IbvGid>()));
    off!(v, IbvPd, "ibv_pd", context => "context", handle => "handle");
    off!(v, IbvMr, "ibv_mr", addr => "addr", length => "length", lkey => "lkey",
        rkey => "rkey");
    v.push(("ibv_cq.context", offset_of!(IbvCq, context)));
    v.push(("ibv_qp.context", offset_of!(IbvQp, context)));
    v.push(("ibv_qp.qp_num", offset_of!(IbvQp, qp_num)));
    v.push(("ibv_qp.state", offset_of!(IbvQp, state)));
    off!(v, IbvQpCap, "ibv_qp_cap", max_send_wr => "max_send_wr",
        max_recv_wr => "max_recv_wr", max_send_sge => "max_send_sge",
        max_recv_sge => "max_recv_sge", max_inline_data => "max_inline_data");
    off!(v, IbvQpInitAttr, "ibv_qp_init_attr", send_cq => "send_cq", recv_cq => "recv_cq",
        srq => "srq", cap => "cap", qp_type => "qp_type", sq_sig_all => "sq_sig_all");
    off!(v, IbvGlobalRoute, "ibv_global_route", dgid => "dgid", flow_label => "flow_label",
        sgid_index => "sgid_index", hop_limit => "hop_limit",
        traffic_class => "traffic_class");
    off!(v, IbvAhAttr, "ibv_ah_attr", grh => "grh", dlid => "dlid", sl => "sl",
        is_global => "is_global", port_num => "port_num");
    off!(v, IbvQpAttr, "ibv_qp_attr", qp_state => "qp_state", path_mtu => "path_mtu",
        rq_psn => "rq_psn", sq_psn => "sq_psn", dest_qp_num => "dest_qp_num",
        qp_access_flags => "qp_access_flags", cap => "cap", ah_attr => "ah_attr",
        alt_ah_attr => "alt_ah_attr", pkey_index => "pkey_index",
        max_rd_atomic => "max_rd_atomic", max_dest_rd_atomic => "max_dest_rd_atomic",
        min_rnr_timer => "min_rnr_timer", port_num => "port_num", timeout => "timeout",
        retry_cnt => "retry_cnt", rnr_retry => "rnr_retry", rate_limit => "rate_limit");
    off!(v, IbvSge, "ibv_sge", addr => "addr", length => "length", lkey => "lkey");
    off!(v, IbvSendWr, "ibv_send_wr", wr_id => "wr_id", next => "next",
        sg_list => "sg_list", num_sge => "num_sge", opcode => "opcode",
        send_flags => "send_flags", imm_data => "imm_data",
        rdma_remote_addr => "wr.rdma.remote_addr", rdma_rkey => "wr.rdma.rkey");
    off!(v, IbvRecvWr, "ibv_recv_wr", wr_id => "wr_id", next => "next",
        sg_list => "sg_list", num_sge => "num_sge");
    off!(v, IbvWc, "ibv_wc", wr_id => "wr_id", status => "status", opcode => "opcode",
        vendor_err => "vendor_err", byte_len => "byte_len", imm_data => "imm_data",
        qp_num => "qp_num", src_qp => "src_qp", wc_flags => "wc_flags",
        pkey_index => "pkey_index", slid => "slid", sl => "sl",
        dlid_path_bits => "dlid_path_bits");
    v
}

/// The enum values the binding relies on, in the names `tests/c/verbs_layout.c` prints.
pub fn constants() -> Vec<(&'static str, i64)> {
    vec![
        ("IBV_ACCESS_LOCAL_WRITE", ACCESS_LOCAL_WRITE.into()),
        ("IBV_ACCESS_REMOTE_WRITE", ACCESS_REMOTE_WRITE.into()),
        ("IBV_ACCESS_REMOTE_READ", ACCESS_REMOTE_READ.into()),
        ("IBV_QPT_RC", QPT_RC.into()),
        ("IBV_QPS_INIT", QPS_INIT.into()),
        ("IBV_QPS_RTR", QPS_RTR.into()),
        ("IBV_QPS_RTS", QPS_RTS.into()),
        ("IBV_QPS_ERR", QPS_ERR.into()),
        ("IBV_QP_STATE", qp_mask::STATE.into()),
        ("IBV_QP_ACCESS_FLAGS", qp_mask::ACCESS_FLAGS.into()),
        ("IBV_QP_PKEY_INDEX", qp_mask::PKEY_INDEX.into()),
        ("IBV_QP_PORT", qp_mask::PORT.into()),
        ("IBV_QP_AV", qp_mask::AV.into()),
        ("IBV_QP_PATH_MTU", qp_mask::PATH_MTU.into()),
        ("IBV_QP_TIMEOUT", qp_mask::TIMEOUT.into()),
        ("IBV_QP_RETRY_CNT", qp_mask::RETRY_CNT.into()),
        ("IBV_QP_RNR_RETRY", qp_mask::RNR_RETRY.into()),
        ("IBV_QP_RQ_PSN", qp_mask::RQ_PSN.into()),
        ("IBV_QP_MAX_QP_RD_ATOMIC", qp_mask::MAX_QP_RD_ATOMIC.into()),
        ("IBV_QP_MIN_RNR_TIMER", qp_mask::MIN_RNR_TIMER.into()),
        ("IBV_QP_SQ_PSN", qp_mask::SQ_PSN.into()),
        (
            "IBV_QP_MAX_DEST_RD_ATOMIC",
            qp_mask::MAX_DEST_RD_ATOMIC.into(),
        ),
        ("IBV_QP_DEST_QPN", qp_mask::DEST_QPN.into()),
        ("IBV_WR_RDMA_WRITE", WR_RDMA_WRITE.into()),
        ("IBV_WR_SEND", WR_SEND.into()),
        ("IBV_WR_RDMA_READ", WR_RDMA_READ.into()),
        ("IBV_SEND_SIGNALED", SEND_SIGNALED.into()),
        ("IBV_WC_SUCCESS", WC_SUCCESS.into()),
        ("IBV_WC_WR_FLUSH_ERR", WC_WR_FLUSH_ERR.into()),
        ("IBV_WC_REM_ACCESS_ERR", WC_REM_ACCESS_ERR.into()),
        ("IBV_WC_RETRY_EXC_ERR", WC_RETRY_EXC_ERR.into()),
        ("IBV_WC_RNR_RETRY_EXC_ERR", WC_RNR_RETRY_EXC_ERR.into()),
        ("IBV_WC_RECV", WC_RECV.into()),
        ("IBV_PORT_ACTIVE", PORT_ACTIVE.into()),
        ("IBV_LINK_LAYER_INFINIBAND", LINK_LAYER_INFINIBAND.into()),
        ("IBV_LINK_LAYER_ETHERNET", LINK_LAYER_ETHERNET.into()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Raw layer: the library.
// ---------------------------------------------------------------------------------------------

type GetDeviceList = unsafe extern "C" fn(*mut c_int) -> *mut *mut IbvDevice;
type FreeDeviceList = unsafe extern "C" fn(*mut *mut IbvDevice);
type GetDeviceName = unsafe extern "C" fn(*mut IbvDevice) -> *const c_char;
type GetDeviceGuid = unsafe extern "C" fn(*mut IbvDevice) -> u64;
type OpenDevice = unsafe extern "C" fn(*mut IbvDevice) -> *mut IbvContext;
type CloseDevice = unsafe extern "C" fn(*mut IbvContext) -> c_int;
type QueryDevice = unsafe extern "C" fn(*mut IbvContext, *mut IbvDeviceAttr) -> c_int;
type QueryPort = unsafe extern "C" fn(*mut IbvContext, u8, *mut IbvPortAttr) -> c_int;
type QueryGid = unsafe extern "C" fn(*mut IbvContext, u8, c_int, *mut IbvGid) -> c_int;
type AllocPd = unsafe extern "C" fn(*mut IbvContext) -> *mut IbvPd;
type DeallocPd = unsafe extern "C" fn(*mut IbvPd) -> c_int;
type RegMr = unsafe extern "C" fn(*mut IbvPd, *mut c_void, usize, c_int) -> *mut IbvMr;
type RegDmabufMr = unsafe extern "C" fn(*mut IbvPd, u64, usize, u64, c_int, c_int) -> *mut IbvMr;
type DeregMr = unsafe extern "C" fn(*mut IbvMr) -> c_int;
type CreateCq =
    unsafe extern "C" fn(*mut IbvContext, c_int, *mut c_void, *mut c_void, c_int) -> *mut IbvCq;
type DestroyCq = unsafe extern "C" fn(*mut IbvCq) -> c_int;
type CreateQp = unsafe extern "C" fn(*mut IbvPd, *mut IbvQpInitAttr) -> *mut IbvQp;
type ModifyQp = unsafe extern "C" fn(*mut IbvQp, *mut IbvQpAttr, c_int) -> c_int;
type DestroyQp = unsafe extern "C" fn(*mut IbvQp) -> c_int;
type WcStatusStr = unsafe extern "C" fn(c_uint) -> *const c_char;

/// The entry points of libibverbs, resolved once.
struct Fns {
    get_device_list: GetDeviceList,
    free_device_list: FreeDeviceList,
    get_device_name: GetDeviceName,
    get_device_guid: GetDeviceGuid,
    open_device: OpenDevice,
    close_device: CloseDevice,
    query_device: QueryDevice,
    query_port: QueryPort,
    query_gid: QueryGid,
    alloc_pd: AllocPd,
    dealloc_pd: DeallocPd,
    reg_mr: RegMr,
    reg_dmabuf_mr: Option<RegDmabufMr>,
    dereg_mr: DeregMr,
    create_cq: CreateCq,
    destroy_cq: DestroyCq,
    create_qp: CreateQp,
    modify_qp: ModifyQp,
    destroy_qp: DestroyQp,
    wc_status_str: WcStatusStr,
}

/// libibverbs, loaded at run time.
pub struct Verbs {
    fns: Fns,
    // Last: the function pointers above point into it.
    _lib: Library,
}

impl fmt::Debug for Verbs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verbs")
            .field("dmabuf", &self.fns.reg_dmabuf_mr.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a verbs call failed: the call and errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbsError {
    /// The verbs function.
    pub call: &'static str,
    /// Its description of the failure.
    pub reason: String,
}

impl fmt::Display for VerbsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.reason)
    }
}

fn errno_err(call: &'static str) -> VerbsError {
    let e = std::io::Error::last_os_error();
    let hint = e.raw_os_error().and_then(|n| {
        if call.starts_with("ibv_reg") {
            crate::limits::memlock_hint(n)
        } else {
            None
        }
    });
    VerbsError {
        call,
        reason: match hint {
            Some(h) => format!("{e}: {h}"),
            None => e.to_string(),
        },
    }
}

/// A failed `ibv_post_send` of a chain: how many work requests were posted before the refused
/// one (they are on the send queue and will complete), and why.
#[derive(Clone, Debug)]
pub struct PostError {
    /// Work requests at the head of the chain that were posted.
    pub posted: usize,
    /// The provider's error.
    pub err: VerbsError,
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (after {} posted)", self.err, self.posted)
    }
}

impl std::error::Error for PostError {}

/// How many work requests of a chain of `n` starting at `base` come before `bad` (the
/// provider's `bad_wr`). A null or foreign `bad` counts as nothing posted (the safe reading:
/// the caller then fails every request and moves the QP to the error state, so whatever was in
/// fact posted completes with a flush).
pub(crate) fn posted_before(base: *const IbvSendWr, bad: *const IbvSendWr, n: usize) -> usize {
    let (b, x) = (base as usize, bad as usize);
    let size = std::mem::size_of::<IbvSendWr>();
    if bad.is_null() || x < b || (x - b) % size != 0 {
        return 0;
    }
    ((x - b) / size).min(n)
}

fn rc_err(call: &'static str, rc: c_int) -> VerbsError {
    // Verbs calls return either -1 with errno, or a positive errno value.
    let e = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    VerbsError {
        call,
        reason: e.to_string(),
    }
}

/// Result of a verbs call.
pub type VResult<T> = std::result::Result<T, VerbsError>;

impl Verbs {
    /// Loads `libibverbs.so.1`.
    pub fn load() -> std::result::Result<Arc<Verbs>, String> {
        Verbs::load_from(LIBIBVERBS)
    }

    /// Loads the library of that name (tests point it at a name that does not exist).
    pub fn load_from(name: &str) -> std::result::Result<Arc<Verbs>, String> {
        // SAFETY: loading libibverbs runs its constructors, which only initialise the library's
        // own state (no requirement on the caller); a library of another name is the caller's
        // (test's) choice and is only looked up, never called, unless it exports these symbols.
        let lib = unsafe { Library::new(name) }.map_err(|e| format!("{name} not found: {e}"))?;
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the symbol is declared with the C prototype from verbs.h (checked by the
                // layout test); the copied pointer is used only while `_lib` is alive (same struct).
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{name} lacks {}: {e}", $name))?;
                *s
            }};
        }
        // SAFETY: as for `sym!`; the symbol is optional (rdma-core 34+).
        let dmabuf = unsafe { lib.get::<RegDmabufMr>(b"ibv_reg_dmabuf_mr\0") }
            .ok()
            .map(|s| *s);
        let fns = Fns {
            get_device_list: sym!("ibv_get_device_list"),
            free_device_list: sym!("ibv_free_device_list"),
            get_device_name: sym!("ibv_get_device_name"),
            get_device_guid: sym!("ibv_get_device_guid"),
            open_device: sym!("ibv_open_device"),
            close_device: sym!("ibv_close_device"),
            query_device: sym!("ibv_query_device"),
            query_port: sym!("ibv_query_port"),
            query_gid: sym!("ibv_query_gid"),
            alloc_pd: sym!("ibv_alloc_pd"),
            dealloc_pd: sym!("ibv_dealloc_pd"),
            reg_mr: sym!("ibv_reg_mr"),
            reg_dmabuf_mr: dmabuf,
            dereg_mr: sym!("ibv_dereg_mr"),
            create_cq: sym!("ibv_create_cq"),
            destroy_cq: sym!("ibv_destroy_cq"),
            create_qp: sym!("ibv_create_qp"),
            modify_qp: sym!("ibv_modify_qp"),
            destroy_qp: sym!("ibv_destroy_qp"),
            wc_status_str: sym!("ibv_wc_status_str"),
        };
        Ok(Arc::new(Verbs { fns, _lib: lib }))
    }

    /// Whether `ibv_reg_dmabuf_mr` is available.
    pub fn has_dmabuf(&self) -> bool {
        self.fns.reg_dmabuf_mr.is_some()
    }

    /// The devices: (name, node GUID in host order).
    pub fn devices(&self) -> VResult<Vec<(String, u64)>> {
        self.with_list(|list| {
            list.iter()
                .map(|&d| (self.dev_name(d), u64::from_be(self.dev_guid(d))))
                .collect()
        })
    }

    fn dev_name(&self, d: *mut IbvDevice) -> String {
        // SAFETY: `d` comes from a live device list; the returned string is owned by the device
        // and valid while the list is; it is copied out at once.
        let p = unsafe { (self.fns.get_device_name)(d) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null, NUL-terminated (the device's kernel name).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn dev_guid(&self, d: *mut IbvDevice) -> u64 {
        // SAFETY: `d` comes from a live device list.
        unsafe { (self.fns.get_device_guid)(d) }
    }

    /// Runs `f` over the device list, then frees it.
    fn with_list<T>(&self, f: impl FnOnce(&[*mut IbvDevice]) -> T) -> VResult<T> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer.
        let list = unsafe { (self.fns.get_device_list)(&mut n) };
        if list.is_null() {
            return Err(errno_err("ibv_get_device_list"));
        }
        let len = usize::try_from(n).unwrap_or(0);
        // SAFETY: the list holds `n` device pointers (and a NULL after them).
        let devs = unsafe { std::slice::from_raw_parts(list, len) };
        let out = f(devs);
        // SAFETY: `list` came from ibv_get_device_list and is freed once; contexts opened from
        // it stay valid (verbs API).
        unsafe { (self.fns.free_device_list)(list) };
        Ok(out)
    }

    /// Opens the device `name`.
    pub fn open(self: &Arc<Self>, name: &str) -> VResult<Context> {
        let ctx = self.with_list(|list| {
            list.iter()
                .copied()
                .find(|&d| self.dev_name(d) == name)
                .map(|d| {
                    // SAFETY: `d` is a device of the live list.
                    unsafe { (self.fns.open_device)(d) }
                })
        })?;
        match ctx {
            None => Err(VerbsError {
                call: "ibv_open_device",
                reason: format!("no device named '{name}'"),
            }),
            Some(p) if p.is_null() => Err(errno_err("ibv_open_device")),
            Some(p) => Ok(Context(Arc::new(CtxInner {
                verbs: Arc::clone(self),
                ptr: p,
                name: name.to_owned(),
            }))),
        }
    }

    /// The text of a work completion status.
    pub fn wc_status_str(&self, status: c_uint) -> String {
        // SAFETY: ibv_wc_status_str accepts any value and returns a static string.
        let p = unsafe { (self.fns.wc_status_str)(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Safe layer.
// ---------------------------------------------------------------------------------------------

fn log_destroy(call: &'static str, what: &str, rc: c_int) {
    if rc != 0 {
        let e = rc_err(call, rc);
        metrics::counter!("nixl_rdma_teardown_errors_total").increment(1);
        tracing::warn!(what, error = %e, "rdma teardown failed");
    }
}

struct CtxInner {
    verbs: Arc<Verbs>,
    ptr: *mut IbvContext,
    name: String,
}

// SAFETY: a verbs context may be used from any thread (libibverbs serialises what needs it);
// the pointer is owned by this struct and closed once in Drop.
unsafe impl Send for CtxInner {}
// SAFETY: as for Send: every call through it is thread-safe per the verbs API.
unsafe impl Sync for CtxInner {}

impl Drop for CtxInner {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, closed once; every child holds this Arc, so none
        // is alive any more.
        let rc = unsafe { (self.verbs.fns.close_device)(self.ptr) };
        log_destroy("ibv_close_device", &self.name, rc);
    }
}

/// An open device.
#[derive(Clone)]
pub struct Context(Arc<CtxInner>);

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({})", self.0.name)
    }
}

impl Context {
    /// The device name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The library.
    pub fn verbs(&self) -> &Arc<Verbs> {
        &self.0.verbs
    }

    /// `ibv_query_device`.
    pub fn query_device(&self) -> VResult<IbvDeviceAttr> {
        // SAFETY: all-zero is a valid IbvDeviceAttr (integers and a char array).
        let mut a: IbvDeviceAttr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, `a` is a complete ibv_device_attr (layout test).
        let rc = unsafe { (self.0.verbs.fns.query_device)(self.0.ptr, &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(a)
    }

    /// `ibv_query_port` (zeroed first, as the inline wrapper in verbs.h does).
    pub fn query_port(&self, port: u8) -> VResult<IbvPortAttr> {
        let mut a = IbvPortAttr::default();
        // SAFETY: live context; the exported symbol fills the compat prefix of `a`, which is a
        // complete ibv_port_attr.
        let rc = unsafe { (self.0.verbs.fns.query_port)(self.0.ptr, port, &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_port", rc));
        }
        Ok(a)
    }

    /// `ibv_query_gid`.
    pub fn query_gid(&self, port: u8, index: u8) -> VResult<[u8; 16]> {
        let mut g = IbvGid::default();
        // SAFETY: live context, `g` is a valid union ibv_gid.
        let rc = unsafe { (self.0.verbs.fns.query_gid)(self.0.ptr, port, index.into(), &mut g) };
        if rc != 0 {
            return Err(rc_err("ibv_query_gid", rc));
        }
        Ok(g.raw)
    }

    /// `ibv_alloc_pd`.
    pub fn alloc_pd(&self) -> VResult<Pd> {
        // SAFETY: live context.
        let p = unsafe { (self.0.verbs.fns.alloc_pd)(self.0.ptr) };
        if p.is_null() {
            return Err(errno_err("ibv_alloc_pd"));
        }
        Ok(Pd(Arc::new(PdInner {
            ctx: self.clone(),
            ptr: p,
        })))
    }

    /// `ibv_create_cq` with `depth` entries and no completion channel (the backend polls).
    pub fn create_cq(&self, depth: u32) -> VResult<Cq> {
        let depth = c_int::try_from(depth).unwrap_or(c_int::MAX);
        // SAFETY: live context; no channel, no user context, vector 0.
        let p = unsafe {
            (self.0.verbs.fns.create_cq)(
                self.0.ptr,
                depth,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if p.is_null() {
            return Err(errno_err("ibv_create_cq"));
        }
        Ok(Cq(Arc::new(CqInner {
            ctx: self.clone(),
            ptr: p,
        })))
    }
}

struct PdInner {
    ctx: Context,
    ptr: *mut IbvPd,
}

// SAFETY: a PD is used from any thread per the verbs API; owned, freed once in Drop.
unsafe impl Send for PdInner {}
// SAFETY: as for Send.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; MRs and QPs hold this Arc, so none is alive.
        let rc = unsafe { (self.ctx.0.verbs.fns.dealloc_pd)(self.ptr) };
        log_destroy("ibv_dealloc_pd", self.ctx.name(), rc);
    }
}

/// A protection domain.
#[derive(Clone)]
pub struct Pd(Arc<PdInner>);

impl fmt::Debug for Pd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pd({})", self.0.ctx.name())
    }
}

impl Pd {
    /// The device context.
    pub fn context(&self) -> &Context {
        &self.0.ctx
    }

    /// `ibv_reg_mr` of `[addr, addr + len)`.
    ///
    /// # Safety
    /// The memory must stay allocated until the returned [`Mr`] is dropped: the NIC reads and
    /// writes it (with `access`) for peers and for work requests at any time until then.
    pub unsafe fn reg_mr(&self, addr: u64, len: u64, access: c_int) -> VResult<Mr> {
        let len = usize::try_from(len).map_err(|_| VerbsError {
            call: "ibv_reg_mr",
            reason: format!("length {len} does not fit usize"),
        })?;
        // SAFETY: live PD; the caller keeps the memory valid while the MR lives.
        let p = unsafe {
            (self.0.ctx.0.verbs.fns.reg_mr)(self.0.ptr, addr as *mut c_void, len, access)
        };
        if p.is_null() {
            return Err(errno_err("ibv_reg_mr"));
        }
        Ok(Mr::wrap(self.clone(), p))
    }

    /// `ibv_reg_dmabuf_mr` of `len` bytes at `offset` of the dmabuf `fd`, at address `iova`.
    /// The kernel holds the dmabuf (and so the device memory) until the MR is deregistered, so
    /// no contract is left to the caller.
    pub fn reg_dmabuf_mr(
        &self,
        offset: u64,
        len: u64,
        iova: u64,
        fd: i32,
        access: c_int,
    ) -> VResult<Mr> {
        let f = self.0.ctx.0.verbs.fns.reg_dmabuf_mr.ok_or(VerbsError {
            call: "ibv_reg_dmabuf_mr",
            reason: "this libibverbs lacks ibv_reg_dmabuf_mr (rdma-core 34 or later needed)".into(),
        })?;
        let len = usize::try_from(len).map_err(|_| VerbsError {
            call: "ibv_reg_dmabuf_mr",
            reason: format!("length {len} does not fit usize"),
        })?;
        // SAFETY: live PD; the kernel takes its own reference on the dmabuf behind `fd`.
        let p = unsafe { f(self.0.ptr, offset, len, iova, fd, access) };
        if p.is_null() {
            return Err(errno_err("ibv_reg_dmabuf_mr"));
        }
        Ok(Mr::wrap(self.clone(), p))
    }

    /// `ibv_create_qp`: a reliable-connected QP on `cq` (send and receive), with `cap`.
    pub fn create_rc_qp(&self, cq: &Cq, cap: IbvQpCap) -> VResult<Qp> {
        let mut attr = IbvQpInitAttr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.0.ptr,
            recv_cq: cq.0.ptr,
            srq: std::ptr::null_mut(),
            cap,
            qp_type: QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: live PD and CQ (of the same context, checked by the provider), `attr` complete.
        let p = unsafe { (self.0.ctx.0.verbs.fns.create_qp)(self.0.ptr, &mut attr) };
        if p.is_null() {
            return Err(errno_err("ibv_create_qp"));
        }
        Ok(Qp {
            ptr: p,
            cap: attr.cap,
            _cq: cq.clone(),
            pd: self.clone(),
        })
    }
}

/// A memory region.
pub struct Mr {
    ptr: *mut IbvMr,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: u64,
    pd: Pd,
}

// SAFETY: an MR handle is plain data plus a pointer freed once in Drop; verbs allow any thread.
unsafe impl Send for Mr {}
// SAFETY: no interior mutation through &Mr.
unsafe impl Sync for Mr {}

impl fmt::Debug for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mr")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .finish()
    }
}

impl Mr {
    fn wrap(pd: Pd, p: *mut IbvMr) -> Mr {
        // SAFETY: `p` is a live MR just returned by libibverbs; its fields are plain data.
        let (lkey, rkey, addr, len) =
            unsafe { ((*p).lkey, (*p).rkey, (*p).addr as u64, (*p).length as u64) };
        Mr {
            ptr: p,
            lkey,
            rkey,
            addr,
            len,
            pd,
        }
    }

    /// The local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The remote key.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr/ibv_reg_dmabuf_mr, deregistered once.
        let rc = unsafe { (self.pd.0.ctx.0.verbs.fns.dereg_mr)(self.ptr) };
        log_destroy("ibv_dereg_mr", self.pd.0.ctx.name(), rc);
    }
}

/// A buffer owned by the backend and registered on one PD (notification slots). The NIC
/// writes into it for posted receives; the backend reads a slot only after its receive has
/// completed and before it is posted again.
pub struct OwnedBuf {
    // ManuallyDrop: deregistered in Drop before the memory is freed.
    mr: std::mem::ManuallyDrop<Mr>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is a private heap allocation; access goes through raw pointers only, in
// the slot discipline described on the type.
unsafe impl Send for OwnedBuf {}
// SAFETY: as for Send.
unsafe impl Sync for OwnedBuf {}

impl fmt::Debug for OwnedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedBuf").field("len", &self.len).finish()
    }
}

impl OwnedBuf {
    /// A zeroed buffer of `len` bytes registered on `pd` with local write access (and remote
    /// access `extra`).
    pub fn new(pd: &Pd, len: usize, extra: c_int) -> VResult<OwnedBuf> {
        let len = len.max(1);
        let boxed: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let ptr = Box::into_raw(boxed).cast::<u8>();
        // SAFETY: `ptr` is a live allocation of `len` bytes freed only in Drop, after `mr`.
        let mr = unsafe { pd.reg_mr(ptr as u64, len as u64, ACCESS_LOCAL_WRITE | extra) };
        match mr {
            Ok(mr) => Ok(OwnedBuf {
                mr: std::mem::ManuallyDrop::new(mr),
                ptr,
                len,
            }),
            Err(e) => {
                // SAFETY: reconstitutes the box leaked just above; nothing else refers to it.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
                Err(e)
            }
        }
    }

    /// The MR.
    pub fn mr(&self) -> &Mr {
        &self.mr
    }

    /// Address of byte `off`.
    pub fn addr(&self, off: usize) -> u64 {
        self.ptr as u64 + off.min(self.len) as u64
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the buffer at `off` (before the send that reads it is posted).
    pub fn write(&self, off: usize, src: &[u8]) -> bool {
        if off.checked_add(src.len()).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: in bounds (checked); the slot is not in use by the NIC (slot discipline), and
        // only raw pointers are used, so no Rust reference aliases the NIC's writes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        true
    }

    /// Copies `len` bytes at `off` out of the buffer (after the receive into it completed).
    pub fn read(&self, off: usize, len: usize) -> Option<Vec<u8>> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return None;
        }
        let mut v = vec![0u8; len];
        // SAFETY: in bounds (checked); the slot's receive has completed (slot discipline).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) };
        Some(v)
    }
}

impl Drop for OwnedBuf {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; `mr` is not used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.mr) };
        // SAFETY: the allocation leaked in `new`, freed once, after its MR is gone (so the NIC
        // no longer writes into it).
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct Cq(Arc<CqInner>);

struct CqInner {
    ctx: Context,
    ptr: *mut IbvCq,
}

// SAFETY: polling a CQ is thread-safe per the verbs API (providers lock); owned, freed once.
unsafe impl Send for CqInner {}
// SAFETY: as for Send.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; every QP on it holds this Arc, so none is alive.
        let rc = unsafe { (self.ctx.0.verbs.fns.destroy_cq)(self.ptr) };
        log_destroy("ibv_destroy_cq", self.ctx.name(), rc);
    }
}

impl fmt::Debug for Cq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cq({})", self.0.ctx.name())
    }
}

impl Cq {
    /// Polls up to `wcs.len()` completions (no syscall: the provider reads the CQ ring in user
    /// space). Returns how many were written.
    pub fn poll(&self, wcs: &mut [IbvWc]) -> VResult<usize> {
        let n = c_int::try_from(wcs.len()).unwrap_or(c_int::MAX);
        // SAFETY: live CQ; its context's ops table is filled by the provider (as the inline
        // ibv_poll_cq reads it).
        let f = unsafe { (*(*self.0.ptr).context).ops.poll_cq };
        let Some(f) = f else {
            return Err(VerbsError {
                call: "ibv_poll_cq",
                reason: "provider has no poll_cq".into(),
            });
        };
        // SAFETY: `wcs` has room for `n` entries.
        let rc = unsafe { f(self.0.ptr, n, wcs.as_mut_ptr()) };
        if rc < 0 {
            return Err(rc_err("ibv_poll_cq", rc));
        }
        Ok(rc as usize)
    }
}

/// Where a QP connects to: the peer's side of a lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteQp {
    /// QP number.
    pub qpn: u32,
    /// Starting packet sequence number.
    pub psn: u32,
    /// LID (InfiniBand).
    pub lid: u16,
    /// GID (RoCE; zero when unused).
    pub gid: [u8; 16],
}

/// Path settings of a QP.
#[derive(Clone, Copy, Debug)]
pub struct PathCfg {
    /// Local port.
    pub port: u8,
    /// Local GID index (RoCE).
    pub sgid_index: u8,
    /// Whether to route by GID (RoCE, or IB across subnets).
    pub global: bool,
    /// `ibv_mtu` code (1 = 256 .. 5 = 4096).
    pub mtu: u32,
    /// Local ACK timeout exponent.
    pub timeout: u8,
    /// Retries before IBV_WC_RETRY_EXC_ERR.
    pub retry_cnt: u8,
    /// RNR retries (7 = unlimited).
    pub rnr_retry: u8,
    /// RDMA READs this side keeps outstanding (at most the peer's responder resources).
    pub rd_atomic: u8,
    /// RDMA READs this side answers at once (its responder resources).
    pub dest_rd_atomic: u8,
    /// Service level.
    pub sl: u8,
    /// Traffic class (RoCE).
    pub traffic_class: u8,
}

/// A reliable-connected queue pair.
pub struct Qp {
    ptr: *mut IbvQp,
    cap: IbvQpCap,
    _cq: Cq,
    pd: Pd,
}

// SAFETY: posting to a QP is thread-safe per the verbs API (providers lock the queues); the
// pointer is owned and destroyed once.
unsafe impl Send for Qp {}
// SAFETY: as for Send.
unsafe impl Sync for Qp {}

impl fmt::Debug for Qp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Qp({}, {})", self.pd.context().name(), self.qpn())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once (outstanding WRs are discarded).
        let rc = unsafe { (self.pd.0.ctx.0.verbs.fns.destroy_qp)(self.ptr) };
        log_destroy("ibv_destroy_qp", self.pd.context().name(), rc);
    }
}

/// One send work request to build: (`wr_id`, opcode, local pieces, remote address, rkey).
#[derive(Clone, Debug)]
pub struct SendReq<'a> {
    /// Identifies the completion.
    pub wr_id: u64,
    /// `WR_RDMA_WRITE`, `WR_RDMA_READ` or `WR_SEND`.
    pub opcode: c_uint,
    /// Local pieces, each inside an MR whose lkey it carries.
    pub sges: &'a [IbvSge],
    /// Remote address (RDMA only).
    pub remote_addr: u64,
    /// Remote key (RDMA only).
    pub rkey: u32,
}

/// A reusable chain of signalled send work requests: built with [`SendBatch::push`], posted
/// with [`Qp::post_batch`], cleared with [`SendBatch::clear`]. Its vectors keep their capacity,
/// so a batch reused per post allocates only while it grows.
#[derive(Default)]
pub struct SendBatch {
    wrs: Vec<IbvSendWr>,
    sges: Vec<IbvSge>,
    /// (first SGE, SGE count) per WR.
    ranges: Vec<(usize, usize)>,
}

// SAFETY: the raw pointers inside the WRs are only written and used by `Qp::post_batch`, on
// the thread that holds `&mut SendBatch`; between posts they are dangling-but-unused.
unsafe impl Send for SendBatch {}
// SAFETY: `&SendBatch` exposes only lengths.
unsafe impl Sync for SendBatch {}

impl fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendBatch")
            .field("wrs", &self.wrs.len())
            .field("sges", &self.sges.len())
            .finish()
    }
}

impl SendBatch {
    /// Forgets the work requests (keeps the capacity).
    pub fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
        self.ranges.clear();
    }

    /// Number of work requests.
    pub fn len(&self) -> usize {
        self.wrs.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }

    /// Appends one signalled work request (`wr_id`, opcode, local pieces each inside an MR
    /// whose lkey it carries, remote address and rkey for RDMA).
    pub fn push(
        &mut self,
        wr_id: u64,
        opcode: c_uint,
        sges: impl IntoIterator<Item = IbvSge>,
        remote_addr: u64,
        rkey: u32,
    ) {
        let start = self.sges.len();
        self.sges.extend(sges);
        let count = self.sges.len() - start;
        self.ranges.push((start, count));
        self.wrs.push(IbvSendWr {
            wr_id,
            next: std::ptr::null_mut(),
            // Linked by `Qp::post_batch` once `sges` no longer moves.
            sg_list: std::ptr::null_mut(),
            num_sge: count as c_int,
            opcode,
            send_flags: SEND_SIGNALED,
            imm_data: 0,
            rdma_remote_addr: remote_addr,
            rdma_rkey: rkey,
            _wr_rest: [0; 5],
            _qp_type: 0,
            _bind_mw_or_tso: [0; 6],
        });
    }
}

impl Qp {
    /// The QP number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: live QP; qp_num is set at creation and never changes.
        unsafe { (*self.ptr).qp_num }
    }

    /// The capabilities the provider granted.
    pub fn cap(&self) -> IbvQpCap {
        self.cap
    }

    fn modify(&self, attr: &mut IbvQpAttr, mask: c_int, what: &'static str) -> VResult<()> {
        // SAFETY: live QP, complete attr.
        let rc = unsafe { (self.pd.0.ctx.0.verbs.fns.modify_qp)(self.ptr, attr, mask) };
        if rc != 0 {
            return Err(rc_err(what, rc));
        }
        Ok(())
    }

    /// RESET → INIT, allowing remote READ and WRITE.
    pub fn to_init(&self, port: u8) -> VResult<()> {
        let mut a = IbvQpAttr {
            qp_state: QPS_INIT,
            port_num: port,
            pkey_index: 0,
            qp_access_flags: (ACCESS_LOCAL_WRITE | ACCESS_REMOTE_READ | ACCESS_REMOTE_WRITE)
                as c_uint,
            ..Default::default()
        };
        self.modify(
            &mut a,
            qp_mask::STATE | qp_mask::PKEY_INDEX | qp_mask::PORT | qp_mask::ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )
    }

    /// INIT → RTR towards `remote`.
    pub fn to_rtr(&self, remote: &RemoteQp, path: &PathCfg) -> VResult<()> {
        let mut a = IbvQpAttr {
            qp_state: QPS_RTR,
            path_mtu: path.mtu,
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: path.dest_rd_atomic,
            min_rnr_timer: 12,
            ..Default::default()
        };
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = path.sl;
        a.ah_attr.port_num = path.port;
        if path.global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = IbvGid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = path.sgid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.grh.traffic_class = path.traffic_class;
        }
        self.modify(
            &mut a,
            qp_mask::STATE
                | qp_mask::AV
                | qp_mask::PATH_MTU
                | qp_mask::DEST_QPN
                | qp_mask::RQ_PSN
                | qp_mask::MAX_DEST_RD_ATOMIC
                | qp_mask::MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )
    }

    /// RTR → RTS with our starting `psn`.
    pub fn to_rts(&self, psn: u32, path: &PathCfg) -> VResult<()> {
        let mut a = IbvQpAttr {
            qp_state: QPS_RTS,
            sq_psn: psn,
            timeout: path.timeout,
            retry_cnt: path.retry_cnt,
            rnr_retry: path.rnr_retry,
            max_rd_atomic: path.rd_atomic,
            ..Default::default()
        };
        self.modify(
            &mut a,
            qp_mask::STATE
                | qp_mask::TIMEOUT
                | qp_mask::RETRY_CNT
                | qp_mask::RNR_RETRY
                | qp_mask::SQ_PSN
                | qp_mask::MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    /// Moves the QP to ERR: every outstanding WR completes with a flush error.
    pub fn to_err(&self) -> VResult<()> {
        let mut a = IbvQpAttr {
            qp_state: QPS_ERR,
            ..Default::default()
        };
        self.modify(&mut a, qp_mask::STATE, "ibv_modify_qp(ERR)")
    }

    /// Posts a chain of signalled send work requests (one `post_send` call).
    ///
    /// # Safety
    /// The NIC reads (WRITE, SEND) or writes (READ) the SGEs' memory at any time until each
    /// request's completion is reaped from the CQ (or the QP is moved to ERR and its flushed
    /// completions are reaped), long after this returns, and nothing here ties that memory to
    /// the requests. The caller guarantees that every SGE lies inside an MR of this QP's PD
    /// whose lkey it carries, that this memory stays allocated and registered until then, and
    /// that memory a READ lands in is used by nothing else until then. The NIC refuses SGEs
    /// outside their MR with a protection error, but an MR over freed memory it cannot see.
    pub unsafe fn post_send(&self, reqs: &[SendReq<'_>]) -> Result<(), PostError> {
        let mut batch = SendBatch::default();
        for r in reqs {
            batch.push(
                r.wr_id,
                r.opcode,
                r.sges.iter().copied(),
                r.remote_addr,
                r.rkey,
            );
        }
        // SAFETY: forwarded from our caller.
        unsafe { self.post_batch(&mut batch) }
    }

    /// Posts the work requests of `batch` as one chain (one `post_send` call); the batch
    /// keeps its capacity for the next use (no allocation once it has grown). Empty: no call.
    ///
    /// On failure the error says how many work requests of the chain were posted before the
    /// one the provider refused (`bad_wr`): those are on the send queue and will complete (or
    /// flush); only the rest were not posted.
    ///
    /// # Safety
    /// As for [`Qp::post_send`], for every SGE of `batch`.
    pub unsafe fn post_batch(&self, batch: &mut SendBatch) -> Result<(), PostError> {
        let n = batch.wrs.len();
        if n == 0 {
            return Ok(());
        }
        let base = batch.sges.as_mut_ptr();
        let wr_base = batch.wrs.as_mut_ptr();
        for i in 0..n {
            let (start, count) = batch.ranges[i];
            debug_assert!(start + count <= batch.sges.len());
            // SAFETY: `i < n` and `start + count <= sges.len()` (pushed together): pointers
            // inside the two vectors, which are not resized while the chain is posted.
            unsafe {
                let w = wr_base.add(i);
                (*w).sg_list = if count == 0 {
                    std::ptr::null_mut()
                } else {
                    base.add(start)
                };
                (*w).next = if i + 1 < n {
                    wr_base.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        let mut bad: *mut IbvSendWr = std::ptr::null_mut();
        // SAFETY: live QP; its context's ops table is the provider's (as the inline
        // ibv_post_send reads it).
        let f = unsafe { (*(*self.ptr).context).ops.post_send };
        let Some(f) = f else {
            return Err(PostError {
                posted: 0,
                err: VerbsError {
                    call: "ibv_post_send",
                    reason: "provider has no post_send".into(),
                },
            });
        };
        // SAFETY: the chain and SGE arrays are valid for the call (the provider copies them
        // into the send queue before returning); the memory the SGEs name stays registered
        // and valid until completion (our caller's contract).
        let rc = unsafe { f(self.ptr, wr_base, &mut bad) };
        if rc != 0 {
            return Err(PostError {
                posted: posted_before(wr_base, bad, n),
                err: rc_err("ibv_post_send", rc),
            });
        }
        Ok(())
    }

    /// Posts one receive of `[addr, addr + len)` in `buf` with `wr_id`.
    pub fn post_recv(&self, buf: &OwnedBuf, off: usize, len: usize, wr_id: u64) -> VResult<()> {
        if off.checked_add(len).is_none_or(|e| e > buf.len()) {
            return Err(VerbsError {
                call: "ibv_post_recv",
                reason: format!("slot {off}+{len} outside a buffer of {}", buf.len()),
            });
        }
        let mut sge = IbvSge {
            addr: buf.addr(off),
            length: u32::try_from(len).unwrap_or(u32::MAX),
            lkey: buf.mr().lkey(),
        };
        let mut wr = IbvRecvWr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut IbvRecvWr = std::ptr::null_mut();
        // SAFETY: live QP; ops table filled by the provider (as the inline ibv_post_recv).
        let f = unsafe { (*(*self.ptr).context).ops.post_recv };
        let Some(f) = f else {
            return Err(VerbsError {
                call: "ibv_post_recv",
                reason: "provider has no post_recv".into(),
            });
        };
        // SAFETY: `wr` and `sge` are valid for the call; the slot lies inside `buf`, which
        // outlives the QP's use of it (the owner drops the QP before the buffer).
        let rc = unsafe { f(self.ptr, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err("ibv_post_recv", rc));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batch_records_ranges_and_keeps_its_capacity() {
        let sge = |a: u64| IbvSge {
            addr: a,
            length: 8,
            lkey: 1,
        };
        let mut b = SendBatch::default();
        assert!(b.is_empty());
        b.push(7, WR_RDMA_WRITE, [sge(0), sge(8)], 0x1000, 42);
        b.push(8, WR_SEND, [], 0, 0);
        b.push(9, WR_RDMA_READ, [sge(16)], 0x2000, 43);
        assert_eq!(b.len(), 3);
        assert_eq!(b.ranges, vec![(0, 2), (2, 0), (2, 1)]);
        assert_eq!(b.wrs[0].num_sge, 2);
        assert_eq!(b.wrs[1].num_sge, 0);
        assert_eq!(
            (
                b.wrs[2].wr_id,
                b.wrs[2].rdma_remote_addr,
                b.wrs[2].rdma_rkey
            ),
            (9, 0x2000, 43)
        );
        assert!(b.wrs.iter().all(|w| w.send_flags == SEND_SIGNALED));
        let caps = (b.wrs.capacity(), b.sges.capacity(), b.ranges.capacity());
        for round in 0..100u64 {
            b.clear();
            b.push(round, WR_RDMA_WRITE, [sge(0), sge(8)], 0, 0);
            b.push(round, WR_RDMA_WRITE, [sge(16)], 0, 0);
        }
        assert_eq!(
            (b.wrs.capacity(), b.sges.capacity(), b.ranges.capacity()),
            caps,
            "reuse allocates nothing"
        );
    }

    #[test]
    fn a_refused_chain_counts_what_was_posted_before_bad_wr() {
        let mut b = SendBatch::default();
        for i in 0..5 {
            b.push(i, WR_RDMA_WRITE, [], 0, 0);
        }
        let base = b.wrs.as_ptr();
        // bad_wr = the third: two were posted.
        assert_eq!(posted_before(base, base.wrapping_add(2), 5), 2);
        assert_eq!(posted_before(base, base, 5), 0);
        // Null, before the chain, misaligned or past it: read as nothing posted / all of it.
        assert_eq!(posted_before(base, std::ptr::null(), 5), 0);
        assert_eq!(posted_before(base.wrapping_add(1), base, 5), 0);
        let odd = (base as usize + 3) as *const IbvSendWr;
        assert_eq!(posted_before(base, odd, 5), 0);
        assert_eq!(posted_before(base, base.wrapping_add(9), 5), 5);
    }
}
