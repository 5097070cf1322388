//! `RdmaBackend` as the agent sees it (the `Backend` trait: probe, start, registration,
//! connections, shutdown) and as the control channel serves it (QP set-up and revocations).

use super::*;

impl Backend for RdmaBackend {
    fn name(&self) -> BackendName {
        BackendName::Rdma
    }

    fn caps(&self) -> Caps {
        Caps::new(KINDS, Locality::AnyNode, 4)
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        self.cfg.check()?;
        let verbs = self.verbs()?;
        self.device_names(&verbs)
            .map(|_| ())
            .map_err(Unusable::Reason)
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        self.cfg.check().map_err(unavailable)?;
        crate::limits::raise_nofile();
        let verbs = self.verbs().map_err(unavailable)?;
        let names = self.device_names(&verbs).map_err(unavailable)?;
        let mut nics = Vec::new();
        let mut skipped = Vec::new();
        for name in names {
            if nics.len() >= wire::MAX_NICS {
                break;
            }
            match self.open_nic(&verbs, nics.len() as u8, &name) {
                Ok(n) => nics.push(Arc::new(n)),
                Err(e) if self.cfg.devices.is_some() => {
                    return Err(unavailable(format!("configured device {name}: {e}")))
                }
                Err(e) => skipped.push(format!("{name}: {e}")),
            }
        }
        if nics.is_empty() {
            return Err(unavailable(format!(
                "no usable RDMA device ({})",
                skipped.join("; ")
            )));
        }
        for s in &skipped {
            tracing::info!(reason = %s, "rdma device skipped");
        }
        let names = nics.iter().map(|n| n.name.clone()).collect();
        let state = Arc::new(State {
            cfg: self.cfg.clone(),
            nics,
            names,
            topo: dmabuf::scan_topology(&self.cfg.sysfs),
            target,
            regions: Mutex::new(HashMap::new()),
            owners: Slab::new(),
            served: Mutex::new(HashMap::new()),
            served_seq: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            gdr_flush: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            poller: Mutex::new(None),
        });
        let st = Arc::clone(&state);
        let h = std::thread::Builder::new()
            .name("nixl-rdma-poll".into())
            .spawn(move || st.poll_loop())
            .map_err(|e| Error::io("spawning the rdma poller", e))?;
        *state.poller.lock() = Some(h);
        if self.state.set(state).is_err() {
            return Err(err("start", "started twice"));
        }
        let svc: Weak<dyn ControlService> = self.me.clone();
        self.control.serve(BackendName::Rdma, svc);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        match self.state.get() {
            Some(st) => st.conn_info(self.control.endpoint()).encode(),
            None => Vec::new(),
        }
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        let st = self.state()?;
        let access =
            verbs::ACCESS_LOCAL_WRITE | verbs::ACCESS_REMOTE_READ | verbs::ACCESS_REMOTE_WRITE;
        let (mrs, near) = match kind {
            MemKind::Dram => st.register_dram(desc, access)?,
            MemKind::Vram => dmabuf::register(st, desc, access)?,
            k => {
                return Err(Error::InvalidArgument(format!(
                    "rdma registers DRAM and VRAM, not {k}"
                )))
            }
        };
        let keys = RegionKeys {
            addr: desc.addr,
            len: desc.len,
            rkeys: mrs
                .iter()
                .zip(&st.nics)
                .filter_map(|(m, n)| m.as_ref().map(|m| (n.idx, m.rkey())))
                .collect(),
        };
        st.regions.lock().insert(
            (kind.code(), desc.addr, desc.len, desc.dev_id),
            RegionMrs { mrs, near },
        );
        Ok(keys.encode())
    }

