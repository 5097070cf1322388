//! The control API: JSON over HTTP/1.1 on a Unix socket (see [`crate::control`] for the client
//! and the routes).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::http::{error_reply, json_reply, Reply};
use crate::serve::{Daemon, EtcdState};

/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Connections served at once; more are closed at once.
pub const MAX_CONNS: usize = 64;

/// Binds the control socket at `path` with permission bits `mode`: the parent directory is made
/// (0700, or 0750 for a group socket) if missing; a stale socket left by a dead daemon is
/// replaced; a live one, or anything else at the path, is an error.
pub(crate) fn bind(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, String> {
    let what = |e: std::io::Error| format!("[daemon] control_socket {}: {e}", path.display());
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(what)?;
            let dmode = if mode & 0o070 != 0 { 0o750 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dmode)).map_err(what)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "[daemon] control_socket {}: another daemon is serving there",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(what)?;
        }
        Ok(_) => {
            return Err(format!(
                "[daemon] control_socket {}: exists and is not a socket",
                path.display()
            ))
        }
        Err(_) => {}
    }
    // Created with no access for others from the start (no window before the chmod below).
    // SAFETY: umask has no preconditions; this runs before the daemon starts other threads.
    let old = unsafe { libc::umask(0o177 & !(mode & 0o070)) };
    let l = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = l.map_err(what)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(what)?;
    l.set_nonblocking(true).map_err(what)?;
    Ok(l)
}

/// Accepts connections until the process ends.
pub(crate) async fn serve(d: Arc<Daemon>, l: tokio::net::UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let (s, _) = match l.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("nixl_control_refused_total").increment(1);
            tracing::debug!("control connection refused: {MAX_CONNS} are open");
            continue;
        };
        let d = Arc::clone(&d);
        tokio::spawn(async move {
            crate::http::serve_conn(s, move |req| {
                let d = Arc::clone(&d);
                async move { route(&d, req).await }
            })
            .await;
            drop(permit);
        });
    }
}

async fn route(d: &Arc<Daemon>, req: Request<Incoming>) -> Reply {
    metrics::counter!("nixl_control_requests_total").increment(1);
    if d.draining() {
        return error_reply(
            503,
            "draining: this daemon is shutting down and takes no requests",
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "status"]) => json_reply(200, &status(d)),
        (&Method::GET, ["v1", "peers"]) => json_reply(200, &peers(d)),
        (&Method::GET, ["v1", "pool"]) => json_reply(200, &pool(d)),
        (&Method::GET, ["v1", "jobs"]) => json_reply(200, &json!({ "jobs": d.jobs.list() })),
        (&Method::GET, ["v1", "jobs", id]) => match id.parse() {
            Ok(id) => match d.jobs.get(id) {
                Some(j) => json_reply(200, &j),
                None => error_reply(404, &format!("no job {id}")),
            },
            Err(_) => error_reply(400, &format!("job id {id:?} is not a number")),
        },
        (&Method::DELETE, ["v1", "jobs", id]) => match id.parse::<u64>() {
            Ok(id) => {
                let dd = Arc::clone(d);
                blocking(move || crate::jobs::delete(&dd, id)).await
            }
            Err(_) => error_reply(400, &format!("job id {id:?} is not a number")),
        },
        (&Method::POST, ["v1", "jobs"]) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return error_reply(
                        413,
                        &format!("request body: {e} (at most {MAX_BODY} bytes)"),
                    )
                }
            };
            let spec: crate::jobs::JobSpec = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => return error_reply(400, &format!("job: {e}")),
            };
            let dd = Arc::clone(d);
            match blocking(move || crate::jobs::create(&dd, spec)).await {
                r if r.status() == 200 => {
                    let (mut parts, body) = r.into_parts();
                    parts.status = hyper::StatusCode::CREATED;
                    Reply::from_parts(parts, body)
                }
                r => r,
            }
        }
        (_, ["v1", "status" | "peers" | "pool" | "jobs", ..]) => {
            error_reply(405, &format!("{method} is not allowed on {path}"))
        }
        _ => error_reply(
            404,
            &format!(
                "no {path:?}: GET /v1/status, /v1/peers, /v1/pool, /v1/jobs, /v1/jobs/ID; \
                 POST /v1/jobs; DELETE /v1/jobs/ID"
            ),
        ),
    }
}

/// Runs a job operation on a blocking thread (it may connect to a peer, or wait for another
/// operation), so the async workers keep serving /metrics and the other requests.
async fn blocking(
    f: impl FnOnce() -> Result<Value, crate::jobs::Refusal> + Send + 'static,
) -> Reply {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(j)) => json_reply(200, &j),
        Ok(Err((code, m))) => error_reply(code, &m),
        Err(e) => error_reply(500, &format!("job operation: {e}")),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn peers(d: &Daemon) -> Value {
    let table = d.peers.snapshot();
    let mut names = d.agent.peers();
    names.sort();
    let list: Vec<Value> = names
        .iter()
        .map(|n| {
            let h = table.get(n);
            let up = h.and_then(|h| h.up);
            json!({
                "name": n,
                "state": match up { None => "unknown", Some(true) => "up", Some(false) => "down" },
                "last_canary_unix_ms": h.and_then(|h| h.last_canary).map(unix_ms),
                "last_rtt_us": h.and_then(|h| h.last_rtt).map(|r| r.as_micros() as u64),
                "down_since_unix_ms": h.and_then(|h| h.down_since).map(unix_ms),
                "last_error": h.and_then(|h| h.last_error.clone()),
            })
        })
        .collect();
    json!({ "peers": list })
}

fn pool(d: &Daemon) -> Value {
    match &d.pool {
        None => json!({ "size": 0, "used": 0, "leases": [] }),
        Some(p) => json!({
            "size": p.len(),
            "used": p.used(),
            "base": p.base(),
            "huge_pages": p.huge_pages(),
            "socket": crate::config::pool_socket_for(&d.cfg.daemon.control_socket),
            "leases": p.leases(),
        }),
    }
}

fn status(d: &Daemon) -> Value {
    let (bytes, regions) = crate::http::registered(d);
    let etcd = match &*d.etcd.lock() {
        EtcdState::Off => json!({ "state": "off" }),
        EtcdState::Waiting(why) => json!({ "state": "waiting", "reason": why }),
        EtcdState::Published(key) => json!({ "state": "published", "key": key }),
        EtcdState::Withdrawn => json!({ "state": "withdrawn" }),
    };
    json!({
        "agent": d.agent.name(),
        "instance_id": format!("{:032x}", d.agent.instance_id()),
        "generation": d.agent.generation(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": d.started.elapsed().as_secs(),
        "draining": d.draining(),
        "ready": d.not_ready().is_none(),
        "not_ready_reason": d.not_ready(),
        "backends": crate::http::backends_json(d),
        "tcp_listen": nixl_transports::tcp::listen_addrs_in(&d.agent.metadata())
            .iter().map(ToString::to_string).collect::<Vec<_>>(),
        "etcd": etcd,
        "peers": peers(d)["peers"],
        "registered": {
            "regions": regions,
            "bytes": bytes.iter().sum::<u64>(),
            "dram_bytes": bytes[0],
            "vram_bytes": bytes[1],
        },
        "in_flight_requests": d.jobs.in_flight(),
        "pool": pool(d),
        "jobs": d.jobs.list().len(),
    })
}
