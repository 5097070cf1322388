//! Artifact directories: file trees (kernel and compile caches) saved with a checkpoint in a
//! directory and restored into a directory the caller chooses.
//!
//! **Saved** as one data file per artifact (`d<save id>-<n>.dat`, the files' bytes one after
//! the other), listed in the manifest with each directory and file: its relative path, its
//! permission bits (`0o777` at most), where its bytes are and their xxh3-64. Regular files and
//! directories only: a symbolic link, device, FIFO or socket in the tree, or a name that is not
//! UTF-8, fails the save with its path (nothing is followed out of the tree). Modification times
//! and owners are not kept.
//!
//! **Restored** into a fresh hidden directory beside the destination
//! (`.NAME.nckpt-tmp-<random>`, mode 0700), every file created new (`O_EXCL`, so nothing
//! already there is followed or overwritten) and its bytes checked against the manifest before
//! the next; then files and directories are `fsync`ed and the tree is renamed onto the
//! destination (which must not exist, or be an empty directory). Any failure removes the hidden
//! directory: the destination is either absent/untouched or complete and verified.
//! The manifest's paths are untrusted: plain relative components only (no `..`, no absolute
//! path, no empty or `.` component, no NUL), each parent declared as a directory before what it
//! holds, bounded in count and length (see [`crate::manifest`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, FileExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::dir::sync_dir;
use crate::error::{CkptError, Result};
use crate::manifest::{
    check_artifact_path, check_region_name, Artifact, ArtifactEntry, DataFile, EntryKind, Manifest,
    MAX_ARTIFACTS, MAX_ARTIFACT_ENTRIES,
};
use crate::ops::{create_data_file, read_manifest, Location};

/// Bytes copied at a time.
const PIECE: usize = 1 << 20;

/// What [`restore_artifact`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArtifactReport {
    /// Directories created (the destination's own not counted).
    pub dirs: usize,
    /// Files created.
    pub files: usize,
    /// Bytes written (every one verified).
    pub bytes: u64,
}

/// The directories and files under `root`, parents first, names sorted: `(path, kind, mode,
/// source)`.
fn walk(name: &str, root: &Path) -> Result<Vec<(String, EntryKind, u32, PathBuf)>> {
    let md = std::fs::metadata(root)
        .map_err(|e| CkptError::io(format!("artifact {name:?}: {}", root.display()), e))?;
    if !md.is_dir() {
        return Err(CkptError::InvalidArgument(format!(
            "artifact {name:?}: {} is not a directory",
            root.display()
        )));
    }
    let mut out = Vec::new();
    // Depth first, parents before children: (relative path, directory).
    let mut stack: Vec<(String, PathBuf)> = vec![(String::new(), root.to_path_buf())];
    while let Some((rel, dir)) = stack.pop() {
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| CkptError::io(format!("artifact {name:?}: list {}", dir.display()), e))?;
        let mut kids = Vec::new();
        for e in rd {
            let e = e.map_err(|e| {
                CkptError::io(format!("artifact {name:?}: list {}", dir.display()), e)
            })?;
            let fname = e.file_name();
            let Some(fname) = fname.to_str() else {
                return Err(CkptError::InvalidArgument(format!(
                    "artifact {name:?}: {} has a name that is not UTF-8 (not saved)",
                    e.path().display()
                )));
            };
            kids.push((fname.to_owned(), e.path()));
        }
        kids.sort();
        let mut subdirs = Vec::new();
        for (fname, path) in kids {
            let p = if rel.is_empty() {
                fname
            } else {
                format!("{rel}/{fname}")
            };
            check_artifact_path(&p)
                .map_err(|r| CkptError::InvalidArgument(format!("artifact {name:?}: {r}")))?;
            let md = std::fs::symlink_metadata(&path)
                .map_err(|e| CkptError::io(format!("artifact {name:?}: {}", path.display()), e))?;
            let mode = md.permissions().mode() & 0o777;
            let kind = if md.is_dir() {
                EntryKind::Dir
            } else if md.is_file() {
                EntryKind::File
            } else {
                return Err(CkptError::InvalidArgument(format!(
                    "artifact {name:?}: {} is a {} (only directories and regular files are \
                     saved)",
                    path.display(),
                    if md.file_type().is_symlink() {
                        "symbolic link"
                    } else {
                        "special file"
                    }
                )));
            };
            if out.len() == MAX_ARTIFACT_ENTRIES {
                return Err(CkptError::InvalidArgument(format!(
                    "artifact {name:?}: more than {MAX_ARTIFACT_ENTRIES} entries"
                )));
            }
            out.push((p.clone(), kind, mode, path.clone()));
            if kind == EntryKind::Dir {
                subdirs.push((p, path));
            }
        }
        // Popped in order: the first subdirectory's tree right after its entry.
        stack.extend(subdirs.into_iter().rev());
    }
    // Depth first left the parents before their children; sort nothing more.
    Ok(out)
}

