//! Operations on stored checkpoints that need no agent: locate, read the manifest, verify every
//! chunk, copy (verified, into a self-contained checkpoint), remove.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use crate::dir::{sync_dir, write_manifest, Progress};
use crate::error::{CkptError, Result};
use crate::manifest::{Chunk, DataFile, Manifest, MAX_MANIFEST_BYTES};

/// File name of the manifest in a checkpoint directory.
pub const MANIFEST: &str = "manifest.nckpt";

/// Whether `name` is a file that saves write into a checkpoint directory: a data file
/// `d<16 hex>-<region>.dat` or a temporary manifest `manifest.nckpt.tmp-<16 hex>` (what
/// cleanup and [`remove`] may delete; nothing else in the directory is touched).
pub(crate) fn is_ours(name: &str) -> bool {
    let hex16 = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(id) = name.strip_prefix(&format!("{MANIFEST}.tmp-")) {
        return hex16(id);
    }
    name.strip_prefix('d')
        .and_then(|r| r.strip_suffix(".dat"))
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(id, n)| hex16(id) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Where a checkpoint is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A directory (`/path`, `./path` or `file:///path`).
    Dir(PathBuf),
    /// `s3://bucket/prefix`.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix.
        prefix: String,
    },
    /// `nixl://HOST:PORT[/NAME]`: a peer agent serving the checkpoint from its memory
    /// (`nixl-ckpt serve`, or a node daemon's pool), read over `tcp`.
    Peer {
        /// The peer's tcp listener, `HOST:PORT`.
        addr: String,
        /// Which of the checkpoints the peer serves (needed when it serves several).
        name: Option<String>,
    },
}

impl Location {
    /// Parses a URI: `s3://bucket/prefix`, `nixl://HOST:PORT[/NAME]`, `file://path`, or a plain
    /// path.
    pub fn parse(uri: &str) -> Result<Location> {
        if uri.is_empty() {
            return Err(CkptError::InvalidArgument(
                "empty checkpoint location".into(),
            ));
        }
        if let Some(rest) = uri.strip_prefix("s3://") {
            return match rest.split_once('/') {
                Some((b, p)) if !b.is_empty() => Ok(Location::S3 {
                    bucket: b.into(),
                    prefix: p.trim_end_matches('/').into(),
                }),
                _ => Err(CkptError::InvalidArgument(format!(
                    "{uri}: expected s3://bucket/prefix"
                ))),
            };
        }
        if let Some(rest) = uri.strip_prefix("nixl://") {
            let rest = rest.trim_end_matches('/');
            let (addr, name) = match rest.split_once('/') {
                Some((a, n)) => (a, Some(n)),
                None => (rest, None),
            };
            if let Some(n) = name {
                crate::serve::check_name(n).map_err(|e| {
                    CkptError::InvalidArgument(format!("{uri}: the checkpoint's name: {e}"))
                })?;
            }
            return match addr.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(Location::Peer {
                    addr: addr.into(),
                    name: name.map(str::to_owned),
                }),
                _ => Err(CkptError::InvalidArgument(format!(
                    "{uri}: expected nixl://HOST:PORT[/NAME] (a peer serving a checkpoint)"
                ))),
            };
        }
        if uri.contains("://") && !uri.starts_with("file://") {
            return Err(CkptError::InvalidArgument(format!(
                "{uri}: a checkpoint is a directory path, s3://bucket/prefix or nixl://HOST:PORT"
            )));
        }
        Ok(Location::Dir(PathBuf::from(
            uri.strip_prefix("file://").unwrap_or(uri),
        )))
    }

    /// The directory, or why this location is not served.
    pub fn dir(self) -> Result<PathBuf> {
        match self {
            Location::Dir(d) => Ok(d),
            Location::S3 { bucket, prefix } => Err(CkptError::Unsupported(format!(
                "s3://{bucket}/{prefix}: this operation reads directories only; for object \
                 stores use read_manifest_with, restore_mapped, copy_with and remove_with with \
                 an agent running the object backend (nixl-ckpt does)"
            ))),
            Location::Peer { addr, .. } => Err(CkptError::Unsupported(format!(
                "nixl://{addr}: this operation reads directories only; a served checkpoint is \
                 read with an agent running the tcp backend (restore, restore_mapped, \
                 read_manifest_with)"
            ))),
        }
    }
}

