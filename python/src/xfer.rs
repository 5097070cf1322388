//! Transfer requests (`nixlXferReq`): post, state, telemetry, cost estimate.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nixl_core::{BackendName, DescList, Error, XferOp, XferOptions, XferRequest, XferStatus};
use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::agent::Shared;
use crate::cost::{cost_prior, OWN_SAMPLES};
use crate::errors::{err, invalid, nixlNoTelemetryError, nixlNotPostedError};
use crate::prepped::Picked;

/// Per-request telemetry, as NIXL's `nixlXferTelemetry` (times in microseconds).
#[pyclass(module = "nixl._bindings", name = "nixlXferTelemetry", frozen, get_all)]
#[derive(Debug, Clone)]
pub(crate) struct Telemetry {
    #[pyo3(name = "startTime")]
    start_time: u64,
    #[pyo3(name = "postDuration")]
    post_duration: u64,
    #[pyo3(name = "xferDuration")]
    xfer_duration: u64,
    #[pyo3(name = "totalBytes")]
    total_bytes: u64,
    #[pyo3(name = "descCount")]
    desc_count: u64,
    /// nixl-rs: the backend that carried the request.
    backend: String,
}

/// How a request is made, besides what it moves: with `Lists`, enough to make it again.
#[derive(Debug, Clone)]
pub(crate) struct How {
    pub(crate) op: XferOp,
    pub(crate) peer: String,
    /// The notification message (`None` for none: an empty one is none).
    pub(crate) notif: Option<Vec<u8>>,
    pub(crate) backend: Option<BackendName>,
}

impl How {
    pub(crate) fn new(
        op: XferOp,
        peer: String,
        notif: Option<Vec<u8>>,
        backend: Option<BackendName>,
    ) -> How {
        let notif = notif.filter(|n| !n.is_empty());
        How {
            op,
            peer,
            notif,
            backend,
        }
    }

