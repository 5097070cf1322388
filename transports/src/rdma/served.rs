//! The target side: the lanes peers connected to us ([`ServedLane`]), the regions they may
//! reach, and the `State` methods that accept, serve and tear them down.

use super::*;

pub(super) struct ServedLane {
    // Declared first: the QP goes before the buffers it receives into.
    pub(super) qp: LaneQp,
    pub(super) bufs: OwnedBuf,
    pub(super) slot: usize,
    pub(super) token: AtomicU64,
    pub(super) peer: String,
    /// Notifications delivered on the connection (shared by its lanes).
    pub(super) dedup: Arc<Mutex<notif::Dedup>>,
}

impl ServedLane {
    pub(super) fn post_slot(&self, slot: usize) -> std::result::Result<(), verbs::VerbsError> {
        let token = self.token.load(Ordering::Acquire);
        self.qp.qp.post_recv(
            &self.bufs,
            slot * self.slot,
            self.slot,
            (token << 24) | slot as u64,
        )
    }

    pub(super) fn on_recv(&self, st: &State, slot: usize, wc: &IbvWc) {
        if wc.status != verbs::WC_SUCCESS {
            // Flushed (QP closing or broken): the lane is gone; nothing to repost.
            if wc.status != verbs::WC_WR_FLUSH_ERR {
                tracing::warn!(peer = %self.peer, status = wc.status, "rdma receive failed");
            }
            return;
        }
        let len = (wc.byte_len as usize).min(self.slot);
        match self.bufs.read(slot * self.slot, len) {
            Some(mut buf) => match notif::split(&buf).map(|(seq, _)| seq) {
                Some(seq) => {
                    if self.dedup.lock().accept(seq) {
                        buf.drain(..notif::HEADER);
                        // The notification follows the data on the same QP, so the WRITEs have
                        // landed in memory; for VRAM the GPU must also be told to see them.
                        for ctx in st.gdr_flush.lock().iter() {
                            if let Err(e) = ctx.flush_gdr_writes() {
                                tracing::warn!(error = %e, "rdma: flushing GPUDirect writes failed");
                            }
                        }
                        // A refusal (queue over its budget) is counted and logged by `deliver`.
                        let _ = st.target.deliver(&self.peer, buf);
                    } else {
                        metrics::counter!("nixl_rdma_duplicate_notifs_total").increment(1);
                        tracing::debug!(peer = %self.peer, seq, "rdma: duplicate notification dropped");
                    }
                }
                None => tracing::warn!(
                    peer = %self.peer,
                    len,
                    "rdma notification shorter than its header: dropped"
                ),
            },
            None => tracing::warn!(peer = %self.peer, slot, "rdma receive slot out of range"),
        }
        if let Err(e) = self.post_slot(slot) {
            tracing::warn!(peer = %self.peer, error = %e, "rdma receive repost failed");
        }
    }
}

pub(super) struct ServedConn {
    pub(super) lanes: Vec<Arc<ServedLane>>,
    pub(super) instance_id: u128,
    pub(super) seq: u64,
}

impl State {
    /// DRAM: an MR on every NIC; the NICs nearest to the NUMA node of the first page.
    pub(super) fn register_dram(
        &self,
        desc: &Desc,
        access: i32,
    ) -> Result<(Vec<Option<Mr>>, NicMask)> {
        let mut mrs = Vec::with_capacity(self.nics.len());
        for nic in &self.nics {
            // SAFETY: `register` is called only by the agent under `Agent::register`'s contract:
            // the caller keeps the memory allocated until the region is deregistered, and
            // `deregister` drops these MRs (after the agent has drained the region's users).
            let mr = unsafe { nic.pd.reg_mr(desc.addr, desc.len, access) };
            match mr {
                Ok(m) => mrs.push(Some(m)),
                Err(e) => return Err(err("register", format!("{} {desc:?}: {e}", nic.name))),
            }
        }
        // Asked after ibv_reg_mr pinned (and so placed) the page.
        let near = match place::numa_node_of(desc.addr) {
            Some(node) => place::nearest(
                &self.cfg.sysfs,
                &self.topo,
                &self.names,
                &topo::MemLocation::Numa(node),
            ),
            None => place::all(self.nics.len()),
        };
        Ok((mrs, near))
    }

    pub(super) fn drop_served(&self, conn: ServedConn) {
        for l in &conn.lanes {
            self.disown(l.token.load(Ordering::Acquire));
            let _ = l.qp.qp.to_err();
        }
    }

