//! Registering memory with the backends, and deregistering it.

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::random::random_u64;
use super::{Agent, AgentInner};
use crate::backend::{Backend, BackendName, Registered};
use crate::error::{Error, Result};
use crate::mem::{Desc, DescList, MemKind};
use crate::region::{AccessGate, Region};

/// How long deregistration waits for transfers that still hold a region.
pub const DEREGISTER_PATIENCE: Duration = Duration::from_secs(60);

/// An RAII registration: the regions are deregistered when it is dropped (errors are logged), or
/// explicitly by [`Registration::deregister`], which reports them.
pub struct Registration {
    agent: Weak<AgentInner>,
    regions: Vec<Arc<Region>>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.regions.iter().map(|r| (r.kind, r.desc)))
            .finish()
    }
}

impl Registration {
    /// The descriptors registered.
    pub fn descs(&self) -> Vec<Desc> {
        self.regions.iter().map(|r| r.desc).collect()
    }

    /// The registered regions.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// Gives up the handle without deregistering: the regions stay registered until
    /// deregistered by descriptor ([`Agent::deregister`]) or until the agent is dropped.
    pub fn forget(mut self) {
        self.regions.clear();
    }

    /// Deregisters now, waiting for transfers that hold the regions; reports the first error.
    pub fn deregister(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let Some(agent) = self.agent.upgrade() else {
            self.regions.clear();
            return Ok(());
        };
        let mut first = Ok(());
        for r in self.regions.drain(..) {
            // Regions deregistered by descriptor meanwhile are not an error here.
            if agent.target.0.regions.remove_id(&r).is_some() {
                if let Err(e) = agent.finish_deregister(&r) {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!(error = %e, "deregistration on drop failed");
        }
    }
}

impl Agent {
    /// Registers every descriptor of `list` as a region, with every running backend that
    /// registers that kind of memory.
    ///
    /// # Safety
    /// For DRAM (and VRAM) descriptors, the memory must stay allocated, valid for reads and
    /// writes, until the region is deregistered (deregistration waits for transfers that still
    /// use it). While registered, the memory is read and written by transfers at any time, from
    /// other threads and processes: don't hold Rust references into it across a transfer that
    /// writes it, and describe memory a transfer writes with a pointer that may write
    /// ([`Desc::from_mut_slice`]). File, block and object descriptors carry no such contract.
    pub unsafe fn register(&self, list: &DescList) -> Result<Registration> {
        self.register_inner(list, None)
    }

    /// Registers with the named backends only.
    ///
    /// # Safety
    /// As [`Agent::register`].
    pub unsafe fn register_with(
        &self,
        list: &DescList,
        backends: &[BackendName],
    ) -> Result<Registration> {
        self.register_inner(list, Some(backends))
    }

    fn register_inner(
        &self,
        list: &DescList,
        only: Option<&[BackendName]>,
    ) -> Result<Registration> {
        let kind = list.kind();
        if list.is_empty() {
            return Err(Error::InvalidArgument("empty descriptor list".into()));
        }
        let chosen: Vec<&Arc<dyn Backend>> = match only {
            Some(names) => {
                let mut v = Vec::new();
                for n in names {
                    if let Some(b) = self.inner.backends.iter().find(|b| b.name() == *n) {
                        if !b.caps().local_kinds.contains(&kind) {
                            return Err(Error::InvalidArgument(format!(
                                "backend {n} does not register {kind} memory"
                            )));
                        }
                        v.push(b);
                    } else {
                        return Err(self.missing_backend(*n));
                    }
                }
                v
            }
            None => self
                .inner
                .backends
                .iter()
                .filter(|b| b.caps().local_kinds.contains(&kind))
                .collect(),
        };
        if chosen.is_empty() {
            let mut reason = format!("no running backend registers {kind} memory");
            for s in &self.inner.states {
                if let Some(r) = &s.unavailable {
                    let _ = write!(reason, "; {} unavailable: {r}", s.name);
                }
            }
            return Err(Error::Unavailable {
                backend: match kind {
                    MemKind::Vram => BackendName::Cuda,
                    MemKind::Object => BackendName::Object,
                    MemKind::File | MemKind::Block => BackendName::Posix,
                    MemKind::Dram => BackendName::Local,
                },
                reason: reason.into(),
            });
        }
        let mut done: Vec<Arc<Region>> = Vec::with_capacity(list.len());
        let result = (|| {
            for desc in list.descs() {
                // Before any backend registers it: nothing to undo if there is no key.
                let key = random_u64()?;
                // Tells the backends that registered this descriptor to forget it.
                let undo = |publics: &[(BackendName, Vec<u8>)]| {
                    for (name, public) in publics {
                        if let Some(b) = chosen.iter().find(|b| b.name() == *name) {
                            b.deregister(Registered {
                                kind,
                                desc: *desc,
                                key,
                                public,
                            });
                        }
                    }
                };
                let mut publics = Vec::with_capacity(chosen.len());
                let mut skipped: Option<Error> = None;
                for b in &chosen {
                    match b.register(kind, desc) {
                        Ok(p) => publics.push((b.name(), p)),
                        // Not named by the caller, and unable to take this memory (RDMA with
                        // neither dmabuf nor peer memory for VRAM, say): the region goes
                        // without it, and requests that would need it say so.
                        Err(e @ Error::Unavailable { .. }) if only.is_none() => {
                            tracing::info!(agent = %self.inner.name, backend = %b.name(), %kind,
                                desc = ?desc, "registered without this backend: {e}");
                            skipped.get_or_insert(e);
                        }
                        Err(e) => {
                            undo(&publics);
                            return Err(e);
                        }
                    }
                }
                if publics.is_empty() {
                    if let Some(e) = skipped {
                        return Err(e);
                    }
                }
                let region = Region {
                    id: self.inner.next_region.fetch_add(1, Ordering::Relaxed),
                    kind,
                    desc: *desc,
                    key,
                    backends: publics,
                    gate: AccessGate::default(),
                };
                let registered: Vec<(BackendName, Vec<u8>)> = region.backends.clone();
                match self.inner.target.0.regions.insert(region) {
                    Ok(r) => done.push(r),
                    Err(e) => {
                        undo(&registered);
                        return Err(e);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for r in &done {
                let _ = self.inner.deregister_region(r);
            }
            return Err(e);
        }
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(agent = %self.inner.name, %kind, count = done.len(), "registered");
        Ok(Registration {
            agent: Arc::downgrade(&self.inner),
            regions: done,
        })
    }

    /// Deregisters regions by the exact descriptors they were registered with. A descriptor that
    /// is not registered (never, or already deregistered) is an error; the ones before it in the
    /// list are deregistered.
    pub fn deregister(&self, kind: MemKind, descs: &[Desc]) -> Result<()> {
        for d in descs {
            let r = self.inner.target.0.regions.remove(kind, d)?;
            self.inner.finish_deregister(&r)?;
        }
        Ok(())
    }
}

impl AgentInner {
    fn deregister_region(&self, region: &Arc<Region>) -> Result<()> {
        if self.target.0.regions.remove_id(region).is_none() {
            return Err(Error::NotRegistered {
                kind: region.kind,
                desc: region.desc,
            });
        }
        self.finish_deregister(region)
    }

    fn finish_deregister(&self, region: &Arc<Region>) -> Result<()> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let drained = region.gate.close_and_drain(DEREGISTER_PATIENCE);
        for b in &self.backends {
            if region.has_backend(b.name()) {
                b.deregister(region.registered(b.name()));
            }
        }
        if drained {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: region.backends.first().map_or(BackendName::Local, |b| b.0),
                op: "deregister",
                reason: format!(
                    "transfers still held {} {:?} after {:?}",
                    region.kind, region.desc, DEREGISTER_PATIENCE
                ),
            })
        }
    }
}
