//! Shared by the checkpoint tests: agents, scratch directories and registered DRAM regions.

#![allow(dead_code)]

use std::path::PathBuf;

use nixl_checkpoint::{CkptError, Region};
use nixl_core::{Agent, Desc, DescList, MemKind, Registration};
use nixl_transports::config::Config;

/// The file backends: `uring`, falling back to `posix`.
pub const FILE_BACKENDS: &str = "backends = [\"uring\", \"posix\"]";

/// An agent named `name` with the backends of the configuration document `toml`.
pub fn agent_with(name: &str, toml: &str) -> Agent {
    let cfg = Config::from_toml(toml).unwrap();
    Agent::builder(name)
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap()
}

/// An agent named `name` with the file backends.
pub fn file_agent(name: &str) -> Agent {
    agent_with(name, FILE_BACKENDS)
}

/// A path of its own under the temp dir (not created).
pub fn scratch_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "nixl-ckpt-{tag}-{}-{:x}",
        std::process::id(),
        nixl_core::random_u64().unwrap()
    ))
}

/// A new empty directory of its own under the temp dir.
pub fn scratch(tag: &str) -> PathBuf {
    let d = scratch_path(tag);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Registers the memory `d` of `kind` with `a`.
pub fn register(a: &Agent, kind: MemKind, d: Desc) -> Registration {
    register_descs(a, kind, vec![d])
}

/// Registers the memory `descs` of `kind` with `a`.
pub fn register_descs(a: &Agent, kind: MemKind, descs: Vec<Desc>) -> Registration {
    // SAFETY: the tests' buffers outlive their registrations.
    unsafe { a.register(&DescList::from_descs(kind, descs).unwrap()) }.unwrap()
}

/// Registers the memory of the DRAM `regions` with `a`.
pub fn register_regions(a: &Agent, regions: &[Region]) -> Registration {
    let descs = regions
        .iter()
        .map(|r| Desc::new(r.addr, r.len, 0))
        .collect();
    register_descs(a, MemKind::Dram, descs)
}

/// A DRAM region named `name` over `buf`.
pub fn region(name: &str, buf: &mut [u8]) -> Region {
    Region::dram(name, buf.as_mut_ptr() as u64, buf.len() as u64)
}

/// Regions `r0`, `r1`, ... over `bufs`, registered with `a`.
pub fn numbered_regions(a: &Agent, bufs: &mut [Vec<u8>]) -> (Vec<Region>, Registration) {
    let regions: Vec<Region> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| region(&format!("r{i}"), b))
        .collect();
    let r = register_regions(a, &regions);
    (regions, r)
}

/// Asserts that `e` is `Corrupt` naming chunk `chunk` of `region`, with `memory_written` as
/// `written`, and that its text says each of `says`.
pub fn assert_corrupt(e: &CkptError, region: &str, chunk: usize, written: bool, says: &[&str]) {
    let msg = e.to_string();
    match e {
        CkptError::Corrupt {
            region: r,
            chunk: c,
            memory_written: w,
            ..
        } => assert_eq!(
            (r.as_str(), *c, *w),
            (region, Some(chunk), written),
            "{msg}"
        ),
        other => panic!("not Corrupt: {other:?}"),
    }
    for s in says {
        assert!(msg.contains(s), "{s:?} is not in: {msg}");
    }
}
