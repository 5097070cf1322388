//! `nixl-ckpt bench`: save, restore and an incremental save of host memory through an agent,
//! timed. The storage's own speed (fio on the same directory, same size and block size) is
//! measured beside it by `scripts/ckpt-bench.sh`.

use std::time::Instant;

use nixl_checkpoint::{restore, save, CkptError, Progress, Region, RestoreOptions, SaveOptions};
use nixl_core::{Agent, Desc, DescList, MemKind};
use nixl_transports::config::Config;
use serde_json::{json, Value};

/// Page-aligned anonymous memory, unmapped on drop.
struct Buf {
    ptr: *mut u8,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Result<Buf, CkptError> {
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(CkptError::InvalidArgument(format!(
                "cannot map {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Buf { ptr: p.cast(), len })
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` bytes owned by this Buf.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn fill(b: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in b.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

#[allow(clippy::too_many_arguments)] // the CLI's flags, one each
pub fn run(
    dir: &str,
    size: u64,
    nregions: usize,
    chunk: u64,
    changed_pct: f64,
    direct: bool,
    keep: bool,
    progress: Option<Progress>,
) -> Result<Value, CkptError> {
    let cfg = Config::from_toml("backends = [\"uring\", \"posix\"]")
        .map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
    let agent = Agent::builder("nixl-ckpt-bench")
        .backends(
            cfg.backends()
                .map_err(|e| CkptError::InvalidArgument(e.to_string()))?,
        )
        .build()
        .map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
    let nregions = nregions.max(1);
    let per = (size / nregions as u64).div_ceil(4096) * 4096;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for i in 0..nregions {
        let mut b = Buf::new(per as usize)?;
        fill(b.slice(), i as u64 + 1);
        src.push(b);
        dst.push(Buf::new(per as usize)?);
    }
    let regions = |bufs: &[Buf]| -> Vec<Region> {
        bufs.iter()
            .enumerate()
            .map(|(i, b)| Region::dram(format!("r{i}"), b.ptr as u64, b.len as u64))
            .collect()
    };
    let (rs, rd) = (regions(&src), regions(&dst));
    let descs: Vec<Desc> = rs
        .iter()
        .chain(&rd)
        .map(|r| Desc::new(r.addr, r.len, 0))
        .collect();
    let list = DescList::from_descs(MemKind::Dram, descs)
        .map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
    // SAFETY: the buffers outlive the registration (dropped at the end of this function, after it).
    let reg =
        unsafe { agent.register(&list) }.map_err(|e| CkptError::InvalidArgument(e.to_string()))?;
    let inc_dir = format!("{}-inc", dir.trim_end_matches('/'));
    let _ = nixl_checkpoint::ops::remove(&inc_dir);
    let _ = nixl_checkpoint::ops::remove(dir);
    let opts = SaveOptions {
        chunk_size: chunk,
        direct,
        progress: progress.clone(),
        ..SaveOptions::default()
    };
    let t = Instant::now();
    // SAFETY: the source buffers are mapped and unchanged for the call.
    let rep = unsafe { save(&agent, dir, &rs, &opts) }?;
    let save_s = t.elapsed().as_secs_f64();
    let ropts = RestoreOptions {
        direct,
        progress: progress.clone(),
    };
    let t = Instant::now();
    // SAFETY: the destination buffers are mapped and nothing references them.
    let restored = unsafe { restore(&agent, dir, &rd, &ropts) }?;
    let restore_s = t.elapsed().as_secs_f64();
    for (s, d) in src.iter_mut().zip(dst.iter_mut()) {
        if s.slice() != d.slice() {
            return Err(CkptError::InvalidArgument(
                "restored bytes differ from the saved ones".into(),
            ));
        }
    }
    // Change `changed_pct` % of the chunks (one byte each, spread evenly) and save over the base.
    let total_chunks = rep.chunks as u64;
    let want = ((total_chunks as f64 * changed_pct / 100.0).round() as u64).clamp(1, total_chunks);
    let per_chunks = per.div_ceil(chunk);
    for k in 0..want {
        let c = k * total_chunks / want;
        let (ri, ci) = ((c / per_chunks) as usize, c % per_chunks);
        let s = src[ri].slice();
        s[(ci * chunk) as usize] ^= 0xff;
    }
    let iopts = SaveOptions {
        base: Some(dir.to_owned()),
        ..opts
    };
    let t = Instant::now();
    // SAFETY: as above.
    let inc = unsafe { save(&agent, &inc_dir, &rs, &iopts) }?;
    let inc_s = t.elapsed().as_secs_f64();
    drop(reg);
    nixl_checkpoint::ops::remove(&inc_dir)?;
    if !keep {
        nixl_checkpoint::ops::remove(dir)?;
    }
    let gbps = |b: u64, s: f64| b as f64 / s / 1e9;
    Ok(json!({
        "bytes": rep.bytes,
        "regions": nregions,
        "chunk_size": chunk,
        "direct": direct,
        "backend": rep.backend,
        "save_s": save_s,
        "save_gbps": gbps(rep.bytes, save_s),
        "restore_s": restore_s,
        "restore_gbps": gbps(restored, restore_s),
        "incremental": {
            "changed_chunks": want,
            "chunks": rep.chunks,
            "written_bytes": inc.written,
            "seconds": inc_s,
            "vs_full_time": inc_s / save_s,
        },
    }))
}
