//! The raw layer: constants, `repr(C)` structs (checked against verbs.h by the
//! `verbs_layout` test through [`layout`] and [`constants`]) and the entry points' types.

use super::*;

// ---------------------------------------------------------------------------------------------
// Raw layer: constants.
// ---------------------------------------------------------------------------------------------

/// `IBV_ACCESS_LOCAL_WRITE`.
pub(crate) const ACCESS_LOCAL_WRITE: c_int = 1;
/// `IBV_ACCESS_REMOTE_WRITE`.
pub(crate) const ACCESS_REMOTE_WRITE: c_int = 1 << 1;
/// `IBV_ACCESS_REMOTE_READ`.
pub(crate) const ACCESS_REMOTE_READ: c_int = 1 << 2;

/// `IBV_QPT_RC`.
pub(crate) const QPT_RC: c_uint = 2;
/// `IBV_QPS_RESET` .. `IBV_QPS_ERR`.
pub(crate) const QPS_INIT: c_uint = 1;
/// `IBV_QPS_RTR`.
pub(crate) const QPS_RTR: c_uint = 2;
/// `IBV_QPS_RTS`.
pub(crate) const QPS_RTS: c_uint = 3;
/// `IBV_QPS_ERR`.
pub(crate) const QPS_ERR: c_uint = 6;

/// `ibv_qp_attr_mask` bits.
pub(crate) mod qp_mask {
    use std::ffi::c_int;
    /// `IBV_QP_STATE`.
    pub(crate) const STATE: c_int = 1;
    /// `IBV_QP_ACCESS_FLAGS`.
    pub(crate) const ACCESS_FLAGS: c_int = 1 << 3;
    /// `IBV_QP_PKEY_INDEX`.
    pub(crate) const PKEY_INDEX: c_int = 1 << 4;
    /// `IBV_QP_PORT`.
    pub(crate) const PORT: c_int = 1 << 5;
    /// `IBV_QP_AV`.
    pub(crate) const AV: c_int = 1 << 7;
    /// `IBV_QP_PATH_MTU`.
    pub(crate) const PATH_MTU: c_int = 1 << 8;
    /// `IBV_QP_TIMEOUT`.
    pub(crate) const TIMEOUT: c_int = 1 << 9;
    /// `IBV_QP_RETRY_CNT`.
    pub(crate) const RETRY_CNT: c_int = 1 << 10;
    /// `IBV_QP_RNR_RETRY`.
    pub(crate) const RNR_RETRY: c_int = 1 << 11;
    /// `IBV_QP_RQ_PSN`.
    pub(crate) const RQ_PSN: c_int = 1 << 12;
    /// `IBV_QP_MAX_QP_RD_ATOMIC`.
    pub(crate) const MAX_QP_RD_ATOMIC: c_int = 1 << 13;
    /// `IBV_QP_MIN_RNR_TIMER`.
    pub(crate) const MIN_RNR_TIMER: c_int = 1 << 15;
    /// `IBV_QP_SQ_PSN`.
    pub(crate) const SQ_PSN: c_int = 1 << 16;
    /// `IBV_QP_MAX_DEST_RD_ATOMIC`.
    pub(crate) const MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
    /// `IBV_QP_DEST_QPN`.
    pub(crate) const DEST_QPN: c_int = 1 << 20;
}

/// `IBV_WR_RDMA_WRITE`.
pub(crate) const WR_RDMA_WRITE: c_uint = 0;
/// `IBV_WR_SEND`.
pub(crate) const WR_SEND: c_uint = 2;
/// `IBV_WR_RDMA_READ`.
pub(crate) const WR_RDMA_READ: c_uint = 4;
/// `IBV_SEND_SIGNALED`.
pub(crate) const SEND_SIGNALED: c_uint = 1 << 1;

/// `IBV_WC_SUCCESS`.
pub(crate) const WC_SUCCESS: c_uint = 0;
/// `IBV_WC_WR_FLUSH_ERR`.
pub(crate) const WC_WR_FLUSH_ERR: c_uint = 5;
/// `IBV_WC_REM_ACCESS_ERR`.
pub(crate) const WC_REM_ACCESS_ERR: c_uint = 10;
/// `IBV_WC_RETRY_EXC_ERR`.
pub(crate) const WC_RETRY_EXC_ERR: c_uint = 12;
/// `IBV_WC_RNR_RETRY_EXC_ERR`.
pub(crate) const WC_RNR_RETRY_EXC_ERR: c_uint = 13;
/// `IBV_WC_RECV`.
pub(crate) const WC_RECV: c_uint = 128;

/// `IBV_PORT_ACTIVE`.
pub(crate) const PORT_ACTIVE: c_uint = 4;
/// `IBV_LINK_LAYER_INFINIBAND`.
pub(crate) const LINK_LAYER_INFINIBAND: u8 = 1;
/// `IBV_LINK_LAYER_ETHERNET`.
pub(crate) const LINK_LAYER_ETHERNET: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Raw layer: structs.
// ---------------------------------------------------------------------------------------------

/// `struct ibv_device` (opaque).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvDevice {
    pub(super) _opaque: [u8; 0],
}

