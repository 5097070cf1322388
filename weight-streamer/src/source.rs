//! The origin side: a model directory read once into registered memory and published.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nixl_core::Agent;

use crate::error::{Error, Result};
use crate::manifest::{check_name, Manifest, MAX_FILES, MAX_FILE_NAME};
use crate::mem::HostMem;
use crate::publish::Published;

/// What identifies a file's contents cheaply: checked before and after reading, and while
/// serving.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
}

fn stamp(path: &Path) -> Result<Stamp> {
    let m =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok(Stamp {
        size: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
        dev: m.dev(),
    })
}

/// The files of a model directory: regular files (symlinks followed, as in a Hugging Face
/// cache) whose names do not start with '.', sorted by name. At least one must be
/// `*.safetensors`.
pub fn model_files(dir: &Path) -> Result<Vec<String>> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let Some(name) = ent.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') || name.ends_with(".nixl-partial") {
            continue;
        }
        let path = ent.path();
        let md = std::fs::metadata(&path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if md.is_file() {
            check_name("file name", &name, MAX_FILE_NAME)?;
            names.push(name);
        }
    }
    names.sort();
    if names.len() > MAX_FILES {
        return Err(Error::Invalid(format!(
            "{}: {} files (at most {MAX_FILES})",
            dir.display(),
            names.len()
        )));
    }
    if !names.iter().any(|n| n.ends_with(".safetensors")) {
        return Err(Error::Invalid(format!(
            "{}: no *.safetensors file",
            dir.display()
        )));
    }
    Ok(names)
}

/// What loading a model directory takes: its files with their stamps, where each goes in the
/// data buffer, and the buffer's length.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) name: String,
    names: Vec<String>,
    files: Vec<(PathBuf, Stamp)>,
    offs: Vec<u64>,
    /// Bytes of the data buffer.
    pub(crate) len: u64,
}

impl Plan {
    pub(crate) fn new(dir: &Path, opts: &SourceOptions) -> Result<Plan> {
        let name = match &opts.name {
            Some(n) => n.clone(),
            None => dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().and_then(|s| s.to_str()).map(str::to_owned))
                .ok_or_else(|| {
                    Error::Invalid(format!("{}: give the model a --name", dir.display()))
                })?,
        };
        let names = model_files(dir)?;
        let mut files = Vec::with_capacity(names.len());
        for n in &names {
            let p = dir.join(n);
            let s = stamp(&p)?;
            files.push((p, s));
        }
        let mut at = 0u64;
        let mut offs = Vec::with_capacity(files.len());
        for (_, s) in &files {
            offs.push(at);
            at += s.size.div_ceil(crate::manifest::FILE_ALIGN) * crate::manifest::FILE_ALIGN;
        }
        Ok(Plan {
            name,
            names,
            files,
            offs,
            len: at,
        })
    }

    /// Reads every file once into `buf` (at least [`Plan::len`] bytes), refuses a file that
    /// changed meanwhile, builds the manifest, and applies the corruption fault hook. Returns
    /// the manifest and how each file was read.
    pub(crate) fn fill(
        &self,
        buf: &mut [u8],
        opts: &SourceOptions,
    ) -> Result<(Manifest, ReadModes)> {
        if (buf.len() as u64) < self.len {
            return Err(Error::Invalid(format!(
                "a buffer of {} bytes for a model of {}",
                buf.len(),
                self.len
            )));
        }
        let mut modes = ReadModes::default();
        for ((p, s), &o) in self.files.iter().zip(&self.offs) {
            // The file's slot runs to the next FILE_ALIGN (a block multiple): O_DIRECT reads
            // whole blocks and stops at the end of the file.
            let slot_end = (o + s.size.next_multiple_of(crate::manifest::FILE_ALIGN)) as usize;
            let mode = crate::load::read_file(p, &mut buf[o as usize..slot_end], s.size)?;
            tracing::debug!(path = %p.display(), bytes = s.size, mode = mode.as_str(), "read");
            modes.add(mode);
        }
        for (p, s) in &self.files {
            check_stamp(p, s)?;
        }
        let manifest = {
            let slices: Vec<(String, &[u8])> = self
                .names
                .iter()
                .zip(self.files.iter().zip(&self.offs))
                .map(|(n, ((_, s), &o))| (n.clone(), &buf[o as usize..(o + s.size) as usize]))
                .collect();
            Manifest::build(&self.name, opts.chunk_size, &slices)?
        };
        if !opts.corrupt_chunks.is_empty() {
            let chunks = manifest.chunks();
            for &c in &opts.corrupt_chunks {
                let ch = chunks
                    .get(c)
                    .ok_or_else(|| Error::Invalid(format!("fault hook: no chunk {c}")))?;
                buf[ch.data_offset as usize] ^= 0x5a;
            }
            tracing::warn!(
                chunks = opts.corrupt_chunks.len(),
                "fault hook: chunks corrupted in served memory"
            );
        }
        Ok((manifest, modes))
    }
}

