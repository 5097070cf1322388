//! Checkpoints under `s3://bucket/prefix` against moto's S3 server (`python3 -m moto.server`,
//! installed by `.ci/setup`): round trips, a second save over the first, and the store's objects
//! damaged behind the library's back (deleted, flipped, truncated; the manifest deleted or from a
//! newer version), each refused naming region and chunk. Without moto: `SKIPPED` (a failure under
//! `NIXL_REQUIRE_OBJECT_TESTS=1` or `NIXL_REQUIRE_ALL=1`, as in CI).

use std::process::Command;

use nixl_checkpoint::{
    restore, restore_mapped, save, CkptError, Placement, RestoreOptions, SaveOptions, SaveReport,
};
use nixl_core::Agent;
use nixl_testkit::moto::Moto;
use nixl_testkit::pattern::pattern;

mod common;
use common::{agent_with, assert_corrupt, numbered_regions};

const BUCKET: &str = "ckpt-test";
/// moto with the test's bucket (multipart from 64 KiB, so that packs go up in parts).
fn start_moto() -> Moto {
    let m = Moto::start(&[("S3_UPLOAD_PART_MIN_SIZE", "65536")]);
    m.make_bucket(BUCKET);
    m
}

/// The objects of the test's bucket, and the CLI pointed at the server.
trait Bucket {
    fn object(&self, key: &str) -> Vec<u8>;
    fn put(&self, key: &str, body: &[u8]);
    fn delete(&self, key: &str);
    fn cli(&self, args: &[&str]) -> std::process::Output;
    fn keys(&self, prefix: &str) -> Vec<String>;
}

impl Bucket for Moto {
    fn object(&self, key: &str) -> Vec<u8> {
        let (st, b) = self.http("GET", &format!("/{BUCKET}/{key}"), b"").unwrap();
        assert_eq!(st, 200, "GET {key}");
        b
    }

    fn put(&self, key: &str, body: &[u8]) {
        assert_eq!(
            self.http("PUT", &format!("/{BUCKET}/{key}"), body)
                .unwrap()
                .0,
            200,
            "PUT {key}"
        );
    }

    fn delete(&self, key: &str) {
        assert_eq!(
            self.http("DELETE", &format!("/{BUCKET}/{key}"), b"")
                .unwrap()
                .0,
            204,
            "DELETE {key}"
        );
    }

    /// Runs `nixl-ckpt ARGS` with the AWS environment pointing at this server.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
            .args(args)
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap()
    }

    /// Keys under `prefix`.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let (_, b) = self
            .http("GET", &format!("/{BUCKET}?prefix={prefix}"), b"")
            .unwrap();
        let t = String::from_utf8_lossy(&b);
        t.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }
}

fn agent(m: &Moto) -> Agent {
    let toml = format!(
        "backends = [\"uring\", \"posix\", \"object\"]\n[object]\nendpoint = \"http://127.0.0.1:{}\"\n\
         region = \"us-east-1\"\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n\
         part_size = 1048576\nmultipart_threshold = 2097152\n",
        m.port
    );
    agent_with("ckpt-s3", &toml)
}

const LENS: [usize; 2] = [(5 << 20) + 333, 3];
const CHUNK: u64 = 1 << 20;

fn save_gen(a: &Agent, uri: &str, seed: u64) -> Vec<Vec<u8>> {
    let mut bufs: Vec<Vec<u8>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(seed + i as u64, l))
        .collect();
    let (regions, _r) = numbered_regions(a, &mut bufs);
    let opts = SaveOptions {
        chunk_size: CHUNK,
        metadata: Some("{\"s3\":true}".into()),
        ..SaveOptions::default()
    };
    // SAFETY: the buffers are unchanged for the call.
    let rep = unsafe { save(a, uri, &regions, &opts) }.unwrap();
    assert_eq!(rep.backend.as_deref(), Some("object"));
    bufs
}

