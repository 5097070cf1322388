//! The `nixl-ckpt` binary as a script would drive it: `inspect`, `verify`, `copy`, `rm` with
//! `--json` (parsed), exit statuses, progress on stderr, and errors that name region and chunk.

use std::path::Path;
use std::process::{Command, Output};

use nixl_checkpoint::{save, Region, SaveOptions};
use serde_json::Value;

mod common;
use common::{file_agent, region, register_regions};

fn ckpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixl-ckpt"))
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn make(dir: &Path) {
    let a = file_agent("cli");
    let mut bufs: Vec<Vec<u8>> = vec![
        (0..300_000u32).map(|i| (i * 7) as u8).collect(),
        vec![5u8; 10],
    ];
    let regions: Vec<Region> = bufs
        .iter_mut()
        .zip(["weights", "meta"])
        .map(|(b, n)| region(n, b))
        .collect();
    let _r = register_regions(&a, &regions);
    let opts = SaveOptions {
        chunk_size: 64 << 10,
        metadata: Some(r#"{"model":"m","tp":2}"#.into()),
        ..SaveOptions::default()
    };
    // SAFETY: the buffers are unchanged for the call.
    unsafe { save(&a, dir.to_str().unwrap(), &regions, &opts) }.unwrap();
}

#[test]
fn inspect_verify_copy_rm_for_scripts() {
    let root = std::env::temp_dir().join(format!("nixl-ckpt-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("a");
    make(&dir);
    let d = dir.to_str().unwrap();

    let o = ckpt(&["inspect", d, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v = json(&o);
    assert_eq!(v["bytes"], 300_010);
    assert_eq!(v["metadata"]["tp"], 2);
    assert_eq!(v["regions"][0]["name"], "weights");
    assert_eq!(v["regions"][0]["chunks"], 5);
    assert_eq!(v["regions"][1]["kind"], "DRAM");
    let o = ckpt(&["inspect", d]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("weights") && text.contains("2 regions"),
        "{text}"
    );

    // Verify reports progress on stderr and the totals on stdout.
    let o = ckpt(&["verify", d, "--json"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(json(&o)["chunks"], 6);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("verify: "),
        "{o:?}"
    );

    // A verified copy, then damage the original: verify names region and chunk, exit 1.
    let copy = root.join("b");
    let c = copy.to_str().unwrap();
    let o = ckpt(&["copy", d, c, "--json", "--quiet"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        o.stderr.is_empty(),
        "--quiet printed {:?}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = nixl_checkpoint::read_manifest(d).unwrap();
    let f = dir.join(&m.files[m.regions[0].chunks[3].file as usize].name);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[3 * (64 << 10) + 1] ^= 4;
    std::fs::write(&f, bytes).unwrap();
    let o = ckpt(&["verify", d, "--json"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v = json(&o);
    assert_eq!(v["ok"], false);
    assert_eq!(v["region"], "weights");
    assert_eq!(v["chunk"], 3);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("checksum mismatch"),
        "{o:?}"
    );
    let o = ckpt(&["verify", c]);
    assert!(o.status.success(), "the copy was damaged too: {o:?}");
    // A copy over an existing checkpoint is refused.
    let o = ckpt(&["copy", c, c]);
    assert_eq!(o.status.code(), Some(1));

    // rm: gone, and inspect says there is no checkpoint.
    for p in [d, c] {
        let o = ckpt(&["rm", p, "--json"]);
        assert!(o.status.success(), "{o:?}");
        assert!(json(&o)["files_removed"].as_u64().unwrap() >= 3);
        assert!(!Path::new(p).exists());
    }
    let o = ckpt(&["inspect", d]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no checkpoint"),
        "{o:?}"
    );
    // Bad usage is exit status 2 (clap).
    assert_eq!(ckpt(&["frobnicate"]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&root);
}
