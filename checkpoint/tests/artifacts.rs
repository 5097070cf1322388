//! Artifact directories: real trees (nested and empty directories, empty files, odd names,
//! modes) saved with regions, listed by `nixl-ckpt inspect`, restored into a chosen directory
//! (through the library and the CLI) and compared; damaged data, hostile manifests and taken
//! destinations refused with nothing left half-written; copy, incremental saves and rm.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixl_checkpoint::manifest::{ArtifactEntry, EntryKind, Manifest};
use nixl_checkpoint::{ops, restore_artifact, save, CkptError, Region, SaveOptions};
use nixl_core::{Agent, Desc, MemKind};

mod common;
use common::{file_agent, register, scratch};

/// A cache-like tree with the awkward cases.
fn make_tree(root: &Path) {
    let w = |p: &str, bytes: &[u8], mode: u32| {
        let p = root.join(p);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    std::fs::create_dir_all(root.join("ünï cödé/..x")).unwrap();
    w(
        "a/b/c/kernel.cubin",
        &nixl_testkit::pattern::pattern(7, (3 << 20) + 5),
        0o644,
    );
    w("a/empty", b"", 0o600);
    w("a/b/run.sh", b"#!/bin/sh\necho hi\n", 0o751);
    w("-dash", b"dash", 0o644);
    w("sp ace & <xml>", b"odd", 0o640);
    w("new\nline", b"nl", 0o644);
    w("ünï cödé/..x/.hidden", b"h", 0o400);
    w("top.json", b"{\"v\":1}", 0o644);
}

/// Path -> (is dir, mode, bytes) of every entry under `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (bool, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let mode = md.permissions().mode() & 0o777;
            if md.is_dir() {
                stack.push(e.path());
                out.insert(rel, (true, mode, Vec::new()));
            } else {
                out.insert(rel, (false, mode, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

fn agent() -> Agent {
    file_agent("ckpt-art")
}

/// Saves one region and the artifacts to `uri`.
fn save_with(a: &Agent, uri: &str, arts: Vec<(String, PathBuf)>, base: Option<&str>) {
    let mut buf = nixl_testkit::pattern::pattern(1, 100_000);
    let d = Desc::from_mut_slice(&mut buf);
    let _r = register(a, MemKind::Dram, d);
    let opts = SaveOptions {
        artifacts: arts,
        base: base.map(str::to_owned),
        chunk_size: 1 << 16,
        ..SaveOptions::default()
    };
    // SAFETY: the buffer is readable and unchanged for the call.
    unsafe { save(a, uri, &[Region::dram("w", d.addr, d.len)], &opts) }.unwrap();
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("nckpt-tmp"))
        .collect()
}

#[test]
fn artifact_trees_round_trip_and_bad_ones_leave_nothing() {
    let base = scratch("rt");
    let src = base.join("cache");
    make_tree(&src);
    let src2 = base.join("small");
    std::fs::create_dir_all(&src2).unwrap();
    std::fs::write(src2.join("one"), b"1").unwrap();
    let want = snapshot(&src);
    let ck = base.join("ck");
    let ck = ck.to_str().unwrap();
    let a = agent();
    save_with(
        &a,
        ck,
        vec![
            ("triton".into(), src.clone()),
            ("inductor".into(), src2.clone()),
        ],
        None,
    );

    // Restored into a new directory, and into an existing empty one.
    let out = base.join("out");
    let r = restore_artifact(ck, "triton", &out).unwrap();
    assert_eq!(snapshot(&out), want);
    assert_eq!(r.files, want.values().filter(|v| !v.0).count());
    assert_eq!(
        r.bytes,
        want.values().map(|v| v.2.len() as u64).sum::<u64>()
    );
    let out2 = base.join("out2");
    std::fs::create_dir(&out2).unwrap();
    restore_artifact(ck, "inductor", &out2).unwrap();
    assert_eq!(snapshot(&out2), snapshot(&src2));
    // A taken destination: not empty, a file, a symlink to a directory; nothing changes.
    let e = restore_artifact(ck, "inductor", &out).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(snapshot(&out), want);
    let link = base.join("link");
    std::os::unix::fs::symlink(base.join("empty-target"), &link).unwrap();
    std::fs::create_dir(base.join("empty-target")).unwrap();
    let e = restore_artifact(ck, "inductor", &link).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    let e = restore_artifact(ck, "nope", &base.join("x")).unwrap_err();
    assert!(
        matches!(e, CkptError::NotFound { .. }) && e.to_string().contains("triton"),
        "{e}"
    );

    // The CLI lists them and restores them.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = cli(&["inspect", ck, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["artifacts"][0]["name"], "triton");
    assert_eq!(v["artifacts"][0]["files"], 8);
    assert_eq!(v["artifacts"][0]["dirs"], 6);
    assert_eq!(v["artifacts"][1]["name"], "inductor");
    let o = cli(&["inspect", ck]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("ARTIFACT") && text.contains("triton"),
        "{text}"
    );
    let out3 = base.join("out3");
    let o = cli(&["artifact", ck, "triton", out3.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(snapshot(&out3), want);

    // Copied with the checkpoint; kept by an incremental save (written again).
    let cp = base.join("cp");
    let cp = cp.to_str().unwrap();
    ops::copy(ck, cp, None).unwrap();
    let out4 = base.join("out4");
    restore_artifact(cp, "triton", &out4).unwrap();
    assert_eq!(snapshot(&out4), want);
    let inc = base.join("inc");
    let inc = inc.to_str().unwrap();
    save_with(&a, inc, vec![("triton".into(), src.clone())], Some(ck));
    let out5 = base.join("out5");
    restore_artifact(inc, "triton", &out5).unwrap();
    assert_eq!(snapshot(&out5), want);

    // A flipped byte in the artifact's data: refused naming the file, nothing at the
    // destination, no hidden directory left.
    let m = ops::read_manifest(cp).unwrap();
    let t = m.artifact("triton").unwrap();
    let cubin = t
        .entries
        .iter()
        .find(|e| e.path.ends_with("kernel.cubin"))
        .unwrap();
    let data = Path::new(cp).join(&m.files[cubin.file as usize].name);
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[(cubin.offset + 1000) as usize] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let bad = base.join("bad");
    let e = restore_artifact(cp, "triton", &bad).unwrap_err();
    assert!(
        matches!(&e, CkptError::ArtifactCorrupt { path, .. } if path == "a/b/c/kernel.cubin"),
        "{e}"
    );
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(!bad.exists());
    assert!(leftovers(&base).is_empty(), "{:?}", leftovers(&base));
    // Truncated.
    std::fs::write(&data, &bytes[..cubin.offset as usize + 10]).unwrap();
    let e = restore_artifact(cp, "triton", &bad).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(!bad.exists() && leftovers(&base).is_empty());

    // Hostile manifests (resealed, so only the checks stand in the way): paths out of the
    // tree, a file inside a file, entries past the data.
    let good = std::fs::read(Path::new(ck).join("manifest.nckpt")).unwrap();
    let hostile = |f: &dyn Fn(&mut Manifest)| {
        let mut m = ops::read_manifest(ck).unwrap();
        f(&mut m);
        std::fs::write(Path::new(ck).join("manifest.nckpt"), m.encode()).unwrap();
        let dest = base.join("hostile");
        let e = restore_artifact(ck, "triton", &dest).unwrap_err();
        assert!(!dest.exists() && leftovers(&base).is_empty(), "{e}");
        assert!(!base.join("escape").exists());
        std::fs::write(Path::new(ck).join("manifest.nckpt"), &good).unwrap();
        e.to_string()
    };
    let at = |m: &mut Manifest, path: &str| -> usize {
        m.artifacts[0]
            .entries
            .iter()
            .position(|e| e.path == path)
            .unwrap()
    };
    for (path, want) in [
        ("../escape", "plain names"),
        ("/tmp/escape", "plain names"),
        ("a/../../escape", "plain names"),
        ("a/./x", "plain names"),
        ("a//x", "plain names"),
    ] {
        let e = hostile(&|m| {
            let i = at(m, "top.json");
            m.artifacts[0].entries[i].path = path.into();
        });
        assert!(e.contains(want), "{path}: {e}");
    }
    let e = hostile(&|m| {
        let i = at(m, "top.json");
        m.artifacts[0].entries[i].path = "a/empty/x".into();
    });
    assert!(e.contains("before its directory"), "{e}");
    let e = hostile(&|m| {
        let i = at(m, "top.json");
        m.artifacts[0].entries[i].size = u64::MAX - 3;
    });
    assert!(e.contains("past the end"), "{e}");
    let e = hostile(&|m| {
        m.artifacts[0].entries.push(ArtifactEntry {
            path: "a".into(),
            kind: EntryKind::File,
            mode: 0o644,
            file: 0,
            offset: 0,
            size: 0,
            xxh3: 0,
        });
    });
    assert!(e.contains("listed twice"), "{e}");
    std::fs::write(Path::new(ck).join("manifest.nckpt"), &good).unwrap();
    restore_artifact(ck, "triton", &base.join("fine")).unwrap();

    // Trees that cannot be saved: a symlink (never followed), a missing directory.
    let with_link = base.join("with-link");
    std::fs::create_dir(&with_link).unwrap();
    std::os::unix::fs::symlink("/etc", with_link.join("etc")).unwrap();
    let mut buf = vec![1u8; 4096];
    let d = Desc::from_mut_slice(&mut buf);
    let _r = register(&a, MemKind::Dram, d);
    let ck2 = base.join("ck2");
    for (dir, want) in [
        (&with_link, "symbolic link"),
        (&base.join("missing"), "missing"),
    ] {
        let opts = SaveOptions {
            artifacts: vec![("x".into(), dir.clone())],
            ..SaveOptions::default()
        };
        // SAFETY: the buffer is readable for the call.
        let e = unsafe {
            save(
                &a,
                ck2.to_str().unwrap(),
                &[Region::dram("w", d.addr, d.len)],
                &opts,
            )
        }
        .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert!(!ck2.join("manifest.nckpt").exists());
        // Nothing of the failed save is left.
        let left: Vec<_> = std::fs::read_dir(&ck2).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    // rm takes the artifact data with the rest, once the incremental over it is gone.
    match ops::remove(ck) {
        Err(CkptError::HasDependents { dependents, .. }) => {
            assert_eq!(dependents, [base.join("inc").display().to_string()])
        }
        r => panic!("the base of an incremental was removed: {r:?}"),
    }
    ops::remove(base.join("inc").to_str().unwrap()).unwrap();
    ops::remove(ck).unwrap();
    assert!(!Path::new(ck).exists());
    std::fs::remove_dir_all(&base).unwrap();
}
