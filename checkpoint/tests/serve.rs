//! A checkpoint served from a peer's memory (`nixl-ckpt serve`, another process) and restored
//! from `nixl://HOST:PORT` over tcp: into the caller's regions, into mapped memory, and the
//! errors for a peer that is not there or serves no checkpoint.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use nixl_checkpoint::{
    ops, read_manifest_with, restore, restore_mapped, save, CkptError, Placement, Region,
    RestoreOptions, SaveOptions,
};
use nixl_core::{Agent, Desc, MemKind, Registration};
use nixl_testkit::pattern::pattern;

mod common;
use common::{agent_with, assert_corrupt, numbered_regions, scratch_path, FILE_BACKENDS};

fn agent(toml: &str) -> Agent {
    agent_with(
        &format!("ckpt-serve-test-{:x}", nixl_core::random_u64().unwrap()),
        toml,
    )
}

fn register(a: &Agent, d: Desc) -> Registration {
    common::register(a, MemKind::Dram, d)
}

/// Kills the serving process when the test ends, passing or not.
struct Server(Child);

impl Server {
    /// Starts `nixl-ckpt serve ... --json` and reads the JSON line it prints first.
    fn start(mut cmd: Command) -> (Server, serde_json::Value) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        (Server(child), v)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn restore_from_a_peer_serving_the_checkpoint_over_tcp() {
    let dir = scratch_path("serve");
    let uri = dir.to_str().unwrap();
    // 21 chunks of 1 MiB in r0: the restore goes in more requests than it keeps in flight.
    let sizes = [(20 << 20) + 17, 4096, 777];
    let want = save_sample(&dir, &sizes, 3);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"));
    cmd.args(["serve", uri, "--json", "--quiet"]);
    let (_server, v) = Server::start(cmd);
    let peer = v["uri"].as_str().unwrap().to_owned();
    assert!(peer.starts_with("nixl://127.0.0.1:"), "{peer}");

    let a = agent("backends = [\"tcp\", \"posix\"]");
    assert_eq!(
        read_manifest_with(&a, &peer).unwrap(),
        ops::read_manifest(uri).unwrap()
    );

    // Into the caller's registered regions (two of the three: a partial restore).
    let mut got: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let descs: Vec<Desc> = got.iter_mut().map(|b| Desc::from_mut_slice(b)).collect();
    let regs: Vec<_> = descs.iter().map(|d| register(&a, *d)).collect();
    let asked = [
        Region::dram("r0", descs[0].addr, descs[0].len),
        Region::dram("r2", descs[2].addr, descs[2].len),
    ];
    // SAFETY: the buffers are live and not referenced during the call.
    let n = unsafe { restore(&a, &peer, &asked, &RestoreOptions::default()) }.unwrap();
    assert_eq!(n, (sizes[0] + sizes[2]) as u64);
    drop(regs);
    assert!(got[0] == want[0] && got[2] == want[2], "bytes differ");
    assert!(got[1].iter().all(|&b| b == 0), "r1 was not asked for");

    // Into memory the library maps.
    let r = restore_mapped(&a, &peer, None, Placement::Anywhere).unwrap();
    for (i, w) in want.iter().enumerate() {
        let x = r.region(&format!("r{i}")).unwrap();
        // SAFETY: the region is mapped and written by the restore, which has returned.
        let b = unsafe { std::slice::from_raw_parts(x.addr as usize as *const u8, x.len as usize) };
        assert!(b == w.as_slice(), "r{i} differs");
    }
    drop(r);

    // A length that does not match is refused before anything is read.
    let mut small = vec![0u8; 100];
    let d = Desc::from_mut_slice(&mut small);
    let _reg = register(&a, d);
    // SAFETY: as above.
    let e = unsafe {
        restore(
            &a,
            &peer,
            &[Region::dram("r1", d.addr, d.len)],
            &RestoreOptions::default(),
        )
    }
    .unwrap_err();
    assert!(matches!(e, CkptError::Mismatch { .. }), "{e:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Saves `sizes` regions `r<i>` of `pattern(seed + i, n)` to `dir` in chunks of 1 MiB; returns
/// their bytes.
fn save_sample(dir: &std::path::Path, sizes: &[usize], seed: u64) -> Vec<Vec<u8>> {
    save_sample_with(dir, sizes, seed, None)
}

/// [`save_sample`] with the caller's JSON `metadata`.
fn save_sample_with(
    dir: &std::path::Path,
    sizes: &[usize],
    seed: u64,
    metadata: Option<&str>,
) -> Vec<Vec<u8>> {
    let want: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(seed + i as u64, n))
        .collect();
    let a = agent(FILE_BACKENDS);
    let mut bufs = want.clone();
    let (regions, _r) = numbered_regions(&a, &mut bufs);
    let opts = SaveOptions {
        chunk_size: 1 << 20,
        metadata: metadata.map(str::to_owned),
        ..SaveOptions::default()
    };
    // SAFETY: the buffers are live and unchanged during the call.
    unsafe { save(&a, dir.to_str().unwrap(), &regions, &opts) }.unwrap();
    want
}

/// One `nixl-ckpt serve` process serves two checkpoints, each restored by its name
/// (`nixl://HOST:PORT/NAME`); without a name the restorer is refused with both names listed,
/// and an unknown name is "no checkpoint" listing what is there.
#[test]
fn one_server_serves_several_checkpoints_each_by_name() {
    let root = scratch_path("serve-several");
    std::fs::create_dir_all(&root).unwrap();
    let (da, db) = (root.join("first"), root.join("second-ck"));
    let wa = save_sample(&da, &[(3 << 20) + 5, 999], 11);
    let wb = save_sample(&db, &[4096, (2 << 20) + 1, 17], 50);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"));
    cmd.arg("serve")
        .arg(format!("alpha={}", da.display()))
        .arg(&db)
        .args(["--json", "--quiet"]);
    let (_server, v) = Server::start(cmd);
    let peer = v["uri"].as_str().unwrap().to_owned();
    let served = v["served"].as_array().unwrap();
    assert_eq!(served.len(), 2, "{v}");
    assert_eq!(served[0]["name"], "alpha");
    assert_eq!(served[1]["name"], "second-ck");
    assert_eq!(served[1]["uri"], format!("{peer}/second-ck"));

    let a = agent("backends = [\"tcp\"]");
    for (name, want) in [("alpha", &wa), ("second-ck", &wb)] {
        let r = restore_mapped(&a, &format!("{peer}/{name}"), None, Placement::Anywhere).unwrap();
        assert_eq!(r.regions().len(), want.len(), "{name}");
        for (i, w) in want.iter().enumerate() {
            let x = r.region(&format!("r{i}")).unwrap();
            // SAFETY: mapped and written by the restore, which has returned.
            let b =
                unsafe { std::slice::from_raw_parts(x.addr as usize as *const u8, x.len as usize) };
            assert!(b == w.as_slice(), "{name} r{i} differs");
        }
    }
    match read_manifest_with(&a, &peer) {
        Err(CkptError::InvalidArgument(e)) => assert!(
            e.contains("several") && e.contains("alpha") && e.contains("second-ck"),
            "{e}"
        ),
        other => panic!("no name, two checkpoints: {other:?}"),
    }
    match read_manifest_with(&a, &format!("{peer}/nope")) {
        Err(CkptError::NoCheckpoint { reason, .. }) => {
            assert!(
                reason.contains("alpha") && reason.contains("\"nope\""),
                "{reason}"
            )
        }
        other => panic!("an unknown name: {other:?}"),
    }
    // The same name twice is refused before anything is served.
    let o = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
        .arg("serve")
        .arg(format!("x={}", da.display()))
        .arg(format!("x={}", db.display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("two checkpoints"),
        "{o:?}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Artifact directories of a served checkpoint: restored from the peer (library and CLI) and
/// carried by a copy from the peer into a directory, every file the same.
#[test]
fn artifacts_are_served_by_a_peer_and_carried_by_a_copy_from_it() {
    let root = scratch_path("serve-art");
    std::fs::create_dir_all(root.join("tree/k/v")).unwrap();
    std::fs::create_dir_all(root.join("tree/empty")).unwrap();
    let big = pattern(77, (5 << 20) + 9);
    std::fs::write(root.join("tree/k/v/kernel.bin"), &big).unwrap();
    std::fs::write(root.join("tree/k/none"), b"").unwrap();
    std::fs::write(root.join("tree/top.json"), b"{\"v\":3}").unwrap();
    let ck = root.join("ck");
    {
        let a = agent(FILE_BACKENDS);
        let mut b = pattern(4, 300_000);
        let d = Desc::from_mut_slice(&mut b);
        let _r = register(&a, d);
        let opts = SaveOptions {
            chunk_size: 1 << 20,
            artifacts: vec![
                ("cache".into(), root.join("tree")),
                ("small".into(), root.join("tree/k")),
            ],
            ..SaveOptions::default()
        };
        // SAFETY: the buffer is live and unchanged during the call.
        unsafe {
            save(
                &a,
                ck.to_str().unwrap(),
                &[Region::dram("r0", d.addr, d.len)],
                &opts,
            )
        }
        .unwrap();
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"));
    cmd.args(["serve", ck.to_str().unwrap(), "--json", "--quiet"]);
    let (_server, v) = Server::start(cmd);
    let peer = v["served"][0]["uri"].as_str().unwrap().to_owned();
    assert!(peer.ends_with("/ck"), "{peer}");

    let check = |d: &std::path::Path| {
        assert_eq!(std::fs::read(d.join("k/v/kernel.bin")).unwrap(), big);
        assert!(std::fs::read(d.join("k/none")).unwrap().is_empty());
        assert_eq!(std::fs::read(d.join("top.json")).unwrap(), b"{\"v\":3}");
        assert!(d.join("empty").is_dir());
    };
    let a = agent("backends = [\"tcp\", \"uring\", \"posix\"]");
    let d1 = root.join("out1");
    let rep = nixl_checkpoint::restore_artifact_with(&a, &peer, "cache", &d1).unwrap();
    assert_eq!(rep.files, 3);
    check(&d1);
    let d2 = root.join("out2");
    let o = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
        .args(["artifact", &peer, "small"])
        .arg(&d2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(d2.join("v/kernel.bin")).unwrap(), big);
    let e = nixl_checkpoint::restore_artifact_with(&a, &peer, "nope", &root.join("x")).unwrap_err();
    assert!(matches!(e, CkptError::NotFound { .. }), "{e}");

    // A copy from the peer carries both artifacts.
    let copy = root.join("copy");
    let o = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
        .args(["copy", &peer])
        .arg(&copy)
        .args(["--buffer", "1MiB", "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let d3 = root.join("out3");
    nixl_checkpoint::restore_artifact(copy.to_str().unwrap(), "cache", &d3).unwrap();
    check(&d3);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_peer_without_a_checkpoint_or_not_there_is_a_clear_error() {
    let server = agent("backends = [\"tcp\"]\n[tcp]\nlisten = \"127.0.0.1:0\"\n");
    let mut junk = pattern(9, 8192);
    let _reg = register(&server, Desc::from_mut_slice(&mut junk));
    let at = nixl_transports::tcp::listen_addrs_in(&server.metadata())[0];
    let a = agent("backends = [\"tcp\"]");
    match read_manifest_with(&a, &format!("nixl://{at}")) {
        Err(CkptError::NoCheckpoint { location, reason }) => {
            assert_eq!(location, format!("nixl://{at}"));
            assert!(reason.contains("no control region"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A port with nothing listening (bound, then closed).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let e = read_manifest_with(&a, &format!("nixl://{dead}")).unwrap_err();
    assert!(e.to_string().contains(&dead.to_string()), "{e}");
    for bad in [
        "nixl://",
        "nixl://host",
        "nixl://h:99999",
        "nixl://h:1/x/y",
        "nixl://h:1/a b",
        "nixl://h:1/..",
    ] {
        assert!(matches!(
            read_manifest_with(&a, bad),
            Err(CkptError::InvalidArgument(_))
        ));
    }
}

#[test]
fn a_peer_serving_altered_bytes_is_caught_by_the_checksums() {
    let dir = scratch_path("serve-bad");
    let uri = dir.to_str().unwrap();
    let a = agent(FILE_BACKENDS);
    let mut buf = pattern(4, (2 << 20) + 9);
    let d = Desc::from_mut_slice(&mut buf);
    let reg = register(&a, d);
    let opts = SaveOptions {
        chunk_size: 1 << 20,
        ..SaveOptions::default()
    };
    // SAFETY: `buf` is live and unchanged during the call.
    unsafe { save(&a, uri, &[Region::dram("w", d.addr, d.len)], &opts) }.unwrap();
    drop(reg);
    let server =
        agent("backends = [\"tcp\", \"uring\", \"posix\"]\n[tcp]\nlisten = \"127.0.0.1:0\"\n");
    let served = nixl_checkpoint::serve(&server, uri).unwrap();
    let w = served.restored().region("w").unwrap();
    // Alter one byte of chunk 1 in the served memory.
    // SAFETY: the region is mapped by `served`, and no transfer runs while it is written.
    unsafe { *((w.addr + (1 << 20) + 3) as usize as *mut u8) ^= 0x40 };
    let at = nixl_transports::tcp::listen_addrs_in(&server.metadata())[0];
    let c = agent("backends = [\"tcp\"]");
    let mut out = vec![0u8; d.len as usize];
    let od = Desc::from_mut_slice(&mut out);
    let _oreg = register(&c, od);
    // SAFETY: `out` is live and not referenced during the call.
    let e = unsafe {
        restore(
            &c,
            &format!("nixl://{at}"),
            &[Region::dram("w", od.addr, od.len)],
            &RestoreOptions::default(),
        )
    }
    .unwrap_err();
    assert_corrupt(&e, "w", 1, true, &[]);
    drop(served);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn copy_from_a_peer_streams_in_bounded_memory() {
    let dir = scratch_path("copy-src");
    let uri = dir.to_str().unwrap();
    // 72 MiB and change in three regions, chunks of 1 MiB; the copy stages 4 MiB at a time.
    let sizes = [(48 << 20) + 4097, 24 << 20, 999];
    let total: usize = sizes.iter().sum();
    save_sample_with(&dir, &sizes, 11, Some("{\"model\": \"copy-test\"}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"));
    cmd.args(["serve", uri, "--json", "--quiet"]);
    let (_server, v) = Server::start(cmd);
    let peer = v["uri"].as_str().unwrap().to_owned();

    // The copy's peak resident memory, as it reports it (its own VmHWM: a child's rusage
    // would count this test's memory too, which the child shares until it execs).
    let copy = |dst: &std::path::Path, buffer: &str| -> u64 {
        let out = Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
            .args(["copy", &peer, dst.to_str().unwrap(), "--json", "--quiet"])
            .args(["--buffer", buffer])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{:?}: {text}", out.status);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["bytes"].as_u64(), Some(total as u64), "{v}");
        v["peak_rss_bytes"].as_u64().expect("peak_rss_bytes")
    };
    let dst = scratch_path("copy-dst");
    let peak = copy(&dst, "4MiB");
    // The same copy staging a whole region at once (the largest, 48 MiB).
    let whole = scratch_path("copy-whole");
    let peak_whole = copy(&whole, "1GiB");
    eprintln!("peak RSS: {peak} bytes staging 4 MiB, {peak_whole} staging 1 GiB ({total} bytes)");
    assert!(
        peak < 48 << 20 && peak + (32 << 20) < peak_whole,
        "the bounded copy peaked at {peak} bytes, the one staging a region at once at \
         {peak_whole}"
    );

    // Both copies are self-contained checkpoints with the source's chunks, every one verified.
    let src_m = ops::read_manifest(uri).unwrap();
    for d in [&dst, &whole] {
        let m = ops::read_manifest(d.to_str().unwrap()).unwrap();
        assert_eq!(m.metadata, src_m.metadata);
        assert!(m.base.is_none());
        for (a, b) in m.regions.iter().zip(&src_m.regions) {
            assert_eq!((&a.name, a.len, a.addr), (&b.name, b.len, b.addr));
            let ha: Vec<u64> = a.chunks.iter().map(|c| c.xxh3).collect();
            let hb: Vec<u64> = b.chunks.iter().map(|c| c.xxh3).collect();
            assert_eq!(ha, hb, "{}", a.name);
        }
        let rep = ops::verify(d.to_str().unwrap(), None).unwrap();
        assert_eq!(rep.bytes, total as u64);
    }
    // The data files hold the bytes that were saved.
    let a = agent(FILE_BACKENDS);
    let r = restore_mapped(&a, dst.to_str().unwrap(), None, Placement::Anywhere).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let x = r.region(&format!("r{i}")).unwrap();
        // SAFETY: the region is mapped and written by the restore, which has returned.
        let b = unsafe { std::slice::from_raw_parts(x.addr as usize as *const u8, x.len as usize) };
        assert!(b == pattern(i as u64 + 11, n).as_slice(), "r{i} differs");
    }
    drop(r);
    for d in [&dir, &dst, &whole] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