    fn deregister(&self, region: Registered<'_>) {
        if let Some(st) = self.state.get() {
            let k = (
                region.kind.code(),
                region.desc.addr,
                region.desc.len,
                region.desc.dev_id,
            );
            let mrs = st.regions.lock().remove(&k);
            drop(mrs);
        }
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        let st = self.state().map_err(Unusable::from_error)?;
        let ci =
            ConnInfo::decode(conn_info).map_err(|e| format!("bad rdma connection info: {e}"))?;
        if ci.endpoint.is_empty() {
            return Err("the peer's control channel is not serving".into());
        }
        if !ci
            .nics
            .iter()
            .any(|r| st.nics.iter().any(|n| n.link_layer == r.link_layer))
        {
            return Err("no NIC of the peer shares a link layer with ours".into());
        }
        Ok(())
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let st = Arc::clone(self.state()?);
        let remote = ConnInfo::decode(peer.conn_info).map_err(|e| {
            Error::InvalidArgument(format!(
                "peer '{}': bad rdma connection info: {e}",
                peer.name
            ))
        })?;
        let local_ll: Vec<u8> = st.nics.iter().map(|n| n.link_layer).collect();
        let remote_ll: Vec<u8> = remote.nics.iter().map(|n| n.link_layer).collect();
        let pairs: Vec<(Arc<Nic>, u8)> = pair_nics(&local_ll, &remote_ll)
            .into_iter()
            .map(|(l, r)| (Arc::clone(&st.nics[l]), r))
            .collect();
        if pairs.is_empty() {
            return Err(err(
                "connect",
                format!(
                    "no NIC of peer '{}' shares a link layer with ours",
                    peer.name
                ),
            ));
        }
        let total = pairs.len() * self.cfg.qps_per_nic;
        if total > wire::MAX_LANES {
            return Err(Error::InvalidArgument(format!(
                "{total} lanes to peer '{}' exceed the handshake limit of {}: lower [rdma] qps_per_nic",
                peer.name,
                wire::MAX_LANES
            )));
        }
        let max_sge = self.cfg.max_sge;
        let mut lanes = Vec::new();
        let mut req = Vec::new();
        for (nic, rnic) in &pairs {
            for _ in 0..self.cfg.qps_per_nic {
                let sge = max_sge.min(nic.max_sge).min(nic.max_sge_rd).max(1);
                let lq = nic.create_qp(self.cfg.max_outstanding + 2, 1, sge)?;
                let psn = random24();
                req.push(QpAddr {
                    target_nic: *rnic,
                    qpn: lq.qp.qpn(),
                    psn,
                    lid: nic.lid,
                    gid: nic.gid,
                    mtu: nic.mtu,
                    rd_atomic: nic.rd_atomic,
                });
                lanes.push((lq, *rnic, psn));
            }
        }
        let conn_id = random_u64();
        let msg = Msg::Connect {
            conn_id,
            instance_id: st.target.instance_id(),
            lanes: req,
        };
        let reply = self.control.call(
            &remote.endpoint,
            st.target.name(),
            BackendName::Rdma,
            &msg.encode(),
            self.cfg.connect_timeout,
        )?;
        let close = |e: Error| {
            // The peer set up its side: let it free those QPs (best effort).
            let _ = self.control.call(
                &remote.endpoint,
                st.target.name(),
                BackendName::Rdma,
                &Msg::Close { conn_id }.encode(),
                Duration::from_secs(1),
            );
            e
        };
        let theirs = match Msg::decode(&reply) {
            Ok(Msg::Accept { lanes }) if lanes.len() == total => lanes,
            Ok(other) => {
                return Err(close(err(
                    "connect",
                    format!("peer '{}' answered {other:?} to a connect", peer.name),
                )))
            }
            Err(e) => {
                return Err(close(err(
                    "connect",
                    format!("peer '{}' sent a bad handshake reply: {e}", peer.name),
                )))
            }
        };
        let mut out = Vec::with_capacity(lanes.len());
        for ((lq, rnic, psn), t) in lanes.into_iter().zip(theirs) {
            if t.target_nic != rnic {
                return Err(close(err(
                    "connect",
                    format!("peer '{}' answered for another NIC", peer.name),
                )));
            }
            check_gid_kinds(&lq.nic.name, &lq.nic.gid, &t.gid, lq.nic.link_layer)
                .map_err(|e| close(err("connect", e)))?;
            let path = lq.nic.path(&self.cfg, t.mtu, t.rd_atomic);
            let remote_qp = RemoteQp {
                qpn: t.qpn,
                psn: t.psn,
                lid: t.lid,
                gid: t.gid,
            };
            lq.qp
                .to_rtr(&remote_qp, &path)
                .and_then(|()| lq.qp.to_rts(psn, &path))
                .map_err(|e| close(err("connect", format!("{}: {e}", lq.nic.name))))?;
            out.push(Lane {
                free: AtomicU32::new(lq.send_slots),
                qp: lq,
                remote_nic: rnic,
                up: AtomicBool::new(true),
            });
        }
        let conn = Arc::new_cyclic(|me| RdmaConn {
            me: me.clone(),
            st: Arc::clone(&st),
            control: Arc::clone(&self.control),
            peer: peer.name.to_owned(),
            conn_id,
            remote,
            lanes: out,
            closed: AtomicBool::new(false),
            timeout: self.cfg.connect_timeout,
            waiters: Mutex::new(Vec::new()),
            has_waiters: AtomicBool::new(false),
            notif_seq: AtomicU64::new(0),
        });
        let mut conns = st.conns.lock();
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(st) = self.state.get() else {
            return;
        };
        st.stop.store(true, Ordering::Release);
        if let Some(h) = st.poller.lock().take() {
            let _ = h.join();
        }
        // Stop the hardware: every QP to ERR, so the NICs no longer touch memory.
        for c in st.conns.lock().drain(..).filter_map(|w| w.upgrade()) {
            c.closed.store(true, Ordering::Release);
            for l in &c.lanes {
                l.up.store(false, Ordering::Release);
                let _ = l.qp.qp.to_err();
            }
        }
        let served: Vec<ServedConn> = st.served.lock().drain().map(|(_, c)| c).collect();
        for c in served {
            st.drop_served(c);
        }
        for o in st.owners.drain() {
            match o {
                Owner::Post(p) => p.cancel_now(Error::Cancelled),
                Owner::Sync(s) => s.finish(Err((0, "the rdma backend shut down".into()))),
                Owner::Recv(_) => {}
            }
        }
        st.regions.lock().clear();
    }
}

impl ControlService for RdmaBackend {
    fn handle(&self, peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let st = self.state().map_err(|e| e.to_string())?;
        match Msg::decode(req).map_err(|e| format!("bad rdma control message: {e}"))? {
            Msg::Connect {
                conn_id,
                instance_id,
                lanes,
            } => st.accept(peer, conn_id, instance_id, &lanes),
            Msg::Close { conn_id } => {
                let c = st.served.lock().remove(&(peer.to_owned(), conn_id));
                if let Some(c) = c {
                    st.drop_served(c);
                }
                Ok(Msg::Ok.encode())
            }
            other => Err(format!("unexpected rdma control message {other:?}")),
        }
    }
}
