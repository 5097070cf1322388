//! The agent's unit tests: no key or id without the OS random generator; `check_remote`.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{random_u64, Agent};
use crate::backend::{Backend, BackendName, TargetHandle};
use crate::error::{Error, Result};
use crate::mem::{Desc, DescList, MemKind};

thread_local! {
    /// Makes this thread's OS random generator fail.
    pub(crate) static RANDOM_FAILS: Cell<bool> = const { Cell::new(false) };
}

#[derive(Debug, Default)]
struct Counting {
    registered: AtomicUsize,
}

impl Backend for Counting {
    fn name(&self) -> BackendName {
        BackendName::Local
    }
    fn caps(&self) -> crate::Caps {
        crate::Caps::new(&[MemKind::Dram], crate::Locality::SameProcess, 0).without_notifications()
    }
    fn probe(&self) -> std::result::Result<(), crate::Unusable> {
        Ok(())
    }
    fn start(&self, _target: TargetHandle) -> Result<()> {
        Ok(())
    }
    fn conn_info(&self) -> Vec<u8> {
        Vec::new()
    }
    fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
        self.registered.fetch_add(1, Ordering::Relaxed);
        Ok(Vec::new())
    }
    fn deregister(&self, _region: crate::backend::Registered<'_>) {
        self.registered.fetch_sub(1, Ordering::Relaxed);
    }
    fn can_reach(&self, _conn_info: &[u8]) -> std::result::Result<(), crate::Unusable> {
        Err("nowhere".into())
    }
    fn connect(&self, _peer: &crate::PeerInfo<'_>) -> Result<Arc<dyn crate::Connection>> {
        Err(Error::InvalidArgument("no peers".into()))
    }
    fn shutdown(&self) {}
}

#[test]
fn no_key_or_id_without_the_os_random_generator() {
    RANDOM_FAILS.with(|f| f.set(true));
    let e = Agent::builder("no-random").build().unwrap_err();
    assert!(e.to_string().contains("getrandom"), "{e}");
    assert!(random_u64().is_err());

    RANDOM_FAILS.with(|f| f.set(false));
    let be = Arc::new(Counting::default());
    let agent = Agent::builder("random")
        .backend(be.clone())
        .build()
        .unwrap();
    let buf = vec![0u8; 4096];
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap();
    RANDOM_FAILS.with(|f| f.set(true));
    // SAFETY: `buf` outlives the agent, and the registration is refused anyway.
    let e = unsafe { agent.register(&list) }.unwrap_err();
    assert!(e.to_string().contains("getrandom"), "{e}");
    assert_eq!(be.registered.load(Ordering::Relaxed), 0, "left registered");
    assert!(agent.metadata().regions.is_empty());
    RANDOM_FAILS.with(|f| f.set(false));
    // SAFETY: as above; `buf` outlives the registration.
    let r = unsafe { agent.register(&list) }.unwrap();
    assert_ne!(agent.metadata().regions[0].key, 0);
    drop(r);
}

#[test]
fn check_remote_says_whether_a_peer_describes_the_descriptors() {
    let a = Agent::builder("a")
        .backend(Arc::new(Counting::default()))
        .build()
        .unwrap();
    let b = Agent::builder("b")
        .backend(Arc::new(Counting::default()))
        .build()
        .unwrap();
    let buf = vec![0u8; 4096];
    let whole = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap();
    let inside = DescList::from_descs(
        MemKind::Dram,
        vec![Desc::new(buf.as_ptr() as u64 + 100, 200, 0)],
    )
    .unwrap();
    let outside =
        DescList::from_descs(MemKind::Dram, vec![Desc::new(buf.as_ptr() as u64, 4097, 0)]).unwrap();
    assert!(matches!(
        a.check_remote("b", &inside),
        Err(Error::UnknownPeer(_))
    ));
    // SAFETY: `buf` outlives the registration (dropped at the end of the test).
    let r = unsafe { b.register(&whole) }.unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    a.check_remote("b", &inside).unwrap();
    a.check_remote("b", &DescList::new(MemKind::Dram)).unwrap();
    assert!(matches!(
        a.check_remote("b", &outside),
        Err(Error::RemoteNotRegistered { index: 0, .. })
    ));
    drop(r);
}
