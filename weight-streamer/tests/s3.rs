//! The S3 fallback against moto's S3 server, with the model uploaded by boto3: a pull from S3
//! alone (by a manifest), and a bad source whose chunks S3 replaces.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

use nixl_testkit::moto::Moto;

/// Why moto (with boto3, which uploads the model) cannot run here, or `None`.
fn moto_missing() -> Option<String> {
    python_missing().or_else(Moto::missing).or_else(|| {
        let ok = Command::new("python3")
            .args(["-c", "import boto3"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!ok).then(|| "boto3 is not installed (.ci/setup installs it)".into())
    })
}

fn aws(c: &mut Command, port: u16) -> &mut Command {
    c.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
}

#[test]
fn s3_fallback_alone_and_behind_a_bad_source() {
    nixl_testkit::require!(moto_missing(), REQ);
    let m = Moto::start(&[]);
    let (t, model) = model_dir("s3", "sharded", 10);
    // boto3 makes the bucket and uploads the files under models/m/.
    let mut up = Command::new("python3");
    up.args([
        "-c",
        "import sys, os, boto3\n\
         s3 = boto3.client('s3')\n\
         s3.create_bucket(Bucket='weights')\n\
         for f in os.listdir(sys.argv[1]):\n\
         \x20   s3.upload_file(os.path.join(sys.argv[1], f), 'weights', 'models/m/' + f)",
    ])
    .arg(&model);
    let o = aws(&mut up, m.port).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A bad source (every chunk corrupted) and S3: S3 gives every chunk.
    let mut probe = cmd();
    probe
        .arg("serve")
        .arg(&model)
        .args(["--name", "m", "--listen", "127.0.0.1:0", "--json"]);
    let info = Proc::spawn(probe).json(Duration::from_secs(30));
    let chunks = info["chunks"].as_u64().unwrap();
    let mut extra = Vec::new();
    let idx: Vec<String> = (0..chunks).map(|i| i.to_string()).collect();
    for i in &idx {
        extra.extend(["--fault-corrupt-chunk", i.as_str()]);
    }
    let (_bad, bad) = serve(cmd(), &model, "m", "127.0.0.1:0", &extra);
    let out = t.join("out");
    let mut c = cmd();
    aws(&mut c, m.port);
    let r = pull(
        c,
        "m",
        &out,
        &[&bad],
        &[
            "--listen",
            "127.0.0.1:0",
            "--fallback",
            "s3://weights/models/m",
        ],
    )
    .unwrap();
    assert_eq!(r["fallback_bytes"], r["bytes"], "{r}");
    assert!(r["corrupt_chunks"].as_u64().unwrap() >= 1, "{r}");
    assert_same_model(&model, &out);

    // No source at all: S3 alone, by the manifest the first pull left.
    let out2 = t.join("out2");
    let mut c = cmd();
    aws(&mut c, m.port);
    let mf = out.join(".nixl-weights-manifest");
    let r = pull(
        c,
        "m",
        &out2,
        &[],
        &[
            "--listen",
            "127.0.0.1:0",
            "--fallback",
            "s3://weights/models/m/",
            "--manifest",
            mf.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(r["fallback_bytes"], r["bytes"], "{r}");
    assert_same_model(&model, &out2);

    // A wrong prefix: a clear error, not a hang.
    let mut c = cmd();
    aws(&mut c, m.port);
    let (code, err) = pull(
        c,
        "m",
        &t.join("out3"),
        &[],
        &[
            "--listen",
            "127.0.0.1:0",
            "--fallback",
            "s3://weights/nothing/",
            "--manifest",
            mf.to_str().unwrap(),
        ],
    )
    .unwrap_err();
    assert_eq!(code, 1);
    assert!(err.contains("fallback GET"), "{err}");
    let _ = std::fs::remove_dir_all(&t);
}
