//! Pulling single tensors straight into memory the caller owns and registered (an engine's own
//! weights, DRAM or VRAM), by name, with dtype and shape checked against the manifest: no files
//! on the way.
//!
//! ```no_run
//! # fn main() -> nixl_weight_streamer::Result<()> {
//! use std::sync::Arc;
//! use nixl_core::{Desc, DescList, MemKind};
//! use nixl_transports::config::Config;
//! use nixl_weight_streamer::tensors::TensorSource;
//!
//! let cfg = Config::from_toml("backends = [\"tcp\"]").unwrap();
//! let agent = Arc::new(cfg.agent_builder("engine-7").backends(cfg.backends().unwrap()).build().unwrap());
//! let model = TensorSource::connect(&agent, &cfg.auth(), None, "llama", &["10.0.0.5:7000".into()])?;
//! let t = model.manifest().tensor("model.embed_tokens.weight").unwrap().clone();
//! let mut weights = vec![0u8; (t.end - t.begin) as usize];
//! let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut weights)]).unwrap();
//! // SAFETY: `weights` outlives the registration and is not touched while the pull runs.
//! let _reg = unsafe { agent.register(&list) }.unwrap();
//! // SAFETY: as above; the descriptor is inside the registration.
//! unsafe { model.pull_tensor(&t.name, &t.dtype, &t.shape, MemKind::Dram, list.descs()[0]) }?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use nixl_core::{Agent, Desc, DescList, MemKind};
use nixl_transports::tcp::Auth;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::pull::{discover_all, Peer};

/// A model's sources, opened for tensor pulls.
#[derive(Debug)]
pub struct TensorSource {
    agent: Arc<Agent>,
    peers: Vec<Peer>,
    manifest: Arc<Manifest>,
    timeout: Duration,
}

/// How a tensor pull went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPulled {
    /// The source it came from.
    pub source: String,
    /// Bytes.
    pub bytes: u64,
    /// Whether its checksum was checked (DRAM destinations; VRAM ones are not read back).
    pub verified: bool,
    /// Copies that failed their checksum (and were fetched again from another source).
    pub corrupt: u32,
}

impl TensorSource {
    /// Finds the sources of `name` (the `sources` addresses, and etcd when given): one bounded
    /// attempt each (3 s); their manifests must agree.
    pub fn connect(
        agent: &Arc<Agent>,
        auth: &Auth,
        etcd: Option<&nixl_discovery::EtcdConfig>,
        name: &str,
        sources: &[String],
    ) -> Result<TensorSource> {
        Self::connect_with_timeout(agent, auth, etcd, name, sources, Duration::from_secs(3))
    }

    /// [`TensorSource::connect`] with `timeout` bounding each source's attempt (and each
    /// tensor's READ to ten times that).
    pub fn connect_with_timeout(
        agent: &Arc<Agent>,
        auth: &Auth,
        etcd: Option<&nixl_discovery::EtcdConfig>,
        name: &str,
        sources: &[String],
        timeout: Duration,
    ) -> Result<TensorSource> {
        let (peers, skipped) = discover_all(agent, auth, etcd, name, sources, timeout)?;
        let first = peers.first().ok_or_else(|| {
            Error::Incomplete(format!(
                "no source of {name:?} answered: {}",
                skipped.join("; ")
            ))
        })?;
        let manifest = Arc::clone(&first.manifest);
        for p in peers.iter().skip(1) {
            if p.header.digest != first.header.digest {
                return Err(crate::pull::mismatch(&manifest, &first.label, p));
            }
        }
        Ok(TensorSource {
            agent: Arc::clone(agent),
            peers,
            manifest,
            timeout,
        })
    }

    /// The model's manifest (every tensor's name, dtype, shape and size).
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// The sources' labels.
    pub fn sources(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.label.clone()).collect()
    }

    /// Pulls tensor `name` into `dst` (memory of `kind` the caller registered with this
    /// source's agent), after checking that the manifest's dtype and shape are `dtype` and
    /// `shape` and that `dst` is exactly the tensor's size. Tries each source in turn (a
    /// different first one per tensor, to spread the load); a DRAM copy that fails its checksum
    /// is fetched again from the next.
    ///
    /// # Safety
    /// `dst` must be inside a registration of this agent's memory that stays valid until this
    /// returns, and nothing else may read or write those bytes meanwhile (they are written by
    /// the transfer and, for DRAM, read back to verify them).
    pub unsafe fn pull_tensor(
        &self,
        name: &str,
        dtype: &str,
        shape: &[u64],
        kind: MemKind,
        dst: Desc,
    ) -> Result<TensorPulled> {
        let t = self
            .manifest
            .tensor(name)
            .ok_or_else(|| Error::ManifestMismatch {
                tensor: name.to_owned(),
                detail: format!("no such tensor in {}", self.manifest.model_id()),
            })?;
        if t.dtype != dtype || t.shape != shape {
            return Err(Error::ManifestMismatch {
                tensor: name.to_owned(),
                detail: format!(
                    "the model has {} {:?}, the caller expects {dtype} {shape:?}",
                    t.dtype, t.shape
                ),
            });
        }
        let len = t.end - t.begin;
        if dst.len != len {
            return Err(Error::Invalid(format!(
                "tensor {name:?} is {len} bytes, the destination {}",
                dst.len
            )));
        }
        if len == 0 {
            return Ok(TensorPulled {
                source: String::new(),
                bytes: 0,
                verified: true,
                corrupt: 0,
            });
        }
        let (offs, _) = self.manifest.layout();
        let off = offs[t.file as usize] + t.begin;
        let n = self.peers.len();
        let first = (xxh3_64(name.as_bytes()) as usize) % n;
        let mut errors = Vec::new();
        let mut corrupt = 0;
        for k in 0..n {
            let p = &self.peers[(first + k) % n];
            let r = (|| -> nixl_core::Result<()> {
                let l = DescList::from_descs(kind, vec![dst])?;
                let r = DescList::from_descs(
                    MemKind::Dram,
                    vec![Desc::new(p.header.data.addr + off, len, 0)],
                )?;
                let x = self
                    .agent
                    .post_read(&l, &r, &p.agent_name, self.timeout * 10)?;
                x.wait_blocking(None).into_result()
            })();
            if let Err(e) = r {
                if matches!(e, nixl_core::Error::LocalNotRegistered { .. }) {
                    // The caller's memory, not the source: no other source can do better.
                    return Err(Error::core(format!("tensor {name:?}: the destination"), e));
                }
                errors.push(format!("{}: {e}", p.label));
                continue;
            }
            if kind != MemKind::Dram {
                return Ok(TensorPulled {
                    source: p.label.clone(),
                    bytes: len,
                    verified: false,
                    corrupt,
                });
            }
            // SAFETY: the caller guarantees `dst` is valid, registered DRAM that nothing else
            // touches until we return; the transfer into it has ended.
            let got = unsafe { std::slice::from_raw_parts(dst.addr as *const u8, len as usize) };
            if xxh3_64(got) == t.sum {
                return Ok(TensorPulled {
                    source: p.label.clone(),
                    bytes: len,
                    verified: true,
                    corrupt,
                });
            }
            corrupt += 1;
            errors.push(format!("{}: copy failed its checksum", p.label));
        }
        Err(Error::Incomplete(format!(
            "tensor {name:?} from no source: {}",
            errors.join("; ")
        )))
    }
}
