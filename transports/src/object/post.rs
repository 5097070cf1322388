//! A post in progress, shared by its tasks, and the reads (ranged GETs).

use super::*;

/// One post in progress, shared by its tasks: holds the completion, so the local regions stay
/// held, and the object regions, until the last task is gone.
pub(super) struct Post {
    pub(super) done: Completion,
    pub(super) ended: AtomicBool,
    pub(super) failed: Mutex<Option<Error>>,
    pub(super) stopped: AtomicBool,
    pub(super) cancel: watch::Sender<bool>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) regions: Arc<[Arc<Region>]>,
    pub(super) ticket: Option<Ticket>,
}

impl fmt::Debug for Post {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Post")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Drop for Post {
    fn drop(&mut self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            // The runtime dropped the tasks (shutdown).
            let e = self.failed.get_mut().take().unwrap_or(Error::Cancelled);
            self.done.end_early(Err(e));
        }
        leave_all(&self.regions, |r| &r.gate, self.ticket);
    }
}

impl Post {
    /// Records a failure (the first wins) and stops the other ranges or parts.
    pub(super) fn fail(&self, e: Error) {
        {
            let mut f = self.failed.lock();
            if f.is_none() {
                *f = Some(e);
            }
        }
        self.stopped.store(true, Ordering::Release);
        self.cancel.send_replace(true);
    }

    /// Whether no further range or part should start.
    pub(super) fn should_stop(&self) -> bool {
        if *self.stop.borrow() {
            self.fail(Error::Cancelled);
        }
        if self.done.is_abandoned() && !self.stopped.load(Ordering::Acquire) {
            // Cancelled or past its deadline: the state is set already.
            self.fail(Error::Cancelled);
        }
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves when the post is stopped (failure, cancel, shutdown).
    pub(super) async fn wait_stopped(&self) {
        let mut a = self.cancel.subscribe();
        let mut b = self.stop.clone();
        // A sender that is gone (never here while the post lives) means: never stopped.
        let gone = tokio::select! {
            r = a.wait_for(|v| *v) => r.is_err(),
            r = b.wait_for(|v| *v) => r.is_err(),
        };
        if gone {
            std::future::pending::<()>().await;
        }
    }

    /// Runs one HTTP exchange under the request timeout, dropped as soon as the post stops.
    pub(super) async fn guarded<F>(
        &self,
        timeout: Duration,
        what: impl Fn() -> String,
        f: F,
    ) -> Result<()>
    where
        F: Future<Output = Result<()>>,
    {
        tokio::select! {
            r = tokio::time::timeout(timeout, f) => r.unwrap_or_else(|_| Err(backend_err(
                "request",
                format!("{}: no complete answer within {} ms ([object] request_timeout_ms)",
                    what(), timeout.as_millis()),
            ))),
            () = self.wait_stopped() => Err(Error::Cancelled),
        }
    }

    /// Ends the post with the first failure, or Done. The completion (and the regions) stay
    /// held until the last holder of the post is gone.
    pub(super) fn end(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            let outcome = match self.failed.lock().take() {
                Some(e) => Err(e),
                None if *self.stop.borrow() => Err(Error::Cancelled),
                None => Ok(()),
            };
            self.done.end_early(outcome);
        }
    }

    pub(super) fn first_error(&self) -> bool {
        self.failed.lock().is_some() || self.stopped.load(Ordering::Acquire)
    }
}

impl PreparedXfer for ObjectXfer {
    fn post(&self, done: Completion) {
        let ticket = match enter_all(&self.remote_regions, |r| &r.gate) {
            Ok(t) => t,
            Err(i) => {
                let peer = done.info().peer.to_string();
                done.complete(Err(Error::Denied {
                    peer,
                    reason: format!(
                        "object region {:?} was deregistered",
                        self.remote_regions[i].desc
                    ),
                }));
                return;
            }
        };
        let post = Arc::new(Post {
            done,
            ended: AtomicBool::new(false),
            failed: Mutex::new(None),
            stopped: AtomicBool::new(false),
            cancel: watch::Sender::new(false),
            stop: self.stop.clone(),
            regions: Arc::clone(&self.remote_regions),
            ticket,
        });
        *self.current.lock() = Arc::downgrade(&post);
        let work = Arc::clone(&self.work);
        let run = self.run.clone();
        // A runtime that is shut down drops the task: the post then ends Cancelled.
        self.rt.spawn(async move {
            match &*work {
                Work::Read { names, ops } => read(&post, &run, names, ops).await,
                Work::Write(objs) => write(&post, &run, objs).await,
            }
            post.end();
        });
    }

    fn cancel(&self) {
        if let Some(p) = self.current.lock().upgrade() {
            p.fail(Error::Cancelled);
        }
    }
}