/// How many files of a model were read each way ([`crate::load::ReadMode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadModes {
    /// io_uring with `O_DIRECT`.
    pub uring_direct: usize,
    /// io_uring through the page cache.
    pub uring_buffered: usize,
    /// `pread` (io_uring unavailable).
    pub pread: usize,
}

impl ReadModes {
    fn add(&mut self, m: crate::load::ReadMode) {
        use crate::load::ReadMode as M;
        *match m {
            M::UringDirect => &mut self.uring_direct,
            M::UringBuffered => &mut self.uring_buffered,
            M::Pread => &mut self.pread,
        } += 1;
    }

    /// As JSON: `{"uring_direct": n, "uring_buffered": n, "pread": n}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "uring_direct": self.uring_direct,
            "uring_buffered": self.uring_buffered,
            "pread": self.pread,
        })
    }
}

/// A model directory loaded into registered memory and published by an agent.
#[derive(Debug)]
pub struct Source {
    published: Published,
    files: Vec<(PathBuf, Stamp)>,
    read: ReadModes,
}

/// How a source loads its model.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Model name (default: the directory's name).
    pub name: Option<String>,
    /// Chunk size.
    pub chunk_size: u64,
    /// Test-only fault hook: after the manifest is computed, these chunks are corrupted in the
    /// served memory (one byte flipped), so pullers see bad chunks from this source.
    pub corrupt_chunks: Vec<usize>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            name: None,
            chunk_size: crate::manifest::DEFAULT_CHUNK,
            corrupt_chunks: Vec::new(),
        }
    }
}

impl Source {
    /// Reads every file of `dir` once into one buffer, builds the manifest, and publishes the
    /// model through `agent`. A file that changes while it is read is refused.
    pub fn load(agent: &Agent, dir: &Path, opts: &SourceOptions) -> Result<Source> {
        let plan = Plan::new(dir, opts)?;
        let mut data = HostMem::new(plan.len as usize)?;
        let (manifest, read) = plan.fill(data.as_mut_slice(), opts)?;
        let published = Published::new(agent, Arc::new(manifest), Arc::new(data), true)?;
        Ok(Source {
            published,
            files: plan.files,
            read,
        })
    }

    /// How its files were read.
    pub fn read_modes(&self) -> ReadModes {
        self.read
    }

    /// The model as published.
    pub fn published(&self) -> &Published {
        &self.published
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        self.published.manifest()
    }

    /// Checks that no file changed on disk since it was read (size, mtime, inode).
    pub fn check_unchanged(&self) -> Result<()> {
        for (p, s) in &self.files {
            check_stamp(p, s)?;
        }
        Ok(())
    }

    /// Stops serving: the regions are deregistered.
    pub fn withdraw(self) -> Result<()> {
        self.published.withdraw()
    }
}

fn check_stamp(p: &Path, s: &Stamp) -> Result<()> {
    let now = stamp(p).map_err(|e| Error::Changed {
        path: p.display().to_string(),
        detail: e.to_string(),
    })?;
    if &now != s {
        let detail = if now.size != s.size {
            format!("size {} -> {}", s.size, now.size)
        } else if now.ino != s.ino || now.dev != s.dev {
            "replaced by another file".to_owned()
        } else {
            "modification time changed".to_owned()
        };
        return Err(Error::Changed {
            path: p.display().to_string(),
            detail,
        });
    }
    Ok(())
}

/// Recomputes the manifest of a directory (as `nixl-weights verify` does).
pub fn manifest_of_dir(dir: &Path, name: &str, chunk_size: u64) -> Result<Manifest> {
    let names = model_files(dir)?;
    let mut bufs = Vec::with_capacity(names.len());
    for n in &names {
        let p = dir.join(n);
        let b = std::fs::read(&p).map_err(|e| Error::io(format!("read {}", p.display()), e))?;
        bufs.push(b);
    }
    let slices: Vec<(String, &[u8])> = names
        .iter()
        .cloned()
        .zip(bufs.iter().map(Vec::as_slice))
        .collect();
    Manifest::build(name, chunk_size, &slices)
}
