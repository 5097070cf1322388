//! The manifest: what a checkpoint holds and where, versioned, little-endian, checksummed, and
//! decoded as untrusted input (every count and length bounded before anything is allocated by
//! it, every chunk checked against the file it points into).
//!
//! Layout (version 1):
//!
//! ```text
//! magic "NIXLCKPT" | version u16 | flags u16 (0)
//! save_id u64 | created_unix_ms u64 | chunk_size u64
//! base: u16-length UTF-8 (empty: a full checkpoint) | metadata: u32-length UTF-8 JSON
//! files: u32 count, each { name: u16-length UTF-8, size u64 }
//! regions: u32 count, each { name: u16-length UTF-8, kind u8, dev_id u64, addr u64, len u64,
//!                            chunks: u32 count, each { file u32, offset u64, len u64, xxh3 u64 } }
//! artifacts (version 2 only): u32 count, each { name: u16-length UTF-8,
//!     entries: u32 count, each { kind u8 (0 directory, 1 file), path: u16-length UTF-8,
//!                                mode u32, file u32, offset u64, size u64, xxh3 u64 } }
//! xxh3-64 of every byte above, u64
//! ```
//!
//! A manifest without artifact directories is written as version 1 (readable by builds that
//! predate them); one with artifacts as version 2. An artifact's paths are relative (plain
//! components, no `.`, `..`, empty or NUL), each parent listed before what it holds.
//!
//! Chunk `i` of a region covers bytes `[i * chunk_size, min(len, (i + 1) * chunk_size))` of it;
//! a chunk names a data file (by index in `files`) and an offset inside it, so an incremental
//! checkpoint can point unchanged chunks at its base's files.

use nixl_core::codec::Reader;
use nixl_core::{DecodeError, MemKind};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{CkptError, Result};

/// The first bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"NIXLCKPT";
/// The manifest version this build writes (and the newest it reads).
pub const VERSION: u16 = 2;
/// Largest manifest read.
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;
/// Largest caller metadata (JSON) in a manifest.
pub const MAX_METADATA_BYTES: usize = 1 << 20;
/// Most regions in a checkpoint.
pub const MAX_REGIONS: usize = 1 << 16;
/// Most data files a checkpoint references.
pub const MAX_FILES: usize = 1 << 20;
/// Longest region or file name.
pub const MAX_NAME_BYTES: usize = 1024;
/// Largest GPU ordinal of a VRAM region.
pub const MAX_GPU_ORDINAL: u64 = 1 << 16;
/// Smallest and largest chunk size.
pub const CHUNK_BOUNDS: (u64, u64) = (4096, 1 << 30);
/// Most artifact directories in one checkpoint.
pub const MAX_ARTIFACTS: usize = 4096;
/// Most entries (files and directories) in all artifact directories of a checkpoint.
pub const MAX_ARTIFACT_ENTRIES: usize = 1 << 20;
/// Longest path inside an artifact directory, and longest component of one.
pub const MAX_PATH_BYTES: (usize, usize) = (4096, 255);
/// Size of the header (magic, version, flags) read to learn the version before anything else.
pub const HEADER_BYTES: usize = 12;

const MIN_FILE_LEN: usize = 2 + 8;
const MIN_REGION_LEN: usize = 2 + 1 + 8 * 3 + 4;
const CHUNK_LEN: usize = 4 + 8 + 8 + 8;
const MIN_ARTIFACT_LEN: usize = 2 + 4;
const MIN_ENTRY_LEN: usize = 1 + 2 + 4 + 4 + 8 * 3;

/// What an artifact entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
}

/// One directory or file of an artifact directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactEntry {
    /// Path relative to the artifact directory's root (`a/b/c`).
    pub path: String,
    /// Directory or file.
    pub kind: EntryKind,
    /// Permission bits (`0o777` at most).
    pub mode: u32,
    /// Data file (index in `files`) holding a file's bytes (0 for a directory).
    pub file: u32,
    /// Where its bytes start in that data file.
    pub offset: u64,
    /// Its length (0 for a directory).
    pub size: u64,
    /// xxh3-64 of its bytes (0 for a directory).
    pub xxh3: u64,
}

