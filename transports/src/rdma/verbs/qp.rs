//! Queue pairs: connecting (INIT, RTR, RTS), posting sends, receives and batches of
//! RDMA reads and writes, polling completions.

use super::*;

/// Where a QP connects to: the peer's side of a lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RemoteQp {
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
pub(crate) struct PathCfg {
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
pub(crate) struct Qp {
    pub(super) obj: Owned<QpKind>,
}

/// What a QP is made from: its CQ and its PD (released in that order after it).
pub(super) struct QpParents {
    pub(super) _cq: Cq,
    pub(super) pd: Pd,
}

pub(super) struct QpKind;

// SAFETY: posting to a QP is thread-safe per the verbs API (providers lock the queues);
// destroying it discards outstanding WRs.
unsafe impl Kind for QpKind {
    type Raw = IbvQp;
    type Parent = QpParents;
    const DESTROY: &'static str = "ibv_destroy_qp";
    fn destroy(p: &QpParents) -> (DestroyQp, &str) {
        (p.pd.context().verbs().fns.destroy_qp, p.pd.context().name())
    }
}

impl Qp {
    /// The PD it was made on.
    fn pd(&self) -> &Pd {
        &self.obj.parent.pd
    }
}

impl fmt::Debug for Qp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Qp({}, {})", self.pd().context().name(), self.qpn())
    }
}

/// One send work request to build: (`wr_id`, opcode, local pieces, remote address, rkey).
#[derive(Clone, Debug)]
pub(crate) struct SendReq<'a> {
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
pub(crate) struct SendBatch {
    pub(super) wrs: Vec<IbvSendWr>,
    pub(super) sges: Vec<IbvSge>,
    /// (first SGE, SGE count) per WR.
    pub(super) ranges: Vec<(usize, usize)>,
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
    pub(crate) fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
        self.ranges.clear();
    }

    #[cfg(test)]
    /// Number of work requests.
    pub(crate) fn len(&self) -> usize {
        self.wrs.len()
    }

    #[cfg(test)]
    /// Whether there is none.
    pub(crate) fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }

    /// Appends one signalled work request (`wr_id`, opcode, local pieces each inside an MR
    /// whose lkey it carries, remote address and rkey for RDMA).
    pub(crate) fn push(
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
    pub(crate) fn qpn(&self) -> u32 {
        // SAFETY: live QP; qp_num is set at creation and never changes.
        unsafe { (*self.obj.ptr).qp_num }
    }

    fn modify(&self, attr: &mut IbvQpAttr, mask: c_int, what: &'static str) -> VResult<()> {
        // SAFETY: live QP, complete attr.
        let rc = unsafe { (self.pd().context().verbs().fns.modify_qp)(self.obj.ptr, attr, mask) };
        if rc != 0 {
            return Err(rc_err(what, rc));
        }
        Ok(())
    }

    /// RESET → INIT, allowing remote READ and WRITE.
    pub(crate) fn to_init(&self, port: u8) -> VResult<()> {
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
    pub(crate) fn to_rtr(&self, remote: &RemoteQp, path: &PathCfg) -> VResult<()> {
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
    pub(crate) fn to_rts(&self, psn: u32, path: &PathCfg) -> VResult<()> {
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
    pub(crate) fn to_err(&self) -> VResult<()> {
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
    pub(crate) unsafe fn post_send(&self, reqs: &[SendReq<'_>]) -> Result<(), PostError> {
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
    pub(crate) unsafe fn post_batch(&self, batch: &mut SendBatch) -> Result<(), PostError> {
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
        let f = unsafe { (*(*self.obj.ptr).context).ops.post_send };
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
        let rc = unsafe { f(self.obj.ptr, wr_base, &mut bad) };
        if rc != 0 {
            return Err(PostError {
                posted: posted_before(wr_base, bad, n),
                err: rc_err("ibv_post_send", rc),
            });
        }
        Ok(())
    }

    /// Posts one receive of `[addr, addr + len)` in `buf` with `wr_id`.
    pub(crate) fn post_recv(
        &self,
        buf: &OwnedBuf,
        off: usize,
        len: usize,
        wr_id: u64,
    ) -> VResult<()> {
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
        let f = unsafe { (*(*self.obj.ptr).context).ops.post_recv };
        let Some(f) = f else {
            return Err(VerbsError {
                call: "ibv_post_recv",
                reason: "provider has no post_recv".into(),
            });
        };
        // SAFETY: `wr` and `sge` are valid for the call; the slot lies inside `buf`, which
        // outlives the QP's use of it (the owner drops the QP before the buffer).
        let rc = unsafe { f(self.obj.ptr, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err("ibv_post_recv", rc));
        }
        Ok(())
    }
}
