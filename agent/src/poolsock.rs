//! The pool socket: local processes of the daemon's own user get the pool's memfd there, with
//! a lease's place in it, to map the lease and fill or read it themselves (the client is
//! [`crate::pool_client`]).
//!
//! One request per connection: the client sends `{"lease": "NAME"}` and a newline; the daemon
//! checks the client's uid (SO_PEERCRED: the daemon's own uid only, whatever the control
//! socket's mode lets in), and answers one JSON line, `{"name", "offset", "len", "addr",
//! "pool_len"}` with the memfd attached (SCM_RIGHTS), or `{"error": "..."}` without it.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::serve::Daemon;

/// Longest request line.
const MAX_REQUEST: usize = 4096;
/// How long a client may take to send its request or read the answer.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once, each on a thread of its own, so that a client that connects
/// and says nothing delays no other (only itself, until [`TIMEOUT`]). Beyond this many, a new
/// connection is closed at once: its client sees the connection end and may try again.
const MAX_IN_FLIGHT: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    lease: String,
}

/// Accepts connections until the process ends (a thread of its own). Each connection is
/// served on a thread of its own, at most [`MAX_IN_FLIGHT`] at once, each bounded by
/// [`TIMEOUT`].
pub(crate) fn serve(d: Arc<Daemon>, l: UnixListener) {
    if let Err(e) = l.set_nonblocking(false) {
        tracing::warn!(error = %e, "pool socket: not serving");
        return;
    }
    let in_flight = Arc::new(AtomicUsize::new(0));
    for s in l.incoming() {
        match s {
            Ok(s) => {
                if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(
                        max = MAX_IN_FLIGHT,
                        "pool socket: too many connections in flight, one closed unanswered"
                    );
                    continue;
                }
                let (d, count) = (d.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new()
                    .name("nixl-pool-conn".into())
                    .spawn(move || {
                        handle(&d, &s);
                        count.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(error = %e, "pool socket: no thread for a connection");
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "pool socket accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(d: &Daemon, s: &UnixStream) {
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = s.set_write_timeout(Some(TIMEOUT));
    let (answer, lend) = match answer(d, s) {
        Ok(v) => (v, true),
        Err(why) => {
            tracing::info!(reason = %why, "pool socket: request refused");
            (json!({ "error": why }), false)
        }
    };
    let mut line = answer.to_string();
    line.push('\n');
    let fd = match (&d.pool, lend) {
        (Some(p), true) => Some(p.fd().as_raw_fd()),
        _ => None,
    };
    if let Err(e) = crate::fdpass::send(s, line.as_bytes(), fd) {
        tracing::debug!(error = %e, "pool socket: answer not sent");
    }
}

fn answer(d: &Daemon, s: &UnixStream) -> Result<Value, String> {
    let (pid, uid) = crate::fdpass::peer_cred(s).map_err(|e| format!("peer credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me {
        return Err(format!(
            "uid {uid} may not map the pool: it is lent to processes of the daemon's uid {me} only"
        ));
    }
    let (line, _) =
        crate::fdpass::recv_line(s, MAX_REQUEST).map_err(|e| format!("request: {e}"))?;
    let req: Request = serde_json::from_slice(&line)
        .map_err(|e| format!("request: {e} (want {{\"lease\": NAME}})"))?;
    if d.draining() {
        return Err("draining: this daemon is shutting down and lends nothing".into());
    }
    let pool = d
        .pool
        .as_ref()
        .ok_or("this daemon has no host memory pool ([daemon] pool_size = 0)")?;
    let l = pool
        .get(&req.lease)
        .ok_or_else(|| format!("no lease named {:?}", req.lease))?;
    tracing::info!(pid, lease = %l.name, bytes = l.len, "pool socket: lease mapped by a local process");
    Ok(json!({
        "name": l.name, "offset": l.offset, "len": l.len, "addr": l.addr,
        "pool_len": pool.len(),
    }))
}
