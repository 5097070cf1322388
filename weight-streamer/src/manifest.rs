//! The manifest of a model: its files, its tensors and a checksum per chunk, in a versioned
//! little-endian encoding decoded with bounds on every count and length (it comes from peers).
//!
//! Every byte of every file is covered by exactly one chunk (chunks never cross files), and every
//! chunk by an xxh3-64 checksum; every tensor of a `.safetensors` file carries its name, dtype,
//! shape, byte range in its file and an xxh3-64 of its bytes (so a tensor pulled on its own into
//! an engine's memory is verified too). The model id is the name plus the xxh3-128 digest of the
//! encoded manifest.

use std::fmt;

use nixl_core::codec::Reader;
use nixl_core::DecodeError;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"NXWM";
/// The encoding's version; a decoder refuses others.
pub const VERSION: u32 = 1;
/// Default chunk size (the unit of transfer, verification and fan-out).
pub const DEFAULT_CHUNK: u64 = 8 << 20;
/// Smallest and largest chunk sizes accepted.
pub const MIN_CHUNK: u64 = 4096;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: u64 = 1 << 30;
/// Longest model name.
pub const MAX_MODEL_NAME: usize = 200;
/// Longest file name.
pub const MAX_FILE_NAME: usize = 255;
/// Most files in a model.
pub const MAX_FILES: usize = 65_536;
/// Most tensors in a model.
pub const MAX_TENSORS: usize = 1 << 22;
/// Longest tensor name.
pub const MAX_TENSOR_NAME: usize = 1024;
/// Most dimensions of a tensor.
pub const MAX_DIMS: usize = 16;
/// Most chunks in a model (at 8 MiB: 32 TiB).
pub const MAX_CHUNKS: usize = 1 << 22;
/// Largest encoded manifest a peer may send.
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// Files are laid out in the data buffer at multiples of this.
pub const FILE_ALIGN: u64 = 4096;

/// One file of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Name in the model directory (no path separators).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of the safetensors header (the 8-byte length plus the JSON), 0 for other files.
    pub header_bytes: u64,
    /// Checksums of the file's chunks, in order.
    pub chunk_sums: Vec<u64>,
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Dtype as safetensors writes it (`F32`, `BF16`, `I8`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Index of its file in [`Manifest::files`].
    pub file: u32,
    /// Byte range in the file (absolute, header included).
    pub begin: u64,
    /// End of the range (exclusive).
    pub end: u64,
    /// xxh3-64 of the tensor's bytes.
    pub sum: u64,
}

/// A chunk: the unit of transfer and verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index among all chunks.
    pub index: usize,
    /// Index of its file.
    pub file: usize,
    /// Offset in its file.
    pub file_offset: u64,
    /// Offset in the data buffer (files laid out at [`FILE_ALIGN`]).
    pub data_offset: u64,
    /// Length.
    pub len: u64,
    /// Expected xxh3-64.
    pub sum: u64,
}

/// A model's manifest.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// Chunk size (the last chunk of each file may be shorter).
    pub chunk_size: u64,
    /// Files, sorted by name.
    pub files: Vec<FileEntry>,
    /// Tensors, sorted by file then offset.
    pub tensors: Vec<TensorEntry>,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("name", &self.name)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.total_bytes())
            .finish()
    }
}

/// Checks a model or file name: non-empty, bounded, no path separator, NUL or leading dot.
pub fn check_name(what: &str, name: &str, limit: usize) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > limit
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || name.chars().any(char::is_control);
    if bad {
        return Err(Error::Invalid(format!(
            "{what} {name:?} must be 1..={limit} bytes, without '/', '\\', control characters \
             or a leading '.'"
        )));
    }
    Ok(())
}

