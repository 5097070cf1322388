use super::*;

#[test]
fn content_ranges_parse_strictly() {
    assert_eq!(content_range("bytes 0-99/1000"), Some((0, 99)));
    assert_eq!(content_range("bytes 5-5/*"), Some((5, 5)));
    for bad in [
        "bytes 9-5/10",
        "bytes */10",
        "items 0-1/2",
        "bytes 0-x/2",
        "",
        "bytes 1/2",
    ] {
        assert_eq!(content_range(bad), None, "{bad}");
    }
}

#[test]
fn ranges_merge_scatter_and_split() {
    let segs = [
        (Desc::new(1000, 10, 0), 0, 0),
        (Desc::new(5000, 20, 0), 0, 10), // follows in the object: merged, scattered
        (Desc::new(5020, 5, 0), 0, 30),  // follows in memory too: same piece
        (Desc::new(9000, 5, 0), 0, 100), // a jump
        (Desc::new(9005, 5, 0), 1, 105), // another object
    ];
    let ops = plan_ranges(&segs, 1 << 20);
    assert_eq!(ops.len(), 3);
    assert_eq!(ops[0].pieces, vec![(1000, 10), (5000, 25)]);
    assert_eq!((ops[0].offset, ops[0].len), (0, 35));
    assert_eq!((ops[1].obj, ops[1].offset, ops[1].len), (0, 100, 5));
    assert_eq!(ops[2].obj, 1);
    let ops = plan_ranges(&[(Desc::new(0, 25, 0), 0, 7)], 10);
    let v: Vec<(u64, u64)> = ops.iter().map(|o| (o.offset, o.len)).collect();
    assert_eq!(v, vec![(7, 10), (17, 10), (27, 5)]);
    assert_eq!(ops[2].pieces, vec![(20, 5)]);
}

#[test]
fn unconfigured_is_unavailable_and_secrets_stay_hidden() {
    let b = ObjectBackend::new(ObjectConfig {
        use_env: false,
        ..ObjectConfig::default()
    });
    assert_eq!(b.probe().unwrap_err().to_string(), UNCONFIGURED);
    // A bucket alone means AWS S3 itself, over https (trusting the CA file here, so that
    // the test does not depend on this host's CA store).
    let dir = std::env::temp_dir().join(format!("nixl-object-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let aws = ObjectConfig {
        use_env: false,
        bucket: Some("bkt".into()),
        region: Some("eu-west-3".into()),
        ca_file: Some(ca.clone()),
        ..ObjectConfig::default()
    };
    let b = ObjectBackend::new(aws.clone());
    b.probe().unwrap();
    let st = b.inner.settings.as_ref().unwrap();
    assert_eq!(st.endpoint.scheme, Scheme::Https);
    assert_eq!(st.endpoint.authority, "s3.eu-west-3.amazonaws.com");
    // A CA file that is not there: unavailable, naming it.
    let b = ObjectBackend::new(ObjectConfig {
        ca_file: Some(dir.join("nope.pem")),
        ..aws.clone()
    });
    let e = b.probe().unwrap_err().to_string();
    assert!(
        e.contains("[object] ca_file") && e.contains("nope.pem"),
        "{e}"
    );
    // Virtual-host addressing needs a host name and DNS-compatible buckets.
    let b = ObjectBackend::new(ObjectConfig {
        virtual_host: true,
        endpoint: Some("https://10.0.0.1:9000".into()),
        ..aws.clone()
    });
    let e = b.probe().unwrap_err().to_string();
    assert!(e.contains("virtual_host") && e.contains("10.0.0.1"), "{e}");
    let b = ObjectBackend::new(ObjectConfig {
        virtual_host: true,
        bucket: Some("Not_A_Host".into()),
        ..aws.clone()
    });
    let e = b.probe().unwrap_err().to_string();
    assert!(e.contains("Not_A_Host") && e.contains("host name"), "{e}");
    let b = ObjectBackend::new(ObjectConfig {
        virtual_host: true,
        ..aws
    });
    b.probe().unwrap();
    b.name_object(3, "Bad_Bucket/k").unwrap();
    let e = b.inner.name_or_err(3).unwrap_err().to_string();
    assert!(e.contains("Bad_Bucket") && e.contains("host name"), "{e}");
    assert_eq!(b.inner.name_or_err(4).unwrap().to_string(), "bkt/4");
    std::fs::remove_dir_all(&dir).unwrap();
    let cfg = ObjectConfig {
        use_env: false,
        endpoint: Some("http://127.0.0.1:1".into()),
        bucket: Some("b".into()),
        key_prefix: "kv/".into(),
        access_key_id: Some("AKID".into()),
        secret_access_key: Some(Secret::new("very-secret")),
        ..ObjectConfig::default()
    };
    let b = ObjectBackend::new(cfg);
    assert!(b.probe().is_ok());
    let d = format!("{b:?}");
    assert!(!d.contains("very-secret") && d.contains("AKID"), "{d}");
    assert_eq!(b.object_name(7).unwrap().to_string(), "b/kv/7");
    b.name_object(7, "other/x/y").unwrap();
    assert_eq!(b.object_name(7).unwrap().key, "x/y");
    assert!(b.name_object(8, "nokey").is_err());
}
