//! Checkpoints under `s3://bucket/prefix`, through the agent's `object` backend: one object per
//! region (`prefix/d<save id>-<n>.dat`), written whole (multipart past the backend's threshold)
//! and read by ranged GETs chunk by chunk; the manifest object (`prefix/manifest.nckpt`, its
//! length first) is PUT last, after every data object was written, so a save killed before it
//! leaves the previous manifest, which names only the previous objects.

use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, Registration, XferOp, XferOptions};
use nixl_transports::object::{delete_objects, list_objects, name_object};

use crate::dir::{
    file_index, hash_all, Pick, Posted, Region, RestoreOptions, SaveOptions, SaveReport,
};
use crate::error::{CkptError, Result};
use crate::fetch::{with_file_mapped, TempDir};
use crate::manifest::{self, Chunk, DataFile, Manifest};
use crate::ops::{is_ours, Location, MANIFEST};

/// A bucket and a key prefix (no trailing slash; may be empty).
#[derive(Clone, Debug)]
pub(crate) struct S3Loc {
    pub(crate) bucket: String,
    pub(crate) prefix: String,
}

impl S3Loc {
    pub(crate) fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// The prefix the checkpoint's objects are listed under (`prefix/`, or empty).
    fn dir_prefix(&self) -> String {
        let p = self.prefix.trim_matches('/');
        if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        }
    }

    /// `key` (a full key) relative to the prefix, in the manifest's file name form.
    fn relative(&self, key: &str) -> String {
        let a: Vec<&str> = self.prefix.split('/').filter(|p| !p.is_empty()).collect();
        let b: Vec<&str> = key.split('/').filter(|p| !p.is_empty()).collect();
        let common = a
            .iter()
            .zip(&b[..b.len().saturating_sub(1)])
            .take_while(|(x, y)| x == y)
            .count();
        let mut parts: Vec<&str> = vec![".."; a.len() - common];
        parts.extend_from_slice(&b[common..]);
        parts.join("/")
    }

    /// The key of `name` (a manifest file name, `..` allowed) under the prefix.
    pub(crate) fn key(&self, name: &str) -> Result<String> {
        let mut parts: Vec<&str> = self.prefix.split('/').filter(|p| !p.is_empty()).collect();
        for c in name.split('/') {
            if c == ".." {
                if parts.pop().is_none() {
                    return Err(CkptError::Manifest(format!(
                        "data file {name:?} lies above the bucket's root"
                    )));
                }
            } else {
                parts.push(c);
            }
        }
        Ok(parts.join("/"))
    }

    /// Registers object `key` (`size` bytes) with the agent under a fresh id.
    pub(crate) fn register(
        &self,
        agent: &Agent,
        key: &str,
        size: u64,
    ) -> Result<(u64, Registration)> {
        let id = nixl_core::random_u64().map_err(|e| CkptError::agent("object id", e))?;
        let name = format!("{}/{key}", self.bucket);
        name_object(agent, id, &name)
            .map_err(|e| CkptError::agent(format!("name object {name}"), e))?;
        let list = DescList::from_descs(MemKind::Object, vec![Desc::new(0, size.max(1), id)])
            .map_err(|e| CkptError::agent(format!("object {name}"), e))?;
        // SAFETY: OBJECT descriptors carry no memory contract.
        let reg = unsafe { agent.register(&list) }
            .map_err(|e| CkptError::agent(format!("register object {name}"), e))?;
        Ok((id, reg))
    }
}

pub(crate) fn run(
    agent: &Agent,
    op: XferOp,
    mem: Vec<Desc>,
    obj: Vec<Desc>,
    what: &str,
) -> Result<()> {
    let ctx = |e| CkptError::agent(what.to_owned(), e);
    let local = DescList::from_descs(MemKind::Dram, mem).map_err(ctx)?;
    let remote = DescList::from_descs(MemKind::Object, obj).map_err(ctx)?;
    let req = agent
        .create_xfer(op, &local, &remote, agent.name(), XferOptions::default())
        .map_err(ctx)?;
    req.post().map_err(ctx)?;
    let posted = Posted(vec![req]);
    posted.0[0].wait_blocking(None).into_result().map_err(ctx)
}

pub(crate) fn is_missing(e: &CkptError) -> bool {
    let s = e.to_string();
    s.contains("404") || s.contains("NoSuchKey")
}