/// Writes the artifact directories `arts` (name, directory) into `dir` as data files
/// `d<save_id>-<first + i>.dat`, appended to `files`; returns their manifest entries.
pub(crate) fn save_artifacts(
    dir: &Path,
    save_id: u64,
    first: usize,
    arts: &[(String, PathBuf)],
    files: &mut Vec<DataFile>,
) -> Result<Vec<Artifact>> {
    if arts.len() > MAX_ARTIFACTS {
        return Err(CkptError::InvalidArgument(format!(
            "{} artifact directories, over the limit of {MAX_ARTIFACTS}",
            arts.len()
        )));
    }
    let mut out = Vec::with_capacity(arts.len());
    let mut total = 0;
    for (i, (name, root)) in arts.iter().enumerate() {
        check_region_name(name).map_err(CkptError::InvalidArgument)?;
        if arts[..i].iter().any(|(n, _)| n == name) {
            return Err(CkptError::InvalidArgument(format!(
                "artifact {name:?} named twice"
            )));
        }
        let tree = walk(name, root)?;
        total += tree.len();
        if total > MAX_ARTIFACT_ENTRIES {
            return Err(CkptError::InvalidArgument(format!(
                "more than {MAX_ARTIFACT_ENTRIES} entries in all artifact directories"
            )));
        }
        let (dname, dpath, df) = create_data_file(dir, save_id, first + i)?;
        let mut w = io::BufWriter::with_capacity(PIECE, &df);
        let mut off = 0u64;
        let fi = files.len() as u32;
        let mut entries = Vec::with_capacity(tree.len());
        let mut buf = vec![0u8; PIECE];
        for (path, kind, mode, src) in tree {
            let (mut size, mut hash) = (0u64, 0u64);
            if kind == EntryKind::File {
                let at = || format!("artifact {name:?}: {}", src.display());
                let mut f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&src)
                    .map_err(|e| CkptError::io(at(), e))?;
                let mut h = Xxh3::new();
                loop {
                    let n = match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(CkptError::io(at(), e)),
                    };
                    h.update(&buf[..n]);
                    w.write_all(&buf[..n])
                        .map_err(|e| CkptError::io(format!("write {}", dpath.display()), e))?;
                    size += n as u64;
                }
                hash = h.digest();
            }
            entries.push(ArtifactEntry {
                path,
                kind,
                mode,
                file: if kind == EntryKind::File { fi } else { 0 },
                offset: if kind == EntryKind::File { off } else { 0 },
                size,
                xxh3: hash,
            });
            off += size;
        }
        w.flush()
            .map_err(|e| CkptError::io(format!("write {}", dpath.display()), e))?;
        drop(w);
        df.sync_all()
            .map_err(|e| CkptError::io(format!("fsync {}", dpath.display()), e))?;
        files.push(DataFile {
            name: dname,
            size: off,
        });
        out.push(Artifact {
            name: name.clone(),
            entries,
        });
    }
    Ok(out)
}

