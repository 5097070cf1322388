//! The `local` backend: copies between agents of one process (or an agent and itself).
//!
//! The owner check is the target agent's own region table, consulted when a request is prepared
//! (region and key) and held through the region's access gate on every post, so the target can
//! deregister at any time and never has memory written after its deregistration returns.
//!
//! Transfers up to `INLINE_MAX` bytes are copied on the posting thread with memcpy: no thread
//! hand-off (which alone costs more than copying a few hundred KiB), which is what makes
//! create + post + complete of a 4 KiB transfer take well under 2 µs. Larger ones are cut into one
//! byte range per worker of the `CopyPool` and copied in parallel with streaming stores (see
//! `copy`); the last worker to finish delivers the notification and completes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use nixl_core::region::{enter_all, leave_all, Ticket};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Registered, Result, TargetHandle, Unusable, XferOp, XferPlan,
};
use parking_lot::Mutex;

use crate::copy::{CopyOp, CopyPlan, CopyPool, INLINE_MAX};

/// Tells agents of this process from others'. An identity, not a secret: should the OS generator
/// fail, the pid and the time do (a clash only makes `can_reach` say yes; `connect` still finds
/// only agents of this process).
static PROCESS_TOKEN: LazyLock<u64> = LazyLock::new(|| {
    nixl_core::random_u64().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ u64::from(std::process::id()) << 32
    })
});
static TARGETS: LazyLock<Mutex<HashMap<u128, TargetHandle>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The `local` backend.
#[derive(Debug, Default)]
pub struct LocalBackend {
    target: Mutex<Option<TargetHandle>>,
}

impl LocalBackend {
    /// A local backend (its copy pool is shared by the process and started on first use).
    pub fn new() -> LocalBackend {
        LocalBackend::default()
    }
}

/// Delivers a transfer's notification; a full queue fails the post with the reason.
fn notify(target: &TargetHandle, from: &str, msg: Vec<u8>) -> Result<()> {
    target.deliver(from, msg).map_err(|refused| Error::Denied {
        peer: target.name().to_owned(),
        reason: refused.to_string(),
    })
}

fn encode_info(instance: u128) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&PROCESS_TOKEN.to_le_bytes());
    v.extend_from_slice(&instance.to_le_bytes());
    v
}

fn decode_info(b: &[u8]) -> std::result::Result<(u64, u128), String> {
    if b.len() != 24 {
        return Err(format!(
            "local connection info is {} bytes, expected 24",
            b.len()
        ));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[..8]);
    let mut i = [0u8; 16];
    i.copy_from_slice(&b[8..]);
    Ok((u64::from_le_bytes(t), u128::from_le_bytes(i)))
}

const DRAM: &[MemKind] = &[MemKind::Dram];

impl Backend for LocalBackend {
    fn name(&self) -> BackendName {
        BackendName::Local
    }