impl Manifest {
    /// Builds the manifest of files whose bytes are given (name, bytes), parsing the
    /// `.safetensors` ones.
    pub fn build(name: &str, chunk_size: u64, files: &[(String, &[u8])]) -> Result<Manifest> {
        check_name("model name", name, MAX_MODEL_NAME)?;
        check_chunk(chunk_size)?;
        let mut entries = Vec::with_capacity(files.len());
        let mut tensors = Vec::new();
        for (i, (fname, bytes)) in files.iter().enumerate() {
            check_name("file name", fname, MAX_FILE_NAME)?;
            let chunk_sums = bytes
                .chunks(chunk_size as usize)
                .map(xxh3_64)
                .collect::<Vec<_>>();
            let mut header_bytes = 0;
            if fname.ends_with(".safetensors") {
                let (n, md) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
                    Error::Invalid(format!("{fname}: not a valid safetensors file: {e}"))
                })?;
                header_bytes = 8 + n as u64;
                let mut ts: Vec<TensorEntry> = md
                    .tensors()
                    .into_iter()
                    .map(|(tname, info)| {
                        let begin = header_bytes + info.data_offsets.0 as u64;
                        let end = header_bytes + info.data_offsets.1 as u64;
                        TensorEntry {
                            name: tname,
                            dtype: info.dtype.to_string(),
                            shape: info.shape.iter().map(|&d| d as u64).collect(),
                            file: i as u32,
                            begin,
                            end,
                            sum: xxh3_64(&bytes[begin as usize..end as usize]),
                        }
                    })
                    .collect();
                ts.sort_by(|a, b| (a.begin, &a.name).cmp(&(b.begin, &b.name)));
                tensors.extend(ts);
            }
            entries.push(FileEntry {
                name: fname.clone(),
                size: bytes.len() as u64,
                header_bytes,
                chunk_sums,
            });
        }
        let m = Manifest {
            name: name.to_owned(),
            chunk_size,
            files: entries,
            tensors,
        };
        m.check()?;
        Ok(m)
    }

    /// Total bytes of the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Offset of each file in the data buffer, and the buffer's length.
    pub fn layout(&self) -> (Vec<u64>, u64) {
        let mut at = 0u64;
        let mut offs = Vec::with_capacity(self.files.len());
        for f in &self.files {
            offs.push(at);
            at += f.size.div_ceil(FILE_ALIGN) * FILE_ALIGN;
        }
        (offs, at.max(FILE_ALIGN))
    }

    /// Every chunk, in order.
    pub fn chunks(&self) -> Vec<Chunk> {
        let (offs, _) = self.layout();
        let mut out = Vec::new();
        for (fi, f) in self.files.iter().enumerate() {
            for (ci, &sum) in f.chunk_sums.iter().enumerate() {
                let file_offset = ci as u64 * self.chunk_size;
                out.push(Chunk {
                    index: out.len(),
                    file: fi,
                    file_offset,
                    data_offset: offs[fi] + file_offset,
                    len: (f.size - file_offset).min(self.chunk_size),
                    sum,
                });
            }
        }
        out
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.files.iter().map(|f| f.chunk_sums.len()).sum()
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The xxh3-128 of the encoding.
    pub fn digest(&self) -> u128 {
        xxh3_128(&self.encode())
    }

    /// `name@<first 16 hex digits of the digest>`.
    pub fn model_id(&self) -> String {
        format!("{}@{:016x}", self.name, (self.digest() >> 64) as u64)
    }

    /// Structural checks a decoded or built manifest passes: chunk counts agree with sizes,
    /// tensors lie inside their files' data sections, names are unique.
    pub fn check(&self) -> Result<()> {
        check_name("model name", &self.name, MAX_MODEL_NAME)?;
        check_chunk(self.chunk_size)?;
        let mut total_chunks = 0usize;
        for (i, f) in self.files.iter().enumerate() {
            check_name("file name", &f.name, MAX_FILE_NAME)?;
            if i > 0 && self.files[i - 1].name >= f.name {
                return Err(Error::Invalid(format!(
                    "manifest: files not sorted and unique at {:?}",
                    f.name
                )));
            }
            let want = f.size.div_ceil(self.chunk_size);
            if f.chunk_sums.len() as u64 != want {
                return Err(Error::Invalid(format!(
                    "manifest: file {:?} of {} bytes has {} chunks, not {want}",
                    f.name,
                    f.size,
                    f.chunk_sums.len()
                )));
            }
            if f.header_bytes > f.size {
                return Err(Error::Invalid(format!(
                    "manifest: file {:?}: header larger than the file",
                    f.name
                )));
            }
            total_chunks += f.chunk_sums.len();
        }
        if total_chunks > MAX_CHUNKS {
            return Err(Error::Invalid(format!(
                "manifest: {total_chunks} chunks (at most {MAX_CHUNKS})"
            )));
        }
        let mut names: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Invalid(format!(
                "manifest: tensor {:?} listed twice",
                w[0]
            )));
        }
        for t in &self.tensors {
            let f = self.files.get(t.file as usize).ok_or_else(|| {
                Error::Invalid(format!("manifest: tensor {:?}: no file {}", t.name, t.file))
            })?;
            if t.begin > t.end || t.begin < f.header_bytes || t.end > f.size {
                return Err(Error::Invalid(format!(
                    "manifest: tensor {:?}: range {}..{} outside the data of {:?}",
                    t.name, t.begin, t.end, f.name
                )));
            }
        }
        Ok(())
    }

    /// Encodes (version [`VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.chunk_count() * 8 + self.tensors.len() * 64);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        put_str(&mut b, &self.name);
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for f in &self.files {
            put_str(&mut b, &f.name);
            b.extend_from_slice(&f.size.to_le_bytes());
            b.extend_from_slice(&f.header_bytes.to_le_bytes());
            for s in &f.chunk_sums {
                b.extend_from_slice(&s.to_le_bytes());
            }
        }
        b.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            put_str(&mut b, &t.dtype);
            b.push(t.shape.len() as u8);
            for d in &t.shape {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.file.to_le_bytes());
            b.extend_from_slice(&t.begin.to_le_bytes());
            b.extend_from_slice(&t.end.to_le_bytes());
            b.extend_from_slice(&t.sum.to_le_bytes());
        }
        b
    }

    /// Decodes untrusted bytes: every count and length is bounded before anything is
    /// allocated by it, and the result passes [`Manifest::check`].
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::Invalid(format!(
                "manifest of {} bytes (at most {MAX_MANIFEST_BYTES})",
                bytes.len()
            )));
        }
        let m = decode_inner(bytes).map_err(|e| Error::Invalid(format!("manifest: {e}")))?;
        m.check()?;
        Ok(m)
    }

    /// The first difference between two manifests of one model name, naming the tensor (or
    /// file) where they part: `None` when equal.
    pub fn difference(&self, other: &Manifest) -> Option<String> {
        if self.name != other.name {
            return Some(format!("model {:?} vs {:?}", self.name, other.name));
        }
        let file_name = |m: &Manifest, i: u32| {
            m.files
                .get(i as usize)
                .map_or("?".to_owned(), |f| f.name.clone())
        };
        // Dtype and shape first (the most telling), then placement, then contents.
        for t in &self.tensors {
            match other.tensor(&t.name) {
                None => return Some(format!("tensor {:?} missing on one side", t.name)),
                Some(o) if (&t.dtype, &t.shape) != (&o.dtype, &o.shape) => {
                    return Some(format!(
                        "tensor {:?}: {} {:?} vs {} {:?}",
                        t.name, t.dtype, t.shape, o.dtype, o.shape
                    ))
                }
                Some(_) => {}
            }
        }
        for t in &self.tensors {
            if let Some(o) = other.tensor(&t.name) {
                let a = (file_name(self, t.file), t.begin, t.end);
                let b = (file_name(other, o.file), o.begin, o.end);
                if a != b {
                    return Some(format!(
                        "tensor {:?}: in {} at {}..{} vs in {} at {}..{}",
                        t.name, a.0, a.1, a.2, b.0, b.1, b.2
                    ));
                }
                if t.sum != o.sum {
                    return Some(format!("tensor {:?}: contents differ", t.name));
                }
            }
        }
        if let Some(t) = other
            .tensors
            .iter()
            .find(|t| self.tensor(&t.name).is_none())
        {
            return Some(format!("tensor {:?} missing on one side", t.name));
        }
        if self.chunk_size != other.chunk_size {
            return Some(format!(
                "chunk size {} vs {}",
                self.chunk_size, other.chunk_size
            ));
        }
        for f in &self.files {
            match other.files.iter().find(|o| o.name == f.name) {
                None => return Some(format!("file {:?} missing on one side", f.name)),
                Some(o) if o != f => return Some(format!("file {:?}: contents differ", f.name)),
                Some(_) => {}
            }
        }
        if other.files.len() != self.files.len() {
            return Some("a file missing on one side".into());
        }
        None
    }
}

