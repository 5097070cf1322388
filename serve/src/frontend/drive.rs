//! Driving one request across workers: picking them, the attempts, and migration when a
//! worker dies.

use super::*;

/// What the driving task tells the answering side.
#[derive(Debug)]
pub(crate) enum Out {
    /// Text, and the log-probability of each of its characters (tokens).
    Text(String, Vec<f32>),
    Done {
        finish: &'static str,
        completion_tokens: usize,
        cached: u32,
    },
    Error(ApiError),
}

/// Why an attempt ended without finishing.
pub(crate) enum Fail {
    /// The client went away (cancels were sent).
    Gone,
    /// A worker failed: try again elsewhere.
    Retry(String),
    /// Give up with this error.
    Fatal(ApiError),
}

/// Collects tokens into text, holding back what may be the start of a stop string.
pub(crate) struct Emitter {
    pub(crate) tx: mpsc::UnboundedSender<Out>,
    pub(crate) stop: Vec<String>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) logprobs: Vec<f32>,
    pub(crate) text: String,
    pub(crate) sent: usize,
    pub(crate) start: Instant,
    pub(crate) last: Option<Instant>,
    pub(crate) fe: Arc<Frontend>,
}

impl Emitter {
    /// Adds a token and its log-probability; `true` when a stop string ended the text.
    pub(crate) fn push(&mut self, t: u32, lp: f32) -> bool {
        let now = Instant::now();
        {
            let mut m = self.fe.metrics.lock();
            match self.last {
                None => m.ttft.observe((now - self.start).as_secs_f64()),
                Some(l) => m.itl.observe((now - l).as_secs_f64()),
            }
        }
        self.last = Some(now);
        self.tokens.push(t);
        // Every token the model emits is one printable ASCII character (or newline), so
        // text offsets are token indices.
        if t < 128 {
            self.text.push(t as u8 as char);
            self.logprobs.push(lp);
        }
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.flush(at);
            return true;
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| self.text.ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        self.flush(self.text.len() - hold);
        false
    }

    pub(crate) fn flush(&mut self, upto: usize) {
        if upto > self.sent {
            let _ = self.tx.send(Out::Text(
                self.text[self.sent..upto].to_owned(),
                self.logprobs[self.sent..upto].to_vec(),
            ));
            self.sent = upto;
        }
    }
}

impl Frontend {
    pub(crate) fn alive(&self, urls: &[String]) -> Vec<usize> {
        let mut dead = self.dead.lock();
        let now = Instant::now();
        dead.retain(|_, t| *t > now);
        (0..urls.len())
            .filter(|&i| !dead.contains_key(&urls[i]))
            .collect()
    }

    pub(crate) fn pick(&self, pool: Pool, tokens: &[u32]) -> Option<String> {
        let urls = match pool {
            Pool::Prefill => &self.cfg.prefill,
            Pool::Decode => &self.cfg.decode,
            Pool::Aggregated => &self.cfg.aggregated,
        };
        let c = self.alive(urls);
        if c.is_empty() {
            return None;
        }
        Some(urls[self.choice.choose(pool, urls, &c, tokens)].clone())
    }

    pub(crate) fn mark_dead(&self, url: &str) {
        self.dead
            .lock()
            .insert(url.to_owned(), Instant::now() + DEAD_FOR);
        self.meta.lock().remove(url);
        self.peered.lock().retain(|(p, d)| p != url && d != url);
    }

    pub(crate) async fn info(&self, url: &str) -> Result<PeerInfo, CallError> {
        if let Some(i) = self.meta.lock().get(url) {
            return Ok(i.clone());
        }
        let b = self
            .http
            .call(None, &format!("{url}/kv/meta"), Duration::from_secs(5))
            .await?;
        let i: PeerInfo = serde_json::from_slice(&b)
            .map_err(|e| CallError::Status(502, format!("{url}/kv/meta: {e}")))?;
        self.meta.lock().insert(url.to_owned(), i.clone());
        Ok(i)
    }

    /// Makes `p` and `d` know each other's agents (once per pair).
    pub(crate) async fn peer(&self, p: &str, d: &str) -> Result<PeerInfo, (String, CallError)> {
        let di = self.info(d).await.map_err(|e| (d.to_owned(), e))?;
        if self.peered.lock().contains(&(p.to_owned(), d.to_owned())) {
            return Ok(di);
        }
        let pi = self.info(p).await.map_err(|e| (p.to_owned(), e))?;
        let t = Duration::from_secs(5);
        let pv = serde_json::to_value(&pi).unwrap_or_default();
        let dv = serde_json::to_value(&di).unwrap_or_default();
        self.http
            .call(Some(&pv), &format!("{d}/kv/peer"), t)
            .await
            .map_err(|e| (d.to_owned(), e))?;
        self.http
            .call(Some(&dv), &format!("{p}/kv/peer"), t)
            .await
            .map_err(|e| (p.to_owned(), e))?;
        self.peered.lock().insert((p.to_owned(), d.to_owned()));
        Ok(di)
    }

