//! Checkpoint and restore through a real agent (`uring`, falling back to `posix`) and real
//! files: two processes (save, exit, restore in another process, plainly and at the recorded
//! addresses, following pointers), every kind of corruption, kill -9 during saves, incremental
//! saves, copy and remove.
//!
//! A test that needs a second process runs itself again (`current_exe`, the same test, a role
//! in `NIXL_CKPT_ROLE`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nixl_checkpoint::{
    ops, restore, restore_mapped, save, CkptError, Placement, Region, RestoreOptions, SaveOptions,
};
use nixl_core::{Agent, Desc, MemKind};

mod common;
use common::{
    assert_corrupt, file_agent, numbered_regions, region, register_descs, register_regions, scratch,
};
use nixl_testkit::pattern::{fill, pattern};

fn agent() -> Agent {
    file_agent("ckpt-test")
}

fn run_child(test: &str, role: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("NIXL_CKPT_ROLE", role)
        .env("NIXL_CKPT_DIR", dir)
        .spawn()
        .unwrap()
}

fn role() -> Option<(String, PathBuf)> {
    let r = std::env::var("NIXL_CKPT_ROLE").ok()?;
    Some((r, PathBuf::from(std::env::var("NIXL_CKPT_DIR").unwrap())))
}

/// Where the saving process maps its regions (the restoring process maps them there again).
const HINT: u64 = 0x5a00_0000_0000;
/// (name, offset of the region in its mapping, length, seed): odd sizes and alignments, 64 MiB.
const REGIONS: &[(&str, u64, u64, u64)] = &[
    ("weights", 16, (40 << 20) + 123, 11),
    ("kv", 0, (24 << 20) - 4097, 12),
    ("graph", 4096 + 8, (1 << 20) + 5, 0),
    ("tiny", 0, 3, 14),
];
const NODE: u64 = 64;

/// A linked list inside the region: node i at `addr + i*NODE` points to node (i*7+3) % n by its
/// absolute address, and carries its index.
fn link_graph(addr: u64, len: u64) {
    let n = len / NODE;
    for i in 0..n {
        let next = addr + ((i * 7 + 3) % n) * NODE;
        let p = (addr + i * NODE) as *mut u64;
        // SAFETY: node i lies inside the region (i < len / NODE); unaligned writes.
        unsafe {
            p.write_unaligned(next);
            p.add(1).write_unaligned(i);
        }
    }
}

fn follow_graph(addr: u64, len: u64) {
    let n = len / NODE;
    let mut p = addr;
    for step in 0..n {
        let i = (p - addr) / NODE;
        let node = p as *const u64;
        // SAFETY: `p` is a node address inside the restored region (checked by the assert).
        let (next, idx) = unsafe { (node.read_unaligned(), node.add(1).read_unaligned()) };
        assert_eq!(idx, i, "step {step}: node at {p:#x} says it is {idx}");
        assert!(
            next >= addr && next < addr + len,
            "step {step}: pointer {next:#x} leaves the region"
        );
        p = next;
    }
}

fn save_in_child(dir: &Path) {
    let a = agent();
    let mut regions = Vec::new();
    let mut descs = Vec::new();
    for (i, &(name, off, len, seed)) in REGIONS.iter().enumerate() {
        let at = HINT + (i as u64) * 0x1000_0000;
        let map_len = (off + len).div_ceil(4096) * 4096;
        // SAFETY: an anonymous mapping at a free address (MAP_FIXED_NOREPLACE), never unmapped.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                map_len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p as u64, at, "mmap at {at:#x}");
        let addr = at + off;
        // SAFETY: the region lies inside the mapping just made.
        let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) };
        if name == "graph" {
            link_graph(addr, len);
        } else {
            fill(buf, seed);
        }
        regions.push(Region::dram(name, addr, len));
        descs.push(Desc::new(addr, len, 0));
    }
    let _r = register_descs(&a, MemKind::Dram, descs);
    let opts = SaveOptions {
        metadata: Some(r#"{"model":"test","step":7}"#.into()),
        chunk_size: 4 << 20,
        ..SaveOptions::default()
    };
    // SAFETY: the regions are mapped and unchanged for the call.
    let rep = unsafe { save(&a, dir.to_str().unwrap(), &regions, &opts) }.unwrap();
    eprintln!("saved {} bytes with {:?}", rep.bytes, rep.backend);
    assert_eq!(rep.backend.as_deref(), Some("uring"));
}