fn check_chunk(chunk_size: u64) -> Result<()> {
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) || chunk_size % MIN_CHUNK != 0 {
        return Err(Error::Invalid(format!(
            "chunk size {chunk_size}: a multiple of {MIN_CHUNK} in {MIN_CHUNK}..={MAX_CHUNK}"
        )));
    }
    Ok(())
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Names are bounded far below u16::MAX by check_name and the tensor limits.
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn decode_inner(bytes: &[u8]) -> std::result::Result<Manifest, DecodeError> {
    let mut r = Reader::new(bytes);
    if r.take(4, "magic")? != MAGIC {
        return Err(DecodeError::Invalid {
            field: "magic",
            reason: "not a nixl-weights manifest".into(),
        });
    }
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(DecodeError::Invalid {
            field: "version",
            reason: format!("version {version}, this build reads {VERSION}"),
        });
    }
    let name = r.str("model name", MAX_MODEL_NAME)?;
    let chunk_size = r.u64("chunk size")?;
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return Err(DecodeError::Invalid {
            field: "chunk size",
            reason: format!("{chunk_size}"),
        });
    }
    let n = r.peek_u32()? as usize;
    let n = r.count("file count", n, 4, MAX_FILES, 2 + 16)?;
    let mut files = Vec::with_capacity(n);
    let mut chunks_left = MAX_CHUNKS;
    for _ in 0..n {
        let fname = r.str("file name", MAX_FILE_NAME)?;
        let size = r.u64("file size")?;
        let header_bytes = r.u64("header bytes")?;
        let c = size.div_ceil(chunk_size);
        if c > chunks_left as u64 || c.saturating_mul(8) > r.buf.len() as u64 {
            return Err(DecodeError::TooLarge {
                field: "chunks",
                got: c.min(usize::MAX as u64) as usize,
                limit: chunks_left.min(r.buf.len() / 8),
            });
        }
        chunks_left -= c as usize;
        let mut chunk_sums = Vec::with_capacity(c as usize);
        for _ in 0..c {
            chunk_sums.push(r.u64("chunk checksum")?);
        }
        files.push(FileEntry {
            name: fname,
            size,
            header_bytes,
            chunk_sums,
        });
    }
    let n = r.peek_u32()? as usize;
    let n = r.count("tensor count", n, 4, MAX_TENSORS, 2 + 2 + 1 + 4 + 24)?;
    let mut tensors = Vec::with_capacity(n);
    for _ in 0..n {
        let tname = r.str("tensor name", MAX_TENSOR_NAME)?;
        let dtype = r.str("dtype", 16)?;
        let nd = usize::from(r.u8("dims")?);
        if nd > MAX_DIMS {
            return Err(DecodeError::TooLarge {
                field: "dims",
                got: nd,
                limit: MAX_DIMS,
            });
        }
        let mut shape = Vec::with_capacity(nd);
        for _ in 0..nd {
            shape.push(r.u64("dim")?);
        }
        tensors.push(TensorEntry {
            name: tname,
            dtype,
            shape,
            file: r.u32("tensor file")?,
            begin: r.u64("tensor begin")?,
            end: r.u64("tensor end")?,
            sum: r.u64("tensor checksum")?,
        });
    }
    if !r.is_empty() {
        return Err(DecodeError::Invalid {
            field: "end",
            reason: format!("{} bytes after the manifest", r.buf.len()),
        });
    }
    Ok(Manifest {
        name,
        chunk_size,
        files,
        tensors,
    })
}

