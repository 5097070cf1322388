//! The central metadata store (etcd), as NIXL configures it from the environment.

use nixl_discovery::{DiscoveryError, EtcdConfig, Publication, Registry};
use pyo3::prelude::*;

use crate::errors::{err, invalid, nixlBackendError, nixlNotSupportedError};

/// The central metadata store from the environment, as NIXL configures it:
/// `NIXL_ETCD_ENDPOINTS` (comma-separated URLs) and `NIXL_ETCD_NAMESPACE` (the key prefix,
/// default `/nixl/agents/`).
pub(crate) fn etcd_env() -> Option<EtcdConfig> {
    let eps = std::env::var("NIXL_ETCD_ENDPOINTS").ok()?;
    let eps: Vec<String> = eps
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_owned()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if eps.is_empty() {
        return None;
    }
    let mut cfg = EtcdConfig::new(eps);
    if let Ok(ns) = std::env::var("NIXL_ETCD_NAMESPACE") {
        if !ns.is_empty() {
            cfg.prefix = if ns.ends_with('/') { ns } else { ns + "/" };
        }
    }
    Some(cfg)
}

/// The etcd connection (made now if it is not yet) and the publication slot.
pub(crate) fn etcd_state(
    slot: &mut Option<(Registry, Option<Publication>)>,
) -> PyResult<&mut (Registry, Option<Publication>)> {
    if slot.is_none() {
        let cfg = etcd_env().ok_or_else(|| {
            nixlNotSupportedError::new_err(
                "no metadata server: give ip_addr (and port) to reach a peer's listen thread, \
                 or set NIXL_ETCD_ENDPOINTS (e.g. http://127.0.0.1:2379) to use etcd",
            )
        })?;
        *slot = Some((Registry::connect(&cfg).map_err(etcd_err)?, None));
    }
    Ok(slot.as_mut().expect("just set"))
}

pub(crate) fn etcd_err(e: DiscoveryError) -> PyErr {
    match e {
        DiscoveryError::Load { source, .. } => err(source),
        DiscoveryError::Config(_) => invalid(format!("etcd: {e}")),
        e => nixlBackendError::new_err(format!("etcd: {e}")),
    }
}
