use super::*;

/// The "GET Object" example of the SigV4 documentation for S3.
#[test]
fn signature_matches_the_documented_example() {
    let c = Creds {
        access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
        secret: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        session_token: None,
    };
    let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let headers = vec![
        ("host", "examplebucket.s3.amazonaws.com".to_owned()),
        ("range", "bytes=0-9".to_owned()),
        ("x-amz-content-sha256", empty.to_owned()),
        ("x-amz-date", "20130524T000000Z".to_owned()),
    ];
    let a = authorization(
        &c,
        "us-east-1",
        "GET",
        "/test.txt",
        "",
        &headers,
        empty,
        "20130524T000000Z",
        "20130524",
    );
    assert_eq!(
        a,
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
         SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
         Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    );
    // The secret never shows in Debug.
    let d = format!("{c:?}");
    assert!(!d.contains("EXAMPLEKEY") && d.contains("<redacted>"), "{d}");
}

#[test]
fn dates_encoding_and_xml() {
    let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
    assert_eq!(amz_date(t).0, "20130524T000000Z");
    let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3723); // 2000-02-29 01:02:03
    assert_eq!(amz_date(t), ("20000229T010203Z".into(), "20000229".into()));
    assert_eq!(uri_encode("a b/c~d+é", false), "a%20b/c~d%2B%C3%A9");
    assert_eq!(uri_encode("a/b", true), "a%2Fb");
    assert_eq!(
        canonical_query(&[("uploadId", "x/y".into()), ("partNumber", "2".into())]),
        "partNumber=2&uploadId=x%2Fy"
    );
    let doc = "<Error><Code>NoSuchKey</Code><Message>a &amp; b</Message></Error>";
    assert_eq!(xml_text(doc, "Code").as_deref(), Some("NoSuchKey"));
    assert_eq!(
        status_error("GET b/k", StatusCode::NOT_FOUND, doc.as_bytes()),
        "GET b/k: HTTP 404 Not Found: NoSuchKey: a & b"
    );
}

#[test]
fn endpoints_parse_with_their_scheme() {
    let e = Endpoint::parse("https://s3.us-east-1.amazonaws.com").unwrap();
    assert_eq!(e.scheme, Scheme::Https);
    assert_eq!(e.authority, "s3.us-east-1.amazonaws.com");
    assert_eq!(e.host(), "s3.us-east-1.amazonaws.com");
    assert!(!e.host_is_ip());
    let e = Endpoint::parse("http://127.0.0.1:9000/").unwrap();
    assert_eq!(
        (e.scheme, e.authority.as_str()),
        (Scheme::Http, "127.0.0.1:9000")
    );
    assert_eq!(e.host(), "127.0.0.1");
    assert!(e.host_is_ip());
    let e = Endpoint::parse("https://[::1]:9000").unwrap();
    assert_eq!(e.host(), "[::1]");
    assert!(e.host_is_ip());
    assert_eq!(
        Endpoint::parse("https://minio.lan:9000").unwrap().host(),
        "minio.lan"
    );
    for bad in [
        "http://h/path",
        "https://h/path",
        "ftp://h",
        "https://",
        "https://user@h",
        "https://:9000",
        "h:9000",
    ] {
        let e = Endpoint::parse(bad).unwrap_err();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

fn doc_creds() -> Creds {
    Creds {
        access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
        secret: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        session_token: None,
    }
}

fn client(endpoint: &str, virtual_host: bool) -> S3 {
    let tls = tls_config_from(Vec::new(), &[], None, false).unwrap();
    S3::new(
        Endpoint::parse(endpoint).unwrap(),
        virtual_host,
        "us-east-1".into(),
        Some(doc_creds()),
        &tls,
        Duration::from_secs(1),
        1,
    )
}

fn header<'a>(r: &'a Request<SendBody>, name: &str) -> &'a str {
    r.headers().get(name).unwrap().to_str().unwrap()
}

