//! What an RDMA peer sends: its connection info (in metadata), its regions' keys (in metadata)
//! and the queue-pair handshake (over the control channel). Decoding any input returns Ok or
//! Err, never panics; whatever decodes re-encodes to a value that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_transports::fuzzing::rdma_wire::{ConnInfo, Msg, RegionKeys};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(v) = ConnInfo::decode(body) {
                assert_eq!(ConnInfo::decode(&v.encode()).expect("re-encoded"), v);
            }
        }
        1 => {
            if let Ok(v) = RegionKeys::decode(body) {
                assert_eq!(RegionKeys::decode(&v.encode()).expect("re-encoded"), v);
            }
        }
        _ => {
            if let Ok(v) = Msg::decode(body) {
                assert_eq!(Msg::decode(&v.encode()).expect("re-encoded"), v);
            }
        }
    }
});
