//! The decode side: requests to decode, the pull handoffs that bring their KV in, and the
//! decode steps.

use super::*;

impl Engine<'_> {
    pub(crate) fn decode_request(&mut self, g: GenReq, tx: UnboundedSender<Ev>) {
        if self.cancelled.remove(&g.id).is_some() {
            self.finish("cancelled");
            return;
        }
        let (Some(first), Some(prefill)) = (g.first_token, g.prefill_agent.clone()) else {
            let _ = tx.send(Ev::Error(
                "a decode worker needs first_token and prefill_agent".into(),
            ));
            self.finish("error");
            return;
        };
        if g.tokens.is_empty() || g.max_tokens == 0 {
            let _ = tx.send(Ev::Error("empty prompt or max_tokens 0".into()));
            self.finish("error");
            return;
        }
        self.reqs.push(Req {
            id: g.id,
            tokens: g.tokens,
            table: Vec::new(),
            hashed: 0,
            next: first,
            left: g.max_tokens,
            tx,
            state: State::Waiting {
                prefill,
                since: Instant::now(),
            },
            temperature: g.temperature,
            seed: g.seed,
        });
    }

    pub(crate) fn poll_handoffs(&mut self) {
        let now = Instant::now();
        self.cancelled
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        if let Some(pre) = self.pre.as_mut() {
            let (freed, _) = pre.poll();
            for f in freed {
                let outcome = match &f.outcome {
                    Outcome::Done => "done",
                    Outcome::Failed(_) => "failed",
                    Outcome::Cancelled(_) => "cancelled",
                };
                let mut end = None;
                if let Some(o) = self.offered.get_mut(&f.request) {
                    o.handoffs.retain(|&h| h != f.id);
                    if o.handoffs.is_empty() {
                        end = self.offered.remove(&f.request);
                    }
                }
                let mut s = self.shared.stats.lock();
                *s.handoffs.entry(outcome).or_default() += 1;
                if let Some(o) = end {
                    if f.outcome == Outcome::Done {
                        s.handoff_seconds.observe(o.since.elapsed().as_secs_f64());
                    }
                    drop(s);
                    self.blocks.release(&o.table);
                }
            }
            for a in &self.agents[1..] {
                let _ = a.take_notifs();
            }
        }
        if self.decs.is_empty() {
            return;
        }
        let mut ended = Vec::new();
        for (rank, d) in self.decs.iter_mut().enumerate() {
            let (ev, _) = d.poll();
            for e in ev {
                match e {
                    DecodeEvent::Offered(o) => {
                        if self.cancelled.contains_key(&o.request) {
                            d.cancel(&o.from, o.id, "cancelled by the frontend");
                        } else {
                            self.offers
                                .entry(o.request.clone())
                                .or_default()
                                .push((rank, o, now));
                        }
                    }
                    DecodeEvent::Ended {
                        id,
                        request,
                        outcome,
                        ..
                    } => ended.push((rank, id, request, outcome)),
                }
            }
        }
        for (rank, id, request, outcome) in ended {
            let Some(i) = self.reqs.iter().position(|r| r.id == request) else {
                continue;
            };
            let r = &mut self.reqs[i];
            let State::Pulling { running, since } = &mut r.state else {
                continue;
            };
            running.retain(|(k, _, h)| !(*k == rank && *h == id));
            let since = *since;
            let tag = match &outcome {
                Outcome::Done => "done",
                Outcome::Failed(_) => "failed",
                Outcome::Cancelled(_) => "cancelled",
            };
            *self.shared.stats.lock().handoffs.entry(tag).or_default() += 1;
            match outcome {
                Outcome::Done => {
                    if running.is_empty() {
                        self.shared
                            .stats
                            .lock()
                            .handoff_seconds
                            .observe(since.elapsed().as_secs_f64());
                        r.state = State::Decoding;
                        let tpb = self.cfg.tokens_per_block as usize;
                        let full = r.tokens.len() / tpb;
                        let hashes = seq_hashes(&r.tokens, tpb);
                        r.hashed = full;
                        let table = r.table[..full].to_vec();
                        self.blocks
                            .commit(&table, &hashes[..full], &mut self.shared.log.lock());
                    }
                }
                Outcome::Failed(why) | Outcome::Cancelled(why) => {
                    let r = self.reqs.swap_remove(i);
                    self.drop_req(r, "error", Some(format!("KV handoff failed: {why}")));
                }
            }
        }
        // Waiting requests whose offers are all here start pulling.
        let tp = self.decs.len();
        let mut i = 0;
        while i < self.reqs.len() {
            let r = &self.reqs[i];
            let State::Waiting { prefill, since } = &r.state else {
                i += 1;
                continue;
            };
            if r.tx.is_closed() {
                let r = self.reqs.swap_remove(i);
                self.drop_req(r, "cancelled", None);
                continue;
            }
            let ready = self.offers.get(&r.id).is_some_and(|os| {
                (0..tp).all(|k| os.iter().any(|(rk, o, _)| *rk == k && o.from == *prefill))
            });
            if !ready {
                if since.elapsed() > self.cfg.lease {
                    let r = self.reqs.swap_remove(i);
                    self.drop_req(r, "error", Some("no KV offer from prefill in time".into()));
                } else {
                    i += 1;
                }
                continue;
            }
            let n = r.tokens.len();
            let nblocks = n.div_ceil(self.cfg.tokens_per_block as usize);
            // Blocks held by running requests come back: wait for them within half the
            // lease (the offer's READ must still fit in it), then give up.
            // One block of headroom per running request, so admissions do not starve growth.
            let running = self
                .reqs
                .iter()
                .filter(|r| matches!(r.state, State::Decoding))
                .count();
            if self.blocks.available() < nblocks + running
                && nblocks + running <= self.blocks.total()
                && since.elapsed() < self.cfg.lease / 2
            {
                i += 1;
                continue;
            }
            let os = self.offers.remove(&r.id).unwrap_or_default();
            let got = self.blocks.alloc_n(nblocks, &mut self.shared.log.lock());
            let table = match got {
                Some(t) => t,
                None => {
                    for (rank, o, _) in &os {
                        self.decs[*rank].cancel(&o.from, o.id, "decode is out of KV blocks");
                    }
                    let r = self.reqs.swap_remove(i);
                    self.drop_req(r, "error", Some("decode worker is out of KV blocks".into()));
                    continue;
                }
            };
            let mut running = Vec::new();
            let mut err = None;
            for (rank, o, _) in &os {
                if o.blocks.len() != nblocks {
                    err = Some(format!("offer of {} blocks for {n} tokens", o.blocks.len()));
                    self.decs[*rank].cancel(&o.from, o.id, "wrong block count");
                    continue;
                }
                if running.iter().any(|(k, _, _)| k == rank) || err.is_some() {
                    self.decs[*rank].cancel(&o.from, o.id, "duplicate offer");
                    continue;
                }
                match self.decs[*rank].pull(o, &table) {
                    Ok(()) => running.push((*rank, o.from.clone(), o.id)),
                    Err(e) => err = Some(format!("pull: {e}")),
                }
            }
            let r = &mut self.reqs[i];
            r.table = table;
            r.state = State::Pulling {
                running,
                since: Instant::now(),
            };
            if let Some(e) = err {
                let r = self.reqs.swap_remove(i);
                self.drop_req(r, "error", Some(e));
                continue;
            }
            i += 1;
        }
        // Offers nobody claimed within half a lease are declined (the frontend went away).
        let lease = self.cfg.lease;
        let waiting: HashSet<String> = self.reqs.iter().map(|r| r.id.clone()).collect();
        let decs = &mut self.decs;
        self.offers.retain(|req, os| {
            let stale = os
                .iter()
                .all(|(_, _, t)| now.duration_since(*t) > lease / 2);
            if stale && !waiting.contains(req) {
                for (rank, o, _) in os.iter() {
                    decs[*rank].cancel(&o.from, o.id, "offer not claimed");
                }
                false
            } else {
                true
            }
        });
    }

    /// One token for every decoding request; whether any ran.
    pub(crate) fn decode_step(&mut self) -> bool {
        let tpb = self.cfg.tokens_per_block as usize;
        let mut stepped = false;
        let mut starved = None;
        let mut i = 0;
        while i < self.reqs.len() {
            if !matches!(self.reqs[i].state, State::Decoding) {
                i += 1;
                continue;
            }
            if self.reqs[i].tx.is_closed() {
                let r = self.reqs.swap_remove(i);
                self.drop_req(r, "cancelled", None);
                continue;
            }
            let pos = self.reqs[i].tokens.len();
            if pos as u32 >= self.model.cfg.max_seq {
                let r = self.reqs.swap_remove(i);
                self.complete(r);
                continue;
            }
            if pos / tpb >= self.reqs[i].table.len() {
                let got = self.blocks.alloc(&mut self.shared.log.lock());
                match got {
                    Some(b) => self.reqs[i].table.push(b),
                    None => {
                        // Waits for a block another request frees (see below).
                        starved = Some(i);
                        i += 1;
                        continue;
                    }
                }
            }
            let r = &mut self.reqs[i];
            let mut kv = Paged {
                regions: self.regions,
                table: &r.table,
            };
            let logits = self.model.step(r.next, pos as u32, &mut kv);
            stepped = true;
            r.tokens.push(r.next);
            if r.tokens.len() / tpb > r.hashed {
                let hashes = seq_hashes(&r.tokens, tpb);
                let full = r.tokens.len() / tpb;
                let (blocks, hs) = (r.table[r.hashed..full].to_vec(), &hashes[..full]);
                let start = r.hashed;
                r.hashed = full;
                let mut log = self.shared.log.lock();
                // Parents of the first new block are already known.
                let mut all: Vec<u32> = r.table[..start].to_vec();
                all.extend(blocks);
                self.blocks.commit(&all, hs, &mut log);
            }
            let r = &mut self.reqs[i];
            let t = sample(&logits, r.temperature, r.seed, r.tokens.len() as u32);
            let _ = r.tx.send(Ev::Token(t, logprob(&logits, t)));
            self.shared.stats.lock().generated_tokens += 1;
            r.left -= 1;
            r.next = t;
            if r.left == 0 {
                let r = self.reqs.swap_remove(i);
                self.complete(r);
                continue;
            }
            i += 1;
        }
        if let (false, Some(k)) = (stepped, starved) {
            // Every running request needs a block and none is free: preempt one (its
            // frontend prefills it again elsewhere, with the same tokens) so the others go on.
            let r = self.reqs.swap_remove(k);
            self.drop_req(r, "error", Some("preempted: out of KV blocks".into()));
        }
        stepped
    }
}
