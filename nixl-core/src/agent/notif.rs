//! Standalone notifications: sending them to peers, taking the ones received.

use std::time::{Duration, Instant};

use super::Agent;
use crate::backend::Notification;
use crate::error::{Error, Rejections, Result};
use crate::mem::MemKind;

/// Refuses a notification over [`crate::backend::MAX_NOTIF_BYTES`] at the sender, with the limit.
pub(super) fn check_notif_len(msg: Option<&[u8]>) -> Result<()> {
    match msg {
        Some(m) if m.len() > crate::backend::MAX_NOTIF_BYTES => {
            Err(Error::InvalidArgument(format!(
                "notification of {} bytes is over the limit of {} bytes (MAX_NOTIF_BYTES)",
                m.len(),
                crate::backend::MAX_NOTIF_BYTES
            )))
        }
        _ => Ok(()),
    }
}

impl Agent {
    /// Sends a standalone notification to a peer, over the best backend that carries them.
    pub fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        self.notif_via(peer, msg, false)
    }

    /// As [`Agent::send_notif`], but returns once the message is on its way instead of when the
    /// peer took it: for messages whose sender would otherwise wait behind data queued to the
    /// same peer (a `tcp` acknowledgement travels behind the DATA of READs the peer serves). A
    /// refusal by the peer is logged, not returned.
    pub fn post_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        self.notif_via(peer, msg, true)
    }

    /// Whether nothing that `peer` asked of this agent's memory is being carried out, or was
    /// received and waits to be, by any backend right now (see [`crate::Backend::peer_idle`]): once a
    /// peer said it stopped, memory it read may be reused when this holds.
    pub fn peer_idle(&self, peer: &str) -> bool {
        self.inner.backends.iter().all(|b| b.peer_idle(peer))
    }

    /// Ends whatever this agent's backends carry out of its memory on `peer`'s behalf right now,
    /// and waits up to `wait` for all of it to have stopped touching the memory; returns whether
    /// it has (see [`crate::Backend::fence_peer`]). Over `tcp` this drops every data connection
    /// that `peer` opened to this agent's listener: the READs and WRITEs it was serving or had
    /// received stop (the peer sees them fail as a remote disconnect), and once this returns
    /// true, nothing asked before the call reads or writes this agent's memory any more, and
    /// [`Agent::peer_idle`] no longer counts it. The peer may connect again; what it asks then is
    /// served as usual. For a peer that stopped answering yet keeps the listener busy, so that
    /// [`Agent::peer_idle`] never holds: memory it was lent can be reused after this returns
    /// true. A shut connection's thread ends at once, so this normally takes milliseconds.
    pub fn fence_peer(&self, peer: &str, wait: Duration) -> bool {
        let until = Instant::now().checked_add(wait);
        let mut done = true;
        for b in &self.inner.backends {
            let left = until.map_or(wait, |u| u.saturating_duration_since(Instant::now()));
            // Every backend is fenced, whatever an earlier one answered.
            done &= b.fence_peer(peer, left);
        }
        done
    }

    fn notif_via(&self, peer: &str, msg: &[u8], post: bool) -> Result<()> {
        self.inner.check_live()?;
        check_notif_len(Some(msg))?;
        let p = self.peer(peer)?;
        let mut rejected = Rejections::default();
        for b in &self.inner.backends {
            if !b.caps().notifications {
                rejected
                    .backends
                    .push((b.name(), "carries no notifications".into()));
                continue;
            }
            let Some(info) = p.backend_info(b.name()) else {
                rejected
                    .backends
                    .push((b.name(), "peer does not run it".into()));
                continue;
            };
            if let Err(r) = b.can_reach(&info.conn_info) {
                rejected.backends.push((b.name(), r));
                continue;
            }
            let conn = self.connection(&p, b)?;
            return if post {
                conn.post_notif(&self.inner.name, msg)
            } else {
                conn.send_notif(&self.inner.name, msg)
            };
        }
        Err(Error::NoBackend {
            peer: peer.to_owned(),
            local_kind: MemKind::Dram,
            remote_kind: MemKind::Dram,
            rejected,
        })
    }

    /// Takes every notification received so far.
    pub fn take_notifs(&self) -> Vec<Notification> {
        self.inner.target.take_notifs()
    }

    /// Waits up to `timeout` for at least one notification, then takes all of them.
    pub fn wait_notifs(&self, timeout: Duration) -> Vec<Notification> {
        self.inner.target.wait_notifs(timeout)
    }
}
