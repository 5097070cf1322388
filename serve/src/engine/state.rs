//! The engine thread's state: its requests, the command loop, and their bookkeeping.

use super::*;

/// How long queued work may wait for KV blocks held by other requests.
pub(crate) const QUEUE_WAIT: Duration = Duration::from_secs(30);

/// Why a prefill found no room.
pub(crate) enum NoRoom {
    /// Not now: blocks held by other requests will come back.
    Now(String),
    /// Never (bad request, larger than the cache).
    Never(String),
}

#[derive(Debug)]
pub(crate) enum State {
    /// Decode: waiting for every rank's offer from this prefill agent.
    Waiting { prefill: String, since: Instant },
    /// Decode: pulling; (rank, prefill agent, handoff id) still running.
    Pulling {
        running: Vec<(usize, String, u64)>,
        since: Instant,
    },
    /// Generating.
    Decoding,
}

#[derive(Debug)]
pub(crate) struct Req {
    pub(crate) id: String,
    /// Tokens whose KV is in the cache.
    pub(crate) tokens: Vec<u32>,
    pub(crate) table: Vec<u32>,
    /// Full blocks committed to the prefix cache.
    pub(crate) hashed: usize,
    pub(crate) next: u32,
    pub(crate) left: u32,
    pub(crate) tx: UnboundedSender<Ev>,
    pub(crate) state: State,
    pub(crate) temperature: f32,
    pub(crate) seed: u64,
}

/// An offer held on the prefill side: its blocks, and the handoffs still open.
#[derive(Debug)]
pub(crate) struct Offered {
    pub(crate) table: Vec<u32>,
    pub(crate) handoffs: Vec<u64>,
    pub(crate) since: Instant,
}

pub(crate) struct Engine<'a> {
    pub(crate) cfg: EngineConfig,
    pub(crate) model: Model,
    pub(crate) agents: &'a [Agent],
    pub(crate) regions: &'a [KvRegion],
    pub(crate) shared: Arc<Shared>,
    pub(crate) pre: Option<PrefillSide<'a>>,
    pub(crate) decs: Vec<DecodeSide<'a>>,
    pub(crate) blocks: Blocks,
    pub(crate) reqs: Vec<Req>,
    /// Prefill work (aggregated generate or prefill), first come first served.
    pub(crate) queue: std::collections::VecDeque<(Cmd, Instant)>,
    /// The first queued work waits for blocks (retried each turn, without spinning).
    pub(crate) starved: bool,
    /// Decode: offers received, by request id: (rank, offer, arrival).
    pub(crate) offers: HashMap<String, Vec<(usize, Offer, Instant)>>,
    /// Prefill: offers held, by request id.
    pub(crate) offered: HashMap<String, Offered>,
    /// Ids cancelled before their work arrived (an offer, a generate), with when.
    pub(crate) cancelled: HashMap<String, Instant>,
    /// Peer metadata already loaded.
    pub(crate) loaded: HashSet<String>,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.cfg.name)
            .finish()
    }
}