/// Saves `regions` under `loc`: a full checkpoint, or (with `opts.base`, a checkpoint in the
/// same bucket) an incremental one whose unchanged chunks are the base's objects, referenced by
/// their keys relative to `loc` (`../base/d....dat`, as in directories). Changed chunks are
/// written in runs: each run of consecutive changed chunks of a region is one new object (a
/// full save: one object per region). After the manifest, objects of earlier saves under the
/// prefix that it does not name are deleted.
///
/// # Safety
/// As [`crate::save`].
pub(crate) unsafe fn save(
    agent: &Agent,
    loc: &S3Loc,
    regions: &[Region],
    origin: &[Region],
    opts: &SaveOptions,
    metadata: String,
) -> Result<SaveReport> {
    let cs = opts.chunk_size;
    let base = match &opts.base {
        None => None,
        Some(b) => match Location::parse(b)? {
            Location::S3 { bucket, prefix } if bucket == loc.bucket => {
                let bl = S3Loc { bucket, prefix };
                let bm = read_manifest(agent, &bl)?;
                if bm.chunk_size != cs {
                    return Err(CkptError::InvalidArgument(format!(
                        "base {b} has chunk size {}, this save {cs}: they must be equal",
                        bm.chunk_size
                    )));
                }
                Some((bl, bm))
            }
            _ => {
                return Err(CkptError::Unsupported(format!(
                    "{}: the base of an incremental save to an object store must be a \
                     checkpoint in the same bucket (s3://{}/...), not {b}",
                    loc.uri(),
                    loc.bucket
                )))
            }
        },
    };
    let save_id = nixl_core::random_u64().map_err(|e| CkptError::agent("random save id", e))?;
    let chunks = crate::dir::chunk_list(regions, cs);
    let progress = opts.progress.as_ref();
    let mut files: Vec<DataFile> = Vec::new();
    let mut placed: Vec<Option<Chunk>> = vec![None; chunks.len()];
    let mut hashes: Vec<u64> = Vec::new();
    if let Some((bl, bm)) = &base {
        // SAFETY: the caller keeps the regions readable for the call.
        hashes = unsafe { hash_all(&chunks, progress, "hash") };
        placed = crate::dir::reused_chunks(bm, origin, &chunks, &hashes, &mut files, |f| {
            Ok(loc.relative(&bl.key(&f.name)?))
        })?;
    }
    let reused = placed.iter().filter(|c| c.is_some()).count();
    // Runs of consecutive chunks to write, each one new object.
    let mut regs = Vec::new();
    let mut mem = Vec::new();
    let mut obj = Vec::new();
    let (mut k, mut n) = (0, 0u32);
    while k < chunks.len() {
        if placed[k].is_some() {
            k += 1;
            continue;
        }
        let (ri, _, addr, _) = chunks[k];
        let mut end = k;
        let mut size = 0;
        while end < chunks.len() && chunks[end].0 == ri && placed[end].is_none() {
            size += chunks[end].3;
            end += 1;
        }
        let name = format!("d{save_id:016x}-{n}.dat");
        n += 1;
        let (id, reg) = loc.register(agent, &loc.key(&name)?, size)?;
        regs.push(reg);
        mem.push(Desc::new(addr, size, 0));
        obj.push(Desc::new(0, size, id));
        let fi = file_index(&mut files, &name, size);
        for (j, p) in placed[k..end].iter_mut().enumerate() {
            *p = Some(Chunk {
                file: fi,
                offset: j as u64 * cs,
                len: chunks[k + j].3,
                xxh3: 0,
            });
        }
        k = end;
    }
    let written: u64 = mem.iter().map(|d| d.len).sum();
    let what = format!("write the regions to {}", loc.uri());
    if hashes.is_empty() {
        // A full save: checksums on every core while the objects are uploaded.
        let (w, h) = std::thread::scope(|s| {
            // SAFETY: the caller keeps the regions readable for the call.
            let h = s.spawn(|| unsafe { hash_all(&chunks, progress, "save") });
            let w = run(agent, XferOp::Write, mem, obj, &what);
            (w, h.join())
        });
        w?;
        hashes = h.map_err(|_| CkptError::InvalidArgument("checksum thread panicked".into()))?;
    } else if !mem.is_empty() {
        run(agent, XferOp::Write, mem, obj, &what)?;
    }
    let mut entries = crate::dir::entries_of(origin);
    for (k, &(ri, _, _, _)) in chunks.iter().enumerate() {
        let c = placed[k].expect("every chunk is reused or written");
        entries[ri].chunks.push(Chunk {
            xxh3: hashes[k],
            ..c
        });
    }
    let m = Manifest {
        save_id,
        created_unix_ms: crate::dir::now_ms(),
        chunk_size: cs,
        base: opts.base.clone(),
        metadata,
        files,
        regions: entries,
        artifacts: Vec::new(),
    };
    let mut m = m;
    if !opts.artifacts.is_empty() {
        let first = m.files.len();
        m.artifacts = put_artifacts(agent, loc, save_id, first, &opts.artifacts, &mut m.files)?;
    }
    put_manifest(agent, loc, &m)?;
    drop(regs);
    Ok(SaveReport {
        bytes: regions.iter().map(|r| r.len).sum(),
        written,
        chunks: chunks.len(),
        reused,
        backend: Some("object".into()),
        manifest: m,
        paths: Vec::new(),
    })
}