fn restore_all(a: &Agent, uri: &str) -> (Result<u64, CkptError>, Vec<Vec<u8>>) {
    let mut bufs: Vec<Vec<u8>> = LENS.iter().map(|&l| vec![0u8; l]).collect();
    let (regions, r) = numbered_regions(a, &mut bufs);
    // SAFETY: the buffers live and are untouched for the call.
    let res = unsafe { restore(a, uri, &regions, &RestoreOptions::default()) };
    drop(r);
    (res, bufs)
}

#[test]
fn s3_round_trips_and_every_damage_is_named() {
    nixl_testkit::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
    let m = start_moto();
    let a = agent(&m);
    let uri = format!("s3://{BUCKET}/ckpt/w0");
    let first = save_gen(&a, &uri, 1);
    let (res, got) = restore_all(&a, &uri);
    assert_eq!(res.unwrap(), LENS.iter().sum::<usize>() as u64);
    assert_eq!(got, first);
    // The CLI reads it too, configured from the standard AWS environment.
    let cli = |args: &[&str]| m.cli(args);
    let o = cli(&["inspect", &uri, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["regions"][0]["len"], LENS[0]);
    assert_eq!(v["metadata"]["s3"], true);
    let o = cli(&["verify", &uri, "--json"]);
    assert!(o.status.success(), "{o:?}");
    // A second save over the first: the new manifest names the new objects.
    let second = save_gen(&a, &uri, 50);
    let (res, got) = restore_all(&a, &uri);
    res.unwrap();
    assert_eq!(got, second);
    let r = restore_mapped(&a, &uri, Some(&["r1"]), Placement::Anywhere).unwrap();
    let t = &r.regions()[0];
    // SAFETY: mapped by `r`.
    let bytes = unsafe { std::slice::from_raw_parts(t.addr as *const u8, 3) };
    assert_eq!(bytes, &second[1][..]);
    drop(r);

    let keys = m.keys("ckpt/w0/");
    assert!(
        keys.contains(&"ckpt/w0/manifest.nckpt".to_owned()),
        "{keys:?}"
    );
    let manifest = m.object("ckpt/w0/manifest.nckpt");
    let data_keys = |k: &[String]| -> Vec<String> {
        // The current save's data objects: those the manifest names.
        k.iter()
            .filter(|k| {
                k.ends_with("-0.dat")
                    && manifest
                        .windows(k.len() - 8)
                        .any(|w| w == &k.as_bytes()[8..])
            })
            .cloned()
            .collect()
    };
    let r0 = data_keys(&keys).pop().expect("the data object of r0");
    let orig = m.object(&r0);

    // A flipped byte in chunk 3 of r0.
    let mut b = orig.clone();
    b[3 * CHUNK as usize + 5] ^= 1;
    m.put(&r0, &b);
    let e = restore_all(&a, &uri).0.unwrap_err();
    assert_corrupt(&e, "r0", 3, true, &["\"r0\" chunk 3", "checksum"]);
    // Truncated.
    m.put(&r0, &orig[..orig.len() - 100]);
    let e = restore_all(&a, &uri).0.unwrap_err().to_string();
    assert!(
        e.contains("\"r0\" chunk 5") && e.contains("truncated") && e.contains("partly written"),
        "{e}"
    );
    // Missing: the chunk named is the one whose GET failed first (the GETs run in parallel).
    m.delete(&r0);
    let e = restore_all(&a, &uri).0.unwrap_err().to_string();
    assert!(
        e.contains("\"r0\" chunk ") && e.contains("is missing"),
        "{e}"
    );
    m.put(&r0, &orig);
    restore_all(&a, &uri).0.unwrap();
    // A manifest from a newer version; no manifest at all.
    let mut b = manifest.clone();
    b[8 + 8] = 7;
    m.put("ckpt/w0/manifest.nckpt", &b);
    let e = restore_all(&a, &uri).0.unwrap_err().to_string();
    assert!(e.contains("version 7"), "{e}");
    m.delete("ckpt/w0/manifest.nckpt");
    let e = restore_all(&a, &uri).0.unwrap_err();
    assert!(matches!(e, CkptError::NoCheckpoint { .. }), "{e}");
    let e = restore_all(&a, &format!("s3://{BUCKET}/nothing/here"))
        .0
        .unwrap_err();
    assert!(matches!(e, CkptError::NoCheckpoint { .. }), "{e}");
}

fn save_bufs(a: &Agent, uri: &str, bufs: &mut [Vec<u8>], base: Option<&str>) -> SaveReport {
    let (regions, _r) = numbered_regions(a, bufs);
    let opts = SaveOptions {
        chunk_size: CHUNK,
        metadata: Some("{\"inc\":1}".into()),
        base: base.map(str::to_owned),
        ..SaveOptions::default()
    };
    // SAFETY: the buffers are unchanged for the call.
    unsafe { save(a, uri, &regions, &opts) }.unwrap()
}

/// `rm` of a base refuses while an incremental checkpoint beside it (same parent prefix) reads
/// its objects, naming it, through the library and the CLI (`--json` lists the dependents);
/// `--force` removes it, and the incremental then fails naming its missing base.
#[test]
fn s3_rm_of_a_base_with_an_incremental_beside_it_is_refused_unless_forced() {
    nixl_testkit::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
    let m = start_moto();
    let a = agent(&m);
    let base = format!("s3://{BUCKET}/guard/base");
    let step = format!("s3://{BUCKET}/guard/step");
    let other = format!("s3://{BUCKET}/guard/other");
    let mut bufs: Vec<Vec<u8>> = LENS.iter().map(|&l| pattern(3, l)).collect();
    save_bufs(&a, &base, &mut bufs, None);
    save_bufs(&a, &other, &mut bufs, None);
    bufs[0][5] ^= 1;
    save_bufs(&a, &step, &mut bufs, Some(&base));
    // A prefix that merely starts like the base's is not confused with it.
    save_bufs(&a, &format!("{base}x"), &mut bufs, None);
    match nixl_checkpoint::remove_with(&a, &base) {
        Err(CkptError::HasDependents { dependents, .. }) => {
            assert_eq!(dependents, std::slice::from_ref(&step))
        }
        r => panic!("the base of an incremental was removed: {r:?}"),
    }
    // The others have no dependents and go.
    assert_eq!(nixl_checkpoint::remove_with(&a, &other).unwrap(), 3);
    assert_eq!(
        nixl_checkpoint::remove_with(&a, &format!("{base}x")).unwrap(),
        3
    );
    let cli = |args: &[&str]| m.cli(args);
    let o = cli(&["rm", &base, "--json", "-q"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["dependents"], serde_json::json!([step.clone()]), "{v}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{o:?}"
    );
    let (res, got) = restore_all(&a, &step);
    res.unwrap();
    assert_eq!(got, bufs);
    let o = cli(&["rm", &base, "--force", "--json", "-q"]);
    assert!(o.status.success(), "{o:?}");
    assert!(m.keys("guard/base/").is_empty());
    let e = restore_all(&a, &step).0.unwrap_err().to_string();
    assert!(
        e.contains("missing") && e.contains(&format!("belongs to {base}, the base")),
        "{e}"
    );
    // The incremental itself has no dependents and goes.
    let o = cli(&["rm", &step, "-q"]);
    assert!(o.status.success(), "{o:?}");
}

/// Incremental saves to S3 (only the changed chunks written, the base's objects referenced),
/// copies between S3 and directories both ways (verified), the objects of a replaced save
/// deleted, and `rm` (manifest first) through the library and the CLI.
#[test]
fn s3_incremental_copy_cleanup_and_rm() {
    nixl_testkit::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
    let m = start_moto();
    let a = agent(&m);
    let base = format!("s3://{BUCKET}/inc/base");
    let step = format!("s3://{BUCKET}/inc/step");
    let mut bufs: Vec<Vec<u8>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(7 + i as u64, l))
        .collect();
    let first = bufs.clone();
    let rep = save_bufs(&a, &base, &mut bufs, None);
    assert_eq!(
        (rep.written, rep.reused),
        (LENS.iter().sum::<usize>() as u64, 0)
    );
    // One chunk of r0 and all of r1 change.
    bufs[0][2 * CHUNK as usize + 17] ^= 0x5a;
    bufs[1][0] ^= 1;
    let rep = save_bufs(&a, &step, &mut bufs, Some(&base));
    assert_eq!(rep.written, CHUNK + 3, "{rep:?}");
    assert_eq!(rep.reused, 5);
    let step_keys = m.keys("inc/step/");
    assert_eq!(step_keys.len(), 3, "manifest and two runs: {step_keys:?}");
    let (res, got) = restore_all(&a, &step);
    res.unwrap();
    assert_eq!(got, bufs);
    let (res, got) = restore_all(&a, &base);
    res.unwrap();
    assert_eq!(got, first);
    let insp = nixl_checkpoint::read_manifest_with(&a, &step).unwrap();
    assert_eq!(insp.base.as_deref(), Some(base.as_str()));
    assert!(
        insp.files.iter().any(|f| f.name.starts_with("../base/d")),
        "{:?}",
        insp.files
    );
    // A base elsewhere than this bucket is refused.
    let dir = std::env::temp_dir().join(format!("nixl-ckpt-s3copy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d1 = dir.join("d1");
    let d1 = d1.to_str().unwrap();
    let (regions, _r) = numbered_regions(&a, &mut bufs);
    let opts = SaveOptions {
        chunk_size: CHUNK,
        base: Some(d1.to_owned()),
        ..SaveOptions::default()
    };
    // SAFETY: the buffers are unchanged for the call.
    let e = unsafe { save(&a, &format!("s3://{BUCKET}/inc/x"), &regions, &opts) }.unwrap_err();
    assert!(matches!(e, CkptError::Unsupported(_)), "{e}");
    drop(_r);

    // Copies: the incremental S3 checkpoint to a directory, that back to S3, verified.
    let cm = nixl_checkpoint::copy_with(&a, &step, d1, None).unwrap();
    assert!(cm.base.is_none());
    let (res, got) = restore_all(&a, d1);
    res.unwrap();
    assert_eq!(got, bufs);
    let back = format!("s3://{BUCKET}/copy/back");
    nixl_checkpoint::copy_with(&a, d1, &back, None).unwrap();
    let (res, got) = restore_all(&a, &back);
    res.unwrap();
    assert_eq!(got, bufs);
    assert_eq!(
        nixl_checkpoint::read_manifest_with(&a, &back)
            .unwrap()
            .metadata,
        "{\"inc\":1}"
    );
    let e = nixl_checkpoint::copy_with(&a, d1, &back, None).unwrap_err();
    assert!(e.to_string().contains("already holds"), "{e}");
    // Streamed through a buffer of one chunk: an object per chunk, the same bytes.
    let runs = format!("s3://{BUCKET}/copy/runs");
    let rm = nixl_checkpoint::copy_with_buffer(&a, d1, &runs, None, CHUNK).unwrap();
    let chunks: usize = rm.regions.iter().map(|r| r.chunks.len()).sum();
    assert!(chunks > rm.regions.len(), "{chunks} chunks");
    assert_eq!(rm.files.len(), chunks);
    let (res, got) = restore_all(&a, &runs);
    res.unwrap();
    assert_eq!(got, bufs);
    // A source that is damaged is not copied.
    let bad = m
        .keys("copy/back/")
        .into_iter()
        .find(|k| k.ends_with("-0.dat"))
        .unwrap();
    let mut b = m.object(&bad);
    b[100] ^= 1;
    m.put(&bad, &b);
    let e =
        nixl_checkpoint::copy_with(&a, &back, dir.join("d3").to_str().unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(!dir.join("d3").join("manifest.nckpt").exists());
    // The CLI: S3 to a directory, and verify it.
    let cli = |args: &[&str]| m.cli(args);
    let d2 = dir.join("d2");
    let d2 = d2.to_str().unwrap();
    let o = cli(&["copy", &step, d2, "--json", "-q"]);
    assert!(o.status.success(), "{o:?}");
    let o = cli(&["verify", d2, "--json", "-q"]);
    assert!(o.status.success(), "{o:?}");

    // A new save over `step` deletes the objects of the save it replaces and those a killed
    // save left, and nothing else.
    m.put("inc/step/d0123456789abcdef-0.dat", b"left by a killed save");
    m.put("inc/step/notes.txt", b"not ours");
    m.put("inc/step/sub/d0123456789abcdef-0.dat", b"another prefix");
    let mut other: Vec<Vec<u8>> = LENS.iter().map(|&l| pattern(99, l)).collect();
    save_bufs(&a, &step, &mut other, None);
    let keys = m.keys("inc/step/");
    let ours: Vec<&String> = keys
        .iter()
        .filter(|k| !k.ends_with("notes.txt") && !k.contains("/sub/"))
        .collect();
    assert_eq!(ours.len(), 3, "{keys:?}");
    assert!(step_keys
        .iter()
        .all(|k| k.ends_with("manifest.nckpt") || !keys.contains(k)));
    assert!(!keys.contains(&"inc/step/d0123456789abcdef-0.dat".to_owned()));
    assert!(keys.contains(&"inc/step/notes.txt".to_owned()));
    assert!(keys.contains(&"inc/step/sub/d0123456789abcdef-0.dat".to_owned()));
    let (res, got) = restore_all(&a, &step);
    res.unwrap();
    assert_eq!(got, other);

    // rm: manifest and data objects go, the rest stays; the base is untouched.
    let o = cli(&["rm", &step, "--json", "-q"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["files_removed"], 3, "{v}");
    let keys = m.keys("inc/step/");
    assert_eq!(keys.len(), 2, "{keys:?}");
    let e = restore_all(&a, &step).0.unwrap_err();
    assert!(matches!(e, CkptError::NoCheckpoint { .. }), "{e}");
    let o = cli(&["rm", &step, "--json", "-q"]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing removed"),
        "{o:?}"
    );
    let (res, got) = restore_all(&a, &base);
    res.unwrap();
    assert_eq!(got, first);
    assert_eq!(nixl_checkpoint::remove_with(&a, &base).unwrap(), 3);
    assert!(m.keys("inc/base/").is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn s3_artifacts_round_trip_and_a_damaged_pack_is_refused() {
    nixl_testkit::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
    let m = start_moto();
    let a = agent(&m);
    let work = std::env::temp_dir().join(format!("nixl-ckpt-s3art-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let tree = work.join("cache");
    std::fs::create_dir_all(tree.join("k/v")).unwrap();
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    // Past moto's multipart threshold (64 KiB here): the pack goes up in parts.
    let big = pattern(5, (1 << 20) + 3);
    std::fs::write(tree.join("k/v/kernel.bin"), &big).unwrap();
    std::fs::write(tree.join("k/none"), b"").unwrap();
    std::fs::write(tree.join("top.json"), b"{\"v\":2}").unwrap();
    let uri = format!("s3://{BUCKET}/art/one");
    let mut bufs = vec![pattern(3, 100_000)];
    let (regions, r) = numbered_regions(&a, &mut bufs);
    let opts = SaveOptions {
        chunk_size: CHUNK,
        artifacts: vec![("cache".into(), tree.clone())],
        ..SaveOptions::default()
    };
    // SAFETY: the buffers are unchanged for the call.
    unsafe { save(&a, &uri, &regions, &opts) }.unwrap();
    drop(r);
    let mf = nixl_checkpoint::read_manifest_with(&a, &uri).unwrap();
    assert_eq!(mf.artifacts.len(), 1);
    let back = restore_mapped(&a, &uri, None, Placement::Anywhere).unwrap();
    let x = back.region("r0").unwrap();
    // SAFETY: mapped and written by the restore, which has returned.
    let b = unsafe { std::slice::from_raw_parts(x.addr as usize as *const u8, x.len as usize) };
    assert!(b == bufs[0].as_slice(), "r0 differs");
    drop(back);

    // Into a fresh directory: the same tree.
    let dest = work.join("restored");
    let rep = nixl_checkpoint::restore_artifact_with(&a, &uri, "cache", &dest).unwrap();
    assert_eq!((rep.files, rep.bytes), (3, big.len() as u64 + 7));
    assert_eq!(std::fs::read(dest.join("k/v/kernel.bin")).unwrap(), big);
    assert_eq!(std::fs::read(dest.join("top.json")).unwrap(), b"{\"v\":2}");
    assert!(std::fs::read(dest.join("k/none")).unwrap().is_empty());
    assert!(dest.join("empty").is_dir());
    let e = nixl_checkpoint::restore_artifact_with(&a, &uri, "nope", &work.join("x")).unwrap_err();
    assert!(matches!(e, CkptError::NotFound { .. }), "{e}");

    // Copies through the agent carry the artifact: S3 to a directory, that back to S3 under
    // another prefix; the tree restores from each, the same.
    let cdir = work.join("copied");
    let cm = nixl_checkpoint::copy_with(&a, &uri, cdir.to_str().unwrap(), None).unwrap();
    assert_eq!(cm.artifacts.len(), 1);
    let d2 = work.join("from-dir-copy");
    nixl_checkpoint::restore_artifact(cdir.to_str().unwrap(), "cache", &d2).unwrap();
    assert_eq!(std::fs::read(d2.join("k/v/kernel.bin")).unwrap(), big);
    let back_uri = format!("s3://{BUCKET}/art/back");
    nixl_checkpoint::copy_with_buffer(&a, cdir.to_str().unwrap(), &back_uri, None, CHUNK).unwrap();
    let d3 = work.join("from-s3-copy");
    nixl_checkpoint::restore_artifact_with(&a, &back_uri, "cache", &d3).unwrap();
    assert_eq!(std::fs::read(d3.join("k/v/kernel.bin")).unwrap(), big);
    assert!(std::fs::read(d3.join("k/none")).unwrap().is_empty() && d3.join("empty").is_dir());
    nixl_checkpoint::remove_with(&a, &back_uri).unwrap();
    assert!(m.keys("art/back/").is_empty());

    // A flipped byte in the pack object: refused, and nothing appears at the destination.
    let fi = mf.artifacts[0]
        .entries
        .iter()
        .find(|e| e.size > 0)
        .unwrap()
        .file as usize;
    let key = format!("art/one/{}", mf.files[fi].name);
    let mut b = m.object(&key);
    b[10] ^= 1;
    m.put(&key, &b);
    let bad = work.join("bad");
    let e = nixl_checkpoint::restore_artifact_with(&a, &uri, "cache", &bad).unwrap_err();
    assert!(matches!(e, CkptError::ArtifactCorrupt { .. }), "{e}");
    assert!(!bad.exists());
    // The pack object missing: refused the same way.
    m.delete(&key);
    let e = nixl_checkpoint::restore_artifact_with(&a, &uri, "cache", &bad).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(!bad.exists());

    // `rm` takes the pack with the rest.
    nixl_checkpoint::remove_with(&a, &uri).unwrap();
    assert_eq!(m.keys("art/one/"), Vec::<String>::new());
    std::fs::remove_dir_all(&work).unwrap();
}