    pub(crate) fn cancel(self: &Arc<Self>, urls: Vec<String>, id: String) {
        let fe = Arc::clone(self);
        tokio::spawn(async move {
            for u in urls {
                let _ = fe
                    .http
                    .call(
                        Some(&json!({"id": id})),
                        &format!("{u}/cancel"),
                        Duration::from_secs(2),
                    )
                    .await;
            }
        });
    }

    pub(crate) fn fail(&self, url: &str, e: &CallError) -> Fail {
        if matches!(e, CallError::Unreachable(_)) {
            self.mark_dead(url);
        }
        Fail::Retry(format!("{e}"))
    }
}

pub(crate) const STREAM_GAP: Duration = Duration::from_secs(30);
pub(crate) const PREFILL_TIMEOUT: Duration = Duration::from_secs(60);

/// One attempt on one set of workers.
pub(crate) async fn attempt(
    fe: &Arc<Frontend>,
    g: &Gen,
    id: &str,
    em: &mut Emitter,
    cached: &mut u32,
) -> Result<&'static str, Fail> {
    let mut tokens = g.prompt.clone();
    tokens.extend(&em.tokens);
    let remaining = g.max_tokens - em.tokens.len() as u32;
    let blocks = (tokens.len() + remaining as usize)
        .div_ceil(fe.cfg.tokens_per_block.max(1) as usize) as u64;
    let closed = em.tx.clone();
    if !fe.cfg.aggregated.is_empty() {
        let Some(a) = fe.pick(Pool::Aggregated, &tokens) else {
            return Err(Fail::Fatal(ApiError::unavailable(
                "no aggregated worker is available",
            )));
        };
        let _booked = fe.choice.book(&a, blocks);
        let body = json!({"id": id, "tokens": tokens, "max_tokens": remaining,
                          "temperature": g.temperature, "seed": g.seed});
        let url = format!("{a}/generate");
        let mut lines = tokio::select! {
            r = fe.http.stream(&url, &body, PREFILL_TIMEOUT) => r.map_err(|e| fe.fail(&a, &e))?,
            _ = closed.closed() => { fe.cancel(vec![a], id.into()); return Err(Fail::Gone) }
        };
        return follow(fe, &a, id, &mut lines, em, cached, true).await;
    }
    let Some(p) = fe.pick(Pool::Prefill, &tokens) else {
        return Err(Fail::Fatal(ApiError::unavailable(
            "no prefill worker is available",
        )));
    };
    let d = if remaining > 1 {
        match fe.pick(Pool::Decode, &tokens) {
            Some(d) => Some(d),
            None => {
                return Err(Fail::Fatal(ApiError::unavailable(
                    "no decode worker is available",
                )))
            }
        }
    } else {
        None
    };
    let _booked = (
        fe.choice.book(&p, blocks),
        d.as_ref().map(|d| fe.choice.book(d, blocks)),
    );
    let mut agents = Vec::new();
    if let Some(d) = &d {
        let di = fe.peer(&p, d).await.map_err(|(u, e)| fe.fail(&u, &e))?;
        agents = di.agents.iter().map(|a| a.name.clone()).collect();
    }
    let body = json!({"id": id, "tokens": tokens, "decode_agents": agents,
                      "temperature": g.temperature, "seed": g.seed});
    let everyone: Vec<String> = std::iter::once(p.clone()).chain(d.clone()).collect();
    let purl = format!("{p}/prefill");
    let r = tokio::select! {
        r = fe.http.call(Some(&body), &purl, PREFILL_TIMEOUT) => r,
        _ = closed.closed() => { fe.cancel(everyone, id.into()); return Err(Fail::Gone) }
    };
    let po: PrefillOut = match r {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Fail::Retry(format!("{p}/prefill answered: {e}")))?,
        Err(e) => {
            fe.cancel(everyone, id.into());
            return Err(fe.fail(&p, &e));
        }
    };
    *cached = po.cached_tokens;
    if em.push(po.first_token, po.first_logprob) {
        fe.cancel(everyone, id.into());
        return Ok("stop");
    }
    let Some(d) = d else {
        return Ok("length");
    };
    let body = json!({"id": id, "tokens": tokens, "max_tokens": remaining - 1,
                      "first_token": po.first_token, "prefill_agent": po.agent,
                      "temperature": g.temperature, "seed": g.seed});
    let url = format!("{d}/generate");
    let mut lines = tokio::select! {
        r = fe.http.stream(&url, &body, PREFILL_TIMEOUT) => match r {
            Ok(l) => l,
            Err(e) => { fe.cancel(everyone, id.into()); return Err(fe.fail(&d, &e)) }
        },
        _ = closed.closed() => { fe.cancel(everyone, id.into()); return Err(Fail::Gone) }
    };
    let r = follow(fe, &d, id, &mut lines, em, cached, false).await;
    if r.is_err() {
        // The prefill worker may still hold the offer.
        fe.cancel(vec![p], id.into());
    }
    r
}

