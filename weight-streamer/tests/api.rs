//! The library API: single tensors pulled by name into memory the caller registered, dtype and
//! shape checked, bytes equal to what Python's safetensors loads.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use nixl_core::{Desc, DescList, MemKind};
use nixl_transports::config::Config;
use nixl_weight_streamer::tensors::TensorSource;
use nixl_weight_streamer::Error;

/// The bytes of every tensor of the model in `dir` as Python's safetensors.numpy.load_file
/// gives them, written to `out/<name>` (one Python run).
fn numpy_dump(dir: &std::path::Path, out: &std::path::Path) {
    std::fs::create_dir_all(out).unwrap();
    let o = Command::new("python3")
        .args([
            "-c",
            "import sys, glob, os; from safetensors.numpy import load_file\n\
             for f in glob.glob(os.path.join(sys.argv[1], '*.safetensors')):\n\
             \x20   for k, v in load_file(f).items():\n\
             \x20       open(os.path.join(sys.argv[2], k), 'wb').write(v.tobytes())",
        ])
        .arg(dir)
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn tensors_pulled_by_name_into_caller_memory() {
    nixl_testkit::require!(python_missing(), REQ);
    let (t, model) = model_dir("api", "sharded", 7);
    let (_a, aa) = serve(cmd(), &model, "m", "127.0.0.1:0", &["--chunk-size", "4096"]);
    let (_b, ab) = serve(cmd(), &model, "m", "127.0.0.1:0", &["--chunk-size", "4096"]);
    let cfg = Config::from_toml(&format!(
        "backends = [\"tcp\"]\n[tcp]\nlisten = \"127.0.0.1:0\"\n[auth]\nsecret = \"{SECRET}\"\n"
    ))
    .unwrap();
    let agent = Arc::new(
        cfg.agent_builder("engine")
            .backends(cfg.backends().unwrap())
            .build()
            .unwrap(),
    );
    let src = TensorSource::connect(&agent, &cfg.auth(), None, "m", &[aa, ab]).unwrap();
    assert_eq!(src.sources().len(), 2);
    let m = Arc::clone(src.manifest());
    let dump = t.join("numpy");
    numpy_dump(&model, &dump);
    let mut from = std::collections::BTreeMap::new();
    for te in &m.tensors {
        let len = (te.end - te.begin) as usize;
        let mut buf = vec![0u8; len.max(1)];
        let list =
            DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]).unwrap();
        // SAFETY: `buf` outlives the registration and is only touched through the pull.
        let reg = unsafe { agent.register(&list) }.unwrap();
        let dst = Desc::new(list.descs()[0].addr, len as u64, 0);
        // SAFETY: as above; `dst` lies inside the registration.
        let r =
            unsafe { src.pull_tensor(&te.name, &te.dtype, &te.shape, MemKind::Dram, dst) }.unwrap();
        assert!(r.verified);
        drop(reg);
        assert_eq!(
            &buf[..len],
            &std::fs::read(dump.join(&te.name)).unwrap()[..],
            "{}",
            te.name
        );
        if len > 0 {
            *from.entry(r.source).or_insert(0) += 1;
        }
    }
    // Both sources served some tensors (the first source tried differs per tensor).
    assert!(from.len() == 2 || m.tensors.len() < 3, "{from:?}");

    // Wrong dtype, wrong shape, unknown name, wrong size: errors that name the tensor.
    let te = m.tensor("shard1.0.w").unwrap().clone();
    let mut buf = vec![0u8; (te.end - te.begin) as usize];
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]).unwrap();
    // SAFETY: as above.
    let _reg = unsafe { agent.register(&list) }.unwrap();
    let d = list.descs()[0];
    let mut wrong_shape = te.shape.clone();
    wrong_shape.reverse();
    for (name, dtype, shape, dst) in [
        (&te.name[..], "F16", te.shape.clone(), d),
        (&te.name[..], "F32", wrong_shape, d),
        ("no.such.tensor", "F32", te.shape.clone(), d),
    ] {
        // SAFETY: as above.
        let e = unsafe { src.pull_tensor(name, dtype, &shape, MemKind::Dram, dst) }.unwrap_err();
        match e {
            Error::ManifestMismatch { tensor, .. } => assert_eq!(tensor, name),
            other => panic!("{other}"),
        }
    }
    let short = Desc::new(d.addr, d.len - 4, 0);
    // SAFETY: as above.
    let e = unsafe { src.pull_tensor(&te.name, &te.dtype, &te.shape, MemKind::Dram, short) }
        .unwrap_err();
    assert!(e.to_string().contains("bytes, the destination"), "{e}");
    // Memory outside every registration: refused at once, not blamed on the sources.
    let mut loose = vec![0u8; buf.len()];
    let ld = Desc::from_mut_slice(&mut loose);
    // SAFETY: `loose` outlives the call; the pull refuses it before any transfer starts.
    let e =
        unsafe { src.pull_tensor(&te.name, &te.dtype, &te.shape, MemKind::Dram, ld) }.unwrap_err();
    assert!(matches!(e, Error::Core { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&t);
}