/// Copies the bytes of `a`'s file `e` from `src` (its data file) to `dst`, checking them.
fn copy_entry(
    art: &str,
    e: &ArtifactEntry,
    src: &File,
    src_name: &str,
    dst: &mut dyn io::Write,
    buf: &mut [u8],
) -> Result<()> {
    let bad = |reason: String| CkptError::ArtifactCorrupt {
        artifact: art.to_owned(),
        path: e.path.clone(),
        reason,
    };
    let mut h = Xxh3::new();
    let mut done = 0u64;
    while done < e.size {
        let n = (e.size - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], e.offset + done)
            .map_err(|err| {
                if err.kind() == io::ErrorKind::UnexpectedEof {
                    bad(format!("data file {src_name:?} is truncated"))
                } else {
                    bad(format!("reading {src_name:?}: {err}"))
                }
            })?;
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|err| bad(format!("writing it: {err}")))?;
        done += n as u64;
    }
    let got = h.digest();
    if got != e.xxh3 {
        return Err(bad(format!(
            "checksum mismatch (manifest xxh3 {:016x}, data {got:016x})",
            e.xxh3
        )));
    }
    Ok(())
}

/// Opens the data files of `m` that artifact `a` uses, by index.
fn open_files(dir: &Path, m: &Manifest, a: &Artifact) -> Result<Vec<Option<File>>> {
    let mut open: Vec<Option<File>> = (0..m.files.len()).map(|_| None).collect();
    for e in a.entries.iter().filter(|e| e.kind == EntryKind::File) {
        let i = e.file as usize;
        if open[i].is_none() {
            let name = &m.files[i].name;
            let f = File::open(dir.join(name)).map_err(|err| CkptError::ArtifactCorrupt {
                artifact: a.name.clone(),
                path: e.path.clone(),
                reason: format!("data file {name:?} cannot be opened: {err}"),
            })?;
            open[i] = Some(f);
        }
    }
    Ok(open)
}

/// Restores the artifact directory `name` of the checkpoint at `uri` (a directory) into `dest`,
/// which must not exist or be an empty directory; its parent must exist. Every file is checked
/// against the manifest before the tree appears at `dest` (see the module's docs); on error
/// `dest` is left as it was.
pub fn restore_artifact(uri: &str, name: &str, dest: &Path) -> Result<ArtifactReport> {
    let dir = match Location::parse(uri)? {
        Location::Dir(d) => d,
        _ => {
            return Err(CkptError::Unsupported(format!(
                "{uri}: restore_artifact reads checkpoint directories; for s3:// use \
                 restore_artifact_with and an agent running the object backend"
            )))
        }
    };
    let m = read_manifest(uri)?;
    restore_artifact_from(&dir, &m, name, dest)
}

/// [`restore_artifact`] of a checkpoint anywhere the agent reaches: a directory,
/// `s3://bucket/prefix` through its `object` backend, or a peer serving it (`nixl://`, its
/// `tcp` backend). From `s3://` and `nixl://` the artifact's data files are fetched into a
/// private temporary directory first, then restored from there, every file checked.
pub fn restore_artifact_with(
    agent: &nixl_core::Agent,
    uri: &str,
    name: &str,
    dest: &Path,
) -> Result<ArtifactReport> {
    if let Location::Dir(_) = Location::parse(uri)? {
        return restore_artifact(uri, name, dest);
    }
    let src = crate::dir::Opened::open(agent, uri)?;
    let a = src.manifest.artifact(name)?;
    let tmp = crate::fetch::TempDir::new("fetch")?;
    let (dir, local) = crate::fetch::local_files(agent, &src, [a], &tmp.0, name)?;
    restore_artifact_from(&dir, &local, name, dest)
}