/// Reads a worker's token stream into the emitter.
pub(crate) async fn follow(
    fe: &Arc<Frontend>,
    url: &str,
    id: &str,
    lines: &mut crate::client::Lines,
    em: &mut Emitter,
    cached: &mut u32,
    aggregated: bool,
) -> Result<&'static str, Fail> {
    let closed = em.tx.clone();
    loop {
        let line = tokio::select! {
            l = lines.next(STREAM_GAP) => l,
            _ = closed.closed() => { fe.cancel(vec![url.to_owned()], id.into()); return Err(Fail::Gone) }
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => {
                fe.mark_dead(url);
                return Err(Fail::Retry(format!("{url}: the token stream ended early")));
            }
            Err(e) => {
                fe.cancel(vec![url.to_owned()], id.into());
                return Err(fe.fail(url, &e));
            }
        };
        match crate::worker::parse_line(&line) {
            Ok(Ev::Prefilled { cached_tokens }) if aggregated => *cached = cached_tokens,
            Ok(Ev::Prefilled { .. }) => {}
            Ok(Ev::Token(t, lp)) => {
                if em.push(t, lp) {
                    fe.cancel(vec![url.to_owned()], id.into());
                    return Ok("stop");
                }
            }
            Ok(Ev::Done(_)) => return Ok("length"),
            Ok(Ev::Error(e)) => return Err(Fail::Retry(format!("{url}: {e}"))),
            Err(e) => {
                fe.cancel(vec![url.to_owned()], id.into());
                return Err(Fail::Retry(e));
            }
        }
    }
}

/// Drives a request to its end, migrating it when a worker fails.
pub(crate) async fn drive(fe: Arc<Frontend>, g: Gen, tx: mpsc::UnboundedSender<Out>) {
    let base = format!(
        "{:x}-{}",
        fe.instance,
        fe.next.fetch_add(1, Ordering::Relaxed)
    );
    let mut em = Emitter {
        tx: tx.clone(),
        stop: g.stop.clone(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        sent: 0,
        start: Instant::now(),
        last: None,
        fe: Arc::clone(&fe),
    };
    let mut cached = 0u32;
    let mut first_cached = None;
    let mut last_err = String::new();
    let status;
    let mut attempts = 0;
    loop {
        if attempts == MAX_ATTEMPTS {
            let _ = tx.send(Out::Error(ApiError::unavailable(format!(
                "the request failed on {MAX_ATTEMPTS} workers; last: {last_err}"
            ))));
            status = "error";
            break;
        }
        if attempts > 0 {
            fe.metrics.lock().migrations += 1;
        }
        let id = format!("{base}-{attempts}");
        attempts += 1;
        let r = attempt(&fe, &g, &id, &mut em, &mut cached).await;
        if first_cached.is_none() && !em.tokens.is_empty() {
            first_cached = Some(cached);
        }
        match r {
            Ok(finish) => {
                if finish == "length" {
                    let n = em.text.len();
                    em.flush(n);
                }
                let _ = tx.send(Out::Done {
                    finish,
                    completion_tokens: em.tokens.len(),
                    cached: first_cached.unwrap_or(cached),
                });
                status = "ok";
                break;
            }
            Err(Fail::Gone) => {
                status = "cancelled";
                break;
            }
            Err(Fail::Fatal(e)) => {
                let _ = tx.send(Out::Error(e));
                status = "error";
                break;
            }
            Err(Fail::Retry(why)) => {
                last_err = why;
                if em.tokens.len() as u32 >= g.max_tokens {
                    let _ = tx.send(Out::Done {
                        finish: "length",
                        completion_tokens: em.tokens.len(),
                        cached: first_cached.unwrap_or(cached),
                    });
                    status = "ok";
                    break;
                }
                // A short pause before trying elsewhere (a dying worker's peers settle).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut m = fe.metrics.lock();
    *m.requests.entry(status).or_default() += 1;
    m.prompt_tokens += g.prompt.len() as u64;
    m.cached_tokens += first_cached.unwrap_or(0) as u64;
}

pub(crate) fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
