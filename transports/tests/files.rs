//! The file backends (`uring` and `posix`, each test run for both) against real files:
//! byte-exact round trips (one descriptor, thousands of odd ones, several files in one request),
//! and faults: short files, files truncated under the agent, a full file system (a 1 MiB tmpfs),
//! read-only files, bad fds, deregistered regions, O_DIRECT misalignment, cancellation and
//! shutdown. And the fallback: with io_uring unavailable, files go through `posix`, visibly.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use nixl_core::{
    Agent, BackendName, Desc, DescList, MemKind, Registration, XferOp, XferOptions, XferStatus,
};
use nixl_transports::config::Config;

mod common;
use common::{pattern, unavailable};

fn agent(b: BackendName, extra: &str) -> Agent {
    let cfg = Config::from_toml(&format!("backends = [\"local\", \"{b}\"]\n{extra}")).unwrap();
    let name = "store";
    Agent::builder(name)
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nixl-posix-{tag}-{}-{}",
        std::process::id(),
        nixl_core::random_u64().unwrap()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rw(path: &std::path::Path) -> File {
    common::open_rw(path, 0).unwrap()
}

fn reg(a: &Agent, kind: MemKind, descs: Vec<Desc>) -> Registration {
    let list = DescList::from_descs(kind, descs).unwrap();
    // SAFETY: DRAM descriptors name test buffers that outlive the registration; FILE ones
    // carry no memory contract.
    unsafe { a.register(&list) }.unwrap()
}

fn file_desc(f: &File, off: u64, len: u64) -> Desc {
    Desc::new(off, len, f.as_raw_fd() as u64)
}

fn run(a: &Agent, b: BackendName, op: XferOp, mem: Vec<Desc>, file: Vec<Desc>) -> XferStatus {
    let req = a
        .create_xfer(
            op,
            &DescList::from_descs(MemKind::Dram, mem).unwrap(),
            &DescList::from_descs(MemKind::File, file).unwrap(),
            a.name(),
            XferOptions::default(),
        )
        .unwrap();
    assert_eq!(req.backend(), b, "{}", req.info().reason);
    req.post().unwrap();
    req.wait_blocking(Some(Duration::from_secs(60)))
}

fn one_large_descriptor_round_trips_byte_exact(b: BackendName) {
    let a = agent(b, &format!("[{b}]\nmax_io_bytes = 1048576"));
    let dir = scratch("large");
    let f = rw(&dir.join("kv.bin"));
    let n = (24 << 20) + 333; // odd tail, 25 operations of at most 1 MiB
    let src = pattern(7, n);
    let mut dst = vec![0u8; n];
    let _m = reg(
        &a,
        MemKind::Dram,
        vec![Desc::from_slice(&src), Desc::from_mut_slice(&mut dst)],
    );
    let _f = reg(&a, MemKind::File, vec![file_desc(&f, 4096, n as u64)]);
    let st = run(
        &a,
        b,
        XferOp::Write,
        vec![Desc::from_slice(&src)],
        vec![file_desc(&f, 4096, n as u64)],
    );
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    let on_disk = std::fs::read(dir.join("kv.bin")).unwrap();
    assert_eq!(on_disk.len(), 4096 + n);
    assert!(
        on_disk[4096..] == src[..],
        "file differs from what was written"
    );
    let st = run(
        &a,
        b,
        XferOp::Read,
        vec![Desc::from_mut_slice(&mut dst)],
        vec![file_desc(&f, 4096, n as u64)],
    );
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    assert!(dst == src, "read back differs");
    let _ = std::fs::remove_dir_all(dir);
}

fn thousands_of_odd_descriptors_over_two_files(b: BackendName) {
    let a = agent(b, "");
    let dir = scratch("many");
    let (f1, f2) = (rw(&dir.join("a")), rw(&dir.join("b")));
    let mut rng = pattern(99, 8192).into_iter().cycle();
    let mut next = move || u64::from(rng.next().unwrap());
    let src = pattern(3, 16 << 20);
    let mut dst = vec![0u8; 16 << 20];
    let _m = reg(
        &a,
        MemKind::Dram,
        vec![Desc::from_slice(&src), Desc::from_mut_slice(&mut dst)],
    );
    let _f = reg(
        &a,
        MemKind::File,
        vec![file_desc(&f1, 0, 64 << 20), file_desc(&f2, 0, 64 << 20)],
    );
    // 3000 pieces: odd lengths, gaps in the file, memory taken out of order; some adjacent
    // in the file so they merge into one preadv/pwritev.
    let (mut mem, mut back, mut file) = (Vec::new(), Vec::new(), Vec::new());
    let (mut off1, mut off2) = (0u64, 0u64);
    let mut used = 0u64;
    for i in 0..3000u64 {
        let len = 1 + next() * 17 + next() % 13;
        let m = (i * 7919 % 3000) * 5000;
        assert!(m + len <= src.len() as u64);
        let gap = if next() % 3 == 0 { 0 } else { next() };
        let (f, off) = if i % 2 == 0 {
            off1 += gap;
            let o = off1;
            off1 += len;
            (&f1, o)
        } else {
            off2 += gap;
            let o = off2;
            off2 += len;
            (&f2, o)
        };
        mem.push(Desc::new(src.as_ptr() as u64 + m, len, 0));
        back.push(Desc::new(dst.as_mut_ptr() as u64 + m, len, 0));
        file.push(file_desc(f, off, len));
        used += len;
    }
    assert!(used > 1 << 20);
    let st = run(&a, b, XferOp::Write, mem.clone(), file.clone());
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    let st = run(&a, b, XferOp::Read, back.clone(), file.clone());
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    let (d1, d2) = (
        std::fs::read(dir.join("a")).unwrap(),
        std::fs::read(dir.join("b")).unwrap(),
    );
    for (i, ((m, b), fd)) in mem.iter().zip(&back).zip(&file).enumerate() {
        let s = (m.addr - src.as_ptr() as u64) as usize;
        let want = &src[s..s + m.len as usize];
        let d = (b.addr - dst.as_ptr() as u64) as usize;
        assert!(
            &dst[d..d + b.len as usize] == want,
            "piece {i} read back wrong"
        );
        let disk = if fd.dev_id == f1.as_raw_fd() as u64 {
            &d1
        } else {
            &d2
        };
        let o = fd.addr as usize;
        assert!(
            &disk[o..o + fd.len as usize] == want,
            "piece {i} on disk wrong"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn short_and_truncated_files_fail_the_read_with_the_offset(b: BackendName) {
    let a = agent(b, "");
    let dir = scratch("short");
    let f = rw(&dir.join("short"));
    f.set_len(100 << 10).unwrap();
    let mut dst = vec![0u8; 1 << 20];
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut dst)]);
    let _f = reg(&a, MemKind::File, vec![file_desc(&f, 0, 1 << 20)]);
    let st = run(
        &a,
        b,
        XferOp::Read,
        vec![Desc::from_mut_slice(&mut dst)],
        vec![file_desc(&f, 0, 1 << 20)],
    );
    match st {
        XferStatus::Failed(e) => {
            let e = e.to_string();
            assert!(e.contains("short read") && e.contains("102400"), "{e}");
        }
        other => panic!("a read past the end of the file ended {other:?}"),
    }
    // Full length first, then truncated under the agent: the same request fails.
    f.set_len(1 << 20).unwrap();
    let req = a
        .create_xfer(
            XferOp::Read,
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut dst)]).unwrap(),
            &DescList::from_descs(MemKind::File, vec![file_desc(&f, 0, 1 << 20)]).unwrap(),
            "store",
            XferOptions::default(),
        )
        .unwrap();
    req.run_blocking().unwrap();
    f.set_len(4096).unwrap();
    req.post().unwrap();
    let st = req.wait_blocking(Some(Duration::from_secs(30)));
    assert!(matches!(st, XferStatus::Failed(_)), "{st:?}");
    let _ = std::fs::remove_dir_all(dir);
}