/// A named file tree (kernel or compile caches) saved with the regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// The caller's name for it (unique in the checkpoint).
    pub name: String,
    /// Its directories and files, each parent before what it holds.
    pub entries: Vec<ArtifactEntry>,
}

/// One data file a checkpoint's chunks point into, by its path relative to the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFile {
    /// Path relative to the checkpoint's directory (or S3 prefix); `..` reaches a sibling
    /// checkpoint (an incremental save's base).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// One chunk of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index in [`Manifest::files`].
    pub file: u32,
    /// Byte offset in that file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// xxh3-64 of the chunk's bytes.
    pub xxh3: u64,
}

/// One named region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// The caller's name for it (unique in the checkpoint).
    pub name: String,
    /// Memory kind it was saved from.
    pub kind: MemKind,
    /// GPU ordinal for VRAM, 0 for DRAM.
    pub dev_id: u64,
    /// The virtual address it had when saved.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its chunks, in order.
    pub chunks: Vec<Chunk>,
}

/// A decoded, validated manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Random id of the save that wrote it (data files carry it in their names).
    pub save_id: u64,
    /// When the save finished (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// Chunk size of every region.
    pub chunk_size: u64,
    /// The base checkpoint of an incremental save, as given then (informational: the chunks
    /// name the files they need).
    pub base: Option<String>,
    /// The caller's JSON metadata (`"{}"` when none).
    pub metadata: String,
    /// Data files.
    pub files: Vec<DataFile>,
    /// Regions.
    pub regions: Vec<RegionEntry>,
    /// Artifact directories.
    pub artifacts: Vec<Artifact>,
}

/// `names` as an error lists them: "a, b, c".
pub(crate) fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

impl Manifest {
    /// The artifact directory named `name`, or the error naming it and what the checkpoint
    /// holds.
    pub fn artifact(&self, name: &str) -> Result<&Artifact> {
        self.artifacts
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| CkptError::NotFound {
                region: format!("artifact {name}"),
                holds: names(self.artifacts.iter().map(|a| a.name.as_str())),
            })
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&RegionEntry> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The region named `name`, or the error naming it and what the checkpoint holds.
    pub fn find(&self, name: &str) -> Result<&RegionEntry> {
        self.region(name).ok_or_else(|| CkptError::NotFound {
            region: name.to_owned(),
            holds: names(self.regions.iter().map(|e| e.name.as_str())),
        })
    }

