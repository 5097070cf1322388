//! What a CUDA peer sends: region data and connection info (in metadata), control messages
//! (over the control channel) and frames on the node-local Unix socket. Decoding any input
//! returns Ok or Err, never panics; whatever decodes re-encodes to a value that decodes to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixl_transports::fuzzing::cuda_wire::{ConnInfo, Ctl, Frame, RegionPublic};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            // The region's length bounds its chunks; take it from the input too.
            let (len, body) = match body.split_first_chunk::<8>() {
                Some((l, rest)) => (u64::from_le_bytes(*l), rest),
                None => return,
            };
            if let Ok(v) = RegionPublic::decode(body, len) {
                assert_eq!(RegionPublic::decode(&v.encode(), len).expect("re-encoded"), v);
            }
        }
        1 => {
            if let Ok(v) = ConnInfo::decode(body) {
                assert_eq!(ConnInfo::decode(&v.encode()).expect("re-encoded"), v);
            }
        }
        2 => {
            if let Ok(v) = Ctl::decode(body) {
                assert_eq!(Ctl::decode(&v.encode()).expect("re-encoded"), v);
            }
        }
        _ => {
            if let Ok(v) = Frame::decode(body) {
                // `encode` puts the 4-byte length in front of the body `decode` reads.
                let enc = v.encode();
                assert_eq!(Frame::decode(&enc[4..]).expect("re-encoded"), v);
            }
        }
    }
});
