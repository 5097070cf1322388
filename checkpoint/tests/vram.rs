//! VRAM regions: saved from device memory (through `gds`, or staged through host memory),
//! restored into the caller's device memory, into memory the library maps anywhere, and at the
//! recorded device addresses (CUDA VMM), every byte compared.
//!
//! The GPU tests run only with `NIXL_TEST_CUDA=1` (device 0), as the `cuda` backend's tests do,
//! and are run by `scripts/hw-smoke.sh`; without it they print `SKIPPED` with the reason. The
//! `gds` test also skips (visibly, with cuFile's reason) where the agent's `gds` backend cannot
//! run (no `libcufile.so.0`); its files go in `NIXL_TEST_GDS_DIR` (default: the temp dir; cuFile
//! refuses tmpfs). The other test runs everywhere: without a driver it checks the error, with one
//! the bytes.
//!
//! ```text
//! NIXL_TEST_CUDA=1 NIXL_TEST_GDS_DIR=/var/tmp \
//!     cargo test --release -p nixl-checkpoint --test vram -- --nocapture
//! ```

use std::path::PathBuf;

use nixl_checkpoint::manifest::Manifest;
use nixl_checkpoint::{
    ops, restore, restore_mapped, restore_report, save, CkptError, DataPath, Placement, Region,
    RestoreOptions, SaveOptions,
};
use nixl_core::{Agent, BackendName, Desc, MemKind};
use nixl_testkit::pattern::pattern;
use nixl_transports::config::Config;
use nixl_transports::cuda::{CudaBackend, CudaConfig, VmmBuffer};
use nixl_transports::gds::{GdsBackend, GdsConfig};

mod common;
use common::{assert_corrupt, register, scratch, FILE_BACKENDS};

/// Why the GPU test does not run: `NIXL_TEST_CUDA=1` says this host has a GPU.
fn no_gpu() -> Option<&'static str> {
    (std::env::var("NIXL_TEST_CUDA").as_deref() != Ok("1"))
        .then_some("NIXL_TEST_CUDA=1 not set (needs an NVIDIA GPU and driver)")
}

fn agent(cuda: bool) -> Agent {
    let cfg = Config::from_toml(FILE_BACKENDS).unwrap();
    let mut b = Agent::builder("ckpt-vram-test").backends(cfg.backends().unwrap());
    if cuda {
        b = b.backend(CudaBackend::new(CudaConfig {
            socket_dir: std::env::temp_dir().join(format!("nixl-ckpt-vram-{}", std::process::id())),
            ..CudaConfig::default()
        }));
    }
    b.build().unwrap()
}

fn download(buf: &VmmBuffer) -> Vec<u8> {
    let mut v = vec![0u8; buf.len()];
    buf.download(0, &mut v).unwrap();
    v
}

/// Reads back `len` bytes of device memory at `addr` on device 0 (memory the library mapped).
fn read_device(addr: u64, len: usize) -> Vec<u8> {
    let ctx = nixl_transports::cuda::device(0).unwrap();
    let mut v = vec![0u8; len];
    // SAFETY: `addr..addr+len` is a live VRAM region of a `Restored` held by the caller.
    unsafe { nixl_transports::cuda::download(&ctx, &mut v, addr) }.unwrap();
    v
}

