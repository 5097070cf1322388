//! The `tcp` backend: one-sided READ and WRITE between agents on any hosts.
//!
//! The target agent carries out every request against its own registrations: each piece of a
//! WRITE or READ names a target range and the region key, and the target checks both (and that
//! the region is still registered) before a byte moves. On a plain connection data goes
//! straight between the socket and registered memory with vectored I/O, no staging copy on
//! either side; on a TLS connection (agents with a secret) it is sealed from and opened
//! into registered memory by rustls's record layer, one copy each way (`Link`).
//!
//! An initiator keeps a session per peer: `conns_per_peer` authenticated connections, each with a
//! sender and a receiver thread. A post splits its descriptors into chunks of at most
//! `chunk_bytes` (large descriptors are cut, small ones batched, up to 1000 per frame) and deals
//! them round-robin to the connections' queues; each connection sends its next chunk whenever it
//! has fewer than `window` unanswered, so large transfers are pipelined across all connections
//! (for a READ, the thread that has just read a chunk's DATA asks for the lane's next chunk
//! itself, a small frame, so the target is kept serving without waking the sender thread). A
//! request of one chunk of at most 64 KiB is written by the posting thread itself when a
//! connection is idle, which saves a thread hand-off (about half the latency of a small
//! request). A notification is sent once every chunk is acknowledged, so the
//! target sees it only after all the data landed.
//!
//! Faults: a connection closed under a request ends it `Failed(remote disconnect)`; a
//! connection that moves no byte for `io_timeout` while work is outstanding (a cut link, a
//! frozen peer) is dropped and its requests end `TimedOut`; either way the memory of a request
//! stays held until no thread touches it any more. The next post reconnects, and refuses a peer
//! that restarted (a new instance id) until its new metadata is loaded.
//!
//! A post that ends early (cancelled, past its deadline) lets go of its memory at once: no
//! further chunk is sent, a READ's DATA still on its way is read off the stream and thrown
//! away (a chunk being read stops after the current socket read), and its completion (the
//! core's hold on the local regions) is dropped as soon as no lane thread is inside that memory,
//! without waiting for the target's remaining answers, which a slow link can take seconds to
//! bring. The target cannot be stopped mid-chunk, but what it still serves of a READ comes from
//! its own memory: it knows when it stopped, and answers [`nixl_core::Backend::peer_idle`]
//! exactly (a data connection counts as idle only while its thread waits for a frame with
//! nothing unread on the socket), so the owner of that memory (a KV handoff's prefill side) frees
//! it only once every READ the peer had asked for was carried out. Notifications nobody waits
//! for ([`nixl_core::Agent::post_notif`]) return once queued, not after their acknowledgement,
//! which travels behind whatever DATA the peer still has queued on that connection.
//! A standalone notification (sent or posted) is written only once every transfer posted on
//! the session before it has ended: each chunk answered, whether it was on the wire or still
//! queued for a connection, or dropped unsent because the caller gave the transfer up. So when
//! the peer reads "I stopped reading your blocks", no READ asked before it is still served or
//! still to come, on any connection (a barrier across connections, which TCP does not order).
//!
//! A lying target cannot make the initiator write where or when it should not: each lane's
//! answers must match, in order, what that lane asked (DATA of exactly the chunk's length for a
//! READ chunk, ACK for the rest); an unknown, duplicate, late, oversized or wrong-kind answer is
//! a protocol error that fails the session before a byte of it lands, and a post ends (releasing
//! its memory) only once no lane thread reads into or writes from it any more.
//!
//! Every connection authenticates first, within a deadline (see [`Auth`]: by default with this
//! user's per-host secret file, so that only this user's agents on this host get in). With a
//! secret (that one or a shared one) the connection is TLS 1.3, and inside it each side proves
//! the secret bound to the TLS channel and to both agents' names and instance ids, so a relayed
//! handshake fails and every later byte is protected ([`PeerIdentity`]): notifications, pushed
//! metadata and control requests are attributed to the proven name only, and the initiator
//! checks that the listener is the agent its metadata names. The listener also serves the agent's metadata to peers that
//! fetch it ([`fetch_metadata`]) and, only with `accept_pushes`, loads metadata that an agent
//! pushes about itself ([`push_metadata`]), or drops it at that agent's request
//! ([`invalidate_metadata`]).
//!
//! What a peer can make the listener hold is bounded: one thread and one fd per connection,
//! at most `max_conns` connections (and at most half the process's fd limit), `max_conns_per_ip`
//! of them from one address, more closed on accept and counted (`nixl_tcp_conns_refused_total`);
//! a connection must finish its handshake within `handshake_timeout` and send OPEN within
//! `connect_timeout` of authenticating (and within that deadline), and is closed after
//! `idle_timeout` without a frame (`nixl_tcp_idle_closed_total`; initiators reconnect on their
//! next post); each connection takes only the frames of its purpose, each within its own size
//! limit checked from the header before the body is read (a data connection: WRITE and READ of
//! at most 1000 pieces, NOTIF; never a metadata push or a control request); bodies over 64 KiB
//! share one `frame_memory` budget (`nixl_tcp_frame_memory_refused_total`). Notifications go
//! into the agent's queue within its byte budget; one past it is answered `Denied` with the
//! reason, which the sender's `send_notif` or post returns.

mod auth;
mod backend;
mod client;
mod client_plan;
mod client_post;
mod client_session;
mod client_setup;
mod config;
mod conn_info;
mod control;
mod identity;
#[cfg(test)]
mod limits_tests;
mod link;
mod metadata;
mod net;
mod raw;
mod server;
mod server_conn;
mod server_control;
mod server_worker;
#[cfg(test)]
mod tests;
mod tls;
mod user_secret;
pub(crate) mod wire;

pub use auth::{Auth, CertFiles, PeerIdentity, TlsMode, TlsSettings};
pub use backend::TcpBackend;
pub use config::{parse_listen, TcpConfig};
#[doc(hidden)]
pub use conn_info::conn_info_for;
pub use conn_info::listen_addrs_in;
pub use control::{TcpControl, PING, PONG};
#[doc(hidden)]
pub use metadata::push_metadata_as;
pub use metadata::{fetch_metadata, invalidate_metadata, push_metadata};
#[doc(hidden)]
pub use raw::{raw_data_connection, raw_listener_opening, RawConnection};
