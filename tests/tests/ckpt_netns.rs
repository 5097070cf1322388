//! A checkpoint served from one "host" (network namespace) and restored on another over tcp:
//! the server process, in namespace `a`, holds the checkpoint in registered memory
//! (`nixl_checkpoint::serve`); the restoring process, in namespace `b`, restores every region
//! from `nixl://ADDR_A:PORT` and compares every byte. Skips visibly where namespaces cannot be
//! made (not root, no iproute2).
//!
//! The test runs itself again in each namespace (`current_exe`, a role in `NIXL_CKPT_NETNS`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use nixl_checkpoint::{restore_mapped, save, serve, Placement, Region, SaveOptions};
use nixl_core::{Agent, Desc, DescList, MemKind};
use nixl_tests::netns::{skip_reason, Lab};
use nixl_transports::config::Config;

const ROLE: &str = "NIXL_CKPT_NETNS";
const TEST: &str = "checkpoint_served_in_one_namespace_restores_in_another";

fn agent(toml: &str) -> Agent {
    let cfg = Config::from_toml(toml).unwrap();
    Agent::builder(format!("ckpt-netns-{}", std::process::id()))
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap()
}

const SIZES: [usize; 3] = [(6 << 20) + 5, 12_345, 4096];

/// In namespace `a`: serves the checkpoint at `dir` on `listen`, prints the URI, waits for
/// stdin to close.
fn server(dir: &str, listen: &str) {
    let a = agent(&format!(
        "backends = [\"tcp\", \"uring\", \"posix\"]\n[tcp]\nlisten = \"{listen}\"\n"
    ));
    let _served = serve(&a, dir).unwrap();
    let at = nixl_transports::tcp::listen_addrs_in(&a.metadata())[0];
    // On stderr, which the harness never captures.
    let _ = writeln!(std::io::stderr(), "nixl://{at}");
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}

/// In namespace `b`: restores every region from `uri` and compares it.
fn restorer(uri: &str) {
    let a = agent("backends = [\"tcp\"]");
    let r = restore_mapped(&a, uri, None, Placement::Anywhere).unwrap();
    for (i, &n) in SIZES.iter().enumerate() {
        let x = r.region(&format!("r{i}")).unwrap();
        assert_eq!(x.len, n as u64);
        // SAFETY: mapped and written by the restore, which has returned.
        let b = unsafe { std::slice::from_raw_parts(x.addr as usize as *const u8, n) };
        assert!(
            b == nixl_tests::pattern(i as u64 + 1, n).as_slice(),
            "r{i} differs"
        );
    }
    let _ = writeln!(std::io::stderr(), "restored {} regions", SIZES.len());
}

#[test]
fn checkpoint_served_in_one_namespace_restores_in_another() {
    match std::env::var(ROLE).as_deref() {
        Ok("serve") => {
            return server(
                &std::env::var("NIXL_CKPT_DIR").unwrap(),
                &std::env::var("NIXL_CKPT_LISTEN").unwrap(),
            )
        }
        Ok("restore") => return restorer(&std::env::var("NIXL_CKPT_URI").unwrap()),
        _ => {}
    }
    nixl_testkit::require!(skip_reason());
    let dir = std::env::temp_dir().join(format!("nixl-ckpt-netns-{}", std::process::id()));
    {
        let a = agent("backends = [\"uring\", \"posix\"]");
        let mut bufs: Vec<Vec<u8>> = SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| nixl_tests::pattern(i as u64 + 1, n))
            .collect();
        let descs: Vec<Desc> = bufs.iter_mut().map(|b| Desc::from_mut_slice(b)).collect();
        // SAFETY: the buffers outlive the registration.
        let _reg =
            unsafe { a.register(&DescList::from_descs(MemKind::Dram, descs.clone()).unwrap()) }
                .unwrap();
        let regions: Vec<Region> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| Region::dram(format!("r{i}"), d.addr, d.len))
            .collect();
        // SAFETY: the buffers are live and unchanged during the call.
        unsafe { save(&a, dir.to_str().unwrap(), &regions, &SaveOptions::default()) }.unwrap();
    }
    let lab = Lab::pair();
    let secret = format!("ckpt-netns-{:032x}", nixl_core::random_u64().unwrap());
    let exe = std::env::current_exe().unwrap();
    let child = |i: usize, role: &str| -> Command {
        let mut c = lab.command(i, &exe);
        c.args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env("NIXL_CKPT_DIR", &dir)
            // Two "hosts": the per-user secret admits only this host, a shared one both.
            .env("NIXL_SECRET", &secret);
        c
    };
    let mut srv = child(0, "serve")
        .env("NIXL_CKPT_LISTEN", format!("{}:0", lab.addr(0)))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut uri = None;
    for line in BufReader::new(srv.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("nixl://") {
            uri = Some(line);
            break;
        }
    }
    let uri = uri.expect("the server printed its URI");
    assert!(uri.contains(&lab.addr(0).to_string()), "{uri}");
    let out = child(1, "restore")
        .env("NIXL_CKPT_URI", &uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    drop(srv.stdin.take());
    let _ = srv.wait();
    let _ = std::fs::remove_dir_all(Path::new(&dir));
    assert!(
        out.status.success() && text.contains("restored 3 regions"),
        "restorer: {text}"
    );
}