#[test]
fn gpu_vram_regions_save_restore_and_recorded_addresses() {
    nixl_testkit::require!(hardware: no_gpu(), "NIXL_TEST_CUDA");
    let a = agent(true);
    let dir = scratch("gpu");
    let uri = dir.to_str().unwrap();
    let len = (5 << 20) + 123;
    let want = pattern(11, len);
    let src = VmmBuffer::new(0, len, false).unwrap();
    src.upload(0, &want).unwrap();
    let mut host = pattern(12, 70_001);
    let host_want = host.clone();
    let hd = Desc::from_mut_slice(&mut host);
    let src_reg = register(&a, MemKind::Vram, src.desc());
    let host_reg = register(&a, MemKind::Dram, hd);
    let regions = [
        Region::vram("kv", src.addr(), len as u64, 0),
        Region::dram("host", hd.addr, hd.len),
    ];
    // SAFETY: both regions are live and unchanged during the call.
    let rep = unsafe { save(&a, uri, &regions, &SaveOptions::default()) }.unwrap();
    let e = rep.manifest.region("kv").unwrap();
    assert_eq!(
        (e.kind, e.dev_id, e.addr, e.len),
        (MemKind::Vram, 0, src.addr(), len as u64)
    );
    ops::verify(uri, None).unwrap();

    // Into the caller's device memory.
    let dst = VmmBuffer::new(0, len, false).unwrap();
    dst.upload(0, &vec![0u8; len]).unwrap();
    let dst_reg = register(&a, MemKind::Vram, dst.desc());
    let kv = [Region::vram("kv", dst.addr(), len as u64, 0)];
    // SAFETY: `dst` is live and not referenced during the call.
    unsafe { restore(&a, uri, &kv, &RestoreOptions::default()) }.unwrap();
    assert!(download(&dst) == want, "restored VRAM differs");
    drop(dst_reg);

    // Anywhere, into memory the library maps.
    let r = restore_mapped(&a, uri, None, Placement::Anywhere).unwrap();
    let k = r.region("kv").unwrap();
    assert!(
        read_device(k.addr, len) == want,
        "VRAM restored anywhere differs"
    );
    drop(r);

    // At the recorded address: taken while `src` lives, then free.
    let e = restore_mapped(&a, uri, Some(&["kv"]), Placement::Recorded).unwrap_err();
    assert!(
        e.to_string().contains("taken") && e.to_string().contains("kv"),
        "{e}"
    );
    let recorded = src.addr();
    drop(src_reg);
    drop(src);
    drop(host_reg);
    let r = restore_mapped(&a, uri, Some(&["kv"]), Placement::Recorded).unwrap();
    let k = r.region("kv").unwrap();
    assert_eq!(k.addr, recorded);
    assert!(
        read_device(k.addr, len) == want,
        "VRAM restored in place differs"
    );
    drop(r);
    assert_eq!(host, host_want);

    // A flipped byte in the VRAM region's data is named.
    let m = ops::read_manifest(uri).unwrap();
    let c = m.region("kv").unwrap().chunks[1];
    let path = dir.join(&m.files[c.file as usize].name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[c.offset as usize + 7] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    match restore_mapped(&a, uri, Some(&["kv"]), Placement::Anywhere) {
        Err(CkptError::Corrupt { region, chunk, .. }) => {
            assert_eq!((region.as_str(), chunk), ("kv", Some(1)))
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// VRAM regions VRAM <-> FILE through `gds` (cuFile; compatibility mode allowed, so a host
/// without nvidia-fs runs it too): the aligned region goes through `gds`, the odd-sized one is
/// staged with the reason, both restore byte-exact, the checksums computed from the host bounce
/// match the bytes on disk (`verify`), a flipped byte is found before success, and a
/// destination outside the agent's registrations is staged.
#[test]
fn gpu_vram_regions_through_gds() {
    nixl_testkit::require!(hardware: no_gpu(), "NIXL_TEST_CUDA");
    let cfg = Config::from_toml("backends = [\"uring\", \"posix\"]").unwrap();
    let a = Agent::builder("ckpt-vram-gds")
        .backends(cfg.backends().unwrap())
        .backend(CudaBackend::new(CudaConfig {
            socket_dir: std::env::temp_dir().join(format!("nixl-ckpt-gds-{}", std::process::id())),
            ..CudaConfig::default()
        }))
        .backend(std::sync::Arc::new(GdsBackend::new(GdsConfig {
            allow_compat_mode: true,
            ..GdsConfig::default()
        })))
        .build()
        .unwrap();
    let why_not = a
        .check_backend(BackendName::Gds)
        .err()
        .map(|e| format!("the gds backend cannot run here: {e}"));
    nixl_testkit::require!(hardware: why_not);
    let dir = std::env::var_os("NIXL_TEST_GDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!(
            "nixl-ckpt-gds-{}-{:x}",
            std::process::id(),
            nixl_core::random_u64().unwrap()
        ));
    let uri = dir.to_str().unwrap();
    let (wlen, olen) = (9 << 20, (5 << 20) + 123);
    let (wwant, owant) = (pattern(21, wlen), pattern(22, olen));
    let w = VmmBuffer::new(0, wlen, false).unwrap();
    let o = VmmBuffer::new(0, olen, false).unwrap();
    w.upload(0, &wwant).unwrap();
    o.upload(0, &owant).unwrap();
    let _wr = register(&a, MemKind::Vram, w.desc());
    let _or = register(&a, MemKind::Vram, o.desc());
    let regions = [
        Region::vram("w", w.addr(), wlen as u64, 0),
        Region::vram("odd", o.addr(), olen as u64, 0),
    ];
    // SAFETY: both regions are live and unchanged during the call.
    let rep = unsafe { save(&a, uri, &regions, &SaveOptions::default()) }.unwrap();
    eprintln!("save paths: {:?}", rep.paths);
    assert_eq!(rep.paths[0], ("w".to_string(), DataPath::Gds));
    match &rep.paths[1] {
        (n, DataPath::Staged { reason }) if n == "odd" => {
            assert!(reason.contains("length"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The checksums (hashed from the host bounce) are those of the bytes gds wrote.
    ops::verify(uri, None).unwrap();

    let dw = VmmBuffer::new(0, wlen, false).unwrap();
    let dout = VmmBuffer::new(0, olen, false).unwrap();
    dw.upload(0, &vec![0u8; wlen]).unwrap();
    dout.upload(0, &vec![0u8; olen]).unwrap();
    let dw_reg = register(&a, MemKind::Vram, dw.desc());
    let into = [
        Region::vram("w", dw.addr(), wlen as u64, 0),
        Region::vram("odd", dout.addr(), olen as u64, 0),
    ];
    // SAFETY: the buffers are live and not referenced during the call.
    let rr = unsafe { restore_report(&a, uri, &into, &RestoreOptions::default()) }.unwrap();
    eprintln!("restore paths: {:?}", rr.paths);
    assert_eq!(rr.bytes, (wlen + olen) as u64);
    assert_eq!(rr.paths[0], ("w".to_string(), DataPath::Gds));
    match &rr.paths[1] {
        (n, DataPath::Staged { reason }) if n == "odd" => {
            assert!(reason.contains("registration"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(download(&dw) == wwant, "VRAM restored through gds differs");
    assert!(download(&dout) == owant, "staged VRAM differs");

    // A flipped byte in chunk 1 of the gds region is found before success.
    let m = ops::read_manifest(uri).unwrap();
    let c = m.region("w").unwrap().chunks[1];
    let path = dir.join(&m.files[c.file as usize].name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[c.offset as usize + 4097] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let one = [Region::vram("w", dw.addr(), wlen as u64, 0)];
    // SAFETY: as above.
    let e = unsafe { restore_report(&a, uri, &one, &RestoreOptions::default()) }.unwrap_err();
    assert_corrupt(&e, "w", 1, true, &[]);
    drop(dw_reg);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint whose manifest records a VRAM region: without a CUDA driver, restoring it says
/// why (naming the region); with one (`NIXL_TEST_CUDA=1`), it lands on the GPU, every byte
/// equal.
#[test]
fn vram_region_in_a_manifest_needs_the_driver() {
    let with_gpu = std::env::var("NIXL_TEST_CUDA").as_deref() == Ok("1");
    let a = agent(with_gpu);
    let dir = scratch("nodriver");
    let uri = dir.to_str().unwrap();
    let mut buf = pattern(5, 9000);
    let want = buf.clone();
    let d = Desc::from_mut_slice(&mut buf);
    let reg = register(&a, MemKind::Dram, d);
    // SAFETY: `buf` is live and unchanged during the call.
    let rep = unsafe {
        save(
            &a,
            uri,
            &[Region::dram("kv", d.addr, d.len)],
            &SaveOptions::default(),
        )
    }
    .unwrap();
    assert_eq!(rep.paths, vec![("kv".to_string(), DataPath::Host)]);
    drop(reg);
    // Rewrite the manifest as if the region had been on GPU 0 (the checksum is resealed).
    let mut m = ops::read_manifest(uri).unwrap();
    m.regions[0].kind = MemKind::Vram;
    std::fs::write(dir.join(ops::MANIFEST), m.encode()).unwrap();
    assert_eq!(
        Manifest::decode(&m.encode()).unwrap().regions[0].kind,
        MemKind::Vram
    );
    // A DRAM region cannot take a VRAM one.
    let mut other = vec![0u8; 9000];
    let od = Desc::from_mut_slice(&mut other);
    let oreg = register(&a, MemKind::Dram, od);
    // SAFETY: `other` is live and not referenced during the call.
    let e = unsafe {
        restore(
            &a,
            uri,
            &[Region::dram("kv", od.addr, od.len)],
            &RestoreOptions::default(),
        )
    }
    .unwrap_err();
    assert!(matches!(e, CkptError::Mismatch { .. }), "{e:?}");
    drop(oreg);
    match restore_mapped(&a, uri, None, Placement::Anywhere) {
        Ok(r) if with_gpu => {
            let k = r.region("kv").unwrap();
            assert!(read_device(k.addr, 9000) == want);
        }
        Err(CkptError::Unsupported(msg)) if !with_gpu => {
            eprintln!("without a driver: {msg}");
            assert!(
                msg.contains("\"kv\"") && msg.contains("CUDA driver"),
                "{msg}"
            );
        }
        other => panic!("with_gpu={with_gpu}: {other:?}"),
    }
    // A recorded device that is not there is a mismatch naming it (or, without a driver, the
    // driver's absence).
    m.regions[0].dev_id = 4000;
    std::fs::write(dir.join(ops::MANIFEST), m.encode()).unwrap();
    match restore_mapped(&a, uri, None, Placement::Recorded) {
        Err(CkptError::Mismatch { region, reason }) if with_gpu => {
            assert_eq!(region, "kv");
            assert!(reason.contains("GPU 4000"), "{reason}");
        }
        Err(CkptError::Unsupported(msg)) if !with_gpu => assert!(msg.contains("CUDA"), "{msg}"),
        other => panic!("with_gpu={with_gpu}: {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
