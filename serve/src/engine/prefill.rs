//! The prefill side: computing a prompt's KV into the cache, and prefill work for other
//! workers (the first token, then the KV offered to decode).

use super::*;

impl Engine<'_> {
    /// Allocates blocks for `tokens` reusing cached prefix blocks; computes the rest. Returns
    /// (block table, logits after the last token, tokens reused).
    pub(crate) fn prefill(&mut self, tokens: &[u32]) -> Result<(Vec<u32>, Vec<f32>, u32), NoRoom> {
        let n = tokens.len();
        if n == 0 {
            return Err(NoRoom::Never("empty prompt".into()));
        }
        if n as u32 >= self.model.cfg.max_seq {
            return Err(NoRoom::Never(format!(
                "{n} tokens: the model's context is {}",
                self.model.cfg.max_seq
            )));
        }
        let tpb = self.cfg.tokens_per_block as usize;
        let hashes = seq_hashes(tokens, tpb);
        // The last token is always computed (its logits are needed).
        let reuse_max = (n - 1) / tpb;
        let mut table = self.blocks.lookup(&hashes[..hashes.len().min(reuse_max)]);
        let reused = table.len();
        let need = n.div_ceil(tpb) - reused;
        let running = self
            .reqs
            .iter()
            .filter(|r| matches!(r.state, State::Decoding))
            .count();
        // One block of headroom per running request, so admissions do not starve growth.
        let short =
            self.blocks.available() < need + running && need + running <= self.blocks.total();
        let mut log = self.shared.log.lock();
        match (!short)
            .then(|| self.blocks.alloc_n(need, &mut log))
            .flatten()
        {
            Some(b) => table.extend(b),
            None => {
                self.blocks.release(&table);
                let why = format!(
                    "out of KV blocks ({need} needed, {} free)",
                    self.blocks.available()
                );
                // Blocks held by others come back; a prompt larger than the cache never fits.
                return Err(if need <= self.blocks.total() {
                    NoRoom::Now(why)
                } else {
                    NoRoom::Never(why)
                });
            }
        }
        drop(log);
        let mut kv = Paged {
            regions: self.regions,
            table: &table,
        };
        let start = reused * tpb;
        for (i, &t) in tokens.iter().enumerate().take(n - 1).skip(start) {
            self.model.advance(t, i as u32, &mut kv);
        }
        let logits = self.model.step(tokens[n - 1], n as u32 - 1, &mut kv);
        let full = n / tpb;
        self.blocks
            .commit(&table[..full], &hashes[..full], &mut self.shared.log.lock());
        let mut s = self.shared.stats.lock();
        s.prompt_tokens += n as u64;
        s.cached_tokens += start as u64;
        Ok((table, logits, start as u32))
    }

    /// Runs queued work; gives it back if it must wait for blocks.
    pub(crate) fn prefill_work(&mut self, c: Cmd, since: Instant) -> Option<Cmd> {
        let may_wait = since.elapsed() < QUEUE_WAIT;
        match c {
            Cmd::Generate(g, tx) => {
                if self.cancelled.remove(&g.id).is_some() || tx.is_closed() {
                    self.finish("cancelled");
                    return None;
                }
                if g.max_tokens == 0 {
                    let _ = tx.send(Ev::Done("length".into()));
                    self.finish("ok");
                    return None;
                }
                let (table, logits, cached) = match self.prefill(&g.tokens) {
                    Ok(x) => x,
                    Err(NoRoom::Now(_)) if may_wait => return Some(Cmd::Generate(g, tx)),
                    Err(NoRoom::Now(e) | NoRoom::Never(e)) => {
                        let _ = tx.send(Ev::Error(e));
                        self.finish("error");
                        return None;
                    }
                };
                let n = g.tokens.len();
                let t = sample(&logits, g.temperature, g.seed, n as u32);
                let _ = tx.send(Ev::Prefilled {
                    cached_tokens: cached,
                });
                let _ = tx.send(Ev::Token(t, logprob(&logits, t)));
                self.shared.stats.lock().generated_tokens += 1;
                let r = Req {
                    id: g.id,
                    hashed: n / self.cfg.tokens_per_block as usize,
                    tokens: g.tokens,
                    table,
                    next: t,
                    left: g.max_tokens - 1,
                    tx,
                    state: State::Decoding,
                    temperature: g.temperature,
                    seed: g.seed,
                };
                if r.left == 0 {
                    self.complete(r);
                } else {
                    self.reqs.push(r);
                }
            }
            Cmd::Prefill(p, reply) => {
                if self.cancelled.remove(&p.id).is_some() || reply.is_closed() {
                    let _ = reply.send(Err("cancelled".into()));
                    self.finish("cancelled");
                    return None;
                }
                let (table, logits, cached) = match self.prefill(&p.tokens) {
                    Ok(x) => x,
                    Err(NoRoom::Now(_)) if may_wait => return Some(Cmd::Prefill(p, reply)),
                    Err(NoRoom::Now(e) | NoRoom::Never(e)) => {
                        let _ = reply.send(Err(e));
                        self.finish("error");
                        return None;
                    }
                };
                let first = sample(&logits, p.temperature, p.seed, p.tokens.len() as u32);
                let mut handoffs = Vec::new();
                let mut err = None;
                if let Some(pre) = self.pre.as_mut() {
                    for d in &p.decode_agents {
                        match pre.offer(d, &p.id, &table, self.cfg.lease) {
                            Ok(h) => handoffs.push(h),
                            Err(e) => {
                                err = Some(format!("offer to {d}: {e}"));
                                break;
                            }
                        }
                    }
                    if err.is_some() {
                        for &h in &handoffs {
                            pre.cancel(h, "offer to another rank failed");
                        }
                    }
                }
                let out = PrefillOut {
                    first_token: first,
                    first_logprob: logprob(&logits, first),
                    cached_tokens: cached,
                    agent: self.agents[0].name().to_owned(),
                };
                if handoffs.is_empty() {
                    self.blocks.release(&table);
                } else {
                    self.offered.insert(
                        p.id.clone(),
                        Offered {
                            table,
                            handoffs,
                            since: Instant::now(),
                        },
                    );
                }
                match err {
                    Some(e) => {
                        let _ = reply.send(Err(e));
                        self.finish("error");
                    }
                    None => {
                        if reply.send(Ok(out)).is_err() {
                            // The frontend went away: nobody will pull.
                            self.cancel(&p.id);
                        }
                        self.finish("ok");
                    }
                }
            }
            _ => {}
        }
        None
    }
}