/// Runs `f(0..n)` with at most `conc` at a time, in order of index, until all are done or the
/// post stops; the first failure stops the rest.
pub(super) async fn parallel<F, Fut>(post: &Arc<Post>, n: usize, conc: usize, f: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc.min(n) {
        let (post, next, f) = (Arc::clone(post), Arc::clone(&next), Arc::clone(&f));
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || post.should_stop() {
                    return;
                }
                if let Err(e) = f(i).await {
                    post.fail(e);
                    return;
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(()) => {}
            // The runtime is shutting down (the backend or its agent stopped): the post ends
            // Cancelled, as every other post cut short by shutdown does.
            Err(e) if e.is_cancelled() => post.fail(Error::Cancelled),
            Err(e) => post.fail(backend_err("task", format!("a transfer task failed: {e}"))),
        }
    }
}

pub(super) async fn read(
    post: &Arc<Post>,
    run: &Run,
    names: &Arc<[ObjectName]>,
    ops: &Arc<[RangeOp]>,
) {
    let (p, r, nm, o) = (
        Arc::clone(post),
        run.clone(),
        Arc::clone(names),
        Arc::clone(ops),
    );
    parallel(post, ops.len(), run.conc, move |i| {
        let (p, r, nm, o) = (Arc::clone(&p), r.clone(), Arc::clone(&nm), Arc::clone(&o));
        async move {
            let op = &o[i];
            let name = &nm[op.obj];
            let what = || format!("GET {name} bytes {}-{}", op.offset, op.offset + op.len - 1);
            p.guarded(r.timeout, what, get_range(&r.s3, name, op)).await
        }
    })
    .await;
}

/// One ranged GET, scattered into registered memory as the body arrives.
pub(super) async fn get_range(s3: &S3, name: &ObjectName, op: &RangeOp) -> Result<()> {
    let req = S3Req {
        method: Method::GET,
        bucket: &name.bucket,
        key: &name.key,
        query: Vec::new(),
        range: Some((op.offset, op.offset + op.len - 1)),
        body: ReqBody::Empty,
    };
    let what = req.what();
    let resp = s3.send(&req).await.map_err(|e| backend_err("get", e))?;
    let status = resp.status();
    let (parts, mut body) = resp.into_parts();
    let whole = status == StatusCode::OK
        && op.offset == 0
        && parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            == Some(op.len);
    if status != StatusCode::PARTIAL_CONTENT && !whole {
        let text = s3::read_limited(body, 64 << 10).await.unwrap_or_default();
        let mut e = s3::status_error(&what, status, &text);
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            e += " (the object is shorter than the range: shorter than its registration?)";
        } else if status.is_success() {
            e += " (the server did not answer with the range asked for)";
        }
        return Err(backend_err("get", e));
    }
    // A partial answer must be the range asked for: other bytes of the object would land, in
    // bounds, where these belong.
    if status == StatusCode::PARTIAL_CONTENT {
        let range = parts
            .headers
            .get("content-range")
            .and_then(|v| v.to_str().ok());
        let want = (op.offset, op.offset + op.len - 1);
        if range.and_then(content_range) != Some(want) {
            return Err(backend_err(
                "get",
                format!(
                    "{what}: the server answered with Content-Range {:?}, not bytes {}-{}",
                    range.unwrap_or("(none)"),
                    want.0,
                    want.1
                ),
            ));
        }
    }
    let mut got = 0u64;
    let (mut piece, mut in_piece) = (0usize, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            backend_err(
                "get",
                format!(
                    "{what}: body broken after {got} of {} bytes: {}",
                    op.len,
                    s3::error_chain(&e)
                ),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if got + data.len() as u64 > op.len {
            return Err(backend_err(
                "get",
                format!(
                    "{what}: the server sent more than the {} bytes asked for",
                    op.len
                ),
            ));
        }
        let mut src = &data[..];
        while !src.is_empty() {
            let (addr, plen) = op.pieces[piece];
            let n = (plen - in_piece).min(src.len() as u64) as usize;
            // SAFETY: the piece lies in registered DRAM (checked inside its region when the
            // request was created) that the post's completion holds until the post is gone;
            // this future holds the post. `n` stays within the piece and within `src`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), (addr + in_piece) as *mut u8, n);
            }
            src = &src[n..];
            in_piece += n as u64;
            if in_piece == plen {
                piece += 1;
                in_piece = 0;
            }
        }
        got += data.len() as u64;
    }
    if got != op.len {
        return Err(backend_err(
            "get",
            format!(
                "{what}: short body, {got} of {} bytes (object shorter than its registration?)",
                op.len
            ),
        ));
    }
    Ok(())
}

/// The first and last byte of a `Content-Range: bytes FIRST-LAST/SIZE` header.
pub(super) fn content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, _size) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}
