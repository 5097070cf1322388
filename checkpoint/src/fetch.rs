//! Artifact data files moved through an agent: fetched from `s3://` (GETs) or from a peer
//! serving the checkpoint (`nixl://`, one-sided READs) into a private temporary directory, and
//! put to `s3://`. What is fetched is untrusted: every file of an artifact is checked against
//! the manifest's xxh3 when it is restored or copied from there (see [`crate::artifact`]).

use std::io;
use std::path::{Path, PathBuf};

use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, XferOp};

use crate::dir::Opened;
use crate::error::{CkptError, Result};
use crate::manifest::{Artifact, DataFile, EntryKind, Manifest};
use crate::mapped::network_backends;
use crate::ops::Location;
use crate::s3::{self, S3Loc};

/// A private temporary directory, removed with what it holds when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(what: &str) -> Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt as _;
        let r = nixl_core::random_u64().map_err(|e| CkptError::agent("random name", e))?;
        let p = std::env::temp_dir().join(format!("nixl-ckpt-{what}-{r:016x}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| CkptError::io(format!("create {}", p.display()), e))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The indices in `m.files` of the data files holding the bytes of the artifacts `arts`,
/// sorted, each once (an index the manifest does not list is an error).
pub(crate) fn used_files<'a>(
    m: &Manifest,
    arts: impl IntoIterator<Item = &'a Artifact>,
) -> Result<Vec<usize>> {
    let mut used = Vec::new();
    for a in arts {
        for e in a.entries.iter().filter(|e| e.kind == EntryKind::File) {
            let i = e.file as usize;
            if i >= m.files.len() {
                return Err(CkptError::Manifest(format!(
                    "artifact {:?} names data file {i}, not listed",
                    a.name
                )));
            }
            used.push(i);
        }
    }
    used.sort_unstable();
    used.dedup();
    Ok(used)
}

/// Fetches the data files `used` of the checkpoint `src` (`s3://` or `nixl://`) into `tmp`
/// as `f<i>.dat`; returns the manifest with those files renamed so, for restoring or copying
/// the artifacts from `tmp`. `label` names the artifacts in errors.
pub(crate) fn fetch_files(
    agent: &Agent,
    src: &Opened,
    used: &[usize],
    tmp: &Path,
    label: &str,
) -> Result<Manifest> {
    let m = &src.manifest;
    let mut local = m.clone();
    for &i in used {
        let f = &m.files[i];
        let lname = format!("f{i}.dat");
        let path = tmp.join(&lname);
        std::fs::File::create(&path)
            .and_then(|h| h.set_len(f.size))
            .map_err(|e| CkptError::io(format!("create {}", path.display()), e))?;
        let failed = |reason: String| CkptError::ArtifactCorrupt {
            artifact: label.to_owned(),
            path: String::new(),
            reason,
        };
        match (&src.loc, &src.peer) {
            (Location::S3 { bucket, prefix }, _) => {
                let loc = S3Loc {
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                };
                let key = loc.key(&f.name)?;
                with_file_mapped(agent, &path, f.size, true, &[BackendName::Object], |mem| {
                    let (id, reg) = loc.register(agent, &key, f.size)?;
                    let what = format!("GET s3://{}/{key}", loc.bucket);
                    let r = s3::run(
                        agent,
                        XferOp::Read,
                        vec![mem],
                        vec![Desc::new(0, f.size, id)],
                        &what,
                    );
                    drop(reg);
                    r.map_err(|e| {
                        failed(if s3::is_missing(&e) {
                            format!("object {key} is missing: {e}")
                        } else {
                            format!("reading object {key}: {e}")
                        })
                    })
                })?;
            }
            (Location::Peer { addr, .. }, Some(p)) => {
                let net = network_backends(agent);
                with_file_mapped(agent, &path, f.size, true, &net, |mem| {
                    crate::serve::read_file(agent, p, i as u32, mem).map_err(|e| {
                        failed(format!("reading data file {i} from nixl://{addr}: {e}"))
                    })
                })?;
            }
            _ => {
                return Err(CkptError::InvalidArgument(format!(
                    "{}: artifact data files are fetched from s3:// or nixl:// only",
                    src.uri
                )))
            }
        }
        local.files[i].name = lname;
    }
    Ok(local)
}

/// The directory the artifact data files of the checkpoint `src` can be read from, and the
/// manifest naming them there: the checkpoint's own directory, or `tmp` after [`fetch_files`]
/// of the files of `arts`.
pub(crate) fn local_files<'a>(
    agent: &Agent,
    src: &Opened,
    arts: impl IntoIterator<Item = &'a Artifact>,
    tmp: &Path,
    label: &str,
) -> Result<(PathBuf, Manifest)> {
    match &src.loc {
        Location::Dir(d) => Ok((d.clone(), src.manifest.clone())),
        _ => {
            let used = used_files(&src.manifest, arts)?;
            let local = fetch_files(agent, src, &used, tmp, label)?;
            Ok((tmp.to_path_buf(), local))
        }
    }
}

