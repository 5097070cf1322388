//! The frames of metadata and control connections: metadata fetch, push and drop, and control
//! requests.

use std::io;

use nixl_core::{BackendName, Error};

use super::identity::PeerIdentity;
use super::net::{self, Link};
use super::server::Shared;
use super::server_conn::Frames;
use super::wire::{self, Status};
use super::TcpConfig;

pub(super) fn serve_metadata(
    shared: &Shared,
    s: &Link,
    mut frames: Frames<'_>,
    who: &PeerIdentity,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        let ty = frames.next(s, body)?;
        match ty {
            wire::MD_GET => match shared.target.local_metadata() {
                Ok(md) => wire::md(out, Status::Ok, &md),
                Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
            },
            wire::MD_PUSH => {
                let mut r = nixl_core::codec::Reader::new(body);
                let md = r.blob("metadata").map_err(wire::bad)?;
                match check_push(&shared.cfg, who, md) {
                    Err(why) => {
                        metrics::counter!("nixl_tcp_pushes_refused_total").increment(1);
                        tracing::warn!(agent = %shared.target.name(), peer = %who,
                            "pushed metadata refused: {why}");
                        wire::md(out, Status::Denied, why.as_bytes());
                    }
                    Ok(()) => match shared.target.load_pushed(md) {
                        Ok(name) => {
                            tracing::info!(agent = %shared.target.name(), peer = %name,
                                "loaded pushed metadata");
                            wire::md(out, Status::Ok, name.as_bytes());
                        }
                        Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
                    },
                }
            }
            wire::MD_DROP => {
                wire::decode_md_drop(body).map_err(wire::bad)?;
                match check_drop(&shared.cfg, who) {
                    Err(why) => {
                        metrics::counter!("nixl_tcp_pushes_refused_total").increment(1);
                        tracing::warn!(agent = %shared.target.name(), peer = %who,
                            "metadata invalidation refused: {why}");
                        wire::md(out, Status::Denied, why.as_bytes());
                    }
                    // Only the proven caller's own metadata: no frame names anyone.
                    Ok(()) => match shared.target.drop_pushed(&who.name, who.instance) {
                        Ok(loaded) => wire::md(out, Status::Ok, wire::dropped(loaded)),
                        Err(Error::Denied { reason, .. }) => {
                            wire::md(out, Status::Denied, reason.as_bytes())
                        }
                        Err(e) => wire::md(out, Status::Failed, e.to_string().as_bytes()),
                    },
                }
            }
            t => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame type {t} on a metadata connection"),
                ))
            }
        }
        net::send_all(s, out)?;
    }
}

/// Whether pushed metadata may be loaded: pushes must be on (`[tcp] accept_pushes`), and an agent
/// may push only its own metadata, the name and instance its connection proved.
fn check_push(cfg: &TcpConfig, who: &PeerIdentity, md: &[u8]) -> std::result::Result<(), String> {
    if !cfg.accept_pushes {
        return Err(
            "this agent does not accept pushed metadata ([tcp] accept_pushes = false)".into(),
        );
    }
    let got = nixl_core::AgentMetadata::decode(md).map_err(|e| format!("bad metadata: {e}"))?;
    if got.name != who.name || got.instance_id != who.instance {
        return Err(format!(
            "metadata of '{}' (instance {:032x}) pushed by {who}: an agent may push only its own",
            got.name, got.instance_id
        ));
    }
    Ok(())
}

/// Whether a caller may have its metadata dropped: as for pushes, they must be on
/// (`[tcp] accept_pushes`), and the caller must be an agent (an anonymous caller has no metadata).
fn check_drop(cfg: &TcpConfig, who: &PeerIdentity) -> std::result::Result<(), String> {
    if !cfg.accept_pushes {
        return Err(
            "this agent does not accept pushed metadata nor its invalidation \
                    ([tcp] accept_pushes = false)"
                .into(),
        );
    }
    if who.is_anonymous() {
        return Err("an anonymous caller has no metadata to invalidate".into());
    }
    Ok(())
}

/// Answers control requests for other backends' services, one at a time, until the peer closes.
pub(super) fn serve_control(
    shared: &Shared,
    s: &Link,
    mut frames: Frames<'_>,
    peer: &str,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        let ty = frames.next(s, body)?;
        if ty != wire::CTRL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame type {ty} on a control connection"),
            ));
        }
        let (code, req) = wire::decode_ctrl(body).map_err(wire::bad)?;
        let answer = match BackendName::from_code(code) {
            Some(b) => shared.services.dispatch(peer, b, req),
            None => Err(format!("unknown backend code {code}")),
        };
        match answer {
            Ok(reply) => wire::ctrl_re(out, Status::Ok, &reply),
            Err(reason) => {
                tracing::debug!(agent = %shared.target.name(), peer, %reason,
                    "control request refused");
                wire::ctrl_re(out, Status::Denied, reason.as_bytes());
            }
        }
        net::send_all(s, out)?;
    }
}
