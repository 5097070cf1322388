//! Discovery against a real etcd server, started by each test on free loopback ports.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent, has, list, reg, until, Etcd};
use nixl_core::{AgentMetadata, XferOp, XferOptions};
use nixl_discovery::{DiscoveryError, EtcdConfig, Registry};

#[test]
fn publish_fetch_list_load_and_revoke_on_drop() {
    let Some(e) = Etcd::start("publish") else {
        return;
    };
    let r = Registry::connect(&e.cfg(10)).unwrap();
    let a = agent("pub-a");
    let p = r.publish(&a).unwrap();
    assert_eq!(p.key(), "/nixl/agents/pub-a");
    let md = r.fetch("pub-a").unwrap().expect("published");
    assert_eq!(
        AgentMetadata::decode(&md).unwrap().instance_id,
        a.instance_id()
    );
    assert_eq!(r.list().unwrap(), vec!["pub-a".to_owned()]);
    assert_eq!(r.fetch("nobody").unwrap(), None);

    // Loading one peer on demand.
    let b = agent("pub-b");
    assert!(r.load_peer(&b, "pub-a").unwrap());
    assert!(!r.load_peer(&b, "nobody").unwrap());
    assert_eq!(b.peers(), vec!["pub-a".to_owned()]);

    p.refresh().unwrap();
    drop(p);
    assert_eq!(r.fetch("pub-a").unwrap(), None, "drop revokes the lease");

    // Dropping the agent ends its publication too.
    let c = agent("pub-c");
    let pc = r.publish(&c).unwrap();
    drop(c);
    until("pub-c unpublished", Duration::from_secs(3), || {
        r.fetch("pub-c").unwrap().is_none()
    });
    assert!(matches!(pc.refresh(), Err(DiscoveryError::Ended(_))));
    drop(pc);

    // The synchronous API works (blocking) from inside another tokio runtime, and dropping it
    // there does not panic.
    let cfg = e.cfg(10);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let r = Registry::connect(&cfg).unwrap();
            let d = agent("pub-d");
            let pd = r.publish(&d).unwrap();
            assert!(r.fetch("pub-d").unwrap().is_some());
            drop(pd);
            drop(r);
        });
}