    /// The core's options for it.
    pub(crate) fn opts(&self) -> XferOptions {
        XferOptions {
            notif: self.notif.clone(),
            backend: self.backend,
            deadline: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct XState {
    req: Option<Arc<XferRequest>>,
    how: How,
    /// What the request moves (to make it again with another notification).
    lists: Lists,
    /// Wall clock (µs since the epoch) and monotonic time of the last post.
    posted: Option<(u64, Instant)>,
    post_us: u64,
    done_us: Option<u64>,
    /// This request's last completed post durations (µs).
    samples: VecDeque<u64>,
}

/// A transfer request: created once, posted many times. It holds its agent alive.
#[pyclass(module = "nixl._bindings", name = "nixlXferReq", frozen)]
#[derive(Debug)]
pub(crate) struct XferReq {
    shared: Arc<Shared>,
    st: Mutex<XState>,
}

pub(crate) const DONE: i32 = 0;
pub(crate) const PROC: i32 = 1;

pub(crate) fn status_of(st: XferStatus) -> PyResult<i32> {
    match st {
        XferStatus::Idle => Err(nixlNotPostedError::new_err("the request was never posted")),
        XferStatus::InProgress => Ok(PROC),
        XferStatus::Done => Ok(DONE),
        other => Err(err(other.into_result().expect_err("a failed state"))),
    }
}

impl XferReq {
    /// A request moving `local` to or from `remote`, made `how`.
    pub(crate) fn create(
        py: Python<'_>,
        shared: &Arc<Shared>,
        how: How,
        local: DescList,
        remote: DescList,
    ) -> PyResult<XferReq> {
        let a = &shared.agent;
        let opts = how.opts();
        let req = py
            .allow_threads(|| a.create_xfer(how.op, &local, &remote, &how.peer, opts))
            .map_err(err)?;
        Ok(XferReq::new(shared, req, how, Lists::Built(local, remote)))
    }

    /// The handle of `req`, made `how` from `lists`.
    pub(crate) fn new(shared: &Arc<Shared>, req: XferRequest, how: How, lists: Lists) -> XferReq {
        XferReq {
            shared: Arc::clone(shared),
            st: Mutex::new(XState {
                req: Some(Arc::new(req)),
                how,
                lists,
                posted: None,
                post_us: 0,
                done_us: None,
                samples: VecDeque::new(),
            }),
        }
    }
}

/// What a request moves: lists, or indices into prepared lists (made into lists only when the
/// request must be made again).
#[derive(Debug)]
pub(crate) enum Lists {
    Built(DescList, DescList),
    Picked(Picked, Picked),
}

impl Lists {
    fn get(&self, py: Python<'_>) -> PyResult<(DescList, DescList)> {
        match self {
            Lists::Built(l, r) => Ok((l.clone(), r.clone())),
            Lists::Picked(l, r) => Ok((l.list(py)?, r.list(py)?)),
        }
    }
}

pub(crate) fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl XferReq {
    /// Notes a completed post's duration: for this request, and for its backend's fit.
    fn record(&self, st: &mut XState, req: &XferRequest, us: u64) {
        if st.samples.len() == OWN_SAMPLES {
            st.samples.pop_front();
        }
        st.samples.push_back(us);
        let mut costs = self.shared.costs.lock();
        costs
            .entry(req.backend())
            .or_default()
            .add(req.info().bytes, us);
    }

    /// The request, unless released. The state lock is only ever taken with the GIL held and
    /// never across a call that lets the GIL go, so it cannot deadlock against the GIL.
    fn req(&self) -> PyResult<Arc<XferRequest>> {
        self.st
            .lock()
            .req
            .clone()
            .ok_or_else(|| invalid("the request was released"))
    }
}

#[pymethods]
impl XferReq {
    /// Posts the request (with a new notification message when `notif` is not empty):
    /// `"DONE"` when it completed inline, `"PROC"` when it is in progress; the error otherwise.
    #[pyo3(signature = (notif = None))]
    fn post<'py>(&self, py: Python<'py>, notif: Option<&[u8]>) -> PyResult<Bound<'py, PyString>> {
        let mut req = self.req()?;
        if let Some(n) = notif.filter(|n| !n.is_empty()) {
            let again = {
                let st = self.st.lock();
                if st.how.notif.as_deref() == Some(n) {
                    None
                } else {
                    let how = How {
                        notif: Some(n.to_vec()),
                        ..st.how.clone()
                    };
                    Some((how, st.lists.get(py)?))
                }
            };
            if let Some((how, (local, remote))) = again {
                // The message is part of a prepared request: prepare it again with this one.
                if matches!(req.status(), XferStatus::InProgress) {
                    return Err(err(Error::InFlight));
                }
                let a = &self.shared.agent;
                let opts = how.opts();
                let new = py
                    .allow_threads(|| a.create_xfer(how.op, &local, &remote, &how.peer, opts))
                    .map_err(err)?;
                let new = Arc::new(new);
                let old = {
                    let mut st = self.st.lock();
                    st.how = how;
                    st.req.replace(Arc::clone(&new))
                };
                if let Some(old) = old {
                    py.allow_threads(|| old.release());
                }
                req = new;
            }
        }
        let t0 = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(micros)
            .unwrap_or(0);
        py.allow_threads(|| req.post()).map_err(err)?;
        let post_us = micros(t0.elapsed());
        let code = status_of(req.status());
        let mut st = self.st.lock();
        st.posted = Some((wall, t0));
        st.post_us = post_us;
        st.done_us = matches!(code, Ok(DONE)).then_some(post_us);
        if st.done_us.is_some() {
            self.record(&mut st, &req, post_us);
        }
        Ok(match code? {
            DONE => intern!(py, "DONE").clone(),
            _ => intern!(py, "PROC").clone(),
        })
    }

    /// `"DONE"` or `"PROC"` (NIXL's `check_xfer_state`); its error otherwise.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        Ok(match self.status()? {
            DONE => intern!(py, "DONE").clone(),
            _ => intern!(py, "PROC").clone(),
        })
    }

    /// 0 when the last post is done, 1 while in progress; its error otherwise.
    fn status(&self) -> PyResult<i32> {
        let mut st = self.st.lock();
        let Some(req) = st.req.as_ref() else {
            return Err(invalid("the request was released"));
        };
        let code = status_of(req.status())?;
        if code == DONE && st.done_us.is_none() {
            st.done_us = st.posted.map(|(_, t)| micros(t.elapsed()));
            if let (Some(us), Some(req)) = (st.done_us, st.req.clone()) {
                self.record(&mut st, &req, us);
            }
        }
        Ok(code)
    }

    /// `(duration µs, error margin µs, how)` of one post (NIXL's `estimateXferCost`): from this
    /// request's own completed posts when it has some (median, and the spread), else from the
    /// fit of its backend's posts in this agent (and the fit's residual, at least 10 %), else
    /// from the backend's configured latency and bandwidth (margin: the estimate itself).
    fn estimate(&self) -> PyResult<(u64, u64, &'static str)> {
        let st = self.st.lock();
        let req = st
            .req
            .as_ref()
            .ok_or_else(|| invalid("the request was released"))?;
        if !st.samples.is_empty() {
            let mut v: Vec<u64> = st.samples.iter().copied().collect();
            v.sort_unstable();
            let med = v[v.len() / 2];
            let spread = (v[v.len() - 1] - med).max(med - v[0]).max(1);
            return Ok((med, spread, "MEASURED_REQUEST"));
        }
        let bytes = req.info().bytes as f64;
        let fit = self.shared.costs.lock().get(&req.backend()).copied();
        if let Some((a, b, rms)) = fit.and_then(|f| f.line()) {
            let d = a + b * bytes;
            return Ok((
                d.round() as u64,
                rms.max(d * 0.1).round().max(1.0) as u64,
                "MEASURED_BACKEND",
            ));
        }
        let (lat, per_us) = cost_prior(req.backend());
        let d = (lat + bytes / per_us).round() as u64;
        Ok((d, d.max(1), "CONFIGURED"))
    }

    /// Blocks (without the GIL) until the last post ends or `timeout_ms` passes (< 0: no
    /// limit); then as `status`. A nixl-rs extension.
    fn wait(&self, py: Python<'_>, timeout_ms: i64) -> PyResult<i32> {
        let req = self.req()?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        py.allow_threads(|| req.wait_blocking(timeout));
        self.status()
    }

    /// Cancels the post in flight (it ends cancelled unless it had ended already).
    fn abort(&self) -> PyResult<()> {
        self.req()?.cancel();
        Ok(())
    }

    /// Cancels the post in flight, if any, and waits until no backend touches its memory.
    fn release(&self, py: Python<'_>) {
        let req = self.st.lock().req.take();
        if let Some(r) = req {
            py.allow_threads(|| r.release());
        }
    }

    /// The backend that carries the request ("shm", "tcp", ...).
    fn backend(&self) -> PyResult<String> {
        Ok(self.req()?.backend().as_str().to_owned())
    }

    /// Whether the request's device memory is staged through host memory (by which backend).
    fn staged(&self) -> PyResult<Option<String>> {
        Ok(self.req()?.info().staged.map(|b| b.as_str().to_owned()))
    }

    fn telemetry(&self) -> PyResult<Telemetry> {
        if !self.shared.telemetry {
            return Err(nixlNoTelemetryError::new_err(
                "telemetry is off (nixl_agent_config(capture_telemetry=True) turns it on)",
            ));
        }
        let _ = self.status();
        let st = self.st.lock();
        let req = st
            .req
            .as_ref()
            .ok_or_else(|| invalid("the request was released"))?;
        let (start, _) = st
            .posted
            .ok_or_else(|| nixlNotPostedError::new_err("the request was never posted"))?;
        Ok(Telemetry {
            start_time: start,
            post_duration: st.post_us,
            xfer_duration: st.done_us.unwrap_or(0),
            total_bytes: req.info().bytes,
            desc_count: req.info().descs as u64,
            backend: req.backend().as_str().to_owned(),
        })
    }
}