/// Most objects directly under one checkpoint prefix that a listing accepts.
const LIST_LIMIT: usize = manifest::MAX_FILES + 4096;

/// The objects directly under `loc`: `(key, name under the prefix)`.
fn children(agent: &Agent, loc: &S3Loc) -> Result<Vec<(String, String)>> {
    let dir = loc.dir_prefix();
    let objs = list_objects(agent, &loc.bucket, &dir, Some("/"), LIST_LIMIT)
        .map_err(|e| CkptError::agent(format!("list {}", loc.uri()), e))?;
    Ok(objs
        .into_iter()
        .filter_map(|o| {
            let name = o.key[dir.len()..].to_owned();
            (!name.contains('/')).then_some((o.key, name))
        })
        .collect())
}

/// The data objects (and nothing else) of checkpoints directly under `loc`: `(key, name)`.
fn our_objects(agent: &Agent, loc: &S3Loc) -> Result<Vec<(String, String)>> {
    Ok(children(agent, loc)?
        .into_iter()
        .filter(|(_, name)| is_ours(name))
        .collect())
}

/// Deletes the data objects under `loc` that `m` does not name (a replaced save's, or those a
/// killed save wrote before its manifest). Failures are logged: the new checkpoint stands.
fn remove_stale(agent: &Agent, loc: &S3Loc, m: &Manifest) {
    let stale: Vec<String> = match our_objects(agent, loc) {
        Ok(o) => o
            .into_iter()
            .filter(|(_, name)| !m.files.iter().any(|f| &f.name == name))
            .map(|(k, _)| k)
            .collect(),
        Err(e) => {
            tracing::warn!(at = %loc.uri(), "could not list the objects of replaced saves: {e}");
            return;
        }
    };
    if !stale.is_empty() {
        if let Err(e) = delete_objects(agent, &loc.bucket, &stale) {
            tracing::warn!(at = %loc.uri(), "could not delete the objects of replaced saves: {e}");
        }
    }
}

/// Removes the checkpoint under `loc`: the manifest object first (from then on nothing
/// restores from it), then its data objects directly under the prefix. Objects of other
/// checkpoints it references (an incremental save's base) stay. Returns the objects removed.
pub(crate) fn remove(agent: &Agent, loc: &S3Loc, force: bool) -> Result<usize> {
    if !force {
        let deps = dependents(agent, loc)?;
        if !deps.is_empty() {
            return Err(CkptError::HasDependents {
                location: loc.uri(),
                dependents: deps,
            });
        }
    }
    let all = children(agent, loc)?;
    let mkey = loc.key(MANIFEST)?;
    let listed_manifest = all.iter().any(|(k, _)| *k == mkey);
    let data: Vec<(String, String)> = all.into_iter().filter(|(_, n)| is_ours(n)).collect();
    // The manifest goes first even if the listing did not show it.
    delete_objects(agent, &loc.bucket, std::slice::from_ref(&mkey))
        .map_err(|e| CkptError::agent(format!("delete s3://{}/{mkey}", loc.bucket), e))?;
    if !listed_manifest && data.is_empty() {
        return Err(CkptError::NoCheckpoint {
            location: loc.uri(),
            reason: "no manifest and no data objects of a checkpoint there (nothing removed)"
                .into(),
        });
    }
    let keys: Vec<String> = data.into_iter().map(|(k, _)| k).collect();
    let n = delete_objects(agent, &loc.bucket, &keys)
        .map_err(|e| CkptError::agent(format!("delete the data objects of {}", loc.uri()), e))?;
    Ok(n + usize::from(listed_manifest))
}

/// Most objects under the parent prefix that [`dependents`] lists.
const SIBLINGS_LIST_LIMIT: usize = 1_000_000;