    fn caps(&self) -> Caps {
        Caps::new(DRAM, Locality::SameProcess, 0)
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        Ok(())
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        TARGETS.lock().insert(target.instance_id(), target.clone());
        *self.target.lock() = Some(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        let instance = self.target.lock().as_ref().map_or(0, |t| t.instance_id());
        encode_info(instance)
    }

    fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    fn deregister(&self, _region: Registered<'_>) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        let (token, _) = decode_info(conn_info)?;
        if token == *PROCESS_TOKEN {
            Ok(())
        } else {
            Err("peer is in another process".into())
        }
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let (token, instance) = decode_info(peer.conn_info).map_err(|reason| Error::Backend {
            backend: BackendName::Local,
            op: "connect",
            reason,
        })?;
        let target = (token == *PROCESS_TOKEN)
            .then(|| TARGETS.lock().get(&instance).cloned())
            .flatten()
            .ok_or_else(|| Error::RemoteDisconnect {
                peer: peer.name.to_owned(),
                reason: "no such agent in this process (shut down?)".into(),
            })?;
        Ok(Arc::new(LocalConn {
            peer: Arc::from(peer.name),
            target,
            closed: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn shutdown(&self) {
        if let Some(t) = self.target.lock().take() {
            TARGETS.lock().remove(&t.instance_id());
        }
    }
}

#[derive(Debug)]
struct LocalConn {
    peer: Arc<str>,
    target: TargetHandle,
    closed: Arc<AtomicBool>,
}

#[derive(Debug)]
struct LocalXfer {
    peer: Arc<str>,
    initiator: Arc<str>,
    target: TargetHandle,
    closed: Arc<AtomicBool>,
    plan: CopyPlan,
    remote_regions: Arc<[Arc<Region>]>,
    notif: Option<Vec<u8>>,
}

/// The owner-side check of a plan's remote regions, for the backends whose target is in this
/// process (`local`, the file backends, `object`): each exists in `target` with its key, else
/// `Denied` naming `peer` and the `what` region by its index. The regions, to hold on each post.
pub(crate) fn owner_check(
    target: &TargetHandle,
    plan: &XferPlan,
    peer: &str,
    what: &str,
) -> Result<Vec<Arc<Region>>> {
    let check = |(i, r): (usize, &nixl_core::metadata::RegionInfo)| {
        let access = target
            .check(r.kind, &r.desc, r.key)
            .map_err(|denied| Error::Denied {
                peer: peer.to_owned(),
                reason: format!("{what} region {i} {:?}: {denied}", r.desc),
            })?;
        Ok(Arc::clone(access.region()))
    };
    plan.remote_regions.iter().enumerate().map(check).collect()
}

impl Connection for LocalConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        // Owner-side check, done once: every remote region exists in the target with this key.
        let remote_regions = owner_check(&self.target, &plan, &self.peer, "remote")?;
        let ops = plan
            .segments
            .iter()
            .map(|s| match plan.op {
                XferOp::Read => CopyOp {
                    src: s.remote.addr,
                    dst: s.local.addr,
                    len: s.local.len,
                },
                XferOp::Write => CopyOp {
                    src: s.local.addr,
                    dst: s.remote.addr,
                    len: s.local.len,
                },
            })
            .collect();
        Ok(Box::new(LocalXfer {
            peer: Arc::clone(&self.peer),
            initiator: plan.initiator,
            target: self.target.clone(),
            closed: Arc::clone(&self.closed),
            plan: CopyPlan::new(ops),
            remote_regions: remote_regions.into(),
            notif: plan.notif,
        }))
    }

    fn send_notif(&self, from: &str, msg: &[u8]) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::RemoteDisconnect {
                peer: self.peer.to_string(),
                reason: "peer invalidated".into(),
            });
        }
        self.target
            .deliver(from, msg.to_vec())
            .map_err(|refused| Error::Denied {
                peer: self.peer.to_string(),
                reason: refused.to_string(),
            })
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Holds the remote regions of one post open; released on drop.
struct RemoteHold {
    regions: Arc<[Arc<Region>]>,
    ticket: Option<Ticket>,
}

impl Drop for RemoteHold {
    fn drop(&mut self) {
        leave_all(&self.regions, |r| &r.gate, self.ticket);
    }
}

impl LocalXfer {
    fn hold_remote(&self) -> Result<RemoteHold> {
        match enter_all(&self.remote_regions, |r| &r.gate) {
            Ok(ticket) => Ok(RemoteHold {
                regions: Arc::clone(&self.remote_regions),
                ticket,
            }),
            Err(i) => Err(Error::Denied {
                peer: self.peer.to_string(),
                reason: format!(
                    "remote region {:?} was deregistered",
                    self.remote_regions[i].desc
                ),
            }),
        }
    }
}

impl PreparedXfer for LocalXfer {
    fn post(&self, done: Completion) {
        if self.closed.load(Ordering::Acquire) {
            done.complete(Err(Error::RemoteDisconnect {
                peer: self.peer.to_string(),
                reason: "peer invalidated".into(),
            }));
            return;
        }
        let hold = match self.hold_remote() {
            Ok(h) => h,
            Err(e) => {
                done.complete(Err(e));
                return;
            }
        };
        if self.plan.total() <= INLINE_MAX {
            // SAFETY: both sides lie inside regions registered with agents of this process
            // (checked at creation and preparation); the local regions are held by the
            // completion and the remote ones by `hold`, so deregistration waits for us.
            unsafe { self.plan.copy_range(0, self.plan.total(), false) };
            drop(hold);
            let res = match &self.notif {
                Some(msg) => notify(&self.target, &self.initiator, msg.clone()),
                None => Ok(()),
            };
            done.complete(res);
            return;
        }
        let (target, initiator, notif) = (
            self.target.clone(),
            Arc::clone(&self.initiator),
            self.notif.clone(),
        );
        let finish = move |done: Completion| {
            let res = match notif {
                Some(msg) => notify(&target, &initiator, msg),
                None => Ok(()),
            };
            done.complete(res);
        };
        // SAFETY: as for the inline copy; `hold` and the completion (which holds the local
        // regions) are released only after every range is copied.
        unsafe { CopyPool::global().run_post(self.plan.clone(), done, hold, finish) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_copies_ranges_across_op_boundaries() {
        let src: Vec<u8> = (0..100u8).collect();
        let mut dst = vec![0u8; 100];
        let d = dst.as_mut_ptr() as u64;
        let s = src.as_ptr() as u64;
        let plan = CopyPlan::new(vec![
            CopyOp {
                src: s,
                dst: d + 50,
                len: 30,
            },
            CopyOp {
                src: s + 30,
                dst: d,
                len: 50,
            },
        ]);
        // Copy in three uneven pieces spanning the op boundary.
        // SAFETY: every op lies inside `src` / `dst`, which outlive the calls.
        unsafe {
            plan.copy_range(0, 20, false);
            plan.copy_range(20, 45, true);
            plan.copy_range(45, 80, false);
        }
        assert_eq!(&dst[50..80], &src[..30]);
        assert_eq!(&dst[..50], &src[30..80]);
        assert!(dst[80..].iter().all(|&b| b == 0));
    }

    #[test]
    fn info_decoding_is_checked() {
        assert!(decode_info(&[0; 23]).is_err());
        let (t, i) = decode_info(&encode_info(77)).unwrap();
        assert_eq!((t, i), (*PROCESS_TOKEN, 77));
        let b = LocalBackend::new();
        assert!(b.can_reach(&encode_info(1)).is_ok());
        let mut other = encode_info(1);
        other[0] ^= 1;
        assert!(b.can_reach(&other).is_err());
    }
}
