//! Unit tests of the configuration and key helpers.

use super::*;

#[test]
fn config_from_toml() {
    let c = EtcdConfig::from_toml(
        "backends = [\"local\"]\n[etcd]\nendpoints = [\"http://h:2379\"]\nttl_s = 3\n",
    )
    .unwrap();
    assert_eq!(c.endpoints, vec!["http://h:2379".to_owned()]);
    assert_eq!(c.prefix, DEFAULT_PREFIX);
    assert_eq!(c.ttl, Duration::from_secs(3));
    assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    let c = EtcdConfig::from_toml(
        "[etcd]\nendpoints = [\"a:1\", \"b:2\"]\nprefix = \"/x/\"\nconnect_timeout_ms = 250\n",
    )
    .unwrap();
    assert_eq!(c.prefix, "/x/");
    assert_eq!(c.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.ttl, DEFAULT_TTL);
    for bad in [
        "",
        "etcd = 1",
        "[etcd]\n",
        "[etcd]\nendpoints = []\n",
        "[etcd]\nendpoints = [\"a:1\"]\nttl_s = 0\n",
        "[etcd]\nendpoints = [\"a:1\"]\nprefix = \"\"\n",
        "[etcd]\nendpoints = [\"a:1\"]\nconnect_timeout_ms = 0\n",
        "[etcd]\nendpoints = [\"a:1\"]\nttl = 3\n",
    ] {
        let e = EtcdConfig::from_toml(bad).unwrap_err();
        assert!(matches!(e, DiscoveryError::Config(_)), "{bad:?}: {e}");
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Registry>();
    check::<Publication>();
    check::<Watcher>();
    check::<DiscoveryError>();
}

#[test]
fn ttl_rounds_up_to_whole_seconds() {
    let mut c = EtcdConfig::new(["a:1"]);
    c.ttl = Duration::from_millis(1500);
    assert_eq!(c.ttl_secs(), 2);
    c.ttl = Duration::from_secs(2);
    assert_eq!(c.ttl_secs(), 2);
    c.ttl = Duration::from_millis(999);
    assert!(c.validate().is_err());
}

#[test]
fn keys_and_names() {
    let c = EtcdConfig::new(["a:1"]);
    assert_eq!(c.key("x"), "/nixl/agents/x");
    assert_eq!(c.name_of(b"/nixl/agents/x/y"), Some("x/y".to_owned()));
    assert_eq!(c.name_of(b"/nixl/agents/"), None);
    assert_eq!(c.name_of(b"/nixl/other/x"), None);
    assert_eq!(c.name_of(b"/nixl/agents/\xff"), None);
    assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
    assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
}