/// Reads and validates the manifest of the checkpoint at `uri`.
pub fn read_manifest(uri: &str) -> Result<Manifest> {
    let dir = Location::parse(uri)?.dir()?;
    let path = dir.join(MANIFEST);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CkptError::NoCheckpoint {
                location: dir.display().to_string(),
                reason: format!(
                    "no {MANIFEST} (nothing was saved there, or the save did not finish: the \
                     manifest is written last)"
                ),
            })
        }
        Err(e) => return Err(CkptError::io(format!("open {}", path.display()), e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CkptError::io(format!("read {}", path.display()), e))?;
    Manifest::decode(&bytes)
}

/// What [`verify`] checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Regions.
    pub regions: usize,
    /// Chunks.
    pub chunks: usize,
    /// Bytes read and checked.
    pub bytes: u64,
}

/// Reads every chunk of the checkpoint at `uri` and checks its checksum; the first bad one is
/// reported with its region and chunk.
pub fn verify(uri: &str, progress: Option<&Progress>) -> Result<VerifyReport> {
    let dir = Location::parse(uri)?.dir()?;
    let m = read_manifest(uri)?;
    let bytes = each_chunk(&dir, &m, progress, "verify", |_, _, _| Ok(()))?;
    Ok(VerifyReport {
        regions: m.regions.len(),
        chunks: m.regions.iter().map(|r| r.chunks.len()).sum(),
        bytes,
    })
}

/// Reads every chunk of `m` (on several threads), checks it, and hands it to `sink` with its
/// region and chunk index. Returns the bytes read.
fn each_chunk(
    dir: &Path,
    m: &Manifest,
    progress: Option<&Progress>,
    phase: &str,
    sink: impl Fn(usize, usize, &[u8]) -> Result<()> + Sync,
) -> Result<u64> {
    let list: Vec<(usize, usize, Chunk)> = m
        .regions
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| r.chunks.iter().enumerate().map(move |(ci, c)| (ri, ci, *c)))
        .collect();
    let total: u64 = list.iter().map(|c| c.2.len).sum();
    let files: Vec<std::result::Result<File, io::Error>> = m
        .files
        .iter()
        .map(|f| File::open(dir.join(&f.name)))
        .collect();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(list.len().max(1));
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; m.chunk_size as usize];
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(ri, ci, c)) = list.get(k) else {
                            return Ok(());
                        };
                        let corrupt = |reason: String| CkptError::Corrupt {
                            region: m.regions[ri].name.clone(),
                            chunk: Some(ci),
                            reason,
                            memory_written: false,
                        };
                        let name = &m.files[c.file as usize].name;
                        let f = files[c.file as usize].as_ref().map_err(|e| {
                            corrupt(format!("data file {name:?} cannot be opened: {e}"))
                        })?;
                        let b = &mut buf[..c.len as usize];
                        f.read_exact_at(b, c.offset).map_err(|e| {
                            if e.kind() == io::ErrorKind::UnexpectedEof {
                                corrupt(format!("data file {name:?} is truncated"))
                            } else {
                                corrupt(format!("reading {name:?}: {e}"))
                            }
                        })?;
                        let got = xxh3_64(b);
                        if got != c.xxh3 {
                            return Err(corrupt(format!(
                                "checksum mismatch (manifest xxh3 {:016x}, data {got:016x})",
                                c.xxh3
                            )));
                        }
                        sink(ri, ci, b)?;
                        let d = done.fetch_add(c.len, Ordering::Relaxed) + c.len;
                        if let Some(p) = progress {
                            p(phase, d, total);
                        }
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CkptError::InvalidArgument(
                        "a worker thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    // The first error in region and chunk order would need every thread's; any is fine here.
    for r in results {
        r?;
    }
    Ok(total)
}

