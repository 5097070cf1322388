use super::*;

fn sample() -> Manifest {
    Manifest {
        save_id: 7,
        created_unix_ms: 1,
        chunk_size: 4096,
        base: None,
        metadata: "{\"model\":\"x\"}".into(),
        files: vec![DataFile {
            name: "r0.dat".into(),
            size: 5000,
        }],
        regions: vec![RegionEntry {
            name: "weights".into(),
            kind: MemKind::Dram,
            dev_id: 0,
            addr: 0x7f00_0000_0000,
            len: 5000,
            chunks: vec![
                Chunk {
                    file: 0,
                    offset: 0,
                    len: 4096,
                    xxh3: 1,
                },
                Chunk {
                    file: 0,
                    offset: 4096,
                    len: 904,
                    xxh3: 2,
                },
            ],
        }],
        artifacts: Vec::new(),
    }
}

fn with_artifact() -> Manifest {
    let mut m = sample();
    m.files.push(DataFile {
        name: "a.dat".into(),
        size: 10,
    });
    let e = |path: &str, kind, size| ArtifactEntry {
        path: path.into(),
        kind,
        mode: 0o644,
        file: u32::from(kind == EntryKind::File),
        offset: 0,
        size,
        xxh3: 0,
    };
    m.artifacts.push(Artifact {
        name: "triton".into(),
        entries: vec![
            e("d", EntryKind::Dir, 0),
            e("d/x y", EntryKind::File, 10),
            e("e", EntryKind::File, 0),
        ],
    });
    m
}

#[test]
fn artifacts_round_trip_as_version_2_and_lies_are_refused() {
    let m = with_artifact();
    let b = m.encode();
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2);
    assert_eq!(Manifest::decode(&b).unwrap(), m);
    assert_eq!(u16::from_le_bytes([sample().encode()[8], 0]), 1);
    let reseal = |f: &dyn Fn(&mut Manifest)| {
        let mut m = with_artifact();
        f(&mut m);
        Manifest::decode(&m.encode()).unwrap_err().to_string()
    };
    // Paths of the second entry (a file in directory `d`), and what the refusal says.
    let long = "d/".to_owned() + &"n".repeat(256);
    let paths = [
        ("../x", "plain names"),
        ("/etc/x", "plain names"),
        ("d/./x", "plain names"),
        ("d//x", "plain names"),
        ("d/a\0b", "plain names"),
        (long.as_str(), "plain names"),
        ("q/x", "before its directory"),
        ("e", "listed twice"),
    ];
    for (path, want) in paths {
        let e = reseal(&|m: &mut Manifest| m.artifacts[0].entries[1].path = path.into());
        assert!(e.contains(want), "{path:?}: {want}: {e}");
    }
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|m| m.artifacts[0].entries.swap(0, 1)),
            "before its directory",
        ),
        (
            Box::new(|m| m.artifacts[0].entries[2].path = "e/f".into()),
            "before its directory",
        ),
        (
            Box::new(|m| m.artifacts[0].entries[1].size = 11),
            "past the end",
        ),
        (
            Box::new(|m| m.artifacts[0].entries[1].offset = u64::MAX),
            "past the end",
        ),
        (
            Box::new(|m| m.artifacts[0].entries[1].file = 9),
            "data file #9",
        ),
        (
            Box::new(|m| m.artifacts[0].entries[1].mode = 0o4755),
            "mode",
        ),
        (
            Box::new(|m| m.artifacts[0].entries[0].size = 1),
            "has contents",
        ),
        (
            Box::new(|m| m.artifacts.push(m.artifacts[0].clone())),
            "listed twice",
        ),
    ];
    for (f, want) in cases {
        let e = reseal(&*f);
        assert!(e.contains(want), "{want}: {e}");
    }
    // A count of entries past the bytes left is refused before allocating.
    let mut b = m.encode();
    let at = 10 + b[10..].windows(6).position(|w| w == b"triton").unwrap() + 6;
    b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let body = b.len() - 8;
    let sum = xxh3_64(&b[..body]);
    b[body..].copy_from_slice(&sum.to_le_bytes());
    let e = Manifest::decode(&b).unwrap_err().to_string();
    assert!(e.contains("artifact entries"), "{e}");
}