/// [`restore_artifact`] from the data files of `m` in `dir`.
pub(crate) fn restore_artifact_from(
    dir: &Path,
    m: &Manifest,
    name: &str,
    dest: &Path,
) -> Result<ArtifactReport> {
    let a = m.artifact(name)?;
    let leaf = dest
        .file_name()
        .and_then(|f| f.to_str())
        .filter(|f| *f != "." && *f != "..")
        .ok_or_else(|| {
            CkptError::InvalidArgument(format!(
                "destination {} must end in a UTF-8 name",
                dest.display()
            ))
        })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Ok(md) if md.is_dir() => {
            let mut rd = std::fs::read_dir(dest)
                .map_err(|e| CkptError::io(format!("list {}", dest.display()), e))?;
            if rd.next().is_some() {
                return Err(CkptError::InvalidArgument(format!(
                    "destination {} is not empty",
                    dest.display()
                )));
            }
        }
        Ok(_) => {
            return Err(CkptError::InvalidArgument(format!(
                "destination {} exists and is not a directory",
                dest.display()
            )))
        }
        Err(e) => return Err(CkptError::io(format!("stat {}", dest.display()), e)),
    }
    let rand = nixl_core::random_u64().map_err(|e| CkptError::agent("random name", e))?;
    let tmp = parent.join(format!(".{leaf}.nckpt-tmp-{rand:016x}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| CkptError::io(format!("create {}", tmp.display()), e))?;
    let r = fill(dir, m, a, &tmp).and_then(|rep| {
        std::fs::rename(&tmp, dest).map_err(|e| {
            CkptError::io(
                format!("rename {} onto {}", tmp.display(), dest.display()),
                e,
            )
        })?;
        sync_dir(&parent)?;
        Ok(rep)
    });
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

/// Creates every entry of `a` under `root` (fresh, ours), verified, synced, modes set.
fn fill(dir: &Path, m: &Manifest, a: &Artifact, root: &Path) -> Result<ArtifactReport> {
    let open = open_files(dir, m, a)?;
    let mut rep = ArtifactReport {
        dirs: 0,
        files: 0,
        bytes: 0,
    };
    let mut buf = vec![0u8; PIECE];
    let mut dirs = Vec::new();
    for e in &a.entries {
        let p = root.join(&e.path);
        match e.kind {
            EntryKind::Dir => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&p)
                    .map_err(|err| CkptError::io(format!("create {}", p.display()), err))?;
                dirs.push((p, e.mode));
                rep.dirs += 1;
            }
            EntryKind::File => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&p)
                    .map_err(|err| CkptError::io(format!("create {}", p.display()), err))?;
                let src = open[e.file as usize].as_ref().expect("opened above");
                let fname = &m.files[e.file as usize].name;
                copy_entry(&a.name, e, src, fname, &mut f, &mut buf)?;
                f.set_permissions(std::fs::Permissions::from_mode(e.mode))
                    .and_then(|()| f.sync_all())
                    .map_err(|err| CkptError::io(format!("write {}", p.display()), err))?;
                rep.files += 1;
                rep.bytes += e.size;
            }
        }
    }
    // Deepest first, so that a directory without write permission is closed last.
    for (p, mode) in dirs.iter().rev() {
        sync_dir(p)?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(*mode))
            .map_err(|err| CkptError::io(format!("chmod {}", p.display()), err))?;
    }
    sync_dir(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|err| CkptError::io(format!("chmod {}", root.display()), err))?;
    Ok(rep)
}

/// Copies the artifact data of `m` (in `sdir`) to `ddir` for [`crate::ops::copy`]: one data
/// file per artifact, `d<id>-<first + i>.dat`, every file checked on the way; `out`'s files and
/// artifact entries are updated to point at them.
pub(crate) fn copy_artifacts(
    sdir: &Path,
    m: &Manifest,
    ddir: &Path,
    id: u64,
    first: usize,
    out: &mut Manifest,
) -> Result<()> {
    let mut buf = vec![0u8; PIECE];
    out.artifacts.clear();
    for (i, a) in m.artifacts.iter().enumerate() {
        let open = open_files(sdir, m, a)?;
        let (dname, dpath, df) = create_data_file(ddir, id, first + i)?;
        let mut w = io::BufWriter::with_capacity(PIECE, &df);
        let fi = out.files.len() as u32;
        let mut off = 0;
        let mut entries = Vec::with_capacity(a.entries.len());
        for e in &a.entries {
            let mut ne = e.clone();
            if e.kind == EntryKind::File {
                let src = open[e.file as usize].as_ref().expect("opened above");
                copy_entry(
                    &a.name,
                    e,
                    src,
                    &m.files[e.file as usize].name,
                    &mut w,
                    &mut buf,
                )?;
                ne.file = fi;
                ne.offset = off;
                off += e.size;
            }
            entries.push(ne);
        }
        w.flush()
            .map_err(|e| CkptError::io(format!("write {}", dpath.display()), e))?;
        drop(w);
        df.sync_all()
            .map_err(|e| CkptError::io(format!("fsync {}", dpath.display()), e))?;
        out.files.push(DataFile {
            name: dname,
            size: off,
        });
        out.artifacts.push(Artifact {
            name: a.name.clone(),
            entries,
        });
    }
    Ok(())
}