    pub(super) fn accept(
        &self,
        peer: &str,
        conn_id: u64,
        instance_id: u128,
        lanes: &[QpAddr],
    ) -> std::result::Result<Vec<u8>, String> {
        let mut served = Vec::with_capacity(lanes.len());
        match self.accept_lanes(peer, lanes, &mut served) {
            Ok(reply) => {
                self.keep_served(peer, conn_id, instance_id, served);
                Ok(Msg::Accept { lanes: reply }.encode())
            }
            Err(e) => {
                for l in &served {
                    self.disown(l.token.load(Ordering::Acquire));
                }
                Err(e)
            }
        }
    }

    pub(super) fn accept_lanes(
        &self,
        peer: &str,
        lanes: &[QpAddr],
        served: &mut Vec<Arc<ServedLane>>,
    ) -> std::result::Result<Vec<QpAddr>, String> {
        let slot = self.cfg.max_notif as usize + notif::HEADER;
        let dedup = Arc::new(Mutex::new(notif::Dedup::default()));
        let mut reply = Vec::with_capacity(lanes.len());
        for (i, q) in lanes.iter().enumerate() {
            let nic = self
                .nics
                .get(usize::from(q.target_nic))
                .ok_or_else(|| format!("lane {i}: no NIC {} here", q.target_nic))?;
            let lq = nic
                .create_qp(1, self.cfg.recv_depth, 1)
                .map_err(|e| format!("lane {i}: {e}"))?;
            check_gid_kinds(&nic.name, &nic.gid, &q.gid, nic.link_layer)
                .map_err(|e| format!("lane {i}: {e}"))?;
            let path = nic.path(&self.cfg, q.mtu, q.rd_atomic);
            let remote = RemoteQp {
                qpn: q.qpn,
                psn: q.psn,
                lid: q.lid,
                gid: q.gid,
            };
            let psn = random24();
            lq.qp
                .to_rtr(&remote, &path)
                .and_then(|()| lq.qp.to_rts(psn, &path))
                .map_err(|e| format!("lane {i} on {}: {e}", nic.name))?;
            let depth = self.cfg.recv_depth as usize;
            let bufs = OwnedBuf::new(&nic.pd, slot * depth, 0)
                .map_err(|e| format!("lane {i} receive buffers on {}: {e}", nic.name))?;
            let lane = Arc::new(ServedLane {
                qp: lq,
                bufs,
                slot,
                token: AtomicU64::new(0),
                peer: peer.to_owned(),
                dedup: Arc::clone(&dedup),
            });
            let token = self
                .own(Owner::Recv(Arc::clone(&lane)))
                .ok_or_else(|| format!("lane {i}: {}", State::full()))?;
            lane.token.store(token, Ordering::Release);
            served.push(Arc::clone(&lane));
            for s in 0..depth {
                lane.post_slot(s).map_err(|e| format!("lane {i}: {e}"))?;
            }
            reply.push(QpAddr {
                target_nic: q.target_nic,
                qpn: lane.qp.qp.qpn(),
                psn,
                lid: nic.lid,
                gid: nic.gid,
                mtu: nic.mtu,
                rd_atomic: nic.rd_atomic,
            });
        }
        Ok(reply)
    }

    pub(super) fn keep_served(
        &self,
        peer: &str,
        conn_id: u64,
        instance_id: u128,
        served: Vec<Arc<ServedLane>>,
    ) {
        let seq = self.served_seq.fetch_add(1, Ordering::Relaxed);
        let mut map = self.served.lock();
        // A new incarnation of the peer: its old connections are dead.
        let stale: Vec<(String, u64)> = map
            .iter()
            .filter(|((p, _), c)| p == peer && c.instance_id != instance_id)
            .map(|(k, _)| k.clone())
            .collect();
        let mut dropped: Vec<ServedConn> = stale.iter().filter_map(|k| map.remove(k)).collect();
        let mut mine: Vec<((String, u64), u64)> = map
            .iter()
            .filter(|((p, _), _)| p == peer)
            .map(|(k, c)| (k.clone(), c.seq))
            .collect();
        mine.sort_by_key(|(_, s)| *s);
        while mine.len() >= MAX_SERVED_PER_PEER {
            let (k, _) = mine.remove(0);
            dropped.extend(map.remove(&k));
        }
        if let Some(old) = map.insert(
            (peer.to_owned(), conn_id),
            ServedConn {
                lanes: served,
                instance_id,
                seq,
            },
        ) {
            dropped.push(old);
        }
        drop(map);
        for c in dropped {
            self.drop_served(c);
        }
    }
}
