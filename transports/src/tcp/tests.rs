//! Tests of the connection info and the settings' checks.

use std::net::SocketAddr;

use super::config::{parse_listen, TcpConfig};
use super::conn_info::{decode_conn_info, encode_conn_info, listen_addrs_in};

#[test]
fn conn_info_round_trips_and_garbage_is_refused() {
    let addrs: Vec<SocketAddr> = vec![
        "10.1.2.3:4000".parse().unwrap(),
        "[fd00::2]:5000".parse().unwrap(),
    ];
    assert_eq!(decode_conn_info(&encode_conn_info(&addrs)).unwrap(), addrs);
    assert!(decode_conn_info(&encode_conn_info(&[])).is_err());
    assert!(decode_conn_info(&[]).is_err());
    assert!(decode_conn_info(&[1, 1, 4, 1, 2, 3, 4, 0, 0]).is_err());
    assert!(decode_conn_info(&[1, 1, 9]).is_err());
    assert!(decode_conn_info(&[2, 0]).is_err());
    let mut long = encode_conn_info(&addrs);
    long.push(0);
    assert!(decode_conn_info(&long).is_err());
}

#[test]
fn listen_addrs_are_read_from_metadata() {
    let addrs: Vec<SocketAddr> = vec!["10.1.2.3:4000".parse().unwrap()];
    let mut md = nixl_core::AgentMetadata {
        name: "a".into(),
        instance_id: 1,
        generation: 1,
        partial: false,
        backends: vec![nixl_core::metadata::BackendInfo {
            name: nixl_core::BackendName::Tcp,
            conn_info: encode_conn_info(&addrs),
        }],
        regions: Vec::new(),
    };
    assert_eq!(listen_addrs_in(&md), addrs);
    md.backends[0].conn_info = vec![9];
    assert!(listen_addrs_in(&md).is_empty());
    md.backends.clear();
    assert!(listen_addrs_in(&md).is_empty());
}

#[test]
fn config_limits() {
    assert!(TcpConfig::default().check().is_ok());
    for c in [
        TcpConfig {
            conns_per_peer: 0,
            ..TcpConfig::default()
        },
        TcpConfig {
            chunk_bytes: 10,
            ..TcpConfig::default()
        },
        TcpConfig {
            window: 0,
            ..TcpConfig::default()
        },
    ] {
        assert!(c.check().is_err());
    }
    assert_eq!(
        parse_listen("[::1]:0").unwrap(),
        "[::1]:0".parse::<SocketAddr>().unwrap()
    );
    assert!(parse_listen("nonsense").is_err());
}
