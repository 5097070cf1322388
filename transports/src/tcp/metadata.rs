//! Calls on a peer's `tcp` listener about metadata: fetch it, push this agent's, drop it.

use std::time::Duration;

use nixl_core::{Error, Result};

use super::auth::Auth;
use super::client_setup;
use super::config::parse_listen;
use super::identity::PeerIdentity;

/// Fetches an agent's metadata from its `tcp` listener (authenticating with `auth`, as an
/// anonymous caller): only metadata of the agent the listener proves to be is returned.
pub fn fetch_metadata(addr: &str, auth: &Auth, timeout: Duration) -> Result<Vec<u8>> {
    let addr = parse_listen(addr)?;
    client_setup::metadata_call(
        addr,
        auth,
        timeout,
        &PeerIdentity::anonymous(),
        client_setup::MdRequest::Get,
    )
}

/// Pushes this agent's metadata to a peer's `tcp` listener, which loads it if it accepts pushes
/// (`accept_pushes`); returns the peer's answer (the name it loaded it as). The connection names
/// itself as the agent the metadata describes: a listener loads only an agent's own metadata.
pub fn push_metadata(addr: &str, auth: &Auth, md: &[u8], timeout: Duration) -> Result<String> {
    let d = nixl_core::AgentMetadata::decode(md)
        .map_err(|e| Error::InvalidArgument(format!("push metadata: not valid metadata: {e}")))?;
    push_metadata_as(
        addr,
        auth,
        &PeerIdentity::new(d.name, d.instance_id),
        md,
        timeout,
    )
}

/// [`push_metadata`] over a connection that names itself `me`, whatever `md` says: for tests of
/// the listener's rule that an agent pushes only its own metadata.
#[doc(hidden)]
pub fn push_metadata_as(
    addr: &str,
    auth: &Auth,
    me: &PeerIdentity,
    md: &[u8],
    timeout: Duration,
) -> Result<String> {
    let addr = parse_listen(addr)?;
    client_setup::metadata_call(addr, auth, timeout, me, client_setup::MdRequest::Push(md))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Asks a peer's `tcp` listener to drop the metadata it loaded of this agent, `me` (its name and
/// instance id), as [`nixl_core::Agent::invalidate_remote`] would there: the peer's later
/// requests to this agent fail. The listener acts only on the name and instance the connection
/// proved, and only if it accepts pushes (`accept_pushes`); it refuses (`Denied`) to drop
/// metadata of another instance of `me`. Returns whether it had this agent's metadata loaded.
pub fn invalidate_metadata(
    addr: &str,
    auth: &Auth,
    me: &PeerIdentity,
    timeout: Duration,
) -> Result<bool> {
    let addr = parse_listen(addr)?;
    let answer =
        client_setup::metadata_call(addr, auth, timeout, me, client_setup::MdRequest::Drop)?;
    match answer.as_slice() {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(Error::RemoteDisconnect {
            peer: addr.to_string(),
            reason: format!("invalidate metadata: an answer of {} bytes", answer.len()),
        }),
    }
}
