//! How a model is laid out in registered memory so that peers can pull it with one-sided READs
//! alone: a control region (a header page, the manifest, one "have" byte per chunk) and a data
//! region (the files at [`FILE_ALIGN`](crate::manifest::FILE_ALIGN) offsets).
//!
//! A puller finds the control region among a source's registered regions by the header's magic
//! and model name, reads the manifest (checking its digest against the header), then the have
//! bytes (every byte 1 on an origin; growing on a replica that serves while it pulls), then
//! chunks of the data region. Nothing a source publishes is trusted: the manifest is decoded
//! with bounds and compared across sources, every chunk is checked against its checksum.

use std::sync::Arc;

use nixl_core::{Agent, Desc, DescList, MemKind, Registration};

use crate::error::{Error, Result};
use crate::manifest::{Manifest, MAX_MANIFEST_BYTES, MAX_MODEL_NAME};
use crate::mem::HostMem;

/// Magic at the start of a control region.
pub const MAGIC: &[u8; 8] = b"NIXLWTS1";
/// Have byte: the chunk is not here.
pub const ABSENT: u8 = 0;
/// Have byte: the chunk is here and verified.
pub const HAVE: u8 = 1;
/// Have byte: the chunk is being fetched here.
pub const FETCHING: u8 = 2;
/// Size of the header page.
pub const HEADER: u64 = 4096;

/// A parsed control-region header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Model name.
    pub name: String,
    /// Length of the manifest (at offset [`HEADER`]).
    pub manifest_len: u64,
    /// xxh3-128 of the manifest.
    pub digest: u128,
    /// The data region, as the publishing agent registered it.
    pub data: Desc,
    /// Chunks (the have bytes' count).
    pub chunks: u64,
    /// Whether the publisher holds every chunk (an origin).
    pub complete: bool,
}

impl Header {
    /// Offset of the have bytes in the control region.
    pub fn have_offset(&self) -> u64 {
        (HEADER + self.manifest_len).div_ceil(4096) * 4096
    }

    /// Length of the control region.
    pub fn control_len(&self) -> u64 {
        (self.have_offset() + self.chunks).div_ceil(4096) * 4096
    }

    /// Encodes into a page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12] = u8::from(self.complete);
        b[16..24].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[24..40].copy_from_slice(&self.digest.to_le_bytes());
        b[40..48].copy_from_slice(&self.data.addr.to_le_bytes());
        b[48..56].copy_from_slice(&self.data.len.to_le_bytes());
        b[56..64].copy_from_slice(&self.chunks.to_le_bytes());
        b[64..66].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        b[66..66 + self.name.len()].copy_from_slice(self.name.as_bytes());
        b
    }

    /// Decodes a page read from a peer; `None` if it is not a control header at all.
    pub fn decode(b: &[u8]) -> Option<Result<Header>> {
        if b.len() < HEADER as usize || &b[..8] != MAGIC {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != 1 {
            return Some(Err(Error::Invalid(format!(
                "control header version {version} (this build reads 1)"
            ))));
        }
        let name_len = usize::from(u16::from_le_bytes([b[64], b[65]]));
        if name_len > MAX_MODEL_NAME {
            return Some(Err(Error::Invalid("control header: name too long".into())));
        }
        let Ok(name) = std::str::from_utf8(&b[66..66 + name_len]) else {
            return Some(Err(Error::Invalid("control header: name not UTF-8".into())));
        };
        let manifest_len = u64_at(16);
        if manifest_len > MAX_MANIFEST_BYTES as u64 {
            return Some(Err(Error::Invalid(format!(
                "control header: manifest of {manifest_len} bytes (at most {MAX_MANIFEST_BYTES})"
            ))));
        }
        let chunks = u64_at(56);
        if chunks > crate::manifest::MAX_CHUNKS as u64 {
            return Some(Err(Error::Invalid(
                "control header: too many chunks".into(),
            )));
        }
        Some(Ok(Header {
            name: name.to_owned(),
            manifest_len,
            digest: u128::from_le_bytes(b[24..40].try_into().unwrap_or([0; 16])),
            data: Desc::new(u64_at(40), u64_at(48), 0),
            chunks,
            complete: b[12] == 1,
        }))
    }
}