/// `struct ibv_context_ops`: 32 function pointers; the data path uses three of them.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvContextOps {
    pub(super) _before_poll_cq: [*const c_void; 11],
    /// `poll_cq`.
    pub poll_cq: Option<unsafe extern "C" fn(*mut IbvCq, c_int, *mut IbvWc) -> c_int>,
    pub(super) _before_post_send: [*const c_void; 13],
    /// `post_send`.
    pub post_send:
        Option<unsafe extern "C" fn(*mut IbvQp, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int>,
    /// `post_recv`.
    pub post_recv:
        Option<unsafe extern "C" fn(*mut IbvQp, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int>,
    pub(super) _after_post_recv: [*const c_void; 5],
}

/// `struct ibv_context` (leading fields only; never allocated here).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvContext {
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
pub(crate) struct IbvDeviceAttr {
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
    pub(super) _max_ee_rd_atom: c_int,
    pub(super) _max_res_rd_atom: c_int,
    /// `max_qp_init_rd_atom`.
    pub max_qp_init_rd_atom: c_int,
    pub(super) _rest: [c_int; 16],
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
pub(crate) struct IbvPortAttr {
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
    pub(super) _bad_pkey_cntr: u32,
    pub(super) _qkey_viol_cntr: u32,
    pub(super) _pkey_tbl_len: u16,
    /// `lid`.
    pub lid: u16,
    /// `sm_lid`.
    pub sm_lid: u16,
    pub(super) _lmc: u8,
    pub(super) _max_vl_num: u8,
    pub(super) _sm_sl: u8,
    pub(super) _subnet_timeout: u8,
    pub(super) _init_type_reply: u8,
    /// `active_width`.
    pub active_width: u8,
    /// `active_speed`.
    pub active_speed: u8,
    /// `phys_state`.
    pub phys_state: u8,
    /// `link_layer`.
    pub link_layer: u8,
    pub(super) _flags: u8,
    pub(super) _port_cap_flags2: u16,
    /// `active_speed_ex` (rdma-core 47+, DOCA/MLNX-OFED: speeds past what `active_speed` can
    /// name). The exported `ibv_query_port` fills only the compat prefix, so it reads 0 here;
    /// it is declared so that this struct is at least as large as any verbs.h's.
    pub active_speed_ex: u32,
}

/// `union ibv_gid`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub(crate) struct IbvGid {
    /// `raw`.
    pub raw: [u8; 16],
}

/// `struct ibv_pd`.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvPd {
    /// `context`.
    pub context: *mut IbvContext,
    /// `handle`.
    pub handle: u32,
}

/// `struct ibv_mr`.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvMr {
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
pub(crate) struct IbvCq {
    /// `context`.
    pub context: *mut IbvContext,
}

/// `struct ibv_qp` (leading fields only).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvQp {
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
pub(crate) struct IbvQpCap {
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
pub(crate) struct IbvQpInitAttr {
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
pub(crate) struct IbvGlobalRoute {
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
pub(crate) struct IbvAhAttr {
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
pub(crate) struct IbvQpAttr {
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
pub(crate) struct IbvSge {
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
pub(crate) struct IbvSendWr {
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
    pub(super) _wr_rest: [u32; 5],
    pub(super) _qp_type: u32,
    pub(super) _bind_mw_or_tso: [u64; 6],
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IbvRecvWr {
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
pub(crate) struct IbvWc {
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

pub(super) type GetDeviceList = unsafe extern "C" fn(*mut c_int) -> *mut *mut IbvDevice;
pub(super) type FreeDeviceList = unsafe extern "C" fn(*mut *mut IbvDevice);
pub(super) type GetDeviceName = unsafe extern "C" fn(*mut IbvDevice) -> *const c_char;
pub(super) type GetDeviceGuid = unsafe extern "C" fn(*mut IbvDevice) -> u64;
pub(super) type OpenDevice = unsafe extern "C" fn(*mut IbvDevice) -> *mut IbvContext;
pub(super) type CloseDevice = unsafe extern "C" fn(*mut IbvContext) -> c_int;
pub(super) type QueryDevice = unsafe extern "C" fn(*mut IbvContext, *mut IbvDeviceAttr) -> c_int;
pub(super) type QueryPort = unsafe extern "C" fn(*mut IbvContext, u8, *mut IbvPortAttr) -> c_int;
pub(super) type QueryGid = unsafe extern "C" fn(*mut IbvContext, u8, c_int, *mut IbvGid) -> c_int;
pub(super) type AllocPd = unsafe extern "C" fn(*mut IbvContext) -> *mut IbvPd;
pub(super) type DeallocPd = unsafe extern "C" fn(*mut IbvPd) -> c_int;
pub(super) type RegMr = unsafe extern "C" fn(*mut IbvPd, *mut c_void, usize, c_int) -> *mut IbvMr;
pub(super) type RegDmabufMr =
    unsafe extern "C" fn(*mut IbvPd, u64, usize, u64, c_int, c_int) -> *mut IbvMr;
pub(super) type DeregMr = unsafe extern "C" fn(*mut IbvMr) -> c_int;
pub(super) type CreateCq =
    unsafe extern "C" fn(*mut IbvContext, c_int, *mut c_void, *mut c_void, c_int) -> *mut IbvCq;
pub(super) type DestroyCq = unsafe extern "C" fn(*mut IbvCq) -> c_int;
pub(super) type CreateQp = unsafe extern "C" fn(*mut IbvPd, *mut IbvQpInitAttr) -> *mut IbvQp;
pub(super) type ModifyQp = unsafe extern "C" fn(*mut IbvQp, *mut IbvQpAttr, c_int) -> c_int;
pub(super) type DestroyQp = unsafe extern "C" fn(*mut IbvQp) -> c_int;
pub(super) type WcStatusStr = unsafe extern "C" fn(c_uint) -> *const c_char;