/// Copies the checkpoint `src` to the directory `dst`, every chunk verified on the way, into a
/// self-contained checkpoint (an incremental one loses its dependence on its base). The
/// manifest is written last, as by a save.
pub fn copy(src: &str, dst: &str, progress: Option<&Progress>) -> Result<Manifest> {
    let sdir = Location::parse(src)?.dir()?;
    let ddir = Location::parse(dst)?.dir()?;
    let m = read_manifest(src)?;
    std::fs::create_dir_all(&ddir)
        .map_err(|e| CkptError::io(format!("create {}", ddir.display()), e))?;
    if ddir.join(MANIFEST).exists() {
        return Err(CkptError::InvalidArgument(format!(
            "{} already holds a checkpoint (remove it first)",
            ddir.display()
        )));
    }
    let id = nixl_core::random_u64().map_err(|e| CkptError::agent("random save id", e))?;
    let mut out = m.clone();
    out.save_id = id;
    out.base = None;
    out.files = Vec::new();
    let outs = new_data_files(&ddir, id, &mut out)?;
    let cs = m.chunk_size;
    each_chunk(&sdir, &m, progress, "copy", |ri, ci, b| {
        outs[ri]
            .write_all_at(b, ci as u64 * cs)
            .map_err(|e| CkptError::io(format!("write {}", ddir.display()), e))
    })?;
    for f in &outs {
        f.sync_all()
            .map_err(|e| CkptError::io(format!("fsync in {}", ddir.display()), e))?;
    }
    let first = out.files.len();
    crate::artifact::copy_artifacts(&sdir, &m, &ddir, id, first, &mut out)?;
    out.validate()?;
    write_manifest(&ddir, &out)?;
    Ok(out)
}

/// Options of [`remove_opts`] (and [`crate::remove_with_opts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoveOptions {
    /// Remove the checkpoint even when other checkpoints are found to be incremental saves
    /// over it (they will no longer restore).
    pub force: bool,
}

/// Removes the checkpoint at `uri`: the manifest first (from then on nothing restores from
/// it), then its data files, temporary manifests of unfinished saves, and the directory if it
/// is left empty. Files of other checkpoints it referenced (an incremental save's base) stay.
/// Returns the files removed.
///
/// Refused with [`CkptError::HasDependents`] when a checkpoint in a directory beside it (same
/// parent directory) reads data files from it, i.e. is an incremental save over it (see
/// [`dependents`] for what is found); [`remove_opts`] with `force` removes it anyway.
pub fn remove(uri: &str) -> Result<usize> {
    remove_opts(uri, &RemoveOptions::default())
}