proptest::proptest! {
    /// Any bytes, and any mutation of a valid manifest, decode to an error or a manifest
    /// that validates: never a panic, never an allocation sized by the input.
    #[test]
    fn untrusted_bytes_never_panic(
        bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        edits in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 0..8),
        reseal in proptest::bool::ANY,
    ) {
        let _ = Manifest::decode(&bytes);
        let mut b = sample().encode();
        for (at, v) in edits {
            let n = b.len();
            b[at % n] = v;
        }
        if reseal {
            let body = b.len() - 8;
            let sum = xxh3_64(&b[..body]);
            b[body..].copy_from_slice(&sum.to_le_bytes());
        }
        if let Ok(m) = Manifest::decode(&b) {
            m.validate().unwrap();
        }
    }
}

#[test]
fn round_trip() {
    let m = sample();
    assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
}

#[test]
fn vram_kind_and_device_round_trip_and_are_bounded() {
    let mut m = sample();
    m.regions[0].kind = MemKind::Vram;
    m.regions[0].dev_id = 3;
    let back = Manifest::decode(&m.encode()).unwrap();
    assert_eq!(
        (back.regions[0].kind, back.regions[0].dev_id),
        (MemKind::Vram, 3)
    );
    m.regions[0].dev_id = MAX_GPU_ORDINAL + 1;
    let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
    assert!(e.contains("GPU") && e.contains("weights"), "{e}");
    m.regions[0].kind = MemKind::Dram;
    m.regions[0].dev_id = 1;
    let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
    assert!(e.contains("names device 1"), "{e}");
    m.regions[0].dev_id = 0;
    m.regions[0].kind = MemKind::File;
    let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
    assert!(e.contains("only DRAM and VRAM"), "{e}");
}

#[test]
fn every_truncation_and_every_flipped_byte_is_refused() {
    let bytes = sample().encode();
    for n in 0..bytes.len() {
        assert!(Manifest::decode(&bytes[..n]).is_err(), "truncated to {n}");
    }
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        assert!(Manifest::decode(&b).is_err(), "byte {i} flipped");
    }
}

#[test]
fn a_newer_version_is_named() {
    let mut b = sample().encode();
    b[8] = 3;
    let e = Manifest::decode(&b).unwrap_err().to_string();
    assert!(
        e.contains("version 3") && e.contains("reads up to 2"),
        "{e}"
    );
}

/// Checksummed but lying: counts past the input, chunks outside their file, bad names.
#[test]
fn consistent_checksum_does_not_make_a_lie_valid() {
    let reseal = |m: &Manifest| Manifest::decode(&m.encode());
    let mut m = sample();
    m.regions[0].chunks[1].offset = 4097;
    let e = reseal(&m).unwrap_err().to_string();
    assert!(
        e.contains("weights") && e.contains("chunk 1") && e.contains("past the end"),
        "{e}"
    );
    let mut m = sample();
    m.files[0].name = "/etc/passwd".into();
    assert!(reseal(&m).is_err());
    let mut m = sample();
    m.files[0].name = "../../x".into();
    assert!(reseal(&m).is_ok(), "siblings of the checkpoint are allowed");
    m.files[0].name = "a/..".into();
    assert!(reseal(&m).is_err());
    let mut m = sample();
    m.regions[0].chunks.pop();
    assert!(reseal(&m).unwrap_err().to_string().contains("expected 2"));
    let mut m = sample();
    m.chunk_size = 100;
    assert!(reseal(&m).is_err());
    // A count that claims more entries than bytes left is refused before allocating.
    let mut b = sample().encode();
    let at = b.len() - 8 - 2 * CHUNK_LEN - 4;
    b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let body = b.len() - 8;
    let sum = xxh3_64(&b[..body]);
    b[body..].copy_from_slice(&sum.to_le_bytes());
    let e = Manifest::decode(&b).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("chunks"), "{e}");
}
