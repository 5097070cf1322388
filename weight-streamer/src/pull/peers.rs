//! Sources: probing them, discovering them, and the one-sided READs from them.

use super::*;

/// A source that answered: its agent, its control and data regions, its manifest.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) label: String,
    pub(crate) agent_name: String,
    pub(crate) ctrl: Desc,
    pub(crate) header: Header,
    pub(crate) manifest: Arc<Manifest>,
}

/// A registered scratch buffer (the registration is dropped before the memory).
pub(super) struct Scratch {
    pub(super) reg: Option<Registration>,
    pub(super) mem: Arc<HostMem>,
}

impl Scratch {
    pub(super) fn new(agent: &Agent, len: u64) -> Result<Scratch> {
        let mem = Arc::new(HostMem::new(len as usize)?);
        let reg = register(agent, &mem)?;
        Ok(Scratch {
            reg: Some(reg),
            mem,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        drop(self.reg.take());
    }
}

/// READs `len` bytes of peer memory at `remote` into `local` at `off`.
pub(super) fn read_remote(
    agent: &Agent,
    peer: &str,
    local: &HostMem,
    off: u64,
    remote: u64,
    len: u64,
    timeout: Duration,
) -> nixl_core::Result<()> {
    let x = post_read(agent, peer, local, off, remote, len, timeout)?;
    x.wait_blocking(Some(timeout + Duration::from_secs(1)))
        .into_result()
}

/// Posts the READ of [`read_remote`] and returns it in flight.
pub(super) fn post_read(
    agent: &Agent,
    peer: &str,
    local: &HostMem,
    off: u64,
    remote: u64,
    len: u64,
    timeout: Duration,
) -> nixl_core::Result<XferRequest> {
    let l = DescList::from_descs(MemKind::Dram, vec![Desc::new(local.addr() + off, len, 0)])?;
    let r = DescList::from_descs(MemKind::Dram, vec![Desc::new(remote, len, 0)])?;
    agent.post_read(&l, &r, peer, timeout)
}

/// One bounded attempt to reach a source at `addr` and read its description of `name`.
pub(super) fn probe(
    agent: &Agent,
    auth: &Auth,
    addr: &str,
    name: &str,
    t: Duration,
) -> Result<Peer> {
    let md_bytes =
        fetch_metadata(addr, auth, t).map_err(|e| Error::core(format!("metadata of {addr}"), e))?;
    probe_loaded(agent, &md_bytes, addr, name, t)
}

/// Loads a source's metadata (from its listener or from etcd), then reads its control region's
/// header and manifest: one bounded attempt.
pub(crate) fn probe_loaded(
    agent: &Agent,
    md_bytes: &[u8],
    addr: &str,
    name: &str,
    t: Duration,
) -> Result<Peer> {
    let md = AgentMetadata::decode(md_bytes)
        .map_err(|e| Error::Invalid(format!("metadata of {addr}: {e}")))?;
    let peer = agent
        .load_remote_md(md.clone())
        .map_err(|e| Error::core(format!("loading metadata of {addr}"), e))?;
    let page = Scratch::new(agent, HEADER)?;
    // A source registers two regions per model it serves: a peer listing thousands costs one
    // bounded READ each, up to this many.
    for r in md
        .regions
        .iter()
        .filter(|r| r.kind == MemKind::Dram)
        .take(MAX_PROBED_REGIONS)
    {
        if r.desc.len < HEADER {
            continue;
        }
        read_remote(agent, &peer, &page.mem, 0, r.desc.addr, HEADER, t)
            .map_err(|e| Error::core(format!("reading a header from {addr}"), e))?;
        // SAFETY: the READ into the page has ended; nothing else writes it.
        let bytes = unsafe { page.mem.slice(0, HEADER)? }.to_vec();
        let Some(h) = Header::decode(&bytes) else {
            continue;
        };
        let h = h?;
        if h.name != name {
            continue;
        }
        if h.control_len() > r.desc.len {
            return Err(Error::Invalid(format!(
                "{addr}: control region of {} bytes shorter than its header says",
                r.desc.len
            )));
        }
        let ms = Scratch::new(agent, h.manifest_len.max(1))?;
        read_remote(
            agent,
            &peer,
            &ms.mem,
            0,
            r.desc.addr + HEADER,
            h.manifest_len,
            t,
        )
        .map_err(|e| Error::core(format!("reading the manifest from {addr}"), e))?;
        // SAFETY: the READ has ended; nothing else writes this scratch buffer.
        let enc = unsafe { ms.mem.slice(0, h.manifest_len)? };
        if xxh3_128(enc) != h.digest {
            return Err(Error::Invalid(format!(
                "{addr}: manifest does not match the digest in its header"
            )));
        }
        let m = Manifest::decode(enc)?;
        if m.name != name || m.chunk_count() as u64 != h.chunks {
            return Err(Error::Invalid(format!(
                "{addr}: manifest of {:?} with {} chunks under a header of {:?} with {}",
                m.name,
                m.chunk_count(),
                h.name,
                h.chunks
            )));
        }
        let (_, data_len) = m.layout();
        let data_ok = md.regions.iter().any(|x| {
            x.kind == MemKind::Dram
                && x.desc.addr == h.data.addr
                && x.desc.len == h.data.len
                && x.desc.len >= data_len
        });
        if !data_ok {
            return Err(Error::Invalid(format!(
                "{addr}: the data region its header names is not registered or too short"
            )));
        }
        return Ok(Peer {
            label: addr.to_owned(),
            agent_name: peer,
            ctrl: r.desc,
            header: h,
            manifest: Arc::new(m),
        });
    }
    Err(Error::Invalid(format!(
        "{addr} does not serve a model named {name:?}"
    )))
}

/// The sources of `name` at `sources` and in etcd: one bounded attempt each; the failures as
/// "skipped" lines.
pub(crate) fn discover_all(
    agent: &Agent,
    auth: &Auth,
    etcd: Option<&nixl_discovery::EtcdConfig>,
    name: &str,
    sources: &[String],
    t: Duration,
) -> Result<(Vec<Peer>, Vec<String>)> {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for addr in sources {
        match probe(agent, auth, addr, name, t) {
            Ok(p) => peers.push(p),
            Err(e) => {
                tracing::warn!(source = %addr, "source skipped: {e}");
                skipped.push(format!("{addr}: {e}"));
            }
        }
    }
    if let Some(cfg) = etcd {
        let reg = nixl_discovery::Registry::connect(&etcd_prefix(cfg, name))
            .map_err(|e| Error::Invalid(format!("etcd: {e}")))?;
        let (found, sk) = discover(agent, &reg, name, &[], t);
        peers.extend(found);
        skipped.extend(sk);
    }
    Ok((peers, skipped))
}
