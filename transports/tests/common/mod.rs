//! Helpers shared by the integration tests of this crate (each test crate uses some of them).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use nixl_core::{
    Agent, BackendName, Desc, DescList, MemKind, Registration, XferOp, XferOptions, XferRequest,
};
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

/// Why the agent's backend `name` cannot run (`None`: it runs). Panics when the agent was not
/// built with it.
pub fn unavailable(agent: &Agent, name: BackendName) -> Option<String> {
    let st = agent.backends().iter().find(|s| s.name == name);
    st.unwrap_or_else(|| panic!("{name} not among the agent's backends"))
        .unavailable
        .clone()
}

/// The file at `path`, created or emptied, open for reading and writing with the extra open
/// `flags` (`libc::O_DIRECT`, or 0).
pub fn open_rw(path: &std::path::Path, flags: i32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .open(path)
}

/// Whether the GPU tests run (`NIXL_TEST_CUDA=1`); prints the skip otherwise.
pub fn gpu() -> bool {
    if !nixl_testkit::env_is_1("NIXL_TEST_CUDA") {
        let why = "NIXL_TEST_CUDA=1 not set (needs an NVIDIA GPU and driver)";
        nixl_testkit::skip(why, true, &[]);
        return false;
    }
    true
}

/// An agent running the `tcp` backend alone, and the backend.
pub fn tcp_agent(name: &str, c: TcpConfig) -> (Agent, Arc<TcpBackend>) {
    let b = Arc::new(TcpBackend::new(c));
    let a = Agent::builder(name).backend(b.clone()).build().unwrap();
    (a, b)
}