/// The bytes of every data file the artifacts of the checkpoint at `uri` use, read through
/// `agent` (for serving them to peers): `(index in the manifest's files, bytes)`. The bytes
/// are as stored (restorers check every file).
pub(crate) fn artifact_file_bytes(agent: &Agent, src: &Opened) -> Result<Vec<(u32, Vec<u8>)>> {
    let m = &src.manifest;
    if m.artifacts.is_empty() {
        return Ok(Vec::new());
    }
    let tmp = TempDir::new("serve")?;
    let (dir, local) = local_files(agent, src, &m.artifacts, &tmp.0, "(all)")?;
    let mut out = Vec::new();
    for i in used_files(m, &m.artifacts)? {
        let f = &local.files[i];
        let path = dir.join(&f.name);
        let bytes = std::fs::read(&path)
            .map_err(|e| CkptError::io(format!("read artifact data file {}", path.display()), e))?;
        if bytes.len() as u64 != f.size {
            return Err(CkptError::ArtifactCorrupt {
                artifact: "(all)".into(),
                path: String::new(),
                reason: format!(
                    "data file {:?} holds {} bytes, the manifest says {}",
                    m.files[i].name,
                    bytes.len(),
                    f.size
                ),
            });
        }
        out.push((i as u32, bytes));
    }
    Ok(out)
}

/// PUTs the data files `files` of the directory `dir` as the objects of the same names under
/// `loc`.
pub(crate) fn put_files(agent: &Agent, loc: &S3Loc, dir: &Path, files: &[DataFile]) -> Result<()> {
    for f in files {
        let path = dir.join(&f.name);
        with_file_mapped(agent, &path, f.size, false, &[BackendName::Object], |mem| {
            s3::put_data(agent, loc, &f.name, mem)
        })?;
    }
    Ok(())
}

/// Maps the file at `path` (`len` bytes; `write`: changes reach the file) and hands `f` the
/// mapping, registered with the agent's `backend`, as a DRAM descriptor. A file of no bytes is
/// not mapped and `f` is not called.
pub(crate) fn with_file_mapped(
    agent: &Agent,
    path: &Path,
    len: u64,
    write: bool,
    backends: &[BackendName],
    f: impl FnOnce(Desc) -> Result<()>,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| CkptError::io(format!("open {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| CkptError::io(format!("stat {}", path.display()), e))?
        .len();
    let n = usize::try_from(len)
        .ok()
        .filter(|_| size == len)
        .ok_or_else(|| {
            CkptError::InvalidArgument(format!("{}: {size} bytes, {len} expected", path.display()))
        })?;
    let flags = if write {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    // SAFETY: a fresh mapping of `n` bytes of an open file that holds them; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(CkptError::io(
            format!("mmap {}", path.display()),
            io::Error::last_os_error(),
        ));
    }
    let unmap = Unmapped(p, n);
    let d = Desc::new(p as u64, len, 0);
    let r = (|| {
        let list = DescList::from_descs(MemKind::Dram, vec![d])
            .map_err(|e| CkptError::agent("artifact pack", e))?;
        // SAFETY: the mapping outlives the registration (dropped at the end of this closure,
        // before `unmap`), and nothing else touches it meanwhile.
        let reg = unsafe { agent.register_with(&list, backends) }
            .map_err(|e| CkptError::agent("register the artifact pack", e))?;
        let r = f(d);
        drop(reg);
        r
    })();
    drop(unmap);
    r
}

/// Unmaps a mapping when dropped.
struct Unmapped(*mut libc::c_void, usize);

impl Drop for Unmapped {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `with_file_mapped`, whose registration of it was
        // dropped first.
        unsafe { libc::munmap(self.0, self.1) };
    }
}