fn expected(name: &str, addr: u64, len: u64, seed: u64) -> Vec<u8> {
    if name == "graph" {
        let mut v = vec![0u8; len as usize];
        let p = v.as_mut_ptr() as u64;
        link_graph(p, len);
        // Re-base the pointers on `addr`.
        for i in 0..len / NODE {
            let at = (i * NODE) as usize;
            let next = u64::from_le_bytes(v[at..at + 8].try_into().unwrap()) - p + addr;
            v[at..at + 8].copy_from_slice(&next.to_le_bytes());
        }
        v
    } else {
        pattern(seed, len as usize)
    }
}

#[test]
fn two_processes_plain_and_at_recorded_addresses() {
    if let Some((role, dir)) = role() {
        if role == "save" {
            save_in_child(&dir);
        }
        std::process::exit(0);
    }
    let dir = scratch("two");
    let st = run_child(
        "two_processes_plain_and_at_recorded_addresses",
        "save",
        &dir,
    )
    .wait()
    .unwrap();
    assert!(st.success(), "the saving process failed: {st}");
    let uri = dir.to_str().unwrap();
    let m = ops::read_manifest(uri).unwrap();
    assert_eq!(m.metadata, r#"{"model":"test","step":7}"#);
    assert_eq!(m.regions.len(), REGIONS.len());
    let a = agent();

    // Plainly, into the caller's own buffers.
    let mut bufs: Vec<Vec<u8>> = REGIONS.iter().map(|r| vec![0u8; r.2 as usize]).collect();
    let regions: Vec<Region> = REGIONS
        .iter()
        .zip(bufs.iter_mut())
        .map(|(r, b)| region(r.0, b))
        .collect();
    let _r = register_regions(&a, &regions);
    // SAFETY: the buffers live and are untouched for the call.
    let n = unsafe { restore(&a, uri, &regions, &RestoreOptions::default()) }.unwrap();
    assert_eq!(n, REGIONS.iter().map(|r| r.2).sum::<u64>());
    for (i, &(name, off, len, seed)) in REGIONS.iter().enumerate() {
        let recorded = HINT + i as u64 * 0x1000_0000 + off;
        assert!(
            bufs[i] == expected(name, recorded, len, seed),
            "region {name} differs"
        );
    }

    // At the recorded addresses, following the pointers inside "graph".
    let r = restore_mapped(&a, uri, None, Placement::Recorded).unwrap();
    for (i, &(name, off, len, seed)) in REGIONS.iter().enumerate() {
        let got = r.region(name).unwrap();
        assert_eq!(got.addr, HINT + i as u64 * 0x1000_0000 + off, "{name}");
        // SAFETY: the region is mapped by `r`, and nothing writes it now.
        let bytes = unsafe { std::slice::from_raw_parts(got.addr as *const u8, len as usize) };
        assert!(
            bytes == expected(name, got.addr, len, seed).as_slice(),
            "region {name} differs"
        );
    }
    let g = r.region("graph").unwrap();
    follow_graph(g.addr, g.len);
    // The range is taken now: a second restore there fails clearly, naming the region.
    let e = restore_mapped(&a, uri, Some(&["graph"]), Placement::Recorded).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("\"graph\"") && msg.contains("is taken"),
        "{msg}"
    );
    drop(r);
    // Anywhere, a subset.
    let r = restore_mapped(&a, uri, Some(&["tiny"]), Placement::Anywhere).unwrap();
    assert_eq!(r.regions().len(), 1);
    let t = &r.regions()[0];
    // SAFETY: mapped by `r`.
    let bytes = unsafe { std::slice::from_raw_parts(t.addr as *const u8, 3) };
    assert_eq!(bytes, &pattern(14, 3)[..]);
    drop(r);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Saves `bufs` (named r0, r1, ...) to `dir` with small chunks.
fn save_small(
    a: &Agent,
    dir: &Path,
    bufs: &mut [Vec<u8>],
    base: Option<&Path>,
) -> nixl_checkpoint::SaveReport {
    let (regions, _r) = numbered_regions(a, bufs);
    let opts = SaveOptions {
        chunk_size: 64 << 10,
        base: base.map(|b| b.to_str().unwrap().to_owned()),
        ..SaveOptions::default()
    };
    // SAFETY: the buffers live and are unchanged for the call.
    unsafe { save(a, dir.to_str().unwrap(), &regions, &opts) }.unwrap()
}

fn restore_small(a: &Agent, dir: &Path, lens: &[usize]) -> (Result<u64, CkptError>, Vec<Vec<u8>>) {
    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xeeu8; l]).collect();
    let (regions, r) = numbered_regions(a, &mut bufs);
    // SAFETY: the buffers live and are untouched for the call.
    let res = unsafe {
        restore(
            a,
            dir.to_str().unwrap(),
            &regions,
            &RestoreOptions::default(),
        )
    };
    drop(r);
    (res, bufs)
}