/// The header of a model whose data region is `data` (as its serving agent registered it).
pub fn header_for(manifest: &Manifest, enc: &[u8], data: Desc, complete: bool) -> Header {
    Header {
        name: manifest.name.clone(),
        manifest_len: enc.len() as u64,
        digest: xxhash_rust::xxh3::xxh3_128(enc),
        data,
        chunks: manifest.chunk_count() as u64,
        complete,
    }
}

/// Lays out a control region in `c` (at least [`Header::control_len`] bytes): the header page,
/// the encoded manifest `enc`, and the have bytes (all [`HAVE`] when `header.complete`).
pub fn fill_control(c: &mut [u8], header: &Header, enc: &[u8]) -> Result<()> {
    if (c.len() as u64) < header.control_len() {
        return Err(Error::Invalid(format!(
            "a control region of {} bytes for {}",
            c.len(),
            header.control_len()
        )));
    }
    c[..HEADER as usize].copy_from_slice(&header.encode());
    c[HEADER as usize..(HEADER as usize + enc.len())].copy_from_slice(enc);
    let h = header.have_offset() as usize;
    c[h..h + header.chunks as usize].fill(u8::from(header.complete));
    Ok(())
}

/// A model published from this agent's registered memory: an origin's whole model, or a
/// replica's buffers that fill as it pulls (`--serve`).
#[derive(Debug)]
pub struct Published {
    // Registrations first: they are dropped (deregistered) before the memory is unmapped.
    ctrl_reg: Registration,
    data_reg: Registration,
    ctrl: Arc<HostMem>,
    data: Arc<HostMem>,
    header: Header,
    manifest: Arc<Manifest>,
}

impl Published {
    /// Lays out `manifest` in a fresh control region, takes `data` (already holding the files
    /// when `complete`), and registers both with `agent`.
    pub fn new(
        agent: &Agent,
        manifest: Arc<Manifest>,
        data: Arc<HostMem>,
        complete: bool,
    ) -> Result<Published> {
        let enc = manifest.encode();
        let (_, data_len) = manifest.layout();
        if (data.len() as u64) < data_len {
            return Err(Error::Invalid("data buffer smaller than the model".into()));
        }
        let header = header_for(
            &manifest,
            &enc,
            Desc::new(data.addr(), data.len() as u64, 0),
            complete,
        );
        let mut ctrl = HostMem::new(header.control_len() as usize)?;
        fill_control(ctrl.as_mut_slice(), &header, &enc)?;
        let ctrl = Arc::new(ctrl);
        let ctrl_reg = register(agent, &ctrl)?;
        let data_reg = register(agent, &data)?;
        Ok(Published {
            ctrl_reg,
            data_reg,
            ctrl,
            data,
            header,
            manifest,
        })
    }

    /// The header as published.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// The data buffer.
    pub fn data(&self) -> &Arc<HostMem> {
        &self.data
    }

    /// Announces the state of chunk `index` to peers reading the have bytes: [`HAVE`] (held
    /// and verified), [`FETCHING`] (on its way here: a peer may wait for it rather than ask an
    /// origin), or [`ABSENT`].
    pub fn mark(&self, index: usize, state: u8) -> Result<()> {
        if index as u64 >= self.header.chunks {
            return Err(Error::Invalid(format!("no chunk {index}")));
        }
        // SAFETY: a single byte of the have array, which no Rust reference points into (peers
        // only read it through the backend, which copies).
        unsafe {
            self.ctrl
                .write(self.header.have_offset() + index as u64, &[state])
        }
    }

    /// Deregisters both regions (peers' reads fail from then on), reporting the first error.
    pub fn withdraw(self) -> Result<()> {
        let Published {
            ctrl_reg, data_reg, ..
        } = self;
        let a = ctrl_reg.deregister();
        let b = data_reg.deregister();
        a.and(b)
            .map_err(|e| Error::core("withdrawing the published model", e))
    }
}

/// Registers all of `mem` (DRAM) with every backend of `agent` that takes it.
pub fn register(agent: &Agent, mem: &Arc<HostMem>) -> Result<Registration> {
    let list = DescList::from_descs(
        MemKind::Dram,
        vec![Desc::new(mem.addr(), mem.len() as u64, 0)],
    )
    .map_err(|e| Error::core("describing a buffer", e))?;
    // SAFETY: the mapping stays allocated while the registration lives: every owner of a
    // Registration made here also holds the Arc<HostMem> and drops the registration first
    // (Published's field order; the puller's scratch pairs).
    unsafe { agent.register(&list) }.map_err(|e| Error::core("registering a buffer", e))
}