#[test]
fn watcher_follows_peers_generations_and_departures() {
    let Some(e) = Etcd::start("watcher") else {
        return;
    };
    // A long ttl: departures below are seen through the revoked lease, not its expiry.
    let r = Registry::connect(&e.cfg(10)).unwrap();
    let a = agent("w-a");
    let b = agent("w-b");
    let mut b1 = vec![1u8; 4096];
    let _rb1 = reg(&b, &mut b1);
    let pb = r.publish(&b).unwrap();
    let _pa = r.publish(&a).unwrap();
    // A peer loaded by other means, which the watcher must leave alone.
    let x = agent("w-x");
    a.load_remote(&x.metadata_bytes()).unwrap();

    let w = r.watch(&a).unwrap();
    let mut now = a.peers();
    now.sort();
    assert_eq!(
        now,
        vec!["w-b".to_owned(), "w-x".to_owned()],
        "loaded at start, own key ignored"
    );

    // A peer that appears later.
    let c = agent("w-c");
    let pc = r.publish(&c).unwrap();
    let took = until("w-c appears", Duration::from_secs(5), || has(&a, "w-c"));
    eprintln!("new peer seen after {took:?}");

    // b registers more memory: the newer generation reaches a, so a transfer into the new
    // region is accepted.
    let mut src = vec![9u8; 4096];
    let _rs = reg(&a, &mut src);
    let mut b2 = vec![0u8; 4096];
    let xfer = |a: &nixl_core::Agent, dst: &[u8]| {
        a.create_xfer(
            XferOp::Write,
            &list(&src),
            &list(dst),
            "w-b",
            XferOptions::default(),
        )
    };
    assert!(xfer(&a, &b2).is_err(), "not registered yet");
    let gen = b.generation();
    let _rb2 = reg(&b, &mut b2);
    assert!(b.generation() > gen);
    let took = until("new generation", Duration::from_secs(5), || {
        xfer(&a, &b2).is_ok()
    });
    eprintln!("new generation usable after {took:?}");
    let x = xfer(&a, &b2).unwrap();
    x.run_blocking().unwrap();
    drop(x);
    assert_eq!(b2, vec![9u8; 4096]);

    // A publication dropped: its key goes at once, and a invalidates the peer long before the
    // 10 s ttl.
    drop(pb);
    let took = until("w-b invalidated", Duration::from_secs(3), || {
        !has(&a, "w-b")
    });
    eprintln!("departure seen after {took:?}");
    assert!(has(&a, "w-c") && has(&a, "w-x"), "{:?}", a.peers());

    // A restarted peer (same name, new instance) replaces the old one.
    drop(pc);
    until("w-c invalidated", Duration::from_secs(3), || {
        !has(&a, "w-c")
    });
    let c2 = agent("w-c");
    let _pc2 = r.publish(&c2).unwrap();
    until("w-c again", Duration::from_secs(5), || has(&a, "w-c"));

    // Once the watcher is dropped, nothing changes any more.
    drop(w);
    drop(_pc2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(has(&a, "w-c"));
}

#[test]
fn a_killed_publisher_disappears_after_its_ttl() {
    if std::env::var_os("NIXL_ETCD_CHILD").is_some() {
        return;
    }
    let Some(e) = Etcd::start("killed") else {
        return;
    };
    let r = Registry::connect(&e.cfg(2)).unwrap();
    let a = agent("k-a");
    let _w = r.watch(&a).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_publisher", "--ignored", "--nocapture"])
        .env("NIXL_ETCD_CHILD", &e.url)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until("child published", Duration::from_secs(10), || {
        has(&a, "k-child")
    });
    // Some keepalives go by: the lease is renewed, not just granted.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(has(&a, "k-child"), "a live publisher stays");
    child.kill().unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    until("killed child invalidated", Duration::from_secs(8), || {
        !has(&a, "k-child")
    });
    let took = killed.elapsed();
    eprintln!("killed publisher (ttl 2 s) invalidated after {took:?}");
    // The last keepalive was at most ttl/3 before the kill.
    assert!(
        took >= Duration::from_millis(1000),
        "gone too soon: {took:?}"
    );
    assert_eq!(r.fetch("k-child").unwrap(), None);
}

/// The child of `a_killed_publisher_disappears_after_its_ttl`: publishes and waits to be killed.
#[test]
#[ignore = "run by a_killed_publisher_disappears_after_its_ttl as a child process"]
fn child_publisher() {
    let Some(url) = std::env::var_os("NIXL_ETCD_CHILD") else {
        return;
    };
    let cfg = EtcdConfig {
        ttl: Duration::from_secs(2),
        ..EtcdConfig::new([url.to_string_lossy()])
    };
    let r = Registry::connect(&cfg).unwrap();
    let a = agent("k-child");
    let _p = r.publish(&a).unwrap();
    // Killed long before; bounded in case the parent died.
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn unreachable_etcd_is_an_error_within_the_connect_timeout() {
    common::init_tracing();
    let timeout = Duration::from_millis(500);
    let cfg = |addr: String| EtcdConfig {
        connect_timeout: timeout,
        ..EtcdConfig::new([format!("http://{addr}")])
    };
    // Nothing listens.
    let refused = format!("127.0.0.1:{}", common::free_port());
    // Something accepts TCP connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent.local_addr().unwrap().to_string();
    let _keep = std::net::TcpListener::bind(&silent);
    for addr in [refused, silent] {
        let t = Instant::now();
        let err = Registry::connect(&cfg(addr.clone())).unwrap_err();
        let took = t.elapsed();
        eprintln!("{addr}: {err} (after {took:?})");
        assert!(took < timeout + Duration::from_millis(500), "{took:?}");
        assert!(matches!(err, DiscoveryError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    }
    // A malformed configuration is refused before anything is tried.
    let err = Registry::connect(&EtcdConfig::new(Vec::<String>::new())).unwrap_err();
    assert!(matches!(err, DiscoveryError::Config(_)), "{err}");
}

#[test]
fn garbage_under_the_prefix_is_skipped() {
    let Some(e) = Etcd::start("garbage") else {
        return;
    };
    let c = e.cfg(10);
    let key = |n: &str| format!("{}{n}", c.prefix);
    let b = agent("g-b");
    let mut b1 = vec![0u8; 64];
    let _rb1 = reg(&b, &mut b1);
    let old_b = b.metadata_bytes();
    let x = agent("g-x");
    let mut partial = x.metadata();
    partial.partial = true;
    // Put straight through the etcd client, under names and values no publication makes.
    let puts = vec![
        (key("junk").into_bytes(), b"not metadata".to_vec()),
        (key("g-y").into_bytes(), x.metadata_bytes()), // another agent's metadata
        (key("g-p").into_bytes(), partial.encode()),
        (key("g-z").into_bytes(), agent("g-a").metadata_bytes()), // the watcher's own name
        (
            [c.prefix.as_bytes(), b"\xff\xfe"].concat(),
            x.metadata_bytes(),
        ),
    ];
    e.raw(async |raw| {
        for (k, v) in puts {
            raw.put(k, v, None).await?;
        }
        Ok(())
    });
    let r = Registry::connect(&c).unwrap();
    let a = agent("g-a");
    let pb = r.publish(&b).unwrap();
    let _w = r.watch(&a).unwrap();
    assert_eq!(a.peers(), vec!["g-b".to_owned()]);
    assert!(
        r.list().unwrap().contains(&"junk".to_owned()),
        "list shows every key"
    );
    assert!(matches!(
        r.load_peer(&a, "g-y"),
        Err(DiscoveryError::Load { .. })
    ));

    // More garbage while watching, then a newer generation of b, then b's older metadata put
    // back (stale: logged and skipped, the newer stays), then a new peer: all followed.
    e.raw(async |raw| {
        raw.put(key("junk2"), vec![0xff; 100], None).await?;
        raw.put(key("g-y"), b"still not".to_vec(), None).await?;
        Ok(())
    });
    let mut src = vec![5u8; 64];
    let _rs = reg(&a, &mut src);
    let mut b2 = vec![0u8; 64];
    let _rb2 = reg(&b, &mut b2);
    pb.refresh().unwrap();
    let to_b2 = || {
        a.create_xfer(
            XferOp::Write,
            &list(&src),
            &list(&b2),
            "g-b",
            XferOptions::default(),
        )
        .is_ok()
    };
    until("b's new generation", Duration::from_secs(5), to_b2);
    let lease = e.raw(async |raw| raw.get(key("g-b"), None).await).kvs()[0].lease();
    e.raw(async |raw| {
        let opts = etcd_client::PutOptions::new().with_lease(lease);
        raw.put(key("g-b"), old_b, Some(opts)).await
    });
    let d = agent("g-d");
    let _pd = r.publish(&d).unwrap();
    until("g-d after garbage", Duration::from_secs(5), || {
        has(&a, "g-d")
    });
    assert!(
        to_b2(),
        "the stale generation did not replace the newer one"
    );
    let mut peers = a.peers();
    peers.sort();
    assert_eq!(peers, vec!["g-b".to_owned(), "g-d".to_owned()]);
}

#[test]
fn an_outage_hangs_no_one_and_an_expired_lease_is_replaced() {
    let Some(e) = Etcd::start("outage") else {
        return;
    };
    let ttl = 2;
    let r = Registry::connect(&e.cfg(ttl)).unwrap();
    let a = agent("o-a");
    let b = agent("o-b");
    let c = agent("o-c");
    let _pb = r.publish(&b).unwrap();
    let pc = r.publish(&c).unwrap();
    let _w = r.watch(&a).unwrap();
    assert!(has(&a, "o-b") && has(&a, "o-c"));
    let lease_of = |e: &Etcd| {
        e.raw(async |raw| raw.get("/nixl/agents/o-b", None).await)
            .kvs()
            .first()
            .map(|kv| kv.lease())
    };
    let lease = lease_of(&e).expect("o-b published");

    e.pause();
    let paused = Instant::now();
    let bound = Duration::from_millis(1500);
    let t = Instant::now();
    let err = r.fetch("o-b").unwrap_err();
    assert!(t.elapsed() < bound, "fetch took {:?}", t.elapsed());
    assert!(matches!(err, DiscoveryError::Timeout { .. }), "{err}");
    let t = Instant::now();
    assert!(Registry::connect(&e.cfg(ttl)).is_err());
    assert!(t.elapsed() < bound, "connect took {:?}", t.elapsed());
    let t = Instant::now();
    drop(pc);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        t.elapsed()
    );
    // Longer than the ttl: etcd expires the leases when it runs again.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(paused.elapsed()));
    e.resume();

    // b's publication notices that its lease is gone and publishes under a new one.
    let took = until("o-b republished", Duration::from_secs(10), || {
        lease_of(&e).is_some_and(|l| l != lease)
    });
    eprintln!("republished {took:?} after the outage");
    until("o-b loaded again", Duration::from_secs(5), || {
        has(&a, "o-b")
    });
    // c could not revoke its lease, which expired instead.
    until("o-c gone", Duration::from_secs(5), || !has(&a, "o-c"));
    assert_eq!(r.fetch("o-c").unwrap(), None);
    // The new lease is kept alive.
    std::thread::sleep(Duration::from_secs(ttl + 1));
    assert!(r.fetch("o-b").unwrap().is_some());
    assert!(has(&a, "o-b"));
}

#[test]
fn watch_and_publication_survive_an_etcd_restart() {
    let Some(mut e) = Etcd::start("restart") else {
        return;
    };
    let r = Registry::connect(&e.cfg(10)).unwrap();
    let a = agent("r-a");
    let b = agent("r-b");
    let _pb = r.publish(&b).unwrap();
    let _w = r.watch(&a).unwrap();
    assert!(has(&a, "r-b"));

    e.restart();

    // A new generation of b and a new peer d, both after the restart, reach a.
    let mut src = vec![3u8; 256];
    let _rs = reg(&a, &mut src);
    let mut b1 = vec![0u8; 256];
    let _rb1 = reg(&b, &mut b1);
    let took = until(
        "b's new generation after restart",
        Duration::from_secs(10),
        || {
            a.create_xfer(
                XferOp::Write,
                &list(&src),
                &list(&b1),
                "r-b",
                XferOptions::default(),
            )
            .is_ok()
        },
    );
    eprintln!("new generation seen {took:?} after the restart");
    let d = agent("r-d");
    let _pd = r.publish(&d).unwrap();
    until("r-d after restart", Duration::from_secs(5), || {
        has(&a, "r-d")
    });
    assert!(r.fetch("r-b").unwrap().is_some());
}

#[test]
fn many_agents_are_listed_and_loaded_page_by_page() {
    let Some(e) = Etcd::start("many") else {
        return;
    };
    let c = e.cfg(10);
    let n = 150; // more than two pages
    let template = agent("n-template");
    let ops: Vec<etcd_client::TxnOp> = (0..n)
        .map(|i| {
            let mut md = template.metadata();
            md.name = format!("n-{i:03}");
            etcd_client::TxnOp::put(format!("{}{}", c.prefix, md.name), md.encode(), None)
        })
        .collect();
    e.raw(async |raw| {
        for chunk in ops.chunks(100) {
            raw.txn(etcd_client::Txn::new().and_then(chunk.to_vec()))
                .await?;
        }
        Ok(())
    });
    let r = Registry::connect(&c).unwrap();
    let names = r.list().unwrap();
    assert_eq!(names.len(), n);
    assert_eq!(names[n - 1], format!("n-{:03}", n - 1));
    let a = agent("n-a");
    let _w = r.watch(&a).unwrap();
    assert_eq!(a.peers().len(), n);
}

/// Someone who can write to etcd files an entry under an agent's name that sends its peers to
/// another agent's listener. The watcher loads it (the name matches the key), but the transport
/// authenticates who answers there: a transfer to the named agent is refused and nothing moves.
/// (etcd must be access-controlled: whoever writes the prefix chooses where peers connect.)
#[test]
fn a_poisoned_entry_is_refused_by_the_transport_that_authenticates_the_name() {
    use nixl_core::ErrorClass;
    use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};
    let Some(e) = Etcd::start("poison") else {
        return;
    };
    let tcp_agent = |name: &str| {
        std::sync::Arc::new(
            nixl_core::Agent::builder(name)
                .backend(std::sync::Arc::new(TcpBackend::new(TcpConfig {
                    listen: Some("127.0.0.1:0".parse().unwrap()),
                    auth: Auth::host_only(),
                    ..TcpConfig::default()
                })))
                .build()
                .unwrap(),
        )
    };
    let c = e.cfg(10);
    let r = Registry::connect(&c).unwrap();
    let a = tcp_agent("p-a");
    let v = tcp_agent("p-v");
    let m = tcp_agent("p-m");
    let mut vbuf = vec![0u8; 4096];
    let mut mbuf = vec![0u8; 4096];
    let mut src = vec![7u8; 4096];
    let _rv = reg(&v, &mut vbuf);
    let _rm = reg(&m, &mut mbuf);
    let _rs = reg(&a, &mut src);
    let _pv = r.publish(&v).unwrap();
    let _w = r.watch(&a).unwrap();
    until("p-v loaded", Duration::from_secs(5), || has(&a, "p-v"));

    // The entry of p-v, rewritten: p-m's address, instance and regions under p-v's name.
    let mut forged = m.metadata();
    forged.name = "p-v".into();
    forged.generation = v.generation() + 100;
    let key = format!("{}p-v", c.prefix);
    e.raw(async |raw| raw.put(key, forged.encode(), None).await);
    let write_to = |dst: &[u8]| {
        a.create_xfer(
            XferOp::Write,
            &list(&src),
            &list(dst),
            "p-v",
            XferOptions::default(),
        )
        .and_then(|x| x.run_blocking())
    };
    until("the forged entry is loaded", Duration::from_secs(5), || {
        write_to(&mbuf).is_err_and(|e| e.class() == ErrorClass::Denied)
    });
    let err = write_to(&mbuf).unwrap_err();
    assert!(err.to_string().contains("is agent 'p-m'"), "{err}");
    assert!(mbuf.iter().all(|&b| b == 0), "bytes reached the impostor");
    assert!(vbuf.iter().all(|&b| b == 0));
}