fn data_file(dir: &Path, region: usize) -> PathBuf {
    let m = ops::read_manifest(dir.to_str().unwrap()).unwrap();
    let c = m.regions[region].chunks[0];
    dir.join(&m.files[c.file as usize].name)
}

#[test]
fn every_corruption_names_region_and_chunk_and_what_memory_saw() {
    let a = agent();
    let lens = [300_000usize, 70_001];
    let mut bufs: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(i as u64 + 1, l))
        .collect();
    let good = bufs.clone();
    let fresh = || {
        let d = scratch("corrupt");
        let mut b = good.clone();
        save_small(&a, &d, &mut b, None);
        d
    };
    let dir = fresh();
    let (res, got) = restore_small(&a, &dir, &lens);
    assert_eq!(res.unwrap(), (lens[0] + lens[1]) as u64);
    assert_eq!(got, good);
    ops::verify(dir.to_str().unwrap(), None).unwrap();

    // A flipped byte in chunk 2 of r0: found after the read, memory partly written.
    let f = data_file(&dir, 0);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[2 * (64 << 10) + 17] ^= 1;
    std::fs::write(&f, &bytes).unwrap();
    let e = restore_small(&a, &dir, &lens).0.unwrap_err();
    let says = ["\"r0\" chunk 2", "checksum", "partly written"];
    assert_corrupt(&e, "r0", 2, true, &says);
    let e = ops::verify(dir.to_str().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"r0\" chunk 2"), "{e}");

    // A truncated data file: refused before memory is touched, naming the first chunk cut.
    let dir = fresh();
    let f = data_file(&dir, 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(200_000)
        .unwrap();
    let (res, got) = restore_small(&a, &dir, &lens);
    assert_corrupt(
        &res.unwrap_err(),
        "r0",
        3,
        false,
        &["truncated", "not touched"],
    );
    assert!(
        got.iter().all(|b| b.iter().all(|&x| x == 0xee)),
        "memory was written"
    );

    // A missing data file.
    let dir = fresh();
    std::fs::remove_file(data_file(&dir, 1)).unwrap();
    let e = restore_small(&a, &dir, &lens).0.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("\"r1\" chunk 0") && msg.contains("missing") && msg.contains("not touched"),
        "{msg}"
    );

    // A manifest from a newer version; a damaged manifest; no manifest.
    let dir = fresh();
    let mp = dir.join(ops::MANIFEST);
    let orig = std::fs::read(&mp).unwrap();
    let mut b = orig.clone();
    b[8] = 9;
    std::fs::write(&mp, &b).unwrap();
    let e = restore_small(&a, &dir, &lens).0.unwrap_err().to_string();
    assert!(e.contains("version 9") && e.contains("upgrade"), "{e}");
    let mut b = orig.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&mp, &b).unwrap();
    let e = restore_small(&a, &dir, &lens).0.unwrap_err();
    assert!(matches!(e, CkptError::Manifest(_)), "{e}");
    std::fs::write(&mp, &orig[..orig.len() - 3]).unwrap();
    assert!(matches!(
        restore_small(&a, &dir, &lens).0.unwrap_err(),
        CkptError::Manifest(_)
    ));
    std::fs::remove_file(&mp).unwrap();
    let e = restore_small(&a, &dir, &lens).0.unwrap_err();
    assert!(matches!(e, CkptError::NoCheckpoint { .. }), "{e}");

    // Regions that do not match: a length, a name.
    let dir = fresh();
    let e = restore_small(&a, &dir, &[lens[0], lens[1] + 1])
        .0
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, CkptError::Mismatch { .. }) && msg.contains("\"r1\"") && msg.contains("70001"),
        "{msg}"
    );
    let mut other = vec![0u8; 10];
    let rg = [region("r0", &mut bufs[0]), region("r7", &mut other)];
    let _r = register_regions(&a, &rg);
    // SAFETY: the buffers live for the call.
    let e =
        unsafe { restore(&a, dir.to_str().unwrap(), &rg, &RestoreOptions::default()) }.unwrap_err();
    assert!(
        matches!(&e, CkptError::NotFound { region, .. } if region == "r7"),
        "{e}"
    );
    assert!(e.to_string().contains("r0, r1"), "{e}");
    drop(_r);
    // Memory outside every registration is refused before anything is written.
    let mut loose = vec![0u8; lens[0]];
    let rg = [region("r0", &mut loose)];
    // SAFETY: the buffer lives for the call.
    let e =
        unsafe { restore(&a, dir.to_str().unwrap(), &rg, &RestoreOptions::default()) }.unwrap_err();
    assert!(
        e.to_string().contains("not inside a registered region"),
        "{e}"
    );
    assert!(loose.iter().all(|&x| x == 0));
    bufs.clear();
}

