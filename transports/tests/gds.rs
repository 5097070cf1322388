//! VRAM ↔ FILE: through `gds` (cuFile) where GPUDirect Storage is present, and staged through
//! pinned host buffers over `uring` (the compatible path) where it is not.
//!
//! The GPU tests run only with `NIXL_TEST_CUDA=1` and otherwise print `SKIPPED <test>: <reason>`;
//! the cuFile tests also skip, with the backend's reason, where `gds` cannot run (no libcufile,
//! cuFileDriverOpen refused, or no nvidia-fs module for the default configuration). Files for
//! cuFile are opened with `O_DIRECT` in `NIXL_TEST_GDS_DIR` (default: the temp dir; cuFile
//! refuses tmpfs).
//!
//! ```text
//! NIXL_TEST_CUDA=1 cargo test -p nixl-transports --test gds -- --nocapture --test-threads=1
//! ```

mod common;
use common::{gpu, open_rw, pattern, unavailable};

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use nixl_core::*;
use nixl_transports::cuda::{CudaBackend, CudaConfig, LegacyBuffer, VmmBuffer};
use nixl_transports::gds::{GdsBackend, GdsConfig};
use nixl_transports::uring::{UringBackend, UringConfig};

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

/// A fresh directory for cuFile's files, on the disk under `NIXL_TEST_GDS_DIR` (cuFile refuses
/// tmpfs; by default the temp dir).
fn gds_dir(tag: &str) -> PathBuf {
    let dir = std::env::var_os("NIXL_TEST_GDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("nixl-gds-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Checks that the file [`round_trip`] wrote in `dir` and the VRAM it read back into (copied
/// out by `download`) both hold `want`, then removes `dir`.
fn check_round_trip(dir: PathBuf, want: &[u8], download: impl FnOnce(&mut [u8])) {
    assert!(
        std::fs::read(dir.join("kv.bin")).unwrap() == want,
        "file differs"
    );
    let mut back = vec![0u8; want.len()];
    download(&mut back);
    assert!(back == want, "VRAM read back differs");
    let _ = std::fs::remove_dir_all(dir);
}

/// WRITEs `src` (VRAM) to a file and READs it back into `dst` (VRAM), checking the file and
/// the bytes read back; returns the carrying backend and the stager.
fn round_trip(
    a: &Agent,
    src: Desc,
    dst: Desc,
    dir: &std::path::Path,
    direct: bool,
) -> (BackendName, Option<BackendName>) {
    let path = dir.join("kv.bin");
    let f = open_rw(&path, if direct { libc::O_DIRECT } else { 0 }).unwrap();
    let fd = f.as_raw_fd() as u64;
    let len = src.len;
    let _f = reg(a, MemKind::File, vec![Desc::new(0, len, fd)]);
    let file = list(MemKind::File, vec![Desc::new(0, len, fd)]);
    let run = |op, vram| {
        let x = a
            .create_xfer(
                op,
                &list(MemKind::Vram, vec![vram]),
                &file,
                a.name(),
                XferOptions::default(),
            )
            .unwrap();
        x.run_blocking().unwrap();
        (x.info().backend, x.info().staged)
    };
    let info = run(XferOp::Write, src);
    assert_eq!(run(XferOp::Read, dst), info);
    info
}

#[test]
fn without_the_libraries_gds_says_why() {
    let b = GdsBackend::new(GdsConfig::default());
    match b.probe().map_err(|e| e.to_string()) {
        Ok(()) => nixl_testkit::skip("gds can run here", true, &[]),
        Err(why) => assert!(
            why.contains("CUDA driver") || why.contains("libcufile"),
            "{why}"
        ),
    }
}

#[test]
fn gpu_vram_to_file_staged_over_uring() {
    if !gpu() {
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
    let got = round_trip(&a, src.desc(), dst.desc(), &dir, false);
    assert_eq!(got, (BackendName::Uring, Some(BackendName::Cuda)));
    check_round_trip(dir, &want, |back| dst.download(0, back).unwrap());
}

/// A round trip through cuFile with `cfg`; `None` (after printing the skip) where gds cannot
/// run with it.
fn cufile_round_trip(test: &str, cfg: GdsConfig) -> Option<()> {
    let gds = Arc::new(GdsBackend::new(cfg));
    if let Err(why) = gds.probe() {
        nixl_testkit::skip(format!("gds unavailable: {why}"), true, &[]);
        return None;
    }
    let built = Agent::builder("gds-direct")
        .backend(cuda())
        .backend(gds)
        .build()
        .unwrap();
    if let Some(why) = unavailable(&built, BackendName::Gds) {
        nixl_testkit::skip(format!("gds did not start: {why}"), true, &[]);
        return None;
    }
    let len = 8 << 20;
    let want = pattern(4, len);
    let src = LegacyBuffer::new(0, len).unwrap();
    let dst = VmmBuffer::new(0, len, false).unwrap();
    src.upload(0, &want).unwrap();
    let _m = reg(&built, MemKind::Vram, vec![src.desc(), dst.desc()]);
    let dir = gds_dir(test);
    // cuFile refuses some file systems at cuFileHandleRegister (a VM's virtio disk has no
    // volume attributes for it): a skip with cuFile's reason, not a failure of ours.
    {
        let probe = dir.join("probe.bin");
        let f = open_rw(&probe, libc::O_DIRECT).unwrap();
        let fd = f.as_raw_fd() as u64;
        let _f = reg(&built, MemKind::File, vec![Desc::new(0, 4096, fd)]);
        let r = built.create_xfer(
            XferOp::Write,
            &list(MemKind::Vram, vec![Desc::new(src.addr(), 4096, 0)]),
            &list(MemKind::File, vec![Desc::new(0, 4096, fd)]),
            built.name(),
            XferOptions::default(),
        );
        if let Err(e) = r {
            if e.to_string().contains("cuFileHandleRegister") {
                let why = format!("cuFile refuses files in {}: {e}", dir.display());
                nixl_testkit::skip(why, true, &[]);
                let _ = std::fs::remove_dir_all(dir);
                return None;
            }
            panic!("{e}");
        }
    }
    let got = round_trip(&built, src.desc(), dst.desc(), &dir, true);
    assert_eq!(got, (BackendName::Gds, None));
    check_round_trip(dir, &want, |back| dst.download(0, back).unwrap());
    Some(())
}

/// GPUDirect Storage proper: needs the nvidia-fs kernel module (else gds stands aside, and this
/// skips with that reason). The file is opened with `O_DIRECT`; `NIXL_TEST_GDS_DIR` names a
/// directory on a file system GDS supports (default: the temp dir).
#[test]
fn gpu_vram_to_file_through_cufile() {
    if !gpu() {
        return;
    }
    cufile_round_trip("gpu_vram_to_file_through_cufile", GdsConfig::default());
}

/// cuFile in compatibility mode (no nvidia-fs), asked for with `allow_compat_mode`.
#[test]
fn gpu_vram_to_file_through_cufile_compat_mode() {
    if !gpu() {
        return;
    }
    cufile_round_trip(
        "gpu_vram_to_file_through_cufile_compat_mode",
        GdsConfig {
            allow_compat_mode: true,
            ..GdsConfig::default()
        },
    );
}

/// With the default configuration the agent's choice for VRAM <-> FILE is visible: gds where
/// nvidia-fs is loaded, else the cuda stager over uring, never a silent failure.
#[test]
fn gpu_vram_to_file_takes_the_best_path_and_says_which() {
    if !gpu() {
        return;
    }
    let gds = Arc::new(GdsBackend::new(GdsConfig::default()));
    let gds_runs = gds.probe().is_ok();
    let a = Agent::builder("gds-choice")
        .backend(cuda())
        .backend(gds)
        .backend(Arc::new(UringBackend::new(UringConfig::default())))
        .build()
        .unwrap();
    let len = 1 << 20;
    let want = pattern(5, len);
    let src = LegacyBuffer::new(0, len).unwrap();
    let dst = LegacyBuffer::new(0, len).unwrap();
    src.upload(0, &want).unwrap();
    let _m = reg(&a, MemKind::Vram, vec![src.desc(), dst.desc()]);
    let dir = gds_dir("choice");
    let got = round_trip(&a, src.desc(), dst.desc(), &dir, gds_runs);
    let expect = if gds_runs {
        (BackendName::Gds, None)
    } else {
        (BackendName::Uring, Some(BackendName::Cuda))
    };
    assert_eq!(got, expect);
    check_round_trip(dir, &want, |back| dst.download(0, back).unwrap());
}