/// The checkpoints beside `loc` (under the same parent prefix, one level down) whose manifests
/// name data objects directly under `loc`: incremental saves over it. As `s3://` URIs, sorted.
/// A prefix beside it whose manifest cannot be read is passed over.
pub(crate) fn dependents(agent: &Agent, loc: &S3Loc) -> Result<Vec<String>> {
    let own = loc.dir_prefix();
    let p = loc.prefix.trim_matches('/');
    let parent = match p.rfind('/') {
        Some(i) => &p[..=i],
        None => "",
    };
    let objs =
        list_objects(agent, &loc.bucket, parent, None, SIBLINGS_LIST_LIMIT).map_err(|e| {
            CkptError::agent(
                format!(
                    "list s3://{}/{parent} for incremental checkpoints over {} (nixl-ckpt rm \
                 --force skips this)",
                    loc.bucket,
                    loc.uri()
                ),
                e,
            )
        })?;
    let mut out = Vec::new();
    for o in objs {
        let Some(sib) = o.key[parent.len()..].strip_suffix(&format!("/{MANIFEST}")) else {
            continue;
        };
        if sib.is_empty() || sib.contains('/') || format!("{parent}{sib}/") == own {
            continue;
        }
        let sl = S3Loc {
            bucket: loc.bucket.clone(),
            prefix: format!("{parent}{sib}"),
        };
        let Ok(m) = read_manifest(agent, &sl) else {
            continue;
        };
        let ours = |f: &DataFile| {
            f.name.contains('/')
                && sl.key(&f.name).is_ok_and(|k| {
                    k.strip_prefix(own.as_str())
                        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
                })
        };
        if m.files.iter().any(ours) {
            out.push(sl.uri());
        }
    }
    out.sort();
    Ok(out)
}

/// Packs the artifact directories `arts` as a directory save does (one data file per
/// artifact, `d<save id>-<first + i>.dat`, in a private temporary directory) and PUTs each as
/// the object of that name under `loc`; returns their manifest entries, `files` extended.
fn put_artifacts(
    agent: &Agent,
    loc: &S3Loc,
    save_id: u64,
    first: usize,
    arts: &[(String, std::path::PathBuf)],
    files: &mut Vec<DataFile>,
) -> Result<Vec<crate::manifest::Artifact>> {
    let tmp = TempDir::new("pack")?;
    let n = files.len();
    let out = crate::artifact::save_artifacts(&tmp.0, save_id, first, arts, files)?;
    for f in &files[n..] {
        let path = tmp.0.join(&f.name);
        with_file_mapped(agent, &path, f.size, false, &[BackendName::Object], |mem| {
            put_data(agent, loc, &f.name, mem)
        })?;
    }
    Ok(out)
}

/// PUTs the registered host memory `mem` as the data object `name` under `loc` (a streamed
/// copy's run of chunks).
pub(crate) fn put_data(agent: &Agent, loc: &S3Loc, name: &str, mem: Desc) -> Result<()> {
    let key = loc.key(name)?;
    let (id, reg) = loc.register(agent, &key, mem.len)?;
    let what = format!("PUT s3://{}/{key}", loc.bucket);
    let r = run(
        agent,
        XferOp::Write,
        vec![mem],
        vec![Desc::new(0, mem.len, id)],
        &what,
    );
    drop(reg);
    r
}

/// Writes the manifest object of `m` under `loc` (what makes the checkpoint there valid:
/// every data object it names must be written first), then deletes data objects under `loc`
/// that `m` does not name.
pub(crate) fn put_manifest(agent: &Agent, loc: &S3Loc, m: &Manifest) -> Result<()> {
    m.validate()?;
    let body = m.encode();
    let mut buf = Vec::with_capacity(8 + body.len());
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    buf.extend_from_slice(&body);
    transfer_buf(agent, loc, &mut buf, XferOp::Write)?;
    remove_stale(agent, loc, m);
    Ok(())
}

/// Moves `buf` to or from the manifest object (from offset 0).
fn transfer_buf(agent: &Agent, loc: &S3Loc, buf: &mut [u8], op: XferOp) -> Result<()> {
    let key = loc.key(MANIFEST)?;
    let (id, oreg) = loc.register(agent, &key, buf.len() as u64)?;
    let d = Desc::from_mut_slice(buf);
    let list = DescList::from_descs(MemKind::Dram, vec![d])
        .map_err(|e| CkptError::agent("manifest buffer", e))?;
    // SAFETY: `buf` outlives the registration, dropped at the end of this function, and no
    // reference to it is used while the transfer runs.
    let mreg = unsafe { agent.register(&list) }
        .map_err(|e| CkptError::agent("register the manifest buffer", e))?;
    let what = format!(
        "{} s3://{}/{key}",
        if op == XferOp::Write { "PUT" } else { "GET" },
        loc.bucket
    );
    let r = run(agent, op, vec![d], vec![Desc::new(0, d.len, id)], &what);
    drop(mreg);
    drop(oreg);
    r
}