/// A save killed with SIGKILL at random moments: the checkpoint there before still restores
/// whole (or the new one, if the kill came after its rename); a first save killed early
/// leaves nothing that restores.
#[test]
fn kill_9_during_save_never_leaves_a_valid_looking_partial_checkpoint() {
    const LENS: [usize; 3] = [6 << 20, (2 << 20) + 77, 4097];
    if let Some((role, dir)) = role() {
        let a = agent();
        let gen0: u64 = role.parse().unwrap();
        println!("ready");
        for g in gen0.. {
            let mut bufs: Vec<Vec<u8>> = LENS
                .iter()
                .enumerate()
                .map(|(i, &l)| pattern(g * 10 + i as u64, l))
                .collect();
            save_small(&a, &dir, &mut bufs, None);
        }
        unreachable!();
    }
    let a = agent();
    // How long one save takes here: kills are spread over 1.25 times that after the child
    // starts its first save, so most land inside it, on slow and fast machines alike.
    let probe = scratch("kill-probe");
    let mut bufs: Vec<Vec<u8>> = LENS.iter().map(|&l| pattern(3, l)).collect();
    let t = std::time::Instant::now();
    save_small(&a, &probe, &mut bufs, None);
    let save_us = (t.elapsed().as_micros() as u64).max(1000);
    ops::remove(probe.to_str().unwrap()).unwrap();
    let (mut old, mut new, mut none) = (0, 0, 0);
    for round in 0..24u64 {
        let dir = scratch("kill");
        let first = round % 3 == 0;
        let gen0 = 1000 * (round + 1);
        if !first {
            let mut bufs: Vec<Vec<u8>> = LENS
                .iter()
                .enumerate()
                .map(|(i, &l)| pattern(7 * 10 + i as u64, l))
                .collect();
            save_small(&a, &dir, &mut bufs, None);
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "kill_9_during_save_never_leaves_a_valid_looking_partial_checkpoint",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("NIXL_CKPT_ROLE", gen0.to_string())
            .env("NIXL_CKPT_DIR", &dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the child's agent is up and its first save starts, then kill it.
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
                "child ended"
            );
        }
        let wait_us = nixl_core::random_u64().unwrap() % (save_us * 5 / 4);
        std::thread::sleep(Duration::from_micros(wait_us));
        child.kill().unwrap();
        child.wait().unwrap();
        let (res, got) = restore_small(&a, &dir, &LENS);
        match res {
            Ok(_) => {
                let g = std::iter::once(7)
                    .chain(gen0..gen0 + 10_000)
                    .find(|&g| got[0][..8] == pattern(g * 10, 8)[..])
                    .unwrap_or_else(|| panic!("round {round}: restored bytes are no generation"));
                for (i, &l) in LENS.iter().enumerate() {
                    assert!(
                        got[i] == pattern(g * 10 + i as u64, l),
                        "round {round}: region {i} mixes generations"
                    );
                }
                ops::verify(dir.to_str().unwrap(), None).unwrap();
                if g == 7 {
                    old += 1;
                } else {
                    new += 1;
                }
            }
            Err(CkptError::NoCheckpoint { .. }) if first => none += 1,
            Err(e) => panic!("round {round}: {e}"),
        }
        ops::remove(dir.to_str().unwrap()).unwrap();
        assert!(!dir.exists(), "remove left {}", dir.display());
    }
    eprintln!("24 kills: {old} restored the previous checkpoint, {new} a finished new one, {none} had none");
    assert!(
        old > 0 && none > 0,
        "no kill landed inside a save: the test did not test anything"
    );
}

