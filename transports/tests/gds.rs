//! VRAM ↔ FILE: through `gds` (cuFile) where GPUDirect Storage is present, and staged through
//! pinned host buffers over `uring` (the compatible path) where it is not.
//!
//! The GPU tests run only with `NIXL_TEST_CUDA=1` and otherwise print `SKIP: <test>: <reason>`;
//! the cuFile test also skips, with the backend's reason, where `gds` cannot run (no libcufile,
//! or cuFileDriverOpen refused).
//!
//! ```text
//! NIXL_TEST_CUDA=1 cargo test -p nixl-transports --test gds -- --nocapture --test-threads=1
//! ```

mod common;
use common::pattern;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use nixl_core::*;
use nixl_transports::cuda::{CudaBackend, CudaConfig, LegacyBuffer, VmmBuffer};
use nixl_transports::gds::{GdsBackend, GdsConfig};
use nixl_transports::uring::{UringBackend, UringConfig};

fn gpu(test: &str) -> bool {
    if std::env::var("NIXL_TEST_CUDA").as_deref() != Ok("1") {
        eprintln!("SKIP: {test}: NIXL_TEST_CUDA=1 not set (needs an NVIDIA GPU and driver)");
        return false;
    }
    true
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nixl-gds-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cuda() -> Arc<CudaBackend> {
    CudaBackend::new(CudaConfig {
        socket_dir: scratch("sock"),
        ..CudaConfig::default()
    })
}

fn list(kind: MemKind, d: Vec<Desc>) -> DescList {
    DescList::from_descs(kind, d).unwrap()
}

fn reg(a: &Agent, kind: MemKind, d: Vec<Desc>) -> Registration {
    // SAFETY: every buffer registered here outlives its registration (declared before it).
    unsafe { a.register(&list(kind, d)) }.unwrap()
}

/// WRITEs `src` (VRAM) to a file and READs it back into `dst` (VRAM), checking the file and
/// the bytes read back; returns the carrying backend and the stager.
fn round_trip(
    a: &Agent,
    src: Desc,
    dst: Desc,
    dir: &std::path::Path,
) -> (BackendName, Option<BackendName>) {
    let path = dir.join("kv.bin");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let fd = f.as_raw_fd() as u64;
    let len = src.len;
    let _f = reg(a, MemKind::File, vec![Desc::new(0, len, fd)]);
    let file = list(MemKind::File, vec![Desc::new(0, len, fd)]);
    let w = a
        .create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, vec![src]),
            &file,
            a.name(),
            XferOptions::default(),
        )
        .unwrap();
    w.run_blocking().unwrap();
    let r = a
        .create_xfer(
            XferOp::Read,
            &list(MemKind::Vram, vec![dst]),
            &file,
            a.name(),
            XferOptions::default(),
        )
        .unwrap();
    r.run_blocking().unwrap();
    let info = (w.info().backend, w.info().staged);
    assert_eq!((r.info().backend, r.info().staged), info);
    info
}

#[test]
fn without_the_libraries_gds_says_why() {
    let b = GdsBackend::new(GdsConfig::default());
    match b.probe() {
        Ok(()) => eprintln!("SKIP: without_the_libraries_gds_says_why: gds can run here"),
        Err(why) => assert!(
            why.contains("CUDA driver") || why.contains("libcufile"),
            "{why}"
        ),
    }
}

#[test]
fn gpu_vram_to_file_staged_over_uring() {
    if !gpu("gpu_vram_to_file_staged_over_uring") {
        return;
    }
    let a = Agent::builder("gds-staged")
        .backend(cuda())
        .backend(Arc::new(UringBackend::new(UringConfig::default())))
        .build()
        .unwrap();
    let len = (9 << 20) + 4096;
    let want = pattern(3, len);
    let src = VmmBuffer::new(0, len, false).unwrap();
    let dst = LegacyBuffer::new(0, len).unwrap();
    src.upload(0, &want).unwrap();
    let _m = reg(&a, MemKind::Vram, vec![src.desc(), dst.desc()]);
    let dir = scratch("staged");
    let got = round_trip(&a, src.desc(), dst.desc(), &dir);
    assert_eq!(got, (BackendName::Uring, Some(BackendName::Cuda)));
    assert!(
        std::fs::read(dir.join("kv.bin")).unwrap() == want,
        "file differs"
    );
    let mut back = vec![0u8; len];
    dst.download(0, &mut back).unwrap();
    assert!(back == want, "VRAM read back differs");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gpu_vram_to_file_through_cufile() {
    if !gpu("gpu_vram_to_file_through_cufile") {
        return;
    }
    let gds = Arc::new(GdsBackend::new(GdsConfig::default()));
    if let Err(why) = gds.probe() {
        eprintln!("SKIP: gpu_vram_to_file_through_cufile: gds unavailable: {why}");
        return;
    }
    let built = Agent::builder("gds-direct")
        .backend(cuda())
        .backend(gds)
        .build()
        .unwrap();
    let st = built
        .backends()
        .iter()
        .find(|s| s.name == BackendName::Gds)
        .unwrap()
        .unavailable
        .clone();
    if let Some(why) = st {
        eprintln!("SKIP: gpu_vram_to_file_through_cufile: gds did not start: {why}");
        return;
    }
    let len = 8 << 20;
    let want = pattern(4, len);
    let src = LegacyBuffer::new(0, len).unwrap();
    let dst = VmmBuffer::new(0, len, false).unwrap();
    src.upload(0, &want).unwrap();
    let _m = reg(&built, MemKind::Vram, vec![src.desc(), dst.desc()]);
    let dir = scratch("cufile");
    let got = round_trip(&built, src.desc(), dst.desc(), &dir);
    assert_eq!(got, (BackendName::Gds, None));
    assert!(
        std::fs::read(dir.join("kv.bin")).unwrap() == want,
        "file differs"
    );
    let mut back = vec![0u8; len];
    dst.download(0, &mut back).unwrap();
    assert!(back == want, "VRAM read back differs");
    let _ = std::fs::remove_dir_all(dir);
}
