//! Unit tests of the backend without RDMA hardware (a fake sysfs, the wire, the planner glue).

use super::topo::fake::FakeSys;
use super::*;

#[test]
fn roce_gids_of_different_kinds_are_refused_before_the_qp_tries() {
    let v4 = |a: [u8; 4]| {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&a);
        g
    };
    let mut ll = [0u8; 16];
    ll[0] = 0xfe;
    ll[1] = 0x80;
    ll[15] = 7;
    let eth = verbs::LINK_LAYER_ETHERNET;
    assert!(check_gid_kinds("mlx5_0", &v4([10, 0, 0, 1]), &v4([10, 0, 0, 2]), eth).is_ok());
    assert!(check_gid_kinds("mlx5_0", &ll, &ll, eth).is_ok());
    let e = check_gid_kinds("mlx5_0", &v4([10, 0, 0, 1]), &ll, eth).unwrap_err();
    assert!(
        e.contains("GID kinds differ") && e.contains("gid_index"),
        "{e}"
    );
    let e = check_gid_kinds("mlx5_0", &[0; 16], &ll, eth).unwrap_err();
    assert!(e.contains("zero"), "{e}");
    // InfiniBand routes by LID.
    assert!(check_gid_kinds("mlx5_0", &[0; 16], &ll, verbs::LINK_LAYER_INFINIBAND).is_ok());
}

#[test]
fn device_choice_and_its_reasons() {
    let fs = FakeSys::new("choose").unwrap();
    let e = choose_devices(&[], None, &fs.root).unwrap_err();
    assert_eq!(
        e,
        format!(
            "no RDMA devices (ibv_get_device_list returned 0; {}/class/infiniband is empty)",
            fs.root.display()
        )
    );
    let e = choose_devices(&[], None, &fs.root.join("absent")).unwrap_err();
    assert!(
        e.ends_with("/absent/class/infiniband does not exist)"),
        "{e}"
    );
    let found = vec!["mlx5_0".to_string(), "mlx5_1".to_string()];
    assert_eq!(choose_devices(&found, None, &fs.root).unwrap(), found);
    let want = vec!["mlx5_1".to_string()];
    assert_eq!(choose_devices(&found, Some(&want), &fs.root).unwrap(), want);
    let want = vec!["mlx5_9".to_string()];
    assert_eq!(
        choose_devices(&found, Some(&want), &fs.root).unwrap_err(),
        "configured RDMA device 'mlx5_9' is not present (found: mlx5_0, mlx5_1)"
    );
    assert!(choose_devices(&found, Some(&[]), &fs.root)
        .unwrap_err()
        .contains("empty list"));
}

#[test]
fn every_peer_nic_is_reachable() {
    const IB: u8 = 1;
    const ETH: u8 = 2;
    // Rail-aligned: NIC i to NIC i, nothing more.
    assert_eq!(
        pair_nics(&[IB; 4], &[IB; 4]),
        vec![(0, 0), (1, 1), (2, 2), (3, 3)]
    );
    // One local NIC, eight on the peer: the rail pair plus one lane to each other NIC.
    let p = pair_nics(&[IB], &[IB; 8]);
    assert_eq!(p.len(), 8);
    assert!((0..8u8).all(|k| p.iter().any(|&(l, r)| l == 0 && r == k)));
    // More local NICs than peer NICs: round robin, all covered.
    assert_eq!(pair_nics(&[IB; 3], &[IB; 2]), vec![(0, 0), (1, 1), (2, 0)]);
    // Link layers must match; a peer NIC no local NIC shares a link layer with is left.
    assert_eq!(
        pair_nics(&[IB, ETH], &[ETH, ETH, IB]),
        vec![(0, 2), (1, 1), (1, 0)]
    );
    assert_eq!(pair_nics(&[ETH], &[IB]), vec![]);
    assert_eq!(pair_nics(&[], &[IB]), vec![]);
}

#[test]
fn config_limits() {
    assert!(RdmaConfig::default().check().is_ok());
    let bad = [
        RdmaConfig {
            qps_per_nic: 0,
            ..Default::default()
        },
        RdmaConfig {
            slice_bytes: 0,
            ..Default::default()
        },
        RdmaConfig {
            slice_bytes: 2 << 30,
            ..Default::default()
        },
        RdmaConfig {
            max_outstanding: 0,
            ..Default::default()
        },
        RdmaConfig {
            max_notif: 0,
            ..Default::default()
        },
    ];
    for c in bad {
        assert!(c.check().is_err(), "{c:?}");
    }
}
