//! Who is at the other end of a `tcp` connection, as the connection proved it.
//!
//! With a secret (a shared one or this user's per-host one), the handshake ([`super::auth`])
//! proves both agents' names and instance ids inside TLS, bound to the channel's exporter value:
//! the initiator's proof names itself and the agent it expects, the listener's names itself and
//! the initiator. The initiator then names itself once more in its OPEN frame (purpose, agent
//! name, instance id, the instance it expects), which the listener takes only if it names the
//! proven initiator; the listener binds that [`PeerIdentity`] to the connection and uses it for
//! every notification, pushed metadata and control request that arrives on it. The initiator
//! takes only the listener its metadata names (name in the handshake, instance in OPENED). Every
//! later frame travels inside the same TLS channel, so nobody can splice another name in.
//!
//! An open listener (`[auth] allow_open = true`, no secret) proves nothing: its peers' names are
//! what they claim in OPEN, which is what "open" means.

/// The agent at the other end of a connection, as it proved itself on that connection: its name
/// and instance id. An anonymous initiator (a metadata fetch by a tool) has an empty name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The agent's name.
    pub name: String,
    /// The agent's instance id (0: an anonymous caller).
    pub instance: u128,
}

impl PeerIdentity {
    /// An agent's identity.
    pub fn new(name: impl Into<String>, instance: u128) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            instance,
        }
    }

    /// The identity of a caller that is no agent (a tool fetching metadata).
    pub fn anonymous() -> PeerIdentity {
        PeerIdentity::new("", 0)
    }

    /// Whether this is [`PeerIdentity::anonymous`].
    pub(crate) fn is_anonymous(&self) -> bool {
        self.name.is_empty()
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_anonymous() {
            write!(f, "an anonymous caller")
        } else {
            write!(f, "'{}' (instance {:032x})", self.name, self.instance)
        }
    }
}