fn a_full_file_system_fails_the_write(b: BackendName) {
    let dir = scratch("full");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "nixl-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = std::fs::remove_dir_all(dir);
        nixl_testkit::skip("cannot mount a 1 MiB tmpfs (needs root)", false, &[]);
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let a = agent(b, "");
        let f = rw(&mnt.join("big"));
        let src = pattern(5, 4 << 20);
        let _m = reg(&a, MemKind::Dram, vec![Desc::from_slice(&src)]);
        let _f = reg(&a, MemKind::File, vec![file_desc(&f, 0, 4 << 20)]);
        let st = run(
            &a,
            b,
            XferOp::Write,
            vec![Desc::from_slice(&src)],
            vec![file_desc(&f, 0, 4 << 20)],
        );
        match st {
            XferStatus::Failed(e) => {
                let e = e.to_string();
                assert!(e.contains("No space left"), "{e}");
            }
            other => panic!("4 MiB into a 1 MiB file system ended {other:?}"),
        }
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(dir);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

fn bad_registrations_and_requests_are_refused_before_any_io(b: BackendName) {
    let a = agent(b, "");
    let dir = scratch("bad");
    let path = dir.join("ro");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let ro = File::open(&path).unwrap();
    let mut buf = vec![0u8; 8192];
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
    // Not an fd, and not a file.
    let bad = DescList::from_descs(MemKind::File, vec![Desc::new(0, 10, 999_999)]).unwrap();
    // SAFETY: FILE descriptors carry no memory contract.
    let e = unsafe { a.register(&bad) }.unwrap_err().to_string();
    assert!(e.contains("not an open file descriptor"), "{e}");
    let _f = reg(&a, MemKind::File, vec![file_desc(&ro, 0, 8192)]);
    let mk = |op, off: u64, len: u64| {
        a.create_xfer(
            op,
            &DescList::from_descs(MemKind::Dram, vec![Desc::new(buf.as_ptr() as u64, len, 0)])
                .unwrap(),
            &DescList::from_descs(MemKind::File, vec![file_desc(&ro, off, len)]).unwrap(),
            "store",
            XferOptions::default(),
        )
    };
    let e = mk(XferOp::Write, 0, 4096).unwrap_err().to_string();
    assert!(e.contains("not open for writing"), "{e}");
    // Outside the file's registration.
    let e = mk(XferOp::Read, 4096, 8192).unwrap_err().to_string();
    assert!(e.contains("not inside a region"), "{e}");
    // A READ is fine; after deregistration the prepared request is refused on post.
    let req = mk(XferOp::Read, 0, 8192).unwrap();
    req.run_blocking().unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    a.deregister(MemKind::File, &[file_desc(&ro, 0, 8192)])
        .unwrap();
    req.post().unwrap();
    let st = req.wait_blocking(Some(Duration::from_secs(5)));
    match st {
        XferStatus::Failed(e) => assert!(e.to_string().contains("deregistered"), "{e}"),
        other => panic!("post into a deregistered file region ended {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn cancel_and_shutdown_end_requests_and_let_go_of_memory(b: BackendName) {
    let a = agent(b, &format!("[{b}]\nmax_io_bytes = 65536"));
    let dir = scratch("cancel");
    let f = rw(&dir.join("c"));
    let src = pattern(1, 64 << 20);
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_slice(&src)]);
    let _f = reg(&a, MemKind::File, vec![file_desc(&f, 0, 64 << 20)]);
    let req = a
        .create_xfer(
            XferOp::Write,
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&src)]).unwrap(),
            &DescList::from_descs(MemKind::File, vec![file_desc(&f, 0, 64 << 20)]).unwrap(),
            "store",
            XferOptions::default(),
        )
        .unwrap();
    req.post().unwrap();
    req.release(); // cancels, then waits until no worker holds the request
    assert!(matches!(
        req.status(),
        XferStatus::Cancelled | XferStatus::Done
    ));
    assert!(!req.is_held());
    // Shutdown with a post in flight: it ends (Cancelled, or Done if the I/O won).
    req.post().unwrap();
    a.shutdown();
    let st = req.wait_blocking(Some(Duration::from_secs(30)));
    assert!(
        matches!(st, XferStatus::Cancelled | XferStatus::Done),
        "{st:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn direct_io_round_trips_aligned_and_refuses_misaligned(b: BackendName) {
    let a = agent(b, "");
    let dir = scratch("direct");
    let f = match common::open_rw(&dir.join("d"), libc::O_DIRECT) {
        Ok(f) => f,
        Err(e) => {
            // A property of the file system under the temp dir, not something CI installs.
            let why = format!("O_DIRECT not supported under {}: {e}", dir.display());
            let _ = std::fs::remove_dir_all(dir);
            nixl_testkit::skip(why, true, &[]);
            return;
        }
    };
    let n = 4 << 20;
    let mut src = vec![0u8; n + 8192];
    let mut dst = vec![0u8; n + 8192];
    let al = |v: &mut Vec<u8>| {
        let p = v.as_ptr() as usize;
        (4096 - p % 4096) % 4096
    };
    let (so, doff) = (al(&mut src), al(&mut dst));
    src[so..so + n].copy_from_slice(&pattern(11, n));
    let _m = reg(
        &a,
        MemKind::Dram,
        vec![Desc::from_slice(&src), Desc::from_mut_slice(&mut dst)],
    );
    let _f = reg(&a, MemKind::File, vec![file_desc(&f, 0, n as u64)]);
    let s = Desc::new(src.as_ptr() as u64 + so as u64, n as u64, 0);
    let d = Desc::new(dst.as_ptr() as u64 + doff as u64, n as u64, 0);
    let st = run(
        &a,
        b,
        XferOp::Write,
        vec![s],
        vec![file_desc(&f, 0, n as u64)],
    );
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    let st = run(
        &a,
        b,
        XferOp::Read,
        vec![d],
        vec![file_desc(&f, 0, n as u64)],
    );
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    assert!(dst[doff..doff + n] == src[so..so + n]);
    // Memory one byte off, and a length that is not a multiple of the block.
    for (mem, file, want) in [
        (
            Desc::new(s.addr + 1, 4096, 0),
            file_desc(&f, 0, 4096),
            "memory aligned",
        ),
        (
            Desc::new(s.addr, 100, 0),
            file_desc(&f, 0, 100),
            "offsets and lengths in multiples",
        ),
    ] {
        let e = a
            .create_xfer(
                XferOp::Write,
                &DescList::from_descs(MemKind::Dram, vec![mem]).unwrap(),
                &DescList::from_descs(MemKind::File, vec![file]).unwrap(),
                "store",
                XferOptions {
                    backend: Some(b),
                    ..Default::default()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("descriptor 0") && e.contains(want), "{e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

macro_rules! for_both_backends {
    ($($t:ident),* $(,)?) => {
        mod uring {
            $(#[test]
            fn $t() {
                super::$t(super::BackendName::Uring)
            })*
        }
        mod posix {
            $(#[test]
            fn $t() {
                super::$t(super::BackendName::Posix)
            })*
        }
    };
}

for_both_backends!(
    one_large_descriptor_round_trips_byte_exact,
    thousands_of_odd_descriptors_over_two_files,
    short_and_truncated_files_fail_the_read_with_the_offset,
    a_full_file_system_fails_the_write,
    bad_registrations_and_requests_are_refused_before_any_io,
    cancel_and_shutdown_end_requests_and_let_go_of_memory,
    direct_io_round_trips_aligned_and_refuses_misaligned,
);

#[test]
fn without_io_uring_files_go_through_posix_and_the_request_says_why() {
    let cfg =
        Config::from_toml("backends = [\"local\", \"uring\", \"posix\"]\n[uring]\nenabled = false")
            .unwrap();
    let a = Agent::builder("store")
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap();
    let why = unavailable(&a, BackendName::Uring).unwrap_or_default();
    assert!(why.contains("enabled = false"), "{why}");
    let dir = scratch("fallback");
    let f = rw(&dir.join("f"));
    let src = pattern(2, 1 << 20);
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_slice(&src)]);
    let _f = reg(&a, MemKind::File, vec![file_desc(&f, 0, 1 << 20)]);
    let st = run(
        &a,
        BackendName::Posix,
        XferOp::Write,
        vec![Desc::from_slice(&src)],
        vec![file_desc(&f, 0, 1 << 20)],
    );
    assert!(matches!(st, XferStatus::Done), "{st:?}");
    // Forcing uring says why it cannot run.
    let e = a
        .create_xfer(
            XferOp::Write,
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&src)]).unwrap(),
            &DescList::from_descs(MemKind::File, vec![file_desc(&f, 0, 1 << 20)]).unwrap(),
            "store",
            XferOptions {
                backend: Some(BackendName::Uring),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("enabled = false"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn with_io_uring_files_go_through_uring_by_default() {
    let a = Agent::builder("store")
        .backends(nixl_transports::default_backends())
        .build()
        .unwrap();
    let dir = scratch("default");
    let f = rw(&dir.join("f"));
    let src = pattern(2, 1 << 20);
    let _m = reg(&a, MemKind::Dram, vec![Desc::from_slice(&src)]);
    let _f = reg(&a, MemKind::File, vec![file_desc(&f, 0, 1 << 20)]);
    let req = a
        .create_xfer(
            XferOp::Write,
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&src)]).unwrap(),
            &DescList::from_descs(MemKind::File, vec![file_desc(&f, 0, 1 << 20)]).unwrap(),
            "store",
            XferOptions::default(),
        )
        .unwrap();
    let uring_runs = unavailable(&a, BackendName::Uring).is_none();
    if uring_runs {
        assert_eq!(req.backend(), BackendName::Uring, "{}", req.info().reason);
    } else {
        println!("SKIP: io_uring unavailable here; posix served the request");
        assert_eq!(req.backend(), BackendName::Posix);
    }
    req.run_blocking().unwrap();
    assert!(std::fs::read(dir.join("f")).unwrap() == src);
    let _ = std::fs::remove_dir_all(dir);
}

