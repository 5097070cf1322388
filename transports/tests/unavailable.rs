//! An agent with every backend this crate builds, on whatever host runs the tests: backends
//! whose hardware or library is missing (`cuda`, `gds`, `rdma` on a machine without a GPU or an
//! RDMA device) report `unavailable: <reason>`; registering VRAM and forcing them are refused
//! with that reason; and the agent goes on with the rest. Where the hardware is present, the
//! same test checks the other way round.

use std::time::Duration;

use nixl_core::{
    Agent, BackendName, Desc, DescList, Error, ErrorClass, MemKind, XferOp, XferOptions,
};
use nixl_transports::config::Config;

fn agent(name: &str) -> Agent {
    let cfg = Config::from_toml("[tcp]\nlisten = \"127.0.0.1:0\"").unwrap();
    Agent::builder(name)
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap()
}

fn reason(a: &Agent, b: BackendName) -> Option<String> {
    a.backends()
        .iter()
        .find(|s| s.name == b)
        .unwrap_or_else(|| panic!("{b} is not among the default backends"))
        .unavailable
        .clone()
}

#[test]
fn missing_hardware_is_reported_refused_with_the_reason_and_the_rest_runs() {
    let a = agent("hw-a");
    let b = agent("hw-b");
    for n in [BackendName::Cuda, BackendName::Gds, BackendName::Rdma] {
        match reason(&a, n) {
            Some(r) => eprintln!("{n}: unavailable: {r}"),
            None => eprintln!("{n}: available on this host"),
        }
    }

    // VRAM registration without a running cuda backend: Unavailable, naming cuda's reason.
    if let Some(why) = reason(&a, BackendName::Cuda) {
        assert!(!why.is_empty());
        let gpu = DescList::from_descs(MemKind::Vram, vec![Desc::new(0x7f00_0000_0000, 4096, 0)])
            .unwrap();
        // SAFETY: the registration is refused before anything could touch the address.
        let e = unsafe { a.register(&gpu) }.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
        assert!(e.to_string().contains(&why), "{e} does not carry: {why}");
    }

    // DRAM moves as before.
    let src: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; 1 << 20];
    let l = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&src)]).unwrap();
    let r = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut dst)]).unwrap();
    // SAFETY: both buffers outlive their registrations; `dst` is read after the transfer ends.
    let _rs = unsafe { a.register(&l) }.unwrap();
    // SAFETY: as above.
    let _rd = unsafe { b.register(&r) }.unwrap();
    a.load_remote(&b.metadata_bytes()).unwrap();
    let x = a
        .create_xfer(XferOp::Write, &l, &r, "hw-b", XferOptions::default())
        .unwrap();
    x.run_blocking().unwrap();
    assert!(dst == src);

    // Forcing an unavailable backend: refused with its reason.
    for n in [BackendName::Cuda, BackendName::Gds, BackendName::Rdma] {
        let Some(why) = reason(&a, n) else { continue };
        let e = a
            .create_xfer(
                XferOp::Write,
                &l,
                &r,
                "hw-b",
                XferOptions {
                    backend: Some(n),
                    deadline: Some(Duration::from_secs(5)),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable { backend, reason } if *backend == n && reason.to_string() == why),
            "{n}: {e}"
        );
    }
}
