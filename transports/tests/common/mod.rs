//! Helpers shared by the integration tests of this crate (each test crate uses some of them).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use nixl_core::{Agent, Desc, DescList, MemKind, Registration, XferOp, XferOptions, XferRequest};
use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};

pub use nixl_testkit::pattern;

/// Registration for tests: every buffer is declared before its registration (so it outlives
/// it) and is read only after the transfers that write it have ended (`Agent::register`).
pub fn reg(agent: &Agent, buf: &mut [u8]) -> Registration {
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(buf)]).unwrap();
    // SAFETY: see above.
    unsafe { agent.register(&list) }.unwrap()
}

/// `buf` as a list of one DRAM descriptor.
pub fn one(buf: &[u8]) -> DescList {
    DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(buf)]).unwrap()
}

/// Options with this notification, the rest default.
pub fn opts(notif: Option<&[u8]>) -> XferOptions {
    XferOptions {
        notif: notif.map(<[u8]>::to_vec),
        ..XferOptions::default()
    }
}

/// A request of `a` moving `local` to or from `remote` at `peer` (one descriptor each), with
/// `notif` sent at its end.
pub fn xfer(
    a: &Agent,
    op: XferOp,
    local: &[u8],
    remote: &[u8],
    peer: &str,
    notif: Option<&[u8]>,
) -> nixl_core::Result<XferRequest> {
    a.create_xfer(op, &one(local), &one(remote), peer, opts(notif))
}

/// A `tcp` listener on a free loopback port, giving up on a silent peer after 2 s.
pub fn loopback(auth: Auth) -> TcpConfig {
    TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        io_timeout: Duration::from_secs(2),
        auth,
        ..TcpConfig::default()
    }
}

/// An agent running the `tcp` backend alone, and the backend.
pub fn tcp_agent(name: &str, c: TcpConfig) -> (Agent, Arc<TcpBackend>) {
    let b = Arc::new(TcpBackend::new(c));
    let a = Agent::builder(name).backend(b.clone()).build().unwrap();
    (a, b)
}