fn uring_agent(
    cfg: nixl_transports::uring::UringConfig,
) -> (Agent, std::sync::Arc<nixl_transports::uring::UringBackend>) {
    let u = std::sync::Arc::new(nixl_transports::uring::UringBackend::new(cfg));
    let a = Agent::builder("store").backend(u.clone()).build().unwrap();
    (a, u)
}

#[test]
fn uring_uses_registered_buffers_and_fixed_files_where_they_fit() {
    use nixl_transports::uring::UringConfig;
    let dir = scratch("fixed");
    let n = 4 << 20;
    let src = pattern(11, n);
    let round_trip = |cfg: UringConfig, name: &str| {
        let (a, u) = uring_agent(cfg);
        let f = rw(&dir.join(name));
        let mut dst = vec![0u8; n];
        let m = reg(
            &a,
            MemKind::Dram,
            vec![Desc::from_slice(&src), Desc::from_mut_slice(&mut dst)],
        );
        let fr = reg(&a, MemKind::File, vec![file_desc(&f, 0, n as u64)]);
        for (op, mem) in [
            (XferOp::Write, Desc::from_slice(&src)),
            (XferOp::Read, Desc::from_mut_slice(&mut dst)),
        ] {
            let st = run(
                &a,
                BackendName::Uring,
                op,
                vec![mem],
                vec![file_desc(&f, 0, n as u64)],
            );
            assert!(matches!(st, XferStatus::Done), "{st:?}");
        }
        drop((fr, m));
        assert!(dst == src, "read back differs");
        u.op_counts()
    };
    // Defaults: every 1 MiB operation names a fixed file and a registered buffer.
    let c = round_trip(UringConfig::default(), "a");
    assert_eq!(c.ops, 8, "{c:?}");
    assert_eq!((c.fixed_file_ops, c.fixed_buffer_ops), (8, 8), "{c:?}");
    // Tables off: the same bytes by fd number and mapped per operation.
    let off = UringConfig {
        fixed_files: 0,
        fixed_buffers: 0,
        ..UringConfig::default()
    };
    let c = round_trip(off, "b");
    assert_eq!(
        (c.ops, c.fixed_file_ops, c.fixed_buffer_ops),
        (8, 0, 0),
        "{c:?}"
    );
    // Registrations larger than max_fixed_buffer map per operation; fds are still fixed.
    let big = UringConfig {
        max_fixed_buffer: 1 << 20,
        ..UringConfig::default()
    };
    let c = round_trip(big, "c");
    assert_eq!(
        (c.ops, c.fixed_file_ops, c.fixed_buffer_ops),
        (8, 8, 0),
        "{c:?}"
    );
    // A one-entry table is reused as regions come and go.
    let tiny = UringConfig {
        fixed_files: 1,
        fixed_buffers: 1,
        ..UringConfig::default()
    };
    let (a, u) = uring_agent(tiny);
    let f = rw(&dir.join("d"));
    for round in 0..5u64 {
        let mut buf = pattern(round, 1 << 20);
        let want = buf.clone();
        let m = reg(&a, MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]);
        let fr = reg(&a, MemKind::File, vec![file_desc(&f, 0, 1 << 20)]);
        let st = run(
            &a,
            BackendName::Uring,
            XferOp::Write,
            vec![Desc::from_slice(&buf)],
            vec![file_desc(&f, 0, 1 << 20)],
        );
        assert!(matches!(st, XferStatus::Done), "{st:?}");
        drop((fr, m));
        assert!(
            std::fs::read(dir.join("d")).unwrap() == want,
            "round {round}"
        );
    }
    let c = u.op_counts();
    assert_eq!(
        (c.ops, c.fixed_file_ops, c.fixed_buffer_ops),
        (5, 5, 5),
        "{c:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A loop device over a scratch file (root only), detached on drop.
struct LoopDev {
    dev: String,
    backing: PathBuf,
}

impl LoopDev {
    /// `Err` is why there is none (not root, no loop driver, no losetup).
    fn new(bytes: u64) -> Result<LoopDev, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root for losetup".into());
        }
        let dir = scratch("loop");
        let backing = dir.join("disk.img");
        let f = rw(&backing);
        f.set_len(bytes).map_err(|e| e.to_string())?;
        drop(f);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDev {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            backing,
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
        if let Some(d) = self.backing.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A page-aligned heap buffer (for `O_DIRECT`).
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero size with a valid alignment.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes we own, initialised by alloc_zeroed or writes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn desc(&self, off: usize, len: usize) -> Desc {
        Desc::new(self.ptr as u64 + off as u64, len as u64, 0)
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// BLOCK memory: a raw block device (here a loop device) opened with `O_DIRECT`, regions
/// `(offset, len, fd)` inside it, through `uring` and `posix`: byte-exact round trips that land
/// on the device (read back through the backing file), and refusals with reasons for a region
/// past the device's end, a regular file registered as BLOCK, and misaligned offsets.
/// Skips visibly without root or a loop driver, unless `NIXL_REQUIRE_LOOP=1` or
/// `NIXL_REQUIRE_ALL=1` (set by CI).
#[test]
fn block_devices_through_uring_and_posix() {
    let dev = match LoopDev::new(16 << 20) {
        Ok(d) => d,
        Err(why) => {
            nixl_testkit::skip(why, false, &["NIXL_REQUIRE_LOOP"]);
            return;
        }
    };
    use std::os::unix::fs::OpenOptionsExt;
    let bdev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev.dev)
        .unwrap();
    let fd = bdev.as_raw_fd() as u64;
    for (i, b) in [BackendName::Uring, BackendName::Posix]
        .into_iter()
        .enumerate()
    {
        let a = agent(b, "");
        let len = 1 << 20;
        let mut src = Aligned::new(len);
        src.bytes_mut()
            .copy_from_slice(&pattern(11 + i as u64, len));
        let dst = Aligned::new(len);
        let _m = reg(&a, MemKind::Dram, vec![src.desc(0, len), dst.desc(0, len)]);
        let _d = reg(&a, MemKind::Block, vec![Desc::new(0, 16 << 20, fd)]);
        let at = (3 << 20) + 4096 * (1 + i as u64);
        let block = |off: u64, n: usize| {
            DescList::from_descs(MemKind::Block, vec![Desc::new(off, n as u64, fd)]).unwrap()
        };
        let dram = |d: Desc| DescList::from_descs(MemKind::Dram, vec![d]).unwrap();
        for (op, mem) in [
            (XferOp::Write, src.desc(0, len)),
            (XferOp::Read, dst.desc(0, len)),
        ] {
            let req = a
                .create_xfer(
                    op,
                    &dram(mem),
                    &block(at, len),
                    a.name(),
                    Default::default(),
                )
                .unwrap();
            assert_eq!(req.backend(), b, "{}", req.info().reason);
            req.run_blocking().unwrap();
        }
        assert!(dst.bytes() == src.bytes(), "{b}: BLOCK read back differs");
        // The bytes are on the device: the backing file holds them at the same offset.
        let disk = std::fs::read(&dev.backing).unwrap();
        assert!(
            disk[at as usize..at as usize + len] == *src.bytes(),
            "{b}: the backing file differs"
        );
        // Misaligned for O_DIRECT: refused at creation, naming the alignment.
        let e = a
            .create_xfer(
                XferOp::Read,
                &dram(dst.desc(0, 4096)),
                &block(at + 100, 4096),
                a.name(),
                Default::default(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("O_DIRECT, which needs"), "{b}: {e}");
    }
    // A region past the device's end, and a regular file named as BLOCK: refused with reasons.
    let a = agent(BackendName::Uring, "");
    let list =
        DescList::from_descs(MemKind::Block, vec![Desc::new(8 << 20, 16 << 20, fd)]).unwrap();
    // SAFETY: BLOCK descriptors carry no memory contract.
    let e = unsafe { a.register(&list) }.unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    let dir = scratch("notblock");
    let f = rw(&dir.join("plain"));
    f.set_len(1 << 20).unwrap();
    let list = DescList::from_descs(MemKind::Block, vec![file_desc(&f, 0, 4096)]).unwrap();
    // SAFETY: as above.
    let e = unsafe { a.register(&list) }.unwrap_err();
    assert!(e.to_string().contains("not an open block device"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