/// [`remove`] with options.
pub fn remove_opts(uri: &str, opts: &RemoveOptions) -> Result<usize> {
    let dir = Location::parse(uri)?.dir()?;
    if !opts.force {
        let deps = dependents(uri)?;
        if !deps.is_empty() {
            return Err(CkptError::HasDependents {
                location: dir.display().to_string(),
                dependents: deps,
            });
        }
    }
    let m = match read_manifest(uri) {
        Ok(m) => Some(m),
        Err(CkptError::NoCheckpoint { .. }) => None,
        // A damaged manifest still goes: the checkpoint is being removed.
        Err(
            CkptError::Manifest(_) | CkptError::NewerVersion { .. } | CkptError::Corrupt { .. },
        ) => None,
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    match std::fs::remove_file(dir.join(MANIFEST)) {
        Ok(()) => {
            removed += 1;
            sync_dir(&dir)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if m.is_none() && !dir.exists() {
                return Err(CkptError::NoCheckpoint {
                    location: dir.display().to_string(),
                    reason: "no such directory".into(),
                });
            }
        }
        Err(e) => {
            return Err(CkptError::io(
                format!("remove {}", dir.join(MANIFEST).display()),
                e,
            ))
        }
    }
    let rd =
        std::fs::read_dir(&dir).map_err(|e| CkptError::io(format!("list {}", dir.display()), e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_ours(&name) {
            std::fs::remove_file(e.path())
                .map_err(|err| CkptError::io(format!("remove {}", e.path().display()), err))?;
            removed += 1;
        }
    }
    // An empty directory (a save killed before it wrote anything) goes too; a directory of
    // other files is left alone, and said so.
    if removed == 0 && std::fs::remove_dir(&dir).is_err() {
        return Err(CkptError::NoCheckpoint {
            location: dir.display().to_string(),
            reason: "no manifest and no data files of a checkpoint there (nothing removed)".into(),
        });
    }
    let _ = std::fs::remove_dir(&dir);
    Ok(removed)
}

/// The checkpoints that read data files inside the checkpoint directory `uri` (incremental
/// saves over it, directly or over one of its own incremental saves), as directory paths,
/// sorted.
///
/// Found where they can be known without a registry: the directories beside `uri` (in the
/// same parent directory), each manifest read and its data file names resolved. An
/// incremental checkpoint saved elsewhere (another parent directory) is not found; a
/// directory beside it whose manifest cannot be read is passed over.
pub fn dependents(uri: &str) -> Result<Vec<String>> {
    let dir = Location::parse(uri)?.dir()?;
    let Ok(dir) = dir.canonicalize() else {
        return Ok(Vec::new());
    };
    let Some(parent) = dir.parent() else {
        return Ok(Vec::new());
    };
    let rd = std::fs::read_dir(parent)
        .map_err(|e| CkptError::io(format!("list {} (for dependents)", parent.display()), e))?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let sib = parent.join(e.file_name());
        if sib == dir || !sib.join(MANIFEST).is_file() {
            continue;
        }
        let Some(sib_uri) = sib.to_str() else {
            continue;
        };
        let Ok(m) = read_manifest(sib_uri) else {
            continue;
        };
        if m.files
            .iter()
            .any(|f| f.name.contains('/') && lexical(&sib.join(&f.name)).starts_with(&dir))
        {
            out.push(sib.display().to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// `p` with its `.` and `..` components resolved by name (no file system access).
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c.as_os_str()),
        }
    }
    out
}

/// Why a data file of `m` named `name` may be missing: an incremental checkpoint's file that
/// lies outside it belongs to its base (empty otherwise).
pub(crate) fn base_note(m: &Manifest, name: &str) -> String {
    match &m.base {
        Some(b) if name.contains('/') => format!(
            " (it belongs to {b}, the base this incremental checkpoint was saved over: \
             the base is gone or was replaced)"
        ),
        _ => String::new(),
    }
}

/// Creates data file `n` of save `id` in `dir` (it must not exist yet): its name in the
/// manifest, its path and the file, open for writing.
pub(crate) fn create_data_file(dir: &Path, id: u64, n: usize) -> Result<(String, PathBuf, File)> {
    let name = format!("d{id:016x}-{n}.dat");
    let path = dir.join(&name);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| CkptError::io(format!("create {}", path.display()), e))?;
    Ok((name, path, f))
}

/// Creates one data file per region of `out` (a copy being written into the directory `ddir`
/// under save id `id`; none may exist yet), names them in `out.files`, and points every chunk of
/// region `ri` at its place in file `ri`. Returns the files, in region order.
pub(crate) fn new_data_files(ddir: &Path, id: u64, out: &mut Manifest) -> Result<Vec<File>> {
    let mut files = Vec::with_capacity(out.regions.len());
    out.files = Vec::with_capacity(out.regions.len());
    let cs = out.chunk_size;
    for (ri, r) in out.regions.iter_mut().enumerate() {
        let (name, _, f) = create_data_file(ddir, id, ri)?;
        out.files.push(DataFile { name, size: r.len });
        for (ci, c) in r.chunks.iter_mut().enumerate() {
            *c = Chunk {
                file: ri as u32,
                offset: ci as u64 * cs,
                ..*c
            };
        }
        files.push(f);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::is_ours;

    #[test]
    fn cleanup_touches_only_checkpoint_files() {
        assert!(is_ours("d0123456789abcdef-0.dat"));
        assert!(is_ours("d0123456789abcdef-12.dat"));
        assert!(is_ours("manifest.nckpt.tmp-0123456789abcdef"));
        for other in [
            "data.dat",
            "d.dat",
            "d0123-1.dat",
            "d0123456789abcdef-.dat",
            "manifest.nckpt",
            "manifest.nckpt.tmp-x",
            "notes.txt",
        ] {
            assert!(!is_ours(other), "{other}");
        }
    }
}