    /// Total bytes of every region.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Encodes (the manifest is assumed valid: it is built by the library).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256 + self.regions.len() * 64);
        b.extend_from_slice(&MAGIC);
        let version: u16 = if self.artifacts.is_empty() { 1 } else { 2 };
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        for v in [self.save_id, self.created_unix_ms, self.chunk_size] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        put_str(&mut b, self.base.as_deref().unwrap_or(""));
        b.extend_from_slice(&(self.metadata.len() as u32).to_le_bytes());
        b.extend_from_slice(self.metadata.as_bytes());
        b.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for f in &self.files {
            put_str(&mut b, &f.name);
            b.extend_from_slice(&f.size.to_le_bytes());
        }
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            put_str(&mut b, &r.name);
            b.push(r.kind.code());
            for v in [r.dev_id, r.addr, r.len] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&(r.chunks.len() as u32).to_le_bytes());
            for c in &r.chunks {
                b.extend_from_slice(&c.file.to_le_bytes());
                for v in [c.offset, c.len, c.xxh3] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        if !self.artifacts.is_empty() {
            b.extend_from_slice(&(self.artifacts.len() as u32).to_le_bytes());
            for a in &self.artifacts {
                put_str(&mut b, &a.name);
                b.extend_from_slice(&(a.entries.len() as u32).to_le_bytes());
                for e in &a.entries {
                    b.push(match e.kind {
                        EntryKind::Dir => 0,
                        EntryKind::File => 1,
                    });
                    put_str(&mut b, &e.path);
                    b.extend_from_slice(&e.mode.to_le_bytes());
                    b.extend_from_slice(&e.file.to_le_bytes());
                    for v in [e.offset, e.size, e.xxh3] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and validates untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let bad = |e: DecodeError| CkptError::Manifest(e.to_string());
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(CkptError::Manifest(format!(
                "{} bytes, over the limit of {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let mut r = Reader::new(bytes);
        if r.array::<8>("magic").map_err(bad)? != MAGIC {
            return Err(CkptError::Manifest(
                "not a nixl checkpoint manifest (bad magic)".into(),
            ));
        }
        let version = r.u16("version").map_err(bad)?;
        if version > VERSION {
            return Err(CkptError::NewerVersion {
                found: version,
                supported: VERSION,
            });
        }
        if version == 0 {
            return Err(CkptError::Manifest("version 0 does not exist".into()));
        }
        if bytes.len() < HEADER_BYTES + 8 {
            return Err(CkptError::Manifest(format!(
                "truncated: {} bytes",
                bytes.len()
            )));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        if xxh3_64(body) != sum {
            return Err(CkptError::Manifest(
                "checksum mismatch (the manifest is damaged or truncated)".into(),
            ));
        }
        let mut r = Reader::new(&body[10..]);
        let m = decode_body(&mut r, version).map_err(bad)?;
        if !r.is_empty() {
            return Err(bad(DecodeError::Trailing(r.buf.len())));
        }
        m.validate()?;
        Ok(m)
    }

    /// Checks what decoding cannot: names, chunk layout, chunks inside their files.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(CkptError::Manifest(s));
        let (lo, hi) = CHUNK_BOUNDS;
        if self.chunk_size < lo || self.chunk_size > hi || self.chunk_size % lo != 0 {
            return bad(format!(
                "chunk size {} is not a multiple of {lo} in {lo}..={hi}",
                self.chunk_size
            ));
        }
        for (i, f) in self.files.iter().enumerate() {
            check_file_name(&f.name).map_err(CkptError::Manifest)?;
            if self.files[..i].iter().any(|g| g.name == f.name) {
                return bad(format!("data file {:?} listed twice", f.name));
            }
        }
        for (i, reg) in self.regions.iter().enumerate() {
            check_region_name(&reg.name).map_err(CkptError::Manifest)?;
            if self.regions[..i].iter().any(|g| g.name == reg.name) {
                return bad(format!("region {:?} listed twice", reg.name));
            }
            if reg.len == 0 {
                return bad(format!("region {:?} is empty", reg.name));
            }
            match reg.kind {
                MemKind::Dram if reg.dev_id != 0 => {
                    return bad(format!(
                        "DRAM region {:?} names device {}",
                        reg.name, reg.dev_id
                    ))
                }
                MemKind::Dram => {}
                MemKind::Vram if reg.dev_id > MAX_GPU_ORDINAL => {
                    return bad(format!(
                        "VRAM region {:?} is on GPU {}, over the limit of {MAX_GPU_ORDINAL}",
                        reg.name, reg.dev_id
                    ))
                }
                MemKind::Vram => {}
                k => {
                    return bad(format!(
                        "region {:?} is {k} memory (only DRAM and VRAM are saved)",
                        reg.name
                    ))
                }
            }
            let want = reg.len.div_ceil(self.chunk_size);
            if reg.chunks.len() as u64 != want {
                return Err(CkptError::Corrupt {
                    region: reg.name.clone(),
                    chunk: None,
                    reason: format!(
                        "{} chunks for {} bytes in chunks of {} (expected {want})",
                        reg.chunks.len(),
                        reg.len,
                        self.chunk_size
                    ),
                    memory_written: false,
                });
            }
            for (ci, c) in reg.chunks.iter().enumerate() {
                let start = ci as u64 * self.chunk_size;
                let expect = (reg.len - start).min(self.chunk_size);
                let corrupt = |reason: String| CkptError::Corrupt {
                    region: reg.name.clone(),
                    chunk: Some(ci),
                    reason,
                    memory_written: false,
                };
                if c.len != expect {
                    return Err(corrupt(format!("length {} (expected {expect})", c.len)));
                }
                let Some(file) = self.files.get(c.file as usize) else {
                    return Err(corrupt(format!(
                        "names data file #{}, of {}",
                        c.file,
                        self.files.len()
                    )));
                };
                if c.offset
                    .checked_add(c.len)
                    .is_none_or(|end| end > file.size)
                {
                    return Err(corrupt(format!(
                        "bytes {}+{} lie past the end of {:?} ({} bytes)",
                        c.offset, c.len, file.name, file.size
                    )));
                }
            }
        }
        self.validate_artifacts()
    }

    fn validate_artifacts(&self) -> Result<()> {
        let mut total = 0usize;
        for (i, a) in self.artifacts.iter().enumerate() {
            let bad = |reason: String| -> Result<()> {
                Err(CkptError::Manifest(format!(
                    "artifact {:?}: {reason}",
                    a.name
                )))
            };
            check_region_name(&a.name).map_err(CkptError::Manifest)?;
            if self.artifacts[..i].iter().any(|b| b.name == a.name) {
                return bad("listed twice".into());
            }
            total += a.entries.len();
            if total > MAX_ARTIFACT_ENTRIES {
                return bad(format!("over {MAX_ARTIFACT_ENTRIES} entries in all"));
            }
            let mut seen: std::collections::HashMap<&str, EntryKind> =
                std::collections::HashMap::with_capacity(a.entries.len());
            for e in &a.entries {
                check_artifact_path(&e.path)
                    .map_err(|r| CkptError::Manifest(format!("artifact {:?}: {r}", a.name)))?;
                if e.mode & !0o777 != 0 {
                    return bad(format!("{:?} has mode {:#o}", e.path, e.mode));
                }
                if let Some((parent, _)) = e.path.rsplit_once('/') {
                    if seen.get(parent) != Some(&EntryKind::Dir) {
                        return bad(format!(
                            "{:?} comes before its directory {parent:?} (or that is no \
                             directory)",
                            e.path
                        ));
                    }
                }
                if seen.insert(&e.path, e.kind).is_some() {
                    return bad(format!("{:?} listed twice", e.path));
                }
                match e.kind {
                    EntryKind::Dir if e.size != 0 || e.offset != 0 || e.xxh3 != 0 => {
                        return bad(format!("directory {:?} has contents", e.path));
                    }
                    EntryKind::Dir => {}
                    EntryKind::File => {
                        let Some(f) = self.files.get(e.file as usize) else {
                            return bad(format!(
                                "{:?} names data file #{}, of {}",
                                e.path,
                                e.file,
                                self.files.len()
                            ));
                        };
                        if e.offset.checked_add(e.size).is_none_or(|end| end > f.size) {
                            return bad(format!(
                                "{:?}: bytes {}+{} lie past the end of {:?} ({} bytes)",
                                e.path, e.offset, e.size, f.name, f.size
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn decode_body(r: &mut Reader<'_>, version: u16) -> std::result::Result<Manifest, DecodeError> {
    let flags = r.u16("flags")?;
    if flags != 0 {
        return Err(DecodeError::Invalid {
            field: "flags",
            reason: format!("unknown flags {flags:#x}"),
        });
    }
    let save_id = r.u64("save_id")?;
    let created_unix_ms = r.u64("created")?;
    let chunk_size = r.u64("chunk_size")?;
    let base = r.str("base", MAX_NAME_BYTES)?;
    let metadata = r.blob_max("metadata", MAX_METADATA_BYTES)?;
    let metadata = std::str::from_utf8(metadata)
        .map_err(|e| DecodeError::Invalid {
            field: "metadata",
            reason: e.to_string(),
        })?
        .to_owned();
    let n = r.peek_u32()? as usize;
    let n = r.count("files", n, 4, MAX_FILES, MIN_FILE_LEN)?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str("file name", MAX_NAME_BYTES)?;
        let size = r.u64("file size")?;
        files.push(DataFile { name, size });
    }
    let n = r.peek_u32()? as usize;
    let n = r.count("regions", n, 4, MAX_REGIONS, MIN_REGION_LEN)?;
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str("region name", MAX_NAME_BYTES)?;
        let code = r.u8("kind")?;
        let kind = MemKind::from_code(code).ok_or_else(|| DecodeError::Invalid {
            field: "kind",
            reason: format!("unknown memory kind {code}"),
        })?;
        let dev_id = r.u64("dev_id")?;
        let addr = r.u64("addr")?;
        let len = r.u64("len")?;
        let c = r.peek_u32()? as usize;
        let c = r.count("chunks", c, 4, usize::MAX, CHUNK_LEN)?;
        let mut chunks = Vec::with_capacity(c);
        for _ in 0..c {
            chunks.push(Chunk {
                file: r.u32("chunk file")?,
                offset: r.u64("chunk offset")?,
                len: r.u64("chunk len")?,
                xxh3: r.u64("chunk xxh3")?,
            });
        }
        regions.push(RegionEntry {
            name,
            kind,
            dev_id,
            addr,
            len,
            chunks,
        });
    }
    let mut artifacts = Vec::new();
    if version >= 2 {
        let n = r.peek_u32()? as usize;
        let n = r.count("artifacts", n, 4, MAX_ARTIFACTS, MIN_ARTIFACT_LEN)?;
        let mut total = 0usize;
        for _ in 0..n {
            let name = r.str("artifact name", MAX_NAME_BYTES)?;
            let c = r.peek_u32()? as usize;
            let c = r.count(
                "artifact entries",
                c,
                4,
                MAX_ARTIFACT_ENTRIES - total,
                MIN_ENTRY_LEN,
            )?;
            total += c;
            let mut entries = Vec::with_capacity(c);
            for _ in 0..c {
                let kind = match r.u8("entry kind")? {
                    0 => EntryKind::Dir,
                    1 => EntryKind::File,
                    k => {
                        return Err(DecodeError::Invalid {
                            field: "entry kind",
                            reason: format!("{k} (0 directory, 1 file)"),
                        })
                    }
                };
                entries.push(ArtifactEntry {
                    kind,
                    path: r.str("entry path", MAX_PATH_BYTES.0)?,
                    mode: r.u32("entry mode")?,
                    file: r.u32("entry file")?,
                    offset: r.u64("entry offset")?,
                    size: r.u64("entry size")?,
                    xxh3: r.u64("entry xxh3")?,
                });
            }
            artifacts.push(Artifact { name, entries });
        }
    }
    Ok(Manifest {
        save_id,
        created_unix_ms,
        chunk_size,
        base: (!base.is_empty()).then_some(base),
        metadata,
        files,
        regions,
        artifacts,
    })
}

/// A region name: 1..=1024 bytes of UTF-8 without NUL or control characters.
pub fn check_region_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(format!(
            "region name {name:?}: must be 1..={MAX_NAME_BYTES} bytes without control characters"
        ));
    }
    Ok(())
}

/// A path inside an artifact directory: `/`-separated plain components (not empty, `.` or
/// `..`, no NUL, at most 255 bytes each), at most 4096 bytes, never absolute.
pub fn check_artifact_path(path: &str) -> std::result::Result<(), String> {
    let (max, max_c) = MAX_PATH_BYTES;
    let ok = !path.is_empty()
        && path.len() <= max
        && path.split('/').all(|c| {
            !c.is_empty() && c != "." && c != ".." && c.len() <= max_c && !c.contains('\0')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "path {path:?} is not a relative path of plain names (no \"\", \".\", \"..\", \
             NUL; at most {max} bytes, {max_c} per name)"
        ))
    }
}

/// A data file name: a relative path of plain components (`[A-Za-z0-9._-]`, not `.`) or `..`,
/// so that a manifest can point only at files beside its checkpoint.
pub fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.split('/').all(|c| {
            c == ".."
                || (!c.is_empty()
                    && c != "."
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        })
        && name.split('/').next_back() != Some("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "data file name {name:?} is not a relative path of plain names"
        ))
    }
}

#[cfg(test)]
mod tests;