/// Reads the manifest under `loc`: its length (8 bytes), then the rest.
pub(crate) fn read_manifest(agent: &Agent, loc: &S3Loc) -> Result<Manifest> {
    let mut head = [0u8; 8];
    if let Err(e) = transfer_buf(agent, loc, &mut head, XferOp::Read) {
        return Err(if is_missing(&e) {
            CkptError::NoCheckpoint {
                location: loc.uri(),
                reason: format!(
                    "no {MANIFEST} object (nothing was saved there, or the save did not finish: \
                     the manifest is written last)"
                ),
            }
        } else {
            e
        });
    }
    let len = u64::from_le_bytes(head);
    if len > manifest::MAX_MANIFEST_BYTES as u64 || len < manifest::HEADER_BYTES as u64 {
        return Err(CkptError::Manifest(format!(
            "the manifest object says it holds {len} bytes"
        )));
    }
    let mut buf = vec![0u8; 8 + len as usize];
    transfer_buf(agent, loc, &mut buf, XferOp::Read).map_err(|e| {
        if e.to_string().contains("shorter") {
            CkptError::Manifest(format!("the manifest object is truncated: {e}"))
        } else {
            e
        }
    })?;
    if buf[..8] != head {
        return Err(CkptError::Manifest(
            "the manifest object changed while it was read".into(),
        ));
    }
    Manifest::decode(&buf[8..])
}

/// Restores `chosen` (caller's region, its entry) of `m` from `loc`; returns the chunks read,
/// as `(index in chosen, chunk, addr, len)`, for the caller to verify.
///
/// # Safety
/// As [`crate::restore`].
pub(crate) unsafe fn read_regions(
    agent: &Agent,
    loc: &S3Loc,
    m: &Manifest,
    chosen: &[Pick],
    _opts: &RestoreOptions,
) -> Result<Vec<(usize, usize, u64, u64)>> {
    let mut ids: Vec<(u32, u64, String)> = Vec::new();
    let mut regs = Vec::new();
    let mut mem = Vec::new();
    let mut obj = Vec::new();
    let mut chunks = Vec::new();
    for (ri, pk) in chosen.iter().enumerate() {
        for (ci, c) in pk.each() {
            let id = match ids.iter().find(|x| x.0 == c.file) {
                Some(x) => x.1,
                None => {
                    let f = &m.files[c.file as usize];
                    let key = loc.key(&f.name)?;
                    let (id, reg) = loc.register(agent, &key, f.size)?;
                    regs.push(reg);
                    ids.push((c.file, id, key));
                    id
                }
            };
            let addr = pk.addr(ci, m.chunk_size);
            mem.push(Desc::new(addr, c.len, 0));
            obj.push(Desc::new(c.offset, c.len, id));
            chunks.push((ri, ci, addr, c.len));
        }
    }
    let what = format!("read {}", loc.uri());
    if let Err(e) = run(agent, XferOp::Read, mem, obj, &what) {
        // Name the region and chunk of the object the store could not serve.
        let msg = e.to_string();
        // The chunk whose range the failed GET asked for, else the object's first chunk.
        let blame = ids
            .iter()
            .find(|(_, _, key)| msg.contains(key.as_str()))
            .and_then(|(fi, _, key)| {
                let note = crate::ops::base_note(m, &m.files[*fi as usize].name);
                let of_file = || {
                    chosen.iter().flat_map(|pk| {
                        pk.each()
                            .filter(|(_, c)| c.file == *fi)
                            .map(move |(ci, c)| (pk.into.name.clone(), ci, c.offset))
                    })
                };
                of_file()
                    .find(|(_, _, off)| msg.contains(&format!("bytes {off}-")))
                    .or_else(|| of_file().next())
                    .map(|(r, ci, _)| (r, ci, key.clone(), note))
            });
        let short = msg.contains("shorter") || msg.contains("Content-Range");
        let (region, chunk, why) = match blame {
            Some((r, ci, key, note)) if is_missing(&e) => {
                (r, Some(ci), format!("object {key} is missing{note}: {msg}"))
            }
            Some((r, ci, key, _)) if short => (
                r,
                Some(ci),
                format!("object {key} is truncated (shorter than the manifest says): {msg}"),
            ),
            Some((r, ci, _, _)) => (r, Some(ci), format!("reading failed: {msg}")),
            None => return Err(Pick::read_failed(chosen, format!("reading failed: {msg}"))),
        };
        return Err(CkptError::Corrupt {
            region,
            chunk,
            reason: why,
            memory_written: true,
        });
    }
    drop(regs);
    Ok(chunks)
}
