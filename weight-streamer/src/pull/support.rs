//! Registering the fallback objects, checking the room on disk, reporting progress.

use super::*;

/// Names and registers the model's files as objects of the agent (the S3 fallback).
pub(super) fn register_objects(
    agent: &Agent,
    manifest: &Manifest,
    bucket: &str,
    prefix: &str,
) -> Result<Registration> {
    let mut descs = Vec::new();
    for (i, f) in manifest.files.iter().enumerate() {
        let id = OBJECT_ID_BASE + i as u64;
        nixl_transports::object::name_object(agent, id, &format!("{bucket}/{prefix}{}", f.name))
            .map_err(|e| Error::core("the S3 fallback", e))?;
        if f.size > 0 {
            descs.push(Desc::new(0, f.size, id));
        }
    }
    let list = DescList::from_descs(MemKind::Object, descs)
        .map_err(|e| Error::core("the S3 fallback", e))?;
    // SAFETY: object descriptors name no memory of this process.
    unsafe { agent.register(&list) }.map_err(|e| Error::core("registering the S3 fallback", e))
}

/// Refuses a model that this node cannot hold: its bytes (`data_len`, as the manifest lays them
/// out) beyond the host's physical memory, or its files beyond the free space under `out`. A
/// source that lies about a model's size then costs a clear error, not a mapping or sparse files
/// of any size it names.
pub(super) fn check_room(manifest: &Manifest, data_len: u64, out: Option<&Path>) -> Result<()> {
    // SAFETY: sysconf reads system constants and touches no memory of ours.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    if ram > 0 && data_len > ram {
        return Err(Error::Invalid(format!(
            "model {:?} claims {data_len} bytes, more than this host's {ram} bytes of memory",
            manifest.name
        )));
    }
    if let Some(dir) = out {
        let files: u64 = manifest
            .files
            .iter()
            .fold(0u64, |a, f| a.saturating_add(f.size));
        // The directory may not exist yet: ask the nearest ancestor that does.
        let mut probe = dir;
        while !probe.exists() {
            match probe.parent() {
                Some(p) if !p.as_os_str().is_empty() => probe = p,
                _ => {
                    probe = Path::new(".");
                    break;
                }
            }
        }
        let free = free_bytes(probe)
            .map_err(|e| Error::io(format!("checking free space under {}", probe.display()), e))?;
        if files > free {
            return Err(Error::Invalid(format!(
                "model {:?} has {files} bytes of files, more than the {free} bytes free under {}",
                manifest.name,
                probe.display()
            )));
        }
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub(super) fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` is writable memory of the struct's size.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

pub(crate) fn mismatch(manifest: &Manifest, first: &str, p: &Peer) -> Error {
    let detail = manifest.difference(&p.manifest).unwrap_or_default();
    let tensor = detail
        .split('"')
        .nth(1)
        .unwrap_or("(none: files differ)")
        .to_owned();
    Error::ManifestMismatch {
        tensor,
        detail: format!("{first} vs {}: {detail}", p.label),
    }
}

pub(super) fn print_progress(run: &Run<'_>, start: Instant, total: usize) {
    let sources = run.sources.read().clone();
    let done_bytes: u64 = sources
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .sum::<u64>()
        + run.fallback_bytes.load(Ordering::Relaxed);
    let all = run.manifest.total_bytes().max(1);
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    let rate = done_bytes as f64 / secs;
    let live = sources
        .iter()
        .filter(|s| s.alive.load(Ordering::Relaxed))
        .count();
    let eta = if rate > 0.0 {
        (all - done_bytes.min(all)) as f64 / rate
    } else {
        f64::INFINITY
    };
    let done = run.board.lock().done;
    let width = 30usize;
    let filled = (done * width) / total.max(1);
    eprint!(
        "\r[{}{}] {:>7.1}/{:.1} MiB {:>8.1} MB/s  sources {live}  ETA {:>5.1}s ",
        "#".repeat(filled),
        " ".repeat(width - filled),
        done_bytes as f64 / (1 << 20) as f64,
        all as f64 / (1 << 20) as f64,
        rate / 1e6,
        eta
    );
}

pub(super) fn holdings(
    agent: &Agent,
    md: &[u8],
    who: &str,
    model: &str,
    t: Duration,
) -> Result<serde_json::Value> {
    let p = probe_loaded(agent, md, who, model, t)?;
    let n = p.header.chunks;
    let scratch = Scratch::new(agent, n.max(1))?;
    if n > 0 {
        let at = p.ctrl.addr + p.header.have_offset();
        read_remote(agent, &p.agent_name, &scratch.mem, 0, at, n, t)
            .map_err(|e| Error::core(format!("reading what {who} holds"), e))?;
    }
    // SAFETY: the READ has ended; only this thread uses the scratch buffer.
    let have = unsafe { scratch.mem.slice(0, n)? };
    let chunks = p.manifest.chunks();
    let held: Vec<&Chunk> = chunks.iter().filter(|c| have[c.index] == HAVE).collect();
    Ok(serde_json::json!({
        "agent": who,
        "model_id": p.manifest.model_id(),
        "chunks": n,
        "chunks_held": held.len(),
        "bytes_held": held.iter().map(|c| c.len).sum::<u64>(),
        "bytes": p.manifest.total_bytes(),
    }))
}