#[test]
fn incremental_saves_write_only_changed_chunks_and_restore_on_their_own() {
    let a = agent();
    let lens = [1 << 20, 200_001];
    let mut bufs: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(40 + i as u64, l))
        .collect();
    let base = scratch("base");
    let full = save_small(&a, &base, &mut bufs, None);
    assert_eq!(full.written, full.bytes);
    // Change one byte in chunk 5 of r0 and the tail of r1.
    bufs[0][5 * (64 << 10) + 9] ^= 0xff;
    let last = bufs[1].len() - 1;
    bufs[1][last] ^= 0xff;
    let inc = scratch("inc");
    let rep = save_small(&a, &inc, &mut bufs, Some(&base));
    assert_eq!(
        rep.written,
        (64 << 10) + (200_001 % (64 << 10)) as u64,
        "{rep:?}"
    );
    assert_eq!(rep.reused, rep.chunks - 2);
    let (res, got) = restore_small(&a, &inc, &lens);
    res.unwrap();
    assert_eq!(got, bufs);
    // A flat copy restores without the base; the incremental one needs it, and says so.
    let flat = scratch("flat");
    std::fs::remove_dir(&flat).unwrap();
    ops::copy(inc.to_str().unwrap(), flat.to_str().unwrap(), None).unwrap();
    // The base is not removed while the incremental beside it reads from it: the error names
    // it, and nothing is removed. The flat copy does not depend on it.
    let bs = base.to_str().unwrap();
    assert_eq!(
        nixl_checkpoint::dependents(bs).unwrap(),
        [inc.display().to_string()]
    );
    assert!(nixl_checkpoint::dependents(inc.to_str().unwrap())
        .unwrap()
        .is_empty());
    match ops::remove(bs) {
        Err(CkptError::HasDependents { dependents, .. }) => {
            assert_eq!(dependents, [inc.display().to_string()])
        }
        r => panic!("the base of an incremental was removed: {r:?}"),
    }
    assert!(base.join("manifest.nckpt").exists());
    restore_small(&a, &inc, &lens).0.unwrap();
    // Forced, it goes; the incremental then fails naming its missing base.
    ops::remove_opts(bs, &ops::RemoveOptions { force: true }).unwrap();
    let e = restore_small(&a, &inc, &lens).0.unwrap_err().to_string();
    assert!(e.contains("\"r0\" chunk 0") && e.contains("missing"), "{e}");
    assert!(e.contains(&format!("belongs to {bs}, the base")), "{e}");
    let (res, got) = restore_small(&a, &flat, &lens);
    res.unwrap();
    assert_eq!(got, bufs);
    ops::remove(inc.to_str().unwrap()).unwrap();
    ops::remove(flat.to_str().unwrap()).unwrap();
}