impl Engine<'_> {
    pub(crate) fn run(&mut self, rx: Receiver<Cmd>) {
        loop {
            let busy = (!self.queue.is_empty() && !self.starved)
                || self.reqs.iter().any(|r| matches!(r.state, State::Decoding));
            let first = if busy {
                rx.try_recv().ok()
            } else {
                match rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            if let Some(c) = first {
                self.command(c);
                while let Ok(c) = rx.try_recv() {
                    self.command(c);
                }
            }
            self.poll_handoffs();
            if let Some((c, since)) = self.queue.pop_front() {
                match self.prefill_work(c, since) {
                    Some(c) => {
                        self.queue.push_front((c, since));
                        self.starved = true;
                    }
                    None => self.starved = false,
                }
            }
            let stepped = self.decode_step();
            self.publish();
            if stepped && !self.cfg.step_delay.is_zero() {
                std::thread::sleep(self.cfg.step_delay);
            }
        }
    }

    pub(crate) fn publish(&self) {
        let mut s = self.shared.stats.lock();
        s.blocks_used = self.blocks.used();
        s.active_requests = self.reqs.len() + self.offered.len() + self.queue.len();
    }

    pub(crate) fn finish(&self, status: &'static str) {
        *self.shared.stats.lock().requests.entry(status).or_default() += 1;
        self.publish();
    }

    /// Ends a request that generated all its tokens: blocks released and counted before the
    /// client hears the end.
    pub(crate) fn complete(&mut self, r: Req) {
        self.blocks.release(&r.table);
        self.finish("ok");
        let _ = r.tx.send(Ev::Done("length".into()));
    }

    pub(crate) fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Peer(p, reply) => {
                let _ = reply.send(self.peer(&p));
            }
            Cmd::Cancel(id) => self.cancel(&id),
            Cmd::Generate(g, tx) if self.cfg.role == Role::Decode => self.decode_request(g, tx),
            c @ (Cmd::Generate(..) | Cmd::Prefill(..)) => self.queue.push_back((c, Instant::now())),
        }
    }

    pub(crate) fn peer(&mut self, p: &PeerInfo) -> Result<(), String> {
        if p.agents.is_empty() {
            return Err("peer has no agents".into());
        }
        for a in &p.agents {
            if self.loaded.contains(&a.metadata) {
                continue;
            }
            let md = unhex(&a.metadata)?;
            for own in self.agents {
                own.load_remote(&md)
                    .map_err(|e| format!("loading {}: {e}", a.name))?;
            }
            self.loaded.insert(a.metadata.clone());
        }
        if self.cfg.role == Role::Decode && p.role == Role::Prefill {
            let layouts = p
                .agents
                .iter()
                .map(|a| KvLayout::decode(&unhex(&a.layout)?).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, String>>()?;
            let names: Vec<String> = p.agents.iter().map(|a| a.name.clone()).collect();
            for d in &mut self.decs {
                d.add_prefill(&names[0], layouts.clone(), names.clone())
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    pub(crate) fn cancel(&mut self, id: &str) {
        let mut found = false;
        if let Some(i) = self.reqs.iter().position(|r| r.id == id) {
            let r = self.reqs.swap_remove(i);
            self.drop_req(r, "cancelled", None);
            found = true;
        }
        let before = self.queue.len();
        self.queue.retain(|(c, _)| match c {
            Cmd::Generate(g, _) => g.id != id,
            Cmd::Prefill(p, _) => p.id != id,
            _ => true,
        });
        found |= self.queue.len() != before;
        if let (Some(o), Some(pre)) = (self.offered.get(id), self.pre.as_mut()) {
            for &h in &o.handoffs {
                pre.cancel(h, "cancelled by the frontend");
            }
            found = true;
        }
        if let Some(os) = self.offers.remove(id) {
            for (rank, o, _) in os {
                self.decs[rank].cancel(&o.from, o.id, "cancelled by the frontend");
            }
            found = true;
        }
        if !found {
            self.cancelled.insert(id.to_owned(), Instant::now());
        }
    }

    /// Ends a request: stops its pulls, releases its blocks, counts it.
    pub(crate) fn drop_req(&mut self, r: Req, status: &'static str, err: Option<String>) {
        if let State::Pulling { running, .. } = &r.state {
            for (rank, from, h) in running {
                self.decs[*rank].cancel(from, *h, "request ended");
            }
        }
        // Offers that came for it are declined at once (prefill frees on the acknowledgement).
        for (rank, o, _) in self.offers.remove(&r.id).unwrap_or_default() {
            self.decs[rank].cancel(&o.from, o.id, "request ended");
        }
        self.blocks.release(&r.table);
        self.finish(status);
        if let Some(e) = err {
            eprintln!("nixl-serve worker {}: request {}: {e}", self.cfg.name, r.id);
            let _ = r.tx.send(Ev::Error(e));
        }
    }
}