/// Checks the safetensors header of a file's bytes against the manifest's tensors of that file
/// (names, dtypes, shapes and ranges): the error names the first tensor that differs.
pub fn check_file_tensors(m: &Manifest, file: usize, bytes: &[u8]) -> Result<()> {
    let f = &m.files[file];
    if f.header_bytes == 0 {
        return Ok(());
    }
    let (n, md) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a valid safetensors file: {e}", f.name)))?;
    let hb = 8 + n as u64;
    let parsed = md.tensors();
    let mine: Vec<&TensorEntry> = m
        .tensors
        .iter()
        .filter(|t| t.file as usize == file)
        .collect();
    for t in &mine {
        let Some(p) = parsed.get(&t.name) else {
            return Err(Error::ManifestMismatch {
                tensor: t.name.clone(),
                detail: format!("in the manifest but not in {}", f.name),
            });
        };
        let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
        let range = (hb + p.data_offsets.0 as u64, hb + p.data_offsets.1 as u64);
        if p.dtype.to_string() != t.dtype || shape != t.shape || range != (t.begin, t.end) {
            return Err(Error::ManifestMismatch {
                tensor: t.name.clone(),
                detail: format!(
                    "{}: file says {} {:?} at {}..{}, manifest {} {:?} at {}..{}",
                    f.name, p.dtype, shape, range.0, range.1, t.dtype, t.shape, t.begin, t.end
                ),
            });
        }
    }
    if parsed.len() != mine.len() {
        let extra = parsed
            .keys()
            .find(|k| !mine.iter().any(|t| &t.name == *k))
            .cloned()
            .unwrap_or_default();
        return Err(Error::ManifestMismatch {
            tensor: extra,
            detail: format!("in {} but not in the manifest", f.name),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(tensors: &[(&str, &str, &[usize], usize)]) -> Vec<u8> {
        let mut hdr = String::from("{");
        let mut at = 0;
        for (i, (n, d, s, len)) in tensors.iter().enumerate() {
            if i > 0 {
                hdr.push(',');
            }
            hdr.push_str(&format!(
                "\"{n}\":{{\"dtype\":\"{d}\",\"shape\":{s:?},\"data_offsets\":[{at},{}]}}",
                at + len
            ));
            at += len;
        }
        hdr.push('}');
        let mut out = (hdr.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(hdr.as_bytes());
        out.extend((0..at).map(|i| (i * 7 + 3) as u8));
        out
    }

    fn sample() -> Manifest {
        let a = st(&[("w", "F32", &[3, 5], 60), ("b", "U8", &[7], 7)]);
        let files = vec![
            ("a.safetensors".to_owned(), &a[..]),
            ("config.json".to_owned(), &b"{}"[..]),
        ];
        Manifest::build("m", 4096, &files).unwrap()
    }

    #[test]
    fn round_trip_and_digest() {
        let m = sample();
        assert_eq!(m.tensors.len(), 2);
        assert_eq!(m.tensor("w").unwrap().shape, vec![3, 5]);
        let enc = m.encode();
        let d = Manifest::decode(&enc).unwrap();
        assert_eq!(d, m);
        assert_eq!(d.digest(), m.digest());
        assert!(m.model_id().starts_with("m@"));
        assert_eq!(m.chunk_count(), 2);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error_or_a_valid_manifest() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            assert!(Manifest::decode(&enc[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..enc.len() {
            for bit in [0, 7] {
                let mut e = enc.clone();
                e[i] ^= 1 << bit;
                if let Ok(m) = Manifest::decode(&e) {
                    m.check().unwrap();
                }
            }
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut e = Vec::new();
        e.extend_from_slice(MAGIC);
        e.extend_from_slice(&VERSION.to_le_bytes());
        put_str(&mut e, "m");
        e.extend_from_slice(&4096u64.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        put_str(&mut e, "f");
        e.extend_from_slice(&u64::MAX.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        let err = Manifest::decode(&e).unwrap_err().to_string();
        assert!(err.contains("chunks"), "{err}");
    }

    #[test]
    fn difference_names_the_tensor() {
        let m = sample();
        let mut o = m.clone();
        let w = o.tensors.iter().position(|t| t.name == "w").unwrap();
        o.tensors[w].shape = vec![5, 3];
        let d = m.difference(&o).unwrap();
        assert!(d.contains("\"w\""), "{d}");
        assert!(m.difference(&m.clone()).is_none());
    }

    #[test]
    fn header_checked_against_manifest() {
        let a = st(&[("w", "F32", &[3, 5], 60), ("b", "U8", &[7], 7)]);
        let m = sample();
        check_file_tensors(&m, 0, &a).unwrap();
        let other = st(&[("w", "F32", &[5, 3], 60), ("b", "U8", &[7], 7)]);
        let e = check_file_tensors(&m, 0, &other).unwrap_err().to_string();
        assert!(e.contains("\"w\""), "{e}");
    }

    #[test]
    fn bad_names_refused() {
        for n in ["", "../x", ".hidden", "a/b", "a\0"] {
            assert!(check_name("file name", n, 255).is_err(), "{n:?}");
        }
    }
}