/// The URI, the Host header and the signature of both addressing styles. The expected
/// signatures were computed apart from this code (Python's hmac/hashlib, following the
/// SigV4 documentation), so they check that the Host header signed is the one sent.
#[test]
fn requests_are_addressed_and_signed_in_both_styles() {
    let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600); // 20130524T000000Z
    let get = S3Req {
        method: Method::GET,
        bucket: "examplebucket",
        key: "test.txt",
        query: Vec::new(),
        range: Some((0, 9)),
        body: ReqBody::Empty,
    };
    let sh = "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date";

    let vh = client("https://s3.us-east-1.amazonaws.com", true);
    let r = vh.build(&get, t).unwrap();
    assert_eq!(
        r.uri().to_string(),
        "https://examplebucket.s3.us-east-1.amazonaws.com/test.txt"
    );
    assert_eq!(
        header(&r, "host"),
        "examplebucket.s3.us-east-1.amazonaws.com"
    );
    let auth = header(&r, "authorization");
    assert!(auth.contains(sh), "{auth}");
    assert!(
        auth.ends_with(
            "Signature=6dbaa08808a26092e1a8dfea288abde7fb11fabbe52879597478ac290abaf188"
        ),
        "{auth}"
    );

    let ps = client("https://s3.us-east-1.amazonaws.com/", false);
    let r = ps.build(&get, t).unwrap();
    assert_eq!(
        r.uri().to_string(),
        "https://s3.us-east-1.amazonaws.com/examplebucket/test.txt"
    );
    assert_eq!(header(&r, "host"), "s3.us-east-1.amazonaws.com");
    assert_eq!(header(&r, "range"), "bytes=0-9");
    let auth = header(&r, "authorization");
    assert!(auth.contains(sh), "{auth}");
    assert!(
        auth.ends_with(
            "Signature=101e37aff6d2eef2249823416791b67080c70a34f84c11c317bc296d699f376b"
        ),
        "{auth}"
    );

    // Plain HTTP, a port, a key that needs encoding, a query.
    let ip = client("http://127.0.0.1:9000", false);
    let req = S3Req {
        method: Method::GET,
        bucket: "b",
        key: "dir/k x",
        query: vec![("uploadId", "a/b".into()), ("partNumber", "1".into())],
        range: None,
        body: ReqBody::Empty,
    };
    let r = ip.build(&req, t).unwrap();
    assert_eq!(
        r.uri().to_string(),
        "http://127.0.0.1:9000/b/dir/k%20x?partNumber=1&uploadId=a%2Fb"
    );
    assert_eq!(header(&r, "host"), "127.0.0.1:9000");
    assert!(
        header(&r, "authorization").ends_with(
            "SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
             Signature=9a083a5ea20ec43fb5f45df709760c9f166893a7859be4a25155383607adc0f7"
        ),
        "{}",
        header(&r, "authorization")
    );

    // Bucket-level requests, and buckets that cannot be host names.
    assert_eq!(
        vh.target("bkt", ""),
        ("bkt.s3.us-east-1.amazonaws.com".into(), "/".into())
    );
    assert_eq!(
        ps.target("bkt", ""),
        ("s3.us-east-1.amazonaws.com".into(), "/bkt".into())
    );
    for bad in ["Upper", "a_b", "ab", "-ab", "a..b", "ab-"] {
        assert!(virtual_host_bucket_error(bad).is_some(), "{bad}");
        let req = S3Req {
            method: Method::GET,
            bucket: bad,
            key: "k",
            query: Vec::new(),
            range: None,
            body: ReqBody::Empty,
        };
        let e = vh.build(&req, t).unwrap_err();
        assert!(e.contains("cannot be a host name"), "{e}");
    }
    for good in ["abc", "my-bucket.v2", "0k0"] {
        assert_eq!(virtual_host_bucket_error(good), None, "{good}");
    }
}

fn pem_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn trust_roots_from_the_system_and_a_ca_file() {
    let dir = std::env::temp_dir().join(format!("nixl-s3-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    let good = pem_file(&dir, "ca.pem", &format!("{}{}", ca.pem(), ca.pem()));
    assert_eq!(read_ca_file("[object] ca_file", &good).unwrap().len(), 2);
    // No system roots: https needs the CA file, http does not.
    let e = tls_config_from(Vec::new(), &["no store".into()], None, true).unwrap_err();
    assert!(e.contains("no store") && e.contains("ca_file"), "{e}");
    tls_config_from(Vec::new(), &[], None, false).unwrap();
    tls_config_from(Vec::new(), &[], Some(("[object] ca_file", &good)), true).unwrap();
    // Files that are no CA bundle: errors name the file.
    let missing = dir.join("missing.pem");
    let e = read_ca_file("[object] ca_file", &missing).unwrap_err();
    assert!(
        e.contains("missing.pem") && e.contains("cannot read"),
        "{e}"
    );
    let empty = pem_file(&dir, "empty.pem", "just text\n");
    let e = tls_config_from(Vec::new(), &[], Some(("AWS_CA_BUNDLE", &empty)), false).unwrap_err();
    assert!(
        e.starts_with("AWS_CA_BUNDLE") && e.contains("empty.pem"),
        "{e}"
    );
    assert!(e.contains("no certificate"), "{e}");
    let broken = pem_file(
        &dir,
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    let e = read_ca_file("[object] ca_file", &broken).unwrap_err();
    assert!(e.contains("broken.pem"), "{e}");
    let junk = pem_file(
        &dir,
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let e = tls_config_from(Vec::new(), &[], Some(("[object] ca_file", &junk)), true).unwrap_err();
    assert!(e.contains("junk.pem") && e.contains("certificate 1"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
